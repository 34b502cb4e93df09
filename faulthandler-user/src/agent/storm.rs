//! Crash storms: per signature, the first few crashes of a window are
//! reported in full and the rest counted (the next full report of that
//! signature carries the count as `suppressed`); a global token bucket
//! caps full reports over all signatures. Pure: time comes in as an
//! argument.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Signatures tracked at once; past this, those whose window has ended
/// are forgotten (their counts first handed to a loss record).
const MAX_SIGNATURES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Report it in full; `suppressed` crashes of its signature were
    /// counted since its last full report.
    Report { suppressed: u64 },
    /// Over its signature's budget for this window: counted.
    Suppressed,
    /// Over the global rate: counted as `rate_limited`.
    RateLimited,
}

struct SigState {
    window_start: Instant,
    reported: u32,
    /// Counted but not yet carried by a report or a loss record.
    pending: u64,
}

pub struct Storm {
    per_signature: u32,
    window: Duration,
    rate: f64,
    burst: f64,
    tokens: f64,
    last_refill: Option<Instant>,
    signatures: HashMap<String, SigState>,
}

impl Storm {
    pub fn new(per_signature: u32, window: Duration, rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_signature,
            window,
            rate,
            burst,
            tokens: burst,
            last_refill: None,
            signatures: HashMap::new(),
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last_refill {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last_refill = Some(now);
    }

    /// Decides what happens to one crash of `signature`. Suppressed
    /// counts that `evicted` returns must go into a loss record.
    pub fn admit(&mut self, signature: &str, now: Instant) -> (Verdict, u64) {
        self.refill(now);
        let mut evicted = 0;
        if !self.signatures.contains_key(signature) && self.signatures.len() >= MAX_SIGNATURES {
            evicted = self.take_expired(now, true);
        }
        let window = self.window;
        let st = self
            .signatures
            .entry(signature.to_string())
            .or_insert(SigState {
                window_start: now,
                reported: 0,
                pending: 0,
            });
        if now.saturating_duration_since(st.window_start) >= window {
            st.window_start = now;
            st.reported = 0;
        }
        if st.reported >= self.per_signature {
            st.pending += 1;
            return (Verdict::Suppressed, evicted);
        }
        if self.tokens < 1.0 {
            return (Verdict::RateLimited, evicted);
        }
        self.tokens -= 1.0;
        st.reported += 1;
        let suppressed = std::mem::take(&mut st.pending);
        (Verdict::Report { suppressed }, evicted)
    }

    /// Hands over the pending counts of signatures whose window has ended
    /// (`all`: of every signature, at shutdown) and forgets those.
    pub fn take_expired(&mut self, now: Instant, all: bool) -> u64 {
        let window = self.window;
        let mut taken = 0;
        self.signatures.retain(|_, st| {
            let expired = now.saturating_duration_since(st.window_start) >= window;
            if expired || all {
                taken += std::mem::take(&mut st.pending);
            }
            !expired
        });
        taken
    }

    pub fn signatures(&self) -> usize {
        self.signatures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_few_per_window_then_counted_then_carried() {
        let t = Instant::now();
        let mut s = Storm::new(2, Duration::from_secs(10), 1000.0, 1000);
        assert_eq!(s.admit("a", t).0, Verdict::Report { suppressed: 0 });
        assert_eq!(s.admit("a", t).0, Verdict::Report { suppressed: 0 });
        for _ in 0..5 {
            assert_eq!(s.admit("a", t).0, Verdict::Suppressed);
        }
        // Another signature is not affected.
        assert_eq!(s.admit("b", t).0, Verdict::Report { suppressed: 0 });
        // Next window: the first report carries the count.
        let t2 = t + Duration::from_secs(10);
        assert_eq!(s.admit("a", t2).0, Verdict::Report { suppressed: 5 });
        assert_eq!(s.admit("a", t2).0, Verdict::Report { suppressed: 0 });
        assert_eq!(s.admit("a", t2).0, Verdict::Suppressed);
        // Window over with no report of it: the count goes to a loss record.
        assert_eq!(s.take_expired(t2 + Duration::from_secs(1), false), 0);
        assert_eq!(s.take_expired(t2 + Duration::from_secs(10), false), 1);
        assert_eq!(s.signatures(), 0);
    }

    #[test]
    fn global_rate_limit_on_top() {
        let t = Instant::now();
        let mut s = Storm::new(100, Duration::from_secs(60), 2.0, 3);
        let verdicts: Vec<Verdict> = (0..5).map(|i| s.admit(&format!("s{i}"), t).0).collect();
        let reported = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Report { .. }))
            .count();
        assert_eq!(reported, 3);
        assert_eq!(verdicts[4], Verdict::RateLimited);
        // Half a second refills one token at 2/s.
        let t1 = t + Duration::from_millis(500);
        assert!(matches!(s.admit("x", t1).0, Verdict::Report { .. }));
        assert_eq!(s.admit("y", t1).0, Verdict::RateLimited);
    }

    #[test]
    fn every_crash_is_reported_or_counted() {
        let t = Instant::now();
        let mut s = Storm::new(5, Duration::from_secs(1), 50.0, 20);
        let (mut reported, mut carried, mut suppressed, mut limited) = (0u64, 0u64, 0u64, 0u64);
        for i in 0..1000u64 {
            let now = t + Duration::from_millis(i * 10);
            let (v, evicted) = s.admit(if i % 3 == 0 { "x" } else { "y" }, now);
            carried += evicted;
            match v {
                Verdict::Report { suppressed: n } => {
                    reported += 1;
                    carried += n;
                }
                Verdict::Suppressed => suppressed += 1,
                Verdict::RateLimited => limited += 1,
            }
        }
        carried += s.take_expired(t + Duration::from_secs(100), true);
        assert_eq!(reported + suppressed + limited, 1000);
        assert_eq!(
            carried, suppressed,
            "every suppressed crash is carried once"
        );
    }
}
