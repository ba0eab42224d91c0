//! The root key (KEK) of the software backend.
//!
//! The KEK itself never wraps anything directly: a wrapping key and a fingerprint are derived from it with
//! separate domain labels, so the same root key can later protect other things (stored credentials, say)
//! without two uses ever sharing an AES key, and so the fingerprint written into every handle reveals nothing
//! about the key.

use std::env::VarError;
use std::fmt;
use std::io::Write as _;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use aws_lc_rs::{digest, hkdf, rand};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

/// Length of the root key in bytes.
pub const KEK_LEN: usize = 32;
/// Length of the fingerprint recorded in every handle.
pub const FINGERPRINT_LEN: usize = 8;

const FINGERPRINT_LABEL: &[u8] = b"kmsgate/software-kek/fingerprint/v1\0";
const WRAP_KEY_SALT: &[u8] = b"kmsgate/software-kek/v1";
const WRAP_KEY_INFO: &[u8] = b"kmsgate/software-kek/handle-wrap-key/v1";

/// The software backend's root key: 32 secret bytes, zeroized on drop, never printed.
///
/// The text form (file or environment variable) is the standard base64 encoding of the 32 bytes; surrounding
/// whitespace such as a trailing newline is ignored.
pub struct Kek {
    // Kept (rather than only the derived keys) so later derivations need no reload; zeroized on drop.
    secret: Zeroizing<[u8; KEK_LEN]>,
    fingerprint: [u8; FINGERPRINT_LEN],
    wrap_key: LessSafeKey,
}

impl Kek {
    /// A root key from its 32 raw bytes. The caller's copy is not touched; zeroize it if it matters.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let secret: [u8; KEK_LEN] = bytes.try_into().map_err(|_| {
            Error::invalid(format!("the root key must be exactly {KEK_LEN} bytes, found {}", bytes.len()))
        })?;
        Self::from_secret(Zeroizing::new(secret))
    }

    /// A fresh random root key, kept in memory only (tests, ephemeral development setups).
    pub fn generate() -> Result<Self> {
        let mut secret = Zeroizing::new([0u8; KEK_LEN]);
        rand::fill(secret.as_mut_slice()).map_err(|e| crypto_failure("generating a root key failed", e))?;
        Self::from_secret(secret)
    }

    /// Parses the text form: base64 of 32 bytes, surrounding whitespace ignored.
    pub fn from_base64(text: &str) -> Result<Self> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text.trim_ascii())
                .map_err(|_| Error::invalid("the root key is not valid base64 (expected base64 of 32 bytes)"))?,
        );
        if decoded.len() != KEK_LEN {
            return Err(Error::invalid(format!(
                "the root key must decode to exactly {KEK_LEN} bytes, found {}",
                decoded.len()
            )));
        }
        Self::from_bytes(&decoded)
    }

    /// Loads the root key from a file holding its text form.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = match std::fs::read(path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::invalid(format!("the root key file {} does not exist", path.display())));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::DependencyFailure,
                    format!("the root key file {} cannot be read", path.display()),
                )
                .with_source(e));
            }
        };
        warn_if_readable_by_others(path);
        let text = std::str::from_utf8(&text).map_err(|_| {
            Error::invalid(format!("the root key file {} is not text (expected base64 of 32 bytes)", path.display()))
        })?;
        Self::from_base64(text)
            .map_err(|e| Error::new(e.kind(), format!("the root key file {}: {}", path.display(), e.message())))
    }

    /// Loads the root key from an environment variable holding its text form.
    ///
    /// The variable stays in the environment (removing it is `unsafe` in Rust 2024, which this workspace
    /// forbids); deployments should inject it only into this process.
    pub fn from_env(var: &str) -> Result<Self> {
        Self::from_env_value(var, std::env::var(var))
    }

    fn from_env_value(var: &str, value: std::result::Result<String, VarError>) -> Result<Self> {
        match value {
            Ok(text) => {
                let text = Zeroizing::new(text);
                Self::from_base64(&text).map_err(|e| {
                    Error::new(e.kind(), format!("the root key in environment variable {var}: {}", e.message()))
                })
            }
            Err(VarError::NotPresent) => {
                Err(Error::invalid(format!("the root key environment variable {var} is not set")))
            }
            Err(VarError::NotUnicode(_)) => Err(Error::invalid(format!(
                "the root key environment variable {var} is not text (expected base64 of 32 bytes)"
            ))),
        }
    }

    /// Creates a new random root key and writes its text form to `path` with mode 0600.
    ///
    /// Refuses to overwrite an existing file: replacing a root key makes every key wrapped under the old one
    /// unusable, so that must never happen by accident.
    pub fn generate_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let kek = Self::generate()?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("the root key file {} already exists; refusing to overwrite it", path.display()),
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::DependencyFailure,
                    format!("the root key file {} cannot be created", path.display()),
                )
                .with_source(e));
            }
        };
        let mut text = Zeroizing::new(STANDARD.encode(kek.secret.as_slice()));
        text.push('\n');
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| {
            Error::new(ErrorKind::DependencyFailure, format!("the root key file {} cannot be written", path.display()))
                .with_source(e)
        })?;
        Ok(kek)
    }

    /// A short public identifier of this root key: the first 8 bytes of SHA-256 over a domain label and the
    /// key. Safe to log; recorded in every handle so a wrong root key is detected before any decryption.
    pub fn fingerprint(&self) -> [u8; FINGERPRINT_LEN] {
        self.fingerprint
    }

    /// The fingerprint as lowercase hex, for logs and operator output.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn wrap_key(&self) -> &LessSafeKey {
        &self.wrap_key
    }

    fn from_secret(secret: Zeroizing<[u8; KEK_LEN]>) -> Result<Self> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(secret.as_slice());
        let full = ctx.finish();
        let mut fingerprint = [0u8; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(&full.as_ref()[..FINGERPRINT_LEN]);

        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, WRAP_KEY_SALT).extract(secret.as_slice());
        let okm = prk
            .expand(&[WRAP_KEY_INFO], &AES_256_GCM)
            .map_err(|e| crypto_failure("deriving the handle wrapping key failed", e))?;
        let wrap_key = LessSafeKey::new(UnboundKey::from(okm));
        Ok(Kek { secret, fingerprint, wrap_key })
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("fingerprint", &self.fingerprint_hex()).finish_non_exhaustive()
    }
}

fn crypto_failure(message: &'static str, cause: aws_lc_rs::error::Unspecified) -> Error {
    Error::new(ErrorKind::DependencyFailure, message).with_source(cause)
}

/// A root key readable by group or others is a deployment mistake worth a loud log line, but refusing to start
/// would break setups where a secret mount sets its own modes (e.g. Kubernetes `defaultMode`).
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "the root key file is accessible to group or others; use mode 0600"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: [u8; 32] = [7u8; 32];

    fn sample_b64() -> String {
        STANDARD.encode(SAMPLE)
    }

    #[test]
    fn base64_with_surrounding_whitespace_parses() {
        let a = Kek::from_base64(&format!("{}\n", sample_b64())).unwrap_or_else(|e| panic!("{e}"));
        let b = Kek::from_base64(&format!("  {} \r\n\t", sample_b64())).unwrap_or_else(|e| panic!("{e}"));
        let c = Kek::from_bytes(&SAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.fingerprint(), c.fingerprint());
        assert_eq!(b.fingerprint(), c.fingerprint());
    }

    #[test]
    fn bad_length_and_encoding_are_clear_errors() {
        let short = Kek::from_base64(&STANDARD.encode([1u8; 31])).err().map(|e| (e.kind(), e.message().to_owned()));
        assert_eq!(
            short,
            Some((ErrorKind::InvalidRequest, "the root key must decode to exactly 32 bytes, found 31".to_owned()))
        );
        let long = Kek::from_base64(&STANDARD.encode([1u8; 33])).err().map(|e| e.message().to_owned());
        assert_eq!(long.as_deref(), Some("the root key must decode to exactly 32 bytes, found 33"));
        let bad = Kek::from_base64("not base64!!").err().map(|e| e.message().to_owned());
        assert_eq!(bad.as_deref(), Some("the root key is not valid base64 (expected base64 of 32 bytes)"));
        assert!(Kek::from_base64("").is_err());
        assert!(Kek::from_bytes(&[0u8; 16]).is_err());
    }

    #[test]
    fn env_values_are_checked() {
        let ok = Kek::from_env_value("KMSGATE_KEK", Ok(format!("{}\n", sample_b64())));
        assert_eq!(ok.map(|k| k.fingerprint()).ok(), Kek::from_bytes(&SAMPLE).map(|k| k.fingerprint()).ok());

        let missing = Kek::from_env_value("KMSGATE_KEK", Err(VarError::NotPresent)).err();
        assert_eq!(
            missing.map(|e| (e.kind(), e.message().to_owned())),
            Some((ErrorKind::InvalidRequest, "the root key environment variable KMSGATE_KEK is not set".to_owned()))
        );
        let not_text = Kek::from_env_value("KMSGATE_KEK", Err(VarError::NotUnicode("\u{0}".into()))).err();
        assert!(not_text.is_some_and(|e| e.message().contains("is not text")));
        let bad = Kek::from_env_value("KMSGATE_KEK", Ok("AAAA".into())).err();
        assert_eq!(
            bad.map(|e| e.message().to_owned()).as_deref(),
            Some(
                "the root key in environment variable KMSGATE_KEK: the root key must decode to exactly 32 bytes, found 3"
            )
        );
    }

    #[test]
    fn unset_env_var_is_reported() {
        let e = Kek::from_env("KMSGATE_TEST_VARIABLE_THAT_IS_NEVER_SET_7f3a").err();
        assert!(e.is_some_and(|e| e.message().ends_with("is not set")));
    }

    #[test]
    fn fingerprint_is_domain_separated_and_not_the_key() {
        let kek = Kek::from_bytes(&SAMPLE).unwrap_or_else(|e| panic!("{e}"));
        // A plain SHA-256 of the key must not be what ends up in handles.
        let plain = digest::digest(&digest::SHA256, &SAMPLE);
        assert_ne!(&plain.as_ref()[..FINGERPRINT_LEN], kek.fingerprint().as_slice());
        assert_ne!(&SAMPLE[..FINGERPRINT_LEN], kek.fingerprint().as_slice());
        let other = Kek::from_bytes(&[8u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(kek.fingerprint(), other.fingerprint());
        assert_eq!(kek.fingerprint_hex().len(), 16);
    }

    #[test]
    fn debug_never_prints_the_key() {
        let kek = Kek::from_bytes(&SAMPLE).unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{kek:?} {kek:#?}");
        assert!(shown.contains(&kek.fingerprint_hex()));
        assert!(!shown.contains(&sample_b64()));
        assert!(!shown.contains("7, 7, 7"));
    }

    #[test]
    fn generated_keys_differ() {
        let a = Kek::generate().unwrap_or_else(|e| panic!("{e}"));
        let b = Kek::generate().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
