//! kmsgate-core: the domain model, the error contract, the dispatcher every frontend calls, and the traits
//! (key backend, store, audit sink, authorizer, rate limiter) the other crates implement. No HTTP lives here.

pub mod audit;
pub mod backend;
pub mod deadline;
pub mod dispatcher;
pub mod error;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod secret;
pub mod store;

pub use audit::{AuditEvent, AuditSink, Operation, Outcome};
pub use backend::{
    AesBlockMode, BlockPadding, EncryptionAlgorithm, HealthStatus, KeyBackend, KeyMaterialRef, MemberHealth,
    SigningAlgorithm,
};
pub use dispatcher::{
    CreateKeyRequest, DataKeyReply, DecryptReply, DecryptRequest, Dispatcher, DispatcherConfig, EncryptReply,
    EncryptRequest, HealthReport, PublicKeyReply, SignInput, SignReply, SignRequest, constant_time_eq,
};
pub use error::{Error, ErrorKind, Result};
pub use model::{
    AliasName, BackendHandle, Caller, Frontend, Key, KeyId, KeyOrigin, KeyRef, KeySpec, KeyState, KeyUsage,
    KeyUsageSet, KeyVersion, Page, PageRequest, Tenant, TenantId, Timestamp,
};
pub use secret::{
    DeleteMode, DeletedFilter, PutSecretRequest, STAGE_CURRENT, STAGE_PREVIOUS, SealedSecretVersion, Secret,
    SecretFilter, SecretListFilter, SecretPatch, SecretPath, SecretSelector, SecretValue, SecretVersionInfo,
    SecretWrite, VersionSelector, WriteMode,
};
pub use store::{AliasEntry, Change, ChangeKind, Document, Precondition, Replica, Store};
