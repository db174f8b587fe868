//! Shoal's protocol: how content is named and verified, what peers say to each other, and the
//! decisions of a fetch. No I/O, no clock, no unseeded randomness: callers pass readers, writers,
//! `now` and seeds, so the node, the simulator and the tests run the same logic.
//!
//! # Layout
//! - [`collection`]: a directory as a blob of `(path, hash, size)` entries.
//! - [`id`]: [`Hash`], the BLAKE3 content id, printed as `b3sum` prints it.
//! - [`piece`]: piece geometry ([`Geometry`], [`PIECE_SIZE`]), [`PieceSet`] and its wire form,
//!   [`PieceRuns`].
//! - [`verify`]: outboards and verified piece encoding and decoding, on `bao-tree`.
//! - [`wire`]: the `/shoal/transfer/2` messages, framing and bounds.
//! - [`fetch`]: the decisions of a multi-source fetch ([`fetch::Fetch`]): which piece from which
//!   peer, retries, end-game and penalties, as a state machine driven by `handle_*` and `poll_*`.

pub mod collection;
pub mod fetch;
pub mod id;
pub mod piece;
pub mod verify;
pub mod wire;

pub use id::{Hash, ParseHashError};
pub use piece::{Geometry, PIECE_SIZE, PieceIndex, PieceRuns, PieceSet};
