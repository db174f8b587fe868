//! What the gateway benchmarks share: a real `shoal node` with a gateway, publishing into it,
//! HTTP requests on connections of their own, and the latency summary.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub fn env_or(name: &str, default: usize) -> usize {
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

/// A `shoal node` on loopback with its data under `dir/node`; killed when dropped.
pub struct Gateway {
    pub node: Child,
    pub data_dir: PathBuf,
    /// The gateway's `host:port`.
    pub addr: String,
}

impl Gateway {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let data_dir = dir.join("node");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let node = Command::new(SHOAL)
            .args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
            .args(["--gateway", "127.0.0.1:0"])
            .args(extra)
            .env("SHOAL_DATA_DIR", &data_dir)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shoal node");
        let addr = wait_for(&data_dir.join("gateway"));
        wait_for(&data_dir.join("api"));
        Self { node, data_dir, addr }
    }

    /// `shoal add FILE` into the node: the hash it prints.
    pub fn add(&self, file: &Path) -> String {
        let out =
            Command::new(SHOAL).args(["add"]).arg(file).env("SHOAL_DATA_DIR", &self.data_dir).output().expect("add");
        assert!(out.status.success(), "add failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("hash").to_string()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.node.kill();
        let _ = self.node.wait();
    }
}

/// One HTTP/1.1 `GET target` on its own connection, with `headers` (each line ending in
/// `\r\n`): the status and the body length.
pub async fn get(addr: &str, target: &str, headers: &str) -> std::io::Result<(u16, usize)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {target} HTTP/1.1\r\nHost: shoal\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let status = buf.get(9..12).and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, buf.len() - head_end - 4))
}

/// What one request came to: whether it succeeded, how long it took, and the bytes it moved.
pub type Outcome = (bool, Duration, usize);

/// `clients` concurrent clients, each making `rounds` requests one after the other:
/// `request(seed)`, with a fresh pseudo-random `seed` each time (the same each run), says whether
/// the request succeeded and the bytes it moved. Every request's outcome, and the wall time.
pub fn run_clients<F, Fut>(clients: usize, rounds: usize, request: F) -> (Vec<Outcome>, Duration)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (bool, usize)> + Send,
{
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let outcomes = rt.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let request = request.clone();
                tokio::spawn(async move {
                    let mut seed = (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                    let mut out = Vec::with_capacity(rounds);
                    for _ in 0..rounds {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let t0 = Instant::now();
                        let (ok, moved) = request(seed).await;
                        out.push((ok, t0.elapsed(), moved));
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::with_capacity(clients * rounds);
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    (outcomes, started.elapsed())
}

/// Prints the requests that failed and the latency percentiles, in ms, of those that succeeded.
pub fn print_outcomes(name: &str, outcomes: &[Outcome]) {
    let errors = outcomes.iter().filter(|o| !o.0).count();
    println!("{name}: errors {errors}");
    print_latency(name, outcomes.iter().filter(|o| o.0).map(|o| o.1.as_secs_f64() * 1000.0).collect());
}

/// Prints the latency percentiles, in ms, of the requests that succeeded.
pub fn print_latency(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms.get(((ms.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
    println!("{name}: latency ms p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}", pct(0.5), pct(0.9), pct(0.99), pct(1.0));
}
