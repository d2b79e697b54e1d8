//! Per-server logs in one process: every in-process server runs on threads named
//! `provisio-test-{n}`, and one global subscriber appends each event to the buffer of the
//! server whose thread wrote it (events of other threads are dropped). A test reads its own
//! server's lines, as it read a server process's stderr before.

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

/// One server's log lines.
pub(crate) type Buffer = Arc<Mutex<Vec<u8>>>;

/// Thread-name prefix of every in-process server's threads.
pub(crate) const THREAD_PREFIX: &str = "provisio-test-";

fn buffers() -> &'static Mutex<HashMap<String, Buffer>> {
    static BUFFERS: OnceLock<Mutex<HashMap<String, Buffer>>> = OnceLock::new();
    BUFFERS.get_or_init(Mutex::default)
}

/// A new buffer for the server whose threads are named `name`; installs the subscriber on
/// first use.
pub(crate) fn register(name: &str) -> Buffer {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::new("info,provisio_server=debug,provisio_engine=debug");
        // Another subscriber may be installed already (a test that set its own): then
        // servers' lines are not captured, which only makes log assertions fail loudly.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(Routed).try_init();
    });
    let buffer = Buffer::default();
    buffers().lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_owned(), buffer.clone());
    buffer
}

/// Forgets a stopped server's buffer.
pub(crate) fn unregister(name: &str) {
    buffers().lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name);
}

/// Routes each event to the buffer of the server thread that writes it.
struct Routed;

/// The writer of one event.
pub(crate) struct Line(Option<Buffer>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(b) = &self.0 {
            b.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Routed {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        let thread = std::thread::current();
        let buffer = thread
            .name()
            .filter(|n| n.starts_with(THREAD_PREFIX))
            .and_then(|n| buffers().lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(n).cloned());
        Line(buffer)
    }
}
