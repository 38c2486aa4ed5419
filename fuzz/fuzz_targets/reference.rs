//! Image references as written in pods and resolver requests. Beyond not
//! panicking: the normalized form of a valid reference parses back to the
//! same reference, and so does its digest-pinned form.
#![no_main]

use fn_image_resolver::registry::ImageRef;
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "ghcr.io/kptdev/krm-functions-catalog/";
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fuzz_target!(|input: &str| {
    let Ok(reference) = ImageRef::parse(input, PREFIX) else {
        return;
    };
    let normalized = reference.to_string();
    let again = ImageRef::parse(&normalized, PREFIX)
        .unwrap_or_else(|e| panic!("normalized {normalized:?} does not parse: {e}"));
    assert_eq!(again, reference, "normalizing {input:?} is not stable");
    if reference.digest().is_none() {
        let pinned = reference.pinned(DIGEST);
        let parsed = ImageRef::parse(&pinned, PREFIX)
            .unwrap_or_else(|e| panic!("pinned {pinned:?} does not parse: {e}"));
        assert_eq!(parsed.digest(), Some(DIGEST));
        assert_eq!(parsed.registry(), reference.registry());
    }
});
