//! The mutation of one function pod, as JSON Patch operations: pin images,
//! make the function's entrypoint match its pinned image, inject the pull
//! secret, record what was done. Pure: given the pod and what each image
//! resolved to, it decides.
//!
//! The pod is the one the Porch function runner makes: an init container
//! `copy-wrapper-server` and a container `function` whose command is the
//! wrapper-server and whose args end with `--` and the function's entrypoint
//! (already filled in by Porch from its own, never refreshed, cache).

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, RemoveOperation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::FailureMode;
use crate::registry::{ErrorKind, ImageAnswer};

/// Annotation holding `{container name: original image}` for every container
/// whose image was pinned.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "fn-image-resolver.porch.kpt.dev/original-images";

/// Annotation holding `{container name: reason}` for every container
/// admitted with an image that could not be pinned.
pub const UNPINNED_ANNOTATION: &str = "fn-image-resolver.porch.kpt.dev/unpinned";

/// The wrapper-server runs whatever follows the first of these in its args.
pub const WRAPPER_SEPARATOR: &str = "--";

/// Longest admission warning we send; the API server may cut longer ones.
const MAX_WARNING_CHARS: usize = 256;

/// Why a pod cannot be admitted as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("container {container:?} runs the function, and its image cannot run: {reason}")]
    FunctionImage {
        container: String,
        kind: ErrorKind,
        reason: String,
    },
    #[error(
        "container {container:?}: image {image} has neither Entrypoint nor Cmd in its config, so the wrapper-server has nothing to run after \"--\""
    )]
    NoEntrypoint { container: String, image: String },
    #[error(
        "container {container:?}: cannot pin image {image} ({reason}); --failure-mode closed denies such pods"
    )]
    Unpinnable {
        container: String,
        image: String,
        kind: FailureKind,
        reason: String,
    },
    #[error(
        "the pod needs pull secret {name:?}, which does not exist in its namespace yet; --failure-mode closed denies such pods"
    )]
    PullSecretMissing { name: String },
}

impl Denial {
    /// The HTTP-style code in the AdmissionReview's status.
    /// Definitive failures (retrying cannot help) keep their own code;
    /// only a transient one says 503, which invites a retry.
    pub fn code(&self) -> u16 {
        match self {
            Self::FunctionImage { kind, .. }
            | Self::Unpinnable {
                kind: FailureKind::Resolve(kind),
                ..
            } => definitive_code(*kind).unwrap_or(503),
            Self::NoEntrypoint { .. } => 400,
            Self::Unpinnable { .. } | Self::PullSecretMissing { .. } => 503,
        }
    }
}

/// The status code of a definitive resolution failure; `None` for a
/// transient one.
fn definitive_code(kind: ErrorKind) -> Option<u16> {
    match kind {
        ErrorKind::InvalidReference | ErrorKind::UnsupportedImage => Some(400),
        ErrorKind::NotFound | ErrorKind::PlatformNotFound => Some(404),
        ErrorKind::Unauthorized => Some(403),
        _ => None,
    }
}

/// Why an image has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The resolver's error of that kind.
    Resolve(ErrorKind),
    /// Not resolved within the review's budget (the fetch goes on).
    Deadline,
    /// The resolution task failed (a bug).
    Internal,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resolve(kind) => kind.as_str(),
            Self::Deadline => "deadline",
            Self::Internal => "internal",
        }
    }
}

/// An image that could not be resolved for this review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// Its registry has credentials in the Docker config: the kubelet needs
    /// the pull secret for it, pinned or not.
    pub needs_pull_secret: bool,
}

/// What the admitter knows about one image of the pod.
#[derive(Debug, Clone, Copy)]
pub enum Resolved<'a> {
    Answer(ImageAnswer<'a>),
    Failed(&'a Failure),
    /// Not asked for (see [`images_to_resolve`]): already pinned, and its
    /// config is not needed.
    Skipped {
        needs_pull_secret: bool,
    },
}

/// The pull secret to inject for images whose registry needs credentials.
#[derive(Debug, Clone, Copy)]
pub struct PullSecret<'a> {
    pub name: &'a str,
    /// The Secret is known to exist in the namespace (always true when
    /// nothing checks, `--mirror-secret=false`).
    pub exists: bool,
}

/// How to mutate.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pub failure_mode: FailureMode,
    /// Pin the function container's image too (`--pin-function-image`).
    pub pin_function_image: bool,
    pub pull_secret: Option<PullSecret<'a>>,
}

/// The parts of a Pod the webhook reads; serde skips everything else. Parsing
/// k8s-openapi's full `Pod` (every field, then dropping it) was the largest
/// single cost of a cached review under callgrind. The API server validates
/// the whole object after the mutating webhooks, so leniency about fields we
/// never read loses nothing.
#[derive(Debug, Default, Deserialize)]
pub struct Pod {
    /// `None` when absent or null: the patch then adds the whole object.
    #[serde(default)]
    pub metadata: Option<PodMeta>,
    #[serde(default)]
    pub spec: Option<PodSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// `null` is how Go encodes an empty list: a pod like any other (the
    /// API server rejects a pod without containers itself).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
    #[serde(default)]
    pub image_pull_secrets: Option<Vec<SecretRef>>,
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

impl Container {
    /// The container's image, when it names one.
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref().filter(|i| !i.is_empty())
    }

    /// Where the wrapper-server's `--` is in the args.
    fn separator(&self) -> Option<usize> {
        self.args
            .as_deref()?
            .iter()
            .position(|a| a == WRAPPER_SEPARATOR)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct SecretRef {
    #[serde(default)]
    pub name: String,
}

impl Pod {
    /// The pod's labels, when it has any.
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.labels.as_ref()
    }

    /// Index in `spec.containers` of the function container: the first whose
    /// args hold the wrapper-server's `--` (Porch names it `function`).
    pub fn function_container(&self) -> Option<usize> {
        self.spec
            .as_ref()?
            .containers
            .iter()
            .position(|c| c.separator().is_some())
    }
}

/// What was decided for a pod.
#[derive(Debug, Default)]
pub struct Mutation {
    pub operations: Vec<PatchOperation>,
    /// Container name → original image, for containers pinned now.
    pub pinned: BTreeMap<String, String>,
    /// Container name → why its image is admitted unpinned.
    pub unpinned: BTreeMap<String, Unpinned>,
    /// Containers whose entrypoint after `--` was replaced.
    pub entrypoints_replaced: usize,
    /// Admission warnings for the user (`kubectl` prints them).
    pub warnings: Vec<String>,
    pub pull_secret_added: bool,
}

/// A container admitted with its image as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpinned {
    pub image: String,
    pub kind: FailureKind,
    pub reason: String,
}

/// The distinct images of `pod` the admitter must resolve: every image not
/// yet pinned by digest, and the function container's image in any case
/// (its entrypoint is checked against the image's config).
pub fn images_to_resolve(pod: &Pod) -> Vec<&str> {
    let function = pod.function_container();
    let mut images: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // The function's image first: a limit on images never leaves it out.
    if let Some(image) = function
        .and_then(|i| pod.spec.as_ref()?.containers.get(i))
        .and_then(Container::image)
    {
        seen.insert(image);
        images.push(image);
    }
    for_each_container(pod, |field, i, container| {
        let Some(image) = container.image() else {
            return;
        };
        let is_function = field == "containers" && Some(i) == function;
        if (is_function || !image.contains('@')) && seen.insert(image) {
            images.push(image);
        }
    });
    images
}

/// Calls `f(field, index, container)` for the init containers, then the
/// containers.
fn for_each_container<'p>(pod: &'p Pod, mut f: impl FnMut(&'static str, usize, &'p Container)) {
    let Some(spec) = &pod.spec else {
        return;
    };
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        f("initContainers", i, c);
    }
    for (i, c) in spec.containers.iter().enumerate() {
        f("containers", i, c);
    }
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn remove(tokens: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
    })
}

/// `text` cut to at most `max` characters, on a character boundary.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Plans the patch for `pod`. `resolved` says what each image of the pod
/// resolved to; an image it knows nothing of is left alone.
///
/// In [`FailureMode::Open`] a pod is denied only where it cannot be right:
/// its function image is invalid, not found or lacks the platform, or the
/// function needs its entrypoint filled in (nothing after `--`) and the image
/// has none or the registry refuses us. Anything else that cannot be
/// resolved is admitted as written, with a warning and a record in the
/// [`UNPINNED_ANNOTATION`]. [`FailureMode::Closed`] denies a pod any of
/// whose images cannot be resolved.
pub fn plan<'r>(
    pod: &Pod,
    resolved: &dyn Fn(&str) -> Option<Resolved<'r>>,
    options: &Options<'_>,
) -> Result<Mutation, Denial> {
    let mut mutation = Mutation::default();
    let Some(spec) = &pod.spec else {
        return Ok(mutation);
    };
    let function = pod.function_container();
    let mut needs_secret = false;
    let mut denial = None;
    for_each_container(pod, |field, i, container| {
        if denial.is_some() {
            return;
        }
        let Some(image) = container.image() else {
            return;
        };
        let Some(resolution) = resolved(image) else {
            return;
        };
        let is_function = field == "containers" && Some(i) == function;
        let index = i.to_string();
        let at = |leaf: &'static str| ["spec", field, index.as_str(), leaf];
        let answer = match resolution {
            Resolved::Skipped { needs_pull_secret } => {
                needs_secret |= needs_pull_secret;
                return;
            }
            Resolved::Failed(failure) => {
                needs_secret |= failure.needs_pull_secret;
                denial = unresolved(
                    container,
                    image,
                    is_function,
                    failure,
                    options,
                    &mut mutation,
                );
                return;
            }
            Resolved::Answer(answer) => answer,
        };
        needs_secret |= answer.needs_pull_secret;

        // Pin: a reference that already names a digest keeps it, as written.
        let pin = !is_function || options.pin_function_image;
        if pin && !image.contains('@') {
            let pinned = answer.pinned();
            if pinned != image {
                mutation.operations.push(add(&at("image"), json!(pinned)));
                mutation
                    .pinned
                    .insert(container.name.clone(), image.to_string());
            }
        }
        if is_function {
            match entrypoint(container, &answer) {
                Ok(None) => {}
                Ok(Some(Fill::Append(args))) => {
                    mutation.operations.push(add(&at("args"), json!(args)));
                }
                Ok(Some(Fill::Replace { args, old })) => {
                    mutation.entrypoints_replaced += 1;
                    mutation.warnings.push(clip(
                        &format!(
                            "container {:?}: the entrypoint after \"--\" was {old:?}, but image {} runs {:?}; replaced (the function runner's entrypoint cache predates the image's current digest)",
                            container.name,
                            answer.reference,
                            answer.entrypoint()
                        ),
                        MAX_WARNING_CHARS,
                    ));
                    mutation.operations.push(add(&at("args"), json!(args)));
                }
                Err(e) => denial = Some(e),
            }
        }
    });
    if let Some(denial) = denial {
        return Err(denial);
    }

    if let Some(secret) = options.pull_secret.filter(|_| needs_secret) {
        let existing = spec.image_pull_secrets.as_deref().unwrap_or_default();
        if !existing.iter().any(|s| s.name == secret.name) {
            if !secret.exists {
                if options.failure_mode == FailureMode::Closed {
                    return Err(Denial::PullSecretMissing {
                        name: secret.name.to_string(),
                    });
                }
                mutation.warnings.push(clip(
                    &format!(
                        "pull secret {:?} does not exist in the pod's namespace yet, so it was not added; the images are pulled with the node's own credentials",
                        secret.name
                    ),
                    MAX_WARNING_CHARS,
                ));
            } else {
                let entry = json!({ "name": secret.name });
                if spec.image_pull_secrets.is_none() {
                    mutation
                        .operations
                        .push(add(&["spec", "imagePullSecrets"], json!([entry])));
                } else {
                    mutation
                        .operations
                        .push(add(&["spec", "imagePullSecrets", "-"], entry));
                }
                mutation.pull_secret_added = true;
            }
        }
    }

    annotate(pod, &mut mutation);
    Ok(mutation)
}

/// Decides about a container whose image has no answer: a denial, or the
/// image admitted as written (recorded in `mutation`).
fn unresolved(
    container: &Container,
    image: &str,
    is_function: bool,
    failure: &Failure,
    options: &Options<'_>,
    mutation: &mut Mutation,
) -> Option<Denial> {
    // A function that cannot run is denied as such in either mode (with
    // its definitive code); then the closed rule.
    if is_function && let FailureKind::Resolve(kind) = failure.kind {
        let needs_entrypoint = container
            .separator()
            .zip(container.args.as_deref())
            .is_some_and(|(sep, args)| sep + 1 == args.len());
        let cannot_run = matches!(
            kind,
            ErrorKind::InvalidReference
                | ErrorKind::NotFound
                | ErrorKind::PlatformNotFound
                | ErrorKind::UnsupportedImage
        ) || (needs_entrypoint && kind == ErrorKind::Unauthorized);
        if cannot_run {
            return Some(Denial::FunctionImage {
                container: container.name.clone(),
                kind,
                reason: failure.message.clone(),
            });
        }
    }
    if options.failure_mode == FailureMode::Closed {
        return Some(Denial::Unpinnable {
            container: container.name.clone(),
            image: image.to_string(),
            kind: failure.kind,
            reason: failure.message.clone(),
        });
    }
    if image.contains('@') {
        // Pinned already; only its entrypoint could not be checked.
        mutation.warnings.push(clip(
            &format!(
                "container {:?}: could not read image {image} to check the entrypoint after \"--\": {}",
                container.name, failure.message
            ),
            MAX_WARNING_CHARS,
        ));
        return None;
    }
    mutation.warnings.push(clip(
        &format!(
            "container {:?}: image {image} admitted as written, not pinned to a digest: {}",
            container.name, failure.message
        ),
        MAX_WARNING_CHARS,
    ));
    mutation.unpinned.insert(
        container.name.clone(),
        Unpinned {
            image: image.to_string(),
            kind: failure.kind,
            reason: failure.message.clone(),
        },
    );
    None
}

/// How the function container's args change.
enum Fill<'a> {
    /// Nothing after `--`: the entrypoint is appended.
    Append(Vec<&'a str>),
    /// Another entrypoint after `--` than the image's: replaced.
    Replace {
        args: Vec<&'a str>,
        old: Vec<&'a str>,
    },
}

/// What the function container's args must become so that what follows the
/// first `--` is the image's entrypoint; `None` when they already are.
fn entrypoint<'a>(
    container: &'a Container,
    answer: &ImageAnswer<'a>,
) -> Result<Option<Fill<'a>>, Denial> {
    let args = container.args.as_deref().unwrap_or_default();
    let Some(sep) = container.separator() else {
        return Ok(None);
    };
    let (head, after) = args.split_at(sep + 1);
    let wanted = answer.entrypoint();
    // The wrapper-server cannot run an empty command.
    if wanted.is_empty() {
        return Err(Denial::NoEntrypoint {
            container: container.name.clone(),
            image: answer.reference.to_string(),
        });
    }
    if after == wanted {
        return Ok(None);
    }
    let filled: Vec<&str> = head.iter().chain(wanted).map(String::as_str).collect();
    Ok(Some(if after.is_empty() {
        Fill::Append(filled)
    } else {
        Fill::Replace {
            args: filled,
            old: after.iter().map(String::as_str).collect(),
        }
    }))
}

/// Most containers the unpinned annotation names.
const MAX_UNPINNED_RECORDED: usize = 64;

/// Records the original images of the containers pinned now, and which
/// containers are admitted unpinned and why, in the pod's annotations.
/// Both merge with what an earlier pass recorded (reinvocation after another
/// webhook), and an unchanged record is not written again.
fn annotate(pod: &Pod, mutation: &mut Mutation) {
    let annotations = pod.metadata.as_ref().and_then(|m| m.annotations.as_ref());
    let recorded = |key: &str| -> Option<BTreeMap<String, String>> {
        annotations
            .and_then(|a| a.get(key))
            .and_then(|v| serde_json::from_str(v).ok())
    };
    let mut changes: Vec<(&str, Option<String>)> = Vec::new();

    if !mutation.pinned.is_empty() {
        let mut originals = recorded(ORIGINAL_IMAGES_ANNOTATION).unwrap_or_default();
        for (name, image) in &mutation.pinned {
            originals
                .entry(name.clone())
                .or_insert_with(|| image.clone());
        }
        changes.push((
            ORIGINAL_IMAGES_ANNOTATION,
            Some(serde_json::to_string(&originals).unwrap_or_default()),
        ));
    }

    let before = recorded(UNPINNED_ANNOTATION);
    let mut unpinned = before.clone().unwrap_or_default();
    // Containers resolved now (pinned or already pinned) are no longer unpinned.
    for_each_container(pod, |_, _, c| {
        if !mutation.unpinned.contains_key(&c.name) {
            unpinned.remove(&c.name);
        }
    });
    for (name, u) in &mutation.unpinned {
        unpinned.insert(name.clone(), u.reason.clone());
    }
    // Bounded, so that a pod of thousands of containers does not outgrow
    // the API server's limit on annotations.
    if unpinned.len() > MAX_UNPINNED_RECORDED {
        let more = unpinned.len() - MAX_UNPINNED_RECORDED;
        unpinned = unpinned.into_iter().take(MAX_UNPINNED_RECORDED).collect();
        unpinned.insert(
            "…".into(),
            format!("{more} more containers admitted unpinned"),
        );
    }
    if before.as_ref() != Some(&unpinned) {
        let raw_exists = annotations.is_some_and(|a| a.contains_key(UNPINNED_ANNOTATION));
        if !unpinned.is_empty() {
            changes.push((
                UNPINNED_ANNOTATION,
                Some(serde_json::to_string(&unpinned).unwrap_or_default()),
            ));
        } else if raw_exists {
            changes.push((UNPINNED_ANNOTATION, None));
        }
    }
    if changes.is_empty() {
        return;
    }
    // Found by fuzzing: a pod without metadata got a patch into
    // /metadata/annotations, which cannot apply.
    if annotations.is_none() {
        let set: serde_json::Map<String, Value> = changes
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), Value::String(v?))))
            .collect();
        if set.is_empty() {
            return;
        }
        if pod.metadata.is_none() {
            mutation
                .operations
                .push(add(&["metadata"], json!({ "annotations": set })));
        } else {
            mutation
                .operations
                .push(add(&["metadata", "annotations"], Value::Object(set)));
        }
        return;
    }
    for (key, value) in changes {
        mutation.operations.push(match value {
            Some(v) => add(&["metadata", "annotations", key], json!(v)),
            None => remove(&["metadata", "annotations", key]),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Digest, ImageInfo, ImageRef};

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const WRAPPER: &str = "docker.io/nephio/porch-wrapper-server:v4";
    const FUNCTION: &str = "gcr.io/kpt-fn/set-namespace:v0.4.1";
    const ENTRYPOINT: &str = "/usr/local/bin/function";

    /// What the admitter knows about one image.
    enum Row {
        Answer {
            image: String,
            reference: ImageRef,
            info: ImageInfo,
            secret: bool,
        },
        Failed(String, Failure),
    }

    fn answer(image: &str, entrypoint: &[&str], cmd: &[&str], secret: bool) -> Row {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Row::Answer {
            image: image.into(),
            reference: ImageRef::parse(image, "").expect("valid reference"),
            info: ImageInfo {
                digest: Digest::new(DIGEST),
                config_entrypoint: strings(entrypoint),
                cmd: strings(cmd),
                platform: None,
            },
            secret,
        }
    }

    fn failed(image: &str, kind: FailureKind) -> Row {
        Row::Failed(
            image.into(),
            Failure {
                kind,
                message: format!("{image}: {}", kind.as_str()),
                needs_pull_secret: false,
            },
        )
    }

    /// `rows` as the admitter's lookup; an image with no row is skipped.
    fn lookup<'t>(rows: &'t [Row]) -> impl Fn(&str) -> Option<Resolved<'t>> + 't {
        move |image: &str| {
            rows.iter()
                .find_map(|row| match row {
                    Row::Answer {
                        image: i,
                        reference,
                        info,
                        secret,
                    } if i == image => {
                        Some(Resolved::Answer(ImageAnswer::new(reference, info, *secret)))
                    }
                    Row::Failed(i, failure) if i == image => Some(Resolved::Failed(failure)),
                    _ => None,
                })
                .or(Some(Resolved::Skipped {
                    needs_pull_secret: false,
                }))
        }
    }

    fn open() -> Options<'static> {
        Options {
            failure_mode: FailureMode::Open,
            pin_function_image: true,
            pull_secret: Some(PullSecret {
                name: "auth-secret",
                exists: true,
            }),
        }
    }

    /// A function pod as Porch makes it (PORCH.md): the wrapper-server init
    /// container, the function container with its entrypoint after `--`.
    fn porch_pod(args_after_separator: &[&str]) -> Value {
        let mut args = vec!["--port", "9446", "--max-request-body-size", "6291456", "--"];
        args.extend_from_slice(args_after_separator);
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "set-namespace-v041-0-11111111-",
                "namespace": "porch-fn-system",
                "labels": {"fn.kpt.dev/image": "set-namespace-v041-0-11111111"},
                "annotations": {"fn.kpt.dev/template-version": "1", "cluster-autoscaler.kubernetes.io/safe-to-evict": "true"}
            },
            "spec": {
                "initContainers": [{
                    "name": "copy-wrapper-server",
                    "image": WRAPPER,
                    "command": ["cp", "-a", "/home/nonroot/wrapper-server/.", "/wrapper-server-tools"],
                    "volumeMounts": [{"name": "wrapper-server-tools", "mountPath": "/wrapper-server-tools"}]
                }],
                "containers": [{
                    "name": "function",
                    "image": FUNCTION,
                    "command": ["/wrapper-server-tools/wrapper-server"],
                    "args": args,
                    "readinessProbe": {"exec": {"command": ["/wrapper-server-tools/grpc-health-probe", "-addr", "localhost:9446"]}},
                    "livenessProbe": {"exec": {"command": ["/wrapper-server-tools/grpc-health-probe", "-addr", "localhost:9446"]}}
                }],
                "volumes": [{"name": "wrapper-server-tools", "emptyDir": {}}]
            }
        })
    }

    fn pod(value: &Value) -> Pod {
        serde_json::from_value(value.clone()).expect("pod")
    }

    fn apply(value: &Value, m: &Mutation) -> Value {
        let mut doc = value.clone();
        json_patch::patch(&mut doc, &m.operations).expect("patch applies");
        doc
    }

    fn pinned(image: &str) -> String {
        format!("{image}@{DIGEST}")
    }

    fn annotation(pod: &Value, key: &str) -> Option<Value> {
        pod["metadata"]["annotations"][key]
            .as_str()
            .map(|v| serde_json::from_str(v).expect("JSON annotation"))
    }

    /// Rows for the pinned images, as a second pass (reinvocation) sees them.
    fn second_pass_rows() -> Vec<Row> {
        vec![answer(&pinned(FUNCTION), &[ENTRYPOINT], &[], false)]
    }

    #[test]
    fn a_porch_pod_is_pinned_its_args_untouched_and_a_second_pass_changes_nothing() {
        let value = porch_pod(&[ENTRYPOINT]);
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            answer(FUNCTION, &[ENTRYPOINT], &[], false),
        ];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        assert!(
            !m.operations
                .iter()
                .any(|op| op.path().to_string().ends_with("/args")),
            "args untouched: {:?}",
            m.operations
        );
        let out = apply(&value, &m);
        assert_eq!(out["spec"]["containers"][0]["image"], pinned(FUNCTION));
        assert_eq!(out["spec"]["initContainers"][0]["image"], pinned(WRAPPER));
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            value["spec"]["containers"][0]["args"]
        );
        assert_eq!(
            annotation(&out, ORIGINAL_IMAGES_ANNOTATION),
            Some(json!({"copy-wrapper-server": WRAPPER, "function": FUNCTION}))
        );
        assert!(m.warnings.is_empty() && m.unpinned.is_empty());
        assert!(out["spec"].get("imagePullSecrets").is_none());

        let again = plan(&pod(&out), &lookup(&second_pass_rows()), &open()).expect("admitted");
        assert!(again.operations.is_empty(), "{:?}", again.operations);
    }

    #[test]
    fn a_trailing_separator_gets_the_entrypoint_appended() {
        let value = porch_pod(&[]);
        let rows = [answer(FUNCTION, &[], &["/bin/fn", "--serve"], false)];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        let out = apply(&value, &m);
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            json!([
                "--port",
                "9446",
                "--max-request-body-size",
                "6291456",
                "--",
                "/bin/fn",
                "--serve"
            ])
        );
        assert_eq!(m.entrypoints_replaced, 0);
        assert!(m.warnings.is_empty());
        let rows = [answer(
            &pinned(FUNCTION),
            &[],
            &["/bin/fn", "--serve"],
            false,
        )];
        let again = plan(&pod(&out), &lookup(&rows), &open()).expect("admitted");
        assert!(again.operations.is_empty(), "{:?}", again.operations);
    }

    #[test]
    fn another_entrypoint_after_the_separator_is_replaced_with_a_warning() {
        // Porch wrote the entrypoint of the tag's old digest.
        let value = porch_pod(&["/old/function", "--flag"]);
        let rows = [answer(FUNCTION, &[ENTRYPOINT], &[], false)];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        let out = apply(&value, &m);
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            json!([
                "--port",
                "9446",
                "--max-request-body-size",
                "6291456",
                "--",
                ENTRYPOINT
            ])
        );
        assert_eq!(m.entrypoints_replaced, 1);
        let warning = m.warnings.join("\n");
        assert!(
            warning.contains("\"function\"")
                && warning.contains("/old/function")
                && warning.contains(ENTRYPOINT),
            "{warning}"
        );
    }

    #[test]
    fn containers_without_a_command_are_pinned_only() {
        let mut value = porch_pod(&[ENTRYPOINT]);
        value["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "sidecar", "image": "busybox"}));
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            answer(FUNCTION, &[ENTRYPOINT], &[], false),
            answer("busybox", &["/bin/sh"], &["-c", "sleep 1"], false),
        ];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        let out = apply(&value, &m);
        let sidecar = &out["spec"]["containers"][1];
        assert_eq!(
            sidecar["image"],
            "docker.io/library/busybox:latest@".to_string() + DIGEST
        );
        assert!(sidecar.get("command").is_none() && sidecar.get("args").is_none());
    }

    #[test]
    fn an_image_with_neither_entrypoint_nor_cmd_where_one_is_needed_is_denied() {
        for args in [&[][..], &["/old"][..]] {
            let value = porch_pod(args);
            let rows = [answer(FUNCTION, &[], &[], false)];
            let err = plan(&pod(&value), &lookup(&rows), &open()).expect_err("nothing to run");
            assert!(matches!(err, Denial::NoEntrypoint { .. }), "{err}");
            assert!(err.to_string().contains(FUNCTION), "{err}");
        }
    }

    #[test]
    fn in_open_mode_only_a_function_image_that_cannot_run_denies() {
        use ErrorKind::*;
        let resolve = FailureKind::Resolve;
        // (after "--", kind) → denied?
        let cases = [
            (&[ENTRYPOINT][..], resolve(NotFound), true),
            (&[ENTRYPOINT][..], resolve(InvalidReference), true),
            (&[ENTRYPOINT][..], resolve(PlatformNotFound), true),
            (&[ENTRYPOINT][..], resolve(Unauthorized), false),
            (&[][..], resolve(Unauthorized), true),
            (&[ENTRYPOINT][..], resolve(Timeout), false),
            (&[][..], resolve(RegistryError), false),
            (&[][..], FailureKind::Deadline, false),
            (&[][..], FailureKind::Internal, false),
        ];
        for (after, kind, denied) in cases {
            let value = porch_pod(after);
            let rows = [
                answer(WRAPPER, &["/bin/sh"], &[], false),
                failed(FUNCTION, kind),
            ];
            let result = plan(&pod(&value), &lookup(&rows), &open());
            assert_eq!(result.is_err(), denied, "{after:?} {kind:?}: {result:?}");
            let Ok(m) = result else { continue };
            let out = apply(&value, &m);
            assert_eq!(
                out["spec"]["containers"][0]["image"], FUNCTION,
                "as written"
            );
            assert_eq!(out["spec"]["initContainers"][0]["image"], pinned(WRAPPER));
            assert_eq!(
                annotation(&out, UNPINNED_ANNOTATION),
                Some(json!({"function": format!("{FUNCTION}: {}", kind.as_str())}))
            );
            assert!(
                m.warnings
                    .iter()
                    .any(|w| w.contains("\"function\"") && w.contains(FUNCTION))
            );
        }
    }

    #[test]
    fn an_unreadable_wrapper_image_never_denies_in_open_mode_and_always_in_closed() {
        let value = porch_pod(&[ENTRYPOINT]);
        for kind in [
            ErrorKind::Unauthorized,
            ErrorKind::NotFound,
            ErrorKind::Timeout,
        ] {
            let rows = [
                failed(WRAPPER, FailureKind::Resolve(kind)),
                answer(FUNCTION, &[ENTRYPOINT], &[], false),
            ];
            let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
            let out = apply(&value, &m);
            assert_eq!(out["spec"]["initContainers"][0]["image"], WRAPPER);
            assert_eq!(out["spec"]["containers"][0]["image"], pinned(FUNCTION));
            assert_eq!(m.unpinned.len(), 1);
            assert!(annotation(&out, UNPINNED_ANNOTATION).is_some());
            assert_eq!(
                annotation(&out, ORIGINAL_IMAGES_ANNOTATION),
                Some(json!({"function": FUNCTION}))
            );

            let closed = Options {
                failure_mode: FailureMode::Closed,
                ..open()
            };
            let err = plan(&pod(&value), &lookup(&rows), &closed).expect_err("closed");
            assert!(matches!(err, Denial::Unpinnable { .. }), "{err}");
        }
    }

    #[test]
    fn a_later_pass_that_pins_the_image_drops_it_from_the_unpinned_record() {
        let value = porch_pod(&[ENTRYPOINT]);
        let rows = [
            failed(WRAPPER, FailureKind::Deadline),
            answer(FUNCTION, &[ENTRYPOINT], &[], false),
        ];
        let first = apply(
            &value,
            &plan(&pod(&value), &lookup(&rows), &open()).expect("ok"),
        );
        // Still failing: the record is unchanged, nothing to write.
        let rows = [
            failed(WRAPPER, FailureKind::Deadline),
            answer(&pinned(FUNCTION), &[ENTRYPOINT], &[], false),
        ];
        let same = plan(&pod(&first), &lookup(&rows), &open()).expect("ok");
        assert!(same.operations.is_empty(), "{:?}", same.operations);
        // Resolved now: pinned, and no longer recorded as unpinned.
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            answer(&pinned(FUNCTION), &[ENTRYPOINT], &[], false),
        ];
        let m = plan(&pod(&first), &lookup(&rows), &open()).expect("ok");
        let out = apply(&first, &m);
        assert_eq!(out["spec"]["initContainers"][0]["image"], pinned(WRAPPER));
        assert!(
            out["metadata"]["annotations"]
                .get(UNPINNED_ANNOTATION)
                .is_none()
        );
        assert_eq!(
            annotation(&out, ORIGINAL_IMAGES_ANNOTATION),
            Some(json!({"copy-wrapper-server": WRAPPER, "function": FUNCTION}))
        );
    }

    #[test]
    fn the_function_image_can_be_left_as_written_with_its_entrypoint_still_checked() {
        let value = porch_pod(&["/old"]);
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            answer(FUNCTION, &[ENTRYPOINT], &[], false),
        ];
        let options = Options {
            pin_function_image: false,
            ..open()
        };
        let m = plan(&pod(&value), &lookup(&rows), &options).expect("admitted");
        let out = apply(&value, &m);
        assert_eq!(out["spec"]["containers"][0]["image"], FUNCTION);
        assert_eq!(out["spec"]["initContainers"][0]["image"], pinned(WRAPPER));
        assert_eq!(
            out["spec"]["containers"][0]["args"]
                .as_array()
                .and_then(|a| a.last()),
            Some(&json!(ENTRYPOINT))
        );
        assert_eq!(m.entrypoints_replaced, 1);
        let again = plan(&pod(&out), &lookup(&rows), &options).expect("admitted");
        assert!(again.operations.is_empty(), "{:?}", again.operations);
    }

    #[test]
    fn the_pull_secret_is_added_only_once_it_exists() {
        let value = porch_pod(&[ENTRYPOINT]);
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            answer(FUNCTION, &[ENTRYPOINT], &[], true),
        ];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        assert!(m.pull_secret_added);
        let out = apply(&value, &m);
        assert_eq!(
            out["spec"]["imagePullSecrets"],
            json!([{"name": "auth-secret"}])
        );

        let missing = Options {
            pull_secret: Some(PullSecret {
                name: "auth-secret",
                exists: false,
            }),
            ..open()
        };
        let m = plan(&pod(&value), &lookup(&rows), &missing).expect("admitted");
        assert!(!m.pull_secret_added);
        assert!(
            m.warnings.iter().any(|w| w.contains("auth-secret")),
            "{:?}",
            m.warnings
        );
        assert!(apply(&value, &m)["spec"].get("imagePullSecrets").is_none());
        let closed = Options {
            failure_mode: FailureMode::Closed,
            ..missing
        };
        assert!(matches!(
            plan(&pod(&value), &lookup(&rows), &closed),
            Err(Denial::PullSecretMissing { .. })
        ));

        // Porch's own entry is kept as it is.
        let mut with_entry = value.clone();
        with_entry["spec"]["imagePullSecrets"] = json!([{"name": "auth-secret"}]);
        let m = plan(&pod(&with_entry), &lookup(&rows), &missing).expect("admitted");
        assert!(!m.pull_secret_added && m.warnings.is_empty());
        assert!(
            !m.operations
                .iter()
                .any(|op| op.path().to_string().contains("imagePullSecrets"))
        );

        // An image that could not be resolved still needs the secret to be pulled.
        let rows = [
            answer(WRAPPER, &["/bin/sh"], &[], false),
            Row::Failed(
                FUNCTION.into(),
                Failure {
                    kind: FailureKind::Deadline,
                    message: "slow".into(),
                    needs_pull_secret: true,
                },
            ),
        ];
        let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
        assert!(m.pull_secret_added);
    }

    #[test]
    fn only_the_function_image_is_resolved_when_already_pinned() {
        let mut value = porch_pod(&[ENTRYPOINT]);
        value["spec"]["initContainers"][0]["image"] = json!(pinned(WRAPPER));
        value["spec"]["containers"][0]["image"] = json!(pinned(FUNCTION));
        value["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "sidecar", "image": "busybox", "args": ["a", "--", "b"]}));
        let pod = pod(&value);
        assert_eq!(
            images_to_resolve(&pod),
            vec![pinned(FUNCTION), "busybox".into()]
        );
        assert_eq!(
            pod.function_container(),
            Some(0),
            "the first with a separator"
        );
    }

    #[test]
    fn a_pod_without_metadata_gets_a_patch_that_applies() {
        for value in [
            json!({"spec": {"containers": [{"name": "f", "image": "r.example.com/x:1"}]}}),
            json!({"metadata": null, "spec": {"containers": [{"name": "f", "image": "r.example.com/x:1"}]}}),
        ] {
            let rows = [answer("r.example.com/x:1", &["/x"], &[], false)];
            let m = plan(&pod(&value), &lookup(&rows), &open()).expect("admitted");
            let out = apply(&value, &m);
            assert!(annotation(&out, ORIGINAL_IMAGES_ANNOTATION).is_some());
        }
    }

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        assert_eq!(clip("ééé", 2), "éé…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("", 0), "");
        // Every cut point of text mixing 1- to 4-byte characters.
        let text = "aé€😀".repeat(20);
        for max in 0..=text.chars().count() + 1 {
            let cut = clip(&text, max);
            let kept = cut.strip_suffix('…').unwrap_or(&cut);
            assert_eq!(kept.chars().count(), max.min(80));
            assert!(text.starts_with(kept));
        }
    }
}
