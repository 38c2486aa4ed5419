//! Self-managed serving certificates (`serve --managed-tls-secret NAME`):
//! a CA and a serving certificate kept in one Secret that every replica
//! shares.
//!
//! - The first replica creates it; a replica that loses the race uses the
//!   winner's. Every write is an update conditioned on the resourceVersion
//!   read just before, so among replicas exactly one wins each change, and
//!   it keeps whatever labels, annotations and finalizers other tools put
//!   on the Secret.
//! - A serving certificate is renewed two thirds into its lifetime, or when
//!   it lacks a name this replica needs. It then names the union of what it
//!   named and what this replica needs, so two replica versions that want
//!   different names (a `--webhook-url` change mid-rollout) are both served
//!   instead of renewing each other's certificate at every check. IP names
//!   are compared as addresses. After a write, no check comes sooner than a
//!   floor (a tenth of the validity, between 1 s and a minute), so a
//!   certificate that is judged due again at once cannot loop.
//! - A new CA (the CA's key lost, the CA near its end, the Secret deleted
//!   while a replica still serves its certificate) is rolled over without a
//!   gap: first it joins the old CA in `ca.crt` (which every replica
//!   registers as the caBundle) while the served certificate stays the old
//!   CA's; only once the new CA is registered (and at least the floor has
//!   passed) is a certificate from it issued. An old CA leaves `ca.crt` once
//!   the last certificate it signed has expired: no replica can serve that
//!   one any more, so no coordination between replicas is needed.
//! - A Secret of that name that we did not make (by hand, by cert-manager)
//!   is used as it is and never written; once a replica has seen it, it
//!   never creates or writes the Secret again in that process, not even
//!   after it is deleted: it waits for the other owner to make it again
//!   (readiness says so) and serves the certificate it has meanwhile.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::certs::CertificateAuthority;
use crate::health::{Check, Readiness};
use crate::metrics::Metrics;
use crate::reload::Backoff;
use crate::server::tls::ReloadingCert;

/// The Secret's keys (cert-manager's names, plus the CA's key).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// The CAs to trust, the current one (whose key is `ca.key`) first.
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "fn-image-resolver";
/// Unix time at which a CA rollover began; present while the served
/// certificate is not yet the current CA's.
const ROLLOVER_STARTED: &str = "fn-image-resolver.kpt.dev/ca-rollover-started";
/// The older CAs still in `ca.crt`, each with the Unix time at which the
/// last certificate it signed expires: `[{"sha256": …, "until": …}]`.
const RETIRED_CAS: &str = "fn-image-resolver.kpt.dev/retired-cas";
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
    /// Lifetime of a CA made here; a CA is replaced when less than two
    /// serving-certificate lifetimes of it are left.
    pub ca_validity: Duration,
    /// The MutatingWebhookConfiguration this process registers with the
    /// Secret's CAs, if any: a rollover waits until it holds the new CA.
    pub registered_webhook: Option<String>,
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
    #[error(
        "Secret {namespace}/{name} was made by someone else (cert-manager?) and is gone; waiting for its owner to make it again, serving the last certificate meanwhile"
    )]
    WaitingForOwner { namespace: String, name: String },
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
    /// The CAs to register as the webhook's caBundle, when the Secret has them.
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

/// A certificate's name, as a certificate compares it: IP addresses as
/// addresses (`::ffff:102:304` is `::ffff:1.2.3.4`), DNS names as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Ip(IpAddr),
    Dns(String),
}

impl Name {
    fn parse(name: &str) -> Self {
        match name.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => Self::Ip(ip),
            Err(_) => Self::Dns(name.to_ascii_lowercase()),
        }
    }

    fn as_string(&self) -> String {
        match self {
            Self::Ip(ip) => ip.to_string(),
            Self::Dns(d) => d.clone(),
        }
    }
}

/// What a certificate says that matters here.
#[derive(Debug, Clone)]
struct CertInfo {
    not_before: u64,
    not_after: u64,
    names: Vec<Name>,
    der: Vec<u8>,
}

fn unix(t: x509_parser::time::ASN1Time) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

fn cert_info(pem: &[u8]) -> Option<CertInfo> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(Name::Dns(d.to_ascii_lowercase()))
                    }
                    x509_parser::extensions::GeneralName::IPAddress(ip) => <[u8; 4]>::try_from(*ip)
                        .map(IpAddr::from)
                        .or_else(|_| <[u8; 16]>::try_from(*ip).map(IpAddr::from))
                        .ok()
                        .map(Name::Ip),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertInfo {
        not_before: unix(cert.validity().not_before),
        not_after: unix(cert.validity().not_after),
        names,
        der: der.as_ref().to_vec(),
    })
}

/// The PEM blocks of a bundle, one certificate each.
fn split_pem(bundle: &[u8]) -> Vec<Vec<u8>> {
    rustls_pki_types::CertificateDer::pem_slice_iter(bundle)
        .filter_map(Result::ok)
        .map(|der| pem_of(der.as_ref()))
        .collect()
}

fn pem_of(der: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.into_bytes()
}

fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(der))
}

/// Whether `leaf` verifies against `ca` alone, as a TLS client would check
/// it (its chain and its validity now) for one of its own names.
fn signed_by(leaf: &CertInfo, ca_der: &[u8]) -> bool {
    use rustls::client::danger::ServerCertVerifier as _;
    let mut roots = rustls::RootCertStore::empty();
    if roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .is_err()
    {
        return false;
    }
    let Ok(verifier) = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build() else {
        return false;
    };
    let Some(name) = leaf
        .names
        .first()
        .and_then(|n| rustls_pki_types::ServerName::try_from(n.as_string()).ok())
    else {
        return false;
    };
    verifier
        .verify_server_cert(
            &rustls_pki_types::CertificateDer::from(leaf.der.clone()),
            &[],
            &name,
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .is_ok()
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Retired {
    sha256: String,
    until: u64,
}

/// What an ours Secret holds, read.
struct Stored {
    /// `ca.crt`'s certificates, the current CA first.
    cas: Vec<Vec<u8>>,
    /// The current CA, when `ca.key` goes with the first of `cas`.
    ca: Option<CertificateAuthority>,
    ca_info: Option<CertInfo>,
    leaf: Option<(Vec<u8>, Vec<u8>, CertInfo)>,
    rollover_started: Option<u64>,
    retired: Vec<Retired>,
}

impl Stored {
    fn read(secret: &Secret) -> Self {
        let annotations = secret.metadata.annotations.as_ref();
        let cas = data(secret, CA_CRT).map(split_pem).unwrap_or_default();
        let ca = cas.first().and_then(|cert| {
            let key = data(secret, CA_KEY)?;
            CertificateAuthority::from_pem(
                &String::from_utf8_lossy(cert),
                &String::from_utf8_lossy(key),
            )
            .ok()
        });
        let ca_info = cas.first().and_then(|c| cert_info(c));
        let leaf = match (data(secret, TLS_CRT), data(secret, TLS_KEY)) {
            (Some(cert), Some(key)) => {
                cert_info(cert).map(|info| (cert.to_vec(), key.to_vec(), info))
            }
            _ => None,
        };
        Self {
            cas,
            ca,
            ca_info,
            leaf,
            rollover_started: annotations
                .and_then(|a| a.get(ROLLOVER_STARTED))
                .and_then(|v| v.parse().ok()),
            retired: annotations
                .and_then(|a| a.get(RETIRED_CAS))
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
        }
    }
}

/// The shortest time between two checks after a write: a tenth of the
/// validity, between 1 s and a minute.
pub fn check_floor(validity: Duration) -> Duration {
    (validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When a serving certificate is due: two thirds into its lifetime.
fn leaf_due(info: &CertInfo) -> u64 {
    info.not_before + info.not_after.saturating_sub(info.not_before) * 2 / 3
}

/// When a CA is due: when less than two serving-certificate lifetimes of it
/// are left (a certificate it signs must end before it does).
fn ca_due(info: &CertInfo, validity: Duration) -> u64 {
    info.not_after
        .saturating_sub(validity.as_secs().saturating_mul(2))
}

/// When the serving certificate in `cert_pem` is due for renewal: two
/// thirds into its lifetime. `None` (due now) when it cannot be read or
/// does not name every one of `names` (compared as [`Name`]s).
pub fn renewal_due(cert_pem: &[u8], names: &[String]) -> Option<SystemTime> {
    let info = cert_info(cert_pem)?;
    if !names.iter().all(|n| info.names.contains(&Name::parse(n))) {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(leaf_due(&info)))
}

/// A write to make and why (the metric's reason).
struct Write {
    secret: Secret,
    reason: &'static str,
}

/// The next state of an ours Secret, if it must change: see the module's
/// documentation for the rules. `registered` says whether a CA (DER) is in
/// the registered caBundle.
fn plan(
    existing: &Secret,
    settings: &ManagedTlsSettings,
    now: u64,
    registered: &dyn Fn(&[u8]) -> bool,
) -> Result<Option<Write>, ManagedTlsError> {
    let stored = Stored::read(existing);
    let floor = check_floor(settings.validity).as_secs();
    let mut retired = live_retired(&stored, now);
    let leaf_alive = stored
        .leaf
        .as_ref()
        .filter(|(_, _, info)| info.not_after > now);
    let current = match (&stored.ca, &stored.ca_info) {
        (Some(ca), Some(info)) if ca_due(info, settings.validity) > now => Some((ca, info)),
        _ => None,
    };
    let Some((ca, ca_info)) = current else {
        // A new CA: rolled over (it joins the bundle; the served
        // certificate stays until the new CA is registered), or fresh when
        // nothing is served that needs the old ones.
        let fresh = CertificateAuthority::for_webhook_lasting(settings.ca_validity)?;
        let mut cas = vec![fresh.cert_pem().into_bytes()];
        return Ok(Some(match leaf_alive {
            Some((cert, key, info)) => {
                for old in &stored.cas {
                    retire(&mut retired, old, info.not_after);
                }
                cas.extend(still_trusted(&stored.cas, &retired));
                Write {
                    secret: build(
                        existing,
                        settings,
                        &fresh,
                        &cas,
                        (cert, key),
                        Some(now),
                        &retired,
                    ),
                    reason: "ca-rollover",
                }
            }
            None => {
                let leaf = fresh.issue_for(&settings.names, settings.validity)?;
                cas.extend(still_trusted(&stored.cas, &retired));
                Write {
                    secret: build(
                        existing,
                        settings,
                        &fresh,
                        &cas,
                        (leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()),
                        None,
                        &retired,
                    ),
                    reason: "ca-new",
                }
            }
        }));
    };
    let wanted: Vec<Name> = settings.names.iter().map(|n| Name::parse(n)).collect();
    let issue = |held: &[Name]| -> Result<(Vec<u8>, Vec<u8>), ManagedTlsError> {
        // What this replica needs, and what the certificate named before
        // (another replica version may need it).
        let mut names = wanted.clone();
        for n in held {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let names: Vec<String> = names.iter().map(Name::as_string).collect();
        let leaf = ca.issue_for(&names, settings.validity)?;
        Ok((leaf.cert_pem.into_bytes(), leaf.key_pem.into_bytes()))
    };
    let write = |cert: &[u8], key: &[u8], retired: &[Retired], started, reason| {
        let mut cas = vec![stored.cas[0].clone()];
        cas.extend(still_trusted(&stored.cas[1..], retired));
        Some(Write {
            secret: build(existing, settings, ca, &cas, (cert, key), started, retired),
            reason,
        })
    };
    Ok(match leaf_alive {
        // Nothing served (or it expired): a certificate now.
        None => {
            let (cert, key) = issue(&[])?;
            write(&cert, &key, &retired, None, "issued")
        }
        // A rollover: the served certificate is an older CA's.
        Some((cert, key, info)) if !signed_by(info, &ca_info.der) => {
            match stored.rollover_started {
                // Begun without saying when (by hand?): say it now.
                None => write(cert, key, &retired, Some(now), "ca-rollover"),
                Some(started)
                    if now < started.saturating_add(floor) || !registered(&ca_info.der) =>
                {
                    None
                }
                Some(_) => {
                    // The old CAs stay trusted until this certificate expires.
                    for old in &stored.cas[1..] {
                        retire(&mut retired, old, info.not_after);
                    }
                    let (cert, key) = issue(&info.names)?;
                    write(&cert, &key, &retired, None, "ca-rollover-done")
                }
            }
        }
        Some((_, _, info))
            if leaf_due(info) <= now || !wanted.iter().all(|n| info.names.contains(n)) =>
        {
            let (cert, key) = issue(&info.names)?;
            write(&cert, &key, &retired, None, "renewed")
        }
        // Old CAs whose last certificate has expired leave the bundle.
        Some((cert, key, _)) if retired.len() != stored.retired.len() => {
            write(cert, key, &retired, stored.rollover_started, "ca-retired")
        }
        Some(_) => None,
    })
}

/// The retired CAs whose last certificate has not expired yet.
fn live_retired(stored: &Stored, now: u64) -> Vec<Retired> {
    stored
        .retired
        .iter()
        .filter(|r| r.until > now)
        .cloned()
        .collect()
}

/// Records that `ca` (PEM) signed certificates until `until`.
fn retire(retired: &mut Vec<Retired>, ca: &[u8], until: u64) {
    let Some(info) = cert_info(ca) else {
        return;
    };
    let sha256 = fingerprint(&info.der);
    match retired.iter_mut().find(|r| r.sha256 == sha256) {
        Some(r) => r.until = r.until.max(until),
        None => retired.push(Retired { sha256, until }),
    }
}

/// The CAs of `cas` that are retired and still live (in their order).
fn still_trusted(cas: &[Vec<u8>], retired: &[Retired]) -> Vec<Vec<u8>> {
    cas.iter()
        .filter(|ca| {
            cert_info(ca)
                .is_some_and(|info| retired.iter().any(|r| r.sha256 == fingerprint(&info.der)))
        })
        .cloned()
        .collect()
}

/// The Secret to write: `existing` (everything other tools put on it
/// kept, its resourceVersion as the write's condition) with our data,
/// label and annotations.
fn build(
    existing: &Secret,
    settings: &ManagedTlsSettings,
    ca: &CertificateAuthority,
    cas: &[Vec<u8>],
    (cert, key): (&[u8], &[u8]),
    rollover_started: Option<u64>,
    retired: &[Retired],
) -> Secret {
    let mut secret = existing.clone();
    secret.metadata.name = Some(settings.secret.clone());
    secret.metadata.namespace = Some(settings.namespace.clone());
    secret
        .metadata
        .labels
        .get_or_insert_default()
        .insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    let annotations = secret.metadata.annotations.get_or_insert_default();
    match rollover_started {
        Some(t) => annotations.insert(ROLLOVER_STARTED.to_string(), t.to_string()),
        None => annotations.remove(ROLLOVER_STARTED),
    };
    if retired.is_empty() {
        annotations.remove(RETIRED_CAS);
    } else {
        annotations.insert(
            RETIRED_CAS.to_string(),
            serde_json::to_string(retired).unwrap_or_default(),
        );
    }
    if secret.type_.is_none() {
        secret.type_ = Some("kubernetes.io/tls".into());
    }
    let bytes = |b: &[u8]| ByteString(b.to_vec());
    let data = secret.data.get_or_insert_default();
    data.insert(TLS_CRT.to_string(), bytes(cert));
    data.insert(TLS_KEY.to_string(), bytes(key));
    data.insert(CA_CRT.to_string(), ByteString(cas.concat()));
    data.insert(CA_KEY.to_string(), bytes(ca.key_pem().as_bytes()));
    secret
}

/// A new Secret: a fresh CA and its certificate; or, when this replica
/// still serves a certificate (the Secret was deleted under it), that
/// certificate with its CA kept in the bundle beside the new one, rolled
/// over later like any new CA.
fn fresh(
    settings: &ManagedTlsSettings,
    served: Option<&Bundle>,
    now: u64,
) -> Result<Secret, ManagedTlsError> {
    let ca = CertificateAuthority::for_webhook_lasting(settings.ca_validity)?;
    let empty = Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret.clone()),
            namespace: Some(settings.namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let served = served
        .filter(|b| b.ours && cert_info(&b.cert_pem).is_some_and(|info| info.not_after > now));
    if let Some(served) = served {
        let info = cert_info(&served.cert_pem).expect("checked above");
        let old: Vec<Vec<u8>> = served.ca_pem.as_deref().map(split_pem).unwrap_or_default();
        let mut retired = Vec::new();
        for ca in &old {
            retire(&mut retired, ca, info.not_after);
        }
        let mut cas = vec![ca.cert_pem().into_bytes()];
        cas.extend(old);
        return Ok(build(
            &empty,
            settings,
            &ca,
            &cas,
            (&served.cert_pem, &served.key_pem),
            Some(now),
            &retired,
        ));
    }
    let leaf = ca.issue_for(&settings.names, settings.validity)?;
    Ok(build(
        &empty,
        settings,
        &ca,
        &[ca.cert_pem().into_bytes()],
        (leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()),
        None,
        &[],
    ))
}

/// What a replica knows between checks.
#[derive(Debug, Default)]
pub struct Owner {
    /// The Secret was seen without our label: never create or write it.
    pub foreign_seen: bool,
    /// What this replica serves now.
    pub served: Option<Bundle>,
}

/// What [`ensure`] did.
#[derive(Debug)]
pub struct Ensured {
    pub bundle: Bundle,
    /// Why the Secret was written, if it was.
    pub wrote: Option<&'static str>,
}

/// The Secret's bundle, made or changed first when it is ours (or missing)
/// and something is due (see the module's documentation). Safe with
/// several replicas: a create that loses the race, or an update whose
/// resourceVersion moved, reads the winner's instead.
pub async fn ensure(
    api: &Api<Secret>,
    settings: &ManagedTlsSettings,
    owner: &mut Owner,
) -> Result<Ensured, ManagedTlsError> {
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
    let registered_cas = registered_cas(api, settings).await;
    let registered = |der: &[u8]| match &registered_cas {
        Some(pem) => split_pem(pem)
            .iter()
            .any(|c| cert_info(c).is_some_and(|info| info.der == der)),
        // Not registered by this process: only the floor's wait.
        None => true,
    };
    for _ in 0..5 {
        let Some(existing) = api.get_opt(&name).await.map_err(read_err)? else {
            if owner.foreign_seen {
                return Err(ManagedTlsError::WaitingForOwner { namespace, name });
            }
            let fresh = fresh(settings, owner.served.as_ref(), now_unix())?;
            match api.create(&PostParams::default(), &fresh).await {
                Ok(created) => {
                    info!(secret = %name, namespace = %namespace, "serving certificate created");
                    let bundle = bundle(&created).ok_or(ManagedTlsError::Foreign {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    })?;
                    return Ok(Ensured {
                        bundle,
                        wrote: Some("created"),
                    });
                }
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(write_err(e)),
            }
        };
        if !is_ours(&existing) {
            owner.foreign_seen = true;
            let bundle = bundle(&existing).ok_or(ManagedTlsError::Foreign {
                namespace: namespace.clone(),
                name: name.clone(),
            })?;
            return Ok(Ensured {
                bundle,
                wrote: None,
            });
        }
        let Some(write) = plan(&existing, settings, now_unix(), &registered)? else {
            let bundle = bundle(&existing).ok_or(ManagedTlsError::Foreign {
                namespace: namespace.clone(),
                name: name.clone(),
            })?;
            return Ok(Ensured {
                bundle,
                wrote: None,
            });
        };
        match api
            .replace(&name, &PostParams::default(), &write.secret)
            .await
        {
            Ok(replaced) => {
                info!(secret = %name, namespace = %namespace, reason = write.reason, "serving certificate Secret written");
                let bundle = bundle(&replaced).ok_or(ManagedTlsError::Foreign {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })?;
                return Ok(Ensured {
                    bundle,
                    wrote: Some(write.reason),
                });
            }
            // Another replica changed it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(write_err(e)),
        }
    }
    Err(ManagedTlsError::Contended { namespace, name })
}

/// The caBundle of the webhook configuration this process registers, if it
/// registers one (the first webhook's; all carry the same).
async fn registered_cas(api: &Api<Secret>, settings: &ManagedTlsSettings) -> Option<Vec<u8>> {
    let name = settings.registered_webhook.as_ref()?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(api.clone().into_client());
    let config = configs.get_opt(name).await.ok().flatten();
    Some(
        config
            .and_then(|c| c.webhooks)
            .and_then(|w| w.into_iter().next())
            .and_then(|w| w.client_config.ca_bundle)
            .map(|b| b.0)
            .unwrap_or_default(),
    )
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
/// and its CAs published (`ca`); when something is due, or it is deleted,
/// [`ensure`] acts (never sooner than the floor after a write). Failures
/// are retried with backoff; readiness says what is wrong meanwhile.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    api: Api<Secret>,
    settings: ManagedTlsSettings,
    mut owner: Owner,
    cert: Arc<ReloadingCert>,
    ca: watch::Sender<Option<Vec<u8>>>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.secret));
    let mut events = watcher(api.clone(), config).boxed();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let floor = check_floor(settings.validity);
    let mut next_check = tokio::time::Instant::now();
    // No check before this, whatever asks (a write just happened).
    let mut not_before = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret))) => {
                    if !is_ours(&secret) {
                        owner.foreign_seen = true;
                    }
                    if let Some(b) = bundle(&secret) {
                        serve(&cert, &ca, &b);
                        owner.served = Some(b);
                    }
                    // What it holds may be due at another time now.
                    next_check = next_check.min(tokio::time::Instant::now());
                    continue;
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    next_check = tokio::time::Instant::now();
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    warn!(error = %e, "watch on the serving certificate's Secret interrupted; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                None => return,
            },
            () = tokio::time::sleep_until(next_check.max(not_before)) => {}
        }
        if tokio::time::Instant::now() < not_before {
            continue;
        }
        match ensure(&api, &settings, &mut owner).await {
            Ok(ensured) => {
                backoff.reset();
                serve(&cert, &ca, &ensured.bundle);
                readiness.set(READINESS_CHECK, Check::Ready);
                if let Some(reason) = ensured.wrote {
                    metrics.serving_certificate_write(reason);
                    not_before = tokio::time::Instant::now() + floor;
                }
                next_check = tokio::time::Instant::now() + until_due(&ensured.bundle, &settings);
                owner.served = Some(ensured.bundle);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot keep the serving certificate; retrying");
                readiness.set(READINESS_CHECK, Check::Degraded(e.to_string()));
                next_check = tokio::time::Instant::now() + delay;
            }
        }
    }
}

/// How long until `b` may need a change: its renewal, a rollover's end or
/// an old CA's retirement for ours, re-read then at most an hour away (so
/// a clock jump is noticed); an hour for a foreign Secret.
fn until_due(b: &Bundle, settings: &ManagedTlsSettings) -> Duration {
    let hour = Duration::from_secs(3600);
    if !b.ours {
        return hour;
    }
    let now = now_unix();
    let mut due = renewal_due(&b.cert_pem, &settings.names)
        .and_then(|d| d.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(now, |d| d.as_secs());
    if let Some(cas) = &b.ca_pem {
        let cas = split_pem(cas);
        if let Some(info) = cas.first().and_then(|c| cert_info(c)) {
            due = due.min(ca_due(&info, settings.validity));
        }
        // A rollover under way, or old CAs to retire: look again soon.
        if cas.len() > 1 {
            due = due.min(now + check_floor(settings.validity).as_secs());
        }
    }
    Duration::from_secs(due.saturating_sub(now)).min(hour)
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

    fn settings(names: &[&str], validity: u64, ca_validity: u64) -> ManagedTlsSettings {
        ManagedTlsSettings {
            secret: "s".into(),
            namespace: "ns".into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            validity: Duration::from_secs(validity),
            ca_validity: Duration::from_secs(ca_validity),
            registered_webhook: None,
        }
    }

    /// The Secret as the API server would return it after a write.
    fn stored(secret: Secret) -> Secret {
        let mut s = secret;
        s.metadata.resource_version = Some("1".into());
        s
    }

    fn leaf_of(secret: &Secret) -> CertInfo {
        cert_info(data(secret, TLS_CRT).expect("tls.crt")).expect("leaf")
    }

    fn cas_of(secret: &Secret) -> Vec<CertInfo> {
        split_pem(data(secret, CA_CRT).expect("ca.crt"))
            .iter()
            .map(|c| cert_info(c).expect("ca"))
            .collect()
    }

    const YEAR: u64 = 365 * 24 * 3600;

    #[test]
    fn a_fresh_secret_needs_nothing_and_ip_names_compare_as_addresses() {
        // `::ffff:102:304` is how the url crate prints [::ffff:1.2.3.4];
        // the certificate reads it back as ::ffff:1.2.3.4.
        let s = settings(&["svc.ns.svc", "::ffff:102:304"], YEAR, 10 * YEAR);
        let secret = stored(fresh(&s, None, now_unix()).expect("fresh"));
        let now = now_unix();
        assert!(plan(&secret, &s, now, &|_| true).expect("plan").is_none());
        assert!(renewal_due(data(&secret, TLS_CRT).expect("cert"), &s.names).is_some());
    }

    #[test]
    fn a_renewal_names_what_the_certificate_named_and_what_this_replica_needs() {
        let old = settings(&["a.example"], YEAR, 10 * YEAR);
        let secret = stored(fresh(&old, None, now_unix()).expect("fresh"));
        let new = settings(&["b.example"], YEAR, 10 * YEAR);
        let write = plan(&secret, &new, now_unix(), &|_| true)
            .expect("plan")
            .expect("b.example is missing");
        assert_eq!(write.reason, "renewed");
        let names = leaf_of(&write.secret).names;
        assert!(names.contains(&Name::parse("a.example")), "{names:?}");
        assert!(names.contains(&Name::parse("b.example")), "{names:?}");
        // Both versions are now content: neither renews again.
        let renewed = stored(write.secret);
        for s in [&old, &new] {
            assert!(
                plan(&renewed, s, now_unix(), &|_| true)
                    .expect("plan")
                    .is_none()
            );
        }
    }

    #[test]
    fn a_ca_is_replaced_while_more_than_two_leaf_lifetimes_are_left() {
        // Leaves of 100 s, a CA of 250 s: due 200 s before its end.
        let s = settings(&["svc.ns.svc"], 100, 250);
        let first = stored(fresh(&s, None, now_unix()).expect("fresh"));
        let ca = cas_of(&first)[0].clone();
        let due = ca_due(&ca, s.validity);
        assert!(due < leaf_of(&first).not_after, "due while its leaf lives");
        assert!(
            plan(&first, &s, due - 1, &|_| true)
                .expect("plan")
                .is_none()
        );
        let write = plan(&first, &s, due, &|_| true)
            .expect("plan")
            .expect("due");
        assert_eq!(write.reason, "ca-rollover");
    }

    #[test]
    fn a_rollover_serves_the_new_ca_only_once_registered_and_retires_the_old_after_its_last_leaf() {
        let s = settings(&["svc.ns.svc"], YEAR, 10 * YEAR);
        let mut first = stored(fresh(&s, None, now_unix()).expect("fresh"));
        let old_leaf = leaf_of(&first);
        let old_ca = cas_of(&first)[0].clone();
        // The CA's key is lost.
        first.data.as_mut().expect("data").remove(CA_KEY);
        let now = now_unix();
        let write = plan(&first, &s, now, &|_| true)
            .expect("plan")
            .expect("lost");
        assert_eq!(write.reason, "ca-rollover");
        let rolling = stored(write.secret);
        let cas = cas_of(&rolling);
        assert_eq!(cas.len(), 2);
        assert_eq!(cas[1].der, old_ca.der, "the old CA stays trusted");
        assert_eq!(
            leaf_of(&rolling).der,
            old_leaf.der,
            "the same leaf is served"
        );
        let started: u64 = rolling.metadata.annotations.as_ref().expect("annotations")
            [ROLLOVER_STARTED]
            .parse()
            .expect("a time");
        assert_eq!(started, now);

        // No leaf from the new CA before the floor has passed and the new CA
        // is registered.
        let floor = check_floor(s.validity).as_secs();
        assert!(
            plan(&rolling, &s, now + floor - 1, &|_| true)
                .expect("plan")
                .is_none()
        );
        assert!(
            plan(&rolling, &s, now + floor, &|_| false)
                .expect("plan")
                .is_none()
        );
        let write = plan(&rolling, &s, now + floor, &|der| der == cas[0].der)
            .expect("plan")
            .expect("registered: the new CA's leaf");
        assert_eq!(write.reason, "ca-rollover-done");
        let done = stored(write.secret);
        assert!(signed_by(&leaf_of(&done), &cas[0].der));
        assert_eq!(
            cas_of(&done).len(),
            2,
            "the old CA until its last leaf ends"
        );
        assert!(
            !done
                .metadata
                .annotations
                .as_ref()
                .expect("a")
                .contains_key(ROLLOVER_STARTED)
        );
        assert!(
            plan(&done, &s, now + floor, &|_| true)
                .expect("plan")
                .is_none()
        );

        // Once the old CA's last leaf has expired, it leaves the bundle
        // (with whatever else is due by then).
        let write = plan(&done, &s, old_leaf.not_after + 1, &|_| true)
            .expect("plan")
            .expect("retire");
        let retired = stored(write.secret);
        assert_eq!(cas_of(&retired).len(), 1);
        assert_eq!(cas_of(&retired)[0].der, cas[0].der);
        assert!(
            !retired
                .metadata
                .annotations
                .as_ref()
                .expect("a")
                .contains_key(RETIRED_CAS)
        );
    }

    #[test]
    fn a_lost_ca_key_rolls_over_and_other_tools_metadata_is_kept() {
        let s = settings(&["svc.ns.svc"], YEAR, 10 * YEAR);
        let mut secret = stored(fresh(&s, None, now_unix()).expect("fresh"));
        secret.data.as_mut().expect("data").remove(CA_KEY);
        secret
            .metadata
            .labels
            .get_or_insert_default()
            .insert("other.tool/owner".into(), "x".into());
        secret
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("other.tool/note".into(), "y".into());
        secret.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        let write = plan(&secret, &s, now_unix(), &|_| true)
            .expect("plan")
            .expect("lost");
        assert_eq!(write.reason, "ca-rollover");
        let meta = &write.secret.metadata;
        assert_eq!(meta.labels.as_ref().expect("l")["other.tool/owner"], "x");
        assert_eq!(
            meta.labels.as_ref().expect("l")[MANAGED_BY_LABEL],
            MANAGED_BY
        );
        assert_eq!(
            meta.annotations.as_ref().expect("a")["other.tool/note"],
            "y"
        );
        assert_eq!(meta.finalizers, Some(vec!["example.com/keep".to_string()]));
        assert_eq!(
            meta.resource_version.as_deref(),
            Some("1"),
            "a conditional write"
        );
        assert_eq!(cas_of(&write.secret).len(), 2);
    }

    #[test]
    fn a_secret_deleted_under_a_replica_comes_back_with_the_served_ca_still_trusted() {
        let s = settings(&["svc.ns.svc"], YEAR, 10 * YEAR);
        let before = stored(fresh(&s, None, now_unix()).expect("fresh"));
        let served = bundle(&before).expect("bundle");
        let again = fresh(&s, Some(&served), now_unix()).expect("again");
        assert_eq!(data(&again, TLS_CRT), Some(served.cert_pem.as_slice()));
        let cas = cas_of(&again);
        assert_eq!(cas.len(), 2);
        assert_eq!(
            Some(pem_of(&cas[1].der)),
            served.ca_pem.as_deref().map(|p| split_pem(p)[0].clone())
        );
        assert!(
            again
                .metadata
                .annotations
                .as_ref()
                .expect("a")
                .contains_key(ROLLOVER_STARTED)
        );
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
