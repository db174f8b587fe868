//! Shoal's piece store: every byte on disk is its business; it knows nothing of the network.
//!
//! # Layout
//! - [`store`]: the [`Store`] — imports, verified piece writes from the network, verified reads
//!   with proofs, crash-safe metadata, pinning and eviction.
//! - `lru`: the byte-bounded eviction order over unpinned blobs.
//! - `hot`: the in-memory tier of recently served pieces.

mod hot;
mod lru;
pub mod store;

pub use store::{
    Begun, BlobInfo, BlobReader, Imported, PieceStream, Store, StoreConfig, StoreError, StoreStats, Stored, Written,
};
