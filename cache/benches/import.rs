//! Import of a 1 GiB file (hash + outboard + write into the store) beside plain single-threaded
//! BLAKE3 hashing of the same bytes, in the same run, with the file in the page cache.
//!
//! `cargo bench -p shoal-cache --bench import` (set `SHOAL_BENCH_MIB` for another size).

use std::io::Write;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_cache::{Store, StoreConfig};

fn size() -> u64 {
    std::env::var("SHOAL_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20
}

fn import(c: &mut Criterion) {
    let size = size();
    // Under target/, on the same disk the store would use, rather than a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let input = dir.path().join("input");
    let mut bytes = vec![0u8; size as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::File::create(&input).and_then(|mut f| f.write_all(&bytes)).expect("write input");

    let mut group = c.benchmark_group("import");
    group.throughput(Throughput::Bytes(size));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    group.bench_function("blake3_in_memory", |b| b.iter(|| blake3::Hasher::new().update(&bytes).finalize()));
    group.bench_function("blake3_from_file", |b| {
        b.iter(|| {
            let f = std::fs::File::open(&input).expect("open");
            blake3::Hasher::new().update_reader(f).expect("read").finalize()
        })
    });
    drop(bytes);
    for durable in [false, true] {
        let config = StoreConfig { cache_bytes: 4 * size, durable, ..Default::default() };
        let store = Store::open(dir.path().join(format!("store-{durable}")), config).expect("open store");
        // Durable: the bytes and outboard are fsynced, bounded by the disk; not durable: the CPU path.
        let name = if durable { "store_import_file_durable" } else { "store_import_file" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let imported = store.import_file(&input, false).expect("import");
                    total += start.elapsed();
                    store.delete(imported.hash).expect("delete");
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, import);
criterion_main!(benches);
