//! Configuration: one TOML file, overridden by `KMSGATE_*` environment variables, overridden by flags.
//! Every option is documented with its default in docs/configuration.md; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Environment variables with the `KMSGATE_` prefix that are not configuration keys (`KMSGATE_TEST_*` are the
/// test suite's).
const NON_CONFIG_ENV: &[&str] = &["KEK", "CONFIG", "LOG", "SERVER", "ADMIN_TOKEN", "SERVER_CA"];

fn is_config_env(key: &str) -> bool {
    !NON_CONFIG_ENV.iter().any(|n| key.eq_ignore_ascii_case(n)) && !key.to_ascii_uppercase().starts_with("TEST_")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the embedded default: SQLite file, generated root key.
    pub data_dir: PathBuf,
    /// Tenant that the CLI and frontends without tenant mapping use.
    pub default_tenant: String,
    pub server: ServerConfig,
    /// The admin listener: probes and metrics, apart from the data listeners.
    #[serde(default)]
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub backend: BackendConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    /// Where audit records go (docs/deployment.md#audit-log).
    #[serde(default)]
    pub audit: AuditConfig,
    /// The AWS KMS External Key Store proxy API (docs/xks.md).
    #[serde(default)]
    pub xks: kmsgate_xks::XksConfig,
    /// The Alibaba Cloud KMS instance API (docs/alibaba.md).
    #[serde(default)]
    pub alibaba: kmsgate_alibaba::AlibabaConfig,
    /// OpenTelemetry trace export over OTLP (docs/configuration.md#telemetry); off by default.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The internal gRPC API (docs/grpc.md).
    #[serde(default)]
    pub grpc: crate::grpc::GrpcConfig,
    /// The Kubernetes KMS v2 plugin (docs/kubernetes-kms.md).
    #[serde(default)]
    pub kms_plugin: kmsgate_grpc::KmsPluginConfig,
    /// The generic secrets REST API (docs/secrets-api.md).
    #[serde(default)]
    pub secrets: kmsgate_secrets::SecretsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the main data listener.
    pub bind: SocketAddr,
    /// TLS for the main listener; plain HTTP when absent (local use only).
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// How often this process reads the store's change feed to invalidate its caches.
    pub change_poll_ms: u64,
    /// How often keys whose deletion window has passed are destroyed.
    pub purge_interval_secs: u64,
    /// Largest request body accepted by any frontend, in bytes.
    pub max_body_bytes: usize,
}

/// The admin listener serves `/healthz`, `/readyz` and `/metrics` on an address of its own, so probes and
/// scrapes never share a port (or a network policy) with callers of the data APIs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin listener at all.
    pub enabled: bool,
    /// Its address; loopback by default, `0.0.0.0:8081` in a container so the kubelet and Prometheus reach it.
    pub bind: SocketAddr,
    /// TLS for the admin listener; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Serve the online admin API (`/v1/...`, docs/admin-api.md) on the admin listener.
    pub api: bool,
    /// The admin API's bearer token; empty means `<data_dir>/admin.token`, generated (mode 0600) when missing.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 8081)),
            tls: None,
            api: true,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of CAs whose client certificates are accepted; enables mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: allowed client identities (SAN DNS name or subject CN). Empty: any cert of the CA.
    #[serde(default)]
    pub client_subjects: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive (`info`, `kmsgate=debug,info`...). `KMSGATE_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB[?sslmode=...]`; empty means
    /// `sqlite://<data_dir>/kmsgate.db`. Keep passwords out of it: use `password_file` or `password_env`.
    pub url: String,
    /// PostgreSQL: file whose first line is the password (a mounted Kubernetes Secret).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: environment variable holding the password.
    pub password_env: Option<String>,
    /// PostgreSQL: TLS mode (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`); unset: the URL's
    /// `sslmode`, else `prefer`.
    pub ssl_mode: Option<String>,
    /// PostgreSQL: PEM file of the CA(s) that signed the server's certificate (`verify-ca`/`verify-full`).
    pub ssl_root_cert: Option<PathBuf>,
    /// Pooled connections per process.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before the dependency-timeout error.
    pub acquire_timeout_ms: u64,
    /// PostgreSQL: server-side `statement_timeout` of every statement (0: none).
    pub statement_timeout_ms: u64,
    /// Deadline of one store call as the dispatcher sees it; a miss is the dependency-timeout error.
    pub deadline_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: String::new(),
            password_file: None,
            password_env: None,
            ssl_mode: None,
            ssl_root_cert: None,
            max_connections: 8,
            acquire_timeout_ms: 2000,
            statement_timeout_ms: 5000,
            deadline_ms: 3000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Backend that new keys go to.
    pub default: String,
    /// Deadline of one backend call, in milliseconds.
    pub deadline_ms: u64,
    pub software: SoftwareConfig,
    /// PKCS#11 HSM fleet members (`[[backend.pkcs11]]`), each registered as a backend of its own name.
    #[serde(default)]
    pub pkcs11: Vec<kmsgate_hsm::Pkcs11Config>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SoftwareConfig {
    /// Name recorded in each key version this backend holds.
    pub name: String,
    /// File with the base64 root key; empty means `<data_dir>/kek`.
    pub kek_file: Option<PathBuf>,
    /// Environment variable holding the base64 root key instead of a file.
    pub kek_env: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries in each key and alias resolution cache.
    pub capacity: u64,
    /// Backstop expiry of a cached key, in seconds.
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest plaintext of a symmetric encryption, in bytes.
    pub max_plaintext_bytes: usize,
    /// Largest additional authenticated data, in bytes.
    pub max_aad_bytes: usize,
    /// Keys one tenant may hold; 0 means unlimited.
    pub max_keys_per_tenant: u64,
    /// Active secrets one tenant may hold; 0 means unlimited.
    pub max_secrets_per_tenant: u64,
    /// Largest secret value (one version's data), in bytes.
    pub max_secret_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./kmsgate-data"),
            default_tenant: "default".to_owned(),
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            store: StoreConfig::default(),
            backend: BackendConfig::default(),
            cache: CacheConfig::default(),
            limits: LimitsConfig::default(),
            audit: AuditConfig::default(),
            xks: kmsgate_xks::XksConfig::default(),
            alibaba: kmsgate_alibaba::AlibabaConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
            grpc: crate::grpc::GrpcConfig::default(),
            kms_plugin: kmsgate_grpc::KmsPluginConfig::default(),
            secrets: kmsgate_secrets::SecretsConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            shutdown_grace_secs: 30,
            change_poll_ms: 500,
            purge_interval_secs: 60,
            max_body_bytes: 3 * 1024 * 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".to_owned() }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            default: "software".to_owned(),
            deadline_ms: 200,
            software: SoftwareConfig::default(),
            pkcs11: Vec::new(),
        }
    }
}

impl Default for SoftwareConfig {
    fn default() -> Self {
        SoftwareConfig { name: "software".to_owned(), kek_file: None, kek_env: None }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { capacity: 100_000, ttl_secs: 60 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_plaintext_bytes: 64 * 1024,
            max_aad_bytes: 64 * 1024,
            max_keys_per_tenant: 0,
            max_secrets_per_tenant: 0,
            max_secret_bytes: 64 * 1024,
        }
    }
}

/// Where audit records go.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditDestination {
    /// A `tracing` event on the `audit` target, in the process log (no hash chain).
    Log,
    /// Hash-chained JSON lines appended to `audit.path`.
    File,
    /// Hash-chained JSON lines on standard output (a chain per process start).
    Stdout,
    /// Hash-chained records in the store's `audit_log` table: one chain for all replicas.
    Store,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub destination: AuditDestination,
    /// With `file`: the log file; empty means `<data_dir>/audit.log`.
    pub path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { destination: AuditDestination::Log, path: None }
    }
}

/// Where the configuration came from, for the start-up banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    EmbeddedDefault,
}

impl Config {
    /// Loads defaults, then the file (if any), then `KMSGATE_*` variables (`__` separates sections:
    /// `KMSGATE_SERVER__BIND=0.0.0.0:8443`).
    pub fn load(file: Option<&Path>) -> anyhow::Result<(Config, Source)> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let source = match file {
            Some(path) => {
                if !path.is_file() {
                    bail!("the configuration file {} does not exist", path.display());
                }
                fig = fig.merge(Toml::file(path));
                Source::File(path.to_path_buf())
            }
            None => Source::EmbeddedDefault,
        };
        let env = Env::prefixed("KMSGATE_").filter(|k| is_config_env(k.as_str())).split("__");
        fig = fig.merge(env);
        let config: Config = fig.extract().context("invalid configuration")?;
        config.validate()?;
        Ok((config, source))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.xks.validate()?;
        self.alibaba.validate().map_err(anyhow::Error::msg)?;
        self.telemetry.validate()?;
        self.grpc.validate()?;
        self.kms_plugin.validate().map_err(anyhow::Error::msg)?;
        self.secrets.validate().map_err(anyhow::Error::msg)?;
        if self.limits.max_secret_bytes == 0 {
            bail!("limits.max_secret_bytes must be positive");
        }
        kmsgate_core::TenantId::parse(&self.default_tenant)
            .map_err(|e| anyhow::anyhow!("default_tenant: {}", e.message()))?;
        if self.backend.deadline_ms == 0 {
            bail!("backend.deadline_ms must be positive");
        }
        if self.admin.enabled && self.admin.bind == self.server.bind && self.admin.bind.port() != 0 {
            bail!(
                "admin.bind and server.bind are the same address {}; give the admin listener its own",
                self.admin.bind
            );
        }
        if self.server.change_poll_ms == 0 {
            bail!("server.change_poll_ms must be positive");
        }
        if self.store.password_file.is_some() && self.store.password_env.is_some() {
            bail!("set only one of store.password_file and store.password_env");
        }
        if let Some(mode) = &self.store.ssl_mode
            && !SSL_MODES.contains(&mode.as_str())
        {
            bail!("store.ssl_mode must be one of {}", SSL_MODES.join(", "));
        }
        if self.backend.software.kek_file.is_some() && self.backend.software.kek_env.is_some() {
            bail!("set only one of backend.software.kek_file and backend.software.kek_env");
        }
        let mut names = vec![self.backend.software.name.as_str()];
        for (i, member) in self.backend.pkcs11.iter().enumerate() {
            member.validate().map_err(|e| anyhow::anyhow!("backend.pkcs11[{i}] ({}): {e}", member.name))?;
            if names.contains(&member.name.as_str()) {
                bail!("backend.pkcs11[{i}]: the backend name {:?} is used twice", member.name);
            }
            names.push(&member.name);
        }
        if !names.contains(&self.backend.default.as_str()) {
            bail!(
                "backend.default {:?} names no configured backend (configured: {})",
                self.backend.default,
                names.join(", ")
            );
        }
        Ok(())
    }

    /// The store URL as configured (no password added): for display.
    pub fn store_url(&self) -> String {
        if self.store.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("kmsgate.db").display())
        } else {
            self.store.url.clone()
        }
    }

    /// The URL to connect with: for PostgreSQL, the password from `password_file`/`password_env` goes into the
    /// userinfo and `statement_timeout` into the connection options.
    pub fn store_connect_url(&self) -> anyhow::Result<String> {
        let url = self.store_url();
        let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) else {
            return Ok(url);
        };
        let password = match (&self.store.password_file, &self.store.password_env) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read store.password_file {}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            (None, Some(var)) => {
                Some(std::env::var(var).with_context(|| format!("store.password_env: ${var} is not set"))?)
            }
            (None, None) => None,
        };
        let mut out = String::from("postgres://");
        match (password, rest.split_once('@')) {
            (Some(pw), Some((user, host))) => {
                if user.contains(':') {
                    bail!("store.url already carries a password; remove it or drop password_file/password_env");
                }
                out.push_str(&format!("{user}:{}@{host}", percent_encode(&pw)));
            }
            (Some(_), None) => bail!("store.url needs a user (postgres://USER@HOST/DB) to go with the password"),
            (None, _) => out.push_str(rest),
        }
        for (name, value) in [
            ("sslmode", self.store.ssl_mode.clone()),
            ("sslrootcert", self.store.ssl_root_cert.as_ref().map(|p| p.display().to_string())),
        ] {
            let Some(value) = value else { continue };
            if has_param(&out, name) {
                bail!("store.url already sets {name}; drop it from the URL or from the store settings");
            }
            let sep = if out.contains('?') { '&' } else { '?' };
            out.push_str(&format!("{sep}{name}={}", percent_encode(&value)));
        }
        if self.store.statement_timeout_ms > 0 {
            let setting = format!("-c%20statement_timeout%3D{}", self.store.statement_timeout_ms);
            // libpq takes one `options` parameter: extend an existing one (e.g. a search_path) instead.
            if let Some(at) = out.find("options=") {
                let end = out[at..].find('&').map_or(out.len(), |i| at + i);
                out.insert_str(end, &format!("%20{setting}"));
            } else {
                let sep = if out.contains('?') { '&' } else { '?' };
                out.push_str(&format!("{sep}options={setting}"));
            }
        }
        Ok(out)
    }

    pub fn audit_file(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| self.data_dir.join("audit.log"))
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.admin.token_file.clone().unwrap_or_else(|| self.data_dir.join("admin.token"))
    }

    pub fn kek_file(&self) -> PathBuf {
        self.backend.software.kek_file.clone().unwrap_or_else(|| self.data_dir.join("kek"))
    }
}

/// PostgreSQL's `sslmode` values that sqlx implements.
const SSL_MODES: &[&str] = &["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];

/// Whether the URL's query has parameter `name`.
fn has_param(url: &str, name: &str) -> bool {
    url.split_once('?').is_some_and(|(_, q)| q.split('&').any(|kv| kv.split('=').next() == Some(name)))
}

/// Userinfo encoding of RFC 3986: everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_default() {
        let c = Config::default();
        assert_eq!(c.server.bind.to_string(), "127.0.0.1:8080");
        assert!(c.admin.enabled);
        assert_eq!(c.admin.bind.to_string(), "127.0.0.1:8081");
        assert!(c.store_url().ends_with("kmsgate-data/kmsgate.db"));
        assert_eq!(c.kek_file(), PathBuf::from("./kmsgate-data/kek"));
    }

    #[test]
    fn file_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, "[server]\nbind = \"127.0.0.1:9999\"\n[backend]\ndeadline_ms = 50\n").unwrap();
        let (c, src) = Config::load(Some(&p)).unwrap();
        assert_eq!(c.server.bind.port(), 9999);
        assert_eq!(c.backend.deadline_ms, 50);
        assert_eq!(src, Source::File(p.clone()));
        std::fs::write(&p, "[server]\nbnd = \"x\"\n").unwrap();
        let err = Config::load(Some(&p)).unwrap_err();
        assert!(format!("{err:#}").contains("bnd"), "{err:#}");
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn admin_listener_section() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, "[admin]\nbind = \"0.0.0.0:9464\"\n[audit]\ndestination = \"file\"\n").unwrap();
        let (c, _) = Config::load(Some(&p)).unwrap();
        assert_eq!(c.admin.bind.to_string(), "0.0.0.0:9464");
        assert_eq!(c.audit.destination, AuditDestination::File);
        assert_eq!(c.audit_file(), PathBuf::from("./kmsgate-data/audit.log"));
        std::fs::write(&p, "[server]\nbind = \"127.0.0.1:9000\"\n[admin]\nbind = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Some(&p)).unwrap_err();
        assert!(format!("{err:#}").contains("admin.bind"), "{err:#}");
        std::fs::write(
            &p,
            "[server]\nbind = \"127.0.0.1:9000\"\n[admin]\nenabled = false\nbind = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        assert!(Config::load(Some(&p)).is_ok(), "a disabled admin listener binds nothing");
        std::fs::write(&p, "[admin]\nport = 1\n").unwrap();
        assert!(Config::load(Some(&p)).is_err());
    }

    #[test]
    fn pkcs11_members() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        let member = |name: &str| {
            format!(
                "[[backend.pkcs11]]\nname = \"{name}\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n\
                 token_label = \"kmsgate\"\npin_file = \"/run/secrets/hsm-pin\"\nsessions = 8\n"
            )
        };
        std::fs::write(&p, format!("[backend]\ndefault = \"hsm-a\"\n{}{}", member("hsm-a"), member("hsm-b"))).unwrap();
        let (c, _) = Config::load(Some(&p)).unwrap();
        assert_eq!(c.backend.pkcs11.len(), 2);
        assert_eq!((c.backend.pkcs11[1].name.as_str(), c.backend.pkcs11[1].sessions), ("hsm-b", 8));
        assert_eq!(c.backend.pkcs11[0].queue, 256, "defaults apply per member");

        let fails = |toml: String, needle: &str| {
            std::fs::write(&p, toml).unwrap();
            let err = format!("{:#}", Config::load(Some(&p)).unwrap_err());
            assert!(err.contains(needle), "{err}");
        };
        fails(format!("{}{}", member("hsm-a"), member("hsm-a")), "used twice");
        fails(member("software"), "used twice");
        fails(format!("[backend]\ndefault = \"hsm-x\"\n{}", member("hsm-a")), "names no configured backend");
        fails(member("hsm-a").replace("pin_file = \"/run/secrets/hsm-pin\"\n", ""), "pin_file or pin_env");
        fails(format!("{}pin = \"1234\"\n", member("hsm-a")), "pin");
    }

    #[test]
    fn postgres_password_and_statement_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cr:t@/\n").unwrap();
        let mut c = Config::default();
        c.store.url = "postgres://kms@db.internal:5432/kms?sslmode=require".into();
        c.store.password_file = Some(pw);
        assert_eq!(
            c.store_connect_url().unwrap(),
            "postgres://kms:s3cr%3At%40%2F@db.internal:5432/kms?sslmode=require&options=-c%20statement_timeout%3D5000"
        );
        assert_eq!(
            c.store_url(),
            "postgres://kms@db.internal:5432/kms?sslmode=require",
            "display form has no password"
        );
        c.store.password_file = None;
        c.store.url = "postgres://kms@db/kms?options=-c%20search_path%3Dt1&sslmode=disable".into();
        assert_eq!(
            c.store_connect_url().unwrap(),
            "postgres://kms@db/kms?options=-c%20search_path%3Dt1%20-c%20statement_timeout%3D5000&sslmode=disable"
        );
        c.store.password_file = Some(dir.path().join("pw"));
        c.store.url = "postgres://kms:inline@db/kms".into();
        assert!(c.store_connect_url().is_err());
        c.store.url = "sqlite:///tmp/x.db".into();
        assert_eq!(c.store_connect_url().unwrap(), "sqlite:///tmp/x.db");
    }

    #[test]
    fn postgres_tls_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(
            &p,
            "[store]\nurl = \"postgres://kms@db.internal/kms\"\nssl_mode = \"verify-full\"\n\
             ssl_root_cert = \"/etc/kmsgate/db ca.pem\"\nstatement_timeout_ms = 0\n",
        )
        .unwrap();
        let (c, _) = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.store_connect_url().unwrap(),
            "postgres://kms@db.internal/kms?sslmode=verify-full&sslrootcert=%2Fetc%2Fkmsgate%2Fdb%20ca.pem"
        );
        let mut twice = c.clone();
        twice.store.url = "postgres://kms@db.internal/kms?sslmode=require".into();
        assert!(format!("{:#}", twice.store_connect_url().unwrap_err()).contains("sslmode"));
        std::fs::write(&p, "[store]\nssl_mode = \"verify_full\"\n").unwrap();
        assert!(format!("{:#}", Config::load(Some(&p)).unwrap_err()).contains("store.ssl_mode"));
    }
}
