//! kmsgate.v1.KeyManagementService: cryptography, key management, aliases and the audited health probe, each
//! one dispatcher call.

use std::collections::BTreeMap;

use kmsgate_core::{
    CreateKeyRequest, DecryptRequest, Dispatcher, EncryptRequest, Error, KeyId, KeyState, SignInput, SignRequest,
    Timestamp,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::AuthChain;
use crate::call::with_caller;
use crate::convert::{self, key_ref, version};
use crate::proto::kmsgate_v1 as pb;
use crate::proto::kmsgate_v1::key_management_service_server::KeyManagementService;

type R<T> = Result<Response<T>, Status>;

/// The service over one dispatcher and authentication chain.
#[derive(Debug, Clone)]
pub struct KmsService {
    dispatcher: Dispatcher,
    auth: AuthChain,
}

impl KmsService {
    pub fn new(dispatcher: Dispatcher, auth: AuthChain) -> Self {
        Self { dispatcher, auth }
    }
}

fn sign_input(input: Option<pb::sign_request::Input>) -> Result<SignInput, Error> {
    match input {
        Some(pb::sign_request::Input::Message(m)) => Ok(SignInput::Message(m)),
        Some(pb::sign_request::Input::Digest(d)) => Ok(SignInput::Digest(d)),
        None => Err(Error::invalid("message or digest is required")),
    }
}

fn verify_input(input: Option<pb::verify_request::Input>) -> Result<SignInput, Error> {
    match input {
        Some(pb::verify_request::Input::Message(m)) => Ok(SignInput::Message(m)),
        Some(pb::verify_request::Input::Digest(d)) => Ok(SignInput::Digest(d)),
        None => Err(Error::invalid("message or digest is required")),
    }
}

fn key_reply(k: &kmsgate_core::Key) -> pb::KeyResponse {
    pb::KeyResponse { key: Some(convert::key_to(k)) }
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn encrypt(&self, req: Request<pb::EncryptRequest>) -> R<pb::EncryptResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let er = EncryptRequest {
                key: key_ref(&r.key_id)?,
                algorithm: convert::enc_alg_from(r.algorithm)?,
                plaintext: Zeroizing::new(r.plaintext),
                aad: r.aad.clone(),
                iv: None,
            };
            let e = d.encrypt(&c, er).await?;
            Ok(Response::new(pb::EncryptResponse {
                key_id: e.key_id.to_string(),
                key_version: e.version.to_string(),
                algorithm: convert::enc_alg_to(e.algorithm) as i32,
                iv: e.iv,
                ciphertext: e.ciphertext,
                tag: e.tag,
            }))
        })
        .await
    }

    async fn decrypt(&self, req: Request<pb::DecryptRequest>) -> R<pb::DecryptResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let dr = DecryptRequest {
                key: key_ref(&r.key_id)?,
                version: version(&r.key_version).map_err(|_| Error::invalid_ciphertext())?,
                algorithm: convert::enc_alg_from(r.algorithm)?,
                iv: r.iv.clone(),
                aad: r.aad.clone(),
                ciphertext: r.ciphertext.clone(),
                tag: r.tag.clone(),
            };
            let p = d.decrypt(&c, dr).await?;
            Ok(Response::new(pb::DecryptResponse {
                key_id: p.key_id.to_string(),
                key_version: p.version.to_string(),
                plaintext: p.plaintext.to_vec(),
            }))
        })
        .await
    }

    async fn generate_data_key(&self, req: Request<pb::GenerateDataKeyRequest>) -> R<pb::GenerateDataKeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let len = if r.length == 0 { 32 } else { usize::try_from(r.length).unwrap_or(usize::MAX) };
            let k = d.generate_data_key(&c, &key_ref(&r.key_id)?, len, r.aad.clone()).await?;
            Ok(Response::new(pb::GenerateDataKeyResponse {
                key_id: k.encrypted.key_id.to_string(),
                key_version: k.encrypted.version.to_string(),
                algorithm: convert::enc_alg_to(k.encrypted.algorithm) as i32,
                plaintext: k.plaintext.to_vec(),
                iv: k.encrypted.iv,
                ciphertext: k.encrypted.ciphertext,
                tag: k.encrypted.tag,
            }))
        })
        .await
    }

    async fn sign(&self, req: Request<pb::SignRequest>) -> R<pb::SignResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let sr = SignRequest {
                key: key_ref(&r.key_id)?,
                algorithm: convert::sign_alg_from(r.algorithm)?,
                input: sign_input(r.input.clone())?,
                version: version(&r.key_version)?,
            };
            let s = d.sign(&c, sr).await?;
            Ok(Response::new(pb::SignResponse {
                key_id: s.key_id.to_string(),
                key_version: s.version.to_string(),
                algorithm: r.algorithm,
                signature: s.signature,
            }))
        })
        .await
    }

    async fn verify(&self, req: Request<pb::VerifyRequest>) -> R<pb::VerifyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let sr = SignRequest {
                key: key_ref(&r.key_id)?,
                algorithm: convert::sign_alg_from(r.algorithm)?,
                input: verify_input(r.input.clone())?,
                version: version(&r.key_version)?,
            };
            let valid = d.verify(&c, sr, &r.signature).await?;
            Ok(Response::new(pb::VerifyResponse { key_id: r.key_id.clone(), valid }))
        })
        .await
    }

    async fn get_public_key(&self, req: Request<pb::GetPublicKeyRequest>) -> R<pb::GetPublicKeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let p = d.get_public_key(&c, &key_ref(&r.key_id)?, version(&r.key_version)?).await?;
            Ok(Response::new(pb::GetPublicKeyResponse {
                key_id: p.key_id.to_string(),
                key_version: p.version.to_string(),
                spec: convert::spec_to(p.spec) as i32,
                public_key_pem: convert::pem(&p.der),
                public_key_der: p.der,
            }))
        })
        .await
    }

    async fn random(&self, req: Request<pb::RandomRequest>) -> R<pb::RandomResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let len = usize::try_from(r.length).unwrap_or(usize::MAX);
            Ok(Response::new(pb::RandomResponse { random: d.random(&c, len).await? }))
        })
        .await
    }

    async fn hmac(&self, req: Request<pb::HmacRequest>) -> R<pb::HmacResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let (id, mac) = d.hmac(&c, &key_ref(&r.key_id)?, &r.data).await?;
            Ok(Response::new(pb::HmacResponse { key_id: id.to_string(), mac }))
        })
        .await
    }

    async fn verify_hmac(&self, req: Request<pb::VerifyHmacRequest>) -> R<pb::VerifyHmacResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let valid = d.verify_hmac(&c, &key_ref(&r.key_id)?, &r.data, &r.mac).await?;
            Ok(Response::new(pb::VerifyHmacResponse { key_id: r.key_id.clone(), valid }))
        })
        .await
    }

    async fn create_key(&self, req: Request<pb::CreateKeyRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let mut ck = CreateKeyRequest::new(convert::spec_from(r.spec)?);
            ck.usage = r.usage.as_ref().map(convert::usages_from).transpose()?;
            ck.description.clone_from(&r.description);
            ck.tags = r.tags.clone().into_iter().collect::<BTreeMap<_, _>>();
            ck.aliases = r.aliases.iter().map(|a| convert::alias(a)).collect::<Result<_, _>>()?;
            ck.id = (!r.key_id.is_empty()).then(|| KeyId::parse(&r.key_id)).transpose()?;
            ck.backend = (!r.backend.is_empty()).then(|| r.backend.clone());
            Ok(Response::new(key_reply(&d.create_key(&c, ck).await?)))
        })
        .await
    }

    async fn describe_key(&self, req: Request<pb::DescribeKeyRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let k = d.describe_key(&c, &key_ref(&r.key_id)?).await?;
            Ok(Response::new(key_reply(&k)))
        })
        .await
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> R<pb::ListKeysResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let page = d.list_keys(&c, &convert::page(r.page_size, r.page_token.clone())).await?;
            Ok(Response::new(pb::ListKeysResponse {
                keys: page.items.iter().map(convert::key_to).collect(),
                next_page_token: page.next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn enable_key(&self, req: Request<pb::EnableKeyRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            Ok(Response::new(key_reply(&d.enable_key(&c, &key_ref(&r.key_id)?).await?)))
        })
        .await
    }

    async fn disable_key(&self, req: Request<pb::DisableKeyRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            Ok(Response::new(key_reply(&d.disable_key(&c, &key_ref(&r.key_id)?).await?)))
        })
        .await
    }

    async fn schedule_key_deletion(&self, req: Request<pb::ScheduleKeyDeletionRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let days = if r.pending_window_days == 0 { 30 } else { r.pending_window_days };
            Ok(Response::new(key_reply(&d.schedule_key_deletion(&c, &key_ref(&r.key_id)?, days).await?)))
        })
        .await
    }

    async fn cancel_key_deletion(&self, req: Request<pb::CancelKeyDeletionRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let then = if r.enable { KeyState::Enabled } else { KeyState::Disabled };
            Ok(Response::new(key_reply(&d.cancel_key_deletion(&c, &key_ref(&r.key_id)?, then).await?)))
        })
        .await
    }

    async fn rotate_key(&self, req: Request<pb::RotateKeyRequest>) -> R<pb::KeyResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            Ok(Response::new(key_reply(&d.rotate_key(&c, &key_ref(&r.key_id)?).await?)))
        })
        .await
    }

    async fn create_alias(&self, req: Request<pb::CreateAliasRequest>) -> R<pb::AliasResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let e = d.create_alias(&c, &convert::alias(&r.alias)?, &key_ref(&r.key_id)?).await?;
            Ok(Response::new(pb::AliasResponse { alias: Some(convert::alias_to(&e)) }))
        })
        .await
    }

    async fn update_alias(&self, req: Request<pb::UpdateAliasRequest>) -> R<pb::AliasResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let e = d.update_alias(&c, &convert::alias(&r.alias)?, &key_ref(&r.key_id)?).await?;
            Ok(Response::new(pb::AliasResponse { alias: Some(convert::alias_to(&e)) }))
        })
        .await
    }

    async fn delete_alias(&self, req: Request<pb::DeleteAliasRequest>) -> R<pb::DeleteAliasResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            d.delete_alias(&c, &convert::alias(&r.alias)?).await?;
            Ok(Response::new(pb::DeleteAliasResponse {}))
        })
        .await
    }

    async fn list_aliases(&self, req: Request<pb::ListAliasesRequest>) -> R<pb::ListAliasesResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let key = (!r.key_id.is_empty()).then(|| key_ref(&r.key_id)).transpose()?;
            let page = d.list_aliases(&c, key.as_ref(), &convert::page(r.page_size, r.page_token.clone())).await?;
            Ok(Response::new(pb::ListAliasesResponse {
                aliases: page.items.iter().map(convert::alias_to).collect(),
                next_page_token: page.next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn health(&self, req: Request<pb::HealthRequest>) -> R<pb::HealthResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, _r| async move {
            let h = d.health(&c).await?;
            Ok(Response::new(pb::HealthResponse {
                ready: h.ready(),
                store_ok: h.store_ok,
                members: h
                    .members
                    .iter()
                    .map(|m| pb::BackendMember {
                        id: m.id.clone(),
                        model: m.model.clone(),
                        status: convert::health_status(m.status).to_owned(),
                        detail: m.detail.clone(),
                    })
                    .collect(),
                checked_at: Some(convert::ts(Timestamp::now())),
            }))
        })
        .await
    }
}
