//! Piece geometry: how a blob is cut into the fixed-size ranges that peers advertise, request and
//! cache, and sets of piece indices.
//!
//! Two sizes matter. The *chunk group* (16 KiB) is the verification unit: the outboard stores one
//! hash pair per group, so any group can be checked on its own. The *piece* ([`PIECE_SIZE`]) is the
//! scheduling unit: have-maps, requests and the verified bitmap in the store count pieces.

use std::ops::Range;

use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use serde::Serialize;

/// log2 of the number of 1 KiB BLAKE3 chunks in a chunk group: 2^4 KiB = 16 KiB.
pub const CHUNK_GROUP_LOG: u8 = 4;

/// The verification unit, as `bao-tree` knows it.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(CHUNK_GROUP_LOG);

/// The size of a chunk group in bytes.
pub const CHUNK_GROUP_SIZE: u64 = 1024 << CHUNK_GROUP_LOG;

/// The scheduling unit in bytes: 128 KiB, eight chunk groups.
///
/// A peer passes on only pieces it holds whole and verified, so in a crowd each piece waits at
/// every hop for its whole upload: halving the piece halves that wait. Measured with `shoal-netsim`
/// (`docs/ARCHITECTURE.md`, *netsim*, "Smaller pieces"): a 100-node flash crowd of a 4 MiB blob
/// finished at 1.85-1.90x T_min against 2.32-2.34x with 256 KiB pieces. `cargo bench -p
/// shoal-protocol --bench piece_size` measures the cost: serving and verifying piece by piece pays
/// the per-request proof and setup more often below 256 KiB, which the fetch offsets by asking for
/// runs of contiguous pieces in one request (up to 8, 1 MiB). At 128 KiB a 1 GiB blob has 8,192
/// pieces and a have-map bitmap of 1 KiB.
pub const PIECE_SIZE: u64 = 128 * 1024;

/// log2 of the number of BLAKE3 chunks in a piece.
const PIECE_CHUNK_LOG: u32 = (PIECE_SIZE / 1024).trailing_zeros();

/// The largest blob Shoal handles: 2^41 bytes (2 TiB), 2^24 pieces. Keeps piece indices in `u32`
/// and every have-map bounded.
pub const MAX_BLOB_SIZE: u64 = 1 << 41;

/// The index of a piece within its blob.
pub type PieceIndex = u32;

/// The shape of one blob: its size and how it is cut into pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
}

/// A blob size above [`MAX_BLOB_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("blob of {size} bytes is larger than the {MAX_BLOB_SIZE}-byte limit")]
pub struct TooLarge {
    /// The size that was refused.
    pub size: u64,
}

impl Geometry {
    /// The geometry of a blob of `size` bytes.
    pub fn new(size: u64) -> Result<Self, TooLarge> {
        if size > MAX_BLOB_SIZE {
            return Err(TooLarge { size });
        }
        Ok(Self { size })
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The number of pieces. An empty blob has one (empty) piece, so that it can be requested and
    /// verified like any other.
    pub fn piece_count(&self) -> u32 {
        // MAX_BLOB_SIZE / PIECE_SIZE fits in u32, checked in `new`.
        self.size.div_ceil(PIECE_SIZE).max(1) as u32
    }

    /// The index of the last piece; it carries the proof of the blob's size.
    pub fn last_piece(&self) -> PieceIndex {
        self.piece_count() - 1
    }

    /// The byte range of piece `index`, clipped to the blob. Empty past the end.
    pub fn piece_bytes(&self, index: PieceIndex) -> Range<u64> {
        let start = (u64::from(index) * PIECE_SIZE).min(self.size);
        let end = (start + PIECE_SIZE).min(self.size);
        start..end
    }

    /// The length of piece `index` in bytes.
    pub fn piece_len(&self, index: PieceIndex) -> u64 {
        let r = self.piece_bytes(index);
        r.end - r.start
    }

    /// The piece that holds byte `offset`.
    pub fn piece_of(&self, offset: u64) -> PieceIndex {
        (offset.min(self.size.saturating_sub(1)) / PIECE_SIZE) as u32
    }

    /// The `bao-tree` tree of this blob at Shoal's chunk-group size.
    pub fn tree(&self) -> BaoTree {
        BaoTree::new(self.size, BLOCK_SIZE)
    }

    /// The BLAKE3 chunk ranges that cover `pieces`, for encoding and decoding with `bao-tree`.
    pub fn chunk_ranges(&self, pieces: &PieceSet) -> ChunkRanges {
        let mut out = ChunkRanges::empty();
        for r in pieces.ranges() {
            // A set counted for a larger blob asks for nothing past this one's end.
            if r.start >= self.piece_count() {
                continue;
            }
            let start = ChunkNum(u64::from(r.start) << PIECE_CHUNK_LOG);
            if r.end >= self.piece_count() {
                // The last piece: an open range also asks for the last chunk when the blob is
                // empty or ends exactly on a piece boundary, which is what proves the size.
                out |= ChunkRanges::from(start..);
            } else {
                out |= ChunkRanges::from(start..ChunkNum(u64::from(r.end) << PIECE_CHUNK_LOG));
            }
        }
        out
    }

    /// The size of a `bao-tree` post-order outboard for this blob, in bytes.
    pub fn outboard_size(&self) -> u64 {
        self.tree().outboard_size()
    }
}

/// A set of piece indices below a known piece count: which pieces a store holds, a peer advertises,
/// or a request asks for.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PieceSet {
    len: u32,
    words: Vec<u64>,
}

impl std::fmt::Debug for PieceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.ranges()).finish()
    }
}

impl PieceSet {
    /// An empty set for a blob of `piece_count` pieces.
    pub fn empty(piece_count: u32) -> Self {
        Self { len: piece_count, words: vec![0; piece_count.div_ceil(64) as usize] }
    }

    /// The set of every piece of a blob of `piece_count` pieces.
    pub fn full(piece_count: u32) -> Self {
        let mut s = Self::empty(piece_count);
        s.insert_range(0..piece_count);
        s
    }

    /// A set holding only `index`.
    pub fn single(piece_count: u32, index: PieceIndex) -> Self {
        let mut s = Self::empty(piece_count);
        s.insert(index);
        s
    }

    /// The number of pieces in the blob this set is about (not the number in the set).
    pub fn piece_count(&self) -> u32 {
        self.len
    }

    /// Adds `index`; returns whether it was new. Indices past the piece count are ignored.
    pub fn insert(&mut self, index: PieceIndex) -> bool {
        if index >= self.len {
            return false;
        }
        let (w, b) = ((index / 64) as usize, index % 64);
        let new = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        new
    }

    /// Adds every index in `range` below the piece count, a word at a time: a peer's run of a
    /// whole 2 TiB blob (2^24 pieces) costs 2^18 steps, not 2^24.
    pub fn insert_range(&mut self, range: Range<PieceIndex>) {
        let end = range.end.min(self.len);
        let mut i = range.start;
        while i < end {
            let (w, b) = ((i / 64) as usize, i % 64);
            let n = (64 - b).min(end - i);
            self.words[w] |= (u64::MAX >> (64 - n)) << b;
            i += n;
        }
    }

    /// Removes `index`; returns whether it was present.
    pub fn remove(&mut self, index: PieceIndex) -> bool {
        let had = self.contains(index);
        if had {
            self.words[(index / 64) as usize] &= !(1 << (index % 64));
        }
        had
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: PieceIndex) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// The number of pieces in the set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether the set holds no piece.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Whether the set holds every piece of the blob.
    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    /// The indices in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = PieceIndex> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u32 * 64 + b)
            })
        })
    }

    /// The set as maximal runs of consecutive indices, ascending, found a word at a time: a
    /// complete 2 TiB blob's one run costs 2^18 steps, not 2^24 (every have-map sent is its runs).
    pub fn ranges(&self) -> impl Iterator<Item = Range<PieceIndex>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let start = self.next_from(at, true)?;
            let end = self.next_from(start, false).unwrap_or(self.len);
            at = end;
            Some(start..end)
        })
    }

    /// The first index at or after `from`, below the piece count, that is in the set (`held`) or
    /// is not.
    fn next_from(&self, from: PieceIndex, held: bool) -> Option<PieceIndex> {
        if from >= self.len {
            return None;
        }
        let word = |w: usize| if held { self.words[w] } else { !self.words[w] };
        let mut w = (from / 64) as usize;
        let mut bits = word(w) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                // Bits past the piece count are never set, so a clear one found there is the end.
                let i = w as u32 * 64 + bits.trailing_zeros();
                return (i < self.len).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = word(w);
        }
    }

    /// The pieces in both sets.
    pub fn intersection(&self, other: &PieceSet) -> PieceSet {
        let words =
            self.words.iter().zip(other.words.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a & b).collect();
        Self { len: self.len, words }
    }

    /// Whether the sets share a piece; allocates nothing.
    pub fn intersects(&self, other: &PieceSet) -> bool {
        self.words.iter().zip(other.words.iter()).any(|(a, b)| a & b != 0)
    }

    /// The pieces in `self` but not in `other`.
    pub fn difference(&self, other: &PieceSet) -> PieceSet {
        let words =
            self.words.iter().zip(other.words.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a & !b).collect();
        Self { len: self.len, words }
    }

    /// Adds every piece of `other`.
    pub fn union_with(&mut self, other: &PieceSet) {
        for i in other.iter() {
            self.insert(i);
        }
    }

    /// The bitmap as little-endian bytes, one bit per piece, for the store's persistent map.
    pub fn to_bitmap(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    /// Reads a bitmap written by [`PieceSet::to_bitmap`]. Bits past `piece_count` are ignored;
    /// a short bitmap leaves the missing pieces out.
    pub fn from_bitmap(piece_count: u32, bitmap: &[u8]) -> Self {
        let mut s = Self::empty(piece_count);
        for (i, byte) in bitmap.iter().enumerate().take(piece_count.div_ceil(8) as usize) {
            for b in 0..8 {
                if byte & (1 << b) != 0 {
                    s.insert(i as u32 * 8 + b);
                }
            }
        }
        s
    }
}

/// A [`PieceSet`] as it travels: the piece count and the runs of consecutive indices, each
/// `(start, length)`, ascending, disjoint and within the count (checked as they are decoded).
///
/// Runs keep a complete blob's have-map at one entry whatever its size; the number of runs on the
/// wire is bounded by [`crate::wire::MAX_RUNS`]. A request's piece sets stay runs until the
/// server knows the piece count of the blob it holds ([`PieceRuns::to_set`]): a set is a bit per
/// piece of the count its sender claims, and a request of 40 bytes claiming the largest blob
/// would make a server build 2 MiB of bitmap for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PieceRuns {
    pub(crate) piece_count: u32,
    pub(crate) runs: Vec<(u32, u32)>,
}

impl PieceRuns {
    /// The number of pieces the sender counts in the blob.
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// The number of pieces in the runs.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|&(_, len)| u64::from(len)).sum()
    }

    /// The pieces as a set of a blob of `piece_count` pieces (the blob held, which the sender
    /// may count otherwise): those of the runs below it.
    pub fn to_set(&self, piece_count: u32) -> PieceSet {
        let mut set = PieceSet::empty(piece_count);
        for &(start, len) in &self.runs {
            set.insert_range(start..start.saturating_add(len));
        }
        set
    }
}

impl From<&PieceSet> for PieceRuns {
    /// The set's runs, its first [`crate::wire::MAX_RUNS`] if it has more (see
    /// [`PieceSet::first_runs`]).
    fn from(set: &PieceSet) -> Self {
        let runs = set.ranges().take(crate::wire::MAX_RUNS).map(|r| (r.start, r.end - r.start)).collect();
        PieceRuns { piece_count: set.piece_count(), runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_at_the_boundaries() {
        let cases: &[(u64, u32, u64)] = &[
            // (size, pieces, length of the last piece)
            (0, 1, 0),
            (1, 1, 1),
            (16 * 1024 - 1, 1, 16 * 1024 - 1),
            (16 * 1024, 1, 16 * 1024),
            (16 * 1024 + 1, 1, 16 * 1024 + 1),
            (PIECE_SIZE - 1, 1, PIECE_SIZE - 1),
            (PIECE_SIZE, 1, PIECE_SIZE),
            (PIECE_SIZE + 1, 2, 1),
            (5 * 1024 * 1024 + 7, 41, 7),
        ];
        for &(size, pieces, last_len) in cases {
            let g = Geometry::new(size).expect("small");
            assert_eq!(g.piece_count(), pieces, "size {size}");
            assert_eq!(g.piece_len(g.last_piece()), last_len, "size {size}");
            let total: u64 = (0..pieces).map(|i| g.piece_len(i)).sum();
            assert_eq!(total, size, "pieces cover the blob exactly, size {size}");
        }
        assert_eq!(Geometry::new(MAX_BLOB_SIZE + 1), Err(TooLarge { size: MAX_BLOB_SIZE + 1 }));
        assert_eq!(Geometry::new(MAX_BLOB_SIZE).expect("max").piece_count(), 1 << 24);
    }

    #[test]
    fn a_range_is_inserted_as_its_pieces_one_by_one_would_be() {
        for len in [1, 63, 64, 65, 130, 200] {
            for start in 0..len + 2 {
                for end in [start, start + 1, start + 63, start + 64, start + 65, len, len + 5] {
                    let mut words = PieceSet::empty(len);
                    words.insert(len - 1);
                    let mut one_by_one = words.clone();
                    words.insert_range(start..end);
                    for i in start..end {
                        one_by_one.insert(i);
                    }
                    assert_eq!(words, one_by_one, "{start}..{end} of {len}");
                }
            }
        }
    }

    #[test]
    fn sets_intersect_as_their_intersection_says() {
        let of = |len: u32, ix: &[u32]| {
            let mut s = PieceSet::empty(len);
            ix.iter().for_each(|&i| {
                s.insert(i);
            });
            s
        };
        let a = of(130, &[0, 64, 129]);
        for (b, meets) in [(of(130, &[1, 65, 128]), false), (of(130, &[129]), true), (of(130, &[]), false)] {
            assert_eq!(a.intersects(&b), meets, "{a:?} and {b:?}");
            assert_eq!(a.intersects(&b), !a.intersection(&b).is_empty());
        }
        assert!(!of(64, &[3]).intersects(&of(130, &[64])), "pieces past the shorter set are in neither");
    }

    #[test]
    fn runs_are_found_as_a_bit_by_bit_walk_finds_them() {
        let walk = |s: &PieceSet| {
            let mut runs: Vec<Range<PieceIndex>> = Vec::new();
            for i in s.iter() {
                match runs.last_mut() {
                    Some(r) if r.end == i => r.end += 1,
                    _ => runs.push(i..i + 1),
                }
            }
            runs
        };
        let mut seed = 7u64;
        for len in [1, 2, 63, 64, 65, 127, 128, 129, 300] {
            assert_eq!(PieceSet::full(len).ranges().collect::<Vec<_>>(), vec![0..len]);
            assert_eq!(PieceSet::empty(len).ranges().count(), 0);
            for density in [1, 8, 32, 56, 63] {
                let mut s = PieceSet::empty(len);
                for i in 0..len {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if (seed >> 58) < density {
                        s.insert(i);
                    }
                }
                assert_eq!(s.ranges().collect::<Vec<_>>(), walk(&s), "{len} pieces, density {density}/64");
            }
        }
    }

    #[test]
    fn piece_set_operations() {
        let mut s = PieceSet::empty(130);
        assert!(s.is_empty());
        assert!(s.insert(0));
        assert!(!s.insert(0));
        s.insert_range(63..66);
        s.insert(129);
        assert!(!s.insert(130), "past the piece count");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 65, 129]);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![0..1, 63..66, 129..130]);
        assert_eq!(s.count(), 5);
        assert!(s.remove(64));
        assert!(!s.contains(64));
        let back = PieceSet::from_bitmap(130, &s.to_bitmap());
        assert_eq!(back, s);
        assert!(PieceSet::full(130).is_complete());
        assert_eq!(PieceSet::full(130).difference(&s).count(), 126);
        assert_eq!(PieceSet::full(130).intersection(&s), s);
    }
}
