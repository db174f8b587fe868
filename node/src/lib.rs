//! A Shoal node: the one program every peer runs.
//!
//! The node owns the libp2p swarm (Kademlia discovery, the `/shoal/transfer/1` protocol over QUIC),
//! the piece store from `shoal-cache`, and the local HTTP API that the `shoal` command talks to.

pub use shoal_cache as cache;
pub use shoal_protocol as protocol;
