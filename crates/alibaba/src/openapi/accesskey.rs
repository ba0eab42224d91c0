//! AccessKeys of the OpenAPI: an id and a secret (HMAC key of both signature schemes), belonging to a tenant
//! and an identity. Kept as core documents so the CLI and every replica agree; the secret is stored sealed
//! under the tenant's internal sealing key (purpose `alibaba.access_key/<id>`), never in plain.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{
    Caller, Dispatcher, Document, Error, ErrorKind, PageRequest, Precondition, Result, TenantId, Timestamp,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Document kind of an AccessKey; the document id is the AccessKey id.
pub const KIND_ACCESS_KEY: &str = "alibaba.access_key";
/// The vendor's ids start with `LTAI`; ours do too so tools that check the shape accept them.
pub const ID_PREFIX: &str = "LTAI";
const ID_RANDOM_LEN: usize = 20;
const SECRET_LEN: usize = 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessKeyBody {
    pub identity: String,
    /// The sealed secret, base64.
    pub sealed_secret: String,
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
    #[serde(default)]
    pub description: String,
}

/// An AccessKey as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessKeyInfo {
    pub id: String,
    pub tenant: TenantId,
    pub identity: String,
    pub created_at: String,
    pub revoked: bool,
    pub description: String,
}

/// A freshly issued AccessKey; the secret is shown to the operator once.
pub struct NewAccessKey {
    pub id: String,
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for NewAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAccessKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl NewAccessKey {
    /// The vendor console's download: `AccessKey ID,AccessKey Secret` and the pair.
    pub fn csv(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("AccessKey ID,AccessKey Secret\n{},{}\n", self.id, self.secret.as_str()))
    }
}

/// What a request is authenticated against: the tenant, the identity, and the secret (or that the id is
/// revoked).
pub enum Lookup {
    Active { tenant: TenantId, identity: String, secret: Zeroizing<Vec<u8>> },
    Revoked,
    Unknown,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::Active { tenant, identity, .. } => {
                f.debug_struct("Active").field("tenant", tenant).field("identity", identity).finish_non_exhaustive()
            }
            Lookup::Revoked => f.write_str("Revoked"),
            Lookup::Unknown => f.write_str("Unknown"),
        }
    }
}

fn purpose(id: &str) -> String {
    format!("{KIND_ACCESS_KEY}/{id}")
}

fn parse(doc: &Document) -> Result<AccessKeyBody> {
    serde_json::from_value(doc.body.clone())
        .map_err(|e| Error::internal("an AccessKey record is malformed").with_source(e))
}

fn random_alnum(len: usize) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        aws_lc_rs::rand::fill(&mut buf).map_err(|_| Error::internal("no randomness"))?;
        // Rejection sampling keeps the alphabet uniform (248 = 4 * 62).
        for &b in buf.iter().filter(|b| **b < 248) {
            if out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

/// Looks an AccessKey id up and unseals its secret. Ids of other shapes are unknown without a store read.
pub async fn lookup(d: &Dispatcher, id: &str) -> Result<Lookup> {
    if id.len() != ID_PREFIX.len() + ID_RANDOM_LEN
        || !id.starts_with(ID_PREFIX)
        || !id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Ok(Lookup::Unknown);
    }
    let Some(doc) = d.document(KIND_ACCESS_KEY, id).await? else { return Ok(Lookup::Unknown) };
    let body = parse(&doc)?;
    if body.revoked_at.is_some() {
        return Ok(Lookup::Revoked);
    }
    let sealed =
        STANDARD.decode(&body.sealed_secret).map_err(|_| Error::internal("an AccessKey secret is not base64"))?;
    let secret = d.unseal(&Caller::admin(doc.tenant.clone()), &purpose(id), &sealed).await?;
    Ok(Lookup::Active { tenant: doc.tenant.clone(), identity: body.identity, secret })
}

/// Issues an AccessKey for `identity` of the caller's tenant.
pub async fn create(d: &Dispatcher, caller: &Caller, identity: &str, description: &str) -> Result<NewAccessKey> {
    if identity.is_empty() || identity.len() > 128 || !identity.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid("the identity must be 1-128 printable ASCII characters"));
    }
    let id = format!("{ID_PREFIX}{}", random_alnum(ID_RANDOM_LEN)?);
    let secret = Zeroizing::new(random_alnum(SECRET_LEN)?);
    let sealed = d.seal(caller, &purpose(&id), secret.as_bytes()).await?;
    let body = AccessKeyBody {
        identity: identity.to_owned(),
        sealed_secret: STANDARD.encode(sealed),
        revoked_at: None,
        description: description.to_owned(),
    };
    let value =
        serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode an AccessKey").with_source(e))?;
    d.put_document(caller, Document::new(KIND_ACCESS_KEY, &id, caller.tenant.clone(), value), Precondition::Absent)
        .await?;
    Ok(NewAccessKey { id, secret })
}

/// AccessKeys of a tenant (all tenants with `None`).
pub async fn list(d: &Dispatcher, tenant: Option<&TenantId>) -> Result<Vec<AccessKeyInfo>> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(500);
    loop {
        let p = d.list_documents(KIND_ACCESS_KEY, tenant, &page).await?;
        for doc in &p.items {
            let body = parse(doc)?;
            out.push(AccessKeyInfo {
                id: doc.id.clone(),
                tenant: doc.tenant.clone(),
                identity: body.identity,
                created_at: doc.created_at.to_rfc3339(),
                revoked: body.revoked_at.is_some(),
                description: body.description,
            });
        }
        match p.next {
            Some(next) => page.after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Revokes an AccessKey of the caller's tenant; the record stays (without a usable secret) for audit.
pub async fn revoke(d: &Dispatcher, caller: &Caller, id: &str) -> Result<()> {
    let no_such = || Error::new(ErrorKind::InvalidRequest, "no such AccessKey");
    let doc = d.document(KIND_ACCESS_KEY, id).await?.ok_or_else(no_such)?;
    if doc.tenant != caller.tenant {
        return Err(no_such());
    }
    let mut body = parse(&doc)?;
    if body.revoked_at.is_some() {
        return Ok(());
    }
    body.revoked_at = Some(Timestamp::now());
    // The sealed secret goes too: a revoked key can never verify again.
    body.sealed_secret = String::new();
    let mut next = (*doc).clone();
    next.body =
        serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode an AccessKey").with_source(e))?;
    match d.put_document(caller, next, Precondition::Revision(doc.revision)).await? {
        Some(_) => Ok(()),
        None => Err(Error::new(ErrorKind::VersionConflict, "the AccessKey changed meanwhile; retry")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_secrets_have_the_vendor_shape() {
        let s = random_alnum(30).unwrap();
        assert_eq!(s.len(), 30);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(s, random_alnum(30).unwrap());
        let k = NewAccessKey { id: "LTAIx".into(), secret: Zeroizing::new("topsecret".into()) };
        assert!(!format!("{k:?}").contains("topsecret"));
    }
}
