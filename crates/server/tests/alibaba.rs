//! The Alibaba instance API mounted in the server's own router, over a real socket: `POST /` reaches it,
//! other frontends' paths and the probes do not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::alibaba_signed as signed;

use aws_lc_rs::signature::RsaKeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
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
    start_config(|_| {}).await
}

async fn start_with(alibaba: kmsgate_alibaba::AlibabaConfig) -> Server {
    start_config(|c| c.alibaba = alibaba).await
}

async fn start_config(f: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    f(&mut config);
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

/// Core admission refusals by identity: `quota` has exhausted a quota, `busy` meets back-pressure.
#[derive(Debug)]
struct Limits;

impl kmsgate_core::policy::RateLimiter for Limits {
    fn check(&self, caller: &Caller, _operation: Operation) -> kmsgate_core::Result<()> {
        match caller.identity.as_str() {
            "quota" => Err(kmsgate_core::Error::new(kmsgate_core::ErrorKind::QuotaExceeded, "quota exhausted")),
            "busy" => Err(kmsgate_core::Error::new(kmsgate_core::ErrorKind::Throttled, "too busy")),
            _ => Ok(()),
        }
    }
}

/// The error codes that need a policy, a limiter, a slow HSM or a broken record: 403, 400 LimitExceeded,
/// 429 back-pressure, 503, 500.
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
        .rate_limiter(std::sync::Arc::new(Limits))
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
    let encrypt =
        proto::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), ..Default::default() }.encode_to_vec();
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
    for (identity, status, code) in [("quota", 400, "Rejected.LimitExceeded"), ("busy", 429, "Rejected.Throttling")] {
        let ck = clientkey::create(&d, &admin, identity, "").await.unwrap();
        let pair = RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();
        let r = post(addr, "/", &signed(&pair, &ck.id, "Encrypt", &encrypt), encrypt.clone()).await;
        expect(r, status, code);
    }

    // The HSM misses the dispatcher's deadline: retryable 503, not 500.
    let app = clientkey::create(&d, &admin, "app", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&app.private_key_pkcs8).unwrap();
    let r = post(addr, "/", &signed(&pair, &app.id, "Encrypt", &encrypt), encrypt.clone()).await;
    expect(r, 503, "ServiceUnavailableTemporary");

    // A backend without AES-CBC/ECB (this test backend keeps the trait's default) answers precisely.
    let cbc = proto::EncryptRequest {
        key_id: key,
        plaintext: b"x".to_vec(),
        algorithm: "AES_CBC".to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let r = post(addr, "/", &signed(&pair, &app.id, "Encrypt", &cbc), cbc).await;
    assert_eq!(r.status, 400);
    let e = proto::Error::decode(&*r.body).unwrap();
    assert_eq!(e.error_code, "UnsupportedOperation");
    assert_eq!(e.error_message, "the software key backend does not offer AES-CBC or AES-ECB");

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

/// Asserts the vendor envelope: the status in the status line and in `StatusCode`, the code, the message when
/// given, and a request id that is also in `x-kms-request-id`.
fn expect_error(r: &common::Reply, status: u16, code: &str, message: Option<&str>) {
    assert_eq!(r.status, status, "{code}: {}", String::from_utf8_lossy(&r.body));
    let e = proto::Error::decode(&*r.body).unwrap();
    assert_eq!((e.status_code, e.error_code.as_str()), (i32::from(status), code));
    if let Some(m) = message {
        assert_eq!(e.error_message, m, "{code}");
    }
    assert!(!e.request_id.is_empty());
    assert_eq!(r.headers.get("x-kms-request-id").unwrap().to_str().unwrap(), e.request_id);
    assert_eq!(r.headers.get("content-type").unwrap(), "application/x-protobuf");
}

/// The headers with `name` replaced (or removed with `None`).
fn with(headers: &[(String, String)], name: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<_> = headers.iter().filter(|(k, _)| k != name).cloned().collect();
    if let Some(v) = value {
        out.push((name.to_owned(), v.to_owned()));
    }
    out
}

/// Every code of the vendor's table (and the ones kmsgate adds) over a real socket. 403, 500, 503 and the
/// policy/limiter codes are in `policy_deadline_and_internal_errors`.
#[tokio::test]
async fn every_documented_error_over_a_socket() {
    let s = start().await;
    let (d, admin) = (&s.app.dispatcher, s.app.admin());
    let ck = clientkey::create(d, &admin, "app", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();
    let key = d.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id.to_string();
    let enc = |k: &str| proto::EncryptRequest { key_id: k.to_owned(), plaintext: b"x".to_vec(), ..Default::default() };
    let call = |api: &str, body: Vec<u8>| {
        let (h, addr) = (signed(&pair, &ck.id, api, &body), s.addr);
        async move { post(addr, "/", &h, body).await }
    };
    let body = enc(&key).encode_to_vec();
    let good = signed(&pair, &ck.id, "Encrypt", &body);

    // 400: the request's own headers, in the vendor's words.
    let r = call("NoSuchApi", body.clone()).await;
    expect_error(&r, 400, "InvalidApiName", Some("The ApiName \"NoSuchApi\" is invalid."));
    let r = post(s.addr, "/", &with(&good, "x-kms-apiname", None), body.clone()).await;
    expect_error(&r, 400, "InvalidApiName", Some("The ApiName \"\" is invalid."));
    let r = post(s.addr, "/", &with(&good, "x-kms-apiversion", None), body.clone()).await;
    expect_error(&r, 400, "InvalidApiVersion", Some("The ApiVersion \"\" is invalid."));
    let r = post(s.addr, "/", &with(&good, "x-kms-apiversion", Some("dkms-gcs-0.1")), body.clone()).await;
    expect_error(&r, 400, "InvalidApiVersion", Some("The ApiVersion \"dkms-gcs-0.1\" is invalid."));
    for date in [Some("yesterday"), Some("2026-11-22T02:38:23Z"), None] {
        let r = post(s.addr, "/", &with(&good, "date", date), body.clone()).await;
        expect_error(&r, 400, "InvalidParam", Some("The Param Date is invalid."));
    }
    let r = post(s.addr, "/", &with(&good, "x-kms-signaturemethod", None), body.clone()).await;
    expect_error(&r, 400, "InvalidParam", Some("The Param x-kms-signaturemethod is invalid."));
    let r = post(s.addr, "/", &with(&good, "x-kms-signaturemethod", Some("HMAC_SHA1")), body.clone()).await;
    expect_error(&r, 400, "InvalidParam", Some("The Param x-kms-signaturemethod is invalid. message:\"HMAC_SHA1\"."));
    let r = post(s.addr, "/", &with(&good, "x-kms-acccesskeyid", None), body.clone()).await;
    expect_error(
        &r,
        400,
        "MissingParameter",
        Some("Parameter x-kms-acccesskeyid does not exist in http header or body."),
    );
    let skewed = httpdate::fmt_http_date(std::time::SystemTime::now() - std::time::Duration::from_secs(16 * 60));
    let r = post(s.addr, "/", &with(&good, "date", Some(&skewed)), body.clone()).await;
    expect_error(&r, 400, "RequestTimeTooSkewed", Some("Request time exceeds server time more than 15 minutes."));
    let r = post(s.addr, "/", &with(&good, "content-sha256", Some(&"0".repeat(64))), body.clone()).await;
    expect_error(&r, 400, "InvalidParam", Some("The Param content-sha256 is invalid."));
    let r = post(s.addr, "/", &with(&good, "authorization", Some("Basic abc")), body.clone()).await;
    expect_error(&r, 400, "InvalidParam", Some("The Param Authorization is invalid."));

    // 400: the body.
    let r = call("Encrypt", vec![0xff, 0xff, 0xff]).await;
    expect_error(&r, 400, "InvalidParameter", None);
    let big = proto::EncryptRequest { plaintext: vec![1; 6 * 1024 + 1], ..enc(&key) }.encode_to_vec();
    expect_error(&call("Encrypt", big).await, 400, "InvalidParameter", None);
    let r = call("Encrypt", enc("").encode_to_vec()).await;
    expect_error(&r, 400, "MissingParameter", Some("Parameter KeyId does not exist in http header or body."));
    let sm4 = proto::EncryptRequest { algorithm: "SM4_GCM".to_owned(), ..enc(&key) }.encode_to_vec();
    expect_error(&call("Encrypt", sm4).await, 400, "UnsupportedOperation", Some("Rejected.UnsupportedOperation"));
    let sign = proto::SignRequest {
        key_id: key.clone(),
        algorithm: "RSA_PKCS1_SHA_256".to_owned(),
        message: b"m".to_vec(),
        message_type: "RAW".to_owned(),
        ..Default::default()
    };
    expect_error(&call("Sign", sign.encode_to_vec()).await, 400, "Rejected.InvalidKeyUsage", None);

    // 401.
    let mut tampered = good.clone();
    let auth = tampered.iter_mut().find(|(k, _)| k == "authorization").unwrap();
    auth.1 = format!("Bearer {}", STANDARD.encode([7u8; 256]));
    let r = post(s.addr, "/", &tampered, body.clone()).await;
    expect_error(&r, 401, "SignatureNotMatch", Some("Signature is not matched."));
    let unknown = "KAAP.00000000-0000-0000-0000-000000000000";
    let r = post(s.addr, "/", &signed(&pair, unknown, "Encrypt", &body), body.clone()).await;
    expect_error(
        &r,
        401,
        "Unauthorized",
        Some("The AccessKey ID \"KAAP.00000000-0000-0000-0000-000000000000\" does not exist in our records."),
    );

    // 404: the three Forbidden.KeyNotFound messages, and secrets.
    let r = call("Encrypt", enc("no-such-key").encode_to_vec()).await;
    expect_error(&r, 404, "Forbidden.KeyNotFound", Some("The specified Key is not found."));
    let r = call("Encrypt", enc("alias/no-such-alias").encode_to_vec()).await;
    expect_error(&r, 404, "Forbidden.KeyNotFound", Some("The specified Alias is not found."));
    let mut blob = b"$\x00\x02".to_vec();
    blob.extend_from_slice(uuid::Uuid::new_v4().to_string().as_bytes());
    blob.extend_from_slice(&[0; 12 + 16]);
    let r = call(
        "AdvanceDecrypt",
        proto::AdvanceDecryptRequest { ciphertext_blob: blob, ..Default::default() }.encode_to_vec(),
    )
    .await;
    expect_error(&r, 404, "Forbidden.KeyNotFound", Some("The specified Key version is not found."));
    // The gateway's internal sealing key does not exist for a ClientKey, by id or alias: Decrypt of a sealed
    // credential, whose raw Aad (the purpose) is in the store for anyone who reads the database, is refused
    // exactly like Encrypt under it.
    let purpose = "xks.credential/AKIDEXAMPLE";
    let sealed = d.seal(&admin, purpose, b"the credential's secret").await.unwrap();
    let sealing = common::internal_key(d, &admin.tenant, kmsgate_core::Dispatcher::SEALING_ALIAS).await.id.to_string();
    for k in [sealing.as_str(), kmsgate_core::Dispatcher::SEALING_ALIAS] {
        let dec = proto::DecryptRequest {
            key_id: k.to_owned(),
            algorithm: "AES_GCM".to_owned(),
            iv: sealed[17..29].to_vec(),
            aad: purpose.as_bytes().to_vec(),
            ciphertext_blob: sealed[29..].to_vec(),
            ..Default::default()
        };
        let r = call("Decrypt", dec.encode_to_vec()).await;
        let message = if k.starts_with("alias/") {
            "The specified Alias is not found."
        } else {
            "The specified Key is not found."
        };
        expect_error(&r, 404, "Forbidden.KeyNotFound", Some(message));
        expect_error(&call("Encrypt", enc(k).encode_to_vec()).await, 404, "Forbidden.KeyNotFound", Some(message));
    }
    assert_eq!(d.unseal(&admin, purpose, &sealed).await.unwrap().as_slice(), b"the credential's secret");
    let secret = proto::GetSecretValueRequest { secret_name: "no/such".to_owned(), ..Default::default() };
    expect_error(&call("GetSecretValue", secret.encode_to_vec()).await, 404, "Forbidden.ResourceNotFound", None);

    // 409: the key states.
    let disabled = d.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id;
    d.disable_key(&admin, &KeyRef::Id(disabled.clone())).await.unwrap();
    expect_error(&call("Encrypt", enc(disabled.as_str()).encode_to_vec()).await, 409, "Rejected.Disabled", None);
    let pending = d.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id;
    d.schedule_key_deletion(&admin, &KeyRef::Id(pending.clone()), 7).await.unwrap();
    let r = call("Encrypt", enc(pending.as_str()).encode_to_vec()).await;
    expect_error(&r, 409, "Rejected.PendingDeletion", None);
    let mut external = CreateKeyRequest::new(KeySpec::Aes256);
    external.external = true;
    let import = d.create_key(&admin, external).await.unwrap().id;
    expect_error(&call("Encrypt", enc(import.as_str()).encode_to_vec()).await, 409, "Rejected.PendingImport", None);

    // 413 and 415, before any authentication.
    let r = post(s.addr, "/", &good, vec![0; 3 * 1024 * 1024 + 1]).await;
    expect_error(&r, 413, "InvalidParameter", Some("The request body exceeds 3 MB."));
    let r = post(s.addr, "/", &with(&good, "content-type", Some("application/json")), body.clone()).await;
    expect_error(&r, 415, "InvalidContentType", None);

    // 429: a ClientKey's own QPS limit, and a replayed request.
    let limited = clientkey::create_with(d, &admin, "limited", "", Some(1)).await.unwrap();
    let lpair = RsaKeyPair::from_pkcs8(&limited.private_key_pkcs8).unwrap();
    let random = |n: i32| proto::GenerateRandomRequest { length: n }.encode_to_vec();
    let first = post(s.addr, "/", &signed(&lpair, &limited.id, "GenerateRandom", &random(4)), random(4)).await;
    assert_eq!(first.status, 200);
    let r = post(s.addr, "/", &signed(&lpair, &limited.id, "GenerateRandom", &random(5)), random(5)).await;
    expect_error(&r, 429, "Rejected.Throttling", Some("QPS Limit Exceeded"));
    let once = signed(&pair, &ck.id, "GenerateRandom", &random(6));
    assert_eq!(post(s.addr, "/", &once, random(6)).await.status, 200);
    let r = post(s.addr, "/", &once, random(6)).await;
    expect_error(&r, 429, "Rejected.Throttling", None);
}

/// `alibaba.client_key_qps` limits every ClientKey without a limit of its own; one with its own limit uses it.
#[tokio::test]
async fn the_configured_default_qps_applies_per_client_key() {
    let s = start_with(kmsgate_alibaba::AlibabaConfig { client_key_qps: 1, ..Default::default() }).await;
    let (d, admin) = (&s.app.dispatcher, s.app.admin());
    let a = clientkey::create(d, &admin, "a", "").await.unwrap();
    let b = clientkey::create(d, &admin, "b", "").await.unwrap();
    let own = clientkey::create_with(d, &admin, "own", "", Some(50)).await.unwrap();
    let send = |ck: &clientkey::NewClientKey, n: i32| {
        let pair = RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();
        let body = proto::GenerateRandomRequest { length: n }.encode_to_vec();
        let (h, addr) = (signed(&pair, &ck.id, "GenerateRandom", &body), s.addr);
        async move { post(addr, "/", &h, body).await }
    };
    assert_eq!(send(&a, 1).await.status, 200);
    expect_error(&send(&a, 2).await, 429, "Rejected.Throttling", Some("QPS Limit Exceeded"));
    // Another ClientKey has its own budget, and one with its own higher limit is not held to the default.
    assert_eq!(send(&b, 1).await.status, 200);
    for n in 1..=5 {
        assert_eq!(send(&own, n).await.status, 200);
    }
    // The budget refills at the limit: within a second one request is admitted again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut n = 10;
    loop {
        n += 1;
        let r = send(&a, n).await;
        if r.status == 200 {
            break;
        }
        expect_error(&r, 429, "Rejected.Throttling", None);
        assert!(std::time::Instant::now() < deadline, "the budget never refilled");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A real HSM deadline miss: the SoftHSM member's only session is held past the call's deadline, so Encrypt on
/// an HSM key answers 503 ServiceUnavailableTemporary; with the session free again the same call succeeds.
/// `./scripts/test` provides the token.
#[tokio::test(flavor = "multi_thread")]
async fn an_hsm_deadline_miss_is_service_unavailable() {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run ./scripts/test (it creates a SoftHSM token)"))
    };
    let s = start_config(|c| {
        let mut member =
            kmsgate_hsm::Pkcs11Config::new("hsm", var("KMSGATE_TEST_P11_MODULE"), var("KMSGATE_TEST_P11_TOKEN"));
        member.pin_file = Some(var("KMSGATE_TEST_P11_PIN_FILE").into());
        member.sessions = 1;
        member.deadline_ms = 300;
        c.backend.pkcs11 = vec![member];
    })
    .await;
    let (d, admin) = (&s.app.dispatcher, s.app.admin());
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.backend = Some("hsm".to_owned());
    let key = d.create_key(&admin, req).await.unwrap().id.to_string();
    let ck = clientkey::create(d, &admin, "app", "").await.unwrap();
    let pair = RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();
    let encrypt = |n: u8| {
        let body =
            proto::EncryptRequest { key_id: key.clone(), plaintext: vec![n], ..Default::default() }.encode_to_vec();
        let (h, addr) = (signed(&pair, &ck.id, "Encrypt", &body), s.addr);
        async move { post(addr, "/", &h, body).await }
    };
    assert_eq!(encrypt(1).await.status, 200, "the HSM key works");

    let hsm = s.app.pkcs11[0].clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn(async move {
        hsm.with_session(std::time::Duration::from_secs(10), move |_session| {
            let _ = started_tx.send(());
            std::thread::sleep(std::time::Duration::from_millis(1500));
            Ok(())
        })
        .await
    });
    started_rx.await.unwrap();
    let r = encrypt(2).await;
    expect_error(&r, 503, "ServiceUnavailableTemporary", None);
    busy.await.unwrap().unwrap();
    assert_eq!(encrypt(3).await.status, 200, "served again once the session is free");
}
