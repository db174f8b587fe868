//! A reference for a flash crowd's completion time that whole pieces allow: the last completion
//! of a schedule made by a scheduler that sees every node, over the same uplink and downlink
//! caps, with no latency and no messages.
//!
//! The fluid bound T_min lets every uplink work from the first instant, as if a blob flowed in
//! infinitely fine parts. A node can pass on only a piece it holds whole and verified, so while a
//! crowd starts, most uplinks have nothing to send: the first piece leaves the seeder after one
//! piece-upload time, and the holders of a piece at most double per piece-upload time after that.
//! This schedule counts that cost and nothing else, so the gap between it and a run is what the
//! protocol loses to round trips, lines, finding holders and its choices.
//!
//! It is a greedy schedule, not a bound: a cleverer one could finish sooner, never sooner than
//! [`whole_piece_bound`], the lower bound for any schedule of whole pieces, which lies above
//! T_min by the same start. Whenever a node's uplink is free it sends one whole piece, at its full uplink rate (or
//! the receiver's downlink, if that is lower), to the fetcher that holds or awaits the fewest
//! pieces among those it can help; the piece is the one rarest in the crowd among those it can
//! give. A receiver takes several pieces at once while their rates fit its downlink. Ties go by
//! the seeded random order, so a seed repeats the schedule.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use shoal_node::protocol::{Geometry, PIECE_SIZE};

/// A node's caps in bytes per second; `None` is uncapped.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub uplink: Option<u64>,
    pub downlink: Option<u64>,
}

/// The fluid lower bound on the last completion, T_min = max(F/u_s, F/d_min, N·F/(u_s+Σu_i)),
/// for fetchers `0..caps.len()` other than `seeder` fetching `size` bytes; an uncapped link
/// counts as infinitely fast.
pub fn fluid_bound(caps: &[Caps], seeder: usize, size: u64) -> f64 {
    let f = size as f64;
    let rate = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
    let u_s = caps.get(seeder).map_or(f64::INFINITY, |c| rate(c.uplink));
    let fetchers = || caps.iter().enumerate().filter(|(i, _)| *i != seeder).map(|(_, c)| c);
    let d_min = fetchers().map(|c| rate(c.downlink)).fold(f64::INFINITY, f64::min);
    let sum_u: f64 = fetchers().map(|c| rate(c.uplink)).sum();
    (f / u_s).max(f / d_min).max(fetchers().count() as f64 * f / (u_s + sum_u))
}

/// Whether a schedule of whole pieces can be counted for these caps: `seeder` is one of them,
/// every uplink is capped (else pieces move in no time) and no link is closed.
fn schedulable(caps: &[Caps], seeder: usize) -> bool {
    seeder < caps.len() && caps.iter().all(|c| c.uplink.is_some_and(|u| u > 0) && c.downlink != Some(0))
}

/// The most steps [`greedy_crowd`] takes: one per transfer (fetchers × pieces), times the nodes
/// each looks over, times the words of a piece set. About a second's work; a larger crowd or blob
/// gets no greedy schedule (its bound, [`whole_piece_bound`], costs little at any size).
const MAX_STEPS: u128 = 2_000_000_000;

/// The last completion, in seconds, of the greedy schedule for fetchers `0..caps.len()` other
/// than `seeder` fetching a blob of `size` bytes that only `seeder` holds. `None` if an uplink is
/// uncapped (every piece would move in no time), a fetcher can receive nothing, or the schedule
/// would take more than [`MAX_STEPS`].
pub fn greedy_crowd(caps: &[Caps], seeder: usize, size: u64, rng: &mut ChaCha8Rng) -> Option<f64> {
    let geometry = Geometry::new(size).ok()?;
    let pieces = geometry.piece_count() as usize;
    let n = caps.len();
    if !schedulable(caps, seeder) || (n as u128).pow(2) * pieces as u128 * pieces.div_ceil(64) as u128 > MAX_STEPS {
        return None;
    }
    if n == 1 || pieces == 0 {
        return Some(0.0);
    }
    let piece_bytes = |p: usize| {
        let last = size - PIECE_SIZE * (pieces as u64 - 1);
        if p + 1 == pieces { last } else { PIECE_SIZE }
    };
    let mut s = State {
        up: caps.iter().map(|c| c.uplink.map_or(f64::INFINITY, |u| u as f64)).collect(),
        down: caps.iter().map(|c| c.downlink.map_or(f64::INFINITY, |d| d as f64)).collect(),
        have: vec![Bits::new(pieces); n],
        coming: vec![Bits::new(pieces); n],
        holding: vec![0; n],
        copies: vec![0; pieces],
        incoming: vec![0.0; n],
        sending: vec![false; n],
        seeder,
        pieces,
    };
    for p in 0..pieces {
        s.have[seeder].set(p, true);
    }
    s.holding[seeder] = pieces;
    s.copies.iter_mut().for_each(|c| *c = 1);

    let mut events = BinaryHeap::new();
    let mut last = 0.0f64;
    let mut left = n - 1;
    let mut now = 0.0;
    // A piece on its way: when it arrives, from, to, which piece.
    type Transfer = Reverse<(Time, usize, usize, usize)>;
    let mut start = |s: &mut State, from: usize, to: Option<usize>, now: f64, events: &mut BinaryHeap<Transfer>| {
        if let Some((to, piece, rate)) = s.choose(from, to, rng) {
            s.sending[from] = true;
            s.coming[to].set(piece, true);
            s.holding[to] += 1;
            s.copies[piece] += 1;
            s.incoming[to] += rate;
            events.push(Reverse((Time(now + piece_bytes(piece) as f64 / rate), from, to, piece)));
        }
    };
    start(&mut s, seeder, None, now, &mut events);
    while let Some(Reverse((Time(at), from, to, piece))) = events.pop() {
        now = at;
        s.sending[from] = false;
        s.coming[to].set(piece, false);
        s.have[to].set(piece, true);
        s.incoming[to] = (s.incoming[to] - s.rate(from, to)).max(0.0);
        if s.have[to].count() == pieces {
            left -= 1;
            last = now;
        }
        // The sender is free, the receiver holds a new piece, and the receiver's downlink has
        // room: these are the only changes that let a transfer start.
        start(&mut s, from, None, now, &mut events);
        start(&mut s, to, None, now, &mut events);
        for k in 0..n {
            if !s.sending[k] && s.holding[k] > 0 && k != to {
                start(&mut s, k, Some(to), now, &mut events);
            }
        }
    }
    (left == 0).then_some(last)
}

/// A lower bound, in seconds, on the last completion of any schedule of whole pieces for the
/// same crowd as [`greedy_crowd`]; `None` if an uplink is uncapped.
///
/// A fetcher sends nothing before it holds a whole piece, and each node delivers whole pieces one
/// uplink-time apart at best, so the k-th fetcher to hold a piece holds it no sooner than if every
/// holder had sent, from the moment it held one, the smallest piece to a new holder back to back
/// (the fastest uplinks going to the first holders, at the fastest downlink). By time T the
/// fetchers then upload at most the sum of `u_i·(T - t_i)` and the seeder `u_s·T`, and the crowd
/// needs `N·F`: T is at least where these meet, and at least T_min.
pub fn whole_piece_bound(caps: &[Caps], seeder: usize, size: u64) -> Option<f64> {
    let geometry = Geometry::new(size).ok()?;
    let pieces = u64::from(geometry.piece_count());
    if !schedulable(caps, seeder) {
        return None;
    }
    let f = size as f64;
    let down = |c: &Caps| c.downlink.map_or(f64::INFINITY, |d| d as f64);
    let u_s = caps[seeder].uplink? as f64;
    let fetchers: Vec<&Caps> = caps.iter().enumerate().filter(|(i, _)| *i != seeder).map(|(_, c)| c).collect();
    if fetchers.is_empty() || pieces == 0 {
        return Some(0.0);
    }
    let d_max = fetchers.iter().map(|c| down(c)).fold(0.0, f64::max);
    let mut ups: Vec<f64> = fetchers.iter().filter_map(|c| c.uplink).map(|u| u as f64).collect();
    ups.sort_by(|a, b| b.total_cmp(a));
    let n = ups.len() as f64;
    let t_min = fluid_bound(caps, seeder, size);
    let smallest = PIECE_SIZE.min(size - PIECE_SIZE * (pieces - 1)) as f64;
    let firsts = first_holdings(u_s, &ups, d_max, smallest)?;
    // The work by T grows with T: bisect for where it reaches N·F.
    let work = |t: f64| u_s * t + firsts.iter().map(|(at, u)| u * (t - at).max(0.0)).sum::<f64>();
    let (mut lo, mut hi) = (0.0, t_min.max(firsts.last().map_or(0.0, |l| l.0)) + n * f / u_s);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if work(mid) >= n * f { hi = mid } else { lo = mid }
    }
    Some(hi.max(t_min))
}

/// When each fetcher (by uplink, fastest first) holds its first whole piece at the earliest: a
/// heap of senders by when each can next deliver, each holder sending from the moment it holds
/// one, the fastest uplinks going to the first holders. A sender that holds a piece from `t0` on,
/// with uplink `u`, delivers its k-th no sooner than `t0 + max(s / min(u, d_max), k·s / u)`: one
/// piece takes at least the time of the slower of its uplink and the fastest downlink, and k
/// pieces take k of its uplink's piece-times (an uplink faster than every downlink serves several
/// receivers at once). Returns (when, uplink) per fetcher.
fn first_holdings(u_s: f64, ups: &[f64], d_max: f64, smallest: f64) -> Option<Vec<(f64, f64)>> {
    let next = |t0: f64, u: f64, k: u32| t0 + (smallest / u.min(d_max)).max(f64::from(k + 1) * smallest / u);
    // Each entry: when it can next deliver, its `t0`, its uplink, and the deliveries so far.
    let mut senders = BinaryHeap::new();
    senders.push(Reverse((Time(next(0.0, u_s, 0)), Time(0.0), Time(u_s), 0u32)));
    let mut firsts = Vec::with_capacity(ups.len());
    for &u in ups {
        let Reverse((Time(at), Time(t0), Time(rate), k)) = senders.pop()?;
        firsts.push((at, u));
        senders.push(Reverse((Time(next(t0, rate, k + 1)), Time(t0), Time(rate), k + 1)));
        senders.push(Reverse((Time(next(at, u, 0)), Time(at), Time(u), 0)));
    }
    Some(firsts)
}

/// A time in seconds, ordered so that heaps of `Reverse` entries give the earliest first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Time(f64);

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

struct State {
    up: Vec<f64>,
    down: Vec<f64>,
    have: Vec<Bits>,
    coming: Vec<Bits>,
    /// Pieces each node holds or awaits.
    holding: Vec<usize>,
    /// Holders of each piece, those awaiting it included.
    copies: Vec<usize>,
    /// The rates of the pieces each node is receiving, summed.
    incoming: Vec<f64>,
    sending: Vec<bool>,
    seeder: usize,
    pieces: usize,
}

impl State {
    /// The rate of a piece from `from` to `to`: the sender's uplink or the receiver's downlink.
    fn rate(&self, from: usize, to: usize) -> f64 {
        self.up[from].min(self.down[to])
    }

    /// What `from` sends next, to `only` if given: the receiver, the piece and the rate.
    fn choose(&self, from: usize, only: Option<usize>, rng: &mut ChaCha8Rng) -> Option<(usize, usize, f64)> {
        if self.sending[from] {
            return None;
        }
        let mut best: Option<(usize, usize)> = None;
        let mut ties = 0u32;
        let mut consider = |to: usize, rng: &mut ChaCha8Rng| {
            if to == from || to == self.seeder || self.holding[to] == self.pieces {
                return;
            }
            let rate = self.rate(from, to);
            if self.incoming[to] > 0.0 && self.incoming[to] + rate > self.down[to] * (1.0 + 1e-9) {
                return;
            }
            if !self.have[from].has_beyond(&self.have[to], &self.coming[to]) {
                return;
            }
            let key = self.holding[to];
            match best {
                Some((_, k)) if key > k => {}
                Some((_, k)) if key == k => {
                    ties += 1;
                    if rng.random_range(0..=ties) == 0 {
                        best = Some((to, key));
                    }
                }
                _ => {
                    best = Some((to, key));
                    ties = 0;
                }
            }
        };
        match only {
            Some(to) => consider(to, rng),
            None => (0..self.have.len()).for_each(|to| consider(to, rng)),
        }
        let (to, _) = best?;
        let mut piece: Option<(usize, usize)> = None;
        let mut ties = 0u32;
        for p in 0..self.pieces {
            if !self.have[from].get(p) || self.have[to].get(p) || self.coming[to].get(p) {
                continue;
            }
            match piece {
                Some((_, c)) if self.copies[p] > c => {}
                Some((_, c)) if self.copies[p] == c => {
                    ties += 1;
                    if rng.random_range(0..=ties) == 0 {
                        piece = Some((p, c));
                    }
                }
                _ => {
                    piece = Some((p, self.copies[p]));
                    ties = 0;
                }
            }
        }
        let (piece, _) = piece?;
        Some((to, piece, self.rate(from, to)))
    }
}

/// A set of pieces.
#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(pieces: usize) -> Self {
        Self(vec![0; pieces.div_ceil(64)])
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }

    fn set(&mut self, i: usize, on: bool) {
        let bit = 1u64 << (i % 64);
        if on { self.0[i / 64] |= bit } else { self.0[i / 64] &= !bit }
    }

    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether this set holds a piece outside both `a` and `b`.
    fn has_beyond(&self, a: &Bits, b: &Bits) -> bool {
        self.0.iter().zip(&a.0).zip(&b.0).any(|((s, a), b)| s & !(a | b) != 0)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn crowd(fetchers: usize, seeder_up: u64, up: u64, down: u64) -> Vec<Caps> {
        let mut caps = vec![Caps { uplink: Some(up), downlink: Some(down) }; fetchers + 1];
        caps[0].uplink = Some(seeder_up);
        caps
    }

    #[test]
    fn a_lone_fetcher_gets_the_blob_at_the_seeders_rate() {
        let caps = crowd(1, 4 * MIB, 2 * MIB, 8 * MIB);
        let t = greedy_crowd(&caps, 0, 4 * MIB, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert!((t - 1.0).abs() < 1e-9, "{t}");
        // Behind a narrower downlink, at the downlink's.
        let caps = crowd(1, 4 * MIB, 2 * MIB, MIB);
        let t = greedy_crowd(&caps, 0, 4 * MIB + 1, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert!((t - (4 * MIB + 1) as f64 / MIB as f64).abs() < 1e-9, "{t}");
    }

    #[test]
    fn a_crowd_takes_longer_than_the_fluid_bound_and_repeats_with_its_seed() {
        for (fetchers, size) in [(9, 4 * MIB), (99, 4 * MIB), (50, 10 * MIB + 3)] {
            let caps = crowd(fetchers, 4 * MIB, 2 * MIB, 8 * MIB);
            let t = greedy_crowd(&caps, 0, size, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
            let again = greedy_crowd(&caps, 0, size, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
            assert_eq!(t, again);
            let t_min = fluid_bound(&caps, 0, size);
            // Whole pieces cost the crowd's start: no fetcher sends anything before a piece (the
            // smallest, at best) has left the seeder, so their uplinks work at most T - τ of T.
            let smallest = if size % PIECE_SIZE == 0 { PIECE_SIZE } else { size % PIECE_SIZE };
            let tau = smallest as f64 / (4 * MIB) as f64;
            let sum_u = (fetchers as u64 * 2 * MIB) as f64;
            let late = (fetchers as f64 * size as f64 + sum_u * tau) / ((4 * MIB) as f64 + sum_u);
            assert!(t >= t_min.max(late) - 1e-9, "{fetchers}: {t} against {t_min} and {late}");
            assert!(t < 2.0 * t_min, "{fetchers}: {t} against {t_min}: the schedule leaves uplinks idle");
            // The bound lies between the two: above the fluid one, below what a schedule did.
            let bound = whole_piece_bound(&caps, 0, size).unwrap();
            assert!(bound >= t_min.max(late) - 1e-9 && bound <= t + 1e-9, "{fetchers}: {bound} not in {late}..{t}");
        }
    }

    #[test]
    fn the_bound_for_a_lone_fetcher_is_the_seeders_rate() {
        let caps = crowd(1, 4 * MIB, 2 * MIB, 8 * MIB);
        assert!((whole_piece_bound(&caps, 0, 4 * MIB).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_seeder_faster_than_every_downlink_serves_several_at_once() {
        // A 16 MiB/s seeder and 8 MiB/s downlinks: it sends a piece to two fetchers at once, each
        // at its downlink, so both hold one after one piece-time at 8 MiB/s. One delivery at a
        // time put the second a piece-time later, and so bounded the crowd's time above a
        // schedule that does this.
        let (s, mib) = (PIECE_SIZE as f64, MIB as f64);
        let firsts = first_holdings(16.0 * mib, &[2.0 * mib; 3], 8.0 * mib, s).unwrap();
        let piece_time = s / (8.0 * mib);
        assert!((firsts[0].0 - piece_time).abs() < 1e-12 && (firsts[1].0 - piece_time).abs() < 1e-12, "{firsts:?}");
        // The third waits for the seeder's uplink: three pieces at 16 MiB/s.
        assert!((firsts[2].0 - 3.0 * s / (16.0 * mib)).abs() < 1e-12, "{firsts:?}");
        // An uplink no faster than the downlinks delivers one piece at a time, as before.
        let firsts = first_holdings(4.0 * mib, &[2.0 * mib; 2], 8.0 * mib, s).unwrap();
        assert!((firsts[1].0 - 2.0 * s / (4.0 * mib)).abs() < 1e-12, "{firsts:?}");
    }

    #[test]
    fn the_bound_grows_with_the_crowd_beyond_the_fluid_one() {
        // The fluid bound hardly moves from 100 to 1,000 fetchers; the start of a crowd of whole
        // pieces takes a piece-upload time more for each doubling of its holders.
        let ratio = |fetchers| {
            let caps = crowd(fetchers, 4 * MIB, 2 * MIB, 8 * MIB);
            whole_piece_bound(&caps, 0, 4 * MIB).unwrap() / fluid_bound(&caps, 0, 4 * MIB)
        };
        let (small, large) = (ratio(99), ratio(999));
        assert!(small > 1.0 && large > small + 0.1, "{small} {large}");
    }

    #[test]
    fn uncapped_uplinks_have_no_reference() {
        let mut caps = crowd(3, 4 * MIB, 2 * MIB, 8 * MIB);
        caps[2].uplink = None;
        assert_eq!(greedy_crowd(&caps, 0, MIB, &mut ChaCha8Rng::seed_from_u64(1)), None);
        assert_eq!(whole_piece_bound(&caps, 0, MIB), None);
    }

    #[test]
    fn a_crowd_too_large_to_schedule_still_has_its_bound() {
        // A thousand fetchers of 1 GiB: four million transfers, each looking over the crowd.
        let caps = crowd(1000, 4 * MIB, 2 * MIB, 8 * MIB);
        assert_eq!(greedy_crowd(&caps, 0, 1024 * MIB, &mut ChaCha8Rng::seed_from_u64(1)), None);
        let bound = whole_piece_bound(&caps, 0, 1024 * MIB).unwrap();
        assert!(bound >= fluid_bound(&caps, 0, 1024 * MIB), "{bound}");
    }
}
