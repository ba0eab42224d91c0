//! `kmsgate`: the gateway server (`kmsgate serve`) and its admin CLI.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kmsgate::{
    admin_client, alibaba_cli, audit_cli, audit_log, cli, config, grpc_cli, hsm_cli, secrets_cli, serve, store_cli,
    xks_cli,
};

/// mimalloc instead of glibc malloc: per XKS Encrypt the server does ~165k instructions with glibc and ~131k with
/// mimalloc (`kmsgate-bench instructions`, docs/benchmarks.md); jemalloc measured ~140k.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "kmsgate", version, about = "Multi-vendor KMS gateway: AWS XKS, Alibaba KMS, secrets REST, gRPC")]
struct Args {
    /// Configuration file (TOML). Without one, kmsgate runs on its embedded default in ./kmsgate-data.
    #[arg(long, short = 'c', global = true, env = "KMSGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory of the embedded default (SQLite file, root key).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Tenant the command acts on (default: the configured default tenant).
    #[arg(long, global = true)]
    tenant: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Send keys, aliases, xks, alibaba and hsm commands to a running server's admin API (its admin listener,
    /// e.g. http://127.0.0.1:8081) instead of opening the store; see docs/admin-api.md.
    #[arg(long, global = true, env = "KMSGATE_SERVER")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Manage keys.
    #[command(subcommand)]
    Keys(cli::KeysCommand),
    /// Manage key aliases.
    #[command(subcommand)]
    Aliases(cli::AliasesCommand),
    /// Manage AWS KMS external key stores (XKS) and their SigV4 credentials.
    #[command(subcommand)]
    Xks(xks_cli::XksCommand),
    /// Manage the Alibaba KMS instance API (ClientKeys) and OpenAPI (AccessKeys).
    #[command(subcommand)]
    Alibaba(alibaba_cli::AlibabaCommand),
    /// Manage the gRPC API (client certificates).
    #[command(subcommand)]
    Grpc(grpc_cli::GrpcCommand),
    /// The secrets REST API: bootstrap the first tenant and admin token.
    #[command(subcommand)]
    Secrets(secrets_cli::SecretsCommand),
    /// Inspect the PKCS#11 HSM fleet.
    #[command(subcommand)]
    Hsm(hsm_cli::HsmCommand),
    /// Move an installation between stores.
    #[command(subcommand)]
    Store(store_cli::StoreCommand),
    /// Check the audit log.
    #[command(subcommand)]
    Audit(audit_cli::AuditCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // Audit records are written by a thread of their own: wait for the last ones before exiting.
    audit_log::flush_all(std::time::Duration::from_secs(10));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (mut config, source) = config::Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(t) = args.tenant {
        config.default_tenant = t;
    }
    let command = match (args.server.as_deref(), args.command) {
        (None, c) | (Some(_), c @ (Command::Serve(_) | Command::Store(_) | Command::Audit(_))) => c,
        (Some(url), c) => {
            let remote = admin_client::Remote::new(url, &config)?;
            return match c {
                Command::Keys(cmd) => admin_client::keys(&remote, cmd, args.json).await,
                Command::Aliases(cmd) => admin_client::aliases(&remote, cmd, args.json).await,
                Command::Xks(cmd) => admin_client::xks(&remote, cmd, args.json).await,
                Command::Alibaba(cmd) => admin_client::alibaba(&remote, cmd, args.json).await,
                Command::Hsm(cmd) => admin_client::hsm(&remote, cmd, args.json).await,
                _ => anyhow::bail!("this command does not work through --server"),
            };
        }
    };
    match command {
        Command::Serve(serve_args) => serve::run(config, source, serve_args).await.map(|()| ExitCode::SUCCESS),
        Command::Keys(cmd) => cli::keys(config, cmd, args.json).await,
        Command::Aliases(cmd) => cli::aliases(config, cmd, args.json).await,
        Command::Xks(cmd) => xks_cli::run(config, cmd, args.json).await,
        Command::Alibaba(cmd) => alibaba_cli::run(config, cmd, args.json).await,
        Command::Grpc(cmd) => grpc_cli::run(config, cmd, args.json).await,
        Command::Secrets(cmd) => secrets_cli::run(config, cmd, args.json).await,
        Command::Hsm(cmd) => hsm_cli::run(config, cmd, args.json).await,
        Command::Store(cmd) => store_cli::run(config, cmd, args.json).await,
        Command::Audit(cmd) => audit_cli::run(&config, cmd, args.json),
    }
}
