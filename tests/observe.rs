//! Observability and operations against a real axum server on 127.0.0.1:
//! what the observer hears, the heavy-hitter view, bounded logs, blocking a
//! tenant and switching shadow mode at run time.

#![allow(clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use common::{Http, serve};
use http::{HeaderName, StatusCode};
use parking_lot::Mutex;
use tower_floodgate::observe::{self, Dashboard, Decision, LayerKind, TopTenants};
use tower_floodgate::{
    Clock, ConcurrencyCapLayer, Plan, Policy, PolicyHandle, Quota, RateLimitLayer, RateLimiter, key,
};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// Events counted by (layer, decision, tenant).
type Counts = HashMap<(LayerKind, Decision, String), u64>;

/// Counts every event.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<Counts>>);

impl Tally {
    fn observer(&self) -> impl observe::Observer {
        let tally = Arc::clone(&self.0);
        observe::from_fn(move |event| {
            let tenant = event
                .tenant
                .map_or_else(|| "-".to_owned(), ToString::to_string);
            *tally
                .lock()
                .entry((event.layer, event.decision, tenant))
                .or_default() += 1;
        })
    }

    fn get(&self, layer: LayerKind, decision: Decision, tenant: &str) -> u64 {
        self.0
            .lock()
            .get(&(layer, decision, tenant.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn total(&self, layer: LayerKind, decision: Decision) -> u64 {
        self.0
            .lock()
            .iter()
            .filter(|((l, d, _), _)| *l == layer && *d == decision)
            .map(|(_, n)| n)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_hears_exactly_the_decisions_made() {
    let (clock, _time) = Clock::manual();
    let policy = PolicyHandle::new(Policy::new(
        Plan::new("standard")
            .rate(Quota::per_minute(nz(50)))
            .concurrency(64),
    ));
    let limiter = RateLimiter::builder(policy.clone()).clock(clock).build();
    let tally = Tally::default();
    let rate_limit = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .observer(tally.observer());
    let cap = ConcurrencyCapLayer::new(policy)
        .key(key::header(TENANT))
        .observer(tally.observer());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(cap.clone())
        .layer(rate_limit.clone());
    let http = Http::new(serve(app).await);

    // One tenant floods (300 requests), twenty others send 10 each.
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = HashMap::<(String, u16), u64>::new();
            for i in 0..75 {
                let reply = http.get_as("flooder").await;
                *seen
                    .entry(("flooder".into(), reply.status.as_u16()))
                    .or_default() += 1;
                if i % 3 == 0 {
                    let tenant = format!("tenant-{}", (worker * 25 + i / 3) % 20);
                    let reply = http.get_as(&tenant).await;
                    *seen.entry((tenant, reply.status.as_u16())).or_default() += 1;
                }
            }
            seen
        }));
    }
    let mut seen = HashMap::<(String, u16), u64>::new();
    for task in tasks {
        for (k, v) in task.await.expect("task") {
            *seen.entry(k).or_default() += v;
        }
    }

    // The flooder got its burst of 50 and 250 refusals; the others all
    // their requests.
    assert_eq!(seen.get(&("flooder".into(), 200)), Some(&50));
    assert_eq!(seen.get(&("flooder".into(), 429)), Some(&250));
    let others_ok: u64 = seen
        .iter()
        .filter(|((t, s), _)| t != "flooder" && *s == 200)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(others_ok, 100);

    // The observer heard exactly that, per layer.
    assert_eq!(
        tally.get(LayerKind::RateLimit, Decision::Admitted, "flooder"),
        50
    );
    assert_eq!(
        tally.get(LayerKind::RateLimit, Decision::RateLimited, "flooder"),
        250
    );
    assert_eq!(tally.total(LayerKind::RateLimit, Decision::Admitted), 150);
    assert_eq!(
        tally.total(LayerKind::RateLimit, Decision::RateLimited),
        250
    );
    // Only admitted requests reach the cap, which admits all of them.
    assert_eq!(
        tally.total(LayerKind::ConcurrencyCap, Decision::Admitted),
        150
    );
    assert_eq!(
        tally.get(LayerKind::ConcurrencyCap, Decision::Admitted, "flooder"),
        50
    );
    let events: u64 = tally.0.lock().values().sum();
    assert_eq!(events, 400 + 150, "one event per request per layer");
    // And it agrees with the layer's own counters.
    assert_eq!(rate_limit.stats().rate_limited, 250);
}

#[tokio::test]
async fn block_and_unblock_take_effect_on_the_next_request() {
    let policy = PolicyHandle::new(Policy::new(
        Plan::new("standard")
            .rate(Quota::per_second(nz(1_000)))
            .concurrency(8),
    ));
    let limiter = RateLimiter::new(policy.clone());
    let tally = Tally::default();
    let rate_limit = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .observer(tally.observer());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(ConcurrencyCapLayer::new(policy.clone()).key(key::header(TENANT)))
        .layer(rate_limit.clone());
    let http = Http::new(serve(app).await);

    assert_eq!(http.get_as("acme").await.status, StatusCode::OK);
    policy.block("acme");
    let reply = http.get_as("acme").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let body = reply.json();
    assert_eq!(body["status"], 403);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("acme") && d.contains("blocked")),
        "{body}"
    );
    // Others are untouched.
    assert_eq!(http.get_as("globex").await.status, StatusCode::OK);
    assert!(policy.current().is_blocked("acme"));
    assert_eq!(rate_limit.stats().blocked, 1);
    assert_eq!(
        tally.get(LayerKind::RateLimit, Decision::Blocked, "acme"),
        1
    );

    policy.unblock("acme");
    assert_eq!(http.get_as("acme").await.status, StatusCode::OK);
    assert!(!policy.current().is_blocked("acme"));
}

#[tokio::test]
async fn a_block_holds_in_every_layer_that_reads_the_policy() {
    // No rate limit layer: the concurrency cap enforces the block itself,
    // even though no plan caps tenants.
    let policy = PolicyHandle::new(Policy::new(Plan::new("standard")));
    let cap = ConcurrencyCapLayer::new(policy.clone())
        .key(key::header(TENANT))
        .global_limit(100);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(cap.clone());
    let http = Http::new(serve(app).await);
    assert_eq!(http.get_as("acme").await.status, StatusCode::OK);
    policy.block("acme");
    assert_eq!(http.get_as("acme").await.status, StatusCode::FORBIDDEN);
    assert_eq!(http.get_as("globex").await.status, StatusCode::OK);
    // A request without a key is not refused for it.
    let anonymous = http.send("GET", "/", &[], "").await;
    assert_eq!(anonymous.status, StatusCode::OK);
    assert_eq!(cap.stats().blocked, 1);
    policy.unblock("acme");
    assert_eq!(http.get_as("acme").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_switches_on_and_off_under_traffic() {
    let (clock, _time) = Clock::manual();
    let policy = PolicyHandle::new(Policy::new(
        Plan::new("standard").rate(Quota::per_minute(nz(5))),
    ));
    let limiter = RateLimiter::builder(policy.clone()).clock(clock).build();
    let tally = Tally::default();
    let rate_limit = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .observer(tally.observer());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(rate_limit.clone());
    let http = Http::new(serve(app).await);

    // Background traffic from other tenants the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let background = {
        let (http, stop, sent) = (http.clone(), Arc::clone(&stop), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                http.get_as(&format!("bg-{}", i % 50)).await;
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    let run = |n| {
        let http = http.clone();
        async move {
            let mut statuses = Vec::new();
            for _ in 0..n {
                statuses.push(http.get_as("heavy").await.status.as_u16());
            }
            statuses
        }
    };
    assert_eq!(run(7).await, [200, 200, 200, 200, 200, 429, 429]);

    policy.set_shadow(LayerKind::RateLimit, true);
    assert!(rate_limit.is_shadow());
    assert_eq!(run(5).await, [200; 5], "shadow mode admits");
    assert_eq!(
        tally.get(LayerKind::RateLimit, Decision::ShadowRejected, "heavy"),
        5
    );

    policy.set_shadow(LayerKind::RateLimit, false);
    assert!(!rate_limit.is_shadow());
    assert_eq!(run(3).await, [429; 3], "enforcing again");

    // A change of something else keeps the mode.
    rate_limit.set_shadow(true);
    policy.block("nobody");
    assert!(rate_limit.is_shadow());
    rate_limit.set_shadow(false);

    stop.store(true, Ordering::Relaxed);
    background.await.expect("background");
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(rate_limit.stats().shadow_rejected, 5);
}

#[tokio::test]
async fn the_dashboard_shows_every_layer_in_one_call() {
    let policy = PolicyHandle::new(Policy::new(
        Plan::new("standard")
            .rate(Quota::per_minute(nz(2)))
            .concurrency(4),
    ));
    let top = TopTenants::new();
    let rate_limit = RateLimitLayer::new(RateLimiter::new(policy.clone()))
        .key(key::header(TENANT))
        .observer(top.clone());
    let cap = ConcurrencyCapLayer::new(policy).key(key::header(TENANT));
    let dashboard = Dashboard::new()
        .rate_limit("api", &rate_limit)
        .concurrency_cap("api", &cap)
        .top_tenants(&top, 3);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(cap.clone())
        .layer(rate_limit.clone());
    let http = Http::new(serve(app).await);
    for _ in 0..5 {
        http.get_as("a").await;
    }
    http.get_as("b").await;

    let snapshot = dashboard.snapshot();
    assert_eq!(snapshot.rate_limits.len(), 1);
    assert_eq!(snapshot.rate_limits[0].name, "api");
    assert_eq!(snapshot.rate_limits[0].stats.rate_limited, 3);
    assert_eq!(snapshot.rate_limits[0].stats.limiter.tracked_tenants, 2);
    assert_eq!(snapshot.concurrency_caps[0].stats.tenants_in_flight, 0);
    let top = snapshot.top_tenants.expect("top tenants");
    assert_eq!(top.requests, 6);
    assert_eq!(top.by_requests[0].tenant.as_bytes(), b"a");
    assert_eq!(top.by_requests[0].count, 5);
    assert_eq!(top.by_rejections[0].tenant.as_bytes(), b"a");
    assert_eq!(top.by_rejections[0].count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_top_tenants_name_the_flooder_with_its_true_share() {
    let top = TopTenants::new();
    let (clock, _time) = Clock::manual();
    let limiter = RateLimiter::builder(Quota::per_minute(nz(100)))
        .clock(clock)
        .build();
    let rate_limit = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .observer(top.clone());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(rate_limit);
    let http = Http::new(serve(app).await);
    let memory = top.memory_bytes();

    // The flooder on 3 connections; 40 regular tenants and 1,500 one-off
    // tenants (key rotation) on a fourth.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..800 {
                http.get_as("flooder").await;
            }
            800u64
        }));
    }
    let others = {
        let http = http.clone();
        tokio::spawn(async move {
            for i in 0..1_500u64 {
                http.get_as(&format!("regular-{}", i % 40)).await;
                http.get_as(&format!("one-off-{i}")).await;
            }
            3_000u64
        })
    };
    let mut flooder = 0;
    for task in tasks {
        flooder += task.await.expect("flooder");
    }
    let total = flooder + others.await.expect("others");

    let snapshot = top.snapshot(5);
    assert_eq!(snapshot.requests, total);
    let first = &snapshot.by_requests[0];
    assert_eq!(first.tenant.as_bytes(), b"flooder");
    let truth = flooder as f64 / total as f64;
    assert!(
        (first.share - truth).abs() < 0.03,
        "share {} against {truth}",
        first.share
    );
    // It is also the one refused: 2,400 requests, 100 admitted.
    let refused = &snapshot.by_rejections[0];
    assert_eq!(refused.tenant.as_bytes(), b"flooder");
    assert!(
        refused.count.abs_diff(2_300) <= refused.error,
        "{refused:?}"
    );
    assert_eq!(snapshot.rejections, 2_300);
    // 1,540 distinct tenants went by; the view did not grow.
    assert_eq!(top.memory_bytes(), memory);
}

/// Lines written by a `tracing` subscriber.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_100_000_refusals_logs_a_bounded_number_of_lines() {
    use tower::{Service, ServiceExt};

    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (clock, time) = Clock::manual();
    let limiter = RateLimiter::builder(Quota::per_hour(nz(1)))
        .clock(clock.clone())
        .build();
    let layer = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .observer(observe::Tracing::new().clock(clock));
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|_: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
        }));
    let request = || {
        http::Request::builder()
            .header("x-tenant", "flooder")
            .body(String::new())
            .expect("request")
    };
    let mut refused = 0;
    for _ in 0..100_000 {
        let reply = svc.ready().await.expect("ready").call(request()).await;
        refused += usize::from(reply.expect("reply").status() == StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(refused, 99_999);
    // One line for the whole flood in this second.
    let logged = lines.lines();
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert!(
        logged[0].contains("INFO") && logged[0].contains("flooder"),
        "{}",
        logged[0]
    );
    assert!(
        logged[0].contains("decision=\"rate_limited\""),
        "{}",
        logged[0]
    );

    // The next second's line says how many were left out.
    time.advance(Duration::from_secs(1));
    let reply = svc.ready().await.expect("ready").call(request()).await;
    assert_eq!(
        reply.expect("reply").status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let logged = lines.lines();
    assert_eq!(logged.len(), 2, "{logged:#?}");
    assert!(logged[1].contains("suppressed=99998"), "{}", logged[1]);
}

#[cfg(feature = "serde")]
#[tokio::test]
async fn the_snapshot_serialises_for_an_admin_endpoint() {
    let policy = PolicyHandle::new(Policy::new(
        Plan::new("standard").rate(Quota::per_minute(nz(1))),
    ));
    let top = TopTenants::new();
    let rate_limit = RateLimitLayer::new(RateLimiter::new(policy))
        .key(key::header(TENANT))
        .observer(top.clone());
    let dashboard = Dashboard::new()
        .rate_limit("api", &rate_limit)
        .top_tenants(&top, 3);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(rate_limit);
    let http = Http::new(serve(app).await);
    http.get_as("a").await;
    http.get_as("a").await;

    let json = serde_json::to_value(dashboard.snapshot()).expect("serialises");
    assert_eq!(json["rate_limits"][0]["name"], "api");
    assert_eq!(json["rate_limits"][0]["stats"]["rate_limited"], 1);
    assert_eq!(
        json["rate_limits"][0]["stats"]["limiter"]["tracked_tenants"],
        1
    );
    assert_eq!(json["top_tenants"]["requests"], 2);
    assert_eq!(json["top_tenants"]["by_requests"][0]["tenant"], "a");
    assert_eq!(json["top_tenants"]["by_rejections"][0]["count"], 1);
    assert!(json["top_tenants"]["window"].as_f64().is_some());
}
