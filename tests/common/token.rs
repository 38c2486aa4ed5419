//! A token server like Docker Hub's, GHCR's or Harbor's: answers the registry's
//! Bearer challenge with an ES256 JWT whose signing certificate is in the
//! registry's `rootcertbundle` (sent in the `x5c` header).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, KeyPair};
use serde_json::json;

pub const SERVICE: &str = "fn-image-resolver-test-registry";
pub const ISSUER: &str = "fn-image-resolver-test-issuer";

#[derive(Debug)]
struct Inner {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    users: HashMap<String, String>,
    refresh_tokens: HashMap<String, String>,
    allow_anonymous: bool,
    lifetime_secs: u64,
}

/// Counters and configuration shared with the test.
#[derive(Debug, Clone)]
pub struct TokenServer {
    inner: Arc<Inner>,
    pub requests: Arc<AtomicUsize>,
    pub scopes: Arc<Mutex<Vec<String>>>,
    pub root_pem: String,
    pub port: u16,
}

impl TokenServer {
    /// Starts on a loopback port. `users` may log in with Basic; each entry of
    /// `refresh_tokens` maps an identity token to its user.
    pub async fn start(
        users: &[(&str, &str)],
        refresh_tokens: &[(&str, &str)],
        allow_anonymous: bool,
    ) -> Self {
        let key_pair = KeyPair::generate().expect("token key");
        let cert = CertificateParams::new(vec!["token-signer".to_string()])
            .expect("params")
            .self_signed(&key_pair)
            .expect("self-signed token cert");
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pair.serialize_der())
                .expect("load token key");
        let inner = Arc::new(Inner {
            key,
            cert_der: cert.der().to_vec(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            refresh_tokens: refresh_tokens
                .iter()
                .map(|(t, u)| (t.to_string(), u.to_string()))
                .collect(),
            allow_anonymous,
            lifetime_secs: 300,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token server");
        let port = listener.local_addr().expect("addr").port();
        let server = Self {
            inner,
            requests: Arc::new(AtomicUsize::new(0)),
            scopes: Arc::new(Mutex::new(Vec::new())),
            root_pem: cert.pem(),
            port,
        };
        let app = Router::new()
            .route("/token", get(get_token).post(post_token))
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// A token for `scope` without going through HTTP (for pushing test images).
    pub fn issue(&self, subject: &str, scope: &str) -> String {
        sign(&self.inner, subject, scope)
    }
}

fn sign(inner: &Inner, subject: &str, scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut access = Vec::new();
    for part in scope.split(' ').filter(|s| !s.is_empty()) {
        let mut fields = part.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        access.push(
            json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}),
        );
    }
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&inner.cert_der)]});
    let claims = json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE,
        "exp": now + inner.lifetime_secs, "nbf": now - 10, "iat": now,
        "jti": format!("{subject}-{now}-{}", rand_suffix()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = inner
        .key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .expect("sign token");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

fn rand_suffix() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst) as u64
}

fn answer(server: &TokenServer, subject: Option<String>, scope: &str) -> Response {
    server.requests.fetch_add(1, Ordering::SeqCst);
    server
        .scopes
        .lock()
        .expect("scopes")
        .push(scope.to_string());
    match subject {
        Some(subject) => {
            let token = sign(&server.inner, &subject, scope);
            (
                StatusCode::OK,
                axum::Json(json!({"token": token, "access_token": token, "expires_in": server.inner.lifetime_secs})),
            )
                .into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"details": "incorrect username or password"})),
        )
            .into_response(),
    }
}

async fn get_token(
    State(server): State<TokenServer>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let scope = q.get("scope").cloned().unwrap_or_default();
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let subject = match basic {
        Some(pair) => pair
            .split_once(':')
            .filter(|(u, p)| server.inner.users.get(*u).is_some_and(|want| want == p))
            .map(|(u, _)| u.to_string()),
        None if server.inner.allow_anonymous => Some("anonymous".to_string()),
        None => None,
    };
    answer(&server, subject, &scope)
}

async fn post_token(
    State(server): State<TokenServer>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let scope = form.get("scope").cloned().unwrap_or_default();
    let subject = (form.get("grant_type").map(String::as_str) == Some("refresh_token"))
        .then(|| {
            form.get("refresh_token")
                .and_then(|t| server.inner.refresh_tokens.get(t))
                .cloned()
        })
        .flatten();
    answer(&server, subject, &scope)
}
