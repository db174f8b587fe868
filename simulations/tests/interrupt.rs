//! `shoal-netsim` interrupted in the middle of a flash crowd, while its fetchers write pieces: it
//! stops its nodes, removes their stores from the output directory (a 1,000-node crowd leaves
//! gigabytes there) and exits with status 130.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The nodes' stores under `out`: the run's `shoal-netsim-*` directories.
fn stores(out: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(out)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("shoal-netsim-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a fetcher of the run in `dir` has begun storing the blob.
fn fetching(dir: &Path) -> bool {
    (1..12).any(|i| {
        std::fs::read_dir(dir.join(i.to_string()).join("store").join("blobs")).is_ok_and(|mut e| e.next().is_some())
    })
}

#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes a pid and a signal number and touches no memory of ours.
    let r = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(r, 0, "kill({pid}, {signal})");
}

fn interrupted_run_leaves_no_store(sig: libc::c_int) {
    let out = tempfile::tempdir().expect("tempdir");
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/flash-crowd.toml");
    let child = Command::new(env!("CARGO_BIN_EXE_shoal-netsim"))
        .args(["run", scenario, "--nodes", "12", "--seed", "7", "--out"])
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal-netsim");
    let mut child = Killed(child);

    // Interrupt mid-crowd: once fetchers (every node but the seeder, node 0) write pieces.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if stores(out.path()).iter().any(|d| fetching(d)) {
            break;
        }
        assert!(Instant::now() < deadline, "no fetcher wrote into its store within 120 s");
        assert!(child.0.try_wait().expect("wait").is_none(), "shoal-netsim ended before it was interrupted");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.0.id(), sig);

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "shoal-netsim did not stop within 60 s of the signal");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "exit status after the signal");
    assert_eq!(stores(out.path()), Vec::<std::path::PathBuf>::new(), "the nodes' stores are removed");
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ctrl_c_removes_the_nodes_stores() {
    interrupted_run_leaves_no_store(libc::SIGINT);
}

#[test]
fn sigterm_removes_the_nodes_stores() {
    interrupted_run_leaves_no_store(libc::SIGTERM);
}
