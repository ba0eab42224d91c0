//! OpenTelemetry: a `kmsgate serve` process configured with `[telemetry]` exports its request spans over
//! OTLP/gRPC to a trace collector running in this test (the collector's `TraceService` from
//! opentelemetry-proto's generated types, served by tonic on 127.0.0.1). XKS and Alibaba requests carrying a W3C
//! `traceparent` join the caller's trace, carry frontend, operation, key id, tenant and outcome, and no span
//! attribute holds the plaintext, AAD or credentials the requests used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::process::{self, cli_json, cli_ok, toml_str};
use common::wire::{XKS_REGION, XksCred, alibaba_headers, alibaba_key_pair, xks_metadata};
use http_body_util::Full;
use hyper::body::Bytes;
use kmsgate_alibaba::proto;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

/// One export as received: the `x-collector-token` metadata and the request.
type Export = (Option<String>, ExportTraceServiceRequest);
/// A received span with its export's token and its resource's attributes.
type Received = (Span, Option<String>, Vec<(String, String)>);

/// What the collector received: each export's metadata header `x-collector-token` and its request.
#[derive(Default, Clone)]
struct Collector {
    got: Arc<Mutex<Vec<Export>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let token = request.metadata().get("x-collector-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.got.lock().unwrap().push((token, request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        addr
    }

    fn spans(&self) -> Vec<Received> {
        let mut out = Vec::new();
        for (token, req) in self.got.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                let resource: Vec<(String, String)> = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                    .collect();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((s.clone(), token.clone(), resource.clone()));
                    }
                }
            }
        }
        out
    }

    /// Every byte the collector received, as text, for the leak check.
    fn dump(&self) -> String {
        self.got.lock().unwrap().iter().map(|(_, r)| format!("{r:?}")).collect()
    }
}

fn value_text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
}

/// A SigV4-signed XKS call with extra (unsigned) headers.
async fn xks_call(
    addr: std::net::SocketAddr,
    cred: &XksCred,
    op: &str,
    body: &serde_json::Value,
    traceparent: &str,
) -> common::Reply {
    let host = addr.to_string();
    let path = format!("{}{op}", cred.uri_path);
    let bytes = body.to_string().into_bytes();
    let (date, auth) = kmsgate_xks::sigv4::sign(&kmsgate_xks::sigv4::ToSign {
        method: "POST",
        path: &path,
        query: None,
        headers: &[("host", &host), ("content-type", "application/json")],
        body: &bytes,
        access_key_id: &cred.akid,
        secret: &cred.secret,
        region: XKS_REGION,
        service: "kms-xks-proxy",
        time: time::OffsetDateTime::now_utc(),
    });
    let req = hyper::Request::builder()
        .method("POST")
        .uri(&path)
        .header("host", &host)
        .header("content-type", "application/json")
        .header("x-amz-date", date)
        .header("authorization", auth)
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=caller")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_the_callers_trace_and_no_secrets() {
    let collector = Collector::default();
    let collector_addr = collector.start().await;

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = p.join("kmsgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {}\n[server]\nbind = \"127.0.0.1:0\"\n[telemetry]\nendpoint = \"http://{collector_addr}\"\n\
             service_name = \"kmsgate-under-test\"\nsampling_ratio = 1.0\nheaders = {{ x-collector-token = \"t0k3n\" }}\n",
            toml_str(&p.join("data").display().to_string())
        ),
    )
    .unwrap();
    let key_id = cli_json(p, &cfg, &["keys", "create", "--alias", "alias/traced"])["id"].as_str().unwrap().to_owned();
    cli_json(p, &cfg, &["xks", "stores", "create", "--name", "traced", "--prefix", "/traced", "--all-keys"]);
    let cred = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cfg, &["xks", "credentials", "create", "--store", "traced"])).unwrap(),
    );
    let ck =
        cli_json(p, &cfg, &["alibaba", "client-keys", "create", "--identity", "app", "--out-dir", p.to_str().unwrap()]);
    let ali_id = ck["id"].as_str().unwrap().to_owned();
    let ali_pem = std::fs::read_to_string(ck["private_key_file"].as_str().unwrap()).unwrap();
    let ali_password = std::fs::read_to_string(ck["password_file"].as_str().unwrap()).unwrap();
    let pair = alibaba_key_pair(&ali_pem);

    // The SDK's batch processor reads its export interval from the environment: a short one keeps the test fast.
    let mut cmd = process::kmsgate(p, &cfg);
    let log = p.join("serve.log");
    cmd.arg("serve")
        .env("KMSGATE_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let server = spawn_and_wait(cmd, &log);
    let addr = server.addr;

    // The caller's trace: kmsgate's spans must be its children.
    let xks_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let xks_parent = "00f067aa0ba902b7";
    let plaintext = b"tracing-test plaintext 7f3c9e";
    let aad = b"tracing-test aad 51d0a2";
    let body = json!({"requestMetadata": xks_metadata("Encrypt", "trace-probe"),
        "plaintext": STANDARD.encode(plaintext), "additionalAuthenticatedData": STANDARD.encode(aad),
        "encryptionAlgorithm": "AES_GCM"});
    let r =
        xks_call(addr, &cred, &format!("/keys/{key_id}/encrypt"), &body, &format!("00-{xks_trace}-{xks_parent}-01"))
            .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let unknown = "00000000-0000-4000-8000-000000000000";
    let missing_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = xks_call(
        addr,
        &cred,
        &format!("/keys/{unknown}/encrypt"),
        &body,
        &format!("00-{missing_trace}-b7ad6b7169203331-01"),
    )
    .await;
    assert_eq!(r.status, 404);

    let ali_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let ali_parent = "b7ad6b7169203331";
    let ali_plaintext = b"tracing-test alibaba plaintext 0c1d";
    let ali_aad = b"tracing-test alibaba aad 99ee";
    let ali_body = proto::EncryptRequest {
        key_id: key_id.clone(),
        plaintext: ali_plaintext.to_vec(),
        aad: ali_aad.to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut b = hyper::Request::builder().method("POST").uri("/").header("host", addr.to_string());
    let ali_headers = alibaba_headers(&pair, &ali_id, "Encrypt", &ali_body);
    let ali_signature = ali_headers.get("authorization").unwrap().to_str().unwrap().to_owned();
    for (k, v) in &ali_headers {
        b = b.header(k, v);
    }
    let req = b
        .header("traceparent", format!("00-{ali_trace}-{ali_parent}-01"))
        .body(Full::new(Bytes::from(ali_body)))
        .unwrap();
    let r = common::send_on(tokio::net::TcpStream::connect(addr).await.unwrap(), false, req).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A request without trace context starts a trace of its own (sampling ratio 1.0).
    assert_eq!(common::http(addr, "GET", "/healthz", b"").await.status, 200);

    let deadline = Instant::now() + Duration::from_secs(20);
    let find = |trace: &str| {
        collector
            .spans()
            .into_iter()
            .find(|(s, _, _)| hex::encode(&s.trace_id) == trace && attr(s, "wire.code").is_some())
    };
    while (find(xks_trace).is_none() || find(ali_trace).is_none() || find(missing_trace).is_none())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (xks_span, token, resource) = find(xks_trace).unwrap_or_else(|| panic!("no XKS span: {}", server.log_text()));
    assert_eq!(token.as_deref(), Some("t0k3n"), "telemetry.headers are sent as gRPC metadata");
    assert!(resource.contains(&("service.name".to_owned(), "kmsgate-under-test".to_owned())), "{resource:?}");
    assert_eq!(hex::encode(&xks_span.parent_span_id), xks_parent, "the caller's span is the parent");
    assert_eq!(xks_span.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32);
    assert_eq!(xks_span.name, "xks Encrypt");
    assert_eq!(attr(&xks_span, "frontend").as_deref(), Some("xks"));
    assert_eq!(attr(&xks_span, "operation").as_deref(), Some("Encrypt"));
    assert_eq!(attr(&xks_span, "tenant").as_deref(), Some("default"));
    assert_eq!(attr(&xks_span, "key_id").as_deref(), Some(key_id.as_str()));
    assert_eq!(attr(&xks_span, "outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&xks_span, "wire.operation").as_deref(), Some("Encrypt"));
    assert_eq!(attr(&xks_span, "wire.code").as_deref(), Some("ok"));
    assert_eq!(attr(&xks_span, "http.response.status_code").as_deref(), Some("200"));
    assert!(xks_span.trace_state.contains("vendor=caller"), "tracestate is carried: {:?}", xks_span.trace_state);

    let (missing, _, _) = find(missing_trace).unwrap();
    // The key store refuses the unknown key before any dispatcher operation: the wire labels still say what
    // happened.
    assert_eq!(missing.name, "xks Encrypt");
    assert_eq!(attr(&missing, "wire.code").as_deref(), Some("KeyNotFoundException"));
    assert_eq!(attr(&missing, "http.response.status_code").as_deref(), Some("404"));

    let (ali_span, _, _) = find(ali_trace).unwrap_or_else(|| panic!("no Alibaba span: {}", server.log_text()));
    assert_eq!(hex::encode(&ali_span.parent_span_id), ali_parent);
    assert_eq!(attr(&ali_span, "frontend").as_deref(), Some("alibaba_instance"));
    assert_eq!(attr(&ali_span, "operation").as_deref(), Some("Encrypt"));
    assert_eq!(attr(&ali_span, "tenant").as_deref(), Some("default"));
    assert_eq!(attr(&ali_span, "key_id").as_deref(), Some(key_id.as_str()));
    assert_eq!(attr(&ali_span, "outcome").as_deref(), Some("ok"));
    assert_eq!(ali_span.name, "alibaba_instance Encrypt");

    // Every attribute once.
    for (span, _, _) in collector.spans() {
        let mut keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "an attribute twice in {}: {:?}", span.name, span.attributes);
    }

    // With telemetry on, the log's request span carries the trace fields too (the off test relies on this).
    assert!(server.log_text().contains("otel.kind"), "{}", server.log_text());

    // No attribute anywhere (nor anything else the collector received) holds what the requests protected.
    let dump = collector.dump();
    let mut secrets: Vec<String> = vec![
        String::from_utf8(plaintext.to_vec()).unwrap(),
        String::from_utf8(aad.to_vec()).unwrap(),
        String::from_utf8(ali_plaintext.to_vec()).unwrap(),
        String::from_utf8(ali_aad.to_vec()).unwrap(),
        cred.secret.clone(),
        ali_password.trim().to_owned(),
        ali_signature.trim_start_matches("Bearer ").to_owned(),
    ];
    for s in [&plaintext[..], aad, ali_plaintext, ali_aad] {
        secrets.push(STANDARD.encode(s));
    }
    for s in &secrets {
        assert!(!dump.contains(s.as_str()), "the exported spans contain a secret: {s}");
    }
    for (span, _, _) in collector.spans() {
        for kv in &span.attributes {
            let v = value_text(kv.value.as_ref().and_then(|v| v.value.as_ref()));
            assert!(!kv.key.contains("authorization") && !v.contains("AWS4-HMAC-SHA256"), "{}={v}", kv.key);
        }
    }
    // SigV4 puts the access key id in the Authorization header; only its presence in the audit matters, the
    // span does not carry the header at all.
    assert!(!dump.contains("Credential="), "no Authorization header in spans");
}

fn spawn_and_wait(mut cmd: std::process::Command, log: &std::path::Path) -> process::Server {
    use std::io::BufRead as _;
    let mut child = cmd.spawn().expect("spawn kmsgate");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("kmsgate exited before listening: {}", std::fs::read_to_string(log).unwrap_or_default());
        };
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            let url = rest.split_whitespace().next().unwrap();
            break url.split("://").nth(1).unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    process::Server { child, addr, log: log.to_path_buf() }
}

/// Without `[telemetry]` nothing is exported, even with the SDK's own environment variables pointing at a
/// collector and a `traceparent` on the request: no exporter exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_when_telemetry_is_off() {
    let collector = Collector::default();
    let collector_addr = collector.start().await;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = p.join("kmsgate.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {}\n[server]\nbind = \"127.0.0.1:0\"\n", toml_str(&p.join("data").display().to_string())),
    )
    .unwrap();
    let log = p.join("serve.log");
    let mut cmd = process::kmsgate(p, &cfg);
    cmd.arg("serve")
        .env("KMSGATE_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_addr}"))
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let server = spawn_and_wait(cmd, &log);
    let mut req = common::request("GET", &server.addr.to_string(), "/healthz", b"");
    req.headers_mut().insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
    let r = common::send_on(tokio::net::TcpStream::connect(server.addr).await.unwrap(), false, req).await.unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(collector.got.lock().unwrap().is_empty(), "spans were exported with telemetry off");
    // The log's request span is the plain one: no trace fields.
    assert!(!server.log_text().contains("otel.kind"), "{}", server.log_text());
}
