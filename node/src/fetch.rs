//! Drives the sans-IO fetch state machine (`shoal_protocol::fetch`) with real peers: DHT lookups,
//! have-maps and piece requests run as tasks, and their outcomes are fed back as inputs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_cache::{BlobInfo, Store, StoreError};
use shoal_protocol::fetch::{Action, Fetch, FetchConfig, MAX_READERS, PeerFailure, RequestId};
use shoal_protocol::wire::{PeerHint, TraceId};
use shoal_protocol::{Geometry, Hash, PieceIndex, PieceSet};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::crowd::Member;
use crate::node::{Aborted, NodeError, NodeHandle};
use crate::standing::Offence;
use crate::swarm::Command;
use crate::transfer::{self, Got, PeerFault};

/// How a fetch is going.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchProgress {
    /// Bytes verified and stored.
    pub verified_bytes: u64,
    /// The blob's size, once a peer told it.
    pub total_bytes: Option<u64>,
    /// Peers we are fetching from.
    pub peers: usize,
    /// Bytes already verified in the store when the fetch began (a resumed fetch).
    pub resumed_bytes: u64,
    /// Bytes received from peers so far, proofs and end-game duplicates included.
    pub fetched_bytes: u64,
    /// Whether the fetch ended (see the result for how).
    pub done: bool,
}

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No provider answered within the lookup deadline.
    #[error("no provider of {hash} found within {secs} s; {}", not_found_advice(*.alone))]
    NotFound {
        /// The blob.
        hash: Hash,
        /// The deadline.
        secs: u64,
        /// Whether the node knew no DHT peer to ask when it gave up.
        alone: bool,
    },
    /// Providers were found but the fetch could not finish.
    #[error("fetching {hash} failed: {reason}")]
    Failed {
        /// The blob.
        hash: Hash,
        /// Why.
        reason: String,
    },
}

fn not_found_advice(alone: bool) -> &'static str {
    match alone {
        true => "this node knows no DHT peer to ask: start it with --bootstrap <multiaddr>",
        false => "check the hash, or that a node holding it is online",
    }
}

enum Event {
    Providers(Vec<PeerId>),
    ProvidersDone,
    Have(PeerId, Result<transfer::Held, PeerFault>),
    /// A watch's answer; `None` if the peer does not know watches.
    Watched(PeerId, Result<Option<transfer::Held>, PeerFault>),
    Got(PeerId, RequestId, Got, Duration),
}

fn failure(f: PeerFault) -> PeerFailure {
    match f {
        PeerFault::NotFound => PeerFailure::NotFound,
        PeerFault::Busy(retry_after) => PeerFailure::Busy { retry_after },
        PeerFault::Denied => PeerFailure::Denied,
        PeerFault::Corrupt => PeerFailure::Corrupt,
        PeerFault::Truncated => PeerFailure::Truncated,
        PeerFault::Timeout => PeerFailure::Timeout,
        PeerFault::Io => PeerFailure::Io,
        PeerFault::Protocol => PeerFailure::Protocol,
    }
}

/// The most blobs a node fetches at once; a fetch of one already under way follows it.
pub(crate) const MAX_FETCHES: usize = 256;

/// Of [`MAX_FETCHES`], the most the public gateway starts: anyone who reaches it may ask for made-up
/// hashes, and the node's owner keeps the rest.
pub(crate) const MAX_PUBLIC_FETCHES: usize = 64;

/// A fetch under way, as a later caller of the same blob follows it: its progress, and once it
/// ended, why it failed if it did.
#[derive(Clone)]
pub(crate) struct Followed {
    progress: watch::Receiver<FetchProgress>,
    failed: Arc<std::sync::OnceLock<FetchError>>,
    /// Started by the public gateway (counted against [`MAX_PUBLIC_FETCHES`]).
    public: bool,
}

pub(crate) async fn fetch(
    node: &NodeHandle,
    hash: Hash,
    progress: Option<watch::Sender<FetchProgress>>,
) -> Result<BlobInfo, NodeError> {
    fetch_for(node, hash, progress, false).await
}

/// Whether a fetch of `hash` is under way.
pub(crate) fn is_under_way(node: &NodeHandle, hash: Hash) -> bool {
    node.inner.fetches.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&hash)
}

/// Whether the fetch of `hash` under way has a caller besides the one that started it. (Each
/// follower holds a share of the fetch's `failed`, beside the fetch and the node's map.)
pub(crate) fn is_followed(node: &NodeHandle, hash: Hash) -> bool {
    node.inner
        .fetches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&hash)
        .is_some_and(|f| Arc::strong_count(&f.failed) > 2)
}

/// [`fetch`], for the public gateway if `public`: a fetch it would start past
/// [`MAX_PUBLIC_FETCHES`] of its own is refused (`Busy`); one under way is followed all the same.
pub(crate) async fn fetch_for(
    node: &NodeHandle,
    hash: Hash,
    progress: Option<watch::Sender<FetchProgress>>,
    public: bool,
) -> Result<BlobInfo, NodeError> {
    let store = node.store().clone();
    // One fetch per blob: later callers follow the first one's progress.
    let (own_tx, failed) = loop {
        if let Some(info) = store.info(hash)
            && info.is_complete()
        {
            if let Some(p) = progress {
                let _ = p.send(FetchProgress {
                    verified_bytes: info.size,
                    total_bytes: Some(info.size),
                    resumed_bytes: info.size,
                    done: true,
                    ..Default::default()
                });
            }
            return Ok(info);
        }
        let (own_tx, own_rx) = watch::channel(FetchProgress::default());
        let failed = Arc::new(std::sync::OnceLock::new());
        let existing = {
            let mut fetches = node.inner.fetches.lock().unwrap_or_else(|e| e.into_inner());
            match fetches.get(&hash) {
                Some(followed) => Some(followed.clone()),
                // Each fetch runs lookups and dials: their number is bounded, so that requests
                // for made-up hashes (the gateway may face the Internet) cannot run without end.
                None if fetches.len() >= MAX_FETCHES => {
                    return Err(NodeError::Busy("as many fetches as it takes are under way"));
                }
                None if public && fetches.values().filter(|f| f.public).count() >= MAX_PUBLIC_FETCHES => {
                    return Err(NodeError::Busy("as many fetches as the gateway may start are under way"));
                }
                None => {
                    fetches.insert(hash, Followed { progress: own_rx, failed: failed.clone(), public });
                    None
                }
            }
        };
        let Some(Followed { progress: mut rx, failed: theirs, .. }) = existing else { break (own_tx, failed) };
        let done = loop {
            let p = rx.borrow_and_update().clone();
            if let Some(tx) = &progress {
                let _ = tx.send(p.clone());
            }
            if p.done {
                break true;
            }
            if rx.changed().await.is_err() {
                break false;
            }
        };
        match store.info(hash) {
            Some(info) if info.is_complete() => return Ok(info),
            // The fetch followed ended unfinished: its caller gave up on it (an interrupted
            // `shoal get`). This caller did not, and carries on, with a fetch of its own or
            // following another's.
            _ if !done => continue,
            // Failed: for the reason it failed (a blob nobody provides is not found, whoever asks).
            _ => {
                let reason = "a concurrent fetch of it failed".into();
                return Err(theirs.get().cloned().unwrap_or(FetchError::Failed { hash, reason }).into());
            }
        }
    };
    let registered = Registered { node, hash };
    let nearby = node.inner.crowds.fetch_started(hash);
    let trace = TraceId(rand::random());
    let span = info_span!("fetch", blob = %hash.short(), trace = %trace);
    let result = run(node, hash, trace, nearby, &own_tx, progress.as_ref()).instrument(span).await;
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    node.inner.metrics.fetches.get_or_create(&crate::metrics::TransferLabels { kind: "blob", outcome }).inc();
    if let Err(e) = &result {
        // For the callers that followed this fetch, before they hear it ended.
        let _ = failed.set(match e {
            NodeError::Fetch(e) => e.clone(),
            e => FetchError::Failed { hash, reason: e.to_string() },
        });
    }
    drop(registered);
    // The last report: a blob that arrived in one response was never reported in part.
    let finish = |p: &mut FetchProgress| {
        if let Ok(info) = &result {
            p.verified_bytes = info.size;
            p.total_bytes = Some(info.size);
        }
        p.done = true;
    };
    own_tx.send_modify(finish);
    if let Some(p) = progress {
        p.send_modify(finish);
    }
    result
}

/// A running fetch's entries in the node's registries, removed however the fetch ends. A caller
/// that gives up (an interrupted `shoal get`) drops the fetch's future: an entry left behind
/// would have every later fetch of the blob follow one that no longer runs, and fail.
struct Registered<'a> {
    node: &'a NodeHandle,
    hash: Hash,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // The crowd's entry first: a fetch of the blob that starts once the registry entry is
        // gone must not lose its own crowd entry to this one's removal.
        self.node.inner.crowds.fetch_ended(&self.hash);
        self.node.inner.readers.unlisten(&self.hash);
        self.node.inner.fetches.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.hash);
    }
}

async fn run(
    node: &NodeHandle,
    hash: Hash,
    trace: TraceId,
    mut nearby: mpsc::Receiver<PeerId>,
    shared: &watch::Sender<FetchProgress>,
    progress: Option<&watch::Sender<FetchProgress>>,
) -> Result<BlobInfo, NodeError> {
    let store = node.store().clone();
    // In network time for the messages; the node's timers run on its stretched form.
    let lookup_timeout = node.config().lookup_timeout;
    let stall_timeout = node.config().lookup_wait();
    let started = Instant::now();
    // A request's own reader cuts off a peer that stalls or falls below the least rate, and keeps
    // what verified (see `transfer::get_pieces`); the machine's timeout is only the backstop.
    // Lookups at least every 4 s while the fetch wants peers: in a flash crowd the other fetchers
    // announce themselves within seconds, and finding them is what lets them trade pieces
    // instead of all waiting on the seeder.
    let config = FetchConfig {
        request_timeout: Duration::from_secs(120),
        providers_backoff_max: Duration::from_secs(4),
        request_target: Some(Duration::from_secs(2)),
        max_peers: node.config().fetch_peers,
        ..FetchConfig::default()
    }
    .stretched(node.config().time_scale);
    // Given up when no piece verified and no holder of what we lack answered for the lookup
    // timeout.
    let config = FetchConfig { stall_timeout: Some(stall_timeout), ..config };
    let mut machine: Fetch<PeerId> = Fetch::new(hash, config, rand::random(), started);
    let timing = node.inner.uploads.timing;
    let (events, mut rx) = mpsc::channel::<Event>(256);
    let mut requests: HashMap<RequestId, (Aborted, PieceSet)> = HashMap::new();
    // Have and watch requests under way: aborted with the fetch, as `requests` are, rather than
    // left to hold their streams (and keep idle connections from being trimmed) until they time
    // out. Reaped as each is added.
    let mut asking: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let mut resumed_bytes = 0u64;
    let mut fetched_bytes = 0u64;
    let mut geometry: Option<Geometry> = None;
    let mut announced = false;
    let mut lookup: Option<Aborted> = None;
    // Holders other peers named (peer exchange): candidates behind the providers a lookup finds
    // (`Fetch::handle_hinted`), once the swarm has recorded the addresses they were named with.
    // Room for every peer ever hinted (each is sent once): none named is lost to a full channel
    // while the fetch is busy elsewhere (tokio allocates a channel's room as it fills). One the
    // machine's candidate queue forgets is not sent again.
    let (hinted_tx, mut hinted_rx) = mpsc::channel::<PeerId>(MAX_HINTED);
    let mut hinted = Hinted::default();
    // Providers the DHT named, for how many holders the fetch knows of when it announces itself.
    let mut provided: HashSet<PeerId> = HashSet::new();
    // The store's own error, if it could not open the blob for a size a peer claimed.
    let mut refused_claim: Option<String> = None;

    // However the fetch ends (failed, or dropped by a caller that gave up), what it verified is
    // made durable: a blob complete is flushed below, and the store holds a blob's files open
    // from its first write until its next flush.
    let _flush = FlushOnDrop { store: store.clone(), hash };
    let moved = node.inner.readers.listen(hash);
    let result = loop {
        let now = Instant::now();
        let mut outcome = None;
        // Listening before the spans are read: a reader that moves from here on wakes this round.
        let reader_moved = moved.notified();
        tokio::pin!(reader_moved);
        reader_moved.as_mut().enable();
        machine.set_reading(node.inner.readers.of(&hash));
        while let Some(action) = machine.poll_action(now) {
            // A peer this fetch heard of before another found it lying is asked nothing either.
            if let Action::AskHave { peer } | Action::WatchHave { peer, .. } | Action::Request { peer, .. } = &action
                && node.avoids(peer)
            {
                debug!(%peer, "not asked: it lied to this node before");
                machine.handle_refused(*peer, now);
                continue;
            }
            match action {
                Action::FindProviders => {
                    debug!("looking up providers");
                    // A lookup still running is aborted.
                    drop(lookup.take());
                    let (tx, mut found) = mpsc::channel(64);
                    let commands = node.inner.commands.clone();
                    let events = events.clone();
                    lookup = Some(Aborted(
                        tokio::spawn(async move {
                            if commands.send(Command::FindProviders { hash, found: tx, stats: None }).await.is_err() {
                                return;
                            }
                            while let Some(p) = found.recv().await {
                                if events.send(Event::Providers(vec![p])).await.is_err() {
                                    return;
                                }
                            }
                            let _ = events.send(Event::ProvidersDone).await;
                        })
                        .abort_handle(),
                    ));
                }
                Action::AskHave { peer } => {
                    debug!(%peer, "asking for the have-map");
                    node.inner.activity.touch(peer);
                    let control = node.inner.control.clone();
                    let events = events.clone();
                    let prove_size = !machine.is_size_proven();
                    let activity = node.inner.activity.clone();
                    // The machine counts a have request unanswered after `have_timeout` as failed
                    // and asks again later. The request is dropped then, with its stream, rather
                    // than left to run beside the next (a stream may take its open and exchange
                    // timeouts, 20 s, where the machine waits 5).
                    let within = machine.config().have_timeout;
                    while asking.try_join_next().is_some() {}
                    asking.spawn(
                        async move {
                            let _in_flight = activity.request(peer);
                            let asked = transfer::ask_have(control, peer, hash, trace, prove_size, timing);
                            let Ok(r) = tokio::time::timeout(within, asked).await else { return };
                            let _ = events.send(Event::Have(peer, r)).await;
                        }
                        .in_current_span(),
                    );
                }
                Action::WatchHave { peer, wanted } => {
                    // Not counted as a request under way: a watch may wait a while, and must not
                    // keep an idle connection from being trimmed.
                    let control = node.inner.control.clone();
                    let events = events.clone();
                    let wait = machine.config().have_refresh;
                    // As a have request, but a watch may also take its wait.
                    let within = machine.config().have_timeout.saturating_add(wait);
                    while asking.try_join_next().is_some() {}
                    asking.spawn(
                        async move {
                            let watched = transfer::watch_have(control, peer, (hash, wanted, wait), trace, timing);
                            let Ok(r) = tokio::time::timeout(within, watched).await else { return };
                            let _ = events.send(Event::Watched(peer, r)).await;
                        }
                        .in_current_span(),
                    );
                }
                Action::Begin { size } => {
                    let g = match Geometry::new(size) {
                        Ok(g) => g,
                        Err(e) => {
                            outcome = Some(Err(FetchError::Failed { hash, reason: e.to_string() }.into()));
                            break;
                        }
                    };
                    // A size no proof backs yet is a peer's word: it may not evict cached blobs,
                    // and one that does not fit is given up, not the fetch.
                    let proven = machine.is_size_proven();
                    let s = store.clone();
                    let begun = tokio::task::spawn_blocking(move || match proven {
                        true => s.begin(hash, size),
                        false => s.begin_unproven(hash, size),
                    })
                    .await
                    .map_err(|_| NodeError::Stopped)?;
                    match begun {
                        Ok(begun) => {
                            geometry = Some(g);
                            node.withdraw(&begun.evicted).await;
                            if !begun.have.is_empty() {
                                resumed_bytes = begun.have.iter().map(|p| g.piece_len(p)).sum();
                                info!(pieces = begun.have.count(), "resuming: these pieces are already verified");
                                if !announced {
                                    node.provide_known(hash, holders_known(&hinted.names, &provided)).await;
                                    announced = true;
                                }
                            }
                            machine.handle_local(&begun.have, Instant::now());
                        }
                        // Whatever the store says to a size only a peer claimed (no room, too large,
                        // or a file that size cannot be made here), the claim is what fails: a
                        // lying peer must not fail the fetch. An error of the disk's own is said,
                        // and named again if the fetch fails.
                        Err(e) if !proven => {
                            if matches!(
                                e,
                                StoreError::NoRoom { .. }
                                    | StoreError::TooLarge { .. }
                                    | StoreError::SizeMismatch { .. }
                            ) {
                                debug!(size, error = %e, "not opening the blob for a size no proof backs yet");
                            } else {
                                warn!(size, error = %e, "cannot open the blob for the size a peer claimed");
                                refused_claim = Some(e.to_string());
                            }
                            machine.handle_size_unprovable(size, Instant::now());
                        }
                        Err(e) => {
                            outcome = Some(Err(NodeError::Store(e)));
                            break;
                        }
                    }
                }
                Action::SizeRejected { size } => {
                    debug!(size, "a peer's claimed size failed verification");
                    geometry = None;
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || s.delete_if_empty(hash)).await;
                }
                Action::Request { peer, id, pieces } => {
                    let Some(g) = geometry else {
                        warn!("fetch logic asked for pieces before the size was known");
                        continue;
                    };
                    debug!(%peer, pieces = pieces.count(), "requesting pieces");
                    node.inner.activity.touch(peer);
                    let control = node.inner.control.clone();
                    let store = store.clone();
                    let events = events.clone();
                    let asked = pieces.clone();
                    let rate = node.inner.download_rate.clone();
                    let arrivals = node.inner.uploads.arrivals.clone();
                    let activity = node.inner.activity.clone();
                    let task = tokio::spawn(
                        async move {
                            let _in_flight = activity.request(peer);
                            let t0 = Instant::now();
                            let got = transfer::get_pieces(
                                control,
                                store,
                                arrivals,
                                rate,
                                transfer::PieceRequest { peer, hash, geometry: g, pieces, trace },
                                timing,
                            )
                            .await;
                            let _ = events.send(Event::Got(peer, id, got, t0.elapsed())).await;
                        }
                        .in_current_span(),
                    );
                    requests.insert(id, (Aborted(task.abort_handle()), asked));
                }
                Action::Cancel { id, .. } => {
                    // Dropped, the request's task is aborted.
                    requests.remove(&id);
                }
                Action::Penalise { peer, failure } => {
                    // Bytes that failed verification are a lie no fetch should pay for again;
                    // a protocol error may be a version we do not speak, and is counted only.
                    let offence = match failure {
                        PeerFailure::Corrupt => Offence::Lied,
                        _ => Offence::Failed,
                    };
                    warn!(%peer, ?failure, "peer misbehaved; dropped for this blob and penalised");
                    node.penalise(peer, offence);
                }
                Action::Complete => {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.flush(hash)).await.map_err(|_| NodeError::Stopped)??;
                    if !announced {
                        node.provide_known(hash, holders_known(&hinted.names, &provided)).await;
                    }
                    info!(elapsed_ms = started.elapsed().as_millis() as u64, "fetch complete");
                    match store.info(hash) {
                        Some(info) if info.is_complete() => outcome = Some(Ok(info)),
                        _ => {
                            outcome =
                                Some(Err(FetchError::Failed { hash, reason: "evicted as it completed".into() }.into()))
                        }
                    }
                    break;
                }
                Action::Failed(e) => {
                    let secs = lookup_timeout.as_secs();
                    outcome = Some(Err(match e {
                        shoal_protocol::fetch::FetchError::Stalled { after, .. } => {
                            // Past the stall timeout only when peers kept answering, sending nothing.
                            let starved = after > stall_timeout;
                            let waited = if starved {
                                secs * u64::from(shoal_protocol::fetch::STALLS_WITHOUT_A_PIECE)
                            } else {
                                secs
                            };
                            match (machine.size(), &refused_claim) {
                                (None, None) if !starved => {
                                    let alone = node.dht_info().await.is_ok_and(|d| d.routing_table_peers == 0);
                                    FetchError::NotFound { hash, secs, alone }.into()
                                }
                                (None, refused) => {
                                    let mut reason = format!("no peer proved the blob's size in {waited} s");
                                    if let Some(e) = refused {
                                        reason.push_str(&format!(
                                            ", and this node could not open it for the size claimed: {e}"
                                        ));
                                    }
                                    FetchError::Failed { hash, reason }.into()
                                }
                                (Some(_), _) if starved => {
                                    let reason = format!("no piece came for {waited} s, though holders kept answering");
                                    FetchError::Failed { hash, reason }.into()
                                }
                                (Some(_), _) => {
                                    FetchError::Failed { hash, reason: format!("no progress for {secs} s") }.into()
                                }
                            }
                        }
                        e => FetchError::Failed { hash, reason: e.to_string() }.into(),
                    }));
                    break;
                }
            }
        }
        if let Some(outcome) = outcome {
            break outcome;
        }

        let p = machine.progress();
        let snapshot = FetchProgress {
            verified_bytes: p.verified_bytes,
            total_bytes: machine.size(),
            peers: p.peers_active,
            resumed_bytes,
            fetched_bytes,
            done: false,
        };
        if snapshot.verified_bytes > 0 && !announced {
            // We hold verified pieces: serve them on at once.
            node.provide_known(hash, holders_known(&hinted.names, &provided)).await;
            announced = true;
        }
        shared.send_if_modified(|old| replace_if_changed(old, &snapshot));
        if let Some(tx) = progress {
            tx.send_if_modified(|old| replace_if_changed(old, &snapshot));
        }

        // The machine always has a timer running: its stall timeout.
        let wake = machine
            .poll_timeout()
            .map_or_else(|| tokio::time::Instant::now() + stall_timeout, tokio::time::Instant::from_std);
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break Err(NodeError::Stopped) };
                let now = Instant::now();
                match event {
                    Event::Providers(mut peers) => {
                        debug!(?peers, "the DHT named providers");
                        peers.retain(|p| !node.avoids(p));
                        for &p in &peers {
                            if provided.len() < MAX_HINTED {
                                provided.insert(p);
                            }
                        }
                        machine.handle_providers(peers, now)
                    }
                    Event::ProvidersDone => {
                        debug!("provider lookup ended");
                        machine.handle_providers_done(now)
                    }
                    Event::Have(peer, Ok(held)) => {
                        node.inner.metrics.requested("have", "ok", held.rtt);
                        let near = reach(node, peer, &held.hints, &mut hinted, &hinted_tx).await;
                        machine.handle_nearby(near, now);
                        let mut pieces = held.pieces;
                        match held.size_proof {
                            Some(proof) => {
                                node.inner.crowds.remember_proof(hash, held.size, proof);
                                machine.handle_size_proof(held.size, now);
                            }
                            // Asked for a proof (the size is not proven, so the request asked) and
                            // sent none: its last piece is not believed until it proves the size.
                            None if !machine.is_size_proven() => unproven_last_piece(&mut pieces),
                            None => {}
                        }
                        debug!(%peer, size = held.size, pieces = pieces.count(), "have-map");
                        machine.handle_have(peer, held.size, pieces, held.rtt, now)
                    }
                    Event::Watched(peer, Ok(Some(held))) => {
                        node.inner.metrics.requested("watch", "ok", held.rtt);
                        let near = reach(node, peer, &held.hints, &mut hinted, &hinted_tx).await;
                        machine.handle_nearby(near, now);
                        debug!(%peer, size = held.size, pieces = held.pieces.count(), "watch answered");
                        machine.handle_watched(peer, held.size, held.pieces, now)
                    }
                    Event::Watched(peer, Ok(None)) => {
                        debug!(%peer, "peer does not know watches; its have-map is polled");
                        machine.handle_watch_refused(peer, now)
                    }
                    Event::Watched(peer, Err(f)) => {
                        node.inner.metrics.requested("watch", f.label(), Duration::ZERO);
                        // A watch outlives many requests, and a connection trimmed meanwhile
                        // ends it: that is no failure of the peer. Its have-map is asked for
                        // after one interval, and that request counts.
                        let f = match f {
                            PeerFault::Io | PeerFault::Truncated | PeerFault::Timeout => {
                                PeerFailure::Busy { retry_after: machine.config().have_refresh }
                            }
                            f => failure(f),
                        };
                        machine.handle_have_failed(peer, f, now)
                    }
                    Event::Have(peer, Err(f)) => {
                        debug!(%peer, fault = f.label(), "have request failed");
                        node.inner.metrics.requested("have", f.label(), Duration::ZERO);
                        machine.handle_have_failed(peer, failure(f), now)
                    }
                    Event::Got(peer, id, got, elapsed) => {
                        let (verified, fault) = (got.verified.count(), got.fault.map(PeerFault::label));
                        debug!(%peer, verified, fault, elapsed_ms = elapsed.as_millis() as u64, "request ended");
                        node.withdraw(&got.evicted).await;
                        fetched_bytes += got.bytes;
                        node.inner.metrics.bytes_fetched.inc_by(got.bytes);
                        let label = if got.store_error.is_some() { "store" } else { "ok" };
                        node.inner.metrics.requested("get", got.fault.map_or(label, PeerFault::label), elapsed);
                        if let Some(e) = got.store_error {
                            // Ours, not the peer's: asking others would fetch pieces to throw away.
                            let reason = format!("the store cannot take its pieces: {e}");
                            break Err(FetchError::Failed { hash, reason }.into());
                        }
                        let unserved = requests.remove(&id).map(|(_, asked)| asked.difference(&got.verified));
                        if !got.verified.is_empty() {
                            node.inner.crowds.source(hash, peer, now);
                        }
                        let near = reach(node, peer, &got.hints, &mut hinted, &hinted_tx).await;
                        machine.handle_nearby(near, now);
                        let fault = got.fault.map(failure);
                        if machine.handle_response(peer, id, &got.verified, got.bytes, elapsed, fault, now) {
                            // It advertised pieces and sent none of them: a stale have-map, or a
                            // store that found rot in them. Not malice, but it cost us a round
                            // trip. Counted once per map, however many requests were made from it.
                            debug!(%peer, "peer sent none of the pieces it advertised");
                            node.penalise(peer, Offence::Failed);
                        }
                        if let Some(have) = got.have {
                            // Not the pieces it just left to others: they are asked elsewhere.
                            let have = match &unserved {
                                Some(u) if u.piece_count() == have.piece_count() => have.difference(u),
                                _ => have,
                            };
                            machine.handle_advert(peer, have, now);
                        }
                    }
                }
            }
            Some(peer) = hinted_rx.recv() => machine.handle_hinted([peer], Instant::now()),
            Some(peer) = nearby.recv() => machine.handle_nearby([peer].into_iter().filter(|p| !node.avoids(p)), Instant::now()),
            // A reader moved: its next pieces are requested first from the next round on.
            () = &mut reader_moved => {}
            _ = tokio::time::sleep_until(wake) => machine.handle_timeout(Instant::now()),
        }
    };
    // The response that completed the fetch came after the last report.
    let counted = |p: &mut FetchProgress| p.fetched_bytes = fetched_bytes;
    shared.send_modify(counted);
    if let Some(tx) = progress {
        tx.send_modify(counted);
    }
    if result.is_err() {
        // An entry this fetch verified nothing into goes, while the fetch is still registered
        // (no other can begin the blob meanwhile): it holds nothing, and it would stay at the
        // fresh end of the cache's order, ahead of blobs held, until evicted.
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.delete_if_empty(hash)).await;
    }
    // Dropping `requests`, `asking` and `lookup` aborts their tasks, here or when a caller that gave up
    // drops this future: left running, they fetched for nobody and kept their connections from
    // being trimmed.
    result
}

/// What readers of blobs read next: a span of pieces each, read in order. A fetch requests those
/// pieces first (`Fetch::set_reading`), so a response streaming a blob (or a range of it, as a
/// video player seeks) waits for the pieces it sends next rather than for the whole blob in the
/// fetch's rarest-first order. An entry lives while a reader or a fetch of its blob does:
/// bounded by the responses and fetches under way.
#[derive(Default)]
pub(crate) struct Readers {
    blobs: Mutex<HashMap<Hash, Readed>>,
    next_id: AtomicU64,
}

/// One blob's readers, and whether a fetch of it listens.
#[derive(Default)]
struct Readed {
    spans: BTreeMap<u64, Range<PieceIndex>>,
    /// Woken when a reader moves, so that the blob's fetch takes the new span at once.
    moved: Arc<tokio::sync::Notify>,
    fetching: bool,
}

impl Readers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, Readed>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fetch of `hash` starts listening: what wakes it when a reader moves.
    fn listen(&self, hash: Hash) -> Arc<tokio::sync::Notify> {
        let mut blobs = self.lock();
        let readed = blobs.entry(hash).or_default();
        readed.fetching = true;
        readed.moved.clone()
    }

    /// The fetch of `hash` ended.
    fn unlisten(&self, hash: &Hash) {
        let mut blobs = self.lock();
        if let Some(readed) = blobs.get_mut(hash) {
            readed.fetching = false;
            if readed.spans.is_empty() {
                blobs.remove(hash);
            }
        }
    }

    /// The readers' spans of `hash`, at most [`MAX_READERS`], those that start first.
    fn of(&self, hash: &Hash) -> Vec<Range<PieceIndex>> {
        let blobs = self.lock();
        let mut spans: Vec<Range<PieceIndex>> =
            blobs.get(hash).map(|r| r.spans.values().cloned().collect()).unwrap_or_default();
        spans.sort_unstable_by_key(|r| (r.start, r.end));
        spans.dedup();
        spans.truncate(MAX_READERS);
        spans
    }
}

/// One reader of a blob (see [`Readers`]); it leaves when dropped.
pub(crate) struct Reading {
    node: NodeHandle,
    hash: Hash,
    id: u64,
}

impl Reading {
    pub(crate) fn new(node: &NodeHandle, hash: Hash) -> Self {
        let id = node.inner.readers.next_id.fetch_add(1, Ordering::Relaxed);
        Self { node: node.clone(), hash, id }
    }

    /// The reader reads `span` next, in order.
    pub(crate) fn wants(&self, span: Range<PieceIndex>) {
        let mut blobs = self.node.inner.readers.lock();
        let readed = blobs.entry(self.hash).or_default();
        if readed.spans.insert(self.id, span.clone()) != Some(span) && readed.fetching {
            readed.moved.notify_waiters();
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut blobs = self.node.inner.readers.lock();
        if let Some(readed) = blobs.get_mut(&self.hash) {
            readed.spans.remove(&self.id);
            if readed.spans.is_empty() && !readed.fetching {
                blobs.remove(&self.hash);
            }
        }
    }
}

/// Flushes a blob's verified pieces when dropped, on a blocking thread, without waiting for it.
struct FlushOnDrop {
    store: Store,
    hash: Hash,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let (store, hash) = (self.store.clone(), self.hash);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || {
                if let Err(e) = store.flush(hash) {
                    debug!(blob = %hash, error = %e, "cannot flush what an ended fetch verified");
                }
            });
        }
    }
}

/// The most hinted peers one fetch remembers; past it, hints are ignored (the DHT still finds
/// providers).
const MAX_HINTED: usize = 1024;

/// The most peers one source may name to a fetch that it would have to dial. A name costs its
/// sender nothing, and each one the fetch cannot reach holds one of its peer slots for its
/// dials' timeouts: without a bound per source, one peer answering with made-up holders filled
/// the fetch's names and its candidates, and the DHT's names waited behind them. Names of peers
/// we are connected to cost no dial and are not counted. A source is a host where known
/// ([`crate::crowd::Member`]): peer ids cost nothing to make.
const MAX_DIALLED_PER_SOURCE: u32 = 64;

/// The holders other peers named to a fetch.
#[derive(Debug, Default)]
struct Hinted {
    /// Every peer named and taken, at most [`MAX_HINTED`].
    names: HashSet<PeerId>,
    /// How many peers each source named that the fetch took and would have to dial, at most
    /// [`MAX_DIALLED_PER_SOURCE`] each; at most as many sources as names.
    dialled_by: HashMap<Member, u32>,
}

impl Hinted {
    /// Whether to take `peer`, named by `from`, as a candidate (`connected`: it needs no dial).
    /// A peer past its source's bound is not remembered, so another source may name it.
    fn take(&mut self, from: Member, peer: PeerId, connected: bool) -> bool {
        if self.names.len() >= MAX_HINTED || self.names.contains(&peer) {
            return false;
        }
        if !connected {
            let named = self.dialled_by.entry(from).or_default();
            if *named >= MAX_DIALLED_PER_SOURCE {
                return false;
            }
            *named += 1;
        }
        self.names.insert(peer)
    }
}

/// Gives the swarm the holders a peer named that this fetch has not heard of, with their
/// addresses; each comes back on `found` as a candidate once its addresses are recorded, so that
/// the dial its first stream makes finds them. Returns those we are connected to already, which
/// need no dial (the fetch asks them first). Malformed hints are skipped. `from` is the peer
/// that named them.
async fn reach(
    node: &NodeHandle,
    from: PeerId,
    hints: &[PeerHint],
    hinted: &mut Hinted,
    found: &mpsc::Sender<PeerId>,
) -> Vec<PeerId> {
    let mut near = Vec::new();
    let source = node.inner.crowds.member(from);
    for hint in hints {
        let Ok(peer) = PeerId::from_bytes(&hint.id) else { continue };
        let connected = node.inner.crowds.is_connected(&peer);
        if peer == node.inner.peer_id || node.avoids(&peer) || !hinted.take(source, peer, connected) {
            continue;
        }
        if connected {
            near.push(peer);
            continue;
        }
        let addrs = hint.addrs.iter().filter_map(|a| libp2p::Multiaddr::try_from(a.clone()).ok()).collect();
        let command = Command::Reach { peer, addrs, from, found: found.clone() };
        if node.inner.commands.send(command).await.is_err() {
            break;
        }
    }
    near
}

/// Takes the last piece out of a have-map that came without the size proof its request asked
/// for. A Shoal node holding the last piece proves the size when asked (it can: that piece is the
/// proof), so a peer naming it without one is believed for the rest but not as a claimant of the
/// size. Were it believed, a peer that claims a size and answers `Busy` to every request for its
/// last piece would hold its slot while one that can prove the size waits its turn.
fn unproven_last_piece(pieces: &mut PieceSet) {
    if let Some(last) = pieces.piece_count().checked_sub(1) {
        pieces.remove(last);
    }
}

/// How many distinct holders the fetch knows of: named by peers, or by the DHT.
fn holders_known(hinted: &HashSet<PeerId>, provided: &HashSet<PeerId>) -> usize {
    hinted.len() + provided.difference(hinted).count()
}

fn replace_if_changed(old: &mut FetchProgress, new: &FetchProgress) -> bool {
    if old == new {
        return false;
    }
    *old = new.clone();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public gateway starts at most its share of the node's fetches; past it, its new ones
    /// are refused at once while the owner's still start.
    #[tokio::test]
    async fn the_gateway_starts_at_most_its_share_of_fetches() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = crate::lone_node(tmp.path(), Duration::from_secs(1)).await;
        let handle = node.handle();
        // The gateway's share, taken by fetches that wait (entries as a fetch under way makes).
        let mut waiting = Vec::new();
        for i in 0..MAX_PUBLIC_FETCHES as u32 {
            let (tx, rx) = watch::channel(FetchProgress::default());
            let entry = Followed { progress: rx, failed: Arc::default(), public: true };
            handle.inner.fetches.lock().unwrap().insert(Hash::of(&i.to_le_bytes()), entry);
            waiting.push(tx);
        }
        let made_up = Hash::of(b"nobody has this");
        let refused = fetch_for(&handle, made_up, None, true).await;
        assert!(matches!(refused, Err(NodeError::Busy(_))), "{refused:?}");
        // The owner's fetch starts (and, a node alone, finds nobody to ask).
        let owners = fetch_for(&handle, made_up, None, false).await;
        assert!(matches!(owners, Err(NodeError::Fetch(FetchError::NotFound { .. }))), "{owners:?}");
        handle.inner.fetches.lock().unwrap().clear();
        drop(waiting);
        node.shutdown().await.expect("shutdown");
    }

    #[test]
    fn a_holder_named_by_peers_and_by_the_dht_counts_once() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let hinted: HashSet<PeerId> = [a, b].into();
        let provided: HashSet<PeerId> = [b, c].into();
        assert_eq!(holders_known(&hinted, &provided), 3);
        assert_eq!(holders_known(&HashSet::new(), &provided), 2);
        assert_eq!(holders_known(&hinted, &HashSet::new()), 2);
    }

    /// One source's names the fetch would have to dial are taken up to a bound; past it, others'
    /// names still are, and so are the source's names of peers we are connected to.
    #[test]
    fn one_source_names_a_bounded_share_of_the_peers_to_dial() {
        let mut hinted = Hinted::default();
        let (liar, honest) = (Member::Peer(PeerId::random()), Member::Peer(PeerId::random()));
        let junk: Vec<PeerId> = (0..MAX_DIALLED_PER_SOURCE + 10).map(|_| PeerId::random()).collect();
        let taken = junk.iter().filter(|&&p| hinted.take(liar, p, false)).count();
        assert_eq!(taken, MAX_DIALLED_PER_SOURCE as usize);
        assert!(hinted.take(liar, PeerId::random(), true), "a connected peer needs no dial");
        let refused = junk[junk.len() - 1];
        assert!(hinted.take(honest, refused, false), "not remembered: another source may name it");
        assert!(!hinted.take(honest, refused, false), "once");
        assert!(hinted.take(honest, PeerId::random(), false));
    }
}
