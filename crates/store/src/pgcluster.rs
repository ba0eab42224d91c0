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

/// Whether this process runs as root (then the server runs as `postgres`). Asked once, of `id -u`: the crate
/// forbids the `unsafe` a direct `geteuid` call would need.
fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
    })
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

// ---- the shared server ----------------------------------------------------------------------------------

/// The shared test server: `$KMSGATE_TEST_PG_URL`, else [`DEFAULT_URL`].
pub const URL_ENV: &str = "KMSGATE_TEST_PG_URL";
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The shared server's URL; panics (fails the test) when it does not answer within 5 s.
pub async fn shared_server_url() -> String {
    let url = std::env::var(URL_ENV).ok().filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_URL.to_owned());
    sqlx::any::install_default_drivers();
    match tokio::time::timeout(std::time::Duration::from_secs(5), sqlx::AnyPool::connect(&url)).await {
        Ok(Ok(pool)) => {
            pool.close().await;
            url
        }
        Ok(Err(e)) => panic!("PostgreSQL at ${URL_ENV} or {DEFAULT_URL} cannot be reached ({e}); run scripts/test"),
        Err(_) => panic!("PostgreSQL at ${URL_ENV} or {DEFAULT_URL} did not answer; run scripts/test"),
    }
}

/// A schema of its own on a server, dropped (with everything in it) when the guard goes away, so runs and
/// concurrent tests never see each other's rows.
#[derive(Debug)]
pub struct TestSchema {
    server: String,
    name: String,
    url: String,
}

impl TestSchema {
    /// Creates a uniquely named schema on `server`.
    pub async fn create(server: &str) -> TestSchema {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("kmsgate_test_{}_{}_{}", std::process::id(), nanos, NEXT.fetch_add(1, Ordering::Relaxed));
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(server).await.expect("connect to create a schema");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&pool).await.expect("create schema");
        pool.close().await;
        let sep = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{sep}options=-c%20search_path%3D{name}");
        TestSchema { server: server.to_owned(), name, url }
    }

    /// The store URL that selects the schema (through `search_path`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside a test's runtime, which cannot be blocked on: use a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let pool = sqlx::AnyPool::connect(&server).await.expect("connect to drop the schema");
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE")))
                    .execute(&pool)
                    .await
                    .expect("drop schema");
                pool.close().await;
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("the test schema {} could not be dropped", self.name);
        }
    }
}
