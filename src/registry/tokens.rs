//! Bearer tokens from token servers, and what each registry host wants,
//! remembered so later requests authenticate up front.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
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
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Some(Token {
            value: Secret::new(value),
            expires_at: now + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN),
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

/// Per-host challenges and per-(host, scope, credential) tokens.
#[derive(Debug, Default)]
pub struct AuthCache {
    hosts: Mutex<HashMap<String, HostAuth>>,
    tokens: Mutex<HashMap<TokenKey, Token>>,
}

impl AuthCache {
    pub fn host(&self, host: &str) -> Option<HostAuth> {
        lock(&self.hosts).get(host).cloned()
    }

    pub fn remember_host(&self, host: &str, auth: HostAuth) {
        lock(&self.hosts).insert(host.to_string(), auth);
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
        let mut tokens = lock(&self.tokens);
        match tokens.get(&key) {
            Some(t) if t.expires_at > Instant::now() => Some(t.value.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
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
        let mut tokens = lock(&self.tokens);
        // Expired tokens are dropped lazily; sweep when the map grows so a
        // long-running process with many repositories stays bounded.
        if tokens.len() >= 4096 {
            let now = Instant::now();
            tokens.retain(|_, t| t.expires_at > now);
        }
        tokens.insert(key, token);
    }

    pub fn forget_token(&self, host: &str, scope: &str, credential: Option<CredentialId>) {
        lock(&self.tokens).remove(&TokenKey {
            host: host.to_string(),
            scope: scope.to_string(),
            credential,
        });
    }
}

/// The maps stay consistent even if a holder panicked, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

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
