//! The bench speaks the secrets REST API: a bootstrap token from the CLI, one secret written with `PUT`, then a
//! fixed number of bearer-token reads against a real kmsgate (the `kmsgate` binary of the same target
//! directory) over TLS, every answer verified. Counts only, never timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kmsgate_bench::client::{Endpoint, HttpConnector, TlsOptions};
use kmsgate_bench::gateway::{self, Gateway, GatewayOptions};
use kmsgate_bench::load::{self, LoadSpec, Verify};
use kmsgate_bench::rest::{self, RestReadWorkload};

fn spec(requests: u64) -> LoadSpec {
    LoadSpec {
        connections: 2,
        rate: None,
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        verify: Verify::All,
        requests: Some(requests),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_a_secret_over_the_rest_api_of_a_real_kmsgate() {
    let dir = tempfile::tempdir().unwrap();
    let kmsgate = gateway::find_kmsgate(None).expect("the kmsgate binary (cargo build -p kmsgate)");
    let pki = gateway::write_pki(dir.path()).unwrap();
    let mut gw = Gateway::new(GatewayOptions {
        kmsgate,
        dir: dir.path().to_path_buf(),
        pki: Some(pki.clone()),
        softhsm: None,
        hsm_sessions: 1,
    })
    .unwrap();
    let token = rest::setup(&gw).unwrap();
    let url = gw.start().unwrap().url();
    let tls = TlsOptions { ca_file: Some(pki.ca.clone()), ..TlsOptions::default() };
    let endpoint = Arc::new(Endpoint::new(&url, &tls, false).await.unwrap());
    rest::put_secret(&endpoint, &token, "v-smoke-1").await.unwrap();

    // More reads than the default per-identity bucket would allow at once: the bench's configuration turns the
    // secrets API's rate limits off, so none of them is a 429.
    for http2 in [false, true] {
        let endpoint = Arc::new(Endpoint::new(&url, &tls, http2).await.unwrap());
        let w = Arc::new(RestReadWorkload::new(endpoint.clone(), &token, "v-smoke-1"));
        let r = load::run(Arc::new(HttpConnector(endpoint)), w, &spec(1100)).await.unwrap();
        assert_eq!(r.ok, 1100, "h2 {http2}: every read answered and verified: {:?}", r.errors);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    // Verification reads the value: a reader expecting another one fails every answer.
    let w = Arc::new(RestReadWorkload::new(endpoint.clone(), &token, "v-other"));
    let r = load::run(Arc::new(HttpConnector(endpoint.clone())), w, &spec(3)).await.unwrap();
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.values().sum::<u64>(), 3, "{:?}", r.errors);

    // A token the server never issued: every read is refused, counted under the envelope's error code.
    let w = Arc::new(RestReadWorkload::new(endpoint.clone(), "svt_bogus.token", "v-smoke-1"));
    let r = load::run(Arc::new(HttpConnector(endpoint)), w, &spec(4)).await.unwrap();
    assert_eq!(r.ok, 0);
    let (label, n) = r.errors.iter().next().expect("an error label");
    assert_eq!(*n, 4, "{:?}", r.errors);
    assert!(label.starts_with("401 "), "status and error.code: {label}");
}
