use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Sleep;
use tower_layer::Layer;

use super::service::{ConcurrencyCap, GenericConcurrencyCap};
use crate::clock::Clock;
use crate::common::{Extracted, KeyRules, MissingKey, Refusals};
use crate::error::{ConcurrencyCapped, OverloadCause, Overloaded, Rejection};
use crate::gate::Waiter;
use crate::inflight::{Admission, Global, Seat, Tenants};
use crate::key::{Extension, KeyExtractor, TenantKey};
use crate::observe::{Decision, Event, Hook, LayerKind, Observer, refusal};
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
    observer: Hook,
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
    /// Whether the policy blocks any tenant.
    blocking: AtomicBool,
    policy: ArcSwap<Policy>,
    tenants: Tenants,
    global: Global,
    refusals: Refusals,
    clock: Clock,
    tenant_capped: AtomicU64,
    global_capped: AtomicU64,
    /// About how many tenants the table seats at once.
    max_active: usize,
    no_room: AtomicU64,
    timed_out: AtomicU64,
    key_rejected: AtomicU64,
    blocked: AtomicU64,
}

impl PolicyListener for Runtime {
    fn policy_changed(&self, old: &Policy, new: &Arc<Policy>) {
        self.policy.store(Arc::clone(new));
        self.per_tenant
            .store(new.any_concurrency(), Ordering::Release);
        self.blocking.store(new.any_blocked(), Ordering::Release);
        let shadow = new.is_shadow(LayerKind::ConcurrencyCap);
        if old.is_shadow(LayerKind::ConcurrencyCap) != shadow {
            self.refusals.set_shadow(shadow);
        }
    }
}

impl Runtime {
    fn new(policy: &PolicyHandle, max_active: usize) -> Arc<Self> {
        let seen = policy.current();
        let runtime = Arc::new(Self {
            per_tenant: AtomicBool::new(seen.any_concurrency()),
            blocking: AtomicBool::new(seen.any_blocked()),
            policy: ArcSwap::new(Arc::clone(&seen)),
            tenants: Tenants::new(max_active, false),
            global: Global::default(),
            refusals: Refusals::default(),
            clock: Clock::monotonic(),
            tenant_capped: AtomicU64::new(0),
            global_capped: AtomicU64::new(0),
            max_active,
            no_room: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            key_rejected: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
        });
        runtime
            .refusals
            .set_shadow(seen.is_shadow(LayerKind::ConcurrencyCap));
        let listener: Arc<dyn PolicyListener> = runtime.clone();
        policy.subscribe(&listener, &seen);
        runtime
    }

    fn stats(&self) -> ConcurrencyStats {
        let (tenants_in_flight, tenants_waiting, tracked_tenants) = self.tenants.totals();
        ConcurrencyStats {
            tenant_capped: self.tenant_capped.load(Ordering::Relaxed),
            global_capped: self.global_capped.load(Ordering::Relaxed),
            no_room: self.no_room.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            key_rejected: self.key_rejected.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            shadow_rejected: self.refusals.shadowed.load(Ordering::Relaxed),
            tenants_in_flight,
            global_in_flight: self.global.in_flight(),
            waiting: tenants_waiting + self.global.waiting() as u64,
            tracked_tenants,
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
            .record("concurrency", rejection, counter, self.clock.now_nanos());
        observer.emit(|| refusal(LayerKind::ConcurrencyCap, rejection, shadow, waited));
        shadow
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
            observer: Hook::default(),
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
            observer: self.observer,
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

    /// The `Retry-After` of 503s for the global cap (default one second;
    /// at least one second, since `Retry-After: 0` invites the retry at
    /// once).
    #[must_use]
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.config.retry_after = wait.max(Duration::from_secs(1));
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
    /// finds no free seat near its place is refused with 503, as the server
    /// being over capacity (gRPC `UNAVAILABLE`; counted as `no_room`), not
    /// as over its own cap. Starts a fresh state: call it before cloning
    /// the layer.
    #[must_use]
    pub fn max_active_tenants(mut self, max: usize) -> Self {
        let shadow = self.is_shadow();
        self.runtime = Runtime::new(&self.policy, max);
        self.set_shadow(shadow);
        self
    }

    /// Reports every decision to `observer` (see [`observe`](crate::observe)).
    /// Without a per-tenant cap the layer then also reads the tenant key,
    /// for the reports only.
    #[must_use]
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Hook::new(observer);
        self
    }

    /// Shadow (dry-run) mode: admit every request (counting it as in
    /// flight), but count and log the ones that would have been refused.
    /// [`PolicyHandle::set_shadow`] switches every concurrency cap layer on
    /// the policy at once.
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
        self.runtime.stats()
    }

    /// What [`stats`](Self::stats) reads, for a dashboard.
    pub(crate) fn stats_source(&self) -> impl Fn() -> ConcurrencyStats + Send + Sync + 'static {
        let runtime = Arc::clone(&self.runtime);
        move || runtime.stats()
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
        self.shared_with(self.key.clone())
    }

    /// This layer's state with another key extractor (for
    /// [`FloodgateLayer`](crate::FloodgateLayer)).
    pub(crate) fn shared_with<K2>(&self, key: K2) -> Arc<Shared<K2>> {
        Arc::new(Shared {
            runtime: Arc::clone(&self.runtime),
            key,
            config: self.config,
            observer: self.observer.clone(),
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
            observer: self.observer.clone(),
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
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ConcurrencyStats {
    /// Requests refused because their tenant was at its cap.
    pub tenant_capped: u64,
    /// Requests refused because of the global cap.
    pub global_capped: u64,
    /// Requests refused (503) because so many other tenants had requests
    /// in flight that the table had no seat for theirs
    /// ([`max_active_tenants`](ConcurrencyCapLayer::max_active_tenants)).
    pub no_room: u64,
    /// Of those, requests that waited in the queue until their deadline.
    pub timed_out: u64,
    /// Requests refused for a missing, malformed or oversized key.
    pub key_rejected: u64,
    /// Requests refused because their tenant is blocked.
    pub blocked: u64,
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
pub(crate) struct Shared<K> {
    runtime: Arc<Runtime>,
    key: K,
    config: Config,
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

impl<K> Shared<K> {
    /// The common case, decided without the tenant: no plan caps tenants,
    /// nothing is blocked, nobody observes, no shadow mode, and a unit of
    /// the global cap (if any) is free with nobody waiting. `None`: take
    /// [`Shared::admit`].
    #[inline]
    pub(crate) fn admit_fast(&self) -> Option<Held> {
        let runtime = &self.runtime;
        if self.needs_tenant() {
            return None;
        }
        let Some(cap) = self.config.global_cap else {
            return Some(Held::EMPTY);
        };
        if !runtime.refusals.is_shadow() && runtime.global.try_acquire(cap) {
            Some(Held {
                seat: None,
                global: true,
            })
        } else {
            None
        }
    }

    /// The common case for a tenant whose plan is known (under the same
    /// policy as this layer's): no observer, no shadow mode, and a unit of
    /// the tenant's cap (if its plan has one) and of the global cap (if
    /// any) free, with nobody waiting. `None`: take
    /// [`admit_with`](Self::admit_with), which decides again (nothing is
    /// held).
    #[inline]
    pub(crate) fn admit_plan(&self, plan: &Plan, hash: u64) -> Option<Held> {
        let runtime = &self.runtime;
        if self.observer.is_set() || runtime.refusals.is_shadow() {
            return None;
        }
        let mut held = Held::EMPTY;
        if let Some(cap) = plan.concurrency_limit() {
            match runtime.tenants.acquire(hash, cap, false, 0) {
                Admission::Granted(seat) => held.seat = Some(seat),
                Admission::Wait(..) | Admission::Full | Admission::NoRoom => return None,
            }
        }
        if let Some(cap) = self.config.global_cap {
            if !runtime.global.try_acquire(cap) {
                held.release(runtime);
                return None;
            }
            held.global = true;
        }
        Some(held)
    }

    /// Whether a decision reads the tenant: some plan caps tenants, the
    /// policy blocks some, or an observer wants to know.
    #[inline]
    fn needs_tenant(&self) -> bool {
        self.observer.is_set()
            || self.runtime.per_tenant.load(Ordering::Acquire)
            || self.runtime.blocking.load(Ordering::Acquire)
    }

    /// How this layer finds tenants.
    pub(crate) fn key_rules(&self) -> &KeyRules {
        &self.config.keys
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
    {
        if !self.needs_tenant() {
            return self
                .admit_global(None, None, Held::EMPTY, false)
                .with_runtime(&self.runtime);
        }
        let extracted = Extracted::from_request(&self.key, req);
        self.admit_with(&extracted, || self.key.challenge())
            .with_runtime(&self.runtime)
    }

    /// Decides for a request whose tenant key was `extracted`; `challenge`
    /// is the extractor's, for a 401. The units are returned by whoever
    /// holds the [`Held`], with [`Held::release`].
    pub(crate) fn admit_with(
        &self,
        extracted: &Extracted,
        challenge: impl FnOnce() -> Option<HeaderValue>,
    ) -> Admit<Held> {
        let runtime = &self.runtime;
        if !runtime.per_tenant.load(Ordering::Acquire) {
            // No plan caps tenants: only the global cap applies, and the
            // tenant matters only to a block or an observer, which do not
            // make a missing key an error.
            let blocking = runtime.blocking.load(Ordering::Acquire);
            if !blocking && !self.observer.is_set() {
                return self.admit_global(None, None, Held::EMPTY, false);
            }
            let tenant = extracted.key_within(self.config.keys.max_len);
            if blocking
                && let Some(tenant) = tenant
                && runtime
                    .policy
                    .load()
                    .is_blocked_hashed(tenant.hash, tenant.key.as_bytes())
            {
                return self.refuse_blocked(tenant.key);
            }
            return self.admit_global(tenant.map(|t| t.key), None, Held::EMPTY, false);
        }
        let tenant = match self.config.keys.resolve(extracted, challenge) {
            Ok(tenant) => tenant,
            Err(rejection) => {
                return if runtime.refuse(&rejection, &runtime.key_rejected, &self.observer, None) {
                    Admit::Now(Held::EMPTY)
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
        let (key, hash) = (tenant.key, tenant.hash);
        let mut held = Held::EMPTY;
        let policy = runtime.policy.load();
        if policy.is_blocked_hashed(hash, key.as_bytes()) {
            return self.refuse_blocked(key);
        }
        let plan = policy.plan_for_hashed(hash, key.as_bytes());
        let mut reported = false;
        if let Some(cap) = plan.concurrency_limit() {
            match runtime.tenants.acquire(hash, cap, shadow, max_queue) {
                Admission::Granted(seat) => {
                    held.seat = Some(seat);
                    if shadow && runtime.tenants.in_flight(hash) > cap {
                        let rejection = capped(key, plan, cap, false);
                        runtime.refuse(&rejection, &runtime.tenant_capped, &self.observer, None);
                        reported = true;
                    }
                }
                Admission::Wait(waiter, seat) => {
                    return Admit::Wait(Box::new(Ticket {
                        runtime: Arc::clone(runtime),
                        seat: Some(seat),
                        held,
                        stage: Stage::Tenant,
                        waiter: Some(waiter),
                        deadline: Box::pin(tokio::time::sleep(self.queue_wait())),
                        since: runtime.clock.now_nanos(),
                        tenant: Some(key.clone()),
                        plan: Some(plan.clone()),
                        config: self.config,
                        observer: self.observer.clone(),
                    }));
                }
                Admission::Full => {
                    let rejection = capped(key, plan, cap, false);
                    return if runtime.refuse(&rejection, &runtime.tenant_capped, &self.observer, None) {
                        Admit::Now(held)
                    } else {
                        Admit::Reject(rejection)
                    };
                }
                Admission::NoRoom => {
                    let rejection = Rejection::Overloaded(Box::new(Overloaded {
                        cause: OverloadCause::TenantsInFlight {
                            max: runtime.max_active,
                        },
                        tenant: Some(key.clone()),
                        retry_after: self.config.retry_after,
                    }));
                    return if runtime.refuse(&rejection, &runtime.no_room, &self.observer, None) {
                        Admit::Now(held)
                    } else {
                        Admit::Reject(rejection)
                    };
                }
            }
        }
        self.admit_global(Some(key), Some(plan), held, reported)
    }

    /// Refuses a blocked tenant (shadow mode lets it through).
    #[cold]
    fn refuse_blocked(&self, tenant: &TenantKey) -> Admit<Held> {
        let runtime = &self.runtime;
        let rejection = Rejection::Blocked {
            tenant: tenant.clone(),
        };
        if runtime.refuse(&rejection, &runtime.blocked, &self.observer, None) {
            Admit::Now(Held::EMPTY)
        } else {
            Admit::Reject(rejection)
        }
    }

    /// The global cap's part of `admit`, on top of what `held` holds
    /// already. `reported`: a shadow refusal was already reported for this
    /// request. A refusal returns `held`'s units.
    fn admit_global(
        &self,
        tenant: Option<&TenantKey>,
        plan: Option<&Plan>,
        mut held: Held,
        mut reported: bool,
    ) -> Admit<Held> {
        let runtime = &self.runtime;
        let admitted = |reported: bool| {
            if !reported {
                self.observer.emit(|| {
                    Event::new(LayerKind::ConcurrencyCap, Decision::Admitted, tenant).plan(plan)
                });
            }
        };
        let Some(cap) = self.config.global_cap else {
            admitted(reported);
            return Admit::Now(held);
        };
        let shadow = runtime.refusals.is_shadow();
        let max_queue = match self.config.queue {
            Some((max, _)) if !shadow => max,
            _ => 0,
        };
        match runtime.global.acquire(cap, shadow, max_queue) {
            Admission::Granted(_) => {
                held.global = true;
                if shadow && runtime.global.in_flight() > cap {
                    let rejection = overloaded(tenant, cap, false, &self.config);
                    runtime.refuse(&rejection, &runtime.global_capped, &self.observer, None);
                    reported = true;
                }
                admitted(reported);
                Admit::Now(held)
            }
            Admission::Wait(waiter, _) => Admit::Wait(Box::new(Ticket {
                runtime: Arc::clone(runtime),
                seat: None,
                held,
                stage: Stage::Global,
                waiter: Some(waiter),
                deadline: Box::pin(tokio::time::sleep(self.queue_wait())),
                since: runtime.clock.now_nanos(),
                tenant: tenant.cloned(),
                plan: plan.cloned(),
                config: self.config,
                observer: self.observer.clone(),
            })),
            Admission::Full | Admission::NoRoom => {
                let rejection = overloaded(tenant, cap, false, &self.config);
                if runtime.refuse(&rejection, &runtime.global_capped, &self.observer, None) {
                    Admit::Now(held)
                } else {
                    held.release(runtime);
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

/// The units a request holds while in flight: one of its tenant's count,
/// one of the global count, or both. It does not return them by itself:
/// whoever keeps it calls [`Held::release`] with the runtime they came
/// from (a [`Permit`] does, when dropped).
#[derive(Debug)]
#[must_use = "the units must be released"]
pub(crate) struct Held {
    seat: Option<Seat>,
    global: bool,
}

impl Held {
    /// Nothing held.
    pub(crate) const EMPTY: Self = Self {
        seat: None,
        global: false,
    };

    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.seat.is_none() && !self.global
    }

    /// Returns the units to `runtime`, once: it holds nothing afterwards.
    #[inline]
    pub(crate) fn release(&mut self, runtime: &Runtime) {
        if std::mem::take(&mut self.global) {
            runtime.global.release();
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
    #[inline]
    fn new(runtime: &Arc<Runtime>, held: Held) -> Self {
        Self {
            runtime: (!held.is_empty()).then(|| Arc::clone(runtime)),
            held,
        }
    }

    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
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
            .field("tenant", &self.held.seat.is_some())
            .field("global", &self.held.global)
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
    /// The units granted so far.
    held: Held,
    stage: Stage,
    waiter: Option<Arc<Waiter>>,
    deadline: Pin<Box<Sleep>>,
    /// When it started waiting, on the runtime's clock.
    since: u64,
    tenant: Option<TenantKey>,
    plan: Option<Plan>,
    config: Config,
    observer: Hook,
}

impl Ticket {
    /// Ready with the permit once every unit is granted, or with the
    /// rejection at the deadline.
    pub(crate) fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, Rejection>> {
        loop {
            let Some(waiter) = &self.waiter else {
                let waited = self.waited();
                self.observer.emit(|| {
                    Event::new(
                        LayerKind::ConcurrencyCap,
                        Decision::Admitted,
                        self.tenant.as_ref(),
                    )
                    .plan(self.plan.as_ref())
                    .waited(Some(waited))
                });
                let held = std::mem::replace(&mut self.held, Held::EMPTY);
                return Poll::Ready(Ok(Permit::new(&self.runtime, held)));
            };
            if waiter.register(cx.waker()) {
                self.waiter = None;
                match (self.stage, self.seat) {
                    (Stage::Tenant, Some(seat)) => self.held.seat = Some(seat),
                    _ => self.held.global = true,
                }
                if self.stage == Stage::Tenant
                    && let Some(cap) = self.config.global_cap
                {
                    let max_queue = self.config.queue.map_or(0, |(max, _)| max);
                    match self.runtime.global.acquire(cap, false, max_queue) {
                        Admission::Granted(_) => self.held.global = true,
                        Admission::Wait(waiter, _) => {
                            self.stage = Stage::Global;
                            self.waiter = Some(waiter);
                            continue;
                        }
                        Admission::Full | Admission::NoRoom => {
                            let rejection =
                                overloaded(self.tenant.as_ref(), cap, true, &self.config);
                            self.runtime.refuse(
                                &rejection,
                                &self.runtime.global_capped,
                                &self.observer,
                                Some(self.waited()),
                            );
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
            runtime.refuse(&rejection, counter, &self.observer, Some(self.waited()));
            return Poll::Ready(Err(rejection));
        }
    }

    /// How long it has waited.
    fn waited(&self) -> Duration {
        Duration::from_nanos(self.runtime.clock.now_nanos().saturating_sub(self.since))
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
        self.held.release(&self.runtime);
    }
}
