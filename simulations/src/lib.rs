//! Scale experiments: many real Shoal nodes in one process over an emulated network.
