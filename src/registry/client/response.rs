//! Responses into typed errors: statuses, registry error codes, transport
//! failures, and bodies read within a size limit.

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde::Deserialize;

use super::Target;
use crate::registry::error::RegistryError;

/// Failure of one attempt, before the TLS ladder decides whether it goes
/// on (the transport climbs it; this module classifies what went wrong).
pub(super) enum Attempt {
    /// The TLS handshake failed: the next rung may work.
    Tls(String),
    Failed(RegistryError),
}

/// Token responses and error bodies are small; anything bigger is not one.
pub(super) const MAX_SMALL_BODY: usize = 64 * 1024;

pub(super) fn classify(error: reqwest::Error, registry: &str, timeout: Duration) -> Attempt {
    if let Some(tls) = find_rustls_error(&error) {
        return Attempt::Tls(tls);
    }
    if error.is_timeout() {
        return Attempt::Failed(RegistryError::Timeout {
            registry: registry.to_string(),
            after: timeout,
        });
    }
    if error.is_redirect() {
        // Our redirect policy said no (a downgrade to plain HTTP, or a loop).
        return Attempt::Failed(RegistryError::InvalidResponse {
            registry: registry.to_string(),
            detail: format!("redirect not followed: {}", root_cause(&error)),
        });
    }
    Attempt::Failed(RegistryError::Unreachable {
        registry: registry.to_string(),
        detail: root_cause(&error),
    })
}

/// Walks the source chain for a rustls error. hyper nests it in io::Errors
/// whose `source()` skips the wrapped error, so those are opened explicitly.
fn find_rustls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            return find_rustls_error(inner);
        }
        current = e.source();
    }
    None
}

/// The innermost cause ("Connection refused (os error 111)"): short and free
/// of URLs and headers.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

pub(super) fn header_str(
    resp: &reqwest::Response,
    name: impl header::AsHeaderName,
) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
}

/// Turns a non-2xx response into a typed error. Only the registry's error
/// *code* is kept; messages and details could echo request data.
pub(super) async fn check_status(
    resp: reqwest::Response,
    target: &Target<'_>,
    what: &str,
) -> Result<reqwest::Response, RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let registry = target.registry.to_string();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let code = read_limited(resp, MAX_SMALL_BODY, Duration::ZERO, target, what)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<ErrorEnvelope>(&b).ok())
        .and_then(|env| env.errors.into_iter().next())
        .map(|e| e.code)
        .filter(|c| {
            !c.is_empty()
                && c.len() < 64
                && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_')
        });
    Err(match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            registry,
            what: what.to_string(),
            code: code.unwrap_or_else(|| "HTTP 404".into()),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
            registry,
            detail: format!(
                "HTTP {} for {what}{}{}",
                status.as_u16(),
                code.map(|c| format!(" ({c})")).unwrap_or_default(),
                if target.credential.is_some() {
                    "; the configured credentials were not accepted"
                } else {
                    "; no credentials are configured for this registry"
                }
            ),
        },
        StatusCode::TOO_MANY_REQUESTS => RegistryError::RateLimited {
            registry,
            retry_after,
        },
        _ => RegistryError::Status {
            registry,
            what: what.to_string(),
            status: status.as_u16(),
        },
    })
}

/// Reads a body, failing as soon as it exceeds `limit` bytes.
pub(super) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    timeout: Duration,
    target: &Target<'_>,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_big = || RegistryError::InvalidResponse {
        registry: target.registry.to_string(),
        detail: format!("{what} is larger than the {limit}-byte limit"),
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_big());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(match classify(e, target.registry, timeout) {
                    Attempt::Tls(detail) => RegistryError::Tls {
                        registry: target.registry.to_string(),
                        detail,
                    },
                    Attempt::Failed(e) => e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ErrorKind;

    fn target() -> Target<'static> {
        Target {
            host: "reg.example.com",
            registry: "reg.example.com",
            repository: "fns/x",
            credential: None,
            endpoint: None,
        }
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> reqwest::Response {
        let mut builder = axum::http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        reqwest::Response::from(builder.body(body.to_string()).expect("response"))
    }

    async fn status_error(status: u16, headers: &[(&str, &str)], body: &str) -> RegistryError {
        check_status(
            response(status, headers, body),
            &target(),
            "manifest fns/x:v1",
        )
        .await
        .expect_err("not a success")
    }

    #[tokio::test]
    async fn statuses_become_typed_errors_with_only_the_registry_error_code() {
        let e = status_error(
            404,
            &[],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"secret detail"}]}"#,
        )
        .await;
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let text = e.to_string();
        assert!(
            text.contains("MANIFEST_UNKNOWN") && !text.contains("secret detail"),
            "{text}"
        );

        let e = status_error(404, &[], "<html>nope</html>").await;
        assert!(e.to_string().contains("HTTP 404"), "{e}");

        // A code that is not a registry error code is not repeated.
        let e = status_error(404, &[], r#"{"errors":[{"code":"lowercase <script>"}]}"#).await;
        assert!(!e.to_string().contains("script"), "{e}");

        for status in [401, 403] {
            let e = status_error(status, &[], r#"{"errors":[{"code":"DENIED"}]}"#).await;
            assert_eq!(e.kind(), ErrorKind::Unauthorized);
            let text = e.to_string();
            assert!(
                text.contains(&format!("HTTP {status}")) && text.contains("DENIED"),
                "{text}"
            );
            assert!(text.contains("no credentials are configured"), "{text}");
        }

        let e = status_error(429, &[("retry-after", "17")], "").await;
        assert_eq!(e.kind(), ErrorKind::RateLimited);
        assert!(
            matches!(e, RegistryError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(17)),
            "{e:?}"
        );
        let e = status_error(429, &[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")], "").await;
        assert!(
            matches!(
                e,
                RegistryError::RateLimited {
                    retry_after: None,
                    ..
                }
            ),
            "an HTTP date is not taken for seconds: {e:?}"
        );

        for status in [500, 502, 503, 418] {
            let e = status_error(status, &[], "").await;
            assert_eq!(e.kind(), ErrorKind::RegistryError, "{status}");
        }
        let ok = check_status(response(200, &[], "{}"), &target(), "x").await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_their_limit_and_no_further() {
        let body = "x".repeat(1000);
        let read = read_limited(
            response(200, &[], &body),
            1000,
            Duration::ZERO,
            &target(),
            "a blob",
        )
        .await;
        assert_eq!(read.expect("within the limit").len(), 1000);
        let e = read_limited(
            response(200, &[], &body),
            999,
            Duration::ZERO,
            &target(),
            "a blob",
        )
        .await
        .expect_err("over the limit");
        assert_eq!(e.kind(), ErrorKind::InvalidResponse);
        assert!(e.to_string().contains("999-byte limit"), "{e}");
    }

    #[test]
    fn a_tls_error_is_found_inside_io_errors_and_causes_are_short() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::other(std::io::Error::other(tls));
        let found = find_rustls_error(&wrapped).expect("found through two io::Errors");
        assert!(
            found.contains("UnknownIssuer") || found.contains("unknown issuer"),
            "{found}"
        );
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(find_rustls_error(&refused), None);
        assert_eq!(
            root_cause(&std::io::Error::other(refused)),
            "Connection refused"
        );
    }
}
