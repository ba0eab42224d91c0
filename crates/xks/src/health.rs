//! GetHealthStatus: a deep check (a real encrypt and decrypt through the dispatcher on a dedicated internal
//! health key per backend, never a customer key) combined with the backends' own probes, run in the
//! background and cached; a request never sees a result older than [`MAX_AGE`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmsgate_core::{AliasName, Caller, Dispatcher, Frontend, HealthReport, HealthStatus, Key, TenantId};
use serde::Serialize;

use crate::config::XksConfig;

/// The spec: a cached health result MUST NOT be older than one minute.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Replicas whose heartbeat is at most this old count towards `xksProxyFleetSize`.
pub const REPLICA_WINDOW: Duration = Duration::from_secs(30);
/// Tag carried by every key kmsgate creates for itself; XKS never serves such keys.
pub const INTERNAL_TAG: &str = "kmsgate-internal";
const HEALTH_ALIAS_PREFIX: &str = "alias/kmsgate-internal/xks-health-";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FleetMember {
    pub id: String,
    pub model: String,
    #[serde(rename = "healthStatus")]
    pub health_status: HealthStatus,
}

/// The GetHealthStatus response body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub xks_proxy_fleet_size: u32,
    pub xks_proxy_vendor: String,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<FleetMember>,
}

#[derive(Debug)]
struct Snapshot {
    at: Instant,
    body: Arc<HealthBody>,
}

/// Per-tenant cached results (each key store's health key lives in its own tenant).
#[derive(Debug, Default)]
pub struct HealthCache {
    snapshots: Mutex<HashMap<TenantId, Snapshot>>,
    /// One deep check at a time: concurrent requests wait for it instead of piling onto the HSM.
    running: tokio::sync::Mutex<()>,
}

/// Whether a key is one kmsgate made for itself (sealing, health): never reachable through XKS. The
/// dispatcher already answers `KeyNotFound` for them; this keeps the frontend's own check in step.
pub fn is_internal(key: &Key) -> bool {
    key.is_internal() || key.tags.contains_key(INTERNAL_TAG)
}

fn health_caller(tenant: &TenantId) -> Caller {
    Caller {
        tenant: tenant.clone(),
        identity: "xks-health".to_owned(),
        frontend: Frontend::Xks,
        request_id: uuid::Uuid::new_v4().to_string(),
        metadata: BTreeMap::from([("purpose".to_owned(), "xks deep health check".to_owned())]),
    }
}

fn health_alias(backend: &str) -> Option<AliasName> {
    let safe: String =
        backend.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    AliasName::parse(&format!("{HEALTH_ALIAS_PREFIX}{safe}")).ok()
}

/// A real encrypt and decrypt on the backend's internal health key (the dispatcher's own path: the key is
/// invisible to every caller, XKS included).
async fn crypto_check(d: &Dispatcher, tenant: &TenantId, backend: &str) -> Result<(), String> {
    let caller = health_caller(tenant);
    let alias = health_alias(backend).ok_or("backend name unusable in an alias")?;
    d.probe_backend(&caller, backend, &alias).await.map_err(|e| e.to_string())
}

/// Folds probe statuses and crypto results into the spec's ACTIVE / DEGRADED / UNAVAILABLE per member.
pub fn fleet(
    report: &HealthReport,
    backends: &[(String, &'static str)],
    crypto: &HashMap<String, bool>,
) -> Vec<FleetMember> {
    let backend_of = |member: &str| {
        backends
            .iter()
            .map(|(n, _)| n)
            .find(|n| member == n.as_str() || member.strip_prefix(n.as_str()).is_some_and(|r| r.starts_with('/')))
            .cloned()
    };
    let members_of = |b: &str| report.members.iter().filter(|m| backend_of(&m.id).as_deref() == Some(b)).count();
    let mut out: Vec<FleetMember> = report
        .members
        .iter()
        .map(|m| {
            let backend = backend_of(&m.id);
            let crypto_ok = backend.as_ref().and_then(|b| crypto.get(b).copied());
            let status = match (crypto_ok, m.status) {
                (Some(false), HealthStatus::Active) if backend.as_deref().is_some_and(|b| members_of(b) > 1) => {
                    HealthStatus::Degraded
                }
                (Some(false), _) => HealthStatus::Unavailable,
                (_, HealthStatus::Active) if !report.store_ok => HealthStatus::Degraded,
                (_, HealthStatus::Active) => HealthStatus::Active,
                (_, HealthStatus::Degraded) => HealthStatus::Degraded,
                // The probe says down, yet real cryptography worked: serving, but not healthy.
                (Some(true), HealthStatus::Unavailable) => HealthStatus::Degraded,
                (None, HealthStatus::Unavailable) => HealthStatus::Unavailable,
            };
            FleetMember { id: m.id.clone(), model: m.model.clone(), health_status: status }
        })
        .collect();
    if out.is_empty() {
        out.push(FleetMember {
            id: "kmsgate".to_owned(),
            model: "no key backend".to_owned(),
            health_status: HealthStatus::Unavailable,
        });
    }
    // The spec allows 1-10 entries; the unhealthy ones matter most to KMS, so they stay.
    out.sort_by_key(|m| match m.health_status {
        HealthStatus::Unavailable => 0,
        HealthStatus::Degraded => 1,
        HealthStatus::Active => 2,
    });
    out.truncate(10);
    out
}

fn ekm_vendor(cfg: &XksConfig, backends: &[(String, &'static str)]) -> String {
    if !cfg.ekm_vendor.is_empty() {
        return cfg.ekm_vendor.clone();
    }
    let mut kinds: Vec<&str> = backends
        .iter()
        .map(|(_, k)| match *k {
            "software" => "kmsgate software key store",
            "pkcs11" => "PKCS#11 HSM",
            other => other,
        })
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    if kinds.is_empty() { "kmsgate".to_owned() } else { kinds.join(", ") }
}

impl HealthCache {
    /// The cached answer for `tenant` if fresh enough.
    pub fn cached(&self, tenant: &TenantId) -> Option<Arc<HealthBody>> {
        let map = self.snapshots.lock().ok()?;
        map.get(tenant).filter(|s| s.at.elapsed() < MAX_AGE).map(|s| s.body.clone())
    }

    fn age(&self, tenant: &TenantId) -> Option<Duration> {
        let map = self.snapshots.lock().ok()?;
        map.get(tenant).map(|s| s.at.elapsed())
    }

    pub fn tenants(&self) -> Vec<TenantId> {
        self.snapshots.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// The answer for `tenant`: cached, or from a check run now (coalesced with one already running).
    pub async fn get(&self, d: &Dispatcher, cfg: &XksConfig, tenant: &TenantId) -> Arc<HealthBody> {
        if let Some(b) = self.cached(tenant) {
            return b;
        }
        let _running = self.running.lock().await;
        if let Some(b) = self.cached(tenant) {
            return b;
        }
        self.check(d, cfg, tenant).await
    }

    /// Runs the deep check for `tenant` unless a result younger than `min_age` exists.
    pub async fn refresh(&self, d: &Dispatcher, cfg: &XksConfig, tenant: &TenantId, min_age: Duration) {
        let _running = self.running.lock().await;
        if self.age(tenant).is_some_and(|a| a < min_age) {
            return;
        }
        self.check(d, cfg, tenant).await;
    }

    async fn check(&self, d: &Dispatcher, cfg: &XksConfig, tenant: &TenantId) -> Arc<HealthBody> {
        let started = Instant::now();
        let backends: Vec<(String, &'static str)> =
            d.backends().all().map(|b| (b.name().to_owned(), b.kind())).collect();
        let mut crypto = HashMap::new();
        for (name, _) in &backends {
            let result = crypto_check(d, tenant, name).await;
            if let Err(e) = &result {
                tracing::warn!(target: "xks", backend = %name, tenant = %tenant, error = %e, "XKS deep health check failed");
            }
            crypto.insert(name.clone(), result.is_ok());
        }
        let report = d.readiness().await;
        let fleet_size = if cfg.fleet_size > 0 {
            cfg.fleet_size
        } else {
            match d.live_replicas(REPLICA_WINDOW).await {
                Ok(r) => u32::try_from(r.len()).unwrap_or(u32::MAX).max(1),
                Err(_) => 1,
            }
        };
        let body = Arc::new(HealthBody {
            xks_proxy_fleet_size: fleet_size,
            xks_proxy_vendor: cfg.vendor.clone(),
            xks_proxy_model: cfg.model.clone(),
            ekm_vendor: ekm_vendor(cfg, &backends),
            ekm_fleet_details: fleet(&report, &backends, &crypto),
        });
        tracing::debug!(target: "xks", tenant = %tenant, took_ms = started.elapsed().as_millis(), "XKS health refreshed");
        if let Ok(mut map) = self.snapshots.lock() {
            map.insert(tenant.clone(), Snapshot { at: Instant::now(), body: body.clone() });
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsgate_core::MemberHealth;

    fn member(id: &str, status: HealthStatus) -> MemberHealth {
        MemberHealth { id: id.into(), model: "m".into(), status, detail: String::new() }
    }

    #[test]
    fn fleet_statuses() {
        let backends = vec![("software".to_owned(), "software"), ("hsm".to_owned(), "pkcs11")];
        let report = HealthReport {
            store_ok: true,
            members: vec![
                member("software", HealthStatus::Active),
                member("hsm/1", HealthStatus::Active),
                member("hsm/2", HealthStatus::Unavailable),
            ],
        };
        let ok = HashMap::from([("software".to_owned(), true), ("hsm".to_owned(), true)]);
        let f = fleet(&report, &backends, &ok);
        let status = |f: &[FleetMember], id: &str| f.iter().find(|m| m.id == id).map(|m| m.health_status);
        assert_eq!(status(&f, "software"), Some(HealthStatus::Active));
        assert_eq!(status(&f, "hsm/1"), Some(HealthStatus::Active));
        assert_eq!(status(&f, "hsm/2"), Some(HealthStatus::Degraded));
        assert_eq!(f[0].health_status, HealthStatus::Degraded, "unhealthy members come first");

        let bad = HashMap::from([("software".to_owned(), false), ("hsm".to_owned(), false)]);
        let f = fleet(&report, &backends, &bad);
        assert_eq!(status(&f, "software"), Some(HealthStatus::Unavailable));
        assert_eq!(status(&f, "hsm/1"), Some(HealthStatus::Degraded));
        assert_eq!(status(&f, "hsm/2"), Some(HealthStatus::Unavailable));

        let store_down = HealthReport { store_ok: false, ..report.clone() };
        assert_eq!(status(&fleet(&store_down, &backends, &ok), "software"), Some(HealthStatus::Degraded));

        let many = HealthReport {
            store_ok: true,
            members: (0..15).map(|i| member(&format!("hsm/{i}"), HealthStatus::Active)).collect(),
        };
        assert_eq!(fleet(&many, &backends, &ok).len(), 10);
        let none = HealthReport { store_ok: true, members: vec![] };
        assert_eq!(fleet(&none, &backends, &ok).len(), 1);
    }

    #[test]
    fn vendor_strings() {
        let cfg = XksConfig::default();
        assert_eq!(
            ekm_vendor(&cfg, &[("a".into(), "software"), ("b".into(), "software")]),
            "kmsgate software key store"
        );
        assert_eq!(ekm_vendor(&cfg, &[("a".into(), "pkcs11")]), "PKCS#11 HSM");
        let custom = XksConfig { ekm_vendor: "Thales".into(), ..XksConfig::default() };
        assert_eq!(ekm_vendor(&custom, &[]), "Thales");
        assert_eq!(
            health_alias("soft hsm").map(|a| a.to_string()),
            Some("alias/kmsgate-internal/xks-health-soft-hsm".into())
        );
    }
}
