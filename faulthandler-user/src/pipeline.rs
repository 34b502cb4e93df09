//! Unwind and symbolize: captured threads into report threads.

use faulthandler_common::{REG_BP, REG_IP, REG_SP, SIG_F_HAS_REGS};

use crate::{
    assemble::SigFrameInfo,
    decode::{SignalCapture, c_str},
    modules::{self, Module},
    report::{Frame, Thread},
    symbolize::Symbolizer,
    unwind::{Method, Regs, StackCopy, Unwinder},
};

/// One thread to unwind, with the modules of its process at the time.
pub struct ThreadInput<'a> {
    pub cap: &'a SignalCapture,
    pub current: bool,
    pub modules: &'a [Module],
}

/// Long-lived, so parsed unwind tables and DWARF are reused across reports.
pub struct Pipeline {
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    max_frames: usize,
}

/// The threads of a report, and the siginfo of the innermost signal frame
/// on the current thread's stack (a handler that re-raised).
pub struct Unwound {
    pub threads: Vec<Thread>,
    pub sigframe: Option<SigFrameInfo>,
}

impl Pipeline {
    pub fn new(max_frames: usize) -> Self {
        Self {
            unwinder: Unwinder::new(),
            symbolizer: Symbolizer::new(),
            max_frames,
        }
    }

    /// Reads the unwind tables and debug info of `modules` ahead of the
    /// first report that needs them.
    pub fn warm(&mut self, modules: &[Module]) {
        let Some(first) = modules.first() else { return };
        let starts: Vec<u64> = modules.iter().map(|m| m.start).collect();
        let _ = self.symbolizer.symbolize_stacks(&[&starts], modules);
        let regs = Regs {
            ip: first.start,
            sp: 0,
            bp: 0,
        };
        let empty = StackCopy {
            base: 0,
            bytes: &[],
        };
        let _ = self.unwinder.unwind(&regs, &empty, modules, 1);
    }

    /// Several threads of one report: unwound one by one, then the
    /// addresses of all that share the same modules symbolized in one batch.
    pub fn threads(&mut self, inputs: &[ThreadInput<'_>]) -> Unwound {
        let mut threads = Vec::with_capacity(inputs.len());
        let mut pending: Vec<(usize, Vec<u64>, &[Module])> = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let (thread, addrs) = self.unwind(input);
            threads.push(thread);
            if let Some(addrs) = addrs {
                pending.push((i, addrs, input.modules));
            }
        }
        while !pending.is_empty() {
            let modules = pending[0].2;
            let (same, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|p| p.2 == modules);
            pending = rest;
            let stacks: Vec<&[u64]> = same.iter().map(|p| p.1.as_slice()).collect();
            let symbolized = self.symbolizer.symbolize_stacks(&stacks, modules);
            for ((i, _, _), frames) in same.iter().zip(symbolized) {
                threads[*i].frames = frames.into_iter().map(Frame::Native).collect();
            }
        }
        Unwound {
            threads,
            sigframe: None,
        }
    }

    /// The thread without its frames yet, and the addresses to symbolize.
    fn unwind(&mut self, input: &ThreadInput<'_>) -> (Thread, Option<Vec<u64>>) {
        let (s, modules) = (input.cap, input.modules);
        let ev = &s.event;
        let mut t = Thread {
            tid: ev.tid,
            ns_tid: (ev.ns_tid != 0 && ev.ns_tid != ev.tid).then_some(ev.ns_tid),
            name: c_str(&ev.comm),
            current: input.current,
            ..Default::default()
        };
        if ev.flags & SIG_F_HAS_REGS == 0 {
            t.error = Some("the kernel did not give this thread's user registers".into());
            return (t, None);
        }
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
            .unwind(&regs, &stack, modules, self.max_frames);
        // No stack bytes at all (the copy faulted): the kernel's
        // frame-pointer walk is all there is. Its words were read from
        // memory the process controls, so only those inside its code are
        // frames: a planted frame chain must not print memory contents.
        let fp_len = (ev.fp_len as usize).min(ev.fp.len());
        if unwound.addrs.len() <= 1 && fp_len > 1 {
            let chain = &ev.fp[..fp_len];
            let in_code = chain[1..]
                .iter()
                .take_while(|&&a| modules::find(modules, a).is_some())
                .count();
            if in_code > 0 {
                unwound.addrs = chain[..=in_code].to_vec();
                unwound.method = Method::FramePointer;
            }
        }
        t.truncated = unwound.truncated;
        t.unwind = Some(unwound.method.as_str());
        t.error = unwound.error;
        if s.stack.is_empty() {
            t.error = Some(format!(
                "could not copy the user stack (error {})",
                ev.stack_err
            ));
        }
        (t, Some(unwound.addrs))
    }
}
