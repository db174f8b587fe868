//! What a peer's request costs a server to decode: its bytes, not the piece count it claims.

use shoal_protocol::piece::MAX_BLOB_SIZE;
use shoal_protocol::wire::{self, Request};
use shoal_protocol::{Hash, PIECE_SIZE, PieceSet};

#[test]
fn a_request_claiming_the_largest_blob_costs_its_bytes_to_decode() {
    // A bitmap of the largest blob's pieces is 2 MiB; requests naming them take a few bytes.
    let largest = (MAX_BLOB_SIZE / PIECE_SIZE) as u32;
    let every = PieceSet::full(largest);
    let hash = Hash::of(b"any");
    let requests = [
        Request::Watch { hash, wanted: (&every).into(), wait_ms: 1000, trace: None },
        Request::Get { hash, pieces: (&PieceSet::single(largest, largest - 1)).into(), trace: None },
        // Refused (more pieces than a get may ask for), after its runs are read.
        Request::Get { hash, pieces: (&every).into(), trace: None },
    ];
    for request in requests {
        let frame = wire::encode_frame(&request);
        assert!(frame.len() < 64, "{} bytes", frame.len());
        let mut decoded = None;
        let cost = allocation_counter::measure(|| decoded = Some(wire::decode_request(&frame[4..])));
        match (&request, decoded.expect("decoded")) {
            (Request::Get { pieces, .. }, Err(e)) if pieces.count() > u64::from(wire::MAX_PIECES_PER_GET) => {
                assert!(matches!(e, wire::WireError::Malformed(_)), "{e}")
            }
            (_, decoded) => assert_eq!(decoded.as_ref(), Ok(&request)),
        }
        assert!(cost.bytes_max < 1024, "decoding a {}-byte request held {} bytes at once", frame.len(), cost.bytes_max);
    }
}
