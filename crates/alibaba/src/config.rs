//! `[alibaba]` settings of the instance API frontend.

use serde::{Deserialize, Serialize};

/// The Alibaba Cloud KMS instance API (docs/alibaba.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlibabaConfig {
    /// Serve `POST /` with `x-kms-apiname` on the main listener.
    pub enabled: bool,
    /// Allowed distance between the request's `date` header and our clock, in seconds (the vendor's 15 minutes).
    pub max_clock_skew_secs: u64,
    /// Largest request body; larger bodies get HTTP 413 (the vendor's 3 MB).
    pub max_body_bytes: usize,
    /// Largest plaintext of a symmetric Encrypt (the vendor's 6 KB).
    pub max_symmetric_plaintext_bytes: usize,
    /// Largest message of an asymmetric operation (the vendor's 1 KB; also bounded by RSA-OAEP itself).
    pub max_asymmetric_plaintext_bytes: usize,
    /// Requests per second each ClientKey may make unless it has its own limit
    /// (`kmsgate alibaba client-keys create --qps`); 0: unlimited. Excess requests get 429 Rejected.Throttling.
    pub client_key_qps: u32,
    /// Serve the OpenAPI (RPC style, `Version=2016-01-20`) on `/` for requests without `x-kms-*` headers or a
    /// protobuf body (docs/alibaba-openapi.md).
    pub openapi_enabled: bool,
    /// Requests per second each OpenAPI AccessKey may make; 0: unlimited. Excess requests get 429
    /// Rejected.Throttling.
    pub access_key_qps: u32,
    /// How long an import token of GetParametersForImport stays valid, in seconds (the vendor's 24 hours).
    pub import_token_ttl_secs: u64,
}

impl AlibabaConfig {
    /// Rejects settings that would make every request fail.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=3600).contains(&self.max_clock_skew_secs) {
            return Err("alibaba.max_clock_skew_secs must be 1-3600".to_owned());
        }
        if self.max_body_bytes < 64 * 1024 {
            return Err("alibaba.max_body_bytes must be at least 65536".to_owned());
        }
        if self.max_symmetric_plaintext_bytes == 0 || self.max_asymmetric_plaintext_bytes == 0 {
            return Err("alibaba.max_*_plaintext_bytes must be positive".to_owned());
        }
        if self.import_token_ttl_secs == 0 {
            return Err("alibaba.import_token_ttl_secs must be positive".to_owned());
        }
        Ok(())
    }
}

impl Default for AlibabaConfig {
    fn default() -> Self {
        AlibabaConfig {
            enabled: true,
            max_clock_skew_secs: 15 * 60,
            max_body_bytes: 3 * 1024 * 1024,
            max_symmetric_plaintext_bytes: 6 * 1024,
            max_asymmetric_plaintext_bytes: 1024,
            client_key_qps: 0,
            openapi_enabled: true,
            access_key_qps: 0,
            import_token_ttl_secs: 86_400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_nonsense_does_not() {
        assert_eq!(AlibabaConfig::default().validate(), Ok(()));
        let zero_skew = AlibabaConfig { max_clock_skew_secs: 0, ..AlibabaConfig::default() };
        assert!(zero_skew.validate().is_err());
        let tiny = AlibabaConfig { max_body_bytes: 10, ..AlibabaConfig::default() };
        assert!(tiny.validate().is_err());
    }
}
