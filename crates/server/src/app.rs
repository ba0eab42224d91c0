//! Assembles the store, the backends and the dispatcher from configuration. `serve` and the admin CLI share
//! this, so the CLI works on exactly the data a server would.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kmsgate_core::{Caller, Dispatcher, DispatcherConfig, PageRequest, Store, TenantId};
use kmsgate_hsm::{Kek, Pkcs11Backend, SoftwareBackend};
use kmsgate_store::{SqlStore, StoreOptions};

use crate::config::Config;

/// What start-up did, for the banner.
#[derive(Debug, Default)]
pub struct Bootstrap {
    pub created_data_dir: bool,
    pub generated_kek: bool,
}

/// The assembled core of a kmsgate process.
#[derive(Debug, Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub dispatcher: Dispatcher,
    pub tenant: TenantId,
    /// The PKCS#11 fleet members (also registered in the dispatcher), for `kmsgate hsm` and key adoption.
    pub pkcs11: Vec<Arc<Pkcs11Backend>>,
    /// The process's metrics (served on the admin listener's `/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl App {
    /// Opens everything the configuration names. With the embedded default this creates the data directory
    /// (mode 0700) and, for a store that holds no keys yet, a fresh root key file (mode 0600).
    // Field-by-field assignment onto `DispatcherConfig::default()` is deliberate: options core adds later
    // keep their defaults here instead of breaking this literal.
    #[allow(clippy::field_reassign_with_default)]
    pub async fn open(config: Config) -> anyhow::Result<(App, Bootstrap)> {
        let mut boot = Bootstrap::default();
        let uses_data_dir = config.store.url.is_empty()
            || (config.backend.software.kek_file.is_none() && config.backend.software.kek_env.is_none())
            || (config.audit.destination == crate::config::AuditDestination::File && config.audit.path.is_none());
        if uses_data_dir && !config.data_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.data_dir)
                .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
            boot.created_data_dir = true;
        }

        let url = config.store_url();
        let options = StoreOptions::default()
            .max_connections(config.store.max_connections.max(1))
            .acquire_timeout(Duration::from_millis(config.store.acquire_timeout_ms.max(1)));
        let store: Arc<dyn Store> = Arc::new(
            SqlStore::open_with(&config.store_connect_url()?, options)
                .await
                .map_err(core_err)
                .with_context(|| format!("cannot open the store {}", redact_url(&url)))?,
        );

        let kek = load_kek(&config, store.as_ref(), &mut boot).await?;
        let software = SoftwareBackend::new(config.backend.software.name.clone(), kek);
        let mut pkcs11 = Vec::with_capacity(config.backend.pkcs11.len());
        for member in &config.backend.pkcs11 {
            let backend = Pkcs11Backend::start(member.clone())
                .await
                .map_err(core_err)
                .with_context(|| format!("cannot start the PKCS#11 backend {}", member.name))?;
            pkcs11.push(Arc::new(backend));
        }

        let mut dcfg = DispatcherConfig::default();
        dcfg.backend_deadline = Duration::from_millis(config.backend.deadline_ms);
        dcfg.store_deadline = Duration::from_millis(config.store.deadline_ms.max(1));
        dcfg.cache_capacity = config.cache.capacity;
        dcfg.cache_ttl = Duration::from_secs(config.cache.ttl_secs.max(1));
        dcfg.default_backend = config.backend.default.clone();
        dcfg.max_plaintext = config.limits.max_plaintext_bytes;
        dcfg.max_aad = config.limits.max_aad_bytes;
        dcfg.max_keys_per_tenant = (config.limits.max_keys_per_tenant > 0).then_some(config.limits.max_keys_per_tenant);
        dcfg.max_secrets_per_tenant =
            (config.limits.max_secrets_per_tenant > 0).then_some(config.limits.max_secrets_per_tenant);
        dcfg.max_secret_bytes = config.limits.max_secret_bytes;
        let mut builder = Dispatcher::builder(store).backend(Arc::new(software));
        match config.audit.destination {
            crate::config::AuditDestination::Log => {}
            crate::config::AuditDestination::File => {
                let sink = crate::audit_log::ChainSink::open(crate::audit_log::Destination::File(config.audit_file()))?;
                builder = builder.audit(sink);
            }
            crate::config::AuditDestination::Stdout => {
                builder = builder.audit(crate::audit_log::ChainSink::open(crate::audit_log::Destination::Stdout)?);
            }
            crate::config::AuditDestination::Store => {
                let dest = crate::audit_log::Destination::Store(config.store_connect_url()?);
                builder = builder.audit(crate::audit_log::ChainSink::open(dest)?);
            }
        }
        for member in &pkcs11 {
            builder = builder.backend(member.clone());
        }
        let dispatcher = builder.config(dcfg).build().await.map_err(core_err).context("cannot start the dispatcher")?;
        let tenant = TenantId::parse(&config.default_tenant).map_err(core_err)?;
        dispatcher.ensure_tenant(&tenant).await.map_err(core_err).context("cannot create the default tenant")?;
        let metrics = Arc::new(crate::metrics::Metrics::new(&dispatcher, pkcs11.clone()));
        Ok((App { config: Arc::new(config), dispatcher, tenant, pkcs11, metrics }, boot))
    }

    /// The local administrator of the default tenant.
    pub fn admin(&self) -> Caller {
        Caller::admin(self.tenant.clone())
    }
}

async fn load_kek(config: &Config, store: &dyn Store, boot: &mut Bootstrap) -> anyhow::Result<Kek> {
    if let Some(var) = &config.backend.software.kek_env {
        return Kek::from_env(var).map_err(core_err).with_context(|| format!("cannot read the root key from ${var}"));
    }
    if let Ok(v) = std::env::var("KMSGATE_KEK")
        && !v.is_empty()
        && config.backend.software.kek_file.is_none()
    {
        return Kek::from_env("KMSGATE_KEK").map_err(core_err).context("cannot read the root key from $KMSGATE_KEK");
    }
    let path = config.kek_file();
    if path.exists() {
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the root key file is readable by others; chmod 600 it");
        }
        return Kek::from_file(&path)
            .map_err(core_err)
            .with_context(|| format!("cannot read the root key {}", path.display()));
    }
    // Never mint a new root key for a store that already holds keys: they could not be opened with it.
    if store_has_keys(store).await? {
        bail!(
            "the root key file {} is missing, but the store holds keys wrapped under a root key: restore the file \
             (or set backend.software.kek_file / KMSGATE_KEK)",
            path.display()
        );
    }
    let kek = Kek::generate_file(&path)
        .map_err(core_err)
        .with_context(|| format!("cannot create the root key {}", path.display()))?;
    boot.generated_kek = true;
    Ok(kek)
}

async fn store_has_keys(store: &dyn Store) -> anyhow::Result<bool> {
    for t in store.list_tenants().await.map_err(core_err)? {
        let page = store.list_keys(&t.id, &PageRequest::first(1)).await.map_err(core_err)?;
        if !page.items.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Turns a core error into an anyhow error carrying its safe message and, for operators, its source.
pub fn core_err(e: kmsgate_core::Error) -> anyhow::Error {
    match e.internal_source() {
        Some(src) => anyhow::anyhow!("{} ({src})", e.message()),
        None => anyhow::anyhow!("{}", e.message()),
    }
}

/// Database URLs can carry passwords; print them without.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact_url("postgres://u:p@h:5432/db"), "postgres://***@h:5432/db");
        assert_eq!(redact_url("sqlite://./x.db"), "sqlite://./x.db");
    }
}
