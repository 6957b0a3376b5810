//! What follows a request into logs and scrapes: the log subscriber (here), Prometheus
//! [`metrics`], and [`request_id`]s. Nothing here ever receives a token: handlers log route
//! classes, statuses, user and device ids only.
//!
//! Log lines go to stderr in batches: one `write` per line was one syscall per request (a sixth
//! of the proxy's syscalls on the passthrough path, and a wake-up of journald or the container
//! log reader every time). Lines are kept whole and in order, and written about
//! [`FLUSH_EVERY`] after the first of a batch, when [`FLUSH_AT`] bytes are pending, or at once
//! for warnings and errors; [`flush`] runs at exit and on a panic.

pub mod access;
pub mod metrics;
pub mod request_id;
pub mod scope;

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogFormat};

/// Longest time a line waits in the batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Pending bytes that trigger a write at once.
pub const FLUSH_AT: usize = 16 * 1024;

static STDERR: OnceLock<BatchedStderr> = OnceLock::new();

/// Installs the global subscriber (stderr). `RUST_LOG` wins over `log.level`.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = STDERR.get_or_init(BatchedStderr::start).clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        hook(info);
    }));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // Lines logged while a request is handled get its id from `scope` (no span per request).
    let installed = match cfg.format {
        // JSON lines: JSON fields, and the JSON event format (flattened) inside the prefix.
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(scope::SpanPrefix::new(
                tracing_subscriber::fmt::format().json().flatten_event(true),
                cfg.format,
            ))
            .try_init(),
        LogFormat::Pretty => builder
            .event_format(scope::SpanPrefix::new(
                tracing_subscriber::fmt::format(),
                cfg.format,
            ))
            .try_init(),
    };
    // The request lines take the fast path only where it writes what this subscriber would.
    if installed.is_ok() && !ansi {
        let _ = access::FORMAT.set(cfg.format);
    }
}

/// Writes out the lines still pending (call before the process exits).
pub fn flush() {
    if let Some(w) = STDERR.get() {
        w.0.flush();
    }
}

/// stderr, written in batches (see the module documentation).
#[derive(Clone)]
pub struct BatchedStderr(Arc<Batch>);

struct Batch {
    pending: Mutex<Vec<u8>>,
    /// Signalled when the first line of a batch arrives (the flusher sleeps until then: no
    /// wake-ups while nothing is logged).
    arrived: std::sync::Condvar,
}

impl Batch {
    fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        Self::write_out(&mut pending);
    }

    fn write_out(pending: &mut Vec<u8>) {
        if !pending.is_empty() {
            // Nowhere to report a failed log write; the lines are dropped as before.
            let _ = std::io::stderr().write_all(pending);
            pending.clear();
        }
    }
}

impl BatchedStderr {
    /// The writer, and a thread that writes out pending lines about [`FLUSH_EVERY`] after the
    /// first of them arrived.
    pub fn start() -> Self {
        let batch = Arc::new(Batch {
            pending: Mutex::new(Vec::with_capacity(FLUSH_AT)),
            arrived: std::sync::Condvar::new(),
        });
        let weak: Weak<Batch> = Arc::downgrade(&batch);
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                while let Some(b) = weak.upgrade() {
                    let pending = b.pending.lock().unwrap_or_else(|p| p.into_inner());
                    // Bounded wait, so the thread ends soon after the writer is gone.
                    let (pending, _) = b
                        .arrived
                        .wait_timeout_while(pending, Duration::from_secs(1), |p| p.is_empty())
                        .unwrap_or_else(|p| p.into_inner());
                    let waiting = !pending.is_empty();
                    drop(pending);
                    if waiting {
                        // Let the batch fill for a moment, then write it in one go.
                        std::thread::sleep(FLUSH_EVERY);
                        b.flush();
                    }
                }
            });
        BatchedStderr(batch)
    }
}

/// One log line's writer: appends to the batch.
pub struct LineWriter<'a> {
    batch: &'a Batch,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.batch.pending.lock().unwrap_or_else(|p| p.into_inner());
        let first = pending.is_empty();
        pending.extend_from_slice(buf);
        if self.urgent || pending.len() >= FLUSH_AT {
            Batch::write_out(&mut pending);
        } else if first {
            self.batch.arrived.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BatchedStderr {
    /// A writer of one line; `urgent` lines are written at once.
    pub fn line_writer(&self, urgent: bool) -> LineWriter<'_> {
        LineWriter {
            batch: &self.0,
            urgent,
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            batch: &self.0,
            urgent: false,
        }
    }

    /// Warnings and errors are written at once.
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            batch: &self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_in_the_batch_warnings_do_not() {
        let w = BatchedStderr(Arc::new(Batch {
            pending: Mutex::new(Vec::new()),
            arrived: std::sync::Condvar::new(),
        }));
        let info = tracing::Metadata::new(
            "i",
            "t",
            Level::INFO,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        w.make_writer_for(&info).write_all(b"line 1\n").unwrap();
        assert_eq!(*w.0.pending.lock().unwrap(), b"line 1\n");
        let warn = tracing::Metadata::new(
            "w",
            "t",
            Level::WARN,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        );
        w.make_writer_for(&warn).write_all(b"warning\n").unwrap();
        assert!(w.0.pending.lock().unwrap().is_empty());
        let big = vec![b'x'; FLUSH_AT];
        w.make_writer().write_all(&big).unwrap();
        assert!(w.0.pending.lock().unwrap().is_empty());
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unimplemented!()
        }
    }
}

/// What a test subscriber writes, kept in memory (the formatter tests of `access` and `scope`).
#[cfg(test)]
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}
