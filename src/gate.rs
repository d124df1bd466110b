//! Permit accounting: a count of units in use against a cap, in one atomic
//! word, with a FIFO queue of waiters behind a lock.
//!
//! The word holds the count in its low 32 bits and a `QUEUED` flag that is
//! set exactly while the queue is not empty. Without waiters, taking and
//! returning a unit are single compare-and-swaps that never touch the lock.
//! Once anybody waits, every acquire and release goes through the lock, so
//! a released unit is handed straight to the oldest waiter (its count
//! carries over) and newcomers cannot overtake the queue.
//!
//! Setting the flag is itself a compare-and-swap on the word: a release
//! that lands between a waiter's "it is full" and "I queue" makes that
//! compare-and-swap fail, and the waiter looks again instead of sleeping
//! through the free unit.
//!
//! Bits 32 to 47 are left alone (the in-flight table keeps a generation
//! there), and a word with [`RESERVED`] set, or equal to
//! [`FROZEN`](crate::table::FROZEN), is a slot changing hands: every fast
//! path answers "go slow" and the caller retries under the lock.

use std::collections::VecDeque;
use std::task::Waker;

use crate::sync::{Arc, AtomicU8, AtomicU64, Mutex, Ordering};

/// Set while the queue is not empty.
pub(crate) const QUEUED: u64 = 1 << 62;
/// Set while a table seat changes hands: take the slow path.
pub(crate) const RESERVED: u64 = 1 << 61;
/// Any of these sends the fast paths to the lock. A frozen table slot
/// (`u64::MAX`) has them all.
pub(crate) const SLOW: u64 = QUEUED | RESERVED;
const COUNT: u64 = 0xFFFF_FFFF;
const FROZEN: u64 = u64::MAX;

/// The units in use that `word` records.
#[inline]
pub(crate) fn count(word: u64) -> u32 {
    (word & COUNT) as u32
}

/// The outcome of a lock-free attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fast {
    /// Done; the count before.
    Done(u32),
    /// At the cap and nobody queues: refused without the lock.
    Full,
    /// Somebody queues, or the slot moves: take the lock.
    Slow,
}

/// Takes a unit if fewer than `cap` are in use and nobody waits. `force`
/// takes one whatever the count (shadow mode).
#[inline]
pub(crate) fn try_acquire(word: &AtomicU64, cap: u32, force: bool) -> Fast {
    let mut current = word.load(Ordering::Acquire);
    loop {
        if current & SLOW != 0 {
            return Fast::Slow;
        }
        let in_use = count(current);
        if in_use >= cap && !force {
            return Fast::Full;
        }
        if u64::from(in_use) == COUNT {
            return Fast::Full;
        }
        match word.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Fast::Done(in_use),
            Err(actual) => current = actual,
        }
    }
}

/// Returns a unit if nobody waits.
#[inline]
pub(crate) fn try_release(word: &AtomicU64) -> Fast {
    let mut current = word.load(Ordering::Acquire);
    loop {
        if current & SLOW != 0 {
            return Fast::Slow;
        }
        debug_assert!(count(current) > 0, "released more than acquired");
        if count(current) == 0 {
            return Fast::Done(0);
        }
        match word.compare_exchange_weak(current, current - 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Fast::Done(count(current)),
            Err(actual) => current = actual,
        }
    }
}

/// The outcome of an attempt under the lock.
#[derive(Debug)]
pub(crate) enum Locked {
    /// A unit is taken; the count before.
    Acquired(u32),
    /// Queued: wait on the waiter.
    Queued(Arc<Waiter>),
    /// At the cap with the queue full (or queueing off).
    Full,
    /// The word is a table seat that another tenant is moving into, or has
    /// moved into: nothing was taken; find the seat again.
    Moved,
}

/// Takes a unit, or queues for one if fewer than `max_queue` wait. Called
/// with the lock that guards `queue`, on a word that is not frozen.
///
/// `owner` is the hash cell of a table seat and the hash it must hold: the
/// lock guards the seat's queue, not the seat, and a free seat can be taken
/// over by another tenant (under that tenant's lock) at any moment. The
/// hash is checked after each load of the word, as on the fast path: a
/// takeover changes the word (`RESERVED`, a new generation), so a
/// compare-and-swap on a word loaded before it fails, and a word loaded
/// after it is seen with `RESERVED` or with the other tenant's hash.
pub(crate) fn acquire_locked(
    word: &AtomicU64,
    owner: Option<(&AtomicU64, u64)>,
    cap: u32,
    force: bool,
    queue: &mut VecDeque<Arc<Waiter>>,
    max_queue: usize,
) -> Locked {
    let mut current = word.load(Ordering::Acquire);
    loop {
        debug_assert!(current != FROZEN, "a frozen word under the lock");
        if let Some((hash, fp)) = owner
            && (current & RESERVED != 0 || hash.load(Ordering::Acquire) != fp)
        {
            return Locked::Moved;
        }
        if current & QUEUED != 0 && count(current) < cap && !force {
            // Room while others wait: the cap grew (a policy change) since
            // they queued, and a release only hands its own unit on. The
            // oldest go first, before this request.
            grant_waiting(word, cap, queue);
            current = word.load(Ordering::Acquire);
            continue;
        }
        let in_use = count(current);
        let queued = current & QUEUED != 0;
        if !queued && (in_use < cap || force) && u64::from(in_use) < COUNT {
            match word.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Locked::Acquired(in_use),
                Err(actual) => {
                    current = actual;
                    continue;
                }
            }
        }
        if queue.len() >= max_queue {
            return Locked::Full;
        }
        if !queued {
            // Raise the flag on the exact value seen full: a release in
            // between makes this fail and we look again.
            if let Err(actual) = word.compare_exchange(
                current,
                current | QUEUED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                current = actual;
                continue;
            }
        }
        let waiter = Arc::new(Waiter::new());
        queue.push_back(Arc::clone(&waiter));
        return Locked::Queued(waiter);
    }
}

/// Lets the oldest waiters go while fewer than `cap` units are in use (then
/// drops the queued flag if nobody waits any more). Called with the lock
/// that guards `queue`, with the flag up: nobody else changes the count.
/// Wakes them at once (waking only schedules their tasks).
fn grant_waiting(word: &AtomicU64, cap: u32, queue: &mut VecDeque<Arc<Waiter>>) {
    while count(word.load(Ordering::Acquire)) < cap {
        let Some(waiter) = queue.pop_front() else {
            break;
        };
        if waiter.try_grant() {
            word.fetch_add(1, Ordering::AcqRel);
            waiter.wake();
        }
    }
    if queue.is_empty() {
        word.fetch_and(!QUEUED, Ordering::AcqRel);
    }
}

/// Returns a unit: to the oldest waiter if there is one (returned, to be
/// woken once the lock is released), else to the count. Called with the
/// lock that guards `queue`. Returns the count before, and the waiter.
pub(crate) fn release_locked(
    word: &AtomicU64,
    queue: &mut VecDeque<Arc<Waiter>>,
) -> (u32, Option<Arc<Waiter>>) {
    let mut granted = None;
    while let Some(waiter) = queue.pop_front() {
        if waiter.try_grant() {
            granted = Some(waiter);
            break;
        }
    }
    if queue.is_empty() {
        word.fetch_and(!QUEUED, Ordering::AcqRel);
    }
    let before = count(word.load(Ordering::Acquire));
    if granted.is_none() {
        debug_assert!(before > 0, "released more than acquired");
        if before > 0 {
            word.fetch_sub(1, Ordering::AcqRel);
        }
    }
    (before, granted)
}

/// Withdraws `waiter` from the queue. Returns `true` if it had already been
/// granted a unit, which the caller now owns and must release. Called with
/// the lock that guards `queue`.
pub(crate) fn cancel_locked(
    word: &AtomicU64,
    queue: &mut VecDeque<Arc<Waiter>>,
    waiter: &Arc<Waiter>,
) -> bool {
    if !waiter.try_cancel() {
        return true;
    }
    if let Some(at) = queue.iter().position(|w| Arc::ptr_eq(w, waiter)) {
        queue.remove(at);
    }
    if queue.is_empty() {
        word.fetch_and(!QUEUED, Ordering::AcqRel);
    }
    false
}

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;

/// One queued request.
#[derive(Debug)]
pub(crate) struct Waiter {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Waiter {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU8::new(WAITING),
            waker: Mutex::new(None),
        }
    }

    /// Hands this waiter a unit; `false` if it gave up first.
    pub(crate) fn try_grant(&self) -> bool {
        self.state
            .compare_exchange(WAITING, GRANTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives up waiting; `false` if a unit was handed over first.
    pub(crate) fn try_cancel(&self) -> bool {
        self.state
            .compare_exchange(WAITING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether a unit has been handed to this waiter.
    pub(crate) fn is_granted(&self) -> bool {
        self.state.load(Ordering::Acquire) == GRANTED
    }

    /// Remembers whom to wake; `true` if already granted.
    pub(crate) fn register(&self, waker: &Waker) -> bool {
        {
            let mut slot = self.waker.lock();
            match &mut *slot {
                Some(w) if w.will_wake(waker) => {}
                other => *other = Some(waker.clone()),
            }
        }
        self.is_granted()
    }

    /// Wakes the waiting task (after [`release_locked`] granted it).
    pub(crate) fn wake(&self) {
        if let Some(waker) = self.waker.lock().take() {
            waker.wake();
        }
    }
}

#[cfg(all(test, not(floodgate_loom)))]
mod tests {
    use super::*;

    #[test]
    fn fast_paths_count_and_refuse() {
        let word = AtomicU64::new(0);
        assert_eq!(try_acquire(&word, 2, false), Fast::Done(0));
        assert_eq!(try_acquire(&word, 2, false), Fast::Done(1));
        assert_eq!(try_acquire(&word, 2, false), Fast::Full);
        assert_eq!(try_acquire(&word, 2, true), Fast::Done(2));
        assert_eq!(try_release(&word), Fast::Done(3));
        assert_eq!(count(word.load(Ordering::Relaxed)), 2);
        word.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(try_acquire(&word, 2, false), Fast::Slow);
        word.store(RESERVED, Ordering::Relaxed);
        assert_eq!(try_acquire(&word, 2, false), Fast::Slow);
        assert_eq!(try_release(&word), Fast::Slow);
    }

    #[test]
    fn queue_is_fifo_and_hands_units_over() {
        let word = AtomicU64::new(0);
        let mut queue = VecDeque::new();
        assert!(matches!(
            acquire_locked(&word, None, 1, false, &mut queue, 2),
            Locked::Acquired(0)
        ));
        let Locked::Queued(first) = acquire_locked(&word, None, 1, false, &mut queue, 2) else {
            panic!("should queue")
        };
        let Locked::Queued(second) = acquire_locked(&word, None, 1, false, &mut queue, 2) else {
            panic!("should queue")
        };
        assert!(matches!(
            acquire_locked(&word, None, 1, false, &mut queue, 2),
            Locked::Full
        ));
        // Queued: the fast paths step aside.
        assert_eq!(try_acquire(&word, 1, false), Fast::Slow);
        assert_eq!(try_release(&word), Fast::Slow);

        let (_, granted) = release_locked(&word, &mut queue);
        assert!(granted.is_some_and(|g| Arc::ptr_eq(&g, &first)));
        assert!(first.is_granted() && !second.is_granted());
        assert_eq!(count(word.load(Ordering::Relaxed)), 1);
        // The second gives up: the queue empties and the flag drops.
        assert!(!cancel_locked(&word, &mut queue, &second));
        assert!(queue.is_empty());
        assert_eq!(word.load(Ordering::Relaxed), 1);
        // A granted waiter that cancels owns its unit.
        assert!(cancel_locked(&word, &mut queue, &first));
        assert_eq!(release_locked(&word, &mut queue).0, 1);
        assert_eq!(word.load(Ordering::Relaxed), 0);
    }
}

/// Model checks of the protocol: run with
/// `RUSTFLAGS="--cfg floodgate_loom" cargo test --release --lib gate::loom_tests`.
#[cfg(all(test, floodgate_loom))]
mod loom_tests {
    use super::*;

    /// A unit guarded the way the in-flight table guards a tenant's slot:
    /// a word plus a queue behind a mutex.
    struct Guarded {
        word: AtomicU64,
        queue: Mutex<VecDeque<Arc<Waiter>>>,
    }

    impl Guarded {
        fn acquire(&self, cap: u32, max_queue: usize) -> Option<Arc<Waiter>> {
            match try_acquire(&self.word, cap, false) {
                Fast::Done(_) => return None,
                Fast::Full if max_queue == 0 => return Some(Arc::new(Waiter::new())),
                _ => {}
            }
            let mut queue = self.queue.lock();
            match acquire_locked(&self.word, None, cap, false, &mut queue, max_queue) {
                Locked::Acquired(_) => None,
                Locked::Queued(waiter) => Some(waiter),
                // No owner to move.
                Locked::Full | Locked::Moved => Some(Arc::new(Waiter::new())),
            }
        }

        fn release(&self) {
            if let Fast::Done(_) = try_release(&self.word) {
                return;
            }
            let granted = {
                let mut queue = self.queue.lock();
                release_locked(&self.word, &mut queue).1
            };
            if let Some(waiter) = granted {
                waiter.wake();
            }
        }

        /// Waits for `waiter` a little, then gives up; releases whatever it
        /// ends up holding.
        fn wait_or_cancel(&self, waiter: &Arc<Waiter>) {
            for _ in 0..2 {
                if waiter.is_granted() {
                    self.release();
                    return;
                }
                loom::thread::yield_now();
            }
            let owned = {
                let mut queue = self.queue.lock();
                cancel_locked(&self.word, &mut queue, waiter)
            };
            if owned {
                self.release();
            }
        }
    }

    fn settle(guarded: &Guarded) {
        assert_eq!(guarded.word.load(Ordering::Acquire), 0, "a unit leaked");
        assert!(guarded.queue.lock().is_empty(), "a waiter was left behind");
    }

    #[test]
    fn units_always_come_back() {
        loom::model(|| {
            let guarded = Arc::new(Guarded {
                word: AtomicU64::new(0),
                queue: Mutex::new(VecDeque::new()),
            });
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let g = Arc::clone(&guarded);
                    loom::thread::spawn(move || match g.acquire(1, 1) {
                        None => g.release(),
                        Some(waiter) => g.wait_or_cancel(&waiter),
                    })
                })
                .collect();
            match guarded.acquire(1, 1) {
                None => guarded.release(),
                Some(waiter) => guarded.wait_or_cancel(&waiter),
            }
            for t in threads {
                t.join().expect("thread");
            }
            settle(&guarded);
        });
    }

    /// A release racing with a newcomer that finds the cap reached and
    /// queues: the newcomer is always granted, never left asleep.
    #[test]
    fn a_queued_waiter_is_always_granted() {
        loom::model(|| {
            let guarded = Arc::new(Guarded {
                word: AtomicU64::new(0),
                queue: Mutex::new(VecDeque::new()),
            });
            assert!(guarded.acquire(1, 1).is_none());
            let g = Arc::clone(&guarded);
            let newcomer = loom::thread::spawn(move || {
                if let Some(waiter) = g.acquire(1, 1) {
                    while !waiter.is_granted() {
                        loom::thread::yield_now();
                    }
                }
                g.release();
            });
            guarded.release();
            newcomer.join().expect("thread");
            settle(&guarded);
        });
    }

    #[test]
    fn never_more_than_the_cap_in_use() {
        loom::model(|| {
            let guarded = Arc::new(Guarded {
                word: AtomicU64::new(0),
                queue: Mutex::new(VecDeque::new()),
            });
            let in_use = Arc::new(AtomicU64::new(0));
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let (g, in_use) = (Arc::clone(&guarded), Arc::clone(&in_use));
                    loom::thread::spawn(move || {
                        if g.acquire(1, 0).is_none() {
                            let before = in_use.fetch_add(1, Ordering::AcqRel);
                            assert_eq!(before, 0, "two holders at once with a cap of one");
                            in_use.fetch_sub(1, Ordering::AcqRel);
                            g.release();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("thread");
            }
            settle(&guarded);
        });
    }
}
