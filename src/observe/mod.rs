//! Who is pushing: every layer reports each decision it makes to an
//! [`Observer`], and the built-in observers turn those reports into logs
//! ([`Tracing`]), metrics (`Metrics`, feature `metrics`) and the heaviest
//! tenants ([`TopTenants`]).
//!
//! A layer without an observer pays one branch per request for this.
//!
//! ```
//! use std::num::NonZeroU32;
//! use tower_floodgate::observe::{Tracing, TopTenants};
//! use tower_floodgate::{Quota, RateLimitLayer, RateLimiter};
//!
//! let top = TopTenants::new();
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(100).unwrap()));
//! let layer = RateLimitLayer::new(limiter).observer((top.clone(), Tracing::new()));
//! // Later, on an admin endpoint:
//! for hitter in top.snapshot(5).by_requests {
//!     println!("{}: {} requests ({:.1}%)", hitter.tenant, hitter.count, hitter.share * 100.0);
//! }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Rejection;
use crate::key::TenantKey;
use crate::policy::Plan;

mod dashboard;
#[cfg(feature = "metrics")]
mod metrics;
mod top;
mod tracing_observer;

pub use dashboard::{Dashboard, Named, Snapshot};
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use self::metrics::{Metrics, TenantLabel};
pub use top::{HeavyHitter, TopSnapshot, TopTenants, TopTenantsBuilder};
pub use tracing_observer::Tracing;

/// Which layer made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum LayerKind {
    /// [`RateLimitLayer`](crate::RateLimitLayer).
    RateLimit,
    /// [`ConcurrencyCapLayer`](crate::ConcurrencyCapLayer).
    ConcurrencyCap,
    /// [`LoadShedLayer`](crate::LoadShedLayer).
    LoadShed,
    /// [`CoalesceLayer`](crate::coalesce::CoalesceLayer).
    Coalesce,
    /// [`PurgeBatcher`](crate::purge::PurgeBatcher).
    Purge,
}

impl LayerKind {
    /// Every layer, in the order a request meets them.
    pub const ALL: [Self; 5] = [
        Self::RateLimit,
        Self::ConcurrencyCap,
        Self::LoadShed,
        Self::Coalesce,
        Self::Purge,
    ];

    /// The name used in logs and metrics: `rate_limit`, `concurrency_cap`,
    /// `load_shed`, `coalesce`, `purge`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::ConcurrencyCap => "concurrency_cap",
            Self::LoadShed => "load_shed",
            Self::Coalesce => "coalesce",
            Self::Purge => "purge",
        }
    }

    pub(crate) const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a layer decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Decision {
    /// Let through.
    Admitted,
    /// Refused: over its rate quota (or its cost exceeds the burst, or,
    /// failing closed, the store could not be asked).
    RateLimited,
    /// Refused: at its concurrency cap.
    ConcurrencyCapped,
    /// Refused to protect the process: load shed, or the global
    /// concurrency cap.
    Shed,
    /// Refused: the tenant is [blocked](crate::PolicyHandle::block).
    Blocked,
    /// Refused: no tenant key, or a malformed or oversized one.
    KeyRejected,
    /// Would have been refused, but the layer is in shadow mode: let
    /// through. [`Event::rejection`] says why.
    ShadowRejected,
    /// Joined a call already made for an identical request.
    Coalesced,
    /// A purge went to the backend in a batch; one event per item, after
    /// the batch answered.
    Batched,
    /// Decided without the rate limit store (Redis did not answer in
    /// time); reported besides the decision itself.
    StoreFallback,
}

impl Decision {
    /// Whether the request was refused (shadow refusals are not).
    #[must_use]
    pub const fn is_rejection(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::ConcurrencyCapped
                | Self::Shed
                | Self::Blocked
                | Self::KeyRejected
        )
    }

    /// The name used in logs and metrics, such as `rate_limited`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::RateLimited => "rate_limited",
            Self::ConcurrencyCapped => "concurrency_capped",
            Self::Shed => "shed",
            Self::Blocked => "blocked",
            Self::KeyRejected => "key_rejected",
            Self::ShadowRejected => "shadow_rejected",
            Self::Coalesced => "coalesced",
            Self::Batched => "batched",
            Self::StoreFallback => "store_fallback",
        }
    }

    /// The decision that refuses with `rejection`.
    #[must_use]
    pub fn of(rejection: &Rejection) -> Self {
        match rejection {
            Rejection::RateLimited(_) => Self::RateLimited,
            Rejection::ConcurrencyCapped(_) => Self::ConcurrencyCapped,
            Rejection::Overloaded(_) => Self::Shed,
            Rejection::Blocked { .. } => Self::Blocked,
            Rejection::MissingKey { .. }
            | Rejection::InvalidKey { .. }
            | Rejection::KeyTooLong { .. }
            | Rejection::InvalidCost { .. } => Self::KeyRejected,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decision of one layer about one request.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Event<'a> {
    /// The layer that decided.
    pub layer: LayerKind,
    /// What it decided.
    pub decision: Decision,
    /// The tenant, when the layer knows it (a layer that needs no tenant
    /// for its decision looks it up only for an observer, and a request
    /// without a valid key has none).
    pub tenant: Option<&'a TenantKey>,
    /// The tenant's plan, when the layer looked it up.
    pub plan: Option<&'a Plan>,
    /// Why the request was refused (or would have been, in shadow mode).
    pub rejection: Option<&'a Rejection>,
    /// The units the request was charged (rate limit), else 1.
    pub cost: u32,
    /// How long the request waited in the layer's queue, if it queued.
    pub waited: Option<Duration>,
}

impl<'a> Event<'a> {
    /// An event without rejection, plan, wait, and a cost of 1.
    #[must_use]
    pub fn new(layer: LayerKind, decision: Decision, tenant: Option<&'a TenantKey>) -> Self {
        Self {
            layer,
            decision,
            tenant,
            plan: None,
            rejection: None,
            cost: 1,
            waited: None,
        }
    }

    /// With the plan.
    #[must_use]
    pub fn plan(mut self, plan: Option<&'a Plan>) -> Self {
        self.plan = plan;
        self
    }

    /// With the rejection.
    #[must_use]
    pub fn rejection(mut self, rejection: Option<&'a Rejection>) -> Self {
        self.rejection = rejection;
        self
    }

    /// With the cost.
    #[must_use]
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// With the time spent queued.
    #[must_use]
    pub fn waited(mut self, waited: Option<Duration>) -> Self {
        self.waited = waited;
        self
    }
}

/// Hears every decision of the layers it is given to.
///
/// Called on the request path, synchronously: keep it cheap and never
/// block (count, sample, or hand off). Combine observers with a tuple, such
/// as `(TopTenants::new(), Tracing::new())`, or a
/// `Vec<Arc<dyn Observer>>`; wrap a closure with [`from_fn`].
pub trait Observer: Send + Sync + 'static {
    /// One decision.
    fn observe(&self, event: &Event<'_>);
}

impl<O: Observer + ?Sized> Observer for Arc<O> {
    #[inline]
    fn observe(&self, event: &Event<'_>) {
        (**self).observe(event);
    }
}

impl<O: Observer + ?Sized> Observer for Box<O> {
    #[inline]
    fn observe(&self, event: &Event<'_>) {
        (**self).observe(event);
    }
}

impl Observer for Vec<Arc<dyn Observer>> {
    fn observe(&self, event: &Event<'_>) {
        for observer in self {
            observer.observe(event);
        }
    }
}

macro_rules! tuple_observer {
    ($($name:ident),+) => {
        impl<$($name: Observer),+> Observer for ($($name,)+) {
            #[inline]
            fn observe(&self, event: &Event<'_>) {
                #[allow(non_snake_case)]
                let ($($name,)+) = self;
                $($name.observe(event);)+
            }
        }
    };
}

tuple_observer!(A, B);
tuple_observer!(A, B, C);
tuple_observer!(A, B, C, D);

/// An observer that calls `f`.
pub fn from_fn<F>(f: F) -> FromFn<F>
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    FromFn(f)
}

/// The observer made by [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F> Observer for FromFn<F>
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    #[inline]
    fn observe(&self, event: &Event<'_>) {
        (self.0)(event);
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

/// The event for a refusal (or, in shadow mode, a refusal let through).
pub(crate) fn refusal(
    layer: LayerKind,
    rejection: &Rejection,
    shadow: bool,
    waited: Option<Duration>,
) -> Event<'_> {
    let (plan, cost) = match rejection {
        Rejection::RateLimited(limited) => (Some(limited.plan()), limited.denied().cost()),
        Rejection::ConcurrencyCapped(capped) => (Some(capped.plan()), 1),
        _ => (None, 1),
    };
    Event {
        layer,
        decision: if shadow {
            Decision::ShadowRejected
        } else {
            Decision::of(rejection)
        },
        tenant: rejection.tenant(),
        plan,
        rejection: Some(rejection),
        cost,
        waited,
    }
}

/// A layer's observer, if it has one.
#[derive(Clone, Default)]
pub(crate) struct Hook(Option<Arc<dyn Observer>>);

impl Hook {
    pub(crate) fn new(observer: impl Observer) -> Self {
        Self(Some(Arc::new(observer)))
    }

    /// Reports the event `make` builds, if anybody listens.
    #[inline]
    pub(crate) fn emit<'a>(&self, make: impl FnOnce() -> Event<'a>) {
        if let Some(observer) = &self.0 {
            observer.observe(&make());
        }
    }

    #[inline]
    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
