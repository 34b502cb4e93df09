//! Nothing lost silently: every drop has one cause and one counter, read
//! every poll, reported per report (`lost_events`), in `loss` records, and
//! in one line on stderr at exit.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use faulthandler_common::{COUNTER_NAMES, COUNTERS};

/// The cause whose drops each report counts for itself.
const PINNED: &str = "threads_ring_full";

/// At most one loss record per this interval (a storm of drops would
/// otherwise be a storm of records); the last one is always written.
const RECORD_EVERY: Duration = Duration::from_secs(1);

/// Drops counted in userspace, after the ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserDrops {
    /// A job the workers had no room for: a whole report.
    pub queue_full: u64,
    /// A report or loss record a sink failed to write.
    pub write_failed: u64,
    /// A ring record that did not decode.
    pub decode_failed: u64,
}

#[derive(Debug)]
pub struct Losses {
    /// Running totals by cause, kernel and userspace.
    totals: BTreeMap<&'static str, u64>,
    /// What the last loss record covered.
    recorded: BTreeMap<&'static str, u64>,
    /// Sum of all totals when the last report was made.
    at_last_report: u64,
    last_record: Option<Instant>,
}

impl Losses {
    pub fn new() -> Self {
        Self {
            totals: BTreeMap::new(),
            recorded: BTreeMap::new(),
            at_last_report: 0,
            last_record: None,
        }
    }

    /// Takes the latest running totals.
    pub fn update(&mut self, kernel: &[u64; COUNTERS as usize], user: UserDrops) {
        for (name, &n) in COUNTER_NAMES.iter().zip(kernel) {
            self.set(name, n);
        }
        self.set("queue_full", user.queue_full);
        self.set("write_failed", user.write_failed);
        self.set("decode_failed", user.decode_failed);
    }

    fn set(&mut self, name: &'static str, n: u64) {
        if n > 0 {
            self.totals.insert(name, n);
        }
    }

    fn sum(&self) -> u64 {
        self.totals.values().sum()
    }

    /// Drops since the previous report, for the next one's `lost_events`.
    pub fn take_for_report(&mut self) -> u64 {
        let sum = self.sum();
        let n = sum - self.at_last_report.min(sum);
        self.at_last_report = sum;
        n
    }

    /// Counts by cause since the previous loss record, when there are any
    /// and a record is due (`force` at exit). Threads lost from a report
    /// are in that report (`threads_lost`), not here.
    pub fn take_record(
        &mut self,
        now: Instant,
        force: bool,
    ) -> Option<BTreeMap<&'static str, u64>> {
        let due = force
            || self
                .last_record
                .is_none_or(|t| now.duration_since(t) >= RECORD_EVERY);
        if !due {
            return None;
        }
        let delta: BTreeMap<&'static str, u64> = self
            .totals
            .iter()
            .filter(|&(&k, _)| k != PINNED)
            .filter_map(|(&k, &v)| {
                let d = v - self.recorded.get(k).copied().unwrap_or(0).min(v);
                (d > 0).then_some((k, d))
            })
            .collect();
        if delta.is_empty() {
            return None;
        }
        self.recorded = self.totals.clone();
        self.last_record = Some(now);
        Some(delta)
    }

    /// Takes back a record that could not be queued, so the next one
    /// covers its counts too.
    pub fn unrecord(&mut self, delta: &BTreeMap<&'static str, u64>) {
        for (k, d) in delta {
            if let Some(v) = self.recorded.get_mut(k) {
                *v = v.saturating_sub(*d);
            }
        }
    }

    /// `lost 550 ring_full, 2 write_failed` over the whole run, or None.
    pub fn summary(&self) -> Option<String> {
        if self.totals.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .totals
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        Some(format!(
            "lost during this run: {} (see docs/report-format.md, \"Losses\")",
            parts.join(", ")
        ))
    }
}

impl Default for Losses {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_deltas_once_and_reports_count_since_last() {
        let t = Instant::now();
        let mut l = Losses::new();
        assert!(l.take_record(t, true).is_none(), "nothing lost, no record");
        let mut k = [0u64; COUNTERS as usize];
        k[0] = 5;
        l.update(&k, UserDrops::default());
        assert_eq!(l.take_for_report(), 5);
        assert_eq!(l.take_for_report(), 0);
        let r = l.take_record(t, false).unwrap();
        assert_eq!(r.get("ring_full"), Some(&5));
        // Within a second: not due; forced: due, but nothing new.
        k[0] = 7;
        l.update(
            &k,
            UserDrops {
                queue_full: 1,
                ..UserDrops::default()
            },
        );
        assert!(l.take_record(t, false).is_none());
        let r = l.take_record(t + RECORD_EVERY, false).unwrap();
        assert_eq!(r.get("ring_full"), Some(&2));
        assert_eq!(r.get("queue_full"), Some(&1));
        assert!(l.take_record(t + RECORD_EVERY * 3, true).is_none());
        // A record that could not be queued is taken back whole.
        k[0] = 9;
        l.update(&k, UserDrops::default());
        let r = l.take_record(t + RECORD_EVERY * 3, true).unwrap();
        l.unrecord(&r);
        assert_eq!(l.take_record(t + RECORD_EVERY * 3, true), Some(r));
        // Threads lost from a report are that report's to say.
        k[1] = 3;
        l.update(&k, UserDrops::default());
        assert!(l.take_record(t + RECORD_EVERY * 4, true).is_none());
        assert_eq!(
            l.summary().unwrap(),
            "lost during this run: 1 queue_full, 9 ring_full, 3 threads_ring_full (see docs/report-format.md, \"Losses\")"
        );
    }
}
