//! Self-managed serving certificates (`serve --managed-tls-secret NAME`):
//! a CA and a serving certificate kept in one Secret that every replica
//! shares. The first replica creates it; a replica that loses the race uses
//! the winner's. A replica that finds the serving certificate past two
//! thirds of its lifetime renews it with an update conditioned on the
//! resourceVersion, so exactly one renewal wins; every replica follows the
//! Secret through a watch and serves what it holds. A Secret of that name
//! that we did not make (by hand, by cert-manager) is used as it is and
//! never written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::certs::CertificateAuthority;
use crate::reload::Backoff;
use crate::server::tls::ReloadingCert;

/// The Secret's keys (cert-manager's names, plus the CA's key).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "fn-image-resolver";
/// The readiness check the serving certificate reports into.
pub const READINESS_CHECK: &str = "serving-certificate";

/// Where the certificate is kept and what it must say.
#[derive(Debug, Clone)]
pub struct ManagedTlsSettings {
    pub secret: String,
    pub namespace: String,
    /// DNS names and IP addresses the serving certificate names.
    pub names: Vec<String>,
    /// Lifetime of a serving certificate (`--managed-tls-validity`); it is
    /// renewed past two thirds of it.
    pub validity: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagedTlsError {
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write Secret {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{name} exists, was not made by fn-image-resolver, and holds no usable tls.crt and tls.key; it is left as it is"
    )]
    Foreign { namespace: String, name: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] crate::certs::CertError),
    #[error("Secret {namespace}/{name} kept changing under us; giving up for now")]
    Contended { namespace: String, name: String },
}

/// What the Secret holds, as served.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The CA to register as the webhook's caBundle, when the Secret has one.
    pub ca_pem: Option<Vec<u8>>,
    /// The Secret was made by us (we renew it).
    pub ours: bool,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("ours", &self.ours)
            .finish_non_exhaustive()
    }
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
}

fn is_ours(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

fn bundle(secret: &Secret) -> Option<Bundle> {
    Some(Bundle {
        cert_pem: data(secret, TLS_CRT)?.to_vec(),
        key_pem: data(secret, TLS_KEY)?.to_vec(),
        ca_pem: data(secret, CA_CRT).map(<[u8]>::to_vec),
        ours: is_ours(secret),
    })
}

/// The CA kept in the Secret, when it has a usable one.
fn stored_ca(secret: &Secret) -> Option<CertificateAuthority> {
    let cert = String::from_utf8_lossy(data(secret, CA_CRT)?);
    let key = String::from_utf8_lossy(data(secret, CA_KEY)?);
    CertificateAuthority::from_pem(&cert, &key).ok()
}

/// When the serving certificate in `cert_pem` is due for renewal: two
/// thirds into its lifetime. `None` (due now) when it cannot be read or
/// does not name every one of `names`.
pub fn renewal_due(cert_pem: &[u8], names: &[String]) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let validity = cert.validity();
    let from = validity.not_before.timestamp();
    let to = validity.not_after.timestamp();
    let named: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => <[u8; 4]>::try_from(*ip)
                        .map(std::net::IpAddr::from)
                        .or_else(|_| <[u8; 16]>::try_from(*ip).map(std::net::IpAddr::from))
                        .ok()
                        .map(|a| a.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !names.iter().all(|n| named.contains(n)) {
        return None;
    }
    let due = from + (to - from) * 2 / 3;
    let due = u64::try_from(due).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(due))
}

/// Makes a Secret holding `ca` and a serving certificate it signs.
fn secret(
    settings: &ManagedTlsSettings,
    ca: &CertificateAuthority,
    resource_version: Option<String>,
) -> Result<Secret, ManagedTlsError> {
    let serving = ca.issue_for(&settings.names, settings.validity)?;
    let bytes = |s: String| ByteString(s.into_bytes());
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            resource_version,
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_string(), bytes(serving.cert_pem)),
            (TLS_KEY.to_string(), bytes(serving.key_pem)),
            (CA_CRT.to_string(), bytes(ca.cert_pem())),
            (CA_KEY.to_string(), bytes(ca.key_pem())),
        ])),
        ..Default::default()
    })
}

/// The Secret's bundle, made or renewed first when it is ours (or missing)
/// and due. Safe with several replicas: a create that loses the race, or an
/// update whose resourceVersion moved, reads the winner's instead.
pub async fn ensure(
    api: &Api<Secret>,
    settings: &ManagedTlsSettings,
) -> Result<Bundle, ManagedTlsError> {
    let (namespace, name) = (settings.namespace.clone(), settings.secret.clone());
    let read_err = |source| ManagedTlsError::Read {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    };
    let write_err = |source| ManagedTlsError::Write {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    };
    for _ in 0..5 {
        let Some(existing) = api.get_opt(&name).await.map_err(read_err)? else {
            let fresh = secret(settings, &CertificateAuthority::for_webhook()?, None)?;
            match api.create(&PostParams::default(), &fresh).await {
                Ok(created) => {
                    info!(secret = %name, namespace = %namespace, "serving certificate created");
                    return bundle(&created).ok_or(ManagedTlsError::Foreign { namespace, name });
                }
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(write_err(e)),
            }
        };
        let current = bundle(&existing);
        if !is_ours(&existing) {
            return current.ok_or(ManagedTlsError::Foreign { namespace, name });
        }
        let due = current
            .as_ref()
            .and_then(|b| renewal_due(&b.cert_pem, &settings.names));
        if let (Some(current), Some(due)) = (&current, due)
            && SystemTime::now() < due
        {
            return Ok(current.clone());
        }
        // Due (or unreadable): a new serving certificate from the same CA,
        // so the registered caBundle stays good; a new CA only if ours is lost.
        let ca = match stored_ca(&existing) {
            Some(ca) => ca,
            None => CertificateAuthority::for_webhook()?,
        };
        let renewed = secret(settings, &ca, existing.metadata.resource_version.clone())?;
        match api.replace(&name, &PostParams::default(), &renewed).await {
            Ok(replaced) => {
                info!(secret = %name, namespace = %namespace, "serving certificate renewed");
                return bundle(&replaced).ok_or(ManagedTlsError::Foreign { namespace, name });
            }
            // Another replica renewed it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(write_err(e)),
        }
    }
    Err(ManagedTlsError::Contended { namespace, name })
}

/// What became of the Secret on uninstall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Deleted,
    /// Made by someone else: left as it is.
    NotOurs,
    Gone,
}

/// Deletes the Secret if this service made it (uninstall).
pub async fn delete_if_ours(api: &Api<Secret>, name: &str) -> Result<Removal, kube::Error> {
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(Removal::Gone);
    };
    if !is_ours(&secret) {
        return Ok(Removal::NotOurs);
    }
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(Removal::Deleted),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Removal::Gone),
        Err(e) => Err(e),
    }
}

/// Follows the Secret until `shutdown`: what it holds is served (`cert`)
/// and its CA published (`ca`); when it is due, or deleted, it is renewed
/// or made again. Failures are retried with backoff.
pub async fn follow(
    api: Api<Secret>,
    settings: ManagedTlsSettings,
    cert: Arc<ReloadingCert>,
    ca: watch::Sender<Option<Vec<u8>>>,
    shutdown: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.secret));
    let mut events = watcher(api.clone(), config).boxed();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut next_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret))) => {
                    if let Some(b) = bundle(&secret) {
                        serve(&cert, &ca, &b);
                    }
                    continue;
                }
                Some(Ok(watcher::Event::Delete(_))) => {}
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watch on the serving certificate's Secret interrupted; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                None => return,
            },
            () = tokio::time::sleep_until(next_check) => {}
        }
        match ensure(&api, &settings).await {
            Ok(b) => {
                backoff.reset();
                serve(&cert, &ca, &b);
                next_check = tokio::time::Instant::now() + until_due(&b, &settings);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot keep the serving certificate; retrying");
                next_check = tokio::time::Instant::now() + delay;
            }
        }
    }
}

/// How long until `b` is due for a check: its renewal time for ours (at most
/// an hour away, so a clock jump is noticed), an hour for a foreign Secret.
fn until_due(b: &Bundle, settings: &ManagedTlsSettings) -> Duration {
    let hour = Duration::from_secs(3600);
    if !b.ours {
        return hour;
    }
    renewal_due(&b.cert_pem, &settings.names)
        .and_then(|due| due.duration_since(SystemTime::now()).ok())
        .unwrap_or_default()
        .min(hour)
}

fn serve(cert: &ReloadingCert, ca: &watch::Sender<Option<Vec<u8>>>, b: &Bundle) {
    if let Err(e) = cert.set_pem(&b.cert_pem, &b.key_pem) {
        warn!(error = %e, "the Secret's certificate cannot be served; keeping the current one");
        return;
    }
    ca.send_if_modified(|held| {
        let changed = *held != b.ca_pem;
        if changed {
            held.clone_from(&b.ca_pem);
        }
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_two_thirds_into_its_lifetime_or_when_a_name_is_missing() {
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let names = vec!["svc.ns.svc".to_string(), "127.0.0.1".to_string()];
        let issued = ca
            .issue_for(&names, Duration::from_secs(3000))
            .expect("leaf");
        let due = renewal_due(issued.cert_pem.as_bytes(), &names).expect("readable");
        // not_before is 300 s back (a tenth of the lifetime): two thirds of
        // 3300 s from there.
        let expected = SystemTime::now() + Duration::from_secs(2200 - 300);
        let off = due
            .duration_since(expected)
            .unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(5), "{due:?} vs {expected:?}");
        let more = vec!["svc.ns.svc".to_string(), "other.example.com".to_string()];
        assert_eq!(renewal_due(issued.cert_pem.as_bytes(), &more), None);
        assert_eq!(renewal_due(b"not a certificate", &names), None);
    }

    #[test]
    fn a_ca_loaded_back_from_its_pem_signs_what_the_first_one_would() {
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls_pki_types::pem::PemObject as _;
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let again = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).expect("loaded");
        let leaf = again.issue(&["x.example.com".to_string()]).expect("leaf");
        // Verify the chain with rustls' own verifier.
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
            .expect("ca der");
        roots.add(ca_der).expect("root");
        let leaf_der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
            .expect("der");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .expect("verifier");
        let name = rustls_pki_types::ServerName::try_from("x.example.com").expect("name");
        verifier
            .verify_server_cert(
                &leaf_der,
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .expect("the renewed leaf chains to the same CA");
    }
}
