//! The memory tier: recently served pieces, bounded in bytes.

use bytes::Bytes;
use lru::LruCache;
use shoal_protocol::{Hash, PieceIndex};

#[derive(Debug)]
pub(crate) struct HotPieces {
    pieces: LruCache<(Hash, PieceIndex), Bytes>,
    used: usize,
    capacity: usize,
}

impl HotPieces {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { pieces: LruCache::unbounded(), used: 0, capacity }
    }

    pub(crate) fn get(&mut self, hash: Hash, piece: PieceIndex) -> Option<Bytes> {
        self.pieces.get(&(hash, piece)).cloned()
    }

    pub(crate) fn insert(&mut self, hash: Hash, piece: PieceIndex, bytes: Bytes) {
        if cost(&bytes) > self.capacity {
            return;
        }
        if let Some(old) = self.pieces.put((hash, piece), bytes.clone()) {
            self.used -= cost(&old);
        }
        self.used += cost(&bytes);
        while self.used > self.capacity {
            let Some((_, old)) = self.pieces.pop_lru() else { break };
            self.used -= cost(&old);
        }
    }

    pub(crate) fn forget_blob(&mut self, hash: Hash) {
        let keys: Vec<_> = self.pieces.iter().filter(|((h, _), _)| *h == hash).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(old) = self.pieces.pop(&k) {
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
/// takes (its key, the list's links, the buffer's header). Counting the bytes alone, a tier of
/// 64 MiB could hold 64 million one-byte pieces (a small blob's only piece), gigabytes of entries.
fn cost(bytes: &Bytes) -> usize {
    bytes.len() + ENTRY_COST
}

/// The memory an entry takes besides its bytes, rounded up.
const ENTRY_COST: usize = 128;

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
