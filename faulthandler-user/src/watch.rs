//! The event loop: owns the capture, drains the ring, keeps the process
//! tracker current, feeds the assembler, and hands owned jobs to the
//! workers. Nothing here unwinds, symbolizes or writes a report.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use faulthandler_common::{
    SIG_DFL, SIG_F_DUMP, SIG_F_GROUP_EXIT, SIG_F_PYTHON, SIG_F_SAMPLE, default_is_harmless,
};

use crate::{
    assemble::{Assembler, Cause, Crash, Input, Killed, Output, STALL},
    capture::{Capture, CaptureError},
    cli::StackMode,
    decode::{DecodeError, Event, PyStackCapture, SignalCapture, c_str, decode},
    dumps::{Collector, Snapshot},
    losses::{Losses, UserDrops},
    procs::{Tracker, container_id},
    python::{
        attach::{ThreadPython, live_thread},
        discover::PyTarget,
        mem::ProcMem,
        walk::walk,
    },
    report::{Kind, LossRecord, Process, rfc3339},
    workers::{Job, ReportJob, ThreadJob, Workers},
};

/// Set by SIGINT/SIGTERM handlers; the loop checks it between polls.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

pub struct Watcher {
    pub capture: Capture,
    pub tracker: Tracker,
    assembler: Assembler,
    pub(crate) workers: Workers,
    losses: Losses,
    decode_failed: u64,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset_ns: i128,
    host: String,
    /// Processes that exited since the last call to `take_exited`.
    exited: Vec<u32>,
    /// `--on-signal` deliveries waiting for their dump.
    deferred: Vec<Box<SignalCapture>>,
    /// The dump being collected, if one runs.
    pub(crate) collector: Option<Collector>,
    pub(crate) dump_seq: u32,
    /// CPU samples go to the workers for timeout profiles.
    profiling: bool,
    /// Files the tracker closed, for the workers to forget.
    released: Vec<std::path::PathBuf>,
    /// Processes that exited, for the workers to drop their profiles.
    exited_profiles: Vec<u32>,
    last_sweep: Instant,
    /// Which frames reports show; `Native` reads no Python at all.
    pub(crate) stack_mode: StackMode,
    /// Python frames the kernel copied, by tid, waiting for the signal
    /// record that follows them.
    pending_py: HashMap<u32, Box<PyStackCapture>>,
}

/// The longest the loop sleeps with records that did not wake it.
const BOOKKEEPING_EVERY: Duration = Duration::from_millis(20);

/// How often cached files are checked for having been deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Python records waiting for their signal record, at most: each is
/// followed by its own at once, so only lost signal records leave any.
const PENDING_PY_MAX: usize = 4096;

pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clocks used always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Hands `pending` to the workers as one job when they have room for it;
/// keeps it for the next try otherwise.
fn hand_over<T: Clone>(workers: &Workers, pending: &mut Vec<T>, job: fn(Vec<T>) -> Job) {
    if !pending.is_empty() && workers.try_submit(job(pending.clone())) {
        pending.clear();
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Watcher {
    pub fn new(capture: Capture, tracker: Tracker, workers: Workers, on_signal: u64) -> Self {
        Self {
            capture,
            tracker,
            assembler: Assembler::new(on_signal, STALL),
            workers,
            losses: Losses::new(),
            decode_failed: 0,
            wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            host: host_name(),
            exited: Vec::new(),
            deferred: Vec::new(),
            collector: None,
            dump_seq: 0,
            profiling: false,
            released: Vec::new(),
            exited_profiles: Vec::new(),
            last_sweep: Instant::now(),
            stack_mode: StackMode::Merged,
            pending_py: HashMap::new(),
        }
    }

    /// Sets which frames reports show (`--stack`).
    pub fn set_stack_mode(&mut self, mode: StackMode) {
        self.stack_mode = mode;
    }

    /// Tells the kernel about interpreters found or gone since last time,
    /// so that their threads' Python frames are copied at signal time.
    pub(crate) fn sync_python(&mut self) {
        for (pid, entry) in self.tracker.take_python_changes() {
            let entry = entry.filter(|_| self.stack_mode != StackMode::Native);
            if let Err(e) = self.capture.set_python(pid, entry) {
                crate::diag!("cannot tell the kernel about pid {pid}'s interpreter: {e}");
            }
        }
    }

    /// Sends CPU samples to the workers for timeout reports' profiles.
    pub fn keep_profiles(&mut self) {
        self.profiling = true;
    }

    pub fn stop_profiles(&mut self) {
        self.profiling = false;
    }

    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    pub(crate) fn wall_ns(&self, ktime_ns: u64) -> i128 {
        ktime_ns as i128 + self.wall_offset_ns
    }

    /// How long the loop may sleep waiting for the ring, at most `max`.
    /// Under --all, exec and mmap records wake nobody (they would cost
    /// every exec on the host a wake-up): they are read at least this
    /// often, so a process that lives a few tens of milliseconds is still
    /// read from /proc while it runs. A process just exec'd is read once
    /// it has settled (poll counts whole milliseconds: round up, not to a
    /// busy 0).
    pub fn sleep_for(&self, max: Duration) -> Duration {
        let timeout = max.min(BOOKKEEPING_EVERY);
        self.tracker
            .next_refresh_in()
            .map_or(timeout, |d| d.max(Duration::from_millis(1)).min(timeout))
    }

    /// Waits up to `timeout` for events and handles them.
    pub fn poll(&mut self, timeout: Duration) -> Result<(), CaptureError> {
        let timeout = self.sleep_for(timeout);
        // Decoded as they are drained: one copy of each record.
        let mut events = Vec::new();
        self.capture.poll(timeout, |r| events.push(decode(r)))?;
        for e in events {
            self.handle(e);
        }
        self.after_batch(false);
        if self.collector.is_none() {
            for cap in std::mem::take(&mut self.deferred) {
                self.signal_report(cap);
            }
        }
        Ok(())
    }

    /// Mappings re-read, dying processes' progress, stalled deaths, and
    /// the drop counters.
    fn after_batch(&mut self, force_loss_record: bool) {
        self.tracker.refresh_stale();
        self.sync_python();
        let now = Instant::now();
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.tracker.sweep_deleted();
        }
        // Bookkeeping for the workers is never dropped (a dropped one
        // would leak there for good): it waits for room instead.
        hand_over(&self.workers, &mut self.exited_profiles, Job::Forget);
        self.released.extend(self.tracker.take_released());
        hand_over(&self.workers, &mut self.released, Job::ForgetFiles);
        let dying: Vec<u32> = self.assembler.dying().collect();
        for pid in dying {
            if let Some(counts) = self.capture.dying(pid) {
                self.assembler.on(Input::Progress(pid, counts), now);
            }
        }
        for out in self.assembler.tick(now) {
            self.output(out);
        }
        self.read_drops();
        self.capture.flush_log();
        if let Some(lost) = self.losses.take_record(now, force_loss_record) {
            let time = rfc3339(clock_ns(libc::CLOCK_REALTIME).max(0) as u128);
            let record = LossRecord::new(time, self.host.clone(), lost.clone());
            if force_loss_record {
                self.workers.submit_wait(Job::Loss(record));
            } else if !self.workers.try_submit(Job::Loss(record)) {
                // Not lost: it goes out with the next record.
                self.losses.unrecord(&lost);
            }
        }
    }

    fn read_drops(&mut self) {
        let stats = &self.workers.stats;
        let user = UserDrops {
            queue_full: stats.queue_full.load(Ordering::Relaxed),
            write_failed: stats.write_failed.load(Ordering::Relaxed),
            decode_failed: self.decode_failed,
        };
        if let Ok(kernel) = self.capture.drops() {
            self.losses.update(&kernel, user);
        }
    }

    /// Reports every death still being assembled, writes the last loss
    /// record, and waits for the workers to finish. Returns the one-line
    /// summary of what was lost during the run, if anything was.
    pub fn finish(&mut self) -> Option<String> {
        for out in self.assembler.flush() {
            self.output(out);
        }
        self.after_batch(true);
        self.workers.finish();
        // Write failures of the last records count too.
        self.read_drops();
        self.losses.summary()
    }

    pub(crate) fn handle(&mut self, event: Result<Event, DecodeError>) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                crate::diag!("dropping a malformed event: {e}");
                self.decode_failed += 1;
                return;
            }
        };
        let now = Instant::now();
        match event {
            Event::PyStack(p) => {
                if self.pending_py.len() >= PENDING_PY_MAX {
                    self.pending_py.clear();
                }
                self.pending_py.insert(p.event.tid, p);
            }
            Event::Signal(mut s) => {
                if s.event.flags & SIG_F_PYTHON != 0
                    && let Some(p) = self.pending_py.remove(&s.event.tid)
                    && p.event.pid == s.event.pid
                {
                    s.python = Some(p);
                }
                let s = match self.collector.as_mut() {
                    Some(c) => match c.offer(s) {
                        Some(s) => s,
                        None => return,
                    },
                    None => s,
                };
                // A process that dies before it was ever read (it crashed
                // within milliseconds of exec) is still exiting now: its
                // mappings, and handles on its files, can be had from /proc
                // for a moment longer. Its binary may be deleted next.
                let ev = &s.event;
                let fatal = ev.flags & (SIG_F_GROUP_EXIT | SIG_F_DUMP | SIG_F_SAMPLE) == 0
                    && ev.handler == SIG_DFL
                    && !default_is_harmless(ev.sig as u32);
                if fatal && self.tracker.get(ev.pid).is_none() {
                    let _ = self.tracker.refresh(ev.pid);
                }
                if let Some(out) = self.assembler.on(Input::Signal(s), now) {
                    self.output(out);
                }
            }
            // The process may already be gone; the kernel-side mapping
            // capture covers that case, so a failed refresh is fine.
            Event::Exec(e) => self.tracker.exec(e.pid, &c_str(&e.filename)),
            Event::Vmas(v) => {
                let n = (v.nvmas as usize).min(v.vmas.len());
                self.tracker.add_vmas(v.pid, &v.vmas[..n]);
                self.assembler.on(Input::Touch(v.pid), now);
            }
            Event::Mmap(p) => self.tracker.mark_stale(p.pid),
            Event::Fork(p) => self.tracker.fork(p.pid, p.arg),
            Event::Killed(p) | Event::Oom(p) => {
                let oom = matches!(event, Event::Oom(_));
                let k = Killed {
                    sig: p.arg as i32,
                    code: p.addr as i32,
                    sender: p.sender,
                    tid: p.tid,
                    ktime_ns: p.ktime_ns,
                    oom,
                };
                self.assembler.on(Input::Killed(p.pid, k), now);
            }
            Event::Exit(e) => {
                let pid = e.pid;
                self.pending_py.retain(|_, p| p.event.pid != pid);
                if let Some(out) = self.assembler.on(Input::Exit(e), now) {
                    self.output(out);
                }
                if self.profiling {
                    self.exited_profiles.push(pid);
                }
                // A process that exits mid-dump is forgotten once its
                // report has taken what is known of it.
                let dumping = self.collector.as_mut().is_some_and(|c| c.exited(pid));
                if !dumping {
                    self.tracker.forget(pid);
                }
                self.exited.push(pid);
            }
        }
    }

    fn output(&mut self, out: Output) {
        match out {
            Output::Crash(c) => {
                let job = self.crash_job(c);
                self.workers.submit(Job::Report(Box::new(job)));
            }
            Output::OnSignal(cap) => self.deferred.push(cap),
            Output::Sample(cap) if self.profiling => {
                let modules = self.modules_of(&cap);
                self.workers.submit(Job::Sample(Box::new(ThreadJob {
                    cap,
                    current: false,
                    modules,
                    python: None,
                })));
            }
            Output::Sample(_) => {}
        }
    }

    fn crash_job(&mut self, c: Crash) -> ReportJob {
        let Crash {
            pid,
            current,
            others,
            cause,
            counts,
            partial,
            ktime_ns,
        } = c;
        let mut job = self.job(Kind::Crash, pid, current, others, self.wall_ns(ktime_ns));
        job.cause = Some(cause);
        job.counts = Some(counts);
        job.partial = partial;
        job
    }

    fn modules_of(&mut self, cap: &SignalCapture) -> Vec<crate::modules::Module> {
        let ev = &cap.event;
        let n = (ev.nvmas as usize).min(ev.vmas.len());
        self.tracker.modules_for(ev.pid, &ev.vmas[..n])
    }

    /// A report job of `kind` for `pid`: `current` (the thread the signal
    /// went to) first, then `others`, with an owned snapshot of what is
    /// known about the process.
    pub(crate) fn job(
        &mut self,
        kind: Kind,
        pid: u32,
        current: Option<Box<SignalCapture>>,
        others: Vec<Box<SignalCapture>>,
        time_ns: i128,
    ) -> ReportJob {
        // Mappings that changed in the batch being handled.
        self.tracker.refresh_stale();
        self.sync_python();
        let info = self.tracker.get(pid);
        let first = current.as_deref().or(others.first().map(|b| &**b));
        let ns_pid = first.map_or(0, |f| f.event.ns_pid);
        // Gone before /proc could be read: its cgroup still has an id.
        let cgroup = info
            .and_then(|i| i.cgroup.clone())
            .or_else(|| first.and_then(|f| crate::procs::cgroup_path_by_id(f.event.cgroup_id)));
        let process = Process {
            pid,
            ns_pid: (ns_pid != 0 && ns_pid != pid)
                .then_some(ns_pid)
                .or(info.and_then(|i| i.ns_pid).filter(|&n| n != pid)),
            // The main thread's name as the kernel saw it at the time is the
            // process's; what /proc said earlier may be out of date.
            comm: current
                .iter()
                .chain(&others)
                .find(|c| c.event.tid == pid)
                .map(|c| c_str(&c.event.comm))
                .or_else(|| info.and_then(|i| i.comm.clone()))
                .unwrap_or_else(|| first.map(|f| c_str(&f.event.comm)).unwrap_or_default()),
            exe: info
                .and_then(|i| i.exe.clone())
                .or_else(|| self.tracker.exec_path(pid)),
            cmdline: info.and_then(|i| i.cmdline.clone()),
            uid: info.and_then(|i| i.uid),
            container_id: cgroup.as_deref().and_then(container_id),
            cgroup,
            k8s: None,
        };
        let python = info
            .and_then(|i| i.python.clone())
            .filter(|_| self.stack_mode != StackMode::Native);
        let mut threads: Vec<ThreadJob> = current
            .into_iter()
            .map(|c| (c, true))
            .chain(others.into_iter().map(|c| (c, false)))
            .map(|(cap, current)| ThreadJob {
                modules: self.modules_of(&cap),
                cap,
                current,
                python: None,
            })
            .collect();
        if let Some(Ok(target)) = &python {
            live_python(pid, target, &mut threads);
        }
        self.read_drops();
        ReportJob {
            kind,
            time_ns,
            host: self.host.clone(),
            process,
            threads,
            cause: None,
            counts: None,
            partial: None,
            lost_events: self.losses.take_for_report(),
            python,
        }
    }

    /// `--on-signal`: the receiving thread's stack as delivered, then
    /// every other thread as it is now.
    fn signal_report(&mut self, cap: Box<SignalCapture>) {
        let pid = cap.event.pid;
        let cause = Cause::of(&cap);
        // The process keeps running; a failed dump still leaves the
        // receiving thread's own stack worth reporting.
        let snap = self.snapshot(pid).unwrap_or_else(|e| Snapshot {
            threads: Vec::new(),
            time_ns: 0,
            partial: Some(format!("the other threads could not be dumped: {e}")),
            exited: false,
        });
        let mut job = self.snapshot_job(Kind::Signal, pid, Some(cap), snap);
        job.cause = Some(cause);
        self.workers.submit(Job::Report(Box::new(job)));
    }
}

/// The Python frames of the dumped threads among `threads`, read from the
/// live process now, just after the dump: one walk of every thread state,
/// matched to the records by thread id.
fn live_python(pid: u32, target: &PyTarget, threads: &mut [ThreadJob]) {
    if !threads
        .iter()
        .any(|t| t.cap.event.flags & (SIG_F_DUMP | SIG_F_SAMPLE) != 0)
    {
        return;
    }
    let walk = walk(&ProcMem::new(pid), target);
    for t in threads
        .iter_mut()
        .filter(|t| t.cap.event.flags & (SIG_F_DUMP | SIG_F_SAMPLE) != 0)
    {
        t.python = match &walk {
            // Not found in a list that was torn under the walk: say so.
            Ok(w) => live_thread(w, &t.cap).or_else(|| {
                w.error.as_ref().map(|e| ThreadPython {
                    error: Some(format!(
                        "the thread list changed under the walk: {}",
                        e.reason()
                    )),
                    ..ThreadPython::default()
                })
            }),
            Err(e) => Some(ThreadPython {
                error: Some(e.reason()),
                ..ThreadPython::default()
            }),
        };
    }
}
