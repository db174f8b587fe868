//! Keeping connections within the node's bound without starving transfers.
//!
//! Kademlia queries touch many peers (a provider lookup asks up to the k = 20 closest and every
//! peer on the way), and each such peer holds a connection until it idles out. With a hard cap
//! alone, a node busy with lookups would refuse the one connection that matters: to the provider
//! it just found, or from a fetcher. So, like a connection manager with watermarks, the node lets
//! connections rise a little past its target (the hard cap is the target plus a margin) and trims
//! back to the target, closing first the peers it has not moved content with for longest. Peers
//! in a transfer, and connections younger than a grace period, are kept.
//!
//! At the hard cap, [`Gate`] refuses an inbound connection before its handshake: a node that
//! cannot take the peer spends nothing on it, and the peer learns at once, from a failed dial,
//! that it must look elsewhere (rather than from a connection that opens and closes).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::core::transport::{PortUse, TransportError};
use libp2p::core::upgrade::NegotiationError;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

/// A new connection is not trimmed for this long: long enough for the request it was opened for
/// (a Kademlia query's round trip, a first transfer request), short enough that a burst of
/// lookups cannot pin the node at its hard cap.
pub(crate) const GRACE: Duration = Duration::from_secs(2);

/// A peer we moved content with this recently is kept. Both windows are stretched by the node's
/// time scale (see [`crate::NodeConfig::time_scale`]).
pub(crate) const RECENT: Duration = Duration::from_secs(10);

/// Peers remembered at most; past it, entries older than [`RECENT`] are forgotten.
const MAX_TRACKED: usize = 8192;

/// The most inbound handshakes under way from one IP address, or one IPv6 /64 (loopback aside). All of them
/// together are bounded too (64, `connection_limits`): without a bound per source, one host
/// that starts handshakes and never finishes them, each until its timeout, held every place and
/// kept every other peer out.
const MAX_UPGRADING_PER_IP: usize = 8;

/// The hard cap for a target of `target` connections: room for the trimming to catch up.
pub(crate) fn hard_cap(target: u32) -> u32 {
    target.saturating_add((target / 4).max(8))
}

/// Refuses inbound connections before their handshake while established ones, and inbound ones
/// already being upgraded, reach the cap. `connection_limits` checks its cap only once the
/// handshake is done, and stays as the backstop.
#[derive(Debug)]
pub(crate) struct Gate {
    cap: usize,
    established: usize,
    /// Inbound connections let through and not yet established or failed, with the IP address
    /// they come from: at most `cap`, and [`MAX_UPGRADING_PER_IP`] from one address.
    upgrading: HashMap<ConnectionId, Option<std::net::IpAddr>>,
    /// How many of `upgrading` come from each address; none at zero.
    upgrading_from: HashMap<std::net::IpAddr, usize>,
    /// Outbound connections through their handshake and not yet established or refused: where
    /// each was dialled. A later behaviour (the connection limits) may refuse one at our cap.
    dialled: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    /// Where peers were reached when our own cap refused the connection, the latest last (at most
    /// [`MAX_REFUSED`]): a redial once room is made goes there again. The address may have come
    /// from a lookup that ended meanwhile, and no other behaviour would know it.
    refused: VecDeque<(PeerId, Multiaddr)>,
}

/// Addresses of peers our own cap refused, kept for a redial.
const MAX_REFUSED: usize = 64;

/// The error a refused connection carries.
#[derive(Debug, thiserror::Error)]
#[error("at the connection cap ({0})")]
pub(crate) struct AtCap(usize);

impl Gate {
    pub(crate) fn new(cap: u32) -> Self {
        Self {
            cap: cap as usize,
            established: 0,
            upgrading: HashMap::new(),
            upgrading_from: HashMap::new(),
            dialled: HashMap::new(),
            refused: VecDeque::new(),
        }
    }

    /// An inbound connection is no longer being upgraded.
    fn upgraded(&mut self, id: ConnectionId) {
        if let Some(Some(ip)) = self.upgrading.remove(&id) {
            crate::count_down(&mut self.upgrading_from, &ip);
        }
    }
}

/// Where a connection comes from, as its handshakes are counted: an IPv4 address, or an IPv6
/// address's /64, which one host commonly has whole.
pub(crate) fn source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX)).into(),
        v4 => v4,
    }
}

/// The error a connection refused for its source's handshakes under way carries.
#[derive(Debug, thiserror::Error)]
#[error("{0} inbound handshakes from {1} already under way")]
pub(crate) struct TooManyFrom(usize, std::net::IpAddr);

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        from: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if self.established + self.upgrading.len() >= self.cap {
            return Err(ConnectionDenied::new(AtCap(self.cap)));
        }
        // Loopback is this machine's own nodes (tests start dozens there at once).
        let ip = crate::addrs::ip(from).filter(|ip| !ip.is_loopback()).map(source);
        if let Some(ip) = ip {
            let n = self.upgrading_from.entry(ip).or_insert(0);
            if *n >= MAX_UPGRADING_PER_IP {
                return Err(ConnectionDenied::new(TooManyFrom(*n, ip)));
            }
            *n += 1;
        }
        self.upgrading.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.upgraded(id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let Some(peer) = peer else { return Ok(Vec::new()) };
        let mut addrs = Vec::new();
        self.refused.retain(|(p, a)| {
            if *p == peer {
                addrs.push(a.clone());
            }
            *p != peer
        });
        Ok(addrs)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Bounded by the dials under way: each ends established or failed. Without our id, as
        // the other behaviours hand addresses out, so that a redial makes one attempt, not two.
        self.dialled.insert(id, (peer, crate::addrs::bare(addr)));
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.dialled.remove(&e.connection_id);
                self.established += 1
            }
            FromSwarm::DialFailure(e) => {
                // Only a refusal at our own cap on connections in all (not the bound per peer).
                let at_our_cap = |cause: &ConnectionDenied| {
                    cause
                        .downcast_ref::<libp2p::connection_limits::Exceeded>()
                        .is_some_and(|x| x.limit() as usize == self.cap && !x.to_string().contains("per peer"))
                };
                if let Some(reached) = self.dialled.remove(&e.connection_id)
                    && matches!(e.error, DialError::Denied { cause } if at_our_cap(cause))
                {
                    if self.refused.len() >= MAX_REFUSED {
                        self.refused.pop_front();
                    }
                    self.refused.push_back(reached);
                }
            }
            FromSwarm::ConnectionClosed(_) => self.established = self.established.saturating_sub(1),
            FromSwarm::ListenFailure(e) => self.upgraded(e.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Whether a failed dial reached the peer, which then closed the connection before the handshake
/// was through: what a [`Gate`] at its cap does. Such a peer is there, and full for now; a dial
/// that found nobody (no listener, a timeout, an unreachable host) says the peer may be gone.
/// Over netsim's emulated network a peer taken down in the middle of the handshake is taken for
/// one that answered (its links reset, which the handshake reports like a refusal); over QUIC
/// the dial most likely ends in libp2p-quic's handshake timeout, which is not.
/// An address the transport would not dial (one of our own, see `crate::addrs::NotOurs`) is
/// no attempt: a peer on a Docker host announces the address every such host has.
pub(crate) fn turned_away(error: &DialError) -> bool {
    let DialError::Transport(attempts) = error else { return false };
    let mut tried = attempts.iter().filter(|(_, e)| !matches!(e, TransportError::MultiaddrNotSupported(_))).peekable();
    tried.peek().is_some() && tried.all(|(_, e)| matches!(e, TransportError::Other(e) if answered(e)))
}

/// The error of libp2p's plaintext handshake, which the crate does not export by name.
type PlaintextError = <libp2p::plaintext::Config as libp2p::core::upgrade::OutboundConnectionUpgrade<
    futures::io::Cursor<Vec<u8>>,
>>::Error;

/// Whether an upgrade error says the remote answered: a protocol negotiation it broke off, a
/// plaintext handshake it broke off (netsim's transport, which names the handshake with its first
/// bytes, so a refusal cuts the handshake itself short), or (over QUIC) an error "after the
/// remote has been reached".
fn answered(error: &std::io::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    // Error chains are short; the bound only guards against a cycle.
    for _ in 0..16 {
        let Some(e) = next else { return false };
        if e.is::<NegotiationError>()
            || e.is::<PlaintextError>()
            || matches!(e.downcast_ref(), Some(libp2p::quic::Error::Connection(_)))
        {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        next = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
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
        crate::count_down(&mut self.activity.in_flight.lock().unwrap_or_else(|e| e.into_inner()), &self.peer);
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

/// Which of `connected` (peer, connected since, connections to it) to close to get back to
/// `target` connections: none while within it; otherwise the least recently useful, never one in
/// its grace period or recently active. Connections are counted, as the cap counts them: a peer
/// that dialled us as we dialled it holds two.
pub(crate) fn to_trim(
    connected: &[(PeerId, Instant, usize)],
    target: usize,
    activity: &PeerActivity,
    now: Instant,
    grace: Duration,
) -> Vec<PeerId> {
    let open: usize = connected.iter().map(|c| c.2).sum();
    let Some(mut excess) = open.checked_sub(target).filter(|e| *e > 0) else { return Vec::new() };
    let mut candidates: Vec<(Option<Instant>, PeerId, usize)> = connected
        .iter()
        .filter(|(peer, since, _)| now.duration_since(*since) >= grace && !activity.is_busy(peer))
        .map(|(peer, _, n)| (activity.last(peer), *peer, *n))
        .filter(|(last, ..)| last.is_none_or(|t| now.duration_since(t) >= activity.recent))
        .collect();
    // Never used first (None sorts first), then the longest unused.
    candidates.sort();
    let mut out = Vec::new();
    for (_, peer, n) in candidates {
        if excess == 0 {
            break;
        }
        out.push(peer);
        excess = excess.saturating_sub(n.max(1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::upgrade::Version;

    #[test]
    fn within_the_target_nothing_is_trimmed() {
        let now = Instant::now();
        let old = now - Duration::from_secs(3600);
        let peers: Vec<(PeerId, Instant, usize)> = (0..4).map(|_| (PeerId::random(), old, 1)).collect();
        assert!(to_trim(&peers, 4, &PeerActivity::default(), now, GRACE).is_empty());
    }

    #[test]
    fn the_target_counts_connections_and_a_peer_reached_both_ways_holds_two() {
        let now = Instant::now();
        let old = now - Duration::from_secs(3600);
        // Four peers, each dialled by us as it dialled us: eight connections against four.
        let peers: Vec<(PeerId, Instant, usize)> = (0..4).map(|_| (PeerId::random(), old, 2)).collect();
        assert_eq!(to_trim(&peers, 4, &PeerActivity::default(), now, GRACE).len(), 2);
        assert_eq!(to_trim(&peers, 3, &PeerActivity::default(), now, GRACE).len(), 3, "five over: three peers go");
    }

    /// Tells libp2p's connection `limits` of `n` connections established to `peer` (each to a
    /// peer of its own if `None`).
    fn establish(limits: &mut libp2p::connection_limits::Behaviour, peer: Option<PeerId>, n: usize) {
        let address: Multiaddr = "/ip4/198.51.100.1/udp/4737/quic-v1".parse().expect("multiaddr");
        let endpoint =
            libp2p::core::ConnectedPoint::Dialer { address, role_override: Endpoint::Dialer, port_use: PortUse::Reuse };
        for k in 0..n {
            limits.on_swarm_event(FromSwarm::ConnectionEstablished(libp2p::swarm::behaviour::ConnectionEstablished {
                peer_id: peer.unwrap_or_else(PeerId::random),
                connection_id: ConnectionId::new_unchecked(1000 + k),
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
        }
    }

    /// The refusal libp2p's connection `limits` give a new outbound connection to `peer`.
    fn refusal(limits: &mut libp2p::connection_limits::Behaviour, peer: PeerId, addr: &Multiaddr) -> ConnectionDenied {
        let id = ConnectionId::new_unchecked(999);
        match limits.handle_established_outbound_connection(id, peer, addr, Endpoint::Dialer, PortUse::Reuse) {
            Err(denied) => denied,
            Ok(_) => panic!("past the limit"),
        }
    }

    #[test]
    fn a_peer_our_cap_refused_is_dialled_again_where_it_was_reached() {
        let mut gate = Gate::new(8);
        let (p, id) = (PeerId::random(), ConnectionId::new_unchecked(1));
        let addr: Multiaddr = "/ip4/203.0.113.9/udp/4737/quic-v1".parse().expect("multiaddr");
        assert!(gate.handle_established_outbound_connection(id, p, &addr, Endpoint::Dialer, PortUse::Reuse).is_ok());
        // The connection limits, after the gate, refuse it at our cap (8 connections in all).
        let limits = libp2p::connection_limits::ConnectionLimits::default().with_max_established(Some(8));
        let mut behaviour = libp2p::connection_limits::Behaviour::new(limits);
        establish(&mut behaviour, None, 8);
        let denied = DialError::Denied { cause: refusal(&mut behaviour, PeerId::random(), &addr) };
        gate.on_swarm_event(FromSwarm::DialFailure(libp2p::swarm::behaviour::DialFailure {
            peer_id: Some(p),
            error: &denied,
            connection_id: id,
        }));
        let pending = |gate: &mut Gate, peer| {
            gate.handle_pending_outbound_connection(ConnectionId::new_unchecked(2), Some(peer), &[], Endpoint::Dialer)
        };
        assert_eq!(pending(&mut gate, PeerId::random()).expect("dial"), Vec::<Multiaddr>::new(), "another peer's");
        assert_eq!(pending(&mut gate, p).expect("dial"), vec![addr.clone()]);
        assert!(pending(&mut gate, p).expect("dial").is_empty(), "handed out once");
        // A refusal for another reason (the bound per peer) is no room to make.
        let per_peer = libp2p::connection_limits::ConnectionLimits::default().with_max_established_per_peer(Some(8));
        let mut behaviour = libp2p::connection_limits::Behaviour::new(per_peer);
        let busy_peer = PeerId::random();
        establish(&mut behaviour, Some(busy_peer), 8);
        let refused = refusal(&mut behaviour, busy_peer, &addr);
        assert!(
            gate.handle_established_outbound_connection(id, busy_peer, &addr, Endpoint::Dialer, PortUse::Reuse).is_ok()
        );
        let other_cause = DialError::Denied { cause: refused };
        gate.on_swarm_event(FromSwarm::DialFailure(libp2p::swarm::behaviour::DialFailure {
            peer_id: Some(busy_peer),
            error: &other_cause,
            connection_id: id,
        }));
        assert!(pending(&mut gate, busy_peer).expect("dial").is_empty(), "not refused for our cap");
        // A dial under way is remembered until it ends; the refused are bounded.
        let other = ConnectionId::new_unchecked(3);
        assert!(gate.handle_established_outbound_connection(other, p, &addr, Endpoint::Dialer, PortUse::Reuse).is_ok());
        assert_eq!(gate.dialled.len(), 1);
        for n in 0..2 * MAX_REFUSED {
            let id = ConnectionId::new_unchecked(10 + n);
            let _ = gate.handle_established_outbound_connection(
                id,
                PeerId::random(),
                &addr,
                Endpoint::Dialer,
                PortUse::Reuse,
            );
            gate.on_swarm_event(FromSwarm::DialFailure(libp2p::swarm::behaviour::DialFailure {
                peer_id: None,
                error: &denied,
                connection_id: id,
            }));
        }
        assert_eq!(gate.refused.len(), MAX_REFUSED);
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
        let connected = [(never, old, 1), (busy, old, 1), (young, now, 1), (stale, old, 1)];
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
        let connected = [(asking, old, 1), (idle, old, 1)];
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

    /// A node over libp2p's in-memory transport whose only behaviour is a gate for `cap`, and
    /// whose dials agree on the handshake and the multiplexer as `version` says.
    #[test]
    fn one_address_has_at_most_a_few_handshakes_under_way() {
        let mut gate = Gate::new(1000);
        let here: Multiaddr = "/ip4/10.0.0.1/udp/4737/quic-v1".parse().expect("multiaddr");
        let from: Multiaddr = "/ip4/203.0.113.9/udp/5000/quic-v1".parse().expect("multiaddr");
        let other: Multiaddr = "/ip4/203.0.113.10/udp/5000/quic-v1".parse().expect("multiaddr");
        let lo: Multiaddr = "/ip4/127.0.0.1/udp/5000/quic-v1".parse().expect("multiaddr");
        let id = ConnectionId::new_unchecked;
        for n in 0..MAX_UPGRADING_PER_IP {
            assert!(gate.handle_pending_inbound_connection(id(n), &here, &from).is_ok());
        }
        assert!(gate.handle_pending_inbound_connection(id(100), &here, &from).is_err(), "one too many");
        assert!(gate.handle_pending_inbound_connection(id(101), &here, &other).is_ok(), "another address");
        for n in 200..250 {
            assert!(gate.handle_pending_inbound_connection(id(n), &here, &lo).is_ok(), "this machine's nodes");
        }
        // One through its handshake makes room for the next.
        assert!(gate.handle_established_inbound_connection(id(0), PeerId::random(), &here, &from).is_ok());
        assert!(gate.handle_pending_inbound_connection(id(102), &here, &from).is_ok());
        assert!(gate.handle_pending_inbound_connection(id(103), &here, &from).is_err());
        // An IPv6 host has a /64 to dial from: it counts as one.
        for n in 0..MAX_UPGRADING_PER_IP {
            let from: Multiaddr = format!("/ip6/2001:db8:5:6::{n:x}/udp/5000/quic-v1").parse().expect("multiaddr");
            assert!(gate.handle_pending_inbound_connection(id(300 + n), &here, &from).is_ok());
        }
        let same64: Multiaddr = "/ip6/2001:db8:5:6:ffff::1/udp/5000/quic-v1".parse().expect("multiaddr");
        let next64: Multiaddr = "/ip6/2001:db8:5:7::1/udp/5000/quic-v1".parse().expect("multiaddr");
        assert!(gate.handle_pending_inbound_connection(id(400), &here, &same64).is_err());
        assert!(gate.handle_pending_inbound_connection(id(401), &here, &next64).is_ok());
    }

    fn gated(cap: u32, version: Version) -> libp2p::Swarm<Gate> {
        use libp2p::core::transport::{MemoryTransport, Transport};
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                MemoryTransport::default()
                    .upgrade(version)
                    .authenticate(libp2p::plaintext::Config::new(key))
                    .multiplex(libp2p::yamux::Config::default())
                    .boxed()
            })
            .expect("transport")
            .with_behaviour(|_| Gate::new(cap))
            .expect("behaviour")
            // Nothing keeps these connections busy; they stay until the test drops them.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build()
    }

    /// Dials `addr` from a new node: the node once connected, or why the dial failed.
    async fn dial(addr: &Multiaddr, version: Version) -> Result<libp2p::Swarm<Gate>, DialError> {
        use futures::StreamExt;
        use libp2p::swarm::SwarmEvent;
        let mut client = gated(8, version);
        client.dial(addr.clone())?;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match client.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => return Ok(()),
                    SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error),
                    _ => {}
                }
            }
        })
        .await
        .expect("the dial ends in time")?;
        Ok(client)
    }

    #[tokio::test]
    async fn at_the_cap_a_peer_is_refused_before_the_handshake_and_let_in_once_there_is_room() {
        refused_at_the_cap_and_let_in_later(Version::V1).await;
    }

    /// As netsim's nodes dial: the handshake is named with the first bytes, so the refusal
    /// breaks off the handshake itself, not its negotiation.
    #[tokio::test]
    async fn a_refusal_is_told_apart_when_the_dialer_names_its_handshake_at_once() {
        refused_at_the_cap_and_let_in_later(Version::V1Lazy).await;
    }

    async fn refused_at_the_cap_and_let_in_later(version: Version) {
        use futures::StreamExt;
        use libp2p::swarm::ListenError;
        let mut server = gated(2, version);
        server.listen_on("/memory/0".parse().expect("address")).expect("listen");
        let addr = loop {
            if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
                break address;
            }
        };
        let (tx, mut refusals) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = server.next().await {
                if let libp2p::swarm::SwarmEvent::IncomingConnectionError { error, .. } = event {
                    let at_cap =
                        matches!(&error, ListenError::Denied { cause } if cause.downcast_ref::<AtCap>().is_some());
                    let _ = tx.send((at_cap, error.to_string()));
                }
            }
        });
        let drive = |mut s: libp2p::Swarm<Gate>| tokio::spawn(async move { while s.next().await.is_some() {} });
        let first = drive(dial(&addr, version).await.expect("room for the first"));
        let _second = drive(dial(&addr, version).await.expect("room for the second"));
        // The third never completes a handshake (with the cap checked only after it, its
        // connection would open and then close), and can tell it was turned away: the server
        // is there, unlike one nobody answers for.
        let Err(refused) = dial(&addr, version).await else { panic!("a third peer got past a cap of two") };
        assert!(turned_away(&refused), "a refusal taken for absence: {refused}");
        // An address the transport would not dial (one of ours) beside it is no attempt.
        let DialError::Transport(mut attempts) = refused else { panic!("a transport error") };
        let ours: libp2p::Multiaddr = "/ip4/172.17.0.1/udp/4737/quic-v1".parse().expect("address");
        attempts.push((ours.clone(), TransportError::MultiaddrNotSupported(ours.clone())));
        assert!(turned_away(&DialError::Transport(attempts)), "an address of ours hid the refusal");
        let only_ours = DialError::Transport(vec![(ours.clone(), TransportError::MultiaddrNotSupported(ours))]);
        assert!(!turned_away(&only_ours), "no attempt taken for a refusal");
        let Err(absent) = dial(&"/memory/1".parse().expect("address"), version).await else {
            panic!("nobody listens there")
        };
        assert!(!turned_away(&absent), "absence taken for a refusal: {absent}");
        let (at_cap, why) = tokio::time::timeout(Duration::from_secs(20), refusals.recv())
            .await
            .expect("the refusal is seen in time")
            .expect("the server saw the refusal");
        assert!(at_cap, "refused for another reason: {why}");
        // A peer leaves: the next one gets its place once the server has seen it go.
        first.abort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if dial(&addr, version).await.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no room made by a peer that left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn the_hard_cap_leaves_room() {
        assert_eq!(hard_cap(256), 320);
        assert_eq!(hard_cap(16), 24);
        assert_eq!(hard_cap(u32::MAX), u32::MAX);
    }
}
