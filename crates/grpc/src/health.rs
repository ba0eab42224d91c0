//! grpc.health.v1 reporting the real readiness: every Check probes the store and the HSM fleet (the same
//! unaudited probe as `/readyz`), and Watch re-probes on an interval and sends each change.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use kmsgate_core::Dispatcher;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The services whose health this reports; "" is the server as a whole.
pub const SERVICES: &[&str] = &["", "kmsgate.v1.KeyManagementService", "kmsgate.v1.SecretsService"];

#[derive(Debug, Clone)]
pub struct HealthService {
    dispatcher: Dispatcher,
    watch_every: Duration,
}

impl HealthService {
    pub fn new(dispatcher: Dispatcher, watch_every: Duration) -> Self {
        Self { dispatcher, watch_every: watch_every.max(Duration::from_millis(100)) }
    }

    async fn status(&self) -> ServingStatus {
        if self.dispatcher.readiness().await.ready() { ServingStatus::Serving } else { ServingStatus::NotServing }
    }
}

fn known(service: &str) -> Result<(), Status> {
    if SERVICES.contains(&service) { Ok(()) } else { Err(Status::not_found("unknown service")) }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        known(&req.get_ref().service)?;
        Ok(Response::new(HealthCheckResponse { status: self.status().await as i32 }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        known(&req.get_ref().service)?;
        let me = self.clone();
        let stream = futures::stream::unfold((me, None::<ServingStatus>), |(me, last)| async move {
            loop {
                if last.is_some() {
                    tokio::time::sleep(me.watch_every).await;
                }
                let now = me.status().await;
                if last != Some(now) {
                    return Some((Ok(HealthCheckResponse { status: now as i32 }), (me, Some(now))));
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
