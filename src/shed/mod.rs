//! Load shedding that protects the process, with priorities and fairness
//! between tenants.
//!
//! Rate limits and concurrency caps keep each tenant within its share;
//! [`LoadShedLayer`] keeps the process itself within its capacity, whoever
//! is asking. It decides in `call` (tower's `LoadShed` only reacts to an
//! inner service that is not ready, which an axum `Router` never is), from
//! two signals:
//!
//! * **requests in flight** against a [`Limit`]: fixed, or adaptive, an
//!   AIMD controller that backs off when the latency of admitted requests
//!   goes over a target and probes upwards when it does not;
//! * **time spent waiting**, if a queue is configured: [`CoDel`] cuts the
//!   queue's patience from `interval` to `target` once even the shortest
//!   wait of an interval exceeded the target.
//!
//! Whom to refuse:
//!
//! * **priority** ([`Priority`], from a request extension, a header, a
//!   closure or the tenant's plan): sheddable requests may use half of the
//!   capacity, normal ones all but the critical reserve (10%), critical ones
//!   all of it, so lower priorities are refused first and critical traffic
//!   always has room;
//! * **fairness**: once three quarters of a priority's capacity is in use,
//!   a tenant that already has its fair share in flight (that capacity over
//!   the tenants with requests in flight) is refused while lighter tenants
//!   are still admitted, so a flooding tenant cannot push the others out.
//!
//! A refused request gets 503 with `Retry-After` and an
//! `application/problem+json` body of type `temporary-reduced-capacity`
//! (gRPC UNAVAILABLE with `grpc-retry-pushback-ms`). What a request holds
//! is returned when its response body is done or dropped, or when it gives
//! up waiting.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_floodgate::shed::{CoDel, Limit, LoadShedLayer};
//! use tower_floodgate::key;
//!
//! let shed = LoadShedLayer::new(Limit::adaptive(Duration::from_millis(50)))
//!     .key(key::bearer())
//!     .queue(256, CoDel::default());
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "ok" }))
//!     .layer(shed);
//! ```

mod layer;
mod limit;
pub mod priority;
mod service;

pub use self::layer::{GenericLoadShedLayer, LoadShedLayer, ShedStats};
pub(crate) use self::layer::{Admit, Held, Permit, Runtime, Shared, Ticket};
pub use self::limit::{Aimd, CoDel, Limit};
pub use self::priority::{Priority, PriorityExtractor};
pub use self::service::{GenericLoadShed, LoadShed};
pub use crate::held::{GenericResponseFuture, ResponseFuture};
