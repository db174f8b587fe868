//! How the piece size trades per-request cost against granularity: a 64 MiB blob served and
//! verified piece by piece (one encode with proofs and one verified decode per piece), at piece
//! sizes from 16 KiB to 4 MiB, measured side by side. Also prints the proof overhead per size.
//!
//! A second group verifies the same blob in the node's own requests (the fetch's default, 1 MiB), with
//! bao-tree's `decode_ranges` beside Shoal's `PieceDecoder` fed in 64 KiB reads as the node feeds
//! it, so that the incremental decoder is measured against the library's.
//!
//! `cargo bench -p shoal-protocol --bench piece_size`

use std::time::Duration;

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{decode_ranges, encode_ranges_validated};
use bao_tree::{ChunkNum, ChunkRanges};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shoal_protocol::fetch::FetchConfig;
use shoal_protocol::piece::BLOCK_SIZE;
use shoal_protocol::{Geometry, PIECE_SIZE, PieceSet, verify};

const BLOB: u64 = 64 << 20;

fn piece_sizes(c: &mut Criterion) {
    let mut data = vec![0u8; BLOB as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let mut ob = Vec::new();
    let hash = verify::outboard(&data[..], BLOB, &mut ob).expect("outboard");
    let geometry = Geometry::new(BLOB).expect("size");
    let tree = geometry.tree();
    assert_eq!(tree.block_size(), BLOCK_SIZE);

    let mut group = c.benchmark_group("serve_and_verify_64MiB");
    group.throughput(Throughput::Bytes(BLOB));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for piece_kib in [16u64, 64, 128, 256, 1024, 4096] {
        let chunks = piece_kib; // 1 KiB BLAKE3 chunks per piece
        let pieces = BLOB / (piece_kib * 1024);
        let mut wire = Vec::new();
        let mut encoded_total = 0u64;
        for p in 0..pieces {
            wire.clear();
            let ranges = ChunkRanges::from(ChunkNum(p * chunks)..ChunkNum((p + 1) * chunks));
            let src = PostOrderOutboard { root: hash.as_blake3(), tree, data: &ob[..] };
            encode_ranges_validated(&data[..], &src, &ranges, &mut wire).expect("encode");
            encoded_total += wire.len() as u64;
        }
        eprintln!(
            "piece {piece_kib:>5} KiB: {pieces:>5} requests, proof overhead {:.3}%",
            100.0 * (encoded_total - BLOB) as f64 / BLOB as f64
        );
        group.bench_with_input(BenchmarkId::from_parameter(format!("{piece_kib}KiB")), &piece_kib, |b, _| {
            let mut target = vec![0u8; BLOB as usize];
            let mut rebuilt = vec![0u8; ob.len()];
            b.iter(|| {
                for p in 0..pieces {
                    wire.clear();
                    let ranges = ChunkRanges::from(ChunkNum(p * chunks)..ChunkNum((p + 1) * chunks));
                    let src = PostOrderOutboard { root: hash.as_blake3(), tree, data: &ob[..] };
                    encode_ranges_validated(&data[..], &src, &ranges, &mut wire).expect("encode");
                    let dst = PostOrderOutboard { root: hash.as_blake3(), tree, data: &mut rebuilt[..] };
                    decode_ranges(&wire[..], &ranges, &mut target[..], dst).expect("decode");
                }
            })
        });
    }
    group.finish();

    // The node's requests, encoded once up front; only the decoding is timed.
    let per_request = FetchConfig::default().pieces_per_request;
    assert_eq!(u64::from(per_request) * PIECE_SIZE, 1 << 20, "the group's name says 1 MiB");
    let requests: Vec<(PieceSet, Vec<u8>)> = (0..geometry.piece_count())
        .step_by(per_request as usize)
        .map(|first| {
            let mut pieces = PieceSet::empty(geometry.piece_count());
            pieces.insert_range(first..(first + per_request).min(geometry.piece_count()));
            let mut wire = Vec::new();
            let src = verify::post_order_outboard(hash, geometry, &ob[..]);
            verify::encode_pieces(&data[..], src, &pieces, &mut wire).expect("encode");
            (pieces, wire)
        })
        .collect();
    let mut group = c.benchmark_group("verify_64MiB_in_1MiB_requests");
    group.throughput(Throughput::Bytes(BLOB));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let mut target = vec![0u8; BLOB as usize];
    let mut rebuilt = vec![0u8; ob.len()];
    group.bench_function("bao_decode_ranges", |b| {
        b.iter(|| {
            for (pieces, wire) in &requests {
                let ranges = geometry.chunk_ranges(pieces);
                let dst = PostOrderOutboard { root: hash.as_blake3(), tree, data: &mut rebuilt[..] };
                decode_ranges(&wire[..], &ranges, &mut target[..], dst).expect("decode");
            }
        })
    });
    group.bench_function("piece_decoder", |b| {
        b.iter(|| {
            for (pieces, wire) in &requests {
                let mut decoder = verify::PieceDecoder::new(hash, geometry, pieces);
                for slice in wire.chunks(64 * 1024) {
                    decoder.push(slice).expect("genuine");
                    for piece in decoder.take_ready() {
                        let dst = PostOrderOutboard { root: hash.as_blake3(), tree, data: &mut rebuilt[..] };
                        piece.write_to(&mut target[..], dst).expect("in memory");
                    }
                }
                decoder.finish().expect("complete");
            }
        })
    });
    group.finish();
    assert!(target == data, "both decoders rebuilt the blob");
}

criterion_group!(benches, piece_sizes);
criterion_main!(benches);
