//! Piece-upload slots under an upload cap, and the short line of requests waiting for one, served
//! in order of priority rather than of arrival.
//!
//! A node in a crowd holds some pieces many peers hold and one or two that few do: the piece it
//! received last, which it is among the first to hold. Served in arrival order, a request for
//! that piece waits behind (or is turned away by a line full of) requests for pieces the
//! requesters could get anywhere, and the piece the crowd will finish on spreads at the pace of
//! the holder's line. So a waiting request carries a priority (the transfer code gives the count
//! of peers this node remembers serving the request's least served piece to), the line is served
//! lowest first and, among equals, first come first served, and a request that finds the line
//! full takes the place of the worst waiting one if it is better (that one is answered `Busy`
//! and asks the other holders, as any requester turned away does).
//!
//! Bounded: at most `line` requests wait, each for at most the wait its caller gives.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// A request's place in the line: its priority (lower first), then its arrival.
type Place = (u32, u64);

/// What a waiting request is told: a slot, or that a better request took its place.
type Answer = Result<Slot, ()>;

/// Piece-upload slots and the requests waiting for one.
#[derive(Debug)]
pub(crate) struct Slots {
    count: usize,
    line: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free: usize,
    arrivals: u64,
    waiting: BTreeMap<Place, oneshot::Sender<Answer>>,
}

/// A piece-upload slot; when dropped it goes to the first request in line, or back to the free
/// ones.
#[derive(Debug)]
pub(crate) struct Slot {
    /// `None` only for a slot that could not be handed over and was kept by `release`.
    slots: Option<Arc<Slots>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

impl Slots {
    /// `count` slots (at least one) and room for `line` requests to wait.
    pub(crate) fn new(count: usize, line: usize) -> Arc<Self> {
        let count = count.max(1);
        Arc::new(Self { count, line, state: Mutex::new(State { free: count, arrivals: 0, waiting: BTreeMap::new() }) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many slots there are.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Slots free now.
    pub(crate) fn free(&self) -> usize {
        self.lock().free
    }

    /// Requests waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// A slot at once if one is free.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut state = self.lock();
        state.free = state.free.checked_sub(1)?;
        Some(Slot { slots: Some(self.clone()) })
    }

    /// A slot: at once if one is free, else after waiting in line for at most `wait`. `None` if
    /// the line is full of requests as good as this one or better, if a better one took this
    /// one's place, or if the wait passed.
    pub(crate) async fn acquire(self: &Arc<Self>, priority: u32, wait: Duration) -> Option<Slot> {
        self.acquire_with(priority, wait, true).await
    }

    /// A slot let go by someone else, after waiting in line for at most `wait`, even while one
    /// is free: for a requester that holds its share of the slots already, whose next request
    /// goes when one of its own (or anyone's) ends, and not before those of others.
    pub(crate) async fn acquire_in_line(self: &Arc<Self>, priority: u32, wait: Duration) -> Option<Slot> {
        self.acquire_with(priority, wait, false).await
    }

    async fn acquire_with(self: &Arc<Self>, priority: u32, wait: Duration, take_free: bool) -> Option<Slot> {
        let (place, mut answer) = {
            let mut state = self.lock();
            if take_free && let Some(free) = state.free.checked_sub(1) {
                state.free = free;
                return Some(Slot { slots: Some(self.clone()) });
            }
            let place = (priority, state.arrivals);
            state.arrivals += 1;
            if state.waiting.len() >= self.line {
                let worst = state.waiting.last_key_value().map(|(p, _)| *p);
                match worst {
                    Some(worst) if worst.0 > priority => {
                        if let Some((_, displaced)) = state.waiting.pop_last() {
                            let _ = displaced.send(Err(()));
                        }
                    }
                    _ => return None,
                }
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.insert(place, tx);
            (place, rx)
        };
        // Dropped while waiting, `answer` drops a slot handed to it, which passes it on.
        match tokio::time::timeout(wait, &mut answer).await {
            Ok(Ok(Ok(slot))) => Some(slot),
            Ok(_) => None,
            Err(_) => {
                // Still in line: leave it. Gone: answered just as the wait ended, and the answer
                // (a slot, perhaps) is in the channel.
                if self.lock().waiting.remove(&place).is_some() {
                    return None;
                }
                answer.try_recv().ok().and_then(Result::ok)
            }
        }
    }

    /// A slot was let go: to the first in line still waiting, or back to the free ones.
    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some((_, waiter)) = state.waiting.pop_first() {
            match waiter.send(Ok(Slot { slots: Some(self.clone()) })) {
                Ok(()) => return,
                // That waiter left; the slot it was not given must not release itself again.
                Err(Ok(mut unsent)) => drop(unsent.slots.take()),
                Err(Err(())) => {}
            }
        }
        state.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    type Reports = tokio::sync::mpsc::UnboundedSender<(usize, bool)>;

    /// Request `id` with `priority`: reports on `tx` whether it got a slot, uploads for 10 ms and
    /// lets the slot go.
    fn request(slots: &Arc<Slots>, id: usize, priority: u32, tx: &Reports) -> tokio::task::JoinHandle<()> {
        let (slots, tx) = (slots.clone(), tx.clone());
        tokio::spawn(async move {
            let slot = slots.acquire(priority, WAIT).await;
            let _ = tx.send((id, slot.is_some()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_line_is_served_lowest_priority_first_and_in_order_among_equals() {
        let slots = Slots::new(1, 4);
        let busy = slots.acquire(0, WAIT).await.expect("a free slot");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (id, priority) in [5, 3, 0, 3].into_iter().enumerate() {
            waiters.push(request(&slots, id, priority, &tx));
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.waiting(), 4);
        drop(busy);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (id, got) = rx.recv().await.expect("an answer");
            assert!(got, "request {id} waited within its bound");
            order.push(id);
        }
        assert_eq!(order, vec![2, 1, 3, 0], "priority 0, the two 3s as they came, then 5");
        for w in waiters {
            w.await.expect("task");
        }
        assert_eq!((slots.free(), slots.waiting()), (1, 0), "the slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_better_request_takes_the_worst_place_in_a_full_line() {
        let slots = Slots::new(1, 2);
        let busy = slots.acquire(0, WAIT).await.expect("a free slot");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = vec![request(&slots, 0, 4, &tx)];
        tokio::task::yield_now().await;
        waiters.push(request(&slots, 1, 2, &tx));
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 2);
        // As good as the worst waiting: turned away at once, the line unchanged.
        assert!(slots.acquire(4, WAIT).await.is_none());
        assert_eq!(slots.waiting(), 2);
        // Better: it takes the place of the worst, who is told at once.
        waiters.push(request(&slots, 2, 1, &tx));
        assert_eq!(rx.recv().await, Some((0, false)));
        assert_eq!(slots.waiting(), 2);
        drop(busy);
        assert_eq!(rx.recv().await, Some((2, true)));
        assert_eq!(rx.recv().await, Some((1, true)));
        for w in waiters {
            w.await.expect("task");
        }
        assert_eq!((slots.free(), slots.waiting()), (1, 0), "the slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_leaves_the_line_loses_no_slot() {
        let slots = Slots::new(1, 4);
        let busy = slots.acquire(0, WAIT).await.expect("a free slot");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // One waits past its bound; one is dropped while waiting (its requester went away).
        let late = request(&slots, 0, 0, &tx);
        tokio::task::yield_now().await;
        let gone = request(&slots, 1, 1, &tx);
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        tokio::time::sleep(WAIT + Duration::from_millis(1)).await;
        assert_eq!(rx.recv().await, Some((0, false)));
        late.await.expect("task");
        assert_eq!(slots.waiting(), 1, "the dropped request's place is still there, answered by nobody");
        // The slot let go skips the place nobody answers and is free again.
        drop(busy);
        assert_eq!((slots.free(), slots.waiting()), (1, 0));
        assert!(slots.acquire(9, WAIT).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_line_waits_for_a_slot_let_go_even_with_one_free() {
        let slots = Slots::new(2, 4);
        let held = slots.acquire(0, WAIT).await.expect("a free slot");
        assert_eq!(slots.free(), 1);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let in_line = {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = slots.acquire_in_line(u32::MAX, WAIT).await;
                let _ = tx.send(("in line", slot.is_some()));
                tokio::time::sleep(Duration::from_millis(10)).await;
            })
        };
        tokio::task::yield_now().await;
        assert_eq!((slots.free(), slots.waiting()), (1, 1), "it waits, the free slot stays free");
        // Anyone else takes the free slot at once, ahead of it.
        let other = slots.acquire(7, WAIT).await.expect("the free slot");
        assert_eq!(slots.free(), 0);
        drop(held);
        assert_eq!(rx.recv().await, Some(("in line", true)));
        in_line.await.expect("task");
        drop(other);
        assert_eq!((slots.free(), slots.waiting()), (2, 0), "every slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_to_a_request_dropped_before_it_woke_is_passed_on() {
        let slots = Slots::new(1, 4);
        let busy = slots.acquire(0, WAIT).await.expect("a free slot");
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(0, WAIT).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 1);
        // The slot is sent to the waiter, which is dropped before it runs again.
        drop(busy);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!((slots.free(), slots.waiting()), (1, 0), "the slot in the dropped channel came back");
    }
}
