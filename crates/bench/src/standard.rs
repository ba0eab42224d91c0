//! `kmsgate-bench run --scenarios standard`: starts a kmsgate and the baselines, runs the standard scenario
//! set, judges the targets and writes the report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::alibaba::AlibabaWorkload;
use crate::baseline::BackendResult;
use crate::client::{Endpoint, HttpConnector, TlsOptions};
use crate::gateway::{self, Gateway, GatewayOptions, PIN_ENV, Pki, Served, SoftHsm};
use crate::load::{self, LoadSpec, Verify, Workload};
use crate::report::{Machine, Report, Scenario, Target, Unavailable};
use crate::xks::{self, Op, XksOptions, XksTarget, XksWorkload};

/// Whether to include SoftHSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SoftHsmMode {
    /// When softhsm2 is installed and this build has the PKCS#11 backend.
    Auto,
    /// Fail if it cannot be used.
    On,
    Off,
}

/// Which set to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Set {
    /// Everything the issue asks for (about 5 minutes).
    Standard,
    /// A few seconds of each XKS operation at 2 connections, no baselines: proves the bench speaks the protocol.
    Smoke,
}

#[derive(Debug, Clone)]
pub struct StandardOptions {
    pub set: Set,
    pub duration: Duration,
    pub warmup: Duration,
    pub out: PathBuf,
    pub kmsgate: Option<PathBuf>,
    pub tls: bool,
    pub http2: bool,
    pub softhsm: SoftHsmMode,
    /// Keys in the store for the memory scenario (0 skips it).
    pub keys: usize,
    pub hsm_sessions: usize,
    pub connections: Vec<usize>,
    pub backend_tasks: usize,
    /// Rate of the open-loop scenario; AWS KMS's default per-key-store limit is 1800/s.
    pub open_rate: f64,
    pub verify: Verify,
    /// Before each scenario, wait up to this long for other processes to leave the CPU (zero: don't wait).
    pub quiet_wait: Duration,
}

/// Other processes may use this share of the machine before a scenario starts anyway.
const QUIET_SHARE: f64 = 0.10;

/// Waits until processes outside the benchmark used less than [`QUIET_SHARE`] of the machine over one second,
/// or `max` has passed; says so when it had to wait.
async fn wait_quiet(pids: &[u32], max: Duration) {
    if max.is_zero() {
        return;
    }
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        let a = gateway::CpuSnapshot::take(pids);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let share = a.foreign_share(&gateway::CpuSnapshot::take(pids)).unwrap_or(0.0);
        if share < QUIET_SHARE {
            return;
        }
        if started.elapsed() >= max {
            say(format!("  other work still uses {:.0} % of the CPU; going on anyway", share * 100.0));
            return;
        }
        if !told {
            say(format!("  waiting for other work to leave the CPU ({:.0} % busy)", share * 100.0));
            told = true;
        }
    }
}

/// Bytes and AAD of the standard Encrypt.
pub const PLAINTEXT: usize = 32;
pub const AAD: usize = 16;
/// Each XKS Encrypt with an integrity value costs the HSM an encrypt and a trial decrypt.
const HSM_OPS_PER_ENCRYPT: f64 = 2.0;
const KEY_SOFTWARE: &str = "bench-software";
const KEY_SOFTHSM: &str = "bench-softhsm";
const SEED_PREFIX: &str = "bench-k";

fn say(msg: impl AsRef<str>) {
    eprintln!("[kmsgate-bench] {}", msg.as_ref());
}

struct Ctx<'a> {
    opts: &'a StandardOptions,
    report: Report,
    transport: String,
    /// The servers under test, whose CPU time is ours (not "other work") in the contention figure.
    pids: Vec<u32>,
}

impl Ctx<'_> {
    fn spec(&self, connections: usize, rate: Option<f64>) -> LoadSpec {
        LoadSpec {
            connections,
            rate,
            warmup: self.opts.warmup,
            duration: self.opts.duration,
            verify: self.opts.verify,
            requests: None,
        }
    }

    /// The bare hyper baseline answers a fixed body: only its status means anything.
    fn status_only(&self, connections: usize) -> LoadSpec {
        LoadSpec { verify: Verify::Never, ..self.spec(connections, None) }
    }

    async fn xks(
        &mut self,
        name: &str,
        description: &str,
        kind: &str,
        target: &XksTarget,
        opts: XksOptions,
        spec: LoadSpec,
    ) -> anyhow::Result<usize> {
        let samples = if opts.op == Op::Decrypt { xks::make_samples(target, &opts, 256).await? } else { Vec::new() };
        let w = Arc::new(XksWorkload::new(target.clone(), opts, samples)?);
        self.load(name, description, kind, &target.endpoint, w, spec).await
    }

    /// Runs any workload (XKS, Alibaba, ...) as one scenario of the report; returns its index.
    async fn load<W: Workload>(
        &mut self,
        name: &str,
        description: &str,
        kind: &str,
        endpoint: &Arc<Endpoint>,
        workload: Arc<W>,
        spec: LoadSpec,
    ) -> anyhow::Result<usize> {
        wait_quiet(&self.pids, self.opts.quiet_wait).await;
        say(format!("{name}: {description}"));
        let c = Arc::new(HttpConnector(endpoint.clone()));
        let before = gateway::CpuSnapshot::take(&self.pids);
        let r = load::run(c, workload, &spec).await?;
        let mut s = Scenario::from_load(name, description, kind, &self.transport, &r, &spec);
        s.foreign_cpu = before.foreign_share(&gateway::CpuSnapshot::take(&self.pids));
        say(format!(
            "  {:.0} ok/s, p99 {}, {} errors",
            s.per_sec,
            s.latency.map_or("-".to_owned(), |l| crate::hist::fmt_us(l.p99_us)),
            s.error_count()
        ));
        self.report.scenarios.push(s);
        Ok(self.report.scenarios.len() - 1)
    }
}

fn run_backend_child(exe: &Path, args: &[String], hsm: Option<&SoftHsm>) -> anyhow::Result<BackendResult> {
    let mut cmd = Command::new(exe);
    cmd.arg("backend").args(args).arg("--json");
    if let Some(h) = hsm {
        cmd.env("SOFTHSM2_CONF", &h.conf).env(PIN_ENV, &h.pin);
    }
    let out = cmd.output().context("cannot run the backend measurement")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn backend_scenario(name: &str, description: &str, r: &BackendResult, warmup: f64) -> Scenario {
    Scenario {
        name: name.to_owned(),
        description: description.to_owned(),
        kind: "backend".to_owned(),
        connections: r.tasks,
        transport: "in-process".to_owned(),
        duration_s: r.seconds,
        warmup_s: warmup,
        ok: r.iterations,
        errors: if r.errors > 0 {
            std::collections::BTreeMap::from([("backend error".to_owned(), r.errors)])
        } else {
            std::collections::BTreeMap::new()
        },
        per_sec: r.iterations as f64 / r.seconds.max(1e-9),
        hsm_ops_per_sec: Some(r.ops_per_sec),
        ..Scenario::default()
    }
}

/// Samples the server's resident size every 100 ms until stopped; returns the largest seen.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(0));
    let p = peak.clone();
    let h = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok((rss, _)) = gateway::rss_kib(pid) {
                p.fetch_max(rss, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (peak, h)
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

/// Runs a set and returns its report (also written to `opts.out` as JSON).
pub async fn run(opts: &StandardOptions) -> anyhow::Result<Report> {
    let machine = Machine::now();
    if machine.load_start[0] > 1.5 {
        say(format!(
            "warning: load average is {:.2}; numbers measured now are depressed by other work",
            machine.load_start[0]
        ));
    }
    let exe = std::env::current_exe()?;
    let kmsgate = gateway::find_kmsgate(opts.kmsgate.as_deref())?;
    let tmp = tempfile::Builder::new().prefix("kmsgate-bench-").tempdir()?;
    let dir = tmp.path();
    let pki: Option<Pki> = if opts.tls { Some(gateway::write_pki(dir)?) } else { None };
    let transport = format!("{}/{}", if opts.tls { "tls" } else { "plain" }, if opts.http2 { "h2" } else { "h1" });
    let mut ctx = Ctx { opts, report: Report::new(machine), transport, pids: Vec::new() };
    ctx.report.notes.push(format!(
        "kmsgate: {} ({}), {}, data in a temporary SQLite store; generator and servers share this machine",
        kmsgate.display(),
        if cfg!(debug_assertions) { "debug build" } else { "release build" },
        ctx.transport
    ));

    // SoftHSM: a private token, if wanted and possible.
    let mut hsm_reason: Option<String> = None;
    let softhsm = match opts.softhsm {
        SoftHsmMode::Off => {
            hsm_reason = Some("SoftHSM disabled (--softhsm off)".to_owned());
            None
        }
        mode => match gateway::softhsm_setup(dir) {
            Ok(h) => Some(h),
            Err(e) if mode == SoftHsmMode::Auto => {
                hsm_reason = Some(format!("{e:#}"));
                None
            }
            Err(e) => return Err(e),
        },
    };

    let mut gw = Gateway::new(GatewayOptions {
        kmsgate,
        dir: dir.to_path_buf(),
        pki: pki.clone(),
        softhsm: softhsm.clone(),
        hsm_sessions: opts.hsm_sessions,
    })?;
    say(format!("setting up kmsgate in {}", dir.display()));
    let first = gw.cli(&["keys", "create", "--spec", "AES_256", "--id", KEY_SOFTWARE]);
    let first = match first {
        Err(e) if gw.opts.softhsm.is_some() && opts.softhsm == SoftHsmMode::Auto => {
            // A kmsgate without the PKCS#11 backend refuses the [[backend.pkcs11]] section: go on without it.
            hsm_reason = Some(format!("this kmsgate does not accept a PKCS#11 backend: {e:#}"));
            gw.without_softhsm()?;
            gw.cli(&["keys", "create", "--spec", "AES_256", "--id", KEY_SOFTWARE])
        }
        other => other,
    };
    first?;
    let mut hsm_on = gw.opts.softhsm.is_some();
    if hsm_on
        && let Err(e) = gw.cli(&["keys", "create", "--spec", "AES_256", "--id", KEY_SOFTHSM, "--backend", "softhsm"])
    {
        if opts.softhsm == SoftHsmMode::On {
            return Err(e);
        }
        hsm_reason = Some(format!("{e:#}"));
        hsm_on = false;
    }
    if opts.keys > 0 && opts.set == Set::Standard {
        say(format!("seeding {} keys through the kmsgate library (no server running yet)", opts.keys));
        let started = std::time::Instant::now();
        let mut cmd = Command::new(&exe);
        cmd.args(["seed-keys", "--count", &opts.keys.to_string(), "--id-prefix", SEED_PREFIX, "--config"])
            .arg(&gw.config);
        gateway::clean_env(&mut cmd);
        if let Some(h) = &gw.opts.softhsm {
            cmd.env("SOFTHSM2_CONF", &h.conf).env(PIN_ENV, &h.pin);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("seeding keys failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        ctx.report.notes.push(format!(
            "{} AES_256 keys were created before the server started, through the kmsgate library \
             (App::open + Dispatcher::create_key on the same configuration), in {:.1} s; one `kmsgate keys create` \
             process per key would take minutes",
            opts.keys,
            started.elapsed().as_secs_f64()
        ));
    }
    let cred = gw.xks_credential("bench", "/bench")?;
    let client_key = crate::alibaba::setup(&mut gw, dir)?;
    let rest_token = crate::rest::setup(&gw)?;
    let served = gw.start()?;
    let (url, pid) = (served.url(), served.pid());
    say(format!("kmsgate listening on {url} (pid {pid})"));
    ctx.pids.push(pid);

    let tls_opts = TlsOptions { ca_file: pki.as_ref().map(|p| p.ca.clone()), ..TlsOptions::default() };
    let endpoint = Arc::new(Endpoint::new(&url, &tls_opts, opts.http2).await?);
    let target = XksTarget {
        endpoint,
        uri_path: cred.uri_path.clone(),
        access_key_id: cred.access_key_id.clone(),
        secret: cred.secret.clone(),
        region: "us-east-1".to_owned(),
    };
    let encrypt = |key: &str| XksOptions {
        op: Op::Encrypt,
        key_ids: vec![key.to_owned()],
        plaintext_size: PLAINTEXT,
        aad_size: AAD,
        cdiv: true,
    };

    // One verified Encrypt tells the size of a real answer, which the bare hyper baseline then serves.
    let probe = XksWorkload::new(target.clone(), encrypt(KEY_SOFTWARE), Vec::new())?;
    let mut conn = target.endpoint.connect().await?;
    let body_len = xks::one(&probe, &mut conn, 0).await.context("the first XKS Encrypt failed")?.len();
    drop(conn);
    let mut baseline: Option<Served> = None;
    if opts.set == Set::Standard {
        let b = gateway::start_baseline(&exe, dir, body_len, pki.as_ref())?;
        say(format!("bare hyper baseline on {} ({body_len}-byte answers, like kmsgate's Encrypt)", b.url()));
        ctx.pids.push(b.pid());
        baseline = Some(b);
    }
    let base_target = match &baseline {
        Some(b) => Some(XksTarget {
            endpoint: Arc::new(Endpoint::new(&b.url(), &tls_opts, opts.http2).await?),
            ..target.clone()
        }),
        None => None,
    };

    let conns: Vec<usize> = if opts.set == Set::Smoke { vec![2] } else { opts.connections.clone() };
    for &c in &conns {
        if let Some(bt) = &base_target {
            ctx.xks(
                &format!("bare-hyper-{c}c"),
                "bare hyper, fixed answer of an Encrypt's size, same signed requests",
                "bare-hyper",
                bt,
                encrypt(KEY_SOFTWARE),
                ctx.status_only(c),
            )
            .await?;
        }
        let i = ctx
            .xks(
                &format!("xks-encrypt-software-{c}c"),
                "XKS Encrypt 32 B + 16 B AAD + CDIV, software backend",
                "xks",
                &target,
                encrypt(KEY_SOFTWARE),
                ctx.spec(c, None),
            )
            .await?;
        ctx.report.scenarios[i].server_rss_kib = gateway::rss_kib(pid).ok().map(|r| r.0);
        if hsm_on {
            let i = ctx
                .xks(
                    &format!("xks-encrypt-softhsm-{c}c"),
                    "XKS Encrypt 32 B + 16 B AAD + CDIV, SoftHSM through PKCS#11",
                    "xks",
                    &target,
                    encrypt(KEY_SOFTHSM),
                    ctx.spec(c, None),
                )
                .await?;
            let s = &mut ctx.report.scenarios[i];
            s.hsm_ops_per_sec = Some(s.per_sec * HSM_OPS_PER_ENCRYPT);
        }
    }

    // The other operations, at a middle concurrency.
    let mid = if opts.set == Set::Smoke { 2 } else { 16 };
    let other = [
        (Op::Decrypt, "xks-decrypt-software", "XKS Decrypt of warm-up ciphertexts, 16 B AAD, software backend"),
        (Op::Metadata, "xks-metadata-software", "XKS GetKeyMetadata, software backend"),
        (Op::Health, "xks-health", "XKS GetHealthStatus"),
    ];
    for (op, name, description) in other {
        ctx.xks(
            &format!("{name}-{mid}c"),
            description,
            "xks",
            &target,
            XksOptions { op, ..encrypt(KEY_SOFTWARE) },
            ctx.spec(mid, None),
        )
        .await?;
    }
    // The Alibaba instance API on the same listener: protobuf, and an RSA-2048 signature per request, which
    // costs the generator far more CPU than SigV4 (see docs/benchmarks.md).
    let w = Arc::new(AlibabaWorkload::new(target.endpoint.clone(), client_key, KEY_SOFTWARE, PLAINTEXT, AAD)?);
    ctx.load(
        &format!("alibaba-encrypt-software-{mid}c"),
        "Alibaba instance API Encrypt 32 B + 16 B AAD (AES-GCM), RSA ClientKey signature, software backend",
        "alibaba",
        &target.endpoint,
        w,
        ctx.spec(mid, None),
    )
    .await?;
    // The secrets REST API: one secret written now, then read with the bootstrap token.
    let mut value = [0u8; 16];
    aws_lc_rs::rand::fill(&mut value).map_err(|_| anyhow::anyhow!("no random secret value"))?;
    let value = hex::encode(value);
    crate::rest::put_secret(&target.endpoint, &rest_token, &value).await?;
    let w = Arc::new(crate::rest::RestReadWorkload::new(target.endpoint.clone(), &rest_token, &value));
    ctx.load(
        &format!("rest-secret-read-{mid}c"),
        "secrets REST API GET /v1/secrets/bench/db, bearer token (secrets.rate_limits = false)",
        "rest",
        &target.endpoint,
        w,
        ctx.spec(mid, None),
    )
    .await?;

    if opts.set == Set::Standard {
        // Open loop at a fixed rate: what a key store at AWS's default limit would see, queueing included.
        let rate = opts.open_rate;
        ctx.xks(
            &format!("xks-encrypt-software-open-{rate:.0}rps"),
            "XKS Encrypt 32 B + AAD + CDIV, open loop, 64 connections available",
            "xks",
            &target,
            encrypt(KEY_SOFTWARE),
            ctx.spec(64, Some(rate)),
        )
        .await?;

        // Memory: every seeded key in use, 64 busy connections.
        if opts.keys > 0 {
            let ids: Vec<String> = (0..opts.keys).map(|i| format!("{SEED_PREFIX}{i:05}")).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let (peak, sampler) = sample_rss(pid, stop.clone());
            let name = format!("xks-encrypt-{}k-keys-64c", opts.keys / 1000);
            let i = ctx
                .xks(
                    &name,
                    "XKS Encrypt 32 B + AAD + CDIV, requests spread over all seeded keys, software backend",
                    "xks",
                    &target,
                    XksOptions { key_ids: ids, ..encrypt(KEY_SOFTWARE) },
                    ctx.spec(64, None),
                )
                .await?;
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.join();
            let s = &mut ctx.report.scenarios[i];
            let (rss, hwm) = gateway::rss_kib(pid).unwrap_or((0, 0));
            s.server_rss_kib = Some(rss);
            s.server_peak_rss_kib = Some(peak.load(Ordering::Relaxed).max(rss));
            ctx.report
                .notes
                .push(format!("server VmHWM (lifetime peak) after the memory scenario: {} MiB", hwm / 1024));
        }
        drop(baseline);

        // Raw backend throughput, each in its own process like the servers.
        let secs = |d: Duration| format!("{}", d.as_secs_f64());
        let common = |tasks: usize| {
            vec![
                "--tasks".to_owned(),
                tasks.to_string(),
                "--duration".to_owned(),
                secs(opts.duration.min(Duration::from_secs(5))),
                "--warmup".to_owned(),
                secs(opts.warmup.min(Duration::from_secs(1))),
                "--plaintext-size".to_owned(),
                PLAINTEXT.to_string(),
                "--aad-size".to_owned(),
                AAD.to_string(),
            ]
        };
        for tasks in [1, opts.backend_tasks] {
            say(format!("backend-software-aes-gcm-{tasks}t: software AES-GCM encrypt+decrypt, no HTTP"));
            let mut args = vec!["--backend".to_owned(), "software".to_owned()];
            args.extend(common(tasks));
            wait_quiet(&ctx.pids, opts.quiet_wait).await;
            let before = gateway::CpuSnapshot::take(&ctx.pids);
            let r = run_backend_child(&exe, &args, None)?;
            let mut s = backend_scenario(
                &format!("backend-software-aes-gcm-{tasks}t"),
                "SoftwareBackend AES-256-GCM encrypt + decrypt of 32 B, no HTTP (ok/s column: HSM ops/s)",
                &r,
                opts.warmup.min(Duration::from_secs(1)).as_secs_f64(),
            );
            s.foreign_cpu = before.foreign_share(&gateway::CpuSnapshot::take(&ctx.pids));
            ctx.report.scenarios.push(s);
        }
        if hsm_on && let Some(h) = &gw.opts.softhsm {
            for tasks in [1, opts.backend_tasks] {
                say(format!("backend-softhsm-aes-gcm-{tasks}t: SoftHSM AES-GCM through the PKCS#11 backend, no HTTP"));
                let mut args = vec![
                    "--backend".to_owned(),
                    "softhsm".to_owned(),
                    "--module".to_owned(),
                    h.module.display().to_string(),
                    "--token-label".to_owned(),
                    h.label.clone(),
                    "--sessions".to_owned(),
                    opts.hsm_sessions.to_string(),
                ];
                args.extend(common(tasks));
                wait_quiet(&ctx.pids, opts.quiet_wait).await;
                let before = gateway::CpuSnapshot::take(&ctx.pids);
                match run_backend_child(&exe, &args, Some(h)) {
                    Ok(r) => {
                        let mut s = backend_scenario(
                            &format!("backend-softhsm-aes-gcm-{tasks}t"),
                            "Pkcs11Backend on SoftHSM, AES-256-GCM encrypt + decrypt of 32 B, no HTTP",
                            &r,
                            opts.warmup.min(Duration::from_secs(1)).as_secs_f64(),
                        );
                        s.foreign_cpu = before.foreign_share(&gateway::CpuSnapshot::take(&ctx.pids));
                        ctx.report.scenarios.push(s);
                    }
                    Err(e) => {
                        ctx.report.unavailable.push(Unavailable {
                            scenario: format!("backend-softhsm-aes-gcm-{tasks}t"),
                            reason: format!("{e:#}"),
                        });
                    }
                }
            }
        }
    }
    gw.stop();

    if !hsm_on {
        ctx.report.unavailable.push(Unavailable {
            scenario: "xks-encrypt-softhsm-*, backend-softhsm-*".to_owned(),
            reason: hsm_reason.unwrap_or_else(|| "SoftHSM not set up".to_owned()),
        });
    }
    let mut report = ctx.report;
    ratios(&mut report);
    if opts.set == Set::Standard {
        targets(&mut report, opts);
    }
    report.machine.finish();
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", opts.out.display()))?;
    Ok(report)
}

fn best_backend(report: &Report, prefix: &str) -> Option<(String, f64)> {
    report
        .scenarios
        .iter()
        .filter(|s| s.name.starts_with(prefix) && s.ok > 0)
        .filter_map(|s| s.hsm_ops_per_sec.map(|o| (s.name.clone(), o)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// XKS scenarios against the bare hyper run at the same concurrency; SoftHSM ones (HSM operations) against
/// the best raw SoftHSM run.
fn ratios(report: &mut Report) {
    let hsm_best = best_backend(report, "backend-softhsm-");
    let lookup: Vec<(usize, f64, String)> = report
        .scenarios
        .iter()
        .filter(|s| s.kind == "bare-hyper")
        .map(|s| (s.connections, s.per_sec, s.name.clone()))
        .collect();
    let nearest = |c: usize| -> Option<&(usize, f64, String)> { lookup.iter().min_by_key(|(bc, _, _)| bc.abs_diff(c)) };
    for s in report.scenarios.iter_mut().filter(|s| s.kind == "xks" && s.rate.is_none()) {
        if s.name.contains("softhsm") {
            if let (Some(ops), Some((name, best))) = (s.hsm_ops_per_sec, &hsm_best) {
                s.baseline = Some(format!("{name} (HSM ops)"));
                s.ratio = Some(ops / best);
            }
        } else if let Some((_, per_sec, name)) = nearest(s.connections)
            && *per_sec > 0.0
        {
            s.baseline = Some(name.clone());
            s.ratio = Some(s.per_sec / per_sec);
        }
    }
}

/// Other processes' CPU share above which a scenario's numbers are called unreliable.
const CONTAMINATED: f64 = 0.10;

/// A caveat for a target judged on scenarios that other work competed with.
fn contamination(report: &Report, names: &[&str]) -> String {
    let hit: Vec<String> = names
        .iter()
        .filter_map(|n| report.scenario(n))
        .filter_map(|s| s.foreign_cpu.filter(|f| *f > CONTAMINATED).map(|f| format!("{} {:.0} %", s.name, f * 100.0)))
        .collect();
    if hit.is_empty() {
        String::new()
    } else {
        format!("; UNRELIABLE: other processes used the CPU during {}", hit.join(", "))
    }
}

fn targets(report: &mut Report, opts: &StandardOptions) {
    let mut out = Vec::new();
    let c = 64;
    let soft = report.scenario(&format!("xks-encrypt-software-{c}c")).cloned();
    let base = report.scenario(&format!("bare-hyper-{c}c")).cloned();
    out.push(match (soft, base) {
        (Some(s), Some(b)) if b.per_sec > 0.0 => {
            let ratio = s.per_sec / b.per_sec;
            let p99 = s.latency.map_or(u64::MAX, |l| l.p99_us);
            let pass = ratio >= 0.60 && p99 < 5_000 && s.ok > 0;
            Target {
                name: "software backend, 64 connections".into(),
                goal: "XKS Encrypt 32 B + AAD + CDIV ≥ 60 % of bare hyper req/s, p99 < 5 ms".into(),
                measured: format!(
                    "{:.0} vs {:.0} req/s = {}, p99 {}{}",
                    s.per_sec,
                    b.per_sec,
                    pct(ratio),
                    crate::hist::fmt_us(p99),
                    contamination(report, &[&s.name, &b.name])
                ),
                status: if pass { "PASS" } else { "MISS" }.into(),
            }
        }
        _ => not_run("software backend, 64 connections", "the 64-connection scenarios did not run"),
    });
    let hsm = report.scenario(&format!("xks-encrypt-softhsm-{c}c")).cloned();
    out.push(match (hsm, best_backend(report, "backend-softhsm-")) {
        (Some(s), Some((name, best))) => {
            let ops = s.hsm_ops_per_sec.unwrap_or_default();
            let ratio = ops / best;
            Target {
                name: "SoftHSM backend, 64 connections".into(),
                goal: "≥ 70 % of raw SoftHSM AES-GCM throughput, counted in HSM ops (Encrypt + trial decrypt)".into(),
                measured: format!(
                    "{ops:.0} vs {best:.0} HSM ops/s ({name}) = {}{}",
                    pct(ratio),
                    contamination(report, &[&s.name, &name])
                ),
                status: if ratio >= 0.70 && s.ok > 0 { "PASS" } else { "MISS" }.into(),
            }
        }
        _ => not_run("SoftHSM backend, 64 connections", "SoftHSM scenarios are not available in this build"),
    });
    let mem = report.scenario(&format!("xks-encrypt-{}k-keys-64c", opts.keys / 1000)).cloned();
    out.push(match mem {
        // Request n uses key n mod keys, so only a run of at least `keys` requests has touched every key.
        Some(s) if opts.keys >= 10_000 && s.ok + s.warmup_ok + s.error_count() < opts.keys as u64 => not_run(
            "memory",
            &format!(
                "only {} requests: not every one of the {} keys was used; run longer",
                s.ok + s.warmup_ok + s.error_count(),
                opts.keys
            ),
        ),
        Some(s) if opts.keys >= 10_000 => {
            let peak = s.server_peak_rss_kib.unwrap_or_default();
            Target {
                name: "memory".into(),
                goal: "server RSS < 100 MB with 10,000 keys and 64 busy connections".into(),
                measured: format!(
                    "peak VmRSS {:.1} MB ({} MiB) with {} keys in use",
                    peak as f64 * 1024.0 / 1e6,
                    peak / 1024,
                    opts.keys
                ),
                status: if peak > 0 && peak * 1024 < 100_000_000 && s.ok > 0 { "PASS" } else { "MISS" }.into(),
            }
        }
        _ => not_run("memory", "needs --keys 10000 or more"),
    });
    report.targets = out;
}

fn not_run(name: &str, why: &str) -> Target {
    Target { name: name.into(), goal: String::new(), measured: why.into(), status: "NOT RUN".into() }
}
