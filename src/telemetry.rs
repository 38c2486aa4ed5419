//! Logging setup: human-readable or JSON lines on stderr, written by a
//! thread of their own so that a slow log sink never stalls a request.

use std::io::IsTerminal as _;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Lines waiting for the writer thread; past this, new lines are dropped
/// and counted (`log_lines_dropped_total`) rather than making a request
/// wait for the sink. The queue is allocated whole at start (32 bytes a
/// line), so it is kept small: a burst this long is already an overload.
const QUEUED_LINES: usize = 1024;

/// The counter of dropped lines of the installed logger.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread; dropping it flushes what is queued. Hold it for
/// the life of the process.
#[derive(Debug)]
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// A writer into `sink` through a bounded queue that drops lines when full.
pub fn lossy_writer<W: std::io::Write + Send + 'static>(sink: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("fn-image-resolver-log")
        .finish(sink)
}

/// Installs the global subscriber: `filter` in `RUST_LOG` syntax; colours
/// only when stderr is a terminal. Safe to call once per process.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<LogGuard> {
    let env_filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {filter:?}: {e}"))?;
    let (writer, guard) = lossy_writer(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(LogGuard(guard))
}

/// Log lines dropped so far because the sink could not keep up.
pub fn dropped_log_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink that never finishes a write while the test holds its lock.
    struct Stuck(Arc<Mutex<()>>);

    impl std::io::Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _wait = self.0.lock();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sink_that_stops_never_blocks_the_logger_and_drops_are_counted() {
        let lock = Arc::new(Mutex::new(()));
        let held = lock.lock();
        let (mut writer, guard) = lossy_writer(Stuck(lock.clone()));
        // Far more lines than the queue holds: a blocking writer would hang
        // here for good; this one returns at once and counts what it drops.
        for i in 0..(QUEUED_LINES * 3) {
            writeln!(writer, "line {i}").expect("a lossy write never fails");
        }
        assert!(writer.error_counter().dropped_lines() >= QUEUED_LINES);
        drop(held);
        drop(guard);
    }
}
