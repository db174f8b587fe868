//! Node-wide bandwidth caps: a token bucket shared by every upload (or every download).
//!
//! Bytes are taken from the bucket before they are written or read, in chunks of at most
//! [`CHUNK`], so over any interval `t` the bytes moved stay within `rate × t + burst`, with the
//! burst one chunk. What was taken but did not move (a read that brought less than it was
//! allowed, a wait cancelled) is given back, so a slow sender does not spend the cap that a
//! fast one could fill.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The most bytes moved per bucket withdrawal; also the bucket's depth.
pub(crate) const CHUNK: usize = 64 * 1024;

/// A shared bytes-per-second cap.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    /// Tokens available and when they were counted. Tokens may go negative: a debt that later
    /// callers wait out, which keeps the order fair.
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A cap of `bytes_per_sec`; `None` for no cap.
    pub(crate) fn new(bytes_per_sec: Option<u64>) -> Option<Self> {
        let rate = bytes_per_sec.filter(|r| *r > 0)? as f64;
        Some(Self { rate, state: Mutex::new((CHUNK as f64, Instant::now())) })
    }

    /// Waits until `n` bytes (at most [`CHUNK`]) may move.
    pub(crate) async fn take(&self, n: usize) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *st;
            let refilled = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(CHUNK as f64);
            let left = refilled - n as f64;
            *st = (left, now);
            if left >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-left / self.rate) }
        };
        if !wait.is_zero() {
            // Given back if the wait is cancelled (a request aborted): those bytes never move.
            let refund = Refund { limit: self, bytes: n };
            tokio::time::sleep(wait).await;
            std::mem::forget(refund);
        }
    }

    /// Returns `n` bytes taken but not moved: a read that brought fewer than it was allowed.
    pub(crate) fn give_back(&self, n: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = (st.0 + n as f64).min(CHUNK as f64);
    }
}

/// Gives bytes back to a [`RateLimit`] when dropped.
struct Refund<'a> {
    limit: &'a RateLimit,
    bytes: usize,
}

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        self.limit.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_over_any_interval() {
        let cap = RateLimit::new(Some(1 << 20)).expect("capped");
        let start = Instant::now();
        let mut moved = 0usize;
        while moved < 5 << 20 {
            cap.take(CHUNK).await;
            moved += CHUNK;
            let elapsed = start.elapsed().as_secs_f64();
            assert!(moved as f64 <= (1 << 20) as f64 * elapsed + CHUNK as f64 + 1.0, "{moved} bytes in {elapsed} s");
        }
        // Five MiB at one MiB/s takes five seconds (less the initial burst), on the paused clock.
        let secs = start.elapsed().as_secs_f64();
        assert!((4.9..5.1).contains(&secs), "{secs}");
        assert!(RateLimit::new(None).is_none() && RateLimit::new(Some(0)).is_none());
    }

    /// Bytes allowed but not moved (a short read, a request cancelled while it waited) are
    /// not charged: the cap is spent on what moves.
    #[tokio::test(start_paused = true)]
    async fn bytes_that_did_not_move_are_given_back() {
        let cap = RateLimit::new(Some(1 << 20)).expect("capped");
        let start = Instant::now();
        // A chunk allowed and one byte of it read, 64 times: 64 bytes moved, not 4 MiB.
        for _ in 0..64 {
            cap.take(CHUNK).await;
            cap.give_back(CHUNK - 1);
        }
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
        // Waits cancelled before their turn leave no debt behind them.
        cap.take(CHUNK).await;
        let start = Instant::now();
        // (Each is cut off after the timer's 1 ms; the bucket refills meanwhile.)
        for _ in 0..16 {
            let cancelled = tokio::time::timeout(Duration::from_micros(1), cap.take(CHUNK)).await;
            assert!(cancelled.is_err(), "{:?}", start.elapsed());
        }
        // One chunk's own wait, 62.5 ms in all, not 17 chunks'.
        cap.take(CHUNK).await;
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
    }
}
