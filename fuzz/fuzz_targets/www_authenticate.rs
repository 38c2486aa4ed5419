//! `WWW-Authenticate` headers from registries: any header value gives a
//! challenge we answer or none, never a panic; a Bearer challenge always has
//! a realm.
#![no_main]

use fn_image_resolver::registry::challenge::Challenge;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|header: &str| {
    if let Some(Challenge::Bearer { realm, .. }) = Challenge::parse(header) {
        assert!(
            !realm.is_empty(),
            "bearer challenge without realm: {header:?}"
        );
    }
});
