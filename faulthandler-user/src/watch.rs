//! The watch loop: events in, decisions about what is a crash, reports out.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use faulthandler_common::{REG_BP, REG_IP, REG_SP, SIG_F_HAS_REGS};

use crate::{
    capture::{Capture, CaptureError},
    decode::{Event, SignalCapture, c_str, decode},
    output::Sink,
    procs::Tracker,
    report::{self, Process, Report, Signal, Thread},
    signals,
    symbolize::Symbolizer,
    unwind::{Regs, StackCopy, Unwinder},
};

/// Set by SIGINT/SIGTERM handlers; the loop checks it between polls.
pub static STOP: AtomicBool = AtomicBool::new(false);

const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;

pub struct Watcher {
    pub capture: Capture,
    pub tracker: Tracker,
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    sink: Sink,
    json: bool,
    color: bool,
    max_frames: usize,
    /// Per process: the last fault its own handler took. If the process
    /// then dies of the same signal (a re-raise, or the fault recurring
    /// after SA_RESETHAND), this is the stack worth reporting.
    pending: HashMap<u32, Box<SignalCapture>>,
    lost: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset_ns: i128,
    host: String,
    pub reports: usize,
    /// Processes that exited since the last call to `take_exited`.
    exited: Vec<u32>,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Signals whose default action does not kill the process.
fn default_is_harmless(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGCHLD
            | libc::SIGCONT
            | libc::SIGSTOP
            | libc::SIGTSTP
            | libc::SIGTTIN
            | libc::SIGTTOU
            | libc::SIGURG
            | libc::SIGWINCH
    )
}

pub struct WatchOptions {
    pub json: bool,
    pub color: bool,
    pub max_frames: usize,
}

impl Watcher {
    pub fn new(capture: Capture, sink: Sink, opts: WatchOptions) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self {
            capture,
            tracker: Tracker::default(),
            unwinder: Unwinder::new(),
            symbolizer: Symbolizer::new(),
            sink,
            json: opts.json,
            color: opts.color,
            max_frames: opts.max_frames,
            pending: HashMap::new(),
            lost: 0,
            wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            host,
            reports: 0,
            exited: Vec::new(),
        }
    }

    /// Waits up to `timeout` for events and handles them.
    pub fn poll(&mut self, timeout: Duration) -> Result<(), CaptureError> {
        let mut records = Vec::new();
        self.capture.poll(timeout, |r| records.push(r.to_vec()))?;
        for r in records {
            self.handle(&r);
        }
        Ok(())
    }

    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    fn handle(&mut self, record: &[u8]) {
        let event = match decode(record) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("rfh-trace: dropping a malformed event: {e}");
                self.lost += 1;
                return;
            }
        };
        match event {
            Event::Signal(s) => self.on_signal(s),
            // The process may already be gone; the kernel-side mapping
            // capture covers that case, so a failed refresh is fine.
            Event::Exec(p) | Event::Mmap(p) => {
                let _ = self.tracker.refresh(p.pid);
            }
            Event::Fork(p) => {
                let _ = self.tracker.refresh(p.arg);
            }
            Event::Exit(p) => {
                self.pending.remove(&p.pid);
                self.tracker.forget(p.pid);
                self.exited.push(p.pid);
            }
        }
    }

    fn on_signal(&mut self, s: Box<SignalCapture>) {
        let ev = &s.event;
        self.lost += ev.lost;
        if ev.handler == SIG_IGN || (ev.handler == SIG_DFL && default_is_harmless(ev.sig)) {
            return;
        }
        if ev.handler != SIG_DFL {
            // The process's own handler runs; survival is not a crash.
            // A re-raise from inside that handler must not replace the
            // original fault.
            let keep_old = self
                .pending
                .get(&ev.pid)
                .is_some_and(|p| p.event.sig == ev.sig && signals::user_sent(ev.code));
            if !keep_old {
                self.pending.insert(ev.pid, s);
            }
            return;
        }
        let original = self.pending.remove(&ev.pid).filter(|p| {
            p.event.sig == ev.sig && (signals::user_sent(ev.code) || p.event.addr == ev.addr)
        });
        let handled = original.is_some();
        let capture = original.unwrap_or(s);
        let report = self.crash_report(&capture, handled);
        self.emit(&report);
    }

    fn emit(&mut self, report: &Report) {
        let text = if self.json {
            report.to_json()
        } else {
            report.to_text(self.color)
        };
        if let Err(e) = self.sink.write_report(&text) {
            eprintln!("rfh-trace: cannot write report: {e}");
        }
        self.reports += 1;
    }

    pub fn crash_report(&mut self, s: &SignalCapture, handled: bool) -> Report {
        let ev = &s.event;
        let info = self.tracker.get(ev.pid).cloned().unwrap_or_default();
        let thread = self.thread(s, true);
        let sig = ev.sig;
        let signal = Signal {
            number: sig,
            name: signals::name(sig),
            description: signals::description(sig),
            code: ev.code,
            code_name: signals::code_name(sig, ev.code),
            code_description: signals::code_description(sig, ev.code),
            address: signals::is_fault(sig, ev.code).then(|| report::hex(ev.addr)),
            sender_pid: signals::user_sent(ev.code)
                .then_some(ev.sender_pid)
                .filter(|&p| p > 0),
            handled,
        };
        let ns_pid = (ev.ns_pid != 0 && ev.ns_pid != ev.pid).then_some(ev.ns_pid);
        let time_ns = ev.ktime_ns as i128 + self.wall_offset_ns;
        let lost = std::mem::take(&mut self.lost);
        Report {
            schema: report::SCHEMA,
            kind: "crash",
            time: report::rfc3339(time_ns.max(0) as u128),
            host: self.host.clone(),
            process: Process {
                pid: ev.pid,
                ns_pid: ns_pid.or(info.ns_pid.filter(|&n| n != ev.pid)),
                comm: info.comm.clone().unwrap_or_else(|| c_str(&ev.comm)),
                exe: info.exe.clone(),
                cmdline: info.cmdline.clone(),
                uid: info.uid,
                container_id: info.cgroup.as_deref().and_then(crate::procs::container_id),
                cgroup: info.cgroup.clone(),
            },
            signal: Some(signal),
            threads: vec![thread],
            lost_events: lost,
        }
    }

    fn thread(&mut self, s: &SignalCapture, current: bool) -> Thread {
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
        let modules = self.tracker.modules_for(ev.pid, &ev.vmas[..nvmas]);
        let regs = Regs {
            ip: ev.regs[REG_IP],
            sp: ev.regs[REG_SP],
            bp: ev.regs[REG_BP],
        };
        let stack = StackCopy {
            base: regs.sp,
            bytes: &s.stack,
        };
        let unwound = self
            .unwinder
            .unwind(&regs, &stack, &modules, self.max_frames);
        t.frames = self.symbolizer.symbolize(&unwound.addrs, &modules);
        t.truncated = unwound.truncated;
        t.unwind = Some(unwound.method.as_str());
        t.error = unwound.error;
        if s.event.stack_err != 0 && s.stack.is_empty() {
            t.error = Some(format!(
                "could not copy the user stack (error {})",
                s.event.stack_err
            ));
        }
        t
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
