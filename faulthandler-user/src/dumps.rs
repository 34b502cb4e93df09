//! Stack dumps of live processes: on demand, at a timeout, and when a
//! watched process receives an `--on-signal` signal.
//!
//! The task iterator writes one record per thread into the ring while the
//! event loop keeps draining it; a full ring makes the iterator retry the
//! same thread rather than drop it, and the iterator's count of records
//! written tells the loop when it has them all. Threads found running get
//! a CPU sample instead, since their saved registers are stale.

use std::{
    collections::HashSet,
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use faulthandler_common::{SIG_F_DUMP, SIG_F_HAS_REGS, SIG_F_RUNNING, SIG_F_SAMPLE};

use crate::{
    capture::{self, CaptureError},
    decode::SignalCapture,
    report::Kind,
    watch::{Watcher, clock_ns},
    workers::ReportJob,
};

/// How long threads that were on a CPU are sampled for, at most.
const RUNNING_SAMPLE: Duration = Duration::from_millis(50);
/// How long to wait for records the iterator wrote but the ring has not
/// handed over yet (they are already in it: this is a bound, not a delay).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The records of one dump, as the loop drains them.
pub struct Collector {
    pid: u32,
    seq: u32,
    threads: Vec<Box<SignalCapture>>,
    /// Threads being sampled, and those that have their sample.
    sampling: HashSet<u32>,
    sampled: HashSet<u32>,
    exited: bool,
}

impl Collector {
    fn new(pid: u32, seq: u32) -> Self {
        Self {
            pid,
            seq,
            threads: Vec::new(),
            sampling: HashSet::new(),
            sampled: HashSet::new(),
            exited: false,
        }
    }

    /// Takes a record that belongs to this dump; hands back any other.
    pub fn offer(&mut self, s: Box<SignalCapture>) -> Option<Box<SignalCapture>> {
        let ev = &s.event;
        if ev.pid != self.pid {
            return Some(s);
        }
        if ev.flags & SIG_F_DUMP != 0 {
            if ev.seq == u64::from(self.seq) {
                self.threads.push(s);
            }
            return None; // this dump's, or a stale one's
        }
        if ev.flags & SIG_F_SAMPLE != 0 && self.sampling.contains(&ev.tid) {
            if self.sampled.insert(ev.tid) {
                let tid = ev.tid;
                if let Some(slot) = self.threads.iter_mut().find(|d| d.event.tid == tid) {
                    *slot = s;
                }
            }
            return None;
        }
        Some(s)
    }

    /// Notes that `pid` exited; true when it is the one being dumped.
    pub fn exited(&mut self, pid: u32) -> bool {
        self.exited |= pid == self.pid;
        pid == self.pid
    }
}

/// Every thread of a process at one moment, main thread first.
pub struct Snapshot {
    pub threads: Vec<Box<SignalCapture>>,
    /// When the dump began, wall clock ns.
    pub time_ns: i128,
    pub partial: Option<String>,
}

impl Watcher {
    /// Every thread of `pid` now, without stopping it.
    pub fn snapshot(&mut self, pid: u32) -> Result<Snapshot, CaptureError> {
        let time_ns = clock_ns(libc::CLOCK_REALTIME);
        self.dump_seq = self.dump_seq.wrapping_add(1).max(1);
        self.collector = Some(Collector::new(pid, self.dump_seq));
        let r = self.collect(pid);
        let _ = self.capture.end_dump();
        let c = self.collector.take();
        r?;
        let Some(mut c) = c else {
            return Err(CaptureError::Iter("the dump collector vanished".into()));
        };
        c.threads.sort_by_key(|s| (s.event.tid != pid, s.event.tid));
        let no_regs = c
            .threads
            .iter()
            .all(|s| s.event.flags & SIG_F_HAS_REGS == 0);
        let partial = if c.exited || c.threads.is_empty() {
            Some(
                "the process exited during the dump: the threads shown are those read before it did"
                    .to_string(),
            )
        } else if no_regs {
            Some(
                "no thread had user registers to read: the process has exited (a zombie waiting \
                 for its parent to reap it) or is exiting"
                    .to_string(),
            )
        } else {
            None
        };
        Ok(Snapshot {
            threads: c.threads,
            time_ns,
            partial,
        })
    }

    fn collect(&mut self, pid: u32) -> Result<(), CaptureError> {
        let file = self.capture.start_dump(pid, self.dump_seq)?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| capture::read_iterator(file, &stop));
            while !reader.is_finished() {
                if let Err(e) = self.poll(Duration::from_millis(1)) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = reader.join();
                    return Err(e);
                }
            }
            match reader.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CaptureError::Iter(e.to_string())),
                Err(_) => Err(CaptureError::Iter("the iterator thread panicked".into())),
            }
        })?;
        let emitted = self.capture.dump_ctl()?.emitted;
        let deadline = Instant::now() + DRAIN_WAIT;
        while self.collected() < emitted && Instant::now() < deadline {
            self.poll(Duration::from_millis(1))?;
        }
        let running: Vec<u32> = self.collector.as_ref().map_or_else(Vec::new, |c| {
            c.threads
                .iter()
                .filter(|s| s.event.flags & SIG_F_RUNNING != 0)
                .map(|s| s.event.tid)
                .collect()
        });
        if running.is_empty() {
            return Ok(());
        }
        if let Some(c) = self.collector.as_mut() {
            c.sampling = running.iter().copied().collect();
        }
        let links = self.capture.sample_threads(&running)?;
        let deadline = Instant::now() + RUNNING_SAMPLE;
        while Instant::now() < deadline
            && self
                .collector
                .as_ref()
                .is_some_and(|c| c.sampled.len() < c.sampling.len())
        {
            self.poll(Duration::from_millis(1))?;
        }
        self.capture.stop_sampling(links)?;
        Ok(())
    }

    fn collected(&self) -> u64 {
        self.collector
            .as_ref()
            .map_or(0, |c| c.threads.len() as u64)
    }

    /// A `timeout` or `on_demand` report job of every thread of `pid`.
    pub fn dump_job(&mut self, pid: u32, kind: Kind) -> Result<ReportJob, CaptureError> {
        let snap = self.snapshot(pid)?;
        let exited = snap.partial.is_some();
        let mut job = self.job(kind, pid, None, snap.threads, snap.time_ns);
        job.partial = snap.partial;
        if exited {
            self.tracker.forget(pid);
        }
        Ok(job)
    }
}
