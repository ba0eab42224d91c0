//! `kmsgate hsm status` and `kmsgate keys import-hsm`: the PKCS#11 fleet from the command line.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kmsgate_core::{AliasName, CreateKeyRequest, HealthStatus, KeyBackend as _, KeyId, KeySpec, KeyUsageSet};
use kmsgate_hsm::{AdoptBy, Pkcs11Backend, Pkcs11Status};
use serde_json::json;

use crate::app::{App, core_err};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Show every PKCS#11 member: module, slots and tokens, session pool and health (a real probe). Exits with
    /// status 1 when a member is not ACTIVE.
    Status,
}

#[derive(Debug, Args)]
pub struct ImportHsmArgs {
    /// The PKCS#11 backend (fleet member, `[[backend.pkcs11]]` name) whose token holds the key.
    #[arg(long)]
    backend: String,
    /// Find the key by its CKA_LABEL.
    #[arg(long, conflicts_with = "id", required_unless_present = "id")]
    label: Option<String>,
    /// Find the key by its CKA_ID, in hex.
    #[arg(long)]
    id: Option<String>,
    /// The spec the key must have (checked against the HSM object); default: whatever the object is.
    #[arg(long)]
    spec: Option<String>,
    /// Comma-separated usages or `none`; default: what the HSM object permits, within the spec's usual set.
    #[arg(long)]
    usage: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// An alias for the key (repeatable), e.g. alias/payments.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// A tag key=value (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The kmsgate key id (default: a generated UUID).
    #[arg(long = "key-id")]
    key_id: Option<String>,
}

pub async fn run(config: Config, cmd: HsmCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        HsmCommand::Status => status(config, json_out).await,
    }
}

fn parse_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s = s.trim().trim_start_matches("0x");
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("--id must be an even number of hex digits");
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(Into::into)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the members on their own (no store, no root key): status must work when everything else is broken.
async fn status(config: Config, json_out: bool) -> anyhow::Result<ExitCode> {
    if config.backend.pkcs11.is_empty() {
        if json_out {
            println!("{}", json!({ "members": [] }));
        } else {
            println!("no PKCS#11 backends are configured (add [[backend.pkcs11]] entries; see docs/hsm.md)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut all_active = true;
    let mut reports = Vec::new();
    for member in &config.backend.pkcs11 {
        match Pkcs11Backend::start(member.clone()).await {
            Ok(backend) => {
                let s = backend.status().await;
                all_active &= s.health.status == HealthStatus::Active;
                reports.push(Ok(s));
            }
            Err(e) => {
                all_active = false;
                reports.push(Err((member.name.clone(), core_err(e).to_string())));
            }
        }
    }
    if json_out {
        let members: Vec<_> = reports
            .iter()
            .map(|r| match r {
                Ok(s) => serde_json::to_value(s).unwrap_or_else(|e| json!({ "error": e.to_string() })),
                Err((name, error)) => json!({ "name": name, "error": error }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({ "members": members }))?);
    } else {
        for r in &reports {
            match r {
                Ok(s) => print_status(s),
                Err((name, error)) => println!("{name}: cannot start: {error}"),
            }
        }
    }
    Ok(if all_active { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_status(s: &Pkcs11Status) {
    let status = match s.health.status {
        HealthStatus::Active => "ACTIVE",
        HealthStatus::Degraded => "DEGRADED",
        HealthStatus::Unavailable => "UNAVAILABLE",
    };
    println!("{}: {status}", s.name);
    if !s.health.detail.is_empty() {
        println!("  detail:   {}", s.health.detail);
    }
    match &s.library {
        Some(l) => println!(
            "  module:   {} ({} {}, {}, Cryptoki {})",
            s.module, l.description, l.library_version, l.manufacturer, l.cryptoki_version
        ),
        None => println!("  module:   {} (not initialised)", s.module),
    }
    match (&s.token, s.slot) {
        (Some(t), Some(slot)) => println!(
            "  token:    {:?} in slot {slot}: {} {} (firmware {}), serial {}",
            t.label, t.manufacturer, t.model, t.firmware, t.serial
        ),
        _ => println!("  token:    {:?} not found", s.token_label),
    }
    let p = &s.pool;
    println!(
        "  pool:     {} sessions: {} open, {} in use, {} waiting (queue {}), {} failing to open",
        p.size, p.open, p.in_use, p.waiting, p.queue_capacity, p.failing
    );
    println!(
        "  counters: {} sessions opened, {} evicted, {} recoveries, {} timeouts, {} refused (queue full)",
        p.sessions_opened, p.sessions_evicted, p.recoveries, p.timeouts, p.rejected_queue_full
    );
    for slot in &s.slots {
        let token = match (&slot.token_label, slot.token_present) {
            (Some(label), _) if label.is_empty() => "uninitialised token".to_owned(),
            (Some(label), _) if Some(slot.id) == s.slot => format!("token {label:?} (this member)"),
            (Some(label), _) => format!("token {label:?}"),
            (None, true) => "token present, unreadable".to_owned(),
            (None, false) => "no token".to_owned(),
        };
        println!("  slot {}: {token} ({})", slot.id, slot.description);
    }
}

/// Adopts an existing HSM key: inspected on the token, then recorded like any other key (origin Adopted).
pub async fn import_hsm(config: Config, args: ImportHsmArgs, json_out: bool) -> anyhow::Result<ExitCode> {
    // Everything the user typed is checked before anything is opened.
    let by = match (&args.label, &args.id) {
        (Some(label), None) if !label.is_empty() => AdoptBy::Label(label.clone()),
        (None, Some(id)) => AdoptBy::Id(parse_hex(id)?),
        _ => anyhow::bail!("give exactly one of --label and --id"),
    };
    let spec: Option<KeySpec> = args
        .spec
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: kmsgate_core::Error| anyhow::anyhow!("--spec: {}", e.message()))?;
    let usage = args
        .usage
        .as_deref()
        .map(KeyUsageSet::parse_list)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--usage: {}", e.message()))?;
    let aliases = args
        .aliases
        .iter()
        .map(|a| AliasName::parse(a).map_err(|e| anyhow::anyhow!("--alias: {}", e.message())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut tags = BTreeMap::new();
    for t in &args.tags {
        match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => tags.insert(k.to_owned(), v.to_owned()),
            _ => anyhow::bail!("--tag must be key=value with a non-empty key"),
        };
    }
    let key_id = args
        .key_id
        .as_deref()
        .map(KeyId::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--key-id: {}", e.message()))?;

    let (app, _) = App::open(config).await?;
    let Some(backend) = app.pkcs11.iter().find(|b| b.name() == args.backend) else {
        let names: Vec<_> = app.pkcs11.iter().map(|b| b.name().to_owned()).collect();
        anyhow::bail!("no PKCS#11 backend is named {:?} (configured: {})", args.backend, names.join(", "));
    };
    let adopted = backend.adopt(by).await.map_err(core_err)?;
    if let Some(expected) = spec
        && expected != adopted.spec
    {
        anyhow::bail!("the HSM key is {}, not {expected}", adopted.spec);
    }
    let usage = match usage {
        Some(u) => {
            if !u.is_subset_of(adopted.spec.allowed_usages()) {
                anyhow::bail!("--usage: a {} key cannot have that usage", adopted.spec);
            }
            if !u.is_subset_of(adopted.permitted) {
                anyhow::bail!(
                    "--usage: the HSM key's attributes do not permit all of it (permitted: {})",
                    usage_text(adopted.permitted)
                );
            }
            u
        }
        None => {
            let usual = KeyUsageSet::of(
                &adopted.permitted.iter().filter(|u| adopted.spec.default_usages().contains(*u)).collect::<Vec<_>>(),
            );
            if usual.is_empty() { adopted.permitted } else { usual }
        }
    };
    if adopted.extractable || !adopted.sensitive {
        eprintln!("warning: the HSM key is extractable or not sensitive: its material can leave the HSM");
    }
    let mut req = CreateKeyRequest::new(adopted.spec);
    req.usage = Some(usage);
    req.description = args.description;
    req.aliases = aliases;
    req.tags = tags;
    req.id = key_id;
    req.backend = Some(args.backend.clone());
    let caller = app.admin();
    let key = app.dispatcher.adopt_key(&caller, req, &args.backend, adopted.handle.clone()).await.map_err(core_err)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "id": key.id,
                "spec": key.spec,
                "usage": key.usage,
                "state": key.state,
                "origin": key.origin,
                "backend": args.backend,
                "primary_version": key.primary_version,
                "hsm": { "label": adopted.label, "id": hex(&adopted.id) },
            }))?
        );
    } else {
        println!("adopted HSM key {:?} (CKA_ID {}) as {}", adopted.label, hex(&adopted.id), key.id);
        println!("spec:        {}", key.spec);
        println!("usage:       {}", usage_text(key.usage));
        println!("backend:     {}", args.backend);
        println!("version:     {}", key.primary_version);
    }
    Ok(ExitCode::SUCCESS)
}

fn usage_text(u: KeyUsageSet) -> String {
    if u.is_empty() { "none".to_owned() } else { u.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",") }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;
    use kmsgate_core::{EncryptRequest, KeyOrigin, KeyRef, KeySpec, PageRequest};
    use kmsgate_hsm::cryptoki::mechanism::Mechanism;
    use kmsgate_hsm::cryptoki::object::{Attribute, KeyType};
    use zeroize::Zeroizing;

    use super::*;
    use crate::cli::KeysCommand;

    #[test]
    fn hex_ids() {
        assert_eq!(parse_hex("0a0B").ok(), Some(vec![0x0a, 0x0b]));
        assert_eq!(parse_hex("0x01").ok(), Some(vec![1]));
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
        assert!(parse_hex("").is_err());
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        keys: KeysCommand,
    }

    fn keys_command(args: &[&str]) -> KeysCommand {
        Cli::try_parse_from(std::iter::once("keys").chain(args.iter().copied())).unwrap_or_else(|e| panic!("{e}")).keys
    }

    /// The throwaway SoftHSM token of `./scripts/test`; fails (never skips) without it.
    fn config(dir: &std::path::Path) -> Config {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let conf = var("SOFTHSM2_CONF").unwrap_or_else(|| panic!("SOFTHSM2_CONF is not set: run ./scripts/test"));
        let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("{conf}: {e}"));
        assert!(!text.contains("/var/lib/softhsm"), "refusing the system token directory");
        let mut member = kmsgate_hsm::Pkcs11Config::new(
            "hsm-cli",
            var("KMSGATE_TEST_P11_MODULE").unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".to_owned()),
            var("KMSGATE_TEST_P11_TOKEN").unwrap_or_else(|| "kmsgate-test".to_owned()),
        );
        member.pin_file = var("KMSGATE_TEST_P11_PIN_FILE").map(Into::into);
        member.sessions = 1;
        member.deadline_ms = 5_000;
        let mut c = Config { data_dir: dir.to_path_buf(), ..Config::default() };
        c.backend.deadline_ms = 10_000;
        c.backend.pkcs11 = vec![member];
        c
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn status_create_and_import_through_the_cli() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let c = config(dir.path());
        assert_eq!(status(c.clone(), true).await.ok(), Some(ExitCode::SUCCESS), "the member is active");

        // `keys create --backend <member>` puts the key in the HSM.
        let created =
            crate::cli::keys(c.clone(), keys_command(&["create", "--spec", "EC_P256", "--backend", "hsm-cli"]), true)
                .await;
        assert_eq!(created.ok(), Some(ExitCode::SUCCESS));

        // A key made with raw PKCS#11, adopted by label with an alias.
        let label = format!("cli-legacy-{}", uuid::Uuid::new_v4().simple());
        let (app, _) = App::open(c.clone()).await.unwrap_or_else(|e| panic!("{e:#}"));
        let l = label.clone();
        app.pkcs11[0]
            .with_session(Duration::from_secs(10), move |s| {
                s.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Label(l.into_bytes()),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                    ],
                )
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let keys =
            app.dispatcher.list_keys(&app.admin(), &PageRequest::first(10)).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.items.len(), 1);
        assert_eq!(keys.items[0].versions[0].handle.backend, "hsm-cli");
        assert_eq!(keys.items[0].versions[0].handle.handle[0], 0x50, "a PKCS#11 handle");
        drop(app);

        let wrong_spec = ["import-hsm", "--backend", "hsm-cli", "--label", &label, "--spec", "RSA_2048"];
        assert!(crate::cli::keys(c.clone(), keys_command(&wrong_spec), true).await.is_err());
        let wrong_backend = ["import-hsm", "--backend", "software", "--label", &label];
        assert!(crate::cli::keys(c.clone(), keys_command(&wrong_backend), true).await.is_err());
        assert!(Cli::try_parse_from(["keys", "import-hsm", "--backend", "hsm-cli"]).is_err(), "--label or --id");
        let import = [
            "import-hsm",
            "--backend",
            "hsm-cli",
            "--label",
            &label,
            "--alias",
            "alias/legacy",
            "--key-id",
            "legacy-1",
        ];
        assert_eq!(crate::cli::keys(c.clone(), keys_command(&import), true).await.ok(), Some(ExitCode::SUCCESS));

        let (app, _) = App::open(c).await.unwrap_or_else(|e| panic!("{e:#}"));
        let alias = KeyRef::parse("alias/legacy").unwrap_or_else(|e| panic!("{e}"));
        let key = app.dispatcher.describe_key(&app.admin(), &alias).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((key.id.as_str(), key.spec, key.origin), ("legacy-1", KeySpec::Aes256, KeyOrigin::Adopted));
        let request = EncryptRequest {
            key: alias,
            algorithm: None,
            plaintext: Zeroizing::new(b"x".to_vec()),
            aad: Vec::new(),
            iv: None,
        };
        app.dispatcher.encrypt(&app.admin(), request).await.unwrap_or_else(|e| panic!("{e}"));
    }
}
