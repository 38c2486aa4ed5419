//! Docker config files as mounted from a Secret: any bytes give a config or
//! an error, never a panic, and an error never quotes a secret value
//! (`auth`, `password`, `identitytoken`, `registrytoken`). Registry keys may
//! be named in errors: that is how an operator finds the broken entry.
#![no_main]

use std::path::Path;

use fn_image_resolver::registry::DockerConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match DockerConfig::parse(data, Path::new("/config.json")) {
        Ok(config) => {
            assert!(config.identities().len() == config.registries().count());
        }
        Err(e) => {
            let message = e.to_string();
            // Secret values of the input, if it is JSON at all, must be
            // absent from the message (short ones match by accident, and a
            // value that is also part of a key may appear as the key).
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
                let (mut secrets, mut keys) = (Vec::new(), Vec::new());
                collect(&value, false, &mut secrets, &mut keys);
                for s in secrets
                    .iter()
                    .filter(|s| s.len() >= 12 && !keys.iter().any(|k| k.contains(s.as_str())))
                {
                    assert!(!message.contains(s.as_str()), "{message:?} quotes {s:?}");
                }
            }
        }
    }
});

fn collect(
    value: &serde_json::Value,
    secret: bool,
    secrets: &mut Vec<String>,
    keys: &mut Vec<String>,
) {
    match value {
        serde_json::Value::String(s) if secret => secrets.push(s.clone()),
        serde_json::Value::Array(items) => {
            items.iter().for_each(|v| collect(v, false, secrets, keys))
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                keys.push(k.clone());
                let is_secret = matches!(
                    k.as_str(),
                    "auth" | "password" | "identitytoken" | "registrytoken"
                );
                collect(v, is_secret, secrets, keys);
            }
        }
        _ => {}
    }
}
