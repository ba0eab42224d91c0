//! `kmsgate xks ...`: external key stores and their SigV4 credentials. The CLI writes the store through the
//! dispatcher; running servers pick each change up from the change feed, so nothing restarts.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kmsgate_core::KeyRef;
use kmsgate_xks::admin::{self, NewStore};
use kmsgate_xks::keystore::{Quota, uri_path_from_prefix, valid_store_name};
use kmsgate_xks::rules::Rules;
use serde_json::json;

use crate::app::{App, core_err};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum XksCommand {
    /// External key stores: a URI prefix, a tenant, the keys it serves, a quota and authorization rules.
    #[command(subcommand)]
    Stores(StoresCommand),
    /// SigV4 credentials of a key store (at least two may be live at once, for rotation).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
}

#[derive(Debug, Subcommand)]
pub enum StoresCommand {
    /// Create a key store in the tenant (--tenant, default: the configured default tenant).
    Create(CreateStoreArgs),
    /// List the tenant's key stores.
    List,
    /// Delete a key store with its URI path and all its credentials.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CreateStoreArgs {
    /// Name of the key store (1-64 of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    name: String,
    /// URI prefix (`/keystore-a`, or empty for none); `/kms/xks/v1` is appended. The full path is what the AWS
    /// console calls XksProxyUriPath.
    #[arg(long, allow_hyphen_values = true)]
    prefix: String,
    /// Comma-separated key ids or aliases the key store serves.
    #[arg(long, value_delimiter = ',', conflicts_with = "all_keys", required_unless_present = "all_keys")]
    keys: Vec<String>,
    /// Serve every AES_256 key of the tenant.
    #[arg(long)]
    all_keys: bool,
    /// Requests per second this key store may make on each replica (429 ThrottlingException beyond).
    #[arg(long)]
    quota_rps: Option<u32>,
    /// Burst above the rate (default: the rate).
    #[arg(long, requires = "quota_rps")]
    quota_burst: Option<u32>,
    /// JSON file of secondary-authorization rules (docs/xks.md).
    #[arg(long)]
    rules: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Mint a credential and print the JSON file the AWS KMS console imports.
    Create {
        #[arg(long)]
        store: String,
        /// Write the file (mode 0600, never overwriting) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List credentials (never their secrets).
    List {
        #[arg(long)]
        store: Option<String>,
    },
    /// Revoke a credential: servers refuse it within their change-poll interval.
    Revoke { access_key_id: String },
}

pub async fn run(config: Config, cmd: XksCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        XksCommand::Stores(c) => stores(config, c, json_out).await,
        XksCommand::Credentials(c) => credentials(config, c, json_out).await,
    }
}

fn new_store(a: CreateStoreArgs) -> anyhow::Result<NewStore> {
    if !valid_store_name(&a.name) {
        anyhow::bail!("--name: 1-64 characters of A-Z a-z 0-9 . _ -");
    }
    let Some(uri_path) = uri_path_from_prefix(&a.prefix) else {
        anyhow::bail!(
            "--prefix: the URI path (prefix + /kms/xks/v1) must be 10-128 characters of A-Z a-z 0-9 / _ - without \
             empty segments"
        );
    };
    let keys: Vec<String> = a.keys.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
    for k in &keys {
        KeyRef::parse(k).map_err(|e| anyhow::anyhow!("--keys {k}: {}", e.message()))?;
    }
    if !a.all_keys && keys.is_empty() {
        anyhow::bail!("name the keys with --keys, or use --all-keys");
    }
    let quota = match a.quota_rps {
        Some(0) => anyhow::bail!("--quota-rps must be positive"),
        Some(rps) => Some(Quota { rps, burst: a.quota_burst.unwrap_or(rps).max(1) }),
        None => None,
    };
    let rules = match &a.rules {
        None => Rules::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--rules: cannot read {}: {e}", path.display()))?;
            let rules: Rules =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--rules {}: {e}", path.display()))?;
            rules.validate().map_err(|e| anyhow::anyhow!("--rules {}: {e}", path.display()))?;
            rules
        }
    };
    Ok(NewStore { name: a.name, uri_path, all_keys: a.all_keys, keys, quota, rules })
}

enum StoresParsed {
    Create(NewStore),
    List,
    Delete(String),
}

async fn stores(config: Config, cmd: StoresCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    // Bad input changes nothing: parse before opening the store.
    let cmd = match cmd {
        StoresCommand::Create(a) => StoresParsed::Create(new_store(a)?),
        StoresCommand::List => StoresParsed::List,
        StoresCommand::Delete { name } => StoresParsed::Delete(name),
    };
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        StoresParsed::Create(s) => {
            let info = admin::create_store(d, &caller, s).await.map_err(core_err)?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let keys = if info.all_keys { "all AES_256 keys".to_owned() } else { info.keys.join(", ") };
                println!("created XKS key store {} in tenant {}", info.name, info.tenant);
                println!("  XksProxyUriPath: {}", info.uri_path);
                println!("  keys:            {keys}");
                if let Some(q) = info.quota {
                    println!("  quota:           {} req/s, burst {} (per replica)", q.rps, q.burst);
                }
                println!("  rules:           {}", info.rules);
                println!("next: kmsgate xks credentials create --store {}", info.name);
            }
        }
        StoresParsed::List => {
            let list = admin::list_stores(d, Some(&app.tenant)).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "stores": list }));
            } else {
                println!("{:<24}  {:<48}  {:<5}  {:<8}  KEYS", "NAME", "URI PATH", "RULES", "QUOTA");
                for s in &list {
                    let quota = s.quota.map(|q| format!("{}/s", q.rps)).unwrap_or_else(|| "-".to_owned());
                    let keys = if s.all_keys { "all".to_owned() } else { s.keys.join(",") };
                    println!("{:<24}  {:<48}  {:<5}  {:<8}  {keys}", s.name, s.uri_path, s.rules, quota);
                }
            }
        }
        StoresParsed::Delete(name) => {
            let removed = admin::delete_store(d, &caller, &name).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "deleted": name, "credentials_revoked": removed }));
            } else {
                println!("deleted XKS key store {name} ({} credentials revoked)", removed.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn credentials(config: Config, cmd: CredentialsCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    if let CredentialsCommand::Create { out: Some(path), .. } = &cmd
        && path.exists()
    {
        anyhow::bail!("--out: {} exists; choose a new file (secrets are never written over files)", path.display());
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        CredentialsCommand::Create { store, out } => {
            let cred = admin::create_credential(d, &caller, &store).await.map_err(core_err)?;
            let file = serde_json::to_string_pretty(&cred.console_json())?;
            match out {
                None => println!("{file}"),
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| anyhow::anyhow!("--out: cannot create {}: {e}", path.display()))?;
                    f.write_all(file.as_bytes())?;
                    f.write_all(b"\n")?;
                    f.sync_all()?;
                    if json_out {
                        println!("{}", json!({"access_key_id": cred.access_key_id, "store": cred.store, "file": path}));
                    } else {
                        println!(
                            "wrote {} (mode 0600) with AccessKeyId {} for key store {}: import it in the AWS KMS \
                             console, then delete it",
                            path.display(),
                            cred.access_key_id,
                            cred.store
                        );
                    }
                }
            }
        }
        CredentialsCommand::List { store } => {
            let list = admin::list_credentials(d, Some(&app.tenant), store.as_deref()).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "credentials": list }));
            } else {
                println!("{:<30}  {:<24}  CREATED", "ACCESS KEY ID", "STORE");
                for c in &list {
                    println!("{:<30}  {:<24}  {}", c.access_key_id, c.store, c.created_at);
                }
            }
        }
        CredentialsCommand::Revoke { access_key_id } => {
            let info = admin::revoke_credential(d, &caller, &access_key_id).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "revoked": info.access_key_id, "store": info.store }));
            } else {
                println!("revoked {} of key store {}", info.access_key_id, info.store);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
