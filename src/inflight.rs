//! Requests in flight, per tenant and in total, with FIFO queues for the
//! ones that wait for room.
//!
//! # Per tenant: a fixed table of seats, read without locks
//!
//! Each tenant with requests in flight (or waiting) holds a *seat*: a slot
//! of a fixed-size open-addressing table holding the tenant's 64-bit hash
//! and a [`gate`](crate::gate) word (its count, and flags). A tenant is found
//! within a short probe sequence with atomic loads; its count moves with a
//! compare-and-swap. A permit remembers its seat, so returning it is a
//! single atomic operation with no lookup at all.
//!
//! A seat whose count is zero and whose queue is empty is free to be taken
//! by another tenant. Taking a seat (under a mutex, so one tenant never gets
//! two) bumps a generation in the word and marks it `RESERVED` while the
//! hash is rewritten; a reader re-checks the hash after loading the word,
//! so it never counts itself in somebody else's seat. The table never moves
//! or grows: its size bounds the tenants that can have requests in flight at
//! once, and a tenant that finds no free seat within its probe sequence is
//! refused as over its cap.
//!
//! # In total
//!
//! [`Global`] is one gate word with its queue.

use std::collections::{HashMap, VecDeque};

use crate::gate::{self, Fast, Locked, RESERVED, SLOW, Waiter};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering};

/// How far from its home slot a tenant's seat may be.
const PROBE: usize = 32;
/// Mutexes for the slow paths, by tenant hash.
const LOCKS: usize = 64;
/// One generation step, in the word's bits 32 to 47.
const GENERATION: u64 = 1 << 32;
const GENERATION_MASK: u64 = 0xFFFF << 32;
const EMPTY: u64 = 0;

/// A tenant's place in the table, remembered by its permit. While the
/// permit holds a unit there, the seat cannot change hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seat {
    index: u32,
}

/// What an attempt to take a unit gave.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Taken.
    Granted(Seat),
    /// Queued: wait on the waiter, then it is taken (or cancel).
    Wait(Arc<Waiter>, Seat),
    /// At the cap, and no room to queue.
    Full,
    /// No free seat for a new tenant.
    NoRoom,
}

struct Slot {
    fp: AtomicU64,
    word: AtomicU64,
}

/// Queues of the seats of one lock's tenants, by seat index.
type Queues = HashMap<u32, VecDeque<Arc<Waiter>>>;

/// Per-tenant counts and queues.
pub(crate) struct Tenants {
    slots: Box<[Slot]>,
    mask: usize,
    locks: Box<[Mutex<Queues>]>,
    /// Tenants with at least one request in flight, if counted.
    active: Option<AtomicU64>,
}

impl Tenants {
    /// A table with seats for about `max_active` tenants at once.
    pub(crate) fn new(max_active: usize, count_active: bool) -> Self {
        let size = (max_active.max(1) * 2).next_power_of_two().max(PROBE * 2);
        Self {
            slots: (0..size)
                .map(|_| Slot {
                    fp: AtomicU64::new(EMPTY),
                    word: AtomicU64::new(0),
                })
                .collect(),
            mask: size - 1,
            locks: (0..LOCKS).map(|_| Mutex::new(HashMap::new())).collect(),
            active: count_active.then(|| AtomicU64::new(0)),
        }
    }

    #[inline]
    fn lock(&self, fp: u64) -> crate::sync::MutexGuard<'_, Queues> {
        self.locks[(fp >> 58) as usize % LOCKS].lock()
    }

    /// Tenants with a request in flight (0 if not counted).
    pub(crate) fn active(&self) -> u64 {
        self.active
            .as_ref()
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    #[inline]
    fn became_active(&self, before: u32) {
        if before == 0
            && let Some(active) = &self.active
        {
            active.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline]
    fn became_idle(&self, before: u32) {
        if before == 1
            && let Some(active) = &self.active
        {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The seat of `fp`, if it has one.
    #[inline]
    fn find(&self, fp: u64) -> Option<usize> {
        let home = fp as usize;
        for step in 0..PROBE {
            let index = (home + step) & self.mask;
            match self.slots[index].fp.load(Ordering::Acquire) {
                f if f == fp => return Some(index),
                EMPTY => return None,
                _ => {}
            }
        }
        None
    }

    /// The requests `fp` has in flight now.
    #[inline]
    pub(crate) fn in_flight(&self, fp: u64) -> u32 {
        self.find(fp).map_or(0, |index| {
            let slot = &self.slots[index];
            let word = slot.word.load(Ordering::Acquire);
            if slot.fp.load(Ordering::Acquire) == fp {
                gate::count(word)
            } else {
                0
            }
        })
    }

    /// Takes a unit for `fp` under `cap` (`force`: whatever the count),
    /// queueing if fewer than `max_queue` of its requests wait.
    #[inline]
    pub(crate) fn acquire(&self, fp: u64, cap: u32, force: bool, max_queue: usize) -> Admission {
        if let Some(index) = self.find(fp) {
            let slot = &self.slots[index];
            let mut current = slot.word.load(Ordering::Acquire);
            loop {
                if current & SLOW != 0 || slot.fp.load(Ordering::Acquire) != fp {
                    break;
                }
                let before = gate::count(current);
                if (before >= cap && !force) || before == u32::MAX {
                    if max_queue == 0 {
                        return Admission::Full;
                    }
                    break;
                }
                match slot.word.compare_exchange_weak(
                    current,
                    current + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        self.became_active(before);
                        return Admission::Granted(Seat {
                            index: index as u32,
                        });
                    }
                    Err(actual) => current = actual,
                }
            }
        }
        self.acquire_locked(fp, cap, force, max_queue)
    }

    #[cold]
    fn acquire_locked(&self, fp: u64, cap: u32, force: bool, max_queue: usize) -> Admission {
        let mut queues = self.lock(fp);
        loop {
            // Under `fp`'s lock nobody else gives `fp` a seat, but another
            // tenant may be taking over the free seat `find` saw (under its
            // own lock): `acquire_locked` sees that and nothing is taken.
            let index = match self.find(fp) {
                Some(index) => index,
                None => match self.take_seat(fp) {
                    Some(index) => index,
                    None => return Admission::NoRoom,
                },
            };
            let seat = Seat {
                index: index as u32,
            };
            let slot = &self.slots[index];
            let queue = queues.entry(seat.index).or_default();
            let outcome = gate::acquire_locked(
                &slot.word,
                Some((&slot.fp, fp)),
                cap,
                force,
                queue,
                max_queue,
            );
            if queue.is_empty() {
                queues.remove(&seat.index);
            }
            return match outcome {
                Locked::Acquired(before) => {
                    self.became_active(before);
                    Admission::Granted(seat)
                }
                Locked::Queued(waiter) => Admission::Wait(waiter, seat),
                Locked::Full => Admission::Full,
                Locked::Moved => {
                    // The other tenant is between its claim and writing its
                    // hash: a few instructions.
                    crate::sync::yield_now();
                    continue;
                }
            };
        }
    }

    /// Gives `fp` a free seat in its probe sequence. Called with `fp`'s lock,
    /// so a tenant never gets two.
    fn take_seat(&self, fp: u64) -> Option<usize> {
        let home = fp as usize;
        for step in 0..PROBE {
            let index = (home + step) & self.mask;
            let slot = &self.slots[index];
            let word = slot.word.load(Ordering::Acquire);
            // Free: nothing in flight, nobody waiting, nobody moving in.
            if word & !GENERATION_MASK != 0 {
                continue;
            }
            let claimed = (word & GENERATION_MASK).wrapping_add(GENERATION) & GENERATION_MASK;
            if slot
                .word
                .compare_exchange(
                    word,
                    claimed | RESERVED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                continue;
            }
            slot.fp.store(fp, Ordering::Release);
            slot.word.store(claimed, Ordering::Release);
            return Some(index);
        }
        None
    }

    /// Returns a unit taken at `seat`.
    #[inline]
    pub(crate) fn release(&self, seat: Seat) {
        let word = &self.slots[seat.index as usize].word;
        let mut current = word.load(Ordering::Acquire);
        loop {
            if current & SLOW != 0 {
                return self.release_locked(seat);
            }
            if gate::count(current) == 0 {
                // Released more than acquired: a bug, but never a count
                // wrapped to 4 billion that keeps the seat taken for good.
                debug_assert!(false, "released more than acquired");
                return;
            }
            match word.compare_exchange_weak(
                current,
                current - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return self.became_idle(gate::count(current)),
                Err(actual) => current = actual,
            }
        }
    }

    /// The hash of the tenant in `seat` (stable while it holds a unit).
    fn seat_fp(&self, seat: Seat) -> u64 {
        self.slots[seat.index as usize].fp.load(Ordering::Acquire)
    }

    #[cold]
    fn release_locked(&self, seat: Seat) {
        let granted = {
            let mut queues = self.lock(self.seat_fp(seat));
            let word = &self.slots[seat.index as usize].word;
            let mut none = VecDeque::new();
            let queue = queues.get_mut(&seat.index).unwrap_or(&mut none);
            let (before, granted) = gate::release_locked(word, queue);
            if queue.is_empty() {
                queues.remove(&seat.index);
            }
            if granted.is_none() {
                self.became_idle(before);
            }
            granted
        };
        if let Some(waiter) = granted {
            waiter.wake();
        }
    }

    /// Withdraws `waiter` from `seat`'s queue; if it had been granted a unit
    /// meanwhile, returns that unit.
    pub(crate) fn cancel(&self, seat: Seat, waiter: &Arc<Waiter>) {
        let owned = {
            let mut queues = self.lock(self.seat_fp(seat));
            let word = &self.slots[seat.index as usize].word;
            let mut none = VecDeque::new();
            let queue = queues.get_mut(&seat.index).unwrap_or(&mut none);
            let owned = gate::cancel_locked(word, queue, waiter);
            if queue.is_empty() {
                queues.remove(&seat.index);
            }
            owned
        };
        if owned {
            self.release(seat);
        }
    }

    /// Requests in flight and waiting, summed over every tenant, and the
    /// tenants with requests in flight (a walk over the table, for stats and
    /// tests).
    pub(crate) fn totals(&self) -> (u64, u64, usize) {
        let mut in_flight = 0;
        let mut tenants = 0;
        for slot in &*self.slots {
            let count = gate::count(slot.word.load(Ordering::Acquire));
            in_flight += u64::from(count);
            tenants += usize::from(count > 0);
        }
        let waiting = self
            .locks
            .iter()
            .map(|lock| lock.lock().values().map(|q| q.len() as u64).sum::<u64>())
            .sum();
        (in_flight, waiting, tenants)
    }
}

/// One count for everybody, with its queue.
#[derive(Default)]
pub(crate) struct Global {
    word: AtomicU64,
    queue: Mutex<VecDeque<Arc<Waiter>>>,
}

impl Global {
    /// Takes a unit if one is free and nobody waits; never queues.
    #[inline]
    pub(crate) fn try_acquire(&self, cap: u32) -> bool {
        matches!(gate::try_acquire(&self.word, cap, false), Fast::Done(_))
    }

    #[inline]
    pub(crate) fn acquire(&self, cap: u32, force: bool, max_queue: usize) -> Admission {
        const NO_SEAT: Seat = Seat { index: 0 };
        match gate::try_acquire(&self.word, cap, force) {
            Fast::Done(_) => return Admission::Granted(NO_SEAT),
            Fast::Full if max_queue == 0 => return Admission::Full,
            Fast::Full | Fast::Slow => {}
        }
        let mut queue = self.queue.lock();
        match gate::acquire_locked(&self.word, None, cap, force, &mut queue, max_queue) {
            Locked::Acquired(_) => Admission::Granted(NO_SEAT),
            Locked::Queued(waiter) => Admission::Wait(waiter, NO_SEAT),
            // Only a seat moves.
            Locked::Full | Locked::Moved => Admission::Full,
        }
    }

    #[inline]
    pub(crate) fn release(&self) {
        if let Fast::Done(_) = gate::try_release(&self.word) {
            return;
        }
        self.release_to_waiter();
    }

    /// [`Global::release`] when somebody waits.
    #[inline(never)]
    fn release_to_waiter(&self) {
        let granted = {
            let mut queue = self.queue.lock();
            gate::release_locked(&self.word, &mut queue).1
        };
        if let Some(waiter) = granted {
            waiter.wake();
        }
    }

    pub(crate) fn cancel(&self, waiter: &Arc<Waiter>) {
        let owned = {
            let mut queue = self.queue.lock();
            gate::cancel_locked(&self.word, &mut queue, waiter)
        };
        if owned {
            self.release();
        }
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> u32 {
        gate::count(self.word.load(Ordering::Acquire))
    }

    /// Requests waiting.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.lock().len()
    }
}

#[cfg(all(test, not(floodgate_loom)))]
mod tests {
    use super::*;

    fn granted(a: Admission) -> Seat {
        match a {
            Admission::Granted(seat) => seat,
            other => unreachable!("not granted: {other:?}"),
        }
    }

    #[test]
    fn seats_count_and_are_reused_by_other_tenants() {
        let tenants = Tenants::new(4, true);
        // Tenants whose home slot is the same, so they compete for seats.
        let a = 1u64 << 40 | 5;
        let b = 2u64 << 40 | 5;
        let s1 = granted(tenants.acquire(a, 2, false, 0));
        let s2 = granted(tenants.acquire(a, 2, false, 0));
        assert_eq!(s1, s2);
        assert!(matches!(tenants.acquire(a, 2, false, 0), Admission::Full));
        let t = granted(tenants.acquire(b, 2, false, 0));
        assert_ne!(t.index, s1.index);
        assert_eq!(
            (tenants.in_flight(a), tenants.in_flight(b), tenants.active()),
            (2, 1, 2)
        );
        tenants.release(s1);
        tenants.release(s2);
        tenants.release(t);
        assert_eq!(tenants.active(), 0);
        // a's seat is free again: b or anybody may take it.
        let c = 3u64 << 40 | 5;
        let u = granted(tenants.acquire(c, 1, false, 0));
        assert_eq!(u.index, s1.index);
        assert_eq!(tenants.in_flight(a), 0);
        assert_eq!(tenants.in_flight(c), 1);
        tenants.release(u);
        assert_eq!(tenants.totals(), (0, 0, 0));
    }

    #[test]
    fn a_full_neighbourhood_refuses_new_tenants() {
        let tenants = Tenants::new(1, false);
        let mut seats = Vec::new();
        for i in 0..PROBE as u64 {
            seats.push(granted(tenants.acquire(i << 40 | 7, 1, false, 0)));
        }
        assert!(matches!(
            tenants.acquire(99 << 40 | 7, 1, false, 0),
            Admission::NoRoom
        ));
        tenants.release(seats[3]);
        assert!(matches!(
            tenants.acquire(99 << 40 | 7, 1, false, 0),
            Admission::Granted(_)
        ));
    }

    #[test]
    fn concurrent_tenants_never_exceed_their_caps() {
        let tenants = Arc::new(Tenants::new(16, true));
        let peak = Arc::new([(); 8].map(|_| AtomicU64::new(0)));
        let now = Arc::new([(); 8].map(|_| AtomicU64::new(0)));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (tenants, peak, now) = (&tenants, &peak, &now);
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let tenant = ((i + t) % 8) as usize;
                        // All tenants share a home slot, so seats churn,
                        // and each has its own lock (the top six bits).
                        let fp = (tenant as u64 + 1) << 58 | 3;
                        if let Admission::Granted(seat) = tenants.acquire(fp, 2, false, 0) {
                            let n = now[tenant].fetch_add(1, Ordering::AcqRel) + 1;
                            peak[tenant].fetch_max(n, Ordering::AcqRel);
                            now[tenant].fetch_sub(1, Ordering::AcqRel);
                            tenants.release(seat);
                        }
                    }
                });
            }
        });
        assert!(peak.iter().all(|p| p.load(Ordering::Relaxed) <= 2));
        assert_eq!(tenants.totals(), (0, 0, 0));
        assert_eq!(tenants.active(), 0);
    }
}

/// Model checks of the seat protocol: run with
/// `RUSTFLAGS="--cfg floodgate_loom" cargo test --release --lib inflight::loom_tests`.
#[cfg(all(test, floodgate_loom))]
mod loom_tests {
    use super::*;

    /// Whoever holds a unit sits in its own seat: nobody is ever counted in
    /// another tenant's seat, even while seats change hands.
    fn visit(tenants: &Tenants, fp: u64) {
        if let Admission::Granted(seat) = tenants.acquire(fp, 1, false, 0) {
            assert_eq!(
                tenants.seat_fp(seat),
                fp,
                "counted in another tenant's seat"
            );
            tenants.release(seat);
        }
    }

    #[test]
    fn tenants_never_share_a_seat() {
        loom::model(|| {
            let tenants = Arc::new(Tenants::new(1, true));
            // Two tenants with the same home slot and different locks (the
            // top six bits); `a` twice, so that one of its visits can find
            // its seat just as it changes hands.
            let (a, b) = (1u64 << 58 | 9, 2u64 << 58 | 9);
            let t1 = {
                let tenants = Arc::clone(&tenants);
                loom::thread::spawn(move || visit(&tenants, a))
            };
            let t2 = {
                let tenants = Arc::clone(&tenants);
                loom::thread::spawn(move || visit(&tenants, b))
            };
            visit(&tenants, a);
            t1.join().expect("thread");
            t2.join().expect("thread");
            let in_flight: u32 = tenants
                .slots
                .iter()
                .map(|s| gate::count(s.word.load(Ordering::Acquire)))
                .sum();
            assert_eq!(in_flight, 0);
            assert_eq!(tenants.active(), 0);
        });
    }
}
