//! A store whose process is killed with SIGKILL mid-import or mid-write reopens consistent: no
//! half-imported blob appears, and every piece its metadata marks verified really verifies.
//!
//! The test binary re-runs itself as the child (`crash_child`, ignored in normal runs) and kills it
//! at varying points.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Source, bytes};
use shoal_cache::{Store, StoreConfig};
use shoal_protocol::{PIECE_SIZE, PieceSet};

const CHILD_DIR: &str = "SHOAL_CRASH_CHILD_DIR";
const CHILD_MODE: &str = "SHOAL_CRASH_CHILD_MODE";
const MIB: u64 = 1 << 20;

fn config() -> StoreConfig {
    // Small flush batches, so kills land between, during and after commits.
    StoreConfig { cache_bytes: 1 << 30, hot_bytes: 1 << 20, flush_bytes: MIB, durable: true, ..Default::default() }
}

/// Runs in the child: imports or writes forever, printing a line after each step.
#[test]
#[ignore = "child process of the crash tests; run by them"]
fn crash_child() {
    let (Ok(dir), Ok(mode)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_MODE)) else { return };
    let store = Store::open(&dir, config()).expect("child opens store");
    for round in 0u64.. {
        match mode.as_str() {
            "import" => {
                let data = bytes(round, (8 * MIB + round * 4099) as usize);
                let imported = store.import_reader(&data[..], round % 2 == 0).expect("import");
                println!("imported {}", imported.hash);
            }
            _ => {
                let src = Source::new(bytes(round, (8 * MIB + 12_345) as usize));
                store.begin(src.hash, src.data.len() as u64).expect("begin");
                let n = src.geometry.piece_count();
                // Every other piece first, then the rest: commits happen with holes in the map.
                for p in (0..n).step_by(2).chain((1..n).step_by(2)) {
                    store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]).expect("write");
                    println!("wrote {p}");
                }
            }
        }
    }
}

fn run_and_kill(dir: &Path, mode: &str, lines_before_kill: usize) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let mut seen = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        if line.starts_with("imported") || line.starts_with("wrote") {
            seen += 1;
            if seen >= lines_before_kill {
                break;
            }
        }
    }
    // Let it get into the middle of the next step, then SIGKILL.
    std::thread::sleep(Duration::from_millis(3 * (lines_before_kill as u64 % 7)));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    assert!(seen >= lines_before_kill, "the child stopped early after {seen} steps");
}

fn assert_consistent(dir: &Path) {
    let store = Store::open(dir, config()).expect("the store reopens after a crash");
    assert_eq!(std::fs::read_dir(dir.join("tmp")).expect("tmp").count(), 0, "leftovers are cleared");
    for info in store.list() {
        let marked = info.pieces.clone();
        let bad = store.check(info.hash).expect("check");
        assert!(bad.is_empty(), "blob {} has unverified pieces {bad:?} marked verified", info.hash);
        if marked.is_complete() {
            let out = dir.join("export-check");
            store.export(info.hash, &out).expect("a complete blob exports intact");
            std::fs::remove_file(out).expect("cleanup");
        }
    }
}

#[test]
fn sigkill_mid_import_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (i, steps) in [1, 2, 3, 5].into_iter().enumerate() {
        run_and_kill(tmp.path(), "import", steps);
        assert_consistent(tmp.path());
        let n = Store::open(tmp.path(), config()).expect("open").list().len();
        assert!(n >= steps.min(i + 1), "completed imports survive the crash");
    }
}

#[test]
fn sigkill_mid_write_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = (8 * MIB + 12_345).div_ceil(PIECE_SIZE) as usize;
    for steps in [3, 11, n / 2 + 1, n + 9] {
        run_and_kill(tmp.path(), "write", steps);
        assert_consistent(tmp.path());
    }
    // The child wrote round 0's blob first every time: pieces that were flushed before the kill
    // are still there, and resuming fills in the rest.
    let store = Store::open(tmp.path(), config()).expect("open");
    let src = Source::new(bytes(0, (8 * MIB + 12_345) as usize));
    let begun = store.begin(src.hash, src.data.len() as u64).expect("resume");
    assert!(!begun.have.is_empty(), "flushed pieces survived the kills");
    let missing = PieceSet::full(src.geometry.piece_count()).difference(&begun.have);
    for p in missing.iter() {
        store.write_pieces(src.hash, &src.piece(p), &src.encode(&src.piece(p))[..]).expect("write");
    }
    let out = tmp.path().join("out");
    store.export(src.hash, &out).expect("export");
    assert_eq!(std::fs::read(out).expect("read"), src.data);
}
