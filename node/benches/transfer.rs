//! One blob moved over loopback QUIC, side by side in one run:
//!
//! - `shoal`: a provider and a fetcher `shoal_node::Node` in this process; the fetcher runs a full
//!   `fetch` (DHT lookup, have-map, verified piece requests written into its store).
//! - `quinn_chacha20` / `quinn_aes128gcm`: plain quinn 0.11, one bidirectional stream on an open
//!   connection, the server writing the same bytes from memory and the client reading them to a sink.
//!   libp2p-tls offers ChaCha20-Poly1305 first, so that is what a Shoal connection negotiates.
//!   These use rustls's ring provider; `quinn_aws_lc_chacha20` / `quinn_aws_lc_aes128gcm` use
//!   aws-lc-rs, the provider libp2p-tls builds its configs with, so that the first of them runs
//!   the very cipher code a Shoal connection runs.
//!
//! Criterion measures wall time; the CPU time of the whole process (both sides, user + system)
//! per GiB moved is printed to stderr for each variant.
//!
//! `cargo bench -p shoal-node --bench transfer` (set `SHOAL_BENCH_MIB` for another size than 1024;
//! `RUST_LOG` turns on the node's logs).

use std::cell::Cell;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::SupportedCipherSuite;
use rustls::crypto::CryptoProvider;
use rustls::crypto::{aws_lc_rs, ring};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use shoal_node::{Node, NodeConfig};
use tokio::runtime::Runtime;

fn size() -> u64 {
    std::env::var("SHOAL_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20
}

/// Pseudo-random bytes (xorshift64), so nothing on the path can compress them.
fn random_bytes(size: u64) -> Bytes {
    let mut bytes = vec![0u8; size as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(bytes)
}

/// User and system CPU time of this process so far (every thread: both sides of each transfer).
#[allow(unsafe_code)]
fn cpu_time() -> Cpu {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is valid for writes of one `rusage`, which getrusage fills in when it
    // returns 0; all-zero bytes are a valid `rusage` in any case.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0, "getrusage");
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Cpu { user: tv(usage.ru_utime), system: tv(usage.ru_stime) }
}

/// Writes every dirty page back, so that the kernel's writeback of the setup's files does not
/// compete with the measured transfers for the CPU.
#[allow(unsafe_code)]
fn sync_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        Cpu { user: self.user - rhs.user, system: self.system - rhs.system }
    }
}

/// CPU time and iterations spent in one variant, over warm-up and measurement.
#[derive(Debug, Default)]
struct CpuTally {
    cpu: Cell<Cpu>,
    iterations: Cell<u64>,
}

impl CpuTally {
    fn add(&self, cpu: Cpu) {
        let sum = self.cpu.get();
        self.cpu.set(Cpu { user: sum.user + cpu.user, system: sum.system + cpu.system });
        self.iterations.set(self.iterations.get() + 1);
    }

    fn report(&self, variant: &str, size: u64) {
        if self.iterations.get() == 0 {
            return; // filtered out
        }
        let gib = (self.iterations.get() * size) as f64 / (1u64 << 30) as f64;
        let Cpu { user, system } = self.cpu.get();
        eprintln!(
            "transfer/{variant}: cpu {:.2} s/GiB over {} iterations (user {:.2}, system {:.2})",
            (user + system).as_secs_f64() / gib,
            self.iterations.get(),
            user.as_secs_f64() / gib,
            system.as_secs_f64() / gib,
        );
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn transfer(c: &mut Criterion) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let size = size();
    let data = random_bytes(size);
    let rt = runtime();

    let mut group = c.benchmark_group("transfer");
    group.throughput(Throughput::Bytes(size));
    group.sample_size(10);
    // One iteration moves the whole blob (about a second at 1 GiB): ten of them, not 55.
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(20));

    // --- shoal: two nodes in this process ---
    // Under target/, on the disk a store would use, rather than a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let input = dir.path().join("input");
    std::fs::File::create(&input).and_then(|mut f| f.write_all(&data)).expect("write input");
    let node_config = |name: &str| {
        let mut config = NodeConfig::new(dir.path().join(name));
        config.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr")];
        config.api = None;
        // Not durable, so the disk does not dominate: this measures the transfer path.
        config.durable = false;
        config.cache_bytes = 4 * size + (1 << 30);
        config
    };
    let (provider, fetcher, hash) = rt.block_on(async {
        let provider = Node::start(node_config("provider")).await.expect("start provider");
        let addrs = provider.handle().wait_listening().await.expect("provider listening");
        let mut config = node_config("fetcher");
        config.bootstrap = addrs;
        let fetcher = Node::start(config).await.expect("start fetcher");
        let hash = provider.handle().add_path(&input).await.expect("import").hash;
        let deadline = Instant::now() + Duration::from_secs(60);
        while fetcher.handle().providers(hash).await.expect("lookup").is_empty() {
            assert!(Instant::now() < deadline, "the provider was not findable within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (provider, fetcher, hash)
    });
    sync_disks();
    let tally = CpuTally::default();
    let handle = fetcher.handle();
    group.bench_function("shoal", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (cpu0, start) = (cpu_time(), Instant::now());
                let info = rt.block_on(handle.fetch(hash, None)).expect("fetch");
                total += start.elapsed();
                tally.add(cpu_time() - cpu0);
                assert_eq!(info.size, size);
                handle.store().delete(hash).expect("delete");
            }
            total
        })
    });
    tally.report("shoal", size);
    rt.block_on(async {
        fetcher.shutdown().await.expect("stop fetcher");
        provider.shutdown().await.expect("stop provider");
    });
    drop(dir);

    // --- plain quinn, one cipher suite and crypto provider at a time ---
    let variants: [(&str, Provider, SupportedCipherSuite); 4] = [
        ("quinn_chacha20", ring::default_provider, ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256),
        ("quinn_aes128gcm", ring::default_provider, ring::cipher_suite::TLS13_AES_128_GCM_SHA256),
        ("quinn_aws_lc_chacha20", aws_lc_rs::default_provider, aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256),
        ("quinn_aws_lc_aes128gcm", aws_lc_rs::default_provider, aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256),
    ];
    for (name, provider, suite) in variants {
        let (server, client, connection) =
            rt.block_on(quinn_pair(provider(), suite, data.clone())).expect("quinn setup");
        let tally = CpuTally::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (cpu0, start) = (cpu_time(), Instant::now());
                    let received = rt.block_on(quinn_fetch(&connection)).expect("quinn transfer");
                    total += start.elapsed();
                    tally.add(cpu_time() - cpu0);
                    assert_eq!(received, size);
                }
                total
            })
        });
        tally.report(name, size);
        rt.block_on(async {
            connection.close(0u32.into(), b"done");
            client.wait_idle().await;
            server.close(0u32.into(), b"done");
        });
    }
    group.finish();
}

/// Makes one of rustls's crypto providers.
type Provider = fn() -> CryptoProvider;

/// Transport settings as libp2p-quic 0.14 sets them (`Config::new`: `max_stream_data` 10 MB,
/// `max_connection_data` 15 MB), so that flow control is the same in every variant; the rest
/// (send window, congestion control, MTU discovery) is quinn's default on both paths.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(10_000_000u32.into());
    t.receive_window(15_000_000u32.into());
    Arc::new(t)
}

/// A quinn server and a client on 127.0.0.1, both restricted to `suite` (TLS 1.3) from
/// `provider`, with one connection established. The server answers every bidirectional stream
/// with all of `data`.
async fn quinn_pair(
    mut provider: CryptoProvider,
    suite: SupportedCipherSuite,
    data: Bytes,
) -> anyhow::Result<(quinn::Endpoint, quinn::Endpoint, quinn::Connection)> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());

    // QUIC's Initial packets are always protected with AES-128-GCM, whatever the negotiated suite;
    // the restricted provider may not hold it, so it is taken before the restriction.
    let aes = provider
        .cipher_suites
        .iter()
        .find(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        .copied()
        .expect("the provider offers AES-128-GCM");
    let initial = || aes.tls13().and_then(|s| s.quic_suite()).expect("AES-128-GCM has a QUIC suite");
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);

    let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())?;
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::with_initial(Arc::new(server_tls), initial())?));
    server_config.transport_config(transport());
    let server = quinn::Endpoint::server(server_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client_config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::with_initial(Arc::new(client_tls), initial())?));
    client_config.transport_config(transport());
    let mut client = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    client.set_default_client_config(client_config);

    let server_addr = server.local_addr()?;
    let accepting = server.clone();
    tokio::spawn(async move {
        let Some(incoming) = accepting.accept().await else { return };
        let Ok(connection) = incoming.await else { return };
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            let data = data.clone();
            tokio::spawn(async move {
                // The one-byte request makes the stream visible to the server.
                let mut request = [0u8; 1];
                recv.read_exact(&mut request).await?;
                send.write_all(&data).await?;
                send.finish()?;
                anyhow::Ok(())
            });
        }
    });
    let connection = client.connect(server_addr, "localhost")?.await?;
    Ok((server, client, connection))
}

/// Asks for the data on a new stream and reads it all, discarding it; returns the bytes read.
async fn quinn_fetch(connection: &quinn::Connection) -> anyhow::Result<u64> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&[1]).await?;
    send.finish()?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    Ok(received)
}

criterion_group!(benches, transfer);
criterion_main!(benches);
