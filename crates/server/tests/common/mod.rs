//! Shared fixtures of the server crate's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kmsgate_core::backend::KeyMaterialRef;
use kmsgate_core::{
    Caller, Dispatcher, DispatcherConfig, KeyBackend, KeyId, KeySpec, KeyUsageSet, MemberHealth, SigningAlgorithm,
    Store, TenantId,
};
use kmsgate_hsm::{Kek, SoftwareBackend};
use kmsgate_store::SqlStore;
use uuid::Uuid;
use zeroize::Zeroizing;

pub mod process;
pub mod wire;

/// A store, a backend and a dispatcher over a temporary SQLite file.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub backend: Arc<dyn KeyBackend>,
    pub dispatcher: Dispatcher,
    pub audit: Arc<kmsgate_core::audit::MemoryAuditSink>,
    pub caller: Caller,
}

/// One of the gateway's internal keys, read from the store: no dispatcher operation reaches them.
pub async fn internal_key(d: &Dispatcher, tenant: &TenantId, alias: &str) -> kmsgate_core::Key {
    let alias = kmsgate_core::AliasName::parse(alias).unwrap();
    let entry = d.store().get_alias(tenant, &alias).await.unwrap().expect("the internal key exists");
    d.store().get_key(tenant, &entry.key_id).await.unwrap().expect("its key exists")
}

/// Sets an internal key's state in the store (as a database repair would) and lets the dispatcher see it.
pub async fn set_internal_key_state(d: &Dispatcher, tenant: &TenantId, alias: &str, state: kmsgate_core::KeyState) {
    let mut key = internal_key(d, tenant, alias).await;
    key.state = state;
    d.store().update_key(&key).await.unwrap().expect("no concurrent change");
    d.apply_changes().await.unwrap();
}

pub fn kek_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("kek")
}

pub async fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.join("kmsgate.db").display());
    Arc::new(SqlStore::open(&url).await.expect("open store"))
}

pub fn software_backend(dir: &std::path::Path) -> Arc<dyn KeyBackend> {
    let path = kek_path(dir);
    let kek = if path.exists() { Kek::from_file(&path).expect("kek") } else { Kek::generate_file(&path).expect("kek") };
    Arc::new(SoftwareBackend::new("software".to_owned(), kek))
}

pub async fn dispatcher_over(
    store: Arc<dyn Store>,
    backend: Arc<dyn KeyBackend>,
    deadline: Duration,
) -> (Dispatcher, Arc<kmsgate_core::audit::MemoryAuditSink>) {
    let audit = Arc::new(kmsgate_core::audit::MemoryAuditSink::default());
    let cfg = DispatcherConfig {
        backend_deadline: deadline,
        default_backend: backend.name().to_owned(),
        ..DispatcherConfig::default()
    };
    let d =
        Dispatcher::builder(store).backend(backend).audit(audit.clone()).config(cfg).build().await.expect("dispatcher");
    d.ensure_tenant(&TenantId::default_tenant()).await.expect("tenant");
    (d, audit)
}

/// A member on the throwaway SoftHSM token that `./scripts/test` sets up (`SOFTHSM2_CONF`,
/// `KMSGATE_TEST_P11_*`). Without it this panics: PKCS#11 tests fail rather than skip, and never fall back to the
/// system's token directory.
pub fn pkcs11_config(name: &str) -> kmsgate_hsm::Pkcs11Config {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let conf = var("SOFTHSM2_CONF").unwrap_or_else(|| {
        panic!(
            "SOFTHSM2_CONF is not set: run the tests through ./scripts/test, which creates a throwaway SoftHSM token"
        )
    });
    let text = std::fs::read_to_string(&conf).expect("read SOFTHSM2_CONF");
    assert!(!text.contains("/var/lib/softhsm"), "refusing to test against the system token directory ({conf})");
    let mut c = kmsgate_hsm::Pkcs11Config::new(
        name,
        var("KMSGATE_TEST_P11_MODULE").unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".to_owned()),
        var("KMSGATE_TEST_P11_TOKEN").unwrap_or_else(|| "kmsgate-test".to_owned()),
    );
    c.pin_file = Some(var("KMSGATE_TEST_P11_PIN_FILE").expect("KMSGATE_TEST_P11_PIN_FILE (run ./scripts/test)").into());
    c.sessions = 2;
    // The suite's dispatcher deadline (5 s) bounds calls; RSA-3072 generation on a busy machine takes seconds.
    c.deadline_ms = 5_000;
    c.keygen_deadline_ms = 30_000;
    c
}

impl Env {
    pub async fn software() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = software_backend(dir.path());
        Env::with_backend(dir, backend).await
    }

    /// A PKCS#11 backend on the throwaway SoftHSM token `./scripts/test` creates (see `pkcs11_config`).
    pub async fn pkcs11() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = kmsgate_hsm::Pkcs11Backend::start(pkcs11_config("hsm-test")).await.expect("start PKCS#11");
        Env::with_backend(dir, Arc::new(backend)).await
    }

    pub async fn with_backend(dir: tempfile::TempDir, backend: Arc<dyn KeyBackend>) -> Env {
        let store = open_store(dir.path()).await;
        let (dispatcher, audit) = dispatcher_over(store.clone(), backend.clone(), Duration::from_secs(5)).await;
        Env { dir, store, backend, dispatcher, audit, caller: Caller::admin(TenantId::default_tenant()) }
    }
}

/// A backend that delays every call, to provoke deadline misses.
#[derive(Debug)]
pub struct SlowBackend {
    pub inner: Arc<dyn KeyBackend>,
    pub delay: Duration,
}

#[async_trait]
impl KeyBackend for SlowBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn generate(&self, k: &KeyId, v: Uuid, s: KeySpec, u: KeyUsageSet) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.generate(k, v, s, u).await
    }
    async fn import(&self, k: &KeyId, v: Uuid, s: KeySpec, u: KeyUsageSet, m: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.import(k, v, s, u, m).await
    }
    async fn aes_gcm_encrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        pt: &[u8],
    ) -> kmsgate_core::Result<Vec<u8>> {
        tokio::time::sleep(self.delay).await;
        self.inner.aes_gcm_encrypt(key, iv, aad, pt).await
    }
    async fn aes_gcm_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        tokio::time::sleep(self.delay).await;
        self.inner.aes_gcm_decrypt(key, iv, aad, ct).await
    }
    async fn rsa_oaep_encrypt(&self, key: KeyMaterialRef<'_>, pt: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.rsa_oaep_encrypt(key, pt).await
    }
    async fn rsa_oaep_decrypt(&self, key: KeyMaterialRef<'_>, ct: &[u8]) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        self.inner.rsa_oaep_decrypt(key, ct).await
    }
    async fn sign_digest(
        &self,
        key: KeyMaterialRef<'_>,
        a: SigningAlgorithm,
        d: &[u8],
    ) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.sign_digest(key, a, d).await
    }
    async fn verify_digest(
        &self,
        key: KeyMaterialRef<'_>,
        a: SigningAlgorithm,
        d: &[u8],
        s: &[u8],
    ) -> kmsgate_core::Result<bool> {
        self.inner.verify_digest(key, a, d, s).await
    }
    async fn public_key_der(&self, key: KeyMaterialRef<'_>) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.public_key_der(key).await
    }
    async fn hmac_sha256(&self, key: KeyMaterialRef<'_>, data: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.hmac_sha256(key, data).await
    }
    async fn random(&self, len: usize) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.random(len).await
    }
    async fn destroy(&self, key: KeyMaterialRef<'_>) -> kmsgate_core::Result<()> {
        self.inner.destroy(key).await
    }
    async fn health(&self) -> Vec<MemberHealth> {
        self.inner.health().await
    }
}

// ---- a minimal HTTP client over real sockets (plain, TLS, h1 or h2) ------------------------------------

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    pub alpn: Option<Vec<u8>>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send_on<S>(io: S, h2: bool, req: hyper::Request<Full<Bytes>>) -> Result<Reply, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let resp = if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        tx.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        tx.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes().to_vec();
    Ok(Reply { status, headers, body, alpn: None })
}

pub fn request(method: &str, host: &str, path: &str, body: &[u8]) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request")
}

/// One plain HTTP/1.1 request on a fresh connection.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    send_on(stream, false, request(method, &addr.to_string(), path, body)).await.expect("request")
}

/// One request over TLS with the given client config; ALPN decides h2 or HTTP/1.1.
pub async fn https(
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
    server_name: &str,
    path: &str,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client).connect(name, stream).await.map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let h2 = alpn.as_deref() == Some(b"h2");
    let mut reply = send_on(tls, h2, request("GET", server_name, path, b"")).await?;
    reply.alpn = alpn;
    Ok(reply)
}

// ---- the Alibaba instance API's request signature (shared by the Alibaba and cross-frontend tests) -------

/// Signs an instance API request like the SDK: RSA PKCS#1 v1.5 SHA-256 over the string to sign.
pub fn alibaba_signed(
    pair: &aws_lc_rs::signature::RsaKeyPair,
    key_id: &str,
    api: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    use base64::Engine as _;
    let sha = hex::encode_upper(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body));
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let sts = format!(
        "POST\n{sha}\napplication/x-protobuf\n{date}\nx-kms-acccesskeyid:{key_id}\nx-kms-apiname:{api}\n\
         x-kms-apiversion:dkms-gcs-0.2\nx-kms-signaturemethod:RSA_PKCS1_SHA_256\n/"
    );
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), sts.as_bytes(), &mut sig)
        .unwrap();
    [
        ("content-type", "application/x-protobuf".to_owned()),
        ("content-sha256", sha),
        ("date", date),
        ("x-kms-acccesskeyid", key_id.to_owned()),
        ("x-kms-apiname", api.to_owned()),
        ("x-kms-apiversion", "dkms-gcs-0.2".to_owned()),
        ("x-kms-signaturemethod", "RSA_PKCS1_SHA_256".to_owned()),
        ("authorization", format!("Bearer {}", base64::engine::general_purpose::STANDARD.encode(sig))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}
