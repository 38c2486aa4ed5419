//! One cache entry: what was asked for, what the registry said (or why it
//! could not say), with whose credential and when. A plain struct behind an
//! `Arc`, so a hit hands out a counted pointer and copies nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::registry::{CredentialId, ImageAnswer, ImageInfo, ImageRef, Platform, RegistryError};

/// What a request asks the cache for. Two requests that ask the same get the
/// same entry; the map is keyed by a hash of this, and every entry is checked
/// against it, so two requests whose hashes collide never share an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Wanted<'a> {
    /// The image exactly as the caller wrote it: a lookup needs no parse.
    pub image: &'a str,
    /// A bare name (no `/`) given to `resolve` or `/v1/resolve`: it gets the
    /// function catalog's prefix. Pod images never do (the kubelet reads a
    /// bare name as Docker Hub's), and names with a `/` read the same either
    /// way, so they share one entry.
    pub catalog: bool,
    /// `None` for the default platform (nearly every request).
    pub platform: Option<&'a Platform>,
}

/// A cached answer or failure. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Entry(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The image as written, when that is not its normalized reference
    /// (pods mostly name images in full, as the reference reads).
    written: Option<Box<str>>,
    catalog: bool,
    /// Boxed: nearly every request is for the default platform.
    platform: Option<Box<Platform>>,
    reference: ImageRef,
    /// Who fetched it: served only while that is still the credential for
    /// its registry.
    credential: Option<CredentialId>,
    fetched_at: Instant,
    outcome: Result<ImageInfo, RegistryError>,
}

impl Entry {
    /// What a fetch of `wanted` (read as `reference`) gave, now.
    pub(super) fn new(
        wanted: Wanted<'_>,
        reference: ImageRef,
        credential: Option<CredentialId>,
        outcome: Result<ImageInfo, RegistryError>,
    ) -> Self {
        let written = (wanted.image != reference.as_str()).then(|| wanted.image.into());
        Self(Arc::new(Inner {
            written,
            catalog: wanted.catalog,
            platform: wanted.platform.cloned().map(Box::new),
            reference,
            credential,
            fetched_at: Instant::now(),
            outcome,
        }))
    }

    /// Another outcome for the same request, fetched now.
    pub(super) fn with_outcome(
        &self,
        credential: Option<CredentialId>,
        outcome: Result<ImageInfo, RegistryError>,
    ) -> Self {
        Self::new(self.wanted(), self.0.reference.clone(), credential, outcome)
    }

    /// The same answer, fetched now (a revalidation found the tag unchanged).
    pub(super) fn renewed(&self) -> Self {
        let inner = &self.0;
        Self(Arc::new(Inner {
            written: inner.written.clone(),
            catalog: inner.catalog,
            platform: inner.platform.clone(),
            reference: inner.reference.clone(),
            credential: inner.credential,
            fetched_at: Instant::now(),
            outcome: inner.outcome.clone(),
        }))
    }

    /// The request this entry answers.
    pub(super) fn wanted(&self) -> Wanted<'_> {
        Wanted {
            image: self
                .0
                .written
                .as_deref()
                .unwrap_or_else(|| self.0.reference.as_str()),
            catalog: self.0.catalog,
            platform: self.0.platform.as_deref(),
        }
    }

    /// About how many bytes the entry holds: its own allocation and the
    /// text and arguments it keeps (what a hostile image can make large).
    pub(super) fn weight(&self) -> u64 {
        let inner = &self.0;
        let mut bytes = std::mem::size_of::<Inner>()
            + inner.written.as_deref().map_or(0, str::len)
            + inner.reference.as_str().len();
        if let Ok(info) = &inner.outcome {
            bytes += info
                .config_entrypoint
                .iter()
                .chain(info.cmd.iter())
                .map(|a| a.len() + std::mem::size_of::<String>())
                .sum::<usize>();
        }
        bytes as u64
    }

    /// Is this the entry for `wanted`?
    pub(super) fn is_for(&self, wanted: Wanted<'_>) -> bool {
        self.wanted() == wanted
    }

    /// Are `self` and `other` the same fetch (the same allocation)?
    pub(super) fn same(&self, other: &Entry) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub(super) fn reference(&self) -> &ImageRef {
        &self.0.reference
    }

    pub(super) fn credential(&self) -> Option<CredentialId> {
        self.0.credential
    }

    pub(super) fn failure(&self) -> Option<&RegistryError> {
        self.0.outcome.as_ref().err()
    }

    /// Digest-pinned references never change: never revalidated, never expire.
    pub(super) fn pinned(&self) -> bool {
        self.0.reference.digest().is_some()
    }

    pub(super) fn fetched_at(&self) -> Instant {
        self.0.fetched_at
    }

    /// How long ago it was fetched.
    pub(super) fn age(&self) -> Duration {
        self.0.fetched_at.elapsed()
    }

    /// The answer, unless this entry is a failure.
    pub(super) fn answer(&self, needs_pull_secret: bool) -> Option<ImageAnswer<'_>> {
        self.outcome(needs_pull_secret).ok()
    }

    /// The answer, or the failure.
    pub(super) fn outcome(
        &self,
        needs_pull_secret: bool,
    ) -> Result<ImageAnswer<'_>, &RegistryError> {
        self.0
            .outcome
            .as_ref()
            .map(|info| ImageAnswer::new(&self.0.reference, info, needs_pull_secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Digest, ErrorKind};

    fn reference(image: &str) -> ImageRef {
        ImageRef::parse(image, "ghcr.io/kptdev/krm-functions-catalog").expect("valid")
    }

    fn info(entrypoint: &[&str]) -> ImageInfo {
        ImageInfo {
            digest: Digest::new(&format!("sha256:{}", "ab".repeat(32))),
            config_entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: Box::default(),
            platform: None,
        }
    }

    fn wanted(image: &str) -> Wanted<'_> {
        Wanted {
            image,
            catalog: false,
            platform: None,
        }
    }

    #[test]
    fn a_typical_entry_weighs_less_than_the_floor_and_a_long_entrypoint_what_it_holds() {
        let image = "ghcr.io/kptdev/krm-functions-catalog/set-namespace:v0.4.1";
        let typical = Entry::new(
            wanted(image),
            reference(image),
            None,
            Ok(info(&["/usr/local/bin/function"])),
        );
        // The default settings keep 10,000 such entries.
        let defaults = super::super::CacheSettings::default();
        assert!(typical.weight() < defaults.max_bytes / defaults.capacity);
        let long = "x".repeat(60 * 1024);
        let heavy = Entry::new(
            wanted(image),
            reference(image),
            None,
            Ok(info(&["/f", &long])),
        );
        assert!(heavy.weight() > 60 * 1024);
    }

    #[test]
    fn an_entry_answers_exactly_the_request_it_was_made_for() {
        let arm = "linux/arm64".parse::<Platform>().expect("platform");
        let asked = Wanted {
            image: "busybox",
            catalog: true,
            platform: Some(&arm),
        };
        let entry = Entry::new(asked, reference("busybox"), None, Ok(info(&["f"])));
        assert!(entry.is_for(asked));
        assert!(!entry.is_for(Wanted {
            platform: None,
            ..asked
        }));
        assert!(!entry.is_for(Wanted {
            catalog: false,
            ..asked
        }));
        assert!(!entry.is_for(Wanted {
            image: "busybox:latest",
            ..asked
        }));
        assert_eq!(
            entry.reference().to_string(),
            "ghcr.io/kptdev/krm-functions-catalog/busybox:latest"
        );
    }

    #[test]
    fn an_image_written_as_its_reference_reads_is_kept_once() {
        let image = "gcr.io/kpt-fn/set-namespace:v0.4.1";
        let entry = Entry::new(wanted(image), reference(image), None, Ok(info(&["f"])));
        assert!(entry.0.written.is_none());
        assert!(entry.is_for(wanted(image)));
        let short = "gcr.io/kpt-fn/set-namespace";
        let entry = Entry::new(wanted(short), reference(short), None, Ok(info(&["f"])));
        assert_eq!(
            entry.0.written.as_deref(),
            Some(short),
            "the tag is implied"
        );
        assert!(entry.is_for(wanted(short)) && !entry.is_for(wanted(&format!("{short}:latest"))));
    }

    #[test]
    fn a_failure_has_no_answer_and_renewing_keeps_everything_but_the_time() {
        let image = "example.com/a/b:v1";
        let failure = RegistryError::NotFound {
            registry: "example.com".into(),
            what: "manifest".into(),
            code: "MANIFEST_UNKNOWN".into(),
        };
        let entry = Entry::new(wanted(image), reference(image), None, Err(failure));
        assert!(entry.answer(false).is_none());
        assert_eq!(
            entry.failure().map(RegistryError::kind),
            Some(ErrorKind::NotFound)
        );
        let answered = Entry::new(wanted(image), reference(image), None, Ok(info(&["f"])));
        let renewed = answered.renewed();
        assert!(renewed.fetched_at() >= answered.fetched_at());
        assert!(!renewed.same(&answered) && answered.same(&answered.clone()));
        let entrypoint = |e: &Entry| e.answer(false).map(|a| a.entrypoint().to_vec());
        assert_eq!(entrypoint(&renewed), entrypoint(&answered));
        assert!(renewed.is_for(wanted(image)));
        assert!(!answered.pinned());
    }
}
