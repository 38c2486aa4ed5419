//! Image references: parsing, the default function prefix, and normalization.
//!
//! The Docker reference grammar itself is in [`super::grammar`]; this module
//! adds what Porch needs on top: bare function names expand with the default prefix,
//! every Docker Hub spelling becomes `docker.io`, registry hosts are compared
//! case-insensitively, and a tag is kept next to a digest for readability.

use std::fmt;

use super::grammar;

/// Canonical name of Docker Hub in references, cache keys and credential lookups.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest reference we look at, before the grammar runs. Every part but the
/// host is bounded by the grammar (path 255, tag 128, digest 135) and the
/// host by [`check_host`], so a valid reference, normalized and pinned, stays
/// well under this (at most 780).
const MAX_REFERENCE_LEN: usize = 1024;
/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;

/// A parsed, normalized image reference, `registry/repository[:tag][@digest]`,
/// in one string with the ends of its parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    text: Box<str>,
    /// Where the registry, the repository and the tag end in `text` (the
    /// tag's end is the repository's when there is no tag).
    registry_end: u16,
    repository_end: u16,
    tag_end: u16,
}

/// Why a string is not a usable image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ReferenceError {
    pub reason: String,
}

fn invalid(reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        reason: reason.into(),
    }
}

/// Maps every spelling of a registry host to the one we compare with: lower
/// case, and all of Docker Hub's names (including the Docker config key
/// `https://index.docker.io/v1/`) to `docker.io`.
pub fn normalize_host(host: &str) -> String {
    let host = host
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

/// Does the first path segment name a registry host (rather than a Docker Hub
/// namespace)? Same rule as the Docker reference grammar.
fn is_host(segment: &str) -> bool {
    segment.contains('.') || segment.contains(':') || segment.eq_ignore_ascii_case("localhost")
}

/// The grammar takes any number of DNS labels and port digits; a host that
/// could be dialled has at most 253 characters and a port below 65536.
fn check_host(host: &str) -> Result<(), ReferenceError> {
    let (name, port) = host.split_once(':').unwrap_or((host, ""));
    if name.len() > MAX_HOST_LEN {
        return Err(invalid(format!(
            "the registry host is longer than {MAX_HOST_LEN} characters"
        )));
    }
    if !port.is_empty() && (port.len() > 5 || port.parse::<u16>().is_err()) {
        return Err(invalid(format!(
            "the registry port {port:?} is not a port number"
        )));
    }
    Ok(())
}

impl ImageRef {
    /// Parses `input`. A bare name without any `/` (e.g. `set-namespace:v0.4`)
    /// is a catalog function and gets `default_prefix` in front, as Porch does.
    pub fn parse(input: &str, default_prefix: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(invalid("the reference is empty"));
        }
        if input.len() > MAX_REFERENCE_LEN {
            return Err(invalid(format!(
                "the reference is longer than {MAX_REFERENCE_LEN} characters"
            )));
        }
        if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(format!(
                "the reference contains the character {c:?}"
            )));
        }
        let expanded;
        let mut text = input;
        if !text.contains('/') && !default_prefix.is_empty() {
            expanded = format!("{}/{}", default_prefix.trim_end_matches('/'), text);
            text = &expanded;
        }
        // Host names are case-insensitive but the grammar only accepts lower-case
        // paths, so fold the host before parsing; Docker Hub's aliases become
        // docker.io so that one image has one cache key and one credential.
        let lowered;
        if let Some((first, rest)) = text.split_once('/')
            && is_host(first)
        {
            let host = normalize_host(first);
            lowered = format!("{host}/{rest}");
            text = &lowered;
        }
        let parts = grammar::split(text).map_err(|e| invalid(describe(e, text)))?;
        check_host(parts.registry)?;
        let registry = normalize_host(parts.registry);
        let mut repository = parts.repository.into_owned();
        // The grammar lets a first segment like `UPPER/` through as a would-be
        // host; once it is known to be a Docker Hub namespace it must be lower case.
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid("the repository name must be lower case"));
        }
        // `registry-1.docker.io/x` only becomes Docker Hub here.
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        let mut text = format!("{registry}/{repository}");
        let registry_end = registry.len();
        let repository_end = text.len();
        if let Some(tag) = parts.tag {
            text.push(':');
            text.push_str(tag);
        }
        let tag_end = text.len();
        if let Some(digest) = parts.digest {
            text.push('@');
            text.push_str(digest);
        }
        // Fits: MAX_REFERENCE_LEN bounds every part (see there).
        let end = |i: usize| u16::try_from(i).map_err(|_| invalid("the reference is too long"));
        Ok(Self {
            registry_end: end(registry_end)?,
            repository_end: end(repository_end)?,
            tag_end: end(tag_end)?,
            text: text.into(),
        })
    }
}

impl ImageRef {
    fn text(&self) -> &str {
        &self.text
    }

    /// The normalized reference as text (what `to_string` gives, borrowed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalized registry host (`docker.io` for Docker Hub), with its port.
    pub fn registry(&self) -> &str {
        &self.text()[..usize::from(self.registry_end)]
    }

    /// The host the registry API is served from.
    pub fn api_host(&self) -> &str {
        match self.registry() {
            DOCKER_HUB => DOCKER_HUB_API,
            registry => registry,
        }
    }

    pub fn repository(&self) -> &str {
        &self.text()[usize::from(self.registry_end) + 1..usize::from(self.repository_end)]
    }

    pub fn tag(&self) -> Option<&str> {
        (self.tag_end > self.repository_end)
            .then(|| &self.text()[usize::from(self.repository_end) + 1..usize::from(self.tag_end)])
    }

    pub fn digest(&self) -> Option<&str> {
        self.text().get(usize::from(self.tag_end) + 1..)
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest().or(self.tag()).unwrap_or("latest")
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> &str {
        &self.text()[..usize::from(self.repository_end)]
    }

    /// The reference pinned to `digest`, keeping the tag for readability:
    /// `registry/repo:tag@sha256:…` (or `registry/repo@sha256:…` without a tag).
    pub fn pinned(&self, digest: impl fmt::Display) -> String {
        format!("{}@{digest}", &self.text()[..usize::from(self.tag_end)])
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// Says more than the grammar's error where the input shows what is wrong.
fn describe(error: grammar::GrammarError, text: &str) -> String {
    if error != grammar::GrammarError::Format {
        return error.to_string();
    }
    if !text.is_ascii() {
        "it has characters outside ASCII, which the reference grammar does not allow".into()
    } else if text.chars().any(|c| c.is_ascii_uppercase()) {
        "the repository name must be lower case".into()
    } else if let Some((_, digest)) = text.split_once('@')
        && !digest.contains('/')
    {
        format!("the digest {digest:?} is not algorithm:hex with at least 32 hex digits")
    } else {
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "ghcr.io/kptdev/krm-functions-catalog/";

    fn parse(s: &str) -> ImageRef {
        match ImageRef::parse(s, PREFIX) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn bare_function_names_get_the_default_prefix() {
        let r = parse("set-namespace:v0.4");
        assert_eq!(
            r.to_string(),
            "ghcr.io/kptdev/krm-functions-catalog/set-namespace:v0.4"
        );
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "kptdev/krm-functions-catalog/set-namespace");
        assert_eq!(
            parse("apply-setters").to_string(),
            "ghcr.io/kptdev/krm-functions-catalog/apply-setters:latest"
        );
    }

    #[test]
    fn without_a_prefix_a_bare_name_is_docker_hubs_as_the_kubelet_reads_it() {
        for (image, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("set-namespace:v0.4", "docker.io/library/set-namespace:v0.4"),
            (
                "nephio/porch-wrapper-server:v4",
                "docker.io/nephio/porch-wrapper-server:v4",
            ),
            (
                "gcr.io/kpt-fn/set-namespace:v0.4.1",
                "gcr.io/kpt-fn/set-namespace:v0.4.1",
            ),
        ] {
            let r = ImageRef::parse(image, "").expect("valid");
            assert_eq!(r.to_string(), want, "{image}");
        }
        // With the catalog's prefix only the bare name changes.
        assert_eq!(
            parse("nephio/porch-wrapper-server:v4").to_string(),
            "docker.io/nephio/porch-wrapper-server:v4"
        );
    }

    #[test]
    fn prefix_without_trailing_slash_also_works() {
        let r = ImageRef::parse("fn:v1", "example.com/fns").expect("valid");
        assert_eq!(r.to_string(), "example.com/fns/fn:v1");
    }

    #[test]
    fn docker_hub_spellings_are_one_registry() {
        for s in [
            "library/busybox:1.36",
            "docker.io/busybox:1.36",
            "docker.io/library/busybox:1.36",
            "index.docker.io/library/busybox:1.36",
            "registry-1.docker.io/library/busybox:1.36",
            "Docker.IO/busybox:1.36",
        ] {
            let r = parse(s);
            assert_eq!(r.to_string(), "docker.io/library/busybox:1.36", "{s}");
            assert_eq!(r.api_host(), "registry-1.docker.io");
        }
        assert_eq!(
            parse("bitnami/kubectl").to_string(),
            "docker.io/bitnami/kubectl:latest"
        );
    }

    #[test]
    fn host_with_port_and_localhost() {
        let r = parse("127.0.0.1:5000/fns/set-labels:v1");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "fns/set-labels");
        let r = parse("localhost/fns/x");
        assert_eq!(r.registry(), "localhost");
        let r = parse("MyRegistry.Example.com:8443/a/b:c");
        assert_eq!(r.registry(), "myregistry.example.com:8443");
    }

    #[test]
    fn tag_and_digest_are_both_kept() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse(&format!("ghcr.io/a/b:v1@{d}"));
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.pinned(&d), format!("ghcr.io/a/b:v1@{d}"));
        let r = parse(&format!("ghcr.io/a/b@{d}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.pinned(&d), format!("ghcr.io/a/b@{d}"));
    }

    #[test]
    fn default_tag_is_latest() {
        let r = parse("quay.io/x/y");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.manifest_reference(), "latest");
    }

    #[test]
    fn bad_references_are_rejected_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("ghcr.io/a/b:", "grammar"),
            ("ghcr.io/A/b", "lower case"),
            ("UPPER/case:v1", "lower case"),
            ("ghcr.io/a/b@sha256:abc", "digest"),
            (&format!("ghcr.io/a/b@sha256:{}", "a".repeat(40)), "length"),
            (
                "ghcr.io/a/b@md5:0123456789abcdef0123456789abcdef",
                "algorithm",
            ),
            (
                &format!("ghcr.io/a/b@sha256:{}", "AB".repeat(32)),
                "lower case",
            ),
            ("ghcr.io/a b", "character"),
            ("ghcr.io/a/b\n", "character"),
            ("ghcr.io//b", "grammar"),
            ("ghcr.io/a/b:tag:tag", "grammar"),
        ];
        for (input, want) in cases {
            match ImageRef::parse(input, PREFIX) {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => assert!(e.reason.contains(want), "{input:?}: {e}"),
            }
        }
        let long = format!("ghcr.io/{}", "a".repeat(2000));
        assert!(ImageRef::parse(&long, PREFIX).is_err());
        let long_host = format!("{}.example.com/a/b", "h".repeat(250));
        let e = ImageRef::parse(&long_host, PREFIX).expect_err("host too long");
        assert!(e.reason.contains("host is longer"), "{e}");
        for port in ["65536", "000005000"] {
            let e =
                ImageRef::parse(&format!("example.com:{port}/a"), PREFIX).expect_err("not a port");
            assert!(e.reason.contains("not a port"), "{port}: {e}");
        }
        assert!(ImageRef::parse("example.com:65535/a", PREFIX).is_ok());
        assert!(
            ImageRef::parse("ÿ/a:vé", PREFIX).is_err_and(|e| e.reason.contains("outside ASCII"))
        );
    }

    #[test]
    fn config_keys_normalize_like_references() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("GHCR.io"), "ghcr.io");
        assert_eq!(normalize_host("https://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            normalize_host("registry.example.com/v2/"),
            "registry.example.com"
        );
    }
}
