//! `kmsgate secrets bootstrap`: the first tenant of the secrets REST API and its admin token, printed once.
//! The embedded default does the same on its first start (to stderr, never logged).

use std::process::ExitCode;

use clap::Subcommand;
use kmsgate_secrets::SecretsState;
use serde_json::json;

use crate::app::App;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Create the tenant's (--tenant) secrets settings, a `service_account/admin` identity with the admin and
    /// partner_admin roles, and an admin token, which is printed once and never again.
    Bootstrap,
    /// Switch maintenance mode on or off at run time: every `/v1` route answers 503 `maintenance_mode` (health
    /// reports it, so balancers drain); running servers follow within `server.change_poll_ms`.
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

fn state(app: &App) -> SecretsState {
    SecretsState::new(app.dispatcher.clone(), app.config.secrets.clone(), app.tenant.clone())
}

fn ttl(app: &App) -> i64 {
    kmsgate_secrets::values::parse_duration("default_token_ttl", &app.config.secrets.default_token_ttl)
        .map_or(90 * 86_400, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub async fn run(config: Config, cmd: SecretsCommand, json_out: bool) -> anyhow::Result<ExitCode> {
    let (app, _) = App::open(config).await?;
    let st = state(&app);
    if let SecretsCommand::Maintenance { state: on } = &cmd {
        let on = on == "on";
        kmsgate_secrets::set_maintenance(&st, on)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.code.as_str(), e.message))?;
        if json_out {
            println!("{}", json!({"maintenance": on}));
        } else {
            println!("secrets API maintenance mode: {}", if on { "on" } else { "off" });
        }
        return Ok(ExitCode::SUCCESS);
    }
    let minted = kmsgate_secrets::bootstrap(&st, &app.tenant, ttl(&app))
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code.as_str(), e.message))?;
    let Some((token, record)) = minted else {
        anyhow::bail!("the tenant {} is already bootstrapped; mint more tokens with POST /v1/auth/tokens", app.tenant);
    };
    if json_out {
        println!(
            "{}",
            json!({"tenant_id": app.tenant.as_str(), "token_id": record.token_id, "token": token,
                   "expires_at": record.expires_at})
        );
    } else {
        println!("tenant:     {}", app.tenant);
        println!("identity:   service_account/admin (roles admin, partner_admin)");
        println!("token id:   {}", record.token_id);
        println!("expires at: {}", record.expires_at);
        println!("token (shown once, store it now):");
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The embedded default's first start: bootstrap the default tenant if nobody has, and show the token once on
/// stderr (not through the logger, so it never reaches log files).
pub async fn first_start(app: &App) -> anyhow::Result<()> {
    let st = state(app);
    match kmsgate_secrets::bootstrap(&st, &app.tenant, ttl(app)).await {
        Ok(Some((token, record))) => {
            eprintln!(
                "secrets API: bootstrapped tenant {} with an admin token (shown once, store it now):",
                app.tenant
            );
            eprintln!("  {token}");
            eprintln!(
                "  token id {}, expires {}; more tokens: POST /v1/auth/tokens",
                record.token_id, record.expires_at
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => anyhow::bail!("cannot bootstrap the secrets API: {}: {}", e.code.as_str(), e.message),
    }
}
