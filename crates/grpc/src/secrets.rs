//! kmsgate.v1.SecretsService over the core's secret inventory: the same secrets the secrets REST API and
//! Alibaba GetSecretValue read.

use std::time::Duration;

use kmsgate_core::{
    DeleteMode, DeletedFilter, Dispatcher, Error, ErrorKind, Frontend, PutSecretRequest, SecretFilter,
    SecretListFilter, SecretPath, SecretSelector, WriteMode,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::{Action, AuthChain};
use crate::call::{Guarded as _, begin, run, with_caller};
use crate::convert;
use crate::proto::kmsgate_v1 as pb;
use crate::proto::kmsgate_v1::secrets_service_server::SecretsService;

type R<T> = Result<Response<T>, Status>;

/// Default soft-delete retention when the request gives none.
const DEFAULT_RECOVERY_DAYS: u32 = 30;

#[derive(Debug, Clone)]
pub struct SecretsSvc {
    dispatcher: Dispatcher,
    auth: AuthChain,
}

impl SecretsSvc {
    pub fn new(dispatcher: Dispatcher, auth: AuthChain) -> Self {
        Self { dispatcher, auth }
    }
}

fn path(s: &str) -> Result<SecretPath, Error> {
    if s.is_empty() {
        return Err(Error::invalid("path is required"));
    }
    SecretPath::parse(s)
}

fn metadata(json: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(json).map_err(|_| Error::invalid("metadata_json is not JSON"))
}

#[tonic::async_trait]
impl SecretsService for SecretsSvc {
    async fn get_secret(&self, req: Request<pb::GetSecretRequest>) -> R<pb::GetSecretResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let selector = match r.selector {
                None => SecretSelector::Current,
                Some(pb::get_secret_request::Selector::Version(v)) => SecretSelector::Version(v),
                Some(pb::get_secret_request::Selector::VersionId(v)) => SecretSelector::VersionId(v),
                Some(pb::get_secret_request::Selector::Stage(s)) => SecretSelector::Stage(s),
            };
            let v = d.get_secret_value(&c, &path(&r.path)?, &selector).await?;
            Ok(Response::new(pb::GetSecretResponse {
                secret: Some(convert::secret_to(&v.secret)),
                version: Some(convert::secret_version_to(&v.version)),
                data: v.data.to_vec(),
            }))
        })
        .await
    }

    async fn put_secret(&self, req: Request<pb::PutSecretRequest>) -> R<pb::PutSecretResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let mode = match pb::WriteMode::try_from(r.mode) {
                Ok(pb::WriteMode::Upsert) => WriteMode::Upsert,
                Ok(pb::WriteMode::CreateOnly) => WriteMode::CreateOnly,
                Ok(pb::WriteMode::UpdateOnly) => WriteMode::UpdateOnly,
                Err(_) => return Err(Error::invalid("unknown write mode")),
            };
            let mut p = PutSecretRequest::new(path(&r.path)?, Vec::new());
            p.data = Zeroizing::new(r.data);
            p.mode = mode;
            p.secret_type = r.secret_type;
            p.metadata = r.metadata_json.as_deref().map(metadata).transpose()?;
            p.max_versions = r.max_versions;
            p.cas = r.cas;
            p.version_id = r.version_id;
            p.stages = (!r.stages.is_empty()).then_some(r.stages);
            p.expires_at = r.expires_at.as_ref().map(convert::from_ts).transpose()?.map(Some);
            let w = d.put_secret(&c, p).await?;
            Ok(Response::new(pb::PutSecretResponse {
                secret: Some(convert::secret_to(&w.secret)),
                version: Some(convert::secret_version_to(&w.version)),
                created: w.created,
            }))
        })
        .await
    }

    async fn list_secrets(&self, req: Request<pb::ListSecretsRequest>) -> R<pb::ListSecretsResponse> {
        // By hand rather than `with_caller`: the guard also filters the page, as the REST listing does (a
        // path the caller may not `list` is left out, not an error).
        let ctx = begin(&self.auth, &req, Frontend::Grpc).await?;
        ctx.check_audited(&self.dispatcher, req.get_ref().action()).await?;
        let (d, c, r, guard) = (self.dispatcher.clone(), ctx.caller, req.into_inner(), ctx.guard);
        run(ctx.deadline, async move {
            let filter = SecretListFilter {
                store: SecretFilter {
                    prefix: (!r.prefix.is_empty()).then(|| SecretPath::parse(&r.prefix)).transpose()?,
                    deleted: if r.include_deleted { DeletedFilter::Include } else { DeletedFilter::Exclude },
                },
                secret_type: (!r.secret_type.is_empty()).then_some(r.secret_type),
                tag: (!r.tag.is_empty()).then_some(r.tag),
                expiring_within: None,
            };
            let page = d.list_secrets(&c, &filter, &convert::page(r.page_size, r.page_token)).await?;
            let mut secrets = Vec::with_capacity(page.items.len());
            for s in &page.items {
                if let Some(g) = &guard {
                    match g.check(Action::Secret { permission: "list", path: s.path.as_str() }).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::AccessDenied => continue,
                        Err(e) => return Err(e),
                    }
                }
                secrets.push(convert::secret_to(s));
            }
            Ok(Response::new(pb::ListSecretsResponse { secrets, next_page_token: page.next.unwrap_or_default() }))
        })
        .await
    }

    async fn delete_secret(&self, req: Request<pb::DeleteSecretRequest>) -> R<pb::DeleteSecretResponse> {
        with_caller(&self.auth, &self.dispatcher, req, |d, c, r| async move {
            let mode = if r.permanent {
                DeleteMode::Permanent
            } else {
                let days = if r.recovery_window_days == 0 { DEFAULT_RECOVERY_DAYS } else { r.recovery_window_days };
                DeleteMode::Soft { retention: Duration::from_secs(u64::from(days) * 86_400) }
            };
            let s = d.delete_secret(&c, &path(&r.path)?, mode).await?;
            Ok(Response::new(pb::DeleteSecretResponse { secret: Some(convert::secret_to(&s)) }))
        })
        .await
    }
}
