//! Per-tenant rate limiting as a tower layer.
//!
//! [`RateLimitLayer`] wraps any HTTP service (an axum `Router`, a tonic
//! server, a hyper service). For each request it takes the tenant key, reads
//! the request's cost, and asks the [`RateLimiter`](crate::RateLimiter):
//! admitted requests go to the inner service, refused ones are answered at
//! once (429, or a gRPC `RESOURCE_EXHAUSTED`; see
//! [`response`](crate::response)). No `HandleErrorLayer` is needed.
//!
//! [`GenericRateLimitLayer`] is the same for any request type, failing
//! refused requests with a [`Rejection`](crate::Rejection) error instead.
//!
//! # How it behaves as a tower middleware
//!
//! * `poll_ready` is the inner service's: nothing is reserved before the
//!   request is known, so axum's and hyper's readiness checks cost nothing.
//! * The decision is made in `call`, synchronously, in tens of nanoseconds.
//! * State lives in the [`RateLimiter`](crate::RateLimiter) and in an `Arc`
//!   the layer owns: every clone of the layer and of its services, and every
//!   `layer()` call (axum makes one per route), shares one limit.
//! * Nothing is held across the response: a rate limit is charged on
//!   arrival, so cancelling the request leaves nothing to release.
//! * A refused request never reaches the inner service. Like tower's
//!   `LoadShed` and `Filter`, it has driven the inner service to readiness
//!   without calling it; services that reserve capacity in `poll_ready`
//!   keep that reservation until their next call.
//!
//! # Example
//!
//! ```
//! use std::num::NonZeroU32;
//! use axum::{routing::get, Router};
//! use http::HeaderName;
//! use tower_floodgate::{key, Quota, RateLimitLayer, RateLimiter};
//!
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(50).unwrap()));
//! let app: Router = Router::new()
//!     .route("/v1/purge", get(|| async { "purged" }))
//!     .layer(RateLimitLayer::new(limiter).key(key::header(HeaderName::from_static("x-tenant-id"))));
//! ```

mod future;
mod layer;
mod service;

pub use self::future::{GenericResponseFuture, ResponseFuture};
pub use self::layer::{GenericRateLimitLayer, RateLimitLayer, RateLimitStats};
pub(crate) use self::layer::{Admit, Rated, Shared, SuccessHeaders, Verdict};
pub use self::service::{GenericRateLimit, RateLimit};
