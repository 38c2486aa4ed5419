//! Bearer tokens: what to send before any challenge, and the token
//! server's flows (Basic for username/password, the OAuth2 refresh flow for
//! identity tokens).

use std::time::Instant;

use reqwest::{StatusCode, header};

use super::response::Attempt;
use super::response::{MAX_SMALL_BODY, check_status, classify, read_limited};
use super::{RegistryClient, RequestKind, Target};
use crate::registry::docker_config::Credential;
use crate::registry::error::RegistryError;
use crate::registry::tokens::{HostAuth, TokenResponse};

impl RegistryClient {
    /// The `Authorization` to send before any challenge, from what we learned
    /// about the host earlier: saves the 401 round trip on every later request.
    pub(super) async fn authorization(
        &self,
        target: &Target<'_>,
        scope: &str,
    ) -> Result<Option<String>, RegistryError> {
        match self.auth.host(target.host) {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(target.credential.and_then(Credential::basic_header)),
            Some(HostAuth::Bearer { realm, service }) => {
                let cred_id = target.credential.map(Credential::identity);
                if let Some(token) = self.auth.token(target.host, scope, cred_id) {
                    return Ok(Some(format!("Bearer {}", token.expose())));
                }
                let token = self
                    .fetch_token(target, &realm, service.as_deref(), scope)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Asks the token server for a pull token, with the credential if any:
    /// Basic for username/password, the OAuth2 refresh flow for identity tokens.
    pub(super) async fn fetch_token(
        &self,
        target: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let registry = target.registry;
        let realm_url = url::Url::parse(realm).map_err(|_| RegistryError::InvalidResponse {
            registry: registry.to_string(),
            detail: "the token realm in WWW-Authenticate is not a URL".into(),
        })?;
        let realm_host = realm_url.host_str().unwrap_or_default().to_string();
        let realm_authority = match realm_url.port() {
            Some(p) => format!("{realm_host}:{p}"),
            None => realm_host.clone(),
        };
        match realm_url.scheme() {
            "https" => {}
            "http" if self.is_insecure(&realm_authority) || target.credential.is_none() => {}
            _ => {
                return Err(RegistryError::Unauthorized {
                    registry: registry.to_string(),
                    detail: format!(
                        "the token realm {realm_authority} is not HTTPS (nor an --insecure-registry host); refusing to send credentials there"
                    ),
                });
            }
        }
        // A host of hosts.toml asks its token server over its own
        // connection, as containerd's per-host authorizer does.
        let token_client = match target.endpoint {
            Some(endpoint) => endpoint.client.clone(),
            None => self.ca.load().token.clone(),
        };
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let request = match target.credential {
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.expose()),
                    ("client_id", "fn-image-resolver"),
                ];
                form.extend(query.iter().copied());
                token_client.post(realm_url.clone()).form(&form)
            }
            Some(cred @ Credential::Basic { .. }) => {
                let mut req = token_client.get(realm_url.clone()).query(&query);
                if let Some(basic) = cred.basic_header() {
                    req = req.header(header::AUTHORIZATION, basic);
                }
                req
            }
            None => token_client.get(realm_url.clone()).query(&query),
        };
        let started = Instant::now();
        let result = request.send().await;
        self.observe(
            target.host_label(),
            RequestKind::Token,
            result.as_ref().ok().map(|r| r.status().as_u16()),
            started,
        );
        let resp =
            result.map_err(
                |e| match classify(e, &realm_authority, self.request_timeout) {
                    Attempt::Tls(detail) => RegistryError::Tls {
                        registry: registry.to_string(),
                        detail: format!("token server {realm_authority}: {detail}"),
                    },
                    Attempt::Failed(RegistryError::Unreachable { detail, .. }) => {
                        RegistryError::Unreachable {
                            registry: registry.to_string(),
                            detail: format!("token server {realm_authority}: {detail}"),
                        }
                    }
                    Attempt::Failed(other) => other,
                },
            )?;
        let what = format!("a token for {scope}");
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: registry.to_string(),
                detail: format!(
                    "token server {realm_authority} answered HTTP {} for {what}{}",
                    status.as_u16(),
                    if target.credential.is_some() {
                        " (credentials rejected)"
                    } else {
                        " (no credentials configured for this registry)"
                    }
                ),
            });
        }
        let resp = check_status(resp, target, &what).await?;
        let body = read_limited(resp, MAX_SMALL_BODY, self.request_timeout, target, &what).await?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| RegistryError::InvalidResponse {
                registry: registry.to_string(),
                detail: format!("token server {realm_authority} did not answer with a token"),
            })?;
        let token =
            parsed
                .into_token(Instant::now())
                .ok_or_else(|| RegistryError::InvalidResponse {
                    registry: registry.to_string(),
                    detail: format!("token server {realm_authority} answered without a token"),
                })?;
        let value = token.value.expose().to_string();
        self.auth.store_token(
            target.host,
            scope,
            target.credential.map(Credential::identity),
            token,
        );
        Ok(value)
    }
}
