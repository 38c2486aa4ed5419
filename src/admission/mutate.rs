//! The mutation of one function pod, as JSON Patch operations: pin images,
//! fill entrypoints, inject the pull secret, record the original images.
//! Pure: given the pod and what each image resolved to, it decides.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::registry::ImageAnswer;

/// Annotation holding `{container name: original image}` for every container
/// whose image was pinned.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "fn-image-resolver.porch.kpt.dev/original-images";

/// The function runner's wrapper-server convention: arguments (or the command)
/// ending with this get the function's entrypoint appended.
pub const ENTRYPOINT_MARKER: &str = "--";

/// Why a pod cannot be admitted as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutationError {
    #[error(
        "container {container:?}: image {image} has neither Entrypoint nor Cmd in its config, so there is nothing to run after \"--\""
    )]
    NoEntrypointAfterMarker { container: String, image: String },
    #[error(
        "container {container:?} sets no command, and image {image} has neither Entrypoint nor Cmd in its config"
    )]
    NothingToRun { container: String, image: String },
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
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
    #[serde(default)]
    pub image_pull_secrets: Option<Vec<SecretRef>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SecretRef {
    #[serde(default)]
    pub name: String,
}

/// What was decided for a pod.
#[derive(Debug, Default)]
pub struct Mutation {
    pub operations: Vec<PatchOperation>,
    /// Container name → original image, for pinned containers.
    pub pinned: BTreeMap<String, String>,
    pub pull_secret_added: bool,
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// The strings of a pod's `args` or `command`.
fn strs(args: &[String]) -> impl Iterator<Item = &str> {
    args.iter().map(String::as_str)
}

/// Plans the patch for `pod`. `resolved` maps each image string found in the
/// pod to its resolution; images missing from it are left alone.
pub fn plan<'r>(
    pod: &Pod,
    resolved: &dyn Fn(&str) -> Option<ImageAnswer<'r>>,
    pull_secret: Option<&str>,
) -> Result<Mutation, MutationError> {
    let mut mutation = Mutation::default();
    let Some(spec) = &pod.spec else {
        return Ok(mutation);
    };
    let mut needs_secret = false;
    let groups: [(&str, &[Container]); 2] = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", &spec.containers),
    ];
    for (field, containers) in groups {
        for (i, container) in containers.iter().enumerate() {
            let Some(image) = container.image.as_deref().filter(|i| !i.is_empty()) else {
                continue;
            };
            let Some(resolution) = resolved(image) else {
                continue;
            };
            let index = i.to_string();
            let at = |leaf: &'static str| ["spec", field, index.as_str(), leaf];
            needs_secret |= resolution.needs_pull_secret;

            // Pin: a reference that already names a digest keeps it, as written.
            let pinned = (!image.contains('@'))
                .then(|| resolution.pinned())
                .filter(|pinned| image != pinned);
            if let Some(pinned) = pinned {
                mutation.operations.push(add(&at("image"), json!(pinned)));
                mutation
                    .pinned
                    .insert(container.name.clone(), image.to_string());
            }

            let args = container.args.as_deref().unwrap_or_default();
            let command = container.command.as_deref().unwrap_or_default();
            let entrypoint = resolution.entrypoint();
            let no_entrypoint = || MutationError::NoEntrypointAfterMarker {
                container: container.name.clone(),
                image: resolution.reference.to_string(),
            };
            if args.last().map(String::as_str) == Some(ENTRYPOINT_MARKER) {
                if entrypoint.is_empty() {
                    return Err(no_entrypoint());
                }
                let filled: Vec<&str> = strs(args).chain(entrypoint.iter()).collect();
                mutation.operations.push(add(&at("args"), json!(filled)));
                // Without a command the kubelet runs the image's Entrypoint
                // anyway; saying so keeps a second pass (reinvocation) from
                // reading the filled args as a container to make explicit.
                // Found by fuzzing the plan's idempotence.
                if command.is_empty() && !resolution.config_entrypoint.is_empty() {
                    mutation
                        .operations
                        .push(add(&at("command"), json!(resolution.config_entrypoint)));
                }
            } else if args.is_empty()
                && command.last().map(String::as_str) == Some(ENTRYPOINT_MARKER)
            {
                if entrypoint.is_empty() {
                    return Err(no_entrypoint());
                }
                let filled: Vec<&str> = strs(command).chain(entrypoint.iter()).collect();
                mutation.operations.push(add(&at("command"), json!(filled)));
            } else if command.is_empty() {
                // Make the image's own start explicit, as the kubelet would run it.
                if resolution.config_entrypoint.is_empty()
                    && resolution.cmd.is_empty()
                    && args.is_empty()
                {
                    return Err(MutationError::NothingToRun {
                        container: container.name.clone(),
                        image: resolution.reference.to_string(),
                    });
                }
                if !resolution.config_entrypoint.is_empty() {
                    mutation
                        .operations
                        .push(add(&at("command"), json!(resolution.config_entrypoint)));
                    if args.is_empty() && !resolution.cmd.is_empty() {
                        mutation
                            .operations
                            .push(add(&at("args"), json!(resolution.cmd)));
                    }
                }
            }
        }
    }

    if let Some(secret) = pull_secret.filter(|_| needs_secret) {
        let existing = spec.image_pull_secrets.as_deref().unwrap_or_default();
        if !existing.iter().any(|s| s.name == secret) {
            let entry = json!({ "name": secret });
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

    if !mutation.pinned.is_empty() {
        let annotations = pod.metadata.as_ref().and_then(|m| m.annotations.as_ref());
        // Keep what an earlier pass recorded (reinvocation after another webhook).
        let mut record: BTreeMap<String, String> = annotations
            .and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION))
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        for (name, image) in &mutation.pinned {
            record.entry(name.clone()).or_insert_with(|| image.clone());
        }
        let value = serde_json::to_string(&record).unwrap_or_default();
        // Found by fuzzing: a pod without metadata got a patch into
        // /metadata/annotations, which cannot apply.
        if pod.metadata.is_none() {
            mutation.operations.push(add(
                &["metadata"],
                json!({ "annotations": { ORIGINAL_IMAGES_ANNOTATION: value } }),
            ));
        } else if annotations.is_none() {
            mutation.operations.push(add(
                &["metadata", "annotations"],
                json!({ ORIGINAL_IMAGES_ANNOTATION: value }),
            ));
        } else {
            mutation.operations.push(add(
                &["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION],
                json!(value),
            ));
        }
    }
    Ok(mutation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Digest, ImageInfo, ImageRef};

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    /// What the cache would hold for one image.
    #[derive(Clone)]
    struct Row {
        image: String,
        reference: ImageRef,
        info: ImageInfo,
        secret: bool,
    }

    impl Row {
        fn pinned(&self) -> String {
            self.reference.pinned(&self.info.digest)
        }
    }

    fn row(reference: &str, entrypoint: &[&str], cmd: &[&str], secret: bool) -> Row {
        let boxed = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Row {
            image: reference.into(),
            reference: ImageRef::parse(reference, "").expect("valid reference"),
            info: ImageInfo {
                digest: Digest::new(DIGEST),
                config_entrypoint: boxed(entrypoint),
                cmd: boxed(cmd),
                platform: None,
            },
            secret,
        }
    }

    /// A Porch function pod: wrapper-server init container + function container.
    fn function_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "set-namespace-abc", "namespace": "porch-fn-system"},
            "spec": {
                "initContainers": [{
                    "name": "copy-wrapper-server",
                    "image": "r.example.com/porch/wrapper-server:v4",
                    "command": ["cp", "-a", "/wrapper-server/.", "/wrapper-server-tools"]
                }],
                "containers": [{
                    "name": "function",
                    "image": "r.example.com/fns/set-namespace:v0.4",
                    "command": ["/wrapper-server-tools/wrapper-server"],
                    "args": ["--port", "9446", "--max-request-body-size", "6291456", "--"]
                }]
            }
        })
    }

    fn lookup<'t>(table: &'t [Row]) -> impl Fn(&str) -> Option<ImageAnswer<'t>> + 't {
        move |image: &str| {
            table
                .iter()
                .find(|r| r.image == image)
                .map(|r| r.info.answer(r.reference.borrowed(), r.secret))
        }
    }

    fn apply(pod: &Value, m: &Mutation) -> Value {
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &m.operations).expect("patch applies");
        doc
    }

    #[test]
    fn function_pod_is_pinned_filled_and_given_the_secret_and_a_second_pass_changes_nothing() {
        let pod_json = function_pod();
        let rows = [
            row(
                "r.example.com/porch/wrapper-server:v4",
                &["/bin/sh"],
                &[],
                true,
            ),
            row(
                "r.example.com/fns/set-namespace:v0.4",
                &["/usr/local/bin/function"],
                &[],
                true,
            ),
        ];
        let table = lookup(&rows);
        let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
        let m = plan(&pod, &table, Some("auth-secret")).expect("admitted");
        let out = apply(&pod_json, &m);
        assert_eq!(
            out["spec"]["containers"][0]["image"],
            format!("r.example.com/fns/set-namespace:v0.4@{DIGEST}")
        );
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            json!([
                "--port",
                "9446",
                "--max-request-body-size",
                "6291456",
                "--",
                "/usr/local/bin/function"
            ])
        );
        assert_eq!(
            out["spec"]["initContainers"][0]["command"],
            json!(["cp", "-a", "/wrapper-server/.", "/wrapper-server-tools"]),
            "an explicit command is left alone"
        );
        assert_eq!(
            out["spec"]["imagePullSecrets"],
            json!([{"name": "auth-secret"}])
        );
        let record: Value = serde_json::from_str(
            out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
                .as_str()
                .expect("annotation"),
        )
        .expect("json");
        assert_eq!(
            record,
            json!({"copy-wrapper-server": "r.example.com/porch/wrapper-server:v4", "function": "r.example.com/fns/set-namespace:v0.4"})
        );

        // Idempotent: the patched pod (whose images are now pinned) needs nothing.
        let rows = [
            row(
                "r.example.com/porch/wrapper-server:v4",
                &["/bin/sh"],
                &[],
                true,
            ),
            row(
                "r.example.com/fns/set-namespace:v0.4",
                &["/usr/local/bin/function"],
                &[],
                true,
            ),
        ];
        let again: Pod = serde_json::from_value(out.clone()).expect("pod");
        // The second pass sees the pinned images.
        let pinned_rows: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                image: r.pinned(),
                ..r.clone()
            })
            .collect();
        let pinned_lookup = lookup(&pinned_rows);
        let m2 = plan(&again, &pinned_lookup, Some("auth-secret")).expect("admitted");
        assert!(m2.operations.is_empty(), "{:?}", m2.operations);
    }

    #[test]
    fn args_ending_with_the_marker_and_no_command_are_stable_on_a_second_pass() {
        let pod_json = json!({"metadata": {}, "spec": {"containers": [
            {"name": "f", "image": "r.example.com/x:1", "args": ["--port", "9446", "--"]}
        ]}});
        let rows = [row("r.example.com/x:1", &["/x"], &[], false)];
        let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
        let m = plan(&pod, &lookup(&rows), None).expect("admitted");
        let out = apply(&pod_json, &m);
        assert_eq!(out["spec"]["containers"][0]["command"], json!(["/x"]));
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            json!(["--port", "9446", "--", "/x"])
        );
        let pinned_rows: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                image: r.pinned(),
                ..r.clone()
            })
            .collect();
        let again: Pod = serde_json::from_value(out).expect("pod");
        let m2 = plan(&again, &lookup(&pinned_rows), None).expect("admitted");
        assert!(m2.operations.is_empty(), "{:?}", m2.operations);
    }

    #[test]
    fn a_pod_without_metadata_gets_a_patch_that_applies() {
        for pod_json in [
            json!({"spec": {"containers": [{"name": "f", "image": "r.example.com/x:1"}]}}),
            json!({"metadata": null, "spec": {"containers": [{"name": "f", "image": "r.example.com/x:1"}]}}),
        ] {
            let rows = [row("r.example.com/x:1", &["/x"], &[], false)];
            let table = lookup(&rows);
            let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
            let m = plan(&pod, &table, None).expect("admitted");
            let out = apply(&pod_json, &m);
            assert!(out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].is_string());
        }
    }

    #[test]
    fn a_container_without_command_gets_entrypoint_and_cmd() {
        let pod_json = json!({"metadata": {"annotations": {"a": "b"}}, "spec": {"containers": [
            {"name": "a", "image": "r.example.com/x:1"},
            {"name": "b", "image": "r.example.com/y:1", "args": ["--mine"]},
            {"name": "c", "image": "r.example.com/z:1"}
        ], "imagePullSecrets": [{"name": "other"}]}});
        let rows = [
            row("r.example.com/x:1", &["/x"], &["--default"], false),
            row("r.example.com/y:1", &["/y"], &["--default"], true),
            row("r.example.com/z:1", &[], &["/z", "run"], false),
        ];
        let table = lookup(&rows);
        let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
        let out = apply(
            &pod_json,
            &plan(&pod, &table, Some("auth-secret")).expect("admitted"),
        );
        let c = &out["spec"]["containers"];
        assert_eq!(
            (&c[0]["command"], &c[0]["args"]),
            (&json!(["/x"]), &json!(["--default"]))
        );
        assert_eq!(
            (&c[1]["command"], &c[1]["args"]),
            (&json!(["/y"]), &json!(["--mine"]))
        );
        assert_eq!(c[2].get("command"), None, "Cmd alone already runs as is");
        assert_eq!(
            out["spec"]["imagePullSecrets"],
            json!([{"name": "other"}, {"name": "auth-secret"}])
        );
        assert_eq!(out["metadata"]["annotations"]["a"], "b");
        assert!(out["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].is_string());
    }

    #[test]
    fn command_ending_with_the_marker_and_existing_secret() {
        let pod_json = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "f", "image": "r.example.com/fns/cmd-only:v1", "command": ["/w", "--"]}
        ], "imagePullSecrets": [{"name": "auth-secret"}]}});
        let rows = [row(
            "r.example.com/fns/cmd-only:v1",
            &[],
            &["/bin/fn", "--serve"],
            true,
        )];
        let table = lookup(&rows);
        let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
        let m = plan(&pod, &table, Some("auth-secret")).expect("admitted");
        assert!(!m.pull_secret_added);
        let out = apply(&pod_json, &m);
        assert_eq!(
            out["spec"]["containers"][0]["command"],
            json!(["/w", "--", "/bin/fn", "--serve"])
        );
        assert_eq!(
            out["spec"]["imagePullSecrets"],
            json!([{"name": "auth-secret"}])
        );
    }

    #[test]
    fn images_pinned_by_digest_keep_their_reference() {
        let image = format!("r.example.com/fns/x@{DIGEST}");
        let pod_json = json!({"metadata": {}, "spec": {"containers": [{"name": "f", "image": image, "args": ["--"]}]}});
        let mut r = row("r.example.com/fns/x", &["/fn"], &[], false);
        r.image = image.clone();
        let rows = [r];
        let table = lookup(&rows);
        let pod: Pod = serde_json::from_value(pod_json.clone()).expect("pod");
        let m = plan(&pod, &table, None).expect("admitted");
        let out = apply(&pod_json, &m);
        assert_eq!(out["spec"]["containers"][0]["image"], image.as_str());
        assert_eq!(out["spec"]["containers"][0]["args"], json!(["--", "/fn"]));
        assert!(m.pinned.is_empty() && out["metadata"].get("annotations").is_none());
    }

    #[test]
    fn nothing_to_run_is_an_error_naming_container_and_image() {
        let rows = [row("r.example.com/fns/empty:v1", &[], &[], false)];
        let table = lookup(&rows);
        for pod_json in [
            json!({"spec": {"containers": [{"name": "f", "image": "r.example.com/fns/empty:v1", "args": ["--"]}]}}),
            json!({"spec": {"containers": [{"name": "f", "image": "r.example.com/fns/empty:v1"}]}}),
        ] {
            let pod: Pod = serde_json::from_value(pod_json).expect("pod");
            let err = plan(&pod, &table, None)
                .expect_err("nothing to run")
                .to_string();
            assert!(
                err.contains("\"f\"") && err.contains("r.example.com/fns/empty:v1"),
                "{err}"
            );
        }
    }
}
