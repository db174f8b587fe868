//! Scale experiments: many real Shoal nodes in one process over an emulated network.
//!
//! # Layout
//! - [`hops`]: lookup hops, replayed over the live routing tables.
//! - [`net`]: the emulated network, a libp2p transport with latency, caps and partitions.
//! - [`scenario`]: scenario files (TOML).
//! - [`run`]: starts the nodes, runs an experiment, writes the results; the flash crowd and lookup
//!   scaling live there, [`zipf`], [`churn`] and [`regions`] beside it.
//! - [`plot`]: charts in PNG and SVG.
//! - [`validate`]: one small flash crowd in the emulator and as real processes, side by side.
//! - `shards`: the threads the nodes run on, one runtime per core.
//! - [`cleanup`]: the stores and processes an interrupted run leaves, removed and stopped.

pub mod churn;
pub mod cleanup;
pub mod hops;
pub mod net;
pub mod plot;
pub mod regions;
pub mod run;
pub mod scenario;
pub mod schedule;
mod shards;
pub mod validate;
pub mod zipf;

pub use net::{LinkCaps, Network, NetworkConfig, NodeId};
pub use scenario::Scenario;

/// A CSV cell for optional seconds: four decimals, or empty.
pub(crate) fn csv_secs(v: Option<f64>) -> String {
    v.map(|t| format!("{t:.4}")).unwrap_or_default()
}

/// The value of the unlabelled metric `name` in Prometheus text, as a node's `/metrics` serves it.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
