//! The dispatcher's own metrics, driven through the dispatcher directly: backend deadline misses, refusals that
//! are not backend failures, the rate limiter, and the key cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Env, SlowBackend};
use kmsgate_core::{
    Caller, CreateKeyRequest, DecryptRequest, Dispatcher, EncryptRequest, Error, ErrorKind, KeyRef, KeySpec, Operation,
    TenantId,
};
use zeroize::Zeroizing;

fn scrape(d: &Dispatcher) -> String {
    let mut out = String::new();
    d.metrics().render(&mut out);
    out
}

fn value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn enc(key: &KeyRef) -> EncryptRequest {
    EncryptRequest {
        key: key.clone(),
        algorithm: None,
        plaintext: Zeroizing::new(b"m".to_vec()),
        aad: vec![],
        iv: None,
    }
}

#[tokio::test]
async fn backend_failures_are_timeouts_not_refusals() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let c = &env.caller;
    let k = KeyRef::Id(d.create_key(c, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id);
    let r = d.encrypt(c, enc(&k)).await.unwrap();
    let r2 = d.encrypt(c, enc(&k)).await.unwrap();
    // A tag that does not authenticate: the backend refuses the input, it does not fail.
    let bad = DecryptRequest {
        key: k.clone(),
        version: Some(r.version),
        algorithm: Some(r.algorithm),
        iv: r.iv.clone(),
        aad: vec![],
        ciphertext: r2.ciphertext.clone(),
        tag: vec![0; 16],
    };
    assert_eq!(d.decrypt(c, bad).await.unwrap_err().kind(), ErrorKind::InvalidCiphertext);
    let text = scrape(d);
    assert_eq!(
        value(&text, r#"kmsgate_backend_call_failures_total{backend="software",call="crypto",reason="error"}"#),
        0.0
    );
    assert_eq!(value(&text, r#"kmsgate_backend_call_duration_seconds_count{backend="software",call="crypto"}"#), 3.0);
    assert_eq!(value(&text, r#"kmsgate_backend_call_duration_seconds_count{backend="software",call="keygen"}"#), 1.0);
    assert_eq!(
        value(&text, r#"kmsgate_operations_total{frontend="admin",operation="Decrypt",outcome="invalid_ciphertext"}"#),
        1.0
    );
    // The first encrypt loaded the key (a miss), the others found it cached.
    assert!(value(&text, r#"kmsgate_cache_hits_total{cache="key"}"#) >= 2.0, "{text}");
    assert!(value(&text, r#"kmsgate_cache_misses_total{cache="key"}"#) >= 1.0, "{text}");

    // A backend slower than the deadline: a timeout, counted as one.
    let slow = Arc::new(SlowBackend { inner: env.backend.clone(), delay: Duration::from_millis(300) });
    let (slow_d, _) = common::dispatcher_over(env.store.clone(), slow, Duration::from_millis(30)).await;
    assert_eq!(slow_d.encrypt(c, enc(&k)).await.unwrap_err().kind(), ErrorKind::DependencyTimeout);
    let text = scrape(&slow_d);
    assert_eq!(
        value(&text, r#"kmsgate_backend_call_failures_total{backend="software",call="crypto",reason="timeout"}"#),
        1.0
    );
    assert_eq!(
        value(&text, r#"kmsgate_operations_total{frontend="admin",operation="Encrypt",outcome="dependency_timeout"}"#),
        1.0
    );
}

/// Refuses every operation, as a rate limiter over its budget does.
#[derive(Debug)]
struct Exhausted;

impl kmsgate_core::policy::RateLimiter for Exhausted {
    fn check(&self, _caller: &Caller, _operation: Operation) -> kmsgate_core::Result<()> {
        Err(Error::new(ErrorKind::Throttled, "slow down"))
    }
}

#[tokio::test]
async fn rate_limiter_refusals_are_counted_by_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let d = Dispatcher::builder(store)
        .backend(common::software_backend(dir.path()))
        .rate_limiter(Arc::new(Exhausted))
        .build()
        .await
        .unwrap();
    d.ensure_tenant(&TenantId::default_tenant()).await.unwrap();
    let mut caller = Caller::admin(TenantId::default_tenant());
    caller.frontend = kmsgate_core::Frontend::Xks;
    let k = KeyRef::parse("alias/none").unwrap();
    for _ in 0..3 {
        assert_eq!(d.encrypt(&caller, enc(&k)).await.unwrap_err().kind(), ErrorKind::Throttled);
    }
    let text = scrape(&d);
    assert_eq!(value(&text, r#"kmsgate_rate_limited_total{frontend="xks",limiter="dispatcher"}"#), 3.0);
    assert_eq!(
        value(&text, r#"kmsgate_operations_total{frontend="xks",operation="Encrypt",outcome="throttled"}"#),
        3.0
    );
    assert!(!text.contains("limiter=\"frontend\""), "{text}");
}
