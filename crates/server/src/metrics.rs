//! Prometheus metrics of a kmsgate process, served on the admin listener's `/metrics` in the text exposition
//! format 0.0.4. The dispatcher counts operations, backend calls, caches and rate limits (core `metrics`);
//! this adds what only the server knows: requests by frontend, operation and wire code (counted once, in the
//! listener's middleware, from the labels each frontend attaches to its response), the HSM session pools, TLS
//! certificate expiry, credential ages and the replica count.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use kmsgate_core::metrics::{CoreMetrics, Histogram, WireLabels, escape, family};
use kmsgate_core::{Dispatcher, PageRequest, Timestamp};
use kmsgate_hsm::Pkcs11Backend;

/// `(frontend, operation, code)`: all `'static`, so the set of series is bounded by the code.
type RequestKey = (&'static str, &'static str, &'static str);

/// Credentials whose age is reported, by document kind.
pub const CREDENTIAL_KINDS: [&str; 2] =
    [kmsgate_xks::keystore::KIND_CREDENTIAL, kmsgate_alibaba::clientkey::KIND_CLIENT_KEY];

#[derive(Debug, Default, Clone, Copy)]
struct CredentialStat {
    count: u64,
    /// Age of the oldest credential of the kind, in seconds.
    max_age_secs: f64,
}

/// The process's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    core: Arc<CoreMetrics>,
    requests: RwLock<HashMap<RequestKey, Arc<Histogram>>>,
    pkcs11: Vec<Arc<Pkcs11Backend>>,
    /// `(listener, notAfter as Unix seconds)` of the configured server certificates.
    tls: Mutex<Vec<(&'static str, i64)>>,
    /// Live replicas sharing the store; negative until first counted.
    replicas: AtomicI64,
    credentials: Mutex<HashMap<&'static str, CredentialStat>>,
    start_time: f64,
}

impl Metrics {
    pub fn new(dispatcher: &Dispatcher, pkcs11: Vec<Arc<Pkcs11Backend>>) -> Self {
        Metrics {
            core: dispatcher.metrics().clone(),
            requests: RwLock::new(HashMap::new()),
            pkcs11,
            tls: Mutex::new(Vec::new()),
            replicas: AtomicI64::new(-1),
            credentials: Mutex::new(HashMap::new()),
            start_time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// Records one wire request.
    pub fn request(&self, labels: RequestKey, latency: Duration) {
        let found = self.requests.read().ok().and_then(|m| m.get(&labels).cloned());
        let series = match found {
            Some(s) => s,
            None => match self.requests.write() {
                Ok(mut m) => m.entry(labels).or_insert_with(|| Arc::new(Histogram::new())).clone(),
                Err(_) => return,
            },
        };
        series.observe(latency);
    }

    /// Registers the certificate of a listener, for the expiry gauge. Reads the leaf's notAfter.
    pub fn watch_certificate(&self, listener: &'static str, cert_pem: &std::path::Path) -> anyhow::Result<()> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let leaf = CertificateDer::pem_file_iter(cert_pem)?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{} holds no certificate", cert_pem.display()))??;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| anyhow::anyhow!("cannot parse the certificate {}: {e}", cert_pem.display()))?;
        let not_after = cert.validity().not_after.timestamp();
        if let Ok(mut t) = self.tls.lock() {
            t.retain(|(l, _)| *l != listener);
            t.push((listener, not_after));
        }
        Ok(())
    }

    pub fn set_replicas(&self, n: usize) {
        self.replicas.store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Refreshes the gauges that need the store: live replicas and credential ages. Called periodically (not
    /// per scrape: a scrape must stay cheap whatever the number of credentials).
    pub async fn refresh(&self, dispatcher: &Dispatcher, replica_window: Duration) {
        match dispatcher.live_replicas(replica_window).await {
            Ok(r) => self.set_replicas(r.len()),
            Err(e) => tracing::debug!(error = %e, "metrics: cannot count replicas"),
        }
        let now = Timestamp::now().0;
        for kind in CREDENTIAL_KINDS {
            let mut stat = CredentialStat::default();
            let mut page = PageRequest::first(1000);
            loop {
                let got = match dispatcher.list_documents(kind, None, &page).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %e, kind, "metrics: cannot list credentials");
                        return;
                    }
                };
                for d in &got.items {
                    stat.count += 1;
                    let age = (now.saturating_sub(d.created_at.0)).max(0) as f64 / 1000.0;
                    stat.max_age_secs = stat.max_age_secs.max(age);
                }
                match got.next {
                    Some(token) => page = PageRequest { after: Some(token), ..page },
                    None => break,
                }
            }
            if let Ok(mut c) = self.credentials.lock() {
                c.insert(kind, stat);
            }
        }
    }

    /// The whole exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        family(&mut out, "kmsgate_build_info", "gauge", "Always 1; the version is a label.");
        let _ = writeln!(out, "kmsgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        family(&mut out, "kmsgate_process_start_time_seconds", "gauge", "Start time of the process, Unix seconds.");
        let _ = writeln!(out, "kmsgate_process_start_time_seconds {}", self.start_time);

        let mut requests: Vec<(RequestKey, Arc<Histogram>)> = match self.requests.read() {
            Ok(m) => m.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        requests.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            &mut out,
            "kmsgate_requests_total",
            "counter",
            "Wire requests by frontend, operation and code (ok, or the wire error code answered).",
        );
        for ((f, o, c), h) in &requests {
            let _ = writeln!(
                out,
                "kmsgate_requests_total{{frontend=\"{f}\",operation=\"{}\",code=\"{}\"}} {}",
                escape(o),
                escape(c),
                h.count()
            );
        }
        family(
            &mut out,
            "kmsgate_request_duration_seconds",
            "histogram",
            "Wire request latency, from the request's arrival to its response head, by frontend, operation and code.",
        );
        for ((f, o, c), h) in &requests {
            let labels = format!("frontend=\"{f}\",operation=\"{}\",code=\"{}\"", escape(o), escape(c));
            h.render(&mut out, "kmsgate_request_duration_seconds", &labels);
        }

        self.core.render(&mut out);
        self.render_pools(&mut out);

        family(
            &mut out,
            "kmsgate_tls_certificate_expiry_seconds",
            "gauge",
            "Seconds until the notAfter of a listener's server certificate (negative once expired).",
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        if let Ok(t) = self.tls.lock() {
            for (listener, not_after) in t.iter() {
                let _ = writeln!(
                    out,
                    "kmsgate_tls_certificate_expiry_seconds{{listener=\"{listener}\"}} {}",
                    not_after.saturating_sub(now)
                );
            }
        }
        family(&mut out, "kmsgate_replicas", "gauge", "Replicas that heartbeat through the shared store recently.");
        let replicas = self.replicas.load(Ordering::Relaxed);
        if replicas >= 0 {
            let _ = writeln!(out, "kmsgate_replicas {replicas}");
        }
        let credentials: Vec<(&'static str, CredentialStat)> = match self.credentials.lock() {
            Ok(c) => {
                let mut v: Vec<_> = c.iter().map(|(k, s)| (*k, *s)).collect();
                v.sort_by_key(|(k, _)| *k);
                v
            }
            Err(_) => Vec::new(),
        };
        family(&mut out, "kmsgate_credentials", "gauge", "Stored caller credentials, by kind.");
        for (kind, s) in &credentials {
            let _ = writeln!(out, "kmsgate_credentials{{kind=\"{kind}\"}} {}", s.count);
        }
        family(
            &mut out,
            "kmsgate_credential_max_age_seconds",
            "gauge",
            "Age of the oldest stored credential of each kind (time since it was created), for rotation policies.",
        );
        for (kind, s) in &credentials {
            let _ = writeln!(out, "kmsgate_credential_max_age_seconds{{kind=\"{kind}\"}} {}", s.max_age_secs);
        }
        out
    }

    fn render_pools(&self, out: &mut String) {
        let pools: Vec<(String, kmsgate_hsm::PoolStatus)> =
            self.pkcs11.iter().map(|b| (escape(&b.config().name), b.pool_status())).collect();
        type Pick = fn(&kmsgate_hsm::PoolStatus) -> u64;
        let gauges: [(&str, &str, Pick); 4] = [
            ("kmsgate_hsm_pool_sessions", "Configured sessions (worker threads) of a PKCS#11 member's pool.", |p| {
                p.size as u64
            }),
            ("kmsgate_hsm_pool_sessions_open", "Sessions of the pool open now.", |p| p.open as u64),
            ("kmsgate_hsm_pool_sessions_in_use", "Sessions of the pool running a call now.", |p| p.in_use as u64),
            ("kmsgate_hsm_pool_waiters", "Calls queued for a session of the pool now.", |p| p.waiting as u64),
        ];
        for (name, help, pick) in gauges {
            family(out, name, "gauge", help);
            for (backend, p) in &pools {
                let _ = writeln!(out, "{name}{{backend=\"{backend}\"}} {}", pick(p));
            }
        }
        let counters: [(&str, &str, Pick); 2] = [
            ("kmsgate_hsm_pool_rejections_total", "Calls refused at once because the pool's queue was full.", |p| {
                p.rejected_queue_full
            }),
            (
                "kmsgate_hsm_pool_recoveries_total",
                "Re-initialisations of the PKCS#11 module that recovered the member.",
                |p| p.recoveries,
            ),
        ];
        for (name, help, pick) in counters {
            family(out, name, "counter", help);
            for (backend, p) in &pools {
                let _ = writeln!(out, "{name}{{backend=\"{backend}\"}} {}", pick(p));
            }
        }
    }
}

/// Middleware of the data listeners: counts every request under the labels its frontend attached, or under
/// `none` (probes, unknown routes) with the status class as code.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request<Body>, next: Next) -> Response {
    let started = Instant::now();
    let resp = next.run(req).await;
    let key = match resp.extensions().get::<WireLabels>() {
        Some(l) => (l.frontend.as_str(), l.operation, l.code),
        None => ("none", "none", status_code_label(resp.status())),
    };
    m.request(key, started.elapsed());
    resp
}

fn status_code_label(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "ok",
        400 => "http_400",
        401 => "http_401",
        403 => "http_403",
        404 => "http_404",
        405 => "http_405",
        413 => "http_413",
        415 => "http_415",
        429 => "http_429",
        500 => "http_500",
        503 => "http_503",
        _ if s.is_client_error() => "http_4xx",
        _ if s.is_server_error() => "http_5xx",
        _ => "http_other",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(status_code_label(StatusCode::OK), "ok");
        assert_eq!(status_code_label(StatusCode::NOT_FOUND), "http_404");
        assert_eq!(status_code_label(StatusCode::IM_A_TEAPOT), "http_4xx");
        assert_eq!(status_code_label(StatusCode::BAD_GATEWAY), "http_5xx");
    }
}
