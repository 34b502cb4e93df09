//! Workers: unwind, symbolize and render off the event loop, so the ring
//! buffer reader never waits for them. Jobs carry owned snapshots (the
//! captures, the process's identity and modules, with their files held
//! open), so a worker needs nothing from the loop.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
};

use faulthandler_common::Dying;

use crate::{
    assemble::{Cause, resolve_cause},
    cli::StackMode,
    decode::SignalCapture,
    modules::Module,
    pipeline::{Pipeline, ThreadInput},
    profile::Profile,
    python::{
        attach::{ThreadPython, apply, signal_thread},
        discover::PyTarget,
    },
    report::{Kind, LossRecord, Process, Report, SCHEMA, Signal, Thread, rfc3339},
    signals,
    sink::Sink,
};

/// Jobs waiting for a worker, at most; beyond this, or beyond
/// `QUEUE_BYTES` of captured stacks, the newest job is dropped and counted
/// (`queue_full`). A burst of crashes (the ring buffer's worth, after
/// rfh-trace was stopped) fits; a crash job holds up to `--max-threads`
/// stack copies, so the byte bound is what bounds memory.
const QUEUE: usize = 4096;
const QUEUE_BYTES: usize = 24 << 20;
/// Stacks listed in a timeout report's CPU profile.
const PROFILE_TOP: usize = 10;

pub struct ThreadJob {
    pub cap: Box<SignalCapture>,
    pub current: bool,
    pub modules: Vec<Module>,
    /// Python frames read from the live process (dumps); a capture at a
    /// signal carries the kernel's copy in `cap.python` instead.
    pub(crate) python: Option<ThreadPython>,
}

pub struct ReportJob {
    pub kind: Kind,
    /// Wall-clock time of the event, ns since the epoch.
    pub time_ns: i128,
    pub host: String,
    pub process: Process,
    pub threads: Vec<ThreadJob>,
    pub cause: Option<Cause>,
    /// The kernel's thread counts, for crashes.
    pub counts: Option<Dying>,
    pub partial: Option<String>,
    pub lost_events: u64,
    /// The process's CPython, as the tracker knew it (`Err`: why its
    /// frames cannot be read).
    pub(crate) python: Option<Result<PyTarget, String>>,
}

pub enum Job {
    Report(Box<ReportJob>),
    /// A CPU sample of `pid` for its next timeout report's profile.
    Sample(Box<ThreadJob>),
    /// These processes exited: their profiles go.
    Forget(Vec<u32>),
    /// Files the tracker closed: what is cached for them goes.
    ForgetFiles(Vec<PathBuf>),
    Loss(LossRecord),
    /// A report for one requester (a dump asked of the agent over its
    /// socket), handed back instead of written to the sinks.
    Reply(Box<ReportJob>, std::sync::mpsc::Sender<Report>),
}

/// Counts shared with the loop, for loss records and the exit summary.
#[derive(Default)]
pub struct Stats {
    pub queue_full: AtomicU64,
    pub write_failed: AtomicU64,
    pub reports: AtomicU64,
    /// Captured bytes in queued jobs.
    pub queued_bytes: AtomicUsize,
}

impl Job {
    /// What the job holds in memory, roughly: its stack copies and records.
    fn bytes(&self) -> usize {
        const RECORD: usize = size_of::<SignalCapture>();
        let thread = |t: &ThreadJob| {
            RECORD + t.cap.stack.len() + t.cap.python.as_ref().map_or(0, |p| p.regions.len())
        };
        match self {
            Job::Report(r) | Job::Reply(r, _) => r.threads.iter().map(thread).sum(),
            Job::Sample(t) => thread(t),
            Job::Forget(_) | Job::ForgetFiles(_) | Job::Loss(_) => 0,
        }
    }
}

pub struct WorkerOptions {
    pub max_frames: usize,
    /// Which frames threads running Python show.
    pub stack: StackMode,
    pub flamegraph: Option<PathBuf>,
    /// Module lists to read unwind tables and debug info for at once, so
    /// the first report that needs them is fast.
    pub warm: Vec<Vec<Module>>,
}

pub struct Workers {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

impl Workers {
    /// Starts the worker with its sinks. The pipeline is made on the
    /// worker's own thread (the symbolizer is not Send), which then warms
    /// it while the caller goes on loading the programs.
    pub fn start(sinks: Vec<Box<dyn Sink>>, opts: WorkerOptions) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let worker_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name("rfh-worker".into())
            .spawn(move || {
                let mut pipeline = Pipeline::new(opts.max_frames);
                for modules in &opts.warm {
                    pipeline.warm(modules);
                }
                let worker = Worker {
                    pipeline,
                    stack: opts.stack,
                    sinks,
                    profiles: HashMap::new(),
                    flamegraph: opts.flamegraph,
                    stats: worker_stats,
                };
                worker.run(rx)
            })?;
        Ok(Self {
            tx: Some(tx),
            handle: Some(handle),
            stats,
        })
    }

    /// Queues a job; a full queue drops it and counts the drop.
    pub fn submit(&self, job: Job) {
        if !self.try_submit(job) {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a job if there is room; false (nothing counted) if not.
    pub fn try_submit(&self, job: Job) -> bool {
        let Some(tx) = &self.tx else { return false };
        let bytes = job.bytes();
        let queued = self.stats.queued_bytes.load(Ordering::Relaxed);
        if bytes > 0 && queued + bytes > QUEUE_BYTES {
            return false;
        }
        self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues a job, waiting for room: for the last records at shutdown,
    /// and for dumps, which the user asked for and waits on.
    pub fn submit_wait(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let bytes = job.bytes();
            self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            if tx.send(job).is_err() {
                self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }

    /// Finishes every queued job and stops the worker.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.finish();
    }
}

struct Worker {
    pipeline: Pipeline,
    stack: StackMode,
    sinks: Vec<Box<dyn Sink>>,
    profiles: HashMap<u32, Profile>,
    flamegraph: Option<PathBuf>,
    stats: Arc<Stats>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        for job in rx {
            self.stats
                .queued_bytes
                .fetch_sub(job.bytes(), Ordering::Relaxed);
            match job {
                Job::Report(j) => {
                    let report = self.report(*j);
                    self.stats.reports.fetch_add(1, Ordering::Relaxed);
                    self.write(|s| s.report(&report));
                }
                Job::Sample(t) => {
                    let input = ThreadInput {
                        cap: &t.cap,
                        current: false,
                        modules: &t.modules,
                    };
                    let unwound = self.pipeline.threads(&[input]);
                    if let Some(thread) = unwound.threads.first() {
                        self.profiles
                            .entry(t.cap.event.pid)
                            .or_default()
                            .add(&thread.name, &thread.frames);
                    }
                }
                Job::Forget(pids) => {
                    for pid in pids {
                        self.profiles.remove(&pid);
                    }
                }
                Job::ForgetFiles(paths) => {
                    for p in &paths {
                        self.pipeline.forget_file(p);
                    }
                    // glibc keeps freed memory for reuse; a daemon that
                    // just let go of whole files' worth should hand it back.
                    // SAFETY: malloc_trim has no preconditions.
                    unsafe { libc::malloc_trim(0) };
                }
                Job::Loss(l) => self.write(|s| s.loss(&l)),
                Job::Reply(j, tx) => {
                    let _ = tx.send(self.report(*j));
                }
            }
        }
    }

    fn write(&mut self, mut f: impl FnMut(&mut dyn Sink) -> std::io::Result<()>) {
        for sink in &mut self.sinks {
            if f(sink.as_mut()).is_err() {
                self.stats.write_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn report(&mut self, mut j: ReportJob) -> Report {
        let inputs: Vec<ThreadInput<'_>> = j
            .threads
            .iter()
            .map(|t| ThreadInput {
                cap: &t.cap,
                current: t.current,
                modules: &t.modules,
            })
            .collect();
        let mut unwound = self.pipeline.threads(&inputs);
        drop(inputs);
        let python_error = self.merge_python(&mut j, &mut unwound.threads);
        let pid = j.process.pid;
        let signal = j
            .cause
            .as_ref()
            .map(|c| resolve_cause(c, pid, unwound.sigframe))
            .filter(|c| c.sig != 0)
            .map(|c| signal(&c));
        let counts = j.counts.unwrap_or_default();
        let mut report = Report {
            schema: SCHEMA,
            kind: j.kind,
            time: rfc3339(j.time_ns.max(0) as u128),
            host: j.host,
            node: None,
            process: j.process,
            oom_kill: j.cause.as_ref().is_some_and(|c| c.oom),
            signal,
            threads: unwound.threads,
            threads_omitted: counts.omitted as u32,
            threads_lost: counts.lost as u32,
            threads_total: j.counts.map(|c| c.total).filter(|&t| t > 0),
            partial: j.partial,
            profile: None,
            lost_events: j.lost_events,
            python_error,
            signature: None,
            suppressed: None,
        };
        if report.kind == Kind::Timeout {
            self.attach_profile(pid, &mut report);
        }
        report
    }

    /// Puts each thread's Python frames into its native ones; returns why
    /// the process's Python cannot be read, if it cannot.
    fn merge_python(&self, j: &mut ReportJob, threads: &mut [Thread]) -> Option<String> {
        if self.stack == StackMode::Native {
            return None;
        }
        let target = match &j.python {
            None => return None,
            Some(Err(why)) => return Some(why.clone()),
            Some(Ok(t)) => t,
        };
        for (thread, input) in threads.iter_mut().zip(&mut j.threads) {
            let py = input
                .python
                .take()
                .or_else(|| signal_thread(target, &input.cap));
            apply(thread, py, self.stack);
        }
        None
    }

    /// Moves the samples of `pid` since the last dump into `report`.
    fn attach_profile(&mut self, pid: u32, report: &mut Report) {
        let Some(profile) = self.profiles.remove(&pid) else {
            return;
        };
        report.profile = Some(profile.summary(PROFILE_TOP));
        if let Some(path) = &self.flamegraph {
            let title = format!("rfh-trace: {} (pid {pid})", report.process.comm);
            if let Err(e) = profile.write_flamegraph(path, &title) {
                crate::diag!("cannot write flame graph {}: {e}", path.display());
            }
        }
    }
}

/// The report's signal, named and described.
fn signal(c: &Cause) -> Signal {
    Signal {
        number: c.sig,
        name: signals::name(c.sig),
        description: signals::description(c.sig),
        code: c.code,
        code_name: signals::code_name(c.sig, c.code),
        code_description: signals::code_description(c.sig, c.code),
        address: c.addr,
        sender_pid: c.sender_pid,
        handled: c.handled,
        stack_overflow: c.stack_overflow,
    }
}
