//! Following mounted files, and retrying with backoff.
//!
//! The kubelet updates a Secret or ConfigMap volume by swapping a `..data`
//! symlink in the mount directory, which changes no inode of the file
//! itself, so the parent directories are watched, not the files; a slow
//! periodic re-read backs the watcher up (missed events, file systems without
//! inotify). The Docker config, the serving certificate and the pull-secret
//! mirror's source all follow their files this way.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Coalesces the burst of events a symlink swap produces.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Events from the directories holding some files.
#[derive(Debug)]
pub struct FileWatch {
    events: mpsc::Receiver<()>,
    /// Dropping it stops the events; `None` when watching failed.
    _watcher: Option<RecommendedWatcher>,
}

impl FileWatch {
    /// Watches the directories of `files`. If that fails (no inotify), says
    /// so once and reports no events: the caller's periodic re-read remains.
    pub fn new(files: &[&Path]) -> Self {
        let (tx, events) = mpsc::channel::<()>(1);
        let watcher = watch_parents(files, move || {
            // Full channel: a change is already pending, which is enough.
            let _ = tx.try_send(());
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                let files: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
                warn!(?files, error = %e, "cannot watch these files; relying on the periodic re-read");
                None
            }
        };
        Self {
            events,
            _watcher: watcher,
        }
    }

    /// Resolves once something may have changed, after the burst of events
    /// that came with it. Never resolves without a watcher.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.events.try_recv().is_ok() {}
    }
}

/// Runs `reload` whenever one of `files` may have changed and every
/// `resync`, until `shutdown`. A failed reload is logged (what is in use
/// stays) and retried with backoff, so a half-written file is read again
/// soon after it is complete.
pub async fn follow<E: Display>(
    what: &'static str,
    files: &[&Path],
    resync: Duration,
    shutdown: CancellationToken,
    mut reload: impl FnMut() -> Result<(), E>,
) {
    let mut watch = FileWatch::new(files);
    let mut resync = tokio::time::interval(resync);
    // The first tick is now: one read once the watch is in place catches a
    // change made between the caller's own first read and the watch.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut retry: Option<Duration> = None;
    loop {
        let retry_sleep = async {
            match retry {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = watch.changed() => {}
            _ = resync.tick() => {}
            () = retry_sleep => {}
        }
        match reload() {
            Ok(()) => {
                backoff.reset();
                retry = None;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "keeping the last good {what}");
                retry = Some(delay);
            }
        }
    }
}

/// Exponential backoff between retries: doubles from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next retry; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next.saturating_mul(2)).min(self.max);
        delay
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Calls `on_change` (from notify's thread) when something in the directories
/// holding `files` may have changed. Keep the returned watcher alive as long as
/// events matter.
pub fn watch_parents(
    files: &[&Path],
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<RecommendedWatcher> {
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| changes_content(&e.kind)) {
            on_change();
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// notify 8 also reports opens and read-only closes. Our own re-read of a
/// watched file produces those, so reacting to them reloads in a loop (seen
/// in a callgrind profile: the certificate re-read every 50 ms under load).
/// A close after writing still counts: it is how a writer says it is done.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};

    use super::*;

    #[test]
    fn reading_a_watched_file_is_not_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tls.crt");
        std::fs::write(&file, "one").expect("write");
        let (tx, rx) = mpsc::channel();
        let _watcher = watch_parents(&[&file], move || {
            let _ = tx.send(());
        })
        .expect("watch");
        for _ in 0..20 {
            std::fs::read(&file).expect("read");
        }
        // A write after the reads: the first event must be this write's.
        std::fs::write(dir.path().join("marker"), "x").expect("write marker");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the write is reported");
        // Let the rest of the queue arrive; it only can make the count larger.
        std::thread::sleep(Duration::from_millis(300));
        let extra = rx.try_iter().count();
        // create + modify + close-write of the marker at most; 20 reads
        // would have added 40 open/close events.
        assert!(extra <= 3, "{extra} events besides the write");
    }

    #[test]
    fn backoff_doubles_up_to_its_limit_and_starts_over_after_a_success() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.next_delay(), Duration::MAX, "no overflow");
        assert_eq!(huge.next_delay(), Duration::MAX);
    }

    #[tokio::test]
    async fn a_failed_reload_is_retried_without_waiting_for_an_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config");
        let calls = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let task = {
            let (calls, shutdown, file) = (calls.clone(), shutdown.clone(), file.clone());
            tokio::spawn(async move {
                follow(
                    "test",
                    &[&file],
                    Duration::from_secs(3600),
                    shutdown,
                    || {
                        // Fails twice, then works.
                        match calls.fetch_add(1, Ordering::SeqCst) {
                            0 | 1 => Err("half written"),
                            _ => Ok(()),
                        }
                    },
                )
                .await;
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&file, "x").expect("write");
        for _ in 0..100 {
            if calls.load(Ordering::SeqCst) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one event, two retries");
        // After the success it waits for the next event (none comes).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        shutdown.cancel();
        task.await.expect("task");
    }
}
