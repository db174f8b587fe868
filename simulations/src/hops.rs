//! Lookup hops, replayed over the live DHT.
//!
//! libp2p's Kademlia reports how many requests a query sent, not how deep it went. To count hops
//! the experiment snapshots every node's routing table and which nodes store the provider record,
//! then replays Kademlia's iterative lookup over those tables in synchronous rounds: each round
//! asks the `ALPHA` closest peers not yet asked among the `K` closest known, and each answers with
//! the `K` peers of its own table closest to the key. The hop count is the round in which a node
//! holding the record is first asked.

use std::collections::{HashMap, HashSet};

use shoal_node::libp2p::PeerId;
use shoal_node::libp2p::kad::{KBucketDistance, KBucketKey, RecordKey};

/// Requests in flight per round (Kademlia's α, libp2p's default parallelism).
pub const ALPHA: usize = 3;

/// The replication parameter (Kademlia's k, libp2p's default).
pub const K: usize = 20;

/// Every node's routing table and which nodes store the provider record of one key.
#[derive(Debug, Default)]
pub struct DhtView {
    /// Routing table per node.
    pub tables: HashMap<PeerId, Vec<PeerId>>,
    /// Nodes that store a provider record for the key.
    pub holders: HashSet<PeerId>,
}

impl DhtView {
    /// Hops from `start` to the first node holding the record, or `None` if the replayed lookup
    /// runs out of peers without reaching one. Zero if `start` holds it.
    pub fn hops(&self, start: PeerId, key: &RecordKey) -> Option<u32> {
        if self.holders.contains(&start) {
            return Some(0);
        }
        let target = KBucketKey::new(key.clone());
        let distance = |p: &PeerId| -> KBucketDistance { target.distance(&KBucketKey::from(*p)) };
        let mut known: Vec<(KBucketDistance, PeerId)> = Vec::new();
        let mut seen: HashSet<PeerId> = HashSet::from([start]);
        let mut asked: HashSet<PeerId> = HashSet::new();
        let learn = |peers: &[PeerId], known: &mut Vec<(KBucketDistance, PeerId)>, seen: &mut HashSet<PeerId>| {
            for p in closest(peers, &distance, K) {
                if seen.insert(p) {
                    known.push((distance(&p), p));
                }
            }
            known.sort();
        };
        learn(self.tables.get(&start).map_or(&[][..], Vec::as_slice), &mut known, &mut seen);
        let mut round = 0;
        loop {
            round += 1;
            let batch: Vec<PeerId> =
                known.iter().take(K).map(|(_, p)| *p).filter(|p| !asked.contains(p)).take(ALPHA).collect();
            if batch.is_empty() {
                return None;
            }
            if batch.iter().any(|p| self.holders.contains(p)) {
                return Some(round);
            }
            for p in batch {
                asked.insert(p);
                learn(self.tables.get(&p).map_or(&[][..], Vec::as_slice), &mut known, &mut seen);
            }
        }
    }
}

fn closest(peers: &[PeerId], distance: &impl Fn(&PeerId) -> KBucketDistance, n: usize) -> Vec<PeerId> {
    let mut v: Vec<(KBucketDistance, PeerId)> = peers.iter().map(|p| (distance(p), *p)).collect();
    v.sort();
    v.into_iter().take(n).map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain where each node knows only the next: the holder at the end is as many hops away
    /// as there are links.
    #[test]
    fn a_chain_takes_one_hop_per_link() {
        let peers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let mut view = DhtView::default();
        for w in peers.windows(2) {
            view.tables.insert(w[0], vec![w[1]]);
        }
        view.holders.insert(peers[5]);
        let key = RecordKey::new(&b"blob");
        assert_eq!(view.hops(peers[0], &key), Some(5));
        assert_eq!(view.hops(peers[4], &key), Some(1));
        assert_eq!(view.hops(peers[5], &key), Some(0));
    }

    #[test]
    fn an_unreachable_holder_is_none() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let view = DhtView { tables: HashMap::from([(a, vec![b])]), holders: HashSet::from([c]) };
        assert_eq!(view.hops(a, &RecordKey::new(&b"blob")), None);
    }

    /// Everyone knows everyone: the holder is asked in the first round if it is among the α
    /// closest, and in any case within ⌈k/α⌉ rounds.
    #[test]
    fn a_full_mesh_finds_it_at_once() {
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let key = RecordKey::new(&b"blob");
        let target = KBucketKey::new(key.clone());
        let mut by_distance = peers[1..].to_vec();
        by_distance.sort_by_key(|p| target.distance(&KBucketKey::from(*p)));
        let mut view = DhtView::default();
        for p in &peers {
            view.tables.insert(*p, peers.iter().filter(|q| *q != p).copied().collect());
        }
        view.holders.insert(by_distance[0]);
        assert_eq!(view.hops(peers[0], &key), Some(1));
    }
}
