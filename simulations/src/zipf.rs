//! `zipf-catalogue`: a catalogue of blobs on a few origin nodes, requested by every other node
//! over time with Zipf popularity. Measures the cache hit ratio (requests a node answers from its
//! own store), time to first byte, and how much of the traffic the origins were spared.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use shoal_node::FetchProgress;
use shoal_node::protocol::Hash;
use tokio::sync::watch;

use crate::run::{Cluster, Progress, percentile, wait_announced};
use crate::scenario::{Experiment, Scenario};

/// A Zipf catalogue's figures. Times in emulated seconds.
#[derive(Debug, Clone, Serialize)]
pub struct ZipfResult {
    /// Blobs in the catalogue.
    pub blobs: usize,
    /// Each blob's size in bytes.
    pub blob_bytes: u64,
    /// Origin nodes (they hold the whole catalogue, pinned).
    pub origins: usize,
    /// Requests made.
    pub requests: usize,
    /// Requests that returned the blob.
    pub succeeded: usize,
    /// Requests answered from the requester's own store.
    pub hit_ratio: f64,
    /// Time to first verified byte over requests that were not hits, median. A request that
    /// failed before its first byte counts as never answered: a percentile that falls on one is
    /// infinite, `null` in `summary.json` (so `ttfb_miss_p99_s` is `null` once more than 1% of the
    /// misses failed so).
    pub ttfb_miss_p50_s: f64,
    /// 99th percentile.
    pub ttfb_miss_p99_s: f64,
    /// Time to first byte over all requests (hits count as zero, failures as above), median.
    pub ttfb_p50_s: f64,
    /// 99th percentile.
    pub ttfb_p99_s: f64,
    /// Share of the bytes requesters received that did not come from an origin.
    pub origin_offload: f64,
    /// Bytes the origins sent, in copies of the catalogue.
    pub origin_egress_catalogues: f64,
    /// Per request.
    #[serde(skip)]
    pub samples: Vec<Request>,
    /// Per time bucket.
    #[serde(skip)]
    pub series: Vec<Bucket>,
}

/// One request.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// Emulated seconds since the experiment started.
    pub at_s: f64,
    /// The requesting node's index.
    pub node: usize,
    /// The blob's popularity rank (0 is the most popular).
    pub rank: usize,
    /// Answered from the node's own store.
    pub hit: bool,
    /// Whether the blob came back whole.
    pub ok: bool,
    /// Emulated seconds to the first verified byte.
    pub ttfb_s: Option<f64>,
    /// Emulated seconds to the whole blob.
    pub seconds: f64,
}

/// Requests and traffic in one interval.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// End of the interval, emulated seconds.
    pub t_s: f64,
    /// Requests that started in it.
    pub requests: usize,
    /// Of which hits.
    pub hits: usize,
    /// Bytes the origins sent in it.
    pub origin_bytes: u64,
    /// Bytes requesters received in it.
    pub received_bytes: u64,
}

/// Zipf weights for `n` ranks with exponent `s`, as a cumulative distribution.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

fn draw(cdf: &[f64], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.random();
    cdf.partition_point(|c| *c < u).min(cdf.len() - 1)
}

pub(crate) async fn run(
    scenario: &Scenario,
    rng: &mut ChaCha8Rng,
    work: &Path,
    progress: &Progress,
) -> anyhow::Result<ZipfResult> {
    let Experiment::ZipfCatalogue { blobs, blob_mib, origins, zipf_s, duration_s, requests_per_node_per_min, sample_s } =
        scenario.experiment.clone()
    else {
        anyhow::bail!("not a zipf catalogue");
    };
    let count = scenario.nodes.count;
    let scale = scenario.network.time_scale;
    let cluster = Cluster::start(scenario, count, rng, work, progress).await?;
    let size = (blob_mib * 1024.0 * 1024.0) as u64;

    // The catalogue: every origin holds every blob, pinned.
    progress.set("publishing the catalogue", blobs);
    let mut catalogue: Vec<Hash> = Vec::with_capacity(blobs);
    let path = cluster.dir().join("catalogue-item");
    for _ in 0..blobs {
        let mut data = vec![0u8; size as usize];
        rng.fill_bytes(&mut data);
        std::fs::write(&path, &data)?;
        let mut hash = None;
        for o in 0..origins {
            hash = Some(cluster.handle(o).add_path(&path).await?.hash);
        }
        catalogue.extend(hash);
        progress.tick();
    }
    std::fs::remove_file(&path)?;
    // Let the announcements finish.
    for o in 0..origins {
        wait_announced(&cluster.handle(o), scale).await?;
    }

    let cdf = zipf_cdf(blobs, zipf_s);
    let requesters: Vec<usize> = (origins..count).collect();
    let origin_ids: Vec<_> = (0..origins).map(|o| cluster.nodes[o].id).collect();
    let requester_ids: Vec<_> = requesters.iter().map(|&i| cluster.nodes[i].id).collect();
    let origin_sent = |c: &Cluster| origin_ids.iter().map(|id| c.net.traffic(*id).0).sum::<u64>();
    let received = |c: &Cluster| requester_ids.iter().map(|id| c.net.traffic(*id).1).sum::<u64>();
    let (origin_before, received_before) = (origin_sent(&cluster), received(&cluster));

    let samples: Arc<Mutex<Vec<Request>>> = Arc::default();
    let t0 = Instant::now();
    let wall = Duration::from_secs_f64(duration_s * scale);
    let mean_gap_s = 60.0 / requests_per_node_per_min;
    progress.set("requesting", (duration_s / sample_s).ceil() as usize);
    let mut tasks = Vec::with_capacity(requesters.len());
    for &i in &requesters {
        let handle = cluster.handle(i);
        let mut node_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        let cdf = cdf.clone();
        let catalogue = catalogue.clone();
        let samples = samples.clone();
        tasks.push(cluster.spawn(i, async move {
            let mut inflight = Vec::new();
            loop {
                // Poisson arrivals: exponential gaps. A gap past the window's end ends the
                // requests at that end (a rare requester would otherwise hold the run, and count
                // its idle time, for as long as its gap).
                let gap_s = -mean_gap_s * (1.0 - node_rng.random::<f64>()).ln() * scale;
                let left_s = wall.saturating_sub(t0.elapsed()).as_secs_f64();
                if gap_s >= left_s {
                    tokio::time::sleep(Duration::from_secs_f64(left_s)).await;
                    break;
                }
                tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
                let rank = draw(&cdf, &mut node_rng);
                let hash = catalogue[rank];
                let handle = handle.clone();
                let samples = samples.clone();
                inflight.push(tokio::spawn(async move {
                    let start = Instant::now();
                    let at_s = t0.elapsed().as_secs_f64() / scale;
                    let hit = handle.store().info(hash).is_some_and(|b| b.is_complete());
                    let (tx, mut rx) = watch::channel(FetchProgress::default());
                    let first = async move {
                        loop {
                            if rx.borrow_and_update().verified_bytes > 0 {
                                return Some(start.elapsed());
                            }
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    };
                    let fetch = tokio::time::timeout(wall, handle.fetch(hash, Some(tx)));
                    let (result, first) = futures::join!(fetch, first);
                    let ok = matches!(result, Ok(Ok(_)));
                    let request = Request {
                        at_s,
                        node: i,
                        rank,
                        hit,
                        ok,
                        ttfb_s: if hit { Some(0.0) } else { first.map(|d| d.as_secs_f64() / scale) },
                        seconds: start.elapsed().as_secs_f64() / scale,
                    };
                    samples.lock().unwrap_or_else(|e| e.into_inner()).push(request);
                }));
            }
            futures::future::join_all(inflight).await;
        }));
    }

    // Sample traffic per interval while requests run.
    let mut series = Vec::new();
    let mut last = (origin_before, received_before);
    let mut every = tokio::time::interval(Duration::from_secs_f64(sample_s * scale));
    every.tick().await;
    while t0.elapsed() < wall {
        every.tick().await;
        let now = (origin_sent(&cluster), received(&cluster));
        series.push(Bucket {
            t_s: t0.elapsed().as_secs_f64() / scale,
            requests: 0,
            hits: 0,
            origin_bytes: now.0 - last.0,
            received_bytes: now.1 - last.1,
        });
        last = now;
        progress.tick();
    }
    progress.set("finishing requests", requesters.len());
    for t in tasks {
        t.await?;
        progress.tick();
    }
    let origin_total = origin_sent(&cluster) - origin_before;
    let received_total = received(&cluster) - received_before;
    cluster.shutdown(progress).await;

    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    for r in &samples {
        let b = series.iter().position(|b| r.at_s <= b.t_s).unwrap_or(series.len().saturating_sub(1));
        if let Some(b) = series.get_mut(b) {
            b.requests += 1;
            b.hits += usize::from(r.hit);
        }
    }
    let sorted = |f: &dyn Fn(&Request) -> Option<f64>| {
        let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ttfb_all = sorted(&|r| r.ttfb_s.or(if r.ok { None } else { Some(f64::INFINITY) }));
    let ttfb_miss = sorted(&|r| if r.hit { None } else { r.ttfb_s.or(Some(f64::INFINITY)) });
    let hits = samples.iter().filter(|r| r.hit).count();
    Ok(ZipfResult {
        blobs,
        blob_bytes: size,
        origins,
        requests: samples.len(),
        succeeded: samples.iter().filter(|r| r.ok).count(),
        hit_ratio: if samples.is_empty() { f64::NAN } else { hits as f64 / samples.len() as f64 },
        ttfb_miss_p50_s: percentile(&ttfb_miss, 0.5),
        ttfb_miss_p99_s: percentile(&ttfb_miss, 0.99),
        ttfb_p50_s: percentile(&ttfb_all, 0.5),
        ttfb_p99_s: percentile(&ttfb_all, 0.99),
        // Not clamped: origins that sent more than the requesters received would show below 0.
        origin_offload: if received_total > 0 { 1.0 - origin_total as f64 / received_total as f64 } else { f64::NAN },
        origin_egress_catalogues: origin_total as f64 / (size as f64 * blobs as f64),
        samples,
        series,
    })
}

/// Writes `requests.csv`, `timeseries.csv` and the hit-ratio chart.
pub(crate) fn write(out: &Path, r: &ZipfResult) -> anyhow::Result<()> {
    let mut csv = String::from("at_s,node,rank,hit,ok,ttfb_s,seconds\n");
    for q in &r.samples {
        csv.push_str(&format!(
            "{:.4},{},{},{},{},{},{:.4}\n",
            q.at_s,
            q.node,
            q.rank,
            q.hit,
            q.ok,
            crate::csv_secs(q.ttfb_s),
            q.seconds
        ));
    }
    std::fs::write(out.join("requests.csv"), csv)?;
    let mut csv = String::from("t_s,requests,hits,hit_ratio,origin_bytes,received_bytes,origin_offload\n");
    let mut hit_ratio = Vec::new();
    let mut offload = Vec::new();
    for b in &r.series {
        let ratio = if b.requests > 0 { b.hits as f64 / b.requests as f64 } else { f64::NAN };
        let off = if b.received_bytes > 0 { 1.0 - b.origin_bytes as f64 / b.received_bytes as f64 } else { f64::NAN };
        csv.push_str(&format!(
            "{:.2},{},{},{:.4},{},{},{:.4}\n",
            b.t_s, b.requests, b.hits, ratio, b.origin_bytes, b.received_bytes, off
        ));
        hit_ratio.push((b.t_s, ratio));
        offload.push((b.t_s, off));
    }
    std::fs::write(out.join("timeseries.csv"), csv)?;
    crate::plot::skip_if_empty(crate::plot::lines(
        &out.join("hit-ratio"),
        "Zipf catalogue: cache hit ratio and origin offload over time",
        "time (s)",
        "share",
        &[
            crate::plot::Series { name: "requests answered from own cache".into(), points: hit_ratio },
            crate::plot::Series { name: "bytes not served by an origin".into(), points: offload },
        ],
        false,
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_follow_the_weights() {
        let cdf = zipf_cdf(4, 1.0);
        assert!((cdf[3] - 1.0).abs() < 1e-12);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        for _ in 0..100_000 {
            counts[draw(&cdf, &mut rng)] += 1;
        }
        // Weights 1, 1/2, 1/3, 1/4 over 25/12: rank 0 gets 48%, rank 3 gets 12%.
        assert!((counts[0] as f64 / 100_000.0 - 0.48).abs() < 0.01, "{counts:?}");
        assert!((counts[3] as f64 / 100_000.0 - 0.12).abs() < 0.01, "{counts:?}");
    }
}
