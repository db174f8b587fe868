//! Paths looked up in a large collection through one node's gateway, as a site published with
//! `shoal add DIR` is browsed: concurrent clients each ask for random paths of a collection of
//! 100,000 entries (about 6 MiB), every entry naming one small file. Reports errors, latency
//! percentiles and requests a second. A benchmark, not a test: it asserts nothing about time.
//!
//! `cargo bench -p shoal-node --bench gateway_collection` (`SHOAL_LOAD_ENTRIES`,
//! `SHOAL_LOAD_CLIENTS`, `SHOAL_LOAD_ROUNDS`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Gateway, env_or, get, print_outcomes, run_clients};
use shoal_node::protocol::Hash;
use shoal_node::protocol::collection::{Collection, Entry};

const FILE: &[u8] = b"<!DOCTYPE html><title>a page of a large site</title>\n";

fn path_of(i: usize) -> String {
    format!("section-{:03}/page-{i:06}.html", i % 1000)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` style probes
    }
    let entries = env_or("SHOAL_LOAD_ENTRIES", 100_000);
    let clients = env_or("SHOAL_LOAD_CLIENTS", 16);
    let rounds = env_or("SHOAL_LOAD_ROUNDS", 50);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let gateway = Gateway::start(dir.path(), &[]);

    // Every entry names the one file: the collection is what is looked up, not the files.
    let file = dir.path().join("page.html");
    std::fs::write(&file, FILE).expect("write file");
    assert_eq!(gateway.add(&file), Hash::of(FILE).to_string());
    let listed: Vec<Entry> =
        (0..entries).map(|i| Entry { path: path_of(i), hash: Hash::of(FILE), size: FILE.len() as u64 }).collect();
    let encoded = Collection::new(listed).expect("collection").encode();
    let collection_file: &Path = &dir.path().join("collection");
    std::fs::write(collection_file, &encoded).expect("write collection");
    let collection = gateway.add(collection_file);

    let addr = gateway.addr.clone();
    let (results, wall) = run_clients(clients, rounds, move |seed| {
        let target = format!("/{collection}/{}", path_of(seed as usize % entries));
        let addr = addr.clone();
        async move {
            let r = tokio::time::timeout(Duration::from_secs(60), get(&addr, &target, "")).await;
            (matches!(r, Ok(Ok((200, n))) if n == FILE.len()), FILE.len())
        }
    });
    drop(gateway);

    println!(
        "gateway_collection: {entries} entries ({} bytes), {clients} clients x {rounds} paths = {} requests",
        encoded.len(),
        results.len()
    );
    println!(
        "gateway_collection: wall {:.2} s, {:.0} requests/s",
        wall.as_secs_f64(),
        results.len() as f64 / wall.as_secs_f64()
    );
    print_outcomes("gateway_collection", &results);
}
