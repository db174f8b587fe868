//! The byte-bounded eviction order over unpinned blobs.

use lru::LruCache;
use shoal_protocol::Hash;

/// Unpinned blobs in least-recently-used order, with the bytes each occupies on disk, and a bound
/// on their sum that is never exceeded.
#[derive(Debug)]
pub(crate) struct ByteLru {
    order: LruCache<Hash, u64>,
    used: u64,
    capacity: u64,
}

/// Why a blob cannot enter the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversized {
    pub(crate) bytes: u64,
    pub(crate) capacity: u64,
}

impl ByteLru {
    pub(crate) fn new(capacity: u64) -> Self {
        Self { order: LruCache::unbounded(), used: 0, capacity }
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Marks `hash` as just used.
    pub(crate) fn touch(&mut self, hash: &Hash) {
        self.order.promote(hash);
    }

    /// Makes room for `bytes` and admits `hash` as the most recently used. Returns the blobs that
    /// had to leave, least recent first. Fails, evicting nothing, if `bytes` exceeds the capacity.
    pub(crate) fn admit(&mut self, hash: Hash, bytes: u64) -> Result<Vec<Hash>, Oversized> {
        if bytes > self.capacity {
            return Err(Oversized { bytes, capacity: self.capacity });
        }
        self.remove(&hash);
        let mut evicted = Vec::new();
        while self.used + bytes > self.capacity {
            match self.order.pop_lru() {
                Some((old, old_bytes)) => {
                    self.used -= old_bytes;
                    evicted.push(old);
                }
                None => break,
            }
        }
        self.order.put(hash, bytes);
        self.used += bytes;
        debug_assert!(self.used <= self.capacity);
        Ok(evicted)
    }

    /// Charges `hash`, if it is in the order, `bytes` if that is more than it is charged now,
    /// as the most recently used, evicting others for the room. Returns the blobs that had to
    /// leave, least recent first: `hash` itself if `bytes` is past the capacity (lowered since
    /// it was admitted).
    pub(crate) fn grow(&mut self, hash: Hash, bytes: u64) -> Vec<Hash> {
        match self.order.peek(&hash) {
            Some(&now) if bytes > now => self.admit(hash, bytes).unwrap_or_else(|_| {
                self.remove(&hash);
                vec![hash]
            }),
            Some(_) => {
                self.touch(&hash);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Whether `bytes` more fit without evicting anything.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        self.used.saturating_add(bytes) <= self.capacity
    }

    /// Takes `hash` out of the eviction order (pinned or deleted). Returns its bytes.
    pub(crate) fn remove(&mut self, hash: &Hash) -> Option<u64> {
        let bytes = self.order.pop(hash)?;
        self.used -= bytes;
        Some(bytes)
    }

    /// Changes the bound, evicting what no longer fits.
    pub(crate) fn set_capacity(&mut self, capacity: u64) -> Vec<Hash> {
        self.capacity = capacity;
        let mut evicted = Vec::new();
        while self.used > self.capacity {
            let Some((old, bytes)) = self.order.pop_lru() else { break };
            self.used -= bytes;
            evicted.push(old);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn h(i: u8) -> Hash {
        Hash::from([i; 32])
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut lru = ByteLru::new(100);
        assert_eq!(lru.admit(h(1), 40), Ok(vec![]));
        assert_eq!(lru.admit(h(2), 40), Ok(vec![]));
        lru.touch(&h(1));
        assert_eq!(lru.admit(h(3), 40), Ok(vec![h(2)]));
        assert_eq!(lru.used(), 80);
        assert_eq!(lru.admit(h(4), 101), Err(Oversized { bytes: 101, capacity: 100 }));
        assert_eq!(lru.used(), 80, "a refused admission evicts nothing");
        assert_eq!(lru.set_capacity(50), vec![h(1)]);
        // Growing makes room among the others, least recent first, and never shrinks.
        let mut lru = ByteLru::new(100);
        lru.admit(h(1), 30).expect("fits");
        lru.admit(h(2), 30).expect("fits");
        lru.admit(h(3), 10).expect("fits");
        assert_eq!(lru.grow(h(3), 50), vec![h(1)]);
        assert_eq!(lru.grow(h(3), 20), vec![]);
        assert_eq!(lru.used(), 80);
        assert_eq!(lru.grow(h(9), 50), vec![], "not in the order");
        assert_eq!(lru.grow(h(3), 101), vec![h(3)], "past the bound: itself");
        assert_eq!(lru.used(), 30);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit(u8, u64),
        Grow(u8, u64),
        Touch(u8),
        Remove(u8),
        Shrink(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..20, 0u64..400).prop_map(|(k, b)| Op::Admit(k, b)),
            (0u8..20, 0u64..1200).prop_map(|(k, b)| Op::Grow(k, b)),
            (0u8..20).prop_map(Op::Touch),
            (0u8..20).prop_map(Op::Remove),
            (0u64..1000).prop_map(Op::Shrink),
        ]
    }

    proptest! {
        /// Whatever happens, the bytes held never exceed the bound, the accounting matches the
        /// entries, and every entry that left was reported.
        #[test]
        fn never_exceeds_its_bound(ops in proptest::collection::vec(op(), 1..200)) {
            let mut lru = ByteLru::new(1000);
            let mut model: std::collections::HashMap<Hash, u64> = Default::default();
            for op in ops {
                match op {
                    Op::Admit(k, b) => {
                        if let Ok(evicted) = lru.admit(h(k), b) {
                            model.remove(&h(k));
                            for e in evicted {
                                prop_assert!(model.remove(&e).is_some(), "evicted an unknown blob");
                            }
                            model.insert(h(k), b);
                        }
                    }
                    Op::Grow(k, b) => {
                        let held = model.get(&h(k)).copied();
                        let evicted = lru.grow(h(k), b);
                        for e in &evicted {
                            prop_assert!(model.remove(e).is_some(), "evicted an unknown blob");
                        }
                        match held {
                            // Never itself for room it has, and never to less than it held.
                            Some(was) if b <= lru.capacity() => {
                                prop_assert!(!evicted.contains(&h(k)));
                                model.insert(h(k), was.max(b));
                            }
                            Some(_) => prop_assert_eq!(evicted.last(), Some(&h(k))),
                            None => prop_assert!(evicted.is_empty(), "a blob not in the order grows nothing"),
                        }
                    }
                    Op::Touch(k) => lru.touch(&h(k)),
                    Op::Remove(k) => {
                        prop_assert_eq!(lru.remove(&h(k)), model.remove(&h(k)));
                    }
                    Op::Shrink(c) => {
                        for e in lru.set_capacity(c) {
                            prop_assert!(model.remove(&e).is_some());
                        }
                    }
                }
                prop_assert!(lru.used() <= lru.capacity());
                prop_assert_eq!(lru.used(), model.values().sum::<u64>());
                prop_assert_eq!(lru.len(), model.len());
            }
        }
    }
}
