//! `FloodgateLayer`: the rate limit, concurrency cap and load shedder as one
//! layer. It must answer exactly as the three layers stacked, find the
//! tenant once, and hold and return its permits as they do; in front of a
//! real axum server on 127.0.0.1 with a real client.

#![allow(clippy::expect_used)]

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::get;
use bytes::Bytes;
use common::{Http, Reply, serve};
use http::{HeaderName, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_floodgate::shed::{CoDel, Limit, LoadShedLayer, priority};
use tower_floodgate::{
    Clock, ConcurrencyCapLayer, FloodgateLayer, ManualClock, Plan, Policy, PolicyHandle, Quota,
    RateLimitLayer, RateLimiter, TenantKey, key,
};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// Two plans (3 a minute with 2 in flight; 100 a second with 1 in flight),
/// a tenant on the second, and a blocked tenant.
fn policy() -> PolicyHandle {
    let standard = Plan::new("standard")
        .rate(Quota::per_minute(nz(3)))
        .concurrency(2);
    let solo = Plan::new("solo")
        .rate(Quota::per_second(nz(100)))
        .concurrency(1);
    PolicyHandle::new(
        Policy::builder(standard)
            .tier(solo)
            .assign("single", "solo")
            .block("banned")
            .build()
            .expect("policy"),
    )
}

/// The three layers, on one policy and a manual clock.
struct Layers {
    rate: RateLimitLayer<key::Header>,
    cap: ConcurrencyCapLayer<key::Header>,
    shed: LoadShedLayer<key::Header>,
    time: ManualClock,
}

fn layers(max_key_len: usize) -> Layers {
    let policy = policy();
    let (clock, time) = Clock::manual();
    let limiter = RateLimiter::builder(policy.clone()).clock(clock).build();
    Layers {
        rate: RateLimitLayer::new(limiter)
            .key(key::header(TENANT))
            .max_key_len(max_key_len)
            .success_headers(true),
        cap: ConcurrencyCapLayer::new(policy.clone())
            .global_limit(64)
            .key(key::header(TENANT))
            .max_key_len(max_key_len),
        // No critical reserve: normal requests may use all three units.
        shed: LoadShedLayer::new(Limit::fixed(3))
            .critical_reserve(0.0)
            .policy(policy)
            .key(key::header(TENANT)),
        time,
    }
}

/// `/` answers at once; `/hold` reports its arrival, then waits for a
/// permit of the gate.
fn app(
    layer: impl tower::Layer<
        axum::routing::Route,
        Service: tower::Service<
            Request,
            Response: axum::response::IntoResponse + 'static,
            Error: Into<std::convert::Infallible> + 'static,
            Future: Send + 'static,
        > + Clone
                     + Send
                     + Sync
                     + 'static,
    > + Clone
    + Send
    + Sync
    + 'static,
) -> (Router, Arc<Semaphore>, mpsc::UnboundedReceiver<()>) {
    let gate = Arc::new(Semaphore::new(0));
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let hold_gate = Arc::clone(&gate);
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/hold",
            get(move || {
                let (gate, arrived) = (Arc::clone(&hold_gate), arrived.clone());
                async move {
                    let _ = arrived.send(());
                    gate.acquire().await.expect("open").forget();
                    "held"
                }
            }),
        )
        .layer(layer);
    (router, gate, arrivals)
}

fn hold(http: &Http, tenant: &str) -> tokio::task::JoinHandle<StatusCode> {
    let (http, tenant) = (http.clone(), tenant.to_owned());
    tokio::spawn(async move {
        http.send("GET", "/hold", &[("x-tenant", &tenant)], "")
            .await
            .status
    })
}

/// Status, the headers the layers set, and the body, for comparison.
fn summary(reply: &Reply) -> String {
    let headers: Vec<String> = [
        "ratelimit-policy",
        "ratelimit",
        "retry-after",
        "www-authenticate",
        "content-type",
    ]
    .iter()
    .flat_map(|name| {
        reply
            .headers
            .get_all(*name)
            .iter()
            .map(move |v| format!("{name}: {}", v.to_str().unwrap_or("?")))
    })
    .collect();
    format!(
        "{} [{}] {}",
        reply.status.as_u16(),
        headers.join("; "),
        String::from_utf8_lossy(&reply.body)
    )
}

/// The same requests, at the same times, through the three layers stacked
/// and through one `FloodgateLayer` built from the same settings: the same
/// answers, headers and bodies, and the same counts.
#[tokio::test]
async fn it_answers_exactly_as_the_three_layers_stacked() {
    let stacked = layers(16);
    let combined = layers(16);
    let (stacked_app, stacked_gate, mut stacked_arrivals) = app(ServiceBuilder::new()
        .layer(stacked.rate.clone())
        .layer(stacked.cap.clone())
        .layer(stacked.shed.clone()));
    let (combined_app, combined_gate, mut combined_arrivals) = app(FloodgateLayer::new(
        key::header(TENANT),
        &combined.rate,
        &combined.cap,
        &combined.shed,
    ));
    let stacked_http = Http::new(serve(stacked_app).await);
    let combined_http = Http::new(serve(combined_app).await);

    let mut answers = Vec::new();
    for (http, gate, arrivals, time) in [
        (
            &stacked_http,
            &stacked_gate,
            &mut stacked_arrivals,
            &stacked.time,
        ),
        (
            &combined_http,
            &combined_gate,
            &mut combined_arrivals,
            &combined.time,
        ),
    ] {
        let mut seen = Vec::new();
        let get =
            async |headers: &[(&str, &str)]| summary(&http.send("GET", "/", headers, "").await);
        // Over the rate: three a minute, then 429 with its headers.
        for _ in 0..4 {
            seen.push(get(&[("x-tenant", "acme")]).await);
        }
        time.advance(Duration::from_secs(20));
        seen.push(get(&[("x-tenant", "acme")]).await);
        // No key, a key too long, a blocked tenant.
        seen.push(get(&[]).await);
        seen.push(get(&[("x-tenant", "a-key-longer-than-sixteen-bytes")]).await);
        seen.push(get(&[("x-tenant", "banned")]).await);
        // Two headers: an invalid key.
        seen.push(get(&[("x-tenant", "one"), ("x-tenant", "two")]).await);
        // At its concurrency cap of 1: 429 concurrent-requests.
        let holder = hold(http, "single");
        arrivals.recv().await.expect("arrival");
        seen.push(get(&[("x-tenant", "single")]).await);
        // Two more in flight fill the shedder's limit of 3: 503.
        let others = [hold(http, "x1"), hold(http, "x2")];
        arrivals.recv().await.expect("arrival");
        arrivals.recv().await.expect("arrival");
        seen.push(get(&[("x-tenant", "late")]).await);
        gate.add_permits(3);
        assert_eq!(holder.await.expect("task"), StatusCode::OK);
        for other in others {
            assert_eq!(other.await.expect("task"), StatusCode::OK);
        }
        seen.push(get(&[("x-tenant", "late")]).await);
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    let combined_answers = &answers[1];
    let statuses: Vec<&str> = combined_answers.iter().map(|a| &a[..3]).collect();
    assert_eq!(
        statuses,
        [
            "200", "200", "200", "429", "200", "401", "400", "403", "400", "429", "503", "200"
        ],
        "{combined_answers:#?}"
    );
    assert!(combined_answers[0].contains("ratelimit: \"standard\";r=2;t=20"));
    assert!(combined_answers[9].contains("qu=\"concurrent-requests\""));
    // The layers it was built from counted its decisions.
    assert_eq!(stacked.rate.stats(), combined.rate.stats());
    assert_eq!(stacked.cap.stats(), combined.cap.stats());
    assert_eq!(stacked.shed.stats(), combined.shed.stats());
    assert_eq!(combined.rate.stats().rate_limited, 1);
    assert_eq!(combined.cap.stats().tenant_capped, 1);
    assert_eq!(combined.shed.stats().in_flight, 0);
}

#[tokio::test]
async fn it_finds_the_tenant_once_a_request() {
    let l = layers(256);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let tenant = key::from_fn(move |req: &Request| {
        counted.fetch_add(1, Ordering::Relaxed);
        req.headers().get(TENANT).map(TenantKey::from)
    });
    let (router, _gate, _arrivals) = app(FloodgateLayer::new(tenant, &l.rate, &l.cap, &l.shed));
    let http = Http::new(serve(router).await);
    for _ in 0..5 {
        assert_eq!(http.get_as("single").await.status, StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::Relaxed), 5);
}

/// A key extractor that lends no bytes (a closure: the layers must
/// extract its key first) gets the same answers as one that does (a
/// header), refusals and their headers included, from `FloodgateLayer` and
/// from the rate limit on its own.
#[tokio::test]
async fn an_extractor_that_lends_no_bytes_gets_the_same_answers() {
    let closure = || key::from_fn(|req: &Request| req.headers().get(TENANT).map(TenantKey::from));
    let mut answers = Vec::new();
    for lends in [true, false] {
        let l = layers(16);
        let layered = |router: Router| {
            if lends {
                router.layer(FloodgateLayer::new(
                    key::header(TENANT),
                    &l.rate,
                    &l.cap,
                    &l.shed,
                ))
            } else {
                router.layer(FloodgateLayer::new(closure(), &l.rate, &l.cap, &l.shed))
            }
        };
        let floodgate =
            Http::new(serve(layered(Router::new().route("/", get(|| async { "ok" })))).await);
        let rate = RateLimitLayer::new(
            RateLimiter::builder(policy())
                .clock(Clock::manual().0)
                .build(),
        )
        .success_headers(true);
        let rate = if lends {
            Router::new()
                .route("/", get(|| async { "ok" }))
                .layer(rate.key(key::header(TENANT)))
        } else {
            Router::new()
                .route("/", get(|| async { "ok" }))
                .layer(rate.key(closure()))
        };
        let rate = Http::new(serve(rate).await);
        let mut seen = Vec::new();
        for http in [&floodgate, &rate] {
            for tenant in [
                "acme",
                "acme",
                "acme",
                "acme",
                "banned",
                "a-key-longer-than-sixteen-bytes",
            ] {
                seen.push(summary(&http.get_as(tenant).await));
            }
            seen.push(summary(&http.send("GET", "/", &[], "").await));
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    let statuses: Vec<&str> = answers[0].iter().map(|a| &a[..3]).collect();
    assert_eq!(
        statuses,
        [
            "200", "200", "200", "429", "403", "400", "401", "200", "200", "200", "429", "403",
            "200", "401"
        ],
        "{:#?}",
        answers[0]
    );
    assert!(
        answers[0][3].contains("retry-after: 20"),
        "{}",
        answers[0][3]
    );
}

#[tokio::test]
async fn the_permits_are_held_until_a_streaming_body_is_done() {
    let l = layers(256);
    let (download, chunks_tx) = common::download();
    let router = download.layer(FloodgateLayer::new(
        key::header(TENANT),
        &l.rate,
        &l.cap,
        &l.shed,
    ));
    let http = Http::new(serve(router).await);

    let body = http.start_download("single", &chunks_tx).await;
    // The handler has returned; the body still streams and holds both.
    assert_eq!(
        http.get_as("single").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(l.cap.stats().tenants_in_flight, 1);
    assert_eq!(l.cap.stats().global_in_flight, 1);
    assert_eq!(l.shed.stats().in_flight, 1);

    drop(chunks_tx);
    body.collect().await.expect("rest");
    assert_eq!(http.get_as("single").await.status, StatusCode::OK);
    let (c, s) = (l.cap.stats(), l.shed.stats());
    assert_eq!(
        (c.tenants_in_flight, c.global_in_flight, s.in_flight),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn critical_requests_keep_their_share_while_sheddable_ones_are_refused() {
    let l = layers(256);
    let shed = l
        .shed
        .clone()
        .critical_reserve(0.34)
        .priority(priority::header(HeaderName::from_static("x-class")));
    let (router, gate, _arrivals) = app(FloodgateLayer::new(
        key::header(TENANT),
        &l.rate,
        &l.cap,
        &shed,
    ));
    let http = Http::new(serve(router).await);
    // Two normal requests fill what normal traffic may use of 3.
    let held: Vec<_> = ["a", "b"].iter().map(|t| hold(&http, t)).collect();
    while shed.stats().in_flight < 2 {
        tokio::task::yield_now().await;
    }
    let as_class = |tenant: &'static str, class: &'static str| {
        let http = http.clone();
        async move {
            http.send("GET", "/", &[("x-tenant", tenant), ("x-class", class)], "")
                .await
                .status
        }
    };
    assert_eq!(
        as_class("c", "sheddable").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        as_class("c", "normal").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(as_class("c", "critical").await, StatusCode::OK);
    gate.add_permits(2);
    for task in held {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(shed.stats().in_flight, 0);
}

#[tokio::test]
async fn a_request_that_waits_in_the_caps_queue_is_served_in_turn() {
    let l = layers(256);
    let cap = l.cap.clone().queue(4, Duration::from_secs(5));
    let (router, gate, mut arrivals) = app(FloodgateLayer::new(
        key::header(TENANT),
        &l.rate,
        &cap,
        &l.shed,
    ));
    let http = Http::new(serve(router).await);
    let first = hold(&http, "single");
    arrivals.recv().await.expect("arrival");
    // The tenant's one seat is taken: the second waits in the queue.
    let second = hold(&http, "single");
    while cap.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    assert_eq!(first.await.expect("task"), StatusCode::OK);
    arrivals
        .recv()
        .await
        .expect("the second arrives once the first is done");
    gate.add_permits(1);
    assert_eq!(second.await.expect("task"), StatusCode::OK);
    let (c, s) = (cap.stats(), l.shed.stats());
    assert_eq!((c.waiting, c.tenants_in_flight, s.in_flight), (0, 0, 0));
}

#[tokio::test]
async fn a_request_that_waits_in_the_shedders_queue_is_served_in_turn() {
    let l = layers(256);
    let shed = l.shed.clone().fairness(false).queue(
        4,
        CoDel {
            target: Duration::from_secs(5),
            interval: Duration::from_secs(10),
        },
    );
    let (router, gate, mut arrivals) = app(FloodgateLayer::new(
        key::header(TENANT),
        &l.rate,
        &l.cap,
        &shed,
    ));
    let http = Http::new(serve(router).await);
    let held: Vec<_> = ["a", "b", "c"].iter().map(|t| hold(&http, t)).collect();
    for _ in 0..3 {
        arrivals.recv().await.expect("arrival");
    }
    let waiting = hold(&http, "d");
    while shed.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    // The cap's permit is held while it waits in the shedder's queue.
    assert_eq!(l.cap.stats().global_in_flight, 4);
    gate.add_permits(1);
    arrivals.recv().await.expect("the fourth arrives");
    gate.add_permits(3);
    for task in held {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(waiting.await.expect("task"), StatusCode::OK);
    let (c, s) = (l.cap.stats(), shed.stats());
    assert_eq!((c.global_in_flight, s.in_flight, s.waiting), (0, 0, 0));
}

/// Requests abandoned before, while and after they are admitted (client
/// timeouts, queues, streaming bodies dropped half read) give everything
/// back.
#[tokio::test(start_paused = true)]
async fn cancelled_requests_leave_nothing_behind() {
    let policy = PolicyHandle::from(
        Plan::new("p")
            .rate(Quota::per_second(NonZeroU32::MAX))
            .concurrency(2),
    );
    let rate = RateLimitLayer::new(
        RateLimiter::builder(policy.clone())
            .clock(Clock::tokio())
            .build(),
    );
    let cap = ConcurrencyCapLayer::new(policy.clone())
        .global_limit(12)
        .queue(2, Duration::from_millis(5));
    let shed = LoadShedLayer::new(Limit::fixed(8))
        .clock(Clock::tokio())
        .policy(policy)
        .queue(2, CoDel::default());
    let svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed))
        .service(tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::from_stream(
                tokio_stream::iter([
                    Ok::<_, std::io::Error>(Bytes::from_static(b"a")),
                    Ok(Bytes::from_static(b"b")),
                ])
                .then(|chunk| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    chunk
                }),
            )))
        }));
    let mut tasks = Vec::new();
    for i in 0..4_000u64 {
        // About eight a millisecond: some served, some queued, some refused.
        if i % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let svc = svc.clone();
        let req = http::Request::builder()
            .header(TENANT, format!("tenant-{}", i % 7))
            .body(())
            .expect("request");
        let abandon_after = Duration::from_micros(i * 7919 % 6_000);
        tasks.push(tokio::spawn(async move {
            // 0: abandoned before its answer; 1: refused; 2: abandoned
            // mid-body; 3: read to the end.
            let outcome = Arc::new(AtomicUsize::new(0));
            let seen = Arc::clone(&outcome);
            let exchange = async move {
                let response = svc.oneshot(req).await.expect("infallible");
                if response.status() != StatusCode::OK {
                    seen.store(1, Ordering::Relaxed);
                    return;
                }
                seen.store(2, Ordering::Relaxed);
                let mut body = response.into_body();
                while body.frame().await.is_some() {}
                seen.store(3, Ordering::Relaxed);
            };
            let _ = tokio::time::timeout(abandon_after, exchange).await;
            outcome.load(Ordering::Relaxed)
        }));
    }
    let mut outcomes = [0u32; 4];
    for task in tasks {
        outcomes[task.await.expect("task")] += 1;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c, s) = (cap.stats(), shed.stats());
    assert_eq!(
        (c.global_in_flight, c.tenants_in_flight, c.waiting),
        (0, 0, 0),
        "{c:?}"
    );
    assert_eq!((s.in_flight, s.waiting), (0, 0), "{s:?}");
    // Every ending happened: the test did cancel admitted requests.
    assert!(outcomes.iter().all(|&n| n > 50), "{outcomes:?}");
}
