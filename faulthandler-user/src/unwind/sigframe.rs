//! The kernel's x86_64 `struct rt_sigframe` on the user stack, as a signal
//! handler's frames sit on it: `pretcode` (the `sa_restorer`, glibc's
//! `__restore_rt`, which the handler returns to), then `struct ucontext`
//! (whose `uc_mcontext` holds the interrupted registers), then `siginfo`.
//! Layout from arch/x86/include/asm/sigframe.h, uapi/asm/sigcontext.h and
//! uapi/asm-generic/ucontext.h; only userspace reads it, so it lives here
//! rather than in faulthandler-common.

use super::StackCopy;

/// `struct ucontext`: uc_flags, uc_link, then `stack_t uc_stack`
/// (ss_sp, ss_flags + padding, ss_size), then `uc_mcontext`.
const UC_STACK_SP: u64 = 16;
const UC_STACK_FLAGS: u64 = 24;
const UC_STACK_SIZE: u64 = 32;
const UC_MCONTEXT: u64 = 40;
/// `struct sigcontext_64` is 256 bytes, then the 8-byte `uc_sigmask`.
const UCONTEXT_SIZE: u64 = UC_MCONTEXT + 256 + 8;
/// Offsets in `struct sigcontext_64`.
const SC_RBP: u64 = 80;
const SC_RSP: u64 = 120;
const SC_RIP: u64 = 128;
/// Offsets in `siginfo_t`: si_signo, si_errno, si_code, then the union
/// whose first member for faults is si_addr.
const SI_SIGNO: u64 = 0;
const SI_CODE: u64 = 8;
const SI_ADDR: u64 = 16;
/// `ss_flags` value of an altstack that is not set up.
const SS_DISABLE: u32 = 2;
/// Highest real-time signal number on Linux.
const SIGRTMAX: i32 = 64;

/// What the kernel saved when it delivered a signal to a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SigFrame {
    /// Interrupted instruction pointer, stack pointer and frame pointer.
    pub(super) ip: u64,
    pub(super) sp: u64,
    pub(super) bp: u64,
    pub(super) signo: i32,
    pub(super) code: i32,
    pub(super) addr: u64,
    /// The sigaltstack in force at delivery, if one was set up.
    pub(super) altstack: Option<(u64, u64)>,
}

impl SigFrame {
    /// Reads the frame whose `ucontext` starts at `uc`: the stack pointer
    /// at which the trampoline runs, i.e. just past `pretcode`. `None` when
    /// it is not all in the copy or is not a signal frame.
    pub(super) fn read(stack: &StackCopy, uc: u64) -> Option<Self> {
        let word = |off: u64| stack.read_u64(uc.checked_add(off)?);
        let info = uc.checked_add(UCONTEXT_SIZE)?;
        let half = |off: u64| word_lo(stack, info.checked_add(off)?);
        let sc = |off: u64| word(UC_MCONTEXT + off);
        let signo = half(SI_SIGNO)?;
        if !(1..=SIGRTMAX).contains(&signo) {
            return None;
        }
        let (ss_sp, ss_size) = (word(UC_STACK_SP)?, word(UC_STACK_SIZE)?);
        let ss_flags = word(UC_STACK_FLAGS)? as u32;
        let altstack = (ss_flags & SS_DISABLE == 0 && ss_size != 0).then_some((ss_sp, ss_size));
        Some(SigFrame {
            ip: sc(SC_RIP)?,
            sp: sc(SC_RSP)?,
            bp: sc(SC_RBP)?,
            signo,
            code: half(SI_CODE)?,
            // Only meaningful for faults; the reader of `code` decides.
            addr: stack.read_u64(info.checked_add(SI_ADDR)?)?,
            altstack,
        })
    }

    /// Whether the handler ran on the sigaltstack while the interrupted
    /// code did not, so the interrupted frames are on another stack.
    pub(super) fn switched_stacks(&self, uc: u64) -> bool {
        let on = |a: u64| {
            self.altstack
                .is_some_and(|(sp, size)| a.wrapping_sub(sp) < size)
        };
        on(uc) && !on(self.sp)
    }
}

/// The low 32 bits of the word at `addr`, as C's `int`.
fn word_lo(stack: &StackCopy, addr: u64) -> Option<i32> {
    let off = usize::try_from(addr.checked_sub(stack.base)?).ok()?;
    let b = stack.bytes.get(off..off.checked_add(4)?)?;
    b.try_into().ok().map(i32::from_le_bytes)
}

/// A synthetic frame for tests: the bytes of `pretcode` + `ucontext` +
/// `siginfo`, laid out as the kernel writes them.
#[cfg(test)]
pub(super) fn build(pretcode: u64, f: &SigFrame) -> Vec<u8> {
    let mut b = vec![0u8; (8 + UCONTEXT_SIZE + 128) as usize];
    let mut put = |off: u64, v: u64| {
        let off = off as usize;
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(0, pretcode);
    let (ss_sp, ss_size) = f.altstack.unwrap_or((0, 0));
    put(8 + UC_STACK_SP, ss_sp);
    put(8 + UC_STACK_FLAGS, if f.altstack.is_some() { 0 } else { 2 });
    put(8 + UC_STACK_SIZE, ss_size);
    put(8 + UC_MCONTEXT + SC_RIP, f.ip);
    put(8 + UC_MCONTEXT + SC_RSP, f.sp);
    put(8 + UC_MCONTEXT + SC_RBP, f.bp);
    let info = 8 + UCONTEXT_SIZE;
    put(info + SI_SIGNO, f.signo as u32 as u64);
    put(info + SI_CODE, f.code as u32 as u64);
    put(info + SI_ADDR, f.addr);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwind_sigframe_round_trip_and_rejects() {
        let f = SigFrame {
            ip: 0x5555_0000_1234,
            sp: 0x7ffd_0000_2000,
            bp: 0x7ffd_0000_2040,
            signo: 11,
            code: 1,
            addr: 0x40,
            altstack: None,
        };
        let bytes = build(0x7f00_0000_0050, &f);
        let base = 0x7ffd_0000_1000;
        let stack = StackCopy {
            base,
            bytes: &bytes,
        };
        assert_eq!(SigFrame::read(&stack, base + 8), Some(f));
        assert!(!f.switched_stacks(base + 8));
        // Cut short: the siginfo is past the copy.
        let short = StackCopy {
            base,
            bytes: &bytes[..300],
        };
        assert_eq!(SigFrame::read(&short, base + 8), None);
        // Not a signal number: not a signal frame.
        let bad = build(0, &SigFrame { signo: 0, ..f });
        let stack = StackCopy { base, bytes: &bad };
        assert_eq!(SigFrame::read(&stack, base + 8), None);
    }

    #[test]
    fn unwind_sigframe_altstack_switch() {
        let alt = (0x6000_0000, 0x4000);
        let f = SigFrame {
            ip: 1,
            sp: 0x7ffd_0000_2000,
            bp: 0,
            signo: 11,
            code: 1,
            addr: 0,
            altstack: Some(alt),
        };
        assert!(f.switched_stacks(0x6000_3000));
        assert!(
            !f.switched_stacks(0x7ffd_0000_1000),
            "handler on the main stack"
        );
        let nested = SigFrame {
            sp: 0x6000_3800,
            ..f
        };
        assert!(
            !nested.switched_stacks(0x6000_3000),
            "fault on the altstack"
        );
    }
}
