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

use super::service::{ConcurrencyCap, GenericConcurrencyCap};
use crate::clock::Clock;
use crate::common::{KeyRules, MissingKey, Refusals};
use crate::error::{ConcurrencyCapped, OverloadCause, Overloaded, Rejection};
use crate::gate::Waiter;
use crate::hash::tenant_hash;
use crate::inflight::{Admission, Global, Seat, Tenants};
use crate::key::{Extension, KeyExtractor, TenantKey};
use crate::policy::{Plan, Policy, PolicyHandle, PolicyListener};

/// How many tenants may have requests in flight or waiting at once unless
/// configured.
pub const DEFAULT_MAX_ACTIVE_TENANTS: usize = 16_384;

/// How long clients are told to wait after a 503 unless configured.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Caps the requests each tenant (and everybody) may have in flight. See
/// the [module docs](crate::concurrency).
///
/// Per-tenant caps come from the tenant's [`Plan::concurrency`] under the
/// policy, so tiers, overrides and run-time changes work as for rate
/// limits; a plan without one is not capped per tenant.
pub struct ConcurrencyCapLayer<K = Extension<TenantKey>> {
    policy: PolicyHandle,
    runtime: Arc<Runtime>,
    key: K,
    config: Config,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    keys: KeyRules,
    global_cap: Option<u32>,
    /// Most requests waiting per tenant (and globally), and for how long.
    queue: Option<(usize, Duration)>,
    retry_after: Duration,
}

/// The state every clone and every `layer()` call shares.
pub(crate) struct Runtime {
    /// Whether any plan caps tenants (else the tenant need not be known).
    per_tenant: AtomicBool,
    policy: ArcSwap<Policy>,
    tenants: Tenants,
    global: Global,
    refusals: Refusals,
    clock: Clock,
    tenant_capped: AtomicU64,
    global_capped: AtomicU64,
    timed_out: AtomicU64,
    key_rejected: AtomicU64,
}

impl PolicyListener for Runtime {
    fn policy_changed(&self, _old: &Policy, new: &Arc<Policy>) {
        self.policy.store(Arc::clone(new));
        self.per_tenant
            .store(new.any_concurrency(), Ordering::Release);
    }
}

impl Runtime {
    fn new(policy: &PolicyHandle, max_active: usize) -> Arc<Self> {
        let seen = policy.current();
        let runtime = Arc::new(Self {
            per_tenant: AtomicBool::new(seen.any_concurrency()),
            policy: ArcSwap::new(Arc::clone(&seen)),
            tenants: Tenants::new(max_active, false),
            global: Global::default(),
            refusals: Refusals::default(),
            clock: Clock::monotonic(),
            tenant_capped: AtomicU64::new(0),
            global_capped: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            key_rejected: AtomicU64::new(0),
        });
        let listener: Arc<dyn PolicyListener> = runtime.clone();
        policy.subscribe(&listener, &seen);
        runtime
    }

    /// Counts and logs a refusal; `true` if shadow mode lets it through.
    fn refuse(&self, rejection: &Rejection, counter: &AtomicU64) -> bool {
        self.refusals
            .record("concurrency", rejection, counter, self.clock.now_nanos())
    }
}

impl ConcurrencyCapLayer {
    /// Caps each tenant at its plan's concurrency under `policy` (a
    /// [`Policy`], a [`PolicyHandle`] shared with other layers, or a single
    /// [`Plan`]), with the tenant taken from a [`TenantKey`] request
    /// extension. No global cap and no queue until configured.
    #[must_use]
    pub fn new(policy: impl Into<PolicyHandle>) -> Self {
        let policy = policy.into();
        Self {
            runtime: Runtime::new(&policy, DEFAULT_MAX_ACTIVE_TENANTS),
            policy,
            key: Extension::default(),
            config: Config {
                keys: KeyRules::default(),
                global_cap: None,
                queue: None,
                retry_after: DEFAULT_RETRY_AFTER,
            },
        }
    }
}

impl<K> ConcurrencyCapLayer<K> {
    /// Finds the tenant with `key` (see [`key`](crate::key)).
    #[must_use]
    pub fn key<K2>(self, key: K2) -> ConcurrencyCapLayer<K2> {
        ConcurrencyCapLayer {
            policy: self.policy,
            runtime: self.runtime,
            key,
            config: self.config,
        }
    }

    /// At most `max` requests in flight across all tenants; more get 503
    /// (gRPC UNAVAILABLE) with `Retry-After`.
    #[must_use]
    pub fn global_limit(mut self, max: u32) -> Self {
        self.config.global_cap = Some(max);
        self
    }

    /// Instead of refusing at once, let up to `max_waiting` requests per
    /// tenant (and as many for the global cap) wait, first in first out, for
    /// at most `max_wait` each; then refuse.
    #[must_use]
    pub fn queue(mut self, max_waiting: usize, max_wait: Duration) -> Self {
        self.config.queue = (max_waiting > 0).then_some((max_waiting, max_wait));
        self
    }

    /// The `Retry-After` of 503s for the global cap (default one second).
    #[must_use]
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.config.retry_after = wait;
        self
    }

    /// What to do with requests that carry no key (default: 401).
    #[must_use]
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.config.keys.missing = missing;
        self
    }

    /// Refuse keys longer than `max` bytes with 400 (default
    /// [`DEFAULT_MAX_KEY_LEN`](crate::DEFAULT_MAX_KEY_LEN)).
    #[must_use]
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config.keys.max_len = max;
        self
    }

    /// About how many tenants may have requests in flight or waiting at
    /// once (default [`DEFAULT_MAX_ACTIVE_TENANTS`]); each takes a 16-byte
    /// seat in a table of twice that size, allocated up front. A tenant that
    /// finds no free seat near its place is refused as over its cap. Starts
    /// a fresh state: call it before cloning the layer.
    #[must_use]
    pub fn max_active_tenants(mut self, max: usize) -> Self {
        let shadow = self.is_shadow();
        self.runtime = Runtime::new(&self.policy, max);
        self.set_shadow(shadow);
        self
    }

    /// Shadow (dry-run) mode: admit every request (counting it as in
    /// flight), but count and log the ones that would have been refused.
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
    pub fn stats(&self) -> ConcurrencyStats {
        let r = &*self.runtime;
        let (tenants_in_flight, tenants_waiting, tracked_tenants) = r.tenants.totals();
        ConcurrencyStats {
            tenant_capped: r.tenant_capped.load(Ordering::Relaxed),
            global_capped: r.global_capped.load(Ordering::Relaxed),
            timed_out: r.timed_out.load(Ordering::Relaxed),
            key_rejected: r.key_rejected.load(Ordering::Relaxed),
            shadow_rejected: r.refusals.shadowed.load(Ordering::Relaxed),
            tenants_in_flight,
            global_in_flight: r.global.in_flight(),
            waiting: tenants_waiting + r.global.waiting() as u64,
            tracked_tenants,
        }
    }

    /// The policy the caps come from; change it through the handle.
    #[must_use]
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    /// The same layer for any request type: refused requests fail with a
    /// [`Rejection`], and the permit is held until the response future
    /// completes or is dropped.
    #[must_use]
    pub fn into_generic(self) -> GenericConcurrencyCapLayer<K> {
        GenericConcurrencyCapLayer { layer: self }
    }

    fn shared(&self) -> Arc<Shared<K>>
    where
        K: Clone,
    {
        Arc::new(Shared {
            runtime: Arc::clone(&self.runtime),
            key: self.key.clone(),
            config: self.config,
        })
    }
}

impl<K: Clone> Clone for ConcurrencyCapLayer<K> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            runtime: Arc::clone(&self.runtime),
            key: self.key.clone(),
            config: self.config,
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for ConcurrencyCapLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyCapLayer")
            .field("key", &self.key)
            .field("config", &self.config)
            .field("shadow", &self.is_shadow())
            .finish_non_exhaustive()
    }
}

impl<S, K: Clone> Layer<S> for ConcurrencyCapLayer<K> {
    type Service = ConcurrencyCap<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyCap::new(inner, self.shared())
    }
}

/// [`ConcurrencyCapLayer`] for any request type. Made by
/// [`ConcurrencyCapLayer::into_generic`].
pub struct GenericConcurrencyCapLayer<K = Extension<TenantKey>> {
    layer: ConcurrencyCapLayer<K>,
}

impl<K> GenericConcurrencyCapLayer<K> {
    /// The HTTP layer this was made from (for its settings and stats).
    #[must_use]
    pub fn get_ref(&self) -> &ConcurrencyCapLayer<K> {
        &self.layer
    }
}

impl<K: Clone> Clone for GenericConcurrencyCapLayer<K> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for GenericConcurrencyCapLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GenericConcurrencyCapLayer")
            .field(&self.layer)
            .finish()
    }
}

impl<S, K: Clone> Layer<S> for GenericConcurrencyCapLayer<K> {
    type Service = GenericConcurrencyCap<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        GenericConcurrencyCap::new(inner, self.layer.shared())
    }
}

/// Counters and state of a [`ConcurrencyCapLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConcurrencyStats {
    /// Requests refused because their tenant was at its cap.
    pub tenant_capped: u64,
    /// Requests refused because of the global cap.
    pub global_capped: u64,
    /// Of those, requests that waited in the queue until their deadline.
    pub timed_out: u64,
    /// Requests refused for a missing, malformed or oversized key.
    pub key_rejected: u64,
    /// Requests that shadow mode let through but would have refused.
    pub shadow_rejected: u64,
    /// Requests in flight now, summed over tenants that have a cap.
    pub tenants_in_flight: u64,
    /// Requests in flight now under the global cap (0 without one).
    pub global_in_flight: u32,
    /// Requests waiting in a queue now.
    pub waiting: u64,
    /// Tenants with a request in flight now.
    pub tracked_tenants: usize,
}

/// What the services of one `layer()` call share.
pub(super) struct Shared<K> {
    runtime: Arc<Runtime>,
    key: K,
    config: Config,
}

/// The outcome of `call`.
pub(super) enum Admit {
    Now(Permit),
    Wait(Box<Ticket>),
    Reject(Rejection),
}

impl<K> Shared<K> {
    pub(super) fn admit<Req>(&self, req: &Req) -> Admit
    where
        K: KeyExtractor<Req>,
    {
        let runtime = &self.runtime;
        if !runtime.per_tenant.load(Ordering::Acquire) {
            // No plan caps tenants: only the global cap applies, and the
            // tenant does not matter.
            return self.admit_global(None, Permit::empty());
        }
        let tenant = match self.config.keys.tenant(&self.key, req) {
            Ok(tenant) => tenant,
            Err(rejection) => {
                return if runtime.refuse(&rejection, &runtime.key_rejected) {
                    Admit::Now(Permit::empty())
                } else {
                    Admit::Reject(rejection)
                };
            }
        };
        let shadow = runtime.refusals.is_shadow();
        let max_queue = match self.config.queue {
            Some((max, _)) if !shadow => max,
            _ => 0,
        };
        let bytes = tenant.as_bytes();
        let hash = tenant_hash(bytes);
        let mut permit = Permit::empty();
        let policy = runtime.policy.load();
        let plan = policy.plan_for_hashed(hash, bytes);
        if let Some(cap) = plan.concurrency_limit() {
            match runtime.tenants.acquire(hash, cap, shadow, max_queue) {
                Admission::Granted(seat) => {
                    permit.hold_tenant(runtime, seat);
                    if shadow && runtime.tenants.in_flight(hash) > cap {
                        let rejection = capped(&tenant, plan, cap, false);
                        runtime.refuse(&rejection, &runtime.tenant_capped);
                    }
                }
                Admission::Wait(waiter, seat) => {
                    return Admit::Wait(Box::new(Ticket {
                        runtime: Arc::clone(runtime),
                        seat: Some(seat),
                        permit,
                        stage: Stage::Tenant,
                        waiter: Some(waiter),
                        deadline: Box::pin(tokio::time::sleep(self.queue_wait())),
                        tenant: Some(tenant),
                        plan: Some(plan.clone()),
                        config: self.config,
                    }));
                }
                Admission::Full | Admission::NoRoom => {
                    let rejection = capped(&tenant, plan, cap, false);
                    return if runtime.refuse(&rejection, &runtime.tenant_capped) {
                        Admit::Now(permit)
                    } else {
                        Admit::Reject(rejection)
                    };
                }
            }
        }
        self.admit_global(Some((&tenant, plan)), permit)
    }

    /// The global cap's part of `admit`.
    fn admit_global(&self, tenant: Option<(&TenantKey, &Plan)>, mut permit: Permit) -> Admit {
        let runtime = &self.runtime;
        let Some(cap) = self.config.global_cap else {
            return Admit::Now(permit);
        };
        let shadow = runtime.refusals.is_shadow();
        let max_queue = match self.config.queue {
            Some((max, _)) if !shadow => max,
            _ => 0,
        };
        let key = tenant.map(|(t, _)| t);
        match runtime.global.acquire(cap, shadow, max_queue) {
            Admission::Granted(_) => {
                permit.hold_global(runtime);
                if shadow && runtime.global.in_flight() > cap {
                    let rejection = overloaded(key, cap, false, &self.config);
                    runtime.refuse(&rejection, &runtime.global_capped);
                }
                Admit::Now(permit)
            }
            Admission::Wait(waiter, _) => {
                let (tenant, plan) = tenant.map(|(t, p)| (t.clone(), p.clone())).unzip();
                Admit::Wait(Box::new(Ticket {
                    runtime: Arc::clone(runtime),
                    seat: None,
                    permit,
                    stage: Stage::Global,
                    waiter: Some(waiter),
                    deadline: Box::pin(tokio::time::sleep(self.queue_wait())),
                    tenant,
                    plan,
                    config: self.config,
                }))
            }
            Admission::Full | Admission::NoRoom => {
                let rejection = overloaded(key, cap, false, &self.config);
                if runtime.refuse(&rejection, &runtime.global_capped) {
                    Admit::Now(permit)
                } else {
                    Admit::Reject(rejection)
                }
            }
        }
    }

    fn queue_wait(&self) -> Duration {
        self.config.queue.map_or(Duration::ZERO, |(_, wait)| wait)
    }
}

fn capped(tenant: &TenantKey, plan: &Plan, cap: u32, queued: bool) -> Rejection {
    Rejection::ConcurrencyCapped(Box::new(ConcurrencyCapped {
        tenant: tenant.clone(),
        plan: plan.clone(),
        cap,
        queued,
    }))
}

fn overloaded(tenant: Option<&TenantKey>, cap: u32, queued: bool, config: &Config) -> Rejection {
    Rejection::Overloaded(Box::new(Overloaded {
        cause: OverloadCause::GlobalCap { cap, queued },
        tenant: tenant.cloned(),
        retry_after: config.retry_after,
    }))
}

/// What a request holds while in flight: a unit of its tenant's count, a
/// unit of the global count, or both. Dropping it returns them.
pub(crate) struct Permit {
    runtime: Option<Arc<Runtime>>,
    seat: Option<Seat>,
    global: bool,
}

impl Permit {
    fn empty() -> Self {
        Self {
            runtime: None,
            seat: None,
            global: false,
        }
    }

    fn hold_tenant(&mut self, runtime: &Arc<Runtime>, seat: Seat) {
        self.runtime.get_or_insert_with(|| Arc::clone(runtime));
        self.seat = Some(seat);
    }

    fn hold_global(&mut self, runtime: &Arc<Runtime>) {
        self.runtime.get_or_insert_with(|| Arc::clone(runtime));
        self.global = true;
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.seat.is_none() && !self.global
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(runtime) = &self.runtime {
            if self.global {
                runtime.global.release();
            }
            if let Some(seat) = self.seat {
                runtime.tenants.release(seat);
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("tenant", &self.seat.is_some())
            .field("global", &self.global)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Tenant,
    Global,
}

/// A request waiting in a queue. Dropping it withdraws from the queue and
/// returns whatever it holds.
pub(crate) struct Ticket {
    runtime: Arc<Runtime>,
    /// The tenant's seat, while waiting for a unit of its count.
    seat: Option<Seat>,
    permit: Permit,
    stage: Stage,
    waiter: Option<Arc<Waiter>>,
    deadline: Pin<Box<Sleep>>,
    tenant: Option<TenantKey>,
    plan: Option<Plan>,
    config: Config,
}

impl Ticket {
    /// Ready with the permit once every unit is granted, or with the
    /// rejection at the deadline.
    pub(crate) fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, Rejection>> {
        loop {
            let Some(waiter) = &self.waiter else {
                return Poll::Ready(Ok(std::mem::replace(&mut self.permit, Permit::empty())));
            };
            if waiter.register(cx.waker()) {
                self.waiter = None;
                match (self.stage, self.seat) {
                    (Stage::Tenant, Some(seat)) => self.permit.hold_tenant(&self.runtime, seat),
                    _ => self.permit.hold_global(&self.runtime),
                }
                if self.stage == Stage::Tenant
                    && let Some(cap) = self.config.global_cap
                {
                    let max_queue = self.config.queue.map_or(0, |(max, _)| max);
                    match self.runtime.global.acquire(cap, false, max_queue) {
                        Admission::Granted(_) => self.permit.hold_global(&self.runtime),
                        Admission::Wait(waiter, _) => {
                            self.stage = Stage::Global;
                            self.waiter = Some(waiter);
                            continue;
                        }
                        Admission::Full | Admission::NoRoom => {
                            let rejection =
                                overloaded(self.tenant.as_ref(), cap, true, &self.config);
                            self.runtime
                                .refuse(&rejection, &self.runtime.global_capped);
                            return Poll::Ready(Err(rejection));
                        }
                    }
                }
                continue;
            }
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Out of time: withdraw (a unit granted at this very moment goes
            // back, to the next in line) and refuse.
            self.withdraw();
            let runtime = Arc::clone(&self.runtime);
            runtime.timed_out.fetch_add(1, Ordering::Relaxed);
            let (rejection, counter) = match self.stage {
                Stage::Tenant => match (&self.tenant, &self.plan) {
                    (Some(tenant), Some(plan)) => (
                        capped(tenant, plan, plan.concurrency_limit().unwrap_or(0), true),
                        &runtime.tenant_capped,
                    ),
                    _ => (
                        overloaded(None, 0, true, &self.config),
                        &runtime.global_capped,
                    ),
                },
                Stage::Global => (
                    overloaded(
                        self.tenant.as_ref(),
                        self.config.global_cap.unwrap_or(0),
                        true,
                        &self.config,
                    ),
                    &runtime.global_capped,
                ),
            };
            runtime.refuse(&rejection, counter);
            return Poll::Ready(Err(rejection));
        }
    }

    fn withdraw(&mut self) {
        if let Some(waiter) = self.waiter.take() {
            match (self.stage, self.seat) {
                (Stage::Tenant, Some(seat)) => self.runtime.tenants.cancel(seat, &waiter),
                _ => self.runtime.global.cancel(&waiter),
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.withdraw();
    }
}
