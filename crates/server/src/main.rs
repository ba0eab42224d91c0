//! `kmsgate`: the gateway server (`kmsgate serve`) and its admin CLI.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kmsgate::{alibaba_cli, cli, config, hsm_cli, serve, store_cli, xks_cli};

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
    /// Manage the Alibaba KMS instance API (ClientKeys).
    #[command(subcommand)]
    Alibaba(alibaba_cli::AlibabaCommand),
    /// Inspect the PKCS#11 HSM fleet.
    #[command(subcommand)]
    Hsm(hsm_cli::HsmCommand),
    /// Move an installation between stores.
    #[command(subcommand)]
    Store(store_cli::StoreCommand),
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
    match args.command {
        Command::Serve(serve_args) => serve::run(config, source, serve_args).await.map(|()| ExitCode::SUCCESS),
        Command::Keys(cmd) => cli::keys(config, cmd, args.json).await,
        Command::Aliases(cmd) => cli::aliases(config, cmd, args.json).await,
        Command::Xks(cmd) => xks_cli::run(config, cmd, args.json).await,
        Command::Alibaba(cmd) => alibaba_cli::run(config, cmd, args.json).await,
        Command::Hsm(cmd) => hsm_cli::run(config, cmd, args.json).await,
        Command::Store(cmd) => store_cli::run(config, cmd, args.json).await,
    }
}
