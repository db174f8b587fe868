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

/// Writes a proof of the blob's size to `out`: its last chunk (at most 1 KiB), then the chaining
/// values of the left subtrees beside the path from the root down to that chunk, root first (32
/// bytes each; at most 32 for the largest blob). The last chunk group is checked against the
/// outboard first, so rotted bytes prove nothing.
///
/// BLAKE3 hashes each chunk with its position, a parent with a flag a chunk never carries, and
/// the root with its own flag, so the last chunk hashing up to the root along the path a tree of
/// `size` bytes has proves that size: a fetcher that checks it (see [`check_size_proof`]) may
/// request any piece at once instead of the last piece first. Which chunks the outboard groups is
/// an encoding choice, not part of the proof: the levels inside the last chunk group are hashed
/// from its bytes, so a proof costs about 1 KiB instead of the whole group.
pub fn encode_size_proof(data: impl ReadAt, outboard: impl Outboard, mut out: impl Write) -> Result<(), EncodeError> {
    let geometry = geometry_of(&outboard);
    let (root, tree) = (outboard.root(), outboard.tree());
    let ranges = size_ranges(geometry);
    let mut encoded = Vec::new();
    bao_tree::io::sync::encode_ranges_validated(data, outboard, &ranges, &mut encoded)?;
    // The encoding is the hash pairs from the root down to the last group, then that group; the
    // path runs along the right edge of the tree, so each pair's left hash is a sibling.
    let mut siblings = Vec::new();
    let mut group = None;
    for item in DecodeResponseIter::new(root, tree, &mut &encoded[..], &ranges) {
        match item.map_err(|e| EncodeError::Io(io::Error::other(e)))? {
            BaoContentItem::Parent(Parent { pair: (left, _), .. }) => siblings.push(left),
            BaoContentItem::Leaf(Leaf { offset, data }) => group = Some((offset / CHUNK, data)),
        }
    }
    let (mut start, group) = match group {
        Some(g) => g,
        None if geometry.size() == 0 => (0, Default::default()),
        None => return Err(EncodeError::Io(io::Error::other("the encoding of the last chunk group is empty"))),
    };
    // Inside the group, down its right edge to the last chunk.
    let mut rest = &group[..];
    let mut chunks = chunk_count(rest.len() as u64);
    while chunks > 1 {
        let left = left_subtree_chunks(chunks);
        let (l, r) = rest.split_at((left * CHUNK) as usize);
        siblings.push(subtree_hash(start, l, false));
        (start, rest, chunks) = (start + left, r, chunks - left);
    }
    out.write_all(rest)?;
    for s in siblings {
        out.write_all(s.as_bytes())?;
    }
    Ok(())
}

/// Whether `proof` (from [`encode_size_proof`]) proves that the blob `hash` is `size` bytes long.
/// Never panics, whatever the bytes.
pub fn check_size_proof(hash: Hash, size: u64, proof: &[u8]) -> bool {
    if Geometry::new(size).is_err() {
        return false;
    }
    if proof.len() != proof_len(size) {
        return false;
    }
    let last = chunk_count(size) - 1;
    let (chunk, siblings) = proof.split_at((size - last * CHUNK) as usize);
    let mut cv = subtree_hash(last, chunk, siblings.is_empty());
    for (level, sibling) in siblings.chunks_exact(32).enumerate().rev() {
        let Ok(sibling) = <[u8; 32]>::try_from(sibling) else { return false };
        cv = parent_cv(&blake3::Hash::from(sibling), &cv, level == 0);
    }
    cv == hash.as_blake3()
}

/// BLAKE3's chunk length.
const CHUNK: u64 = 1024;

/// The chunks of a blob (or subtree) of `bytes` bytes: an empty one has one, empty.
fn chunk_count(bytes: u64) -> u64 {
    bytes.div_ceil(CHUNK).max(1)
}

/// The length of a size proof of a `size`-byte blob: its last chunk, and a hash per level of the
/// tree's right edge.
fn proof_len(size: u64) -> usize {
    let (mut levels, mut chunks) = (0, chunk_count(size));
    let last_len = (size - (chunks - 1) * CHUNK) as usize;
    while chunks > 1 {
        chunks -= left_subtree_chunks(chunks);
        levels += 1;
    }
    last_len + 32 * levels
}

/// The chunks in the left subtree of a BLAKE3 subtree of `chunks` chunks (at least 2): the
/// largest power of two below `chunks`.
fn left_subtree_chunks(chunks: u64) -> u64 {
    1 << (63 - (chunks - 1).leading_zeros())
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

/// A piece whose every byte verified against the root hash, with the hash pairs that arrived
/// with it. Only [`PieceDecoder`] makes one, so a store that writes only these writes only
/// verified bytes.
#[derive(Debug)]
pub struct VerifiedPiece {
    piece: PieceIndex,
    offset: u64,
    data: Vec<u8>,
    parents: Vec<Parent>,
}

impl VerifiedPiece {
    /// Which piece this is.
    pub fn piece(&self) -> PieceIndex {
        self.piece
    }

    /// Where its bytes lie in the blob.
    pub fn bytes(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.data.len() as u64
    }

    /// Its bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Writes the bytes at the piece's offset in `data` and the hash pairs that came with it
    /// into `outboard`.
    pub fn write_to(&self, mut data: impl WriteAt, mut outboard: impl OutboardMut) -> io::Result<()> {
        for Parent { node, pair } in &self.parents {
            outboard.save(*node, pair)?;
        }
        data.write_all_at(self.offset, &self.data)
    }
}

/// Writes the encoding [`encode_pieces`] writes, a few items at a time: a server streaming an
/// answer holds one chunk group of it instead of all of it. Every hash pair and chunk group is
/// checked against the root hash before it is written, as [`encode_pieces`] checks them, so bytes
/// that fail verification are never sent; the encoder's state is the same walk down the tree
/// that [`PieceDecoder`] checks an answer with.
pub struct PieceEncoder {
    walk: Walk,
    failed: bool,
}

impl std::fmt::Debug for PieceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceEncoder").field("failed", &self.failed).finish_non_exhaustive()
    }
}

impl PieceEncoder {
    /// An encoder of `pieces` of the blob `hash`, `geometry.size()` bytes long.
    pub fn new(hash: Hash, geometry: Geometry, pieces: &PieceSet) -> Self {
        Self { walk: Walk::new(hash, geometry, pieces), failed: false }
    }

    /// Appends the next items of the encoding to `out` until it grew by at least `at_least` bytes
    /// or the encoding ended. Returns whether it ended. `data` is read at blob offsets, as
    /// [`encode_pieces`] reads it. On an error nothing of the failing item is written, and the
    /// encoder stops: later calls fail too.
    pub fn encode_some(
        &mut self,
        data: impl ReadAt,
        outboard: impl Outboard,
        out: &mut Vec<u8>,
        at_least: usize,
    ) -> Result<bool, EncodeError> {
        if self.failed {
            return Err(EncodeError::Io(io::Error::other("the encoding already failed")));
        }
        // At least one item per call, so that a caller asking for nothing still gets to the end.
        let target = out.len().saturating_add(at_least.max(1));
        while out.len() < target {
            let Some(item) = self.walk.items.next() else { return Ok(true) };
            if let Err(e) = self.encode_item(item, &data, &outboard, out) {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(self.walk.items.peek().is_none())
    }

    /// Checks one item and appends it to `out`; on a failure `out` is left as it was.
    fn encode_item(
        &mut self,
        item: BaoChunk,
        data: &impl ReadAt,
        outboard: &impl Outboard,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        match item {
            BaoChunk::Parent { is_root, left, right, node, .. } => {
                let pair = outboard.load(node)?.ok_or_else(|| {
                    EncodeError::Io(io::Error::new(io::ErrorKind::InvalidData, format!("no hash pair for {node:?}")))
                })?;
                if !self.walk.parent(&pair, is_root, left, right) {
                    return Err(EncodeError::ParentHashMismatch(node));
                }
                out.extend_from_slice(pair.0.as_bytes());
                out.extend_from_slice(pair.1.as_bytes());
            }
            // Pieces are whole chunk groups: a leaf is always all of its group.
            BaoChunk::Leaf { start_chunk, size, is_root, .. } => {
                let at = out.len();
                out.resize(at + size, 0);
                if let Err(e) = data.read_exact_at(start_chunk.to_bytes(), &mut out[at..]) {
                    out.truncate(at);
                    return Err(EncodeError::Io(e));
                }
                if !self.walk.leaf(start_chunk.0, &out[at..], is_root) {
                    out.truncate(at);
                    return Err(EncodeError::LeafHashMismatch(start_chunk));
                }
            }
        }
        Ok(())
    }
}

/// Verifies an encoded response (from [`encode_pieces`]) as its bytes arrive, in slices of any
/// length: each chunk group is checked against the root hash as soon as all of it is in, and each
/// piece is handed out (see [`PieceDecoder::take_ready`]) as soon as all of its groups verified.
/// A reader therefore never holds more than one piece and one chunk group of a response, and
/// stores each piece while the next one is still on the wire.
///
/// The first failure stops the decoder for good; pieces handed out before it stay verified.
pub struct PieceDecoder {
    geometry: Geometry,
    requested: PieceSet,
    walk: Walk,
    /// The item whose bytes are awaited, and how many bytes it takes.
    next: Option<(BaoChunk, usize)>,
    /// The bytes of `next` received so far, when they arrived split.
    partial: Vec<u8>,
    /// The piece being assembled: its verified groups and the hash pairs on the way to them.
    piece: Option<PieceIndex>,
    held: Vec<u8>,
    parents: Vec<Parent>,
    ready: Vec<VerifiedPiece>,
    verified: PieceSet,
    remaining: u64,
    failed: bool,
}

impl std::fmt::Debug for PieceDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceDecoder")
            .field("size", &self.geometry.size())
            .field("verified", &self.verified.count())
            .field("remaining", &self.remaining)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

type BaoChunk = bao_tree::iter::BaoChunk;

impl PieceDecoder {
    /// A decoder for the encoding of `pieces` of the blob `hash`, `geometry.size()` bytes long.
    pub fn new(hash: Hash, geometry: Geometry, pieces: &PieceSet) -> Self {
        let mut decoder = Self {
            geometry,
            requested: pieces.clone(),
            walk: Walk::new(hash, geometry, pieces),
            next: None,
            partial: Vec::new(),
            piece: None,
            held: Vec::new(),
            parents: Vec::new(),
            ready: Vec::new(),
            verified: PieceSet::empty(geometry.piece_count()),
            remaining: encoded_len(geometry, pieces),
            failed: false,
        };
        decoder.advance();
        // An empty blob's only piece has no bytes: its (empty) leaf, if any, was checked above.
        if geometry.size() == 0 && pieces.contains(0) && !decoder.failed && decoder.verified.insert(0) {
            decoder.ready.push(VerifiedPiece { piece: 0, offset: 0, data: Vec::new(), parents: Vec::new() });
        }
        decoder
    }

    /// Encoded bytes still expected; 0 once everything arrived (or after a failure).
    pub fn remaining(&self) -> u64 {
        if self.failed { 0 } else { self.remaining }
    }

    /// The pieces handed out so far.
    pub fn verified(&self) -> &PieceSet {
        &self.verified
    }

    /// Takes the pieces that completed since the last call.
    pub fn take_ready(&mut self) -> Vec<VerifiedPiece> {
        std::mem::take(&mut self.ready)
    }

    /// Feeds the next bytes of the response. Bytes past the expected end are ignored. On an error
    /// the decoder stops: later calls return the same kind of error and change nothing.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), DecodeError> {
        while let Some((item, len)) = self.next {
            if self.failed {
                break;
            }
            if bytes.is_empty() {
                return Ok(());
            }
            let take = (len - self.partial.len()).min(bytes.len());
            // An item that arrived whole is checked where it lies; one split across pushes is
            // gathered in `partial` first (moved out for the check, its allocation kept).
            let mut gathered = Vec::new();
            let body = if self.partial.is_empty() && take == len {
                let (body, rest) = bytes.split_at(take);
                bytes = rest;
                body
            } else {
                self.partial.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.partial.len() < len {
                    return Ok(());
                }
                gathered = std::mem::take(&mut self.partial);
                &gathered[..]
            };
            let outcome = self.check(item, body);
            gathered.clear();
            self.partial = gathered;
            self.remaining -= len as u64;
            if let Err(e) = outcome {
                self.failed = true;
                return Err(e);
            }
            self.advance();
        }
        match self.failed {
            true => Err(DecodeError::Corrupt { piece: self.first_missing() }),
            false => Ok(()),
        }
    }

    /// Ends the response: `Ok` if every requested piece verified, else why not.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Corrupt { piece: self.first_missing() });
        }
        match self.next {
            Some(_) => Err(DecodeError::Truncated { piece: self.first_missing() }),
            None => Ok(()),
        }
    }

    /// Moves to the next item, checking at once those that take no bytes.
    fn advance(&mut self) {
        loop {
            self.next = self.walk.items.next().map(|item| {
                let len = match &item {
                    BaoChunk::Parent { .. } => 64,
                    BaoChunk::Leaf { size, .. } => *size,
                };
                (item, len)
            });
            match self.next {
                Some((item, 0)) => {
                    if self.check(item, &[]).is_err() {
                        self.failed = true;
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Checks one item against the hash on top of the stack.
    fn check(&mut self, item: BaoChunk, body: &[u8]) -> Result<(), DecodeError> {
        match item {
            BaoChunk::Parent { is_root, left, right, node, .. } => {
                let mut l = [0u8; 32];
                let mut r = [0u8; 32];
                l.copy_from_slice(&body[..32]);
                r.copy_from_slice(&body[32..64]);
                let pair = (blake3::Hash::from(l), blake3::Hash::from(r));
                if !self.walk.parent(&pair, is_root, left, right) {
                    return Err(DecodeError::Corrupt { piece: self.first_missing() });
                }
                self.parents.push(Parent { node, pair });
                Ok(())
            }
            BaoChunk::Leaf { is_root, start_chunk, .. } => {
                let offset = start_chunk.to_bytes();
                let piece = self.geometry.piece_of(offset);
                if !self.walk.leaf(start_chunk.0, body, is_root) {
                    return Err(DecodeError::Corrupt { piece });
                }
                if self.piece != Some(piece) {
                    self.piece = Some(piece);
                    self.held.clear();
                    self.held.reserve_exact(self.geometry.piece_len(piece) as usize);
                }
                self.held.extend_from_slice(body);
                if self.held.len() as u64 == self.geometry.piece_len(piece) {
                    self.verified.insert(piece);
                    self.ready.push(VerifiedPiece {
                        piece,
                        offset: self.geometry.piece_bytes(piece).start,
                        data: std::mem::take(&mut self.held),
                        parents: std::mem::take(&mut self.parents),
                    });
                    self.piece = None;
                }
                Ok(())
            }
        }
    }

    /// The first requested piece not yet verified: where a failure is blamed when the bytes do
    /// not name a piece (a proof precedes the data it proves).
    fn first_missing(&self) -> PieceIndex {
        self.requested.iter().find(|p| !self.verified.contains(*p)).unwrap_or(0)
    }
}

/// The walk an encoding takes through the tree, in pre-order: the items of the requested ranges
/// and the hashes they must match, the next on top of the stack (the root first, then the
/// children of each parent that matched).
struct Walk {
    items: std::iter::Peekable<bao_tree::iter::ResponseIter>,
    stack: Vec<blake3::Hash>,
}

impl Walk {
    fn new(hash: Hash, geometry: Geometry, pieces: &PieceSet) -> Self {
        let ranges = geometry.chunk_ranges(pieces);
        // Past the end of the blob nothing is sent (as `encoded_len` counts): the same ranges,
        // cut there.
        let ranges = bao_tree::ChunkRanges::new_unchecked(
            bao_tree::io::sync::truncate_ranges(&ranges, geometry.size()).boundaries().iter().copied().collect(),
        );
        Self {
            items: bao_tree::iter::ResponseIter::new(geometry.tree(), ranges).peekable(),
            stack: vec![hash.as_blake3()],
        }
    }

    /// Whether a parent's hash pair matches; if so its children are next.
    fn parent(&mut self, pair: &(blake3::Hash, blake3::Hash), is_root: bool, left: bool, right: bool) -> bool {
        if self.stack.pop() != Some(parent_cv(&pair.0, &pair.1, is_root)) {
            return false;
        }
        if right {
            self.stack.push(pair.1);
        }
        if left {
            self.stack.push(pair.0);
        }
        true
    }

    /// Whether a leaf's bytes match.
    fn leaf(&mut self, start_chunk: u64, data: &[u8], is_root: bool) -> bool {
        self.stack.pop() == Some(subtree_hash(start_chunk, data, is_root))
    }
}

/// BLAKE3's chaining value of the subtree of `data` starting at chunk `start_chunk`, or the root
/// hash when the subtree is the whole blob.
fn subtree_hash(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        return blake3::hash(data);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(start_chunk * 1024);
    hasher.update(data);
    blake3::Hash::from(hasher.finalize_non_root())
}

/// BLAKE3's chaining value of a parent from its children's, or the root hash.
fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    let (l, r) = (left.as_bytes(), right.as_bytes());
    match is_root {
        true => merge_subtrees_root(l, r, Mode::Hash),
        false => blake3::Hash::from(merge_subtrees_non_root(l, r, Mode::Hash)),
    }
}

/// Reads `pieces` of the blob `outboard` describes from `encoded`, verifies every chunk group
/// against the root hash, and writes only verified bytes to `data` and verified hash pairs to
/// `outboard`; a piece's bytes are written once all of them verified. Stops at the first bad or
/// missing group; pieces completed before it are reported as verified. Never reads past the
/// encoding's end.
pub fn decode_pieces<O>(mut encoded: impl Read, pieces: &PieceSet, mut data: impl WriteAt, mut outboard: O) -> Decoded
where
    O: Outboard + OutboardMut,
{
    let geometry = geometry_of(&outboard);
    let mut decoder = PieceDecoder::new(outboard.root().into(), geometry, pieces);
    let mut verified = PieceSet::empty(geometry.piece_count());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut store = |ready: Vec<VerifiedPiece>| {
            for piece in ready {
                piece.write_to(&mut data, &mut outboard).map_err(DecodeError::Store)?;
                verified.insert(piece.piece());
            }
            Ok(())
        };
        let want = decoder.remaining().min(buf.len() as u64) as usize;
        let (pushed, ended) = match want {
            0 => (decoder.finish(), true),
            _ => match encoded.read(&mut buf[..want]) {
                Ok(n) if n > 0 => (decoder.push(&buf[..n]), false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The encoding ended, or its stream failed, before its end: the sender's (or the
                // network's) doing, which `finish` reports as the response ending early.
                Ok(_) | Err(_) => (decoder.finish(), true),
            },
        };
        let stored = store(decoder.take_ready());
        match (pushed, stored) {
            (_, Err(e)) | (Err(e), _) => return Decoded { verified, error: Some(e) },
            (Ok(()), Ok(())) if ended => return Decoded { verified, error: None },
            (Ok(()), Ok(())) => {}
        }
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

    /// A blob of `size` test bytes: its bytes, hash, outboard, geometry, and the encoding of all
    /// of its pieces.
    fn encoded_blob(size: u64) -> (Vec<u8>, Hash, Vec<u8>, Geometry, Vec<u8>) {
        let data = bytes(size as usize);
        let (hash, ob) = outboard_of(&data);
        let g = Geometry::new(size).expect("small");
        let mut wire = Vec::new();
        let all = PieceSet::full(g.piece_count());
        encode_pieces(&data[..], post_order_outboard(hash, g, &ob[..]), &all, &mut wire).expect("encode");
        (data, hash, ob, g, wire)
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
    fn a_piece_set_counted_for_a_larger_blob_asks_for_nothing_past_the_end() {
        let data = bytes(1000);
        let (hash, _) = outboard_of(&data);
        let g = Geometry::new(1000).expect("small");
        // Piece 5 of ten, for a blob of one piece: nothing of this blob.
        let odd = PieceSet::single(10, 5);
        assert_eq!(encoded_len(g, &odd), 0);
        let mut d = PieceDecoder::new(hash, g, &odd);
        assert_eq!(d.remaining(), 0, "the encoding's length and the decoder's walk agree");
        let _ = d.push(&data);
        assert!(d.take_ready().is_empty() && d.verified().is_empty(), "no piece that was not asked for");
    }

    #[test]
    fn a_stream_failing_mid_response_is_the_senders_end_not_ours() {
        struct Failing<'a>(&'a [u8]);
        impl Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (data, hash, ob, g, wire) = encoded_blob(3 * PIECE_SIZE);
        let all = PieceSet::full(g.piece_count());
        let mut target = vec![0u8; data.len()];
        let rebuilt = post_order_outboard(hash, g, vec![0u8; ob.len()]);
        let d = decode_pieces(Failing(&wire[..wire.len() / 2]), &all, &mut target[..], rebuilt);
        let error = d.error.expect("cut short");
        assert!(error.is_peer_fault(), "{error:?}");
        assert!(!d.verified.is_empty() && !d.verified.is_complete(), "what arrived whole is kept");
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
        // Besides the boundaries of groups and pieces, those of chunks and of the tree's levels.
        let more = [1024, 1025, 2048, 3 * 1024, 17 * 1024 + 3, 64 * 1024 + 1];
        for &size in SIZES.iter().chain(&more) {
            let data = bytes(size as usize);
            let (hash, ob) = outboard_of(&data);
            let g = Geometry::new(size).expect("small");
            let mut proof = Vec::new();
            encode_size_proof(&data[..], post_order_outboard(hash, g, &ob[..]), &mut proof).expect("encode");
            // The last chunk and one hash per level: 12 levels for the 3,073 chunks of 3 MiB.
            assert!(proof.len() <= 1024 + 32 * 12, "size {size}: {} bytes", proof.len());
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

    use proptest::prelude::{Just, Strategy, any};

    proptest::proptest! {
        /// Random bytes of exactly a proof's length, so that the whole walk to the root runs.
        #[test]
        fn random_bytes_prove_no_size(
            (size, proof) in (0u64..(1 << 42)).prop_flat_map(|size| {
                (Just(size), proptest::collection::vec(any::<u8>(), proof_len(size)))
            })
        ) {
            proptest::prop_assert!(!check_size_proof(Hash::from([0x5a; 32]), size, &proof));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_rejected_and_not_written() {
        let size = 2 * PIECE_SIZE + 3 * CHUNK_GROUP_SIZE + 11;
        let (data, hash, ob, g, wire) = encoded_blob(size);
        let all = PieceSet::full(g.piece_count());
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
    fn the_encoder_writes_what_encode_pieces_writes_in_steps_of_any_size() {
        for &size in SIZES {
            let data = bytes(size as usize);
            let (hash, ob) = outboard_of(&data);
            let g = Geometry::new(size).expect("small");
            let n = g.piece_count();
            let mut sets = vec![PieceSet::full(n), PieceSet::single(n, n - 1)];
            if n > 2 {
                let mut ends = PieceSet::single(n, 0);
                ends.insert(n - 1);
                sets.push(ends);
            }
            for pieces in sets {
                let mut whole = Vec::new();
                encode_pieces(&data[..], post_order_outboard(hash, g, &ob[..]), &pieces, &mut whole).expect("encode");
                for step in [1, 64, CHUNK_GROUP_SIZE as usize, 100_000] {
                    let mut encoder = PieceEncoder::new(hash, g, &pieces);
                    let mut out = Vec::new();
                    let mut calls = 0;
                    loop {
                        let before = out.len();
                        let ended = encoder
                            .encode_some(&data[..], post_order_outboard(hash, g, &ob[..]), &mut out, step)
                            .expect("intact");
                        calls += 1;
                        assert!(ended || out.len() >= before + step, "size {size} step {step}: a short step");
                        if ended {
                            break;
                        }
                    }
                    assert_eq!(out, whole, "size {size} pieces {pieces:?} step {step}");
                    assert!(calls <= whole.len() / step + 2, "size {size} step {step}: {calls} calls");
                }
            }
        }
    }

    #[test]
    fn the_encoder_stops_at_a_rotten_group_without_writing_it() {
        let size = 3 * PIECE_SIZE;
        let (mut data, hash, ob, g, _) = encoded_blob(size);
        let at = PIECE_SIZE as usize + 5 * CHUNK_GROUP_SIZE as usize + 3;
        data[at] ^= 1;
        let all = PieceSet::full(3);
        let mut encoder = PieceEncoder::new(hash, g, &all);
        let mut out = Vec::new();
        let mut result = Ok(false);
        while let Ok(false) = result {
            result = encoder.encode_some(&data[..], post_order_outboard(hash, g, &ob[..]), &mut out, 1000);
        }
        let Err(EncodeError::LeafHashMismatch(chunk)) = result else { panic!("{result:?}") };
        assert_eq!(g.piece_of(chunk.to_bytes()), 1);
        // What was written is the start of the good encoding, up to the rotten group.
        let mut good = data.clone();
        good[at] ^= 1;
        let mut whole = Vec::new();
        encode_pieces(&good[..], post_order_outboard(hash, g, &ob[..]), &all, &mut whole).expect("encode");
        assert!(whole.starts_with(&out), "only verified bytes were written");
        assert!(!out.windows(16).any(|w| w == &data[at - 3..at + 13]), "the rotten bytes were not written");
        assert!(
            encoder.encode_some(&good[..], post_order_outboard(hash, g, &ob[..]), &mut out, 1).is_err(),
            "it stays stopped"
        );
    }

    #[test]
    fn a_truncated_response_is_reported_as_such() {
        let size = 3 * PIECE_SIZE;
        let (_, hash, ob, g, mut wire) = encoded_blob(size);
        let all = PieceSet::full(3);
        wire.truncate(wire.len() - 100);
        let mut target = vec![0u8; size as usize];
        let d = decode_pieces(&wire[..], &all, &mut target[..], post_order_outboard(hash, g, vec![0u8; ob.len()]));
        assert!(matches!(d.error, Some(DecodeError::Truncated { piece: 2 })), "{:?}", d.error);
        assert_eq!(d.verified.iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn the_decoder_takes_any_slicing_and_hands_each_piece_out_as_soon_as_it_verified() {
        let size = 3 * PIECE_SIZE + 5 * CHUNK_GROUP_SIZE + 77;
        let (data, hash, ob, g, wire) = encoded_blob(size);
        let want = PieceSet::full(g.piece_count());
        for step in [1, 63, 64, 65, 1000, 16 * 1024, 16 * 1024 + 1, 100_000, wire.len()] {
            let mut decoder = PieceDecoder::new(hash, g, &want);
            assert_eq!(decoder.remaining(), wire.len() as u64);
            let mut target = vec![0u8; size as usize];
            let mut rebuilt = post_order_outboard(hash, g, vec![0u8; ob.len()]);
            let mut fed = 0;
            for slice in wire.chunks(step) {
                decoder.push(slice).expect("genuine bytes");
                fed += slice.len();
                for piece in decoder.take_ready() {
                    // Out with the push that brought its last byte (the encoding of pieces 0 to
                    // p is a prefix of the encoding of all of them).
                    let mut upto = PieceSet::empty(g.piece_count());
                    upto.insert_range(0..piece.piece() + 1);
                    let prefix = encoded_len(g, &upto) as usize;
                    assert!(fed - slice.len() < prefix && prefix <= fed, "step {step}: piece {}", piece.piece());
                    let bytes = g.piece_bytes(piece.piece());
                    assert_eq!(piece.data(), &data[bytes.start as usize..bytes.end as usize]);
                    piece.write_to(&mut target[..], &mut rebuilt).expect("in memory");
                }
            }
            assert_eq!(decoder.remaining(), 0, "step {step}");
            decoder.finish().expect("complete");
            assert_eq!(decoder.verified(), &want, "step {step}");
            assert_eq!(target, data, "step {step}");
            assert_eq!(rebuilt.data, ob, "step {step}");
            // Bytes past the end change nothing.
            decoder.push(b"trailing").expect("ignored");
            assert!(decoder.take_ready().is_empty());
        }
    }

    #[test]
    fn after_a_bad_group_the_decoder_hands_out_nothing_more() {
        let (_, hash, _, g, mut wire) = encoded_blob(3 * PIECE_SIZE);
        let all = PieceSet::full(3);
        // A bit flipped in the middle of piece 1's data.
        let pos = wire.len() / 2;
        wire[pos] ^= 0x04;
        let mut decoder = PieceDecoder::new(hash, g, &all);
        let mut out = Vec::new();
        let mut error = None;
        for slice in wire.chunks(4096) {
            if let Err(e) = decoder.push(slice) {
                error.get_or_insert(e.to_string());
            }
            out.extend(decoder.take_ready().into_iter().map(|p| p.piece()));
        }
        assert_eq!(error.as_deref(), Some("piece 1 failed BLAKE3 verification"));
        assert_eq!(out, vec![0]);
        assert_eq!(decoder.remaining(), 0, "a failed decoder expects nothing more");
        assert!(matches!(decoder.finish(), Err(DecodeError::Corrupt { piece: 1 })));
        let truncated = PieceDecoder::new(hash, g, &all);
        assert!(matches!(truncated.finish(), Err(DecodeError::Truncated { piece: 0 })));
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
