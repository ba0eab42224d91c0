//! Interop: Alibaba's own OpenAPI SDKs (PyPI `alibabacloud-kms20160120` on tea-openapi, with ACS3 and with
//! signature v1; `aliyun-python-sdk-kms` on `aliyun-python-sdk-core`, signature v1) and the instance SDK's
//! TransferClient, against the server's router. `./scripts/test` creates the virtualenv with all of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kmsgate::app::App;
use kmsgate::config::Config;
use kmsgate_alibaba::openapi::accesskey;
use kmsgate_alibaba::{AlibabaConfig, KIND_VERSION_INDEX, clientkey};
use kmsgate_core::{
    AliasName, Caller, Dispatcher, Document, Error, ErrorKind, Operation, Precondition, PutSecretRequest, SecretPath,
    Timestamp,
};

fn python() -> String {
    if let Ok(p) = std::env::var("KMSGATE_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/venv/bin/python");
    for candidate in [venv, "python3"] {
        let ok = std::process::Command::new(candidate)
            .args([
                "-c",
                "import alibabacloud_kms20160120.client, aliyunsdkkms, aliyunsdkcore, alibabacloud_kms_kms20160120",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "the Alibaba SDKs are needed for this interop test: run ./scripts/test, or set KMSGATE_TEST_PYTHON to a \
         python with alibabacloud-kms20160120, aliyun-python-sdk-kms and alibabacloud-kms-python-sdk"
    );
}

/// Refuses ScheduleKeyDeletion: a policy, as the core's authorizer hook applies it to every frontend.
#[derive(Debug)]
struct NoDeletion;

impl kmsgate_core::policy::Authorizer for NoDeletion {
    fn authorize(&self, _caller: &Caller, operation: Operation, _resource: Option<&str>) -> kmsgate_core::Result<()> {
        if operation == Operation::ScheduleKeyDeletion {
            return Err(Error::new(ErrorKind::AccessDenied, "a policy forbids scheduling key deletion"));
        }
        Ok(())
    }
}

async fn serve(router: axum::Router) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
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
        Duration::from_secs(1),
    ));
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vendor_openapi_sdks_work_unchanged() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    // A SoftHSM member next to the software backend, for ProtectionLevel=HSM and PKCS#11 key import.
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run ./scripts/test (it creates a SoftHSM token)"))
    };
    let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    let mut member =
        kmsgate_hsm::Pkcs11Config::new("hsm", var("KMSGATE_TEST_P11_MODULE"), var("KMSGATE_TEST_P11_TOKEN"));
    member.pin_file = Some(var("KMSGATE_TEST_P11_PIN_FILE").into());
    config.backend.pkcs11 = vec![member];
    let (app, _) = App::open(config).await.unwrap();
    let d = app.dispatcher.clone();
    let admin = app.admin();

    let ak = accesskey::create(&d, &admin, "interop", "").await.unwrap();
    let ak_file = dir.path().join("ak.csv");
    std::fs::write(&ak_file, ak.csv().as_bytes()).unwrap();
    let revoked = accesskey::create(&d, &admin, "gone", "").await.unwrap();
    accesskey::revoke(&d, &admin, &revoked.id).await.unwrap();
    let ck = clientkey::create(&d, &admin, "transfer", "").await.unwrap();
    let ck_file = dir.path().join("client.pem");
    std::fs::write(&ck_file, ck.private_key_pem().unwrap().as_bytes()).unwrap();
    // A key version whose index record is malformed: Decrypt of a blob naming it is an internal failure.
    let broken = uuid::Uuid::new_v4().to_string();
    let doc = Document::new(KIND_VERSION_INDEX, &broken, app.tenant.clone(), serde_json::json!({ "nope": 1 }));
    d.put_document(&admin, doc, Precondition::Absent).await.unwrap();

    // A secret whose expiry passes before the script reads it.
    let mut expiring = PutSecretRequest::new(SecretPath::parse("app/expired").unwrap(), b"gone".to_vec());
    expiring.expires_at = Some(Some(Timestamp(Timestamp::now().0 + 500)));
    d.put_secret(&admin, expiring).await.unwrap();
    // The sealing key's id, straight from the store: no dispatcher operation reveals it.
    let sealing_alias = AliasName::parse(Dispatcher::SEALING_ALIAS).unwrap();
    let sealing = d.store().get_alias(&app.tenant, &sealing_alias).await.unwrap().unwrap().key_id.to_string();
    let (main, stop_main) = serve(kmsgate::serve::router(&app)).await;
    let strict_cfg = AlibabaConfig { access_key_qps: 1, import_token_ttl_secs: 1, ..AlibabaConfig::default() };
    let (strict, stop_strict) = serve(kmsgate_alibaba::router(d.clone(), strict_cfg)).await;
    // Two more dispatchers over the same store and backends: one whose key generation cannot finish in time
    // and whose authorizer refuses ScheduleKeyDeletion, one with a one-key quota.
    let mut faulty_cfg = d.config().clone();
    faulty_cfg.keygen_deadline = Duration::ZERO;
    let mut quota_cfg = d.config().clone();
    quota_cfg.max_keys_per_tenant = Some(1);
    let mut faulty = Dispatcher::builder(d.store().clone()).config(faulty_cfg).authorizer(Arc::new(NoDeletion));
    let mut quota = Dispatcher::builder(d.store().clone()).config(quota_cfg);
    for b in d.backends().all() {
        faulty = faulty.backend(b.clone());
        quota = quota.backend(b.clone());
    }
    let (faulty, stop_faulty) =
        serve(kmsgate_alibaba::router(faulty.build().await.unwrap(), AlibabaConfig::default())).await;
    let (quota, stop_quota) =
        serve(kmsgate_alibaba::router(quota.build().await.unwrap(), AlibabaConfig::default())).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../alibaba/tests/openapi_interop.py");
    let args = [
        script.to_owned(),
        main.to_string(),
        strict.to_string(),
        ak_file.display().to_string(),
        revoked.id.clone(),
        ck.id.clone(),
        ck_file.display().to_string(),
        broken,
        faulty.to_string(),
        quota.to_string(),
        sealing,
        "app/expired".to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output().unwrap())
        .await
        .unwrap();
    let _ = (stop_main.send(()), stop_strict.send(()), stop_faulty.send(()), stop_quota.send(()));
    assert!(output.status.success(), "SDK script failed: {}", String::from_utf8_lossy(&output.stderr));
    let r: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    println!("{r:#}");
    let err = |name: &str, code: &str, status: u16| {
        assert_eq!(r[name], serde_json::json!([code, status, true]), "{name}");
    };

    for scheme in ["acs3", "v1"] {
        assert_eq!(r[format!("{scheme}_decrypt")], format!("hello {scheme}"), "{scheme}");
        assert_eq!(r[format!("{scheme}_data_key")], true, "{scheme}");
        assert_eq!(r[format!("{scheme}_data_key_wp")], true, "{scheme}");
        assert_eq!(r[format!("{scheme}_describe")], "Enabled", "{scheme}");
        assert_eq!(r[format!("{scheme}_tags")], serde_json::json!([{"TagKey": "team", "TagValue": "a"}]), "{scheme}");
        err(&format!("{scheme}_wrong_context"), "InvalidParameter", 400);
    }
    assert_eq!(r["alias_moved"], true);
    assert_eq!(r["list_aliases"], true);
    assert_eq!(r["list_keys_paging"], true);
    assert_eq!(
        r["internal_hidden"],
        serde_json::json!([
            true,
            ["Forbidden.KeyNotFound", 404, true],
            ["Forbidden.KeyNotFound", 404, true],
            ["Unsupported.Alias", 400, true]
        ])
    );
    assert_eq!(r["rotate"], serde_json::json!([true, true, "before rotation", "after rotation"]));
    assert_eq!(r["list_key_versions"], 2);
    assert_eq!(r["describe_key_version"], true);
    assert_eq!(r["re_encrypt"], serde_json::json!([true, "before rotation"]));
    assert_eq!(r["scheduled_state"], "PendingDeletion");
    assert_eq!(r["after_cancel"], "after rotation");
    assert_eq!(r["description"], "renamed");
    for alg in ["RSA_PSS_SHA_256", "RSA_PKCS1_SHA_256", "ECDSA_SHA_256"] {
        assert_eq!(r[format!("sign_{alg}")], true, "{alg}");
    }
    assert_eq!(r["asymmetric_decrypt"], "asym");
    assert_eq!(r["asymmetric_local"], "local");
    assert_eq!(r["verify_mac"], serde_json::json!([true, true, false]));
    err("dry_run", "DryRunOperation", 400);
    assert_eq!(r["secret"], serde_json::json!(["v2-data", "v2", ["ACSCurrent"], "v1-data", ["ACSPrevious"]]));
    assert_eq!(r["secret_describe"], "db");
    assert_eq!(r["secret_versions"], serde_json::json!(["v1", "v2"]));
    assert_eq!(r["secret_rolled_back"], "v1-data");
    assert_eq!(r["secret_listed"], true);
    assert_eq!(r["secret_filter"], true);
    assert_eq!(r["list_keys_filter"], true);
    err("err_bad_filter", "InvalidParameter", 400);
    assert_eq!(r["secret_deleted"], serde_json::json!([true, ["Forbidden.ResourceNotFound", 404, true]]));
    assert_eq!(r["secret_restored"], "v1-data");
    err("secret_forced", "Forbidden.ResourceNotFound", 404);
    err("err_secret_exists", "Rejected.ResourceExist", 400);
    assert_eq!(r["random_password"], serde_json::json!([20, true]));
    assert_eq!(r["import_state"], "PendingImport");
    assert_eq!(r["imported"], serde_json::json!(["Enabled", "imported"]));
    assert_eq!(r["imported_local"], "imported");
    assert_eq!(r["hsm_generated"], serde_json::json!(["HSM", "in the hsm"]));
    assert_eq!(
        r["hsm_imported"],
        serde_json::json!(["HSM", "Enabled", "imported into the hsm", "imported into the hsm"])
    );
    err("after_delete_material", "Rejected.PendingImport", 409);
    assert_eq!(r["reimported"], "imported");
    err("err_token_reused", "InvalidImportToken", 400);
    assert_eq!(r["transfer_from_openapi"], "openapi to instance");
    assert_eq!(r["transfer_to_openapi"], "instance to openapi");
    assert_eq!(r["transfer_data_key"], true);
    assert_eq!(r["core_decrypt"], "from the old sdk");
    assert_eq!(r["core_data_key"], true);
    assert_eq!(r["core_sign"], true);
    assert_eq!(r["core_get"], true, "GET with the parameters in the query");
    assert_eq!(r["xml_success"], serde_json::json!([200, "DescribeKeyResponse", true, true]));
    assert_eq!(r["xml_error"], serde_json::json!([404, "KMS", "Forbidden.KeyNotFound", "404"]));
    assert_eq!(r["replay_first"], true);

    // Every error code of the issue, as the SDKs parsed it.
    err("err_alias_exists", "AliasAlreadyExists", 409);
    err("err_alias_not_found", "Forbidden.AliasNotFound", 404);
    err("err_alias_key_not_found", "Forbidden.AliasNotFound", 404);
    err("err_unsupported_alias", "Unsupported.Alias", 400);
    err("err_key_version_not_found", "Forbidden.KeyVersionNotFound", 404);
    err("err_disabled", "Rejected.Disabled", 409);
    err("err_disabled_decrypt", "Rejected.Disabled", 409);
    err("err_pending_deletion", "Rejected.PendingDeletion", 409);
    err("err_state_modify", "Rejected.StateModifiedFailed", 409);
    err("err_pending_import", "Rejected.PendingImport", 409);
    err("err_invalid_token", "InvalidImportToken", 400);
    err("err_invalid_material", "InvalidKeyMaterial", 400);
    err("err_expired_token", "ExpiredImportToken", 400);
    err("err_unsupported_origin", "Unsupported.Origin", 400);
    err("err_unsupported_protection", "Unsupported.ProtectionLevel", 400);
    err("core_err_key_not_found", "Forbidden.KeyNotFound", 404);
    // aliyun-python-sdk-core recognises its own string to sign in the message and renames the error.
    err("core_wrong_secret", "InvalidAccessKeySecret", 400);
    err("err_wrong_secret_acs3", "SignatureDoesNotMatch", 400);
    err("err_wrong_secret_v1", "SignatureDoesNotMatch", 400);
    err("err_unknown_access_key", "InvalidAccessKeyId.NotFound", 404);
    err("err_revoked_access_key", "Forbidden.AccessKey", 403);
    err("err_replayed_nonce", "SignatureNonceUsed", 400);
    assert_eq!(r["err_replayed_nonce_v1"], serde_json::json!([true, ["SignatureNonceUsed", 400, true]]));
    err("err_stale_timestamp", "IllegalTimestamp", 400);
    err("err_stale_timestamp_v1", "IllegalTimestamp", 400);
    err("err_incomplete_signature", "IncompleteSignature", 400);
    err("err_missing_parameter", "MissingParameter", 400);
    err("err_parse", "ParseRequestParameterException", 400);
    err("err_invalid_parameter", "InvalidParameter", 400);
    err("err_unsupported_method", "UnsupportedHTTPMethod", 403);
    err("err_internal", "InternalFailure", 500);
    err("err_invalid_action", "InvalidAction", 403);
    err("err_key_usage", "Rejected.InvalidKeyUsage", 400);
    err("err_unsupported", "UnsupportedOperation", 400);
    err("err_secret_expired", "Rejected.Expired", 400);
    err("err_too_large", "InvalidParameter", 413);
    err("err_plaintext_too_large", "InvalidParameter", 400);
    assert_eq!(r["err_throttled"], serde_json::json!([["Rejected.Throttling", 429, true]]));
    err("err_unavailable", "ServiceUnavailableTemporary", 503);
    err("err_limit", "Rejected.LimitExceeded", 400);
    err("err_no_permission", "Forbidden.NoPermission", 403);
}
