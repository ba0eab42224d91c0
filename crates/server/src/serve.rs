//! `kmsgate serve`: logging, listeners, background tasks, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::app::App;
use crate::config::{Config, LogFormat, Source};
use crate::http;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the main listener (overrides server.bind).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Address of the admin listener: probes and metrics (overrides admin.bind).
    #[arg(long)]
    admin_bind: Option<SocketAddr>,
    /// Log format: text or json (overrides log.format).
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

/// The process log, and the OTLP trace layer when `[telemetry]` is configured. The log filter applies to the
/// log only, so a quiet log level does not silence traces.
pub fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::Layer as _;
    let filter = std::env::var("KMSGATE_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&config.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(crate::telemetry::layer(&config.telemetry)?);
    let _ = match config.log.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter)).try_init()
        }
    };
    Ok(())
}

/// The router of the main listener: probes plus every enabled frontend.
pub fn router(app: &App) -> Router {
    http::health_routes(app.dispatcher.clone())
        .merge(kmsgate_xks::router(app.dispatcher.clone(), app.config.xks.clone()))
        .merge(kmsgate_alibaba::router(app.dispatcher.clone(), app.config.alibaba.clone()))
        .merge(kmsgate_secrets::router(app.dispatcher.clone(), app.config.secrets.clone(), app.tenant.clone()))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(app.config.server.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(app.metrics.clone(), crate::metrics::track))
        .layer(axum::middleware::from_fn(http::request_context))
}

async fn not_found() -> axum::response::Response {
    use axum::response::IntoResponse;
    (axum::http::StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"error": "no such route"}))).into_response()
}

pub async fn run(mut config: Config, source: Source, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(b) = args.bind {
        config.server.bind = b;
    }
    if let Some(b) = args.admin_bind {
        config.admin.bind = b;
    }
    // Flags override what `Config::load` validated: check again.
    config.validate()?;
    if let Some(f) = args.log_format {
        config.log.format = if f == "json" { LogFormat::Json } else { LogFormat::Text };
    }
    init_logging(&config)?;
    let (app, boot) = App::open(config).await?;
    let cfg = app.config.clone();
    let tls = cfg.server.tls.as_ref().map(http::tls_config).transpose()?;
    let listener =
        TcpListener::bind(cfg.server.bind).await.with_context(|| format!("cannot listen on {}", cfg.server.bind))?;
    let local = listener.local_addr()?;
    if let Some(t) = &cfg.server.tls {
        app.metrics.watch_certificate("main", &t.cert)?;
    }
    if let Some(t) = cfg.admin.tls.as_ref().filter(|_| cfg.admin.enabled) {
        app.metrics.watch_certificate("admin", &t.cert)?;
    }
    if let Some(t) = cfg.grpc.tls.as_ref().filter(|_| cfg.grpc.enabled) {
        app.metrics.watch_certificate("grpc", &t.cert)?;
    }
    let api_token = match cfg.admin.enabled && cfg.admin.api {
        true => Some(crate::admin_api::load_or_create_token(&cfg)?),
        false => None,
    };
    let admin = match cfg.admin.enabled {
        true => {
            let tls = cfg.admin.tls.as_ref().map(http::tls_config).transpose()?;
            let listener = TcpListener::bind(cfg.admin.bind)
                .await
                .with_context(|| format!("cannot listen on {} (admin.bind)", cfg.admin.bind))?;
            let addr = listener.local_addr()?;
            Some((listener, tls, addr))
        }
        false => None,
    };

    if source == Source::EmbeddedDefault && cfg.secrets.enabled {
        crate::secrets_cli::first_start(&app).await?;
    }
    print_banner(&app, &source, &boot, local, tls.is_some(), admin.as_ref().map(|(_, t, a)| (*a, t.is_some())));
    tracing::info!(bind = %local, tls = tls.is_some(), "kmsgate listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    spawn_background(&app, stop_rx.clone());
    let grpc = crate::grpc::start(&app, stop_rx.clone()).await?;
    if let Some(a) = grpc.api {
        println!("  gRPC:      https://{a} (kmsgate.v1, grpc.health.v1; docs/grpc.md)");
        tracing::info!(bind = %a, "gRPC API listening");
    }
    if let Some(p) = &grpc.plugin {
        println!("  KMS v2:    unix://{} (Kubernetes KMS plugin; docs/kubernetes-kms.md)", p.display());
        tracing::info!(socket = %p.display(), "Kubernetes KMS v2 plugin listening");
    }

    // The admin listener outlives the data listener's drain: readiness reports "draining" meanwhile, and
    // liveness keeps answering so the orchestrator does not kill a process that is finishing its requests.
    let draining = Arc::new(AtomicBool::new(false));
    let (admin_stop_tx, mut admin_stop_rx) = watch::channel(false);
    let admin_task = admin.map(|(listener, tls, addr)| {
        tracing::info!(bind = %addr, tls = tls.is_some(), "admin listener");
        let router = crate::admin::router(&app, draining.clone(), api_token.clone());
        let stop = async move {
            let _ = admin_stop_rx.changed().await;
        };
        tokio::spawn(http::serve(listener, tls, router, stop, Duration::from_secs(1)))
    });

    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        draining.store(true, Ordering::Release);
        let _ = stop_tx.send(true);
    };
    let served =
        http::serve(listener, tls, router(&app), shutdown, Duration::from_secs(cfg.server.shutdown_grace_secs)).await;
    let _ = admin_stop_tx.send(true);
    if let Some(task) = admin_task {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the admin listener failed"),
            Err(e) => tracing::warn!(error = %e, "the admin listener task failed"),
            Ok(Ok(())) => {}
        }
    }
    for task in grpc.tasks {
        let _ = task.await;
    }
    crate::telemetry::shutdown();
    served?;
    tracing::info!("kmsgate stopped");
    Ok(())
}

/// How often a replica records that it is alive; `live_replicas` windows are a few of these.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How often the store-backed gauges (replicas, credential ages) are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(15);
/// How long change-feed entries are kept: far longer than any poll interval or cache TTL.
const CHANGE_RETENTION: Duration = Duration::from_secs(3600);

/// The change-feed follower (caches see other processes' changes) and the deletion sweeper.
fn spawn_background(app: &App, stop: watch::Receiver<bool>) {
    let d = app.dispatcher.clone();
    let poll = Duration::from_millis(app.config.server.change_poll_ms);
    let mut stop1 = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = d.apply_changes().await {
                        tracing::warn!(error = %e, "cannot read the change feed");
                    }
                }
                _ = stop1.changed() => return,
            }
        }
    });
    // Heartbeats: replicas sharing a store count each other (the XKS fleet size); the change feed is pruned
    // by whichever replica gets there (idempotent).
    let d = app.dispatcher.clone();
    let replica = uuid::Uuid::new_v4().to_string();
    let info = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "bind": app.config.server.bind.to_string(),
        "started_at": kmsgate_core::Timestamp::now().to_rfc3339(),
    });
    let mut stop3 = stop.clone();
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
        let mut prune = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if let Err(e) = d.heartbeat(&replica, &info).await {
                        tracing::warn!(error = %e, "heartbeat failed");
                    }
                }
                _ = prune.tick() => match d.prune_changes(CHANGE_RETENTION).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "pruned the change feed"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot prune the change feed"),
                },
                _ = stop3.changed() => return,
            }
        }
    });
    // Gauges that need the store (replica count, credential ages) are refreshed here, not per scrape.
    let d = app.dispatcher.clone();
    let metrics = app.metrics.clone();
    let mut stop4 = stop.clone();
    tokio::spawn(async move {
        // First a second after start, so this replica's own first heartbeat is counted.
        let first = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(first, METRICS_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => metrics.refresh(&d, kmsgate_xks::health::REPLICA_WINDOW).await,
                _ = stop4.changed() => return,
            }
        }
    });
    let d = app.dispatcher.clone();
    let admin = app.admin();
    let every = Duration::from_secs(app.config.server.purge_interval_secs.max(1));
    let mut stop2 = stop;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match d.purge_due_keys(&admin).await {
                        Ok(ids) if !ids.is_empty() => tracing::info!(count = ids.len(), "destroyed keys past their deletion date"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "deletion sweep failed"),
                    }
                    // Soft-deleted secrets past their tenant's retention free their paths.
                    match d.purge_deleted_secrets(&admin).await {
                        Ok(gone) if !gone.is_empty() => tracing::info!(count = gone.len(), "purged soft-deleted secrets past retention"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "secret purge sweep failed"),
                    }
                }
                _ = stop2.changed() => return,
            }
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_banner(
    app: &App,
    source: &Source,
    boot: &crate::app::Bootstrap,
    local: SocketAddr,
    tls: bool,
    admin: Option<(SocketAddr, bool)>,
) {
    let cfg = &app.config;
    let scheme = if tls { "https" } else { "http" };
    let origin = match source {
        Source::File(p) => format!("configuration {}", p.display()),
        Source::EmbeddedDefault => "embedded default (no configuration file)".to_owned(),
    };
    let kek = match (&cfg.backend.software.kek_env, boot.generated_kek) {
        (Some(var), _) => format!("from ${var}"),
        (None, true) => format!("{} (generated now, mode 0600: back it up)", cfg.kek_file().display()),
        (None, false) => cfg.kek_file().display().to_string(),
    };
    println!("kmsgate {} running on the {origin}", env!("CARGO_PKG_VERSION"));
    println!("  store:     {}", crate::app::redact_url(&cfg.store_url()));
    println!("  keys:      software backend `{}`, root key {kek}", cfg.backend.software.name);
    println!("  tenant:    {}", app.tenant);
    // The admin line comes first: scripts (and the tests) read the banner up to the `listening:` line.
    if let Some((addr, admin_tls)) = admin {
        let scheme = if admin_tls { "https" } else { "http" };
        let api = if cfg.admin.api { " /v1 admin API" } else { "" };
        println!("  admin:     {scheme}://{addr}  (/healthz /readyz /metrics{api})");
    }
    println!("  listening: {scheme}://{local}{}", if tls { "" } else { "  (plain HTTP: local use only)" });
    let probe = match admin {
        Some((addr, admin_tls)) => format!("{}://{addr}/readyz", if admin_tls { "https" } else { "http" }),
        None => format!("{scheme}://{local}/readyz"),
    };
    println!("  try:       curl {probe}");
    println!("             kmsgate keys create --spec AES_256 --alias alias/demo   (in another terminal)");
    println!("  stop:      Ctrl-C (in-flight requests drain for {} s)", cfg.server.shutdown_grace_secs);
}
