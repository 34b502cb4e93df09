//! Stack dumps of live processes: on demand, at a timeout, and when a
//! watched process receives an `--on-signal` signal.

use std::time::Duration;

use faulthandler_common::{SIG_F_DUMP, SIG_F_RUNNING, SIG_F_SAMPLE};

use crate::{
    capture::CaptureError,
    decode::{Event, SignalCapture, decode},
    report::Report,
    watch::{Watcher, signal_of},
};

/// How long a thread that was on a CPU is sampled for during a dump.
const RUNNING_SAMPLE: Duration = Duration::from_millis(30);

impl Watcher {
    /// Every thread of `pid` now, without stopping it: saved registers
    /// and stack for threads blocked in the kernel, a sample for threads
    /// that were running. The main thread comes first.
    pub fn snapshot(&mut self, pid: u32) -> Result<Vec<Box<SignalCapture>>, CaptureError> {
        let mut records = Vec::new();
        self.capture.dump(pid, |r| records.push(r.to_vec()))?;
        let mut dumped: Vec<Box<SignalCapture>> = Vec::new();
        let mut rest = Vec::new();
        for r in records {
            match decode(&r) {
                Ok(Event::Signal(s)) if s.event.flags & SIG_F_DUMP != 0 && s.event.pid == pid => {
                    dumped.push(s)
                }
                _ => rest.push(r),
            }
        }
        let running: Vec<u32> = dumped
            .iter()
            .filter(|s| s.event.flags & SIG_F_RUNNING != 0)
            .map(|s| s.event.tid)
            .collect();
        if !running.is_empty() {
            self.capture.sample_threads(&running, RUNNING_SAMPLE)?;
            let mut samples = Vec::new();
            self.capture.drain(&mut |r: &[u8]| samples.push(r.to_vec()));
            for r in samples {
                match decode(&r) {
                    Ok(Event::Signal(s))
                        if s.event.flags & SIG_F_SAMPLE != 0 && running.contains(&s.event.tid) =>
                    {
                        if let Some(slot) = dumped.iter_mut().find(|d| {
                            d.event.tid == s.event.tid && d.event.flags & SIG_F_SAMPLE == 0
                        }) {
                            *slot = s;
                        }
                    }
                    _ => rest.push(r),
                }
            }
        }
        for r in rest {
            self.handle(&r);
        }
        dumped.sort_by_key(|s| (s.event.tid != pid, s.event.tid));
        Ok(dumped)
    }

    /// A `timeout` or `on_demand` report of every thread of `pid`.
    pub fn dump_report(&mut self, pid: u32, kind: &'static str) -> Result<Report, CaptureError> {
        let threads = self.snapshot(pid)?;
        let ktime = threads.first().map_or(0, |t| t.event.ktime_ns);
        let mut report = self.report(kind, pid, None, &threads, None, ktime);
        if kind == "timeout" {
            self.attach_profile(pid, &mut report);
        }
        Ok(report)
    }

    /// `--on-signal`: the receiving thread's stack as delivered, then
    /// every other thread as it is now.
    pub(crate) fn signal_report(&mut self, s: Box<SignalCapture>) {
        let ev = &s.event;
        let signal = signal_of(ev);
        let (pid, tid, ktime) = (ev.pid, ev.tid, ev.ktime_ns);
        // The process keeps running; a failed dump still leaves the
        // receiving thread's own stack worth reporting.
        let others = self.snapshot(pid).unwrap_or_default();
        let others: Vec<_> = others.into_iter().filter(|o| o.event.tid != tid).collect();
        let report = self.report("signal", pid, Some(&s), &others, Some(signal), ktime);
        self.emit(&report);
    }
}
