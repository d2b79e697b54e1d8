//! TPM attestation: the `authenticationKey` blob that delivers an HMAC key into a device's TPM.
//!
//! DPS proves a TPM by handing it a fresh HMAC key that only that TPM can take in: the key
//! is wrapped for import under the device's storage root key (SRK), and the inner key of that
//! wrapping is sent as a credential that only the endorsement key (EK) can activate, bound
//! to the SRK's name. The device activates the credential, imports and loads the key, and
//! signs its SAS token with it (TPM2_HMAC), which the service checks with the key it made.
//!
//! The blob is the concatenation the SDKs parse (device-api spec §3.3): `TPM2B_ID_OBJECT`,
//! `TPM2B_ENCRYPTED_SECRET` (both for `TPM2_ActivateCredential`), `TPM2B_PRIVATE`,
//! `TPM2B_ENCRYPTED_SECRET`, `TPM2B_PUBLIC` (for `TPM2_Import`) and an empty `TPM2B_DATA`.
//! The cryptography is the TPM 2.0 library's credential protection and duplication (Part 1,
//! §24 and §23): KDFa, AES-CFB with a zero IV, HMAC-SHA256 integrity, RSA-OAEP with the
//! labels `IDENTITY` and `DUPLICATE`. Only public-key operations happen here.

use aws_lc_rs::{
    cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey},
    digest, hmac,
    iv::FixedLength,
    rand::{SecureRandom, SystemRandom},
    rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey},
};

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_HMAC: u16 = 0x0005;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_KEYEDHASH: u16 = 0x0008;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_CFB: u16 = 0x0043;
/// `TPMA_OBJECT` bits of a storage key: `restricted | decrypt`.
const RESTRICTED_DECRYPT: u32 = (1 << 16) | (1 << 17);
/// `TPMA_OBJECT` of the delivered key: `userWithAuth | sign` (an unrestricted HMAC key).
const HMAC_KEY_ATTRIBUTES: u32 = (1 << 6) | (1 << 18);
/// SHA-256 digest size: the seeds' and the obfuscation value's size.
const DIGEST: usize = 32;
/// The inner wrapper's key: AES-128, which the C, C# and Rust clients hard-code.
const INNER_KEY: usize = 16;
/// Largest RSA modulus accepted (bits).
const MAX_RSA_BITS: u16 = 4096;

/// Why a TPM key or blob could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The key is not a marshalled `TPM2B_PUBLIC` of the shape a storage key has.
    #[error("the {what} is not a TPM2B_PUBLIC this service can use: {why}")]
    Unsupported {
        /// Which key (`endorsementKey` or `storageRootKey`).
        what: &'static str,
        /// What was wrong with it.
        why: String,
    },
    /// The cryptographic library refused an operation.
    #[error("TPM blob: {0} failed")]
    Crypto(&'static str),
}

/// An RSA storage key of a TPM (EK or SRK), parsed from its `TPM2B_PUBLIC`.
pub struct StorageKey {
    name: Vec<u8>,
    rsa: OaepPublicEncryptingKey,
    /// The key's symmetric algorithm's key size in bits (AES-CFB): the protection keys'.
    sym_bits: u16,
}

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageKey").field("name", &hex(&self.name)).field("sym_bits", &self.sym_bits).finish()
    }
}

impl StorageKey {
    /// Parses a marshalled `TPM2B_PUBLIC` (two-byte size first, big-endian) of an RSA key
    /// with SHA-256 names, `restricted | decrypt` and AES-CFB: the TCG templates of the EK and
    /// the SRK. `what` names the key in errors.
    ///
    /// # Errors
    /// Anything else, or bytes that are not a `TPM2B_PUBLIC`.
    pub fn parse(tpm2b: &[u8], what: &'static str) -> Result<Self, TpmError> {
        let bad = |why: &str| TpmError::Unsupported { what, why: why.to_owned() };
        let mut r = Reader(tpm2b);
        let size = usize::from(r.u16().ok_or_else(|| bad("it is shorter than its size field"))?);
        if size != r.0.len() {
            return Err(bad("its size field does not match its length"));
        }
        let public = r.0;
        if r.u16() != Some(TPM_ALG_RSA) {
            return Err(bad("it is not an RSA key"));
        }
        if r.u16() != Some(TPM_ALG_SHA256) {
            return Err(bad("its name algorithm is not SHA-256"));
        }
        let attributes = r.u32().ok_or_else(|| bad("it ends in its attributes"))?;
        if attributes & RESTRICTED_DECRYPT != RESTRICTED_DECRYPT {
            return Err(bad("it is not a restricted decryption (storage) key"));
        }
        r.tpm2b().ok_or_else(|| bad("it ends in its auth policy"))?;
        if r.u16() != Some(TPM_ALG_AES) {
            return Err(bad("its symmetric algorithm is not AES"));
        }
        let sym_bits = r.u16().ok_or_else(|| bad("it ends in its symmetric key size"))?;
        if sym_bits != 128 && sym_bits != 256 {
            return Err(bad("its AES key size is neither 128 nor 256 bits"));
        }
        if r.u16() != Some(TPM_ALG_CFB) {
            return Err(bad("its symmetric mode is not CFB"));
        }
        let scheme = r.u16().ok_or_else(|| bad("it ends in its scheme"))?;
        if scheme != TPM_ALG_NULL {
            r.u16().ok_or_else(|| bad("it ends in its scheme's hash"))?;
        }
        let bits = r.u16().ok_or_else(|| bad("it ends in its key size"))?;
        if !(2048..=MAX_RSA_BITS).contains(&bits) {
            return Err(bad("its RSA key size is not between 2048 and 4096 bits"));
        }
        let exponent = r.u32().ok_or_else(|| bad("it ends in its exponent"))?;
        let n = r.tpm2b().ok_or_else(|| bad("it ends in its modulus"))?;
        if n.len() != usize::from(bits / 8) || !r.0.is_empty() {
            return Err(bad("its modulus does not have the size it declares"));
        }
        // The TPM's default exponent.
        let e = if exponent == 0 { 65_537 } else { exponent };
        let spki = rsa_spki(n, e);
        let rsa = PublicEncryptingKey::from_der(&spki)
            .ok()
            .and_then(|k| OaepPublicEncryptingKey::new(k).ok())
            .ok_or_else(|| bad("its RSA public key is not valid"))?;
        Ok(Self { name: name(public), rsa, sym_bits })
    }

    /// The key's TPM name: `TPM_ALG_SHA256 ‖ SHA-256(TPMT_PUBLIC)`.
    #[must_use]
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    fn oaep(&self, seed: &[u8], label: &[u8]) -> Result<Vec<u8>, TpmError> {
        let mut out = vec![0; self.rsa.ciphertext_size()];
        let n = self
            .rsa
            .encrypt(&OAEP_SHA256_MGF1SHA256, seed, &mut out, Some(label))
            .map_err(|_| TpmError::Crypto("RSA-OAEP encryption"))?
            .len();
        out.truncate(n);
        Ok(out)
    }
}

/// The `authenticationKey` blob that delivers `key` (the HMAC key the device will sign with)
/// into the TPM whose endorsement key is `ek` and storage root key is `srk`.
///
/// # Errors
/// If a random number or a cipher operation fails, or `key` is empty or over 128 bytes.
pub fn authentication_key(ek: &StorageKey, srk: &StorageKey, key: &[u8]) -> Result<Vec<u8>, TpmError> {
    if key.is_empty() || key.len() > 128 {
        return Err(TpmError::Crypto("an HMAC key of 1 to 128 bytes"));
    }
    let rng = SystemRandom::new();
    let random = |n: usize| -> Result<Vec<u8>, TpmError> {
        let mut b = vec![0; n];
        rng.fill(&mut b).map_err(|_| TpmError::Crypto("the random number generator"))?;
        Ok(b)
    };

    // The delivered key as a TPM object: an HMAC-SHA256 keyed-hash key whose `unique` is
    // SHA-256(obfuscation value ‖ key), as TPM2_Load checks.
    let obfuscation = random(DIGEST)?;
    let mut public = Vec::with_capacity(48);
    for v in [TPM_ALG_KEYEDHASH, TPM_ALG_SHA256] {
        public.extend_from_slice(&v.to_be_bytes());
    }
    public.extend_from_slice(&HMAC_KEY_ATTRIBUTES.to_be_bytes());
    put_tpm2b(&mut public, &[]);
    for v in [TPM_ALG_HMAC, TPM_ALG_SHA256] {
        public.extend_from_slice(&v.to_be_bytes());
    }
    put_tpm2b(&mut public, digest::digest(&digest::SHA256, &[obfuscation.as_slice(), key].concat()).as_ref());
    let object_name = name(&public);

    let mut sensitive = TPM_ALG_KEYEDHASH.to_be_bytes().to_vec();
    put_tpm2b(&mut sensitive, &[]);
    put_tpm2b(&mut sensitive, &obfuscation);
    put_tpm2b(&mut sensitive, key);
    let sensitive = tpm2b(&sensitive);

    // Inner wrapper: integrity then AES-128-CFB under a random key, which travels as the
    // credential.
    let inner_key = random(INNER_KEY)?;
    let integrity = digest::digest(&digest::SHA256, &[sensitive.as_slice(), &object_name].concat());
    let mut enc_sensitive = tpm2b(integrity.as_ref());
    enc_sensitive.extend_from_slice(&sensitive);
    cfb(&inner_key, &mut enc_sensitive)?;

    // Outer wrapper to the SRK (duplication), and the credential to the EK bound to the
    // SRK's name (credential protection): the same construction with different labels.
    let (in_sym_seed, duplicate) = protect(srk, b"DUPLICATE\0", &object_name, enc_sensitive, &random)?;
    let (secret, id_object) = protect(ek, b"IDENTITY\0", srk.name(), tpm2b(&inner_key), &random)?;

    let mut blob = Vec::with_capacity(1200);
    for part in [&id_object, &secret, &duplicate, &in_sym_seed, &public] {
        put_tpm2b(&mut blob, part);
    }
    // An empty TPM2B_DATA ("encrypted URI data"), which C# and Node read unconditionally.
    put_tpm2b(&mut blob, &[]);
    Ok(blob)
}

/// Size of the HMAC key a challenge delivers (bytes).
pub const CHALLENGE_KEY_BYTES: usize = 32;

/// A fresh challenge for the TPM with the endorsement key `ek` and storage root key `srk`
/// (marshalled `TPM2B_PUBLIC`s): a random HMAC key and the blob that delivers it.
///
/// # Errors
/// Keys that [`StorageKey::parse`] refuses, or a failing random number generator.
pub fn new_challenge(ek: &[u8], srk: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let ek = StorageKey::parse(ek, "endorsementKey")?;
    let srk = StorageKey::parse(srk, "storageRootKey")?;
    let mut key = vec![0; CHALLENGE_KEY_BYTES];
    SystemRandom::new().fill(&mut key).map_err(|_| TpmError::Crypto("the random number generator"))?;
    let blob = authentication_key(&ek, &srk, &key)?;
    Ok((key, blob))
}

/// Protects `plain` for the holder of `key`'s private part: a random seed encrypted with
/// RSA-OAEP under `label`, `plain` encrypted with AES-CFB under `KDFa(seed, "STORAGE", name)`
/// and an HMAC under `KDFa(seed, "INTEGRITY")` over it and `name`. Returns the encrypted seed
/// and `TPM2B_DIGEST(hmac) ‖ ciphertext` (the body of a `TPM2B_ID_OBJECT` or `TPM2B_PRIVATE`).
fn protect(
    key: &StorageKey,
    label: &[u8],
    bound_name: &[u8],
    mut plain: Vec<u8>,
    random: &dyn Fn(usize) -> Result<Vec<u8>, TpmError>,
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let seed = random(DIGEST)?;
    let encrypted_seed = key.oaep(&seed, label)?;
    let sym_key = kdfa(&seed, b"STORAGE", bound_name, &[], u32::from(key.sym_bits));
    cfb(&sym_key, &mut plain)?;
    let hmac_key = kdfa(&seed, b"INTEGRITY", &[], &[], 8 * DIGEST as u32);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&plain);
    mac.update(bound_name);
    let mut body = tpm2b(mac.sign().as_ref());
    body.extend_from_slice(&plain);
    Ok((encrypted_seed, body))
}

/// TPM 2.0 KDFa with HMAC-SHA256: `HMAC(key, i ‖ label ‖ 0 ‖ u ‖ v ‖ bits)` for i = 1, 2, …
#[must_use]
pub fn kdfa(key: &[u8], label: &[u8], u: &[u8], v: &[u8], bits: u32) -> Vec<u8> {
    let want = (bits as usize).div_ceil(8);
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Vec::with_capacity(want + DIGEST);
    let mut i: u32 = 1;
    while out.len() < want {
        let mut c = hmac::Context::with_key(&key);
        c.update(&i.to_be_bytes());
        c.update(label);
        c.update(&[0]);
        c.update(u);
        c.update(v);
        c.update(&bits.to_be_bytes());
        out.extend_from_slice(c.sign().as_ref());
        i += 1;
    }
    out.truncate(want);
    out
}

/// AES-CFB (128-bit feedback) with a zero IV, in place, with a 128- or 256-bit key.
fn cfb(key: &[u8], buf: &mut [u8]) -> Result<(), TpmError> {
    let alg = if key.len() == 32 { &AES_256 } else { &AES_128 };
    let k = UnboundCipherKey::new(alg, key).map_err(|_| TpmError::Crypto("AES key set-up"))?;
    EncryptingKey::cfb128(k)
        .and_then(|k| k.less_safe_encrypt(buf, EncryptionContext::Iv128(FixedLength::from([0u8; 16]))))
        .map(|_| ())
        .map_err(|_| TpmError::Crypto("AES-CFB encryption"))
}

/// `TPM_ALG_SHA256 ‖ SHA-256(public area)`.
fn name(public: &[u8]) -> Vec<u8> {
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(digest::digest(&digest::SHA256, public).as_ref());
    n
}

fn tpm2b(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len() + 2);
    put_tpm2b(&mut v, b);
    v
}

fn put_tpm2b(out: &mut Vec<u8>, b: &[u8]) {
    // Every part is far below 64 KiB (keys of at most 4096 bits, keys of at most 128 bytes).
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&b[..usize::from(len)]);
}

/// DER `SubjectPublicKeyInfo` of an RSA public key, which is how the crypto library takes one.
fn rsa_spki(n: &[u8], e: u32) -> Vec<u8> {
    let rsa_key = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_bigint_bytes(n, true);
            w.next().write_u32(e);
        });
    });
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(&[1, 2, 840, 113_549, 1, 1, 1]));
                w.next().write_null();
            });
            w.next().write_bitvec_bytes(&rsa_key, rsa_key.len() * 8);
        });
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Big-endian reads off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TPM2B_PUBLIC of the TCG EK template (RSA-2048) with modulus `n`.
    fn ek_public(n: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&TPM_ALG_RSA.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        p.extend_from_slice(&0x0003_00B2_u32.to_be_bytes());
        put_tpm2b(&mut p, &[0x83; 32]);
        for v in [TPM_ALG_AES, 128, TPM_ALG_CFB, TPM_ALG_NULL, 2048] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        p.extend_from_slice(&0u32.to_be_bytes());
        put_tpm2b(&mut p, n);
        tpm2b(&p)
    }

    fn modulus() -> Vec<u8> {
        use aws_lc_rs::signature::KeyPair as _;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        // RSAPublicKey ::= SEQUENCE { n INTEGER, e INTEGER }
        let n = yasna::parse_der(kp.public_key().as_ref(), |r| {
            r.read_sequence(|r| {
                let (n, _) = r.next().read_bigint_bytes()?;
                r.next().read_u32()?;
                Ok(n)
            })
        })
        .unwrap();
        n.into_iter().skip_while(|b| *b == 0).collect()
    }

    #[test]
    fn kdfa_matches_its_definition_and_truncates() {
        let k = kdfa(b"seed", b"STORAGE", b"name", &[], 128);
        assert_eq!(k.len(), 16);
        let mut c = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, b"seed"));
        c.update(&[0, 0, 0, 1]);
        c.update(b"STORAGE\0name");
        c.update(&128u32.to_be_bytes());
        assert_eq!(k, c.sign().as_ref()[..16]);
        // 512 bits take two HMAC blocks, the second with counter 2.
        let long = kdfa(b"seed", b"X", &[], &[], 512);
        assert_eq!(long.len(), 64);
        assert_ne!(long[..32], long[32..]);
    }

    #[test]
    fn a_storage_key_parses_and_the_blob_has_the_sdk_layout() {
        let n = modulus();
        let ek = StorageKey::parse(&ek_public(&n), "endorsementKey").unwrap();
        let srk = StorageKey::parse(&ek_public(&n), "storageRootKey").unwrap();
        assert_eq!(ek.name().len(), 34);
        let blob = authentication_key(&ek, &srk, &[7; 32]).unwrap();
        let mut r = Reader(&blob);
        let id_object = r.tpm2b().unwrap();
        let secret = r.tpm2b().unwrap();
        let duplicate = r.tpm2b().unwrap();
        let seed = r.tpm2b().unwrap();
        let public = r.tpm2b().unwrap();
        let uri = r.tpm2b().unwrap();
        assert!(r.0.is_empty() && uri.is_empty());
        // The credential: TPM2B_DIGEST(hmac) ‖ encrypted TPM2B_DIGEST(16-byte key).
        assert_eq!(id_object.len(), 2 + 32 + 2 + 16);
        assert_eq!((secret.len(), seed.len()), (256, 256));
        assert_eq!(&public[..2], &TPM_ALG_KEYEDHASH.to_be_bytes());
        assert!(duplicate.len() > 2 + 32 + 2 + 32 + 2);
        // Fresh randomness every time.
        assert_ne!(blob, authentication_key(&ek, &srk, &[7; 32]).unwrap());
    }

    #[test]
    fn keys_that_are_not_storage_keys_are_refused() {
        let n = modulus();
        let good = ek_public(&n);
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "shorter"),
            (good[..good.len() - 1].to_vec(), "size field"),
            ([good.as_slice(), &[0]].concat(), "size field"),
        ];
        let mut ecc = good.clone();
        ecc[3] = 0x23;
        cases.push((ecc, "not an RSA key"));
        let mut sha1 = good.clone();
        sha1[5] = 0x04;
        cases.push((sha1, "SHA-256"));
        let mut signing = good.clone();
        signing[7] = 0x05; // restricted | sign: not decrypt
        cases.push((signing, "storage"));
        cases.push((ek_public(&n[..128]), "modulus"));
        for (bytes, why) in cases {
            let e = StorageKey::parse(&bytes, "endorsementKey").unwrap_err().to_string();
            assert!(e.contains("endorsementKey") && e.contains(why), "{why}: {e}");
        }
    }
}
