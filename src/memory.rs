//! The in-memory GCRA store: one atomic theoretical arrival time per tenant,
//! read and updated without locks.
//!
//! # Layout
//!
//! Tenants are spread over a power-of-two number of shards by their 64-bit
//! keyed hash. Each shard is an open-addressing table (linear probing) of
//! 16-byte slots: the tenant's hash, which is its identity (keys themselves
//! are never stored), and its TAT, both `AtomicU64`. One immutable
//! [`Snapshot`] holds every shard's current table and the policy in force;
//! a request loads it once.
//!
//! # Reads take no lock
//!
//! A known tenant is decided with plain atomic loads and one
//! compare-and-swap on its TAT. A refused request writes nothing at all, so
//! a tenant flooding every core costs each core only its own cache: there
//! is no lock word for the cores to fight over.
//!
//! Tables never change shape while they are in use. A new tenant takes its
//! shard's mutex and claims an empty slot (writing the TAT before the hash,
//! so a reader that sees the hash sees the TAT). When a shard's table is
//! too full, or the shard holds its share of the cap, the writer *freezes*
//! every slot (swaps its TAT for [`FROZEN`]), copies the live ones into a new
//! table and publishes a new snapshot. A reader that meets a frozen slot, or
//! whose compare-and-swap loses to the freeze, waits for the shard's mutex
//! and reads the new table, so no update is lost: the freeze returns the
//! last value written, and a frozen slot never thaws.
//!
//! # Memory bound and eviction
//!
//! The store never holds more than `max_tenants` tenants. A slot whose TAT
//! is in the past describes a full bucket, which is what an absent slot
//! means too, so a rebuild drops idle tenants without changing any
//! decision. If a shard is still at its share of the cap after that, it
//! drops the tenants whose TAT is earliest (those closest to a full bucket,
//! who lose the least) until an eighth of its share is free. A rebuild walks
//! one shard (a few thousand slots) and is paid for by the inserts it makes
//! room for: no pass over the whole table ever runs on the request path.
//!
//! # Identity by hash
//!
//! Two different keys with the same 64-bit hash share a bucket. The hash is
//! seeded randomly per process; with a million tracked tenants the chance
//! that any two collide is about 3 in 100 million, and nobody outside the
//! process can aim for a collision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;

use crate::gcra::{self, Step};
use crate::policy::Policy;
use crate::quota::Quota;

/// The TAT of a slot that is being, or has been, moved to a new table.
const FROZEN: u64 = u64::MAX;
/// The hash of an empty slot.
const EMPTY: u64 = 0;
/// Keep rebuilds short: a shard is sized to hold about this many tenants.
const TARGET_SHARD_LEN: usize = 4096;
/// Never make shards smaller than this, unless the cap itself is smaller.
const MIN_SHARD_LEN: usize = 64;
const MAX_SHARDS: usize = 4096;
/// Shard index bits: far above the low bits that place slots in a table.
const SHARD_SHIFT: u32 = 44;
const MIN_SLOTS: usize = 16;

struct Slot {
    fp: AtomicU64,
    tat: AtomicU64,
}

struct Table {
    slots: Box<[Slot]>,
    mask: usize,
    /// Most slots in use before the table must be rebuilt (¾).
    max_used: usize,
}

impl Table {
    fn with_slots(n: usize) -> Self {
        debug_assert!(n == 0 || n.is_power_of_two());
        Self {
            slots: (0..n)
                .map(|_| Slot {
                    fp: AtomicU64::new(EMPTY),
                    tat: AtomicU64::new(0),
                })
                .collect(),
            mask: n.saturating_sub(1),
            max_used: n / 4 * 3,
        }
    }

    #[inline]
    fn find(&self, fp: u64) -> Option<&Slot> {
        let mut i = fp as usize & self.mask;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            match slot.fp.load(Ordering::Acquire) {
                f if f == fp => return Some(slot),
                EMPTY => return None,
                _ => i = (i + 1) & self.mask,
            }
        }
        None
    }

    /// Claims an empty slot for `fp`. Only called with the shard's mutex
    /// held (or before the table is shared), with fewer than `max_used`
    /// slots in use, so an empty slot exists.
    fn insert(&self, fp: u64, tat: u64) {
        let mut i = fp as usize & self.mask;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.fp.load(Ordering::Relaxed) == EMPTY {
                slot.tat.store(tat, Ordering::Relaxed);
                slot.fp.store(fp, Ordering::Release);
                return;
            }
            i = (i + 1) & self.mask;
        }
        debug_assert!(false, "insert into a full table");
    }
}

/// What a request reads: the policy in force and every shard's table.
pub(crate) struct Snapshot {
    pub(crate) policy: Arc<Policy>,
    tables: Box<[Arc<Table>]>,
}

struct ShardState {
    /// The shard's current table (the one in the latest snapshot).
    table: Arc<Table>,
    /// Tenants in it.
    live: usize,
    evicted_idle: u64,
    evicted_active: u64,
}

#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
}

pub(crate) struct MemoryStore {
    snapshot: ArcSwap<Snapshot>,
    /// Serialises the publication of new snapshots.
    publish: Mutex<()>,
    shards: Box<[Shard]>,
    mask: usize,
    shard_cap: usize,
    max_slots: usize,
}

/// Eviction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evictions {
    pub(crate) idle: u64,
    pub(crate) active: u64,
}

/// A step could not complete because the tenant's slot is frozen.
struct Frozen;

impl MemoryStore {
    pub(crate) fn new(max_tenants: usize, policy: Arc<Policy>) -> Self {
        let max_tenants = max_tenants.max(1);
        let cpus = std::thread::available_parallelism().map_or(4, usize::from);
        let mut shards = (max_tenants / TARGET_SHARD_LEN)
            .next_power_of_two()
            .clamp((cpus * 4).next_power_of_two(), MAX_SHARDS);
        while shards > 1 && max_tenants / shards < MIN_SHARD_LEN {
            shards /= 2;
        }
        let shard_cap = max_tenants.div_ceil(shards);
        let max_slots = (shard_cap * 4)
            .div_ceil(3)
            .next_power_of_two()
            .max(MIN_SLOTS);
        let empty = Arc::new(Table::with_slots(0));
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                policy,
                tables: (0..shards).map(|_| Arc::clone(&empty)).collect(),
            }),
            publish: Mutex::new(()),
            shards: (0..shards)
                .map(|_| Shard {
                    state: Mutex::new(ShardState {
                        table: Arc::clone(&empty),
                        live: 0,
                        evicted_idle: 0,
                        evicted_active: 0,
                    }),
                })
                .collect(),
            mask: shards - 1,
            shard_cap,
            max_slots,
        }
    }

    pub(crate) fn max_tenants(&self) -> usize {
        self.shards.len() * self.shard_cap
    }

    #[inline]
    pub(crate) fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Puts a new policy in the snapshot.
    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        let _publish = self.publish.lock();
        let current = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot {
            policy,
            tables: current.tables.clone(),
        }));
    }

    /// After a policy change, rescales the debt of every tracked tenant
    /// whose quota changed, so that it keeps the same share of its burst in
    /// use. Runs on the thread that changed the policy.
    pub(crate) fn rescale(&self, old: &Policy, new: &Policy, now: u64) {
        let convert = |fp: u64, slot: &Slot| {
            if let (Some(from), Some(to)) = (old.quota_for_hash(fp), new.quota_for_hash(fp))
                && from != to
            {
                rescale_slot(&slot.tat, now, from, to);
            }
        };
        match old.changed_tenants(new) {
            Some(hashes) => {
                for hash in hashes {
                    let fp = fingerprint(hash);
                    let state = self.shards[self.shard_of(fp)].state.lock();
                    if let Some(slot) = state.table.find(fp) {
                        convert(hash, slot);
                    }
                }
            }
            None => {
                for shard in &*self.shards {
                    let state = shard.state.lock();
                    for slot in &*state.table.slots {
                        let fp = slot.fp.load(Ordering::Acquire);
                        if fp != EMPTY {
                            convert(fp, slot);
                        }
                    }
                }
            }
        }
    }

    #[inline]
    fn shard_of(&self, fp: u64) -> usize {
        (fp >> SHARD_SHIFT) as usize & self.mask
    }

    /// Decides for the tenant with hash `hash`. Returns the step and the TAT
    /// it leaves (the new one if admitted, the current one otherwise).
    #[inline]
    pub(crate) fn check(
        &self,
        snapshot: &Snapshot,
        hash: u64,
        now: u64,
        cost: u32,
        quota: &Quota,
    ) -> (Step, u64) {
        let fp = fingerprint(hash);
        let shard = self.shard_of(fp);
        if let Some(slot) = snapshot.tables[shard].find(fp)
            && let Ok(decided) = update(&slot.tat, now, cost, quota)
        {
            return decided;
        }
        self.check_locked(shard, fp, now, cost, quota)
    }

    /// The slow path: a tenant that is new, or whose slot is being moved.
    #[cold]
    fn check_locked(
        &self,
        shard: usize,
        fp: u64,
        now: u64,
        cost: u32,
        quota: &Quota,
    ) -> (Step, u64) {
        let mut state = self.shards[shard].state.lock();
        // With the mutex held, the shard's current table is not being
        // rebuilt: its slots are not frozen.
        if let Some(slot) = state.table.find(fp) {
            if let Ok(decided) = update(&slot.tat, now, cost, quota) {
                return decided;
            }
            debug_assert!(false, "a slot of the current table is frozen");
        }
        // Not tracked: the bucket is full.
        let step = gcra::step(0, now, cost, quota);
        let Step::Allow { new_tat } = step else {
            return (step, 0);
        };
        if cost == 0 {
            return (step, 0);
        }
        if state.live >= self.shard_cap || state.live >= state.table.max_used {
            self.rebuild(shard, &mut state, now, 1);
        }
        let new_tat = new_tat.min(FROZEN - 1);
        state.table.insert(fp, new_tat);
        state.live += 1;
        (Step::Allow { new_tat }, new_tat)
    }

    /// Moves the shard's tenants into a new table with room for at least
    /// `room` more, and publishes it. Called with the shard's mutex.
    ///
    /// Below the shard's share of the cap the table just grows, keeping idle
    /// tenants (dropping them would only have them inserted again). At the
    /// cap, idle tenants go first, then those closest to a full bucket.
    /// With `room == 0` (maintenance) idle tenants go and the table shrinks
    /// to fit.
    fn rebuild(&self, shard: usize, state: &mut ShardState, now: u64, room: usize) {
        let old = &*state.table;
        let grow = room > 0 && state.live + room <= self.shard_cap;
        let mut kept = Vec::with_capacity(state.live);
        let mut idle = 0;
        for slot in &*old.slots {
            let fp = slot.fp.load(Ordering::Acquire);
            if fp == EMPTY {
                continue;
            }
            match slot.tat.swap(FROZEN, Ordering::AcqRel) {
                FROZEN => {}
                tat if grow || tat > now => kept.push((fp, tat)),
                _ => idle += 1,
            }
        }
        state.evicted_idle += idle;

        // Still no room: forget the tenants closest to a full bucket until
        // an eighth of the shard's share is free.
        if room > 0 && kept.len() + room > self.shard_cap {
            let target = self.shard_cap - (self.shard_cap / 8).max(room).min(self.shard_cap);
            let drop = kept.len() - target;
            if drop < kept.len() {
                kept.select_nth_unstable_by_key(drop, |&(_, tat)| tat);
            }
            kept.drain(..drop);
            state.evicted_active += drop as u64;
        }

        let slots = if grow {
            (old.slots.len() * 2).clamp(MIN_SLOTS, self.max_slots)
        } else if room == 0 && kept.is_empty() {
            0
        } else {
            // At most ¾ full with the room asked for.
            ((kept.len() + room) * 4)
                .div_ceil(3)
                .next_power_of_two()
                .clamp(MIN_SLOTS, self.max_slots)
        };
        let table = Table::with_slots(slots);
        for &(fp, tat) in &kept {
            table.insert(fp, tat);
        }
        let table = Arc::new(table);
        self.publish_table(shard, Arc::clone(&table));
        state.table = table;
        state.live = kept.len();
    }

    fn publish_table(&self, shard: usize, table: Arc<Table>) {
        let _publish = self.publish.lock();
        let current = self.snapshot.load_full();
        let mut tables = current.tables.clone();
        tables[shard] = table;
        self.snapshot.store(Arc::new(Snapshot {
            policy: Arc::clone(&current.policy),
            tables,
        }));
    }

    /// Drops every idle tenant and gives memory back, one shard at a time.
    pub(crate) fn evict_idle(&self, now: u64) -> usize {
        let mut total = 0;
        for (shard, lock) in self.shards.iter().enumerate() {
            let mut state = lock.state.lock();
            let before = state.live;
            self.rebuild(shard, &mut state, now, 0);
            total += before - state.live;
        }
        total
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.state.lock().live).sum()
    }

    pub(crate) fn evictions(&self) -> Evictions {
        self.shards.iter().fold(Evictions::default(), |acc, s| {
            let state = s.state.lock();
            Evictions {
                idle: acc.idle + state.evicted_idle,
                active: acc.active + state.evicted_active,
            }
        })
    }

    #[cfg(test)]
    fn tat(&self, hash: u64) -> Option<u64> {
        let fp = fingerprint(hash);
        let snapshot = self.snapshot.load();
        snapshot.tables[self.shard_of(fp)]
            .find(fp)
            .map(|s| s.tat.load(Ordering::Acquire))
    }

    #[cfg(test)]
    fn slots(&self) -> usize {
        self.snapshot
            .load()
            .tables
            .iter()
            .map(|t| t.slots.len())
            .sum()
    }
}

/// Scales a tenant's debt (TAT − now) from quota `from` to quota `to`, in
/// proportion to the emission intervals, capped at the new burst.
fn rescale_slot(tat: &AtomicU64, now: u64, from: &Quota, to: &Quota) {
    let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
        if current == FROZEN || current <= now {
            return None;
        }
        let debt = u128::from(current - now) * u128::from(to.interval_nanos())
            / u128::from(from.interval_nanos());
        let debt = u64::try_from(debt)
            .unwrap_or(u64::MAX)
            .min(to.tolerance_nanos());
        Some(now.saturating_add(debt).min(FROZEN - 1))
    });
}

/// Hash 0 marks empty slots; move it aside.
#[inline]
fn fingerprint(hash: u64) -> u64 {
    if hash == EMPTY { 1 } else { hash }
}

/// Applies one GCRA step to a tracked tenant, lock-free.
///
/// # Memory ordering
///
/// Nothing else is published through the TAT, so the only requirement is
/// that every read-modify-write of it is totally ordered, which holds for
/// any ordering. `Acquire`/`Release` pair the compare-and-swap with the
/// freezing `swap` of a rebuild, so that the rebuild copies the last value.
#[inline]
fn update(tat: &AtomicU64, now: u64, cost: u32, quota: &Quota) -> Result<(Step, u64), Frozen> {
    let mut current = tat.load(Ordering::Acquire);
    loop {
        if current == FROZEN {
            return Err(Frozen);
        }
        match gcra::step(current, now, cost, quota) {
            Step::Allow { new_tat } if cost > 0 => {
                let new_tat = new_tat.min(FROZEN - 1);
                match tat.compare_exchange_weak(
                    current,
                    new_tat,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok((Step::Allow { new_tat }, new_tat)),
                    Err(actual) => current = actual,
                }
            }
            other => return Ok((other, current)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::tenant_hash;
    use crate::policy::Plan;
    use std::num::NonZeroU32;

    fn quota(per_sec: u32) -> Quota {
        Quota::per_second(NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN))
    }

    fn store(max: usize) -> MemoryStore {
        MemoryStore::new(max, Arc::new(Policy::new(Plan::new("p"))))
    }

    fn check(store: &MemoryStore, key: &[u8], now: u64, cost: u32, q: &Quota) -> Step {
        store
            .check(&store.snapshot(), tenant_hash(key), now, cost, q)
            .0
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn refused_and_free_requests_are_not_stored() {
        let store = store(100);
        let q = quota(2);
        assert_eq!(check(&store, b"a", 0, 3, &q), Step::Impossible);
        assert!(matches!(check(&store, b"a", 0, 0, &q), Step::Allow { .. }));
        assert_eq!(store.len(), 0);
        assert_eq!(store.slots(), 0);
        assert!(matches!(check(&store, b"a", 0, 2, &q), Step::Allow { .. }));
        assert_eq!(store.len(), 1);
        assert_eq!(store.tat(tenant_hash(b"a")), Some(SEC));
        assert!(matches!(check(&store, b"a", 0, 1, &q), Step::Deny { .. }));
    }

    #[test]
    fn shard_layout_respects_the_cap() {
        for max in [1, 7, 100, 1_000, 50_000, 1_000_000, 100_000_000] {
            let store = store(max);
            assert!(store.max_tenants() >= max, "{max}");
            assert!(store.max_tenants() < max + store.shards.len(), "{max}");
            assert!(store.shards.len().is_power_of_two());
            assert!(store.max_slots * 3 / 4 >= store.shard_cap);
        }
    }

    #[test]
    fn tenants_survive_rebuilds_with_their_state() {
        let store = store(100_000);
        let q = quota(1);
        for i in 0..20_000u64 {
            assert!(matches!(
                check(&store, &i.to_le_bytes(), 0, 1, &q),
                Step::Allow { .. }
            ));
        }
        assert_eq!(store.len(), 20_000);
        assert_eq!(store.evictions(), Evictions::default());
        for i in 0..20_000u64 {
            assert_eq!(store.tat(tenant_hash(&i.to_le_bytes())), Some(SEC), "{i}");
            assert!(matches!(
                check(&store, &i.to_le_bytes(), 0, 1, &q),
                Step::Deny { .. }
            ));
        }
    }

    #[test]
    fn idle_tenants_are_dropped_first_and_losslessly() {
        let store = store(64);
        let q = quota(1);
        // Fill to the cap at t=0; everyone is idle again at t=1 s.
        for i in 0..store.max_tenants() * 4 {
            check(&store, &i.to_le_bytes(), 0, 1, &q);
        }
        assert!(store.len() <= store.max_tenants());
        let active_before = store.evictions().active;
        // At t=2 s every tracked tenant is idle: newcomers (fewer than the
        // cap) make room without dropping anybody in debt.
        let newcomers: Vec<u64> = (0..40u64).map(|i| 1_000_000 + i).collect();
        for i in &newcomers {
            assert!(matches!(
                check(&store, &i.to_le_bytes(), 2 * SEC, 1, &q),
                Step::Allow { .. }
            ));
        }
        assert_eq!(store.evictions().active, active_before);
        assert!(store.evictions().idle > 0);
        assert!(store.len() <= store.max_tenants());
        for i in &newcomers {
            assert_eq!(store.tat(tenant_hash(&i.to_le_bytes())), Some(3 * SEC));
        }
    }

    #[test]
    fn key_rotation_cannot_grow_the_store_and_heavy_tenants_survive() {
        let store = store(1_000);
        let q = quota(1);
        let q_heavy = Quota::per_second(NonZeroU32::MIN)
            .allow_burst(NonZeroU32::new(1_000).unwrap_or(NonZeroU32::MIN));
        assert!(matches!(
            check(&store, b"heavy", 0, 1_000, &q_heavy),
            Step::Allow { .. }
        ));
        let slots_at_cap = store.max_slots * store.shards.len();
        // 100 000 one-shot keys at 1 µs apart: all in debt for a second.
        for i in 0..100_000u64 {
            check(&store, &i.to_le_bytes(), i * 1_000, 1, &q);
            assert!(store.len() <= store.max_tenants());
        }
        assert!(store.slots() <= slots_at_cap);
        assert!(store.evictions().active > 90_000);
        // The heavy tenant still owes its debt.
        assert!(matches!(
            check(&store, b"heavy", 100_000_000, 1, &q_heavy),
            Step::Deny { .. }
        ));
    }

    #[test]
    fn evict_idle_empties_and_shrinks() {
        let store = store(10_000);
        let q = quota(1);
        for i in 0..5_000u64 {
            check(&store, &i.to_le_bytes(), 0, 1, &q);
        }
        check(&store, b"late", 5 * SEC, 1, &q);
        let before = store.slots();
        assert_eq!(store.evict_idle(2 * SEC), 5_000);
        assert_eq!(store.len(), 1);
        assert!(store.slots() < before / 8, "{} of {before}", store.slots());
        assert_eq!(store.tat(tenant_hash(b"late")), Some(6 * SEC));
    }

    #[test]
    fn concurrent_checks_never_admit_more_than_the_burst() {
        let store = store(100_000);
        let q = quota(1).allow_burst(NonZeroU32::new(1_000).unwrap_or(NonZeroU32::MIN));
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (store, q, admitted) = (&store, &q, &admitted);
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        // Other tenants arrive all the time, forcing rebuilds
                        // of the shared tenant's shard while it is updated.
                        check(store, &(t * 1_000_000 + i).to_le_bytes(), 0, 1, q);
                        if matches!(check(store, b"shared", 0, 1, q), Step::Allow { .. }) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    }
}
