//! One loaded PKCS#11 module (shared library) and its initialisation state.
//!
//! A module is process-wide state: `C_Initialize` and `C_Finalize` act on the library, not on a handle, and a
//! second `dlopen` of the same path returns the same library. So every member on one module path shares one
//! [`Module`] (a registry keeps them), and re-initialising it (after a device error) is coordinated here: it
//! happens under the write lock, which waits for every in-flight call of every member to finish (`C_Finalize`
//! must not run concurrently with other calls), and a generation counter tells sessions opened before it apart
//! from sessions opened after it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use kmsgate_core::{Error, Result};
use serde::Serialize;

/// What the library says about itself (`C_GetInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibraryInfo {
    pub manufacturer: String,
    pub description: String,
    pub library_version: String,
    pub cryptoki_version: String,
}

pub(crate) struct ModuleState {
    pub(crate) pkcs11: Pkcs11,
    pub(crate) initialized: bool,
    /// Bumped by every re-initialisation. Sessions and cached object handles carry the generation they were
    /// obtained in; anything older died with `C_Finalize`.
    pub(crate) generation: u64,
    pub(crate) library: Option<LibraryInfo>,
    /// Why the last `C_Initialize` failed, for health details.
    pub(crate) error: Option<String>,
}

pub(crate) struct Module {
    pub(crate) path: PathBuf,
    state: RwLock<ModuleState>,
    /// Whether each member on this module is serving (by member id). Re-initialising the module interrupts
    /// every member on it, so a member whose own token is missing does not do it while others are serving.
    members: Mutex<HashMap<u64, bool>>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").field("path", &self.path).finish_non_exhaustive()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Module>>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Weak<Module>>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Module {
    /// The module at `path`, loaded and initialised once per process. Loading failures (no such file, not a
    /// PKCS#11 library) are configuration errors; an initialisation failure is not: it is recorded and retried
    /// by the members' recovery.
    pub(crate) fn open(path: &Path) -> Result<Arc<Module>> {
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            Error::invalid(format!("the PKCS#11 module {} cannot be found", path.display())).with_source(e)
        })?;
        let mut modules = lock(registry());
        if let Some(existing) = modules.get(&canonical).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let pkcs11 = Pkcs11::new(&canonical).map_err(|e| {
            Error::invalid(format!("{} is not a loadable PKCS#11 module", canonical.display())).with_source(e)
        })?;
        let mut state = ModuleState { pkcs11, initialized: false, generation: 0, library: None, error: None };
        state.initialize();
        if let Some(e) = &state.error {
            tracing::warn!(module = %canonical.display(), error = %e, "C_Initialize failed; will retry");
        }
        let module = Arc::new(Module {
            path: canonical.clone(),
            state: RwLock::new(state),
            members: Mutex::new(HashMap::new()),
        });
        modules.insert(canonical, Arc::downgrade(&module));
        Ok(module)
    }

    /// Shared access for PKCS#11 calls. Never take it twice on one thread: a waiting re-initialisation
    /// (writer) would deadlock the second read.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ModuleState> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_member_serving(&self, member: u64, serving: bool) {
        lock(&self.members).insert(member, serving);
    }

    pub(crate) fn forget_member(&self, member: u64) {
        lock(&self.members).remove(&member);
    }

    /// Whether another member on this module is serving right now.
    pub(crate) fn others_serving(&self, member: u64) -> bool {
        lock(&self.members).iter().any(|(id, serving)| *id != member && *serving)
    }

    /// `C_Finalize` + `C_Initialize`, unless the module was already re-initialised since generation `seen`
    /// (several members on one module may ask at once). Returns the current generation.
    pub(crate) fn reinitialize(&self, seen: u64) -> u64 {
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.generation != seen {
            return state.generation;
        }
        if state.initialized {
            // The library may already be dead; what matters is that the next C_Initialize starts clean.
            if let Err(e) = state.pkcs11.clone().finalize() {
                tracing::debug!(module = %self.path.display(), error = %e, "C_Finalize failed during recovery");
            }
            state.initialized = false;
        }
        state.generation += 1;
        state.initialize();
        match &state.error {
            None => {
                tracing::info!(module = %self.path.display(), generation = state.generation, "PKCS#11 module re-initialised")
            }
            Some(e) => tracing::warn!(module = %self.path.display(), error = %e, "C_Initialize failed; will retry"),
        }
        state.generation
    }
}

impl ModuleState {
    fn initialize(&mut self) {
        match self.pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Someone else in this process initialised the library: it is usable all the same.
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                self.initialized = true;
                self.error = None;
                self.library = self.pkcs11.get_library_info().ok().map(|i| LibraryInfo {
                    manufacturer: i.manufacturer_id().trim_end().to_owned(),
                    description: i.library_description().trim_end().to_owned(),
                    library_version: format!("{}.{}", i.library_version().major(), i.library_version().minor()),
                    cryptoki_version: format!("{}.{}", i.cryptoki_version().major(), i.cryptoki_version().minor()),
                });
            }
            Err(e) => {
                self.initialized = false;
                self.error = Some(format!("C_Initialize failed: {e}"));
            }
        }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // Serialise with `open`: if another member already loaded a fresh Module for this path, the library is
        // in use again and must not be finalised under it.
        let mut modules = lock(registry());
        if modules.get(&self.path).and_then(Weak::upgrade).is_some() {
            return;
        }
        modules.remove(&self.path);
        let state = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.initialized {
            let _ = state.pkcs11.clone().finalize();
            state.initialized = false;
        }
    }
}
