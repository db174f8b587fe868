//! `regions`: one seeder, and fetchers spread over the regions arriving over a window, so that
//! copies exist in every region by the time most fetchers ask. Measures the share of the bytes
//! delivered (the blob's, and the little control traffic beside) that came from the receiver's own
//! region, beside what picking peers at random would give.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::run::{Cluster, Progress, percentile, seed_blob, wait_announced};
use crate::scenario::{Experiment, Scenario};

/// A regions run's figures. Times in emulated seconds from each fetcher's own start.
#[derive(Debug, Clone, Serialize)]
pub struct RegionsResult {
    /// The blob's size in bytes.
    pub blob_bytes: u64,
    /// Fetchers.
    pub fetchers: usize,
    /// Fetches that completed.
    pub succeeded: usize,
    /// Bytes delivered during the run, between all regions and within each (framing excluded).
    pub delivered_bytes: u64,
    /// Share of the bytes delivered during the run that came from the receiver's own region.
    pub own_region_share: f64,
    /// The same share if every node got its bytes from another node picked at random:
    /// Σ (n_r / N)·(n_r − 1) / (N − 1), over the regions' node counts n_r.
    pub random_pick_share: f64,
    /// Per region.
    pub regions: Vec<RegionFigures>,
    /// Completion times, per region name.
    #[serde(skip)]
    pub times: Vec<(String, Vec<f64>)>,
}

/// One region's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RegionFigures {
    /// Its name.
    pub name: String,
    /// Nodes in it.
    pub nodes: usize,
    /// Share of the bytes its nodes received that came from inside it.
    pub own_share: f64,
    /// Completion time, median.
    pub p50_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
}

pub(crate) async fn run(
    scenario: &Scenario,
    rng: &mut ChaCha8Rng,
    work: &Path,
    progress: &Progress,
) -> anyhow::Result<RegionsResult> {
    let Experiment::Regions { blob_mib, seeder, arrival_window_s, timeout_s, .. } = scenario.experiment.clone() else {
        anyhow::bail!("not a regions experiment");
    };
    let count = scenario.nodes.count;
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let size = (blob_mib * 1024.0 * 1024.0) as u64;
    let hash = seed_blob(&cluster.handle(seeder), cluster.dir(), size, rng).await?;
    progress.set("announcing", 1);
    wait_announced(&cluster.handle(seeder), scale).await?;
    progress.tick();
    let r = cluster.net.regions().len();
    let matrix = |c: &Cluster| -> Vec<u64> {
        (0..r).flat_map(|from| (0..r).map(move |to| (from, to))).map(|(f, t)| c.net.region_traffic(f, t)).collect()
    };
    let before = matrix(&cluster);

    let fetchers: Vec<usize> = (0..count).filter(|&i| i != seeder).collect();
    let starts: Vec<f64> =
        fetchers.iter().map(|_| rng.random_range(0.0..arrival_window_s.max(f64::MIN_POSITIVE))).collect();
    progress.set("fetching", fetchers.len());
    let t0 = Instant::now();
    let tasks = fetchers.iter().zip(&starts).map(|(&i, &start)| {
        let handle = cluster.handle(i);
        // On the node's thread, as the node's API would run it.
        let fetch = cluster.spawn(i, async move {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(start * scale)).into()).await;
            let began = Instant::now();
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs_f64(timeout_s * scale), handle.fetch(hash, None)).await,
                Ok(Ok(_))
            );
            (ok, began.elapsed().as_secs_f64() / scale)
        });
        async move {
            let (ok, took) = fetch.await.context("a fetch's task failed")?;
            progress.tick();
            anyhow::Ok((i, ok, took))
        }
    });
    let outcomes = futures::future::join_all(tasks).await.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let after = matrix(&cluster);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let region_of: Vec<usize> = (0..count).map(|i| cluster.net.region_of(cluster.nodes[i].id).unwrap_or(0)).collect();
    let names = cluster.net.regions().to_vec();
    cluster.shutdown(progress).await;

    let total: u64 = delta.iter().sum();
    let own: u64 = (0..r).map(|x| delta[x * r + x]).sum();
    let mut regions = Vec::new();
    let mut times = Vec::new();
    for (x, name) in names.iter().enumerate() {
        let nodes = region_of.iter().filter(|&&g| g == x).count();
        let into: u64 = (0..r).map(|from| delta[from * r + x]).sum();
        let mut t: Vec<f64> = outcomes.iter().filter(|(i, ok, _)| *ok && region_of[*i] == x).map(|o| o.2).collect();
        t.sort_by(f64::total_cmp);
        regions.push(RegionFigures {
            name: name.clone(),
            nodes,
            own_share: if into > 0 { delta[x * r + x] as f64 / into as f64 } else { f64::NAN },
            p50_s: percentile(&t, 0.5),
            p90_s: percentile(&t, 0.9),
        });
        times.push((name.clone(), t));
    }
    let random_pick_share = random_pick_share(&regions.iter().map(|g| g.nodes).collect::<Vec<_>>());
    Ok(RegionsResult {
        blob_bytes: size,
        fetchers: fetchers.len(),
        succeeded: outcomes.iter().filter(|o| o.1).count(),
        delivered_bytes: total,
        own_region_share: if total > 0 { own as f64 / total as f64 } else { f64::NAN },
        random_pick_share,
        regions,
        times,
    })
}

/// The share of bytes from a node's own region were each node to get its bytes from another
/// node picked at random: a node of region r picks one of the n_r − 1 others there among N − 1.
fn random_pick_share(nodes: &[usize]) -> f64 {
    let n: usize = nodes.iter().sum();
    if n < 2 {
        return f64::NAN;
    }
    nodes.iter().map(|&r| r as f64 / n as f64 * r.saturating_sub(1) as f64 / (n - 1) as f64).sum()
}

/// Writes `completions.csv` and a CDF of completion times per region.
pub(crate) fn write(out: &Path, r: &RegionsResult) -> anyhow::Result<()> {
    let mut csv = String::from("region,seconds\n");
    let mut series = Vec::new();
    for (name, t) in &r.times {
        for s in t {
            csv.push_str(&format!("{name},{s:.4}\n"));
        }
        let n = t.len() as f64;
        let points = t.iter().enumerate().map(|(k, s)| (*s, (k + 1) as f64 / n)).collect();
        series.push(crate::plot::Series { name: format!("{name} ({} fetches)", t.len()), points });
    }
    std::fs::write(out.join("completions.csv"), csv)?;
    crate::plot::skip_if_empty(crate::plot::lines(
        &out.join("regions-cdf"),
        &format!("Regions: completion time CDF; {:.0}% of bytes from the own region", r.own_region_share * 100.0),
        "completion time (s)",
        "fraction of fetches done",
        &series,
        false,
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_random_pick_never_picks_the_node_itself() {
        // Two nodes in two regions: the other node is always in the other region.
        assert_eq!(random_pick_share(&[1, 1]), 0.0);
        // 20 in each of three regions: 19 of the 59 others share a node's region.
        assert!((random_pick_share(&[20, 20, 20]) - 19.0 / 59.0).abs() < 1e-12);
        assert_eq!(random_pick_share(&[5]), 1.0);
    }
}
