//! `serve`, wired: the resolver and its cache, the admission webhook, the
//! pull-secret mirror, the webhook registration and both listeners, from a
//! plain [`ServeConfig`] (the command line builds one; tests can too, and
//! run the whole service in process).

mod shutdown;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, warn};

pub use self::shutdown::signal;
use crate::admission::{AdmissionSettings, Admitter};
use crate::cache::{CacheSettings, CachedResolver};
use crate::health::Readiness;
use crate::managed_tls::ManagedTlsSettings;
use crate::metrics::Metrics;
use crate::registration::RegistrationConfig;
use crate::registry::{Resolver, ResolverSettings};
use crate::secrets::{MirrorSettings, MirrorStatus};
use crate::server::auth::{Authenticator, TokenReviewer, Tokens};
use crate::server::tls::ReloadingCert;
use crate::server::{AppState, HttpLimits, Listener};

/// Everything `serve` needs, however it was configured.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub resolver: ResolverSettings,
    pub cache: CacheSettings,
    pub admission: AdmissionSettings,
    pub http: HttpLimits,
    /// Loopback address of the plain-HTTP resolver endpoint.
    pub resolver_listen: SocketAddr,
    /// Most images in one `POST /v1/resolve`.
    pub max_batch: usize,
    /// Registries `/v1/resolve` may ask about; empty: any.
    pub resolver_allowed_registries: Vec<String>,
    /// The HTTPS listener with the admission webhook, when configured.
    pub webhook: Option<WebhookConfig>,
    /// Keep the pull secret mirrored, when set.
    pub mirror: Option<MirrorSettings>,
    /// Register the webhook at start-up, when set.
    pub registration: Option<RegistrationConfig>,
    /// Warm the cache before saying ready.
    pub prewarm: crate::prewarm::PrewarmSettings,
}

/// The HTTPS listener.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub certificate: ServingCertificate,
    /// Who may call `/v1/resolve` on it (nobody, by default).
    pub callers: Callers,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum ServingCertificate {
    /// PEM files, re-read when they change (a mounted Secret).
    Files { cert: PathBuf, key: PathBuf },
    /// A Secret this service keeps itself, shared by every replica.
    Managed(ManagedTlsSettings),
}

/// Callers of `/v1/resolve` on the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callers {
    /// `/v1/resolve` is not served there.
    Nobody,
    /// Holders of a token in this file.
    TokenFile(PathBuf),
    /// Holders of a token the API server accepts (TokenReview) whose user or
    /// group is an allowed subject.
    TokenReview(crate::server::auth::TokenReviewSettings),
}

/// A running `serve`.
#[derive(Debug)]
pub struct Running {
    /// Where the resolver endpoint listens (plain HTTP, loopback).
    pub resolver_addr: SocketAddr,
    /// Where the webhook listens (HTTPS), when it does.
    pub webhook_addr: Option<SocketAddr>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub cache: CachedResolver,
    http: HttpLimits,
    /// Stops the listeners (with a drain) and every background task.
    stop: CancellationToken,
    listeners: JoinSet<Result<(), crate::server::ServeError>>,
    background: JoinSet<()>,
}

/// Starts everything `config` asks for and returns once both listeners are
/// bound. Configuration errors (a missing file, a bad address) come back
/// here, before anything is served.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    // Before anything is bound or started: an open resolver is a
    // credential oracle.
    if !config.resolver_listen.ip().is_loopback() {
        return Err(crate::server::ServeError::NotLoopback(config.resolver_listen).into());
    }
    let metrics = Metrics::new();
    let resolver = Arc::new(Resolver::with_observer(
        &config.resolver,
        Some(metrics.clone()),
    )?);
    let allowed_registries: Vec<String> = config
        .resolver_allowed_registries
        .iter()
        .map(|h| crate::registry::reference::normalize_host(h))
        .collect();
    // Configured registries keep metric labels of their own; others share
    // "other" past a limit.
    metrics.configure_registries(
        resolver
            .configured_registries()
            .into_iter()
            .chain(allowed_registries.iter().cloned()),
    );
    let cache = CachedResolver::new(resolver, config.cache.clone(), metrics.clone());
    let readiness = Arc::new(Readiness::default());
    readiness.set("resolver", Ok(()));
    let stop = CancellationToken::new();
    let mut background = JoinSet::new();
    let mut listeners = JoinSet::new();

    let mut admitter =
        Admitter::new(cache.clone(), config.admission.clone()).with_metrics(metrics.clone());
    if let Some(settings) = config.mirror.clone() {
        let status = Arc::new(MirrorStatus::default());
        admitter = admitter.with_mirror(status.clone());
        background.spawn(
            crate::secrets::run_when_connected(
                settings,
                status,
                metrics.clone(),
                readiness.clone(),
                stop.clone(),
            )
            .in_current_span(),
        );
    }
    if config.resolver.private_registries || config.resolver.tls_ca_dir.is_some() {
        cache.resolver().report_readiness(&readiness);
    }
    if config.resolver.private_registries {
        background.spawn(
            cache
                .clone()
                .follow_credentials(readiness.clone(), stop.clone())
                .in_current_span(),
        );
    }
    if config.resolver.tls_ca_dir.is_some() {
        background.spawn(
            cache
                .clone()
                .follow_registry_ca(readiness.clone(), stop.clone())
                .in_current_span(),
        );
    }
    // The serving certificate, before anything is served or registered: a
    // managed one's CA is what registration writes as the caBundle.
    let mut ca_bundle = None;
    let serving = match config.webhook.as_ref().map(|w| &w.certificate) {
        None => None,
        Some(ServingCertificate::Files { cert, key }) => {
            let cert = ReloadingCert::load(cert.clone(), key.clone())?;
            background.spawn(cert.clone().watch(stop.clone()).in_current_span());
            Some(cert)
        }
        Some(ServingCertificate::Managed(settings)) => {
            let (cert, ca) =
                managed_certificate(settings, &metrics, &readiness, &mut background, &stop).await?;
            ca_bundle = Some(ca);
            Some(cert)
        }
    };
    if let Some(registration) = &config.registration {
        // Checked now: a configuration that cannot be built is a start-up error.
        crate::registration::build(registration)?;
        readiness.set(
            crate::registration::READINESS_CHECK,
            Err("not registered yet".into()),
        );
        background.spawn(
            crate::registration::keep_registered(
                registration.clone(),
                ca_bundle,
                readiness.clone(),
                stop.clone(),
            )
            .in_current_span(),
        );
    }

    if !config.prewarm.is_empty() {
        readiness.set(
            crate::prewarm::READINESS_CHECK,
            Err("warming the cache".into()),
        );
        background.spawn(
            crate::prewarm::run(
                config.prewarm.clone(),
                cache.clone(),
                metrics.clone(),
                readiness.clone(),
            )
            .in_current_span(),
        );
    }

    let state = Arc::new(AppState {
        admitter,
        cache: cache.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        max_batch: config.max_batch,
        allowed_registries,
        request_timeout: config.http.request_timeout,
    });

    let mut webhook_addr = None;
    if let (Some(webhook), Some(cert)) = (&config.webhook, serving) {
        cert.observe(metrics.clone());
        let callers = match &webhook.callers {
            Callers::Nobody => None,
            Callers::TokenFile(path) => Some(Authenticator::Tokens(Tokens::load(path)?)),
            Callers::TokenReview(settings) => {
                anyhow::ensure!(
                    !settings.allowed_subjects.is_empty(),
                    "--resolver-token-review needs --resolver-allowed-subjects: without it every identity in the cluster could use the resolver"
                );
                let client = crate::cluster::client()
                    .await
                    .map_err(|e| anyhow::anyhow!("--resolver-token-review: {e}"))?;
                Some(Authenticator::TokenReview(Box::new(
                    TokenReviewer::new(client, settings.clone()).with_metrics(metrics.clone()),
                )))
            }
        };
        let listener = Listener::bind(webhook.listen)?;
        webhook_addr = Some(listener.local_addr());
        listeners.spawn(
            crate::server::serve_tls(
                listener,
                crate::server::webhook_router(state.clone(), callers),
                cert,
                config.http,
                stop.clone(),
            )
            .in_current_span(),
        );
    } else {
        info!("no --tls-cert-file: the admission webhook listener is off");
    }

    let listener = Listener::bind(config.resolver_listen)?;
    let resolver_addr = listener.local_addr();
    listeners.spawn(
        crate::server::serve_loopback(
            listener,
            crate::server::router(state),
            config.http,
            stop.clone(),
        )
        .in_current_span(),
    );
    Ok(Running {
        resolver_addr,
        webhook_addr,
        readiness,
        metrics,
        cache,
        http: config.http,
        stop,
        listeners,
        background,
    })
}

/// The managed serving certificate: the Secret's (made or renewed first
/// when due; retried for a while, the API server may be starting too),
/// then followed in the background. Also gives the CA to register.
async fn managed_certificate(
    settings: &ManagedTlsSettings,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    background: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<(
    Arc<ReloadingCert>,
    tokio::sync::watch::Receiver<Option<Vec<u8>>>,
)> {
    let client = crate::cluster::client()
        .await
        .map_err(|e| anyhow::anyhow!("--managed-tls-secret: {e}"))?;
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, &settings.namespace);
    let mut backoff =
        crate::reload::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    let mut owner = crate::managed_tls::Owner::default();
    let ensured = loop {
        match crate::managed_tls::ensure(&api, settings, &mut owner).await {
            Ok(ensured) => break ensured,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                warn!(error = %e, "no serving certificate yet; retrying");
                readiness.set(crate::managed_tls::READINESS_CHECK, Err(e.to_string()));
                tokio::time::sleep(backoff.next_delay().min(Duration::from_secs(5))).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(reason) = ensured.wrote {
        metrics.serving_certificate_write(reason);
    }
    readiness.set(crate::managed_tls::READINESS_CHECK, Ok(()));
    let bundle = ensured.bundle;
    let source = format!("{}/{}", settings.namespace, settings.secret);
    let cert = ReloadingCert::from_pem(&source, &bundle.cert_pem, &bundle.key_pem)?;
    let (ca_tx, ca_rx) = tokio::sync::watch::channel(bundle.ca_pem.clone());
    owner.served = Some(bundle);
    background.spawn(
        crate::managed_tls::follow(
            api,
            settings.clone(),
            owner,
            cert.clone(),
            ca_tx,
            metrics.clone(),
            readiness.clone(),
            stop.clone(),
        )
        .in_current_span(),
    );
    Ok((cert, ca_rx))
}

/// `serve`: starts, runs until SIGTERM or SIGINT (or a listener fails), then
/// shuts down without refusing a request (see [`Running::shut_down`]).
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    // Listening for the signal before start-up work (waiting for the
    // managed certificate can take a while): a rollout that stops a replica
    // still starting gets a clean exit, not the default action's 143.
    let stop_signal = signal();
    tokio::pin!(stop_signal);
    let mut running = tokio::select! {
        started = start(config) => started?,
        () = &mut stop_signal => {
            info!("shutdown signal received while starting; exiting");
            return Ok(());
        }
    };
    tokio::select! {
        () = &mut stop_signal => {}
        failed = running.listeners.join_next() => {
            running.stop.cancel();
            let error = match failed {
                Some(Ok(Err(e))) => anyhow::Error::from(e),
                Some(Err(join)) => anyhow::anyhow!("a listener task failed: {join}"),
                _ => anyhow::anyhow!("a listener stopped"),
            };
            tracing::error!(error = %error, "a listener failed; shutting down");
            running.finish().await;
            return Err(error);
        }
    }
    running.shut_down().await;
    Ok(())
}

impl Drop for Running {
    /// Dropped without [`Running::shut_down`] (a test that ends): stop
    /// everything at once.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Running {
    /// Shuts down as a rollout wants: `/readyz` 503 at once; both listeners
    /// keep serving for the shutdown delay, answering with `Connection:
    /// close` so keep-alive clients re-dial another replica; then they stop
    /// accepting and drain in-flight requests (at most the drain time).
    pub async fn shut_down(mut self) {
        self.readiness.begin_shutdown();
        info!(
            delay_ms = self.http.delay.as_millis() as u64,
            drain_ms = self.http.drain.as_millis() as u64,
            "shutdown signal received: /readyz answers 503; serving on until the delay ends, then draining"
        );
        tokio::select! {
            () = tokio::time::sleep(self.http.delay) => {}
            // A listener that fails meanwhile ends the delay.
            _ = self.listeners.join_next() => {}
        }
        info!("shutting down: no new connections; draining in-flight requests");
        self.stop.cancel();
        self.finish().await;
    }

    /// Waits for the listeners to drain (bounded) and stops the rest.
    async fn finish(mut self) {
        // The listeners drain for `drain`; give their tasks a little more.
        let drained = tokio::time::timeout(
            self.http.drain.saturating_add(Duration::from_secs(1)),
            async { while self.listeners.join_next().await.is_some() {} },
        )
        .await;
        if drained.is_err() {
            warn!(
                timeout_secs = self.http.drain.as_secs(),
                "in-flight requests did not finish in time; exiting anyway"
            );
        }
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while self.background.join_next().await.is_some() {}
        })
        .await;
        self.background.shutdown().await;
        self.listeners.shutdown().await;
        info!("stopped");
    }
}
