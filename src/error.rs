//! Why a layer refused a request.
//!
//! For HTTP (axum, hyper, tonic) the layers answer a refused request with a
//! response: see [`response`](crate::response) for the formats. The
//! [`Rejection`] that caused it is also put in the response's extensions, so
//! an outer layer can log or reshape it. For other request types, the
//! [`GenericRateLimit`](crate::rate_limit::GenericRateLimit) service fails
//! with a boxed [`Rejection`] that callers can downcast.

use std::time::Duration;

use http::StatusCode;

use crate::key::TenantKey;
use crate::limiter::{Denied, DenyReason};
use crate::policy::Plan;

/// A request a layer refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The tenant is over its rate quota.
    #[error(transparent)]
    RateLimited(RateLimited),
    /// The tenant already has as many requests in flight as its plan
    /// allows.
    #[error(transparent)]
    ConcurrencyCapped(Box<ConcurrencyCapped>),
    /// The server is over capacity: its global cap is reached, or the load
    /// shedder refused the request.
    #[error(transparent)]
    Overloaded(Box<Overloaded>),
    /// The tenant is blocked by the policy
    /// ([`PolicyHandle::block`](crate::PolicyHandle::block)).
    #[error("tenant {tenant} is blocked")]
    Blocked {
        /// The tenant.
        tenant: TenantKey,
    },
    /// The request carries no tenant key.
    #[error("the request carries no tenant key")]
    MissingKey {
        /// 401 or 400, as configured.
        status: StatusCode,
        /// The `WWW-Authenticate` challenge sent with a 401, if the key
        /// extractor names one (the bearer extractor says `Bearer`).
        challenge: Option<http::HeaderValue>,
    },
    /// The request carries a malformed tenant key.
    #[error("the tenant key is invalid: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tenant key is longer than the layer accepts.
    #[error("the tenant key is {len} bytes long; at most {max} are accepted")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The request states a cost that cannot be read.
    #[error("the request cost is invalid: {reason}")]
    InvalidCost {
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Rejection {
    /// The HTTP status the layer answers with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RateLimited(limited) if limited.reason() == DenyReason::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::RateLimited(_) | Self::ConcurrencyCapped(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Blocked { .. } => StatusCode::FORBIDDEN,
            Self::MissingKey { status, .. } => *status,
            Self::InvalidKey { .. } | Self::KeyTooLong { .. } | Self::InvalidCost { .. } => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// The gRPC status code the layer answers gRPC requests with.
    #[must_use]
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            Self::RateLimited(limited) if limited.reason() == DenyReason::StoreUnavailable => {
                GrpcCode::Unavailable
            }
            Self::RateLimited(_) | Self::ConcurrencyCapped(_) => GrpcCode::ResourceExhausted,
            Self::Overloaded(_) => GrpcCode::Unavailable,
            Self::Blocked { .. } => GrpcCode::PermissionDenied,
            Self::MissingKey { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                GrpcCode::Unauthenticated
            }
            Self::MissingKey { .. }
            | Self::InvalidKey { .. }
            | Self::KeyTooLong { .. }
            | Self::InvalidCost { .. } => GrpcCode::InvalidArgument,
        }
    }

    /// How long the client should wait before retrying: `None` when a retry
    /// cannot succeed as is (a bad key, or a cost above the burst).
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited(limited) => limited.denied().retry_after(),
            Self::Overloaded(overloaded) => Some(overloaded.retry_after),
            _ => None,
        }
    }

    /// The tenant refused, when the cause concerns one.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantKey> {
        match self {
            Self::RateLimited(limited) => Some(limited.tenant()),
            Self::ConcurrencyCapped(capped) => Some(&capped.tenant),
            Self::Overloaded(overloaded) => overloaded.tenant.as_ref(),
            Self::Blocked { tenant } => Some(tenant),
            _ => None,
        }
    }

    /// The HTTP response the layers answer this refusal with (status,
    /// headers and `application/problem+json` body; see
    /// [`response`](crate::response)), for refusals made in a handler.
    #[must_use]
    pub fn to_http_response(&self) -> http::Response<bytes::Bytes> {
        crate::response::http_response(self)
    }

    /// The rate-limit details, if that is the cause.
    #[must_use]
    pub fn as_rate_limited(&self) -> Option<&RateLimited> {
        match self {
            Self::RateLimited(limited) => Some(limited),
            _ => None,
        }
    }
}

/// The gRPC status codes this crate answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrpcCode {
    /// 3: the request is malformed.
    InvalidArgument,
    /// 7: the tenant is blocked.
    PermissionDenied,
    /// 8: the tenant is over a quota.
    ResourceExhausted,
    /// 14: the server is overloaded.
    Unavailable,
    /// 16: the tenant is unknown.
    Unauthenticated,
}

impl GrpcCode {
    /// The code's number on the wire (`grpc-status`).
    #[must_use]
    pub fn as_i32(self) -> i32 {
        match self {
            Self::InvalidArgument => 3,
            Self::PermissionDenied => 7,
            Self::ResourceExhausted => 8,
            Self::Unavailable => 14,
            Self::Unauthenticated => 16,
        }
    }
}

/// A tenant over its rate quota.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tenant {} on plan `{}`: {}", self.inner.tenant, self.inner.plan.name(), self.inner.denied)]
pub struct RateLimited {
    inner: Box<RateLimitedInner>,
}

#[derive(Debug, Clone)]
struct RateLimitedInner {
    tenant: TenantKey,
    plan: Plan,
    denied: Denied,
}

impl RateLimited {
    pub(crate) fn new(tenant: TenantKey, plan: Plan, denied: Denied) -> Self {
        Self {
            inner: Box::new(RateLimitedInner {
                tenant,
                plan,
                denied,
            }),
        }
    }

    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &TenantKey {
        &self.inner.tenant
    }

    /// The plan whose quota was exceeded.
    #[must_use]
    pub fn plan(&self) -> &Plan {
        &self.inner.plan
    }

    /// The limiter's decision: wait time, reason, bucket state.
    #[must_use]
    pub fn denied(&self) -> &Denied {
        &self.inner.denied
    }

    /// Why it was refused.
    #[must_use]
    pub fn reason(&self) -> DenyReason {
        self.inner.denied.reason()
    }
}

/// A tenant at its concurrency cap.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "tenant {tenant} has {cap} requests in flight, the most plan `{}` allows{}",
    plan.name(),
    if *queued { ", and waited in vain for one to finish" } else { "" }
)]
pub struct ConcurrencyCapped {
    pub(crate) tenant: TenantKey,
    pub(crate) plan: Plan,
    pub(crate) cap: u32,
    pub(crate) queued: bool,
}

impl ConcurrencyCapped {
    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &TenantKey {
        &self.tenant
    }

    /// The plan whose cap was reached.
    #[must_use]
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The cap: requests in flight at once.
    #[must_use]
    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// Whether the request waited in the queue before being refused.
    #[must_use]
    pub fn queued(&self) -> bool {
        self.queued
    }
}

/// The server refusing work to protect itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the server is over capacity: {cause}; retry in {}s", crate::response::ceil_secs(*retry_after))]
pub struct Overloaded {
    pub(crate) cause: OverloadCause,
    pub(crate) tenant: Option<TenantKey>,
    pub(crate) retry_after: Duration,
}

impl Overloaded {
    /// Why.
    #[must_use]
    pub fn cause(&self) -> &OverloadCause {
        &self.cause
    }

    /// The tenant whose request was refused, if known.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantKey> {
        self.tenant.as_ref()
    }

    /// How long the client should wait before retrying.
    #[must_use]
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

/// Why the server is over capacity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OverloadCause {
    /// The global concurrency cap is reached.
    #[error("{cap} requests in flight, its global cap{}", if *queued { ", after waiting in the queue" } else { "" })]
    GlobalCap {
        /// The cap.
        cap: u32,
        /// Whether the request waited in the queue first.
        queued: bool,
    },
    /// The concurrency cap tracks at most about `max` tenants with
    /// requests in flight at once, and had no room for another one.
    #[error("about {max} tenants have requests in flight, the most tracked at once")]
    TenantsInFlight {
        /// The layer's `max_active_tenants`.
        max: usize,
    },
    /// The load shedder refused the request.
    #[error("{reason} ({in_flight} in flight, limit {limit}, {priority} priority)")]
    Shed {
        /// The request's priority.
        priority: crate::shed::Priority,
        /// Why it was chosen.
        reason: ShedReason,
        /// Requests in flight when it was refused.
        in_flight: u32,
        /// The limit in force.
        limit: u32,
    },
}

/// Why the load shedder refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShedReason {
    /// The capacity for its priority is in use.
    #[error("no capacity left for its priority")]
    Capacity,
    /// Under pressure, its tenant already had its fair share in flight.
    #[error("its tenant already has its fair share in flight")]
    FairShare,
    /// It waited in the queue as long as CoDel allows.
    #[error("it waited in the queue as long as allowed")]
    QueueTimeout,
}

#[cfg(feature = "tonic")]
impl From<Rejection> for tonic::Status {
    /// The gRPC status a tonic client would see from the layer, metadata
    /// included (`grpc-retry-pushback-ms`, `retry-after` and the
    /// `ratelimit` fields).
    fn from(rejection: Rejection) -> Self {
        let code = tonic::Code::from_i32(rejection.grpc_code().as_i32());
        let mut status = tonic::Status::new(code, rejection.to_string());
        for (name, value) in crate::response::grpc_metadata(&rejection) {
            let key = tonic::metadata::AsciiMetadataKey::from_bytes(name.as_str().as_bytes());
            let value = tonic::metadata::AsciiMetadataValue::try_from(value.as_bytes());
            if let (Ok(key), Ok(value)) = (key, value) {
                status.metadata_mut().insert(key, value);
            }
        }
        status
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Rejection {
    /// [`to_http_response`](Rejection::to_http_response), for handlers that
    /// return `Result<_, Rejection>`.
    fn into_response(self) -> axum::response::Response {
        self.to_http_response().map(axum::body::Body::from)
    }
}
