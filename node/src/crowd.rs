//! Who else holds a blob, and how a node spreads a crowd's load across the crowd.
//!
//! When many peers fetch one blob at once, two things decide how fast the crowd finishes: how
//! soon the fetchers find each other, and whether the scarce upload (the first provider's) goes
//! to pieces nobody has yet. For both, a node remembers per blob the peers it moved pieces with:
//!
//! - **Peer exchange.** Every `Have` and `Data` answer names up to [`MAX_HINTS`] other peers that
//!   hold pieces of the blob (peers we served, peers that served us) with their listen addresses,
//!   so fetchers meet each other within a round trip of their first request instead of waiting
//!   for their announcements to reach the DHT and for their next lookup. A `Busy` answer from a
//!   full line, and a watch's answer, name first the peers we served the pieces asked for. A
//!   peer the node avoids for a lie ([`crate::standing`]) is in no hint, and a requester from a
//!   public address is named only public addresses (and names checked against one), and no
//!   holder that has none.
//! - **Spreading.** A publisher (a node that pinned the blob) serves first the pieces no peer
//!   has from it: a piece it recently sent to a peer is left to that peer, who is named in the
//!   hints while connected, unless a dial to that peer has failed since, or the node avoids it
//!   for a lie. This is how a seeder sends each piece about once and lets the crowd do the rest
//!   (BitTorrent's "super-seeding"). Like super-seeding, in a crowd of [`SMALL_CROWD`] peers or
//!   more (counting those that asked for it lately, and each host once) it reveals one piece at a
//!   time: an answer carries one piece, and a peer it sent a piece to lately gets no other until
//!   our patience for it has passed (or while nobody else waits for our uplink), so the first
//!   copies go to as many peers as the blob has pieces, and no peer
//!   becomes the one holder of several pieces whose uplink all of them share. However small the
//!   crowd, a peer is sent at most its share of the blob at once (the blob's pieces over the
//!   crowd's members, each host once, counting the pieces of the answers under way to it): a crowd forms over the
//!   round trips in which its fetchers' lookups end, and the first few to ask would otherwise
//!   hold most of the first copies. A few peers are served all they ask for: each may be the only one
//!   asking. In a crowd of [`SMALL_CROWD`] peers or more it holds back even while its uplink has
//!   room: the fetcher's rarest-first order already sends it the requests for pieces nobody else
//!   has, so what is held back is a piece the requester can get elsewhere, and each copy sent twice
//!   is egress its owner pays for. In a smaller crowd its uplink is a large share of the crowd's,
//!   so it holds back only while it uploads to other peers: a requester alone on its uplink is
//!   sent all it asks, or one whose other holders left or cannot be reached would get the blob
//!   no faster than its refusals came back (20 MB took 20 s against 0.4 s, the holder it was
//!   sent to having crashed). So that a requester who cannot reach the other holders is never
//!   starved, a piece is held back from one requester for at most the node's patience
//!   ([`PATIENCE`] unless configured). A requester refused again and again is asked to wait twice
//!   as long each time it comes back (up to [`MAX_SPREAD_DOUBLINGS`] doublings): in a crowd such
//!   refusals are much of what a seeder sends beyond its pieces. Requests it sent
//!   together, before our first refusal reached it, count once, and the later ones name nobody.
//!   A requester held back only for its turn, asking for a piece nobody has from us yet, is
//!   asked instead to come back in about one upload's time, when a slot is likely free, and
//!   named nobody (it was named holders when we served it).
//!
//! - **Trading both ways.** A node that sends pieces of a blob it is fetching itself names the
//!   receiver to its own fetch, which asks it before peers it would have to dial: a connection
//!   carries pieces both ways, as between BitTorrent peers, so a crowd needs fewer connections
//!   than it would if every fetcher picked its sources apart from who picked it.
//!
//! Everything here is bounded: [`MAX_BLOBS`] blobs, [`MAX_CONTACTS`] peers per blob,
//! [`MAX_HELD_BACK`] requesters' patience clocks of [`MAX_WITHHELD`] pieces each, and
//! [`NEARBY_QUEUE`] names waiting per fetch.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use lru::LruCache;
use shoal_protocol::wire::{MAX_HINT_ADDR_LEN, MAX_HINT_ADDRS, MAX_HINTS, MAX_PIECES_PER_GET, PeerHint};
use shoal_protocol::{Hash, PieceSet};
use tokio::sync::mpsc;

use crate::standing::Standing;

/// Addresses kept per connected peer: twice what a hint carries, so that a holder on our LAN
/// whose first addresses are private still has its public ones to name to a requester from the
/// internet ([`Crowds::hints`]).
const MAX_ADDRS_KEPT: usize = 2 * MAX_HINT_ADDRS;

/// Blobs remembered at most; the least recently used is forgotten.
const MAX_BLOBS: usize = 256;

/// Peers remembered per blob; past it, a new one replaces the requester holding nothing that
/// asked longest ago, or else the holder seen longest ago.
const MAX_CONTACTS: usize = 64;

/// Pieces held back from one peer at most; past it, that peer is served what it asks.
const MAX_WITHHELD: usize = 256;

/// The longest a piece is held back from one requester, unless configured otherwise
/// ([`crate::NodeConfig::spread_patience`]). Long enough for a crowd to pass every piece on while
/// it fetches, short enough that a requester who cannot reach the other holders waits once. A
/// crowd that outlasts it is sent pieces again: in `flash-crowd.toml` (50 nodes, about 12 s) the
/// seeder sent 2.1 copies of the blob at 2.5 s, 1.3-1.5 at 5 s and 1.13-1.18 from 10 s on; at 300
/// nodes (40-60 s) it sent 1.89-1.91 copies at 10 s and 1.23-1.25 at 30 s.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// Below this many peers moving a blob with us, a publisher holds pieces back only while it
/// uploads to other peers: in a small crowd its uplink is a large share of all the crowd
/// has, and leaving it idle slows everyone more than the egress it saves is worth.
const SMALL_CROWD: usize = 16;

/// A peer that moved pieces with us longer ago than this, or than three patiences if that is
/// longer, is neither hinted nor relied on: a node with a long patience remembers its peers as
/// long, so that it does not send a piece again to a crowd still passing it on.
const FRESH: Duration = Duration::from_secs(30);

/// Peers named to a running fetch that it has not taken yet; past it, names are dropped.
const NEARBY_QUEUE: usize = 64;

/// Peers remembered as unreachable; past it, only those found so within [`FRESH`] are kept.
const MAX_UNREACHABLE: usize = 4096;

/// How many times in a row the wait asked of a requester refused only pieces left to others
/// doubles: 1, 2, 4 and then 8 times the node's spread retry.
pub(crate) const MAX_SPREAD_DOUBLINGS: u32 = 3;

/// Peers whose last host is remembered past their disconnection; the one connected longest ago
/// is forgotten.
const MAX_HOSTS_SEEN: usize = 4096;

/// Requesters whose refusals are counted at most; the one refused longest ago is forgotten.
const MAX_REFUSED: usize = 4096;

/// Requesters whose patience clocks are kept at most; the one held back longest ago is forgotten.
const MAX_HELD_BACK: usize = 4096;

/// A peer that asked for a blob and holds none of it counts in the blob's crowd for this long
/// after it last asked, or our patience if that is longer: past the longest wait a refused
/// requester is given (8 × the spread retry, checked in `transfer`), and a fetcher that parks a
/// busy peer may ask it again only later. A few peers asking more seldom than this do not make a lone
/// fetcher's publisher treat it as one of a crowd (they did while they stayed fresh, 90 s).
pub(crate) const ASKING: Duration = Duration::from_secs(30);

/// The pieces [`Crowds::claim`] chose for a request, and of them those it recorded as served
/// that no earlier request had: all a request may give back.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) pieces: PieceSet,
    pub(crate) new: PieceSet,
}

/// How busy a node's piece uploads are, as [`Crowds::offer`] weighs them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Uplink {
    /// No upload to a peer other than the caller runs, and nobody waits for a slot.
    pub(crate) idle: bool,
    /// The caller holds a slot or one is free, and nobody waits for one.
    pub(crate) room: bool,
}

/// The peers a node moved pieces of its blobs with, and the listen addresses of connected peers.
#[derive(Debug)]
pub(crate) struct Crowds {
    inner: Mutex<Inner>,
    /// How long a piece is held back from one requester.
    patience: Duration,
    /// How long a peer that moved pieces with us is hinted and relied on.
    fresh: Duration,
    /// How long a peer that only asked counts in a crowd: [`ASKING`], stretched, or the patience
    /// if that is longer.
    asking: Duration,
    /// The node's standing of its peers: a peer avoided for a lie is neither hinted to others nor
    /// relied on to pass pieces on. Its lock is taken under ours, never the other way round.
    standing: Arc<Standing>,
}

#[derive(Debug)]
struct Inner {
    /// Listen addresses of connected peers (from identify); a peer leaves at disconnection, so
    /// presence here also means "online".
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// The host each connected peer's connection comes from ([`host_of`]), for peers connected
    /// over IP from another machine; a peer leaves at disconnection.
    hosts: HashMap<PeerId, IpAddr>,
    /// The host each peer last connected from, kept past its disconnection: a peer that answers
    /// and closes at once is still its host ([`Crowds::member`]). At most [`MAX_HOSTS_SEEN`].
    seen_from: LruCache<PeerId, IpAddr>,
    /// Peers a dial to failed since we last held a connection to them, with when: the one sign
    /// that a peer went away. At most [`MAX_UNREACHABLE`].
    unreachable: HashMap<PeerId, Instant>,
    blobs: LruCache<Hash, Vec<Contact>>,
    /// Size proofs we checked, with the size each proves: passed on to others who ask, so the
    /// proof spreads with the pieces instead of every fetcher needing a holder of the last piece.
    proofs: LruCache<Hash, (u64, std::sync::Arc<[u8]>)>,
    /// The fetches running here, each with where to name the peers it can ask without dialling.
    /// An entry lives as long as its fetch ([`Crowds::fetch_started`], [`Crowds::fetch_ended`]).
    fetching: HashMap<Hash, mpsc::Sender<PeerId>>,
    /// Requesters refused only pieces left to others, per blob: how many times in a row, and
    /// when last. Apart from the contacts, which a crowd's requesters cycle through faster than
    /// they come back. At most [`MAX_REFUSED`].
    refused: LruCache<(Hash, PeerId), (u32, Instant)>,
    /// Pieces held back from a requester, per blob, each with when it was first held back: the
    /// requester's patience clocks. Apart from the contacts, for the same reason as `refused`: a
    /// requester held back holds nothing from us, so it is the first contact a new asker replaces,
    /// and 64 other askers would start its patience again. At most [`MAX_HELD_BACK`] requesters,
    /// [`MAX_WITHHELD`] pieces each.
    withheld: LruCache<(Hash, PeerId), HeldBack>,
}

impl Inner {
    /// The host `peer` is connected from, or last connected from, if known.
    fn host(&self, peer: &PeerId) -> Option<IpAddr> {
        self.hosts.get(peer).or_else(|| self.seen_from.peek(peer)).copied()
    }
}

/// The pieces held back from one requester of a blob.
#[derive(Debug)]
struct HeldBack {
    /// When it last asked us for the blob.
    asked: Instant,
    /// Each piece held back, with when it first was: its patience clock.
    clocks: Vec<(u32, Instant)>,
}

#[derive(Debug)]
struct Contact {
    peer: PeerId,
    /// When it last asked for the blob or moved pieces of it with us.
    seen: Instant,
    /// When pieces of the blob last moved between it and us, either way (a transfer begun or
    /// ended). Only this makes a holder fresh, hinted and ranked: asking does not.
    moved: Option<Instant>,
    /// It holds pieces of the blob: it served us some, or we served it some.
    holds: bool,
    /// Pieces we served it, verified on its side before it keeps them.
    served: Option<PieceSet>,
    /// Pieces of the answers we are sending it now, as [`Crowds::claim`] counted them.
    sending: u32,
    /// The host it was last connected from, if known ([`host_of`]).
    host: Option<IpAddr>,
}

/// Who a peer is, as a blob's crowd is counted (and a fetch bounds what one source names): the
/// host it connects from when known, so that peer ids made up on one machine count once, or else
/// the peer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Member {
    Host(IpAddr),
    Peer(PeerId),
}

/// The host a connection from `remote` counts as in a crowd: its IPv4 address, or its IPv6 /48,
/// the most a site is commonly given (a server's or a home's delegated prefix holds many /64s).
/// None for a loopback address (nodes on one machine are run by one owner, as tests and trials
/// on loopback do) and for an address that is not IP (or a name: a peer we dialled by name).
pub(crate) fn host_of(remote: &Multiaddr) -> Option<IpAddr> {
    match crate::addrs::ip(remote)? {
        ip if ip.is_loopback() => None,
        IpAddr::V6(v6) => Some(std::net::Ipv6Addr::from(v6.to_bits() & !((1u128 << 80) - 1)).into()),
        v4 => Some(v4),
    }
}

/// Whether a request that came on a connection from `remote` came from a public address (see
/// [`Crowds::hints`]): an IP address is, if [`crate::addrs::is_public`] says so (loopback,
/// link-local and the LAN's are not), and the in-memory transport's is not. A name (a peer we
/// dialled by it) does not tell.
pub(crate) fn from_public(remote: &Multiaddr) -> Option<bool> {
    crate::addrs::ip(remote).map(crate::addrs::is_public).or_else(|| (!crate::addrs::is_name(remote)).then_some(false))
}

impl Crowds {
    /// No crowds yet; a publisher holds a piece back from one requester for at most `patience`.
    /// It, [`FRESH`] and [`ASKING`] are network time, stretched by `time_scale` (see
    /// [`crate::NodeConfig::time_scale`]). Peers `standing` avoids are neither hinted nor relied
    /// on.
    pub(crate) fn new(patience: Duration, time_scale: f64, standing: Arc<Standing>) -> Self {
        let stretch = |d| shoal_protocol::fetch::stretch(d, time_scale);
        let patience = stretch(patience);
        Self {
            patience,
            fresh: stretch(FRESH).max(patience.saturating_mul(3)),
            asking: stretch(ASKING).max(patience),
            standing,
            inner: Mutex::new(Inner {
                addrs: HashMap::new(),
                hosts: HashMap::new(),
                seen_from: LruCache::new(NonZeroUsize::new(MAX_HOSTS_SEEN).unwrap_or(NonZeroUsize::MIN)),
                unreachable: HashMap::new(),
                blobs: LruCache::new(NonZeroUsize::new(MAX_BLOBS).unwrap_or(NonZeroUsize::MIN)),
                proofs: LruCache::new(NonZeroUsize::new(MAX_BLOBS).unwrap_or(NonZeroUsize::MIN)),
                fetching: HashMap::new(),
                refused: LruCache::new(NonZeroUsize::new(MAX_REFUSED).unwrap_or(NonZeroUsize::MIN)),
                withheld: LruCache::new(NonZeroUsize::new(MAX_HELD_BACK).unwrap_or(NonZeroUsize::MIN)),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `peer` is connected and listens on `addrs` (as identify reported them).
    pub(crate) fn connected(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let addrs: Vec<Multiaddr> =
            addrs.into_iter().filter(|a| a.as_ref().len() <= MAX_HINT_ADDR_LEN).take(MAX_ADDRS_KEPT).collect();
        let mut inner = self.lock();
        inner.unreachable.remove(&peer);
        // A report with none we would hint (all too long, or none reachable from here) leaves
        // none of the last one's either: they are what it no longer says.
        match addrs.is_empty() {
            true => inner.addrs.remove(&peer),
            false => inner.addrs.insert(peer, addrs),
        };
    }

    /// `peer`, connected, is also reachable at `addrs` (names it announced, once checked): added
    /// to those it is hinted at, within the bound.
    pub(crate) fn also_at(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let addrs: Vec<Multiaddr> = addrs.into_iter().filter(|a| a.as_ref().len() <= MAX_HINT_ADDR_LEN).collect();
        // No name we would hint: nothing learnt, and a peer found unreachable stays so.
        if addrs.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.unreachable.remove(&peer);
        let held = inner.addrs.entry(peer).or_default();
        for addr in addrs {
            if held.len() < MAX_ADDRS_KEPT && !held.contains(&addr) {
                held.push(addr);
            }
        }
    }

    /// `peer`'s last connection closed. It is no longer hinted (we hold no fresh addresses of
    /// it), but it is still relied on for the pieces we served it while it is fresh: a closed
    /// connection is how peers stay within their connection bounds, not a sign that one left, and
    /// in a crowd larger than a node's connections nearly every holder's connection to the
    /// publisher is closed by one side or the other while the crowd still passes the pieces on.
    /// Forgetting the peers we closed on, the seeder of a 1,000-node crowd sent 2.6 copies of the
    /// blob; forgetting those that closed on us, 1.7-1.9 copies of its pieces.
    pub(crate) fn disconnected(&self, peer: &PeerId) {
        let mut inner = self.lock();
        inner.addrs.remove(peer);
        inner.hosts.remove(peer);
    }

    /// Who `peer` is counted as ([`Member`]): the host it is connected from, or last connected
    /// from, if known.
    pub(crate) fn member(&self, peer: PeerId) -> Member {
        let inner = self.lock();
        inner.host(&peer).map_or(Member::Peer(peer), Member::Host)
    }

    /// A connection to `peer` from `remote` is established: the peer counts as that host in
    /// crowds from now on ([`host_of`]; nothing changes for a loopback or non-IP address).
    pub(crate) fn connected_from(&self, peer: PeerId, remote: &Multiaddr) {
        if let Some(host) = host_of(remote) {
            let mut inner = self.lock();
            inner.hosts.insert(peer, host);
            inner.seen_from.put(peer, host);
        }
    }

    /// A request from `peer` came on a connection from `remote`: the host it counts as in crowds
    /// from now on (its answer's hints read the connection itself, [`from_public`]). Kept among
    /// the hosts of connected peers only if the peer is one (a stream may come in as its
    /// connection closes, and the entry would outlive it); among the hosts peers were seen
    /// from, which are bounded, in any case.
    pub(crate) fn requested_from(&self, peer: PeerId, remote: &Multiaddr) {
        if let Some(host) = host_of(remote) {
            let mut inner = self.lock();
            if let Some(known) = inner.hosts.get_mut(&peer) {
                *known = host;
            }
            inner.seen_from.put(peer, host);
        }
    }

    /// A dial to `peer` failed (not for our own connection bound): it may be gone, and is not
    /// relied on until it connects again.
    pub(crate) fn unreachable(&self, peer: PeerId, now: Instant) {
        let mut inner = self.lock();
        if inner.addrs.contains_key(&peer) {
            return;
        }
        self.mark_unreachable(&mut inner, peer, now);
    }

    /// `peer` is connected, but from an address none of those it announced vouches for (behind a
    /// NAT, most often): others cannot dial it, so it is neither hinted nor relied on, though it
    /// may pass pieces on over the connections it opens itself. Until it connects again and is
    /// believed.
    pub(crate) fn undialable(&self, peer: PeerId, now: Instant) {
        let mut inner = self.lock();
        inner.addrs.remove(&peer);
        self.mark_unreachable(&mut inner, peer, now);
    }

    fn mark_unreachable(&self, inner: &mut Inner, peer: PeerId, now: Instant) {
        if inner.unreachable.len() >= MAX_UNREACHABLE && !inner.unreachable.contains_key(&peer) {
            let fresh = self.fresh;
            inner.unreachable.retain(|_, at| now.saturating_duration_since(*at) < fresh);
            if inner.unreachable.len() >= MAX_UNREACHABLE {
                return;
            }
        }
        inner.unreachable.insert(peer, now);
    }

    /// Remembers a size proof of `hash` that checked out for `size`.
    pub(crate) fn remember_proof(&self, hash: Hash, size: u64, proof: Vec<u8>) {
        self.lock().proofs.put(hash, (size, proof.into()));
    }

    /// A checked size proof of `hash` for `size`, if we have one.
    pub(crate) fn proof(&self, hash: Hash, size: u64) -> Option<std::sync::Arc<[u8]>> {
        self.lock().proofs.get(&hash).filter(|(s, _)| *s == size).map(|(_, p)| p.clone())
    }

    /// `peer` served us pieces of `hash`.
    pub(crate) fn source(&self, hash: Hash, peer: PeerId, now: Instant) {
        let mut inner = self.lock();
        let c = contact(&mut inner, hash, peer, now);
        c.holds = true;
        c.moved = Some(now);
    }

    /// We are sending `pieces` of `hash` to `peer`: while that peer is fresh (and not avoided)
    /// they are left to it (see [`Crowds::offer`]). It is named to others only once the pieces
    /// are sent ([`Crowds::delivered`]). Returns those of `pieces` not recorded as served to it before.
    pub(crate) fn serving(&self, hash: Hash, peer: PeerId, pieces: &PieceSet, now: Instant) -> PieceSet {
        record_serving(&mut self.lock(), hash, peer, pieces, now)
    }

    /// How many of the peers we remember for `hash` we served the least served of `pieces` to: a
    /// request's place in a full upload line (see [`crate::slots`]; lower goes first). A piece
    /// few peers got from us is one we are among the first to hold, most likely the one that came
    /// in last; the crowd finishes only once its first holders pass it on. At most
    /// [`MAX_CONTACTS`] peers times the request's pieces are looked at. Every peer we served
    /// counts, those we no longer rely on (unreachable, avoided) too.
    pub(crate) fn least_served(&self, hash: Hash, pieces: &PieceSet) -> u32 {
        let inner = self.lock();
        let Some(contacts) = inner.blobs.peek(&hash) else { return 0 };
        let served = |piece| contacts.iter().filter(|c| c.served.as_ref().is_some_and(|s| s.contains(piece))).count();
        pieces.iter().map(served).min().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// We did not send `pieces` of `hash` to `peer` after all (the store could not read them, or
    /// the transfer failed): they are not left to it. A caller gives back only the pieces its
    /// own request recorded ([`Claim::new`], or what [`Crowds::serving`] returned), not those an
    /// earlier request sent the peer.
    pub(crate) fn not_served(&self, hash: Hash, peer: PeerId, pieces: &PieceSet) {
        if pieces.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if let Some(c) = inner.blobs.peek_mut(&hash).and_then(|cs| cs.iter_mut().find(|c| c.peer == peer))
            && let Some(served) = c.served.as_mut().filter(|s| s.piece_count() == pieces.piece_count())
        {
            *served = served.difference(pieces);
        }
    }

    /// We refused `peer` every piece of `hash` it asked for, all left to others: how long to ask
    /// it to wait, `base` doubled for each refusal in a row before this one (up to
    /// [`MAX_SPREAD_DOUBLINGS`]). A refusal longer ago than our patience starts the count again.
    /// Only a request that came after the wait we asked for counts: one that came sooner was sent
    /// before our answer arrived (a fetcher asks for several pieces at once) and is asked for the
    /// rest of that wait, and `false` with it: it need not be told again whom to ask. Counting
    /// those, the first burst of a 100-node crowd's requests to its seeder was asked to wait 1,
    /// 2, 4 and 8 s at once, and the seeder's uplink idled while two pieces had not gone out yet.
    pub(crate) fn spread_refused(&self, hash: Hash, peer: PeerId, base: Duration, now: Instant) -> (Duration, bool) {
        let wait = |n: u32| base.saturating_mul(1 << n.saturating_sub(1).min(MAX_SPREAD_DOUBLINGS));
        let mut inner = self.lock();
        let (n, since) = match inner.refused.get(&(hash, peer)) {
            Some((n, last)) => (*n, now.saturating_duration_since(*last)),
            None => (0, Duration::MAX),
        };
        if since < wait(n) {
            return (wait(n) - since, false);
        }
        let n = if since < self.patience { n.saturating_add(1) } else { 1 };
        inner.refused.put((hash, peer), (n, now));
        (wait(n), true)
    }

    /// We sent `peer` pieces of `hash`: it holds them (once it verified them), so others may
    /// fetch from it, and so may we, if we are fetching the blob too: the fetch is told of it as
    /// a peer it can ask over the connection we just used.
    pub(crate) fn delivered(&self, hash: Hash, peer: PeerId, now: Instant) {
        let mut inner = self.lock();
        let c = contact(&mut inner, hash, peer, now);
        c.holds = true;
        c.moved = Some(now);
        if let Some(fetch) = inner.fetching.get(&hash) {
            // A full channel drops the name: the fetch is behind, and the peer will be named again.
            let _ = fetch.try_send(peer);
        }
    }

    /// A fetch of `hash` starts here: it receives the peers [`Crowds::delivered`] names. The
    /// channel holds [`NEARBY_QUEUE`] names.
    pub(crate) fn fetch_started(&self, hash: Hash) -> mpsc::Receiver<PeerId> {
        let (tx, rx) = mpsc::channel(NEARBY_QUEUE);
        self.lock().fetching.insert(hash, tx);
        rx
    }

    /// The fetch of `hash` ended.
    pub(crate) fn fetch_ended(&self, hash: &Hash) {
        self.lock().fetching.remove(hash);
    }

    /// Whether we hold a connection to `peer` (one identify has reported on).
    pub(crate) fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock().addrs.contains_key(peer)
    }

    /// Whether `c` moved the blob with us recently enough to be hinted and relied on. Asking
    /// for it does not count: a peer that once got a piece and then only asks is not named for
    /// its asking.
    fn is_fresh(&self, c: &Contact, now: Instant) -> bool {
        c.moved.is_some_and(|at| now.saturating_duration_since(at) < self.fresh)
    }

    /// How many count in `hash`'s crowd ([`Crowds::in_crowd`]), each host once ([`host_of`]):
    /// peer ids cost nothing to make, and fifteen made up on one machine, each asking once per
    /// [`ASKING`], would otherwise make a lone fetcher's publisher treat it as one of a crowd
    /// (one piece an answer). Now it takes sixteen IPv4 addresses or IPv6 /48s. Peers behind one
    /// NAT count once too: the publisher takes them for a crowd later, and sends each a larger
    /// share, which costs it egress (not measured: netsim's nodes have no IP addresses). Under
    /// 64 contacts.
    fn crowd_size(&self, inner: &Inner, hash: Hash, now: Instant) -> usize {
        let Some(contacts) = inner.blobs.peek(&hash) else { return 0 };
        let mut members: Vec<Member> = contacts
            .iter()
            .filter(|c| self.in_crowd(c, now))
            // The host it is connected from now, if known; else the last one it was.
            .map(|c| inner.host(&c.peer).or(c.host).map_or(Member::Peer(c.peer), Member::Host))
            .collect();
        members.sort_unstable();
        members.dedup();
        members.len()
    }

    /// Whether `c` counts in the blob's crowd: a fresh holder, or a peer that asked lately. A
    /// transfer that failed leaves its peer fresh but holding nothing from us: an asker.
    fn in_crowd(&self, c: &Contact, now: Instant) -> bool {
        let holds = c.holds || c.served.as_ref().is_some_and(|s| !s.is_empty());
        (holds && self.is_fresh(c, now)) || now.saturating_duration_since(c.seen) < self.asking
    }

    /// Of `asked`, the pieces to serve `peer` now. If we `spread` (we published the blob), a piece
    /// we served to another fresh peer, not found unreachable since nor avoided, is held back,
    /// unless it has been held back from `peer` for our patience already, or we upload to no other peer
    /// (`uplink.idle`) and the blob's crowd (the fresh holders, and the peers that asked for it
    /// within [`ASKING`] or our patience, whichever is longer) is smaller than [`SMALL_CROWD`].
    /// In a crowd that large, one piece goes out at a time, and a fresh peer we served a piece
    /// to gets no other until its patience for them has passed, unless we have room
    /// (`uplink.room`): an upload slot free and nobody in line for one.
    pub(crate) fn offer(
        &self,
        hash: Hash,
        peer: PeerId,
        asked: &PieceSet,
        spread: bool,
        uplink: Uplink,
        now: Instant,
    ) -> PieceSet {
        if !spread {
            return asked.clone();
        }
        self.decide(&mut self.lock(), hash, peer, asked, uplink, now)
    }

    /// [`Crowds::offer`], for a caller that holds an upload slot and sends what is offered. If we
    /// `spread`, the pieces are recorded as served to `peer` ([`Crowds::serving`]) under the same
    /// lock as the choice, so a request choosing at the same moment leaves them to it; what the
    /// caller does not send after all it gives back ([`Crowds::not_served`]). (Before, they were
    /// recorded only once the store had read them, and two requests in a crowd asking for the
    /// one piece nobody had yet could both be sent it.) Otherwise nothing is recorded here.
    pub(crate) fn claim(
        &self,
        hash: Hash,
        peer: PeerId,
        asked: &PieceSet,
        spread: bool,
        uplink: Uplink,
        now: Instant,
    ) -> Claim {
        if !spread {
            return Claim { pieces: asked.clone(), new: PieceSet::empty(asked.piece_count()) };
        }
        let mut inner = self.lock();
        let pieces = self.decide(&mut inner, hash, peer, asked, uplink, now);
        if pieces.is_empty() {
            return Claim { new: pieces.clone(), pieces };
        }
        let new = record_serving(&mut inner, hash, peer, &pieces, now);
        let c = contact(&mut inner, hash, peer, now);
        c.sending = c.sending.saturating_add(pieces.count());
        Claim { pieces, new }
    }

    /// The answer carrying `pieces` pieces of `hash` that [`Crowds::claim`] chose for `peer` has
    /// ended, sent or not: they no longer count against the peer's share.
    pub(crate) fn answered(&self, hash: Hash, peer: PeerId, pieces: u32) {
        let mut inner = self.lock();
        if let Some(c) = inner.blobs.peek_mut(&hash).and_then(|cs| cs.iter_mut().find(|c| c.peer == peer)) {
            c.sending = c.sending.saturating_sub(pieces);
        }
    }

    fn decide(
        &self,
        inner: &mut Inner,
        hash: Hash,
        peer: PeerId,
        asked: &PieceSet,
        uplink: Uplink,
        now: Instant,
    ) -> PieceSet {
        let Uplink { idle, room } = uplink;
        // A requester back after longer than a holder stays fresh (for a crowd of its own, most
        // likely) waits its patience again; one that kept asking goes on with its clocks.
        if let Some(held) = inner.withheld.peek_mut(&(hash, peer)) {
            if now.saturating_duration_since(held.asked) >= self.fresh {
                held.clocks.clear();
            }
            held.asked = now;
        }
        // An asker counts in the crowd too: a crowd is as large as the peers that want the blob.
        let asker = contact(inner, hash, peer, now);
        let (served_before, sending) = (asker.served.as_ref().is_some_and(|s| !s.is_empty()), asker.sending);
        let crowd = self.crowd_size(inner, hash, now);
        let mut elsewhere = self.elsewhere(inner, hash, peer, asked, now);
        // In a crowd, one piece at a time: a peer we served a piece to passes that on before we
        // send it another, so the first copies go to as many peers as there are pieces. It waits
        // only while others want our uplink: with a slot free and nobody in line (`room`) it is
        // served a piece nobody has from us, or a blob of more pieces than the peers that can
        // reach us would leave at one piece per peer per patience. A few peers are served what
        // nobody else has from us (everything, while we upload to no other peer): each may be
        // the only one to ask.
        let crowded = crowd >= SMALL_CROWD;
        if crowded && served_before && !room {
            elsewhere = asked.clone();
        }
        let offer = match elsewhere.is_empty() || (idle && !crowded) {
            true => asked.clone(),
            false => {
                let held =
                    inner.withheld.get_or_insert_mut((hash, peer), || HeldBack { asked: now, clocks: Vec::new() });
                hold_back(&mut held.clocks, asked, &elsewhere, self.patience, now)
            }
        };
        // However small the crowd, a peer is sent at most its share of the blob at once: its
        // pieces over the crowd's members. A crowd forms over the round trips in which its
        // fetchers' lookups end, and the first to ask, served all it asked for while it was one
        // of a few, was the one holder of every piece of those answers, left to it while the
        // rest of the crowd arrived: in the 100-node crowd (`flash-crowd-1000.toml --nodes 100`,
        // seed 2) one fetcher was sent 20 of the 32 first copies in its first 80 ms, three
        // answers under way at once, and those pieces waited on its uplink for seconds.
        let share = offer.piece_count().div_ceil(u32::try_from(crowd.max(1)).unwrap_or(u32::MAX));
        let room_left = share.saturating_sub(sending);
        let take = if crowded { room_left.min(1) } else { room_left };
        if offer.count() <= take {
            return offer;
        }
        let mut taken = PieceSet::empty(offer.piece_count());
        for i in offer.iter().take(take as usize) {
            taken.insert(i);
        }
        taken
    }

    /// Of `asked`, the pieces we served to a fresh peer other than `peer`, not found unreachable
    /// or lying since: those a publisher leaves to their holders.
    fn elsewhere(&self, inner: &Inner, hash: Hash, peer: PeerId, asked: &PieceSet, now: Instant) -> PieceSet {
        let mut elsewhere = PieceSet::empty(asked.piece_count());
        // Piece by piece when few (a request asks for at most 64): this runs under the lock, for
        // each of up to 64 contacts, and a set of a large blob's pieces is a bitmap of the whole
        // blob, which an intersection would copy for each.
        let few: Vec<_> = asked.iter().take(MAX_PIECES_PER_GET as usize + 1).collect();
        let few = (few.len() <= MAX_PIECES_PER_GET as usize).then_some(few);
        for c in inner.blobs.peek(&hash).into_iter().flatten() {
            if c.peer != peer
                && !inner.unreachable.contains_key(&c.peer)
                && self.is_fresh(c, now)
                && let Some(served) = c.served.as_ref().filter(|s| s.piece_count() == asked.piece_count())
                && !self.standing.avoids(&c.peer, now)
            {
                match &few {
                    Some(pieces) => {
                        for &i in pieces.iter().filter(|&&i| served.contains(i)) {
                            elsewhere.insert(i);
                        }
                    }
                    None => elsewhere.union_with(&served.intersection(asked)),
                }
            }
        }
        elsewhere
    }

    /// Whether `peer` asked for a piece of `hash` that we served to no other peer we rely on:
    /// one a publisher that refused it held back for its turn (one piece at a time), not because
    /// another holder has it. Such a peer is asked to come back when an upload slot frees, not to
    /// wait for holders we cannot name.
    pub(crate) fn asked_first_copy(&self, hash: Hash, peer: PeerId, asked: &PieceSet, now: Instant) -> bool {
        let inner = self.lock();
        !asked.difference(&self.elsewhere(&inner, hash, peer, asked, now)).is_empty()
    }

    /// Up to [`MAX_HINTS`] peers other than `peer` that hold pieces of `hash` and are online:
    /// first those we served any of `wanted` (the pieces the requester asked for or wants), if
    /// given, then those that moved pieces with us most recently. A peer we served a piece to may have moved nothing
    /// with us since, and by recency alone it is lost among the peers served after it. Not a peer
    /// we avoid: we found it lying, and each peer we named it to would pay a piece to find out.
    /// A requester from a public address (as `from_public` says, from the connection its request
    /// came on; if it does not tell, as the host recorded for `peer` does) is named only public
    /// addresses, names only of holders that reach us from a public address, and no holder left
    /// with none.
    pub(crate) fn hints(
        &self,
        hash: Hash,
        peer: PeerId,
        from_public: Option<bool>,
        wanted: Option<&PieceSet>,
        now: Instant,
    ) -> Vec<PeerHint> {
        let mut inner = self.lock();
        // A requester that reaches us from a public address cannot dial a holder's addresses
        // that are not public (on our LAN: private, shared or unique-local; link-local;
        // loopback, for a holder on this machine), nor its names unless it reaches us from a
        // public address itself (a name is kept only once it resolves to the address the holder
        // is connected from): they are left out of its hints, with the layout of our LAN they
        // would show, and a holder with none left is not named to it.
        // Whether it does is its request's connection's to say; else the host recorded for it.
        let public = from_public.unwrap_or_else(|| inner.host(&peer).is_some_and(crate::addrs::is_public));
        inner.blobs.promote(&hash);
        let inner = &*inner;
        let Some(contacts) = inner.blobs.peek(&hash) else { return Vec::new() };
        let mut known: Vec<(&Contact, &Vec<Multiaddr>)> = contacts
            .iter()
            .filter(|c| c.holds && c.peer != peer && self.is_fresh(c, now))
            .filter_map(|c| inner.addrs.get(&c.peer).map(|a| (c, a)))
            .collect();
        // A set of many pieces is tested a word at a time, once per contact and with nothing
        // copied: this runs under the lock, and the set is the requester's.
        let holds_wanted = |c: &Contact| {
            wanted.zip(c.served.as_ref()).is_some_and(|(w, s)| s.piece_count() == w.piece_count() && s.intersects(w))
        };
        known.sort_by_cached_key(|(c, _)| (!holds_wanted(c), std::cmp::Reverse(c.moved)));
        known
            .into_iter()
            .filter(|(c, _)| !self.standing.avoids(&c.peer, now))
            .filter_map(|(c, a)| {
                let holder_public = || inner.host(&c.peer).or(c.host).is_some_and(crate::addrs::is_public);
                let reachable = |a: &&Multiaddr| match crate::addrs::ip(a) {
                    _ if !public => true,
                    Some(ip) => crate::addrs::is_public(ip),
                    None => !crate::addrs::is_name(a) || holder_public(),
                };
                let addrs: Vec<Vec<u8>> = a.iter().filter(reachable).take(MAX_HINT_ADDRS).map(|a| a.to_vec()).collect();
                (!addrs.is_empty()).then(|| PeerHint { id: c.peer.to_bytes(), addrs })
            })
            .take(MAX_HINTS)
            .collect()
    }
}

/// The record of `peer` for `hash`, made if there is none (replacing a requester that holds
/// nothing, or else the holder seen longest ago, when the blob has [`MAX_CONTACTS`]).
fn contact(inner: &mut Inner, hash: Hash, peer: PeerId, now: Instant) -> &mut Contact {
    let host = inner.host(&peer);
    let contacts = inner.blobs.get_or_insert_mut(hash, Vec::new);
    let ix = match contacts.iter().position(|c| c.peer == peer) {
        Some(ix) => ix,
        None => {
            let fresh = Contact { peer, seen: now, moved: None, holds: false, served: None, sending: 0, host };
            if contacts.len() < MAX_CONTACTS {
                contacts.push(fresh);
                contacts.len() - 1
            } else {
                // Requesters that hold nothing go first, then the holders seen longest ago.
                let oldest = contacts
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, c)| (c.holds || c.served.is_some(), c.seen))
                    .map_or(0, |(ix, _)| ix);
                contacts[oldest] = fresh;
                oldest
            }
        }
    };
    let c = &mut contacts[ix];
    c.seen = now;
    // Kept once the peer disconnected: a holder counts while fresh, connected or not.
    c.host = host.or(c.host);
    c
}

/// Records that `pieces` of `hash` are being sent to `peer` (see [`Crowds::serving`]); returns
/// those not recorded before.
fn record_serving(inner: &mut Inner, hash: Hash, peer: PeerId, pieces: &PieceSet, now: Instant) -> PieceSet {
    let c = contact(inner, hash, peer, now);
    c.moved = Some(now);
    let new = match &mut c.served {
        Some(s) if s.piece_count() == pieces.piece_count() => {
            let new = pieces.difference(s);
            s.union_with(pieces);
            new
        }
        s => {
            *s = Some(pieces.clone());
            pieces.clone()
        }
    };
    if let Some(held) = inner.withheld.peek_mut(&(hash, peer)) {
        held.clocks.retain(|(i, _)| !pieces.contains(*i));
        if held.clocks.is_empty() {
            inner.withheld.pop(&(hash, peer));
        }
    }
    inner.refused.pop(&(hash, peer));
    new
}

/// `asked` less the pieces of `elsewhere` still within `patience` by the requester's `clocks`;
/// pieces held back for the first time start their patience now.
fn hold_back(
    clocks: &mut Vec<(u32, Instant)>,
    asked: &PieceSet,
    elsewhere: &PieceSet,
    patience: Duration,
    now: Instant,
) -> PieceSet {
    let mut offer = asked.clone();
    for i in elsewhere.iter() {
        let since = match clocks.iter().find(|(p, _)| *p == i) {
            Some((_, t)) => *t,
            None if clocks.len() < MAX_WITHHELD => {
                clocks.push((i, now));
                now
            }
            None => continue,
        };
        if now.saturating_duration_since(since) < patience {
            offer.remove(i);
        }
    }
    offer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(idle: bool, room: bool) -> Uplink {
        Uplink { idle, room }
    }

    fn set(n: u32, ix: &[u32]) -> PieceSet {
        let mut s = PieceSet::empty(n);
        for &i in ix {
            s.insert(i);
        }
        s
    }

    /// Crowds of a node that avoids nobody yet.
    fn with_patience(patience: Duration) -> Crowds {
        Crowds::new(patience, 1.0, Arc::default())
    }

    /// We sent `pieces` of `hash` to `peer` at `at`, and it got them.
    fn served(crowds: &Crowds, hash: Hash, peer: PeerId, pieces: &PieceSet, at: Instant) {
        crowds.serving(hash, peer, pieces, at);
        crowds.delivered(hash, peer, at);
    }

    /// A distinct blob id per index.
    /// A crowd of [`SMALL_CROWD`] new peers asks for the last of `pieces` pieces of `hash`.
    fn crowd_asks(crowds: &Crowds, hash: Hash, pieces: u32, now: Instant) {
        for _ in 0..SMALL_CROWD {
            let _ = crowds.offer(hash, PeerId::random(), &set(pieces, &[pieces - 1]), true, up(false, false), now);
        }
    }

    fn nth_hash(i: usize) -> Hash {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Hash::from(id)
    }

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1").parse().expect("addr")
    }

    #[test]
    fn a_running_fetch_hears_of_the_peers_we_serve_its_blob() {
        let crowds = with_patience(PATIENCE);
        let (fetched, other) = (nth_hash(1), nth_hash(2));
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        crowds.delivered(fetched, a, now);
        let mut nearby = crowds.fetch_started(fetched);
        assert!(nearby.try_recv().is_err(), "only deliveries made while the fetch runs are named");
        crowds.delivered(other, a, now);
        crowds.delivered(fetched, b, now);
        assert_eq!(nearby.try_recv().ok(), Some(b));
        assert!(nearby.try_recv().is_err(), "not the peers served another blob");
        for _ in 0..NEARBY_QUEUE + 10 {
            crowds.delivered(fetched, a, now);
        }
        assert_eq!(std::iter::from_fn(|| nearby.try_recv().ok()).count(), NEARBY_QUEUE, "the queue is bounded");
        crowds.fetch_ended(&fetched);
        crowds.delivered(fetched, b, now);
        assert!(nearby.try_recv().is_err(), "an ended fetch hears nothing");
    }

    #[test]
    fn holders_first_names_a_peer_served_a_wanted_piece_before_more_recent_ones() {
        let crowds = with_patience(Duration::from_secs(30));
        let hash = Hash::from([9u8; 32]);
        let t0 = Instant::now();
        // The first peer served gets piece 0; more peers than an answer names are served after it.
        let first = PeerId::random();
        crowds.connected(first, vec![addr(1)]);
        served(&crowds, hash, first, &set(16, &[0]), t0);
        for i in 1..=MAX_HINTS as u32 {
            let later = PeerId::random();
            let at = t0 + Duration::from_millis(u64::from(i));
            crowds.connected(later, vec![addr(1 + i as u16)]);
            served(&crowds, hash, later, &set(16, &[i]), at);
        }
        let now = t0 + Duration::from_secs(1);
        let asker = PeerId::random();
        let named = |wanted: Option<&PieceSet>| -> Vec<PeerId> {
            let hints = crowds.hints(hash, asker, None, wanted, now);
            hints.iter().map(|h| PeerId::from_bytes(&h.id).expect("id")).collect()
        };
        // Asked for piece 0, which it leaves to the first peer, it names that peer first.
        let asked = set(16, &[0]);
        assert_eq!(crowds.offer(hash, asker, &asked, true, up(false, false), now), set(16, &[]));
        let hinted = named(Some(&asked));
        assert_eq!(hinted.len(), MAX_HINTS);
        assert_eq!(hinted[0], first);
        // Asked nothing in particular, the latest transfers come first, and the first is left out.
        assert_eq!(named(None).len(), MAX_HINTS);
        assert!(!named(None).contains(&first));
    }

    #[test]
    fn a_peer_held_back_for_its_turn_is_told_a_first_copy_waits_for_it() {
        let crowds = with_patience(Duration::from_secs(30));
        let hash = Hash::from([5u8; 32]);
        let t0 = Instant::now();
        crowd_asks(&crowds, hash, 16, t0);
        let (a, b) = (PeerId::random(), PeerId::random());
        served(&crowds, hash, a, &set(16, &[0]), t0);
        // In a crowd, with our uplink busy, `a` gets no second piece, though nobody has piece 1.
        let asked = set(16, &[1]);
        assert!(crowds.offer(hash, a, &asked, true, up(false, false), t0).is_empty());
        assert!(crowds.asked_first_copy(hash, a, &asked, t0));
        // Once piece 1 went to `b`, it is left to `b`; so is piece 0 to `a`, for anyone else.
        crowds.serving(hash, b, &asked, t0);
        assert!(!crowds.asked_first_copy(hash, a, &asked, t0));
        assert!(!crowds.asked_first_copy(hash, b, &set(16, &[0]), t0));
        assert!(crowds.asked_first_copy(hash, b, &set(16, &[0, 2]), t0));
        // A piece whose holder we could not reach since is a first copy again.
        crowds.unreachable(b, t0);
        assert!(crowds.asked_first_copy(hash, a, &asked, t0));
    }

    #[test]
    fn a_publisher_leaves_a_piece_it_served_to_an_online_peer_to_that_peer() {
        let crowds = with_patience(Duration::from_secs(3));
        let hash = Hash::from([7u8; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(a, vec![addr(1)]);
        served(&crowds, hash, a, &set(8, &[0, 1]), t0);
        let asked = set(8, &[1, 2]);
        // A node that did not publish the blob serves everything it holds.
        assert_eq!(crowds.offer(hash, b, &asked, false, up(false, false), t0), asked);
        // A publisher leaves piece 1 to `a`, who is named in the hints.
        assert_eq!(crowds.offer(hash, b, &asked, true, up(false, false), t0), set(8, &[2]));
        let hints = crowds.hints(hash, b, None, None, t0);
        assert_eq!(hints.len(), 1);
        assert_eq!(PeerId::from_bytes(&hints[0].id).expect("id"), a);
        assert_eq!(Multiaddr::try_from(hints[0].addrs[0].clone()).expect("addr"), addr(1));
        // A peer is never sent to itself, nor hinted to itself.
        assert_eq!(crowds.offer(hash, a, &asked, true, up(false, false), t0), asked);
        assert!(crowds.hints(hash, a, None, None, t0).is_empty());
        // Until its patience runs out; then `b` gets the piece from us after all.
        let almost = t0 + Duration::from_secs(3) - Duration::from_millis(1);
        assert_eq!(crowds.offer(hash, b, &asked, true, up(false, false), almost), set(8, &[2]));
        assert_eq!(crowds.offer(hash, b, &asked, true, up(false, false), t0 + Duration::from_secs(3)), asked);
    }

    /// A peer found lying is named to nobody, and a publisher leaves no piece to it: each peer
    /// sent to it would pay a piece to find it out, and come back for the piece.
    #[test]
    fn a_peer_avoided_for_a_lie_is_neither_named_nor_left_pieces() {
        let standing = Arc::new(Standing::default());
        let crowds = Crowds::new(Duration::from_secs(3), 1.0, standing.clone());
        let hash = Hash::from([7u8; 32]);
        let (liar, honest, asker) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(liar, vec![addr(1)]);
        crowds.connected(honest, vec![addr(2)]);
        served(&crowds, hash, liar, &set(8, &[1]), t0);
        served(&crowds, hash, honest, &set(8, &[2]), t0);
        let named = |now| -> Vec<PeerId> {
            let hints = crowds.hints(hash, asker, None, None, now);
            hints.iter().map(|h| PeerId::from_bytes(&h.id).expect("id")).collect()
        };
        assert_eq!(named(t0).len(), 2);
        assert!(!crowds.asked_first_copy(hash, asker, &set(8, &[1]), t0), "left to the liar while not found out");

        standing.penalise(liar, crate::standing::Offence::Lied, t0);
        assert_eq!(named(t0), vec![honest]);
        assert!(crowds.asked_first_copy(hash, asker, &set(8, &[1]), t0));
        assert_eq!(crowds.offer(hash, asker, &set(8, &[1, 2]), true, up(false, false), t0), set(8, &[1]));
        // A peer merely counted (a stale map) is named as before.
        standing.penalise(honest, crate::standing::Offence::Failed, t0);
        assert_eq!(named(t0), vec![honest]);

        // The liar, served last, takes no place among the hints that others would fill.
        let t1 = t0 + Duration::from_millis(1);
        let others: Vec<PeerId> = (0..MAX_HINTS).map(|_| PeerId::random()).collect();
        for (i, &p) in others.iter().enumerate() {
            crowds.connected(p, vec![addr(10 + i as u16)]);
            served(&crowds, hash, p, &set(8, &[3]), t0);
        }
        served(&crowds, hash, liar, &set(8, &[1]), t1);
        let hinted = named(t1);
        assert_eq!(hinted.len(), MAX_HINTS);
        assert!(!hinted.contains(&liar));
        // Once its term has passed, it is named and relied on again.
        let later = t0 + crate::standing::AVOID_FIRST;
        served(&crowds, hash, liar, &set(8, &[1]), later);
        assert_eq!(named(later)[0], liar);
        assert!(!crowds.asked_first_copy(hash, asker, &set(8, &[1]), later));
    }

    /// Where a request comes from, read off its connection's address.
    #[test]
    fn a_requests_connection_tells_whether_it_came_from_a_public_address() {
        let cases = [
            ("/ip4/198.51.100.9/udp/4001/quic-v1", Some(true)),
            ("/ip6/2001:db8:1::5/udp/4001/quic-v1", Some(true)),
            ("/ip4/192.168.1.5/udp/4001/quic-v1", Some(false)),
            ("/ip4/100.64.0.9/udp/4001/quic-v1", Some(false)),
            ("/ip6/::ffff:192.168.1.5/udp/4001/quic-v1", Some(false)),
            ("/ip6/::ffff:198.51.100.9/udp/4001/quic-v1", Some(true)),
            ("/ip4/127.0.0.1/udp/4001/quic-v1", Some(false)),
            ("/ip6/::1/udp/4001/quic-v1", Some(false)),
            ("/ip6/fe80::1/udp/4001/quic-v1", Some(false)),
            ("/ip6/fd00::1/udp/4001/quic-v1", Some(false)),
            ("/memory/42", Some(false)),
            ("/dns4/node.example/udp/4001/quic-v1", None),
        ];
        for (addr, public) in cases {
            assert_eq!(from_public(&addr.parse().expect("addr")), public, "{addr}");
        }
    }

    /// A requester from the internet is named a holder's public addresses only, and the names
    /// of holders that reach us from public addresses: it could dial none on our LAN. One on the
    /// LAN (or whose host we do not know) is named the first addresses of each, as before.
    #[test]
    fn a_requester_from_the_internet_is_named_no_lan_address() {
        let crowds = with_patience(Duration::from_secs(3));
        let hash = Hash::from([7u8; 32]);
        let at = |a: &str| -> Multiaddr { format!("/ip4/{a}/udp/4001/quic-v1").parse().expect("addr") };
        let name = |n: &str| -> Multiaddr { format!("/dns4/{n}/udp/4001/quic-v1").parse().expect("addr") };
        let t0 = Instant::now();
        // A LAN host whose public address comes fifth; one with a LAN address only; one known by
        // a name that resolved to its LAN address; one by a name that resolved to a public one.
        let (both, lan_only, lan_name, public_name) =
            (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        let lan = ["192.168.1.5", "172.17.0.1", "172.18.0.1", "10.1.0.1"].map(at);
        crowds.connected(both, [&lan[..], &[at("203.0.113.5")]].concat());
        crowds.connected(lan_only, vec![at("10.0.0.7")]);
        crowds.connected_from(lan_name, &at("192.168.1.20"));
        crowds.connected(lan_name, vec![name("nas.lan")]);
        crowds.connected_from(public_name, &at("203.0.113.7"));
        crowds.connected(public_name, vec![name("node.example")]);
        for (i, p) in [both, lan_only, lan_name, public_name].into_iter().enumerate() {
            served(&crowds, hash, p, &set(8, &[i as u32]), t0);
        }
        let named = |asker: PeerId, from_public: Option<bool>| -> Vec<(PeerId, Vec<Multiaddr>)> {
            let hints = crowds.hints(hash, asker, from_public, None, t0);
            let addrs = |h: &PeerHint| h.addrs.iter().map(|a| Multiaddr::try_from(a.clone()).expect("addr")).collect();
            let mut named: Vec<_> = hints.iter().map(|h| (PeerId::from_bytes(&h.id).expect("id"), addrs(h))).collect();
            named.sort();
            named
        };
        let sorted = |mut v: Vec<(PeerId, Vec<Multiaddr>)>| {
            v.sort();
            v
        };
        let public_only = sorted(vec![(both, vec![at("203.0.113.5")]), (public_name, vec![name("node.example")])]);
        let all = sorted(vec![
            (both, lan.to_vec()),
            (lan_only, vec![at("10.0.0.7")]),
            (lan_name, vec![name("nas.lan")]),
            (public_name, vec![name("node.example")]),
        ]);
        // A request's connection says where it came from, whatever host was recorded for its
        // peer before (another connection's).
        let (remote, neighbour) = (PeerId::random(), PeerId::random());
        crowds.connected_from(remote, &at("198.51.100.9"));
        crowds.connected_from(neighbour, &at("192.168.1.9"));
        assert_eq!(named(neighbour, Some(true)), public_only);
        assert_eq!(named(remote, Some(false)), all);
        // Where it does not (a peer dialled by name), the host recorded for the peer does: as a
        // request arrives, or as the swarm hears of its connection.
        let (early, moved) = (PeerId::random(), PeerId::random());
        crowds.requested_from(early, &at("198.51.100.7"));
        crowds.connected_from(moved, &at("192.168.1.8"));
        crowds.requested_from(moved, &at("198.51.100.8"));
        for asker in [remote, early, moved] {
            assert_eq!(named(asker, None), public_only);
        }
        assert!(!crowds.lock().hosts.contains_key(&early), "a request records no connection");
        for asker in [neighbour, PeerId::random()] {
            assert_eq!(named(asker, None), all);
        }
    }

    #[test]
    fn a_publisher_in_a_crowd_sends_one_piece_at_a_time_to_as_many_peers_as_it_can() {
        let crowds = with_patience(Duration::from_secs(3));
        let hash = Hash::from([7u8; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(a, vec![addr(1)]);
        crowds.connected(b, vec![addr(2)]);
        let asked = set(8, &[0, 1, 2, 3]);
        // Alone, or in a small crowd, a peer is served all it asks for.
        assert_eq!(crowds.offer(hash, a, &asked, true, up(false, false), t0), asked);
        crowd_asks(&crowds, hash, 8, t0);
        // One piece of the four asked for.
        let first = crowds.offer(hash, a, &asked, true, up(false, false), t0);
        assert_eq!(first.count(), 1);
        crowds.serving(hash, a, &first, t0);
        // Nothing more to `a` while it is the one to pass that piece on.
        assert!(crowds.offer(hash, a, &asked, true, up(false, false), t0).is_empty());
        // `b` asking the same gets another piece: the first copies go to different peers.
        let second = crowds.offer(hash, b, &asked, true, up(false, false), t0);
        assert_eq!(second.count(), 1);
        assert!(second.intersection(&first).is_empty());
        // After our patience, `a` is served again, still one piece at a time.
        assert_eq!(crowds.offer(hash, a, &asked, true, up(false, false), t0 + Duration::from_secs(3)).count(), 1);
    }

    /// Two requests with upload slots asking at once for the one piece nobody has from us: it
    /// goes to one of them. Given back when it was not sent after all, it goes to the other.
    #[test]
    fn a_piece_claimed_for_one_requester_is_not_sent_to_another_meanwhile() {
        let crowds = with_patience(Duration::from_secs(3));
        let hash = Hash::from([7u8; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowd_asks(&crowds, hash, 8, t0);
        let asked = set(8, &[5]);
        // Both chose before either read the piece from the store: the first choice holds it.
        let first = crowds.claim(hash, a, &asked, true, up(false, false), t0);
        assert_eq!((&first.pieces, &first.new), (&asked, &asked));
        assert!(crowds.claim(hash, b, &asked, true, up(false, false), t0).pieces.is_empty());
        crowds.not_served(hash, a, &first.new);
        crowds.answered(hash, a, first.pieces.count());
        let again = crowds.claim(hash, b, &asked, true, up(false, false), t0);
        assert_eq!(again.pieces, asked);
        // `b` got it. Asking again (with a slot free), it may be sent it again, but that request
        // claimed nothing new and gives nothing back if it fails: the piece is still left to `b`.
        served(&crowds, hash, b, &again.pieces, t0);
        crowds.answered(hash, b, again.pieces.count());
        let twice = crowds.claim(hash, b, &asked, true, up(false, true), t0);
        assert_eq!(twice.pieces, asked);
        assert!(twice.new.is_empty());
        crowds.not_served(hash, b, &twice.new);
        assert!(crowds.claim(hash, a, &asked, true, up(false, false), t0).pieces.is_empty());
        // A node that does not spread serves what it is asked, and claims nothing.
        let c = PeerId::random();
        let unclaimed = crowds.claim(hash, c, &set(8, &[6]), false, up(false, false), t0);
        assert_eq!((unclaimed.pieces, unclaimed.new), (set(8, &[6]), set(8, &[])));
        assert_eq!(crowds.claim(hash, a, &set(8, &[6]), true, up(false, false), t0).pieces, set(8, &[6]));
    }

    #[test]
    fn a_publisher_with_room_serves_a_peer_it_served_lately_a_piece_nobody_has() {
        // More pieces than peers that reach us: were `a` to wait our patience between pieces, the
        // blob would leave at one piece per peer per patience.
        let crowds = with_patience(Duration::from_secs(30));
        let hash = Hash::from([7u8; 32]);
        let a = PeerId::random();
        let t0 = Instant::now();
        crowds.connected(a, vec![addr(1)]);
        crowd_asks(&crowds, hash, 64, t0);
        let asked = set(64, &[0, 1, 2, 3]);
        let first = crowds.offer(hash, a, &asked, true, up(false, false), t0);
        crowds.serving(hash, a, &first, t0);
        // It asks again for the pieces it lacks. With others in line for our uplink, it waits.
        let lacking = asked.difference(&first);
        assert!(crowds.offer(hash, a, &lacking, true, up(false, false), t0).is_empty());
        // With room, it gets one more.
        let second = crowds.offer(hash, a, &lacking, true, up(false, true), t0);
        assert_eq!(second.count(), 1);
        crowds.serving(hash, a, &second, t0);
        // A piece served to another peer is still left to that peer, room or not.
        let b = PeerId::random();
        crowds.connected(b, vec![addr(2)]);
        crowds.serving(hash, b, &set(64, &[2, 3]), t0);
        assert!(crowds.offer(hash, a, &set(64, &[2, 3]), true, up(false, true), t0).is_empty());
    }

    /// The first fetcher to ask, alone so far, is sent what it asks; a second answer at once goes
    /// past its share of a crowd that has formed meanwhile, and is refused until the first ended.
    #[test]
    fn a_publisher_sends_a_peer_at_most_its_share_of_the_blob_at_once() {
        let crowds = with_patience(Duration::from_secs(30));
        let hash = Hash::from([7u8; 32]);
        let t0 = Instant::now();
        let range = |r: std::ops::Range<u32>| set(32, &r.collect::<Vec<_>>());
        let a = PeerId::random();
        let first = crowds.claim(hash, a, &range(0..8), true, up(false, false), t0);
        assert_eq!(first.pieces, range(0..8), "alone, a peer is sent all it asks for");
        // Three more peers ask: a crowd of four, a share of eight pieces each.
        for i in 8..11 {
            let got = crowds.claim(hash, PeerId::random(), &set(32, &[i]), true, up(false, false), t0);
            assert_eq!(got.pieces.count(), 1);
        }
        assert!(crowds.claim(hash, a, &range(16..24), true, up(false, false), t0).pieces.is_empty());
        assert!(crowds.offer(hash, a, &range(16..24), true, up(false, false), t0).is_empty());
        // Its first answer sent, `a` may have its share again, and no more.
        crowds.answered(hash, a, first.pieces.count());
        let second = crowds.claim(hash, a, &range(16..32), true, up(false, false), t0);
        assert_eq!(second.pieces, range(16..24));
        // A blob of many pieces and a few fetchers: the share is no bound on a fetch's window.
        let big = Hash::from([8u8; 32]);
        let b = PeerId::random();
        let _ = crowds.claim(big, PeerId::random(), &PieceSet::single(1024, 0), true, up(false, false), t0);
        for k in 0..4 {
            let asked: Vec<u32> = (1 + 8 * k..9 + 8 * k).collect();
            assert_eq!(crowds.claim(big, b, &set(1024, &asked), true, up(false, false), t0).pieces.count(), 8);
        }
    }

    #[test]
    fn a_requester_refused_again_and_again_is_asked_to_wait_longer() {
        let crowds = with_patience(Duration::from_secs(30));
        let (hash, other) = (nth_hash(1), nth_hash(2));
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let base = Duration::from_secs(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Each time it comes back when told to, the wait doubles, up to eight times the base.
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let (wait, counted) = crowds.spread_refused(hash, a, base, now);
            assert!(counted);
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [1, 2, 4, 8, 8, 8]);
        // Requests sent together are refused together: the ones that arrive before the wait has
        // passed are asked for the rest of it, do not double it and are not told whom to ask again.
        let burst: Vec<(Duration, bool)> = (0..4).map(|k| crowds.spread_refused(hash, b, base, at(k))).collect();
        let rest = |k: u64| (base - Duration::from_millis(k), k == 0);
        assert_eq!(burst, (0..4).map(rest).collect::<Vec<_>>());
        assert_eq!(crowds.spread_refused(hash, b, base, at(1000)), (base * 2, true));
        // Counted per requester and per blob.
        assert_eq!(crowds.spread_refused(other, a, base, t0), (base, true));
        // Served a piece, it starts again from the base.
        crowds.serving(hash, a, &set(8, &[3]), now);
        assert_eq!(crowds.spread_refused(hash, a, base, now).0, base);
        assert_eq!(crowds.spread_refused(hash, a, base, now + base).0, base * 2);
        // So it does once a patience has passed since the last refusal.
        assert_eq!(crowds.spread_refused(hash, a, base, now + Duration::from_secs(40)).0, base);
    }

    /// A requester held back holds nothing from us, so it is the first contact a new asker
    /// replaces: its patience must not start again when more than a blob's contacts ask meanwhile.
    #[test]
    fn a_requesters_patience_runs_out_however_many_others_ask_meanwhile() {
        let crowds = with_patience(Duration::from_secs(3));
        let hash = Hash::from([7u8; 32]);
        let (holder, waiting) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(holder, vec![addr(1)]);
        served(&crowds, hash, holder, &set(8, &[0]), t0);
        let asked = set(8, &[0]);
        assert!(crowds.offer(hash, waiting, &asked, true, up(false, false), t0).is_empty());
        // Twice as many peers as a blob's contacts ask for another piece meanwhile.
        for k in 0..2 * MAX_CONTACTS as u64 {
            let at = t0 + Duration::from_millis(1 + k);
            let _ = crowds.offer(hash, PeerId::random(), &set(8, &[7]), true, up(false, false), at);
        }
        let patience = t0 + Duration::from_secs(3);
        assert!(
            crowds.offer(hash, waiting, &asked, true, up(false, false), patience - Duration::from_millis(1)).is_empty()
        );
        assert_eq!(crowds.offer(hash, waiting, &asked, true, up(false, false), patience), asked);
        // Back long after, for a crowd of the piece's holders again, it waits its patience again.
        let again = t0 + Duration::from_secs(100);
        served(&crowds, hash, holder, &asked, again);
        assert!(crowds.offer(hash, waiting, &asked, true, up(false, false), again).is_empty());
    }

    /// A few peers asking now and then are not a crowd: a lone fetcher is still sent all it asks.
    #[test]
    fn askers_count_in_a_crowd_only_while_they_ask() {
        let crowds = with_patience(PATIENCE);
        let hash = Hash::from([7u8; 32]);
        let t0 = Instant::now();
        let asked = set(8, &[0, 1, 2, 3]);
        crowd_asks(&crowds, hash, 8, t0);
        let lone = PeerId::random();
        assert_eq!(crowds.offer(hash, lone, &asked, true, up(false, false), t0).count(), 1, "one of a crowd");
        let later = t0 + ASKING;
        assert_eq!(crowds.offer(hash, lone, &asked, true, up(false, false), later), asked, "alone again");
        // Holders count for as long as they are relied on.
        for _ in 0..SMALL_CROWD {
            served(&crowds, hash, PeerId::random(), &set(8, &[7]), later);
        }
        let much_later = later + ASKING;
        assert_eq!(crowds.offer(hash, lone, &asked, true, up(false, false), much_later).count(), 1);
        assert_eq!(crowds.offer(hash, lone, &asked, true, up(false, false), later + crowds.fresh), asked);
    }

    /// A holder is named and relied on for what moved between us, not for asking: one that got a
    /// piece once and then only asks is not named first, and goes stale like any other.
    #[test]
    fn a_holder_is_ranked_and_kept_fresh_by_transfers_not_by_asking() {
        let crowds = with_patience(Duration::from_secs(10));
        let hash = Hash::from([7u8; 32]);
        let (first, second) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(first, vec![addr(1)]);
        crowds.connected(second, vec![addr(2)]);
        served(&crowds, hash, first, &set(8, &[0]), t0);
        served(&crowds, hash, second, &set(8, &[1]), t0 + Duration::from_millis(1));
        let named = |now: Instant| -> Vec<PeerId> {
            let hints = crowds.hints(hash, PeerId::random(), None, None, now);
            hints.iter().map(|h| PeerId::from_bytes(&h.id).expect("id")).collect()
        };
        // `first` asks for more, again and again, for longer than a holder stays fresh (three
        // patiences, 30 s).
        let fresh = Duration::from_secs(30);
        let mut now = t0;
        while now <= t0 + fresh {
            now += Duration::from_secs(1);
            let _ = crowds.offer(hash, first, &set(8, &[2]), true, up(false, false), now);
            if now == t0 + Duration::from_secs(1) {
                assert_eq!(named(now), [second, first], "the latest transfer first");
            }
        }
        assert!(named(now).is_empty(), "both stale");
        let asked = set(8, &[0]);
        assert_eq!(crowds.offer(hash, PeerId::random(), &asked, true, up(false, false), now), asked);
    }

    #[test]
    fn an_idle_publisher_holds_back_only_in_a_large_crowd() {
        let crowds = with_patience(Duration::from_secs(10));
        let hash = Hash::from([7u8; 32]);
        let t0 = Instant::now();
        let asker = PeerId::random();
        let asked = set(8, &[0]);
        // Piece 0 went to each of a small crowd of holders, all online.
        for _ in 0..SMALL_CROWD - 2 {
            let p = PeerId::random();
            crowds.connected(p, vec![addr(1)]);
            crowds.serving(hash, p, &asked, t0);
        }
        // With nothing else to upload, the publisher serves it again; while busy, it does not.
        assert_eq!(crowds.offer(hash, asker, &asked, true, up(true, false), t0), asked);
        assert!(crowds.offer(hash, asker, &asked, true, up(false, false), t0).is_empty());
        // The crowd grows: now it holds back even while idle.
        let p = PeerId::random();
        crowds.connected(p, vec![addr(1)]);
        crowds.serving(hash, p, &asked, t0);
        assert!(crowds.offer(hash, PeerId::random(), &asked, true, up(true, false), t0).is_empty());
    }

    #[test]
    fn a_holder_is_relied_on_while_fresh_unless_found_unreachable() {
        // Fresh for three patiences: a minute.
        let crowds = with_patience(Duration::from_secs(20));
        let hash = Hash::from([7u8; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        crowds.connected(a, vec![addr(1)]);
        crowds.serving(hash, a, &set(64, &[0]), t0);
        let asked = set(64, &[0, 1]);
        // Its connection closed (either side may close one to stay within its bound): `a` still
        // holds piece 0, which is left to it.
        crowds.disconnected(&a);
        assert_eq!(crowds.offer(hash, b, &asked, true, up(false, false), t0), set(64, &[1]));
        // Not named to others, though: we hold no connection, so no fresh addresses, to it.
        assert!(crowds.hints(hash, b, None, None, t0).is_empty());
        // A minute (three patiences) later it is stale like any holder.
        let minute = Duration::from_secs(60);
        let c = PeerId::random();
        assert_eq!(
            crowds.offer(hash, c, &asked, true, up(false, false), t0 + minute - Duration::from_millis(1)),
            set(64, &[1])
        );
        assert_eq!(crowds.offer(hash, c, &asked, true, up(false, false), t0 + minute), asked);
        // Served again, then a dial to it failed: it may be gone, and is not relied on.
        crowds.connected(a, vec![addr(1)]);
        crowds.serving(hash, a, &set(64, &[0]), t0 + minute);
        crowds.unreachable(a, t0 + minute);
        let later = t0 + minute;
        assert_eq!(
            crowds.offer(hash, PeerId::random(), &asked, true, up(false, false), later),
            set(64, &[1]),
            "still connected"
        );
        crowds.disconnected(&a);
        crowds.unreachable(a, later);
        assert_eq!(crowds.offer(hash, PeerId::random(), &asked, true, up(false, false), later), asked);
        // Until it connects again.
        crowds.connected(a, vec![addr(1)]);
        assert_eq!(crowds.offer(hash, PeerId::random(), &asked, true, up(false, false), later), set(64, &[1]));
    }

    #[test]
    fn everything_is_bounded() {
        let crowds = with_patience(PATIENCE);
        let t0 = Instant::now();
        let hash = Hash::from([1u8; 32]);
        for _ in 0..MAX_CONTACTS * 2 {
            let p = PeerId::random();
            crowds.connected(p, vec![addr(1); 10]);
            served(&crowds, hash, p, &set(4096, &[0]), t0);
        }
        assert_eq!(crowds.lock().blobs.get(&hash).map(Vec::len), Some(MAX_CONTACTS));
        assert!(crowds.lock().addrs.values().all(|a| a.len() <= MAX_ADDRS_KEPT));
        assert_eq!(crowds.hints(hash, PeerId::random(), None, None, t0).len(), MAX_HINTS);
        // A peer held back from more pieces than the bound is served the rest.
        let holder = PeerId::random();
        crowds.connected(holder, vec![addr(2)]);
        let t1 = t0 + Duration::from_millis(1);
        crowds.serving(hash, holder, &PieceSet::full(4096), t1);
        let asker = PeerId::random();
        let mut served = 0;
        for start in (0..4096).step_by(64) {
            let mut asked = PieceSet::empty(4096);
            asked.insert_range(start..start + 64);
            served += crowds.offer(hash, asker, &asked, true, up(false, false), t1).count();
        }
        // One piece per answer, once the bound is reached.
        assert_eq!(served, (4096 - MAX_WITHHELD as u32) / 64);
        // Unreachable peers are remembered up to a bound, the stale ones forgotten first.
        for _ in 0..MAX_UNREACHABLE + 10 {
            crowds.unreachable(PeerId::random(), t0);
        }
        assert_eq!(crowds.lock().unreachable.len(), MAX_UNREACHABLE);
        let later = t0 + crowds.fresh;
        crowds.unreachable(PeerId::random(), later);
        assert_eq!(crowds.lock().unreachable.len(), 1);
        for i in 0..MAX_BLOBS + 10 {
            crowds.source(nth_hash(i), holder, t0);
        }
        assert_eq!(crowds.lock().blobs.len(), MAX_BLOBS);
        for i in 0..MAX_REFUSED + 10 {
            crowds.spread_refused(nth_hash(i), holder, Duration::from_secs(1), t0);
        }
        assert_eq!(crowds.lock().refused.len(), MAX_REFUSED);
        // Patience clocks are kept for a bounded number of requesters, the least recent forgotten.
        let left_to = PeerId::random();
        crowds.connected(left_to, vec![addr(3)]);
        for i in 0..MAX_BLOBS {
            crowds.serving(nth_hash(i), left_to, &set(8, &[0]), t0);
        }
        for k in 0..MAX_HELD_BACK + 10 {
            let _ = crowds.offer(nth_hash(k % MAX_BLOBS), PeerId::random(), &set(8, &[0]), true, up(false, false), t0);
        }
        assert_eq!(crowds.lock().withheld.len(), MAX_HELD_BACK);
        for i in 0..MAX_BLOBS + 10 {
            crowds.remember_proof(nth_hash(i), 5, vec![1, 2, 3]);
        }
        assert_eq!(crowds.lock().proofs.len(), MAX_BLOBS);
        let last = nth_hash(MAX_BLOBS + 9);
        assert_eq!(crowds.proof(last, 5).as_deref(), Some(&[1u8, 2, 3][..]));
        assert!(crowds.proof(last, 6).is_none(), "a proof is only for the size it proves");
    }

    fn at(addr: &str) -> Multiaddr {
        format!("{addr}/udp/4737/quic-v1").parse().expect("addr")
    }

    /// Peer ids cost nothing: many asking from one host count once in a crowd, and a lone
    /// fetcher's publisher still sends it all it asks. From as many hosts, they are a crowd.
    #[test]
    fn peers_asking_from_one_host_count_once_in_a_crowd() {
        let crowds = with_patience(PATIENCE);
        let hash = Hash::from([5u8; 32]);
        let t0 = Instant::now();
        let asked = set(8, &[0, 1, 2, 3]);
        // One machine, IPv4, and one IPv6 /48 with a /64 of its own per id.
        for i in 0..SMALL_CROWD as u16 {
            for host in [at("/ip4/203.0.113.7"), at(&format!("/ip6/2001:db8:1:{i:x}::1"))] {
                let sybil = PeerId::random();
                crowds.connected_from(sybil, &host);
                let _ = crowds.offer(hash, sybil, &set(8, &[7]), true, up(false, false), t0);
            }
        }
        let lone = PeerId::random();
        crowds.connected_from(lone, &at("/ip4/198.51.100.1"));
        // Three hosts: sent its share (a third of the blob), not one piece at a time.
        let share = |now| crowds.offer(hash, lone, &asked, true, up(false, false), now).count();
        assert_eq!(share(t0), 3, "not a crowd");
        // A holder gone since counts as the host it came from, while it is fresh.
        let holder = PeerId::random();
        crowds.connected_from(holder, &at("/ip4/203.0.113.7"));
        served(&crowds, hash, holder, &set(8, &[6]), t0);
        crowds.disconnected(&holder);
        assert_eq!(share(t0), 3, "still not");
        // As many hosts are a crowd: one piece an answer.
        for i in 0..SMALL_CROWD as u8 {
            let asker = PeerId::random();
            crowds.connected_from(asker, &at(&format!("/ip4/192.0.2.{i}")));
            let _ = crowds.offer(hash, asker, &set(8, &[7]), true, up(false, false), t0);
        }
        assert_eq!(share(t0), 1, "a crowd");
        // Who a peer is, as a fetch bounds what one source names: its host, also once it left.
        let (first, second) = (PeerId::random(), PeerId::random());
        for p in [first, second] {
            crowds.connected_from(p, &at("/ip4/198.51.100.9"));
        }
        crowds.disconnected(&first);
        assert_eq!(crowds.member(first), crowds.member(second));
        assert_eq!(crowds.member(first), Member::Host("198.51.100.9".parse().expect("ip")));
        let unknown = PeerId::random();
        assert_eq!(crowds.member(unknown), Member::Peer(unknown));
    }
}
