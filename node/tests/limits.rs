//! Limits an operator sets: an allow-list of peers that may fetch, and a node-wide upload cap.

use std::time::Duration;

use shoal_node::{Node, NodeConfig};

fn config(dir: std::path::PathBuf) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")];
    c.api = Some("127.0.0.1:0".parse().expect("addr"));
    c.durable = false;
    c.lookup_timeout = Duration::from_secs(3);
    c
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_peers_may_fetch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The allowed node's identity exists before the provider starts: start it once to create it.
    let allowed = Node::start(config(tmp.path().join("allowed"))).await.expect("allowed");
    let allowed_id = allowed.handle().peer_id();
    let mut pc = config(tmp.path().join("p"));
    pc.allow_peers = Some(vec![allowed_id]);
    let provider = Node::start(pc).await.expect("provider");
    let p_addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    allowed.shutdown().await.expect("shutdown");

    let file = tmp.path().join("f");
    std::fs::write(&file, data(600_000)).expect("write");
    let hash = provider.handle().add_path(&file).await.expect("add").hash;

    let mut ac = config(tmp.path().join("allowed"));
    ac.bootstrap = vec![p_addr.clone()];
    let allowed = Node::start(ac).await.expect("allowed again");
    let mut oc = config(tmp.path().join("other"));
    oc.bootstrap = vec![p_addr];
    let other = Node::start(oc).await.expect("other");

    let refused = other.handle().fetch(hash, None).await;
    assert!(refused.is_err(), "a peer outside the allow-list fetched the blob");
    assert!(other.handle().store().info(hash).is_none_or(|i| i.pieces.is_empty()), "no piece reached it");
    let got = allowed.handle().fetch(hash, None).await.expect("the allowed peer fetches");
    assert!(got.is_complete());

    for n in [other, allowed, provider] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_cap_holds_over_every_second_of_a_transfer() {
    const CAP: u64 = 1 << 20; // 1 MiB/s
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut pc = config(tmp.path().join("p"));
    pc.upload_rate = Some(CAP);
    let provider = Node::start(pc).await.expect("provider");
    let p_addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let file = tmp.path().join("f");
    std::fs::write(&file, data(8 << 20)).expect("write");
    let hash = provider.handle().add_path(&file).await.expect("add").hash;
    let mut fc = config(tmp.path().join("f-node"));
    fc.bootstrap = vec![p_addr];
    fc.lookup_timeout = Duration::from_secs(20);
    let fetcher = Node::start(fc).await.expect("fetcher");

    let api = std::fs::read_to_string(tmp.path().join("p/api")).expect("api");
    let fetch = {
        let h = fetcher.handle();
        tokio::spawn(async move { h.fetch(hash, None).await })
    };
    // Sample the provider's served-bytes counter every 250 ms for 6 s: bytes, not wall time, are
    // what is asserted.
    let mut samples: Vec<(tokio::time::Instant, f64)> = Vec::new();
    for _ in 0..24 {
        let api = api.clone();
        let served = tokio::task::spawn_blocking(move || served_bytes(&api)).await.expect("scrape");
        samples.push((tokio::time::Instant::now(), served));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Over every window of about a second, the bytes stay within the cap plus 10%.
    for (i, (t0, b0)) in samples.iter().enumerate() {
        for (t1, b1) in &samples[i + 1..] {
            let secs = t1.duration_since(*t0).as_secs_f64();
            if secs < 0.95 {
                continue;
            }
            let rate = (b1 - b0) / secs;
            assert!(rate <= CAP as f64 * 1.10, "{rate:.0} B/s over {secs:.2} s exceeds the cap");
        }
    }
    let moved = samples.last().expect("samples").1 - samples[0].1;
    assert!(moved > 0.0, "the transfer moved");
    fetch.abort();
    fetcher.shutdown().await.expect("shutdown");
    provider.shutdown().await.expect("shutdown");
}

fn served_bytes(api: &str) -> f64 {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let text =
        agent.get(format!("http://{api}/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("shoal_served_bytes_total "))
        .map(|v| v.trim().parse().expect("number"))
        .unwrap_or(0.0)
}
