//! Any bytes a peer sends as a request frame: never a panic, and what decodes re-encodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::wire::{self, MAX_REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = wire::read_frame(data, MAX_REQUEST_LEN) {
        if let Ok(req) = wire::decode_request(&body) {
            let again = wire::encode_frame(&req);
            let body2 = wire::read_frame(&again[..], MAX_REQUEST_LEN).expect("own frame");
            assert_eq!(wire::decode_request(&body2).expect("own encoding"), req);
        }
    }
});
