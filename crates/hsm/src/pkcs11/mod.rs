//! The PKCS#11 backend: keys live in an HSM token, non-extractable, and every private or secret key operation
//! runs in the HSM through `cryptoki`.
//!
//! One [`Pkcs11Backend`] is one fleet member (a token found by label in a module) with its own pool of
//! logged-in sessions; the server registers one backend per `[[backend.pkcs11]]` entry, and each key version
//! records the member that holds it.
//!
//! # Operations
//!
//! | operation | mechanism | notes |
//! |---|---|---|
//! | AES-256-GCM | `CKM_AES_GCM`, caller IV (12 bytes), AAD, 128-bit tag | output `ciphertext \|\| tag`, the software backend's layout |
//! | RSA PKCS#1 v1.5 signature | `CKM_RSA_PKCS` over `DigestInfo(SHA-256) \|\| digest` | the token signs the caller's digest |
//! | RSA-PSS signature | `CKM_RSA_PKCS_PSS`, SHA-256, MGF1-SHA-256, 32-byte salt | over the digest |
//! | ECDSA P-256 signature | `CKM_ECDSA` over the digest | raw `r \|\| s` re-encoded as DER `Ecdsa-Sig-Value` |
//! | RSA-OAEP-SHA-256 decryption | `CKM_RSA_PKCS_OAEP` (SHA-256, MGF1-SHA-256) | tokens that only do OAEP with SHA-1 (SoftHSM 2.6): `CKM_RSA_X_509` and a constant-time OAEP decoder |
//! | HMAC-SHA-256 | `CKM_SHA256_HMAC` with a 32-byte `CKK_GENERIC_SECRET` key | |
//! | random | `C_GenerateRandom` | |
//! | verification, RSA-OAEP encryption | in software (aws-lc-rs) with the public key read from the token | public-key operations need no secret; this spares HSM capacity |
//!
//! # Handles
//!
//! See [`locator`] for the layout; in short: a format byte, a locator kind, and the `CKA_ID` (keys kmsgate
//! created or adopted by id) or the `CKA_LABEL` (adopted by label).

mod config;
mod der;
mod locator;
mod module;
mod oaep;
mod pool;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::digest::{Digest, SHA256};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;
use kmsgate_core::backend::{GCM_IV_LEN, GCM_TAG_LEN};
use kmsgate_core::{
    AesBlockMode, BlockPadding, Error, ErrorKind, HealthStatus, KeyBackend, KeyId, KeyMaterialRef, KeySpec, KeyUsage,
    KeyUsageSet, MemberHealth, Result, SigningAlgorithm,
};
use serde::Serialize;
use uuid::Uuid;
use zeroize::Zeroizing;

pub use config::Pkcs11Config;
pub use module::LibraryInfo;
pub use pool::TokenSummary;

use locator::{GENERATED_ID_LEN, Locator, LocatorKind, label_for};
use module::Module;
use pool::{Ctx, Member, OAEP_NATIVE, OAEP_RAW, Op, OwnedKey, P11Result, Pool};

/// Symmetric key length for AES_256 and HMAC_256.
const SYMMETRIC_KEY_LEN: usize = 32;
const SHA256_LEN: usize = 32;
/// Upper bound for one `random` call (the dispatcher asks for at most 1024 bytes).
const MAX_RANDOM_LEN: usize = 64 * 1024;
/// `DigestInfo` prefix of a SHA-256 digest (RFC 8017 §9.2 note 1): `CKM_RSA_PKCS` signs whatever it is given,
/// so the caller supplies the encoding `CKM_SHA256_RSA_PKCS` would have built.
const SHA256_DIGEST_INFO: [u8; 19] =
    [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];
const RSA_PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];
const GCM_TAG_BITS: u64 = (GCM_TAG_LEN * 8) as u64;

/// A valid address for an empty AAD. cryptoki passes `aad.as_ptr()` as `pAAD`; an empty `Vec` would hand the
/// token a dangling (non-null) pointer, and some modules read `pAAD` before looking at `ulAADLen`.
static NO_AAD: [u8; 1] = [0];

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A public key read from the token, parsed once for the software-side public operations.
pub(crate) struct PublicKey {
    spki: Vec<u8>,
    kind: PublicKind,
}

enum PublicKind {
    Rsa { pkcs1: ParsedPublicKey, pss: ParsedPublicKey, oaep: OaepPublicEncryptingKey },
    Ec { verify: ParsedPublicKey },
}

impl PublicKey {
    fn from_spki(spec: KeySpec, spki: Vec<u8>) -> Result<Self> {
        let bad = |e: aws_lc_rs::error::KeyRejected| {
            Error::new(ErrorKind::DependencyFailure, "the HSM returned an unusable public key").with_source(e)
        };
        let kind = match spec {
            KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
                let public = PublicEncryptingKey::from_der(&spki).map_err(bad)?;
                let expected = if spec == KeySpec::Rsa2048 { 2048 } else { 3072 };
                if public.key_size_bits() != expected {
                    return Err(Error::internal(format!(
                        "the HSM key is a {}-bit RSA key, not {spec}",
                        public.key_size_bits()
                    )));
                }
                let oaep = OaepPublicEncryptingKey::new(public).map_err(|e| {
                    Error::new(ErrorKind::DependencyFailure, "the HSM returned an unusable public key").with_source(e)
                })?;
                PublicKind::Rsa {
                    pkcs1: ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &spki).map_err(bad)?,
                    pss: ParsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &spki).map_err(bad)?,
                    oaep,
                }
            }
            KeySpec::EcP256 => {
                PublicKind::Ec { verify: ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &spki).map_err(bad)? }
            }
            KeySpec::Aes256 | KeySpec::Hmac256 => {
                return Err(Error::new(ErrorKind::InvalidKeyUsage, "a symmetric key has no public key"));
            }
        };
        Ok(PublicKey { spki, kind })
    }
}

/// How to find an existing HSM key to adopt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdoptBy {
    /// `CKA_LABEL`.
    Label(String),
    /// `CKA_ID` bytes.
    Id(Vec<u8>),
}

/// An existing HSM key, inspected: what [`Dispatcher::adopt_key`](kmsgate_core::Dispatcher::adopt_key) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedKey {
    pub spec: KeySpec,
    /// The handle to record (locates the key by `CKA_ID` when it has a unique one, else by label).
    pub handle: Vec<u8>,
    /// The usages the token's attributes permit (`CKA_ENCRYPT`, `CKA_SIGN`, ...), within the spec's.
    pub permitted: KeyUsageSet,
    pub label: String,
    pub id: Vec<u8>,
    /// `CKA_EXTRACTABLE`: the key can leave the HSM (wrapped), which an operator may want to know.
    pub extractable: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
}

/// The session pool of a member, for `kmsgate hsm status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Configured sessions (worker threads).
    pub size: usize,
    /// Sessions open now.
    pub open: usize,
    /// Sessions running a call now.
    pub in_use: usize,
    /// Requests queued for a session.
    pub waiting: usize,
    pub queue_capacity: usize,
    /// Workers whose last attempt to open a session failed.
    pub failing: usize,
    pub sessions_opened: u64,
    pub sessions_evicted: u64,
    /// Module re-initialisations that brought this member back.
    pub recoveries: u64,
    /// Calls that missed the member's deadline.
    pub timeouts: u64,
    /// Calls refused because the queue was full.
    pub rejected_queue_full: u64,
    /// Queued calls skipped because their caller had given up.
    pub abandoned: u64,
}

/// One slot of the member's module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    pub id: u64,
    pub description: String,
    pub token_present: bool,
    /// The token's label when present and readable.
    pub token_label: Option<String>,
}

/// Everything `kmsgate hsm status` shows about one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pkcs11Status {
    pub name: String,
    pub module: String,
    pub token_label: String,
    pub library: Option<LibraryInfo>,
    /// The slot the token was found in (changes when a token is re-initialised).
    pub slot: Option<u64>,
    pub token: Option<TokenSummary>,
    pub health: MemberHealth,
    pub pool: PoolStatus,
    /// Every slot of the module, so a wrong label is easy to spot.
    pub slots: Vec<SlotStatus>,
}

/// A PKCS#11 fleet member as a [`KeyBackend`]. Dropping it stops its threads and closes its sessions.
pub struct Pkcs11Backend {
    pool: Pool,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("name", &self.pool.member.name())
            .field("module", &self.pool.member.module.path)
            .field("token_label", &self.pool.member.config.token_label)
            .finish_non_exhaustive()
    }
}

fn wrong_spec(spec: KeySpec, operation: &str) -> Error {
    Error::new(ErrorKind::InvalidKeyUsage, format!("a {spec} key cannot be used for {operation}"))
}

fn owned(key: &KeyMaterialRef<'_>) -> OwnedKey {
    OwnedKey { key_id: key.key_id.clone(), version: key.version, spec: key.spec, handle: key.handle.to_vec() }
}

fn aad_for_token(aad: &[u8]) -> &[u8] {
    if aad.is_empty() { &NO_AAD[..0] } else { aad }
}

fn gcm_iv(iv: &[u8]) -> Result<[u8; GCM_IV_LEN]> {
    iv.try_into().map_err(|_| Error::invalid("the IV must be 12 bytes"))
}

const AES_BLOCK: usize = kmsgate_core::backend::AES_BLOCK_LEN;

/// PKCS#11 has no padded ECB mechanism: ECB with PKCS#7 pads here and runs `CKM_AES_ECB`.
fn pkcs7_pad(data: &[u8]) -> Zeroizing<Vec<u8>> {
    let n = AES_BLOCK - data.len() % AES_BLOCK;
    let mut out = Zeroizing::new(Vec::with_capacity(data.len() + n));
    out.extend_from_slice(data);
    // n is 1..=16, so it fits a byte.
    out.resize(data.len() + n, u8::try_from(n).unwrap_or(16));
    out
}

/// Strips PKCS#7 padding; malformed padding is an invalid ciphertext.
fn pkcs7_unpad(mut data: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>> {
    let n = usize::from(data.last().copied().unwrap_or(0));
    if n == 0 || n > AES_BLOCK || n > data.len() || !data[data.len() - n..].iter().all(|b| usize::from(*b) == n) {
        return Err(Error::invalid_ciphertext());
    }
    let len = data.len() - n;
    data.truncate(len);
    Ok(data)
}

/// An AES block mechanism as plain data: `Mechanism` holds raw pointers and cannot cross to the pool thread.
#[derive(Clone, Copy)]
enum BlockMechanism {
    CbcPad([u8; AES_BLOCK]),
    Cbc([u8; AES_BLOCK]),
    Ecb,
}

impl BlockMechanism {
    /// ECB with PKCS#7 is `CKM_AES_ECB` over data padded here.
    fn of(mode: AesBlockMode, padding: BlockPadding, iv: &[u8]) -> Result<Self> {
        let iv16 = || -> Result<[u8; AES_BLOCK]> {
            iv.try_into().map_err(|_| Error::invalid("the AES-CBC IV must be 16 bytes"))
        };
        Ok(match (mode, padding) {
            (AesBlockMode::Cbc, BlockPadding::Pkcs7) => BlockMechanism::CbcPad(iv16()?),
            (AesBlockMode::Cbc, BlockPadding::NoPadding) => BlockMechanism::Cbc(iv16()?),
            (AesBlockMode::Ecb, _) => BlockMechanism::Ecb,
        })
    }

    fn mechanism(self) -> Mechanism<'static> {
        match self {
            BlockMechanism::CbcPad(iv) => Mechanism::AesCbcPad(iv),
            BlockMechanism::Cbc(iv) => Mechanism::AesCbc(iv),
            BlockMechanism::Ecb => Mechanism::AesEcb,
        }
    }
}

fn modulus_len(spec: KeySpec) -> usize {
    if spec == KeySpec::Rsa3072 { 384 } else { 256 }
}

/// The attributes kmsgate sets on the objects it creates, from the key's usage. Verification of MACs is done by
/// recomputing them (`C_Sign`), so an HMAC key that may verify needs `CKA_SIGN` too.
fn key_templates(spec: KeySpec, usage: KeyUsageSet, id: &[u8], label: &str) -> (Vec<Attribute>, Vec<Attribute>) {
    let has = |u: KeyUsage| usage.contains(u);
    let common = |class: ObjectClass, key_type: KeyType| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(key_type),
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ]
    };
    let secret = |key_type: KeyType| {
        let mut t = common(ObjectClass::SECRET_KEY, key_type);
        t.extend([Attribute::Private(true), Attribute::Sensitive(true), Attribute::Extractable(false)]);
        t
    };
    let private = |key_type: KeyType| {
        let mut t = common(ObjectClass::PRIVATE_KEY, key_type);
        t.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(false),
        ]);
        t
    };
    match spec {
        KeySpec::Aes256 => {
            let mut t = secret(KeyType::AES);
            t.extend([
                Attribute::ValueLen((SYMMETRIC_KEY_LEN as u64).into()),
                Attribute::Encrypt(has(KeyUsage::Encrypt) || has(KeyUsage::Wrap)),
                Attribute::Decrypt(has(KeyUsage::Decrypt) || has(KeyUsage::Unwrap)),
            ]);
            (t, Vec::new())
        }
        KeySpec::Hmac256 => {
            let mut t = secret(KeyType::GENERIC_SECRET);
            t.extend([
                Attribute::ValueLen((SYMMETRIC_KEY_LEN as u64).into()),
                Attribute::Sign(has(KeyUsage::GenerateMac) || has(KeyUsage::VerifyMac)),
                Attribute::Verify(has(KeyUsage::VerifyMac)),
            ]);
            (t, Vec::new())
        }
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
            let bits: u64 = if spec == KeySpec::Rsa2048 { 2048 } else { 3072 };
            let mut public = common(ObjectClass::PUBLIC_KEY, KeyType::RSA);
            public.extend([
                Attribute::Private(false),
                Attribute::ModulusBits(bits.into()),
                Attribute::PublicExponent(RSA_PUBLIC_EXPONENT.to_vec()),
                Attribute::Verify(has(KeyUsage::Verify)),
                Attribute::Encrypt(has(KeyUsage::Encrypt) || has(KeyUsage::Wrap)),
            ]);
            let mut private = private(KeyType::RSA);
            private.extend([
                Attribute::Sign(has(KeyUsage::Sign)),
                Attribute::Decrypt(has(KeyUsage::Decrypt) || has(KeyUsage::Unwrap)),
            ]);
            (private, public)
        }
        KeySpec::EcP256 => {
            let mut public = common(ObjectClass::PUBLIC_KEY, KeyType::EC);
            public.extend([
                Attribute::Private(false),
                Attribute::EcParams(der::OID_P256.to_vec()),
                Attribute::Verify(has(KeyUsage::Verify)),
            ]);
            let mut private = private(KeyType::EC);
            private.push(Attribute::Sign(has(KeyUsage::Sign)));
            (private, public)
        }
    }
}

fn generate_objects(s: &Session, spec: KeySpec, usage: KeyUsageSet, id: &[u8], label: &str) -> P11Result<()> {
    let (key, public) = key_templates(spec, usage, id, label);
    match spec {
        KeySpec::Aes256 => s.generate_key(&Mechanism::AesKeyGen, &key).map(drop),
        KeySpec::Hmac256 => s.generate_key(&Mechanism::GenericSecretKeyGen, &key).map(drop),
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
            s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &key).map(drop)
        }
        KeySpec::EcP256 => s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &key).map(drop),
    }
}

/// Serialises the changes this process makes to token objects (generate, create, destroy). SoftHSMv2's file
/// object store is not safe for concurrent object creation from several sessions: now and then a create fails
/// with `CKR_GENERAL_ERROR` or `CKR_TEMPLATE_INCONSISTENT` (SoftHSMv2 issue #573). Object changes are rare
/// (key generation, import, destruction), so one lock for the whole process costs nothing on the crypto path,
/// and it also covers several backends on one module, which share the library's single object store.
static OBJECT_CHANGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn object_changes() -> std::sync::MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic while it was held leaves nothing inconsistent behind.
    OBJECT_CHANGES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates objects under [`object_changes`], once more after `CKR_TEMPLATE_INCONSISTENT` or
/// `CKR_GENERAL_ERROR`: SoftHSM's file object store can re-read a half-written new object while another
/// session searches the token, and then reports a failure for a template that is fine. Anything the failed
/// attempt left behind is removed first. (A real failure fails twice, at the cost of one more call.)
fn create_with_retry(
    ctx: &mut Ctx<'_>,
    op: Op,
    id: &[u8],
    label: &str,
    mut create: impl FnMut(&Session) -> P11Result<()>,
) -> Result<()> {
    let _changes = object_changes();
    let mut first = true;
    loop {
        let result = ctx.with_session_once(op, |s| match create(s) {
            Err(P11Error::Pkcs11(RvError::TemplateInconsistent | RvError::GeneralError, _)) if first => Ok(false),
            other => other.map(|()| true),
        })?;
        if result {
            return Ok(());
        }
        first = false;
        destroy_generated_locked(ctx, id, label)?;
    }
}

/// Destroys the objects kmsgate created for one key version: those with its `CKA_ID` *and* its label, so a
/// foreign object that happens to share the id is never touched.
fn destroy_generated(ctx: &mut Ctx<'_>, id: &[u8], label: &str) -> Result<usize> {
    let _changes = object_changes();
    destroy_generated_locked(ctx, id, label)
}

/// [`destroy_generated`] for a caller that holds [`object_changes`] already.
fn destroy_generated_locked(ctx: &mut Ctx<'_>, id: &[u8], label: &str) -> Result<usize> {
    ctx.with_session(Op::Destroy, |s| {
        let objects = s.find_objects(&[
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        let mut destroyed = 0;
        for o in objects {
            match s.destroy_object(o) {
                Ok(()) => destroyed += 1,
                // Already gone (a concurrent destroy): the goal is reached.
                Err(P11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(destroyed)
    })
}

/// The public key of an asymmetric key version as DER SPKI, from the private key's `CKA_MODULUS` /
/// `CKA_PUBLIC_EXPONENT` (RSA) or the public key object's `CKA_EC_POINT` (EC; SoftHSM keeps no point on the
/// private half).
fn read_spki(ctx: &mut Ctx<'_>, key: &OwnedKey) -> Result<Vec<u8>> {
    let spec = key.spec;
    let attrs = ctx.with_key(key, Op::Attributes, |s, o| {
        let wanted: &[AttributeType] = match spec {
            KeySpec::Rsa2048 | KeySpec::Rsa3072 => &[AttributeType::Modulus, AttributeType::PublicExponent],
            _ => &[AttributeType::EcPoint],
        };
        let mut attrs = match (spec, o.public) {
            (KeySpec::EcP256, Some(public)) => s.get_attributes(public, wanted)?,
            _ => s.get_attributes(o.key, wanted)?,
        };
        if attrs.len() < wanted.len()
            && let Some(public) = o.public
        {
            attrs = s.get_attributes(public, wanted)?;
        }
        Ok(attrs)
    })?;
    let (mut modulus, mut exponent, mut point) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    let unavailable = || Error::new(ErrorKind::DependencyFailure, "the HSM does not reveal this key's public key");
    match spec {
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => match (modulus, exponent) {
            (Some(m), Some(e)) => Ok(der::rsa_spki(&m, &e)),
            _ => Err(unavailable()),
        },
        KeySpec::EcP256 => {
            let point = point.ok_or_else(unavailable)?;
            let raw = der::ec_point(&point).ok_or_else(|| {
                Error::new(ErrorKind::DependencyFailure, "the HSM returned an EC point that is not uncompressed P-256")
            })?;
            Ok(der::ec_p256_spki(raw))
        }
        KeySpec::Aes256 | KeySpec::Hmac256 => {
            Err(Error::new(ErrorKind::InvalidKeyUsage, "a symmetric key has no public key"))
        }
    }
}

/// What an existing object is, from its attributes.
fn inspect(ctx: &mut Ctx<'_>, by: &AdoptBy) -> Result<AdoptedKey> {
    let search = match by {
        AdoptBy::Label(l) => Attribute::Label(l.as_bytes().to_vec()),
        AdoptBy::Id(id) => Attribute::Id(id.clone()),
    };
    let found = ctx.with_session(Op::Admin, |s| {
        let mut found = Vec::new();
        for class in [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY] {
            for o in s.find_objects(&[Attribute::Token(true), Attribute::Class(class), search.clone()])? {
                found.push((class, o));
            }
        }
        Ok(found)
    })?;
    let (class, object) = match found.as_slice() {
        [] => {
            return Err(Error::new(
                ErrorKind::KeyNotFound,
                "no secret or private key with that label or id is on the token",
            ));
        }
        [one] => *one,
        many => {
            return Err(Error::invalid(format!(
                "{} keys on the token match; adopt by a unique label or id",
                many.len()
            )));
        }
    };
    let attrs = ctx.with_session(Op::Admin, |s| {
        s.get_attributes(
            object,
            &[
                AttributeType::KeyType,
                AttributeType::Id,
                AttributeType::Label,
                AttributeType::ValueLen,
                AttributeType::Modulus,
                AttributeType::EcParams,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Sign,
                AttributeType::Sensitive,
                AttributeType::Extractable,
            ],
        )
    })?;
    let mut key_type = None;
    let (mut id, mut label, mut value_len, mut modulus, mut ec_params) = (Vec::new(), Vec::new(), None, None, None);
    let (mut encrypt, mut decrypt, mut sign, mut sensitive, mut extractable) = (false, false, false, false, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Id(v) => id = v,
            Attribute::Label(v) => label = v,
            Attribute::ValueLen(v) => value_len = Some(usize::from(v)),
            Attribute::Modulus(v) => modulus = Some(v),
            Attribute::EcParams(v) => ec_params = Some(v),
            Attribute::Encrypt(v) => encrypt = v,
            Attribute::Decrypt(v) => decrypt = v,
            Attribute::Sign(v) => sign = v,
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            _ => {}
        }
    }
    let key_type =
        key_type.ok_or_else(|| Error::new(ErrorKind::DependencyFailure, "the HSM did not report the key type"))?;
    let unsupported = |what: String| {
        Error::new(
            ErrorKind::Unsupported,
            format!("{what}; kmsgate adopts AES-256, 32-byte HMAC, RSA-2048/3072 and EC P-256 keys"),
        )
    };
    let spec = if class == ObjectClass::SECRET_KEY {
        match (key_type, value_len) {
            (t, Some(SYMMETRIC_KEY_LEN)) if t == KeyType::AES => KeySpec::Aes256,
            (t, Some(SYMMETRIC_KEY_LEN)) if t == KeyType::GENERIC_SECRET || t == KeyType::SHA256_HMAC => {
                KeySpec::Hmac256
            }
            (t, len) => return Err(unsupported(format!("the key is a {t} secret of {len:?} bytes"))),
        }
    } else if key_type == KeyType::RSA {
        match modulus.as_deref().map(der::bit_len) {
            Some(2048) => KeySpec::Rsa2048,
            Some(3072) => KeySpec::Rsa3072,
            bits => return Err(unsupported(format!("the key is a {bits:?}-bit RSA key"))),
        }
    } else if key_type == KeyType::EC {
        if ec_params.as_deref() != Some(der::OID_P256) {
            return Err(unsupported("the key is an EC key on another curve".to_owned()));
        }
        KeySpec::EcP256
    } else {
        return Err(unsupported(format!("the key is of type {key_type}")));
    };
    let mut permitted = Vec::new();
    match spec {
        KeySpec::Aes256 => {
            if encrypt {
                permitted.push(KeyUsage::Encrypt);
            }
            if decrypt {
                permitted.push(KeyUsage::Decrypt);
            }
        }
        KeySpec::Hmac256 => {
            if sign {
                permitted.extend([KeyUsage::GenerateMac, KeyUsage::VerifyMac]);
            }
        }
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => {
            if sign {
                permitted.extend([KeyUsage::Sign, KeyUsage::Verify]);
            }
            if decrypt {
                permitted.extend([KeyUsage::Encrypt, KeyUsage::Decrypt]);
            }
        }
        KeySpec::EcP256 => {
            if sign {
                permitted.extend([KeyUsage::Sign, KeyUsage::Verify]);
            }
        }
    }
    // Prefer the CKA_ID (labels are for people and get edited); fall back to the label when the id is absent or
    // shared with another key.
    let unique = |ctx: &mut Ctx<'_>, attr: Attribute| -> Result<bool> {
        let n = ctx.with_session(Op::Admin, |s| {
            s.find_objects(&[Attribute::Token(true), Attribute::Class(class), attr.clone()])
        })?;
        Ok(n.len() == 1)
    };
    let locator = if !id.is_empty() && id.len() <= 255 && unique(ctx, Attribute::Id(id.clone()))? {
        Locator { kind: LocatorKind::AdoptedId, value: id.clone() }
    } else if !label.is_empty() && label.len() <= 255 && unique(ctx, Attribute::Label(label.clone()))? {
        Locator { kind: LocatorKind::AdoptedLabel, value: label.clone() }
    } else {
        return Err(Error::invalid("the key has neither a unique CKA_ID nor a unique label to find it by"));
    };
    let handle = locator.encode()?;
    if !spec.is_symmetric() {
        // Adoption fails now, not at first use, if the public key cannot be read.
        let probe =
            OwnedKey { key_id: KeyId::parse("adoption-check")?, version: Uuid::nil(), spec, handle: handle.clone() };
        let spki = read_spki(ctx, &probe);
        ctx.member.objects.invalidate(&probe);
        PublicKey::from_spki(spec, spki?)?;
    }
    Ok(AdoptedKey {
        spec,
        handle,
        permitted: KeyUsageSet::of(&permitted),
        label: String::from_utf8_lossy(&label).into_owned(),
        id,
        extractable,
        sensitive,
    })
}

impl Pkcs11Backend {
    /// Loads the module, finds the token by label, logs in and pre-warms the session pool.
    ///
    /// Fails for configuration errors: invalid settings, a module that cannot be loaded, an unreadable PIN
    /// source. A token that is absent or refuses the PIN does not fail the start: the member reports
    /// UNAVAILABLE (with the reason) and keeps trying in the background, so one broken HSM never keeps the
    /// gateway or the rest of the fleet down. A refused PIN is not tried again until the PIN source changes.
    pub async fn start(config: Pkcs11Config) -> Result<Self> {
        config.validate().map_err(|e| Error::invalid(format!("PKCS#11 backend {}: {e}", config.name)))?;
        config.read_pin()?;
        let pool = tokio::task::spawn_blocking(move || {
            let module = Module::open(&config.module)?;
            let member = Arc::new(Member::new(config, module));
            Pool::first_attach(&member);
            Pool::start(member)
        })
        .await
        .map_err(|e| Error::internal("the PKCS#11 start-up thread failed").with_source(e))??;
        Ok(Pkcs11Backend { pool })
    }

    fn member(&self) -> &Member {
        &self.pool.member
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.member().config.deadline_ms)
    }

    fn admin_deadline(&self) -> Duration {
        Duration::from_millis(self.member().config.keygen_deadline_ms)
    }

    /// The member's configuration.
    pub fn config(&self) -> &Pkcs11Config {
        &self.member().config
    }

    /// Runs `f` on one of the pool's logged-in sessions, queued like every other call and under `deadline`
    /// (queueing included). For administrative tools, and for fault-injection in tests: errors `f` returns are
    /// classified like the backend's own (a session error evicts the session, a device error re-initialises
    /// the module). `f` must leave no operation active on the session.
    pub async fn with_session<T, F>(&self, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Session) -> cryptoki::error::Result<T> + Send + 'static,
    {
        self.pool.call(deadline, move |ctx| ctx.with_session_once(Op::Admin, f)).await
    }

    /// Inspects an existing key on the token for adoption (see `kmsgate keys import-hsm`): its spec, the
    /// handle to record, and the usages its attributes permit. Nothing on the token changes.
    pub async fn adopt(&self, by: AdoptBy) -> Result<AdoptedKey> {
        self.pool.call(self.admin_deadline(), move |ctx| inspect(ctx, &by)).await
    }

    /// A real probe plus the pool's counters, the token and every slot of the module.
    pub async fn status(&self) -> Pkcs11Status {
        let health = self.health().await.pop().unwrap_or_else(|| MemberHealth {
            id: self.member().name().to_owned(),
            model: String::new(),
            status: HealthStatus::Unavailable,
            detail: "no health report".to_owned(),
        });
        let member = self.pool.member.clone();
        let listing = tokio::task::spawn_blocking(move || list_slots(&member));
        let slots = match tokio::time::timeout(self.admin_deadline(), listing).await {
            Ok(Ok(slots)) => slots,
            _ => Vec::new(),
        };
        let m = self.member();
        let attachment = m.last_attachment();
        let library = m.module.read().library.clone();
        Pkcs11Status {
            name: m.name().to_owned(),
            module: m.module.path.display().to_string(),
            token_label: m.config.token_label.clone(),
            library,
            slot: attachment.as_ref().map(|a| a.slot.id()),
            token: attachment.map(|a| a.token),
            health,
            pool: self.pool_status(),
            slots,
        }
    }

    /// The session pool's counters alone: atomics only, cheap enough for every metrics scrape.
    pub fn pool_status(&self) -> PoolStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let m = self.member();
        let s = &m.stats;
        PoolStatus {
            size: m.config.sessions,
            open: s.open.load(Relaxed),
            in_use: s.in_use.load(Relaxed),
            waiting: s.waiting.load(Relaxed),
            queue_capacity: m.config.queue,
            failing: m.failing_sessions(),
            sessions_opened: s.opened.load(Relaxed),
            sessions_evicted: s.evicted.load(Relaxed),
            recoveries: s.recoveries.load(Relaxed),
            timeouts: s.timeouts.load(Relaxed),
            rejected_queue_full: s.rejected.load(Relaxed),
            abandoned: s.abandoned.load(Relaxed),
        }
    }

    /// The public key, read from the token once per key version and kept parsed.
    async fn public_key(&self, key: KeyMaterialRef<'_>) -> Result<Arc<PublicKey>> {
        if key.spec.is_symmetric() {
            return Err(Error::new(ErrorKind::InvalidKeyUsage, "a symmetric key has no public key"));
        }
        let k = owned(&key);
        if let Some(hit) = self.member().public_keys.get(&k) {
            return Ok(hit);
        }
        let lookup = k.clone();
        let spki = self.pool.call(self.deadline(), move |ctx| read_spki(ctx, &lookup)).await?;
        let parsed = Arc::new(PublicKey::from_spki(k.spec, spki)?);
        self.member().public_keys.insert(k, parsed.clone());
        Ok(parsed)
    }
}

fn list_slots(member: &Member) -> Vec<SlotStatus> {
    let state = member.module.read();
    if !state.initialized {
        return Vec::new();
    }
    let Ok(slots) = state.pkcs11.get_all_slots() else { return Vec::new() };
    slots
        .into_iter()
        .map(|slot| {
            let info = state.pkcs11.get_slot_info(slot).ok();
            let token_present = info.as_ref().is_some_and(|i| i.token_present());
            let token_label = if token_present {
                state.pkcs11.get_token_info(slot).ok().map(|t| t.label().trim_end().to_owned())
            } else {
                None
            };
            SlotStatus {
                id: slot.id(),
                description: info.map(|i| i.slot_description().trim_end().to_owned()).unwrap_or_default(),
                token_present,
                token_label,
            }
        })
        .collect()
}

#[async_trait]
impl KeyBackend for Pkcs11Backend {
    fn name(&self) -> &str {
        self.member().name()
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    async fn generate(&self, key_id: &KeyId, version: Uuid, spec: KeySpec, usage: KeyUsageSet) -> Result<Vec<u8>> {
        let label = label_for(key_id, version);
        let undo_label = label.clone();
        self.pool
            .call_with_rollback(
                self.admin_deadline(),
                move |ctx| {
                    // The id is random so two versions never share objects, and comes from the token's own RNG.
                    let id = ctx.with_session(Op::Random, |s| s.generate_random_vec(GENERATED_ID_LEN as u32))?;
                    create_with_retry(ctx, Op::Generate, &id, &label, |s| generate_objects(s, spec, usage, &id, &label))?;
                    Locator::generated(id).encode()
                },
                move |ctx, handle| {
                    if let Ok(locator) = Locator::decode(&handle) {
                        match destroy_generated(ctx, &locator.value, &undo_label) {
                            Ok(_) => tracing::info!("removed an HSM key generated after its caller gave up"),
                            Err(e) => tracing::warn!(error = ?e, "cannot remove an HSM key generated after its caller gave up"),
                        }
                    }
                },
            )
            .await
    }

    async fn import(
        &self,
        key_id: &KeyId,
        version: Uuid,
        spec: KeySpec,
        usage: KeyUsageSet,
        material: &[u8],
    ) -> Result<Vec<u8>> {
        if !spec.is_symmetric() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "importing RSA or EC private keys into the HSM is not supported: import them with the HSM vendor's \
                 tools (key wrapping) and adopt them with `kmsgate keys import-hsm`",
            ));
        }
        if material.len() != SYMMETRIC_KEY_LEN {
            return Err(Error::invalid(format!(
                "{spec} key material must be {SYMMETRIC_KEY_LEN} raw bytes, found {}",
                material.len()
            )));
        }
        let label = label_for(key_id, version);
        let undo_label = label.clone();
        let material = Zeroizing::new(material.to_vec());
        self.pool
            .call_with_rollback(
                self.admin_deadline(),
                move |ctx| {
                    let id = ctx.with_session(Op::Random, |s| s.generate_random_vec(GENERATED_ID_LEN as u32))?;
                    let (mut template, _) = key_templates(spec, usage, &id, &label);
                    // C_CreateObject takes the value instead of a length.
                    template.retain(|a| !matches!(a, Attribute::ValueLen(_)));
                    template.push(Attribute::Value(material.to_vec()));
                    let created =
                        create_with_retry(ctx, Op::Create, &id, &label, |s| s.create_object(&template).map(drop));
                    // The template held a copy of the material.
                    for a in &mut template {
                        if let Attribute::Value(v) = a {
                            zeroize::Zeroize::zeroize(v);
                        }
                    }
                    created?;
                    Locator::generated(id).encode()
                },
                move |ctx, handle| {
                    if let Ok(locator) = Locator::decode(&handle) {
                        let _ = destroy_generated(ctx, &locator.value, &undo_label);
                    }
                },
            )
            .await
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
        let iv = gcm_iv(iv)?;
        let (k, aad, plaintext) = (owned(&key), aad.to_vec(), Zeroizing::new(plaintext.to_vec()));
        self.pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::Encrypt, |s, o| {
                    // A fresh mechanism per attempt: GcmParams borrows the IV mutably (v3 tokens may write it back).
                    let mut iv = iv;
                    let params = GcmParams::new(&mut iv, aad_for_token(&aad), GCM_TAG_BITS.into())?;
                    s.encrypt(&Mechanism::AesGcm(params), o.key, &plaintext)
                })
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
        let iv = gcm_iv(iv)?;
        if ciphertext_and_tag.len() < GCM_TAG_LEN {
            return Err(Error::invalid_ciphertext());
        }
        let (k, aad, ciphertext) = (owned(&key), aad.to_vec(), ciphertext_and_tag.to_vec());
        self.pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::GcmDecrypt, |s, o| {
                    let mut iv = iv;
                    let params = GcmParams::new(&mut iv, aad_for_token(&aad), GCM_TAG_BITS.into())?;
                    s.decrypt(&Mechanism::AesGcm(params), o.key, &ciphertext).map(Zeroizing::new)
                })
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
        let mechanism = BlockMechanism::of(mode, padding, iv)?;
        let data = match (mode, padding) {
            (AesBlockMode::Ecb, BlockPadding::Pkcs7) => pkcs7_pad(plaintext),
            _ => Zeroizing::new(plaintext.to_vec()),
        };
        if padding == BlockPadding::NoPadding && (data.is_empty() || !data.len().is_multiple_of(AES_BLOCK)) {
            return Err(Error::invalid("without padding the plaintext must be whole 16-byte blocks"));
        }
        let k = owned(&key);
        self.pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::Encrypt, |s, o| s.encrypt(&mechanism.mechanism(), o.key, &data))
            })
            .await
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
        if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(AES_BLOCK) {
            return Err(Error::invalid_ciphertext());
        }
        let mechanism = BlockMechanism::of(mode, padding, iv)?;
        let (k, data) = (owned(&key), ciphertext.to_vec());
        let plain = self
            .pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::BlockDecrypt, |s, o| {
                    s.decrypt(&mechanism.mechanism(), o.key, &data).map(Zeroizing::new)
                })
            })
            .await?;
        match (mode, padding) {
            (AesBlockMode::Ecb, BlockPadding::Pkcs7) => pkcs7_unpad(plain),
            _ => Ok(plain),
        }
    }

    async fn rsa_oaep_encrypt(&self, key: KeyMaterialRef<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        if !key.spec.is_rsa() {
            return Err(wrong_spec(key.spec, "RSA-OAEP encryption"));
        }
        let public = self.public_key(key).await?;
        let PublicKind::Rsa { oaep, .. } = &public.kind else {
            return Err(Error::internal("the public key does not match the key's spec"));
        };
        if plaintext.len() > oaep.max_plaintext_size(&OAEP_SHA256_MGF1SHA256) {
            return Err(Error::invalid("the plaintext is too long for RSA-OAEP-SHA256 with this key"));
        }
        let mut out = vec![0u8; oaep.ciphertext_size()];
        let len = oaep
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|e| Error::new(ErrorKind::DependencyFailure, "RSA-OAEP encryption failed").with_source(e))?
            .len();
        out.truncate(len);
        Ok(out)
    }

    async fn rsa_oaep_decrypt(&self, key: KeyMaterialRef<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if !key.spec.is_rsa() {
            return Err(wrong_spec(key.spec, "RSA-OAEP decryption"));
        }
        let k = modulus_len(key.spec);
        if ciphertext.len() != k {
            return Err(Error::invalid_ciphertext());
        }
        let (key, ciphertext) = (owned(&key), ciphertext.to_vec());
        enum Decrypted {
            Plain(Zeroizing<Vec<u8>>),
            Raw(Zeroizing<Vec<u8>>),
        }
        let decrypted = self
            .pool
            .call(self.deadline(), move |ctx| {
                let member = ctx.member;
                ctx.with_key(&key, Op::RsaDecrypt, |s, o| {
                    if member.oaep.load(std::sync::atomic::Ordering::Relaxed) != OAEP_RAW {
                        let params =
                            PkcsOaepParams::new(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, PkcsOaepSource::empty());
                        match s.decrypt(&Mechanism::RsaPkcsOaep(params), o.key, &ciphertext) {
                            Ok(plain) => {
                                member.oaep.store(OAEP_NATIVE, std::sync::atomic::Ordering::Relaxed);
                                return Ok(Decrypted::Plain(Zeroizing::new(plain)));
                            }
                            Err(P11Error::Pkcs11(
                                RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad,
                                cryptoki::context::Function::DecryptInit,
                            )) => {
                                tracing::info!(
                                    backend = %member.name(),
                                    "the token has no RSA-OAEP with SHA-256; decrypting with CKM_RSA_X_509 and decoding OAEP in kmsgate"
                                );
                                member.oaep.store(OAEP_RAW, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    s.decrypt(&Mechanism::RsaX509, o.key, &ciphertext).map(|em| Decrypted::Raw(Zeroizing::new(em)))
                })
            })
            .await?;
        match decrypted {
            Decrypted::Plain(p) => Ok(p),
            Decrypted::Raw(em) => oaep::decode_sha256(&em, k).ok_or_else(Error::invalid_ciphertext),
        }
    }

    async fn sign_digest(&self, key: KeyMaterialRef<'_>, alg: SigningAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        if !alg.fits(key.spec) {
            return Err(wrong_spec(key.spec, "this signing algorithm"));
        }
        if digest.len() != SHA256_LEN {
            return Err(Error::invalid("a SHA-256 digest is 32 bytes"));
        }
        let data = match alg {
            SigningAlgorithm::RsaPkcs1Sha256 => [&SHA256_DIGEST_INFO[..], digest].concat(),
            SigningAlgorithm::RsaPssSha256 | SigningAlgorithm::EcdsaSha256 => digest.to_vec(),
        };
        let k = owned(&key);
        let signature = self
            .pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::Sign, |s, o| {
                    let mechanism = match alg {
                        SigningAlgorithm::RsaPkcs1Sha256 => Mechanism::RsaPkcs,
                        SigningAlgorithm::RsaPssSha256 => Mechanism::RsaPkcsPss(PkcsPssParams {
                            hash_alg: MechanismType::SHA256,
                            mgf: PkcsMgfType::MGF1_SHA256,
                            s_len: (SHA256_LEN as u64).into(),
                        }),
                        SigningAlgorithm::EcdsaSha256 => Mechanism::Ecdsa,
                    };
                    s.sign(&mechanism, o.key, &data)
                })
            })
            .await?;
        match alg {
            SigningAlgorithm::EcdsaSha256 => der::ecdsa_raw_to_der(&signature).ok_or_else(|| {
                Error::new(ErrorKind::DependencyFailure, "the HSM returned an ECDSA signature of an unexpected size")
            }),
            _ => Ok(signature),
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
        if digest.len() != SHA256_LEN {
            return Err(Error::invalid("a SHA-256 digest is 32 bytes"));
        }
        let digest =
            Digest::import_less_safe(digest, &SHA256).map_err(|_| Error::invalid("a SHA-256 digest is 32 bytes"))?;
        let public = self.public_key(key).await?;
        let verifier = match (&public.kind, alg) {
            (PublicKind::Rsa { pkcs1, .. }, SigningAlgorithm::RsaPkcs1Sha256) => pkcs1,
            (PublicKind::Rsa { pss, .. }, SigningAlgorithm::RsaPssSha256) => pss,
            (PublicKind::Ec { verify }, SigningAlgorithm::EcdsaSha256) => verify,
            _ => return Err(Error::internal("the public key does not match the key's spec")),
        };
        Ok(verifier.verify_digest_sig(&digest, signature).is_ok())
    }

    async fn public_key_der(&self, key: KeyMaterialRef<'_>) -> Result<Vec<u8>> {
        Ok(self.public_key(key).await?.spki.clone())
    }

    async fn hmac_sha256(&self, key: KeyMaterialRef<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if key.spec != KeySpec::Hmac256 {
            return Err(wrong_spec(key.spec, "HMAC-SHA256"));
        }
        let (k, data) = (owned(&key), data.to_vec());
        self.pool
            .call(self.deadline(), move |ctx| {
                ctx.with_key(&k, Op::Sign, |s, o| s.sign(&Mechanism::Sha256Hmac, o.key, &data))
            })
            .await
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>> {
        if len > MAX_RANDOM_LEN {
            return Err(Error::invalid(format!("at most {MAX_RANDOM_LEN} random bytes can be requested at once")));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let n = u32::try_from(len).map_err(|_| Error::invalid("too many random bytes"))?;
        self.pool.call(self.deadline(), move |ctx| ctx.with_session(Op::Random, |s| s.generate_random_vec(n))).await
    }

    /// Destroys the objects kmsgate created. Adopted keys are left on the token: they existed before kmsgate
    /// and may serve other applications; deleting the kmsgate key only forgets them.
    async fn destroy(&self, key: KeyMaterialRef<'_>) -> Result<()> {
        let k = owned(&key);
        self.member().objects.invalidate(&k);
        self.member().public_keys.invalidate(&k);
        let locator = match Locator::decode(key.handle) {
            Ok(l) => l,
            // Nothing was ever created for a key awaiting import.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidKeyState(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !locator.owned() {
            tracing::info!(backend = %self.name(), key = %key.key_id, object = %locator.describe(), "adopted HSM key left on the token");
            return Ok(());
        }
        let label = label_for(key.key_id, key.version);
        let destroyed =
            self.pool.call(self.admin_deadline(), move |ctx| destroy_generated(ctx, &locator.value, &label)).await?;
        tracing::info!(backend = %self.name(), key = %key.key_id, version = %key.version, objects = destroyed, "HSM key destroyed");
        Ok(())
    }

    async fn health(&self) -> Vec<MemberHealth> {
        use std::sync::atomic::Ordering::SeqCst;
        let member = self.pool.member.clone();
        // One probe at a time: a hung token must not pile up blocked threads, one per health check.
        let (status, detail) = if member.probing.swap(true, SeqCst) {
            member.health()
        } else {
            let m = member.clone();
            let probe = tokio::task::spawn_blocking(move || {
                let result = m.probe();
                m.probing.store(false, SeqCst);
                result
            });
            match tokio::time::timeout(self.deadline().max(Duration::from_millis(500)), probe).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => {
                    member.probing.store(false, SeqCst);
                    (HealthStatus::Unavailable, "the health probe failed".to_owned())
                }
                Err(_) => (HealthStatus::Unavailable, "the token did not answer the health probe in time".to_owned()),
            }
        };
        let model = match member.last_attachment() {
            Some(a) => a.token.model_string(),
            None => format!("PKCS#11 module {}", member.module.path.display()),
        };
        vec![MemberHealth { id: member.name().to_owned(), model, status, detail }]
    }
}
