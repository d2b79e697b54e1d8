//! The harness: in-process servers and helpers come from `provisio-testkit`; the tests of
//! the binary itself (signals, `kill -9`, its output) start the `provisio` executable as a
//! [`Process`].

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use provisio_testkit::{
    Info, Instance, Server, assert_dps_error, curl, curl_with, eventually, header, logged, now, put_enrollment,
    repo_root, run, service, tls_connect, walkthrough_derive, walkthrough_sas,
};

/// A running `provisio serve` process.
pub struct Process {
    child: Option<Child>,
    pub info: Info,
    pub port: u16,
    pub log: PathBuf,
}

impl Process {
    /// Starts `provisio serve` on `listen` with its state in `data_dir`, and waits until
    /// `/health` answers.
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let log =
            data_dir.join(format!("server-{}.log", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()));
        std::fs::create_dir_all(data_dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_provisio"))
            .args(["serve", "--json", "--data-dir"])
            .arg(data_dir)
            .args(["--https-listen", listen, "--hostname", "localhost", "--hostname", "127.0.0.1"])
            .args(if extra.contains(&"--mqtt-listen") { &[][..] } else { &["--mqtt-listen", "127.0.0.1:0"][..] })
            .args(if extra.contains(&"--amqp-listen") { &[][..] } else { &["--amqp-listen", "127.0.0.1:0"][..] })
            .args(extra)
            .env("PROVISIO_LOG", "info,provisio_server=debug,provisio_engine=debug")
            .env_remove("PROVISIO_CONFIG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn provisio");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let mut info: Info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad info line {line:?}: {e}"));
        if info.owner_key().is_none() {
            // After the first start, `serve` leaves the owner's key out; `info` has it.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_provisio"));
            cmd.args(["info", "--json", "--data-dir"]).arg(data_dir).env_remove("PROVISIO_CONFIG");
            for flag in ["--config", "--database"] {
                if let Some(i) = extra.iter().position(|a| *a == flag) {
                    cmd.args([flag, extra[i + 1]]);
                }
            }
            let full: Info = serde_json::from_str(run(&mut cmd).trim()).unwrap();
            let key = full.owner_key().expect("info prints the owner's key");
            info.service_connection_string = format!("{};SharedAccessKey={key}", info.service_connection_string);
        }
        let port = info.device_endpoint.rsplit_once(':').map_or(443, |(_, p)| p.parse().unwrap());
        let s = Self { child: Some(child), info, port, log };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&self) {
        let client = self.client();
        let url = self.url("/health");
        // Its own thread and runtime: callers may already be inside a runtime.
        let ok = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(provisio_testkit::eventually(Duration::from_secs(10), async || {
                client.get(&url).send().await.is_ok_and(|r| r.status() == 200)
            }))
        })
        .join()
        .unwrap();
        assert!(ok, "server never became healthy; log:\n{}", self.log_text());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no shutdown of any kind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        for _ in 0..100 {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c.kill().unwrap();
        panic!("server ignored SIGTERM for 10 s");
    }
}

impl Instance for Process {
    fn info(&self) -> &Info {
        &self.info
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
