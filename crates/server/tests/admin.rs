//! The admin listener of the real `kmsgate` binary: probes on their own address, apart from the data listener,
//! readiness that turns to "draining" on SIGTERM while liveness stays up, and configuration checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

/// A running `kmsgate serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kmsgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("KMSGATE_KEK").env_remove("KMSGATE_CONFIG").env("KMSGATE_LOG", "warn");
    c
}

fn addr_of(line: &str, label: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix(label)?;
    let url = rest.split_whitespace().next()?;
    url.split("://").nth(1)?.parse().ok()
}

/// `kmsgate serve` with both listeners on ephemeral ports, read from the banner.
fn start(cwd: &Path, envs: &[(&str, &str)]) -> Server {
    let mut cmd = kmsgate(cwd);
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn kmsgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    let addr = loop {
        let Some(Ok(line)) = lines.next() else { panic!("kmsgate exited before listening") };
        if let Some(a) = addr_of(&line, "admin:") {
            admin = Some(a);
        }
        if let Some(a) = addr_of(&line, "listening:") {
            break a;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, admin: admin.expect("the banner names the admin listener") }
}

#[tokio::test]
async fn probes_are_served_on_the_admin_listener_apart_from_the_data_listener() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    assert_ne!(server.addr, server.admin);

    let r = common::http(server.admin, "GET", "/healthz", b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert!(r.headers.contains_key("x-request-id"));
    let r = common::http(server.admin, "GET", "/readyz", b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["store"], "ok");

    let r = common::http(server.admin, "GET", "/metrics", b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("# TYPE kmsgate_requests_total counter\n"), "{text}");
    // Probes on the admin listener are not wire requests.
    assert!(!text.contains("kmsgate_requests_total{"), "{text}");
    // ... and metrics are not on the data listener.
    assert_eq!(common::http(server.addr, "GET", "/metrics", b"").await.status, 404);

    // The data APIs are not on the admin listener (an XKS path and the Alibaba instance API root).
    let r = common::http(server.admin, "POST", "/kms/xks/v1/health", b"{}").await;
    assert_eq!(r.status, 404);
    let r = common::http(server.admin, "POST", "/", b"").await;
    assert_eq!(r.status, 404);

    // The data listener keeps its probes for load balancers that check the serving port itself.
    assert_eq!(common::http(server.addr, "GET", "/readyz", b"").await.status, 200);
}

#[tokio::test]
async fn readiness_reports_draining_while_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[("KMSGATE_SERVER__SHUTDOWN_GRACE_SECS", "20")]);

    // An in-flight request: headers sent, body incomplete, so the drain waits for it.
    let mut stuck = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-protobuf\r\nx-kms-apiname: Encrypt\r\n\
         content-length: 100\r\n\r\nabc",
        server.addr
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = common::http(server.admin, "GET", "/readyz", b"").await;
        if r.status == 503 {
            assert_eq!(r.json()["status"], "draining");
            break;
        }
        assert!(Instant::now() < deadline, "readiness never reported draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Liveness stays up while draining; the data listener takes no new connections.
    assert_eq!(common::http(server.admin, "GET", "/healthz", b"").await.status, 200);
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err(), "the data listener still accepts");

    // Finishing the request lets the process drain and exit.
    stuck.write_all(&[0u8; 97]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "kmsgate did not stop after the drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tokio::net::TcpStream::connect(server.admin).await.is_err(), "the admin listener outlived the process");
}

#[test]
fn the_admin_listener_needs_an_address_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let out = kmsgate(dir.path())
        .args(["serve", "--bind", "127.0.0.1:18181", "--admin-bind", "127.0.0.1:18181"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.bind"), "{err}");

    // Disabled: no admin line in the banner, and the probe hint points at the data listener.
    let mut cmd = kmsgate(dir.path());
    cmd.args(["serve", "--bind", "127.0.0.1:0"]).env("KMSGATE_ADMIN__ENABLED", "false").stdout(Stdio::piped());
    let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    loop {
        let line = lines.next().unwrap().unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("try:") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!banner.contains("admin:"), "{banner}");
}
