//! The `MutatingWebhookConfiguration` that sends function pod creations to
//! us, built from its settings and applied with server-side apply (one field
//! manager, so replicas and re-runs converge instead of fighting).

use std::path::PathBuf;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::Readiness;
use crate::reload::Backoff;

pub const FIELD_MANAGER: &str = "fn-image-resolver";
const NAMESPACE_LABEL: &str = "kubernetes.io/metadata.name";

/// What the API server does when the webhook cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit the pod unchanged.
    Ignore,
    /// Refuse the pod.
    Fail,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "Ignore",
            Self::Fail => "Fail",
        }
    }
}

/// How the webhook is registered (`register`, `serve --register-webhook`).
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// Name of the MutatingWebhookConfiguration (and of its webhook, with a suffix).
    pub webhook_name: String,
    /// The Service the API server calls, unless `url` is set.
    pub service: String,
    /// Its namespace, where fn-image-resolver runs; never matched.
    pub service_namespace: String,
    pub service_port: i32,
    /// Call this URL instead of a Service.
    pub url: Option<String>,
    /// PEM CA bundle the API server verifies the webhook with.
    pub ca_bundle_file: Option<PathBuf>,
    /// `timeoutSeconds` (1-30).
    pub timeout_seconds: i32,
    pub failure_policy: FailurePolicy,
    /// Function pods are created in this namespace ...
    pub pod_namespace: String,
    /// ... and carry this label.
    pub function_label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("cannot read the CA bundle {path}: {source}")]
    CaBundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--pod-namespace {0} is the webhook's own namespace: the webhook would have to admit its own pods"
    )]
    OwnNamespace(String),
    #[error("cannot apply MutatingWebhookConfiguration {name}: {source}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Builds the configuration for function pods.
pub fn build(args: &RegistrationConfig) -> Result<MutatingWebhookConfiguration, RegistrationError> {
    let pod_namespace = args.pod_namespace.as_str();
    if pod_namespace == args.service_namespace {
        return Err(RegistrationError::OwnNamespace(pod_namespace.to_string()));
    }
    let ca_bundle = match &args.ca_bundle_file {
        Some(path) => Some(ByteString(std::fs::read(path).map_err(|source| {
            RegistrationError::CaBundle {
                path: path.clone(),
                source,
            }
        })?)),
        None => None,
    };
    let client_config = WebhookClientConfig {
        ca_bundle,
        url: args.url.clone(),
        service: args.url.is_none().then(|| ServiceReference {
            name: args.service.clone(),
            namespace: args.service_namespace.clone(),
            path: Some("/mutate".into()),
            port: Some(args.service_port),
        }),
    };
    let requirement = |operator: &str, values: Vec<String>| LabelSelectorRequirement {
        key: NAMESPACE_LABEL.into(),
        operator: operator.into(),
        values: Some(values),
    };
    let webhook = MutatingWebhook {
        name: format!("{}.porch.kpt.dev", args.webhook_name),
        admission_review_versions: vec!["v1".into()],
        client_config,
        failure_policy: Some(args.failure_policy.as_str().into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![
                requirement("In", vec![pod_namespace.to_string()]),
                // Belt and braces: never our own namespace or kube-system,
                // whatever --pod-namespace says.
                requirement(
                    "NotIn",
                    vec![args.service_namespace.clone(), "kube-system".into()],
                ),
            ]),
            match_labels: None,
        }),
        // Function pods only: Porch labels each with its image's pod id.
        object_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: args.function_label.clone(),
                operator: "Exists".into(),
                values: None,
            }]),
            match_labels: None,
        }),
        reinvocation_policy: Some("IfNeeded".into()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["pods".into()]),
            scope: Some("Namespaced".into()),
        }]),
        side_effects: "None".into(),
        timeout_seconds: Some(args.timeout_seconds),
        ..Default::default()
    };
    Ok(MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(args.webhook_name.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "fn-image-resolver".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        webhooks: Some(vec![webhook]),
    })
}

/// Server-side applies `config`, taking ownership of its fields.
pub async fn apply(
    client: kube::Client,
    config: &MutatingWebhookConfiguration,
) -> Result<(), RegistrationError> {
    let name = config.metadata.name.clone().unwrap_or_default();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(config))
        .await
        .map_err(|source| RegistrationError::Apply { name, source })?;
    Ok(())
}

/// The readiness check registration reports into.
pub const READINESS_CHECK: &str = "webhook-registration";

/// Keeps the webhook registered: applies `config` until it succeeds
/// (retrying with backoff: the API server may not be reachable yet), and
/// again whenever the CA in `ca` changes (a managed serving certificate);
/// `readiness` says why it is not done yet.
pub async fn keep_registered(
    config: RegistrationConfig,
    mut ca: Option<tokio::sync::watch::Receiver<Option<Vec<u8>>>>,
    readiness: std::sync::Arc<Readiness>,
    shutdown: CancellationToken,
) {
    loop {
        let mut webhook = match build(&config) {
            Ok(webhook) => webhook,
            Err(e) => {
                warn!(error = %e, "cannot build the webhook configuration");
                readiness.set(READINESS_CHECK, Err(e.to_string()));
                return;
            }
        };
        if config.ca_bundle_file.is_none()
            && let Some(ca) = &mut ca
        {
            let bundle = ca.borrow_and_update().clone();
            for hook in webhook.webhooks.iter_mut().flatten() {
                hook.client_config.ca_bundle = bundle.clone().map(ByteString);
            }
        }
        if !apply_until_done(&webhook, &readiness, &shutdown).await {
            return;
        }
        let Some(ca) = &mut ca else {
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = ca.changed() => if changed.is_err() { return },
        }
        info!("the serving CA changed; registering its caBundle");
    }
}

/// Applies `config` until it succeeds or `shutdown`; says whether it did.
async fn apply_until_done(
    config: &MutatingWebhookConfiguration,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> bool {
    let name = config.metadata.name.clone().unwrap_or_default();
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(30),
    );
    loop {
        let result = match crate::cluster::client().await {
            Ok(client) => apply(client, config).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(name, "webhook registered");
                readiness.set(READINESS_CHECK, Ok(()));
                return true;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "webhook registration failed");
                readiness.set(READINESS_CHECK, Err(e));
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Deletes the webhook configuration `name`; `Ok(false)` when it was gone.
pub async fn delete(client: kube::Client, name: &str) -> Result<bool, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
