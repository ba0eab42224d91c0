//! `kmsgate alibaba client-keys ...`: ClientKeys of the Alibaba KMS instance API; `kmsgate alibaba
//! access-keys ...`: AccessKeys of the OpenAPI. The CLI writes the store through the dispatcher; running
//! servers pick each change up from the change feed, so nothing restarts.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use kmsgate_alibaba::clientkey;
use serde_json::json;

use crate::app::{App, core_err};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AlibabaCommand {
    /// ClientKeys: the RSA credentials the instance API SDKs sign requests with.
    #[command(subcommand)]
    ClientKeys(ClientKeysCommand),
    /// AccessKeys: the id + secret pairs the OpenAPI SDKs sign requests with (HMAC).
    #[command(subcommand)]
    AccessKeys(AccessKeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum AccessKeysCommand {
    /// Issue an AccessKey for an identity of the tenant (--tenant). The secret is written once, mode 0600, to
    /// `<out-dir>/AccessKey_<id>.csv` (`AccessKey ID,AccessKey Secret`, as the vendor's console downloads it);
    /// the gateway keeps it only sealed under the tenant's sealing key.
    Create {
        /// The identity requests signed with this key act as (policies and audit name it).
        #[arg(long)]
        identity: String,
        /// Directory for the secret file (default: the current directory).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tenant's AccessKeys (never secrets).
    List,
    /// Revoke an AccessKey: servers refuse it (403 Forbidden.AccessKey) within their change-poll interval.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ClientKeysCommand {
    /// Issue a ClientKey for an identity of the tenant (--tenant) and write, mode 0600, into --out-dir: the
    /// vendor's `clientKey_<id>.json` (PKCS#12) with `clientKey_<id>_Password.txt`, and the same key as
    /// `clientKey_<id>_PrivateKey.pem` (PKCS#1). The gateway keeps only the public half.
    Create {
        /// The identity requests signed with this key act as (policies and audit name it).
        #[arg(long)]
        identity: String,
        /// Directory for the key files (default: the current directory).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
        /// Requests per second this ClientKey may make (default: alibaba.client_key_qps).
        #[arg(long)]
        qps: Option<u32>,
    },
    /// List the tenant's ClientKeys (never key material).
    List,
    /// Revoke a ClientKey: servers refuse it within their change-poll interval.
    Revoke { id: String },
    /// Give a ClientKey its own requests-per-second limit, or `default` for alibaba.client_key_qps; servers
    /// apply it within their change-poll interval.
    SetQps {
        id: String,
        /// A number of requests per second (at least 1), or `default`.
        qps: String,
    },
}

pub async fn run(config: Config, cmd: AlibabaCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        AlibabaCommand::ClientKeys(cmd) => run_client_keys(config, cmd, json_out).await,
        AlibabaCommand::AccessKeys(cmd) => run_access_keys(config, cmd, json_out).await,
    }
}

async fn run_access_keys(config: Config, cmd: AccessKeysCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    use kmsgate_alibaba::openapi::accesskey;
    if let AccessKeysCommand::Create { out_dir, .. } = &cmd
        && !out_dir.is_dir()
    {
        anyhow::bail!("--out-dir: {} is not a directory", out_dir.display());
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        AccessKeysCommand::Create { identity, out_dir, description } => {
            let key = accesskey::create(d, &caller, &identity, &description).await.map_err(core_err)?;
            let path = out_dir.join(format!("AccessKey_{}.csv", key.id));
            let csv = key.csv();
            write_private(&path, csv.as_bytes())?;
            if json_out {
                println!(
                    "{}",
                    json!({ "id": key.id, "tenant": app.tenant, "identity": identity, "secret_file": path })
                );
            } else {
                println!("issued AccessKey {} for {identity} in tenant {}", key.id, app.tenant);
                println!("  secret file: {} (mode 0600; shown only this once)", path.display());
            }
        }
        AccessKeysCommand::List => {
            let list = accesskey::list(d, Some(&app.tenant)).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "access_keys": list }));
            } else {
                println!("{:<26}  {:<24}  {:<8}  CREATED", "ID", "IDENTITY", "STATE");
                for k in &list {
                    let state = if k.revoked { "revoked" } else { "active" };
                    println!("{:<26}  {:<24}  {:<8}  {}", k.id, k.identity, state, k.created_at);
                }
            }
        }
        AccessKeysCommand::Revoke { id } => {
            accesskey::revoke(d, &caller, &id).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "revoked": id }));
            } else {
                println!("revoked AccessKey {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_client_keys(config: Config, cmd: ClientKeysCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    // Bad input is reported before the store is opened.
    let set_qps = match &cmd {
        ClientKeysCommand::SetQps { qps, .. } if qps == "default" => Some(None),
        ClientKeysCommand::SetQps { qps, .. } => match qps.parse::<u32>() {
            Ok(n) if n > 0 => Some(Some(n)),
            _ => anyhow::bail!("qps: expected a number of requests per second (at least 1) or `default`"),
        },
        _ => None,
    };
    if let ClientKeysCommand::Create { out_dir, .. } = &cmd
        && !out_dir.is_dir()
    {
        anyhow::bail!("--out-dir: {} is not a directory", out_dir.display());
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        ClientKeysCommand::Create { identity, out_dir, description, qps } => {
            if qps == Some(0) {
                anyhow::bail!("--qps must be at least 1");
            }
            let key = clientkey::create_with(d, &caller, &identity, &description, qps).await.map_err(core_err)?;
            // Everything is encoded before the first file is written, so a failure leaves no partial set.
            let files = key.client_key_files().map_err(core_err)?;
            let pem = key.private_key_pem().map_err(core_err)?;
            let (json_name, password_name) = kmsgate_alibaba::pkcs12::file_names(&key.id);
            let json_path = out_dir.join(json_name);
            let password_path = out_dir.join(password_name);
            let pem_path = out_dir.join(format!("clientKey_{}_PrivateKey.pem", key.id));
            write_private(&json_path, files.json.as_bytes())?;
            write_private(&password_path, files.password.as_bytes())?;
            write_private(&pem_path, pem.as_bytes())?;
            if json_out {
                println!(
                    "{}",
                    json!({
                        "id": key.id, "tenant": app.tenant, "identity": identity, "qps": qps,
                        "client_key_file": json_path, "password_file": password_path, "private_key_file": pem_path,
                    })
                );
            } else {
                println!("issued ClientKey {} for {identity} in tenant {}", key.id, app.tenant);
                println!("  client key file: {}", json_path.display());
                println!("  password file:   {}", password_path.display());
                println!("  private key PEM: {}", pem_path.display());
                println!("  (mode 0600; the gateway does not keep the private key)");
                println!("  SDK config: client_key_file=<client key file> password=<contents of the password file>");
            }
        }
        ClientKeysCommand::List => {
            let list = clientkey::list(d, Some(&app.tenant)).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "client_keys": list }));
            } else {
                println!("{:<45}  {:<24}  {:<8}  {:<7}  CREATED", "ID", "IDENTITY", "STATE", "QPS");
                for k in &list {
                    let state = if k.revoked { "revoked" } else { "active" };
                    let qps = k.qps.map_or_else(|| "default".to_owned(), |q| q.to_string());
                    println!("{:<45}  {:<24}  {:<8}  {:<7}  {}", k.id, k.identity, state, qps, k.created_at);
                }
            }
        }
        ClientKeysCommand::SetQps { id, .. } => {
            let qps = set_qps.flatten();
            clientkey::set_qps(d, &caller, &id, qps).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "id": id, "qps": qps }));
            } else {
                match qps {
                    Some(n) => println!("ClientKey {id} is limited to {n} requests per second"),
                    None => println!("ClientKey {id} follows alibaba.client_key_qps"),
                }
            }
        }
        ClientKeysCommand::Revoke { id } => {
            clientkey::revoke(d, &caller, &id).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "revoked": id }));
            } else {
                println!("revoked ClientKey {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` with mode 0600 (never overwriting) and makes its contents durable.
fn write_private(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}
