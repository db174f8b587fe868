//! The memory tier: recently served pieces, bounded in bytes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bytes::Bytes;
use lru::LruCache;
use shoal_protocol::{Hash, PieceIndex};

#[derive(Debug)]
pub(crate) struct HotPieces {
    pieces: LruCache<(Hash, PieceIndex), Bytes>,
    /// The pieces of each blob in the tier: a blob that leaves the store (evicted, deleted, a
    /// piece gone bad) leaves the tier without a look at every piece in it, under the store's
    /// lock, once per blob.
    by_blob: HashMap<Hash, Vec<PieceIndex>>,
    used: usize,
    capacity: usize,
}

impl HotPieces {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { pieces: LruCache::unbounded(), by_blob: HashMap::new(), used: 0, capacity }
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
            None => self.by_blob.entry(hash).or_default().push(piece),
        }
        self.used += cost(&bytes);
        while self.used > self.capacity {
            let Some((key, old)) = self.pieces.pop_lru() else { break };
            self.used -= cost(&old);
            self.unindex(key);
        }
    }

    /// Takes a piece that left the tier out of its blob's list.
    fn unindex(&mut self, (hash, piece): (Hash, PieceIndex)) {
        if let Entry::Occupied(mut listed) = self.by_blob.entry(hash) {
            let pieces = listed.get_mut();
            if let Some(at) = pieces.iter().position(|p| *p == piece) {
                pieces.swap_remove(at);
            }
            if pieces.is_empty() {
                listed.remove();
            }
        }
    }

    pub(crate) fn forget_blob(&mut self, hash: Hash) {
        for piece in self.by_blob.remove(&hash).unwrap_or_default() {
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
/// takes (its key, the list's links, the buffer's header, its place in its blob's list and, for
/// a blob's only piece, that list). Counting the bytes alone, a tier of
/// 64 MiB could hold 64 million one-byte pieces (a small blob's only piece), gigabytes of entries.
fn cost(bytes: &Bytes) -> usize {
    bytes.len() + ENTRY_COST
}

/// The memory an entry takes besides its bytes, rounded up.
const ENTRY_COST: usize = 192;

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
        let mut hot = HotPieces::new(64 * (ENTRY_COST + 4));
        let blobs: Vec<Hash> = (0..8u8).map(|i| Hash::of(&[i])).collect();
        // More pieces than the tier holds, the blobs' pieces interleaved: the oldest go.
        for piece in 0..20 {
            for h in &blobs {
                hot.insert(*h, piece, Bytes::from_static(b"1234"));
            }
        }
        let listed = |hot: &HotPieces| hot.by_blob.values().map(Vec::len).sum::<usize>();
        assert_eq!(hot.pieces.len(), 64);
        assert_eq!(listed(&hot), 64, "every piece in the tier is listed, and only those");
        hot.forget_blob(blobs[3]);
        assert_eq!(hot.pieces.len(), 56);
        assert!((0..20).all(|p| hot.get(blobs[3], p).is_none()));
        assert!(hot.get(blobs[2], 19).is_some() && hot.get(blobs[4], 19).is_some(), "the others stay");
        assert_eq!(listed(&hot), 56);
        assert_eq!(hot.used(), 56 * (ENTRY_COST + 4));
        // A piece put again is listed once.
        hot.insert(blobs[0], 19, Bytes::from_static(b"5678"));
        assert_eq!(listed(&hot), 56);
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
