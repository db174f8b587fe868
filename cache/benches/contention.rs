//! What the store's users wait for while fetches begin: one thread serves a piece of a held blob
//! (`encode_pieces`, what answering a peer's `Get` does) again and again, while another begins
//! blobs as new fetches do (durable: their files are sized and synced) and deletes them. Beside
//! it, the same serve with nothing else running.
//!
//! `cargo bench -p shoal-cache --bench contention`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use shoal_cache::{Store, StoreConfig};
use shoal_protocol::{Hash, PIECE_SIZE, PieceSet};

fn contention(c: &mut Criterion) {
    // Under target/, on the same disk the store would use, rather than a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let config = StoreConfig { cache_bytes: 1 << 30, durable: true, ..Default::default() };
    let store = Store::open(dir.path().join("store"), config).expect("open store");
    let input = dir.path().join("input");
    let bytes: Vec<u8> = (0..4 * PIECE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&input, &bytes).expect("write input");
    let held = store.import_file(&input, false).expect("import").hash;
    let piece = PieceSet::single(4, 1);
    let serve = || {
        let (served, encoded) = store.encode_pieces(held, &piece).expect("serve");
        assert_eq!(served, piece);
        encoded.len()
    };

    let mut group = c.benchmark_group("contention");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("serve_a_piece_alone", |b| b.iter(serve));

    let (stop, begun) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let hash = Hash::of(&n.to_le_bytes());
                store.begin(hash, 64 << 20).expect("begin");
                store.delete(hash).expect("delete");
                begun.fetch_add(1, Ordering::Relaxed);
            }
        });
        let started = (Instant::now(), begun.load(Ordering::Relaxed));
        group.bench_function("serve_a_piece_while_fetches_begin", |b| b.iter(serve));
        let (elapsed, count) = (started.0.elapsed().as_secs_f64(), begun.load(Ordering::Relaxed) - started.1);
        stop.store(true, Ordering::Relaxed);
        println!("contention: {count} blobs begun and deleted meanwhile, {:.0} a second", count as f64 / elapsed);
    });
    group.finish();
}

criterion_group!(benches, contention);
criterion_main!(benches);
