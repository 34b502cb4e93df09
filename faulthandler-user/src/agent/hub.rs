//! The agent's one sink, as the workers see it: it stamps each report
//! with the node and the process's container and pod identity, signs
//! crashes, lets the storm limiter decide, and fans records out to the
//! sinks' queues. Loss records carry the agent's own drops too.

use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    identity::{self, Pods},
    metrics::{Metrics, ReportLabels},
    outputs::{Output, Record},
    signature::signature,
    storm::{Storm, Verdict},
};
use crate::{
    report::{K8s, Kind, LossRecord, Report, rfc3339},
    sink::Sink,
};

/// Agent-side drops wait at most this long for a loss record.
const LOSS_EVERY: Duration = Duration::from_secs(5);

pub struct Hub {
    node: String,
    host: String,
    pods: Pods,
    storm: Storm,
    outputs: Vec<Output>,
    metrics: Arc<Metrics>,
    last_loss: Instant,
}

impl Hub {
    pub fn new(
        node: String,
        pods: Pods,
        storm: Storm,
        outputs: Vec<Output>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            host: crate::watch::host_name(),
            pods,
            storm,
            outputs,
            metrics,
            last_loss: Instant::now(),
        }
    }

    fn send(&self, rec: &Record) {
        for o in &self.outputs {
            o.send(rec.clone(), &self.metrics);
        }
    }

    /// Node, container and pod identity.
    fn identify(&mut self, r: &mut Report, now: Instant) {
        r.node = Some(self.node.clone());
        let id = r
            .process
            .cgroup
            .as_deref()
            .map(identity::from_cgroup)
            .unwrap_or_default();
        if id.container_id.is_some() {
            r.process.container_id = id.container_id;
        }
        let k8s = id.pod_uid.map(|uid| {
            self.pods
                .k8s(&uid, r.process.container_id.as_deref(), now)
                .unwrap_or(K8s {
                    pod_uid: Some(uid),
                    ..K8s::default()
                })
        });
        // Always present in agent reports: all-null outside a pod.
        r.process.k8s = Some(k8s.unwrap_or_default());
    }

    pub fn report(&mut self, report: &Report) {
        let now = Instant::now();
        let mut r = report.clone();
        self.identify(&mut r, now);
        if r.kind == Kind::Crash {
            r.signature = signature(&r);
            let key = r.signature.clone().unwrap_or_default();
            let (verdict, evicted) = self.storm.admit(&key, now);
            self.metrics.add_pending("suppressed", evicted);
            self.metrics.signatures.set(self.storm.signatures() as i64);
            match verdict {
                Verdict::Report { suppressed } => {
                    r.suppressed = (suppressed > 0).then_some(suppressed);
                }
                Verdict::Suppressed => {
                    self.metrics.suppressed.inc();
                    return;
                }
                Verdict::RateLimited => {
                    self.metrics.drop_one("rate_limited", 1);
                    return;
                }
            }
        }
        let signal = r
            .signal
            .as_ref()
            .map_or_else(String::new, |s| s.name.clone());
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.metrics
            .reports
            .get_or_create(&ReportLabels { kind, signal })
            .inc();
        self.send(&Record::Report(Arc::new(r)));
    }

    /// A loss record of the watcher (kernel and worker drops), with the
    /// agent's own drops since the last one added.
    pub fn loss(&mut self, loss: &LossRecord) {
        for (reason, n) in &loss.lost {
            self.metrics
                .dropped
                .get_or_create(&super::metrics::ReasonLabels {
                    reason: (*reason).to_string(),
                })
                .inc_by(*n);
        }
        let mut l = loss.clone();
        merge(&mut l.lost, self.metrics.take_pending());
        self.write_loss(l);
    }

    fn write_loss(&mut self, mut l: LossRecord) {
        l.node = Some(self.node.clone());
        l.lost_events = l.lost.values().sum();
        self.last_loss = Instant::now();
        self.send(&Record::Loss(Arc::new(l)));
    }

    fn own_loss_record(&mut self, lost: BTreeMap<&'static str, u64>) -> LossRecord {
        let now = crate::watch::clock_ns(libc::CLOCK_REALTIME).max(0) as u128;
        LossRecord::new(rfc3339(now), self.host.clone(), lost)
    }

    /// Every few seconds: counts of signatures whose window ended without
    /// another report, and the agent's drops, go out in a loss record.
    pub fn tick(&mut self, now: Instant) {
        let expired = self.storm.take_expired(now, false);
        self.metrics.add_pending("suppressed", expired);
        self.metrics.signatures.set(self.storm.signatures() as i64);
        if now.duration_since(self.last_loss) < LOSS_EVERY {
            return;
        }
        let pending = self.metrics.take_pending();
        if !pending.is_empty() {
            let l = self.own_loss_record(pending);
            self.write_loss(l);
        }
    }

    /// The final loss record (always written, empty when nothing was
    /// lost), then the sinks finish what is queued, until `deadline`.
    /// Returns the sinks that did not finish in time.
    pub fn finish(mut self, deadline: Instant) -> Vec<&'static str> {
        let all = self.storm.take_expired(Instant::now(), true);
        self.metrics.add_pending("suppressed", all);
        let pending = self.metrics.take_pending();
        let l = self.own_loss_record(pending);
        self.write_loss(l);
        let mut late = Vec::new();
        for o in &mut self.outputs {
            o.close();
        }
        for o in &mut self.outputs {
            if !o.join(deadline) {
                late.push(o.name());
            }
        }
        late
    }
}

fn merge(into: &mut BTreeMap<&'static str, u64>, from: BTreeMap<&'static str, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// The hub behind the workers' `Sink` trait; the agent keeps another
/// handle for its timers and the final record.
pub struct HubSink(pub Arc<Mutex<Option<Hub>>>);

impl Sink for HubSink {
    fn report(&mut self, report: &Report) -> io::Result<()> {
        if let Ok(mut h) = self.0.lock()
            && let Some(h) = h.as_mut()
        {
            h.report(report);
        }
        Ok(())
    }

    fn loss(&mut self, loss: &LossRecord) -> io::Result<()> {
        if let Ok(mut h) = self.0.lock()
            && let Some(h) = h.as_mut()
        {
            h.loss(loss);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::agent::{
        outputs::{Reasons, Writer},
        signature::tests::crash,
    };

    struct Keep(Arc<StdMutex<Vec<serde_json::Value>>>);
    impl Writer for Keep {
        fn write(&mut self, rec: &Record) -> io::Result<()> {
            let v = match rec {
                Record::Report(r) => serde_json::to_value(&**r),
                Record::Loss(l) => serde_json::to_value(&**l),
            };
            self.0.lock().unwrap().push(v.map_err(io::Error::other)?);
            Ok(())
        }
    }

    fn hub(per_signature: u32) -> (Hub, Arc<StdMutex<Vec<serde_json::Value>>>, Arc<Metrics>) {
        let kept = Arc::new(StdMutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::new());
        let k = Arc::clone(&kept);
        let reasons = Reasons {
            queue_full: "test_queue_full",
            write_failed: "test_write_failed",
        };
        let out =
            Output::start("test", reasons, Arc::clone(&metrics), move || Ok(Keep(k))).unwrap();
        let storm = Storm::new(per_signature, Duration::from_secs(3600), 1000.0, 1000);
        let dir = std::env::temp_dir().join("rfh-no-such-pods-dir");
        let h = Hub::new(
            "node-x".into(),
            Pods::new(&dir),
            storm,
            vec![out],
            Arc::clone(&metrics),
        );
        (h, kept, metrics)
    }

    #[test]
    fn stamps_identity_and_counts_every_storm_crash() {
        let (mut h, kept, metrics) = hub(2);
        let mut r = crash(0x5555_0000_0000, &[Some("crash_here"), Some("main")]);
        let id = "3f4c0b8e9a1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b";
        r.process.cgroup = Some(format!(
            "/kubepods/burstable/pod0d7a9e3c-51b2-4c8e-9f6a-2b1d3e4f5a6b/{id}"
        ));
        for _ in 0..5 {
            h.report(&r);
        }
        // The watcher's own loss record gets the agent's counts merged.
        let mut lost = BTreeMap::new();
        lost.insert("ring_full", 2u64);
        h.loss(&LossRecord::new("t".into(), "h".into(), lost));
        let late = h.finish(Instant::now() + Duration::from_secs(5));
        assert!(late.is_empty());
        let kept = kept.lock().unwrap();
        let reports: Vec<_> = kept.iter().filter(|v| v["kind"] == "crash").collect();
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r["node"], "node-x");
            assert_eq!(r["process"]["container_id"], id);
            assert_eq!(
                r["process"]["k8s"]["pod_uid"],
                "0d7a9e3c-51b2-4c8e-9f6a-2b1d3e4f5a6b"
            );
            assert!(r["signature"].as_str().unwrap().starts_with("v1-"));
        }
        let losses: Vec<_> = kept.iter().filter(|v| v["kind"] == "loss").collect();
        assert_eq!(losses.len(), 2, "the watcher's, then the final one");
        assert_eq!(losses[0]["lost"]["ring_full"], 2);
        assert_eq!(losses[0]["node"], "node-x");
        // 3 suppressed crashes, never carried by a report: the final record.
        assert_eq!(losses[1]["lost"]["suppressed"], 3);
        assert_eq!(losses[1]["lost_events"], 3);
        let text = metrics.encode();
        assert!(
            text.contains("rfh_trace_crashes_suppressed_total 3"),
            "{text}"
        );
        assert!(
            text.contains("rfh_trace_dropped_total{reason=\"ring_full\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn the_final_loss_record_is_written_when_nothing_was_lost() {
        let (h, kept, _) = hub(5);
        assert!(h.finish(Instant::now() + Duration::from_secs(5)).is_empty());
        let kept = kept.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0]["kind"], "loss");
        assert_eq!(kept[0]["lost_events"], 0);
    }
}
