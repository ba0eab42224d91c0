//! AES-256-GCM encryptions per second through [`Pkcs11Backend`] with 1 and N sessions, next to raw cryptoki on one
//! session, so the gateway's overhead over the HSM can be stated as a ratio.
//!
//! ```sh
//! cargo run -p kmsgate-hsm --example p11_bench --release -- [--secs 3] [--sessions 4] [--concurrency 16]
//! ```
//!
//! Without `SOFTHSM2_CONF` it creates a throwaway SoftHSM token in a temp directory (`softhsm2-util` must be on
//! the PATH) and runs itself again with it. To measure another token: set `SOFTHSM2_CONF` (for SoftHSM),
//! `KMSGATE_BENCH_MODULE`, `KMSGATE_BENCH_TOKEN` and `KMSGATE_BENCH_PIN_FILE`. The benchmark leaves one AES key on
//! the token per run, labelled `kmsgate:p11-bench:...`, and destroys it at the end.

use std::error::Error;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kmsgate_core::{KeyBackend, KeyId, KeyMaterialRef, KeySpec};
use kmsgate_hsm::cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use kmsgate_hsm::cryptoki::error::{Error as P11Error, RvError};
use kmsgate_hsm::cryptoki::mechanism::Mechanism;
use kmsgate_hsm::cryptoki::mechanism::aead::GcmParams;
use kmsgate_hsm::cryptoki::object::Attribute;
use kmsgate_hsm::cryptoki::session::UserType;
use kmsgate_hsm::cryptoki::types::AuthPin;
use kmsgate_hsm::{Pkcs11Backend, Pkcs11Config};
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn Error>>;

const PLAINTEXT: [u8; 32] = [0x42; 32];
const AAD: [u8; 32] = [0x17; 32];

struct Options {
    secs: u64,
    sessions: usize,
    concurrency: usize,
}

fn options() -> Res<Options> {
    let mut o = Options { secs: 3, sessions: 4, concurrency: 0 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--secs" => o.secs = value.parse()?,
            "--sessions" => o.sessions = value.parse()?,
            "--concurrency" => o.concurrency = value.parse()?,
            _ => return Err(format!("unknown option {flag} (--secs, --sessions, --concurrency)").into()),
        }
    }
    if o.concurrency == 0 {
        o.concurrency = 4 * o.sessions;
    }
    Ok(o)
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Creates a throwaway token and runs this program again with it (the environment of a running process cannot
/// be changed safely, and SoftHSM reads `SOFTHSM2_CONF` when it initialises).
fn rerun_with_throwaway_token() -> Res<std::process::ExitStatus> {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )?;
    let pin_file = dir.path().join("user.pin");
    std::fs::write(&pin_file, "135791\n")?;
    let init = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", "bench", "--so-pin", "864200", "--pin", "135791"])
        .output()?;
    if !init.status.success() {
        return Err(format!("softhsm2-util --init-token failed: {}", String::from_utf8_lossy(&init.stderr)).into());
    }
    Ok(Command::new(std::env::current_exe()?)
        .args(std::env::args().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env("KMSGATE_BENCH_TOKEN", "bench")
        .env("KMSGATE_BENCH_PIN_FILE", &pin_file)
        .status()?)
}

/// Raw cryptoki on one session in a tight loop: the HSM's own rate, the baseline of the ratio.
fn raw(module: &str, token: &str, pin: &str, secs: u64) -> Res<f64> {
    let pkcs11 = Pkcs11::new(module)?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let slot = pkcs11
        .get_slots_with_token()?
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label().trim_end() == token))
        .ok_or("token not found")?;
    let session = pkcs11.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(e.into()),
    }
    // The same kind of key the backend creates (a private, sensitive token object: SoftHSM decrypts its value
    // from the token's store at every C_EncryptInit), or the ratio would compare different work.
    let key = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Label(b"kmsgate:p11-bench:raw".to_vec()),
            Attribute::ValueLen(32u64.into()),
            Attribute::Encrypt(true),
        ],
    )?;
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut ops = 0u64;
    let mut iv = [0u8; 12];
    while Instant::now() < until {
        iv[..8].copy_from_slice(&ops.to_be_bytes());
        let mut this_iv = iv;
        let params = GcmParams::new(&mut this_iv, &AAD, 128u64.into())?;
        session.encrypt(&Mechanism::AesGcm(params), key, &PLAINTEXT)?;
        ops += 1;
    }
    let rate = ops as f64 / started.elapsed().as_secs_f64();
    session.destroy_object(key)?;
    // The library stays initialised: the backend below shares it (C_Finalize would pull it from under it).
    Ok(rate)
}

/// `concurrency` async callers hammering one backend for `secs`: ops/s and mean latency.
async fn through_backend(backend: Arc<Pkcs11Backend>, secs: u64, concurrency: usize) -> Res<(f64, Duration)> {
    let id = KeyId::parse("p11-bench")?;
    let version = Uuid::new_v4();
    let handle = backend.generate(&id, version, KeySpec::Aes256, KeySpec::Aes256.default_usages()).await?;
    let handle = Arc::new(handle);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let busy_nanos = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let (backend, handle, stop, ops, busy, errors, id) = (
            backend.clone(),
            handle.clone(),
            stop.clone(),
            ops.clone(),
            busy_nanos.clone(),
            errors.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let key = KeyMaterialRef { key_id: &id, version, spec: KeySpec::Aes256, handle: &handle };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut iv = [0u8; 12];
                iv[..4].copy_from_slice(&(task as u32).to_be_bytes());
                iv[4..].copy_from_slice(&n.to_be_bytes());
                let t = Instant::now();
                match backend.aes_gcm_encrypt(key, &iv, &AAD, &PLAINTEXT).await {
                    Ok(_) => {
                        ops.fetch_add(1, Ordering::Relaxed);
                        busy.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    let done = ops.load(Ordering::Relaxed);
    backend.destroy(KeyMaterialRef { key_id: &id, version, spec: KeySpec::Aes256, handle: &handle }).await?;
    if errors.load(Ordering::Relaxed) > 0 {
        eprintln!("  ({} calls failed)", errors.load(Ordering::Relaxed));
    }
    let mean = Duration::from_nanos(busy_nanos.load(Ordering::Relaxed) / done.max(1));
    Ok((done as f64 / elapsed.as_secs_f64(), mean))
}

fn main() -> Res<()> {
    let o = options()?;
    if var("SOFTHSM2_CONF").is_none() && var("KMSGATE_BENCH_PIN_FILE").is_none() {
        let status = rerun_with_throwaway_token()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let module = var("KMSGATE_BENCH_MODULE").unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".to_owned());
    let token = var("KMSGATE_BENCH_TOKEN").ok_or("set KMSGATE_BENCH_TOKEN (or unset SOFTHSM2_CONF)")?;
    let pin_file = PathBuf::from(var("KMSGATE_BENCH_PIN_FILE").ok_or("set KMSGATE_BENCH_PIN_FILE")?);
    let pin = std::fs::read_to_string(&pin_file)?.lines().next().unwrap_or_default().to_owned();
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    println!(
        "AES-256-GCM encrypt, 32-byte plaintext, 32-byte AAD, {}s per row, {profile} build, {} CPUs",
        o.secs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    let raw_rate = raw(&module, &token, &pin, o.secs)?;
    println!("{:<34} {:>10.0} ops/s", "raw cryptoki, 1 session, 1 thread", raw_rate);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        for (sessions, concurrency) in [(1, 1), (1, o.concurrency), (o.sessions, o.concurrency)] {
            let mut config = Pkcs11Config::new(format!("bench-{sessions}"), &module, &token);
            config.pin_file = Some(pin_file.clone());
            config.sessions = sessions;
            config.queue = concurrency.max(16);
            config.deadline_ms = 5_000;
            let backend = Arc::new(Pkcs11Backend::start(config).await?);
            let (rate, mean) = through_backend(backend, o.secs, concurrency).await?;
            println!(
                "{:<34} {:>10.0} ops/s  mean latency {:>7.1} µs  {:.2}× raw",
                format!("backend, {sessions} session(s), {concurrency} callers"),
                rate,
                mean.as_secs_f64() * 1e6,
                rate / raw_rate
            );
        }
        Ok::<(), Box<dyn Error>>(())
    })?;
    Ok(())
}
