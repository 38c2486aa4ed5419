//! The Docker image reference grammar (`distribution/reference`), compiled
//! once as an ASCII-only regular expression.
//!
//! Why not `oci-spec`'s parser, which the project used before: it compiles
//! the same grammar with Unicode classes (`\w` is every letter of every
//! script in Rust, where Go's is `[0-9A-Za-z_]`). That regex costs 17 MB of
//! heap while it compiles and keeps 6 MB for the life of the process, about
//! half of this service's resident memory, and it accepts tags Docker
//! rejects (`img:vé`). Here the grammar is the same language on ASCII input
//! (checked against oci-spec by the `reference_oracle` fuzz target) and
//! rejects everything else, as Docker does; it compiles to a few kilobytes.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

/// Docker Hub, where a name without a registry host lives.
const DOCKER_HUB: &str = "docker.io";
/// Longest repository (path) name the grammar allows.
const MAX_NAME_LEN: usize = 255;

/// The grammar, built from the named pieces of the distribution spec so it
/// can be read against it.
fn pattern() -> String {
    // A host: DNS labels joined by dots, then an optional port.
    let label = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
    let domain = format!(r"{label}(?:\.{label})*(?::[0-9]+)?");
    // A path component: lower-case alphanumerics with `.`, `_`, `__` or
    // dashes between them.
    let component = "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
    let name = format!("(?:{domain}/)?{component}(?:/{component})*");
    let tag = r"\w[\w.-]{0,127}";
    let digest = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
    format!("^({name})(?::({tag}))?(?:@({digest}))?$")
}

static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    RegexBuilder::new(&pattern())
        // ASCII classes, as in Go: small to compile and keep, and no
        // letters outside ASCII in a tag.
        .unicode(false)
        .build()
        .expect("the reference grammar is a valid regex")
});

/// A reference split by the grammar, with Docker's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts<'a> {
    /// The registry host as written (`docker.io` when none is, and for
    /// `index.docker.io`).
    pub registry: &'a str,
    /// The repository path, with `library/` in front of a bare Docker Hub name.
    pub repository: Cow<'a, str>,
    /// The tag; `latest` when neither a tag nor a digest is given.
    pub tag: Option<&'a str>,
    pub digest: Option<&'a str>,
}

/// Why a string does not follow the reference grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("the reference is empty")]
    Empty,
    #[error("it does not match the reference grammar host[:port]/path[:tag][@digest]")]
    Format,
    #[error("the repository name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("the digest is not of the form algorithm:hex")]
    DigestFormat,
    #[error("the digest has the wrong length for its algorithm")]
    DigestLength,
    #[error("the digest algorithm is not sha256, sha384 or sha512")]
    DigestAlgorithm,
    #[error("the digest's hex must be lower case (OCI image spec)")]
    DigestCase,
}

/// Splits `text` into registry, repository, tag and digest.
pub fn split(text: &str) -> Result<Parts<'_>, GrammarError> {
    if text.is_empty() {
        return Err(GrammarError::Empty);
    }
    let captures = REFERENCE.captures(text).ok_or(GrammarError::Format)?;
    let name = captures.get(1).map_or("", |m| m.as_str());
    let tag = captures.get(2).map(|m| m.as_str());
    let digest = captures.get(3).map(|m| m.as_str());
    let (registry, repository) = split_registry(name);
    if repository.len() > MAX_NAME_LEN {
        return Err(GrammarError::NameTooLong);
    }
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    Ok(Parts {
        registry,
        repository,
        tag: if tag.is_none() && digest.is_none() {
            Some("latest")
        } else {
            tag
        },
        digest,
    })
}

/// Docker's rule: the first path segment is a registry host when it has a
/// dot or a port, or is `localhost`; otherwise the name is on Docker Hub.
fn split_registry(name: &str) -> (&str, Cow<'_, str>) {
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => (DOCKER_HUB, name),
    };
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB
    } else {
        registry
    };
    if registry == DOCKER_HUB && !path.contains('/') {
        (registry, Cow::Owned(format!("library/{path}")))
    } else {
        (registry, Cow::Borrowed(path))
    }
}

/// Registries only speak these digests, and each has one length.
fn check_digest(digest: &str) -> Result<(), GrammarError> {
    let (algorithm, hex) = digest.split_once(':').ok_or(GrammarError::DigestFormat)?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(GrammarError::DigestAlgorithm),
    };
    if hex.len() != want {
        return Err(GrammarError::DigestLength);
    }
    // The image spec's encoded form is [a-f0-9]; registries answer an
    // upper-case digest with an error of their own (distribution: 500).
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(GrammarError::DigestCase);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let p = split(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (
            p.registry.to_string(),
            p.repository.into_owned(),
            p.tag.map(str::to_string),
            p.digest.map(str::to_string),
        )
    }

    #[test]
    fn docker_defaults() {
        let own = |s: &str| Some(s.to_string());
        assert_eq!(
            parts("busybox"),
            (
                "docker.io".into(),
                "library/busybox".into(),
                own("latest"),
                None
            )
        );
        // A first segment without a dot or a port is a Docker Hub namespace,
        // and `host:5000` alone is a name and a tag.
        assert_eq!(
            parts("test.com:5000"),
            (
                "docker.io".into(),
                "library/test.com".into(),
                own("5000"),
                None
            )
        );
        assert_eq!(
            parts("bitnami/kubectl:1.30"),
            (
                "docker.io".into(),
                "bitnami/kubectl".into(),
                own("1.30"),
                None
            )
        );
        assert_eq!(
            parts("index.docker.io/x"),
            ("docker.io".into(), "library/x".into(), own("latest"), None)
        );
        assert_eq!(
            parts("localhost/a_b__c-d.e---f"),
            (
                "localhost".into(),
                "a_b__c-d.e---f".into(),
                own("latest"),
                None
            )
        );
        let d = format!("sha256:{}", "f".repeat(64));
        assert_eq!(
            parts(&format!("test:5000/repo:Tag_1.x-2@{d}")),
            (
                "test:5000".into(),
                "repo".into(),
                own("Tag_1.x-2"),
                Some(d.clone())
            )
        );
        assert_eq!(
            parts(&format!("test:5000/repo@{d}")),
            ("test:5000".into(), "repo".into(), None, Some(d))
        );
    }

    #[test]
    fn what_docker_rejects() {
        use GrammarError::*;
        let long_tag = format!("a/b:{}", "t".repeat(129));
        let long_name = format!("a/{}", "b".repeat(254));
        let cases: &[(&str, GrammarError)] = &[
            ("", Empty),
            ("a/B", Format),
            ("a//b", Format),
            ("a/b:", Format),
            ("a/b:.tag", Format),
            ("a/b:tag:tag", Format),
            ("a/-b", Format),
            ("a/b_", Format),
            ("a/b___c", Format),
            ("-host.com/a", Format),
            ("host.com:/a", Format),
            // Go's `\w` is ASCII; so is this grammar's.
            ("a/b:vé", Format),
            ("a/b@sha256:xyz", Format),
            (&long_tag, Format),
            (&long_name, NameTooLong),
            ("a/b@sha256:0123456789abcdef0123456789abcdef", DigestLength),
            ("a/b@md5:0123456789abcdef0123456789abcdef", DigestAlgorithm),
        ];
        for (input, want) in cases {
            assert_eq!(split(input), Err(*want), "{input:?}");
        }
        // 255 is still allowed.
        assert!(split(&format!("a/{}", "b".repeat(253))).is_ok());
    }
}
