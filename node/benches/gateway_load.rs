//! Load on one node's gateway: 500 concurrent clients each make range requests for random byte
//! ranges of a 64 MiB blob. Reports errors, latency percentiles, throughput and the node's peak
//! RSS. A benchmark, not a test: it asserts nothing about time.
//!
//! `cargo bench -p shoal-node --bench gateway_load` (`SHOAL_LOAD_CLIENTS`, `SHOAL_LOAD_ROUNDS`).

mod common;

use std::time::Duration;

use common::{Gateway, env_or, get, print_outcomes, run_clients};

const BLOB: usize = 64 << 20;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` style probes
    }
    let clients = env_or("SHOAL_LOAD_CLIENTS", 500);
    let rounds = env_or("SHOAL_LOAD_ROUNDS", 4);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let gateway = Gateway::start(dir.path(), &["--max-connections", "1024"]);
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
    let hash = gateway.add(&input);
    let rss_before = peak_rss_kib(gateway.node.id());

    let addr = gateway.addr.clone();
    let (results, wall) = run_clients(clients, rounds, move |seed| {
        let (addr, hash) = (addr.clone(), hash.clone());
        async move {
            let len = 1 + (seed % (1 << 20)) as usize;
            let start = ((seed >> 20) as usize) % (BLOB - len);
            let range = format!("Range: bytes={start}-{}\r\n", start + len - 1);
            let r = tokio::time::timeout(Duration::from_secs(60), get(&addr, &format!("/{hash}"), &range)).await;
            (matches!(r, Ok(Ok((206, n))) if n == len), len)
        }
    });
    let rss_peak = peak_rss_kib(gateway.node.id());
    drop(gateway);

    let bytes: usize = results.iter().filter(|r| r.0).map(|r| r.2).sum();
    println!("gateway_load: {clients} concurrent clients x {rounds} range requests = {} requests", results.len());
    println!(
        "gateway_load: wall {:.2} s, {:.1} MB/s served",
        wall.as_secs_f64(),
        bytes as f64 / 1e6 / wall.as_secs_f64()
    );
    print_outcomes("gateway_load", &results);
    println!("gateway_load: node peak RSS {} MiB (after import {} MiB)", rss_peak / 1024, rss_before / 1024);
}
