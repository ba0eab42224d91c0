//! ClientKeys: the RSA public half of each ClientKey, kept as a core document so every replica and the CLI
//! agree. The private half is handed to the client once and never stored.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{
    Caller, Dispatcher, Document, Error, ErrorKind, PageRequest, Precondition, Result, TenantId, Timestamp,
};
use serde::{Deserialize, Serialize};

/// Document kind of a ClientKey; the id is the ClientKey id `KAAP.<uuid>`.
pub const KIND_CLIENT_KEY: &str = "alibaba.client_key";
pub const ID_PREFIX: &str = "KAAP.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientKeyBody {
    /// The identity requests signed by this key act as (policies and audit name it).
    pub identity: String,
    /// DER of the RSA public key (PKCS#1 `RSAPublicKey`).
    pub public_key: String,
    #[serde(default)]
    pub revoked_at: Option<Timestamp>,
    #[serde(default)]
    pub description: String,
    /// Requests per second this ClientKey may make; `None`: the `[alibaba]` default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qps: Option<u32>,
}

impl ClientKeyBody {
    pub fn public_key_der(&self) -> Result<Vec<u8>> {
        STANDARD.decode(&self.public_key).map_err(|_| Error::internal("a ClientKey's public key is not base64"))
    }
}

/// A ClientKey as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientKeyInfo {
    pub id: String,
    pub tenant: TenantId,
    pub identity: String,
    pub created_at: String,
    pub revoked: bool,
    pub description: String,
    /// Its own QPS limit, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qps: Option<u32>,
}

fn parse(doc: &Document) -> Result<ClientKeyBody> {
    serde_json::from_value(doc.body.clone())
        .map_err(|e| Error::internal("a ClientKey record is malformed").with_source(e))
}

/// The active ClientKey of that id with its tenant, if any (revoked ones are `None`).
pub async fn lookup(d: &Dispatcher, id: &str) -> Result<Option<(TenantId, ClientKeyBody)>> {
    let Some(doc) = d.document(KIND_CLIENT_KEY, id).await? else { return Ok(None) };
    let body = parse(&doc)?;
    if body.revoked_at.is_some() {
        return Ok(None);
    }
    Ok(Some((doc.tenant.clone(), body)))
}

/// Registers a public key (PKCS#1 DER) as a new ClientKey of `caller.tenant`; returns its id.
pub async fn register(
    d: &Dispatcher,
    caller: &Caller,
    identity: &str,
    public_key_der: &[u8],
    description: &str,
) -> Result<String> {
    register_with(d, caller, identity, public_key_der, description, None).await
}

/// [`register`] with a QPS limit of its own (`None`: the configured default).
pub async fn register_with(
    d: &Dispatcher,
    caller: &Caller,
    identity: &str,
    public_key_der: &[u8],
    description: &str,
    qps: Option<u32>,
) -> Result<String> {
    if qps == Some(0) {
        return Err(Error::invalid("a ClientKey's QPS limit must be at least 1"));
    }
    if identity.is_empty() || identity.len() > 128 || !identity.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid("the identity must be 1-128 printable ASCII characters"));
    }
    let id = format!("{ID_PREFIX}{}", uuid::Uuid::new_v4());
    let body = ClientKeyBody {
        identity: identity.to_owned(),
        public_key: STANDARD.encode(public_key_der),
        revoked_at: None,
        description: description.to_owned(),
        qps,
    };
    let value = serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode a ClientKey").with_source(e))?;
    d.put_document(caller, Document::new(KIND_CLIENT_KEY, &id, caller.tenant.clone(), value), Precondition::Absent)
        .await?;
    Ok(id)
}

/// ClientKeys of a tenant (all tenants with `None`).
pub async fn list(d: &Dispatcher, tenant: Option<&TenantId>) -> Result<Vec<ClientKeyInfo>> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(500);
    loop {
        let p = d.list_documents(KIND_CLIENT_KEY, tenant, &page).await?;
        for doc in &p.items {
            let body = parse(doc)?;
            out.push(ClientKeyInfo {
                id: doc.id.clone(),
                tenant: doc.tenant.clone(),
                identity: body.identity,
                created_at: doc.created_at.to_rfc3339(),
                revoked: body.revoked_at.is_some(),
                description: body.description,
                qps: body.qps,
            });
        }
        match p.next {
            Some(next) => page.after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Revokes a ClientKey of the caller's tenant; the record stays for audit. Every replica refuses it once its
/// document cache hears of the change.
pub async fn revoke(d: &Dispatcher, caller: &Caller, id: &str) -> Result<()> {
    let Some(doc) = d.document(KIND_CLIENT_KEY, id).await? else {
        return Err(Error::new(ErrorKind::InvalidRequest, "no such ClientKey"));
    };
    if doc.tenant != caller.tenant {
        return Err(Error::new(ErrorKind::InvalidRequest, "no such ClientKey"));
    }
    let mut body = parse(&doc)?;
    if body.revoked_at.is_some() {
        return Ok(());
    }
    body.revoked_at = Some(Timestamp::now());
    let value = serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode a ClientKey").with_source(e))?;
    let mut next = (*doc).clone();
    next.body = value;
    match d.put_document(caller, next, Precondition::Revision(doc.revision)).await? {
        Some(_) => Ok(()),
        None => Err(Error::new(ErrorKind::VersionConflict, "the ClientKey changed meanwhile; retry")),
    }
}

/// Sets (or with `None` clears, falling back to the configured default) a ClientKey's own QPS limit. Running
/// servers apply it once their document cache hears of the change.
pub async fn set_qps(d: &Dispatcher, caller: &Caller, id: &str, qps: Option<u32>) -> Result<()> {
    if qps == Some(0) {
        return Err(Error::invalid("a ClientKey's QPS limit must be at least 1"));
    }
    let Some(doc) = d.document(KIND_CLIENT_KEY, id).await? else {
        return Err(Error::new(ErrorKind::InvalidRequest, "no such ClientKey"));
    };
    if doc.tenant != caller.tenant {
        return Err(Error::new(ErrorKind::InvalidRequest, "no such ClientKey"));
    }
    let mut body = parse(&doc)?;
    body.qps = qps;
    let value = serde_json::to_value(&body).map_err(|e| Error::internal("cannot encode a ClientKey").with_source(e))?;
    let mut next = (*doc).clone();
    next.body = value;
    match d.put_document(caller, next, Precondition::Revision(doc.revision)).await? {
        Some(_) => Ok(()),
        None => Err(Error::new(ErrorKind::VersionConflict, "the ClientKey changed meanwhile; retry")),
    }
}

/// A freshly issued ClientKey: its id and the PKCS#8 DER of its private key, shown to the operator once.
pub struct NewClientKey {
    pub id: String,
    pub private_key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for NewClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("NewClientKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl NewClientKey {
    /// The private key as PKCS#1 `RSA PRIVATE KEY` PEM: what the SDKs take as `access_key_id` +
    /// `private_key`. The Python SDK wraps anything not starting with that header in it, so a PKCS#8
    /// `PRIVATE KEY` PEM would be mangled; PKCS#1 passes through unchanged.
    pub fn private_key_pem(&self) -> Result<zeroize::Zeroizing<String>> {
        let pkcs1 = pkcs1_of_pkcs8(&self.private_key_pkcs8)
            .ok_or_else(|| Error::internal("the generated private key is not PKCS#8 RSA"))?;
        let b64 = zeroize::Zeroizing::new(STANDARD.encode(pkcs1));
        let mut out = zeroize::Zeroizing::new(String::from("-----BEGIN RSA PRIVATE KEY-----\n"));
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END RSA PRIVATE KEY-----\n");
        Ok(out)
    }

    /// The vendor's `clientKey_<id>.json` (PKCS#12 in legacy encryption) and its password file.
    pub fn client_key_files(&self) -> Result<crate::pkcs12::ClientKeyFiles> {
        crate::pkcs12::client_key_files(&self.id, &self.private_key_pkcs8)
    }
}

/// One DER TLV at the start of `der`: (tag, contents, rest). Only definite lengths up to 4 length bytes.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The `RSAPrivateKey` (PKCS#1) inside a PKCS#8 `PrivateKeyInfo`: SEQUENCE { INTEGER version,
/// SEQUENCE algorithm, OCTET STRING privateKey, ... }.
fn pkcs1_of_pkcs8(pkcs8: &[u8]) -> Option<&[u8]> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (0x30, info, _) = tlv(pkcs8)? else { return None };
    let (0x02, _, rest) = tlv(info)? else { return None };
    let (0x30, alg, rest) = tlv(rest)? else { return None };
    let (0x06, oid, _) = tlv(alg)? else { return None };
    if oid != RSA_ENCRYPTION {
        return None;
    }
    let (0x04, key, _) = tlv(rest)? else { return None };
    Some(key)
}

/// Generates an RSA-2048 key pair (the vendor's ClientKey spec), registers its public half and returns the
/// private half, which is not stored anywhere.
pub async fn create(d: &Dispatcher, caller: &Caller, identity: &str, description: &str) -> Result<NewClientKey> {
    create_with(d, caller, identity, description, None).await
}

/// [`create`] with a QPS limit of its own (`None`: the configured default).
pub async fn create_with(
    d: &Dispatcher,
    caller: &Caller,
    identity: &str,
    description: &str,
    qps: Option<u32>,
) -> Result<NewClientKey> {
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::signature::KeyPair as _;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| Error::internal("cannot generate an RSA key pair"))?;
    let pkcs8 = pair.as_der().map_err(|_| Error::internal("cannot encode the private key"))?;
    let private_key_pkcs8 = zeroize::Zeroizing::new(pkcs8.as_ref().to_vec());
    let id = register_with(d, caller, identity, pair.public_key().as_ref(), description, qps).await?;
    Ok(NewClientKey { id, private_key_pkcs8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs1_is_extracted_from_generated_pkcs8() {
        use aws_lc_rs::encoding::AsDer as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap();
        let pkcs1 = pkcs1_of_pkcs8(pkcs8.as_ref()).expect("PKCS#1 inside");
        assert!(aws_lc_rs::rsa::KeyPair::from_der(pkcs1).is_ok(), "a valid RSAPrivateKey");
        let key =
            NewClientKey { id: "KAAP.x".into(), private_key_pkcs8: zeroize::Zeroizing::new(pkcs8.as_ref().to_vec()) };
        let pem = key.private_key_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(pkcs1_of_pkcs8(&pkcs8.as_ref()[..40]).is_none());
        assert!(format!("{key:?}").contains("KAAP.x") && !format!("{key:?}").contains("private"));
    }
}
