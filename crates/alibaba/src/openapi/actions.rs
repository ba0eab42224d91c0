//! The OpenAPI actions: one dispatcher call (or a few) each, parameters and fields named as in the vendor's
//! 2016-01-20 models.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_lc_rs::digest;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{
    AliasName, Caller, CreateKeyRequest, DecryptRequest, DeleteMode, Document, EncryptRequest, EncryptionAlgorithm,
    ErrorKind, Key, KeyOrigin, KeyRef, KeySpec, KeyState, KeyUsage, KeyUsageSet, PageRequest, Precondition,
    PutSecretRequest, STAGE_CURRENT, STAGE_PREVIOUS, Secret, SecretListFilter, SecretPath, SecretSelector, SignInput,
    SignRequest, SigningAlgorithm, TenantId, Timestamp, VersionSelector, WriteMode,
};
use serde_json::{Value, json};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::OpenApiState;
use super::error::OapiError;
use super::params::Params;
use crate::service::KIND_VERSION_INDEX;

/// `keyVersionId(36) | iv(12) | ciphertext‖tag`: the OpenAPI blob, which the instance SDK's TransferClient
/// turns into an Advance blob by prepending `$`, `0x00`, `0x02` (and back by stripping them).
const VERSION_ID_LEN: usize = 36;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

pub(crate) struct Ctx<'a> {
    pub state: &'a OpenApiState,
    pub caller: &'a Caller,
    pub p: &'a Params,
    pub region: String,
    /// Whether a key was named by alias: the core reports an unknown alias as an unknown key, the vendor
    /// names the alias.
    pub alias_used: std::sync::atomic::AtomicBool,
}

fn b64(name: &str, v: &str) -> Result<Vec<u8>, OapiError> {
    STANDARD.decode(v).map_err(|_| OapiError::invalid(name))
}

fn vendor_spec(spec: KeySpec) -> &'static str {
    match spec {
        KeySpec::Aes256 => "Aliyun_AES_256",
        KeySpec::Rsa2048 => "RSA_2048",
        KeySpec::Rsa3072 => "RSA_3072",
        KeySpec::EcP256 => "EC_P256",
        KeySpec::Hmac256 => "HMAC_SHA256",
    }
}

fn parse_spec(s: &str) -> Result<KeySpec, OapiError> {
    match s {
        "Aliyun_AES_256" => Ok(KeySpec::Aes256),
        "RSA_2048" => Ok(KeySpec::Rsa2048),
        "RSA_3072" => Ok(KeySpec::Rsa3072),
        "EC_P256" => Ok(KeySpec::EcP256),
        "HMAC_SHA256" => Ok(KeySpec::Hmac256),
        "Aliyun_AES_128" | "Aliyun_AES_192" | "Aliyun_SM4" | "EC_SM2" | "EC_P256K" | "RSA_4096" => Err(OapiError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedOperation",
            "This gateway does not offer that KeySpec.",
        )),
        _ => Err(OapiError::invalid("KeySpec")),
    }
}

fn vendor_usage(usage: KeyUsageSet) -> &'static str {
    if usage.contains(KeyUsage::Sign) {
        "SIGN/VERIFY"
    } else if usage.contains(KeyUsage::GenerateMac) {
        "GENERATE/VERIFY_MAC"
    } else {
        "ENCRYPT/DECRYPT"
    }
}

fn stage_out(s: &str) -> String {
    match s {
        STAGE_CURRENT => "ACSCurrent".to_owned(),
        STAGE_PREVIOUS => "ACSPrevious".to_owned(),
        other => other.to_owned(),
    }
}

fn stage_in(s: &str) -> String {
    match s {
        "ACSCurrent" => STAGE_CURRENT.to_owned(),
        "ACSPrevious" => STAGE_PREVIOUS.to_owned(),
        other => other.to_owned(),
    }
}

/// The vendor's encoding of an EncryptionContext as AAD (what the TransferClient sends the instance API):
/// the ASCII hex SHA-256 of `k1=v1&k2=v2` with the keys sorted.
fn context_aad(v: Option<Value>, name: &str) -> Result<Vec<u8>, OapiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Value::Object(map) = v else { return Err(OapiError::invalid(name)) };
    if map.is_empty() {
        return Ok(Vec::new());
    }
    let mut pairs = Vec::with_capacity(map.len());
    for (k, v) in &map {
        let Value::String(s) = v else { return Err(OapiError::invalid(name)) };
        pairs.push(format!("{k}={s}"));
    }
    pairs.sort();
    Ok(hex::encode(digest::digest(&digest::SHA256, pairs.join("&").as_bytes())).into_bytes())
}

/// Page arithmetic of the vendor's PageNumber (from 1) and PageSize (1-100, default 10).
fn page(p: &Params) -> Result<(usize, usize), OapiError> {
    let number = p.u32("PageNumber")?.unwrap_or(1);
    let size = p.u32("PageSize")?.unwrap_or(10);
    if number == 0 {
        return Err(OapiError::invalid("PageNumber"));
    }
    if !(1..=100).contains(&size) {
        return Err(OapiError::invalid("PageSize"));
    }
    Ok((usize::try_from(number).unwrap_or(1), usize::try_from(size).unwrap_or(10)))
}

fn slice<T: Clone>(all: &[T], (number, size): (usize, usize)) -> Vec<T> {
    all.iter().skip((number - 1).saturating_mul(size)).take(size).cloned().collect()
}

/// The tag and alias prefix of keys the gateway creates for itself.
const INTERNAL_TAG: &str = "kmsgate-internal";
const INTERNAL_ALIAS_PREFIX: &str = "alias/kmsgate-internal/";

/// Gives up on listings larger than this rather than reading a tenant's whole inventory per request.
const MAX_LISTED: usize = 10_000;

impl Ctx<'_> {
    fn d(&self) -> &kmsgate_core::Dispatcher {
        &self.state.dispatcher
    }

    pub async fn dispatch(&self, action: &str) -> Result<Value, OapiError> {
        let secret_action = matches!(
            action,
            "CreateSecret"
                | "PutSecretValue"
                | "GetSecretValue"
                | "DescribeSecret"
                | "DeleteSecret"
                | "RestoreSecret"
                | "ListSecretVersionIds"
                | "UpdateSecretVersionStage"
        );
        let r = self.run(action).await;
        let by_alias = self.alias_used.load(std::sync::atomic::Ordering::Relaxed);
        match r {
            Err(e) if by_alias && e.code == "Forbidden.KeyNotFound" => Err(OapiError::alias_not_found()),
            // The core's generic "already exists" is an alias conflict everywhere but for secrets.
            Err(e) if secret_action && e.code == "AliasAlreadyExists" => {
                Err(OapiError::new(StatusCode::BAD_REQUEST, "Rejected.ResourceExist", "The secret already exists."))
            }
            other => other,
        }
    }

    async fn run(&self, action: &str) -> Result<Value, OapiError> {
        match action {
            "CreateKey" => self.create_key().await,
            "DescribeKey" => self.describe_key().await,
            "ListKeys" => self.list_keys().await,
            "EnableKey" => self.set_state(action).await,
            "DisableKey" => self.set_state(action).await,
            "ScheduleKeyDeletion" => self.set_state(action).await,
            "CancelKeyDeletion" => self.set_state(action).await,
            "UpdateKeyDescription" => self.update_description().await,
            "CreateKeyVersion" => self.create_key_version().await,
            "ListKeyVersions" => self.list_key_versions().await,
            "DescribeKeyVersion" => self.describe_key_version().await,
            "TagResource" => self.tag_resource().await,
            "UntagResource" => self.untag_resource().await,
            "ListResourceTags" => self.list_resource_tags().await,
            "CreateAlias" => self.alias(true).await,
            "UpdateAlias" => self.alias(false).await,
            "DeleteAlias" => self.delete_alias().await,
            "ListAliases" => self.list_aliases(false).await,
            "ListAliasesByKeyId" => self.list_aliases(true).await,
            "Encrypt" => self.encrypt().await,
            "Decrypt" => self.decrypt().await,
            "GenerateDataKey" => self.generate_data_key(true).await,
            "GenerateDataKeyWithoutPlaintext" => self.generate_data_key(false).await,
            "ReEncrypt" => self.re_encrypt().await,
            "AsymmetricSign" => self.asymmetric_sign().await,
            "AsymmetricVerify" => self.asymmetric_verify().await,
            "AsymmetricEncrypt" => self.asymmetric_encrypt().await,
            "AsymmetricDecrypt" => self.asymmetric_decrypt().await,
            "GetPublicKey" => self.get_public_key().await,
            "GenerateMac" => self.generate_mac().await,
            "VerifyMac" => self.verify_mac().await,
            "CreateSecret" => self.put_secret(WriteMode::CreateOnly).await,
            "PutSecretValue" => self.put_secret(WriteMode::UpdateOnly).await,
            "GetSecretValue" => self.get_secret_value().await,
            "DescribeSecret" => self.describe_secret().await,
            "ListSecrets" => self.list_secrets().await,
            "DeleteSecret" => self.delete_secret().await,
            "RestoreSecret" => self.restore_secret().await,
            "ListSecretVersionIds" => self.list_secret_version_ids().await,
            "UpdateSecretVersionStage" => self.update_secret_version_stage().await,
            "GetRandomPassword" => self.get_random_password(),
            "GetParametersForImport" => super::import::get_parameters(self).await,
            "ImportKeyMaterial" => super::import::import_material(self).await,
            "DeleteKeyMaterial" => super::import::delete_material(self).await,
            other => Err(OapiError::invalid_action(other)),
        }
    }

    // ---- helpers -------------------------------------------------------------------------------------

    /// A `KeyId` parameter: an id, an alias, or either's ARN (`acs:kms:<region>:<account>:key/<id>` or
    /// `...:alias/<name>`).
    pub(crate) fn key_ref(&self, name: &str) -> Result<KeyRef, OapiError> {
        let v = self.p.req(name)?;
        let v = if v.starts_with("acs:kms:") {
            let tail = v.splitn(5, ':').nth(4).ok_or_else(|| OapiError::invalid(name))?;
            tail.strip_prefix("key/").unwrap_or(tail)
        } else {
            v
        };
        let r = KeyRef::parse(v).map_err(|_| OapiError::invalid(name))?;
        if matches!(r, KeyRef::Alias(_)) {
            self.alias_used.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(r)
    }

    /// The tenant's internal keys (credential sealing, secrets, XKS health checks): hidden from listings and
    /// refused to key management here, so no OpenAPI caller can disable or delete what the gateway itself
    /// depends on.
    async fn internal_ids(&self) -> Vec<kmsgate_core::KeyId> {
        let mut ids = Vec::new();
        for alias in [kmsgate_core::Dispatcher::SEALING_ALIAS, kmsgate_core::Dispatcher::SECRETS_ALIAS] {
            if let Ok(a) = KeyRef::parse(alias)
                && let Ok(k) = self.d().resolve(&self.caller.tenant, &a).await
            {
                ids.push(k.id.clone());
            }
        }
        ids
    }

    fn is_internal(k: &Key, ids: &[kmsgate_core::KeyId]) -> bool {
        k.tags.contains_key(INTERNAL_TAG) || ids.contains(&k.id)
    }

    /// Refuses the gateway's internal keys as if they did not exist.
    pub(crate) async fn guard(&self, key: &KeyRef) -> Result<(), OapiError> {
        let k = match self.d().resolve(&self.caller.tenant, key).await {
            Ok(k) => k,
            // The action's own call reports a missing key in its usual way.
            Err(_) => return Ok(()),
        };
        if Self::is_internal(&k, &self.internal_ids().await) {
            return Err(OapiError::key_not_found());
        }
        Ok(())
    }

    fn arn(&self, kind: &str, name: &str) -> String {
        format!("acs:kms:{}:{}:{kind}{name}", self.region, self.caller.tenant)
    }

    pub(crate) fn key_metadata(&self, k: &Key) -> Value {
        let protection = k
            .primary()
            .ok()
            .and_then(|v| self.d().backends().get(&v.handle.backend).ok())
            .map(|b| if b.kind() == "pkcs11" { "HSM" } else { "SOFTWARE" })
            .unwrap_or("SOFTWARE");
        let last_rotation = k.versions.iter().map(|v| v.created_at).max().unwrap_or(k.created_at);
        json!({
            "KeyId": k.id.as_str(),
            "Arn": self.arn("key/", k.id.as_str()),
            "KeyState": k.state.as_str(),
            "KeySpec": vendor_spec(k.spec),
            "KeyUsage": vendor_usage(k.usage),
            "CreationDate": k.created_at.to_rfc3339(),
            "Creator": k.tenant.as_str(),
            "Description": k.description,
            "DeleteDate": k.deletion_at.map(Timestamp::to_rfc3339).unwrap_or_default(),
            "Origin": if k.origin == KeyOrigin::External { "EXTERNAL" } else { "Aliyun_KMS" },
            "ProtectionLevel": protection,
            "PrimaryKeyVersion": k.primary_version.to_string(),
            "AutomaticRotation": "Disabled",
            "RotationInterval": "",
            "LastRotationDate": last_rotation.to_rfc3339(),
            "NextRotationDate": "",
            "MaterialExpireTime": "",
            "DeletionProtection": "Disabled",
        })
    }

    fn dry_run(&self) -> Result<bool, OapiError> {
        Ok(self.p.bool("DryRun")?.unwrap_or(false))
    }

    /// What a `DryRun=true` request gets once every check passed: the vendor's dry-run outcome, an error
    /// that says the request would have succeeded.
    fn dry_run_passed() -> OapiError {
        OapiError::new(
            StatusCode::BAD_REQUEST,
            "DryRunOperation",
            "Request validation has been passed with DryRun flag set.",
        )
    }

    /// A usable key for `usage`, for dry runs: state and usage checked, nothing performed.
    async fn check_usable(&self, key: &KeyRef, usage: KeyUsage) -> Result<(), OapiError> {
        let k = self.d().describe_key(self.caller, key).await?;
        match k.state {
            KeyState::Enabled => {}
            s => {
                return Err(kmsgate_core::Error::new(ErrorKind::InvalidKeyState(s), "the key is not enabled").into());
            }
        }
        if !k.usage.contains(usage) {
            return Err(
                kmsgate_core::Error::new(ErrorKind::InvalidKeyUsage, "the key's usage does not allow that").into()
            );
        }
        Ok(())
    }

    /// Records which key a version id belongs to (shared with the instance API's AdvanceDecrypt).
    async fn index_version(&self, version: Uuid, key_id: &str) -> Result<(), OapiError> {
        let id = version.to_string();
        if self.d().document(KIND_VERSION_INDEX, &id).await?.is_some() {
            return Ok(());
        }
        let doc = Document::new(KIND_VERSION_INDEX, &id, self.caller.tenant.clone(), json!({ "key_id": key_id }));
        // Internal bookkeeping, written as the tenant's administrator (this request's id kept for audit) so
        // a policy that limits the caller to crypto does not break Encrypt.
        let mut admin = Caller::admin(self.caller.tenant.clone());
        admin.request_id = self.caller.request_id.clone();
        match self.d().put_document(&admin, doc, Precondition::Absent).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn key_of_version(&self, tenant: &TenantId, version: Uuid) -> Result<KeyRef, OapiError> {
        let doc =
            self.d().document(KIND_VERSION_INDEX, &version.to_string()).await?.ok_or_else(OapiError::key_not_found)?;
        if &doc.tenant != tenant {
            return Err(OapiError::key_not_found());
        }
        let id = doc.body.get("key_id").and_then(|v| v.as_str()).ok_or_else(OapiError::internal)?;
        KeyRef::parse(id).map_err(|_| OapiError::internal())
    }

    // ---- keys ----------------------------------------------------------------------------------------

    async fn create_key(&self) -> Result<Value, OapiError> {
        let spec = parse_spec(self.p.opt("KeySpec").unwrap_or("Aliyun_AES_256"))?;
        let usage = match self.p.opt("KeyUsage") {
            None => spec.default_usages(),
            Some("ENCRYPT/DECRYPT") => KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt]),
            Some("SIGN/VERIFY") => KeyUsageSet::of(&[KeyUsage::Sign, KeyUsage::Verify]),
            Some("GENERATE/VERIFY_MAC") => KeyUsageSet::of(&[KeyUsage::GenerateMac, KeyUsage::VerifyMac]),
            Some(_) => return Err(OapiError::invalid("KeyUsage")),
        };
        if !usage.is_subset_of(spec.allowed_usages()) {
            return Err(OapiError::invalid("KeyUsage"));
        }
        let external = match self.p.opt("Origin") {
            None | Some("Aliyun_KMS") => false,
            Some("EXTERNAL") if spec == KeySpec::Aes256 => true,
            Some(_) => {
                return Err(OapiError::unsupported(
                    "Unsupported.Origin",
                    "The Origin is not supported for this KeySpec; use Aliyun_KMS, or EXTERNAL with Aliyun_AES_256.",
                ));
            }
        };
        let backend = match self.p.opt("ProtectionLevel") {
            None | Some("SOFTWARE") => None,
            Some("HSM") => Some(self.hsm_backend().ok_or_else(|| {
                OapiError::unsupported("Unsupported.ProtectionLevel", "No HSM backend is configured on this gateway.")
            })?),
            Some(_) => {
                return Err(OapiError::unsupported(
                    "Unsupported.ProtectionLevel",
                    "The ProtectionLevel must be SOFTWARE or HSM.",
                ));
            }
        };
        if self.p.bool("EnableAutomaticRotation")? == Some(true) {
            return Err(OapiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedOperation",
                "Automatic rotation is not offered; rotate with CreateKeyVersion.",
            ));
        }
        let tags = self.tags_param("Tags")?;
        let mut req = CreateKeyRequest::new(spec);
        req.usage = Some(usage);
        req.description = self.p.opt("Description").unwrap_or("").to_owned();
        req.tags = tags;
        req.backend = backend;
        req.external = external;
        let k = self.d().create_key(self.caller, req).await?;
        Ok(json!({ "KeyMetadata": self.key_metadata(&k) }))
    }

    /// The first PKCS#11 backend, for ProtectionLevel=HSM (SOFTWARE keys go to the default backend).
    fn hsm_backend(&self) -> Option<String> {
        self.d().backends().all().find(|b| b.kind() == "pkcs11").map(|b| b.name().to_owned())
    }

    /// `Tags`: `[{"TagKey": "k", "TagValue": "v"}, ...]`.
    fn tags_param(&self, name: &str) -> Result<BTreeMap<String, String>, OapiError> {
        let mut out = BTreeMap::new();
        let Some(v) = self.p.json(name)? else { return Ok(out) };
        let Value::Array(items) = v else { return Err(OapiError::invalid(name)) };
        for item in items {
            let k = item.get("TagKey").and_then(Value::as_str).filter(|k| !k.is_empty() && k.len() <= 128);
            let v = item.get("TagValue").and_then(Value::as_str).filter(|v| v.len() <= 256);
            match (k, v) {
                (Some(k), Some(v)) if !k.starts_with("acs:") => {
                    out.insert(k.to_owned(), v.to_owned());
                }
                _ => return Err(OapiError::invalid(name)),
            }
        }
        Ok(out)
    }

    async fn describe_key(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let k = self.d().describe_key(self.caller, &key).await?;
        Ok(json!({ "KeyMetadata": self.key_metadata(&k) }))
    }

    async fn all_keys(&self) -> Result<Vec<Key>, OapiError> {
        let mut out = Vec::new();
        let mut req = PageRequest::first(PageRequest::MAX_LIMIT);
        loop {
            let p = self.d().list_keys(self.caller, &req).await?;
            out.extend(p.items);
            match p.next {
                Some(n) if out.len() < MAX_LISTED => req.after = Some(n),
                _ => return Ok(out),
            }
        }
    }

    async fn list_keys(&self) -> Result<Value, OapiError> {
        let paging = page(self.p)?;
        // Exact matches of the metadata fields; CreatorType is always User here (no service-managed keys).
        let filters = self.filters(&["KeyState", "KeySpec", "KeyUsage", "ProtectionLevel", "CreatorType"])?;
        let internal = self.internal_ids().await;
        let keys: Vec<Value> = self
            .all_keys()
            .await?
            .iter()
            .filter(|k| !Self::is_internal(k, &internal))
            .map(|k| self.key_metadata(k))
            .filter(|m| {
                filters.iter().all(|(f, values)| {
                    let have = if f == "CreatorType" { "User" } else { m[f.as_str()].as_str().unwrap_or("") };
                    values.iter().any(|v| v == have)
                })
            })
            .map(|m| json!({ "KeyId": m["KeyId"], "KeyArn": m["Arn"] }))
            .collect();
        Ok(json!({
            "Keys": { "Key": slice(&keys, paging) },
            "TotalCount": keys.len(),
            "PageNumber": paging.0,
            "PageSize": paging.1,
        }))
    }

    async fn set_state(&self, action: &str) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let d = self.d();
        let c = self.caller;
        let r = match action {
            "EnableKey" => d.enable_key(c, &key).await,
            "DisableKey" => d.disable_key(c, &key).await,
            "ScheduleKeyDeletion" => {
                let days =
                    self.p.u32("PendingWindowInDays")?.ok_or_else(|| OapiError::missing("PendingWindowInDays"))?;
                if !(7..=366).contains(&days) {
                    return Err(OapiError::invalid("PendingWindowInDays"));
                }
                d.schedule_key_deletion(c, &key, days).await
            }
            _ => d.cancel_key_deletion(c, &key, KeyState::Enabled).await,
        };
        match r {
            Ok(_) => Ok(json!({})),
            // A state change the key's state does not allow.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidKeyState(_)) => {
                Err(OapiError::state_modify_failed(format!("The key's state does not allow {action}: {}", e.message())))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn update_description(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let description = self.p.get("Description").ok_or_else(|| OapiError::missing("Description"))?;
        self.d().update_key_description(self.caller, &key, description.to_owned()).await?;
        Ok(json!({}))
    }

    async fn create_key_version(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let k = self.d().rotate_key(self.caller, &key).await?;
        let v = k.primary()?;
        Ok(
            json!({ "KeyVersion": { "KeyId": k.id.as_str(), "KeyVersionId": v.id.to_string(), "CreationDate": v.created_at.to_rfc3339() } }),
        )
    }

    async fn list_key_versions(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let paging = page(self.p)?;
        let k = self.d().describe_key(self.caller, &key).await?;
        let all: Vec<Value> = k
            .versions
            .iter()
            .map(|v| json!({ "KeyId": k.id.as_str(), "KeyVersionId": v.id.to_string(), "CreationDate": v.created_at.to_rfc3339() }))
            .collect();
        Ok(json!({
            "KeyVersions": { "KeyVersion": slice(&all, paging) },
            "TotalCount": all.len(),
            "PageNumber": paging.0,
            "PageSize": paging.1,
        }))
    }

    async fn describe_key_version(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let vid = self.p.req("KeyVersionId")?;
        let k = self.d().describe_key(self.caller, &key).await?;
        let v = Uuid::parse_str(vid).ok().and_then(|id| k.version(id)).ok_or_else(OapiError::key_version_not_found)?;
        Ok(
            json!({ "KeyVersion": { "KeyId": k.id.as_str(), "KeyVersionId": v.id.to_string(), "CreationDate": v.created_at.to_rfc3339() } }),
        )
    }

    /// The key version a request names, which must exist.
    async fn version_param(&self, key: &KeyRef) -> Result<(Key, Uuid), OapiError> {
        let k = self.d().describe_key(self.caller, key).await?;
        let v = match self.p.opt("KeyVersionId") {
            Some(vid) => {
                Uuid::parse_str(vid).ok().and_then(|id| k.version(id)).ok_or_else(OapiError::key_version_not_found)?.id
            }
            None => k.primary_version,
        };
        Ok(((*k).clone(), v))
    }

    async fn tag_resource(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let tags = self.tags_param("Tags")?;
        if tags.is_empty() {
            return Err(OapiError::missing("Tags"));
        }
        self.d().update_key_tags(self.caller, &key, &tags, &[]).await?;
        Ok(json!({}))
    }

    async fn untag_resource(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let Some(Value::Array(names)) = self.p.json("TagKeys")? else { return Err(OapiError::missing("TagKeys")) };
        let names = names
            .iter()
            .map(|n| n.as_str().map(str::to_owned).ok_or_else(|| OapiError::invalid("TagKeys")))
            .collect::<Result<Vec<_>, _>>()?;
        self.d().update_key_tags(self.caller, &key, &BTreeMap::new(), &names).await?;
        Ok(json!({}))
    }

    async fn list_resource_tags(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let k = self.d().describe_key(self.caller, &key).await?;
        let tags: Vec<Value> = k.tags.iter().map(|(k, v)| json!({ "TagKey": k, "TagValue": v })).collect();
        Ok(json!({ "Tags": { "Tag": tags } }))
    }

    // ---- aliases -------------------------------------------------------------------------------------

    fn alias_param(&self) -> Result<AliasName, OapiError> {
        let a = self.p.req("AliasName")?;
        if a.starts_with("alias/acs/") || a.starts_with("alias/aws/") || a.starts_with(INTERNAL_ALIAS_PREFIX) {
            return Err(OapiError::unsupported("Unsupported.Alias", "Aliases under alias/acs/ are reserved."));
        }
        AliasName::parse(a).map_err(|_| OapiError::invalid("AliasName"))
    }

    async fn alias(&self, create: bool) -> Result<Value, OapiError> {
        let alias = self.alias_param()?;
        let key = self.key_ref("KeyId")?;
        self.guard(&key).await?;
        let r = if create {
            self.d().create_alias(self.caller, &alias, &key).await
        } else {
            self.d().update_alias(self.caller, &alias, &key).await
        };
        match r {
            Ok(_) => Ok(json!({})),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Err(OapiError::new(StatusCode::CONFLICT, "AliasAlreadyExists", "The alias already exists."))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_alias(&self) -> Result<Value, OapiError> {
        let alias = self.alias_param()?;
        self.d().delete_alias(self.caller, &alias).await?;
        Ok(json!({}))
    }

    async fn list_aliases(&self, by_key: bool) -> Result<Value, OapiError> {
        let paging = page(self.p)?;
        let key = if by_key { Some(self.key_ref("KeyId")?) } else { None };
        let mut all = Vec::new();
        let mut req = PageRequest::first(PageRequest::MAX_LIMIT);
        loop {
            let p = self.d().list_aliases(self.caller, key.as_ref(), &req).await?;
            all.extend(p.items.into_iter().filter(|a| !a.alias.as_str().starts_with(INTERNAL_ALIAS_PREFIX)).map(|a| {
                json!({ "AliasName": a.alias.as_str(), "AliasArn": self.arn("", a.alias.as_str()), "KeyId": a.key_id.as_str() })
            }));
            match p.next {
                Some(n) if all.len() < MAX_LISTED => req.after = Some(n),
                _ => break,
            }
        }
        Ok(json!({
            "Aliases": { "Alias": slice(&all, paging) },
            "TotalCount": all.len(),
            "PageNumber": paging.0,
            "PageSize": paging.1,
        }))
    }

    // ---- symmetric crypto ----------------------------------------------------------------------------

    /// AES-GCM under the key's primary version; returns (key id, version, OpenAPI blob).
    async fn seal(
        &self,
        key: KeyRef,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<(String, Uuid, String), OapiError> {
        if plaintext.len() > self.state.config.max_symmetric_plaintext_bytes {
            return Err(OapiError::invalid("Plaintext"));
        }
        self.guard(&key).await?;
        let req = EncryptRequest { key, algorithm: Some(EncryptionAlgorithm::AesGcm), plaintext, aad, iv: None };
        let e = self.d().encrypt(self.caller, req).await?;
        self.index_version(e.version, e.key_id.as_str()).await?;
        let mut blob = Vec::with_capacity(VERSION_ID_LEN + IV_LEN + e.ciphertext.len() + TAG_LEN);
        blob.extend_from_slice(e.version.hyphenated().to_string().as_bytes());
        blob.extend_from_slice(&e.iv);
        blob.extend_from_slice(&e.ciphertext);
        blob.extend_from_slice(&e.tag);
        Ok((e.key_id.to_string(), e.version, STANDARD.encode(blob)))
    }

    /// Opens an OpenAPI blob; the key is found from the version id it carries.
    async fn open(&self, blob_param: &str, aad: Vec<u8>) -> Result<kmsgate_core::DecryptReply, OapiError> {
        let blob = b64(blob_param, self.p.req(blob_param)?)?;
        if blob.len() < VERSION_ID_LEN + IV_LEN + TAG_LEN {
            return Err(OapiError::invalid(blob_param));
        }
        let version = std::str::from_utf8(&blob[..VERSION_ID_LEN])
            .ok()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| OapiError::invalid(blob_param))?;
        let key = self.key_of_version(&self.caller.tenant, version).await?;
        self.guard(&key).await?;
        let iv = blob[VERSION_ID_LEN..VERSION_ID_LEN + IV_LEN].to_vec();
        let body = &blob[VERSION_ID_LEN + IV_LEN..];
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        let req = DecryptRequest {
            key,
            version: Some(version),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            iv,
            aad,
            ciphertext: ct.to_vec(),
            tag: tag.to_vec(),
        };
        Ok(self.d().decrypt(self.caller, req).await?)
    }

    async fn encrypt(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        let plaintext = Zeroizing::new(self.p.req("Plaintext")?.as_bytes().to_vec());
        let aad = context_aad(self.p.json("EncryptionContext")?, "EncryptionContext")?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Encrypt).await?;
            return Err(Self::dry_run_passed());
        }
        let (key_id, version, blob) = self.seal(key, plaintext, aad).await?;
        Ok(json!({ "KeyId": key_id, "KeyVersionId": version.to_string(), "CiphertextBlob": blob }))
    }

    async fn decrypt(&self) -> Result<Value, OapiError> {
        let aad = context_aad(self.p.json("EncryptionContext")?, "EncryptionContext")?;
        if self.dry_run()? {
            self.p.req("CiphertextBlob")?;
            return Err(Self::dry_run_passed());
        }
        let p = self.open("CiphertextBlob", aad).await?;
        let text = std::str::from_utf8(&p.plaintext).map_err(|_| {
            OapiError::invalid_msg("The plaintext is not UTF-8 text; decrypt it through the instance API.")
        })?;
        Ok(json!({ "KeyId": p.key_id.as_str(), "KeyVersionId": p.version.to_string(), "Plaintext": text }))
    }

    async fn generate_data_key(&self, with_plaintext: bool) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        let len = match (self.p.u32("NumberOfBytes")?, self.p.opt("KeySpec")) {
            (Some(n), _) if (1..=1024).contains(&n) => usize::try_from(n).unwrap_or(32),
            (Some(_), _) => return Err(OapiError::invalid("NumberOfBytes")),
            (None, None | Some("AES_256")) => 32,
            (None, Some("AES_128")) => 16,
            (None, Some(_)) => return Err(OapiError::invalid("KeySpec")),
        };
        let aad = context_aad(self.p.json("EncryptionContext")?, "EncryptionContext")?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Encrypt).await?;
            return Err(Self::dry_run_passed());
        }
        let data_key = Zeroizing::new(self.d().random(self.caller, len).await?);
        // The vendor encrypts the base64 text of the data key, so Decrypt returns that text.
        let text = Zeroizing::new(STANDARD.encode(&*data_key));
        let (key_id, version, blob) = self.seal(key, Zeroizing::new(text.as_bytes().to_vec()), aad).await?;
        let mut out = json!({ "KeyId": key_id, "KeyVersionId": version.to_string(), "CiphertextBlob": blob });
        if with_plaintext {
            out["Plaintext"] = Value::String(text.to_string());
        }
        Ok(out)
    }

    async fn re_encrypt(&self) -> Result<Value, OapiError> {
        let dest = self.key_ref("DestinationKeyId")?;
        if self.p.opt("SourceKeyId").is_some() || self.p.opt("SourceEncryptionAlgorithm").is_some() {
            return Err(OapiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedOperation",
                "Re-encrypting asymmetric ciphertexts is not supported; pass a symmetric CiphertextBlob only.",
            ));
        }
        let src_aad = context_aad(self.p.json("SourceEncryptionContext")?, "SourceEncryptionContext")?;
        let dst_aad = context_aad(self.p.json("DestinationEncryptionContext")?, "DestinationEncryptionContext")?;
        if self.dry_run()? {
            self.p.req("CiphertextBlob")?;
            self.check_usable(&dest, KeyUsage::Encrypt).await?;
            return Err(Self::dry_run_passed());
        }
        let p = self.open("CiphertextBlob", src_aad).await?;
        let (key_id, version, blob) = self.seal(dest, Zeroizing::new(p.plaintext.to_vec()), dst_aad).await?;
        Ok(json!({ "KeyId": key_id, "KeyVersionId": version.to_string(), "CiphertextBlob": blob }))
    }

    // ---- asymmetric crypto and MACs ------------------------------------------------------------------

    fn signing_algorithm(&self) -> Result<SigningAlgorithm, OapiError> {
        match self.p.req("Algorithm")? {
            "RSA_PKCS1_SHA_256" => Ok(SigningAlgorithm::RsaPkcs1Sha256),
            "RSA_PSS_SHA_256" => Ok(SigningAlgorithm::RsaPssSha256),
            "ECDSA_SHA_256" => Ok(SigningAlgorithm::EcdsaSha256),
            "SM2DSA" => {
                Err(OapiError::new(StatusCode::BAD_REQUEST, "UnsupportedOperation", "SM2DSA is not supported."))
            }
            _ => Err(OapiError::invalid("Algorithm")),
        }
    }

    fn digest_param(&self) -> Result<Vec<u8>, OapiError> {
        let d = b64("Digest", self.p.req("Digest")?)?;
        if d.len() != 32 {
            return Err(OapiError::invalid("Digest"));
        }
        Ok(d)
    }

    async fn asymmetric_sign(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        let algorithm = self.signing_algorithm()?;
        let digest = self.digest_param()?;
        let (_, version) = self.version_param(&key).await?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Sign).await?;
            return Err(Self::dry_run_passed());
        }
        let s = self
            .d()
            .sign(self.caller, SignRequest { key, algorithm, input: SignInput::Digest(digest), version: Some(version) })
            .await?;
        Ok(
            json!({ "KeyId": s.key_id.as_str(), "KeyVersionId": s.version.to_string(), "Value": STANDARD.encode(s.signature) }),
        )
    }

    async fn asymmetric_verify(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        let algorithm = self.signing_algorithm()?;
        let digest = self.digest_param()?;
        let signature = b64("Value", self.p.req("Value")?)?;
        let (k, version) = self.version_param(&key).await?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Verify).await?;
            return Err(Self::dry_run_passed());
        }
        let ok = self
            .d()
            .verify(
                self.caller,
                SignRequest { key, algorithm, input: SignInput::Digest(digest), version: Some(version) },
                &signature,
            )
            .await?;
        Ok(json!({ "KeyId": k.id.as_str(), "KeyVersionId": version.to_string(), "Value": ok }))
    }

    fn oaep(&self) -> Result<(), OapiError> {
        match self.p.req("Algorithm")? {
            "RSAES_OAEP_SHA_256" => Ok(()),
            "RSAES_OAEP_SHA_1" | "SM2PKE" => Err(OapiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedOperation",
                "Only RSAES_OAEP_SHA_256 is supported.",
            )),
            _ => Err(OapiError::invalid("Algorithm")),
        }
    }

    async fn asymmetric_encrypt(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.oaep()?;
        let plaintext = Zeroizing::new(b64("Plaintext", self.p.req("Plaintext")?)?);
        let (k, version) = self.version_param(&key).await?;
        if version != k.primary_version {
            return Err(OapiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedOperation",
                "AsymmetricEncrypt uses the key's primary version; encrypt to older versions with their public key.",
            ));
        }
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Encrypt).await?;
            return Err(Self::dry_run_passed());
        }
        let req = EncryptRequest {
            key,
            algorithm: Some(EncryptionAlgorithm::RsaOaepSha256),
            plaintext,
            aad: Vec::new(),
            iv: None,
        };
        let e = self.d().encrypt(self.caller, req).await?;
        Ok(
            json!({ "KeyId": e.key_id.as_str(), "KeyVersionId": e.version.to_string(), "CiphertextBlob": STANDARD.encode(e.ciphertext) }),
        )
    }

    async fn asymmetric_decrypt(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.oaep()?;
        let ciphertext = b64("CiphertextBlob", self.p.req("CiphertextBlob")?)?;
        let (_, version) = self.version_param(&key).await?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::Decrypt).await?;
            return Err(Self::dry_run_passed());
        }
        let req = DecryptRequest {
            key,
            version: Some(version),
            algorithm: Some(EncryptionAlgorithm::RsaOaepSha256),
            iv: Vec::new(),
            aad: Vec::new(),
            ciphertext,
            tag: Vec::new(),
        };
        let p = self.d().decrypt(self.caller, req).await?;
        Ok(
            json!({ "KeyId": p.key_id.as_str(), "KeyVersionId": p.version.to_string(), "Plaintext": STANDARD.encode(&*p.plaintext) }),
        )
    }

    async fn get_public_key(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        let (_, version) = self.version_param(&key).await?;
        let p = self.d().get_public_key(self.caller, &key, Some(version)).await?;
        Ok(
            json!({ "KeyId": p.key_id.as_str(), "KeyVersionId": p.version.to_string(), "PublicKey": crate::service::pem("PUBLIC KEY", &p.der) }),
        )
    }

    fn mac_message(&self) -> Result<Vec<u8>, OapiError> {
        let m = b64("Message", self.p.req("Message")?)?;
        if m.len() > self.state.config.max_symmetric_plaintext_bytes {
            return Err(OapiError::invalid("Message"));
        }
        Ok(m)
    }

    fn mac_algorithm(&self) -> Result<(), OapiError> {
        match self.p.opt("Algorithm") {
            None | Some("HMAC_SHA256") => Ok(()),
            Some(_) => Err(OapiError::invalid("Algorithm")),
        }
    }

    async fn generate_mac(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.mac_algorithm()?;
        let message = self.mac_message()?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::GenerateMac).await?;
            return Err(Self::dry_run_passed());
        }
        let (key_id, mac) = self.d().hmac(self.caller, &key, &message).await?;
        let k = self.d().describe_key(self.caller, &KeyRef::Id(key_id.clone())).await?;
        Ok(
            json!({ "KeyId": key_id.as_str(), "KeyVersionId": k.primary_version.to_string(), "Mac": STANDARD.encode(mac) }),
        )
    }

    async fn verify_mac(&self) -> Result<Value, OapiError> {
        let key = self.key_ref("KeyId")?;
        self.mac_algorithm()?;
        let message = self.mac_message()?;
        let mac = b64("Mac", self.p.req("Mac")?)?;
        if self.dry_run()? {
            self.check_usable(&key, KeyUsage::VerifyMac).await?;
            return Err(Self::dry_run_passed());
        }
        let ok = self.d().verify_hmac(self.caller, &key, &message, &mac).await?;
        let k = self.d().describe_key(self.caller, &key).await?;
        Ok(json!({ "KeyId": k.id.as_str(), "Value": ok }))
    }

    // ---- secrets -------------------------------------------------------------------------------------

    fn secret_path(&self) -> Result<SecretPath, OapiError> {
        SecretPath::parse(self.p.req("SecretName")?).map_err(|_| OapiError::invalid("SecretName"))
    }

    fn secret_data(&self) -> Result<Zeroizing<Vec<u8>>, OapiError> {
        let data = self.p.req("SecretData")?;
        match self.p.opt("SecretDataType").unwrap_or("text") {
            "text" => Ok(Zeroizing::new(data.as_bytes().to_vec())),
            "binary" => Ok(Zeroizing::new(b64("SecretData", data)?)),
            _ => Err(OapiError::invalid("SecretDataType")),
        }
    }

    async fn put_secret(&self, mode: WriteMode) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let data = self.secret_data()?;
        let version_id = self.p.req("VersionId")?.to_owned();
        let mut req = PutSecretRequest::new(path, Vec::new());
        req.data = data;
        req.mode = mode;
        req.version_id = Some(version_id);
        if mode == WriteMode::CreateOnly {
            match self.p.opt("SecretType").unwrap_or("Generic") {
                "Generic" => {}
                _ => {
                    return Err(OapiError::new(
                        StatusCode::BAD_REQUEST,
                        "UnsupportedOperation",
                        "Only Generic secrets are supported.",
                    ));
                }
            }
            req.secret_type = Some("Generic".to_owned());
            let tags = self.tags_param("Tags")?;
            req.metadata = Some(json!({
                "description": self.p.opt("Description").unwrap_or(""),
                "tags": tags,
            }));
        } else if let Some(stages) = self.p.json("VersionStages")? {
            let Value::Array(items) = stages else { return Err(OapiError::invalid("VersionStages")) };
            let stages = items
                .iter()
                .map(|s| s.as_str().map(stage_in).ok_or_else(|| OapiError::invalid("VersionStages")))
                .collect::<Result<Vec<_>, _>>()?;
            req.stages = Some(stages);
        }
        let w = self.d().put_secret(self.caller, req).await?;
        let stages: Vec<String> = w.version.stages.iter().map(|s| stage_out(s)).collect();
        Ok(json!({
            "Arn": self.arn("secret/", w.secret.path.as_str()),
            "SecretName": w.secret.path.as_str(),
            "SecretType": w.secret.secret_type,
            "VersionId": w.version.version_id,
            "VersionStages": { "VersionStage": stages },
            "AutomaticRotation": "Disabled",
        }))
    }

    async fn get_secret_value(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let selector = match (self.p.opt("VersionId"), self.p.opt("VersionStage")) {
            (Some(id), _) => SecretSelector::VersionId(id.to_owned()),
            (None, None | Some("ACSCurrent")) => SecretSelector::Current,
            (None, Some(stage)) => SecretSelector::Stage(stage_in(stage)),
        };
        let v = self.d().get_secret_value(self.caller, &path, &selector).await?;
        let (data, data_type) = match std::str::from_utf8(&v.data) {
            Ok(s) => (Zeroizing::new(s.to_owned()), "text"),
            Err(_) => (Zeroizing::new(STANDARD.encode(&*v.data)), "binary"),
        };
        let stages: Vec<String> = v.version.stages.iter().map(|s| stage_out(s)).collect();
        Ok(json!({
            "SecretName": v.secret.path.as_str(),
            "SecretType": v.secret.secret_type,
            "SecretData": data.as_str(),
            "SecretDataType": data_type,
            "VersionId": v.version.version_id,
            "VersionStages": { "VersionStage": stages },
            "CreateTime": v.version.created_at.to_rfc3339(),
            "AutomaticRotation": "Disabled",
            "LastRotationDate": "",
            "NextRotationDate": "",
            "RotationInterval": "",
            "ExtendedConfig": "",
        }))
    }

    fn secret_summary(&self, s: &Secret) -> Value {
        let tags: Vec<Value> = s
            .metadata
            .get("tags")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| json!({ "TagKey": k, "TagValue": v })).collect())
            .unwrap_or_default();
        json!({
            "SecretName": s.path.as_str(),
            "SecretType": s.secret_type,
            "CreateTime": s.created_at.to_rfc3339(),
            "UpdateTime": s.updated_at.to_rfc3339(),
            "PlannedDeleteTime": s.recoverable_until.map(Timestamp::to_rfc3339).unwrap_or_default(),
            "Tags": { "Tag": tags },
        })
    }

    async fn describe_secret(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let s = self.d().describe_secret(self.caller, &path, true).await?;
        let mut out = self.secret_summary(&s);
        out["Arn"] = Value::String(self.arn("secret/", s.path.as_str()));
        out["Description"] = s.metadata.get("description").cloned().unwrap_or(Value::String(String::new()));
        out["AutomaticRotation"] = Value::String("Disabled".to_owned());
        out["EncryptionKeyId"] = Value::String(String::new());
        Ok(out)
    }

    /// `Filters` of ListKeys and ListSecrets: `[{"Key": <name>, "Values": [...]}]` with names from `allowed`.
    fn filters(&self, allowed: &[&str]) -> Result<Vec<(String, Vec<String>)>, OapiError> {
        let mut filters = Vec::new();
        let Some(v) = self.p.json("Filters")? else { return Ok(filters) };
        let Value::Array(items) = v else { return Err(OapiError::invalid("Filters")) };
        for item in items {
            let key = item.get("Key").and_then(Value::as_str).ok_or_else(|| OapiError::invalid("Filters"))?;
            if !allowed.contains(&key) {
                return Err(OapiError::invalid("Filters"));
            }
            let values = item
                .get("Values")
                .and_then(Value::as_array)
                .ok_or_else(|| OapiError::invalid("Filters"))?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| OapiError::invalid("Filters")))
                .collect::<Result<Vec<_>, _>>()?;
            filters.push((key.to_owned(), values));
        }
        Ok(filters)
    }

    async fn list_secrets(&self) -> Result<Value, OapiError> {
        let paging = page(self.p)?;
        // SecretName and Description match by substring, TagKey and TagValue exactly; filters are ANDed, the
        // values of one filter ORed.
        let filters = self.filters(&["SecretName", "Description", "TagKey", "TagValue"])?;
        let keep = |s: &Value| {
            filters.iter().all(|(f, values)| {
                values.iter().any(|v| match f.as_str() {
                    "SecretName" => s["SecretName"].as_str().is_some_and(|n| n.contains(v.as_str())),
                    "Description" => s["Description"].as_str().is_some_and(|d| d.contains(v.as_str())),
                    "TagKey" => {
                        s["Tags"]["Tag"].as_array().is_some_and(|t| t.iter().any(|t| t["TagKey"] == v.as_str()))
                    }
                    _ => s["Tags"]["Tag"].as_array().is_some_and(|t| t.iter().any(|t| t["TagValue"] == v.as_str())),
                })
            })
        };
        let mut all = Vec::new();
        let mut req = PageRequest::first(PageRequest::MAX_LIMIT);
        let filter = SecretListFilter::default();
        loop {
            let p = self.d().list_secrets(self.caller, &filter, &req).await?;
            all.extend(
                p.items
                    .iter()
                    .map(|s| {
                        let mut v = self.secret_summary(s);
                        v["Description"] =
                            s.metadata.get("description").cloned().unwrap_or(Value::String(String::new()));
                        v
                    })
                    .filter(|v| keep(v)),
            );
            match p.next {
                Some(n) if all.len() < MAX_LISTED => req.after = Some(n),
                _ => break,
            }
        }
        Ok(json!({
            "SecretList": { "Secret": slice(&all, paging) },
            "TotalCount": all.len(),
            "PageNumber": paging.0,
            "PageSize": paging.1,
        }))
    }

    async fn delete_secret(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let mode = if self.p.bool("ForceDeleteWithoutRecovery")? == Some(true) {
            if self.p.opt("RecoveryWindowInDays").is_some() {
                return Err(OapiError::invalid("RecoveryWindowInDays"));
            }
            DeleteMode::Permanent
        } else {
            let days = self.p.u32("RecoveryWindowInDays")?.unwrap_or(30);
            if !(7..=30).contains(&days) {
                return Err(OapiError::invalid("RecoveryWindowInDays"));
            }
            DeleteMode::Soft { retention: Duration::from_secs(u64::from(days) * 86_400) }
        };
        let s = self.d().delete_secret(self.caller, &path, mode).await?;
        Ok(json!({
            "SecretName": s.path.as_str(),
            "PlannedDeleteTime": s.recoverable_until.map(Timestamp::to_rfc3339).unwrap_or_default(),
        }))
    }

    async fn restore_secret(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let s = self.d().restore_secret(self.caller, &path).await?;
        Ok(json!({ "SecretName": s.path.as_str() }))
    }

    async fn list_secret_version_ids(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let paging = page(self.p)?;
        let include_deprecated = self.p.bool("IncludeDeprecated")?.unwrap_or(false);
        let s = self.d().describe_secret(self.caller, &path, false).await?;
        let all: Vec<Value> = s
            .versions
            .iter()
            .rev()
            .filter(|v| include_deprecated || !v.stages.is_empty())
            .map(|v| {
                let stages: Vec<String> = v.stages.iter().map(|s| stage_out(s)).collect();
                json!({ "VersionId": v.version_id, "CreateTime": v.created_at.to_rfc3339(), "VersionStages": { "VersionStage": stages } })
            })
            .collect();
        Ok(json!({
            "SecretName": s.path.as_str(),
            "VersionIds": { "VersionId": slice(&all, paging) },
            "TotalCount": all.len(),
            "PageNumber": paging.0,
            "PageSize": paging.1,
        }))
    }

    async fn update_secret_version_stage(&self) -> Result<Value, OapiError> {
        let path = self.secret_path()?;
        let stage = stage_in(self.p.req("VersionStage")?);
        let move_to = self.p.opt("MoveToVersion").map(|v| VersionSelector::VersionId(v.to_owned()));
        let remove_from = self.p.opt("RemoveFromVersion").map(|v| VersionSelector::VersionId(v.to_owned()));
        if move_to.is_none() && remove_from.is_none() {
            return Err(OapiError::missing("MoveToVersion"));
        }
        let s = self.d().update_secret_version_stage(self.caller, &path, &stage, move_to, remove_from).await?;
        Ok(json!({ "SecretName": s.path.as_str() }))
    }

    fn get_random_password(&self) -> Result<Value, OapiError> {
        let len = self.p.u32("PasswordLength")?.unwrap_or(32);
        if !(8..=128).contains(&len) {
            return Err(OapiError::invalid("PasswordLength"));
        }
        let excluded = self.p.opt("ExcludeCharacters").unwrap_or("");
        let mut classes: Vec<Vec<char>> = Vec::new();
        let sets: [(&str, &str); 4] = [
            ("ExcludeLowercase", "abcdefghijklmnopqrstuvwxyz"),
            ("ExcludeUppercase", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            ("ExcludeNumbers", "0123456789"),
            ("ExcludePunctuation", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
        ];
        for (param, chars) in sets {
            if self.p.bool(param)? == Some(true) {
                continue;
            }
            let set: Vec<char> = chars.chars().filter(|c| !excluded.contains(*c)).collect();
            if !set.is_empty() {
                classes.push(set);
            }
        }
        if classes.is_empty() {
            return Err(OapiError::invalid("ExcludeCharacters"));
        }
        let require_each = self.p.bool("RequireEachIncludedType")?.unwrap_or(true);
        let all: Vec<char> = classes.iter().flatten().copied().collect();
        let pick = |set: &[char]| -> Result<char, OapiError> {
            // Rejection sampling over 16 bits keeps the choice uniform.
            let n = u32::try_from(set.len()).unwrap_or(1);
            let bound = (65536 / n) * n;
            loop {
                let mut b = [0u8; 2];
                aws_lc_rs::rand::fill(&mut b).map_err(|_| OapiError::internal())?;
                let r = u32::from(u16::from_be_bytes(b));
                if r < bound {
                    return Ok(set[usize::try_from(r % n).unwrap_or(0)]);
                }
            }
        };
        let len = usize::try_from(len).unwrap_or(32);
        loop {
            let pw = Zeroizing::new((0..len).map(|_| pick(&all)).collect::<Result<String, _>>()?);
            if !require_each || classes.iter().all(|c| pw.chars().any(|ch| c.contains(&ch))) {
                return Ok(json!({ "RandomPassword": pw.as_str() }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_aad_is_the_transfer_clients() {
        // sha256("a=1&b=2") in ASCII hex, keys sorted whatever the JSON order.
        let aad = context_aad(Some(json!({"b": "2", "a": "1"})), "EncryptionContext").unwrap();
        assert_eq!(aad, hex::encode(digest::digest(&digest::SHA256, b"a=1&b=2")).into_bytes());
        assert!(context_aad(Some(json!({"a": 1})), "EncryptionContext").is_err());
        assert!(context_aad(None, "EncryptionContext").unwrap().is_empty());
    }

    #[test]
    fn pages_slice_and_bound() {
        let v: Vec<u32> = (1..=25).collect();
        assert_eq!(slice(&v, (3, 10)), vec![21, 22, 23, 24, 25]);
        assert_eq!(slice(&v, (4, 10)), Vec::<u32>::new());
    }
}
