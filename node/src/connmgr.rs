//! Keeping connections within the node's bound without starving transfers.
//!
//! Kademlia queries touch many peers (a provider lookup asks up to the k = 20 closest and every
//! peer on the way), and each such peer holds a connection until it idles out. With a hard cap
//! alone, a node busy with lookups would refuse the one connection that matters: to the provider
//! it just found, or from a fetcher. So, like a connection manager with watermarks, the node lets
//! connections rise a little past its target (the hard cap is the target plus a margin) and trims
//! back to the target, closing first the peers it has not moved content with for longest. Peers
//! in a transfer, and connections younger than a grace period, are kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// A new connection is not trimmed for this long: long enough for the request it was opened for
/// (a Kademlia query's round trip, a first transfer request), short enough that a burst of
/// lookups cannot pin the node at its hard cap.
pub(crate) const GRACE: Duration = Duration::from_secs(2);

/// A peer we moved content with this recently is kept. Both windows are stretched by the node's
/// time scale (see [`crate::NodeConfig::time_scale`]).
pub(crate) const RECENT: Duration = Duration::from_secs(10);

/// Peers remembered at most; past it, entries older than [`RECENT`] are forgotten.
const MAX_TRACKED: usize = 8192;

/// The hard cap for a target of `target` connections: room for the trimming to catch up.
pub(crate) fn hard_cap(target: u32) -> u32 {
    target.saturating_add((target / 4).max(8))
}

/// When each peer last moved content with us (a transfer request, in or out), and which peers
/// have a request under way right now.
#[derive(Debug)]
pub(crate) struct PeerActivity {
    last: Mutex<HashMap<PeerId, Instant>>,
    /// Requests under way per peer, either way; a peer leaves the map when its count drops to 0,
    /// so the map is bounded by the requests in flight.
    in_flight: Mutex<HashMap<PeerId, usize>>,
    /// A peer active this recently is kept ([`RECENT`] in the node's own time).
    recent: Duration,
}

impl Default for PeerActivity {
    fn default() -> Self {
        Self::new(RECENT)
    }
}

/// A request to or from a peer under way: its connection is not trimmed until this is dropped.
pub(crate) struct InFlight {
    activity: Arc<PeerActivity>,
    peer: PeerId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.activity.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

impl PeerActivity {
    /// No activity yet; a peer active within `recent` is kept.
    pub(crate) fn new(recent: Duration) -> Self {
        Self { last: Mutex::default(), in_flight: Mutex::default(), recent }
    }

    /// Marks a request with `peer` under way until the guard is dropped. Trimming never closes a
    /// connection in the middle of a request: the work done so far would be lost on both sides,
    /// and the requester would count a failure.
    pub(crate) fn request(self: &Arc<Self>, peer: PeerId) -> InFlight {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).entry(peer).or_insert(0) += 1;
        InFlight { activity: self.clone(), peer }
    }

    /// Whether a request with `peer` is under way.
    pub(crate) fn is_busy(&self, peer: &PeerId) -> bool {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).contains_key(peer)
    }

    /// Records a transfer with `peer` now.
    pub(crate) fn touch(&self, peer: PeerId) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_TRACKED && !last.contains_key(&peer) {
            last.retain(|_, t| now.duration_since(*t) < self.recent);
            if last.len() >= MAX_TRACKED {
                return;
            }
        }
        last.insert(peer, now);
    }

    /// When `peer` last moved content with us.
    pub(crate) fn last(&self, peer: &PeerId) -> Option<Instant> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).get(peer).copied()
    }
}

/// Which of `connected` (peer, connected since) to close to get back to `target`: none while
/// within it; otherwise the least recently useful, never one in its grace period or recently
/// active.
pub(crate) fn to_trim(
    connected: &[(PeerId, Instant)],
    target: usize,
    activity: &PeerActivity,
    now: Instant,
    grace: Duration,
) -> Vec<PeerId> {
    if connected.len() <= target {
        return Vec::new();
    }
    let excess = connected.len() - target;
    let mut candidates: Vec<(Option<Instant>, PeerId)> = connected
        .iter()
        .filter(|(peer, since)| now.duration_since(*since) >= grace && !activity.is_busy(peer))
        .map(|(peer, _)| (activity.last(peer), *peer))
        .filter(|(last, _)| last.is_none_or(|t| now.duration_since(t) >= activity.recent))
        .collect();
    // Never used first (None sorts first), then the longest unused.
    candidates.sort();
    candidates.into_iter().take(excess).map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_the_target_nothing_is_trimmed() {
        let now = Instant::now();
        let old = now - Duration::from_secs(3600);
        let peers: Vec<(PeerId, Instant)> = (0..4).map(|_| (PeerId::random(), old)).collect();
        assert!(to_trim(&peers, 4, &PeerActivity::default(), now, GRACE).is_empty());
    }

    #[test]
    fn idle_peers_go_first_and_busy_or_new_ones_stay() {
        let activity = PeerActivity::default();
        let now = Instant::now() + Duration::from_secs(3600);
        let old = now - Duration::from_secs(600);
        let (never, busy, young, stale) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        activity.touch(busy);
        activity.last.lock().unwrap().insert(busy, now);
        activity.last.lock().unwrap().insert(stale, now - Duration::from_secs(120));
        let connected = [(never, old), (busy, old), (young, now), (stale, old)];
        // Two over a target of 2: the never-used peer, then the stale one.
        assert_eq!(to_trim(&connected, 2, &activity, now, GRACE), vec![never, stale]);
        // Three over: still only those two; the busy and the young are kept even past the target.
        assert_eq!(to_trim(&connected, 1, &activity, now, GRACE), vec![never, stale]);
        // Making room for a provider at once: the young connection may go too.
        let mut all = to_trim(&connected, 1, &activity, now, Duration::ZERO);
        all.sort();
        let mut want = vec![never, stale, young];
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn a_peer_with_a_request_under_way_is_not_trimmed() {
        let activity = Arc::new(PeerActivity::default());
        let now = Instant::now() + Duration::from_secs(3600);
        let old = now - Duration::from_secs(600);
        let (asking, idle) = (PeerId::random(), PeerId::random());
        let connected = [(asking, old), (idle, old)];
        let guard = activity.request(asking);
        assert_eq!(to_trim(&connected, 0, &activity, now, Duration::ZERO), vec![idle]);
        let second = activity.request(asking);
        drop(guard);
        assert_eq!(to_trim(&connected, 0, &activity, now, Duration::ZERO), vec![idle], "one request still runs");
        drop(second);
        let mut both = to_trim(&connected, 0, &activity, now, Duration::ZERO);
        both.sort();
        let mut want = vec![asking, idle];
        want.sort();
        assert_eq!(both, want);
        assert!(activity.in_flight.lock().unwrap().is_empty(), "finished requests leave no trace");
    }

    #[test]
    fn the_hard_cap_leaves_room() {
        assert_eq!(hard_cap(256), 320);
        assert_eq!(hard_cap(16), 24);
        assert_eq!(hard_cap(u32::MAX), u32::MAX);
    }
}
