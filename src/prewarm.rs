//! A warm cache after every rollout: at start-up, the images of
//! `--prewarm-images` (and `--prewarm-images-file`) and of the function pods
//! already in the pod namespace are resolved before the service says it is
//! ready, so the first function pods after a rollout do not wait on
//! registries inside admission.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tracing::{debug, info, warn};

use crate::admission::mutate::ORIGINAL_IMAGES_ANNOTATION;
use crate::cache::CachedResolver;
use crate::health::Readiness;
use crate::metrics::Metrics;

/// The readiness check pre-warming reports into.
pub const READINESS_CHECK: &str = "prewarm";

/// What to warm.
#[derive(Debug, Clone, Default)]
pub struct PrewarmSettings {
    /// Images named on the command line.
    pub images: Vec<String>,
    /// A file of images, one per line (`#` comments).
    pub file: Option<PathBuf>,
    /// The namespace and label of the function pods whose images to warm,
    /// when the API server is reachable.
    pub pods: Option<(String, String)>,
    /// Readiness waits for warming at most this long.
    pub timeout: Duration,
}

impl PrewarmSettings {
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.file.is_none() && self.pods.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read --prewarm-images-file {path}: {source}")]
pub struct PrewarmFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The images of a file: one per line; blank lines and `#` comments skipped.
pub fn read_file(path: &std::path::Path) -> Result<Vec<String>, PrewarmFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PrewarmFileError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The images a function pod runs, as first written: the webhook's record
/// of the originals where it pinned them.
pub fn images_of(pod: &Pod) -> Vec<String> {
    let originals: std::collections::BTreeMap<String, String> = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter_map(|c| {
            originals
                .get(&c.name)
                .cloned()
                .or_else(|| c.image.clone())
                .filter(|i| !i.is_empty())
        })
        .collect()
}

/// The function pods' images, when the API server can be reached.
async fn pod_images(namespace: &str, label: &str) -> Vec<String> {
    let client = match crate::cluster::client().await {
        Ok(client) => client,
        Err(reason) => {
            info!(%reason, "no cluster: pre-warming only the images named on the command line");
            return Vec::new();
        }
    };
    let api: Api<Pod> = Api::namespaced(client, namespace);
    match api.list(&ListParams::default().labels(label)).await {
        Ok(pods) => pods.items.iter().flat_map(images_of).collect(),
        Err(e) => {
            warn!(error = %e, namespace, "cannot list the function pods; pre-warming only the images named on the command line");
            Vec::new()
        }
    }
}

/// Resolves every image once (as pods name them: the kubelet's reading),
/// at most as many at a time as fetches may run, within `settings.timeout`;
/// `readiness` waits for it. A failure is logged and counted, never fatal.
pub async fn run(
    settings: PrewarmSettings,
    cache: CachedResolver,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) {
    let warm = async {
        let mut images: BTreeSet<String> = settings.images.iter().cloned().collect();
        if let Some(path) = &settings.file {
            match read_file(path) {
                Ok(listed) => images.extend(listed),
                Err(e) => warn!(error = %e, "pre-warming without the file"),
            }
        }
        if let Some((namespace, label)) = &settings.pods {
            images.extend(pod_images(namespace, label).await);
        }
        let total = images.len();
        let at_once = cache.resolver().max_concurrent_fetches();
        let warmed = futures_util::stream::iter(images)
            .map(|image| {
                let cache = cache.clone();
                let metrics = metrics.clone();
                async move {
                    match cache.resolve_for_pod(&image).await {
                        Ok(_) => {
                            debug!(image, "pre-warmed");
                            metrics.prewarm("cached");
                            true
                        }
                        Err(e) => {
                            warn!(image, error = %e, "cannot pre-warm an image");
                            metrics.prewarm("failed");
                            false
                        }
                    }
                }
            })
            .buffer_unordered(at_once)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        info!(warmed, total, "cache pre-warmed");
    };
    let mut warm = std::pin::pin!(warm);
    let in_time = tokio::time::timeout(settings.timeout, &mut warm).await;
    readiness.set(READINESS_CHECK, Ok(()));
    if in_time.is_err() {
        warn!(
            timeout_secs = settings.timeout.as_secs(),
            "pre-warming took longer than --prewarm-timeout; ready anyway (the rest fills in the background)"
        );
        // Readiness stops waiting, the warming does not: what it fetches
        // still saves a registry round trip inside admission.
        warm.await;
    }
}
