//! The store as its users (the node, the CLI) rely on it.

mod common;

use std::fs;

use common::{Source, bytes};
use proptest::prelude::*;
use shoal_cache::{Store, StoreConfig, StoreError};
use shoal_protocol::piece::CHUNK_GROUP_SIZE;
use shoal_protocol::verify::DecodeError;
use shoal_protocol::{Hash, PIECE_SIZE, PieceSet};

const MIB: u64 = 1 << 20;

const SIZES: &[u64] = &[
    0,
    1,
    CHUNK_GROUP_SIZE - 1,
    CHUNK_GROUP_SIZE,
    CHUNK_GROUP_SIZE + 1,
    PIECE_SIZE - 1,
    PIECE_SIZE,
    PIECE_SIZE + 1,
    5 * MIB + 3,
];

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreConfig { cache_bytes: 256 * MIB, ..Default::default() }).expect("open store")
}

/// Writes `data` to a file under `dir` and imports it.
fn import(store: &Store, dir: &std::path::Path, data: &[u8], pin: bool) -> Hash {
    let input = dir.join("in");
    fs::write(&input, data).expect("write");
    store.import_file(&input, pin).expect("import").hash
}

/// Flips bits of the byte at `offset` of a stored blob's data, behind the store's back.
fn rot(store_dir: &std::path::Path, hash: Hash, offset: u64, bits: u8) {
    let data_path = store_dir.join("blobs").join(hash.to_hex()).join("data");
    let mut on_disk = fs::read(&data_path).expect("read");
    on_disk[offset as usize] ^= bits;
    fs::write(&data_path, &on_disk).expect("rot");
}

#[test]
fn imported_files_hash_like_b3sum_and_export_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    for (i, &size) in SIZES.iter().enumerate() {
        let data = bytes(i as u64, size as usize);
        let path = tmp.path().join(format!("in-{size}"));
        fs::write(&path, &data).expect("write input");
        let imported = store.import_file(&path, true).expect("import");
        assert_eq!(imported.hash, Hash::of(&data), "size {size}");
        assert_eq!(imported.size, size);
        let info = store.info(imported.hash).expect("held");
        assert!(info.is_complete() && info.pinned);

        let out = tmp.path().join(format!("out-{size}"));
        assert_eq!(store.export(imported.hash, &out).expect("export"), size);
        assert_eq!(fs::read(&out).expect("read output"), data, "size {size}");

        // The same bytes as a stream of unknown length give the same id.
        let again = store.import_reader(&data[..], false).expect("import stream");
        assert_eq!(again.hash, imported.hash);
    }
}

#[test]
fn pieces_from_the_network_are_served_back_with_proofs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    for (i, &size) in SIZES.iter().enumerate() {
        let src = Source::new(bytes(100 + i as u64, size as usize));
        let n = src.geometry.piece_count();
        let begun = store.begin(src.hash, size).expect("begin");
        assert!(begun.have.is_empty());
        for p in (0..n).rev() {
            let w = store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]).expect("write");
            assert!(w.error.is_none(), "size {size} piece {p}: {:?}", w.error);
            assert_eq!(w.verified, src.piece(p));
        }
        assert!(store.info(src.hash).expect("held").is_complete());
        // What the store serves is exactly what the original provider would send.
        let all = PieceSet::full(n);
        let (served, encoded) = store.encode_pieces(src.hash, &all).expect("encode");
        assert_eq!(served, all);
        assert_eq!(encoded, src.encode(&all), "size {size}");
    }
}

#[test]
fn a_flipped_bit_in_any_piece_is_rejected_and_never_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let src = Source::new(bytes(7, (3 * PIECE_SIZE + 1000) as usize));
    store.begin(src.hash, src.data.len() as u64).expect("begin");
    for p in 0..src.geometry.piece_count() {
        let good = src.encode(&src.piece(p));
        for pos in [0, 63, 64, 100, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[pos] ^= 0x01;
            let w = store.write_pieces(src.hash, &src.piece(p), &bad[..]).expect("local write works");
            assert!(w.verified.is_empty(), "piece {p} flip at {pos} accepted");
            assert!(matches!(w.error, Some(DecodeError::Corrupt { .. })), "{:?}", w.error);
            assert!(w.error.as_ref().is_some_and(DecodeError::is_peer_fault));
            assert!(!store.info(src.hash).expect("held").pieces.contains(p));
        }
    }
    store.flush(src.hash).expect("flush");
    // Whatever reached the data file passed verification: genuine bytes or untouched zeros.
    let on_disk = fs::read(tmp.path().join("blobs").join(src.hash.to_hex()).join("data")).expect("read data");
    for (i, (&d, &o)) in on_disk.iter().zip(&src.data).enumerate() {
        assert!(d == 0 || d == o, "byte {i} on disk was never verified");
    }
    // Nothing is served from a blob with no verified piece.
    let (served, encoded) = store.encode_pieces(src.hash, &PieceSet::full(4)).expect("encode");
    assert!(served.is_empty() && encoded.is_empty());
}

#[test]
fn a_partial_blob_survives_a_restart_with_its_verified_pieces() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = Source::new(bytes(9, (6 * PIECE_SIZE) as usize));
    {
        let store = open(tmp.path());
        store.begin(src.hash, src.data.len() as u64).expect("begin");
        for p in [4, 1, 2] {
            store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]).expect("write");
        }
        store.flush(src.hash).expect("flush");
    }
    let store = open(tmp.path());
    let begun = store.begin(src.hash, src.data.len() as u64).expect("resume");
    assert_eq!(begun.have.iter().collect::<Vec<_>>(), vec![1, 2, 4]);
    assert!(matches!(store.begin(src.hash, 5), Err(StoreError::SizeMismatch { .. })));
    for p in [0, 3, 5] {
        store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]).expect("write");
    }
    let out = tmp.path().join("out");
    store.export(src.hash, &out).expect("export");
    assert_eq!(fs::read(out).expect("read"), src.data);
}

/// A blob's `meta` as format 1 wrote it, its bitmap counting pieces of 256 KiB.
#[derive(serde::Serialize)]
struct MetaV1 {
    format: u8,
    size: u64,
    pinned: bool,
    bitmap: Vec<u8>,
}

#[test]
fn a_store_written_with_256_kib_pieces_opens_with_its_verified_pieces() {
    const V1_PIECE: u64 = 256 * 1024;
    let tmp = tempfile::tempdir().expect("tempdir");
    // Five format-1 pieces, the last one short; format-1 pieces 0, 2 and 4 verified.
    let size = 4 * V1_PIECE + 3 * CHUNK_GROUP_SIZE + 5;
    let src = Source::new(bytes(11, size as usize));
    {
        let store = open(tmp.path());
        store.begin(src.hash, size).expect("begin");
        let all = PieceSet::full(src.geometry.piece_count());
        store.write_pieces(src.hash, &all, &src.encode(&all)[..]).expect("write");
        store.flush(src.hash).expect("flush");
    }
    let meta = MetaV1 { format: 1, size, pinned: true, bitmap: vec![0b10101] };
    let meta_path = tmp.path().join("blobs").join(src.hash.to_hex()).join("meta");
    fs::write(&meta_path, postcard::to_stdvec(&meta).expect("encode")).expect("write meta");

    let store = open(tmp.path());
    let info = store.info(src.hash).expect("the blob is still there");
    assert!(info.pinned, "pinned stays pinned");
    let v1_verified = |p: u32| [0, 2, 4].contains(&(src.geometry.piece_bytes(p).start / V1_PIECE));
    let expected: Vec<u32> = (0..src.geometry.piece_count()).filter(|&p| v1_verified(p)).collect();
    assert_eq!(info.pieces.iter().collect::<Vec<_>>(), expected);
    assert!(store.check(src.hash).expect("check").is_empty(), "what it counts verified is intact");
    // The rest is fetched again, and the blob is whole.
    let missing = PieceSet::full(src.geometry.piece_count()).difference(&info.pieces);
    store.write_pieces(src.hash, &missing, &src.encode(&missing)[..]).expect("write the rest");
    let out = tmp.path().join("out");
    store.export(src.hash, &out).expect("export");
    assert_eq!(fs::read(out).expect("read"), src.data);
}

#[test]
fn the_cache_bound_holds_pinned_blobs_stay_and_evictions_are_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bound = 3 * MIB;
    let store = Store::open(tmp.path(), StoreConfig { cache_bytes: bound, ..Default::default() }).expect("open");
    let pinned_path = tmp.path().join("mine");
    fs::write(&pinned_path, bytes(1, (2 * MIB) as usize)).expect("write");
    let mine = store.import_file(&pinned_path, true).expect("import pinned").hash;

    let mut held: Vec<Hash> = Vec::new();
    for seed in 0..10u64 {
        let src = Source::new(bytes(1000 + seed, MIB as usize));
        let begun = store.begin(src.hash, MIB).expect("begin");
        let all = PieceSet::full(src.geometry.piece_count());
        let written = store.write_pieces(src.hash, &all, &src.encode(&all)[..]).expect("write");
        let evicted: Vec<Hash> = begun.evicted.into_iter().chain(written.evicted).collect();
        for e in &evicted {
            assert!(held.contains(e), "reported an eviction of a blob never cached");
            assert_ne!(*e, mine, "a pinned blob was evicted");
            assert!(store.info(*e).is_none(), "an evicted blob is still held");
        }
        held.retain(|h| !evicted.contains(h));
        held.push(src.hash);
        let stats = store.stats();
        assert!(stats.cache_bytes <= bound, "{stats:?}");
        assert!(store.info(mine).is_some());
    }
    assert_eq!(held.len(), 2, "1 MiB blobs plus outboards: two fit in 3 MiB");
    assert!(store.stats().evictions >= 8);
    // A blob larger than the cache is refused without evicting anything.
    let big = Source::new(bytes(5, (4 * MIB) as usize));
    assert!(matches!(store.begin(big.hash, 4 * MIB), Err(StoreError::TooLarge { .. })));
    assert_eq!(store.list().len(), 3);
    // Unpinning moves the user's blob into the cache, which evicts what no longer fits.
    let evicted = store.unpin(mine).expect("unpin");
    assert!(!evicted.is_empty());
    assert!(store.stats().cache_bytes <= bound);
    // What was evicted left the disk too, and nothing waits in the trash.
    let mut on_disk: Vec<String> = fs::read_dir(tmp.path().join("blobs"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = store.list().iter().map(|b| b.hash.to_hex()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    assert_eq!(fs::read_dir(tmp.path().join("tmp")).expect("list").count(), 0, "the trash was emptied");
}

/// A blob begun from the network is charged for the pieces that arrive, not for its size: a
/// size proof costs nothing to make for a hash nobody holds, and the size it proves evicted the
/// cache before a byte came. Blobs leave, least recent first, as its pieces verify.
#[test]
fn a_begun_blob_is_charged_for_the_pieces_that_arrive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bound = 3 * MIB;
    let store = Store::open(tmp.path(), StoreConfig { cache_bytes: bound, ..Default::default() }).expect("open");
    let older = import(&store, tmp.path(), &bytes(21, MIB as usize), false);
    let newer = import(&store, tmp.path(), &bytes(22, MIB as usize), false);
    // A size about the whole cache for a hash whose bytes nobody has: nothing leaves.
    let nobodys = Hash::from([0xab; 32]);
    let begun = store.begin(nobodys, bound - MIB / 4).expect("begin");
    assert!(begun.evicted.is_empty(), "{begun:?}");
    assert!(store.info(older).is_some() && store.info(newer).is_some());
    assert!(store.delete_if_empty(nobodys).expect("delete"));
    // A real blob: its first half fits beside the two, the second takes the older one's room.
    let src = Source::new(bytes(23, MIB as usize));
    assert!(store.begin(src.hash, MIB).expect("begin").evicted.is_empty());
    let n = src.geometry.piece_count();
    let (first, second) = {
        let mut first = PieceSet::empty(n);
        for p in 0..n / 2 {
            first.insert(p);
        }
        let second = PieceSet::full(n).difference(&first);
        (first, second)
    };
    let written = store.write_pieces(src.hash, &first, &src.encode(&first)[..]).expect("write");
    assert!(written.evicted.is_empty(), "{:?}", written.evicted);
    let written = store.write_pieces(src.hash, &second, &src.encode(&second)[..]).expect("write");
    assert_eq!(written.evicted, vec![older]);
    assert!(store.info(newer).is_some() && store.info(src.hash).is_some_and(|i| i.is_complete()));
    assert!(store.stats().cache_bytes <= bound);
    // A blob larger than the cache is still refused at once.
    assert!(matches!(store.begin(Hash::from([0xcd; 32]), 4 * MIB), Err(StoreError::TooLarge { .. })));
}

/// A partial blob charged for its pieces but larger than the cache bound could never be
/// completed within it: growing, it would evict every other blob first. It goes when the bound
/// is lowered under it, at the next open under a lower bound, and when unpinned.
#[test]
fn a_partial_blob_larger_than_the_bound_goes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = |cache_bytes| StoreConfig { cache_bytes, ..Default::default() };
    let src = Source::new(bytes(24, (2 * MIB) as usize));
    let first = PieceSet::single(src.geometry.piece_count(), 0);
    let partial = |store: &Store| {
        store.begin(src.hash, src.data.len() as u64).expect("begin");
        store.write_pieces(src.hash, &first, &src.encode(&first)[..]).expect("write");
        store.flush(src.hash).expect("flush");
    };
    {
        let store = Store::open(tmp.path(), config(4 * MIB)).expect("open");
        // The whole blob and the partial one's charge together are past the lower bound, the
        // whole blob alone is not: only the partial one goes.
        let kept = import(&store, tmp.path(), &bytes(25, (MIB * 14 / 10) as usize), false);
        partial(&store);
        let evicted = store.set_cache_bytes(MIB + MIB / 2).expect("shrink");
        assert_eq!(evicted, vec![src.hash], "the whole blob fits and stays");
        assert!(store.info(src.hash).is_none() && store.info(kept).is_some());
        let _ = store.set_cache_bytes(4 * MIB).expect("grow back");
        partial(&store);
        store.close();
    }
    {
        let store = Store::open(tmp.path(), config(MIB + MIB / 2)).expect("open under a lower bound");
        assert!(store.info(src.hash).is_none(), "dropped at open");
        assert!(store.stats().cache_bytes <= MIB + MIB / 2);
        store.close();
    }
    // Pinned, it may be larger than the cache; unpinned, it goes.
    let store = Store::open(tmp.path(), config(4 * MIB)).expect("open");
    partial(&store);
    store.pin(src.hash).expect("pin");
    store.set_cache_bytes(MIB).expect("shrink");
    assert!(store.info(src.hash).is_some(), "a pinned blob is the user's");
    assert!(store.unpin(src.hash).expect("unpin").contains(&src.hash));
    assert!(store.info(src.hash).is_none());
}

/// Something in a blob's place that no entry names (what a removal that failed half-way
/// leaves, or a file someone put there) gives way to the blob fetched or imported next, rather
/// than failing it until the next open; what the store cannot read as its own is set aside, as
/// `open` does, not deleted.
#[test]
fn a_stray_directory_in_a_blobs_place_gives_way() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let (fetched, added) = (Source::new(bytes(26, MIB as usize)), bytes(27, 1000));
    let added_hash = Hash::of(&added);
    let stray = tmp.path().join("blobs").join(fetched.hash.to_hex());
    fs::create_dir_all(&stray).expect("mkdir");
    fs::write(stray.join("meta"), b"not the store's").expect("write");
    fs::write(tmp.path().join("blobs").join(added_hash.to_hex()), b"a file").expect("write");
    store.begin(fetched.hash, MIB).expect("begin over the stray directory");
    let all = PieceSet::full(fetched.geometry.piece_count());
    store.write_pieces(fetched.hash, &all, &fetched.encode(&all)[..]).expect("write");
    assert!(store.check(fetched.hash).expect("check").is_empty(), "every piece verifies");
    assert_eq!(import(&store, tmp.path(), &added, false), added_hash);
    assert_eq!(store.read_piece(added_hash, 0).expect("read"), &added[..]);
    let aside = tmp.path().join("aside");
    assert_eq!(fs::read(aside.join(fetched.hash.to_hex()).join("meta")).expect("kept"), b"not the store's");
    assert_eq!(fs::read(aside.join(added_hash.to_hex())).expect("kept"), b"a file");

    // Where nothing can be set aside, the blob fails, and what was in its place stays.
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    fs::write(tmp.path().join("aside"), b"in the way").expect("write");
    let stray = tmp.path().join("blobs").join(fetched.hash.to_hex());
    fs::create_dir_all(&stray).expect("mkdir");
    fs::write(stray.join("meta"), b"not the store's").expect("write");
    assert!(store.begin(fetched.hash, MIB).is_err());
    assert_eq!(fs::read(stray.join("meta")).expect("still there"), b"not the store's");
}

#[test]
fn fetches_beginning_one_blob_at_once_share_one_entry_and_lose_no_piece() {
    // Every round, eight fetches begin one blob at once (each makes its files outside the
    // store's lock), two of them at a size no proof backs, and each then stores its share of
    // the pieces. Whoever comes first makes the entry; the rest find it, and every piece
    // stored lands in it.
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let store = open(&root);
    const FETCHES: u32 = 8;
    for round in 0..8u64 {
        let src = Source::new(bytes(round, 3 * MIB as usize + 5));
        let (size, n) = (src.data.len() as u64, src.geometry.piece_count());
        let start = std::sync::Barrier::new(FETCHES as usize);
        std::thread::scope(|s| {
            for i in 0..FETCHES {
                let (store, start, src) = (&store, &start, &src);
                s.spawn(move || {
                    start.wait();
                    let begun = match i < 2 {
                        true => store.begin_unproven(src.hash, size),
                        false => store.begin(src.hash, size),
                    };
                    let begun = begun.expect("begin");
                    assert!(begun.evicted.is_empty(), "round {round}: {begun:?}");
                    for p in (i..n).step_by(FETCHES as usize) {
                        let w = store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]);
                        assert_eq!(w.expect("write").verified, src.piece(p), "round {round}, piece {p}");
                    }
                });
            }
        });
        // One entry, the whole blob, served as the provider would.
        let info = store.info(src.hash).expect("held");
        assert!(info.is_complete() && info.size == size, "round {round}: {:?} of {n}", info.pieces.count());
        let all = PieceSet::full(n);
        assert_eq!(store.encode_pieces(src.hash, &all).expect("encode").1, src.encode(&all), "round {round}");
    }
    // One directory per blob; no staged copy left in `tmp/`.
    assert_eq!(fs::read_dir(root.join("blobs")).expect("blobs").count(), 8);
    let left: Vec<_> = fs::read_dir(root.join("tmp")).expect("tmp").map(|e| e.expect("entry").file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    // The cache counts each blob once, and a restart finds them all whole.
    let stats = store.stats();
    drop(store);
    let store = open(&root);
    assert_eq!(store.list().iter().filter(|i| i.is_complete()).count(), 8);
    assert_eq!(store.stats().cache_bytes, stats.cache_bytes);
}

/// A size a peer claims but nobody proved opens a blob only in room the cache has free: a false
/// claim evicts nothing. An entry it leaves, holding no verified piece, gives way to the true size.
#[test]
fn an_unproven_size_evicts_nothing_and_an_empty_entry_of_it_gives_way() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bound = 3 * MIB;
    let store = Store::open(tmp.path(), StoreConfig { cache_bytes: bound, ..Default::default() }).expect("open");
    let cached = Source::new(bytes(1, MIB as usize));
    store.begin(cached.hash, MIB).expect("begin");
    let all = PieceSet::full(cached.geometry.piece_count());
    store.write_pieces(cached.hash, &all, &cached.encode(&all)[..]).expect("write");

    // A claim of about the whole cache for another blob: no room without evicting.
    let wanted = Source::new(bytes(2, MIB as usize));
    let refused = store.begin_unproven(wanted.hash, bound - MIB / 2);
    assert!(matches!(refused, Err(StoreError::NoRoom { .. })), "{refused:?}");
    assert!(matches!(store.begin_unproven(wanted.hash, 4 * MIB), Err(StoreError::NoRoom { .. })));
    assert_eq!(store.info(cached.hash).map(|i| i.pieces), Some(all.clone()), "the cached blob stays");
    assert!(store.info(wanted.hash).is_none());

    // A false claim that fits leaves an empty entry of its size behind ...
    let lie = store.begin_unproven(wanted.hash, MIB / 2).expect("room for it");
    assert!(lie.evicted.is_empty() && lie.have.is_empty());
    // A larger claim refused leaves it as it was: a refusal changes nothing.
    assert!(matches!(store.begin_unproven(wanted.hash, 4 * MIB), Err(StoreError::NoRoom { .. })));
    assert_eq!(store.info(wanted.hash).map(|i| i.size), Some(MIB / 2));
    // ... which the true size replaces, and a piece verified under it then holds it.
    store.begin(wanted.hash, MIB).expect("the true size");
    assert_eq!(store.info(wanted.hash).map(|i| i.size), Some(MIB));
    let first = PieceSet::single(wanted.geometry.piece_count(), 0);
    store.write_pieces(wanted.hash, &first, &wanted.encode(&first)[..]).expect("write");
    assert!(matches!(store.begin(wanted.hash, MIB / 2), Err(StoreError::SizeMismatch { .. })));
    assert!(matches!(store.begin_unproven(wanted.hash, MIB / 2), Err(StoreError::SizeMismatch { .. })));
    // The cache's accounting holds through all of it.
    assert!(store.stats().cache_bytes <= bound);
    assert_eq!(store.list().len(), 2);
}

#[test]
fn corrupted_bytes_on_disk_are_never_served_or_exported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let data = bytes(3, (4 * PIECE_SIZE) as usize);
    let hash = import(&store, tmp.path(), &data, true);
    // Rot one byte of piece 2 behind the store's back.
    rot(&tmp.path().join("store"), hash, 2 * PIECE_SIZE + 77, 0x40);

    let out = tmp.path().join("out");
    assert!(matches!(store.export(hash, &out), Err(StoreError::Corrupt { piece: 2, .. })));
    assert!(!out.exists(), "nothing is written to the user's file");
    assert!(!store.info(hash).expect("held").pieces.contains(2), "the bad piece was dropped");

    let (served, _) = store.encode_pieces(hash, &PieceSet::full(4)).expect("encode");
    assert_eq!(served.iter().collect::<Vec<_>>(), vec![0, 1, 3]);
}

#[test]
fn a_blob_moved_out_is_the_users_file_and_leaves_the_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let data = bytes(5, (3 * PIECE_SIZE + 11) as usize);
    let hash = import(&store, tmp.path(), &data, false);
    let before = store.stats();

    let out = tmp.path().join("out");
    fs::write(&out, b"an older file of that name").expect("write");
    assert_eq!(store.move_out(hash, &out).expect("move out"), data.len() as u64);
    assert_eq!(fs::read(&out).expect("read output"), data);
    assert!(store.info(hash).is_none(), "the blob left the store");
    assert_eq!(store.stats().blobs, before.blobs - 1);
    assert!(store.stats().cache_bytes < before.cache_bytes, "and its bytes left the cache's count");
    assert!(!tmp.path().join("store").join("blobs").join(hash.to_hex()).exists());

    // Nothing to move: the error says so and writes nothing.
    let again = tmp.path().join("again");
    assert!(matches!(store.move_out(hash, &again), Err(StoreError::NotFound { .. })));
    assert!(!again.exists());

    // A rename the file system refuses (here: into a directory that does not exist) leaves the
    // blob where it was, to be copied out instead.
    let hash = import(&store, tmp.path(), &data, false);
    let nowhere = tmp.path().join("no such directory").join("out");
    assert!(matches!(store.move_out(hash, &nowhere), Err(StoreError::Io { .. })));
    assert!(store.info(hash).expect("still held").is_complete());
    store.export(hash, &again).expect("export");
    assert_eq!(fs::read(&again).expect("read"), data);

    // What the caller changes through the descriptor is the file's as it appears; put back if
    // the rename is refused, so that the store's copy stays its own to read.
    use std::os::unix::fs::PermissionsExt;
    let data_file = tmp.path().join("store").join("blobs").join(hash.to_hex()).join("data");
    let mode = || fs::metadata(&data_file).expect("stat").permissions().mode() & 0o777;
    let (kept, chmod) = (mode(), |f: &fs::File| f.set_permissions(fs::Permissions::from_mode(0o000)).expect("chmod"));
    assert!(matches!(store.move_out_as(hash, &nowhere, chmod), Err(StoreError::Io { .. })));
    assert_eq!(mode(), kept, "put back");
    let placed = tmp.path().join("placed");
    let chmod = |f: &fs::File| f.set_permissions(fs::Permissions::from_mode(0o751)).expect("chmod");
    store.move_out_as(hash, &placed, chmod).expect("move out");
    assert_eq!(fs::metadata(&placed).expect("stat").permissions().mode() & 0o777, 0o751);
    assert_eq!(fs::read(&placed).expect("read"), data);
}

#[test]
fn a_rotten_blob_is_never_moved_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let data = bytes(6, (4 * PIECE_SIZE) as usize);
    let hash = import(&store, tmp.path(), &data, false);
    rot(&tmp.path().join("store"), hash, 3 * PIECE_SIZE + 1, 0x10);

    let out = tmp.path().join("out");
    assert!(matches!(store.move_out(hash, &out), Err(StoreError::Corrupt { piece: 3, .. })));
    assert!(!out.exists(), "nothing is written to the user's file");
    assert!(!store.info(hash).expect("held").pieces.contains(3), "the bad piece was dropped");
}

#[test]
fn serving_a_rotten_piece_drops_it_and_serves_the_rest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let data = bytes(4, (4 * PIECE_SIZE) as usize);
    let hash = import(&store, tmp.path(), &data, false);
    rot(&tmp.path().join("store"), hash, PIECE_SIZE + 5, 1);
    let (served, encoded) = store.encode_pieces(hash, &PieceSet::full(4)).expect("encode");
    assert_eq!(served.iter().collect::<Vec<_>>(), vec![0, 2, 3]);
    let src = Source::new(data);
    assert_eq!(encoded, src.encode(&served), "the rest is served intact");
    // The drop is durable: after a restart the piece is still missing.
    drop(store);
    let store = open(&tmp.path().join("store"));
    assert!(!store.info(hash).expect("held").pieces.contains(1));
}

#[test]
fn a_holder_of_the_last_piece_proves_the_size_and_a_rotten_one_does_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    for (i, &size) in SIZES.iter().enumerate() {
        let src = Source::new(bytes(200 + i as u64, size as usize));
        let n = src.geometry.piece_count();
        store.begin(src.hash, size).expect("begin");
        if n > 1 {
            let first = src.piece(0);
            store.write_pieces(src.hash, &first, &src.encode(&first)[..]).expect("write");
            assert_eq!(store.size_proof(src.hash).expect("read"), None, "size {size}: no last piece, no proof");
        }
        let last = src.piece(n - 1);
        store.write_pieces(src.hash, &last, &src.encode(&last)[..]).expect("write");
        let proof = store.size_proof(src.hash).expect("read").expect("a proof");
        assert!(shoal_protocol::verify::check_size_proof(src.hash, size, &proof), "size {size}");
    }
    // A last piece rotten on disk proves nothing and is dropped.
    let data = bytes(9, (3 * PIECE_SIZE + 100) as usize);
    let hash = import(&store, tmp.path(), &data, false);
    rot(tmp.path(), hash, 3 * PIECE_SIZE + 50, 1);
    assert_eq!(store.size_proof(hash).expect("read"), None);
    assert!(!store.info(hash).expect("held").pieces.contains(3), "the rotten last piece was dropped");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Pieces arriving in any order, in any grouping, reassemble to the same hash.
    #[test]
    fn any_arrival_order_reassembles_the_blob(
        size in 0u64..(3 * MIB),
        seed in any::<u64>(),
        order_seed in any::<u64>(),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(tmp.path());
        let src = Source::new(bytes(seed, size as usize));
        let n = src.geometry.piece_count();
        let mut order: Vec<u32> = (0..n).collect();
        let mut x = order_seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        store.begin(src.hash, size).expect("begin");
        for batch in order.chunks(1 + (x % 3) as usize) {
            let mut want = PieceSet::empty(n);
            batch.iter().for_each(|p| { want.insert(*p); });
            let w = store.write_pieces(src.hash, &want, &src.encode(&want)[..]).expect("write");
            prop_assert!(w.error.is_none());
            prop_assert_eq!(w.verified, want);
        }
        let out = tmp.path().join("out");
        store.export(src.hash, &out).expect("export");
        prop_assert_eq!(Hash::of(&fs::read(&out).expect("read")), src.hash);
    }
}

#[test]
fn a_piece_found_rotten_while_streaming_cuts_the_answer_off_and_is_dropped() {
    for hot_bytes in [0, StoreConfig::default().hot_bytes] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig { cache_bytes: 256 * MIB, hot_bytes, ..Default::default() };
        let data = bytes(5, (4 * PIECE_SIZE) as usize);
        let store = Store::open(tmp.path().join("store"), config.clone()).expect("open store");
        let hash = import(&store, tmp.path(), &data, false);
        drop(store);
        rot(&tmp.path().join("store"), hash, 2 * PIECE_SIZE + 3 * CHUNK_GROUP_SIZE + 9, 1);
        let store = Store::open(tmp.path().join("store"), config).expect("open store");

        // The first step checks only the start of the answer: piece 2 is still offered.
        let mut stream = store.stream_pieces(hash, &PieceSet::full(4), 1000).expect("open stream");
        assert_eq!(stream.pieces(), &PieceSet::full(4), "hot tier {hot_bytes}");
        let mut sent = Vec::new();
        let failed = loop {
            match stream.next_step(1000) {
                Ok(Some(step)) => sent.extend_from_slice(&step),
                Ok(None) => panic!("hot tier {hot_bytes}: the rotten piece was streamed to the end"),
                Err(e) => break e,
            }
        };
        assert!(matches!(failed, StoreError::Corrupt { piece: 2, .. }), "hot tier {hot_bytes}: {failed:?}");
        let src = Source::new(data.clone());
        let good = src.encode(&PieceSet::full(4));
        assert!(good.starts_with(&sent), "hot tier {hot_bytes}: only checked bytes were sent");
        assert!(sent.len() as u64 >= 2 * PIECE_SIZE, "hot tier {hot_bytes}: pieces 0 and 1 went out whole");
        assert!(stream.next_step(1000).is_err(), "the stream stays cut off");
        assert!(!store.info(hash).expect("held").pieces.contains(2), "hot tier {hot_bytes}: piece 2 was dropped");
        // The next answer leaves it out.
        let (served, encoded) = store.encode_pieces(hash, &PieceSet::full(4)).expect("encode");
        assert_eq!(served.iter().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(encoded, src.encode(&served));
    }
}

#[test]
fn a_stale_answer_finding_rot_leaves_the_blob_added_again_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = bytes(7, (4 * PIECE_SIZE) as usize);
    let store = open(&tmp.path().join("store"));
    let hash = import(&store, tmp.path(), &data, false);
    drop(store);
    rot(&tmp.path().join("store"), hash, 2 * PIECE_SIZE + 9, 1);
    let store = open(&tmp.path().join("store"));
    // An answer on its way holds the blob it opened; meanwhile the blob is deleted and added again,
    // intact, under the same directory.
    let mut stream = store.stream_pieces(hash, &PieceSet::full(4), 1000).expect("open stream");
    store.delete(hash).expect("delete");
    assert_eq!(import(&store, tmp.path(), &data, false), hash);
    let failed = loop {
        match stream.next_step(1000) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the rotten piece was streamed to the end"),
            Err(e) => break e,
        }
    };
    assert!(matches!(failed, StoreError::Corrupt { piece: 2, .. }), "{failed:?}");
    // The old answer's rot is not the new blob's: it keeps every piece, now and after a restart.
    assert_eq!(store.info(hash).expect("held").pieces, PieceSet::full(4));
    drop((stream, store));
    let store = open(&tmp.path().join("store"));
    assert_eq!(store.info(hash).expect("held").pieces, PieceSet::full(4), "the meta on disk is the new blob's");
    let (served, encoded) = store.encode_pieces(hash, &PieceSet::full(4)).expect("encode");
    assert_eq!((served, encoded.len()), (PieceSet::full(4), Source::new(data).encode(&PieceSet::full(4)).len()));
}

#[test]
fn pieces_streamed_from_the_file_join_the_memory_tier_once_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig { cache_bytes: 256 * MIB, ..Default::default() };
    let data = bytes(6, (4 * PIECE_SIZE - 100) as usize);
    let store = Store::open(tmp.path().join("store"), config.clone()).expect("open store");
    let hash = import(&store, tmp.path(), &data, false);
    drop(store);
    let store = Store::open(tmp.path().join("store"), config).expect("open store");
    assert_eq!(store.stats().hot_bytes, 0);
    let mut wanted = PieceSet::single(4, 1);
    wanted.insert(3);
    let mut stream = store.stream_pieces(hash, &wanted, 1000).expect("open stream");
    let mut sent = Vec::new();
    while let Some(step) = stream.next_step(1000).expect("intact") {
        sent.extend_from_slice(&step);
    }
    assert_eq!(sent, Source::new(data.clone()).encode(&wanted));
    let entries = 2 * 256; // what an entry in the tier counts besides its bytes
    assert_eq!(store.stats().hot_bytes as u64, PIECE_SIZE + (PIECE_SIZE - 100) + entries, "pieces 1 and 3, whole");
    // Served again, from the tier, the answer is the same.
    let (served, encoded) = store.encode_pieces(hash, &wanted).expect("encode");
    assert_eq!((served, encoded), (wanted, sent));
}

#[test]
fn an_answer_under_way_for_a_blob_deleted_meanwhile_fills_no_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig { cache_bytes: 256 * MIB, ..Default::default() };
    let data = bytes(16, (4 * PIECE_SIZE) as usize);
    let store = Store::open(tmp.path().join("store"), config.clone()).expect("open store");
    let hash = import(&store, tmp.path(), &data, false);
    drop(store);
    let store = Store::open(tmp.path().join("store"), config).expect("open store");
    let all = PieceSet::full(4);
    let mut stream = store.stream_pieces(hash, &all, 1000).expect("open stream");
    let mut sent = stream.next_step(1000).expect("intact").expect("a first step");
    store.delete(hash).expect("delete");
    assert_eq!(store.stats().hot_bytes, 0);
    // The answer goes on, from the files it holds open, and is whole.
    while let Some(step) = stream.next_step(1000).expect("intact") {
        sent.extend_from_slice(&step);
    }
    assert_eq!(sent, Source::new(data).encode(&all));
    assert_eq!(store.stats().hot_bytes, 0, "pieces of a blob the store no longer holds came back into memory");
}

#[test]
fn a_pinned_entry_of_a_size_never_proven_gives_way_to_the_proven_one_and_keeps_its_pin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let src = Source::new(bytes(17, (3 * PIECE_SIZE + 7) as usize));
    // A peer's false claim opened the entry, and the user pinned it while the fetch went on.
    store.begin_unproven(src.hash, 10 * MIB).expect("begin");
    store.pin(src.hash).expect("pin");
    let begun = store.begin(src.hash, src.geometry.size()).expect("the proven size takes its place");
    assert!(begun.have.is_empty());
    let info = store.info(src.hash).expect("held");
    assert_eq!(info.size, src.geometry.size());
    assert!(info.pinned, "the user's pin was lost");
    // An entry holding verified pieces of its size keeps them, pinned or not.
    let n = src.geometry.piece_count();
    store.write_pieces(src.hash, &PieceSet::single(n, 0), &src.encode(&PieceSet::single(n, 0))[..]).expect("write");
    assert!(matches!(store.begin(src.hash, 10 * MIB), Err(StoreError::SizeMismatch { .. })));
}

#[test]
fn a_whole_answer_leaves_out_a_piece_found_rotten_past_its_first_mib() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    // Past the first MiB, and past the steps an answer on its way is sent in.
    let data = bytes(8, (6 * PIECE_SIZE) as usize);
    let hash = import(&store, tmp.path(), &data, false);
    rot(&tmp.path().join("store"), hash, 5 * PIECE_SIZE + 2 * CHUNK_GROUP_SIZE, 4);
    let (served, encoded) = store.encode_pieces(hash, &PieceSet::full(6)).expect("encode");
    assert_eq!(served.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(encoded, Source::new(data).encode(&served), "the rest is served intact");
    assert!(!store.info(hash).expect("held").pieces.contains(5));
}

#[test]
fn a_store_is_opened_by_one_process_at_a_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    assert!(!Store::in_use(&root).expect("check"), "never created");
    let store = open(&root);
    let hash = import(&store, tmp.path(), b"kept", true);
    // A second opener (another node on the same data directory) would clear the first one's
    // imports in progress: it is refused, and the first store is untouched.
    let second = Store::open(&root, StoreConfig::default());
    assert!(matches!(second, Err(StoreError::InUse { .. })), "{second:?}");
    assert!(Store::in_use(&root).expect("check"));
    assert!(store.info(hash).is_some_and(|b| b.is_complete()));
    drop(store);
    assert!(!Store::in_use(&root).expect("check"), "closed, it is free again");
    assert!(open(&root).info(hash).is_some_and(|b| b.is_complete()));
}

/// A blob the user pinned while it was partial stays pinned once a complete copy is imported
/// over it, also after a restart.
#[test]
fn a_pinned_partial_copy_stays_pinned_when_the_whole_blob_is_imported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = Source::new(bytes(11, (3 * PIECE_SIZE) as usize));
    {
        let store = open(tmp.path());
        store.begin(src.hash, src.data.len() as u64).expect("begin");
        store.write_pieces(src.hash, &src.piece(1), &src.encode(&src.piece(1))[..]).expect("write");
        store.pin(src.hash).expect("pin the partial copy");
        assert_eq!(import(&store, tmp.path(), &src.data, false), src.hash);
        let info = store.info(src.hash).expect("held");
        assert!(info.is_complete() && info.pinned, "{info:?}");
    }
    assert!(open(tmp.path()).info(src.hash).expect("held after a restart").pinned);
}

/// A pinned blob takes no cache room, nor does the whole copy imported over a pinned partial one:
/// it evicts nothing for it, and is not refused for a cache smaller than it.
#[test]
fn a_whole_copy_imported_over_a_pinned_partial_one_needs_no_cache_room() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = Source::new(bytes(12, (3 * PIECE_SIZE) as usize));
    let store = open(tmp.path());
    store.begin(src.hash, src.data.len() as u64).expect("begin");
    store.write_pieces(src.hash, &src.piece(1), &src.encode(&src.piece(1))[..]).expect("write");
    store.pin(src.hash).expect("pin the partial copy");
    let cached = import(&store, tmp.path(), &bytes(13, PIECE_SIZE as usize), false);
    store.set_cache_bytes(2 * PIECE_SIZE).expect("shrink the cache");
    let input = tmp.path().join("whole");
    fs::write(&input, &src.data).expect("write");
    let imported = store.import_file(&input, false).expect("a pinned blob needs no cache room");
    assert!(imported.evicted.is_empty(), "{imported:?}");
    assert!(store.info(cached).is_some(), "nothing was evicted for it");
    let info = store.info(src.hash).expect("held");
    assert!(info.is_complete() && info.pinned, "{info:?}");
}

/// A blob read piece by piece is read to its end though the cache evicts it meanwhile: the reader
/// holds its files, as an upload does.
#[test]
fn a_reader_reads_a_blob_to_its_end_though_it_is_evicted_meanwhile() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), StoreConfig { cache_bytes: 3 * MIB, ..Default::default() }).expect("open");
    let data = bytes(14, (2 * MIB) as usize);
    let read = import(&store, tmp.path(), &data, false);
    let reader = store.reader(read).expect("reader");
    assert_eq!(reader.read_piece(0).expect("first piece"), &data[..PIECE_SIZE as usize]);
    let other = Source::new(bytes(15, (2 * MIB) as usize));
    store.begin(other.hash, other.data.len() as u64).expect("begin");
    let all = PieceSet::full(other.geometry.piece_count());
    let written = store.write_pieces(other.hash, &all, &other.encode(&all)[..]).expect("write");
    assert_eq!(written.evicted, vec![read], "the blob being read made room");
    assert!(store.read_piece(read, 1).is_err(), "gone from the store");
    let pieces = (2 * MIB / PIECE_SIZE) as u32;
    let mut rest = Vec::new();
    for piece in 1..pieces {
        rest.extend_from_slice(&reader.read_piece(piece).expect("read on from the files it holds"));
    }
    assert_eq!(rest, data[PIECE_SIZE as usize..]);
}

/// A tiny blob costs the disk a directory and its files whatever its size: the cache bound counts
/// that, so a bound holds a bounded number of blobs.
#[test]
fn the_cache_bound_counts_what_a_tiny_blob_costs_the_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), StoreConfig { cache_bytes: 512 << 10, ..Default::default() }).expect("open");
    for seed in 0..100u64 {
        import(&store, tmp.path(), &[seed as u8], false);
    }
    let held = store.list().len();
    assert!((1..=32).contains(&held), "{held} one-byte blobs in a 512 KiB cache");
    assert!(store.stats().cache_bytes <= 512 << 10);
}

/// A piece that comes twice (a late request answering after its end-game duplicate) is written
/// once, and counted as the second sender's all the same: the fetch must not take it for a piece
/// that sender left out.
#[test]
fn a_piece_held_already_is_not_written_again_but_counts_as_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let src = Source::new(bytes(16, (2 * PIECE_SIZE) as usize));
    store.begin(src.hash, src.data.len() as u64).expect("begin");
    let decoded = || {
        let mut d = shoal_protocol::verify::PieceDecoder::new(src.hash, src.geometry, &src.piece(0));
        d.push(&src.encode(&src.piece(0))).expect("verifies");
        d.take_ready()
    };
    assert_eq!(store.store_pieces(src.hash, &decoded()).expect("store").pieces, src.piece(0));
    assert_eq!(store.store_pieces(src.hash, &decoded()).expect("store again").pieces, src.piece(0));
    assert_eq!(store.read_piece(src.hash, 0).expect("read"), &src.data[..PIECE_SIZE as usize]);
}

/// A store closed (a node stopped or crashed in a process that opens its store again) leaves the
/// next opener's blobs alone: an eviction in its tasks still winding down took one away.
#[test]
fn a_closed_store_evicts_nothing_from_the_next_opener() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let old = open(tmp.path());
    let data = bytes(17, (3 * PIECE_SIZE) as usize);
    let hash = import(&old, tmp.path(), &data, false);
    old.close();
    let new = open(tmp.path());
    assert!(old.set_cache_bytes(0).expect("shrink the closed store's cache").contains(&hash));
    assert_eq!(new.read_piece(hash, 2).expect("still the new opener's"), &data[2 * PIECE_SIZE as usize..]);
    assert!(new.check(hash).expect("check").is_empty());
    // What the closed store still tries to add is refused, and leaves no name in `tmp/` that the
    // next opener, in the same process, would take next.
    let input = tmp.path().join("late");
    fs::write(&input, bytes(18, 1000)).expect("write");
    assert!(old.import_file(&input, false).is_err());
    for seed in 0..16u64 {
        import(&new, tmp.path(), &bytes(100 + seed, 1000), false);
    }
}

/// The blobs' files of the store at `root` that this process holds open.
fn open_files_under(root: &std::path::Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("list open files")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(root.join("blobs")))
        .count()
}

#[test]
fn a_store_holds_more_blobs_than_it_keeps_files_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let config = StoreConfig { cache_bytes: 256 * MIB, open_blobs: 3, ..Default::default() };
    let store = Store::open(&root, config.clone()).expect("open");
    // Twelve blobs: eight imported, four fetched in two halves, the halves interleaved.
    let mut imported = Vec::new();
    for seed in 0..8u64 {
        let data = bytes(500 + seed, (PIECE_SIZE + 7 * seed) as usize);
        imported.push((import(&store, tmp.path(), &data, seed % 2 == 0), data));
        assert!(open_files_under(&root) <= 6, "{} files open", open_files_under(&root));
    }
    let fetched: Vec<Source> =
        (0..4u64).map(|seed| Source::new(bytes(600 + seed, (3 * PIECE_SIZE) as usize))).collect();
    for src in &fetched {
        store.begin(src.hash, src.data.len() as u64).expect("begin");
        store.write_pieces(src.hash, &src.piece(0), &src.encode(&src.piece(0))[..]).expect("write");
    }
    // An answer being sent keeps its blob's files while every other blob is used.
    let held = &fetched[0];
    let mut answer = store.stream_pieces(held.hash, &held.piece(0), 1000).expect("open stream");
    for src in &fetched {
        let rest = PieceSet::full(3).difference(&src.piece(0));
        store.write_pieces(src.hash, &rest, &src.encode(&rest)[..]).expect("write the rest");
        store.flush(src.hash).expect("flush");
    }
    for (hash, data) in &imported {
        assert_eq!(&store.read_piece(*hash, 0).expect("read"), &data[..PIECE_SIZE as usize]);
        assert!(store.check(*hash).expect("check").is_empty());
    }
    let mut sent = Vec::new();
    while let Some(step) = answer.next_step(1000).expect("the answer goes on") {
        sent.extend_from_slice(&step);
    }
    assert_eq!(sent, held.encode(&held.piece(0)), "the answer was sent whole");
    drop(answer);
    assert!(open_files_under(&root) <= 6, "{} files open with three blobs' allowed", open_files_under(&root));

    // Every blob is whole and verified, after a restart too, with files opened as needed.
    drop(store);
    let store = Store::open(&root, config).expect("reopen");
    assert_eq!(open_files_under(&root), 0, "no blob's files are open after opening");
    for src in &fetched {
        let out = tmp.path().join("out");
        store.export(src.hash, &out).expect("export");
        assert_eq!(fs::read(&out).expect("read"), src.data);
    }
    for (hash, data) in &imported {
        let out = tmp.path().join("out");
        store.export(*hash, &out).expect("export");
        assert_eq!(&fs::read(&out).expect("read"), data);
    }
    assert!(open_files_under(&root) <= 6, "{} files open", open_files_under(&root));
}

#[test]
fn a_blob_directory_this_version_cannot_read_is_set_aside_with_its_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = bytes(77, (2 * PIECE_SIZE + 1) as usize);
    let hash = {
        let store = open(tmp.path());
        import(&store, tmp.path(), &data, true)
    };
    // A newer version's meta: a format this one does not know.
    let dir = tmp.path().join("blobs").join(hash.to_hex());
    let meta = MetaV1 { format: 200, size: data.len() as u64, pinned: true, bitmap: vec![0xff] };
    fs::write(dir.join("meta"), postcard::to_stdvec(&meta).expect("encode")).expect("write meta");
    let store = open(tmp.path());
    assert!(store.info(hash).is_none(), "not a blob this version holds");
    assert!(!dir.exists(), "out of the store");
    let aside = tmp.path().join("aside").join(hash.to_hex());
    assert_eq!(fs::read(aside.join("data")).expect("the data is kept"), data);
    drop(store);

    // The same again is kept beside the first.
    let again = import(&open(tmp.path()), tmp.path(), &data, false);
    assert_eq!(again, hash);
    fs::write(dir.join("meta"), b"\xff\xff garbage").expect("write meta");
    let store = open(tmp.path());
    assert!(store.info(hash).is_none());
    assert!(tmp.path().join("aside").join(format!("{}.1", hash.to_hex())).join("data").exists());
    assert!(aside.join("data").exists());
}

#[test]
fn a_closed_store_marks_nothing_more_and_only_an_empty_unpinned_entry_is_removed_as_empty() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = Source::new(bytes(31, (3 * PIECE_SIZE) as usize));
    let size = src.data.len() as u64;
    {
        let store = open(tmp.path());
        store.begin(src.hash, size).expect("begin");
        store.write_pieces(src.hash, &src.piece(0), &src.encode(&src.piece(0))[..]).expect("write");
        store.flush(src.hash).expect("flush");
        // Closed, as a crashed node's store is: what its tasks still do is not marked.
        store.close();
        store.write_pieces(src.hash, &src.piece(1), &src.encode(&src.piece(1))[..]).expect("write");
        store.flush(src.hash).expect("a flush of a closed store writes nothing");
    }
    let store = open(tmp.path());
    assert_eq!(store.info(src.hash).expect("held").pieces, src.piece(0), "only what was flushed before");
    // An entry holding a verified piece stays; an empty one goes; an empty one the user pinned
    // stays.
    assert!(!store.delete_if_empty(src.hash).expect("check"));
    let empty = Source::new(bytes(32, PIECE_SIZE as usize));
    store.begin(empty.hash, PIECE_SIZE).expect("begin");
    assert!(store.delete_if_empty(empty.hash).expect("check"));
    assert!(store.info(empty.hash).is_none());
    store.begin(empty.hash, PIECE_SIZE).expect("begin");
    store.pin(empty.hash).expect("pin");
    assert!(!store.delete_if_empty(empty.hash).expect("check"));
    // The pin is recorded, and a flush with nothing new keeps it so across a restart.
    store.flush_all().expect("flush");
    drop(store);
    assert!(open(tmp.path()).info(empty.hash).expect("held").pinned);
}

#[test]
fn a_named_pipe_is_refused_at_once_not_waited_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // Opened for reading the usual way, this waits for a writer that never comes.
    let refused = store.import_file(&fifo, true).expect_err("a pipe is no file");
    assert!(matches!(refused, StoreError::NotAFile { .. }), "{refused}");
    assert!(store.list().is_empty());
    assert!(store.import_file(std::path::Path::new("/dev/null"), true).is_err(), "a device");
}

/// A complete blob sent a piece it holds (an end-game duplicate answering late) costs no write:
/// its meta is not written again, nor are its files synced.
#[test]
fn a_piece_of_a_complete_blob_sent_again_writes_nothing() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let src = Source::new(bytes(19, (PIECE_SIZE + 10) as usize));
    store.begin(src.hash, src.data.len() as u64).expect("begin");
    let decoded = || {
        let all = PieceSet::full(src.geometry.piece_count());
        let mut d = shoal_protocol::verify::PieceDecoder::new(src.hash, src.geometry, &all);
        d.push(&src.encode(&all)).expect("verifies");
        d.take_ready()
    };
    store.store_pieces(src.hash, &decoded()).expect("store");
    assert!(store.info(src.hash).expect("held").pieces.is_complete());
    let meta = tmp.path().join("blobs").join(src.hash.to_hex()).join("meta");
    let written = fs::metadata(&meta).expect("meta").ino();
    store.store_pieces(src.hash, &decoded()).expect("store again");
    assert_eq!(fs::metadata(&meta).expect("meta").ino(), written, "the meta was written again");
}

/// A blob directory named in capitals (a copy made by hand) is not a second copy of the blob the
/// store counts: the store names its directories in lower case, and sets such a one aside.
#[test]
fn a_blob_directory_not_named_as_the_store_names_it_is_set_aside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let hash = import(&store, tmp.path(), &bytes(20, (2 * PIECE_SIZE) as usize), false);
    let used = store.stats().cache_bytes;
    store.close();
    drop(store);
    let blobs = tmp.path().join("blobs");
    let upper = hash.to_hex().to_uppercase();
    fs::create_dir(blobs.join(&upper)).expect("copy");
    for f in fs::read_dir(blobs.join(hash.to_hex())).expect("list") {
        let f = f.expect("entry");
        fs::copy(f.path(), blobs.join(&upper).join(f.file_name())).expect("copy");
    }
    let store = open(tmp.path());
    assert!(!blobs.join(&upper).exists(), "the copy was left where the store loads blobs");
    assert!(tmp.path().join("aside").join(&upper).exists(), "the copy was set aside where its owner can look");
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.stats().cache_bytes, used);
    assert!(store.check(hash).expect("check").is_empty());
}

#[test]
fn export_leaves_alone_whatever_is_named_like_its_partial_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let data = bytes(7, (PIECE_SIZE + 5) as usize);
    let hash = import(&store, tmp.path(), &data, true);
    let out = tmp.path().join("out");
    // A user's file under the name an earlier version copied to, and a symbolic link there.
    let theirs = tmp.path().join("out.shoal-partial");
    fs::write(&theirs, b"the user's own").expect("write");
    let target = tmp.path().join("target");
    fs::write(&target, b"linked to").expect("write");
    let linked_out = tmp.path().join("linked");
    std::os::unix::fs::symlink(&target, tmp.path().join("linked.shoal-partial")).expect("symlink");

    assert_eq!(store.export(hash, &out).expect("export"), data.len() as u64);
    assert_eq!(store.export(hash, &linked_out).expect("export"), data.len() as u64);
    assert_eq!(fs::read(&out).expect("read"), data);
    assert_eq!(fs::read(&linked_out).expect("read"), data);
    assert_eq!(fs::read(&theirs).expect("read"), b"the user's own");
    assert_eq!(fs::read(&target).expect("read"), b"linked to");
    // And nothing of the copies is left beside them.
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["in", "linked", "linked.shoal-partial", "out", "out.shoal-partial", "store", "target"]);
}

#[test]
fn a_file_written_in_place_while_it_is_imported_is_refused() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let path = tmp.path().join("in");
    fs::write(&path, bytes(3, (64 * MIB) as usize)).expect("write");
    let file = fs::OpenOptions::new().write(true).open(&path).expect("open");
    let stop = AtomicBool::new(false);
    let imported = std::thread::scope(|s| {
        // Rewrites its first byte over and over, the size never changing, until the import ends.
        let writer = s.spawn(|| {
            let mut wrote = 0u64;
            while !stop.load(Ordering::Relaxed) || wrote == 0 {
                file.write_all_at(&[wrote as u8], 0).expect("rewrite");
                wrote += 1;
            }
        });
        let imported = store.import_file(&path, true);
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        imported
    });
    assert_eq!(fs::metadata(&path).expect("stat").len(), 64 * MIB);
    assert!(
        matches!(imported, Err(StoreError::ChangedDuringImport { .. })),
        "a file rewritten as it was read was imported: {imported:?}"
    );
    assert!(store.list().is_empty(), "nothing is kept of a refused import");
}

#[test]
fn an_import_told_to_stop_stops_reading_and_keeps_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let path = tmp.path().join("in");
    let data = bytes(5, (16 * MIB) as usize);
    fs::write(&path, &data).expect("write");
    // Asked before each MiB is read: told to stop before the third.
    let asked = AtomicUsize::new(0);
    let imported = store.import_file_unless(&path, true, &|| asked.fetch_add(1, Ordering::SeqCst) >= 2);
    assert!(matches!(imported, Err(StoreError::ImportStopped { .. })), "{imported:?}");
    assert_eq!(asked.load(Ordering::SeqCst), 3, "the copy read on after it was told to stop");
    assert!(store.list().is_empty() && store.info(Hash::of(&data)).is_none(), "{:?}", store.list());
    let staged: Vec<_> = fs::read_dir(tmp.path().join("store/tmp")).expect("tmp").collect();
    assert!(staged.is_empty(), "the stopped import's copy was left in tmp/: {staged:?}");
    // An empty file is asked too, before its first read.
    let empty = tmp.path().join("empty");
    fs::write(&empty, b"").expect("write");
    let imported = store.import_file_unless(&empty, true, &|| true);
    assert!(matches!(imported, Err(StoreError::ImportStopped { .. })), "{imported:?}");
    // Not told to stop, the same file imports.
    assert_eq!(store.import_file_unless(&path, true, &|| false).expect("import").hash, Hash::of(&data));
}

#[test]
fn an_import_says_whether_it_pinned_what_was_not_pinned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let path = tmp.path().join("in");
    fs::write(&path, bytes(9, 1000)).expect("write");
    assert!(!store.import_file(&path, false).expect("import").newly_pinned, "held in the cache");
    assert!(store.import_file(&path, true).expect("import").newly_pinned, "a cached copy pinned");
    assert!(!store.import_file(&path, true).expect("import").newly_pinned, "pinned before");
    fs::write(&path, bytes(10, 1000)).expect("write");
    assert!(store.import_file(&path, true).expect("import").newly_pinned, "new and pinned");
}

#[test]
fn a_tentative_pin_is_undone_only_while_no_other_pin_came() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("store"));
    let tentatively = |name: &str, token: u64| {
        let path = tmp.path().join(name);
        if !path.exists() {
            fs::write(&path, name.as_bytes()).expect("write");
        }
        let file = fs::File::open(&path).expect("open");
        store.import_opened_tentatively(&file, &path, token, &|| false).expect("import").hash
    };
    let pinned = |hash: Hash| store.info(hash).expect("held").pinned;
    // Nothing else pinned it: undone.
    let a = tentatively("a", 1);
    store.undo_tentative_pin(a, 1).expect("undo");
    assert!(!pinned(a));
    // The user pinned it meanwhile, or a plain import did: kept.
    let b = tentatively("b", 2);
    store.pin(b).expect("pin");
    store.undo_tentative_pin(b, 2).expect("undo");
    assert!(pinned(b), "the user's pin was undone");
    let c = tentatively("c", 3);
    store.import_file(&tmp.path().join("c"), true).expect("import");
    store.undo_tentative_pin(c, 3).expect("undo");
    assert!(pinned(c), "a plain import's pin was undone");
    // A second copy in the same import is its own: undone.
    let d = tentatively("d", 4);
    assert_eq!(tentatively("d", 4), d);
    store.undo_tentative_pin(d, 4).expect("undo");
    assert!(!pinned(d), "an import's second copy kept its own pin");
    // Another import relied on it: kept by either's undo.
    let e = tentatively("e", 5);
    tentatively("e", 6);
    store.undo_tentative_pin(e, 5).expect("undo");
    store.undo_tentative_pin(e, 6).expect("undo");
    assert!(pinned(e));
    // Settled, or pinned before: kept.
    let f = tentatively("f", 7);
    store.settle_tentative_pin(f, 7);
    store.undo_tentative_pin(f, 7).expect("undo");
    assert!(pinned(f));
    store.import_file(&tmp.path().join("a"), true).expect("import");
    tentatively("a", 8);
    store.undo_tentative_pin(a, 8).expect("undo");
    assert!(pinned(a), "a pin from before the import was undone");
}
