//! The one resolver cache behind the webhook, the HTTP endpoint and the CLI.
//!
//! One quick_cache map: image as written + platform → what the registry
//! said, with the parse of the image and the credential identity it was
//! fetched with. quick_cache rather than moka because an entry costs about
//! 60 bytes of bookkeeping there against about 300 in moka (measured, see
//! BENCHMARKS.md), and a hit is one read-locked probe. What moka gave for
//! free is done here, on read:
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quick_cache::sync::{EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Equivalent, Lifecycle, UnitWeighter};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::registry::{
    CredentialId, ImageAnswer, ImageInfo, ImageRef, KeyedCredential, Platform, RegistryError,
    Resolution, ResolveError, Resolver,
};

/// Cache limits and lifetimes.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most entries kept (answers and cached failures together).
    pub capacity: u64,
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

/// The image exactly as the caller wrote it: looking it up needs no parse
/// (the reference grammar is a backtracking regex, about a third of a
/// webhook review's instructions when it ran on every hit). Two spellings of
/// one image are two entries, each fetched once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The entry's parsed reference holds this same string when the image
    /// was written in its normalized form (the usual case for function
    /// images): one allocation for both.
    image: Arc<str>,
    /// Shared: nearly every key holds the default platform.
    platform: Arc<Platform>,
}

/// A borrowed [`Key`] for lookups without allocating. Hashes like `Key`
/// (`str` and `Platform` hash the same behind a `Box`, an `Arc` or a `&`).
#[derive(Clone, Copy, Hash)]
struct KeyRef<'a> {
    image: &'a str,
    platform: &'a Platform,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.image == &*key.image && self.platform == &*key.platform
    }
}

#[derive(Debug)]
struct Entry {
    /// The parse of the key's image, kept for hits (credential choice,
    /// building answers) and revalidation.
    reference: ImageRef,
    /// Who fetched it: served only while that is still the credential for
    /// its registry.
    credential: Option<CredentialId>,
    outcome: Result<ImageInfo, RegistryError>,
    fetched_at: Instant,
    /// Digest-pinned references never change: never revalidated, never expire.
    pinned: bool,
    revalidating: AtomicBool,
}

impl Entry {
    fn new(
        reference: ImageRef,
        credential: Option<CredentialId>,
        outcome: Result<ImageInfo, RegistryError>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pinned: reference.digest().is_some(),
            reference,
            credential,
            outcome,
            fetched_at: Instant::now(),
            revalidating: AtomicBool::new(false),
        })
    }
}

/// A resolved image for the webhook: the cache entry itself, so a hit
/// copies nothing and no entry has to keep a built answer.
#[derive(Debug, Clone)]
pub struct Cached {
    /// Its outcome is an answer: only those are handed out.
    entry: Arc<Entry>,
    needs_pull_secret: bool,
}

impl Cached {
    /// What the patch is built from (`None` never happens: failures are
    /// not `Cached`).
    pub fn answer(&self) -> Option<ImageAnswer<'_>> {
        let info = self.entry.outcome.as_ref().ok()?;
        Some(ImageAnswer {
            reference: &self.entry.reference,
            info,
            needs_pull_secret: self.needs_pull_secret,
        })
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

impl Lifecycle<Key, Arc<Entry>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: Key, _: Arc<Entry>) {
        self.0.cache_evictions.inc();
    }
}

type Answers =
    quick_cache::sync::Cache<Key, Arc<Entry>, UnitWeighter, DefaultHashBuilder, CountEvictions>;

/// A [`Resolver`] with the shared cache in front. Cheap to clone.
#[derive(Clone)]
pub struct CachedResolver {
    resolver: Arc<Resolver>,
    answers: Arc<Answers>,
    default_platform: Arc<Platform>,
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
    pub fn new(resolver: Arc<Resolver>, settings: CacheSettings, metrics: Arc<Metrics>) -> Self {
        let capacity = usize::try_from(settings.capacity)
            .unwrap_or(usize::MAX)
            .max(1);
        let answers = Answers::with(
            capacity,
            capacity as u64,
            UnitWeighter,
            DefaultHashBuilder::default(),
            CountEvictions(metrics.clone()),
        );
        Self {
            default_platform: Arc::new(resolver.default_platform().clone()),
            resolver,
            answers: Arc::new(answers),
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

    /// What `entry` gives a request that started at `started`. Counts the
    /// lookup and starts a revalidation when it serves a stale tag.
    fn verdict(&self, key: KeyRef<'_>, entry: &Arc<Entry>, started: Instant) -> Verdict {
        let credential = self.resolver.credential_for(&entry.reference);
        if credential.as_ref().map(|c| c.id) != entry.credential {
            return Verdict::Refetch;
        }
        let age = entry.fetched_at.elapsed();
        // Fetched after this request began: it is the fetch this request
        // waited for (already counted as its miss).
        let awaited = started < entry.fetched_at;
        let count = |result| {
            if !awaited {
                self.metrics.cache_lookup(result);
            }
        };
        match &entry.outcome {
            Ok(_) if awaited => Verdict::Serve(CacheStatus::Miss, credential),
            Err(e) if e.kind().is_definitive() => {
                if age < self.settings.negative_ttl {
                    count("negative");
                    Verdict::Fail(e.clone())
                } else {
                    Verdict::Refetch
                }
            }
            // A transient failure is the answer of the fetch the request
            // waited for; a request arriving after it tries again.
            Err(e) if awaited => Verdict::Fail(e.clone()),
            Err(_) => Verdict::Refetch,
            Ok(_) if entry.pinned || age < self.settings.tag_ttl => {
                count("hit");
                Verdict::Serve(CacheStatus::Hit, credential)
            }
            Ok(_) if age < self.settings.tag_ttl + self.settings.max_stale => {
                count("stale");
                self.revalidate_in_background(key, entry.clone(), credential.as_ref());
                Verdict::Serve(CacheStatus::Stale, credential)
            }
            Ok(_) => Verdict::Refetch,
        }
    }

    /// The answer for `image` if the cache can give it without waiting for
    /// the registry (fresh or stale-but-servable, or a remembered failure);
    /// `None` when [`Self::resolve_for_pod`] is needed (to fetch, or to
    /// report an invalid image). Lets the webhook answer cache hits on its
    /// own task instead of spawning one per image.
    pub fn resolve_cached(
        &self,
        image: &str,
    ) -> Option<Result<(Cached, CacheStatus), ResolveError>> {
        let platform = self.resolver.default_platform();
        let key = KeyRef { image, platform };
        // A miss, or an invalid image: `resolve_for_pod` fetches or says why
        // not (parsing here too would cost a second parse on every miss).
        let entry = self.answers.get(&key)?;
        match self.verdict(key, &entry, Instant::now()) {
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

    /// Resolves `image` for a pod (default platform), fetching on a miss.
    pub async fn resolve_for_pod(
        &self,
        image: &str,
    ) -> Result<(Cached, CacheStatus), ResolveError> {
        let (entry, status, credential) =
            self.lookup(image, self.resolver.default_platform()).await?;
        Ok((self.cached(entry, credential), status))
    }

    fn cached(&self, entry: Arc<Entry>, credential: Option<Arc<KeyedCredential>>) -> Cached {
        Cached {
            entry,
            needs_pull_secret: self.resolver.pull_secret_for(credential).is_some(),
        }
    }

    fn resolution(
        &self,
        image: &str,
        reference: &ImageRef,
        info: &ImageInfo,
        platform: &Platform,
        credential: Option<&Arc<KeyedCredential>>,
    ) -> Resolution {
        Resolution::new(
            image,
            reference,
            info,
            platform,
            self.resolver.pull_secret_for(credential),
        )
    }

    /// Resolves `image` through the cache.
    pub async fn resolve(
        &self,
        image: &str,
        platform: Option<&Platform>,
    ) -> Result<(Resolution, CacheStatus), ResolveError> {
        let platform = platform.unwrap_or(self.resolver.default_platform());
        let (entry, status, credential) = self.lookup(image, platform).await?;
        match &entry.outcome {
            Ok(info) => Ok((
                self.resolution(image, &entry.reference, info, platform, credential.as_ref()),
                status,
            )),
            Err(source) => Err(ResolveError::Registry {
                image: image.to_string(),
                source: source.clone(),
            }),
        }
    }

    /// The entry that answers `image`, fetching it when no entry can. Its
    /// outcome is always an answer: failures come back as the error.
    async fn lookup(
        &self,
        image: &str,
        platform: &Platform,
    ) -> Result<(Arc<Entry>, CacheStatus, Option<Arc<KeyedCredential>>), ResolveError> {
        let started = Instant::now();
        let key = KeyRef { image, platform };
        let fail = |source| ResolveError::Registry {
            image: image.to_string(),
            source,
        };
        if let Some(entry) = self.answers.get(&key) {
            match self.verdict(key, &entry, started) {
                Verdict::Serve(status, credential) => return Ok((entry, status, credential)),
                Verdict::Fail(e) => return Err(fail(e)),
                Verdict::Refetch => {}
            }
        }
        self.metrics.cache_lookup("miss");
        let owned = Key {
            image: image.into(),
            platform: self.shared_platform(platform),
        };
        // Either an entry arrived meanwhile (another request fetched it, and
        // this one waited), or this request gets the placeholder and fetches.
        // The callback runs under the shard's lock: no cache calls in it.
        let guard = match self
            .answers
            .entry_async(&owned, |_, entry| match self.verdict(key, entry, started) {
                Verdict::Serve(status, credential) => {
                    EntryAction::Retain(Ok((entry.clone(), status, credential)))
                }
                Verdict::Fail(e) => EntryAction::Retain(Err(e)),
                Verdict::Refetch => EntryAction::ReplaceWithGuard,
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
        let reference = self.resolver.parse(image)?.sharing(&owned.image);
        let credential = self.resolver.credential_for(&reference);
        let outcome = self
            .resolver
            .fetch(
                &reference,
                platform,
                credential.as_deref().map(|c| &c.credential),
            )
            .await;
        let entry = Entry::new(reference, credential.as_ref().map(|c| c.id), outcome);
        // Failures are inserted too: that is how the waiters get this one.
        let _ = guard.insert(entry.clone());
        match &entry.outcome {
            Ok(_) => Ok((entry, CacheStatus::Miss, credential)),
            Err(e) => Err(fail(e.clone())),
        }
    }

    fn shared_platform(&self, platform: &Platform) -> Arc<Platform> {
        if platform == &*self.default_platform {
            self.default_platform.clone()
        } else {
            Arc::new(platform.clone())
        }
    }

    /// Checks a stale tag with a HEAD: same digest keeps the answer (no config
    /// fetch), a new digest fetches the new config, a failing registry keeps
    /// serving the old answer until `max_stale`. One revalidation per entry.
    fn revalidate_in_background(
        &self,
        key: KeyRef<'_>,
        entry: Arc<Entry>,
        credential: Option<&Arc<KeyedCredential>>,
    ) {
        if entry.revalidating.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let key = Key {
            image: key.image.into(),
            platform: self.shared_platform(key.platform),
        };
        let credential = credential.cloned();
        tokio::spawn(async move {
            let Ok(old) = &entry.outcome else { return };
            let reference = &entry.reference;
            let login = credential.as_deref().map(|c| &c.credential);
            let outcome = match this.resolver.current_digest(reference, login).await {
                Ok(Some(digest)) if old.digest.is(&digest) => {
                    debug!(image = %reference, "tag unchanged");
                    Ok(old.clone())
                }
                Ok(_) => this.resolver.fetch(reference, &key.platform, login).await,
                Err(e) => Err(e),
            };
            let id = credential.as_ref().map(|c| c.id);
            // The new entry shares the new key's string, as on a miss.
            let renewed = reference.clone().sharing(&key.image);
            match outcome {
                Ok(info) => {
                    if info.digest != old.digest {
                        info!(image = %reference, old = %old.digest, new = %info.digest, "tag moved");
                    }
                    this.metrics.cache_revalidation("refreshed");
                    this.answers.insert(key, Entry::new(renewed, id, Ok(info)));
                }
                Err(e) if e.kind().is_definitive() => {
                    warn!(image = %reference, error = %e, "cached tag is no longer resolvable");
                    this.metrics.cache_revalidation("gone");
                    this.answers.insert(key, Entry::new(renewed, id, Err(e)));
                }
                Err(e) => {
                    warn!(image = %reference, error = %e, age_secs = entry.fetched_at.elapsed().as_secs(), "registry failing; serving the cached answer");
                    this.metrics.cache_revalidation("failed");
                    entry.revalidating.store(false, Ordering::Release);
                }
            }
        });
    }

    /// Drops answers fetched with credentials that are no longer configured.
    pub fn retain_credentials(&self, current: &[CredentialId]) {
        self.answers
            .retain(|_, entry| entry.credential.is_none_or(|id| current.contains(&id)));
    }
}
