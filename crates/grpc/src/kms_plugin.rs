//! The Kubernetes KMS v2 plugin (`v2.KeyManagementService`), served on a unix socket for the kube-apiserver.
//!
//! Encrypt seals the API server's DEK (seed) under the configured key's primary version with AES-256-GCM and
//! returns a self-describing blob, so Decrypt opens it with the version that made it, also after rotations.
//! `key_id` is `<key id>:<primary version id>`: it changes when the key rotates, which tells the API server to
//! re-encrypt its DEK under the new version.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kmsgate_core::backend::EncryptionAlgorithm;
use kmsgate_core::{
    Caller, DecryptRequest, Dispatcher, EncryptRequest, Error, ErrorKind, Frontend, KeyId, KeyRef, KeyState, KeyUsage,
    TenantId,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::call::{deadline_of, run};
use crate::error::status_of;
use crate::proto::k8s_kms_v2 as pb;
use crate::proto::k8s_kms_v2::key_management_service_server::KeyManagementService;

/// The API server refuses larger ciphertexts and key ids.
pub const MAX_CIPHERTEXT: usize = 1024;
pub const MAX_KEY_ID: usize = 1024;
/// All annotation values together must stay under this.
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// The annotation naming the key version (for operators; Decrypt trusts the blob, which the AEAD binds).
pub const VERSION_ANNOTATION: &str = "key-version.kmsgate.io";

const MAGIC: &[u8; 4] = b"KGK1";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Binds plugin ciphertexts to this use: a blob from another frontend does not open here, nor one of ours
/// there.
const AAD: &[u8] = b"kmsgate kubernetes-kms v2";

/// `[kms_plugin]` of the configuration (docs/kubernetes-kms.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KmsPluginConfig {
    /// Path of the unix socket; the plugin is off when unset.
    pub socket: Option<PathBuf>,
    /// The AES_256 key (id or `alias/...`) that encrypts the API server's DEKs.
    pub key: String,
    /// The tenant owning the key (default: the server's default tenant).
    pub tenant: Option<String>,
    /// The identity the API server acts as, for policies and audit.
    pub identity: String,
}

impl Default for KmsPluginConfig {
    fn default() -> Self {
        KmsPluginConfig { socket: None, key: String::new(), tenant: None, identity: "kubernetes-kms".to_owned() }
    }
}

impl KmsPluginConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.socket.is_none() {
            return Ok(());
        }
        KeyRef::parse(&self.key).map_err(|e| format!("kms_plugin.key: {}", e.message()))?;
        if let Some(t) = &self.tenant {
            TenantId::parse(t).map_err(|e| format!("kms_plugin.tenant: {}", e.message()))?;
        }
        if self.identity.is_empty() || !self.identity.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("kms_plugin.identity must be printable ASCII without spaces".to_owned());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct KmsPlugin {
    dispatcher: Dispatcher,
    tenant: TenantId,
    key: KeyRef,
    identity: String,
}

impl KmsPlugin {
    pub fn new(dispatcher: Dispatcher, tenant: TenantId, key: KeyRef, identity: String) -> Self {
        Self { dispatcher, tenant, key, identity }
    }

    fn caller<T>(&self, req: &Request<T>, uid: &str) -> Caller {
        let mut metadata = BTreeMap::new();
        // The API server's uid is a UUID for tracing; keep it only when it looks like one.
        if !uid.is_empty() && uid.len() <= 128 && uid.bytes().all(|b| b.is_ascii_graphic()) {
            metadata.insert("uid".to_owned(), uid.to_owned());
        }
        let request_id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        Caller {
            tenant: self.tenant.clone(),
            identity: self.identity.clone(),
            frontend: Frontend::KubernetesKms,
            request_id,
            metadata,
        }
    }
}

/// The key id reported to the API server for a key and version.
pub fn key_id_of(key: &KeyId, version: Uuid) -> String {
    format!("{key}:{version}")
}

fn encode_blob(key: &KeyId, version: Uuid, iv: &[u8], ct: &[u8], tag: &[u8]) -> Result<Vec<u8>, Error> {
    let id = key.as_str().as_bytes();
    let len = u8::try_from(id.len()).map_err(|_| Error::internal("key id too long for the blob"))?;
    let mut out = Vec::with_capacity(4 + 1 + id.len() + 16 + iv.len() + ct.len() + tag.len());
    out.extend_from_slice(MAGIC);
    out.push(len);
    out.extend_from_slice(id);
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(ct);
    out.extend_from_slice(tag);
    if out.len() > MAX_CIPHERTEXT {
        return Err(Error::invalid("the plaintext is too large for a 1 KiB KMS v2 ciphertext"));
    }
    Ok(out)
}

struct Blob {
    key: KeyId,
    version: Uuid,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

fn decode_blob(b: &[u8]) -> Result<Blob, Error> {
    let bad = Error::invalid_ciphertext;
    if b.len() > MAX_CIPHERTEXT || b.len() < 5 || &b[..4] != MAGIC {
        return Err(bad());
    }
    let n = usize::from(b[4]);
    let rest = &b[5..];
    if rest.len() < n + 16 + IV_LEN + TAG_LEN {
        return Err(bad());
    }
    let key = std::str::from_utf8(&rest[..n]).ok().and_then(|s| KeyId::parse(s).ok()).ok_or_else(bad)?;
    let version = Uuid::from_slice(&rest[n..n + 16]).map_err(|_| bad())?;
    let body = &rest[n + 16..];
    let (iv, sealed) = body.split_at(IV_LEN);
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    Ok(Blob { key, version, iv: iv.to_vec(), ciphertext: ct.to_vec(), tag: tag.to_vec() })
}

#[tonic::async_trait]
impl KeyManagementService for KmsPlugin {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let report = self.dispatcher.readiness().await;
        let key = self.dispatcher.resolve(&self.tenant, &self.key).await;
        let (healthz, key_id) = match key {
            Ok(k) => {
                let key_id = key_id_of(&k.id, k.primary_version);
                let healthz = if !report.ready() {
                    "the store or the key backend is unavailable".to_owned()
                } else if k.state != KeyState::Enabled {
                    format!("the key is {}", k.state.as_str())
                } else if !(k.usage.contains(KeyUsage::Encrypt) && k.usage.contains(KeyUsage::Decrypt)) {
                    "the key cannot encrypt and decrypt".to_owned()
                } else {
                    "ok".to_owned()
                };
                (healthz, key_id)
            }
            Err(e) => (format!("the key cannot be used: {}", e.message()), String::new()),
        };
        Ok(Response::new(pb::StatusResponse { version: "v2".to_owned(), healthz, key_id }))
    }

    async fn encrypt(&self, req: Request<pb::EncryptRequest>) -> Result<Response<pb::EncryptResponse>, Status> {
        let deadline = deadline_of(&req)?;
        let caller = self.caller(&req, &req.get_ref().uid);
        let r = req.into_inner();
        let (d, key) = (self.dispatcher.clone(), self.key.clone());
        let reply = run(deadline, async move {
            let e = d
                .encrypt(
                    &caller,
                    EncryptRequest {
                        key,
                        algorithm: Some(EncryptionAlgorithm::AesGcm),
                        plaintext: Zeroizing::new(r.plaintext),
                        aad: AAD.to_vec(),
                        iv: None,
                    },
                )
                .await?;
            let ciphertext = encode_blob(&e.key_id, e.version, &e.iv, &e.ciphertext, &e.tag)?;
            let mut annotations = std::collections::HashMap::new();
            annotations.insert(VERSION_ANNOTATION.to_owned(), e.version.to_string().into_bytes());
            Ok(pb::EncryptResponse { ciphertext, key_id: key_id_of(&e.key_id, e.version), annotations })
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn decrypt(&self, req: Request<pb::DecryptRequest>) -> Result<Response<pb::DecryptResponse>, Status> {
        let deadline = deadline_of(&req)?;
        let caller = self.caller(&req, &req.get_ref().uid);
        let r = req.into_inner();
        let blob = decode_blob(&r.ciphertext).map_err(|e| status_of(&e))?;
        // The key id the API server stored with the ciphertext must be the one the blob names.
        if !r.key_id.is_empty() && r.key_id != key_id_of(&blob.key, blob.version) {
            return Err(status_of(&Error::new(
                ErrorKind::InvalidCiphertext,
                "the key_id does not match the ciphertext",
            )));
        }
        let d = self.dispatcher.clone();
        let plaintext = run(deadline, async move {
            let p = d
                .decrypt(
                    &caller,
                    DecryptRequest {
                        key: KeyRef::Id(blob.key),
                        version: Some(blob.version),
                        algorithm: Some(EncryptionAlgorithm::AesGcm),
                        iv: blob.iv,
                        aad: AAD.to_vec(),
                        ciphertext: blob.ciphertext,
                        tag: blob.tag,
                    },
                )
                .await?;
            Ok(p.plaintext)
        })
        .await?;
        Ok(Response::new(pb::DecryptResponse { plaintext: plaintext.to_vec() }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blobs_round_trip_and_reject_garbage() {
        let key = KeyId::parse("k-1").unwrap();
        let v = Uuid::new_v4();
        let b = encode_blob(&key, v, &[1; 12], b"ct", &[2; 16]).unwrap();
        let d = decode_blob(&b).unwrap();
        assert_eq!(
            (d.key, d.version, d.iv, d.ciphertext, d.tag),
            (key.clone(), v, vec![1; 12], b"ct".to_vec(), vec![2; 16])
        );
        assert!(decode_blob(&b[..b.len() - 20]).is_err());
        assert!(decode_blob(b"KGK0rest-of-it-is-long-enough-to-parse-but-wrong-magic").is_err());
        assert!(decode_blob(&[]).is_err());
        let big = encode_blob(&key, v, &[1; 12], &[0; 1000], &[2; 16]);
        assert_eq!(big.unwrap_err().kind(), ErrorKind::InvalidRequest);
        assert!(key_id_of(&key, v).len() < MAX_KEY_ID);
    }
}
