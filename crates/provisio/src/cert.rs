//! `provisio cert`: test certificate chains, as the walkthrough's `create_test_cert` tool
//! makes them, plus proof-of-possession certificates.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use provisio_pki::{
    CertAndKey,
    testcerts::{self, KeyKind, Role},
};

/// `provisio cert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// A self-signed root CA: NAME_cert.pem, NAME_key.pem, NAME_fullchain.pem.
    Root {
        /// Common name, also the file name prefix.
        name: String,
        #[command(flatten)]
        opts: Opts,
    },
    /// An intermediate CA signed by --ca.
    Intermediate {
        /// Common name, also the file name prefix.
        name: String,
        #[command(flatten)]
        issuer: IssuerArgs,
        #[command(flatten)]
        opts: Opts,
    },
    /// A device certificate (CN = NAME = the registration id) signed by --ca.
    Device {
        /// Common name = registration id, also the file name prefix.
        name: String,
        #[command(flatten)]
        issuer: IssuerArgs,
        #[command(flatten)]
        opts: Opts,
    },
    /// A proof-of-possession certificate: CN = the verification code, signed by the CA's key.
    Verification {
        /// The CA certificate (PEM) being verified.
        #[arg(long, value_name = "CERT")]
        ca: PathBuf,
        /// The CA's private key (PEM).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The verification code from `generateVerificationCode`.
        #[arg(long, value_name = "CODE")]
        nonce: String,
        /// File name prefix.
        #[arg(long, default_value = "verification")]
        name: String,
        #[command(flatten)]
        opts: Opts,
    },
}

/// Options shared by every `cert` command.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// RSA-2048 keys instead of ECDSA P-256.
    #[arg(long)]
    rsa: bool,
    /// Days of validity.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=36500))]
    days: i64,
    /// Directory to write to.
    #[arg(long, default_value = ".", value_name = "DIR")]
    out_dir: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

/// The issuer of an intermediate or device certificate.
#[derive(Debug, Clone, clap::Args)]
pub struct IssuerArgs {
    /// The issuing CA: a name made by `provisio cert` (its NAME_cert.pem and NAME_key.pem in
    /// --out-dir) or the path of its certificate PEM.
    #[arg(long, value_name = "ISSUER")]
    ca: String,
    /// The issuer's private key, when --ca is a path whose key is not beside it as *_key.pem.
    #[arg(long, value_name = "KEY")]
    ca_key: Option<PathBuf>,
}

struct Issuer {
    ca: CertAndKey,
    /// The issuer's chain (its fullchain file, or its certificate).
    chain_pem: String,
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

fn load_issuer(a: &IssuerArgs, out_dir: &Path) -> Result<Issuer> {
    let as_path = PathBuf::from(&a.ca);
    let (cert_path, key_path, chain_path) = if as_path.is_file() {
        let s = a.ca.clone();
        let key = a
            .ca_key
            .clone()
            .unwrap_or_else(|| PathBuf::from(s.replace("_cert.pem", "_key.pem").replace("_fullchain.pem", "_key.pem")));
        let chain = PathBuf::from(s.replace("_cert.pem", "_fullchain.pem"));
        (as_path, key, chain)
    } else {
        (
            out_dir.join(format!("{}_cert.pem", a.ca)),
            a.ca_key.clone().unwrap_or_else(|| out_dir.join(format!("{}_key.pem", a.ca))),
            out_dir.join(format!("{}_fullchain.pem", a.ca)),
        )
    };
    if !cert_path.is_file() {
        bail!(
            "issuer certificate {} not found (give --ca NAME of a certificate made here, or a PEM path)",
            cert_path.display()
        );
    }
    if !key_path.is_file() {
        bail!("issuer key {} not found (give --ca-key)", key_path.display());
    }
    let cert_pem = read(&cert_path)?;
    let chain_pem = if chain_path.is_file() { read(&chain_path)? } else { cert_pem.clone() };
    let first =
        provisio_pki::x509::decode_pem_chain(&cert_pem).map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
    let Some(first) = first.first() else { bail!("{} holds no certificate", cert_path.display()) };
    if !provisio_pki::x509::is_ca(first).unwrap_or(false) {
        bail!("{} is not a CA certificate (CA:TRUE), so it cannot issue certificates", cert_path.display());
    }
    Ok(Issuer { ca: CertAndKey { cert_pem, key_pem: read(&key_path)? }, chain_pem })
}

/// Writes one file; `emit` has already refused to overwrite without --force.
fn write(path: &Path, content: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    // A key file is 0600 from its creation, not restricted after its key is in it.
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        // A file that existed (overwritten with --force) keeps its mode unless told.
        if path.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    let _ = secret;
    o.open(path)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn emit(name: &str, opts: &Opts, issued: &CertAndKey, chain_above: Option<&str>) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) {
        bail!("NAME must be a plain name (it is also the file name prefix)");
    }
    std::fs::create_dir_all(&opts.out_dir)?;
    let files = [
        (opts.out_dir.join(format!("{name}_cert.pem")), issued.cert_pem.clone(), false),
        (opts.out_dir.join(format!("{name}_key.pem")), issued.key_pem.clone(), true),
        (
            opts.out_dir.join(format!("{name}_fullchain.pem")),
            format!("{}{}", issued.cert_pem, chain_above.unwrap_or("")),
            false,
        ),
    ];
    // Check all three first, so a refusal leaves nothing half-written.
    if !opts.force
        && let Some((p, _, _)) = files.iter().find(|(p, _, _)| p.exists())
    {
        bail!("{} exists; pass --force to overwrite it", p.display());
    }
    for (p, c, secret) in &files {
        write(p, c, *secret)?;
    }
    Ok(())
}

/// Runs a `cert` command.
pub fn run(cmd: CertCommand) -> Result<()> {
    eprintln!("WARNING: these certificates are for testing only: their private keys are written unencrypted.");
    let kind = |o: &Opts| if o.rsa { KeyKind::Rsa2048 } else { KeyKind::EcdsaP256 };
    match cmd {
        CertCommand::Root { name, opts } => {
            let c = testcerts::issue(Role::Root, &name, None, kind(&opts), opts.days)?;
            emit(&name, &opts, &c, None)
        }
        CertCommand::Intermediate { name, issuer, opts } => {
            let i = load_issuer(&issuer, &opts.out_dir)?;
            let c = testcerts::issue(Role::Intermediate, &name, Some(&i.ca), kind(&opts), opts.days)?;
            emit(&name, &opts, &c, Some(&i.chain_pem))
        }
        CertCommand::Device { name, issuer, opts } => {
            provisio_core::ids::RegistrationId::parse(&name)?;
            if name.len() > 64 {
                bail!("an X.509 registration id is at most 64 characters (the CN limit)");
            }
            let i = load_issuer(&issuer, &opts.out_dir)?;
            let c = testcerts::issue(Role::Device, &name, Some(&i.ca), kind(&opts), opts.days)?;
            emit(&name, &opts, &c, Some(&i.chain_pem))
        }
        CertCommand::Verification { ca, key, nonce, name, opts } => {
            let nonce = nonce.trim();
            if nonce.is_empty() || nonce.len() > 64 {
                bail!("--nonce must be the verification code (1 to 64 characters)");
            }
            let issuer = CertAndKey { cert_pem: read(&ca)?, key_pem: read(&key)? };
            let c = testcerts::issue(Role::Verification, nonce, Some(&issuer), kind(&opts), opts.days.min(30))?;
            emit(&name, &opts, &c, None)
        }
    }
}
