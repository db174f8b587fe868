//! Arbitrary bytes offered as encoded pieces of a known blob: never a panic, and nothing but the
//! genuine bytes is ever written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::{Geometry, PieceSet, verify};

const SIZE: usize = 600 * 1024 + 7;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, encoded)) = data.split_first() else { return };
    let blob: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
    let mut ob = Vec::new();
    let hash = verify::outboard(&blob[..], SIZE as u64, &mut ob).expect("outboard");
    let g = Geometry::new(SIZE as u64).expect("size");
    let mut pieces = PieceSet::empty(g.piece_count());
    for p in 0..g.piece_count() {
        if sel & (1 << p) != 0 {
            pieces.insert(p);
        }
    }
    let mut target = vec![0u8; SIZE];
    let outboard = verify::post_order_outboard(hash, g, vec![0u8; ob.len()]);
    let decoded = verify::decode_pieces(encoded, &pieces, &mut target[..], outboard);
    for (i, (&t, &b)) in target.iter().zip(&blob).enumerate() {
        assert!(t == 0 || t == b, "unverified byte {i} written");
    }
    for p in decoded.verified.iter() {
        let r = g.piece_bytes(p);
        assert_eq!(&target[r.start as usize..r.end as usize], &blob[r.start as usize..r.end as usize]);
    }
});
