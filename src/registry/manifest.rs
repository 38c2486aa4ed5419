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
    /// The platform as containerd compares it (its `platforms.Normalize`):
    /// lower case; `aarch64` is `arm64`, `x86_64` is `amd64`, `i386` is
    /// `386`; `arm64/v8` is plain `arm64`, a plain `arm` is `arm/v7`
    /// (`armhf`, `armel`: v7, v6), and `amd64/v1` is plain `amd64`.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase);
        let (architecture, variant) = match arch.as_str() {
            "aarch64" | "arm64" => (
                "arm64",
                variant.filter(|v| !matches!(v.as_str(), "8" | "v8")),
            ),
            "x86_64" | "x86-64" | "amd64" => ("amd64", variant.filter(|v| v != "v1")),
            "i386" => ("386", None),
            "armhf" => ("arm", Some("v7".to_string())),
            "armel" => ("arm", Some("v6".to_string())),
            "arm" => (
                "arm",
                Some(match variant.as_deref() {
                    None | Some("" | "7" | "v7") => "v7".to_string(),
                    Some("5" | "v5") => "v5".to_string(),
                    Some("6" | "v6") => "v6".to_string(),
                    Some("8" | "v8") => "v8".to_string(),
                    Some(other) => other.to_string(),
                }),
            ),
            other => (other, variant),
        };
        Platform {
            os,
            architecture: architecture.to_string(),
            variant: variant.filter(|v| !v.is_empty()),
        }
    }

    /// Does an image for `other` serve a request for `self`? Compared
    /// normalized; a request without a variant takes any variant.
    pub fn matches(&self, other: &Platform) -> bool {
        let (wanted, offered) = (self.normalized(), other.normalized());
        wanted.os == offered.os
            && wanted.architecture == offered.architecture
            && (self.variant.is_none() || wanted.variant == offered.variant)
    }

    /// The same platform, variants included, once normalized.
    fn same(&self, other: &Platform) -> bool {
        self.normalized() == other.normalized()
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

/// The index entries containerd would consider for `wanted`, best first
/// (its `images.Manifest`): those whose platform matches, the exact ones
/// (variant included) before the rest, each group in index order; then
/// the entries without a platform, which match any platform until their
/// image's config says otherwise. containerd takes the first of these only.
pub fn candidates<'a>(manifests: &'a [IndexEntry], wanted: &Platform) -> Vec<&'a IndexEntry> {
    let mut matching: Vec<(bool, &IndexEntry)> = manifests
        .iter()
        .filter_map(|m| {
            let offered = m.platform.as_ref()?.to_platform();
            wanted
                .matches(&offered)
                .then(|| (!wanted.same(&offered), m))
        })
        .collect();
    matching.sort_by_key(|(inexact, _)| *inexact);
    matching
        .into_iter()
        .map(|(_, m)| m)
        .chain(manifests.iter().filter(|m| m.platform.is_none()))
        .collect()
}

/// What an index offers, for an error message: its platforms (BuildKit's
/// attestations, `unknown/unknown`, left out) and how many entries say none.
pub fn offered(manifests: &[IndexEntry]) -> Vec<String> {
    let mut available: Vec<String> = manifests
        .iter()
        .filter_map(|m| m.platform.as_ref())
        .filter(|p| p.os != "unknown" && !p.os.is_empty())
        .map(|p| p.to_platform().to_string())
        .collect();
    available.dedup();
    let platformless = manifests.iter().filter(|m| m.platform.is_none()).count();
    if platformless > 0 {
        available.push(format!("{platformless} without a platform"));
    }
    available
}

/// What an image config says about how the image starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub platform: Option<Platform>,
}

/// Does JSON object key `key` set Go struct field `name`? Go's
/// encoding/json (which containerd and the function runner decode image
/// configs with) matches keys to fields case-insensitively, with Unicode's
/// two folds into ASCII letters: the Kelvin sign is `k`, the long s is `s`.
fn go_key_matches(key: &str, name: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        c => c.to_ascii_lowercase(),
    };
    key.chars().map(fold).eq(name.chars().map(fold))
}

/// A config read the way Go's encoding/json reads it into containerd's
/// types: every key that matches a field's name case-insensitively sets it,
/// in document order, so the last one wins; `null` empties a list; a second
/// `config` object updates the fields it names and keeps the rest.
#[derive(Default)]
struct GoConfig {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for GoConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> serde::de::Visitor<'de> for Top {
            type Value = GoConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an image config object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<GoConfig, A::Error> {
                let mut config = GoConfig::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if go_key_matches(&key, "config") {
                        let inner: Option<ContainerConfig> = map.next_value()?;
                        if let Some(inner) = inner {
                            if let Some(e) = inner.entrypoint {
                                config.entrypoint = Some(e.unwrap_or_default());
                            }
                            if let Some(c) = inner.cmd {
                                config.cmd = Some(c.unwrap_or_default());
                            }
                        }
                    } else if go_key_matches(&key, "os") {
                        config.os = map.next_value::<Option<String>>()?;
                    } else if go_key_matches(&key, "architecture") {
                        config.architecture = map.next_value::<Option<String>>()?;
                    } else if go_key_matches(&key, "variant") {
                        config.variant = map.next_value::<Option<String>>()?;
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(config)
            }
        }
        deserializer.deserialize_map(Top)
    }
}

/// `config` of an image config: `Some(None)` is a key present with `null`.
#[derive(Default)]
struct ContainerConfig {
    entrypoint: Option<Option<Vec<String>>>,
    cmd: Option<Option<Vec<String>>>,
}

impl<'de> Deserialize<'de> for ContainerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = ContainerConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a container config object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ContainerConfig, A::Error> {
                let mut config = ContainerConfig::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if go_key_matches(&key, "Entrypoint") {
                        config.entrypoint = Some(map.next_value()?);
                    } else if go_key_matches(&key, "Cmd") {
                        config.cmd = Some(map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(config)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

pub fn parse_config(body: &[u8]) -> Result<ImageConfig, ManifestError> {
    let raw: GoConfig = serde_json::from_slice(body).map_err(|e| {
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
    Ok(ImageConfig {
        entrypoint: raw.entrypoint.unwrap_or_default(),
        cmd: raw.cmd.unwrap_or_default(),
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
    fn candidates_come_matching_then_exact_first_then_platformless_in_index_order() {
        let index = br#"{"manifests":[
            {"digest":"sha256:1","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:2","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
            {"digest":"sha256:3","platform":{"os":"unknown","architecture":"unknown"}},
            {"digest":"sha256:4"},
            {"digest":"sha256:5","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"digest":"sha256:6","platform":{"os":"linux","architecture":"arm64"}},
            {"digest":"sha256:7"}]}"#;
        let ManifestKind::Index { manifests } = parse_manifest(index, None).expect("index") else {
            panic!("not an index")
        };
        let digests = |wanted: &str| -> Vec<&str> {
            candidates(&manifests, &wanted.parse().expect("valid"))
                .iter()
                .map(|m| m.digest.as_str())
                .collect()
        };
        assert_eq!(digests("linux/amd64"), ["sha256:1", "sha256:4", "sha256:7"]);
        assert_eq!(digests("linux/arm"), ["sha256:2", "sha256:4", "sha256:7"]);
        // arm64 and arm64/v8 are one platform, whichever way round.
        assert_eq!(
            digests("linux/arm64"),
            ["sha256:5", "sha256:6", "sha256:4", "sha256:7"]
        );
        assert_eq!(
            digests("linux/arm64/v8"),
            ["sha256:5", "sha256:6", "sha256:4", "sha256:7"]
        );
        assert_eq!(digests("linux/s390x"), ["sha256:4", "sha256:7"]);
        assert_eq!(
            offered(&manifests),
            [
                "linux/amd64",
                "linux/arm/v7",
                "linux/arm64/v8",
                "linux/arm64",
                "2 without a platform"
            ]
        );
    }

    #[test]
    fn platforms_normalize_as_containerd_does() {
        let n = |s: &str| {
            s.parse::<Platform>()
                .expect("valid")
                .normalized()
                .to_string()
        };
        assert_eq!(n("linux/arm64/v8"), "linux/arm64");
        assert_eq!(n("linux/aarch64"), "linux/arm64");
        assert_eq!(n("linux/arm"), "linux/arm/v7");
        assert_eq!(n("linux/armhf"), "linux/arm/v7");
        assert_eq!(n("linux/x86_64"), "linux/amd64");
        assert_eq!(n("Linux/AMD64"), "linux/amd64");
        assert_eq!(n("linux/amd64/v3"), "linux/amd64/v3");
        let p = |s: &str| s.parse::<Platform>().expect("valid");
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm/v7").matches(&p("linux/arm")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
    }

    #[test]
    fn config_keys_are_read_as_go_reads_them() {
        let entrypoint = |json: &str| parse_config(json.as_bytes()).expect("valid").entrypoint;
        assert_eq!(
            entrypoint(r#"{"config":{"entrypoint":["/lower"]}}"#),
            ["/lower"]
        );
        assert_eq!(
            entrypoint(r#"{"CONFIG":{"ENTRYPOINT":["/upper"]}}"#),
            ["/upper"]
        );
        // Several keys for one field: the last in the document wins.
        assert_eq!(
            entrypoint(r#"{"config":{"Entrypoint":["/first"],"entrypoint":["/second"]}}"#),
            ["/second"]
        );
        assert_eq!(
            entrypoint(r#"{"config":{"entrypoint":["/first"],"Entrypoint":["/second"]}}"#),
            ["/second"]
        );
        assert!(entrypoint(r#"{"config":{"Entrypoint":["/a"],"entrypoint":null}}"#).is_empty());
        // A second config object updates what it names, keeps the rest.
        let c = parse_config(br#"{"config":{"Entrypoint":["/a"]},"Config":{"Cmd":["x"]}}"#)
            .expect("valid");
        assert_eq!(
            (c.entrypoint, c.cmd),
            (vec!["/a".to_string()], vec!["x".to_string()])
        );
        // Go's two non-ASCII folds: the Kelvin sign and the long s.
        assert_eq!(
            parse_config("{\"\u{017F}\":1,\"config\":{\"Cmd\":[\"k\"]},\"O\u{017F}\":\"linux\",\"architecture\":\"amd64\"}".as_bytes())
                .expect("valid")
                .platform
                .map(|p| p.to_string()),
            Some("linux/amd64".to_string())
        );
        assert!(
            go_key_matches("entrypoint", "Entrypoint")
                && !go_key_matches("entry_point", "Entrypoint")
        );
        assert!(parse_config(br#"{"config":{"Entrypoint":"/not-a-list"}}"#).is_err());
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
