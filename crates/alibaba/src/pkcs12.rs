//! The vendor's ClientKey file: `clientKey_KAAP.<uuid>.json` = `{"KeyId": ..., "PrivateKeyData": <base64
//! PKCS#12>}` plus a password, read by the Python (pyOpenSSL), Java (PKCS12 KeyStore) and Go
//! (`x/crypto/pkcs12`) SDKs.
//!
//! Go's reader only knows the legacy PKCS#12 algorithms, so both bags are encrypted with
//! pbeWithSHAAnd3-KeyTripleDES-CBC and the MAC is HMAC-SHA-1 (what `openssl pkcs12 -export -legacy` writes).
//! `pkcs12.Decode` (Go) and Java want a certificate beside the key, so the key comes with a self-signed
//! certificate of its public half; kmsgate never checks that certificate, it only verifies signatures against
//! the registered public key.

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::{Error, Result};
use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, LocalKeyId, MacAlgorithm, PrivateKey, PrivateKeyChain,
};
use serde::Serialize;
use zeroize::Zeroizing;

/// The key derivation iterations of both bags and the MAC (OpenSSL's default is 2048; more costs the reader
/// only milliseconds).
const ITERATIONS: u32 = 10_000;
/// Characters of a generated password: letters and digits, within the vendor's 8-64 character rule.
const PASSWORD_LEN: usize = 32;

/// The two files the vendor console hands out for a ClientKey.
pub struct ClientKeyFiles {
    /// `clientKey_<id>.json`.
    pub json: Zeroizing<String>,
    /// `clientKey_<id>_Password.txt` (the bare password, no newline).
    pub password: Zeroizing<String>,
}

impl std::fmt::Debug for ClientKeyFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the key nor the password.
        f.debug_struct("ClientKeyFiles").finish_non_exhaustive()
    }
}

/// File names as the vendor console writes them.
pub fn file_names(id: &str) -> (String, String) {
    (format!("clientKey_{id}.json"), format!("clientKey_{id}_Password.txt"))
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ClientKeyJson<'a> {
    key_id: &'a str,
    private_key_data: &'a str,
}

fn failed(what: &'static str) -> impl FnOnce(String) -> Error {
    move |detail| Error::internal(what).with_source(std::io::Error::other(detail))
}

/// A random password of letters and digits.
pub fn generate_password() -> Result<Zeroizing<String>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = Zeroizing::new(String::with_capacity(PASSWORD_LEN));
    while out.len() < PASSWORD_LEN {
        let mut buf = Zeroizing::new([0u8; 64]);
        aws_lc_rs::rand::fill(buf.as_mut()).map_err(|_| Error::internal("the random generator failed"))?;
        // Rejection sampling keeps every character equally likely: 248 = 4 * 62.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == PASSWORD_LEN {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
        }
    }
    Ok(out)
}

/// A self-signed certificate over the RSA key (PKCS#8 DER), subject CN = the ClientKey id.
fn self_signed(id: &str, pkcs8: &[u8]) -> Result<Vec<u8>> {
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8);
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| failed("cannot load the ClientKey for its certificate")(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| failed("cannot build the ClientKey certificate")(e.to_string()))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "kmsgate");
    let cert = params.self_signed(&key).map_err(|e| failed("cannot sign the ClientKey certificate")(e.to_string()))?;
    Ok(cert.der().to_vec())
}

/// The PKCS#12 of the key (PKCS#8 DER) and its certificate under `password`, in the legacy encryption every
/// SDK reads.
pub fn pkcs12(id: &str, pkcs8: &[u8], password: &str) -> Result<Zeroizing<Vec<u8>>> {
    let cert_der = self_signed(id, pkcs8)?;
    let cert = Certificate::from_der(&cert_der).map_err(|e| failed("cannot read the certificate")(e.to_string()))?;
    let key = PrivateKey::from_der(pkcs8).map_err(|e| failed("cannot read the private key")(e.to_string()))?;
    // The local key id ties the key bag to its certificate bag (Java pairs them by it).
    let local_id = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &cert_der).as_ref().to_vec();
    let chain = PrivateKeyChain::new(LocalKeyId::from(local_id), key, [cert]);
    let mut store = KeyStore::new();
    store.add_entry(&id.to_ascii_lowercase(), KeyStoreEntry::PrivateKeyChain(chain));
    let der = store
        .writer(password)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
        .encryption_iterations(ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha1)
        .mac_iterations(ITERATIONS)
        .write()
        .map_err(|e| failed("cannot write the PKCS#12")(e.to_string()))?;
    Ok(Zeroizing::new(der))
}

/// The JSON file and password of a ClientKey whose private key is `pkcs8` (DER).
pub fn client_key_files(id: &str, pkcs8: &[u8]) -> Result<ClientKeyFiles> {
    let password = generate_password()?;
    let p12 = pkcs12(id, pkcs8, &password)?;
    let data = Zeroizing::new(STANDARD.encode(&*p12));
    let json = serde_json::to_string_pretty(&ClientKeyJson { key_id: id, private_key_data: &data })
        .map_err(|e| Error::internal("cannot encode the ClientKey file").with_source(e))?;
    Ok(ClientKeyFiles { json: Zeroizing::new(json), password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_opens_with_its_password_only_and_holds_key_and_certificate() {
        use aws_lc_rs::encoding::AsDer as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap();
        let id = "KAAP.0f2b1c9e-0000-4000-8000-000000000001";
        let files = client_key_files(id, pkcs8.as_ref()).unwrap();
        assert_eq!(files.password.len(), PASSWORD_LEN);
        assert!(files.password.bytes().all(|b| b.is_ascii_alphanumeric()));
        let v: serde_json::Value = serde_json::from_str(&files.json).unwrap();
        assert_eq!(v["KeyId"], id);
        let p12 = STANDARD.decode(v["PrivateKeyData"].as_str().unwrap()).unwrap();
        let ks = KeyStore::from_pkcs12(&p12, &files.password, p12_keystore::Pkcs12ImportPolicy::Strict).unwrap();
        let (_, chain) = ks.private_key_chain().expect("a key entry");
        assert_eq!(chain.key().as_der(), pkcs8.as_ref());
        assert_eq!(chain.certs().len(), 1);
        assert!(KeyStore::from_pkcs12(&p12, "wrong", p12_keystore::Pkcs12ImportPolicy::Strict).is_err());
        assert!(!format!("{files:?}").contains(&*files.password));
    }
}
