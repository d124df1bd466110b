//! Soak: a million requests through the full stack (rate limit, concurrency
//! cap with its queue, load shedder with its queue, request coalescing),
//! each abandoned at a random point: before it is admitted, in a queue, in
//! the handler, or halfway through its body. Afterwards no permit, queue
//! entry or coalescing entry is left. On tokio's paused clock, so it takes
//! no wall time beyond the work; a million requests still take minutes
//! unoptimised, so it runs in release builds only:
//! `cargo test --release --test soak_cancel` (`.ci/run` does).

#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::coalesce::{CoalesceLayer, JoinMode};
use tower_floodgate::shed::{CoDel, Limit, LoadShedLayer};
use tower_floodgate::{
    Clock, ConcurrencyCapLayer, FloodgateLayer, Plan, Quota, RateLimitLayer, RateLimiter, key,
};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");
const REQUESTS: u64 = 1_000_000;
const BATCH: u64 = 2_000;

/// A body of three frames, a millisecond apart.
struct Slow {
    left: u8,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Slow {
    fn new() -> Self {
        Self {
            left: 3,
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(1))),
        }
    }
}

impl http_body::Body for Slow {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        ready!(self.sleep.as_mut().poll(cx));
        self.left -= 1;
        let next = tokio::time::Instant::now() + Duration::from_millis(1);
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            self.left;
            8
        ])))))
    }
}

/// 0 to 3 ms in the handler, by path.
/// The layers answer with the inner service's body type: boxed.
type Out = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn handler(req: Request<Full<Bytes>>) -> Result<Response<Out>, Infallible> {
    let ms = req.uri().path().len() as u64 % 4;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Response::new(Slow::new().boxed_unsync()))
}

/// A small xorshift generator: the same points on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[cfg_attr(
    debug_assertions,
    ignore = "1,000,000 requests: run with `cargo test --release --test soak_cancel`"
)]
#[tokio::test(start_paused = true)]
async fn a_million_cancellations_leave_nothing_behind() {
    soak(false).await;
}

/// The same through one `FloodgateLayer` (rate limit, cap and shedder in
/// one future and one body) instead of the three layers stacked.
#[cfg_attr(
    debug_assertions,
    ignore = "1,000,000 requests: run with `cargo test --release --test soak_cancel`"
)]
#[tokio::test(start_paused = true)]
async fn a_million_cancellations_through_one_floodgate_layer_leave_nothing_behind() {
    soak(true).await;
}

async fn soak(combined: bool) {
    let limiter = RateLimiter::builder(Quota::per_second(NonZeroU32::MAX))
        .clock(Clock::tokio())
        .build();
    let rate = RateLimitLayer::new(limiter).key(key::header(TENANT));
    let cap = ConcurrencyCapLayer::new(Plan::new("p").concurrency(3))
        .global_limit(24)
        .queue(64, Duration::from_millis(4))
        .key(key::header(TENANT));
    let shed = LoadShedLayer::new(Limit::fixed(16))
        .clock(Clock::tokio())
        .queue(32, CoDel::default())
        .key(key::header(TENANT));
    let coalesce = CoalesceLayer::new(JoinMode::InFlight).tenant(key::header(TENANT));
    let svc = if combined {
        ServiceBuilder::new()
            .layer(FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed))
            .layer(coalesce.clone())
            .service(service_fn(handler))
            .boxed_clone()
    } else {
        ServiceBuilder::new()
            .layer(rate)
            .layer(cap.clone())
            .layer(shed.clone())
            .layer(coalesce.clone())
            .service(service_fn(handler))
            .boxed_clone()
    };

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut outcomes = [0u64; 4]; // served, refused, abandoned early, abandoned mid-body
    for _ in 0..REQUESTS / BATCH {
        let mut tasks = Vec::with_capacity(BATCH as usize);
        for i in 0..BATCH {
            // About four requests a millisecond: around what the stack
            // serves, so requests are served, queued, refused and abandoned.
            if i % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let tenant = format!("tenant-{}", rng.below(12));
            // A few paths, so that identical requests coalesce.
            let path = format!("/{}", "x".repeat(rng.below(6) as usize));
            let abandon_after = Duration::from_micros(rng.below(9_000));
            let read_frames = rng.below(4);
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::builder()
                    .uri(path)
                    .header(TENANT, tenant)
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let exchange = async move {
                    let response = svc.oneshot(req).await.expect("infallible");
                    if response.status() != StatusCode::OK {
                        return 1;
                    }
                    let mut body = response.into_body();
                    for _ in 0..read_frames {
                        if body.frame().await.is_none() {
                            break;
                        }
                    }
                    // Dropped here: mid-body unless it read all three.
                    if read_frames >= 3 { 0 } else { 3 }
                };
                tokio::time::timeout(abandon_after, exchange)
                    .await
                    .unwrap_or(2)
            }));
        }
        for task in tasks {
            outcomes[task.await.expect("task")] += 1;
        }
    }
    // Let every deadline and timer run out.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let c = cap.stats();
    assert_eq!(
        (
            c.global_in_flight,
            c.tenants_in_flight,
            c.waiting,
            c.tracked_tenants
        ),
        (0, 0, 0, 0),
        "{c:?}"
    );
    let s = shed.stats();
    assert_eq!(
        (s.in_flight, s.waiting, s.active_tenants),
        (0, 0, 0),
        "{s:?}"
    );
    let k = coalesce.stats();
    assert_eq!(k.active_keys, 0, "{k:?}");
    // Every kind of ending happened, many times over.
    assert_eq!(outcomes.iter().sum::<u64>(), REQUESTS);
    assert!(outcomes.iter().all(|&n| n > 10_000), "{outcomes:?}");
    assert!(k.coalesced > 0, "{k:?}");
    eprintln!(
        "served {}, refused {}, abandoned before the body {}, mid-body {}; coalesced {}",
        outcomes[0], outcomes[1], outcomes[2], outcomes[3], k.coalesced
    );
}
