//! One captured thread through unwind and symbolize, into a report thread.

use faulthandler_common::{REG_BP, REG_IP, REG_SP, SIG_F_HAS_REGS};

use crate::{
    decode::{SignalCapture, c_str},
    procs::Tracker,
    report::Thread,
    symbolize::Symbolizer,
    unwind::{Method, Regs, StackCopy, Unwinder},
};

/// Long-lived, so parsed unwind tables and DWARF are reused across reports.
pub struct Pipeline {
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    pub max_frames: usize,
}

impl Pipeline {
    pub fn new(max_frames: usize) -> Self {
        Self {
            unwinder: Unwinder::new(),
            symbolizer: Symbolizer::new(),
            max_frames,
        }
    }

    pub fn thread(&mut self, tracker: &Tracker, s: &SignalCapture, current: bool) -> Thread {
        let ev = &s.event;
        let mut t = Thread {
            tid: ev.tid,
            ns_tid: (ev.ns_tid != 0 && ev.ns_tid != ev.tid).then_some(ev.ns_tid),
            name: c_str(&ev.comm),
            current,
            ..Default::default()
        };
        if ev.flags & SIG_F_HAS_REGS == 0 {
            t.error = Some("the kernel did not give this thread's user registers".into());
            return t;
        }
        let nvmas = (ev.nvmas as usize).min(ev.vmas.len());
        let modules = tracker.modules_for(ev.pid, &ev.vmas[..nvmas]);
        let regs = Regs {
            ip: ev.regs[REG_IP],
            sp: ev.regs[REG_SP],
            bp: ev.regs[REG_BP],
        };
        let stack = StackCopy {
            base: regs.sp,
            bytes: &s.stack,
        };
        let mut unwound = self
            .unwinder
            .unwind(&regs, &stack, &modules, self.max_frames);
        // No stack bytes at all (the copy faulted): the kernel's
        // frame-pointer walk is all there is.
        let fp_len = (ev.fp_len as usize).min(ev.fp.len());
        if unwound.addrs.len() <= 1 && fp_len > 1 {
            unwound.addrs = ev.fp[..fp_len].to_vec();
            unwound.method = Method::FramePointer;
        }
        t.frames = self.symbolizer.symbolize(&unwound.addrs, &modules);
        t.truncated = unwound.truncated;
        t.unwind = Some(unwound.method.as_str());
        t.error = unwound.error;
        if s.stack.is_empty() {
            t.error = Some(format!(
                "could not copy the user stack (error {})",
                ev.stack_err
            ));
        }
        t
    }
}
