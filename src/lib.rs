//! Tower middleware that keeps one tenant from taking a multi-tenant API
//! down for everyone.
//!
//! A CDN's purge API went down at 1 a.m. because one customer flooded it and
//! nothing in the stack assumed a single user could. This crate removes that
//! assumption, one layer at a time:
//!
//! * **Per-tenant rate limiting** ([`RateLimitLayer`], [`RateLimiter`]):
//!   GCRA with one atomic word per tenant, plan tiers and per-tenant
//!   overrides that change at run time ([`PolicyHandle`]), weighted costs,
//!   and a hard cap on tracked tenants so that key rotation cannot exhaust
//!   memory.
//! * **Concurrency caps** ([`ConcurrencyCapLayer`]): requests in flight per
//!   tenant and in total, held until the response body is sent, with an
//!   optional FIFO queue.
//! * **Load shedding** ([`LoadShedLayer`]): protects the process, with a
//!   fixed or adaptive limit, CoDel, priorities and fairness between
//!   tenants.
//! * **Purge batching and coalescing** ([`purge::PurgeBatcher`],
//!   [`coalesce::CoalesceLayer`]): a flood of identical purges costs the
//!   backend a couple of calls, never one per request.
//! * **Fleet-wide limits** (feature `redis`): the same rate limiter on
//!   Redis, so that a tenant's quota holds across every node.
//! * **Finding patient zero** ([`observe`]): every layer reports its
//!   decisions to an observer (logs, metrics, the heaviest tenants), one
//!   call shows every layer's state, and a tenant can be blocked or a layer
//!   put in shadow mode at run time ([`PolicyHandle::block`],
//!   [`PolicyHandle::set_shadow`]).
//!
//! The layers go in that order, outermost first: who (the key), how often
//! (rate limit), how many at once (concurrency cap), is the server ok
//! (load shed), is this already pending (coalesce), then your service. Each
//! is usable alone, and all share one [`PolicyHandle`]. [`FloodgateLayer`]
//! makes the first three decisions in one layer, finding the tenant once.
//!
//! # Quick start (axum)
//!
//! ```
//! use std::num::NonZeroU32;
//! use axum::{routing::post, Router};
//! use tower_floodgate::{key, Quota, RateLimitLayer, RateLimiter};
//!
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(100).unwrap()));
//! let app: Router = Router::new()
//!     .route("/v1/purge", post(|| async { "purged" }))
//!     .layer(RateLimitLayer::new(limiter).key(key::bearer()));
//! ```
//!
//! A tenant over its quota gets `429 Too Many Requests` with an
//! `application/problem+json` body, `Retry-After`, and the IETF
//! `RateLimit-Policy` / `RateLimit` fields; a gRPC client gets
//! `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`. See [`response`].
//!
//! # Who is the tenant?
//!
//! A [`KeyExtractor`] decides: by default a [`TenantKey`] request extension
//! that your authentication layer inserts, because identity should come from
//! authentication rather than from a header anyone can forge. Headers,
//! bearer tokens, the peer address and closures are built in; see [`key`].
//!
//! # Memory
//!
//! The in-memory limiter stores 16 bytes per tenant (a 64-bit keyed hash of
//! the key and the tenant's theoretical arrival time) in a sharded
//! open-addressing table, about 18 to 36 bytes per tenant with the table's
//! slack. It tracks at most [`max_tenants`](RateLimiterBuilder::max_tenants)
//! tenants. A tenant whose bucket is full again is indistinguishable from an
//! unknown one, so idle tenants are forgotten without changing any decision;
//! when a shard is full of tenants in debt, those closest to a full bucket
//! are forgotten first. Each clean-up walks one small shard and is paid for
//! by the inserts it makes room for.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | [`key::peer_addr`] reads axum's `ConnectInfo<SocketAddr>` |
//! | `tonic` | no | `From<Rejection> for tonic::Status`; [`key::peer_addr`] reads tonic's `TcpConnectInfo` |
//! | `redis` | no | [`redis::RedisStore`]: fleet-wide rate limits on Redis, Valkey or a Redis Cluster |
//! | `metrics` | no | `observe::Metrics`: counters and histograms through the `metrics` facade |
//! | `serde` | no | `Serialize` for [`observe::Snapshot`], the heavy-hitter view and every layer's stats |
//!
//! gRPC rejections work without the `tonic` feature: the layer recognises
//! gRPC requests by their content type.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// Items left out of `--cfg floodgate_loom` builds, which model-check the permit
/// accounting alone (see `gate.rs`).
macro_rules! not_loom {
    ($($item:item)*) => { $( #[cfg(not(floodgate_loom))] $item )* };
}

mod gate;
mod inflight;
mod sync;

not_loom! {
    pub mod clock;
    pub mod coalesce;
    mod common;
    pub mod concurrency;
    pub mod cost;
    pub mod error;
    pub mod floodgate;
    mod gcra;
    mod hash;
    mod held;
    pub mod key;
    mod limiter;
    mod memory;
    pub mod observe;
    pub mod policy;
    pub mod purge;
    mod quota;
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub mod redis;
    pub mod rate_limit;
    pub mod response;
    pub mod shed;
    mod table;

    pub use clock::{Clock, ManualClock};
    pub use error::{
        ConcurrencyCapped, OverloadCause, Overloaded, RateLimited, Rejection, ShedReason,
    };
    pub use key::{KeyExtractor, TenantKey};
    pub use limiter::{
        Allowed, DEFAULT_MAX_TENANTS, Denied, DenyReason, RateLimiter, RateLimiterBuilder,
        RateLimiterStats, Usage,
    };
    pub use policy::{Plan, Policy, PolicyBuilder, PolicyError, PolicyHandle};
    pub use quota::{Quota, QuotaError};
    pub use common::{DEFAULT_MAX_KEY_LEN, MissingKey};
    pub use concurrency::ConcurrencyCapLayer;
    pub use rate_limit::RateLimitLayer;
    pub use floodgate::FloodgateLayer;
    pub use shed::{LoadShedLayer, Priority};
    pub use observe::LayerKind;
}

/// The boxed error of the generic (non-HTTP) services.
#[cfg(not(floodgate_loom))]
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The README's code, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
