//! Listeners: TCP, optional rustls (HTTP/1.1 and h2 by ALPN, optional client certificates), hyper-util's
//! auto builder, graceful drain on shutdown, and a request id on every request and every log line of it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use kmsgate_core::Dispatcher;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::Instrument;

/// What a frontend may want to know about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The verified client certificate chain (leaf first), when the listener does mutual TLS.
    pub client_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    pub tls: bool,
}

/// The request id of the current request (from `X-Request-ID`, or generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub const REQUEST_ID: &str = "x-request-id";

/// The probe routes every data listener also serves (the admin listener has its own, see `admin`).
pub fn health_routes(dispatcher: Dispatcher) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(dispatcher)
}

pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

async fn readyz(State(d): State<Dispatcher>) -> Response {
    readiness(&d).await
}

/// The readiness answer: 200 when the store and at least one backend work, 503 otherwise, with the detail.
pub async fn readiness(d: &Dispatcher) -> Response {
    let report = d.readiness().await;
    let status = if report.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if report.ready() { "ready" } else { "not_ready" },
        "store": if report.store_ok { "ok" } else { "unavailable" },
        "backends": report.members,
    });
    (status, axum::Json(body)).into_response()
}

/// Adds the request id, the request span, and one access-log line per request.
pub async fn request_context(mut req: Request<Body>, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = crate::telemetry::request_span(&id, req.method(), req.uri().path());
    crate::telemetry::set_parent_from_headers(&span, req.headers());
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    crate::telemetry::record_response(&span, &resp);
    span.in_scope(|| {
        tracing::info!(
            target: "access",
            status = resp.status().as_u16(),
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().entry(REQUEST_ID).or_insert(v);
    }
    resp
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains in-flight requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> anyhow::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends are transient: back off instead of spinning or dying.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let info = ConnInfo { peer, client_certs: None, tls: false };
                    let svc = connection_service(router, info);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certs = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
                    let info = ConnInfo { peer, client_certs: certs, tls: true };
                    let svc = connection_service(router, info);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period elapsed with connections still open"),
    }
    Ok(())
}

fn connection_service(
    router: Router,
    info: ConnInfo,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
        Request<hyper::body::Incoming>,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone,
> {
    let svc = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info.clone());
        // Frontends outside this crate (the secrets API's IP conditions and per-IP limits) read the peer here.
        req.extensions_mut().insert(axum::extract::ConnectInfo(info.peer));
        router.clone().oneshot(req.map(Body::new))
    });
    hyper_util::service::TowerToHyperService::new(svc)
}

/// Builds the rustls configuration of a listener: TLS 1.2+ with the aws-lc-rs provider, ALPN h2 and
/// http/1.1, and client certificate verification when a client CA is configured.
pub fn tls_config(cfg: &crate::config::TlsConfig) -> anyhow::Result<Arc<ServerConfig>> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("cannot read the certificate {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {}", cfg.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cfg.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("cannot read the private key {}", cfg.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read the client CA {}", ca.display()))?
            {
                roots
                    .add(c.with_context(|| format!("invalid PEM in {}", ca.display()))?)
                    .context("invalid client CA certificate")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            let verifier = crate::mtls::SubjectVerifier::wrap(verifier, cfg.client_subjects.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).context("the certificate does not match the private key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
