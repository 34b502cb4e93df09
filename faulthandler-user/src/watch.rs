//! The watch loop: events in, decisions about what is a crash, reports out.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use faulthandler_common::{
    REG_SP, SIG_DFL, SIG_F_DUMP, SIG_F_GROUP_EXIT, SIG_F_SAMPLE, SIG_IGN, SignalEvent,
    default_is_harmless,
};

use crate::{
    capture::{Capture, CaptureError},
    decode::{Event, SignalCapture, c_str, decode},
    output::Sink,
    pipeline::Pipeline,
    procs::{Tracker, container_id},
    profile::Profile,
    report::{self, Process, Report, Signal},
    signals,
};

/// Set by SIGINT/SIGTERM handlers; the loop checks it between polls.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

const SIGKILL: i32 = 9;
const SI_KERNEL: i32 = 0x80;

/// How long a dying process may go without another of its threads dying
/// (a thread stuck in uninterruptible sleep) before its report goes out
/// with the threads captured so far. Measured from the latest thread, so
/// a thousand threads dying slowly on a loaded machine are not cut short.
const DYING_TIMEOUT: Duration = Duration::from_secs(2);

/// The kernel's account of a death that was not delivered as a signal to
/// one thread: a group-wide kill, or the OOM killer.
struct Killed {
    sig: i32,
    code: i32,
    sender: u32,
    tid: u32,
    ktime_ns: u64,
    oom: bool,
}

/// A watched process that is dying of a reported signal; its report is
/// written once the last thread has gone.
struct Dying {
    /// The thread that took the fatal signal.
    primary: Option<Box<SignalCapture>>,
    handled: bool,
    killed: Option<Killed>,
    /// Every other thread, captured at its group-exit SIGKILL.
    siblings: Vec<Box<SignalCapture>>,
    /// When the latest record of this death arrived.
    since: Instant,
}

impl Dying {
    fn new() -> Self {
        Self {
            primary: None,
            handled: false,
            killed: None,
            siblings: Vec::new(),
            since: Instant::now(),
        }
    }
}

pub struct WatchOptions {
    pub json: bool,
    pub color: bool,
}

pub struct Watcher {
    pub capture: Capture,
    pub tracker: Tracker,
    pipeline: Pipeline,
    sink: Sink,
    json: bool,
    color: bool,
    /// Per process: the last fault its own handler took. If the process
    /// then dies of the same signal (a re-raise, or the fault recurring
    /// after SA_RESETHAND), this is the stack worth reporting.
    pending: HashMap<u32, Box<SignalCapture>>,
    dying: HashMap<u32, Dying>,
    lost: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset_ns: i128,
    host: String,
    /// Processes that exited since the last call to `take_exited`.
    exited: Vec<u32>,
    /// Signals that ask for a dump (`--on-signal`), as a bit mask.
    pub on_signal: u64,
    /// CPU samples per process since the last timeout dump, when profiling.
    profiles: Option<HashMap<u32, Profile>>,
    flamegraph: Option<std::path::PathBuf>,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// A fault address just below the stack pointer (a push or call into
/// the guard page) means the stack overflowed.
fn stack_overflow(sig: i32, addr: u64, sp: u64) -> bool {
    sig == libc::SIGSEGV && addr < sp.saturating_add(4096) && sp.saturating_sub(addr) <= 64 * 1024
}

impl Watcher {
    pub fn new(
        capture: Capture,
        tracker: Tracker,
        pipeline: Pipeline,
        sink: Sink,
        opts: WatchOptions,
    ) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self {
            capture,
            tracker,
            pipeline,
            sink,
            json: opts.json,
            color: opts.color,
            pending: HashMap::new(),
            dying: HashMap::new(),
            lost: 0,
            wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            host,
            exited: Vec::new(),
            on_signal: 0,
            profiles: None,
            flamegraph: None,
        }
    }

    /// Waits up to `timeout` for events and handles them.
    pub fn poll(&mut self, timeout: Duration) -> Result<(), CaptureError> {
        // A process just exec'd is read from /proc once it has settled
        // (poll counts whole milliseconds: round up, not to a busy 0).
        let timeout = self
            .tracker
            .next_refresh_in()
            .map_or(timeout, |d| d.max(Duration::from_millis(1)).min(timeout));
        let mut records = Vec::new();
        self.capture.poll(timeout, |r| records.push(r.to_vec()))?;
        for r in records {
            self.handle(&r);
        }
        self.tracker.refresh_stale();
        let stale: Vec<u32> = self
            .dying
            .iter()
            .filter(|(_, d)| d.since.elapsed() >= DYING_TIMEOUT)
            .map(|(&p, _)| p)
            .collect();
        for pid in stale {
            self.finish(pid, 0);
        }
        Ok(())
    }

    /// Writes the reports of every death still being assembled.
    pub fn flush(&mut self) {
        let pids: Vec<u32> = self.dying.keys().copied().collect();
        for pid in pids {
            self.finish(pid, 0);
        }
    }

    /// Keeps CPU samples for timeout reports, and a flame graph of them.
    pub fn keep_profiles(&mut self, flamegraph: Option<std::path::PathBuf>) {
        self.profiles = Some(HashMap::new());
        self.flamegraph = flamegraph;
    }

    fn add_sample(&mut self, s: &SignalCapture) {
        if self.profiles.is_none() {
            return;
        }
        let thread = self.pipeline.thread(&self.tracker, s, false);
        if let Some(p) = self.profiles.as_mut() {
            p.entry(s.event.pid)
                .or_default()
                .add(&thread.name, &thread.frames);
        }
    }

    /// Moves the samples of `pid` since the last dump into `report`.
    pub(crate) fn attach_profile(&mut self, pid: u32, report: &mut Report) {
        let Some(profile) = self.profiles.as_mut().and_then(|p| p.remove(&pid)) else {
            return;
        };
        report.profile = Some(profile.to_json(10));
        report.profile_text = Some(profile.to_text(10));
        if let Some(path) = &self.flamegraph {
            let title = format!("rfh-trace: {} (pid {pid})", report.process.comm);
            if let Err(e) = profile.write_flamegraph(path, &title) {
                crate::diag!("cannot write flame graph {}: {e}", path.display());
            }
        }
    }

    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    pub(crate) fn handle(&mut self, record: &[u8]) {
        let event = match decode(record) {
            Ok(e) => e,
            Err(e) => {
                crate::diag!("dropping a malformed event: {e}");
                self.lost += 1;
                return;
            }
        };
        match event {
            Event::Signal(s) => self.on_signal(s),
            // The process may already be gone; the kernel-side mapping
            // capture covers that case, so a failed refresh is fine.
            Event::Exec(e) => self.tracker.exec(e.pid, &c_str(&e.filename)),
            Event::Vmas(v) => {
                let n = (v.nvmas as usize).min(v.vmas.len());
                self.tracker.add_vmas(v.pid, &v.vmas[..n]);
            }
            Event::Mmap(p) => self.tracker.mark_stale(p.pid),
            Event::Fork(p) => self.tracker.fork(p.pid, p.arg),
            Event::Killed(p) | Event::Oom(p) => {
                let oom = matches!(event, Event::Oom(_));
                let d = self.dying.entry(p.pid).or_insert_with(Dying::new);
                d.killed = Some(Killed {
                    sig: if oom { SIGKILL } else { p.arg as i32 },
                    code: if oom { SI_KERNEL } else { p.addr as i32 },
                    sender: p.sender,
                    tid: p.tid,
                    ktime_ns: p.ktime_ns,
                    oom,
                });
            }
            Event::Exit(p) => {
                self.finish(p.pid, p.arg);
                if let Some(profiles) = self.profiles.as_mut() {
                    profiles.remove(&p.pid);
                }
                self.pending.remove(&p.pid);
                self.tracker.forget(p.pid);
                self.exited.push(p.pid);
            }
        }
    }

    fn on_signal(&mut self, s: Box<SignalCapture>) {
        let ev = &s.event;
        self.lost += ev.lost;
        if ev.flags & SIG_F_SAMPLE != 0 {
            self.add_sample(&s);
            return;
        }
        if ev.flags & SIG_F_DUMP != 0 {
            return; // a dump that was already reported or abandoned
        }
        if ev.flags & SIG_F_GROUP_EXIT == 0 && self.on_signal & (1u64 << (ev.sig as u32 & 63)) != 0
        {
            self.signal_report(s);
            return;
        }
        if ev.flags & SIG_F_GROUP_EXIT != 0 {
            if let Some(d) = self.dying.get_mut(&ev.pid) {
                d.since = Instant::now();
                d.siblings.push(s);
            }
            return;
        }
        if ev.handler == SIG_IGN || (ev.handler == SIG_DFL && default_is_harmless(ev.sig as u32)) {
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
        let d = self.dying.entry(ev.pid).or_insert_with(Dying::new);
        d.handled = original.is_some();
        d.primary = Some(original.unwrap_or(s));
    }

    /// Writes the report for a process that has finished dying.
    fn finish(&mut self, pid: u32, omitted: u32) {
        let Some(d) = self.dying.remove(&pid) else {
            return;
        };
        if let Some(report) = self.crash_report(pid, d, omitted) {
            self.emit(&report);
        }
    }

    pub fn emit(&mut self, report: &Report) {
        let text = if self.json {
            report.to_json()
        } else {
            report.to_text(self.color)
        };
        if let Err(e) = self.sink.write_report(&text) {
            crate::diag!("cannot write report: {e}");
        }
    }

    fn crash_report(&mut self, pid: u32, d: Dying, omitted: u32) -> Option<Report> {
        let mut siblings = d.siblings;
        // A group kill has no faulting thread: the thread the kernel
        // aimed at (or the first to die) stands first.
        let primary = d.primary.or_else(|| {
            let want = d.killed.as_ref().map(|k| k.tid);
            let i = siblings
                .iter()
                .position(|s| Some(s.event.tid) == want)
                .unwrap_or(0);
            (!siblings.is_empty()).then(|| siblings.remove(i))
        });
        siblings.sort_by_key(|s| s.event.tid);
        let (signal, ktime) = match (&d.killed, &primary) {
            (Some(k), _) => (
                Signal {
                    sender_pid: (k.sender != 0 && !k.oom).then_some(k.sender as i32),
                    ..named_signal(k.sig, k.code)
                },
                k.ktime_ns,
            ),
            (None, Some(p)) => {
                let ev = &p.event;
                let mut signal = signal_of(ev);
                signal.handled = d.handled;
                signal.stack_overflow = stack_overflow(ev.sig, ev.addr, ev.regs[REG_SP]);
                (signal, ev.ktime_ns)
            }
            (None, None) => return None,
        };
        let mut report = self.report(
            "crash",
            pid,
            primary.as_deref(),
            &siblings,
            Some(signal),
            ktime,
        );
        report.oom_kill = d.killed.as_ref().is_some_and(|k| k.oom);
        report.threads_omitted = omitted;
        Some(report)
    }

    /// A report of `kind` for `pid`: `current` (the thread the signal
    /// went to) first, then `others`, each unwound and symbolized.
    pub(crate) fn report(
        &mut self,
        kind: &'static str,
        pid: u32,
        current: Option<&SignalCapture>,
        others: &[Box<SignalCapture>],
        signal: Option<Signal>,
        ktime: u64,
    ) -> Report {
        // Mappings that changed in the batch being handled.
        self.tracker.refresh_stale();
        let info = self.tracker.get(pid).cloned().unwrap_or_default();
        let caps: Vec<(&SignalCapture, bool)> = current
            .map(|c| (c, true))
            .into_iter()
            .chain(others.iter().map(|s| (&**s, false)))
            .collect();
        let threads = self.pipeline.threads(&self.tracker, &caps);
        let first = current.or(others.first().map(|b| &**b));
        let ns_pid = first.map_or(0, |f| f.event.ns_pid);
        let time_ns = ktime as i128 + self.wall_offset_ns;
        Report {
            schema: report::SCHEMA,
            kind,
            time: report::rfc3339(time_ns.max(0) as u128),
            host: self.host.clone(),
            process: Process {
                pid,
                ns_pid: (ns_pid != 0 && ns_pid != pid)
                    .then_some(ns_pid)
                    .or(info.ns_pid.filter(|&n| n != pid)),
                comm: info
                    .comm
                    .clone()
                    .unwrap_or_else(|| first.map(|f| c_str(&f.event.comm)).unwrap_or_default()),
                exe: info.exe.clone().or_else(|| self.tracker.exec_path(pid)),
                cmdline: info.cmdline.clone(),
                uid: info.uid,
                container_id: info.cgroup.as_deref().and_then(container_id),
                cgroup: info.cgroup.clone(),
            },
            signal,
            oom_kill: false,
            threads,
            threads_omitted: 0,
            profile: None,
            profile_text: None,
            lost_events: std::mem::take(&mut self.lost),
        }
    }
}

/// The signal part of a report, from the kernel's record of it.
pub(crate) fn signal_of(ev: &SignalEvent) -> Signal {
    Signal {
        address: signals::is_fault(ev.sig, ev.code).then(|| report::hex(ev.addr)),
        sender_pid: signals::user_sent(ev.code)
            .then_some(ev.sender_pid)
            .filter(|&p| p > 0),
        handled: ev.handler > SIG_IGN,
        ..named_signal(ev.sig, ev.code)
    }
}

/// A signal's names and descriptions, with nothing else known yet.
fn named_signal(sig: i32, code: i32) -> Signal {
    Signal {
        number: sig,
        name: signals::name(sig),
        description: signals::description(sig),
        code,
        code_name: signals::code_name(sig, code),
        code_description: signals::code_description(sig, code),
        ..Signal::default()
    }
}
