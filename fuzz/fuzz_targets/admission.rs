//! AdmissionReview bodies through decoding and mutation planning. Beyond not
//! panicking: the JSON Patch planned for a pod applies cleanly to that pod's
//! object as the API server holds it, and a second pass over the patched pod
//! plans nothing more.
#![no_main]

use std::collections::HashMap;

use fn_image_resolver::admission::mutate::{Pod, plan};
use fn_image_resolver::admission::{Scope, decode};
use fn_image_resolver::registry::Resolution;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const DIGEST: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn images(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .filter_map(|c| c.image.clone())
        .collect()
}

/// Every image resolves, with an entrypoint and a pull secret.
fn table(images: &[String]) -> HashMap<String, Resolution> {
    images
        .iter()
        .map(|image| {
            let base = image.split('@').next().unwrap_or(image);
            let pinned = format!("{base}@{DIGEST}");
            let resolution = Resolution {
                image: image.clone(),
                reference: base.to_string(),
                digest: DIGEST.into(),
                pinned: if image.contains('@') {
                    image.clone()
                } else {
                    pinned
                },
                entrypoint: vec!["/fn".into()],
                cmd: vec!["--serve".into()],
                config_entrypoint: vec!["/fn".into()],
                platform: "linux/amd64".into(),
                registry: "r.example.com".into(),
                pull_secret: Some("auth-secret".into()),
            };
            (image.clone(), resolution)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = decode(data, "porch-fn-system") else {
        return;
    };
    let Scope::Pod(pod) = decoded.scope else {
        return;
    };
    let resolved = table(&images(&pod));
    let lookup = |image: &str| resolved.get(image);
    let Ok(mutation) = plan(&pod, &lookup, Some("auth-secret")) else {
        return;
    };
    // The webhook skips fields it does not read without validating their
    // escapes (a lone surrogate in an unrelated string is accepted); the API
    // server never sends such JSON, and `Value` refuses it, so skip those.
    let Ok(review) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut object = review["request"]["object"].clone();
    if let Err(e) = json_patch::patch(&mut object, &mutation.operations) {
        panic!(
            "the planned patch does not apply: {e}\npatch: {}",
            serde_json::to_string(&mutation.operations).unwrap_or_default()
        );
    }
    // Reinvocation: the patched pod needs nothing more.
    let patched: Pod = serde_json::from_value(object).expect("a patched pod still reads as a Pod");
    let resolved = table(&images(&patched));
    let lookup = |image: &str| resolved.get(image);
    let again = plan(&patched, &lookup, Some("auth-secret")).expect("second pass");
    assert!(
        again.operations.is_empty(),
        "second pass changes: {}",
        serde_json::to_string(&again.operations).unwrap_or_default()
    );
});
