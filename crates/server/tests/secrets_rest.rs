//! The secrets REST API over a real socket, mounted in the server's own router: every phase-1 code of the
//! vocabulary is provoked here (status, code, envelope), plus the conventions (request ids, rate-limit headers,
//! ETags, cursors), the data at rest, and a secret read back through the Alibaba instance API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kmsgate::app::App;
use kmsgate::config::Config;
use kmsgate_core::{Caller, Document, KeyRef, Precondition, TenantId};
use kmsgate_secrets::{SecretsConfig, SecretsState};
use serde_json::{Value, json};

struct Server {
    addr: SocketAddr,
    app: App,
    dir: tempfile::TempDir,
    admin: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve_router(router: axum::Router) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
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

async fn start_with(edit: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    edit(&mut config);
    let (app, _) = App::open(config).await.unwrap();
    let st = SecretsState::new(app.dispatcher.clone(), app.config.secrets.clone(), app.tenant.clone());
    let (admin, _) = kmsgate_secrets::bootstrap(&st, &app.tenant, 3600).await.unwrap().expect("fresh tenant");
    let (addr, stop) = serve_router(kmsgate::serve::router(&app)).await;
    Server { addr, app, dir, admin, _stop: stop }
}

async fn start() -> Server {
    start_with(|_| {}).await
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> common::Reply {
    let mut b = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

impl Server {
    async fn req(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> common::Reply {
        call(self.addr, method, path, Some(token), &[], body.map(|b| serde_json::to_vec(&b).unwrap())).await
    }

    async fn ok(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let r = self.req(method, path, token, body).await;
        assert!((200..300).contains(&r.status), "{method} {path}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        if r.body.is_empty() { Value::Null } else { r.json() }
    }

    /// Mints a token for an identity (created if needed) with scopes.
    async fn token_for(&self, typ: &str, id: &str, scopes: &[&str], extra: Value) -> String {
        let r = self
            .req("POST", "/v1/identities", &self.admin, Some(json!({"identity_type": typ, "identity_id": id})))
            .await;
        assert!(r.status == 201 || r.status == 409, "{}", String::from_utf8_lossy(&r.body));
        let mut body =
            json!({"name": format!("{id}-token"), "identity_type": typ, "identity_id": id, "scopes": scopes});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.ok("POST", "/v1/auth/tokens", &self.admin, Some(body)).await["token"].as_str().unwrap().to_owned()
    }
}

/// Status, code and the whole envelope, with the conventions' headers.
#[track_caller]
fn expect(r: &common::Reply, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let rid = r.headers.get("x-request-id").expect("X-Request-ID").to_str().unwrap();
    assert_eq!(e["request_id"], rid, "request_id equals X-Request-ID");
    for h in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"] {
        assert!(r.headers.contains_key(h), "{h} missing on {status} {code}");
    }
    assert_eq!(v.as_object().unwrap().len(), 1, "only `error` at the top: {v}");
    e["details"].clone()
}

#[tokio::test]
async fn conventions_envelope_request_ids_and_rate_limit_headers() {
    let s = start().await;
    // Unknown routes, methods and malformed JSON all get the envelope.
    let r = call(s.addr, "GET", "/v1/nope", None, &[], None).await;
    expect(&r, 404, "route_not_found");
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert!(rid.starts_with("req_") && rid.len() == 30, "generated req_<ULID>: {rid}");
    let r = call(s.addr, "POST", "/v1/auth/whoami", None, &[], None).await;
    expect(&r, 405, "method_not_allowed");
    let r = s.req("PUT", "/v1/secrets/app/db", &s.admin, None).await;
    expect(&r, 400, "invalid_request");
    let r = call(s.addr, "PUT", "/v1/secrets/app/db", Some(&s.admin), &[], Some(b"{\"data\": ".to_vec())).await;
    expect(&r, 400, "invalid_request");

    // A valid client request id is echoed; an invalid one is replaced.
    let r = call(s.addr, "GET", "/v1/auth/whoami", Some(&s.admin), &[("x-request-id", "abc.DEF-1_2")], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "abc.DEF-1_2");
    assert_eq!(r.headers["x-ratelimit-limit"], "300", "whoami category");
    let r = call(s.addr, "GET", "/v1/nope", None, &[("x-request-id", "bad id!")], None).await;
    assert!(r.headers["x-request-id"].to_str().unwrap().starts_with("req_"));

    // Health needs no token and carries the headers too.
    let r = call(s.addr, "GET", "/v1/health", None, &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert!(r.headers.contains_key("x-ratelimit-remaining"));
    let r = call(s.addr, "GET", "/v1/health/ready", None, &[], None).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ready")));

    // whoami
    let me = s.ok("GET", "/v1/auth/whoami", &s.admin, None).await;
    assert_eq!(me["identity_id"], "admin");
    assert_eq!(me["tenant_id"], "default");
    assert!(me["roles"].as_array().unwrap().iter().any(|r| r == "partner_admin"));

    // The OpenAPI document is served, and every operation it lists is routed (no token: 401, not 404/405).
    let r = call(s.addr, "GET", "/v1/openapi.json", None, &[], None).await;
    assert_eq!(r.json()["openapi"], "3.1.0");
    for op in kmsgate_secrets::openapi::OPS {
        let path = op.path.replace("{path}", "app/db").replace("{identity_type}", "user").replace(['{', '}'], "");
        let r = call(s.addr, &op.method.to_uppercase(), &path, None, &[], None).await;
        if op.auth {
            expect(&r, 401, "authentication_required");
        } else {
            assert_eq!(r.status, 200, "{} {path}", op.method);
        }
    }
}

#[tokio::test]
async fn tokens_401s_introspection_and_revocation() {
    let s = start().await;
    let r = call(s.addr, "GET", "/v1/auth/whoami", None, &[], None).await;
    expect(&r, 401, "authentication_required");
    let r = call(s.addr, "GET", "/v1/auth/whoami", None, &[("authorization", "Basic abc")], None).await;
    expect(&r, 401, "authentication_required");
    let r = call(s.addr, "GET", "/v1/auth/whoami", Some("svt_nonsense.sig"), &[], None).await;
    expect(&r, 401, "token_invalid");
    // A flipped signature byte.
    let mut forged = s.admin.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    expect(&call(s.addr, "GET", "/v1/auth/whoami", Some(&forged), &[], None).await, 401, "token_invalid");

    let short = s.token_for("service_account", "ci", &["secrets:read"], json!({"ttl": "1s"})).await;
    let minted = s.token_for("service_account", "ci", &["secrets:read", "secrets:list"], json!({})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect(&s.req("GET", "/v1/auth/whoami", &short, None).await, 401, "token_expired");

    // Introspection: active for a good token, 200 {"active": false} for bad ones.
    let i = s.ok("POST", "/v1/auth/introspect", &s.admin, Some(json!({"token": minted}))).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["identity_id"], "ci");
    for bad in ["svt_x.y", short.as_str(), "garbage"] {
        let i = s.ok("POST", "/v1/auth/introspect", &s.admin, Some(json!({"token": bad}))).await;
        assert_eq!(i, json!({"active": false}));
    }
    expect(&s.req("POST", "/v1/auth/introspect", &minted, Some(json!({"token": minted}))).await, 403, "forbidden");

    // List, get, revoke; the revoked token then fails everywhere.
    let list = s.ok("GET", "/v1/auth/tokens", &s.admin, None).await;
    assert!(list["tokens"].as_array().unwrap().len() >= 3);
    assert!(list["tokens"][0].get("token").is_none(), "tokens are shown once only");
    let who = s.ok("GET", "/v1/auth/whoami", &minted, None).await;
    let id = who["token_id"].as_str().unwrap().to_owned();
    assert_eq!(s.ok("GET", &format!("/v1/auth/tokens/{id}"), &s.admin, None).await["revoked"], false);
    let r = s.req("DELETE", &format!("/v1/auth/tokens/{id}"), &s.admin, None).await;
    assert_eq!(r.status, 204);
    expect(&s.req("GET", "/v1/auth/whoami", &minted, None).await, 401, "token_revoked");
    let i = s.ok("POST", "/v1/auth/introspect", &s.admin, Some(json!({"token": minted}))).await;
    assert_eq!(i, json!({"active": false}));
    // Unknown token ids are `forbidden`, never a probe.
    expect(&s.req("GET", "/v1/auth/tokens/tok_nope", &s.admin, None).await, 403, "forbidden");
    expect(&s.req("DELETE", "/v1/auth/tokens/tok_nope", &s.admin, None).await, 403, "forbidden");

    // Minting: broader than the caller, unknown identity, bad durations and shapes.
    let scoped = {
        // An admin-role identity holding only some scopes.
        s.ok(
            "POST",
            "/v1/identities",
            &s.admin,
            Some(json!({"identity_type": "user", "identity_id": "ops", "roles": ["admin"]})),
        )
        .await;
        let b = json!({"name": "ops", "identity_type": "user", "identity_id": "ops", "scopes": ["admin"]});
        let t = s.ok("POST", "/v1/auth/tokens", &s.admin, Some(b)).await["token"].as_str().unwrap().to_owned();
        let b = json!({"name": "narrow", "identity_type": "user", "identity_id": "ops", "scopes": ["secrets:read"]});
        s.ok("POST", "/v1/auth/tokens", &t, Some(b)).await["token"].as_str().unwrap().to_owned()
    };
    let b = json!({"name": "wide", "scopes": ["secrets:write"]});
    let d = expect(&s.req("POST", "/v1/auth/tokens", &scoped, Some(b)).await, 403, "insufficient_scope");
    assert!(d.is_null() || d.is_object());
    let b = json!({"name": "x", "identity_id": "ghost", "scopes": ["secrets:read"]});
    expect(&s.req("POST", "/v1/auth/tokens", &s.admin, Some(b)).await, 404, "identity_not_found");
    let b = json!({"name": "x", "scopes": ["secrets:read"], "ttl": "5 minutes"});
    expect(&s.req("POST", "/v1/auth/tokens", &s.admin, Some(b)).await, 400, "invalid_duration");
    let b = json!({"scopes": ["secrets:read"]});
    let d = expect(&s.req("POST", "/v1/auth/tokens", &s.admin, Some(b)).await, 422, "validation_error");
    assert_eq!(d["fields"][0]["field"], "name");
    assert_eq!(d["fields"][0]["code"], "required");
    let b = json!({"name": "x", "scopes": ["secrets:fly"]});
    expect(&s.req("POST", "/v1/auth/tokens", &s.admin, Some(b)).await, 422, "validation_error");
    // Deleting the identity ends its tokens too.
    let svc = s.token_for("service_account", "gone", &["secrets:read"], json!({})).await;
    let r = s.req("DELETE", "/v1/identities/service_account/gone", &s.admin, None).await;
    assert_eq!(r.status, 204);
    expect(&s.req("GET", "/v1/auth/whoami", &svc, None).await, 401, "token_revoked");
    expect(&s.req("GET", "/v1/identities/service_account/gone", &s.admin, None).await, 404, "identity_not_found");
}

#[tokio::test]
async fn secrets_lifecycle_and_their_codes() {
    let s = start().await;
    let a = s.admin.clone();
    // Create (201), update (200), ETag, versions, get by version.
    let put = |data: Value| json!({"data": data, "secret_type": "kv", "metadata": {"tags": ["db"], "owner": "team-a"}});
    let r = s.req("PUT", "/v1/secrets/app/db", &a, Some(put(json!({"password": "one"})))).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["version"], 1);
    assert_eq!(r.headers["etag"], "\"1\"");
    let r = s.req("PUT", "/v1/secrets/app/db", &a, Some(put(json!({"password": "two"})))).await;
    assert_eq!((r.status, r.json()["version"].as_u64()), (200, Some(2)));
    let r = s.req("GET", "/v1/secrets/app/db", &a, None).await;
    assert_eq!(r.json()["data"], json!({"password": "two"}));
    assert_eq!(r.headers["etag"], "\"2\"");
    assert_eq!(s.ok("GET", "/v1/secrets/app/db?version=1", &a, None).await["data"]["password"], "one");
    expect(&s.req("GET", "/v1/secrets/app/db?version=9", &a, None).await, 404, "version_not_found");
    expect(&s.req("GET", "/v1/secrets/app/none", &a, None).await, 404, "secret_not_found");

    // CAS by body and by If-Match.
    let b = json!({"data": {"p": "3"}, "options": {"cas": 1}});
    let d = expect(&s.req("PUT", "/v1/secrets/app/db", &a, Some(b)).await, 409, "version_conflict");
    assert_eq!((d["expected"].as_u64(), d["current"].as_u64()), (Some(1), Some(2)));
    let r = call(
        s.addr,
        "PUT",
        "/v1/secrets/app/db",
        Some(&a),
        &[("if-match", "\"1\"")],
        Some(br#"{"data":{"p":"3"}}"#.to_vec()),
    )
    .await;
    expect(&r, 409, "version_conflict");
    let r = call(
        s.addr,
        "PUT",
        "/v1/secrets/app/db",
        Some(&a),
        &[("if-match", "\"2\"")],
        Some(br#"{"data":{"p":"3"}}"#.to_vec()),
    )
    .await;
    assert_eq!(r.status, 200);

    // Validation codes, in the documented order.
    expect(&s.req("PUT", "/v1/secrets/a//b", &a, Some(put(json!({})))).await, 400, "invalid_path");
    expect(&s.req("GET", "/v1/secrets/a/..", &a, None).await, 400, "invalid_path");
    let b = json!({"data": {}, "secret_type": "blob"});
    expect(&s.req("PUT", "/v1/secrets/x", &a, Some(b)).await, 400, "invalid_secret_type");
    let b = json!({"data": {}, "options": {"expires_in": "1 day"}});
    expect(&s.req("PUT", "/v1/secrets/x", &a, Some(b)).await, 400, "invalid_duration");
    let d =
        expect(&s.req("PUT", "/v1/secrets/x", &a, Some(json!({"secret_type": "kv"}))).await, 422, "validation_error");
    assert_eq!(d["fields"][0]["field"], "data");
    let b = json!({"data": {}, "options": {"max_versions": 0}});
    expect(&s.req("PUT", "/v1/secrets/x", &a, Some(b)).await, 422, "validation_error");
    let b = json!({"data": {}, "options": {"rotation_policy_id": "rot_1"}});
    expect(&s.req("PUT", "/v1/secrets/x", &a, Some(b)).await, 404, "rotation_policy_not_found");
    let b = json!({"data": {}, "options": {"secret_policy_id": "sp_1"}});
    expect(&s.req("PUT", "/v1/secrets/x", &a, Some(b)).await, 404, "secret_policy_not_found");
    expect(&s.req("GET", "/v1/secrets?secret_type=blob", &a, None).await, 400, "invalid_secret_type");
    expect(&s.req("GET", "/v1/secrets?prefix=a//b", &a, None).await, 400, "invalid_path");
    expect(&s.req("GET", "/v1/secrets?expiring_within=soon", &a, None).await, 400, "invalid_duration");

    // max_versions pruning, versions listing with signed cursors.
    for i in 0..4 {
        let b = json!({"data": {"n": i}, "options": {"max_versions": 3}});
        s.ok("PUT", "/v1/secrets/app/pruned", &a, Some(b)).await;
    }
    let v = s.ok("GET", "/v1/secrets/app/pruned:versions?limit=2", &a, None).await;
    let nums: Vec<u64> = v["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(nums, [4, 3]);
    assert_eq!(v["has_more"], true);
    let cursor = v["cursor"].as_str().unwrap().to_owned();
    let v = s.ok("GET", &format!("/v1/secrets/app/pruned:versions?limit=2&cursor={cursor}"), &a, None).await;
    let nums: Vec<u64> = v["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!((nums, v["has_more"].as_bool()), (vec![2], Some(false)), "version 1 was pruned");
    expect(&s.req("GET", "/v1/secrets/app/pruned?version=1", &a, None).await, 404, "version_not_found");
    expect(&s.req("GET", "/v1/secrets/app/pruned:versions?cursor=xyz", &a, None).await, 400, "invalid_cursor");
    // A cursor is bound to its listing's filters.
    let url = format!("/v1/secrets/app/db:versions?cursor={cursor}");
    expect(&s.req("GET", &url, &a, None).await, 400, "invalid_cursor");

    // Metadata get/patch with its own ETag; PATCH writes no version.
    let r = s.req("GET", "/v1/secrets/app/db:metadata", &a, None).await;
    let m = r.json();
    assert!(m.get("data").is_none());
    assert_eq!(m["current_version"], 3);
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let r = call(
        s.addr,
        "PATCH",
        "/v1/secrets/app/db:metadata",
        Some(&a),
        &[("if-match", "\"999\"")],
        Some(br#"{"metadata":{"description":"x"}}"#.to_vec()),
    )
    .await;
    expect(&r, 409, "version_conflict");
    let r = call(
        s.addr,
        "PATCH",
        "/v1/secrets/app/db:metadata",
        Some(&a),
        &[("if-match", etag.as_str())],
        Some(br#"{"metadata":{"description":"primary db"},"max_versions":5}"#.to_vec()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["current_version"], 3);
    assert_eq!(r.json()["metadata"]["description"], "primary db");
    expect(
        &s.req("PATCH", "/v1/secrets/app/none:metadata", &a, Some(json!({"max_versions": 3}))).await,
        404,
        "secret_not_found",
    );
    expect(
        &s.req("PATCH", "/v1/secrets/app/db:metadata", &a, Some(json!({"expires_in": "x"}))).await,
        400,
        "invalid_duration",
    );

    // Rollback: a new version with old data.
    let r = s.ok("POST", "/v1/secrets/app/db:rollback", &a, Some(json!({"version": 1}))).await;
    assert_eq!((r["version"].as_u64(), r["rolled_back_to"].as_u64()), (Some(4), Some(1)));
    assert_eq!(s.ok("GET", "/v1/secrets/app/db", &a, None).await["data"]["password"], "one");
    expect(
        &s.req("POST", "/v1/secrets/app/db:rollback", &a, Some(json!({"version": 77}))).await,
        404,
        "version_not_found",
    );
    let b = json!({"version": 1, "cas": 2});
    expect(&s.req("POST", "/v1/secrets/app/db:rollback", &a, Some(b)).await, 409, "version_conflict");
    expect(&s.req("POST", "/v1/secrets/app/db:rollback", &a, Some(json!({}))).await, 422, "validation_error");

    // Listing with filters and the batch read.
    s.ok("PUT", "/v1/secrets/app/api", &a, Some(json!({"data": {"k": "v"}, "secret_type": "api_key"}))).await;
    s.ok("PUT", "/v1/secrets/other/x", &a, Some(json!({"data": {"k": "v"}}))).await;
    let l = s.ok("GET", "/v1/secrets?prefix=app&secret_type=api_key", &a, None).await;
    let paths: Vec<&str> = l["secrets"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["app/api"]);
    let l = s.ok("GET", "/v1/secrets?tag=db", &a, None).await;
    assert_eq!(l["secrets"].as_array().unwrap().len(), 1);
    let l = s.ok("GET", "/v1/secrets?limit=1", &a, None).await;
    assert_eq!(l["has_more"], true);
    let c = l["cursor"].as_str().unwrap().to_owned();
    expect(&s.req("GET", &format!("/v1/secrets?limit=1&prefix=app&cursor={c}"), &a, None).await, 400, "invalid_cursor");
    let b = json!({"paths": ["app/db", "app/none", "app/api"]});
    let br = s.ok("POST", "/v1/secrets:batch-read", &a, Some(b)).await;
    assert_eq!(br["secrets"]["app/db"]["data"]["password"], "one");
    assert_eq!(br["errors"]["app/none"]["code"], "secret_not_found");
    expect(&s.req("POST", "/v1/secrets:batch-read", &a, Some(json!({"paths": ["a//b"]}))).await, 400, "invalid_path");
    let many: Vec<String> = (0..101).map(|i| format!("p{i}")).collect();
    expect(&s.req("POST", "/v1/secrets:batch-read", &a, Some(json!({"paths": many}))).await, 422, "validation_error");

    // Soft delete with retention, secret_exists inside it, restore, permanent delete.
    let d = s.ok("DELETE", "/v1/secrets/other/x", &a, None).await;
    assert!(d["recoverable_until"].is_string());
    expect(&s.req("GET", "/v1/secrets/other/x", &a, None).await, 404, "secret_not_found");
    let det = expect(&s.req("PUT", "/v1/secrets/other/x", &a, Some(json!({"data": {}}))).await, 409, "secret_exists");
    assert_eq!(det["recoverable_until"], d["recoverable_until"]);
    let l = s.ok("GET", "/v1/secrets?include_deleted=only", &a, None).await;
    assert_eq!(l["secrets"][0]["path"], "other/x");
    expect(&s.req("GET", "/v1/secrets?include_deleted=maybe", &a, None).await, 422, "validation_error");
    let r = s.ok("POST", "/v1/secrets/other/x:restore", &a, None).await;
    assert_eq!(r["deleted"], false);
    assert_eq!(s.ok("GET", "/v1/secrets/other/x", &a, None).await["data"]["k"], "v");
    expect(&s.req("POST", "/v1/secrets/other/none:restore", &a, None).await, 404, "secret_not_found");
    let r = s.req("DELETE", "/v1/secrets/other/x?permanent=true", &a, None).await;
    assert_eq!(r.status, 204);
    expect(&s.req("DELETE", "/v1/secrets/other/x", &a, None).await, 404, "secret_not_found");
    s.ok("PUT", "/v1/secrets/other/x", &a, Some(json!({"data": {"fresh": true}}))).await;

    // Expiry: 410 with the expiry time, metadata still listable with expired:true; a new PUT revives.
    let b = json!({"data": {"t": 1}, "options": {"expires_in": "1s"}});
    s.ok("PUT", "/v1/secrets/app/temp", &a, Some(b)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let d = expect(&s.req("GET", "/v1/secrets/app/temp", &a, None).await, 410, "secret_expired");
    assert!(d["expired_at"].is_string() || d["expired_at"].is_number(), "{d}");
    let m = s.ok("GET", "/v1/secrets/app/temp:metadata", &a, None).await;
    assert_eq!(m["expired"], true);
    let l = s.ok("GET", "/v1/secrets?expiring_within=1h", &a, None).await;
    assert!(l["secrets"].as_array().unwrap().iter().any(|s| s["path"] == "app/temp" && s["expired"] == true));
    let br = s.ok("POST", "/v1/secrets:batch-read", &a, Some(json!({"paths": ["app/temp"]}))).await;
    assert_eq!(br["errors"]["app/temp"]["code"], "secret_expired");
    s.ok("PUT", "/v1/secrets/app/temp", &a, Some(json!({"data": {"t": 2}}))).await;
    assert_eq!(s.ok("GET", "/v1/secrets/app/temp", &a, None).await["data"]["t"], 2);

    // Phase-2 resources answer feature_disabled (after authentication), never pretend.
    expect(&s.req("POST", "/v1/secrets/app/db:rotate", &a, None).await, 503, "feature_disabled");
    expect(&s.req("GET", "/v1/webhooks", &a, None).await, 503, "feature_disabled");
    expect(&call(s.addr, "GET", "/v1/webhooks", None, &[], None).await, 401, "authentication_required");
    expect(&s.req("GET", "/v1/secrets/app/db:bogus", &a, None).await, 404, "route_not_found");
}

#[tokio::test]
async fn policies_bindings_and_the_403s() {
    let s = start().await;
    let a = s.admin.clone();
    s.ok("PUT", "/v1/secrets/app/db", &a, Some(json!({"data": {"p": "x"}}))).await;
    s.ok("PUT", "/v1/secrets/team/b", &a, Some(json!({"data": {"p": "y"}}))).await;
    let user = s.token_for("user", "alice", &["secrets:read", "secrets:list"], json!({})).await;

    // Deny by default; not-found only after authorization (no probing).
    expect(&s.req("GET", "/v1/secrets/app/db", &user, None).await, 403, "access_denied");
    expect(&s.req("GET", "/v1/secrets/app/nothing", &user, None).await, 403, "access_denied");
    expect(&s.req("GET", "/v1/secrets", &user, None).await, 403, "access_denied");
    // Admin routes: the role first, then the scope.
    expect(&s.req("GET", "/v1/policies", &user, None).await, 403, "forbidden");
    expect(&s.req("GET", "/v1/tenants", &user, None).await, 403, "forbidden");
    expect(&s.req("PUT", "/v1/secrets/app/db", &user, Some(json!({"data": {}}))).await, 403, "insufficient_scope");

    // Policy validation codes.
    let pol = |name: &str, rules: Value| json!({"name": name, "rules": rules});
    expect(&s.req("POST", "/v1/policies", &a, Some(pol("p", json!([])))).await, 400, "invalid_policy");
    let bad = json!([{"path_pattern": "app/**", "permissions": ["fly"]}]);
    expect(&s.req("POST", "/v1/policies", &a, Some(pol("p", bad))).await, 400, "invalid_policy");
    let bad = json!([{"path_pattern": "app/x**", "permissions": ["read"]}]);
    let d = expect(&s.req("POST", "/v1/policies", &a, Some(pol("p", bad))).await, 400, "invalid_glob");
    assert_eq!((d["position"].as_u64(), d["pattern"].as_str()), (Some(5), Some("app/x**")));
    let bad = json!([{"path_pattern": "a", "permissions": ["read"], "conditions": {"ip_ranges": ["300.0.0.0/8"]}}]);
    expect(&s.req("POST", "/v1/policies", &a, Some(pol("p", bad))).await, 400, "invalid_policy");
    let bad = json!([{"path_pattern": "a", "permissions": ["read"], "conditions": {"mfa_max_age": "ten"}}]);
    expect(&s.req("POST", "/v1/policies", &a, Some(pol("p", bad))).await, 400, "invalid_duration");
    expect(&s.req("POST", "/v1/policies", &a, Some(json!({"rules": []}))).await, 422, "validation_error");

    // A read policy on app/**, bound to alice.
    let rules = json!([{"path_pattern": "app/**", "permissions": ["read", "list"]}]);
    let r = s.req("POST", "/v1/policies", &a, Some(pol("app-read", rules.clone()))).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let pid = r.json()["id"].as_str().unwrap().to_owned();
    assert!(pid.starts_with("pol_"));
    expect(&s.req("POST", "/v1/policies", &a, Some(pol("app-read", rules))).await, 409, "name_conflict");
    let bind = json!({"identity_type": "user", "identity_id": "alice"});
    let b = s.ok("POST", &format!("/v1/policies/{pid}/bindings"), &a, Some(bind.clone())).await;
    let bid = b["id"].as_str().unwrap().to_owned();
    assert!(bid.starts_with("bnd_"));
    expect(&s.req("POST", &format!("/v1/policies/{pid}/bindings"), &a, Some(bind)).await, 409, "binding_conflict");
    let ghost = json!({"identity_type": "user", "identity_id": "ghost"});
    expect(&s.req("POST", &format!("/v1/policies/{pid}/bindings"), &a, Some(ghost)).await, 404, "identity_not_found");
    let nb = json!({"identity_type": "user", "identity_id": "alice"});
    expect(&s.req("POST", "/v1/policies/pol_nope/bindings", &a, Some(nb)).await, 404, "policy_not_found");
    expect(&s.req("GET", "/v1/policies/pol_nope", &a, None).await, 404, "policy_not_found");
    expect(
        &s.req("DELETE", &format!("/v1/policies/{pid}/bindings/bnd_nope"), &a, None).await,
        404,
        "binding_not_found",
    );

    assert_eq!(s.ok("GET", "/v1/secrets/app/db", &user, None).await["data"]["p"], "x");
    expect(&s.req("GET", "/v1/secrets/team/b", &user, None).await, 403, "access_denied");
    expect(&s.req("GET", "/v1/secrets/app/nothing", &user, None).await, 404, "secret_not_found");
    let l = s.ok("GET", "/v1/secrets", &user, None).await;
    let paths: Vec<&str> = l["secrets"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["app/db"], "listing shows only what the policies allow");
    let br = s.ok("POST", "/v1/secrets:batch-read", &user, Some(json!({"paths": ["app/db", "team/b"]}))).await;
    assert_eq!(br["errors"]["team/b"]["code"], "access_denied");

    // Policy test.
    let t = json!({"identity_type": "user", "identity_id": "alice", "path": "app/db", "permission": "read"});
    let r = s.ok("POST", "/v1/policies:test", &a, Some(t)).await;
    assert_eq!((r["allowed"].as_bool(), r["matched_policy"].as_str()), (Some(true), Some(pid.as_str())));
    let t = json!({"identity_type": "user", "identity_id": "alice", "path": "app/db", "permission": "write"});
    assert_eq!(s.ok("POST", "/v1/policies:test", &a, Some(t)).await["code"], "access_denied");
    let t = json!({"identity_type": "user", "identity_id": "ghost", "path": "app/db", "permission": "read"});
    expect(&s.req("POST", "/v1/policies:test", &a, Some(t)).await, 404, "identity_not_found");
    let t = json!({"identity_type": "user", "identity_id": "alice", "path": "a//b", "permission": "read"});
    expect(&s.req("POST", "/v1/policies:test", &a, Some(t)).await, 400, "invalid_path");

    // policy_in_use unless forced.
    expect(&s.req("DELETE", &format!("/v1/policies/{pid}"), &a, None).await, 409, "policy_in_use");

    // Conditions: MFA, then IP, then time window, each with details.condition.
    let today = time::OffsetDateTime::now_utc().weekday();
    let other_day = match today {
        time::Weekday::Monday => "tue",
        _ => "mon",
    };
    let cond = json!([{"path_pattern": "team/**", "permissions": ["read"], "conditions": {
        "require_mfa": true, "ip_ranges": ["10.0.0.0/8"],
        "time_window": {"days": [other_day], "start": "00:00", "end": "23:59", "timezone": "UTC"}}}]);
    let cid = s.ok("POST", "/v1/policies", &a, Some(pol("team-cond", cond))).await["id"].as_str().unwrap().to_owned();
    s.ok(
        "POST",
        &format!("/v1/policies/{cid}/bindings"),
        &a,
        Some(json!({"identity_type": "group", "identity_id": "eng"})),
    )
    .await;
    s.ok("POST", "/v1/identities", &a, Some(json!({"identity_type": "user", "identity_id": "bob", "groups": ["eng"]})))
        .await;
    let bob = s.token_for("user", "bob", &["secrets:read"], json!({})).await;
    let d = expect(&s.req("GET", "/v1/secrets/team/b", &bob, None).await, 403, "mfa_required");
    assert_eq!(d["condition"], "mfa");
    let bob_mfa = s.token_for("user", "bob", &["secrets:read"], json!({"mfa": true})).await;
    let d = expect(&s.req("GET", "/v1/secrets/team/b", &bob_mfa, None).await, 403, "ip_not_allowed");
    assert_eq!(d["condition"], "ip");
    let ip_ok = json!({"rules": [{"path_pattern": "team/**", "permissions": ["read"], "conditions": {
        "require_mfa": true, "ip_ranges": ["127.0.0.0/8", "::1/128"],
        "time_window": {"days": [other_day], "start": "00:00", "end": "23:59"}}}]});
    s.ok("PATCH", &format!("/v1/policies/{cid}"), &a, Some(ip_ok)).await;
    let d = expect(&s.req("GET", "/v1/secrets/team/b", &bob_mfa, None).await, 403, "time_window_violation");
    assert_eq!(d["condition"], "time_window");
    let open = json!({"rules": [{"path_pattern": "team/**", "permissions": ["read"], "conditions": {
        "require_mfa": true, "ip_ranges": ["127.0.0.0/8", "::1/128"]}}]});
    let r = s.req("GET", &format!("/v1/policies/{cid}"), &a, None).await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let stale = call(
        s.addr,
        "PATCH",
        &format!("/v1/policies/{cid}"),
        Some(&a),
        &[("if-match", "\"1\"")],
        Some(serde_json::to_vec(&open).unwrap()),
    )
    .await;
    expect(&stale, 409, "version_conflict");
    let r = call(
        s.addr,
        "PATCH",
        &format!("/v1/policies/{cid}"),
        Some(&a),
        &[("if-match", &etag)],
        Some(serde_json::to_vec(&open).unwrap()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(s.ok("GET", "/v1/secrets/team/b", &bob_mfa, None).await["data"]["p"], "y");

    // Removing the binding takes the access away; forced delete removes bindings too.
    let r = s.req("DELETE", &format!("/v1/policies/{pid}/bindings/{bid}"), &a, None).await;
    assert_eq!(r.status, 204);
    expect(&s.req("GET", "/v1/secrets/app/db", &user, None).await, 403, "access_denied");
    let r = s.req("DELETE", &format!("/v1/policies/{cid}?force=true"), &a, None).await;
    assert_eq!(r.status, 204);
    expect(&s.req("GET", "/v1/secrets/team/b", &bob_mfa, None).await, 403, "access_denied");
    let list = s.ok("GET", "/v1/policies", &a, None).await;
    assert_eq!(list["policies"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tenants_quotas_and_rate_limits() {
    let s = start().await;
    let a = s.admin.clone();
    let t = json!({"tenant_id": "small", "name": "Small", "retention": "7d", "quotas": {"secrets": 1},
                   "rate_limits": {"whoami": 2}});
    let r = s.req("POST", "/v1/tenants", &a, Some(t.clone())).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    expect(&s.req("POST", "/v1/tenants", &a, Some(t)).await, 409, "name_conflict");
    let bad = json!({"tenant_id": "x1", "retention": "forever"});
    expect(&s.req("POST", "/v1/tenants", &a, Some(bad)).await, 400, "invalid_duration");
    expect(&s.req("GET", "/v1/tenants/nope", &a, None).await, 404, "tenant_not_found");

    // Tenant by path prefix and by header; unknown tenants are 404 for partner admins.
    let r = s.req("PUT", "/v1/t/small/secrets/one", &a, Some(json!({"data": {"v": 1}}))).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let d = expect(
        &call(
            s.addr,
            "PUT",
            "/v1/secrets/two",
            Some(&a),
            &[("x-tenant-id", "small")],
            Some(br#"{"data":{}}"#.to_vec()),
        )
        .await,
        429,
        "quota_exceeded",
    );
    assert_eq!((d["quota"].as_str(), d["limit"].as_u64(), d["current"].as_u64()), (Some("secrets"), Some(1), Some(1)));
    expect(&s.req("GET", "/v1/secrets/one", &a, None).await, 404, "secret_not_found");
    assert_eq!(s.ok("GET", "/v1/t/small/secrets/one", &a, None).await["data"]["v"], 1);
    expect(&s.req("GET", "/v1/t/nope/secrets/one", &a, None).await, 404, "tenant_not_found");
    // Soft delete uses the tenant's retention (7 days).
    let d = s.ok("DELETE", "/v1/t/small/secrets/one", &a, None).await;
    let del =
        time::OffsetDateTime::parse(d["deleted_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    let until = time::OffsetDateTime::parse(
        d["recoverable_until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((until - del).whole_days(), 7);
    // The restored secret counts against the quota again.
    s.ok("PUT", "/v1/t/small/secrets/two", &a, Some(json!({"data": {}}))).await;
    expect(&s.req("POST", "/v1/t/small/secrets/one:restore", &a, None).await, 429, "quota_exceeded");

    // Cross-tenant without partner admin.
    let user = s.token_for("service_account", "app", &["secrets:read"], json!({})).await;
    expect(&s.req("GET", "/v1/t/small/secrets/two", &user, None).await, 403, "tenant_access_denied");
    let r = call(s.addr, "GET", "/v1/auth/whoami", Some(&user), &[("x-tenant-id", "nope")], None).await;
    expect(&r, 403, "tenant_access_denied");

    // Rate limits: the tenant's whoami budget is 2 per minute.
    let r = s.req("GET", "/v1/t/small/auth/whoami", &a, None).await;
    assert_eq!((r.status, r.headers["x-ratelimit-limit"].to_str().unwrap()), (200, "2"));
    assert_eq!(r.headers["x-ratelimit-remaining"], "1");
    s.ok("GET", "/v1/t/small/auth/whoami", &a, None).await;
    let r = s.req("GET", "/v1/t/small/auth/whoami", &a, None).await;
    let d = expect(&r, 429, "rate_limited");
    assert_eq!(
        (d["category"].as_str(), d["limit"].as_u64(), d["window_seconds"].as_u64()),
        (Some("whoami"), Some(2), Some(60))
    );
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&after), "{after}");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    // Other categories and the home tenant are separate buckets.
    s.ok("GET", "/v1/auth/whoami", &a, None).await;

    // Token and policy quotas of a tenant.
    let tiny = json!({"tenant_id": "tiny", "quotas": {"tokens": 1, "policies": 1}});
    s.ok("POST", "/v1/tenants", &a, Some(tiny)).await;
    s.ok("POST", "/v1/t/tiny/identities", &a, Some(json!({"identity_type": "service_account", "identity_id": "ci"})))
        .await;
    let mint = json!({"name": "ci", "identity_id": "ci", "scopes": ["secrets:read"]});
    s.ok("POST", "/v1/t/tiny/auth/tokens", &a, Some(mint.clone())).await;
    let d = expect(&s.req("POST", "/v1/t/tiny/auth/tokens", &a, Some(mint)).await, 429, "quota_exceeded");
    assert_eq!(d["quota"], "tokens");
    let rules = json!([{"path_pattern": "**", "permissions": ["read"]}]);
    s.ok("POST", "/v1/t/tiny/policies", &a, Some(json!({"name": "one", "rules": rules.clone()}))).await;
    let d = expect(
        &s.req("POST", "/v1/t/tiny/policies", &a, Some(json!({"name": "two", "rules": rules}))).await,
        429,
        "quota_exceeded",
    );
    assert_eq!(d["quota"], "policies");

    // PATCH with ETag, list, delete.
    let r = s.req("GET", "/v1/tenants/small", &a, None).await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let r = call(
        s.addr,
        "PATCH",
        "/v1/tenants/small",
        Some(&a),
        &[("if-match", "\"99\"")],
        Some(br#"{"name":"S"}"#.to_vec()),
    )
    .await;
    expect(&r, 409, "version_conflict");
    let r = call(
        s.addr,
        "PATCH",
        "/v1/tenants/small",
        Some(&a),
        &[("if-match", &etag)],
        Some(br#"{"quotas":{"secrets":5}}"#.to_vec()),
    )
    .await;
    assert_eq!(r.status, 200);
    s.ok("POST", "/v1/t/small/secrets/one:restore", &a, None).await;
    let l = s.ok("GET", "/v1/tenants", &a, None).await;
    assert_eq!(l["tenants"].as_array().unwrap().len(), 3);
    assert_eq!(s.req("DELETE", "/v1/tenants/small", &a, None).await.status, 204);
    expect(&s.req("GET", "/v1/t/small/secrets/one", &a, None).await, 404, "tenant_not_found");
}

#[tokio::test]
async fn dependency_failures_maintenance_and_internal_errors() {
    let s = start().await;
    let a = s.admin.clone();
    s.ok("PUT", "/v1/secrets/app/db", &a, Some(json!({"data": {"p": "x"}}))).await;

    // Maintenance switch: everything but health answers 503 maintenance_mode with Retry-After.
    let cfg = SecretsConfig { maintenance_mode: true, ..SecretsConfig::default() };
    let (addr, _stop) =
        serve_router(kmsgate_secrets::router(s.app.dispatcher.clone(), cfg, s.app.tenant.clone())).await;
    let r = call(addr, "GET", "/v1/secrets/app/db", Some(&a), &[], None).await;
    expect(&r, 503, "maintenance_mode");
    assert!(r.headers.contains_key("retry-after"));
    expect(&call(addr, "GET", "/v1/health", None, &[], None).await, 503, "maintenance_mode");

    // The KMS refuses (the tenant's secrets key disabled): 500 encryption_error, nothing leaked.
    // No caller reaches the internal key, the admin included: the test disables it in the store.
    let admin = Caller::admin(TenantId::default_tenant());
    let key = kmsgate_core::AliasName::parse("alias/kmsgate-internal/secrets").unwrap();
    let refused = s.app.dispatcher.disable_key(&admin, &KeyRef::Alias(key.clone())).await.unwrap_err();
    assert_eq!(refused.kind(), kmsgate_core::ErrorKind::KeyNotFound);
    let d = &s.app.dispatcher;
    common::set_internal_key_state(d, &admin.tenant, key.as_str(), kmsgate_core::KeyState::Disabled).await;
    expect(&s.req("GET", "/v1/secrets/app/db", &a, None).await, 500, "encryption_error");
    common::set_internal_key_state(d, &admin.tenant, key.as_str(), kmsgate_core::KeyState::Enabled).await;
    assert_eq!(s.ok("GET", "/v1/secrets/app/db", &a, None).await["data"]["p"], "x");

    // A record the API cannot read is an internal error, never an authentication verdict.
    let t = s.token_for("service_account", "broken", &["secrets:read"], json!({})).await;
    let doc =
        Document::new("secrets.identity", "default/service_account/broken", admin.tenant.clone(), json!({"x": 1}));
    s.app.dispatcher.put_document(&admin, doc, Precondition::Any).await.unwrap();
    expect(&s.req("GET", "/v1/auth/whoami", &t, None).await, 500, "internal_error");

    // The store fails (a table vanished): 500 storage_error.
    let db = s.dir.path().join("data").join("kmsgate.db");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('ALTER TABLE secret_versions RENAME TO moved'); c.commit()")
        .arg(&db)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = expect(&s.req("GET", "/v1/secrets/app/db", &a, None).await, 500, "storage_error");
    assert!(d.is_null());

    // The KMS misses its deadline: 503 service_unavailable with Retry-After.
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let fast = common::software_backend(dir.path());
    let (d, _) = common::dispatcher_over(store.clone(), fast, Duration::from_secs(5)).await;
    let st = SecretsState::new(d, SecretsConfig::default(), TenantId::default_tenant());
    let (token, _) = kmsgate_secrets::bootstrap(&st, &TenantId::default_tenant(), 3600).await.unwrap().unwrap();
    let slow = std::sync::Arc::new(common::SlowBackend {
        inner: common::software_backend(dir.path()),
        delay: Duration::from_millis(400),
    });
    let (d, _) = common::dispatcher_over(store, slow, Duration::from_millis(100)).await;
    let (addr, _stop2) =
        serve_router(kmsgate_secrets::router(d, SecretsConfig::default(), TenantId::default_tenant())).await;
    let r = call(addr, "GET", "/v1/secrets/app/db", Some(&token), &[], None).await;
    expect(&r, 503, "service_unavailable");
    assert!(r.headers.contains_key("retry-after"));
}

/// The store never holds a secret value in plain: grep the SQLite file (and its WAL) for it.
#[tokio::test]
async fn the_database_file_holds_no_plaintext() {
    let s = start().await;
    let marker = "PLAINTEXT-MARKER-7f3a9c1e5b";
    s.ok("PUT", "/v1/secrets/app/marker", &s.admin, Some(json!({"data": {"password": marker}}))).await;
    s.ok("PUT", "/v1/secrets/app/marker", &s.admin, Some(json!({"data": {"password": format!("{marker}-2")}}))).await;
    assert_eq!(s.ok("GET", "/v1/secrets/app/marker", &s.admin, None).await["data"]["password"], format!("{marker}-2"));
    let mut seen_any = false;
    for entry in std::fs::read_dir(s.dir.path().join("data")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("kmsgate.db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        seen_any |= !bytes.is_empty();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "{name} holds the plaintext");
        // The path (metadata) is stored in plain, which shows the grep looks at the right file.
        let _ = bytes.windows(10).any(|w| w == b"app/marker");
    }
    assert!(seen_any, "the SQLite file exists");
    let db = std::fs::read(s.dir.path().join("data").join("kmsgate.db")).unwrap_or_default();
    let wal = std::fs::read(s.dir.path().join("data").join("kmsgate.db-wal")).unwrap_or_default();
    let path_seen = [db, wal].iter().any(|b| b.windows(10).any(|w| w == b"app/marker"));
    assert!(path_seen, "the grep reads the file the secrets are in");
}

/// A secret written through REST is read through the Alibaba instance API's GetSecretValue.
#[tokio::test]
async fn rest_secret_is_read_through_alibaba_get_secret_value() {
    use kmsgate_alibaba::{clientkey, proto};
    use prost::Message as _;

    let s = start().await;
    s.ok("PUT", "/v1/secrets/payments/api-key", &s.admin, Some(json!({"data": {"key": "sk_live_123"}}))).await;
    s.ok("PUT", "/v1/secrets/payments/api-key", &s.admin, Some(json!({"data": {"key": "sk_live_456"}}))).await;
    let admin = s.app.admin();
    let ck = clientkey::create(&s.app.dispatcher, &admin, "app", "").await.unwrap();
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();
    let body = proto::GetSecretValueRequest { secret_name: "payments/api-key".to_owned(), ..Default::default() }
        .encode_to_vec();
    let headers = common::alibaba_signed(&pair, &ck.id, "GetSecretValue", &body);
    let mut b = hyper::Request::builder().method("POST").uri("/").header("host", s.addr.to_string());
    for (k, v) in &headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let r = common::send_on(stream, false, b.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = proto::GetSecretValueResponse::decode(&*r.body).unwrap();
    assert_eq!(v.secret_name, "payments/api-key");
    let data: Value = serde_json::from_str(&v.secret_data).unwrap();
    assert_eq!(data, json!({"key": "sk_live_456"}));
    assert_eq!(v.version_id, "2");
}

/// Two replicas on one store: a token revoked through one is refused by the other once it has read the
/// change feed (the server polls it every `server.change_poll_ms`), though the other had it cached.
#[tokio::test]
async fn revocation_reaches_another_replica_through_the_change_feed() {
    let s = start().await;
    let config = Config { data_dir: s.dir.path().join("data"), ..Config::default() };
    let (replica, _) = App::open(config).await.unwrap();
    let (addr2, _stop) = serve_router(kmsgate::serve::router(&replica)).await;
    let t = s.token_for("service_account", "ci", &["secrets:read"], json!({})).await;
    let who = call(addr2, "GET", "/v1/auth/whoami", Some(&t), &[], None).await;
    assert_eq!(who.status, 200, "the replica verifies the token and caches its record");
    let id = who.json()["token_id"].as_str().unwrap().to_owned();
    assert_eq!(s.req("DELETE", &format!("/v1/auth/tokens/{id}"), &s.admin, None).await.status, 204);
    assert!(replica.dispatcher.apply_changes().await.unwrap() > 0);
    expect(&call(addr2, "GET", "/v1/auth/whoami", Some(&t), &[], None).await, 401, "token_revoked");

    // A binding removed through one replica stops granting on the other (its bindings cache follows the feed).
    let a = s.admin.clone();
    s.ok("PUT", "/v1/secrets/app/db", &a, Some(json!({"data": {"p": 1}}))).await;
    let reader = s.token_for("user", "carol", &["secrets:read"], json!({})).await;
    let rules = json!([{"path_pattern": "app/**", "permissions": ["read"]}]);
    let pid = s.ok("POST", "/v1/policies", &a, Some(json!({"name": "r", "rules": rules}))).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bind = json!({"identity_type": "user", "identity_id": "carol"});
    let bid =
        s.ok("POST", &format!("/v1/policies/{pid}/bindings"), &a, Some(bind)).await["id"].as_str().unwrap().to_owned();
    replica.dispatcher.apply_changes().await.unwrap();
    let r = call(addr2, "GET", "/v1/secrets/app/db", Some(&reader), &[], None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(s.req("DELETE", &format!("/v1/policies/{pid}/bindings/{bid}"), &a, None).await.status, 204);
    replica.dispatcher.apply_changes().await.unwrap();
    // The feed's subscribers run on their own task: give it a moment.
    let mut code = 0;
    for _ in 0..50 {
        code = call(addr2, "GET", "/v1/secrets/app/db", Some(&reader), &[], None).await.status;
        if code == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code, 403, "the replica dropped the binding");
}

/// The sweeper (the server's periodic `purge_deleted_secrets`) frees a path once the tenant's retention has
/// passed; before that a write there is `secret_exists`.
#[tokio::test]
async fn soft_deleted_secrets_are_purged_after_the_tenant_retention() {
    let s = start().await;
    let a = s.admin.clone();
    let r = call(s.addr, "PATCH", "/v1/tenants/default", Some(&a), &[], Some(br#"{"retention":"1s"}"#.to_vec())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    s.ok("PUT", "/v1/secrets/old/one", &a, Some(json!({"data": {"v": 1}}))).await;
    s.ok("DELETE", "/v1/secrets/old/one", &a, None).await;
    expect(&s.req("PUT", "/v1/secrets/old/one", &a, Some(json!({"data": {"v": 2}}))).await, 409, "secret_exists");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let purged = s.app.dispatcher.purge_deleted_secrets(&s.app.admin()).await.unwrap();
    assert_eq!(purged.len(), 1);
    expect(&s.req("POST", "/v1/secrets/old/one:restore", &a, None).await, 404, "secret_not_found");
    let r = s.req("PUT", "/v1/secrets/old/one", &a, Some(json!({"data": {"v": 3}}))).await;
    assert_eq!((r.status, r.json()["version"].as_u64()), (201, Some(1)), "a new secret at the freed path");
}

/// With a PKCS#11 HSM as the default backend, the key that wraps every secret's data keys lives in the HSM
/// (SoftHSM here): the REST API round-trips a secret through it.
#[tokio::test]
async fn secrets_are_protected_by_the_hsm() {
    let s = start_with(|c| {
        c.backend.pkcs11 = vec![common::pkcs11_config("hsm")];
        c.backend.default = "hsm".to_owned();
    })
    .await;
    let a = s.admin.clone();
    s.ok("PUT", "/v1/secrets/hsm/db", &a, Some(json!({"data": {"password": "in-the-hsm"}}))).await;
    assert_eq!(s.ok("GET", "/v1/secrets/hsm/db", &a, None).await["data"]["password"], "in-the-hsm");
    let key = common::internal_key(&s.app.dispatcher, &s.app.tenant, "alias/kmsgate-internal/secrets").await;
    assert!(key.internal);
    assert!(key.versions.iter().all(|v| v.handle.backend == "hsm"), "{:?}", key.versions);
}

/// Refusals before any operation (401, 403) are audited as `AccessCheck` with the wire code, the identity when
/// the token named one, the path and the request id; successful reads are audited by the dispatcher.
#[tokio::test]
async fn refusals_are_audited() {
    let env = common::Env::software().await;
    let st = SecretsState::new(env.dispatcher.clone(), SecretsConfig::default(), TenantId::default_tenant());
    let (admin, _) = kmsgate_secrets::bootstrap(&st, &TenantId::default_tenant(), 3600).await.unwrap().unwrap();
    let (addr, _stop) = serve_router(kmsgate_secrets::router(
        env.dispatcher.clone(),
        SecretsConfig::default(),
        TenantId::default_tenant(),
    ))
    .await;
    let body = serde_json::to_vec(&json!({"name": "r", "scopes": ["secrets:read"]})).unwrap();
    let r = call(addr, "POST", "/v1/auth/tokens", Some(&admin), &[], Some(body)).await;
    let reader = r.json()["token"].as_str().unwrap().to_owned();
    let r = call(
        addr,
        "PUT",
        "/v1/secrets/app/db",
        Some(&reader),
        &[("x-request-id", "audit-1")],
        Some(b"{\"data\":{}}".to_vec()),
    )
    .await;
    expect(&r, 403, "insufficient_scope");
    expect(
        &call(addr, "GET", "/v1/secrets/app/db", None, &[("x-request-id", "audit-2")], None).await,
        401,
        "authentication_required",
    );
    let events = env.audit.events();
    let checks: Vec<_> = events.iter().filter(|e| e.operation == kmsgate_core::Operation::AccessCheck).collect();
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert_eq!(checks[0].request_id, "audit-1");
    assert_eq!(checks[0].identity, "service_account:admin");
    assert_eq!(checks[0].tenant, "default");
    assert_eq!(checks[0].resource.as_deref(), Some("secrets/app/db"));
    assert_eq!(checks[0].outcome, kmsgate_core::Outcome::Error { kind: "insufficient_scope" });
    assert_eq!((checks[1].identity.as_str(), checks[1].request_id.as_str()), ("anonymous", "audit-2"));
    assert!(!format!("{events:?}").contains(&reader), "no token in audit records");
}
