//! `kmsgate audit`: checks the hash chain of an audit log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::config::{AuditDestination, Config};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check that no record of an audit log was altered, removed, reordered or inserted.
    Verify {
        /// The log to check (default: the configured audit.path).
        #[arg(conflicts_with = "store")]
        file: Option<PathBuf>,
        /// Accept lines that are not audit records (a captured stdout with logs in between).
        #[arg(long, conflicts_with = "store")]
        mixed: bool,
        /// Check the `audit_log` table of the configured store (`audit.destination = "store"`).
        #[arg(long)]
        store: bool,
    },
}

pub fn run(config: &Config, cmd: AuditCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { file, mixed, store } = cmd;
    let (v, name) = if store || (file.is_none() && config.audit.destination == AuditDestination::Store) {
        (verify_store(config)?, "the store's audit_log table".to_owned())
    } else {
        let path = match file {
            Some(p) => p,
            None if config.audit.destination == AuditDestination::File => config.audit_file(),
            None => anyhow::bail!("audit.destination is neither `file` nor `store`: name the log to verify"),
        };
        (crate::audit_log::verify_file(&path, mixed)?, path.display().to_string())
    };
    let (seq, hash) = v.head.clone().unwrap_or((0, crate::audit_log::GENESIS.to_owned()));
    if json_out {
        let out = json!({"records": v.records, "chains": v.chains, "other_lines": v.other_lines,
            "head": {"seq": seq, "hash": hash}});
        println!("{out}");
    } else {
        println!("{name}: {} records in {} chain(s), intact", v.records, v.chains);
        println!("  head: record {seq}, hash {hash}");
        println!("  (keep the head elsewhere: removing records from the end is only visible against it)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the configured store's chain. `run` is called from within the CLI's runtime, which cannot be blocked
/// on: the check runs on a thread with a runtime of its own.
fn verify_store(config: &Config) -> anyhow::Result<crate::audit_log::Verified> {
    let url = config.store_connect_url()?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let store = kmsgate_store::SqlStore::open_with(
                        &url,
                        kmsgate_store::StoreOptions::default().max_connections(1),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot open the store: {}", e.message()))?;
                    let verified = crate::audit_log::verify_store(&store).await;
                    store.close().await;
                    verified
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the audit check failed unexpectedly"))?
    })
}
