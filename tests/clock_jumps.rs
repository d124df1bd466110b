//! The injected clock jumping backwards and far forwards: no layer panics,
//! and no jump admits more than the quota's burst at once.

#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::observe::TopTenants;
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{Clock, ManualClock, Quota, RateLimitLayer, RateLimiter, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// 10 a second, bursts of 10, on a manual clock.
fn limiter() -> (RateLimiter, ManualClock) {
    let (clock, time) = Clock::manual();
    (
        RateLimiter::builder(Quota::per_second(nz(10)))
            .clock(clock)
            .build(),
        time,
    )
}

/// How many of `n` requests costing `cost` the limiter admits now.
fn admitted(limiter: &RateLimiter, tenant: &str, n: u32, cost: u32) -> u32 {
    (0..n)
        .map(|_| u32::from(limiter.check(tenant, cost).is_ok()))
        .sum()
}

#[test]
fn a_backward_jump_admits_nothing_new_and_panics_nowhere() {
    let (limiter, time) = limiter();
    time.set(Duration::from_secs(100));
    assert_eq!(admitted(&limiter, "a", 50, 1), 10, "one burst");
    // Back by 90 s: the tenant's debt now lies 90 s ahead; nothing passes,
    // and the wait it is told covers the jump.
    time.set(Duration::from_secs(10));
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    let denied = limiter.check("a", 1).expect_err("denied");
    assert!(
        denied
            .retry_after()
            .is_some_and(|w| w >= Duration::from_secs(90)),
        "{denied:?}"
    );
    // A tenant first seen after the jump gets one burst, no more.
    assert_eq!(admitted(&limiter, "b", 50, 1), 10);
    // Back at the old time plus one second: one second's worth.
    time.set(Duration::from_secs(101));
    assert_eq!(admitted(&limiter, "a", 50, 1), 10);
    // Back to the epoch itself.
    time.set(Duration::ZERO);
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    assert_eq!(admitted(&limiter, "b", 50, 1), 0);
}

#[test]
fn a_far_forward_jump_admits_one_burst_at_most() {
    let (limiter, time) = limiter();
    assert_eq!(admitted(&limiter, "a", 50, 1), 10);
    // A year ahead: the bucket is full again, once.
    time.set(Duration::from_secs(365 * 24 * 3600));
    assert_eq!(admitted(&limiter, "a", 50, 1), 10);
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    // The end of the clock (it saturates after 584 years): still one burst,
    // and weighted costs add up to it, not past it.
    time.set(Duration::MAX);
    assert_eq!(admitted(&limiter, "a", 50, 1), 10);
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    assert_eq!(admitted(&limiter, "c", 50, 4), 2, "8 of 10 for costs of 4");
    assert_eq!(admitted(&limiter, "c", 50, 1), 2);
    assert_eq!(admitted(&limiter, "c", 50, 1), 0);
    // Moving on from the end changes nothing: the clock cannot pass it.
    time.advance(Duration::from_secs(3600));
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    // And back from the end to the start.
    time.set(Duration::ZERO);
    assert_eq!(admitted(&limiter, "a", 50, 1), 0);
    assert_eq!(admitted(&limiter, "d", 50, 1), 10);
}

#[tokio::test]
async fn the_layers_and_the_heavy_hitter_view_survive_jumps() {
    let (clock, time) = Clock::manual();
    let limiter = RateLimiter::builder(Quota::per_second(nz(10)))
        .clock(clock.clone())
        .build();
    let top = TopTenants::builder().clock(clock.clone()).build();
    let shed = LoadShedLayer::new(Limit::adaptive(Duration::from_millis(50)))
        .clock(clock)
        .key(key::header(TENANT));
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(limiter)
                .key(key::header(TENANT))
                .observer(top.clone()),
        )
        .layer(shed.clone())
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(
                Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
            ))
        }));
    let request = || {
        Request::builder()
            .header(TENANT, "acme")
            .body(())
            .expect("request")
    };
    let mut served = 0;
    for at in [
        Duration::from_secs(100),
        Duration::from_secs(5),
        Duration::MAX,
        Duration::ZERO,
        Duration::from_secs(1),
    ] {
        time.set(at);
        for _ in 0..20 {
            // Time also jumps while each request is in flight (latency
            // samples of the adaptive limit go negative or huge).
            let response = svc.clone().oneshot(request()).await.expect("infallible");
            time.set(at.saturating_sub(Duration::from_secs(3)));
            let status = response.status();
            let _ = response.into_body().collect().await;
            time.set(at);
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "{status} at {at:?}"
            );
            served += u32::from(status == StatusCode::OK);
        }
    }
    // One burst at 100 s, nothing after the jump back to 5 s, one burst at
    // the end of the clock, nothing after the jump back to the start, and
    // nothing at 1 s (the debt from 100 s lies far ahead).
    assert_eq!(served, 20);
    assert_eq!(shed.stats().in_flight, 0);
    let snapshot = top.snapshot(3);
    assert_eq!(snapshot.by_requests.len(), 1);
}
