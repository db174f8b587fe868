//! Any bytes as a size proof, under any claimed size: never a panic, and never a proof of a blob
//! nobody knows the content of.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::Hash;
use shoal_protocol::verify::check_size_proof;

fuzz_target!(|data: &[u8]| {
    let Some((size, proof)) = data.split_first_chunk::<8>() else { return };
    let size = u64::from_le_bytes(*size);
    // A hash nobody knows a blob of: no proof can verify under it, whatever the size claimed.
    let hash = Hash::from([0x5a; 32]);
    assert!(!check_size_proof(hash, size, proof));
});
