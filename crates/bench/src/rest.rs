//! The secrets REST API workload: `GET /v1/secrets/{path}` with a bearer token, the read a service makes at
//! start-up or on every request that needs a credential. The token comes from `kmsgate secrets bootstrap`;
//! the secret is written once with `PUT` when the server is up. A bearer token is the same on every request
//! (that is the protocol: nothing is signed per request), so each request carries its own `X-Request-ID`.
//!
//! The API's per-identity rate limits (1000 reads a minute for the token's identity) would turn a benchmark
//! into a run of 429s: the bench's gateway configuration sets `secrets.rate_limits = false`.

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::client::Endpoint;
use crate::gateway::Gateway;
use crate::load::{Body, Workload};

/// The secret every read asks for.
pub const SECRET_PATH: &str = "bench/db";

/// A bootstrap token for the gateway's default tenant (an admin identity), from its CLI.
pub fn setup(gw: &Gateway) -> anyhow::Result<String> {
    let out = gw.cli(&["--json", "secrets", "bootstrap"])?;
    let v: Value = serde_json::from_str(out.trim()).context("unreadable `secrets bootstrap` output")?;
    let token = v.get("token").and_then(Value::as_str).context("no token in the `secrets bootstrap` output")?;
    Ok(token.to_owned())
}

fn request(endpoint: &Endpoint, method: &str, path: &str, token: &str, json_body: bool) -> http::request::Builder {
    let mut req = http::Request::builder()
        .method(method)
        .uri(endpoint.uri(path))
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/json");
    if json_body {
        req = req.header("content-type", "application/json");
    }
    if !endpoint.http2 {
        req = req.header("host", endpoint.authority.as_str());
    }
    req
}

/// The wire label of a failed answer: the status and the envelope's `error.code`.
fn error_label(status: u16, body: &[u8]) -> String {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/code").and_then(Value::as_str).map(str::to_owned));
    match code {
        Some(c) => format!("{status} {c}"),
        None => status.to_string(),
    }
}

/// Writes the secret `{"password": value}` at [`SECRET_PATH`] (a new version if it exists).
pub async fn put_secret(endpoint: &Endpoint, token: &str, value: &str) -> anyhow::Result<()> {
    let body = Bytes::from(serde_json::to_vec(&json!({"data": {"password": value}, "secret_type": "kv"}))?);
    let req = request(endpoint, "PUT", &format!("/v1/secrets/{SECRET_PATH}"), token, true).body(Body::new(body))?;
    let mut conn = endpoint.connect().await?;
    let (status, answer) = conn.roundtrip(req).await?;
    if status != 200 && status != 201 {
        bail!("PUT /v1/secrets/{SECRET_PATH} failed: {}", error_label(status, &answer));
    }
    Ok(())
}

/// `GET /v1/secrets/bench/db` with a bearer token.
#[derive(Debug)]
pub struct RestReadWorkload {
    endpoint: Arc<Endpoint>,
    token: String,
    /// The value [`put_secret`] wrote, which a verified answer must carry.
    value: String,
    path: String,
}

impl RestReadWorkload {
    pub fn new(endpoint: Arc<Endpoint>, token: &str, value: &str) -> RestReadWorkload {
        RestReadWorkload {
            endpoint,
            token: token.to_owned(),
            value: value.to_owned(),
            path: format!("/v1/secrets/{SECRET_PATH}"),
        }
    }

    pub fn build(&self, seq: u64) -> anyhow::Result<http::Request<Body>> {
        Ok(request(&self.endpoint, "GET", &self.path, &self.token, false)
            .header("x-request-id", format!("bench-{seq}"))
            .body(Body::new(Bytes::new()))?)
    }

    fn verify(&self, body: &[u8]) -> Result<(), String> {
        let v: Value = serde_json::from_slice(body).map_err(|_| "verify: the answer is not JSON".to_owned())?;
        if v.get("path").and_then(Value::as_str) != Some(SECRET_PATH) {
            return Err("verify: wrong or no path".to_owned());
        }
        // Compared, never printed: the label must not carry the value.
        if v.pointer("/data/password").and_then(Value::as_str) != Some(self.value.as_str()) {
            return Err("verify: data.password is not the value written".to_owned());
        }
        Ok(())
    }
}

impl Workload for RestReadWorkload {
    type State = ();

    fn state(&self) {}

    fn request(&self, seq: u64, _: &mut ()) -> anyhow::Result<http::Request<Body>> {
        self.build(seq)
    }

    fn check(&self, _seq: u64, status: u16, body: &[u8], verify: bool) -> Result<(), String> {
        if status != 200 {
            return Err(error_label(status, body));
        }
        if verify { self.verify(body) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn errors_are_labelled_by_the_envelope_code() {
        let body = br#"{"error":{"code":"secret_not_found","message":"m","request_id":"r"}}"#;
        assert_eq!(error_label(404, body), "404 secret_not_found");
        assert_eq!(error_label(502, b"<html>"), "502");
    }
}
