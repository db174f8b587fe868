//! Helpers shared by the store's integration tests.
#![allow(dead_code, unreachable_pub)]

use shoal_protocol::verify;
use shoal_protocol::{Geometry, Hash, PieceSet};

/// Deterministic, non-repeating bytes for `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob as a provider holds it: bytes, hash and outboard, in memory.
pub struct Source {
    pub data: Vec<u8>,
    pub hash: Hash,
    pub outboard: Vec<u8>,
    pub geometry: Geometry,
}

impl Source {
    pub fn new(data: Vec<u8>) -> Self {
        let mut outboard = Vec::new();
        let hash = verify::outboard(&data[..], data.len() as u64, &mut outboard).expect("in memory");
        let geometry = Geometry::new(data.len() as u64).expect("small");
        Self { data, hash, outboard, geometry }
    }

    /// The encoded response a provider sends for `pieces`.
    pub fn encode(&self, pieces: &PieceSet) -> Vec<u8> {
        let mut out = Vec::new();
        let ob = verify::post_order_outboard(self.hash, self.geometry, &self.outboard[..]);
        verify::encode_pieces(&self.data[..], ob, pieces, &mut out).expect("encode");
        out
    }

    pub fn piece(&self, i: u32) -> PieceSet {
        PieceSet::single(self.geometry.piece_count(), i)
    }
}
