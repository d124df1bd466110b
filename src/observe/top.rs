//! The heaviest tenants: who is flooding? The algorithm is explained on
//! [`TopTenants`], which is public where this module is not.

use std::cell::Cell;
use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};

use super::{Decision, Event, LayerKind, Observer};
use crate::clock::{Clock, saturating_nanos};
use crate::hash::tenant_hash;
use crate::key::TenantKey;

/// Counters per summary by default.
const DEFAULT_CAPACITY: usize = 128;
/// Fewest counters per summary.
const MIN_CAPACITY: usize = 8;
/// Most counters per summary (slots are indexed by `u32`).
const MAX_CAPACITY: usize = 1 << 20;
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_BUCKETS: u32 = 6;
const MAX_BUCKETS: u32 = 64;
const MAX_SHARDS: usize = 64;
const MAX_DEFAULT_SHARDS: usize = 32;
/// Keys up to this length are stored inline in a [`TenantKey`] (see
/// `key.rs`), so a counter holds them without allocating.
const INLINE_KEY: usize = 39;
/// The epoch of a bucket that holds nothing.
const EMPTY: u64 = u64::MAX;

/// The heaviest tenants by requests and by rejections over a sliding window,
/// in fixed memory.
///
/// Give it to layers as an [`Observer`] (it counts a request each time one
/// passes the layer set by [`requests_from`](TopTenantsBuilder::requests_from),
/// and a rejection each time any layer refuses one), or call
/// [`record`](Self::record) yourself. Then ask for a
/// [`snapshot`](Self::snapshot), for example from an admin endpoint. Clones
/// share the same counts.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_floodgate::observe::TopTenants;
/// use tower_floodgate::{Clock, TenantKey};
///
/// let (clock, time) = Clock::manual();
/// let top = TopTenants::builder().window(Duration::from_secs(60)).clock(clock).build();
/// let (flooder, polite) = (TenantKey::from("acme"), TenantKey::from("initech"));
/// for i in 0..1_000 {
///     top.record(&flooder, i % 2 == 0);
///     if i % 10 == 0 {
///         top.record(&polite, false);
///     }
/// }
/// time.advance(Duration::from_secs(1));
///
/// let snapshot = top.snapshot(3);
/// assert_eq!(snapshot.requests, 1_100);
/// assert_eq!(snapshot.by_requests[0].tenant, flooder);
/// assert_eq!(snapshot.by_requests[0].count, 1_000);
/// assert!((snapshot.by_requests[0].share - 1_000.0 / 1_100.0).abs() < 1e-9);
/// assert_eq!(snapshot.by_rejections.len(), 1);
/// assert_eq!(snapshot.window, Duration::from_secs(1));
/// ```
///
/// # Accuracy
///
/// Each count is kept by a *Space-Saving* summary (Metwally, Agrawal and
/// El Abbadi, "Efficient Computation of Frequent and Top-k Elements in Data
/// Streams", 2005): `capacity` counters, each a tenant with a count and an
/// error. A tenant that has a counter adds to it. A new tenant takes a free
/// counter if there is one; otherwise it takes over the counter with the
/// smallest count `min`, starting at `min + 1` with an error of `min` (it
/// may have been seen up to `min` times while it had no counter). So the
/// true count of a tenant with a counter lies between `count - error` and
/// `count`; a tenant without one was seen at most `min` times; and since the
/// counts add up to the stream's length `n`, `min <= n / capacity`: **any
/// tenant with more than `1 / capacity` of the traffic is sure to be
/// counted**. A flooder holds its counter from its first requests on, so its
/// error stays near zero.
///
/// A snapshot merges every summary in the window (one per shard and step,
/// see below): a tenant's count is the sum of its counters, and where a full
/// summary has no counter for it, that summary's `min` is added to its
/// error. So for every tenant reported, the true count is within
/// [`error`](HeavyHitter::error) of [`count`](HeavyHitter::count). The
/// totals, [`TopSnapshot::requests`] and [`TopSnapshot::rejections`], are
/// exact.
///
/// # The window
///
/// The window is cut into `buckets` steps, each with its own summaries and
/// totals; a step's counts are dropped whole once it has left the window.
/// A snapshot thus covers between `window - window / buckets` and `window`
/// of the most recent time, and [`TopSnapshot::window`] says exactly how
/// much.
///
/// # Concurrency
///
/// Recording takes a lock, but rarely a contended one: the steps are held in
/// several [shards](TopTenantsBuilder::shards), each behind its own lock,
/// and each thread records into its own shard (threads are dealt shards in
/// turn when they first record; a thread that finds its shard locked tries
/// the next one). A tenant flooding from every thread thus never funnels
/// through one lock. An index (tenant hash to counter) and a min-heap of
/// the counters make a record `O(log capacity)`, and `O(1)` for a flooder,
/// whose counter sits at the bottom of the heap.
///
/// # Memory
///
/// Everything is allocated by [`build`](TopTenantsBuilder::build):
/// `shards × buckets × 2` summaries of `capacity` counters, about 110 bytes
/// per counter with its index and heap: 670 KB with the defaults on a
/// machine with 2 cores (4 shards × 6 steps × 2 summaries × 128 counters).
/// Nothing grows with the number of tenants, however many pass. The one
/// exception is keys longer than 39 bytes: a counter holds a copy of such a
/// key, so they add up to their length per counter.
/// [`memory_bytes`](Self::memory_bytes) gives the figure.
#[derive(Clone)]
pub struct TopTenants {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Shard]>,
    /// Counters per summary.
    capacity: usize,
    /// Buckets per shard, one per step of the window.
    buckets: u32,
    /// Nanoseconds per step, at least 1.
    step: u64,
    window: Duration,
    requests_from: LayerKind,
    clock: Clock,
    /// When counting started (build or last reset), in clock nanoseconds.
    since: AtomicU64,
}

/// One lock's worth of buckets, on its own cache lines.
#[repr(align(128))]
struct Shard {
    buckets: Mutex<Box<[Bucket]>>,
}

/// The counts of one step of the window in one shard.
struct Bucket {
    /// The step (clock nanoseconds / step) counted here, or [`EMPTY`].
    epoch: u64,
    requests: u64,
    rejections: u64,
    by_requests: Summary,
    by_rejections: Summary,
}

impl TopTenants {
    /// A view with the defaults: 128 counters per summary, a 60-second
    /// window in 6 steps, requests counted at the rate limit layer, and the
    /// monotonic clock.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a view.
    pub fn builder() -> TopTenantsBuilder {
        TopTenantsBuilder {
            capacity: DEFAULT_CAPACITY,
            window: DEFAULT_WINDOW,
            buckets: DEFAULT_BUCKETS,
            shards: None,
            requests_from: LayerKind::RateLimit,
            clock: None,
        }
    }

    /// Counts one request of `tenant`, and one rejection too if `rejected`.
    ///
    /// Takes one lock, which the calling thread rarely shares, and does not
    /// allocate (unless `tenant` is longer than 39 bytes and new to the
    /// summary, which then keeps a copy of it).
    #[inline]
    pub fn record(&self, tenant: &TenantKey, rejected: bool) {
        self.record_weighted(tenant, 1, rejected);
    }

    /// Counts `weight` requests of `tenant`, and `weight` rejections too if
    /// `rejected`: for example the number of URLs in a purge, where one
    /// request is not one unit of work. A weight of 0 counts nothing.
    pub fn record_weighted(&self, tenant: &TenantKey, weight: u64, rejected: bool) {
        let rejections = if rejected { weight } else { 0 };
        self.inner.add(Some(tenant), weight, rejections);
    }

    /// The `k` heaviest tenants by requests and by rejections over the
    /// window, with the totals.
    ///
    /// Merges every summary in the window: this locks each shard in turn,
    /// for a few tens of microseconds with the default capacity, and
    /// allocates the result. Meant for an admin endpoint or a periodic
    /// report, not for every request.
    #[must_use]
    pub fn snapshot(&self, k: usize) -> TopSnapshot {
        self.inner.snapshot(k)
    }

    /// The bytes this view occupies: its summaries, indexes, heaps and
    /// shards, plus the copies of keys longer than 39 bytes that counters
    /// hold.
    ///
    /// Fixed by [`build`](TopTenantsBuilder::build) while keys are at most
    /// 39 bytes long; longer keys add at most their length for each counter
    /// (`shards × buckets × 2 × capacity` of them). It never grows with the
    /// number of tenants. Locks each shard in turn to count the long keys.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    /// Forgets every count; the next snapshot covers the time from now.
    pub fn reset(&self) {
        let inner = &self.inner;
        inner.since.store(inner.clock.now_nanos(), Ordering::Relaxed);
        for shard in &inner.shards {
            for bucket in shard.buckets.lock().iter_mut() {
                bucket.clear(EMPTY);
            }
        }
    }
}

impl Default for TopTenants {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TopTenants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("TopTenants")
            .field("capacity", &inner.capacity)
            .field("window", &inner.window)
            .field("buckets", &inner.buckets)
            .field("shards", &inner.shards.len())
            .field("requests_from", &inner.requests_from)
            .finish_non_exhaustive()
    }
}

/// Counts decisions as they are reported.
///
/// * An event is one **request** when it comes from the layer set by
///   [`requests_from`](TopTenantsBuilder::requests_from) (the rate limit
///   layer by default), whatever it decided, except
///   [`Decision::StoreFallback`], which comes besides the decision itself.
///   Pick the outermost layer, which every request passes once: a request
///   refused before it reaches the configured layer is never counted as
///   one.
/// * An event is one **rejection** when its decision
///   [is a rejection](Decision::is_rejection), from any layer: a refused
///   request stops at the layer that refused it, so it is counted once.
///   [`Decision::ShadowRejected`] is not one: the request was let through.
/// * An event without a tenant (a request without a valid key) counts in
///   [`TopSnapshot::requests`] and [`TopSnapshot::rejections`] but is
///   attributed to no tenant.
///
/// Each event weighs 1, whatever its [`cost`](Event::cost); use
/// [`TopTenants::record_weighted`] to count otherwise.
impl Observer for TopTenants {
    fn observe(&self, event: &Event<'_>) {
        let inner = &self.inner;
        let request =
            event.layer == inner.requests_from && event.decision != Decision::StoreFallback;
        let rejection = event.decision.is_rejection();
        inner.add(event.tenant, u64::from(request), u64::from(rejection));
    }
}

/// Configures a [`TopTenants`]; made by [`TopTenants::builder`].
#[must_use]
#[derive(Debug, Clone)]
pub struct TopTenantsBuilder {
    capacity: usize,
    window: Duration,
    buckets: u32,
    shards: Option<usize>,
    requests_from: LayerKind,
    clock: Option<Clock>,
}

impl TopTenantsBuilder {
    /// Counters per summary (128 by default, at least 8, at most 2^20).
    ///
    /// Any tenant with more than `1 / counters` of the traffic in the window
    /// is sure to be counted; a larger capacity tightens the errors and costs
    /// about 110 bytes per counter, times `shards × buckets × 2`.
    pub fn capacity(mut self, counters: usize) -> Self {
        self.capacity = counters.clamp(MIN_CAPACITY, MAX_CAPACITY);
        self
    }

    /// The span of time counted (60 seconds by default). A snapshot covers
    /// between `window - window / buckets` and `window` of the most recent
    /// time.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Steps the window moves by: old counts leave the window one step
    /// (`window / buckets`) at a time. 6 by default, from 1 to 64. Each step
    /// has its own summaries, so memory grows with it.
    pub fn buckets(mut self, buckets: u32) -> Self {
        self.buckets = buckets.clamp(1, MAX_BUCKETS);
        self
    }

    /// Shards, each with its own lock: threads record into their own shard.
    /// Rounded up to a power of two, from 1 to 64. By default, twice the
    /// available parallelism, up to 32.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards.clamp(1, MAX_SHARDS).next_power_of_two());
        self
    }

    /// The layer whose events count as requests
    /// ([`LayerKind::RateLimit`] by default): the outermost one you observe,
    /// which every request passes once.
    pub fn requests_from(mut self, layer: LayerKind) -> Self {
        self.requests_from = layer;
        self
    }

    /// The clock that moves the window ([`Clock::monotonic`] by default).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The view, with all its memory allocated.
    #[must_use]
    pub fn build(self) -> TopTenants {
        let shards = self.shards.unwrap_or_else(default_shards);
        let buckets = self.buckets.clamp(1, MAX_BUCKETS);
        let step = (saturating_nanos(self.window) / u64::from(buckets)).max(1);
        let clock = self.clock.unwrap_or_default();
        let since = clock.now_nanos();
        let shards = (0..shards)
            .map(|_| Shard {
                buckets: Mutex::new(
                    (0..buckets)
                        .map(|_| Bucket {
                            epoch: EMPTY,
                            requests: 0,
                            rejections: 0,
                            by_requests: Summary::new(self.capacity),
                            by_rejections: Summary::new(self.capacity),
                        })
                        .collect(),
                ),
            })
            .collect();
        TopTenants {
            inner: Arc::new(Inner {
                shards,
                capacity: self.capacity,
                buckets,
                step,
                window: self.window,
                requests_from: self.requests_from,
                clock,
                since: AtomicU64::new(since),
            }),
        }
    }
}

fn default_shards() -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, usize::from);
    (cpus * 2).next_power_of_two().clamp(1, MAX_DEFAULT_SHARDS)
}

/// What [`TopTenants::snapshot`] returns: the heaviest tenants over the
/// window, and the totals.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct TopSnapshot {
    /// The span of time the counts cover, up to now: the configured window
    /// less the part of its oldest step already gone (the window moves by
    /// whole steps), and less any time before the view was built or reset.
    /// Divide a count by it for a rate. Serialized as seconds (a float).
    #[cfg_attr(feature = "serde", serde(serialize_with = "serialize_secs"))]
    pub window: Duration,
    /// Requests in the window, exactly, including those without a tenant.
    pub requests: u64,
    /// Rejections in the window, exactly, including those without a tenant.
    pub rejections: u64,
    /// The heaviest tenants by requests, heaviest first (ties in key
    /// order).
    pub by_requests: Vec<HeavyHitter>,
    /// The heaviest tenants by rejections, heaviest first (ties in key
    /// order).
    pub by_rejections: Vec<HeavyHitter>,
}

/// A heavy tenant in a [`TopSnapshot`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct HeavyHitter {
    /// The tenant. Serialized as its `Display` form, so a
    /// [sensitive](TenantKey::sensitive) key shows as a fingerprint only.
    #[cfg_attr(feature = "serde", serde(serialize_with = "serialize_display"))]
    pub tenant: TenantKey,
    /// Its estimated count of requests (or rejections) in the window.
    pub count: u64,
    /// How far `count` may be from the truth: the true count is between
    /// `count - error` and `count + error`. Small for a tenant that has been
    /// heavy for the whole window; larger for one that came and went, or
    /// that shares the traffic with many tenants of a similar size.
    pub error: u64,
    /// `count` over the total ([`TopSnapshot::requests`] or
    /// [`TopSnapshot::rejections`]), from 0 to 1.
    pub share: f64,
}

#[cfg(feature = "serde")]
fn serialize_secs<S: serde::Serializer>(window: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(window.as_secs_f64())
}

#[cfg(feature = "serde")]
fn serialize_display<S: serde::Serializer>(tenant: &TenantKey, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(tenant)
}

impl Inner {
    /// Counts `requests` and `rejections` for `tenant` in the calling
    /// thread's shard.
    fn add(&self, tenant: Option<&TenantKey>, requests: u64, rejections: u64) {
        if requests == 0 && rejections == 0 {
            return;
        }
        let tenant = tenant.map(|t| (t, tenant_hash(t.as_bytes())));
        let epoch = self.clock.now_nanos() / self.step;
        let mut buckets = self.lock_local();
        self.add_locked(&mut buckets, epoch, tenant, requests, rejections);
    }

    /// The calling thread's shard, locked; its neighbour's if that one is
    /// free and the thread's own is not.
    fn lock_local(&self) -> MutexGuard<'_, Box<[Bucket]>> {
        let mask = self.shards.len() - 1;
        let home = thread_index() & mask;
        if let Some(guard) = self.shards[home].buckets.try_lock() {
            return guard;
        }
        if mask != 0
            && let Some(guard) = self.shards[(home + 1) & mask].buckets.try_lock()
        {
            return guard;
        }
        self.shards[home].buckets.lock()
    }

    fn add_locked(
        &self,
        buckets: &mut [Bucket],
        epoch: u64,
        tenant: Option<(&TenantKey, u64)>,
        requests: u64,
        rejections: u64,
    ) {
        let bucket = &mut buckets[(epoch % u64::from(self.buckets)) as usize];
        // A bucket from an earlier step is emptied; one from a later step
        // (another thread read the clock after this one but locked first)
        // takes the counts, a step early.
        if bucket.epoch == EMPTY || bucket.epoch < epoch {
            bucket.clear(epoch);
        }
        bucket.requests = bucket.requests.saturating_add(requests);
        bucket.rejections = bucket.rejections.saturating_add(rejections);
        if let Some((key, hash)) = tenant {
            if requests > 0 {
                bucket.by_requests.add(hash, key, requests);
            }
            if rejections > 0 {
                bucket.by_rejections.add(hash, key, rejections);
            }
        }
    }

    fn snapshot(&self, k: usize) -> TopSnapshot {
        let now = self.clock.now_nanos();
        let epoch = now / self.step;
        let buckets = u64::from(self.buckets);
        let mut requests = 0u64;
        let mut rejections = 0u64;
        let mut by_requests = Merge::default();
        let mut by_rejections = Merge::default();
        for shard in &self.shards {
            let shard = shard.buckets.lock();
            for bucket in shard.iter() {
                if bucket.epoch == EMPTY || bucket.epoch.saturating_add(buckets) <= epoch {
                    continue;
                }
                requests = requests.saturating_add(bucket.requests);
                rejections = rejections.saturating_add(bucket.rejections);
                by_requests.add(&bucket.by_requests);
                by_rejections.add(&bucket.by_rejections);
            }
        }
        let oldest = epoch.saturating_sub(buckets - 1).saturating_mul(self.step);
        let start = oldest.max(self.since.load(Ordering::Relaxed));
        TopSnapshot {
            window: Duration::from_nanos(now.saturating_sub(start)),
            requests,
            rejections,
            by_requests: by_requests.top(k, requests),
            by_rejections: by_rejections.top(k, rejections),
        }
    }

    fn memory_bytes(&self) -> usize {
        // The `Arc`'s allocation: two counts and `Inner`.
        let mut bytes = 2 * size_of::<usize>() + size_of::<Inner>();
        bytes += self.shards.len() * size_of::<Shard>();
        for shard in &self.shards {
            let buckets = shard.buckets.lock();
            bytes += buckets.len() * size_of::<Bucket>();
            for bucket in buckets.iter() {
                bytes += bucket.by_requests.memory_bytes() + bucket.by_rejections.memory_bytes();
            }
        }
        bytes
    }
}

impl Bucket {
    fn clear(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.requests = 0;
        self.rejections = 0;
        self.by_requests.clear();
        self.by_rejections.clear();
    }
}

/// This thread's index, dealt in turn to threads when they first ask.
#[inline]
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX
        .try_with(|index| {
            let mut i = index.get();
            if i == usize::MAX {
                i = NEXT.fetch_add(1, Ordering::Relaxed) & (usize::MAX >> 1);
                index.set(i);
            }
            i
        })
        // Only during the thread's teardown.
        .unwrap_or(0)
}

/// One tenant's counter in a [`Summary`].
struct Counter {
    hash: u64,
    key: TenantKey,
    count: u64,
    /// How much of `count` may predate the counter.
    error: u64,
}

/// A Space-Saving summary: at most `capacity` counters, an index from tenant
/// hash to counter, and a min-heap of the counters by count.
struct Summary {
    capacity: usize,
    /// The counters; their positions never change.
    counters: Vec<Counter>,
    /// Counter positions, a min-heap by count.
    heap: Vec<u32>,
    /// `heap_pos[c]`: where counter `c` is in `heap`.
    heap_pos: Vec<u32>,
    /// Counter positions by tenant hash. Sized for twice the capacity, so
    /// that hashbrown cleans up its tombstones in place instead of growing.
    index: HashTable<u32>,
}

impl Summary {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            counters: Vec::with_capacity(capacity),
            heap: Vec::with_capacity(capacity),
            heap_pos: Vec::with_capacity(capacity),
            index: HashTable::with_capacity(capacity * 2),
        }
    }

    fn is_full(&self) -> bool {
        self.counters.len() >= self.capacity
    }

    /// The most a tenant without a counter can have been seen: the smallest
    /// count if the summary is full (it may have evicted), else 0.
    fn min_absent(&self) -> u64 {
        match self.heap.first() {
            Some(&c) if self.is_full() => self.counters[c as usize].count,
            _ => 0,
        }
    }

    fn clear(&mut self) {
        self.counters.clear();
        self.heap.clear();
        self.heap_pos.clear();
        self.index.clear();
    }

    fn add(&mut self, hash: u64, key: &TenantKey, weight: u64) {
        let Self {
            counters, index, ..
        } = self;
        if let Some(&c) = index.find(hash, |&c| counters[c as usize].hash == hash) {
            let counter = &mut counters[c as usize];
            counter.count = counter.count.saturating_add(weight);
            let at = self.heap_pos[c as usize] as usize;
            self.sift_down(at);
        } else if counters.len() < self.capacity {
            let c = counters.len() as u32;
            counters.push(Counter {
                hash,
                key: owned_key(key),
                count: weight,
                error: 0,
            });
            index.insert_unique(hash, c, |&c| counters[c as usize].hash);
            self.heap_pos.push(self.heap.len() as u32);
            self.heap.push(c);
            self.sift_up(self.heap.len() - 1);
        } else {
            let c = self.heap[0];
            let counter = &mut counters[c as usize];
            if let Ok(entry) = index.find_entry(counter.hash, |&other| other == c) {
                entry.remove();
            }
            let min = counter.count;
            *counter = Counter {
                hash,
                key: owned_key(key),
                count: min.saturating_add(weight),
                error: min,
            };
            index.insert_unique(hash, c, |&c| counters[c as usize].hash);
            self.sift_down(0);
        }
    }

    fn count_at(&self, heap_index: usize) -> u64 {
        self.counters[self.heap[heap_index] as usize].count
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.heap_pos[self.heap[a] as usize] = a as u32;
        self.heap_pos[self.heap[b] as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.count_at(at) >= self.count_at(parent) {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.count_at(right) < self.count_at(left) {
                right
            } else {
                left
            };
            if self.count_at(at) <= self.count_at(child) {
                break;
            }
            self.swap(at, child);
            at = child;
        }
    }

    fn memory_bytes(&self) -> usize {
        let long_keys: usize = self
            .counters
            .iter()
            .map(|c| c.key.len())
            .filter(|&len| len > INLINE_KEY)
            .sum();
        self.counters.capacity() * size_of::<Counter>()
            + (self.heap.capacity() + self.heap_pos.capacity()) * size_of::<u32>()
            + self.index.allocation_size()
            + long_keys
    }
}

/// The key a counter keeps: a copy (inline, without allocating, for a short
/// key), so that the summary never holds on to a larger buffer the key may
/// be a slice of, whatever its length.
fn owned_key(key: &TenantKey) -> TenantKey {
    let copy = TenantKey::copy_from_slice(key.as_bytes());
    if key.is_sensitive() {
        copy.sensitive()
    } else {
        copy
    }
}

/// Summaries being merged for a snapshot.
#[derive(Default)]
struct Merge {
    candidates: HashTable<Candidate>,
    /// The sum of [`Summary::min_absent`] over the summaries merged.
    absent: u64,
}

struct Candidate {
    hash: u64,
    key: TenantKey,
    count: u64,
    error: u64,
    /// The part of [`Merge::absent`] from summaries that have this tenant.
    present: u64,
}

impl Merge {
    fn add(&mut self, summary: &Summary) {
        let min = summary.min_absent();
        self.absent = self.absent.saturating_add(min);
        for counter in &summary.counters {
            let hash = counter.hash;
            match self.candidates.find_mut(hash, |c| c.hash == hash) {
                Some(c) => {
                    c.count = c.count.saturating_add(counter.count);
                    c.error = c.error.saturating_add(counter.error);
                    c.present = c.present.saturating_add(min);
                }
                None => {
                    self.candidates.insert_unique(
                        hash,
                        Candidate {
                            hash,
                            key: counter.key.clone(),
                            count: counter.count,
                            error: counter.error,
                            present: min,
                        },
                        |c| c.hash,
                    );
                }
            }
        }
    }

    /// The `k` heaviest, with their errors and shares of `total`.
    fn top(self, k: usize, total: u64) -> Vec<HeavyHitter> {
        fn heaviest(a: &Candidate, b: &Candidate) -> CmpOrdering {
            b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key))
        }
        let mut all: Vec<Candidate> = self.candidates.into_iter().collect();
        if k < all.len() {
            all.select_nth_unstable_by(k, heaviest);
            all.truncate(k);
        }
        all.sort_unstable_by(heaviest);
        all.into_iter()
            .map(|c| HeavyHitter {
                error: c.error.saturating_add(self.absent - c.present),
                share: if total == 0 {
                    0.0
                } else {
                    (c.count as f64 / total as f64).min(1.0)
                },
                tenant: c.key,
                count: c.count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn manual(builder: TopTenantsBuilder) -> (TopTenants, ManualClock) {
        let (clock, time) = Clock::manual();
        (builder.clock(clock).build(), time)
    }

    fn key(name: impl fmt::Display) -> TenantKey {
        TenantKey::from(name.to_string())
    }

    fn find<'a>(list: &'a [HeavyHitter], tenant: &TenantKey) -> Option<&'a HeavyHitter> {
        list.iter().find(|h| &h.tenant == tenant)
    }

    /// Every allocation's size, and every summary's length, in build order.
    fn footprint(top: &TopTenants) -> (Vec<[usize; 4]>, usize) {
        let mut sizes = Vec::new();
        let mut most = 0;
        for shard in &top.inner.shards {
            for bucket in shard.buckets.lock().iter() {
                for s in [&bucket.by_requests, &bucket.by_rejections] {
                    s.check();
                    most = most.max(s.counters.len());
                    sizes.push([
                        s.counters.capacity(),
                        s.heap.capacity(),
                        s.heap_pos.capacity(),
                        s.index.allocation_size(),
                    ]);
                }
            }
        }
        (sizes, most)
    }

    impl Summary {
        /// Asserts the heap, its positions and the index agree.
        fn check(&self) {
            assert!(self.counters.len() <= self.capacity);
            assert_eq!(self.heap.len(), self.counters.len());
            assert_eq!(self.index.len(), self.counters.len());
            for (at, &c) in self.heap.iter().enumerate() {
                assert_eq!(self.heap_pos[c as usize] as usize, at);
                if at > 0 {
                    assert!(self.count_at((at - 1) / 2) <= self.count_at(at));
                }
            }
            for (c, counter) in self.counters.iter().enumerate() {
                let found = self.index.find(counter.hash, |&i| i as usize == c);
                assert!(found.is_some(), "counter {c} is not indexed");
            }
        }
    }

    #[test]
    fn a_flooder_is_named_first_with_its_true_share() {
        let (top, time) = manual(TopTenants::builder());
        let flooder = key("flooder");
        let normal: Vec<TenantKey> = (0..1_000).map(|i| key(format_args!("normal-{i}"))).collect();
        let mut sent = 0u64;
        for i in 0..400_000u64 {
            match i % 4 {
                0 | 2 => top.record(&flooder, false),
                1 => top.record(&normal[(i / 4) as usize % normal.len()], false),
                _ => top.record(&key(format_args!("one-off-{i}")), false),
            }
            sent += 1;
            // 40 seconds in all, within the 60-second window.
            time.advance(Duration::from_micros(100));
        }

        let snapshot = top.snapshot(5);
        assert_eq!(snapshot.requests, sent);
        assert_eq!(snapshot.rejections, 0);
        assert_eq!(snapshot.by_requests.len(), 5);
        let first = &snapshot.by_requests[0];
        assert_eq!(first.tenant, flooder);
        assert!((first.share - 0.5).abs() < 0.02, "share {}", first.share);
        // It holds a counter in every step from its first request on, and
        // so in every summary: its count is exact, and known to be.
        assert_eq!((first.count, first.error), (200_000, 0));
        assert!(snapshot.by_requests[1].count < first.count / 10);
        assert!(snapshot.by_rejections.is_empty());
        assert_eq!(snapshot.window, Duration::from_secs(40));
    }

    #[test]
    fn memory_stays_fixed_while_a_million_tenants_pass() {
        let (top, time) = manual(TopTenants::builder().shards(2));
        let before = top.memory_bytes();
        let (sizes, _) = footprint(&top);
        for i in 0..1_000_000u64 {
            top.record(&key(format_args!("tenant-{i:032}")), i % 3 == 0);
            // 150 seconds: the window turns over more than twice.
            time.advance(Duration::from_micros(150));
        }
        assert_eq!(top.memory_bytes(), before);
        let (after, most) = footprint(&top);
        assert_eq!(after, sizes);
        assert_eq!(most, DEFAULT_CAPACITY);
        let snapshot = top.snapshot(10);
        assert_eq!(snapshot.by_requests.len(), 10);
        assert!(
            snapshot
                .by_requests
                .iter()
                .all(|h| h.count.saturating_sub(h.error) <= 1)
        );
    }

    #[test]
    fn short_keys_sliced_from_a_large_buffer_do_not_keep_it() {
        let (top, _time) = manual(TopTenants::builder().shards(1).buckets(1).capacity(8));
        let parents: Vec<bytes::Bytes> = (0..16u8)
            .map(|i| bytes::Bytes::from(vec![b'a' + i; 64 * 1024]))
            .collect();
        for parent in &parents {
            top.record(&TenantKey::from(parent.slice(0..8)), false);
        }
        // The counters hold copies: every parent is referenced only here.
        assert!(parents.into_iter().all(|p| p.is_unique()));
        assert_eq!(top.snapshot(16).by_requests.len(), 8);
    }

    #[test]
    fn long_keys_are_copied_and_bounded() {
        let (top, _time) = manual(TopTenants::builder().shards(1).buckets(1).capacity(8));
        let before = top.memory_bytes();
        let long = "x".repeat(100);
        for i in 0..10_000 {
            top.record(&key(format_args!("{long}{i}")).sensitive(), false);
        }
        let after = top.memory_bytes();
        assert!(after > before);
        // Eight counters hold a copy of a key of at most 104 bytes.
        assert!(after - before <= 8 * 104, "{before} -> {after}");
        let hitter = &top.snapshot(1).by_requests[0];
        assert!(hitter.tenant.is_sensitive());
        assert!(hitter.tenant.as_bytes().starts_with(long.as_bytes()));
    }

    #[test]
    fn old_bursts_leave_the_window() {
        let (top, time) = manual(
            TopTenants::builder()
                .window(Duration::from_secs(60))
                .buckets(6),
        );
        let (old, new) = (key("old"), key("new"));
        for _ in 0..1_000 {
            top.record(&old, true);
        }
        time.advance(Duration::from_secs(30));
        for _ in 0..500 {
            top.record(&new, false);
        }

        let both = top.snapshot(10);
        assert_eq!((both.requests, both.rejections), (1_500, 1_000));
        assert_eq!(both.by_requests[0].tenant, old);
        assert_eq!(both.by_requests[0].count, 1_000);
        assert_eq!(both.by_requests[1].tenant, new);
        assert_eq!(both.by_requests[1].count, 500);
        assert_eq!(both.window, Duration::from_secs(30));

        // At 65 s, the first step (0 to 10 s) has left the window.
        time.advance(Duration::from_secs(35));
        let later = top.snapshot(10);
        assert_eq!((later.requests, later.rejections), (500, 0));
        assert_eq!(later.by_requests.len(), 1);
        assert_eq!(later.by_requests[0].tenant, new);
        assert_eq!(later.by_requests[0].count, 500);
        assert_eq!(later.by_requests[0].share, 1.0);
        assert!(later.by_rejections.is_empty());
        assert_eq!(later.window, Duration::from_secs(55));

        // At 95 s, so has the burst at 30 s.
        time.advance(Duration::from_secs(30));
        let empty = top.snapshot(10);
        assert_eq!((empty.requests, empty.rejections), (0, 0));
        assert!(empty.by_requests.is_empty());

        // New counts reuse the buckets.
        top.record(&old, false);
        let again = top.snapshot(10);
        assert_eq!(again.requests, 1);
        assert_eq!(again.by_requests[0].count, 1);
    }

    #[test]
    fn reset_forgets_everything() {
        let (top, time) = manual(TopTenants::builder());
        top.record(&key("a"), true);
        time.advance(Duration::from_secs(5));
        top.reset();
        time.advance(Duration::from_secs(2));
        let snapshot = top.snapshot(10);
        assert_eq!((snapshot.requests, snapshot.rejections), (0, 0));
        assert!(snapshot.by_requests.is_empty() && snapshot.by_rejections.is_empty());
        assert_eq!(snapshot.window, Duration::from_secs(2));
        top.record(&key("b"), false);
        assert_eq!(top.snapshot(10).by_requests[0].tenant, key("b"));
    }

    #[test]
    fn rejections_are_ranked_on_their_own() {
        let (top, _time) = manual(TopTenants::builder());
        let (big, abuser) = (key("big"), key("abuser"));
        for _ in 0..10_000 {
            top.record(&big, false);
        }
        for i in 0..500 {
            top.record(&abuser, i % 10 != 0);
        }
        for t in 0..100 {
            for i in 0..20 {
                top.record(&key(format_args!("other-{t}")), i == 0);
            }
        }

        let snapshot = top.snapshot(3);
        assert_eq!(snapshot.requests, 10_000 + 500 + 2_000);
        assert_eq!(snapshot.rejections, 450 + 100);
        assert_eq!(snapshot.by_requests[0].tenant, big);
        assert_eq!(snapshot.by_requests[1].tenant, abuser);
        let first = &snapshot.by_rejections[0];
        assert_eq!(first.tenant, abuser);
        assert_eq!(first.count, 450);
        assert_eq!(first.error, 0);
        assert!((first.share - 450.0 / 550.0).abs() < 1e-9);
        assert!(find(&snapshot.by_rejections, &big).is_none());
    }

    #[test]
    fn threads_count_exactly_and_agree_on_the_flooder() {
        const PER_THREAD: u64 = 100_000;
        let (top, _time) = manual(TopTenants::builder());
        let flooder = key("flooder");
        std::thread::scope(|scope| {
            for t in 0..2 {
                let (top, flooder) = (&top, &flooder);
                scope.spawn(move || {
                    for i in 0..PER_THREAD {
                        if i % 2 == 0 {
                            top.record(flooder, i % 4 == 0);
                        } else {
                            top.record(&key(format_args!("t{t}-{i}")), false);
                        }
                    }
                });
            }
        });
        let snapshot = top.snapshot(3);
        assert_eq!(snapshot.requests, 2 * PER_THREAD);
        assert_eq!(snapshot.rejections, PER_THREAD / 2);
        let first = &snapshot.by_requests[0];
        assert_eq!(first.tenant, flooder);
        assert!((first.share - 0.5).abs() < 0.02, "share {}", first.share);
        assert_eq!(snapshot.by_rejections[0].tenant, flooder);
        assert_eq!(snapshot.by_rejections[0].count, PER_THREAD / 2);
        assert_eq!(snapshot.by_rejections[0].share, 1.0);
    }

    #[test]
    fn observer_counts_requests_at_one_layer_and_rejections_at_any() {
        let (top, _time) = manual(TopTenants::builder().requests_from(LayerKind::RateLimit));
        let (a, b, c) = (key("a"), key("b"), key("c"));
        let observer: &dyn Observer = &top;
        use Decision::*;
        use LayerKind::*;
        for _ in 0..3 {
            // One admitted request meets every layer.
            for layer in LayerKind::ALL {
                observer.observe(&Event::new(layer, Admitted, Some(&a)));
            }
        }
        // Refused by the rate limit layer: a request and a rejection.
        observer.observe(&Event::new(RateLimit, RateLimited, Some(&b)));
        // Admitted by the rate limit layer, then shed: one of each.
        observer.observe(&Event::new(RateLimit, Admitted, Some(&b)));
        observer.observe(&Event::new(LoadShed, Shed, Some(&b)));
        // Shadow refusals let the request through; the store fallback
        // comes besides the decision.
        observer.observe(&Event::new(RateLimit, StoreFallback, Some(&c)));
        observer.observe(&Event::new(RateLimit, ShadowRejected, Some(&c)));
        observer.observe(&Event::new(ConcurrencyCap, ShadowRejected, Some(&c)));
        // No valid key: counted, attributed to nobody.
        observer.observe(&Event::new(RateLimit, KeyRejected, None));

        let snapshot = top.snapshot(10);
        assert_eq!(snapshot.requests, 3 + 2 + 1 + 1);
        assert_eq!(snapshot.rejections, 2 + 1);
        let counts = |list: &[HeavyHitter]| -> Vec<(String, u64)> {
            list.iter().map(|h| (h.tenant.to_string(), h.count)).collect()
        };
        assert_eq!(
            counts(&snapshot.by_requests),
            [("a".into(), 3), ("b".into(), 2), ("c".into(), 1)]
        );
        assert_eq!(counts(&snapshot.by_rejections), [("b".into(), 2)]);
        assert!((snapshot.by_rejections[0].share - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn weights_count_as_many() {
        let (top, _time) = manual(TopTenants::builder());
        top.record_weighted(&key("purge"), 200, true);
        top.record_weighted(&key("none"), 0, true);
        top.record(&key("small"), false);
        let snapshot = top.snapshot(10);
        assert_eq!((snapshot.requests, snapshot.rejections), (201, 200));
        assert_eq!(snapshot.by_requests.len(), 2);
        assert_eq!(snapshot.by_requests[0].count, 200);
        assert_eq!(snapshot.by_rejections[0].count, 200);
    }

    #[test]
    fn builder_clamps_and_debug_shows_no_tenant() {
        let top = TopTenants::builder()
            .capacity(1)
            .buckets(0)
            .shards(3)
            .window(Duration::ZERO)
            .build();
        top.record(&key("secret-tenant"), false);
        assert_eq!(top.inner.capacity, MIN_CAPACITY);
        assert_eq!(top.inner.buckets, 1);
        assert_eq!(top.inner.shards.len(), 4);
        assert_eq!(top.inner.step, 1);
        let debug = format!("{top:?}");
        assert!(debug.contains("capacity: 8"), "{debug}");
        assert!(!debug.contains("secret"), "{debug}");
        let shards = TopTenants::new().inner.shards.len();
        assert!(shards.is_power_of_two() && shards <= MAX_DEFAULT_SHARDS);
        assert_eq!(TopTenants::builder().buckets(1_000).build().inner.buckets, 64);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serializes_window_in_seconds_and_redacts_keys() {
        let (top, time) = manual(TopTenants::builder());
        top.record(&TenantKey::from("sk_live_1").sensitive(), true);
        top.record(&key("acme"), false);
        time.advance(Duration::from_millis(1_500));
        let json = serde_json::to_value(top.snapshot(5)).unwrap_or_default();
        assert_eq!(json["window"], 1.5);
        assert_eq!(json["requests"], 2);
        assert_eq!(json["by_requests"][0]["tenant"], "acme");
        let redacted = json["by_rejections"][0]["tenant"].as_str().unwrap_or_default();
        assert!(redacted.starts_with("<redacted:"), "{redacted}");
        assert_eq!(json["by_rejections"][0]["share"], 1.0);
    }

    /// A stream where a few tenants are heavy and many are light.
    fn skewed() -> impl Strategy<Value = u16> {
        prop_oneof![3 => 0u16..4, 2 => 0u16..40, 1 => 0u16..2_000]
    }

    /// Mostly none, so that summaries fill up; sometimes long enough for
    /// steps (10 s) to leave the window (40 s).
    fn pause() -> impl Strategy<Value = u64> {
        prop_oneof![100 => Just(0u64), 1 => 0u64..20_000]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn summary_bounds_hold(
            stream in prop::collection::vec((skewed(), 1u64..4), 1..2_000),
            capacity in 8usize..24,
        ) {
            let mut summary = Summary::new(capacity);
            let mut truth: HashMap<u16, u64> = HashMap::new();
            let mut total = 0;
            for &(tenant, weight) in &stream {
                let key = key(tenant);
                summary.add(tenant_hash(key.as_bytes()), &key, weight);
                *truth.entry(tenant).or_default() += weight;
                total += weight;
            }
            summary.check();
            prop_assert_eq!(summary.counters.iter().map(|c| c.count).sum::<u64>(), total);
            for c in &summary.counters {
                let tenant: u16 = c.key.as_str().and_then(|s| s.parse().ok()).unwrap_or(u16::MAX);
                let t = truth[&tenant];
                prop_assert!(t <= c.count && c.count - c.error <= t, "{} {:?}", t, (c.count, c.error));
            }
            for (tenant, &t) in &truth {
                if t * capacity as u64 > total {
                    let key = key(tenant);
                    prop_assert!(summary.counters.iter().any(|c| c.key == key), "{} missing", tenant);
                }
            }
        }

        #[test]
        fn merged_bounds_hold(
            stream in prop::collection::vec((skewed(), 0usize..4, any::<bool>(), pause()), 1..2_000),
        ) {
            const CAPACITY: u64 = 8;
            const BUCKETS: u64 = 4;
            let (top, time) = manual(
                TopTenants::builder()
                    .capacity(CAPACITY as usize)
                    .shards(4)
                    .buckets(BUCKETS as u32)
                    .window(Duration::from_secs(40)),
            );
            let mut events = Vec::new();
            for &(tenant, shard, rejected, wait_ms) in &stream {
                time.advance(Duration::from_millis(wait_ms));
                let key = key(tenant);
                let epoch = top.inner.clock.now_nanos() / top.inner.step;
                let mut buckets = top.inner.shards[shard].buckets.lock();
                let hash = tenant_hash(key.as_bytes());
                top.inner.add_locked(&mut buckets, epoch, Some((&key, hash)), 1, u64::from(rejected));
                events.push((key, epoch, rejected));
            }
            let now = top.inner.clock.now_nanos() / top.inner.step;
            let live: Vec<_> = events.iter().filter(|e| e.1 + BUCKETS > now).collect();
            let snapshot = top.snapshot(usize::MAX);
            prop_assert_eq!(snapshot.requests, live.len() as u64);
            prop_assert_eq!(snapshot.rejections, live.iter().filter(|e| e.2).count() as u64);
            for (list, only_rejected) in [(&snapshot.by_requests, false), (&snapshot.by_rejections, true)] {
                let mut truth: HashMap<&TenantKey, u64> = HashMap::new();
                for e in live.iter().filter(|e| e.2 || !only_rejected) {
                    *truth.entry(&e.0).or_default() += 1;
                }
                let total: u64 = truth.values().sum();
                for h in list.iter() {
                    let t = truth.get(&h.tenant).copied().unwrap_or(0);
                    prop_assert!(h.count.saturating_sub(h.error) <= t && t <= h.count + h.error,
                        "{} true {} reported {:?}", h.tenant, t, (h.count, h.error));
                }
                for (tenant, &t) in &truth {
                    if t * CAPACITY > total {
                        prop_assert!(find(list, tenant).is_some(), "{} missing", tenant);
                    }
                }
                prop_assert!(list.windows(2).all(|w| w[0].count >= w[1].count));
            }
        }
    }
}
