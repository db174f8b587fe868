//! A Shoal node: the one program every peer runs.
//!
//! # Layout
//! - [`config`]: [`NodeConfig`] and its defaults.
//! - `identity`: the persistent ed25519 key.
//! - `addrs`: which addresses we announce, and which of a peer's we dial.
//! - `swarm`: the libp2p swarm (Kademlia, identify, ping, streams) and the task that owns it.
//! - `linger`: QUIC streams kept until a one-way message is delivered.
//! - `transfer`: `/shoal/transfer/2`, serving and requesting pieces.
//! - `fetch`: drives `shoal_protocol::fetch` with real peers.
//! - `crowd`: who else holds a blob (peer exchange) and spreading a crowd's load.
//! - `standing`: what the node holds against peers that failed it; liars are avoided.
//! - [`api`]: the local HTTP API the `shoal` command talks to.
//! - `gateway`: blobs over HTTP (`Range`, `ETag`, streaming while fetching).
//! - [`node`]: [`Node`] and its cloneable [`NodeHandle`].

mod addrs;
pub mod api;
pub mod config;
mod connmgr;
mod crowd;
mod fetch;
mod gateway;
mod http;
mod identity;
mod limits;
mod linger;
mod metrics;
pub mod node;
mod pcp;
mod portmap;
mod slots;
mod standing;
mod streams;
mod swarm;
mod transfer;

pub use config::NodeConfig;
pub use fetch::{FetchError, FetchProgress};
pub use libp2p;
pub use node::{HeldBlob, Node, NodeError, NodeHandle, Status};
pub use shoal_cache as cache;
pub use shoal_protocol as protocol;
pub use swarm::{DhtInfo, DhtSnapshot, LookupStats, PeerInfo, TransportFactory};
pub use transfer::Load;

/// Takes one from `key`'s count in `counts`, removing the key at zero: a map of counts holds only
/// what it is counting now.
pub(crate) fn count_down<K: Eq + std::hash::Hash>(counts: &mut std::collections::HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// A node alone on loopback for a unit test, its data in `dir`: no API, no syncs, and a fetch
/// that finds no provider gives up after `lookup_timeout`.
#[cfg(test)]
pub(crate) async fn lone_node(dir: &std::path::Path, lookup_timeout: std::time::Duration) -> Node {
    let mut config = NodeConfig::new(dir.to_owned());
    config.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")];
    config.api = None;
    config.durable = false;
    config.lookup_timeout = lookup_timeout;
    Node::start(config).await.expect("node")
}
