//! A private, throwaway PostgreSQL cluster for tests that must stop, restart or reconfigure the server (faults,
//! TLS): the shared server on 5432 is never touched. `initdb` and `pg_ctl` come from `$KMSGATE_TEST_PG_BIN`, or
//! the newest `/usr/lib/postgresql/*/bin` (`scripts/test` installs PostgreSQL when it is missing). The cluster
//! listens on 127.0.0.1 on a free port, keeps its data and socket in a temporary directory, and is stopped and
//! deleted when dropped. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
//!
//! A missing PostgreSQL installation fails the test (panics): tests never skip.

// Test support: a panic is how a failure is reported.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Environment variable naming the directory holding `initdb` and `pg_ctl`.
pub const BIN_ENV: &str = "KMSGATE_TEST_PG_BIN";

/// The server certificate and key (PEM) a cluster serves TLS with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running (or stopped) private PostgreSQL cluster.
#[derive(Debug)]
pub struct PrivateCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    running: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var(BIN_ENV)
        && !dir.is_empty()
    {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries (initdb) in /usr/lib/postgresql/*/bin or ${BIN_ENV}; run scripts/test"
        ),
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port nothing listens on right now (the kernel's choice for an ephemeral bind).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

impl PrivateCluster {
    /// `initdb` and start a cluster with trust authentication for `postgres` and a database `test`. With `tls`,
    /// the server also speaks TLS with that certificate (`ssl=on`).
    pub fn start(tls: Option<&TlsFiles>) -> PrivateCluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("kmsgate-pg-").tempdir().expect("tempdir");
        if let Some(t) = tls {
            std::fs::write(dir.path().join("server.crt"), &t.cert_pem).expect("write server.crt");
            let key = dir.path().join("server.key");
            std::fs::write(&key, &t.key_pem).expect("write server.key");
            // PostgreSQL refuses a key file others can read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        }
        if is_root() {
            check("chown", Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).output());
        }
        let mut cluster = PrivateCluster { bin, dir, port: 0, tls: tls.is_some(), running: false };
        let data = cluster.data_dir();
        // --no-sync: the throwaway cluster's initial files need no flush; the server itself fsyncs as usual.
        check(
            "initdb",
            cluster
                .as_pg(&cluster.bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data)
                .output(),
        );
        cluster.port = free_port();
        cluster.start_again();
        check(
            "createdb test",
            cluster
                .as_pg(&cluster.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "test"])
                .output(),
        );
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_pg(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// The directory holding the cluster (data, socket, log, TLS files), for tests that write files next to it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/test` plus `query` (e.g. `sslmode=verify-full&sslrootcert=...`).
    pub fn url(&self, query: &str) -> String {
        let base = format!("postgres://postgres@127.0.0.1:{}/test", self.port);
        if query.is_empty() { base } else { format!("{base}?{query}") }
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Starts the (stopped) cluster on the same port and waits until it accepts connections.
    pub fn start_again(&mut self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        if self.tls {
            let d = self.dir.path().display();
            opts.push_str(&format!(" -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"));
        }
        check(
            "pg_ctl start",
            self.as_pg(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .output(),
        );
        self.running = true;
    }

    /// Stops the server. `immediate` is a crash as far as the data goes (no checkpoint; recovery replays the
    /// WAL at the next start); `fast` is a clean shutdown that disconnects clients.
    pub fn stop(&mut self, mode: StopMode) {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        check(
            "pg_ctl stop",
            self.as_pg(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-m", mode, "stop"])
                .output(),
        );
        self.running = false;
    }
}

/// How [`PrivateCluster::stop`] stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Fast,
    Immediate,
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .as_pg(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-m", "immediate", "stop"])
                .output();
        }
    }
}
