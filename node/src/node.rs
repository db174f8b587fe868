//! [`Node`]: a running Shoal node, and [`NodeHandle`], the cloneable way to command it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use libp2p::{Multiaddr, PeerId};
use shoal_cache::{BlobInfo, Imported, Store, StoreConfig, StoreError, StoreStats};
use shoal_protocol::Hash;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{DEFAULT_QUIC_PORT, NodeConfig};
use crate::fetch::{self, FetchError, FetchProgress};
use crate::swarm::{self, Command, DhtInfo, DhtSnapshot, EventLoop, LookupStats, PeerInfo, TransportFactory};
use crate::transfer::{self, Uploads};

/// What went wrong in a node operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fetch failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Stopped,
    /// The request itself is wrong (a path, a collection); the message says how.
    #[error("{0}")]
    Invalid(String),
    /// The node runs as many of these as it takes; the message says which. Try again later.
    #[error("{0}; try again later")]
    Busy(&'static str),
}

/// What [`NodeHandle::publish`] imported, and what of a directory it left out.
#[derive(Debug, Clone)]
pub struct Published {
    /// The file's blob, or the collection's that lists a directory's files.
    pub imported: Imported,
    /// A directory's entries that its collection does not list (symbolic links, pipes, sockets,
    /// devices, directories that hold nothing, the node's own data directory, and files gone,
    /// swapped or written by the time they were read), `/`-separated and relative to it, a
    /// directory's ending in `/`; none for a file. The first [`MAX_SKIPPED_NAMED`] of them.
    pub skipped: Vec<String>,
    /// How many entries were skipped in all.
    pub skipped_count: usize,
}

/// The most skipped entries an add names (a tree of millions of symbolic links would otherwise
/// make a list as large).
pub const MAX_SKIPPED_NAMED: usize = 1_000;

/// A node's state, as `shoal status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Our peer id.
    pub peer_id: String,
    /// Our listen addresses, with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// The addresses peers are told to dial us at, with `/p2p/<peer id>`: the listen addresses
    /// worth announcing and the public ones the router forwards to us (UPnP), or those given
    /// with `--external`.
    pub announced_addrs: Vec<String>,
    /// Connected peers.
    pub peers: usize,
    /// The DHT as seen from here.
    pub dht: DhtInfo,
    /// Blobs held.
    pub blobs: usize,
    /// Bytes of cached (unpinned) blobs, and the bound.
    pub cache_bytes: u64,
    /// The cache bound.
    pub cache_capacity: u64,
    /// Bytes of pinned blobs.
    pub pinned_bytes: u64,
    /// Uploads in progress.
    pub uploads: usize,
    /// Watches held: peers waiting to hear of the pieces this node stores next.
    pub watches: usize,
    /// Blobs evicted since start.
    pub evictions: u64,
    /// Peers that misbehaved or failed us, with how often (worst first, at most 32).
    pub penalties: Vec<(String, u32)>,
    /// Peers no fetch asks now, for having sent bytes or proofs that failed verification: each with how
    /// often it did, and for how many more seconds it is avoided (longest first, at most 32).
    pub avoided: Vec<(String, u32, u64)>,
    /// What the LAN's router does for us.
    pub router: RouterMapping,
    /// Connections peers opened to us since the start: none on a node nobody can reach.
    pub inbound_connections: u64,
}

/// What the LAN's router does for the node (see [`crate::portmap`]), as `shoal status` shows
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouterMapping {
    /// The public address the router forwards to our IPv4 port.
    pub forwarded: Option<String>,
    /// How the forward was asked for: `PCP`, `NAT-PMP` or `UPnP`.
    pub forwarded_by: Option<String>,
    /// Our IPv6 addresses and port where the router's firewall lets peers reach them (PCP).
    pub pinholes: Vec<String>,
}

/// A blob the node holds, as `shoal ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldBlob {
    /// Its hash.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// The bytes held, verified: all of them once `complete`.
    pub held_bytes: u64,
    /// Whether every piece is held.
    pub complete: bool,
    /// Pinned (added here, or pinned by the user): never evicted. Unpinned blobs are the cache.
    pub pinned: bool,
}

impl From<BlobInfo> for HeldBlob {
    fn from(b: BlobInfo) -> Self {
        // Whole pieces, less what the last one lacks if it is held.
        let held_bytes = shoal_protocol::piece::Geometry::new(b.size)
            .map(|g| {
                let last = g.last_piece();
                let short = if b.pieces.contains(last) { shoal_protocol::PIECE_SIZE - g.piece_len(last) } else { 0 };
                (u64::from(b.pieces.count()) * shoal_protocol::PIECE_SIZE).saturating_sub(short)
            })
            .unwrap_or_default();
        HeldBlob { hash: b.hash.to_string(), size: b.size, held_bytes, complete: b.is_complete(), pinned: b.pinned }
    }
}

/// A running node. Dropping it stops its swarm, and its API and gateway from accepting, without draining
/// uploads or flushing the store (which recovers on the next start, as after a crash); call
/// [`Node::shutdown`] to stop it cleanly.
#[derive(Debug)]
pub struct Node {
    handle: NodeHandle,
    swarm_task: JoinHandle<()>,
    stop_swarm: oneshot::Sender<()>,
    /// The API's and the gateway's accept loops: a node dropped without [`Node::shutdown`]
    /// accepts no more connections for a swarm that stopped (one already open is answered until
    /// it closes, each request that needs the swarm failing).
    api_task: Option<Aborted>,
    gateway_task: Option<Aborted>,
    /// The task keeping a forward of our port on the LAN's router (see [`crate::portmap`]), and
    /// what stops it: dropped, it removes the forward and ends.
    forwarding: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// A task aborted when this is dropped: a node's servers, a fetch's requests and lookup.
#[derive(Debug)]
pub(crate) struct Aborted(pub(crate) tokio::task::AbortHandle);

impl Drop for Aborted {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A cloneable handle to a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    pub(crate) inner: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) peer_id: PeerId,
    pub(crate) store: Store,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) control: crate::streams::Control,
    pub(crate) uploads: Arc<Uploads>,
    pub(crate) config: NodeConfig,
    /// Fetches in progress, so concurrent requests for one blob share one fetch.
    pub(crate) fetches: Mutex<HashMap<Hash, crate::fetch::Followed>>,
    /// Where the readers of blobs being fetched are (gateway responses): their next pieces are
    /// fetched first.
    pub(crate) readers: crate::fetch::Readers,
    /// What the node holds against its peers: offences counted, liars avoided.
    pub(crate) standing: Arc<crate::standing::Standing>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) download_rate: Option<Arc<crate::limits::RateLimit>>,
    /// When each peer last moved content with us, so the connection trimming spares it.
    pub(crate) activity: Arc<crate::connmgr::PeerActivity>,
    /// Who else holds the blobs we move (peer exchange, spreading a crowd's load).
    pub(crate) crowds: Arc<crate::crowd::Crowds>,
    /// Collections the gateway decoded lately, kept decoded.
    pub(crate) collections: Arc<crate::gateway::Collections>,
    /// What the LAN's router does for us, as the port-mapping task last found.
    pub(crate) router: Arc<Mutex<RouterMapping>>,
    /// Provider lookups asked for through [`NodeHandle::lookup`] (the API's), at most
    /// [`MAX_LOOKUPS`] at once.
    pub(crate) lookups: tokio::sync::Semaphore,
    /// Adds under way.
    pub(crate) adds: Adds,
}

/// The adds under way, and whether the node is stopping. A stopping node fails them before
/// their next file or within the MiB they are reading ([`Store::import_file_unless`]), and
/// waits (as it waits for its uploads) for them to undo their pins while its store is open to
/// write that down: undone in a closed store, the pins came back at the next start, so an add
/// its user was told failed left its files pinned.
#[derive(Default)]
pub(crate) struct Adds {
    running: std::sync::atomic::AtomicUsize,
    stopping: std::sync::atomic::AtomicBool,
}

impl Adds {
    /// An add begins, unless the node is stopping; it runs until the guard returned is dropped.
    fn begin(&self) -> Result<AddRunning<'_>, NodeError> {
        use std::sync::atomic::Ordering;
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = AddRunning(self);
        match self.stopping.load(Ordering::SeqCst) {
            true => Err(NodeError::Stopped),
            false => Ok(running),
        }
    }

    /// Tells the adds under way to stop, and refuses those after.
    fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the adds under way are to stop.
    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many adds are under way.
    fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An add under way ([`Adds::begin`]).
struct AddRunning<'a>(&'a Adds);

impl Drop for AddRunning<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The most provider lookups a node's users (its API) run at once; its fetches' own are apart.
pub(crate) const MAX_LOOKUPS: usize = 64;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node over QUIC.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Self> {
        Self::start_with_transport(config, None).await
    }

    /// Starts a node over the transport `transport` builds from the node's identity (the
    /// simulator's emulated network), or over QUIC if `None`.
    pub async fn start_with_transport(config: NodeConfig, transport: Option<TransportFactory>) -> anyhow::Result<Self> {
        create_data_dir(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", config.data_dir.display()))?;
        let key = crate::identity::load_or_create(&config.data_dir.join("identity"))?;
        let peer_id = key.public().to_peer_id();
        // The nonce a PCP router ties our port mapping to: the same after a restart, so that a
        // node that crashed renews its own mapping rather than being refused it.
        let nonce = {
            let secret = key.to_protobuf_encoding().map_err(|e| anyhow::anyhow!("cannot read the node's key: {e}"))?;
            let derived = blake3::derive_key("shoal 2026-12-06 PCP mapping nonce", &secret);
            <[u8; 12]>::try_from(&derived[..12]).expect("12 of 32 bytes")
        };
        let store_config = StoreConfig {
            cache_bytes: config.cache_bytes,
            hot_bytes: config.hot_bytes,
            durable: config.durable,
            open_blobs: open_blobs(),
            ..Default::default()
        };
        let store_dir = config.data_dir.join("store");
        let store = tokio::task::spawn_blocking(move || Store::open(store_dir, store_config)).await??;

        let metrics = Arc::new(crate::metrics::Metrics::new());
        let (mut swarm, control, incoming) = swarm::build_swarm(key, &config, transport, &metrics)?;
        // The default listens on IPv6 too, where the machine has it; an address asked for is
        // listened on or the start fails.
        let default = config.listen == NodeConfig::default_listen(DEFAULT_QUIC_PORT)
            || config.listen == NodeConfig::default_listen(0);
        let optional =
            |addr: &Multiaddr| default && matches!(addr.iter().next(), Some(libp2p::multiaddr::Protocol::Ip6(_)));
        let mut listeners = Vec::new();
        for addr in &config.listen {
            if optional(addr) && !has_ipv6() {
                info!(%addr, "this machine has no IPv6: listening on IPv4 alone");
                continue;
            }
            // The transport's error names nothing itself, and its causes repeat one another: the
            // innermost one says what went wrong (e.g. the port in use).
            let listener = swarm.listen_on(addr.clone()).map_err(|e| {
                let mut root: &dyn std::error::Error = &e;
                while let Some(next) = root.source() {
                    root = next;
                }
                anyhow::anyhow!("cannot listen on {addr}: {root}; pick another address with --listen")
            })?;
            listeners.push(listener);
        }
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let (commands, command_rx) = mpsc::channel(1024);
        let activity = Arc::new(crate::connmgr::PeerActivity::new(config.stretch(crate::connmgr::RECENT)));
        let standing = Arc::new(crate::standing::Standing::default());
        let crowds = Arc::new(crate::crowd::Crowds::new(config.spread_patience, config.time_scale, standing.clone()));
        let mut event_loop = EventLoop::new(
            swarm,
            command_rx,
            &config,
            metrics.clone(),
            activity.clone(),
            crowds.clone(),
            store.clone(),
        );
        event_loop.expect_listeners(listeners);
        for addr in &config.bootstrap {
            event_loop.add_bootstrap(addr)?;
        }
        let (stop_swarm, stop_rx) = oneshot::channel();
        let swarm_task = tokio::spawn(event_loop.run(stop_rx));
        // Only where there may be a router to ask: not on loopback, a public IPv4 address or
        // netsim's memory addresses, not with an operator's own `--external` address, and not
        // for a node of one command.
        let router = Arc::new(Mutex::new(RouterMapping::default()));
        let forwarding = (config.upnp
            && !config.transient
            && config.external.is_empty()
            && crate::addrs::may_be_behind_router(&config.listen))
        .then(|| {
            let (stop, stopped) = oneshot::channel();
            (stop, tokio::spawn(crate::portmap::run(commands.clone(), stopped, nonce, router.clone())))
        });

        let uploads = Arc::new(Uploads::new(
            config.max_uploads,
            config.max_uploads_per_peer,
            config.upload_rate,
            config.allow_peers.clone(),
            transfer::Timing::new(config.time_scale),
        ));
        let download_rate = crate::limits::RateLimit::new(config.download_rate).map(Arc::new);
        tokio::spawn(transfer::serve(
            incoming,
            transfer::Server {
                store: store.clone(),
                uploads: uploads.clone(),
                crowds: crowds.clone(),
                metrics: metrics.clone(),
                activity: activity.clone(),
            },
        ));

        let handle = NodeHandle {
            inner: Arc::new(Shared {
                peer_id,
                store: store.clone(),
                commands,
                control,
                uploads,
                config: config.clone(),
                fetches: Mutex::new(HashMap::new()),
                readers: crate::fetch::Readers::default(),
                standing,
                metrics,
                download_rate,
                activity,
                crowds,
                collections: Default::default(),
                router,
                lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
                adds: Adds::default(),
            }),
        };
        // Announce what we already hold.
        for info in store.list() {
            if !info.pieces.is_empty() {
                handle.provide(info.hash).await;
            }
        }
        let api_task = match config.api {
            Some(addr) => Some(Aborted(crate::api::spawn(handle.clone(), addr).await?.abort_handle())),
            None => None,
        };
        let gateway_task = match config.gateway {
            Some(addr) => Some(Aborted(crate::api::spawn_gateway(handle.clone(), addr).await?.abort_handle())),
            None => None,
        };
        info!(peer_id = %peer_id, "node started");
        Ok(Self { handle, swarm_task, stop_swarm, api_task, gateway_task, forwarding })
    }

    /// A handle to command the node.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the node: new requests are refused and those being answered get up to 10 s
    /// (stretched by the time scale) to finish, as do adds under way, told to fail before their
    /// next file or within the MiB they are reading and undo their pins ([`Adds`]); then the API
    /// and the swarm stop and the store is flushed. A stream whose request has not arrived is
    /// not waited for: at the end of a 300-node netsim crowd, such streams (a few per node) held
    /// stopping nodes for up to 4.5 emulated seconds each, waiting for requests that never came.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let uploads = self.handle.inner.uploads.clone();
        uploads.close();
        let adds = &self.handle.inner.adds;
        adds.stop();
        let deadline =
            tokio::time::Instant::now() + self.handle.inner.config.stretch(std::time::Duration::from_secs(10));
        while (uploads.answering() > 0 || adds.running() > 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop((self.api_task, self.gateway_task));
        if let Some((stop, task)) = self.forwarding {
            // The router's forward is removed (it would lapse within the hour), briefly.
            let _ = stop.send(());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
        }
        let _ = self.stop_swarm.send(());
        let _ = self.swarm_task.await;
        let store = self.handle.inner.store.clone();
        let flushed = tokio::task::spawn_blocking(move || store.flush_all()).await;
        // Gone with the node, so that nothing finds an address nobody listens on; and the store
        // closed, whatever the flush said (what it could not flush is what a crash loses).
        for file in ["api", "gateway"] {
            let _ = std::fs::remove_file(self.handle.inner.config.data_dir.join(file));
        }
        self.handle.inner.store.close();
        flushed??;
        Ok(())
    }
}

impl Node {
    /// Stops the node at once, as a killed process stops: no draining, no flush. The store is
    /// left as a crash leaves it and recovers on the next start. For experiments that emulate
    /// crashes in one process; fetches running on this node fail.
    pub fn crash(self) {
        self.handle.inner.uploads.close();
        // An add under way stops before its next file or within the MiB it is reading (what it
        // pinned stays pinned, as a crash leaves it), rather than read on into a closed store.
        self.handle.inner.adds.stop();
        drop((self.api_task, self.gateway_task));
        if let Some((_, task)) = self.forwarding {
            task.abort();
        }
        self.swarm_task.abort();
        // A killed process's lock goes with it.
        self.handle.inner.store.close();
    }
}

impl NodeHandle {
    /// Our peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    pub(crate) async fn command(&self, c: Command) -> Result<(), NodeError> {
        self.inner.commands.send(c).await.map_err(|_| NodeError::Stopped)
    }

    /// Our listen addresses, each ending in `/p2p/<peer id>`. Empty until the listeners are up.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        Ok(self.listening().await?.0)
    }

    /// The addresses peers are told to dial us at, each ending in `/p2p/<peer id>`.
    pub async fn announced_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Announced(tx)).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Our listen addresses, and whether every listener has reported one.
    async fn listening(&self) -> Result<(Vec<Multiaddr>, bool), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Listening(tx)).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Waits until the node listens on at least one address and its addresses settled, and
    /// returns them. Settled: every listener reported an address and, if one listens on every
    /// interface (`0.0.0.0`, `::`), none came for 50 ms; or 1 s passed (a listener that never
    /// reports an address, as one on `::` did on a host with IPv6 turned off by sysctl, before
    /// the start skipped it there). A listener reports its interfaces' addresses one at a time:
    /// returning at the first address printed only some of them (seen: the loopback ones
    /// without the LAN one).
    pub async fn wait_listening(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let started = std::time::Instant::now();
        let mut before = Vec::new();
        loop {
            let (addrs, reported) = self.listening().await?;
            // A listener on a specific address has one, and reported it.
            let settled =
                reported && (addrs == before || !self.config().listen.iter().any(crate::addrs::is_unspecified));
            if !addrs.is_empty() && (settled || started.elapsed() >= std::time::Duration::from_secs(1)) {
                return Ok(addrs);
            }
            before = addrs;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// How full the node's serving queues are, each against its bound.
    pub fn load(&self) -> crate::transfer::Load {
        self.inner.uploads.load()
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Peers(tx)).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Imports a file, pins it and announces it. A directory becomes a collection: every regular
    /// file in it (recursively; symbolic links, pipes, sockets and devices are skipped) is
    /// imported, pinned and announced, and so is the collection blob that lists them, whose hash
    /// is returned. [`NodeHandle::publish`] also says what a directory's collection left out.
    pub async fn add_path(&self, path: &Path) -> Result<Imported, NodeError> {
        Ok(self.publish(path).await?.imported)
    }

    /// [`NodeHandle::add_path`], saying which entries of a directory were skipped. A path that is
    /// neither a regular file nor a directory (a pipe, a socket, a device) is refused before it
    /// is opened: opening a pipe waits for a writer, and reading a device may never end, which
    /// held the import's thread, and the node's exit, for ever. A symbolic link named here is
    /// followed: its user named it.
    pub async fn publish(&self, path: &Path) -> Result<Published, NodeError> {
        if within(path, &self.inner.config.data_dir) {
            return Err(NodeError::Invalid(format!(
                "{} is in the node's own data directory ({}), which holds its private key; shoal does not publish it",
                path.display(),
                self.inner.config.data_dir.display()
            )));
        }
        match std::fs::metadata(path).map(|m| m.file_type()) {
            Ok(kind) if kind.is_dir() => return self.add_dir(path).await,
            Ok(kind) if !kind.is_file() => {
                return Err(NodeError::Invalid(format!(
                    "{} is {}, not a regular file or directory; shoal adds files and directories",
                    path.display(),
                    special_kind(kind)
                )));
            }
            // One that cannot be read is the import's to report, as it reports the open.
            _ => {}
        }
        let handle = self.clone();
        let path = path.to_owned();
        // Counted as an add under way, so that a stopping node refuses it, or waits for it.
        let imported = tokio::task::spawn_blocking(move || {
            let adds = &handle.inner.adds;
            let _running = adds.begin()?;
            handle.inner.store.import_file_unless(&path, true, &|| adds.stopping()).map_err(import_error)
        })
        .await
        .map_err(|_| NodeError::Stopped)??;
        self.withdraw(&imported.evicted).await;
        self.provide(imported.hash).await;
        Ok(Published { imported, skipped: Vec::new(), skipped_count: 0 })
    }

    /// Pins a blob held here: it is never evicted.
    pub async fn pin(&self, hash: Hash) -> Result<(), NodeError> {
        let store = self.inner.store.clone();
        let evicted = tokio::task::spawn_blocking(move || store.pin(hash)).await.map_err(|_| NodeError::Stopped)??;
        self.withdraw(&evicted).await;
        Ok(())
    }

    /// Unpins a blob: it joins the cache and may be evicted (evictions are withdrawn). Returns
    /// the blobs the cache evicted to take it, the blob itself among them if it does not fit.
    pub async fn unpin(&self, hash: Hash) -> Result<Vec<Hash>, NodeError> {
        let store = self.inner.store.clone();
        let evicted =
            tokio::task::spawn_blocking(move || store.unpin(hash)).await.map_err(|_| NodeError::Stopped)??;
        self.withdraw(&evicted).await;
        Ok(evicted)
    }

    /// The blobs held here, pinned ones first, each group by hash.
    pub async fn blobs(&self) -> Result<Vec<HeldBlob>, NodeError> {
        let store = self.inner.store.clone();
        // Off the runtime: the store's lock is also held while it removes evicted blobs' files.
        tokio::task::spawn_blocking(move || {
            let mut held: Vec<HeldBlob> = store.list().into_iter().map(HeldBlob::from).collect();
            held.sort_by(|a, b| b.pinned.cmp(&a.pinned).then_with(|| a.hash.cmp(&b.hash)));
            held
        })
        .await
        .map_err(|_| NodeError::Stopped)
    }

    /// Removes a blob from the store and stops announcing it.
    pub async fn delete(&self, hash: Hash) -> Result<(), NodeError> {
        let inner = self.inner.clone();
        // Its paths, if it is a collection the gateway keeps decoded, are not answered either
        // (whether or not the store still held it); forgotten on the blocking thread, where a
        // large one's many allocations are freed, and after the store let go of it: a decode
        // begun before is not kept, and one begun after finds nothing to read.
        let deleted = move || {
            let deleted = inner.store.delete(hash);
            inner.collections.forget(hash);
            deleted
        };
        tokio::task::spawn_blocking(deleted).await.map_err(|_| NodeError::Stopped)??;
        self.withdraw(&[hash]).await;
        Ok(())
    }

    async fn add_dir(&self, dir: &Path) -> Result<Published, NodeError> {
        let dir = dir.to_owned();
        let data_dir = self.inner.config.data_dir.clone();
        let handle = self.clone();
        let added = tokio::task::spawn_blocking(move || {
            let adds = &handle.inner.adds;
            let _running = adds.begin().map_err(|e| (e, Vec::new()))?;
            let listing = list_dir(&dir, &data_dir).map_err(|e| (e, Vec::new()))?;
            import_listing(&handle.inner.store, listing, || adds.stopping())
        })
        .await
        .map_err(|_| NodeError::Stopped)?;
        let (imported, files, (skipped, skipped_count)) = match added {
            Ok(added) => added,
            Err((e, evicted)) => {
                self.withdraw(&evicted).await;
                return Err(e);
            }
        };
        self.withdraw(&imported.evicted).await;
        for h in files {
            self.provide(h).await;
        }
        self.provide(imported.hash).await;
        Ok(Published { imported, skipped, skipped_count })
    }

    pub(crate) async fn provide(&self, hash: Hash) {
        // Held whole now (imported, or found at start): the watches of it answer at once.
        self.inner.uploads.arrivals.stored(hash);
        self.provide_known(hash, 0).await;
    }

    /// Announces `hash`, held by a node that knows of `holders` other holders: a fetch in a crowd
    /// that already knows of many holders announces later (see `swarm::CROWDED`).
    pub(crate) async fn provide_known(&self, hash: Hash, holders: usize) {
        if self.inner.config.transient {
            return;
        }
        let _ = self.command(Command::Provide { hash, holders }).await;
    }

    pub(crate) async fn withdraw(&self, evicted: &[Hash]) {
        for h in evicted {
            let _ = self.command(Command::Unprovide(*h)).await;
        }
    }

    /// Finds providers of `hash` through the DHT, for at most the lookup timeout.
    pub async fn providers(&self, hash: Hash) -> Result<Vec<PeerId>, NodeError> {
        Ok(self.lookup(hash).await?.0)
    }

    /// Like [`NodeHandle::providers`], with what the lookup cost (`None` if it outlived the
    /// lookup timeout).
    pub async fn lookup(&self, hash: Hash) -> Result<(Vec<PeerId>, Option<LookupStats>), NodeError> {
        let _lookup = self
            .inner
            .lookups
            .try_acquire()
            .map_err(|_| NodeError::Busy("as many provider lookups as it takes are under way"))?;
        let (tx, mut rx) = mpsc::channel(64);
        let (stats_tx, stats_rx) = oneshot::channel();
        self.command(Command::FindProviders { hash, found: tx, stats: Some(stats_tx) }).await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + self.inner.config.lookup_wait();
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            out.push(p);
        }
        let stats = tokio::time::timeout_at(deadline, stats_rx).await.ok().and_then(Result::ok);
        Ok((out, stats))
    }

    /// Our routing table and whether we hold a provider record for `hash`: what an experiment
    /// needs to replay a lookup over the live DHT.
    pub async fn dht_snapshot(&self, hash: Hash) -> Result<DhtSnapshot, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::DhtSnapshot { hash, reply }).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Fetches `hash` from the swarm (or returns at once if held whole), verified piece by piece.
    /// `progress` follows the fetch. Concurrent calls for one blob share one fetch.
    pub async fn fetch(
        &self,
        hash: Hash,
        progress: Option<watch::Sender<FetchProgress>>,
    ) -> Result<BlobInfo, NodeError> {
        fetch::fetch(self, hash, progress).await
    }

    /// Records that `peer` misbehaved (see [`crate::standing`]).
    pub(crate) fn penalise(&self, peer: PeerId, offence: crate::standing::Offence) {
        self.inner.standing.penalise(peer, offence, std::time::Instant::now());
    }

    /// Whether fetches keep away from `peer`, for having sent bytes that failed verification.
    pub(crate) fn avoids(&self, peer: &PeerId) -> bool {
        self.inner.standing.avoids(peer, std::time::Instant::now())
    }

    /// The node's metrics in the Prometheus text format (what `GET /metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.encode()
    }

    /// How often `peer` misbehaved.
    pub fn penalty(&self, peer: &PeerId) -> u32 {
        self.inner.standing.offences(peer)
    }

    /// The node's view of the DHT: its routing table and announcements.
    pub async fn dht_info(&self) -> Result<DhtInfo, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::DhtInfo(tx)).await?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The node's state.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let addrs = self.listen_addrs().await?;
        let announced = self.announced_addrs().await?;
        let peers = self.peers().await?.len();
        let dht = self.dht_info().await?;
        let StoreStats { blobs, cache_bytes, cache_capacity, pinned_bytes, evictions, .. } = self.inner.store.stats();
        let (penalties, avoided) = self.inner.standing.report(std::time::Instant::now());
        Ok(Status {
            peer_id: self.inner.peer_id.to_string(),
            listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
            announced_addrs: announced.iter().map(|a| a.to_string()).collect(),
            peers,
            dht,
            blobs,
            cache_bytes,
            cache_capacity,
            pinned_bytes,
            uploads: self.inner.uploads.active(),
            watches: self.inner.uploads.watching(),
            evictions,
            penalties: penalties.into_iter().map(|(p, n)| (p.to_string(), n)).collect(),
            avoided: avoided.into_iter().map(|a| (a.peer.to_string(), a.lies, a.left.as_secs().max(1))).collect(),
            router: self.inner.router.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            inbound_connections: self.inner.metrics.connections("in", "opened"),
        })
    }
}

/// Creates the data directory for its owner alone (0700 on Unix), its missing parents as any
/// directory is made: the store's file names are the hashes held, and a user who could list them
/// would have what the token on `GET /v1/blobs` keeps from them. One that exists is left as it is.
fn create_data_dir(dir: &Path) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.is_dir()
    {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let mode = format!("{mode:o}");
                tracing::warn!(
                    dir = %dir.display(),
                    mode,
                    "the data directory is open to other users, who can list the hashes it holds; `chmod 700` it"
                );
            }
        }
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        // Made meanwhile by another process: left as it is, as above.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// How many blobs' files (two each) the store keeps open: a quarter of the process's limit on
/// open files, between 64 and 4,096 blobs. The rest of the limit is for sockets, the API's and
/// the gateway's clients and the answers being sent (each holds its blob's files). Where many
/// nodes share a process (netsim) each takes that much, which they do not come near.
fn open_blobs() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    (limit / 8).clamp(64, 4096) as usize
}

/// Whether this machine has IPv6: an address on loopback (`::1`), or a route out. Where IPv6 is
/// turned off (by sysctl, as in many containers) a socket on `::` can still be made, but a
/// listener there never reports an address, and the start waited its full second for one.
fn has_ipv6() -> bool {
    use std::net::{Ipv6Addr, UdpSocket};
    if UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        return true;
    }
    // Connecting a UDP socket only looks the route up; nothing is sent. 2001:db8::/32 is for
    // documentation, so any route to it is the default one.
    let doc = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).and_then(|s| s.connect((doc, DEFAULT_QUIC_PORT))).is_ok()
}

/// Whether `path` is `dir` or lies under it, symbolic links resolved. A path that cannot be
/// resolved (it does not exist) is not: opening it fails on its own.
fn within(path: &Path, dir: &Path) -> bool {
    match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
        (Ok(path), Ok(dir)) => path.starts_with(dir),
        _ => false,
    }
}

/// What [`list_dir`] found in a directory being added.
struct Listing {
    /// The directory added.
    root: std::path::PathBuf,
    /// The regular files found, `/`-separated and relative to `root`.
    files: Vec<String>,
    /// The first [`MAX_SKIPPED_NAMED`] entries skipped.
    skipped: Vec<String>,
    skipped_count: usize,
    /// What the collection's encoding would take, as the files were listed.
    encoded: usize,
}

impl Listing {
    fn skip(&mut self, shown: String) {
        if self.skipped.len() < MAX_SKIPPED_NAMED {
            self.skipped.push(shown);
        }
        self.skipped_count += 1;
    }
}

/// Lists the regular files under `dir` for a collection, and checks, before anything is
/// imported, that a collection can list them: their number, their paths and sizes, the size of
/// the listing. `data_dir` (the node's own, with its private key), if it lies under `dir`, is
/// skipped.
fn list_dir(dir: &Path, data_dir: &Path) -> Result<Listing, NodeError> {
    use std::os::unix::fs::MetadataExt;
    let exclude = std::fs::metadata(data_dir).ok().map(|m| (m.dev(), m.ino()));
    let mut listing =
        Listing { root: dir.to_owned(), files: Vec::new(), skipped: Vec::new(), skipped_count: 0, encoded: 0 };
    collect_files(dir, dir, exclude, &mut listing)?;
    Ok(listing)
}

/// Imports and pins the files `listing` names, then the collection that lists them. A listed
/// file found gone by then, or no longer a regular file inside the directory (swapped for a
/// symbolic link, say), or written while it was read, is left out and named among the skipped.
/// A failure unpins what this add pinned, unless another pin of it came since (the user's,
/// another add's: the store keeps the add's pins tentative until it ends, see
/// [`Store::import_opened_tentatively`]), and returns, with the error, the blobs evicted on the way.
/// Once `stopping` (the node is), the add fails before its next file, within the MiB it is
/// reading, or before its collection.
#[allow(clippy::type_complexity)]
fn import_listing(
    store: &Store,
    mut listing: Listing,
    stopping: impl Fn() -> bool + Sync,
) -> Result<(Imported, Vec<Hash>, (Vec<String>, usize)), (NodeError, Vec<Hash>)> {
    use shoal_protocol::collection::{Collection, Entry};
    static NEXT_ADD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let token = NEXT_ADD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let files = std::mem::take(&mut listing.files);
    let mut entries = Vec::with_capacity(files.len());
    let mut evicted = Vec::new();
    let mut imported_here = std::collections::HashSet::new();
    let imported = (|| {
        // Opened once: a directory renamed or replaced meanwhile is not read from.
        let root = rustix::fs::openat(
            rustix::fs::CWD,
            &listing.root,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| {
            NodeError::Invalid(format!("cannot read {}: {}", listing.root.display(), std::io::Error::from(e)))
        })?;
        for file in &files {
            // Asked here too: a file refused before it is read (gone, a link) never asks.
            if stopping() {
                return Err(NodeError::Stopped);
            }
            let imp = match import_listed(store, &root, &listing.root, file, token, &stopping) {
                Ok(imp) => imp,
                Err(ListedError::Changed) => {
                    listing.skip(file.clone());
                    continue;
                }
                Err(ListedError::Failed(e)) => return Err(e),
            };
            evicted.extend(imp.evicted);
            imported_here.insert(imp.hash);
            entries.push(Entry { path: file.clone(), hash: imp.hash, size: imp.size });
        }
        if entries.is_empty() && !files.is_empty() {
            return Err(NodeError::Invalid(format!(
                "{} holds no regular file to add (all were gone or changed by the time they were read)",
                listing.root.display()
            )));
        }
        let collection =
            Collection::new(std::mem::take(&mut entries)).map_err(|e| NodeError::Invalid(e.to_string()))?;
        if stopping() {
            return Err(NodeError::Stopped);
        }
        let imported = store.import_reader(&collection.encode()[..], true)?;
        Ok::<_, NodeError>((imported, collection))
    })();
    match imported {
        Ok((mut imported, collection)) => {
            for hash in imported_here {
                store.settle_tentative_pin(hash, token);
            }
            imported.evicted.append(&mut evicted);
            let files = collection.entries().iter().map(|e| e.hash).collect();
            // In path order, those the listing skipped and those left out as they were read.
            listing.skipped.sort();
            Ok((imported, files, (listing.skipped, listing.skipped_count)))
        }
        Err(e) => {
            for hash in imported_here {
                match store.undo_tentative_pin(hash, token) {
                    Ok(gone) => evicted.extend(gone),
                    Err(e) => tracing::warn!(blob = %hash, error = %e, "cannot unpin a file of an add that failed"),
                }
            }
            Err((e, evicted))
        }
    }
}

/// Why a listed file was not imported.
enum ListedError {
    /// Gone, no longer a regular file inside the directory, or written while read: left out.
    Changed,
    /// Anything else fails the add.
    Failed(NodeError),
}

/// Imports and pins the file `rel` under `root`, opened one path component at a time without
/// following a symbolic link: whatever was swapped in since the listing, what is read lies
/// inside the directory added. (A file saved meanwhile by renaming a new one over it is read as
/// it is now.)
fn import_listed(
    store: &Store,
    root: &rustix::fd::OwnedFd,
    root_path: &Path,
    rel: &str,
    token: u64,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Imported, ListedError> {
    use rustix::fs::{Mode, OFlags, openat};
    use rustix::io::Errno;
    let path = root_path.join(rel);
    let opened = (|| {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let (parents, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let mut dir = None;
        for part in parents.split('/').filter(|p| !p.is_empty()) {
            dir = Some(openat(dir.as_ref().unwrap_or(root), part, dir_flags, Mode::empty())?);
        }
        // Without waiting on a pipe put where the file was, nor taking a terminal for ours.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        openat(dir.as_ref().unwrap_or(root), name, flags, Mode::empty())
    })();
    let file = match opened {
        Ok(fd) => std::fs::File::from(fd),
        // Gone; a link (ELOOP) or a file (ENOTDIR) where the listing saw a file or directory; a
        // socket (ENXIO); a file another process holds a lease on (EAGAIN, as the file is
        // opened without waiting).
        Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR | Errno::NXIO | Errno::AGAIN) => {
            return Err(ListedError::Changed);
        }
        Err(e) => {
            let source = std::io::Error::from(e);
            return Err(ListedError::Failed(NodeError::Store(StoreError::Io { op: "open", path, source })));
        }
    };
    match store.import_opened_tentatively(&file, &path, token, stop) {
        Ok(imp) => Ok(imp),
        // What it is now is not what was listed: not a regular file, written as it was read,
        // grown past the largest blob.
        Err(StoreError::NotAFile { .. } | StoreError::ChangedDuringImport { .. } | StoreError::BlobTooLarge(_)) => {
            Err(ListedError::Changed)
        }
        Err(e) => Err(ListedError::Failed(import_error(e))),
    }
}

/// What an add's failed import tells its user: one the stopping node stopped, that it stopped.
fn import_error(e: StoreError) -> NodeError {
    match e {
        StoreError::ImportStopped { .. } => NodeError::Stopped,
        e => NodeError::Store(e),
    }
}

/// Lists the regular files under `dir` into `listing` (`/`-separated paths relative to `root`),
/// sorted. Symbolic links are skipped, so a collection never reaches outside its directory, and
/// so are pipes, sockets and devices, which hold no file's bytes, directories that hold
/// nothing, which a collection cannot list, and the directory `exclude` (device, inode) names:
/// each goes to `skipped`, as a path relative to `root` (a directory's ending in `/`), for the
/// user to be told. Fails, before anything is imported, on what a collection cannot list: a
/// path it refuses, a file larger than a blob, more than [`MAX_ENTRIES`] files, or a listing
/// past [`MAX_ENCODED`] (with what it holds then, about as much memory).
///
/// [`MAX_ENTRIES`]: shoal_protocol::collection::MAX_ENTRIES
/// [`MAX_ENCODED`]: shoal_protocol::collection::MAX_ENCODED
fn collect_files(root: &Path, dir: &Path, exclude: Option<(u64, u64)>, listing: &mut Listing) -> Result<(), NodeError> {
    use shoal_protocol::collection::{MAX_ENCODED, MAX_ENTRIES, MAX_HEADER, check_path, entry_encoded_len};
    use std::os::unix::fs::MetadataExt;
    let invalid = |e: std::io::Error| NodeError::Invalid(format!("cannot read {}: {e}", dir.display()));
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(invalid)?.collect::<Result<_, _>>().map_err(invalid)?;
    entries.sort_by_key(|e| e.file_name());
    // Only shown: a name that is not UTF-8 is shown as well as it can be.
    let shown =
        |path: &Path| path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
    for e in entries {
        // Of the entry itself, a symbolic link not followed.
        let meta = e.metadata().map_err(invalid)?;
        let kind = meta.file_type();
        let path = e.path();
        if kind.is_dir() && Some((meta.dev(), meta.ino())) == exclude {
            listing.skip(format!("{}/", shown(&path)));
        } else if kind.is_dir() {
            let before = (listing.files.len(), listing.skipped_count);
            collect_files(root, &path, exclude, listing)?;
            if (listing.files.len(), listing.skipped_count) == before {
                listing.skip(format!("{}/", shown(&path)));
            }
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).map_err(|_| NodeError::Invalid("path outside the directory".into()))?;
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| NodeError::Invalid(format!("{} is not valid UTF-8", path.display())))?
                .join("/");
            // Checked before anything is imported: a path the collection refuses would otherwise
            // fail the add after every file was imported and pinned.
            check_path(&rel).map_err(|e| NodeError::Invalid(e.to_string()))?;
            if meta.len() > shoal_protocol::piece::MAX_BLOB_SIZE {
                return Err(NodeError::Invalid(format!("{} is larger than a blob can be (2 TiB)", path.display())));
            }
            listing.encoded += entry_encoded_len(&rel, meta.len());
            listing.files.push(rel);
            if listing.files.len() > MAX_ENTRIES {
                return Err(NodeError::Invalid(format!("{} holds more than {MAX_ENTRIES} files", root.display())));
            }
            if listing.encoded + MAX_HEADER > MAX_ENCODED {
                return Err(NodeError::Invalid(format!(
                    "{} holds too many files, or names too long, for one collection: its listing would pass {} MiB",
                    root.display(),
                    MAX_ENCODED >> 20
                )));
            }
        } else {
            listing.skip(shown(&path));
        }
    }
    Ok(())
}

/// What a file that is neither a regular file nor a directory is, as a user would say it.
fn special_kind(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a named pipe";
        } else if kind.is_socket() {
            return "a socket";
        } else if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
    }
    let _ = kind;
    "a special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        Store::open(dir, StoreConfig { cache_bytes: 64 << 20, ..Default::default() }).expect("open store")
    }

    #[test]
    fn a_file_swapped_for_a_link_after_the_listing_is_left_out_and_never_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = store(&tmp.path().join("store"));
        let shared = tmp.path().join("shared");
        std::fs::create_dir_all(shared.join("sub")).expect("mkdir");
        std::fs::write(shared.join("a.txt"), b"first").expect("write");
        std::fs::write(shared.join("sub/b.txt"), b"second").expect("write");
        std::fs::write(shared.join("c.txt"), b"third").expect("write");
        std::fs::write(shared.join("d.txt"), b"fourth").expect("write");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("b.txt"), b"the node's private key").expect("write");
        std::fs::write(outside.join("secret"), b"the node's private key, too").expect("write");

        let listing = list_dir(&shared, &tmp.path().join("data")).expect("list");
        assert_eq!(listing.files.len(), 4);
        // Someone who can write in the directory swaps a file, and a directory, for links to
        // what lies outside it; and saves a file by renaming a new one over it.
        std::fs::remove_file(shared.join("c.txt")).expect("remove");
        std::os::unix::fs::symlink(outside.join("secret"), shared.join("c.txt")).expect("symlink");
        std::fs::remove_dir_all(shared.join("sub")).expect("remove");
        std::os::unix::fs::symlink(&outside, shared.join("sub")).expect("symlink");
        std::fs::write(shared.join("a.new"), b"first, saved again").expect("write");
        std::fs::rename(shared.join("a.new"), shared.join("a.txt")).expect("rename");
        // And a file swapped for a socket (which opens as ENXIO).
        std::fs::remove_file(shared.join("d.txt")).expect("remove");
        let _socket = std::os::unix::net::UnixListener::bind(shared.join("d.txt")).expect("socket");

        let (_, files, (skipped, count)) = import_listing(&store, listing, || false).expect("add");
        assert_eq!(files, [Hash::of(b"first, saved again")], "the file saved over is read as it is now");
        assert_eq!((skipped, count), (vec!["c.txt".to_string(), "d.txt".to_string(), "sub/b.txt".to_string()], 3));
        for secret in [&b"the node's private key"[..], b"the node's private key, too"] {
            assert!(store.info(Hash::of(secret)).is_none(), "a file outside the directory was read");
        }
    }

    #[test]
    fn a_failed_add_unpins_only_what_it_pinned_and_nothing_relied_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = store(&tmp.path().join("store"));
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        // Two copies of one file's bytes (the second finds them pinned, by this add), one pinned
        // before, and a large file last, which the add is still reading when the store closes.
        for (name, bytes) in [("a-copy.txt", &b"new"[..]), ("a.txt", b"new"), ("b.txt", b"pinned before")] {
            std::fs::write(shared.join(name), bytes).expect("write");
        }
        std::fs::write(shared.join("c.bin"), vec![7u8; 256 << 20]).expect("write");
        let before = store.import_file(&shared.join("b.txt"), true).expect("import").hash;
        let listing = list_dir(&shared, &tmp.path().join("data")).expect("list");
        let new = Hash::of(b"new");
        let added = std::thread::scope(|s| {
            let add = s.spawn(|| import_listing(&store, listing, || false));
            // A store that closes (its node stopping) fails every import after.
            while store.info(before).is_some_and(|_| store.info(new).is_none()) && !add.is_finished() {
                std::thread::yield_now();
            }
            store.close();
            add.join().expect("add")
        });
        let Err(_) = added else { panic!("the add went through a closed store") };
        assert!(!store.info(new).expect("held, as cache").pinned, "what the add pinned is unpinned");
        assert!(store.info(before).expect("held").pinned, "what was pinned before stays pinned");
    }

    #[tokio::test]
    async fn an_add_under_way_as_its_node_stops_fails_and_leaves_nothing_it_pinned_pinned() {
        use std::time::Duration;
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("node");
        let node = crate::lone_node(&data, Duration::from_secs(10)).await;
        let site = tmp.path().join("site");
        std::fs::create_dir(&site).expect("mkdir");
        std::fs::write(site.join("a.txt"), b"first").expect("write");
        // A large file last, which the add is still reading when the node stops.
        std::fs::write(site.join("z.bin"), vec![7u8; 256 << 20]).expect("write");
        let first = Hash::of(b"first");
        let handle = node.handle();
        let add = tokio::spawn(async move { handle.add_path(&site).await });
        let store = node.handle().store().clone();
        // The large file's copy begun in the store's tmp/.
        let staged = data.join("store/tmp");
        let reading = || {
            let copies = std::fs::read_dir(&staged).into_iter().flatten().flatten();
            copies.filter_map(|c| c.path().join("data").metadata().ok()).any(|m| m.len() > 0)
        };
        let began = async {
            while !(store.info(first).is_some() && reading()) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), began).await.expect("the add is reading its large file");
        assert!(store.info(first).expect("held").pinned && !add.is_finished(), "the add is under way");
        drop(store);
        node.shutdown().await.expect("shutdown");
        let added = add.await.expect("add");
        assert!(matches!(added, Err(NodeError::Stopped)), "{added:?}");
        // Opened again, as the node's next start opens it: the pins the add made are undone.
        let store = Store::open(data.join("store"), StoreConfig::default()).expect("open again");
        assert!(store.info(first).is_none_or(|i| !i.pinned), "{:?}", store.info(first));
        assert!(store.list().iter().all(|b| !b.pinned), "{:?}", store.list());
    }

    #[test]
    fn an_add_told_to_stop_stops_within_the_file_it_reads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = store(&tmp.path().join("store"));
        let site = tmp.path().join("site");
        std::fs::create_dir(&site).expect("mkdir");
        std::fs::write(site.join("a.txt"), b"first").expect("write");
        let large = vec![7u8; 16 << 20];
        std::fs::write(site.join("z.bin"), &large).expect("write");
        let first = Hash::of(b"first");
        let listing = list_dir(&site, &tmp.path().join("data")).expect("list");
        // Told to stop once the first file is held, at the third look after: the look before the
        // large file, then one before each MiB it reads.
        let looks = AtomicUsize::new(0);
        let stopping = || store.info(first).is_some() && looks.fetch_add(1, Ordering::SeqCst) >= 2;
        let added = import_listing(&store, listing, stopping);
        assert!(matches!(added, Err((NodeError::Stopped, _))), "{:?}", added.map(|a| a.0));
        assert_eq!(looks.load(Ordering::SeqCst), 3, "the add read on after it was told to stop");
        assert!(!store.info(first).expect("held, as cache").pinned, "what the add pinned is unpinned");
        assert!(store.info(Hash::of(&large)).is_none(), "the large file was read whole and kept");
        let staged: Vec<_> = std::fs::read_dir(tmp.path().join("store/tmp")).expect("tmp").collect();
        assert!(staged.is_empty(), "the stopped copy was left in tmp/: {staged:?}");
    }

    #[test]
    fn the_node_data_directory_is_never_listed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let home = tmp.path().join("home");
        let data = home.join(".local/share/shoal");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("identity"), b"private key").expect("write");
        std::fs::write(home.join("notes.txt"), b"notes").expect("write");
        let listing = list_dir(&home, &data).expect("list");
        assert_eq!(listing.files, ["notes.txt"]);
        assert_eq!(listing.skipped, [".local/share/shoal/"]);
        assert!(within(&data.join("identity"), &data) && within(&data, &data));
        assert!(!within(&home.join("notes.txt"), &data));
    }
}
