//! The software key backend: aws-lc-rs crypto over material wrapped under the root key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::error::Unspecified;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey,
};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _, ParsedPublicKey,
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RSA_PSS_2048_8192_SHA256, RSA_PSS_SHA256, RsaEncoding, RsaKeyPair,
};
use aws_lc_rs::{hmac, rand};
use kmsgate_core::backend::{AES_BLOCK_LEN, GCM_IV_LEN, GCM_TAG_LEN};
use kmsgate_core::{
    AesBlockMode, BlockPadding, Error, ErrorKind, HealthStatus, KeyBackend, KeyId, KeyMaterialRef, KeySpec,
    KeyUsageSet, MemberHealth, Result, SigningAlgorithm,
};
use moka::sync::Cache;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::handle;
use crate::kek::Kek;

/// Symmetric key length for AES_256 and HMAC_256 material.
const SYMMETRIC_KEY_LEN: usize = 32;
/// Inputs above this size are processed on a blocking thread: AES-GCM and HMAC run at roughly 1-4 GB/s, so this
/// keeps inline work in the tens of microseconds an async worker can afford.
const INLINE_LIMIT: usize = 64 * 1024;
/// Upper bound for one `random` call; the dispatcher asks for at most 1024 bytes.
const MAX_RANDOM_LEN: usize = 64 * 1024;
const SHA256_LEN: usize = 32;

/// Tuning of the software backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftwareConfig {
    /// How many prepared keys (unwrapped and scheduled) to keep. Each entry is a key version.
    pub cache_capacity: u64,
    /// A prepared key unused for this long is dropped, so idle keys do not stay in memory in clear.
    pub cache_idle: Duration,
}

impl Default for SoftwareConfig {
    fn default() -> Self {
        SoftwareConfig { cache_capacity: 10_000, cache_idle: Duration::from_secs(30 * 60) }
    }
}

/// The embedded default key backend: key material lives in the store wrapped under a root key ([`Kek`]) and is
/// unwrapped into a bounded in-memory cache of ready-to-use aws-lc-rs keys.
pub struct SoftwareBackend {
    name: String,
    inner: Arc<Inner>,
}

struct Inner {
    kek: Kek,
    cache: Cache<Uuid, Arc<Entry>>,
}

/// A prepared key with the identity and handle it was unwrapped from. Entries are found by version id (one hash
/// of 16 bytes per call) and used only when the presented key id, spec and handle are exactly these: a handle
/// presented under another identity never gets an entry prepared for its rightful owner.
struct Entry {
    key_id: KeyId,
    spec: KeySpec,
    handle: Box<[u8]>,
    prepared: Arc<Prepared>,
}

impl Entry {
    fn serves(&self, key: &KeyMaterialRef<'_>) -> bool {
        self.spec == key.spec && self.key_id == *key.key_id && *self.handle == *key.handle
    }
}

/// Key material parsed and scheduled once, then shared by every call.
enum Prepared {
    Aes(LessSafeKey),
    // Boxed: a keyed HMAC holds two precomputed hash states (over 1 KB), which would size every variant.
    Hmac(Box<hmac::Key>),
    Rsa(Box<RsaKey>),
    Ec(Box<EcKey>),
}

struct RsaKey {
    pair: RsaKeyPair,
    decrypt: OaepPrivateDecryptingKey,
    encrypt: OaepPublicEncryptingKey,
    pkcs1: ParsedPublicKey,
    pss: ParsedPublicKey,
    spki: Vec<u8>,
}

struct EcKey {
    pair: EcdsaKeyPair,
    verify: ParsedPublicKey,
    spki: Vec<u8>,
}

impl SoftwareBackend {
    /// The name used when the configuration does not give one.
    pub const DEFAULT_NAME: &'static str = "software";

    /// A backend called `name` (recorded in every key version it creates) wrapping keys under `kek`.
    pub fn new(name: impl Into<String>, kek: Kek) -> Self {
        Self::with_config(name, kek, SoftwareConfig::default())
    }

    pub fn with_config(name: impl Into<String>, kek: Kek, config: SoftwareConfig) -> Self {
        let cache = Cache::builder().max_capacity(config.cache_capacity).time_to_idle(config.cache_idle).build();
        SoftwareBackend { name: name.into(), inner: Arc::new(Inner { kek, cache }) }
    }

    /// The root key's fingerprint, for startup logs.
    pub fn kek_fingerprint(&self) -> String {
        self.inner.kek.fingerprint_hex()
    }

    /// The number of prepared keys held now (for metrics and tests; settles pending cache bookkeeping first).
    pub fn cached_keys(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// The prepared key for `key`, from the cache or by unwrapping its handle. RSA parsing validates the key
    /// (several big-number operations), so it happens on a blocking thread.
    async fn prepared(&self, key: KeyMaterialRef<'_>) -> Result<Arc<Prepared>> {
        if let Some(hit) = self.inner.cache.get(&key.version)
            && hit.serves(&key)
        {
            return Ok(hit.prepared.clone());
        }
        if key.spec.is_rsa() {
            let inner = self.inner.clone();
            let (key_id, version, spec, handle) = (key.key_id.clone(), key.version, key.spec, key.handle.to_vec());
            blocking(move || inner.load(KeyMaterialRef { key_id: &key_id, version, spec, handle: &handle })).await
        } else {
            self.inner.load(key)
        }
    }

    fn wrap(&self, key_id: &KeyId, version: Uuid, spec: KeySpec, material: &[u8]) -> Result<Vec<u8>> {
        handle::wrap(&self.inner.kek, &KeyMaterialRef { key_id, version, spec, handle: &[] }, material)
    }

    fn self_test(&self) -> Result<()> {
        aes_gcm_known_answer()?;

        // A round trip under a throwaway key exercises the random generator and both directions of AES-GCM.
        let mut key = Zeroizing::new([0u8; SYMMETRIC_KEY_LEN]);
        rand::fill(key.as_mut_slice()).map_err(crypto("the random generator failed"))?;
        let key = aes_key(key.as_slice())?;
        let mut iv = [0u8; GCM_IV_LEN];
        rand::fill(&mut iv).map_err(crypto("the random generator failed"))?;
        let plaintext = b"kmsgate software keystore self-test";
        let sealed = aes_seal(&key, &iv, b"self-test", plaintext)?;
        if &sealed[..plaintext.len()] == plaintext.as_slice() {
            return Err(Error::new(ErrorKind::DependencyFailure, "AES-GCM returned the plaintext"));
        }
        let opened = aes_open(&key, &iv, b"self-test", &sealed)?;
        if opened.as_slice() != plaintext.as_slice() {
            return Err(Error::new(ErrorKind::DependencyFailure, "AES-GCM did not round-trip"));
        }

        // The root key path: wrap and unwrap a throwaway value.
        let id = KeyId::parse("kmsgate-self-test")?;
        let version = Uuid::new_v4();
        let wrapped = self.wrap(&id, version, KeySpec::Hmac256, &[0x5a; SYMMETRIC_KEY_LEN])?;
        let unwrapped = handle::unwrap(
            &self.inner.kek,
            &KeyMaterialRef { key_id: &id, version, spec: KeySpec::Hmac256, handle: &wrapped },
        )?;
        if unwrapped.as_slice() != [0x5a; SYMMETRIC_KEY_LEN].as_slice() {
            return Err(Error::new(ErrorKind::DependencyFailure, "the root key did not round-trip"));
        }
        Ok(())
    }
}

impl fmt::Debug for SoftwareBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareBackend")
            .field("name", &self.name)
            .field("kek", &self.inner.kek)
            .field("cached_keys", &self.inner.cache.entry_count())
            .finish()
    }
}

impl Inner {
    /// Loads through the cache so concurrent misses for one key unwrap it once.
    fn load(&self, key: KeyMaterialRef<'_>) -> Result<Arc<Prepared>> {
        let unwrap = || -> Result<Arc<Prepared>> {
            let material = handle::unwrap(&self.kek, &key)?;
            // The material authenticated under our root key and was validated when wrapped: if it does not
            // parse now, that is our bug, not the caller's request.
            prepare(key.spec, &material).map(Arc::new).map_err(|e| match e.kind() {
                ErrorKind::InvalidRequest => {
                    Error::internal("the key material in the handle cannot be used").with_source(e)
                }
                _ => e,
            })
        };
        let entry = self
            .cache
            .try_get_with(key.version, || {
                Ok::<_, Error>(Arc::new(Entry {
                    key_id: key.key_id.clone(),
                    spec: key.spec,
                    handle: key.handle.into(),
                    prepared: unwrap()?,
                }))
            })
            .map_err(unshare)?;
        if entry.serves(&key) {
            Ok(entry.prepared.clone())
        } else {
            // Another identity owns this version id in the cache (a handle presented under the wrong key, or a
            // stale entry): unwrap on its own, which authenticates the handle against the presented identity.
            unwrap()
        }
    }
}

/// Errors from a coalesced cache load are shared between the waiters (the cache may still hold a reference when
/// the loader's caller gets it), so each caller gets a copy: same kind and message, the cause as text for logs.
fn unshare(e: Arc<Error>) -> Error {
    Arc::try_unwrap(e).unwrap_or_else(|shared| {
        let copy = Error::new(shared.kind(), shared.message().to_owned());
        match shared.internal_source() {
            Some(cause) => copy.with_source(cause.to_string()),
            None => copy,
        }
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, "a key backend worker thread failed").with_source(e))?
}

fn crypto(message: &'static str) -> impl FnOnce(Unspecified) -> Error {
    move |e| Error::new(ErrorKind::DependencyFailure, message).with_source(e)
}

fn wrong_spec(spec: KeySpec, operation: &str) -> Error {
    Error::new(ErrorKind::InvalidKeyUsage, format!("a {spec} key cannot be used for {operation}"))
}

/// The cache holds the variant matching the spec that was checked; anything else is a bug.
fn mismatch() -> Error {
    Error::internal("the prepared key does not match the key's spec")
}

fn rsa_bits(spec: KeySpec) -> Option<usize> {
    match spec {
        KeySpec::Rsa2048 => Some(2048),
        KeySpec::Rsa3072 => Some(3072),
        _ => None,
    }
}

fn sha256_digest(digest: &[u8]) -> Result<Digest> {
    if digest.len() != SHA256_LEN {
        return Err(Error::invalid("a SHA-256 digest is 32 bytes"));
    }
    Digest::import_less_safe(digest, &digest::SHA256).map_err(|_| Error::invalid("a SHA-256 digest is 32 bytes"))
}

/// Parses unwrapped (or imported) material for `spec`. The material was authenticated by the handle, or comes
/// from an import, so a parse failure is an error in the material itself.
fn prepare(spec: KeySpec, material: &[u8]) -> Result<Prepared> {
    let bad = || Error::invalid(format!("the key material is not a valid {spec} key"));
    match spec {
        KeySpec::Aes256 => {
            if material.len() != SYMMETRIC_KEY_LEN {
                return Err(bad());
            }
            Ok(Prepared::Aes(aes_key(material)?))
        }
        KeySpec::Hmac256 => {
            if material.len() != SYMMETRIC_KEY_LEN {
                return Err(bad());
            }
            Ok(Prepared::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, material))))
        }
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
            let pair = RsaKeyPair::from_pkcs8(material).map_err(|e| bad().with_source(e))?;
            let private = PrivateDecryptingKey::from_pkcs8(material).map_err(|e| bad().with_source(e))?;
            if Some(private.key_size_bits()) != rsa_bits(spec) {
                return Err(Error::invalid(format!(
                    "the key material is a {}-bit RSA key, not {spec}",
                    private.key_size_bits()
                )));
            }
            let spki =
                pair.public_key().as_der().map_err(crypto("encoding an RSA public key failed"))?.as_ref().to_vec();
            let public = PublicEncryptingKey::from_der(&spki).map_err(|e| {
                Error::new(ErrorKind::DependencyFailure, "parsing an RSA public key failed").with_source(e)
            })?;
            let parsed = |alg| {
                ParsedPublicKey::new(alg, &spki).map_err(|e| {
                    Error::new(ErrorKind::DependencyFailure, "parsing an RSA public key failed").with_source(e)
                })
            };
            let pkcs1 = parsed(&RSA_PKCS1_2048_8192_SHA256)?;
            let pss = parsed(&RSA_PSS_2048_8192_SHA256)?;
            let decrypt = OaepPrivateDecryptingKey::new(private).map_err(crypto("preparing an RSA key failed"))?;
            let encrypt = OaepPublicEncryptingKey::new(public).map_err(crypto("preparing an RSA key failed"))?;
            Ok(Prepared::Rsa(Box::new(RsaKey { pair, decrypt, encrypt, pkcs1, pss, spki })))
        }
        KeySpec::EcP256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, material)
                .map_err(|e| bad().with_source(e))?;
            let spki =
                pair.public_key().as_der().map_err(crypto("encoding an EC public key failed"))?.as_ref().to_vec();
            let verify = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &spki).map_err(|e| {
                Error::new(ErrorKind::DependencyFailure, "parsing an EC public key failed").with_source(e)
            })?;
            Ok(Prepared::Ec(Box::new(EcKey { pair, verify, spki })))
        }
    }
}

/// The material a handle stores for a prepared key: the raw bytes for symmetric keys, a canonical PKCS#8 v1
/// re-encoding for asymmetric ones (imports may carry attributes or a v2 public key we do not need).
fn canonical_material(prepared: &Prepared, raw: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    match prepared {
        Prepared::Aes(_) | Prepared::Hmac(_) => Ok(Zeroizing::new(raw.to_vec())),
        Prepared::Rsa(k) => {
            let der = k.pair.as_der().map_err(crypto("encoding an RSA private key failed"))?;
            Ok(Zeroizing::new(der.as_ref().to_vec()))
        }
        Prepared::Ec(k) => {
            let doc = k.pair.to_pkcs8v1().map_err(crypto("encoding an EC private key failed"))?;
            Ok(Zeroizing::new(doc.as_ref().to_vec()))
        }
    }
}

fn aes_key(material: &[u8]) -> Result<LessSafeKey> {
    let unbound = UnboundKey::new(&AES_256_GCM, material).map_err(crypto("preparing an AES key failed"))?;
    Ok(LessSafeKey::new(unbound))
}

fn gcm_nonce(iv: &[u8]) -> Result<Nonce> {
    if iv.len() != GCM_IV_LEN {
        return Err(Error::invalid("the IV must be 12 bytes"));
    }
    Nonce::try_assume_unique_for_key(iv).map_err(|_| Error::invalid("the IV must be 12 bytes"))
}

fn aes_seal(key: &LessSafeKey, iv: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let nonce = gcm_nonce(iv)?;
    let mut out = Vec::with_capacity(plaintext.len() + GCM_TAG_LEN);
    out.extend_from_slice(plaintext);
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut out).map_err(crypto("AES-GCM encryption failed"))?;
    Ok(out)
}

fn aes_open(key: &LessSafeKey, iv: &[u8], aad: &[u8], ciphertext_and_tag: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let nonce = gcm_nonce(iv)?;
    if ciphertext_and_tag.len() < GCM_TAG_LEN {
        return Err(Error::invalid_ciphertext());
    }
    let mut buf = Zeroizing::new(ciphertext_and_tag.to_vec());
    let len = key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| Error::invalid_ciphertext())?.len();
    buf.truncate(len);
    Ok(buf)
}

/// AES-256-CBC/ECB, either direction, with aws-lc-rs. Decryption failures (a partial block, bad PKCS#7
/// padding) are invalid ciphertexts.
fn aes_block(
    material: &[u8],
    mode: AesBlockMode,
    padding: BlockPadding,
    iv: &[u8],
    input: &[u8],
    encrypt: bool,
) -> Result<Zeroizing<Vec<u8>>> {
    use aws_lc_rs::cipher::{
        AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, PaddedBlockDecryptingKey,
        PaddedBlockEncryptingKey, UnboundCipherKey,
    };
    use aws_lc_rs::iv::FixedLength;
    let key = || UnboundCipherKey::new(&AES_256, material).map_err(crypto("preparing an AES key failed"));
    let iv16 = || -> Result<[u8; AES_BLOCK_LEN]> {
        iv.try_into().map_err(|_| Error::invalid("the AES-CBC IV must be 16 bytes"))
    };
    let whole_blocks = !input.is_empty() && input.len().is_multiple_of(AES_BLOCK_LEN);
    let mut buf = Zeroizing::new(input.to_vec());
    if encrypt {
        if padding == BlockPadding::NoPadding && !whole_blocks {
            return Err(Error::invalid("without padding the plaintext must be whole 16-byte blocks"));
        }
        let context = match mode {
            AesBlockMode::Cbc => EncryptionContext::Iv128(FixedLength::from(iv16()?)),
            AesBlockMode::Ecb => EncryptionContext::None,
        };
        let failed = crypto("AES block encryption failed");
        match (mode, padding) {
            (AesBlockMode::Cbc, BlockPadding::Pkcs7) => {
                PaddedBlockEncryptingKey::cbc_pkcs7(key()?).and_then(|k| k.less_safe_encrypt(&mut *buf, context))
            }
            (AesBlockMode::Ecb, BlockPadding::Pkcs7) => {
                PaddedBlockEncryptingKey::ecb_pkcs7(key()?).and_then(|k| k.less_safe_encrypt(&mut *buf, context))
            }
            (AesBlockMode::Cbc, BlockPadding::NoPadding) => {
                EncryptingKey::cbc(key()?).and_then(|k| k.less_safe_encrypt(buf.as_mut_slice(), context))
            }
            (AesBlockMode::Ecb, BlockPadding::NoPadding) => {
                EncryptingKey::ecb(key()?).and_then(|k| k.less_safe_encrypt(buf.as_mut_slice(), context))
            }
        }
        .map_err(failed)?;
        return Ok(buf);
    }
    if !whole_blocks {
        return Err(Error::invalid_ciphertext());
    }
    let context = match mode {
        AesBlockMode::Cbc => DecryptionContext::Iv128(FixedLength::from(iv16()?)),
        AesBlockMode::Ecb => DecryptionContext::None,
    };
    let len = match (mode, padding) {
        (AesBlockMode::Cbc, BlockPadding::Pkcs7) => PaddedBlockDecryptingKey::cbc_pkcs7(key()?)
            .and_then(|k| k.decrypt(buf.as_mut_slice(), context).map(|p| p.len())),
        (AesBlockMode::Ecb, BlockPadding::Pkcs7) => PaddedBlockDecryptingKey::ecb_pkcs7(key()?)
            .and_then(|k| k.decrypt(buf.as_mut_slice(), context).map(|p| p.len())),
        (AesBlockMode::Cbc, BlockPadding::NoPadding) => {
            DecryptingKey::cbc(key()?).and_then(|k| k.decrypt(buf.as_mut_slice(), context).map(|p| p.len()))
        }
        (AesBlockMode::Ecb, BlockPadding::NoPadding) => {
            DecryptingKey::ecb(key()?).and_then(|k| k.decrypt(buf.as_mut_slice(), context).map(|p| p.len()))
        }
    }
    .map_err(|_| Error::invalid_ciphertext())?;
    // Decryption is in place and the plaintext is a prefix of the buffer.
    buf.truncate(len);
    Ok(buf)
}

/// Test case 14 of the GCM specification (McGrew and Viega): AES-256, zero key and IV, one zero block. Catches a
/// miscompiled or mislinked cipher that a round trip alone would not (an identity "cipher" round-trips).
fn aes_gcm_known_answer() -> Result<()> {
    const EXPECTED: [u8; 32] = [
        0xce, 0xa7, 0x40, 0x3d, 0x4d, 0x60, 0x6b, 0x6e, 0x07, 0x4e, 0xc5, 0xd3, 0xba, 0xf3, 0x9d, 0x18, 0xd0, 0xd1,
        0xc8, 0xa7, 0x99, 0x99, 0x6b, 0xf0, 0x26, 0x5b, 0x98, 0xb5, 0xd4, 0x8a, 0xb9, 0x19,
    ];
    let key = aes_key(&[0u8; 32])?;
    let sealed = aes_seal(&key, &[0u8; GCM_IV_LEN], &[], &[0u8; 16])?;
    if sealed.as_slice() != EXPECTED.as_slice() {
        return Err(Error::new(ErrorKind::DependencyFailure, "the AES-GCM known-answer test failed"));
    }
    Ok(())
}

fn rsa_sign(key: &RsaKey, alg: SigningAlgorithm, digest: &Digest) -> Result<Vec<u8>> {
    let encoding: &'static dyn RsaEncoding = match alg {
        SigningAlgorithm::RsaPkcs1Sha256 => &RSA_PKCS1_SHA256,
        SigningAlgorithm::RsaPssSha256 => &RSA_PSS_SHA256,
        SigningAlgorithm::EcdsaSha256 => return Err(mismatch()),
    };
    let mut signature = vec![0u8; key.pair.public_modulus_len()];
    key.pair.sign_digest(encoding, digest, &mut signature).map_err(crypto("RSA signing failed"))?;
    Ok(signature)
}

#[async_trait]
impl KeyBackend for SoftwareBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "software"
    }

    async fn generate(&self, key_id: &KeyId, version: Uuid, spec: KeySpec, _usage: KeyUsageSet) -> Result<Vec<u8>> {
        match spec {
            KeySpec::Aes256 | KeySpec::Hmac256 => {
                let mut material = Zeroizing::new([0u8; SYMMETRIC_KEY_LEN]);
                rand::fill(material.as_mut_slice()).map_err(crypto("the random generator failed"))?;
                self.wrap(key_id, version, spec, material.as_slice())
            }
            KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
                let size = if spec == KeySpec::Rsa2048 { KeySize::Rsa2048 } else { KeySize::Rsa3072 };
                let inner = self.inner.clone();
                let key_id = key_id.clone();
                blocking(move || {
                    let pair = RsaKeyPair::generate(size).map_err(crypto("RSA key generation failed"))?;
                    let der = pair.as_der().map_err(crypto("encoding an RSA private key failed"))?;
                    let material = Zeroizing::new(der.as_ref().to_vec());
                    handle::wrap(&inner.kek, &KeyMaterialRef { key_id: &key_id, version, spec, handle: &[] }, &material)
                })
                .await
            }
            KeySpec::EcP256 => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                    .map_err(crypto("EC key generation failed"))?;
                let doc = pair.to_pkcs8v1().map_err(crypto("encoding an EC private key failed"))?;
                let material = Zeroizing::new(doc.as_ref().to_vec());
                self.wrap(key_id, version, spec, &material)
            }
        }
    }

    async fn import(
        &self,
        key_id: &KeyId,
        version: Uuid,
        spec: KeySpec,
        _usage: KeyUsageSet,
        material: &[u8],
    ) -> Result<Vec<u8>> {
        if spec.is_symmetric() {
            if material.len() != SYMMETRIC_KEY_LEN {
                return Err(Error::invalid(format!(
                    "{spec} key material must be {SYMMETRIC_KEY_LEN} raw bytes, found {}",
                    material.len()
                )));
            }
            return self.wrap(key_id, version, spec, material);
        }
        let inner = self.inner.clone();
        let key_id = key_id.clone();
        let material = Zeroizing::new(material.to_vec());
        let run = move || {
            let prepared = prepare(spec, &material)?;
            let canonical = canonical_material(&prepared, &material)?;
            handle::wrap(&inner.kek, &KeyMaterialRef { key_id: &key_id, version, spec, handle: &[] }, &canonical)
        };
        if spec.is_rsa() { blocking(run).await } else { run() }
    }

    async fn aes_gcm_encrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if key.spec != KeySpec::Aes256 {
            return Err(wrong_spec(key.spec, "AES-GCM encryption"));
        }
        gcm_nonce(iv)?;
        let prepared = self.prepared(key).await?;
        if plaintext.len() + aad.len() <= INLINE_LIMIT {
            let Prepared::Aes(k) = &*prepared else { return Err(mismatch()) };
            return aes_seal(k, iv, aad, plaintext);
        }
        let (iv, aad, plaintext) = (iv.to_vec(), aad.to_vec(), Zeroizing::new(plaintext.to_vec()));
        blocking(move || {
            let Prepared::Aes(k) = &*prepared else { return Err(mismatch()) };
            aes_seal(k, &iv, &aad, &plaintext)
        })
        .await
    }

    async fn aes_gcm_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if key.spec != KeySpec::Aes256 {
            return Err(wrong_spec(key.spec, "AES-GCM decryption"));
        }
        gcm_nonce(iv)?;
        if ciphertext_and_tag.len() < GCM_TAG_LEN {
            return Err(Error::invalid_ciphertext());
        }
        let prepared = self.prepared(key).await?;
        if ciphertext_and_tag.len() + aad.len() <= INLINE_LIMIT {
            let Prepared::Aes(k) = &*prepared else { return Err(mismatch()) };
            return aes_open(k, iv, aad, ciphertext_and_tag);
        }
        let (iv, aad, ciphertext) = (iv.to_vec(), aad.to_vec(), ciphertext_and_tag.to_vec());
        blocking(move || {
            let Prepared::Aes(k) = &*prepared else { return Err(mismatch()) };
            aes_open(k, &iv, &aad, &ciphertext)
        })
        .await
    }

    async fn aes_block_encrypt(
        &self,
        key: KeyMaterialRef<'_>,
        mode: AesBlockMode,
        padding: BlockPadding,
        iv: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if key.spec != KeySpec::Aes256 {
            return Err(wrong_spec(key.spec, "AES block encryption"));
        }
        // The prepared-key cache holds GCM schedules only; these rarely used modes unwrap the material per call
        // (payloads are a few KB at most, so the work stays inline).
        let material = handle::unwrap(&self.inner.kek, &key)?;
        aes_block(&material, mode, padding, iv, plaintext, true).map(|out| out.to_vec())
    }

    async fn aes_block_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        mode: AesBlockMode,
        padding: BlockPadding,
        iv: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if key.spec != KeySpec::Aes256 {
            return Err(wrong_spec(key.spec, "AES block decryption"));
        }
        let material = handle::unwrap(&self.inner.kek, &key)?;
        aes_block(&material, mode, padding, iv, ciphertext, false)
    }

    async fn rsa_oaep_encrypt(&self, key: KeyMaterialRef<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        if !key.spec.is_rsa() {
            return Err(wrong_spec(key.spec, "RSA-OAEP encryption"));
        }
        let prepared = self.prepared(key).await?;
        let Prepared::Rsa(k) = &*prepared else { return Err(mismatch()) };
        // A public-key operation (small exponent) is cheap enough to run inline.
        if plaintext.len() > k.encrypt.max_plaintext_size(&OAEP_SHA256_MGF1SHA256) {
            return Err(Error::invalid("the plaintext is too long for RSA-OAEP-SHA256 with this key"));
        }
        let mut out = vec![0u8; k.encrypt.ciphertext_size()];
        let len = k
            .encrypt
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(crypto("RSA-OAEP encryption failed"))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    async fn rsa_oaep_decrypt(&self, key: KeyMaterialRef<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if !key.spec.is_rsa() {
            return Err(wrong_spec(key.spec, "RSA-OAEP decryption"));
        }
        let prepared = self.prepared(key).await?;
        let Prepared::Rsa(k) = &*prepared else { return Err(mismatch()) };
        if ciphertext.len() != k.decrypt.key_size_bytes() {
            return Err(Error::invalid_ciphertext());
        }
        let ciphertext = ciphertext.to_vec();
        blocking(move || {
            let Prepared::Rsa(k) = &*prepared else { return Err(mismatch()) };
            let mut out = Zeroizing::new(vec![0u8; k.decrypt.min_output_size()]);
            // Every decryption failure looks the same to the caller (no padding oracle).
            let len = k
                .decrypt
                .decrypt(&OAEP_SHA256_MGF1SHA256, &ciphertext, &mut out, None)
                .map_err(|_| Error::invalid_ciphertext())?
                .len();
            out.truncate(len);
            Ok(out)
        })
        .await
    }

    async fn sign_digest(&self, key: KeyMaterialRef<'_>, alg: SigningAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        if !alg.fits(key.spec) {
            return Err(wrong_spec(key.spec, "this signing algorithm"));
        }
        let digest = sha256_digest(digest)?;
        let prepared = self.prepared(key).await?;
        match &*prepared {
            Prepared::Rsa(_) => {
                blocking(move || {
                    let Prepared::Rsa(k) = &*prepared else { return Err(mismatch()) };
                    rsa_sign(k, alg, &digest)
                })
                .await
            }
            // P-256 signing takes tens of microseconds: inline.
            Prepared::Ec(k) => {
                let signature = k.pair.sign_digest(&digest).map_err(crypto("ECDSA signing failed"))?;
                Ok(signature.as_ref().to_vec())
            }
            Prepared::Aes(_) | Prepared::Hmac(_) => Err(mismatch()),
        }
    }

    async fn verify_digest(
        &self,
        key: KeyMaterialRef<'_>,
        alg: SigningAlgorithm,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool> {
        if !alg.fits(key.spec) {
            return Err(wrong_spec(key.spec, "this signing algorithm"));
        }
        let digest = sha256_digest(digest)?;
        let prepared = self.prepared(key).await?;
        // Public-key operations: inline.
        let public = match (&*prepared, alg) {
            (Prepared::Rsa(k), SigningAlgorithm::RsaPkcs1Sha256) => &k.pkcs1,
            (Prepared::Rsa(k), SigningAlgorithm::RsaPssSha256) => &k.pss,
            (Prepared::Ec(k), SigningAlgorithm::EcdsaSha256) => &k.verify,
            _ => return Err(mismatch()),
        };
        Ok(public.verify_digest_sig(&digest, signature).is_ok())
    }

    async fn public_key_der(&self, key: KeyMaterialRef<'_>) -> Result<Vec<u8>> {
        if key.spec.is_symmetric() {
            return Err(Error::new(ErrorKind::InvalidKeyUsage, "a symmetric key has no public key"));
        }
        let prepared = self.prepared(key).await?;
        match &*prepared {
            Prepared::Rsa(k) => Ok(k.spki.clone()),
            Prepared::Ec(k) => Ok(k.spki.clone()),
            Prepared::Aes(_) | Prepared::Hmac(_) => Err(mismatch()),
        }
    }

    async fn hmac_sha256(&self, key: KeyMaterialRef<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if key.spec != KeySpec::Hmac256 {
            return Err(wrong_spec(key.spec, "HMAC-SHA256"));
        }
        let prepared = self.prepared(key).await?;
        if data.len() <= INLINE_LIMIT {
            let Prepared::Hmac(k) = &*prepared else { return Err(mismatch()) };
            return Ok(hmac::sign(k, data).as_ref().to_vec());
        }
        let data = data.to_vec();
        blocking(move || {
            let Prepared::Hmac(k) = &*prepared else { return Err(mismatch()) };
            Ok(hmac::sign(k, &data).as_ref().to_vec())
        })
        .await
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>> {
        if len > MAX_RANDOM_LEN {
            return Err(Error::invalid(format!("at most {MAX_RANDOM_LEN} random bytes can be requested at once")));
        }
        let mut out = vec![0u8; len];
        rand::fill(&mut out).map_err(crypto("the random generator failed"))?;
        Ok(out)
    }

    /// Software material lives only in the store's handle, which the store deletes; all there is to do here is
    /// drop the prepared copy from memory.
    async fn destroy(&self, key: KeyMaterialRef<'_>) -> Result<()> {
        self.inner.cache.invalidate(&key.version);
        Ok(())
    }

    async fn health(&self) -> Vec<MemberHealth> {
        let (status, detail) = match self.self_test() {
            Ok(()) => (HealthStatus::Active, String::new()),
            Err(e) => {
                tracing::error!(backend = %self.name, error = ?e, "software keystore self-test failed");
                (HealthStatus::Unavailable, format!("self-test failed: {}", e.message()))
            }
        };
        vec![MemberHealth {
            id: self.name.clone(),
            model: format!("kmsgate software keystore {}", env!("CARGO_PKG_VERSION")),
            status,
            detail,
        }]
    }
}
