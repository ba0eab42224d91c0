//! `kmsgate store …`: moving an installation between stores.

use std::process::ExitCode;

use clap::Subcommand;
use kmsgate_store::SqlStore;

use crate::app::{core_err, redact_url};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy an installation (tenants, keys, aliases, credentials, secrets) into another, empty store, e.g.
    /// the embedded SQLite file into PostgreSQL. Copy the root key along: the keys stay wrapped under it.
    Migrate {
        /// The store to copy from, e.g. sqlite://./kmsgate-data/kmsgate.db.
        #[arg(long)]
        from: String,
        /// The empty store to copy into (default: the configured store.url, with its password settings).
        #[arg(long)]
        to: Option<String>,
    },
}

pub async fn run(config: Config, cmd: StoreCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Migrate { from, to } => {
            let to = match to {
                Some(url) => url,
                None => config.store_connect_url()?,
            };
            if from == to {
                anyhow::bail!("--from and --to name the same store");
            }
            let src = SqlStore::open(&from).await.map_err(core_err)?;
            let dst = SqlStore::open(&to).await.map_err(core_err)?;
            let report = src.copy_into(&dst).await.map_err(core_err)?;
            src.close().await;
            dst.close().await;
            if json_out {
                let tables: serde_json::Map<String, serde_json::Value> =
                    report.tables.iter().map(|(t, n)| ((*t).to_owned(), serde_json::json!(n))).collect();
                println!("{}", serde_json::json!({"from": redact_url(&from), "to": redact_url(&to), "copied": tables}));
            } else {
                println!("copied {} into {}:", redact_url(&from), redact_url(&to));
                for (t, n) in &report.tables {
                    println!("  {t:<16} {n}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
