//! What a registry (or something pretending to be one) answers: manifests,
//! indexes and image configs, under each content type we accept. Any bytes
//! give a parsed document or an error, never a panic.
#![no_main]

use fn_image_resolver::registry::manifest::{
    ManifestKind, parse_config, parse_manifest, select_platform, verify_digest,
};
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
];

fuzz_target!(|data: &[u8]| {
    let wanted = "linux/arm64/v8".parse().expect("platform");
    for content_type in TYPES {
        if let Ok(ManifestKind::Index { manifests }) = parse_manifest(data, content_type) {
            let _ = select_platform(&manifests, &wanted);
        }
    }
    let _ = parse_config(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verify_digest(text, data);
    }
});
