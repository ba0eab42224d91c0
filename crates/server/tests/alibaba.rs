//! The Alibaba instance API mounted in the server's own router, over a real socket: `POST /` reaches it,
//! other frontends' paths and the probes do not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::alibaba_signed as signed;

use aws_lc_rs::signature::RsaKeyPair;
use bytes::Bytes;
use http_body_util::Full;
use kmsgate::app::App;
use kmsgate::config::Config;
use kmsgate_alibaba::{clientkey, proto};
use kmsgate_core::{
    Caller, CreateKeyRequest, Dispatcher, DispatcherConfig, Document, KeyRef, KeySpec, Operation, Precondition,
    TenantId,
};
use prost::Message;

struct Server {
    addr: std::net::SocketAddr,
    app: App,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    let (app, _) = App::open(config).await.unwrap();
    let router = kmsgate::serve::router(&app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kmsgate::http::serve(
        listener,
        None,
        router,
        async move {
            let _ = rx.await;
        },
        std::time::Duration::from_secs(1),
    ));
    Server { addr, app, _dir: dir, _stop: tx }
}

async fn post(addr: std::net::SocketAddr, path: &str, headers: &[(String, String)], body: Vec<u8>) -> common::Reply {
    let mut b = hyper::Request::builder().method("POST").uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Full::new(Bytes::from(body))).unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

#[tokio::test]
async fn instance_api_is_mounted_beside_the_other_routes() {
    let s = start().await;
    let admin = s.app.admin();
    let ck = clientkey::create(&s.app.dispatcher, &admin, "app", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();

    let body = proto::GenerateRandomRequest { length: 16 }.encode_to_vec();
    let r = post(s.addr, "/", &signed(&pair, &ck.id, "GenerateRandom", &body), body).await;
    assert_eq!(r.status, 200);
    assert_eq!(proto::GenerateRandomResponse::decode(&*r.body).unwrap().random.len(), 16);

    // A disabled key refuses the next call with the vendor's state error.
    let key = s.app.dispatcher.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id;
    s.app.dispatcher.disable_key(&admin, &KeyRef::Id(key.clone())).await.unwrap();
    let body = proto::EncryptRequest { key_id: key.to_string(), plaintext: b"x".to_vec(), ..Default::default() }
        .encode_to_vec();
    let r = post(s.addr, "/", &signed(&pair, &ck.id, "Encrypt", &body), body).await;
    assert_eq!(r.status, 409);
    let e = proto::Error::decode(&*r.body).unwrap();
    assert_eq!((e.status_code, e.error_code.as_str()), (409, "Rejected.Disabled"));

    // Other frontends keep their paths: XKS answers its own JSON error, the probe still works.
    let r = post(
        s.addr,
        "/kms/xks/v1/health",
        &[("content-type".to_owned(), "application/json".to_owned())],
        b"{}".to_vec(),
    )
    .await;
    assert!(r.json().get("errorName").is_some(), "XKS answered");
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let probe = hyper::Request::builder()
        .method("GET")
        .uri("/healthz")
        .header("host", s.addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(common::send_on(stream, false, probe).await.unwrap().status, 200);
}

/// Denies Encrypt to the identity `denied`.
#[derive(Debug)]
struct DenyEncrypt;

impl kmsgate_core::policy::Authorizer for DenyEncrypt {
    fn authorize(&self, caller: &Caller, operation: Operation, _resource: Option<&str>) -> kmsgate_core::Result<()> {
        if caller.identity == "denied" && operation == Operation::Encrypt {
            return Err(kmsgate_core::Error::new(kmsgate_core::ErrorKind::AccessDenied, "denied by policy"));
        }
        Ok(())
    }
}

/// The error codes that need a policy, a slow HSM or a broken record: 403, 503, 500.
#[tokio::test]
async fn policy_deadline_and_internal_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let slow = std::sync::Arc::new(common::SlowBackend {
        inner: common::software_backend(dir.path()),
        delay: std::time::Duration::from_millis(400),
    });
    let cfg = DispatcherConfig {
        backend_deadline: std::time::Duration::from_millis(100),
        default_backend: "software".to_owned(),
        ..DispatcherConfig::default()
    };
    let d = Dispatcher::builder(store)
        .backend(slow)
        .authorizer(std::sync::Arc::new(DenyEncrypt))
        .config(cfg)
        .build()
        .await
        .unwrap();
    let admin = Caller::admin(TenantId::default_tenant());
    d.ensure_tenant(&admin.tenant).await.unwrap();
    let key = d.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id.to_string();
    let router = kmsgate_alibaba::router(d.clone(), kmsgate_alibaba::AlibabaConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kmsgate::http::serve(
        listener,
        None,
        router,
        async move {
            let _ = rx.await;
        },
        std::time::Duration::from_secs(1),
    ));
    let encrypt = proto::EncryptRequest { key_id: key, plaintext: b"x".to_vec(), ..Default::default() }.encode_to_vec();
    let expect = |r: common::Reply, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let e = proto::Error::decode(&*r.body).unwrap();
        assert_eq!((e.status_code, e.error_code.as_str()), (i32::from(status), code));
        assert!(!e.error_message.contains("sleep") && !e.request_id.is_empty());
    };

    let denied = clientkey::create(&d, &admin, "denied", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&denied.private_key_pkcs8).unwrap();
    let r = post(addr, "/", &signed(&pair, &denied.id, "Encrypt", &encrypt), encrypt.clone()).await;
    expect(r, 403, "Forbidden.NoPermission");

    // The HSM misses the dispatcher's deadline: retryable 503, not 500.
    let app = clientkey::create(&d, &admin, "app", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&app.private_key_pkcs8).unwrap();
    let r = post(addr, "/", &signed(&pair, &app.id, "Encrypt", &encrypt), encrypt.clone()).await;
    expect(r, 503, "ServiceUnavailableTemporary");

    // A ClientKey record the gateway cannot read is an internal failure, never an authentication verdict.
    let broken = "KAAP.11111111-1111-1111-1111-111111111111";
    let body = serde_json::json!({ "identity": "app", "public_key": "%%% not base64" });
    d.put_document(
        &admin,
        Document::new(clientkey::KIND_CLIENT_KEY, broken, admin.tenant.clone(), body),
        Precondition::Absent,
    )
    .await
    .unwrap();
    let r = post(addr, "/", &signed(&pair, broken, "Encrypt", &encrypt), encrypt).await;
    expect(r, 500, "InternalFailure");
}
