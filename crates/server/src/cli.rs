//! The admin CLI: works on the configured data store through the same dispatcher a server uses, so every
//! rule (usage subsets, states, aliases) applies and every change is audited and announced on the change
//! feed that running servers follow.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kmsgate_core::{
    AliasEntry, AliasName, CreateKeyRequest, Key, KeyId, KeyRef, KeySpec, KeyState, KeyUsageSet, PageRequest,
};
use serde_json::json;

use crate::app::{App, core_err};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key.
    Create(CreateArgs),
    /// List the tenant's keys.
    List(ListArgs),
    /// Show one key.
    Describe { key: String },
    /// Enable a disabled key.
    Enable { key: String },
    /// Disable a key: it refuses all cryptography until enabled.
    Disable { key: String },
    /// Schedule a key's destruction after a waiting period.
    ScheduleDeletion {
        key: String,
        /// Waiting period in days (7-366).
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion; the key comes back disabled unless --enable is given.
    CancelDeletion {
        key: String,
        #[arg(long)]
        enable: bool,
    },
    /// Add a new version of the key's material and make it primary; old ciphertexts still decrypt.
    Rotate { key: String },
    /// Adopt a key that already exists in a PKCS#11 HSM, found by --label or --id (hex CKA_ID).
    ImportHsm(crate::hsm_cli::ImportHsmArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// AES_256, RSA_2048, RSA_3072, EC_P256 or HMAC_256.
    #[arg(long, default_value = "AES_256")]
    spec: String,
    /// Comma-separated usages (encrypt,decrypt,sign,verify,generate_mac,verify_mac,wrap,unwrap) or `none`.
    /// Default: the spec's usual set.
    #[arg(long)]
    usage: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// An alias for the new key (repeatable), e.g. alias/payments.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// A tag key=value (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Use this id instead of a generated UUID (1-128 of A-Z a-z 0-9 - . _).
    #[arg(long)]
    id: Option<String>,
    /// Backend to create the key in (default: backend.default).
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: u32,
    /// Continue after this key id (the `next` of the previous page).
    #[arg(long)]
    pub(crate) after: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AliasesCommand {
    /// Point a new alias at a key.
    Create { alias: String, key: String },
    /// Point an existing alias at another key.
    Update { alias: String, key: String },
    /// Delete an alias (the key is unaffected).
    Delete { alias: String },
    /// List aliases, optionally of one key.
    List {
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
    },
}

/// Bad input is reported before anything is opened or changed.
fn parse<T>(r: kmsgate_core::Result<T>, what: &str) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: {}", e.message()))
}

pub async fn keys(config: Config, cmd: KeysCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let cmd = match cmd {
        KeysCommand::ImportHsm(args) => return crate::hsm_cli::import_hsm(config, args, json_out).await,
        other => other,
    };
    // Validate everything the user typed before touching the store.
    let create = match &cmd {
        KeysCommand::Create(a) => Some(create_request(a)?),
        _ => None,
    };
    let key_arg = match &cmd {
        KeysCommand::Describe { key }
        | KeysCommand::Enable { key }
        | KeysCommand::Disable { key }
        | KeysCommand::ScheduleDeletion { key, .. }
        | KeysCommand::CancelDeletion { key, .. }
        | KeysCommand::Rotate { key } => Some(parse(KeyRef::parse(key), "key")?),
        KeysCommand::Create(_) | KeysCommand::List(_) | KeysCommand::ImportHsm(_) => None,
    };
    if let KeysCommand::ScheduleDeletion { days, .. } = &cmd
        && !(7..=366).contains(days)
    {
        anyhow::bail!("--days must be 7 to 366");
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    let key = match (cmd, create, key_arg) {
        (KeysCommand::Create(_), Some(req), _) => d.create_key(&caller, req).await,
        (KeysCommand::List(a), _, _) => {
            let page = d.list_keys(&caller, &PageRequest { after: a.after, limit: a.limit }).await.map_err(core_err)?;
            print_key_list(&app, &page.items, page.next.as_deref(), json_out).await;
            return Ok(ExitCode::SUCCESS);
        }
        (KeysCommand::Describe { .. }, _, Some(k)) => d.describe_key(&caller, &k).await.map(|k| (*k).clone()),
        (KeysCommand::Enable { .. }, _, Some(k)) => d.enable_key(&caller, &k).await,
        (KeysCommand::Disable { .. }, _, Some(k)) => d.disable_key(&caller, &k).await,
        (KeysCommand::ScheduleDeletion { days, .. }, _, Some(k)) => d.schedule_key_deletion(&caller, &k, days).await,
        (KeysCommand::CancelDeletion { enable, .. }, _, Some(k)) => {
            let then = if enable { KeyState::Enabled } else { KeyState::Disabled };
            d.cancel_key_deletion(&caller, &k, then).await
        }
        (KeysCommand::Rotate { .. }, _, Some(k)) => d.rotate_key(&caller, &k).await,
        _ => anyhow::bail!("internal: command and arguments do not match"),
    }
    .map_err(core_err)?;
    let aliases = aliases_of(&app, &key.id).await;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&key_json(&key, &aliases))?);
    } else {
        print_key(&key, &aliases);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn create_request(a: &CreateArgs) -> anyhow::Result<CreateKeyRequest> {
    let spec: KeySpec = parse(a.spec.parse(), "--spec")?;
    let mut req = CreateKeyRequest::new(spec);
    if let Some(u) = &a.usage {
        let usage = parse(KeyUsageSet::parse_list(u), "--usage")?;
        if !usage.is_subset_of(spec.allowed_usages()) {
            let allowed: Vec<_> = spec.allowed_usages().iter().map(|u| u.as_str().to_ascii_lowercase()).collect();
            anyhow::bail!("--usage: a {spec} key can only have {}", allowed.join(","));
        }
        req.usage = Some(usage);
    }
    req.description = a.description.clone();
    req.aliases = a.aliases.iter().map(|s| parse(AliasName::parse(s), "--alias")).collect::<anyhow::Result<_>>()?;
    let mut tags = BTreeMap::new();
    for t in &a.tags {
        let Some((k, v)) = t.split_once('=') else { anyhow::bail!("--tag must be key=value") };
        if k.is_empty() {
            anyhow::bail!("--tag must be key=value with a non-empty key");
        }
        tags.insert(k.to_owned(), v.to_owned());
    }
    req.tags = tags;
    req.id = a.id.as_deref().map(|s| parse(KeyId::parse(s), "--id")).transpose()?;
    req.backend = a.backend.clone();
    Ok(req)
}

async fn aliases_of(app: &App, key: &KeyId) -> Vec<String> {
    let caller = app.admin();
    match app.dispatcher.list_aliases(&caller, Some(&KeyRef::Id(key.clone())), &PageRequest::first(1000)).await {
        Ok(p) => p.items.into_iter().map(|a| a.alias.to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

pub(crate) fn key_json(k: &Key, aliases: &[String]) -> serde_json::Value {
    json!({
        "id": k.id,
        "tenant": k.tenant,
        "spec": k.spec,
        "usage": k.usage,
        "state": k.state,
        "origin": k.origin,
        "description": k.description,
        "tags": k.tags,
        "aliases": aliases,
        "primary_version": k.primary_version,
        "versions": k.versions.iter().map(|v| json!({
            "id": v.id, "backend": v.handle.backend, "created_at": v.created_at.to_rfc3339(),
        })).collect::<Vec<_>>(),
        "created_at": k.created_at.to_rfc3339(),
        "updated_at": k.updated_at.to_rfc3339(),
        "deletion_at": k.deletion_at.map(|t| t.to_rfc3339()),
    })
}

fn usage_text(u: KeyUsageSet) -> String {
    if u.is_empty() { "none".to_owned() } else { u.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",") }
}

pub(crate) fn print_key(k: &Key, aliases: &[String]) {
    println!("id:          {}", k.id);
    println!("spec:        {}", k.spec);
    println!("usage:       {}", usage_text(k.usage));
    println!("state:       {}", k.state.as_str());
    if let Some(t) = k.deletion_at {
        println!("deletion at: {}", t.to_rfc3339());
    }
    println!("aliases:     {}", if aliases.is_empty() { "-".to_owned() } else { aliases.join(", ") });
    if !k.description.is_empty() {
        println!("description: {}", k.description);
    }
    if !k.tags.is_empty() {
        let tags: Vec<_> = k.tags.iter().map(|(a, b)| format!("{a}={b}")).collect();
        println!("tags:        {}", tags.join(", "));
    }
    println!("versions:    {} (primary {})", k.versions.len(), k.primary_version);
    println!("backend:     {}", k.versions.last().map(|v| v.handle.backend.as_str()).unwrap_or("-"));
    println!("created:     {}", k.created_at.to_rfc3339());
}

async fn print_key_list(app: &App, keys: &[Key], next: Option<&str>, json_out: bool) {
    if json_out {
        let mut items = Vec::new();
        for k in keys {
            items.push(key_json(k, &aliases_of(app, &k.id).await));
        }
        println!("{}", json!({"keys": items, "next": next}));
        return;
    }
    println!("{:<36}  {:<8}  {:<15}  {:<24}  ALIASES", "ID", "SPEC", "STATE", "USAGE");
    for k in keys {
        let aliases = aliases_of(app, &k.id).await;
        println!(
            "{:<36}  {:<8}  {:<15}  {:<24}  {}",
            k.id,
            k.spec.as_str(),
            k.state.as_str(),
            usage_text(k.usage),
            aliases.join(",")
        );
    }
    if let Some(n) = next {
        println!("(more: --after {n})");
    }
}

pub async fn aliases(config: Config, cmd: AliasesCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    // Parse first: bad input changes nothing.
    let (alias, key) = match &cmd {
        AliasesCommand::Create { alias, key } | AliasesCommand::Update { alias, key } => {
            (Some(parse(AliasName::parse(alias), "alias")?), Some(parse(KeyRef::parse(key), "key")?))
        }
        AliasesCommand::Delete { alias } => (Some(parse(AliasName::parse(alias), "alias")?), None),
        AliasesCommand::List { key, .. } => {
            (None, key.as_deref().map(|k| parse(KeyRef::parse(k), "--key")).transpose()?)
        }
    };
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    let print_entry = |e: &AliasEntry| {
        if json_out {
            println!("{}", json!({"alias": e.alias, "key_id": e.key_id, "created_at": e.created_at.to_rfc3339()}));
        } else {
            println!("{} -> {}", e.alias, e.key_id);
        }
    };
    match (cmd, alias, key) {
        (AliasesCommand::Create { .. }, Some(a), Some(k)) => {
            print_entry(&d.create_alias(&caller, &a, &k).await.map_err(core_err)?)
        }
        (AliasesCommand::Update { .. }, Some(a), Some(k)) => {
            print_entry(&d.update_alias(&caller, &a, &k).await.map_err(core_err)?)
        }
        (AliasesCommand::Delete { .. }, Some(a), _) => {
            d.delete_alias(&caller, &a).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({"deleted": a}));
            } else {
                println!("deleted {a}");
            }
        }
        (AliasesCommand::List { limit, after, .. }, None, k) => {
            let page = d.list_aliases(&caller, k.as_ref(), &PageRequest { after, limit }).await.map_err(core_err)?;
            if json_out {
                let items: Vec<_> = page
                    .items
                    .iter()
                    .map(|e| json!({"alias": e.alias, "key_id": e.key_id, "created_at": e.created_at.to_rfc3339()}))
                    .collect();
                println!("{}", json!({"aliases": items, "next": page.next}));
            } else {
                for e in &page.items {
                    print_entry(e);
                }
                if let Some(n) = page.next {
                    println!("(more: --after {n})");
                }
            }
        }
        _ => anyhow::bail!("internal: command and arguments do not match"),
    }
    Ok(ExitCode::SUCCESS)
}
