//! A kmsgate the benchmark starts itself: the `kmsgate` binary of the same build, on an ephemeral port, with a
//! temporary data directory and `KMSGATE_LOG=warn`, set up through its own CLI. Also the other processes of a
//! standard run (the bare hyper baseline, raw backend measurements) and their helpers: test PKI, a private
//! SoftHSM token, `/proc` memory readings.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The `kmsgate` binary: `--kmsgate`, else `$KMSBENCH_KMSGATE_BIN`, else next to this executable (`target/<profile>/`),
/// else one directory up (test harnesses live in `target/<profile>/deps/`).
pub fn find_kmsgate(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KMSBENCH_KMSGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("kmsgate");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    bail!(
        "no kmsgate binary next to {}: build it with the same profile (`cargo build [--release] -p kmsgate`) or \
         pass --kmsgate PATH",
        exe.display()
    )
}

/// A throw-away CA and a server certificate for 127.0.0.1 and localhost.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn write_pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kmsgate-bench CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let pki = Pki { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    std::fs::write(&pki.ca, ca_cert.pem())?;
    std::fs::write(&pki.cert, leaf_cert.pem())?;
    std::fs::write(&pki.key, leaf_key.serialize_pem())?;
    Ok(pki)
}

/// A private SoftHSM token (its own token directory, so the system's is untouched).
#[derive(Debug, Clone)]
pub struct SoftHsm {
    pub conf: PathBuf,
    pub module: PathBuf,
    pub label: String,
    pub pin: String,
}

pub const SOFTHSM_MODULES: &[&str] =
    &["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"];
/// The environment variable the bench hands the token PIN through (never written to a file or the config). Not
/// `KMSGATE_*`: kmsgate reads every such variable as configuration.
pub const PIN_ENV: &str = "KMSBENCH_SOFTHSM_PIN";

/// Creates a token, or says why not (no softhsm2-util, no module).
pub fn softhsm_setup(dir: &Path) -> anyhow::Result<SoftHsm> {
    let module = std::env::var_os("KMSBENCH_PKCS11_MODULE")
        .map(PathBuf::from)
        .or_else(|| SOFTHSM_MODULES.iter().map(PathBuf::from).find(|p| p.is_file()))
        .context("no SoftHSM module (install softhsm2, or set KMSBENCH_PKCS11_MODULE)")?;
    let tokens = dir.join("softhsm-tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )?;
    let label = "kmsgate-bench".to_owned();
    let pin = "1234".to_owned();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", &label, "--so-pin", "5678", "--pin", &pin])
        .output()
        .context("softhsm2-util is not installed (apt-get install softhsm2)")?;
    if !out.status.success() {
        bail!("softhsm2-util --init-token failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(SoftHsm { conf, module, label, pin })
}

/// kmsgate reads every `KMSGATE_*` variable as configuration: the caller's shell must not change the server
/// under test (or the configuration the seeding step opens).
pub fn clean_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KMSGATE_") {
            c.env_remove(k);
        }
    }
}

/// Resident and peak resident size of a process, in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in status"))?;
        Ok(line[name.len()..].trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time, in clock ticks: the whole machine's busy and total time, and that of a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    pub machine_busy: u64,
    pub machine_total: u64,
    pub ours: u64,
}

/// Busy and total ticks from the `cpu` line of `/proc/stat`.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Some((busy, busy + v[3] + v[4]))
}

/// utime + stime (+ cutime + cstime with `children`) of a `/proc/<pid>/stat` line.
fn process_ticks(stat: &str, children: bool) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(4).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 4 {
        return None;
    }
    Some(f[0] + f[1] + if children { f[2] + f[3] } else { 0 })
}

impl CpuSnapshot {
    /// This process (with its reaped children: the raw backend runs) plus the running processes `pids`.
    pub fn take(pids: &[u32]) -> CpuSnapshot {
        let (machine_busy, machine_total) =
            std::fs::read_to_string("/proc/stat").ok().and_then(|s| machine_ticks(&s)).unwrap_or_default();
        let mut ours =
            std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| process_ticks(&s, true)).unwrap_or_default();
        for pid in pids {
            ours += std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| process_ticks(&s, false))
                .unwrap_or_default();
        }
        CpuSnapshot { machine_busy, machine_total, ours }
    }

    /// Share of the whole machine (0..1) that other processes used between `self` and `later`: work that
    /// competed with the benchmark for the cores.
    pub fn foreign_share(&self, later: &CpuSnapshot) -> Option<f64> {
        let total = later.machine_total.checked_sub(self.machine_total)?;
        let busy = later.machine_busy.checked_sub(self.machine_busy)?;
        let ours = later.ours.checked_sub(self.ours)?;
        (total > 0).then(|| busy.saturating_sub(ours) as f64 / total as f64)
    }
}

/// A child process killed on drop, with the address its banner announced.
#[derive(Debug)]
pub struct Served {
    child: Child,
    pub addr: SocketAddr,
    pub https: bool,
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.addr)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts `cmd` and waits for its `listening: scheme://addr` banner line.
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> anyhow::Result<Served> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(log_file)).stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        let found = loop {
            let Some(Ok(line)) = lines.next() else { break None };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.trim().strip_prefix("listening:") {
                break rest.split_whitespace().next().map(str::to_owned);
            }
        };
        let Some(url) = found else {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} exited before listening:\n{seen}{err}");
        };
        let https = url.starts_with("https://");
        let addr: SocketAddr = url
            .split("://")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{what} announced an unreadable address {url}"))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Served { child, addr, https })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a kmsgate for benchmarking looks like.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub kmsgate: PathBuf,
    pub dir: PathBuf,
    pub pki: Option<Pki>,
    pub softhsm: Option<SoftHsm>,
    /// PKCS#11 sessions in kmsgate's pool (and in the raw baseline, so both get the same HSM parallelism).
    pub hsm_sessions: usize,
}

/// A kmsgate data directory, its configuration, and (once started) its process.
#[derive(Debug)]
pub struct Gateway {
    pub opts: GatewayOptions,
    pub config: PathBuf,
    pub served: Option<Served>,
}

/// An XKS credential as `kmsgate xks credentials create` prints it (the KMS console's import file).
#[derive(Debug, Clone)]
pub struct XksCredential {
    pub uri_path: String,
    pub access_key_id: String,
    pub secret: String,
}

impl Gateway {
    pub fn new(opts: GatewayOptions) -> anyhow::Result<Gateway> {
        let config = opts.dir.join("kmsgate.toml");
        let g = Gateway { opts, config, served: None };
        g.write_config()?;
        Ok(g)
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let mut toml = format!("data_dir = {:?}\n\n[log]\nlevel = \"warn\"\n", self.opts.dir.join("data"));
        // The secrets API's per-identity buckets (1000 reads a minute per token identity) would turn the REST
        // read scenario into 429s after its first second: the benchmark measures the read, not the limiter.
        toml.push_str("\n[secrets]\nrate_limits = false\n");
        if let Some(p) = &self.opts.pki {
            toml.push_str(&format!("\n[server.tls]\ncert = {:?}\nkey = {:?}\n", p.cert, p.key));
        }
        if let Some(h) = &self.opts.softhsm {
            toml.push_str(&format!(
                "\n[[backend.pkcs11]]\nname = \"softhsm\"\nmodule = {:?}\ntoken_label = {:?}\npin_env = {PIN_ENV:?}\nsessions = {}\n",
                h.module, h.label, self.opts.hsm_sessions
            ));
        }
        std::fs::write(&self.config, toml)?;
        Ok(())
    }

    /// Drops the SoftHSM member from the configuration (a kmsgate without PKCS#11 support refuses it).
    pub fn without_softhsm(&mut self) -> anyhow::Result<()> {
        self.opts.softhsm = None;
        self.write_config()
    }

    /// A `kmsgate` command on this data directory, with a clean environment for the gateway's own variables.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.opts.kmsgate);
        clean_env(&mut c);
        c.env("KMSGATE_LOG", "warn").arg("--config").arg(&self.config).current_dir(&self.opts.dir);
        if let Some(h) = &self.opts.softhsm {
            c.env("SOFTHSM2_CONF", &h.conf).env(PIN_ENV, &h.pin);
        }
        c
    }

    /// Runs `kmsgate --config F ARGS` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command().args(args).output().context("cannot run kmsgate")?;
        if !out.status.success() {
            bail!(
                "kmsgate {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates an XKS key store serving all keys of the tenant, and a credential for it.
    pub fn xks_credential(&self, store: &str, prefix: &str) -> anyhow::Result<XksCredential> {
        self.cli(&["xks", "stores", "create", "--name", store, "--prefix", prefix, "--all-keys"])?;
        let out = self.cli(&["--json", "xks", "credentials", "create", "--store", store])?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).with_context(|| format!("unreadable credential output: {out}"))?;
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
        Ok(XksCredential {
            uri_path: s("/XksProxyUriPath").context("no XksProxyUriPath")?,
            access_key_id: s("/XksProxyAuthenticationCredential/AccessKeyId").context("no AccessKeyId")?,
            secret: s("/XksProxyAuthenticationCredential/RawSecretAccessKey").context("no RawSecretAccessKey")?,
        })
    }

    /// Starts `kmsgate serve` on an ephemeral port.
    pub fn start(&mut self) -> anyhow::Result<&Served> {
        let mut cmd = self.command();
        cmd.args(["serve", "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0"]);
        let served = Served::spawn(cmd, "kmsgate serve", &self.opts.dir.join("kmsgate.log"))?;
        Ok(self.served.insert(served))
    }

    pub fn stop(&mut self) {
        self.served = None;
    }
}

/// Starts the bare hyper baseline (`kmsgate-bench baseline-server`) as its own process, like kmsgate.
pub fn start_baseline(exe: &Path, dir: &Path, body_bytes: usize, pki: Option<&Pki>) -> anyhow::Result<Served> {
    let mut cmd = Command::new(exe);
    cmd.args(["baseline-server", "--bind", "127.0.0.1:0", "--body-bytes", &body_bytes.to_string()]);
    if let Some(p) = pki {
        cmd.arg("--tls-cert").arg(&p.cert).arg("--tls-key").arg(&p.key);
    }
    Served::spawn(cmd, "the bare hyper baseline", &dir.join("baseline.log"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cpu_accounting() {
        let stat = "cpu  100 5 50 800 10 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(machine_ticks(stat), Some((160, 970)));
        let p = "42 (tokio (worker) x) S 1 2 3 4 5 6 7 8 9 10 111 22 7 3 20 0";
        assert_eq!(process_ticks(p, false), Some(133));
        assert_eq!(process_ticks(p, true), Some(143));
        let a = CpuSnapshot { machine_busy: 1000, machine_total: 5000, ours: 400 };
        let b = CpuSnapshot { machine_busy: 1200, machine_total: 5200, ours: 550 };
        assert_eq!(a.foreign_share(&b), Some(0.25));
        assert!(CpuSnapshot::take(&[std::process::id()]).machine_total > 0);
    }

    #[test]
    fn own_memory_is_readable() {
        let (rss, hwm) = rss_kib(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
    }

    #[test]
    fn pki_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_pki(dir.path()).unwrap();
        let cfg = crate::client::client_config(
            &crate::client::TlsOptions { ca_file: Some(p.ca.clone()), ..Default::default() },
            false,
        );
        assert!(cfg.is_ok());
        kmsgate::http::tls_config(&kmsgate::config::TlsConfig {
            cert: p.cert,
            key: p.key,
            client_ca: None,
            client_subjects: vec![],
        })
        .unwrap();
    }
}
