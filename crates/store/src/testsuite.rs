//! The behavioural test suite of core's [`Store`] trait, shared by every implementation (SQLite, PostgreSQL,
//! and whatever comes next), so all of them are held to the same contract.
//!
//! Each case is an async function taking a **fresh, empty** store and panicking on a failure. Run them all,
//! one `#[tokio::test]` each, with [`store_testsuite!`](crate::store_testsuite) (a case added here must be
//! added to its list too):
//!
//! ```text
//! async fn fresh() -> kmsgate_store::testsuite::Fixture { /* open an empty store */ }
//! kmsgate_store::store_testsuite!(fresh());
//! ```
//!
//! [`concurrent_handles`] takes two handles on the same empty database (two pools, as two processes or two
//! replicas would have), and [`prune_before_reopen`] / [`changes_continue_after_reopen`] run on either side of
//! closing and reopening a persistent store; those are called by hand.

// Test code: a panic is how a case reports a failure.
#![allow(clippy::expect_used)]

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use kmsgate_core::secret::{DeletedFilter, SealedSecretVersion, Secret, SecretFilter, SecretPath};
use kmsgate_core::{
    AliasEntry, AliasName, BackendHandle, ChangeKind, Document, ErrorKind, Key, KeyId, KeyOrigin, KeySpec, KeyState,
    KeyUsage, KeyUsageSet, KeyVersion, PageRequest, Precondition, Result, Store, Tenant, TenantId, Timestamp,
};
use serde_json::json;

use crate::SqlStore;
use uuid::Uuid;

/// Runs every single-store case of [`crate::testsuite`] as its own `#[tokio::test]`.
///
/// `store_testsuite!(fixture())`: `fixture()` is a future of a [`Fixture`] (or of anything that derefs to
/// `dyn Store`), evaluated once per test so each case gets a fresh, empty store.
/// The calling crate needs `tokio` with `macros` and `rt-multi-thread`. There is no way to skip a case: a
/// fixture that cannot be built fails the test.
#[macro_export]
macro_rules! store_testsuite {
    (@cases $get:tt; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $get;
                $crate::testsuite::$case(&*fixture).await;
            }
        )+
    };
    (@list $get:tt) => {
        $crate::store_testsuite!(@cases $get;
            ping_and_empty_store,
            tenants,
            create_and_get_key,
            create_key_duplicate_id_writes_nothing,
            create_key_duplicate_alias_writes_nothing,
            update_key_is_optimistic,
            concurrent_writes_one_wins,
            delete_key_removes_its_aliases,
            list_keys_pages_in_byte_order,
            alias_lifecycle,
            list_aliases_pages_and_filters,
            keys_due_for_deletion,
            change_feed,
            mutations_append_changes,
            delete_key_checks_the_revision,
            prune_changes_keeps_the_newest,
            documents_put_under_each_precondition,
            documents_announce_every_write,
            list_documents_pages_and_filters,
            delete_document_frees_the_id,
            document_kinds_and_ids_are_validated,
            concurrent_document_writes_one_wins,
            cancelled_writes_leave_no_transaction_behind,
            heartbeats,
            secrets_create_and_get,
            secret_versions_are_optimistic_and_pruned,
            update_secret_is_optimistic,
            list_secrets_filters_and_pages,
            delete_secret_removes_its_versions,
            secrets_due_for_purge_across_tenants,
            concurrent_secret_writes_one_wins,
            secret_mutations_append_changes,
        );
    };
    ($fixture:expr) => {
        $crate::store_testsuite!(@list ($fixture.await));
    };
}

/// A store under test plus whatever must outlive it (a temporary directory, a database schema to drop).
pub struct Fixture {
    store: Box<dyn Store>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Fixture {
    pub fn new(store: impl Store + 'static) -> Self {
        Fixture { store: Box::new(store), _guard: None }
    }

    /// Keeps `guard` alive until the fixture is dropped, after the store.
    pub fn with_guard(store: impl Store + 'static, guard: impl Any + Send + Sync) -> Self {
        Fixture { store: Box::new(store), _guard: Some(Box::new(guard)) }
    }
}

impl Deref for Fixture {
    type Target = dyn Store;

    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture").field("store", &self.store).finish_non_exhaustive()
    }
}

// ---- helpers -------------------------------------------------------------------------------------------

pub fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).expect("test tenant id")
}

pub fn key_id(s: &str) -> KeyId {
    KeyId::parse(s).expect("test key id")
}

pub fn alias(s: &str) -> AliasName {
    AliasName::parse(s).expect("test alias")
}

/// A key exercising every field of the document: two versions, binary handles (every byte value, and empty),
/// non-ASCII and quoted text, tags.
pub fn sample_key(tenant_id: &str, id: &str) -> Key {
    let v1 = Uuid::new_v4();
    let v2 = Uuid::new_v4();
    let created = Timestamp(1_700_000_000_123);
    Key {
        id: key_id(id),
        tenant: tenant(tenant_id),
        spec: KeySpec::Aes256,
        usage: KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt]),
        state: KeyState::Enabled,
        origin: KeyOrigin::Generated,
        description: "clé de test ✓ \"quoted\" \\ '; DROP TABLE keys; --".to_owned(),
        tags: BTreeMap::from([("team".to_owned(), "platform".to_owned()), ("empty".to_owned(), String::new())]),
        versions: vec![
            KeyVersion {
                id: v1,
                created_at: created,
                handle: BackendHandle { backend: "software".to_owned(), handle: (0..=255u8).collect() },
            },
            KeyVersion {
                id: v2,
                created_at: Timestamp(created.0 + 1),
                handle: BackendHandle { backend: "pkcs11".to_owned(), handle: Vec::new() },
            },
        ],
        primary_version: v2,
        created_at: created,
        updated_at: created,
        deletion_at: None,
        revision: 0,
        internal: false,
    }
}

fn new_tenant(id: &str) -> Tenant {
    Tenant { id: tenant(id), display_name: format!("Tenant {id} — ✓"), created_at: Timestamp(1_700_000_000_000) }
}

async fn create(s: &dyn Store, t: &str, id: &str, aliases: &[&str]) -> Key {
    let aliases: Vec<AliasName> = aliases.iter().map(|a| alias(a)).collect();
    s.create_key(&sample_key(t, id), &aliases).await.expect("create_key")
}

/// The whole change feed as (tenant, kind, id), checking sequence numbers increase.
async fn feed(s: &dyn Store) -> Vec<(String, ChangeKind, String)> {
    let changes = s.changes_since(0, 10_000).await.expect("changes_since");
    let mut last = 0;
    for c in &changes {
        assert!(c.seq > last, "change sequence numbers must increase: {} after {last}", c.seq);
        last = c.seq;
    }
    changes.into_iter().map(|c| (c.tenant.to_string(), c.kind, c.id)).collect()
}

async fn create_all(s: &dyn Store, keys: Vec<Key>) {
    for k in keys {
        s.create_key(&k, &[]).await.expect("create_key");
    }
}

fn change(t: &str, kind: ChangeKind, id: &str) -> (String, ChangeKind, String) {
    (t.to_owned(), kind, id.to_owned())
}

fn kind_of<T: fmt::Debug>(r: Result<T>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.kind(),
    }
}

fn ids(keys: &[Key]) -> Vec<String> {
    keys.iter().map(|k| k.id.to_string()).collect()
}

fn names(entries: &[AliasEntry]) -> Vec<String> {
    entries.iter().map(|a| a.alias.to_string()).collect()
}

// ---- cases ---------------------------------------------------------------------------------------------

/// `ping` works and a fresh store is empty everywhere.
pub async fn ping_and_empty_store(s: &dyn Store) {
    s.ping().await.expect("ping");
    assert_eq!(s.latest_change().await.expect("latest_change"), 0);
    assert!(s.changes_since(0, 100).await.expect("changes_since").is_empty());
    assert!(s.list_tenants().await.expect("list_tenants").is_empty());
    let t = tenant("acme");
    assert_eq!(s.count_keys(&t).await.expect("count_keys"), 0);
    let keys = s.list_keys(&t, &PageRequest::first(10)).await.expect("list_keys");
    assert!(keys.items.is_empty() && keys.next.is_none());
    let aliases = s.list_aliases(&t, None, &PageRequest::first(10)).await.expect("list_aliases");
    assert!(aliases.items.is_empty() && aliases.next.is_none());
    assert_eq!(s.get_key(&t, &key_id("nope")).await.expect("get_key"), None);
    assert_eq!(s.get_alias(&t, &alias("alias/nope")).await.expect("get_alias"), None);
    assert_eq!(s.get_tenant(&t).await.expect("get_tenant"), None);
    assert!(s.keys_due_for_deletion(Timestamp(i64::MAX), 10).await.expect("due").is_empty());
}

/// `ensure_tenant` creates once, reports it, and announces it once on the feed.
pub async fn tenants(s: &dyn Store) {
    let zeta = new_tenant("zeta");
    let acme = new_tenant("acme");
    assert!(s.ensure_tenant(&zeta).await.expect("ensure zeta"));
    assert!(s.ensure_tenant(&acme).await.expect("ensure acme"));
    let mut renamed = zeta.clone();
    renamed.display_name = "other".to_owned();
    assert!(!s.ensure_tenant(&renamed).await.expect("ensure zeta again"), "an existing tenant is not created");
    assert_eq!(s.get_tenant(&zeta.id).await.expect("get"), Some(zeta.clone()), "ensure_tenant never overwrites");
    assert_eq!(s.get_tenant(&tenant("nobody")).await.expect("get"), None);
    assert_eq!(s.list_tenants().await.expect("list"), vec![acme, zeta]);
    assert_eq!(
        feed(s).await,
        vec![change("zeta", ChangeKind::Tenant, "zeta"), change("acme", ChangeKind::Tenant, "acme")]
    );
}

/// `create_key` stores the whole document and its aliases; reads are per tenant.
pub async fn create_and_get_key(s: &dyn Store) {
    let key = sample_key("acme", "key-1");
    let stored = s.create_key(&key, &[alias("alias/one"), alias("alias/two")]).await.expect("create_key");
    assert_eq!(stored.revision, 1, "the store starts revisions at 1");
    assert_eq!(Key { revision: key.revision, ..stored.clone() }, key, "only the revision differs from the input");

    let t = tenant("acme");
    assert_eq!(s.get_key(&t, &key.id).await.expect("get_key"), Some(stored.clone()));
    assert_eq!(s.get_key(&tenant("other"), &key.id).await.expect("get_key"), None, "keys are per tenant");
    assert_eq!(s.count_keys(&t).await.expect("count"), 1);
    assert_eq!(s.count_keys(&tenant("other")).await.expect("count"), 0);

    for a in ["alias/one", "alias/two"] {
        let entry = s.get_alias(&t, &alias(a)).await.expect("get_alias").expect("alias exists");
        assert_eq!((entry.tenant.as_str(), entry.key_id.as_str()), ("acme", "key-1"));
        assert_eq!(entry.created_at, entry.updated_at);
    }
    assert_eq!(s.get_alias(&tenant("other"), &alias("alias/one")).await.expect("get_alias"), None);

    // A key without aliases, and the same id in another tenant, are fine.
    create(s, "acme", "key-2", &[]).await;
    let other = create(s, "other", "key-1", &["alias/one"]).await;
    assert_eq!(s.get_key(&tenant("other"), &key.id).await.expect("get_key"), Some(other));
    assert_eq!(s.count_keys(&t).await.expect("count"), 2);
}

/// A duplicate key id is `AlreadyExists` and writes nothing, not even the new aliases.
pub async fn create_key_duplicate_id_writes_nothing(s: &dyn Store) {
    let first = create(s, "acme", "dup", &["alias/first"]).await;
    let before = feed(s).await;
    let mut again = sample_key("acme", "dup");
    again.description = "second".to_owned();
    let r = s.create_key(&again, &[alias("alias/second")]).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    let t = tenant("acme");
    assert_eq!(s.get_key(&t, &key_id("dup")).await.expect("get"), Some(first), "the first key is untouched");
    assert_eq!(s.get_alias(&t, &alias("alias/second")).await.expect("get_alias"), None);
    assert_eq!(s.count_keys(&t).await.expect("count"), 1);
    assert_eq!(feed(s).await, before, "a failed create appends no change");
}

/// An alias already in use (by another key, or twice in the same request) is `AlreadyExists`, and the key
/// is not written either.
pub async fn create_key_duplicate_alias_writes_nothing(s: &dyn Store) {
    create(s, "acme", "owner", &["alias/taken"]).await;
    let before = feed(s).await;
    let t = tenant("acme");

    let r = s.create_key(&sample_key("acme", "thief"), &[alias("alias/free"), alias("alias/taken")]).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    assert_eq!(s.get_key(&t, &key_id("thief")).await.expect("get"), None, "the key is not written");
    assert_eq!(s.get_alias(&t, &alias("alias/free")).await.expect("get_alias"), None, "nor its other aliases");
    let taken = s.get_alias(&t, &alias("alias/taken")).await.expect("get_alias").expect("still there");
    assert_eq!(taken.key_id.as_str(), "owner");

    let r = s.create_key(&sample_key("acme", "twice"), &[alias("alias/x"), alias("alias/x")]).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    assert_eq!(s.get_key(&t, &key_id("twice")).await.expect("get"), None);
    assert_eq!(s.count_keys(&t).await.expect("count"), 1);
    assert_eq!(feed(s).await, before, "failed creates append no change");

    // The same alias name in another tenant is a different alias.
    create(s, "other", "owner", &["alias/taken"]).await;
}

/// `update_key` replaces the key only at the expected revision and bumps it; otherwise `Ok(None)`.
pub async fn update_key_is_optimistic(s: &dyn Store) {
    let t = tenant("acme");
    let v1 = create(s, "acme", "k", &[]).await;

    let mut change1 = v1.clone();
    change1.state = KeyState::Disabled;
    change1.description = "disabled".to_owned();
    change1.tags.insert("new".to_owned(), "tag".to_owned());
    change1.updated_at = Timestamp(v1.updated_at.0 + 10);
    let v2 = s.update_key(&change1).await.expect("update").expect("the revision matched");
    assert_eq!(v2.revision, 2);
    assert_eq!(Key { revision: 1, ..v2.clone() }, change1);
    assert_eq!(s.get_key(&t, &v1.id).await.expect("get"), Some(v2.clone()));

    // A writer still holding revision 1 lost the race: nothing changes.
    let mut stale = v1.clone();
    stale.description = "stale".to_owned();
    assert_eq!(s.update_key(&stale).await.expect("update"), None);
    assert_eq!(s.get_key(&t, &v1.id).await.expect("get"), Some(v2.clone()));

    // A revision from the future does not match either.
    let mut future = v2.clone();
    future.revision = 7;
    assert_eq!(s.update_key(&future).await.expect("update"), None);

    // Rotation: a new version becomes primary; the document keeps both.
    let mut rotated = v2.clone();
    let v = Uuid::new_v4();
    rotated.versions.push(KeyVersion {
        id: v,
        created_at: Timestamp(2_000_000_000_000),
        handle: BackendHandle { backend: "software".to_owned(), handle: vec![9; 48] },
    });
    rotated.primary_version = v;
    let v3 = s.update_key(&rotated).await.expect("update").expect("matched");
    assert_eq!(v3.revision, 3);
    let read = s.get_key(&t, &v1.id).await.expect("get").expect("exists");
    assert_eq!(read, v3);
    assert_eq!(read.primary().expect("primary").handle.handle, vec![9; 48]);

    // A key that does not exist (or is gone) is `None`, not an error.
    let mut ghost = sample_key("acme", "ghost");
    ghost.revision = 1;
    assert_eq!(s.update_key(&ghost).await.expect("update"), None);
    let mut elsewhere = v3.clone();
    elsewhere.tenant = tenant("other");
    assert_eq!(s.update_key(&elsewhere).await.expect("update"), None, "tenant is part of the identity");

    assert_eq!(
        feed(s).await,
        vec![
            change("acme", ChangeKind::Key, "k"),
            change("acme", ChangeKind::Key, "k"),
            change("acme", ChangeKind::Key, "k")
        ],
        "one change per successful write, none for lost races"
    );
}

/// Concurrent writers on one store: of two updates at the same revision exactly one wins, of two creates
/// of the same id or alias exactly one succeeds.
pub async fn concurrent_writes_one_wins(s: &dyn Store) {
    let t = tenant("acme");
    let mut current = create(s, "acme", "hot", &[]).await;
    for round in 0..10 {
        let mut a = current.clone();
        a.description = format!("a{round}");
        let mut b = current.clone();
        b.description = format!("b{round}");
        let (ra, rb) = tokio::join!(s.update_key(&a), s.update_key(&b));
        let (ra, rb) = (ra.expect("update a"), rb.expect("update b"));
        let winner = match (ra, rb) {
            (Some(w), None) | (None, Some(w)) => w,
            other => panic!("exactly one concurrent update must win, got {other:?}"),
        };
        assert_eq!(winner.revision, current.revision + 1);
        assert_eq!(s.get_key(&t, &current.id).await.expect("get"), Some(winner.clone()));
        current = winner;
    }

    let (race1, race2) = (sample_key("acme", "race"), sample_key("acme", "race"));
    let (ra, rb) = tokio::join!(s.create_key(&race1, &[]), s.create_key(&race2, &[]));
    let kinds = [ra.err().map(|e| e.kind()), rb.err().map(|e| e.kind())];
    assert!(
        kinds == [None, Some(ErrorKind::AlreadyExists)] || kinds == [Some(ErrorKind::AlreadyExists), None],
        "exactly one concurrent create wins: {kinds:?}"
    );

    let name = alias("alias/race");
    let (hot, race) = (key_id("hot"), key_id("race"));
    let (ra, rb) = tokio::join!(s.create_alias(&t, &name, &hot), s.create_alias(&t, &name, &race));
    let winner = match (ra, rb) {
        (Ok(w), Err(e)) | (Err(e), Ok(w)) => {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists);
            w
        }
        other => panic!("exactly one concurrent create_alias wins: {other:?}"),
    };
    assert_eq!(s.get_alias(&t, &name).await.expect("get_alias"), Some(winner));
    assert_eq!(s.count_keys(&t).await.expect("count"), 2);
}

/// `delete_key` removes the key and its aliases (and announces both), and only its own.
pub async fn delete_key_removes_its_aliases(s: &dyn Store) {
    let t = tenant("acme");
    create(s, "acme", "doomed", &["alias/d2", "alias/d1"]).await;
    let kept = create(s, "acme", "kept", &["alias/k"]).await;
    let twin = create(s, "other", "doomed", &["alias/d1"]).await;
    let before = feed(s).await.len();

    assert!(s.delete_key(&t, &key_id("doomed"), 1).await.expect("delete"));
    assert_eq!(s.get_key(&t, &key_id("doomed")).await.expect("get"), None);
    for a in ["alias/d1", "alias/d2"] {
        assert_eq!(s.get_alias(&t, &alias(a)).await.expect("get_alias"), None, "{a} goes with its key");
    }
    assert_eq!(s.get_key(&t, &key_id("kept")).await.expect("get"), Some(kept));
    assert!(s.get_alias(&t, &alias("alias/k")).await.expect("get_alias").is_some());
    assert_eq!(s.get_key(&tenant("other"), &key_id("doomed")).await.expect("get"), Some(twin), "other tenant");
    assert!(s.get_alias(&tenant("other"), &alias("alias/d1")).await.expect("get_alias").is_some());
    assert_eq!(s.count_keys(&t).await.expect("count"), 1);

    let all = feed(s).await;
    let mut appended = all[before..].to_vec();
    assert_eq!(appended.remove(0), change("acme", ChangeKind::Key, "doomed"), "the key change comes first");
    appended.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(
        appended,
        vec![change("acme", ChangeKind::Alias, "alias/d1"), change("acme", ChangeKind::Alias, "alias/d2")]
    );

    // Deleting again reports it did not exist and appends nothing.
    assert!(!s.delete_key(&t, &key_id("doomed"), 1).await.expect("delete"));
    assert!(!s.delete_key(&t, &key_id("never"), 1).await.expect("delete"));
    assert_eq!(feed(s).await.len(), all.len());

    // The id and the alias names are free again.
    create(s, "acme", "doomed", &["alias/d1"]).await;
}

/// `list_keys` pages by id in byte order with an `after` cursor; `next` is set only when more remain.
pub async fn list_keys_pages_in_byte_order(s: &dyn Store) {
    let t = tenant("acme");
    // Mixed case and punctuation: byte order, not a locale's ('B' < '_' < 'a').
    let mut expected = vec!["k05", "a-1", "k01", "B-2", "_x", "A.3", "b_4", "k07", "k03"];
    for id in &expected {
        create(s, "acme", id, &[]).await;
    }
    create(s, "other", "k02", &[]).await;
    create(s, "other", "0", &[]).await;
    expected.sort_unstable();

    let mut seen = Vec::new();
    let mut page = PageRequest::first(4);
    let mut pages = Vec::new();
    loop {
        let p = s.list_keys(&t, &page).await.expect("list_keys");
        assert!(p.items.len() <= 4);
        pages.push(p.items.len());
        for k in &p.items {
            assert_eq!(k.tenant, t);
            assert_eq!(s.get_key(&t, &k.id).await.expect("get").as_ref(), Some(k), "listed keys are whole");
        }
        seen.extend(ids(&p.items));
        match p.next {
            Some(next) => {
                assert_eq!(Some(&next), seen.last(), "next is the last item of the page");
                page.after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, vec![4, 4, 1]);

    // A page that ends exactly at the last key has no next.
    let all = s.list_keys(&t, &PageRequest::first(9)).await.expect("list");
    assert_eq!((all.items.len(), all.next), (9, None));
    // Limit 0 is clamped to 1.
    let one = s.list_keys(&t, &PageRequest::first(0)).await.expect("list");
    assert_eq!(ids(&one.items), vec![expected[0]]);
    assert_eq!(one.next.as_deref(), Some(expected[0]));
    // A cursor that is not an id still positions the page.
    let p = s.list_keys(&t, &PageRequest { after: Some("k02".into()), limit: 10 }).await.expect("list");
    assert_eq!(ids(&p.items), vec!["k03", "k05", "k07"]);
    let p = s.list_keys(&t, &PageRequest { after: Some("k07".into()), limit: 10 }).await.expect("list");
    assert!(p.items.is_empty() && p.next.is_none());
    let p = s.list_keys(&tenant("other"), &PageRequest::first(10)).await.expect("list");
    assert_eq!(ids(&p.items), vec!["0", "k02"]);
}

/// Alias create, read, retarget, delete, with each error path, and their change-feed entries.
pub async fn alias_lifecycle(s: &dyn Store) {
    let t = tenant("acme");
    create(s, "acme", "k1", &[]).await;
    create(s, "acme", "k2", &[]).await;
    create(s, "other", "only-there", &[]).await;
    let base = feed(s).await.len();
    let name = alias("alias/app");

    let entry = s.create_alias(&t, &name, &key_id("k1")).await.expect("create_alias");
    assert_eq!((entry.tenant.as_str(), entry.alias.as_str(), entry.key_id.as_str()), ("acme", "alias/app", "k1"));
    assert_eq!(entry.created_at, entry.updated_at);
    assert_eq!(s.get_alias(&t, &name).await.expect("get_alias"), Some(entry.clone()));

    assert_eq!(kind_of(s.create_alias(&t, &name, &key_id("k2")).await), ErrorKind::AlreadyExists);
    assert_eq!(kind_of(s.create_alias(&t, &alias("alias/none"), &key_id("missing")).await), ErrorKind::KeyNotFound);
    assert_eq!(
        kind_of(s.create_alias(&t, &alias("alias/none"), &key_id("only-there")).await),
        ErrorKind::KeyNotFound,
        "a key of another tenant does not exist here"
    );
    assert_eq!(s.get_alias(&t, &alias("alias/none")).await.expect("get_alias"), None);

    let moved = s.update_alias(&t, &name, &key_id("k2")).await.expect("update_alias");
    assert_eq!(moved.key_id.as_str(), "k2");
    assert_eq!(moved.created_at, entry.created_at, "retargeting keeps the creation time");
    assert!(moved.updated_at >= entry.updated_at);
    assert_eq!(s.get_alias(&t, &name).await.expect("get_alias"), Some(moved.clone()));

    assert_eq!(kind_of(s.update_alias(&t, &alias("alias/ghost"), &key_id("k1")).await), ErrorKind::AliasNotFound);
    assert_eq!(kind_of(s.update_alias(&t, &name, &key_id("missing")).await), ErrorKind::KeyNotFound);
    assert_eq!(kind_of(s.update_alias(&t, &name, &key_id("only-there")).await), ErrorKind::KeyNotFound);
    assert_eq!(s.get_alias(&t, &name).await.expect("get_alias"), Some(moved), "failed updates change nothing");
    assert_eq!(
        kind_of(s.update_alias(&tenant("other"), &name, &key_id("only-there")).await),
        ErrorKind::AliasNotFound,
        "aliases are per tenant"
    );

    assert!(!s.delete_alias(&tenant("other"), &name).await.expect("delete_alias"));
    assert!(s.delete_alias(&t, &name).await.expect("delete_alias"));
    assert!(!s.delete_alias(&t, &name).await.expect("delete_alias"));
    assert_eq!(s.get_alias(&t, &name).await.expect("get_alias"), None);
    assert!(s.get_key(&t, &key_id("k2")).await.expect("get").is_some(), "deleting an alias keeps its key");

    assert_eq!(
        feed(s).await[base..],
        [
            change("acme", ChangeKind::Alias, "alias/app"),
            change("acme", ChangeKind::Alias, "alias/app"),
            change("acme", ChangeKind::Alias, "alias/app"),
        ],
        "create, update and delete each append one alias change; failures append none"
    );
}

/// `list_aliases` pages by name, for a tenant or one key.
pub async fn list_aliases_pages_and_filters(s: &dyn Store) {
    let t = tenant("acme");
    create(s, "acme", "k1", &["alias/a5", "alias/a1", "alias/a3"]).await;
    create(s, "acme", "k2", &["alias/a2", "alias/a4"]).await;
    create(s, "acme", "bare", &[]).await;
    create(s, "other", "k1", &["alias/a0"]).await;

    let p1 = s.list_aliases(&t, None, &PageRequest::first(2)).await.expect("list");
    assert_eq!(names(&p1.items), vec!["alias/a1", "alias/a2"]);
    assert_eq!(p1.next.as_deref(), Some("alias/a2"));
    let p2 = s.list_aliases(&t, None, &PageRequest { after: p1.next, limit: 2 }).await.expect("list");
    assert_eq!(names(&p2.items), vec!["alias/a3", "alias/a4"]);
    let p3 = s.list_aliases(&t, None, &PageRequest { after: p2.next, limit: 2 }).await.expect("list");
    assert_eq!(names(&p3.items), vec!["alias/a5"]);
    assert_eq!(p3.next, None);
    assert!(p3.items.iter().all(|a| a.tenant == t && a.key_id.as_str() == "k1"));

    let k1 = key_id("k1");
    let f1 = s.list_aliases(&t, Some(&k1), &PageRequest::first(2)).await.expect("list");
    assert_eq!(names(&f1.items), vec!["alias/a1", "alias/a3"]);
    assert_eq!(f1.next.as_deref(), Some("alias/a3"));
    let f2 = s.list_aliases(&t, Some(&k1), &PageRequest { after: f1.next, limit: 2 }).await.expect("list");
    assert_eq!((names(&f2.items), f2.next), (vec!["alias/a5".to_owned()], None));
    let k2 = s.list_aliases(&t, Some(&key_id("k2")), &PageRequest::first(10)).await.expect("list");
    assert_eq!((names(&k2.items), k2.next), (vec!["alias/a2".to_owned(), "alias/a4".to_owned()], None));
    let bare = s.list_aliases(&t, Some(&key_id("bare")), &PageRequest::first(10)).await.expect("list");
    assert!(bare.items.is_empty() && bare.next.is_none());
    let other = s.list_aliases(&tenant("other"), None, &PageRequest::first(10)).await.expect("list");
    assert_eq!(names(&other.items), vec!["alias/a0"]);
    for a in &other.items {
        assert_eq!(s.get_alias(&a.tenant, &a.alias).await.expect("get_alias").as_ref(), Some(a));
    }
}

/// Keys pending deletion whose time has come, across tenants, oldest first, limited.
pub async fn keys_due_for_deletion(s: &dyn Store) {
    let now = Timestamp(1_800_000_000_000);
    let mut specs = vec![
        ("acme", "due-early", KeyState::PendingDeletion, Some(now.0 - 5_000)),
        ("other", "due-now", KeyState::PendingDeletion, Some(now.0)),
        ("acme", "due-later", KeyState::PendingDeletion, Some(now.0 + 1)),
        ("acme", "enabled-past", KeyState::Enabled, Some(now.0 - 9_000)),
        ("other", "disabled", KeyState::Disabled, None),
    ];
    for (t, id, state, at) in specs.drain(..) {
        let mut k = sample_key(t, id);
        k.state = state;
        k.deletion_at = at.map(Timestamp);
        s.create_key(&k, &[]).await.expect("create");
    }
    // A key scheduled through update_key (the usual way) is found too.
    let v1 = create(s, "third", "scheduled", &[]).await;
    let mut sched = v1.clone();
    sched.state = KeyState::PendingDeletion;
    sched.deletion_at = Some(Timestamp(now.0 - 1_000));
    let sched = s.update_key(&sched).await.expect("update").expect("matched");

    let due = s.keys_due_for_deletion(now, 10).await.expect("due");
    assert_eq!(ids(&due), vec!["due-early", "scheduled", "due-now"]);
    assert_eq!(due[1], sched, "due keys are returned whole, with their revision");
    assert_eq!(ids(&s.keys_due_for_deletion(now, 1).await.expect("due")), vec!["due-early"]);
    assert!(s.keys_due_for_deletion(now, 0).await.expect("due").is_empty());
    assert!(s.keys_due_for_deletion(Timestamp(now.0 - 5_001), 10).await.expect("due").is_empty());

    // Cancelling the deletion takes the key off the list.
    let mut cancel = sched.clone();
    cancel.state = KeyState::Disabled;
    cancel.deletion_at = None;
    s.update_key(&cancel).await.expect("update").expect("matched");
    assert_eq!(ids(&s.keys_due_for_deletion(now, 10).await.expect("due")), vec!["due-early", "due-now"]);
}

/// `record_change`, `changes_since` (ordered, limited, strictly after) and `latest_change`.
pub async fn change_feed(s: &dyn Store) {
    let kinds = [
        ChangeKind::Credential,
        ChangeKind::Token,
        ChangeKind::Policy,
        ChangeKind::Secret,
        ChangeKind::Key,
        ChangeKind::Alias,
        ChangeKind::Tenant,
    ];
    let before = Timestamp::now();
    let mut seqs = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let seq = s.record_change(&tenant("acme"), *kind, &format!("id-{i}/ü")).await.expect("record_change");
        assert!(seqs.last().is_none_or(|last| seq > *last), "sequence numbers increase");
        seqs.push(seq);
    }
    let after = Timestamp::now();
    assert_eq!(s.latest_change().await.expect("latest"), seqs[6]);

    let all = s.changes_since(0, 100).await.expect("changes_since");
    assert_eq!(all.iter().map(|c| c.seq).collect::<Vec<_>>(), seqs);
    for (i, c) in all.iter().enumerate() {
        assert_eq!((c.tenant.as_str(), c.kind, c.id.as_str()), ("acme", kinds[i], format!("id-{i}/ü").as_str()));
        assert!(before <= c.at && c.at <= after, "change time is the store's clock in ms");
    }
    let page = s.changes_since(seqs[1], 3).await.expect("changes_since");
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), seqs[2..5].to_vec());
    assert!(s.changes_since(seqs[6], 10).await.expect("changes_since").is_empty());
    assert!(s.changes_since(0, 0).await.expect("changes_since").is_empty());

    // Store mutations continue the same sequence.
    create(s, "acme", "k", &[]).await;
    let latest = s.latest_change().await.expect("latest");
    assert!(latest > seqs[6]);
    let tail = s.changes_since(seqs[6], 10).await.expect("changes_since");
    assert_eq!(tail.len(), 1);
    assert_eq!((tail[0].seq, tail[0].kind, tail[0].id.as_str()), (latest, ChangeKind::Key, "k"));
}

/// Every tenant, key and alias mutation appends its change in order (and failed ones append nothing).
pub async fn mutations_append_changes(s: &dyn Store) {
    let t = tenant("acme");
    s.ensure_tenant(&new_tenant("acme")).await.expect("ensure");
    s.ensure_tenant(&new_tenant("acme")).await.expect("ensure again");
    let k = create(s, "acme", "k", &["alias/a"]).await;
    let mut upd = k.clone();
    upd.state = KeyState::Disabled;
    let upd = s.update_key(&upd).await.expect("update").expect("matched");
    s.update_key(&k).await.expect("stale update");
    create(s, "acme", "k2", &[]).await;
    s.create_alias(&t, &alias("alias/b"), &key_id("k")).await.expect("create_alias");
    s.update_alias(&t, &alias("alias/b"), &key_id("k2")).await.expect("update_alias");
    s.update_alias(&t, &alias("alias/b"), &key_id("k")).await.expect("update_alias");
    s.create_alias(&t, &alias("alias/c"), &key_id("k")).await.expect("create_alias");
    s.delete_alias(&t, &alias("alias/c")).await.expect("delete_alias");
    s.delete_alias(&t, &alias("alias/c")).await.expect("delete_alias (absent)");
    assert!(!s.delete_key(&t, &key_id("k"), k.revision).await.expect("delete_key at a stale revision"));
    assert!(s.delete_key(&t, &key_id("k"), upd.revision).await.expect("delete_key"));

    let got = feed(s).await;
    let (head, tail) = got.split_at(got.len() - 3);
    assert_eq!(
        head,
        [
            change("acme", ChangeKind::Tenant, "acme"),
            change("acme", ChangeKind::Key, "k"),
            change("acme", ChangeKind::Alias, "alias/a"),
            change("acme", ChangeKind::Key, "k"),
            change("acme", ChangeKind::Key, "k2"),
            change("acme", ChangeKind::Alias, "alias/b"),
            change("acme", ChangeKind::Alias, "alias/b"),
            change("acme", ChangeKind::Alias, "alias/b"),
            change("acme", ChangeKind::Alias, "alias/c"),
            change("acme", ChangeKind::Alias, "alias/c"),
        ]
    );
    // delete_key: the key, then every alias it removed (a and b both pointed at k).
    assert_eq!(tail[0], change("acme", ChangeKind::Key, "k"));
    let mut removed: Vec<_> = tail[1..].to_vec();
    removed.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(removed, [change("acme", ChangeKind::Alias, "alias/a"), change("acme", ChangeKind::Alias, "alias/b")]);
}

/// `delete_key` removes a key only at the revision the caller read: a key changed since (a deletion cancelled
/// meanwhile) is kept with its aliases, and nothing is announced.
pub async fn delete_key_checks_the_revision(s: &dyn Store) {
    let t = tenant("acme");
    let v1 = create(s, "acme", "k", &["alias/k1", "alias/k2"]).await;
    let mut schedule = v1.clone();
    schedule.state = KeyState::PendingDeletion;
    schedule.deletion_at = Some(Timestamp(1));
    let v2 = s.update_key(&schedule).await.expect("update").expect("matched");
    // The purger read v2; then the deletion was cancelled.
    let mut cancel = v2.clone();
    cancel.state = KeyState::Disabled;
    cancel.deletion_at = None;
    let v3 = s.update_key(&cancel).await.expect("update").expect("matched");
    let before = feed(s).await;

    for stale in [v2.revision, v1.revision, v3.revision + 1, 0, -1] {
        assert!(!s.delete_key(&t, &v3.id, stale).await.expect("delete_key"), "revision {stale} is not stored");
    }
    assert!(
        !s.delete_key(&tenant("other"), &v3.id, v3.revision).await.expect("delete_key"),
        "tenant is part of the identity"
    );
    assert_eq!(s.get_key(&t, &v3.id).await.expect("get"), Some(v3.clone()), "the key is untouched");
    for a in ["alias/k1", "alias/k2"] {
        let entry = s.get_alias(&t, &alias(a)).await.expect("get_alias").expect("the alias is kept");
        assert_eq!(entry.key_id, v3.id);
    }
    assert_eq!(s.count_keys(&t).await.expect("count"), 1);
    assert_eq!(feed(s).await, before, "a refused delete appends no change");

    assert!(s.delete_key(&t, &v3.id, v3.revision).await.expect("delete_key"), "the current revision deletes");
    assert_eq!(s.get_key(&t, &v3.id).await.expect("get"), None);
    assert_eq!(s.list_aliases(&t, None, &PageRequest::first(10)).await.expect("list").items, vec![]);
    assert_eq!(feed(s).await.len(), before.len() + 3, "the key and its two aliases are announced");
}

/// `prune_changes` removes entries older than the cut, never the newest one, and sequence numbers keep
/// increasing after it.
pub async fn prune_changes_keeps_the_newest(s: &dyn Store) {
    assert_eq!(s.prune_changes(Timestamp(i64::MAX)).await.expect("prune"), 0, "an empty feed has nothing to prune");
    let t = tenant("acme");
    let mut old = Vec::new();
    for i in 0..3 {
        old.push(s.record_change(&t, ChangeKind::Key, &format!("old-{i}")).await.expect("record"));
    }
    // Change times are milliseconds: step past them so the cut falls strictly between old and new entries.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut = Timestamp::now();
    let mut new = Vec::new();
    for i in 0..2 {
        new.push(s.record_change(&t, ChangeKind::Alias, &format!("new-{i}")).await.expect("record"));
    }
    let seqs = |changes: Vec<kmsgate_core::Change>| changes.iter().map(|c| c.seq).collect::<Vec<_>>();

    assert_eq!(s.prune_changes(Timestamp(i64::MIN)).await.expect("prune"), 0);
    assert_eq!(s.prune_changes(cut).await.expect("prune"), 3, "the entries before the cut go");
    assert_eq!(seqs(s.changes_since(0, 100).await.expect("changes")), new);
    assert_eq!(s.prune_changes(cut).await.expect("prune"), 0, "pruning again removes nothing");

    // Everything is old now, but the newest entry stays, so the latest sequence number does not go back.
    assert_eq!(s.prune_changes(Timestamp(i64::MAX)).await.expect("prune"), 1);
    assert_eq!(seqs(s.changes_since(0, 100).await.expect("changes")), vec![new[1]]);
    assert_eq!(s.latest_change().await.expect("latest"), new[1]);
    assert_eq!(s.prune_changes(Timestamp(i64::MAX)).await.expect("prune"), 0, "the last entry is never pruned");

    // Sequence numbers continue after the pruned ones, from store writes and record_change alike.
    create(s, "acme", "k", &[]).await;
    let written = s.latest_change().await.expect("latest");
    assert!(written > new[1], "{written} after {}", new[1]);
    let recorded = s.record_change(&t, ChangeKind::Policy, "p").await.expect("record");
    assert!(recorded > written);
    assert_eq!(seqs(s.changes_since(new[1], 100).await.expect("changes")), vec![written, recorded]);
    // A follower whose cursor is in the pruned range gets what is left, in order.
    assert_eq!(seqs(s.changes_since(old[0], 100).await.expect("changes")), vec![new[1], written, recorded]);
}

/// First half of a restart test on a persistent store: fills the feed and prunes it down to its newest entry;
/// returns that entry's sequence number. Close the store, reopen it, and pass the number to
/// [`changes_continue_after_reopen`].
pub async fn prune_before_reopen(s: &dyn Store) -> i64 {
    let t = tenant("acme");
    for i in 0..5 {
        s.record_change(&t, ChangeKind::Credential, &format!("c-{i}")).await.expect("record");
    }
    create(s, "acme", "k", &["alias/k"]).await;
    let last = s.latest_change().await.expect("latest");
    assert_eq!(s.prune_changes(Timestamp(i64::MAX)).await.expect("prune"), 6);
    let left = s.changes_since(0, 100).await.expect("changes");
    assert_eq!(left.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![last]);
    last
}

/// Second half of the restart test (see [`prune_before_reopen`]): the pruned feed survived, and new entries
/// are numbered after it.
pub async fn changes_continue_after_reopen(s: &dyn Store, last: i64) {
    assert_eq!(s.latest_change().await.expect("latest"), last);
    let left = s.changes_since(0, 100).await.expect("changes");
    assert_eq!(left.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![last]);
    let next = s.record_change(&tenant("acme"), ChangeKind::Policy, "p").await.expect("record");
    assert!(next > last, "sequence numbers never restart: {next} after {last}");
    let stored = s.put_document(&doc("policy", "p", "acme", json!({})), Precondition::Absent).await;
    stored.expect("put").expect("inserted");
    assert!(s.latest_change().await.expect("latest") > next);
}

fn doc(kind: &str, id: &str, t: &str, body: serde_json::Value) -> Document {
    Document::new(kind, id, tenant(t), body)
}

async fn put(s: &dyn Store, d: &Document, p: Precondition) -> Option<Document> {
    s.put_document(d, p).await.expect("put_document")
}

async fn get_doc(s: &dyn Store, kind: &str, id: &str) -> Option<Document> {
    s.get_document(kind, id).await.expect("get_document")
}

fn doc_ids(docs: &[Document]) -> Vec<String> {
    docs.iter().map(|d| d.id.clone()).collect()
}

/// `put_document` under `Absent`, `Revision` and `Any`: revisions start at 1 and grow by one per write, the
/// creation time is the first insert's, the body is stored as given.
pub async fn documents_put_under_each_precondition(s: &dyn Store) {
    const KIND: &str = "xks.credential";
    let body = json!({
        "name": "clé ✓ \"quoted\" \\ '; DROP TABLE documents; --",
        "n": 42,
        "max": u64::MAX,
        "min": i64::MIN,
        "half": 1.5,
        "nested": {"list": [1, null, true, "x", {}], "empty": []},
    });
    let mut input = doc(KIND, "AKIA-1", "acme", body.clone());
    // The store maintains these, whatever the caller passes.
    input.revision = 99;
    input.created_at = Timestamp(1);
    input.updated_at = Timestamp(2);
    let before = Timestamp::now();
    let v1 = put(s, &input, Precondition::Absent).await.expect("inserted");
    let after = Timestamp::now();
    assert_eq!((v1.kind.as_str(), v1.id.as_str(), v1.tenant.as_str()), (KIND, "AKIA-1", "acme"));
    assert_eq!(v1.body, body);
    assert_eq!(v1.revision, 1, "revisions start at 1");
    assert!(before <= v1.created_at && v1.created_at <= after, "the store's clock, in ms");
    assert_eq!(v1.updated_at, v1.created_at);
    assert_eq!(get_doc(s, KIND, "AKIA-1").await, Some(v1.clone()));
    assert_eq!(get_doc(s, KIND, "AKIA-2").await, None);
    assert_eq!(get_doc(s, "other.kind", "AKIA-1").await, None, "ids are per kind");

    // Absent: an existing document is `AlreadyExists`, whichever tenant asks (ids are unique across tenants).
    let mut dup = doc(KIND, "AKIA-1", "acme", json!({"other": true}));
    assert_eq!(kind_of(s.put_document(&dup, Precondition::Absent).await), ErrorKind::AlreadyExists);
    dup.tenant = tenant("other");
    assert_eq!(kind_of(s.put_document(&dup, Precondition::Absent).await), ErrorKind::AlreadyExists);
    assert_eq!(get_doc(s, KIND, "AKIA-1").await, Some(v1.clone()), "a refused insert changes nothing");

    // Revision: written only at the stored revision; the creation time is kept, the update time is now.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let mut edit = v1.clone();
    edit.body = json!({"rotated": 1});
    edit.created_at = Timestamp(5);
    let v2 = put(s, &edit, Precondition::Revision(1)).await.expect("the revision matched");
    assert_eq!(v2.revision, 2);
    assert_eq!(v2.created_at, v1.created_at, "created_at is the first insert's");
    assert!(v2.updated_at > v1.updated_at && v2.updated_at <= Timestamp::now());
    assert_eq!(v2.body, edit.body);
    assert_eq!(get_doc(s, KIND, "AKIA-1").await, Some(v2.clone()));
    let mut stale = v1.clone();
    stale.body = json!("stale");
    assert_eq!(put(s, &stale, Precondition::Revision(1)).await, None, "a stale revision loses");
    assert_eq!(put(s, &stale, Precondition::Revision(3)).await, None, "a future revision does not match");
    assert_eq!(put(s, &stale, Precondition::Revision(0)).await, None);
    let ghost = doc(KIND, "ghost", "acme", json!(1));
    assert_eq!(put(s, &ghost, Precondition::Revision(1)).await, None, "a missing document is not written");
    assert_eq!(get_doc(s, KIND, "ghost").await, None, "nor created");
    assert_eq!(get_doc(s, KIND, "AKIA-1").await, Some(v2.clone()));

    // Any: replaces what is there, or inserts.
    let v3 = put(s, &doc(KIND, "AKIA-1", "acme", json!("a string")), Precondition::Any).await.expect("replaced");
    assert_eq!((v3.revision, v3.created_at, v3.body.clone()), (3, v1.created_at, json!("a string")));
    assert!(v3.updated_at >= v2.updated_at);
    let fresh = put(s, &doc(KIND, "AKIA-2", "other", json!(null)), Precondition::Any).await.expect("inserted");
    assert_eq!((fresh.revision, fresh.tenant.as_str(), fresh.body.clone()), (1, "other", json!(null)));
    assert_eq!(fresh.created_at, fresh.updated_at);
    assert_eq!(get_doc(s, KIND, "AKIA-2").await, Some(fresh));
    let v4 = put(s, &v3, Precondition::Revision(3)).await.expect("Revision after Any");
    assert_eq!(v4.revision, 4);

    // The same id in another kind is another document.
    let other = put(s, &doc("alibaba.access-key", "AKIA-1", "acme", json!([])), Precondition::Absent).await;
    assert_eq!(other.expect("inserted").revision, 1);
    assert_eq!(get_doc(s, KIND, "AKIA-1").await, Some(v4));
}

/// Every successful document write and delete appends one `Document` change (tenant, `<kind>/<id>`) in order;
/// failed ones append nothing. A document moved to another tenant is announced to both.
pub async fn documents_announce_every_write(s: &dyn Store) {
    const KIND: &str = "xks.credential";
    let base = feed(s).await.len();
    let before = Timestamp::now();
    // A slash in the id is fine: kinds have none, so the change id splits at its first slash.
    let v1 = put(s, &doc(KIND, "AK/1", "acme", json!(1)), Precondition::Absent).await.expect("inserted");
    assert!(s.put_document(&v1, Precondition::Absent).await.is_err());
    let v2 = put(s, &Document { body: json!(2), ..v1.clone() }, Precondition::Revision(1)).await.expect("written");
    assert_eq!(put(s, &v1, Precondition::Revision(1)).await, None);
    let v3 = put(s, &Document { body: json!(3), ..v2 }, Precondition::Any).await.expect("written");
    put(s, &doc("policy", "p", "zeta", json!({})), Precondition::Any).await.expect("inserted");

    let moved = put(s, &Document { tenant: tenant("other"), ..v3.clone() }, Precondition::Revision(v3.revision))
        .await
        .expect("moved");
    assert_eq!(moved.tenant.as_str(), "other");
    assert_eq!(moved.created_at, v1.created_at);
    let acme = s.list_documents(KIND, Some(&tenant("acme")), &PageRequest::first(10)).await.expect("list");
    assert!(acme.items.is_empty(), "a moved document is listed under its new tenant only");
    let others = s.list_documents(KIND, Some(&tenant("other")), &PageRequest::first(10)).await.expect("list");
    assert_eq!(others.items, vec![moved.clone()]);

    assert!(s.delete_document(KIND, "AK/1").await.expect("delete"));
    assert!(!s.delete_document(KIND, "AK/1").await.expect("delete again"));
    assert!(!s.delete_document("policy", "absent").await.expect("delete absent"));
    let after = Timestamp::now();

    let id = "xks.credential/AK/1";
    assert_eq!(v1.change_id(), id);
    assert_eq!(
        feed(s).await[base..],
        [
            change("acme", ChangeKind::Document, id),
            change("acme", ChangeKind::Document, id),
            change("acme", ChangeKind::Document, id),
            change("zeta", ChangeKind::Document, "policy/p"),
            change("acme", ChangeKind::Document, id),
            change("other", ChangeKind::Document, id),
            change("other", ChangeKind::Document, id),
        ],
        "insert, Revision write, Any write, another insert, a move (both tenants), a delete"
    );
    let changes = s.changes_since(0, 100).await.expect("changes");
    assert!(changes.iter().all(|c| before <= c.at && c.at <= after), "change times are the store's clock");
}

/// `list_documents` pages by id in byte order within one kind, for every tenant or one.
pub async fn list_documents_pages_and_filters(s: &dyn Store) {
    const KIND: &str = "xks.credential";
    // Byte order, not a locale's ('0' < 'A' < 'B' < '_' < 'a'); spaces and slashes are id characters.
    let acme = ["k05", "a-1", "B 2", "_x", "A/3", "k01"];
    let other = ["k02", "0"];
    for id in acme {
        put(s, &doc(KIND, id, "acme", json!({ "id": id })), Precondition::Absent).await.expect("inserted");
    }
    for id in other {
        put(s, &doc(KIND, id, "other", json!({ "id": id })), Precondition::Absent).await.expect("inserted");
    }
    for id in ["k03", "a-1"] {
        put(s, &doc("other.kind", id, "acme", json!(id)), Precondition::Absent).await.expect("inserted");
    }
    let mut all: Vec<&str> = acme.iter().chain(&other).copied().collect();
    all.sort_unstable();
    let mut acme_sorted = acme.to_vec();
    acme_sorted.sort_unstable();

    // Walks every page, checking each item is whole and of the tenant asked for; returns ids and page sizes.
    let walk = |t: Option<TenantId>, limit: u32| async move {
        let mut page = PageRequest::first(limit);
        let (mut seen, mut sizes) = (Vec::new(), Vec::new());
        loop {
            let p = s.list_documents(KIND, t.as_ref(), &page).await.expect("list_documents");
            sizes.push(p.items.len());
            for d in &p.items {
                assert_eq!(d.kind, KIND);
                assert!(t.as_ref().is_none_or(|t| &d.tenant == t), "{} is of another tenant", d.id);
                assert_eq!(get_doc(s, KIND, &d.id).await.as_ref(), Some(d), "listed documents are whole");
            }
            seen.extend(doc_ids(&p.items));
            match p.next {
                Some(next) => {
                    assert_eq!(Some(&next), seen.last(), "next is the last id of the page");
                    page.after = Some(next);
                }
                None => return (seen, sizes),
            }
        }
    };
    assert_eq!(walk(None, 3).await, (all.iter().map(|s| s.to_string()).collect(), vec![3, 3, 2]));
    assert_eq!(walk(Some(tenant("acme")), 4).await, (acme_sorted.iter().map(|s| s.to_string()).collect(), vec![4, 2]));
    assert_eq!(walk(Some(tenant("other")), 10).await, (vec!["0".to_owned(), "k02".to_owned()], vec![2]));
    assert_eq!(walk(Some(tenant("nobody")), 10).await, (vec![], vec![0]));

    // A page that ends exactly at the last document has no next.
    let p = s.list_documents(KIND, Some(&tenant("acme")), &PageRequest::first(6)).await.expect("list");
    assert_eq!((p.items.len(), p.next), (6, None));
    // Limit 0 is clamped to 1.
    let p = s.list_documents(KIND, None, &PageRequest::first(0)).await.expect("list");
    assert_eq!((doc_ids(&p.items), p.next), (vec![all[0].to_owned()], Some(all[0].to_owned())));
    // A cursor that is not an id still positions the page.
    let after = |a: &str| PageRequest { after: Some(a.to_owned()), limit: 10 };
    assert_eq!(doc_ids(&s.list_documents(KIND, None, &after("k03")).await.expect("list").items), vec!["k05"]);
    let p = s.list_documents(KIND, Some(&tenant("acme")), &after("k01")).await.expect("list");
    assert_eq!((doc_ids(&p.items), p.next), (vec!["k05".to_owned()], None));
    let p = s.list_documents(KIND, None, &after("k05")).await.expect("list");
    assert!(p.items.is_empty() && p.next.is_none());
    // Kinds do not mix.
    let p = s.list_documents("other.kind", None, &PageRequest::first(10)).await.expect("list");
    assert_eq!(doc_ids(&p.items), vec!["a-1", "k03"]);
    assert!(s.list_documents("empty.kind", None, &PageRequest::first(10)).await.expect("list").items.is_empty());
}

/// `delete_document` reports whether the document existed; its id is free again afterwards.
pub async fn delete_document_frees_the_id(s: &dyn Store) {
    let v1 = put(s, &doc("token", "t-1", "acme", json!({"v": 1})), Precondition::Absent).await.expect("inserted");
    put(s, &Document { body: json!({"v": 2}), ..v1 }, Precondition::Revision(1)).await.expect("written");
    let t2 = put(s, &doc("token", "t-2", "acme", json!({})), Precondition::Absent).await.expect("inserted");

    assert!(!s.delete_document("other.kind", "t-1").await.expect("delete"), "kinds are separate");
    assert!(s.delete_document("token", "t-1").await.expect("delete"));
    assert_eq!(get_doc(s, "token", "t-1").await, None);
    assert!(!s.delete_document("token", "t-1").await.expect("delete again"));
    assert!(!s.delete_document("token", "never").await.expect("delete never"));
    assert_eq!(get_doc(s, "token", "t-2").await, Some(t2.clone()), "only the one document goes");
    let p = s.list_documents("token", None, &PageRequest::first(10)).await.expect("list");
    assert_eq!(p.items, vec![t2]);

    // The id is free again, for any tenant, and its revisions start over.
    let again = put(s, &doc("token", "t-1", "other", json!(3)), Precondition::Absent).await.expect("inserted");
    assert_eq!((again.revision, again.tenant.as_str()), (1, "other"));
    assert_eq!(get_doc(s, "token", "t-1").await, Some(again));
}

/// Kinds are 1-64 of `a-z 0-9 . _ -` and ids 1-256 printable ASCII characters; anything else is
/// `InvalidRequest` on writes and writes nothing. Reads of an id that cannot exist find nothing.
pub async fn document_kinds_and_ids_are_validated(s: &dyn Store) {
    let longest_kind = "k".repeat(64);
    let longest_id = "~".repeat(256);
    let valid =
        [(longest_kind.as_str(), "x"), ("a.b_c-9", longest_id.as_str()), ("x", " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")];
    for (kind, id) in valid {
        let stored = put(s, &doc(kind, id, "acme", json!({})), Precondition::Absent).await.expect("valid");
        assert_eq!(get_doc(s, kind, id).await, Some(stored));
    }
    let before = feed(s).await;

    let too_long_kind = "k".repeat(65);
    let bad_kinds = ["", too_long_kind.as_str(), "Xks", "xks/credential", "xks credential", "xkş", "xks:cred"];
    let too_long_id = "~".repeat(257);
    let bad_ids = ["", too_long_id.as_str(), "a\nb", "tab\t", "del\u{7f}", "é", "nul\0"];
    let mut bad: Vec<(&str, &str)> = bad_kinds.iter().map(|k| (*k, "x")).collect();
    bad.extend(bad_ids.iter().map(|i| ("x", *i)));
    for (kind, id) in bad {
        for p in [Precondition::Absent, Precondition::Any, Precondition::Revision(1)] {
            let r = s.put_document(&doc(kind, id, "acme", json!({})), p).await;
            assert_eq!(kind_of(r), ErrorKind::InvalidRequest, "kind {kind:?} id {id:?} {p:?}");
        }
    }
    for kind in bad_kinds {
        assert_eq!(kind_of(s.get_document(kind, "x").await), ErrorKind::InvalidRequest, "{kind:?}");
        assert_eq!(kind_of(s.delete_document(kind, "x").await), ErrorKind::InvalidRequest, "{kind:?}");
        let r = s.list_documents(kind, None, &PageRequest::first(10)).await;
        assert_eq!(kind_of(r), ErrorKind::InvalidRequest, "{kind:?}");
    }
    for id in bad_ids {
        assert_eq!(get_doc(s, "x", id).await, None, "{id:?} cannot exist");
        assert!(!s.delete_document("x", id).await.expect("delete"), "{id:?} cannot exist");
    }
    assert_eq!(feed(s).await, before, "refused writes append no change");
    let listed = s.list_documents("x", None, &PageRequest::first(10)).await.expect("list");
    assert_eq!(listed.items.len(), 1, "nothing invalid was written");
}

/// Concurrent `Revision` writes of one document: exactly one wins each round. Of two concurrent inserts of
/// one id, exactly one succeeds; concurrent `Any` writes both land, one after the other.
/// Writes abandoned at every await point (a store-call deadline, a client that hangs up) leave no pooled
/// connection inside a transaction: every write after them succeeds. Several writers contend, so some are
/// cancelled while queued for the write lock, some between `BEGIN` and `COMMIT`, some during the commit.
pub async fn cancelled_writes_leave_no_transaction_behind(s: &dyn Store) {
    const KIND: &str = "test.cancel";
    let mut cancelled = 0_u32;
    for round in 0..60_u64 {
        // From "before the first poll" up to a few milliseconds: commits fsync, so later deadlines land
        // inside the transaction and inside the commit.
        let deadline = Duration::from_micros(round * round * 2);
        let write = |w: u32| async move {
            let d = doc(KIND, &format!("d{w}"), "acme", json!({"round": round}));
            tokio::time::timeout(deadline, s.put_document(&d, Precondition::Any)).await
        };
        let (a, b, c, d) = tokio::join!(write(0), write(1), write(2), write(3));
        for r in [a, b, c, d] {
            match r {
                Ok(written) => {
                    written.expect("an uncancelled write succeeds");
                }
                Err(_) => cancelled += 1,
            }
        }
    }
    assert!(cancelled > 0, "the deadlines cancel some writes");
    // Cancelled transactions are rolled back in the background; then no connection may still be in one.
    for i in 0..40 {
        let d = doc(KIND, &format!("after{i}"), "acme", json!(i));
        put(s, &d, Precondition::Absent).await.expect("inserted");
        let d = doc(KIND, &format!("d{}", i % 4), "acme", json!(i));
        put(s, &d, Precondition::Any).await.expect("written");
    }
}

pub async fn concurrent_document_writes_one_wins(s: &dyn Store) {
    const KIND: &str = "xks.keystore";
    let base = feed(s).await.len();
    let mut current = put(s, &doc(KIND, "hot", "acme", json!(0)), Precondition::Absent).await.expect("inserted");
    for round in 0..10 {
        let a = Document { body: json!({"writer": "a", "round": round}), ..current.clone() };
        let b = Document { body: json!({"writer": "b", "round": round}), ..current.clone() };
        let at = Precondition::Revision(current.revision);
        let (ra, rb) = tokio::join!(s.put_document(&a, at), s.put_document(&b, at));
        let winner = match (ra.expect("put a"), rb.expect("put b")) {
            (Some(w), None) | (None, Some(w)) => w,
            other => panic!("exactly one concurrent Revision write must win, got {other:?}"),
        };
        assert_eq!(winner.revision, current.revision + 1);
        assert_eq!(get_doc(s, KIND, "hot").await, Some(winner.clone()));
        current = winner;
    }

    let (x, y) = (doc(KIND, "race", "acme", json!("x")), doc(KIND, "race", "other", json!("y")));
    let (rx, ry) = tokio::join!(s.put_document(&x, Precondition::Absent), s.put_document(&y, Precondition::Absent));
    let winner = match (rx, ry) {
        (Ok(Some(w)), Err(e)) | (Err(e), Ok(Some(w))) => {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists);
            w
        }
        other => panic!("exactly one concurrent insert wins: {other:?}"),
    };
    assert_eq!(get_doc(s, KIND, "race").await, Some(winner.clone()));

    // Same tenant as the winner: a move would announce two tenants.
    let x = Document { body: json!("any-x"), ..winner.clone() };
    let y = Document { body: json!("any-y"), ..winner };
    let (rx, ry) = tokio::join!(s.put_document(&x, Precondition::Any), s.put_document(&y, Precondition::Any));
    let (rx, ry) = (rx.expect("put x").expect("written"), ry.expect("put y").expect("written"));
    let mut revisions = [rx.revision, ry.revision];
    revisions.sort_unstable();
    assert_eq!(revisions, [2, 3], "both writes land, one after the other");
    let last = if rx.revision == 3 { rx } else { ry };
    assert_eq!(get_doc(s, KIND, "race").await, Some(last));
    assert_eq!(feed(s).await.len() - base, 1 + 10 + 1 + 2, "one change per successful write");
}

/// `heartbeat` upserts a replica's info and time (without touching the change feed); `live_replicas`
/// returns those seen at or after `since`, ordered by id.
pub async fn heartbeats(s: &dyn Store) {
    assert!(s.live_replicas(Timestamp(i64::MIN)).await.expect("live").is_empty());
    let start = Timestamp::now();
    let b_info = json!({"version": "1.2.3", "addr": "10.0.0.2:8443", "tags": ["✓"]});
    s.heartbeat("replica-b", &b_info).await.expect("heartbeat b");
    s.heartbeat("replica-a", &json!({"version": "1.2.3"})).await.expect("heartbeat a");
    let live = s.live_replicas(start).await.expect("live");
    assert_eq!(live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["replica-a", "replica-b"]);
    assert_eq!((live[0].info.clone(), live[1].info.clone()), (json!({"version": "1.2.3"}), b_info));
    let now = Timestamp::now();
    assert!(live.iter().all(|r| start <= r.last_seen && r.last_seen <= now), "last_seen is the store's clock");
    let a_seen = live[0].last_seen;

    // Upsert: the newest info and time replace the old ones; still one row per replica.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mid = Timestamp::now();
    s.heartbeat("replica-b", &json!({"version": "1.3.0"})).await.expect("heartbeat b again");
    let recent = s.live_replicas(mid).await.expect("live");
    assert_eq!(recent.len(), 1, "replica-a was last seen before {mid:?}: {recent:?}");
    assert_eq!((recent[0].id.as_str(), recent[0].info.clone()), ("replica-b", json!({"version": "1.3.0"})));
    assert!(recent[0].last_seen >= mid);
    let all = s.live_replicas(start).await.expect("live");
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].last_seen, all[1].clone()), (a_seen, recent[0].clone()));

    // `since` is inclusive.
    let exact = s.live_replicas(a_seen).await.expect("live");
    assert_eq!(exact.first().map(|r| r.id.as_str()), Some("replica-a"));
    assert!(s.live_replicas(Timestamp(recent[0].last_seen.0 + 1)).await.expect("live").is_empty());

    // Heartbeats are frequent: they never reach the change feed.
    assert_eq!(s.latest_change().await.expect("latest"), 0);
    assert!(s.changes_since(0, 100).await.expect("changes").is_empty());

    // Replica ids follow the document id rules.
    let too_long = "r".repeat(257);
    for bad in ["", "a\nb", "é", "nul\0", too_long.as_str()] {
        assert_eq!(kind_of(s.heartbeat(bad, &json!({})).await), ErrorKind::InvalidRequest, "{bad:?}");
    }
    s.heartbeat(&"r".repeat(256), &json!(null)).await.expect("the longest id");
    assert_eq!(s.live_replicas(start).await.expect("live").len(), 3);
}

/// Two handles (two pools, as two processes or replicas) on the same empty database see each other's writes
/// at once, and their concurrent writes are serialized: one wins each race, nothing is lost.
pub async fn concurrent_handles(a: &dyn Store, b: &dyn Store) {
    let t = tenant("acme");
    let created = create(a, "acme", "shared", &["alias/shared"]).await;
    assert_eq!(b.get_key(&t, &created.id).await.expect("get via b"), Some(created.clone()));
    assert!(b.get_alias(&t, &alias("alias/shared")).await.expect("get_alias via b").is_some());

    let mut current = created;
    for round in 0..10 {
        let mut x = current.clone();
        x.description = format!("a{round}");
        let mut y = current.clone();
        y.description = format!("b{round}");
        let (rx, ry) = tokio::join!(a.update_key(&x), b.update_key(&y));
        current = match (rx.expect("update a"), ry.expect("update b")) {
            (Some(w), None) | (None, Some(w)) => w,
            other => panic!("exactly one of two handles' updates must win, got {other:?}"),
        };
        assert_eq!(a.get_key(&t, &current.id).await.expect("get"), Some(current.clone()));
    }

    // Read-then-write transactions (alias exists? key exists? then write) from both handles at once: both
    // succeed, one after the other, rather than one failing on a lock it could have waited for.
    create(a, "acme", "other", &[]).await;
    let name = alias("alias/shared");
    let (k1, k2) = (key_id("shared"), key_id("other"));
    for _ in 0..20 {
        let (rx, ry) = tokio::join!(a.update_alias(&t, &name, &k1), b.update_alias(&t, &name, &k2));
        let (x, y) = (rx.expect("update_alias via a"), ry.expect("update_alias via b"));
        let now = a.get_alias(&t, &name).await.expect("get_alias").expect("exists");
        assert!(now == x || now == y, "the alias is one of the two writes");
    }

    // Interleaved creates from both handles: every acknowledged one is there, announced in feed order.
    let before = a.latest_change().await.expect("latest");
    let keys_a = (0..20).map(|i| sample_key("acme", &format!("a-{i:02}"))).collect();
    let keys_b = (0..20).map(|i| sample_key("acme", &format!("b-{i:02}"))).collect();
    tokio::join!(create_all(a, keys_a), create_all(b, keys_b));
    assert_eq!(b.count_keys(&t).await.expect("count"), 42);
    let changes = b.changes_since(before, 1000).await.expect("changes");
    assert_eq!(changes.len(), 40);
    assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(a.latest_change().await.expect("latest"), b.latest_change().await.expect("latest"));
}

// ---- secrets ---------------------------------------------------------------------------------------------

pub fn secret_path(s: &str) -> SecretPath {
    SecretPath::parse(s).expect("test secret path")
}

/// Sealed data for `version`, distinguishable by `marker`: every byte value in the ciphertext, a UUID key version.
pub fn sealed_version(version: u32, marker: u8) -> SealedSecretVersion {
    SealedSecretVersion {
        format: 1,
        version,
        key_id: key_id("internal-secrets-key"),
        key_version: Uuid::new_v4(),
        wrapped_key: vec![marker; 60],
        iv: vec![marker; 12],
        ciphertext: (0..=255u8).chain([marker]).collect(),
        created_at: Timestamp(1_700_000_000_000 + i64::from(version)),
    }
}

/// A secret record with its first version, exercising every field: non-ASCII and quoted metadata, an expiry,
/// a custom version id and stage.
pub fn sample_secret(tenant_id: &str, path: &str) -> Secret {
    let mut s = Secret::new(tenant(tenant_id), secret_path(path), Timestamp(1_700_000_000_000));
    s.secret_type = "json".to_owned();
    s.metadata = json!({
        "description": "mot de passe ✓ \"quoted\" \\ '; DROP TABLE secrets; --",
        "tags": ["prod", "db"],
        "owner": "team-platform",
        "custom": {"nested": [1, 2.5, null, true]}
    });
    s.max_versions = 3;
    s.expires_at = Some(Timestamp(1_900_000_000_000));
    s.add_version(Some("v1"), &["current".to_owned(), "blue".to_owned()], Timestamp(1_700_000_000_001), "alice")
        .expect("first version");
    s
}

async fn create_secret(s: &dyn Store, t: &str, path: &str) -> Secret {
    s.create_secret(&sample_secret(t, path), &sealed_version(1, 1)).await.expect("create_secret")
}

/// Appends a version to `current` (the stored record) and writes it; returns the stored record.
async fn put_next(s: &dyn Store, current: &Secret, marker: u8) -> Secret {
    let mut next = current.clone();
    let v = next.add_version(None, &["current".to_owned()], Timestamp::now(), "bob").expect("add_version");
    let prune = next.prune();
    s.put_secret_version(&next, &sealed_version(v, marker), &prune).await.expect("put").expect("revision matched")
}

async fn soft_delete(s: &dyn Store, current: &Secret, until: Timestamp) -> Secret {
    let mut deleted = current.clone();
    deleted.deleted_at = Some(Timestamp(until.0 - 1000));
    deleted.recoverable_until = Some(until);
    s.update_secret(&deleted, &[]).await.expect("update").expect("revision matched")
}

async fn version_rows(s: &dyn Store, t: &str, path: &str, upto: u32) -> Vec<u32> {
    let mut present = Vec::new();
    for v in 0..=upto {
        if s.get_secret_version(&tenant(t), &secret_path(path), v).await.expect("get_secret_version").is_some() {
            present.push(v);
        }
    }
    present
}

fn paths(secrets: &[Secret]) -> Vec<String> {
    secrets.iter().map(|s| s.path.to_string()).collect()
}

/// `create_secret` stores the record and its first version; reads are per tenant; a duplicate path, even
/// soft-deleted, is `AlreadyExists` and writes nothing.
pub async fn secrets_create_and_get(s: &dyn Store) {
    let (t, p) = (tenant("acme"), secret_path("app/db/password"));
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), None);
    assert_eq!(s.get_secret_version(&t, &p, 1).await.expect("get version"), None);
    assert_eq!(s.count_secrets(&t).await.expect("count"), 0);
    assert!(s.secrets_due_for_purge(Timestamp(i64::MAX), 10).await.expect("due").is_empty());

    let input = sample_secret("acme", "app/db/password");
    let first = sealed_version(1, 7);
    let stored = s.create_secret(&input, &first).await.expect("create_secret");
    assert_eq!(stored.revision, 1, "the store starts revisions at 1");
    assert_eq!(Secret { revision: input.revision, ..stored.clone() }, input, "only the revision differs");
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(stored.clone()));
    assert_eq!(s.get_secret_version(&t, &p, 1).await.expect("get version"), Some(first.clone()));
    assert_eq!(s.get_secret_version(&t, &p, 2).await.expect("get version"), None);
    assert_eq!(s.get_secret(&tenant("other"), &p).await.expect("get"), None, "secrets are per tenant");
    assert_eq!(s.get_secret_version(&tenant("other"), &p, 1).await.expect("get version"), None);
    assert_eq!(s.count_secrets(&t).await.expect("count"), 1);

    let before = feed(s).await;
    let mut again = sample_secret("acme", "app/db/password");
    again.secret_type = "kv".to_owned();
    let r = s.create_secret(&again, &sealed_version(1, 9)).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(stored.clone()), "the first secret is untouched");
    assert_eq!(s.get_secret_version(&t, &p, 1).await.expect("get version"), Some(first.clone()));
    assert_eq!(feed(s).await, before, "a failed create appends no change");

    // Soft-deleted, the path is still taken.
    let deleted = soft_delete(s, &stored, Timestamp(1_800_000_000_000)).await;
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(deleted.clone()), "soft-deleted records are read");
    assert_eq!(s.count_secrets(&t).await.expect("count"), 0, "soft-deleted secrets do not count");
    let r = s.create_secret(&sample_secret("acme", "app/db/password"), &sealed_version(1, 9)).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    assert_eq!(s.get_secret_version(&t, &p, 1).await.expect("get version"), Some(first));

    // The same path in another tenant is another secret.
    let other = create_secret(s, "other", "app/db/password").await;
    assert_eq!(s.get_secret(&tenant("other"), &p).await.expect("get"), Some(other));
    assert_eq!(s.count_secrets(&tenant("other")).await.expect("count"), 1);
    assert_eq!(s.count_secrets(&t).await.expect("count"), 0);
}

/// `put_secret_version` writes the record, the new version and the pruning in one step, only at the expected
/// revision; a lost race, a gone secret or a duplicate version number writes nothing.
pub async fn secret_versions_are_optimistic_and_pruned(s: &dyn Store) {
    let (t, p) = (tenant("acme"), secret_path("app/key"));
    let mut current = create_secret(s, "acme", "app/key").await;
    for marker in 2..=5u8 {
        let next = put_next(s, &current, marker).await;
        assert_eq!(next.revision, current.revision + 1);
        assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(next.clone()));
        current = next;
    }
    // max_versions = 3, and version 1 holds the custom stage `blue`: it stays, 2 and 3 were pruned.
    assert_eq!(current.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 4, 5]);
    assert_eq!(version_rows(s, "acme", "app/key", 6).await, vec![1, 4, 5], "pruned data is deleted");
    let v5 = s.get_secret_version(&t, &p, 5).await.expect("get").expect("version 5");
    assert_eq!((v5.version, v5.iv.clone()), (5, vec![5; 12]));

    // A writer still holding the previous revision lost the race: neither the version nor the pruning lands.
    let mut stale = current.clone();
    stale.revision -= 1;
    let v = stale.add_version(None, &[], Timestamp::now(), "eve").expect("add");
    assert_eq!(s.put_secret_version(&stale, &sealed_version(v, 66), &[4]).await.expect("put"), None);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(current.clone()));
    assert_eq!(version_rows(s, "acme", "app/key", 7).await, vec![1, 4, 5]);

    // A version number that already has data: nothing is written, not even the record.
    let mut dup = current.clone();
    dup.metadata = json!({"changed": true});
    let r = s.put_secret_version(&dup, &sealed_version(5, 77), &[]).await;
    assert_eq!(kind_of(r), ErrorKind::AlreadyExists);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(current.clone()));
    assert_eq!(s.get_secret_version(&t, &p, 5).await.expect("get"), Some(v5));

    // A secret that does not exist (or in another tenant) is `None`, not an error.
    let mut ghost = sample_secret("acme", "ghost");
    ghost.revision = 1;
    assert_eq!(s.put_secret_version(&ghost, &sealed_version(2, 1), &[]).await.expect("put"), None);
    assert_eq!(s.get_secret_version(&t, &secret_path("ghost"), 2).await.expect("get"), None);
    let mut elsewhere = current.clone();
    elsewhere.tenant = tenant("other");
    assert_eq!(s.put_secret_version(&elsewhere, &sealed_version(6, 1), &[]).await.expect("put"), None);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(current));
}

/// `update_secret` replaces the record (and prunes) only at the expected revision; soft deletion and
/// restore go through it.
pub async fn update_secret_is_optimistic(s: &dyn Store) {
    let (t, p) = (tenant("acme"), secret_path("svc/token"));
    let mut current = create_secret(s, "acme", "svc/token").await;
    current = put_next(s, &current, 2).await;
    current = put_next(s, &current, 3).await;

    let mut patch = current.clone();
    patch.metadata = json!({"description": "rotated ✓"});
    patch.max_versions = 1;
    patch.expires_at = None;
    let prune = patch.prune();
    assert_eq!(prune, vec![2], "1 is pinned by `blue`, 3 by `current`");
    let updated = s.update_secret(&patch, &prune).await.expect("update").expect("matched");
    assert_eq!(updated.revision, current.revision + 1);
    assert_eq!(Secret { revision: current.revision, ..updated.clone() }, patch);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(updated.clone()));
    assert_eq!(version_rows(s, "acme", "svc/token", 4).await, vec![1, 3]);

    // Stale and future revisions do not match.
    assert_eq!(s.update_secret(&current, &[1]).await.expect("update"), None);
    let mut future = updated.clone();
    future.revision += 5;
    assert_eq!(s.update_secret(&future, &[]).await.expect("update"), None);
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(updated.clone()));
    assert_eq!(version_rows(s, "acme", "svc/token", 4).await, vec![1, 3], "a lost race prunes nothing");

    // Soft delete and restore are updates too; the columns queries use follow the record.
    let deleted = soft_delete(s, &updated, Timestamp(1_800_000_000_000)).await;
    assert_eq!(s.count_secrets(&t).await.expect("count"), 0);
    let only = SecretFilter { prefix: None, deleted: DeletedFilter::Only };
    assert_eq!(paths(&s.list_secrets(&t, &only, &PageRequest::first(10)).await.expect("list").items), ["svc/token"]);
    let mut restored = deleted.clone();
    restored.deleted_at = None;
    restored.recoverable_until = None;
    let restored = s.update_secret(&restored, &[]).await.expect("update").expect("matched");
    assert_eq!(s.count_secrets(&t).await.expect("count"), 1);
    assert!(s.list_secrets(&t, &only, &PageRequest::first(10)).await.expect("list").items.is_empty());
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(restored));

    let mut ghost = sample_secret("acme", "ghost");
    ghost.revision = 1;
    assert_eq!(s.update_secret(&ghost, &[]).await.expect("update"), None);
}

/// `list_secrets` pages a tenant's records in byte order; a prefix selects segment-wise (`a/b` and `a/b/...`,
/// never `a/bc` or `a/b.x`); the deletion filter selects active, deleted or both.
pub async fn list_secrets_filters_and_pages(s: &dyn Store) {
    let t = tenant("acme");
    let all = [
        "a", "a/b", "a/b/c", "a/b/c/d", "a/b/z", "a/b+x", "a/b-c", "a/b.d", "a/b0", "a/b=", "a/b@x", "a/bc", "A", "b",
        "Z/a", "0",
    ];
    for p in all {
        create_secret(s, "acme", p).await;
    }
    create_secret(s, "other", "a/b/other").await;
    let mut sorted: Vec<String> = all.iter().map(|p| (*p).to_owned()).collect();
    sorted.sort();

    let t = &t;
    let list = |prefix: Option<&str>, deleted: DeletedFilter, after: Option<&str>, limit: u32| {
        let filter = SecretFilter { prefix: prefix.map(secret_path), deleted };
        let page = PageRequest { after: after.map(str::to_owned), limit };
        async move { s.list_secrets(t, &filter, &page).await.expect("list_secrets") }
    };

    let everything = list(None, DeletedFilter::Exclude, None, 100).await;
    assert_eq!(paths(&everything.items), sorted, "byte order, this tenant only");
    assert_eq!(everything.next, None);

    let under = list(Some("a/b"), DeletedFilter::Exclude, None, 100).await;
    assert_eq!(paths(&under.items), ["a/b", "a/b/c", "a/b/c/d", "a/b/z"]);
    assert_eq!(paths(&list(Some("a/b/c"), DeletedFilter::Exclude, None, 100).await.items), ["a/b/c", "a/b/c/d"]);
    assert_eq!(paths(&list(Some("a/bc"), DeletedFilter::Exclude, None, 100).await.items), ["a/bc"]);
    assert!(list(Some("a/b/c/d/e"), DeletedFilter::Exclude, None, 100).await.items.is_empty());
    assert!(list(Some("zz"), DeletedFilter::Exclude, None, 100).await.items.is_empty());

    // Pages of 2 under a/b, then the whole listing page by page.
    let p1 = list(Some("a/b"), DeletedFilter::Exclude, None, 2).await;
    assert_eq!((paths(&p1.items), p1.next.as_deref()), (vec!["a/b".to_owned(), "a/b/c".to_owned()], Some("a/b/c")));
    let p2 = list(Some("a/b"), DeletedFilter::Exclude, p1.next.as_deref(), 2).await;
    assert_eq!((paths(&p2.items), p2.next), (vec!["a/b/c/d".to_owned(), "a/b/z".to_owned()], None));
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = list(None, DeletedFilter::Exclude, after.as_deref(), 3).await;
        assert!(page.items.len() <= 3);
        walked.extend(paths(&page.items));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(walked, sorted);

    // Deletion filter.
    let victim = s.get_secret(t, &secret_path("a/b/c")).await.expect("get").expect("exists");
    soft_delete(s, &victim, Timestamp(1_800_000_000_000)).await;
    assert_eq!(paths(&list(Some("a/b"), DeletedFilter::Exclude, None, 100).await.items), ["a/b", "a/b/c/d", "a/b/z"]);
    assert_eq!(paths(&list(Some("a/b"), DeletedFilter::Only, None, 100).await.items), ["a/b/c"]);
    assert_eq!(
        paths(&list(Some("a/b"), DeletedFilter::Include, None, 100).await.items),
        ["a/b", "a/b/c", "a/b/c/d", "a/b/z"]
    );
    assert_eq!(list(None, DeletedFilter::Include, None, 100).await.items.len(), all.len());
    assert_eq!(list(None, DeletedFilter::Only, None, 100).await.items.len(), 1);
    assert_eq!(s.count_secrets(t).await.expect("count"), u64::try_from(all.len() - 1).expect("small"));
}

/// `delete_secret` removes the record and all its versions only at the expected revision, and frees the path.
pub async fn delete_secret_removes_its_versions(s: &dyn Store) {
    let (t, p) = (tenant("acme"), secret_path("gone/soon"));
    let created = create_secret(s, "acme", "gone/soon").await;
    let current = put_next(s, &created, 2).await;
    let twin = create_secret(s, "other", "gone/soon").await;
    let before = feed(s).await.len();

    assert!(!s.delete_secret(&t, &p, created.revision).await.expect("delete"), "a stale revision keeps it");
    assert!(!s.delete_secret(&t, &p, current.revision + 1).await.expect("delete"));
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(current.clone()));
    assert_eq!(version_rows(s, "acme", "gone/soon", 3).await, vec![1, 2], "a refused delete removes no data");
    assert_eq!(feed(s).await.len(), before, "refused deletes append no change");

    assert!(s.delete_secret(&t, &p, current.revision).await.expect("delete"));
    assert_eq!(s.get_secret(&t, &p).await.expect("get"), None);
    assert!(version_rows(s, "acme", "gone/soon", 3).await.is_empty(), "every version's data is gone");
    assert!(!s.delete_secret(&t, &p, current.revision).await.expect("delete"), "already gone");
    assert_eq!(s.get_secret(&tenant("other"), &p).await.expect("get"), Some(twin), "only this tenant's");
    assert_eq!(version_rows(s, "other", "gone/soon", 3).await, vec![1]);

    // The path is free again, and the new secret starts afresh.
    let again = create_secret(s, "acme", "gone/soon").await;
    assert_eq!(again.revision, 1);
    assert_eq!(version_rows(s, "acme", "gone/soon", 3).await, vec![1]);
}

/// `secrets_due_for_purge` returns soft-deleted secrets of every tenant whose retention ended, oldest first.
pub async fn secrets_due_for_purge_across_tenants(s: &dyn Store) {
    let mut due = Vec::new();
    for (t, p, until) in [("acme", "x/1", 300), ("other", "x/2", 100), ("acme", "x/3", 200), ("acme", "x/4", 900)] {
        let created = create_secret(s, t, p).await;
        due.push(soft_delete(s, &created, Timestamp(until)).await);
    }
    let mut active = create_secret(s, "acme", "x/active").await;
    // An active record whose (stale) recoverable_until is in the past is never due.
    active.recoverable_until = Some(Timestamp(50));
    s.update_secret(&active, &[]).await.expect("update").expect("matched");

    let found = s.secrets_due_for_purge(Timestamp(300), 10).await.expect("due");
    assert_eq!(paths(&found), ["x/2", "x/3", "x/1"], "ordered by recoverable_until, `now` inclusive");
    assert_eq!(found[0], due[1], "whole records, with their revision");
    assert_eq!(paths(&s.secrets_due_for_purge(Timestamp(300), 2).await.expect("due")), ["x/2", "x/3"]);
    assert!(s.secrets_due_for_purge(Timestamp(99), 10).await.expect("due").is_empty());
    assert!(s.secrets_due_for_purge(Timestamp(300), 0).await.expect("due").is_empty());
    assert_eq!(s.secrets_due_for_purge(Timestamp(i64::MAX), 10).await.expect("due").len(), 4);
}

/// Concurrent writers: of two version writes (or updates) at the same revision exactly one lands with its
/// data; of two creates of one path exactly one succeeds.
pub async fn concurrent_secret_writes_one_wins(s: &dyn Store) {
    let (t, p) = (tenant("acme"), secret_path("hot/secret"));
    let mut current = create_secret(s, "acme", "hot/secret").await;
    for round in 0..10u8 {
        let (mut a, mut b) = (current.clone(), current.clone());
        let va = a.add_version(None, &["current".to_owned()], Timestamp::now(), "a").expect("add");
        let vb = b.add_version(None, &["current".to_owned()], Timestamp::now(), "b").expect("add");
        assert_eq!(va, vb, "both writers computed the same next version");
        let (pa, pb) = (a.prune(), b.prune());
        let (sa, sb) = (sealed_version(va, 100 + round), sealed_version(vb, 200 + round));
        let (ra, rb) = tokio::join!(s.put_secret_version(&a, &sa, &pa), s.put_secret_version(&b, &sb, &pb));
        let (winner, data) = match (ra.expect("put a"), rb.expect("put b")) {
            (Some(w), None) => (w, sa),
            (None, Some(w)) => (w, sb),
            other => panic!("exactly one concurrent version write must win, got {other:?}"),
        };
        assert_eq!(winner.revision, current.revision + 1);
        assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(winner.clone()));
        assert_eq!(s.get_secret_version(&t, &p, va).await.expect("get"), Some(data), "the winner's data");
        current = winner;
    }
    assert_eq!(current.latest_version, 11);

    let (mut a, mut b) = (current.clone(), current.clone());
    a.metadata = json!({"by": "a"});
    b.metadata = json!({"by": "b"});
    let (ra, rb) = tokio::join!(s.update_secret(&a, &[]), s.update_secret(&b, &[]));
    match (ra.expect("update a"), rb.expect("update b")) {
        (Some(w), None) | (None, Some(w)) => assert_eq!(s.get_secret(&t, &p).await.expect("get"), Some(w)),
        other => panic!("exactly one concurrent update must win, got {other:?}"),
    }

    let (x, y) = (sample_secret("acme", "race"), sample_secret("acme", "race"));
    let (sx, sy) = (sealed_version(1, 1), sealed_version(1, 2));
    let (rx, ry) = tokio::join!(s.create_secret(&x, &sx), s.create_secret(&y, &sy));
    let data = match (rx, ry) {
        (Ok(_), Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists);
            sx
        }
        (Err(e), Ok(_)) => {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists);
            sy
        }
        other => panic!("exactly one concurrent create_secret wins: {other:?}"),
    };
    assert_eq!(s.get_secret_version(&t, &secret_path("race"), 1).await.expect("get"), Some(data));
    assert_eq!(s.count_secrets(&t).await.expect("count"), 2);
}

/// Every successful secret mutation appends one `Secret` change (id = path) for the secret's tenant; refused
/// ones append none.
pub async fn secret_mutations_append_changes(s: &dyn Store) {
    let t = tenant("acme");
    let p = "feed/s";
    let created = create_secret(s, "acme", p).await;
    let next = put_next(s, &created, 2).await;
    let mut patch = next.clone();
    patch.metadata = json!({});
    let patched = s.update_secret(&patch, &[]).await.expect("update").expect("matched");
    // Refused: duplicate create, stale put, stale update, stale delete.
    assert!(s.create_secret(&sample_secret("acme", p), &sealed_version(1, 1)).await.is_err());
    let mut stale = created.clone();
    stale.add_version(None, &[], Timestamp::now(), "x").expect("add");
    assert_eq!(s.put_secret_version(&stale, &sealed_version(3, 3), &[]).await.expect("put"), None);
    assert_eq!(s.update_secret(&created, &[]).await.expect("update"), None);
    assert!(!s.delete_secret(&t, &secret_path(p), created.revision).await.expect("delete"));
    assert!(s.delete_secret(&t, &secret_path(p), patched.revision).await.expect("delete"));
    create_secret(s, "other", p).await;
    assert_eq!(
        feed(s).await,
        vec![
            change("acme", ChangeKind::Secret, p),
            change("acme", ChangeKind::Secret, p),
            change("acme", ChangeKind::Secret, p),
            change("acme", ChangeKind::Secret, p),
            change("other", ChangeKind::Secret, p),
        ]
    );
}

// ---- copying an installation (`SqlStore::copy_into`) ------------------------------------------------------

/// Fills a store with one of everything `copy_into` carries over.
pub async fn populate_for_copy(s: &dyn Store) {
    let t = tenant("copy-t");
    s.ensure_tenant(&Tenant { id: t.clone(), display_name: "Copy ✓".into(), created_at: Timestamp(7) })
        .await
        .expect("tenant");
    let mut doomed = sample_key("copy-t", "k2");
    doomed.state = KeyState::PendingDeletion;
    doomed.deletion_at = Some(Timestamp(1_800_000_000_000));
    s.create_key(&sample_key("copy-t", "k1"), &[alias("alias/one")]).await.expect("key");
    s.create_key(&doomed, &[]).await.expect("key");
    let doc = Document::new("copy.kind", "d1", t.clone(), json!({"sealed": "AAEC", "n": 1}));
    s.put_document(&doc, Precondition::Absent).await.expect("document");
    let secret = sample_secret("copy-t", "apps/db/password");
    s.create_secret(&secret, &sealed_version(1, 7)).await.expect("secret");
}

/// Everything `populate_for_copy` wrote to `src`, read back through the trait from `s`, the destination.
pub async fn check_copied(src: &dyn Store, s: &dyn Store) {
    let t = tenant("copy-t");
    assert_eq!(s.get_tenant(&t).await.expect("tenant").expect("copied").display_name, "Copy ✓");
    let k1 = s.get_key(&t, &key_id("k1")).await.expect("get").expect("k1 copied");
    assert_eq!(Some(&k1), src.get_key(&t, &key_id("k1")).await.expect("get").as_ref(), "identical, revision included");
    let k2 = s.get_key(&t, &key_id("k2")).await.expect("get").expect("k2 copied");
    assert_eq!((k2.state, k2.deletion_at), (KeyState::PendingDeletion, Some(Timestamp(1_800_000_000_000))));
    let a = s.get_alias(&t, &alias("alias/one")).await.expect("alias").expect("alias copied");
    assert_eq!(a.key_id, key_id("k1"));
    let d = s.get_document("copy.kind", "d1").await.expect("doc").expect("document copied");
    assert_eq!((d.body["sealed"].as_str(), d.revision), (Some("AAEC"), 1));
    let path = secret_path("apps/db/password");
    let secret = s.get_secret(&t, &path).await.expect("secret").expect("secret copied");
    assert_eq!(secret.metadata["owner"], "team-platform");
    let v = s.get_secret_version(&t, &path, 1).await.expect("version").expect("version copied");
    assert_eq!(v.ciphertext, sealed_version(1, 7).ciphertext);
    // The copy is a working store: writes continue from the copied revisions.
    let mut k1b = k1.clone();
    k1b.description = "changed after the copy".into();
    assert!(s.update_key(&k1b).await.expect("update").is_some());
}

// ---- the audit log table (`SqlStore::audit_append`) -------------------------------------------------------

const AUDIT_GENESIS: &str = "genesis";

/// A stand-in for the server's sealing: the store only stores what it is given, so any deterministic hash
/// shows that each record was sealed against the head the append read.
fn toy_seal(seq: u64, prev: &str, body: String) -> (String, String) {
    let record = format!("{seq}|{prev}|{body}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in record.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (record, format!("{h:016x}"))
}

/// Checks that `rows` are one chain from the genesis: seq 1, 2, ... with no gaps or duplicates, each record
/// sealed against the previous row's hash.
fn check_audit_chain(rows: &[crate::AuditRow]) {
    let mut prev = AUDIT_GENESIS.to_owned();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.seq, i as u64 + 1, "no gaps or duplicates");
        let mut parts = row.record.splitn(3, '|');
        let (seq, p, body) =
            (parts.next().expect("seq"), parts.next().expect("prev"), parts.next().expect("body").to_owned());
        assert_eq!(seq, row.seq.to_string());
        assert_eq!(p, prev, "record {} chains to the previous head", row.seq);
        assert_eq!(toy_seal(row.seq, p, body), (row.record.clone(), row.hash.clone()));
        prev = row.hash.clone();
    }
}

/// Two handles (two processes or replicas) on one empty database appending audit batches at the same time
/// build one chain: every append reads the head and inserts after it under the store's writer lock, so no
/// record is lost, duplicated or forked, and each batch stays contiguous.
pub async fn audit_log_one_chain_from_two_handles(a: &SqlStore, b: &SqlStore) {
    assert!(a.audit_rows(0, 10).await.expect("rows").is_empty());
    async fn appends(s: &SqlStore, who: &str) {
        for i in 0..15 {
            let batch = vec![format!("{who}-{i}-a"), format!("{who}-{i}-b")];
            s.audit_append(AUDIT_GENESIS, batch, toy_seal).await.expect("append");
        }
    }
    tokio::join!(appends(a, "a"), appends(b, "b"), appends(a, "c"), appends(b, "d"));
    let rows = b.audit_rows(0, 1000).await.expect("rows");
    assert_eq!(rows.len(), 120);
    check_audit_chain(&rows);
    for pair in rows.chunks(2) {
        let first = pair[0].record.rsplit('|').next().expect("body");
        let second = pair[1].record.rsplit('|').next().expect("body");
        assert_eq!(
            first.strip_suffix("-a").map(|s| format!("{s}-b")).as_deref(),
            Some(second),
            "a batch is contiguous"
        );
    }
    // Paging, and an empty append changes nothing.
    let tail = a.audit_rows(118, 10).await.expect("page");
    assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![119, 120]);
    assert_eq!(a.audit_append(AUDIT_GENESIS, Vec::<String>::new(), toy_seal).await.expect("empty append"), 120);
    assert_eq!(a.audit_append(AUDIT_GENESIS, vec!["last".to_owned()], toy_seal).await.expect("append"), 121);
    check_audit_chain(&b.audit_rows(0, 1000).await.expect("rows"));
}

/// Writes a short audit chain into `s` (before `copy_into`).
pub async fn populate_audit_log(s: &SqlStore) {
    s.audit_append(AUDIT_GENESIS, vec!["one".to_owned(), "two".to_owned()], toy_seal).await.expect("append");
}

/// The chain `populate_audit_log` wrote arrived intact, and appends in the destination continue it.
pub async fn check_audit_log_copied(src: &SqlStore, dst: &SqlStore) {
    let copied = dst.audit_rows(0, 100).await.expect("rows");
    assert_eq!(copied, src.audit_rows(0, 100).await.expect("rows"));
    assert_eq!(copied.len(), 2);
    assert_eq!(dst.audit_append(AUDIT_GENESIS, vec!["three".to_owned()], toy_seal).await.expect("append"), 3);
    check_audit_chain(&dst.audit_rows(0, 100).await.expect("rows"));
}
