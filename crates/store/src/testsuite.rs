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
//! replicas would have) and is called by hand.

// Test code: a panic is how a case reports a failure.
#![allow(clippy::expect_used)]

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use kmsgate_core::{
    AliasEntry, AliasName, BackendHandle, ChangeKind, ErrorKind, Key, KeyId, KeyOrigin, KeySpec, KeyState, KeyUsage,
    KeyUsageSet, KeyVersion, PageRequest, Result, Store, Tenant, TenantId, Timestamp,
};
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

    assert!(s.delete_key(&t, &key_id("doomed")).await.expect("delete"));
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
    assert!(!s.delete_key(&t, &key_id("doomed")).await.expect("delete"));
    assert!(!s.delete_key(&t, &key_id("never")).await.expect("delete"));
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
    s.update_key(&upd).await.expect("update").expect("matched");
    s.update_key(&upd).await.expect("stale update");
    create(s, "acme", "k2", &[]).await;
    s.create_alias(&t, &alias("alias/b"), &key_id("k")).await.expect("create_alias");
    s.update_alias(&t, &alias("alias/b"), &key_id("k2")).await.expect("update_alias");
    s.update_alias(&t, &alias("alias/b"), &key_id("k")).await.expect("update_alias");
    s.create_alias(&t, &alias("alias/c"), &key_id("k")).await.expect("create_alias");
    s.delete_alias(&t, &alias("alias/c")).await.expect("delete_alias");
    s.delete_alias(&t, &alias("alias/c")).await.expect("delete_alias (absent)");
    s.delete_key(&t, &key_id("k")).await.expect("delete_key");

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
