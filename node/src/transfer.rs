//! The `/shoal/transfer/2` protocol on libp2p streams: serving pieces, and asking for them.
//!
//! One request per stream. Serving is bounded: a node-wide semaphore and a per-peer count cap
//! concurrent uploads; past either a peer gets `Busy { retry_after_ms }` at once. Under an upload
//! cap, a `Get` that finds every piece-upload slot taken waits in a short line (at most
//! [`WAITING_PER_SLOT`] per slot, for at most [`MAX_SLOT_WAIT`]) instead of being sent away: the
//! uplink then goes from one upload straight to the next instead of idling until some refused
//! requester comes back, and a crowd stops paying a round trip per refusal.
//!
//! A requester that stops taking its answer gives its slot up to a newcomer: when every slot is
//! taken, a request that finds one whose answer has waited [`PREEMPT_AFTER`] on its requester's
//! flow control takes that slot (the stalled answer is cut off), so peers that ask and never read
//! cannot hold every slot between them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::upgrade::NegotiationError;
use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_cache::Store;
use shoal_protocol::verify;
use shoal_protocol::wire::{
    self, MAX_REQUEST_LEN, MAX_RESPONSE_LEN, MAX_RUNS, PeerHint, Request, Response, TraceId, WireError,
};
use shoal_protocol::{Geometry, Hash, PieceRuns, PieceSet};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use crate::crowd::Crowds;
use crate::limits::{CHUNK, RateLimit};
use crate::slots::{Slot, Slots};
use crate::streams::{Control, Incoming, OpenError};

/// The transfer protocol id.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL);

/// How long a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams whose request is still being read, in all and per peer. Past the bound per peer, a new
/// stream is closed unanswered; past the bound in all, the peer with the most gives up its oldest
/// for a newcomer holding fewer (see [`Uploads::try_read`]). They hold no upload slot: a peer
/// that opens streams and sends nothing ties up only these, never the slots other peers'
/// requests are served from.
const MAX_READING: usize = 1024;
const MAX_READING_PER_PEER: usize = 16;

/// How long a busy peer is asked to wait at least; with an upload cap, a peer turned away from a
/// full line is asked to wait about one upload's time (see [`Uploads::busy_retry`]).
const BUSY_RETRY: Duration = Duration::from_millis(250);

/// How long a peer is asked to wait when every piece it asked for is left to other holders (see
/// [`crate::crowd`]): it meanwhile asks them.
const SPREAD_RETRY: Duration = Duration::from_secs(1);

// A requester refused again and again still counts in its publisher's crowd when it comes back.
const _: () = assert!(crate::crowd::ASKING.as_secs() >= SPREAD_RETRY.as_secs() << crate::crowd::MAX_SPREAD_DOUBLINGS);

/// Requests that may wait for a piece-upload slot, per slot; past it a requester gets `Busy`.
const WAITING_PER_SLOT: usize = 2;

/// The longest a request waits for a piece-upload slot before it is answered `Busy`: well inside
/// the requester's own timeout, and short enough that a requester stuck behind slow uploads soon
/// asks someone else.
const MAX_SLOT_WAIT: Duration = Duration::from_secs(2);

/// The longest a server holds a watch (`Request::Watch`) before answering it with its have-map.
const MAX_WATCH_WAIT: Duration = Duration::from_secs(10);

/// Watches a node holds at once, and per peer; past either, a watch is answered at once, as a
/// have request would be (its requester asks again after its interval, not sooner).
const MAX_WATCHES: usize = 256;
const MAX_WATCHES_PER_PEER: usize = 8;

/// Size proofs a node makes at once (each reads and hashes a blob's last piece); more wait.
const MAKING_PROOFS: usize = 4;

/// The least throughput a transfer may fall to before it is abandoned as stalled (bytes/s).
const MIN_RATE: u64 = 64 * 1024;

/// How long an answer's write may wait on its requester (its flow-control window full) before a
/// new request, finding every upload slot taken, takes the slot: the requester has taken nothing
/// for that long. Peers that ask and never read would otherwise hold every slot, each for the
/// request timeout, renewed as often as they ask again.
const PREEMPT_AFTER: Duration = Duration::from_secs(5);

/// How long a request that cut off a stalled answer waits for that answer's slot to be let go
/// (the answer's task is woken and drops it): local work, not network time.
const PREEMPT_WAIT: Duration = Duration::from_millis(250);

/// Under an upload cap, the share of it each concurrent piece upload gets at least: so that, like
/// BitTorrent's few unchoked peers, a capped node finishes pieces one after another (each one a
/// piece its requester can pass on at once) rather than trickling out many pieces in parallel
/// that all complete at the end.
const UPLOAD_SLOT_RATE: u64 = 1024 * 1024;

/// The protocol's timers and least rate in the node's own time: the constants above, stretched by
/// the node's time scale (see [`crate::NodeConfig::time_scale`]), both ways: what a server waits
/// for and asks its requesters to wait, and what a requester waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    request_timeout: Duration,
    busy_retry: Duration,
    spread_retry: Duration,
    max_slot_wait: Duration,
    max_watch_wait: Duration,
    preempt_after: Duration,
    /// Bytes per second of the node's time.
    min_rate: u64,
    /// [`UPLOAD_SLOT_RATE`] in bytes per second of the node's time: an emulator gives the node
    /// its upload cap in its own time too, so the slots are as many as on a real network.
    upload_slot_rate: u64,
}

impl Timing {
    pub(crate) fn new(time_scale: f64) -> Self {
        let stretch = |d| shoal_protocol::fetch::stretch(d, time_scale);
        let per_node_second = |rate: u64| ((rate as f64 / stretch(Duration::from_secs(1)).as_secs_f64()) as u64).max(1);
        Self {
            request_timeout: stretch(REQUEST_TIMEOUT),
            busy_retry: stretch(BUSY_RETRY),
            spread_retry: stretch(SPREAD_RETRY),
            max_slot_wait: stretch(MAX_SLOT_WAIT),
            max_watch_wait: stretch(MAX_WATCH_WAIT),
            preempt_after: stretch(PREEMPT_AFTER),
            min_rate: per_node_second(MIN_RATE),
            upload_slot_rate: per_node_second(UPLOAD_SLOT_RATE),
        }
    }
}

/// Bounds on concurrent uploads, the upload rate cap and who may fetch.
#[derive(Debug)]
pub(crate) struct Uploads {
    total: Arc<Semaphore>,
    /// Concurrent piece uploads (`Get`s) under an upload cap: one per [`UPLOAD_SLOT_RATE`] of
    /// it, at least 2, and a line of [`WAITING_PER_SLOT`] per slot served by priority; with no
    /// cap, only `total` bounds them.
    data: Option<Arc<Slots<PeerId>>>,
    /// How long a piece upload holds its slot, a moving average in microseconds (0: none yet).
    upload_micros: AtomicU64,
    per_peer: Mutex<HashMap<PeerId, usize>>,
    /// The most uploads at once: `total`'s permits.
    max_total: usize,
    max_per_peer: usize,
    /// What the answers holding upload slots are doing, by slot: at most one per slot.
    holders: Mutex<HashMap<u64, Arc<Holder>>>,
    next_holder: AtomicU64,
    /// What [`Holder::blocked_since`] counts from.
    epoch: tokio::time::Instant,
    rate: Option<RateLimit>,
    allow: Option<std::collections::HashSet<PeerId>>,
    /// Set at shutdown: new uploads get `Busy`, running ones finish.
    closing: AtomicBool,
    /// Requests read and being answered: what a shutdown waits for. A stream whose request has
    /// not arrived holds no upload slot (only its share of `reading`) and is not waited for.
    answering: AtomicUsize,
    /// Size proofs being made (read and hashed from a last piece): at most [`MAKING_PROOFS`].
    proofs: Semaphore,
    /// Watches held, per peer (at most [`MAX_WATCHES`] in all).
    watches: Mutex<HashMap<PeerId, usize>>,
    /// Streams whose request is being read, per peer (at most [`MAX_READING`] in all).
    reading: Mutex<Unread>,
    /// Counts the pieces this node stored, to wake the watches it holds.
    pub(crate) arrivals: Arrivals,
    pub(crate) timing: Timing,
}

/// Wakes the watches a node holds (`Request::Watch`) when it stores verified pieces of their
/// blob: each then checks whether it holds a piece its requester wants. One channel per blob
/// watched, so a piece of one blob wakes only the watches of that blob; a blob's channel goes
/// once no watch of it is left.
#[derive(Debug, Clone, Default)]
pub(crate) struct Arrivals(Arc<Mutex<HashMap<Hash, tokio::sync::watch::Sender<u64>>>>);

impl Arrivals {
    /// The node stored verified pieces of `hash`.
    pub(crate) fn stored(&self, hash: Hash) {
        let mut blobs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = blobs.get(&hash) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
            if tx.receiver_count() == 0 {
                blobs.remove(&hash);
            }
        }
    }

    /// The node is shutting down: every watch answers now.
    fn wake_all(&self) {
        for tx in self.0.lock().unwrap_or_else(|e| e.into_inner()).values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn subscribe(&self, hash: Hash) -> tokio::sync::watch::Receiver<u64> {
        let mut blobs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded by the watches held: the channels of blobs no watch waits on any more go.
        if blobs.len() >= MAX_WATCHES {
            blobs.retain(|_, tx| tx.receiver_count() > 0);
        }
        blobs.entry(hash).or_insert_with(|| tokio::sync::watch::Sender::new(0)).subscribe()
    }
}

/// A piece-upload slot held by `peer`; released when dropped.
struct DataSlot {
    _slot: Slot<PeerId>,
}

/// Streams whose request is being read.
#[derive(Debug, Default)]
struct Unread {
    next: u64,
    total: usize,
    /// Each peer's, oldest first: an id, and what tells the stream's task to give it up.
    peers: HashMap<PeerId, VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
}

/// A stream's place among those being read; given back when dropped, unless another peer's
/// newer stream took it ([`ReadSlot::given_up`] tells).
struct ReadSlot<'a> {
    uploads: &'a Uploads,
    peer: PeerId,
    id: u64,
    given_up: Arc<tokio::sync::Notify>,
}

impl Drop for ReadSlot<'_> {
    fn drop(&mut self) {
        let mut unread = self.uploads.reading.lock().unwrap_or_else(|e| e.into_inner());
        let Some(streams) = unread.peers.get_mut(&self.peer) else { return };
        let Some(at) = streams.iter().position(|(id, _)| *id == self.id) else { return };
        streams.remove(at);
        if streams.is_empty() {
            unread.peers.remove(&self.peer);
        }
        unread.total -= 1;
    }
}

/// One of a peer's watches held; given back when dropped.
struct PeerCount<'a> {
    counts: &'a Mutex<HashMap<PeerId, usize>>,
    peer: PeerId,
}

impl<'a> PeerCount<'a> {
    /// One more for `peer` in `counts`, if that keeps within `max` in all and `max_per_peer`.
    fn try_new(
        counts: &'a Mutex<HashMap<PeerId, usize>>,
        peer: PeerId,
        max: usize,
        max_per_peer: usize,
    ) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        if map.values().sum::<usize>() >= max || map.get(&peer).is_some_and(|n| *n >= max_per_peer) {
            return None;
        }
        *map.entry(peer).or_insert(0) += 1;
        Some(Self { counts, peer })
    }
}

impl Drop for PeerCount<'_> {
    fn drop(&mut self) {
        count_down(self.counts, &self.peer);
    }
}

/// Takes one off `peer`'s count in `counts`, forgetting the peer at zero.
fn count_down(counts: &Mutex<HashMap<PeerId, usize>>, peer: &PeerId) {
    crate::count_down(&mut counts.lock().unwrap_or_else(|e| e.into_inner()), peer);
}

/// One count in a gauge (requests in line, requests being answered) until dropped, however the
/// work it counts ends.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Counts one in `gauge`; returns the guard and the count before it.
    fn new(gauge: &'a AtomicUsize) -> (Self, usize) {
        let before = gauge.fetch_add(1, Ordering::Relaxed);
        (Self(gauge), before)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upload slot; released when dropped.
struct UploadSlot<'a> {
    uploads: &'a Uploads,
    peer: PeerId,
    id: u64,
    holder: Arc<Holder>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        self.uploads.holders.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        count_down(&self.uploads.per_peer, &self.peer);
    }
}

/// What the answer holding an upload slot is doing, for a newcomer to take the slot of one whose
/// requester stopped reading (see [`Uploads::acquire`]).
#[derive(Debug, Default)]
struct Holder {
    /// Since when its write has waited on the requester: microseconds since [`Uploads::epoch`],
    /// plus one; 0 while it is not waiting.
    blocked_since: AtomicU64,
    /// Told when a newcomer takes the slot: the answer is cut off.
    preempted: tokio::sync::Notify,
    /// It holds a piece-upload slot as well (see [`Uploads::acquire_data`]).
    holds_data: std::sync::atomic::AtomicBool,
}

/// A stream written under an upload slot: each write or flush that waits on the requester marks
/// the slot's [`Holder`] blocked from then, and one that goes through clears it.
struct Watched<'a, S> {
    inner: &'a mut S,
    holder: &'a Holder,
    epoch: tokio::time::Instant,
}

/// Now, as [`Holder::blocked_since`] counts it from `epoch`: never 0.
fn stamp(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
}

impl<S> Watched<'_, S> {
    fn note<T>(&self, poll: &std::task::Poll<T>) {
        if poll.is_pending() {
            let now = stamp(self.epoch);
            let _ = self.holder.blocked_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            self.holder.blocked_since.store(0, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        this.note(&poll);
        poll
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut *this.inner).poll_flush(cx);
        this.note(&poll);
        poll
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut *this.inner).poll_close(cx);
        this.note(&poll);
        poll
    }
}

impl Uploads {
    pub(crate) fn new(
        max_total: usize,
        max_per_peer: usize,
        upload_rate: Option<u64>,
        allow: Option<Vec<PeerId>>,
        timing: Timing,
    ) -> Self {
        let data = upload_rate.filter(|r| *r > 0).map(|r| {
            let slots = usize::try_from(r / timing.upload_slot_rate).unwrap_or(usize::MAX).clamp(2, max_total.max(2));
            Slots::new(slots, slots.saturating_mul(WAITING_PER_SLOT))
        });
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            data,
            upload_micros: AtomicU64::new(0),
            per_peer: Mutex::new(HashMap::new()),
            max_per_peer,
            holders: Mutex::new(HashMap::new()),
            next_holder: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            rate: RateLimit::new(upload_rate),
            allow: allow.map(|a| a.into_iter().collect()),
            closing: AtomicBool::new(false),
            answering: AtomicUsize::new(0),
            proofs: Semaphore::new(MAKING_PROOFS),
            watches: Mutex::new(HashMap::new()),
            reading: Mutex::new(Unread::default()),
            arrivals: Arrivals::default(),
            timing,
        }
    }

    /// Refuses new uploads from now on; running ones go on, and the watches held answer now.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.arrivals.wake_all();
    }

    /// Room to hold a watch from `peer`, if the bounds allow one more.
    fn try_watch(&self, peer: PeerId) -> Option<PeerCount<'_>> {
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        PeerCount::try_new(&self.watches, peer, MAX_WATCHES, MAX_WATCHES_PER_PEER)
    }

    /// Room to read one more request from `peer`, if the bounds allow it.
    ///
    /// With every place taken, the peer holding the most gives its oldest up to `peer`, if it
    /// holds more than `peer` would with it (that stream's task is told, and closes it unread):
    /// else peers that open streams and send nothing, 16 apiece, could shut every other peer
    /// out with 64 identities, which cost nothing.
    fn try_read(&self, peer: PeerId) -> Option<ReadSlot<'_>> {
        let mut unread = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let own = unread.peers.get(&peer).map_or(0, VecDeque::len);
        if own >= MAX_READING_PER_PEER {
            return None;
        }
        if unread.total >= MAX_READING {
            let (most, n) = unread.peers.iter().map(|(p, q)| (*p, q.len())).max_by_key(|(_, n)| *n)?;
            if n <= own + 1 {
                return None;
            }
            let streams = unread.peers.get_mut(&most)?;
            let (_, given_up) = streams.pop_front()?;
            if streams.is_empty() {
                unread.peers.remove(&most);
            }
            unread.total -= 1;
            given_up.notify_one();
        }
        let id = unread.next;
        unread.next += 1;
        let given_up = Arc::new(tokio::sync::Notify::new());
        unread.peers.entry(peer).or_default().push_back((id, given_up.clone()));
        unread.total += 1;
        Some(ReadSlot { uploads: self, peer, id, given_up })
    }

    fn try_acquire(&self, peer: PeerId) -> Option<UploadSlot<'_>> {
        self.slot(peer, || self.total.clone().try_acquire_owned().ok())
    }

    /// An upload slot for `peer` if one is free; if not, the slot of an answer that has waited
    /// on its requester for [`PREEMPT_AFTER`] or more, the longest-waiting one, which is cut off.
    /// `None` if the node is closing, `peer` holds its share, or no slot is free or stalled.
    async fn acquire(&self, peer: PeerId) -> Option<UploadSlot<'_>> {
        if let Some(slot) = self.try_acquire(peer) {
            return Some(slot);
        }
        if !self.may_take(&peer) || !self.preempt_stalled(false) {
            return None;
        }
        let permit = tokio::time::timeout(PREEMPT_WAIT, self.total.clone().acquire_owned()).await.ok()?.ok()?;
        self.slot(peer, || Some(permit))
    }

    /// Whether `peer` may take one more upload slot: the node is not closing, and `peer` holds
    /// less than its share.
    fn may_take(&self, peer: &PeerId) -> bool {
        !self.closing.load(Ordering::Relaxed)
            && self.per_peer.lock().unwrap_or_else(|e| e.into_inner()).get(peer).is_none_or(|n| *n < self.max_per_peer)
    }

    /// An upload slot for `peer` with the permit `permit` gives, if `peer` may take one.
    fn slot(
        &self,
        peer: PeerId,
        permit: impl FnOnce() -> Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<UploadSlot<'_>> {
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        let mut map = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&peer).is_some_and(|n| *n >= self.max_per_peer) {
            return None;
        }
        // Counted only with a permit: a peer refused here leaves no entry behind.
        let permit = permit()?;
        *map.entry(peer).or_insert(0) += 1;
        drop(map);
        let id = self.next_holder.fetch_add(1, Ordering::Relaxed);
        let holder = Arc::new(Holder::default());
        self.holders.lock().unwrap_or_else(|e| e.into_inner()).insert(id, holder.clone());
        Some(UploadSlot { uploads: self, peer, id, holder, _permit: permit })
    }

    /// Cuts off the answer that has waited longest on its requester, if it has waited
    /// [`PREEMPT_AFTER`] or more (and, with `holding_data`, holds a piece-upload slot); whether
    /// there was one.
    fn preempt_stalled(&self, holding_data: bool) -> bool {
        let now = stamp(self.epoch);
        let after = u64::try_from(self.timing.preempt_after.as_micros()).unwrap_or(u64::MAX);
        let holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        let stalled = holders
            .values()
            .map(|h| (h.blocked_since.load(Ordering::Relaxed), h))
            .filter(|(since, _)| *since != 0 && now.saturating_sub(*since) >= after)
            .filter(|(_, h)| !holding_data || h.holds_data.load(Ordering::Relaxed))
            .min_by_key(|(since, _)| *since);
        let Some((_, holder)) = stalled else { return false };
        // Not chosen twice: its task lets the slot go at its next poll.
        holder.blocked_since.store(0, Ordering::Relaxed);
        holder.preempted.notify_one();
        true
    }

    /// A piece-upload slot for a request of `priority` (see [`Slots`]: lower goes first), waiting
    /// in line for one if every slot is taken and the line has room for it; `None` when the line
    /// is full of requests as good, when a better one took its place, or when the wait passed
    /// [`MAX_SLOT_WAIT`]. With no upload cap, always a slot at once. The priority is worked out
    /// only for a request that has to wait.
    ///
    /// A peer holds at most half the slots (at least one): past that, its request waits in line
    /// for a slot let go, even while one is free, and takes one only once it holds less (its own
    /// let go, its next request goes at once). A peer reading slowly, or many requests of one
    /// peer, would otherwise hold every slot for as long as their answers take and serve no one
    /// else (a peer may ask for 64 pieces, at 64 KiB/s).
    ///
    /// With every slot taken, an answer holding one that has waited [`PREEMPT_AFTER`] on its
    /// requester is cut off, as [`Uploads::acquire`] cuts one off for its slot: its slot goes to
    /// the line. The caller marks its [`Holder`] once it holds a slot.
    async fn acquire_data(&self, peer: PeerId, priority: impl FnOnce() -> u32) -> Option<Option<DataSlot>> {
        let Some(slots) = &self.data else { return Some(None) };
        let slot = match slots.try_acquire(&peer) {
            Some(slot) => slot,
            None => {
                self.preempt_stalled(true);
                slots.acquire(&peer, priority(), self.timing.max_slot_wait).await?
            }
        };
        Some(Some(DataSlot { _slot: slot }))
    }

    /// A piece upload held its slot for `took`.
    fn record_upload(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // Racing updates may lose a sample; the average only steers a hint.
        let old = self.upload_micros.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 4 + sample / 4 };
        self.upload_micros.store(new, Ordering::Relaxed);
    }

    /// How long a requester turned away from a full line should wait before asking again: about
    /// one upload's time, in which half of a full line gets its slots, so that it comes back when
    /// there is room instead of polling. Within [`BUSY_RETRY`] and [`MAX_SLOT_WAIT`].
    fn busy_retry(&self) -> Duration {
        let micros = self.upload_micros.load(Ordering::Relaxed);
        Duration::from_micros(micros).clamp(self.timing.busy_retry, self.timing.max_slot_wait)
    }

    /// Requests waiting for a piece-upload slot now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.data.as_ref().map_or(0, |slots| slots.waiting())
    }

    /// Whether no upload to a peer other than `peer` runs and nobody waits: the uplink is
    /// `peer`'s alone. Under a cap, piece uploads count; without one, every stream holding an
    /// upload slot (a request read and being answered; a watch holds none).
    fn idle(&self, peer: &PeerId) -> bool {
        match &self.data {
            Some(slots) => slots.only(peer),
            // A peer's count is removed at zero: any other key is another peer's upload.
            None => self.per_peer.lock().unwrap_or_else(|e| e.into_inner()).keys().all(|p| p == peer),
        }
    }

    /// How busy the piece uploads are, as `peer`, the caller (`holding` one slot or not), sees
    /// them.
    fn uplink(&self, peer: &PeerId, holding: bool) -> crate::crowd::Uplink {
        crate::crowd::Uplink { idle: self.idle(peer), room: self.room(peer, holding) }
    }

    /// Whether a piece upload for `peer` could start now without anyone waiting longer: it holds
    /// a slot, or one is free and within its share; and nobody waits in line. Always with no
    /// upload cap.
    fn room(&self, peer: &PeerId, holding: bool) -> bool {
        match &self.data {
            Some(slots) => (holding || slots.could_take(peer)) && slots.waiting() == 0,
            None => true,
        }
    }

    /// Requests being answered: read, and not yet answered in full.
    pub(crate) fn answering(&self) -> usize {
        self.answering.load(Ordering::Relaxed)
    }

    /// Watches held: peers waiting to hear of pieces this node stores.
    pub(crate) fn watching(&self) -> usize {
        self.watches.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }

    /// Uploads in progress.
    pub(crate) fn active(&self) -> usize {
        self.per_peer.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }

    /// The serving side's queues now, each with its bound.
    pub(crate) fn load(&self) -> Load {
        let (uploads, peer_uploads) = {
            let per_peer = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
            (per_peer.values().sum(), per_peer.values().copied().max().unwrap_or(0))
        };
        let watches = self.watching();
        let reading = self.reading.lock().unwrap_or_else(|e| e.into_inner()).total;
        let [piece_slots, line, peer_piece_slots] = self.data.as_ref().map_or([(0, 0); 3], |slots| slots.load());
        Load {
            uploads: (uploads, self.max_total),
            peer_uploads: (peer_uploads, self.max_per_peer),
            piece_slots,
            line,
            peer_piece_slots,
            watches: (watches, MAX_WATCHES),
            reading: (reading, MAX_READING),
        }
    }
}

/// How full a node's serving queues are: each as (now, bound). Nothing a peer does should take
/// any past its bound; netsim checks that they never are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Uploads in progress, and the most at once (`max_uploads`).
    pub uploads: (usize, usize),
    /// The most uploads one peer has, and the most it may (`max_uploads_per_peer`).
    pub peer_uploads: (usize, usize),
    /// Under an upload cap, the piece-upload slots held (the cap sizes them); (0, 0) without.
    pub piece_slots: (usize, usize),
    /// Requests waiting in line for a piece-upload slot.
    pub line: (usize, usize),
    /// The most piece-upload slots one peer holds (at most half of them).
    pub peer_piece_slots: (usize, usize),
    /// Watches held: peers waiting to hear of pieces stored next.
    pub watches: (usize, usize),
    /// Streams whose requests are being read.
    pub reading: (usize, usize),
}

/// What serving needs: the store, the upload bounds, who holds what, and the metrics.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) store: Store,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) crowds: Arc<Crowds>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) activity: Arc<crate::connmgr::PeerActivity>,
}

/// Accepts transfer streams until the node stops. Each stream is handled in its own task so a
/// slow peer never holds up the accept loop (streams past the accept queue are reset; see
/// [`crate::streams`]).
pub(crate) async fn serve(mut incoming: Incoming, server: Server) {
    while let Some((peer, remote, stream)) = incoming.recv().await {
        // Where the request comes from decides which addresses its answer may name (see
        // `Crowds::hints`): the address of the connection it came on, not the host the swarm
        // last recorded for the peer (its news of a new connection may come after the first
        // request, and another connection's request may come between). Not known for a peer
        // we dialled by name: the host recorded for it then.
        let from_public = crate::crowd::from_public(&remote);
        let server = server.clone();
        tokio::spawn(async move {
            // Counted as that host in crowds (see `Crowds::requested_from`).
            server.crowds.requested_from(peer, &remote);
            if let Err(e) = serve_one(peer, from_public, stream, &server).await {
                debug!(%peer, error = %e, "transfer request ended with an error");
            }
        });
    }
}

/// Runs `write`, a refusal written while its stream holds `reading`'s place among the streams
/// being read, until it ends or another peer's stream takes the place: so no more refusals are
/// under way than places.
async fn holding(reading: &ReadSlot<'_>, write: impl Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    tokio::select! {
        written = write => written,
        () = reading.given_up.notified() => Ok(()),
    }
}

/// Serves `peer`'s request on `stream`; `from_public` says whether it came from a public address,
/// if its connection tells (see [`Crowds::hints`](crate::crowd::Crowds::hints)).
async fn serve_one(
    peer: PeerId,
    from_public: Option<bool>,
    mut stream: Stream,
    server: &Server,
) -> std::io::Result<()> {
    let Server { uploads, metrics, .. } = server;
    let started = Instant::now();
    // However the request goes, a peer that stops reading the answer gives its slot up.
    let idle = uploads.timing.request_timeout;
    // The request is read before any upload slot is taken: a peer that opens streams and sends
    // nothing holds only its share of the streams being read, and keeps no connection from
    // being trimmed. A refusal written before a slot is taken holds that share too, so that a
    // peer that asks and never reads holds no more answers than that.
    let Some(reading) = uploads.try_read(peer) else {
        metrics.served("any", "too_many_unread", started.elapsed());
        return Ok(());
    };
    if uploads.allow.as_ref().is_some_and(|a| !a.contains(&peer)) {
        metrics.served("any", "denied", started.elapsed());
        let denied = wire::encode_frame(&Response::Denied);
        return holding(&reading, send_and_close(&mut stream, &denied, idle)).await;
    }
    let read = tokio::time::timeout(uploads.timing.request_timeout, read_frame(&mut stream, MAX_REQUEST_LEN));
    let read = tokio::select! {
        read = read => read,
        () = reading.given_up.notified() => {
            metrics.served("any", "too_many_unread", started.elapsed());
            return Ok(());
        }
    };
    let body = match read {
        Ok(Ok(body)) => body,
        // The requester closed the stream before its request was whole: it gave up on it (a
        // fetch that finished, or a request made redundant), not a malformed request.
        Ok(Err(FrameError::Io(_))) => {
            metrics.served("any", "cancelled", started.elapsed());
            return Ok(());
        }
        Ok(Err(FrameError::Wire(e))) => {
            metrics.served("any", "bad_request", started.elapsed());
            return holding(&reading, refuse(&mut stream, &e, idle)).await;
        }
        Err(_) => {
            metrics.served("any", "timeout", started.elapsed());
            return Ok(());
        }
    };
    let Some(slot) = uploads.acquire(peer).await else {
        metrics.served("any", "busy", started.elapsed());
        let busy = Response::Busy { retry_after_ms: uploads.timing.busy_retry.as_millis() as u32, peers: Vec::new() };
        return holding(&reading, send_and_close(&mut stream, &wire::encode_frame(&busy), idle)).await;
    };
    drop(reading);
    // Cut off if it waits on a requester that takes nothing while others wait for its slot.
    let holder = slot.holder.clone();
    let mut stream = Watched { inner: &mut stream, holder: &holder, epoch: uploads.epoch };
    tokio::select! {
        biased;
        answered = answer(peer, from_public, &mut stream, server, &body, slot, started) => answered,
        () = holder.preempted.notified() => {
            metrics.served("any", "preempted", started.elapsed());
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer took nothing of its answer while others waited for its upload slot",
            ))
        }
    }
}

/// Answers `peer`'s request `body` under `slot`.
async fn answer(
    peer: PeerId,
    from_public: Option<bool>,
    stream: &mut (impl AsyncWrite + Unpin),
    server: &Server,
    body: &[u8],
    slot: UploadSlot<'_>,
    started: Instant,
) -> std::io::Result<()> {
    let Server { store, uploads, crowds, metrics, activity } = server;
    let idle = uploads.timing.request_timeout;
    let in_flight = activity.request(peer);
    let (answering, _) = Counted::new(&uploads.answering);
    let request = match wire::decode_request(body) {
        Ok(r) => r,
        Err(e) => {
            metrics.served("any", "bad_request", started.elapsed());
            return refuse(&mut *stream, &e, idle).await;
        }
    };
    match request {
        Request::Watch { hash, wanted, wait_ms, trace } => {
            // A watch waits for news, not for the uplink: it holds no upload slot, a shutdown does
            // not wait for it, and it does not keep its connection from being trimmed.
            drop((in_flight, slot, answering));
            let wait = Duration::from_millis(u64::from(wait_ms));
            serve_watch((peer, from_public), &mut *stream, server, (hash, wanted, wait, trace), started).await
        }
        Request::Have { hash, trace, prove_size } => {
            let span = info_span!("serve_have", %peer, blob = %hash.short(), trace = %display_trace(trace));
            let mut response = have_map(server, hash, peer, from_public, None);
            if let Response::Have { size, size_proof: proof, .. } = &mut response
                && prove_size
            {
                // From the store: a have-map of many runs names only the first of them.
                let last = Geometry::new(*size).map(|g| g.last_piece());
                let holds_last = last.ok().and_then(|last| store.holds(hash, last)).is_some_and(|(held, _)| held);
                *proof = size_proof(server, hash, *size, holds_last).await;
            }
            answer_have(&mut *stream, metrics, "have", &response, started, idle).instrument(span).await
        }
        Request::Get { hash, pieces, trace } => {
            let span = info_span!("serve_get", %peer, blob = %hash.short(), pieces = pieces.count(), trace = %display_trace(trace));
            async {
                let info = store.info(hash);
                // A set counted for the blob held, whatever count the peer claims (the largest
                // blob's is 2 MiB of bitmap, which a request of 40 bytes could claim).
                let asked = info.as_ref().map(|i| pieces.to_set(i.pieces.piece_count()));
                let held = info.as_ref().zip(asked.as_ref()).map(|(i, asked)| i.pieces.intersection(asked));
                // Only a publisher (a node that pinned the blob) spreads: the peers trading a
                // crowd's pieces serve every piece they hold to whoever asks.
                let spreads = info.as_ref().is_some_and(|i| i.pinned);
                let (Some(held), Some(pieces)) = (held.filter(|h| !h.is_empty()), asked) else {
                    metrics.served("get", "not_found", started.elapsed());
                    return send_and_close(&mut *stream, &wire::encode_frame(&Response::NotFound), idle).await;
                };
                // Past the bound, or asked only for pieces left to other holders: come back later,
                // and meanwhile ask the holders named.
                let busy = |retry: Duration, peers: Vec<PeerHint>| {
                    wire::encode_frame(&Response::Busy { retry_after_ms: retry.as_millis() as u32, peers })
                };
                // Pieces left to other holders are answered at once, before waiting in line, and
                // checked again once a slot is ours: another requester may have been sent them
                // while we waited.
                let offered = crowds.offer(hash, peer, &held, spreads, uploads.uplink(&peer, false), Instant::now());
                let none = PieceSet::empty(held.piece_count());
                // What this request records as served, and gives back if it does not send it.
                let (sending, mut claimed, data_slot, _answer) = match offered.is_empty() {
                    true => (offered, none.clone(), None, None),
                    false => {
                        let priority = || crowds.least_served(hash, &offered);
                        let Some(data) = uploads.acquire_data(peer, priority).await else {
                            metrics.served("get", "busy", started.elapsed());
                            return send_and_close(
                                &mut *stream,
                                &busy(
                                    uploads.busy_retry(),
                                    crowds.hints(hash, peer, from_public, Some(&pieces), Instant::now()),
                                ),
                                idle,
                            )
                            .await;
                        };
                        // Cut off if it stalls while others wait for a piece slot.
                        slot.holder.holds_data.store(true, Ordering::Relaxed);
                        let now = Instant::now();
                        let claim = crowds.claim(hash, peer, &offered, spreads, uploads.uplink(&peer, true), now);
                        // Only pieces `claim` counted are given back.
                        let pieces = claim.pieces.count();
                        let answer = (spreads && pieces > 0).then(|| Answer { crowds, hash, peer, pieces });
                        (claim.pieces, claim.new, Some((data, now)), answer)
                    }
                };
                if sending.is_empty() {
                    metrics.served("get", "spread", started.elapsed());
                    // Held back only for its turn, a piece nobody has from us yet is asked for
                    // again when a slot frees; a piece left to others, once its holders were asked.
                    // Only the first refusal of a burst names holders: the rest were sent before
                    // it arrived, and a requester held back for its turn was named them when served.
                    let now = Instant::now();
                    let (retry, named) = match crowds.asked_first_copy(hash, peer, &held, now) {
                        true => (uploads.busy_retry(), false),
                        false => crowds.spread_refused(hash, peer, uploads.timing.spread_retry, now),
                    };
                    let peers = if named { crowds.hints(hash, peer, from_public, None, now) } else { Vec::new() };
                    return send_and_close(&mut *stream, &busy(retry, peers), idle).await;
                }
                let reader = store.clone();
                let reading = sending.clone();
                let opened = tokio::task::spawn_blocking(move || reader.stream_pieces(hash, &reading, CHUNK)).await;
                // The pieces this request recorded as served, less those it `sent`, are not the
                // peer's to pass on.
                let give_back = |claimed: &PieceSet, sent: &PieceSet| {
                    crowds.not_served(hash, peer, &claimed.difference(sent));
                };
                let opened = match opened {
                    Ok(opened) => opened,
                    Err(e) => {
                        give_back(&claimed, &none);
                        return Err(std::io::Error::other(e));
                    }
                };
                let encoding = match opened {
                    Ok(encoding) if !encoding.pieces().is_empty() => encoding,
                    Ok(_) | Err(shoal_cache::StoreError::NotFound { .. }) => {
                        give_back(&claimed, &none);
                        metrics.served("get", "not_found", started.elapsed());
                        return send_and_close(&mut *stream, &wire::encode_frame(&Response::NotFound), idle).await;
                    }
                    Err(e) => {
                        give_back(&claimed, &none);
                        warn!(error = %e, "cannot read pieces to serve");
                        metrics.served("get", "io", started.elapsed());
                        return send_and_close(&mut *stream, &wire::encode_frame(&Response::NotFound), idle).await;
                    }
                };
                let served = encoding.pieces().clone();
                // The encoding dropped any piece that failed its check.
                give_back(&claimed, &served);
                let now = Instant::now();
                let peers = crowds.hints(hash, peer, from_public, None, now);
                // What we hold now, after the encoding dropped any piece that failed its check.
                let have = store.info(hash).map(|i| i.pieces.first_runs(MAX_RUNS));
                // Recorded as it starts (by a publisher as it chose them): a concurrent request for
                // the same pieces is left to this peer, the collision super-seeding avoids.
                claimed.union_with(&crowds.serving(hash, peer, &served, now));
                // Only moving content keeps a connection from being trimmed: a peer we keep
                // answering `Busy` must not hold a slot a new requester needs.
                activity.touch(peer);
                let header = wire::encode_frame(&Response::Data { pieces: served, peers, have });
                let written =
                    write_pieces(&mut *stream, &header, encoding, (uploads.rate.as_ref(), &uploads.timing), metrics)
                        .await;
                let (result, bytes) = match written {
                    Ok(bytes) => (within(idle, finish(&mut *stream)).await, bytes),
                    Err(e) => (Err(e), 0),
                };
                // Cut off before its last byte (or by a piece that failed its check on the way),
                // or not closed, the peer may not hold them all: others may be sent them. (Of
                // several pieces it may keep the first; this gives them back too.)
                if result.is_err() {
                    give_back(&claimed, &none);
                }
                if result.is_ok() {
                    crowds.delivered(hash, peer, Instant::now());
                    if let Some((_, since)) = &data_slot {
                        uploads.record_upload(since.elapsed());
                    }
                }
                metrics.served("get", if result.is_ok() { "ok" } else { "io" }, started.elapsed());
                debug!(bytes, elapsed_ms = started.elapsed().as_millis() as u64, "served");
                result
            }
            .instrument(span)
            .await
        }
    }
}

/// An answer whose pieces [`Crowds::claim`] counted against its requester's share: they are
/// given back when it ends, however it ends (sent, failed, or its task cancelled).
struct Answer<'a> {
    crowds: &'a Crowds,
    hash: Hash,
    peer: PeerId,
    pieces: u32,
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        self.crowds.answered(self.hash, self.peer, self.pieces);
    }
}

/// A proof of the size of `hash` for a have answer: one we checked or made before (it proves
/// itself, so one given to us serves as well as our own), else one made from the last piece if
/// we hold it, kept for the next asker: a crowd asks the same node many times.
async fn size_proof(server: &Server, hash: Hash, size: u64, holds_last: bool) -> Option<Vec<u8>> {
    let Server { store, crowds, uploads, .. } = server;
    if let Some(proof) = crowds.proof(hash, size) {
        return Some(proof.to_vec());
    }
    if !holds_last {
        return None;
    }
    // A proof not made yet reads and hashes a last piece: a few at a time, since a have request
    // holds no piece-upload slot, and a peer asking about one blob after another (each a small
    // request) would otherwise have the node read and hash for every one at once. One made
    // meanwhile (a crowd asks at once) is not made again.
    let _making = uploads.proofs.acquire().await.ok()?;
    if let Some(proof) = crowds.proof(hash, size) {
        return Some(proof.to_vec());
    }
    let reader = store.clone();
    match tokio::task::spawn_blocking(move || reader.size_proof(hash)).await {
        Ok(Ok(Some(proof))) => {
            crowds.remember_proof(hash, size, proof.clone());
            Some(proof)
        }
        Ok(Ok(None)) | Ok(Err(shoal_cache::StoreError::NotFound { .. })) | Err(_) => None,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read a size proof to serve");
            None
        }
    }
}

fn display_trace(trace: Option<TraceId>) -> String {
    trace.map(|t| t.to_string()).unwrap_or_default()
}

async fn refuse(stream: &mut (impl AsyncWrite + Unpin), e: &WireError, idle: Duration) -> std::io::Result<()> {
    let mut reason = e.to_string();
    // At a character's boundary: a cut inside one panics.
    let mut cut = reason.len().min(wire::MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason.truncate(cut);
    send_and_close(stream, &wire::encode_frame(&Response::BadRequest { reason }), idle).await
}

/// Writes a response and closes the stream, giving up if the peer has not taken it within `idle`.
async fn send_and_close(
    stream: &mut (impl AsyncWrite + Unpin),
    response: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    within(idle, async {
        stream.write_all(response).await?;
        finish(stream).await
    })
    .await
}

/// Runs a write of an answer, failing it with `TimedOut` if it takes longer than `limit`: a peer
/// that stops reading (or lets its flow-control window fill) would otherwise hold its upload slot,
/// its count against the per-peer bound and its connection for as long as it likes.
async fn within(limit: Duration, write: impl Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    match tokio::time::timeout(limit, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer stopped reading the answer")),
    }
}

/// Writes an answer's `header`, then the pieces `encoding` encodes, a step at a time on a blocking
/// thread, so that an answer on its way holds a step of its encoding (see
/// [`shoal_cache::Store::stream_pieces`]). Each chunk is taken from the upload cap first and
/// counted as served once written. Returns the bytes of pieces written; a piece that fails its
/// check on the way cuts the answer off, and so does a peer that reads nothing for the request
/// timeout or falls below the least rate (the time spent waiting for our own upload cap aside),
/// the bounds a requester holds its servers to.
async fn write_pieces(
    stream: &mut (impl AsyncWrite + Unpin),
    header: &[u8],
    mut encoding: shoal_cache::PieceStream,
    (rate, timing): (Option<&RateLimit>, &Timing),
    metrics: &crate::metrics::Metrics,
) -> std::io::Result<u64> {
    let total = header.len() + encoding.encoded_len();
    let mut budget = WriteBudget::new(timing, total);
    budget.write(stream, header).await?;
    let mut written = 0;
    loop {
        let (back, step) = tokio::task::spawn_blocking(move || {
            let step = encoding.next_step(CHUNK);
            (encoding, step)
        })
        .await
        .map_err(std::io::Error::other)?;
        encoding = back;
        let body = match step {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(written),
            Err(e) => {
                match e {
                    shoal_cache::StoreError::Corrupt { piece, .. } => {
                        warn!(piece, "cut off an answer: a piece failed its check")
                    }
                    _ => warn!(error = %e, "cut off an answer: cannot read the pieces"),
                }
                return Err(std::io::Error::other(e));
            }
        };
        for chunk in body.chunks(CHUNK) {
            if let Some(r) = rate {
                r.take(chunk.len()).await;
            }
            budget.write(stream, chunk).await?;
            metrics.bytes_served.inc_by(chunk.len() as u64);
            written += chunk.len() as u64;
        }
    }
}

/// The time a peer has to read an answer of some length: at most the request timeout without
/// taking a byte, and in all that timeout plus the answer's length at the least rate.
struct WriteBudget {
    idle: Duration,
    left: Duration,
}

impl WriteBudget {
    fn new(timing: &Timing, len: usize) -> Self {
        let at_least_rate = Duration::from_secs_f64(len as f64 / timing.min_rate as f64);
        Self { idle: timing.request_timeout, left: timing.request_timeout.saturating_add(at_least_rate) }
    }

    /// Writes `bytes` (at most a chunk), out of the budget.
    async fn write(&mut self, stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
        let started = tokio::time::Instant::now();
        let result = within(self.idle.min(self.left), stream.write_all(bytes)).await;
        self.left = self.left.saturating_sub(started.elapsed());
        result
    }
}

/// Flushes and closes a stream an answer was written to.
async fn finish(stream: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
    stream.flush().await?;
    stream.close().await
}

/// Why a frame could not be read: the stream failed or ended inside it, or its length prefix
/// broke the limit.
enum FrameError {
    Io(std::io::Error),
    Wire(WireError),
}

async fn read_frame(stream: &mut (impl AsyncRead + Unpin), max: usize) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.map_err(FrameError::Io)?;
    let len = wire::frame_len(prefix, max).map_err(FrameError::Wire)?;
    // Grown as the bytes arrive: a peer that sends a length and then nothing holds no more than
    // it sent.
    let mut body = Vec::new();
    (&mut *stream).take(len as u64).read_to_end(&mut body).await.map_err(FrameError::Io)?;
    if body.len() != len {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(body)
}

/// What a failed read or write on a stream we opened says about the peer: it refused the
/// protocol, or the stream or connection failed. The stream's protocol was offered with the
/// request, not agreed before it (see `swarm`), so a peer that does not speak it is found out
/// by the first read.
fn io_fault(e: &std::io::Error) -> PeerFault {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<NegotiationError>()) {
        Some(NegotiationError::Failed) => PeerFault::Protocol,
        _ => PeerFault::Io,
    }
}

impl PeerFault {
    /// The metrics label for this failure.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Busy(_) => "busy",
            Self::Denied => "denied",
            Self::Corrupt => "corrupt",
            Self::Truncated => "truncated",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::Protocol => "protocol",
        }
    }
}

/// Why a request to a peer did not give what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerFault {
    /// The peer holds none of it.
    NotFound,
    /// The peer is at its upload bound.
    Busy(Duration),
    /// The peer does not serve us.
    Denied,
    /// The peer sent bytes that failed verification.
    Corrupt,
    /// The peer's answer ended early.
    Truncated,
    /// The peer took too long.
    Timeout,
    /// The stream or connection failed.
    Io,
    /// The peer sent something the protocol does not allow.
    Protocol,
}

async fn open(control: &Control, peer: PeerId, timing: Timing) -> Result<Stream, PeerFault> {
    match tokio::time::timeout(timing.request_timeout, control.open(peer)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(OpenError::Unsupported)) => Err(PeerFault::Protocol),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "cannot open a transfer stream");
            Err(PeerFault::Io)
        }
        Err(_) => Err(PeerFault::Timeout),
    }
}

async fn exchange(stream: &mut Stream, request: &Request, timing: Timing) -> Result<Response, PeerFault> {
    refusal(exchange_within(stream, request, timing.request_timeout).await?)
}

/// `response`, unless the peer refused the request (`NotFound`, `Denied`, `BadRequest`): then the
/// fault that refusal is.
fn refusal(response: Response) -> Result<Response, PeerFault> {
    match response {
        Response::NotFound => Err(PeerFault::NotFound),
        Response::Denied => Err(PeerFault::Denied),
        Response::BadRequest { reason } => {
            warn!(%reason, "peer refused our request");
            Err(PeerFault::Protocol)
        }
        other => Ok(other),
    }
}

/// Sends `request` and reads the answer's header, within `timeout` for both: a peer that takes
/// no bytes (gives the stream no flow-control credit) is given up on as one that never answers.
async fn exchange_within(stream: &mut Stream, request: &Request, timeout: Duration) -> Result<Response, PeerFault> {
    let exchange = async {
        stream.write_all(&wire::encode_frame(request)).await.map_err(|e| io_fault(&e))?;
        stream.flush().await.map_err(|e| io_fault(&e))?;
        read_frame(stream, MAX_RESPONSE_LEN).await.map_err(|e| match e {
            FrameError::Io(e) => io_fault(&e),
            FrameError::Wire(_) => PeerFault::Protocol,
        })
    };
    let body = tokio::time::timeout(timeout, exchange).await.map_err(|_| PeerFault::Timeout)??;
    wire::decode_response(&body).map_err(|_| PeerFault::Protocol)
}

/// Closes our side of `stream`, waiting at most `timeout` for the peer to take it.
async fn close_within(stream: &mut Stream, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, stream.close()).await;
}

/// Closes our side of `stream` in a task of its own (bounded by the request timeout), so that
/// the answer it carried is taken at once: a caller that stops waiting for a have request (the
/// fetch's own timeout) must not lose an answer received whole while the close was under way.
fn close_behind(mut stream: Stream, timing: Timing) {
    tokio::spawn(async move { close_within(&mut stream, timing.request_timeout).await });
}

/// Answers a watch once the node holds a piece its requester wants, the wait ends (at most
/// [`MAX_WATCH_WAIT`]) or the node shuts down, with the have-map, as `Have` would without a size
/// proof. Past the bound on watches held, at once.
async fn serve_watch(
    (peer, from_public): (PeerId, Option<bool>),
    stream: &mut (impl AsyncWrite + Unpin),
    server: &Server,
    (hash, wanted, wait, trace): (Hash, PieceRuns, Duration, Option<TraceId>),
    started: Instant,
) -> std::io::Result<()> {
    let Server { store, uploads, metrics, .. } = server;
    let span = info_span!("serve_watch", %peer, blob = %hash.short(), trace = %display_trace(trace));
    // A set only for a blob held and counted as the peer counts it (the largest blob's is 2 MiB
    // of bitmap, which a request of 40 bytes could claim). Otherwise the watch is answered at
    // once: the have-map tells the requester the size this node holds, or that it holds none.
    let count = store.size(hash).and_then(|size| Geometry::new(size).ok()).map(|g| g.piece_count());
    let wanted = count.filter(|&n| n == wanted.piece_count()).map(|n| wanted.to_set(n));
    // Woken at every piece of the blob the node stores, a watch looks without copying the
    // blob's have-map.
    if let Some(wanted) = &wanted
        && let Some(_watch) = uploads.try_watch(peer)
    {
        // Subscribed before the first look, so that a piece stored in between still wakes it;
        // only while the watch is held, which keeps the channels within the bound on watches.
        let mut arrivals = uploads.arrivals.subscribe(hash);
        let until = tokio::time::Instant::now() + wait.min(uploads.timing.max_watch_wait);
        while store.has_news(hash, wanted) == Some(false) && !uploads.closing.load(Ordering::Relaxed) {
            if !matches!(tokio::time::timeout_at(until, arrivals.changed()).await, Ok(Ok(()))) {
                break;
            }
        }
    }
    let response = have_map(server, hash, peer, from_public, wanted.as_ref());
    answer_have(stream, metrics, "watch", &response, started, uploads.timing.request_timeout).instrument(span).await
}

/// What this node holds of `hash`, as `Have` answers it to `peer` (without a size proof), or
/// `NotFound` if it holds none of it. The hints name first the holders of `wanted`, if given.
fn have_map(
    server: &Server,
    hash: Hash,
    peer: PeerId,
    from_public: Option<bool>,
    wanted: Option<&PieceSet>,
) -> Response {
    match server.store.info(hash) {
        Some(info) if !info.pieces.is_empty() => Response::Have {
            size: info.size,
            pieces: info.pieces.first_runs(MAX_RUNS),
            peers: server.crowds.hints(hash, peer, from_public, wanted, Instant::now()),
            size_proof: None,
        },
        _ => Response::NotFound,
    }
}

/// Sends `response` (a have-map or `NotFound`) and counts it as served under `kind`.
async fn answer_have(
    stream: &mut (impl AsyncWrite + Unpin),
    metrics: &crate::metrics::Metrics,
    kind: &'static str,
    response: &Response,
    started: Instant,
    idle: Duration,
) -> std::io::Result<()> {
    let outcome = if matches!(response, Response::NotFound) { "not_found" } else { "ok" };
    let r = send_and_close(stream, &wire::encode_frame(response), idle).await;
    metrics.served(kind, outcome, started.elapsed());
    r
}

/// A peer's answer to `Have`.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) size: u64,
    pub(crate) pieces: PieceSet,
    pub(crate) rtt: Duration,
    pub(crate) hints: Vec<PeerHint>,
    /// A proof of `size` that came with the answer and checked out against the hash.
    pub(crate) size_proof: Option<Vec<u8>>,
}

/// Asks `peer` which pieces of `hash` it holds: its claimed size, its pieces, the round-trip time
/// of the exchange and the other holders it names; with `prove_size`, also a proof of the size,
/// checked here. A proof that fails the check is the peer's fault ([`PeerFault::Corrupt`]).
pub(crate) async fn ask_have(
    control: Control,
    peer: PeerId,
    hash: Hash,
    trace: TraceId,
    prove_size: bool,
    timing: Timing,
) -> Result<Held, PeerFault> {
    let mut stream = open(&control, peer, timing).await?;
    let started = Instant::now();
    let response = exchange(&mut stream, &Request::Have { hash, trace: Some(trace), prove_size }, timing).await?;
    let rtt = started.elapsed();
    close_behind(stream, timing);
    match response {
        Response::Have { size, pieces, peers, size_proof } => {
            let size_proof = match size_proof {
                Some(proof) if verify::check_size_proof(hash, size, &proof) => Some(proof),
                Some(_) => return Err(PeerFault::Corrupt),
                None => None,
            };
            Ok(Held { size, pieces, rtt, hints: peers, size_proof })
        }
        Response::Busy { retry_after_ms, .. } => Err(PeerFault::Busy(Duration::from_millis(u64::from(retry_after_ms)))),
        _ => Err(PeerFault::Protocol),
    }
}

/// Watches `peer` for pieces of `hash` in `wanted`: its have-map once it holds one of them or
/// `wait` has passed. `Ok(None)` if the peer does not know watches (an older node answers
/// `BadRequest`).
pub(crate) async fn watch_have(
    control: Control,
    peer: PeerId,
    (hash, wanted, wait): (Hash, PieceSet, Duration),
    trace: TraceId,
    timing: Timing,
) -> Result<Option<Held>, PeerFault> {
    let mut stream = open(&control, peer, timing).await?;
    let started = Instant::now();
    let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let request = Request::Watch { hash, wanted: (&wanted).into(), wait_ms, trace: Some(trace) };
    let response = exchange_within(&mut stream, &request, timing.request_timeout.saturating_add(wait)).await?;
    let rtt = started.elapsed();
    close_behind(stream, timing);
    if matches!(response, Response::BadRequest { .. }) {
        return Ok(None);
    }
    match refusal(response)? {
        Response::Have { size, pieces, peers, .. } => {
            Ok(Some(Held { size, pieces, rtt, hints: peers, size_proof: None }))
        }
        Response::Busy { retry_after_ms, .. } => Err(PeerFault::Busy(Duration::from_millis(u64::from(retry_after_ms)))),
        _ => Err(PeerFault::Protocol),
    }
}

/// The outcome of a `Get`.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) verified: PieceSet,
    pub(crate) bytes: u64,
    pub(crate) fault: Option<PeerFault>,
    /// Other holders the peer named.
    pub(crate) hints: Vec<PeerHint>,
    /// The pieces the peer offers us now, if it said.
    pub(crate) have: Option<PieceSet>,
    /// Our store failed to take verified pieces (a full disk, the blob evicted meanwhile): no
    /// fault of the peer's, and nothing another peer could help with.
    pub(crate) store_error: Option<shoal_cache::StoreError>,
    /// Blobs the cache evicted to make room for the pieces stored.
    pub(crate) evicted: Vec<Hash>,
}

/// One `Get`: which pieces of which blob, from whom, under which trace.
#[derive(Debug)]
pub(crate) struct PieceRequest {
    pub(crate) peer: PeerId,
    pub(crate) hash: Hash,
    pub(crate) geometry: Geometry,
    pub(crate) pieces: PieceSet,
    pub(crate) trace: TraceId,
}

/// Sends `request`, verifies what arrives and stores every chunk group that passes; reads are
/// taken from the download cap, if any.
pub(crate) async fn get_pieces(
    control: Control,
    store: Store,
    arrivals: Arrivals,
    rate: Option<Arc<RateLimit>>,
    request: PieceRequest,
    timing: Timing,
) -> Got {
    let PieceRequest { peer, hash, geometry, pieces, trace } = request;
    let none = PieceSet::empty(geometry.piece_count());
    let fail = |fault| Got {
        verified: none.clone(),
        bytes: 0,
        fault: Some(fault),
        hints: Vec::new(),
        have: None,
        store_error: None,
        evicted: Vec::new(),
    };
    let mut stream = match open(&control, peer, timing).await {
        Ok(s) => s,
        Err(f) => return fail(f),
    };
    let (sent, hints, have) =
        match exchange(&mut stream, &Request::Get { hash, pieces: (&pieces).into(), trace: Some(trace) }, timing).await
        {
            Ok(Response::Data { pieces: sent, peers, have }) => (sent, peers, have),
            Ok(Response::Busy { retry_after_ms, peers }) => {
                let wait = Duration::from_millis(u64::from(retry_after_ms));
                let fault = Some(PeerFault::Busy(wait));
                let evicted = Vec::new();
                return Got { verified: none, bytes: 0, fault, hints: peers, have: None, store_error: None, evicted };
            }
            Ok(_) => return fail(PeerFault::Protocol),
            Err(f) => return fail(f),
        };
    if sent.piece_count() != geometry.piece_count() || !sent.difference(&pieces).is_empty() || sent.is_empty() {
        return fail(PeerFault::Protocol);
    }
    // The exact length is known; never read more than that. A peer that falls below the least
    // rate, or goes silent, is cut off, and what it did send is still verified and kept.
    let mut decoder = verify::PieceDecoder::new(hash, geometry, &sent);
    let deadline = tokio::time::Instant::now()
        + timing.request_timeout
        + Duration::from_secs_f64(decoder.remaining() as f64 / timing.min_rate as f64);
    let Received { stored: verified, bytes, fault, store_error, evicted } = receive(
        &mut stream,
        &mut decoder,
        (&store, &arrivals),
        hash,
        rate.as_deref(),
        deadline,
        timing.request_timeout,
    )
    .await;
    close_within(&mut stream, timing.request_timeout).await;
    Got { verified, bytes, fault, hints, have, store_error, evicted }
}

/// What [`receive`] took from a response.
struct Received {
    stored: PieceSet,
    bytes: u64,
    /// Why the response fell short, if it did.
    fault: Option<PeerFault>,
    store_error: Option<shoal_cache::StoreError>,
    /// Blobs the cache evicted to make room for the pieces stored.
    evicted: Vec<Hash>,
}

/// Reads a `Data` response's body into `decoder` until it is complete, the stream ends or fails,
/// `deadline` passes (later by our waits on our own download cap, up to `silence` in all) or the
/// peer is silent for `silence` (the request timeout), storing each piece as soon as it verified
/// while the next one arrives (and waking the watches this node holds). Returns the pieces
/// stored, the bytes read, and why the response fell short, if it did.
async fn receive(
    stream: &mut (impl AsyncRead + Unpin),
    decoder: &mut verify::PieceDecoder,
    (store, arrivals): (&Store, &Arrivals),
    hash: Hash,
    rate: Option<&RateLimit>,
    mut deadline: tokio::time::Instant,
    silence: Duration,
) -> Received {
    let mut stored = PieceSet::empty(decoder.verified().piece_count());
    let mut evicted = Vec::new();
    let mut chunk = vec![0u8; (decoder.remaining() as usize).min(CHUNK)];
    let mut bytes = 0u64;
    let mut fault = None;
    let mut extended = Duration::ZERO;
    // One store write at a time, so that at most one piece waits for the disk.
    let mut writing: Option<tokio::task::JoinHandle<Result<shoal_cache::Stored, shoal_cache::StoreError>>> = None;
    loop {
        let want = (decoder.remaining() as usize).min(CHUNK);
        if want > 0 && fault.is_none() {
            if let Some(r) = rate {
                let waiting = tokio::time::Instant::now();
                r.take(want).await;
                // Our own download cap's wait is not the peer's: the deadline moves by it, up to
                // one request timeout in all. (A slow peer's bytes gather while we wait, and come
                // at once after: past that, the least rate holds it to account again.)
                let waited = waiting.elapsed().min(silence.saturating_sub(extended));
                extended += waited;
                deadline += waited;
            }
            let until = deadline.min(tokio::time::Instant::now() + silence);
            let read = tokio::time::timeout_at(until, stream.read(&mut chunk[..want])).await;
            // A read brings what had come by then: the rest of the allowance is not spent.
            if let Some(r) = rate {
                let moved = match &read {
                    Ok(Ok(n)) => *n,
                    _ => 0,
                };
                r.give_back(want - moved);
            }
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => fault = Some(PeerFault::Truncated),
                Ok(Ok(n)) => {
                    bytes += n as u64;
                    if decoder.push(&chunk[..n]).is_err() {
                        fault = Some(PeerFault::Corrupt);
                    }
                }
                // Cut off by us: the tail is missing because we stopped reading.
                Err(_) => fault = Some(PeerFault::Timeout),
            }
        }
        let ready = decoder.take_ready();
        let done = ready.is_empty() && (fault.is_some() || decoder.remaining() == 0);
        if (!ready.is_empty() || done)
            && let Some(write) = writing.take()
        {
            match write.await {
                Ok(Ok(written)) => {
                    stored.union_with(&written.pieces);
                    evicted.extend(written.evicted);
                    arrivals.stored(hash);
                }
                Ok(Err(e)) => {
                    warn!(blob = %hash, error = %e, "storing verified pieces failed");
                    return Received { stored, bytes, fault: None, store_error: Some(e), evicted };
                }
                // Our own store's task failed (it panicked): no fault of the peer's.
                Err(e) => {
                    let source = std::io::Error::other(e.to_string());
                    let e =
                        shoal_cache::StoreError::Io { op: "store pieces of", path: hash.to_string().into(), source };
                    return Received { stored, bytes, fault: None, store_error: Some(e), evicted };
                }
            }
        }
        if done {
            break;
        }
        if !ready.is_empty() {
            let store = store.clone();
            writing = Some(tokio::task::spawn_blocking(move || store.store_pieces(hash, &ready)));
        }
    }
    Received { stored, bytes, fault, store_error: None, evicted }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_piece_wakes_only_the_watches_of_its_blob_and_channels_go_with_their_watches() {
        let arrivals = Arrivals::default();
        let (a, b) = (Hash::from([1; 32]), Hash::from([2; 32]));
        let mut watch_a = arrivals.subscribe(a);
        let watch_b = arrivals.subscribe(b);
        arrivals.stored(a);
        assert!(watch_a.has_changed().expect("open"), "a piece of its blob wakes a watch");
        assert!(!watch_b.has_changed().expect("open"), "a piece of another blob does not");
        watch_a.borrow_and_update();
        arrivals.wake_all();
        assert!(watch_a.has_changed().expect("open") && watch_b.has_changed().expect("open"), "a shutdown wakes all");

        // A blob's channel goes once its last watch did: at its next piece, or when the map is full.
        drop(watch_a);
        arrivals.stored(a);
        assert!(!arrivals.0.lock().unwrap().contains_key(&a));
        drop(watch_b);
        let held: Vec<_> = (0..MAX_WATCHES as u32).map(|i| arrivals.subscribe(Hash::of(&i.to_le_bytes()))).collect();
        assert!(arrivals.0.lock().unwrap().len() <= MAX_WATCHES, "the channels are bounded by the watches held");
        drop(held);
        let _one = arrivals.subscribe(a);
        assert_eq!(arrivals.0.lock().unwrap().len(), 1, "channels of blobs no watch waits on go");
    }

    #[test]
    fn a_refused_protocol_is_told_apart_from_a_broken_stream() {
        // How multistream-select reports, on the first read, that the peer refused the protocol
        // the stream was opened with.
        let refused = std::io::Error::from(NegotiationError::Failed);
        assert_eq!(io_fault(&refused), PeerFault::Protocol);
        for broken in [std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::UnexpectedEof] {
            assert_eq!(io_fault(&std::io::Error::from(broken)), PeerFault::Io);
        }
    }

    /// A peer's end of a stream that takes `per_ms` bytes a millisecond, or none.
    struct Reader {
        per_ms: usize,
        taken: usize,
        next: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl Reader {
        fn new(per_ms: usize) -> Self {
            Self { per_ms, taken: 0, next: None }
        }
    }

    impl AsyncWrite for Reader {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.per_ms == 0 {
                return std::task::Poll::Pending;
            }
            if let Some(next) = self.next.as_mut() {
                std::task::ready!(next.as_mut().poll(cx));
            }
            let n = buf.len().min(self.per_ms);
            self.taken += n;
            self.next = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A peer that stops reading an answer gives its upload slot up after the request timeout,
    /// and one reading too slowly once its answer took longer than it would at the least rate;
    /// one reading at the least rate gets the whole answer.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_gives_its_slot_up() {
        let timing = Timing::new(1.0);
        let started = tokio::time::Instant::now();
        let stalled = send_and_close(&mut Reader::new(0), b"answer", timing.request_timeout).await;
        assert_eq!(stalled.map_err(|e| e.kind()), Err(std::io::ErrorKind::TimedOut));
        assert_eq!(started.elapsed(), timing.request_timeout);

        // A 1 MiB answer, written a chunk at a time as `write_pieces` does.
        let answer = vec![7u8; 1 << 20];
        let write = |per_ms| {
            let answer = answer.clone();
            async move {
                let mut reader = Reader::new(per_ms);
                let mut budget = WriteBudget::new(&timing, answer.len());
                for chunk in answer.chunks(CHUNK) {
                    budget.write(&mut reader, chunk).await?;
                }
                Ok::<_, std::io::Error>(reader.taken)
            }
        };
        // 128 bytes a millisecond is 125 KiB/s, above the least rate of 64 KiB/s.
        assert_eq!(write(128).await.ok(), Some(answer.len()));
        // 32 a millisecond, below it: cut off once the answer took the timeout and 16 s.
        let started = tokio::time::Instant::now();
        assert_eq!(write(32).await.map_err(|e| e.kind()), Err(std::io::ErrorKind::TimedOut));
        let allowed = timing.request_timeout + Duration::from_secs(16);
        assert!(started.elapsed() <= allowed + Duration::from_millis(2), "{:?}", started.elapsed());
    }

    /// Holds an upload slot of `uploads` for `peer` while it writes a 1 MiB answer to a peer that
    /// takes `per_ms` bytes a millisecond, as `serve_one` does: cut off if a newcomer takes the
    /// slot.
    /// With `pieces`, it holds a piece-upload slot as well, as an answer to `Get` does.
    async fn answer_under_a_slot(uploads: &Uploads, peer: PeerId, per_ms: usize, pieces: bool) -> std::io::Result<()> {
        let slot = uploads.acquire(peer).await.expect("a free slot");
        let holder = slot.holder.clone();
        let data = match pieces {
            true => {
                let data = uploads.acquire_data(peer, || 0).await.flatten().expect("a free piece slot");
                holder.holds_data.store(true, Ordering::Relaxed);
                Some(data)
            }
            false => None,
        };
        let mut reader = Reader::new(per_ms);
        let mut stream = Watched { inner: &mut reader, holder: &holder, epoch: uploads.epoch };
        let answer = vec![7u8; 1 << 20];
        let write = async {
            let _slot = (slot, data);
            let mut budget = WriteBudget::new(&uploads.timing, answer.len());
            for chunk in answer.chunks(CHUNK) {
                budget.write(&mut stream, chunk).await?;
            }
            Ok(())
        };
        tokio::select! {
            biased;
            written = write => written,
            () = holder.preempted.notified() => Err(std::io::ErrorKind::Interrupted.into()),
        }
    }

    /// Peers that ask and never read cannot hold every upload slot between them: once an answer
    /// has waited [`PREEMPT_AFTER`] on its requester, a newcomer that finds no slot free takes its
    /// slot and the answer is cut off. An answer its requester reads keeps its slot.
    #[tokio::test(start_paused = true)]
    async fn a_requester_that_takes_nothing_gives_its_slot_to_a_newcomer() {
        let uploads = Uploads::new(2, 8, None, None, Timing::new(1.0));
        let never_reads = answer_under_a_slot(&uploads, PeerId::random(), 0, false);
        let reads = answer_under_a_slot(&uploads, PeerId::random(), 128, false);
        let newcomers = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(uploads.acquire(PeerId::random()).await.is_none(), "no answer has stalled long yet");
            tokio::time::sleep(PREEMPT_AFTER).await;
            let taken = uploads.acquire(PeerId::random()).await;
            assert!(taken.is_some(), "the slot of the answer nobody reads");
            assert!(uploads.acquire(PeerId::random()).await.is_none(), "the answer being read keeps its slot");
        };
        let (never_reads, reads, ()) = tokio::join!(never_reads, reads, newcomers);
        assert_eq!(never_reads.map_err(|e| e.kind()), Err(std::io::ErrorKind::Interrupted));
        assert!(reads.is_ok(), "{reads:?}");
        assert!(uploads.holders.lock().unwrap().is_empty(), "nothing left behind");
    }

    /// Under an upload cap the piece-upload slots are the few that matter: a requester that
    /// takes nothing holds one no longer than [`PREEMPT_AFTER`] while others wait in line for
    /// it; an answer being read keeps its own.
    #[tokio::test(start_paused = true)]
    async fn a_requester_that_takes_nothing_gives_its_piece_slot_to_the_line() {
        let uploads = two_slots();
        let never_reads = answer_under_a_slot(&uploads, PeerId::random(), 0, true);
        // 1 MiB at 100 bytes a millisecond: still sending when the last newcomer leaves the line.
        let reads = answer_under_a_slot(&uploads, PeerId::random(), 100, true);
        let newcomers = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let early = uploads.acquire_data(PeerId::random(), || 0).await;
            assert!(early.is_none(), "no answer has stalled long yet");
            tokio::time::sleep(PREEMPT_AFTER).await;
            let taken = uploads.acquire_data(PeerId::random(), || 0).await.flatten();
            assert!(taken.is_some(), "the piece slot of the answer nobody reads");
            let second = uploads.acquire_data(PeerId::random(), || 0).await;
            assert!(second.is_none(), "the answer being read keeps its piece slot");
        };
        let (never_reads, reads, ()) = tokio::join!(never_reads, reads, newcomers);
        assert_eq!(never_reads.map_err(|e| e.kind()), Err(std::io::ErrorKind::Interrupted));
        assert!(reads.is_ok(), "{reads:?}");
    }

    /// A peer refused at the node-wide bound leaves nothing behind in the per-peer counts.
    #[test]
    fn a_refused_peer_is_not_remembered() {
        let uploads = Uploads::new(1, 8, None, None, Timing::new(1.0));
        let first = uploads.try_acquire(PeerId::random()).expect("a free upload");
        for _ in 0..100 {
            assert!(uploads.try_acquire(PeerId::random()).is_none());
        }
        assert_eq!(uploads.per_peer.lock().unwrap().len(), 1);
        drop(first);
        assert!(uploads.per_peer.lock().unwrap().is_empty());
    }

    /// Streams whose request has not come hold none of the upload slots: a peer that opens
    /// streams and sends nothing fills only its own share of the streams being read.
    #[test]
    fn unread_streams_take_no_upload_slot_and_are_bounded_per_peer() {
        let uploads = Uploads::new(1, 8, None, None, Timing::new(1.0));
        let idle = PeerId::random();
        let unread: Vec<_> = std::iter::from_fn(|| uploads.try_read(idle)).take(100).collect();
        assert_eq!(unread.len(), MAX_READING_PER_PEER);
        let other = PeerId::random();
        let reading = uploads.try_read(other).expect("another peer's request is read");
        drop(reading);
        assert!(uploads.try_acquire(other).is_some(), "the one upload slot is free for a request read");
        drop(unread);
        assert!(uploads.reading.lock().unwrap().peers.is_empty(), "nothing left behind");
        // The bound in all: many peers, one stream each.
        let many: Vec<_> = (0..MAX_READING + 5).filter_map(|_| uploads.try_read(PeerId::random())).collect();
        assert_eq!(many.len(), MAX_READING);
    }

    /// Peers holding every place among the streams being read, 16 apiece, cannot shut a newcomer
    /// out: the one holding the most gives its oldest up. Peers as well off as the newcomer
    /// keep theirs.
    #[test]
    fn a_newcomer_takes_the_oldest_unread_stream_of_the_peer_holding_most() {
        use futures::FutureExt;
        let uploads = Uploads::new(64, 8, None, None, Timing::new(1.0));
        let sybils: Vec<PeerId> = (0..MAX_READING / MAX_READING_PER_PEER).map(|_| PeerId::random()).collect();
        let mut unread: Vec<Vec<ReadSlot<'_>>> = sybils
            .iter()
            .map(|&p| (0..MAX_READING_PER_PEER).map(|_| uploads.try_read(p).expect("room")).collect())
            .collect();
        assert_eq!(uploads.reading.lock().unwrap().total, MAX_READING);
        // A sybil with one fewer gains nothing by opening another: it would hold as many.
        drop(unread[0].pop().expect("one"));
        unread[0].push(uploads.try_read(sybils[0]).expect("its own place back"));
        assert!(uploads.try_read(sybils[0]).is_none(), "past its own bound");
        let newcomer = uploads.try_read(PeerId::random()).expect("a place for a peer holding none");
        let told: Vec<(usize, usize)> = unread
            .iter_mut()
            .enumerate()
            .flat_map(|(p, streams)| {
                streams
                    .iter_mut()
                    .enumerate()
                    .filter_map(move |(i, r)| r.given_up.notified().now_or_never().map(|()| (p, i)))
            })
            .collect();
        assert_eq!(told.len(), 1, "one stream given up");
        assert_eq!(told[0].1, 0, "its peer's oldest");
        assert_eq!(uploads.reading.lock().unwrap().total, MAX_READING);
        // The stream given up lets go of nothing more when its task ends.
        let (p, i) = told[0];
        drop(unread[p].remove(i));
        assert_eq!(uploads.reading.lock().unwrap().total, MAX_READING);
        drop(newcomer);
        drop(unread);
        assert_eq!(uploads.reading.lock().unwrap().total, 0);
        assert!(uploads.reading.lock().unwrap().peers.is_empty());
    }

    /// Two piece-upload slots: a 2 MiB/s cap gives one per [`UPLOAD_SLOT_RATE`].
    fn two_slots() -> Uploads {
        Uploads::new(64, 8, Some(2 * UPLOAD_SLOT_RATE), None, Timing::new(1.0))
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_node_keeps_a_short_line_and_serves_it_in_order() {
        let uploads = Arc::new(two_slots());
        let first = uploads.acquire_data(PeerId::random(), || 0).await.flatten().expect("a free slot");
        let _second = uploads.acquire_data(PeerId::random(), || 0).await.flatten().expect("a free slot");
        // Every slot is taken: four requests may wait, in the order they came.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..4 {
            let (uploads, tx) = (uploads.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let slot = uploads.acquire_data(PeerId::random(), || 0).await.flatten();
                let _ = tx.send((i, slot.is_some()));
                slot
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(uploads.waiting(), 4);
        // The fifth finds the line full and is answered at once.
        assert!(uploads.acquire_data(PeerId::random(), || 0).await.is_none());
        assert_eq!(uploads.waiting(), 4, "a refused request leaves no trace in the line");
        // A finished upload hands its slot to the first in line.
        drop(first);
        assert_eq!(rx.recv().await, Some((0, true)));
        assert_eq!(uploads.waiting(), 3);
        // The rest wait no longer than the bound, then leave the line.
        tokio::time::sleep(MAX_SLOT_WAIT + Duration::from_millis(1)).await;
        for _ in 1..4 {
            assert!(matches!(rx.recv().await, Some((_, false))));
        }
        assert_eq!(uploads.waiting(), 0);
        for w in waiters {
            let _ = w.await;
        }
    }

    /// Under an emulator running 4x slower than real time, the protocol waits 4x as long, asks
    /// busy requesters to wait 4x as long, and a transfer may fall to a quarter of the least rate
    /// before it is abandoned: the same per emulated second as on a real network.
    #[test]
    fn a_time_scale_stretches_every_wait_and_the_least_rate() {
        let (real, slow) = (Timing::new(1.0), Timing::new(4.0));
        assert_eq!(real.request_timeout, REQUEST_TIMEOUT);
        assert_eq!(real.min_rate, MIN_RATE);
        assert_eq!(slow.request_timeout, REQUEST_TIMEOUT * 4);
        assert_eq!(slow.busy_retry, BUSY_RETRY * 4);
        assert_eq!(slow.spread_retry, SPREAD_RETRY * 4);
        assert_eq!(slow.max_slot_wait, MAX_SLOT_WAIT * 4);
        assert_eq!(slow.min_rate, MIN_RATE / 4);
        assert_eq!(slow.upload_slot_rate, UPLOAD_SLOT_RATE / 4);
        // A nonsensical scale leaves the timers as they are.
        assert_eq!(Timing::new(f64::NAN).request_timeout, REQUEST_TIMEOUT);

        // A 4 MiB/s uplink, told to the node in its own time (1 MiB/s), gets its 4 upload slots.
        let uploads = Uploads::new(64, 8, Some(UPLOAD_SLOT_RATE), None, slow);
        assert_eq!(uploads.data.as_ref().map(|slots| slots.count()), Some(4));
        assert_eq!(uploads.busy_retry(), BUSY_RETRY * 4, "the hint to busy requesters is stretched too");
    }

    #[test]
    fn a_full_line_asks_for_about_one_uploads_time() {
        let uploads = two_slots();
        assert_eq!(uploads.busy_retry(), BUSY_RETRY, "nothing timed yet");
        uploads.record_upload(Duration::from_millis(800));
        assert_eq!(uploads.busy_retry(), Duration::from_millis(800));
        // A moving average: one slow upload moves it a quarter of the way.
        uploads.record_upload(Duration::from_millis(1600));
        assert_eq!(uploads.busy_retry(), Duration::from_millis(1000));
        for _ in 0..50 {
            uploads.record_upload(Duration::from_secs(30));
        }
        assert_eq!(uploads.busy_retry(), MAX_SLOT_WAIT);
        for _ in 0..50 {
            uploads.record_upload(Duration::from_millis(1));
        }
        assert_eq!(uploads.busy_retry(), BUSY_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn one_peer_holds_at_most_half_the_slots() {
        let (greedy, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let uploads = Arc::new(two_slots());
        let first = uploads.acquire_data(greedy, || 0).await.flatten().expect("a free slot");
        // Its second request waits in line although a slot is free.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let request = |peer: PeerId, name: &'static str| {
            let (uploads, tx) = (uploads.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = uploads.acquire_data(peer, || 0).await.flatten();
                let _ = tx.send((name, slot.is_some()));
                slot
            })
        };
        let second = request(greedy, "greedy again");
        tokio::task::yield_now().await;
        assert_eq!(uploads.waiting(), 1);
        // Another peer takes the free slot at once; a third waits, behind the greedy one.
        let theirs = uploads.acquire_data(b, || 0).await.flatten().expect("the free slot");
        let third = request(c, "c");
        tokio::task::yield_now().await;
        assert_eq!(uploads.waiting(), 2);
        // The slot another peer lets go passes over the greedy one, which holds its share.
        drop(theirs);
        assert_eq!(rx.recv().await, Some(("c", true)));
        // Its own slot let go goes to its next request at once.
        drop(first);
        assert_eq!(rx.recv().await, Some(("greedy again", true)));
        drop((second.await, third.await));
        assert_eq!(uploads.data.as_ref().map(|s| (s.free(), s.held_by(&greedy))), Some((2, 0)), "every slot came back");
    }

    #[tokio::test]
    async fn idle_means_no_upload_to_another_peer_and_nobody_waiting() {
        let (me, other) = (PeerId::random(), PeerId::random());
        // Four slots: a peer may hold two.
        let uploads = Uploads::new(64, 8, Some(4 * UPLOAD_SLOT_RATE), None, Timing::new(1.0));
        assert!(uploads.idle(&me));
        let first = uploads.acquire_data(me, || 0).await.flatten().expect("a free slot");
        let second = uploads.acquire_data(me, || 0).await.flatten().expect("a free slot");
        assert!(uploads.idle(&me), "every upload running is the caller's");
        assert!(!uploads.idle(&other));
        drop(second);
        let theirs = uploads.acquire_data(other, || 0).await.flatten().expect("a free slot");
        assert!(!uploads.idle(&me));
        drop((first, theirs));
        assert!(uploads.idle(&me) && uploads.idle(&other));

        // Without a cap, every request being answered counts.
        let uploads = Uploads::new(64, 8, None, None, Timing::new(1.0));
        let mine = [uploads.try_acquire(me).expect("room"), uploads.try_acquire(me).expect("room")];
        assert!(uploads.idle(&me));
        let theirs = uploads.try_acquire(other).expect("room");
        assert!(!uploads.idle(&me) && !uploads.idle(&other));
        drop(mine);
        assert!(uploads.idle(&other));
        drop(theirs);
    }

    #[tokio::test]
    async fn without_an_upload_cap_nobody_waits() {
        let uploads = Uploads::new(64, 8, None, None, Timing::new(1.0));
        for _ in 0..100 {
            assert!(matches!(uploads.acquire_data(PeerId::random(), || 0).await, Some(None)));
        }
        assert_eq!(uploads.waiting(), 0);
    }
}
