//! `futures_timer::Delay`, kept by the tokio runtime that polls it.
//!
//! libp2p times stream upgrades, idle connections, Kademlia requests, pings and identify with
//! futures-timer, whose timers all live on one global thread: every delay made or reset pushes
//! onto that thread's heap and wakes it with a futex, and every expiry wakes the task back across
//! threads. A node makes such a delay for each stream it opens and each time a connection goes
//! idle, so a busy node spends much of its kernel time waking that thread (netsim's 1,000-node
//! flash crowd: see `docs/ARCHITECTURE.md`, netsim). Shoal runs every libp2p task on tokio, whose
//! timer wheel is part of the runtime: a delay there is an entry in the wheel of the thread that
//! polls it. The workspace's `[patch.crates-io]` puts this crate in futures-timer's place, with
//! the same public API (`Delay::new`, `Delay::reset`, `Future`).
//!
//! The tokio timer is made at the first poll, not in `Delay::new`, so a delay may be made outside
//! a runtime (libp2p builds some in constructors) as long as it is polled inside one with time
//! enabled, as every runtime of Shoal is (`enable_all`). Polled outside any tokio runtime, a
//! delay falls back to a thread that sleeps until the deadline and then wakes the task: correct,
//! and costly, for the rare caller that drives libp2p without tokio.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A future that completes at a point in time, and may be moved to another by [`Delay::reset`].
pub struct Delay {
    deadline: Instant,
    state: State,
}

enum State {
    /// Not polled since it was made or reset outside a runtime.
    Idle,
    /// In the timer wheel of the runtime that first polled it.
    Tokio(Pin<Box<tokio::time::Sleep>>),
    /// Polled outside any tokio runtime: a thread wakes the task at `armed`.
    Thread { armed: Instant, waker: Arc<Mutex<Waker>> },
}

/// A deadline `dur` from now; a duration too long for the clock gives one far enough away (about
/// 30 years, as tokio does) never to come.
fn deadline(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay { deadline: deadline(dur), state: State::Idle }
    }

    /// Moves the deadline to `dur` from now, whether or not the delay has completed: it completes
    /// again then.
    pub fn reset(&mut self, dur: Duration) {
        self.deadline = deadline(dur);
        match &mut self.state {
            State::Tokio(sleep) => sleep.as_mut().reset(self.deadline.into()),
            State::Thread { .. } | State::Idle => {}
        }
    }

    fn poll_thread(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if let State::Thread { armed, waker } = &self.state
            && *armed == self.deadline
        {
            waker.lock().unwrap_or_else(|e| e.into_inner()).clone_from(cx.waker());
            return Poll::Pending;
        }
        let waker = Arc::new(Mutex::new(cx.waker().clone()));
        let (deadline, wake) = (self.deadline, Arc::clone(&waker));
        let spawned = std::thread::Builder::new().name("delay".into()).spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            wake.lock().unwrap_or_else(|e| e.into_inner()).wake_by_ref();
        });
        if spawned.is_err() {
            // No thread to wait on: ask to be polled again rather than never waking.
            cx.waker().wake_by_ref();
        }
        self.state = State::Thread { armed: self.deadline, waker };
        Poll::Pending
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let State::Tokio(sleep) = &mut this.state {
            return sleep.as_mut().poll(cx);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return this.poll_thread(cx);
        }
        let mut sleep = Box::pin(tokio::time::sleep_until(this.deadline.into()));
        let poll = sleep.as_mut().poll(cx);
        this.state = State::Tokio(sleep);
        poll
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay").field("deadline", &self.deadline).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `delay` once with a waker that does nothing.
    fn poll_once(delay: &mut Delay) -> Poll<()> {
        Pin::new(delay).poll(&mut Context::from_waker(Waker::noop()))
    }

    const MS_30: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn completes_at_its_deadline_and_again_after_a_reset() {
        let start = Instant::now();
        let mut delay = Delay::new(MS_30);
        assert!(poll_once(&mut delay).is_pending());
        (&mut delay).await;
        assert!(start.elapsed() >= MS_30, "{:?}", start.elapsed());
        assert!(poll_once(&mut delay).is_ready(), "a completed delay stays completed");

        let reset = Instant::now();
        delay.reset(MS_30);
        assert!(poll_once(&mut delay).is_pending(), "a reset delay waits again");
        (&mut delay).await;
        assert!(reset.elapsed() >= MS_30, "{:?}", reset.elapsed());
    }

    #[tokio::test]
    async fn a_reset_to_sooner_brings_the_deadline_forward() {
        let mut delay = Delay::new(Duration::from_secs(3600));
        assert!(poll_once(&mut delay).is_pending());
        delay.reset(MS_30);
        // Bounded: the test fails rather than waiting the hour out.
        tokio::time::timeout(Duration::from_secs(60), &mut delay).await.expect("completes after the reset");
    }

    #[test]
    fn made_outside_a_runtime_it_runs_on_the_runtime_that_polls_it() {
        let mut delay = Delay::new(Duration::from_millis(20));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async { (&mut delay).await });
        assert!(matches!(delay.state, State::Tokio(_)));
    }

    #[test]
    fn outside_any_runtime_a_thread_wakes_it() {
        let start = Instant::now();
        let mut delay = Delay::new(Duration::from_millis(50));
        // A minimal executor: park this thread until the delay's waker unparks it.
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        while Pin::new(&mut delay).poll(&mut cx).is_pending() {
            polls += 1;
            assert!(polls < 100, "woken {polls} times without completing");
            std::thread::park_timeout(Duration::from_secs(10));
            assert!(start.elapsed() < Duration::from_secs(10), "never woken");
        }
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(matches!(delay.state, State::Thread { .. }));
    }

    struct Unpark(std::thread::Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    #[test]
    fn a_duration_past_the_clock_never_completes() {
        let mut delay = Delay::new(Duration::MAX);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async { assert!(poll_once(&mut delay).is_pending()) });
    }
}
