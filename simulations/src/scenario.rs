//! Scenario files: what to run, on which network, with which seed.
//!
//! ```toml
//! name = "flash-crowd"
//! seed = 1
//!
//! [network]
//! regions = ["eu", "us"]
//! latency_ms = [[5, 40], [40, 5]]   # one-way, row = from, column = to
//! uplink_mib_s = 2.0
//! downlink_mib_s = 8.0
//!
//! [nodes]
//! count = 50
//!
//! [experiment]
//! kind = "flash-crowd"
//! blob_mib = 16.0
//! ```

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::{LinkCaps, NetworkConfig};

const MIB: f64 = 1024.0 * 1024.0;

/// The range a scenario's time scale must fall in.
pub const MIN_TIME_SCALE: f64 = 0.01;
pub const MAX_TIME_SCALE: f64 = 1000.0;

/// The longest duration a scenario may give (about 115 days): anything longer is a mistake, and
/// past what a `Duration` holds it would panic instead of being refused.
pub const MAX_DURATION_S: f64 = 1e7;

/// The most nodes a scenario may run, those joining during it included: 1,000 take about 3.3 GiB
/// here, so ten times as many is past any machine this runs on.
pub const MAX_NODES: usize = 10_000;

/// The largest blob a scenario may give, in MiB: netsim makes each blob in memory before a node
/// adds it.
pub const MAX_BLOB_MIB: f64 = 4096.0;

/// The most blobs a catalogue may hold: each is made and added before the run starts.
pub const MAX_BLOBS: usize = 100_000;

/// The shortest interval between a time series' samples.
pub const MIN_SAMPLE_S: f64 = 1e-3;

/// Whether `s` is a duration a scenario may give: finite, not negative, at most
/// [`MAX_DURATION_S`].
fn duration(s: f64) -> bool {
    (0.0..=MAX_DURATION_S).contains(&s)
}

/// How long libp2p's Kademlia waits for one peer of a lookup before going on without it. It is
/// wall time, fixed in the crate (libp2p-kad 0.49), and not stretched by the time scale as the
/// nodes' own timers are.
pub const KAD_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// What is wrong with a scenario file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("{path} is not a valid scenario: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// The scenario parsed but does not make sense.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// A scenario: a network, a population of nodes and one experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for the results.
    pub name: String,
    /// The seed; `--seed` overrides it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// The emulated network.
    pub network: NetworkSpec,
    /// The nodes.
    #[serde(default)]
    pub nodes: NodesSpec,
    /// What to measure.
    pub experiment: Experiment,
}

/// The emulated network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Region names; nodes are placed in them uniformly at random (seeded).
    pub regions: Vec<String>,
    /// One-way latency in milliseconds from region `i` (row) to region `j` (column).
    pub latency_ms: Vec<Vec<f64>>,
    /// Every node's uplink cap in MiB/s; absent is unlimited.
    #[serde(default)]
    pub uplink_mib_s: Option<f64>,
    /// Every node's downlink cap in MiB/s; absent is unlimited.
    #[serde(default)]
    pub downlink_mib_s: Option<f64>,
    /// Wall time per unit of emulated time (scales latency and bandwidth together).
    #[serde(default = "one")]
    pub time_scale: f64,
}

fn one() -> f64 {
    1.0
}

/// The node population and how it joins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesSpec {
    /// How many nodes (the flash crowd's size, seeder included).
    pub count: usize,
    /// Each node's cache bound in MiB.
    pub cache_mib: u64,
    /// Each node's memory tier of hot pieces in MiB.
    pub hot_mib: u64,
    /// Each node's connection bound.
    pub max_connections: u32,
    /// How many random earlier nodes each node joins through.
    pub bootstrap_peers: usize,
    /// Milliseconds between two nodes' joins.
    pub join_stagger_ms: u64,
    /// How long the DHT may take to settle after the last join, in seconds of wall time.
    pub settle_s: f64,
    /// The node's lookup timeout in seconds of emulated time (stretched by the time scale).
    pub lookup_timeout_s: f64,
    /// How often each node refreshes its routing table, in seconds. Every refresh is a burst of
    /// Kademlia lookups; at a thousand nodes the default five minutes is a refresh every 0.3 s
    /// somewhere, so runs shorter than an hour may set it longer.
    pub dht_refresh_s: f64,
    /// Whether a DHT bootstrap refreshes every bucket (see `NodeConfig::refresh_buckets`). At a
    /// thousand nodes joining, the refresh is most of the CPU.
    pub refresh_buckets: bool,
    /// How long a node that published a blob holds a piece back from one requester while another
    /// online peer it sent the piece to can pass it on (`NodeConfig::spread_patience`), in seconds
    /// of emulated time; 0 turns holding back off.
    pub spread_patience_s: f64,
    /// The most peers one fetch asks at once (`NodeConfig::fetch_peers`).
    pub fetch_peers: usize,
    /// Whether nodes ping their connections (`NodeConfig::ping`). Off by default: the round-trip
    /// times only feed `shoal peers`, and ping's handler (both ends ping every new connection at
    /// once) was 7.4% of the CPU of a thousand-node crowd.
    pub ping: bool,
}

impl Default for NodesSpec {
    fn default() -> Self {
        Self {
            count: 10,
            cache_mib: 256,
            hot_mib: 4,
            max_connections: 64,
            bootstrap_peers: 3,
            join_stagger_ms: 20,
            settle_s: 10.0,
            lookup_timeout_s: 30.0,
            dht_refresh_s: 300.0,
            refresh_buckets: true,
            spread_patience_s: 30.0,
            fetch_peers: shoal_node::NodeConfig::new("").fetch_peers,
            ping: false,
        }
    }
}

/// A partition between two regions (a region and itself cuts it from itself; a region and `*`
/// from every other region): every connection between them is reset at its next frame, and dials
/// between them fail, from `at_s` after the fetches start until `for_s` later, when it is
/// repaired.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// The two regions, by name; the second may be `*`, every region but the first.
    pub between: [String; 2],
    /// When it is cut, in emulated seconds from the start of the fetches.
    pub at_s: f64,
    /// How long it lasts, in emulated seconds.
    pub for_s: f64,
}

impl Partition {
    /// The pairs of regions (indices into `regions`) it cuts apart.
    pub fn pairs(&self, regions: &[String]) -> Result<Vec<(usize, usize)>, ScenarioError> {
        let index = |name: &String| {
            regions.iter().position(|r| r == name).ok_or_else(|| {
                ScenarioError::Invalid(format!("partition.between names {name:?}, not a region of the network"))
            })
        };
        if self.between[0] == "*" {
            return Err(ScenarioError::Invalid("partition.between may name `*` second only".into()));
        }
        let a = index(&self.between[0])?;
        let pairs: Vec<(usize, usize)> = match self.between[1].as_str() {
            "*" => (0..regions.len()).filter(|&b| b != a).map(|b| (a, b)).collect(),
            _ => vec![(a, index(&self.between[1])?)],
        };
        if pairs.is_empty() {
            return Err(ScenarioError::Invalid("partition.between cuts nothing: the network has one region".into()));
        }
        Ok(pairs)
    }
}

/// The experiment to run once the nodes are up. Durations are emulated seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Experiment {
    /// Every node but the seeder fetches one blob at once.
    FlashCrowd {
        /// The blob's size in MiB.
        blob_mib: f64,
        /// The index of the node that holds the blob.
        #[serde(default)]
        seeder: usize,
        /// The seeder's uplink in MiB/s, if not the network's.
        #[serde(default)]
        seeder_uplink_mib_s: Option<f64>,
        /// How long all fetches may take, in emulated seconds.
        #[serde(default = "default_timeout")]
        timeout_s: f64,
    },
    /// At each network size, a sample of nodes looks up the providers of one blob.
    LookupScaling {
        /// The network sizes, each run on a fresh network.
        counts: Vec<usize>,
        /// How many nodes look up, per size.
        #[serde(default = "default_lookups")]
        lookups: usize,
    },
    /// A catalogue on a few origins, requested over time with Zipf popularity.
    ZipfCatalogue {
        /// Blobs in the catalogue.
        blobs: usize,
        /// Each blob's size in MiB.
        blob_mib: f64,
        /// Origin nodes (the first ones), each holding the whole catalogue.
        #[serde(default = "one_usize")]
        origins: usize,
        /// The Zipf exponent (1.0 is classic web popularity).
        #[serde(default = "one")]
        zipf_s: f64,
        /// How long nodes keep requesting, in emulated seconds.
        duration_s: f64,
        /// Each node's mean request rate (Poisson arrivals).
        requests_per_node_per_min: f64,
        /// The time series' interval, in emulated seconds.
        #[serde(default = "default_sample")]
        sample_s: f64,
    },
    /// Every node fetches one blob while a share of them crash, leave, restart or join.
    Churn {
        /// The blob's size in MiB.
        blob_mib: f64,
        /// Nodes (the first ones) that hold the blob and never churn.
        #[serde(default = "one_usize")]
        providers: usize,
        /// Share of the other nodes that crash or leave during the fetches.
        churn_fraction: f64,
        /// Churn events happen at uniform times in this many emulated seconds from the start.
        churn_window_s: f64,
        /// Of the churned nodes, the share that crash (the rest leave cleanly).
        #[serde(default = "half")]
        crash_share: f64,
        /// Of the crashed nodes, the share that restart (and resume their fetch).
        #[serde(default = "half")]
        restart_share: f64,
        /// How long a crashed node stays down before restarting, in emulated seconds.
        #[serde(default = "default_downtime")]
        downtime_s: f64,
        /// New nodes joining during the window, as a share of the fetchers.
        #[serde(default)]
        join_fraction: f64,
        /// How long all fetches may take, in emulated seconds.
        #[serde(default = "default_timeout")]
        timeout_s: f64,
        /// Traffic between two regions (or one region and every other) cut during the fetches,
        /// and repaired; none by default.
        #[serde(default)]
        partition: Option<Partition>,
    },
    /// One seeder, fetchers in every region arriving over a window.
    Regions {
        /// The blob's size in MiB.
        blob_mib: f64,
        /// The index of the node that holds the blob.
        #[serde(default)]
        seeder: usize,
        /// Fetchers start at uniform times in this many emulated seconds.
        arrival_window_s: f64,
        /// How long one fetch may take, in emulated seconds.
        #[serde(default = "default_timeout")]
        timeout_s: f64,
    },
}

impl Experiment {
    /// The experiment's time limit, if it has one.
    fn timeout_s(&self) -> Option<f64> {
        match self {
            Self::FlashCrowd { timeout_s, .. } | Self::Churn { timeout_s, .. } | Self::Regions { timeout_s, .. } => {
                Some(*timeout_s)
            }
            Self::LookupScaling { .. } | Self::ZipfCatalogue { .. } => None,
        }
    }

    /// The size of the blob (or of each blob) it fetches, if it names one.
    fn blob_mib(&self) -> Option<f64> {
        match self {
            Self::FlashCrowd { blob_mib, .. }
            | Self::ZipfCatalogue { blob_mib, .. }
            | Self::Churn { blob_mib, .. }
            | Self::Regions { blob_mib, .. } => Some(*blob_mib),
            Self::LookupScaling { .. } => None,
        }
    }
}

fn one_usize() -> usize {
    1
}

fn half() -> f64 {
    0.5
}

fn default_sample() -> f64 {
    5.0
}

fn default_downtime() -> f64 {
    5.0
}

fn default_timeout() -> f64 {
    600.0
}

fn default_lookups() -> usize {
    50
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        let s: Scenario = toml::from_str(&text)
            .map_err(|e| ScenarioError::Parse { path: path.display().to_string(), source: Box::new(e) })?;
        s.check()?;
        Ok(s)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), ScenarioError> {
        let invalid = |m: String| Err(ScenarioError::Invalid(m));
        let r = self.network.regions.len();
        if r == 0 {
            return invalid("network.regions is empty".into());
        }
        for (i, name) in self.network.regions.iter().enumerate() {
            if name == "*" || self.network.regions[..i].contains(name) {
                return invalid(format!("network.regions names {name:?} twice, or names a region `*`"));
            }
        }
        if self.network.latency_ms.len() != r || self.network.latency_ms.iter().any(|row| row.len() != r) {
            return invalid(format!("network.latency_ms must be {r} × {r}"));
        }
        if self.network.latency_ms.iter().flatten().any(|l| !(l.is_finite() && *l >= 0.0)) {
            return invalid("latencies must be non-negative".into());
        }
        // The nodes stretch their timers by it: far outside this range they would be zero or
        // would overflow the clock.
        if !(MIN_TIME_SCALE..=MAX_TIME_SCALE).contains(&self.network.time_scale) {
            return invalid(format!("network.time_scale must be between {MIN_TIME_SCALE} and {MAX_TIME_SCALE}"));
        }
        // The longest request of a lookup, to a peer not yet connected: one round trip to
        // connect (see `net`), one for the request. Kademlia skips a peer that has not answered
        // within its fixed wall-clock timeout, and a lookup that skips every far peer misses the
        // records they hold: at a time scale of 32 with 110 ms between regions, 28 of a
        // 100-node crowd's 99 fetchers never found the seeder.
        let longest_ms = self.network.latency_ms.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
        // In seconds as floats: a huge latency must be refused, not overflow a `Duration`.
        let two_round_trips_s = 4.0 * longest_ms / 1000.0;
        let request_s = two_round_trips_s * self.network.time_scale;
        if request_s > KAD_PEER_TIMEOUT.as_secs_f64() {
            let most = KAD_PEER_TIMEOUT.as_secs_f64() / two_round_trips_s;
            return invalid(format!(
                "network.time_scale {} stretches a request to a new peer over the longest link \
                 ({longest_ms} ms one way, two round trips) to {:.1} s, past Kademlia's {} s for \
                 a peer to answer: lookups would skip far peers; use a time scale of at most {most:.1}",
                self.network.time_scale,
                request_s,
                KAD_PEER_TIMEOUT.as_secs(),
            ));
        }
        // At least a byte a second once in bytes: a cap that rounds to 0 would stop the link.
        let positive = |x: Option<f64>| x.is_none_or(|v| v.is_finite() && v * MIB >= 1.0);
        if !positive(self.network.uplink_mib_s) || !positive(self.network.downlink_mib_s) {
            return invalid("caps must be positive (at least a byte a second)".into());
        }
        let n = &self.nodes;
        let durations = [n.settle_s, n.lookup_timeout_s, n.dht_refresh_s, n.spread_patience_s];
        if durations.iter().any(|d| !duration(*d)) {
            return invalid(format!(
                "nodes.settle_s, lookup_timeout_s, dht_refresh_s and spread_patience_s must be between 0 and {MAX_DURATION_S} s"
            ));
        }
        if let Some(timeout) = self.experiment.timeout_s()
            && !(duration(timeout) && timeout > 0.0)
        {
            return invalid(format!("experiment.timeout_s must be above 0 and at most {MAX_DURATION_S} s"));
        }
        if let Some(mib) = self.experiment.blob_mib()
            && !(mib.is_finite() && mib * MIB >= 1.0 && mib <= MAX_BLOB_MIB)
        {
            return invalid(format!(
                "experiment.blob_mib must be at least a byte and at most {MAX_BLOB_MIB} MiB (netsim makes a blob in memory)"
            ));
        }
        if self.nodes.count > MAX_NODES {
            return invalid(format!("nodes.count must be at most {MAX_NODES}"));
        }
        if !(1..=shoal_node::config::MAX_FETCH_PEERS).contains(&n.fetch_peers) {
            return invalid(format!("nodes.fetch_peers must be between 1 and {}", shoal_node::config::MAX_FETCH_PEERS));
        }
        match &self.experiment {
            Experiment::FlashCrowd { blob_mib, seeder, seeder_uplink_mib_s, .. } => {
                if self.nodes.count < 2 {
                    return invalid("a flash crowd needs at least 2 nodes".into());
                }
                if *seeder >= self.nodes.count {
                    return invalid(format!("seeder {seeder} is not one of the {} nodes", self.nodes.count));
                }
                if !(blob_mib.is_finite() && *blob_mib > 0.0 && positive(*seeder_uplink_mib_s)) {
                    return invalid(
                        "blob_mib and seeder_uplink_mib_s must be positive (at least a byte a second)".into(),
                    );
                }
            }
            Experiment::LookupScaling { counts, lookups } => {
                if counts.is_empty() || counts.iter().any(|c| !(2..=MAX_NODES).contains(c)) || *lookups == 0 {
                    return invalid(format!("lookup-scaling needs counts of 2 to {MAX_NODES} nodes and some lookups"));
                }
            }
            Experiment::ZipfCatalogue {
                blobs,
                blob_mib,
                origins,
                zipf_s,
                duration_s,
                requests_per_node_per_min,
                sample_s,
            } => {
                if !(1..=MAX_BLOBS).contains(blobs) || *origins == 0 || *origins >= self.nodes.count {
                    return invalid(format!(
                        "zipf-catalogue needs 1 to {MAX_BLOBS} blobs, and origins fewer than the nodes"
                    ));
                }
                let pos = |v: f64| v.is_finite() && v > 0.0;
                if !(pos(*blob_mib) && pos(*duration_s) && pos(*requests_per_node_per_min) && pos(*sample_s)) {
                    return invalid(
                        "blob_mib, duration_s, requests_per_node_per_min, sample_s must be positive".into(),
                    );
                }
                if !(duration(*duration_s) && duration(*sample_s) && *sample_s >= MIN_SAMPLE_S) {
                    return invalid(format!(
                        "duration_s must be at most {MAX_DURATION_S} s, sample_s between {MIN_SAMPLE_S} and {MAX_DURATION_S} s"
                    ));
                }
                if !(zipf_s.is_finite() && *zipf_s >= 0.0) {
                    return invalid("zipf_s must be non-negative".into());
                }
            }
            Experiment::Churn {
                blob_mib,
                providers,
                churn_fraction,
                churn_window_s,
                crash_share,
                restart_share,
                downtime_s,
                join_fraction,
                partition,
                timeout_s,
            } => {
                if let Some(p @ Partition { at_s, for_s, .. }) = partition {
                    if at_s + for_s > *timeout_s {
                        return invalid("partition.at_s + for_s must be within timeout_s".into());
                    }
                    p.pairs(&self.network.regions)?;
                    if !(duration(*at_s) && duration(*for_s) && *for_s > 0.0) {
                        return invalid(format!(
                            "partition.at_s must be between 0 and {MAX_DURATION_S} s, for_s above 0 and at most that"
                        ));
                    }
                }
                if *providers == 0 || *providers >= self.nodes.count {
                    return invalid("churn needs at least one provider and fewer providers than nodes".into());
                }
                let share = |v: f64| (0.0..=1.0).contains(&v);
                if !(share(*churn_fraction) && share(*crash_share) && share(*restart_share)) {
                    return invalid("churn_fraction, crash_share and restart_share are shares in 0..=1".into());
                }
                let nonneg = |v: f64| v.is_finite() && v >= 0.0;
                let positive = blob_mib.is_finite() && *blob_mib > 0.0;
                if !(positive && duration(*churn_window_s) && duration(*downtime_s) && nonneg(*join_fraction)) {
                    return invalid(format!(
                        "blob_mib must be positive, join_fraction non-negative, and the window and downtime between 0 and {MAX_DURATION_S} s"
                    ));
                }
                if self.nodes.count as f64 * (1.0 + join_fraction) > MAX_NODES as f64 {
                    return invalid(format!("the nodes and those joining must be at most {MAX_NODES}"));
                }
            }
            Experiment::Regions { blob_mib, seeder, arrival_window_s, .. } => {
                if self.nodes.count < 2 || *seeder >= self.nodes.count {
                    return invalid("regions needs at least 2 nodes and a seeder among them".into());
                }
                if !(blob_mib.is_finite() && *blob_mib > 0.0 && duration(*arrival_window_s)) {
                    return invalid(format!(
                        "blob_mib must be positive and arrival_window_s between 0 and {MAX_DURATION_S} s"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Runs the scenario at `count` nodes instead (`--nodes`).
    pub fn with_node_count(mut self, count: usize) -> Self {
        self.nodes.count = count;
        if let Experiment::LookupScaling { counts, .. } = &mut self.experiment {
            *counts = vec![count];
        }
        self
    }

    /// The network's shape.
    pub fn network_config(&self) -> NetworkConfig {
        NetworkConfig {
            regions: self.network.regions.clone(),
            latency: self
                .network
                .latency_ms
                .iter()
                .map(|row| row.iter().map(|ms| Duration::from_secs_f64(ms / 1000.0)).collect())
                .collect(),
            time_scale: self.network.time_scale,
        }
    }

    /// The caps of node `index` in bytes per second.
    pub fn caps(&self, index: usize) -> LinkCaps {
        let bytes = |mib: Option<f64>| mib.map(|m| (m * MIB) as u64);
        let mut uplink = self.network.uplink_mib_s;
        if let Experiment::FlashCrowd { seeder, seeder_uplink_mib_s: Some(s), .. } = &self.experiment
            && *seeder == index
        {
            uplink = Some(*s);
        }
        LinkCaps { uplink: bytes(uplink), downlink: bytes(self.network.downlink_mib_s) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn a_bad_matrix_is_refused() {
        let text = r#"
            name = "x"
            [network]
            regions = ["a", "b"]
            latency_ms = [[1, 2]]
            [experiment]
            kind = "flash-crowd"
            blob_mib = 1.0
        "#;
        let s: Scenario = toml::from_str(text).expect("parses");
        assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))));
    }

    #[test]
    fn a_negative_duration_is_refused_not_a_panic() {
        let text = r#"
            name = "x"
            [network]
            regions = ["a"]
            latency_ms = [[1]]
            [nodes]
            spread_patience_s = -1.0
            [experiment]
            kind = "flash-crowd"
            blob_mib = 1.0
        "#;
        let mut s: Scenario = toml::from_str(text).expect("parses");
        assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))));
        s.nodes.spread_patience_s = 0.0;
        s.nodes.settle_s = f64::NAN;
        assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))));
        s.nodes.settle_s = 1.0;
        s.check().expect("valid");
        for bad in [0.0, 1e-9, 1e300, f64::NAN] {
            s.network.time_scale = bad;
            assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))), "time_scale {bad}");
        }
        s.network.time_scale = 16.0;
        s.check().expect("valid");
        s.nodes.fetch_peers = 0;
        assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))), "a fetch asks at least one peer");
        s.nodes.fetch_peers = 8;
        // Each of these panicked once the nodes had joined, minutes into a large run.
        let refused = |s: &Scenario, what: &str| {
            assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))), "{what} accepted");
        };
        let mut t = s.clone();
        t.nodes.settle_s = 1e300;
        refused(&t, "settle_s = 1e300");
        for bad in [f64::INFINITY, -1.0, 0.0, f64::NAN] {
            let mut t = s.clone();
            if let Experiment::FlashCrowd { timeout_s, .. } = &mut t.experiment {
                *timeout_s = bad;
            }
            refused(&t, &format!("timeout_s = {bad}"));
        }
        let mut t = s.clone();
        t.network.uplink_mib_s = Some(1e-7);
        refused(&t, "an uplink that rounds to 0 bytes a second");
        let mut t = s.clone();
        if let Experiment::FlashCrowd { blob_mib, .. } = &mut t.experiment {
            *blob_mib = 3e6;
        }
        refused(&t, "a 3 TiB blob");
        // Nor these, which ran the machine out of memory instead of saying what was wrong.
        let mut t = s.clone();
        if let Experiment::FlashCrowd { blob_mib, .. } = &mut t.experiment {
            *blob_mib = 1e6;
        }
        refused(&t, "a 1 TiB blob, made in memory");
        let mut t = s.clone();
        t.nodes.count = usize::MAX;
        refused(&t, "usize::MAX nodes");
        let mut t = s.clone();
        t.experiment = Experiment::Churn {
            blob_mib: 1.0,
            providers: 1,
            churn_fraction: 0.3,
            churn_window_s: 10.0,
            crash_share: 0.5,
            restart_share: 0.5,
            downtime_s: 1.0,
            join_fraction: 1e12,
            timeout_s: 60.0,
            partition: None,
        };
        refused(&t, "join_fraction = 1e12");
        if let Experiment::Churn { join_fraction, partition, .. } = &mut t.experiment {
            *join_fraction = 0.1;
            *partition = Some(Partition { between: ["eu".into(), "mars".into()], at_s: 1.0, for_s: 1.0 });
        }
        refused(&t, "a partition with a region that is not the network's");
        let partition = |at_s, for_s| Some(Partition { between: ["a".into(), "a".into()], at_s, for_s });
        if let Experiment::Churn { partition: p, .. } = &mut t.experiment {
            *p = partition(50.0, 20.0);
        }
        refused(&t, "a partition repaired after the run's timeout");
        if let Experiment::Churn { partition: p, .. } = &mut t.experiment {
            *p = partition(1.0, 1.0);
        }
        t.check().expect("a partition within the run");
        let regions: Vec<String> = ["eu", "us", "ap"].map(String::from).into();
        let cut = |b: &str| Partition { between: ["us".into(), b.into()], at_s: 1.0, for_s: 1.0 }.pairs(&regions);
        assert_eq!(cut("*").expect("a region from the others"), vec![(1, 0), (1, 2)]);
        assert_eq!(cut("ap").expect("two regions"), vec![(1, 2)]);
        assert!(cut("mars").is_err());
        let first = Partition { between: ["*".into(), "us".into()], at_s: 1.0, for_s: 1.0 };
        assert!(first.pairs(&regions).is_err(), "`*` first");
        let alone = Partition { between: ["eu".into(), "*".into()], at_s: 1.0, for_s: 1.0 };
        assert!(alone.pairs(&regions[..1]).is_err(), "a cut of nothing");
        let mut twice = t.clone();
        twice.network.regions = vec!["a".into(), "a".into()];
        refused(&twice, "a region named twice");
        let mut t = s.clone();
        t.experiment = Experiment::ZipfCatalogue {
            blobs: usize::MAX,
            blob_mib: 1.0,
            origins: 1,
            zipf_s: 1.0,
            duration_s: 10.0,
            requests_per_node_per_min: 1.0,
            sample_s: 1.0,
        };
        refused(&t, "usize::MAX blobs");
        s.check().expect("still valid");
    }

    #[test]
    fn a_time_scale_that_outlasts_kademlias_wait_for_a_peer_is_refused() {
        let text = r#"
            name = "x"
            [network]
            regions = ["eu", "ap"]
            latency_ms = [[5, 110], [110, 5]]
            time_scale = 16.0
            [experiment]
            kind = "flash-crowd"
            blob_mib = 1.0
        "#;
        let mut s: Scenario = toml::from_str(text).expect("parses");
        // Two round trips between the regions: 0.44 s, 7.0 s of wall time at 16.
        s.check().expect("valid");
        // 14.1 s at 32: Kademlia would stop waiting for the far region's peers after 10.
        s.network.time_scale = 32.0;
        match s.check() {
            Err(ScenarioError::Invalid(m)) => assert!(m.contains("at most 22.7"), "{m}"),
            other => panic!("accepted: {other:?}"),
        }
        s.network.latency_ms = vec![vec![5.0, 50.0], vec![50.0, 5.0]];
        s.check().expect("valid: 6.4 s");
        s.network.latency_ms = vec![vec![5.0, 1e300], vec![1e300, 5.0]];
        assert!(matches!(s.check(), Err(ScenarioError::Invalid(_))), "refused, not a panic");
    }
}
