//! Paths looked up in a large collection through one node's gateway, as a site published with
//! `shoal add DIR` is browsed: concurrent clients each ask for random paths of a collection of
//! 100,000 entries (about 6 MiB), every entry naming one small file. Reports errors, latency
//! percentiles and requests a second. A benchmark, not a test: it asserts nothing about time.
//!
//! `cargo bench -p shoal-node --bench gateway_collection` (`SHOAL_LOAD_ENTRIES`,
//! `SHOAL_LOAD_CLIENTS`, `SHOAL_LOAD_ROUNDS`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_node::protocol::Hash;
use shoal_node::protocol::collection::{Collection, Entry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const FILE: &[u8] = b"<!DOCTYPE html><title>a page of a large site</title>\n";

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

fn add(data_dir: &Path, file: &Path) -> String {
    let out = Command::new(SHOAL).args(["add"]).arg(file).env("SHOAL_DATA_DIR", data_dir).output().expect("add");
    assert!(out.status.success(), "add failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("hash").to_string()
}

fn path_of(i: usize) -> String {
    format!("section-{:03}/page-{i:06}.html", i % 1000)
}

/// One HTTP/1.1 request on its own connection: the status and the body length.
async fn get(addr: &str, target: &str) -> std::io::Result<(u16, usize)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {target} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let status = buf.get(9..12).and_then(|s| std::str::from_utf8(s).ok()).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, buf.len() - head_end - 4))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` style probes
    }
    let entries = env_or("SHOAL_LOAD_ENTRIES", 100_000);
    let clients = env_or("SHOAL_LOAD_CLIENTS", 16);
    let rounds = env_or("SHOAL_LOAD_ROUNDS", 50);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let mut node = Command::new(SHOAL)
        .args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
        .args(["--gateway", "127.0.0.1:0"])
        .env("SHOAL_DATA_DIR", &data_dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal node");
    let gateway = wait_for(&data_dir.join("gateway"));
    wait_for(&data_dir.join("api"));

    // Every entry names the one file: the collection is what is looked up, not the files.
    let file = dir.path().join("page.html");
    std::fs::write(&file, FILE).expect("write file");
    assert_eq!(add(&data_dir, &file), Hash::of(FILE).to_string());
    let listed: Vec<Entry> =
        (0..entries).map(|i| Entry { path: path_of(i), hash: Hash::of(FILE), size: FILE.len() as u64 }).collect();
    let encoded = Collection::new(listed).expect("collection").encode();
    let collection_file = dir.path().join("collection");
    std::fs::write(&collection_file, &encoded).expect("write collection");
    let collection = add(&data_dir, &collection_file);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let results = rt.block_on(async {
        let mut tasks = Vec::with_capacity(clients);
        for c in 0..clients {
            let (gateway, collection) = (gateway.clone(), collection.clone());
            tasks.push(tokio::spawn(async move {
                let mut seed = (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut out = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let target = format!("/{collection}/{}", path_of(seed as usize % entries));
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(60), get(&gateway, &target)).await;
                    out.push((matches!(r, Ok(Ok((200, n))) if n == FILE.len()), t0.elapsed()));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    let wall = started.elapsed();
    let _ = node.kill();
    let _ = node.wait();

    let errors = results.iter().filter(|r| !r.0).count();
    let mut lat: Vec<f64> = results.iter().filter(|r| r.0).map(|r| r.1.as_secs_f64() * 1000.0).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
    println!(
        "gateway_collection: {entries} entries ({} bytes), {clients} clients x {rounds} paths = {} requests",
        encoded.len(),
        results.len()
    );
    println!(
        "gateway_collection: errors {errors}, wall {:.2} s, {:.0} requests/s",
        wall.as_secs_f64(),
        results.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "gateway_collection: latency ms p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
