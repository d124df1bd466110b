use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use tower_layer::Layer;

use super::service::{GenericRateLimit, RateLimit};
use crate::cost::{RequestCost, UnitCost};
use crate::error::{RateLimited, Rejection};
use crate::common::{Extracted, KeyRules, MissingKey, Refusals};
use crate::hash::tenant_hash;
use crate::key::{Extension, KeyExtractor, TenantKey};
use crate::limiter::{
    Allowed, Deferred, Denied, DenyReason, InMemory, PolicySnapshot, RateLimiter, RateLimiterStats,
};
use crate::observe::{Decision, Event, Hook, LayerKind, Observer, refusal};
use crate::policy::{Plan, Policy, PolicyListener};
use crate::response::ratelimit_value;

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    keys: KeyRules,
    success_headers: bool,
}

/// Applies per-tenant rate limits to HTTP requests. See the
/// [module docs](crate::rate_limit).
///
/// `K` finds the tenant (default: a [`TenantKey`] request extension set by
/// your authentication layer), `C` prices the request (default: 1).
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU32;
/// use http::HeaderName;
/// use tower_floodgate::{cost, key, MissingKey, Quota, RateLimitLayer, RateLimiter};
///
/// let limiter = RateLimiter::new(Quota::per_minute(NonZeroU32::new(600).unwrap()));
/// let layer = RateLimitLayer::new(limiter)
///     .key(key::bearer())
///     .cost(cost::header(HeaderName::from_static("x-purge-count")))
///     .on_missing_key(MissingKey::Anonymous)
///     .success_headers(true);
/// ```
pub struct RateLimitLayer<K = Extension<TenantKey>, C = UnitCost> {
    limiter: RateLimiter,
    key: K,
    cost: C,
    config: Config,
    state: Arc<LayerState>,
    observer: Hook,
}

impl RateLimitLayer {
    /// A layer that charges each request one unit of its tenant's quota in
    /// `limiter`, with the tenant taken from a [`TenantKey`] request
    /// extension.
    #[must_use]
    pub fn new(limiter: RateLimiter) -> Self {
        let state = Arc::new(LayerState::default());
        let policy = limiter.policy();
        let seen = policy.current();
        state.refusals.set_shadow(seen.is_shadow(LayerKind::RateLimit));
        let listener: Arc<dyn PolicyListener> = state.clone();
        policy.subscribe(&listener, &seen);
        Self {
            limiter,
            key: Extension::default(),
            cost: UnitCost,
            config: Config {
                keys: KeyRules::default(),
                success_headers: false,
            },
            state,
            observer: Hook::default(),
        }
    }
}

impl<K, C> RateLimitLayer<K, C> {
    /// Finds the tenant with `key` (see [`key`](crate::key)).
    #[must_use]
    pub fn key<K2>(self, key: K2) -> RateLimitLayer<K2, C> {
        RateLimitLayer {
            limiter: self.limiter,
            key,
            cost: self.cost,
            config: self.config,
            state: self.state,
            observer: self.observer,
        }
    }

    /// Prices requests with `cost` (see [`cost`](crate::cost)).
    #[must_use]
    pub fn cost<C2>(self, cost: C2) -> RateLimitLayer<K, C2> {
        RateLimitLayer {
            limiter: self.limiter,
            key: self.key,
            cost,
            config: self.config,
            state: self.state,
            observer: self.observer,
        }
    }

    /// What to do with requests that carry no key (default: 401).
    #[must_use]
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.config.keys.missing = missing;
        self
    }

    /// Refuse keys longer than `max` bytes with 400, before anything is
    /// stored or hashed (default [`DEFAULT_MAX_KEY_LEN`](crate::DEFAULT_MAX_KEY_LEN)).
    #[must_use]
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config.keys.max_len = max;
        self
    }

    /// Also send `RateLimit-Policy` and `RateLimit` on admitted responses
    /// (default: only on 429s). Costs a small allocation per request.
    #[must_use]
    pub fn success_headers(mut self, enabled: bool) -> Self {
        self.config.success_headers = enabled;
        self
    }

    /// Reports every decision to `observer` (see [`observe`](crate::observe)).
    /// Combine several with a tuple.
    #[must_use]
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Hook::new(observer);
        self
    }

    /// Shadow (dry-run) mode: admit every request, but count and log the
    /// ones that would have been refused. Can be switched at run time with
    /// [`set_shadow`](Self::set_shadow), or for every rate limit layer on
    /// the policy with [`PolicyHandle::set_shadow`](crate::PolicyHandle::set_shadow).
    #[must_use]
    pub fn shadow(self, enabled: bool) -> Self {
        self.set_shadow(enabled);
        self
    }

    /// Switches shadow mode on or off for every service made by this layer
    /// and its clones, from the next request on.
    pub fn set_shadow(&self, enabled: bool) {
        self.state.refusals.set_shadow(enabled);
    }

    /// Whether shadow mode is on.
    #[must_use]
    pub fn is_shadow(&self) -> bool {
        self.state.refusals.is_shadow()
    }

    /// The limiter this layer charges.
    #[must_use]
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Counters of this layer (shared by its clones) and of its limiter.
    #[must_use]
    pub fn stats(&self) -> RateLimitStats {
        self.state.stats(self.limiter.stats())
    }

    /// What [`stats`](Self::stats) reads, for a dashboard.
    pub(crate) fn stats_source(&self) -> impl Fn() -> RateLimitStats + Send + Sync + 'static {
        let (state, limiter) = (Arc::clone(&self.state), self.limiter.clone());
        move || state.stats(limiter.stats())
    }

    /// The same layer for any request type, failing refused requests with a
    /// [`Rejection`] error instead of answering them.
    #[must_use]
    pub fn into_generic(self) -> GenericRateLimitLayer<K, C> {
        GenericRateLimitLayer { layer: self }
    }

    fn shared(&self) -> Arc<Shared<K, C>>
    where
        K: Clone,
        C: Clone,
    {
        self.shared_with(self.key.clone(), self.cost.clone())
    }

    /// The cost extractor.
    pub(crate) fn cost_extractor(&self) -> &C {
        &self.cost
    }

    /// This layer's state with another key extractor and cost (for
    /// [`FloodgateLayer`](crate::FloodgateLayer)).
    pub(crate) fn shared_with<K2, C2>(&self, key: K2, cost: C2) -> Arc<Shared<K2, C2>> {
        Arc::new(Shared {
            limiter: self.limiter.clone(),
            key,
            cost,
            config: self.config,
            state: Arc::clone(&self.state),
            observer: self.observer.clone(),
        })
    }
}

impl<K: Clone, C: Clone> Clone for RateLimitLayer<K, C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
            config: self.config,
            state: Arc::clone(&self.state),
            observer: self.observer.clone(),
        }
    }
}

impl<K: fmt::Debug, C: fmt::Debug> fmt::Debug for RateLimitLayer<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("key", &self.key)
            .field("cost", &self.cost)
            .field("config", &self.config)
            .field("shadow", &self.is_shadow())
            .field("observer", &self.observer)
            .finish()
    }
}

impl<S, K: Clone, C: Clone> Layer<S> for RateLimitLayer<K, C> {
    type Service = RateLimit<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.shared())
    }
}

/// [`RateLimitLayer`] for any request type: refused requests fail with a
/// boxed [`Rejection`]. Made by [`RateLimitLayer::into_generic`].
///
/// ```
/// use std::num::NonZeroU32;
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
/// use tower_floodgate::{key, Quota, RateLimitLayer, RateLimiter, Rejection, TenantKey};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// struct Job { tenant: &'static str }
/// let limiter = RateLimiter::new(Quota::per_hour(NonZeroU32::new(1).unwrap()));
/// let mut svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(limiter)
///         .key(key::from_fn(|job: &Job| Some(TenantKey::from(job.tenant))))
///         .into_generic())
///     .service(service_fn(|_: Job| async { Ok::<_, std::convert::Infallible>("done") }));
///
/// assert!(svc.ready().await.unwrap().call(Job { tenant: "a" }).await.is_ok());
/// let err = svc.ready().await.unwrap().call(Job { tenant: "a" }).await.unwrap_err();
/// assert!(matches!(err.downcast_ref::<Rejection>(), Some(Rejection::RateLimited(_))));
/// # }
/// ```
pub struct GenericRateLimitLayer<K = Extension<TenantKey>, C = UnitCost> {
    layer: RateLimitLayer<K, C>,
}

impl<K, C> GenericRateLimitLayer<K, C> {
    /// The HTTP layer this was made from (for its settings and stats).
    #[must_use]
    pub fn get_ref(&self) -> &RateLimitLayer<K, C> {
        &self.layer
    }
}

impl<K: Clone, C: Clone> Clone for GenericRateLimitLayer<K, C> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer.clone(),
        }
    }
}

impl<K: fmt::Debug, C: fmt::Debug> fmt::Debug for GenericRateLimitLayer<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GenericRateLimitLayer")
            .field(&self.layer)
            .finish()
    }
}

impl<S, K: Clone, C: Clone> Layer<S> for GenericRateLimitLayer<K, C> {
    type Service = GenericRateLimit<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        GenericRateLimit::new(inner, self.layer.shared())
    }
}

/// Counters of a [`RateLimitLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RateLimitStats {
    /// Requests refused because their tenant was over its rate.
    pub rate_limited: u64,
    /// Requests refused because their tenant is blocked.
    pub blocked: u64,
    /// Requests refused for a missing, malformed or oversized key.
    pub key_rejected: u64,
    /// Requests refused for an unreadable cost.
    pub cost_rejected: u64,
    /// Requests that shadow mode let through but would have refused.
    pub shadow_rejected: u64,
    /// The limiter's tenant table.
    pub limiter: RateLimiterStats,
}

#[derive(Default)]
pub(super) struct LayerState {
    refusals: Refusals,
    rate_limited: AtomicU64,
    blocked: AtomicU64,
    key_rejected: AtomicU64,
    cost_rejected: AtomicU64,
}

impl LayerState {
    fn stats(&self, limiter: RateLimiterStats) -> RateLimitStats {
        RateLimitStats {
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            key_rejected: self.key_rejected.load(Ordering::Relaxed),
            cost_rejected: self.cost_rejected.load(Ordering::Relaxed),
            shadow_rejected: self.refusals.shadowed.load(Ordering::Relaxed),
            limiter,
        }
    }
}

impl PolicyListener for LayerState {
    fn policy_changed(&self, old: &Policy, new: &Arc<Policy>) {
        let shadow = new.is_shadow(LayerKind::RateLimit);
        if old.is_shadow(LayerKind::RateLimit) != shadow {
            self.refusals.set_shadow(shadow);
        }
    }
}

/// What the services of one `layer()` call share.
pub(crate) struct Shared<K, C> {
    limiter: RateLimiter,
    key: K,
    cost: C,
    config: Config,
    state: Arc<LayerState>,
    observer: Hook,
}

/// Headers for an admitted response.
#[derive(Debug)]
pub(crate) struct SuccessHeaders {
    policy: HeaderValue,
    limit: HeaderValue,
}

impl SuccessHeaders {
    /// Adds `RateLimit-Policy` and `RateLimit` to an admitted response.
    pub(crate) fn add_to(self, headers: &mut http::HeaderMap) {
        headers.append(crate::response::RATELIMIT_POLICY, self.policy);
        headers.append(crate::response::RATELIMIT, self.limit);
    }
}

/// The decision on one request: `Ok` with the headers for the admitted
/// response (if enabled), or the rejection.
pub(crate) type Verdict = Result<Option<Box<SuccessHeaders>>, Rejection>;

/// What the common case decided.
pub(crate) enum Rated {
    /// Admitted, with the headers for the response (if it sends them).
    Admitted(Option<Box<SuccessHeaders>>),
    /// Refused: nothing was charged; to be reported with the tenant's key
    /// ([`Shared::refuse_rated`]). Boxed: refusals are the rare case.
    Denied(Box<(Plan, Denied)>),
}

/// A verdict now, or after a round trip to the store.
pub(crate) enum Admit {
    Now(Verdict),
    Later(Pin<Box<dyn Future<Output = Verdict> + Send>>),
}

impl<K, C> Shared<K, C> {
    /// Decides for `req`, whose tenant key was already `extracted`. In
    /// shadow mode every request is admitted.
    #[inline]
    pub(crate) fn admit_with<Req>(&self, req: &Req, extracted: &Extracted) -> Admit
    where
        K: KeyExtractor<Req>,
        C: RequestCost<Req>,
    {
        match self.judge(req, extracted) {
            Admit::Now(Ok(headers)) => Admit::Now(Ok(headers)),
            Admit::Now(Err(rejection)) => {
                Admit::Now(refuse(&self.state, &self.limiter, &self.observer, rejection))
            }
            Admit::Later(verdict) => {
                let (state, limiter) = (Arc::clone(&self.state), self.limiter.clone());
                let observer = self.observer.clone();
                Admit::Later(Box::pin(async move {
                    match verdict.await {
                        Ok(headers) => Ok(headers),
                        Err(rejection) => refuse(&state, &limiter, &observer, rejection),
                    }
                }))
            }
        }
    }

    /// Whether the common case can be decided here at all: an in-memory
    /// limiter without an observer, out of shadow mode. The checks that
    /// need nothing of the request.
    #[inline]
    pub(crate) fn decides_fast(&self) -> bool {
        !self.observer.is_set() && !self.state.refusals.is_shadow() && !self.limiter.is_remote()
    }

    /// The common case, for a tenant (hashed to `hash`) whose plan under
    /// `snapshot`'s policy is known and who is not blocked, once
    /// [`decides_fast`](Self::decides_fast) said yes. A refusal is handed
    /// back to be reported with the tenant's key
    /// ([`refuse_rated`](Self::refuse_rated)).
    #[inline]
    pub(crate) fn admit_plan(
        &self,
        snapshot: &PolicySnapshot,
        plan: &Plan,
        hash: u64,
        cost: u32,
    ) -> Option<Rated> {
        let Some(quota) = plan.rate_quota() else {
            return Some(Rated::Admitted(None));
        };
        let decided = self.limiter.step_in(snapshot, hash, cost, quota)?;
        if decided.admitted() && !self.config.success_headers {
            return Some(Rated::Admitted(None));
        }
        Some(self.rated(plan, decided))
    }

    /// What the common case decided other than a plain admission: an
    /// admission with its headers, or a refusal.
    #[inline(never)]
    fn rated(&self, plan: &Plan, decided: InMemory) -> Rated {
        match decided.outcome() {
            Ok(allowed) => Rated::Admitted(if self.config.success_headers {
                headers_for(plan, &allowed)
            } else {
                None
            }),
            Err(denied) => Rated::Denied(Box::new((plan.clone(), denied))),
        }
    }

    /// The refusal of the common case, for tenant `key`: counted, logged
    /// and reported as the usual path does.
    #[cold]
    #[inline(never)]
    pub(crate) fn refuse_rated(&self, key: &TenantKey, denied: (Plan, Denied)) -> Verdict {
        let (plan, denied) = denied;
        let rejection = Rejection::RateLimited(RateLimited::new(key.clone(), plan, denied));
        refuse(&self.state, &self.limiter, &self.observer, rejection)
    }

    /// The key of `req`, found once for the fast path and the usual one.
    #[inline]
    pub(crate) fn extract<Req>(&self, req: &Req) -> Extracted
    where
        K: KeyExtractor<Req>,
    {
        Extracted::from_request(&self.key, req)
    }

    /// The common case of a layer on its own, for the tenant whose key is
    /// `key`: within the length bound, a readable cost, a tenant who is
    /// not blocked, and [`decides_fast`](Self::decides_fast). `None`: take
    /// [`admit_with`](Self::admit_with), which decides from the start
    /// (nothing was charged).
    #[inline]
    pub(crate) fn admit_key<Req>(&self, req: &Req, key: &[u8]) -> Option<Rated>
    where
        C: RequestCost<Req>,
    {
        if key.len() > self.config.keys.max_len || !self.decides_fast() {
            return None;
        }
        let cost = self.cost.cost(req).ok()?;
        let hash = tenant_hash(key);
        let snapshot = self.limiter.snapshot();
        let policy = &snapshot.extra;
        if policy.any_blocked() {
            return None;
        }
        let plan = policy.plan_for_hashed(hash, key);
        self.admit_plan(&snapshot, plan, hash, cost)
    }

    /// Decides for `req`: the common case with the key's bytes, if the
    /// extractor lends them, and anything else in
    /// [`admit_rest`](Self::admit_rest).
    #[inline]
    pub(crate) fn admit<Req>(&self, req: &Req) -> Admit
    where
        K: KeyExtractor<Req>,
        C: RequestCost<Req>,
    {
        match self.key.key_bytes(req) {
            Some(key) => match self.admit_key(req, key) {
                Some(Rated::Admitted(headers)) => Admit::Now(Ok(headers)),
                rated => self.admit_rest(req, rated, true),
            },
            None => self.admit_rest(req, None, false),
        }
    }

    /// Decides for `req` when the common case with the key's bytes
    /// ([`KeyExtractor::key_bytes`]) did not (`rated` is what it got, if it
    /// ran): a refusal of it is reported, and otherwise the key is
    /// extracted and the common case tried with it (if it did not run),
    /// then the usual path.
    #[inline(never)]
    pub(crate) fn admit_rest<Req>(&self, req: &Req, rated: Option<Rated>, tried: bool) -> Admit
    where
        K: KeyExtractor<Req>,
        C: RequestCost<Req>,
    {
        let extracted = self.extract(req);
        let rated = match rated {
            Some(rated) => Some(rated),
            None if !tried => extracted
                .key()
                .and_then(|tenant| self.admit_key(req, tenant.key.as_bytes())),
            None => None,
        };
        match (rated, extracted.key()) {
            (Some(Rated::Admitted(headers)), _) => Admit::Now(Ok(headers)),
            (Some(Rated::Denied(denied)), Some(tenant)) => {
                Admit::Now(self.refuse_rated(tenant.key, *denied))
            }
            // Not the common case; or an extractor whose `key_bytes` and
            // `extract` disagree, and a refusal charged nothing, so
            // deciding again is safe.
            (Some(Rated::Denied(_)), None) | (None, _) => self.admit_with(req, &extracted),
        }
    }

    /// The cost of `req`, if it can be read.
    #[inline]
    pub(crate) fn cost<Req>(&self, req: &Req) -> Option<u32>
    where
        C: RequestCost<Req>,
    {
        self.cost.cost(req).ok()
    }

    /// How this layer finds tenants.
    pub(crate) fn key_rules(&self) -> &KeyRules {
        &self.config.keys
    }

    /// The limiter.
    pub(crate) fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    #[inline]
    fn judge<Req>(&self, req: &Req, extracted: &Extracted) -> Admit
    where
        K: KeyExtractor<Req>,
        C: RequestCost<Req>,
    {
        let tenant = match self.config.keys.resolve(extracted, || self.key.challenge()) {
            Ok(tenant) => tenant,
            Err(rejection) => return Admit::Now(Err(rejection)),
        };
        let cost = match self.cost.cost(req) {
            Ok(cost) => cost,
            Err(e) => return Admit::Now(Err(Rejection::InvalidCost { reason: e.reason() })),
        };
        let (key, hash) = (tenant.key, tenant.hash);
        let success_headers = self.config.success_headers;
        if !self.limiter.is_remote() {
            let observer = &self.observer;
            return Admit::Now(self.limiter.decide(hash, key.as_bytes(), cost, |plan, result| {
                verdict(plan, result, success_headers, key, cost, observer)
            }));
        }
        let owned = key.clone();
        let observer = self.observer.clone();
        match self
            .limiter
            .decide_deferred(hash, key, cost, move |plan, result| {
                verdict(plan, result, success_headers, &owned, cost, &observer)
            }) {
            Deferred::Now(verdict) => Admit::Now(verdict),
            Deferred::Later(verdict) => Admit::Later(verdict),
        }
    }
}

/// The verdict for a limiter's result; reports admissions.
#[inline]
fn verdict(
    plan: &Plan,
    result: Result<Allowed, Denied>,
    success_headers: bool,
    tenant: &TenantKey,
    cost: u32,
    observer: &Hook,
) -> Verdict {
    match result {
        Ok(allowed) => {
            observer.emit(|| {
                Event::new(LayerKind::RateLimit, Decision::Admitted, Some(tenant))
                    .plan(Some(plan))
                    .cost(cost)
            });
            if allowed.is_fallback() {
                observer.emit(|| {
                    Event::new(LayerKind::RateLimit, Decision::StoreFallback, Some(tenant))
                        .plan(Some(plan))
                        .cost(cost)
                });
            }
            Ok(if success_headers {
                headers_for(plan, &allowed)
            } else {
                None
            })
        }
        Err(denied) if denied.reason() == DenyReason::Blocked => Err(Rejection::Blocked {
            tenant: tenant.clone(),
        }),
        Err(denied) => Err(Rejection::RateLimited(RateLimited::new(
            tenant.clone(),
            plan.clone(),
            denied,
        ))),
    }
}

/// `RateLimit-Policy` and `RateLimit` for an admitted request.
fn headers_for(plan: &Plan, allowed: &Allowed) -> Option<Box<SuccessHeaders>> {
    let usage = allowed.usage()?;
    plan.rate_policy_header().map(|policy| {
        Box::new(SuccessHeaders {
            policy: policy.clone(),
            limit: ratelimit_value(plan, usage),
        })
    })
}

/// Counts, logs and reports a refusal; shadow mode admits instead.
#[cold]
fn refuse(
    state: &LayerState,
    limiter: &RateLimiter,
    observer: &Hook,
    rejection: Rejection,
) -> Verdict {
    let counter = match rejection {
        Rejection::RateLimited(_) => &state.rate_limited,
        Rejection::Blocked { .. } => &state.blocked,
        Rejection::InvalidCost { .. } => &state.cost_rejected,
        _ => &state.key_rejected,
    };
    let now = limiter.clock().now_nanos();
    let shadow = state.refusals.record("rate_limit", &rejection, counter, now);
    if observer.is_set() {
        let event = refusal(LayerKind::RateLimit, &rejection, shadow, None);
        observer.emit(|| event);
        if rejection
            .as_rate_limited()
            .is_some_and(|l| l.denied().is_fallback())
        {
            observer.emit(|| Event {
                decision: Decision::StoreFallback,
                rejection: None,
                ..event
            });
        }
    }
    if shadow { Ok(None) } else { Err(rejection) }
}
