//! The in-memory GCRA store: one atomic theoretical arrival time (TAT) per
//! tenant in a [`ShardedTable`], read and updated without locks.
//!
//! A slot whose TAT is in the past describes a full bucket, which is what an
//! absent slot means too, so the table may drop such *idle* tenants without
//! changing any decision. At the cap it drops the tenants whose TAT is
//! earliest next (those closest to a full bucket, who lose the least).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::Guard;

use crate::gcra::{self, Step};
use crate::policy::Policy;
use crate::quota::Quota;
use crate::table::{Evictions, FROZEN, Retention, ShardedTable, Snapshot, fingerprint};

pub(crate) struct MemoryStore {
    table: ShardedTable<Arc<Policy>>,
}

/// A step could not complete because the tenant's slot is frozen.
struct Frozen;

/// TATs at or before `now` are idle; earlier TATs are evicted first.
struct Tats {
    now: u64,
}

impl Retention for Tats {
    fn idle(&self, tat: u64) -> bool {
        tat <= self.now
    }

    fn eviction_order(&self, tat: u64) -> Option<u64> {
        Some(tat)
    }
}

impl MemoryStore {
    pub(crate) fn new(max_tenants: usize, policy: Arc<Policy>) -> Self {
        Self {
            table: ShardedTable::new(max_tenants, policy),
        }
    }

    pub(crate) fn max_tenants(&self) -> usize {
        self.table.max_tenants()
    }

    /// The tables and the policy in force, for one decision.
    #[inline]
    pub(crate) fn snapshot(&self) -> Guard<Arc<Snapshot<Arc<Policy>>>> {
        self.table.snapshot()
    }

    /// Puts a new policy in the snapshot.
    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        self.table.set_extra(policy);
    }

    /// After a policy change, rescales the debt of every tracked tenant
    /// whose quota changed, so that it keeps the units it has in use (up to
    /// the new burst). Runs on the thread that changed the policy.
    pub(crate) fn rescale(&self, old: &Policy, new: &Policy, now: u64) {
        let convert = |fp: u64, tat: &AtomicU64| {
            if let (Some(from), Some(to)) = (old.quota_for_hash(fp), new.quota_for_hash(fp))
                && from != to
            {
                rescale_slot(tat, now, from, to);
            }
        };
        match old.changed_tenants(new) {
            Some(hashes) => {
                for hash in hashes {
                    let fp = fingerprint(hash);
                    let locked = self.table.lock(fp);
                    if let Some(slot) = locked.find(fp) {
                        convert(hash, &slot.value);
                    }
                }
            }
            None => self.table.for_each(|fp, slot| convert(fp, &slot.value)),
        }
    }

    /// Decides for the tenant with hash `hash`. Returns the step and the TAT
    /// it leaves (the new one if admitted, the current one otherwise).
    #[inline]
    pub(crate) fn check(
        &self,
        snapshot: &Snapshot<Arc<Policy>>,
        hash: u64,
        now: u64,
        cost: u32,
        quota: &Quota,
    ) -> (Step, u64) {
        let fp = fingerprint(hash);
        if let Some(slot) = snapshot.find(fp)
            && let Ok(decided) = update(&slot.value, now, cost, quota)
        {
            return decided;
        }
        self.check_locked(fp, now, cost, quota)
    }

    /// The slow path: a tenant that is new, or whose slot is being moved.
    #[cold]
    fn check_locked(&self, fp: u64, now: u64, cost: u32, quota: &Quota) -> (Step, u64) {
        let mut locked = self.table.lock(fp);
        if let Some(slot) = locked.find(fp) {
            if let Ok(decided) = update(&slot.value, now, cost, quota) {
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
        let new_tat = new_tat.min(FROZEN - 1);
        // Every TAT is evictable, so there is always room.
        let _ = locked.insert(fp, new_tat, &Tats { now });
        (Step::Allow { new_tat }, new_tat)
    }

    /// The TAT stored for `hash`, if any (a deny cache's view).
    #[cfg(feature = "redis")]
    #[inline]
    pub(crate) fn peek(&self, hash: u64) -> Option<u64> {
        self.snapshot()
            .find(fingerprint(hash))
            .map(|slot| slot.value.load(Ordering::Acquire))
            .filter(|&tat| tat != FROZEN)
    }

    /// Raises the TAT stored for `hash` to at least `tat` (a deny cache
    /// learning what Redis knows).
    #[cfg(feature = "redis")]
    pub(crate) fn raise(&self, hash: u64, tat: u64, now: u64) {
        let fp = fingerprint(hash);
        let tat = tat.min(FROZEN - 1);
        let snapshot = self.snapshot();
        if let Some(slot) = snapshot.find(fp)
            && slot
                .value
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                    (current != FROZEN).then_some(current.max(tat))
                })
                .is_ok()
        {
            return;
        }
        drop(snapshot);
        let mut locked = self.table.lock(fp);
        match locked.find(fp) {
            Some(slot) => {
                slot.value.fetch_max(tat, Ordering::AcqRel);
            }
            None => {
                let _ = locked.insert(fp, tat, &Tats { now });
            }
        }
    }

    /// Drops every idle tenant and gives memory back, one shard at a time.
    pub(crate) fn evict_idle(&self, now: u64) -> usize {
        self.table.evict_idle(&Tats { now })
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn evictions(&self) -> Evictions {
        self.table.evictions()
    }

    #[cfg(test)]
    fn tat(&self, hash: u64) -> Option<u64> {
        self.snapshot()
            .find(fingerprint(hash))
            .map(|s| s.value.load(Ordering::Acquire))
    }

    #[cfg(test)]
    fn slots(&self) -> usize {
        self.table.slots()
    }
}

/// Scales a tenant's debt (TAT − now) from quota `from` to quota `to`, in
/// proportion to the emission intervals, capped at the new burst.
fn rescale_slot(tat: &AtomicU64, now: u64, from: &Quota, to: &Quota) {
    // As in every GCRA step: past `LATEST` the clock stands still.
    let now = now.min(crate::gcra::LATEST);
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
        let slots = store.slots();
        assert_eq!(check(&store, b"a", 0, 3, &q), Step::Impossible);
        assert!(matches!(check(&store, b"a", 0, 0, &q), Step::Allow { .. }));
        assert_eq!(store.len(), 0);
        // Nothing stored, nothing allocated.
        assert_eq!(store.slots(), slots);
        assert_eq!(store.evictions(), Evictions::default());
        assert!(matches!(check(&store, b"a", 0, 2, &q), Step::Allow { .. }));
        assert_eq!(store.len(), 1);
        assert_eq!(store.tat(tenant_hash(b"a")), Some(SEC));
        assert!(matches!(check(&store, b"a", 0, 1, &q), Step::Deny { .. }));
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
        let slots_at_cap = store.table.slots_at_cap();
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
