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

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// A request's place in the line: its priority (lower first), then its arrival.
type Place = (u32, u64);

/// What a waiting request is told: a slot, or that a better request took its place.
type Answer<K> = Result<Slot<K>, ()>;

/// Piece-upload slots and the requests waiting for one, each request its owner's (a peer's).
#[derive(Debug)]
pub(crate) struct Slots<K: Eq + Hash + Clone> {
    /// How many there are (read by the tests; the share and the free count follow from it).
    #[cfg_attr(not(test), allow(dead_code))]
    count: usize,
    line: usize,
    /// The most slots one owner holds at once.
    share: usize,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K: Eq + Hash + Clone> {
    free: usize,
    arrivals: u64,
    waiting: BTreeMap<Place, Waiter<K>>,
    /// Slots held, by owner; none at zero.
    held: HashMap<K, usize>,
}

#[derive(Debug)]
struct Waiter<K: Eq + Hash + Clone> {
    owner: K,
    answer: oneshot::Sender<Answer<K>>,
}

/// A piece-upload slot; when dropped it goes to the first request in line whose owner holds less
/// than its share (or is this slot's owner), or back to the free ones.
#[derive(Debug)]
pub(crate) struct Slot<K: Eq + Hash + Clone> {
    /// `None` only for a slot that could not be handed over and was given back by `release`.
    slots: Option<Arc<Slots<K>>>,
    owner: K,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(&self.owner);
        }
    }
}

impl<K: Eq + Hash + Clone> Slots<K> {
    /// `count` slots (at least one), room for `line` requests to wait, and at most half the
    /// slots (at least one) to one owner at a time.
    pub(crate) fn new(count: usize, line: usize) -> Arc<Self> {
        let count = count.max(1);
        let state = State { free: count, arrivals: 0, waiting: BTreeMap::new(), held: HashMap::new() };
        Arc::new(Self { count, line, share: (count / 2).max(1), state: Mutex::new(state) })
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many slots there are.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.lock().free
    }

    /// Requests waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// As (now, bound): the slots held, the requests waiting in line, and the most one owner
    /// holds.
    pub(crate) fn load(&self) -> [(usize, usize); 3] {
        let st = self.lock();
        let most = st.held.values().copied().max().unwrap_or(0);
        [(self.count - st.free, self.count), (st.waiting.len(), self.line), (most, self.share)]
    }

    /// Slots `owner` holds now.
    #[cfg(test)]
    pub(crate) fn held_by(&self, owner: &K) -> usize {
        self.lock().held.get(owner).copied().unwrap_or(0)
    }

    /// Whether every slot held and every request waiting is `owner`'s: the uplink is its alone.
    pub(crate) fn only(&self, owner: &K) -> bool {
        let state = self.lock();
        state.held.keys().all(|k| k == owner) && state.waiting.values().all(|w| w.owner == *owner)
    }

    /// Whether `owner` could take a slot at once: one is free, and within its share.
    pub(crate) fn could_take(&self, owner: &K) -> bool {
        let state = self.lock();
        state.free > 0 && state.held.get(owner).is_none_or(|n| *n < self.share)
    }

    /// A slot at once if one is free and `owner` holds less than its share.
    pub(crate) fn try_acquire(self: &Arc<Self>, owner: &K) -> Option<Slot<K>> {
        let mut state = self.lock();
        self.take_free(&mut state, owner)
    }

    fn take_free(self: &Arc<Self>, state: &mut State<K>, owner: &K) -> Option<Slot<K>> {
        if state.held.get(owner).is_some_and(|n| *n >= self.share) {
            return None;
        }
        state.free = state.free.checked_sub(1)?;
        *state.held.entry(owner.clone()).or_insert(0) += 1;
        Some(Slot { slots: Some(self.clone()), owner: owner.clone() })
    }

    /// A slot: at once if one is free and `owner` holds less than its share, else after waiting
    /// in line for at most `wait`. `None` if the line is full of requests as good as this one or
    /// better, if a better one took this one's place, or if the wait passed. An owner holding its
    /// share waits, even while a slot is free, for one let go: its own (its next request then
    /// goes at once), or another's once it holds less again.
    pub(crate) async fn acquire(self: &Arc<Self>, owner: &K, priority: u32, wait: Duration) -> Option<Slot<K>> {
        let (place, mut answer) = {
            let mut state = self.lock();
            if let Some(slot) = self.take_free(&mut state, owner) {
                return Some(slot);
            }
            // An owner may fill half the line at most: its requests past its share wait for its
            // own slots, and would otherwise push other peers' requests out of the line.
            if state.waiting.values().filter(|w| w.owner == *owner).count() >= (self.line / 2).max(1) {
                return None;
            }
            let place = (priority, state.arrivals);
            state.arrivals += 1;
            if state.waiting.len() >= self.line {
                let worst = state.waiting.last_key_value().map(|(p, _)| *p);
                match worst {
                    Some(worst) if worst.0 > priority => {
                        if let Some((_, displaced)) = state.waiting.pop_last() {
                            let _ = displaced.answer.send(Err(()));
                        }
                    }
                    _ => return None,
                }
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.insert(place, Waiter { owner: owner.clone(), answer: tx });
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

    /// `owner`'s slot was let go: to the first in line still waiting whose owner may hold one
    /// more, or back to the free ones.
    fn release(self: &Arc<Self>, owner: &K) {
        let mut state = self.lock();
        crate::count_down(&mut state.held, owner);
        loop {
            let next = state
                .waiting
                .iter()
                .find(|(_, w)| state.held.get(&w.owner).is_none_or(|n| *n < self.share))
                .map(|(place, _)| *place);
            let Some(waiter) = next.and_then(|place| state.waiting.remove(&place)) else { break };
            let slot = Slot { slots: Some(self.clone()), owner: waiter.owner.clone() };
            match waiter.answer.send(Ok(slot)) {
                // Counted under the lock, before the slot can be dropped (its release waits for it).
                Ok(()) => {
                    *state.held.entry(waiter.owner).or_insert(0) += 1;
                    return;
                }
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
    fn request(slots: &Arc<Slots<usize>>, id: usize, priority: u32, tx: &Reports) -> tokio::task::JoinHandle<()> {
        let (slots, tx) = (slots.clone(), tx.clone());
        tokio::spawn(async move {
            let slot = slots.acquire(&id, priority, WAIT).await;
            let _ = tx.send((id, slot.is_some()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
        })
    }

    /// [`request`] by `owner`.
    fn request_as(
        slots: &Arc<Slots<usize>>,
        owner: usize,
        id: usize,
        priority: u32,
        tx: &Reports,
    ) -> tokio::task::JoinHandle<()> {
        let (slots, tx) = (slots.clone(), tx.clone());
        tokio::spawn(async move {
            let slot = slots.acquire(&owner, priority, WAIT).await;
            let _ = tx.send((id, slot.is_some()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_line_is_served_lowest_priority_first_and_in_order_among_equals() {
        let slots = Slots::new(1, 4);
        let busy = slots.acquire(&99, 0, WAIT).await.expect("a free slot");
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
        let busy = slots.acquire(&99, 0, WAIT).await.expect("a free slot");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = vec![request(&slots, 0, 4, &tx)];
        tokio::task::yield_now().await;
        waiters.push(request(&slots, 1, 2, &tx));
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 2);
        // As good as the worst waiting: turned away at once, the line unchanged.
        assert!(slots.acquire(&98, 4, WAIT).await.is_none());
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
        let busy = slots.acquire(&99, 0, WAIT).await.expect("a free slot");
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
        assert!(slots.acquire(&97, 9, WAIT).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_holds_at_most_half_the_slots_and_its_next_request_takes_its_own() {
        let slots: Arc<Slots<usize>> = Slots::new(4, 8);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Owner 1 takes its share, two of four; its next two requests wait with a slot free.
        let mine = [slots.acquire(&1, 5, WAIT).await.expect("free"), slots.acquire(&1, 5, WAIT).await.expect("free")];
        assert!(slots.try_acquire(&1).is_none(), "past its share");
        let mut waiters = vec![request_as(&slots, 1, 10, 0, &tx), request_as(&slots, 1, 11, 0, &tx)];
        tokio::task::yield_now().await;
        assert_eq!((slots.free(), slots.waiting(), slots.held_by(&1)), (2, 2, 2));
        assert!(slots.only(&1) && !slots.only(&2), "what is held and waits is owner 1's alone");
        assert!(!slots.could_take(&1) && slots.could_take(&2));
        // It may fill half the line, no more.
        waiters.extend([request_as(&slots, 1, 12, 9, &tx), request_as(&slots, 1, 13, 9, &tx)]);
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 4);
        assert!(slots.acquire(&1, 0, WAIT).await.is_none(), "half the line is its already");
        // Others take the free slots at once, and wait behind owner 1's requests (which asked
        // first, with as good a priority) for the next.
        let theirs = [slots.acquire(&2, 5, WAIT).await.expect("free"), slots.acquire(&3, 5, WAIT).await.expect("free")];
        waiters.push(request_as(&slots, 4, 40, 0, &tx));
        tokio::task::yield_now().await;
        // A slot another owner lets go skips owner 1's waiting requests: it holds its share.
        drop(theirs);
        assert_eq!(rx.recv().await, Some((40, true)));
        assert_eq!(slots.held_by(&1), 2);
        // Its own slot let go goes to its next request at once.
        drop(mine);
        let mut next = [rx.recv().await, rx.recv().await];
        next.sort();
        assert_eq!(next, [Some((10, true)), Some((11, true))]);
        // Those let go in turn pass to its last two.
        let mut last = [rx.recv().await, rx.recv().await];
        last.sort();
        assert_eq!(last, [Some((12, true)), Some((13, true))]);
        for w in waiters {
            w.await.expect("task");
        }
        assert_eq!((slots.free(), slots.waiting(), slots.held_by(&1)), (4, 0, 0), "every slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_to_a_request_dropped_before_it_woke_is_passed_on() {
        let slots = Slots::new(1, 4);
        let busy = slots.acquire(&99, 0, WAIT).await.expect("a free slot");
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(&1, 0, WAIT).await })
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
