//! Small seeded runs of the churn, Zipf-catalogue and regions experiments, asserting what a user
//! of their figures relies on: every fetch that should finish does, with every byte verified,
//! and the figures add up.

use std::time::Duration;

use shoal_simulations::run::{ExperimentResult, RunOptions, Summary, run};
use shoal_simulations::scenario::{Experiment, NetworkSpec, NodesSpec, Partition, Scenario};

fn network() -> NetworkSpec {
    NetworkSpec {
        regions: vec!["eu".into(), "us".into()],
        latency_ms: vec![vec![5.0, 40.0], vec![40.0, 5.0]],
        uplink_mib_s: Some(2.0),
        downlink_mib_s: Some(8.0),
        time_scale: 1.0,
    }
}

fn nodes(count: usize) -> NodesSpec {
    NodesSpec {
        count,
        cache_mib: 16,
        hot_mib: 1,
        max_connections: 32,
        bootstrap_peers: 3,
        join_stagger_ms: 10,
        settle_s: 5.0,
        lookup_timeout_s: 10.0,
        dht_refresh_s: 300.0,
        refresh_buckets: true,
        spread_patience_s: 30.0,
        ..NodesSpec::default()
    }
}

async fn run_bounded(s: Scenario, out: Option<std::path::PathBuf>) -> Summary {
    s.check().expect("valid scenario");
    eprintln!("{} seed {:?}", s.name, s.seed);
    tokio::time::timeout(Duration::from_secs(150), run(&s, &RunOptions { out, ..RunOptions::default() }))
        .await
        .expect("the run ends in time")
        .expect("the run works")
}

/// A third of the fetchers crash or leave mid-fetch; some restart, some join; the two regions are
/// cut apart for a while. Every node still there at the end holds the blob: the providers never
/// left, and the partition was repaired. While cut, no byte crossed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_churn_every_remaining_fetch_completes() {
    let s = Scenario {
        name: "churn-test".into(),
        seed: Some(3),
        network: network(),
        nodes: nodes(14),
        experiment: Experiment::Churn {
            blob_mib: 2.0,
            providers: 2,
            churn_fraction: 0.34,
            churn_window_s: 2.0,
            crash_share: 0.5,
            restart_share: 1.0,
            downtime_s: 1.0,
            join_fraction: 0.1,
            timeout_s: 90.0,
            partition: Some(Partition { between: ["eu".into(), "*".into()], at_s: 0.5, for_s: 1.5 }),
        },
    };
    let out = tempfile::tempdir().expect("tempdir");
    let summary = run_bounded(s, Some(out.path().to_owned())).await;
    let ExperimentResult::Churn(r) = summary.result else { panic!("not churn") };
    eprintln!(
        "crashed {} restarted {} left {} joined {}; {}/{}; stall p99 {:.2} s",
        r.crashed, r.restarted, r.left, r.joined, r.succeeded, r.eligible, r.stall_p99_s
    );
    assert!(r.crashed + r.left >= 3, "a third of the 12 fetchers churned");
    assert!(r.restarted >= 1 && r.left >= 1, "the seed gives both crashes that restart and clean leaves");
    assert!(r.joined >= 1);
    for f in &r.fetchers {
        if f.eligible {
            assert!(f.ok, "node {} ({}) did not finish: {:?}", f.node, f.fate, f.error);
        }
    }
    assert_eq!(r.success_rate, 1.0);
    let p = r.partition.as_ref().expect("the partition's figures");
    assert_eq!(p.bytes_across_while_cut, 0, "bytes crossed the cut");
    assert!(p.at_s >= 0.5 && p.repaired_s >= 2.0, "cut and repaired when they ran, not before: {p:?}");
    assert!(out.path().join("churn.png").exists() && out.path().join("timeseries.csv").exists());
}

/// Requests over a catalogue with Zipf popularity: every request is answered, popular blobs are
/// answered from the requester's own cache on repeat, and the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zipf_catalogue_is_served_and_cached() {
    let s = Scenario {
        name: "zipf-test".into(),
        seed: Some(5),
        network: network(),
        nodes: nodes(10),
        experiment: Experiment::ZipfCatalogue {
            blobs: 6,
            blob_mib: 0.25,
            origins: 1,
            zipf_s: 1.2,
            duration_s: 15.0,
            requests_per_node_per_min: 30.0,
            sample_s: 5.0,
        },
    };
    let out = tempfile::tempdir().expect("tempdir");
    let summary = run_bounded(s, Some(out.path().to_owned())).await;
    let ExperimentResult::ZipfCatalogue(r) = summary.result else { panic!("not zipf") };
    eprintln!("{} requests, hit ratio {:.2}, offload {:.2}", r.requests, r.hit_ratio, r.origin_offload);
    assert!(r.requests >= 20, "9 nodes at 30 a minute for 15 s make about 67 requests");
    assert_eq!(r.succeeded, r.requests, "every request is answered");
    assert!(r.hit_ratio > 0.0 && r.hit_ratio < 1.0, "repeats hit, first requests cannot");
    // Every answered request saw its first byte, even a blob that arrived in one response.
    assert!(r.samples.iter().all(|q| q.ttfb_s.is_some_and(f64::is_finite)), "a request without a first byte");
    let hits = r.samples.iter().filter(|q| q.hit).count();
    assert_eq!(r.series.iter().map(|b| b.hits).sum::<usize>(), hits);
    assert_eq!(r.series.iter().map(|b| b.requests).sum::<usize>(), r.requests);
    assert!((0.0..=1.0).contains(&r.origin_offload));
    assert!(out.path().join("hit-ratio.png").exists() && out.path().join("requests.csv").exists());
}

/// Fetchers in two regions: all finish, and the byte shares are shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_account_every_byte() {
    let s = Scenario {
        name: "regions-test".into(),
        seed: Some(7),
        network: network(),
        nodes: nodes(10),
        experiment: Experiment::Regions { blob_mib: 1.0, seeder: 0, arrival_window_s: 4.0, timeout_s: 60.0 },
    };
    let summary = run_bounded(s, None).await;
    let ExperimentResult::Regions(r) = summary.result else { panic!("not regions") };
    eprintln!("own-region share {:.2} (random {:.2})", r.own_region_share, r.random_pick_share);
    assert_eq!(r.succeeded, r.fetchers);
    assert!((0.0..=1.0).contains(&r.own_region_share));
    assert_eq!(r.regions.iter().map(|g| g.nodes).sum::<usize>(), 10);
    // The regions' matrix saw every fetcher's copy of the blob arrive, at least.
    let copies = r.fetchers as u64 * r.blob_bytes;
    assert!(r.delivered_bytes >= copies, "{} bytes delivered for {copies} fetched", r.delivered_bytes);
}
