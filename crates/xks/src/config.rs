//! The `[xks]` section of the server configuration. Per-key-store settings (prefix, keys, quota, rules,
//! credentials) live in the store, so they change without a restart; only process-wide knobs live here.

use serde::{Deserialize, Serialize};

/// Largest AAD the spec's length-prefixed construction can carry (its length is a big-endian `u16`).
pub const MAX_AAD_ENCODABLE: usize = u16::MAX as usize;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct XksConfig {
    /// Serve the XKS API on the main listener.
    pub enabled: bool,
    /// SigV4 regions accepted in the credential scope (the KMS regions that call); empty accepts any.
    pub regions: Vec<String>,
    /// Allowed difference between `X-Amz-Date` and this server's clock, in seconds (the spec suggests 5 min).
    pub clock_skew_secs: u64,
    /// Largest plaintext (Encrypt) or ciphertext (Decrypt) accepted, in bytes; larger is 501
    /// UnsupportedOperationException. The spec requires at least 4300.
    pub max_plaintext_bytes: usize,
    /// Largest additional authenticated data accepted, in bytes (at least 8192 by the spec, at most 65535 by
    /// the length prefix); larger is 501 UnsupportedOperationException.
    pub max_aad_bytes: usize,
    /// How often the deep health check (real encrypt and decrypt on each backend's health key) runs in the
    /// background, in seconds. GetHealthStatus answers from its result, never older than 60 s.
    pub health_refresh_secs: u64,
    /// `xksProxyVendor` of GetHealthStatus.
    pub vendor: String,
    /// `xksProxyModel` of GetHealthStatus.
    pub model: String,
    /// `ekmVendor` of GetHealthStatus; empty derives it from the configured backends.
    pub ekm_vendor: String,
    /// `xksProxyFleetSize`; 0 counts the replicas that heartbeat through the store.
    pub fleet_size: u32,
}

impl Default for XksConfig {
    fn default() -> Self {
        XksConfig {
            enabled: true,
            regions: Vec::new(),
            clock_skew_secs: 300,
            max_plaintext_bytes: 65536,
            max_aad_bytes: MAX_AAD_ENCODABLE,
            health_refresh_secs: 20,
            vendor: "kmsgate".to_owned(),
            model: format!("kmsgate XKS proxy {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: String::new(),
            fleet_size: 0,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl XksConfig {
    /// Checks the ranges the spec and the wire format impose.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_owned()));
        if self.max_plaintext_bytes < 4300 {
            return bad("xks.max_plaintext_bytes must be at least 4300 (the XKS specification's minimum)");
        }
        if !(8192..=MAX_AAD_ENCODABLE).contains(&self.max_aad_bytes) {
            return bad("xks.max_aad_bytes must be 8192 to 65535 (spec minimum; 16-bit length prefix)");
        }
        if !(1..=60).contains(&self.health_refresh_secs) {
            return bad("xks.health_refresh_secs must be 1 to 60 (cached health may be at most a minute old)");
        }
        if self.clock_skew_secs == 0 || self.clock_skew_secs > 3600 {
            return bad("xks.clock_skew_secs must be 1 to 3600");
        }
        for s in [&self.vendor, &self.model] {
            if s.is_empty() || s.len() > 256 || !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
                return bad("xks.vendor and xks.model must be 1-256 printable ASCII characters");
            }
        }
        if self.ekm_vendor.len() > 256 || !self.ekm_vendor.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return bad("xks.ekm_vendor must be at most 256 printable ASCII characters");
        }
        for r in &self.regions {
            if r.is_empty()
                || r.len() > 64
                || !r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return bad("xks.regions entries must be region names such as eu-west-1");
            }
        }
        Ok(())
    }

    pub fn region_allowed(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_enforced() {
        let c = XksConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert!(c.model.contains(env!("CARGO_PKG_VERSION")));
        assert!(c.region_allowed("anything-1"));
        let mut c2 = c.clone();
        c2.regions = vec!["eu-west-1".into()];
        assert!(c2.region_allowed("eu-west-1"));
        assert!(!c2.region_allowed("us-east-1"));
        for f in [
            |c: &mut XksConfig| c.max_plaintext_bytes = 4299,
            |c: &mut XksConfig| c.max_aad_bytes = 65536,
            |c: &mut XksConfig| c.max_aad_bytes = 100,
            |c: &mut XksConfig| c.health_refresh_secs = 61,
            |c: &mut XksConfig| c.regions = vec!["EU WEST".into()],
            |c: &mut XksConfig| c.vendor = "\u{e9}".into(),
        ] {
            let mut bad = XksConfig::default();
            f(&mut bad);
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let parsed: XksConfig = serde_json::from_str(r#"{"regions":["us-east-1"]}"#).unwrap_or_default();
        assert_eq!(parsed.regions, vec!["us-east-1"]);
        assert_eq!(parsed.clock_skew_secs, 300);
        assert!(serde_json::from_str::<XksConfig>(r#"{"regoins":[]}"#).is_err());
    }
}
