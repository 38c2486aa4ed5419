//! The reference grammar against oci-spec's parser, which the project used
//! before (src/registry/grammar.rs says why it was replaced). On ASCII input
//! both must accept the same strings and split them the same way; anything
//! else must be rejected here (Docker's grammar is ASCII, oci-spec's `\w`
//! is Unicode). One deliberate difference: a digest with upper-case hex,
//! which oci-spec accepts and the image spec does not, is refused here.
#![no_main]

use fn_image_resolver::registry::grammar::{GrammarError, split};
use libfuzzer_sys::fuzz_target;
use oci_spec::distribution::{ParseError, Reference};

fuzz_target!(|input: &str| {
    let ours = split(input);
    if !input.is_ascii() {
        assert!(ours.is_err(), "{input:?} has non-ASCII characters but parsed");
        return;
    }
    if let Err(GrammarError::DigestCase) = ours {
        return;
    }
    match (ours, Reference::try_from(input)) {
        (Ok(parts), Ok(theirs)) => {
            assert_eq!(parts.registry, theirs.registry(), "registry of {input:?}");
            assert_eq!(parts.repository, theirs.repository(), "repository of {input:?}");
            assert_eq!(parts.tag, theirs.tag(), "tag of {input:?}");
            assert_eq!(parts.digest, theirs.digest(), "digest of {input:?}");
        }
        (Err(ours), Err(theirs)) => {
            let same = matches!(
                (ours, &theirs),
                (GrammarError::Empty, ParseError::NameEmpty)
                    | (GrammarError::Format, ParseError::ReferenceInvalidFormat)
                    | (GrammarError::NameTooLong, ParseError::NameTooLong)
                    | (GrammarError::DigestFormat, ParseError::DigestInvalidFormat)
                    | (GrammarError::DigestLength, ParseError::DigestInvalidLength)
                    | (GrammarError::DigestAlgorithm, ParseError::DigestUnsupported)
            );
            assert!(same, "{input:?}: ours {ours:?}, oci-spec {theirs:?}");
        }
        (ours, theirs) => panic!("{input:?}: ours {ours:?}, oci-spec {theirs:?}"),
    }
});
