//! One captured thread through unwind and symbolize, into a report thread.

use faulthandler_common::{REG_BP, REG_IP, REG_SP, SIG_F_HAS_REGS};

use crate::{
    decode::{SignalCapture, c_str},
    modules::Module,
    procs::Tracker,
    report::Thread,
    symbolize::Symbolizer,
    unwind::{CodeAddr, Regs, StackCopy, Unwinder},
};

/// A thread's code addresses and the modules they are in.
type ThreadAddrs = (Vec<CodeAddr>, Vec<Module>);

/// Long-lived, so parsed unwind tables and DWARF are reused across reports.
pub struct Pipeline {
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    max_frames: usize,
}

impl Pipeline {
    pub fn new(max_frames: usize) -> Self {
        Self {
            unwinder: Unwinder::new(),
            symbolizer: Symbolizer::new(),
            max_frames,
        }
    }

    /// Drops what the unwinder and symbolizer cache for the file at
    /// `open_path` (a deleted binary no tracked process maps any more).
    pub fn forget_file(&mut self, open_path: &std::path::Path) {
        self.unwinder.forget_file(open_path);
        self.symbolizer.forget_file(open_path);
    }

    /// Reads the unwind tables and debug info of `modules` ahead of the
    /// first report that needs them.
    pub fn warm(&mut self, modules: &[Module]) {
        let Some(first) = modules.first() else { return };
        let starts: Vec<CodeAddr> = modules.iter().map(|m| CodeAddr::exact(m.start)).collect();
        let _ = self.symbolizer.symbolize_stacks(&[&starts], modules);
        let regs = Regs {
            ip: first.start,
            sp: 0,
            bp: 0,
        };
        let _ = self.unwinder.unwind(
            &regs,
            &StackCopy {
                base: 0,
                bytes: &[],
            },
            modules,
            1,
        );
    }

    pub fn thread(&mut self, tracker: &Tracker, s: &SignalCapture, current: bool) -> Thread {
        self.threads(tracker, &[(s, current)])
            .pop()
            .unwrap_or_default()
    }

    /// Several threads of one report: unwound one by one, then the
    /// addresses of all that share the same modules symbolized in one batch.
    pub fn threads(&mut self, tracker: &Tracker, caps: &[(&SignalCapture, bool)]) -> Vec<Thread> {
        let mut threads = Vec::with_capacity(caps.len());
        let mut pending: Vec<(usize, Vec<CodeAddr>, Vec<Module>)> = Vec::new();
        for (i, &(s, current)) in caps.iter().enumerate() {
            let (thread, unwound) = self.unwind(tracker, s, current);
            threads.push(thread);
            if let Some(u) = unwound {
                pending.push((i, u.0, u.1));
            }
        }
        while !pending.is_empty() {
            let modules = pending[0].2.clone();
            let (same, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.2 == modules);
            pending = rest;
            let stacks: Vec<&[CodeAddr]> = same.iter().map(|p| p.1.as_slice()).collect();
            for ((i, _, _), frames) in same
                .iter()
                .zip(self.symbolizer.symbolize_stacks(&stacks, &modules))
            {
                threads[*i].frames = frames.into_iter().flatten().collect();
            }
        }
        threads
    }

    /// The thread without its frames yet, and the addresses to symbolize
    /// with the modules they belong to.
    fn unwind(
        &mut self,
        tracker: &Tracker,
        s: &SignalCapture,
        current: bool,
    ) -> (Thread, Option<ThreadAddrs>) {
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
            return (t, None);
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
        if unwound.frames.len() <= 1 && fp_len > 1 {
            unwound = Unwinder::unwind_fp_chain(&ev.fp[..fp_len], &modules, self.max_frames);
        }
        t.truncated = unwound.truncated;
        t.unwind = Some(unwound.method.as_str());
        t.error = unwound.error.map(|e| e.to_string());
        if s.stack.is_empty() {
            t.error = Some(format!(
                "could not copy the user stack (error {})",
                ev.stack_err
            ));
        }
        (t, Some((unwound.frames, modules)))
    }
}
