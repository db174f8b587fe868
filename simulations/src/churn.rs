//! `churn`: every node but a few providers fetches one blob while a share of them crash or leave
//! (and some crashed ones restart, and new nodes join). Measures the success rate over the nodes
//! still there at the end, and how long fetches took to recover.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use shoal_node::FetchProgress;
use shoal_node::protocol::Hash;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::run::{Cluster, Progress, percentile, wait_announced};
use crate::scenario::{Experiment, Scenario};

/// A churn run's figures. Times in emulated seconds since the fetches started.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    /// The blob's size in bytes.
    pub blob_bytes: u64,
    /// Providers (they never churn).
    pub providers: usize,
    /// Nodes that crashed.
    pub crashed: usize,
    /// Of which restarted (and fetched again, resuming).
    pub restarted: usize,
    /// Nodes that left cleanly.
    pub left: usize,
    /// Nodes that joined during the churn (and fetched).
    pub joined: usize,
    /// Share of all nodes (providers excepted) that crashed or left.
    pub churned_share: f64,
    /// Fetchers still there at the end (never churned, restarted, or joined): each must succeed.
    /// One that crashed or left is not counted, though its fetch had finished first.
    pub eligible: usize,
    /// Of which completed.
    pub succeeded: usize,
    /// `succeeded / eligible` (none if no fetch was eligible).
    pub success_rate: f64,
    /// Completion time of eligible fetches, median, each from its own start (a node that joined
    /// during the run from its join; one that restarted from the crowd's start, its downtime
    /// included).
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// Last.
    pub max_s: f64,
    /// From a fetch's start to its first verified byte (the lookup and the first answer), median
    /// over eligible fetches that got one; a restarted node's that got none before its crash
    /// from the crowd's start, its downtime included.
    pub first_byte_p50_s: f64,
    /// 99th percentile.
    pub first_byte_p99_s: f64,
    /// The longest a fetch went without a new verified byte once its first one came (what a
    /// lost source cost it), median over eligible fetches; one that never got a byte counts its
    /// whole run.
    pub stall_p50_s: f64,
    /// 99th percentile: how long recovering from a lost source took, at worst.
    pub stall_p99_s: f64,
    /// From a restart to the completed blob, median over the nodes restarted with their fetch
    /// unfinished.
    pub restart_to_done_p50_s: f64,
    /// Longest.
    pub restart_to_done_max_s: f64,
    /// The partition between two regions, if the scenario made one.
    pub partition: Option<PartitionFigures>,
    /// Per fetcher.
    #[serde(skip)]
    pub fetchers: Vec<Fetcher>,
    /// Once per second: (t, nodes up, fetches completed).
    #[serde(skip)]
    pub series: Vec<(f64, usize, usize)>,
}

/// What a partition between two regions (or a region and all the others) did to the fetches.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionFigures {
    /// The two regions, as the scenario named them (`*`: every other region).
    pub between: [String; 2],
    /// The providers' regions: which side of the cut held the blob.
    pub provider_regions: Vec<String>,
    /// When traffic between them was cut.
    pub at_s: f64,
    /// When it was repaired.
    pub repaired_s: f64,
    /// Bytes delivered across the cut while it held: none, if the cut held.
    pub bytes_across_while_cut: u64,
    /// Eligible fetches that completed while it was cut.
    pub completed_while_cut: usize,
    /// Eligible fetches that completed after the repair.
    pub completed_after: usize,
    /// From the repair to their completion, median over those.
    pub after_repair_p50_s: f64,
    /// Longest: how long recovering from the partition took.
    pub after_repair_max_s: f64,
}

/// One fetching node's story.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fetcher {
    /// Index in the cluster.
    pub node: usize,
    /// Its region's name.
    pub region: String,
    /// What happened to it: "stayed", "crashed", "restarted", "left" or "joined".
    pub fate: String,
    /// Whether it is expected to finish (it is there at the end).
    pub eligible: bool,
    /// Completed, and its last fetch did too: a node restarted after its fetch had finished
    /// fetches again, and fails if that fails.
    pub ok: bool,
    /// When its fetch started: 0 for the fetchers there from the start, when it joined for a
    /// node that joined during the run.
    pub started_s: f64,
    /// When it first completed.
    pub done_s: Option<f64>,
    /// When it restarted, if it did with its fetch cut short by the crash.
    pub restarted_s: Option<f64>,
    /// From its start to its first verified byte, if one came (see `first_byte_p50_s`).
    pub first_byte_s: Option<f64>,
    /// The longest gap between verified bytes, from the first one on (the whole run if none
    /// came); after a restart, from the restart if a byte came before the crash.
    pub stall_s: f64,
    /// The last error, if any.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Crash(usize),
    Leave(usize),
    Restart(usize),
    Join,
    /// Traffic between the partition's pairs of regions is cut.
    Cut,
    /// ... and repaired.
    Repair,
}

/// The fetches of a churn run: what each is after and where it records how it went.
struct Fetches {
    hash: Hash,
    /// One entry per node after the providers.
    fetchers: Arc<Mutex<Vec<Fetcher>>>,
    providers: usize,
    t0: Instant,
    scale: f64,
    deadline: Instant,
}

impl Fetches {
    /// Runs node `i`'s fetch on its thread, recording its progress into its entry.
    fn spawn(&self, cluster: &Cluster, i: usize) -> JoinHandle<()> {
        let Self { hash, ref fetchers, providers, t0, scale, deadline } = *self;
        let (handle, fetchers, slot) = (cluster.handle(i), fetchers.clone(), i - providers);
        cluster.spawn(i, async move {
            let (tx, mut rx) = watch::channel(FetchProgress::default());
            // Gaps are timed from the fetcher's first verified byte: before it, the fetch waits
            // on its lookup and first answer, which `first_byte_s` tells apart. It is recorded as
            // it comes, so that a fetch a crash cuts short keeps it; a restarted node that had
            // one times its gaps from its restart, its recovery included.
            let record = fetchers.clone();
            let watch_stalls = async move {
                let fetchers = || record.lock().unwrap_or_else(|e| e.into_inner());
                let mut timing = fetchers()[slot].first_byte_s.is_some();
                let (mut last, mut longest, mut bytes) = (Instant::now(), Duration::ZERO, 0);
                while rx.changed().await.is_ok() {
                    let p = rx.borrow_and_update().verified_bytes;
                    if p > bytes {
                        bytes = p;
                        if timing {
                            longest = longest.max(last.elapsed());
                        } else {
                            timing = true;
                            let at = t0.elapsed().as_secs_f64() / scale;
                            let f = &mut fetchers()[slot];
                            f.first_byte_s = Some(at - f.started_s);
                        }
                        last = Instant::now();
                    }
                }
                longest.max(last.elapsed())
            };
            let fetch = tokio::time::timeout_at(deadline.into(), handle.fetch(hash, Some(tx)));
            let (result, stall) = futures::join!(fetch, watch_stalls);
            let mut f = fetchers.lock().unwrap_or_else(|e| e.into_inner());
            let f = &mut f[slot];
            f.stall_s = f.stall_s.max(stall.as_secs_f64() / scale);
            match result {
                // A node restarted after its fetch had finished fetches again (from its own
                // store, or what the crash lost): its completion is the first one.
                Ok(Ok(_)) => {
                    if !f.ok {
                        f.done_s = Some(t0.elapsed().as_secs_f64() / scale);
                    }
                    f.ok = true;
                    f.error = None;
                }
                Ok(Err(e)) => (f.ok, f.error) = (false, Some(e.to_string())),
                Err(_) => (f.ok, f.error) = (false, Some("timed out".into())),
            }
        })
    }
}

pub(crate) async fn run(
    scenario: &Scenario,
    rng: &mut ChaCha8Rng,
    work: &Path,
    progress: &Progress,
) -> anyhow::Result<ChurnResult> {
    let Experiment::Churn {
        blob_mib,
        providers,
        churn_fraction,
        churn_window_s,
        crash_share,
        restart_share,
        downtime_s,
        join_fraction,
        timeout_s,
        partition,
    } = scenario.experiment.clone()
    else {
        anyhow::bail!("not a churn experiment");
    };
    let count = scenario.nodes.count;
    let scale = scenario.network.time_scale;
    let mut cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let size = (blob_mib * 1024.0 * 1024.0) as u64;

    // The same blob on every provider.
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    let path = cluster.dir().join("blob");
    std::fs::write(&path, &data)?;
    drop(data);
    let mut hash = None;
    for p in 0..providers {
        hash = Some(cluster.handle(p).add_path(&path).await?.hash);
    }
    std::fs::remove_file(&path)?;
    let hash = hash.ok_or_else(|| anyhow::anyhow!("no providers"))?;
    // The providers' records in place before anyone looks, as in the other experiments: what
    // the fetches then wait on is churn, not the DHT's first publication.
    for p in 0..providers {
        wait_announced(&cluster.handle(p), scale).await?;
    }

    // The churn schedule, seeded: who crashes or leaves, when, who restarts, when nodes join.
    let candidates: Vec<usize> = (providers..count).collect();
    let churners = ((candidates.len() as f64) * churn_fraction).round() as usize;
    let mut shuffled = candidates.clone();
    shuffled.shuffle(rng);
    let mut schedule: Vec<(f64, Event)> = Vec::new();
    for &i in shuffled.iter().take(churners) {
        let at = rng.random_range(0.0..churn_window_s.max(f64::MIN_POSITIVE));
        if rng.random_bool(crash_share.clamp(0.0, 1.0)) {
            schedule.push((at, Event::Crash(i)));
            if rng.random_bool(restart_share.clamp(0.0, 1.0)) {
                schedule.push((at + downtime_s, Event::Restart(i)));
            }
        } else {
            schedule.push((at, Event::Leave(i)));
        }
    }
    let joins = ((candidates.len() as f64) * join_fraction).round() as usize;
    for _ in 0..joins {
        schedule.push((rng.random_range(0.0..churn_window_s.max(f64::MIN_POSITIVE)), Event::Join));
    }
    // The pairs of regions a partition cuts apart.
    let cut: Vec<(usize, usize)> = match &partition {
        Some(p) => p.pairs(cluster.net.regions())?,
        None => Vec::new(),
    };
    if let Some(p) = &partition {
        schedule.push((p.at_s, Event::Cut));
        schedule.push((p.at_s + p.for_s, Event::Repair));
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));

    let fetchers: Arc<Mutex<Vec<Fetcher>>> = Arc::new(Mutex::new(
        candidates
            .iter()
            .map(|&i| Fetcher {
                node: i,
                region: cluster.region_name(cluster.nodes[i].id),
                fate: "stayed".into(),
                eligible: true,
                ..Default::default()
            })
            .collect(),
    ));
    let slot_of = |node: usize| node - providers;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout_s * scale);
    let fetches = Fetches { hash, fetchers: fetchers.clone(), providers, t0, scale, deadline };
    let mut running: Vec<Option<JoinHandle<()>>> =
        candidates.iter().map(|&i| Some(fetches.spawn(&cluster, i))).collect();

    progress.set("churning", schedule.len());
    let mut series = Vec::new();
    let completed =
        |f: &Arc<Mutex<Vec<Fetcher>>>| f.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|f| f.ok).count();
    let mut next_sample = 0.0;
    let mut events = schedule.into_iter().peekable();
    // Bytes delivered between the partition's regions: when cut, then how many while cut; and
    // when the cut and the repair ran (an event runs late behind a node's start).
    let mut across = 0;
    let (mut cut_at, mut repaired_at) = (None, None);
    let mut leaving = Vec::new();
    loop {
        let now_s = t0.elapsed().as_secs_f64() / scale;
        if now_s >= next_sample {
            let up = (0..cluster.nodes.len()).filter(|&i| cluster.is_up(i)).count();
            series.push((now_s, up, completed(&fetchers)));
            next_sample += 1.0;
        }
        let all_done = running.iter().flatten().all(JoinHandle::is_finished);
        if events.peek().is_none() && all_done {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        if let Some(&(at, event)) = events.peek()
            && now_s >= at
        {
            events.next();
            progress.tick();
            match event {
                Event::Crash(i) => {
                    // The node first, as a killed process goes: its fetch, aborted after, finds
                    // a closed store and marks nothing more.
                    cluster.crash(i);
                    if let Some(t) = running[slot_of(i)].take() {
                        t.abort();
                    }
                    let mut f = fetchers.lock().unwrap_or_else(|e| e.into_inner());
                    f[slot_of(i)].fate = "crashed".into();
                    f[slot_of(i)].eligible = false;
                }
                Event::Leave(i) => {
                    if let Some(t) = running[slot_of(i)].take() {
                        t.abort();
                    }
                    // Its drain runs beside the events that follow, as a process stopping
                    // does: awaited here, it held every later event back by up to its drain
                    // bound (10 emulated seconds).
                    leaving.extend(cluster.leave(i).map(tokio::spawn));
                    let mut f = fetchers.lock().unwrap_or_else(|e| e.into_inner());
                    f[slot_of(i)].fate = "left".into();
                    f[slot_of(i)].eligible = false;
                }
                Event::Restart(i) => {
                    cluster.restart(i, scenario, rng).await?;
                    {
                        let mut f = fetchers.lock().unwrap_or_else(|e| e.into_inner());
                        let f = &mut f[slot_of(i)];
                        f.fate = "restarted".into();
                        f.eligible = true;
                        // Its recovery is measured only if the crash cut its fetch short.
                        if !f.ok {
                            f.restarted_s = Some(t0.elapsed().as_secs_f64() / scale);
                        }
                    }
                    running[slot_of(i)] = Some(fetches.spawn(&cluster, i));
                }
                Event::Cut => {
                    for &(a, b) in &cut {
                        cluster.net.partition(a, b);
                    }
                    across = across_now(&cluster, &cut);
                    cut_at = Some(t0.elapsed().as_secs_f64() / scale);
                }
                Event::Repair => {
                    across = repair(&cluster, &cut, across);
                    repaired_at = Some(t0.elapsed().as_secs_f64() / scale);
                }
                Event::Join => {
                    let i = cluster.join(scenario, rng).await?;
                    fetchers.lock().unwrap_or_else(|e| e.into_inner()).push(Fetcher {
                        node: i,
                        region: cluster.region_name(cluster.nodes[i].id),
                        fate: "joined".into(),
                        eligible: true,
                        started_s: t0.elapsed().as_secs_f64() / scale,
                        ..Default::default()
                    });
                    debug_assert_eq!(slot_of(i), running.len());
                    running.push(Some(fetches.spawn(&cluster, i)));
                }
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A deadline that came first leaves nothing cut through the shutdown, nor a figure wrong.
    if let (Some(_), None) = (cut_at, repaired_at) {
        across = repair(&cluster, &cut, across);
        repaired_at = Some(t0.elapsed().as_secs_f64() / scale);
    }
    for t in running.into_iter().flatten().chain(leaving) {
        let _ = t.await;
    }
    let up = (0..cluster.nodes.len()).filter(|&i| cluster.is_up(i)).count();
    series.push((t0.elapsed().as_secs_f64() / scale, up, completed(&fetchers)));
    let provider_regions: Vec<String> = (0..providers).map(|p| cluster.region_name(cluster.nodes[p].id)).collect();
    cluster.shutdown(progress).await;

    let fetchers = std::mem::take(&mut *fetchers.lock().unwrap_or_else(|e| e.into_inner()));
    let eligible: Vec<&Fetcher> = fetchers.iter().filter(|f| f.eligible).collect();
    let sorted = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v
    };
    // Each from its own fetch's start: a node that joined late is timed from its join.
    let done = sorted(eligible.iter().filter_map(|f| Some(f.done_s? - f.started_s)).collect());
    let stalls = sorted(eligible.iter().map(|f| f.stall_s).collect());
    let first_bytes = sorted(eligible.iter().filter_map(|f| f.first_byte_s).collect());
    let recover = sorted(fetchers.iter().filter_map(|f| Some(f.done_s? - f.restarted_s?)).collect());
    let count_fate = |fate: &str| fetchers.iter().filter(|f| f.fate == fate).count();
    let restarted = count_fate("restarted");
    let crashed = count_fate("crashed") + restarted;
    let left = count_fate("left");
    let succeeded = eligible.iter().filter(|f| f.ok).count();
    Ok(ChurnResult {
        blob_bytes: size,
        providers,
        crashed,
        restarted,
        left,
        joined: count_fate("joined"),
        churned_share: (crashed + left) as f64 / candidates.len().max(1) as f64,
        eligible: eligible.len(),
        succeeded,
        success_rate: if eligible.is_empty() { f64::NAN } else { succeeded as f64 / eligible.len() as f64 },
        p50_s: percentile(&done, 0.5),
        p90_s: percentile(&done, 0.9),
        max_s: done.last().copied().unwrap_or(f64::NAN),
        first_byte_p50_s: percentile(&first_bytes, 0.5),
        first_byte_p99_s: percentile(&first_bytes, 0.99),
        stall_p50_s: percentile(&stalls, 0.5),
        stall_p99_s: percentile(&stalls, 0.99),
        restart_to_done_p50_s: percentile(&recover, 0.5),
        restart_to_done_max_s: recover.last().copied().unwrap_or(f64::NAN),
        partition: partition.zip(cut_at.zip(repaired_at)).map(|(p, (at, until))| {
            let done: Vec<f64> = eligible.iter().filter_map(|f| f.done_s).collect();
            let after = sorted(done.iter().filter(|&&d| d > until).map(|d| d - until).collect());
            PartitionFigures {
                between: p.between,
                provider_regions,
                at_s: at,
                repaired_s: until,
                bytes_across_while_cut: across,
                completed_while_cut: done.iter().filter(|&&d| (at..=until).contains(&d)).count(),
                completed_after: after.len(),
                after_repair_p50_s: percentile(&after, 0.5),
                after_repair_max_s: after.last().copied().unwrap_or(f64::NAN),
            }
        }),
        fetchers,
        series,
    })
}

/// Repairs every pair of regions in `pairs`; returns the bytes delivered across them since the
/// cut, when [`across_now`] counted `at_cut`.
fn repair(cluster: &Cluster, pairs: &[(usize, usize)], at_cut: u64) -> u64 {
    let across = across_now(cluster, pairs) - at_cut;
    for &(a, b) in pairs {
        cluster.net.repair(a, b);
    }
    across
}

/// Bytes delivered so far, both ways, between the regions of each pair in `pairs`.
fn across_now(cluster: &Cluster, pairs: &[(usize, usize)]) -> u64 {
    let net = &cluster.net;
    let pair = |&(a, b): &(usize, usize)| match a == b {
        true => net.region_traffic(a, a),
        false => net.region_traffic(a, b) + net.region_traffic(b, a),
    };
    pairs.iter().map(pair).sum()
}

/// Writes `fetchers.csv`, `timeseries.csv` and the completion chart.
pub(crate) fn write(out: &Path, r: &ChurnResult) -> anyhow::Result<()> {
    let mut csv =
        String::from("node,region,fate,eligible,ok,started_s,done_s,restarted_s,first_byte_s,stall_s,error\n");
    for f in &r.fetchers {
        csv.push_str(&format!(
            "{},{},{},{},{},{:.4},{},{},{},{:.4},{}\n",
            f.node,
            f.region,
            f.fate,
            f.eligible,
            f.ok,
            f.started_s,
            crate::csv_secs(f.done_s),
            crate::csv_secs(f.restarted_s),
            crate::csv_secs(f.first_byte_s),
            f.stall_s,
            f.error.as_deref().unwrap_or("").replace([',', '\n'], ";")
        ));
    }
    std::fs::write(out.join("fetchers.csv"), csv)?;
    let mut csv = String::from("t_s,nodes_up,completed\n");
    for (t, up, done) in &r.series {
        csv.push_str(&format!("{t:.2},{up},{done}\n"));
    }
    std::fs::write(out.join("timeseries.csv"), csv)?;
    let up: Vec<(f64, f64)> = r.series.iter().map(|(t, u, _)| (*t, *u as f64)).collect();
    let done: Vec<(f64, f64)> = r.series.iter().map(|(t, _, d)| (*t, *d as f64)).collect();
    crate::plot::skip_if_empty(crate::plot::lines(
        &out.join("churn"),
        "Churn: nodes up and fetches completed",
        "time (s)",
        "nodes",
        &[
            crate::plot::Series { name: "nodes up".into(), points: up },
            crate::plot::Series { name: "fetches completed".into(), points: done },
        ],
        false,
    ))?;
    Ok(())
}
