//! The session pool of one fleet member: worker threads each owning one logged-in session, a bounded job
//! queue between async callers and those threads, and a supervisor thread that probes the token and recovers
//! from module or token failures.
//!
//! ```text
//!  async caller ──try_send──▶ [bounded queue] ──recv──▶ worker thread (owns 1 Session) ──▶ PKCS#11 module
//!       ▲                                                   │ fault?
//!       └────────── oneshot reply (under a deadline) ◀──────┘──────▶ supervisor: evict / re-attach / re-init
//! ```
//!
//! PKCS#11 calls never run on async workers: `Session` is `Send + !Sync` and its calls block for as long as the
//! HSM takes, so each session lives on one dedicated OS thread for its whole life.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::AuthPin;
use kmsgate_core::{Error, ErrorKind, HealthStatus, KeyId, KeySpec, Result};
use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::config::Pkcs11Config;
use super::locator::{Locator, LocatorKind, label_for};
use super::module::Module;
use super::{PublicKey, lock};

/// Object handles cached per member (each entry is one key version).
const OBJECT_CACHE_CAPACITY: u64 = 100_000;
/// First back-off step of recovery; it doubles up to `retry_max_ms`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Failed attempts to find the token again, while other members keep the shared module busy, after which
/// the module is re-initialised anyway (some modules, SoftHSM among them, only see a returning token then).
const ESCALATE_AFTER: u32 = 8;

fn next_member_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub(crate) type P11Result<T> = std::result::Result<T, P11Error>;

/// A key version as a job needs it: owned, because jobs outlive the caller's borrow when the caller gives up.
/// Also the key of the object cache, so a handle presented under another identity never hits an entry that
/// was checked for its rightful owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OwnedKey {
    pub(crate) key_id: KeyId,
    pub(crate) version: Uuid,
    pub(crate) spec: KeySpec,
    pub(crate) handle: Vec<u8>,
}

/// The token objects of one key version, valid in one module generation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Objects {
    /// The secret key, or the private half of a key pair.
    pub(crate) key: ObjectHandle,
    /// The public half, when the token has one with the same locator.
    pub(crate) public: Option<ObjectHandle>,
    generation: u64,
}

/// What a PKCS#11 call was doing: errors mean different things in different places (a `CKR_GENERAL_ERROR` from
/// `C_Decrypt` under AES-GCM is SoftHSM's tag mismatch; elsewhere it is a device problem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Open,
    Find,
    Generate,
    Create,
    Destroy,
    Encrypt,
    GcmDecrypt,
    /// AES-CBC/ECB decryption: bad padding or a partial block is the caller's ciphertext, not a fault.
    BlockDecrypt,
    RsaDecrypt,
    Sign,
    Attributes,
    Random,
    Admin,
}

impl Op {
    /// Whether a call may be repeated on a fresh session after the first session died under it. Creating
    /// objects is not: the first attempt may have created one before the session failed.
    fn idempotent(self) -> bool {
        !matches!(self, Op::Generate | Op::Create)
    }
}

/// How bad a failure was, in increasing order; the worker acts on the worst one a job saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// Ambiguous (`CKR_GENERAL_ERROR` outside decryption): drop the session and have the token probed.
    Probe,
    /// The session is dead or unusable: drop it, the next job opens a new one.
    Session,
    /// Login state or PIN trouble: drop the session and log in again through the supervisor.
    Attach,
    /// The module or token failed: re-initialise the module.
    Module,
}

fn unavailable() -> Error {
    Error::new(ErrorKind::DependencyFailure, "the HSM is unavailable; retry later")
}

/// Maps a cryptoki error to the fault it reveals and the core error the caller sees. Messages are safe to show
/// clients; the token's own error text goes to the source (logs only).
pub(crate) fn classify(e: &P11Error, op: Op) -> (Option<Fault>, Error) {
    use RvError::*;
    let rv = match e {
        P11Error::Pkcs11(rv, function) => (*rv, *function),
        P11Error::LibraryLoading(_) | P11Error::NullFunctionPointer | P11Error::MissingSymbol(_) => {
            return (Some(Fault::Module), unavailable());
        }
        P11Error::TryFromInt(_) | P11Error::TryFromSlice(_) => {
            return (None, Error::invalid("an input is too large for the HSM interface"));
        }
        _ => return (None, Error::new(ErrorKind::DependencyFailure, "the HSM returned an unexpected result")),
    };
    let decrypting = matches!(rv.1, Function::Decrypt);
    match (op, rv.0) {
        // SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR from C_Decrypt; the session stays usable.
        (
            Op::GcmDecrypt | Op::BlockDecrypt | Op::RsaDecrypt,
            GeneralError | EncryptedDataInvalid | EncryptedDataLenRange | DataInvalid | DataLenRange,
        ) if decrypting => (None, Error::invalid_ciphertext()),
        (
            _,
            CryptokiNotInitialized
            | DeviceError
            | DeviceRemoved
            | TokenNotPresent
            | TokenNotRecognized
            | SlotIdInvalid
            | LibraryLoadFailed
            | FipsSelfTestFailed,
        ) => (Some(Fault::Module), unavailable()),
        (_, SessionHandleInvalid | SessionClosed | OperationActive | OperationNotInitialized | CantLock) => {
            (Some(Fault::Session), Error::new(ErrorKind::DependencyFailure, "the HSM session failed; retry"))
        }
        (
            _,
            UserNotLoggedIn
            | PinIncorrect
            | PinInvalid
            | PinLenRange
            | PinExpired
            | PinLocked
            | UserAnotherAlreadyLoggedIn
            | UserPinNotInitialized,
        ) => (Some(Fault::Attach), Error::new(ErrorKind::DependencyFailure, "the HSM login failed; retry later")),
        (_, GeneralError | FunctionFailed | DeviceMemory | HostMemory) => {
            (Some(Fault::Probe), Error::new(ErrorKind::DependencyFailure, "the HSM failed to perform the operation"))
        }
        (_, SessionCount) => (None, Error::new(ErrorKind::DependencyFailure, "the HSM has no free session")),
        (_, KeyFunctionNotPermitted | KeyTypeInconsistent) => {
            (None, Error::new(ErrorKind::InvalidKeyUsage, "the HSM key does not permit this operation"))
        }
        (_, MechanismInvalid | MechanismParamInvalid | FunctionNotSupported | ArgumentsBad) => {
            (None, Error::new(ErrorKind::Unsupported, "the HSM does not support this operation"))
        }
        (_, ObjectHandleInvalid | KeyHandleInvalid) => (None, missing_object()),
        (_, DataLenRange | DataInvalid) => (None, Error::invalid("the HSM rejected the size or form of the input")),
        _ => (None, Error::new(ErrorKind::DependencyFailure, "the HSM rejected the operation")),
    }
}

fn missing_object() -> Error {
    Error::new(ErrorKind::DependencyFailure, "the HSM holds no key object for this key version")
}

fn is_stale_handle(e: &P11Error) -> bool {
    matches!(e, P11Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _))
}

fn is_session_fault(e: &P11Error) -> bool {
    matches!(classify(e, Op::Admin).0, Some(Fault::Session | Fault::Attach))
}

// ---- shared state of a member ---------------------------------------------------------------------------

/// Where the member's token was found in one module generation.
#[derive(Debug, Clone)]
pub(crate) struct Attachment {
    pub(crate) generation: u64,
    pub(crate) slot: Slot,
    pub(crate) token: TokenSummary,
}

/// What the token says about itself (`C_GetTokenInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSummary {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
}

impl TokenSummary {
    pub(crate) fn of(info: &TokenInfo) -> Self {
        TokenSummary {
            label: info.label().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
            model: info.model().trim_end().to_owned(),
            serial: info.serial_number().trim_end().to_owned(),
            firmware: format!("{}.{}", info.firmware_version().major(), info.firmware_version().minor()),
        }
    }

    /// The model string of health reports, e.g. `SoftHSM v2 (firmware 2.6, SoftHSM project)`.
    pub(crate) fn model_string(&self) -> String {
        format!("{} (firmware {}, {})", self.model, self.firmware, self.manufacturer)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) waiting: AtomicUsize,
    pub(crate) in_use: AtomicUsize,
    pub(crate) open: AtomicUsize,
    pub(crate) opened: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) recoveries: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) abandoned: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    Nothing,
    Probe,
    Attach,
    Reinit,
}

#[derive(Debug, Clone, Copy)]
struct Signal {
    need: Need,
    /// The module generation the need was observed in.
    seen: u64,
}

/// Whether the token does OAEP with SHA-256 itself; learnt on first use.
pub(crate) const OAEP_UNKNOWN: u8 = 0;
pub(crate) const OAEP_NATIVE: u8 = 1;
pub(crate) const OAEP_RAW: u8 = 2;

pub(crate) struct Member {
    id: u64,
    pub(crate) config: Pkcs11Config,
    pub(crate) module: Arc<Module>,
    attachment: Mutex<Option<Attachment>>,
    pin: Mutex<Option<Zeroizing<String>>>,
    /// SHA-256 of a PIN the token rejected: never presented again (real HSMs lock the token after a few wrong
    /// PINs), until the PIN source yields another value.
    rejected_pin: Mutex<Option<[u8; 32]>>,
    pub(crate) objects: moka::sync::Cache<OwnedKey, Objects>,
    pub(crate) public_keys: moka::sync::Cache<OwnedKey, Arc<PublicKey>>,
    pub(crate) stats: Stats,
    /// Per worker: its last attempt to open a session failed.
    failing: Vec<AtomicBool>,
    health: Mutex<(HealthStatus, String)>,
    signal: Mutex<Signal>,
    wake: Condvar,
    pub(crate) shutdown: AtomicBool,
    pub(crate) oaep: AtomicU8,
    /// A sender the supervisor uses to pre-warm sessions after recovery; `None` once the backend is dropped, so
    /// the queue disconnects and the workers exit.
    warm_tx: Mutex<Option<SyncSender<Box<dyn Job>>>>,
    pub(crate) probing: AtomicBool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("name", &self.config.name).field("module", &self.module).finish_non_exhaustive()
    }
}

fn pin_digest(pin: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, pin.as_bytes()).as_ref());
    out
}

/// Why attaching to the token failed.
enum AttachError {
    /// The token rejected the PIN: do not retry it.
    Pin(String),
    Other(String),
}

fn find_slot(pkcs11: &Pkcs11, label: &str) -> std::result::Result<(Slot, TokenInfo), String> {
    let slots = pkcs11.get_slots_with_token().map_err(|e| format!("C_GetSlotList failed: {e}"))?;
    let mut found = Vec::new();
    let mut others = Vec::new();
    for slot in slots {
        // A slot whose token cannot be read is skipped; if it was ours, "not found" says enough.
        if let Ok(info) = pkcs11.get_token_info(slot) {
            if info.label().trim_end() == label {
                found.push((slot, info));
            } else if info.token_initialized() {
                others.push(info.label().trim_end().to_owned());
            }
        }
    }
    match found.len() {
        1 => found.pop().ok_or_else(|| "no token".to_owned()),
        0 => Err(format!("no token labelled {label:?} (tokens present: {others:?})")),
        n => Err(format!("{n} tokens are labelled {label:?}; token labels must be unique")),
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.module.forget_member(self.id);
    }
}

impl Member {
    pub(crate) fn new(config: Pkcs11Config, module: Arc<Module>) -> Self {
        let failing = (0..config.sessions).map(|_| AtomicBool::new(false)).collect();
        Member {
            id: next_member_id(),
            module,
            attachment: Mutex::new(None),
            pin: Mutex::new(None),
            rejected_pin: Mutex::new(None),
            objects: moka::sync::Cache::builder().max_capacity(OBJECT_CACHE_CAPACITY).build(),
            public_keys: moka::sync::Cache::builder().max_capacity(OBJECT_CACHE_CAPACITY).build(),
            stats: Stats::default(),
            failing,
            health: Mutex::new((HealthStatus::Unavailable, "starting".to_owned())),
            signal: Mutex::new(Signal { need: Need::Nothing, seen: 0 }),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            oaep: AtomicU8::new(OAEP_UNKNOWN),
            warm_tx: Mutex::new(None),
            probing: AtomicBool::new(false),
            config,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// The token's slot in `generation`, if the member is attached in it. Only the slot is copied: this runs
    /// for every call.
    pub(crate) fn attached_slot(&self, generation: u64) -> Option<Slot> {
        lock(&self.attachment).as_ref().filter(|a| a.generation == generation).map(|a| a.slot)
    }

    pub(crate) fn last_attachment(&self) -> Option<Attachment> {
        lock(&self.attachment).clone()
    }

    pub(crate) fn health(&self) -> (HealthStatus, String) {
        lock(&self.health).clone()
    }

    fn set_health(&self, status: HealthStatus, detail: impl Into<String>) {
        let detail = detail.into();
        self.module.set_member_serving(self.id, status != HealthStatus::Unavailable);
        let mut h = lock(&self.health);
        if h.0 != status {
            match status {
                HealthStatus::Active => tracing::info!(backend = %self.name(), "HSM member is active"),
                _ => {
                    tracing::warn!(backend = %self.name(), status = ?status, detail = %detail, "HSM member is not active")
                }
            }
        }
        *h = (status, detail);
    }

    /// Asks the supervisor for something; the worst pending need wins.
    fn request(&self, need: Need, seen: u64) {
        let mut s = lock(&self.signal);
        if need > s.need {
            *s = Signal { need, seen };
        }
        self.wake.notify_all();
    }

    pub(crate) fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        *lock(&self.warm_tx) = None;
        let _guard = lock(&self.signal);
        self.wake.notify_all();
    }

    pub(crate) fn set_warm_sender(&self, tx: SyncSender<Box<dyn Job>>) {
        *lock(&self.warm_tx) = Some(tx);
    }

    fn pin(&self) -> Option<Zeroizing<String>> {
        lock(&self.pin).clone()
    }

    pub(crate) fn failing_sessions(&self) -> usize {
        self.failing.iter().filter(|f| f.load(Ordering::Relaxed)).count()
    }

    /// Finds the token, checks the PIN with a login and records where the token is, for `generation`.
    fn attach(&self, generation: u64) -> std::result::Result<(), AttachError> {
        let state = self.module.read();
        if state.generation != generation {
            return Err(AttachError::Other("the module was re-initialised meanwhile".to_owned()));
        }
        if !state.initialized {
            return Err(AttachError::Other(
                state.error.clone().unwrap_or_else(|| "the module is not initialised".to_owned()),
            ));
        }
        let (slot, info) = find_slot(&state.pkcs11, &self.config.token_label).map_err(AttachError::Other)?;
        let pin = self.config.read_pin().map_err(|e| AttachError::Other(e.message().to_owned()))?;
        let digest = pin_digest(&pin);
        if *lock(&self.rejected_pin) == Some(digest) {
            return Err(AttachError::Pin(
                "the token rejected this PIN before; it is not tried again until pin_file or pin_env changes"
                    .to_owned(),
            ));
        }
        let session =
            state.pkcs11.open_rw_session(slot).map_err(|e| AttachError::Other(format!("C_OpenSession failed: {e}")))?;
        match session.login(UserType::User, Some(&AuthPin::new(pin.as_str().into()))) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked),
                _,
            )) => {
                *lock(&self.rejected_pin) = Some(digest);
                return Err(AttachError::Pin(format!("the token rejected the PIN ({rv})")));
            }
            Err(e) => return Err(AttachError::Other(format!("C_Login failed: {e}"))),
        }
        *lock(&self.pin) = Some(pin);
        *lock(&self.attachment) = Some(Attachment { generation, slot, token: TokenSummary::of(&info) });
        // Closing this session may log the application out again (the last session closed); each worker
        // session logs in when it opens, so nothing depends on this login lasting.
        drop(session);
        drop(state);
        self.set_health(HealthStatus::Active, "");
        Ok(())
    }

    /// A real probe of the token (`C_GetTokenInfo`, no session needed), run on the calling thread.
    pub(crate) fn probe(&self) -> (HealthStatus, String) {
        let state = self.module.read();
        if !state.initialized {
            let detail = state.error.clone().unwrap_or_else(|| "the module is not initialised".to_owned());
            let generation = state.generation;
            drop(state);
            self.request(Need::Reinit, generation);
            return (HealthStatus::Unavailable, detail);
        }
        let generation = state.generation;
        let Some(slot) = self.attached_slot(generation) else {
            drop(state);
            self.request(Need::Attach, generation);
            let (status, detail) = self.health();
            let detail = if status == HealthStatus::Unavailable && !detail.is_empty() {
                detail
            } else {
                "connecting to the token".to_owned()
            };
            return (HealthStatus::Unavailable, detail);
        };
        let probed = state.pkcs11.get_token_info(slot);
        drop(state);
        let result = match probed {
            Ok(info) if info.label().trim_end() == self.config.token_label => {
                let failing = self.failing_sessions();
                let size = self.config.sessions;
                if failing == 0 {
                    (HealthStatus::Active, String::new())
                } else if failing < size {
                    (HealthStatus::Degraded, format!("{failing} of {size} sessions cannot be opened"))
                } else {
                    (HealthStatus::Unavailable, "no session can be opened on the token".to_owned())
                }
            }
            Ok(info) => {
                self.request(Need::Reinit, generation);
                (HealthStatus::Unavailable, format!("the slot now holds token {:?}", info.label().trim_end()))
            }
            Err(e) => {
                self.request(Need::Reinit, generation);
                (HealthStatus::Unavailable, format!("token probe failed: {e}"))
            }
        };
        self.set_health(result.0, result.1.clone());
        result
    }

    /// Waits for a need or the probe interval; `None` once shut down.
    fn next_signal(&self) -> Option<Signal> {
        let interval = Duration::from_millis(self.config.probe_interval_ms);
        let mut s = lock(&self.signal);
        if s.need == Need::Nothing && !self.shutdown.load(Ordering::SeqCst) {
            s = self.wake.wait_timeout(s, interval).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        if self.shutdown.load(Ordering::SeqCst) {
            return None;
        }
        let signal = *s;
        *s = Signal { need: Need::Nothing, seen: 0 };
        Some(signal)
    }

    /// Sleeps `d` unless shut down meanwhile; returns whether to go on.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut s = lock(&self.signal);
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            s = self.wake.wait_timeout(s, until - now).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Brings the member back: find the token again and log in; re-initialise the module first when asked
    /// (`reinit`) and no other member on the module is serving (unless another member already did since
    /// generation `seen`). Retries with back-off until it works or the backend is dropped.
    fn recover(&self, mut seen: u64, mut reinit: bool) {
        {
            let state = self.module.read();
            let current = state.initialized && self.attached_slot(state.generation).is_some();
            if current && (!reinit || seen < state.generation) {
                return;
            }
        }
        self.objects.invalidate_all();
        let retry_max = Duration::from_millis(self.config.retry_max_ms).max(FIRST_RETRY);
        let mut delay = FIRST_RETRY;
        let mut spared = 0u32;
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return;
            }
            // Re-initialising interrupts every member of the module: while others are serving, only look for
            // our token again, and escalate only after repeated failures.
            let initialized = self.module.read().initialized;
            let others = self.module.others_serving(self.id);
            let reinitialize = reinit && (!initialized || !others || spared >= ESCALATE_AFTER);
            if reinit && !reinitialize {
                spared += 1;
            }
            let generation = if reinitialize {
                spared = 0;
                self.module.reinitialize(seen)
            } else {
                self.module.read().generation
            };
            match self.attach(generation) {
                Ok(()) => {
                    if reinitialize {
                        self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(backend = %self.name(), generation, "HSM member recovered");
                    self.warm();
                    return;
                }
                Err(AttachError::Pin(detail)) => {
                    tracing::error!(backend = %self.name(), detail = %detail, "HSM login refused");
                    self.set_health(HealthStatus::Unavailable, detail);
                    if !self.wait_for_new_pin(retry_max) {
                        return;
                    }
                    reinit = false;
                    continue;
                }
                Err(AttachError::Other(detail)) => {
                    tracing::warn!(backend = %self.name(), detail = %detail, "HSM member not recovered yet");
                    self.set_health(HealthStatus::Unavailable, detail);
                    seen = generation;
                    reinit = true;
                }
            }
            if !self.pause(delay) {
                return;
            }
            delay = (delay * 2).min(retry_max);
        }
    }

    fn wait_for_new_pin(&self, every: Duration) -> bool {
        loop {
            if !self.pause(every) {
                return false;
            }
            let rejected = *lock(&self.rejected_pin);
            match self.config.read_pin() {
                Ok(pin) if Some(pin_digest(&pin)) != rejected => return true,
                _ => {}
            }
        }
    }

    /// Queues one session-opening job per worker so the pool is warm again before traffic needs it.
    fn warm(&self) {
        let tx = lock(&self.warm_tx).clone();
        let Some(tx) = tx else { return };
        for _ in 0..self.config.sessions {
            self.stats.waiting.fetch_add(1, Ordering::Relaxed);
            if tx.try_send(Box::new(Warm)).is_err() {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                break;
            }
        }
    }

    fn supervise(self: Arc<Self>) {
        while let Some(signal) = self.next_signal() {
            match signal.need {
                Need::Nothing | Need::Probe => {
                    self.probe();
                }
                Need::Attach => self.recover(signal.seen, false),
                Need::Reinit => self.recover(signal.seen, true),
            }
        }
    }

    /// Runs one job on this worker's session, then acts on the faults it revealed.
    fn execute(&self, worker: usize, session: &mut Option<PooledSession>, job: Box<dyn Job>) {
        let state = self.module.read();
        let generation = state.generation;
        if session.as_ref().is_some_and(|s| s.generation != generation) {
            // C_Finalize closed this session already, and its handle number may now belong to a new session:
            // forget it, never close it.
            *session = None;
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
        if !state.initialized {
            drop(state);
            self.request(Need::Reinit, generation);
            job.run(Err(unavailable()));
            return;
        }
        let Some(slot) = self.attached_slot(generation) else {
            drop(state);
            self.request(Need::Attach, generation);
            job.run(Err(unavailable()));
            return;
        };
        let mut ctx = Ctx { member: self, pkcs11: &state.pkcs11, slot, generation, worker, session, fault: None };
        job.run(Ok(&mut ctx));
        // Jobs settle before replying; this catches faults of a rollback that ran after the reply.
        ctx.settle();
    }

    fn close_on_exit(&self, session: &mut Option<PooledSession>) {
        if let Some(s) = session.take() {
            let state = self.module.read();
            if state.initialized && state.generation == s.generation {
                let _ = s.session.close();
            }
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

// ---- workers, jobs and the per-job context ----------------------------------------------------------------

pub(crate) struct PooledSession {
    session: Session,
    generation: u64,
}

/// A unit of work for a worker. `run` gets the worker's context, or the reason there is none (module down).
pub(crate) trait Job: Send {
    /// The caller stopped waiting (deadline passed): skip the job rather than spend an HSM session on it.
    fn abandoned(&self) -> bool;
    fn run(self: Box<Self>, ctx: std::result::Result<&mut Ctx<'_>, Error>);
}

type Rollback<T> = Box<dyn FnOnce(&mut Ctx<'_>, T) + Send>;

struct Task<T, F> {
    work: F,
    /// Undoes a result nobody received (a key generated after its caller's deadline passed).
    rollback: Option<Rollback<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for Task<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Ctx<'_>) -> Result<T> + Send + 'static,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(self: Box<Self>, ctx: std::result::Result<&mut Ctx<'_>, Error>) {
        let Task { work, rollback, reply } = *self;
        match ctx {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(ctx) => {
                let result = work(ctx);
                // Act on faults before replying, so the caller's next call never meets a session known bad.
                ctx.settle();
                if let Err(Ok(value)) = reply.send(result)
                    && let Some(undo) = rollback
                {
                    undo(ctx, value);
                }
            }
        }
    }
}

/// Opens the worker's session if it has none.
struct Warm;

impl Job for Warm {
    fn abandoned(&self) -> bool {
        false
    }

    fn run(self: Box<Self>, ctx: std::result::Result<&mut Ctx<'_>, Error>) {
        if let Ok(ctx) = ctx {
            let _ = ctx.session();
        }
    }
}

fn worker(
    member: Arc<Member>,
    index: usize,
    rx: Arc<Mutex<Receiver<Box<dyn Job>>>>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let mut session = None;
    member.execute(index, &mut session, Box::new(Warm));
    let _ = ready.send(());
    loop {
        // Holding the lock while blocked in recv is the point: idle workers queue on the mutex and take jobs in
        // turn, which makes one std receiver serve many threads.
        let next = lock(&rx).recv();
        let Ok(job) = next else { break };
        member.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        if job.abandoned() {
            member.stats.abandoned.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        member.stats.in_use.fetch_add(1, Ordering::Relaxed);
        member.execute(index, &mut session, job);
        member.stats.in_use.fetch_sub(1, Ordering::Relaxed);
    }
    member.close_on_exit(&mut session);
}

/// What one job can use: the worker's session (opened and logged in on demand), the module, the slot, and the
/// fault bookkeeping the worker acts on afterwards.
pub(crate) struct Ctx<'a> {
    pub(crate) member: &'a Member,
    pub(crate) pkcs11: &'a Pkcs11,
    pub(crate) slot: Slot,
    pub(crate) generation: u64,
    worker: usize,
    session: &'a mut Option<PooledSession>,
    fault: Option<Fault>,
}

impl Ctx<'_> {
    fn note(&mut self, fault: Fault) {
        self.fault = self.fault.max(Some(fault));
    }

    /// Records what the error reveals and returns the caller's error (with the token's text as source).
    pub(crate) fn fail(&mut self, e: P11Error, op: Op) -> Error {
        let (fault, err) = classify(&e, op);
        if let Some(f) = fault {
            self.note(f);
        }
        err.with_source(format!("PKCS#11 backend {}: {op:?}: {e}", self.member.name()))
    }

    /// The worker's logged-in session, opened on first use.
    pub(crate) fn session(&mut self) -> Result<&Session> {
        if self.session.is_none() {
            self.open()?;
        }
        match self.session.as_ref() {
            Some(s) => Ok(&s.session),
            None => Err(Error::internal("the HSM session vanished")),
        }
    }

    fn open(&mut self) -> Result<()> {
        let opened = self.pkcs11.open_rw_session_no_drop(self.slot);
        let session = match opened {
            Ok(s) => s,
            Err(e) => {
                self.member.failing[self.worker].store(true, Ordering::Relaxed);
                return Err(self.fail(e, Op::Open));
            }
        };
        let Some(pin) = self.member.pin() else {
            let _ = session.close();
            return Err(unavailable());
        };
        match session.login(UserType::User, Some(&AuthPin::new(pin.as_str().into()))) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                let _ = session.close();
                self.member.failing[self.worker].store(true, Ordering::Relaxed);
                return Err(self.fail(e, Op::Open));
            }
        }
        self.member.failing[self.worker].store(false, Ordering::Relaxed);
        self.member.stats.open.fetch_add(1, Ordering::Relaxed);
        self.member.stats.opened.fetch_add(1, Ordering::Relaxed);
        *self.session = Some(PooledSession { session, generation: self.generation });
        Ok(())
    }

    /// Acts on the worst fault the job revealed: drop the session, and ask the supervisor to probe the token,
    /// log in again or re-initialise the module.
    pub(crate) fn settle(&mut self) {
        let Some(fault) = self.fault.take() else { return };
        self.evict();
        let need = match fault {
            Fault::Session => return,
            Fault::Probe => Need::Probe,
            Fault::Attach => Need::Attach,
            Fault::Module => Need::Reinit,
        };
        self.member.request(need, self.generation);
    }

    /// Closes and forgets the session; the next call opens a new one.
    pub(crate) fn evict(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.session.close();
            self.member.stats.open.fetch_sub(1, Ordering::Relaxed);
            self.member.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the session; a session that died under an idempotent call is replaced and the call repeated
    /// once, so a lost session or login costs the caller nothing.
    pub(crate) fn with_session<T>(&mut self, op: Op, mut f: impl FnMut(&Session) -> P11Result<T>) -> Result<T> {
        let mut retried = false;
        loop {
            let result = {
                let s = self.session()?;
                f(s)
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if !retried && op.idempotent() && is_session_fault(&e) => {
                    self.evict();
                    retried = true;
                }
                Err(e) => return Err(self.fail(e, op)),
            }
        }
    }

    /// Runs `f` once, without the retry of [`with_session`](Self::with_session): for callers' own closures,
    /// which may not be safe to repeat.
    pub(crate) fn with_session_once<T>(&mut self, op: Op, f: impl FnOnce(&Session) -> P11Result<T>) -> Result<T> {
        let result = {
            let s = self.session()?;
            f(s)
        };
        result.map_err(|e| self.fail(e, op))
    }

    /// Runs `f` with the key version's token objects. A stale cached object handle (module re-initialised by
    /// someone else, object re-created) is looked up again once; a dead session is replaced once.
    pub(crate) fn with_key<T>(
        &mut self,
        key: &OwnedKey,
        op: Op,
        mut f: impl FnMut(&Session, &Objects) -> P11Result<T>,
    ) -> Result<T> {
        let mut retried = false;
        loop {
            let objects = match self.member.objects.get(key).filter(|o| o.generation == self.generation) {
                Some(o) => o,
                None => {
                    // Decoded only on a miss: the hot path is the cache hit.
                    let locator = Locator::decode(&key.handle)?;
                    let o = self.find(key, &locator)?;
                    self.member.objects.insert(key.clone(), o);
                    o
                }
            };
            let result = {
                let s = self.session()?;
                f(s, &objects)
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if !retried && is_stale_handle(&e) => {
                    self.member.objects.invalidate(key);
                    retried = true;
                }
                Err(e) if !retried && op.idempotent() && is_session_fault(&e) => {
                    self.evict();
                    retried = true;
                }
                Err(e) if is_stale_handle(&e) => {
                    self.member.objects.invalidate(key);
                    let locator = Locator::decode(&key.handle)?;
                    return Err(self.missing(&locator));
                }
                Err(e) => return Err(self.fail(e, op)),
            }
        }
    }

    /// Looks the key version's objects up by its locator and checks they are what the handle promises.
    fn find(&mut self, key: &OwnedKey, locator: &Locator) -> Result<Objects> {
        let class = if key.spec.is_symmetric() { ObjectClass::SECRET_KEY } else { ObjectClass::PRIVATE_KEY };
        let search = |s: &Session| -> P11Result<_> {
            let keys = s.find_objects(&locator.template(class))?;
            let publics = if class == ObjectClass::PRIVATE_KEY {
                s.find_objects(&locator.template(ObjectClass::PUBLIC_KEY))?
            } else {
                Vec::new()
            };
            let attrs = match keys.as_slice() {
                [one] => s.get_attributes(*one, &[AttributeType::KeyType, AttributeType::Label])?,
                _ => Vec::new(),
            };
            Ok((keys, publics, attrs))
        };
        let mut found = self.with_session(Op::Find, search)?;
        // A lost login does not fail searches: private objects just become invisible (SoftHSM then also
        // answers CKR_OBJECT_HANDLE_INVALID for cached handles). Log in again and look once more.
        if found.0.is_empty() && self.relogin_if_needed()? {
            found = self.with_session(Op::Find, search)?;
        }
        let (keys, publics, attrs) = found;
        let key_object = match keys.as_slice() {
            [] => return Err(self.missing(locator)),
            [one] => *one,
            many => {
                return Err(Error::internal(format!(
                    "{} HSM objects match this key version's handle ({})",
                    many.len(),
                    locator.describe()
                )));
            }
        };
        let mut key_type = None;
        let mut label = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Label(l) => label = Some(l),
                _ => {}
            }
        }
        if !key_type.is_some_and(|t| key_type_fits(key.spec, t)) {
            return Err(Error::internal(format!("the HSM object ({}) is not a {} key", locator.describe(), key.spec)));
        }
        if locator.kind == LocatorKind::Generated
            && label.as_deref() != Some(label_for(&key.key_id, key.version).as_bytes())
        {
            return Err(Error::internal(
                "the key handle does not belong to this key version: it was moved to another key or version",
            ));
        }
        let public = match publics.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        Ok(Objects { key: key_object, public, generation: self.generation })
    }

    /// Logs the session in again if it lost its login (another session logged the application out, or the
    /// token forgot it); returns whether it did.
    fn relogin_if_needed(&mut self) -> Result<bool> {
        let state = self.with_session(Op::Find, |s| s.get_session_info().map(|i| i.session_state()))?;
        if !matches!(state, SessionState::RoPublic | SessionState::RwPublic) {
            return Ok(false);
        }
        let Some(pin) = self.member.pin() else { return Err(unavailable()) };
        let login = self.with_session_once(Op::Open, |s| {
            match s.login(UserType::User, Some(&AuthPin::new(pin.as_str().into()))) {
                Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
                Err(e) => Err(e),
            }
        });
        login.map(|()| true)
    }

    /// The objects are not on the token: the handle names an object of another kind, the key is gone, or the
    /// token is (SoftHSM answers searches on a vanished token with an empty result). The token probe decides.
    fn missing(&mut self, locator: &Locator) -> Error {
        let elsewhere = self.with_session(Op::Find, |s| {
            let mut template = locator.template(ObjectClass::SECRET_KEY);
            template.retain(|a| !matches!(a, Attribute::Class(_)));
            s.find_objects(&template)
        });
        if elsewhere.is_ok_and(|o| !o.is_empty()) {
            return Error::internal(format!("the HSM object ({}) is not a key of this key's spec", locator.describe()));
        }
        match self.pkcs11.get_token_info(self.slot) {
            Ok(info) if info.label().trim_end() == self.member.config.token_label => missing_object(),
            Ok(_) => {
                self.note(Fault::Module);
                unavailable().with_source("the token in the slot changed")
            }
            Err(e) => {
                self.note(Fault::Module);
                unavailable().with_source(format!("token probe failed: {e}"))
            }
        }
    }
}

pub(crate) fn key_type_fits(spec: KeySpec, t: KeyType) -> bool {
    match spec {
        KeySpec::Aes256 => t == KeyType::AES,
        KeySpec::Hmac256 => t == KeyType::GENERIC_SECRET || t == KeyType::SHA256_HMAC,
        KeySpec::Rsa2048 | KeySpec::Rsa3072 => t == KeyType::RSA,
        KeySpec::EcP256 => t == KeyType::EC,
    }
}

// ---- the caller side ------------------------------------------------------------------------------------------

/// The async face of a member: submits jobs under deadlines. Dropping it stops the member's threads.
pub(crate) struct Pool {
    pub(crate) member: Arc<Member>,
    /// `None` only while dropping.
    tx: Option<SyncSender<Box<dyn Job>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("member", &self.member).finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts the workers (each pre-warms its session) and the supervisor. Blocks until every worker tried to
    /// open its session: call it off the async workers.
    pub(crate) fn start(member: Arc<Member>) -> Result<Pool> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<dyn Job>>(member.config.queue);
        member.set_warm_sender(tx.clone());
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spawn_failed = |e: std::io::Error| {
            member.stop();
            Error::internal("cannot start an HSM worker thread").with_source(e)
        };
        let mut threads = Vec::with_capacity(member.config.sessions + 1);
        for index in 0..member.config.sessions {
            let (m, rx, ready) = (member.clone(), rx.clone(), ready_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("p11-{}-{index}", member.name()))
                    .spawn(move || worker(m, index, rx, ready))
                    .map_err(spawn_failed)?,
            );
        }
        drop(ready_tx);
        let m = member.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("p11-{}-supervisor", member.name()))
                .spawn(move || m.supervise())
                .map_err(spawn_failed)?,
        );
        // Every worker reports once its first session is open (or could not be): the pool starts warm. A hung
        // token must not hold the start longer than one admin deadline in all.
        let until = Instant::now() + Duration::from_millis(member.config.keygen_deadline_ms);
        for _ in 0..member.config.sessions {
            let left = until.saturating_duration_since(Instant::now());
            if ready_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        Ok(Pool { member, tx: Some(tx), threads })
    }

    /// Attaches to the token for the first time; on failure the supervisor keeps trying in the background.
    pub(crate) fn first_attach(member: &Member) {
        let generation = member.module.read().generation;
        match member.attach(generation) {
            Ok(()) => {}
            Err(AttachError::Pin(detail)) => {
                tracing::error!(backend = %member.name(), detail = %detail, "HSM login refused");
                member.set_health(HealthStatus::Unavailable, detail);
                // The supervisor waits for another PIN before it tries again.
                member.request(Need::Attach, generation);
            }
            Err(AttachError::Other(detail)) => {
                tracing::warn!(backend = %member.name(), detail = %detail, "HSM member not available at start; retrying in the background");
                member.set_health(HealthStatus::Unavailable, detail);
                member.request(Need::Reinit, generation);
            }
        }
    }

    pub(crate) async fn call<T, F>(&self, deadline: Duration, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> Result<T> + Send + 'static,
    {
        self.submit(deadline, work, None).await
    }

    /// Like [`call`](Self::call); if the caller gave up before the result arrived, `rollback` undoes it on the
    /// worker (a key generated after its caller's deadline must not stay on the token unreferenced).
    pub(crate) async fn call_with_rollback<T, F, R>(&self, deadline: Duration, work: F, rollback: R) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> Result<T> + Send + 'static,
        R: FnOnce(&mut Ctx<'_>, T) + Send + 'static,
    {
        self.submit(deadline, work, Some(Box::new(rollback))).await
    }

    async fn submit<T, F>(&self, deadline: Duration, work: F, rollback: Option<Rollback<T>>) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let stats = &self.member.stats;
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        let Some(tx) = &self.tx else {
            return Err(Error::new(ErrorKind::DependencyFailure, "the HSM backend has been shut down"));
        };
        if let Err(e) = tx.try_send(Box::new(Task { work, rollback, reply })) {
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                TrySendError::Full(_) => {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    Error::new(ErrorKind::DependencyTimeout, "the HSM is saturated: its request queue is full")
                        .with_retry_after(deadline)
                }
                TrySendError::Disconnected(_) => {
                    Error::new(ErrorKind::DependencyFailure, "the HSM backend has been shut down")
                }
            });
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::internal("an HSM worker dropped a request")),
            Err(_) => {
                stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(Error::new(ErrorKind::DependencyTimeout, "the HSM did not answer in time"))
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // With the supervisor's sender gone and ours dropped, the queue disconnects: each worker finishes its
        // current call, closes its session and exits; the last one out finalises the module.
        self.member.stop();
        self.tx = None;
        // Wait for that, within bounds: a process that exits while these threads still call into the library
        // can crash in it (SoftHSM's static destructors run under them), and an unfinalised module may too.
        let until = Instant::now() + Duration::from_millis(self.member.config.keygen_deadline_ms);
        for thread in self.threads.drain(..) {
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}
