//! The emulated network: libp2p's in-memory transport with per-link latency, per-node uplink and
//! downlink caps, regions and partitions.
//!
//! Every connection is a [`MemoryTransport`] channel wrapped in a [`Link`]. A write is cut into
//! frames of at most [`MAX_FRAME`] bytes; each frame waits for the writer's uplink, carries the
//! instant it reaches the peer (`left uplink + one-way latency`), and at the reader waits for that
//! instant and then for the reader's downlink. The caps are token buckets of depth zero: bytes
//! leave at the cap and never in a burst, so no transfer can beat the fluid bound.
//!
//! A link's schedule is kept in the instants its bytes were ready, not in the instants its tasks
//! happened to run: a frame takes the downlink from its arrival on, and a writer held back by its
//! uplink sends its next frame from the instant the uplink was free. Tasks wake late (tokio's
//! timers tick in milliseconds, and a busy emulator runs them later still); a schedule that
//! restarted from the wake-up lost that lateness from every frame, and the links moved a fraction
//! of their caps, less the busier the emulator was.
//!
//! Yamux runs on top of the link, as it would over TCP. Peers authenticate with libp2p's plaintext
//! handshake (they exchange and check public keys) instead of noise: encryption would protect
//! nothing inside one process, and at a thousand nodes its key exchanges were a fifth of the CPU.
//! The dialer names the handshake and the multiplexer with its first bytes instead of waiting a
//! round trip for each to be agreed, so a new connection is ready in one round trip, as a QUIC
//! one is; with a round trip per agreement it took three.
//!
//! Nodes can go down ([`Network::set_down`]): their links are reset and dials to them fail, as
//! when a process crashes; they come back up with [`Network::set_up`].
//!
//! The dialer sends its [`NodeId`] as the first bytes of a connection (a preamble no real network
//! has) so the listener knows the link's latency and regions.
//!
//! Wall time is emulated time multiplied by `time_scale`: latency is stretched and bandwidth
//! divided by the same factor. The nodes stretch their timers by it, libp2p's that can be set
//! included (`NodeConfig::time_scale`); Kademlia's wait for each peer of a lookup cannot be set,
//! and a scenario whose time scale would stretch a request past it is refused
//! ([`crate::scenario::KAD_PEER_TIMEOUT`]).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use shoal_node::libp2p::core::muxing::StreamMuxerBox;
use shoal_node::libp2p::core::transport::memory::Channel;
use shoal_node::libp2p::core::transport::{
    Boxed, DialOpts, ListenerId, MemoryTransport, TransportError, TransportEvent, upgrade::Version,
};
use shoal_node::libp2p::identity::Keypair;
use shoal_node::libp2p::multiaddr::Protocol;
use shoal_node::libp2p::{Multiaddr, PeerId, Transport, plaintext, yamux};

/// The largest frame a link sends at once: the unit of pacing.
pub const MAX_FRAME: usize = 16 * 1024;

/// Frames up to this size (control messages) keep their read buffer between frames.
const SMALL_FRAME: usize = 1024;

/// Frame header: arrival instant (nanoseconds since the network's epoch, `u64` LE), length (`u32` LE).
const HEADER: usize = 12;

/// First bytes of every connection, before the dialer's node id.
const PREAMBLE_MAGIC: [u8; 4] = *b"SHNS";

/// A node on the emulated network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// What is wrong with a network description.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The latency matrix is not regions × regions.
    #[error("the latency matrix must be {regions} × {regions}, one row and column per region")]
    LatencyMatrix {
        /// How many regions there are.
        regions: usize,
    },
    /// No regions.
    #[error("a network needs at least one region")]
    NoRegions,
    /// The time scale is not a positive number.
    #[error("time_scale must be positive, not {0}")]
    TimeScale(f64),
    /// A region index past the list.
    #[error("there is no region {0}")]
    NoSuchRegion(usize),
}

/// A network's shape: regions, one-way latency between them, and the time scale.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Region names.
    pub regions: Vec<String>,
    /// One-way latency from region `i` (row) to region `j` (column), in emulated time.
    pub latency: Vec<Vec<Duration>>,
    /// Wall time per unit of emulated time (1.0 runs in real time; 2.0 runs twice as slow).
    pub time_scale: f64,
}

/// A node's link caps, in emulated bytes per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkCaps {
    /// What the node can send per second.
    pub uplink: Option<u64>,
    /// What the node can receive per second.
    pub downlink: Option<u64>,
}

/// A token bucket of depth zero: each reservation of `n` bytes ends `n / rate` after the previous
/// one ended (or after now, if the link was idle).
#[derive(Debug)]
struct Bucket {
    /// Wall-clock bytes per second; `None` is unlimited.
    rate: Option<f64>,
    next_free: Mutex<Instant>,
}

impl Bucket {
    fn new(rate: Option<f64>) -> Self {
        Self { rate, next_free: Mutex::new(Instant::now()) }
    }

    /// Reserves `n` bytes that are ready to pass from `ready` on; returns the instant the last of
    /// them has passed. `ready` may lie in the past (a frame that arrived while its reader's task
    /// waited to run): the bytes then take the link from `ready` on, or from when it was free.
    fn reserve(&self, n: usize, ready: Instant) -> Instant {
        let Some(rate) = self.rate else { return ready };
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let end = (*next).max(ready) + Duration::from_secs_f64(n as f64 / rate);
        *next = end;
        end
    }

    /// Forgets what was booked: the bytes a crashed node had queued went with it.
    fn clear(&self) {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        *next = (*next).min(Instant::now());
    }
}

#[derive(Debug)]
struct NodeSlot {
    region: usize,
    uplink: Bucket,
    downlink: Bucket,
    /// Bytes this node sent (framing excluded; the handshake and yamux included).
    sent: AtomicU64,
    /// Bytes delivered to this node.
    received: AtomicU64,
    /// Whether the node is down (crashed, or left): its links are reset.
    down: AtomicBool,
    /// How many times it went down: a link made before is reset even once the node is back up
    /// (its frames were the crashed process's).
    incarnation: AtomicU64,
    /// When each of its incarnations ended (it went down), in nanoseconds from the network's
    /// epoch, in order: the frames an incarnation sent that reach their receiver by then are
    /// delivered. One entry per crash or leave.
    went_down: Mutex<Vec<u64>>,
}

/// The emulated network every simulated node's transport belongs to.
pub struct Network {
    epoch: Instant,
    time_scale: f64,
    regions: Vec<String>,
    /// One-way wall-clock latency in nanoseconds, `regions × regions`, row-major.
    latency_ns: Vec<AtomicU64>,
    /// Whether traffic between two regions is cut, `regions × regions`, symmetric.
    partitioned: Vec<AtomicBool>,
    /// Bytes delivered from region `i` to region `j`, `regions × regions`, row-major.
    region_bytes: Vec<AtomicU64>,
    nodes: RwLock<Vec<Arc<NodeSlot>>>,
    ports: RwLock<HashMap<u64, NodeId>>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network").field("regions", &self.regions).field("time_scale", &self.time_scale).finish()
    }
}

impl Network {
    /// A network with the given shape and no nodes.
    pub fn new(config: NetworkConfig) -> Result<Arc<Self>, NetError> {
        let r = config.regions.len();
        if r == 0 {
            return Err(NetError::NoRegions);
        }
        if config.latency.len() != r || config.latency.iter().any(|row| row.len() != r) {
            return Err(NetError::LatencyMatrix { regions: r });
        }
        if !(config.time_scale.is_finite() && config.time_scale > 0.0) {
            return Err(NetError::TimeScale(config.time_scale));
        }
        let latency_ns = config
            .latency
            .iter()
            .flatten()
            .map(|d| AtomicU64::new((d.as_nanos() as f64 * config.time_scale) as u64))
            .collect();
        Ok(Arc::new(Self {
            epoch: Instant::now(),
            time_scale: config.time_scale,
            regions: config.regions,
            latency_ns,
            partitioned: (0..r * r).map(|_| AtomicBool::new(false)).collect(),
            region_bytes: (0..r * r).map(|_| AtomicU64::new(0)).collect(),
            nodes: RwLock::new(Vec::new()),
            ports: RwLock::new(HashMap::new()),
        }))
    }

    /// The region names.
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// Wall time per unit of emulated time.
    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// Adds a node in `region` with the given caps.
    pub fn add_node(&self, region: usize, caps: LinkCaps) -> Result<NodeId, NetError> {
        if region >= self.regions.len() {
            return Err(NetError::NoSuchRegion(region));
        }
        let wall = |rate: Option<u64>| rate.map(|r| r as f64 / self.time_scale);
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let id = NodeId(nodes.len() as u32);
        nodes.push(Arc::new(NodeSlot {
            region,
            uplink: Bucket::new(wall(caps.uplink)),
            downlink: Bucket::new(wall(caps.downlink)),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            down: AtomicBool::new(false),
            incarnation: AtomicU64::new(0),
            went_down: Mutex::new(Vec::new()),
        }));
        Ok(id)
    }

    fn slot(&self, node: NodeId) -> Option<Arc<NodeSlot>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(node.0 as usize).cloned()
    }

    /// The region of `node`.
    pub fn region_of(&self, node: NodeId) -> Option<usize> {
        self.slot(node).map(|s| s.region)
    }

    /// Bytes `node` has sent and received so far (the handshake and yamux included).
    pub fn traffic(&self, node: NodeId) -> (u64, u64) {
        self.slot(node).map_or((0, 0), |s| (s.sent.load(Ordering::Relaxed), s.received.load(Ordering::Relaxed)))
    }

    /// Bytes delivered so far from region `from` to region `to`.
    pub fn region_traffic(&self, from: usize, to: usize) -> u64 {
        let r = self.regions.len();
        if from < r && to < r { self.region_bytes[from * r + to].load(Ordering::Relaxed) } else { 0 }
    }

    /// Takes `node` off the network, as a crash would: its links are reset at their next frame
    /// and nobody can dial it until [`Network::set_up`].
    pub fn set_down(&self, node: NodeId) {
        if let Some(s) = self.slot(node) {
            s.went_down.lock().unwrap_or_else(|e| e.into_inner()).push(self.epoch.elapsed().as_nanos() as u64);
            s.incarnation.fetch_add(1, Ordering::Relaxed);
            s.down.store(true, Ordering::Relaxed);
        }
    }

    /// Puts `node` back on the network, its links' queues empty: what the node before a crash
    /// had queued on them went with it (each frame is dropped as it arrives, its incarnation
    /// gone), and kept booked, it held the new process's first frames back.
    pub fn set_up(&self, node: NodeId) {
        if let Some(s) = self.slot(node) {
            s.uplink.clear();
            s.downlink.clear();
            s.down.store(false, Ordering::Relaxed);
        }
    }

    /// When the last byte `node` has booked on its uplink so far reaches the farthest region:
    /// a node that stops cleanly is taken off the network only then, so that the answers it
    /// finished sending arrive (taken off at once, they were dropped in flight, and a clean
    /// leave cost its peers what a crash does).
    pub fn drained_at(&self, node: NodeId) -> Instant {
        let Some(s) = self.slot(node) else { return Instant::now() };
        let queued = (*s.uplink.next_free.lock().unwrap_or_else(|e| e.into_inner())).max(Instant::now());
        let farthest = (0..self.regions.len()).map(|b| self.latency(s.region, b)).max().unwrap_or_default();
        queued + farthest
    }

    fn is_down(&self, node: NodeId) -> bool {
        self.slot(node).is_none_or(|s| s.down.load(Ordering::Relaxed))
    }

    /// Bytes all nodes have sent so far.
    pub fn total_sent(&self) -> u64 {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).iter().map(|s| s.sent.load(Ordering::Relaxed)).sum()
    }

    /// Cuts traffic between regions `a` and `b` (both ways; `a == b` cuts a region from itself):
    /// dials fail and open connections between them are reset.
    pub fn partition(&self, a: usize, b: usize) {
        self.set_partitioned(a, b, true);
    }

    /// Undoes [`Network::partition`].
    pub fn repair(&self, a: usize, b: usize) {
        self.set_partitioned(a, b, false);
    }

    fn set_partitioned(&self, a: usize, b: usize, cut: bool) {
        let r = self.regions.len();
        if a < r && b < r {
            self.partitioned[a * r + b].store(cut, Ordering::Relaxed);
            self.partitioned[b * r + a].store(cut, Ordering::Relaxed);
        }
    }

    fn is_partitioned(&self, a: usize, b: usize) -> bool {
        self.partitioned[a * self.regions.len() + b].load(Ordering::Relaxed)
    }

    /// Sets the one-way latency from region `a` to region `b` (emulated time), for new frames.
    pub fn set_link_latency(&self, a: usize, b: usize, latency: Duration) {
        let r = self.regions.len();
        if a < r && b < r {
            let ns = (latency.as_nanos() as f64 * self.time_scale) as u64;
            self.latency_ns[a * r + b].store(ns, Ordering::Relaxed);
        }
    }

    fn latency(&self, a: usize, b: usize) -> Duration {
        Duration::from_nanos(self.latency_ns[a * self.regions.len() + b].load(Ordering::Relaxed))
    }

    fn node_at_port(&self, port: u64) -> Option<NodeId> {
        self.ports.read().unwrap_or_else(|e| e.into_inner()).get(&port).copied()
    }

    /// The transport of `node`: the emulated link, then the plaintext handshake and yamux. Call it
    /// from the node's [`shoal_node::TransportFactory`].
    pub fn transport(self: &Arc<Self>, node: NodeId, key: &Keypair) -> Boxed<(PeerId, StreamMuxerBox)> {
        EmulatedTransport { net: self.clone(), me: node, inner: MemoryTransport::default(), listeners: HashMap::new() }
            .upgrade(Version::V1Lazy)
            .authenticate(plaintext::Config::new(key))
            .multiplex(yamux::Config::default())
            .boxed()
    }
}

fn memory_port(addr: &Multiaddr) -> Option<u64> {
    match addr.iter().next() {
        Some(Protocol::Memory(port)) => Some(port),
        _ => None,
    }
}

fn unreachable(what: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, what.to_string())
}

/// One node's view of the network: a libp2p transport.
struct EmulatedTransport {
    net: Arc<Network>,
    me: NodeId,
    inner: MemoryTransport,
    /// Listen ports registered with the network, per listener.
    listeners: HashMap<ListenerId, Vec<u64>>,
}

impl EmulatedTransport {
    fn unregister(&mut self, id: ListenerId, port: Option<u64>) {
        let mut ports = self.net.ports.write().unwrap_or_else(|e| e.into_inner());
        let mine = self.listeners.entry(id).or_default();
        mine.retain(|p| {
            let drop = port.is_none_or(|q| q == *p);
            if drop {
                ports.remove(p);
            }
            !drop
        });
    }
}

/// The dialer's end of a new connection from `me` to `peer`, once the preamble that names `me` is
/// sent. A listener that accepted the connection and closed it at once (a node at its connection
/// cap refuses before the handshake) may break the pipe under the preamble: the connection is
/// handed on all the same, and the dialer learns of the refusal in the handshake, from a peer
/// that answered, as it would over a real network. Failing the dial there instead told the
/// dialer nobody was listening, and a publisher stopped relying on a peer it had served.
async fn introduce(net: Arc<Network>, me: NodeId, peer: NodeId, mut channel: Channel<Vec<u8>>) -> io::Result<Link> {
    let mut preamble = [0u8; 8];
    preamble[..4].copy_from_slice(&PREAMBLE_MAGIC);
    preamble[4..].copy_from_slice(&me.0.to_le_bytes());
    if channel.write_all(&preamble).await.is_err() {
        // The listener's end is gone. A node taken off the network meanwhile (or cut off by a
        // partition) is unreachable, as a dial to it would have found; a node that closed the
        // connection is there. (A node that leaves stops its swarm before it goes down, so a
        // dial in that window still counts as refused.)
        let regions = (net.region_of(me), net.region_of(peer));
        let cut = match regions {
            (Some(a), Some(b)) => net.is_partitioned(a, b),
            _ => true,
        };
        if cut || net.is_down(me) || net.is_down(peer) {
            return Err(unreachable(format!("{peer} went away while dialled")));
        }
    }
    Link::new(net, me, peer, channel)
}

impl Transport for EmulatedTransport {
    type Output = Link;
    type Error = io::Error;
    type ListenerUpgrade = BoxFuture<'static, io::Result<Link>>;
    type Dial = BoxFuture<'static, io::Result<Link>>;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<io::Error>> {
        self.inner.listen_on(id, addr).map_err(|e| e.map(unreachable))
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.unregister(id, None);
        self.listeners.remove(&id);
        self.inner.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<io::Error>> {
        let Some(port) = memory_port(&addr) else { return Err(TransportError::MultiaddrNotSupported(addr)) };
        let net = self.net.clone();
        let me = self.me;
        let Some(peer) = net.node_at_port(port) else {
            return Err(TransportError::Other(unreachable(format!("nobody listens on {addr}"))));
        };
        let (Some(a), Some(b)) = (net.region_of(me), net.region_of(peer)) else {
            return Err(TransportError::Other(unreachable("unknown node")));
        };
        if net.is_partitioned(a, b) {
            return Err(TransportError::Other(unreachable(format!("{me} and {peer} are partitioned"))));
        }
        if net.is_down(me) || net.is_down(peer) {
            return Err(TransportError::Other(unreachable(format!("{peer} is down"))));
        }
        let dial = self.inner.dial(addr, opts).map_err(|e| e.map(unreachable))?;
        Ok(async move { introduce(net, me, peer, dial.await.map_err(unreachable)?).await }.boxed())
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TransportEvent<Self::ListenerUpgrade, io::Error>> {
        let event = ready!(Pin::new(&mut self.inner).poll(cx));
        let this = &mut *self;
        match &event {
            TransportEvent::NewAddress { listener_id, listen_addr } => {
                if let Some(port) = memory_port(listen_addr) {
                    this.net.ports.write().unwrap_or_else(|e| e.into_inner()).insert(port, this.me);
                    this.listeners.entry(*listener_id).or_default().push(port);
                }
            }
            TransportEvent::AddressExpired { listener_id, listen_addr } => {
                this.unregister(*listener_id, memory_port(listen_addr));
            }
            TransportEvent::ListenerClosed { listener_id, .. } => this.unregister(*listener_id, None),
            _ => {}
        }
        let net = this.net.clone();
        let me = this.me;
        Poll::Ready(
            event
                .map_upgrade(move |upgrade| {
                    async move {
                        let mut channel = upgrade.await.map_err(unreachable)?;
                        let mut preamble = [0u8; 8];
                        channel.read_exact(&mut preamble).await?;
                        if preamble[..4] != PREAMBLE_MAGIC {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an emulated-network dialer"));
                        }
                        let peer = NodeId(u32::from_le_bytes([preamble[4], preamble[5], preamble[6], preamble[7]]));
                        Link::new(net, me, peer, channel)
                    }
                    .boxed()
                })
                .map_err(unreachable),
        )
    }
}

enum ReadState {
    Header {
        filled: usize,
    },
    Payload {
        filled: usize,
    },
    /// Waiting for the frame's arrival instant.
    InFlight {
        arrives: Instant,
    },
    /// Waiting for our downlink, which has passed the frame at `done`.
    Downlink {
        done: Instant,
    },
    Deliver {
        pos: usize,
    },
}

/// One connection's byte stream between two nodes on the emulated network.
pub struct Link {
    net: Arc<Network>,
    me: Arc<NodeSlot>,
    peer: NodeId,
    peer_slot: Arc<NodeSlot>,
    /// One-way latency from us to the peer, and whether our regions can talk, are read per frame.
    regions: (usize, usize),
    /// Our node's incarnation and the peer's when the link was made.
    incarnations: (u64, u64),
    io: Channel<Vec<u8>>,
    // Write side.
    /// A frame accepted from the caller but not yet handed to the channel.
    pending: Option<Vec<u8>>,
    write_gate: Pin<Box<tokio::time::Sleep>>,
    /// Until when the caller may not send (its last frame is still leaving our uplink), and
    /// whether it tried to: if it did, its next frame was ready when the gate opened.
    write_gated: Option<(Instant, bool)>,
    // Read side.
    state: ReadState,
    header: [u8; HEADER],
    payload: Vec<u8>,
    read_gate: Pin<Box<tokio::time::Sleep>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link").field("peer", &self.peer).field("regions", &self.regions).finish_non_exhaustive()
    }
}

impl Link {
    fn new(net: Arc<Network>, me: NodeId, peer: NodeId, io: Channel<Vec<u8>>) -> io::Result<Self> {
        let (Some(slot), Some(peer_slot)) = (net.slot(me), net.slot(peer)) else {
            return Err(unreachable(format!("unknown node {peer}")));
        };
        let peer_region = peer_slot.region;
        let now = tokio::time::Instant::now();
        let incarnations = (slot.incarnation.load(Ordering::Relaxed), peer_slot.incarnation.load(Ordering::Relaxed));
        Ok(Self {
            regions: (slot.region, peer_region),
            incarnations,
            me: slot,
            net,
            peer,
            peer_slot,
            io,
            pending: None,
            write_gate: Box::pin(tokio::time::sleep_until(now)),
            write_gated: None,
            state: ReadState::Header { filled: 0 },
            header: [0; HEADER],
            payload: Vec::new(),
            read_gate: Box::pin(tokio::time::sleep_until(now)),
        })
    }

    /// Whether the link still carries a frame: to write one (`arrives` none), or to deliver one
    /// due at `arrives`. A frame the peer sent that reaches us by the time it went down is
    /// delivered, however late our reader gets to it (a busy downlink, a late task): what was
    /// on the wire arrives, as on a real one. So a node that leaves cleanly, going down once
    /// its uplink's frames have arrived ([`Network::drained_at`]), delivers all it sent.
    fn check_partition(&self, arrives: Option<Instant>) -> io::Result<()> {
        if self.net.is_partitioned(self.regions.0, self.regions.1) {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "partitioned"));
        }
        let me_gone =
            self.me.down.load(Ordering::Relaxed) || self.me.incarnation.load(Ordering::Relaxed) != self.incarnations.0;
        let peer_gone = self.peer_slot.down.load(Ordering::Relaxed)
            || self.peer_slot.incarnation.load(Ordering::Relaxed) != self.incarnations.1;
        // By when the link's own incarnation of the peer went down, not any later one's.
        let on_the_wire = |at: Instant| {
            let ends = self.peer_slot.went_down.lock().unwrap_or_else(|e| e.into_inner());
            usize::try_from(self.incarnations.1)
                .ok()
                .and_then(|i| ends.get(i))
                .is_some_and(|&end| at <= self.net.epoch + Duration::from_nanos(end))
        };
        if me_gone || (peer_gone && !arrives.is_some_and(on_the_wire)) {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "node down"));
        }
        Ok(())
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(frame) = &self.pending {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, frame))?;
            debug_assert_eq!(n, frame.len());
            self.pending = None;
        }
        Poll::Ready(Ok(()))
    }
}

fn gate(sleep: &mut Pin<Box<tokio::time::Sleep>>, until: Instant) {
    sleep.as_mut().reset(tokio::time::Instant::from_std(until));
}

impl AsyncWrite for Link {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.check_partition(None)?;
        ready!(this.poll_pending(cx))?;
        let mut now = Instant::now();
        let mut ready_at = now;
        if let Some((until, held)) = this.write_gated {
            if now < until {
                if this.write_gate.as_mut().poll(cx).is_pending() {
                    this.write_gated = Some((until, true));
                    return Poll::Pending;
                }
                now = Instant::now();
            }
            if held {
                ready_at = until.min(now);
            }
            this.write_gated = None;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_FRAME);
        let left = this.me.uplink.reserve(n, ready_at);
        let arrives = left + this.net.latency(this.regions.0, this.regions.1);
        let at = arrives.saturating_duration_since(this.net.epoch).as_nanos() as u64;
        let mut frame = Vec::with_capacity(HEADER + n);
        frame.extend_from_slice(&at.to_le_bytes());
        frame.extend_from_slice(&(n as u32).to_le_bytes());
        frame.extend_from_slice(&buf[..n]);
        this.pending = Some(frame);
        this.me.sent.fetch_add(n as u64, Ordering::Relaxed);
        if left > now {
            // The caller may not send more until these bytes have left our uplink.
            gate(&mut this.write_gate, left);
            this.write_gated = Some((left, false));
        }
        // The frame is ours now; if the channel is full it goes out on the next poll.
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_close(cx)
    }
}

impl AsyncRead for Link {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.state {
                ReadState::Header { filled } => {
                    let n = ready!(Pin::new(&mut this.io).poll_read(cx, &mut this.header[filled..]))?;
                    if n == 0 {
                        if filled == 0 {
                            return Poll::Ready(Ok(0));
                        }
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    if filled + n < HEADER {
                        this.state = ReadState::Header { filled: filled + n };
                        continue;
                    }
                    let len = u32::from_le_bytes([this.header[8], this.header[9], this.header[10], this.header[11]]);
                    if len as usize > MAX_FRAME {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "oversized frame")));
                    }
                    this.payload.clear();
                    this.payload.resize(len as usize, 0);
                    this.state = ReadState::Payload { filled: 0 };
                }
                ReadState::Payload { filled } => {
                    if filled < this.payload.len() {
                        let n = ready!(Pin::new(&mut this.io).poll_read(cx, &mut this.payload[filled..]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        this.state = ReadState::Payload { filled: filled + n };
                        continue;
                    }
                    let mut at = [0u8; 8];
                    at.copy_from_slice(&this.header[..8]);
                    let arrives = this.net.epoch + Duration::from_nanos(u64::from_le_bytes(at));
                    gate(&mut this.read_gate, arrives);
                    this.state = ReadState::InFlight { arrives };
                }
                ReadState::InFlight { arrives } => {
                    if Instant::now() < arrives {
                        ready!(this.read_gate.as_mut().poll(cx));
                    }
                    this.check_partition(Some(arrives))?;
                    // Counted between regions as it gets past the check: counted once through the
                    // downlink, a frame let through just before a cut was counted during it.
                    let r = this.net.regions.len();
                    this.net.region_bytes[this.regions.1 * r + this.regions.0]
                        .fetch_add(this.payload.len() as u64, Ordering::Relaxed);
                    // From its arrival on, however late this task runs.
                    let done = this.me.downlink.reserve(this.payload.len(), arrives);
                    gate(&mut this.read_gate, done);
                    this.state = ReadState::Downlink { done };
                }
                ReadState::Downlink { done } => {
                    if Instant::now() < done {
                        ready!(this.read_gate.as_mut().poll(cx));
                    }
                    this.me.received.fetch_add(this.payload.len() as u64, Ordering::Relaxed);
                    this.state = ReadState::Deliver { pos: 0 };
                }
                ReadState::Deliver { pos } => {
                    let n = buf.len().min(this.payload.len() - pos);
                    buf[..n].copy_from_slice(&this.payload[pos..pos + n]);
                    this.state = if pos + n == this.payload.len() {
                        // A link between frames holds no buffer: most of a node's links are idle
                        // at any time, and each kept the largest frame it had carried (100 MB of
                        // a 1,000-node crowd's peak).
                        if this.payload.capacity() > SMALL_FRAME {
                            this.payload = Vec::new();
                        }
                        ReadState::Header { filled: 0 }
                    } else {
                        ReadState::Deliver { pos: pos + n }
                    };
                    if n > 0 || buf.is_empty() {
                        return Poll::Ready(Ok(n));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(latency_ms: u64, time_scale: f64) -> Arc<Network> {
        Network::new(NetworkConfig {
            regions: vec!["a".into(), "b".into()],
            latency: vec![
                vec![Duration::from_millis(1), Duration::from_millis(latency_ms)],
                vec![Duration::from_millis(latency_ms), Duration::from_millis(1)],
            ],
            time_scale,
        })
        .expect("network")
    }

    #[test]
    fn bucket_paces_without_burst() {
        let b = Bucket::new(Some(1000.0));
        let now = Instant::now();
        let first = b.reserve(500, now);
        let second = b.reserve(500, now);
        assert_eq!(first - now, Duration::from_millis(500));
        assert_eq!(second - now, Duration::from_secs(1));
        assert_eq!(Bucket::new(None).reserve(1 << 30, now), now);
    }

    #[test]
    fn bytes_ready_in_the_past_keep_their_place() {
        let b = Bucket::new(Some(1000.0));
        let ready = Instant::now();
        // The link has been idle since before the bytes were ready, and it is later now.
        *b.next_free.lock().expect("bucket") = ready.checked_sub(Duration::from_secs(1)).unwrap_or(ready);
        std::thread::sleep(Duration::from_millis(20));
        // They pass from when they were ready, not from now.
        assert_eq!(b.reserve(500, ready), ready + Duration::from_millis(500));
        // Ready as early, but the link was busy with those until then.
        assert_eq!(b.reserve(500, ready), ready + Duration::from_secs(1));
    }

    /// A reader that comes late finds the frames that arrived meanwhile already through its
    /// downlink: the link's schedule does not restart from when the reader's task ran.
    #[tokio::test]
    async fn a_late_reader_loses_no_downlink_time() {
        let net = net(50, 1.0);
        let caps = LinkCaps { uplink: Some(1 << 20), downlink: Some(4 << 20) };
        let (mut out, mut inc, _, b) = linked(&net, caps).await;
        let data = vec![7u8; 64 << 10];
        out.write_all(&data).await.expect("write");
        out.flush().await.expect("flush");
        let written = Instant::now();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut got = vec![0u8; data.len()];
        inc.read_exact(&mut got).await.expect("read");
        assert_eq!(got, data);
        // Every frame was reserved on the uplink by the time the write returned, so the last one
        // left within one frame's time (16 KiB at 1 MiB/s) of it, arrived 50 ms later and passed
        // the downlink in 4 ms more. Had the downlink started when the reader ran, 600 ms later,
        // it would be busy until past then.
        let slot = net.slot(b).expect("node b");
        let downlink_free = *slot.downlink.next_free.lock().expect("bucket");
        let bound = Duration::from_millis(16 + 50 + 4 + 1);
        assert!(
            downlink_free <= written + bound,
            "downlink busy until {:?} after the write",
            downlink_free.saturating_duration_since(written)
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        let bad = NetworkConfig { regions: vec!["a".into()], latency: vec![], time_scale: 1.0 };
        assert!(matches!(Network::new(bad), Err(NetError::LatencyMatrix { regions: 1 })));
        let bad = NetworkConfig { regions: vec![], latency: vec![], time_scale: 1.0 };
        assert!(matches!(Network::new(bad), Err(NetError::NoRegions)));
    }

    /// Two nodes with `caps`, in regions 0 and 1, and a link from the first to the second: the
    /// dialer's end, the listener's end, and their ids.
    async fn linked(net: &Arc<Network>, caps: LinkCaps) -> (Link, Link, NodeId, NodeId) {
        let a = net.add_node(0, caps).expect("a");
        let b = net.add_node(1, caps).expect("b");
        let (out, inc) = link(net, a, b).await;
        (out, inc, a, b)
    }

    /// A link from `a` to `b`: what `a` writes, and what `b` reads.
    async fn link(net: &Arc<Network>, a: NodeId, b: NodeId) -> (Link, Link) {
        let mut listener =
            EmulatedTransport { net: net.clone(), me: b, inner: MemoryTransport::default(), listeners: HashMap::new() };
        let mut dialer =
            EmulatedTransport { net: net.clone(), me: a, inner: MemoryTransport::default(), listeners: HashMap::new() };
        let (out, inc) = connect(&mut listener, &mut dialer).await;
        assert_eq!(inc.peer, a);
        (out, inc)
    }

    /// A node at its connection cap closes an accepted connection before reading a byte. Its
    /// dialer must learn that from the handshake, as from a peer that answered (see
    /// `shoal_node`'s dial-failure handling), not from the dial, as from a peer that is gone.
    #[tokio::test]
    async fn a_connection_closed_at_once_fails_in_the_handshake_not_the_dial() {
        let net = net(5, 1.0);
        let caps = LinkCaps { uplink: None, downlink: None };
        let (a, b) = (net.add_node(0, caps).expect("a"), net.add_node(1, caps).expect("b"));
        let mut link =
            introduce(net.clone(), a, b, closed_at_once().await).await.expect("a connection to handshake on");
        let mut byte = [0u8; 1];
        let read = link.read(&mut byte).await;
        assert!(matches!(read, Ok(0)), "read from a closed connection: {read:?}");
        // Closed because it went down, the peer is unreachable, as a new dial to it would find.
        let channel = closed_at_once().await;
        net.set_down(b);
        let refused = introduce(net, a, b, channel).await;
        assert!(matches!(&refused, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused), "{:?}", refused.err());
    }

    /// The dialer's end of a raw connection whose listener accepted it and dropped its end.
    async fn closed_at_once() -> Channel<Vec<u8>> {
        let (channel, accepted) = connect(&mut MemoryTransport::default(), &mut MemoryTransport::default()).await;
        drop(accepted);
        channel
    }

    /// `dialer` dials `listener` on a new memory port: the dialer's end and the listener's.
    async fn connect<L, D>(listener: &mut L, dialer: &mut D) -> (D::Output, L::Output)
    where
        L: Transport + Unpin,
        L::Error: fmt::Debug,
        D: Transport,
        D::Error: fmt::Debug,
    {
        listener.listen_on(ListenerId::next(), "/memory/0".parse().expect("addr")).expect("listen");
        let addr = match futures::future::poll_fn(|cx| Pin::new(&mut *listener).poll(cx)).await {
            TransportEvent::NewAddress { listen_addr, .. } => listen_addr,
            _ => panic!("expected an address"),
        };
        let opts = DialOpts {
            role: shoal_node::libp2p::core::Endpoint::Dialer,
            port_use: shoal_node::libp2p::core::transport::PortUse::New,
        };
        let dial = dialer.dial(addr, opts).expect("dial");
        let accept = async {
            match futures::future::poll_fn(|cx| Pin::new(&mut *listener).poll(cx)).await {
                TransportEvent::Incoming { upgrade, .. } => upgrade.await.expect("accepted"),
                _ => panic!("expected a connection"),
            }
        };
        let (out, inc) = futures::join!(dial, accept);
        (out.expect("dialled"), inc)
    }

    /// A raw link (no handshake, no yamux): bytes arrive intact, after the latency, at the cap.
    #[tokio::test]
    async fn a_link_delays_and_paces() {
        let net = net(50, 1.0);
        let caps = LinkCaps { uplink: Some(1 << 20), downlink: Some(4 << 20) };
        let (mut out, mut inc, a, b) = linked(&net, caps).await;

        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let send = async {
            out.write_all(&data).await.expect("write");
            out.flush().await.expect("flush");
        };
        let recv = async {
            let mut got = vec![0u8; data.len()];
            inc.read_exact(&mut got).await.expect("read");
            got
        };
        let ((), got) = futures::join!(send, recv);
        let took = start.elapsed();
        assert_eq!(got, data);
        // 1 MiB at 1 MiB/s, plus 50 ms.
        assert!(took >= Duration::from_millis(1040), "took {took:?}");
        // Not a measurement: only that it is paced, not stalled (a loaded machine runs late).
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert_eq!(net.traffic(a).0, 1 << 20);
        assert_eq!(net.traffic(b).1, 1 << 20);

        assert_eq!(net.region_traffic(0, 1), 1 << 20);
        assert_eq!(net.region_traffic(1, 0), 0);

        net.partition(0, 1);
        assert!(out.write_all(b"x").await.is_err());
        net.repair(0, 1);
        net.set_down(b);
        assert!(out.write_all(b"x").await.is_err(), "a link to a node that went down is reset");
        assert!(net.is_down(b));
        net.set_up(b);
        assert!(!net.is_down(b));
        // Back up, it is another process: a link the crashed one had stays reset, and a new one
        // carries bytes.
        assert!(out.write_all(b"x").await.is_err(), "a link made before the crash came back");
        let (mut out, mut inc) = link(&net, a, b).await;
        let mut got = [0u8; 1];
        let (sent, read) = futures::join!(out.write_all(b"y"), inc.read_exact(&mut got));
        sent.expect("write");
        read.expect("read");
        assert_eq!(&got, b"y");
    }
}
