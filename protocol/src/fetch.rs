//! The decisions of a multi-source fetch: which peers to ask, which pieces to request from whom,
//! when to retry, whom to drop and whom to penalise.
//!
//! [`Fetch`] is a state machine that does no I/O. The node (over libp2p) and the simulator (over an
//! emulated network) tell it what happened through `handle_*` methods and carry out what it
//! decides, read from [`Fetch::poll_action`]. Time is always an argument and randomness comes from a
//! seed, so a fetch replays exactly and is tested without a runtime.
//!
//! # Driving a fetch
//!
//! ```text
//! let mut fetch = Fetch::new(hash, config, seed, now);
//! loop {
//!     while let Some(action) = fetch.poll_action(now) { carry it out }
//!     wait for an input or until fetch.poll_timeout();
//!     an input: call the matching handle_*;  the timeout: call fetch.handle_timeout(now)
//! }
//! ```
//!
//! A fetch asks the DHT for providers ([`Action::FindProviders`]) and up to
//! [`FetchConfig::max_peers`] of them for their have-maps ([`Action::AskHave`]). The size comes
//! from the first have-map that holds its blob's last piece (later, from the size most such peers
//! claim). The node opens it in its store ([`Action::Begin`]) and answers with the pieces it
//! already holds ([`Fetch::handle_local`]);
//! requests wait for that answer, so a resumed fetch never asks for a piece it has. A claimed size
//! is proven only when the last piece verifies, so that piece is requested alone first. After it,
//! pieces go out rarest first to the peers expected to deliver soonest, at most
//! [`FetchConfig::max_requests_per_peer`] requests per peer at a time; but the pieces a reader
//! waits for go first, in the order it reads them ([`Fetch::set_reading`]). When every missing piece is in
//! flight, idle peers duplicate the oldest requests that are late (end-game) and the losers are
//! cancelled. A request is late once it has taken twice its size at its peer's measured
//! throughput (for a peer not yet measured, the mean of those measured; at once if none is): in a
//! crowd, where every fetch reaches its end-game together, duplicating requests that are on
//! schedule spent a twelfth of the crowd's uploads on copies nobody kept. A piece whose every
//! request fell late (its peers went silent, as a crashed process does) is copied once more, up to
//! twice [`FetchConfig::endgame_copies`] in all; so is a piece a reader waits for. A request sent
//! before any peer was measured never falls late in that sense: it holds its pieces at
//! `endgame_copies`.
//!
//! A live peer with nothing asked of it is watched ([`Action::WatchHave`]): it answers with its
//! have-map as soon as it holds a piece the fetch lacks and it did not advertise, or after
//! [`FetchConfig::have_refresh`]. In a crowd the fetch hears of its peers' new pieces as they
//! arrive, not a polling interval later. A peer that does not know watches (an older node) is
//! asked for its have-map every `have_refresh` instead. A partial holder with nothing the fetch
//! can request that has been watched that long without news gives its slot to a waiting candidate
//! if every slot is taken: it is parked at the back of the candidate queue, so that peers with
//! nothing to give cannot keep the providers of the missing pieces from ever being asked. While
//! such peers hold slots, the DHT is asked for more providers as if the slots were free.
//!
//! # Peer failures
//!
//! | [`PeerFailure`]              | answering a have request     | answering a get request                          |
//! |------------------------------|------------------------------|--------------------------------------------------|
//! | `NotFound`                   | dropped                      | pieces leave its have-map, which is asked again¹ |
//! | `Denied`                     | dropped                      | dropped                                          |
//! | `Busy { retry_after }`       | asked again after the wait   | no requests until after the wait²                |
//! | `Timeout`, `Io`, `Truncated` | asked again after a back-off | no requests until after a back-off               |
//! | `Corrupt`, `Protocol`        | dropped and penalised        | dropped and penalised                            |
//!
//! ¹ A peer whose have-map ends up empty is dropped, and so is one whose last
//! [`FetchConfig::max_peer_failures`] have-maps each named pieces it then did not send
//! (`NotFound`, or `Data` with none of those asked): a stale have-map is put right by one such
//! answer, and one map counts once however many requests were made from it. After such an
//! answer the peer is asked for no piece until its next map.
//! ² Once the size is proven, a peer with nothing else asked of it, while every slot is taken and
//! a candidate that never held one (or one named nearby) waits, gives its slot to the candidate
//! instead and is parked at the back of the queue. In a crowd, the holders every fetch was told
//! of first answer `Busy` to most requests while holders nobody was told of sit idle; waiting
//! one's turn at the first kept the second from being asked.
//!
//! Back-offs start at [`FetchConfig::retry_base`] and double with each consecutive failure; after
//! [`FetchConfig::max_peer_failures`] in a row the peer is dropped. Failures that arrive while the
//! peer is still backing off from the last one count once: a dropped connection fails every request
//! in flight at the same moment, and that is one incident, not four. Pieces of a failed request go
//! back to the pool at once. A dropped peer is not asked again by this fetch; a penalty
//! ([`Action::Penalise`]) is also the node's to act on (a Shoal node keeps its fetches away from
//! a peer penalised for `Corrupt` for a while).
//!
//! `Truncated` is treated as a broken connection, not as misbehaviour: decoding stops at the last
//! whole chunk group, so no unverified byte is kept, and a stream cut short is what honest peers
//! produce when they restart or lose a connection. Dropping a peer on its first cut would lose the
//! only provider of a rare blob to a blip; a peer that keeps cutting is dropped all the same.
//!
//! # Giving up
//!
//! A fetch fails at its [`FetchConfig::deadline`], if it has one, and once it has stalled for
//! [`FetchConfig::stall_timeout`]: no piece verified, and no answer from a peer holding pieces it
//! lacks (a have-map naming one, or `Busy` to a piece request). A `Busy` answer means the holder
//! has what we want and a line of others wanting it: in a crowd larger than its sources' uploads,
//! a fetch waits its turn for longer than any one stall, and giving up then would fail a fetch
//! that was about to be served. But not for ever: with no piece verified for
//! [`STALLS_WITHOUT_A_PIECE`] stall timeouts, it gives up whatever its peers answer, since a peer
//! that only ever says `Busy`, or names pieces and then has none, would otherwise keep it (and its
//! slot among the node's fetches) for good.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::Hash;
use crate::piece::{Geometry, PIECE_SIZE, PieceIndex, PieceSet};
use crate::wire::MAX_PIECES_PER_GET;

/// The longest back-off after a peer's failures: long enough to ride out a restart, short enough
/// that a fetch with few providers does not sit idle.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// The longest pause between two DHT lookups for providers.
pub const MAX_PROVIDERS_BACKOFF: Duration = Duration::from_secs(30);

/// The longest a `Busy` answer keeps a peer idle, whatever `retry_after` it names: a server's wish,
/// not a command.
pub const MAX_BUSY_WAIT: Duration = Duration::from_secs(60);

/// The shortest a `Busy` answer keeps a peer idle, so that a peer answering `Busy` with no delay
/// cannot make the fetch spin (a Shoal node asks for 250 ms at least).
pub const MIN_BUSY_WAIT: Duration = Duration::from_millis(100);

/// How many [`FetchConfig::stall_timeout`]s a fetch waits with no piece verified, whatever its
/// peers answer meanwhile: `Busy` and have-maps keep a fetch waiting for its turn, and peers that
/// only ever say so (a holder that never sends, or one that names pieces and then has none)
/// would keep it forever.
pub const STALLS_WITHOUT_A_PIECE: u32 = 4;

/// Provider candidates remembered per [`FetchConfig::max_peers`], parked peers included. Names
/// beyond it are ignored until the queue drains, except that a name from the DHT takes the place
/// of a name only peers gave, and any new name that of a peer parked with nothing the fetch
/// needed (see [`Fetch::handle_providers`] and [`Fetch::handle_hinted`]).
pub const CANDIDATES_PER_PEER_SLOT: usize = 4;

/// Dropped peers remembered per [`FetchConfig::max_peers`], so that the DHT returning them again
/// does not make the fetch ask them again. Past this the oldest are forgotten (and may be asked
/// once more).
pub const DROPPED_PER_PEER_SLOT: usize = 16;

/// How many pieces of a reader's go out first, in order (see [`Fetch::set_reading`]): 2 MiB, a
/// few seconds of a video at the rates a browser streams one. A longer span counts this far.
pub const READ_AHEAD: u32 = 16;

/// Readers a fetch takes into account at most.
pub const MAX_READERS: usize = 16;

/// The weight of a new sample in a peer's throughput estimate.
const THROUGHPUT_WEIGHT: f64 = 0.25;

/// How many times its expected duration (its size at the peer's measured throughput) a request
/// may take before end-game counts it late: throughput is a moving average and a serving peer's
/// queue varies, so a request a little slower than expected is not yet worth a second copy.
const LATE_FACTOR: f64 = 2.0;

/// Elapsed times below this are rounded up, so that a sample never divides by zero.
const MIN_ELAPSED: Duration = Duration::from_micros(100);

/// The shortest timeouts and DHT back-off accepted, so that a zero in a configuration cannot make
/// the fetch spin without time passing.
const MIN_TIMER: Duration = Duration::from_millis(1);

/// How a [`Fetch`] paces itself. Every bound caps memory or the load put on peers.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchConfig {
    /// The most pieces one request asks for. Contiguous pieces share a round trip and part of their
    /// proof; fewer make the tail of a fetch finer. Capped at [`MAX_PIECES_PER_GET`].
    /// The default is 8 (1 MiB).
    pub pieces_per_request: u32,
    /// The most requests in flight to one peer: enough to keep a fast link busy across a round
    /// trip without piling the whole blob on one peer. The default is 4.
    pub max_requests_per_peer: usize,
    /// How long a request may run before it is cancelled and counted as the peer's failure.
    /// The default is 10 s.
    pub request_timeout: Duration,
    /// How long a have request may run before it is counted as the peer's failure.
    /// The default is 5 s.
    pub have_timeout: Duration,
    /// Consecutive failures (timeouts, I/O errors, truncated responses), or have-maps in a row
    /// whose pieces, asked for, were not sent (one count per map), after which a peer is dropped
    /// for this fetch. The default is 3.
    pub max_peer_failures: u32,
    /// The back-off after a peer's first failure; it doubles with each consecutive failure, up to
    /// [`MAX_RETRY_BACKOFF`]. The default is 200 ms.
    pub retry_base: Duration,
    /// In end-game, the most concurrent requests for one piece, the first included, while one
    /// of them is on schedule (or was sent before any peer was measured); a piece whose every
    /// request fell late may take one more at a time, up to twice this many. 1 turns end-game
    /// off. The default is 2.
    pub endgame_copies: usize,
    /// The most peers asked for have-maps (and served from) at once. The default is 32.
    pub max_peers: usize,
    /// The pause before the second DHT lookup; it doubles with each lookup, up to
    /// [`FetchConfig::providers_backoff_max`], and starts again from here when every known peer
    /// is gone. The default is 1 s.
    pub providers_backoff: Duration,
    /// The longest pause between two lookups, at most [`MAX_PROVIDERS_BACKOFF`]. In a flash crowd
    /// the peers fetching the same blob announce themselves as they get their first pieces; a
    /// short cap finds them while they still have pieces to trade. The default is 30 s.
    pub providers_backoff_max: Duration,
    /// How long a watch ([`Action::WatchHave`]) asks its peer to wait for a piece the fetch
    /// needs, and so how often an idle peer that gains none is asked again; a peer that does not
    /// know watches is asked for its have-map this often. A partial holder with nothing the fetch
    /// needs that has been watched (or asked) this long gives its slot to a waiting candidate.
    /// The default is 1 s.
    pub have_refresh: Duration,
    /// If set, new requests are sized to take about this long at the peer's measured throughput:
    /// fewer than `pieces_per_request` pieces to a slow peer, and one piece to a peer not yet
    /// measured, one request at a time (its first answer measures it). A seeder shared by a crowd
    /// then hands out verified pieces (which the fetchers announce and trade) in seconds rather
    /// than after a whole request. The default is `None` (always `pieces_per_request`).
    pub request_target: Option<Duration>,
    /// How long after [`Fetch::new`] the fetch gives up; `None` never gives up and keeps asking the
    /// DHT with back-off. The default is `None`.
    pub deadline: Option<Duration>,
    /// How long the fetch may go without a verified piece while no peer holding pieces it lacks
    /// answers (a have-map naming one, or `Busy` to a piece request) before it gives up with
    /// [`FetchError::Stalled`]. A fetch waiting its turn at busy holders, as in a crowd larger
    /// than its sources' uploads, is not stalled. `None` waits as long as `deadline` allows. The
    /// default is `None`.
    pub stall_timeout: Option<Duration>,
    /// The factor [`FetchConfig::stretched`] multiplied the durations by. The machine's own
    /// bounds on them ([`MAX_RETRY_BACKOFF`], [`MAX_PROVIDERS_BACKOFF`], [`MIN_BUSY_WAIT`] and
    /// [`MAX_BUSY_WAIT`]) are stretched by it too, so that an emulated node waits as long per
    /// emulated second as a real one per second. The default is 1.
    pub time_scale: f64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            pieces_per_request: 8,
            max_requests_per_peer: 4,
            request_timeout: Duration::from_secs(10),
            have_timeout: Duration::from_secs(5),
            max_peer_failures: 3,
            retry_base: Duration::from_millis(200),
            endgame_copies: 2,
            max_peers: 32,
            providers_backoff: Duration::from_secs(1),
            providers_backoff_max: MAX_PROVIDERS_BACKOFF,
            request_target: None,
            have_refresh: Duration::from_secs(1),
            deadline: None,
            stall_timeout: None,
            time_scale: 1.0,
        }
    }
}

/// `d` times `factor`, an emulator's time scale (see [`FetchConfig::stretched`]); `d` itself if
/// `factor` is not a positive finite number, and [`Duration::MAX`] past it.
pub fn stretch(d: Duration, factor: f64) -> Duration {
    if !(factor.is_finite() && factor > 0.0) {
        return d;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

impl FetchConfig {
    /// This configuration with every duration multiplied by `factor`: for an emulator that
    /// stretches latency and bandwidth by `factor` (netsim's time scale), so that a fetch asks
    /// as often per emulated second as it would per real second. A factor that is not a positive
    /// finite number leaves the configuration as it is.
    pub fn stretched(mut self, factor: f64) -> Self {
        let stretch = |d: Duration| stretch(d, factor);
        self.request_timeout = stretch(self.request_timeout);
        self.have_timeout = stretch(self.have_timeout);
        self.retry_base = stretch(self.retry_base);
        self.providers_backoff = stretch(self.providers_backoff);
        self.providers_backoff_max = stretch(self.providers_backoff_max);
        self.have_refresh = stretch(self.have_refresh);
        self.request_target = self.request_target.map(stretch);
        self.deadline = self.deadline.map(stretch);
        self.stall_timeout = self.stall_timeout.map(stretch);
        if factor.is_finite() && factor > 0.0 {
            self.time_scale *= factor;
        }
        self
    }

    /// `d`, one of the machine's bounds, stretched by the time scale (`d` itself if the scale is
    /// not a positive finite number, as [`stretch`] does).
    fn bound(&self, d: Duration) -> Duration {
        stretch(d, self.time_scale).max(MIN_TIMER)
    }

    /// The configuration with every value brought into the range the machine relies on, so that
    /// no setting can make it panic, spin or overflow a counter.
    fn sanitized(mut self) -> Self {
        self.pieces_per_request = self.pieces_per_request.clamp(1, MAX_PIECES_PER_GET);
        self.max_requests_per_peer = self.max_requests_per_peer.max(1);
        self.request_timeout = self.request_timeout.max(MIN_TIMER);
        self.have_timeout = self.have_timeout.max(MIN_TIMER);
        self.max_peer_failures = self.max_peer_failures.max(1);
        self.retry_base = self.retry_base.min(self.bound(MAX_RETRY_BACKOFF));
        self.endgame_copies = self.endgame_copies.clamp(1, usize::from(u8::MAX));
        // Availability is counted in u16 per piece.
        self.max_peers = self.max_peers.clamp(1, usize::from(u16::MAX));
        self.providers_backoff_max = self.providers_backoff_max.clamp(MIN_TIMER, self.bound(MAX_PROVIDERS_BACKOFF));
        self.providers_backoff = self.providers_backoff.clamp(MIN_TIMER, self.providers_backoff_max);
        self.have_refresh = self.have_refresh.max(MIN_TIMER);
        self.stall_timeout = self.stall_timeout.map(|t| t.max(MIN_TIMER));
        self
    }
}

/// The id of one request, so that its answer can be matched to it. Ids are never reused within a
/// fetch, so a late answer to a cancelled request cannot be taken for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// How a request to a peer went wrong, as the node saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerFailure {
    /// The peer holds none of what was asked (`Response::NotFound`).
    #[error("the peer does not hold what was asked")]
    NotFound,
    /// The peer is at its upload bound (`Response::Busy`).
    #[error("the peer is busy; it asks to retry after {retry_after:?}")]
    Busy {
        /// How long the peer asked us to wait.
        retry_after: Duration,
    },
    /// The peer does not serve us (`Response::Denied`).
    #[error("the peer refuses to serve us")]
    Denied,
    /// The peer sent bytes that failed BLAKE3 verification.
    #[error("the peer sent bytes that failed verification")]
    Corrupt,
    /// The response ended before every piece it announced arrived.
    #[error("the response ended early")]
    Truncated,
    /// The request took too long (the node's own timer; the fetch also keeps one).
    #[error("the request timed out")]
    Timeout,
    /// The connection or stream failed.
    #[error("the connection or stream to the peer failed")]
    Io,
    /// The peer sent a malformed or unexpected message.
    #[error("the peer sent a malformed or unexpected message")]
    Protocol,
}

/// Why a fetch gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The DHT never named a provider.
    #[error(
        "no provider of {hash} was found within {deadline:?}: check the id, and that a node holding it is online \
         and reachable"
    )]
    NoProviders {
        /// The blob.
        hash: Hash,
        /// The deadline that passed.
        deadline: Duration,
    },
    /// Providers were found, but none of them could serve a single piece: each was missing the
    /// blob, refused, kept failing or misbehaved.
    #[error(
        "none of the {tried} providers of {hash} could serve it within {deadline:?}: they did not hold it, \
         refused us, kept failing or sent bad data"
    )]
    ProvidersFailed {
        /// The blob.
        hash: Hash,
        /// How many providers were asked.
        tried: usize,
        /// The deadline that passed.
        deadline: Duration,
    },
    /// The deadline passed while the fetch was under way.
    #[error(
        "fetch of {hash} gave up after {deadline:?} with {verified_pieces} of {} pieces verified: the providers \
         found were too slow or stopped answering",
        .total_pieces.map_or_else(|| "?".to_string(), |n| n.to_string())
    )]
    DeadlineExceeded {
        /// The blob.
        hash: Hash,
        /// The deadline that passed.
        deadline: Duration,
        /// Pieces verified by then.
        verified_pieces: u32,
        /// The blob's piece count, if a size was known.
        total_pieces: Option<u32>,
    },
    /// No piece verified, and no peer holding pieces the fetch lacks answered, for
    /// [`FetchConfig::stall_timeout`]; or no piece verified for [`STALLS_WITHOUT_A_PIECE`] of them,
    /// whatever peers answered.
    #[error(
        "fetch of {hash} made no progress for {after:?}, with {verified_pieces} of {} pieces verified: no peer \
         holding the rest answered",
        .total_pieces.map_or_else(|| "?".to_string(), |n| n.to_string())
    )]
    Stalled {
        /// The blob.
        hash: Hash,
        /// How long the fetch went without progress: the stall timeout, or
        /// [`STALLS_WITHOUT_A_PIECE`] of them.
        after: Duration,
        /// Pieces verified by then.
        verified_pieces: u32,
        /// The blob's piece count, if a size was known.
        total_pieces: Option<u32>,
    },
}

/// What the node should do next, from [`Fetch::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Look up providers in the DHT, then report them with [`Fetch::handle_providers`] and
    /// [`Fetch::handle_providers_done`]. Never emitted while a lookup is under way.
    FindProviders,
    /// Send `Request::Have` to `peer`; answer with [`Fetch::handle_have`] or
    /// [`Fetch::handle_have_failed`]. Never emitted while a have request to that peer is under way.
    AskHave {
        /// The peer to ask.
        peer: P,
    },
    /// Send `Request::Watch` to `peer` for `wanted`, to be answered when it holds one of those
    /// pieces or after [`FetchConfig::have_refresh`]; answer with [`Fetch::handle_watched`],
    /// [`Fetch::handle_have_failed`], or [`Fetch::handle_watch_refused`] if the peer does not know
    /// the request. Emitted for a live peer with no request and no have request under way that
    /// may gain pieces the fetch still needs. Never emitted while a have request to that peer is
    /// under way.
    WatchHave {
        /// The peer to watch.
        peer: P,
        /// The pieces the fetch lacks and the peer does not advertise.
        wanted: PieceSet,
    },
    /// A size was claimed by a peer that can prove it: open the blob in the store with this size
    /// (`store.begin(hash, size)`), then call [`Fetch::handle_local`] with the pieces it already
    /// holds (an empty set if none). No request is made until then.
    Begin {
        /// The claimed size in bytes.
        size: u64,
    },
    /// The claimed size was abandoned before it was proven: its last piece failed verification and
    /// no other live peer claims that size, or every peer that could prove it is gone while others
    /// claim another size. Delete the partial entry; a [`Action::Begin`] with another claim may
    /// follow.
    SizeRejected {
        /// The abandoned size.
        size: u64,
    },
    /// Send `Request::Get` for `pieces` to `peer`; answer with [`Fetch::handle_response`]. Never more
    /// than [`FetchConfig::pieces_per_request`] pieces, never a piece the peer does not advertise,
    /// never a piece already verified.
    Request {
        /// The peer to ask.
        peer: P,
        /// The id to answer with.
        id: RequestId,
        /// The pieces wanted.
        pieces: PieceSet,
    },
    /// Drop the stream of request `id`: its pieces arrived from elsewhere, it timed out, or its peer
    /// was dropped. No answer is expected; a late one is ignored.
    Cancel {
        /// The peer the request went to.
        peer: P,
        /// The request.
        id: RequestId,
    },
    /// `peer` misbehaved (sent bytes that failed verification, lied about the blob's size, sent a
    /// malformed have-map): the node counts it against the peer. At most once per peer and fetch.
    Penalise {
        /// The peer.
        peer: P,
        /// What it did.
        failure: PeerFailure,
    },
    /// Every piece is verified. Emitted once; only [`Action::Cancel`]s queued before it may precede
    /// it, and nothing follows it.
    Complete,
    /// The fetch gave up. Emitted once, after a [`Action::Cancel`] for every request in flight;
    /// nothing follows it.
    Failed(FetchError),
}

/// The candidates a full queue may forget, in the order a caller gives.
#[derive(Debug, Clone, Copy)]
enum Forgettable {
    /// A peer parked with nothing the fetch needed.
    ParkedIdle,
    /// A name only peers gave, never asked ([`Fetch::handle_hinted`]).
    Hinted,
    /// A peer parked for answering `Busy`: it holds what the fetch lacks.
    ParkedBusy,
}

/// How far a fetch has come, for progress bars and status pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Pieces verified, from peers or already in the store.
    pub verified_pieces: u32,
    /// Bytes in the verified pieces.
    pub verified_bytes: u64,
    /// The blob's piece count, once a size is claimed.
    pub total_pieces: Option<u32>,
    /// The blob's size, once claimed.
    pub total_bytes: Option<u64>,
    /// Whether the size is proven (its last piece verified).
    pub size_proven: bool,
    /// Peers with a have-map for the current size, not dropped.
    pub peers_active: usize,
    /// Requests in flight.
    pub requests_in_flight: usize,
}

/// What the fetch knows about one peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerStats {
    /// Bytes the peer sent in answers to our requests.
    pub bytes_received: u64,
    /// Pieces the peer sent that verified first (before any other peer's copy).
    pub pieces_verified: u32,
    /// Estimated bytes per second per request (a moving average), once measured.
    pub throughput: Option<f64>,
    /// The round trip of its last have request, as the node measured it.
    pub rtt: Option<Duration>,
    /// Failures so far (timeouts, I/O errors, truncated responses).
    pub failures: u32,
    /// Whether the fetch penalised it.
    pub penalised: bool,
    /// Whether the fetch dropped it.
    pub dropped: bool,
    /// Requests in flight to it.
    pub requests_in_flight: usize,
}

/// A small seeded generator (SplitMix64): the fetch's only source of randomness, so that a seed
/// replays a fetch exactly.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// What a peer advertised in its last have-map.
#[derive(Debug)]
struct Advert {
    /// The size it claims.
    size: u64,
    /// The pieces it holds, counted for that size. A bitmap while the size is the claim's, its
    /// runs otherwise (see [`Held`]).
    held: Held,
    /// The order in which claims arrived: among equally supported sizes the earliest wins.
    seq: u64,
}

/// The pieces of an advert, in the form its size calls for. A bitmap costs a bit per piece of
/// the size claimed, 2 MiB for the largest blob, whatever the peer holds; the runs the wire
/// carried cost what the peer sent (at most [`crate::wire::MAX_RUNS`], 32 KiB). Only the
/// claim's adverts are read piece by piece, so only they are kept as bitmaps: a fetch's peers
/// claiming other sizes, true or not, cost it at most their runs.
#[derive(Debug)]
enum Held {
    /// Counted for the claim.
    Bitmap(PieceSet),
    /// Set aside for a size the fetch does not work with (or while it works with none): the runs
    /// of consecutive pieces, ascending, cut to the wire's bound as a sender cuts them.
    Runs { piece_count: u32, runs: Box<[Range<PieceIndex>]> },
}

impl Advert {
    /// An advert of `pieces` for `size`, held as a bitmap if `counted` (its size is the claim's).
    fn new(size: u64, pieces: PieceSet, seq: u64, counted: bool) -> Self {
        let mut advert = Self { size, held: Held::Bitmap(pieces), seq };
        if !counted {
            advert.set_aside();
        }
        advert
    }

    /// The pieces, if they are counted for the claim.
    fn counted(&self) -> Option<&PieceSet> {
        match &self.held {
            Held::Bitmap(pieces) => Some(pieces),
            Held::Runs { .. } => None,
        }
    }

    /// The pieces as a bitmap, made from the runs if they were set aside: the claim now works with
    /// this advert's size.
    fn count(&mut self) -> &mut PieceSet {
        if let Held::Runs { piece_count, runs } = &self.held {
            let mut pieces = PieceSet::empty(*piece_count);
            for r in runs.iter() {
                pieces.insert_range(r.clone());
            }
            self.held = Held::Bitmap(pieces);
        }
        match &mut self.held {
            Held::Bitmap(pieces) => pieces,
            Held::Runs { .. } => unreachable!("made a bitmap above"),
        }
    }

    /// Keeps the pieces as runs: the claim does not work with this advert's size. Past the
    /// wire's bound (a bitmap pruned piece by piece), the first runs and the last, so that a
    /// claimant that can prove its size still can.
    fn set_aside(&mut self) {
        if let Held::Bitmap(pieces) = &self.held {
            let max = crate::wire::MAX_RUNS;
            let mut runs: Vec<Range<PieceIndex>> = pieces.ranges().take(max).collect();
            if runs.len() == max
                && let Some(last) = pieces.ranges().last()
                && runs.last() != Some(&last)
            {
                runs[max - 1] = last;
            }
            self.held = Held::Runs { piece_count: pieces.piece_count(), runs: runs.into() };
        }
    }

    fn piece_count(&self) -> u32 {
        match &self.held {
            Held::Bitmap(pieces) => pieces.piece_count(),
            Held::Runs { piece_count, .. } => *piece_count,
        }
    }

    /// Whether the advert holds its own last piece, so that its size claim can be proven.
    fn can_prove(&self) -> bool {
        let Some(last) = self.piece_count().checked_sub(1) else { return false };
        match &self.held {
            Held::Bitmap(pieces) => pieces.contains(last),
            Held::Runs { runs, .. } => runs.last().is_some_and(|r| r.contains(&last)),
        }
    }
}

#[derive(Debug)]
struct Peer {
    /// Breaks ties between equally ranked peers without favouring low ids.
    salt: u64,
    advert: Option<Advert>,
    /// A have request is under way.
    asking: bool,
    /// The have request under way is a watch.
    watching: bool,
    /// When the last watch was sent.
    watch_sent: Option<Instant>,
    /// No watch before this: the last one came back without a piece the fetch needs, sooner
    /// than its wait (the server bounds its watchers). Also when a stale peer's slot may be
    /// given to a waiting candidate.
    watch_after: Option<Instant>,
    /// It answered a watch with `BadRequest` (an older node): its have-map is polled instead.
    no_watch: bool,
    have_timeout_at: Option<Instant>,
    /// When to ask for the have-map again (after a failure, `Busy`, or a stale advertisement).
    have_retry_at: Option<Instant>,
    last_have_at: Option<Instant>,
    rtt: Option<Duration>,
    throughput: Option<f64>,
    bytes_received: u64,
    pieces_verified: u32,
    failures: u32,
    /// Failed requests for pieces since one last verified pieces.
    consecutive_failures: u32,
    /// Failed have requests since one was last answered: counted apart, so that a peer answering
    /// its have requests and watches is still dropped when every request for pieces fails.
    have_failures: u32,
    /// Have-maps in a row whose pieces, asked for, were not sent: answers to requests for pieces
    /// that sent none of those asked, neither `Busy` nor a broken transfer. A stale have-map is
    /// put right by one such answer; a peer that keeps advertising what it does not send is
    /// dropped. One map counts once, however many requests were made from it.
    unserved: u32,
    /// Requests from this id on count in `unserved`: the first sent after the last map came;
    /// `u64::MAX` from a counted answer until the next map, and no request goes to the peer
    /// meanwhile (a peer that never sends another map is asked for nothing more).
    unserved_from: u64,
    /// The back-off of the last counted failure: failures before it ends are the same incident
    /// (a dropped connection fails every request in flight at once) and count once.
    incident_until: Option<Instant>,
    /// No new request before this.
    backoff_until: Option<Instant>,
    in_flight: usize,
    /// It gave its slot to a waiting candidate, holding nothing the fetch needed or answering
    /// `Busy`: its advert is set aside, it is back in the candidate queue and is asked again when
    /// its turn comes.
    parked: bool,
    /// It was parked for answering `Busy`: a holder of pieces the fetch lacks, which a full
    /// candidate queue keeps as long as anything else can go.
    stepped_aside: bool,
    penalised: bool,
    dropped: bool,
    /// Dropped as unreachable (failures in a row, none of them its fault): named again by the
    /// DHT from this instant on, it is asked afresh.
    revive_at: Option<Instant>,
}

impl Peer {
    fn new(salt: u64) -> Self {
        Self {
            salt,
            advert: None,
            asking: false,
            watching: false,
            watch_sent: None,
            watch_after: None,
            no_watch: false,
            have_timeout_at: None,
            have_retry_at: None,
            last_have_at: None,
            rtt: None,
            throughput: None,
            bytes_received: 0,
            pieces_verified: 0,
            failures: 0,
            consecutive_failures: 0,
            have_failures: 0,
            unserved: 0,
            unserved_from: 0,
            incident_until: None,
            backoff_until: None,
            in_flight: 0,
            parked: false,
            stepped_aside: false,
            penalised: false,
            dropped: false,
            revive_at: None,
        }
    }

    /// Whether the peer claims `size`.
    fn claims(&self, size: u64) -> bool {
        self.advert.as_ref().is_some_and(|a| a.size == size)
    }

    /// Seconds the peer is expected to take for one more request, given what it has in flight: the
    /// ranking key. Measured throughput when there is one; otherwise the have round trip, an
    /// optimistic prior that gets new nearby peers tried early. Failures make a peer look slower.
    fn expected_secs(&self, request_bytes: f64) -> f64 {
        let per_request = match (self.throughput, self.rtt) {
            (Some(t), _) if t > 0.0 => request_bytes / t,
            (_, Some(rtt)) => rtt.max(MIN_ELAPSED).as_secs_f64(),
            _ => 1.0,
        };
        (self.in_flight + 1) as f64 * per_request * f64::from(1 + self.consecutive_failures.min(16))
    }

    fn record_transfer(&mut self, bytes: u64, elapsed: Duration) {
        self.bytes_received = self.bytes_received.saturating_add(bytes);
        if bytes == 0 {
            return;
        }
        let sample = bytes as f64 / elapsed.max(MIN_ELAPSED).as_secs_f64();
        self.throughput = Some(match self.throughput {
            Some(old) => old + THROUGHPUT_WEIGHT * (sample - old),
            None => sample,
        });
    }

    fn stats(&self) -> PeerStats {
        PeerStats {
            bytes_received: self.bytes_received,
            pieces_verified: self.pieces_verified,
            throughput: self.throughput,
            rtt: self.rtt,
            failures: self.failures,
            penalised: self.penalised,
            dropped: self.dropped,
            requests_in_flight: self.in_flight,
        }
    }
}

/// Everything tied to one claimed size; a rejected claim is dropped whole.
#[derive(Debug)]
struct Claim {
    geometry: Geometry,
    /// The last piece verified, so the size is the blob's.
    proven: bool,
    /// The node answered [`Action::Begin`] with [`Fetch::handle_local`].
    local_known: bool,
    verified: PieceSet,
    verified_bytes: u64,
    /// Pieces neither verified nor in flight.
    wanted: PieceSet,
    /// Requests in flight per piece.
    copies: Vec<u8>,
    /// Live peers advertising each piece under this size: the rarity that orders requests.
    availability: Vec<u16>,
    /// Where the seeded order of pieces starts: among equally rare pieces, the first from here
    /// wins, so different fetches of one blob start in different places while each request stays
    /// a contiguous run.
    offset: PieceIndex,
}

impl Claim {
    fn new(geometry: Geometry, offset: PieceIndex) -> Self {
        let n = geometry.piece_count();
        Self {
            geometry,
            proven: false,
            local_known: false,
            verified: PieceSet::empty(n),
            verified_bytes: 0,
            wanted: PieceSet::full(n),
            copies: vec![0; n as usize],
            availability: vec![0; n as usize],
            offset,
        }
    }

    fn size(&self) -> u64 {
        self.geometry.size()
    }

    fn piece_count(&self) -> u32 {
        self.geometry.piece_count()
    }

    fn last(&self) -> PieceIndex {
        self.geometry.last_piece()
    }

    fn add_advert(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(a) = self.availability.get_mut(i as usize) {
                *a = a.saturating_add(1);
            }
        }
    }

    fn remove_advert(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(a) = self.availability.get_mut(i as usize) {
                *a = a.saturating_sub(1);
            }
        }
    }

    fn availability(&self, i: PieceIndex) -> u16 {
        self.availability.get(i as usize).copied().unwrap_or(0)
    }

    fn copies(&self, i: PieceIndex) -> u8 {
        self.copies.get(i as usize).copied().unwrap_or(0)
    }

    /// Marks piece `i` verified; returns whether it was new.
    fn verify(&mut self, i: PieceIndex) -> bool {
        if !self.verified.insert(i) {
            return false;
        }
        self.wanted.remove(i);
        self.verified_bytes += self.geometry.piece_len(i);
        true
    }

    fn send(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(c) = self.copies.get_mut(i as usize) {
                *c = c.saturating_add(1);
            }
            self.wanted.remove(i);
        }
    }

    /// A request for `pieces` ended: pieces nobody else is fetching and not verified are wanted
    /// again.
    fn release(&mut self, pieces: &PieceSet) {
        for i in pieces.iter() {
            if let Some(c) = self.copies.get_mut(i as usize) {
                *c = c.saturating_sub(1);
                if *c == 0 && !self.verified.contains(i) {
                    self.wanted.insert(i);
                }
            }
        }
    }

    /// The wanted pieces a request may ask for now: before the size is proven, only the last.
    fn requestable(&self) -> PieceSet {
        if self.proven {
            self.wanted.clone()
        } else if self.wanted.contains(self.last()) {
            PieceSet::single(self.piece_count(), self.last())
        } else {
            PieceSet::empty(self.piece_count())
        }
    }
}

#[derive(Debug)]
struct InFlight<P> {
    peer: P,
    pieces: PieceSet,
    timeout_at: Option<Instant>,
    /// Until then the request is on schedule (see [`LATE_FACTOR`]) and end-game leaves it alone;
    /// `None` once it is late, or if no peer was measured when it was sent.
    due: Option<Instant>,
    /// Whether it was sent with a `due`: one that never had one is late from the start, but
    /// does not let a piece take a copy past `endgame_copies` (see [`Fetch::pick_duplicates`]).
    scheduled: bool,
}

/// Where an answer came from, for the failures that are handled differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Have,
    Get,
}

/// What to do with a known peer next (see [`Fetch::next_have_ask`]).
enum Look {
    Ask,
    Watch(PieceSet),
    Park,
}

/// One multi-source fetch of one blob. See the [module documentation](crate::fetch).
#[derive(Debug)]
pub struct Fetch<P> {
    hash: Hash,
    config: FetchConfig,
    rng: SplitMix64,
    deadline_at: Option<Instant>,
    /// The last verified piece, or answer from a peer holding pieces we lack (see
    /// [`FetchConfig::stall_timeout`]).
    last_sign: Instant,
    /// The last verified piece, or the start (see [`STALLS_WITHOUT_A_PIECE`]).
    last_piece: Instant,
    claim: Option<Claim>,
    /// The size a peer's size proof proved (see [`Fetch::handle_size_proof`]).
    proven_size: Option<u64>,
    /// The node would not open the blob for an unproven size (see
    /// [`Fetch::handle_size_unprovable`]): only a proven size is claimed from now on.
    proof_required: bool,
    /// Every peer asked, live or dropped; live ones are at most `max_peers`.
    peers: BTreeMap<P, Peer>,
    live_peers: usize,
    /// Providers named by the DHT or by other peers, not asked yet (parked peers behind them).
    candidates: VecDeque<P>,
    /// The candidates only other peers named ([`Fetch::handle_hinted`]), never asked: they wait
    /// behind the DHT's names, and give their place up to one. At most the candidate bound.
    hinted: BTreeSet<P>,
    /// Providers the node reaches without dialling, most recently named first: asked before any
    /// candidate (see [`Fetch::handle_nearby`]). At most `max_peers`.
    nearby: VecDeque<P>,
    /// Dropped peers, oldest first, to bound how many are remembered.
    dropped: VecDeque<P>,
    /// Requests in flight; ids grow with time, so this is oldest first.
    requests: BTreeMap<RequestId, InFlight<P>>,
    next_request_id: u64,
    next_claim_seq: u64,
    /// Decisions made while handling inputs, waiting for `poll_action`. Bounded: at most one
    /// `Cancel` per request in flight, one `Penalise` per peer, and one each of the rest.
    actions: VecDeque<Action<P>>,
    searching: bool,
    next_search_at: Instant,
    /// What readers of the blob read next (see [`Fetch::set_reading`]); at most [`MAX_READERS`].
    reading: Vec<Range<PieceIndex>>,
    search_backoff: Duration,
    providers_found: usize,
    peers_asked: usize,
    finished: bool,
}

impl<P> Fetch<P>
where
    P: Copy + Eq + std::hash::Hash + Ord + std::fmt::Debug,
{
    /// A fetch of `hash`, starting at `now`. `seed` decides every tie the fetch breaks at random;
    /// the same seed and inputs give the same actions.
    pub fn new(hash: Hash, config: FetchConfig, seed: u64, now: Instant) -> Self {
        let config = config.sanitized();
        Self {
            hash,
            deadline_at: config.deadline.and_then(|d| now.checked_add(d)),
            last_sign: now,
            last_piece: now,
            search_backoff: config.providers_backoff,
            config,
            rng: SplitMix64(seed),
            claim: None,
            proven_size: None,
            proof_required: false,
            peers: BTreeMap::new(),
            live_peers: 0,
            candidates: VecDeque::new(),
            hinted: BTreeSet::new(),
            nearby: VecDeque::new(),
            dropped: VecDeque::new(),
            requests: BTreeMap::new(),
            next_request_id: 0,
            next_claim_seq: 0,
            actions: VecDeque::new(),
            searching: false,
            next_search_at: now,
            reading: Vec::new(),
            providers_found: 0,
            peers_asked: 0,
            finished: false,
        }
    }

    /// The blob being fetched.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The configuration in force (after out-of-range values were brought into range).
    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// Provider candidates from the DHT (may repeat, may be empty). Peers already known, dropped
    /// or beyond the candidate bound are ignored, except a peer dropped as unreachable at least
    /// [`MAX_RETRY_BACKOFF`] ago, which is asked afresh: a sole provider that restarted is back
    /// in the DHT, and three failed dials while it was down must not end the fetch. New names
    /// wait ahead of the names only peers gave ([`Fetch::handle_hinted`]) and of parked peers
    /// (see [`Fetch::next_have_ask`]). A full queue forgets, to make room for one, the name a
    /// peer gave that waits last, else a parked peer that had nothing the fetch needed (never one
    /// parked for answering `Busy`, which holds what we lack).
    pub fn handle_providers(&mut self, peers: impl IntoIterator<Item = P>, now: Instant) {
        self.add_candidates(peers, false, now);
    }

    /// Provider candidates other peers named (peer exchange): as [`Fetch::handle_providers`],
    /// but they wait behind the DHT's names, a full queue forgets none of its own for them, and
    /// the DHT naming one of them moves it up among the DHT's names. A name costs its sender
    /// nothing: made-up holders named by a few peers must not keep the DHT's names waiting, or
    /// out of the queue.
    pub fn handle_hinted(&mut self, peers: impl IntoIterator<Item = P>, now: Instant) {
        self.add_candidates(peers, true, now);
    }

    fn add_candidates(&mut self, peers: impl IntoIterator<Item = P>, hinted: bool, now: Instant) {
        if self.finished {
            return;
        }
        let max = self.config.max_peers.saturating_mul(CANDIDATES_PER_PEER_SLOT);
        for peer in peers {
            if self.peers.get(&peer).is_some_and(|r| r.dropped && r.revive_at.is_some_and(|t| now >= t)) {
                self.peers.remove(&peer);
                self.dropped.retain(|p| *p != peer);
            }
            // Named by a peer before, and by the DHT now: it waits where the DHT's names do.
            let promoted = !hinted && self.hinted.remove(&peer);
            if promoted && let Some(at) = self.candidates.iter().position(|p| *p == peer) {
                self.candidates.remove(at);
            }
            if !promoted
                && (self.peers.contains_key(&peer) || self.candidates.contains(&peer) || self.nearby.contains(&peer))
            {
                continue;
            }
            // The queue is the DHT's names, then the peers', then parked peers: a name from the
            // DHT takes the place of the peers' name that waits last; else the peer with nothing
            // we need parked last goes, if any.
            let forget: &[Forgettable] = match hinted {
                true => &[Forgettable::ParkedIdle],
                false => &[Forgettable::Hinted, Forgettable::ParkedIdle],
            };
            if self.candidates.len() >= max && !self.forget_candidate(forget) {
                break;
            }
            let behind = |p: &P| self.is_parked(p) || (!hinted && self.hinted.contains(p));
            let at = self.candidates.iter().position(behind).unwrap_or(self.candidates.len());
            self.candidates.insert(at, peer);
            if hinted {
                self.hinted.insert(peer);
            }
            if !promoted {
                self.providers_found += 1;
            }
        }
    }

    /// Providers the node can ask without dialling: it holds a connection to them (it just sent
    /// them pieces of this blob, or a hint named a peer it is connected to). They are asked
    /// before any other candidate, the most recently named first, and a parked peer among them
    /// gets its turn back at once. Live and dropped peers are ignored; past `max_peers` waiting,
    /// the longest-waiting is forgotten.
    ///
    /// A connection serves both ways, so a fetcher that trades with the peers already trading
    /// with it needs fewer connections than one that picks its sources apart from who picked
    /// it: in a crowd larger than the node's connection bound, each peer picked apart is a dial,
    /// and a connection trimmed elsewhere.
    pub fn handle_nearby(&mut self, peers: impl IntoIterator<Item = P>, _now: Instant) {
        if self.finished {
            return;
        }
        for peer in peers {
            if self.peers.get(&peer).is_some_and(|r| !r.parked) {
                continue;
            }
            if let Some(at) = self.nearby.iter().position(|p| *p == peer) {
                self.nearby.remove(at);
            } else if !self.peers.contains_key(&peer) && !self.candidates.contains(&peer) {
                self.providers_found += 1;
            }
            if self.nearby.len() >= self.config.max_peers {
                self.nearby.pop_back();
            }
            self.nearby.push_front(peer);
        }
    }

    /// The DHT lookup finished. The next one waits for the back-off, which doubles each time.
    pub fn handle_providers_done(&mut self, now: Instant) {
        if self.finished || !self.searching {
            return;
        }
        self.searching = false;
        self.next_search_at = at_least(now, self.search_backoff);
        self.search_backoff = self.search_backoff.saturating_mul(2).min(self.config.providers_backoff_max);
    }

    /// The node will not ask `peer` anything (it found the peer lying to another fetch): it is
    /// dropped for this fetch, its requests cancelled, without a penalty of this fetch's own.
    pub fn handle_refused(&mut self, peer: P, now: Instant) {
        if !self.finished {
            self.drop_peer(peer, None, now);
        }
    }

    /// The answer to [`Action::AskHave`]: the pieces `peer` holds and the size it claims, with the
    /// round trip the node measured. Answers from peers never asked, or dropped, are ignored.
    pub fn handle_have(&mut self, peer: P, size: u64, pieces: PieceSet, rtt: Duration, now: Instant) {
        self.answered(peer, size, pieces, Some(rtt), now);
    }

    /// The answer to [`Action::WatchHave`]: as [`Fetch::handle_have`], without a round trip (the
    /// server held the answer back). Answers to watches never sent, or from dropped peers, are
    /// ignored.
    pub fn handle_watched(&mut self, peer: P, size: u64, pieces: PieceSet, now: Instant) {
        self.answered(peer, size, pieces, None, now);
    }

    /// `peer` does not know [`Action::WatchHave`] (it answered `BadRequest`: an older node). It is
    /// not blamed; its have-map is asked for every [`FetchConfig::have_refresh`] instead.
    pub fn handle_watch_refused(&mut self, peer: P, now: Instant) {
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && r.watching) else { return };
        rec.asking = false;
        rec.watching = false;
        rec.have_timeout_at = None;
        rec.no_watch = true;
        rec.last_have_at = Some(now);
    }

    fn answered(&mut self, peer: P, size: u64, pieces: PieceSet, rtt: Option<Duration>, now: Instant) {
        if self.finished {
            return;
        }
        let refresh = self.config.have_refresh;
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && !r.parked) else { return };
        let watched = std::mem::take(&mut rec.watching);
        rec.asking = false;
        rec.have_timeout_at = None;
        rec.have_retry_at = None;
        rec.last_have_at = Some(now);
        rec.unserved_from = rec.unserved_from.min(self.next_request_id);
        if let Some(rtt) = rtt {
            rec.rtt = Some(rtt);
        }
        // A watch that brings no piece we need waits out its interval before the next one, however
        // soon it came back: a server short of room for watchers answers at once.
        let gained = match (self.claim.as_ref(), rec.advert.as_ref().filter(|old| old.size == size)) {
            (Some(c), Some(old)) if c.size() == size => match old.counted() {
                Some(old) => !pieces.difference(old).difference(&c.verified).is_empty(),
                None => true,
            },
            _ => true,
        };
        rec.watch_after = match (watched && !gained, rec.watch_sent) {
            (true, Some(sent)) => Some(sent.checked_add(refresh).unwrap_or(now)),
            _ => None,
        };
        // The incident's window stays: a failure within it is the same incident, as a have
        // answer says nothing of the requests for pieces.
        rec.have_failures = 0;
        let consistent = Geometry::new(size).is_ok_and(|g| g.piece_count() == pieces.piece_count());
        if !consistent {
            self.drop_peer(peer, Some(PeerFailure::Protocol), now);
            return;
        }
        if pieces.is_empty() {
            // It holds nothing: as good as NotFound.
            self.drop_peer(peer, None, now);
            return;
        }
        if self.claim.as_ref().is_some_and(|c| c.proven && c.size() != size)
            || self.proven_size.is_some_and(|s| s != size)
        {
            // The last piece, or a size proof, proved another size: this claim is false.
            self.drop_peer(peer, Some(PeerFailure::Corrupt), now);
            return;
        }
        let lacked = match self.claim.as_ref() {
            Some(c) if c.piece_count() == pieces.piece_count() => !pieces.difference(&c.verified).is_empty(),
            _ => true,
        };
        if lacked {
            self.last_sign = now;
        }
        let seq = self.next_claim_seq;
        self.next_claim_seq += 1;
        let counted = self.claim.as_ref().is_some_and(|c| c.size() == size);
        let old = rec.advert.replace(Advert::new(size, pieces, seq, counted));
        if let (Some(claim), Some(new)) = (self.claim.as_mut(), rec.advert.as_ref()) {
            if let Some(old) = old.as_ref().filter(|o| o.size == claim.size()).and_then(Advert::counted) {
                claim.remove_advert(old);
            }
            if let Some(new) = new.counted() {
                claim.add_advert(new);
            }
        }
    }

    /// A fresh have-map `peer` sent along with an answer to a request: it replaces the peer's
    /// advert as a have answer would, without counting as one. Ignored unless the peer is live,
    /// already advertised, and the map counts the pieces of the size it claimed. Call it after
    /// [`Fetch::handle_response`] for the answer it came with: the map is newer than that answer.
    pub fn handle_advert(&mut self, peer: P, pieces: PieceSet, now: Instant) {
        if self.finished {
            return;
        }
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && !r.parked) else { return };
        let Some(advert) = rec.advert.as_mut().filter(|a| a.piece_count() == pieces.piece_count()) else {
            return;
        };
        if pieces.is_empty() {
            self.drop_peer(peer, None, now);
            return;
        }
        let counted = advert.counted().is_some();
        let old = std::mem::replace(advert, Advert::new(advert.size, pieces, advert.seq, counted));
        rec.last_have_at = Some(now);
        rec.unserved_from = rec.unserved_from.min(self.next_request_id);
        if let (Some(claim), Some(old), Some(new)) = (self.claim.as_mut(), old.counted(), advert.counted()) {
            claim.remove_advert(old);
            claim.add_advert(new);
        }
    }

    /// `size` is the blob's size, proven by a size proof that came with a have answer and that the
    /// node checked against the hash (`verify::check_size_proof`). The claim takes it as proven,
    /// so pieces go out rarest first at once instead of the last piece alone first: in a crowd,
    /// nobody waits for the one piece everybody needs first. An unproven claim of another size is
    /// abandoned, and peers claiming another size are dropped and penalised.
    pub fn handle_size_proof(&mut self, size: u64, now: Instant) {
        if self.finished || self.claim.as_ref().is_some_and(|c| c.proven) || Geometry::new(size).is_err() {
            return;
        }
        self.proven_size = Some(size);
        match self.claim.as_mut() {
            Some(claim) if claim.size() == size => {
                claim.proven = true;
                self.drop_liars(now);
            }
            Some(_) => self.reject_size(),
            None => {}
        }
    }

    /// The node could not open the blob for `size`, a claim no proof backs yet: it does not evict
    /// cached blobs for a size a peer merely claims, nor fail the fetch on one larger than its
    /// cache. The claim is abandoned (`SizeRejected`, without blaming anyone: the claim may be
    /// honest) and from now on the fetch claims only a size a proof proved, which the have
    /// requests keep asking for. Ignored unless `size` is the current, unproven, claim.
    pub fn handle_size_unprovable(&mut self, size: u64, now: Instant) {
        if self.finished || !self.claim.as_ref().is_some_and(|c| !c.proven && c.size() == size) {
            return;
        }
        self.proof_required = true;
        self.reject_size();
        self.settle_size(now);
    }

    /// The have request to `peer` failed. See the [module documentation](crate::fetch) for what each
    /// failure does. Ignored unless a have request to that peer is under way.
    pub fn handle_have_failed(&mut self, peer: P, failure: PeerFailure, now: Instant) {
        if self.finished {
            return;
        }
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && r.asking) else { return };
        rec.asking = false;
        rec.watching = false;
        rec.have_timeout_at = None;
        self.peer_failed(peer, failure, Asked::Have, now);
    }

    /// The pieces the store already holds verified, in answer to [`Action::Begin`]: they are never
    /// requested. A set counted for another piece count is ignored (the store holds nothing
    /// usable), but still releases the requests waiting for this answer.
    pub fn handle_local(&mut self, have: &PieceSet, now: Instant) {
        if self.finished {
            return;
        }
        let Some(claim) = self.claim.as_mut() else { return };
        claim.local_known = true;
        if have.piece_count() != claim.piece_count() {
            return;
        }
        self.accept_verified(have, None, now);
        self.after_verification();
    }

    /// The outcome of request `id` to `peer`: the pieces that verified and were stored (possibly
    /// fewer than asked, when the server holds fewer), the bytes received, how long it took, and
    /// why it ended early if it did. Answers to unknown, cancelled or timed-out requests are
    /// ignored.
    ///
    /// Returns whether the answer proved `peer`'s have-map stale: it sent none of the pieces
    /// asked, answering `NotFound` or `Data` with none of them (not `Busy`, a broken transfer or
    /// `Corrupt`). Only the first such answer per map is, as [`FetchConfig::max_peer_failures`]
    /// counts them: later ones, and answers to requests sent before the peer's last map, are
    /// not. The node may count it against the peer.
    #[allow(clippy::too_many_arguments, reason = "the node reports one request's whole outcome in one call")]
    pub fn handle_response(
        &mut self,
        peer: P,
        id: RequestId,
        verified: &PieceSet,
        bytes: u64,
        elapsed: Duration,
        failure: Option<PeerFailure>,
        now: Instant,
    ) -> bool {
        if self.finished || self.requests.get(&id).is_none_or(|r| r.peer != peer) {
            return false;
        }
        let Some(request) = self.take_request(id) else { return false };
        if let Some(rec) = self.peers.get_mut(&peer) {
            rec.record_transfer(bytes, elapsed);
        }
        let Some(claim) = self.claim.as_ref() else { return false };
        // Only pieces asked for count: the accounting of copies stays exact.
        let got = if verified.piece_count() == claim.piece_count() {
            verified.intersection(&request.pieces)
        } else {
            PieceSet::empty(claim.piece_count())
        };
        let last = claim.last();
        let last_failed = !claim.proven && request.pieces.contains(last) && !got.contains(last);
        let size = claim.size();
        self.accept_verified(&got, Some(peer), now);
        if let Some(claim) = self.claim.as_mut() {
            claim.release(&request.pieces);
        }
        let not_served = request.pieces.difference(&got);
        if !got.is_empty() || matches!(failure, Some(PeerFailure::Busy { .. })) {
            // Progress, or a holder of what we asked for telling us to wait our turn.
            self.last_sign = now;
        }
        let (stale, unserved) = match self.peers.get_mut(&peer) {
            Some(rec) if !got.is_empty() => {
                // It sends what it named: asked again at once, whatever its maps said before.
                rec.unserved = 0;
                rec.unserved_from = rec.unserved_from.min(self.next_request_id);
                (false, false)
            }
            Some(rec)
                if !not_served.is_empty()
                    && matches!(failure, None | Some(PeerFailure::NotFound))
                    && id.0 >= rec.unserved_from =>
            {
                rec.unserved = rec.unserved.saturating_add(1);
                rec.unserved_from = u64::MAX;
                (true, rec.unserved >= self.config.max_peer_failures)
            }
            _ => (false, false),
        };
        match failure {
            None => {
                if let Some(rec) = self.peers.get_mut(&peer) {
                    rec.consecutive_failures = 0;
                    rec.incident_until = None;
                }
                if !not_served.is_empty() {
                    // It answered with fewer pieces than it advertised: its have-map was stale.
                    self.unadvertise(peer, &not_served, now);
                }
            }
            Some(PeerFailure::NotFound) => {
                self.unadvertise(peer, &not_served, now);
                if let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && !r.asking) {
                    // Our picture of this peer is stale: ask what it holds now, after a pause, so
                    // that a peer that names pieces and then has none does not keep us asking.
                    rec.have_retry_at = Some(at_least(now, self.config.retry_base));
                }
            }
            Some(PeerFailure::Corrupt) => {
                self.drop_peer(peer, Some(PeerFailure::Corrupt), now);
                if last_failed && self.claim.as_ref().is_some_and(|c| !c.proven) && self.provers(size) == 0 {
                    self.reject_size();
                }
            }
            Some(other) => self.peer_failed(peer, other, Asked::Get, now),
        }
        if unserved {
            // Each answer cost a round trip and a slot; its have-maps are not believed again.
            self.drop_peer(peer, None, now);
        }
        self.after_verification();
        stale
    }

    /// The next thing the node should do, or `None` when there is nothing to do until an input
    /// arrives or [`Fetch::poll_timeout`] passes. Call until `None` after every input.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action<P>> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.finished {
            return None;
        }
        if self.give_up_due(now) {
            return self.actions.pop_front();
        }
        self.expire_timers(now);
        if let Some(action) = self.decide(now) {
            return Some(action);
        }
        self.actions.pop_front()
    }

    /// When [`Fetch::handle_timeout`] should be called next, or `None` when no timer runs (the
    /// fetch is finished, or waits for an input). After `handle_timeout(now)` and draining
    /// [`Fetch::poll_action`] at `now`, this is later than `now`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let mut next = self.deadline_at;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.stall_at());
        let endgame = self.in_endgame() || !self.reading.is_empty();
        for request in self.requests.values() {
            consider(request.timeout_at);
            if endgame {
                // Wake when a request falls late, so an idle peer can duplicate it (in the end
                // game, or a piece a reader waits for).
                consider(request.due);
            }
        }
        for rec in self.peers.values().filter(|r| !r.dropped) {
            consider(rec.have_timeout_at);
            consider(rec.have_retry_at);
            consider(rec.backoff_until);
            if !rec.asking {
                consider(self.refresh_due(rec));
                if self.watch_wanted(rec).is_some() {
                    consider(self.watch_due(rec));
                }
            }
        }
        if self.search_wanted() {
            consider(Some(self.next_search_at));
        }
        next
    }

    /// Time passed: requests and have requests past their timeout fail (each timed-out request
    /// is cancelled), back-offs end, and the deadline is checked.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        if self.give_up_due(now) {
            return;
        }
        let expired: Vec<RequestId> =
            self.requests.iter().filter(|(_, r)| r.timeout_at.is_some_and(|t| t <= now)).map(|(id, _)| *id).collect();
        for id in expired {
            // An earlier timeout in this loop may have dropped the peer and cancelled this one.
            let Some(request) = self.take_request(id) else { continue };
            if let Some(claim) = self.claim.as_mut() {
                claim.release(&request.pieces);
            }
            self.actions.push_back(Action::Cancel { peer: request.peer, id });
            self.peer_failed(request.peer, PeerFailure::Timeout, Asked::Get, now);
        }
        let silent: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, r)| !r.dropped && r.asking && r.have_timeout_at.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in silent {
            if let Some(rec) = self.peers.get_mut(&peer) {
                rec.asking = false;
                rec.watching = false;
                rec.have_timeout_at = None;
            }
            self.peer_failed(peer, PeerFailure::Timeout, Asked::Have, now);
        }
        self.expire_timers(now);
    }

    /// How far the fetch has come.
    pub fn progress(&self) -> Progress {
        let claim = self.claim.as_ref();
        let peers_active = self
            .peers
            .values()
            .filter(|r| !r.dropped && r.advert.as_ref().is_some_and(|a| claim.is_none_or(|c| c.size() == a.size)))
            .count();
        Progress {
            verified_pieces: claim.map_or(0, |c| c.verified.count()),
            verified_bytes: claim.map_or(0, |c| c.verified_bytes),
            total_pieces: claim.map(Claim::piece_count),
            total_bytes: claim.map(Claim::size),
            size_proven: claim.is_some_and(|c| c.proven),
            peers_active,
            requests_in_flight: self.requests.len(),
        }
    }

    /// The bytes the peers' adverts hold: their bitmaps and runs.
    #[cfg(test)]
    fn advert_bytes(&self) -> usize {
        let held = |a: &Advert| match &a.held {
            Held::Bitmap(pieces) => pieces.piece_count().div_ceil(64) as usize * 8,
            Held::Runs { runs, .. } => std::mem::size_of_val(&**runs),
        };
        self.peers.values().filter_map(|r| r.advert.as_ref()).map(held).sum()
    }

    /// The blob's size: proven, or claimed by the peers the fetch is working with.
    pub fn size(&self) -> Option<u64> {
        self.claim.as_ref().map(Claim::size)
    }

    /// What readers of the blob read next: each span's pieces in order (an HTTP response
    /// streaming the blob, or a range of it, waits for the span's first piece and reads on). The
    /// pieces of each span (its first [`READ_AHEAD`]) that are neither held nor asked for are
    /// requested before any other, each reader's in order and the one nearest its reader's
    /// position first (readers far apart take turns), each from the best-ranked peer that has
    /// it; the rest still go rarest first, which is what spreads a crowd's pieces. Replaces the
    /// spans set before; at most [`MAX_READERS`] are kept. Pieces past the blob's end are ignored.
    pub fn set_reading(&mut self, spans: impl IntoIterator<Item = Range<PieceIndex>>) {
        self.reading.clear();
        self.reading.extend(spans.into_iter().take(MAX_READERS));
    }

    /// Whether the size is proven: the last piece verified under it.
    pub fn is_size_proven(&self) -> bool {
        self.claim.as_ref().is_some_and(|c| c.proven)
    }

    /// The verified pieces, once a size is claimed.
    pub fn verified(&self) -> Option<&PieceSet> {
        self.claim.as_ref().map(|c| &c.verified)
    }

    /// Whether [`Action::Complete`] or [`Action::Failed`] was decided.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// What the fetch knows about each peer it asked, dropped ones included (the most recently
    /// dropped, see [`DROPPED_PER_PEER_SLOT`]).
    pub fn peer_stats(&self) -> impl Iterator<Item = (P, PeerStats)> + '_ {
        self.peers.iter().map(|(p, r)| (*p, r.stats()))
    }

    // ---- decisions ----

    fn decide(&mut self, now: Instant) -> Option<Action<P>> {
        if self.search_wanted() && now >= self.next_search_at {
            self.searching = true;
            return Some(Action::FindProviders);
        }
        match self.next_have_ask(now) {
            Some((peer, None)) => return Some(Action::AskHave { peer }),
            Some((peer, Some(wanted))) => return Some(Action::WatchHave { peer, wanted }),
            None => {}
        }
        self.settle_size(now);
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        self.next_request(now)
    }

    /// Whether to look up providers again (once the back-off allows): no name from the DHT
    /// waiting to be asked (parked peers and names only peers gave do not count: made-up holders
    /// must not hold the lookups back), and a free slot or one held by a peer with nothing the
    /// fetch needs (see [`Fetch::next_have_ask`]). In a flash crowd new providers appear while
    /// the fetch runs; the doubling back-off keeps the lookups rare.
    fn search_wanted(&self) -> bool {
        !self.finished
            && !self.searching
            && self.nearby.is_empty()
            && self.candidates.front().is_none_or(|p| self.is_parked(p) || self.hinted.contains(p))
            && (self.live_peers < self.config.max_peers || self.peers.values().any(|r| self.stale(r)))
    }

    /// Whether every slot is taken while a peer that never held one (or was named nearby) waits:
    /// a busy peer then gives its slot up (see the [module documentation](crate::fetch)).
    fn newcomer_waits(&self) -> bool {
        // New names wait ahead of parked peers (see `Fetch::handle_providers`).
        self.live_peers >= self.config.max_peers
            && (!self.nearby.is_empty() || self.candidates.front().is_some_and(|p| !self.is_parked(p)))
    }

    /// Whether `peer` is parked: in the candidate queue again after holding a slot.
    fn is_parked(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|r| r.parked)
    }

    /// The next peer to ask for its have-map (with the pieces to watch for, if it is a watch):
    /// retries, refreshes and watches of known peers first, then a candidate if a slot is free
    /// (nearby ones first, see [`Fetch::handle_nearby`]).
    ///
    /// A stale peer whose refresh is due while every slot is taken and a candidate waits gives its
    /// slot to the candidate instead of being watched or asked again (it is parked at the back of
    /// the queue). Otherwise peers holding only what is verified could hold every slot forever
    /// while the providers that hold the rest are never asked.
    fn next_have_ask(&mut self, now: Instant) -> Option<(P, Option<PieceSet>)> {
        let full = self.live_peers >= self.config.max_peers && !(self.candidates.is_empty() && self.nearby.is_empty());
        let due = self.peers.iter().filter(|(_, r)| !r.dropped && !r.parked && !r.asking).find_map(|(p, r)| {
            if r.have_retry_at.is_some_and(|t| t <= now) {
                return Some((*p, Look::Ask));
            }
            let refresh = self.refresh_due(r).is_some_and(|t| t <= now);
            if refresh && full {
                return Some((*p, Look::Park));
            }
            // A watch is never due later than a refresh: both wait for the same news.
            match self.watch_wanted(r) {
                Some(wanted) => self.watch_due(r).is_some_and(|t| t <= now).then_some((*p, Look::Watch(wanted))),
                None => refresh.then_some((*p, Look::Ask)),
            }
        });
        match due {
            Some((peer, Look::Park)) => self.park(peer, false),
            Some((peer, Look::Ask)) => {
                self.start_ask(peer, now);
                return Some((peer, None));
            }
            Some((peer, Look::Watch(wanted))) => {
                self.start_watch(peer, now);
                return Some((peer, Some(wanted)));
            }
            None => {}
        }
        if self.live_peers >= self.config.max_peers {
            return None;
        }
        loop {
            let peer = match self.nearby.pop_front() {
                Some(peer) => {
                    // Its turn in the candidate queue, if it had one, is taken now.
                    if let Some(at) = self.candidates.iter().position(|p| *p == peer) {
                        self.candidates.remove(at);
                    }
                    peer
                }
                None => self.candidates.pop_front()?,
            };
            self.hinted.remove(&peer);
            match self.peers.get_mut(&peer) {
                // A parked peer's turn came round again.
                Some(rec) if rec.parked => {
                    rec.parked = false;
                    rec.stepped_aside = false;
                }
                Some(_) => continue,
                None => {
                    let salt = self.rng.next_u64();
                    self.peers.insert(peer, Peer::new(salt));
                    self.peers_asked += 1;
                }
            }
            self.live_peers += 1;
            self.start_ask(peer, now);
            return Some((peer, None));
        }
    }

    /// Frees the slot of `peer`, which has nothing the fetch needs or, if `busy`, answered `Busy`:
    /// its advert stops counting and it goes to the back of the candidate queue (keeping its
    /// statistics).
    fn park(&mut self, peer: P, busy: bool) {
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && !r.parked) else { return };
        rec.parked = true;
        rec.stepped_aside = busy;
        rec.asking = false;
        rec.watching = false;
        rec.have_timeout_at = None;
        rec.have_retry_at = None;
        let advert = rec.advert.take();
        self.live_peers = self.live_peers.saturating_sub(1);
        if let (Some(claim), Some(pieces)) = (self.claim.as_mut(), advert.as_ref().and_then(Advert::counted)) {
            claim.remove_advert(pieces);
        }
        self.candidates.push_back(peer);
        // Within the candidate bound: a full queue forgets the parked peer with nothing we need
        // parked last, else the name only peers gave that waits last (a peer that answered is
        // worth more than a name that costs nothing to make), else the one parked for `Busy`
        // longest ago.
        let max = self.config.max_peers.saturating_mul(CANDIDATES_PER_PEER_SLOT);
        let order = [Forgettable::ParkedIdle, Forgettable::Hinted, Forgettable::ParkedBusy];
        while self.candidates.len() > max && self.forget_candidate(&order) {}
    }

    /// Forgets one candidate of the first kind in `order` the queue holds (the one queued last,
    /// or for [`Forgettable::ParkedBusy`] the one parked longest ago); false if none.
    fn forget_candidate(&mut self, order: &[Forgettable]) -> bool {
        let parked = |busy: bool| {
            let peers = &self.peers;
            move |p: &P| peers.get(p).is_some_and(|r| r.parked && r.stepped_aside == busy)
        };
        let at = order.iter().find_map(|kind| match kind {
            Forgettable::ParkedIdle => self.candidates.iter().rposition(parked(false)),
            Forgettable::Hinted => self.candidates.iter().rposition(|p| self.hinted.contains(p)),
            Forgettable::ParkedBusy => self.candidates.iter().position(parked(true)),
        });
        match at.and_then(|at| self.candidates.remove(at)) {
            Some(gone) => {
                self.peers.remove(&gone);
                self.hinted.remove(&gone);
                true
            }
            None => false,
        }
    }

    fn start_ask(&mut self, peer: P, now: Instant) {
        let timeout = self.config.have_timeout;
        if let Some(rec) = self.peers.get_mut(&peer) {
            rec.asking = true;
            rec.watching = false;
            rec.have_retry_at = None;
            rec.have_timeout_at = now.checked_add(timeout);
        }
    }

    /// A watch goes out: it may take its wait on top of a have request's timeout.
    fn start_watch(&mut self, peer: P, now: Instant) {
        let timeout = self.config.have_timeout.saturating_add(self.config.have_refresh);
        if let Some(rec) = self.peers.get_mut(&peer) {
            rec.asking = true;
            rec.watching = true;
            rec.watch_sent = Some(now);
            rec.have_retry_at = None;
            rec.have_timeout_at = now.checked_add(timeout);
        }
    }

    /// The pieces to watch `rec` for: those the fetch lacks and the peer does not advertise, if
    /// it is a live partial holder of the proven size with nothing asked of it. A peer with
    /// requests under way is not watched: each answer brings its have-map.
    fn watch_wanted(&self, rec: &Peer) -> Option<PieceSet> {
        if self.finished
            || rec.dropped
            || rec.parked
            || rec.asking
            || rec.no_watch
            || rec.in_flight > 0
            || rec.have_retry_at.is_some()
        {
            return None;
        }
        let claim = self.claim.as_ref().filter(|c| c.proven && c.local_known)?;
        let advert = rec.advert.as_ref().and_then(Advert::counted).filter(|a| !a.is_complete())?;
        let wanted = PieceSet::full(claim.piece_count()).difference(&claim.verified).difference(advert);
        (!wanted.is_empty()).then(|| wanted.first_runs(crate::wire::MAX_RUNS))
    }

    /// When `rec` may be watched (see [`Fetch::watch_wanted`]): at once, unless its last watch
    /// brought nothing the fetch needs.
    fn watch_due(&self, rec: &Peer) -> Option<Instant> {
        rec.watch_after.or(rec.last_have_at)
    }

    /// Whether `rec` is a live, idle partial holder of the claimed size that has nothing the fetch
    /// can request now: it holds a slot without helping.
    fn stale(&self, rec: &Peer) -> bool {
        let asking = rec.asking && !rec.watching;
        if self.finished || rec.dropped || rec.parked || asking || rec.have_retry_at.is_some() || rec.in_flight > 0 {
            return false;
        }
        let Some(claim) = self.claim.as_ref() else {
            // No size yet: a partial holder that cannot prove the one it claims does not help to
            // settle one (in a crowd, where sizes come from proofs, most holders lack the last
            // piece; holding every slot, they would keep the ones who have it from being asked).
            // Once only a proof settles the size, one that answered without a proof does not
            // either: every have request asks for one until the size is proven, and a holder of
            // the last piece sends it.
            return rec.advert.as_ref().is_some_and(|a| !a.can_prove() || self.proof_required);
        };
        let Some(advert) = rec.advert.as_ref().and_then(Advert::counted) else { return false };
        if advert.is_complete() {
            return false;
        }
        let useful =
            if claim.proven { !advert.difference(&claim.verified).is_empty() } else { advert.contains(claim.last()) };
        !useful
    }

    /// When a partial holder that has nothing the fetch still needs should be asked again for its
    /// have-map, if it does not know watches, or may give its slot to a waiting candidate, if it
    /// should: once a watch of it has run its interval without news, or, unwatched, that long
    /// after its last have-map.
    fn refresh_due(&self, rec: &Peer) -> Option<Instant> {
        if !self.stale(rec) {
            return None;
        }
        match rec.watch_after {
            Some(t) if !rec.no_watch => Some(t),
            _ => rec.last_have_at?.checked_add(self.config.have_refresh),
        }
    }

    /// Live peers whose have-map holds the last piece of the `size` they claim.
    fn provers(&self, size: u64) -> usize {
        self.peers
            .values()
            .filter(|r| !r.dropped && r.advert.as_ref().is_some_and(|a| a.size == size && a.can_prove()))
            .count()
    }

    /// The size to work with: the one most live peers that can prove it claim; among equals, the
    /// one claimed first.
    fn best_claim(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
        for advert in self.peers.values().filter(|r| !r.dropped).filter_map(|r| r.advert.as_ref()) {
            if advert.can_prove() {
                let vote = votes.entry(advert.size).or_insert((0, u64::MAX));
                vote.0 += 1;
                vote.1 = vote.1.min(advert.seq);
            }
        }
        votes.into_iter().max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1))).map(|(size, _)| size)
    }

    /// Claims a size when there is none (the proven one, if a size proof came), and abandons an
    /// unproven claim nobody can prove any more when another can be.
    fn settle_size(&mut self, now: Instant) {
        if let Some(claim) = &self.claim {
            if claim.proven || self.provers(claim.size()) > 0 {
                return;
            }
            match self.best_claim() {
                Some(other) if other != claim.size() => self.reject_size(),
                _ => return,
            }
        }
        let claimed = if self.proof_required { None } else { self.best_claim() };
        let Some(size) = self.proven_size.or(claimed) else { return };
        let Ok(geometry) = Geometry::new(size) else { return };
        let offset = self.rng.below(geometry.piece_count());
        let mut claim = Claim::new(geometry, offset);
        for advert in self.peers.values_mut().filter(|r| !r.dropped).filter_map(|r| r.advert.as_mut()) {
            if advert.size == size {
                claim.add_advert(advert.count());
            }
        }
        claim.proven = self.proven_size == Some(size);
        self.claim = Some(claim);
        self.actions.push_back(Action::Begin { size });
        if self.proven_size == Some(size) {
            self.drop_liars(now);
        }
    }

    /// Abandons the unproven claim: its requests are cancelled and the node deletes the entry.
    fn reject_size(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        for advert in self.peers.values_mut().filter_map(|r| r.advert.as_mut()) {
            advert.set_aside();
        }
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            if let Some(request) = self.take_request(id) {
                self.actions.push_back(Action::Cancel { peer: request.peer, id });
            }
        }
        self.actions.push_back(Action::SizeRejected { size: claim.size() });
    }

    fn next_request(&mut self, now: Instant) -> Option<Action<P>> {
        if !self.claim.as_ref().is_some_and(|c| c.local_known) {
            return None;
        }
        let ranked = self.ranked(now);
        for &peer in &ranked {
            if let Some(pieces) = self.pick_new(peer) {
                return Some(self.send(peer, pieces, now));
            }
        }
        let endgame = self.in_endgame();
        let waited = self.read_next_missing();
        if endgame || !waited.is_empty() {
            for &peer in &ranked {
                if self.peers.get(&peer).is_none_or(|r| r.in_flight != 0) {
                    continue;
                }
                if let Some(pieces) = self.pick_duplicates(peer, &waited, endgame) {
                    return Some(self.send(peer, pieces, now));
                }
            }
        }
        None
    }

    /// The piece each reader waits for now: the first of its span not verified yet (at most
    /// [`MAX_READERS`]). None before the size is proven (a copy of the proof would cost the fetch
    /// a piece for nothing) or when duplicates are off.
    fn read_next_missing(&self) -> Vec<PieceIndex> {
        let Some(claim) = self.claim.as_ref().filter(|c| c.proven && self.config.endgame_copies > 1) else {
            return Vec::new();
        };
        let n = claim.piece_count();
        let mut next: Vec<PieceIndex> = self
            .reading
            .iter()
            .filter_map(|r| {
                let ahead = r.start..r.end.min(r.start.saturating_add(READ_AHEAD)).min(n);
                ahead.into_iter().find(|&i| !claim.verified.contains(i))
            })
            .collect();
        next.sort_unstable();
        next.dedup();
        next
    }

    /// Peers that may take a request now, the one expected to deliver soonest first.
    fn ranked(&self, now: Instant) -> Vec<P> {
        let Some(claim) = &self.claim else { return Vec::new() };
        let request_bytes = (u64::from(self.config.pieces_per_request) * PIECE_SIZE) as f64;
        let mut ready: Vec<(f64, u64, P)> = self
            .peers
            .iter()
            .filter(|(_, r)| {
                !r.dropped
                    && r.claims(claim.size())
                    && r.in_flight < self.window(r)
                    && r.backoff_until.is_none_or(|t| t <= now)
                    // Not from a map whose pieces it did not send: the next one first.
                    && r.unserved_from != u64::MAX
            })
            .map(|(p, r)| (r.expected_secs(request_bytes), r.salt, *p))
            .collect();
        ready.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        ready.into_iter().map(|(_, _, p)| p).collect()
    }

    /// New pieces for `peer`: the rarest piece it advertises that nobody is fetching (the first
    /// from the seeded offset among equals), grown into a contiguous run of at most
    /// `pieces_per_request`. Linear in the piece count (a few microseconds for a 1 GiB blob).
    fn pick_new(&self, peer: P) -> Option<PieceSet> {
        let claim = self.claim.as_ref()?;
        let advert = self.peers.get(&peer)?.advert.as_ref().and_then(Advert::counted)?;
        let candidates = claim.requestable().intersection(advert);
        let n = claim.piece_count();
        // A reader's next pieces first, in order, the nearest to its reader first (so readers far
        // apart take turns), and a request for them reaches no further back.
        let read_next = self
            .reading
            .iter()
            .filter_map(|r| {
                let ahead = r.start..r.end.min(r.start.saturating_add(READ_AHEAD)).min(n);
                ahead.clone().find(|&i| candidates.contains(i)).map(|i| (i - ahead.start, i))
            })
            .min()
            .map(|(_, i)| i);
        let order = |i: PieceIndex| (u64::from(i) + u64::from(n) - u64::from(claim.offset)) % u64::from(n);
        let best = match read_next {
            Some(i) => i,
            None => candidates.iter().min_by_key(|&i| (claim.availability(i), order(i)))?,
        };
        let limit = self.piece_limit(peer);
        let mut pieces = PieceSet::single(n, best);
        let mut count = 1;
        let mut next = best + 1;
        while count < limit && next < n && candidates.contains(next) {
            pieces.insert(next);
            next += 1;
            count += 1;
        }
        let mut prev = best;
        while read_next.is_none() && count < limit && prev > 0 && candidates.contains(prev - 1) {
            prev -= 1;
            pieces.insert(prev);
            count += 1;
        }
        Some(pieces)
    }

    /// The most requests `r` may have in flight: with a [`FetchConfig::request_target`], one until
    /// an answer measured it. A seeder that just published a blob is asked by its crowd within a
    /// round trip, and its first asker, alone so far, was sent a piece on each request of its
    /// window; the crowd then waited on that one uplink for all of them.
    fn window(&self, r: &Peer) -> usize {
        match self.config.request_target.is_some() && r.throughput.is_none() {
            true => 1,
            false => self.config.max_requests_per_peer,
        }
    }

    /// The most pieces a new request to `peer` asks for (see [`FetchConfig::request_target`]).
    fn piece_limit(&self, peer: P) -> u32 {
        let most = self.config.pieces_per_request;
        let Some(target) = self.config.request_target else { return most };
        match self.peers.get(&peer).and_then(|r| r.throughput) {
            Some(t) if t > 0.0 => {
                let fits = (t * target.as_secs_f64() / PIECE_SIZE as f64).floor();
                (fits.min(f64::from(most)) as u32).max(1)
            }
            _ => 1,
        }
    }

    /// End-game: every missing piece is in flight, so idle peers may duplicate requests in flight.
    /// Not while some missing piece is not asked for, even if no peer we know advertises it: in a
    /// crowd the peers that will have it appear within seconds, and duplicating meanwhile would
    /// spend their uploads twice. Not before the size is proven: duplicating the proof would cost
    /// every fetch an extra piece, and a peer that stalls it is timed out like any other.
    fn in_endgame(&self) -> bool {
        let Some(claim) = self.claim.as_ref().filter(|c| c.proven) else { return false };
        self.config.endgame_copies > 1 && claim.wanted.is_empty()
    }

    /// Duplicates for an idle `peer`: pieces of late requests in flight elsewhere that it
    /// advertises and that have fewer than `endgame_copies` requests, or, up to twice that many,
    /// whose every request fell late (copies that went to peers gone silent, a crashed
    /// process's, held the piece until their timeout): one more at a time. First the pieces
    /// readers wait for now (`waited`, sorted): a late request holds up what a reader streams,
    /// and a copy from an idle peer may come first. Then, in the `endgame` only, those of the
    /// oldest late requests, up to a request's pieces.
    fn pick_duplicates(&self, peer: P, waited: &[PieceIndex], endgame: bool) -> Option<PieceSet> {
        let claim = self.claim.as_ref()?;
        let advert = self.peers.get(&peer)?.advert.as_ref().and_then(Advert::counted)?;
        if !self.requests.values().any(|r| r.peer != peer && r.due.is_none()) {
            return None;
        }
        let mut pieces = PieceSet::empty(claim.piece_count());
        let mut count = 0;
        let passes: &[bool] = if endgame { &[true, false] } else { &[true] };
        // The pieces with a request on schedule (or never scheduled), made once.
        let mut scheduled = PieceSet::empty(claim.piece_count());
        for request in self.requests.values().filter(|r| r.due.is_some() || !r.scheduled) {
            scheduled.union_with(&request.pieces);
        }
        let most = |i: PieceIndex| match scheduled.contains(i) {
            true => self.config.endgame_copies,
            false => (2 * self.config.endgame_copies).min(usize::from(u8::MAX)),
        };
        for &readers_only in passes {
            for request in self.requests.values().filter(|r| r.peer != peer && r.due.is_none()) {
                for i in request.pieces.iter() {
                    if count < self.config.pieces_per_request
                        && (!readers_only || waited.binary_search(&i).is_ok())
                        && advert.contains(i)
                        && !claim.verified.contains(i)
                        && usize::from(claim.copies(i)) < most(i)
                        && pieces.insert(i)
                    {
                        count += 1;
                    }
                }
            }
        }
        (count > 0).then_some(pieces)
    }

    fn send(&mut self, peer: P, pieces: PieceSet, now: Instant) -> Action<P> {
        let id = RequestId(self.next_request_id);
        self.next_request_id += 1;
        if let Some(claim) = self.claim.as_mut() {
            claim.send(&pieces);
        }
        if let Some(rec) = self.peers.get_mut(&peer) {
            rec.in_flight += 1;
        }
        let timeout_at = now.checked_add(self.config.request_timeout);
        let bytes = (u64::from(pieces.count()) * PIECE_SIZE) as f64;
        let due = self
            .peers
            .get(&peer)
            .and_then(|r| r.throughput)
            .or_else(|| self.mean_throughput())
            .filter(|t| *t > 0.0)
            .and_then(|t| Duration::try_from_secs_f64(LATE_FACTOR * bytes / t).ok())
            .and_then(|d| now.checked_add(d));
        self.requests.insert(id, InFlight { peer, pieces: pieces.clone(), timeout_at, due, scheduled: due.is_some() });
        Action::Request { peer, id, pieces }
    }

    // ---- bookkeeping ----

    /// Removes request `id` from the books of its peer; the caller settles its pieces.
    fn take_request(&mut self, id: RequestId) -> Option<InFlight<P>> {
        let request = self.requests.remove(&id)?;
        if let Some(rec) = self.peers.get_mut(&request.peer) {
            rec.in_flight = rec.in_flight.saturating_sub(1);
        }
        Some(request)
    }

    /// Records verified pieces (from `from`, or from the store); proves the size when the last
    /// piece is among them.
    fn accept_verified(&mut self, pieces: &PieceSet, from: Option<P>, now: Instant) {
        let Some(claim) = self.claim.as_mut() else { return };
        let mut new = 0;
        for i in pieces.iter() {
            if claim.verify(i) {
                new += 1;
            }
        }
        if let Some(rec) = from.and_then(|p| self.peers.get_mut(&p)) {
            rec.pieces_verified += new;
        }
        if new > 0 {
            self.last_piece = now;
        }
        if !claim.proven && claim.verified.contains(claim.last()) {
            claim.proven = true;
            self.drop_liars(now);
        }
    }

    /// The size is proven: peers that claimed another one are dropped and penalised.
    fn drop_liars(&mut self, now: Instant) {
        let Some(size) = self.claim.as_ref().map(Claim::size) else { return };
        let liars: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, r)| !r.dropped && r.advert.as_ref().is_some_and(|a| a.size != size))
            .map(|(p, _)| *p)
            .collect();
        for peer in liars {
            self.drop_peer(peer, Some(PeerFailure::Corrupt), now);
        }
    }

    /// Cancels requests whose every piece is now verified, and completes the fetch when nothing is
    /// missing.
    fn after_verification(&mut self) {
        let Some(claim) = &self.claim else { return };
        let redundant: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.pieces.iter().all(|i| claim.verified.contains(i)))
            .map(|(id, _)| *id)
            .collect();
        for id in redundant {
            if let Some(request) = self.take_request(id) {
                if let Some(claim) = self.claim.as_mut() {
                    claim.release(&request.pieces);
                }
                self.actions.push_back(Action::Cancel { peer: request.peer, id });
            }
        }
        if self.claim.as_ref().is_some_and(|c| c.verified.is_complete()) {
            self.finished = true;
            self.actions.push_back(Action::Complete);
        }
    }

    /// `peer` does not hold `pieces` after all: they leave its have-map, and a peer that
    /// advertises nothing any more is dropped.
    fn unadvertise(&mut self, peer: P, pieces: &PieceSet, now: Instant) {
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped) else { return };
        // Pieces counted for the claim say nothing of an advert of another size.
        let Some(held) = rec.advert.as_mut().and_then(|a| match &mut a.held {
            Held::Bitmap(pieces) => Some(pieces),
            Held::Runs { .. } => None,
        }) else {
            return;
        };
        let mut removed = PieceSet::empty(held.piece_count());
        for i in pieces.iter() {
            if held.remove(i) {
                removed.insert(i);
            }
        }
        let empty = held.is_empty();
        if let Some(claim) = self.claim.as_mut() {
            claim.remove_advert(&removed);
        }
        if empty {
            self.drop_peer(peer, None, now);
        }
    }

    /// Applies a failure of a request to `peer` (see the module documentation).
    fn peer_failed(&mut self, peer: P, failure: PeerFailure, asked: Asked, now: Instant) {
        let retry_base = self.config.retry_base;
        let max_failures = self.config.max_peer_failures;
        let max_backoff = self.config.bound(MAX_RETRY_BACKOFF);
        let busy_wait = (self.config.bound(MIN_BUSY_WAIT), self.config.bound(MAX_BUSY_WAIT));
        let newcomer_waits = self.newcomer_waits();
        let step_aside = newcomer_waits && self.claim.as_ref().is_some_and(|c| c.proven);
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped && !r.parked) else { return };
        let wait = match failure {
            PeerFailure::NotFound | PeerFailure::Denied => {
                self.drop_peer(peer, None, now);
                return;
            }
            PeerFailure::Corrupt | PeerFailure::Protocol => {
                self.drop_peer(peer, Some(failure), now);
                return;
            }
            // Busy with nothing else asked of it: it serves others while a newcomer may not. Not
            // before the size is proven: a prover parked could leave the claim to a liar's size.
            PeerFailure::Busy { .. }
                if matches!(asked, Asked::Get) && rec.in_flight == 0 && !rec.asking && step_aside =>
            {
                self.park(peer, true);
                return;
            }
            // Busy before it ever told us what it holds: it proves no size and serves nothing yet,
            // and a peer answering every have request so would hold its slot for good.
            PeerFailure::Busy { .. }
                if matches!(asked, Asked::Have) && rec.advert.is_none() && rec.in_flight == 0 && newcomer_waits =>
            {
                self.park(peer, true);
                return;
            }
            PeerFailure::Busy { retry_after } => retry_after.clamp(busy_wait.0, busy_wait.1),
            PeerFailure::Timeout | PeerFailure::Io | PeerFailure::Truncated => {
                if rec.incident_until.is_none_or(|t| now >= t) {
                    rec.failures = rec.failures.saturating_add(1);
                    let run = match asked {
                        Asked::Have => &mut rec.have_failures,
                        Asked::Get => &mut rec.consecutive_failures,
                    };
                    *run = run.saturating_add(1);
                    let run = *run;
                    if run >= max_failures {
                        self.drop_peer(peer, None, now);
                        if let Some(rec) = self.peers.get_mut(&peer) {
                            rec.revive_at = Some(at_least(now, max_backoff));
                        }
                        return;
                    }
                    let doublings = (run - 1).min(16);
                    let wait = retry_base.saturating_mul(1 << doublings).min(max_backoff);
                    rec.incident_until = Some(at_least(now, wait));
                }
                rec.incident_until.map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
            }
        };
        let until = at_least(now, wait);
        match asked {
            Asked::Have => rec.have_retry_at = Some(until),
            Asked::Get => rec.backoff_until = Some(rec.backoff_until.map_or(until, |t| t.max(until))),
        }
    }

    /// Drops `peer` for this fetch, penalising it if `penalty` says so: its requests are cancelled
    /// and their pieces go back to the pool.
    fn drop_peer(&mut self, peer: P, penalty: Option<PeerFailure>, now: Instant) {
        let Some(rec) = self.peers.get_mut(&peer).filter(|r| !r.dropped) else { return };
        let was_live = !rec.parked;
        rec.dropped = true;
        rec.parked = false;
        rec.stepped_aside = false;
        rec.asking = false;
        rec.watching = false;
        rec.have_timeout_at = None;
        rec.have_retry_at = None;
        rec.backoff_until = None;
        let advert = rec.advert.take();
        if let Some(failure) = penalty {
            rec.penalised = true;
            self.actions.push_back(Action::Penalise { peer, failure });
        }
        if was_live {
            self.live_peers = self.live_peers.saturating_sub(1);
        }
        if let (Some(claim), Some(pieces)) = (self.claim.as_mut(), advert.as_ref().and_then(Advert::counted)) {
            claim.remove_advert(pieces);
        }
        let ids: Vec<RequestId> = self.requests.iter().filter(|(_, r)| r.peer == peer).map(|(id, _)| *id).collect();
        for id in ids {
            if let Some(request) = self.take_request(id) {
                if let Some(claim) = self.claim.as_mut() {
                    claim.release(&request.pieces);
                }
                self.actions.push_back(Action::Cancel { peer, id });
            }
        }
        self.dropped.push_back(peer);
        let max_dropped = self.config.max_peers.saturating_mul(DROPPED_PER_PEER_SLOT);
        while self.dropped.len() > max_dropped {
            if let Some(old) = self.dropped.pop_front() {
                self.peers.remove(&old);
            }
        }
        if self.live_peers == 0 && self.candidates.is_empty() && self.nearby.is_empty() {
            // Everyone is gone: look for providers again now, then back off from the start.
            self.search_backoff = self.config.providers_backoff;
            self.next_search_at = self.next_search_at.min(now);
        }
    }

    /// The mean throughput of the live peers measured so far: what a peer not yet measured is
    /// expected to deliver.
    fn mean_throughput(&self) -> Option<f64> {
        let (sum, n) = self
            .peers
            .values()
            .filter(|r| !r.dropped)
            .filter_map(|r| r.throughput)
            .fold((0.0, 0u32), |(sum, n), t| (sum + t, n + 1));
        (n > 0).then(|| sum / f64::from(n))
    }

    /// Lifts the back-offs that ended, and marks late the requests past due.
    fn expire_timers(&mut self, now: Instant) {
        for rec in self.peers.values_mut() {
            if rec.backoff_until.is_some_and(|t| t <= now) {
                rec.backoff_until = None;
            }
        }
        for request in self.requests.values_mut() {
            if request.due.is_some_and(|t| t <= now) {
                request.due = None;
            }
        }
    }

    /// When the fetch stalls if nothing happens first (see [`FetchConfig::stall_timeout`]).
    fn stall_at(&self) -> Option<Instant> {
        self.config.stall_timeout.map(|t| {
            let stalled = at_least(self.last_sign, t);
            match t.checked_mul(STALLS_WITHOUT_A_PIECE).and_then(|p| self.last_piece.checked_add(p)) {
                Some(patience) => stalled.min(patience),
                None => stalled,
            }
        })
    }

    /// Gives up if the deadline passed or the fetch stalled; returns whether it did.
    fn give_up_due(&mut self, now: Instant) -> bool {
        let stalled = self.stall_at().is_some_and(|t| now >= t);
        if !stalled && self.deadline_at.is_none_or(|d| now < d) {
            return false;
        }
        let stall = self.config.stall_timeout.unwrap_or_default();
        let starved = stalled && at_least(self.last_sign, stall) > now;
        self.fail(stalled, if starved { stall.saturating_mul(STALLS_WITHOUT_A_PIECE) } else { stall });
        true
    }

    /// Gives up: cancels what is in flight and says why; `after` is how long a stalled fetch went
    /// without progress.
    fn fail(&mut self, stalled: bool, after: Duration) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            if let Some(request) = self.take_request(id) {
                self.actions.push_back(Action::Cancel { peer: request.peer, id });
            }
        }
        let deadline = self.config.deadline.unwrap_or_default();
        let verified_pieces = self.claim.as_ref().map_or(0, |c| c.verified.count());
        let serving = self.peers.values().any(|r| !r.dropped && r.advert.is_some());
        let error = if stalled {
            FetchError::Stalled {
                hash: self.hash,
                after,
                verified_pieces,
                total_pieces: self.claim.as_ref().map(Claim::piece_count),
            }
        } else if self.providers_found == 0 {
            FetchError::NoProviders { hash: self.hash, deadline }
        } else if verified_pieces == 0 && !serving {
            FetchError::ProvidersFailed { hash: self.hash, tried: self.peers_asked, deadline }
        } else {
            FetchError::DeadlineExceeded {
                hash: self.hash,
                deadline,
                verified_pieces,
                total_pieces: self.claim.as_ref().map(Claim::piece_count),
            }
        };
        self.actions.push_back(Action::Failed(error));
        self.finished = true;
    }
}

/// `now + wait`, or `now` in the (unreachable in practice) case that the sum overflows: the waits
/// this is used for are capped, so this never postpones forever.
fn at_least(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::piece::MAX_BLOB_SIZE;

    use super::*;

    use Action::{AskHave, Begin, Cancel, Complete, Failed, FindProviders, Penalise, SizeRejected, WatchHave};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The fetch these tests were written against: requests of at most 4 pieces.
    fn config4() -> FetchConfig {
        FetchConfig { pieces_per_request: 4, ..FetchConfig::default() }
    }

    /// A blob of `pieces` pieces whose last piece is short.
    fn size_of(pieces: u32) -> u64 {
        u64::from(pieces - 1) * PIECE_SIZE + 1000
    }

    fn set(n: u32, ix: impl IntoIterator<Item = u32>) -> PieceSet {
        let mut s = PieceSet::empty(n);
        for i in ix {
            s.insert(i);
        }
        s
    }

    fn requests(actions: &[Action<u32>]) -> Vec<(u32, RequestId, PieceSet)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, id, pieces } => Some((*peer, *id, pieces.clone())),
                _ => None,
            })
            .collect()
    }

    fn stats(fetch: &Fetch<u32>, peer: u32) -> PeerStats {
        fetch.peer_stats().find(|(p, _)| *p == peer).map(|(_, s)| s).expect("the peer is known")
    }

    /// One fetch driven by hand: a fake clock, and the node's side of the contract.
    struct Driver {
        fetch: Fetch<u32>,
        now: Instant,
        size: u64,
        /// DHT lookups [`Driver::drain`] answered itself (with nobody new).
        lookups: usize,
        /// What each peer last advertised in a have answer.
        adverts: BTreeMap<u32, PieceSet>,
        /// Watches [`Driver::drain`] saw go out and nobody answered yet, in order.
        watches: Vec<(u32, PieceSet)>,
    }

    impl Driver {
        fn new(size: u64, config: FetchConfig) -> Self {
            Self::with_seed(size, config, 42)
        }

        fn with_seed(size: u64, config: FetchConfig, seed: u64) -> Self {
            // The tests' only clock read: an origin. Every later time is an offset from it.
            let now = Instant::now();
            let fetch = Fetch::new(Hash::from([7; 32]), config, seed, now);
            Self { fetch, now, size, lookups: 0, adverts: BTreeMap::new(), watches: Vec::new() }
        }

        fn n(&self) -> u32 {
            Geometry::new(self.size).expect("small").piece_count()
        }

        fn full(&self) -> PieceSet {
            PieceSet::full(self.n())
        }

        /// Every action until `poll_action` runs dry.
        fn drain_all(&mut self) -> Vec<Action<u32>> {
            let mut out = Vec::new();
            while let Some(action) = self.fetch.poll_action(self.now) {
                out.push(action);
                assert!(out.len() < 10_000, "poll_action never ran dry");
            }
            out
        }

        /// [`Driver::drain_all`], but DHT lookups (made while fewer than `max_peers` peers are
        /// live) are answered at once with nobody new, counted in `lookups` and left out, and
        /// watches are recorded in `watches` and left out.
        fn drain(&mut self) -> Vec<Action<u32>> {
            let mut out = Vec::new();
            loop {
                let actions = self.drain_all();
                if actions.is_empty() {
                    return out;
                }
                for action in actions {
                    match action {
                        FindProviders => {
                            self.lookups += 1;
                            self.fetch.handle_providers_done(self.now);
                        }
                        WatchHave { peer, wanted } => self.watches.push((peer, wanted)),
                        action => out.push(action),
                    }
                }
            }
        }

        /// Every watch open runs its whole wait, and its peer answers that it gained nothing.
        fn watches_run_out(&mut self) -> Vec<Action<u32>> {
            self.now += self.fetch.config().have_refresh;
            for (peer, _) in std::mem::take(&mut self.watches) {
                let pieces = self.adverts.get(&peer).cloned().expect("watched after a have answer");
                self.fetch.handle_watched(peer, self.size, pieces, self.now);
            }
            self.fetch.handle_timeout(self.now);
            self.drain()
        }

        fn advance(&mut self, by: Duration) -> Vec<Action<u32>> {
            self.now += by;
            self.fetch.handle_timeout(self.now);
            self.drain()
        }

        /// Answers each have request that leads `actions`, and those that follow, `NotFound`:
        /// the peers asked, in turn, and the actions left once no have request leads.
        fn ask_each_in_turn(&mut self, mut actions: Vec<Action<u32>>) -> (Vec<u32>, Vec<Action<u32>>) {
            let mut asked = Vec::new();
            while let Some(AskHave { peer }) = actions.first().cloned() {
                asked.push(peer);
                actions.remove(0);
                self.fetch.handle_have_failed(peer, PeerFailure::NotFound, self.now);
                actions.extend(self.drain_all());
            }
            (asked, actions)
        }

        /// Answers the first lookup with `peers`; returns the actions that follow.
        fn discover(&mut self, peers: &[u32]) -> Vec<Action<u32>> {
            assert_eq!(self.drain_all(), vec![FindProviders]);
            self.fetch.handle_providers(peers.iter().copied(), self.now);
            self.fetch.handle_providers_done(self.now);
            self.drain()
        }

        fn have(&mut self, peer: u32, pieces: PieceSet) {
            self.have_rtt(peer, pieces, ms(20));
        }

        fn have_rtt(&mut self, peer: u32, pieces: PieceSet, rtt: Duration) {
            self.adverts.insert(peer, pieces.clone());
            self.fetch.handle_have(peer, self.size, pieces, rtt, self.now);
        }

        fn local(&mut self, pieces: &PieceSet) -> Vec<Action<u32>> {
            self.fetch.handle_local(pieces, self.now);
            self.drain()
        }

        /// `peer` answers request `id` with every piece of `pieces` verified.
        fn ok(&mut self, peer: u32, id: RequestId, pieces: &PieceSet) -> Vec<Action<u32>> {
            let bytes = u64::from(pieces.count()) * PIECE_SIZE;
            self.fetch.handle_response(peer, id, pieces, bytes, ms(50), None, self.now);
            self.drain()
        }

        fn fail(&mut self, peer: u32, id: RequestId, failure: PeerFailure) -> Vec<Action<u32>> {
            let none = PieceSet::empty(self.n());
            self.fetch.handle_response(peer, id, &none, 0, ms(50), Some(failure), self.now);
            self.drain()
        }

        /// Answers every request, at once and successfully, until none is left; returns every
        /// action seen, `actions` included.
        fn serve_all(&mut self, actions: Vec<Action<u32>>) -> Vec<Action<u32>> {
            let mut seen = actions.clone();
            let mut queue: VecDeque<_> = requests(&actions).into();
            while let Some((peer, id, pieces)) = queue.pop_front() {
                let next = self.ok(peer, id, &pieces);
                queue.extend(requests(&next));
                seen.extend(next);
            }
            seen
        }
    }

    /// A fetch of `size` bytes from `peers` (id and advertised pieces), past `Begin` and an empty
    /// store; returns the actions that followed (the request for the last piece).
    fn started(size: u64, config: FetchConfig, peers: &[(u32, PieceSet)]) -> (Driver, Vec<Action<u32>>) {
        let mut d = Driver::new(size, config);
        let ids: Vec<u32> = peers.iter().map(|(p, _)| *p).collect();
        d.discover(&ids);
        for (peer, pieces) in peers {
            d.have(*peer, pieces.clone());
        }
        assert_eq!(d.drain(), vec![Begin { size }]);
        let actions = d.local(&PieceSet::empty(d.n()));
        (d, actions)
    }

    /// [`started`], then the last piece answered: the size is proven. Returns the actions that
    /// followed.
    fn proven(size: u64, config: FetchConfig, peers: &[(u32, PieceSet)]) -> (Driver, Vec<Action<u32>>) {
        let (mut d, actions) = started(size, config, peers);
        let reqs = requests(&actions);
        assert_eq!(reqs.len(), 1, "{actions:?}");
        let (peer, id, pieces) = reqs[0].clone();
        let after = d.ok(peer, id, &pieces);
        assert!(d.fetch.is_size_proven());
        (d, after)
    }

    // ---- 1. size ----

    #[test]
    fn the_size_comes_from_the_first_have_and_only_the_last_piece_is_asked_until_proven() {
        let size = size_of(10);
        let mut d = Driver::new(size, config4());
        assert_eq!(d.discover(&[1, 2]), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![Begin { size }]);
        assert_eq!(d.fetch.size(), Some(size));
        d.have(2, d.full());
        assert_eq!(d.drain(), vec![], "no second Begin, and no request before the store answers");
        let actions = d.local(&PieceSet::empty(10));
        let reqs = requests(&actions);
        assert_eq!(reqs.len(), 1, "{actions:?}");
        assert_eq!(reqs[0].2, PieceSet::single(10, 9), "the last piece, alone");
        assert!(!d.fetch.is_size_proven());
        assert_eq!(d.drain(), vec![], "nothing else until the size is proven, not even a duplicate");
        let after = d.ok(reqs[0].0, reqs[0].1, &reqs[0].2);
        assert!(d.fetch.is_size_proven());
        let reqs = requests(&after);
        let mut asked = PieceSet::empty(10);
        for (_, _, pieces) in &reqs {
            assert!(!pieces.contains(9) && pieces.count() <= 4, "{pieces:?}");
            asked.union_with(pieces);
        }
        assert_eq!(asked, set(10, 0..9), "everything else at once, in parallel: {after:?}");
        assert!(reqs.len() >= 3, "{after:?}");
        let all = d.serve_all(after);
        assert_eq!(all.iter().filter(|a| matches!(a, Begin { .. })).count(), 0, "Begin once");
        assert_eq!(all.last(), Some(&Complete));
    }

    #[test]
    fn a_size_the_node_cannot_open_unproven_waits_for_a_proof() {
        let size = size_of(10);
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2]);
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![Begin { size }]);
        assert!(!d.fetch.is_size_proven());
        // The store has no room for it without evicting: the claim goes, nobody is blamed.
        d.fetch.handle_size_unprovable(size, d.now);
        assert_eq!(d.drain(), vec![SizeRejected { size }]);
        assert_eq!(d.fetch.size(), None);
        // More claims of it, unproven, change nothing; a proof does.
        d.have(2, d.full());
        assert_eq!(d.drain(), vec![]);
        d.fetch.handle_size_unprovable(size, d.now);
        assert_eq!(d.drain(), vec![], "only the current, unproven, claim is given up");
        d.fetch.handle_size_proof(size, d.now);
        assert_eq!(d.drain(), vec![Begin { size }]);
        assert!(d.fetch.is_size_proven());
        d.fetch.handle_size_unprovable(size, d.now);
        assert_eq!(d.drain(), vec![], "a proven size is never given up this way");
    }

    #[test]
    fn with_a_size_proof_pieces_go_out_rarest_first_at_once() {
        let size = size_of(10);
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2]);
        // Peer 2 claims a size one piece longer; peer 1's have answer came with a proof.
        d.fetch.handle_have(2, size_of(11), PieceSet::full(11), ms(5), d.now);
        d.fetch.handle_size_proof(size, d.now);
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![Begin { size }, Penalise { peer: 2, failure: PeerFailure::Corrupt }]);
        assert!(d.fetch.is_size_proven());
        let actions = d.local(&PieceSet::empty(10));
        let reqs = requests(&actions);
        let mut asked = PieceSet::empty(10);
        for (peer, _, pieces) in &reqs {
            assert_eq!(*peer, 1);
            asked.union_with(pieces);
        }
        assert_eq!(asked, d.full(), "every piece at once, not the last piece alone: {reqs:?}");
        assert_eq!(d.serve_all(actions).last(), Some(&Complete));
    }

    #[test]
    fn holders_that_cannot_prove_a_size_give_their_slots_to_one_that_can() {
        let n = 8;
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(n), config.clone());
        assert_eq!(d.discover(&[1, 2, 3]), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        // Neither holds the last piece (nor sent a size proof): no size can be claimed yet.
        d.have(1, set(n, [0]));
        d.have(2, set(n, [1]));
        assert_eq!(d.drain(), vec![]);
        // They give their slots up in turn, and the peer with the last piece is asked.
        let mut asked = Vec::new();
        for _ in 0..4 {
            asked.extend(d.advance(config.have_refresh));
            if asked.contains(&AskHave { peer: 3 }) {
                break;
            }
        }
        assert!(asked.contains(&AskHave { peer: 3 }), "{asked:?}");
        d.have(3, d.full());
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
    }

    #[test]
    fn a_size_proof_abandons_an_unproven_claim_of_another_size() {
        let size = size_of(6);
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2]);
        d.fetch.handle_have(2, size_of(7), PieceSet::full(7), ms(1), d.now);
        assert_eq!(d.drain(), vec![Begin { size: size_of(7) }]);
        d.local(&PieceSet::empty(7));
        d.fetch.handle_size_proof(size, d.now);
        let actions = d.drain();
        assert!(actions.contains(&SizeRejected { size: size_of(7) }), "{actions:?}");
        assert!(actions.contains(&Penalise { peer: 2, failure: PeerFailure::Corrupt }), "{actions:?}");
        assert!(actions.contains(&Begin { size }), "the proven size is claimed at once: {actions:?}");
        assert!(d.fetch.is_size_proven());
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![]);
        let actions = d.local(&PieceSet::empty(6));
        assert_eq!(d.serve_all(actions).last(), Some(&Complete));
    }

    #[test]
    fn a_have_contradicting_the_proven_size_is_penalised_and_dropped() {
        let size = size_of(6);
        // Peer 3 claims a size before the proof: it waits, and is penalised when the proof comes.
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 3]);
        d.have(1, d.full());
        d.fetch.handle_have(3, size + PIECE_SIZE, PieceSet::full(7), ms(1), d.now);
        assert_eq!(d.drain(), vec![Begin { size }]);
        let reqs = requests(&d.local(&PieceSet::empty(6)));
        assert_eq!(reqs[0].0, 1, "only a peer claiming the size in force is asked");
        let after = d.ok(reqs[0].0, reqs[0].1, &reqs[0].2);
        assert_eq!(after[0], Penalise { peer: 3, failure: PeerFailure::Corrupt }, "{after:?}");
        assert!(stats(&d.fetch, 3).dropped && stats(&d.fetch, 3).penalised);
        // Peer 4 claims another size after the proof.
        d.fetch.handle_providers([4], d.now);
        let asks = d.drain();
        assert!(asks.contains(&AskHave { peer: 4 }), "{asks:?}");
        d.fetch.handle_have(4, size - 1, PieceSet::full(6), ms(1), d.now);
        assert_eq!(d.drain(), vec![Penalise { peer: 4, failure: PeerFailure::Corrupt }]);
        let all = d.serve_all(after);
        assert!(requests(&all).iter().all(|(p, _, _)| *p == 1));
        assert_eq!(all.last(), Some(&Complete));
    }

    #[test]
    fn a_corrupt_last_piece_rejects_the_claim_and_the_next_claim_is_begun() {
        let size = size_of(5);
        let lie = size + 3 * PIECE_SIZE;
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2]);
        d.fetch.handle_have(1, lie, PieceSet::full(8), ms(1), d.now);
        assert_eq!(d.drain(), vec![Begin { size: lie }]);
        let reqs = requests(&d.local(&PieceSet::empty(8)));
        assert_eq!((reqs[0].0, reqs[0].2.clone()), (1, PieceSet::single(8, 7)));
        d.have(2, d.full());
        assert_eq!(d.drain(), vec![], "an unproven claim stands while its claimant can prove it");
        let none = PieceSet::empty(8);
        d.fetch.handle_response(1, reqs[0].1, &none, 1000, ms(5), Some(PeerFailure::Corrupt), d.now);
        assert_eq!(
            d.drain(),
            vec![Penalise { peer: 1, failure: PeerFailure::Corrupt }, SizeRejected { size: lie }, Begin { size }]
        );
        assert!(!d.fetch.is_size_proven());
        let reqs = requests(&d.local(&PieceSet::empty(5)));
        assert_eq!((reqs[0].0, reqs[0].2.clone()), (2, PieceSet::single(5, 4)));
        let proof = d.ok(reqs[0].0, reqs[0].1, &reqs[0].2);
        assert_eq!(d.serve_all(proof).last(), Some(&Complete));
    }

    #[test]
    fn a_corrupt_last_piece_from_one_of_several_claimants_keeps_the_size() {
        let size = size_of(5);
        let (mut d, actions) = started(size, config4(), &[(1, PieceSet::full(5)), (2, PieceSet::full(5))]);
        let (bad, id, _) = requests(&actions)[0].clone();
        let after = d.fail(bad, id, PeerFailure::Corrupt);
        assert_eq!(after[0], Penalise { peer: bad, failure: PeerFailure::Corrupt });
        assert!(!after.iter().any(|a| matches!(a, SizeRejected { .. } | Begin { .. })), "{after:?}");
        let reqs = requests(&after);
        assert_eq!(reqs.len(), 1);
        assert_ne!(reqs[0].0, bad);
        assert_eq!(reqs[0].2, PieceSet::single(5, 4));
    }

    #[test]
    fn a_claim_nobody_can_prove_any_more_is_abandoned_for_another() {
        let size = size_of(3);
        let lie = size_of(4);
        let config = FetchConfig { request_timeout: Duration::from_secs(1), ..config4() };
        let mut d = Driver::new(size, config);
        d.discover(&[1, 2]);
        d.fetch.handle_have(1, lie, PieceSet::full(4), ms(1), d.now);
        d.have(2, d.full());
        assert_eq!(d.drain(), vec![Begin { size: lie }], "the first claim wins a tie");
        let mut actions = d.local(&PieceSet::empty(4));
        // Peer 1 never answers: three timeouts drop it, and the claim nobody can prove goes with it.
        for round in 0..3 {
            let reqs = requests(&actions);
            assert_eq!(reqs.len(), 1, "round {round}: {actions:?}");
            assert_eq!(reqs[0].0, 1);
            actions = d.advance(Duration::from_secs(1));
            assert_eq!(actions[0], Cancel { peer: 1, id: reqs[0].1 });
            if round < 2 {
                assert!(requests(&actions).is_empty(), "backing off");
                actions = d.advance(MAX_RETRY_BACKOFF);
            }
        }
        assert_eq!(actions[1..], [SizeRejected { size: lie }, Begin { size }], "{actions:?}");
        assert!(!stats(&d.fetch, 1).penalised, "silence is not a lie");
        let reqs = requests(&d.local(&PieceSet::empty(3)));
        assert_eq!((reqs[0].0, reqs[0].2.clone()), (2, PieceSet::single(3, 2)));
    }

    #[test]
    fn peers_claiming_other_sizes_cost_their_runs_not_a_bitmap_of_the_size_claimed() {
        // Peer 1 claims the blob's size first; 31 others each claim a size near the largest
        // blob's, with every piece: a bitmap each would be 2 MiB, 62 MiB for the fetch.
        let size = size_of(5);
        let config = FetchConfig { max_peers: 32, ..config4() };
        let mut d = Driver::new(size, config);
        let liars: Vec<u32> = (2..33).collect();
        let mut named = vec![1];
        named.extend(&liars);
        d.discover(&named);
        d.have(1, d.full());
        for &liar in &liars {
            let lie = MAX_BLOB_SIZE - u64::from(liar) * PIECE_SIZE;
            let n = Geometry::new(lie).expect("in range").piece_count();
            d.fetch.handle_have(liar, lie, PieceSet::full(n), ms(1), d.now);
        }
        assert_eq!(d.drain(), vec![Begin { size }], "the first claim wins a tie");
        assert!(d.fetch.advert_bytes() < 64 * 1024, "{} bytes of adverts", d.fetch.advert_bytes());
        // The claim is rejected: the next one is counted from the runs kept, and its claimant
        // asked for its last piece.
        let reqs = requests(&d.local(&PieceSet::empty(5)));
        let none = PieceSet::empty(5);
        d.fetch.handle_response(1, reqs[0].1, &none, 1000, ms(5), Some(PeerFailure::Corrupt), d.now);
        let lie = MAX_BLOB_SIZE - 2 * PIECE_SIZE;
        let n = Geometry::new(lie).expect("in range").piece_count();
        assert_eq!(
            d.drain(),
            vec![Penalise { peer: 1, failure: PeerFailure::Corrupt }, SizeRejected { size }, Begin { size: lie }]
        );
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        assert_eq!((reqs[0].0, reqs[0].2.clone()), (2, PieceSet::single(n, n - 1)));
        assert!(d.fetch.advert_bytes() < 3 * 1024 * 1024, "one bitmap of the claim's size, runs for the rest");
    }

    #[test]
    fn an_advert_set_aside_past_the_wires_bound_keeps_its_last_piece() {
        let n = 3 * crate::wire::MAX_RUNS as u32;
        let scattered = set(n, (0..n).step_by(2).chain([n - 1]));
        let mut advert = Advert::new(size_of(n), scattered, 0, true);
        advert.set_aside();
        assert!(advert.can_prove(), "the claimant still proves its size");
        let kept = advert.count();
        assert_eq!(kept.ranges().count(), crate::wire::MAX_RUNS);
        assert!(kept.contains(0) && kept.contains(n - 1));
    }

    #[test]
    fn an_empty_blob_is_one_empty_piece() {
        let (mut d, actions) = started(0, config4(), &[(1, PieceSet::full(1))]);
        let reqs = requests(&actions);
        assert_eq!(reqs, vec![(1, RequestId(0), PieceSet::single(1, 0))]);
        let after = d.ok(1, RequestId(0), &PieceSet::single(1, 0));
        assert_eq!(after, vec![Complete]);
        let p = d.fetch.progress();
        assert_eq!((p.verified_pieces, p.verified_bytes, p.total_pieces, p.total_bytes), (1, 0, Some(1), Some(0)));
    }

    // ---- 2. have-maps ----

    #[test]
    fn at_most_max_peers_are_asked_and_dropped_ones_are_replaced_without_penalty() {
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(4), config);
        assert_eq!(d.discover(&[1, 2, 3, 4, 2, 1]), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        d.fetch.handle_have_failed(1, PeerFailure::NotFound, d.now);
        assert_eq!(d.drain(), vec![AskHave { peer: 3 }]);
        d.fetch.handle_have_failed(2, PeerFailure::Denied, d.now);
        assert_eq!(d.drain(), vec![AskHave { peer: 4 }]);
        for peer in [1, 2] {
            let s = stats(&d.fetch, peer);
            assert!(s.dropped && !s.penalised, "peer {peer}: {s:?}");
        }
        // A dropped peer named again by the DHT is not asked again.
        d.fetch.handle_providers([1, 2], d.now);
        assert_eq!(d.drain(), vec![]);
    }

    #[test]
    fn a_partial_holder_is_asked_only_for_what_it_advertises() {
        let n = 24;
        let partial = set(n, (0..5).chain(10..12).chain([n - 1]));
        let config = FetchConfig { endgame_copies: 3, ..config4() };
        let (mut d, actions) = started(size_of(n), config, &[(1, partial.clone()), (2, PieceSet::full(n))]);
        let all = d.serve_all(actions);
        let reqs = requests(&all);
        assert!(reqs.iter().any(|(p, _, _)| *p == 1), "the partial holder serves too");
        for (peer, _, pieces) in reqs {
            if peer == 1 {
                assert!(pieces.difference(&partial).is_empty(), "{pieces:?} not all advertised");
            }
        }
        assert_eq!(all.last(), Some(&Complete));
    }

    #[test]
    fn busy_on_have_asks_again_after_the_given_delay() {
        let mut d = Driver::new(size_of(4), config4());
        d.discover(&[1]);
        d.fetch.handle_have_failed(1, PeerFailure::Busy { retry_after: ms(2000) }, d.now);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.advance(ms(1999)), vec![]);
        assert_eq!(d.advance(ms(1)), vec![AskHave { peer: 1 }]);
        assert_eq!(stats(&d.fetch, 1).failures, 0, "busy is not a failure");
    }

    #[test]
    fn a_busy_wait_is_capped_and_the_cap_stretches_with_the_time_scale() {
        for (scale, cap) in [(1.0, MAX_BUSY_WAIT), (4.0, MAX_BUSY_WAIT * 4)] {
            let mut d = Driver::new(size_of(4), config4().stretched(scale));
            d.discover(&[1]);
            d.fetch.handle_have_failed(1, PeerFailure::Busy { retry_after: MAX_BUSY_WAIT * 10 }, d.now);
            assert_eq!(d.drain(), vec![]);
            assert_eq!(d.advance(cap - ms(1)), vec![], "time scale {scale}");
            assert_eq!(d.advance(ms(1)), vec![AskHave { peer: 1 }], "time scale {scale}");
        }
    }

    #[test]
    fn a_have_timeout_counts_as_a_failure_and_is_asked_again() {
        let config = config4();
        let mut d = Driver::new(size_of(4), config.clone());
        d.discover(&[1]);
        assert_eq!(d.advance(config.have_timeout - ms(1)), vec![]);
        assert_eq!(stats(&d.fetch, 1).failures, 0);
        assert_eq!(d.advance(ms(1)), vec![]);
        assert_eq!(stats(&d.fetch, 1).failures, 1);
        assert_eq!(d.advance(config.retry_base), vec![AskHave { peer: 1 }]);
        // A late answer to the first ask is still welcome.
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![Begin { size: size_of(4) }]);
        // Three silences in a row drop a peer, without a penalty.
        let mut d = Driver::new(size_of(4), config.clone());
        d.discover(&[1]);
        d.advance(config.have_timeout);
        d.advance(config.retry_base);
        d.advance(config.have_timeout);
        d.advance(config.retry_base * 2);
        d.now += config.have_timeout;
        d.fetch.handle_timeout(d.now);
        let s = stats(&d.fetch, 1);
        assert!(s.dropped && !s.penalised && s.failures == 3, "{s:?}");
        assert_eq!(d.drain_all(), vec![FindProviders], "nobody left: ask the DHT again at once");
        // The DHT names it again (a sole provider that restarted): not while it may still be
        // down, but once the longest back-off has passed, it is asked afresh.
        d.fetch.handle_providers([1], d.now);
        assert_eq!(d.drain(), vec![]);
        d.now += MAX_RETRY_BACKOFF - ms(1);
        d.fetch.handle_providers([1], d.now);
        assert_eq!(d.drain(), vec![]);
        d.now += ms(1);
        d.fetch.handle_providers([1], d.now);
        assert_eq!(d.drain(), vec![AskHave { peer: 1 }]);
        d.have(1, d.full());
        assert_eq!(d.drain(), vec![Begin { size: size_of(4) }]);
        // A peer dropped for lying never is.
        let mut d = Driver::new(size_of(4), config.clone());
        d.discover(&[1]);
        d.fetch.handle_have_failed(1, PeerFailure::Protocol, d.now);
        assert!(matches!(d.drain()[..], [Penalise { peer: 1, .. }, ..]));
        d.now += MAX_RETRY_BACKOFF * 10;
        d.fetch.handle_providers([1], d.now);
        assert!(!d.drain().contains(&AskHave { peer: 1 }));
    }

    /// A fetch of 8 pieces from peer 1, which held only the last piece and served it: it has
    /// nothing more, and is watched at once for every piece we lack.
    fn watching_a_holder_of_the_last_piece() -> (Driver, u32) {
        let n = 8;
        let (mut d, actions) = started(size_of(n), config4(), &[(1, set(n, [n - 1]))]);
        let (_, id, pieces) = requests(&actions)[0].clone();
        assert_eq!(d.ok(1, id, &pieces), vec![], "it has nothing more");
        assert_eq!(d.watches, vec![(1, set(n, 0..n - 1))], "watched at once for every piece we lack");
        (d, n)
    }

    #[test]
    fn a_partial_holder_with_nothing_new_is_watched_for_what_we_lack() {
        let (mut d, n) = watching_a_holder_of_the_last_piece();
        // The watch runs its whole wait without news: the next one goes out at once.
        assert_eq!(d.watches_run_out(), vec![]);
        assert_eq!(d.watches, vec![(1, set(n, 0..n - 1))]);
        // An answer as soon as it gains pieces we lack: they are asked for at once.
        d.now += ms(30);
        d.watches.clear();
        d.fetch.handle_watched(1, d.size, set(n, [0, 1, n - 1]), d.now);
        let reqs = requests(&d.drain());
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].2, set(n, [0, 1]));
    }

    #[test]
    fn a_watch_answered_early_without_news_waits_out_its_interval() {
        // A server short of room for watchers answers at once: no watch storm follows.
        let (mut d, n) = watching_a_holder_of_the_last_piece();
        let config = config4();
        let sent = d.now;
        d.watches.clear();
        d.now += ms(20);
        d.fetch.handle_watched(1, d.size, set(n, [n - 1]), d.now);
        assert_eq!(d.drain(), vec![]);
        assert!(d.watches.is_empty(), "no second watch before the interval ends");
        assert_eq!(d.fetch.poll_timeout(), Some(sent + config.have_refresh));
        d.now = sent + config.have_refresh;
        d.fetch.handle_timeout(d.now);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.watches, vec![(1, set(n, 0..n - 1))]);
    }

    #[test]
    fn a_peer_that_does_not_know_watches_is_asked_for_its_have_map_instead() {
        let (mut d, n) = watching_a_holder_of_the_last_piece();
        let config = config4();
        d.watches.clear();
        d.fetch.handle_watch_refused(1, d.now);
        assert_eq!(d.drain(), vec![]);
        assert!(d.watches.is_empty());
        assert!(!stats(&d.fetch, 1).penalised, "an older node is not blamed");
        assert_eq!(d.fetch.poll_timeout(), Some(d.now + config.have_refresh));
        assert_eq!(d.advance(config.have_refresh), vec![AskHave { peer: 1 }]);
        d.have(1, set(n, [n - 1]));
        assert_eq!(d.advance(config.have_refresh), vec![AskHave { peer: 1 }], "polled, never watched");
        assert!(d.watches.is_empty());
    }

    #[test]
    fn an_idle_peer_with_pieces_asked_of_others_is_watched_for_the_rest() {
        // Peer 2 holds piece 0, which is already asked of peer 1: it is idle, not stale, and is
        // watched for what neither it nor anyone advertises yet.
        let n = 4;
        let config = FetchConfig { request_target: None, pieces_per_request: 1, ..config4() };
        let (d, actions) = proven(size_of(n), config, &[(1, set(n, [0, n - 1])), (2, set(n, [0, n - 1]))]);
        let reqs = requests(&actions);
        assert_eq!(reqs.len(), 1, "{actions:?}");
        assert_eq!(reqs[0].2, set(n, [0]));
        let idle = if reqs[0].0 == 1 { 2 } else { 1 };
        assert!(d.watches.contains(&(idle, set(n, [1, 2]))), "{:?}", d.watches);
    }

    #[test]
    fn a_have_map_sent_with_an_answer_updates_the_peer_without_asking() {
        let n = 8;
        let (mut d, actions) = started(size_of(n), config4(), &[(1, set(n, [n - 1]))]);
        let (_, id, pieces) = requests(&actions)[0].clone();
        d.fetch.handle_response(1, id, &pieces, PIECE_SIZE, ms(50), None, d.now);
        // It gained pieces 2 and 3 meanwhile and says so with its answer: they are asked at once.
        d.fetch.handle_advert(1, set(n, [2, 3, n - 1]), d.now);
        let reqs = requests(&d.drain());
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].2, set(n, [2, 3]));
        // A map counted for another piece count is ignored; an empty one drops the peer.
        d.fetch.handle_advert(1, PieceSet::full(n + 1), d.now);
        assert!(!stats(&d.fetch, 1).dropped);
        d.fetch.handle_advert(1, PieceSet::empty(n), d.now);
        let s = stats(&d.fetch, 1);
        assert!(s.dropped && !s.penalised, "{s:?}");
    }

    #[test]
    fn partial_holders_with_nothing_new_give_their_slots_to_waiting_candidates() {
        // The swarm regression: every slot held by peers that hold only the last piece, and the one
        // full holder waiting in the candidate queue. Refreshing the partial holders forever would
        // never ask it, and the fetch would never complete.
        let n = 8;
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(n), config.clone());
        assert_eq!(d.discover(&[1, 2, 3]), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        d.have(1, set(n, [n - 1]));
        d.have(2, set(n, [n - 1]));
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        let (peer, id, pieces) = reqs[0].clone();
        assert_eq!(d.ok(peer, id, &pieces), vec![], "nobody holds anything else");
        assert!(d.fetch.is_size_proven());
        assert_eq!(d.watches.len(), 2, "both are watched");
        let asks = d.watches_run_out();
        assert!(asks.contains(&AskHave { peer: 3 }), "the waiting candidate gets a slot: {asks:?}");
        assert_eq!(asks.len(), 2, "one have request per slot given up, no more: {asks:?}");
        assert_eq!(d.fetch.progress().peers_active, 0, "the stale adverts were set aside");
        assert_eq!(d.fetch.peer_stats().filter(|(_, s)| !s.dropped).count(), 3, "nobody is dropped");
        d.have(3, d.full());
        let actions = d.drain();
        let all = d.serve_all(actions);
        assert!(requests(&all).iter().all(|(p, _, _)| *p == 3), "{all:?}");
        assert_eq!(all.last(), Some(&Complete));
    }

    /// A fetch of 8 pieces with two slots, the DHT naming `named`: peers 1 and 2 take the slots,
    /// hold only the last piece, and serve it; after that they have nothing new.
    fn slots_held_by_holders_of_the_last_piece(named: &[u32]) -> (Driver, FetchConfig, PieceSet) {
        let n = 8;
        let only_last = set(n, [n - 1]);
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(n), config.clone());
        assert_eq!(d.discover(named), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        d.have(1, only_last.clone());
        d.have(2, only_last.clone());
        d.drain();
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        let (peer, id, pieces) = reqs[0].clone();
        d.ok(peer, id, &pieces);
        (d, config, only_last)
    }

    #[test]
    fn with_every_slot_held_by_peers_with_nothing_new_the_dht_is_asked_again() {
        // Three peers holding only the last piece for two slots: they take turns, and only parked
        // peers wait in the queue, which must not stop the lookups for someone useful.
        let (mut d, config, only_last) = slots_held_by_holders_of_the_last_piece(&[1, 2, 3]);
        d.now += config.have_refresh;
        for (peer, _) in std::mem::take(&mut d.watches) {
            d.fetch.handle_watched(peer, d.size, only_last.clone(), d.now);
        }
        let actions = d.drain_all();
        assert_eq!(actions, vec![AskHave { peer: 3 }, FindProviders, AskHave { peer: 1 }], "peer 2 parked");
        d.have(3, only_last.clone());
        d.have(1, only_last.clone());
        d.fetch.handle_providers([4, 2], d.now);
        d.fetch.handle_providers_done(d.now);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.watches.len(), 2, "{:?}", d.watches);
        let asks = d.watches_run_out();
        assert_eq!(asks[0], AskHave { peer: 4 }, "a new name goes before a parked peer: {asks:?}");
        d.have(4, d.full());
        let actions = d.drain();
        let all = d.serve_all(actions);
        assert_eq!(all.last(), Some(&Complete));
    }

    // ---- 3. ranking ----

    #[test]
    fn the_nearest_peer_goes_first_then_the_fastest() {
        let n = 40;
        let mut d = Driver::new(size_of(n), config4());
        d.discover(&[1, 2, 3]);
        for (peer, rtt) in [(1, 50), (2, 10), (3, 30)] {
            d.have_rtt(peer, PieceSet::full(n), ms(rtt));
        }
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        assert_eq!(reqs[0].0, 2, "no throughput measured yet: the shortest round trip first");
        // Peer 2 turns out slow: 256 KiB in 10 s.
        let (peer, id, pieces) = reqs[0].clone();
        d.fetch.handle_response(peer, id, &pieces, PIECE_SIZE, Duration::from_secs(10), None, d.now);
        let reqs = requests(&d.drain());
        let order: Vec<u32> = reqs.iter().map(|(p, _, _)| *p).collect();
        assert_eq!(order[..2], [3, 1], "measured slowness outweighs a short round trip: {order:?}");
        assert!(order.contains(&2), "the slow peer still works in parallel");
    }

    #[test]
    fn the_rarest_pieces_go_first() {
        let n = 8;
        let config = FetchConfig { pieces_per_request: 1, ..config4() };
        let common = set(n, [0, 1, 2, 4, 5, 7]);
        let mut d = Driver::new(size_of(n), config);
        d.discover(&[1, 2, 3]);
        d.have_rtt(1, PieceSet::full(n), ms(1));
        d.have_rtt(2, common.clone(), ms(50));
        d.have_rtt(3, common, ms(50));
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        let (peer, id, pieces) = reqs[0].clone();
        assert_eq!(peer, 1);
        let reqs = requests(&d.ok(peer, id, &pieces));
        let from_1: Vec<u32> = reqs.iter().filter(|(p, _, _)| *p == 1).flat_map(|(_, _, s)| s.iter()).collect();
        assert!(from_1.len() >= 2, "{reqs:?}");
        let mut first_two = from_1[..2].to_vec();
        first_two.sort_unstable();
        assert_eq!(first_two, [3, 6], "pieces only peer 1 holds go first: {from_1:?}");
    }

    #[test]
    fn a_readers_next_pieces_go_first_in_order_and_the_rest_rarest_first() {
        let n = 64;
        let config = FetchConfig { max_requests_per_peer: 6, ..config4() };
        let mut d = Driver::new(size_of(n), config);
        d.fetch.set_reading([40..40 + READ_AHEAD, 1000..1016]);
        d.discover(&[1, 2]);
        d.have(1, PieceSet::full(n));
        d.have_rtt(2, set(n, (0..32).chain([63])), ms(50));
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        assert_eq!(reqs.len(), 1, "the last piece alone proves the size first: {reqs:?}");
        let (peer, id, pieces) = reqs[0].clone();
        let reqs = requests(&d.ok(peer, id, &pieces));
        // Peer 1 alone holds the reader's pieces: it is asked for them in order, up to the read-ahead
        // (no further back than the reader), and then for the pieces only it holds.
        let from_1: Vec<PieceSet> = reqs.iter().filter(|(p, _, _)| *p == 1).map(|(_, _, s)| s.clone()).collect();
        let ahead: Vec<PieceSet> = (0..4).map(|k| set(n, 40 + 4 * k..44 + 4 * k)).collect();
        assert_eq!(from_1[..4], ahead, "{reqs:?}");
        assert!(from_1[4..].iter().flat_map(PieceSet::iter).all(|i| i >= 32), "the rarest next: {reqs:?}");
        // A reader that moved is served from its new place on, from the best-ranked holder.
        d.fetch.set_reading(std::iter::once(8..10));
        let (_, id, pieces) = reqs.iter().find(|(p, _, _)| *p == 1).cloned().expect("a request to peer 1");
        let next = requests(&d.ok(1, id, &pieces));
        assert_eq!(next.first().map(|(_, _, s)| s.ranges().next()), Some(Some(8..12)), "{next:?}");
    }

    #[test]
    fn a_late_request_for_the_piece_a_reader_waits_for_is_duplicated_to_an_idle_peer() {
        // More pieces than the requests in flight hold: not the end game.
        let n = 64;
        let mut d = Driver::new(size_of(n), config4());
        d.fetch.set_reading(std::iter::once(5..n));
        d.discover(&[1, 2, 3]);
        d.have_rtt(1, PieceSet::full(n), ms(1));
        d.have_rtt(2, PieceSet::full(n), ms(1));
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let reqs = requests(&d.local(&PieceSet::empty(n)));
        let (peer, id, pieces) = reqs[0].clone();
        let reqs = requests(&d.ok(peer, id, &pieces));
        assert!(reqs.iter().any(|(_, _, s)| s.ranges().next() == Some(5..9)), "the reader's pieces first: {reqs:?}");
        // Peer 3 answers now: it holds only the piece the reader waits for, already asked of another.
        d.have_rtt(3, set(n, [5]), ms(1));
        assert!(requests(&d.drain()).is_empty());
        // On schedule, nothing is duplicated; once late, peer 3 is asked for the piece the reader
        // waits for, and for nothing else.
        assert!(requests(&d.advance(ms(1))).is_empty());
        let late = requests(&d.advance(Duration::from_secs(5)));
        let late: Vec<(u32, PieceSet)> = late.into_iter().filter(|(p, _, _)| *p == 3).map(|(p, _, s)| (p, s)).collect();
        assert_eq!(late, vec![(3, PieceSet::single(n, 5))]);
    }

    #[test]
    fn requests_are_contiguous_runs_starting_where_the_seed_says() {
        let n = 64;
        let mut starts = BTreeSet::new();
        for seed in 0..8 {
            let mut d = Driver::with_seed(size_of(n), config4(), seed);
            d.discover(&[1]);
            d.have(1, PieceSet::full(n));
            d.drain();
            let (_, id, pieces) = requests(&d.local(&PieceSet::empty(n)))[0].clone();
            let proof = d.ok(1, id, &pieces);
            let all = d.serve_all(proof);
            let reqs = requests(&all);
            for (_, _, pieces) in &reqs {
                assert_eq!(pieces.ranges().count(), 1, "{pieces:?} is not one run");
                assert!(pieces.count() <= 4);
            }
            starts.insert(reqs[0].2.iter().next());
        }
        assert!(starts.len() > 4, "different seeds start in different places: {starts:?}");
    }

    #[test]
    fn with_a_request_target_requests_fit_the_peers_measured_throughput() {
        let n = 64;
        let config = FetchConfig { request_target: Some(Duration::from_secs(2)), ..config4() };
        let mut d = Driver::new(size_of(n), config);
        d.discover(&[1]);
        d.have(1, PieceSet::full(n));
        d.drain();
        // The size proof comes slowly: 256 KiB in 4 s, so 2 s fits half a piece, and every
        // request is one piece.
        let (peer, id, proof) = requests(&d.local(&PieceSet::empty(n)))[0].clone();
        d.fetch.handle_response(peer, id, &proof, PIECE_SIZE, Duration::from_secs(4), None, d.now);
        let first = requests(&d.drain());
        assert!(!first.is_empty() && first.iter().all(|(_, _, p)| p.count() == 1), "slow: {first:?}");
        let next = Vec::new();
        // Fast now: full-size requests again.
        for (peer, id, pieces) in first[1..].iter().chain(&next) {
            d.fetch.handle_response(*peer, *id, pieces, PIECE_SIZE, Duration::from_millis(10), None, d.now);
        }
        let fast = requests(&d.drain());
        assert!(fast.iter().any(|(_, _, p)| p.count() == 4), "{fast:?}");
    }

    #[test]
    fn with_a_request_target_a_peer_not_yet_measured_gets_one_request_at_a_time() {
        let n = 64;
        let config = FetchConfig { request_target: Some(Duration::from_secs(2)), ..config4() };
        let peers: Vec<(u32, PieceSet)> = (1..4).map(|p| (p, PieceSet::full(n))).collect();
        let (mut d, after) = started(size_of(n), config, &peers);
        // The size proof's answer measures its peer, which then gets a full window.
        let (prover, id, pieces) = requests(&after)[0].clone();
        let reqs = requests(&d.ok(prover, id, &pieces));
        for peer in 1..4 {
            let sent = reqs.iter().filter(|(p, _, _)| *p == peer).count();
            assert_eq!(sent, if peer == prover { 4 } else { 1 }, "peer {peer}: {reqs:?}");
        }
        assert_eq!(d.drain(), vec![], "the others are not measured yet");
        // An answer measures a peer: then it too gets a full window.
        let (peer, id, pieces) = reqs.iter().find(|(p, _, _)| *p != prover).cloned().expect("another peer");
        let next = requests(&d.ok(peer, id, &pieces));
        assert_eq!(next.len(), 4, "{next:?}");
        assert!(next.iter().all(|(p, _, _)| *p == peer));
        assert_eq!(stats(&d.fetch, peer).requests_in_flight, 4);
    }

    #[test]
    fn the_same_seed_and_inputs_give_the_same_actions() {
        let run = |seed| {
            let n = 50;
            let mut d = Driver::with_seed(size_of(n), config4(), seed);
            d.discover(&[1, 2, 3, 4]);
            for peer in 1..5 {
                d.have(peer, PieceSet::full(n));
            }
            d.drain();
            let first = d.local(&PieceSet::empty(n));
            d.serve_all(first)
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    // ---- 4. parallel ----

    #[test]
    fn several_peers_in_parallel_at_most_max_requests_each() {
        let n = 64;
        let peers: Vec<(u32, PieceSet)> = (1..4).map(|p| (p, PieceSet::full(n))).collect();
        let (mut d, after) = proven(size_of(n), config4(), &peers);
        let reqs = requests(&after);
        assert_eq!(reqs.len(), 12, "{after:?}");
        for peer in 1..4 {
            assert_eq!(reqs.iter().filter(|(p, _, _)| *p == peer).count(), 4, "peer {peer}");
            assert_eq!(stats(&d.fetch, peer).requests_in_flight, 4);
        }
        assert_eq!(d.drain(), vec![], "every peer is at its bound");
        assert_eq!(d.fetch.progress().requests_in_flight, 12);
        // One answer frees one slot, which is filled at once.
        let (peer, id, pieces) = reqs[0].clone();
        let next = requests(&d.ok(peer, id, &pieces));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0, peer);
    }

    // ---- 5. end-game ----

    #[test]
    fn end_game_duplicates_the_tail_and_cancels_the_loser() {
        let n = 9;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let reqs = requests(&after);
        assert_eq!(reqs.len(), 2, "{after:?}");
        let (fast, mut fast_id, mut fast_pieces) = reqs[0].clone();
        let (slow, slow_id, slow_pieces) = reqs[1].clone();
        // The fast peer answers everything; once every missing piece is in flight it duplicates
        // the slow peer's request.
        let dup = loop {
            let mut next = requests(&d.ok(fast, fast_id, &fast_pieces));
            if next.is_empty() {
                // Every missing piece is in flight, but the slow request is not late yet: the
                // fetch wakes when it is.
                let late = d.fetch.poll_timeout().expect("a timer for the slow request");
                next = requests(&d.advance(late - d.now));
            }
            assert_eq!(next.len(), 1, "the fast peer stays busy");
            let (peer, id, pieces) = next[0].clone();
            assert_eq!(peer, fast);
            if !pieces.intersection(&slow_pieces).is_empty() {
                break (id, pieces);
            }
            (fast_id, fast_pieces) = (id, pieces);
        };
        assert_eq!(dup.1, slow_pieces, "the duplicate covers the slow request");
        let verified = d.fetch.verified().expect("begun").clone();
        assert_eq!(verified.count() + slow_pieces.count(), n, "end-game only once nothing else is missing");
        assert_eq!(d.drain(), vec![], "at most endgame_copies requests per piece");
        // The duplicate wins: the original is cancelled, then the fetch completes.
        assert_eq!(d.ok(fast, dup.0, &dup.1), vec![Cancel { peer: slow, id: slow_id }, Complete]);
        // The loser's late answer is ignored.
        d.ok(slow, slow_id, &slow_pieces);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.fetch.poll_timeout(), None);
    }

    #[test]
    fn in_the_end_game_a_duplicate_takes_the_piece_a_reader_waits_for_first() {
        let n = 9;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let reqs = requests(&after);
        assert_eq!(reqs.len(), 2, "{after:?}");
        // A reader waits for the last piece of the later request. A duplicate holds four pieces
        // at most, and the earlier request's four would fill it.
        let waited = reqs[1].2.iter().last().expect("a piece");
        d.fetch.set_reading(std::iter::once(waited..n));
        d.fetch.handle_providers([3], d.now);
        assert_eq!(d.drain(), vec![AskHave { peer: 3 }]);
        d.have(3, PieceSet::full(n));
        // Peer 3 is sent the pieces nobody was asked for, and answers once the requests of peers
        // 1 and 2, every other missing piece, are both late.
        let first = requests(&d.drain());
        assert_eq!(first.len(), 1, "{first:?}");
        let (peer, id, pieces) = first[0].clone();
        assert_eq!(peer, 3);
        assert!(requests(&d.advance(Duration::from_secs(5))).is_empty(), "no peer is idle");
        let dup = requests(&d.ok(peer, id, &pieces));
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert_eq!((dup[0].0, dup[0].2.count()), (3, 4), "{dup:?}");
        assert!(dup[0].2.contains(waited), "the reader's piece is among them: {dup:?}");
    }

    #[test]
    fn end_game_copies_a_piece_again_once_every_request_for_it_is_late() {
        // Peer 2 goes silent (its process crashed) with the last pieces in flight, and so does
        // each peer that takes them over: one more copy goes to an idle peer each time every
        // copy is late, up to twice `endgame_copies` (2) in all.
        let n = 17;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        // Both answer a first request, so both are measured; then every missing piece is in
        // flight, four to each.
        let mut reqs = Vec::new();
        for (peer, id, pieces) in requests(&after) {
            reqs.extend(requests(&d.ok(peer, id, &pieces)));
        }
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        let (a, a_id, a_pieces) = reqs[0].clone();
        let (b, b_id, b_pieces) = reqs[1].clone();
        assert_eq!(d.ok(a, a_id, &a_pieces), vec![], "b's request is on schedule");
        let mut copies = vec![(b, b_id)];
        let late = d.fetch.poll_timeout().expect("a timer for b's request");
        let dup = requests(&d.advance(late - d.now));
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert_eq!((dup[0].0, &dup[0].2), (a, &b_pieces));
        copies.push((a, dup[0].1));
        for idle in [3, 4, 5] {
            d.fetch.handle_providers([idle], d.now);
            assert_eq!(d.drain(), vec![AskHave { peer: idle }]);
            d.have(idle, PieceSet::full(n));
        }
        assert_eq!(d.drain(), vec![], "a's copy is on schedule: two requests for a piece are enough");
        for _ in 0..2 {
            let late = d.fetch.poll_timeout().expect("a timer for the newest copy");
            let next = requests(&d.advance(late - d.now));
            assert_eq!(next.len(), 1, "{next:?}");
            let (peer, id, pieces) = next[0].clone();
            assert!((3..=5).contains(&peer) && copies.iter().all(|(p, _)| *p != peer), "{next:?}");
            assert_eq!(pieces, b_pieces);
            copies.push((peer, id));
            assert_eq!(d.drain(), vec![], "one copy on schedule at a time");
        }
        // Four copies, all late: the third idle peer stays idle.
        let late = d.fetch.poll_timeout().expect("a timer for the last copy");
        assert!(requests(&d.advance(late - d.now)).is_empty(), "twice endgame_copies in all");
        let (winner, id) = copies.pop().expect("a copy");
        let done = d.ok(winner, id, &b_pieces);
        for (peer, id) in copies {
            assert!(done.contains(&Cancel { peer, id }), "{done:?}");
        }
        assert_eq!(done.last(), Some(&Complete), "{done:?}");
    }

    #[test]
    fn end_game_requests_sent_before_any_peer_was_measured_keep_to_endgame_copies() {
        // The size came proven with a have-map, so every piece goes out before any peer was
        // measured: late from the start, such requests are copied once, never more.
        let n = 8;
        let size = size_of(n);
        let mut d = Driver::new(size, FetchConfig { max_requests_per_peer: 1, ..config4() });
        d.discover(&[1, 2, 3, 4, 5]);
        d.fetch.handle_size_proof(size, d.now);
        for peer in 1..=5 {
            d.have(peer, d.full());
        }
        assert_eq!(d.drain(), vec![Begin { size }]);
        let mut reqs = requests(&d.local(&PieceSet::empty(n)));
        reqs.extend(requests(&d.advance(Duration::from_secs(5))));
        let mut copies = vec![0; n as usize];
        for (_, _, pieces) in &reqs {
            for i in pieces.iter() {
                copies[i as usize] += 1;
            }
        }
        assert!(copies.iter().all(|&c| (1..=2).contains(&c)), "{copies:?}: {reqs:?}");
        assert!(copies.contains(&2), "the end game copied: {reqs:?}");
    }

    #[test]
    fn end_game_leaves_a_request_on_schedule_alone() {
        let n = 17;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        // Both peers answer a request in 50 ms, so both are measured; then every missing piece is
        // in flight, four to each.
        let first = requests(&after);
        assert_eq!(first.len(), 2, "{first:?}");
        let mut reqs = Vec::new();
        for (peer, id, pieces) in first {
            reqs.extend(requests(&d.ok(peer, id, &pieces)));
        }
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        let (a, a_id, a_pieces) = reqs[0].clone();
        let (b, b_id, b_pieces) = reqs[1].clone();
        assert_eq!(d.fetch.verified().map(PieceSet::count), Some(n - 8));
        // `a` answers at once and is idle: `b`'s request is on schedule, so nothing is duplicated.
        assert_eq!(d.ok(a, a_id, &a_pieces), vec![]);
        // It is due after its size at `b`'s measured throughput; past that it is late and `a`
        // duplicates it.
        let throughput = d.fetch.peer_stats().find(|(p, _)| *p == b).and_then(|(_, s)| s.throughput).expect("measured");
        let on_schedule = Duration::from_secs_f64(LATE_FACTOR * (4 * PIECE_SIZE) as f64 / throughput);
        let due = d.fetch.poll_timeout().expect("a timer for the request on schedule");
        assert!((due - d.now).abs_diff(on_schedule) < ms(1), "{:?} against {on_schedule:?}", due - d.now);
        assert_eq!(d.advance(due - d.now - ms(1)), vec![]);
        let dup = requests(&d.advance(ms(1)));
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert_eq!((dup[0].0, &dup[0].2), (a, &b_pieces));
        assert_eq!(d.ok(a, dup[0].1, &b_pieces), vec![Cancel { peer: b, id: b_id }, Complete]);
    }

    // ---- 6. failures ----

    #[test]
    fn corrupt_data_drops_and_penalises_the_peer_and_keeps_what_verified() {
        let n = 20;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let reqs = requests(&after);
        let (bad, id, pieces) = reqs.iter().find(|(_, _, p)| p.count() > 1).cloned().expect("a multi-piece request");
        let first = pieces.iter().next().expect("not empty");
        let good = PieceSet::single(n, first);
        d.fetch.handle_response(bad, id, &good, PIECE_SIZE + 10, ms(30), Some(PeerFailure::Corrupt), d.now);
        let actions = d.drain();
        assert_eq!(actions[0], Penalise { peer: bad, failure: PeerFailure::Corrupt });
        let cancelled: Vec<RequestId> =
            actions.iter().filter_map(|a| if let Cancel { id, .. } = a { Some(*id) } else { None }).collect();
        let others: Vec<RequestId> =
            reqs.iter().filter(|(p, i, _)| *p == bad && *i != id).map(|(_, i, _)| *i).collect();
        assert_eq!(cancelled, others, "its other requests are cancelled");
        assert!(d.fetch.verified().expect("begun").contains(first), "what verified before the bad bytes is kept");
        let mut pending: Vec<Action<u32>> =
            after.into_iter().filter(|a| matches!(a, Action::Request { peer, .. } if *peer != bad)).collect();
        pending.extend(actions);
        let all = d.serve_all(pending);
        assert!(requests(&all).iter().all(|(p, _, _)| *p != bad));
        assert_eq!(all.last(), Some(&Complete));
        assert!(stats(&d.fetch, bad).dropped);
    }

    #[test]
    fn transient_failures_back_off_and_drop_after_max_failures_without_penalty() {
        let n = 40;
        let config = config4();
        let (mut d, after) = proven(size_of(n), config.clone(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let from =
            |actions: &[Action<u32>], peer| requests(actions).into_iter().filter(|r| r.0 == peer).collect::<Vec<_>>();
        let mut mine = from(&after, 1);
        let mut wait = config.retry_base;
        for (round, failure) in [PeerFailure::Io, PeerFailure::Truncated, PeerFailure::Timeout].into_iter().enumerate()
        {
            let (_, id, pieces) = mine.pop().expect("a request to peer 1");
            let actions = d.fail(1, id, failure);
            let s = stats(&d.fetch, 1);
            assert_eq!(s.failures, round as u32 + 1);
            assert!(!actions.iter().any(|a| matches!(a, Penalise { .. })), "{failure:?}");
            if round == 2 {
                assert!(s.dropped, "dropped after {} failures", config.max_peer_failures);
                break;
            }
            // Its pieces go back to the pool, and to peer 2 when it has a free slot.
            assert!(from(&actions, 1).is_empty(), "peer 1 backs off");
            let (_, id2, p2) = from(&after, 2)[round].clone();
            let refill = d.ok(2, id2, &p2);
            assert!(from(&refill, 2).iter().any(|(_, _, p)| p.intersection(&pieces) == pieces), "{refill:?}");
            assert_eq!(d.advance(wait - ms(1)), vec![]);
            let resumed = d.advance(ms(1));
            assert!(!from(&resumed, 1).is_empty(), "back-off over after {wait:?}");
            wait *= 2;
            mine.extend(from(&resumed, 1));
        }
    }

    #[test]
    fn a_success_resets_the_count_of_failures_in_a_row() {
        let n = 40;
        let config = FetchConfig { max_peer_failures: 2, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n))]);
        let reqs = requests(&after);
        d.fail(1, reqs[0].1, PeerFailure::Io);
        d.ok(1, reqs[1].1, &reqs[1].2);
        d.fail(1, reqs[2].1, PeerFailure::Io);
        let s = stats(&d.fetch, 1);
        assert!(!s.dropped && s.failures == 2, "{s:?}");
    }

    #[test]
    fn busy_backs_off_for_the_given_delay_without_counting_a_failure() {
        let n = 20;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n))]);
        let reqs = requests(&after);
        let actions = d.fail(1, reqs[0].1, PeerFailure::Busy { retry_after: ms(500) });
        assert_eq!(actions, vec![]);
        assert_eq!(stats(&d.fetch, 1).failures, 0);
        for (_, id, pieces) in &reqs[1..] {
            assert!(requests(&d.ok(1, *id, pieces)).is_empty(), "no new request while busy");
        }
        assert_eq!(d.advance(ms(499)), vec![]);
        assert!(!requests(&d.advance(ms(1))).is_empty());
    }

    #[test]
    fn not_found_on_a_get_prunes_the_have_map_and_asks_it_again() {
        let n = 12;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, after) = proven(size_of(n), config, &[(1, PieceSet::full(n))]);
        let (_, id, stale) = requests(&after)[0].clone();
        let mut actions = d.fail(1, id, PeerFailure::NotFound);
        // Asked again after a pause: a peer that names pieces and has none does not keep us
        // asking back to back.
        assert!(!actions.contains(&AskHave { peer: 1 }), "{actions:?}");
        let pause = d.fetch.config.retry_base;
        actions.extend(d.advance(pause - ms(1)));
        assert!(!actions.contains(&AskHave { peer: 1 }), "{actions:?}");
        actions.extend(d.advance(ms(1)));
        assert!(actions.contains(&AskHave { peer: 1 }), "{actions:?}");
        for (_, _, pieces) in requests(&actions) {
            assert!(pieces.intersection(&stale).is_empty(), "stale pieces asked again: {pieces:?}");
        }
        assert!(!stats(&d.fetch, 1).dropped);
        // A peer that ends up advertising nothing is dropped, without a penalty.
        let mut d = Driver::new(size_of(n), config4());
        d.discover(&[1, 2]);
        d.have_rtt(1, set(n, [n - 1]), ms(1));
        d.have_rtt(2, PieceSet::full(n), ms(50));
        d.drain();
        let (peer, id, _) = requests(&d.local(&PieceSet::empty(n)))[0].clone();
        assert_eq!(peer, 1, "the nearest peer proves the size");
        let after = d.fail(1, id, PeerFailure::NotFound);
        let s = stats(&d.fetch, 1);
        assert!(s.dropped && !s.penalised, "{s:?}");
        assert_eq!(requests(&after)[0].0, 2);
    }

    #[test]
    fn a_peer_that_keeps_advertising_pieces_it_does_not_send_is_dropped() {
        let n = 40;
        for per_peer in [1, 4] {
            let config = FetchConfig { max_requests_per_peer: per_peer, ..config4() };
            // `NotFound` to every request, or answers with none of the pieces asked and a fresh
            // have-map naming every piece again; asked what it holds, it names every piece
            // again. Peer 2, an honest holder, never answers here.
            for failure in [Some(PeerFailure::NotFound), None] {
                let case = format!("{failure:?}, {per_peer} requests at a time");
                let peers = [(1, PieceSet::full(n)), (2, PieceSet::full(n))];
                let (mut d, mut actions) = proven(size_of(n), config.clone(), &peers);
                // Have-maps whose pieces were then not sent, in a row; whether the map in use came
                // since the last answer.
                let (mut empty, mut served, mut fresh) = (0, false, true);
                // Maps answered with nothing, all told, and the answers the fetch said proved one.
                let (mut unserved_maps, mut said_stale) = (0, 0);
                for step in 0.. {
                    assert!(step < 200, "{case}: still asked after {empty} maps answered with nothing");
                    if stats(&d.fetch, 1).dropped {
                        break;
                    }
                    // No request to peer 1 goes out beside an `AskHave` to it (after a counted
                    // answer it waits for a map), so a have answered here precedes the batch.
                    let mut next = Vec::new();
                    if actions.contains(&AskHave { peer: 1 }) {
                        d.have(1, PieceSet::full(n));
                        fresh = true;
                        next.extend(d.drain());
                    }
                    let batch: Vec<_> = requests(&actions).into_iter().filter(|r| r.0 == 1).collect();
                    if !batch.is_empty() {
                        // Once, a piece each: the peer was stale, not lying, and starts afresh.
                        let serve = empty == 2 && !served;
                        for (_, id, pieces) in batch {
                            let (verified, bytes, failure) = match serve {
                                true => (set(n, pieces.iter().take(1)), PIECE_SIZE, None),
                                false => (PieceSet::empty(n), 0, failure),
                            };
                            let stale = d.fetch.handle_response(1, id, &verified, bytes, ms(50), failure, d.now);
                            said_stale += u32::from(stale);
                            if failure.is_none() {
                                // As the node does: less the pieces just not sent.
                                d.fetch.handle_advert(1, PieceSet::full(n).difference(&pieces), d.now);
                            }
                            next.extend(d.drain());
                        }
                        match serve {
                            true => (empty, served) = (0, true),
                            false => {
                                empty += u32::from(fresh);
                                unserved_maps += u32::from(fresh);
                            }
                        }
                        fresh = serve || failure.is_none();
                    } else if next.is_empty() {
                        if d.watches.iter().any(|(p, _)| *p == 1) {
                            d.watches.retain(|(p, _)| *p != 1);
                            d.fetch.handle_watched(1, d.size, PieceSet::full(n), d.now);
                            fresh = true;
                            next = d.drain();
                        } else {
                            next = d.advance(config.retry_base);
                        }
                    }
                    actions = next;
                }
                assert!(served, "{case}: dropped before it served a piece");
                assert_eq!(empty, config.max_peer_failures, "{case}: maps answered with nothing in a row");
                assert!(!stats(&d.fetch, 1).penalised, "{case}: a stale peer is no liar");
                // The node counts what the fetch says: once per map, not per answer.
                assert_eq!(said_stale, unserved_maps, "{case}: answers said to prove a map stale");
            }
        }
    }

    #[test]
    fn a_peer_whose_map_proved_stale_is_asked_for_no_piece_until_its_next_map() {
        let n = 40;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let (_, id, _) = requests(&after).into_iter().find(|r| r.0 == 1).expect("a request to peer 1");
        let mut actions = d.fail(1, id, PeerFailure::NotFound);
        // Asked for its map, it answers `Busy` each time: it is asked for no piece meanwhile.
        for _ in 0..20 {
            if actions.contains(&AskHave { peer: 1 }) {
                d.fetch.handle_have_failed(1, PeerFailure::Busy { retry_after: ms(250) }, d.now);
            }
            assert!(requests(&actions).iter().all(|r| r.0 != 1), "{actions:?}");
            actions.extend(d.drain());
            assert!(requests(&actions).iter().all(|r| r.0 != 1), "{actions:?}");
            actions = d.advance(ms(250));
        }
        // Its next map brings it back.
        d.have(1, PieceSet::full(n));
        let mut actions = d.drain();
        actions.extend(d.advance(ms(250)));
        assert!(requests(&actions).iter().any(|r| r.0 == 1), "{actions:?}");

        // So does a piece sent for a request made before: it sends what it named.
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let reqs: Vec<_> = requests(&after).into_iter().filter(|r| r.0 == 1).collect();
        assert!(reqs.len() >= 2, "{after:?}");
        d.fail(1, reqs[0].1, PeerFailure::NotFound);
        let actions = d.ok(1, reqs[1].1, &reqs[1].2);
        assert!(requests(&actions).iter().any(|r| r.0 == 1), "{actions:?}");
    }

    #[test]
    fn a_peer_the_node_refuses_to_ask_is_dropped_and_its_requests_cancelled() {
        let n = 12;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let ids: Vec<RequestId> = requests(&after).into_iter().filter(|r| r.0 == 1).map(|r| r.1).collect();
        assert!(!ids.is_empty(), "{after:?}");
        d.fetch.handle_refused(1, d.now);
        let actions = d.drain();
        for id in ids {
            assert!(actions.contains(&Cancel { peer: 1, id }), "{actions:?}");
        }
        let s = stats(&d.fetch, 1);
        assert!(s.dropped && !s.penalised, "{s:?}");
        assert!(requests(&actions).iter().all(|r| r.0 == 2), "{actions:?}");
    }

    #[test]
    fn a_request_timeout_cancels_it_and_counts_one_failure_per_incident() {
        let n = 40;
        let config = config4();
        let (mut d, after) = proven(size_of(n), config.clone(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let start = d.now;
        let reqs = requests(&after);
        let silent: Vec<(u32, RequestId, PieceSet)> = reqs.iter().filter(|r| r.0 == 1).cloned().collect();
        assert_eq!(silent.len(), 4);
        // Peer 2 answers half-way through; its next requests time out later.
        d.now += config.request_timeout / 2;
        for (_, id, pieces) in reqs.iter().filter(|r| r.0 == 2) {
            d.ok(2, *id, pieces);
        }
        assert_eq!(d.advance(config.request_timeout / 2 - ms(1)), vec![], "nothing times out early");
        let actions = d.advance(ms(1));
        assert_eq!(d.now - start, config.request_timeout);
        let cancels: Vec<Action<u32>> = silent.iter().map(|(peer, id, _)| Cancel { peer: *peer, id: *id }).collect();
        assert_eq!(actions[..4], cancels, "each timed-out request is cancelled");
        let s = stats(&d.fetch, 1);
        assert_eq!((s.failures, s.dropped, s.requests_in_flight), (1, false, 0), "four timeouts, one incident");
        // Their pieces go back to the pool at once: to peer 2's free slots now, to peer 1 after
        // its back-off.
        let mut again = requests(&actions[4..]);
        assert!(again.iter().all(|r| r.0 == 2), "{actions:?}");
        again.extend(requests(&d.advance(config.retry_base)));
        let mut lost = PieceSet::empty(n);
        silent.iter().for_each(|(_, _, p)| lost.union_with(p));
        let mut reasked = PieceSet::empty(n);
        again.iter().for_each(|(_, _, p)| reasked.union_with(p));
        assert!(lost.difference(&reasked).is_empty(), "{again:?}");
        assert!(again.iter().any(|r| r.0 == 1), "peer 1 serves again after its back-off: {again:?}");
    }

    // ---- 7. resume ----

    #[test]
    fn requests_wait_for_the_store_and_never_ask_for_local_pieces() {
        let n = 16;
        let size = size_of(n);
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2]);
        d.have(1, PieceSet::full(n));
        d.have(2, PieceSet::full(n));
        assert_eq!(d.drain(), vec![Begin { size }]);
        assert_eq!(d.drain(), vec![], "nothing is requested before the store answers");
        let local = set(n, (0..6).chain([9, n - 1]));
        let actions = d.local(&local);
        assert!(d.fetch.is_size_proven(), "the store holds the last piece");
        let all = d.serve_all(actions);
        for (_, _, pieces) in requests(&all) {
            assert!(pieces.intersection(&local).is_empty(), "{pieces:?} is already local");
        }
        assert_eq!(all.last(), Some(&Complete));
        // A store that holds everything completes without a request.
        let mut d = Driver::new(size, config4());
        d.discover(&[1]);
        d.have(1, PieceSet::full(n));
        d.drain();
        assert_eq!(d.local(&PieceSet::full(n)), vec![Complete]);
    }

    // ---- 8. providers and the deadline ----

    #[test]
    fn providers_are_asked_again_with_a_doubling_back_off_and_never_fail_without_a_deadline() {
        assert_eq!(lookup_gaps(config4())[..8], [1, 2, 4, 8, 16, 30, 30, 30]);
        let capped = FetchConfig { providers_backoff_max: Duration::from_secs(4), ..config4() };
        assert_eq!(lookup_gaps(capped)[..6], [1, 2, 4, 4, 4, 4], "the cap holds");
        // Stretched, the machine's own bound on the cap stretches too: an emulator running at a
        // tenth of real speed looks up as often per emulated second as a real node per second.
        let slow = FetchConfig { providers_backoff_max: Duration::from_secs(4), ..config4() }.stretched(10.0);
        assert_eq!(lookup_gaps(slow)[..6], [10, 20, 40, 40, 40, 40]);
        assert_eq!(lookup_gaps(config4().stretched(10.0))[..7], [10, 20, 40, 80, 160, 300, 300]);
    }

    /// Seconds between lookups over an hour in which the DHT names nobody.
    fn lookup_gaps(config: FetchConfig) -> Vec<u64> {
        let mut d = Driver::new(size_of(4), config);
        let start = d.now;
        assert_eq!(d.drain_all(), vec![FindProviders]);
        d.fetch.handle_providers([], d.now);
        d.fetch.handle_providers_done(d.now);
        let mut gaps = Vec::new();
        let mut last = d.now;
        while d.now < start + Duration::from_secs(3600) {
            let at = d.fetch.poll_timeout().expect("a lookup is always scheduled");
            assert!(at > d.now);
            d.now = at;
            d.fetch.handle_timeout(d.now);
            let actions = d.drain_all();
            assert_eq!(actions, vec![FindProviders], "exactly one lookup at a time");
            gaps.push((d.now - last).as_secs());
            last = d.now;
            d.fetch.handle_providers_done(d.now);
        }
        assert!(!d.fetch.is_finished());
        gaps
    }

    #[test]
    fn it_fails_only_when_the_deadline_passes_and_says_why() {
        let deadline = Duration::from_secs(60);
        let config = FetchConfig { deadline: Some(deadline), ..config4() };
        // Nobody found.
        let mut d = Driver::new(size_of(4), config.clone());
        d.drain();
        d.fetch.handle_providers_done(d.now);
        let mut failed = Vec::new();
        while d.fetch.poll_timeout().is_some() {
            let at = d.fetch.poll_timeout().expect("checked");
            let actions = d.advance(at - d.now);
            failed.extend(actions.into_iter().filter(|a| matches!(a, Failed(_))));
            if !failed.is_empty() {
                break;
            }
            d.fetch.handle_providers_done(d.now);
        }
        let hash = Hash::from([7; 32]);
        assert_eq!(failed, vec![Failed(FetchError::NoProviders { hash, deadline })]);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.fetch.poll_timeout(), None);
        // Found, but every one refused.
        let mut d = Driver::new(size_of(4), config.clone());
        d.discover(&[1, 2]);
        d.fetch.handle_have_failed(1, PeerFailure::Denied, d.now);
        d.fetch.handle_have_failed(2, PeerFailure::NotFound, d.now);
        d.drain();
        let actions = d.advance(deadline);
        assert_eq!(actions, vec![Failed(FetchError::ProvidersFailed { hash, tried: 2, deadline })]);
        // Under way: requests in flight are cancelled first.
        let config = FetchConfig { request_timeout: Duration::from_secs(100), ..config };
        let (mut d, after) = proven(size_of(40), config, &[(1, PieceSet::full(40))]);
        let actions = d.advance(deadline);
        assert_eq!(actions.len(), requests(&after).len() + 1);
        assert!(actions[..actions.len() - 1].iter().all(|a| matches!(a, Cancel { peer: 1, .. })));
        let Some(Failed(err)) = actions.last() else { panic!("{actions:?}") };
        assert_eq!(*err, FetchError::DeadlineExceeded { hash, deadline, verified_pieces: 1, total_pieces: Some(40) });
        assert!(err.to_string().contains("1 of 40 pieces"), "{err}");
    }

    #[test]
    fn a_fetch_nobody_with_what_it_lacks_answers_stalls() {
        let n = 8;
        let after = Duration::from_secs(5);
        let config = FetchConfig { stall_timeout: Some(after), ..config4() };
        let hash = Hash::from([7; 32]);
        // Nobody at all: it stalls knowing nothing.
        let mut d = Driver::new(size_of(n), config.clone());
        assert_eq!(d.advance(after - ms(1)), vec![]);
        let stalled = FetchError::Stalled { hash, after, verified_pieces: 0, total_pieces: None };
        assert_eq!(d.advance(ms(1)), vec![Failed(stalled)]);
        assert_eq!(d.fetch.poll_timeout(), None);
        // A holder's have-map, 4 s in, gives it another 5 s; its requests then go unanswered.
        let mut d = Driver::new(size_of(n), config);
        d.discover(&[1]);
        assert_eq!(d.advance(Duration::from_secs(4)), vec![]);
        d.have(1, PieceSet::full(n));
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        assert_eq!(requests(&d.local(&PieceSet::empty(n))).len(), 1);
        assert_eq!(d.advance(after - ms(1)), vec![]);
        let actions = d.advance(ms(1));
        assert!(matches!(actions.first(), Some(Cancel { peer: 1, .. })), "{actions:?}");
        let stalled = FetchError::Stalled { hash, after, verified_pieces: 0, total_pieces: Some(n) };
        assert_eq!(actions.last(), Some(&Failed(stalled)));
    }

    #[test]
    fn a_fetch_waiting_its_turn_at_busy_holders_does_not_stall() {
        let n = 8;
        let config = FetchConfig { stall_timeout: Some(Duration::from_secs(7)), max_requests_per_peer: 1, ..config4() };
        let (mut d, mut actions) = proven(size_of(n), config, &[(1, PieceSet::full(n))]);
        // For 25 s the only holder keeps each request 2 s and then answers `Busy`.
        for _ in 0..10 {
            let (peer, id, _) = requests(&actions)[0].clone();
            assert_eq!(d.advance(Duration::from_secs(2)), vec![]);
            assert_eq!(d.fail(peer, id, PeerFailure::Busy { retry_after: ms(500) }), vec![]);
            actions = d.advance(ms(500));
            assert!(!actions.iter().any(|a| matches!(a, Failed(_))), "{actions:?}");
        }
        let all = d.serve_all(actions);
        assert_eq!(all.last(), Some(&Complete));
    }

    #[test]
    fn a_fetch_its_holders_only_ever_turn_away_gives_up() {
        let n = 8;
        let after = Duration::from_secs(5);
        let config = FetchConfig { stall_timeout: Some(after), max_requests_per_peer: 1, ..config4() };
        let (mut d, mut actions) = proven(size_of(n), config, &[(1, PieceSet::full(n))]);
        // The one holder answers every request `Busy` at once: each answer is a sign of life, but
        // no piece comes, and the fetch gives up once none came for four stall timeouts.
        let mut waited = Duration::ZERO;
        let failed = loop {
            if let Some(Failed(e)) = actions.last() {
                break e.clone();
            }
            assert!(waited <= after * STALLS_WITHOUT_A_PIECE, "still fetching after {waited:?}");
            if let Some((peer, id, _)) = requests(&actions).first().cloned() {
                assert_eq!(d.fail(peer, id, PeerFailure::Busy { retry_after: ms(0) }), vec![]);
            }
            actions = d.advance(ms(500));
            waited += ms(500);
        };
        assert!(waited >= after * STALLS_WITHOUT_A_PIECE - ms(500), "gave up after {waited:?}");
        let starved = after * STALLS_WITHOUT_A_PIECE;
        assert!(
            matches!(failed, FetchError::Stalled { verified_pieces: 1, after, .. } if after == starved),
            "{failed:?}"
        );
    }

    // ---- 9. completion ----

    #[test]
    fn complete_is_emitted_once_and_then_nothing_happens() {
        let n = 4;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n))]);
        let all = d.serve_all(after);
        assert_eq!(all.iter().filter(|a| **a == Complete).count(), 1);
        assert_eq!(d.drain(), vec![]);
        d.fetch.handle_providers([5, 6], d.now);
        d.fetch.handle_have(1, size_of(n), PieceSet::full(n), ms(1), d.now);
        d.fetch.handle_timeout(d.now + Duration::from_secs(100));
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.fetch.poll_timeout(), None);
        assert!(d.fetch.is_finished());
        assert_eq!(d.fetch.progress().verified_bytes, size_of(n));
    }

    // ---- 10. bounds and hostile input ----

    #[test]
    fn late_duplicate_and_unknown_answers_are_ignored() {
        let n = 20;
        let (mut d, after) = proven(size_of(n), config4(), &[(1, PieceSet::full(n)), (2, PieceSet::full(n))]);
        let reqs = requests(&after);
        let before = d.fetch.progress();
        let all = PieceSet::full(n);
        // Unknown id, wrong peer, wrong piece count.
        d.fetch.handle_response(1, RequestId(999), &all, 1, ms(1), None, d.now);
        let (peer, id, pieces) = reqs[0].clone();
        d.fetch.handle_response(peer + 10, id, &all, 1, ms(1), None, d.now);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.fetch.progress(), before);
        d.ok(peer, id, &pieces);
        let mid = d.fetch.progress();
        // The same answer again, and an answer for a request never made to this peer.
        d.ok(peer, id, &pieces);
        d.fetch.handle_response(peer, id, &all, 1, ms(1), Some(PeerFailure::Corrupt), d.now);
        assert_eq!(d.drain(), vec![]);
        assert_eq!(d.fetch.progress(), mid);
        // Have answers and failures from peers never asked.
        d.fetch.handle_have(77, size_of(n), PieceSet::full(n), ms(1), d.now);
        d.fetch.handle_have_failed(78, PeerFailure::Corrupt, d.now);
        d.fetch.handle_have_failed(1, PeerFailure::Corrupt, d.now);
        assert_eq!(d.drain(), vec![]);
        assert!(d.fetch.peer_stats().all(|(p, _)| p == 1 || p == 2));
    }

    #[test]
    fn malformed_have_maps_are_a_protocol_failure() {
        let size = size_of(4);
        let mut d = Driver::new(size, config4());
        d.discover(&[1, 2, 3, 4]);
        d.fetch.handle_have(1, size, PieceSet::full(9), ms(1), d.now);
        d.fetch.handle_have(2, u64::MAX, PieceSet::full(4), ms(1), d.now);
        d.fetch.handle_have(3, size, PieceSet::empty(4), ms(1), d.now);
        d.fetch.handle_have(4, size, PieceSet::default(), ms(1), d.now);
        assert_eq!(
            d.drain()[..3],
            [
                Penalise { peer: 1, failure: PeerFailure::Protocol },
                Penalise { peer: 2, failure: PeerFailure::Protocol },
                Penalise { peer: 4, failure: PeerFailure::Protocol },
            ]
        );
        let s = stats(&d.fetch, 3);
        assert!(s.dropped && !s.penalised, "an empty have-map is NotFound, not a lie");
        assert_eq!(d.fetch.size(), None);
        // handle_local with the wrong piece count is ignored but lets requests go.
        let mut d = Driver::new(size, config4());
        d.discover(&[1]);
        d.have(1, PieceSet::full(4));
        d.drain();
        assert_eq!(requests(&d.local(&PieceSet::full(3))).len(), 1);
        assert_eq!(d.fetch.progress().verified_pieces, 0);
    }

    /// A fetch of 8 pieces with two slots taken by full holders 1 and 2, holder 3 waiting for a
    /// slot, and requests of one piece, `per_peer` at a time; returns the requests under way once
    /// the size is proven (or, if `prove` is false, the request for the last piece alone).
    fn two_busy_slots_and_a_holder_waiting(per_peer: usize, prove: bool) -> (Driver, Vec<(u32, RequestId, PieceSet)>) {
        let n = 8;
        let config = FetchConfig { max_peers: 2, max_requests_per_peer: per_peer, pieces_per_request: 1, ..config4() };
        let mut d = Driver::new(size_of(n), config);
        assert_eq!(d.discover(&[1, 2, 3]), vec![AskHave { peer: 1 }, AskHave { peer: 2 }]);
        d.have(1, d.full());
        d.have(2, d.full());
        assert_eq!(d.drain(), vec![Begin { size: size_of(n) }]);
        let last = requests(&d.local(&PieceSet::empty(n)));
        if !prove {
            return (d, last);
        }
        let reqs = requests(&d.ok(last[0].0, last[0].1, &last[0].2));
        assert_eq!(reqs.len(), 2 * per_peer, "{reqs:?}");
        (d, reqs)
    }

    #[test]
    fn a_busy_peer_with_nothing_else_asked_gives_its_slot_to_a_waiting_candidate() {
        // In a crowd the holders that every fetch was told of answer `Busy` while others nobody
        // asks sit idle: waiting our turn at the first kept the second from ever being asked.
        let (mut d, reqs) = two_busy_slots_and_a_holder_waiting(1, true);
        let (busy, id, _) = reqs[0].clone();
        let (other, other_id, _) = reqs[1].clone();
        assert_eq!(d.fail(busy, id, PeerFailure::Busy { retry_after: ms(500) }), vec![AskHave { peer: 3 }]);
        let s = stats(&d.fetch, busy);
        assert!(!s.dropped && s.failures == 0, "stepping aside is no failure: {s:?}");
        // A queue filling with new names forgets peers parked with nothing we need, not this one.
        d.fetch.handle_providers(10..40, d.now);
        assert!(d.fetch.peer_stats().any(|(p, _)| p == busy), "a holder of what we lack is kept");
        // Peer 3 holds only what we have, and peer 2 goes away: after the new names (which hold
        // nothing), the busy peer's turn comes round again, and it serves the rest.
        d.have(3, set(8, [7]));
        let mut actions = d.fail(other, other_id, PeerFailure::Denied);
        let mut newcomers = 0;
        loop {
            match actions.iter().find_map(|a| if let AskHave { peer } = a { Some(*peer) } else { None }) {
                Some(p) if p == busy => break,
                Some(p) => {
                    assert!(p >= 10, "{actions:?}");
                    newcomers += 1;
                    d.fetch.handle_have_failed(p, PeerFailure::NotFound, d.now);
                    actions = d.drain();
                }
                None => panic!("the busy peer never got its turn back: {actions:?}"),
            }
        }
        assert!(newcomers > 0);
        d.have(busy, d.full());
        let actions = d.drain();
        let all = d.serve_all(actions);
        assert_eq!(all.last(), Some(&Complete), "{all:?}");
    }

    #[test]
    fn a_busy_peer_keeps_its_slot_while_serving_us_or_before_the_size_is_proven() {
        // Another request under way to it: it is serving us, and waits out the busy spell.
        let (mut d, reqs) = two_busy_slots_and_a_holder_waiting(2, true);
        let (busy, id, _) = reqs[0].clone();
        assert_eq!(d.fail(busy, id, PeerFailure::Busy { retry_after: ms(500) }), vec![]);
        assert_eq!(d.fetch.progress().peers_active, 2);
        // Before the size is proven: a prover parked could leave the claim to another size.
        let (mut d, last) = two_busy_slots_and_a_holder_waiting(1, false);
        assert_eq!(last.len(), 1, "the last piece alone: {last:?}");
        let actions = d.fail(last[0].0, last[0].1, PeerFailure::Busy { retry_after: ms(500) });
        assert!(!actions.iter().any(|a| matches!(a, AskHave { .. })), "no slot given up: {actions:?}");
        assert_eq!(d.fetch.progress().peers_active, 2);
    }

    #[test]
    fn nearby_peers_are_asked_before_other_candidates() {
        // Peers 1 and 2 fill both slots with nothing new; the DHT also named 3 and 4. Then the
        // node names peer 5 (it just sent 5 pieces of the blob), and later parked peer 2 too.
        let (mut d, _, only_last) = slots_held_by_holders_of_the_last_piece(&[1, 2, 3, 4]);
        d.fetch.handle_nearby([5], d.now);
        d.fetch.handle_nearby([1], d.now);
        assert_eq!(d.drain(), vec![], "a live peer named nearby changes nothing; no slot is free yet");
        let asks = d.watches_run_out();
        assert_eq!(asks, vec![AskHave { peer: 5 }, AskHave { peer: 3 }], "the nearby peer first");
        d.have(5, only_last.clone());
        d.have(3, only_last.clone());
        // Peers 1 and 2 are parked behind 4. Named nearby, 2 goes first, and only once.
        d.fetch.handle_nearby([2, 2], d.now);
        assert_eq!(d.drain(), vec![]);
        let asks = d.watches_run_out();
        assert_eq!(asks, vec![AskHave { peer: 2 }, AskHave { peer: 4 }], "{asks:?}");
        d.have(2, only_last.clone());
        d.have(4, d.full());
        let all = d.drain();
        let all = d.serve_all(all);
        assert_eq!(all.last(), Some(&Complete));
        assert_eq!(d.fetch.peer_stats().filter(|(_, s)| !s.dropped).count(), 5, "nobody is dropped");
    }

    #[test]
    fn nearby_peers_are_bounded() {
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(4), config);
        d.fetch.handle_nearby(0..100, d.now);
        let actions = d.drain_all();
        let (asked, actions) = d.ask_each_in_turn(actions);
        assert_eq!(asked, vec![99, 98], "max_peers remembered, the most recently named first");
        assert_eq!(actions, vec![FindProviders], "then the DHT is asked");
    }

    #[test]
    fn candidates_are_bounded_and_deduplicated() {
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(4), config);
        let named: Vec<u32> = (0..100).chain(0..100).collect();
        let actions = d.discover(&named);
        let (asked, actions) = d.ask_each_in_turn(actions);
        assert_eq!(asked, (0..8).collect::<Vec<_>>(), "4 x max_peers candidates remembered");
        assert_eq!(actions, vec![FindProviders], "then the DHT is asked again");
    }

    /// Peers other peers named wait behind the DHT's names, and a full queue of them gives a
    /// place up to each name the DHT finds: made-up holders from a few peers keep no provider the
    /// DHT names waiting. A name from both moves up with the DHT's.
    #[test]
    fn names_from_peers_wait_behind_the_dhts_and_give_their_places_up() {
        let config = FetchConfig { max_peers: 2, ..config4() };
        let max = 2 * CANDIDATES_PER_PEER_SLOT as u32;
        let mut d = Driver::new(size_of(4), config);
        assert_eq!(d.drain_all(), vec![FindProviders]);
        // Peers name 100..: the queue fills with their names, and more are ignored.
        d.fetch.handle_hinted(100..200, d.now);
        // The DHT names 1 and 2, then 103 (named by a peer too, and queued); a name from a peer
        // finding the queue full takes nobody's place.
        d.fetch.handle_providers([1, 2], d.now);
        d.fetch.handle_hinted([300], d.now);
        d.fetch.handle_providers([103], d.now);
        d.fetch.handle_providers_done(d.now);
        let actions = d.drain_all();
        let (asked, _) = d.ask_each_in_turn(actions);
        let mut expected = vec![1, 2, 103, 100, 101, 102];
        expected.extend(104..100 + max - 2);
        assert_eq!(asked, expected, "the DHT's names first; the peers' last names forgotten for them");
        assert_eq!(d.fetch.providers_found, max as usize + 2, "a name from both is found once");
    }

    /// Names only peers gave hold no lookup back: a fetch whose queue they fill still asks the
    /// DHT once its back-off allows.
    #[test]
    fn names_from_peers_hold_no_lookup_back() {
        let config = FetchConfig { max_peers: 2, ..config4() };
        let mut d = Driver::new(size_of(4), config.clone());
        assert_eq!(d.drain_all(), vec![FindProviders]);
        d.fetch.handle_hinted(100..104, d.now);
        d.fetch.handle_providers_done(d.now);
        assert_eq!(d.drain_all(), vec![AskHave { peer: 100 }, AskHave { peer: 101 }]);
        assert_eq!(d.advance(config.providers_backoff), vec![]);
        let lookups = d.lookups;
        d.fetch.handle_have_failed(100, PeerFailure::NotFound, d.now);
        assert_eq!(d.drain(), vec![AskHave { peer: 102 }], "103 waits");
        assert_eq!(d.lookups, lookups + 1, "the DHT was asked before 102 took the free slot");
    }

    /// A holder parked for `Busy` keeps its place in a queue that names from peers fill: one of
    /// them goes instead.
    #[test]
    fn a_busy_holder_keeps_its_place_in_a_queue_names_from_peers_fill() {
        let (mut d, reqs) = two_busy_slots_and_a_holder_waiting(1, true);
        let (busy, id, _) = reqs[0].clone();
        let max = 2 * CANDIDATES_PER_PEER_SLOT;
        d.fetch.handle_hinted(10..40, d.now);
        assert_eq!(d.fetch.candidates.len(), max, "3, then names from peers");
        // A peer named nearby takes the busy peer's slot; the queue was full already.
        d.fetch.handle_nearby([5], d.now);
        assert_eq!(d.fail(busy, id, PeerFailure::Busy { retry_after: ms(500) }), vec![AskHave { peer: 5 }]);
        assert_eq!(d.fetch.candidates.len(), max);
        assert_eq!(d.fetch.candidates.back(), Some(&busy), "{:?}", d.fetch.candidates);
        assert!(!d.fetch.candidates.contains(&(10 + max as u32 - 2)), "the name from peers that waited last went");
        assert!(d.fetch.hinted.iter().all(|p| d.fetch.candidates.contains(p)));
    }

    #[test]
    fn a_stretched_configuration_scales_every_timer() {
        let base = FetchConfig {
            request_target: Some(ms(2000)),
            deadline: Some(ms(30_000)),
            stall_timeout: Some(ms(5000)),
            ..config4()
        };
        let x4 = base.clone().stretched(4.0);
        assert_eq!(x4.have_refresh, base.have_refresh * 4);
        assert_eq!(x4.retry_base, base.retry_base * 4);
        assert_eq!(x4.providers_backoff, base.providers_backoff * 4);
        assert_eq!(x4.request_timeout, base.request_timeout * 4);
        assert_eq!(x4.have_timeout, base.have_timeout * 4);
        assert_eq!(x4.request_target, Some(ms(8000)));
        assert_eq!(x4.deadline, Some(ms(120_000)));
        assert_eq!(x4.stall_timeout, Some(ms(20_000)));
        assert_eq!(x4.time_scale, 4.0);
        assert_eq!(x4.clone().stretched(0.5).time_scale, 2.0, "factors multiply");
        assert_eq!((x4.max_peers, x4.pieces_per_request), (base.max_peers, base.pieces_per_request), "counts stay");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(base.clone().stretched(bad), base, "factor {bad}");
        }
        assert_eq!(base.clone().stretched(1e300).have_refresh, Duration::MAX, "saturates");
    }

    #[test]
    fn hostile_configuration_values_are_brought_into_range() {
        let config = FetchConfig {
            pieces_per_request: 0,
            max_requests_per_peer: 0,
            request_timeout: Duration::MAX,
            have_timeout: Duration::ZERO,
            max_peer_failures: 0,
            retry_base: Duration::MAX,
            endgame_copies: 0,
            max_peers: 0,
            providers_backoff: Duration::ZERO,
            providers_backoff_max: Duration::ZERO,
            request_target: Some(Duration::ZERO),
            have_refresh: Duration::MAX,
            deadline: Some(Duration::MAX),
            stall_timeout: Some(Duration::ZERO),
            time_scale: f64::NAN,
        };
        let (mut d, actions) = started(size_of(3), config, &[(1, PieceSet::full(3))]);
        let all = d.serve_all(actions);
        assert!(requests(&all).iter().all(|(_, _, p)| p.count() == 1));
        assert_eq!(all.last(), Some(&Complete));
    }

    // ---- a swarm with honest, faulty and hostile peers ----

    mod swarm {
        use std::collections::BTreeSet;

        use proptest::prelude::*;

        use super::super::*;
        use super::set;

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Kind {
            /// Serves every request.
            Honest,
            /// Fails 30% of requests with an I/O error.
            Flaky,
            /// Answers 30% of requests and have requests with `Busy`.
            Busy,
            /// Sends bytes that fail verification.
            Corrupt,
            /// Answers have requests, never a get.
            Silent,
            /// Claims a larger size and fails to prove it.
            SizeLiar,
        }

        impl Kind {
            fn honest(self) -> bool {
                matches!(self, Kind::Honest | Kind::Flaky | Kind::Busy)
            }
        }

        #[derive(Debug, Clone)]
        struct SimPeer {
            kind: Kind,
            latency: Duration,
            bytes_per_sec: u64,
            /// A partial holder advertises pieces below this, and the last.
            holds_below: Option<u32>,
        }

        #[derive(Debug)]
        enum Event {
            Providers,
            Have(u32),
            Watch(u32),
            Response { id: RequestId, failure: Option<PeerFailure> },
        }

        /// Runs one fetch against `peers` (peer 0 is an honest full holder) and checks its
        /// invariants; returns a trace of every action, for replay checks.
        pub(super) fn run(size: u64, extra: &[(u8, u64, u64, Option<u32>)], seed: u64) -> Vec<String> {
            let n = Geometry::new(size).expect("small").piece_count();
            let mut peers = vec![SimPeer {
                kind: Kind::Honest,
                latency: Duration::from_millis(80),
                bytes_per_sec: 2_000_000,
                holds_below: None,
            }];
            let kinds = [Kind::Honest, Kind::Flaky, Kind::Busy, Kind::Corrupt, Kind::Silent, Kind::SizeLiar];
            for &(kind, latency_ms, mbps, holds_below) in extra {
                peers.push(SimPeer {
                    kind: kinds[usize::from(kind) % kinds.len()],
                    latency: Duration::from_millis(latency_ms),
                    bytes_per_sec: mbps * 1_000_000,
                    holds_below,
                });
            }
            let lie = size + 2 * PIECE_SIZE;
            let config = FetchConfig {
                max_peers: 4,
                request_timeout: Duration::from_secs(2),
                have_timeout: Duration::from_secs(1),
                ..FetchConfig::default()
            };
            let start = Instant::now();
            let mut now = start;
            let mut fetch: Fetch<u32> = Fetch::new(Hash::from([1; 32]), config.clone(), seed, now);
            let mut dice = SplitMix64(seed ^ 0x5eed);
            let mut events: BTreeMap<(Instant, u64), Event> = BTreeMap::new();
            let mut seq = 0u64;
            let mut schedule = |events: &mut BTreeMap<(Instant, u64), Event>, at: Instant, e: Event| {
                events.insert((at, seq), e);
                seq += 1;
            };
            let mut sent: BTreeMap<RequestId, (u32, PieceSet, Instant)> = BTreeMap::new();
            let mut cancelled: BTreeMap<RequestId, (u32, PieceSet, Instant)> = BTreeMap::new();
            let mut adverts: BTreeMap<u32, (u64, PieceSet)> = BTreeMap::new();
            let mut store: Option<(u64, PieceSet)> = None;
            let mut sources: BTreeMap<PieceIndex, u32> = BTreeMap::new();
            let mut penalised = BTreeSet::new();
            let mut must_penalise = BTreeSet::new();
            let mut trace = Vec::new();
            let mut timed_out_at: Option<Instant> = None;
            for _step in 0..200_000 {
                while let Some(action) = fetch.poll_action(now) {
                    trace.push(format!("{:?} {action:?}", now - start));
                    match action {
                        Action::FindProviders => {
                            schedule(&mut events, now + Duration::from_millis(30), Event::Providers)
                        }
                        Action::AskHave { peer } => {
                            let sim = &peers[peer as usize];
                            schedule(&mut events, now + sim.latency * 2, Event::Have(peer));
                        }
                        Action::WatchHave { peer, wanted } => {
                            let (_, advert) = adverts.get(&peer).expect("watched only after its have-map");
                            assert!(wanted.intersection(advert).is_empty(), "{peer} advertises {wanted:?}");
                            let verified = fetch.verified().expect("begun");
                            assert!(!wanted.is_empty() && wanted.intersection(verified).is_empty());
                            // These peers never gain pieces: every watch runs its whole wait.
                            let sim = &peers[peer as usize];
                            schedule(&mut events, now + sim.latency * 2 + config.have_refresh, Event::Watch(peer));
                        }
                        Action::Begin { size } => {
                            let store_n = Geometry::new(size).expect("claimed").piece_count();
                            store = Some((size, PieceSet::empty(store_n)));
                            fetch.handle_local(&PieceSet::empty(store_n), now);
                        }
                        Action::SizeRejected { size: rejected } => {
                            assert_eq!(store.as_ref().map(|s| s.0), Some(rejected));
                            store = None;
                        }
                        Action::Request { peer, id, pieces } => {
                            let (claimed, advert) = adverts.get(&peer).expect("asked only after its have-map");
                            assert_eq!(fetch.size(), Some(*claimed), "only peers claiming the size in force");
                            assert!(!pieces.is_empty() && pieces.count() <= config.pieces_per_request);
                            assert!(pieces.difference(advert).is_empty(), "{peer} never advertised {pieces:?}");
                            let verified = fetch.verified().expect("begun");
                            assert!(pieces.intersection(verified).is_empty(), "{pieces:?} is verified");
                            if !fetch.is_size_proven() {
                                assert_eq!(pieces, PieceSet::single(advert.piece_count(), advert.piece_count() - 1));
                            }
                            let busy = sent.values().filter(|(p, _, _)| *p == peer).count();
                            assert!(busy < config.max_requests_per_peer, "peer {peer} over its bound");
                            let sim = &peers[peer as usize];
                            let bytes = u64::from(pieces.count()) * PIECE_SIZE;
                            let transfer = Duration::from_secs_f64(bytes as f64 / sim.bytes_per_sec as f64);
                            let roll = dice.below(10);
                            let outcome = match sim.kind {
                                Kind::Honest => Some(None),
                                Kind::Flaky if roll < 3 => Some(Some(PeerFailure::Io)),
                                Kind::Busy if roll < 3 => Some(Some(PeerFailure::Busy { retry_after: ms(50) })),
                                Kind::Flaky | Kind::Busy => Some(None),
                                Kind::Corrupt | Kind::SizeLiar => Some(Some(PeerFailure::Corrupt)),
                                Kind::Silent => None,
                            };
                            if let Some(failure) = outcome {
                                let at = now + sim.latency * 2 + transfer;
                                schedule(&mut events, at, Event::Response { id, failure });
                            }
                            sent.insert(id, (peer, pieces, now));
                        }
                        Action::Cancel { peer, id } => {
                            let request = sent.remove(&id).expect("cancels name live requests");
                            assert_eq!(request.0, peer);
                            cancelled.insert(id, request);
                        }
                        Action::Penalise { peer, .. } => {
                            assert!(!peers[peer as usize].kind.honest(), "honest peer {peer} penalised");
                            assert!(penalised.insert(peer), "peer {peer} penalised twice");
                        }
                        Action::Complete => {
                            let (size_done, stored) = store.expect("begun");
                            assert_eq!(size_done, size);
                            assert!(stored.is_complete() && fetch.verified().is_some_and(PieceSet::is_complete));
                            assert!(fetch.is_size_proven());
                            assert_eq!(sources.len() as u32, n);
                            assert!(sources.values().all(|p| peers[*p as usize].kind.honest()));
                            assert!(must_penalise.is_subset(&penalised), "{must_penalise:?} vs {penalised:?}");
                            assert_eq!(fetch.poll_action(now), None);
                            return trace;
                        }
                        Action::Failed(e) => panic!("fetch failed: {e}"),
                    }
                }
                let timeout = fetch.poll_timeout();
                if let Some(t) = timeout
                    && t <= now
                {
                    // An event was handled at the very instant a timer fell due, so the timer
                    // still waits for its `handle_timeout`; after that it must lie ahead.
                    assert!(timed_out_at != Some(now), "poll_timeout in the past: a busy loop");
                    timed_out_at = Some(now);
                    fetch.handle_timeout(now);
                    continue;
                }
                let next_event = events.keys().next().map(|k| k.0);
                let next = match (timeout, next_event) {
                    (Some(t), Some(e)) => t.min(e),
                    (t, e) => t.or(e).expect("something to wait for"),
                };
                now = next;
                if next_event != Some(next) {
                    timed_out_at = Some(now);
                    fetch.handle_timeout(now);
                    continue;
                }
                let Some((_, event)) = events.pop_first() else { continue };
                match event {
                    Event::Providers => {
                        let mut named: Vec<u32> = (0..peers.len() as u32).collect();
                        let turn = dice.below(named.len() as u32) as usize;
                        named.rotate_left(turn);
                        named.push(0);
                        fetch.handle_providers(named, now);
                        fetch.handle_providers_done(now);
                    }
                    Event::Have(peer) => {
                        let sim = &peers[peer as usize];
                        if sim.kind == Kind::Busy && dice.below(10) < 3 {
                            fetch.handle_have_failed(peer, PeerFailure::Busy { retry_after: ms(100) }, now);
                            continue;
                        }
                        let (claimed, advert) = if sim.kind == Kind::SizeLiar {
                            (lie, PieceSet::full(Geometry::new(lie).expect("small").piece_count()))
                        } else if let Some(k) = sim.holds_below {
                            (size, set(n, (0..k.min(n)).chain([n - 1])))
                        } else {
                            (size, PieceSet::full(n))
                        };
                        if sim.kind == Kind::SizeLiar {
                            must_penalise.insert(peer);
                        }
                        adverts.insert(peer, (claimed, advert.clone()));
                        fetch.handle_have(peer, claimed, advert, sim.latency * 2, now);
                    }
                    Event::Watch(peer) => {
                        // Some peers are older nodes that do not know watches.
                        if peers[peer as usize].kind == Kind::Flaky && dice.below(2) == 0 {
                            fetch.handle_watch_refused(peer, now);
                            continue;
                        }
                        let (claimed, advert) = adverts.get(&peer).cloned().expect("watched only after its have-map");
                        fetch.handle_watched(peer, claimed, advert, now);
                    }
                    Event::Response { id, failure } => {
                        if let Some((peer, pieces, at)) = cancelled.remove(&id) {
                            // The node dropped the stream; an answer that slips through anyway
                            // must be ignored.
                            fetch.handle_response(peer, id, &pieces, 1, now - at, failure, now);
                            continue;
                        }
                        let Some((peer, pieces, at)) = sent.remove(&id) else { continue };
                        let verified = if failure.is_none() {
                            let (_, stored) = store.as_mut().expect("requests only after Begin");
                            stored.union_with(&pieces);
                            for i in pieces.iter() {
                                sources.entry(i).or_insert(peer);
                            }
                            pieces.clone()
                        } else {
                            if failure == Some(PeerFailure::Corrupt) {
                                must_penalise.insert(peer);
                            }
                            PieceSet::empty(pieces.piece_count())
                        };
                        let bytes = u64::from(verified.count()) * PIECE_SIZE;
                        fetch.handle_response(peer, id, &verified, bytes, now - at, failure, now);
                        // Now and then a peer is named nearby, as a node names the peers it
                        // serves: any peer, live, parked, dropped or not yet asked.
                        if dice.below(4) == 0 {
                            fetch.handle_nearby([dice.below(peers.len() as u32)], now);
                        }
                    }
                }
            }
            panic!("no completion after 200,000 steps");
        }

        fn ms(n: u64) -> Duration {
            Duration::from_millis(n)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn random_swarms_complete_with_verified_pieces_from_honest_peers_only(
                pieces in 1u32..40,
                short in 0u64..PIECE_SIZE,
                seed in any::<u64>(),
                extra in proptest::collection::vec(
                    (0u8..6, 1u64..200, 1u64..50, proptest::option::of(0u32..40)),
                    0..8,
                ),
            ) {
                let size = (u64::from(pieces) * PIECE_SIZE).saturating_sub(short);
                run(size, &extra, seed);
            }
        }

        #[test]
        fn a_swarm_replays_exactly_from_its_seed() {
            let extra =
                [(0, 10, 5, None), (3, 5, 20, None), (4, 1, 50, Some(3)), (5, 2, 10, None), (1, 40, 2, Some(9))];
            for seed in 0..4 {
                assert_eq!(run(13 * PIECE_SIZE + 5, &extra, seed), run(13 * PIECE_SIZE + 5, &extra, seed));
            }
        }
    }

    // ---- from a review of the fetch (2026-12-06) ----

    #[test]
    fn a_peer_that_only_answers_busy_to_have_requests_gives_its_slot_up() {
        let config = FetchConfig { max_peers: 1, ..config4() };
        let mut d = Driver::new(size_of(4), config);
        assert_eq!(d.discover(&[1, 2]), vec![AskHave { peer: 1 }]);
        for _ in 0..40 {
            d.fetch.handle_have_failed(1, PeerFailure::Busy { retry_after: ms(250) }, d.now);
            if d.advance(ms(250)).contains(&AskHave { peer: 2 }) {
                return;
            }
        }
        panic!("peer 2 waited 10 s behind a peer that only ever said Busy");
    }

    #[test]
    fn provers_that_never_prove_give_their_slots_to_a_waiting_candidate() {
        let config = FetchConfig { max_peers: 1, ..config4() };
        let mut d = Driver::new(size_of(8), config);
        assert_eq!(d.discover(&[1, 2]), vec![AskHave { peer: 1 }]);
        // Peer 1 claims a size too large for the cache, holding all of it, and proves nothing.
        let lie = size_of(8) * 1000;
        let n = Geometry::new(lie).unwrap().piece_count();
        d.fetch.handle_have(1, lie, PieceSet::full(n), ms(20), d.now);
        assert_eq!(d.drain(), vec![Begin { size: lie }]);
        d.fetch.handle_size_unprovable(lie, d.now);
        let mut actions = d.drain();
        for _ in 0..10 {
            actions.extend(d.advance(Duration::from_secs(1)));
        }
        assert!(actions.contains(&AskHave { peer: 2 }), "{actions:?}");
    }

    #[test]
    fn a_peer_whose_every_get_fails_is_dropped_though_it_answers_its_watches() {
        let n = 40;
        let config = FetchConfig { max_requests_per_peer: 1, ..config4() };
        let (mut d, mut actions) = proven(size_of(n), config, &[(1, set(n, 1..n)), (2, PieceSet::full(n))]);
        for _ in 0..6 {
            if stats(&d.fetch, 1).dropped {
                return;
            }
            let Some((_, id, _)) = requests(&actions).into_iter().find(|r| r.0 == 1) else {
                actions = d.watches_run_out();
                continue;
            };
            d.fail(1, id, PeerFailure::Truncated);
            actions = d.watches_run_out();
        }
        assert!(stats(&d.fetch, 1).dropped, "kept: {:?}", stats(&d.fetch, 1));
    }

    #[test]
    fn parking_keeps_the_candidate_queue_within_its_bound() {
        let config = FetchConfig { max_peers: 1, ..config4() };
        let n = 8;
        let mut d = Driver::new(size_of(n), config);
        d.drain();
        for peer in 0..50u32 {
            d.fetch.handle_nearby([peer], d.now);
            let refresh = d.fetch.config().have_refresh;
            let _ = d.advance(refresh);
            d.have(peer, set(n, [0]));
        }
        assert!(d.fetch.candidates.len() <= CANDIDATES_PER_PEER_SLOT, "{}", d.fetch.candidates.len());
    }
}
