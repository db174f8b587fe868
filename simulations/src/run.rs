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
use shoal_node::libp2p::Multiaddr;
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
    /// CPU time the process had used when the run ended (user and system), in seconds: near
    /// `wall_s` times the cores, the emulator, not the protocol, set the pace.
    pub cpu_s: Option<f64>,
    /// Peak resident memory of the process in MiB (VmHWM).
    pub peak_rss_mib: Option<f64>,
    /// Resident memory once every node has stopped, in MiB (VmRSS): how much the allocator kept.
    pub end_rss_mib: Option<f64>,
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
    /// See [`crate::zipf::ZipfResult`].
    ZipfCatalogue(crate::zipf::ZipfResult),
    /// See [`crate::churn::ChurnResult`].
    Churn(crate::churn::ChurnResult),
    /// See [`crate::regions::RegionsResult`].
    Regions(crate::regions::RegionsResult),
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
    /// Fetched blobs the fetcher's store holds complete, every byte read back and checked
    /// against the hash after the crowd.
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
    /// Over successful fetches, the time to their first verified piece: median, 90th percentile
    /// and last. What grows with a crowd is mostly this wait, for a peer that has something and
    /// room to take us (`None` if no fetch got a byte).
    pub first_byte_p50_s: Option<f64>,
    /// 90th percentile of the time to a first verified piece.
    pub first_byte_p90_s: Option<f64>,
    /// The last fetch's first verified piece.
    pub first_byte_max_s: Option<f64>,
    /// A lower bound on the last completion for any schedule of whole pieces over the same caps
    /// ([`crate::schedule::whole_piece_bound`]): a fetcher passes on only pieces it holds whole,
    /// so a crowd's start costs about a piece-upload time per doubling of its holders over the
    /// fluid bound. `None` with an uncapped uplink.
    pub t_pieces_s: Option<f64>,
    /// `max_s / t_pieces_s`.
    pub max_over_t_pieces: Option<f64>,
    /// The last completion of a greedy schedule of whole pieces over the same caps by a scheduler
    /// that sees every node, with no latency ([`crate::schedule::greedy_crowd`]): a pace a
    /// protocol could keep. `None` with an uncapped uplink, or for a crowd and blob too large to
    /// schedule in about a second.
    pub t_schedule_s: Option<f64>,
    /// Bytes the seeder sent during the crowd, in copies of the blob (transport overhead included).
    pub origin_egress_copies: f64,
    /// Of those, the pieces (with their proofs) the seeder served, in copies of the blob; the
    /// rest is its answers, DHT traffic and connection handshakes.
    pub origin_piece_copies: f64,
    /// Share of the bytes fetchers received that did not come from the seeder.
    pub peer_share: f64,
    /// The fullest the nodes' serving queues were (the seeder's and the fetchers'), sampled as
    /// the piece spread is, against their bounds.
    pub queues: Box<QueuePeaks>,
    /// Per fetcher.
    #[serde(skip)]
    pub completions: Vec<Completion>,
    /// Once per emulated second.
    #[serde(skip)]
    pub series: Vec<CrowdSample>,
    /// When every piece had reached a fetcher: the seeder's first copy of the blob, done (at
    /// least F/u_s). `None` if some piece never did.
    pub pieces_out_s: Option<f64>,
    /// Over the pieces that reached nine tenths of the fetchers, the median time from a piece's
    /// first holder to nine tenths of them: how fast the crowd passes a piece on. Were every
    /// holder to pass it on at its whole uplink, its holders would double every piece-upload
    /// time, about log2(0.9·N) of them; what lies above that is lost to round trips, lines and
    /// finding the new holders.
    pub piece_spread_p50_s: Option<f64>,
    /// The slowest piece's time from first holder to nine tenths of the fetchers.
    pub piece_spread_max_s: Option<f64>,
    /// Per piece, when it reached the crowd and how it spread.
    #[serde(skip)]
    pub pieces: Vec<PieceSpread>,
    /// Connections the nodes dialled and opened while the fetches ran: each costs both ends a
    /// handshake, Kademlia's, identify's and ping's handlers, and a round trip or two.
    pub connections_opened: u64,
    /// Dials that failed meanwhile, most of them turned away at a peer's connection cap.
    pub dials_failed: u64,
    /// The cores this machine offers the process.
    pub cores: usize,
    /// Cores the process kept busy, on average, while the fetches ran (`None` off Linux).
    pub fetch_cpu_cores: Option<f64>,
    /// Share of the fetches' emulated seconds in which the process kept at least nine tenths of
    /// [`Self::cores`] busy (`None` off Linux or with no whole second sampled). Completion times
    /// from such seconds measure this machine as much as the protocol: a larger time scale, or
    /// fewer nodes, shows whether they move.
    pub cpu_saturated_share: Option<f64>,
}

/// The cores at which the process counts as saturated, of `cores`.
const SATURATED: f64 = 0.9;

/// How one piece spread through a flash crowd: the first sample at which one fetcher, a tenth, a
/// half, nine tenths and all of the fetchers held it verified (emulated seconds; `None` if it
/// never did). Samples are [`SPREAD_SAMPLE_S`] apart, so each time is at most that late.
#[derive(Debug, Clone, Serialize)]
pub struct PieceSpread {
    /// The piece's index.
    pub piece: u32,
    /// One fetcher held it.
    pub first_s: Option<f64>,
    /// A tenth of the fetchers (rounded up) did.
    pub tenth_s: Option<f64>,
    /// Half of them did.
    pub half_s: Option<f64>,
    /// Nine tenths did.
    pub nine_tenths_s: Option<f64>,
    /// All did.
    pub all_s: Option<f64>,
}

/// How often, in emulated seconds, a flash crowd's pieces are counted (see [`PieceSpread`]); the
/// time series keeps one sample per emulated second.
pub const SPREAD_SAMPLE_S: f64 = 0.25;

impl PieceSpread {
    /// The holder counts each field records: one, a tenth, half, nine tenths and all of `n`.
    fn thresholds(n: usize) -> [usize; 5] {
        [1, n.div_ceil(10).max(1), n.div_ceil(2).max(1), (n * 9).div_ceil(10).max(1), n.max(1)]
    }

    fn times_mut(&mut self) -> [&mut Option<f64>; 5] {
        [&mut self.first_s, &mut self.tenth_s, &mut self.half_s, &mut self.nine_tenths_s, &mut self.all_s]
    }

    /// From first holder to nine tenths of the fetchers.
    pub fn spread_s(&self) -> Option<f64> {
        Some(self.nine_tenths_s? - self.first_s?)
    }
}

/// A flash crowd's state at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct CrowdSample {
    /// Emulated seconds since the fetches started.
    pub t_s: f64,
    /// Fetches done.
    pub completed: usize,
    /// Bytes the seeder has sent since the start.
    pub origin_bytes: u64,
    /// Bytes the fetchers have received since the start.
    pub received_bytes: u64,
    /// Bytes the fetchers have sent since the start: against their summed uplinks, how much of
    /// the crowd's upload capacity the swarm used.
    pub fetcher_sent_bytes: u64,
    /// Verified bytes the fetchers hold of the blob.
    pub held_bytes: u64,
    /// Fetchers holding some of the blob but not all of it: those with pieces to trade.
    pub trading: usize,
    /// Fetchers that sent at least half their uplink's worth since the last sample (none with no
    /// uplink cap, and none in the first sample).
    pub busy_uplinks: usize,
    /// Fetchers holding the piece fewest fetchers hold: a crowd finishes only once its rarest
    /// piece has reached everyone, so a count that stays low while the rest spread is the
    /// crowd's critical path.
    pub rarest_piece_holders: usize,
    /// Cores this process kept busy since the last sample (`None` in the first sample, and off
    /// Linux). Near the machine's core count ([`FlashCrowdResult::cores`]), the emulator, not the
    /// protocol, set the pace of that second.
    pub cpu_cores: Option<f64>,
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
    /// Whether its store holds the blob complete afterwards, every byte checked.
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
    /// Lookups that found the provider (and connected to it).
    pub found: usize,
    /// Nodes storing the provider record after the announcement.
    pub record_holders: usize,
    /// Lookup latency (the whole Kademlia query, until `providers` returned), emulated seconds.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Time until the first provider record arrived, median (what a fetch waits for).
    pub first_provider_p50_s: f64,
    /// 90th percentile.
    pub first_provider_p90_s: f64,
    /// Hops to the first node holding the record, replayed over the live routing tables (see
    /// [`crate::hops`]), median.
    pub hops_p50: f64,
    /// 90th percentile.
    pub hops_p90: f64,
    /// Most.
    pub hops_max: f64,
    /// Kademlia requests per lookup, median (libp2p runs the query to the k closest nodes).
    pub requests_p50: f64,
    /// Per lookup.
    #[serde(skip)]
    pub samples: Vec<LookupSample>,
}

/// One provider lookup.
#[derive(Debug, Clone, Serialize)]
pub struct LookupSample {
    /// The node that looked up.
    pub node: NodeId,
    /// Its peer id.
    #[serde(skip)]
    pub peer: shoal_node::libp2p::PeerId,
    /// Whether it found the provider.
    pub found: bool,
    /// Emulated seconds for the whole lookup.
    pub seconds: f64,
    /// Emulated seconds until the first provider record arrived.
    pub first_provider_s: Option<f64>,
    /// Kademlia requests sent.
    pub requests: Option<u32>,
    /// Those that were answered (the others failed: a dial refused, a peer gone, a timeout).
    pub answered: Option<u32>,
    /// Replayed hops to a record holder.
    pub hops: Option<u32>,
}

/// Counters the progress line shows.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    phase: Mutex<String>,
    done: AtomicUsize,
    total: AtomicUsize,
    /// The network being measured, and its byte count at the last line.
    net: Mutex<Option<(Arc<Network>, u64, Instant)>>,
    /// The process's CPU time at the last line.
    cpu: Mutex<Option<CpuReading>>,
}

impl Progress {
    pub(crate) fn set(&self, phase: &str, total: usize) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.to_owned();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub(crate) fn tick(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, started: Instant) -> String {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rss = proc_status_mib("VmRSS:").map_or(String::from("?"), |m| format!("{m:.0}"));
        let mut traffic = String::new();
        if let Some((net, last, at)) = &mut *self.net.lock().unwrap_or_else(|e| e.into_inner()) {
            let now = net.total_sent();
            let rate = (now - *last) as f64 / at.elapsed().as_secs_f64().max(1e-3) / 1e6;
            traffic = format!("  net {rate:.1} MB/s");
            (*last, *at) = (now, Instant::now());
        }
        // Cores busy since the last line: at the machine's core count, the emulator sets the pace.
        let mut cores = String::new();
        if let Some(now) = CpuReading::now() {
            let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(last) = *cpu {
                cores = format!("  cpu {:.1}", now.cores_since(last));
            }
            *cpu = Some(now);
        }
        format!(
            "[{:>7.1} s] {phase} {}/{}  rss {rss} MiB{traffic}{cores}",
            started.elapsed().as_secs_f64(),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed)
        )
    }
}

/// The process's CPU time at an instant.
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    cpu_s: f64,
    at: Instant,
}

impl CpuReading {
    /// Now (Linux only).
    fn now() -> Option<Self> {
        Some(Self { cpu_s: proc_cpu_s()?, at: Instant::now() })
    }

    /// Cores the process kept busy, on average, from `earlier` to this reading.
    fn cores_since(self, earlier: Self) -> f64 {
        (self.cpu_s - earlier.cpu_s) / self.at.duration_since(earlier.at).as_secs_f64().max(1e-3)
    }
}

/// CPU time this process has used, user and system, in seconds (Linux only).
pub fn proc_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name (in parentheses, which may hold spaces): state is field 3, utime
    // and stime fields 14 and 15, in clock ticks of 1/100 s (USER_HZ on every Linux ABI).
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// A field of `/proc/self/status` in MiB (Linux only).
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// A set of nodes on one emulated network; nodes can crash, leave, restart and join.
pub(crate) struct Cluster {
    pub(crate) net: Arc<Network>,
    pub(crate) nodes: Vec<Member>,
    /// The threads the nodes run on; after `nodes`, before `dir`: the nodes' tasks stop before
    /// their stores are removed.
    shards: crate::shards::Shards,
    dir: tempfile::TempDir,
    _registered: crate::cleanup::Dir,
}

/// One node of a [`Cluster`], running or not.
pub(crate) struct Member {
    pub(crate) id: NodeId,
    /// `None` while the node is down (crashed or left).
    node: Option<Node>,
    /// A handle to the node's current incarnation.
    handle: NodeHandle,
    /// The address the current incarnation listens on, kept from its start: a joining node is
    /// given it without asking the node's event loop, which answers late while the network is
    /// busy (joins stalled for a minute at 1,000 nodes, each waiting on sixteen such answers).
    addr: Multiaddr,
    config: NodeConfig,
}

/// Gives the node whose data lives in `data_dir` an identity drawn from `rng`, which the run's
/// seed seeds: the peer ids, and with them the DHT's layout (which nodes are close to which,
/// which keep a key's provider records), repeat with the seed. What the nodes draw for themselves
/// as they run (the order they try peers in, say), and the timing of a real-time run on a shared
/// machine, do not.
fn seeded_identity(data_dir: &Path, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let key = shoal_node::libp2p::identity::Keypair::ed25519_from_bytes(rng.random::<[u8; 32]>())?;
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(data_dir)?;
    let path = data_dir.join("identity");
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    std::io::Write::write_all(&mut file, &key.to_protobuf_encoding()?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The fullest a queue was on any node, with that node's bound then, and how many samples found
/// a queue past its own node's bound (bounds differ between nodes: an uplink cap sizes the
/// piece-upload slots).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Peak {
    pub peak: usize,
    /// `None` until a node was sampled.
    pub bound: Option<usize>,
    pub passed: usize,
}

impl Peak {
    fn see(&mut self, (now, bound): (usize, usize)) {
        if self.bound.is_none() || now > self.peak || (now == self.peak && Some(bound) < self.bound) {
            (self.peak, self.bound) = (now, Some(bound));
        }
        self.passed += usize::from(now > bound);
    }

    /// Whether the queue stayed within its bound on every node.
    pub fn held(&self) -> bool {
        self.passed == 0
    }
}

/// The peaks of a node's serving queues (see [`shoal_node::Load`]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueuePeaks {
    pub uploads: Peak,
    pub peer_uploads: Peak,
    pub piece_slots: Peak,
    pub line: Peak,
    pub peer_piece_slots: Peak,
    pub watches: Peak,
    pub reading: Peak,
}

impl QueuePeaks {
    fn see(&mut self, load: shoal_node::Load) {
        self.uploads.see(load.uploads);
        self.peer_uploads.see(load.peer_uploads);
        self.piece_slots.see(load.piece_slots);
        self.line.see(load.line);
        self.peer_piece_slots.see(load.peer_piece_slots);
        self.watches.see(load.watches);
        self.reading.see(load.reading);
    }
}

impl Cluster {
    /// Starts `count` nodes, staggered, each joining through random earlier ones, and waits (up
    /// to the settle time) until their routing tables fill.
    pub(crate) async fn start(
        scenario: &Scenario,
        count: usize,
        rng: &mut ChaCha8Rng,
        work: &Path,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let net = Network::new(scenario.network_config())?;
        let dir = tempfile::Builder::new().prefix("shoal-netsim-").tempdir_in(work)?;
        *progress.net.lock().unwrap_or_else(|e| e.into_inner()) = Some((net.clone(), net.total_sent(), Instant::now()));
        let _registered = crate::cleanup::Dir::register(dir.path());
        let shards = crate::shards::Shards::per_core()?;
        let mut cluster = Self { net, nodes: Vec::with_capacity(count), shards, dir, _registered };
        let spec = &scenario.nodes;
        progress.set("joining", count);
        for _ in 0..count {
            cluster.join(scenario, rng).await?;
            progress.tick();
            if spec.join_stagger_ms > 0 {
                tokio::time::sleep(Duration::from_millis(spec.join_stagger_ms)).await;
            }
        }
        // Let routing tables fill, within the settle time.
        progress.set("settling", count);
        let want = spec.bootstrap_peers.min(count - 1).max(1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(spec.settle_s);
        for m in &cluster.nodes {
            while m.handle.status().await?.dht.routing_table_peers < want {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            progress.tick();
        }
        Ok(cluster)
    }

    /// The directory nodes keep their data in; experiments may put files there.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one more node in a random region, bootstrapped through random running nodes.
    /// Returns its index.
    pub(crate) async fn join(&mut self, scenario: &Scenario, rng: &mut ChaCha8Rng) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        let spec = &scenario.nodes;
        let region = rng.random_range(0..self.net.regions().len());
        let id = self.net.add_node(region, scenario.caps(i))?;
        let data_dir = self.dir.path().join(i.to_string());
        seeded_identity(&data_dir, rng)?;
        let mut config = NodeConfig::new(data_dir);
        config.listen = vec!["/memory/0".parse()?];
        config.api = None;
        config.durable = false;
        config.cache_bytes = spec.cache_mib << 20;
        config.hot_bytes = (spec.hot_mib << 20) as usize;
        config.max_connections = spec.max_connections;
        // Emulated time, as the latencies and rates are: the node stretches these, and every
        // timer of its own, by the time scale.
        config.lookup_timeout = Duration::from_secs_f64(spec.lookup_timeout_s);
        config.spread_patience = Duration::from_secs_f64(spec.spread_patience_s);
        config.time_scale = scenario.network.time_scale;
        config.dht_refresh = Duration::from_secs_f64(spec.dht_refresh_s);
        config.refresh_buckets = spec.refresh_buckets;
        config.fetch_peers = spec.fetch_peers;
        config.ping = spec.ping;
        // No router on an emulated network (and a memory address asks none anyway).
        config.upnp = false;
        // A node knows its uplink, as an operator tells it with `--upload-rate`: that sizes its
        // concurrent uploads.
        let scale = scenario.network.time_scale;
        config.upload_rate = scenario.caps(i).uplink.map(|b| (b as f64 / scale) as u64);
        let (node, handle, addr) = self.boot(i, id, config.clone(), spec.bootstrap_peers, rng).await?;
        self.nodes.push(Member { id, node: Some(node), handle, addr, config });
        Ok(i)
    }

    async fn boot(
        &self,
        i: usize,
        id: NodeId,
        mut config: NodeConfig,
        bootstrap: usize,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<(Node, NodeHandle, Multiaddr)> {
        let up: Vec<&Member> = self.nodes.iter().filter(|m| m.node.is_some() && m.id != id).collect();
        config.bootstrap = rand::seq::index::sample(rng, up.len(), bootstrap.min(up.len()))
            .into_iter()
            .map(|j| up[j].addr.clone())
            .collect();
        let net = self.net.clone();
        // Started on its shard, so that its tasks (and theirs) run there.
        let start = Node::start_with_transport(config, Some(Box::new(move |key| net.transport(id, key))));
        let node = self.shards.handle(i).spawn(start).await?.with_context(|| format!("starting node {id}"))?;
        let addr = tokio::time::timeout(Duration::from_secs(10), node.handle().wait_listening())
            .await
            .context("a node did not listen within 10 s")??
            .swap_remove(0);
        let handle = node.handle();
        Ok((node, handle, addr))
    }

    /// Whether node `i` is running.
    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    /// Crashes node `i`: its links reset at once, nothing is drained or flushed.
    pub(crate) fn crash(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].node.take() {
            self.net.set_down(self.nodes[i].id);
            node.crash();
        }
    }

    /// Node `i` leaves: it drains its uploads and stops cleanly. Returns that leaving, to run
    /// (churn spawns it, so that the events after it are not held back); `None` if the node was
    /// not running. It counts as down at once, as a stopping process takes no new work; its
    /// links go once what it sent has arrived ([`Network::drained_at`]).
    pub(crate) fn leave(&mut self, i: usize) -> Option<impl Future<Output = ()> + Send + 'static> {
        let node = self.nodes[i].node.take()?;
        let (net, id) = (self.net.clone(), self.nodes[i].id);
        Some(async move {
            let _ = node.shutdown().await;
            tokio::time::sleep_until(net.drained_at(id).into()).await;
            net.set_down(id);
        })
    }

    /// Restarts node `i` on its data directory (same identity, same store), bootstrapped
    /// through random running nodes.
    pub(crate) async fn restart(&mut self, i: usize, scenario: &Scenario, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
        if self.nodes[i].node.is_some() {
            return Ok(());
        }
        let id = self.nodes[i].id;
        self.net.set_up(id);
        let (node, handle, addr) =
            self.boot(i, id, self.nodes[i].config.clone(), scenario.nodes.bootstrap_peers, rng).await?;
        self.nodes[i].node = Some(node);
        self.nodes[i].handle = handle;
        self.nodes[i].addr = addr;
        Ok(())
    }

    pub(crate) fn handle(&self, i: usize) -> NodeHandle {
        self.nodes[i].handle.clone()
    }

    /// Runs `task` on node `i`'s thread, as the node's own API would run it.
    pub(crate) fn spawn<F>(&self, i: usize, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.shards.handle(i).spawn(task)
    }

    pub(crate) fn region_name(&self, id: NodeId) -> String {
        self.net.region_of(id).map(|r| self.net.regions()[r].clone()).unwrap_or_default()
    }

    /// Writes each running node's metrics (Prometheus text, as `GET /metrics` serves them) to
    /// `dir/node-<index>.prom`: how each node's requests went, for digging into a result.
    pub(crate) fn save_metrics(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (i, m) in self.nodes.iter().enumerate().filter(|(_, m)| m.node.is_some()) {
            std::fs::write(dir.join(format!("node-{i}.prom")), m.handle.metrics_text())?;
        }
        Ok(())
    }

    pub(crate) async fn shutdown(mut self, progress: &Progress) {
        progress.set("stopping", self.nodes.len());
        let nodes = std::mem::take(&mut self.nodes);
        let stops = futures::stream::iter(nodes.into_iter().filter_map(|m| m.node).map(|n| n.shutdown()))
            .buffer_unordered(16)
            .for_each(|_| async { progress.tick() });
        stops.await;
    }
}

/// A cluster dropped before its `shutdown` (a run that failed, or was interrupted) stops its nodes
/// at once, before its directory is removed. Their tasks still end at their next poll and blocking
/// store writes run to their end, so an interrupted run also shuts its runtime down and removes
/// the directory again afterwards (see [`crate::cleanup`]).
impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.nodes {
            if let Some(node) = m.node.take() {
                node.crash();
            }
        }
    }
}

/// Writes a blob of `size` seeded random bytes into `dir` and adds it to `node`.
pub(crate) async fn seed_blob(node: &NodeHandle, dir: &Path, size: u64, rng: &mut ChaCha8Rng) -> anyhow::Result<Hash> {
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    let path = dir.join("blob");
    std::fs::write(&path, &data)?;
    drop(data);
    let hash = node.add_path(&path).await?.hash;
    std::fs::remove_file(&path)?;
    Ok(hash)
}

/// Waits (up to 60 emulated seconds) until `node` has no announcement queued or in flight: each
/// is a Kademlia query, and a lookup before it ends may miss the record.
pub(crate) async fn wait_announced(node: &NodeHandle, scale: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(60.0 * scale);
    loop {
        let dht = node.status().await?.dht;
        if (dht.provide_queue == 0 && dht.announcing == 0) || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
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
            let metrics = options.out.as_ref().map(|o| o.join("metrics"));
            ExperimentResult::FlashCrowd(flash_crowd(scenario, &mut rng, &work, metrics.as_deref(), &progress).await?)
        }
        Experiment::LookupScaling { counts, lookups } => {
            let mut sizes = Vec::new();
            for &n in counts {
                let metrics = options.out.as_ref().map(|o| o.join(format!("metrics-{n}")));
                sizes
                    .push(lookup_scaling(scenario, n, *lookups, &mut rng, &work, metrics.as_deref(), &progress).await?);
            }
            ExperimentResult::LookupScaling { sizes }
        }
        Experiment::ZipfCatalogue { .. } => {
            ExperimentResult::ZipfCatalogue(crate::zipf::run(scenario, &mut rng, &work, &progress).await?)
        }
        Experiment::Churn { .. } => {
            ExperimentResult::Churn(crate::churn::run(scenario, &mut rng, &work, &progress).await?)
        }
        Experiment::Regions { .. } => {
            ExperimentResult::Regions(crate::regions::run(scenario, &mut rng, &work, &progress).await?)
        }
    };
    if let Some(t) = ticker {
        t.abort();
        eprintln!("\r{}", progress.line(started));
    }
    let node_count = match &scenario.experiment {
        Experiment::LookupScaling { counts, .. } => counts.iter().copied().max().unwrap_or(0),
        _ => scenario.nodes.count,
    };
    let summary = Summary {
        scenario: scenario.name.clone(),
        seed,
        node_count,
        wall_s: started.elapsed().as_secs_f64(),
        cpu_s: proc_cpu_s(),
        peak_rss_mib: proc_status_mib("VmHWM:"),
        end_rss_mib: proc_status_mib("VmRSS:"),
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
                    crate::csv_secs(c.first_byte_s),
                    c.bound_s,
                    c.error.as_deref().unwrap_or("").replace([',', '\n'], ";"),
                ));
            }
            std::fs::write(out.join("completions.csv"), csv)?;
            let mut csv = String::from(
                "t_s,completed,origin_egress_bytes,received_bytes,fetcher_sent_bytes,held_bytes,trading,busy_uplinks,\
                 rarest_piece_holders,cpu_cores\n",
            );
            for p in &r.series {
                csv.push_str(&format!(
                    "{:.2},{},{},{},{},{},{},{},{},{}\n",
                    p.t_s,
                    p.completed,
                    p.origin_bytes,
                    p.received_bytes,
                    p.fetcher_sent_bytes,
                    p.held_bytes,
                    p.trading,
                    p.busy_uplinks,
                    p.rarest_piece_holders,
                    p.cpu_cores.map_or(String::new(), |c| format!("{c:.2}"))
                ));
            }
            std::fs::write(out.join("timeseries.csv"), csv)?;
            let mut csv = String::from("piece,first_s,tenth_s,half_s,nine_tenths_s,all_s\n");
            for p in &r.pieces {
                let times = [p.first_s, p.tenth_s, p.half_s, p.nine_tenths_s, p.all_s].map(crate::csv_secs);
                csv.push_str(&format!("{},{}\n", p.piece, times.join(",")));
            }
            std::fs::write(out.join("pieces.csv"), csv)?;
            let times: Vec<f64> = r.completions.iter().filter(|c| c.ok).map(|c| c.seconds).collect();
            crate::plot::skip_if_empty(crate::plot::cdf(
                &out.join("completion-cdf"),
                // The curve is over the fetches that finished: the title says how many of all.
                &format!(
                    "Flash crowd: {} of {} fetchers done, {:.0} MiB blob",
                    times.len(),
                    r.fetchers,
                    r.blob_bytes as f64 / 1048576.0
                ),
                "completion time (s)",
                &times,
                &[crate::plot::Marker { x: r.t_min_s, label: format!("T_min = {:.1} s (fluid bound)", r.t_min_s) }],
            ))?;
        }
        ExperimentResult::ZipfCatalogue(r) => crate::zipf::write(out, r)?,
        ExperimentResult::Churn(r) => crate::churn::write(out, r)?,
        ExperimentResult::Regions(r) => crate::regions::write(out, r)?,
        ExperimentResult::LookupScaling { sizes } => {
            csv.push_str("nodes,node,found,seconds,first_provider_s,requests,answered,hops\n");
            let opt = |v: Option<String>| v.unwrap_or_default();
            for s in sizes {
                for l in &s.samples {
                    csv.push_str(&format!(
                        "{},{},{},{:.4},{},{},{},{}\n",
                        s.nodes,
                        l.node.0,
                        l.found,
                        l.seconds,
                        opt(l.first_provider_s.map(|v| format!("{v:.4}"))),
                        opt(l.requests.map(|v| v.to_string())),
                        opt(l.answered.map(|v| v.to_string())),
                        opt(l.hops.map(|v| v.to_string())),
                    ));
                }
            }
            std::fs::write(out.join("lookups.csv"), csv)?;
            let line = |name: &str, f: &dyn Fn(&LookupResult) -> f64| crate::plot::Series {
                name: name.into(),
                points: sizes.iter().map(|s| (s.nodes as f64, f(s))).collect(),
            };
            crate::plot::skip_if_empty(crate::plot::lines(
                &out.join("lookup-hops"),
                "Provider lookups: hops against network size",
                "nodes (log scale)",
                "hops to a provider record",
                &[
                    line("hops p50", &|s| s.hops_p50),
                    line("hops p90", &|s| s.hops_p90),
                    line("log2(N) / 4", &|s| (s.nodes as f64).log2() / 4.0),
                ],
                true,
            ))?;
            crate::plot::skip_if_empty(crate::plot::lines(
                &out.join("lookup-latency"),
                "Provider lookups: time to the first provider record",
                "nodes (log scale)",
                "seconds",
                &[line("p50", &|s| s.first_provider_p50_s), line("p90", &|s| s.first_provider_p90_s)],
                true,
            ))?;
        }
    }
    Ok(())
}

async fn flash_crowd(
    scenario: &Scenario,
    rng: &mut ChaCha8Rng,
    work: &Path,
    metrics: Option<&Path>,
    progress: &Progress,
) -> anyhow::Result<FlashCrowdResult> {
    let Experiment::FlashCrowd { blob_mib, seeder, timeout_s, .. } = scenario.experiment else {
        anyhow::bail!("not a flash crowd");
    };
    let count = scenario.nodes.count;
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let size = (blob_mib * 1024.0 * 1024.0) as u64;
    let hash = seed_blob(&cluster.handle(seeder), cluster.dir(), size, rng).await?;
    // The crowd hears of the blob once it is published: announced in the DHT.
    progress.set("announcing", 1);
    wait_announced(&cluster.handle(seeder), scale).await?;
    progress.tick();

    // The bounds, from the scenario's caps (emulated bytes per second).
    let f = size as f64;
    let rate = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
    let u_s = rate(scenario.caps(seeder).uplink);
    let fetchers: Vec<usize> = (0..count).filter(|&i| i != seeder).collect();
    let caps: Vec<crate::schedule::Caps> = (0..count)
        .map(|i| crate::schedule::Caps { uplink: scenario.caps(i).uplink, downlink: scenario.caps(i).downlink })
        .collect();
    let t_min = crate::schedule::fluid_bound(&caps, seeder, size);

    let seeder_id = cluster.nodes[seeder].id;
    let seeder_sent_before = cluster.net.traffic(seeder_id).0;
    let seeder_served_before = served_bytes(&cluster.handle(seeder));
    let received_before: u64 = fetchers.iter().map(|&i| cluster.net.traffic(cluster.nodes[i].id).1).sum();
    let sent_at_start: Vec<u64> = fetchers.iter().map(|&i| cluster.net.traffic(cluster.nodes[i].id).0).collect();
    let sent_before: u64 = sent_at_start.iter().sum();
    let geometry = shoal_node::protocol::Geometry::new(size)?;

    progress.set("fetching", fetchers.len());
    let finished = AtomicUsize::new(0);
    let finished = &finished;
    let dials_at_start = dials(&cluster);
    let cpu_at_start = CpuReading::now();
    let t0 = Instant::now();
    // Emulated seconds, as every duration a scenario gives.
    let deadline = Duration::from_secs_f64(timeout_s * scale);
    let tasks: Vec<_> = fetchers
        .iter()
        .map(|&i| {
            let handle = cluster.handle(i);
            // Each fetch runs on its node's thread, as the node's API would run it, not inside
            // this future.
            let fetch = cluster.spawn(i, async move {
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
                futures::join!(async { (fetch.await, t0.elapsed()) }, first_byte)
            });
            async move {
                let joined = fetch.await;
                // Counted however the task ended: the sampler stops once every fetch is counted,
                // and a task that failed must not leave it sampling for good.
                progress.tick();
                finished.fetch_add(1, Ordering::Relaxed);
                let (result, first) = joined.context("a fetch's task failed")?;
                anyhow::Ok((i, result, first))
            }
        })
        .collect();
    let sampler = async {
        let mut series = Vec::new();
        let mut queues = QueuePeaks::default();
        let mut spread: Vec<PieceSpread> = (0..geometry.piece_count())
            .map(|piece| PieceSpread {
                piece,
                first_s: None,
                tenth_s: None,
                half_s: None,
                nine_tenths_s: None,
                all_s: None,
            })
            .collect();
        let thresholds = PieceSpread::thresholds(fetchers.len());
        let per_series = (1.0 / SPREAD_SAMPLE_S).round() as usize;
        let mut last_sent = sent_at_start;
        let mut last_t: Option<f64> = None;
        let mut last_cpu: Option<CpuReading> = None;
        for tick in 0usize.. {
            let done = finished.load(Ordering::Relaxed);
            let t_s = t0.elapsed().as_secs_f64() / scale;
            let interval = last_t.map_or(0.0, |last| t_s - last);
            let in_series = tick % per_series == 0 || done == fetchers.len();
            let (mut sent, mut received, mut held, mut trading, mut busy_uplinks) = (0, 0, 0, 0, 0);
            let mut holders = vec![0usize; geometry.piece_count() as usize];
            queues.see(cluster.handle(seeder).load());
            for (k, &i) in fetchers.iter().enumerate() {
                queues.see(cluster.handle(i).load());
                let (s, r) = cluster.net.traffic(cluster.nodes[i].id);
                sent += s;
                received += r;
                if in_series {
                    let half = rate(scenario.caps(i).uplink) * interval / 2.0;
                    if interval > 0.0 && (s - last_sent[k]) as f64 >= half {
                        busy_uplinks += 1;
                    }
                    last_sent[k] = s;
                }
                if let Some(b) = cluster.handle(i).store().info(hash) {
                    if !b.pieces.is_empty() && !b.is_complete() {
                        trading += 1;
                    }
                    for piece in b.pieces.iter() {
                        held += geometry.piece_len(piece);
                        if let Some(n) = holders.get_mut(piece as usize) {
                            *n += 1;
                        }
                    }
                }
            }
            for (piece, &n) in spread.iter_mut().zip(&holders) {
                for (at, &threshold) in piece.times_mut().into_iter().zip(&thresholds) {
                    if at.is_none() && n >= threshold {
                        *at = Some(t_s);
                    }
                }
            }
            if in_series {
                let cpu = CpuReading::now();
                let cpu_cores = cpu.zip(last_cpu).map(|(now, last)| now.cores_since(last));
                last_cpu = cpu;
                series.push(CrowdSample {
                    t_s,
                    completed: done,
                    origin_bytes: cluster.net.traffic(seeder_id).0 - seeder_sent_before,
                    received_bytes: received - received_before,
                    fetcher_sent_bytes: sent - sent_before,
                    held_bytes: held,
                    trading,
                    busy_uplinks,
                    rarest_piece_holders: holders.iter().copied().min().unwrap_or(0),
                    cpu_cores,
                });
                last_t = Some(t_s);
            }
            if done == fetchers.len() {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(scale * SPREAD_SAMPLE_S)).await;
        }
        (series, spread, queues)
    };
    let (outcomes, (series, pieces, queues)) = futures::join!(futures::future::join_all(tasks), sampler);
    let outcomes = outcomes.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let fetch_cpu_cores = cpu_at_start.zip(CpuReading::now()).map(|(start, end)| end.cores_since(start));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sampled: Vec<f64> = series.iter().filter_map(|p| p.cpu_cores).collect();
    let cpu_saturated_share = (!sampled.is_empty())
        .then(|| sampled.iter().filter(|&&c| c >= SATURATED * cores as f64).count() as f64 / sampled.len() as f64);

    let mut completions = Vec::with_capacity(outcomes.len());
    for (i, (result, took), first) in outcomes {
        let id = &cluster.nodes[i].id;
        let node = cluster.handle(i);
        let error = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("timed out after {timeout_s} emulated s")),
        };
        // Held whole, and every byte read back and checked against the hash now (a store's
        // bitmap says what it verified on the way in; this checks what it kept).
        let complete = node.store().info(hash).is_some_and(|b| b.is_complete() && b.size == size)
            && node.store().check(hash).is_ok_and(|bad| bad.is_empty());
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
    let (opened, failed) = dials(&cluster);
    let (connections_opened, dials_failed) = (opened - dials_at_start.0, failed - dials_at_start.1);
    if let Some(dir) = metrics {
        cluster.save_metrics(dir)?;
    }
    let seeder_sent = cluster.net.traffic(seeder_id).0 - seeder_sent_before;
    let seeder_served = served_bytes(&cluster.handle(seeder)).saturating_sub(seeder_served_before);
    let received: u64 =
        fetchers.iter().map(|&i| cluster.net.traffic(cluster.nodes[i].id).1).sum::<u64>() - received_before;
    cluster.shutdown(progress).await;

    let mut times: Vec<f64> = completions.iter().filter(|c| c.ok).map(|c| c.seconds).collect();
    times.sort_by(f64::total_cmp);
    let max_s = times.last().copied().unwrap_or(f64::NAN);
    let mut firsts: Vec<f64> = completions.iter().filter(|c| c.ok).filter_map(|c| c.first_byte_s).collect();
    firsts.sort_by(f64::total_cmp);
    let mut spreads: Vec<f64> = pieces.iter().filter_map(PieceSpread::spread_s).collect();
    spreads.sort_by(f64::total_cmp);
    // After the crowd, so that the run draws the same numbers with or without it.
    let t_pieces = crate::schedule::whole_piece_bound(&caps, seeder, size);
    let t_schedule = crate::schedule::greedy_crowd(&caps, seeder, size, rng);
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
        first_byte_p50_s: firsts.first().map(|_| percentile(&firsts, 0.5)),
        first_byte_p90_s: firsts.first().map(|_| percentile(&firsts, 0.9)),
        first_byte_max_s: firsts.last().copied(),
        t_pieces_s: t_pieces,
        max_over_t_pieces: t_pieces.map(|t| max_s / t),
        t_schedule_s: t_schedule,
        origin_egress_copies: seeder_sent as f64 / f,
        origin_piece_copies: seeder_served as f64 / f,
        queues: Box::new(queues),
        peer_share: if received > 0 { 1.0 - seeder_sent as f64 / received as f64 } else { f64::NAN },
        completions,
        series,
        pieces_out_s: pieces.iter().try_fold(0.0, |last, p| p.first_s.map(|t| f64::max(last, t))),
        piece_spread_p50_s: spreads.first().map(|_| percentile(&spreads, 0.5)),
        piece_spread_max_s: spreads.last().copied(),
        pieces,
        connections_opened,
        dials_failed,
        cores,
        fetch_cpu_cores,
        cpu_saturated_share,
    })
}

/// Outbound connections opened and dials failed so far, summed over the nodes' metrics.
fn dials(cluster: &Cluster) -> (u64, u64) {
    let count = |text: &str, event: &str| {
        crate::metric(text, &format!("shoal_connections_total{{direction=\"out\",event=\"{event}\"}}")).unwrap_or(0.0)
            as u64
    };
    (0..cluster.nodes.len()).fold((0, 0), |(opened, failed), i| {
        let text = cluster.handle(i).metrics_text();
        (opened + count(&text, "opened"), failed + count(&text, "failed"))
    })
}

/// The bytes of pieces (with proofs) `node` served, from its metrics.
fn served_bytes(node: &NodeHandle) -> u64 {
    crate::metric(&node.metrics_text(), "shoal_served_bytes_total").map_or(0, |v| v as u64)
}

async fn lookup_scaling(
    scenario: &Scenario,
    count: usize,
    lookups: usize,
    rng: &mut ChaCha8Rng,
    work: &Path,
    metrics: Option<&Path>,
    progress: &Progress,
) -> anyhow::Result<LookupResult> {
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let provider = rng.random_range(0..count);
    let hash = seed_blob(&cluster.handle(provider), cluster.dir(), 4096, rng).await?;
    let provider_id = cluster.handle(provider).peer_id();
    progress.set("announcing", 1);
    wait_announced(&cluster.handle(provider), scale).await?;
    progress.tick();

    let others: Vec<usize> = (0..count).filter(|&i| i != provider).collect();
    let picked: Vec<usize> =
        rand::seq::index::sample(rng, others.len(), lookups.min(others.len())).into_iter().map(|j| others[j]).collect();
    progress.set(&format!("lookups at N={count}"), picked.len());
    let mut samples: Vec<LookupSample> = futures::stream::iter(picked.into_iter().map(|i| {
        let handle = cluster.handle(i);
        let id = cluster.nodes[i].id;
        async move {
            let t = Instant::now();
            let (found, stats) = match handle.lookup(hash).await {
                Ok((peers, stats)) => (peers.contains(&provider_id), stats),
                Err(_) => (false, None),
            };
            progress.tick();
            LookupSample {
                node: id,
                peer: handle.peer_id(),
                found,
                seconds: t.elapsed().as_secs_f64() / scale,
                first_provider_s: stats.as_ref().and_then(|s| s.first_provider).map(|d| d.as_secs_f64() / scale),
                requests: stats.as_ref().map(|s| s.requests),
                answered: stats.map(|s| s.answered),
                hops: None,
            }
        }
    }))
    .buffer_unordered(8)
    .collect()
    .await;

    // Replay each lookup over the routing tables as they are now.
    progress.set("snapshotting routing tables", count);
    let mut view = crate::hops::DhtView::default();
    for m in &cluster.nodes {
        let h = m.handle.clone();
        let snapshot = h.dht_snapshot(hash).await?;
        if snapshot.holds_provider_record {
            view.holders.insert(h.peer_id());
        }
        view.tables.insert(h.peer_id(), snapshot.routing_table);
        progress.tick();
    }
    let key = shoal_node::libp2p::kad::RecordKey::new(hash.as_bytes());
    for s in &mut samples {
        s.hops = view.hops(s.peer, &key);
    }
    let record_holders = view.holders.len();
    if let Some(dir) = metrics {
        cluster.save_metrics(dir)?;
    }
    cluster.shutdown(progress).await;

    samples.sort_by_key(|s| s.node);
    let sorted = |f: &dyn Fn(&LookupSample) -> Option<f64>| {
        let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let times = sorted(&|s| Some(s.seconds));
    let firsts = sorted(&|s| s.first_provider_s);
    let hops = sorted(&|s| s.hops.map(f64::from));
    let requests = sorted(&|s| s.requests.map(f64::from));
    Ok(LookupResult {
        nodes: count,
        lookups: samples.len(),
        found: samples.iter().filter(|s| s.found).count(),
        record_holders,
        p50_s: percentile(&times, 0.5),
        p90_s: percentile(&times, 0.9),
        max_s: times.last().copied().unwrap_or(f64::NAN),
        first_provider_p50_s: percentile(&firsts, 0.5),
        first_provider_p90_s: percentile(&firsts, 0.9),
        hops_p50: percentile(&hops, 0.5),
        hops_p90: percentile(&hops, 0.9),
        hops_max: hops.last().copied().unwrap_or(f64::NAN),
        requests_p50: percentile(&requests, 0.5),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seed_gives_the_nodes_the_same_peer_ids() {
        let scenario: Scenario = toml::from_str(
            r#"
            name = "ids"
            [network]
            regions = ["a"]
            latency_ms = [[1.0]]
            [nodes]
            count = 3
            settle_s = 0.0
            [experiment]
            kind = "flash-crowd"
            blob_mib = 1.0
            "#,
        )
        .expect("scenario");
        scenario.check().expect("valid");
        let work = tempfile::tempdir().expect("tempdir");
        let ids = |seed: u64| {
            let (scenario, work) = (&scenario, work.path());
            async move {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let cluster = Cluster::start(scenario, 3, &mut rng, work, &Progress::default()).await.expect("start");
                let ids: Vec<_> = (0..3).map(|i| cluster.handle(i).peer_id()).collect();
                cluster.shutdown(&Progress::default()).await;
                ids
            }
        };
        let first = ids(7).await;
        assert_eq!(first, ids(7).await, "the same seed gave other peer ids");
        assert_ne!(first, ids(8).await);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
