//! How a node is configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;

/// The UDP port a node listens on for QUIC unless told otherwise.
pub const DEFAULT_QUIC_PORT: u16 = 4737;

/// The TCP port of the local HTTP API unless told otherwise.
pub const DEFAULT_API_PORT: u16 = 4738;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the identity, the store and the API address live.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on. The default is QUIC on all IPv4 interfaces, UDP port 4737.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the DHT through (each ending in `/p2p/<peer id>`). The default is none.
    pub bootstrap: Vec<Multiaddr>,
    /// The most bytes of other people's content the node caches. The default is 10 GiB.
    pub cache_bytes: u64,
    /// Where the local HTTP API listens; `None` runs no API. The default is 127.0.0.1:4738.
    pub api: Option<SocketAddr>,
    /// Where the read-only HTTP gateway (`GET|HEAD /{hash}`) listens, if anywhere; it may be
    /// public. The default is none.
    pub gateway: Option<SocketAddr>,
    /// Concurrent uploads served by the whole node; past it peers get `Busy`. The default is 64.
    pub max_uploads: usize,
    /// Concurrent uploads served to one peer. The default is 8.
    pub max_uploads_per_peer: usize,
    /// Node-wide upload cap in bytes per second (everything served to peers). The default is none.
    pub upload_rate: Option<u64>,
    /// Node-wide download cap in bytes per second (everything fetched from peers). The default is none.
    pub download_rate: Option<u64>,
    /// If set, only these peers may fetch from this node (a private swarm); others get `Denied`.
    /// The default is everyone.
    pub allow_peers: Option<Vec<libp2p::PeerId>>,
    /// Established connections, in and out. The default is 256.
    pub max_connections: u32,
    /// Addresses to announce as reachable. Kademlia serves others only once a node has a
    /// confirmed external address; on a LAN or loopback the listen addresses are announced.
    /// The default is to announce the listen addresses.
    pub external: Vec<Multiaddr>,
    /// How long a provider lookup may run before `get` gives up. The default is 30 s.
    pub lookup_timeout: Duration,
    /// Whether the store fsyncs before marking pieces verified. The default is `true`.
    pub durable: bool,
}

impl NodeConfig {
    /// The defaults for a node whose data lives in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec![
                format!("/ip4/0.0.0.0/udp/{DEFAULT_QUIC_PORT}/quic-v1").parse().unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            cache_bytes: 10 << 30,
            api: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT))),
            gateway: None,
            max_uploads: 64,
            max_uploads_per_peer: 8,
            upload_rate: None,
            download_rate: None,
            allow_peers: None,
            max_connections: 256,
            external: Vec::new(),
            lookup_timeout: Duration::from_secs(30),
            durable: true,
        }
    }

    /// The default data directory: `shoal` under the user's data directory
    /// (`~/.local/share/shoal` on Linux), or `./shoal-data` if there is none.
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir().map(|d| d.join("shoal")).unwrap_or_else(|| PathBuf::from("shoal-data"))
    }
}
