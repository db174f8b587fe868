//! The threads the nodes run on: one single-threaded tokio runtime per core, each running the
//! tasks of its share of the nodes.
//!
//! A node's tasks (its swarm, its connections, its fetches and uploads) wake one another all the
//! time, and on a work-stealing runtime every such wake-up may cross to another worker, whose
//! thread the kernel must wake (*netsim* in `docs/ARCHITECTURE.md`, "One runtime per core").
//! Pinning each node to one thread keeps those wake-ups on the thread that caused them; only
//! traffic between nodes of different shards crosses, through the emulated links' channels.

use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

/// How long a stopping shard waits for its blocking tasks (store writes).
const PATIENCE: Duration = Duration::from_secs(10);

/// The runtimes nodes run on. Dropping it stops them: every task left on them is dropped and
/// their blocking tasks get [`PATIENCE`] to finish.
pub(crate) struct Shards {
    shards: Vec<Shard>,
}

struct Shard {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Shards {
    /// One shard per core this process may use.
    pub(crate) fn per_core() -> std::io::Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// `count` shards (at least one).
    pub(crate) fn new(count: usize) -> std::io::Result<Self> {
        let mut shards = Vec::with_capacity(count.max(1));
        for k in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread =
                std::thread::Builder::new().name(format!("netsim-shard-{k}")).spawn(move || run(runtime, stopped))?;
            shards.push(Shard { handle, stop: Some(stop), thread: Some(thread) });
        }
        Ok(Self { shards })
    }

    /// The runtime of node `node`'s shard.
    pub(crate) fn handle(&self, node: usize) -> &Handle {
        &self.shards[node % self.shards.len()].handle
    }
}

fn run(runtime: Runtime, stopped: oneshot::Receiver<()>) {
    // Runs the shard's tasks until told to stop (or until the `Shards` is gone).
    runtime.block_on(async {
        let _ = stopped.await;
    });
    runtime.shutdown_timeout(PATIENCE);
}

impl Drop for Shards {
    fn drop(&mut self) {
        // Every shard stops before any is waited for: their nodes' links cross shards.
        for shard in &mut self.shards {
            shard.stop.take();
        }
        for shard in &mut self.shards {
            if let Some(thread) = shard.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_node_runs_on_its_shard_and_stopping_drops_what_is_left() {
        let shards = Shards::new(2).unwrap();
        let name = |node| shards.handle(node).spawn(async { std::thread::current().name().map(str::to_owned) });
        assert_eq!(name(0).await.unwrap().as_deref(), Some("netsim-shard-0"));
        assert_eq!(name(1).await.unwrap().as_deref(), Some("netsim-shard-1"));
        assert_eq!(name(2).await.unwrap().as_deref(), Some("netsim-shard-0"));
        // A task that never ends is dropped when the shards stop.
        let (held, gone) = oneshot::channel::<()>();
        shards.handle(1).spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        drop(shards);
        let gone = tokio::time::timeout(Duration::from_secs(30), gone).await;
        assert!(matches!(gone, Ok(Err(_))), "the task's state was dropped with its shard");
    }
}
