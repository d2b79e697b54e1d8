//! A Provisio server in this process.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use clap::Parser;
use provisio::config::{ServeArgs, load_serve};
use provisio_server::{Provisio, ServerConfig};

use crate::{Info, Instance, logs};

/// `provisio serve`'s flags, parsed as the binary parses them.
#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

/// A running in-process server; stopped (gracefully) when dropped.
pub struct Server {
    /// Its start-up facts.
    pub info: Info,
    /// Its HTTPS port.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: logs::Buffer,
    thread_name: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts a server with its state in `data_dir`, its HTTPS listener on `listen` and
    /// `extra` flags of `provisio serve` (`--config FILE`, `--linked-hub H`, …), as
    /// `provisio serve --data-dir DIR --https-listen LISTEN --hostname localhost --hostname
    /// 127.0.0.1 EXTRA` would; MQTT and AMQP listen on `127.0.0.1:0` unless `extra` says
    /// otherwise. Returns once it serves.
    ///
    /// # Panics
    /// If the flags or the configuration are invalid, or the server does not start.
    #[must_use]
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut argv: Vec<String> = ["serve", "--data-dir"].map(str::to_owned).to_vec();
        argv.push(data_dir.display().to_string());
        argv.extend(
            ["--https-listen", listen, "--hostname", "localhost", "--hostname", "127.0.0.1"].map(str::to_owned),
        );
        for (flag, default) in [("--mqtt-listen", "127.0.0.1:0"), ("--amqp-listen", "127.0.0.1:0")] {
            if !extra.contains(&flag) {
                argv.extend([flag.to_owned(), default.to_owned()]);
            }
        }
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        let serve = Serve::try_parse_from(&argv).unwrap_or_else(|e| panic!("flags {argv:?}: {e}"));
        let (config, _log) = load_serve(&serve.args).unwrap_or_else(|e| panic!("configuration of {argv:?}: {e:#}"));
        Self::start_config(config)
    }

    /// Starts a server with exactly this configuration. Returns once it serves.
    ///
    /// # Panics
    /// If the server does not start.
    #[must_use]
    pub fn start_config(config: ServerConfig) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let thread_name = format!("{}{}", logs::THREAD_PREFIX, NEXT.fetch_add(1, Ordering::Relaxed));
        let log = logs::register(&thread_name);
        let data_dir = config.data_dir.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Info, String>>();
        let name = thread_name.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(name)
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = async {
                        let server = Provisio::open(config).await.map_err(|e| e.to_string())?;
                        let listeners = server.bind().await.map_err(|e| e.to_string())?;
                        let info = server.info(&listeners);
                        Ok::<_, String>((server, listeners, info))
                    };
                    match started.await {
                        Ok((server, listeners, info)) => {
                            let _ = ready_tx.send(Ok(info));
                            if let Err(e) = server
                                .run(listeners, async {
                                    let _ = stop_rx.await;
                                })
                                .await
                            {
                                eprintln!("in-process server failed: {e}");
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // Tasks of connections still open (a test's idle MQTT session) end here.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .unwrap_or_else(|e| panic!("cannot start a server thread: {e}"));
        let info = match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => panic!("the server did not start: {e}"),
            Err(e) => panic!("the server did not start in 60 s: {e}"),
        };
        let port = info.https_port();
        Self { info, port, data_dir, log, thread_name, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Shuts the server down as SIGTERM does (connections drained, store closed) and waits
    /// for it.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("the server thread of {} panicked", self.thread_name);
        }
    }
}

impl Instance for Server {
    fn info(&self) -> &Info {
        &self.info
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        logs::unregister(&self.thread_name);
    }
}
