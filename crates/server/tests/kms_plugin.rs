//! The Kubernetes KMS v2 plugin over its unix socket: Status, Encrypt and Decrypt with a tonic client, a key
//! rotation (new key_id, old ciphertexts still decrypt), the size limits the API server enforces, health from
//! the real backend, the upstream wire shape checked with independently declared messages, and `kmsgate
//! serve` running the plugin next to the gRPC API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kmsgate_core::{CreateKeyRequest, KeyRef, KeySpec};
use kmsgate_grpc::KmsPluginConfig;
use kmsgate_grpc::proto::k8s_kms_v2 as v2;
use kmsgate_grpc::proto::k8s_kms_v2::key_management_service_client::KeyManagementServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

async fn unix_channel(path: PathBuf) -> Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    });
    Endpoint::from_static("http://localhost").connect_with_connector(connector).await.unwrap()
}

struct Plugin {
    env: common::Env,
    socket: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The plugin of `env`'s dispatcher for `key`, on a socket in a fresh directory.
async fn start(env: common::Env, key: &str) -> Plugin {
    let socket = env.dir.path().join("kms.sock");
    let cfg = KmsPluginConfig { socket: Some(socket.clone()), key: key.to_owned(), ..KmsPluginConfig::default() };
    let router =
        kmsgate::grpc::plugin_router(env.dispatcher.clone(), &cfg, &kmsgate_core::TenantId::default_tenant()).unwrap();
    let listener = kmsgate::grpc::bind_unix(&socket).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kmsgate::grpc::serve_unix(
        listener,
        socket.clone(),
        router,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));
    Plugin { env, socket, _stop: tx }
}

#[tokio::test]
async fn status_encrypt_decrypt_and_rotation() {
    let env = common::Env::software().await;
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![kmsgate_core::AliasName::parse("alias/k8s-secrets").unwrap()];
    let key = env.dispatcher.create_key(&env.caller, req).await.unwrap();
    let p = start(env, "alias/k8s-secrets").await;
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may connect");
    let mut kms = KeyManagementServiceClient::new(unix_channel(p.socket.clone()).await);

    // Status: v2, healthy, and the key id names the key's primary version.
    let st = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    assert_eq!(st.key_id, format!("{}:{}", key.id, key.primary_version));

    // Encrypt a DEK seed; limits of the API server hold.
    let dek = vec![7u8; 32];
    let e = kms.encrypt(v2::EncryptRequest { plaintext: dek.clone(), uid: "uid-1".into() }).await.unwrap().into_inner();
    assert_eq!(e.key_id, st.key_id, "Encrypt uses the key Status reports");
    assert!(e.ciphertext.len() < 1024 && e.key_id.len() < 1024, "{} / {}", e.ciphertext.len(), e.key_id.len());
    let ann: usize = e.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(ann < 32 * 1024);
    assert!(e.annotations.keys().all(|k| k.contains('.')), "annotation keys are domain names");
    assert!(!e.ciphertext.windows(dek.len()).any(|w| w == dek.as_slice()), "the DEK is not in the clear");
    let d = kms
        .decrypt(v2::DecryptRequest {
            ciphertext: e.ciphertext.clone(),
            uid: "uid-2".into(),
            key_id: e.key_id.clone(),
            annotations: e.annotations.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.plaintext, dek);

    // Rotate the key: Status reports a new key_id, Encrypt uses it, and the old ciphertext still decrypts.
    let rotated = p.env.dispatcher.rotate_key(&p.env.caller, &KeyRef::Id(key.id.clone())).await.unwrap();
    let st2 = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_ne!(st2.key_id, st.key_id);
    assert_eq!(st2.key_id, format!("{}:{}", key.id, rotated.primary_version));
    let e2 = kms.encrypt(v2::EncryptRequest { plaintext: b"seed-2".to_vec(), uid: String::new() }).await.unwrap();
    let e2 = e2.into_inner();
    assert_eq!(e2.key_id, st2.key_id);
    let old = kms
        .decrypt(v2::DecryptRequest {
            ciphertext: e.ciphertext.clone(),
            key_id: e.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.plaintext, dek, "ciphertexts of the old version still decrypt after the rotation");
    let new = kms
        .decrypt(v2::DecryptRequest {
            ciphertext: e2.ciphertext.clone(),
            key_id: e2.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new.plaintext, b"seed-2");

    // Bad input: a tampered ciphertext, a key id that does not match, garbage, a plaintext too big for 1 KiB.
    let mut bad = e.ciphertext.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let r = kms.decrypt(v2::DecryptRequest { ciphertext: bad, key_id: e.key_id.clone(), ..Default::default() }).await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    let r = kms
        .decrypt(v2::DecryptRequest {
            ciphertext: e.ciphertext.clone(),
            key_id: e2.key_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "key_id of another version");
    let r = kms.decrypt(v2::DecryptRequest { ciphertext: b"not ours".to_vec(), ..Default::default() }).await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    let r = kms.encrypt(v2::EncryptRequest { plaintext: vec![0; 1000], uid: String::new() }).await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "the ciphertext would exceed 1 KiB");

    // A disabled key: Status is not ok (with the same key id), Encrypt and Decrypt refuse; enabled again, ok.
    p.env.dispatcher.disable_key(&p.env.caller, &KeyRef::Id(key.id.clone())).await.unwrap();
    let st3 = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_ne!(st3.healthz, "ok");
    assert_eq!(st3.key_id, st2.key_id);
    let r = kms.encrypt(v2::EncryptRequest { plaintext: b"x".to_vec(), uid: String::new() }).await;
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    let r = kms
        .decrypt(v2::DecryptRequest {
            ciphertext: e2.ciphertext.clone(),
            key_id: e2.key_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
    p.env.dispatcher.enable_key(&p.env.caller, &KeyRef::Id(key.id.clone())).await.unwrap();
    assert_eq!(kms.status(v2::StatusRequest {}).await.unwrap().into_inner().healthz, "ok");

    // Audited as the plugin's identity through the Kubernetes KMS frontend, with the API server's uid.
    let events = p.env.audit.events();
    let enc = events.iter().find(|e| e.operation == kmsgate_core::Operation::Encrypt).unwrap();
    assert_eq!((enc.identity.as_str(), enc.frontend.as_str()), ("kubernetes-kms", "kubernetes_kms"));
    assert_eq!(enc.metadata.get("uid").map(String::as_str), Some("uid-1"));
}

/// The plugin with its key in the HSM (SoftHSMv2 through PKCS#11), across a rotation.
#[tokio::test]
async fn over_softhsm_pkcs11_with_rotation() {
    let env = common::Env::pkcs11().await;
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![kmsgate_core::AliasName::parse("alias/k8s-hsm").unwrap()];
    let key = env.dispatcher.create_key(&env.caller, req).await.unwrap();
    assert_eq!(key.versions[0].handle.backend, "hsm-test");
    let p = start(env, "alias/k8s-hsm").await;
    let mut kms = KeyManagementServiceClient::new(unix_channel(p.socket.clone()).await);
    let st = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");
    let e = kms.encrypt(v2::EncryptRequest { plaintext: vec![9; 32], uid: "u".into() }).await.unwrap().into_inner();
    p.env.dispatcher.rotate_key(&p.env.caller, &KeyRef::Id(key.id.clone())).await.unwrap();
    let st2 = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_ne!(st2.key_id, st.key_id);
    let d = kms
        .decrypt(v2::DecryptRequest { ciphertext: e.ciphertext, key_id: e.key_id, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.plaintext, vec![9; 32]);
}

#[tokio::test]
async fn status_reports_an_unusable_key() {
    let env = common::Env::software().await;
    let p = start(env, "alias/not-created-yet").await;
    let mut kms = KeyManagementServiceClient::new(unix_channel(p.socket.clone()).await);
    let st = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.version, "v2");
    assert_ne!(st.healthz, "ok");
    let r = kms.encrypt(v2::EncryptRequest { plaintext: b"x".to_vec(), uid: String::new() }).await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
    // Creating the key makes the plugin healthy without a restart.
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![kmsgate_core::AliasName::parse("alias/not-created-yet").unwrap()];
    p.env.dispatcher.create_key(&p.env.caller, req).await.unwrap();
    // A miss is not cached, so the next Status sees the new alias.
    assert_eq!(kms.status(v2::StatusRequest {}).await.unwrap().into_inner().healthz, "ok");
}

/// The messages as the Kubernetes API declares them (k8s.io/kms/apis/v2/api.proto), written here by hand
/// and independently of protos/k8s: field names, types and numbers.
mod upstream {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub healthz: String,
        #[prost(string, tag = "3")]
        pub key_id: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DecryptRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub ciphertext: Vec<u8>,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub key_id: String,
        #[prost(map = "string, bytes", tag = "4")]
        pub annotations: std::collections::HashMap<String, Vec<u8>>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DecryptResponse {
        #[prost(bytes = "vec", tag = "1")]
        pub plaintext: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EncryptRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub plaintext: Vec<u8>,
        #[prost(string, tag = "2")]
        pub uid: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EncryptResponse {
        #[prost(bytes = "vec", tag = "1")]
        pub ciphertext: Vec<u8>,
        #[prost(string, tag = "2")]
        pub key_id: String,
        #[prost(map = "string, bytes", tag = "3")]
        pub annotations: std::collections::HashMap<String, Vec<u8>>,
    }
}

/// A unary call on `/v2.KeyManagementService/<method>` with the hand-declared messages.
async fn upstream_call<Q, A>(ch: Channel, method: &str, req: Q) -> Result<A, tonic::Status>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = format!("/v2.KeyManagementService/{method}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<Q, A>::default();
    grpc.unary(tonic::Request::new(req), path, codec).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn speaks_the_upstream_wire_format() {
    use kmsgate_grpc::proto::k8s_kms_v2::key_management_service_server::SERVICE_NAME;
    use prost::Message as _;
    assert_eq!(SERVICE_NAME, "v2.KeyManagementService");

    // The generated types and the hand-declared upstream ones encode identically.
    let ours = v2::DecryptRequest {
        ciphertext: b"c".to_vec(),
        uid: "u".into(),
        key_id: "k".into(),
        annotations: [("a.example.com".to_owned(), b"v".to_vec())].into(),
    };
    let theirs = upstream::DecryptRequest::decode(ours.encode_to_vec().as_slice()).unwrap();
    assert_eq!((theirs.ciphertext, theirs.uid, theirs.key_id), (b"c".to_vec(), "u".to_owned(), "k".to_owned()));
    assert_eq!(theirs.annotations.get("a.example.com").map(Vec::as_slice), Some(&b"v"[..]));

    // An independent client on the socket: Status, Encrypt, Decrypt round trip.
    let env = common::Env::software().await;
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.id = Some(kmsgate_core::KeyId::parse("k8s-kek").unwrap());
    env.dispatcher.create_key(&env.caller, req).await.unwrap();
    let p = start(env, "k8s-kek").await;
    let ch = unix_channel(p.socket.clone()).await;
    let st: upstream::StatusResponse = upstream_call(ch.clone(), "Status", upstream::StatusRequest {}).await.unwrap();
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    assert!(st.key_id.starts_with("k8s-kek:"));
    let e: upstream::EncryptResponse =
        upstream_call(ch.clone(), "Encrypt", upstream::EncryptRequest { plaintext: b"dek".to_vec(), uid: "x".into() })
            .await
            .unwrap();
    assert_eq!(e.key_id, st.key_id);
    let d: upstream::DecryptResponse = upstream_call(
        ch,
        "Decrypt",
        upstream::DecryptRequest {
            ciphertext: e.ciphertext,
            uid: "y".into(),
            key_id: e.key_id,
            annotations: e.annotations,
        },
    )
    .await
    .unwrap();
    assert_eq!(d.plaintext, b"dek");
}

// ---- the binary -------------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

fn kmsgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("KMSGATE_KEK").env_remove("KMSGATE_CONFIG").env("KMSGATE_LOG", "warn");
    c
}

fn cli_ok(cwd: &Path, args: &[&str]) -> String {
    let out = kmsgate(cwd).args(args).output().unwrap();
    assert!(out.status.success(), "kmsgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn kmsgate_serve_runs_the_plugin_and_the_grpc_api() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // TLS files for the gRPC listener.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    std::fs::write(cwd.join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(cwd.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(cwd.join("ca.pem"), ca_cert.pem()).unwrap();
    let socket = cwd.join("run").join("kms.sock");
    std::fs::create_dir(cwd.join("run")).unwrap();
    std::fs::write(
        cwd.join("kmsgate.toml"),
        format!(
            "data_dir = \"{d}/data\"\n[server]\nbind = \"127.0.0.1:0\"\nchange_poll_ms = 100\n\
             [grpc]\nenabled = true\nbind = \"127.0.0.1:0\"\n[grpc.tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n\
             client_ca = \"{d}/ca.pem\"\n[kms_plugin]\nsocket = \"{s}\"\nkey = \"alias/k8s\"\n",
            d = cwd.display(),
            s = socket.display()
        ),
    )
    .unwrap();
    let config = cwd.join("kmsgate.toml");
    let cfg = config.to_str().unwrap();
    cli_ok(cwd, &["--config", cfg, "keys", "create", "--alias", "alias/k8s"]);

    let mut child = kmsgate(cwd)
        .args(["--config", cfg, "serve"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(cwd.join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut grpc_addr = None;
    loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("kmsgate exited: {}", std::fs::read_to_string(cwd.join("log")).unwrap_or_default())
        };
        if let Some(rest) = line.trim().strip_prefix("gRPC:") {
            let url = rest.split_whitespace().next().unwrap();
            grpc_addr = Some(url.trim_start_matches("https://").parse::<std::net::SocketAddr>().unwrap());
        }
        if line.trim().starts_with("KMS v2:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    assert!(grpc_addr.is_some(), "the gRPC listener is announced");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut kms = KeyManagementServiceClient::new(unix_channel(socket.clone()).await);
    let st = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    let e = kms.encrypt(v2::EncryptRequest { plaintext: b"dek".to_vec(), uid: String::new() }).await.unwrap();
    let e = e.into_inner();

    // Rotated by the CLI (another process): the server sees it through the change feed; Status says so.
    cli_ok(cwd, &["--config", cfg, "keys", "rotate", "alias/k8s"]);
    let mut rotated = None;
    for _ in 0..50 {
        let now = kms.status(v2::StatusRequest {}).await.unwrap().into_inner();
        if now.key_id != st.key_id {
            rotated = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotated.expect("a new key_id after the rotation");
    assert_eq!(rotated.healthz, "ok");
    let d = kms
        .decrypt(v2::DecryptRequest { ciphertext: e.ciphertext, key_id: e.key_id, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.plaintext, b"dek");

    // SIGTERM: the server drains and removes its socket.
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}: {}", std::fs::read_to_string(cwd.join("log")).unwrap_or_default());
    assert!(!socket.exists(), "the socket is removed on shutdown");
}
