//! Resolving where the node pulls: containerd's registry host configuration
//! (`--registry-config-path`, `DIR/<host>/hosts.toml`) against real
//! registries. `ghcr.io` is unreachable here (no network): what answers is
//! the mirror its hosts.toml names.

use serde_json::json;

use fn_image_resolver::registry::{ErrorKind, ResolverSettings};

use crate::common::oci::{Image, Pusher, Samples, image, samples};
use crate::common::proxy::{Fault, Kind, Proxy};
use crate::common::registry::{Auth, Registry, tls_pair};
use crate::{basic_auth, docker_config, resolver, settings};

const USER: &str = "mirror-user";
const PASS: &str = "mirror-PASSWORD-marker";

/// A TLS registry with htpasswd Basic auth and the sample images: a
/// pull-through cache's stand-in.
struct Mirror {
    registry: Registry,
    ca: tempfile::TempDir,
    samples: Samples,
}

async fn mirror() -> Mirror {
    crate::common::init_crypto();
    let (ca, issued) = tls_pair("mirror CA");
    let registry = Registry::start(
        Some(&issued),
        Auth::Basic {
            user: USER.into(),
            pass: PASS.into(),
        },
    );
    let samples = samples();
    samples
        .push(
            &Pusher::new(registry.url(), crate::client_trusting(&ca.cert_pem())).basic(USER, PASS),
        )
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("ca.crt");
    Mirror {
        registry,
        ca: dir,
        samples,
    }
}

impl Mirror {
    fn ca_file(&self) -> String {
        self.ca.path().join("ca.crt").display().to_string()
    }

    async fn push(&self, repo: &str, tag: &str, image: &Image) {
        let ca = std::fs::read_to_string(self.ca.path().join("ca.crt")).expect("ca");
        Pusher::new(self.registry.url(), crate::client_trusting(&ca))
            .basic(USER, PASS)
            .image(repo, tag, image)
            .await;
    }
}

/// An image that says which host it came from.
fn marked(host: &str) -> Image {
    image(host, Some(&["/fn", host]), None, "linux/amd64", false)
}

/// A config_path holding `hosts.toml` for each `(registry, text)`.
fn config_path(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    for (registry, text) in files {
        let dir = root.path().join(registry);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("hosts.toml"), text).expect("hosts.toml");
    }
    root
}

fn with_hosts(root: &tempfile::TempDir) -> ResolverSettings {
    let mut s = settings();
    s.registry_config_path = Some(root.path().to_path_buf());
    s
}

/// `[host."https://MIRROR"]` with the mirror's CA and, when `header`, its
/// credentials in an Authorization header.
fn mirror_entry(m: &Mirror, capabilities: &str, header: bool) -> String {
    let mut text = format!(
        "[host.\"https://{}\"]\n  capabilities = {capabilities}\n  ca = \"{}\"\n",
        m.registry.host,
        m.ca_file()
    );
    if header {
        text.push_str(&format!(
            "  [host.\"https://{}\".header]\n    Authorization = \"Basic {}\"\n",
            m.registry.host,
            basic_auth(USER, PASS)
        ));
    }
    text
}

#[tokio::test]
async fn a_mirror_that_resolves_and_pulls_answers_for_an_unreachable_registry() {
    let m = mirror().await;
    let root = config_path(&[(
        "ghcr.io",
        &mirror_entry(&m, "[\"pull\", \"resolve\"]", true),
    )]);
    let (cache, metrics) = crate::cached(&with_hosts(&root), Default::default());
    let (got, _) = cache
        .resolve("ghcr.io/fns/set-namespace:v0.4", None)
        .await
        .expect("the mirror answers");
    assert_eq!(got.digest, m.samples.entrypoint.digest);
    assert_eq!(
        got.pinned,
        format!(
            "ghcr.io/fns/set-namespace:v0.4@{}",
            m.samples.entrypoint.digest
        )
    );
    assert_eq!(got.registry, "ghcr.io", "still the image's registry");
    // An index: the child and the config by digest, from the mirror too.
    let (multi, _) = cache
        .resolve("ghcr.io/fns/multi-arch:v1", None)
        .await
        .expect("the index through the mirror");
    assert_eq!(multi.digest, m.samples.multi.digest);
    // Metrics say which host answered.
    let text = crate::metrics_text_of(&metrics);
    assert!(
        text.contains(&format!("registry=\"{}\"", m.registry.host)),
        "{text}"
    );
    assert!(!text.contains("registry=\"ghcr.io\""), "{text}");
    assert!(!text.contains(PASS) && !text.contains(&basic_auth(USER, PASS)));

    // The CLI reads the same files.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"))
        .args(["resolve", "ghcr.io/fns/set-namespace:v0.4"])
        .arg(format!("--registry-config-path={}", root.path().display()))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(line["digest"], m.samples.entrypoint.digest.as_str());
}

#[tokio::test]
async fn a_pull_only_mirror_serves_digests_while_tags_are_resolved_upstream() {
    let m = mirror().await;
    let root = config_path(&[("ghcr.io", &mirror_entry(&m, "[\"pull\"]", true))]);
    let r = resolver(&with_hosts(&root));
    let err = r
        .resolve("ghcr.io/fns/set-namespace:v0.4", None)
        .await
        .expect_err("the tag goes upstream, which is unreachable");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    assert!(err.to_string().contains("ghcr.io"), "{err}");
    let pinned = format!("ghcr.io/fns/set-namespace@{}", m.samples.entrypoint.digest);
    let got = r
        .resolve(&pinned, None)
        .await
        .expect("the mirror serves digests");
    assert_eq!(got.digest, m.samples.entrypoint.digest);
    assert_eq!(got.entrypoint, ["/usr/local/bin/function"]);
}

#[tokio::test]
async fn hosts_are_tried_in_file_order_and_a_failing_one_moves_on_to_the_next() {
    let m = mirror().await;
    // First a plain-HTTP host (its hosts.toml entry is the opt-in: no
    // --insecure-registry), a proxy in front of a plain registry with the
    // same images, then the TLS mirror.
    let plain = crate::PlainEnv::start().await;
    let proxy: &Proxy = &plain.proxy;
    let text = format!(
        "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n{}",
        proxy.host,
        mirror_entry(&m, "[\"pull\", \"resolve\"]", true)
    );
    let root = config_path(&[("ghcr.io", &text)]);
    let (plain_image, mirror_image) = (marked("plain"), marked("mirror"));
    Pusher::new(plain.registry.url(), reqwest::Client::new())
        .image("fns/x", "v1", &plain_image)
        .await;
    m.push("fns/x", "v1", &mirror_image).await;
    let r = resolver(&with_hosts(&root));
    let got = r
        .resolve("ghcr.io/fns/x:v1", None)
        .await
        .expect("the first host answers");
    assert_eq!(got.digest, plain_image.digest, "the first host of the file");
    assert!(
        proxy.seen().iter().all(|s| s.query == "ns=ghcr.io"),
        "a mirror is told which registry it stands in for: {:?}",
        proxy.seen()
    );
    // It fails (500, then 404, then not at all): the next host answers.
    for fault in [
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        Fault::Status {
            code: 404,
            retry_after: None,
        },
    ] {
        proxy.set_fault(fault, Some(Kind::Manifest));
        let got = r
            .resolve("ghcr.io/fns/x:v1", None)
            .await
            .expect("the next host answers");
        assert_eq!(got.digest, mirror_image.digest);
    }
    proxy.set_fault(Fault::None, None);
    drop(plain);
    let got = r
        .resolve("ghcr.io/fns/x:v1", None)
        .await
        .expect("the next host answers");
    assert_eq!(got.digest, mirror_image.digest);
}

#[tokio::test]
async fn the_pods_credentials_go_to_the_hosts_that_ask_as_the_node_sends_them() {
    let m = mirror().await;
    // No header: the mirror challenges, and what answers is the Docker
    // config's credential for the image's registry, as containerd's CRI
    // answers with the pod's pull secret (the kubelet gives it no server
    // address to restrict it to).
    let root = config_path(&[(
        "ghcr.io",
        &mirror_entry(&m, "[\"pull\", \"resolve\"]", false),
    )]);
    let (_dir, config) =
        docker_config(&json!({"auths": {"ghcr.io": {"auth": basic_auth(USER, PASS)}}}));
    let mut s = with_hosts(&root);
    s.private_registries = true;
    s.docker_config_path = config;
    let got = resolver(&s)
        .resolve("ghcr.io/fns/set-namespace:v0.4", None)
        .await
        .expect("the credential answers the mirror's challenge");
    assert_eq!(got.digest, m.samples.entrypoint.digest);
    assert_eq!(
        got.pull_secret.as_deref(),
        Some("auth-secret"),
        "the pull secret is the image registry's"
    );
    // Without it (and without a header), the mirror refuses us.
    let err = resolver(&with_hosts(&root))
        .resolve("ghcr.io/fns/set-namespace:v0.4", None)
        .await
        .expect_err("anonymous");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    assert!(!err.to_string().contains(PASS));
}

#[tokio::test]
async fn a_changed_hosts_toml_is_read_again_without_a_restart() {
    let first = mirror().await;
    let second = crate::PlainEnv::start().await;
    let (one, two) = (marked("first"), marked("second"));
    first.push("fns/x", "v1", &one).await;
    Pusher::new(second.registry.url(), reqwest::Client::new())
        .image("fns/x", "v1", &two)
        .await;
    let root = config_path(&[(
        "ghcr.io",
        &mirror_entry(&first, "[\"pull\", \"resolve\"]", true),
    )]);
    let r = resolver(&with_hosts(&root));
    let got = r
        .resolve("ghcr.io/fns/x:v1", None)
        .await
        .expect("first mirror");
    assert_eq!(got.digest, one.digest);
    std::fs::write(
        root.path().join("ghcr.io/hosts.toml"),
        format!("server = \"http://{}\"\n", second.proxy.host),
    )
    .expect("rewrite");
    let got = r.resolve("ghcr.io/fns/x:v1", None).await.expect("second");
    assert_eq!(got.digest, two.digest, "the new file is read");
    // The directory removed: the registry itself again (unreachable here).
    std::fs::remove_dir_all(root.path().join("ghcr.io")).expect("rm");
    let err = r
        .resolve("ghcr.io/fns/x:v1", None)
        .await
        .expect_err("upstream");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
}
