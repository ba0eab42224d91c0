//! Key store and credential administration, shared by the CLI and tests. Everything goes through the
//! dispatcher (audited document writes; secrets sealed under the tenant's sealing key), so running servers
//! see each change within their change-poll interval.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{
    Caller, Dispatcher, Document, Error, ErrorKind, KeyRef, KeySpec, PageRequest, Precondition, Result, TenantId,
    Timestamp,
};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::keystore::{
    CredentialBody, KIND_CREDENTIAL, KIND_PATH, KIND_STORE, KeyStoreBody, PathBody, Quota, base32, seal_purpose,
    valid_access_key_id, valid_secret, valid_store_name, valid_uri_path,
};
use crate::rules::Rules;

/// Credentials one key store may hold at once: enough for rotation with room to spare, few enough that a
/// leaked admin token cannot mint without bound.
pub const MAX_CREDENTIALS_PER_STORE: usize = 10;

/// What `stores create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewStore {
    pub name: String,
    pub uri_path: String,
    pub all_keys: bool,
    pub keys: Vec<String>,
    pub quota: Option<Quota>,
    pub rules: Rules,
}

/// A key store as listings show it.
#[derive(Debug, Clone, Serialize)]
pub struct StoreInfo {
    pub name: String,
    pub tenant: TenantId,
    pub uri_path: String,
    pub all_keys: bool,
    pub keys: Vec<String>,
    pub quota: Option<Quota>,
    pub rules: usize,
    pub created_at: String,
}

/// A credential as listings show it: never the secret.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialInfo {
    pub access_key_id: String,
    pub store: String,
    pub tenant: TenantId,
    pub created_at: String,
}

/// A freshly minted credential: the only moment the secret is visible.
pub struct NewCredential {
    pub access_key_id: String,
    pub secret: Zeroizing<String>,
    pub store: String,
    pub uri_path: String,
}

impl std::fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCredential")
            .field("access_key_id", &self.access_key_id)
            .field("store", &self.store)
            .field("uri_path", &self.uri_path)
            .finish_non_exhaustive()
    }
}

impl NewCredential {
    /// Exactly the file the AWS KMS console imports (spec §"XKS proxy configuration in AWS KMS console").
    pub fn console_json(&self) -> serde_json::Value {
        serde_json::json!({
            "XksProxyUriPath": self.uri_path,
            "XksProxyAuthenticationCredential": {
                "AccessKeyId": self.access_key_id,
                "RawSecretAccessKey": self.secret.as_str(),
            }
        })
    }
}

fn store_info(doc: &Document) -> Result<StoreInfo> {
    let body: KeyStoreBody = serde_json::from_value(doc.body.clone())
        .map_err(|e| Error::internal("a stored XKS key store is unreadable").with_source(e))?;
    Ok(StoreInfo {
        name: doc.id.clone(),
        tenant: doc.tenant.clone(),
        uri_path: body.uri_path,
        all_keys: body.all_keys,
        keys: body.keys,
        quota: body.quota,
        rules: body.rules.rules.len(),
        created_at: doc.created_at.to_rfc3339(),
    })
}

fn credential_info(doc: &Document) -> Result<CredentialInfo> {
    let body: CredentialBody = serde_json::from_value(doc.body.clone())
        .map_err(|e| Error::internal("a stored XKS credential is unreadable").with_source(e))?;
    Ok(CredentialInfo {
        access_key_id: doc.id.clone(),
        store: body.store,
        tenant: doc.tenant.clone(),
        created_at: body.created_at,
    })
}

async fn all_documents(d: &Dispatcher, kind: &str, tenant: Option<&TenantId>) -> Result<Vec<Document>> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
    loop {
        let p = d.list_documents(kind, tenant, &page).await?;
        out.extend(p.items);
        match p.next {
            Some(next) => page.after = Some(next),
            None => return Ok(out),
        }
    }
}

/// The caller's own key store of that name (another tenant's is "not found").
async fn own_store(d: &Dispatcher, caller: &Caller, name: &str) -> Result<Arc<Document>> {
    match d.document(KIND_STORE, name).await? {
        Some(doc) if doc.tenant == caller.tenant => Ok(doc),
        _ => Err(Error::invalid(format!("no XKS key store named {name} in tenant {}", caller.tenant))),
    }
}

pub async fn create_store(d: &Dispatcher, caller: &Caller, s: NewStore) -> Result<StoreInfo> {
    if !valid_store_name(&s.name) {
        return Err(Error::invalid("a key store name is 1-64 characters of A-Z a-z 0-9 . _ -"));
    }
    if !valid_uri_path(&s.uri_path) {
        return Err(Error::invalid(
            "the URI path must be 10-128 characters of A-Z a-z 0-9 / _ -, start with / and end with /kms/xks/v1",
        ));
    }
    if s.all_keys != s.keys.is_empty() {
        return Err(Error::invalid("name the keys the key store serves, or choose all keys (not both)"));
    }
    s.rules.validate().map_err(Error::invalid)?;
    if let Some(q) = s.quota
        && (q.rps == 0 || q.burst == 0)
    {
        return Err(Error::invalid("a quota needs a positive rate and burst"));
    }
    for k in &s.keys {
        let key_ref = KeyRef::parse(k).map_err(|e| Error::invalid(format!("key {k}: {}", e.message())))?;
        let key = d.describe_key(caller, &key_ref).await.map_err(|e| {
            if e.kind() == ErrorKind::KeyNotFound { Error::invalid(format!("key {k} does not exist")) } else { e }
        })?;
        if key.spec != KeySpec::Aes256 {
            return Err(Error::invalid(format!("key {k} is {}; XKS serves AES_256 keys only", key.spec)));
        }
    }
    let body = KeyStoreBody {
        uri_path: s.uri_path.clone(),
        all_keys: s.all_keys,
        keys: s.keys,
        quota: s.quota,
        rules: s.rules,
    };
    let value = serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode a key store").with_source(e))?;
    let doc = Document::new(KIND_STORE, &s.name, caller.tenant.clone(), value);
    let stored = d.put_document(caller, doc, Precondition::Absent).await.map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            Error::new(ErrorKind::AlreadyExists, format!("an XKS key store named {} already exists", s.name))
        } else {
            e
        }
    })?;
    let stored = stored.ok_or_else(|| Error::internal("the store did not keep the key store"))?;
    let path = serde_json::to_value(PathBody { store: s.name.clone() })
        .map_err(|e| Error::internal("cannot encode a path").with_source(e))?;
    let path_doc = Document::new(KIND_PATH, &s.uri_path, caller.tenant.clone(), path);
    if let Err(e) = d.put_document(caller, path_doc, Precondition::Absent).await {
        // The path belongs to another key store: take back the half-created one.
        let _ = d.delete_document(caller, KIND_STORE, &s.name).await;
        if e.kind() == ErrorKind::AlreadyExists {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("the URI path {} is already used by another key store", s.uri_path),
            ));
        }
        return Err(e);
    }
    store_info(&stored)
}

pub async fn list_stores(d: &Dispatcher, tenant: Option<&TenantId>) -> Result<Vec<StoreInfo>> {
    all_documents(d, KIND_STORE, tenant).await?.iter().map(store_info).collect()
}

/// Deletes a key store, its URI path and all its credentials; returns the access key ids removed.
pub async fn delete_store(d: &Dispatcher, caller: &Caller, name: &str) -> Result<Vec<String>> {
    let doc = own_store(d, caller, name).await?;
    let info = store_info(&doc)?;
    // The path goes first: from then on the key store is unreachable.
    if let Some(p) = d.document(KIND_PATH, &info.uri_path).await?
        && p.body.get("store").and_then(|s| s.as_str()) == Some(name)
    {
        d.delete_document(caller, KIND_PATH, &info.uri_path).await?;
    }
    let mut removed = Vec::new();
    for c in list_credentials(d, Some(&caller.tenant), Some(name)).await? {
        d.delete_document(caller, KIND_CREDENTIAL, &c.access_key_id).await?;
        removed.push(c.access_key_id);
    }
    d.delete_document(caller, KIND_STORE, name).await?;
    Ok(removed)
}

/// Mints a credential for a key store: a random base32 AccessKeyId and a base64 secret of 32 random bytes.
pub async fn create_credential(d: &Dispatcher, caller: &Caller, store: &str) -> Result<NewCredential> {
    let doc = own_store(d, caller, store).await?;
    let info = store_info(&doc)?;
    let existing = list_credentials(d, Some(&caller.tenant), Some(store)).await?;
    if existing.len() >= MAX_CREDENTIALS_PER_STORE {
        return Err(Error::new(
            ErrorKind::QuotaExceeded,
            format!("the key store holds {MAX_CREDENTIALS_PER_STORE} credentials; revoke one first"),
        ));
    }
    // 15 bytes are 24 base32 characters (120 bits): unique without coordination, and unrelated to the secret.
    let access_key_id = base32(&d.random(caller, 15).await?);
    let secret = Zeroizing::new(STANDARD.encode(Zeroizing::new(d.random(caller, 32).await?)));
    if !valid_access_key_id(&access_key_id) || !valid_secret(&secret) {
        return Err(Error::internal("a generated credential does not have the format KMS requires"));
    }
    let sealed = d.seal(caller, &seal_purpose(&access_key_id), secret.as_bytes()).await?;
    let body = CredentialBody {
        store: store.to_owned(),
        sealed_secret: STANDARD.encode(sealed),
        created_at: Timestamp::now().to_rfc3339(),
    };
    let value =
        serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode a credential").with_source(e))?;
    let cred = Document::new(KIND_CREDENTIAL, &access_key_id, caller.tenant.clone(), value);
    d.put_document(caller, cred, Precondition::Absent).await?;
    Ok(NewCredential { access_key_id, secret, store: store.to_owned(), uri_path: info.uri_path })
}

pub async fn list_credentials(
    d: &Dispatcher,
    tenant: Option<&TenantId>,
    store: Option<&str>,
) -> Result<Vec<CredentialInfo>> {
    let mut out = Vec::new();
    for doc in all_documents(d, KIND_CREDENTIAL, tenant).await? {
        let info = credential_info(&doc)?;
        if store.is_none_or(|s| s == info.store) {
            out.push(info);
        }
    }
    Ok(out)
}

/// Removes a credential; servers refuse it once their change feed delivers the deletion.
pub async fn revoke_credential(d: &Dispatcher, caller: &Caller, access_key_id: &str) -> Result<CredentialInfo> {
    let doc = match d.document(KIND_CREDENTIAL, access_key_id).await? {
        Some(doc) if doc.tenant == caller.tenant => doc,
        _ => return Err(Error::invalid(format!("no XKS credential {access_key_id} in tenant {}", caller.tenant))),
    };
    let info = credential_info(&doc)?;
    d.delete_document(caller, KIND_CREDENTIAL, access_key_id).await?;
    Ok(info)
}
