//! How fast the pull-secret mirror reacts, against a real kube-apiserver:
//! time from a kubelet-style swap of the mounted Docker config to the target
//! Secret holding the new bytes, and from deleting the target to it being
//! back. Repeated ROUNDS times each; percentiles printed.
//!
//!     cargo bench --bench secret_mirror
//!
//! Needs the test control plane (tests/k8s/build.sh builds it on first use).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::k8s::{kubelet_swap, wait_for_secret_data};
use fn_image_resolver::metrics::Metrics;
use fn_image_resolver::secrets::{MirrorSettings, MirrorStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};

const ROUNDS: usize = 30;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name}: {} rounds; p50 {:?} p90 {:?} max {:?}",
        samples.len(),
        p(0.5),
        p(0.9),
        samples[samples.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::init_crypto();
    let plane = common::k8s::ControlPlane::start();
    plane.create_namespace("porch-fn-system").await;
    let client = plane.admin().await;

    let mount = tempfile::tempdir().expect("mount");
    let write = |generation: usize| {
        let content = format!(
            r#"{{"auths":{{"r.example.com":{{"username":"u","password":"p{generation}"}}}}}}"#
        );
        kubelet_swap(mount.path(), content.as_bytes(), generation);
        content.into_bytes()
    };
    let first = write(0);
    let path = mount.path().join(".dockerconfigjson");
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(fn_image_resolver::secrets::run(
        client.clone(),
        MirrorSettings {
            source: path,
            name: "auth-secret".into(),
            namespace: "porch-fn-system".into(),
            resync: Duration::from_secs(300),
        },
        Arc::new(MirrorStatus::default()),
        Metrics::new(),
        None,
        shutdown.clone(),
    ));
    let secrets: Api<Secret> = Api::namespaced(client, "porch-fn-system");
    wait_for_secret_data(&secrets, "auth-secret", &first).await;

    let mut swaps = Vec::new();
    let mut recreations = Vec::new();
    for round in 1..=ROUNDS {
        let want = write(round);
        swaps.push(wait_for_secret_data(&secrets, "auth-secret", &want).await);
        secrets
            .delete("auth-secret", &DeleteParams::default())
            .await
            .expect("delete");
        recreations.push(wait_for_secret_data(&secrets, "auth-secret", &want).await);
    }
    shutdown.cancel();
    report("source swapped -> target updated", swaps);
    report("target deleted -> target recreated", recreations);
}
