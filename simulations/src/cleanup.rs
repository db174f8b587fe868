//! What a run leaves on the machine while it lasts — the nodes' stores (about 4 GB at 1,000
//! nodes) and, in a validation, `shoal node` processes — registered here, so that an interrupted
//! run can remove and stop them once nothing of its own runs any more ([`interrupted`]). A run
//! that ends normally removes them itself, and its guards leave the registry as they drop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Option<HashMap<u32, Child>>> = Mutex::new(None);

/// A directory of the run's, removed by [`interrupted`] until this guard drops.
#[derive(Debug)]
pub(crate) struct Dir(PathBuf);

impl Dir {
    pub(crate) fn register(path: &Path) -> Self {
        DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_owned());
        Dir(path.to_owned())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        DIRS.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.0);
    }
}

/// A child process of the run's, killed (and reaped) when this guard drops or by
/// [`interrupted`], whichever comes first.
#[derive(Debug)]
pub(crate) struct Process(u32);

impl Process {
    pub(crate) fn register(child: Child) -> Self {
        let pid = child.id();
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(pid, child);
        Process(pid)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let child = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|c| c.remove(&self.0));
        if let Some(child) = child {
            kill(child);
        }
    }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops every registered process and removes every registered directory. Call it once the
/// run's tasks have stopped (the runtime shut down): a task still running could write into a
/// directory while it is removed. A directory that will not go at once (a blocking write that
/// outlived the shutdown) is tried again for up to `patience`. Returns the directories left.
pub fn interrupted(patience: Duration) -> Vec<PathBuf> {
    let children: Vec<Child> = CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(|c| c.into_values().collect())
        .unwrap_or_default();
    children.into_iter().for_each(kill);
    let mut dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    let deadline = Instant::now() + patience;
    loop {
        dirs.retain(|d| match std::fs::remove_dir_all(d) {
            Ok(()) => false,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        });
        if dirs.is_empty() || Instant::now() >= deadline {
            return dirs;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
