//! Subcommands. `main.rs` only calls [`run`]; the flags and the plain
//! settings they make are in [`flags`].

pub mod flags;
pub mod reference;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;

use self::flags::{
    CacheArgs, LogArgs, PodArgs, PrewarmArgs, RegistrationArgs, RegistryArgs, ServerArgs,
    WebhookArgs,
};
use crate::app::{Callers, ServeConfig, ServingCertificate, WebhookConfig};
use crate::cache::{CacheSettings, CachedResolver};
use crate::metrics::Metrics;
use crate::registry::{Resolution, Resolver, ResolverSettings};

/// Pins Porch KRM function images to digests, fills their entrypoints from the
/// image config, and mirrors the registry pull secret.
#[derive(Debug, Parser)]
#[command(name = "fn-image-resolver", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve images once and print one JSON object per image on stdout.
    ///
    /// Exits 1 if any image failed; its line then holds
    /// {"image": ..., "error": {"kind": ..., "message": ...}}.
    Resolve(ResolveArgs),
    /// Run the long-lived service: the admission webhook (with a serving
    /// certificate), the pull-secret mirror, the webhook registration, and
    /// the resolver endpoint on loopback, sharing one cache; health,
    /// readiness and metrics on both listeners.
    Serve(Box<ServeArgs>),
    /// Generate a CA and a serving certificate for <service>.<namespace>.svc.
    ///
    /// Writes ca.crt, ca.key, tls.crt and tls.key (keys mode 0600). Use them for
    /// --tls-cert-file/--tls-key-file, and ca.crt as the webhook's caBundle.
    Certs(CertsArgs),
    /// Create or update the MutatingWebhookConfiguration (server-side apply).
    ///
    /// Uses in-cluster credentials or $KUBECONFIG. With --print, only prints it.
    Register(RegisterArgs),
    /// Delete what `serve` made in the cluster: the MutatingWebhookConfiguration
    /// and, with --managed-tls-secret and --registry-auth-secret-name, those
    /// Secrets if this service made them.
    ///
    /// Run it after deleting deploy/, once the replicas are gone (docs/install.md).
    Unregister(UnregisterArgs),
    /// Exit 0 if URL answers 2xx within 3s (for exec probes of a loopback endpoint).
    Check {
        /// e.g. http://127.0.0.1:9447/readyz
        url: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub registration: RegistrationArgs,
    #[command(flatten)]
    pub pods: PodArgs,
    /// Print the object as JSON (valid YAML for kubectl) instead of applying it.
    #[arg(long, env = "FN_IMAGE_RESOLVER_PRINT", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value = "false", default_missing_value = "true", require_equals = true,
          value_name = "BOOL")]
    pub print: bool,
}

#[derive(Debug, clap::Args)]
pub struct UnregisterArgs {
    #[command(flatten)]
    pub registration: RegistrationArgs,
    /// The Secret `serve --managed-tls-secret` kept, in
    /// --webhook-service-namespace; deleted only if this service made it.
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_MANAGED_TLS_SECRET",
        value_name = "NAME"
    )]
    pub managed_tls_secret: Option<String>,
    /// The pull secret `serve` mirrored into --pod-namespace; deleted only
    /// if the mirror created it (one Porch's function runner wrote stays).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_REGISTRY_AUTH_SECRET_NAME",
        value_name = "NAME"
    )]
    pub registry_auth_secret_name: Option<String>,
    /// Namespace of that pull secret (the function pods' namespace).
    #[arg(
        long,
        env = "FN_IMAGE_RESOLVER_POD_NAMESPACE",
        default_value = "porch-fn-system",
        value_name = "NAMESPACE"
    )]
    pub pod_namespace: String,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub prewarm: PrewarmArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub webhook: WebhookArgs,
    /// Create or update the MutatingWebhookConfiguration at startup (and keep
    /// retrying until it succeeds); needs Kubernetes credentials.
    #[arg(long, env = "FN_IMAGE_RESOLVER_REGISTER_WEBHOOK", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value = "false", default_missing_value = "true", require_equals = true,
          value_name = "BOOL", help_heading = "Webhook registration")]
    pub register_webhook: bool,
    #[command(flatten)]
    pub registration: RegistrationArgs,
}

impl ServeArgs {
    /// The plain configuration of `serve` these flags make.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        // A long-running server waits for its mounted files (optional
        // Secret volumes may be empty when it starts).
        let resolver = ResolverSettings {
            wait_for_files: true,
            ..self.registry.resolver_settings()
        };
        let certificate = match (
            &self.webhook.tls_cert_file,
            &self.webhook.tls_key_file,
            &self.webhook.managed_tls_secret,
        ) {
            (Some(cert), Some(key), None) => Some(ServingCertificate::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, Some(secret)) => Some(ServingCertificate::Managed(
                crate::managed_tls::ManagedTlsSettings {
                    secret: secret.clone(),
                    namespace: self.registration.webhook_service_namespace.clone(),
                    names: self.registration.serving_names(),
                    validity: self.webhook.managed_tls_validity,
                    ca_validity: crate::certs::CA_LIFETIME,
                    registered_webhook: self
                        .register_webhook
                        .then(|| self.registration.webhook_name.clone()),
                },
            )),
            (None, None, None) => None,
            _ => anyhow::bail!(
                "--tls-cert-file and --tls-key-file go together, and not with --managed-tls-secret"
            ),
        };
        let callers = match &self.webhook.resolver_token_file {
            Some(path) => Callers::TokenFile(path.clone()),
            None if self.webhook.resolver_token_review => {
                Callers::TokenReview(crate::server::auth::TokenReviewSettings {
                    allowed_subjects: self.webhook.resolver_allowed_subjects.clone(),
                    audiences: self.webhook.resolver_token_audiences.clone(),
                    verdict_ttl: self.webhook.resolver_token_review_ttl,
                })
            }
            None => Callers::Nobody,
        };
        let webhook = match certificate {
            Some(certificate) => Some(WebhookConfig {
                listen: self.webhook.listen,
                certificate,
                callers,
            }),
            None if callers != Callers::Nobody => anyhow::bail!(
                "--resolver-token-file and --resolver-token-review serve the resolver on the HTTPS listener, which needs --tls-cert-file or --managed-tls-secret"
            ),
            None => None,
        };
        let mirror = (resolver.private_registries && self.webhook.mirror_secret).then(|| {
            crate::secrets::MirrorSettings {
                source: self.registry.registry_auth_secret_path.clone(),
                name: self.registry.registry_auth_secret_name.clone(),
                namespace: self.pods.pod_namespace.clone(),
                resync: self.webhook.secret_resync_interval,
            }
        });
        Ok(ServeConfig {
            admission: crate::admission::AdmissionSettings {
                namespace: self.pods.pod_namespace.clone(),
                function_label: self.pods.function_pod_label.clone(),
                pull_secret: self.registry.registry_auth_secret_name.clone(),
                failure_mode: self.webhook.failure_mode,
                pin_function_image: self.webhook.pin_function_image,
                max_images: self.webhook.max_images_per_review as usize,
                default_timeout: self.webhook.admission_timeout,
            },
            resolver,
            cache: self.cache.settings(),
            http: self.server.limits(),
            resolver_listen: self.server.resolver_listen,
            max_batch: self.server.max_batch,
            resolver_allowed_registries: self.server.resolver_allowed_registries.clone(),
            webhook,
            mirror,
            registration: self
                .register_webhook
                .then(|| self.registration.config(&self.pods)),
            prewarm: crate::prewarm::PrewarmSettings {
                images: self.prewarm.prewarm_images.clone(),
                file: self.prewarm.prewarm_images_file.clone(),
                pods: Some((
                    self.pods.pod_namespace.clone(),
                    self.pods.function_pod_label.clone(),
                )),
                timeout: self.prewarm.prewarm_timeout,
            },
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Service name of the webhook.
    #[arg(long, default_value = "fn-image-resolver")]
    pub service: String,
    /// Namespace of the webhook Service.
    #[arg(long, default_value = "porch-system")]
    pub namespace: String,
    /// Extra DNS names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "san", value_name = "NAME|IP")]
    pub extra_sans: Vec<String>,
    /// Directory to write ca.crt, ca.key, tls.crt and tls.key into.
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ResolveArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Image references, e.g. `set-namespace:v0.4` or `registry:5000/fns/x@sha256:…`.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

/// Parses the command line, runs the subcommand, and turns errors into an exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end: dropping it flushes the lines still queued.
    let _logs = match crate::telemetry::init_logging(cli.log.log_format, &cli.log.log_level) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Resolve(args) => resolve(args).await,
            Command::Serve(args) => crate::app::serve(args.config()?)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Certs(args) => certs(&args).map(|()| ExitCode::SUCCESS),
            Command::Register(args) => register(&args).await.map(|()| ExitCode::SUCCESS),
            Command::Unregister(args) => unregister(&args).await.map(|()| ExitCode::SUCCESS),
            Command::Check { url } => check(&url).await,
        }
    });
    // Blocking work still running (a DNS lookup that hangs, say) must not
    // keep the process past the kubelet's grace period: give it a moment,
    // then exit regardless.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each cause once: many of our
/// messages already end with their cause's text (`cannot read X: No such
/// file or directory`), which `{:#}` would print a second time.
pub fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

async fn resolve(args: ResolveArgs) -> anyhow::Result<ExitCode> {
    let metrics = Metrics::new();
    let resolver = Arc::new(Resolver::with_observer(
        &args.registry.resolver_settings(),
        Some(metrics.clone()),
    )?);
    // The same cache as the server: an image named twice is fetched once.
    let cache = CachedResolver::new(resolver, CacheSettings::default(), metrics);
    // Resolve concurrently, print in the order given.
    let tasks: Vec<_> = args
        .images
        .iter()
        .map(|image| {
            let cache = cache.clone();
            let image = image.clone();
            tokio::spawn(async move { cache.resolve(&image, None).await.map(|(r, _)| r) })
        })
        .collect();
    let mut failed = false;
    let mut stdout = std::io::stdout().lock();
    for (image, task) in args.images.iter().zip(tasks) {
        let line = match task.await {
            Ok(Ok(resolution)) => resolution_json(&resolution),
            Ok(Err(e)) => {
                failed = true;
                crate::server::error_json(image, &e)
            }
            Err(join) => {
                failed = true;
                json!({"image": image, "error": {"kind": "internal", "message": format!("resolver task failed: {join}")}})
            }
        };
        writeln!(stdout, "{line}")?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn resolution_json(resolution: &Resolution) -> serde_json::Value {
    serde_json::to_value(resolution).unwrap_or_else(|e| json!({"image": resolution.image, "error": {"kind": "internal", "message": e.to_string()}}))
}

fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    let names = crate::certs::service_names(&args.service, &args.namespace, &args.extra_sans);
    let written = crate::certs::write_bundle(&args.out, &names, args.force)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

async fn register(args: &RegisterArgs) -> anyhow::Result<()> {
    let config = crate::registration::build(&args.registration.config(&args.pods))?;
    if args.print {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    let client = crate::cluster::client().await.map_err(anyhow::Error::msg)?;
    crate::registration::apply(client, &config).await?;
    eprintln!(
        "applied MutatingWebhookConfiguration {}",
        args.registration.webhook_name
    );
    Ok(())
}

async fn unregister(args: &UnregisterArgs) -> anyhow::Result<()> {
    let client = crate::cluster::client().await.map_err(anyhow::Error::msg)?;
    let name = &args.registration.webhook_name;
    if crate::registration::delete(client.clone(), name).await? {
        eprintln!("deleted MutatingWebhookConfiguration {name}");
    } else {
        eprintln!("MutatingWebhookConfiguration {name} was already gone");
    }
    if let Some(secret) = &args.managed_tls_secret {
        let namespace = &args.registration.webhook_service_namespace;
        let api = kube::Api::namespaced(client.clone(), namespace);
        let what = match crate::managed_tls::delete_if_ours(&api, secret).await? {
            crate::managed_tls::Removal::Deleted => "deleted",
            crate::managed_tls::Removal::NotOurs => {
                "left as it is (fn-image-resolver did not make it)"
            }
            crate::managed_tls::Removal::Gone => "was already gone",
        };
        eprintln!("Secret {namespace}/{secret} {what}");
    }
    if let Some(secret) = &args.registry_auth_secret_name {
        let namespace = &args.pod_namespace;
        let api = kube::Api::namespaced(client, namespace);
        let what = match crate::secrets::delete_if_created(&api, secret).await? {
            crate::secrets::Removal::Deleted => "deleted",
            crate::secrets::Removal::NotCreatedByUs => {
                "left as it is (fn-image-resolver did not create it: Porch's function runner writes it too)"
            }
            crate::secrets::Removal::Gone => "was already gone",
        };
        eprintln!("Secret {namespace}/{secret} {what}");
    }
    Ok(())
}

async fn check(url: &str) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(
            crate::registry::tls::client_config(
                crate::registry::tls::system_roots()
                    .unwrap_or_else(|_| rustls::RootCertStore::empty()),
            )
            .as_ref()
            .clone(),
        )
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    match client.get(url).send().await {
        Ok(resp) if resp.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(resp) => {
            eprintln!("{url}: HTTP {}", resp.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// The environment variable of `--flag-name`.
    fn env_name(long: &str) -> String {
        format!(
            "FN_IMAGE_RESOLVER_{}",
            long.to_uppercase().replace('-', "_")
        )
    }

    #[test]
    fn every_flag_of_serve_resolve_and_register_has_its_environment_variable() {
        let cli = Cli::command();
        let global: Vec<_> = cli.get_arguments().filter(|a| a.is_global_set()).collect();
        let mut checked = 0;
        for name in ["serve", "resolve", "register", "unregister"] {
            let sub = cli.find_subcommand(name).expect("subcommand");
            for arg in sub.get_arguments().chain(global.iter().copied()) {
                let Some(long) = arg.get_long() else {
                    continue; // positional (resolve's images)
                };
                if matches!(long, "help" | "version") {
                    continue;
                }
                assert_eq!(
                    arg.get_env().and_then(|e| e.to_str()),
                    Some(env_name(long).as_str()),
                    "{name} --{long}"
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked} flags checked");
    }
}
