//! Requests in flight, per tenant and in total, with FIFO queues for the
//! ones that wait for room.
//!
//! Each tenant's count is a [`gate`](crate::gate) word in a slot of a
//! [`ShardedTable`]; its queue lives in the shard, behind the shard's mutex.
//! A slot with nothing in flight and nobody waiting is idle: the table drops
//! it when it needs the room. A slot with requests in flight is never
//! dropped, so a shard full of busy tenants refuses new ones (which a
//! global cap normally makes impossible long before).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::Guard;

use crate::gate::{self, Fast, Locked, Waiter};
use crate::policy::Policy;
use crate::sync::Mutex;
use crate::table::{Retention, ShardedTable, Snapshot};

/// Queues of one shard, by tenant fingerprint.
pub(crate) type Queues = HashMap<u64, VecDeque<Arc<Waiter>>>;

struct Counts;

impl Retention for Counts {
    fn idle(&self, word: u64) -> bool {
        gate::is_idle(word)
    }

    fn eviction_order(&self, _: u64) -> Option<u64> {
        None
    }
}

/// What an attempt to take a unit gave.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Taken.
    Granted,
    /// Queued: wait on the waiter, then it is taken (or cancel).
    Wait(Arc<Waiter>),
    /// At the cap, and no room to queue.
    Full,
    /// The table is full of busy tenants.
    NoRoom,
}

/// Per-tenant counts and queues.
pub(crate) struct Tenants {
    table: ShardedTable<Arc<Policy>, Queues>,
    /// Tenants with at least one request in flight, if counted.
    active: Option<AtomicU64>,
}

impl Tenants {
    pub(crate) fn new(max_tenants: usize, policy: Arc<Policy>, count_active: bool) -> Self {
        Self {
            table: ShardedTable::new(max_tenants, policy),
            active: count_active.then(|| AtomicU64::new(0)),
        }
    }

    #[inline]
    pub(crate) fn snapshot(&self) -> Guard<Arc<Snapshot<Arc<Policy>>>> {
        self.table.snapshot()
    }

    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        self.table.set_extra(policy);
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

    /// The requests `fp` has in flight now.
    #[inline]
    pub(crate) fn in_flight(&self, snapshot: &Snapshot<Arc<Policy>>, fp: u64) -> u32 {
        snapshot.find(fp).map_or(0, |slot| {
            let word = slot.value.load(Ordering::Acquire);
            if word == crate::table::FROZEN {
                0
            } else {
                gate::count(word)
            }
        })
    }

    /// Takes a unit for `fp` under `cap` (`force`: whatever the count),
    /// queueing if fewer than `max_queue` of its requests wait.
    #[inline]
    pub(crate) fn acquire(
        &self,
        snapshot: &Snapshot<Arc<Policy>>,
        fp: u64,
        cap: u32,
        force: bool,
        max_queue: usize,
    ) -> Admission {
        if let Some(slot) = snapshot.find(fp) {
            match gate::try_acquire(&slot.value, cap, force) {
                Fast::Done(before) => {
                    self.became_active(before);
                    return Admission::Granted;
                }
                Fast::Full if max_queue == 0 => return Admission::Full,
                Fast::Full | Fast::Slow => {}
            }
        }
        self.acquire_locked(fp, cap, force, max_queue)
    }

    #[cold]
    fn acquire_locked(&self, fp: u64, cap: u32, force: bool, max_queue: usize) -> Admission {
        let mut locked = self.table.lock(fp);
        if locked.find(fp).is_none() && locked.insert(fp, 0, &Counts).is_none() {
            return Admission::NoRoom;
        }
        let (Some(slot), queues) = locked.parts(fp) else {
            return Admission::NoRoom;
        };
        let queue = queues.entry(fp).or_default();
        let outcome = gate::acquire_locked(&slot.value, cap, force, queue, max_queue);
        if queue.is_empty() {
            queues.remove(&fp);
        }
        match outcome {
            Locked::Acquired(before) => {
                self.became_active(before);
                Admission::Granted
            }
            Locked::Queued(waiter) => Admission::Wait(waiter),
            Locked::Full => Admission::Full,
        }
    }

    /// Returns a unit of `fp`'s.
    #[inline]
    pub(crate) fn release(&self, fp: u64) {
        let snapshot = self.table.snapshot();
        if let Some(slot) = snapshot.find(fp)
            && let Fast::Done(before) = gate::try_release(&slot.value)
        {
            self.became_idle(before);
            return;
        }
        drop(snapshot);
        self.release_locked(fp);
    }

    #[cold]
    fn release_locked(&self, fp: u64) {
        let granted = {
            let mut locked = self.table.lock(fp);
            let (Some(slot), queues) = locked.parts(fp) else {
                debug_assert!(false, "released a tenant that holds nothing");
                return;
            };
            let mut none = VecDeque::new();
            let queue = queues.get_mut(&fp).unwrap_or(&mut none);
            let (before, granted) = gate::release_locked(&slot.value, queue);
            if queue.is_empty() {
                queues.remove(&fp);
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

    /// Withdraws `waiter`; if it had been granted a unit meanwhile, returns
    /// that unit.
    pub(crate) fn cancel(&self, fp: u64, waiter: &Arc<Waiter>) {
        let owned = {
            let mut locked = self.table.lock(fp);
            let (Some(slot), queues) = locked.parts(fp) else {
                return;
            };
            let mut none = VecDeque::new();
            let queue = queues.get_mut(&fp).unwrap_or(&mut none);
            let owned = gate::cancel_locked(&slot.value, queue, waiter);
            if queue.is_empty() {
                queues.remove(&fp);
            }
            owned
        };
        if owned {
            self.release(fp);
        }
    }

    /// Total requests in flight and waiting, summed over every tenant (a
    /// walk over the table, for stats and tests).
    pub(crate) fn totals(&self) -> (u64, u64) {
        let mut in_flight = 0;
        self.table.for_each(|_, slot| {
            let word = slot.value.load(Ordering::Acquire);
            in_flight += u64::from(gate::count(word));
        });
        (in_flight, self.table.fold_payload(0, |n, queues| {
            n + queues.values().map(|q| q.len() as u64).sum::<u64>()
        }))
    }

    pub(crate) fn tracked(&self) -> usize {
        self.table.len()
    }
}

/// One count for everybody, with its queue.
#[derive(Default)]
pub(crate) struct Global {
    word: AtomicU64,
    queue: Mutex<VecDeque<Arc<Waiter>>>,
}

impl Global {
    #[inline]
    pub(crate) fn acquire(&self, cap: u32, force: bool, max_queue: usize) -> Admission {
        match gate::try_acquire(&self.word, cap, force) {
            Fast::Done(_) => return Admission::Granted,
            Fast::Full if max_queue == 0 => return Admission::Full,
            Fast::Full | Fast::Slow => {}
        }
        let mut queue = self.queue.lock();
        match gate::acquire_locked(&self.word, cap, force, &mut queue, max_queue) {
            Locked::Acquired(_) => Admission::Granted,
            Locked::Queued(waiter) => Admission::Wait(waiter),
            Locked::Full => Admission::Full,
        }
    }

    #[inline]
    pub(crate) fn release(&self) {
        if let Fast::Done(_) = gate::try_release(&self.word) {
            return;
        }
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
