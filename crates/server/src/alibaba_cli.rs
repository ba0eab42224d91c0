//! `kmsgate alibaba client-keys ...`: ClientKeys of the Alibaba KMS instance API. The CLI writes the store
//! through the dispatcher; running servers pick each change up from the change feed, so nothing restarts.

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
}

#[derive(Debug, Subcommand)]
pub enum ClientKeysCommand {
    /// Issue a ClientKey for an identity of the tenant (--tenant) and write its private key (PKCS#8 PEM, mode
    /// 0600) into --out-dir; the gateway keeps only the public half.
    Create {
        /// The identity requests signed with this key act as (policies and audit name it).
        #[arg(long)]
        identity: String,
        /// Directory for `clientKey_<id>_PrivateKey.pem` (default: the current directory).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tenant's ClientKeys (never key material).
    List,
    /// Revoke a ClientKey: servers refuse it within their change-poll interval.
    Revoke { id: String },
}

pub async fn run(config: Config, cmd: AlibabaCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let AlibabaCommand::ClientKeys(cmd) = cmd;
    if let ClientKeysCommand::Create { out_dir, .. } = &cmd
        && !out_dir.is_dir()
    {
        anyhow::bail!("--out-dir: {} is not a directory", out_dir.display());
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        ClientKeysCommand::Create { identity, out_dir, description } => {
            let key = clientkey::create(d, &caller, &identity, &description).await.map_err(core_err)?;
            let path = out_dir.join(format!("clientKey_{}_PrivateKey.pem", key.id));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
            f.write_all(key.private_key_pem().map_err(core_err)?.as_bytes())?;
            f.sync_all()?;
            if json_out {
                println!(
                    "{}",
                    json!({ "id": key.id, "tenant": app.tenant, "identity": identity, "private_key_file": path })
                );
            } else {
                println!("issued ClientKey {} for {identity} in tenant {}", key.id, app.tenant);
                println!("  private key: {} (mode 0600; the gateway does not keep it)", path.display());
                println!("  SDK config: access_key_id={} private_key=<contents of that file>", key.id);
            }
        }
        ClientKeysCommand::List => {
            let list = clientkey::list(d, Some(&app.tenant)).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "client_keys": list }));
            } else {
                println!("{:<45}  {:<24}  {:<8}  CREATED", "ID", "IDENTITY", "STATE");
                for k in &list {
                    let state = if k.revoked { "revoked" } else { "active" };
                    println!("{:<45}  {:<24}  {:<8}  {}", k.id, k.identity, state, k.created_at);
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
