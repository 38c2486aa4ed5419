//! Follows the mounted Docker config. The kubelet updates a Secret volume by
//! swapping a `..data` symlink in the mount directory, so the directory is
//! watched (not the file), and a slow periodic re-read backs the watcher up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::CachedResolver;
use crate::registry::Credentials;

/// Backstop for missed events (and for file systems without inotify).
const RESYNC: Duration = Duration::from_secs(30);
/// Coalesces the burst of events a symlink swap produces.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Reloads `credentials` whenever the file at `path` may have changed and
/// drops cache entries fetched with credentials that are gone. Runs until
/// `shutdown`.
pub async fn watch_credentials(
    path: PathBuf,
    credentials: Arc<Credentials>,
    cache: CachedResolver,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let _watcher = match crate::fswatch::watch_parents(&[&path], move || {
        // Full channel: a reload is already pending, which is enough.
        let _ = tx.try_send(());
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot watch the Docker config; re-reading it every {}s", RESYNC.as_secs());
            None
        }
    };
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rx.recv() => tokio::time::sleep(DEBOUNCE).await,
            _ = resync.tick() => {}
        }
        // Drain what arrived during the debounce.
        while rx.try_recv().is_ok() {}
        match credentials.reload() {
            Ok(true) => {
                cache.retain_credentials(&credentials.current().identities());
                info!(path = %path.display(), "credentials changed; answers fetched with old credentials dropped");
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "keeping the last good Docker config"),
        }
    }
}
