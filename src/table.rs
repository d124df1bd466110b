//! A sharded, capped table of one `AtomicU64` per tenant, read without locks.
//!
//! The GCRA store (a theoretical arrival time per tenant) lives in it.
//!
//! # Layout
//!
//! Tenants are spread over a power-of-two number of shards by their 64-bit
//! keyed hash. Each shard is an open-addressing table (linear probing) of
//! 16-byte slots: the tenant's hash, which is its identity (keys themselves
//! are never stored), and its value. One immutable [`Snapshot`] holds every
//! shard's current table and an `extra` payload (the policy in force); a
//! request loads it once.
//!
//! # Reads take no lock
//!
//! A known tenant is found with plain atomic loads and updated with a
//! compare-and-swap on its value. Tables never change shape while in use. A
//! new tenant takes its shard's mutex and claims an empty slot (writing the
//! value before the hash, so a reader that sees the hash sees the value).
//! When a shard's table is too full, or the shard holds its share of the
//! cap, the writer *freezes* every slot (swaps its value for [`FROZEN`]),
//! copies the ones it keeps into a new table and publishes a new snapshot.
//! A reader that meets a frozen slot, or whose compare-and-swap loses to the
//! freeze, takes the shard's mutex and works on the new table, so no update
//! is lost: the freeze returns the last value written, and a frozen slot
//! never thaws.
//!
//! # Memory bound
//!
//! The table never holds more than its cap. Below the cap a full shard just
//! grows. At the cap, a rebuild drops the values its [`Retention`] calls
//! idle (they carry no information: a full bucket, no request in flight),
//! then, if that is not enough, the evictable ones in the order it gives,
//! until an eighth of the shard's share is free. A rebuild walks one shard
//! (a few thousand slots) and is paid for by the inserts it makes room for.
//!
//! # Identity by hash
//!
//! Two different keys with the same 64-bit hash share a slot. The hash is
//! seeded randomly per process; with a million tracked tenants the chance
//! that any two collide is about 3 in 100 million, and nobody outside the
//! process can aim for a collision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, Guard};
use parking_lot::{Mutex, MutexGuard};

/// The value of a slot that is being, or has been, moved to a new table.
pub(crate) const FROZEN: u64 = u64::MAX;
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

/// One tenant's entry.
pub(crate) struct Slot {
    fp: AtomicU64,
    pub(crate) value: AtomicU64,
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
                    value: AtomicU64::new(0),
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
    fn insert(&self, fp: u64, value: u64) -> Option<&Slot> {
        let mut i = fp as usize & self.mask;
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.fp.load(Ordering::Relaxed) == EMPTY {
                slot.value.store(value, Ordering::Relaxed);
                slot.fp.store(fp, Ordering::Release);
                return Some(slot);
            }
            i = (i + 1) & self.mask;
        }
        None
    }
}

/// What a request reads: every shard's table and the `extra` payload.
pub(crate) struct Snapshot<E> {
    pub(crate) extra: E,
    tables: Box<[Arc<Table>]>,
    mask: usize,
}

impl<E> Snapshot<E> {
    /// The slot of the tenant with fingerprint `fp`, lock-free.
    #[inline]
    pub(crate) fn find(&self, fp: u64) -> Option<&Slot> {
        self.tables[shard_of(fp, self.mask)].find(fp)
    }
}

#[inline]
fn shard_of(fp: u64, mask: usize) -> usize {
    (fp >> SHARD_SHIFT) as usize & mask
}

/// Hash 0 marks empty slots; move it aside.
#[inline]
pub(crate) fn fingerprint(hash: u64) -> u64 {
    if hash == EMPTY { 1 } else { hash }
}

/// Which values a full shard may drop.
pub(crate) trait Retention {
    /// The value carries no information: dropping it changes nothing.
    fn idle(&self, value: u64) -> bool;
    /// The value may be dropped to make room; lower orders go first.
    /// `None`: never drop it.
    fn eviction_order(&self, value: u64) -> Option<u64>;
}

struct ShardState {
    /// The shard's current table (the one in the latest snapshot).
    table: Arc<Table>,
    /// Slots in use in it.
    live: usize,
    evicted_idle: u64,
    evicted_active: u64,
}

#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
}

/// The table. `E` travels in every snapshot.
pub(crate) struct ShardedTable<E> {
    snapshot: ArcSwap<Snapshot<E>>,
    /// Serialises the publication of new snapshots.
    publish: Mutex<()>,
    shards: Box<[Shard]>,
    shard_cap: usize,
    max_slots: usize,
}

/// Eviction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evictions {
    pub(crate) idle: u64,
    pub(crate) active: u64,
}

impl<E: Clone> ShardedTable<E> {
    pub(crate) fn new(max_tenants: usize, extra: E) -> Self {
        let max_tenants = max_tenants.max(1);
        let cpus = std::thread::available_parallelism().map_or(4, usize::from);
        let mut shards = (max_tenants / TARGET_SHARD_LEN)
            .next_power_of_two()
            .clamp((cpus * 4).next_power_of_two(), MAX_SHARDS);
        while shards > 1 && max_tenants / shards < MIN_SHARD_LEN {
            shards /= 2;
        }
        // Rounded down, so that the shards together never hold more than
        // the cap (at most one fewer per shard).
        let shard_cap = max_tenants / shards;
        let max_slots = (shard_cap * 4)
            .div_ceil(3)
            .next_power_of_two()
            .max(MIN_SLOTS);
        // Every shard starts with a small table of its own, so that the
        // first tenants (a dozen per shard) need no rebuild, and a new
        // limiter does not churn through a snapshot per first tenant.
        let tables: Vec<Arc<Table>> = (0..shards)
            .map(|_| Arc::new(Table::with_slots(MIN_SLOTS)))
            .collect();
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                extra,
                tables: tables.iter().map(Arc::clone).collect(),
                mask: shards - 1,
            }),
            publish: Mutex::new(()),
            shards: tables
                .into_iter()
                .map(|table| Shard {
                    state: Mutex::new(ShardState {
                        table,
                        live: 0,
                        evicted_idle: 0,
                        evicted_active: 0,
                    }),
                })
                .collect(),
            shard_cap,
            max_slots,
        }
    }

    /// The most tenants tracked at once.
    pub(crate) fn max_tenants(&self) -> usize {
        self.shards.len() * self.shard_cap
    }

    #[inline]
    pub(crate) fn snapshot(&self) -> Guard<Arc<Snapshot<E>>> {
        self.snapshot.load()
    }

    /// Puts a new `extra` in the snapshot.
    pub(crate) fn set_extra(&self, extra: E) {
        let _publish = self.publish.lock();
        let current = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot {
            extra,
            tables: current.tables.clone(),
            mask: current.mask,
        }));
    }

    /// Locks the shard of `fp`, for the slow path. While it is held, the
    /// shard's current table is not rebuilt by anyone else, so its slots
    /// are not frozen.
    pub(crate) fn lock(&self, fp: u64) -> Locked<'_, E> {
        let shard = shard_of(fp, self.shards.len() - 1);
        Locked {
            table: self,
            shard,
            state: self.shards[shard].state.lock(),
        }
    }

    /// Calls `f` on every slot in use, one shard locked at a time.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Slot)) {
        for shard in &*self.shards {
            let state = shard.state.lock();
            for slot in &*state.table.slots {
                let fp = slot.fp.load(Ordering::Acquire);
                if fp != EMPTY {
                    f(fp, slot);
                }
            }
        }
    }

    /// Drops every idle value and gives memory back, one shard at a time.
    pub(crate) fn evict_idle(&self, retention: &impl Retention) -> usize {
        let mut total = 0;
        for shard in 0..self.shards.len() {
            let mut state = self.shards[shard].state.lock();
            let before = state.live;
            self.rebuild(shard, &mut state, retention, 0);
            total += before - state.live;
        }
        total
    }

    /// Slots in use.
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

    /// Moves the shard's tenants into a new table with room for at least
    /// `room` more, and publishes it. Called with the shard's mutex.
    ///
    /// Below the shard's share of the cap the table just grows, keeping idle
    /// values (dropping them would only have them inserted again). At the
    /// cap, idle values go first, then evictable ones in order. With
    /// `room == 0` (maintenance) idle values go and the table shrinks to fit.
    fn rebuild(
        &self,
        shard: usize,
        state: &mut ShardState,
        retention: &impl Retention,
        room: usize,
    ) {
        let old = &*state.table;
        let grow = room > 0 && state.live + room <= self.shard_cap;
        let mut kept = Vec::with_capacity(state.live);
        let mut idle = 0;
        for slot in &*old.slots {
            let fp = slot.fp.load(Ordering::Acquire);
            if fp == EMPTY {
                continue;
            }
            match slot.value.swap(FROZEN, Ordering::AcqRel) {
                FROZEN => {}
                value if grow || !retention.idle(value) => kept.push((fp, value)),
                _ => idle += 1,
            }
        }
        state.evicted_idle += idle;

        // Still no room: drop evictable values, lowest order first, until an
        // eighth of the shard's share is free.
        if room > 0 && kept.len() + room > self.shard_cap {
            let target = self.shard_cap - (self.shard_cap / 8).max(room).min(self.shard_cap);
            let (mut evictable, pinned): (Vec<_>, Vec<_>) = kept
                .into_iter()
                .partition(|&(_, value)| retention.eviction_order(value).is_some());
            let drop = (pinned.len() + evictable.len())
                .saturating_sub(target)
                .min(evictable.len());
            if drop > 0 && drop < evictable.len() {
                evictable.select_nth_unstable_by_key(drop, |&(_, v)| {
                    retention.eviction_order(v).unwrap_or(u64::MAX)
                });
            }
            evictable.drain(..drop);
            state.evicted_active += drop as u64;
            kept = pinned;
            kept.append(&mut evictable);
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
        for &(fp, value) in &kept {
            table.insert(fp, value);
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
            extra: current.extra.clone(),
            tables,
            mask: current.mask,
        }));
    }

    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.snapshot
            .load()
            .tables
            .iter()
            .map(|t| t.slots.len())
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn slots_at_cap(&self) -> usize {
        self.max_slots * self.shards.len()
    }
}

/// A shard of the table, locked.
pub(crate) struct Locked<'a, E> {
    table: &'a ShardedTable<E>,
    shard: usize,
    state: MutexGuard<'a, ShardState>,
}

impl<E: Clone> Locked<'_, E> {
    /// The slot of `fp` in the shard's current table (never frozen).
    pub(crate) fn find(&self, fp: u64) -> Option<&Slot> {
        self.state.table.find(fp)
    }

    /// Inserts `fp` with `value`, making room as [`ShardedTable`] describes.
    /// `None` if the shard is at its cap with nothing it may drop.
    pub(crate) fn insert(
        &mut self,
        fp: u64,
        value: u64,
        retention: &impl Retention,
    ) -> Option<&Slot> {
        if self.state.live >= self.table.shard_cap || self.state.live >= self.state.table.max_used {
            self.table
                .rebuild(self.shard, &mut self.state, retention, 1);
            if self.state.live >= self.table.shard_cap {
                return None;
            }
        }
        self.state.live += 1;
        self.state.table.insert(fp, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counts;

    impl Retention for Counts {
        fn idle(&self, value: u64) -> bool {
            value == 0
        }
        fn eviction_order(&self, _: u64) -> Option<u64> {
            None
        }
    }

    #[test]
    fn shard_layout_respects_the_cap() {
        for max in [1, 7, 100, 1_000, 50_000, 1_000_000, 100_000_000] {
            let table: ShardedTable<()> = ShardedTable::new(max, ());
            assert!(table.max_tenants() <= max, "{max}");
            assert!(table.max_tenants() + table.shards.len() > max, "{max}");
            assert!(table.shards.len().is_power_of_two());
            assert!(table.max_slots * 3 / 4 >= table.shard_cap);
        }
    }

    #[test]
    fn pinned_values_are_never_dropped_and_a_full_shard_refuses() {
        let table: ShardedTable<()> = ShardedTable::new(64, ());
        let mut inserted = 0;
        for fp in 1..=1_000u64 {
            let fp = fingerprint(fp << SHARD_SHIFT | fp);
            let mut locked = table.lock(fp);
            if locked.insert(fp, 1, &Counts).is_some() {
                inserted += 1;
            }
        }
        assert_eq!(inserted, table.max_tenants());
        assert_eq!(table.len(), table.max_tenants());
        assert_eq!(table.evictions(), Evictions::default());
        // Idle values (count 0) make room again.
        table.for_each(|_, slot| slot.value.store(0, Ordering::Relaxed));
        let fp = fingerprint(5_000);
        assert!(table.lock(fp).insert(fp, 1, &Counts).is_some());
        assert!(table.evictions().idle > 0);
    }
}
