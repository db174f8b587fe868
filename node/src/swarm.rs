//! The libp2p swarm and the one task that owns it.
//!
//! Everything that needs the swarm sends a [`Command`] over a bounded channel; answers come back on
//! `oneshot` or bounded `mpsc` channels. The loop never blocks on a requester: a full answer
//! channel drops the answer, a closed one ends the query.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::transport::ListenerId;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, identify, ping};
use rand::seq::SliceRandom;
use shoal_protocol::Hash;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use crate::config::NodeConfig;

/// The Kademlia protocol id: Shoal's own DHT, apart from IPFS's.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1");

/// Provider records a node keeps, its own and others'. Sized for a CDN node's catalogue.
pub(crate) const MAX_PROVIDED_KEYS: usize = 200_000;

/// Of [`MAX_PROVIDED_KEYS`], the keys peers' records may take: the rest is our own
/// announcements' room, which no peer can fill.
const MAX_REMOTE_KEYS: usize = MAX_PROVIDED_KEYS / 2;

/// Peers' provider records a node keeps at most, in all and of any one peer (see
/// [`crate::addrs::Records`]): a peer sending records for 100,000 keys took every key peers may
/// fill, and with 64 providers a key they could reach gigabytes.
const MAX_REMOTE_RECORDS: usize = 2 * MAX_REMOTE_KEYS;
const MAX_RECORDS_PER_PROVIDER: usize = MAX_REMOTE_KEYS / 64;

/// Addresses a peer's provider record keeps at most (those on the IP it reached us from first).
const MAX_RECORD_ADDRS: usize = 4;

/// The most lookups that wait for one provider's dial.
const MAX_WAITING_LOOKUPS: usize = 64;

/// How long a provider whose dial our own connection cap refused waits for a connection to close
/// (see `EventLoop::awaiting_room`).
const ROOM_WAIT: Duration = Duration::from_secs(10);

/// How often peers' expired provider records are removed.
const EXPIRED_SWEEP: Duration = Duration::from_secs(10 * 60);

/// How often the blobs announced are checked against the store ([`EventLoop::check_held`]).
const HELD_CHECK: Duration = Duration::from_secs(60);

/// What a check of the blobs announced found: the blobs the store no longer holds.
type Gone = Vec<Hash>;

fn query_kind(r: &QueryResult) -> &'static str {
    match r {
        QueryResult::Bootstrap(_) => "bootstrap",
        QueryResult::GetClosestPeers(_) => "closest",
        QueryResult::GetProviders(_) => "providers",
        QueryResult::StartProviding(_) => "provide",
        QueryResult::RepublishProvider(_) => "republish-provider",
        QueryResult::GetRecord(_) => "get-record",
        QueryResult::PutRecord(_) => "put-record",
        QueryResult::RepublishRecord(_) => "republish-record",
    }
}

/// Entries per k-bucket (Kademlia's k; libp2p's default).
const K_VALUE: usize = 20;

/// Provider records kept per blob.
pub(crate) const MAX_PROVIDERS_PER_KEY: usize = 64;

/// `start_providing` queries in flight at once; the rest wait in the provide queue.
const MAX_PROVIDE_QUERIES: usize = 32;

/// Blobs waiting to be announced: as many as a record store holds keys, so that a re-provide
/// round queues every blob a node can announce. Past it the oldest wait for the next round. (At
/// 100,000 the same blobs, first in the set's order, were dropped every round, and their records
/// expired.)
const MAX_PROVIDE_QUEUE: usize = MAX_PROVIDED_KEYS;

/// Bootstrap peers remembered for dialling again (a config names a handful).
const MAX_BOOTSTRAP_PEERS: usize = 64;

/// How often every held blob is announced again (provider records live 48 hours).
const REPROVIDE_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// The first and the longest wait between dials of the bootstrap peers while no peer is
/// connected (they were down when the node started, or every peer went away).
const REJOIN_MIN: Duration = Duration::from_secs(2);
const REJOIN_MAX: Duration = Duration::from_secs(60);

/// How often announcements that reached no DHT peer are tried again while the routing table
/// holds peers (a bootstrap peer that was down when the node started, and is back).
const UNANNOUNCED_RETRY: Duration = Duration::from_secs(30);

/// A blob whose provider lookup found this many providers, or whose fetch already knows of this
/// many holders (from lookups and peer exchange), is crowded: its record names more holders than
/// one lookup dials, and peer exchange reaches the rest. A lookup ends once it found this many,
/// and an announcement of a crowded blob waits (see [`ANNOUNCE_SPREAD`]): in a 1,000-node crowd
/// (`flash-crowd-1000.toml`, seed 2) the lookups, which went on to the k closest nodes, and the
/// announcements, most of them past what a record holds, sent 326,000 DHT requests, 271,000 of
/// which failed, most of them dials turned away at a peer's connection cap.
const CROWDED: usize = MAX_LOOKUP_DIALS;

/// How long a lookup's finding that a blob is crowded holds.
const CROWDED_FOR: Duration = Duration::from_secs(10 * 60);

/// Blobs remembered as crowded at most; the least recently found is forgotten.
const MAX_CROWDED: usize = 1024;

/// A crowded blob's announcement waits a random time up to this. Every fetcher of a crowd
/// announcing at once sent a thousand announcements to the same k nodes in a few seconds, the
/// nodes every fetcher's lookup must reach too; spread over this window they are a few a second.
const ANNOUNCE_SPREAD: Duration = Duration::from_secs(10 * 60);

/// Addresses a routing-table entry keeps at most, and the longest address kept (see
/// [`EventLoop::learn_addresses`]).
const MAX_PEER_ADDRS: usize = 8;
const MAX_PEER_ADDR_LEN: usize = 256;

/// The behaviours of a Shoal node, on one connection per peer.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    kad: kad::Behaviour<crate::addrs::Records>,
    identify: identify::Behaviour,
    ping: Toggle<ping::Behaviour>,
    stream: crate::streams::Behaviour,
    gate: crate::connmgr::Gate,
    limits: connection_limits::Behaviour,
}

/// What a peer's announced addresses are worth (see `EventLoop::reachable_addrs`).
enum Judged {
    /// Others may dial it at these.
    Believed(Vec<Multiaddr>),
    /// It dialled us from none of them.
    Doubted,
    /// We hold no connection to it.
    Gone,
}

/// What the rest of the node asks of the swarm.
#[derive(Debug)]
pub(crate) enum Command {
    /// Announce that we hold pieces of this blob, knowing of `holders` other holders.
    Provide { hash: Hash, holders: usize },
    /// Stop announcing it (evicted or deleted).
    Unprovide(Hash),
    /// Find providers; each reachable one is sent once, with a live connection, or once it turned
    /// our dial away at its connection cap. The channel closes when the lookup ends, and then
    /// `stats` gets the lookup's figures.
    FindProviders { hash: Hash, found: mpsc::Sender<PeerId>, stats: Option<oneshot::Sender<LookupStats>> },
    /// Our routing table, and whether we hold a provider record for a blob.
    DhtSnapshot { hash: Hash, reply: oneshot::Sender<DhtSnapshot> },
    /// The connected peers.
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    /// Our listen addresses, with `/p2p/<peer id>`, and whether every listener has reported one.
    Listening(oneshot::Sender<(Vec<Multiaddr>, bool)>),
    /// The addresses we announce to peers.
    Announced(oneshot::Sender<Vec<Multiaddr>>),
    /// The LAN's router forwards to this listen address of ours this public address (`Some`,
    /// told again every minute), or nothing any more (`None`).
    Forwarded(Option<(Multiaddr, Multiaddr)>),
    /// DHT statistics.
    DhtInfo(oneshot::Sender<DhtInfo>),
    /// A peer another peer named as a holder of a blob, at the addresses it gave: the addresses
    /// are recorded for when a stream to it is opened, then the peer is handed to `found`. (The
    /// round trip orders the two: a stream opened before the addresses were recorded would dial
    /// without them.)
    Reach { peer: PeerId, addrs: Vec<Multiaddr>, from: PeerId, found: mpsc::Sender<PeerId> },
}

/// A connected peer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    /// Its id.
    pub peer_id: String,
    /// The address of our connection to it, without `/p2p/<peer id>`.
    pub address: String,
    /// The last ping round-trip time in milliseconds (none with `NodeConfig::ping` off).
    pub rtt_ms: Option<f64>,
}

/// What the DHT looks like from here.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DhtInfo {
    /// Peers in the routing table.
    pub routing_table_peers: usize,
    /// Blobs we announce.
    pub provided: usize,
    /// Blobs waiting to be announced.
    pub provide_queue: usize,
    /// Announcements (Kademlia queries) in flight.
    pub announcing: usize,
}

/// What one provider lookup cost.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LookupStats {
    /// Kademlia requests sent.
    pub requests: u32,
    /// Requests that were answered.
    pub answered: u32,
    /// From the start until the first provider record arrived, if one did.
    pub first_provider: Option<Duration>,
    /// From the start until the query ended.
    pub duration: Duration,
    /// Distinct providers named (reachable or not).
    pub providers: usize,
}

/// A node's view of the DHT, for experiments that replay lookups over real routing tables.
#[derive(Debug, Clone, Default)]
pub struct DhtSnapshot {
    /// Every peer in our routing table.
    pub routing_table: Vec<PeerId>,
    /// Whether we store a provider record for the blob asked about.
    pub holds_provider_record: bool,
}

/// Builds a node's transport from its identity: how the simulator puts a node on its emulated
/// network instead of QUIC.
pub type TransportFactory = Box<dyn FnOnce(&Keypair) -> Boxed<(PeerId, StreamMuxerBox)> + Send>;

/// The swarm, with the handle that opens transfer streams and the queue of inbound ones.
pub(crate) fn build_swarm(
    key: Keypair,
    config: &NodeConfig,
    transport: Option<TransportFactory>,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<(Swarm<Behaviour>, crate::streams::Control, crate::streams::Incoming)> {
    let (stream, control, incoming) =
        crate::streams::Behaviour::new(crate::transfer::PROTOCOL, metrics.streams_dropped.clone());
    let behaviour = move |key: &Keypair| {
        let peer_id = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.lookup_wait())
            .set_substreams_timeout(config.stretch(KAD_REQUEST_TIMEOUT))
            .set_provider_record_ttl(Some(Duration::from_secs(48 * 3600)))
            // Re-providing is batched by the node itself (see `REPROVIDE_INTERVAL`).
            .set_provider_publication_interval(None)
            .set_periodic_bootstrap_interval(Some(config.dht_refresh))
            // The node inserts peers itself, only where a bucket has room (see
            // `EventLoop::learn_addresses`).
            .set_kbucket_inserts(kad::BucketInserts::Manual)
            // The node stores what peers send (see `EventLoop::store_provider`): a provider
            // record with only the addresses that reach its provider, and no value record at
            // all. Shoal uses none, and each would take a share of the store's memory that
            // anyone could fill (up to 1,024 records of 65 KiB).
            .set_record_filtering(kad::StoreInserts::FilterBoth);
        let store = MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_provided_keys: MAX_PROVIDED_KEYS,
                max_providers_per_key: MAX_PROVIDERS_PER_KEY,
                ..Default::default()
            },
        );
        let bounds = crate::addrs::RecordBounds {
            remote_keys: MAX_REMOTE_KEYS,
            per_provider: MAX_RECORDS_PER_PROVIDER,
            remote_records: MAX_REMOTE_RECORDS,
            providers_per_key: MAX_PROVIDERS_PER_KEY,
        };
        let store = crate::addrs::Records::new(peer_id, store, bounds);
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Every Shoal node serves the DHT (we do not wait for an external address to be
        // confirmed), except one that runs for a single command and would leave dead entries in
        // the others' routing tables.
        kad.set_mode(Some(if config.transient { kad::Mode::Client } else { kad::Mode::Server }));
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(crate::connmgr::hard_cap(config.max_connections)))
            .with_max_pending_incoming(Some(64))
            .with_max_established_per_peer(Some(2));
        Behaviour {
            kad,
            identify: identify::Behaviour::new(
                identify::Config::new("/shoal/1".into(), key.public())
                    .with_agent_version(format!("shoal/{}", env!("CARGO_PKG_VERSION")))
                    // Identify would remember every address a peer announces, and offer them to
                    // every later dial of that peer: a NATed peer's private address, or one that
                    // is not the peer's at all. The node remembers those it believes instead
                    // (see `EventLoop::on_swarm_event`, identify).
                    .with_cache_size(0)
                    // Peers are told the addresses we announce (see `crate::addrs`), not every
                    // listen address: a peer elsewhere would keep our loopback one in that cache,
                    // and dial its own machine with it.
                    .with_hide_listen_addrs(true),
            ),
            ping: Toggle::from(config.ping.then(|| {
                ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(config.stretch(PING_INTERVAL))
                        .with_timeout(config.stretch(PING_TIMEOUT)),
                )
            })),
            stream,
            gate: crate::connmgr::Gate::new(crate::connmgr::hard_cap(config.max_connections)),
            limits: connection_limits::Behaviour::new(limits),
        }
    };
    let idle = config.stretch(IDLE_CONNECTION_TIMEOUT);
    // Every stream we open offers one protocol, so it is sent with the stream's first message
    // instead of a round trip ahead of it: a Kademlia request or a have or piece request on an
    // open connection takes one round trip, not two. A peer that does not speak the protocol is
    // found out when its answer is read (see `transfer::io_fault`). Over QUIC, a one-way message
    // needs its stream kept until the peer's confirmation arrives (`crate::linger`).
    let swarm_config = move |c: libp2p::swarm::Config| {
        c.with_idle_connection_timeout(idle).with_substream_upgrade_protocol_override(Version::V1Lazy)
    };
    let builder = SwarmBuilder::with_existing_identity(key).with_tokio();
    let swarm = match transport {
        Some(make) => {
            builder.with_other_transport(make)?.with_behaviour(behaviour)?.with_swarm_config(swarm_config).build()
        }
        None => builder
            .with_other_transport(|key| {
                use libp2p::Transport as _;
                let mut c = libp2p::quic::Config::new(key);
                c.max_idle_timeout = 30_000;
                c.keep_alive_interval = Duration::from_secs(10);
                let quic = || {
                    crate::addrs::NotOurs::new(libp2p::quic::tokio::Transport::new(c.clone())).map(
                        |(peer, connection), _| (peer, StreamMuxerBox::new(crate::linger::Lingering::new(connection))),
                    )
                };
                // Names (`/dns4/seed.example.org/...`, a bootstrap peer's or an `--external`
                // one) are resolved as they are dialled, with the system's resolver settings;
                // without them (no /etc/resolv.conf), from the hosts file alone. The addresses
                // they resolve to are dialled through `NotOurs` like any other.
                libp2p::dns::tokio::Transport::system(quic()).unwrap_or_else(|e| {
                    warn!(error = %e, "no DNS resolver configured: names resolve from the hosts file only");
                    let (config, options) = Default::default();
                    libp2p::dns::tokio::Transport::custom(quic(), config, options)
                })
            })?
            .with_behaviour(behaviour)?
            .with_swarm_config(swarm_config)
            .build(),
    };
    Ok((swarm, control, incoming))
}

/// How long a Kademlia request may take (libp2p's default), stretched by the time scale like every
/// timer of the node's (see [`NodeConfig::time_scale`]).
const KAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection is pinged, and how long a ping may take (libp2p's default timeout).
const PING_INTERVAL: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection with no stream open for this long is closed.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The most providers one lookup dials (those already connected are handed over besides). A
/// popular blob's record names up to 64 providers, the same ones for every fetcher: dialling them
/// all, a crowd of fetchers would pile onto the first few holders' connection slots. A random
/// share per lookup spreads the crowd; the holders it reaches name others (peer exchange), and the
/// next lookup draws again.
const MAX_LOOKUP_DIALS: usize = 12;

/// Checks of announced names under way at once, each on a blocking thread of its own until the
/// system's resolver answers; a peer's names announced past that are not kept.
const MAX_NAME_CHECKS: usize = 32;

/// The names a connected peer announced, and of them those found its own (`None` while they are
/// being checked).
struct Names {
    announced: Vec<Multiaddr>,
    theirs: Option<Vec<Multiaddr>>,
    /// Names it announced since (and whether it serves the DHT then), checked once the check
    /// under way ends: one check per peer.
    next: Option<(Vec<Multiaddr>, bool)>,
}

/// What a check of a peer's names found: what each resolved to.
struct NamesChecked {
    peer: PeerId,
    resolved: Vec<(Multiaddr, Vec<std::net::IpAddr>)>,
    /// The peer serves the DHT: its names may enter the routing table.
    dht: bool,
    /// The check's place among [`MAX_NAME_CHECKS`], given back once this is taken.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

struct Lookup {
    hash: Hash,
    found: mpsc::Sender<PeerId>,
    seen: HashSet<PeerId>,
    /// Providers this lookup may still dial.
    dials_left: usize,
    started: Instant,
    first_provider: Option<Duration>,
    stats: Option<oneshot::Sender<LookupStats>>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// The node's store: a blob it no longer holds is no longer announced ([`EventLoop::check_held`]).
    store: shoal_cache::Store,
    lookups: HashMap<QueryId, Lookup>,
    /// Providers being dialled, and the lookups waiting for them.
    dialling: HashMap<PeerId, Vec<mpsc::Sender<PeerId>>>,
    provided: HashSet<Hash>,
    /// Blobs whose last announcement reached no DHT peer (made before the routing table held
    /// one, or to peers that did not answer) or timed out: announced again as soon as a peer
    /// enters the table, and every [`UNANNOUNCED_RETRY`] while it holds any, rather than at the
    /// next re-announcement, hours later. A subset of `provided`.
    unannounced: HashSet<Hash>,
    /// Peers that entered the routing table so far: an announcement that failed while the count
    /// moved is made again at once (the set above may have been emptied meanwhile).
    table_generation: u64,
    provide_queue: VecDeque<Hash>,
    /// Announcements under way, with the `table_generation` they started at.
    providing: HashMap<QueryId, u64>,
    /// Blobs a recent lookup found crowded (see [`CROWDED`]), and when.
    crowded: lru::LruCache<Hash, Instant>,
    /// Announcements of crowded blobs waiting for their time; bounded by `provided`.
    deferred: Vec<(Instant, Hash)>,
    /// [`CROWDED_FOR`] and [`ANNOUNCE_SPREAD`], stretched by the node's time scale.
    crowded_for: Duration,
    announce_spread: Duration,
    /// [`crate::connmgr::GRACE`], stretched by the time scale.
    grace: Duration,
    /// [`UNANNOUNCED_RETRY`], stretched by the time scale.
    unannounced_retry: Duration,
    rtts: HashMap<PeerId, Duration>,
    /// The remote address of our connection to each connected peer.
    remote_addrs: HashMap<PeerId, Multiaddr>,
    /// Each open connection's peer, its remote address, and whether we dialled it.
    connections: HashMap<ConnectionId, (PeerId, Multiaddr, bool)>,
    listen_addrs: Vec<Multiaddr>,
    /// Listeners that have not reported an address yet.
    quiet_listeners: HashSet<ListenerId>,
    announce_listen_addrs: bool,
    /// The listen address the LAN's router forwards a public address to (see [`crate::portmap`]),
    /// and that public address, announced first.
    forwarded: Option<(Multiaddr, Multiaddr)>,
    /// What we announced last: peers are told again when it changes.
    announced: Vec<Multiaddr>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    activity: std::sync::Arc<crate::connmgr::PeerActivity>,
    crowds: std::sync::Arc<crate::crowd::Crowds>,
    /// The connections we trim back to; the hard cap is a little higher.
    target_connections: usize,
    /// See [`crate::NodeConfig::refresh_buckets`].
    refresh_buckets: bool,
    /// Since when each connected peer has been connected.
    connected_since: HashMap<PeerId, Instant>,
    /// Peers whose connections we are closing; a subset of `connected_since`.
    closing: HashSet<PeerId>,
    /// Providers whose dial our connection cap refused, waiting for a connection to close, since
    /// when, and how often that happened. Given up after [`ROOM_WAIT`]: the lookups waiting for
    /// one do not end while it is dialled, and their fetches look again only once they end.
    awaiting_room: VecDeque<(PeerId, Instant)>,
    room_wait: Duration,
    room_retries: HashMap<PeerId, u8>,
    /// The configured bootstrap peers, dialled again while no peer is connected.
    bootstrap: Vec<(PeerId, Multiaddr)>,
    /// The names connected peers announced ([`EventLoop::names_announced`]).
    names: HashMap<PeerId, Names>,
    /// The checks' results come back here; a check holds one of these permits until its result
    /// is taken, so the channel never holds more than it has room for.
    names_checked: (mpsc::Sender<NamesChecked>, mpsc::Receiver<NamesChecked>),
    /// The blobs announced that a check found the store no longer holds
    /// ([`EventLoop::check_held`]).
    gone: (mpsc::Sender<Gone>, mpsc::Receiver<Gone>),
    /// While a check runs, the blobs announced since it began (`Command::Provide`, of a blob
    /// announced already or not): one the check found gone may be back. `None` while no check
    /// runs.
    provided_while_checking: Option<HashSet<Hash>>,
    name_checks: std::sync::Arc<tokio::sync::Semaphore>,
    /// The wait before the next such dial ([`REJOIN_MIN`] doubling up to [`REJOIN_MAX`], both
    /// stretched by the time scale), and when it is due.
    rejoin_wait: Duration,
    rejoin_at: Instant,
    rejoin_min: Duration,
    rejoin_max: Duration,
}

impl EventLoop {
    pub(crate) fn new(
        mut swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        config: &NodeConfig,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        activity: std::sync::Arc<crate::connmgr::PeerActivity>,
        crowds: std::sync::Arc<crate::crowd::Crowds>,
        store: shoal_cache::Store,
    ) -> Self {
        if !config.external.is_empty() {
            swarm.behaviour_mut().kad.store_mut().set_announced(config.external.clone());
        }
        Self {
            swarm,
            commands,
            store,
            lookups: HashMap::new(),
            dialling: HashMap::new(),
            provided: HashSet::new(),
            unannounced: HashSet::new(),
            table_generation: 0,
            provide_queue: VecDeque::new(),
            providing: HashMap::new(),
            crowded: lru::LruCache::new(std::num::NonZeroUsize::new(MAX_CROWDED).expect("nonzero")),
            deferred: Vec::new(),
            crowded_for: config.stretch(CROWDED_FOR),
            announce_spread: config.stretch(ANNOUNCE_SPREAD),
            grace: config.stretch(crate::connmgr::GRACE),
            unannounced_retry: config.stretch(UNANNOUNCED_RETRY),
            rtts: HashMap::new(),
            remote_addrs: HashMap::new(),
            connections: HashMap::new(),
            listen_addrs: Vec::new(),
            quiet_listeners: HashSet::new(),
            // With no external address configured, our listen addresses are what we announce.
            announce_listen_addrs: config.external.is_empty(),
            forwarded: None,
            announced: Vec::new(),
            metrics,
            activity,
            crowds,
            target_connections: config.max_connections as usize,
            refresh_buckets: config.refresh_buckets,
            connected_since: HashMap::new(),
            closing: HashSet::new(),
            awaiting_room: VecDeque::new(),
            room_wait: config.stretch(ROOM_WAIT),
            room_retries: HashMap::new(),
            bootstrap: Vec::new(),
            names: HashMap::new(),
            names_checked: mpsc::channel(MAX_NAME_CHECKS),
            gone: mpsc::channel(1),
            provided_while_checking: None,
            name_checks: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_NAME_CHECKS)),
            rejoin_wait: config.stretch(REJOIN_MIN),
            rejoin_at: Instant::now() + config.stretch(REJOIN_MIN),
            rejoin_min: config.stretch(REJOIN_MIN),
            rejoin_max: config.stretch(REJOIN_MAX),
        }
    }

    /// The listeners started on the swarm, each waited for until it reports an address.
    pub(crate) fn expect_listeners(&mut self, listeners: Vec<ListenerId>) {
        self.quiet_listeners.extend(listeners);
    }

    /// Adds a bootstrap peer (its multiaddr ends in `/p2p/<peer id>`) and dials it.
    pub(crate) fn add_bootstrap(&mut self, addr: &Multiaddr) -> anyhow::Result<()> {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            anyhow::bail!("bootstrap address {addr} must end in /p2p/<peer id>");
        };
        // One list of seed nodes, deployed to every seed, names each seed itself too.
        if peer == *self.swarm.local_peer_id() {
            info!(%addr, "skipping a bootstrap address of this node itself");
            return Ok(());
        }
        self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        self.swarm
            .dial(DialOpts::peer_id(peer).addresses(vec![addr.clone()]).build())
            .map_err(|e| anyhow::anyhow!("cannot dial bootstrap peer {addr}: {e}"))?;
        if self.bootstrap.len() < MAX_BOOTSTRAP_PEERS {
            self.bootstrap.push((peer, addr.clone()));
        }
        Ok(())
    }

    /// While no peer is connected, dials the bootstrap peers again, less and less often: a node
    /// whose bootstrap peers were down when it started, or that lost every peer, otherwise waited
    /// for Kademlia's next periodic bootstrap (`dht_refresh`, 5 minutes) or for a lookup to dial
    /// a peer its table still names.
    fn rejoin(&mut self) {
        let now = Instant::now();
        if self.bootstrap.is_empty() || now < self.rejoin_at {
            return;
        }
        if self.swarm.connected_peers().next().is_some() {
            self.rejoin_wait = self.rejoin_min;
            self.rejoin_at = now + self.rejoin_wait;
            return;
        }
        info!(peers = self.bootstrap.len(), "no peer connected; dialling the bootstrap peers again");
        for (peer, addr) in self.bootstrap.clone() {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            // One already being dialled or connected is left alone.
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
        }
        self.rejoin_at = now + self.rejoin_wait;
        self.rejoin_wait = (self.rejoin_wait * 2).min(self.rejoin_max);
    }

    /// Stops announcing `hash`.
    fn unprovide(&mut self, hash: Hash) {
        if self.provided.remove(&hash) {
            self.unannounced.remove(&hash);
            self.deferred.retain(|(_, h)| *h != hash);
            self.swarm.behaviour_mut().kad.stop_providing(&RecordKey::new(hash.as_bytes()));
        }
    }

    /// Looks, on a blocking thread, for the blobs announced that the store no longer holds;
    /// [`EventLoop::withdraw_gone`] takes the answer. The node withdraws the blobs it sees go (an
    /// eviction made room for a fetch's pieces, a removal), but not every one reaches it: a
    /// request cut off while its pieces were stored drops the evictions they made. Renewed every
    /// 12 hours, the record of a blob gone sent every peer that looked it up to ask us in vain,
    /// and to count it against us. Off the event loop: the store's lock is held across syncs.
    fn check_held(&mut self) {
        if self.provided_while_checking.is_some() || self.provided.is_empty() {
            return;
        }
        self.provided_while_checking = Some(HashSet::new());
        let (store, announced, tx) =
            (self.store.clone(), self.provided.iter().copied().collect::<Vec<_>>(), self.gone.0.clone());
        tokio::task::spawn_blocking(move || {
            // Answered whatever happens: a check that never answered would stop every later one.
            let look = || announced.into_iter().filter(|h| store.size(*h).is_none()).collect();
            let gone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(look)).unwrap_or_default();
            let _ = tx.blocking_send(gone);
        });
    }

    /// Stops announcing the blobs a check found gone, but those announced since it began: one
    /// may be back (fetched again, its announcement made while the old one stood).
    fn withdraw_gone(&mut self, gone: Vec<Hash>) {
        let since = self.provided_while_checking.take().unwrap_or_default();
        for hash in gone.into_iter().filter(|h| !since.contains(h)) {
            debug!(blob = %hash, "no longer held; withdrawn");
            self.unprovide(hash);
        }
    }

    pub(crate) async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let mut reprovide = tokio::time::interval(REPROVIDE_INTERVAL);
        reprovide.tick().await;
        // Never a zero period (tokio refuses one), whatever the time scale.
        let mut trim = tokio::time::interval((self.grace / 2).max(Duration::from_millis(10)));
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(self.unannounced_retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(EXPIRED_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = tokio::time::interval(HELD_CHECK);
        held.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(checked) = self.names_checked.1.recv() => self.on_names_checked(checked),
                _ = reprovide.tick() => {
                    let all: Vec<Hash> = self.provided.iter().copied().collect();
                    for h in all {
                        self.enqueue_provide(h);
                    }
                }
                _ = trim.tick() => {
                    self.give_up_waiting_for_room();
                    self.trim_connections();
                    self.release_deferred();
                    self.rejoin();
                }
                _ = retry.tick(), if !self.unannounced.is_empty() => {
                    if self.swarm.behaviour_mut().kad.kbuckets().any(|b| b.num_entries() > 0) {
                        self.announce_again();
                    }
                }
                _ = held.tick() => self.check_held(),
                Some(gone) = self.gone.1.recv() => self.withdraw_gone(gone),
                _ = sweep.tick() => {
                    self.swarm.behaviour_mut().kad.store_mut().remove_expired(std::time::Instant::now());
                }
                _ = &mut shutdown => break,
            }
            self.drive_provides();
        }
        debug!("swarm loop stopped");
    }

    /// Queues the announcements that reached no DHT peer.
    fn announce_again(&mut self) {
        for hash in std::mem::take(&mut self.unannounced) {
            self.enqueue_provide(hash);
        }
    }

    fn enqueue_provide(&mut self, hash: Hash) {
        if self.provide_queue.len() >= MAX_PROVIDE_QUEUE {
            // The oldest waits for the next re-provide round; `provided` still lists it.
            self.provide_queue.pop_front();
        }
        self.provide_queue.push_back(hash);
    }

    fn drive_provides(&mut self) {
        while self.providing.len() < MAX_PROVIDE_QUERIES {
            let Some(hash) = self.provide_queue.pop_front() else { break };
            if !self.provided.contains(&hash) {
                continue;
            }
            match self.swarm.behaviour_mut().kad.start_providing(RecordKey::new(hash.as_bytes())) {
                Ok(id) => {
                    self.providing.insert(id, self.table_generation);
                }
                Err(e) => {
                    // Tried again with the announcements that reached nobody.
                    debug!(blob = %hash, error = ?e, "cannot announce blob yet");
                    self.unannounced.insert(hash);
                }
            }
        }
    }

    /// Announces at once, unless a recent lookup found the blob crowded: then at a random time
    /// within [`ANNOUNCE_SPREAD`]. A crowd's fetchers serve each other meanwhile, found through
    /// the record's first providers and peer exchange.
    fn provide(&mut self, hash: Hash) {
        let now = Instant::now();
        let crowded = self.crowded.get(&hash).is_some_and(|at| now.duration_since(*at) < self.crowded_for);
        if crowded {
            let wait = self.announce_spread.mul_f64(rand::random::<f64>());
            self.deferred.push((now + wait, hash));
            self.metrics.announcements_deferred.inc();
        } else {
            self.enqueue_provide(hash);
        }
    }

    /// Queues the deferred announcements whose time has come.
    fn release_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        self.deferred.retain(|(at, hash)| {
            let ready = *at <= now;
            if ready {
                due.push(*hash);
            }
            !ready
        });
        for hash in due {
            self.enqueue_provide(hash);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Provide { hash, holders } => {
                if holders >= CROWDED {
                    self.crowded.put(hash, Instant::now());
                }
                if let Some(since) = self.provided_while_checking.as_mut() {
                    since.insert(hash);
                }
                if self.provided.insert(hash) {
                    self.provide(hash);
                }
            }
            Command::Unprovide(hash) => self.unprovide(hash),
            Command::FindProviders { hash, found, stats } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(RecordKey::new(hash.as_bytes()));
                let lookup = Lookup {
                    hash,
                    found,
                    seen: HashSet::new(),
                    dials_left: MAX_LOOKUP_DIALS,
                    started: Instant::now(),
                    first_provider: None,
                    stats,
                };
                self.lookups.insert(id, lookup);
            }
            Command::DhtSnapshot { hash, reply } => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                let routing_table =
                    kad.kbuckets().flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>()).collect();
                let key = RecordKey::new(hash.as_bytes());
                let holds_provider_record = !kad::store::RecordStore::providers(kad.store_mut(), &key).is_empty();
                let _ = reply.send(DhtSnapshot { routing_table, holds_provider_record });
            }
            Command::Peers(reply) => {
                let peers = self.connected_peers();
                let _ = reply.send(peers);
            }
            Command::Listening(reply) => {
                let _ = reply.send((self.full_listen_addrs(), self.quiet_listeners.is_empty()));
            }
            Command::Forwarded(forward) => {
                let forward = match forward {
                    // Told of an address we stopped listening on meanwhile: nothing to forward to.
                    Some((local, _)) if !self.listen_addrs.contains(&local) => None,
                    f => f,
                };
                if forward == self.forwarded {
                    return;
                }
                match (&forward, &self.forwarded) {
                    (Some((_, external)), _) => {
                        info!(address = %external, "announcing the public address the router forwards to us");
                    }
                    (None, Some((_, external))) => {
                        info!(address = %external, "the router's forward of our port is no longer announced");
                    }
                    (None, None) => {}
                }
                self.forwarded = forward;
                self.sync_announced();
            }
            Command::Announced(reply) => {
                let me = *self.swarm.local_peer_id();
                let _ =
                    reply.send(self.swarm.external_addresses().map(|a| a.clone().with(Protocol::P2p(me))).collect());
            }
            Command::DhtInfo(reply) => {
                let routing_table_peers = self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum();
                let _ = reply.send(DhtInfo {
                    routing_table_peers,
                    provided: self.provided.len(),
                    provide_queue: self.provide_queue.len(),
                    announcing: self.providing.len(),
                });
            }
            Command::Reach { peer, addrs, from, found } => {
                if peer == *self.swarm.local_peer_id() {
                    return;
                }
                let addrs = crate::addrs::dialable(addrs, self.over_loopback(&from));
                // Not dialled now: a crowd names hundreds of holders, and connecting to each on
                // sight churned connections faster than transfers used them. The fetch asks the
                // peer when it has a slot for it; the stream's dial finds these addresses.
                for addr in addrs {
                    self.swarm.add_peer_address(peer, addr);
                }
                let _ = found.try_send(peer);
            }
        }
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        self.swarm
            .connected_peers()
            .map(|p| PeerInfo {
                peer_id: p.to_string(),
                address: self.remote_addrs.get(p).map(|a| a.to_string()).unwrap_or_default(),
                rtt_ms: self.rtts.get(p).map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect()
    }

    fn full_listen_addrs(&self) -> Vec<Multiaddr> {
        let me = *self.swarm.local_peer_id();
        self.listen_addrs.iter().map(|a| a.clone().with(Protocol::P2p(me))).collect()
    }

    /// Adds a DHT server's addresses to the routing table if it is there already or its bucket has
    /// room. Kademlia's own rule for a full bucket is to dial its least recently seen entry to see
    /// whether it still lives; with connections trimmed to a bound, "not connected" no longer means
    /// "maybe gone", and those liveness dials fed the trimming in a loop (at 150 nodes, 2,000
    /// connections a second among idle nodes). A full bucket keeps the peers it has, which is
    /// also Kademlia's preference for long-lived peers; entries that stop answering are removed
    /// when dials to them fail.
    ///
    /// A peer's entry keeps at most [`MAX_PEER_ADDRS`] addresses: Kademlia adds every address it
    /// is given to an entry and drops one only when a dial to it fails, and our answers to other
    /// nodes carry them all, so a peer repeating identify with new addresses grew its entry (and
    /// our answers, past what the others accept) without bound. What a peer says of itself
    /// (`from_peer`, its identify) replaces what the entry held, so that an address it moved
    /// from, or one of a full list it no longer names, does not stay for good; an address we
    /// dialled it on is added while there is room.
    fn learn_addresses(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, from_peer: bool) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let held: Option<Vec<Multiaddr>> = match kad.kbucket(peer) {
            None => Some(Vec::new()),
            Some(bucket) => match bucket.iter().find(|e| e.node.key.preimage() == &peer) {
                Some(entry) => Some(entry.node.value.iter().cloned().collect()),
                None => (bucket.num_entries() < K_VALUE).then(Vec::new),
            },
        };
        let Some(held) = held else { return };
        // As Kademlia keeps them, ending in `/p2p/<id>`: so they compare with those it holds.
        let mut addrs: Vec<Multiaddr> = addrs
            .into_iter()
            .filter(|a| a.as_ref().len() <= MAX_PEER_ADDR_LEN)
            .filter_map(|a| a.with_p2p(peer).ok())
            .collect();
        addrs.dedup();
        let room = match from_peer {
            true => MAX_PEER_ADDRS,
            false => MAX_PEER_ADDRS.saturating_sub(held.len()),
        };
        addrs.truncate(room);
        // Added first: removing an entry's last address removes the entry.
        for addr in &addrs {
            kad.add_address(&peer, addr.clone());
        }
        if from_peer && !addrs.is_empty() {
            for old in held.iter().filter(|a| !addrs.contains(a)) {
                kad.remove_address(&peer, old);
            }
        }
    }

    fn forget_listen_addr(&mut self, address: &Multiaddr) {
        info!(%address, "no longer listening");
        self.listen_addrs.retain(|a| a != address);
        // The router's forward to it leads nowhere now (the forwarding task also drops it).
        if self.forwarded.as_ref().is_some_and(|(local, _)| local == address) {
            info!(%address, "the router's forward to this address is no longer announced");
            self.forwarded = None;
        }
        self.sync_announced();
    }

    /// Announces the listen addresses worth announcing (see [`crate::addrs`]) and the one the
    /// router forwards to us as our external addresses, unless addresses were configured, and
    /// gives our provider records the same.
    fn sync_announced(&mut self) {
        if !self.announce_listen_addrs {
            return;
        }
        // The forwarded address first: a peer keeps at most `MAX_PEER_ADDRS` of them.
        let mut announced: Vec<Multiaddr> = self.forwarded.iter().map(|(_, external)| external.clone()).collect();
        for a in crate::addrs::announced(&self.listen_addrs) {
            if !announced.contains(&a) {
                announced.push(a);
            }
        }
        let old: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        for a in old.iter().filter(|a| !announced.contains(a)) {
            self.swarm.remove_external_address(a);
        }
        for a in announced.iter().filter(|a| !old.contains(a)) {
            self.swarm.add_external_address(a.clone());
        }
        if announced != self.announced {
            // Peers that identified us before are told now, not at identify's next round.
            let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
            self.swarm.behaviour_mut().identify.push(peers);
            self.announced = announced.clone();
        }
        self.swarm.behaviour_mut().kad.store_mut().set_announced(announced);
    }

    /// The addresses a connected peer announced that others may dial it at (see
    /// [`crate::addrs`]): its loopback ones only if it runs on this machine, and none if it
    /// dialled us from an address none of them shares (behind a NAT, or announcing what it
    /// does not listen on): a routing table that kept them would hand them to every lookup,
    /// which would wait on a dial that cannot succeed. Judged by each of our connections to it:
    /// believed if one vouches for them (we dialled it, or it dialled us from one of them). At
    /// most [`MAX_PEER_ADDRS`] of at most [`MAX_PEER_ADDR_LEN`] bytes each, as a routing-table
    /// entry holds.
    fn reachable_addrs(&self, peer: PeerId, announced: Vec<Multiaddr>) -> Judged {
        let mut judged = Judged::Gone;
        // A connection over a LAN first: reached at a public address, a peer's private ones are
        // not kept (see `addrs::reachable`), and over its LAN they are worth keeping.
        let mut theirs: Vec<&(PeerId, Multiaddr, bool)> =
            self.connections.values().filter(|(p, ..)| *p == peer).collect();
        theirs.sort_by_key(|(_, from, _)| crate::addrs::is_public_addr(from));
        for (_, from, dialled) in theirs {
            match crate::addrs::reachable(announced.clone(), from, *dialled) {
                Some(addrs) => {
                    let addrs = addrs.into_iter().filter(|a| a.as_ref().len() <= MAX_PEER_ADDR_LEN);
                    return Judged::Believed(addrs.take(MAX_PEER_ADDRS).collect());
                }
                None => judged = Judged::Doubted,
            }
        }
        if matches!(judged, Judged::Doubted) {
            debug!(%peer, addrs = ?announced, "a peer that dialled us from none of the addresses it announced");
        }
        judged
    }

    /// The names `peer` announced (at most [`MAX_PEER_ADDRS`]), which vouch for nothing: those
    /// found its own ([`crate::addrs::name_is_theirs`]) are kept beside its other addresses. The
    /// same names announced again are not checked again while it stays connected. Checked off
    /// the event loop, with the system's resolver, at most [`MAX_NAME_CHECKS`] at once: past
    /// that, the names are not kept.
    fn names_announced(&mut self, peer: PeerId, announced: Vec<Multiaddr>, dht: bool) {
        let announced: Vec<Multiaddr> =
            announced.into_iter().filter(|a| a.as_ref().len() <= MAX_PEER_ADDR_LEN).collect();
        if announced.is_empty() {
            self.names.remove(&peer);
            return;
        }
        match self.names.get_mut(&peer) {
            // Checked (the identify answer that replaced the peer's addresses dropped them), or
            // being checked.
            Some(names) if names.announced == announced => {
                names.next = None;
                if let Some(theirs) = names.theirs.clone() {
                    self.keep_names(peer, theirs, dht);
                }
                return;
            }
            // Others are being checked: these are, after them.
            Some(names) if names.theirs.is_none() => {
                names.next = Some((announced, dht));
                return;
            }
            _ => {}
        }
        self.check_names(peer, announced, dht);
    }

    /// Starts a check of the names `peer` announced (see [`Self::names_announced`]).
    fn check_names(&mut self, peer: PeerId, announced: Vec<Multiaddr>, dht: bool) {
        let Ok(permit) = self.name_checks.clone().try_acquire_owned() else {
            debug!(%peer, names = ?announced, "too many names being checked; these are not kept");
            self.names.remove(&peer);
            return;
        };
        self.names.insert(peer, Names { announced: announced.clone(), theirs: None, next: None });
        let done = self.names_checked.0.clone();
        tokio::task::spawn_blocking(move || {
            let resolved = announced.into_iter().map(|name| {
                let ips = crate::addrs::resolve(&name);
                (name, ips)
            });
            let checked = NamesChecked { peer, resolved: resolved.collect(), dht, _permit: permit };
            // Never full: a result holds its permit until it is taken.
            let _ = done.try_send(checked);
        });
    }

    /// A check of `peer`'s names ended: those that resolve to where it is connected from now
    /// alone are its own, and kept. Ignored if it disconnected meanwhile; names it announced
    /// since are checked next.
    fn on_names_checked(&mut self, checked: NamesChecked) {
        let NamesChecked { peer, resolved, dht, _permit: permit } = checked;
        // Given back first: the next check of this peer's names may take it.
        drop(permit);
        let Some(names) = self.names.get_mut(&peer) else { return };
        if names.theirs.is_some() || !names.announced.iter().eq(resolved.iter().map(|(name, _)| name)) {
            return;
        }
        if let Some((next, dht)) = names.next.take() {
            self.check_names(peer, next, dht);
            return;
        }
        let ips: Vec<std::net::IpAddr> = self
            .connections
            .values()
            .filter(|(p, ..)| *p == peer)
            .filter_map(|(_, from, _)| crate::addrs::ip(from))
            .collect();
        if ips.is_empty() {
            // Connected over no IP address (yet): nothing to judge by, and nothing remembered.
            self.names.remove(&peer);
            return;
        }
        let theirs: Vec<Multiaddr> = resolved
            .into_iter()
            .filter(|(name, to)| {
                let ok = crate::addrs::name_is_theirs(to, &ips);
                if !ok {
                    debug!(%peer, %name, resolved = ?to, "a name the peer announced is not its own alone; not kept");
                }
                ok
            })
            .map(|(name, _)| name)
            .collect();
        names.theirs = Some(theirs.clone());
        self.keep_names(peer, theirs, dht);
    }

    /// Keeps names found `peer`'s own: dialled, hinted and (if it serves the DHT) in the routing
    /// table beside its other addresses.
    fn keep_names(&mut self, peer: PeerId, names: Vec<Multiaddr>, dht: bool) {
        if names.is_empty() || !self.swarm.is_connected(&peer) {
            return;
        }
        self.crowds.also_at(peer, names.clone());
        for name in &names {
            self.swarm.add_peer_address(peer, name.clone());
        }
        if dht {
            self.learn_addresses(peer, names, false);
        }
    }

    /// Stores a provider record a peer sent us for itself (Kademlia accepts no other), with the
    /// addresses [`Self::reachable_addrs`] keeps. A record stored without addresses is answered
    /// with the provider's routing-table entry, or left out of the answer while it has none; it
    /// still names the provider to a lookup of our own, which reaches it over the connection it
    /// came on while that is open.
    fn store_provider(&mut self, mut record: kad::ProviderRecord) {
        // Shoal's keys are BLAKE3 hashes; anything else is no blob's (and up to 16 KiB each).
        if record.key.as_ref().len() != 32 {
            debug!(provider = %record.provider, "provider record for a key that is no blob's hash, not stored");
            return;
        }
        let announced = std::mem::take(&mut record.addresses);
        if let Judged::Believed(mut addrs) = self.reachable_addrs(record.provider, announced) {
            addrs.truncate(MAX_RECORD_ADDRS);
            record.addresses = addrs;
        }
        if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().add_provider(record) {
            debug!(error = %e, "provider record not stored");
        }
    }

    /// Whether our connection to `peer` runs over loopback: it is on this machine.
    fn over_loopback(&self, peer: &PeerId) -> bool {
        self.remote_addrs.get(peer).is_some_and(crate::addrs::is_loopback)
    }

    /// Closes the least useful connections once there are more than the target (see
    /// [`crate::connmgr`]); providers being dialled for a lookup are kept.
    fn trim_connections(&mut self) {
        self.trim_to(self.target_connections, self.grace);
    }

    fn trim_to(&mut self, target: usize, grace: Duration) {
        // Connections, as the cap counts them: a peer that dialled us as we dialled it holds two.
        let mut per_peer: HashMap<PeerId, usize> = HashMap::new();
        for (peer, ..) in self.connections.values() {
            *per_peer.entry(*peer).or_insert(0) += 1;
        }
        let count = |p: &PeerId| per_peer.get(p).copied().unwrap_or(1);
        // Connections already closing are gone for this count: closing one takes a round trip or
        // more, and picking it again would leave the excess in place.
        let open: usize = self.connected_since.keys().filter(|p| !self.closing.contains(p)).map(count).sum();
        if open <= target {
            return;
        }
        let connected: Vec<(PeerId, Instant, usize)> = self
            .connected_since
            .iter()
            .filter(|(p, _)| !self.dialling.contains_key(p) && !self.closing.contains(p))
            .map(|(p, t)| (*p, *t, count(p)))
            .collect();
        let candidates: usize = connected.iter().map(|c| c.2).sum();
        let target = target.saturating_sub(open.saturating_sub(candidates));
        for peer in crate::connmgr::to_trim(&connected, target, &self.activity, Instant::now(), grace) {
            trace!(%peer, "trimming an idle connection");
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                self.metrics.connections_trimmed.inc();
                self.closing.insert(peer);
            }
        }
    }

    /// Stops dialling the providers that waited [`ROOM_WAIT`] for a connection to close: the
    /// lookups that wait for them end, and their fetches may look for holders again.
    fn give_up_waiting_for_room(&mut self) {
        while let Some(&(peer, since)) = self.awaiting_room.front() {
            if since.elapsed() < self.room_wait {
                break;
            }
            self.awaiting_room.pop_front();
            // Parked again since (a later refusal), it waits on from then.
            if self.awaiting_room.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            if !self.swarm.is_connected(&peer) && self.dialling.remove(&peer).is_some() {
                debug!(%peer, "no connection closed to make room for a provider; its lookups go on without it");
            }
            self.room_retries.remove(&peer);
        }
    }

    /// Hands a provider to a lookup once we hold a connection to it.
    fn offer_provider(&mut self, peer: PeerId, found: &mpsc::Sender<PeerId>) {
        if self.swarm.is_connected(&peer) {
            let _ = found.try_send(peer);
            return;
        }
        let waiting = self.dialling.entry(peer).or_default();
        let first = waiting.is_empty();
        // Lookups that ended no longer wait; each lookup waits once. A dial parked until our own
        // connections make room can otherwise gather one per lookup that names the peer.
        waiting.retain(|f| !f.is_closed());
        if !waiting.iter().any(|f| f.same_channel(found)) && waiting.len() < MAX_WAITING_LOOKUPS {
            waiting.push(found.clone());
        }
        if first {
            self.dial_provider(peer);
        }
    }

    /// Dials a provider lookups wait for; if the dial cannot start, they stop waiting.
    fn dial_provider(&mut self, peer: PeerId) {
        // Dial while the lookup runs: Kademlia hands the dialer the addresses it learnt, and the
        // stream behaviour those another holder named (see `Command::Reach`).
        let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
        match self.swarm.dial(opts) {
            Ok(()) => {}
            // Someone (Kademlia itself, often) is dialling it already: its connection, or its
            // failure, reaches the waiting lookups all the same.
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => {
                debug!(%peer, error = %e, "cannot dial provider");
                self.dialling.remove(&peer);
                self.room_retries.remove(&peer);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let direction = |e: &libp2p::core::ConnectedPoint| if e.is_dialer() { "out" } else { "in" };
        match &event {
            SwarmEvent::ConnectionEstablished { endpoint, .. } => {
                self.metrics.connection(direction(endpoint), "opened")
            }
            SwarmEvent::ConnectionClosed { endpoint, connection_id, .. } => {
                self.connections.remove(connection_id);
                self.metrics.connection(direction(endpoint), "closed")
            }
            SwarmEvent::OutgoingConnectionError { .. } => self.metrics.connection("out", "failed"),
            SwarmEvent::IncomingConnectionError { .. } => self.metrics.connection("in", "failed"),
            _ => {}
        }
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                self.quiet_listeners.remove(&listener_id);
                let me = *self.swarm.local_peer_id();
                info!(address = %address.clone().with(Protocol::P2p(me)), "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
                self.sync_announced();
            }
            // An address that went away (an interface down, a temporary IPv6 address retired, its
            // listener closed) is no longer announced or shown.
            SwarmEvent::ExpiredListenAddr { address, .. } => self.forget_listen_addr(&address),
            SwarmEvent::ListenerClosed { listener_id, addresses, .. } => {
                self.quiet_listeners.remove(&listener_id);
                for address in &addresses {
                    self.forget_listen_addr(address);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. } => {
                trace!(peer = %peer_id, address = %endpoint.get_remote_address(), "connected");
                // Stored without a trailing `/p2p/<id>` (a dialled address has one, an accepted
                // one has none), so that every peer's address reads alike beside its id.
                let address = crate::addrs::bare(endpoint.get_remote_address());
                self.connections.insert(connection_id, (peer_id, address.clone(), endpoint.is_dialer()));
                self.crowds.connected_from(peer_id, &address);
                self.remote_addrs.insert(peer_id, address);
                self.connected_since.entry(peer_id).or_insert_with(Instant::now);
                // A new connection to a peer we were closing: it stays until trimmed on its own.
                self.closing.remove(&peer_id);
                self.trim_connections();
                self.room_retries.remove(&peer_id);
                if let Some(waiting) = self.dialling.remove(&peer_id) {
                    for found in waiting {
                        let _ = found.try_send(peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                if matches!(error, DialError::Denied { .. }) && self.dialling.contains_key(&peer) {
                    // Our own cap: close the least useful connection, then dial again.
                    let retries = self.room_retries.entry(peer).or_insert(0);
                    *retries += 1;
                    if *retries <= 3 {
                        self.awaiting_room.push_back((peer, Instant::now()));
                        // Back under the target, not just one below the cap: Kademlia's own dials
                        // would take a single freed slot before the provider's redial.
                        let below =
                            self.target_connections.saturating_sub(1).min(self.connections.len().saturating_sub(1));
                        self.trim_to(below, Duration::ZERO);
                        return;
                    }
                }
                self.room_retries.remove(&peer);
                let turned_away = crate::connmgr::turned_away(&error);
                if matches!(error, DialError::Transport(_)) && !turned_away {
                    // It could not be reached: the pieces we served it are no longer its to pass on.
                    // A peer that answered and turned us away at its cap is there, and passes
                    // them on to the peers it has room for.
                    self.crowds.unreachable(peer, Instant::now());
                }
                match self.dialling.remove(&peer) {
                    // There, and full for now: the lookups hand it on, and the fetch asks it and
                    // backs off while it stays full, as it does with a provider that answers
                    // `Busy`. Dropped here, a provider of a blob few hold would not be asked
                    // again before the next lookup.
                    Some(waiting) if turned_away => {
                        for found in waiting {
                            let _ = found.try_send(peer);
                        }
                    }
                    Some(_) => debug!(%peer, %error, "cannot reach a provider"),
                    None => trace!(%peer, %error, "dial failed"),
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.rtts.remove(&peer_id);
                self.names.remove(&peer_id);
                self.remote_addrs.remove(&peer_id);
                self.closing.remove(&peer_id);
                self.crowds.disconnected(&peer_id);
                self.connected_since.remove(&peer_id);
                while let Some((peer, _)) = self.awaiting_room.pop_front() {
                    if self.dialling.contains_key(&peer) && !self.swarm.is_connected(&peer) {
                        self.dial_provider(peer);
                        break;
                    }
                    self.room_retries.remove(&peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                let dht = info.protocols.contains(&KAD_PROTOCOL);
                let names = crate::addrs::names(&info.listen_addrs, MAX_PEER_ADDRS);
                match self.reachable_addrs(peer_id, info.listen_addrs) {
                    Judged::Believed(addrs) => {
                        self.crowds.connected(peer_id, addrs.clone());
                        // For a later dial of the peer once this connection closed (a provider
                        // whose connection was trimmed, asked again): the stream behaviour
                        // remembers them, for 2,048 peers.
                        for addr in &addrs {
                            self.swarm.add_peer_address(peer_id, addr.clone());
                        }
                        if dht {
                            self.learn_addresses(peer_id, addrs, true);
                        }
                    }
                    Judged::Doubted => {
                        self.crowds.undialable(peer_id, Instant::now());
                        self.swarm.behaviour_mut().stream.forget(&peer_id);
                    }
                    // Closed meanwhile: nothing to judge by.
                    Judged::Gone => return,
                }
                self.names_announced(peer_id, names, dht);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        let (id, result, step, stats) = match event {
            kad::Event::OutboundQueryProgressed { id, result, step, stats } => (id, result, step, stats),
            // A peer we dialled serves the DHT: it may enter the routing table (the address is
            // the one we dialled, so it is reachable).
            kad::Event::RoutablePeer { peer, address } => {
                self.learn_addresses(peer, vec![address], false);
                return;
            }
            kad::Event::RoutingUpdated { peer, is_new_peer, addresses, .. } => {
                // Kademlia adds every address it dials a peer at (a bootstrap address too): a
                // loopback one goes while the entry has another, or we would hand it to peers
                // elsewhere.
                let addresses = addresses.into_vec();
                let kept = crate::addrs::dialable(addresses.clone(), true);
                if kept.len() < addresses.len() && !kept.is_empty() {
                    for a in addresses.iter().filter(|a| !kept.contains(a)) {
                        self.swarm.behaviour_mut().kad.remove_address(&peer, a);
                    }
                }
                if is_new_peer {
                    self.table_generation += 1;
                    self.announce_again();
                }
                return;
            }
            kad::Event::InboundRequest { request } => {
                let request = match request {
                    kad::InboundRequest::FindNode { .. } => "find_node",
                    kad::InboundRequest::GetProvider { .. } => "get_providers",
                    kad::InboundRequest::AddProvider { record } => {
                        if let Some(record) = record {
                            self.store_provider(record);
                        }
                        "add_provider"
                    }
                    // Not stored (see `build_swarm`).
                    kad::InboundRequest::PutRecord { .. } => "put_record",
                    kad::InboundRequest::GetRecord { .. } => "get_record",
                };
                self.metrics.dht_served.get_or_create(&crate::metrics::DhtLabels { request }).inc();
                return;
            }
            _ => return,
        };
        trace!(kind = query_kind(&result), requests = stats.num_requests(), last = step.last, "kad query progressed");
        if step.last {
            let query = query_kind(&result);
            for (outcome, n) in [("ok", stats.num_successes()), ("failed", stats.num_failures())] {
                self.metrics
                    .dht_requests
                    .get_or_create(&crate::metrics::DhtQueryLabels { query, outcome })
                    .inc_by(n.into());
            }
        }
        match result {
            QueryResult::GetProviders(result) => {
                let me = *self.swarm.local_peer_id();
                let mut finish = false;
                if let Some(lookup) = self.lookups.get_mut(&id) {
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                        if lookup.first_provider.is_none() && providers.iter().any(|p| *p != me) {
                            lookup.first_provider = Some(lookup.started.elapsed());
                        }
                        let mut new: Vec<PeerId> =
                            providers.into_iter().filter(|p| *p != me && lookup.seen.insert(*p)).collect();
                        new.shuffle(&mut rand::rng());
                        // Connected providers cost nothing; the others count against the budget.
                        new.retain(|p| {
                            let connected = self.swarm.is_connected(p);
                            let dial = !connected && lookup.dials_left > 0;
                            lookup.dials_left -= usize::from(dial);
                            connected || dial
                        });
                        let found = lookup.found.clone();
                        let (hash, seen) = (lookup.hash, lookup.seen.len());
                        if seen >= CROWDED {
                            self.crowded.put(hash, Instant::now());
                        }
                        for p in new {
                            self.offer_provider(p, &found);
                        }
                    }
                    // Done once the fetch stopped listening, once the lookup may dial no more
                    // providers, or, for a fetch (a lookup with no one waiting for its figures),
                    // once it found a crowd's worth, as peer exchange names the rest: further
                    // answers could name only peers it would not ask, and each costs a request
                    // (often a connection) to the busiest nodes of the DHT, the few closest to a
                    // popular blob's key. `shoal providers` hears every answer.
                    finish = self.lookups.get(&id).is_some_and(|l| {
                        l.found.is_closed() || l.dials_left == 0 || (l.stats.is_none() && l.seen.len() >= CROWDED)
                    });
                }
                if step.last || finish {
                    if let Some(lookup) = self.lookups.remove(&id) {
                        self.metrics.lookup_duration.observe(lookup.started.elapsed().as_secs_f64());
                        self.metrics.providers_found.observe(lookup.seen.len() as f64);
                        debug!(
                            blob = %lookup.hash.short(),
                            providers = lookup.seen.len(),
                            requests = stats.num_requests(),
                            elapsed_ms = lookup.started.elapsed().as_millis() as u64,
                            "provider lookup finished"
                        );
                        if let Some(reply) = lookup.stats {
                            let _ = reply.send(LookupStats {
                                requests: stats.num_requests(),
                                answered: stats.num_successes(),
                                first_provider: lookup.first_provider,
                                duration: lookup.started.elapsed(),
                                providers: lookup.seen.len(),
                            });
                        }
                    }
                    if !step.last
                        && let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id)
                    {
                        q.finish();
                    }
                }
            }
            QueryResult::StartProviding(result) => {
                let started_at = self.providing.remove(&id);
                let key = match &result {
                    Ok(ok) => &ok.key,
                    Err(e) => {
                        debug!(error = ?e, "announcing a blob timed out");
                        e.key()
                    }
                };
                let Ok(bytes) = <[u8; 32]>::try_from(key.as_ref()) else { return };
                let hash = Hash::from(bytes);
                // Successes count the peers that answered the search for the closest ones (an
                // `ADD_PROVIDER` counts once sent): none means the record went nowhere.
                if (result.is_err() || stats.num_successes() == 0) && self.provided.contains(&hash) {
                    if started_at.is_some_and(|g| g != self.table_generation) {
                        self.enqueue_provide(hash);
                    } else {
                        debug!(blob = %hash.short(), "announcement reached no DHT peer; again once one answers");
                        self.unannounced.insert(hash);
                    }
                } else {
                    self.unannounced.remove(&hash);
                }
            }
            QueryResult::Bootstrap(Ok(ok)) if ok.num_remaining == 0 => {
                debug!(peers = self.swarm.connected_peers().count(), "bootstrap finished");
            }
            QueryResult::Bootstrap(Ok(_)) if !self.refresh_buckets => {
                // Kademlia goes on to the next bucket's lookup under the same query id; ending
                // each one before it sends a request keeps only the lookup of our own id.
                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    q.finish();
                }
            }
            _ => {}
        }
    }
}
