//! Validation: one small flash crowd, run in the emulator and as real `shoal node` processes over
//! loopback QUIC, side by side.
//!
//! Loopback has no latency and no bandwidth limit of its own, so both runs use one region with
//! (almost) no latency, and the real nodes get the scenario's caps as their own `--upload-rate`
//! and `--download-rate`. What differs, and why the figures may:
//! - the emulator caps every byte on the link (yamux and Kademlia included) with buckets that
//!   never burst; a real node caps only transfer payload, with a token bucket of 64 KiB;
//! - QUIC (with its own flow control and TLS) against yamux over the emulated link;
//! - the real run's completion time includes starting the `shoal get` process and its API call.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::run::{ExperimentResult, RunOptions, percentile, run};
use crate::scenario::{Experiment, NetworkSpec, Scenario};

/// Both runs' figures. Times in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    /// Nodes, seeder included.
    pub nodes: usize,
    /// The blob's size in bytes.
    pub blob_bytes: u64,
    /// The fluid bound of the last completion.
    pub t_min_s: f64,
    /// The emulator's figures.
    pub netsim: Side,
    /// The real processes' figures.
    pub real: Side,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Fetches that completed with the right bytes.
    pub succeeded: usize,
    /// Completion time, median.
    pub p50_s: f64,
    /// Last completion.
    pub max_s: f64,
    /// `max_s / t_min_s`.
    pub max_over_t_min: f64,
    /// The pieces (with their proofs) the seeder served, in copies of the blob: its
    /// `shoal_served_bytes_total`, on both sides.
    pub origin_piece_copies: f64,
}

/// The scenario as both runs see it: one region, 0.05 ms of latency.
fn flattened(s: &Scenario) -> Scenario {
    let mut s = s.clone();
    s.network = NetworkSpec {
        regions: vec!["loopback".into()],
        latency_ms: vec![vec![0.05]],
        time_scale: 1.0,
        ..s.network.clone()
    };
    s
}

/// Runs `scenario` (a flash crowd) both ways; `shoal` is the node binary.
pub async fn validate(scenario: &Scenario, shoal: &Path, seed: u64, work: &Path) -> anyhow::Result<Validation> {
    let Experiment::FlashCrowd { blob_mib, seeder, .. } = scenario.experiment else {
        bail!("validation runs a flash-crowd scenario");
    };
    if seeder != 0 {
        bail!("validation expects the seeder to be node 0");
    }
    let s = flattened(scenario);
    s.check()?;
    let summary = run(&s, &RunOptions { out: None, seed: Some(seed), progress: false }).await?;
    let ExperimentResult::FlashCrowd(sim) = summary.result else { bail!("not a flash crowd") };
    let netsim = Side {
        succeeded: sim.succeeded,
        p50_s: sim.p50_s,
        max_s: sim.max_s,
        max_over_t_min: sim.max_over_t_min,
        origin_piece_copies: sim.origin_piece_copies,
    };
    let size = (blob_mib * 1024.0 * 1024.0) as u64;
    let shoal = shoal.to_owned();
    let work = work.to_owned();
    let s2 = s.clone();
    let t_min = sim.t_min_s;
    let real = tokio::task::spawn_blocking(move || real_crowd(&s2, &shoal, seed, &work, size, t_min)).await??;
    Ok(Validation { nodes: s.nodes.count, blob_bytes: size, t_min_s: sim.t_min_s, netsim, real })
}

/// A running `shoal node`, killed when dropped (or when the run is interrupted).
struct Proc {
    _process: crate::cleanup::Process,
    dir: PathBuf,
    addr: String,
}

fn start(
    shoal: &Path,
    dir: &Path,
    up: Option<u64>,
    down: Option<u64>,
    bootstrap: Option<&str>,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new(shoal);
    cmd.args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
        .env("SHOAL_DATA_DIR", dir)
        .env_remove("SHOAL_API")
        .env_remove("SHOAL_BOOTSTRAP")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(u) = up {
        cmd.args(["--upload-rate", &u.to_string()]);
    }
    if let Some(d) = down {
        cmd.args(["--download-rate", &d.to_string()]);
    }
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", shoal.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut proc =
        Proc { _process: crate::cleanup::Process::register(child), dir: dir.to_owned(), addr: String::new() };
    let deadline = Instant::now() + Duration::from_secs(20);
    while proc.addr.is_empty() || !dir.join("api").exists() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("a node did not start within 20 s");
        }
        if let Ok(line) = rx.recv_timeout(left.min(Duration::from_millis(100)))
            && let Some(a) = line.strip_prefix("listening: ")
            && proc.addr.is_empty()
        {
            proc.addr = a.to_owned();
        }
    }
    Ok(proc)
}

fn cli(shoal: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(shoal).args(args).env("SHOAL_DATA_DIR", dir).env_remove("SHOAL_API").output()?;
    if !out.status.success() {
        bail!("shoal {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The seeder's `shoal_served_bytes_total`, from its API.
fn served_bytes(dir: &Path) -> anyhow::Result<f64> {
    let api = std::fs::read_to_string(dir.join("api"))?;
    let mut stream = TcpStream::connect(api.trim())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", api.trim())?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    crate::metric(&body, "shoal_served_bytes_total").context("no shoal_served_bytes_total in /metrics")
}

/// The real processes' crowd; `t_min` is the fluid bound of the same scenario.
fn real_crowd(s: &Scenario, shoal: &Path, seed: u64, work: &Path, size: u64, t_min: f64) -> anyhow::Result<Side> {
    let dir = tempfile::Builder::new().prefix("shoal-validate-").tempdir_in(work)?;
    let _registered = crate::cleanup::Dir::register(dir.path());
    let n = s.nodes.count;
    let seeder_caps = s.caps(0);
    let seeder = start(shoal, &dir.path().join("0"), seeder_caps.uplink, seeder_caps.downlink, None)?;
    let mut nodes = Vec::with_capacity(n - 1);
    for i in 1..n {
        let caps = s.caps(i);
        nodes.push(start(shoal, &dir.path().join(i.to_string()), caps.uplink, caps.downlink, Some(&seeder.addr))?);
    }
    let mut data = vec![0u8; size as usize];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let file = dir.path().join("blob");
    std::fs::write(&file, &data)?;
    let added = cli(shoal, &seeder.dir, &["add", &file.display().to_string()])?;
    let hash = added.split_whitespace().next().context("shoal add printed no hash")?.to_owned();
    // Let the announcement reach the DHT.
    std::thread::sleep(Duration::from_secs(2));
    let before = served_bytes(&seeder.dir)?;
    let gets: Vec<_> = nodes
        .iter()
        .map(|p| {
            let (shoal, dir, hash) = (shoal.to_owned(), p.dir.clone(), hash.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                let out = dir.join("out");
                let ok = cli(&shoal, &dir, &["get", &hash, "-o", &out.display().to_string()]).is_ok();
                (ok, t.elapsed().as_secs_f64(), out)
            })
        })
        .collect();
    let mut times = Vec::new();
    for g in gets {
        let (ok, secs, out) = g.join().map_err(|_| anyhow::anyhow!("a get thread panicked"))?;
        if ok && std::fs::read(&out).is_ok_and(|b| b == data) {
            times.push(secs);
        }
    }
    let served = served_bytes(&seeder.dir)? - before;
    drop(nodes);
    drop(seeder);
    times.sort_by(f64::total_cmp);
    let max_s = times.last().copied().unwrap_or(f64::NAN);
    Ok(Side {
        succeeded: times.len(),
        p50_s: percentile(&times, 0.5),
        max_s,
        max_over_t_min: max_s / t_min,
        origin_piece_copies: served / size as f64,
    })
}
