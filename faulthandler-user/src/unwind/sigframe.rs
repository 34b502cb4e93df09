//! The kernel's x86_64 `struct rt_sigframe` on the user stack, as a signal
//! handler's frames sit on it: `pretcode` (the `sa_restorer`, glibc's
//! `__restore_rt`, which the handler returns to), then `struct ucontext`
//! (whose `uc_mcontext` holds the interrupted registers), then `siginfo`.
//! Layout from arch/x86/include/asm/sigframe.h, uapi/asm/sigcontext.h and
//! uapi/asm-generic/ucontext.h; only userspace reads it, so it lives here
//! rather than in faulthandler-common.
//!
//! The kernel writes the siginfo only for SA_SIGINFO handlers; otherwise
//! that part of the frame is whatever the stack held before. It is trusted
//! only where the sigcontext, always written, says the same.

use super::{SigInfo, StackCopy, Trap};

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
const SC_ERR: u64 = 152;
const SC_TRAPNO: u64 = 160;
const SC_CR2: u64 = 176;
/// Offsets in `siginfo_t`: si_signo, si_errno, si_code, then the union
/// whose first member for faults is si_addr.
const SI_SIGNO: u64 = 0;
const SI_CODE: u64 = faulthandler_common::SI_CODE_OFF as u64;
const SI_ADDR: u64 = faulthandler_common::SI_ADDR_OFF as u64;
/// `ss_flags` value of an altstack that is not set up.
const SS_DISABLE: u32 = 2;
/// x86 exception vectors (`trapno`).
const TRAP_UD: u64 = 6;
const TRAP_GP: u64 = 13;
const TRAP_PF: u64 = 14;
/// Page-fault error code bits: the page was present (a protection
/// fault), and a protection-key fault.
const PF_PROT: u64 = 1 << 0;
const PF_PK: u64 = 1 << 5;
const SEGV_MAPERR: i32 = 1;
const SEGV_ACCERR: i32 = 2;
const SEGV_PKUERR: i32 = 4;
const BUS_ADRERR: i32 = 2;
const ILL_ILLOPN: i32 = 2;
use crate::signals::{SI_KERNEL, SIGBUS, SIGFPE, SIGILL, SIGSEGV};

/// What the kernel saved when it delivered a signal to a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SigFrame {
    /// Interrupted instruction pointer, stack pointer and frame pointer.
    pub(super) ip: u64,
    pub(super) sp: u64,
    pub(super) bp: u64,
    /// The siginfo, when the sigcontext corroborates it.
    pub(super) info: Option<SigInfo>,
    pub(super) trap: Trap,
    /// The sigaltstack in force at delivery, if one was set up.
    pub(super) altstack: Option<(u64, u64)>,
}

impl SigFrame {
    /// Reads the frame whose `ucontext` starts at `uc`: the stack pointer
    /// at which the trampoline runs, i.e. just past `pretcode`. `None` when
    /// the registers are not in the copy.
    pub(super) fn read(stack: &StackCopy, uc: u64) -> Option<Self> {
        let word = |off: u64| stack.read_u64(uc.checked_add(off)?);
        let sc = |off: u64| word(UC_MCONTEXT + off);
        let (ss_sp, ss_size) = (word(UC_STACK_SP)?, word(UC_STACK_SIZE)?);
        let ss_flags = word(UC_STACK_FLAGS)? as u32;
        let altstack = (ss_flags & SS_DISABLE == 0 && ss_size != 0).then_some((ss_sp, ss_size));
        let ip = sc(SC_RIP)?;
        let trap = Trap {
            trapno: sc(SC_TRAPNO)?,
            error_code: sc(SC_ERR)?,
            cr2: sc(SC_CR2)?,
        };
        let info = uc.checked_add(UCONTEXT_SIZE).and_then(|info| {
            let int = |off: u64| word_lo(stack, info.checked_add(off)?);
            let claimed = SigInfo {
                signo: int(SI_SIGNO)?,
                code: int(SI_CODE)?,
                addr: stack.read_u64(info.checked_add(SI_ADDR)?)?,
            };
            corroborated(&claimed, ip, trap).then_some(claimed)
        });
        Some(SigFrame {
            ip,
            sp: sc(SC_RSP)?,
            bp: sc(SC_RBP)?,
            info,
            trap,
            altstack,
        })
    }

    /// Whether the handler ran on the sigaltstack while the interrupted
    /// code did not, so the interrupted frames are on another stack.
    pub(super) fn switched_stacks(&self, uc: u64) -> bool {
        let on = |a: u64| (self.altstack).is_some_and(|(sp, size)| a.wrapping_sub(sp) < size);
        on(uc) && !on(self.sp)
    }
}

/// Whether `info` is the siginfo of the fault the sigcontext describes:
/// a page fault at the same address, a general-protection fault, or an
/// illegal or arithmetic instruction at the interrupted IP. Anything else
/// (no SA_SIGINFO, so stale bytes; or a signal sent by a process, which
/// nothing here can confirm) is not trusted.
fn corroborated(info: &SigInfo, ip: u64, trap: Trap) -> bool {
    let by_kernel = info.code > 0;
    match info.signo {
        SIGSEGV if info.code == SI_KERNEL => trap.trapno == TRAP_GP && info.addr == 0,
        SIGSEGV | SIGBUS if by_kernel => trap.trapno == TRAP_PF && info.addr == trap.cr2,
        SIGILL | SIGFPE if by_kernel => info.addr == ip,
        _ => false,
    }
}

/// The siginfo the kernel raises `signo` with for the exception `trap`
/// records, at `ip`: page faults, general-protection faults and invalid
/// opcodes, whose vectors are never the zero a thread starts with. A page
/// fault on an absent page is taken as SEGV_MAPERR, though the kernel says
/// SEGV_ACCERR when a mapping exists but forbids the access.
pub(crate) fn from_trap(signo: i32, ip: u64, trap: Trap) -> Option<SigInfo> {
    let info = |code, addr| Some(SigInfo { signo, code, addr });
    match (signo, trap.trapno) {
        (SIGSEGV, TRAP_PF) if trap.error_code & PF_PK != 0 => info(SEGV_PKUERR, trap.cr2),
        (SIGSEGV, TRAP_PF) if trap.error_code & PF_PROT != 0 => info(SEGV_ACCERR, trap.cr2),
        (SIGSEGV, TRAP_PF) => info(SEGV_MAPERR, trap.cr2),
        (SIGBUS, TRAP_PF) => info(BUS_ADRERR, trap.cr2),
        (SIGSEGV, TRAP_GP) => info(SI_KERNEL, 0),
        (SIGILL, TRAP_UD) => info(ILL_ILLOPN, ip),
        _ => None,
    }
}

/// The low 32 bits of the word at `addr`, as C's `int`.
fn word_lo(stack: &StackCopy, addr: u64) -> Option<i32> {
    let off = usize::try_from(addr.checked_sub(stack.base)?).ok()?;
    let b = stack.bytes.get(off..off.checked_add(4)?)?;
    b.try_into().ok().map(i32::from_le_bytes)
}

/// A synthetic frame for tests: the bytes of `pretcode` + `ucontext` +
/// `siginfo`, laid out as the kernel writes them for an SA_SIGINFO
/// handler (or, without `info`, for a plain handler: stale bytes).
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
    put(8 + UC_MCONTEXT + SC_TRAPNO, f.trap.trapno);
    put(8 + UC_MCONTEXT + SC_ERR, f.trap.error_code);
    let info = 8 + UCONTEXT_SIZE;
    // Without SA_SIGINFO the kernel leaves these bytes as they were.
    let junk = SigInfo {
        signo: SIGSEGV,
        code: 1,
        addr: 0xdead,
    };
    let i = f.info.unwrap_or(junk);
    put(8 + UC_MCONTEXT + SC_CR2, f.trap.cr2);
    put(info + SI_SIGNO, i.signo as u32 as u64);
    put(info + SI_CODE, i.code as u32 as u64);
    put(info + SI_ADDR, i.addr);
    b
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const BASE: u64 = 0x7ffd_0000_1000;
    const SIGABRT: i32 = 6;
    const MAPERR: SigInfo = SigInfo {
        signo: SIGSEGV,
        code: 1,
        addr: 0x40,
    };

    /// A page fault at 0x40 on an absent page, by a user-mode write.
    pub(in crate::unwind) const PAGE_FAULT: Trap = Trap {
        trapno: TRAP_PF,
        error_code: 6,
        cr2: 0x40,
    };

    fn frame(info: Option<SigInfo>) -> SigFrame {
        SigFrame {
            ip: 0x5555_0000_1234,
            sp: 0x7ffd_0000_2000,
            bp: 0x7ffd_0000_2040,
            info,
            trap: PAGE_FAULT,
            altstack: None,
        }
    }

    fn read(bytes: &[u8]) -> Option<SigFrame> {
        let stack = StackCopy { base: BASE, bytes };
        SigFrame::read(&stack, BASE + 8)
    }

    #[test]
    fn unwind_sigframe_round_trip() {
        let f = frame(Some(MAPERR));
        let bytes = build(0x7f00_0000_0050, &f);
        assert_eq!(read(&bytes), Some(f));
        assert!(!f.switched_stacks(BASE + 8));
        // Without SA_SIGINFO: registers yes, the stale siginfo no.
        let plain = frame(None);
        assert_eq!(read(&build(0x7f00_0000_0050, &plain)), Some(plain));
        // Registers past the copy: no frame at all.
        assert_eq!(read(&bytes[..100]), None);
        // The siginfo past the copy: the registers alone.
        assert_eq!(read(&bytes[..320]), Some(plain));
    }

    #[test]
    fn unwind_siginfo_only_where_the_sigcontext_agrees() {
        let (ip, pf, gp) = (0x1234, TRAP_PF, TRAP_GP);
        let trap = |trapno, cr2| Trap {
            trapno,
            error_code: 0,
            cr2,
        };
        let info = |signo, code, addr| SigInfo { signo, code, addr };
        assert!(corroborated(&MAPERR, ip, trap(pf, 0x40)));
        assert!(
            !corroborated(&MAPERR, ip, trap(pf, 0x80)),
            "another fault's address"
        );
        assert!(!corroborated(&MAPERR, ip, trap(gp, 0x40)));
        assert!(corroborated(&info(SIGBUS, 2, 0x40), ip, trap(pf, 0x40)));
        assert!(corroborated(&info(SIGSEGV, SI_KERNEL, 0), ip, trap(gp, 0)));
        assert!(corroborated(&info(SIGFPE, 1, ip), ip, trap(0, 0)));
        assert!(corroborated(&info(SIGILL, 2, ip), ip, trap(6, 0)));
        assert!(!corroborated(&info(SIGILL, 2, ip + 1), ip, trap(6, 0)));
        // Sent by a process (SI_TKILL, SI_USER): nothing to check against.
        assert!(!corroborated(&info(SIGSEGV, -6, 0), ip, trap(pf, 0)));
        assert!(!corroborated(&info(10, 0, 0), ip, trap(0, 0)));
        assert!(!corroborated(&info(0, 1, 0x40), ip, trap(pf, 0x40)));
    }

    #[test]
    fn unwind_fault_from_the_trap_alone() {
        let ip = 0x1234;
        let pf = |error_code| Trap {
            error_code,
            ..PAGE_FAULT
        };
        let code = |signo, trap| from_trap(signo, ip, trap).map(|i| (i.code, i.addr));
        assert_eq!(code(SIGSEGV, pf(6)), Some((SEGV_MAPERR, 0x40)));
        assert_eq!(code(SIGSEGV, pf(7)), Some((SEGV_ACCERR, 0x40)));
        assert_eq!(code(SIGSEGV, pf(0x27)), Some((SEGV_PKUERR, 0x40)));
        assert_eq!(code(SIGBUS, pf(4)), Some((BUS_ADRERR, 0x40)));
        let gp = Trap {
            trapno: TRAP_GP,
            ..PAGE_FAULT
        };
        assert_eq!(code(SIGSEGV, gp), Some((SI_KERNEL, 0)));
        let ud = Trap {
            trapno: TRAP_UD,
            ..PAGE_FAULT
        };
        assert_eq!(code(SIGILL, ud), Some((ILL_ILLOPN, ip)));
        // A signal no exception explains, or a thread that never trapped.
        assert_eq!(code(SIGSEGV, ud), None);
        assert_eq!(code(SIGABRT, pf(6)), None);
        let never = Trap {
            trapno: 0,
            error_code: 0,
            cr2: 0,
        };
        assert_eq!(code(SIGFPE, never), None);
    }

    #[test]
    fn unwind_sigframe_altstack_switch() {
        let f = SigFrame {
            altstack: Some((0x6000_0000, 0x4000)),
            ..frame(None)
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
