//! The gRPC listeners: the internal API (`[grpc]`: its own TCP listener with TLS, h2 by ALPN, optional mTLS;
//! docs/grpc.md) and the Kubernetes KMS v2 plugin (`[kms_plugin]`: a unix socket; docs/kubernetes-kms.md).
//! Both reuse the server's rustls and connection code; tonic only contributes the services.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use kmsgate_core::{Dispatcher, KeyRef, TenantId};
use kmsgate_grpc::{ApiOptions, AuthChain, KmsPlugin, KmsPluginConfig, MtlsAuthenticator, TlsClientNames};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::config::TlsConfig;
use crate::http::{self, ConnInfo};

/// `[grpc]`: the internal gRPC API listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Serve the API.
    pub enabled: bool,
    /// Address of its listener.
    pub bind: SocketAddr,
    /// TLS of the listener (required when enabled); `client_ca` enables the client certificates callers
    /// authenticate with.
    pub tls: Option<TlsConfig>,
    /// Serve grpc.reflection.v1 and v1alpha (service and message descriptions only; no data).
    pub reflection: bool,
    /// How often a grpc.health.v1 Watch re-probes readiness, in seconds.
    pub health_watch_secs: u64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            enabled: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 9443)),
            tls: None,
            reflection: true,
            health_watch_secs: 5,
        }
    }
}

impl GrpcConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.enabled && self.tls.is_none() {
            bail!("grpc.tls is required when grpc.enabled: callers authenticate with TLS client certificates");
        }
        if self.health_watch_secs == 0 {
            bail!("grpc.health_watch_secs must be positive");
        }
        Ok(())
    }
}

/// The rustls configuration of the gRPC listener: the server's (TLS 1.2+, client CA and subject pinning), with
/// ALPN offering `h2` only: gRPC needs HTTP/2, so a client that cannot speak it fails in the handshake rather
/// than with a confusing HTTP/1.1 error.
pub fn tls_config(cfg: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let base = http::tls_config(cfg)?;
    let mut config = (*base).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The authentication chain of the API: the secrets API's bearer tokens first (when `[secrets]` is enabled),
/// then mTLS client certificates mapped by `kmsgate grpc clients`. A call's own token is the more specific
/// credential, so it decides when present, even on a connection whose certificate is registered; a token
/// that does not verify is refused and never falls back to the certificate (docs/grpc.md).
pub fn auth_chain(dispatcher: &Dispatcher, tokens: Option<kmsgate_secrets::TokenVerifier>) -> AuthChain {
    let mut chain = AuthChain::new();
    if let Some(v) = tokens {
        chain = chain.with(Arc::new(crate::grpc_token::TokenAuthenticator::new(v)));
    }
    chain.with(Arc::new(MtlsAuthenticator::new(dispatcher.clone())))
}

/// The token verifier of `[secrets]` (`None` when the secrets API is disabled: no token is accepted then).
pub fn token_verifier(app: &crate::app::App) -> Option<kmsgate_secrets::TokenVerifier> {
    app.config.secrets.enabled.then(|| {
        kmsgate_secrets::TokenVerifier::new(app.dispatcher.clone(), app.config.secrets.clone(), app.tenant.clone())
    })
}

/// The API router: kmsgate.v1, grpc.health.v1, reflection; with the connection's client certificate names
/// handed to the authenticators and the server's request id and access log.
pub fn router(dispatcher: Dispatcher, cfg: &GrpcConfig, auth: AuthChain) -> anyhow::Result<Router> {
    let options =
        ApiOptions { reflection: cfg.reflection, health_watch_every: Duration::from_secs(cfg.health_watch_secs) };
    let api = kmsgate_grpc::api_router(dispatcher, auth, &options).map_err(anyhow::Error::msg)?;
    Ok(api.layer(axum::middleware::from_fn(grpc_context)).layer(axum::middleware::from_fn(http::request_context)))
}

/// Hands the verified client certificate's names (SAN dNSNames, then CNs) to the gRPC authenticators, and the
/// request id the listener chose (echoed in the response) to the services as `x-request-id` metadata.
async fn grpc_context(mut req: Request<Body>, next: Next) -> Response {
    if let Some(http::RequestId(id)) = req.extensions().get::<http::RequestId>().cloned()
        && !req.headers().contains_key(http::REQUEST_ID)
        && let Ok(v) = axum::http::HeaderValue::from_str(&id)
    {
        req.headers_mut().insert(http::REQUEST_ID, v);
    }
    let names = req
        .extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.client_certs.as_ref())
        .and_then(|chain| chain.first())
        .map(|leaf| crate::mtls::certificate_names(leaf));
    if let Some(names) = names {
        req.extensions_mut().insert(TlsClientNames(Arc::new(names)));
    }
    next.run(req).await
}

/// The RPCs of the API listener: the bounded `operation` values of the request metrics (`unknown` for any
/// other path: never the caller's text).
pub const RPCS: &[&str] = &[
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "Sign",
    "Verify",
    "GetPublicKey",
    "Random",
    "Hmac",
    "VerifyHmac",
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "RotateKey",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ListAliases",
    "Health",
    "GetSecret",
    "PutSecret",
    "ListSecrets",
    "DeleteSecret",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The services whose RPCs are labelled by name.
const SERVICES: &[&str] = &[
    "kmsgate.v1.KeyManagementService",
    "kmsgate.v1.SecretsService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The metrics operation of a gRPC request path (`/package.Service/Method`).
pub fn rpc_label(path: &str) -> &'static str {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else { return "unknown" };
    if !SERVICES.contains(&service) {
        return "unknown";
    }
    RPCS.iter().find(|r| **r == method).copied().unwrap_or("unknown")
}

/// The metrics code of a gRPC response: the status name when the response is Trailers-Only (how errors are
/// sent), else `ok` (the status then comes in the trailers, after the message).
pub fn status_label(headers: &axum::http::HeaderMap) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        None | Some("0") => "ok",
        Some(v) => v.parse::<usize>().ok().and_then(|i| NAMES.get(i).copied()).unwrap_or("UNKNOWN"),
    }
}

/// Labels each gRPC response for the request metrics (`frontend="grpc"`).
async fn wire_labels(req: Request<Body>, next: Next) -> Response {
    let operation = rpc_label(req.uri().path());
    let mut resp = next.run(req).await;
    let code = status_label(resp.headers());
    resp.extensions_mut().insert(kmsgate_core::metrics::WireLabels {
        frontend: kmsgate_core::Frontend::Grpc,
        operation,
        code,
    });
    resp
}

/// The KMS v2 plugin service of `[kms_plugin]`.
pub fn plugin_router(
    dispatcher: Dispatcher,
    cfg: &KmsPluginConfig,
    default_tenant: &TenantId,
) -> anyhow::Result<Router> {
    let key = KeyRef::parse(&cfg.key).map_err(|e| anyhow::anyhow!("kms_plugin.key: {}", e.message()))?;
    let tenant = match &cfg.tenant {
        Some(t) => TenantId::parse(t).map_err(|e| anyhow::anyhow!("kms_plugin.tenant: {}", e.message()))?,
        None => default_tenant.clone(),
    };
    Ok(kmsgate_grpc::kms_plugin_router(KmsPlugin::new(dispatcher, tenant, key, cfg.identity.clone())))
}

/// Serves `router` (gRPC over h2 with prior knowledge) on a unix socket bound by [`bind_unix`] until
/// `shutdown`, then drains for up to `grace` and removes the socket file.
pub async fn serve_unix(
    listener: UnixListener,
    path: PathBuf,
    router: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "unix socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "plugin connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("KMS plugin connections still open after the grace period"),
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Binds a unix socket at `path`, made mode 0600 (whoever can connect acts as the plugin's identity). A stale
/// socket file (left by a crash: nothing accepts on it) is replaced; a live one, or any other file at the path,
/// is an error.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another process is serving on {}", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// What `start` bound, for the banner.
#[derive(Debug, Default)]
pub struct Started {
    pub api: Option<SocketAddr>,
    pub plugin: Option<PathBuf>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds and spawns the configured gRPC listeners; each stops when `stop` turns true.
pub async fn start(app: &crate::app::App, stop: watch::Receiver<bool>) -> anyhow::Result<Started> {
    let cfg = &app.config;
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let mut started = Started::default();
    if cfg.grpc.enabled {
        let tls_cfg = cfg.grpc.tls.as_ref().context("grpc.tls is required")?;
        let tls = tls_config(tls_cfg).context("grpc.tls")?;
        let auth = auth_chain(&app.dispatcher, token_verifier(app));
        let router = router(app.dispatcher.clone(), &cfg.grpc, auth)?
            .layer(axum::middleware::from_fn(wire_labels))
            .layer(axum::middleware::from_fn_with_state(app.metrics.clone(), crate::metrics::track));
        let listener =
            TcpListener::bind(cfg.grpc.bind).await.with_context(|| format!("cannot listen on {}", cfg.grpc.bind))?;
        started.api = Some(listener.local_addr()?);
        let stop = stopped(stop.clone());
        started.tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, Some(tls), router, stop, grace).await {
                tracing::error!(error = %e, "the gRPC listener failed");
            }
        }));
    }
    if let Some(path) = cfg.kms_plugin.socket.clone() {
        let router = plugin_router(app.dispatcher.clone(), &cfg.kms_plugin, &app.tenant)?;
        // Bind now so a bad path fails start-up, not a background task.
        let listener = bind_unix(&path)?;
        started.plugin = Some(path.clone());
        let stop = stopped(stop);
        started.tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_unix(listener, path, router, stop, grace).await {
                tracing::error!(error = %e, "the KMS plugin socket failed");
            }
        }));
    }
    Ok(started)
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::config::Config;

    fn load(toml: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, toml).unwrap();
        Config::load(Some(&p)).map(|(c, _)| c)
    }

    #[tokio::test]
    async fn unix_sockets_replace_stale_ones_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let live = super::bind_unix(&path).unwrap();
        let err = format!("{:#}", super::bind_unix(&path).unwrap_err());
        assert!(err.contains("another process is serving"), "{err}");
        drop(live);
        // The file stays behind, as after a crash: it is stale now and replaced.
        assert!(path.exists());
        let _again = super::bind_unix(&path).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = format!("{:#}", super::bind_unix(&file).unwrap_err());
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x", "nothing else is ever removed");
    }

    #[test]
    fn metrics_labels_are_bounded() {
        assert_eq!(super::rpc_label("/kmsgate.v1.KeyManagementService/Encrypt"), "Encrypt");
        assert_eq!(super::rpc_label("/kmsgate.v1.SecretsService/GetSecret"), "GetSecret");
        assert_eq!(super::rpc_label("/grpc.health.v1.Health/Check"), "Check");
        for bad in ["/", "/x.Y/Encrypt", "/kmsgate.v1.SecretsService/Nope", "Encrypt", "/kmsgate.v1.SecretsService"] {
            assert_eq!(super::rpc_label(bad), "unknown", "{bad}");
        }
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(super::status_label(&h), "ok");
        h.insert("grpc-status", "7".parse().unwrap());
        assert_eq!(super::status_label(&h), "PERMISSION_DENIED");
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(super::status_label(&h), "UNKNOWN");
    }

    #[test]
    fn grpc_and_plugin_sections() {
        let c = load("").unwrap();
        assert!(!c.grpc.enabled && c.kms_plugin.socket.is_none());
        assert_eq!(c.grpc.bind.to_string(), "127.0.0.1:9443");
        let err = format!("{:#}", load("[grpc]\nenabled = true\n").unwrap_err());
        assert!(err.contains("grpc.tls is required"), "{err}");
        let c = load("[grpc]\nenabled = true\nreflection = false\n[grpc.tls]\ncert = \"c\"\nkey = \"k\"\n").unwrap();
        assert!(c.grpc.enabled && !c.grpc.reflection);
        let err = format!("{:#}", load("[kms_plugin]\nsocket = \"/tmp/x.sock\"\n").unwrap_err());
        assert!(err.contains("kms_plugin.key"), "{err}");
        let c = load("[kms_plugin]\nsocket = \"/tmp/x.sock\"\nkey = \"alias/k8s\"\ntenant = \"t1\"\n").unwrap();
        assert_eq!((c.kms_plugin.key.as_str(), c.kms_plugin.identity.as_str()), ("alias/k8s", "kubernetes-kms"));
        assert!(load("[kms_plugin]\nsocket = \"/tmp/x.sock\"\nkey = \"alias/k8s\"\nidentity = \"a b\"\n").is_err());
        assert!(load("[grpc]\nbogus = 1\n").is_err(), "unknown keys are errors");
    }
}
