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
        file: Option<PathBuf>,
        /// Accept lines that are not audit records (a captured stdout with logs in between).
        #[arg(long)]
        mixed: bool,
    },
}

pub fn run(config: &Config, cmd: AuditCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { file, mixed } = cmd;
    let path = match file {
        Some(p) => p,
        None if config.audit.destination == AuditDestination::File => config.audit_file(),
        None => anyhow::bail!("audit.destination is not `file`: name the log to verify"),
    };
    let v = crate::audit_log::verify_file(&path, mixed)?;
    let (seq, hash) = v.head.clone().unwrap_or((0, crate::audit_log::GENESIS.to_owned()));
    if json_out {
        let out = json!({"records": v.records, "chains": v.chains, "other_lines": v.other_lines,
            "head": {"seq": seq, "hash": hash}});
        println!("{out}");
    } else {
        println!("{}: {} records in {} chain(s), intact", path.display(), v.records, v.chains);
        println!("  head: record {seq}, hash {hash}");
        println!("  (keep the head elsewhere: removing records from the end is only visible against it)");
    }
    Ok(ExitCode::SUCCESS)
}
