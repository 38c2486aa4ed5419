//! A host of a registry's `hosts.toml`, ready to send to: its scheme, API
//! root, headers, and a connection that trusts what the file says (its CA
//! files beside the system roots, its client certificate, or nothing at all
//! with `skip_verify`), as containerd builds its transport per host.

use std::path::Path;
use std::sync::Arc;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::RegistryClient;
use crate::registry::error::RegistryError;
use crate::registry::hosts::{HostSpec, Scheme};

/// One host to try for a registry, in the order its `hosts.toml` says.
#[derive(Debug)]
pub struct Endpoint {
    /// `host[:port]`: where requests go, and the metrics' `registry` label.
    pub authority: String,
    scheme: Scheme,
    /// The API root (`/v2`, or the path written with `override_path`).
    path: String,
    pub pull: bool,
    pub resolve: bool,
    pub(super) headers: HeaderMap,
    pub(super) client: reqwest::Client,
    /// The registry it stands in for when it is another host (a mirror):
    /// containerd tells it which with `?ns=`.
    namespace: Option<String>,
}

impl Endpoint {
    /// The URL of `path` (`/v2/…`, as the client writes its requests) on
    /// this host.
    pub(super) fn url(&self, path: &str) -> String {
        let rest = path.strip_prefix("/v2").unwrap_or(path);
        let mut url = format!(
            "{}://{}{}{rest}",
            self.scheme.as_str(),
            self.authority,
            self.path
        );
        if let Some(ns) = &self.namespace {
            url.push_str(if url.contains('?') { "&ns=" } else { "?ns=" });
            url.push_str(ns);
        }
        url
    }

    /// Its headers carry an `Authorization` of their own.
    pub(super) fn authorizes(&self) -> bool {
        self.headers.contains_key(AUTHORIZATION)
    }

    /// Whether this host is the registry itself (not a mirror of it).
    pub fn is_registry(&self) -> bool {
        self.namespace.is_none()
    }
}

/// A `skip_verify` host's certificate is not checked (containerd's
/// `InsecureSkipVerify`); the handshake's signatures still are.
#[derive(Debug)]
struct SkipVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read(path: &Path, registry: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|e| RegistryError::Tls {
        registry: registry.to_string(),
        detail: format!("unable to read {} named in hosts.toml: {e}", path.display()),
    })
}

impl RegistryClient {
    /// The endpoint `spec` describes, for images of `registry`.
    pub fn endpoint(&self, spec: &HostSpec, registry: &str) -> Result<Endpoint, RegistryError> {
        let tls_err = |detail: String| RegistryError::Tls {
            registry: registry.to_string(),
            detail,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| tls_err(format!("hosts.toml header name {name:?} is not valid")))?;
            // The value may be a credential: never quoted.
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                tls_err(format!(
                    "hosts.toml header {name} has a value that is not valid"
                ))
            })?;
            value.set_sensitive(true);
            headers.append(name, value);
        }
        let custom = !spec.ca.is_empty() || !spec.client.is_empty() || spec.skip_verify.is_some();
        let client = if custom {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| tls_err(e.to_string()))?;
            let builder = if spec.skip_verify == Some(true) {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SkipVerify(provider)))
            } else {
                let mut roots: RootCertStore = self.system_roots.clone();
                for file in &spec.ca {
                    let pem = read(file, registry)?;
                    let before = roots.len();
                    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                        let _ = roots.add(cert);
                    }
                    if roots.len() == before {
                        return Err(tls_err(format!(
                            "unable to load CA cert {} named in hosts.toml",
                            file.display()
                        )));
                    }
                }
                builder.with_root_certificates(roots)
            };
            let config = match spec.client.first() {
                None => builder.with_no_client_auth(),
                Some((cert, key)) => {
                    let cert_pem = read(cert, registry)?;
                    let key_pem = match key {
                        Some(key) => read(key, registry)?,
                        None => cert_pem.clone(),
                    };
                    let chain: Vec<CertificateDer<'static>> =
                        CertificateDer::pem_slice_iter(&cert_pem)
                            .collect::<Result<_, _>>()
                            .map_err(|_| {
                                tls_err(format!("{} holds no certificate", cert.display()))
                            })?;
                    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                        tls_err(format!("failed to load X509 key pair {}", cert.display()))
                    })?;
                    builder.with_client_auth_cert(chain, key).map_err(|_| {
                        tls_err(format!("failed to load X509 key pair {}", cert.display()))
                    })?
                }
            };
            self.build_client(config)
                .map_err(|e| tls_err(format!("cannot build the HTTP client: {e}")))?
        } else {
            self.system.clone()
        };
        let is_registry = spec.authority == registry
            || (registry == "docker.io" && spec.authority == "registry-1.docker.io");
        Ok(Endpoint {
            authority: spec.authority.clone(),
            scheme: spec.scheme,
            path: spec.path.clone(),
            pull: spec.pull,
            resolve: spec.resolve,
            headers,
            client,
            namespace: (!is_registry).then(|| registry.to_string()),
        })
    }
}
