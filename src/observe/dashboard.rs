//! Every layer's counters and state, and the heaviest tenants, in one call.

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use tower_service::Service;

use super::top::{TopSnapshot, TopTenants};
use crate::coalesce::{CoalesceLayer, CoalesceStats};
use crate::concurrency::{ConcurrencyCapLayer, ConcurrencyStats};
use crate::purge::{BatchResponse, PurgeBatch, PurgeBatcher, PurgeStats};
use crate::rate_limit::{RateLimitLayer, RateLimitStats};
use crate::shed::{LoadShedLayer, ShedStats};

type Source<T> = Box<dyn Fn() -> T + Send + Sync>;

/// Collects the layers of an app so that one call,
/// [`snapshot`](Self::snapshot), returns all their counters and current
/// state (tracked tenants, requests in flight, queue lengths, the adaptive
/// limit, pending purges) and the heaviest tenants: what an admin endpoint
/// serves. With the `serde` feature the [`Snapshot`] serialises.
///
/// Cloning shares the dashboard; adding a layer keeps a handle on its
/// shared state (not on the layer's settings).
///
/// ```
/// use std::num::NonZeroU32;
/// use tower_floodgate::observe::{Dashboard, TopTenants};
/// use tower_floodgate::{ConcurrencyCapLayer, Plan, Quota, RateLimitLayer, RateLimiter};
///
/// let top = TopTenants::new();
/// let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(100).unwrap()));
/// let rate_limit = RateLimitLayer::new(limiter).observer(top.clone());
/// let cap = ConcurrencyCapLayer::new(Plan::new("default").concurrency(8));
/// let dashboard = Dashboard::new()
///     .rate_limit("api", &rate_limit)
///     .concurrency_cap("api", &cap)
///     .top_tenants(&top, 10);
///
/// let snapshot = dashboard.snapshot();
/// assert_eq!(snapshot.rate_limits[0].name, "api");
/// assert_eq!(snapshot.concurrency_caps[0].stats.tenants_in_flight, 0);
/// ```
#[derive(Clone, Default)]
pub struct Dashboard {
    sources: Arc<RwLock<Sources>>,
}

#[derive(Default)]
struct Sources {
    rate_limits: Vec<(String, Source<RateLimitStats>)>,
    concurrency_caps: Vec<(String, Source<ConcurrencyStats>)>,
    load_shedders: Vec<(String, Source<ShedStats>)>,
    coalescers: Vec<(String, Source<CoalesceStats>)>,
    purge_batchers: Vec<(String, Source<PurgeStats>)>,
    top_tenants: Option<(TopTenants, usize)>,
}

impl Dashboard {
    /// An empty dashboard.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rate limit layer (and its limiter, with its Redis counters).
    #[must_use]
    pub fn rate_limit<K, C>(self, name: impl Into<String>, layer: &RateLimitLayer<K, C>) -> Self {
        let source = Box::new(layer.stats_source());
        self.sources.write().rate_limits.push((name.into(), source));
        self
    }

    /// Adds a concurrency cap layer.
    #[must_use]
    pub fn concurrency_cap<K>(
        self,
        name: impl Into<String>,
        layer: &ConcurrencyCapLayer<K>,
    ) -> Self {
        let source = Box::new(layer.stats_source());
        self.sources
            .write()
            .concurrency_caps
            .push((name.into(), source));
        self
    }

    /// Adds a load shed layer.
    #[must_use]
    pub fn load_shed<K, P>(self, name: impl Into<String>, layer: &LoadShedLayer<K, P>) -> Self {
        let source = Box::new(layer.stats_source());
        self.sources.write().load_shedders.push((name.into(), source));
        self
    }

    /// Adds a coalescing layer.
    #[must_use]
    pub fn coalesce<K, T>(self, name: impl Into<String>, layer: &CoalesceLayer<K, T>) -> Self {
        let source = Box::new(layer.stats_source());
        self.sources.write().coalescers.push((name.into(), source));
        self
    }

    /// Adds a purge batcher.
    #[must_use]
    pub fn purge<B>(self, name: impl Into<String>, batcher: &PurgeBatcher<B>) -> Self
    where
        B: Service<PurgeBatch, Response = BatchResponse> + Clone + Send + Sync + 'static,
        B::Error: fmt::Display + Send,
        B::Future: Send,
    {
        let batcher = batcher.clone();
        let source: Source<PurgeStats> = Box::new(move || batcher.stats());
        self.sources
            .write()
            .purge_batchers
            .push((name.into(), source));
        self
    }

    /// Shows the `k` heaviest tenants of `top` (by requests and by
    /// rejections).
    #[must_use]
    pub fn top_tenants(self, top: &TopTenants, k: usize) -> Self {
        self.sources.write().top_tenants = Some((top.clone(), k));
        self
    }

    /// Everything, now.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        fn read<T>(sources: &[(String, Source<T>)]) -> Vec<Named<T>> {
            sources
                .iter()
                .map(|(name, source)| Named {
                    name: name.clone(),
                    stats: source(),
                })
                .collect()
        }
        let sources = self.sources.read();
        Snapshot {
            rate_limits: read(&sources.rate_limits),
            concurrency_caps: read(&sources.concurrency_caps),
            load_shedders: read(&sources.load_shedders),
            coalescers: read(&sources.coalescers),
            purge_batchers: read(&sources.purge_batchers),
            top_tenants: sources
                .top_tenants
                .as_ref()
                .map(|(top, k)| top.snapshot(*k)),
        }
    }
}

impl fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.sources.read();
        f.debug_struct("Dashboard")
            .field("rate_limits", &s.rate_limits.len())
            .field("concurrency_caps", &s.concurrency_caps.len())
            .field("load_shedders", &s.load_shedders.len())
            .field("coalescers", &s.coalescers.len())
            .field("purge_batchers", &s.purge_batchers.len())
            .field("top_tenants", &s.top_tenants.is_some())
            .finish()
    }
}

/// What [`Dashboard::snapshot`] returns: one entry per layer added, in the
/// order added.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Snapshot {
    /// Rate limit layers.
    pub rate_limits: Vec<Named<RateLimitStats>>,
    /// Concurrency cap layers.
    pub concurrency_caps: Vec<Named<ConcurrencyStats>>,
    /// Load shed layers.
    pub load_shedders: Vec<Named<ShedStats>>,
    /// Coalescing layers.
    pub coalescers: Vec<Named<CoalesceStats>>,
    /// Purge batchers.
    pub purge_batchers: Vec<Named<PurgeStats>>,
    /// The heaviest tenants, if a [`TopTenants`] was added.
    pub top_tenants: Option<TopSnapshot>,
}

/// A layer's stats under the name it was added with.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Named<T> {
    /// The name given to [`Dashboard`].
    pub name: String,
    /// Its counters and state.
    pub stats: T,
}
