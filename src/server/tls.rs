//! Serving certificates read from files and swapped in place when the files
//! change (cert-manager or kubelet Secret rotation): a `ResolvesServerCert`
//! over an `ArcSwap`, so a rotation is a pointer swap and live connections
//! are not dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key")]
    NoKey { path: PathBuf },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Loads a certificate chain and its key from PEM files.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    certified_key(&read(cert)?, cert, &read(key)?, key)
}

/// A certificate chain and its key from PEM text; `cert` and `key` name
/// where the text came from, for errors.
fn certified_key(
    cert_pem: &[u8],
    cert: &Path,
    key_pem: &[u8],
    key: &Path,
) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| CertError::NoKey {
        path: key.to_path_buf(),
    })?;
    let provider = aws_lc_rs::default_provider();
    let certified =
        CertifiedKey::from_der(chain, private, &provider).map_err(|e| CertError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(certified)
}

/// When the leaf certificate stops being valid (Unix seconds), if it parses.
pub fn not_after(certified: &CertifiedKey) -> Option<i64> {
    let leaf = certified.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The current serving certificate; replaced whole on rotation.
#[derive(Debug)]
pub struct ReloadingCert {
    /// Where it is read from: files (re-read when they change), or a
    /// Secret that another task follows (`set_pem`).
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// Where the expiry is published, once `observe` was called.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl ReloadingCert {
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, CertError> {
        let certified = load_certified_key(&cert_path, &key_path)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(certified),
            metrics: std::sync::OnceLock::new(),
        }))
    }

    /// A certificate from PEM text (`source` names it in errors and logs,
    /// e.g. `porch-system/fn-image-resolver-tls`); [`Self::set_pem`] replaces it.
    pub fn from_pem(source: &str, cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<Self>, CertError> {
        let (cert_path, key_path) = pem_names(source);
        let certified = certified_key(cert_pem, &cert_path, key_pem, &key_path)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(certified),
            metrics: std::sync::OnceLock::new(),
        }))
    }

    /// Serves this certificate from now on (new handshakes). A broken pair
    /// keeps the current one. Returns whether the certificate changed.
    pub fn set_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, CertError> {
        let fresh = certified_key(cert_pem, &self.cert_path, key_pem, &self.key_path)?;
        Ok(self.swap_in(fresh))
    }

    /// Publishes the serving certificate's expiry as a metric, now and after
    /// every reload.
    pub fn observe(&self, metrics: Arc<crate::metrics::Metrics>) {
        if let Some(at) = not_after(&self.current.load()) {
            metrics.cert_expiry.set(at);
        }
        let _ = self.metrics.set(metrics);
    }

    /// Re-reads the files. A half-written or broken pair keeps the old
    /// certificate in use. Returns whether the certificate changed.
    pub fn reload(&self) -> Result<bool, CertError> {
        let fresh = load_certified_key(&self.cert_path, &self.key_path)?;
        Ok(self.swap_in(fresh))
    }

    fn swap_in(&self, fresh: CertifiedKey) -> bool {
        if fresh.cert == self.current.load().cert {
            return false;
        }
        let expires = not_after(&fresh);
        if let (Some(metrics), Some(at)) = (self.metrics.get(), expires) {
            metrics.cert_expiry.set(at);
        }
        self.current.store(Arc::new(fresh));
        info!(cert = %self.cert_path.display(), not_after = expires, "serving certificate reloaded");
        true
    }

    /// A rustls server config (TLS 1.2+, HTTP/1.1 only: see
    /// `server::serve_tls`) that always serves the current certificate.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap_or_else(|_| unreachable!("aws-lc-rs supports TLS 1.2 and 1.3"))
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Follows the files until `shutdown` (the kubelet's `..data` swap
    /// included; a broken pair keeps the current certificate).
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let (cert, key) = (self.cert_path.clone(), self.key_path.clone());
        crate::reload::follow(
            "serving certificate",
            &[&cert, &key],
            Duration::from_secs(30),
            shutdown,
            || self.reload().map(drop),
        )
        .await;
    }
}

/// How PEM text from `source` is named in errors: `source/tls.crt`, `source/tls.key`.
fn pem_names(source: &str) -> (PathBuf, PathBuf) {
    let base = Path::new(source);
    (base.join("tls.crt"), base.join("tls.key"))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
