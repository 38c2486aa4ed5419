//! Registry credentials from a Docker `config.json`.
//!
//! We parse `auths` ourselves rather than through `docker_credential`: that crate
//! runs `docker-credential-*` helper binaries named by the config (a mounted
//! secret must never make us execute anything), re-reads the file per lookup, and
//! its errors can carry helper output. Here every secret lives in a type whose
//! `Debug` is redacted, and errors name the file and the entry, never a value.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::normalize_host;

/// A secret string: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or access token used as password).
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token from `docker login` against a token server.
    IdentityToken { username: String, token: Secret },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .finish_non_exhaustive(),
            Self::IdentityToken { username, .. } => f
                .debug_struct("IdentityToken")
                .field("username", username)
                .finish_non_exhaustive(),
        }
    }
}

impl Credential {
    /// A stable, non-reversible identity for cache keys: two different
    /// credentials never share cached answers or tokens.
    pub fn identity(&self) -> CredentialId {
        let mut h = Sha256::new();
        match self {
            Self::Basic { username, password } => {
                h.update(b"basic\0");
                h.update(username.as_bytes());
                h.update(b"\0");
                h.update(password.expose().as_bytes());
            }
            Self::IdentityToken { username, token } => {
                h.update(b"identitytoken\0");
                h.update(username.as_bytes());
                h.update(b"\0");
                h.update(token.expose().as_bytes());
            }
        }
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        // 64 bits: two credentials for one registry agree on them with a
        // chance of 2^-64; zero (as likely) is moved so that `None` costs no
        // byte in a cache entry.
        CredentialId(NonZeroU64::new(u64::from_be_bytes(id)).unwrap_or(NonZeroU64::MAX))
    }

    /// `Authorization` value for HTTP Basic, when this credential can do Basic.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Self::Basic { username, password } => Some(format!(
                "Basic {}",
                BASE64.encode(format!("{username}:{}", password.expose()))
            )),
            Self::IdentityToken { .. } => None,
        }
    }
}

/// A credential as configured, with its identity computed once at load: a
/// cache hit looks it up by host and must not hash the secret every time.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyedCredential {
    pub credential: Credential,
    pub id: CredentialId,
}

impl KeyedCredential {
    pub fn new(credential: Credential) -> Self {
        let id = credential.identity();
        Self { credential, id }
    }
}

/// Hash of a credential (see [`Credential::identity`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialId(NonZeroU64);

impl fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 32 bits are enough to tell credentials apart in a log.
        write!(f, "CredentialId({:08x})", self.0.get() >> 32)
    }
}

/// Why a Docker config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("cannot read Docker config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // serde_json's own message can quote the offending value (a password), so
    // only its category and position are reported.
    #[error("Docker config {path} is not valid JSON ({category} at line {line}, column {column})")]
    Syntax {
        path: PathBuf,
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("Docker config {path}: entry {registry:?} {reason}")]
    Entry {
        path: PathBuf,
        registry: String,
        reason: &'static str,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    /// In the file's order: which key wins for a registry depends on it.
    #[serde(default, deserialize_with = "in_file_order")]
    auths: Vec<(String, RawAuth)>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<serde_json::Value>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: Option<serde_json::Value>,
}

/// A JSON object as its entries, in the order of the document.
fn in_file_order<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(String, RawAuth)>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, RawAuth)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of registries")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_map(Entries)
}

/// The key Docker's CLI looks Docker Hub up by.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// How strongly `key` claims `registry` (its normalized form): lower is
/// stronger. The Docker CLI asks for the exact key first (for Docker Hub,
/// `https://index.docker.io/v1/`); the rest follow in the file's order.
fn claim(key: &str, registry: &str) -> u8 {
    let exact = if registry == super::reference::DOCKER_HUB {
        key == DOCKER_HUB_KEY
    } else {
        key == registry
    };
    u8::from(!exact)
}

#[derive(Deserialize)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The `auths` of a Docker config, keyed by normalized registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    auths: HashMap<String, Arc<KeyedCredential>>,
    /// The config names credential helpers, which we deliberately never run.
    pub ignored_helpers: bool,
    duplicates: Vec<Duplicate>,
}

/// Two keys of `auths` for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub registry: String,
    /// The key whose credential is used.
    pub used: String,
    pub ignored: String,
}

impl DockerConfig {
    pub fn load(path: &Path) -> Result<Self, DockerConfigError> {
        let bytes = std::fs::read(path).map_err(|source| DockerConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses config bytes; `path` is only used in error messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, DockerConfigError> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| DockerConfigError::Syntax {
                path: path.to_path_buf(),
                category: match e.classify() {
                    serde_json::error::Category::Io => "read error",
                    serde_json::error::Category::Syntax => "syntax error",
                    serde_json::error::Category::Data => "unexpected structure",
                    serde_json::error::Category::Eof => "unexpected end",
                },
                line: e.line(),
                column: e.column(),
            })?;
        let mut auths: HashMap<String, Arc<KeyedCredential>> = HashMap::new();
        // Registry → (claim of the key in use, the key).
        let mut chosen: HashMap<String, (u8, String)> = HashMap::new();
        let mut duplicates: Vec<Duplicate> = Vec::new();
        for (key, entry) in raw.auths {
            let entry_err = |reason| DockerConfigError::Entry {
                path: path.to_path_buf(),
                registry: key.clone(),
                reason,
            };
            let mut username = entry.username.filter(|u| !u.is_empty());
            let mut password = entry.password.filter(|p| !p.is_empty());
            if let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = BASE64
                    .decode(encoded.trim())
                    .map_err(|_| entry_err("has an \"auth\" value that is not base64"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| entry_err("has an \"auth\" value that is not UTF-8"))?;
                let (user, pass) = decoded
                    .split_once(':')
                    .ok_or_else(|| entry_err("has an \"auth\" value that is not user:password"))?;
                username.get_or_insert_with(|| user.to_string());
                password.get_or_insert_with(|| pass.to_string());
            }
            let credential = match (entry.identitytoken.filter(|t| !t.is_empty()), password) {
                (Some(token), _) => Credential::IdentityToken {
                    username: username.unwrap_or_default(),
                    token: Secret::new(token),
                },
                (None, Some(password)) => Credential::Basic {
                    username: username.unwrap_or_default(),
                    password: Secret::new(password),
                },
                // An entry without secrets (e.g. left by a credential helper) gives nothing.
                (None, None) => continue,
            };
            let registry = normalize_host(&key);
            let rank = claim(&key, &registry);
            let take = match chosen.get(&registry) {
                None => true,
                Some((held, held_key)) => {
                    // An exact key repeated: the later one, as Go's decoder
                    // keeps; otherwise the stronger claim, then file order.
                    let take = rank < *held || (rank == 0 && *held == 0);
                    let (used, ignored) = if take {
                        (key.clone(), held_key.clone())
                    } else {
                        (held_key.clone(), key.clone())
                    };
                    duplicates.push(Duplicate {
                        registry: registry.clone(),
                        used,
                        ignored,
                    });
                    take
                }
            };
            if take {
                chosen.insert(registry.clone(), (rank, key.clone()));
                auths.insert(registry, Arc::new(KeyedCredential::new(credential)));
            }
        }
        Ok(Self {
            auths,
            ignored_helpers: raw.creds_store.is_some() || raw.cred_helpers.is_some(),
            duplicates,
        })
    }

    /// Keys that named a registry another key of the file named too (the
    /// credential of `used` is in use), for a warning.
    pub fn duplicates(&self) -> &[Duplicate] {
        &self.duplicates
    }

    /// Credentials for a normalized registry host, if the config has any.
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.auths.get(registry).map(|k| &k.credential)
    }

    /// The same, shared, with its identity.
    pub fn get_keyed(&self, registry: &str) -> Option<Arc<KeyedCredential>> {
        self.auths.get(registry).cloned()
    }

    /// Identities of every configured credential.
    pub fn identities(&self) -> Vec<CredentialId> {
        self.auths.values().map(|k| k.id).collect()
    }

    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.auths.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<DockerConfig, DockerConfigError> {
        DockerConfig::parse(json.as_bytes(), Path::new("/cfg.json"))
    }

    #[test]
    fn auth_field_username_password_and_identity_token() {
        let cfg = parse(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "bXlfdXNlcm5hbWU6bXlfcGFzc3dvcmQ="},
                "GHCR.io": {"username": "u", "password": "p"},
                "tok.example.com": {"identitytoken": "refresh", "auth": "dTpw"},
                "empty.example.com": {}
            }}"#,
        )
        .expect("valid config");
        assert_eq!(
            cfg.get("docker.io"),
            Some(&Credential::Basic {
                username: "my_username".into(),
                password: Secret::new("my_password")
            })
        );
        assert!(
            matches!(cfg.get("ghcr.io"), Some(Credential::Basic { username, .. }) if username == "u")
        );
        assert!(matches!(
            cfg.get("tok.example.com"),
            Some(Credential::IdentityToken { .. })
        ));
        assert_eq!(cfg.get("empty.example.com"), None);
        assert!(!cfg.ignored_helpers);
    }

    #[test]
    fn password_with_colon_survives_auth_decoding() {
        let auth = BASE64.encode("user:pa:ss");
        let cfg = parse(&format!(r#"{{"auths":{{"r.io":{{"auth":"{auth}"}}}}}}"#)).expect("valid");
        assert_eq!(
            cfg.get("r.io").and_then(Credential::basic_header),
            Some(format!("Basic {}", BASE64.encode("user:pa:ss")))
        );
    }

    #[test]
    fn errors_never_quote_secret_values() {
        let secret = "SUPER-SECRET-MARKER";
        for json in [
            format!(r#"{{"auths": "{secret}"}}"#),
            format!(r#"{{"auths": {{"r.io": {{"auth": "{secret}!!"}}}}}}"#),
            format!(r#"{{"auths": {{"r.io": {{"password": {secret}}}}}}}"#),
            format!(
                r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#,
                BASE64.encode(secret)
            ),
            format!("not json {secret}"),
        ] {
            let err = parse(&json).expect_err(&json).to_string();
            assert!(!err.contains(secret), "{err}");
            assert!(err.contains("/cfg.json"), "{err}");
        }
    }

    #[test]
    fn debug_output_is_redacted() {
        let cfg = parse(r#"{"auths":{"r.io":{"username":"u","password":"hunter2"},"t.io":{"identitytoken":"tok3n"}}}"#)
            .expect("valid");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("tok3n"), "{dbg}");
    }

    #[test]
    fn credential_identity_differs_per_secret() {
        let a = Credential::Basic {
            username: "u".into(),
            password: Secret::new("a"),
        };
        let b = Credential::Basic {
            username: "u".into(),
            password: Secret::new("b"),
        };
        assert_ne!(a.identity(), b.identity());
        assert_eq!(a.identity(), a.clone().identity());
    }

    #[test]
    fn keys_for_one_registry_are_chosen_as_the_docker_cli_does_whatever_the_order() {
        let hub = BASE64.encode("hub:from-index-key");
        let short = BASE64.encode("hub:from-docker-io");
        for json in [
            format!(
                r#"{{"auths":{{"docker.io":{{"auth":"{short}"}},"https://index.docker.io/v1/":{{"auth":"{hub}"}}}}}}"#
            ),
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{hub}"}},"docker.io":{{"auth":"{short}"}}}}}}"#
            ),
        ] {
            let cfg = parse(&json).expect("valid");
            assert!(
                matches!(cfg.get("docker.io"), Some(Credential::Basic { password, .. }) if password.expose() == "from-index-key"),
                "{json}"
            );
            assert_eq!(
                cfg.duplicates(),
                [Duplicate {
                    registry: "docker.io".into(),
                    used: "https://index.docker.io/v1/".into(),
                    ignored: "docker.io".into()
                }]
            );
        }
        // Another registry: the key equal to the host, then the file's order.
        let cfg = parse(
            r#"{"auths":{
                "https://r.example.com/v2/":{"username":"u","password":"first-url"},
                "https://r.example.com":{"username":"u","password":"second-url"},
                "r.example.com":{"username":"u","password":"exact"},
                "https://q.example.com/v2/":{"username":"u","password":"q-first"},
                "http://q.example.com":{"username":"u","password":"q-second"}}}"#,
        )
        .expect("valid");
        let password = |registry: &str| match cfg.get(registry) {
            Some(Credential::Basic { password, .. }) => password.expose().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(password("r.example.com"), "exact");
        assert_eq!(password("q.example.com"), "q-first");
        assert_eq!(cfg.duplicates().len(), 3);
    }

    #[test]
    fn helpers_are_noted_not_run() {
        let cfg = parse(r#"{"auths":{},"credsStore":"desktop"}"#).expect("valid");
        assert!(cfg.ignored_helpers);
    }
}
