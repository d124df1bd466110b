//! The purge batcher.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tower_service::Service;

use super::target::{Mode, Target};
use crate::hash::tenant_hash;
use crate::key::TenantKey;
use crate::observe::{Decision, Event, Hook, LayerKind, Observer};
use crate::sync::Mutex;

/// Identifies one call to the purge backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// One item of a batch sent to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeItem {
    /// What to purge.
    pub target: Target,
    /// How.
    pub mode: Mode,
}

/// What the batcher sends to the purge backend: one tenant's items, never
/// two tenants'. Duplicates and items covered by others are already gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeBatch {
    /// The batch's id, as reported to every caller it answers.
    pub id: BatchId,
    /// The tenant whose content is purged.
    pub tenant: TenantKey,
    /// The items, at most the configured cap.
    pub items: Vec<PurgeItem>,
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ItemResult {
    /// Purged.
    Purged,
    /// Not purged, for the reason given.
    Failed(String),
    /// The backend refused it for its own rate limit; retry after this long.
    RateLimited {
        /// When the backend will take it.
        retry_after: Duration,
    },
}

/// What a purge backend answers for a batch: one result per item, in the
/// batch's order.
pub type BatchResponse = Vec<ItemResult>;

/// What a caller of [`PurgeBatcher::purge`] gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// The result of the item that answered this request (its own, or the
    /// one that covered it).
    pub result: ItemResult,
    /// The backend call that carried it.
    pub batch: BatchId,
    /// Whether this request joined a purge another request had started.
    pub coalesced: bool,
}

/// Settings of a [`PurgeBatcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// How long a batch collects items after its first one (default 5 ms).
    pub window: Duration,
    /// The most items per backend call (default 256).
    pub max_items: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(5),
            max_items: 256,
        }
    }
}

/// Counters of a [`PurgeBatcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PurgeStats {
    /// Purge requests submitted.
    pub requests: u64,
    /// Requests that joined a pending purge (of the same target or a
    /// covering one) instead of adding an item.
    pub coalesced: u64,
    /// Items dropped before sending because every caller gave up.
    pub abandoned: u64,
    /// Calls made to the backend.
    pub batches: u64,
    /// Items sent to the backend, over all calls.
    pub items_sent: u64,
    /// Items waiting to be sent now.
    pub pending: u64,
    /// Items in flight now.
    pub in_flight: u64,
}

type ItemId = u64;
type WaiterId = u64;

struct Waiter {
    coalesced: bool,
    tx: oneshot::Sender<PurgeOutcome>,
}

/// An item not sent yet.
struct Pending {
    target: Target,
    mode: Mode,
    waiters: HashMap<WaiterId, Waiter>,
}

/// One tenant's unsent items and the targets it has in flight.
#[derive(Default)]
struct TenantState {
    pending: HashMap<ItemId, Pending>,
    /// Exact (target, mode) → pending item.
    by_target: HashMap<(Target, Mode), ItemId>,
    /// Pending items that may cover others.
    broad: Vec<ItemId>,
    /// Which pending item each waiter waits on.
    waiting_on: HashMap<WaiterId, ItemId>,
    /// Targets in flight, with how many items of each.
    in_flight: HashMap<Target, u32>,
    /// Whether a window timer is running for this tenant.
    timer: bool,
}

impl TenantState {
    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.in_flight.is_empty() && !self.timer
    }

    fn insert(&mut self, id: ItemId, item: Pending) {
        self.by_target.insert((item.target.clone(), item.mode), id);
        if item.target.is_broad() {
            self.broad.push(id);
        }
        for waiter in item.waiters.keys() {
            self.waiting_on.insert(*waiter, id);
        }
        self.pending.insert(id, item);
    }

    /// Takes a pending item out (to send it, drop it, or merge it).
    fn remove(&mut self, id: ItemId) -> Option<Pending> {
        let item = self.pending.remove(&id)?;
        self.by_target.remove(&(item.target.clone(), item.mode));
        self.broad.retain(|b| *b != id);
        for waiter in item.waiters.keys() {
            self.waiting_on.remove(waiter);
        }
        Some(item)
    }

    /// A pending item that does everything (`target`, `mode`) would.
    fn covering(&self, target: &Target, mode: Mode) -> Option<ItemId> {
        if let Some(&id) = self.by_target.get(&(target.clone(), mode)) {
            return Some(id);
        }
        if mode == Mode::Soft
            && let Some(&id) = self.by_target.get(&(target.clone(), Mode::Hard))
        {
            return Some(id);
        }
        self.broad.iter().copied().find(|id| {
            self.pending
                .get(id)
                .is_some_and(|p| p.target.covers(target) && p.mode.covers(mode))
        })
    }

    fn is_blocked(&self, target: &Target) -> bool {
        self.in_flight.contains_key(target)
    }
}

struct Shard {
    tenants: HashMap<TenantKey, TenantState>,
}

struct Inner<B> {
    /// Behind a mutex so that services that are not `Sync` work too: it is
    /// only locked to clone the backend for a batch.
    backend: Mutex<B>,
    config: BatchConfig,
    shards: Box<[Mutex<Shard>]>,
    next_id: AtomicU64,
    requests: AtomicU64,
    coalesced: AtomicU64,
    abandoned: AtomicU64,
    batches: AtomicU64,
    items_sent: AtomicU64,
    observer: parking_lot::RwLock<Hook>,
}

/// Groups purge requests per tenant into batches for a purge backend, and
/// answers each caller with its own item's result.
///
/// The rules, from the design's purge section:
///
/// * A purge must happen *after* the request that asked for it, so a
///   request only ever joins a purge that has **not been sent yet**; per
///   tenant and target there is at most one purge in flight and one
///   pending. A flood of identical purges costs the backend about one call
///   per backend round trip.
/// * Pending items are batched per tenant: a batch is sent when its window
///   ends or it holds `max_items`, whichever is first. Items whose target is
///   still in flight wait for it.
/// * A pending purge covers the requests it does the work of: everything >
///   host > prefix > URL, and hard covers soft (a soft request may join a
///   hard purge, never the reverse). A new covering item absorbs the pending
///   items it covers. Single purges are never escalated into a broader one.
/// * Tenants are never mixed: not in a batch, not in a result.
/// * Each caller gets its item's result (purged, failed with a reason, or
///   rate-limited by the backend with its retry-after), the batch id, and
///   whether it was coalesced. A backend error fails the batch's items; a
///   backend that panics fails them too, and leaves nothing behind.
/// * A caller that goes away does not cancel anything others wait for; an
///   item that nobody waits for any more is dropped before it is sent.
///
/// The backend is any `tower::Service<PurgeBatch, Response = BatchResponse>`
/// that can be cloned (wrap it in `tower::buffer::Buffer` if it cannot).
/// Tenants should be charged by the rate limiter for each request before it
/// reaches the batcher, i.e. before coalescing.
///
/// ```
/// use std::convert::Infallible;
/// use tower::service_fn;
/// use tower_floodgate::purge::{ItemResult, Mode, PurgeBatch, PurgeBatcher, Target};
/// use tower_floodgate::TenantKey;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let backend = service_fn(|batch: PurgeBatch| async move {
///     // Call the CDN's purge API with batch.items here.
///     Ok::<_, Infallible>(vec![ItemResult::Purged; batch.items.len()])
/// });
/// let batcher = PurgeBatcher::new(backend);
/// let url = Target::url("https://cdn.example.com/logo.png").unwrap();
/// let (a, b) = tokio::join!(
///     batcher.purge(TenantKey::from("acme"), url.clone(), Mode::Hard),
///     batcher.purge(TenantKey::from("acme"), url, Mode::Soft),
/// );
/// assert_eq!(a.result, ItemResult::Purged);
/// assert_eq!(a.batch, b.batch); // one backend call for both
/// assert!(b.coalesced);
/// # }
/// ```
pub struct PurgeBatcher<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for PurgeBatcher<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B> fmt::Debug for PurgeBatcher<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurgeBatcher")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

const SHARDS: usize = 16;

impl<B> PurgeBatcher<B>
where
    B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + 'static,
    B::Error: fmt::Display + Send,
    B::Future: Send,
{
    /// A batcher in front of `backend`, with the default window (5 ms) and
    /// cap (256 items).
    #[must_use]
    pub fn new(backend: B) -> Self {
        Self::with_config(backend, BatchConfig::default())
    }

    /// A batcher in front of `backend`.
    #[must_use]
    pub fn with_config(backend: B, config: BatchConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend: Mutex::new(backend),
                config: BatchConfig {
                    max_items: config.max_items.max(1),
                    ..config
                },
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            tenants: HashMap::new(),
                        })
                    })
                    .collect(),
                next_id: AtomicU64::new(1),
                requests: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                items_sent: AtomicU64::new(0),
                observer: parking_lot::RwLock::new(Hook::default()),
            }),
        }
    }

    /// Reports each request's outcome to `observer` (see
    /// [`observe`](crate::observe)) once its batch answered:
    /// [`Decision::Batched`] for the request whose item was sent,
    /// [`Decision::Coalesced`] for one that joined another's item. Applies
    /// to this batcher and its clones.
    #[must_use]
    pub fn observer(self, observer: impl Observer) -> Self {
        *self.inner.observer.write() = Hook::new(observer);
        self
    }

    /// Purges `target` of `tenant` in `mode`, as part of a batch, and
    /// resolves with this request's outcome.
    ///
    /// Must be called within a tokio runtime (batches are sent from spawned
    /// tasks). Dropping the future withdraws the request; the purge still
    /// happens if anybody else waits for it.
    pub fn purge(&self, tenant: TenantKey, target: Target, mode: Mode) -> Purge {
        let inner = &self.inner;
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let waiter_id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shard = inner.shard(&tenant);
        let mut guard = inner.shards[shard].lock();
        let state = guard.tenants.entry(tenant.clone()).or_default();
        let (item_id, coalesced) = match state.covering(&target, mode) {
            Some(id) => {
                inner.coalesced.fetch_add(1, Ordering::Relaxed);
                if let Some(item) = state.pending.get_mut(&id) {
                    item.waiters.insert(
                        waiter_id,
                        Waiter {
                            coalesced: true,
                            tx,
                        },
                    );
                    state.waiting_on.insert(waiter_id, id);
                }
                (id, true)
            }
            None => {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let mut item = Pending {
                    target: target.clone(),
                    mode,
                    waiters: HashMap::from([(
                        waiter_id,
                        Waiter {
                            coalesced: false,
                            tx,
                        },
                    )]),
                };
                // Absorb the pending items this one covers.
                let covered: Vec<ItemId> = state
                    .pending
                    .iter()
                    .filter(|(_, p)| target.covers(&p.target) && mode.covers(p.mode))
                    .map(|(id, _)| *id)
                    .collect();
                for covered_id in covered {
                    if let Some(old) = state.remove(covered_id) {
                        // Those that had joined it were counted then.
                        let newly = old.waiters.values().filter(|w| !w.coalesced).count();
                        inner.coalesced.fetch_add(newly as u64, Ordering::Relaxed);
                        item.waiters.extend(old.waiters.into_iter().map(|(id, w)| {
                            (
                                id,
                                Waiter {
                                    coalesced: true,
                                    ..w
                                },
                            )
                        }));
                    }
                }
                state.insert(id, item);
                (id, false)
            }
        };
        let ready = state
            .pending
            .values()
            .filter(|p| !state.is_blocked(&p.target))
            .count();
        if ready >= inner.config.max_items {
            drop(guard);
            Inner::flush(inner, &tenant);
        } else if !state.timer && !state.is_blocked(&target) {
            state.timer = true;
            drop(guard);
            Inner::arm(inner, tenant.clone());
        }
        Purge {
            rx,
            cancel: Some(Cancel {
                inner: Arc::clone(inner) as Arc<dyn Withdraw>,
                tenant,
                item: item_id,
                waiter: waiter_id,
            }),
            coalesced,
        }
    }
}

impl<B> PurgeBatcher<B> {
    /// Counters and current state.
    #[must_use]
    pub fn stats(&self) -> PurgeStats {
        let inner = &self.inner;
        let (mut pending, mut in_flight) = (0, 0);
        for shard in &*inner.shards {
            for state in shard.lock().tenants.values() {
                pending += state.pending.len() as u64;
                in_flight += state.in_flight.values().map(|n| u64::from(*n)).sum::<u64>();
            }
        }
        PurgeStats {
            requests: inner.requests.load(Ordering::Relaxed),
            coalesced: inner.coalesced.load(Ordering::Relaxed),
            abandoned: inner.abandoned.load(Ordering::Relaxed),
            batches: inner.batches.load(Ordering::Relaxed),
            items_sent: inner.items_sent.load(Ordering::Relaxed),
            pending,
            in_flight,
        }
    }

    /// Tenants with anything pending or in flight (the rest leave no trace).
    #[must_use]
    pub fn tracked_tenants(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().tenants.len())
            .sum()
    }
}

impl<B> Inner<B> {
    fn shard(&self, tenant: &TenantKey) -> usize {
        (tenant_hash(tenant.as_bytes()) >> 60) as usize % SHARDS
    }
}

impl<B> Inner<B>
where
    B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + 'static,
    B::Error: fmt::Display + Send,
    B::Future: Send,
{
    /// Flushes `tenant` when its window ends.
    fn arm(inner: &Arc<Self>, tenant: TenantKey) {
        let inner = Arc::clone(inner);
        tokio::spawn(async move {
            tokio::time::sleep(inner.config.window).await;
            {
                let mut shard = inner.shards[inner.shard(&tenant)].lock();
                if let Some(state) = shard.tenants.get_mut(&tenant) {
                    state.timer = false;
                }
            }
            Inner::flush(&inner, &tenant);
        });
    }

    /// Sends every pending item of `tenant` whose target is not in flight,
    /// in batches of at most `max_items`.
    fn flush(inner: &Arc<Self>, tenant: &TenantKey) {
        loop {
            let batch = {
                let mut shard = inner.shards[inner.shard(tenant)].lock();
                let Some(state) = shard.tenants.get_mut(tenant) else {
                    return;
                };
                let mut ids: Vec<ItemId> = state
                    .pending
                    .iter()
                    .filter(|(_, p)| !state.is_blocked(&p.target))
                    .map(|(id, _)| *id)
                    .collect();
                if ids.is_empty() {
                    if state.is_idle() {
                        shard.tenants.remove(tenant);
                    }
                    return;
                }
                ids.sort_unstable();
                ids.truncate(inner.config.max_items);
                let mut sent = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(item) = state.remove(id) {
                        *state.in_flight.entry(item.target.clone()).or_default() += 1;
                        sent.push(item);
                    }
                }
                sent
            };
            Inner::send(inner, tenant.clone(), batch);
        }
    }

    fn send(inner: &Arc<Self>, tenant: TenantKey, items: Vec<Pending>) {
        let id = BatchId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        inner.batches.fetch_add(1, Ordering::Relaxed);
        inner
            .items_sent
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        let batch = PurgeBatch {
            id,
            tenant: tenant.clone(),
            items: items
                .iter()
                .map(|p| PurgeItem {
                    target: p.target.clone(),
                    mode: p.mode,
                })
                .collect(),
        };
        tracing::debug!(
            target: "tower_floodgate::purge",
            tenant = %tenant,
            batch = %id,
            items = items.len(),
            "sending a purge batch"
        );
        // Whatever happens to the call (an answer, an error, a panic), the
        // guard answers every waiter and clears the targets in flight.
        let done = Delivery {
            inner: Arc::clone(inner),
            tenant,
            batch: id,
            items,
            results: None,
        };
        let mut backend = inner.backend.lock().clone();
        tokio::spawn(async move {
            let results = match std::future::poll_fn(|cx| backend.poll_ready(cx)).await {
                Ok(()) => backend.call(batch).await,
                Err(e) => Err(e),
            };
            let results = match results {
                Ok(results) => results,
                Err(e) => {
                    let reason = format!("the purge backend failed: {e}");
                    vec![ItemResult::Failed(reason); done.items.len()]
                }
            };
            done.deliver(results);
        });
    }
}

/// Answers a batch's waiters and clears its targets, when the send task
/// ends for any reason.
struct Delivery<B>
where
    B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + 'static,
    B::Error: fmt::Display + Send,
    B::Future: Send,
{
    inner: Arc<Inner<B>>,
    tenant: TenantKey,
    batch: BatchId,
    items: Vec<Pending>,
    results: Option<BatchResponse>,
}

impl<B> Delivery<B>
where
    B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + 'static,
    B::Error: fmt::Display + Send,
    B::Future: Send,
{
    /// Answers with `results` (the drop does the work).
    fn deliver(mut self, results: BatchResponse) {
        self.results = Some(results);
    }
}

impl<B> Drop for Delivery<B>
where
    B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + 'static,
    B::Error: fmt::Display + Send,
    B::Future: Send,
{
    fn drop(&mut self) {
        let count = self.items.len();
        let mut results = self.results.take().unwrap_or_else(|| {
            vec![ItemResult::Failed("the purge backend panicked".to_owned()); count]
        });
        if results.len() != count {
            let reason = format!(
                "the purge backend answered {} results for {count} items",
                results.len()
            );
            results = vec![ItemResult::Failed(reason); count];
        }
        let items = std::mem::take(&mut self.items);
        let mut targets = Vec::with_capacity(count);
        let observer = self.inner.observer.read().clone();
        for (item, result) in items.into_iter().zip(results) {
            targets.push(item.target);
            for waiter in item.waiters.into_values() {
                observer.emit(|| {
                    let decision = if waiter.coalesced {
                        Decision::Coalesced
                    } else {
                        Decision::Batched
                    };
                    Event::new(LayerKind::Purge, decision, Some(&self.tenant))
                });
                let _ = waiter.tx.send(PurgeOutcome {
                    result: result.clone(),
                    batch: self.batch,
                    coalesced: waiter.coalesced,
                });
            }
        }
        let inner = &self.inner;
        let unblocked = {
            let mut shard = inner.shards[inner.shard(&self.tenant)].lock();
            let Some(state) = shard.tenants.get_mut(&self.tenant) else {
                return;
            };
            for target in &targets {
                if let Some(n) = state.in_flight.get_mut(target) {
                    *n -= 1;
                    if *n == 0 {
                        state.in_flight.remove(target);
                    }
                }
            }
            // Items that waited for these targets may go now (if their
            // window has not got a timer of its own running).
            let unblocked = !state.timer
                && state
                    .pending
                    .values()
                    .any(|p| targets.contains(&p.target) && !state.is_blocked(&p.target));
            if state.is_idle() {
                shard.tenants.remove(&self.tenant);
            }
            unblocked
        };
        if unblocked && tokio::runtime::Handle::try_current().is_ok() {
            Inner::flush(inner, &self.tenant);
        }
    }
}

/// Withdrawing a waiter, without the backend's type.
trait Withdraw: Send + Sync {
    fn withdraw(&self, tenant: &TenantKey, item: ItemId, waiter: WaiterId);
}

impl<B: Send> Withdraw for Inner<B> {
    fn withdraw(&self, tenant: &TenantKey, item: ItemId, waiter: WaiterId) {
        let mut shard = self.shards[self.shard(tenant)].lock();
        let Some(state) = shard.tenants.get_mut(tenant) else {
            return;
        };
        // The waiter may have moved to an item that absorbed its own.
        let Some(&holder) = state.waiting_on.get(&waiter) else {
            // Already sent: the purge goes on; its answer is dropped.
            let _ = item;
            return;
        };
        state.waiting_on.remove(&waiter);
        let abandoned = state.pending.get_mut(&holder).is_some_and(|p| {
            p.waiters.remove(&waiter);
            p.waiters.is_empty()
        });
        if abandoned {
            state.remove(holder);
            self.abandoned.fetch_add(1, Ordering::Relaxed);
            if state.is_idle() {
                shard.tenants.remove(tenant);
            }
        }
    }
}

struct Cancel {
    inner: Arc<dyn Withdraw>,
    tenant: TenantKey,
    item: ItemId,
    waiter: WaiterId,
}

/// The future of one purge request. Dropping it withdraws the request.
#[must_use = "a purge is only waited for while its future is polled"]
pub struct Purge {
    rx: oneshot::Receiver<PurgeOutcome>,
    cancel: Option<Cancel>,
    coalesced: bool,
}

impl Purge {
    /// Whether this request joined a pending purge when it was submitted.
    #[must_use]
    pub fn is_coalesced(&self) -> bool {
        self.coalesced
    }
}

impl fmt::Debug for Purge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Purge")
            .field("coalesced", &self.coalesced)
            .finish_non_exhaustive()
    }
}

impl Future for Purge {
    type Output = PurgeOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PurgeOutcome> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(outcome) => {
                self.cancel = None;
                Poll::Ready(outcome.unwrap_or_else(|_| PurgeOutcome {
                    result: ItemResult::Failed("the purge batcher went away".to_owned()),
                    batch: BatchId(0),
                    coalesced: self.coalesced,
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Purge {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel
                .inner
                .withdraw(&cancel.tenant, cancel.item, cancel.waiter);
        }
    }
}
