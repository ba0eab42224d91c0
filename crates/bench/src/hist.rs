//! Latency recording: an HDR histogram in microseconds (1 µs to 60 s, 3 significant digits), one per
//! connection so recording never takes a lock, merged when the run ends.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram tracks; slower responses are clamped to it (and still counted).
pub const MAX_TRACKED: Duration = Duration::from_secs(60);

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Latency {
    /// An empty histogram. Only fails if hdrhistogram rejected its constant bounds, which a unit test rules out.
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        // 3 significant digits keep every percentile within 0.1 % of the true value.
        let h = Histogram::new_with_bounds(1, MAX_TRACKED.as_micros() as u64, 3)?;
        Ok(Latency { h })
    }

    /// Records one latency. Sub-microsecond values count as 1 µs, values above [`MAX_TRACKED`] as the maximum.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, self.h.high());
        self.h.saturating_record(us);
    }

    pub fn add(&mut self, other: &Latency) {
        // Both come from `new`, so the bounds match; saturating keeps a mismatch from losing counts.
        if self.h.add(&other.h).is_err() {
            for v in other.h.iter_recorded() {
                let _ = self.h.record_n(v.value_iterated_to().min(self.h.high()), v.count_at_value());
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The latency below which `q` (0..=1) of the samples fall, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.h.value_at_quantile(q)
    }

    pub fn summary(&self) -> Summary {
        if self.h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.h.len(),
            mean_us: self.h.mean(),
            p50_us: self.h.value_at_quantile(0.50),
            p90_us: self.h.value_at_quantile(0.90),
            p99_us: self.h.value_at_quantile(0.99),
            p999_us: self.h.value_at_quantile(0.999),
            max_us: self.h.max(),
        }
    }
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Human form of a latency in microseconds: `850µs`, `1.27ms`, `2.4s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn within(actual: u64, expected: u64, rel: f64) -> bool {
        (actual as f64 - expected as f64).abs() <= expected as f64 * rel
    }

    #[test]
    fn uniform_percentiles() {
        let mut l = Latency::new().unwrap();
        for us in 1..=10_000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        // 3 significant digits: each reported value is within 0.1 % of the exact order statistic.
        for (got, want) in [(s.p50_us, 5_000), (s.p90_us, 9_000), (s.p99_us, 9_900), (s.p999_us, 9_990)] {
            assert!(within(got, want, 0.001), "got {got}, want {want}");
        }
        assert!(within(s.max_us, 10_000, 0.001), "{}", s.max_us);
        assert!((s.mean_us - 5_000.5).abs() < 5.0, "{}", s.mean_us);
    }

    #[test]
    fn tail_is_not_averaged_away() {
        // 990 fast and 10 slow requests: p99 still sees the fast ones, p99.9 and max the slow ones.
        let mut l = Latency::new().unwrap();
        for _ in 0..990 {
            l.record(Duration::from_millis(1));
        }
        for _ in 0..10 {
            l.record(Duration::from_millis(100));
        }
        let s = l.summary();
        assert!(within(s.p50_us, 1_000, 0.001));
        assert!(within(s.p99_us, 1_000, 0.001), "{}", s.p99_us);
        assert!(within(s.p999_us, 100_000, 0.001), "{}", s.p999_us);
        assert!(within(s.max_us, 100_000, 0.001));
    }

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let mut a = Latency::new().unwrap();
        let mut b = Latency::new().unwrap();
        for _ in 0..100 {
            a.record(Duration::from_micros(200));
        }
        for _ in 0..300 {
            b.record(Duration::from_micros(800));
        }
        a.add(&b);
        let s = a.summary();
        assert_eq!(s.count, 400);
        assert!(within(s.p50_us, 800, 0.001), "{}", s.p50_us);
        assert!(within(a.quantile_us(0.25), 200, 0.001));
        assert!((s.mean_us - 650.0).abs() < 1.0);
    }

    #[test]
    fn clamping_and_empty() {
        let mut l = Latency::new().unwrap();
        assert_eq!(l.summary(), Summary::default());
        l.record(Duration::from_nanos(10));
        l.record(Duration::from_secs(3600));
        assert_eq!(l.count(), 2);
        assert_eq!(l.quantile_us(0.0), 1);
        assert!(within(l.summary().max_us, MAX_TRACKED.as_micros() as u64, 0.001));
    }

    #[test]
    fn human_units() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(1_270), "1.27ms");
        assert_eq!(fmt_us(24_000), "24.0ms");
        assert_eq!(fmt_us(2_400_000), "2.40s");
    }
}
