//! The emulated network's own cost: bytes and requests between nodes over the transport every
//! netsim node runs on (an emulated link, libp2p's plaintext handshake, yamux). That cost bounds
//! how many bytes and requests a crowd moves per second of wall time, and so how large a crowd
//! one process emulates faithfully (docs/ARCHITECTURE.md, netsim). What is measured is the CPU
//! time of the process (both ends, every thread) per iteration, not its wall time: the links have
//! 1 ms of latency, as every emulated link has some, and their frames wait for it on timers.
//!
//! - `bulk`: 16 connections at once, each moving 4 MiB through one stream (`SHOAL_BENCH_MIB` for
//!   another size than 64 in all).
//! - `requests`: 16 connections at once, each opening 100 streams one after another, each a
//!   64-byte request answered with 64 bytes, as a crowd's have-map and watch requests are.
//!
//! `cargo bench -p shoal-simulations --bench link`

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::{AsyncReadExt, AsyncWriteExt};
use shoal_node::libp2p::core::Endpoint;
use shoal_node::libp2p::core::muxing::{StreamMuxerBox, StreamMuxerExt, SubstreamBox};
use shoal_node::libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportEvent};
use shoal_node::libp2p::identity::Keypair;
use shoal_node::libp2p::{PeerId, Transport};
use shoal_simulations::net::{LinkCaps, Network, NetworkConfig};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

const CONNECTIONS: usize = 16;
const REQUESTS: usize = 100;
const REQUEST_LEN: usize = 64;

fn size() -> u64 {
    std::env::var("SHOAL_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(64) << 20
}

/// Drives a connection's multiplexer until it closes, handing over the streams the peer opens.
async fn drive(mut muxer: StreamMuxerBox, inbound: mpsc::UnboundedSender<SubstreamBox>) {
    poll_fn(|cx| {
        loop {
            match muxer.poll_inbound_unpin(cx) {
                Poll::Ready(Ok(stream)) => {
                    let _ = inbound.send(stream);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        loop {
            match muxer.poll_unpin(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Two nodes of one region, connected: a stream opener on the dialer's side, and the streams
/// the listener accepts.
async fn connect() -> (StreamMuxerBox, mpsc::UnboundedReceiver<SubstreamBox>) {
    let net = Network::new(NetworkConfig {
        regions: vec!["here".into()],
        latency: vec![vec![Duration::from_millis(1)]],
        time_scale: 1.0,
    })
    .expect("network");
    let uncapped = LinkCaps { uplink: None, downlink: None };
    let transport = |net: &Arc<Network>| {
        let key = Keypair::generate_ed25519();
        let node = net.add_node(0, uncapped).expect("node");
        (net.transport(node, &key), key.public().to_peer_id())
    };
    let (mut listener, _) = transport(&net);
    let (mut dialer, _) = transport(&net);
    listener.listen_on(ListenerId::next(), "/memory/0".parse().expect("address")).expect("listen");
    let addr = loop {
        if let TransportEvent::NewAddress { listen_addr, .. } =
            poll_fn(|cx| std::pin::Pin::new(&mut listener).poll(cx)).await
        {
            break listen_addr;
        }
    };
    // The listener's side of the handshake ends with the dialer's first stream: the dialer names
    // the multiplexer with its first bytes and does not wait for the answer.
    let (to_listener, accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let upgrade = loop {
            if let TransportEvent::Incoming { upgrade, .. } =
                poll_fn(|cx| std::pin::Pin::new(&mut listener).poll(cx)).await
            {
                break upgrade;
            }
        };
        let (_, muxer): (PeerId, _) = upgrade.await.expect("accepted");
        drive(muxer, to_listener).await;
    });
    let opts = DialOpts { role: Endpoint::Dialer, port_use: PortUse::New };
    let (_, out) = dialer.dial(addr, opts).expect("dial").await.expect("dialled");
    (out, accepted)
}

/// Opens a stream on a connection another task drives.
async fn open(muxer: &mut StreamMuxerBox) -> SubstreamBox {
    poll_fn(|cx| {
        let _ = muxer.poll_unpin(cx);
        muxer.poll_outbound_unpin(cx)
    })
    .await
    .expect("stream")
}

/// Runs `work` while driving the dialer's side of the connection.
async fn with_driven<T>(muxer: &mut StreamMuxerBox, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    poll_fn(|cx| {
        while let Poll::Ready(Ok(_)) = muxer.poll_unpin(cx) {}
        work.as_mut().poll(cx)
    })
    .await
}

/// One connection moving `data` through one stream.
async fn bulk(data: Arc<Vec<u8>>) {
    let (mut muxer, mut accepted) = connect().await;
    let mut out = open(&mut muxer).await;
    let send = async {
        out.write_all(&data).await.expect("write");
        out.close().await.expect("close");
    };
    let receive = tokio::spawn(async move {
        let mut stream = accepted.recv().await.expect("a stream");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.expect("read");
        got.len()
    });
    with_driven(&mut muxer, send).await;
    let got = with_driven(&mut muxer, receive).await.expect("receiver");
    assert_eq!(got, data.len());
}

/// One connection carrying [`REQUESTS`] exchanges, a stream each.
async fn requests() {
    let (mut muxer, mut accepted) = connect().await;
    let server = tokio::spawn(async move {
        let mut served = 0;
        while let Some(mut stream) = accepted.recv().await {
            let mut request = [0u8; REQUEST_LEN];
            stream.read_exact(&mut request).await.expect("request");
            stream.write_all(&request).await.expect("answer");
            stream.close().await.expect("close");
            served += 1;
            if served == REQUESTS {
                break;
            }
        }
        served
    });
    for i in 0..REQUESTS {
        let mut stream = open(&mut muxer).await;
        let exchange = async {
            let request = [i as u8; REQUEST_LEN];
            stream.write_all(&request).await.expect("request");
            stream.flush().await.expect("flush");
            let mut answer = [0u8; REQUEST_LEN];
            stream.read_exact(&mut answer).await.expect("answer");
            assert_eq!(answer, request);
        };
        with_driven(&mut muxer, exchange).await;
    }
    assert_eq!(with_driven(&mut muxer, server).await.expect("server"), REQUESTS);
}

/// Runs [`CONNECTIONS`] of `one` at once.
async fn at_once<F: Future<Output = ()> + Send + 'static>(one: impl Fn() -> F) {
    let tasks: Vec<_> = (0..CONNECTIONS).map(|_| tokio::spawn(one())).collect();
    for task in tasks {
        task.await.expect("connection");
    }
}

/// The CPU time of this process so far (user and system, every thread), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // Clock ticks (USER_HZ, what `sysconf(_SC_CLK_TCK)` names) are 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn link(c: &mut Criterion) {
    let rt = runtime();
    let size = size();
    let data: Arc<Vec<u8>> = Arc::new((0..size / CONNECTIONS as u64).map(|i| (i % 251) as u8).collect());
    let mut group = c.benchmark_group("link");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    group.throughput(Throughput::Bytes(size));
    group.bench_function("bulk", |b| {
        b.iter_custom(|iters| {
            let start = cpu_time();
            for _ in 0..iters {
                rt.block_on(at_once(|| bulk(data.clone())));
            }
            cpu_time() - start
        })
    });
    group.throughput(Throughput::Elements((CONNECTIONS * REQUESTS) as u64));
    group.bench_function("requests", |b| {
        b.iter_custom(|iters| {
            let start = cpu_time();
            for _ in 0..iters {
                rt.block_on(at_once(requests));
            }
            cpu_time() - start
        })
    });
    group.finish();
}

criterion_group!(benches, link);
criterion_main!(benches);
