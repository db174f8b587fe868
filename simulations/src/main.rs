//! `shoal-netsim`: runs scale experiments on real Shoal nodes over an emulated network.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_simulations::Scenario;
use shoal_simulations::run::{ExperimentResult, RunOptions, run};

/// jemalloc, not glibc's malloc: a thousand nodes in one process allocate much that they never
/// touch (each Kademlia routing table reserves room for all 256 buckets of 20 peers, 1.6 MiB per
/// node, of which a network of N nodes fills about log2 N buckets), and jemalloc's slabs keep no
/// header inside the blocks, so untouched room costs address space but no memory. It also
/// returns freed pages to the system after a few seconds, where glibc kept most of them.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Runs a small flash crowd in the emulator and as real `shoal node` processes over loopback
    /// QUIC, and prints both.
    Validate {
        /// A flash-crowd scenario, e.g. simulations/scenarios/validation.toml.
        scenario: PathBuf,
        /// The `shoal` binary (e.g. target/release/shoal).
        #[arg(long)]
        shoal: PathBuf,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Where to write validation.json.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// How long an interrupted run waits for its blocking tasks (store writes), and then for its
/// directories to go.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The nodes run on threads of their own (`shards`); this one runs the experiment around them.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if let Some(result) = runtime.block_on(until_interrupted(command(cli))) {
        return result;
    }
    // Interrupted. Every task of the run is dropped and its blocking ones get a few seconds, so
    // that nothing writes into the nodes' stores any more; then they are removed and the node
    // processes of a validation stopped (a 1,000-node crowd's stores are about 4 GB).
    runtime.shutdown_timeout(SHUTDOWN_PATIENCE);
    for dir in shoal_simulations::cleanup::interrupted(SHUTDOWN_PATIENCE) {
        eprintln!("could not remove {}", dir.display());
    }
    std::process::exit(130);
}

/// `work`'s result, or `None` at the first SIGINT or SIGTERM, the work then dropped.
async fn until_interrupted<T>(work: impl Future<Output = T>) -> Option<T> {
    let Ok(mut signals) = Signals::new() else { return Some(work.await) };
    tokio::select! {
        result = work => Some(result),
        _ = signals.next() => {
            eprintln!("\ninterrupted: stopping the nodes and removing their stores");
            None
        }
    }
}

async fn command(cli: Cli) -> anyhow::Result<()> {
    let (scenario, out, seed, nodes) = match cli.command {
        Command::Run { scenario, out, seed, nodes } => (scenario, out, seed, nodes),
        Command::Validate { scenario, shoal, seed, out } => return validate(&scenario, &shoal, seed, out).await,
    };
    let mut s = Scenario::load(&scenario)?;
    if let Some(n) = nodes {
        s = s.with_node_count(n);
        s.check()?;
    }
    let seed = seed.or(s.seed).unwrap_or_else(rand::random);
    eprintln!("netsim: {} with seed {seed} (repeat with --seed {seed})", s.name);
    let summary = run(&s, &RunOptions { out: out.clone(), seed: Some(seed), progress: true }).await?;
    match &summary.result {
        ExperimentResult::FlashCrowd(r) => {
            eprintln!(
                "flash crowd: {}/{} fetched, T_min {:.2} s, min {:.2} p50 {:.2} p90 {:.2} max {:.2} s ({:.2}× T_min), \
                 origin egress {:.2} copies ({:.2} of them pieces), peers served {:.0}%",
                r.succeeded,
                r.fetchers,
                r.t_min_s,
                r.min_s,
                r.p50_s,
                r.p90_s,
                r.max_s,
                r.max_over_t_min,
                r.origin_egress_copies,
                r.origin_piece_copies,
                r.peer_share * 100.0
            );
            let secs = |t: Option<f64>| t.map_or_else(|| "-".to_string(), |t| format!("{t:.2}"));
            if let (Some(t), Some(x)) = (r.t_pieces_s, r.max_over_t_pieces) {
                eprintln!(
                    "whole pieces: no schedule ends before {t:.2} s ({x:.2}× it); a greedy one with no latency that sees \
                     every node ends at {} s",
                    secs(r.t_schedule_s)
                );
            }
            eprintln!(
                "pieces: all out of the seeder at {} s; first holder to nine tenths of the crowd p50 {} max {} s",
                secs(r.pieces_out_s),
                secs(r.piece_spread_p50_s),
                secs(r.piece_spread_max_s)
            );
            eprintln!(
                "first verified piece: p50 {} p90 {} last {} s",
                secs(r.first_byte_p50_s),
                secs(r.first_byte_p90_s),
                secs(r.first_byte_max_s)
            );
            eprintln!(
                "connections: {} opened and {} dials failed while the fetches ran ({:.0} and {:.0} per fetcher)",
                r.connections_opened,
                r.dials_failed,
                r.connections_opened as f64 / r.fetchers.max(1) as f64,
                r.dials_failed as f64 / r.fetchers.max(1) as f64
            );
            if let (Some(busy), Some(share)) = (r.fetch_cpu_cores, r.cpu_saturated_share) {
                eprintln!(
                    "emulator: {busy:.1} of {} cores busy over the fetch, all of them in {:.0}% of its seconds{}",
                    r.cores,
                    share * 100.0,
                    if share >= 0.25 {
                        " (there the times measure this machine as much as the protocol: a larger time scale or \
                         fewer nodes shows whether they move)"
                    } else {
                        ""
                    }
                );
            }
        }
        ExperimentResult::LookupScaling { sizes } => {
            for l in sizes {
                eprintln!(
                    "lookups at N={}: {}/{} found the provider ({} nodes hold the record); hops p50 {} p90 {} max {}; \
                     first provider p50 {:.3} p90 {:.3} s; whole query p50 {:.3} p90 {:.3} s, {} requests",
                    l.nodes,
                    l.found,
                    l.lookups,
                    l.record_holders,
                    l.hops_p50,
                    l.hops_p90,
                    l.hops_max,
                    l.first_provider_p50_s,
                    l.first_provider_p90_s,
                    l.p50_s,
                    l.p90_s,
                    l.requests_p50
                );
            }
        }
        ExperimentResult::ZipfCatalogue(r) => eprintln!(
            "zipf catalogue: {} requests ({} ok) over {} blobs; hit ratio {:.1}%; TTFB p50 {:.3} p99 {:.3} s \
             (misses: p50 {:.3} p99 {:.3} s); origin offload {:.1}%, origin egress {:.2} catalogues",
            r.requests,
            r.succeeded,
            r.blobs,
            r.hit_ratio * 100.0,
            r.ttfb_p50_s,
            r.ttfb_p99_s,
            r.ttfb_miss_p50_s,
            r.ttfb_miss_p99_s,
            r.origin_offload * 100.0,
            r.origin_egress_catalogues
        ),
        ExperimentResult::Churn(r) => {
            eprintln!(
                "churn: {:.0}% churned ({} crashed, {} of them restarted; {} left; {} joined); \
             {}/{} fetches succeeded ({:.1}%); completion p50 {:.2} p90 {:.2} max {:.2} s; \
             first byte p50 {:.2} p99 {:.2} s; longest stall after it p50 {:.2} p99 {:.2} s; \
             restart to done p50 {:.2} max {:.2} s",
                r.churned_share * 100.0,
                r.crashed,
                r.restarted,
                r.left,
                r.joined,
                r.succeeded,
                r.eligible,
                r.success_rate * 100.0,
                r.p50_s,
                r.p90_s,
                r.max_s,
                r.first_byte_p50_s,
                r.first_byte_p99_s,
                r.stall_p50_s,
                r.stall_p99_s,
                r.restart_to_done_p50_s,
                r.restart_to_done_max_s
            );
            if let Some(p) = &r.partition {
                eprintln!(
                    "partition {} | {} (providers in {}): cut {:.1}-{:.1} s, {} bytes across while cut; {} fetches completed while cut, {} after the repair (repair to done p50 {:.2} max {:.2} s)",
                    p.between[0],
                    p.between[1],
                    p.provider_regions.join(", "),
                    p.at_s,
                    p.repaired_s,
                    p.bytes_across_while_cut,
                    p.completed_while_cut,
                    p.completed_after,
                    p.after_repair_p50_s,
                    p.after_repair_max_s
                );
            }
        }
        ExperimentResult::Regions(r) => {
            eprintln!(
                "regions: {}/{} fetched; {:.1}% of bytes from the receiver's own region (random picks: {:.1}%)",
                r.succeeded,
                r.fetchers,
                r.own_region_share * 100.0,
                r.random_pick_share * 100.0
            );
            for g in &r.regions {
                eprintln!(
                    "  {}: {} nodes, {:.1}% own-region bytes, completion p50 {:.2} p90 {:.2} s",
                    g.name,
                    g.nodes,
                    g.own_share * 100.0,
                    g.p50_s,
                    g.p90_s
                );
            }
        }
    }
    let mib = |m: Option<f64>| m.map_or("?".into(), |m| format!("{m:.0}"));
    eprintln!(
        "wall {:.1} s on {} CPU-seconds, peak RSS {} MiB ({} MiB after the nodes stopped), seed {}",
        summary.wall_s,
        summary.cpu_s.map_or("?".into(), |s| format!("{s:.0}")),
        mib(summary.peak_rss_mib),
        mib(summary.end_rss_mib),
        summary.seed
    );
    if let Some(out) = out {
        eprintln!("results in {}", out.display());
    }
    Ok(())
}

/// SIGINT and SIGTERM, handled from creation on (they no longer end the process by themselves).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

async fn validate(
    scenario: &std::path::Path,
    shoal: &std::path::Path,
    seed: Option<u64>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let s = Scenario::load(scenario)?;
    let seed = seed.or(s.seed).unwrap_or_else(rand::random);
    eprintln!("validation: {} with seed {seed}, in the emulator and as real processes", s.name);
    let work = out.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work)?;
    let v = shoal_simulations::validate::validate(&s, shoal, seed, &work).await?;
    eprintln!("{} nodes, {:.1} MiB blob, T_min {:.2} s", v.nodes, v.blob_bytes as f64 / 1048576.0, v.t_min_s);
    for (name, side) in [("netsim", &v.netsim), ("real  ", &v.real)] {
        eprintln!(
            "{name}: {}/{} fetched, p50 {:.2} s, max {:.2} s ({:.2}x T_min), origin served {:.2} copies",
            side.succeeded,
            v.nodes - 1,
            side.p50_s,
            side.max_s,
            side.max_over_t_min,
            side.origin_piece_copies
        );
    }
    if let Some(out) = out {
        std::fs::write(out.join("validation.json"), serde_json::to_string_pretty(&v)? + "\n")?;
    }
    Ok(())
}
