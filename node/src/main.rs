//! The `shoal` command.

use clap::Parser;

/// Shoal: a peer-to-peer content delivery network. Blobs are named by their BLAKE3 hash (as
/// `b3sum` prints it) and verified piece by piece.
#[derive(Debug, Parser)]
#[command(name = "shoal", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
