//! Scale experiments: many real Shoal nodes in one process over an emulated network.
//!
//! # Layout
//! - [`net`]: the emulated network, a libp2p transport with latency, caps and partitions.
//! - [`scenario`]: scenario files (TOML).
//! - [`run`]: starts the nodes, runs an experiment, writes the results.

pub mod net;
pub mod run;
pub mod scenario;

pub use net::{LinkCaps, Network, NetworkConfig, NodeId};
pub use scenario::Scenario;
