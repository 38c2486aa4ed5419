//! AdmissionReview bodies through decoding and mutation planning. Beyond not
//! panicking: the JSON Patch planned for a pod applies cleanly to that pod's
//! object as the API server holds it, and a second pass over the patched pod
//! plans nothing more.
#![no_main]

use std::collections::HashMap;

use fn_image_resolver::admission::mutate::{Options, Pod, PullSecret, Resolved, plan};
use fn_image_resolver::admission::{FailureMode, Scope, decode};
use fn_image_resolver::registry::{Digest, ImageAnswer, ImageInfo, ImageRef};
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

/// Every image resolves, with an entrypoint and a pull secret; one that is
/// not a valid reference stands for a fixed one, so that odd image strings
/// still get patched.
fn table(images: &[String]) -> HashMap<String, (ImageRef, ImageInfo)> {
    images
        .iter()
        .map(|image| {
            let reference = ImageRef::parse(image, "")
                .or_else(|_| ImageRef::parse("r.example.com/fn:v1", ""))
                .expect("a valid fallback");
            let info = ImageInfo {
                digest: Digest::new(DIGEST),
                config_entrypoint: vec!["/fn".into()],
                cmd: vec!["--serve".into()],
                platform: None,
            };
            (image.clone(), (reference, info))
        })
        .collect()
}

fn answer((reference, info): &(ImageRef, ImageInfo)) -> Resolved<'_> {
    Resolved::Answer(ImageAnswer::new(reference, info, true))
}

const OPTIONS: Options<'static> = Options {
    failure_mode: FailureMode::Open,
    pin_function_image: true,
    pull_secret: Some(PullSecret {
        name: "auth-secret",
        exists: true,
    }),
};

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = decode(data, "porch-fn-system", "fn.kpt.dev/image") else {
        return;
    };
    let Scope::Pod(pod) = decoded.scope else {
        return;
    };
    let resolved = table(&images(&pod));
    let lookup = |image: &str| resolved.get(image).map(answer);
    let Ok(mutation) = plan(&pod, &lookup, &OPTIONS) else {
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
    let lookup = |image: &str| resolved.get(image).map(answer);
    let again = plan(&patched, &lookup, &OPTIONS).expect("second pass");
    assert!(
        again.operations.is_empty(),
        "second pass changes: {}",
        serde_json::to_string(&again.operations).unwrap_or_default()
    );
});
