//! A peer that speaks the transfer protocol by hand. Badly: garbage, an oversized frame, a request
//! cut off halfway, a request for pieces that do not exist; the node answers each as the protocol
//! says, counts it, and goes on serving everyone else. And patiently: a watch held until a piece
//! it wants arrives, and one that must not hold up a shutdown; streams that never send their
//! request, which must not keep others from being served. And as a provider that lies: one
//! claiming a size it never proves must not keep a fetch from the peer that can, and one sending
//! bytes that are not the blob's is avoided by the fetches that follow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, SwarmBuilder, kad};
use shoal_node::{Node, NodeConfig};
use shoal_protocol::verify;
use shoal_protocol::wire::{self, Request, Response};
use shoal_protocol::{Geometry, Hash, PIECE_SIZE, PieceSet};

const TRANSFER: StreamProtocol = StreamProtocol::new(wire::PROTOCOL);

fn config(dir: std::path::PathBuf) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")];
    c.api = None;
    c.durable = false;
    c
}

/// A bare libp2p peer with only the stream behaviour, connected to `addr`; its swarm runs in a
/// task. Returns the control to open streams with.
async fn raw_peer(addr: Multiaddr) -> (libp2p_stream::Control, tokio::task::JoinHandle<()>) {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let control = swarm.behaviour().new_control();
    swarm.dial(addr).expect("dial");
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await
                && let Some(tx) = connected.take()
            {
                let _ = tx.send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), connected_rx).await.expect("connected in time").expect("swarm");
    (control, task)
}

/// Writes `bytes` on a new transfer stream, closes our side, and reads the whole answer.
async fn exchange(control: &mut libp2p_stream::Control, peer: PeerId, bytes: &[u8]) -> Vec<u8> {
    exchange_within(control, peer, bytes, Duration::from_secs(10)).await.expect("read")
}

/// [`exchange`], failing the test if no answer ends within `bound`; the read's own outcome.
async fn exchange_within(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    bytes: &[u8],
    bound: Duration,
) -> std::io::Result<Vec<u8>> {
    let mut stream = control.open_stream(peer, TRANSFER).await.expect("stream");
    stream.write_all(bytes).await.expect("write");
    stream.close().await.expect("close");
    let mut answer = Vec::new();
    tokio::time::timeout(bound, stream.read_to_end(&mut answer)).await.expect("answered in time")?;
    Ok(answer)
}

/// Waits (at most 30 s) until `node` holds `n` watches.
async fn watches_held(node: &shoal_node::NodeHandle, n: usize) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while node.status().await.expect("status").watches != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node took the watch");
}

fn response(answer: &[u8]) -> Response {
    let len = wire::frame_len(answer[..4].try_into().expect("prefix"), wire::MAX_RESPONSE_LEN).expect("frame");
    assert_eq!(answer.len(), 4 + len, "a refusal is one frame and nothing after it");
    wire::decode_response(&answer[4..]).expect("a valid response")
}

fn served(metrics: &str, outcome: &str) -> f64 {
    let prefix = format!("shoal_transfer_served_requests_total{{kind=\"any\",outcome=\"{outcome}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().expect("number")).unwrap_or(0.0)
}

/// A node under `dir` that published a blob of four pieces, the last one short: the node, where
/// it listens, the blob's hash and its bytes.
async fn provider(dir: &std::path::Path) -> (Node, Multiaddr, shoal_protocol::Hash, Vec<u8>) {
    let provider = Node::start(config(dir.join("p"))).await.expect("provider");
    let addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let file = dir.join("f");
    let data: Vec<u8> =
        (0..3 * PIECE_SIZE as u32 + 99).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&file, &data).expect("write");
    let hash = provider.handle().add_path(&file).await.expect("add").hash;
    (provider, addr, hash, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_garbage_is_refused_and_the_node_serves_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (provider, addr, hash, data) = provider(tmp.path()).await;
    let peer = provider.handle().peer_id();
    let (mut control, swarm) = raw_peer(addr.clone()).await;

    // Garbage in a well-formed frame, and a length prefix past the bound: `BadRequest`.
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let mut framed = (garbage.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&garbage);
    assert!(matches!(response(&exchange(&mut control, peer, &framed).await), Response::BadRequest { .. }));
    let oversized = (wire::MAX_REQUEST_LEN as u32 + 1).to_be_bytes();
    assert!(matches!(response(&exchange(&mut control, peer, &oversized).await), Response::BadRequest { .. }));

    // A request cut off halfway (the requester gave up): no answer, counted as cancelled.
    let have = wire::encode_frame(&Request::Have { hash, trace: None, prove_size: false });
    assert!(exchange(&mut control, peer, &have[..have.len() / 2]).await.is_empty());

    // Pieces that do not exist (a set sized for another blob): nothing to serve, no panic.
    let bigger = Geometry::new(64 << 20).expect("size").piece_count();
    let mut beyond = PieceSet::empty(bigger);
    beyond.insert_range(10..20);
    let get = wire::encode_frame(&Request::Get { hash, pieces: (&beyond).into(), trace: None });
    assert!(matches!(response(&exchange(&mut control, peer, &get).await), Response::NotFound));
    // Counted for another size, the pieces named that are held are served, counted as held.
    let mut overlapping = PieceSet::empty(bigger);
    overlapping.insert(1);
    overlapping.insert_range(10..20);
    let get = wire::encode_frame(&Request::Get { hash, pieces: (&overlapping).into(), trace: None });
    let answer = exchange(&mut control, peer, &get).await;
    let len = wire::frame_len(answer[..4].try_into().expect("prefix"), wire::MAX_RESPONSE_LEN).expect("frame");
    match wire::decode_response(&answer[4..4 + len]).expect("a valid response") {
        Response::Data { pieces, .. } => assert_eq!(pieces, PieceSet::single(4, 1)),
        other => panic!("{other:?}"),
    }

    let metrics = provider.handle().metrics_text();
    assert_eq!(served(&metrics, "bad_request"), 2.0, "{metrics}");
    assert_eq!(served(&metrics, "cancelled"), 1.0, "{metrics}");

    // And the node still serves a real fetch, verified end to end.
    let mut fc = config(tmp.path().join("f-node"));
    fc.bootstrap = vec![addr];
    let fetcher = Node::start(fc).await.expect("fetcher");
    let got = tokio::time::timeout(Duration::from_secs(60), fetcher.handle().fetch(hash, None))
        .await
        .expect("fetched in time")
        .expect("fetch");
    assert!(got.is_complete());
    let out = tmp.path().join("out");
    fetcher.handle().store().export(hash, &out).expect("export");
    assert!(std::fs::read(&out).expect("read") == data, "the fetched bytes are the published ones");

    swarm.abort();
    fetcher.shutdown().await.expect("shutdown");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_arrives_does_not_hold_up_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = config(tmp.path().join("p"));
    // Every timer of the node stretched a thousandfold: the drain may last 10,000 s, and so
    // may the wait for a request.
    c.time_scale = 1000.0;
    let provider = Node::start(c).await.expect("provider");
    let addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let peer = provider.handle().peer_id();
    let (mut control, swarm) = raw_peer(addr).await;

    // Half a length prefix, and then nothing: the node holds the stream, waiting for the rest.
    let mut stream = control.open_stream(peer, TRANSFER).await.expect("stream");
    stream.write_all(&[0, 0]).await.expect("write");
    stream.flush().await.expect("flush");
    // A request on a stream opened after it is answered: the node took both.
    let have = wire::encode_frame(&Request::Have { hash: Hash::of(b"none"), trace: None, prove_size: false });
    assert!(matches!(response(&exchange(&mut control, peer, &have).await), Response::NotFound));

    // Stopping waits for requests being answered, not for one that never came.
    tokio::time::timeout(Duration::from_secs(60), provider.shutdown())
        .await
        .expect("stopped without waiting out the drain")
        .expect("shutdown");
    drop(stream);
    swarm.abort();
}

/// A peer that opens streams and sends nothing holds none of the upload slots: another peer's
/// request is answered, not told `Busy`. (With the slot taken before the request was read,
/// two such streams held both slots of this node.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_send_a_request_hold_no_upload_slot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = config(tmp.path().join("p"));
    c.max_uploads = 2;
    let provider = Node::start(c).await.expect("provider");
    let addr = provider.handle().wait_listening().await.expect("listening")[0].clone();
    let file = tmp.path().join("f");
    std::fs::write(&file, b"a blob worth asking for").expect("write");
    let hash = provider.handle().add_path(&file).await.expect("add").hash;
    let peer = provider.handle().peer_id();

    let (mut idle, idle_swarm) = raw_peer(addr.clone()).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = idle.open_stream(peer, TRANSFER).await.expect("stream");
        // The node may close one it will not read (it did, once both slots were held).
        let _ = stream.write_all(&[0, 0]).await;
        let _ = stream.flush().await;
        held.push(stream);
    }
    let (mut asking, asking_swarm) = raw_peer(addr).await;
    let have = wire::encode_frame(&Request::Have { hash, trace: None, prove_size: false });
    for _ in 0..3 {
        let answer = response(&exchange(&mut asking, peer, &have).await);
        assert!(matches!(answer, Response::Have { .. }), "{answer:?}");
    }
    drop(held);
    idle_swarm.abort();
    asking_swarm.abort();
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_answered_when_a_wanted_piece_arrives_and_does_not_hold_up_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (provider, addr, hash, data) = provider(tmp.path()).await;
    let n = Geometry::new(data.len() as u64).expect("size").piece_count();

    // The watched node stretches every timer a thousandfold: a watch it holds waits 10,000 s
    // unless a piece it stores wakes it, and the test's bounds are far shorter.
    let mut wc = config(tmp.path().join("w"));
    wc.time_scale = 1000.0;
    wc.bootstrap = vec![addr];
    let watched = Node::start(wc).await.expect("watched node");
    let waddr = watched.handle().wait_listening().await.expect("listening")[0].clone();
    let wpeer = watched.handle().peer_id();
    // It has begun the blob and holds none of it.
    watched.handle().store().begin(hash, data.len() as u64).expect("begin");
    let (control, swarm) = raw_peer(waddr).await;
    let watch = |hash, wanted: PieceSet| {
        wire::encode_frame(&Request::Watch { hash, wanted: (&wanted).into(), wait_ms: u32::MAX, trace: None })
    };

    let mut c = control.clone();
    let first = watch(hash, PieceSet::full(n));
    let first = tokio::spawn(async move { exchange_within(&mut c, wpeer, &first, Duration::from_secs(120)).await });
    watches_held(&watched.handle(), 1).await;
    // It fetches the blob: the first piece it stores answers the watch.
    tokio::time::timeout(Duration::from_secs(60), watched.handle().fetch(hash, None))
        .await
        .expect("fetched in time")
        .expect("fetch");
    match response(&first.await.expect("task").expect("answered")) {
        Response::Have { size, pieces, size_proof, .. } => {
            assert_eq!(size, data.len() as u64);
            assert!(!pieces.is_empty(), "answered with what it holds");
            assert!(size_proof.is_none(), "a watch asks no proof");
        }
        other => panic!("a watch is answered with a have-map, not {other:?}"),
    }
    assert_eq!(watched.handle().status().await.expect("status").watches, 0, "the watch let go");

    // A watch of pieces it holds already is answered at once, whatever the wait asked.
    let again = watch(hash, PieceSet::single(n, 0));
    let mut c = control.clone();
    let answer = exchange_within(&mut c, wpeer, &again, Duration::from_secs(30)).await.expect("answered");
    assert!(matches!(response(&answer), Response::Have { .. }));

    // A blob it imports answers the watches of it at once, as a fetched piece does.
    let added: Vec<u8> = (0..PIECE_SIZE as u32 + 7).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    let added_hash = shoal_protocol::Hash::of(&added);
    let m = Geometry::new(added.len() as u64).expect("size").piece_count();
    watched.handle().store().begin(added_hash, added.len() as u64).expect("begin");
    let mut c = control.clone();
    let on_add = watch(added_hash, PieceSet::full(m));
    let on_add = tokio::spawn(async move { exchange_within(&mut c, wpeer, &on_add, Duration::from_secs(120)).await });
    watches_held(&watched.handle(), 1).await;
    let file = tmp.path().join("added");
    std::fs::write(&file, &added).expect("write");
    watched.handle().add_path(&file).await.expect("add");
    let answer = tokio::time::timeout(Duration::from_secs(30), on_add)
        .await
        .expect("answered at the import, not at the end of its wait")
        .expect("task")
        .expect("answered");
    match response(&answer) {
        Response::Have { pieces, .. } => assert!(pieces.is_complete(), "answered with the whole blob"),
        other => panic!("a watch is answered with a have-map, not {other:?}"),
    }

    // A watch of a blob nobody sends it does not hold up a shutdown.
    let other = shoal_protocol::Hash::from([9; 32]);
    watched.handle().store().begin(other, 1000).expect("begin");
    let mut c = control.clone();
    let held = watch(other, PieceSet::full(1));
    let held = tokio::spawn(async move { exchange_within(&mut c, wpeer, &held, Duration::from_secs(120)).await });
    watches_held(&watched.handle(), 1).await;
    tokio::time::timeout(Duration::from_secs(60), watched.shutdown())
        .await
        .expect("stopped without waiting out the watch")
        .expect("shutdown");
    // Answered (it holds none of that blob) or cut off with the connection: either way, at once.
    if let Ok(answer) = held.await.expect("task")
        && !answer.is_empty()
    {
        assert!(matches!(response(&answer), Response::NotFound));
    }
    swarm.abort();
    provider.shutdown().await.expect("shutdown");
}

#[derive(NetworkBehaviour)]
struct LiarBehaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    stream: libp2p_stream::Behaviour,
}

/// What a lying provider was asked, request by request: the blob and whether it was for pieces.
#[derive(Default)]
struct Asked(std::sync::Mutex<Vec<(Hash, bool)>>);

impl Asked {
    fn record(&self, hash: Hash, get: bool) {
        self.0.lock().expect("lock").push((hash, get));
    }

    /// How many have or watch requests (`get` false), or piece requests (true), named `hash`.
    fn count(&self, hash: Hash, get: bool) -> usize {
        self.0.lock().expect("lock").iter().filter(|a| **a == (hash, get)).count()
    }
}

/// How a lying provider lies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// It sends no size proof though asked for one, and answers every piece request `Busy`.
    NeverProves,
    /// It proves the size, then sends bytes for every piece asked that are not the blob's.
    Garbage,
}

/// A provider that announces `blobs` to the node at `addr`, claims to hold every piece of each,
/// and then lies as `lie` says.
async fn liar(
    addr: Multiaddr,
    node: PeerId,
    lie: Lie,
    blobs: &[&[u8]],
) -> (Arc<Asked>, PeerId, tokio::task::JoinHandle<()>) {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let config = kad::Config::new(StreamProtocol::new("/shoal/kad/1"));
            let kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), config);
            LiarBehaviour { kad, stream: libp2p_stream::Behaviour::new() }
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let id = *swarm.local_peer_id();
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
    swarm.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")).expect("listen");
    let mut incoming = swarm.behaviour().stream.new_control().accept(TRANSFER).expect("accept");
    let asked = Arc::new(Asked::default());
    // Each blob's size and the proof of it.
    let blobs: Arc<HashMap<Hash, (u64, Vec<u8>)>> = Arc::new(
        blobs
            .iter()
            .map(|data| {
                let (hash, size) = (Hash::of(data), data.len() as u64);
                let geometry = Geometry::new(size).expect("size");
                let mut ob = Vec::new();
                verify::outboard(*data, size, &mut ob).expect("outboard");
                let mut proof = Vec::new();
                verify::encode_size_proof(*data, verify::post_order_outboard(hash, geometry, &ob[..]), &mut proof)
                    .expect("proof");
                (hash, (size, proof))
            })
            .collect(),
    );
    let hashes: Vec<Hash> = blobs.keys().copied().collect();
    let answers = asked.clone();
    let serve = tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let (answers, blobs) = (answers.clone(), blobs.clone());
            tokio::spawn(async move {
                let mut prefix = [0; 4];
                let Ok(()) = stream.read_exact(&mut prefix).await else { return };
                let Ok(len) = wire::frame_len(prefix, wire::MAX_REQUEST_LEN) else { return };
                let mut body = vec![0; len];
                let Ok(()) = stream.read_exact(&mut body).await else { return };
                let request = wire::decode_request(&body);
                let (hash, prove, get) = match &request {
                    Ok(Request::Have { hash, prove_size, .. }) => (*hash, *prove_size, None),
                    Ok(Request::Watch { hash, .. }) => (*hash, false, None),
                    Ok(Request::Get { hash, pieces, .. }) => (*hash, false, Some(pieces.to_set(pieces.piece_count()))),
                    _ => return,
                };
                let Some((size, proof)) = blobs.get(&hash) else { return };
                answers.record(hash, get.is_some());
                let geometry = Geometry::new(*size).expect("size");
                let answer = match (get, lie) {
                    (None, _) => wire::encode_frame(&Response::Have {
                        size: *size,
                        pieces: PieceSet::full(geometry.piece_count()),
                        peers: Vec::new(),
                        size_proof: (prove && lie == Lie::Garbage).then(|| proof.clone()),
                    }),
                    (Some(_), Lie::NeverProves) => {
                        wire::encode_frame(&Response::Busy { retry_after_ms: 250, peers: Vec::new() })
                    }
                    (Some(pieces), Lie::Garbage) => {
                        let len = verify::encoded_len(geometry, &pieces) as usize;
                        let mut frame = wire::encode_frame(&Response::Data { pieces, peers: Vec::new(), have: None });
                        frame.resize(frame.len() + len, 0xa5);
                        frame
                    }
                };
                let _ = stream.write_all(&answer).await;
                let _ = stream.close().await;
            });
        }
    });
    let task = tokio::spawn(async move {
        let _serve = AbortOnDrop(serve);
        let mut announced = false;
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                swarm.add_external_address(address);
                if !announced {
                    announced = true;
                    let dht = &mut swarm.behaviour_mut().kad;
                    dht.add_address(&node, addr.clone());
                    for hash in &hashes {
                        dht.start_providing(kad::RecordKey::new(hash.as_bytes())).expect("provide");
                    }
                }
            }
        }
    });
    (asked, id, task)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_claims_a_size_it_never_proves_does_not_keep_a_fetch_from_one_that_can() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..2 * PIECE_SIZE as u32 + 5).map(|i| (i.wrapping_mul(2_246_822_519) >> 9) as u8).collect();
    let hash = Hash::of(&data);

    // The fetcher has one slot for providers; the liar is the first it hears of.
    let mut fc = config(tmp.path().join("f"));
    fc.fetch_peers = 1;
    let fetcher = Node::start(fc).await.expect("fetcher");
    let faddr = fetcher.handle().wait_listening().await.expect("listening")[0].clone();
    let (asked, _, liar) = liar(faddr.clone(), fetcher.handle().peer_id(), Lie::NeverProves, &[&data]).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while fetcher.handle().providers(hash).await.expect("providers").is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the liar's record reached the fetcher");
    let handle = fetcher.handle();
    let fetch = tokio::spawn(async move { handle.fetch(hash, None).await });
    tokio::time::timeout(Duration::from_secs(30), async {
        while asked.count(hash, false) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the fetch asked the liar first");

    // An honest provider of the blob joins.
    let mut pc = config(tmp.path().join("p"));
    pc.bootstrap = vec![faddr];
    let provider = Node::start(pc).await.expect("provider");
    let file = tmp.path().join("blob");
    std::fs::write(&file, &data).expect("write");
    provider.handle().add_path(&file).await.expect("add");

    let info = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("fetched from the honest provider in time, not held by the liar")
        .expect("task")
        .expect("fetch");
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(asked.count(hash, true), 0, "nothing was asked of a size nobody proved");
    liar.abort();
    fetcher.shutdown().await.expect("shutdown");
    provider.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_sends_bytes_that_fail_verification_is_avoided_by_later_fetches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let blob = |seed: u32| -> Vec<u8> {
        (0..8 * PIECE_SIZE as u32 + 17).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 7) as u8).collect()
    };
    let (first, second) = (blob(1), blob(2));
    let (a, b) = (Hash::of(&first), Hash::of(&second));

    let fetcher = Node::start(config(tmp.path().join("f"))).await.expect("fetcher");
    let handle = fetcher.handle();
    let faddr = handle.wait_listening().await.expect("listening")[0].clone();
    let (asked, liar_id, liar) = liar(faddr.clone(), handle.peer_id(), Lie::Garbage, &[&first, &second]).await;
    let named = |hash: Hash| {
        let handle = handle.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                while !handle.providers(hash).await.expect("providers").contains(&liar_id) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("the liar's record reached the fetcher");
        }
    };
    named(a).await;

    // The liar is the only provider the first fetch hears of: it proves the size, and the pieces
    // it sends fail verification.
    let fetch = tokio::spawn({
        let handle = handle.clone();
        async move { handle.fetch(a, None).await }
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while handle.status().await.expect("status").avoided.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the liar was found out");
    assert!(asked.count(a, true) > 0, "found out by the pieces it sent");

    // An honest provider of both blobs joins: the first fetch finishes from it.
    let mut pc = config(tmp.path().join("p"));
    pc.bootstrap = vec![faddr];
    let provider = Node::start(pc).await.expect("provider");
    for (name, data) in [("a", &first), ("b", &second)] {
        let file = tmp.path().join(name);
        std::fs::write(&file, data).expect("write");
        provider.handle().add_path(&file).await.expect("add");
    }
    let info =
        tokio::time::timeout(Duration::from_secs(60), fetch).await.expect("in time").expect("task").expect("fetch");
    assert_eq!((info.hash, info.size), (a, first.len() as u64));

    // The DHT names the liar as a provider of the second blob too, and the fetcher holds a
    // connection to it; the fetch asks it nothing.
    named(b).await;
    let peers = handle.peers().await.expect("peers");
    assert!(peers.iter().any(|p| p.peer_id == liar_id.to_string()), "the liar is connected");
    let info =
        tokio::time::timeout(Duration::from_secs(60), handle.fetch(b, None)).await.expect("in time").expect("fetch");
    assert_eq!((info.hash, info.size), (b, second.len() as u64));
    assert_eq!((asked.count(b, false), asked.count(b, true)), (0, 0), "the liar was asked about the second blob");

    let status = handle.status().await.expect("status");
    let avoided: Vec<&(String, u32, u64)> =
        status.avoided.iter().filter(|(p, _, _)| *p == liar_id.to_string()).collect();
    assert!(matches!(avoided[..], [(_, 1.., 1..)]), "{:?}", status.avoided);
    liar.abort();
    fetcher.shutdown().await.expect("shutdown");
    provider.shutdown().await.expect("shutdown");
}
