//! `kmsgate --server URL ...`: the CLI's commands sent to a running server's admin API (docs/admin-api.md)
//! instead of opening the store. The server applies them through its own dispatcher, so its caches see a change
//! at once (a disabled key is refused by the very next request), and audits them as the `admin` frontend.
//!
//! The token comes from `KMSGATE_ADMIN_TOKEN`, else from the token file the server wrote (`admin.token_file`,
//! default `<data_dir>/admin.token`). An `https://` URL is verified against the PEM CA bundle in
//! `KMSGATE_SERVER_CA`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::alibaba_cli::{AlibabaCommand, ClientKeysCommand};
use crate::cli::{AliasesCommand, KeysCommand};
use crate::config::Config;
use crate::hsm_cli::HsmCommand;
use crate::xks_cli::{CredentialsCommand, StoresCommand, XksCommand};

/// How long one admin call may take end to end.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running server's admin API.
pub struct Remote {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    /// The URL's path prefix (for a server behind a path-routing proxy), without a trailing slash.
    prefix: String,
    token: String,
    tenant: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

impl Remote {
    pub fn new(url: &str, config: &Config) -> anyhow::Result<Remote> {
        let uri: http::Uri = url.parse().with_context(|| format!("--server {url}: not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--server {url}: expected http://HOST:PORT or https://HOST:PORT (the admin listener)"),
        };
        let host = uri.host().filter(|h| !h.is_empty()).context("--server: the URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let token = match std::env::var("KMSGATE_ADMIN_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let path = config.admin_token_file();
                crate::admin_api::read_token(&path)?
                    .with_context(|| {
                        format!(
                            "no admin token: set KMSGATE_ADMIN_TOKEN, or run where the server's token file {} is \
                             readable",
                            path.display()
                        )
                    })?
                    .as_str()
                    .to_owned()
            }
        };
        let tls = match https {
            false => None,
            true => Some(client_tls()?),
        };
        Ok(Remote { tls, host, port, prefix, token, tenant: config.default_tenant.clone() })
    }

    /// One call; a non-2xx answer becomes an error carrying the API's code and message.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        match tokio::time::timeout(TIMEOUT, self.send(method, path, body)).await {
            Ok(r) => r,
            Err(_) => bail!("the server did not answer within {} s", TIMEOUT.as_secs()),
        }
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(crate::admin_api::TENANT_HEADER, &self.tenant)
            .body(Full::new(Bytes::from(bytes)))
            .context("cannot build the request")?;
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to the admin listener {authority}"))?;
        let resp = match &self.tls {
            None => exchange(stream, req).await?,
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .with_context(|| format!("{} is not a valid TLS server name", self.host))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS to {authority} failed"))?;
                exchange(tls, req).await?
            }
        };
        let (status, bytes) = resp;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .with_context(|| format!("the server answered {status} with a non-JSON body"))?
        };
        if !status.is_success() {
            let code = value["error"]["code"].as_str().unwrap_or("error");
            let message = value["error"]["message"].as_str().or(value["error"].as_str()).unwrap_or("no detail");
            bail!("the server refused ({} {code}): {message}", status.as_u16());
        }
        Ok(value)
    }
}

async fn exchange<S>(io: S, req: hyper::Request<Full<Bytes>>) -> anyhow::Result<(http::StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.context("HTTP handshake")?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.context("the request failed")?;
    let status = resp.status();
    let body = resp.into_body().collect().await.context("reading the answer")?.to_bytes();
    Ok((status, body))
}

fn client_tls() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let path = std::env::var("KMSGATE_SERVER_CA").ok().filter(|p| !p.is_empty()).context(
        "an https:// --server needs KMSGATE_SERVER_CA: a PEM file of the CA that signed the admin certificate",
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&path).with_context(|| format!("cannot read {path}"))? {
        roots.add(c.with_context(|| format!("invalid PEM in {path}"))?).context("invalid CA certificate")?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A path segment with everything but unreserved characters percent-encoded (aliases carry `/`).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn not_online(what: &str) -> anyhow::Error {
    anyhow::anyhow!("`{what}` is not available through --server; run it without --server on a host with the store")
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_key(k: &Value) {
    let s = |f: &str| k[f].as_str().unwrap_or("-").to_owned();
    let list = |f: &str| {
        let items: Vec<String> =
            k[f].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
        if items.is_empty() { "-".to_owned() } else { items.join(", ") }
    };
    println!("id:          {}", s("id"));
    println!("spec:        {}", s("spec"));
    println!("usage:       {}", list("usage"));
    println!("state:       {}", s("state"));
    if let Some(t) = k["deletion_at"].as_str() {
        println!("deletion at: {t}");
    }
    println!("aliases:     {}", list("aliases"));
    println!("versions:    {} (primary {})", k["versions"].as_array().map_or(0, Vec::len), s("primary_version"));
    println!("created:     {}", s("created_at"));
}

pub async fn keys(remote: &Remote, cmd: KeysCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let key = match cmd {
        KeysCommand::Create(a) => {
            let req = crate::cli::create_request(&a)?;
            let usage = req.usage.map(|u| {
                let names: Vec<String> = u.iter().map(|x| x.as_str().to_ascii_lowercase()).collect();
                if names.is_empty() { "none".to_owned() } else { names.join(",") }
            });
            let body = json!({
                "spec": req.spec.as_str(), "usage": usage, "description": req.description,
                "aliases": req.aliases.iter().map(ToString::to_string).collect::<Vec<_>>(), "tags": req.tags,
                "id": req.id.map(|i| i.to_string()), "backend": req.backend,
            });
            remote.call("POST", "/v1/keys", Some(body)).await?
        }
        KeysCommand::List(a) => {
            let mut path = format!("/v1/keys?limit={}", a.limit);
            if let Some(after) = &a.after {
                path.push_str(&format!("&after={}", seg(after)));
            }
            let page = remote.call("GET", &path, None).await?;
            if json_out {
                println!("{page}");
            } else {
                println!("{:<36}  {:<8}  {:<15}  ALIASES", "ID", "SPEC", "STATE");
                for k in page["keys"].as_array().into_iter().flatten() {
                    let aliases: Vec<&str> =
                        k["aliases"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    println!(
                        "{:<36}  {:<8}  {:<15}  {}",
                        k["id"].as_str().unwrap_or("-"),
                        k["spec"].as_str().unwrap_or("-"),
                        k["state"].as_str().unwrap_or("-"),
                        aliases.join(",")
                    );
                }
                if let Some(n) = page["next"].as_str() {
                    println!("(more: --after {n})");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        KeysCommand::Describe { key } => remote.call("GET", &format!("/v1/keys/{}", seg(&key)), None).await?,
        KeysCommand::Enable { key } => remote.call("POST", &format!("/v1/keys/{}/enable", seg(&key)), None).await?,
        KeysCommand::Disable { key } => remote.call("POST", &format!("/v1/keys/{}/disable", seg(&key)), None).await?,
        KeysCommand::Rotate { key } => remote.call("POST", &format!("/v1/keys/{}/rotate", seg(&key)), None).await?,
        KeysCommand::ScheduleDeletion { key, days } => {
            let path = format!("/v1/keys/{}/schedule-deletion", seg(&key));
            remote.call("POST", &path, Some(json!({"days": days}))).await?
        }
        KeysCommand::CancelDeletion { key, enable } => {
            let path = format!("/v1/keys/{}/cancel-deletion", seg(&key));
            remote.call("POST", &path, Some(json!({"enable": enable}))).await?
        }
        KeysCommand::ImportHsm(_) => return Err(not_online("keys import-hsm")),
    };
    if json_out {
        print(&key)?;
    } else {
        print_key(&key);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn aliases(remote: &Remote, cmd: AliasesCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let entry = match cmd {
        AliasesCommand::Create { alias, key } => {
            remote.call("POST", "/v1/aliases", Some(json!({"alias": alias, "key": key}))).await?
        }
        AliasesCommand::Update { alias, key } => {
            remote.call("PUT", &format!("/v1/aliases/{}", seg(&alias)), Some(json!({"key": key}))).await?
        }
        AliasesCommand::Delete { alias } => {
            let v = remote.call("DELETE", &format!("/v1/aliases/{}", seg(&alias)), None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("deleted {alias}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        AliasesCommand::List { key, limit, after } => {
            let mut path = format!("/v1/aliases?limit={limit}");
            if let Some(k) = key {
                path.push_str(&format!("&key={}", seg(&k)));
            }
            if let Some(a) = after {
                path.push_str(&format!("&after={}", seg(&a)));
            }
            let page = remote.call("GET", &path, None).await?;
            if json_out {
                println!("{page}");
            } else {
                for e in page["aliases"].as_array().into_iter().flatten() {
                    println!("{} -> {}", e["alias"].as_str().unwrap_or("-"), e["key_id"].as_str().unwrap_or("-"));
                }
                if let Some(n) = page["next"].as_str() {
                    println!("(more: --after {n})");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if json_out {
        println!("{entry}");
    } else {
        println!("{} -> {}", entry["alias"].as_str().unwrap_or("-"), entry["key_id"].as_str().unwrap_or("-"));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn xks(remote: &Remote, cmd: XksCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        XksCommand::Stores(StoresCommand::List) => {
            let v = remote.call("GET", "/v1/xks/stores", None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("{:<24}  {:<48}  KEYS", "NAME", "URI PATH");
                for s in v["stores"].as_array().into_iter().flatten() {
                    let keys = if s["all_keys"].as_bool() == Some(true) {
                        "all".to_owned()
                    } else {
                        s["keys"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    println!(
                        "{:<24}  {:<48}  {keys}",
                        s["name"].as_str().unwrap_or("-"),
                        s["uri_path"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        XksCommand::Stores(StoresCommand::Create(_)) => return Err(not_online("xks stores create")),
        XksCommand::Stores(StoresCommand::Delete { .. }) => return Err(not_online("xks stores delete")),
        XksCommand::Credentials(CredentialsCommand::List { store }) => {
            let path = match store {
                Some(s) => format!("/v1/xks/credentials?store={}", seg(&s)),
                None => "/v1/xks/credentials".to_owned(),
            };
            let v = remote.call("GET", &path, None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("{:<30}  {:<24}  CREATED", "ACCESS KEY ID", "STORE");
                for c in v["credentials"].as_array().into_iter().flatten() {
                    println!(
                        "{:<30}  {:<24}  {}",
                        c["access_key_id"].as_str().unwrap_or("-"),
                        c["store"].as_str().unwrap_or("-"),
                        c["created_at"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        XksCommand::Credentials(CredentialsCommand::Revoke { access_key_id }) => {
            let v = remote.call("POST", &format!("/v1/xks/credentials/{}/revoke", seg(&access_key_id)), None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("revoked {} of key store {}", access_key_id, v["store"].as_str().unwrap_or("-"));
            }
        }
        // Minting returns a secret: it stays with the local CLI, which writes it to a 0600 file.
        XksCommand::Credentials(CredentialsCommand::Create { .. }) => return Err(not_online("xks credentials create")),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn alibaba(remote: &Remote, cmd: AlibabaCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    // Other `alibaba` subcommands work on the store only.
    #[allow(unreachable_patterns)]
    let cmd = match cmd {
        AlibabaCommand::ClientKeys(c) => c,
        _ => return Err(not_online("this alibaba command")),
    };
    match cmd {
        ClientKeysCommand::List => {
            let v = remote.call("GET", "/v1/alibaba/client-keys", None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("{:<45}  {:<24}  STATE", "ID", "IDENTITY");
                for k in v["client_keys"].as_array().into_iter().flatten() {
                    let state = if k["revoked"].as_bool() == Some(true) { "revoked" } else { "active" };
                    println!(
                        "{:<45}  {:<24}  {state}",
                        k["id"].as_str().unwrap_or("-"),
                        k["identity"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        ClientKeysCommand::Revoke { id } => {
            let v = remote.call("POST", &format!("/v1/alibaba/client-keys/{}/revoke", seg(&id)), None).await?;
            if json_out {
                println!("{v}");
            } else {
                println!("revoked ClientKey {id}");
            }
        }
        // Issuing writes private key files: the local CLI does that.
        ClientKeysCommand::Create { .. } => return Err(not_online("alibaba client-keys create")),
        ClientKeysCommand::SetQps { .. } => return Err(not_online("alibaba client-keys set-qps")),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn hsm(remote: &Remote, cmd: HsmCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let HsmCommand::Status = cmd;
    let v = remote.call("GET", "/v1/hsm/status", None).await?;
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let all_active = members.iter().all(|m| m["health"]["status"].as_str() == Some("ACTIVE"));
    if json_out {
        print(&v)?;
    } else if members.is_empty() {
        println!("the server has no PKCS#11 backends");
    } else {
        for m in &members {
            println!(
                "{}: {} ({})",
                m["name"].as_str().unwrap_or("-"),
                m["health"]["status"].as_str().unwrap_or("-"),
                m["health"]["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if all_active { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::seg;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(seg("alias/pay ments"), "alias%2Fpay%20ments");
        assert_eq!(seg("0b4e-AZ_.~"), "0b4e-AZ_.~");
    }
}
