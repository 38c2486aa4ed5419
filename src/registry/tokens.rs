//! Bearer tokens from token servers, and what each registry host wants,
//! remembered so later requests authenticate up front.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::docker_config::{CredentialId, Secret};

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub value: Secret,
    pub expires_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").finish_non_exhaustive()
    }
}

/// The token server's answer (distribution token spec; `access_token` is the
/// OAuth2 spelling).
#[derive(Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Tokens live at least this long per the spec when the server does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest we keep a token, whatever its server says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Stop using a token a little before it expires, so it never expires in flight.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(5);

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl TokenResponse {
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The server says how long; we believe it up to a day (a token
        // server answering u64::MAX must not overflow the clock).
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME)
            .saturating_sub(TOKEN_EXPIRY_MARGIN);
        Some(Token {
            value: Secret::new(value),
            expires_at: now.checked_add(lifetime).unwrap_or(now),
        })
    }
}

/// What a registry host wants, remembered so later requests authenticate up
/// front instead of collecting a 401 first.
#[derive(Debug, Clone)]
pub enum HostAuth {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    scope: String,
    credential: Option<CredentialId>,
}

/// Most registry hosts whose challenge is remembered.
const MAX_HOSTS: usize = 1024;
/// Most bearer tokens kept (a host, a repository and a credential each).
const MAX_TOKENS: usize = 4096;

/// Per-host challenges and per-(host, scope, credential) tokens, each
/// bounded: past the bound the least useful are evicted (quick_cache's
/// policy), and an expired token is dropped when it is looked up.
#[derive(Debug)]
pub struct AuthCache {
    hosts: quick_cache::sync::Cache<String, HostAuth>,
    tokens: quick_cache::sync::Cache<TokenKey, Token>,
}

impl Default for AuthCache {
    fn default() -> Self {
        Self::with_capacity(MAX_HOSTS, MAX_TOKENS)
    }
}

impl AuthCache {
    pub fn with_capacity(hosts: usize, tokens: usize) -> Self {
        Self {
            hosts: quick_cache::sync::Cache::new(hosts.max(1)),
            tokens: quick_cache::sync::Cache::new(tokens.max(1)),
        }
    }

    pub fn host(&self, host: &str) -> Option<HostAuth> {
        self.hosts.get(host)
    }

    pub fn remember_host(&self, host: &str, auth: HostAuth) {
        self.hosts.insert(host.to_string(), auth);
    }

    pub fn token(
        &self,
        host: &str,
        scope: &str,
        credential: Option<CredentialId>,
    ) -> Option<Secret> {
        let key = TokenKey {
            host: host.to_string(),
            scope: scope.to_string(),
            credential,
        };
        let token = self.tokens.get(&key)?;
        if token.expires_at > Instant::now() {
            return Some(token.value);
        }
        self.tokens.remove(&key);
        None
    }

    pub fn store_token(
        &self,
        host: &str,
        scope: &str,
        credential: Option<CredentialId>,
        token: Token,
    ) {
        let key = TokenKey {
            host: host.to_string(),
            scope: scope.to_string(),
            credential,
        };
        self.tokens.insert(key, token);
    }

    pub fn forget_token(&self, host: &str, scope: &str, credential: Option<CredentialId>) {
        self.tokens.remove(&TokenKey {
            host: host.to_string(),
            scope: scope.to_string(),
            credential,
        });
    }

    /// Hosts and tokens held now.
    pub fn len(&self) -> (usize, usize) {
        (self.hosts.len(), self.tokens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lifetime_from_the_server_is_clamped_to_a_day() {
        let now = Instant::now();
        for expires_in in [Some(u64::MAX), Some(u64::MAX / 2), Some(10 * 24 * 3600)] {
            let token = TokenResponse {
                token: Some("t".into()),
                access_token: None,
                expires_in,
            }
            .into_token(now)
            .expect("a token");
            assert!(
                token.expires_at <= now + MAX_TOKEN_LIFETIME,
                "{expires_in:?}"
            );
            assert!(token.expires_at > now + Duration::from_secs(23 * 3600));
        }
        let short = TokenResponse {
            token: Some("t".into()),
            access_token: None,
            expires_in: Some(1),
        }
        .into_token(now)
        .expect("a token");
        assert_eq!(
            short.expires_at, now,
            "shorter than the margin: used at once, never cached"
        );
    }

    #[test]
    fn hosts_and_tokens_stay_within_their_bounds() {
        let cache = AuthCache::with_capacity(16, 64);
        let far = Instant::now() + Duration::from_secs(3600);
        for i in 0..10_000 {
            let host = format!("h{i}.example.net");
            cache.remember_host(&host, HostAuth::Basic);
            cache.store_token(
                &host,
                "repository:a:pull",
                None,
                Token {
                    value: Secret::new("t"),
                    expires_at: far,
                },
            );
        }
        let (hosts, tokens) = cache.len();
        assert!(
            hosts <= 16 && tokens <= 64,
            "{hosts} hosts, {tokens} tokens"
        );
        assert!(cache.host("h9999.example.net").is_some(), "the newest stay");
    }

    #[test]
    fn token_cache_expires() {
        let cache = AuthCache::default();
        let now = Instant::now();
        cache.store_token(
            "h",
            "s",
            None,
            Token {
                value: Secret::new("t"),
                expires_at: now + Duration::from_secs(30),
            },
        );
        assert!(cache.token("h", "s", None).is_some());
        assert!(cache.token("h", "other", None).is_none());
        cache.store_token(
            "h",
            "s",
            None,
            Token {
                value: Secret::new("t"),
                expires_at: now,
            },
        );
        assert!(cache.token("h", "s", None).is_none());
    }
}
