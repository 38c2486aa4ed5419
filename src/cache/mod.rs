//! The one resolver cache behind the webhook, the HTTP endpoint and the CLI.
//!
//! One quick_cache map: a hash of what was asked (the image as written, how a
//! bare name reads, the platform) → what the registry said, with the parse of
//! the image and the credential identity it was fetched with ([`entry`]); the
//! entry is checked against the request, so a collision of hashes costs a
//! fetch, never a wrong answer. quick_cache rather than moka because an
//! entry costs about 40 bytes of bookkeeping there against about 300 in moka
//! (measured, see BENCHMARKS.md), and a hit is one read-locked probe. What
//! moka gave for free is done here, on read:
//! - lifetimes: each entry carries its fetch time; a hit checks it (pinned
//!   answers never expire, tag answers are revalidated after the TTL and
//!   served stale up to the max staleness, failures live briefly);
//! - one fetch per key: concurrent misses wait on quick_cache's placeholder,
//!   and the loader always inserts an entry, its error included, so every
//!   waiter gets the one answer; a transient error is only served to requests
//!   that were already waiting for it, the next request fetches again.
//!
//! Its eviction (CLOCK-Pro-like, with a ghost list) keeps a scan of one-off
//! images from flushing the hot function images.
//!
//! An answer is only served with the credential it was fetched with: a hit
//! whose credential identity differs from the current one is a miss, so two
//! credentials never share an answer.

mod entry;

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use quick_cache::sync::{EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};

use self::entry::{Entry, Wanted};
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::registry::{
    CredentialId, ImageAnswer, KeyedCredential, Platform, RegistryError, Resolution, ResolveError,
    Resolver,
};

/// `--cache-max-bytes` unless set: 10,000 typical entries (a few hundred
/// bytes each) fit many times over; 500 of the largest an image may carry
/// (64 KiB of arguments) fit.
pub const DEFAULT_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Backstop re-read of the Docker config, for missed file events.
const CREDENTIALS_RESYNC: Duration = Duration::from_secs(30);

/// Cache limits and lifetimes.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most entries kept (answers and cached failures together).
    pub capacity: u64,
    /// Most bytes the entries hold together. Each entry counts as at least
    /// `max_bytes / capacity`, so `capacity` typical entries fit, and a few
    /// large ones (long entrypoints) push others out.
    pub max_bytes: u64,
    /// After this, a tag's answer is revalidated (HEAD) in the background.
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` an answer may still be served while the
    /// registry cannot be reached.
    pub max_stale: Duration,
    /// How long a definitive failure (not found, unauthorized) is remembered.
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_bytes: DEFAULT_MAX_BYTES,
            tag_ttl: Duration::from_secs(300),
            max_stale: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// Where an answer came from (`cached` in the endpoint's JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// Fresh from the cache.
    Hit,
    /// Past its TTL: served while it is revalidated, or because the registry
    /// is failing.
    Stale,
    /// Fetched from the registry for this request (or a concurrent one).
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
        }
    }
}

/// A resolved image for the webhook: the cache entry itself, so a hit
/// copies nothing and no entry has to keep a built answer.
#[derive(Debug, Clone)]
pub struct Cached {
    /// It holds an answer: failures are not handed out as `Cached`.
    entry: Entry,
    needs_pull_secret: bool,
}

impl Cached {
    /// What the patch is built from (`None` never happens: failures are
    /// not `Cached`).
    pub fn answer(&self) -> Option<ImageAnswer<'_>> {
        self.entry.answer(self.needs_pull_secret)
    }

    pub fn needs_pull_secret(&self) -> bool {
        self.needs_pull_secret
    }
}

/// What an entry gives a request.
enum Verdict {
    /// Its answer, with the credential it was fetched with (still current).
    Serve(CacheStatus, Option<Arc<KeyedCredential>>),
    Fail(RegistryError),
    /// Expired, fetched with another credential, or a transient failure
    /// that predates the request: fetch again.
    Refetch,
}

/// Counts capacity evictions (replacements are not evictions).
#[derive(Clone)]
struct CountEvictions(Arc<Metrics>);

impl Lifecycle<u64, Entry> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: u64, _: Entry) {
        self.0.cache_evictions.inc();
    }
}

/// An entry's weight: its bytes, and at least the floor that makes
/// `capacity` entries the most there can be.
#[derive(Clone)]
struct Bytes {
    floor: u64,
}

impl Weighter<u64, Entry> for Bytes {
    fn weight(&self, _: &u64, entry: &Entry) -> u64 {
        entry.weight().max(self.floor)
    }
}

/// Keyed by [`CachedResolver::key`].
type Answers = quick_cache::sync::Cache<u64, Entry, Bytes, DefaultHashBuilder, CountEvictions>;

/// A [`Resolver`] with the shared cache in front. Cheap to clone.
#[derive(Clone)]
pub struct CachedResolver {
    resolver: Arc<Resolver>,
    answers: Arc<Answers>,
    /// Seeded per process: which images share a key is not predictable.
    keys: DefaultHashBuilder,
    /// Keys of the entries being revalidated, one revalidation each. Rare
    /// (once per tag and TTL), so a set beside the entries rather than a
    /// flag in every one of them.
    revalidating: Arc<Mutex<HashSet<u64>>>,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedResolver")
            .field("entries", &self.answers.len())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl CachedResolver {
    /// What the entries weigh together (bytes, each at least the floor).
    pub fn weight(&self) -> u64 {
        self.answers.weight()
    }

    pub fn new(resolver: Arc<Resolver>, settings: CacheSettings, metrics: Arc<Metrics>) -> Self {
        let capacity = settings.capacity.max(1);
        let max_bytes = settings.max_bytes.max(1);
        let answers = Answers::with(
            usize::try_from(capacity).unwrap_or(usize::MAX),
            max_bytes,
            Bytes {
                floor: (max_bytes / capacity).max(1),
            },
            DefaultHashBuilder::default(),
            CountEvictions(metrics.clone()),
        );
        Self {
            resolver,
            answers: Arc::new(answers),
            keys: DefaultHashBuilder::default(),
            revalidating: Arc::default(),
            settings,
            metrics,
        }
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    pub fn entry_count(&self) -> u64 {
        self.answers.len() as u64
    }

    /// The key of `wanted` in `answers`.
    fn key(&self, wanted: Wanted<'_>) -> u64 {
        self.keys.hash_one(wanted)
    }

    /// A request for `image` named in a pod (`catalog` false) or given to
    /// `resolve`/`/v1/resolve` (true); `platform` `None` when it is the default.
    fn wanted<'a>(
        &self,
        image: &'a str,
        catalog: bool,
        platform: Option<&'a Platform>,
    ) -> Wanted<'a> {
        Wanted {
            image,
            // Only a name without `/` reads differently in the two ways.
            catalog: catalog && !image.contains('/'),
            platform: platform.filter(|p| *p != self.resolver.default_platform()),
        }
    }

    /// What `entry` gives a request that started at `started`. Counts the
    /// lookup and starts a revalidation when it serves a stale tag.
    fn verdict(&self, wanted: Wanted<'_>, key: u64, entry: &Entry, started: Instant) -> Verdict {
        if !entry.is_for(wanted) {
            // Another request with the same key: this one replaces it.
            return Verdict::Refetch;
        }
        let credential = self.resolver.credential_for(entry.reference());
        if credential.as_ref().map(|c| c.id) != entry.credential() {
            return Verdict::Refetch;
        }
        let age = entry.age();
        // Fetched after this request began: it is the fetch this request
        // waited for (already counted as its miss).
        let awaited = started < entry.fetched_at();
        let count = |result| {
            if !awaited {
                self.metrics.cache_lookup(result);
            }
        };
        match entry.failure() {
            None if awaited => Verdict::Serve(CacheStatus::Miss, credential),
            Some(e) if e.kind().is_definitive() => {
                if age < self.settings.negative_ttl {
                    count("negative");
                    Verdict::Fail(e.clone())
                } else {
                    Verdict::Refetch
                }
            }
            // A transient failure is the answer of the fetch the request
            // waited for; a request arriving after it tries again.
            Some(e) if awaited => Verdict::Fail(e.clone()),
            Some(_) => Verdict::Refetch,
            None if entry.pinned() || age < self.settings.tag_ttl => {
                count("hit");
                Verdict::Serve(CacheStatus::Hit, credential)
            }
            None if age
                < self
                    .settings
                    .tag_ttl
                    .saturating_add(self.settings.max_stale) =>
            {
                count("stale");
                self.revalidate_in_background(key, entry.clone(), credential.as_ref());
                Verdict::Serve(CacheStatus::Stale, credential)
            }
            None => Verdict::Refetch,
        }
    }

    /// The answer for pod image `image` if the cache can give it without
    /// waiting for the registry (fresh or stale-but-servable, or a remembered
    /// failure); `None` when [`Self::resolve_for_pod`] is needed (to fetch,
    /// or to report an invalid image). Lets the webhook answer cache hits on
    /// its own task instead of spawning one per image.
    pub fn resolve_cached(
        &self,
        image: &str,
    ) -> Option<Result<(Cached, CacheStatus), ResolveError>> {
        let wanted = self.wanted(image, false, None);
        let key = self.key(wanted);
        // A miss, or an invalid image: `resolve_for_pod` fetches or says why
        // not (parsing here too would cost a second parse on every miss).
        let entry = self.answers.get(&key)?;
        match self.verdict(wanted, key, &entry, Instant::now()) {
            Verdict::Serve(status, credential) => {
                Some(Ok((self.cached(entry, credential), status)))
            }
            Verdict::Fail(source) => Some(Err(ResolveError::Registry {
                image: image.to_string(),
                source,
            })),
            Verdict::Refetch => None,
        }
    }

    /// Resolves image `image` named in a pod (read as the kubelet reads it:
    /// no host means Docker Hub), for the default platform, fetching on a miss.
    pub async fn resolve_for_pod(
        &self,
        image: &str,
    ) -> Result<(Cached, CacheStatus), ResolveError> {
        let (entry, status, credential) = self.lookup(self.wanted(image, false, None)).await?;
        Ok((self.cached(entry, credential), status))
    }

    /// Does a pod with `image` need the pull secret (its registry has
    /// credentials in the Docker config)? No registry is asked.
    pub fn needs_pull_secret(&self, image: &str) -> bool {
        self.resolver
            .parse_pod_image(image)
            .ok()
            .and_then(|reference| self.resolver.credential_for(&reference))
            .is_some()
    }

    fn cached(&self, entry: Entry, credential: Option<Arc<KeyedCredential>>) -> Cached {
        Cached {
            entry,
            needs_pull_secret: self.resolver.pull_secret_for(credential).is_some(),
        }
    }

    /// Resolves `image` as `resolve` and `/v1/resolve` name it (a bare name
    /// is a catalog function) through the cache.
    pub async fn resolve(
        &self,
        image: &str,
        platform: Option<&Platform>,
    ) -> Result<(Resolution, CacheStatus), ResolveError> {
        let (entry, status, credential) = self.lookup(self.wanted(image, true, platform)).await?;
        let pull_secret = self.resolver.pull_secret_for(credential.as_ref());
        let platform = platform.unwrap_or(self.resolver.default_platform());
        match entry.outcome(pull_secret.is_some()) {
            Ok(answer) => Ok((
                Resolution::new(image, &answer, platform, pull_secret),
                status,
            )),
            // `lookup` hands out answers only, but an entry is either.
            Err(source) => Err(ResolveError::Registry {
                image: image.to_string(),
                source: source.clone(),
            }),
        }
    }

    /// The entry that answers `wanted`, fetching it when no entry can. It
    /// always holds an answer: failures come back as the error.
    async fn lookup(
        &self,
        wanted: Wanted<'_>,
    ) -> Result<(Entry, CacheStatus, Option<Arc<KeyedCredential>>), ResolveError> {
        let started = Instant::now();
        let key = self.key(wanted);
        let fail = |source| ResolveError::Registry {
            image: wanted.image.to_string(),
            source,
        };
        if let Some(entry) = self.answers.get(&key) {
            match self.verdict(wanted, key, &entry, started) {
                Verdict::Serve(status, credential) => return Ok((entry, status, credential)),
                Verdict::Fail(e) => return Err(fail(e)),
                Verdict::Refetch => {}
            }
        }
        self.metrics.cache_lookup("miss");
        // Either an entry arrived meanwhile (another request fetched it, and
        // this one waited), or this request gets the placeholder and fetches.
        // The callback runs under the shard's lock: no cache calls in it.
        let guard = match self
            .answers
            .entry_async(&key, |_, entry| {
                match self.verdict(wanted, key, entry, started) {
                    Verdict::Serve(status, credential) => {
                        EntryAction::Retain(Ok((entry.clone(), status, credential)))
                    }
                    Verdict::Fail(e) => EntryAction::Retain(Err(e)),
                    Verdict::Refetch => EntryAction::ReplaceWithGuard,
                }
            })
            .await
        {
            EntryResult::Retained(answer) => return answer.map_err(fail),
            EntryResult::Vacant(guard) | EntryResult::Replaced(guard, _) => guard,
            // Neither is asked for above.
            EntryResult::Removed(..) | EntryResult::Timeout => {
                unreachable!("entry_async without Remove or a timeout")
            }
        };
        // An invalid image is not remembered: it must not take the room of
        // valid ones, and its error is cheap to find again. Dropping the
        // guard hands the placeholder to the next waiter.
        let reference = if wanted.catalog {
            self.resolver.parse(wanted.image)?
        } else {
            self.resolver.parse_pod_image(wanted.image)?
        };
        let credential = self.resolver.credential_for(&reference);
        let platform = wanted.platform.unwrap_or(self.resolver.default_platform());
        // Boxed: the fetch's state (several KB) is then carried by the one
        // request that fetches, not by every request that may wait here.
        // Under a burst of misses hundreds wait, and the allocator keeps
        // what their futures touched long after (BENCHMARKS.md).
        let outcome = Box::pin(self.resolver.fetch(
            &reference,
            platform,
            credential.as_deref().map(|c| &c.credential),
        ))
        .await;
        let entry = Entry::new(
            wanted,
            reference,
            credential.as_ref().map(|c| c.id),
            outcome,
        );
        // Failures are inserted too: that is how the waiters get this one.
        let _ = guard.insert(entry.clone());
        match entry.failure() {
            None => Ok((entry, CacheStatus::Miss, credential)),
            Some(e) => Err(fail(e.clone())),
        }
    }

    /// Checks a stale tag with a HEAD: same digest keeps the answer (no config
    /// fetch), a new digest fetches the new config, a failing registry keeps
    /// serving the old answer until `max_stale`. One revalidation per entry,
    /// and it replaces only the entry it revalidated: one that a request or
    /// a credential change put there meanwhile is newer and stays.
    fn revalidate_in_background(
        &self,
        key: u64,
        entry: Entry,
        credential: Option<&Arc<KeyedCredential>>,
    ) {
        // Whatever happens to the task, the next stale hit may try again
        // once it is over.
        let Some(running) = Revalidating::start(&self.revalidating, key) else {
            return;
        };
        let this = self.clone();
        let credential = credential.cloned();
        let task = async move {
            let _running = running;
            let Some(old) = entry.answer(false) else {
                return;
            };
            let reference = entry.reference();
            let platform = entry
                .wanted()
                .platform
                .unwrap_or(this.resolver.default_platform());
            let login = credential.as_deref().map(|c| &c.credential);
            let id = credential.as_ref().map(|c| c.id);
            let renewed = match this.resolver.current_digest(reference, login).await {
                Ok(Some(digest)) if old.digest().is(&digest) => {
                    debug!(image = %reference, "tag unchanged");
                    Ok(entry.renewed())
                }
                Ok(_) => this
                    .resolver
                    .fetch(reference, platform, login)
                    .await
                    .map(|info| {
                        if info.digest != *old.digest() {
                            info!(image = %reference, old = %old.digest(), new = %info.digest, "tag moved");
                        }
                        entry.with_outcome(id, Ok(info))
                    }),
                Err(e) => Err(e),
            };
            let replaced = match renewed {
                Ok(renewed) => {
                    this.metrics.cache_revalidation("refreshed");
                    this.replace(key, &entry, renewed)
                }
                Err(e) if e.kind().is_definitive() => {
                    warn!(image = %reference, error = %e, "cached tag is no longer resolvable");
                    this.metrics.cache_revalidation("gone");
                    this.replace(key, &entry, entry.with_outcome(id, Err(e)))
                }
                Err(e) => {
                    let age_secs = entry.age().as_secs();
                    warn!(image = %reference, error = %e, age_secs, "registry failing; serving the cached answer");
                    this.metrics.cache_revalidation("failed");
                    true
                }
            };
            if !replaced {
                debug!(image = %reference, "a newer entry arrived during the revalidation; it stays");
            }
        };
        // In the span of the request that found the entry stale.
        tokio::spawn(task.in_current_span());
    }

    /// Puts `new` in place of `old` if `old` is still the entry under `key`
    /// (compare and replace); says whether it did.
    fn replace(&self, key: u64, old: &Entry, new: Entry) -> bool {
        // No waiting on a fetch in progress (a zero timeout): a fetch under
        // way will put a newer entry there anyway.
        let result = self
            .answers
            .entry(&key, Some(Duration::ZERO), |_, current| {
                if current.same(old) {
                    *current = new;
                    EntryAction::Retain(true)
                } else {
                    EntryAction::Retain(false)
                }
            });
        // Vacant (evicted meanwhile): dropping the guard leaves it empty.
        matches!(result, EntryResult::Retained(true))
    }

    /// Follows the mounted Docker config until `shutdown`: reloads the
    /// credentials when the file changes (a broken file keeps the last good
    /// config) and drops the answers fetched with credentials that are gone.
    pub async fn follow_credentials(self, readiness: Arc<Readiness>, shutdown: CancellationToken) {
        let credentials = self.resolver.credentials().clone();
        let Some(path) = credentials.path().map(Path::to_path_buf) else {
            return;
        };
        crate::reload::follow(
            "Docker config",
            &[&path],
            CREDENTIALS_RESYNC,
            shutdown,
            || {
                let changed = credentials.reload();
                self.resolver.report_readiness(&readiness);
                if changed? {
                    let current = credentials.current();
                    self.metrics
                        .configure_registries(current.registries().map(str::to_string));
                    self.retain_credentials(&current.identities());
                    info!(path = %path.display(), "credentials changed; answers fetched with old credentials dropped");
                }
                Ok::<_, crate::registry::DockerConfigError>(())
            },
        )
        .await;
    }

    /// Follows the registry CA file (`--tls-secret-path`): it may appear, or
    /// be rotated, while the process runs.
    pub async fn follow_registry_ca(self, readiness: Arc<Readiness>, shutdown: CancellationToken) {
        let Some(dir) = self.resolver.mounted_ca_dir().map(Path::to_path_buf) else {
            return;
        };
        let files: Vec<_> = crate::registry::tls::CA_FILE_NAMES
            .iter()
            .map(|name| dir.join(name))
            .collect();
        let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        crate::reload::follow("registry CA", &files, CREDENTIALS_RESYNC, shutdown, || {
            let reloaded = self.resolver.reload_ca();
            self.resolver.report_readiness(&readiness);
            reloaded.map(|_| ())
        })
        .await;
    }

    /// Drops answers fetched with credentials that are no longer configured.
    pub fn retain_credentials(&self, current: &[CredentialId]) {
        self.answers
            .retain(|_, entry| entry.credential().is_none_or(|id| current.contains(&id)));
    }
}

/// A key in the revalidation set, taken out when dropped.
struct Revalidating(Arc<Mutex<HashSet<u64>>>, u64);

impl Revalidating {
    /// `None` when `key` is already being revalidated.
    fn start(set: &Arc<Mutex<HashSet<u64>>>, key: u64) -> Option<Self> {
        lock(set).insert(key).then(|| Self(set.clone(), key))
    }
}

impl Drop for Revalidating {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

/// The set stays consistent across a panic (one insert or remove each).
fn lock(set: &Mutex<HashSet<u64>>) -> std::sync::MutexGuard<'_, HashSet<u64>> {
    set.lock().unwrap_or_else(PoisonError::into_inner)
}
