//! Authentication of gRPC calls: a chain of authenticators, each turning one kind of credential into a
//! [`Principal`] (tenant, identity). This crate provides the mTLS authenticator (client certificate subject
//! mapped to an identity by a `grpc.client` document in the store); the server adds one for the secrets API's
//! bearer tokens. A principal may carry a [`Guard`]: the per-call permission check of its kind of credential
//! (a token's scopes and policies), asked with the call's [`Action`] before any work.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use kmsgate_core::{Caller, Dispatcher, Document, Error, ErrorKind, PageRequest, Precondition, Result, TenantId};
use serde::{Deserialize, Serialize};

/// The document kind of a client-certificate mapping; the document id is the lower-cased subject.
pub const CLIENT_KIND: &str = "grpc.client";

/// The names the verified client certificate of the connection claims (SAN dNSNames first, then subject
/// CNs). The listener inserts it into each request's extensions; absent on connections without one.
#[derive(Debug, Clone, Default)]
pub struct TlsClientNames(pub Arc<Vec<String>>);

/// Who an authenticated call acts as.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: TenantId,
    pub identity: String,
    /// How the caller authenticated, for audit (e.g. `client_subject`, `token_id`); never a secret.
    pub metadata: BTreeMap<String, String>,
    /// The credential's own permission check; `None`: the dispatcher's authorizer alone decides (mTLS).
    pub guard: Option<Arc<dyn Guard>>,
}

/// What a call is about to do, for a [`Guard`]. Every request message names its action (see
/// `crate::call::Guarded`), so an RPC cannot be added without deciding what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// A `KeyManagementService` RPC (cryptography, key and alias management), by RPC name.
    Key(&'static str),
    /// A secret RPC on one path: `permission` is the secrets API's (`read`, `write`, `delete`, `list`).
    Secret { permission: &'static str, path: &'a str },
    /// `ListSecrets`: the listing itself; each listed path is then checked as `Secret { permission: "list" }`.
    ListSecrets,
    /// The audited health probe: any authenticated caller.
    Health,
}

/// A credential's permission check.
#[async_trait]
pub trait Guard: Send + Sync + fmt::Debug {
    /// `Err(AccessDenied)` when the principal may not perform `action`.
    async fn check(&self, action: Action<'_>) -> Result<()>;
}

/// What an authenticator may look at: the call's metadata (headers) and its extensions (connection facts).
#[derive(Clone, Copy)]
pub struct CallContext<'a> {
    pub metadata: &'a tonic::metadata::MetadataMap,
    pub extensions: &'a tonic::Extensions,
}

impl fmt::Debug for CallContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Metadata can hold credentials (authorization): never print it.
        f.debug_struct("CallContext").finish_non_exhaustive()
    }
}

/// One way of authenticating a call.
#[async_trait]
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// `Ok(None)`: the call carries no credential of this kind (the next authenticator is asked).
    /// `Err(AuthenticationFailed)`: it carries one, and it does not verify (the call is refused; no other
    /// authenticator is asked, so a bad credential never falls through to a weaker one).
    async fn authenticate(&self, call: CallContext<'_>) -> Result<Option<Principal>>;
}

/// Authenticators asked in order; the first that recognises a credential decides.
#[derive(Debug, Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
}

impl AuthChain {
    pub fn new() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn with(mut self, a: Arc<dyn Authenticator>) -> Self {
        self.authenticators.push(a);
        self
    }

    /// The principal of the call, or `AuthenticationFailed` when no authenticator recognises a credential.
    pub async fn authenticate(&self, call: CallContext<'_>) -> Result<Principal> {
        for a in &self.authenticators {
            if let Some(p) = a.authenticate(call).await? {
                return Ok(p);
            }
        }
        Err(Error::new(
            ErrorKind::AuthenticationFailed,
            "no credential: present a bearer token or a client certificate registered with `kmsgate grpc clients add`",
        ))
    }
}

/// The body of a `grpc.client` document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientMapping {
    /// The certificate subject as registered (SAN dNSName or subject CN).
    pub subject: String,
    /// The identity calls with that certificate act as (policies and audit name it).
    pub identity: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_at: String,
}

/// Client certificates mapped to identities through `grpc.client` documents (cached by the dispatcher and
/// invalidated by the change feed, so a removed mapping stops working on every replica within a poll).
#[derive(Debug, Clone)]
pub struct MtlsAuthenticator {
    dispatcher: Dispatcher,
}

impl MtlsAuthenticator {
    pub fn new(dispatcher: Dispatcher) -> Self {
        Self { dispatcher }
    }
}

#[async_trait]
impl Authenticator for MtlsAuthenticator {
    async fn authenticate(&self, call: CallContext<'_>) -> Result<Option<Principal>> {
        let Some(TlsClientNames(names)) = call.extensions.get::<TlsClientNames>() else {
            return Ok(None);
        };
        if names.is_empty() {
            return Ok(None);
        }
        for name in names.iter() {
            let Ok(id) = subject_id(name) else { continue };
            if let Some(doc) = self.dispatcher.document(CLIENT_KIND, &id).await? {
                let mapping: ClientMapping = serde_json::from_value(doc.body.clone()).map_err(|e| {
                    Error::new(ErrorKind::StorageFailure, "a client mapping in the store is unreadable").with_source(e)
                })?;
                let metadata = BTreeMap::from([("client_subject".to_owned(), id)]);
                return Ok(Some(Principal {
                    tenant: doc.tenant.clone(),
                    identity: mapping.identity,
                    metadata,
                    guard: None,
                }));
            }
        }
        tracing::info!(presented = ?names, "gRPC client certificate subject is not registered");
        Err(Error::new(ErrorKind::AuthenticationFailed, "the client certificate's subject is not registered"))
    }
}

/// The document id of a subject: lower-cased, 1-253 printable ASCII characters without spaces.
pub fn subject_id(subject: &str) -> Result<String> {
    let ok = !subject.is_empty() && subject.len() <= 253 && subject.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(Error::invalid("a subject is 1-253 printable ASCII characters without spaces"));
    }
    Ok(subject.to_ascii_lowercase())
}

fn check_identity(identity: &str) -> Result<()> {
    let ok = !identity.is_empty() && identity.len() <= 128 && identity.bytes().all(|b| b.is_ascii_graphic());
    if ok { Ok(()) } else { Err(Error::invalid("an identity is 1-128 printable ASCII characters without spaces")) }
}

/// Registers `subject` as `identity` of the caller's tenant (`AlreadyExists` if the subject is registered).
pub async fn add_client(
    d: &Dispatcher,
    caller: &Caller,
    subject: &str,
    identity: &str,
    description: &str,
) -> Result<ClientMapping> {
    let id = subject_id(subject)?;
    check_identity(identity)?;
    let mapping = ClientMapping {
        subject: id.clone(),
        identity: identity.to_owned(),
        description: description.to_owned(),
        created_at: kmsgate_core::Timestamp::now().to_rfc3339(),
    };
    let body = serde_json::to_value(&mapping).map_err(|e| Error::internal("cannot encode a mapping").with_source(e))?;
    d.put_document(caller, Document::new(CLIENT_KIND, &id, caller.tenant.clone(), body), Precondition::Absent).await?;
    Ok(mapping)
}

/// The mappings of a tenant (all tenants with `None`), with their tenants.
pub async fn list_clients(d: &Dispatcher, tenant: Option<&TenantId>) -> Result<Vec<(TenantId, ClientMapping)>> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(PageRequest::MAX_LIMIT);
    loop {
        let p = d.list_documents(CLIENT_KIND, tenant, &page).await?;
        for doc in p.items {
            let m: ClientMapping = serde_json::from_value(doc.body)
                .map_err(|e| Error::new(ErrorKind::StorageFailure, "unreadable client mapping").with_source(e))?;
            out.push((doc.tenant, m));
        }
        match p.next {
            Some(n) => page.after = Some(n),
            None => return Ok(out),
        }
    }
}

/// Removes a mapping of the caller's tenant; `InvalidRequest` when the tenant has none for that subject.
pub async fn remove_client(d: &Dispatcher, caller: &Caller, subject: &str) -> Result<()> {
    let id = subject_id(subject)?;
    match d.document(CLIENT_KIND, &id).await? {
        Some(doc) if doc.tenant == caller.tenant => {}
        _ => return Err(Error::invalid("no client with that subject is registered in this tenant")),
    }
    d.delete_document(caller, CLIENT_KIND, &id).await?;
    Ok(())
}
