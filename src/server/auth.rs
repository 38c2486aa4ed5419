//! Bearer-token authentication for the resolver on the HTTPS listener. An
//! open resolver is a credential oracle (it answers with what our registry
//! credentials can see) and an SSRF tool (it makes us contact any host), so
//! off loopback it only answers callers holding a token from
//! `--resolver-token-file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The accepted tokens, kept only as SHA-256 digests.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.digests.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --resolver-token-file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--resolver-token-file {0} holds no token (one per line; # starts a comment)")]
    Empty(PathBuf),
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// One token per line; blank lines and `#` comments are skipped; anything
    /// after the first comma (a caller's name, as in Kubernetes token files)
    /// is ignored.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| digest(l.split(',').next().unwrap_or(l).trim()))
            .collect();
        if digests.is_empty() {
            return Err(TokenFileError::Empty(path.to_path_buf()));
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Compares digests in constant time, against every token, so the time
    /// taken says nothing about how close a guess was.
    fn accepts(&self, token: &str) -> bool {
        let presented = digest(token);
        let mut found = subtle::Choice::from(0);
        for d in self.digests.iter() {
            found |= d.ct_eq(&presented);
        }
        found.into()
    }
}

/// Rejects requests without a known bearer token: 401, and no detail.
pub async fn require_token(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if tokens.accepts(t) => next.run(request).await,
        _ => {
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"kind": "unauthenticated", "message": "a valid bearer token is required"}})),
            )
                .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fn-image-resolver\""),
            );
            resp
        }
    }
}
