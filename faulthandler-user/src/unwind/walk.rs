//! The frame-by-frame walk: framehop steps through CFI (or frame pointers
//! where there is none); around it, the rules framehop does not know:
//! signal frames, calls through NULL or wild pointers, and return
//! addresses that are not code.

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder as _};

use super::sigframe::SigFrame;
use super::{CodeAddr, Data, Method, Regs, SignalFrame, StackCopy, UnwindError, Unwound};
use crate::modules::{self, Module};

/// Addresses below this are the NULL page: a jump there is a NULL (or
/// NULL + small offset) function pointer, worth showing as gdb does.
const NULL_PAGE: u64 = 4096;

/// What the walk knows about the code, besides framehop's modules.
pub(super) struct Code<'a> {
    pub(super) modules: &'a [Module],
    /// Whether CFI covers this lookup address.
    pub(super) has_cfi: &'a dyn Fn(u64) -> bool,
    /// Whether this return address is a signal trampoline
    /// (`__restore_rt`).
    pub(super) is_trampoline: &'a mut dyn FnMut(u64) -> bool,
}

impl Code<'_> {
    fn is_code(&self, addr: u64) -> bool {
        modules::find(self.modules, addr).is_some()
    }

    /// A return address is code if the call before it is: a call may be
    /// the last instruction of its mapping.
    fn is_return_address(&self, ra: u64) -> bool {
        ra != 0 && self.is_code(ra - 1)
    }
}

pub(super) fn walk(
    fh: &UnwinderX86_64<Data>,
    code: &mut Code,
    regs: &Regs,
    stack: &StackCopy,
    max_frames: usize,
) -> Unwound {
    let mut cache = CacheX86_64::new();
    let mut read = |addr| stack.read_u64(addr).ok_or(());
    let max_frames = max_frames.max(1);
    let mut fregs = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
    let mut frame = FrameAddress::from_instruction_pointer(regs.ip);
    let mut out = Unwound::new(regs.ip);
    // Per framehop step: whether CFI covered it.
    let mut steps = Vec::new();
    loop {
        let (lookup, sp) = (frame.address_for_lookup(), fregs.sp());
        let ra = match null_call(code, stack, frame, &mut fregs) {
            Some(ra) => ra,
            None => match fh.unwind_frame(frame, &mut fregs, &mut cache, &mut read) {
                Ok(Some(ra)) if ra != 0 => {
                    steps.push((code.has_cfi)(lookup));
                    ra
                }
                Ok(_) => break,
                Err(framehop::Error::CouldNotReadStack(a)) => {
                    // Only a read past the copy's top while still in code
                    // means "more stack existed"; anything else is junk.
                    let end = stack.base.saturating_add(stack.bytes.len() as u64);
                    out.truncated = a >= end && code.is_code(lookup);
                    out.error = Some(UnwindError::OutsideCopy);
                    break;
                }
                Err(e) => {
                    out.error = Some(UnwindError::Step(e));
                    break;
                }
            },
        };
        // Never show a word that is not code: it may be any memory.
        if !code.is_return_address(ra) {
            out.error = Some(UnwindError::NotCode);
            break;
        }
        if fregs.sp() <= sp {
            out.error = Some(UnwindError::SpDidNotIncrease);
            break;
        }
        if (code.is_trampoline)(ra) {
            match signal_frame(code, stack, &mut fregs, &mut out, max_frames) {
                Some(ip) => frame = FrameAddress::from_instruction_pointer(ip),
                None => break,
            }
            continue;
        }
        // Stepping once past the limit tells a cut stack from one that is
        // exactly max_frames deep.
        if out.frames.len() >= max_frames {
            out.truncated = true;
            break;
        }
        out.frames.push(CodeAddr::ret(ra));
        match FrameAddress::from_return_address(ra) {
            Some(next) => frame = next,
            None => break,
        }
    }
    if steps.is_empty() {
        steps.push((code.has_cfi)(regs.ip));
    }
    out.method = match (steps.contains(&true), steps.contains(&false)) {
        (true, false) => Method::Dwarf,
        (false, _) => Method::FramePointer,
        (true, true) => Method::Mixed,
    };
    out
}

/// The instruction pointer is not in any code (a call through a NULL or
/// wild function pointer): the call pushed its return address and nothing
/// ran since, so the caller's is at [sp], as gdb assumes. Falls through to
/// framehop (frame pointers) when [sp] holds no code address.
fn null_call(
    code: &Code,
    stack: &StackCopy,
    frame: FrameAddress,
    fregs: &mut UnwindRegsX86_64,
) -> Option<u64> {
    if frame.is_return_address() || code.is_code(frame.address()) {
        return None;
    }
    let sp = fregs.sp();
    let ra = stack
        .read_u64(sp)
        .filter(|&ra| code.is_return_address(ra))?;
    fregs.set_sp(sp.checked_add(8)?);
    fregs.set_ip(ra);
    Some(ra)
}

/// The handler returned to the trampoline at `fregs.sp() - 8`, with the
/// kernel's signal frame above it: records the signal and continues from
/// the interrupted registers. Returns the interrupted IP to unwind from,
/// or `None` to stop.
fn signal_frame(
    code: &Code,
    stack: &StackCopy,
    fregs: &mut UnwindRegsX86_64,
    out: &mut Unwound,
    max_frames: usize,
) -> Option<u64> {
    let uc = fregs.sp();
    let Some(sf) = SigFrame::read(stack, uc) else {
        // The trampoline is code, so the frame exists: past the copy.
        out.truncated = true;
        out.error = Some(UnwindError::BadSignalFrame);
        return None;
    };
    out.signal_frames.push(SignalFrame {
        index: out.frames.len(),
        ip: sf.ip,
        sp: sf.sp,
        info: sf.info,
        trap: sf.trap,
    });
    if out.frames.len() >= max_frames {
        out.truncated = true;
        return None;
    }
    // The saved rip is a register, but a forged frame could hold any
    // word: show it only if it is code, or the NULL page.
    if !code.is_code(sf.ip) && sf.ip >= NULL_PAGE {
        out.error = Some(UnwindError::InterruptedIpNotCode);
        return None;
    }
    out.frames.push(CodeAddr::exact(sf.ip));
    if !stack.contains(sf.sp) {
        if sf.switched_stacks(uc) {
            out.error = Some(UnwindError::OtherStack);
        } else if sf.sp > uc {
            out.truncated = true;
            out.error = Some(UnwindError::OutsideCopy);
        } else {
            out.error = Some(UnwindError::SpDidNotIncrease);
        }
        return None;
    }
    if sf.sp <= uc && !sf.switched_stacks(uc) {
        out.error = Some(UnwindError::SpDidNotIncrease);
        return None;
    }
    *fregs = UnwindRegsX86_64::new(sf.ip, sf.sp, sf.bp);
    Some(sf.ip)
}

/// Synthetic stacks: no ELF files, so framehop walks frame pointers, and
/// the trampoline is whatever address the test says.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::unwind::{SigInfo, sigframe};

    const CODE: u64 = 0x1000_0000;
    const HANDLER: u64 = CODE + 0x100;
    const FAULT: u64 = CODE + 0x200;
    const CALLER: u64 = CODE + 0x300;
    const TRAMPOLINE: u64 = CODE + 0x800;
    const BASE: u64 = 0x7ffd_0000_0000;
    /// "SECRETPW" as a little-endian word.
    const SECRET: u64 = 0x5750_5445_5243_4553;

    fn modules() -> Vec<Module> {
        vec![Module {
            open_path: PathBuf::from("/nonexistent/a"),
            name: "/a".into(),
            start: CODE,
            end: CODE + 0x1_0000,
            file_offset: 0,
            build_id: None,
            hold: None,
        }]
    }

    /// A stack of `fill` words with `words` stored at their addresses.
    fn stack(fill: u64, words: &[(u64, u64)]) -> Vec<u8> {
        let mut b: Vec<u8> = (0..0x200).flat_map(|_| fill.to_le_bytes()).collect();
        for &(addr, v) in words {
            put(&mut b, addr, &v.to_le_bytes());
        }
        b
    }

    fn put(b: &mut [u8], addr: u64, bytes: &[u8]) {
        let off = (addr - BASE) as usize;
        b[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn walk_on(bytes: &[u8], regs: Regs) -> Unwound {
        let modules = modules();
        let no_cfi = |_: u64| false;
        let mut is_trampoline = |ra: u64| ra == TRAMPOLINE;
        let mut code = Code {
            modules: &modules,
            has_cfi: &no_cfi,
            is_trampoline: &mut is_trampoline,
        };
        let stack = StackCopy { base: BASE, bytes };
        walk(&UnwinderX86_64::new(), &mut code, &regs, &stack, 64)
    }

    /// The handler's frame (rbp chain) returns to the trampoline at
    /// BASE+0x18, the kernel's frame above it; the interrupted code's
    /// frame-pointer chain starts at BASE+0x400 and ends at BASE+0x500.
    fn handler_stack(interrupted: SigFrame) -> Vec<u8> {
        let mut b = stack(0, &[(BASE + 0x400, BASE + 0x500), (BASE + 0x408, CALLER)]);
        put(
            &mut b,
            BASE + 0x18,
            &sigframe::build(TRAMPOLINE, &interrupted),
        );
        b
    }

    fn in_handler() -> Regs {
        Regs {
            ip: HANDLER,
            sp: BASE,
            bp: BASE + 0x10,
        }
    }

    const MAPERR: SigInfo = SigInfo {
        signo: 11,
        code: 1,
        addr: 0x40,
    };

    fn fault() -> SigFrame {
        SigFrame {
            ip: FAULT,
            sp: BASE + 0x400,
            bp: BASE + 0x400,
            info: Some(MAPERR),
            trap: sigframe::tests::PAGE_FAULT,
            altstack: None,
        }
    }

    #[test]
    fn unwind_hand_built_rt_sigframe() {
        let u = walk_on(&handler_stack(fault()), in_handler());
        let want = [
            CodeAddr::exact(HANDLER),
            CodeAddr::exact(FAULT),
            CodeAddr::ret(CALLER),
        ];
        assert_eq!(u.frames, want, "{u:?}");
        let sig = SignalFrame {
            index: 1,
            ip: FAULT,
            sp: BASE + 0x400,
            info: Some(MAPERR),
            trap: sigframe::tests::PAGE_FAULT,
        };
        assert_eq!(u.signal_frames, [sig]);
        assert_eq!(u.error, None, "{u:?}");
        // A plain handler's frame: same walk, no siginfo to trust.
        let u = walk_on(
            &handler_stack(SigFrame {
                info: None,
                ..fault()
            }),
            in_handler(),
        );
        assert_eq!(u.frames, want, "{u:?}");
        assert_eq!(u.signal_frames, [SignalFrame { info: None, ..sig }]);
        // The fault a handler that re-raised SIGSEGV was called for.
        assert_eq!(u.signal_frames[0].fault_for(11), Some(MAPERR));
        assert_eq!(u.signal_frames[0].fault_for(6), None);

        // A NULL call interrupted: its caller's return address is at [sp].
        let null = SigFrame { ip: 0, ..fault() };
        let mut b = handler_stack(null);
        put(&mut b, BASE + 0x400, &CALLER.to_le_bytes());
        let u = walk_on(&b, in_handler());
        assert_eq!(u.frames[1..3], [CodeAddr::exact(0), CodeAddr::ret(CALLER)]);
    }

    #[test]
    fn unwind_signal_frame_that_cannot_be_followed() {
        let cases = [
            // Forged: the saved rip is a memory word, not code.
            (
                SigFrame {
                    ip: SECRET,
                    ..fault()
                },
                1,
                UnwindError::InterruptedIpNotCode,
            ),
            // Handler on the altstack, interrupted code elsewhere.
            (
                SigFrame {
                    sp: 0x7fff_0000_0000,
                    altstack: Some((BASE, 0x1000)),
                    ..fault()
                },
                2,
                UnwindError::OtherStack,
            ),
            // Same stack, further up than the copy.
            (
                SigFrame {
                    sp: BASE + 0x10_0000,
                    ..fault()
                },
                2,
                UnwindError::OutsideCopy,
            ),
            // Below the signal frame it was interrupted to push.
            (
                SigFrame {
                    sp: BASE + 8,
                    ..fault()
                },
                2,
                UnwindError::SpDidNotIncrease,
            ),
        ];
        for (sf, frames, error) in cases {
            let u = walk_on(&handler_stack(sf), in_handler());
            assert_eq!(u.frames.len(), frames, "{sf:?}: {u:?}");
            assert_eq!(u.error, Some(error), "{sf:?}: {u:?}");
            assert_eq!(u.signal_frames.len(), 1, "the signal is known: {u:?}");
            assert!(!u.frames.iter().any(|f| f.addr == SECRET));
        }
        let u = walk_on(
            &handler_stack(SigFrame {
                sp: BASE + 0x10_0000,
                ..fault()
            }),
            in_handler(),
        );
        assert!(u.truncated, "{u:?}");
    }

    #[test]
    fn unwind_never_shows_non_code_words() {
        // Frame pointer aimed at a buffer of secrets.
        let bytes = stack(SECRET, &[]);
        let regs = Regs {
            ip: HANDLER,
            sp: BASE,
            bp: BASE + 0x40,
        };
        let u = walk_on(&bytes, regs);
        assert_eq!(u.frames, [CodeAddr::exact(HANDLER)], "{u:?}");
        assert_eq!(u.error, Some(UnwindError::NotCode));
        let msg = UnwindError::NotCode.to_string();
        assert!(!msg.contains("0x") && !msg.contains("5750"), "{msg}");
        // IP 0 with no return address at [sp]: the IP alone, never [sp].
        let u = walk_on(&bytes, Regs { ip: 0, ..regs });
        assert_eq!(u.frames, [CodeAddr::exact(0)], "{u:?}");
        // A wild IP is a register: kept, as gdb shows it.
        let u = walk_on(&stack(0, &[(BASE, CALLER)]), Regs { ip: SECRET, ..regs });
        assert_eq!(u.frames, [CodeAddr::exact(SECRET), CodeAddr::ret(CALLER)]);
    }

    #[test]
    fn unwind_fp_chain_through_the_same_filter() {
        let modules = modules();
        let chain = |fp: &[u64], max| super::super::Unwinder::unwind_fp_chain(fp, &modules, max);
        let u = chain(&[HANDLER, CALLER, SECRET, CALLER], 64);
        let want = [CodeAddr::exact(HANDLER), CodeAddr::ret(CALLER)];
        assert_eq!(
            (&u.frames[..], u.error),
            (&want[..], Some(UnwindError::NotCode))
        );
        assert_eq!(u.method, Method::FramePointer);
        let u = chain(&[0, CALLER, 0, SECRET], 64);
        assert_eq!(u.frames, [CodeAddr::exact(0), CodeAddr::ret(CALLER)]);
        assert_eq!(u.error, None);
        let u = chain(&[HANDLER, CALLER, CALLER], 2);
        assert_eq!((u.frames.len(), u.truncated), (2, true));
        assert!(chain(&[], 64).frames.is_empty());
    }
}
