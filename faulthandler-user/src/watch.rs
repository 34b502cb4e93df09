//! The event loop: owns the capture, drains the ring, keeps the process
//! tracker current, feeds the assembler, and hands owned jobs to the
//! workers. Nothing here unwinds, symbolizes or writes a report.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    assemble::{Assembler, Cause, Crash, Input, Killed, Output, STALL},
    capture::{Capture, CaptureError},
    decode::{Event, SignalCapture, c_str, decode},
    dumps::Collector,
    losses::{Losses, UserDrops},
    procs::{Tracker, container_id},
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
    last_sweep: Instant,
}

/// How often cached files are checked for having been deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub(crate) fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clocks used always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
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
            last_sweep: Instant::now(),
        }
    }

    /// Sends CPU samples to the workers for timeout reports' profiles.
    pub fn keep_profiles(&mut self) {
        self.profiling = true;
    }

    pub fn take_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.exited)
    }

    pub(crate) fn wall_ns(&self, ktime_ns: u64) -> i128 {
        ktime_ns as i128 + self.wall_offset_ns
    }

    /// Waits up to `timeout` for events and handles them.
    pub fn poll(&mut self, timeout: Duration) -> Result<(), CaptureError> {
        let mut records = Vec::new();
        self.capture.poll(timeout, |r| records.push(r.to_vec()))?;
        for r in records {
            self.handle(&r);
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
        let now = Instant::now();
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.tracker.sweep_deleted();
        }
        self.released.extend(self.tracker.take_released());
        if !self.released.is_empty() {
            // Kept until the workers have room: a dropped one would leak.
            let paths = std::mem::take(&mut self.released);
            if !self.workers.try_submit(Job::ForgetFiles(paths.clone())) {
                self.released = paths;
            }
        }
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

    pub(crate) fn handle(&mut self, record: &[u8]) {
        let event = match decode(record) {
            Ok(e) => e,
            Err(e) => {
                crate::diag!("dropping a malformed event: {e}");
                self.decode_failed += 1;
                return;
            }
        };
        let now = Instant::now();
        match event {
            Event::Signal(s) => {
                let s = match self.collector.as_mut() {
                    Some(c) => match c.offer(s) {
                        Some(s) => s,
                        None => return,
                    },
                    None => s,
                };
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
                if let Some(out) = self.assembler.on(Input::Exit(e), now) {
                    self.output(out);
                }
                if self.profiling {
                    self.workers.submit(Job::Forget(pid));
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
            comm: info
                .and_then(|i| i.comm.clone())
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
        let threads = current
            .into_iter()
            .map(|c| (c, true))
            .chain(others.into_iter().map(|c| (c, false)))
            .map(|(cap, current)| ThreadJob {
                modules: self.modules_of(&cap),
                cap,
                current,
            })
            .collect();
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
        }
    }

    /// `--on-signal`: the receiving thread's stack as delivered, then
    /// every other thread as it is now.
    fn signal_report(&mut self, cap: Box<SignalCapture>) {
        let (pid, tid, ktime) = (cap.event.pid, cap.event.tid, cap.event.ktime_ns);
        let cause = Cause::of(&cap);
        // The process keeps running; a failed dump still leaves the
        // receiving thread's own stack worth reporting.
        let (others, partial) = match self.snapshot(pid) {
            Ok(s) => (s.threads, s.partial),
            Err(e) => (
                Vec::new(),
                Some(format!("the other threads could not be dumped: {e}")),
            ),
        };
        let others = others.into_iter().filter(|o| o.event.tid != tid).collect();
        let mut job = self.job(Kind::Signal, pid, Some(cap), others, self.wall_ns(ktime));
        job.cause = Some(cause);
        job.partial = partial;
        self.workers.submit(Job::Report(Box::new(job)));
    }
}
