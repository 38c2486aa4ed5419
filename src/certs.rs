//! Certificates made with rcgen: a CA and serving certificates signed by it.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A certificate authority that signs serving certificates: made here, or
/// loaded back from its PEM (a CA kept in a Secret signs the renewals).
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// Lifetime of a CA made here.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a serving certificate, unless said otherwise.
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// The common name of the CA that `certs` and `--managed-tls-secret` make.
const WEBHOOK_CA_NAME: &str = "fn-image-resolver webhook CA";

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree between us and the API server:
    // five minutes, or a tenth of a short lifetime (so that its renewal, two
    // thirds in, still comes after it was made).
    let slack = Duration::from_secs(300).min(lifetime / 10);
    params.not_before = now - time::Duration::try_from(slack).unwrap_or(time::Duration::ZERO);
    let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::MAX);
    params.not_after = now
        .checked_add(lifetime)
        .unwrap_or(time::OffsetDateTime::new_utc(
            time::Date::MAX,
            time::Time::MIDNIGHT,
        ));
}

impl CertificateAuthority {
    /// A new self-signed CA for the webhook's serving certificates.
    pub fn for_webhook() -> Result<Self, CertError> {
        Self::generate(WEBHOOK_CA_NAME)
    }

    /// The same, valid for `lifetime` (the managed Secret's CAs).
    pub fn for_webhook_lasting(lifetime: Duration) -> Result<Self, CertError> {
        Self::generate_lasting(WEBHOOK_CA_NAME, lifetime)
    }

    /// A new self-signed CA, valid for 10 years.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        Self::generate_lasting(common_name, CA_LIFETIME)
    }

    fn generate_lasting(common_name: &str, lifetime: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, lifetime);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA whose certificate and key are these PEM texts.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[String]) -> Result<Issued, CertError> {
        self.issue_for(names, LEAF_LIFETIME)
    }

    /// The same, valid for `lifetime`.
    pub fn issue_for(&self, names: &[String], lifetime: Duration) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("fn-image-resolver"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// DNS names a Service-backed webhook is called by.
pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
    ];
    names.extend(extra.iter().cloned());
    names.dedup();
    names
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Generate(#[from] CertError),
    #[error("{0} exists; pass --force to replace it")]
    Exists(std::path::PathBuf),
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Generates a CA and a serving certificate for `names` into `dir`:
/// `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (keys readable by the owner only).
pub fn write_bundle(
    dir: &std::path::Path,
    names: &[String],
    force: bool,
) -> Result<Vec<std::path::PathBuf>, WriteError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let files = ["ca.crt", "ca.key", "tls.crt", "tls.key"].map(|f| dir.join(f));
    if !force && let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(WriteError::Exists(existing.clone()));
    }
    let ca = CertificateAuthority::for_webhook()?;
    let serving = ca.issue(names)?;
    std::fs::create_dir_all(dir).map_err(|source| WriteError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let contents = [
        ca.cert_pem(),
        ca.key_pem(),
        serving.cert_pem,
        serving.key_pem,
    ];
    for (path, content) in files.iter().zip(contents) {
        let private = path.extension().is_some_and(|e| e == "key");
        let io = |source| WriteError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(path)
            .map_err(io)?;
        file.write_all(content.as_bytes()).map_err(io)?;
    }
    Ok(files.to_vec())
}
