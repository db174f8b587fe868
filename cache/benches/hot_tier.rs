//! Blobs leaving the store while the memory tier holds many small blobs' pieces: 20,000 blobs
//! of 1 KiB, each served once (so its only piece is in the tier, as a node serving a catalogue
//! of small files has them). Then every blob is deleted one at a time (`shoal rm`; the time of
//! each, median and p99; the tier empties as they go, so the median delete finds about half
//! of the pieces still there), and, in a second store set up the same way, the cache's bound is
//! cut so that every blob is evicted at once, as admitting a large blob evicts many small ones
//! (one call: the evictions under the store's lock, then the files deleted after it).
//!
//! The stores are on a tmpfs (`/dev/shm`, where there is one): what is measured is the store's
//! own work for a blob leaving, not the file system's, which on a disk takes longer and varies
//! more than the whole of it.
//!
//! `cargo bench -p shoal-cache --bench hot_tier` (set `SHOAL_BENCH_BLOBS` for another count).

use std::time::{Duration, Instant};

use shoal_cache::{Store, StoreConfig};
use shoal_protocol::{Hash, PieceSet};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` style probes
    }
    let blobs = std::env::var("SHOAL_BENCH_BLOBS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000usize);
    assert!(blobs > 0, "SHOAL_BENCH_BLOBS must be at least 1");
    let shm = std::path::Path::new("/dev/shm");
    let dir = tempfile::tempdir_in(if shm.is_dir() { shm } else { std::path::Path::new(env!("CARGO_TARGET_TMPDIR")) })
        .expect("tempdir");

    let (store, hashes) = served(&dir.path().join("deleted"), blobs);
    let mut took: Vec<Duration> = Vec::with_capacity(blobs);
    for hash in &hashes {
        let started = Instant::now();
        store.delete(*hash).expect("delete");
        took.push(started.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let total: f64 = took.iter().map(Duration::as_secs_f64).sum();
    println!("hot_tier: {blobs} blobs of 1 KiB, each piece in the memory tier, under {}", dir.path().display());
    println!("hot_tier: delete one at a time: median {:.1} µs, p99 {:.1} µs, total {total:.2} s", at(0.5), at(0.99));
    assert_eq!(store.stats().hot_bytes, 0, "the tier is empty once every blob left");
    drop(store);

    let (store, _) = served(&dir.path().join("evicted"), blobs);
    let started = Instant::now();
    let evicted = store.set_cache_bytes(0).expect("shrink");
    println!("hot_tier: evict all at once: {:.3} s ({} blobs)", started.elapsed().as_secs_f64(), evicted.len());
    assert_eq!(evicted.len(), blobs);
    assert_eq!(store.stats().hot_bytes, 0);
}

/// A store holding `blobs` blobs of 1 KiB, each served once: its piece in the memory tier.
fn served(root: &std::path::Path, blobs: usize) -> (Store, Vec<Hash>) {
    // Room for every blob (each counts 16 KiB besides its bytes) and every piece in the tier.
    let config = StoreConfig {
        cache_bytes: (blobs as u64) << 16,
        hot_bytes: blobs * 2048,
        durable: false,
        ..Default::default()
    };
    let store = Store::open(root, config).expect("open store");
    let hashes: Vec<Hash> = (0..blobs)
        .map(|i| {
            let bytes: Vec<u8> = format!("blob {i:08} ").bytes().cycle().take(1024).collect();
            let hash = store.import_reader(&bytes[..], false).expect("import").hash;
            store.encode_pieces(hash, &PieceSet::full(1)).expect("serve");
            hash
        })
        .collect();
    let hot = store.stats().hot_bytes;
    assert!(hot >= blobs * 1024, "every piece in the tier ({hot} bytes)");
    (store, hashes)
}
