//! Any bytes offered as a collection: never a panic, and what decodes has only safe paths and
//! re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::collection::{Collection, check_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Collection::decode(data) {
        for e in c.entries() {
            assert!(check_path(&e.path).is_ok());
        }
        assert_eq!(Collection::decode(&c.encode()).expect("own encoding"), c);
    }
});
