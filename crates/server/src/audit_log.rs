//! The tamper-evident audit log: every audit event of the dispatcher as one JSON line, each record carrying the
//! SHA-256 of the previous one, so an edited, removed or reordered record breaks the chain
//! (`kmsgate audit verify`). Events never hold plaintext, AAD, secret values or credentials (core `audit`).
//!
//! A record is the event's fields plus `type`, `seq` and `prev`, serialised as one JSON object, followed by
//! `,"hash":"<hex SHA-256 of the object before the hash field>"`. The hash covers the exact bytes written, so
//! verification never depends on re-serialising JSON.
//!
//! Writing never blocks the request path: events go through a channel to a writer thread. With a file, the
//! writer takes an exclusive lock on it for each batch, continues the chain from the file's last record and
//! syncs the batch to disk, so a server and CLI processes may append to the same file. With the store, the
//! writer appends each batch in one write transaction of the store's `audit_log` table, which every replica
//! serialises on the store's writer lock: all replicas and CLI processes build one chain.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kmsgate_core::{AuditEvent, AuditSink};
use kmsgate_store::{SqlStore, StoreOptions};
use serde_json::Value;

/// The `type` field of every audit record (other JSON lines, e.g. logs on the same stdout, have none).
pub const RECORD_TYPE: &str = "kmsgate.audit";
/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_FIELD: &str = ",\"hash\":\"";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
    /// The `audit_log` table of the store at this (connectable) URL.
    Store(String),
}

/// Where the writer thread puts records.
enum Target {
    File(File),
    Stdout,
    /// The writer's own runtime and pool: the sink outlives no runtime of its caller and the request path's
    /// pool is never used for audit appends.
    Store(tokio::runtime::Runtime, SqlStore),
}

enum Msg {
    Record(Value),
    Flush(mpsc::Sender<()>),
}

/// An [`AuditSink`] writing the hash chain.
#[derive(Debug)]
pub struct ChainSink {
    tx: Mutex<mpsc::Sender<Msg>>,
}

fn flushers() -> &'static Mutex<Vec<Arc<ChainSink>>> {
    static SINKS: OnceLock<Mutex<Vec<Arc<ChainSink>>>> = OnceLock::new();
    SINKS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Waits until every record handed to any chain sink of this process is written (called before exit).
pub fn flush_all(timeout: Duration) {
    let sinks: Vec<Arc<ChainSink>> = flushers().lock().map(|s| s.clone()).unwrap_or_default();
    for s in sinks {
        s.flush(timeout);
    }
}

impl ChainSink {
    /// Starts the writer. A file is created with mode 0600 if missing and must be writable now: a
    /// misconfigured audit log stops the start, not the first request.
    pub fn open(dest: Destination) -> anyhow::Result<Arc<ChainSink>> {
        let (tx, rx) = mpsc::channel();
        match dest {
            Destination::File(path) => {
                let file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| anyhow::anyhow!("cannot open the audit log {}: {e}", path.display()))?;
                spawn_writer(move || Ok(Target::File(file)), rx)?;
            }
            Destination::Stdout => spawn_writer(|| Ok(Target::Stdout), rx)?,
            Destination::Store(url) => spawn_writer(move || open_store(&url), rx)?,
        }
        let sink = Arc::new(ChainSink { tx: Mutex::new(tx) });
        if let Ok(mut s) = flushers().lock() {
            s.push(sink.clone());
        }
        Ok(sink)
    }

    /// Waits (at most `timeout`) until the records handed over so far are written.
    pub fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = mpsc::channel();
        let sent = self.tx.lock().map(|tx| tx.send(Msg::Flush(ack_tx)).is_ok()).unwrap_or(false);
        if sent {
            let _ = ack_rx.recv_timeout(timeout);
        }
    }
}

impl AuditSink for ChainSink {
    fn record(&self, event: &AuditEvent) {
        match serde_json::to_value(event) {
            Ok(v) => {
                if let Ok(tx) = self.tx.lock() {
                    let _ = tx.send(Msg::Record(v));
                }
            }
            Err(e) => tracing::error!(target: "audit", error = %e, "could not serialise an audit event"),
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// One sealed line (without newline) and its hash.
pub fn seal(prev: &str, seq: u64, event: Value) -> (String, String) {
    let mut map = match event {
        Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            m.insert("event".to_owned(), other);
            m
        }
    };
    map.insert("type".to_owned(), Value::from(RECORD_TYPE));
    map.insert("seq".to_owned(), Value::from(seq));
    map.insert("prev".to_owned(), Value::from(prev));
    let body = Value::Object(map).to_string();
    let hash = sha256_hex(body.as_bytes());
    // The object is non-empty, so it ends in `}`: the hash field goes just before it.
    let line = format!("{}{HASH_FIELD}{hash}\"}}", &body[..body.len() - 1]);
    (line, hash)
}

/// Starts the writer thread on the target `open` returns there, waiting until it is open: a misconfigured
/// destination fails the start.
fn spawn_writer(
    open: impl FnOnce() -> anyhow::Result<Target> + Send + 'static,
    rx: mpsc::Receiver<Msg>,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("kmsgate-audit".to_owned())
        .spawn(move || match open() {
            Ok(target) => {
                let _ = ready_tx.send(Ok(()));
                writer(target, rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the audit writer: {e}"))?;
    ready_rx.recv().map_err(|_| anyhow::anyhow!("the audit writer stopped while starting"))?
}

/// A small pool of the writer's own: one connection appends, batches queue behind it.
fn open_store(url: &str) -> anyhow::Result<Target> {
    // An in-memory SQLite database is private to its connection: the records would go nowhere anyone can read.
    if url.trim().split('?').next().is_some_and(|u| u.ends_with(":memory:")) {
        anyhow::bail!("audit.destination = \"store\" needs a persistent store, not an in-memory database");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the audit writer's runtime: {e}"))?;
    let store = rt
        .block_on(SqlStore::open_with(url, StoreOptions::default().max_connections(1)))
        .map_err(|e| anyhow::anyhow!("cannot open the store for the audit log: {}", e.message()))?;
    Ok(Target::Store(rt, store))
}

/// A failed append wrote nothing (one transaction), so it is retried a few times (a failover, a restart of the
/// database) before the batch is given up; records arriving meanwhile queue in the channel.
fn append_to_store(rt: &tokio::runtime::Runtime, store: &SqlStore, records: Vec<Value>) -> std::io::Result<()> {
    const ATTEMPTS: u32 = 6;
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        match rt.block_on(store.audit_append(GENESIS, records.clone(), |seq, prev, v| seal(prev, seq, v))) {
            Ok(_) => return Ok(()),
            Err(e) if attempt == ATTEMPTS => return Err(std::io::Error::other(e.message().to_owned())),
            Err(e) => {
                tracing::warn!(target: "audit", error = %e.message(), attempt, "cannot append to the audit log; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    Ok(())
}

fn writer(target: Target, rx: mpsc::Receiver<Msg>) {
    // The stdout chain lives in memory: it starts afresh with each process.
    let mut stdout_head = (0u64, GENESIS.to_owned());
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        let mut records = Vec::new();
        let mut acks = Vec::new();
        for m in batch {
            match m {
                Msg::Record(v) => records.push(v),
                Msg::Flush(ack) => acks.push(ack),
            }
        }
        if !records.is_empty() {
            let written = match &target {
                Target::File(f) => append_to_file(f, records),
                Target::Stdout => append_to_stdout(&mut stdout_head, records),
                Target::Store(rt, store) => append_to_store(rt, store, records),
            };
            if let Err(e) = written {
                tracing::error!(target: "audit", error = %e, "cannot write the audit log: records are lost");
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

fn append_to_stdout(head: &mut (u64, String), records: Vec<Value>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in records {
        let (line, hash) = seal(&head.1, head.0 + 1, r);
        writeln!(out, "{line}")?;
        *head = (head.0 + 1, hash);
    }
    out.flush()
}

fn append_to_file(f: &File, records: Vec<Value>) -> std::io::Result<()> {
    // Another process (the CLI, another server on the same file) may append too: hold the lock across reading
    // the chain's head and writing after it.
    f.lock()?;
    let result = (|| {
        let (mut seq, mut prev) = file_head(f)?;
        let mut buf = String::new();
        for r in records {
            seq += 1;
            let (line, hash) = seal(&prev, seq, r);
            buf.push_str(&line);
            buf.push('\n');
            prev = hash;
        }
        let mut w = f;
        w.write_all(buf.as_bytes())?;
        f.sync_data()
    })();
    let _ = f.unlock();
    result
}

/// The last record's sequence number and hash (0 and the genesis value for an empty file). A partial last line
/// (a crash in the middle of a write) is cut off: it was never acknowledged to anyone.
fn file_head(f: &File) -> std::io::Result<(u64, String)> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    let window = len.min(256 * 1024);
    let mut r = f;
    r.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(usize::try_from(window).unwrap_or(0));
    r.take(window).read_to_end(&mut tail)?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < tail.len() {
        f.set_len(len - (tail.len() - complete) as u64)?;
        tracing::warn!(target: "audit", "cut off a partial record at the end of the audit log");
    }
    let lines = &tail[..complete];
    let last = lines.strip_suffix(b"\n").unwrap_or(lines);
    let last = last.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    if last.is_empty() {
        return Ok((0, GENESIS.to_owned()));
    }
    let v: Value = serde_json::from_slice(last).map_err(|e| {
        std::io::Error::other(format!("the audit log's last line is not a record ({e}); refusing to append to it"))
    })?;
    match (v.get("seq").and_then(Value::as_u64), v.get("hash").and_then(Value::as_str)) {
        (Some(seq), Some(hash)) => Ok((seq, hash.to_owned())),
        _ => Err(std::io::Error::other("the audit log's last line is not a record; refusing to append to it")),
    }
}

/// What `kmsgate audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// Chains in the input: 1 for a file; one per process start for a captured stdout.
    pub chains: u64,
    /// Lines that are not audit records (only with `mixed`).
    pub other_lines: u64,
    /// The last record's sequence number and hash: compare with a copy kept elsewhere to detect truncation.
    pub head: Option<(u64, String)>,
}

/// Checks every record of `input`: its hash, and that it follows the previous record. `mixed` accepts lines
/// that are not audit records (logs interleaved on stdout); otherwise every line must be a record.
pub fn verify(input: impl BufRead, mixed: bool) -> Result<Verified, String> {
    let mut out = Verified { records: 0, chains: 0, other_lines: 0, head: None };
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| format!("line {n}: cannot read: {e}"))?;
        let parsed: Option<Value> = serde_json::from_str(&line).ok();
        let is_record = parsed.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str) == Some(RECORD_TYPE);
        let Some(v) = parsed.filter(|_| is_record) else {
            if mixed {
                out.other_lines += 1;
                continue;
            }
            return Err(format!("line {n}: not an audit record"));
        };
        check_record(&mut out, &line, &v).map_err(|e| format!("line {n}: {e}"))?;
    }
    Ok(out)
}

/// Checks one parsed record `v` (its text `line`) against the chain so far and makes it the head.
fn check_record(out: &mut Verified, line: &str, v: &Value) -> Result<(), String> {
    let (Some(seq), Some(prev), Some(hash)) = (
        v.get("seq").and_then(Value::as_u64),
        v.get("prev").and_then(Value::as_str),
        v.get("hash").and_then(Value::as_str),
    ) else {
        return Err("the record lacks seq, prev or hash".to_owned());
    };
    let Some(at) = line.rfind(HASH_FIELD) else {
        return Err("the record lacks its hash".to_owned());
    };
    let body = format!("{}}}", &line[..at]);
    if sha256_hex(body.as_bytes()) != hash || line[at..] != format!("{HASH_FIELD}{hash}\"}}") {
        return Err(format!("record {seq} was altered (its hash does not match its content)"));
    }
    match &out.head {
        _ if seq == 1 && prev == GENESIS => out.chains += 1,
        Some((last_seq, last_hash)) if seq == last_seq + 1 && prev == last_hash => {}
        Some((last_seq, _)) => {
            return Err(format!(
                "record {seq} does not follow record {last_seq}: records were removed, reordered or inserted"
            ));
        }
        None => return Err(format!("the log starts at record {seq}, not at the start of a chain")),
    }
    out.records += 1;
    out.head = Some((seq, hash.to_owned()));
    Ok(())
}

/// Verifies the store's `audit_log` table: one chain, its rows numbered 1, 2, ... without gaps, each row's
/// `seq` and `hash` columns those of its record. An error names the first bad row (`seq N: ...`).
pub async fn verify_store(store: &SqlStore) -> anyhow::Result<Verified> {
    const PAGE: u32 = 1000;
    let mut out = Verified { records: 0, chains: 0, other_lines: 0, head: None };
    let mut after = 0u64;
    loop {
        let rows = store
            .audit_rows(after, PAGE)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the audit_log table: {}", e.message()))?;
        if rows.is_empty() {
            return Ok(out);
        }
        for row in rows {
            let expected = after + 1;
            if row.seq != expected {
                anyhow::bail!("seq {expected}: the record is missing: records were removed");
            }
            let v: Value = serde_json::from_str(&row.record)
                .ok()
                .filter(|v: &Value| v.get("type").and_then(Value::as_str) == Some(RECORD_TYPE))
                .ok_or_else(|| anyhow::anyhow!("seq {expected}: not an audit record"))?;
            check_record(&mut out, &row.record, &v).map_err(|e| anyhow::anyhow!("seq {expected}: {e}"))?;
            if out.head.as_ref() != Some(&(row.seq, row.hash.clone())) || out.chains != 1 {
                anyhow::bail!(
                    "seq {expected}: the row's seq or hash column differs from its record: records were moved or \
                     replaced"
                );
            }
            after = row.seq;
        }
    }
}

/// Verifies a file.
pub fn verify_file(path: &Path, mixed: bool) -> anyhow::Result<Verified> {
    let f = File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    verify(std::io::BufReader::new(f), mixed).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|i| {
                let (line, hash) =
                    seal(&prev, i, serde_json::json!({"operation": "Encrypt", "resource": "k\",\"hash\":\"x"}));
                prev = hash;
                line
            })
            .collect()
    }

    fn check(lines: &[String], mixed: bool) -> Result<Verified, String> {
        verify(std::io::Cursor::new(lines.join("\n")), mixed)
    }

    #[test]
    fn a_sealed_chain_verifies_and_edits_do_not() {
        let lines = chain(4);
        let v = check(&lines, false).unwrap();
        assert_eq!((v.records, v.chains), (4, 1));
        assert_eq!(v.head.unwrap().0, 4);

        let mut edited = lines.clone();
        edited[1] = edited[1].replace("Encrypt", "Decrypt");
        assert!(check(&edited, false).unwrap_err().contains("line 2: record 2 was altered"));

        let mut removed = lines.clone();
        removed.remove(2);
        assert!(check(&removed, false).unwrap_err().contains("does not follow"));

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert!(check(&swapped, false).is_err());

        assert!(check(&lines[1..], false).unwrap_err().contains("not at the start"));
    }

    #[test]
    fn mixed_input_skips_other_lines_and_counts_restarts() {
        let mut lines = vec!["{\"level\":\"INFO\",\"message\":\"hello\"}".to_owned()];
        lines.extend(chain(2));
        lines.push("kmsgate 0.1.0 running".to_owned());
        lines.extend(chain(3));
        assert!(check(&lines, false).unwrap_err().contains("not an audit record"));
        let v = check(&lines, true).unwrap();
        assert_eq!((v.records, v.chains, v.other_lines), (5, 2, 2));
    }

    #[test]
    fn the_file_chain_continues_across_writers_and_cuts_a_partial_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let open = || OpenOptions::new().read(true).append(true).create(true).open(&path).unwrap();
        append_to_file(&open(), vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]).unwrap();
        append_to_file(&open(), vec![serde_json::json!({"n": 3})]).unwrap();
        // A crash in the middle of a write leaves a partial line; the next writer cuts it and goes on.
        open().write_all(b"{\"type\":\"kmsgate.au").unwrap();
        append_to_file(&open(), vec![serde_json::json!({"n": 4})]).unwrap();
        let v = verify_file(&path, false).unwrap();
        assert_eq!((v.records, v.chains), (4, 1));
    }

    /// The store destination on SQLite: the sink's writer appends, `verify_store` accepts the chain and names
    /// the first bad row after an edit or a removal (PostgreSQL and several replicas: tests/audit_store.rs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_chain_verifies_and_names_the_first_bad_row() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kms.db").display());
        let sink = ChainSink::open(Destination::Store(url.clone())).unwrap();
        for n in 1..=5 {
            sink.tx.lock().unwrap().send(Msg::Record(serde_json::json!({"operation": "Encrypt", "n": n}))).unwrap();
        }
        sink.flush(Duration::from_secs(10));
        let store = SqlStore::open(&url).await.unwrap();
        let v = verify_store(&store).await.unwrap();
        assert_eq!((v.records, v.chains, v.head.unwrap().0), (5, 1, 5));

        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("UPDATE audit_log SET record = replace(record, 'Encrypt', 'Decrypt') WHERE seq = 3")
            .execute(&pool)
            .await
            .unwrap();
        let err = verify_store(&store).await.unwrap_err().to_string();
        assert!(err.starts_with("seq 3: record 3 was altered"), "{err}");
        sqlx::query("DELETE FROM audit_log WHERE seq = 3").execute(&pool).await.unwrap();
        let err = verify_store(&store).await.unwrap_err().to_string();
        assert!(err.starts_with("seq 3: the record is missing"), "{err}");
    }

    #[test]
    fn an_in_memory_store_is_refused() {
        let err = ChainSink::open(Destination::Store("sqlite::memory:".to_owned())).unwrap_err().to_string();
        assert!(err.contains("persistent store"), "{err}");
    }
}
