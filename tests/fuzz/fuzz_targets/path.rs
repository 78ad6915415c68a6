//! The request router's parser: any path either addresses an endpoint whose parts satisfy the
//! grammars, or is refused; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pier_oci::{Endpoint, RepositoryName};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Ok(endpoint) = Endpoint::parse(path) {
        match endpoint {
            Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } | Endpoint::Referrers { name, .. } | Endpoint::TagsList { name } | Endpoint::Upload { name, .. } => {
                // Whatever the router accepts as a name is then checked; a valid one is safe in a path.
                if let Ok(n) = RepositoryName::parse(&name) {
                    assert!(!n.as_str().contains(".."));
                    assert!(!n.as_str().starts_with('/'));
                    assert!(n.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
                }
            }
            Endpoint::Base | Endpoint::Catalog => {}
        }
    }
});
