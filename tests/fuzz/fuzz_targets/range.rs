//! Range parsing and resolution: a resolved range always lies inside the object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pier_oci::ByteRange;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    if let Ok(range) = ByteRange::parse(header) {
        if let Ok((first, last)) = range.resolve(size) {
            assert!(first <= last && last < size);
        }
    }
});
