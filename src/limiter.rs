//! The per-tenant rate limiter, usable with or without the layer.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::gcra::{self, Step};
use crate::hash::tenant_hash;
use crate::memory::MemoryStore;
use crate::key::TenantKey;
use crate::policy::{Plan, Policy, PolicyHandle, PolicyListener};
use crate::quota::Quota;

/// How many tenants a limiter tracks unless told otherwise.
pub const DEFAULT_MAX_TENANTS: usize = 1_000_000;

/// A per-tenant GCRA rate limiter.
///
/// Each tenant gets the rate quota of its [`Plan`] under the limiter's
/// [`Policy`](crate::Policy); a request costs one or more units. The state is
/// one atomic theoretical arrival time per tenant, in memory, and at most
/// [`max_tenants`](RateLimiterBuilder::max_tenants) tenants are tracked (see
/// the [crate docs](crate#memory) for how idle tenants are forgotten).
///
/// Cloning is cheap and clones share the state: hand one to the
/// [`RateLimitLayer`](crate::RateLimitLayer) and keep another to check costs
/// that are only known inside a handler.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU32;
/// use tower_floodgate::{Clock, Quota, RateLimiter};
///
/// let (clock, time) = Clock::manual();
/// let limiter = RateLimiter::builder(Quota::per_second(NonZeroU32::new(100).unwrap()))
///     .clock(clock)
///     .build();
///
/// // A purge of 80 URLs costs 80 units.
/// assert!(limiter.check("acme", 80).is_ok());
/// let denied = limiter.check("acme", 80).unwrap_err();
/// assert_eq!(denied.retry_after(), Some(std::time::Duration::from_millis(600)));
/// // Other tenants are unaffected.
/// assert!(limiter.check("globex", 80).is_ok());
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    policy: PolicyHandle,
    /// The limiter, in memory; with Redis, the local fallback.
    store: MemoryStore,
    clock: Clock,
    #[cfg(feature = "redis")]
    remote: Option<Remote>,
}

/// Configures a [`RateLimiter`].
#[must_use]
pub struct RateLimiterBuilder {
    policy: PolicyHandle,
    max_tenants: usize,
    clock: Option<Clock>,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis::RedisStore>,
}

impl RateLimiterBuilder {
    /// The most tenants tracked at once (default [`DEFAULT_MAX_TENANTS`]).
    /// Each costs about 35 bytes at most; the limit holds whatever the number
    /// of distinct keys that arrive. It is rounded up to a multiple of the
    /// number of internal shards.
    pub fn max_tenants(mut self, max: usize) -> Self {
        self.max_tenants = max;
        self
    }

    /// The time source (default [`Clock::monotonic`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Keeps the limits in Redis, for a fleet (feature `redis`): see
    /// [`redis`](crate::redis). The in-memory table then serves as the
    /// local fallback.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(mut self, store: crate::redis::RedisStore) -> Self {
        self.redis = Some(store);
        self
    }

    /// The limiter.
    pub fn build(self) -> RateLimiter {
        let seen = self.policy.current();
        let inner = Arc::new(Inner {
            store: MemoryStore::new(self.max_tenants, Arc::clone(&seen)),
            policy: self.policy,
            clock: self.clock.unwrap_or_default(),
            #[cfg(feature = "redis")]
            remote: self.redis.map(|store| Remote {
                deny_cache: MemoryStore::new(store.config.deny_cache_tenants, Arc::clone(&seen)),
                backend: crate::redis::RedisBackend::new(store),
                log: crate::common::LogGate::default(),
            }),
        });
        let listener: Arc<dyn PolicyListener> = inner.clone();
        inner.policy.subscribe(&listener, &seen);
        RateLimiter { inner }
    }
}

impl fmt::Debug for RateLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("policy", &self.policy)
            .field("max_tenants", &self.max_tenants)
            .field("clock", &self.clock)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter applying `policy` (a [`Policy`](crate::Policy), a
    /// [`PolicyHandle`] to change it later, a single [`Plan`] or a [`Quota`]
    /// for everyone), with the default tenant cap and clock.
    #[must_use]
    pub fn new(policy: impl Into<PolicyHandle>) -> Self {
        Self::builder(policy).build()
    }

    /// Starts configuring a limiter applying `policy`.
    pub fn builder(policy: impl Into<PolicyHandle>) -> RateLimiterBuilder {
        RateLimiterBuilder {
            policy: policy.into(),
            max_tenants: DEFAULT_MAX_TENANTS,
            clock: None,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// Charges `tenant` `cost` units if its quota allows, now, in memory.
    ///
    /// With a [Redis store](RateLimiterBuilder::redis) this cannot ask
    /// Redis: it answers from the local deny cache, then as if Redis were
    /// unreachable (the failure policy). Use [`check_async`](Self::check_async)
    /// there.
    ///
    /// A cost of zero is always admitted (unless the tenant is over a quota
    /// that shrank at run time) and charges nothing: use it to read a
    /// tenant's state. A tenant whose plan has no rate limit is always
    /// admitted.
    ///
    /// # Errors
    ///
    /// [`Denied`] when the quota does not allow it now; nothing is charged.
    /// [`Denied::retry_after`] says when the same cost will be admitted, or
    /// `None` when it never will (the cost exceeds the burst).
    pub fn check(&self, tenant: impl AsRef<[u8]>, cost: u32) -> Result<Allowed, Denied> {
        let tenant = tenant.as_ref();
        self.decide(tenant_hash(tenant), tenant, cost, |_, result| result)
    }

    /// Decides, then hands the plan in force and the result to `f` while the
    /// policy is still loaded (so that headers can name the plan without
    /// cloning it). On Redis this is the local decision: the deny cache,
    /// then the failure policy.
    #[inline]
    pub(crate) fn decide<R>(
        &self,
        hash: u64,
        tenant: &[u8],
        cost: u32,
        f: impl FnOnce(&Plan, Result<Allowed, Denied>) -> R,
    ) -> R {
        let inner = &*self.inner;
        let snapshot = inner.store.snapshot();
        let plan = snapshot.extra.plan_for_hashed(hash, tenant);
        if snapshot.extra.is_blocked_hashed(hash, tenant) {
            return f(plan, Err(blocked(plan, cost, inner.clock.now_nanos())));
        }
        let Some(quota) = plan.rate_quota() else {
            return f(plan, Ok(Allowed { usage: None, fallback: false }));
        };
        let now = inner.clock.now_nanos();
        #[cfg(feature = "redis")]
        if let Some(remote) = &inner.remote {
            let result = match remote.denied_locally(hash, now, cost, quota) {
                Some(denied) => Err(denied),
                None => self.fallback(&snapshot, hash, now, cost, quota),
            };
            return f(plan, result);
        }
        let (step, tat) = inner.store.check(&snapshot, hash, now, cost, quota);
        f(plan, outcome(step, tat, now, cost, quota))
    }

    /// The policy in force and the tenant table, for decisions that look
    /// the plan up once and use it for more than the rate (a
    /// [`FloodgateLayer`](crate::FloodgateLayer)).
    #[inline]
    pub(crate) fn snapshot(&self) -> PolicySnapshot {
        self.inner.store.snapshot()
    }

    /// The in-memory decision for a tenant whose plan, under `snapshot`'s
    /// policy, has `quota`, as the store made it: an admission needs
    /// nothing more unless somebody reads its usage. `None` from a limiter
    /// on Redis, which never decides here.
    #[inline]
    pub(crate) fn step_in(
        &self,
        snapshot: &PolicySnapshot,
        hash: u64,
        cost: u32,
        quota: &Quota,
    ) -> Option<InMemory> {
        let inner = &*self.inner;
        #[cfg(feature = "redis")]
        if inner.remote.is_some() {
            return None;
        }
        let now = inner.clock.now_nanos();
        let (step, tat) = inner.store.check(snapshot, hash, now, cost, quota);
        Some(InMemory {
            step,
            tat,
            now,
            cost,
            quota: *quota,
        })
    }

    /// Decides, at once when the store is in memory (or the deny cache
    /// already knows), or after a round trip to Redis.
    #[inline]
    pub(crate) fn decide_deferred<R>(
        &self,
        hash: u64,
        tenant: &TenantKey,
        cost: u32,
        f: impl FnOnce(&Plan, Result<Allowed, Denied>) -> R + Send + 'static,
    ) -> Deferred<R>
    where
        R: Send + 'static,
    {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.inner.remote {
            let snapshot = self.inner.store.snapshot();
            let plan = snapshot.extra.plan_for_hashed(hash, tenant.as_bytes());
            if snapshot.extra.is_blocked_hashed(hash, tenant.as_bytes()) {
                let now = self.inner.clock.now_nanos();
                return Deferred::Now(f(plan, Err(blocked(plan, cost, now))));
            }
            let Some(quota) = plan.rate_quota().copied() else {
                return Deferred::Now(f(plan, Ok(Allowed { usage: None, fallback: false })));
            };
            let now = self.inner.clock.now_nanos();
            if let Some(denied) = remote.denied_locally(hash, now, cost, &quota) {
                return Deferred::Now(f(plan, Err(denied)));
            }
            if cost > quota.burst() {
                return Deferred::Now(f(plan, outcome(Step::Impossible, 0, now, cost, &quota)));
            }
            let plan = plan.clone();
            drop(snapshot);
            let this = self.clone();
            let tenant = tenant.clone();
            return Deferred::Later(Box::pin(async move {
                let result = this.decide_remote(hash, &tenant, cost, &quota).await;
                f(&plan, result)
            }));
        }
        Deferred::Now(self.decide(hash, tenant.as_bytes(), cost, f))
    }

    /// Charges `tenant` `cost` units, asking the store whatever it is: at
    /// once in memory, with a round trip to Redis (or its failure policy)
    /// otherwise.
    ///
    /// # Errors
    ///
    /// [`Denied`], as for [`check`](Self::check).
    pub async fn check_async(
        &self,
        tenant: impl AsRef<[u8]>,
        cost: u32,
    ) -> Result<Allowed, Denied> {
        let tenant = TenantKey::copy_from_slice(tenant.as_ref());
        let hash = tenant_hash(tenant.as_bytes());
        match self.decide_deferred(hash, &tenant, cost, |_, result| result) {
            Deferred::Now(result) => result,
            Deferred::Later(future) => future.await,
        }
    }

    /// Charges `tenant` `cost` units like [`check`](Self::check), for costs
    /// known only inside a handler (a purge's number of URLs); a refusal is
    /// the [`Rejection`](crate::Rejection) the layer would answer with (429
    /// naming the plan, 403 for a blocked tenant), ready to be sent with
    /// [`Rejection::to_http_response`](crate::Rejection::to_http_response)
    /// or, with axum, returned from the handler.
    ///
    /// On a Redis limiter this decides without Redis: use
    /// [`admit_async`](Self::admit_async) there.
    ///
    /// # Errors
    ///
    /// The [`Rejection`](crate::Rejection) when the quota does not allow it
    /// now.
    pub fn admit(&self, tenant: &TenantKey, cost: u32) -> Result<Allowed, crate::Rejection> {
        let bytes = tenant.as_bytes();
        self.decide(tenant_hash(bytes), bytes, cost, |plan, result| {
            rejection(tenant, plan, result)
        })
    }

    /// [`admit`](Self::admit), asking the store whatever it is (a round trip
    /// to Redis, or its failure policy).
    ///
    /// # Errors
    ///
    /// As for [`admit`](Self::admit).
    pub async fn admit_async(
        &self,
        tenant: &TenantKey,
        cost: u32,
    ) -> Result<Allowed, crate::Rejection> {
        let hash = tenant_hash(tenant.as_bytes());
        let owned = tenant.clone();
        match self.decide_deferred(hash, tenant, cost, move |plan, result| {
            rejection(&owned, plan, result)
        }) {
            Deferred::Now(result) => result,
            Deferred::Later(future) => future.await,
        }
    }

    /// Whether decisions go to a remote store (and may take a round trip).
    #[inline]
    pub(crate) fn is_remote(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.inner.remote.is_some();
        #[cfg(not(feature = "redis"))]
        return false;
    }

    /// The policy this limiter applies; change it through the handle.
    #[must_use]
    pub fn policy(&self) -> &PolicyHandle {
        &self.inner.policy
    }

    /// The limiter's clock.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// How many tenants are tracked now. Idle tenants may still be counted
    /// until room is needed or [`evict_idle`](Self::evict_idle) runs.
    #[must_use]
    pub fn tracked_tenants(&self) -> usize {
        self.inner.store.len()
    }

    /// The most tenants tracked at once.
    #[must_use]
    pub fn max_tenants(&self) -> usize {
        self.inner.store.max_tenants()
    }

    /// Forgets every idle tenant (one whose bucket is full again, which
    /// changes no decision) and returns memory to the allocator, one shard at
    /// a time. Never required: the limiter makes room by itself. Returns how
    /// many tenants were forgotten.
    pub fn evict_idle(&self) -> usize {
        self.inner.store.evict_idle(self.inner.clock.now_nanos())
    }

    /// Counters of the tenant table.
    #[must_use]
    pub fn stats(&self) -> RateLimiterStats {
        let evictions = self.inner.store.evictions();
        RateLimiterStats {
            tracked_tenants: self.tracked_tenants(),
            max_tenants: self.max_tenants(),
            evicted_idle: evictions.idle,
            evicted_active: evictions.active,
            #[cfg(feature = "redis")]
            redis: self.redis_stats(),
        }
    }
}

impl PolicyListener for Inner {
    fn policy_changed(&self, old: &Policy, new: &Arc<Policy>) {
        self.store.set_policy(Arc::clone(new));
        self.store.rescale(old, new, self.clock.now_nanos());
        // What Redis said was under the old quotas.
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            remote.deny_cache.evict_idle(u64::MAX);
        }
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("policy", &self.inner.policy)
            .field("max_tenants", &self.max_tenants())
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// Counters of a [`RateLimiter`]'s tenant table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RateLimiterStats {
    /// Tenants tracked now.
    pub tracked_tenants: usize,
    /// The cap on tracked tenants.
    pub max_tenants: usize,
    /// Idle tenants forgotten (no decision changed).
    pub evicted_idle: u64,
    /// Tenants still in debt forgotten because the table was full of them
    /// (a sign of key rotation or of a cap set too low). Each such tenant
    /// starts again from a full bucket.
    pub evicted_active: u64,
    /// The Redis store's counters, for a limiter on Redis.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub redis: Option<crate::redis::RedisStats>,
}

/// A tenant's bucket after a decision. The figures are computed when asked
/// for, so a decision that nobody inspects costs nothing extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    quota: Quota,
    tat: u64,
    now: u64,
}

impl Usage {
    #[inline]
    fn at(tat: u64, now: u64, quota: &Quota) -> Self {
        Self {
            quota: *quota,
            tat,
            now,
        }
    }

    fn level(&self) -> gcra::Level {
        gcra::level(self.tat, self.now, &self.quota)
    }

    /// The quota that applied.
    #[must_use]
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Units that could be spent right now.
    #[must_use]
    pub fn remaining(&self) -> u32 {
        self.level().remaining
    }

    /// Time until one more unit is available (zero when the bucket is full).
    #[must_use]
    pub fn next_unit_after(&self) -> Duration {
        Duration::from_nanos(self.level().next_unit)
    }

    /// Time until the bucket is full again.
    #[must_use]
    pub fn full_after(&self) -> Duration {
        Duration::from_nanos(self.level().full)
    }
}

/// An admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    usage: Option<Usage>,
    fallback: bool,
}

impl Allowed {
    /// Whether the decision was made without the rate limit store (Redis
    /// did not answer in time, and the failure policy decided).
    #[must_use]
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// The tenant's bucket after this request; `None` when its plan has no
    /// rate limit.
    #[must_use]
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
}

/// A refused request: nothing was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Denied {
    usage: Usage,
    cost: u32,
    retry_after: Option<Duration>,
    cause: Cause,
    fallback: bool,
}

/// What refused a request, besides its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The quota (see `retry_after`).
    Rate,
    /// The store could not be asked (fail-closed).
    Unavailable,
    /// The store could not be asked, and the request costs more than this
    /// node's share of the quota ever admits (fail-local).
    OverLocalShare,
    /// The policy blocks the tenant.
    Blocked,
}

impl Denied {
    /// Whether the decision was made without the rate limit store (Redis
    /// did not answer in time, and the failure policy decided).
    #[must_use]
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// When the same cost will be admitted, if nothing else is spent
    /// meanwhile; `None` if never: the cost exceeds the quota's burst.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Why the request was refused.
    #[must_use]
    pub fn reason(&self) -> DenyReason {
        match self.retry_after {
            _ if matches!(self.cause, Cause::Unavailable | Cause::OverLocalShare) => {
                DenyReason::StoreUnavailable
            }
            _ if self.cause == Cause::Blocked => DenyReason::Blocked,
            Some(_) => DenyReason::OverRate,
            None => DenyReason::CostExceedsBurst,
        }
    }

    /// The cost that was asked for.
    #[must_use]
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// The tenant's bucket, unchanged by this request.
    #[must_use]
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    pub(crate) fn describe(&self) -> String {
        if self.cause == Cause::Blocked {
            return "the tenant is blocked".to_owned();
        }
        if self.cause == Cause::Unavailable {
            return "the rate limit store cannot be reached, and the limiter fails closed".to_owned();
        }
        if self.cause == Cause::OverLocalShare {
            return "the rate limit store cannot be reached, and this request costs more than \
                    this node's share of the quota admits meanwhile"
                .to_owned();
        }
        match self.retry_after {
            Some(wait) => {
                // Whole milliseconds, rounded up, without float formatting
                // (this is on the path of every refusal).
                let ms = wait.as_nanos().div_ceil(1_000_000);
                format!(
                    "over the rate quota ({}); a request costing {} is admitted again in {}.{:03}s",
                    self.usage.quota,
                    self.cost,
                    ms / 1000,
                    ms % 1000
                )
            }
            None => format!(
                "a request costing {} can never be admitted: the quota ({}) allows at most {} at once",
                self.cost,
                self.usage.quota,
                self.usage.quota.burst()
            ),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The tenant spent its quota; it is admitted again after a wait.
    OverRate,
    /// The request costs more than the quota's burst: never admitted.
    CostExceedsBurst,
    /// The rate limit store (Redis) could not be asked, and the limiter
    /// fails closed. Answered with 503.
    StoreUnavailable,
    /// The policy [blocks](crate::PolicyHandle::block) the tenant. Answered
    /// with 403.
    Blocked,
}

/// The refusal of a blocked tenant: nothing is charged; its bucket is shown
/// as it is (as an unlimited one if its plan has no rate limit).
fn blocked(plan: &Plan, cost: u32, now: u64) -> Denied {
    const UNLIMITED: Quota = Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX);
    Denied {
        usage: Usage::at(now, now, plan.rate_quota().unwrap_or(&UNLIMITED)),
        cost,
        retry_after: None,
        cause: Cause::Blocked,
        fallback: false,
    }
}

/// What a decision reads: the tenant table, and the policy in force.
pub(crate) type PolicySnapshot = arc_swap::Guard<Arc<crate::table::Snapshot<Arc<Policy>>>>;

/// A decision made at once, or one that needs a round trip.
pub(crate) enum Deferred<R> {
    Now(R),
    #[cfg_attr(not(feature = "redis"), expect(dead_code, reason = "only Redis defers"))]
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = R> + Send>>),
}

/// A limiter's result with a refusal as the layer's rejection.
fn rejection(
    tenant: &TenantKey,
    plan: &Plan,
    result: Result<Allowed, Denied>,
) -> Result<Allowed, crate::Rejection> {
    result.map_err(|denied| {
        if denied.reason() == DenyReason::Blocked {
            crate::Rejection::Blocked {
                tenant: tenant.clone(),
            }
        } else {
            crate::Rejection::RateLimited(crate::RateLimited::new(
                tenant.clone(),
                plan.clone(),
                denied,
            ))
        }
    })
}

/// An in-memory decision, as the store made it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InMemory {
    step: Step,
    tat: u64,
    now: u64,
    cost: u32,
    quota: Quota,
}

impl InMemory {
    /// Whether the request was admitted.
    #[inline]
    pub(crate) fn admitted(&self) -> bool {
        matches!(self.step, Step::Allow { .. })
    }

    /// The verdict.
    #[inline]
    pub(crate) fn outcome(self) -> Result<Allowed, Denied> {
        outcome(self.step, self.tat, self.now, self.cost, &self.quota)
    }
}

/// The result of a GCRA step for `cost`, with the bucket it leaves.
fn outcome(step: Step, tat: u64, now: u64, cost: u32, quota: &Quota) -> Result<Allowed, Denied> {
    let usage = Usage::at(tat, now, quota);
    match step {
        Step::Allow { .. } => Ok(Allowed { usage: Some(usage), fallback: false }),
        Step::Deny { wait } => Err(Denied {
            usage,
            cost,
            retry_after: Some(Duration::from_nanos(wait)),
            cause: Cause::Rate,
            fallback: false,
        }),
        Step::Impossible => Err(Denied {
            usage,
            cost,
            retry_after: None,
            cause: Cause::Rate,
            fallback: false,
        }),
    }
}

/// The Redis side of a limiter, and what it keeps locally.
#[cfg(feature = "redis")]
struct Remote {
    backend: crate::redis::RedisBackend,
    /// What Redis said of recently refused tenants: their TAT, on the local
    /// clock.
    deny_cache: MemoryStore,
    log: crate::common::LogGate,
}

#[cfg(feature = "redis")]
impl Remote {
    /// A refusal the deny cache can make without asking Redis: the TAT
    /// Redis reported only moves forward, so this is never wrong.
    #[inline]
    fn denied_locally(&self, hash: u64, now: u64, cost: u32, quota: &Quota) -> Option<Denied> {
        let tat = self.deny_cache.peek(hash)?;
        match gcra::step(tat, now, cost, quota) {
            step @ Step::Deny { .. } => {
                self.backend
                    .counters
                    .denied_locally
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                outcome(step, tat, now, cost, quota).err()
            }
            _ => None,
        }
    }
}

#[cfg(feature = "redis")]
impl RateLimiter {
    async fn decide_remote(
        &self,
        hash: u64,
        tenant: &TenantKey,
        cost: u32,
        quota: &Quota,
    ) -> Result<Allowed, Denied> {
        let inner = &*self.inner;
        let Some(remote) = &inner.remote else {
            return Ok(Allowed { usage: None, fallback: false });
        };
        let backend = &remote.backend;
        let start = inner.clock.now_nanos();
        let reason = if backend.breaker.allows(start) {
            match backend.step(tenant, quota, cost).await {
                Ok(answer) => {
                    backend.breaker.success();
                    let now = inner.clock.now_nanos();
                    let tat = now.saturating_add(answer.debt);
                    if answer.allowed {
                        return Ok(Allowed {
                            usage: Some(Usage::at(tat, now, quota)),
                            fallback: false,
                        });
                    }
                    remote.deny_cache.raise(hash, tat, now);
                    return Err(Denied {
                        usage: Usage::at(tat, now, quota),
                        cost,
                        retry_after: Some(Duration::from_nanos(answer.wait.max(1))),
                        cause: Cause::Rate,
            fallback: false,
                    });
                }
                Err(reason) => {
                    backend.failed(inner.clock.now_nanos());
                    Some(reason)
                }
            }
        } else {
            None
        };
        let now = inner.clock.now_nanos();
        if let Some(suppressed) = remote.log.pass(now) {
            tracing::warn!(
                target: "tower_floodgate::redis",
                tenant = %tenant,
                policy = ?backend.config().on_failure,
                suppressed,
                "deciding without Redis: {}",
                reason.as_deref().unwrap_or("the circuit breaker is open")
            );
        }
        let snapshot = inner.store.snapshot();
        self.fallback(&snapshot, hash, now, cost, quota)
    }

    /// The failure policy's decision.
    fn fallback(
        &self,
        snapshot: &crate::table::Snapshot<Arc<Policy>>,
        hash: u64,
        now: u64,
        cost: u32,
        quota: &Quota,
    ) -> Result<Allowed, Denied> {
        use crate::redis::FailurePolicy;
        use std::sync::atomic::Ordering::Relaxed;
        let inner = &*self.inner;
        let Some(remote) = &inner.remote else {
            return Ok(Allowed { usage: None, fallback: false });
        };
        let counters = &remote.backend.counters;
        match remote.backend.config().on_failure {
            FailurePolicy::Open => {
                counters.fallback_open.fetch_add(1, Relaxed);
                Ok(Allowed {
                    usage: None,
                    fallback: true,
                })
            }
            FailurePolicy::Closed => {
                counters.fallback_closed.fetch_add(1, Relaxed);
                Err(Denied {
                    usage: Usage::at(now, now, quota),
                    cost,
                    retry_after: Some(Duration::from_secs(1)),
                    cause: Cause::Unavailable,
                    fallback: true,
                })
            }
            FailurePolicy::Local { share } => {
                counters.fallback_local.fetch_add(1, Relaxed);
                let local = quota.scaled(share);
                if cost > local.burst() {
                    // Within the whole quota's burst (checked before asking
                    // the store), but over this node's share of it: it will
                    // be admitted once the store answers again, never here.
                    return Err(Denied {
                        usage: Usage::at(now, now, &local),
                        cost,
                        retry_after: Some(Duration::from_secs(1)),
                        cause: Cause::OverLocalShare,
                        fallback: true,
                    });
                }
                let (step, tat) = inner.store.check(snapshot, hash, now, cost, &local);
                outcome(step, tat, now, cost, &local)
                    .map(|a| Allowed { fallback: true, ..a })
                    .map_err(|d| Denied { fallback: true, ..d })
            }
        }
    }

    /// Counters of the Redis store; `None` for an in-memory limiter.
    #[must_use]
    pub fn redis_stats(&self) -> Option<crate::redis::RedisStats> {
        self.inner.remote.as_ref().map(|r| r.backend.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Plan, Policy};
    use std::num::NonZeroU32;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    #[test]
    fn admit_refuses_with_the_layers_rejection() {
        let (clock, _time) = Clock::manual();
        let policy = crate::PolicyHandle::new(Policy::new(
            Plan::new("items").rate(Quota::per_second(nz(10))),
        ));
        let limiter = RateLimiter::builder(policy.clone()).clock(clock).build();
        let tenant = TenantKey::from("acme");
        assert!(limiter.admit(&tenant, 10).is_ok());
        let refused = limiter.admit(&tenant, 5).err();
        let limited = refused.as_ref().and_then(crate::Rejection::as_rate_limited);
        assert_eq!(limited.map(|l| l.plan().name()), Some("items"));
        assert_eq!(limited.map(|l| l.denied().cost()), Some(5));
        let response = refused.map(|r| r.to_http_response());
        assert_eq!(response.map(|r| r.status().as_u16()), Some(429));
        policy.block("acme");
        assert!(matches!(
            limiter.admit(&tenant, 1),
            Err(crate::Rejection::Blocked { .. })
        ));
        assert!(limiter.admit(&TenantKey::from("other"), 1).is_ok());
    }

    #[test]
    fn denied_reports_wait_and_reason() {
        let (clock, time) = Clock::manual();
        let limiter = RateLimiter::builder(Quota::per_second(nz(10)).allow_burst(nz(2)))
            .clock(clock)
            .build();
        let ok = limiter
            .check("a", 2)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(ok.usage().map(Usage::remaining), Some(0));
        let denied = limiter.check("a", 1).err();
        assert_eq!(
            denied.and_then(|d| d.retry_after()),
            Some(Duration::from_millis(100))
        );
        assert_eq!(denied.map(|d| d.reason()), Some(DenyReason::OverRate));
        let never = limiter.check("a", 3).err();
        assert_eq!(
            never.map(|d| d.reason()),
            Some(DenyReason::CostExceedsBurst)
        );
        assert!(never.is_some_and(|d| d.to_string().contains("never")));
        time.advance(Duration::from_millis(100));
        assert!(limiter.check("a", 1).is_ok());
    }

    #[test]
    fn unlimited_plans_are_not_tracked() {
        let limiter = RateLimiter::new(Plan::new("internal"));
        for _ in 0..1000 {
            assert!(
                limiter
                    .check("x", 1_000_000)
                    .is_ok_and(|a| a.usage().is_none())
            );
        }
        assert_eq!(limiter.tracked_tenants(), 0);
    }

    #[test]
    fn policy_change_applies_to_the_next_check() {
        let (clock, time) = Clock::manual();
        let limiter = RateLimiter::builder(
            Policy::builder(Plan::new("free").rate(Quota::per_second(nz(1))))
                .tier(Plan::new("pro").rate(Quota::per_second(nz(100))))
                .build()
                .unwrap_or_else(|e| unreachable!("{e}")),
        )
        .clock(clock)
        .build();
        assert!(limiter.check("a", 1).is_ok());
        assert!(limiter.check("a", 1).is_err());
        limiter
            .policy()
            .update(|p| p.assign("a", "pro"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        // The tenant keeps the units it has used: free's one unit is one of
        // pro's hundred. So pro admits 99 more at once.
        let admitted = (0..200).filter(|_| limiter.check("a", 1).is_ok()).count();
        assert_eq!(admitted, 99);
        // And a downgrade throttles at once: 100 units in use on pro are
        // the whole burst of 1 on free, for a second.
        limiter
            .policy()
            .update(|p| p.remove("a"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(limiter.check("a", 1).is_err());
        time.advance(Duration::from_millis(999));
        assert!(limiter.check("a", 1).is_err());
        time.advance(Duration::from_millis(1));
        assert!(limiter.check("a", 1).is_ok());
        // Changing a tier's quota rescales everyone on it.
        limiter
            .policy()
            .update(|p| p.default_plan(Plan::new("free").rate(Quota::per_second(nz(10)))))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let admitted = (0..20).filter(|_| limiter.check("a", 1).is_ok()).count();
        assert_eq!(admitted, 9);
    }
}
