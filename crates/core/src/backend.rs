//! The key backend seam: software keys by default, PKCS#11 HSMs in production.
//!
//! A backend never sees key ids it must trust: the dispatcher hands it the handle the store recorded and the
//! identity of the version it belongs to, so a backend can bind wrapped material to that identity.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::Result;
use crate::model::{KeyId, KeySpec, KeyUsageSet};

/// The identity of one key version plus the backend's opaque handle to its material.
#[derive(Clone, Copy)]
pub struct KeyMaterialRef<'a> {
    pub key_id: &'a KeyId,
    pub version: Uuid,
    pub spec: KeySpec,
    pub handle: &'a [u8],
}

impl fmt::Debug for KeyMaterialRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterialRef")
            .field("key_id", self.key_id)
            .field("version", &self.version)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Asymmetric signature schemes. All hash with SHA-256; backends receive the 32-byte digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    RsaPssSha256,
    /// ECDSA P-256 with SHA-256; signatures are DER-encoded `Ecdsa-Sig-Value`.
    EcdsaSha256,
}

impl SigningAlgorithm {
    pub fn fits(self, spec: KeySpec) -> bool {
        match self {
            SigningAlgorithm::RsaPkcs1Sha256 | SigningAlgorithm::RsaPssSha256 => spec.is_rsa(),
            SigningAlgorithm::EcdsaSha256 => spec == KeySpec::EcP256,
        }
    }
}

/// Padding of the unauthenticated AES block modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockPadding {
    /// PKCS#7: 1 to 16 bytes, each holding the count, are always added.
    Pkcs7,
    /// None: the data must be a whole number of 16-byte blocks.
    NoPadding,
}

/// The unauthenticated AES block modes some protocols ask for (the Alibaba instance API's `AES_CBC` and
/// `AES_ECB`). They protect confidentiality only; AES-GCM stays every frontend's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AesBlockMode {
    /// CBC with a 16-byte IV.
    Cbc,
    /// ECB: no IV; equal plaintext blocks give equal ciphertext blocks.
    Ecb,
}

/// The AES block size, and the IV length of CBC.
pub const AES_BLOCK_LEN: usize = 16;

/// Encryption schemes the dispatcher routes to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EncryptionAlgorithm {
    /// AES-256-GCM, 12-byte IV, 16-byte tag.
    AesGcm,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaepSha256,
    /// AES-256-CBC, 16-byte IV, no tag.
    AesCbc(BlockPadding),
    /// AES-256-ECB, no IV, no tag.
    AesEcb(BlockPadding),
}

impl EncryptionAlgorithm {
    pub fn fits(self, spec: KeySpec) -> bool {
        match self {
            EncryptionAlgorithm::AesGcm | EncryptionAlgorithm::AesCbc(_) | EncryptionAlgorithm::AesEcb(_) => {
                spec == KeySpec::Aes256
            }
            EncryptionAlgorithm::RsaOaepSha256 => spec.is_rsa(),
        }
    }

    /// The block mode and padding of AES-CBC and AES-ECB.
    pub fn block_mode(self) -> Option<(AesBlockMode, BlockPadding)> {
        match self {
            EncryptionAlgorithm::AesCbc(p) => Some((AesBlockMode::Cbc, p)),
            EncryptionAlgorithm::AesEcb(p) => Some((AesBlockMode::Ecb, p)),
            EncryptionAlgorithm::AesGcm | EncryptionAlgorithm::RsaOaepSha256 => None,
        }
    }

    pub fn default_for(spec: KeySpec) -> Option<Self> {
        match spec {
            KeySpec::Aes256 => Some(EncryptionAlgorithm::AesGcm),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 => Some(EncryptionAlgorithm::RsaOaepSha256),
            KeySpec::EcP256 | KeySpec::Hmac256 => None,
        }
    }
}

/// The health of one fleet member (an HSM slot or module, or the software key store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthStatus {
    Active,
    Degraded,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    /// Stable member id (backend name, or `backend/slot`).
    pub id: String,
    /// Human-readable model string (e.g. `SoftHSM v2.6`, `kmsgate software keystore`).
    pub model: String,
    pub status: HealthStatus,
    /// Why it is not active; safe to show operators, never contains secrets.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Length of the AES-GCM IV every backend accepts.
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag every backend produces.
pub const GCM_TAG_LEN: usize = 16;

fn block_modes_unsupported(kind: &str) -> crate::error::Error {
    crate::error::Error::new(
        crate::error::ErrorKind::Unsupported,
        format!("the {kind} key backend does not offer AES-CBC or AES-ECB"),
    )
}

/// A key backend. Implementations must be cheap to call concurrently, must never block an async worker
/// (offload blocking work), and must map authentication failures of decrypt to `InvalidCiphertext`.
#[async_trait]
pub trait KeyBackend: Send + Sync + fmt::Debug {
    /// The backend's configured name, recorded in every key version it holds.
    fn name(&self) -> &str;

    /// `software` or `pkcs11`.
    fn kind(&self) -> &'static str;

    /// Generate new material for a key version and return the handle to store.
    async fn generate(&self, key_id: &KeyId, version: Uuid, spec: KeySpec, usage: KeyUsageSet) -> Result<Vec<u8>>;

    /// Bring in customer-supplied material (raw AES/HMAC bytes, or a PKCS#8 DER private key).
    async fn import(
        &self,
        key_id: &KeyId,
        version: Uuid,
        spec: KeySpec,
        usage: KeyUsageSet,
        material: &[u8],
    ) -> Result<Vec<u8>>;

    /// AES-256-GCM encrypt. Returns `ciphertext || tag` (16-byte tag).
    async fn aes_gcm_encrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>>;

    /// AES-256-GCM decrypt of `ciphertext || tag`. A tag mismatch is `InvalidCiphertext`.
    async fn aes_gcm_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>>;

    /// AES-256 in CBC (`iv` is 16 bytes) or ECB (`iv` is empty) mode with the given padding. Without padding
    /// the plaintext is a whole number of blocks. Backends without these modes keep this default answer.
    async fn aes_block_encrypt(
        &self,
        key: KeyMaterialRef<'_>,
        mode: AesBlockMode,
        padding: BlockPadding,
        iv: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let _ = (key, mode, padding, iv, plaintext);
        Err(block_modes_unsupported(self.kind()))
    }

    /// The inverse of [`KeyBackend::aes_block_encrypt`]. Bad PKCS#7 padding or a partial block is
    /// `InvalidCiphertext`.
    async fn aes_block_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        mode: AesBlockMode,
        padding: BlockPadding,
        iv: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let _ = (key, mode, padding, iv, ciphertext);
        Err(block_modes_unsupported(self.kind()))
    }

    /// RSAES-OAEP-SHA256 encrypt with the public half.
    async fn rsa_oaep_encrypt(&self, key: KeyMaterialRef<'_>, plaintext: &[u8]) -> Result<Vec<u8>>;

    /// RSAES-OAEP-SHA256 decrypt. A padding failure is `InvalidCiphertext`.
    async fn rsa_oaep_decrypt(&self, key: KeyMaterialRef<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// Sign a SHA-256 digest.
    async fn sign_digest(&self, key: KeyMaterialRef<'_>, alg: SigningAlgorithm, digest: &[u8]) -> Result<Vec<u8>>;

    /// Verify a signature over a SHA-256 digest. A bad signature is `Ok(false)`, not an error.
    async fn verify_digest(
        &self,
        key: KeyMaterialRef<'_>,
        alg: SigningAlgorithm,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool>;

    /// The public key as DER `SubjectPublicKeyInfo`.
    async fn public_key_der(&self, key: KeyMaterialRef<'_>) -> Result<Vec<u8>>;

    /// HMAC-SHA256 of `data`.
    async fn hmac_sha256(&self, key: KeyMaterialRef<'_>, data: &[u8]) -> Result<Vec<u8>>;

    /// `len` bytes from the backend's random generator.
    async fn random(&self, len: usize) -> Result<Vec<u8>>;

    /// Destroy a version's material (key deletion).
    async fn destroy(&self, key: KeyMaterialRef<'_>) -> Result<()>;

    /// One entry per fleet member this backend spans, from a real probe.
    async fn health(&self) -> Vec<MemberHealth>;
}
