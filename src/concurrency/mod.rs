//! Per-tenant concurrency caps, and an optional global one.
//!
//! A rate limit bounds how often a tenant may start work; it does not bound
//! how much of its work runs at once. When a backend slows down, a tenant
//! within its rate can still fill every worker with slow requests.
//! [`ConcurrencyCapLayer`] bounds that: each tenant may have at most its
//! plan's [`concurrency`](crate::Plan::concurrency) requests in flight, and
//! everybody together at most the [`global_limit`](ConcurrencyCapLayer::global_limit).
//!
//! # When the cap is reached
//!
//! By default the request is refused at once: 429 for a tenant at its cap
//! (`RateLimit-Policy: "pro";q=8;qu="concurrent-requests"`, gRPC
//! RESOURCE_EXHAUSTED), 503 with `Retry-After` for the global cap (gRPC
//! UNAVAILABLE). With [`queue`](ConcurrencyCapLayer::queue), it waits instead
//! in a bounded first-in-first-out queue, for at most a deadline: a request
//! that finishes hands its permit straight to the oldest waiter, and
//! newcomers cannot overtake the queue.
//!
//! # How long a permit is held
//!
//! The permit is taken in `call`, and held until the response body has sent
//! its last frame, failed, or been dropped (the client went away), not
//! merely until the handler returns: a slow streaming download counts as in
//! flight until it is done.
//!
//! # Cancel safety
//!
//! Dropping the response future at any point (before the handler, during
//! it, while queued) or the response body at any point returns everything
//! it held: the permit, its place in the queue, or a permit handed to it by
//! a finishing request at the very moment it gave up. The accounting is
//! model-checked with loom.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower_floodgate::{key, ConcurrencyCapLayer, Plan, Policy};
//!
//! let policy = Policy::builder(Plan::new("standard").concurrency(4))
//!     .tier(Plan::new("pro").concurrency(32))
//!     .build()
//!     .unwrap();
//! let caps = ConcurrencyCapLayer::new(policy)
//!     .key(key::bearer())
//!     .global_limit(512)
//!     .queue(16, Duration::from_millis(250));
//! let app: Router = Router::new()
//!     .route("/v1/purge", post(|| async { "purged" }))
//!     .layer(caps);
//! ```

mod layer;
mod service;

pub use self::layer::{
    ConcurrencyCapLayer, ConcurrencyStats, DEFAULT_MAX_ACTIVE_TENANTS, GenericConcurrencyCapLayer,
};
pub(crate) use self::layer::{Admit, Held, Permit, Runtime, Shared, Ticket};
pub use self::service::{ConcurrencyCap, GenericConcurrencyCap};
pub use crate::held::{GenericResponseFuture, ResponseFuture};
