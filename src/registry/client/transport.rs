//! The seed's connection ladder per host (mounted CA, then the system
//! roots, then plain HTTP for `--insecure-registry` hosts), the 401
//! challenge and answer, and the redirect policy.

use std::collections::HashSet;
use std::time::Instant;

use reqwest::{Method, StatusCode, header};
use tracing::{debug, warn};

use super::response::{Attempt, classify};
use super::{MANIFEST_ACCEPT, RegistryClient, RequestKind, Target, rate_limit_header};
use crate::registry::challenge::Challenge;
use crate::registry::docker_config::Credential;
use crate::registry::error::RegistryError;
use crate::registry::reference::normalize_host;
use crate::registry::tokens::HostAuth;

/// One step of the seed's connection ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rung {
    MountedCa,
    SystemRoots,
    PlainHttp,
}

impl Rung {
    fn describe(self) -> &'static str {
        match self {
            Self::MountedCa => "the mounted CA",
            Self::SystemRoots => "the system roots",
            Self::PlainHttp => "plain HTTP",
        }
    }
}

impl RegistryClient {
    fn ladder(&self, target: &Target<'_>) -> Vec<Rung> {
        let mut ladder = Vec::with_capacity(3);
        if self.ca.load().mounted_ca.is_some() {
            ladder.push(Rung::MountedCa);
        }
        ladder.push(Rung::SystemRoots);
        if self.is_insecure(target.registry) {
            ladder.push(Rung::PlainHttp);
        }
        // Start where the last success was; earlier rungs failed before.
        if let Some(known) = self.rungs.get(target.host)
            && let Some(pos) = ladder.iter().position(|r| *r == known)
        {
            ladder.drain(..pos);
        }
        ladder
    }

    /// Sends a request up the TLS ladder: only a failed TLS handshake moves to
    /// the next rung; not-found, auth failures and timeouts end it at once.
    pub(super) async fn send(
        &self,
        target: &Target<'_>,
        method: Method,
        path: &str,
        kind: RequestKind,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        if let Some(endpoint) = target.endpoint {
            // A host of hosts.toml: its own scheme and TLS, no ladder.
            let url = endpoint.url(path);
            let mut attempt = self
                .exchange(&endpoint.client, &url, target, &method, kind)
                .await;
            if matches!(
                attempt,
                Err(Attempt::Failed(RegistryError::Unreachable { .. }))
            ) {
                attempt = self
                    .exchange(&endpoint.client, &url, target, &method, kind)
                    .await;
            }
            return match attempt {
                Ok(resp) => Ok(resp),
                Err(Attempt::Tls(detail)) => Err(RegistryError::Tls {
                    registry: target.registry.to_string(),
                    detail: format!("{detail} (host {} of hosts.toml)", endpoint.authority),
                }),
                Err(Attempt::Failed(e)) => {
                    debug!(registry = target.registry, host = %endpoint.authority, what, error = %e, "registry request failed");
                    Err(e)
                }
            };
        }
        let ladder = self.ladder(target);
        let mut last_tls = String::new();
        for (i, rung) in ladder.iter().copied().enumerate() {
            let mut attempt = self.send_on(rung, target, &method, path, kind).await;
            // A pooled keep-alive connection the registry closed (restart,
            // idle timeout) fails the first request on it; our requests are
            // idempotent reads, so one retry goes out on a fresh connection.
            if matches!(
                attempt,
                Err(Attempt::Failed(RegistryError::Unreachable { .. }))
            ) {
                debug!(
                    registry = target.registry,
                    "connection failed; retrying once on a new connection"
                );
                attempt = self.send_on(rung, target, &method, path, kind).await;
            }
            match attempt {
                Ok(resp) => {
                    let previous = self.rungs.get(target.host);
                    if previous != Some(rung) {
                        self.rungs.insert(target.host.to_string(), rung);
                    }
                    // Loud, but once per host rather than once per request.
                    if rung == Rung::PlainHttp && previous != Some(Rung::PlainHttp) {
                        warn!(
                            registry = target.registry,
                            "using plain HTTP for an --insecure-registry host; credentials and images are not protected in transit"
                        );
                    }
                    return Ok(resp);
                }
                Err(Attempt::Tls(detail)) => {
                    self.rungs.remove(target.host);
                    if let Some(next) = ladder.get(i + 1) {
                        warn!(registry = target.registry, error = %detail, "TLS with {} failed; trying {}", rung.describe(), next.describe());
                    }
                    last_tls = format!(
                        "{detail} (tried {})",
                        ladder
                            .iter()
                            .map(|r| r.describe())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Err(Attempt::Failed(e)) => {
                    debug!(registry = target.registry, what, error = %e, "registry request failed");
                    return Err(e);
                }
            }
        }
        Err(RegistryError::Tls {
            registry: target.registry.to_string(),
            detail: last_tls,
        })
    }

    async fn send_on(
        &self,
        rung: Rung,
        target: &Target<'_>,
        method: &Method,
        path: &str,
        kind: RequestKind,
    ) -> Result<reqwest::Response, Attempt> {
        let (client, scheme) = match rung {
            Rung::MountedCa => match &self.ca.load().mounted_ca {
                Some(c) => (c.clone(), "https"),
                None => (self.system.clone(), "https"),
            },
            Rung::SystemRoots => (self.system.clone(), "https"),
            Rung::PlainHttp => (self.system.clone(), "http"),
        };
        let url = format!("{scheme}://{}{path}", target.host);
        self.exchange(&client, &url, target, method, kind).await
    }

    /// One request and, on a 401, the challenge's answer and one retry.
    async fn exchange(
        &self,
        client: &reqwest::Client,
        url: &str,
        target: &Target<'_>,
        method: &Method,
        kind: RequestKind,
    ) -> Result<reqwest::Response, Attempt> {
        let label = target.host_label();
        let scope = format!("repository:{}:pull", target.repository);
        let mut authorization = self
            .authorization(target, &scope)
            .await
            .map_err(Attempt::Failed)?;
        let mut retried = false;
        // A host whose hosts.toml header carries the authorization: sent as
        // it is, and no challenge is answered (containerd sends the header
        // with every request to that host).
        let preset = target.endpoint.is_some_and(|e| e.authorizes());
        if preset {
            authorization = None;
        }
        loop {
            let mut request = client
                .request(method.clone(), url)
                .header(header::ACCEPT, MANIFEST_ACCEPT);
            if let Some(endpoint) = target.endpoint {
                request = request.headers(endpoint.headers.clone());
            }
            if let Some(value) = &authorization {
                request = request.header(header::AUTHORIZATION, value.as_str());
            }
            let started = Instant::now();
            let result = request.send().await;
            self.observe(
                label,
                kind,
                result.as_ref().ok().map(|r| r.status().as_u16()),
                started,
            );
            let resp = result.map_err(|e| classify(e, target.registry, self.request_timeout))?;
            if let Some(o) = &self.observer {
                let limit = rate_limit_header(resp.headers(), "ratelimit-limit");
                let remaining = rate_limit_header(resp.headers(), "ratelimit-remaining");
                if limit.is_some() || remaining.is_some() {
                    o.rate_limit(label, limit, remaining);
                }
            }
            if resp.status() != StatusCode::UNAUTHORIZED || retried || preset {
                return Ok(resp);
            }
            retried = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    let scope = asked.unwrap_or(scope.clone());
                    self.auth.remember_host(
                        target.host,
                        HostAuth::Bearer {
                            realm: realm.clone(),
                            service: service.clone(),
                        },
                    );
                    let cred_id = target.credential.map(Credential::identity);
                    self.auth.forget_token(target.host, &scope, cred_id);
                    let token = self
                        .fetch_token(target, &realm, service.as_deref(), &scope)
                        .await
                        .map_err(Attempt::Failed)?;
                    authorization = Some(format!("Bearer {token}"));
                }
                Some(Challenge::Basic) => {
                    self.auth.remember_host(target.host, HostAuth::Basic);
                    match target.credential.and_then(Credential::basic_header) {
                        Some(basic) if authorization.is_none() => authorization = Some(basic),
                        _ => return Ok(resp),
                    }
                }
                None => return Ok(resp),
            }
        }
    }
}

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// The redirect policy of registry requests; see [`redirect_verdict`].
/// (reqwest itself drops `Authorization` when a redirect changes host or
/// port, so a credential never follows one to another host.)
pub(super) fn redirect_policy(insecure: HashSet<String>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        match redirect_verdict(attempt.previous(), attempt.url(), &insecure) {
            Ok(()) => attempt.follow(),
            Err(reason) => attempt.error(reason),
        }
    })
}

/// Whether a redirect to `next` after `previous` is followed: never from
/// HTTPS down to plain HTTP, to plain HTTP only on an `--insecure-registry`
/// host (`insecure`, normalized), and at most [`MAX_REDIRECTS`] times.
pub(super) fn redirect_verdict(
    previous: &[url::Url],
    next: &url::Url,
    insecure: &HashSet<String>,
) -> Result<(), String> {
    if previous.len() >= MAX_REDIRECTS {
        return Err("too many redirects".into());
    }
    if next.scheme() != "http" {
        return Ok(());
    }
    if previous.iter().any(|u| u.scheme() == "https") {
        return Err("refusing a redirect from HTTPS to plain HTTP".into());
    }
    let host = next.host_str().unwrap_or_default();
    let authority = match next.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    if insecure.contains(&normalize_host(&authority)) {
        Ok(())
    } else {
        Err(format!(
            "refusing a redirect to plain-HTTP host {authority}, which is not an --insecure-registry"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).expect("url")
    }

    #[test]
    fn redirects_never_go_down_to_plain_http_nor_to_an_unlisted_plain_host() {
        let insecure: HashSet<String> =
            ["reg.local:5000".to_string(), "cdn.local:8080".to_string()].into();
        let verdict = |from: &[&str], to: &str| {
            let from: Vec<url::Url> = from.iter().map(|u| url(u)).collect();
            redirect_verdict(&from, &url(to), &insecure)
        };
        // HTTPS anywhere, and HTTP between insecure hosts: followed.
        assert!(
            verdict(
                &["https://reg.example.com/v2/a/blobs/x"],
                "https://storage.example.com/x"
            )
            .is_ok()
        );
        assert!(
            verdict(
                &["http://reg.local:5000/v2/a/blobs/x"],
                "https://storage.example.com/x"
            )
            .is_ok()
        );
        assert!(
            verdict(
                &["http://reg.local:5000/v2/a/blobs/x"],
                "http://cdn.local:8080/x"
            )
            .is_ok()
        );
        assert!(
            verdict(
                &["http://reg.local:5000/v2/a"],
                "http://reg.local:5000/v2/b"
            )
            .is_ok()
        );
        // HTTPS to HTTP: refused, even to an insecure host.
        let e = verdict(&["https://reg.example.com/v2/a"], "http://cdn.local:8080/x")
            .expect_err("downgrade");
        assert!(e.contains("HTTPS to plain HTTP"), "{e}");
        let e = verdict(
            &["https://a.example.com/", "https://b.example.com/"],
            "http://reg.local:5000/",
        )
        .expect_err("downgrade");
        assert!(e.contains("HTTPS to plain HTTP"), "{e}");
        // Plain HTTP to a host that is not --insecure-registry: refused.
        let e = verdict(
            &["http://reg.local:5000/v2/a"],
            "http://elsewhere.local:8080/x",
        )
        .expect_err("unlisted");
        assert!(e.contains("elsewhere.local:8080"), "{e}");
        assert!(
            verdict(&["http://reg.local:5000/v2/a"], "http://cdn.local/x").is_err(),
            "another port is another host"
        );
        // A loop: refused after five.
        let loop_: Vec<&str> = vec!["https://reg.example.com/"; 5];
        assert!(
            verdict(&loop_, "https://reg.example.com/")
                .expect_err("too many")
                .contains("too many")
        );
    }
}
