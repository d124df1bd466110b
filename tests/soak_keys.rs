//! Soak: a key-rotation attack, 10,000,000 distinct tenant keys through the
//! full stack (rate limit, concurrency cap, load shedder, heavy-hitter
//! view), keeps memory under the configured caps. Its own test binary, so
//! that the process's resident set measures this test alone. Linux only (it
//! reads `/proc/self/status`). Ten million requests take minutes unoptimised,
//! so it runs in release builds only: `cargo test --release --test soak_keys`
//! (`.ci/run` does).

#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::num::NonZeroU32;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::observe::TopTenants;
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{ConcurrencyCapLayer, Plan, Quota, RateLimitLayer, RateLimiter, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");
const KEYS: u64 = 10_000_000;
const MAX_TENANTS: usize = 100_000;

/// The process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS")
        * 1024
}

#[cfg_attr(
    debug_assertions,
    ignore = "10,000,000 requests: run with `cargo test --release --test soak_keys`"
)]
#[tokio::test]
async fn ten_million_distinct_keys_stay_under_the_caps() {
    // An hour's quota: every key stays in debt, so the limiter cannot
    // forget a key for being idle and must make room under its cap.
    let limiter = RateLimiter::builder(Quota::per_hour(NonZeroU32::MIN))
        .max_tenants(MAX_TENANTS)
        .build();
    // A window longer than the test: every request stays counted.
    let top = TopTenants::builder()
        .window(std::time::Duration::from_secs(3600))
        .build();
    let rate_limit = RateLimitLayer::new(limiter.clone())
        .key(key::header(TENANT))
        .observer(top.clone());
    let cap = ConcurrencyCapLayer::new(Plan::new("p").concurrency(4))
        .global_limit(1024)
        .key(key::header(TENANT));
    let shed = LoadShedLayer::new(Limit::fixed(1024)).key(key::header(TENANT));
    let mut svc = ServiceBuilder::new()
        .layer(rate_limit)
        .layer(cap.clone())
        .layer(shed.clone())
        .service(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(
                Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
            ))
        }));

    // Warm up with the first keys so that the fixed-size tables exist.
    let mut name = String::with_capacity(32);
    let mut send = async |i: u64| {
        name.clear();
        name.push_str("rotating-key-");
        name.push_str(itoa::Buffer::new().format(i));
        let mut req = Request::new(());
        req.headers_mut()
            .insert(TENANT, HeaderValue::from_str(&name).expect("header value"));
        let response = svc
            .ready()
            .await
            .expect("infallible")
            .call(req)
            .await
            .expect("infallible");
        response.status()
    };
    for i in 0..2 * MAX_TENANTS as u64 {
        assert_eq!(send(i).await, StatusCode::OK);
    }
    let before = rss();
    let mut refused = 0u64;
    for i in 2 * MAX_TENANTS as u64..KEYS {
        // Every key is new: each gets its one request an hour.
        if send(i).await != StatusCode::OK {
            refused += 1;
        }
    }
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{} keys: {} tenants tracked (cap {MAX_TENANTS}), resident set {} MiB, grown {} KiB over the last {} keys",
        KEYS,
        limiter.tracked_tenants(),
        rss() / (1024 * 1024),
        grown / 1024,
        KEYS - 2 * MAX_TENANTS as u64
    );

    assert_eq!(refused, 0, "a new key was refused");
    assert!(
        limiter.tracked_tenants() <= MAX_TENANTS,
        "{} tenants tracked",
        limiter.tracked_tenants()
    );
    // Nothing in flight: the cap and the shedder track no tenant.
    assert_eq!(cap.stats().tracked_tenants, 0);
    assert_eq!(cap.stats().global_in_flight, 0);
    assert_eq!(shed.stats().active_tenants, 0);
    assert_eq!(shed.stats().in_flight, 0);
    // The heavy-hitter view counted every request in its fixed memory.
    assert_eq!(top.snapshot(1).requests, KEYS);
    // 9,800,000 more keys grew the resident set by less than a few
    // megabytes: the tables were full already and stayed so.
    assert!(
        grown < 16 * 1024 * 1024,
        "the resident set grew by {grown} bytes over {} keys",
        KEYS - 2 * MAX_TENANTS as u64
    );
}
