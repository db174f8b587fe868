//! Any string given as a content id: never a panic, and what parses prints back the same digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::Hash;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(h) = s.parse::<Hash>() {
            assert_eq!(h.to_string(), s.to_ascii_lowercase());
        }
    }
});
