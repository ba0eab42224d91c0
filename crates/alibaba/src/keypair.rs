//! Data key pairs for the GenerateDataKeyPair family: generated here with aws-lc-rs (like a data key, the pair
//! is handed to the caller; only its private half's encryption under a master key touches the HSM).

use aws_lc_rs::encoding::{AsDer as _, PublicKeyX509Der};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use zeroize::Zeroizing;

use crate::error::AliError;

/// A generated pair: PKCS#8 private key and SubjectPublicKeyInfo public key, both DER.
pub struct DataKeyPair {
    pub private_pkcs8: Zeroizing<Vec<u8>>,
    pub public_spki: Vec<u8>,
}

impl std::fmt::Debug for DataKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("DataKeyPair").field("public_len", &self.public_spki.len()).finish_non_exhaustive()
    }
}

fn failed(_: aws_lc_rs::error::Unspecified) -> AliError {
    AliError::internal()
}

pub fn generate(spec: &str) -> Result<DataKeyPair, AliError> {
    match spec {
        "RSA_2048" | "RSA_3072" => {
            let size =
                if spec == "RSA_2048" { aws_lc_rs::rsa::KeySize::Rsa2048 } else { aws_lc_rs::rsa::KeySize::Rsa3072 };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(failed)?;
            let private_pkcs8 = Zeroizing::new(pair.as_der().map_err(failed)?.as_ref().to_vec());
            let public: PublicKeyX509Der<'static> = pair.public_key().as_der().map_err(failed)?;
            Ok(DataKeyPair { private_pkcs8, public_spki: public.as_ref().to_vec() })
        }
        "EC_P256" => {
            let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).map_err(failed)?;
            let private_pkcs8 = Zeroizing::new(pair.to_pkcs8v1().map_err(failed)?.as_ref().to_vec());
            let public: PublicKeyX509Der<'static> = pair.public_key().as_der().map_err(failed)?;
            Ok(DataKeyPair { private_pkcs8, public_spki: public.as_ref().to_vec() })
        }
        "" => Err(AliError::missing_parameter("KeyPairSpec")),
        "EC_P256K" | "EC_SM2" => Err(AliError::unsupported("Rejected.UnsupportedOperation")),
        _ => Err(AliError::invalid_parameter("The specified parameter KeyPairSpec is not valid.")),
    }
}

/// `KeyFormat`: PEM (the default) or DER.
pub fn encode(format: &str, label: &str, der: &[u8]) -> Result<Vec<u8>, AliError> {
    match format {
        "" | "PEM" => Ok(crate::service::pem(label, der).into_bytes()),
        "DER" => Ok(der.to_vec()),
        _ => Err(AliError::invalid_parameter("The specified parameter KeyFormat is not valid.")),
    }
}
