//! Load on one node's gateway: 500 concurrent clients each make range requests for random byte
//! ranges of a 64 MiB blob. Reports errors, latency percentiles, throughput and the node's peak
//! RSS. A benchmark, not a test: it asserts nothing about time.
//!
//! `cargo bench -p shoal-node --bench gateway_load` (`SHOAL_LOAD_CLIENTS`, `SHOAL_LOAD_ROUNDS`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const BLOB: usize = 64 << 20;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not appear", path.display());
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 range request on its own connection: the status and the body length.
async fn range_get(addr: &str, hash: &str, start: usize, end: usize) -> std::io::Result<(u16, usize)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET /{hash} HTTP/1.1\r\nHost: shoal\r\nRange: bytes={start}-{end}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(end - start + 512);
    s.read_to_end(&mut buf).await?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let status = std::str::from_utf8(&buf[9..12]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, buf.len() - head_end - 4))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` style probes
    }
    let clients = env_or("SHOAL_LOAD_CLIENTS", 500);
    let rounds = env_or("SHOAL_LOAD_ROUNDS", 4);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let mut node = Command::new(SHOAL)
        .args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
        .args(["--gateway", "127.0.0.1:0", "--max-connections", "1024"])
        .env("SHOAL_DATA_DIR", &data_dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal node");
    let gateway = wait_for(&data_dir.join("gateway"));
    wait_for(&data_dir.join("api"));
    let input = dir.path().join("blob");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..BLOB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&input, &bytes).expect("write blob");
    let out = Command::new(SHOAL).args(["add"]).arg(&input).env("SHOAL_DATA_DIR", &data_dir).output().expect("add");
    assert!(out.status.success(), "add failed: {}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("hash").to_string();
    let rss_before = peak_rss_kib(node.id());

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let results = rt.block_on(async {
        let mut tasks = Vec::with_capacity(clients);
        for c in 0..clients {
            let (gateway, hash) = (gateway.clone(), hash.clone());
            tasks.push(tokio::spawn(async move {
                let mut seed = (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut out = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let len = 1 + (seed % (1 << 20)) as usize;
                    let start = ((seed >> 20) as usize) % (BLOB - len);
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(60),
                        range_get(&gateway, &hash, start, start + len - 1),
                    )
                    .await;
                    let ok = matches!(r, Ok(Ok((206, n))) if n == len);
                    out.push((ok, t0.elapsed(), len));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    });
    let wall = started.elapsed();
    let rss_peak = peak_rss_kib(node.id());
    let _ = node.kill();
    let _ = node.wait();

    let errors = results.iter().filter(|r| !r.0).count();
    let mut lat: Vec<f64> = results.iter().filter(|r| r.0).map(|r| r.1.as_secs_f64() * 1000.0).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
    let bytes: usize = results.iter().filter(|r| r.0).map(|r| r.2).sum();
    println!("gateway_load: {clients} concurrent clients x {rounds} range requests = {} requests", results.len());
    println!(
        "gateway_load: errors {errors}, wall {:.2} s, {:.1} MB/s served",
        wall.as_secs_f64(),
        bytes as f64 / 1e6 / wall.as_secs_f64()
    );
    println!(
        "gateway_load: latency ms p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    println!("gateway_load: node peak RSS {} MiB (after import {} MiB)", rss_peak / 1024, rss_before / 1024);
}
