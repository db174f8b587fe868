//! Fetching as a caller sees it: a fetch its caller gave up on can be started again, and does
//! not take down another caller following it, and one whose store fails says so.

use std::time::Duration;

use shoal_node::{Node, NodeConfig};

fn config(dir: std::path::PathBuf) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")];
    c.api = Some("127.0.0.1:0".parse().expect("addr"));
    c.durable = false;
    c.lookup_timeout = Duration::from_secs(10);
    c
}

/// A provider holding a 2 MB blob (its bytes from `seed`), and a fetcher joined through it whose
/// downloads are capped at 512 KiB/s, so that a fetch of the blob takes about 4 s: long enough
/// to act on it part way.
async fn provider_and_slow_fetcher(
    dir: &std::path::Path,
    seed: u32,
) -> (Node, Node, shoal_node::protocol::Hash, Vec<u8>) {
    let provider = Node::start(config(dir.join("p"))).await.expect("provider");
    let p_addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let file = dir.join("f");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(seed) >> 11) as u8).collect();
    std::fs::write(&file, &data).expect("write");
    let hash = provider.handle().add_path(&file).await.expect("add").hash;
    let mut fc = config(dir.join("fetcher"));
    fc.bootstrap = vec![p_addr];
    fc.download_rate = Some(512 << 10);
    let fetcher = Node::start(fc).await.expect("fetcher");
    (provider, fetcher, hash, data)
}

/// The first node holds `data` whole under `hash`, byte for byte; then every node stops.
async fn exports_intact_then_stop(
    dir: &std::path::Path,
    hash: shoal_node::protocol::Hash,
    data: &[u8],
    nodes: [Node; 2],
) {
    let out = dir.join("out");
    nodes[0].handle().store().export(hash, &out).expect("export");
    assert_eq!(std::fs::read(&out).expect("read"), data);
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_its_caller_gave_up_on_can_be_started_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The first attempt is cut off part way.
    let (provider, fetcher, hash, data) = provider_and_slow_fetcher(tmp.path(), 2_654_435_761).await;
    let h = fetcher.handle();
    // An interrupted `shoal get`: the caller stops waiting and drops the fetch.
    let first = tokio::time::timeout(Duration::from_millis(1500), h.fetch(hash, None)).await;
    assert!(first.is_err(), "the first attempt was meant to be cut off, but it finished");

    let again = tokio::time::timeout(Duration::from_secs(30), h.fetch(hash, None))
        .await
        .expect("the second attempt finishes in time")
        .expect("the second attempt succeeds");
    assert!(again.is_complete());
    exports_intact_then_stop(tmp.path(), hash, &data, [fetcher, provider]).await;
}

/// Two callers fetch one blob (a `shoal get` and a gateway request, say): the second follows the
/// first one's fetch. When the first gives up, the second does not fail with it: it carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_following_a_fetch_whose_caller_gave_up_carries_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The first caller gives up part way.
    let (provider, fetcher, hash, data) = provider_and_slow_fetcher(tmp.path(), 2_246_822_519).await;
    let h = fetcher.handle();
    let first = tokio::spawn({
        let h = h.clone();
        async move { h.fetch(hash, None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn({
        let h = h.clone();
        async move { h.fetch(hash, None).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!first.is_finished(), "the first caller was meant to give up part way, but its fetch finished");
    first.abort();

    let followed = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second caller finishes in time")
        .expect("its task ran")
        .expect("the second caller's fetch succeeds");
    assert!(followed.is_complete());
    exports_intact_then_stop(tmp.path(), hash, &data, [fetcher, provider]).await;
}

/// A fetch whose own store fails (here the blob is deleted under it) ends with the store's error
/// at once, instead of blaming its peers one by one and downloading pieces to throw away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_store_fails_ends_with_the_stores_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (provider, fetcher, hash, _) = provider_and_slow_fetcher(tmp.path(), 3_266_489_917).await;
    let h = fetcher.handle();
    let fetch = tokio::spawn({
        let h = h.clone();
        async move { h.fetch(hash, None).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.store().info(hash).is_none_or(|i| i.pieces.is_empty()) {
        assert!(tokio::time::Instant::now() < deadline, "no piece arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.delete(hash).await.expect("delete");
    let ended = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the fetch ends soon after")
        .expect("its task ran");
    let e = ended.expect_err("the fetch cannot finish into a deleted blob");
    assert!(e.to_string().contains("store"), "the store's error: {e}");

    for n in [fetcher, provider] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_following_a_fetch_that_found_no_provider_is_told_so_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = Node::start(config(tmp.path().join("p"))).await.expect("provider");
    let p_addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let mut fc = config(tmp.path().join("fetcher"));
    fc.bootstrap = vec![p_addr];
    fc.lookup_timeout = Duration::from_secs(2);
    let fetcher = Node::start(fc).await.expect("fetcher");
    // Nobody holds it: the first caller's fetch finds no provider, and the second, which
    // followed it, used to be told only that "a concurrent fetch of it failed".
    let unknown: shoal_node::protocol::Hash = "0".repeat(64).parse().expect("a hash");
    let (h1, h2) = (fetcher.handle(), fetcher.handle());
    let first = tokio::spawn(async move { h1.fetch(unknown, None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = h2.fetch(unknown, None).await;
    let first = tokio::time::timeout(Duration::from_secs(60), first).await.expect("within 60 s").expect("task");
    for (who, r) in [("first", first), ("second", second)] {
        let e = r.expect_err("nobody holds it");
        assert!(e.to_string().contains("no provider"), "the {who} caller was told: {e}");
    }
    drop((provider, fetcher));
}
