//! `kmsgate-bench`: load generator and baselines for kmsgate and any XKS proxy.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kmsgate_bench::client::{Endpoint, HttpConnector, TlsOptions};
use kmsgate_bench::load::{self, LoadSpec, Verify};
use kmsgate_bench::report::{Machine, Report, Scenario};
use kmsgate_bench::standard::{self, Set, SoftHsmMode, StandardOptions};
use kmsgate_bench::xks::{self, Op, XksOptions, XksTarget, XksWorkload};
use kmsgate_bench::{baseline, seed};

#[derive(Debug, Parser)]
#[command(name = "kmsgate-bench", version, about = "Load generator and baselines for kmsgate and any AWS XKS proxy")]
struct Cli {
    /// Worker threads of the load generator (default: all cores, shared with the server under test).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Load one XKS endpoint (any XKS proxy) with one operation.
    Xks(Box<XksArgs>),
    /// Run a scenario set against a kmsgate this command starts, with baselines, and write the report.
    Run(RunArgs),
    /// Raw backend throughput: AES-256-GCM encrypt + decrypt through a kmsgate-hsm backend, no HTTP.
    Backend(BackendArgs),
    /// The bare hyper baseline server: answers every request with a fixed JSON body.
    BaselineServer(BaselineArgs),
    /// Create many AES keys in a kmsgate store through the kmsgate library (for the memory scenario).
    SeedKeys(SeedArgs),
    /// Work per request: `perf stat` instructions and CPU time of kmsgate, the bare hyper baseline and the
    /// generator over a fixed number of requests (comparable on a busy machine, unlike throughput).
    Instructions(InstrArgs),
}

#[derive(Debug, Args)]
struct InstrArgs {
    /// Counted requests per scenario.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Uncounted requests first (caches, connections, allocator warm).
    #[arg(long, default_value_t = 2_000)]
    warmup_requests: u64,
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// The kmsgate binary (default: next to this one).
    #[arg(long)]
    kmsgate: Option<PathBuf>,
    #[arg(long)]
    plain: bool,
    #[arg(long)]
    http2: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("not a number of seconds: {s}"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err("seconds must be 0 to 86400".to_owned());
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Connections (closed loop: each has one request in flight).
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Open loop at this many requests per second (latency from the intended send time). Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time, in seconds.
    #[arg(long, short = 'd', default_value = "10", value_parser = secs)]
    duration: Duration,
    /// Warm-up before measuring, in seconds.
    #[arg(long, default_value = "2", value_parser = secs)]
    warmup: Duration,
    /// Which answers are checked in depth (sizes, integrity value); the others by status only.
    #[arg(long, value_enum, default_value_t = Verify::Warmup)]
    verify: Verify,
    /// Closed loop: send exactly this many requests (warm-up included) instead of running for --duration; a
    /// fixed amount of work for `perf stat -p SERVER_PID` (instructions per request).
    #[arg(long)]
    requests: Option<u64>,
}

#[derive(Debug, Args)]
struct XksArgs {
    /// Base URL of the proxy: https://host[:port].
    #[arg(long)]
    url: String,
    /// XksProxyUriPath, e.g. /example/kms/xks/v1 (or from --credential-file).
    #[arg(long)]
    uri_path: Option<String>,
    /// The KMS console import file `{"XksProxyUriPath", "XksProxyAuthenticationCredential": {...}}`.
    #[arg(long)]
    credential_file: Option<PathBuf>,
    #[arg(long)]
    access_key_id: Option<String>,
    /// The SigV4 secret (prefer the environment variable).
    #[arg(long, env = "KMSBENCH_XKS_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// External key id (repeatable: requests rotate over them).
    #[arg(long = "key-id")]
    key_ids: Vec<String>,
    /// File with one external key id per line.
    #[arg(long)]
    key_ids_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Op::Encrypt)]
    op: Op,
    #[arg(long, default_value_t = 32)]
    plaintext_size: usize,
    /// Bytes of additionalAuthenticatedData (0: none).
    #[arg(long, default_value_t = 16)]
    aad_size: usize,
    /// Ask for a ciphertextDataIntegrityValue.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cdiv: bool,
    /// PEM CA bundle for the server certificate (default: the system's).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(long)]
    client_cert: Option<PathBuf>,
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// Use h2 (ALPN) instead of HTTP/1.1 keep-alive.
    #[arg(long)]
    http2: bool,
    #[command(flatten)]
    load: LoadArgs,
    /// Also write the report as JSON to this file (`-`: standard output, no table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = Set::Standard)]
    scenarios: Set,
    #[arg(long, default_value = "10", value_parser = secs)]
    duration: Duration,
    #[arg(long, default_value = "2", value_parser = secs)]
    warmup: Duration,
    #[arg(long, default_value = "target/bench/report.json")]
    out: PathBuf,
    /// The kmsgate binary (default: next to this one, i.e. the same target directory and profile).
    #[arg(long)]
    kmsgate: Option<PathBuf>,
    /// Plain HTTP instead of TLS (XKS is always TLS in production).
    #[arg(long)]
    plain: bool,
    #[arg(long)]
    http2: bool,
    #[arg(long, value_enum, default_value_t = SoftHsmMode::Auto)]
    softhsm: SoftHsmMode,
    /// Keys for the memory scenario (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// PKCS#11 sessions, in kmsgate and in the raw SoftHSM baseline alike.
    #[arg(long, default_value_t = 4)]
    hsm_sessions: usize,
    /// Connection counts of the closed-loop Encrypt scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    connections: Vec<usize>,
    /// Concurrent tasks of the many-task raw backend runs.
    #[arg(long, default_value_t = 64)]
    backend_tasks: usize,
    /// Rate of the open-loop scenario (AWS KMS's default per-key-store limit).
    #[arg(long, default_value_t = 1800.0)]
    open_rate: f64,
    #[arg(long, value_enum, default_value_t = Verify::Warmup)]
    verify: Verify,
    /// Before each scenario, wait up to this many seconds for other processes to leave the CPU (0: don't).
    #[arg(long, default_value = "60", value_parser = secs)]
    quiet_wait: Duration,
}

#[derive(Debug, Args)]
struct BackendArgs {
    /// `software`, or `softhsm` (kmsgate-hsm's PKCS#11 backend on the token below).
    #[arg(long, default_value = "software")]
    backend: String,
    #[arg(long, default_value_t = 1)]
    tasks: usize,
    #[arg(long, default_value = "5", value_parser = secs)]
    duration: Duration,
    #[arg(long, default_value = "1", value_parser = secs)]
    warmup: Duration,
    #[arg(long, default_value_t = 32)]
    plaintext_size: usize,
    #[arg(long, default_value_t = 16)]
    aad_size: usize,
    /// PKCS#11 module (softhsm).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    module: PathBuf,
    #[arg(long, default_value = "kmsgate-bench")]
    token_label: String,
    /// Environment variable holding the token PIN.
    #[arg(long, default_value = kmsgate_bench::gateway::PIN_ENV)]
    pin_env: String,
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Size of the JSON answer.
    #[arg(long, default_value_t = 220)]
    body_bytes: usize,
    /// Serve TLS with this PEM certificate chain (and --tls-key), using kmsgate's own TLS setup.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SeedArgs {
    /// The kmsgate configuration file whose store receives the keys (stop the server first).
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    #[arg(long, default_value = "bench-k")]
    id_prefix: String,
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let runtime = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Xks(a) => xks_cmd(*a).await,
        Cmd::Run(a) => run_cmd(a).await,
        Cmd::Backend(a) => backend_cmd(a).await,
        Cmd::BaselineServer(a) => {
            baseline::baseline_server(a.bind, a.body_bytes, a.tls_cert, a.tls_key).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Instructions(a) => {
            let opts = kmsgate_bench::instr::InstrOptions {
                requests: a.requests,
                warmup_requests: a.warmup_requests,
                connections: a.connections,
                kmsgate: a.kmsgate,
                tls: !a.plain,
                http2: a.http2,
            };
            let rows = kmsgate_bench::instr::run(&opts).await?;
            print!("{}", kmsgate_bench::instr::table(&rows));
            if let Some(p) = a.json {
                std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SeedKeys(a) => {
            let n = seed::seed_keys(&a.config, a.count, &a.id_prefix, a.parallel).await?;
            eprintln!("created {n} keys");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit status of a report: failure when a scenario had no successful request at all.
fn verdict(report: &Report) -> ExitCode {
    let failed = report.all_failed();
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    for s in failed {
        eprintln!("error: every request of {} failed: {:?} (warm-up: {:?})", s.name, s.errors, s.warmup_errors);
    }
    ExitCode::FAILURE
}

async fn xks_cmd(a: XksArgs) -> anyhow::Result<ExitCode> {
    let mut uri_path = a.uri_path.clone();
    let mut akid = a.access_key_id.clone();
    let mut secret = a.secret.clone();
    if let Some(f) = &a.credential_file {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f)?).context("credential file")?;
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
        uri_path = uri_path.or(s("/XksProxyUriPath"));
        akid = akid.or(s("/XksProxyAuthenticationCredential/AccessKeyId"));
        secret = secret.or(s("/XksProxyAuthenticationCredential/RawSecretAccessKey"));
    }
    let (Some(uri_path), Some(akid), Some(secret)) = (uri_path, akid, secret) else {
        bail!("give --uri-path, --access-key-id and --secret (or --credential-file)");
    };
    let mut key_ids = a.key_ids.clone();
    if let Some(f) = &a.key_ids_file {
        key_ids.extend(std::fs::read_to_string(f)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned));
    }
    let tls =
        TlsOptions { ca_file: a.ca_file.clone(), client_cert: a.client_cert.clone(), client_key: a.client_key.clone() };
    let endpoint = Arc::new(Endpoint::new(&a.url, &tls, a.http2).await?);
    let transport = format!("{}/{}", if endpoint.https { "tls" } else { "plain" }, if a.http2 { "h2" } else { "h1" });
    let target =
        XksTarget { endpoint: endpoint.clone(), uri_path, access_key_id: akid, secret, region: a.region.clone() };
    let opts = XksOptions { op: a.op, key_ids, plaintext_size: a.plaintext_size, aad_size: a.aad_size, cdiv: a.cdiv };
    let samples = if a.op == Op::Decrypt { xks::make_samples(&target, &opts, 256).await? } else { Vec::new() };
    let workload = Arc::new(XksWorkload::new(target, opts, samples)?);
    let spec = LoadSpec {
        connections: a.load.connections,
        rate: a.load.rate,
        warmup: a.load.warmup,
        duration: a.load.duration,
        verify: a.load.verify,
        requests: a.load.requests,
    };
    let mut report = Report::new(Machine::now());
    let r = load::run(Arc::new(HttpConnector(endpoint)), workload, &spec).await?;
    let name = format!("xks-{:?}-{}c", a.op, a.load.connections).to_lowercase();
    let description = format!(
        "XKS {} against {}, plaintext {} B, AAD {} B, CDIV {}",
        a.op.name(),
        a.url,
        a.plaintext_size,
        a.aad_size,
        if a.cdiv { "on" } else { "off" }
    );
    report.scenarios.push(Scenario::from_load(&name, &description, "xks", &transport, &r, &spec));
    report.machine.finish();
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(p) => {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(verdict(&report))
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<ExitCode> {
    let opts = StandardOptions {
        set: a.scenarios,
        duration: a.duration,
        warmup: a.warmup,
        out: a.out,
        kmsgate: a.kmsgate,
        tls: !a.plain,
        http2: a.http2,
        softhsm: a.softhsm,
        keys: a.keys,
        hsm_sessions: a.hsm_sessions,
        connections: a.connections,
        backend_tasks: a.backend_tasks,
        open_rate: a.open_rate,
        verify: a.verify,
        quiet_wait: a.quiet_wait,
    };
    let report = standard::run(&opts).await?;
    print!("{}", report.table());
    println!("\nreport: {}", opts.out.display());
    Ok(verdict(&report))
}

async fn backend_cmd(a: BackendArgs) -> anyhow::Result<ExitCode> {
    let backend = match a.backend.as_str() {
        "software" => baseline::software_backend()?,
        "softhsm" | "pkcs11" => baseline::pkcs11_backend(&a.module, &a.token_label, &a.pin_env, a.sessions).await?,
        other => bail!("unknown backend {other}: software or softhsm"),
    };
    let r = baseline::backend_throughput(backend, a.tasks, a.warmup, a.duration, a.plaintext_size, a.aad_size).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} backend, {} task(s): {:.0} HSM ops/s ({:.0} encrypt+decrypt pairs/s), {} errors",
            r.backend,
            r.tasks,
            r.ops_per_sec,
            r.iterations as f64 / r.seconds,
            r.errors
        );
    }
    Ok(if r.hsm_ops == 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
