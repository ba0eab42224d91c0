//! `kmsgate-bench instructions`: work per request instead of wall-clock throughput. Each server (kmsgate, the
//! bare hyper baseline) and the generator itself are counted with `perf stat -e instructions,task-clock -p PID`
//! while the generator sends a fixed number of requests. Instruction counts do not depend on what else the
//! machine is doing, so they can be compared on a shared machine where throughput cannot; on a machine whose
//! cores are shared by generator and server, the throughput ratio to the baseline is about
//! `(generator + baseline) / (generator + kmsgate)` per request.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::alibaba::AlibabaWorkload;
use crate::client::{Endpoint, HttpConnector, TlsOptions};
use crate::gateway::{self, Gateway, GatewayOptions};
use crate::load::{self, LoadSpec, Verify, Workload};
use crate::standard::{AAD, PLAINTEXT};
use crate::xks::{Op, XksOptions, XksTarget, XksWorkload};

/// What to count.
#[derive(Debug, Clone)]
pub struct InstrOptions {
    pub requests: u64,
    pub warmup_requests: u64,
    pub connections: usize,
    pub kmsgate: Option<PathBuf>,
    pub tls: bool,
    pub http2: bool,
}

/// One counted process over one run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub instructions: u64,
    /// CPU time, milliseconds.
    pub task_clock_ms: f64,
}

/// Work per request of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct InstrScenario {
    pub name: String,
    pub requests: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub server_instructions_per_request: f64,
    pub server_cpu_us_per_request: f64,
    pub generator_instructions_per_request: f64,
    pub generator_cpu_us_per_request: f64,
}

/// `perf stat` attached to a running process until stopped.
struct PerfStat {
    child: Child,
    out: PathBuf,
}

impl PerfStat {
    fn attach(pid: u32, out: &Path) -> anyhow::Result<PerfStat> {
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "instructions,task-clock", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run `perf stat` (install linux-perf / linux-tools)")?;
        Ok(PerfStat { child, out: out.to_path_buf() })
    }

    /// Stops counting (SIGINT makes perf print its totals) and reads them.
    fn finish(mut self) -> anyhow::Result<Counts> {
        let status = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("cannot stop perf stat");
        }
        self.child.wait()?;
        parse_perf_csv(&std::fs::read_to_string(&self.out)?)
    }
}

/// Totals from `perf stat -x ,` output: `value,unit,event,...` lines.
pub fn parse_perf_csv(text: &str) -> anyhow::Result<Counts> {
    let mut c = Counts::default();
    let mut seen = (false, false);
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        let event = f[2].split(':').next().unwrap_or("");
        match event {
            "instructions" => {
                c.instructions = f[0].trim().parse().with_context(|| format!("perf: no instruction count: {line}"))?;
                seen.0 = true;
            }
            "task-clock" => {
                c.task_clock_ms = f[0].trim().parse().with_context(|| format!("perf: no task clock: {line}"))?;
                seen.1 = true;
            }
            _ => {}
        }
    }
    if !(seen.0 && seen.1) {
        bail!("perf stat reported no instructions/task-clock (no hardware counters here?):\n{text}");
    }
    Ok(c)
}

/// Sends `requests` requests of `workload` (after `warmup_requests` uncounted ones, checked in depth when
/// `verify`) while counting `server` and this process.
pub async fn count<W: Workload>(
    name: &str,
    verify: Verify,
    endpoint: &Arc<Endpoint>,
    workload: Arc<W>,
    server: u32,
    opts: &InstrOptions,
    dir: &Path,
) -> anyhow::Result<InstrScenario> {
    let connector = Arc::new(HttpConnector(endpoint.clone()));
    let spec = |n: u64, verify: Verify| LoadSpec {
        connections: opts.connections,
        rate: None,
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        verify,
        requests: Some(n),
    };
    if opts.warmup_requests > 0 {
        let w = load::run(connector.clone(), workload.clone(), &spec(opts.warmup_requests, verify)).await?;
        if w.ok == 0 {
            bail!("{name}: every warm-up request failed: {:?}", w.errors);
        }
    }
    let server_perf = PerfStat::attach(server, &dir.join(format!("{name}.server.perf")))?;
    let own_perf = PerfStat::attach(std::process::id(), &dir.join(format!("{name}.generator.perf")))?;
    // perf needs a moment to attach to every thread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = load::run(connector, workload, &spec(opts.requests, Verify::Never)).await?;
    let server_counts = server_perf.finish()?;
    let own = own_perf.finish()?;
    let n = opts.requests.max(1) as f64;
    Ok(InstrScenario {
        name: name.to_owned(),
        requests: opts.requests,
        errors: r.errors.clone(),
        server_instructions_per_request: server_counts.instructions as f64 / n,
        server_cpu_us_per_request: server_counts.task_clock_ms * 1000.0 / n,
        generator_instructions_per_request: own.instructions as f64 / n,
        generator_cpu_us_per_request: own.task_clock_ms * 1000.0 / n,
    })
}

/// Prints one line per scenario and the ratios to the first (the baseline).
pub fn table(rows: &[InstrScenario]) -> String {
    let mut s = format!(
        "{:<28} {:>8} {:>6} {:>14} {:>10} {:>14} {:>10} {:>9}\n",
        "scenario", "requests", "errors", "server instr", "server µs", "gen instr", "gen µs", "predicted"
    );
    let base = rows.first();
    for r in rows {
        // Predicted throughput ratio on shared cores: total instructions per request, baseline over this.
        let predicted = base.map_or(1.0, |b| {
            (b.server_instructions_per_request + b.generator_instructions_per_request)
                / (r.server_instructions_per_request + r.generator_instructions_per_request).max(1.0)
        });
        s.push_str(&format!(
            "{:<28} {:>8} {:>6} {:>14.0} {:>10.1} {:>14.0} {:>10.1} {:>8.0}%\n",
            r.name,
            r.requests,
            r.errors.values().sum::<u64>(),
            r.server_instructions_per_request,
            r.server_cpu_us_per_request,
            r.generator_instructions_per_request,
            r.generator_cpu_us_per_request,
            predicted * 100.0
        ));
    }
    for r in rows.iter().filter(|r| !r.errors.is_empty()) {
        s.push_str(&format!("{}: errors {:?}\n", r.name, r.errors));
    }
    s
}

const KEY: &str = "bench-software";

/// Sets up a kmsgate like the standard run (TLS, software key, XKS store) and the bare hyper baseline, then
/// counts both under the same signed XKS Encrypt requests.
pub async fn run(opts: &InstrOptions) -> anyhow::Result<Vec<InstrScenario>> {
    let exe = std::env::current_exe()?;
    let kmsgate = gateway::find_kmsgate(opts.kmsgate.as_deref())?;
    let tmp = tempfile::Builder::new().prefix("kmsgate-bench-instr-").tempdir()?;
    let dir = tmp.path();
    let pki = if opts.tls { Some(gateway::write_pki(dir)?) } else { None };
    let mut gw = Gateway::new(GatewayOptions {
        kmsgate,
        dir: dir.to_path_buf(),
        pki: pki.clone(),
        softhsm: None,
        hsm_sessions: 1,
    })?;
    gw.cli(&["keys", "create", "--spec", "AES_256", "--id", KEY])?;
    let cred = gw.xks_credential("bench", "/bench")?;
    let alibaba = crate::alibaba::setup(&mut gw, dir)?;
    let served = gw.start()?;
    let (url, pid) = (served.url(), served.pid());
    let tls_opts = TlsOptions { ca_file: pki.as_ref().map(|p| p.ca.clone()), ..TlsOptions::default() };
    let endpoint = Arc::new(Endpoint::new(&url, &tls_opts, opts.http2).await?);
    let target = XksTarget {
        endpoint: endpoint.clone(),
        uri_path: cred.uri_path.clone(),
        access_key_id: cred.access_key_id.clone(),
        secret: cred.secret.clone(),
        region: "us-east-1".to_owned(),
    };
    let encrypt = XksOptions {
        op: Op::Encrypt,
        key_ids: vec![KEY.to_owned()],
        plaintext_size: PLAINTEXT,
        aad_size: AAD,
        cdiv: true,
    };
    let probe = XksWorkload::new(target.clone(), encrypt.clone(), Vec::new())?;
    let mut conn = endpoint.connect().await?;
    let body_len = crate::xks::one(&probe, &mut conn, 0).await.context("the first XKS Encrypt failed")?.len();
    drop(conn);
    let baseline = gateway::start_baseline(&exe, dir, body_len, pki.as_ref())?;
    let base_endpoint = Arc::new(Endpoint::new(&baseline.url(), &tls_opts, opts.http2).await?);
    let base_target = XksTarget { endpoint: base_endpoint.clone(), ..target.clone() };

    let mut rows = Vec::new();
    let w = Arc::new(XksWorkload::new(base_target, encrypt.clone(), Vec::new())?);
    // The baseline's fixed answer is no real Encrypt answer: its status is all there is to check.
    rows.push(count("bare-hyper", Verify::Never, &base_endpoint, w, baseline.pid(), opts, dir).await?);
    let w = Arc::new(XksWorkload::new(target.clone(), encrypt.clone(), Vec::new())?);
    rows.push(count("xks-encrypt-software", Verify::All, &endpoint, w, pid, opts, dir).await?);
    let w = Arc::new(XksWorkload::new(target, XksOptions { op: Op::Health, ..encrypt }, Vec::new())?);
    rows.push(count("xks-health", Verify::All, &endpoint, w, pid, opts, dir).await?);
    let w = Arc::new(AlibabaWorkload::new(endpoint.clone(), alibaba, KEY, PLAINTEXT, AAD)?);
    rows.push(count("alibaba-encrypt-software", Verify::All, &endpoint, w, pid, opts, dir).await?);
    drop(baseline);
    gw.stop();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn perf_csv() {
        let text = "# started on Sun Nov 22 07:40:00 2026\n\n\
                    1234567,,instructions,631490,100.00,,\n\
                    0.63,msec,task-clock,631490,100.00,328.901,CPUs utilized\n";
        let c = parse_perf_csv(text).unwrap();
        assert_eq!(c.instructions, 1_234_567);
        assert!((c.task_clock_ms - 0.63).abs() < 1e-12);
        assert!(parse_perf_csv("<not supported>,,instructions,0,100.00,,\n").is_err());
        assert!(parse_perf_csv("").is_err());
    }
}
