//! Verified streaming: outboards, and pieces encoded with the proof that ties them to the root
//! hash, on top of `bao-tree` at 16 KiB chunk groups.
//!
//! Nothing here opens a file: callers pass readers and writers (the cache passes files, the tests
//! and the fuzz targets pass memory).

use std::io::{self, Read, Write};

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{DecodeResponseIter, Outboard, OutboardMut};
use bao_tree::io::{BaoContentItem, Leaf, Parent};

pub use bao_tree::io::EncodeError;
pub use bao_tree::io::sync::{ReadAt, WriteAt};

use crate::Hash;
use crate::piece::{Geometry, PieceIndex, PieceSet};

/// Computes the root hash and the post-order outboard of `size` bytes read from `data`, writing
/// the outboard sequentially to `outboard`. Reads `data` once.
pub fn outboard(data: impl Read, size: u64, outboard: impl Write) -> io::Result<Hash> {
    let tree = Geometry::new(size).map_err(io::Error::other)?.tree();
    bao_tree::io::sync::outboard_post_order(data, tree, outboard).map(Hash::from)
}

/// The outboard of a blob, read from or written to `D` (a file in the store, memory in tests).
pub fn post_order_outboard<D>(hash: Hash, geometry: Geometry, data: D) -> PostOrderOutboard<D> {
    PostOrderOutboard { root: hash.as_blake3(), tree: geometry.tree(), data }
}

/// Writes `pieces` of a blob with their proofs to `out`, checking every chunk group against the
/// outboard first: bytes that fail verification (a corrupted disk) are never sent. On a mismatch
/// nothing of the failing group is written and the error says where.
pub fn encode_pieces(
    data: impl ReadAt,
    outboard: impl Outboard,
    pieces: &PieceSet,
    out: impl Write,
) -> Result<(), EncodeError> {
    let geometry = geometry_of(&outboard);
    let ranges = geometry.chunk_ranges(pieces);
    bao_tree::io::sync::encode_ranges_validated(data, outboard, &ranges, out)
}

/// The number of bytes [`encode_pieces`] writes for `pieces`: the data plus one 64-byte hash pair
/// per parent on the way. Lets a reader bound what it accepts before it reads.
pub fn encoded_len(geometry: Geometry, pieces: &PieceSet) -> u64 {
    let ranges = geometry.chunk_ranges(pieces);
    let ranges = bao_tree::io::sync::truncate_ranges(&ranges, geometry.size());
    let mut len = 0;
    for item in geometry.tree().ranges_pre_order_chunks_iter_ref(ranges, 0) {
        len += match item {
            bao_tree::iter::BaoChunk::Parent { .. } => 64,
            bao_tree::iter::BaoChunk::Leaf { size, ranges, .. } => {
                if ranges.is_all() {
                    size as u64
                } else {
                    // Shoal only asks for whole pieces, which are whole chunk groups; a partial
                    // group (never requested) would be at most this long.
                    size as u64 * 2
                }
            }
        };
    }
    len
}

/// The chunks whose proof proves a blob's size: from its last chunk on (an open range, so that
/// an empty blob, or one ending on a chunk boundary, is covered too). Encoded with a block size
/// of one chunk group, that is the last chunk group and the hash pairs from the root down to it.
fn size_ranges(geometry: Geometry) -> bao_tree::ChunkRanges {
    let last_chunk = geometry.size().saturating_sub(1) / 1024;
    bao_tree::ChunkRanges::from(bao_tree::ChunkNum(last_chunk)..)
}

/// Writes a proof of the blob's size to `out`: its last chunk group with the hash pairs from the
/// root down to it (at most 16 KiB and 64 bytes per level), checked against the outboard first.
/// BLAKE3 hashes each chunk with its position and the root with a flag, so the last group
/// verifying under a size proves that size: a fetcher that checks it (see [`check_size_proof`])
/// may request any piece at once instead of the last piece first.
pub fn encode_size_proof(data: impl ReadAt, outboard: impl Outboard, out: impl Write) -> Result<(), EncodeError> {
    let geometry = geometry_of(&outboard);
    bao_tree::io::sync::encode_ranges_validated(data, outboard, &size_ranges(geometry), out)
}

/// Whether `proof` (from [`encode_size_proof`]) proves that the blob `hash` is `size` bytes long.
/// Never panics, whatever the bytes.
pub fn check_size_proof(hash: Hash, size: u64, proof: &[u8]) -> bool {
    let Ok(geometry) = Geometry::new(size) else { return false };
    let ranges = size_ranges(geometry);
    let mut reader = proof;
    let mut end = 0u64;
    for item in DecodeResponseIter::new(hash.as_blake3(), geometry.tree(), &mut reader, &ranges) {
        match item {
            Ok(BaoContentItem::Leaf(Leaf { offset, data })) => end = offset + data.len() as u64,
            Ok(BaoContentItem::Parent(_)) => {}
            Err(_) => return false,
        }
    }
    reader.is_empty() && end == size
}

/// What [`decode_pieces`] stored before it stopped.
#[derive(Debug)]
pub struct Decoded {
    /// Pieces whose every byte was verified and written.
    pub verified: PieceSet,
    /// Why decoding stopped early, if it did.
    pub error: Option<DecodeError>,
}

/// Why an encoded response was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The response's bytes do not match the content id: the sender sent wrong data.
    #[error("piece {piece} failed BLAKE3 verification")]
    Corrupt {
        /// The piece that held the bad bytes.
        piece: PieceIndex,
    },
    /// The response ended before every requested piece arrived.
    #[error("response ended early, in piece {piece}")]
    Truncated {
        /// The first piece that did not arrive whole.
        piece: PieceIndex,
    },
    /// Writing verified bytes locally failed: our fault, not the sender's.
    #[error("storing verified bytes failed: {0}")]
    Store(#[source] io::Error),
}

impl DecodeError {
    /// Whether the sender misbehaved (as opposed to a local failure).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::Truncated { .. })
    }
}

/// Reads `pieces` of the blob `outboard` describes from `encoded`, verifies every chunk group
/// against the root hash, and writes only verified bytes to `data` and verified hash pairs to
/// `outboard`; a piece's bytes are written once all of them verified. Stops at the first bad or
/// missing group; pieces completed before it are reported as verified.
pub fn decode_pieces<O>(encoded: impl Read, pieces: &PieceSet, mut data: impl WriteAt, mut outboard: O) -> Decoded
where
    O: Outboard + OutboardMut,
{
    let geometry = geometry_of(&outboard);
    let ranges = geometry.chunk_ranges(pieces);
    let mut verified = PieceSet::empty(geometry.piece_count());
    // Bytes verified so far in each requested piece; a piece is done when all its bytes are.
    let mut done_in_piece = 0u64;
    let mut current: Option<PieceIndex> = None;
    let mut held: Vec<u8> = Vec::with_capacity(crate::PIECE_SIZE as usize);
    let iter = DecodeResponseIter::new(outboard.root(), outboard.tree(), encoded, &ranges);
    for item in iter {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                // A bad proof belongs to the first piece not yet complete: proofs precede their data.
                let piece = pieces.iter().find(|p| !verified.contains(*p)).unwrap_or(0);
                return Decoded { verified, error: Some(classify(e, piece, geometry)) };
            }
        };
        match item {
            BaoContentItem::Parent(Parent { node, pair }) => {
                if let Err(e) = outboard.save(node, &pair) {
                    return Decoded { verified, error: Some(DecodeError::Store(e)) };
                }
            }
            BaoContentItem::Leaf(Leaf { offset, data: bytes }) => {
                let piece = geometry.piece_of(offset);
                if current != Some(piece) {
                    current = Some(piece);
                    done_in_piece = 0;
                    held.clear();
                }
                // Verified groups are gathered and written once per piece: one write of 256 KiB
                // instead of sixteen of 16 KiB.
                held.extend_from_slice(&bytes);
                done_in_piece += bytes.len() as u64;
                if done_in_piece == geometry.piece_len(piece) {
                    if let Err(e) = data.write_all_at(geometry.piece_bytes(piece).start, &held) {
                        return Decoded { verified, error: Some(DecodeError::Store(e)) };
                    }
                    held.clear();
                    verified.insert(piece);
                }
            }
        }
    }
    // An empty blob's only piece has no bytes: reaching the end verified its (empty) leaf.
    if geometry.size() == 0 && pieces.contains(0) {
        verified.insert(0);
    }
    Decoded { verified, error: None }
}

fn classify(e: bao_tree::io::DecodeError, piece: PieceIndex, geometry: Geometry) -> DecodeError {
    use bao_tree::io::DecodeError as E;
    match e {
        E::ParentHashMismatch(_) => DecodeError::Corrupt { piece },
        E::LeafHashMismatch(chunk) => DecodeError::Corrupt { piece: geometry.piece_of(chunk.to_bytes()) },
        E::ParentNotFound(_) => DecodeError::Truncated { piece },
        E::LeafNotFound(chunk) => DecodeError::Truncated { piece: geometry.piece_of(chunk.to_bytes()) },
        E::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => DecodeError::Truncated { piece },
        E::Io(e) => DecodeError::Store(e),
    }
}

fn geometry_of(outboard: &impl Outboard) -> Geometry {
    // The tree came from a `Geometry`, so its size is within bounds.
    Geometry::new(outboard.tree().size()).unwrap_or_else(|_| unreachable!("outboards are built from a Geometry"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece::{CHUNK_GROUP_SIZE, PIECE_SIZE};

    /// Deterministic, non-repeating test bytes.
    fn bytes(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn outboard_of(data: &[u8]) -> (Hash, Vec<u8>) {
        let mut ob = Vec::new();
        let hash = outboard(data, data.len() as u64, &mut ob).expect("in memory");
        (hash, ob)
    }

    const SIZES: &[u64] = &[
        0,
        1,
        CHUNK_GROUP_SIZE - 1,
        CHUNK_GROUP_SIZE,
        CHUNK_GROUP_SIZE + 1,
        PIECE_SIZE - 1,
        PIECE_SIZE,
        PIECE_SIZE + 1,
        3 * 1024 * 1024 + 5,
    ];

    #[test]
    fn outboard_root_is_the_b3sum_hash() {
        for &size in SIZES {
            let data = bytes(size as usize);
            let (hash, ob) = outboard_of(&data);
            assert_eq!(hash, Hash::of(&data), "size {size}");
            assert_eq!(ob.len() as u64, Geometry::new(size).expect("small").outboard_size(), "size {size}");
        }
    }

    #[test]
    fn every_piece_round_trips_at_boundary_sizes() {
        for &size in SIZES {
            let data = bytes(size as usize);
            let (hash, ob) = outboard_of(&data);
            let g = Geometry::new(size).expect("small");
            let src = post_order_outboard(hash, g, &ob[..]);
            let mut target = vec![0u8; size as usize];
            let mut rebuilt = post_order_outboard(hash, g, vec![0u8; ob.len()]);
            for piece in (0..g.piece_count()).rev() {
                let want = PieceSet::single(g.piece_count(), piece);
                let mut wire = Vec::new();
                encode_pieces(&data[..], &src, &want, &mut wire).expect("encode");
                assert_eq!(wire.len() as u64, encoded_len(g, &want), "size {size} piece {piece}");
                let d = decode_pieces(&wire[..], &want, &mut target[..], &mut rebuilt);
                assert!(d.error.is_none(), "size {size} piece {piece}: {:?}", d.error);
                assert_eq!(d.verified, want, "size {size} piece {piece}");
            }
            assert_eq!(target, data, "size {size}");
            assert_eq!(rebuilt.data, ob, "the outboard is rebuilt from proofs, size {size}");
        }
    }

    #[test]
    fn a_size_proof_proves_the_size_and_nothing_else() {
        for &size in SIZES {
            let data = bytes(size as usize);
            let (hash, ob) = outboard_of(&data);
            let g = Geometry::new(size).expect("small");
            let mut proof = Vec::new();
            encode_size_proof(&data[..], post_order_outboard(hash, g, &ob[..]), &mut proof).expect("encode");
            assert!(proof.len() as u64 <= CHUNK_GROUP_SIZE + 64 * 64, "size {size}: {} bytes", proof.len());
            assert!(check_size_proof(hash, size, &proof), "size {size}");
            // Another size, another blob, a flipped bit or a cut proof: refused.
            for other in [size + 1, size.saturating_sub(1), size + 1024, size * 2 + 7] {
                assert!(other == size || !check_size_proof(hash, other, &proof), "size {size} as {other}");
            }
            assert!(!check_size_proof(Hash::of(b"another blob"), size, &proof), "size {size}");
            for pos in (0..proof.len()).step_by(131) {
                let mut bad = proof.clone();
                bad[pos] ^= 0x01;
                assert!(!check_size_proof(hash, size, &bad), "size {size}, bit flipped at {pos}");
            }
            if !proof.is_empty() {
                assert!(!check_size_proof(hash, size, &proof[..proof.len() - 1]), "size {size}, cut");
                let mut long = proof.clone();
                long.push(0);
                assert!(!check_size_proof(hash, size, &long), "size {size}, trailing byte");
            }
        }
        assert!(!check_size_proof(Hash::of(b"x"), u64::MAX, &[]));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_rejected_and_not_written() {
        let size = 2 * PIECE_SIZE + 3 * CHUNK_GROUP_SIZE + 11;
        let data = bytes(size as usize);
        let (hash, ob) = outboard_of(&data);
        let g = Geometry::new(size).expect("small");
        let all = PieceSet::full(g.piece_count());
        let mut wire = Vec::new();
        encode_pieces(&data[..], post_order_outboard(hash, g, &ob[..]), &all, &mut wire).expect("encode");
        // Flip one bit in each 997-byte stride: proofs and data alike.
        for pos in (0..wire.len()).step_by(997) {
            let mut bad = wire.clone();
            bad[pos] ^= 0x10;
            let mut target = vec![0u8; size as usize];
            let mut rebuilt = post_order_outboard(hash, g, vec![0u8; ob.len()]);
            let d = decode_pieces(&bad[..], &all, &mut target[..], &mut rebuilt);
            let Some(DecodeError::Corrupt { piece }) = d.error else { panic!("bit {pos} not caught: {:?}", d.error) };
            assert!(!d.verified.contains(piece));
            assert!(d.verified.iter().all(|p| p < piece), "only pieces before the bad one are verified");
            // Nothing past the last verified group was written: every written byte is genuine.
            for (i, (&t, &o)) in target.iter().zip(&data).enumerate() {
                assert!(t == 0 || t == o, "byte {i} written without verification (flip at {pos})");
            }
        }
    }

    #[test]
    fn a_truncated_response_is_reported_as_such() {
        let size = 3 * PIECE_SIZE;
        let data = bytes(size as usize);
        let (hash, ob) = outboard_of(&data);
        let g = Geometry::new(size).expect("small");
        let all = PieceSet::full(3);
        let mut wire = Vec::new();
        encode_pieces(&data[..], post_order_outboard(hash, g, &ob[..]), &all, &mut wire).expect("encode");
        wire.truncate(wire.len() - 100);
        let mut target = vec![0u8; size as usize];
        let d = decode_pieces(&wire[..], &all, &mut target[..], post_order_outboard(hash, g, vec![0u8; ob.len()]));
        assert!(matches!(d.error, Some(DecodeError::Truncated { piece: 2 })), "{:?}", d.error);
        assert_eq!(d.verified.iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn the_encoder_refuses_to_serve_corrupted_bytes() {
        let size = 2 * PIECE_SIZE;
        let mut data = bytes(size as usize);
        let (hash, ob) = outboard_of(&data);
        let g = Geometry::new(size).expect("small");
        data[PIECE_SIZE as usize + 5] ^= 1;
        let src = post_order_outboard(hash, g, &ob[..]);
        let mut wire = Vec::new();
        encode_pieces(&data[..], &src, &PieceSet::single(2, 0), &mut wire).expect("piece 0 is intact");
        let mut wire = Vec::new();
        assert!(encode_pieces(&data[..], &src, &PieceSet::single(2, 1), &mut wire).is_err());
    }
}
