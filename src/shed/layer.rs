use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tower_layer::Layer;

use super::limit::{CoDel, CoDelState, Controller, Limit};
use super::priority::{FromExtension, Priority, PriorityExtractor};
use super::service::{GenericLoadShed, LoadShed};
use crate::clock::Clock;
use crate::common::Refusals;
use crate::error::{OverloadCause, Overloaded, Rejection, ShedReason};
use crate::gate::{self, Fast, QUEUED, Waiter};
use crate::concurrency::DEFAULT_MAX_ACTIVE_TENANTS;
use crate::common::Extracted;
use crate::inflight::{Admission, Seat, Tenants};
use crate::key::{Extension, KeyExtractor, TenantKey};
use crate::observe::{Decision, Event, Hook, LayerKind, Observer, refusal};
use crate::policy::{Plan, Policy, PolicyHandle, PolicyListener};
use crate::sync::{AtomicU64 as GateWord, Mutex};

const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Refuses work the process cannot take, lowest priority and heaviest
/// tenants first. See the [module docs](crate::shed).
pub struct LoadShedLayer<K = Extension<TenantKey>, P = FromExtension> {
    policy: PolicyHandle,
    runtime: Arc<Runtime>,
    key: K,
    priority: P,
    observer: Hook,
}

/// The knobs; copied into every service.
#[derive(Debug, Clone, Copy)]
struct Config {
    /// Shares in parts per 65 536, so that ceilings are integer arithmetic.
    critical_reserve: u32,
    sheddable_share: u32,
    fairness: bool,
    queue: Option<(usize, CoDel)>,
    retry_after: Duration,
}

/// The state every clone and every `layer()` call shares.
pub(crate) struct Runtime {
    config: Config,
    controller: Controller,
    /// Requests in flight, as a gate word (count and `QUEUED`).
    word: GateWord,
    queues: Mutex<Queues>,
    /// Whether any plan sets a priority (else the policy need not be read).
    plan_priorities: AtomicBool,
    /// Whether the policy blocks any tenant.
    blocking: AtomicBool,
    policy: ArcSwap<Policy>,
    tenants: Tenants,
    refusals: Refusals,
    clock: Clock,
    shed_capacity: AtomicU64,
    shed_fair_share: AtomicU64,
    shed_timeout: AtomicU64,
    blocked: AtomicU64,
}

/// One FIFO queue per priority, and CoDel's view of them.
#[derive(Default)]
struct Queues {
    by_priority: [VecDeque<Queued>; 3],
    codel: CoDelState,
}

struct Queued {
    waiter: Arc<Waiter>,
    since: u64,
}

impl Queues {
    fn len(&self) -> usize {
        self.by_priority.iter().map(VecDeque::len).sum()
    }
}

impl PolicyListener for Runtime {
    fn policy_changed(&self, old: &Policy, new: &Arc<Policy>) {
        self.policy.store(Arc::clone(new));
        self.plan_priorities
            .store(new.any_priority(), Ordering::Release);
        self.blocking.store(new.any_blocked(), Ordering::Release);
        let shadow = new.is_shadow(LayerKind::LoadShed);
        if old.is_shadow(LayerKind::LoadShed) != shadow {
            self.refusals.set_shadow(shadow);
        }
    }
}

impl Runtime {
    fn new(policy: &PolicyHandle, limit: Limit, config: Config, clock: Clock) -> Arc<Self> {
        let seen = policy.current();
        let runtime = Arc::new(Self {
            config,
            controller: Controller::new(limit),
            word: GateWord::new(0),
            queues: Mutex::new(Queues::default()),
            plan_priorities: AtomicBool::new(seen.any_priority()),
            blocking: AtomicBool::new(seen.any_blocked()),
            policy: ArcSwap::new(Arc::clone(&seen)),
            tenants: Tenants::new(DEFAULT_MAX_ACTIVE_TENANTS, true),
            refusals: Refusals::default(),
            clock,
            shed_capacity: AtomicU64::new(0),
            shed_fair_share: AtomicU64::new(0),
            shed_timeout: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
        });
        runtime
            .refusals
            .set_shadow(seen.is_shadow(LayerKind::LoadShed));
        let listener: Arc<dyn PolicyListener> = runtime.clone();
        policy.subscribe(&listener, &seen);
        runtime
    }

    /// The most requests of `priority` admitted at once under `limit`: all
    /// of it for critical ones, all but the reserve for normal ones, a
    /// share of that for sheddable ones. The reserve is rounded down, but
    /// is at least one unit once the limit is 2 or more (and the reserve's
    /// share not 0), so that critical traffic keeps room at small limits
    /// too, as an adaptive limit backs off to.
    #[inline]
    fn ceiling(&self, priority: Priority, limit: u32) -> u32 {
        let mut reserve = share_of(limit, self.config.critical_reserve);
        if self.config.critical_reserve > 0 && limit >= 2 {
            reserve = reserve.max(1);
        }
        let normal = limit.saturating_sub(reserve);
        match priority {
            Priority::Critical => limit,
            Priority::Normal => normal,
            Priority::Sheddable => {
                share_of(normal, self.config.sheddable_share)
            }
        }
    }

    #[inline]
    fn in_flight(&self) -> u32 {
        gate::count(self.word.load(Ordering::Acquire))
    }

    fn stats(&self) -> ShedStats {
        let queues = self.queues.lock();
        ShedStats {
            shed_capacity: self.shed_capacity.load(Ordering::Relaxed),
            shed_fair_share: self.shed_fair_share.load(Ordering::Relaxed),
            shed_timeout: self.shed_timeout.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            shadow_rejected: self.refusals.shadowed.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
            limit: self.controller.limit(),
            waiting: queues.len(),
            overloaded: queues.codel.overloaded(),
            active_tenants: self.tenants.active(),
        }
    }

    /// Counts, logs and reports a refusal; `true` if shadow mode lets it
    /// through.
    fn refuse(
        &self,
        rejection: &Rejection,
        counter: &AtomicU64,
        observer: &Hook,
        waited: Option<Duration>,
    ) -> bool {
        let shadow = self
            .refusals
            .record("load_shed", rejection, counter, self.clock.now_nanos());
        observer.emit(|| refusal(LayerKind::LoadShed, rejection, shadow, waited));
        shadow
    }

    fn overloaded(
        &self,
        tenant: Option<&TenantKey>,
        priority: Priority,
        reason: ShedReason,
        in_flight: u32,
        limit: u32,
    ) -> Rejection {
        Rejection::Overloaded(Box::new(Overloaded {
            cause: OverloadCause::Shed {
                priority,
                reason,
                in_flight,
                limit,
            },
            tenant: tenant.cloned(),
            retry_after: self.config.retry_after,
        }))
    }

    /// Returns a unit: to the most important waiter that may go, else to
    /// the count.
    #[inline]
    fn release(&self) {
        if let Fast::Done(_) = gate::try_release(&self.word) {
            return;
        }
        self.release_to_waiter();
    }

    /// [`Runtime::release`] when somebody waits.
    #[inline(never)]
    fn release_to_waiter(&self) {
        let granted = {
            let mut queues = self.queues.lock();
            self.word.fetch_sub(1, Ordering::AcqRel);
            self.grant_ready(&mut queues)
        };
        wake(granted);
    }

    /// Lets waiters go for as long as there is room for them under their
    /// priority's ceiling, the most important first and, within a
    /// priority, the oldest first; drops the queued flag once nobody waits.
    /// Called with the queues' lock, under which nobody else changes the
    /// count while anybody waits (the flag sends everybody to the lock).
    /// Returns the waiters let go, to be woken once the lock is released.
    ///
    /// A waiter of a low priority that has no room therefore never holds
    /// up a more important request that has: a sheddable request waiting
    /// at its ceiling does not make a critical one wait too. And room that
    /// appears without a release (the adaptive limit grows) goes to the
    /// waiters at the next release or arrival.
    fn grant_ready(&self, queues: &mut Queues) -> Vec<Arc<Waiter>> {
        let mut granted = Vec::new();
        if queues.len() > 0 {
            let limit = self.controller.limit();
            let mut now = None;
            let Queues { by_priority, codel } = queues;
            for priority in [Priority::Critical, Priority::Normal, Priority::Sheddable] {
                let ceiling = self.ceiling(priority, limit);
                let queue = &mut by_priority[priority.index()];
                while self.in_flight() < ceiling {
                    let Some(queued) = queue.pop_front() else {
                        break;
                    };
                    if !queued.waiter.try_grant() {
                        continue;
                    }
                    self.word.fetch_add(1, Ordering::AcqRel);
                    let now = *now.get_or_insert_with(|| self.clock.now_nanos());
                    if let Some((_, config)) = &self.config.queue {
                        codel.left(config, now.saturating_sub(queued.since), now);
                    }
                    granted.push(queued.waiter);
                }
            }
        }
        if queues.len() == 0 {
            self.word.fetch_and(!QUEUED, Ordering::AcqRel);
        }
        granted
    }

    /// Withdraws a waiter that waited since `since` (a timeout, when
    /// `timed_out`); returns its unit if it had just been granted one.
    fn cancel(&self, priority: Priority, waiter: &Arc<Waiter>, since: u64, timed_out: bool) {
        let owned = {
            let mut queues = self.queues.lock();
            if timed_out && let Some((_, codel)) = &self.config.queue {
                let now = self.clock.now_nanos();
                queues.codel.left(codel, now.saturating_sub(since), now);
            }
            let queue = &mut queues.by_priority[priority.index()];
            let owned = !waiter.try_cancel();
            if let Some(at) = queue.iter().position(|q| Arc::ptr_eq(&q.waiter, waiter)) {
                queue.remove(at);
            }
            if queues.len() == 0 {
                self.word.fetch_and(!QUEUED, Ordering::AcqRel);
            }
            owned
        };
        if owned {
            self.release();
        }
    }
}

/// A share in `0.0..=1.0` as parts per 65 536.
fn to_share(share: f64) -> u32 {
    (share.clamp(0.0, 1.0) * 65_536.0).round() as u32
}

/// `share` (parts per 65 536) of `n`, rounded down.
#[inline]
fn share_of(n: u32, share: u32) -> u32 {
    ((u64::from(n) * u64::from(share)) >> 16) as u32
}

impl LoadShedLayer {
    /// A shedder admitting at most `limit` requests in flight, with the
    /// default priorities (critical traffic keeps 10% of the capacity,
    /// sheddable traffic gets at most half of the rest), fairness between
    /// tenants on, and no queue. Requests take their priority from a
    /// [`Priority`] extension, and their tenant (for fairness) from a
    /// [`TenantKey`] extension.
    #[must_use]
    pub fn new(limit: Limit) -> Self {
        let policy = PolicyHandle::new(Policy::new(Plan::new("default")));
        let config = Config {
            critical_reserve: to_share(0.1),
            sheddable_share: to_share(0.5),
            fairness: true,
            queue: None,
            retry_after: DEFAULT_RETRY_AFTER,
        };
        Self {
            runtime: Runtime::new(&policy, limit, config, Clock::monotonic()),
            policy,
            key: Extension::default(),
            priority: FromExtension::default(),
            observer: Hook::default(),
        }
    }
}

impl<K, P> LoadShedLayer<K, P> {
    /// Starts a fresh state with changed settings (builder methods; call
    /// them before cloning the layer).
    fn rebuild(self, change: impl FnOnce(&mut Config)) -> Self {
        let clock = self.runtime.clock.clone();
        self.rebuild_with(change, clock)
    }

    fn rebuild_with(mut self, change: impl FnOnce(&mut Config), clock: Clock) -> Self {
        let mut config = self.runtime.config;
        change(&mut config);
        let limit = self.runtime.controller.setting();
        let shadow = self.is_shadow();
        self.runtime = Runtime::new(&self.policy, limit, config, clock);
        self.set_shadow(shadow);
        self
    }

    /// The clock that times latency and waits (default
    /// [`Clock::monotonic`]; use [`Clock::tokio`] with tokio's paused test
    /// time, which also drives the queue's deadlines).
    #[must_use]
    pub fn clock(self, clock: Clock) -> Self {
        self.rebuild_with(|_| {}, clock)
    }

    /// Takes the priority of requests whose extractor says nothing from
    /// their tenant's plan ([`Plan::priority`]) under `policy`.
    #[must_use]
    pub fn policy(mut self, policy: impl Into<PolicyHandle>) -> Self {
        self.policy = policy.into();
        self.rebuild(|_| {})
    }

    /// Finds the tenant with `key`, for fairness. A request without a key
    /// is never refused for it; it just is not weighed against others.
    #[must_use]
    pub fn key<K2>(self, key: K2) -> LoadShedLayer<K2, P> {
        LoadShedLayer {
            policy: self.policy,
            runtime: self.runtime,
            key,
            priority: self.priority,
            observer: self.observer,
        }
    }

    /// Reads each request's [`Priority`] with `priority` (see
    /// [`priority`](crate::shed::priority)).
    #[must_use]
    pub fn priority<P2>(self, priority: P2) -> LoadShedLayer<K, P2> {
        LoadShedLayer {
            policy: self.policy,
            runtime: self.runtime,
            key: self.key,
            priority,
            observer: self.observer,
        }
    }

    /// The share of the limit only critical requests may use (default 0.1),
    /// rounded down but at least one unit once the limit is 2 or more, so
    /// that critical traffic keeps room at the small limits an adaptive
    /// limit backs off to. 0 reserves nothing.
    #[must_use]
    pub fn critical_reserve(self, share: f64) -> Self {
        self.rebuild(|c| c.critical_reserve = to_share(share))
    }

    /// The share of the non-reserved capacity sheddable requests may use
    /// (default 0.5).
    #[must_use]
    pub fn sheddable_share(self, share: f64) -> Self {
        self.rebuild(|c| c.sheddable_share = to_share(share))
    }

    /// Whether, once three quarters of a priority's capacity is in use,
    /// tenants at or above their fair share (that capacity divided by the
    /// tenants with requests in flight) are refused while others are still
    /// admitted (default on).
    #[must_use]
    pub fn fairness(self, enabled: bool) -> Self {
        self.rebuild(|c| c.fairness = enabled)
    }

    /// Lets up to `max_waiting` requests wait for capacity instead of being
    /// refused at once, each for as long as [`CoDel`] allows; the most
    /// important waiters go first.
    #[must_use]
    pub fn queue(self, max_waiting: usize, codel: CoDel) -> Self {
        self.rebuild(|c| c.queue = (max_waiting > 0).then_some((max_waiting, codel)))
    }

    /// The `Retry-After` of the 503s (default one second; at least one
    /// second, since `Retry-After: 0` invites the retry at once).
    #[must_use]
    pub fn retry_after(self, wait: Duration) -> Self {
        self.rebuild(|c| c.retry_after = wait.max(Duration::from_secs(1)))
    }

    /// Reports every decision to `observer` (see [`observe`](crate::observe)).
    /// The layer then also reads the tenant key of every request, for the
    /// reports.
    #[must_use]
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Hook::new(observer);
        self
    }

    /// Shadow (dry-run) mode: admit everything, count and log what would
    /// have been refused. [`PolicyHandle::set_shadow`] switches every load
    /// shed layer on the [policy](Self::policy) at once.
    #[must_use]
    pub fn shadow(self, enabled: bool) -> Self {
        self.set_shadow(enabled);
        self
    }

    /// Switches shadow mode for every service made by this layer and its
    /// clones, from the next request on.
    pub fn set_shadow(&self, enabled: bool) {
        self.runtime.refusals.set_shadow(enabled);
    }

    /// Whether shadow mode is on.
    #[must_use]
    pub fn is_shadow(&self) -> bool {
        self.runtime.refusals.is_shadow()
    }

    /// Counters and current state, shared by the layer's clones.
    #[must_use]
    pub fn stats(&self) -> ShedStats {
        self.runtime.stats()
    }

    /// What [`stats`](Self::stats) reads, for a dashboard.
    pub(crate) fn stats_source(&self) -> impl Fn() -> ShedStats + Send + Sync + 'static {
        let runtime = Arc::clone(&self.runtime);
        move || runtime.stats()
    }

    /// The same layer for any request type: refused requests fail with a
    /// [`Rejection`].
    #[must_use]
    pub fn into_generic(self) -> GenericLoadShedLayer<K, P> {
        GenericLoadShedLayer { layer: self }
    }

    fn shared(&self) -> Arc<Shared<K, P>>
    where
        K: Clone,
        P: Clone,
    {
        self.shared_with(self.key.clone(), self.priority.clone())
    }

    /// The policy plans and blocks come from.
    pub(crate) fn policy_handle(&self) -> &PolicyHandle {
        &self.policy
    }

    /// The priority extractor.
    pub(crate) fn priority_extractor(&self) -> &P {
        &self.priority
    }

    /// This layer's state with another key and priority extractor (for
    /// [`FloodgateLayer`](crate::FloodgateLayer)).
    pub(crate) fn shared_with<K2, P2>(&self, key: K2, priority: P2) -> Arc<Shared<K2, P2>> {
        Arc::new(Shared {
            runtime: Arc::clone(&self.runtime),
            key,
            priority,
            observer: self.observer.clone(),
        })
    }
}

impl<K: Clone, P: Clone> Clone for LoadShedLayer<K, P> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            runtime: Arc::clone(&self.runtime),
            key: self.key.clone(),
            priority: self.priority.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<K: fmt::Debug, P: fmt::Debug> fmt::Debug for LoadShedLayer<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedLayer")
            .field("key", &self.key)
            .field("priority", &self.priority)
            .field("config", &self.runtime.config)
            .field("controller", &self.runtime.controller)
            .finish_non_exhaustive()
    }
}

impl<S, K: Clone, P: Clone> Layer<S> for LoadShedLayer<K, P> {
    type Service = LoadShed<S, K, P>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed::new(inner, self.shared())
    }
}

/// [`LoadShedLayer`] for any request type. Made by
/// [`LoadShedLayer::into_generic`].
pub struct GenericLoadShedLayer<K = Extension<TenantKey>, P = FromExtension> {
    layer: LoadShedLayer<K, P>,
}

impl<K, P> GenericLoadShedLayer<K, P> {
    /// The HTTP layer this was made from (for its settings and stats).
    #[must_use]
    pub fn get_ref(&self) -> &LoadShedLayer<K, P> {
        &self.layer
    }
}

impl<K: Clone, P: Clone> Clone for GenericLoadShedLayer<K, P> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
        }
    }
}

impl<K: fmt::Debug, P: fmt::Debug> fmt::Debug for GenericLoadShedLayer<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GenericLoadShedLayer")
            .field(&self.layer)
            .finish()
    }
}

impl<S, K: Clone, P: Clone> Layer<S> for GenericLoadShedLayer<K, P> {
    type Service = GenericLoadShed<S, K, P>;

    fn layer(&self, inner: S) -> Self::Service {
        GenericLoadShed::new(inner, self.layer.shared())
    }
}

/// Counters and state of a [`LoadShedLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ShedStats {
    /// Requests refused because their priority's capacity was used up.
    pub shed_capacity: u64,
    /// Requests refused because their tenant had its fair share or more.
    pub shed_fair_share: u64,
    /// Requests that waited in the queue until CoDel's deadline.
    pub shed_timeout: u64,
    /// Requests refused because their tenant is blocked.
    pub blocked: u64,
    /// Requests that shadow mode let through but would have refused.
    pub shadow_rejected: u64,
    /// Requests in flight now.
    pub in_flight: u32,
    /// The limit in force now.
    pub limit: u32,
    /// Requests waiting now.
    pub waiting: usize,
    /// Whether CoDel sees a standing queue.
    pub overloaded: bool,
    /// Tenants with a request in flight now.
    pub active_tenants: u64,
}

/// What the services of one `layer()` call share.
pub(crate) struct Shared<K, P> {
    runtime: Arc<Runtime>,
    key: K,
    priority: P,
    observer: Hook,
}

/// The outcome of `call`: `P` is what an admitted request holds (a
/// [`Permit`], or for a [`FloodgateLayer`](crate::FloodgateLayer) the bare
/// [`Held`] units).
pub(crate) enum Admit<P = Permit> {
    Now(P),
    Wait(Box<Ticket>),
    Reject(Rejection),
}

impl Admit<Held> {
    /// The same outcome with a permit that returns its units by itself.
    #[inline]
    fn with_runtime(self, runtime: &Arc<Runtime>) -> Admit {
        match self {
            Self::Now(held) => Admit::Now(Permit::new(runtime, held)),
            Self::Wait(ticket) => Admit::Wait(ticket),
            Self::Reject(rejection) => Admit::Reject(rejection),
        }
    }
}

impl<K, P> Shared<K, P> {
    /// The common case, decided without the tenant or the clock: a fixed
    /// limit, no fairness, queue, plan priorities, blocks, observer or
    /// shadow mode, and a unit free below the request's ceiling with nobody
    /// waiting. `None`: take [`Shared::admit`].
    #[inline]
    pub(crate) fn admit_fast<Req>(&self, req: &Req) -> Option<Held>
    where
        P: PriorityExtractor<Req>,
    {
        let runtime = &self.runtime;
        let config = &runtime.config;
        if config.fairness
            || config.queue.is_some()
            || runtime.controller.is_adaptive()
            || self.observer.is_set()
            || runtime.plan_priorities.load(Ordering::Acquire)
            || runtime.blocking.load(Ordering::Acquire)
            || runtime.refusals.is_shadow()
        {
            return None;
        }
        let priority = self.priority.priority(req).unwrap_or(Priority::Normal);
        let ceiling = runtime.ceiling(priority, runtime.controller.limit());
        match gate::try_acquire(&runtime.word, ceiling, false) {
            Fast::Done(_) => Some(Held {
                seat: None,
                global: true,
                started: 0,
            }),
            Fast::Full | Fast::Slow => None,
        }
    }

    /// The common case for a tenant whose plan is known (under the same
    /// policy as this layer's): no observer, no shadow mode, fairness not
    /// in play (less than three quarters of the request's ceiling in use),
    /// and a unit free below the ceiling with nobody waiting. `None`: take
    /// [`admit_with`](Self::admit_with), which decides again (nothing is
    /// held).
    #[inline]
    pub(crate) fn admit_plan<Req>(&self, req: &Req, plan: &Plan, hash: u64) -> Option<Held>
    where
        P: PriorityExtractor<Req>,
    {
        let runtime = &*self.runtime;
        let config = &runtime.config;
        if self.observer.is_set() || runtime.refusals.is_shadow() {
            return None;
        }
        let priority = match self.priority.priority(req) {
            Some(priority) => priority,
            None => plan.request_priority().unwrap_or_default(),
        };
        let limit = runtime.controller.limit();
        let ceiling = runtime.ceiling(priority, limit);
        let in_flight = runtime.in_flight();
        runtime.controller.observe_load(in_flight, limit);
        if config.fairness && u64::from(in_flight) * 4 >= u64::from(ceiling) * 3 {
            return None;
        }
        // The in-flight unit first: nothing to give back if there is none.
        let Fast::Done(_) = gate::try_acquire(&runtime.word, ceiling, false) else {
            return None;
        };
        let mut held = Held {
            seat: None,
            global: true,
            started: if runtime.controller.is_adaptive() {
                runtime.clock.now_nanos()
            } else {
                0
            },
        };
        if config.fairness
            && let Admission::Granted(seat) = runtime.tenants.acquire(hash, u32::MAX, true, 0)
        {
            held.seat = Some(seat);
        }
        Some(held)
    }

    /// The runtime the units of a [`Held`] go back to.
    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// A permit returning `held`'s units when dropped.
    #[inline]
    pub(crate) fn permit(&self, held: Held) -> Permit {
        Permit::new(&self.runtime, held)
    }

    pub(crate) fn admit<Req>(&self, req: &Req) -> Admit
    where
        K: KeyExtractor<Req>,
        P: PriorityExtractor<Req>,
    {
        let runtime = &self.runtime;
        // The tenant is only needed for fairness, plan priorities, blocks
        // and reports.
        let needs_tenant = runtime.config.fairness
            || runtime.plan_priorities.load(Ordering::Acquire)
            || runtime.blocking.load(Ordering::Acquire)
            || self.observer.is_set();
        let extracted = needs_tenant.then(|| Extracted::from_request(&self.key, req));
        self.admit_with(req, extracted.as_ref())
            .with_runtime(runtime)
    }

    /// Decides for `req`, whose tenant key was `extracted` (if it was
    /// needed). The units are returned by whoever holds the [`Held`], with
    /// [`Held::release`].
    pub(crate) fn admit_with<Req>(&self, req: &Req, extracted: Option<&Extracted>) -> Admit<Held>
    where
        P: PriorityExtractor<Req>,
    {
        let runtime = &self.runtime;
        let config = &runtime.config;
        // Time is only needed to measure latency and waits.
        let timed = runtime.controller.is_adaptive() || config.queue.is_some();
        let now = if timed { runtime.clock.now_nanos() } else { 0 };
        let plan_priorities = runtime.plan_priorities.load(Ordering::Acquire);
        let blocking = runtime.blocking.load(Ordering::Acquire);
        let tenant = extracted.and_then(Extracted::key);
        // Whether a shadow refusal was reported already for this request.
        let mut reported = false;
        if blocking
            && let Some(tenant) = tenant
            && runtime
                .policy
                .load()
                .is_blocked_hashed(tenant.hash, tenant.key.as_bytes())
        {
            let rejection = Rejection::Blocked {
                tenant: tenant.key.clone(),
            };
            if !runtime.refuse(&rejection, &runtime.blocked, &self.observer, None) {
                return Admit::Reject(rejection);
            }
            reported = true;
        }
        let key = tenant.map(|t| t.key);
        let priority = match self.priority.priority(req) {
            Some(priority) => priority,
            None => match tenant {
                Some(tenant) if plan_priorities => runtime
                    .policy
                    .load()
                    .plan_for_hashed(tenant.hash, tenant.key.as_bytes())
                    .request_priority()
                    .unwrap_or_default(),
                _ => Priority::Normal,
            },
        };
        let limit = runtime.controller.limit();
        let ceiling = runtime.ceiling(priority, limit);
        let shadow = runtime.refusals.is_shadow();
        let fp = match tenant {
            Some(tenant) if config.fairness => Some(tenant.hash),
            _ => None,
        };

        // Fairness: under pressure, tenants at or above their share wait
        // for the light ones.
        let in_flight = runtime.in_flight();
        runtime.controller.observe_load(in_flight, limit);
        if let Some(fp) = fp
            && u64::from(in_flight) * 4 >= u64::from(ceiling) * 3
        {
            let active = runtime.tenants.active().max(1);
            let share = u64::from(ceiling).div_ceil(active).max(1);
            if u64::from(runtime.tenants.in_flight(fp)) >= share {
                let rejection =
                    runtime.overloaded(key, priority, ShedReason::FairShare, in_flight, limit);
                if !runtime.refuse(&rejection, &runtime.shed_fair_share, &self.observer, None) {
                    return Admit::Reject(rejection);
                }
                reported = true;
            }
        }

        let mut held = Held {
            seat: None,
            global: false,
            started: now,
        };
        if let Some(fp) = fp
            && let Admission::Granted(seat) = runtime.tenants.acquire(fp, u32::MAX, true, 0)
        {
            // Counted for fairness only: no cap.
            held.seat = Some(seat);
        }

        let admitted = |reported: bool| {
            if !reported {
                self.observer
                    .emit(|| Event::new(LayerKind::LoadShed, Decision::Admitted, key));
            }
        };
        // In shadow mode everything is admitted; one over its ceiling is
        // reported as the refusal it would have been.
        let shadow_refused = |count: u32, reported: bool| {
            if shadow && count >= ceiling && !reported {
                let rejection =
                    runtime.overloaded(key, priority, ShedReason::Capacity, count, limit);
                runtime.refuse(&rejection, &runtime.shed_capacity, &self.observer, None);
                return true;
            }
            reported
        };
        match gate::try_acquire(&runtime.word, ceiling, shadow) {
            Fast::Done(before) => {
                held.global = true;
                admitted(shadow_refused(before, reported));
                return Admit::Now(held);
            }
            Fast::Full if config.queue.is_none() => {}
            Fast::Full | Fast::Slow => {}
        }
        // Full, or others wait: queue if allowed, else refuse. Whoever was
        // woken is woken once the lock is released (declared first, so
        // dropped last).
        let mut granted = Wake::default();
        let mut queues = runtime.queues.lock();
        // Waiters that have room go first; then whoever still waits is
        // either less important than this request (and has no room) or at
        // least as important (and then this one has no room either).
        granted.0 = runtime.grant_ready(&mut queues);
        let queueable = config.queue.is_some_and(|(max, _)| queues.len() < max)
            && !(priority == Priority::Sheddable && queues.codel.overloaded())
            && !shadow;
        let mut current = runtime.word.load(Ordering::Acquire);
        loop {
            let count = gate::count(current);
            let queued = current & QUEUED != 0;
            if count < ceiling || shadow {
                match runtime.word.compare_exchange(
                    current,
                    current + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        held.global = true;
                        admitted(shadow_refused(count, reported));
                        return Admit::Now(held);
                    }
                    Err(actual) => {
                        current = actual;
                        continue;
                    }
                }
            }
            if !queueable {
                drop(queues);
                let rejection =
                    runtime.overloaded(key, priority, ShedReason::Capacity, count, limit);
                return if runtime.refuse(&rejection, &runtime.shed_capacity, &self.observer, None) {
                    Admit::Now(held)
                } else {
                    held.release(runtime);
                    Admit::Reject(rejection)
                };
            }
            if !queued
                && let Err(actual) = runtime.word.compare_exchange(
                    current,
                    current | QUEUED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
            {
                current = actual;
                continue;
            }
            break;
        }
        let waiter = Arc::new(Waiter::new());
        let codel = config.queue.map(|(_, codel)| codel).unwrap_or_default();
        queues.codel.tick(&codel, now);
        let wait = queues.codel.max_wait(&codel);
        queues.by_priority[priority.index()].push_back(Queued {
            waiter: Arc::clone(&waiter),
            since: now,
        });
        drop(queues);
        Admit::Wait(Box::new(Ticket {
            runtime: Arc::clone(runtime),
            held,
            priority,
            waiter: Some(waiter),
            since: now,
            deadline: Box::pin(tokio::time::sleep(wait)),
            tenant: key.cloned(),
            observer: self.observer.clone(),
        }))
    }
}

/// Waiters let go under the lock, woken when dropped (after it).
#[derive(Default)]
struct Wake(Vec<Arc<Waiter>>);

impl Drop for Wake {
    fn drop(&mut self) {
        wake(std::mem::take(&mut self.0));
    }
}

fn wake(waiters: Vec<Arc<Waiter>>) {
    for waiter in waiters {
        waiter.wake();
    }
}

/// The units a request holds while in flight: one of the in-flight count
/// and one of its tenant's count (for fairness). It does not return them by
/// itself: whoever keeps it calls [`Held::release`] with the runtime they
/// came from (a [`Permit`] does, when dropped).
#[derive(Debug)]
#[must_use = "the units must be released"]
pub(crate) struct Held {
    seat: Option<Seat>,
    global: bool,
    /// When the request was admitted, for the adaptive limit.
    started: u64,
}

impl Held {
    /// Nothing held.
    pub(crate) const EMPTY: Self = Self {
        seat: None,
        global: false,
        started: 0,
    };

    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        !self.global && self.seat.is_none()
    }

    /// The response is ready: its latency feeds the adaptive limit.
    #[inline]
    pub(crate) fn responded(&self, runtime: &Runtime) {
        if runtime.controller.is_adaptive() {
            runtime
                .controller
                .record(self.started, runtime.clock.now_nanos());
        }
    }

    /// Returns the units to `runtime`, once: it holds nothing afterwards.
    #[inline]
    pub(crate) fn release(&mut self, runtime: &Runtime) {
        if std::mem::take(&mut self.global) {
            runtime.release();
        }
        if let Some(seat) = self.seat.take() {
            runtime.tenants.release(seat);
        }
    }
}

/// What a request holds while in flight, returned when it is dropped.
pub(crate) struct Permit {
    runtime: Option<Arc<Runtime>>,
    held: Held,
}

impl Permit {
    /// Keeps the runtime even when `held` is empty: the response's latency
    /// still feeds the adaptive limit.
    #[inline]
    fn new(runtime: &Arc<Runtime>, held: Held) -> Self {
        Self {
            runtime: Some(Arc::clone(runtime)),
            held,
        }
    }

    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The response is ready: its latency feeds the adaptive limit.
    #[inline]
    pub(crate) fn responded(&mut self) {
        if let Some(runtime) = &self.runtime {
            self.held.responded(runtime);
        }
    }

    /// The units, for a holder that knows the runtime: the permit no longer
    /// returns them.
    #[inline]
    pub(crate) fn into_held(mut self) -> Held {
        std::mem::replace(&mut self.held, Held::EMPTY)
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(runtime) = &self.runtime {
            self.held.release(runtime);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("global", &self.held.global)
            .field("tenant", &self.held.seat.is_some())
            .finish()
    }
}

/// A request waiting for capacity. Dropping it withdraws from the queue and
/// returns whatever it holds.
pub(crate) struct Ticket {
    runtime: Arc<Runtime>,
    /// The units granted so far (the tenant's, for fairness).
    held: Held,
    priority: Priority,
    waiter: Option<Arc<Waiter>>,
    since: u64,
    deadline: Pin<Box<Sleep>>,
    tenant: Option<TenantKey>,
    observer: Hook,
}

impl Ticket {
    pub(crate) fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, Rejection>> {
        let Some(waiter) = &self.waiter else {
            return Poll::Ready(Ok(self.take_permit()));
        };
        if waiter.register(cx.waker()) {
            self.waiter = None;
            self.held.global = true;
            // Latency is measured from here: the wait in this queue is the
            // shedder's own doing, not the service's.
            let now = self.runtime.clock.now_nanos();
            if self.runtime.controller.is_adaptive() {
                self.held.started = now;
            }
            self.observer.emit(|| {
                Event::new(LayerKind::LoadShed, Decision::Admitted, self.tenant.as_ref())
                    .waited(Some(Duration::from_nanos(now.saturating_sub(self.since))))
            });
            return Poll::Ready(Ok(self.take_permit()));
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.withdraw(true);
        let runtime = Arc::clone(&self.runtime);
        let rejection = runtime.overloaded(
            self.tenant.as_ref(),
            self.priority,
            ShedReason::QueueTimeout,
            runtime.in_flight(),
            runtime.controller.limit(),
        );
        runtime.shed_timeout.fetch_add(1, Ordering::Relaxed);
        let waited = runtime.clock.now_nanos().saturating_sub(self.since);
        runtime.refuse(
            &rejection,
            &runtime.shed_capacity,
            &self.observer,
            Some(Duration::from_nanos(waited)),
        );
        Poll::Ready(Err(rejection))
    }

    fn take_permit(&mut self) -> Permit {
        let held = std::mem::replace(&mut self.held, Held::EMPTY);
        Permit::new(&self.runtime, held)
    }

    fn withdraw(&mut self, timed_out: bool) {
        if let Some(waiter) = self.waiter.take() {
            self.runtime
                .cancel(self.priority, &waiter, self.since, timed_out);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.withdraw(false);
        self.held.release(&self.runtime);
    }
}
