//! The pull-secret mirror: keeps Secret `--registry-auth-secret-name` in
//! `--pod-namespace` equal to the Docker config mounted at
//! `--registry-auth-secret-path`.
//!
//! It reacts to the source file (the kubelet swaps a `..data` symlink, so the
//! directory is watched), to the target (a watch on that one Secret: deleted
//! or edited means restored at once), and to a periodic resync; failures are
//! retried with backoff. Writes are server-side applies with one field
//! manager and forced ownership: several replicas writing the same bytes
//! converge (an identical apply changes nothing, not even the
//! resourceVersion), so no leader election is needed. A source that is not
//! valid Docker config JSON never reaches the target: the last good one stays.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};

use crate::health::{Check, Readiness};
use crate::metrics::Metrics;
use crate::registry::DockerConfig;
use crate::reload::{Backoff, FileWatch};

pub const SECRET_TYPE: &str = "kubernetes.io/dockerconfigjson";
pub const SECRET_KEY: &str = ".dockerconfigjson";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "fn-image-resolver";
const FIELD_MANAGER: &str = "fn-image-resolver";
/// Set only when the mirror creates the Secret, never by its later applies
/// (which would add it to a Secret Porch created too, as they add the
/// managed-by label): how `unregister` tells ours from Porch's.
pub const CREATED_ANNOTATION: &str = "fn-image-resolver.kpt.dev/created";

#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub source: PathBuf,
    pub name: String,
    pub namespace: String,
    pub resync: Duration,
}

/// What the mirror knows: whether it has put the Secret in place once
/// (readiness), and whether the Secret exists now, whoever wrote it (the
/// webhook injects it only then; Porch's function runner writes it too).
/// That comes from the watch on the Secret alone, in the order the API
/// server sent its events.
#[derive(Debug, Default)]
pub struct MirrorStatus {
    synced: AtomicBool,
    exists: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl MirrorStatus {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The Secret exists in the namespace, as far as the watch on it knows.
    pub fn secret_exists(&self) -> bool {
        self.exists.load(Ordering::Acquire)
    }

    fn set_exists(&self, exists: bool) {
        self.exists.store(exists, Ordering::Release);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, result: &Result<(), String>) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                self.synced.store(true, Ordering::Release);
                // Whether it exists is the watch's to say, never a sync's: a
                // sync that read the Secret just before a delete would
                // otherwise say it exists after the watch said it is gone.
                *last = None;
            }
            Err(e) => *last = Some(e.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Not a failure: an optional Secret volume whose Secret does not exist
    /// (a Porch without private registries). Synced once the file appears.
    #[error(
        "no Docker config at {path} to mirror yet: pods are admitted without the pull secret until the file appears"
    )]
    NoSourceYet { path: PathBuf },
    #[error("the source {path} is unusable and no earlier good copy exists: {reason}")]
    NoSource { path: PathBuf, reason: String },
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Get {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot apply Secret {namespace}/{name}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What one sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    Created,
    Updated,
    Unchanged,
}

impl SyncOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// The mirror's state between syncs.
#[derive(Debug)]
pub struct Mirror {
    api: Api<Secret>,
    settings: MirrorSettings,
    metrics: Arc<Metrics>,
    last_good: Option<Vec<u8>>,
    /// When the source last changed and the target has not caught up yet.
    pending_since: Option<Instant>,
}

impl Mirror {
    pub fn new(client: kube::Client, settings: MirrorSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            metrics,
            last_good: None,
            pending_since: None,
        }
    }

    /// The bytes to mirror: the source if it is valid Docker config JSON,
    /// else the last good copy.
    fn source(&mut self) -> Result<Vec<u8>, SyncError> {
        let path = &self.settings.source;
        if self.last_good.is_none() && !path.exists() {
            self.metrics.secret_sync("no-source");
            return Err(SyncError::NoSourceYet { path: path.clone() });
        }
        let read = std::fs::read(path)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|bytes| {
                DockerConfig::parse(&bytes, path)
                    .map(|_| bytes)
                    .map_err(|e| e.to_string())
            });
        match read {
            Ok(bytes) => {
                if self.last_good.as_ref() != Some(&bytes) {
                    if self.last_good.is_some() {
                        self.pending_since = Some(Instant::now());
                    }
                    self.last_good = Some(bytes.clone());
                }
                Ok(bytes)
            }
            Err(reason) => {
                self.metrics.secret_sync("invalid-source");
                warn!(path = %path.display(), error = %reason, "Docker config unusable; the pull secret keeps the last good copy");
                self.last_good.clone().ok_or_else(|| SyncError::NoSource {
                    path: path.clone(),
                    reason,
                })
            }
        }
    }

    /// Makes the target equal to the source (one GET, plus one apply when
    /// they differ).
    pub async fn sync(&mut self) -> Result<SyncOutcome, SyncError> {
        let data = self.source()?;
        let (namespace, name) = (self.settings.namespace.clone(), self.settings.name.clone());
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(|source| SyncError::Get {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
        let in_place = current.as_ref().is_some_and(|s| {
            s.type_.as_deref() == Some(SECRET_TYPE)
                && s.data
                    .as_ref()
                    .and_then(|d| d.get(SECRET_KEY))
                    .map(|b| &b.0)
                    == Some(&data)
                && s.data.as_ref().is_some_and(|d| d.len() == 1)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .map(String::as_str)
                    == Some(MANAGED_BY)
        });
        if in_place {
            self.pending_since = None;
            return Ok(SyncOutcome::Unchanged);
        }
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_string(),
                    MANAGED_BY.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            data: Some(BTreeMap::from([(SECRET_KEY.to_string(), ByteString(data))])),
            ..Default::default()
        };
        if current.is_none() {
            // A plain create carries the mark; the annotation is then owned
            // by this manager's create, not by its applies, so no later
            // apply removes it. Someone else creating it first (another
            // replica, Porch) is no error: apply over theirs, unmarked.
            let mut marked = secret.clone();
            marked.metadata.annotations = Some(BTreeMap::from([(
                CREATED_ANNOTATION.to_string(),
                "true".to_string(),
            )]));
            let params = kube::api::PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..Default::default()
            };
            match self.api.create(&params, &marked).await {
                Ok(_) => {
                    if let Some(since) = self.pending_since.take() {
                        self.metrics.secret_propagation(since.elapsed());
                    }
                    return Ok(SyncOutcome::Created);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(source) => {
                    return Err(SyncError::Apply {
                        namespace,
                        name,
                        source,
                    });
                }
            }
            secret.metadata.annotations = None;
        }
        self.api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|source| SyncError::Apply {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
        if let Some(since) = self.pending_since.take() {
            self.metrics.secret_propagation(since.elapsed());
        }
        Ok(if current.is_some() {
            SyncOutcome::Updated
        } else {
            SyncOutcome::Created
        })
    }
}

/// Runs the mirror until `shutdown`. `status` turns synced after the first
/// success and carries the last error.
pub async fn run(
    client: kube::Client,
    settings: MirrorSettings,
    status: Arc<MirrorStatus>,
    metrics: Arc<Metrics>,
    readiness: Option<Arc<Readiness>>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<&'static str>(16);
    let mut source = FileWatch::new(&[&settings.source]);
    // Watch just the target Secret: deleted or edited means restored now,
    // and it tells the webhook whether the Secret exists.
    let target = {
        let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        let status = status.clone();
        tokio::spawn(
            async move {
            let mut events = watcher(api, config).boxed();
            // Whether the listing that a (re)started watch begins with saw it.
            let mut listed = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    event = events.next() => match event {
                        Some(Ok(event)) => {
                            match event {
                                watcher::Event::Apply(_) => status.set_exists(true),
                                watcher::Event::Delete(_) => status.set_exists(false),
                                watcher::Event::Init => listed = false,
                                watcher::Event::InitApply(_) => listed = true,
                                watcher::Event::InitDone => status.set_exists(listed),
                            }
                            let _ = tx.try_send("target changed");
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, "watch on the pull secret interrupted; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        None => return,
                    }
                }
            }
        }
            .in_current_span(),
        )
    };
    let mut mirror = Mirror::new(client, settings.clone(), metrics.clone());
    let mut resync = tokio::time::interval(settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut retry_at: Option<tokio::time::Instant>;
    let mut reason = "startup";
    let mut waiting_logged = false;
    loop {
        let result = mirror.sync().await;
        let recorded = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        status.record(&recorded);
        // Readiness waits for this first attempt, not for its success: the
        // webhook admits pods either way (it injects the Secret only where
        // it exists), so a mirror that cannot write is a reason to read in
        // /readyz, a metric and an alert, never a replica out of service.
        if let Some(readiness) = &readiness {
            readiness.set(
                READINESS_CHECK,
                match &recorded {
                    Ok(()) => Check::Ready,
                    Err(reason) => Check::Degraded(reason.clone()),
                },
            );
        }
        match result {
            Err(e @ SyncError::NoSourceYet { .. }) => {
                // Nothing to retry: the file watch and the resync notice it.
                if !waiting_logged {
                    info!(reason = %e, "pull-secret mirror waiting for its source");
                    waiting_logged = true;
                }
                retry_at = None;
            }
            Ok(outcome) => {
                metrics.secret_sync(outcome.as_str());
                if outcome != SyncOutcome::Unchanged {
                    info!(secret = %settings.name, namespace = %settings.namespace, outcome = outcome.as_str(), reason, "pull secret synced");
                }
                metrics.secret_synced_now();
                backoff.reset();
                retry_at = None;
            }
            Err(e) => {
                metrics.secret_sync("error");
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "pull secret sync failed");
                retry_at = Some(tokio::time::Instant::now() + delay);
            }
        }
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = source.changed() => reason = "source changed",
            r = rx.recv() => {
                reason = r.unwrap_or("events closed");
                // Coalesce bursts (an edit can be several events).
                tokio::time::sleep(Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = resync.tick() => reason = "resync",
            () = retry => reason = "retry",
        }
    }
    target.abort();
}

/// What [`delete_if_created`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Deleted,
    /// Someone else (Porch's function runner) created it: left alone.
    NotCreatedByUs,
    Gone,
}

/// Deletes the pull secret if the mirror created it (uninstall): a Secret
/// Porch wrote stays, even though the mirror's applies labelled it too.
pub async fn delete_if_created(api: &Api<Secret>, name: &str) -> Result<Removal, kube::Error> {
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(Removal::Gone);
    };
    let created = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREATED_ANNOTATION))
        .is_some_and(|v| v == "true");
    if !created {
        return Ok(Removal::NotCreatedByUs);
    }
    // Only the object just read: if it was replaced meanwhile, it is not
    // the one we checked.
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: secret.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(Removal::Deleted),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(Removal::Gone),
        Err(e) => Err(e),
    }
}

/// The readiness check the mirror reports into.
pub const READINESS_CHECK: &str = "pull-secret";

/// How long readiness waits for the mirror's first attempt to end.
pub const FIRST_ATTEMPT_WAIT: Duration = Duration::from_secs(10);

/// Runs the mirror once a Kubernetes client can be built (in-cluster or
/// `$KUBECONFIG`), retrying until then with the reason in `readiness`.
/// Readiness waits for the first attempt at most [`FIRST_ATTEMPT_WAIT`];
/// past that the check is degraded with its reason, not failing.
pub async fn run_when_connected(
    settings: MirrorSettings,
    status: Arc<MirrorStatus>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    readiness.set(READINESS_CHECK, Err("first sync not done yet".into()));
    let bound = {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FIRST_ATTEMPT_WAIT).await;
            if let Some(Check::NotReady(reason)) = readiness.get(READINESS_CHECK) {
                readiness.set(
                    READINESS_CHECK,
                    Check::Degraded(format!(
                        "no sync done within {}s: {reason}",
                        FIRST_ATTEMPT_WAIT.as_secs()
                    )),
                );
            }
        })
    };
    let _abort_bound = tokio_util::task::AbortOnDropHandle::new(bound);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let client = loop {
        match crate::cluster::client().await {
            Ok(client) => break client,
            Err(reason) => {
                warn!(error = %reason, "secret mirror waiting for a Kubernetes client");
                // Still within the first attempt's wait: keep its state.
                if let Some(Check::Degraded(_)) = readiness.get(READINESS_CHECK) {
                    readiness.set(READINESS_CHECK, Check::Degraded(reason));
                } else {
                    readiness.set(READINESS_CHECK, Err(reason));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    run(client, settings, status, metrics, Some(readiness), shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_that_read_the_secret_before_a_delete_does_not_bring_it_back() {
        let status = MirrorStatus::default();
        // The watch saw it; a sync reads it (exists) and, before the sync
        // records its success, the watch sees it deleted.
        status.set_exists(true);
        status.set_exists(false);
        status.record(&Ok(()));
        assert!(status.is_synced());
        assert!(
            !status.secret_exists(),
            "the delete the watch saw last stands"
        );
        // It exists again only when the watch says so.
        status.set_exists(true);
        assert!(status.secret_exists());
    }
}
