//! [`TpmDevice`] on the TCG software stack (tss-esapi over libtss2): a hardware TPM
//! (`device:/dev/tpmrm0`), swtpm (`swtpm:host=…,port=…`) or the Microsoft simulator
//! (`mssim:…`), named by a TCTI string.
//!
//! The EK is made from the TCG default template (RSA-2048) and the SRK from the template the
//! DPS SDKs use (RSA-2048, AES-128-CFB, `restricted | decrypt`); both are primary keys, so
//! making them again gives the same keys. The delivered HMAC key is loaded as a transient
//! object: it lives as long as this value (the SDKs persist it at `0x81000100`).

use std::str::FromStr;

use tss_esapi::{
    Context, TctiNameConf,
    abstraction::{AsymmetricAlgorithmSelection, ek},
    attributes::ObjectAttributesBuilder,
    constants::SessionType,
    handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        key_bits::RsaKeyBits,
        resource_handles::Hierarchy,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        Data, EncryptedSecret, IdObject, MaxBuffer, Private, Public, PublicBuilder, PublicKeyRsa,
        PublicRsaParametersBuilder, RsaExponent, SymmetricDefinition, SymmetricDefinitionObject,
    },
    traits::{Marshall, UnMarshall},
};

use crate::TpmDevice;

/// A TPM reached through libtss2.
pub struct TssTpm {
    ctx: Context,
    ek: KeyHandle,
    srk: KeyHandle,
    ek_public: Vec<u8>,
    srk_public: Vec<u8>,
    /// The key taken in last.
    key: Option<KeyHandle>,
}

fn err(what: &str) -> impl Fn(tss_esapi::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A marshalled `TPM2B_PUBLIC` of `public`.
fn tpm2b_public(public: &Public) -> Result<Vec<u8>, String> {
    let t = public.marshall().map_err(err("marshalling a public area"))?;
    let len = u16::try_from(t.len()).map_err(|_| "a public area over 64 KiB".to_owned())?;
    Ok([len.to_be_bytes().as_slice(), &t].concat())
}

impl TssTpm {
    /// Opens the TPM named by `tcti` (as `TPM2TOOLS_TCTI` names it) and makes its EK and SRK.
    ///
    /// # Errors
    /// A TPM that cannot be reached or refuses.
    pub fn open(tcti: &str) -> Result<Self, String> {
        let conf = TctiNameConf::from_str(tcti).map_err(err("the TCTI"))?;
        let mut ctx = Context::new(conf).map_err(err("connecting to the TPM"))?;
        let ek = ek::create_ek_object_2(&mut ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048), None)
            .map_err(err("making the endorsement key"))?;
        let (ek_public, _, _) = ctx.read_public(ek).map_err(err("reading the endorsement key"))?;
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .map_err(err("the SRK's attributes"))?;
        let parameters = PublicRsaParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            RsaKeyBits::Rsa2048,
            RsaExponent::default(),
        )
        .build()
        .map_err(err("the SRK's parameters"))?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_rsa_parameters(parameters)
            .with_rsa_unique_identifier(PublicKeyRsa::new_empty_with_size(RsaKeyBits::Rsa2048))
            .build()
            .map_err(err("the SRK's template"))?;
        let srk = ctx
            .execute_with_nullauth_session(|c| c.create_primary(Hierarchy::Owner, template, None, None, None, None))
            .map_err(err("making the storage root key"))?;
        Ok(Self {
            ek_public: tpm2b_public(&ek_public)?,
            srk_public: tpm2b_public(&srk.out_public)?,
            ek,
            srk: srk.key_handle,
            ctx,
            key: None,
        })
    }

    fn activate(&mut self, id_object: &[u8], secret: &[u8]) -> Result<Vec<u8>, String> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(err("starting a policy session"))?
            .ok_or("the TPM started no session")?;
        let policy = PolicySession::try_from(session).map_err(err("the policy session"))?;
        // The EK's policy: PolicySecret(TPM_RH_ENDORSEMENT).
        let activated = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(err("the endorsement policy"))
            .and_then(|_| {
                let blob = IdObject::try_from(id_object.to_vec()).map_err(err("the credential blob"))?;
                let secret = EncryptedSecret::try_from(secret.to_vec()).map_err(err("the credential secret"))?;
                let (srk, ek) = (self.srk, self.ek);
                self.ctx
                    .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                        c.activate_credential(srk, ek, blob, secret)
                    })
                    .map_err(err("activating the credential"))
            });
        let _ = self.ctx.flush_context(ObjectHandle::from(SessionHandle::from(session)));
        Ok(activated?.value().to_vec())
    }
}

impl Drop for TssTpm {
    fn drop(&mut self) {
        for h in [Some(self.ek), Some(self.srk), self.key.take()].into_iter().flatten() {
            let _ = self.ctx.flush_context(h.into());
        }
    }
}

/// The blob's TPM2B parts, without their size prefixes.
fn parts(blob: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = blob;
    while let Some((size, tail)) = rest.split_first_chunk::<2>() {
        let n = usize::from(u16::from_be_bytes(*size));
        let (part, tail) = tail.split_at_checked(n).ok_or("the key blob ends inside a part")?;
        out.push(part);
        rest = tail;
    }
    if !rest.is_empty() || out.len() < 5 {
        return Err("the key blob is not the five TPM structures DPS sends".into());
    }
    Ok(out)
}

impl TpmDevice for TssTpm {
    fn endorsement_key(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.ek_public.clone())
    }

    fn storage_root_key(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.srk_public.clone())
    }

    fn take_in(&mut self, blob: &[u8]) -> Result<(), String> {
        let p = parts(blob)?;
        // A TPM without a resource manager has room for three transient objects: the EK, the
        // SRK and one key. The new key replaces the old one.
        if let Some(old) = self.key.take() {
            let _ = self.ctx.flush_context(old.into());
        }
        let inner = self.activate(p[0], p[1])?;
        let public = Public::unmarshall(p[4]).map_err(err("the key's public area"))?;
        let srk = self.srk;
        let private = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.import(
                    srk.into(),
                    Some(Data::try_from(inner)?),
                    public.clone(),
                    Private::try_from(p[2].to_vec())?,
                    EncryptedSecret::try_from(p[3].to_vec())?,
                    SymmetricDefinitionObject::AES_128_CFB,
                )
            })
            .map_err(err("importing the key"))?;
        let key =
            self.ctx.execute_with_nullauth_session(|c| c.load(srk, private, public)).map_err(err("loading the key"))?;
        self.key = Some(key);
        Ok(())
    }

    fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        let key = self.key.ok_or("the TPM holds no key from the service yet")?;
        let buffer = MaxBuffer::try_from(data.to_vec()).map_err(err("the data to sign"))?;
        let mac = self
            .ctx
            .execute_with_nullauth_session(|c| c.hmac(key.into(), buffer, HashingAlgorithm::Sha256))
            .map_err(err("signing"))?;
        Ok(mac.value().to_vec())
    }
}
