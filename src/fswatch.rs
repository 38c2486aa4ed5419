//! Watching mounted files. The kubelet updates a Secret or ConfigMap volume by
//! swapping a `..data` symlink in the mount directory, which changes no inode
//! of the file itself, so the parent directories are watched, not the files.

use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

/// Calls `on_change` (from notify's thread) on any event in the directories
/// holding `files`. Keep the returned watcher alive as long as events matter.
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
        if event.is_ok() {
            on_change();
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
