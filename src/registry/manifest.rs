//! The few fields of manifests, indexes and image configs that resolving
//! needs, parsed leniently (unknown fields and media types are fine) so that we
//! never reject an image the kubelet would run.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest as _, Sha256, Sha384, Sha512};

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Does an index entry for `other` satisfy a request for `self`? A request
    /// without a variant takes any variant (arm64 entries usually say `v8`).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/architecture[/variant], e.g. linux/amd64")]
pub struct PlatformError(pub String);

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid) {
            return Err(PlatformError(s.to_string()));
        }
        Ok(Self {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub media_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexEntry {
    pub digest: String,
    #[serde(default)]
    pub platform: Option<RawPlatform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawPlatform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl RawPlatform {
    fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
    }
}

/// A manifest body, classified.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    /// A single image: the descriptor of its config blob.
    Image { config: Descriptor },
    /// An index / manifest list: its entries.
    Index { manifests: Vec<IndexEntry> },
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why a manifest or config could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

/// Classifies a manifest body. `content_type` is the response header, which
/// wins over the body's own `mediaType` only when the body has none.
pub fn parse_manifest(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<ManifestKind, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(body).map_err(|e| {
        ManifestError(format!(
            "the manifest is not valid JSON ({})",
            e.classify_name()
        ))
    })?;
    if raw.schema_version == Some(1) {
        return Err(ManifestError(
            "Docker schema 1 manifests are not supported; push the image with a current client"
                .into(),
        ));
    }
    let media_type = raw
        .media_type
        .as_deref()
        .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()));
    let is_index = media_type.is_some_and(|m| INDEX_TYPES.contains(&m))
        || (raw.config.is_none() && raw.manifests.is_some());
    if is_index {
        return Ok(ManifestKind::Index {
            manifests: raw.manifests.unwrap_or_default(),
        });
    }
    match raw.config {
        Some(config) => Ok(ManifestKind::Image { config }),
        None => Err(ManifestError(format!(
            "the manifest has no config ({})",
            media_type.unwrap_or("no media type")
        ))),
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected structure",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Picks the index entry for `wanted`, or lists what the index offers.
pub fn select_platform<'a>(
    manifests: &'a [IndexEntry],
    wanted: &Platform,
) -> Result<&'a IndexEntry, Vec<String>> {
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| wanted.matches(&p.to_platform()))
        })
        .ok_or_else(|| {
            let mut available: Vec<String> = manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                // BuildKit attestations are listed as unknown/unknown.
                .filter(|p| p.os != "unknown" && !p.os.is_empty())
                .map(|p| p.to_platform().to_string())
                .collect();
            available.dedup();
            available
        })
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawContainerConfig>,
}

#[derive(Debug, Deserialize)]
struct RawContainerConfig {
    #[serde(default, rename = "Entrypoint")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, rename = "Cmd")]
    cmd: Option<Vec<String>>,
}

/// What an image config says about how the image starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub platform: Option<Platform>,
}

pub fn parse_config(body: &[u8]) -> Result<ImageConfig, ManifestError> {
    let raw: RawConfig = serde_json::from_slice(body).map_err(|e| {
        ManifestError(format!(
            "the image config is not valid JSON ({})",
            e.classify_name()
        ))
    })?;
    let platform = match (raw.os, raw.architecture) {
        (Some(os), Some(architecture)) if !os.is_empty() && !architecture.is_empty() => {
            Some(Platform {
                os,
                architecture,
                variant: raw.variant.filter(|v| !v.is_empty()),
            })
        }
        _ => None,
    };
    let config = raw.config;
    Ok(ImageConfig {
        entrypoint: config
            .as_ref()
            .and_then(|c| c.entrypoint.clone())
            .unwrap_or_default(),
        cmd: config.and_then(|c| c.cmd).unwrap_or_default(),
        platform,
    })
}

/// A content digest: sha256, nearly every digest there is, as its 32
/// bytes; any other algorithm, or upper-case hex, as written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Digest {
    Sha256([u8; 32]),
    Other(Box<str>),
}

impl Digest {
    pub fn new(text: &str) -> Self {
        let mut bytes = [0u8; 32];
        match text.strip_prefix("sha256:") {
            // Lower case only, so that the text comes back exactly as given.
            Some(hex)
                if !hex.bytes().any(|b| b.is_ascii_uppercase())
                    && hex::decode_to_slice(hex, &mut bytes).is_ok() =>
            {
                Self::Sha256(bytes)
            }
            _ => Self::Other(text.into()),
        }
    }

    /// Is this the digest `text` names? (Hex is case-insensitive.)
    pub fn is(&self, text: &str) -> bool {
        match self {
            Self::Sha256(bytes) => text.strip_prefix("sha256:").is_some_and(|hex| {
                let mut other = [0u8; 32];
                hex::decode_to_slice(hex, &mut other).is_ok() && &other == bytes
            }),
            Self::Other(own) => own.eq_ignore_ascii_case(text),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sha256(bytes) => {
                let mut hex = [0u8; 64];
                // 32 bytes always fit 64 hex digits.
                hex::encode_to_slice(bytes, &mut hex).map_err(|_| fmt::Error)?;
                f.write_str("sha256:")?;
                f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
            }
            Self::Other(text) => f.write_str(text),
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `algorithm:hex` of `bytes`, for the algorithms references may name.
pub fn digest_of(algorithm: &str, bytes: &[u8]) -> Option<String> {
    let hex = match algorithm {
        "sha256" => hex::encode(Sha256::digest(bytes)),
        "sha384" => hex::encode(Sha384::digest(bytes)),
        "sha512" => hex::encode(Sha512::digest(bytes)),
        _ => return None,
    };
    Some(format!("{algorithm}:{hex}"))
}

/// Checks that `bytes` hash to `expected` (`algorithm:hex`).
pub fn verify_digest(expected: &str, bytes: &[u8]) -> Result<(), ManifestError> {
    let algorithm = expected.split_once(':').map(|(a, _)| a).unwrap_or_default();
    match digest_of(algorithm, bytes) {
        Some(actual) if actual.eq_ignore_ascii_case(expected) => Ok(()),
        Some(actual) => Err(ManifestError(format!(
            "content does not match its digest: expected {expected}, got {actual}"
        ))),
        None => Err(ManifestError(format!(
            "unsupported digest algorithm in {expected:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_keep_their_text() {
        let lower = format!("sha256:{}", "0a".repeat(32));
        let d = Digest::new(&lower);
        assert!(matches!(d, Digest::Sha256(_)));
        assert_eq!(d.to_string(), lower);
        assert!(d.is(&lower) && d.is(&lower.to_uppercase().replace("SHA256", "sha256")));
        assert!(!d.is(&format!("sha256:{}", "0b".repeat(32))) && !d.is("sha256:0a"));
        for other in [
            format!("sha256:{}", "0A".repeat(32)),
            format!("sha512:{}", "1".repeat(128)),
            "sha256:short".to_string(),
        ] {
            let d = Digest::new(&other);
            assert!(matches!(d, Digest::Other(_)), "{other}");
            assert_eq!(d.to_string(), other);
            assert!(d.is(&other));
        }
    }

    #[test]
    fn platforms_parse_and_match() {
        let p: Platform = "linux/arm64".parse().expect("valid");
        assert!(p.matches(&"linux/arm64/v8".parse().expect("valid")));
        assert!(!p.matches(&"linux/amd64".parse().expect("valid")));
        let v7: Platform = "linux/arm/v7".parse().expect("valid");
        assert!(!v7.matches(&"linux/arm/v6".parse().expect("valid")));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_kinds() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"x","digest":"sha256:ab","size":1},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(image, None),
            Ok(ManifestKind::Image { .. })
        ));
        let oci_no_media_type = br#"{"schemaVersion":2,"config":{"digest":"sha256:ab"}}"#;
        assert!(matches!(
            parse_manifest(oci_no_media_type, None),
            Ok(ManifestKind::Image { .. })
        ));
        let index = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:1","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert!(
            matches!(parse_manifest(index, None), Ok(ManifestKind::Index { manifests }) if manifests.len() == 1)
        );
        assert!(parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#, None).is_err());
        assert!(parse_manifest(b"<html>", None).is_err());
        assert!(parse_manifest(b"{}", Some("application/vnd.oci.image.manifest.v1+json")).is_err());
    }

    #[test]
    fn missing_platform_lists_what_is_there() {
        let index = br#"{"manifests":[
            {"digest":"sha256:1","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:2","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
            {"digest":"sha256:3","platform":{"os":"unknown","architecture":"unknown"}}]}"#;
        let ManifestKind::Index { manifests } = parse_manifest(index, None).expect("index") else {
            panic!("not an index")
        };
        let err = select_platform(&manifests, &"linux/s390x".parse().expect("valid"))
            .expect_err("missing");
        assert_eq!(
            err,
            vec!["linux/amd64".to_string(), "linux/arm/v7".to_string()]
        );
        let ok = select_platform(&manifests, &"linux/arm".parse().expect("valid")).expect("found");
        assert_eq!(ok.digest, "sha256:2");
    }

    #[test]
    fn config_entrypoint_and_cmd() {
        let c = parse_config(br#"{"os":"linux","architecture":"amd64","config":{"Entrypoint":["/fn"],"Cmd":["--x"]}}"#).expect("valid");
        assert_eq!(c.entrypoint, vec!["/fn"]);
        assert_eq!(c.cmd, vec!["--x"]);
        assert_eq!(
            c.platform.map(|p| p.to_string()),
            Some("linux/amd64".to_string())
        );
        let c = parse_config(br#"{"config":{"Entrypoint":null}}"#).expect("valid");
        assert!(c.entrypoint.is_empty() && c.cmd.is_empty() && c.platform.is_none());
    }

    #[test]
    fn digests_verify() {
        let d = digest_of("sha256", b"abc").expect("sha256");
        assert_eq!(
            d,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(verify_digest(&d, b"abc").is_ok());
        assert!(verify_digest(&d, b"abd").is_err());
        assert!(verify_digest("md5:00", b"abc").is_err());
        assert!(verify_digest(&digest_of("sha512", b"x").expect("sha512"), b"x").is_ok());
    }
}
