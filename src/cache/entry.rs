//! One cache entry in one allocation of 128 bytes, for the usual function
//! image (a reference of about 40 characters and a short entrypoint).
//!
//! The entry is a 64-byte header and one string behind a single counted
//! pointer (`triomphe`'s `HeaderSlice`: no weak count, 8 bytes of count).
//! The string holds the normalized reference, a NUL, then every
//! `Config.Entrypoint` argument and every `Config.Cmd` argument, each
//! followed by a NUL. What is rare (an image written in another form than
//! its normalized one, a platform other than the default, a digest other
//! than lower-case sha256, a failure, a very long entrypoint) goes into one
//! optional box, so that the usual entry pays nothing for it.
//!
//! Measured (BENCHMARKS.md): the entry, its reference and its entrypoint
//! were three allocations of 160 + 64 + 16 + 8 bytes before, plus a 24-byte
//! key in quick_cache's slot that the header's check now replaces.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use triomphe::HeaderSlice;

use crate::registry::{
    Args, CredentialId, Digest, DigestRef, ImageAnswer, ImageInfo, ImageRef, Platform,
    RegistryError,
};

/// A cached answer or failure. Cheap to clone (one counted pointer).
#[derive(Clone)]
pub(super) struct Entry(triomphe::Arc<HeaderSlice<Header, str>>);

#[derive(Clone)]
struct Header {
    /// The answer's digest when it is a lower-case sha256 (nearly always);
    /// zeros when `rare` holds the digest or a failure.
    sha256: [u8; 32],
    /// When it was fetched, in nanoseconds since [`origin`].
    fetched_at: u64,
    /// Who fetched it: served only while that is still the credential for
    /// its registry.
    credential: Option<CredentialId>,
    rare: Option<Box<Rare>>,
    /// Where the registry, the repository and the tag end in the reference.
    ends: [u16; 3],
    /// Bytes of `Config.Entrypoint` in the string, NULs included;
    /// `u16::MAX` when `rare` holds the length.
    entrypoint_len: u16,
}

// The whole point: with triomphe's 8-byte count, a 64-byte header leaves
// 56 bytes of the allocator's 128-byte class for the strings.
const _: () = assert!(size_of::<Header>() == 64);

/// What few entries need, out of the header.
#[derive(Clone, Default)]
struct Rare {
    /// The image as written, when that is not its normalized reference.
    written: Option<Box<str>>,
    /// The platform asked for, when it is not the default.
    platform: Option<Platform>,
    /// The platform of the config that was read, when not the one asked for.
    resolved: Option<Platform>,
    /// A digest that is not a lower-case sha256.
    digest: Option<Box<str>>,
    failure: Option<RegistryError>,
    /// `entrypoint_len` when it does not fit 16 bits.
    entrypoint_len: usize,
}

/// The clock entries are timed by. Nanoseconds in a `u64` last 584 years.
fn origin() -> Instant {
    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
    *ORIGIN
}

/// Now, on the entries' clock.
pub(super) fn now() -> u64 {
    u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Entry {
    /// Packs what a fetch of `written` (as asked for, on `platform`: `None`
    /// for the default) gave.
    pub(super) fn new(
        written: &str,
        platform: Option<&Platform>,
        reference: &ImageRef,
        credential: Option<CredentialId>,
        outcome: Result<ImageInfo, RegistryError>,
    ) -> Self {
        let (text, ends) = reference.parts();
        let mut rare = Rare {
            written: (written != text).then(|| written.into()),
            platform: platform.cloned(),
            ..Rare::default()
        };
        let mut packed = String::with_capacity(text.len() + 1);
        packed.push_str(text);
        packed.push('\0');
        let mut sha256 = [0; 32];
        let mut entrypoint_len = 0;
        match outcome {
            Ok(info) => {
                match info.digest {
                    Digest::Sha256(bytes) => sha256 = bytes,
                    Digest::Other(text) => rare.digest = Some(text),
                }
                rare.resolved = info.platform;
                let args = |list: &[String]| list.iter().map(|a| a.len() + 1).sum::<usize>();
                entrypoint_len = args(&info.config_entrypoint);
                packed.reserve_exact(entrypoint_len + args(&info.cmd));
                for arg in info.config_entrypoint.iter().chain(&info.cmd) {
                    packed.push_str(arg);
                    packed.push('\0');
                }
            }
            Err(failure) => rare.failure = Some(failure),
        }
        let short_len = u16::try_from(entrypoint_len)
            .ok()
            .filter(|len| *len < u16::MAX);
        if short_len.is_none() {
            rare.entrypoint_len = entrypoint_len;
        }
        let has_rare = rare.written.is_some()
            || rare.platform.is_some()
            || rare.resolved.is_some()
            || rare.digest.is_some()
            || rare.failure.is_some()
            || short_len.is_none();
        let header = Header {
            sha256,
            fetched_at: now(),
            credential,
            rare: has_rare.then(|| Box::new(rare)),
            ends,
            entrypoint_len: short_len.unwrap_or(u16::MAX),
        };
        Self(triomphe::Arc::from_header_and_str(header, &packed))
    }

    /// The same answer, fetched now (a revalidation found the tag unchanged).
    pub(super) fn renewed(&self) -> Self {
        let mut header = self.0.header.clone();
        header.fetched_at = now();
        Self(triomphe::Arc::from_header_and_str(header, &self.0.slice))
    }

    fn rare(&self) -> Option<&Rare> {
        self.0.header.rare.as_deref()
    }

    /// The reference, then the arguments.
    fn split(&self) -> (&str, &str) {
        let text = &self.0.slice;
        // `new` always writes the NUL.
        let end = text.find('\0').unwrap_or(text.len());
        (&text[..end], text.get(end + 1..).unwrap_or_default())
    }

    pub(super) fn reference(&self) -> ImageRef<&str> {
        ImageRef::from_parts(self.split().0, self.0.header.ends)
    }

    /// Is this the entry for `image` on `platform` (`None`: the default)?
    /// The cache is keyed by a hash of both: two images whose hashes agree
    /// take turns in one slot, and neither is ever given the other's answer.
    pub(super) fn is_for(&self, image: &str, platform: Option<&Platform>) -> bool {
        self.written() == image && self.platform() == platform
    }

    /// The platform asked for, when it is not the default.
    pub(super) fn platform(&self) -> Option<&Platform> {
        self.rare().and_then(|r| r.platform.as_ref())
    }

    /// The image as it was asked for.
    pub(super) fn written(&self) -> &str {
        self.rare()
            .and_then(|r| r.written.as_deref())
            .unwrap_or_else(|| self.split().0)
    }

    pub(super) fn credential(&self) -> Option<CredentialId> {
        self.0.header.credential
    }

    pub(super) fn failure(&self) -> Option<&RegistryError> {
        self.rare().and_then(|r| r.failure.as_ref())
    }

    /// Digest-pinned references never change: never revalidated, never expire.
    pub(super) fn pinned(&self) -> bool {
        self.reference().digest().is_some()
    }

    pub(super) fn fetched_at(&self) -> u64 {
        self.0.header.fetched_at
    }

    /// How long ago it was fetched, `now` being [`now`]'s.
    pub(super) fn age(&self, now: u64) -> Duration {
        Duration::from_nanos(now.saturating_sub(self.0.header.fetched_at))
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
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        let header = &self.0.header;
        let rare = self.rare();
        let (reference, args) = self.split();
        let entrypoint_len = match header.entrypoint_len {
            u16::MAX => rare.map_or(0, |r| r.entrypoint_len),
            len => usize::from(len),
        };
        let (entrypoint, cmd) = args.split_at_checked(entrypoint_len).unwrap_or((args, ""));
        let digest = match rare.and_then(|r| r.digest.as_deref()) {
            Some(other) => DigestRef::Other(other),
            None => DigestRef::Sha256(&header.sha256),
        };
        Ok(ImageAnswer {
            reference: ImageRef::from_parts(reference, header.ends),
            digest,
            config_entrypoint: Args::Packed(entrypoint),
            cmd: Args::Packed(cmd),
            platform: rare.and_then(|r| r.resolved.as_ref()),
            needs_pull_secret,
        })
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("image", &self.written())
            .field("reference", &self.split().0)
            .field("failure", &self.failure())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ErrorKind;

    fn reference(image: &str) -> ImageRef {
        ImageRef::parse(image, "ghcr.io/kptdev/krm-functions-catalog").expect("valid")
    }

    fn info(entrypoint: &[&str], cmd: &[&str]) -> ImageInfo {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        ImageInfo {
            digest: Digest::new(&format!("sha256:{}", "ab".repeat(32))),
            config_entrypoint: strings(entrypoint),
            cmd: strings(cmd),
            platform: None,
        }
    }

    fn unpacked(entry: &Entry) -> (String, Vec<String>, Vec<String>, String) {
        let answer = entry.answer(false).expect("an answer");
        (
            answer.reference.to_string(),
            answer.config_entrypoint.to_vec(),
            answer.cmd.to_vec(),
            answer.digest.to_string(),
        )
    }

    #[test]
    fn the_usual_entry_is_one_block_of_128_bytes_with_nothing_boxed() {
        let image = "gcr.io/kpt-fn/set-namespace:v0.4.1";
        let entry = Entry::new(
            image,
            None,
            &reference(image),
            None,
            Ok(info(&["function"], &[])),
        );
        assert!(entry.rare().is_none());
        // count + header + strings, as triomphe lays them out.
        assert!(8 + size_of::<Header>() + entry.0.slice.len() <= 128);
        assert!(entry.is_for(image, None));
        assert_eq!(
            unpacked(&entry),
            (
                image.to_string(),
                vec!["function".to_string()],
                vec![],
                format!("sha256:{}", "ab".repeat(32))
            )
        );
    }

    #[test]
    fn arguments_come_back_exactly_empty_ones_included() {
        let image = "example.com/a/b:v1";
        for (entrypoint, cmd) in [
            (&[][..], &[][..]),
            (&[""][..], &[][..]),
            (&[][..], &["", ""][..]),
            (&["/bin/sh", "-c"][..], &["echo 'a b'", ""][..]),
            (&["ünï", "x=y"][..], &["--flag"][..]),
        ] {
            let entry = Entry::new(
                image,
                None,
                &reference(image),
                None,
                Ok(info(entrypoint, cmd)),
            );
            let (_, e, c, _) = unpacked(&entry);
            assert_eq!(e, entrypoint, "entrypoint of {entrypoint:?} {cmd:?}");
            assert_eq!(c, cmd, "cmd of {entrypoint:?} {cmd:?}");
        }
    }

    #[test]
    fn a_long_entrypoint_keeps_its_length_out_of_the_header() {
        let image = "example.com/a/b:v1";
        let long = "x".repeat(70_000);
        let entry = Entry::new(
            image,
            None,
            &reference(image),
            None,
            Ok(info(&[&long, "y"], &["z"])),
        );
        let (_, e, c, _) = unpacked(&entry);
        assert_eq!(e, [long.as_str(), "y"]);
        assert_eq!(c, ["z"]);
    }

    #[test]
    fn rare_parts_are_kept_and_checked() {
        let platform = "linux/arm64".parse::<Platform>().expect("platform");
        let mut answer = info(&["f"], &[]);
        answer.digest = Digest::new(&format!("sha512:{}", "c".repeat(128)));
        answer.platform = Some("linux/arm64/v8".parse::<Platform>().expect("platform"));
        let entry = Entry::new(
            "busybox",
            Some(&platform),
            &reference("busybox"),
            None,
            Ok(answer),
        );
        assert!(entry.is_for("busybox", Some(&platform)));
        assert!(!entry.is_for("busybox", None));
        assert!(!entry.is_for(&entry.reference().to_string(), Some(&platform)));
        assert_eq!(entry.written(), "busybox");
        assert_eq!(
            entry.reference().to_string(),
            "ghcr.io/kptdev/krm-functions-catalog/busybox:latest"
        );
        let answer = entry.answer(false).expect("an answer");
        assert_eq!(
            answer.digest.to_string(),
            format!("sha512:{}", "c".repeat(128))
        );
        assert_eq!(
            answer.platform.map(ToString::to_string).as_deref(),
            Some("linux/arm64/v8")
        );
    }

    #[test]
    fn a_failure_has_no_answer_and_renewing_keeps_everything_but_the_time() {
        let image = "example.com/a/b:v1";
        let failure = RegistryError::NotFound {
            registry: "example.com".into(),
            what: "manifest".into(),
            code: "MANIFEST_UNKNOWN".into(),
        };
        let entry = Entry::new(image, None, &reference(image), None, Err(failure));
        assert!(entry.answer(false).is_none());
        assert_eq!(
            entry.failure().map(RegistryError::kind),
            Some(ErrorKind::NotFound)
        );
        let answered = Entry::new(image, None, &reference(image), None, Ok(info(&["f"], &[])));
        let renewed = answered.renewed();
        assert!(renewed.fetched_at() >= answered.fetched_at());
        assert_eq!(unpacked(&renewed), unpacked(&answered));
        assert!(renewed.is_for(image, None));
        assert!(!answered.pinned());
    }
}
