//! Differential test against go-containerregistry's `crane`, the library the
//! Porch function runner resolves with, over the image shapes the tests
//! build: for each shape and platform, which image each side hands out (or
//! that it refuses), and the digest each pins. Where they differ, the table
//! says why; our side follows containerd, which decides what the node runs.
//! A change on either side (ours, or a crane upgrade in tests/crane/build.sh)
//! fails this test until the table and docs/resolution.md ("Where other
//! tools choose otherwise") are brought up to date.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::common::built_tool;
use crate::common::oci::{Child, Image, Index, Pusher, image, image_with_config, index_of, sha256};
use crate::{PlainEnv, resolver};

/// crane: $FNIR_CRANE, else whatever tests/crane/build.sh installs or finds
/// in its cache (the first run on a machine takes seconds, from the Go module
/// proxy).
fn crane_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_tool("FNIR_CRANE", "tests/crane/build.sh"))
        .clone()
}

/// Runs crane with `args`; its stdout, or `None` when it refuses.
async fn crane(docker_config: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = tokio::process::Command::new(crane_bin())
        .arg("--insecure")
        .args(args)
        // No credentials of the machine's user: the registry is anonymous.
        .env("DOCKER_CONFIG", docker_config)
        .output()
        .await
        .expect("run crane");
    out.status.success().then_some(out.stdout)
}

/// A config for `os/arch` (as written, not normalized) whose entrypoint
/// names the image, so either side's choice can be told apart.
fn config(label: &str, os: &str, arch: &str) -> Value {
    json!({"os": os, "architecture": arch, "config": {"Entrypoint": [format!("/{label}")]},
           "rootfs": {"type": "layers", "diff_ids": []}})
}

fn labelled(label: &str, os: &str, arch: &str) -> Image {
    image_with_config(label, config(label, os, arch), false)
}

fn with_platform(image: Image, platform: Value) -> Child {
    Child::image_as(image, Some(platform))
}

/// The label of the image one side handed out, found by `key`; `!` when it
/// refused (crane's reasons are its own prose: only ours are named).
fn label_of(labels: &HashMap<String, &'static str>, key: Option<String>) -> String {
    match key {
        Some(key) => labels
            .get(&key)
            .map(|l| l.to_string())
            .unwrap_or_else(|| format!("unknown image {key}")),
        None => "!".into(),
    }
}

/// The shapes, each pushed as `fns/<shape>:v1`, with the platforms asked for
/// and what each side is expected to answer: (ours, crane, why they differ).
struct Row {
    shape: &'static str,
    platform: &'static str,
    ours: &'static str,
    crane: &'static str,
    why: &'static str,
}

const fn row(
    shape: &'static str,
    platform: &'static str,
    ours: &'static str,
    crane: &'static str,
    why: &'static str,
) -> Row {
    Row {
        shape,
        platform,
        ours,
        crane,
        why,
    }
}

const SAME: &str = "";

const EXPECTED: &[Row] = &[
    row("single", "linux/amd64", "single", "single", SAME),
    // A lone image is not checked against the platform by either side (the
    // webhook reports the config's platform; the kubelet pulls it anyway).
    row("single", "linux/arm64", "single", "single", SAME),
    row(
        "docker-single",
        "linux/amd64",
        "docker-single",
        "docker-single",
        SAME,
    ),
    row("index", "linux/amd64", "index-amd", "index-amd", SAME),
    row("index", "linux/arm64", "index-arm", "index-arm", SAME),
    row(
        "index",
        "linux/arm64/v8",
        "index-arm",
        "!",
        "ggcr compares variants literally: an entry without one does not match v8; containerd normalizes arm64/v8 to arm64",
    ),
    row("docker-list", "linux/amd64", "list-amd", "list-amd", SAME),
    row("docker-list", "linux/arm64", "list-arm", "list-arm", SAME),
    row(
        "buildkit",
        "linux/amd64",
        "buildkit-amd",
        "buildkit-amd",
        SAME,
    ),
    row("buildkit", "linux/arm64", "!platform-not-found", "!", SAME),
    row("arm64-v8", "linux/arm64", "arm-v8", "arm-v8", SAME),
    row("arm64-v8", "linux/arm64/v8", "arm-v8", "arm-v8", SAME),
    row(
        "aarch64",
        "linux/arm64",
        "aarch64",
        "!",
        "containerd normalizes aarch64 to arm64; ggcr compares names literally",
    ),
    row(
        "platformless",
        "linux/amd64",
        "!platform-not-found",
        "platformless-arm",
        "ggcr takes an entry without a platform for linux/amd64 and hands out an arm64 image; containerd checks its config and finds arm64",
    ),
    row(
        "platformless",
        "linux/arm64",
        "platformless-arm",
        "!",
        "ggcr takes an entry without a platform for linux/amd64 only; containerd takes it for any platform its config matches",
    ),
    row(
        "platformless-last",
        "linux/amd64",
        "mixed-amd",
        "mixed-arm",
        "containerd puts entries without a platform after the matching ones; ggcr takes the first in index order, assuming linux/amd64",
    ),
    row(
        "platformless-last",
        "linux/arm64",
        "mixed-arm",
        "!",
        "ggcr takes an entry without a platform for linux/amd64 only",
    ),
    row("nested", "linux/amd64", "nested-amd", "nested-amd", SAME),
    row(
        "nested",
        "linux/arm64",
        "nested-arm",
        "!",
        "a nested index without a platform: containerd descends for any platform, ggcr for linux/amd64 only",
    ),
    row(
        "nested-5",
        "linux/amd64",
        "!unsupported-image",
        "nested-amd",
        "we descend at most 4 levels; ggcr has no limit",
    ),
    row(
        "lower-keys",
        "linux/amd64",
        "lower-keys",
        "lower-keys",
        SAME,
    ),
    row(
        "nul-argument",
        "linux/amd64",
        "!unsupported-image",
        "nul-argument",
        "an argument holding a NUL cannot be passed to exec; ggcr does not look",
    ),
    row(
        "upper-case-digest",
        "linux/amd64",
        "!invalid-reference",
        "!",
        SAME,
    ),
];

/// The image shapes of the comparison, each pushed as `fns/<shape>:v1`,
/// and every image in them with its label (its entrypoint is `/<label>`).
pub(crate) struct Shapes {
    pub images: Vec<(&'static str, Image)>,
    pub shapes: Vec<(&'static str, Result<Image, Index>)>,
}

impl Shapes {
    /// Pushes every shape to `repo_prefix/<shape>:v1`; the digest each pins.
    pub async fn push(&self, pusher: &Pusher, repo_prefix: &str) -> HashMap<&'static str, String> {
        let mut pinned = HashMap::new();
        for (shape, target) in &self.shapes {
            let repo = format!("{repo_prefix}/{shape}");
            match target {
                Ok(image) => pusher.image(&repo, "v1", image).await,
                Err(index) => pusher.index(&repo, "v1", index).await,
            }
            let digest = match target {
                Ok(image) => image.digest.clone(),
                Err(index) => index.digest.clone(),
            };
            pinned.insert(*shape, digest);
        }
        pinned
    }

    /// Labels by entrypoint (what our resolver hands out).
    pub fn by_entrypoint(&self) -> HashMap<String, &'static str> {
        self.images
            .iter()
            .map(|(label, _)| (format!("/{label}"), *label))
            .collect()
    }

    /// Labels by config digest (what crane prints, what containerd fetches).
    pub fn by_config(&self) -> HashMap<String, &'static str> {
        self.images
            .iter()
            .map(|(label, image)| (image.config.digest.clone(), *label))
            .collect()
    }
}

/// The shapes: single images, OCI and Docker indexes, BuildKit's
/// attestations, variants, platformless entries, nested indexes.
pub(crate) fn shapes() -> Shapes {
    // Every image is labelled by its entrypoint (ours) and its config digest
    // (crane prints the config it chose).
    let mut images: Vec<(&'static str, Image)> = Vec::new();
    let mut remember = |label: &'static str, image: Image| {
        images.push((label, image.clone()));
        image
    };
    let amd = json!({"os": "linux", "architecture": "amd64"});
    let arm = json!({"os": "linux", "architecture": "arm64"});

    let mut shapes: Vec<(&'static str, Result<Image, Index>)> = vec![
        (
            "single",
            Ok(remember("single", labelled("single", "linux", "amd64"))),
        ),
        (
            "docker-single",
            Ok(remember(
                "docker-single",
                image(
                    "docker-single",
                    Some(&["/docker-single"]),
                    None,
                    "linux/amd64",
                    true,
                ),
            )),
        ),
        (
            "lower-keys",
            Ok(remember(
                "lower-keys",
                image_with_config(
                    "lower-keys",
                    json!({"os": "linux", "architecture": "amd64",
                           "config": {"entrypoint": ["/lower-keys"]},
                           "rootfs": {"type": "layers", "diff_ids": []}}),
                    false,
                ),
            )),
        ),
        (
            "nul-argument",
            Ok(remember(
                "nul-argument",
                image_with_config(
                    "nul-argument",
                    json!({"os": "linux", "architecture": "amd64",
                           "config": {"Entrypoint": ["/nul-argument", "a\u{0}b"]},
                           "rootfs": {"type": "layers", "diff_ids": []}}),
                    false,
                ),
            )),
        ),
    ];
    let index = index_of(
        vec![
            Child::image(remember(
                "index-amd",
                labelled("index-amd", "linux", "amd64"),
            )),
            Child::image(remember(
                "index-arm",
                labelled("index-arm", "linux", "arm64"),
            )),
        ],
        false,
    );
    shapes.push(("index", Err(index)));
    let list = crate::common::oci::index(
        vec![
            remember(
                "list-amd",
                image("list-amd", Some(&["/list-amd"]), None, "linux/amd64", true),
            ),
            remember(
                "list-arm",
                image("list-arm", Some(&["/list-arm"]), None, "linux/arm64", true),
            ),
        ],
        true,
    );
    shapes.push(("docker-list", Err(list)));
    let bk_amd = remember("buildkit-amd", labelled("buildkit-amd", "linux", "amd64"));
    let mut attestation = with_platform(
        remember(
            "buildkit-attestation",
            labelled("buildkit-attestation", "unknown", "unknown"),
        ),
        json!({"os": "unknown", "architecture": "unknown"}),
    );
    attestation.annotations = Some(json!({
        "vnd.docker.reference.digest": bk_amd.digest,
        "vnd.docker.reference.type": "attestation-manifest"
    }));
    shapes.push((
        "buildkit",
        Err(index_of(vec![Child::image(bk_amd), attestation], false)),
    ));
    shapes.push((
        "arm64-v8",
        Err(index_of(
            vec![with_platform(
                remember("arm-v8", labelled("arm-v8", "linux", "arm64")),
                json!({"os": "linux", "architecture": "arm64", "variant": "v8"}),
            )],
            false,
        )),
    ));
    shapes.push((
        "aarch64",
        Err(index_of(
            vec![with_platform(
                remember("aarch64", labelled("aarch64", "linux", "aarch64")),
                json!({"os": "linux", "architecture": "aarch64"}),
            )],
            false,
        )),
    ));
    shapes.push((
        "platformless",
        Err(index_of(
            vec![
                Child::image_as(
                    remember(
                        "platformless-arm",
                        labelled("platformless-arm", "linux", "arm64"),
                    ),
                    None,
                ),
                Child::image_as(
                    remember(
                        "platformless-amd",
                        labelled("platformless-amd", "linux", "amd64"),
                    ),
                    None,
                ),
            ],
            false,
        )),
    ));
    shapes.push((
        "platformless-last",
        Err(index_of(
            vec![
                Child::image_as(
                    remember("mixed-arm", labelled("mixed-arm", "linux", "arm64")),
                    None,
                ),
                with_platform(
                    remember("mixed-amd", labelled("mixed-amd", "linux", "amd64")),
                    amd.clone(),
                ),
            ],
            false,
        )),
    ));
    let inner = index_of(
        vec![
            with_platform(
                remember("nested-amd", labelled("nested-amd", "linux", "amd64")),
                amd,
            ),
            with_platform(
                remember("nested-arm", labelled("nested-arm", "linux", "arm64")),
                arm,
            ),
        ],
        false,
    );
    let nested = index_of(vec![Child::index(inner.clone(), None)], false);
    let mut five = inner;
    for _ in 0..5 {
        five = index_of(vec![Child::index(five, None)], false);
    }
    shapes.push(("nested", Err(nested)));
    shapes.push(("nested-5", Err(five)));

    Shapes { images, shapes }
}

#[tokio::test]
async fn where_we_and_go_containerregistry_differ_is_written_down() {
    let env = PlainEnv::start().await;
    let pusher = Pusher::new(env.registry.url(), reqwest::Client::new());
    let no_credentials = tempfile::tempdir().expect("tempdir");
    let built = shapes();
    let pinned = built.push(&pusher, "fns").await;
    // The same image named by a digest in upper-case hex.
    let single_digest = pinned["single"].clone();
    let upper_ref = format!(
        "{}@sha256:{}",
        env.image("fns/single"),
        single_digest.trim_start_matches("sha256:").to_uppercase()
    );

    let by_entrypoint = built.by_entrypoint();
    let by_config = built.by_config();

    let r = resolver(&env.settings());
    let mut actual = Vec::new();
    for expected in EXPECTED {
        let reference = if expected.shape == "upper-case-digest" {
            upper_ref.clone()
        } else {
            env.image(&format!("fns/{}:v1", expected.shape))
        };
        let platform = expected.platform.parse().expect("platform");
        let ours = r.resolve(&reference, Some(&platform)).await;
        let ours_label = match &ours {
            Ok(info) => label_of(&by_entrypoint, info.entrypoint.first().cloned()),
            Err(e) => format!("!{}", e.kind().as_str()),
        };
        let config = crane(
            no_credentials.path(),
            &["--platform", expected.platform, "config", &reference],
        )
        .await;
        let crane_label = label_of(&by_config, config.map(|c| sha256(&c)));
        actual.push(format!(
            "{} {}: ours {ours_label}, crane {crane_label}",
            expected.shape, expected.platform
        ));

        // Whatever is chosen, both pin the digest the tag names: the index's,
        // not the chosen image's.
        if let Ok(info) = &ours {
            assert_eq!(info.digest, pinned[expected.shape], "{}", expected.shape);
            let top = crane(no_credentials.path(), &["digest", &reference])
                .await
                .expect("crane digest");
            assert_eq!(
                String::from_utf8_lossy(&top).trim(),
                pinned[expected.shape],
                "crane's digest of {}",
                expected.shape
            );
        }
    }
    let changed: Vec<String> = EXPECTED
        .iter()
        .zip(&actual)
        .filter_map(|(e, got)| {
            let want = format!(
                "{} {}: ours {}, crane {}",
                e.shape, e.platform, e.ours, e.crane
            );
            (want != *got).then(|| format!("expected {want}\n     got {got}"))
        })
        .collect();
    assert!(
        changed.is_empty(),
        "a side changed: update the table and docs/resolution.md\n{}",
        changed.join("\n")
    );
    // A difference is always explained, an agreement never needs to be
    // (both refusing is agreeing: crane's reasons are not compared).
    for e in EXPECTED {
        let agree = e.ours == e.crane || (e.ours.starts_with('!') && e.crane.starts_with('!'));
        assert_eq!(
            !agree,
            !e.why.is_empty(),
            "{} {}: a difference needs its reason, an agreement none",
            e.shape,
            e.platform
        );
    }
}
