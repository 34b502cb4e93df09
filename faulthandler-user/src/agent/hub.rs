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
        let signal = r.signal.as_ref().map_or_else(String::new, |s| s.name.clone());
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
