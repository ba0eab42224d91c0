//! Key import (BYOK): `CreateKey Origin=EXTERNAL` makes a key `PendingImport`; `GetParametersForImport`
//! issues an RSA-2048 wrapping key and an import token (valid `import_token_ttl_secs`, one use);
//! `ImportKeyMaterial` unwraps the 32-byte AES key with RSAES-OAEP and hands it to the core, which gives it to
//! the key's backend and enables the key; `DeleteKeyMaterial` returns the key to `PendingImport`.
//!
//! The wrapping key's private half is a core document sealed under the tenant's sealing key, so any replica
//! can finish an import another began.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepAlgorithm, OaepPrivateDecryptingKey, PrivateDecryptingKey,
};
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{Caller, Document, KeyOrigin, Precondition, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::actions::Ctx;
use super::error::OapiError;

pub const KIND_IMPORT_TOKEN: &str = "alibaba.import_token";
const AES_KEY_LEN: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct TokenBody {
    key_id: String,
    algorithm: String,
    sealed_private_key: String,
    expires_at: Timestamp,
}

fn purpose(token: &str) -> String {
    format!("{KIND_IMPORT_TOKEN}/{token}")
}

fn oaep(name: &str) -> Result<&'static OaepAlgorithm, OapiError> {
    match name {
        "RSAES_OAEP_SHA_256" => Ok(&OAEP_SHA256_MGF1SHA256),
        "RSAES_OAEP_SHA_1" => Ok(&OAEP_SHA1_MGF1SHA1),
        "RSAES_PKCS1_V1_5" | "SM2PKE" => Err(OapiError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedOperation",
            "Only RSAES_OAEP_SHA_256 and RSAES_OAEP_SHA_1 wrap imported material here.",
        )),
        _ => Err(OapiError::invalid("WrappingAlgorithm")),
    }
}

fn invalid_token() -> OapiError {
    OapiError::new(StatusCode::BAD_REQUEST, "InvalidImportToken", "The specified ImportToken is invalid.")
}

fn admin_of(ctx: &Ctx<'_>) -> Caller {
    let mut admin = Caller::admin(ctx.caller.tenant.clone());
    admin.request_id = ctx.caller.request_id.clone();
    admin
}

pub(super) async fn get_parameters(ctx: &Ctx<'_>) -> Result<Value, OapiError> {
    let key = ctx.key_ref("KeyId")?;
    ctx.guard(&key).await?;
    let algorithm = ctx.p.req("WrappingAlgorithm")?;
    oaep(algorithm)?;
    match ctx.p.req("WrappingKeySpec")? {
        "RSA_2048" => {}
        _ => return Err(OapiError::invalid("WrappingKeySpec")),
    }
    let k = ctx.state.dispatcher.describe_key(ctx.caller, &key).await?;
    if k.origin != KeyOrigin::External {
        return Err(OapiError::unsupported(
            "Unsupported.Origin",
            "The key's material was not imported (Origin is not EXTERNAL).",
        ));
    }
    let private = tokio::task::spawn_blocking(|| PrivateDecryptingKey::generate(KeySize::Rsa2048))
        .await
        .map_err(|_| OapiError::internal())?
        .map_err(|_| OapiError::internal())?;
    let public = private.public_key().as_der().map_err(|_| OapiError::internal())?;
    let pkcs8 = Zeroizing::new(private.as_der().map_err(|_| OapiError::internal())?.as_ref().to_vec());
    let token = Uuid::new_v4().to_string();
    let d = &ctx.state.dispatcher;
    let admin = admin_of(ctx);
    let sealed = d.seal(&admin, &purpose(&token), &pkcs8).await?;
    let ttl_ms = i64::try_from(ctx.state.config.import_token_ttl_secs).unwrap_or(86_400).saturating_mul(1000);
    let expires_at = Timestamp(Timestamp::now().0.saturating_add(ttl_ms));
    let body = TokenBody {
        key_id: k.id.to_string(),
        algorithm: algorithm.to_owned(),
        sealed_private_key: STANDARD.encode(sealed),
        expires_at,
    };
    let value = serde_json::to_value(&body).map_err(|_| OapiError::internal())?;
    d.put_document(
        &admin,
        Document::new(KIND_IMPORT_TOKEN, &token, ctx.caller.tenant.clone(), value),
        Precondition::Absent,
    )
    .await?;
    Ok(json!({
        "KeyId": k.id.as_str(),
        "ImportToken": token,
        "PublicKey": STANDARD.encode(public.as_ref()),
        "TokenExpireTime": expires_at.to_rfc3339(),
    }))
}

pub(super) async fn import_material(ctx: &Ctx<'_>) -> Result<Value, OapiError> {
    let key = ctx.key_ref("KeyId")?;
    let token = ctx.p.req("ImportToken")?;
    let wrapped = STANDARD.decode(ctx.p.req("EncryptedKeyMaterial")?).map_err(|_| {
        OapiError::new(StatusCode::BAD_REQUEST, "InvalidKeyMaterial", "The EncryptedKeyMaterial is not base64.")
    })?;
    match ctx.p.u32("KeyMaterialExpireUnix")? {
        None | Some(0) => {}
        Some(_) => {
            return Err(OapiError::new(
                StatusCode::BAD_REQUEST,
                "UnsupportedOperation",
                "Imported material does not expire here; omit KeyMaterialExpireUnix or pass 0.",
            ));
        }
    }
    let d = &ctx.state.dispatcher;
    let k = d.describe_key(ctx.caller, &key).await?;
    if k.origin != KeyOrigin::External {
        return Err(OapiError::unsupported(
            "Unsupported.Origin",
            "The key's material was not imported (Origin is not EXTERNAL).",
        ));
    }
    if Uuid::parse_str(token).is_err() {
        return Err(invalid_token());
    }
    let doc = d.document(KIND_IMPORT_TOKEN, token).await?.ok_or_else(invalid_token)?;
    let body: TokenBody = serde_json::from_value(doc.body.clone()).map_err(|_| OapiError::internal())?;
    if doc.tenant != ctx.caller.tenant || body.key_id != k.id.as_str() {
        return Err(invalid_token());
    }
    if body.expires_at <= Timestamp::now() {
        return Err(OapiError::new(
            StatusCode::BAD_REQUEST,
            "ExpiredImportToken",
            "The specified ImportToken has expired.",
        ));
    }
    let admin = admin_of(ctx);
    let sealed = STANDARD.decode(&body.sealed_private_key).map_err(|_| OapiError::internal())?;
    let pkcs8 = d.unseal(&admin, &purpose(token), &sealed).await?;
    let private = PrivateDecryptingKey::from_pkcs8(&pkcs8).map_err(|_| OapiError::internal())?;
    let decrypting = OaepPrivateDecryptingKey::new(private).map_err(|_| OapiError::internal())?;
    let mut out = Zeroizing::new(vec![0u8; decrypting.min_output_size()]);
    let bad_material = || OapiError::new(StatusCode::BAD_REQUEST, "InvalidKeyMaterial", "The key material is invalid.");
    let material = decrypting.decrypt(oaep(&body.algorithm)?, &wrapped, &mut out, None).map_err(|_| bad_material())?;
    if material.len() != AES_KEY_LEN {
        return Err(bad_material());
    }
    let material = Zeroizing::new(material.to_vec());
    d.import_key_material(ctx.caller, &key, &material).await?;
    // One use: a token cannot import again.
    let _ = d.delete_document(&admin, KIND_IMPORT_TOKEN, token).await;
    Ok(json!({}))
}

pub(super) async fn delete_material(ctx: &Ctx<'_>) -> Result<Value, OapiError> {
    let key = ctx.key_ref("KeyId")?;
    ctx.guard(&key).await?;
    ctx.state.dispatcher.delete_key_material(ctx.caller, &key).await?;
    Ok(json!({}))
}
