//! OpenTelemetry tracing: every wire request is a span (frontend, operation, key id, tenant, outcome) exported
//! over OTLP/gRPC when `[telemetry]` names an endpoint, joined to the caller's trace through W3C trace context
//! (`traceparent`/`tracestate`).
//!
//! Off by default, and then free: no exporter, no layer, the request span keeps only its logging fields (the
//! dispatcher's `record` calls on undeclared fields are no-ops) and no header is parsed.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// `[telemetry]`: OTLP trace export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector (plaintext), e.g. `http://otel-collector:4317`; empty: export off.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Fraction (0.0-1.0) of new traces sampled; a caller's sampled/unsampled decision in `traceparent` wins.
    pub sampling_ratio: f64,
    /// gRPC metadata sent with every export (e.g. a vendor's API key header).
    pub headers: BTreeMap<String, String>,
    /// Deadline of one export call.
    pub timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: String::new(),
            service_name: "kmsgate".to_owned(),
            sampling_ratio: 1.0,
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
        }
    }
}

impl TelemetryConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            bail!("telemetry.sampling_ratio must be between 0.0 and 1.0");
        }
        if !self.enabled() {
            return Ok(());
        }
        let uri: http::Uri = self.endpoint.parse().context("telemetry.endpoint is not a URL")?;
        // The exporter is built without a TLS stack: plaintext gRPC to a collector nearby (sidecar, cluster).
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            bail!("telemetry.endpoint must be an http:// URL of an OTLP/gRPC collector (no TLS in this build)");
        }
        if self.service_name.is_empty() {
            bail!("telemetry.service_name must not be empty");
        }
        for (k, v) in &self.headers {
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes())
                .map_err(|_| anyhow::anyhow!("telemetry.headers: `{k}` is not a valid header name"))?;
            tonic::metadata::MetadataValue::<tonic::metadata::Ascii>::try_from(v.as_str())
                .map_err(|_| anyhow::anyhow!("telemetry.headers: the value of `{k}` is not a valid header value"))?;
        }
        Ok(())
    }
}

/// Set once the OTLP layer is installed: the request middleware reads it to decide whether to declare the
/// trace fields and look for `traceparent`.
static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are being exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The target of the spans that are exported; the OTLP layer sees nothing else.
pub const TARGET: &str = "kmsgate::trace";

/// Builds the OTLP exporter and the `tracing` layer feeding it; `None` when telemetry is off. Must run inside
/// the Tokio runtime (the gRPC channel lives on it).
pub fn layer<S>(cfg: &TelemetryConfig) -> anyhow::Result<Option<Box<dyn Layer<S> + Send + Sync>>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if !cfg.enabled() {
        return Ok(None);
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &cfg.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
            .map_err(|_| anyhow::anyhow!("telemetry.headers: `{k}` is not a valid header name"))?;
        let value = tonic::metadata::MetadataValue::try_from(v.as_str())
            .map_err(|_| anyhow::anyhow!("telemetry.headers: the value of `{k}` is not a valid header value"))?;
        metadata.insert(key, value);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(cfg.endpoint.clone())
        .with_timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
        .with_metadata(metadata)
        .build()
        .context("cannot set up the OTLP trace exporter")?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling_ratio))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("kmsgate");
    if PROVIDER.set(provider).is_err() {
        bail!("telemetry is already initialised in this process");
    }
    ENABLED.store(true, Ordering::Relaxed);
    // Only the request spans: log events and other spans stay in the process log.
    let filter = tracing_subscriber::filter::filter_fn(|m| m.is_span() && m.target() == TARGET);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter).boxed()))
}

/// Flushes the spans still buffered (at shutdown).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.shutdown()
    {
        eprintln!("kmsgate: could not flush the last spans to the OTLP collector: {e}");
    }
}

/// Reads W3C trace context from anything header-like (HTTP headers, gRPC metadata through
/// [`HeaderMapExtractor`] or an [`Extractor`] of one's own) and makes it the parent of `span`, so kmsgate's span
/// joins the caller's trace. A no-op when telemetry is off or no `traceparent` is present.
pub fn set_parent(span: &tracing::Span, carrier: &dyn Extractor) {
    if !enabled() || carrier.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(carrier);
    let _ = span.set_parent(cx);
}

/// Sets the parent of `span` from the `traceparent`/`tracestate` headers of an HTTP request (or of a gRPC
/// call: tonic's `MetadataMap::as_ref()` is an `http::HeaderMap`).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    set_parent(span, &HeaderMapExtractor(headers));
}

/// An [`Extractor`] over `http::HeaderMap`.
#[derive(Debug)]
pub struct HeaderMapExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderMapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one wire request. With telemetry on it declares the fields the dispatcher fills in (frontend,
/// operation, key id, tenant, outcome), those [`record_response`] fills in (status, wire operation and code) and
/// those OpenTelemetry reads (`otel.*`); off, it is the plain logging span, so those `record` calls cost
/// nothing.
pub fn request_span(request_id: &str, method: &http::Method, path: &str) -> tracing::Span {
    if enabled() {
        tracing::info_span!(
            target: TARGET,
            "request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            request_id = %request_id,
            http.request.method = %method,
            url.path = %path,
            http.response.status_code = tracing::field::Empty,
            frontend = tracing::field::Empty,
            wire.operation = tracing::field::Empty,
            wire.code = tracing::field::Empty,
            operation = tracing::field::Empty,
            tenant = tracing::field::Empty,
            key_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        )
    } else {
        tracing::info_span!("request", request_id = %request_id, method = %method, path = %path)
    }
}

/// Records the response on a request span: status, and the frontend's wire labels (wire operation and code,
/// and the span's name `<frontend> <wire operation>`), known even when the request never reached the
/// dispatcher (a refused signature, an unknown key). Server errors mark the span as failed.
pub fn record_response(span: &tracing::Span, resp: &http::Response<axum::body::Body>) {
    if !enabled() {
        return;
    }
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(l) = resp.extensions().get::<kmsgate_core::metrics::WireLabels>() {
        // `frontend` itself is the dispatcher's to record (every frontend reaches it, labelled or not); an
        // attribute recorded twice would be exported twice.
        span.record("wire.operation", l.operation);
        span.record("wire.code", l.code);
        // The OpenTelemetry span has started by now (its name is fixed at start), so rename it directly.
        use opentelemetry::trace::TraceContextExt as _;
        span.context().span().update_name(format!("{} {}", l.frontend.as_str(), l.operation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let mut c = TelemetryConfig::default();
        assert!(!c.enabled());
        c.validate().unwrap();
        c.endpoint = "http://collector:4317".to_owned();
        c.validate().unwrap();
        c.endpoint = "collector:4317".to_owned();
        assert!(c.validate().is_err());
        c.endpoint = "https://collector:4317".to_owned();
        assert!(c.validate().unwrap_err().to_string().contains("http://"));
        c.endpoint = "http://collector:4317".to_owned();
        c.sampling_ratio = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("sampling_ratio"));
        c.sampling_ratio = 0.5;
        c.headers.insert("bad header".to_owned(), "x".to_owned());
        assert!(c.validate().unwrap_err().to_string().contains("telemetry.headers"));
    }
}
