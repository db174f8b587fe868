//! `shoal-netsim`: runs scale experiments on real Shoal nodes over an emulated network.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shoal_simulations::Scenario;
use shoal_simulations::run::{ExperimentResult, RunOptions, run};

/// Runs scale experiments on real Shoal nodes over an emulated network.
#[derive(Debug, Parser)]
#[command(name = "shoal-netsim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a scenario file and writes summary.json and a CSV.
    Run {
        /// The scenario (TOML), e.g. simulations/scenarios/flash-crowd.toml.
        scenario: PathBuf,
        /// Where results (and the nodes' data) go; the system temp directory if absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Overrides the node count (for lookup-scaling, runs this one size).
        #[arg(long)]
        nodes: Option<usize>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let Command::Run { scenario, out, seed, nodes } = Cli::parse().command;
    let mut s = Scenario::load(&scenario)?;
    if let Some(n) = nodes {
        s = s.with_node_count(n);
        s.check()?;
    }
    let seed = seed.or(s.seed).unwrap_or_else(rand::random);
    eprintln!("netsim: {} with seed {seed} (repeat with --seed {seed})", s.name);
    let summary = run(&s, &RunOptions { out: out.clone(), seed: Some(seed), progress: true }).await?;
    match &summary.result {
        ExperimentResult::FlashCrowd(r) => eprintln!(
            "flash crowd: {}/{} fetched, T_min {:.2} s, min {:.2} p50 {:.2} p90 {:.2} max {:.2} s ({:.2}× T_min), \
             origin egress {:.2} copies, peers served {:.0}%",
            r.succeeded,
            r.fetchers,
            r.t_min_s,
            r.min_s,
            r.p50_s,
            r.p90_s,
            r.max_s,
            r.max_over_t_min,
            r.origin_egress_copies,
            r.peer_share * 100.0
        ),
        ExperimentResult::LookupScaling { sizes } => {
            for l in sizes {
                eprintln!(
                    "lookups at N={}: {}/{} found the provider, p50 {:.3} p90 {:.3} max {:.3} s",
                    l.nodes, l.found, l.lookups, l.p50_s, l.p90_s, l.max_s
                );
            }
        }
    }
    eprintln!(
        "wall {:.1} s, peak RSS {} MiB, seed {}",
        summary.wall_s,
        summary.peak_rss_mib.map_or("?".into(), |m| format!("{m:.0}")),
        summary.seed
    );
    if let Some(out) = out {
        eprintln!("results in {}", out.display());
    }
    Ok(())
}
