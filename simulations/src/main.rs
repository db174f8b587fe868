//! The `shoal-netsim` command.

use clap::Parser;

/// Runs scale experiments on real Shoal nodes over an emulated network.
#[derive(Debug, Parser)]
#[command(name = "shoal-netsim", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
