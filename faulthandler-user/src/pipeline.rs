//! Unwind and symbolize: captured threads into report threads.

use faulthandler_common::{REG_BP, REG_IP, REG_SP, SIG_F_HAS_REGS};

use crate::{
    assemble::SigFrameInfo,
    decode::{SignalCapture, c_str},
    modules::Module,
    report::{Frame, NativeFrame, Thread},
    symbolize::Symbolizer,
    unwind::{CodeAddr, Regs, SignalFrame, StackCopy, Unwinder},
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

/// A thread's code addresses and where its signal frames sit among them.
struct Addrs<'a> {
    thread: usize,
    frames: Vec<CodeAddr>,
    signal_frames: Vec<SignalFrame>,
    modules: &'a [Module],
}

impl Pipeline {
    pub fn new(max_frames: usize) -> Self {
        Self {
            unwinder: Unwinder::new(),
            symbolizer: Symbolizer::new(),
            max_frames,
        }
    }

    /// Drops what is cached for a file (a deleted binary no process maps).
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
        let mut pending: Vec<Addrs<'_>> = Vec::new();
        let mut sigframe = None;
        for (i, input) in inputs.iter().enumerate() {
            let (thread, addrs) = self.unwind(input);
            threads.push(thread);
            if let Some(addrs) = addrs {
                if input.current {
                    sigframe = addrs.signal_frames.first().and_then(|sf| {
                        let sig = input.cap.event.sig;
                        sf.fault_for(sig).map(|f| SigFrameInfo {
                            sig: f.signo,
                            code: f.code,
                            addr: f.addr,
                        })
                    });
                }
                pending.push(Addrs { thread: i, ..addrs });
            }
        }
        while !pending.is_empty() {
            let modules = pending[0].modules;
            let (same, rest): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|p| p.modules == modules);
            pending = rest;
            let stacks: Vec<&[CodeAddr]> = same.iter().map(|p| p.frames.as_slice()).collect();
            let symbolized = self.symbolizer.symbolize_stacks(&stacks, modules);
            for (p, per_addr) in same.iter().zip(symbolized) {
                threads[p.thread].frames = with_signal_frames(per_addr, &p.signal_frames);
            }
        }
        Unwound { threads, sigframe }
    }

    /// The thread without its frames yet, and the addresses to symbolize.
    fn unwind<'a>(&mut self, input: &ThreadInput<'a>) -> (Thread, Option<Addrs<'a>>) {
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
        // frame-pointer walk is all there is, filtered like any other
        // stack (a planted chain must not print memory contents).
        let fp_len = (ev.fp_len as usize).min(ev.fp.len());
        if unwound.frames.len() <= 1 && fp_len > 1 {
            unwound = Unwinder::unwind_fp_chain(&ev.fp[..fp_len], modules, self.max_frames);
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
        let addrs = Addrs {
            thread: 0,
            frames: unwound.frames,
            signal_frames: unwound.signal_frames,
            modules,
        };
        (t, Some(addrs))
    }
}

/// The frames of each address in order, with gdb's `<signal handler
/// called>` before the interrupted code of each signal frame.
fn with_signal_frames(
    per_addr: Vec<Vec<NativeFrame>>,
    signal_frames: &[SignalFrame],
) -> Vec<Frame> {
    let mut out = Vec::new();
    let marker = |sf: &SignalFrame| {
        Frame::Native(NativeFrame {
            address: sf.ip,
            signal_frame: true,
            ..NativeFrame::default()
        })
    };
    let n = per_addr.len();
    for (i, frames) in per_addr.into_iter().enumerate() {
        out.extend(signal_frames.iter().filter(|sf| sf.index == i).map(marker));
        out.extend(frames.into_iter().map(Frame::Native));
    }
    // A signal frame the unwind stopped at (its interrupted code unshown).
    out.extend(signal_frames.iter().filter(|sf| sf.index >= n).map(marker));
    out
}
