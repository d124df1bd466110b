//! Abuse: a handler that panics (while making its future, while running,
//! or while streaming its body) poisons no layer and leaks nothing.

#![allow(clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{ConcurrencyCapLayer, Plan, Quota, RateLimitLayer, RateLimiter, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");
const PANIC: HeaderName = HeaderName::from_static("x-panic");

type Frame = Result<http_body::Frame<Bytes>, Infallible>;

/// A body of one frame, then a panic if `panics`.
struct Frames {
    sent: bool,
    panics: bool,
}

impl Stream for Frames {
    type Item = Frame;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Frame>> {
        if !self.sent {
            self.sent = true;
            return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"a")))));
        }
        if self.panics {
            panic!("the body panics");
        }
        Poll::Ready(None)
    }
}

/// The handler's body, boxed: the layers answer with the inner service's
/// body type.
type Out = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Where the handler panics, named by the `x-panic` header.
fn handler(req: Request<()>) -> impl Future<Output = Result<Response<Out>, Infallible>> + Send {
    let mode = req
        .headers()
        .get(PANIC)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    if mode == b"call" {
        panic!("the handler panics before its future");
    }
    async move {
        if mode == b"future" {
            panic!("the handler's future panics");
        }
        Ok(Response::new(
            StreamBody::new(Frames {
                sent: false,
                panics: mode == b"body",
            })
            .boxed_unsync(),
        ))
    }
}

fn request(tenant: &str, panic: Option<&str>) -> Request<()> {
    let mut req = Request::builder().header(TENANT, tenant);
    if let Some(mode) = panic {
        req = req.header(PANIC, mode);
    }
    req.body(()).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_poisons_no_layer() {
    let limiter = RateLimiter::builder(Quota::per_second(
        NonZeroU32::new(1_000_000).expect("non-zero"),
    ))
    .build();
    let rate_limit = RateLimitLayer::new(limiter).key(key::header(TENANT));
    // One request in flight per tenant and in all: a permit that leaked
    // would refuse every later request.
    let cap = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1))
        .global_limit(1)
        .key(key::header(TENANT));
    let shed = LoadShedLayer::new(Limit::fixed(1)).key(key::header(TENANT));
    let svc = ServiceBuilder::new()
        .layer(rate_limit)
        .layer(cap.clone())
        .layer(shed.clone())
        .service(service_fn(handler));

    for round in 0..50 {
        for mode in ["call", "future", "body"] {
            let panicking = svc.clone();
            let outcome = tokio::spawn(async move {
                let response = panicking.oneshot(request("acme", Some(mode))).await?;
                // Read the body (its second frame panics in "body" mode).
                let _ = response.into_body().collect().await;
                Ok::<_, Infallible>(())
            })
            .await;
            let error = outcome.expect_err("the task panicked");
            assert!(error.is_panic(), "round {round}, {mode}: {error}");
            assert_eq!(cap.stats().global_in_flight, 0, "round {round}, {mode}");
            assert_eq!(cap.stats().tenants_in_flight, 0, "round {round}, {mode}");
            assert_eq!(shed.stats().in_flight, 0, "round {round}, {mode}");

            // The same tenant and another are served at once afterwards.
            for tenant in ["acme", "globex"] {
                let response = svc
                    .clone()
                    .oneshot(request(tenant, None))
                    .await
                    .expect("infallible");
                assert_eq!(response.status(), StatusCode::OK, "after {mode}");
                let body = response.into_body().collect().await.expect("body");
                assert_eq!(body.to_bytes(), Bytes::from_static(b"a"));
            }
        }
    }
    let stats = cap.stats();
    assert_eq!((stats.tenant_capped, stats.global_capped), (0, 0));
    assert_eq!(shed.stats().in_flight, 0);
}
