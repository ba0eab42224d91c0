//! The bench speaks the Alibaba instance API: signed protobuf Encrypts against a real kmsgate (the `kmsgate`
//! binary of the same target directory) over TLS, a fixed number of them, every answer verified. Counts only,
//! never timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kmsgate_bench::alibaba::{self, AlibabaWorkload, ClientKey};
use kmsgate_bench::client::{Endpoint, HttpConnector, TlsOptions};
use kmsgate_bench::gateway::{self, Gateway, GatewayOptions};
use kmsgate_bench::load::{self, LoadSpec, Verify};

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
async fn speaks_the_alibaba_instance_api_to_a_real_kmsgate() {
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
    gw.cli(&["keys", "create", "--spec", "AES_256", "--id", "smoke-key"]).unwrap();
    let client_key = alibaba::setup(&mut gw, dir.path()).unwrap();
    let url = gw.start().unwrap().url();
    let tls = TlsOptions { ca_file: Some(pki.ca.clone()), ..TlsOptions::default() };

    for http2 in [false, true] {
        let endpoint = Arc::new(Endpoint::new(&url, &tls, http2).await.unwrap());
        let w = Arc::new(AlibabaWorkload::new(endpoint.clone(), client_key.clone(), "smoke-key", 32, 16).unwrap());
        let r = load::run(Arc::new(HttpConnector(endpoint)), w, &spec(40)).await.unwrap();
        assert_eq!(r.ok, 40, "h2 {http2}: every request answered and verified: {:?}", r.errors);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    // A ClientKey the server does not know: every request fails, counted under the vendor's error code.
    let endpoint = Arc::new(Endpoint::new(&url, &tls, false).await.unwrap());
    let stranger = ClientKey { id: "KAAP.00000000-0000-0000-0000-000000000000".to_owned(), ..client_key };
    let w = Arc::new(AlibabaWorkload::new(endpoint.clone(), stranger, "smoke-key", 32, 16).unwrap());
    let r = load::run(Arc::new(HttpConnector(endpoint)), w, &spec(4)).await.unwrap();
    assert_eq!(r.ok, 0);
    let (label, n) = r.errors.iter().next().expect("an error label");
    assert_eq!(*n, 4, "{:?}", r.errors);
    assert!(label.starts_with("40") && label.contains(' '), "status and ErrorCode: {label}");
}
