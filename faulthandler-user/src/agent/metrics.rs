//! Prometheus metrics (OpenMetrics text, `prometheus-client`), and the
//! agent-side drop counts that go into the next `loss` record: every drop
//! is counted once, by reason, in both.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::workers::Stats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReportLabels {
    pub kind: String,
    pub signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

type HistogramFamily = Family<SinkLabels, Histogram, fn() -> Histogram>;

/// Delivery to write: from a millisecond to about a minute.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub reports: Family<ReportLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
    pub suppressed: Counter,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub latency: HistogramFamily,
    pub watched: Gauge,
    pub open_files: Gauge,
    pub rss: Gauge,
    pub signatures: Gauge,
    pub ready: AtomicBool,
    /// Milliseconds since the epoch of the capture loop's last turn.
    pub heartbeat_ms: AtomicU64,
    /// Drops not yet in a loss record, by reason.
    pending: Mutex<BTreeMap<&'static str, u64>>,
    /// The workers' queue, read at scrape time.
    worker_stats: Mutex<Option<Arc<Stats>>>,
    /// Each output's queue depth, read at scrape time.
    outputs: Mutex<Vec<(&'static str, Arc<AtomicUsize>)>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rfh_trace");
        let reports = Family::<ReportLabels, Counter>::default();
        registry.register(
            "reports",
            "Reports written, by kind and signal",
            reports.clone(),
        );
        let dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "dropped",
            "Events, reports and records dropped, by reason (each drop counted once)",
            dropped.clone(),
        );
        let suppressed = Counter::default();
        registry.register(
            "crashes_suppressed",
            "Crashes counted but not reported in full (crash storm, per signature)",
            suppressed.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Items waiting: worker queue in bytes (workers_bytes), each sink's queue in records",
            queue_depth.clone(),
        );
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "report_latency_seconds",
            "From the signal's delivery to the report's write, by sink",
            latency.clone(),
        );
        let watched = Gauge::default();
        registry.register("watched_processes", "Processes tracked", watched.clone());
        let open_files = Gauge::default();
        registry.register(
            "open_files",
            "File descriptors the agent holds",
            open_files.clone(),
        );
        let rss = Gauge::default();
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the agent",
            rss.clone(),
        );
        let signatures = Gauge::default();
        registry.register(
            "storm_signatures",
            "Crash signatures in a rate-limit window",
            signatures.clone(),
        );
        Self {
            registry,
            reports,
            dropped,
            suppressed,
            queue_depth,
            latency,
            watched,
            open_files,
            rss,
            signatures,
            ready: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
            pending: Mutex::new(BTreeMap::new()),
            worker_stats: Mutex::new(None),
            outputs: Mutex::new(Vec::new()),
        }
    }

    /// One drop of `reason`: in the metrics now, in the next loss record.
    pub fn drop_one(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
        self.add_pending(reason, n);
    }

    /// Counts for the next loss record only (already in the metrics).
    pub fn add_pending(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            *p.entry(reason).or_default() += n;
        }
    }

    pub fn take_pending(&self) -> BTreeMap<&'static str, u64> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    pub fn watch_worker_queue(&self, stats: Arc<Stats>) {
        if let Ok(mut s) = self.worker_stats.lock() {
            *s = Some(stats);
        }
    }

    pub fn watch_output_queue(&self, name: &'static str, depth: Arc<AtomicUsize>) {
        if let Ok(mut o) = self.outputs.lock() {
            o.push((name, depth));
        }
    }

    /// The exposition, with the gauges that are sampled at scrape time.
    pub fn encode(&self) -> String {
        let gauge = |q: &str| {
            self.queue_depth.get_or_create(&QueueLabels {
                queue: q.to_string(),
            })
        };
        if let Ok(s) = self.worker_stats.lock()
            && let Some(s) = s.as_ref()
        {
            gauge("workers_bytes").set(s.queued_bytes.load(Ordering::Relaxed) as i64);
        }
        if let Ok(o) = self.outputs.lock() {
            for (name, depth) in o.iter() {
                gauge(name).set(depth.load(Ordering::Relaxed) as i64);
            }
        }
        self.rss.set(self_rss() as i64);
        self.open_files.set(self_fds() as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Resident bytes, from /proc/self/statm (pages).
pub fn self_rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * faulthandler_common::PAGE_SIZE as u64
}

pub fn self_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new();
        m.reports
            .get_or_create(&ReportLabels {
                kind: "crash".into(),
                signal: "SIGSEGV".into(),
            })
            .inc();
        m.drop_one("rate_limited", 3);
        m.latency
            .get_or_create(&SinkLabels {
                sink: "stdout".into(),
            })
            .observe(0.004);
        let text = m.encode();
        for needle in [
            "rfh_trace_reports_total{kind=\"crash\",signal=\"SIGSEGV\"} 1",
            "rfh_trace_dropped_total{reason=\"rate_limited\"} 3",
            "rfh_trace_crashes_suppressed_total 0",
            "rfh_trace_report_latency_seconds_bucket{le=\"0.008\",sink=\"stdout\"} 1",
            "rfh_trace_resident_memory_bytes ",
            "rfh_trace_open_files ",
            "rfh_trace_watched_processes ",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(m.take_pending().get("rate_limited"), Some(&3));
        assert!(m.take_pending().is_empty());
    }
}
