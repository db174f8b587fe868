//! What a node holds against its peers, across fetches.
//!
//! A fetch drops a peer that fails it (`shoal_protocol::fetch`), for that fetch only. Two kinds of
//! failure are remembered here:
//! - a peer that advertised pieces and then sent none of those asked (a stale have-map, or a
//!   store that found rot in all of them on the way out; once per map, as the fetch counts
//!   them), or broke the protocol (perhaps a version we do not speak), is counted, and
//!   `shoal status` lists the count. An honest node does the first: its cache evicts, its disk
//!   rots. Nothing else follows from it. An answer that sends some of the pieces and a map
//!   without the rest is not counted: it puts its map right at no cost beyond the round trip;
//! - a peer that sent bytes that failed BLAKE3 verification, a size proof that did not check, or
//!   a size contradicting a proven one, lied: a Shoal node verifies every piece it serves as it
//!   reads it, so only a peer that is not one, or is broken, does so. It is *avoided*: no fetch
//!   asks it for anything for [`AVOID_FIRST`], doubling with each lie found after its term ended,
//!   to [`AVOID_MAX`], and the node names it in no peer-exchange hint (`crate::crowd`). Every
//!   fetch would otherwise spend a piece's bytes on it before dropping it again. Lies found
//!   during a term (by fetches that asked it before it began) do not lengthen it: several
//!   fetches finding one lie at once are one incident.
//!
//! A peer is known by its id, which costs nothing to make: a liar with a new id starts afresh, and
//! costs each fetch the one piece a fetch spends to find it out. The records are bounded
//! ([`MAX_RECORDS`]); past the bound the peer least recently penalised, or looked up while
//! avoided, is forgotten.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use lru::LruCache;

/// How long a peer is avoided after its first lie.
pub(crate) const AVOID_FIRST: Duration = Duration::from_secs(10 * 60);

/// The longest a peer is avoided, however often it lied.
pub(crate) const AVOID_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Peers remembered at most.
pub(crate) const MAX_RECORDS: usize = 65_536;

/// How many peers `shoal status` lists of each kind.
const LISTED: usize = 32;

/// What a peer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offence {
    /// Its have-map proved stale (it sent none of the pieces asked), or it broke the protocol.
    Failed,
    /// It sent bytes or a proof that failed verification.
    Lied,
}

#[derive(Debug, Clone, Copy, Default)]
struct Record {
    /// Every offence.
    offences: u32,
    lies: u32,
    avoid_until: Option<Instant>,
}

/// A peer avoided now, as `shoal status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Avoided {
    pub peer: PeerId,
    pub lies: u32,
    pub left: Duration,
}

/// The node's records of its peers' offences.
#[derive(Debug)]
pub(crate) struct Standing {
    records: Mutex<LruCache<PeerId, Record>>,
    /// When the last term of avoidance ends, in nanoseconds from `epoch`: until one begins (most
    /// nodes, all their lives) and after the last ends, [`Standing::avoids`] answers without the
    /// lock. The crowds ask it for each of a blob's holders under their own lock.
    until: AtomicU64,
    epoch: Instant,
}

impl Default for Standing {
    fn default() -> Self {
        Self::with_capacity(MAX_RECORDS)
    }
}

impl Standing {
    fn with_capacity(records: usize) -> Self {
        let cap = std::num::NonZeroUsize::new(records).unwrap_or(std::num::NonZeroUsize::MIN);
        Self { records: Mutex::new(LruCache::new(cap)), until: AtomicU64::new(0), epoch: Instant::now() }
    }

    /// `at` in nanoseconds from the epoch (0 before it).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn records(&self) -> std::sync::MutexGuard<'_, LruCache<PeerId, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `peer` committed `offence` at `now`.
    pub(crate) fn penalise(&self, peer: PeerId, offence: Offence, now: Instant) {
        let mut records = self.records();
        let record = records.get_or_insert_mut(peer, Record::default);
        record.offences = record.offences.saturating_add(1);
        if offence == Offence::Lied && record.avoid_until.is_none_or(|t| now >= t) {
            record.lies = record.lies.saturating_add(1);
            let until = now + AVOID_FIRST.saturating_mul(1 << (record.lies - 1).min(16)).min(AVOID_MAX);
            record.avoid_until = Some(until);
            self.until.fetch_max(self.nanos(until), Ordering::Release);
        }
    }

    /// Whether the node keeps away from `peer` at `now`: its fetches ask it nothing, its crowds
    /// name it to nobody and leave it no piece. A peer avoided is kept among the records
    /// as recently used: the peers merely counted must not push it out.
    pub(crate) fn avoids(&self, peer: &PeerId, now: Instant) -> bool {
        if self.nanos(now) >= self.until.load(Ordering::Acquire) {
            return false;
        }
        let mut records = self.records();
        let avoided = records.peek(peer).and_then(|r| r.avoid_until).is_some_and(|t| now < t);
        if avoided {
            records.promote(peer);
        }
        avoided
    }

    /// How many offences `peer` committed.
    pub(crate) fn offences(&self, peer: &PeerId) -> u32 {
        self.records().peek(peer).map_or(0, |r| r.offences)
    }

    /// The peers with the most offences, most first, and the peers avoided at `now`, longest
    /// first: at most 32 of each.
    pub(crate) fn report(&self, now: Instant) -> (Vec<(PeerId, u32)>, Vec<Avoided>) {
        let records = self.records();
        let mut counted: Vec<(PeerId, u32)> = records.iter().map(|(p, r)| (*p, r.offences)).collect();
        counted.sort_by_key(|e| std::cmp::Reverse(e.1));
        counted.truncate(LISTED);
        let mut avoided: Vec<Avoided> = records
            .iter()
            .filter_map(|(p, r)| {
                let left = r.avoid_until?.checked_duration_since(now).filter(|d| !d.is_zero())?;
                Some(Avoided { peer: *p, lies: r.lies, left })
            })
            .collect();
        avoided.sort_by_key(|a| std::cmp::Reverse(a.left));
        avoided.truncate(LISTED);
        (counted, avoided)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_liar_is_avoided_for_longer_each_time_and_a_stale_peer_is_only_counted() {
        let standing = Standing::default();
        let (stale, liar) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for _ in 0..5 {
            standing.penalise(stale, Offence::Failed, t0);
        }
        assert!(!standing.avoids(&stale, t0));
        assert_eq!(standing.offences(&stale), 5);

        standing.penalise(liar, Offence::Lied, t0);
        assert!(standing.avoids(&liar, t0));
        assert!(standing.avoids(&liar, t0 + AVOID_FIRST - Duration::from_secs(1)));
        assert!(!standing.avoids(&liar, t0 + AVOID_FIRST));
        // Again, after its first term: twice as long from then. Found by several fetches at
        // once, it is one lie.
        let t1 = t0 + AVOID_FIRST;
        for _ in 0..5 {
            standing.penalise(liar, Offence::Lied, t1);
        }
        assert!(standing.avoids(&liar, t1 + 2 * AVOID_FIRST - Duration::from_secs(1)));
        assert!(!standing.avoids(&liar, t1 + 2 * AVOID_FIRST));
        let (counted, avoided) = standing.report(t1);
        assert_eq!(counted, vec![(liar, 6), (stale, 5)]);
        assert_eq!(avoided, vec![Avoided { peer: liar, lies: 2, left: 2 * AVOID_FIRST }]);
        // Each term after a lie found once the last ended, to the longest.
        let mut t = t1;
        for _ in 0..20 {
            t += AVOID_MAX;
            standing.penalise(liar, Offence::Lied, t);
        }
        assert!(standing.avoids(&liar, t + AVOID_MAX - Duration::from_secs(1)));
        assert!(!standing.avoids(&liar, t + AVOID_MAX));
        assert!(standing.report(t + AVOID_MAX).1.is_empty(), "a term served is not listed");
    }

    #[test]
    fn the_records_are_bounded_and_an_avoided_peer_outlasts_those_merely_counted() {
        let standing = Standing::with_capacity(3);
        let now = Instant::now();
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for p in &peers[..3] {
            standing.penalise(*p, Offence::Lied, now);
        }
        // The first was asked after: an avoided peer asked after stays. The second goes for the
        // fourth.
        assert!(standing.avoids(&peers[0], now));
        standing.penalise(peers[3], Offence::Failed, now);
        assert!(standing.avoids(&peers[0], now) && standing.avoids(&peers[2], now));
        assert!(!standing.avoids(&peers[1], now));
        assert_eq!(standing.report(now).0.len(), 3);
    }
}
