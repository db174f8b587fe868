//! The memory tier: recently served pieces, bounded in bytes.

use std::collections::BTreeSet;

use bytes::Bytes;
use lru::LruCache;
use shoal_protocol::{Hash, PieceIndex};

#[derive(Debug)]
pub(crate) struct HotPieces {
    pieces: LruCache<(Hash, PieceIndex), Bytes>,
    /// The pieces in the tier, in order of blob (by its hash's bytes) and piece: a blob that
    /// leaves the store (evicted, deleted, a piece gone bad) leaves the tier without a look at
    /// every piece in it, under the store's lock, once per blob.
    by_blob: BTreeSet<([u8; 32], PieceIndex)>,
    used: usize,
    capacity: usize,
}

impl HotPieces {
    pub(crate) fn new(capacity: usize) -> Self {
        // Unbounded: `put` then hands back only the value a key had (the tier's own bound
        // decides what goes, below).
        Self { pieces: LruCache::unbounded(), by_blob: BTreeSet::new(), used: 0, capacity }
    }

    pub(crate) fn get(&mut self, hash: Hash, piece: PieceIndex) -> Option<Bytes> {
        self.pieces.get(&(hash, piece)).cloned()
    }

    pub(crate) fn insert(&mut self, hash: Hash, piece: PieceIndex, bytes: Bytes) {
        if cost(&bytes) > self.capacity {
            return;
        }
        match self.pieces.put((hash, piece), bytes.clone()) {
            Some(old) => self.used -= cost(&old),
            None => {
                self.by_blob.insert((*hash.as_bytes(), piece));
            }
        }
        self.used += cost(&bytes);
        while self.used > self.capacity {
            let Some(((hash, piece), old)) = self.pieces.pop_lru() else { break };
            self.used -= cost(&old);
            self.by_blob.remove(&(*hash.as_bytes(), piece));
        }
    }

    pub(crate) fn forget_blob(&mut self, hash: Hash) {
        let key = *hash.as_bytes();
        let pieces: Vec<PieceIndex> = self.by_blob.range((key, 0)..=(key, PieceIndex::MAX)).map(|(_, p)| *p).collect();
        for piece in pieces {
            self.by_blob.remove(&(key, piece));
            if let Some(old) = self.pieces.pop(&(hash, piece)) {
                self.used -= cost(&old);
            }
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn used(&self) -> usize {
        self.used
    }
}

/// What an entry of `bytes` counts against the tier's bound: its bytes and what the entry itself
/// takes, estimated: the LRU's node (its key, the buffer's handle, the list's links: 96 bytes as
/// allocated) and its slot in the LRU's map (about 30 at its load), the buffer's shared header
/// and what allocating the bytes adds (about 60), and its place in `by_blob` (a 36-byte key in a
/// B-tree node, about 60 with the node's share). Counting the bytes alone, a tier of
/// 64 MiB could hold 64 million one-byte pieces (a small blob's only piece), gigabytes of entries.
fn cost(bytes: &Bytes) -> usize {
    bytes.len() + ENTRY_COST
}

/// The memory an entry takes besides its bytes, rounded up.
const ENTRY_COST: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_bound() {
        let mut hot = HotPieces::new(ENTRY_COST + 10);
        let h = Hash::of(b"x");
        hot.insert(h, 0, Bytes::from_static(b"123456"));
        hot.insert(h, 1, Bytes::from_static(b"123456"));
        assert!(hot.used() <= ENTRY_COST + 10);
        assert!(hot.get(h, 0).is_none(), "the older piece left");
        assert!(hot.get(h, 1).is_some());
        hot.insert(h, 2, Bytes::from(vec![0; 11]));
        assert!(hot.get(h, 2).is_none(), "a piece larger than the tier is not kept");
        hot.forget_blob(h);
        assert_eq!(hot.used(), 0);
        assert!(hot.by_blob.is_empty());
    }

    #[test]
    fn a_blob_forgotten_leaves_with_its_pieces_only_and_the_lists_follow_the_tier() {
        // What the blobs' lists name is exactly what the tier holds, and what it counts is what
        // its pieces cost.
        let in_step = |hot: &HotPieces| {
            let held: BTreeSet<([u8; 32], PieceIndex)> =
                hot.pieces.iter().map(|((h, p), _)| (*h.as_bytes(), *p)).collect();
            assert_eq!(held, hot.by_blob, "the lists name the pieces in the tier, and only those");
            assert_eq!(hot.used(), hot.pieces.iter().map(|(_, b)| cost(b)).sum::<usize>());
        };
        let mut hot = HotPieces::new(64 * (ENTRY_COST + 4));
        let blobs: Vec<Hash> = (0..8u8).map(|i| Hash::of(&[i])).collect();
        // More pieces than the tier holds, the blobs' pieces interleaved: the oldest go.
        for piece in 0..20 {
            for h in &blobs {
                hot.insert(*h, piece, Bytes::from_static(b"1234"));
            }
        }
        assert_eq!(hot.pieces.len(), 64);
        in_step(&hot);
        hot.forget_blob(blobs[3]);
        assert_eq!(hot.pieces.len(), 56);
        assert!((0..20).all(|p| hot.get(blobs[3], p).is_none()));
        assert!(hot.get(blobs[2], 19).is_some() && hot.get(blobs[4], 19).is_some(), "the others stay");
        in_step(&hot);
        // A piece put again is listed once.
        hot.insert(blobs[0], 19, Bytes::from_static(b"5678"));
        assert_eq!(hot.by_blob.len(), 56);
        in_step(&hot);
        // Pieces of every size put, read, and blobs forgotten, in a mixed order.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (h, piece) = (blobs[(x % 8) as usize], ((x >> 8) % 24) as PieceIndex);
            match (x >> 16) % 10 {
                0 => hot.forget_blob(h),
                1..=3 => drop(hot.get(h, piece)),
                _ => hot.insert(h, piece, Bytes::from(vec![0; ((x >> 24) % 40) as usize])),
            }
            in_step(&hot);
            assert!(hot.used() <= hot.capacity());
        }
        for h in &blobs {
            hot.forget_blob(*h);
        }
        assert!(hot.pieces.is_empty() && hot.by_blob.is_empty());
        assert_eq!(hot.used(), 0);
    }

    #[test]
    fn tiny_pieces_count_what_their_entries_take() {
        let mut hot = HotPieces::new(1 << 20);
        for i in 0..100_000u32 {
            hot.insert(Hash::of(&i.to_le_bytes()), 0, Bytes::from_static(b"1"));
        }
        assert!(hot.pieces.len() <= (1 << 20) / ENTRY_COST, "{} entries", hot.pieces.len());
    }
}
