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
use std::time::{Duration, Instant};

use fn_image_resolver::metrics::Metrics;
use fn_image_resolver::secrets::{MirrorSettings, MirrorStatus, SECRET_KEY};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

const ROUNDS: usize = 30;

async fn until(api: &Api<Secret>, want: &[u8]) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(Some(s)) = api.get_opt("auth-secret").await
            && s.data
                .as_ref()
                .and_then(|d| d.get(SECRET_KEY))
                .map(|b| b.0.as_slice())
                == Some(want)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no sync within 10s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

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
    let client = plane.admin().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("porch-fn-system".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");

    let mount = tempfile::tempdir().expect("mount");
    let write = |generation: usize| {
        let content = format!(
            r#"{{"auths":{{"r.example.com":{{"username":"u","password":"p{generation}"}}}}}}"#
        );
        let data = mount.path().join(format!("..data_{generation}"));
        std::fs::create_dir(&data).expect("dir");
        std::fs::write(data.join(".dockerconfigjson"), &content).expect("write");
        let tmp = mount.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp).expect("symlink");
        std::fs::rename(&tmp, mount.path().join("..data")).expect("swap");
        content.into_bytes()
    };
    let first = write(0);
    let path = mount.path().join(".dockerconfigjson");
    std::os::unix::fs::symlink("..data/.dockerconfigjson", &path).expect("link");
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
    until(&secrets, &first).await;

    let mut swaps = Vec::new();
    let mut recreations = Vec::new();
    for round in 1..=ROUNDS {
        let want = write(round);
        swaps.push(until(&secrets, &want).await);
        secrets
            .delete("auth-secret", &DeleteParams::default())
            .await
            .expect("delete");
        recreations.push(until(&secrets, &want).await);
    }
    shutdown.cancel();
    report("source swapped -> target updated", swaps);
    report("target deleted -> target recreated", recreations);
}
