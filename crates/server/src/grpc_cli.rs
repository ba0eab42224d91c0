//! `kmsgate grpc clients ...`: which client certificate subjects may call the gRPC API, and as whom. The CLI
//! writes the store through the dispatcher; running servers see each change through the change feed.

use std::process::ExitCode;

use clap::Subcommand;
use kmsgate_grpc::auth;
use serde_json::json;

use crate::app::{App, core_err};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum GrpcCommand {
    /// Client certificates mapped to identities of a tenant (--tenant).
    #[command(subcommand)]
    Clients(ClientsCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Map a certificate subject (a SAN DNS name or the subject CN, case-insensitive) to an identity.
    Add {
        #[arg(long)]
        subject: String,
        /// The identity calls with that certificate act as (policies and audit name it).
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the tenant's mappings.
    List,
    /// Remove a mapping: servers refuse the certificate within their change-poll interval.
    Remove { subject: String },
}

pub async fn run(config: Config, cmd: GrpcCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let GrpcCommand::Clients(cmd) = cmd;
    // Bad input changes nothing: check it before opening the store.
    match &cmd {
        ClientsCommand::Add { subject, .. } | ClientsCommand::Remove { subject } => {
            auth::subject_id(subject).map_err(|e| anyhow::anyhow!("subject: {}", e.message()))?;
        }
        ClientsCommand::List => {}
    }
    let (app, _) = App::open(config).await?;
    let caller = app.admin();
    let d = &app.dispatcher;
    match cmd {
        ClientsCommand::Add { subject, identity, description } => {
            let m = auth::add_client(d, &caller, &subject, &identity, &description).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "subject": m.subject, "identity": m.identity, "tenant": app.tenant }));
            } else {
                println!("gRPC client {} acts as {} in tenant {}", m.subject, m.identity, app.tenant);
            }
        }
        ClientsCommand::List => {
            let list = auth::list_clients(d, Some(&app.tenant)).await.map_err(core_err)?;
            if json_out {
                let items: Vec<_> = list
                    .iter()
                    .map(|(t, m)| json!({ "subject": m.subject, "identity": m.identity, "tenant": t, "description": m.description, "created_at": m.created_at }))
                    .collect();
                println!("{}", json!({ "clients": items }));
            } else {
                println!("{:<40}  {:<24}  CREATED", "SUBJECT", "IDENTITY");
                for (_, m) in &list {
                    println!("{:<40}  {:<24}  {}", m.subject, m.identity, m.created_at);
                }
            }
        }
        ClientsCommand::Remove { subject } => {
            auth::remove_client(d, &caller, &subject).await.map_err(core_err)?;
            if json_out {
                println!("{}", json!({ "removed": subject.to_ascii_lowercase() }));
            } else {
                println!("removed gRPC client {}", subject.to_ascii_lowercase());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
