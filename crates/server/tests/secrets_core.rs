//! The secret inventory through the dispatcher, over the real SQLite store and the software backend: the
//! operations the secrets REST API and the Alibaba frontends build on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{Env, SlowBackend};
use kmsgate_core::policy::Authorizer;
use kmsgate_core::{
    AliasName, Caller, CreateKeyRequest, DeleteMode, DeletedFilter, Dispatcher, DispatcherConfig, ErrorKind, KeyRef,
    KeySpec, KeyState, Operation, Outcome, PageRequest, PutSecretRequest, STAGE_CURRENT, STAGE_PREVIOUS, Secret,
    SecretFilter, SecretListFilter, SecretPatch, SecretPath, SecretSelector, SecretValue, SecretWrite, TenantId,
    Timestamp, VersionSelector, WriteMode,
};

fn path(s: &str) -> SecretPath {
    SecretPath::parse(s).unwrap()
}

fn kind<T: std::fmt::Debug>(r: kmsgate_core::Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

fn secrets_alias() -> KeyRef {
    KeyRef::Alias(AliasName::parse(Dispatcher::SECRETS_ALIAS).unwrap())
}

async fn put(env: &Env, p: &str, data: &[u8]) -> SecretWrite {
    env.dispatcher.put_secret(&env.caller, PutSecretRequest::new(path(p), data.to_vec())).await.unwrap()
}

async fn get(env: &Env, p: &str, sel: SecretSelector) -> kmsgate_core::Result<SecretValue> {
    env.dispatcher.get_secret_value(&env.caller, &path(p), &sel).await
}

async fn value(env: &Env, p: &str, sel: SecretSelector) -> Vec<u8> {
    get(env, p, sel).await.unwrap().data.to_vec()
}

fn stages(s: &Secret) -> Vec<(u32, Vec<String>)> {
    s.versions.iter().map(|v| (v.version, v.stages.clone())).collect()
}

fn st(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn ago(ms: i64) -> Timestamp {
    Timestamp(Timestamp::now().0 - ms)
}

/// A dispatcher over the env's store and backend with another configuration.
async fn dispatcher_with(env: &Env, cfg: DispatcherConfig) -> Dispatcher {
    Dispatcher::builder(env.store.clone())
        .backend(env.backend.clone())
        .audit(env.audit.clone())
        .config(DispatcherConfig { default_backend: env.backend.name().to_owned(), ..cfg })
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn put_then_get_round_trips_with_metadata() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let mut req = PutSecretRequest::new(path("app/db/password"), b"s3cret \x00\xff".to_vec());
    req.secret_type = Some("json".into());
    req.metadata = Some(serde_json::json!({"description": "db", "tags": ["prod"], "owner": "team-a"}));
    let w = d.put_secret(&env.caller, req).await.unwrap();
    assert!(w.created);
    assert_eq!((w.version.version, w.version.version_id.as_str()), (1, "1"));
    assert_eq!(w.version.stages, st(&[STAGE_CURRENT]));
    assert_eq!(w.version.created_by, env.caller.identity);
    assert_eq!((w.secret.revision, w.secret.current_version, w.secret.latest_version), (1, 1, 1));
    assert_eq!(w.secret.max_versions, 10, "the default");

    let v = get(&env, "app/db/password", SecretSelector::Current).await.unwrap();
    assert_eq!(v.data.as_slice(), b"s3cret \x00\xff");
    assert_eq!(v.version, w.version);
    assert_eq!(v.secret.secret_type, "json");
    assert_eq!(v.secret.metadata["owner"], "team-a");

    // An update keeps type and metadata unless given, and is not a create.
    let w2 = put(&env, "app/db/password", b"second").await;
    assert!(!w2.created);
    assert_eq!(w2.version.version, 2);
    assert_eq!((w2.secret.secret_type.as_str(), w2.secret.metadata["owner"].as_str()), ("json", Some("team-a")));
    assert_eq!(value(&env, "app/db/password", SecretSelector::Current).await, b"second");
    assert_eq!(value(&env, "app/db/password", SecretSelector::Version(1)).await, b"s3cret \x00\xff");
    assert_eq!(value(&env, "app/db/password", SecretSelector::Version(2)).await, b"second");

    let described = d.describe_secret(&env.caller, &path("app/db/password"), false).await.unwrap();
    assert_eq!(described, w2.secret);
    let empty = put(&env, "app/empty", b"").await;
    assert_eq!(empty.version.version, 1);
    assert!(value(&env, "app/empty", SecretSelector::Current).await.is_empty(), "an empty value is a value");

    assert_eq!(kind(get(&env, "app/missing", SecretSelector::Current).await), ErrorKind::SecretNotFound);
    assert_eq!(kind(d.describe_secret(&env.caller, &path("app/missing"), true).await), ErrorKind::SecretNotFound);
}

#[tokio::test]
async fn values_over_the_limit_are_invalid_requests() {
    let env = Env::software().await;
    let limit = env.dispatcher.config().max_secret_bytes;
    assert_eq!(limit, 64 * 1024);
    put(&env, "big", &vec![7; limit]).await;
    let err = env
        .dispatcher
        .put_secret(&env.caller, PutSecretRequest::new(path("big"), vec![7; limit + 1]))
        .await
        .expect_err("over the limit");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert_eq!(err.detail("limit"), Some("65536"));
    assert_eq!(value(&env, "big", SecretSelector::Current).await.len(), limit, "nothing was written");

    for bad in [
        PutSecretRequest { max_versions: Some(0), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { max_versions: Some(101), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { secret_type: Some("a b".into()), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { metadata: Some(serde_json::json!([1])), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { version_id: Some(String::new()), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { stages: Some(st(&["bad stage"])), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
        PutSecretRequest { stages: Some(st(&[STAGE_PREVIOUS])), ..PutSecretRequest::new(path("x"), b"v".to_vec()) },
    ] {
        let what = format!("{bad:?}");
        assert_eq!(kind(env.dispatcher.put_secret(&env.caller, bad).await), ErrorKind::InvalidRequest, "{what}");
    }
    assert_eq!(kind(get(&env, "x", SecretSelector::Current).await), ErrorKind::SecretNotFound);
    // Validation comes before existence: an update of a missing secret with a bad stage is a bad request.
    let bad = PutSecretRequest {
        mode: WriteMode::UpdateOnly,
        stages: Some(st(&[STAGE_PREVIOUS])),
        ..PutSecretRequest::new(path("x"), b"v".to_vec())
    };
    assert_eq!(kind(env.dispatcher.put_secret(&env.caller, bad).await), ErrorKind::InvalidRequest);
}

#[tokio::test]
async fn stages_move_and_version_ids_select() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("alibaba/secret");
    // Alibaba CreateSecret: CreateOnly with a VersionId.
    let mut create = PutSecretRequest::new(p.clone(), b"one".to_vec());
    create.mode = WriteMode::CreateOnly;
    create.version_id = Some("v1".into());
    create.secret_type = Some("Generic".into());
    let w = d.put_secret(&env.caller, create.clone()).await.unwrap();
    assert_eq!(w.version.version_id, "v1");
    assert_eq!(kind(d.put_secret(&env.caller, create).await), ErrorKind::AlreadyExists);

    // PutSecretValue: UpdateOnly; the default stages move current, and previous follows.
    let mut next = PutSecretRequest::new(p.clone(), b"two".to_vec());
    next.mode = WriteMode::UpdateOnly;
    next.version_id = Some("v2".into());
    let w = d.put_secret(&env.caller, next.clone()).await.unwrap();
    assert_eq!(stages(&w.secret), vec![(1, st(&[STAGE_PREVIOUS])), (2, st(&[STAGE_CURRENT]))]);
    // A version id already in use: Alibaba's Rejected.ResourceExist.
    next.data = b"again".to_vec().into();
    assert_eq!(kind(d.put_secret(&env.caller, next).await), ErrorKind::VersionConflict);

    // A version staged without current is stored but not what readers get.
    let mut pending = PutSecretRequest::new(p.clone(), b"three".to_vec());
    pending.version_id = Some("v3".into());
    pending.stages = Some(st(&["pending"]));
    let w = d.put_secret(&env.caller, pending).await.unwrap();
    assert_eq!(w.secret.current_version, 2);
    assert_eq!(value(&env, p.as_str(), SecretSelector::Current).await, b"two");
    assert_eq!(value(&env, p.as_str(), SecretSelector::Stage("pending".into())).await, b"three");
    assert_eq!(value(&env, p.as_str(), SecretSelector::Stage(STAGE_PREVIOUS.into())).await, b"one");
    assert_eq!(value(&env, p.as_str(), SecretSelector::VersionId("v1".into())).await, b"one");
    assert_eq!(value(&env, p.as_str(), SecretSelector::VersionId("v3".into())).await, b"three");
    for missing in
        [SecretSelector::VersionId("v9".into()), SecretSelector::Stage("green".into()), SecretSelector::Version(4)]
    {
        assert_eq!(kind(get(&env, p.as_str(), missing).await), ErrorKind::SecretVersionNotFound);
    }

    // UpdateSecretVersionStage: promote the pending version; previous goes to the old current.
    let s = d
        .update_secret_version_stage(
            &env.caller,
            &p,
            STAGE_CURRENT,
            Some(VersionSelector::VersionId("v3".into())),
            Some(VersionSelector::VersionId("v2".into())),
        )
        .await
        .unwrap();
    assert_eq!(stages(&s), vec![(1, vec![]), (2, st(&[STAGE_PREVIOUS])), (3, st(&["pending", STAGE_CURRENT]))]);
    assert_eq!(value(&env, p.as_str(), SecretSelector::Current).await, b"three");
    // Remove a custom stage; move one to an older version.
    let s = d
        .update_secret_version_stage(&env.caller, &p, "pending", None, Some(VersionSelector::Version(3)))
        .await
        .unwrap();
    assert_eq!(stages(&s)[2], (3, st(&[STAGE_CURRENT])));
    let s =
        d.update_secret_version_stage(&env.caller, &p, "blue", Some(VersionSelector::Version(1)), None).await.unwrap();
    assert_eq!(stages(&s)[0], (1, st(&["blue"])));
    assert_eq!(value(&env, p.as_str(), SecretSelector::Stage("blue".into())).await, b"one");

    // Refusals: nothing named; current/previous only move; remove_from must hold it; unknown version.
    let refuse = |stage: &'static str, to: Option<VersionSelector>, from: Option<VersionSelector>| {
        let p = p.clone();
        let d = d.clone();
        let caller = env.caller.clone();
        async move { d.update_secret_version_stage(&caller, &p, stage, to, from).await.map(|_| ()) }
    };
    assert_eq!(kind(refuse("blue", None, None).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(refuse(STAGE_CURRENT, None, Some(VersionSelector::Version(3))).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(refuse(STAGE_PREVIOUS, None, Some(VersionSelector::Version(2))).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(refuse("blue", None, Some(VersionSelector::Version(2))).await), ErrorKind::InvalidRequest);
    assert_eq!(
        kind(refuse("blue", Some(VersionSelector::Version(3)), Some(VersionSelector::Version(2))).await),
        ErrorKind::InvalidRequest
    );
    assert_eq!(kind(refuse("blue", Some(VersionSelector::Version(9)), None).await), ErrorKind::SecretVersionNotFound);
    let after = d.describe_secret(&env.caller, &p, false).await.unwrap();
    assert_eq!(stages(&after), stages(&s), "refused stage updates change nothing");

    // UpdateOnly on a missing secret.
    let mut missing = PutSecretRequest::new(path("nope"), b"x".to_vec());
    missing.mode = WriteMode::UpdateOnly;
    assert_eq!(kind(d.put_secret(&env.caller, missing).await), ErrorKind::SecretNotFound);
}

#[tokio::test]
async fn old_versions_are_pruned_beyond_max_versions() {
    let env = Env::software().await;
    let p = path("pruned");
    let mut req = PutSecretRequest::new(p.clone(), b"v1".to_vec());
    req.max_versions = Some(2);
    env.dispatcher.put_secret(&env.caller, req).await.unwrap();
    for i in 2..=4 {
        put(&env, "pruned", format!("v{i}").as_bytes()).await;
    }
    let s = env.dispatcher.describe_secret(&env.caller, &p, false).await.unwrap();
    assert_eq!(stages(&s), vec![(3, st(&[STAGE_PREVIOUS])), (4, st(&[STAGE_CURRENT]))]);
    assert_eq!(s.latest_version, 4);
    for gone in [1, 2] {
        assert_eq!(kind(get(&env, "pruned", SecretSelector::Version(gone)).await), ErrorKind::SecretVersionNotFound);
        assert!(env.store.get_secret_version(&env.caller.tenant, &p, gone).await.unwrap().is_none(), "data deleted");
    }
    assert_eq!(value(&env, "pruned", SecretSelector::Version(3)).await, b"v3");

    // Lowering max_versions prunes at once; numbers are never reused.
    let patch = SecretPatch { max_versions: Some(1), ..SecretPatch::default() };
    let s = env.dispatcher.update_secret_metadata(&env.caller, &p, patch).await.unwrap();
    assert_eq!(stages(&s), vec![(4, st(&[STAGE_CURRENT]))]);
    assert!(env.store.get_secret_version(&env.caller.tenant, &p, 3).await.unwrap().is_none());
    assert_eq!(put(&env, "pruned", b"v5").await.version.version, 5);
}

#[tokio::test]
async fn cas_and_revisions_detect_conflicting_writers() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("cas/secret");
    let with_cas =
        |cas: u32, data: &[u8]| PutSecretRequest { cas: Some(cas), ..PutSecretRequest::new(p.clone(), data) };
    d.put_secret(&env.caller, with_cas(0, b"first")).await.unwrap();
    let err = d.put_secret(&env.caller, with_cas(0, b"again")).await.expect_err("exists");
    assert_eq!(err.kind(), ErrorKind::VersionConflict);
    assert_eq!((err.detail("expected"), err.detail("current")), (Some("0"), Some("1")));
    assert!(err.message().contains("expected 0"), "{}", err.message());
    d.put_secret(&env.caller, with_cas(1, b"second")).await.unwrap();
    assert_eq!(kind(d.put_secret(&env.caller, with_cas(1, b"stale")).await), ErrorKind::VersionConflict);
    assert_eq!(value(&env, "cas/secret", SecretSelector::Current).await, b"second");
    let missing = PutSecretRequest { cas: Some(3), ..PutSecretRequest::new(path("cas/none"), b"x".to_vec()) };
    assert_eq!(kind(d.put_secret(&env.caller, missing).await), ErrorKind::VersionConflict);

    // Metadata patches check the record's revision (If-Match).
    let s = d.describe_secret(&env.caller, &p, false).await.unwrap();
    let patch = SecretPatch {
        metadata: Some(serde_json::json!({"description": "x"})),
        expected_revision: Some(s.revision),
        ..SecretPatch::default()
    };
    let patched = d.update_secret_metadata(&env.caller, &p, patch.clone()).await.unwrap();
    assert_eq!(patched.revision, s.revision + 1);
    assert_eq!(patched.versions, s.versions, "a patch writes no version");
    let err = d.update_secret_metadata(&env.caller, &p, patch).await.expect_err("stale revision");
    assert_eq!(err.kind(), ErrorKind::VersionConflict);
    assert_eq!(err.detail("current"), Some(patched.revision.to_string().as_str()));

    // Concurrent writers without cas both land, one after the other.
    let (a, b) = tokio::join!(
        d.put_secret(&env.caller, PutSecretRequest::new(p.clone(), b"a".to_vec())),
        d.put_secret(&env.caller, PutSecretRequest::new(p.clone(), b"b".to_vec()))
    );
    let mut versions = [a.unwrap().version.version, b.unwrap().version.version];
    versions.sort_unstable();
    assert_eq!(versions, [3, 4]);
}

#[tokio::test]
async fn expired_values_are_gone_but_metadata_stays() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("expiring");
    let past = ago(1000);
    let req = PutSecretRequest { expires_at: Some(Some(past)), ..PutSecretRequest::new(p.clone(), b"old".to_vec()) };
    d.put_secret(&env.caller, req).await.unwrap();
    let err = get(&env, "expiring", SecretSelector::Current).await.expect_err("expired");
    assert_eq!(err.kind(), ErrorKind::SecretExpired);
    assert_eq!(err.detail("expired_at"), Some(past.to_rfc3339().as_str()));
    // Not-found comes before expiry.
    assert_eq!(kind(get(&env, "expiring", SecretSelector::Version(7)).await), ErrorKind::SecretVersionNotFound);
    assert_eq!(kind(d.rollback_secret(&env.caller, &p, 1, None).await), ErrorKind::SecretExpired);
    let s = d.describe_secret(&env.caller, &p, false).await.unwrap();
    assert_eq!(s.expires_at, Some(past));
    let filter = SecretListFilter { expiring_within: Some(Duration::from_secs(60)), ..SecretListFilter::default() };
    let listed = d.list_secrets(&env.caller, &filter, &PageRequest::first(10)).await.unwrap();
    assert_eq!(listed.items.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["expiring"]);

    // A new write revives it; a pending expiry is kept by later writes and removed by a patch.
    let w = put(&env, "expiring", b"new").await;
    assert_eq!(w.secret.expires_at, None);
    assert_eq!(value(&env, "expiring", SecretSelector::Current).await, b"new");
    let soon = Timestamp(Timestamp::now().0 + 3_600_000);
    let req = PutSecretRequest { expires_at: Some(Some(soon)), ..PutSecretRequest::new(p.clone(), b"n2".to_vec()) };
    d.put_secret(&env.caller, req).await.unwrap();
    assert_eq!(put(&env, "expiring", b"n3").await.secret.expires_at, Some(soon));
    let patch = SecretPatch { expires_at: Some(Some(ago(1))), ..SecretPatch::default() };
    d.update_secret_metadata(&env.caller, &p, patch).await.unwrap();
    assert_eq!(kind(get(&env, "expiring", SecretSelector::Version(1)).await), ErrorKind::SecretExpired);
    let patch = SecretPatch { expires_at: Some(None), ..SecretPatch::default() };
    d.update_secret_metadata(&env.caller, &p, patch).await.unwrap();
    assert_eq!(value(&env, "expiring", SecretSelector::Version(1)).await, b"old");
}

#[tokio::test]
async fn soft_delete_hides_blocks_the_path_and_restores() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("team/api-key");
    put(&env, "team/api-key", b"value-1").await;
    put(&env, "team/api-key", b"value-2").await;
    let before = Timestamp::now();
    let deleted =
        d.delete_secret(&env.caller, &p, DeleteMode::Soft { retention: Duration::from_secs(3600) }).await.unwrap();
    let until = deleted.recoverable_until.unwrap();
    assert!(deleted.deleted_at.unwrap() >= before);
    assert!(until.0 >= before.0 + 3_600_000 && until.0 <= Timestamp::now().0 + 3_600_000);

    assert_eq!(kind(get(&env, "team/api-key", SecretSelector::Current).await), ErrorKind::SecretNotFound);
    assert_eq!(kind(d.describe_secret(&env.caller, &p, false).await), ErrorKind::SecretNotFound);
    assert_eq!(d.describe_secret(&env.caller, &p, true).await.unwrap(), deleted);
    let soft = DeleteMode::Soft { retention: Duration::from_secs(3600) };
    assert_eq!(kind(d.delete_secret(&env.caller, &p, soft).await), ErrorKind::SecretNotFound, "already deleted");
    let patch = SecretPatch { metadata: Some(serde_json::json!({})), ..SecretPatch::default() };
    assert_eq!(kind(d.update_secret_metadata(&env.caller, &p, patch).await), ErrorKind::SecretNotFound);
    assert_eq!(kind(d.rollback_secret(&env.caller, &p, 1, None).await), ErrorKind::SecretNotFound);

    // Listings hide it unless asked.
    let list = |deleted: DeletedFilter| SecretListFilter {
        store: SecretFilter { prefix: Some(path("team")), deleted },
        ..SecretListFilter::default()
    };
    let page = PageRequest::first(10);
    assert!(d.list_secrets(&env.caller, &list(DeletedFilter::Exclude), &page).await.unwrap().items.is_empty());
    assert_eq!(d.list_secrets(&env.caller, &list(DeletedFilter::Only), &page).await.unwrap().items.len(), 1);

    // A write inside retention is refused, with the date it becomes free.
    for mode in [WriteMode::Upsert, WriteMode::CreateOnly, WriteMode::UpdateOnly] {
        let req = PutSecretRequest { mode, ..PutSecretRequest::new(p.clone(), b"new".to_vec()) };
        let err = d.put_secret(&env.caller, req).await.expect_err("inside retention");
        assert_eq!(err.kind(), ErrorKind::SecretExists, "{mode:?}");
        assert_eq!(err.detail("recoverable_until"), Some(until.to_rfc3339().as_str()));
    }
    let cas0 = PutSecretRequest { cas: Some(0), ..PutSecretRequest::new(p.clone(), b"new".to_vec()) };
    assert_eq!(kind(d.put_secret(&env.caller, cas0).await), ErrorKind::SecretExists);

    // Restore brings everything back; restoring an active secret is a no-op.
    let restored = d.restore_secret(&env.caller, &p).await.unwrap();
    assert_eq!((restored.deleted_at, restored.recoverable_until), (None, None));
    assert_eq!(value(&env, "team/api-key", SecretSelector::Current).await, b"value-2");
    assert_eq!(value(&env, "team/api-key", SecretSelector::Version(1)).await, b"value-1");
    assert_eq!(d.restore_secret(&env.caller, &p).await.unwrap(), restored);
    assert_eq!(kind(d.restore_secret(&env.caller, &path("never")).await), ErrorKind::SecretNotFound);

    for retention in [Duration::ZERO, Duration::from_secs(366 * 86_400)] {
        let mode = DeleteMode::Soft { retention };
        assert_eq!(kind(d.delete_secret(&env.caller, &p, mode).await), ErrorKind::InvalidRequest);
    }
}

/// Moves a soft-deleted secret's retention into the past through the store.
async fn expire_retention(env: &Env, p: &SecretPath) {
    let mut s = env.store.get_secret(&env.caller.tenant, p).await.unwrap().unwrap();
    s.recoverable_until = Some(ago(1));
    env.store.update_secret(&s, &[]).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_sweeper_purges_after_retention_and_frees_the_path() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let (p, keep) = (path("old/secret"), path("old/recent"));
    put(&env, "old/secret", b"a").await;
    put(&env, "old/secret", b"b").await;
    put(&env, "old/recent", b"r").await;
    let soft = DeleteMode::Soft { retention: Duration::from_secs(3600) };
    d.delete_secret(&env.caller, &p, soft).await.unwrap();
    d.delete_secret(&env.caller, &keep, soft).await.unwrap();
    assert!(d.purge_deleted_secrets(&env.caller).await.unwrap().is_empty(), "still in retention");

    expire_retention(&env, &p).await;
    // Past retention the secret cannot be restored, even before the sweeper ran.
    assert_eq!(kind(d.restore_secret(&env.caller, &p).await), ErrorKind::SecretNotFound);
    let purged = d.purge_deleted_secrets(&env.caller).await.unwrap();
    assert_eq!(purged, vec![(env.caller.tenant.clone(), p.clone())]);
    assert_eq!(kind(d.describe_secret(&env.caller, &p, true).await), ErrorKind::SecretNotFound);
    for v in [1, 2] {
        assert!(env.store.get_secret_version(&env.caller.tenant, &p, v).await.unwrap().is_none());
    }
    assert!(d.describe_secret(&env.caller, &keep, true).await.unwrap().is_deleted(), "the other one stays");
    let audited = env.audit.events().into_iter().filter(|e| e.operation == Operation::PurgeSecret).count();
    assert_eq!(audited, 1);

    // The path is free: a write starts a new secret at version 1.
    let w = put(&env, "old/secret", b"fresh").await;
    assert!(w.created);
    assert_eq!(w.version.version, 1);

    // A write to a path past retention that the sweeper has not reached frees it inline.
    expire_retention(&env, &keep).await;
    let w = put(&env, "old/recent", b"fresh too").await;
    assert!(w.created);
    assert_eq!((w.version.version, w.secret.deleted_at), (1, None));
    assert_eq!(value(&env, "old/recent", SecretSelector::Current).await, b"fresh too");
}

#[tokio::test]
async fn permanent_delete_removes_everything() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("to/destroy");
    put(&env, "to/destroy", b"x").await;
    put(&env, "to/destroy", b"y").await;
    let gone = d.delete_secret(&env.caller, &p, DeleteMode::Permanent).await.unwrap();
    assert_eq!(gone.latest_version, 2, "the record as it was");
    assert_eq!(kind(d.describe_secret(&env.caller, &p, true).await), ErrorKind::SecretNotFound);
    assert!(env.store.get_secret_version(&env.caller.tenant, &p, 1).await.unwrap().is_none());
    assert_eq!(kind(d.delete_secret(&env.caller, &p, DeleteMode::Permanent).await), ErrorKind::SecretNotFound);

    // A soft-deleted secret can be destroyed at once (Alibaba ForceDeleteWithoutRecovery after a schedule).
    put(&env, "to/destroy", b"z").await;
    d.delete_secret(&env.caller, &p, DeleteMode::Soft { retention: Duration::from_secs(60) }).await.unwrap();
    d.delete_secret(&env.caller, &p, DeleteMode::Permanent).await.unwrap();
    assert!(put(&env, "to/destroy", b"again").await.created);
}

#[tokio::test]
async fn rollback_writes_the_old_data_as_a_new_version() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let p = path("roll/back");
    put(&env, "roll/back", b"good").await;
    put(&env, "roll/back", b"bad").await;
    let w = d.rollback_secret(&env.caller, &p, 1, Some(2)).await.unwrap();
    assert_eq!((w.version.version, w.created), (3, false));
    assert_eq!(stages(&w.secret), vec![(1, vec![]), (2, st(&[STAGE_PREVIOUS])), (3, st(&[STAGE_CURRENT]))]);
    assert_eq!(value(&env, "roll/back", SecretSelector::Current).await, b"good");
    let sealed1 = env.store.get_secret_version(&env.caller.tenant, &p, 1).await.unwrap().unwrap();
    let sealed3 = env.store.get_secret_version(&env.caller.tenant, &p, 3).await.unwrap().unwrap();
    assert_ne!(sealed1.wrapped_key, sealed3.wrapped_key, "a new version gets its own data key");
    assert_eq!(kind(d.rollback_secret(&env.caller, &p, 9, None).await), ErrorKind::SecretVersionNotFound);
    assert_eq!(kind(d.rollback_secret(&env.caller, &p, 2, Some(2)).await), ErrorKind::VersionConflict);
    assert_eq!(kind(d.rollback_secret(&env.caller, &path("nope"), 1, None).await), ErrorKind::SecretNotFound);
}

#[tokio::test]
async fn the_secret_quota_counts_active_secrets() {
    let env = Env::software().await;
    let cfg = DispatcherConfig { max_secrets_per_tenant: Some(2), ..DispatcherConfig::default() };
    let d = dispatcher_with(&env, cfg).await;
    let c = &env.caller;
    d.put_secret(c, PutSecretRequest::new(path("q/1"), b"1".to_vec())).await.unwrap();
    d.put_secret(c, PutSecretRequest::new(path("q/2"), b"2".to_vec())).await.unwrap();
    let err = d.put_secret(c, PutSecretRequest::new(path("q/3"), b"3".to_vec())).await.expect_err("over quota");
    assert_eq!(err.kind(), ErrorKind::QuotaExceeded);
    assert_eq!(
        (err.detail("quota"), err.detail("limit"), err.detail("current")),
        (Some("secrets"), Some("2"), Some("2"))
    );
    // New versions of existing secrets are fine.
    d.put_secret(c, PutSecretRequest::new(path("q/1"), b"1b".to_vec())).await.unwrap();
    // A soft-deleted secret frees its slot; restoring it needs one.
    d.delete_secret(c, &path("q/1"), DeleteMode::Soft { retention: Duration::from_secs(60) }).await.unwrap();
    d.put_secret(c, PutSecretRequest::new(path("q/3"), b"3".to_vec())).await.unwrap();
    assert_eq!(kind(d.restore_secret(c, &path("q/1")).await), ErrorKind::QuotaExceeded);
    d.delete_secret(c, &path("q/3"), DeleteMode::Permanent).await.unwrap();
    d.restore_secret(c, &path("q/1")).await.unwrap();
    // Other tenants have their own count; the internal key does not count against a key quota.
    let acme = Caller::admin(TenantId::parse("acme").unwrap());
    d.put_secret(&acme, PutSecretRequest::new(path("q/1"), b"a".to_vec())).await.unwrap();
    let cfg = DispatcherConfig { max_keys_per_tenant: Some(0), ..DispatcherConfig::default() };
    let no_keys = dispatcher_with(&env, cfg).await;
    let beta = Caller::admin(TenantId::parse("beta").unwrap());
    no_keys.put_secret(&beta, PutSecretRequest::new(path("x"), b"x".to_vec())).await.unwrap();
    let denied = no_keys.create_key(&beta, CreateKeyRequest::new(KeySpec::Aes256)).await;
    assert_eq!(kind(denied), ErrorKind::QuotaExceeded);
}

#[tokio::test]
async fn tenants_are_isolated() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let acme = Caller::admin(TenantId::parse("acme").unwrap());
    d.ensure_tenant(&acme.tenant).await.unwrap();
    put(&env, "shared/name", b"default's").await;
    put(&env, "only/default", b"x").await;
    d.put_secret(&acme, PutSecretRequest::new(path("shared/name"), b"acme's".to_vec())).await.unwrap();

    let read = d.get_secret_value(&acme, &path("shared/name"), &SecretSelector::Current).await.unwrap();
    assert_eq!(read.data.as_slice(), b"acme's");
    assert_eq!(value(&env, "shared/name", SecretSelector::Current).await, b"default's");
    let hidden = d.get_secret_value(&acme, &path("only/default"), &SecretSelector::Current).await;
    assert_eq!(kind(hidden), ErrorKind::SecretNotFound);
    let soft = DeleteMode::Soft { retention: Duration::from_secs(60) };
    assert_eq!(kind(d.delete_secret(&acme, &path("only/default"), soft).await), ErrorKind::SecretNotFound);
    let listed = d.list_secrets(&acme, &SecretListFilter::default(), &PageRequest::first(100)).await.unwrap();
    assert_eq!(listed.items.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["shared/name"]);

    // Each tenant's data keys are wrapped by its own internal key; moving sealed data across fails.
    let k_default = common::internal_key(d, &env.caller.tenant, Dispatcher::SECRETS_ALIAS).await;
    let k_acme = common::internal_key(d, &acme.tenant, Dispatcher::SECRETS_ALIAS).await;
    assert_ne!(k_default.id, k_acme.id);
    let mine = env.store.get_secret_version(&acme.tenant, &path("shared/name"), 1).await.unwrap().unwrap();
    assert_eq!(mine.key_id, k_acme.id);
    let theirs = env.store.get_secret(&env.caller.tenant, &path("only/default")).await.unwrap().unwrap();
    let mut planted = theirs.clone();
    planted.tenant = acme.tenant.clone();
    planted.path = path("planted");
    let sealed = env.store.get_secret_version(&env.caller.tenant, &path("only/default"), 1).await.unwrap().unwrap();
    env.store.create_secret(&planted, &sealed).await.unwrap();
    let err = d.get_secret_value(&acme, &path("planted"), &SecretSelector::Current).await.expect_err("foreign data");
    assert_eq!(err.kind(), ErrorKind::DependencyFailure, "acme cannot even find default's key");
}

#[tokio::test]
async fn sealed_data_is_bound_to_its_path_and_version() {
    let env = Env::software().await;
    put(&env, "bound/a", b"a-value").await;
    put(&env, "bound/a", b"a-value-2").await;
    let t = &env.caller.tenant;
    let sealed = env.store.get_secret_version(t, &path("bound/a"), 1).await.unwrap().unwrap();
    // The same sealed data under another path, then as another version number: both refuse to open.
    let mut copy = env.store.get_secret(t, &path("bound/a")).await.unwrap().unwrap();
    copy.path = path("bound/b");
    env.store.create_secret(&copy, &sealed).await.unwrap();
    assert_eq!(kind(get(&env, "bound/b", SecretSelector::Version(1)).await), ErrorKind::InvalidCiphertext);
    let mut as_v2 = sealed.clone();
    as_v2.version = 2;
    let mut record = env.store.get_secret(t, &path("bound/a")).await.unwrap().unwrap();
    env.store.delete_secret(t, &path("bound/a"), record.revision).await.unwrap();
    record.versions.retain(|v| v.version == 2);
    env.store.create_secret(&record, &as_v2).await.unwrap();
    assert_eq!(kind(get(&env, "bound/a", SecretSelector::Version(2)).await), ErrorKind::InvalidCiphertext);
    // A flipped ciphertext bit in place: the data key unwraps, the data does not authenticate.
    put(&env, "bound/t", b"t-value").await;
    let record = env.store.get_secret(t, &path("bound/t")).await.unwrap().unwrap();
    let mut tampered = env.store.get_secret_version(t, &path("bound/t"), 1).await.unwrap().unwrap();
    tampered.ciphertext[0] ^= 1;
    env.store.delete_secret(t, &path("bound/t"), record.revision).await.unwrap();
    env.store.create_secret(&record, &tampered).await.unwrap();
    assert_eq!(kind(get(&env, "bound/t", SecretSelector::Version(1)).await), ErrorKind::InvalidCiphertext);
}

#[tokio::test]
async fn the_sqlite_file_holds_no_plaintext() {
    let env = Env::software().await;
    let marker = "kmsgate-plaintext-marker-7c1e9f2ab4d8";
    let p = "app/marker/secret";
    put(&env, p, marker.as_bytes()).await;
    put(&env, p, format!("{marker}-v2").as_bytes()).await;
    env.dispatcher.rollback_secret(&env.caller, &path(p), 1, None).await.unwrap();
    assert_eq!(value(&env, p, SecretSelector::Current).await, marker.as_bytes(), "the value is really stored");

    let b64 = base64::engine::general_purpose::STANDARD.encode(marker.as_bytes());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("kmsgate.db") {
            files.push((name, std::fs::read(entry.path()).unwrap()));
        }
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"kmsgate.db") && names.contains(&"kmsgate.db-wal"), "{names:?}");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    // The files are the ones the store writes: the path (metadata) is in them.
    assert!(files.iter().any(|(_, bytes)| contains(bytes, p.as_bytes())), "the path is stored in {names:?}");
    for (name, bytes) in &files {
        assert!(!contains(bytes, marker.as_bytes()), "{name} holds the plaintext");
        assert!(!contains(bytes, b64.as_bytes()), "{name} holds the plaintext in base64");
    }
}

#[tokio::test]
async fn audit_events_name_the_path_and_never_the_value() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let marker = "audit-marker-value-5f0c2d";
    let p = path("audited/secret");
    let req = PutSecretRequest { version_id: Some("v1".into()), ..PutSecretRequest::new(p.clone(), marker) };
    d.put_secret(&env.caller, req).await.unwrap();
    get(&env, "audited/secret", SecretSelector::Current).await.unwrap();
    d.describe_secret(&env.caller, &p, false).await.unwrap();
    d.list_secrets(&env.caller, &SecretListFilter::default(), &PageRequest::first(10)).await.unwrap();
    d.rollback_secret(&env.caller, &p, 1, None).await.unwrap();
    d.update_secret_version_stage(&env.caller, &p, "blue", Some(VersionSelector::Version(1)), None).await.unwrap();
    d.update_secret_metadata(&env.caller, &p, SecretPatch::default()).await.unwrap();
    d.delete_secret(&env.caller, &p, DeleteMode::Soft { retention: Duration::from_secs(60) }).await.unwrap();
    d.restore_secret(&env.caller, &p).await.unwrap();
    let _ = get(&env, "audited/none", SecretSelector::Current).await;
    d.delete_secret(&env.caller, &p, DeleteMode::Permanent).await.unwrap();

    let events = env.audit.events();
    for e in &events {
        let json = serde_json::to_string(e).unwrap();
        assert!(!json.contains(marker), "an audit event carries the value: {json}");
    }
    let secret_ops: Vec<(Operation, Option<String>, Outcome)> = events
        .iter()
        .filter(|e| e.operation != Operation::CreateKey)
        .map(|e| (e.operation, e.resource.clone(), e.outcome.clone()))
        .collect();
    let at = |op: Operation| (op, Some("audited/secret".to_owned()), Outcome::Ok);
    assert_eq!(
        secret_ops,
        vec![
            at(Operation::PutSecretValue),
            at(Operation::GetSecretValue),
            at(Operation::DescribeSecret),
            (Operation::ListSecrets, None, Outcome::Ok),
            at(Operation::RollbackSecret),
            at(Operation::UpdateSecretVersionStage),
            at(Operation::UpdateSecret),
            at(Operation::DeleteSecret),
            at(Operation::RestoreSecret),
            (Operation::GetSecretValue, Some("audited/none".to_owned()), Outcome::Error { kind: "secret_not_found" }),
            at(Operation::DeleteSecret),
        ]
    );
    // The internal key's creation on first use is audited too.
    let created: Vec<_> = events.iter().filter(|e| e.operation == Operation::CreateKey).collect();
    assert_eq!(created.len(), 1);
    let key = common::internal_key(d, &env.caller.tenant, Dispatcher::SECRETS_ALIAS).await;
    assert_eq!(created[0].resource.as_deref(), Some(key.id.as_str()));
}

/// Refuses key creation: secrets still work, because the internal key's creation is not the caller's act.
#[derive(Debug)]
struct NoKeyCreation;

impl Authorizer for NoKeyCreation {
    fn authorize(&self, _c: &Caller, op: Operation, _r: Option<&str>) -> kmsgate_core::Result<()> {
        if op == Operation::CreateKey { Err(kmsgate_core::Error::new(ErrorKind::AccessDenied, "no")) } else { Ok(()) }
    }
}

#[tokio::test]
async fn the_internal_key_needs_no_key_creation_right() {
    let env = Env::software().await;
    let d = Dispatcher::builder(env.store.clone())
        .backend(env.backend.clone())
        .authorizer(Arc::new(NoKeyCreation))
        .config(DispatcherConfig { default_backend: env.backend.name().to_owned(), ..DispatcherConfig::default() })
        .build()
        .await
        .unwrap();
    assert_eq!(kind(d.create_key(&env.caller, CreateKeyRequest::new(KeySpec::Aes256)).await), ErrorKind::AccessDenied);
    d.put_secret(&env.caller, PutSecretRequest::new(path("a"), b"v".to_vec())).await.unwrap();
    let v = d.get_secret_value(&env.caller, &path("a"), &SecretSelector::Current).await.unwrap();
    assert_eq!(v.data.as_slice(), b"v");
}

#[tokio::test]
async fn a_disabled_internal_key_fails_values_but_not_metadata() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let t = &env.caller.tenant;
    put(&env, "locked", b"v1").await;
    // No caller can change the internal key: the store stands for a database repair.
    assert_eq!(kind(d.disable_key(&env.caller, &secrets_alias()).await), ErrorKind::KeyNotFound);
    common::set_internal_key_state(d, t, Dispatcher::SECRETS_ALIAS, KeyState::Disabled).await;
    let err = get(&env, "locked", SecretSelector::Current).await.expect_err("disabled key");
    assert_eq!(err.kind(), ErrorKind::InvalidKeyState(KeyState::Disabled));
    assert_eq!(kind(d.rollback_secret(&env.caller, &path("locked"), 1, None).await), err.kind());
    let write = d.put_secret(&env.caller, PutSecretRequest::new(path("locked"), b"v2".to_vec())).await;
    assert_eq!(kind(write), ErrorKind::InvalidKeyState(KeyState::Disabled));
    assert_eq!(d.describe_secret(&env.caller, &path("locked"), false).await.unwrap().latest_version, 1);
    common::set_internal_key_state(d, t, Dispatcher::SECRETS_ALIAS, KeyState::Enabled).await;
    assert_eq!(value(&env, "locked", SecretSelector::Current).await, b"v1");

    // A key pending deletion refuses too.
    assert_eq!(kind(d.schedule_key_deletion(&env.caller, &secrets_alias(), 7).await), ErrorKind::KeyNotFound);
    common::set_internal_key_state(d, t, Dispatcher::SECRETS_ALIAS, KeyState::PendingDeletion).await;
    assert_eq!(
        kind(get(&env, "locked", SecretSelector::Current).await),
        ErrorKind::InvalidKeyState(KeyState::PendingDeletion)
    );
}

#[tokio::test]
async fn a_slow_backend_is_a_dependency_timeout() {
    let env = Env::software().await;
    put(&env, "slow", b"v").await;
    let slow = Arc::new(SlowBackend { inner: env.backend.clone(), delay: Duration::from_millis(300) });
    let (d, _audit) = common::dispatcher_over(env.store.clone(), slow, Duration::from_millis(50)).await;
    let read = d.get_secret_value(&env.caller, &path("slow"), &SecretSelector::Current).await;
    assert_eq!(kind(read), ErrorKind::DependencyTimeout);
    let write = d.put_secret(&env.caller, PutSecretRequest::new(path("slow"), b"w".to_vec())).await;
    assert_eq!(kind(write), ErrorKind::DependencyTimeout);
    assert_eq!(value(&env, "slow", SecretSelector::Current).await, b"v", "nothing was written");
}

#[tokio::test]
async fn filtered_listings_page_correctly() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let mut expected = Vec::new();
    for i in 0..30 {
        let p = format!("list/s{i:02}");
        let mut req = PutSecretRequest::new(path(&p), b"x".to_vec());
        if i % 3 == 0 {
            req.secret_type = Some("certificate".into());
            req.metadata = Some(serde_json::json!({"tags": ["tls"]}));
            expected.push(p);
        }
        d.put_secret(&env.caller, req).await.unwrap();
    }
    put(&env, "listx/other", b"x").await;
    let walk = |filter: SecretListFilter, limit: u32| {
        let d = d.clone();
        let caller = env.caller.clone();
        async move {
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..100 {
                let page = d.list_secrets(&caller, &filter, &PageRequest { after, limit }).await.unwrap();
                assert!(page.items.len() <= usize::try_from(limit).unwrap());
                seen.extend(page.items.into_iter().map(|s| s.path.to_string()));
                match page.next {
                    Some(n) => after = Some(n),
                    None => return seen,
                }
            }
            panic!("the listing does not end");
        }
    };
    let prefix = SecretFilter { prefix: Some(path("list")), deleted: DeletedFilter::Exclude };
    let by_type =
        SecretListFilter { store: prefix.clone(), secret_type: Some("certificate".into()), ..Default::default() };
    for limit in [1, 2, 4, 100] {
        assert_eq!(walk(by_type.clone(), limit).await, expected, "limit {limit}");
    }
    let by_tag = SecretListFilter { tag: Some("tls".into()), ..Default::default() };
    assert_eq!(walk(by_tag, 3).await, expected);
    let unfiltered = SecretListFilter { store: prefix, ..Default::default() };
    assert_eq!(walk(unfiltered, 7).await.len(), 30, "segment-wise prefix: listx/ is not under list/");
    // Only the last record matches: with one record per store page, calls return short pages with a cursor
    // until they reach it.
    let last = SecretListFilter { tag: Some("last".into()), ..Default::default() };
    let p = PutSecretRequest {
        metadata: Some(serde_json::json!({"tags": {"last": "yes"}})),
        ..PutSecretRequest::new(path("zz/last"), b"x".to_vec())
    };
    d.put_secret(&env.caller, p).await.unwrap();
    let first = d.list_secrets(&env.caller, &last, &PageRequest::first(1)).await.unwrap();
    assert!(first.items.is_empty() && first.next.is_some(), "a short page still has a cursor: {first:?}");
    assert_eq!(walk(last, 1).await, ["zz/last"]);
    let bad = SecretListFilter { secret_type: Some("no good".into()), ..Default::default() };
    assert_eq!(kind(d.list_secrets(&env.caller, &bad, &PageRequest::first(1)).await), ErrorKind::InvalidRequest);
}

#[tokio::test]
async fn secret_writes_reach_the_change_feed() {
    let env = Env::software().await;
    let mut changes = env.dispatcher.subscribe_changes();
    put(&env, "feed/me", b"x").await;
    env.dispatcher.apply_changes().await.unwrap();
    let mut seen = Vec::new();
    while let Ok(c) = changes.try_recv() {
        seen.push((c.kind, c.id));
    }
    assert!(seen.contains(&(kmsgate_core::ChangeKind::Secret, "feed/me".to_owned())), "{seen:?}");
}
