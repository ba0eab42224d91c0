//! Configuration of one PKCS#11 fleet member (`[[backend.pkcs11]]` in the server's TOML).

use std::path::PathBuf;

use kmsgate_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// One HSM fleet member: a token, found by its label in a PKCS#11 module, served by its own session pool.
///
/// The PIN comes from a file or an environment variable, never from the configuration itself, so the TOML can
/// be shared and versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The backend name recorded in each key version this member holds (e.g. `hsm-a`).
    pub name: String,
    /// Path of the vendor's PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token. The slot is looked up by it at every (re)initialisation: slot ids change when a token
    /// is initialised.
    pub token_label: String,
    /// File holding the user PIN (its first line; a trailing newline is ignored).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Logged-in sessions in the pool, each served by its own OS thread.
    #[serde(default = "defaults::sessions")]
    pub sessions: usize,
    /// Requests that may wait for a free session; beyond that a request fails at once with the
    /// dependency-timeout error.
    #[serde(default = "defaults::queue")]
    pub queue: usize,
    /// Deadline of one cryptographic call (queueing included), in milliseconds.
    #[serde(default = "defaults::deadline_ms")]
    pub deadline_ms: u64,
    /// Deadline of key generation, import, adoption and destruction, in milliseconds (RSA key generation in an
    /// HSM takes from 100 ms to several seconds).
    #[serde(default = "defaults::keygen_deadline_ms")]
    pub keygen_deadline_ms: u64,
    /// How often the token is probed when idle, in milliseconds; a failed probe starts recovery.
    #[serde(default = "defaults::probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Ceiling of the back-off between recovery attempts, in milliseconds (it starts at 100 ms and doubles).
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
}

mod defaults {
    pub(super) fn sessions() -> usize {
        4
    }
    pub(super) fn queue() -> usize {
        256
    }
    pub(super) fn deadline_ms() -> u64 {
        200
    }
    pub(super) fn keygen_deadline_ms() -> u64 {
        10_000
    }
    pub(super) fn probe_interval_ms() -> u64 {
        1_000
    }
    pub(super) fn retry_max_ms() -> u64 {
        5_000
    }
}

/// Upper bounds that catch typos (a pool of 40 000 threads) rather than express real limits.
const MAX_SESSIONS: usize = 1024;
const MAX_QUEUE: usize = 1_000_000;

impl Pkcs11Config {
    /// A member with the documented defaults and no PIN source yet.
    pub fn new(name: impl Into<String>, module: impl Into<PathBuf>, token_label: impl Into<String>) -> Self {
        Pkcs11Config {
            name: name.into(),
            module: module.into(),
            token_label: token_label.into(),
            pin_file: None,
            pin_env: None,
            sessions: defaults::sessions(),
            queue: defaults::queue(),
            deadline_ms: defaults::deadline_ms(),
            keygen_deadline_ms: defaults::keygen_deadline_ms(),
            probe_interval_ms: defaults::probe_interval_ms(),
            retry_max_ms: defaults::retry_max_ms(),
        }
    }

    /// Checks the member on its own (the server checks names across members). The message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let name_ok = (1..=64).contains(&self.name.len())
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err("name must be 1-64 characters of A-Z a-z 0-9 - _ .".to_owned());
        }
        if self.module.as_os_str().is_empty() {
            return Err("module must be the path of the PKCS#11 library".to_owned());
        }
        // Token labels are 32 bytes, blank-padded, in CK_TOKEN_INFO.
        if self.token_label.trim().is_empty() || self.token_label.len() > 32 {
            return Err("token_label must be 1-32 bytes".to_owned());
        }
        if self.token_label.trim_end() != self.token_label {
            return Err("token_label must not end with spaces (tokens pad labels with blanks)".to_owned());
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => return Err("set only one of pin_file and pin_env".to_owned()),
            (None, None) => {
                return Err("set pin_file or pin_env (the PIN is never written in the configuration)".to_owned());
            }
            (None, Some(var)) if var.is_empty() => return Err("pin_env must name an environment variable".to_owned()),
            _ => {}
        }
        if !(1..=MAX_SESSIONS).contains(&self.sessions) {
            return Err(format!("sessions must be 1-{MAX_SESSIONS}"));
        }
        if !(1..=MAX_QUEUE).contains(&self.queue) {
            return Err(format!("queue must be 1-{MAX_QUEUE}"));
        }
        for (field, value) in [
            ("deadline_ms", self.deadline_ms),
            ("keygen_deadline_ms", self.keygen_deadline_ms),
            ("probe_interval_ms", self.probe_interval_ms),
            ("retry_max_ms", self.retry_max_ms),
        ] {
            if value == 0 {
                return Err(format!("{field} must be positive"));
            }
        }
        Ok(())
    }

    /// Reads the PIN from its source. Called at start and at every recovery, so a rotated PIN file is picked up
    /// without a restart.
    pub(crate) fn read_pin(&self) -> Result<Zeroizing<String>> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(path), _) => {
                let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidRequest,
                        format!("the PIN file {} of PKCS#11 backend {} cannot be read", path.display(), self.name),
                    )
                    .with_source(e)
                })?);
                warn_if_readable_by_others(path, &self.name);
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| Error::invalid(format!("the PIN file {} is not UTF-8 text", path.display())))?;
                let line = text.lines().next().unwrap_or("");
                Zeroizing::new(line.to_owned())
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => Zeroizing::new(v.trim_end_matches(['\r', '\n']).to_owned()),
                Err(_) => {
                    return Err(Error::invalid(format!(
                        "the PIN environment variable {var} of PKCS#11 backend {} is not set",
                        self.name
                    )));
                }
            },
            (None, None) => {
                return Err(Error::invalid(format!("PKCS#11 backend {} has no PIN source", self.name)));
            }
        };
        if pin.is_empty() {
            return Err(Error::invalid(format!("the PIN of PKCS#11 backend {} is empty", self.name)));
        }
        Ok(pin)
    }
}

/// Same policy as the root key file: a loud log line, not a refusal (secret mounts set their own modes).
fn warn_if_readable_by_others(path: &std::path::Path, name: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(backend = name, path = %path.display(), "the PIN file is accessible to group or others; use mode 0600");
        }
    }
    #[cfg(not(unix))]
    let _ = (path, name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Pkcs11Config {
        let mut c = Pkcs11Config::new("hsm-a", "/usr/lib/softhsm/libsofthsm2.so", "kmsgate");
        c.pin_env = Some("KMSGATE_TEST_UNSET_PIN_VAR_9d2c".to_owned());
        c
    }

    #[test]
    fn defaults_and_validation() {
        let c = valid();
        assert_eq!((c.sessions, c.queue, c.deadline_ms), (4, 256, 200));
        assert_eq!(c.validate(), Ok(()));
        let bad = |f: fn(&mut Pkcs11Config)| {
            let mut c = valid();
            f(&mut c);
            c.validate().err().unwrap_or_default()
        };
        assert!(bad(|c| c.name = "a b".into()).starts_with("name"));
        assert!(bad(|c| c.token_label = String::new()).starts_with("token_label"));
        assert!(bad(|c| c.token_label = "x".repeat(33)).starts_with("token_label"));
        assert!(bad(|c| c.token_label = "x ".into()).contains("spaces"));
        assert!(bad(|c| c.pin_file = Some("/p".into())).contains("only one"));
        assert!(bad(|c| c.pin_env = None).contains("pin_file or pin_env"));
        assert!(bad(|c| c.sessions = 0).starts_with("sessions"));
        assert!(bad(|c| c.queue = 0).starts_with("queue"));
        assert!(bad(|c| c.deadline_ms = 0).starts_with("deadline_ms"));
    }

    #[test]
    fn toml_shape_with_defaults() {
        let c: Pkcs11Config = serde_json::from_str(
            r#"{"name":"hsm-b","module":"/m.so","token_label":"t","pin_file":"/run/pin","sessions":8}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.sessions, 8);
        assert_eq!(c.queue, 256);
        assert_eq!(c.pin_file.as_deref(), Some(std::path::Path::new("/run/pin")));
        let unknown = serde_json::from_str::<Pkcs11Config>(r#"{"name":"a","module":"/m","token_label":"t","pin":"1"}"#);
        assert!(unknown.is_err(), "a PIN in the configuration is refused as an unknown field");
    }

    #[test]
    fn pin_sources() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").unwrap_or_else(|e| panic!("{e}"));
        let mut c = valid();
        c.pin_env = None;
        c.pin_file = Some(path.clone());
        assert_eq!(c.read_pin().map(|p| p.to_string()).ok().as_deref(), Some("1234"));
        std::fs::write(&path, "\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.read_pin().is_err());
        c.pin_file = Some(dir.path().join("missing"));
        assert!(c.read_pin().err().is_some_and(|e| e.message().contains("cannot be read")));
        let unset = valid().read_pin().err();
        assert!(unset.is_some_and(|e| e.message().contains("is not set")));
    }
}
