//! Many real nodes in one process over libp2p's in-memory transport: the DHT finds every
//! provider, every time, and a fetch through it works. Bounded in time; every node is shut down.

use std::time::Duration;

use shoal_node::libp2p::core::transport::{MemoryTransport, upgrade::Version};
use shoal_node::libp2p::{Multiaddr, Transport, plaintext, yamux};
use shoal_node::{Node, NodeConfig};

const NODES: usize = 30;

fn memory_config(dir: std::path::PathBuf, bootstrap: Vec<Multiaddr>) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec!["/memory/0".parse().expect("multiaddr")];
    c.bootstrap = bootstrap;
    c.api = None;
    c.durable = false;
    c.lookup_timeout = Duration::from_secs(10);
    c
}

async fn start(config: NodeConfig) -> Node {
    Node::start_with_transport(
        config,
        Some(Box::new(|key: &shoal_node::libp2p::identity::Keypair| {
            MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(plaintext::Config::new(key))
                .multiplex(yamux::Config::default())
                .boxed()
        })),
    )
    .await
    .expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_lookup_succeeds_while_the_provider_lives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<Node> = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for i in 0..NODES {
        // Each node joins through two earlier ones, not a single special node.
        let bootstrap = if i == 0 { vec![] } else { vec![addrs[0].clone(), addrs[i / 2].clone()] };
        let mut bootstrap = bootstrap;
        bootstrap.dedup();
        let node = start(memory_config(tmp.path().join(i.to_string()), bootstrap)).await;
        let listen = tokio::time::timeout(Duration::from_secs(10), node.handle().wait_listening())
            .await
            .expect("listening in time")
            .expect("listening");
        addrs.push(listen[0].clone());
        nodes.push(node);
    }
    // Let the routing tables fill (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        while n.handle().status().await.expect("status").dht.routing_table_peers < 5 {
            assert!(tokio::time::Instant::now() < deadline, "routing tables did not fill within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let provider = nodes[7].handle();
    let file = tmp.path().join("blob");
    std::fs::write(&file, vec![7u8; 3 << 20]).expect("write");
    let hash = provider.add_path(&file).await.expect("add").hash;

    // Every other node finds the provider.
    let mut found = 0;
    for (i, n) in nodes.iter().enumerate() {
        if i == 7 {
            continue;
        }
        let mut ok = false;
        // The announcement itself takes a moment to spread: allow a few lookups, bounded.
        for _ in 0..5 {
            if n.handle().providers(hash).await.expect("lookup").contains(&provider.peer_id()) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(ok, "node {i} did not find the provider");
        found += 1;
    }
    assert_eq!(found, NODES - 1);

    let info = nodes[23].handle().fetch(hash, None).await.expect("fetch over the memory transport");
    assert!(info.is_complete());

    // A popular blob: thirteen more nodes publish it, fifteen providers in all, a crowd's worth
    // (twelve) or more. A node that fetches it and knows of that many holders waits to announce
    // itself: the record names more holders than a lookup dials, and peer exchange reaches the
    // rest.
    let publishers: Vec<usize> = (0..14).filter(|&i| i != 7).collect();
    for &i in &publishers {
        nodes[i].handle().add_path(&file).await.expect("add");
    }
    // The fetcher itself looks them up first: its fetch's lookup hands it the providers it is
    // connected to at once, so it knows of a crowd before its first piece verifies (its own
    // dials could be slower than that piece, and it would announce at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let named = nodes[28].handle().providers(hash).await.expect("lookup").len();
        if named >= 12 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a lookup named only {named} of 15 providers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fetcher = nodes[28].handle();
    let deferred = |h: &shoal_node::NodeHandle| {
        let text = h.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("shoal_dht_announcements_deferred_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(deferred(&fetcher), 0.0);
    assert!(fetcher.fetch(hash, None).await.expect("fetch of a popular blob").is_complete());
    assert_eq!(deferred(&fetcher), 1.0, "the fetcher of a crowded blob announced at once");

    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_node_fetches_but_leaves_no_trace_in_the_dht() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<Node> = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for i in 0..4 {
        let bootstrap = addrs.first().cloned().into_iter().collect();
        let node = start(memory_config(tmp.path().join(i.to_string()), bootstrap)).await;
        addrs.push(node.handle().wait_listening().await.expect("listening")[0].clone());
        nodes.push(node);
    }
    let file = tmp.path().join("blob");
    std::fs::write(&file, vec![3u8; 1 << 20]).expect("write");
    let hash = nodes[0].handle().add_path(&file).await.expect("add").hash;

    // What `shoal get` starts when no node runs: it joins through another node and fetches.
    let mut config = memory_config(tmp.path().join("transient"), vec![addrs[1].clone()]);
    config.transient = true;
    let transient = start(config).await;
    let id = transient.handle().peer_id();
    let info = tokio::time::timeout(Duration::from_secs(30), transient.handle().fetch(hash, None))
        .await
        .expect("fetched in time")
        .expect("fetch");
    assert!(info.is_complete());
    // It announced nothing (its own count of blobs announced: commands reach its event loop in
    // order, so one sent while fetching is counted by now), and no node keeps it in its routing
    // table: once it is gone, nobody's lookups wait on it.
    assert_eq!(transient.handle().status().await.expect("status").dht.provided, 0, "announced");
    for n in &nodes {
        assert!(!n.handle().providers(hash).await.expect("lookup").contains(&id), "announced");
        let snapshot = n.handle().dht_snapshot(hash).await.expect("snapshot");
        assert!(!snapshot.routing_table.contains(&id), "in a routing table");
    }
    transient.shutdown().await.expect("shutdown");
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// One list of seed nodes, deployed to every seed, names each seed itself: a node skips its own
/// address instead of refusing to start, and joins through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_named_in_its_own_bootstrap_list_joins_through_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let seed = start(memory_config(tmp.path().join("seed"), Vec::new())).await;
    let seed_addr = seed.handle().wait_listening().await.expect("listening")[0].clone();
    // The node's identity lives in its data directory: a first start makes it.
    let first = start(memory_config(tmp.path().join("n"), Vec::new())).await;
    let own = first.handle().wait_listening().await.expect("listening")[0].clone();
    let id = first.handle().peer_id();
    first.shutdown().await.expect("shutdown");

    let node = start(memory_config(tmp.path().join("n"), vec![own, seed_addr])).await;
    assert_eq!(node.handle().peer_id(), id, "the same identity");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.handle().status().await.expect("status").peers == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never joined through the other seed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in [node, seed] {
        n.shutdown().await.expect("shutdown");
    }
}
