//! Metrics the dispatcher keeps, rendered in the Prometheus text exposition format (0.0.4) by whoever serves
//! them. Every series is a set of atomics resolved once: an operation's series are indexed by (frontend,
//! operation), a backend's by its position fixed when the dispatcher is built. Recording never locks or
//! allocates. Labels are bounded by construction: enum names and configured backend names, never key ids,
//! tenants, paths or request ids.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::audit::Operation;
use crate::error::ErrorKind;
use crate::model::Frontend;

/// Upper bounds of the latency histograms, in seconds: from a cached AES call to a slow HSM key generation.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram: one atomic per bucket (stored non-cumulative, summed when rendered), a count and a
/// sum in nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        // Counted last: a scrape that reads the count first never sees buckets above it (see `render`).
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes `name_bucket`, `name_sum` and `name_count` lines; `labels` is `a="x",b="y"` or empty.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let count = self.count.load(Ordering::Relaxed);
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            // A concurrent observation may have reached its bucket but not yet the count: clamp, so buckets
            // never exceed +Inf within one scrape.
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}", cumulative.min(count));
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value for the text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// How a frontend labels one wire request for the request metrics: it puts this in the response's extensions
/// and the listener counts the request under it. `&'static str` keeps the labels bounded: a frontend can only
/// name operations and codes it knows, never echo what a caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLabels {
    pub frontend: Frontend,
    /// The frontend's own operation name (`Encrypt`, `GetHealthStatus`...), or `unknown`.
    pub operation: &'static str,
    /// `ok`, or the wire error code the frontend answered with (`ValidationException`, `Rejected.Throttling`...).
    pub code: &'static str,
}

/// The `outcome` label values of operations: `ok`, then every distinct [`ErrorKind::as_str`].
const OUTCOMES: [&str; 24] = [
    "ok",
    "invalid_request",
    "unknown_operation",
    "authentication_failed",
    "request_time_skewed",
    "access_denied",
    "key_not_found",
    "alias_not_found",
    "already_exists",
    "invalid_key_state",
    "invalid_key_usage",
    "secret_not_found",
    "secret_version_not_found",
    "secret_exists",
    "version_conflict",
    "secret_expired",
    "invalid_ciphertext",
    "throttled",
    "quota_exceeded",
    "unsupported",
    "dependency_timeout",
    "dependency_failure",
    "storage_failure",
    "internal",
];

fn outcome_index(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::InvalidRequest => 1,
        ErrorKind::UnknownOperation => 2,
        ErrorKind::AuthenticationFailed => 3,
        ErrorKind::RequestTimeSkewed => 4,
        ErrorKind::AccessDenied => 5,
        ErrorKind::KeyNotFound => 6,
        ErrorKind::AliasNotFound => 7,
        ErrorKind::AlreadyExists => 8,
        ErrorKind::InvalidKeyState(_) => 9,
        ErrorKind::InvalidKeyUsage => 10,
        ErrorKind::SecretNotFound => 11,
        ErrorKind::SecretVersionNotFound => 12,
        ErrorKind::SecretExists => 13,
        ErrorKind::VersionConflict => 14,
        ErrorKind::SecretExpired => 15,
        ErrorKind::InvalidCiphertext => 16,
        ErrorKind::Throttled => 17,
        ErrorKind::QuotaExceeded => 18,
        ErrorKind::Unsupported => 19,
        ErrorKind::DependencyTimeout => 20,
        ErrorKind::DependencyFailure => 21,
        ErrorKind::StorageFailure => 22,
        ErrorKind::Internal => 23,
    }
}

/// The series of one (frontend, operation) pair.
#[derive(Debug)]
struct OpSeries {
    latency: Histogram,
    outcomes: [AtomicU64; OUTCOMES.len()],
}

impl OpSeries {
    const fn new() -> Self {
        OpSeries { latency: Histogram::new(), outcomes: [const { AtomicU64::new(0) }; OUTCOMES.len()] }
    }
}

/// Which resolution cache a hit or miss was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Key,
    Alias,
    Document,
}

impl CacheKind {
    const ALL: [CacheKind; 3] = [CacheKind::Key, CacheKind::Alias, CacheKind::Document];

    fn as_str(self) -> &'static str {
        match self {
            CacheKind::Key => "key",
            CacheKind::Alias => "alias",
            CacheKind::Document => "document",
        }
    }
}

/// What a backend call was: request-path cryptography or key generation (seconds in an HSM, kept apart so
/// it does not drown the request-path latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendCall {
    Crypto,
    Keygen,
}

/// Where a rate-limit rejection happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    /// The dispatcher's rate limiter (every frontend).
    Dispatcher,
    /// A frontend's own quota (e.g. an XKS key store's requests per second).
    Frontend,
}

#[derive(Debug)]
struct BackendSeries {
    name: String,
    /// Indexed by [`BackendCall`].
    latency: [Histogram; 2],
    timeouts: [AtomicU64; 2],
    errors: [AtomicU64; 2],
}

/// The dispatcher's metrics. Created by the dispatcher builder; shared with whoever renders them.
#[derive(Debug)]
pub struct CoreMetrics {
    ops: Box<[OpSeries]>,
    backends: Box<[BackendSeries]>,
    cache_hits: [AtomicU64; 3],
    cache_misses: [AtomicU64; 3],
    /// Indexed by frontend, then [`Limiter`].
    rate_limited: Box<[[AtomicU64; 2]]>,
}

impl CoreMetrics {
    /// Series for the named backends (fixed for the dispatcher's life).
    pub fn new<'a>(backends: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: Vec<String> = backends.into_iter().map(str::to_owned).collect();
        names.sort();
        CoreMetrics {
            ops: (0..Frontend::ALL.len() * Operation::ALL.len()).map(|_| OpSeries::new()).collect(),
            backends: names
                .into_iter()
                .map(|name| BackendSeries {
                    name,
                    latency: [Histogram::new(), Histogram::new()],
                    timeouts: [const { AtomicU64::new(0) }; 2],
                    errors: [const { AtomicU64::new(0) }; 2],
                })
                .collect(),
            cache_hits: [const { AtomicU64::new(0) }; 3],
            cache_misses: [const { AtomicU64::new(0) }; 3],
            rate_limited: (0..Frontend::ALL.len()).map(|_| [const { AtomicU64::new(0) }; 2]).collect(),
        }
    }

    fn op(&self, frontend: Frontend, op: Operation) -> Option<&OpSeries> {
        self.ops.get(frontend.index() * Operation::ALL.len() + op.index())
    }

    /// One finished operation (the dispatcher's `run` wrapper calls this).
    pub fn operation(&self, frontend: Frontend, op: Operation, latency: Duration, error: Option<ErrorKind>) {
        if let Some(s) = self.op(frontend, op) {
            s.latency.observe(latency);
            let i = error.map_or(0, outcome_index);
            s.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The index of a backend's series, resolved once per call site's backend lookup.
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.binary_search_by(|b| b.name.as_str().cmp(name)).ok()
    }

    /// One backend call: its latency, and whether it missed its deadline or failed.
    pub fn backend_call(&self, backend: Option<usize>, call: BackendCall, latency: Duration, timeout: bool, ok: bool) {
        let Some(s) = backend.and_then(|i| self.backends.get(i)) else { return };
        let c = call as usize;
        s.latency[c].observe(latency);
        if timeout {
            s.timeouts[c].fetch_add(1, Ordering::Relaxed);
        } else if !ok {
            s.errors[c].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn cache(&self, cache: CacheKind, hit: bool) {
        let counters = if hit { &self.cache_hits } else { &self.cache_misses };
        counters[cache as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A request refused by a rate limiter or quota before it cost anything.
    pub fn rate_limited(&self, frontend: Frontend, limiter: Limiter) {
        if let Some(s) = self.rate_limited.get(frontend.index()) {
            s[limiter as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Operations recorded for a (frontend, operation) pair so far (tests, diagnostics).
    pub fn operation_count(&self, frontend: Frontend, op: Operation) -> u64 {
        self.op(frontend, op).map_or(0, |s| s.latency.count())
    }

    /// Appends every family in the text exposition format. Families always appear (HELP/TYPE), series only
    /// once they have counted something, so an idle gateway's scrape stays small.
    pub fn render(&self, out: &mut String) {
        family(out, "kmsgate_operations_total", "counter", "Dispatcher operations by frontend, operation and outcome.");
        for (f, frontend) in Frontend::ALL.iter().enumerate() {
            for (o, op) in Operation::ALL.iter().enumerate() {
                let s = &self.ops[f * Operation::ALL.len() + o];
                for (i, outcome) in OUTCOMES.iter().enumerate() {
                    let n = s.outcomes[i].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "kmsgate_operations_total{{frontend=\"{}\",operation=\"{}\",outcome=\"{outcome}\"}} {n}",
                            frontend.as_str(),
                            op.as_str()
                        );
                    }
                }
            }
        }
        family(
            out,
            "kmsgate_operation_duration_seconds",
            "histogram",
            "Dispatcher operation latency (authorization, rate limit, store and backend calls) by frontend and operation.",
        );
        for (f, frontend) in Frontend::ALL.iter().enumerate() {
            for (o, op) in Operation::ALL.iter().enumerate() {
                let s = &self.ops[f * Operation::ALL.len() + o];
                if s.latency.count() > 0 {
                    let labels = format!("frontend=\"{}\",operation=\"{}\"", frontend.as_str(), op.as_str());
                    s.latency.render(out, "kmsgate_operation_duration_seconds", &labels);
                }
            }
        }
        family(
            out,
            "kmsgate_backend_call_duration_seconds",
            "histogram",
            "Key backend (HSM, software) call latency by backend and call type (crypto, keygen).",
        );
        for b in self.backends.iter() {
            for (call, name) in [(BackendCall::Crypto, "crypto"), (BackendCall::Keygen, "keygen")] {
                let labels = format!("backend=\"{}\",call=\"{name}\"", escape(&b.name));
                b.latency[call as usize].render(out, "kmsgate_backend_call_duration_seconds", &labels);
            }
        }
        family(
            out,
            "kmsgate_backend_call_failures_total",
            "counter",
            "Key backend calls that missed their deadline (reason=timeout) or failed in the backend (reason=error).",
        );
        for b in self.backends.iter() {
            for (call, name) in [(BackendCall::Crypto, "crypto"), (BackendCall::Keygen, "keygen")] {
                let c = call as usize;
                for (reason, n) in [("timeout", &b.timeouts[c]), ("error", &b.errors[c])] {
                    let _ = writeln!(
                        out,
                        "kmsgate_backend_call_failures_total{{backend=\"{}\",call=\"{name}\",reason=\"{reason}\"}} {}",
                        escape(&b.name),
                        n.load(Ordering::Relaxed)
                    );
                }
            }
        }
        family(out, "kmsgate_cache_hits_total", "counter", "Lookups answered by a resolution cache, by cache.");
        for c in CacheKind::ALL {
            let n = self.cache_hits[c as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "kmsgate_cache_hits_total{{cache=\"{}\"}} {n}", c.as_str());
        }
        family(out, "kmsgate_cache_misses_total", "counter", "Lookups that went to the store, by cache.");
        for c in CacheKind::ALL {
            let n = self.cache_misses[c as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "kmsgate_cache_misses_total{{cache=\"{}\"}} {n}", c.as_str());
        }
        family(
            out,
            "kmsgate_rate_limited_total",
            "counter",
            "Requests refused by a rate limiter or quota, by frontend and limiter (dispatcher, frontend).",
        );
        for (f, frontend) in Frontend::ALL.iter().enumerate() {
            for (l, limiter) in ["dispatcher", "frontend"].iter().enumerate() {
                let n = self.rate_limited[f][l].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "kmsgate_rate_limited_total{{frontend=\"{}\",limiter=\"{limiter}\"}} {n}",
                        frontend.as_str()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn outcome_labels_are_the_error_kind_names() {
        for &k in ErrorKind::ALL {
            assert_eq!(OUTCOMES[outcome_index(k)], k.as_str());
        }
        assert_eq!(OUTCOMES.len(), 1 + OUTCOMES[1..].len());
    }

    #[test]
    fn indices_follow_the_all_lists() {
        for (i, f) in Frontend::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
        for (i, o) in Operation::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
    }

    #[test]
    fn histogram_is_cumulative_and_consistent() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "a=\"b\"");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count{a=\"b\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum{a=\"b\"} 60.0033\n"), "{out}");
    }

    #[test]
    fn records_and_renders_bounded_series() {
        let m = CoreMetrics::new(["software", "hsm-a"]);
        m.operation(Frontend::Xks, Operation::Encrypt, Duration::from_millis(2), None);
        m.operation(Frontend::Xks, Operation::Encrypt, Duration::from_millis(2), Some(ErrorKind::KeyNotFound));
        let hsm = m.backend_index("hsm-a");
        assert!(hsm.is_some() && m.backend_index("nope").is_none());
        m.backend_call(hsm, BackendCall::Crypto, Duration::from_millis(1), true, false);
        m.cache(CacheKind::Key, true);
        m.cache(CacheKind::Alias, false);
        m.rate_limited(Frontend::Xks, Limiter::Frontend);
        let mut out = String::new();
        m.render(&mut out);
        for needle in [
            "kmsgate_operations_total{frontend=\"xks\",operation=\"Encrypt\",outcome=\"ok\"} 1\n",
            "kmsgate_operations_total{frontend=\"xks\",operation=\"Encrypt\",outcome=\"key_not_found\"} 1\n",
            "kmsgate_operation_duration_seconds_count{frontend=\"xks\",operation=\"Encrypt\"} 2\n",
            "kmsgate_backend_call_failures_total{backend=\"hsm-a\",call=\"crypto\",reason=\"timeout\"} 1\n",
            "kmsgate_backend_call_duration_seconds_count{backend=\"software\",call=\"keygen\"} 0\n",
            "kmsgate_cache_hits_total{cache=\"key\"} 1\n",
            "kmsgate_cache_misses_total{cache=\"alias\"} 1\n",
            "kmsgate_rate_limited_total{frontend=\"xks\",limiter=\"frontend\"} 1\n",
        ] {
            assert!(out.contains(needle), "missing {needle}\n{out}");
        }
        assert!(!out.contains("operation=\"Decrypt\""), "untouched series stay out of the scrape");
    }
}
