//! The README's first command, run as a reader on a fresh machine would.

use std::process::Command;

use crate::common::{free_port, oci::samples};

/// `scripts/quickstart.sh`: Debian packages (present here, so nothing is
/// installed), a sample registry on loopback, `serve`, the review of a pod
/// shaped as Porch's function runner makes it, and the patched pod. The
/// images in the printed pod must carry the digests the registry holds.
#[test]
fn quickstart_pins_a_porch_function_pod_against_its_sample_registry() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (registry, webhook) = (free_port(), free_port());
    // Bounded: the script waits on nothing that can hang for long, but a
    // wedged registry must fail this test, not the whole run.
    let out = Command::new("timeout")
        .args(["300", "bash", &format!("{root}/scripts/quickstart.sh")])
        .env("REGISTRY_PORT", registry.to_string())
        .env("PORT", webhook.to_string())
        .output()
        .expect("run scripts/quickstart.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let samples = samples();
    let host = format!("127.0.0.1:{registry}");
    let function = format!(
        "{host}/fns/set-namespace:v0.4@{}",
        samples.entrypoint.digest
    );
    let wrapper = format!(
        "{host}/nephio/porch-wrapper-server:v4@{}",
        samples.wrapper.digest
    );
    assert!(stdout.contains("\"allowed\": true"), "{stdout}");
    let (_, pod) = stdout
        .split_once("Patched pod:")
        .unwrap_or_else(|| panic!("no patched pod printed:\n{stdout}"));
    assert!(pod.contains(&function), "function not pinned:\n{pod}");
    assert!(pod.contains(&wrapper), "wrapper not pinned:\n{pod}");
    assert!(
        pod.contains("fn-image-resolver.porch.kpt.dev/original-images"),
        "{pod}"
    );
    // The entrypoint Porch wrote matches the pinned image: args untouched.
    assert!(
        !stdout.contains("/spec/containers/0/args"),
        "args patched although the entrypoint matched:\n{stdout}"
    );
}
