//! TLS for registry traffic: the mounted CA, the system roots, TLS 1.2 minimum.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// File names the seed documents accept, in the order they are looked for.
pub const CA_FILE_NAMES: [&str; 2] = ["ca.crt", "ca.pem"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no CA file in {dir}: expected {} (--tls-secret-path)", CA_FILE_NAMES.join(" or "))]
    NoCaFile { dir: PathBuf },
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("CA file {path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("CA file {path}: certificate rejected: {reason}")]
    Rejected { path: PathBuf, reason: String },
    #[error("no usable system root certificates: {0}")]
    SystemRoots(String),
}

/// Finds `ca.crt` (else `ca.pem`) in `dir` and parses every certificate in
/// it; also returns the file's path and bytes.
pub fn load_ca_dir(dir: &Path) -> Result<(PathBuf, RootCertStore, Vec<u8>), TlsError> {
    let path = CA_FILE_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.exists())
        .ok_or_else(|| TlsError::NoCaFile {
            dir: dir.to_path_buf(),
        })?;
    let pem = std::fs::read(&path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let roots = parse_ca(&path, &pem)?;
    Ok((path, roots, pem))
}

pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_ca(path, &pem)
}

fn parse_ca(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::Rejected {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// The operating system's trust store ("well-known websites" in the seed).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reason = found
            .errors
            .first()
            .map(ToString::to_string)
            .unwrap_or_else(|| "the trust store is empty".into());
        return Err(TlsError::SystemRoots(reason));
    }
    Ok(roots)
}

/// A client config trusting exactly `roots`, TLS 1.2 or 1.3 only.
pub fn client_config(roots: RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // Only fails if the provider lacks every listed version, which aws-lc-rs has.
        .unwrap_or_else(|_| unreachable!("aws-lc-rs supports TLS 1.2 and 1.3"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
