//! The handle the store records for a PKCS#11 key version: how to find its objects on the token again.
//!
//! | offset | length | content |
//! |---|---|---|
//! | 0 | 1 | format byte `0x50` (PKCS#11 handle, version 1) |
//! | 1 | 1 | locator kind: `0x01` generated or imported by kmsgate (by `CKA_ID`, label bound to the key version), `0x02` adopted by `CKA_ID`, `0x03` adopted by `CKA_LABEL` |
//! | 2 | 1 | length `n` of the locator value, 1-255 |
//! | 3 | n | the `CKA_ID` bytes, or the label as UTF-8 |
//!
//! Object handles (`CK_OBJECT_HANDLE`) are not stored: they are only valid within one initialisation of the
//! module. Keys kmsgate creates get a random 16-byte `CKA_ID` (the secret key, or both halves of a key pair)
//! and the label `kmsgate:<key id>:<version uuid>`; the label is checked whenever the objects are looked up, so
//! a handle copied to another key or version in the store does not open the wrong key.

use cryptoki::object::{Attribute, ObjectClass};
use kmsgate_core::{Error, ErrorKind, KeyId, KeyState, Result};
use uuid::Uuid;

/// Format byte of version-1 PKCS#11 handles (distinct from the software backend's `0x01`).
pub(crate) const FORMAT_V1: u8 = 0x50;
/// Length of the random `CKA_ID` of keys kmsgate creates.
pub(crate) const GENERATED_ID_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LocatorKind {
    Generated = 1,
    AdoptedId = 2,
    AdoptedLabel = 3,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Locator {
    pub(crate) kind: LocatorKind,
    pub(crate) value: Vec<u8>,
}

/// The label kmsgate gives the objects of one key version. `:` cannot occur in a key id, so the mapping is
/// unambiguous.
pub(crate) fn label_for(key_id: &KeyId, version: Uuid) -> String {
    format!("kmsgate:{key_id}:{version}")
}

fn malformed() -> Error {
    Error::internal("the PKCS#11 key handle is malformed or of an unknown format")
}

impl Locator {
    pub(crate) fn generated(id: Vec<u8>) -> Self {
        Locator { kind: LocatorKind::Generated, value: id }
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let len = u8::try_from(self.value.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| Error::invalid("an HSM object id or label must be 1-255 bytes"))?;
        let mut out = Vec::with_capacity(3 + self.value.len());
        out.extend_from_slice(&[FORMAT_V1, self.kind as u8, len]);
        out.extend_from_slice(&self.value);
        Ok(out)
    }

    /// Parses a handle. An empty handle is a key awaiting imported material, as with the software backend.
    pub(crate) fn decode(handle: &[u8]) -> Result<Self> {
        match handle {
            [] => Err(Error::new(
                ErrorKind::InvalidKeyState(KeyState::PendingImport),
                "the key version has no key material yet (import pending)",
            )),
            [FORMAT_V1, kind, len, value @ ..] if usize::from(*len) == value.len() && !value.is_empty() => {
                let kind = match kind {
                    1 => LocatorKind::Generated,
                    2 => LocatorKind::AdoptedId,
                    3 => LocatorKind::AdoptedLabel,
                    _ => return Err(malformed()),
                };
                Ok(Locator { kind, value: value.to_vec() })
            }
            _ => Err(malformed()),
        }
    }

    /// Whether kmsgate created the objects (and may destroy them).
    pub(crate) fn owned(&self) -> bool {
        self.kind == LocatorKind::Generated
    }

    /// A search template for the token object of `class` this locator names.
    pub(crate) fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let by = match self.kind {
            LocatorKind::Generated | LocatorKind::AdoptedId => Attribute::Id(self.value.clone()),
            LocatorKind::AdoptedLabel => Attribute::Label(self.value.clone()),
        };
        vec![Attribute::Token(true), Attribute::Class(class), by]
    }

    /// For operators: `id:<hex>` or `label:<text>`.
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            LocatorKind::Generated | LocatorKind::AdoptedId => format!("id:{}", hex(&self.value)),
            LocatorKind::AdoptedLabel => format!("label:{}", String::from_utf8_lossy(&self.value)),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let l = Locator::generated(vec![0xab; GENERATED_ID_LEN]);
        let h = l.encode().unwrap_or_default();
        assert_eq!(h.len(), 19);
        assert_eq!(&h[..3], &[0x50, 0x01, 16]);
        assert_eq!(Locator::decode(&h).ok(), Some(l));
        let by_label = Locator { kind: LocatorKind::AdoptedLabel, value: b"legacy".to_vec() };
        let h = by_label.encode().unwrap_or_default();
        assert_eq!(h, b"\x50\x03\x06legacy");
        assert_eq!(Locator::decode(&h).map(|l| l.describe()).ok().as_deref(), Some("label:legacy"));
        assert!(!by_label.owned());
    }

    #[test]
    fn malformed_handles() {
        let kind = |h: &[u8]| Locator::decode(h).err().map(|e| e.kind());
        assert_eq!(kind(&[]), Some(ErrorKind::InvalidKeyState(KeyState::PendingImport)));
        assert_eq!(kind(&[0x50, 1, 2, 9]), Some(ErrorKind::Internal));
        assert_eq!(kind(&[0x50, 4, 1, 9]), Some(ErrorKind::Internal));
        assert_eq!(kind(&[0x50, 1, 0]), Some(ErrorKind::Internal));
        assert_eq!(kind(&[0x01, 1, 1, 9]), Some(ErrorKind::Internal));
        assert!(Locator::generated(Vec::new()).encode().is_err());
        assert!(Locator::generated(vec![0; 256]).encode().is_err());
    }

    #[test]
    fn labels_name_the_version() {
        let id = KeyId::parse("k-1.a_b").unwrap_or_else(|e| panic!("{e}"));
        let v = Uuid::nil();
        assert_eq!(label_for(&id, v), "kmsgate:k-1.a_b:00000000-0000-0000-0000-000000000000");
    }
}
