//! Same-run baselines.
//!
//! * A bare hyper server on kmsgate's own HTTP stack (hyper-util's auto builder, TCP_NODELAY, and when TLS is
//!   on, the very rustls configuration kmsgate's listener builds) that reads the request body and answers a
//!   fixed JSON body. It is the ceiling of this stack on this machine: kmsgate can only add work to it.
//! * Raw backend throughput: AES-256-GCM straight through a kmsgate-hsm backend, no HTTP, no dispatcher.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use kmsgate_core::{KeyBackend, KeyId, KeyMaterialRef, KeySpec, KeyUsage, KeyUsageSet};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A JSON object of exactly `len` bytes (at least 18) shaped like an XKS Encrypt answer.
pub fn fixed_body(len: usize) -> Bytes {
    let head = r#"{"ciphertext":""#;
    let tail = r#""}"#;
    let fill = len.saturating_sub(head.len() + tail.len()).max(1);
    let mut s = String::with_capacity(len);
    s.push_str(head);
    s.extend(std::iter::repeat_n('A', fill));
    s.push_str(tail);
    Bytes::from(s)
}

/// Serves `body` to every request on `listener` until the process ends.
pub async fn serve_fixed(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, body: Bytes) {
    let acceptor = tls.map(TlsAcceptor::from);
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (builder, acceptor, body) = (builder.clone(), acceptor.clone(), body.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let body = body.clone();
                async move {
                    // Read the request like a real frontend must before it can answer.
                    let _ = req.into_body().collect().await;
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(resp)
                }
            });
            match acceptor {
                None => {
                    let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
                }
                Some(a) => {
                    if let Ok(tls) = a.accept(stream).await {
                        let _ = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).await;
                    }
                }
            }
        });
    }
}

/// `kmsgate-bench baseline-server`: binds, prints the same `listening:` line as kmsgate, serves forever.
pub async fn baseline_server(
    bind: SocketAddr,
    body_bytes: usize,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(kmsgate::http::tls_config(&kmsgate::config::TlsConfig {
            cert,
            key,
            client_ca: None,
            client_subjects: Vec::new(),
        })?),
        (None, None) => None,
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
    };
    let listener = TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("bare hyper baseline, {body_bytes}-byte JSON answers");
    println!("  listening: {scheme}://{}", listener.local_addr()?);
    serve_fixed(listener, tls, fixed_body(body_bytes)).await;
    Ok(())
}

/// One raw backend measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendResult {
    pub backend: String,
    pub tasks: usize,
    pub plaintext_size: usize,
    pub aad_size: usize,
    /// Each iteration is one encrypt and one decrypt of what it encrypted: the HSM work of one XKS Encrypt
    /// with an integrity value (encrypt, then trial decrypt).
    pub iterations: u64,
    pub hsm_ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub errors: u64,
}

/// Encrypt + decrypt in a loop on `tasks` concurrent tasks for `duration` (after `warmup`), counting
/// backend operations.
pub async fn backend_throughput(
    backend: Arc<dyn KeyBackend>,
    tasks: usize,
    warmup: Duration,
    duration: Duration,
    plaintext_size: usize,
    aad_size: usize,
) -> anyhow::Result<BackendResult> {
    let key_id = KeyId::parse("kmsgate-bench-raw").map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let version = uuid::Uuid::new_v4();
    let usage = KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt]);
    let handle = backend
        .generate(&key_id, version, KeySpec::Aes256, usage)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the benchmark key: {}", e.message()))?;
    let shared = Arc::new((key_id, handle));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let (backend, shared, measuring, stop, ops, errors) =
            (backend.clone(), shared.clone(), measuring.clone(), stop.clone(), ops.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let pt: Vec<u8> = (0..plaintext_size).map(|i| i as u8).collect();
            // The server's AAD also carries length prefixes and metadata; 3 bytes is their size without metadata.
            let aad = vec![0x5a; aad_size + 3];
            let mut counter: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                // IVs never repeat under one key: task number and a counter.
                counter += 1;
                let mut iv = [0u8; 12];
                iv[..4].copy_from_slice(&(t as u32).to_be_bytes());
                iv[4..].copy_from_slice(&counter.to_be_bytes());
                let key =
                    KeyMaterialRef { key_id: &shared.0, version, spec: KeySpec::Aes256, handle: shared.1.as_slice() };
                let ok = match backend.aes_gcm_encrypt(key, &iv, &aad, &pt).await {
                    Ok(ct) => backend.aes_gcm_decrypt(key, &iv, &aad, &ct).await.is_ok_and(|p| p.as_slice() == pt),
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        ops.fetch_add(2, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The software backend never awaits anything real; yield so a timer can end the run.
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    let hsm_ops = ops.load(Ordering::Relaxed);
    let _ =
        backend.destroy(KeyMaterialRef { key_id: &shared.0, version, spec: KeySpec::Aes256, handle: &shared.1 }).await;
    Ok(BackendResult {
        backend: backend.kind().to_owned(),
        tasks,
        plaintext_size,
        aad_size,
        iterations: hsm_ops / 2,
        hsm_ops,
        seconds,
        ops_per_sec: hsm_ops as f64 / seconds,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// kmsgate-hsm's PKCS#11 backend on a token (SoftHSM in the standard run), with its own session pool.
pub async fn pkcs11_backend(
    module: &Path,
    token_label: &str,
    pin_env: &str,
    sessions: usize,
) -> anyhow::Result<Arc<dyn KeyBackend>> {
    let mut cfg = kmsgate_hsm::Pkcs11Config::new("bench-softhsm", module, token_label);
    cfg.pin_env = Some(pin_env.to_owned());
    cfg.sessions = sessions;
    let backend = kmsgate_hsm::Pkcs11Backend::start(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the PKCS#11 backend: {}", e.message()))?;
    Ok(Arc::new(backend))
}

/// The software backend under a throw-away root key.
pub fn software_backend() -> anyhow::Result<Arc<dyn KeyBackend>> {
    let kek = kmsgate_hsm::Kek::generate().map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    Ok(Arc::new(kmsgate_hsm::SoftwareBackend::new("bench-software", kek)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn fixed_body_has_the_asked_size_and_is_json() {
        for len in [18, 64, 221, 1000] {
            let b = fixed_body(len);
            assert_eq!(b.len(), len);
            serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn software_backend_round_trips() {
        let r = backend_throughput(
            software_backend().unwrap(),
            2,
            Duration::from_millis(10),
            Duration::from_millis(50),
            32,
            16,
        )
        .await
        .unwrap();
        assert_eq!(r.errors, 0);
        assert!(r.hsm_ops > 0);
        assert_eq!(r.hsm_ops, 2 * r.iterations);
    }
}
