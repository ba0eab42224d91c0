//! Per-ClientKey QPS limits: a token bucket per ClientKey, refilled at the limit and holding at most one
//! second's worth, so a client may burst up to its limit and then sustain it. Requests over it get
//! 429 `Rejected.Throttling`, which the SDKs retry a second later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of the ClientKeys seen so far (bounded by the registered ClientKeys: only authenticated
/// requests reach it).
#[derive(Debug, Default)]
pub struct QpsLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl QpsLimiter {
    /// Takes one request from `key`'s budget of `qps` per second; false when it is exhausted.
    pub fn admit(&self, key: &str, qps: u32, now: Instant) -> bool {
        let rate = f64::from(qps.max(1));
        // A poisoned lock only means another request panicked mid-update; the counts are still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let b = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: rate, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_to_the_limit_then_refills_at_it() {
        let l = QpsLimiter::default();
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.admit("a", 3, t0)));
        assert!(!l.admit("a", 3, t0), "the fourth within the same instant is over");
        assert!(l.admit("b", 3, t0), "keys have separate budgets");
        assert!(!l.admit("a", 3, t0 + Duration::from_millis(300)));
        assert!(l.admit("a", 3, t0 + Duration::from_millis(340)), "one token back after a third of a second");
        assert!((0..3).all(|_| l.admit("a", 3, t0 + Duration::from_secs(5))), "never more than one second's worth");
        assert!(!l.admit("a", 3, t0 + Duration::from_secs(5)));
    }
}
