//! Watching mounted files. The kubelet updates a Secret or ConfigMap volume by
//! swapping a `..data` symlink in the mount directory, which changes no inode
//! of the file itself, so the parent directories are watched, not the files.

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

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
    use std::sync::mpsc;
    use std::time::Duration;

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
}
