//! Running a scenario: start real nodes on the emulated network, run the experiment, write the
//! results (`summary.json` and a CSV per experiment).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use shoal_node::protocol::Hash;
use shoal_node::{FetchProgress, Node, NodeConfig, NodeHandle};
use tokio::sync::watch;

use crate::net::{Network, NodeId};
use crate::scenario::{Experiment, Scenario};

/// How to run a scenario.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Where results go; `None` writes nothing.
    pub out: Option<PathBuf>,
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// Prints a progress line on stderr.
    pub progress: bool,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The scenario's name.
    pub scenario: String,
    /// The seed: `--seed` with it repeats the run.
    pub seed: u64,
    /// Nodes started (the largest network, for lookup-scaling).
    pub node_count: usize,
    /// Wall time of the whole run in seconds.
    pub wall_s: f64,
    /// Peak resident memory of the process in MiB (VmHWM).
    pub peak_rss_mib: Option<f64>,
    /// Wall time per unit of emulated time. Every other time here is emulated.
    pub time_scale: f64,
    /// The experiment's figures.
    pub result: ExperimentResult,
}

/// The figures of one experiment.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ExperimentResult {
    /// See [`FlashCrowdResult`].
    FlashCrowd(FlashCrowdResult),
    /// One entry per network size.
    LookupScaling {
        /// Per size.
        sizes: Vec<LookupResult>,
    },
}

/// A flash crowd's figures. Times in emulated seconds from the moment every fetch started.
#[derive(Debug, Clone, Serialize)]
pub struct FlashCrowdResult {
    /// The blob's size in bytes.
    pub blob_bytes: u64,
    /// Nodes fetching (all but the seeder).
    pub fetchers: usize,
    /// Fetches that completed.
    pub succeeded: usize,
    /// Fetched blobs the fetcher's store holds complete (every piece verified).
    pub complete_in_store: usize,
    /// The fluid lower bound on the last completion, max(F/u_s, F/d_min, N·F/(u_s+Σu_i)).
    pub t_min_s: f64,
    /// Completion times over successful fetches.
    pub min_s: f64,
    /// Median.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// Last completion.
    pub max_s: f64,
    /// `max_s / t_min_s`.
    pub max_over_t_min: f64,
    /// Bytes the seeder sent during the crowd, in copies of the blob (transport overhead included).
    pub origin_egress_copies: f64,
    /// Share of the bytes fetchers received that did not come from the seeder.
    pub peer_share: f64,
    /// Per fetcher.
    #[serde(skip)]
    pub completions: Vec<Completion>,
}

/// One fetch in a flash crowd.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The fetcher.
    pub node: NodeId,
    /// Its region.
    pub region: String,
    /// Whether the fetch returned the blob.
    pub ok: bool,
    /// Whether its store holds the blob complete afterwards.
    pub complete: bool,
    /// Emulated seconds until the fetch returned (or gave up).
    pub seconds: f64,
    /// Emulated seconds until the first verified byte.
    pub first_byte_s: Option<f64>,
    /// This node's own lower bound, max(F/u_s, F/d_i): nothing can be faster.
    pub bound_s: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Provider lookups at one network size.
#[derive(Debug, Clone, Serialize)]
pub struct LookupResult {
    /// Nodes in the network.
    pub nodes: usize,
    /// Lookups made.
    pub lookups: usize,
    /// Lookups that found the provider.
    pub found: usize,
    /// Lookup latency (the whole Kademlia query, until `providers` returned), emulated seconds.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Per lookup: (node, found, seconds).
    #[serde(skip)]
    pub samples: Vec<(NodeId, bool, f64)>,
}

/// Counters the progress line shows.
#[derive(Debug, Default)]
struct Progress {
    phase: Mutex<String>,
    done: AtomicUsize,
    total: AtomicUsize,
}

impl Progress {
    fn set(&self, phase: &str, total: usize) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.to_owned();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    fn tick(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, started: Instant) -> String {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rss = proc_status_mib("VmRSS:").map_or(String::from("?"), |m| format!("{m:.0}"));
        format!(
            "[{:>7.1} s] {phase} {}/{}  rss {rss} MiB",
            started.elapsed().as_secs_f64(),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed)
        )
    }
}

/// A field of `/proc/self/status` in MiB (Linux only).
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// A set of running nodes on one emulated network.
struct Cluster {
    net: Arc<Network>,
    nodes: Vec<(NodeId, Node)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(
        scenario: &Scenario,
        count: usize,
        rng: &mut ChaCha8Rng,
        work: &Path,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let net = Network::new(scenario.network_config())?;
        let dir = tempfile::Builder::new().prefix("shoal-netsim-").tempdir_in(work)?;
        let spec = &scenario.nodes;
        let mut nodes: Vec<(NodeId, Node)> = Vec::with_capacity(count);
        let mut addrs: Vec<shoal_node::libp2p::Multiaddr> = Vec::with_capacity(count);
        progress.set("joining", count);
        for i in 0..count {
            let region = rng.random_range(0..net.regions().len());
            let id = net.add_node(region, scenario.caps(i))?;
            let mut config = NodeConfig::new(dir.path().join(i.to_string()));
            config.listen = vec!["/memory/0".parse()?];
            config.api = None;
            config.durable = false;
            config.cache_bytes = spec.cache_mib << 20;
            config.max_connections = spec.max_connections;
            config.lookup_timeout = Duration::from_secs_f64(spec.lookup_timeout_s);
            let k = spec.bootstrap_peers.min(i);
            config.bootstrap = rand::seq::index::sample(rng, i, k).into_iter().map(|j| addrs[j].clone()).collect();
            let transport_net = net.clone();
            let node = Node::start_with_transport(config, Some(Box::new(move |key| transport_net.transport(id, key))))
                .await
                .with_context(|| format!("starting node {i}"))?;
            let listen = tokio::time::timeout(Duration::from_secs(10), node.handle().wait_listening())
                .await
                .context("a node did not listen within 10 s")??;
            addrs.push(listen.into_iter().next().context("no listen address")?);
            nodes.push((id, node));
            progress.tick();
            if spec.join_stagger_ms > 0 {
                tokio::time::sleep(Duration::from_millis(spec.join_stagger_ms)).await;
            }
        }
        // Let routing tables fill, within the settle time.
        progress.set("settling", count);
        let want = spec.bootstrap_peers.min(count - 1).max(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(spec.settle_s);
        for (_, n) in &nodes {
            while n.handle().status().await?.dht.routing_table_peers < want {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            progress.tick();
        }
        Ok(Self { net, nodes, _dir: dir })
    }

    fn handle(&self, i: usize) -> NodeHandle {
        self.nodes[i].1.handle()
    }

    fn region_name(&self, id: NodeId) -> String {
        self.net.region_of(id).map(|r| self.net.regions()[r].clone()).unwrap_or_default()
    }

    async fn shutdown(self, progress: &Progress) {
        progress.set("stopping", self.nodes.len());
        let stops = futures::stream::iter(self.nodes.into_iter().map(|(_, n)| n.shutdown()))
            .buffer_unordered(16)
            .for_each(|_| async { progress.tick() });
        stops.await;
    }
}

/// Writes a blob of `size` seeded random bytes into `dir` and adds it to `node`.
async fn seed_blob(node: &NodeHandle, dir: &Path, size: u64, rng: &mut ChaCha8Rng) -> anyhow::Result<Hash> {
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    let path = dir.join("blob");
    std::fs::write(&path, &data)?;
    drop(data);
    let hash = node.add_path(&path).await?.hash;
    std::fs::remove_file(&path)?;
    Ok(hash)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs `scenario` and writes its results to `options.out`.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Summary> {
    let seed = options.seed.or(scenario.seed).unwrap_or_else(rand::random);
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let ticker = options.progress.then(|| {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                eprint!("\r{}    ", progress.line(started));
            }
        })
    });
    let work = match &options.out {
        Some(out) => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            out.clone()
        }
        None => std::env::temp_dir(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let result = match &scenario.experiment {
        Experiment::FlashCrowd { .. } => {
            ExperimentResult::FlashCrowd(flash_crowd(scenario, &mut rng, &work, &progress).await?)
        }
        Experiment::LookupScaling { counts, lookups } => {
            let mut sizes = Vec::new();
            for &n in counts {
                sizes.push(lookup_scaling(scenario, n, *lookups, &mut rng, &work, &progress).await?);
            }
            ExperimentResult::LookupScaling { sizes }
        }
    };
    if let Some(t) = ticker {
        t.abort();
        eprintln!("\r{}", progress.line(started));
    }
    let node_count = match &scenario.experiment {
        Experiment::FlashCrowd { .. } => scenario.nodes.count,
        Experiment::LookupScaling { counts, .. } => counts.iter().copied().max().unwrap_or(0),
    };
    let summary = Summary {
        scenario: scenario.name.clone(),
        seed,
        node_count,
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: proc_status_mib("VmHWM:"),
        time_scale: scenario.network.time_scale,
        result,
    };
    if let Some(out) = &options.out {
        write_results(out, &summary)?;
    }
    Ok(summary)
}

fn write_results(out: &Path, summary: &Summary) -> anyhow::Result<()> {
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(summary)? + "\n")?;
    let mut csv = String::new();
    match &summary.result {
        ExperimentResult::FlashCrowd(r) => {
            csv.push_str("node,region,ok,complete,seconds,first_byte_s,bound_s,error\n");
            for c in &r.completions {
                csv.push_str(&format!(
                    "{},{},{},{},{:.4},{},{:.4},{}\n",
                    c.node.0,
                    c.region,
                    c.ok,
                    c.complete,
                    c.seconds,
                    c.first_byte_s.map(|s| format!("{s:.4}")).unwrap_or_default(),
                    c.bound_s,
                    c.error.as_deref().unwrap_or("").replace([',', '\n'], ";"),
                ));
            }
            std::fs::write(out.join("completions.csv"), csv)?;
        }
        ExperimentResult::LookupScaling { sizes } => {
            csv.push_str("nodes,node,found,seconds\n");
            for s in sizes {
                for (node, found, secs) in &s.samples {
                    csv.push_str(&format!("{},{},{},{:.4}\n", s.nodes, node.0, found, secs));
                }
            }
            std::fs::write(out.join("lookups.csv"), csv)?;
        }
    }
    Ok(())
}

async fn flash_crowd(
    scenario: &Scenario,
    rng: &mut ChaCha8Rng,
    work: &Path,
    progress: &Progress,
) -> anyhow::Result<FlashCrowdResult> {
    let Experiment::FlashCrowd { blob_mib, seeder, timeout_s, .. } = scenario.experiment else {
        anyhow::bail!("not a flash crowd");
    };
    let count = scenario.nodes.count;
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let size = (blob_mib * 1024.0 * 1024.0) as u64;
    let hash = seed_blob(&cluster.handle(seeder), cluster._dir.path(), size, rng).await?;

    // The fluid bound, from the scenario's caps (emulated bytes per second).
    let f = size as f64;
    let rate = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
    let u_s = rate(scenario.caps(seeder).uplink);
    let fetchers: Vec<usize> = (0..count).filter(|&i| i != seeder).collect();
    let d_min = fetchers.iter().map(|&i| rate(scenario.caps(i).downlink)).fold(f64::INFINITY, f64::min);
    let sum_u: f64 = fetchers.iter().map(|&i| rate(scenario.caps(i).uplink)).sum();
    let t_min = (f / u_s).max(f / d_min).max(fetchers.len() as f64 * f / (u_s + sum_u));

    let seeder_id = cluster.nodes[seeder].0;
    let seeder_sent_before = cluster.net.traffic(seeder_id).0;
    let received_before: u64 = fetchers.iter().map(|&i| cluster.net.traffic(cluster.nodes[i].0).1).sum();

    progress.set("fetching", fetchers.len());
    let t0 = Instant::now();
    let deadline = Duration::from_secs_f64(timeout_s);
    let tasks: Vec<_> = fetchers
        .iter()
        .map(|&i| {
            let handle = cluster.handle(i);
            async move {
                let (tx, mut rx) = watch::channel(FetchProgress::default());
                let first_byte = async move {
                    while rx.changed().await.is_ok() {
                        if rx.borrow().verified_bytes > 0 {
                            return Some(t0.elapsed());
                        }
                    }
                    None
                };
                let fetch = tokio::time::timeout(deadline, handle.fetch(hash, Some(tx)));
                let (result, first) = futures::join!(async { (fetch.await, t0.elapsed()) }, first_byte);
                progress.tick();
                (i, result, first)
            }
        })
        .collect();
    let outcomes = futures::future::join_all(tasks).await;

    let mut completions = Vec::with_capacity(outcomes.len());
    for (i, (result, took), first) in outcomes {
        let (id, node) = &cluster.nodes[i];
        let error = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("timed out after {timeout_s} s")),
        };
        let complete = node.handle().store().info(hash).is_some_and(|b| b.is_complete() && b.size == size);
        completions.push(Completion {
            node: *id,
            region: cluster.region_name(*id),
            ok: error.is_none(),
            complete,
            seconds: took.as_secs_f64() / scale,
            first_byte_s: first.map(|d| d.as_secs_f64() / scale),
            bound_s: (f / u_s).max(f / rate(scenario.caps(i).downlink)),
            error,
        });
    }
    let seeder_sent = cluster.net.traffic(seeder_id).0 - seeder_sent_before;
    let received: u64 =
        fetchers.iter().map(|&i| cluster.net.traffic(cluster.nodes[i].0).1).sum::<u64>() - received_before;
    cluster.shutdown(progress).await;

    let mut times: Vec<f64> = completions.iter().filter(|c| c.ok).map(|c| c.seconds).collect();
    times.sort_by(f64::total_cmp);
    let max_s = times.last().copied().unwrap_or(f64::NAN);
    Ok(FlashCrowdResult {
        blob_bytes: size,
        fetchers: fetchers.len(),
        succeeded: times.len(),
        complete_in_store: completions.iter().filter(|c| c.complete).count(),
        t_min_s: t_min,
        min_s: times.first().copied().unwrap_or(f64::NAN),
        p50_s: percentile(&times, 0.5),
        p90_s: percentile(&times, 0.9),
        max_s,
        max_over_t_min: max_s / t_min,
        origin_egress_copies: seeder_sent as f64 / f,
        peer_share: if received > 0 { 1.0 - (seeder_sent as f64 / received as f64).min(1.0) } else { 0.0 },
        completions,
    })
}

async fn lookup_scaling(
    scenario: &Scenario,
    count: usize,
    lookups: usize,
    rng: &mut ChaCha8Rng,
    work: &Path,
    progress: &Progress,
) -> anyhow::Result<LookupResult> {
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let provider = rng.random_range(0..count);
    let hash = seed_blob(&cluster.handle(provider), cluster._dir.path(), 4096, rng).await?;
    let provider_id = cluster.handle(provider).peer_id();
    // Let the announcement spread (it is itself a Kademlia query).
    tokio::time::sleep(Duration::from_secs_f64(2.0 * scale)).await;

    let others: Vec<usize> = (0..count).filter(|&i| i != provider).collect();
    let picked: Vec<usize> =
        rand::seq::index::sample(rng, others.len(), lookups.min(others.len())).into_iter().map(|j| others[j]).collect();
    progress.set(&format!("lookups at N={count}"), picked.len());
    let mut samples: Vec<(NodeId, bool, f64)> = futures::stream::iter(picked.into_iter().map(|i| {
        let handle = cluster.handle(i);
        let id = cluster.nodes[i].0;
        async move {
            let t = Instant::now();
            let found = handle.providers(hash).await.map(|p| p.contains(&provider_id)).unwrap_or(false);
            progress.tick();
            (id, found, t.elapsed().as_secs_f64() / scale)
        }
    }))
    .buffer_unordered(8)
    .collect()
    .await;
    cluster.shutdown(progress).await;
    samples.sort_by_key(|s| s.0);
    let mut times: Vec<f64> = samples.iter().map(|s| s.2).collect();
    times.sort_by(f64::total_cmp);
    Ok(LookupResult {
        nodes: count,
        lookups: samples.len(),
        found: samples.iter().filter(|s| s.1).count(),
        p50_s: percentile(&times, 0.5),
        p90_s: percentile(&times, 0.9),
        max_s: times.last().copied().unwrap_or(f64::NAN),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
