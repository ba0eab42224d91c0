//! The real `kmsgate` binary as tests run it: `serve` processes on ephemeral ports and CLI invocations, each
//! with a configuration file of the test's making.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

/// A running `kmsgate serve`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Server {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kmsgate --config <config> ...` in `cwd`, with no root key or configuration from the test's environment.
pub fn kmsgate(cwd: &Path, config: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd)
        .env_remove("KMSGATE_KEK")
        .env_remove("KMSGATE_CONFIG")
        .env("KMSGATE_LOG", "warn")
        // Tests run in parallel: every server gets its own ephemeral admin port, not the fixed default.
        .env("KMSGATE_ADMIN__BIND", "127.0.0.1:0")
        .arg("--config")
        .arg(config);
    c
}

/// `kmsgate serve` with `config` (which should bind `127.0.0.1:0`); waits for the banner's listening line.
pub fn start(cwd: &Path, config: &Path, log: &Path) -> Server {
    let mut cmd = kmsgate(cwd, config);
    cmd.arg("serve").env("KMSGATE_LOG", "info").stdout(Stdio::piped()).stderr(std::fs::File::create(log).unwrap());
    let mut child = cmd.spawn().expect("spawn kmsgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("kmsgate exited before listening: {}", std::fs::read_to_string(log).unwrap_or_default());
        };
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            let url = rest.split_whitespace().next().unwrap();
            break url.split("://").nth(1).unwrap().parse::<SocketAddr>().unwrap();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, log: log.to_path_buf() }
}

/// Runs the CLI: (exit code, stdout, stderr).
pub fn cli(cwd: &Path, config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = kmsgate(cwd, config).args(args).output().expect("run kmsgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn cli_ok(cwd: &Path, config: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(cwd, config, args);
    assert_eq!(code, 0, "kmsgate {args:?} failed: {err}");
    out
}

/// The CLI with `--json`, parsed.
pub fn cli_json(cwd: &Path, config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cli_ok(cwd, config, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A TOML basic string (quotes and backslashes escaped) for configuration files written by tests.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
