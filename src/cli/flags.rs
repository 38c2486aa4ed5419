//! Command-line flags, and the plain settings they make. Every flag can also
//! be set from an environment variable (`FN_IMAGE_RESOLVER_` + the flag name
//! in upper snake case); the seed flags keep their exact names, aliases and
//! defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, PossibleValue};
use clap::{Args, ValueEnum};

use crate::admission::FailureMode;
use crate::cache::CacheSettings;
use crate::registration::{FailurePolicy, RegistrationConfig};
use crate::registry::{Platform, ResolverSettings};
use crate::telemetry::LogFormat;

// The domain's enums as flag values: clap stays in this module.

/// A duration longer than zero (a zero period would make a timer spin).
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl ValueEnum for FailureMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Open, Self::Closed]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Open => PossibleValue::new("open").help(
                "deny only a pod that cannot be right; admit unresolvable containers as written",
            ),
            Self::Closed => {
                PossibleValue::new("closed").help("deny any pod with an image it cannot pin")
            }
        })
    }
}

impl ValueEnum for FailurePolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Ignore, Self::Fail]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Ignore => PossibleValue::new("ignore")
                .help("the API server admits the pod unchanged when the webhook cannot be reached"),
            Self::Fail => PossibleValue::new("fail")
                .help("the API server refuses the pod when the webhook cannot be reached"),
        })
    }
}

impl ValueEnum for LogFormat {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Text, Self::Json]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            Self::Text => "text",
            Self::Json => "json",
        }))
    }
}

/// Registry access: shared by `resolve` and `serve`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Registry access")]
pub struct RegistryArgs {
    /// Use the Docker config at --registry-auth-secret-path for images outside
    /// the default catalog, and inject the pull secret into their pods.
    #[arg(long, alias = "enable-private-registry", env = "FN_IMAGE_RESOLVER_ENABLE_PRIVATE_REGISTRIES",
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false",
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub enable_private_registries: bool,

    /// Docker config JSON (a mounted kubernetes.io/dockerconfigjson Secret).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_REGISTRY_AUTH_SECRET_PATH",
        default_value = "/var/tmp/auth-secret/.dockerconfigjson",
        value_name = "PATH"
    )]
    pub registry_auth_secret_path: PathBuf,

    /// Name of the pull secret mirrored into --pod-namespace and injected into pods.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_REGISTRY_AUTH_SECRET_NAME",
        default_value = "auth-secret",
        value_name = "NAME"
    )]
    pub registry_auth_secret_name: String,

    /// Verify registries with the CA in --tls-secret-path first, then the system
    /// roots (then plain HTTP, for --insecure-registry hosts only).
    #[arg(long, alias = "enable-private-registry-tls", env = "FN_IMAGE_RESOLVER_ENABLE_PRIVATE_REGISTRIES_TLS",
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false",
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub enable_private_registries_tls: bool,

    /// Directory holding the registry CA as ca.crt or ca.pem (PEM).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_TLS_SECRET_PATH",
        default_value = "/var/tmp/tls-secret/",
        value_name = "DIR"
    )]
    pub tls_secret_path: PathBuf,

    /// Prefix for bare function names: `set-namespace:v0.4` means
    /// `<prefix>set-namespace:v0.4`.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_DEFAULT_IMAGE_PREFIX",
        default_value = "ghcr.io/kptdev/krm-functions-catalog/",
        value_name = "PREFIX"
    )]
    pub default_image_prefix: String,

    /// Platform whose entrypoint is read from multi-platform images.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_PLATFORM",
        default_value = "linux/amd64",
        value_name = "OS/ARCH[/VARIANT]"
    )]
    pub platform: Platform,

    /// Registry that may be reached over plain HTTP when TLS fails (repeatable;
    /// comma-separated in the environment). No other host ever is.
    #[arg(
        long = "insecure-registry",
        env = "FN_IMAGE_RESOLVER_INSECURE_REGISTRY",
        value_delimiter = ',',
        value_name = "HOST[:PORT]"
    )]
    pub insecure_registries: Vec<String>,

    /// Directory of registry host configuration in containerd's layout
    /// (its config_path: DIR/<host[:port]>/hosts.toml, DIR/_default,
    /// docker.io for Docker Hub), read as the nodes' containerd reads it:
    /// the mirrors and pull-through caches an image's registry names are
    /// tried in order, as the node pulls. Files are read again when they
    /// change. Registries without a directory keep the rules above.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_REGISTRY_CONFIG_PATH",
        value_name = "DIR"
    )]
    pub registry_config_path: Option<PathBuf>,

    /// Time limit for resolving one image (all its registry requests).
    #[arg(long, env = "FN_IMAGE_RESOLVER_REGISTRY_TIMEOUT", default_value = "15s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub registry_timeout: Duration,

    /// Most image resolutions talking to registries at once, across all
    /// callers; the rest wait their turn (within their own deadline). Keeps a
    /// burst of new images from opening hundreds of registry connections.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_MAX_CONCURRENT_FETCHES",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "N"
    )]
    pub max_concurrent_fetches: u32,
}

impl RegistryArgs {
    pub fn resolver_settings(&self) -> ResolverSettings {
        ResolverSettings {
            default_prefix: self.default_image_prefix.clone(),
            platform: self.platform.clone(),
            private_registries: self.enable_private_registries,
            docker_config_path: self.registry_auth_secret_path.clone(),
            pull_secret_name: self.registry_auth_secret_name.clone(),
            tls_ca_dir: self
                .enable_private_registries_tls
                .then(|| self.tls_secret_path.clone()),
            insecure_hosts: self.insecure_registries.clone(),
            request_timeout: self.registry_timeout,
            resolve_timeout: self.registry_timeout,
            max_concurrent_fetches: self.max_concurrent_fetches as usize,
            registry_config_path: self.registry_config_path.clone(),
            wait_for_files: false,
        }
    }
}

/// A size in bytes: a number, with an optional binary suffix (Ki, Mi, Gi).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let multiplier: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?}: a number of bytes, with Ki, Mi or Gi if any"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: a positive number of bytes"))
}

/// The shared resolver cache.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cache")]
pub struct CacheArgs {
    /// Most cached answers (and remembered failures) kept in memory.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_CACHE_CAPACITY",
        default_value_t = 10_000,
        value_name = "ENTRIES"
    )]
    pub cache_capacity: u64,

    /// Most memory the cached answers hold together, in bytes (suffixes Ki,
    /// Mi, Gi). Every answer counts as at least this divided by
    /// --cache-capacity, so that many typical answers fit; images with long
    /// entrypoints count as what they hold.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_CACHE_MAX_BYTES",
        default_value = "32Mi",
        value_parser = parse_bytes,
        value_name = "BYTES"
    )]
    pub cache_max_bytes: u64,

    /// Age after which a tag's answer is revalidated with a HEAD (in the
    /// background; the cached answer is served meanwhile). Digests never expire.
    #[arg(long, env = "FN_IMAGE_RESOLVER_CACHE_TAG_TTL", default_value = "5m",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cache_tag_ttl: Duration,

    /// How long past the TTL an answer is still served while the registry fails.
    #[arg(long, env = "FN_IMAGE_RESOLVER_CACHE_MAX_STALE", default_value = "1h",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cache_max_stale: Duration,

    /// How long "not found" and "unauthorized" answers are remembered.
    #[arg(long, env = "FN_IMAGE_RESOLVER_CACHE_NEGATIVE_TTL", default_value = "30s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cache_negative_ttl: Duration,
}

impl CacheArgs {
    pub fn settings(&self) -> CacheSettings {
        CacheSettings {
            capacity: self.cache_capacity,
            max_bytes: self.cache_max_bytes,
            tag_ttl: self.cache_tag_ttl,
            max_stale: self.cache_max_stale,
            negative_ttl: self.cache_negative_ttl,
        }
    }
}

/// The resolver endpoint and process behaviour of `serve`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerArgs {
    /// Address of the plain-HTTP resolver endpoint (/v1/resolve, /healthz,
    /// /readyz, /metrics). Loopback only. The default port is one nothing in
    /// Porch's function-runner pod uses (its gRPC server has 9445, its
    /// metrics 9464, pprof 8080), so the sidecar component can sit there.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_RESOLVER_LISTEN",
        default_value = "127.0.0.1:9447",
        value_name = "ADDR"
    )]
    pub resolver_listen: SocketAddr,

    /// Most images in one POST /v1/resolve batch.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_MAX_BATCH",
        default_value_t = 100,
        value_name = "N"
    )]
    pub max_batch: usize,

    /// Registries `/v1/resolve` may be asked about (comma-separated hosts,
    /// e.g. `ghcr.io,registry.example.com:5000`); others get 403 and are never
    /// contacted. Empty: any. The webhook is not limited by this.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_RESOLVER_ALLOWED_REGISTRIES",
        value_delimiter = ',',
        value_name = "HOST[:PORT]"
    )]
    pub resolver_allowed_registries: Vec<String>,

    /// After SIGTERM, how long both listeners keep serving (with /readyz
    /// 503 and `Connection: close`) before they stop accepting, so that the
    /// endpoints drop this pod before any connection is refused.
    #[arg(long, env = "FN_IMAGE_RESOLVER_SHUTDOWN_DELAY", default_value = "5s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_delay: Duration,

    /// After the shutdown delay, how long in-flight requests may take before exit.
    #[arg(long, env = "FN_IMAGE_RESOLVER_SHUTDOWN_TIMEOUT", default_value = "20s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_timeout: Duration,

    /// Both listeners: how long a client may take to finish the TLS handshake
    /// and send a request's headers before the connection is closed.
    #[arg(long, env = "FN_IMAGE_RESOLVER_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,

    /// Both listeners: the longest a request may take once its headers are in
    /// (body upload and answer) before it is answered 408.
    #[arg(long, env = "FN_IMAGE_RESOLVER_REQUEST_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
}

/// Warming the cache at start-up (`serve`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cache warming")]
pub struct PrewarmArgs {
    /// Images to resolve at start-up, before /readyz says ready
    /// (comma-separated; read as pods name them). The images of the function
    /// pods already in --pod-namespace are warmed too when the API server is
    /// reachable.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_PREWARM_IMAGES",
        value_delimiter = ',',
        value_name = "IMAGE"
    )]
    pub prewarm_images: Vec<String>,

    /// A file of images to warm, one per line (`#` starts a comment).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_PREWARM_IMAGES_FILE",
        value_name = "FILE"
    )]
    pub prewarm_images_file: Option<PathBuf>,

    /// Readiness waits for warming at most this long; an image that fails is
    /// logged and counted, never fatal.
    #[arg(long, env = "FN_IMAGE_RESOLVER_PREWARM_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub prewarm_timeout: Duration,
}

/// Where function pods are: shared by `serve` and `register`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Function pods")]
pub struct PodArgs {
    /// Namespace where function pods run and the pull secret is mirrored.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_POD_NAMESPACE",
        default_value = "porch-fn-system",
        value_name = "NAMESPACE"
    )]
    pub pod_namespace: String,

    /// Only pods carrying this label are sent to the webhook (objectSelector
    /// `Exists`) and mutated; Porch labels every function pod with it.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_FUNCTION_POD_LABEL",
        default_value = "fn.kpt.dev/image",
        value_name = "KEY"
    )]
    pub function_pod_label: String,
}

impl ServerArgs {
    pub fn limits(&self) -> crate::server::HttpLimits {
        crate::server::HttpLimits {
            header_read_timeout: self.header_read_timeout,
            request_timeout: self.request_timeout,
            drain: self.shutdown_timeout,
            delay: self.shutdown_delay,
        }
    }
}

/// Registration flags (used by `register` and `serve --register-webhook`).
#[derive(Debug, Clone, Args)]
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

    /// What the API server does when the webhook cannot be reached.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_FAILURE_POLICY",
        value_enum,
        default_value = "ignore"
    )]
    pub failure_policy: FailurePolicy,
}

impl RegistrationArgs {
    /// What a serving certificate must name: the webhook Service (`S`,
    /// `S.NS`, `S.NS.svc`, `S.NS.svc.cluster.local`) and the host of
    /// `--webhook-url` when set (a DNS name or an IP address).
    pub fn serving_names(&self) -> Vec<String> {
        let url_host = self
            .webhook_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()));
        crate::certs::service_names(
            &self.webhook_service,
            &self.webhook_service_namespace,
            &url_host.into_iter().collect::<Vec<_>>(),
        )
    }

    /// The registration for function pods as `pods` says.
    pub fn config(&self, pods: &PodArgs) -> RegistrationConfig {
        RegistrationConfig {
            webhook_name: self.webhook_name.clone(),
            service: self.webhook_service.clone(),
            service_namespace: self.webhook_service_namespace.clone(),
            service_port: self.webhook_service_port,
            url: self.webhook_url.clone(),
            ca_bundle_file: self.ca_bundle_file.clone(),
            timeout_seconds: self.webhook_timeout,
            failure_policy: self.failure_policy,
            pod_namespace: pods.pod_namespace.clone(),
            function_label: pods.function_pod_label.clone(),
        }
    }
}

/// The admission webhook listener of `serve`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admission webhook")]
pub struct WebhookArgs {
    /// HTTPS address of the webhook (POST /mutate, /healthz, /readyz, /metrics).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_LISTEN",
        default_value = "0.0.0.0:8443",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// Serving certificate (PEM chain). The webhook listener runs when this is
    /// set; the file is re-read when it changes.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_TLS_CERT_FILE",
        value_name = "FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// Private key of the serving certificate (PEM).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_TLS_KEY_FILE",
        value_name = "FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// Keep the webhook's CA and serving certificate in this Secret of
    /// --webhook-service-namespace, made, shared by every replica, renewed
    /// and followed without a restart (instead of --tls-cert-file); its CA
    /// is what --register-webhook registers. A Secret of that name made by
    /// someone else (cert-manager) is used as it is.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_MANAGED_TLS_SECRET",
        value_name = "NAME",
        conflicts_with_all = ["tls_cert_file", "tls_key_file"]
    )]
    pub managed_tls_secret: Option<String>,

    /// Lifetime of a managed serving certificate; renewed past two thirds of
    /// it (the CA lives 10 years).
    #[arg(long, env = "FN_IMAGE_RESOLVER_MANAGED_TLS_VALIDITY", default_value = "1y",
          value_parser = positive_duration, value_name = "DURATION")]
    pub managed_tls_validity: Duration,

    /// Also serve /v1/resolve on the HTTPS listener, to callers presenting one
    /// of the bearer tokens in this file (one per line).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_RESOLVER_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub resolver_token_file: Option<PathBuf>,

    /// Also serve /v1/resolve on the HTTPS listener to callers whose bearer
    /// token the API server accepts (TokenReview) and whose user or group is
    /// in --resolver-allowed-subjects. Needs `create tokenreviews`.
    #[arg(long, env = "FN_IMAGE_RESOLVER_RESOLVER_TOKEN_REVIEW", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, default_value = "false", default_missing_value = "true", require_equals = true,
          value_name = "BOOL", conflicts_with = "resolver_token_file")]
    pub resolver_token_review: bool,

    /// Users (`system:serviceaccount:porch-system:porch-server`) or groups
    /// allowed to call the resolver with --resolver-token-review.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_RESOLVER_ALLOWED_SUBJECTS",
        value_delimiter = ',',
        value_name = "USER|GROUP"
    )]
    pub resolver_allowed_subjects: Vec<String>,

    /// Audiences a caller's token must be meant for, with
    /// --resolver-token-review (comma-separated). Empty: the API server's
    /// own audiences.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_RESOLVER_TOKEN_AUDIENCES",
        value_delimiter = ',',
        value_name = "AUDIENCE"
    )]
    pub resolver_token_audiences: Vec<String>,

    /// How long the API server's acceptance of a caller's token is reused
    /// (a deleted ServiceAccount stops working within this); refusals are
    /// reused for at most 5s.
    #[arg(long, env = "FN_IMAGE_RESOLVER_RESOLVER_TOKEN_REVIEW_TTL", default_value = "30s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub resolver_token_review_ttl: Duration,

    /// `open` denies a function pod only where it cannot be right (its
    /// function image invalid, not found or without the platform, or a
    /// needed entrypoint missing or unreadable) and admits containers it
    /// cannot resolve as written, with a warning; `closed` denies any pod
    /// with an image it cannot pin.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_FAILURE_MODE",
        value_enum,
        default_value = "open"
    )]
    pub failure_mode: FailureMode,

    /// Pin the function container's image to its digest too. `false` for
    /// clusters whose Porch re-adopts its pods by `spec.containers[0].image`
    /// (docs/porch.md, "Pod churn"): its entrypoint is still checked
    /// against the tag's current digest, and every other container is pinned.
    #[arg(long, env = "FN_IMAGE_RESOLVER_PIN_FUNCTION_IMAGE", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, default_value = "true", default_missing_value = "true", require_equals = true,
          value_name = "BOOL")]
    pub pin_function_image: bool,

    /// Most distinct images one review resolves (a function pod has two).
    /// Past it the pod's other containers are left as written, with one
    /// warning (failure mode open), or the pod is denied (closed): a pod of
    /// thousands of containers costs a bounded review.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_MAX_IMAGES_PER_REVIEW",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "N"
    )]
    pub max_images_per_review: u32,

    /// Keep the pull secret mirrored into --pod-namespace (when private
    /// registries are enabled). Off for clusters where the secret is managed
    /// elsewhere: then it is injected without checking that it exists.
    #[arg(long, env = "FN_IMAGE_RESOLVER_MIRROR_SECRET", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, default_value = "true", default_missing_value = "true", require_equals = true,
          value_name = "BOOL")]
    pub mirror_secret: bool,

    /// How often the mirror re-checks the pull secret even without events.
    #[arg(long, env = "FN_IMAGE_RESOLVER_SECRET_RESYNC_INTERVAL", default_value = "5m",
          value_parser = positive_duration, value_name = "DURATION")]
    pub secret_resync_interval: Duration,

    /// Budget for one review when the API server does not send `?timeout=`.
    #[arg(long, env = "FN_IMAGE_RESOLVER_ADMISSION_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub admission_timeout: Duration,
}

/// Logging: shared by every subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log line format (logs go to stderr).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `fn_image_resolver=debug` (RUST_LOG syntax).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_LOG_LEVEL",
        default_value = "info",
        global = true,
        value_name = "FILTER"
    )]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
    }

    #[test]
    fn seed_flag_names_aliases_and_defaults() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults");
        let r = cli.registry;
        assert!(!r.enable_private_registries);
        assert!(!r.enable_private_registries_tls);
        assert_eq!(
            r.registry_auth_secret_path,
            PathBuf::from("/var/tmp/auth-secret/.dockerconfigjson")
        );
        assert_eq!(r.registry_auth_secret_name, "auth-secret");
        assert_eq!(r.tls_secret_path, PathBuf::from("/var/tmp/tls-secret/"));
        assert_eq!(r.platform.to_string(), "linux/amd64");
        assert_eq!(
            r.default_image_prefix,
            "ghcr.io/kptdev/krm-functions-catalog/"
        );

        for args in [
            vec![
                "x",
                "--enable-private-registry=true",
                "--enable-private-registry-tls=true",
            ],
            vec![
                "x",
                "--enable-private-registries",
                "--enable-private-registries-tls",
            ],
            vec![
                "x",
                "--enable-private-registries=1",
                "--enable-private-registries-tls=yes",
            ],
        ] {
            let r = Cli::try_parse_from(&args).expect("valid").registry;
            assert!(
                r.enable_private_registries && r.enable_private_registries_tls,
                "{args:?}"
            );
        }
        let r = Cli::try_parse_from(["x", "--enable-private-registry=false"])
            .expect("valid")
            .registry;
        assert!(!r.enable_private_registries);
    }

    #[test]
    fn insecure_registries_repeat_and_bad_values_fail() {
        let r = Cli::try_parse_from([
            "x",
            "--insecure-registry",
            "a:5000",
            "--insecure-registry=b",
        ])
        .expect("valid")
        .registry;
        assert_eq!(r.insecure_registries, vec!["a:5000", "b"]);
        assert!(Cli::try_parse_from(["x", "--platform", "linux"]).is_err());
        assert!(Cli::try_parse_from(["x", "--registry-timeout", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "--enable-private-registries=maybe"]).is_err());
    }
}
