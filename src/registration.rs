//! The `MutatingWebhookConfiguration` that sends function pod creations to
//! us, built from flags and applied with server-side apply (one field
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

pub const FIELD_MANAGER: &str = "fn-image-resolver";
const NAMESPACE_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// The API server admits the pod unchanged when the webhook cannot be reached.
    Ignore,
    /// The API server refuses the pod when the webhook cannot be reached.
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

/// Registration flags (used by `register` and `serve --register-webhook`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Webhook registration")]
pub struct RegistrationArgs {
    /// Name of the MutatingWebhookConfiguration (and of its webhook entry, with a suffix).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_WEBHOOK_NAME",
        default_value = "fn-image-resolver"
    )]
    pub webhook_name: String,

    /// Service the API server calls (ignored with --webhook-url).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_WEBHOOK_SERVICE",
        default_value = "fn-image-resolver"
    )]
    pub webhook_service: String,

    /// Namespace of that Service, where fn-image-resolver runs. Never matched by the webhook.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_WEBHOOK_SERVICE_NAMESPACE",
        default_value = "porch-system"
    )]
    pub webhook_service_namespace: String,

    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_WEBHOOK_SERVICE_PORT",
        default_value_t = 443
    )]
    pub webhook_service_port: i32,

    /// Call this URL instead of a Service (e.g. https://127.0.0.1:8443/mutate out of cluster).
    #[arg(long, env = "FN_IMAGE_RESOLVER_WEBHOOK_URL", value_name = "URL")]
    pub webhook_url: Option<String>,

    /// PEM CA bundle the API server verifies the webhook with (e.g. ca.crt from `certs`).
    #[arg(long, env = "FN_IMAGE_RESOLVER_CA_BUNDLE_FILE", value_name = "FILE")]
    pub ca_bundle_file: Option<PathBuf>,

    /// Seconds the API server waits for the webhook (1-30); it passes this as ?timeout=.
    #[arg(long, env = "FN_IMAGE_RESOLVER_WEBHOOK_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(1..=30))]
    pub webhook_timeout: i32,

    /// Only pods carrying this label are sent to the webhook (objectSelector
    /// `Exists`) and mutated; Porch labels every function pod with it.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_FUNCTION_POD_LABEL",
        default_value = "fn.kpt.dev/image",
        value_name = "KEY"
    )]
    pub function_pod_label: String,

    /// What the API server does when the webhook cannot be reached.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_FAILURE_POLICY",
        value_enum,
        default_value = "ignore"
    )]
    pub failure_policy: FailurePolicy,
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

/// Builds the configuration for function pods created in `pod_namespace`.
pub fn build(
    args: &RegistrationArgs,
    pod_namespace: &str,
) -> Result<MutatingWebhookConfiguration, RegistrationError> {
    if pod_namespace == args.webhook_service_namespace {
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
        url: args.webhook_url.clone(),
        service: args.webhook_url.is_none().then(|| ServiceReference {
            name: args.webhook_service.clone(),
            namespace: args.webhook_service_namespace.clone(),
            path: Some("/mutate".into()),
            port: Some(args.webhook_service_port),
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
                    vec![args.webhook_service_namespace.clone(), "kube-system".into()],
                ),
            ]),
            match_labels: None,
        }),
        // Function pods only: Porch labels each with its image's pod id.
        object_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: args.function_pod_label.clone(),
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
        timeout_seconds: Some(args.webhook_timeout),
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

/// A client from in-cluster credentials or `$KUBECONFIG`, with an error that
/// says where credentials were looked for.
pub async fn kube_client() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes credentials (in-cluster or $KUBECONFIG): {e}"))
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
