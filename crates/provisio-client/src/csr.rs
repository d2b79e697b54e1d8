//! Certificate signing requests for [`crate::Options::csr`]: a device key, made here or read
//! from PEM, and a PKCS#10 request whose Common Name is the registration id, as DPS's
//! `RegisterDeviceAndIssueCertificate` (api-version `2025-07-01-preview`) expects.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData as _};

use crate::ClientError;

/// The kinds of key [`DeviceKey::generate`] makes (those a certificate policy may allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA, 2048 bits.
    Rsa2048,
}

/// A device's private key for its operational certificate.
pub struct DeviceKey {
    pair: KeyPair,
    /// The PEM it was read from: written back as given (an SEC1 or PKCS#1 key stays one).
    pem: Option<String>,
}

/// Never the key itself.
impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({:?})", self.pair.algorithm())
    }
}

impl DeviceKey {
    /// A new random key.
    ///
    /// # Errors
    /// When the crypto library cannot make one.
    pub fn generate(kind: KeyType) -> Result<Self, ClientError> {
        let pair = match kind {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
        }
        .map_err(|e| ClientError::Config(format!("cannot make a {kind:?} key: {e}")))?;
        Ok(Self { pair, pem: None })
    }

    /// An existing unencrypted key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or
    /// PKCS#1 (`RSA PRIVATE KEY`) PEM, ECDSA P-256/P-384 or RSA.
    ///
    /// # Errors
    /// Text that is no such key (an encrypted key among them).
    pub fn from_pem(pem: &str) -> Result<Self, ClientError> {
        if pem.contains("ENCRYPTED PRIVATE KEY") {
            return Err(ClientError::Config("the key is encrypted; give it unencrypted (openssl pkey -in …)".into()));
        }
        let pair = KeyPair::from_pem(pem)
            .map_err(|e| ClientError::Config(format!("not a PEM private key (ECDSA or RSA): {e}")))?;
        Ok(Self { pair, pem: Some(pem.to_owned()) })
    }

    /// The key as PEM: as it was read, or PKCS#8 for a generated one.
    #[must_use]
    pub fn to_pem(&self) -> String {
        self.pem.clone().unwrap_or_else(|| self.pair.serialize_pem())
    }

    /// Its public key, DER `SubjectPublicKeyInfo` (as in the issued certificate).
    #[must_use]
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// A PKCS#10 request, DER, signed by this key, with the subject `CN={registration_id}` and
    /// nothing else: the service's policy decides what the certificate says.
    ///
    /// # Errors
    /// A registration id rcgen cannot put in a name, or a signing failure.
    pub fn request(&self, registration_id: &str) -> Result<Vec<u8>, ClientError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, registration_id);
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&self.pair)
            .map_err(|e| ClientError::Config(format!("cannot make the certificate request: {e}")))?;
        Ok(csr.der().to_vec())
    }
}

/// PEM of DER certificates, in order, with `\n` line ends.
#[must_use]
pub fn certificates_pem(ders: &[Vec<u8>]) -> String {
    // One after the other, without the blank line `pem::encode_many` puts between them, as
    // fullchain files are written.
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    ders.iter().map(|d| pem::encode_config(&pem::Pem::new("CERTIFICATE", d.clone()), config)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_device_and_verify_for_every_key_type() {
        for kind in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = DeviceKey::generate(kind).unwrap();
            let der = key.request("dev-7").unwrap();
            let csr = rcgen::CertificateSigningRequestParams::from_der(&der.clone().into()).unwrap();
            let cn = csr.params.distinguished_name.get(&DnType::CommonName).unwrap();
            assert_eq!(cn, &rcgen::DnValue::Utf8String("dev-7".into()), "{kind:?}");
            assert_eq!(csr.public_key.subject_public_key_info(), key.public_key_der(), "{kind:?}");
            // A key read back from its PEM is the same key.
            let again = DeviceKey::from_pem(&key.to_pem()).unwrap();
            assert_eq!(again.public_key_der(), key.public_key_der(), "{kind:?}");
        }
    }

    #[test]
    fn encrypted_and_garbage_keys_are_refused_with_a_reason() {
        let e =
            DeviceKey::from_pem("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(e.to_string().contains("encrypted"), "{e}");
        assert!(DeviceKey::from_pem("hello").is_err());
    }

    #[test]
    fn chains_become_pem_in_order() {
        let text = certificates_pem(&[vec![1, 2, 3], vec![4, 5]]);
        assert_eq!(
            text,
            "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nBAU=\n-----END CERTIFICATE-----\n"
        );
    }
}
