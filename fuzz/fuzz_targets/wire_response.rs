//! Any bytes a peer sends as a response header: never a panic, and what decodes re-encodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::wire::{self, MAX_RESPONSE_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = wire::read_frame(data, MAX_RESPONSE_LEN) {
        if let Ok(resp) = wire::decode_response(&body) {
            let again = wire::encode_frame(&resp);
            let body2 = wire::read_frame(&again[..], MAX_RESPONSE_LEN).expect("own frame");
            assert_eq!(wire::decode_response(&body2).expect("own encoding"), resp);
        }
    }
});
