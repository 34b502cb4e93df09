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
    let ra = stack.read_u64(sp).filter(|&ra| code.is_return_address(ra))?;
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
        out.error = Some(UnwindError::BadSignalFrame);
        return None;
    };
    out.signal_frames.push(SignalFrame {
        index: out.frames.len(),
        signo: sf.signo,
        code: sf.code,
        addr: sf.addr,
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
