//! The `authenticationKey` blob against a real TPM 2.0 implementation: swtpm, driven by
//! tpm2-tools, doing what the device SDKs do with it (ActivateCredential with the EK under a
//! PolicySecret session, Import and Load under the SRK, HMAC with the imported key).
//!
//! Needs `swtpm` and `tpm2-tools` (`.ci/run` installs them; Debian: `apt-get install swtpm
//! tpm2-tools`). Without them the test fails and says so.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use aws_lc_rs::hmac;
use provisio_core::tpm::{StorageKey, authentication_key};

/// A software TPM on loopback and a scratch directory for tpm2-tools' files.
struct SoftTpm {
    child: Child,
    dir: tempfile::TempDir,
    tcti: String,
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SoftTpm {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Two free ports, next to each other (command and control).
        let port = (0..50)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            })
            .find(|p| *p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok())
            .unwrap();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .args(["--server", &format!("type=tcp,port={port},bindaddr=127.0.0.1")])
            .args(["--ctrl", &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1)])
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("swtpm could not be started ({e}); install swtpm and tpm2-tools"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, dir, tcti: format!("swtpm:host=127.0.0.1,port={port}") }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Runs a tpm2-tools command in the scratch directory; panics with its output if it fails.
    fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.dir.path())
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .unwrap_or_else(|e| panic!("{} could not be run ({e}); install tpm2-tools", args[0]));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Creates the EK (TCG template, RSA-2048) and an SRK, and returns their `TPM2B_PUBLIC`s.
    fn keys(&self) -> (Vec<u8>, Vec<u8>) {
        self.run(&["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"]).unwrap();
        self.run(&["tpm2_createprimary", "-Q", "-C", "o", "-c", "srk.ctx"]).unwrap();
        self.run(&["tpm2_readpublic", "-Q", "-c", "srk.ctx", "-o", "srk.pub"]).unwrap();
        // swtpm has no resource manager: transient objects stay loaded until flushed.
        self.run(&["tpm2_flushcontext", "-t"]).unwrap();
        (std::fs::read(self.path("ek.pub")).unwrap(), std::fs::read(self.path("srk.pub")).unwrap())
    }

    /// What a device SDK does with the blob: activate, import, load; then HMAC `msg` with the
    /// imported key. Errors carry the TPM's answer.
    fn take_in_and_sign(&self, blob: &[u8], msg: &[u8]) -> Result<Vec<u8>, String> {
        let parts = split(blob);
        // tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
        let mut cred = vec![0xBA, 0xDC, 0xC0, 0xDE, 0, 0, 0, 1];
        cred.extend_from_slice(&parts[0]);
        cred.extend_from_slice(&parts[1]);
        write(&self.path("cred.bin"), &cred);
        write(&self.path("dup.bin"), &parts[2]);
        write(&self.path("seed.bin"), &parts[3]);
        write(&self.path("obj.pub"), &parts[4]);
        write(&self.path("msg.bin"), msg);
        self.run(&["tpm2_startauthsession", "--policy-session", "-S", "session.ctx"])?;
        let activated = self.run(&["tpm2_policysecret", "-S", "session.ctx", "-c", "e"]).and_then(|()| {
            self.run(&[
                "tpm2_activatecredential",
                "-c",
                "srk.ctx",
                "-C",
                "ek.ctx",
                "-i",
                "cred.bin",
                "-o",
                "inner.key",
                "-P",
                "session:session.ctx",
            ])
        });
        self.run(&["tpm2_flushcontext", "session.ctx"])?;
        self.run(&["tpm2_flushcontext", "-t"])?;
        activated?;
        let imported = self.run(&[
            "tpm2_import",
            "-C",
            "srk.ctx",
            "-u",
            "obj.pub",
            "-i",
            "dup.bin",
            "-s",
            "seed.bin",
            "-k",
            "inner.key",
            "-r",
            "obj.priv",
        ]);
        self.run(&["tpm2_flushcontext", "-t"])?;
        imported?;
        self.run(&["tpm2_load", "-C", "srk.ctx", "-u", "obj.pub", "-r", "obj.priv", "-c", "hmac.ctx"])?;
        let signed = self.run(&["tpm2_hmac", "-c", "hmac.ctx", "-g", "sha256", "-o", "mac.bin", "msg.bin"]);
        self.run(&["tpm2_flushcontext", "-t"])?;
        signed?;
        Ok(std::fs::read(self.path("mac.bin")).unwrap())
    }
}

fn write(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap();
}

/// The blob's six TPM2B parts, each with its size prefix.
fn split(blob: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = blob;
    while rest.len() >= 2 {
        let n = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        parts.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    assert!(rest.is_empty());
    assert_eq!(parts.len(), 6);
    parts
}

#[test]
fn a_real_tpm_takes_in_the_delivered_key_and_signs_with_it() {
    let tpm = SoftTpm::start();
    let (ek_pub, srk_pub) = tpm.keys();
    let ek = StorageKey::parse(&ek_pub, "endorsementKey").unwrap();
    let srk = StorageKey::parse(&srk_pub, "storageRootKey").unwrap();
    let key = [0x5a_u8; 32];
    let blob = authentication_key(&ek, &srk, &key).unwrap();
    let msg = b"0ne00000001%2Fregistrations%2Ftpm-1\n1767225600";
    let mac = tpm.take_in_and_sign(&blob, msg).unwrap();
    assert_eq!(mac, hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), msg).as_ref());
}

#[test]
fn a_blob_for_another_tpm_is_refused_by_this_one() {
    let tpm = SoftTpm::start();
    let (ek_pub, srk_pub) = tpm.keys();
    let other = SoftTpm::start();
    let (other_ek, _) = other.keys();
    let srk = StorageKey::parse(&srk_pub, "storageRootKey").unwrap();
    // Encrypted to another TPM's EK: this TPM cannot activate the credential.
    let foreign = StorageKey::parse(&other_ek, "endorsementKey").unwrap();
    let blob = authentication_key(&foreign, &srk, &[1; 32]).unwrap();
    let e = tpm.take_in_and_sign(&blob, b"m").unwrap_err();
    assert!(e.contains("tpm2_activatecredential"), "{e}");
    // A blob whose duplicate was altered: the import's integrity check fails.
    let ek = StorageKey::parse(&ek_pub, "endorsementKey").unwrap();
    let mut blob = authentication_key(&ek, &srk, &[1; 32]).unwrap();
    let parts = split(&blob);
    let at = parts[0].len() + parts[1].len() + parts[2].len() - 1;
    blob[at] ^= 1;
    let e = tpm.take_in_and_sign(&blob, b"m").unwrap_err();
    assert!(e.contains("tpm2_import"), "{e}");
}
