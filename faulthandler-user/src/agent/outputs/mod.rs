//! The agent's sinks: JSON Lines on stdout (cut under 16 KiB), a rotating
//! JSON Lines file, and OTLP logs. Each runs on a thread of its own behind
//! a bounded queue, so a slow or dead sink never holds up the others, the
//! workers or the capture: a full queue drops the record and counts it.

mod file;
mod otlp;
mod stdout;

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use self::{file::RotatingFile, otlp::Otlp, stdout::Stdout};
use super::metrics::{Metrics, SinkLabels};
use crate::report::{LossRecord, Report};

/// Records waiting per sink, at most.
const QUEUE: usize = 1024;
/// Records a sink takes from its queue at once (OTLP sends them in one
/// request).
const BATCH: usize = 64;

#[derive(Clone)]
pub enum Record {
    Report(Arc<Report>),
    Loss(Arc<LossRecord>),
}

/// What a sink does with records, on its own thread.
pub trait Writer: Send {
    /// Writes, or buffers, one record.
    fn write(&mut self, rec: &Record) -> io::Result<()>;
    /// Sends what `write` buffered; returns how many of those failed.
    fn flush(&mut self) -> u64 {
        0
    }
}

/// The drop reasons of one sink, as loss records and metrics name them.
#[derive(Clone, Copy)]
pub struct Reasons {
    pub queue_full: &'static str,
    pub write_failed: &'static str,
}

pub struct Output {
    name: &'static str,
    reasons: Reasons,
    tx: Option<SyncSender<Record>>,
    depth: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl Output {
    /// Starts the sink's thread; `make` builds its writer there (the OTLP
    /// client must not be made inside the async runtime).
    pub fn start<W: Writer + 'static>(
        name: &'static str,
        reasons: Reasons,
        metrics: Arc<Metrics>,
        make: impl FnOnce() -> io::Result<W> + Send + 'static,
    ) -> io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let depth = Arc::new(AtomicUsize::new(0));
        metrics.watch_output_queue(name, Arc::clone(&depth));
        let thread_depth = Arc::clone(&depth);
        let (ready_tx, ready_rx) = sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(format!("rfh-{name}"))
            .spawn(move || match make() {
                Ok(w) => {
                    let _ = ready_tx.send(Ok(()));
                    run(name, reasons, w, rx, &thread_depth, &metrics);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other(format!("the {name} sink thread died")))??;
        Ok(Self {
            name,
            reasons,
            tx: Some(tx),
            depth,
            handle: Some(handle),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues a record, or counts it dropped.
    pub fn send(&self, rec: Record, metrics: &Metrics) {
        let Some(tx) = &self.tx else {
            metrics.drop_one(self.reasons.write_failed, 1);
            return;
        };
        self.depth.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                metrics.drop_one(self.reasons.queue_full, 1);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                metrics.drop_one(self.reasons.write_failed, 1);
            }
        }
    }

    /// Closes the queue: the thread writes what is queued, then ends.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Waits for the thread until `deadline`; false if it is still busy
    /// (a collector that does not answer), which is then left behind.
    pub fn join(&mut self, deadline: Instant) -> bool {
        self.close();
        let Some(h) = self.handle.take() else {
            return true;
        };
        while !h.is_finished() {
            if Instant::now() >= deadline {
                self.handle = Some(h);
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = h.join();
        true
    }
}

fn run<W: Writer>(
    name: &'static str,
    reasons: Reasons,
    mut w: W,
    rx: Receiver<Record>,
    depth: &AtomicUsize,
    metrics: &Metrics,
) {
    let latency = metrics.latency.get_or_create_owned(&SinkLabels {
        sink: name.to_string(),
    });
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        depth.fetch_sub(batch.len(), Ordering::Relaxed);
        let mut failed = 0u64;
        let mut written = Vec::with_capacity(batch.len());
        for rec in &batch {
            match w.write(rec) {
                Ok(()) => written.push(rec),
                Err(_) => failed += 1,
            }
        }
        let flush_failed = w.flush();
        failed += flush_failed;
        metrics.drop_one(reasons.write_failed, failed);
        if flush_failed > 0 {
            continue;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for rec in written {
            if let Record::Report(r) = rec
                && let Some(t) = parse_rfc3339_ns(&r.time)
            {
                latency.observe(now.saturating_sub(t) as f64 / 1e9);
            }
        }
    }
}

/// Nanoseconds since the epoch of `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the
/// reports' own time format (`report::rfc3339`).
pub fn parse_rfc3339_ns(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = s.get(20..s.len() - 1).unwrap_or("");
    let mut nanos: u128 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        nanos += u128::from(c.checked_sub(b'0').filter(|d| *d < 10)?) * 10u128.pow(8 - i as u32);
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of rfc3339.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u128::try_from(secs).ok().map(|s| s * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_rfc3339_writes() {
        for ns in [0u128, 1_700_000_000_123_456_000, 951_782_400_000_000_000] {
            let s = crate::report::rfc3339(ns);
            assert_eq!(parse_rfc3339_ns(&s), Some(ns), "{s}");
        }
        assert_eq!(parse_rfc3339_ns("yesterday"), None);
    }

    struct Slow(Arc<AtomicUsize>);
    impl Writer for Slow {
        fn write(&mut self, _: &Record) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(50));
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn a_slow_sink_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new());
        let written = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&written);
        let reasons = Reasons {
            queue_full: "test_queue_full",
            write_failed: "test_write_failed",
        };
        let mut out =
            Output::start("test", reasons, Arc::clone(&metrics), move || Ok(Slow(w))).unwrap();
        let loss = Arc::new(LossRecord::new(
            String::new(),
            String::new(),
            Default::default(),
        ));
        let t = Instant::now();
        for _ in 0..(QUEUE + 100) {
            out.send(Record::Loss(Arc::clone(&loss)), &metrics);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "send blocked");
        let dropped = metrics
            .take_pending()
            .get("test_queue_full")
            .copied()
            .unwrap_or(0);
        // The thread may have taken one batch off the queue meanwhile.
        assert!(dropped >= (100 - BATCH - 1) as u64, "{dropped}");
        // Closing lets the thread finish the queue; a short deadline leaves it.
        assert!(!out.join(Instant::now() + Duration::from_millis(10)));
        let total = written.load(Ordering::Relaxed) as u64 + dropped;
        assert!(total <= (QUEUE + 100) as u64);
    }
}
