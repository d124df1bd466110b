//! The rate-limit layer in front of a real axum 0.8 server on 127.0.0.1,
//! driven by a real HTTP client. Time is a manual clock: no test sleeps.

#![allow(clippy::expect_used)]

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use axum::Router;
use axum::extract::Extension;
use axum::routing::{get, post};
use common::{Http, serve};
use http::{HeaderName, StatusCode};
use tower_floodgate::{
    Clock, ManualClock, MissingKey, Plan, Policy, Quota, RateLimitLayer, RateLimiter, TenantKey,
    cost, key,
};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

fn limiter(policy: impl Into<tower_floodgate::PolicyHandle>) -> (RateLimiter, ManualClock) {
    let (clock, time) = Clock::manual();
    (RateLimiter::builder(policy).clock(clock).build(), time)
}

fn app<C>(layer: RateLimitLayer<key::Header, C>) -> Router
where
    C: cost::RequestCost<axum::extract::Request> + Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/other", get(|| async { "other" }))
        .layer(layer)
}

async fn statuses(http: &Http, tenant: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(http.get_as(tenant).await.status.as_u16());
    }
    out
}

#[tokio::test]
async fn one_tenant_exhausted_leaves_the_other_untouched() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(3)));
    let http = Http::new(serve(app(RateLimitLayer::new(limiter).key(key::header(TENANT)))).await);

    assert_eq!(statuses(&http, "noisy", 5).await, [200, 200, 200, 429, 429]);
    assert_eq!(statuses(&http, "quiet", 3).await, [200, 200, 200]);
}

#[tokio::test]
async fn rejection_has_exact_status_headers_and_problem_body() {
    // 3 per minute: one unit every 20 s.
    let (limiter, time) = limiter(Quota::per_minute(nz(3)));
    let http = Http::new(serve(app(RateLimitLayer::new(limiter).key(key::header(TENANT)))).await);
    statuses(&http, "a", 3).await;
    time.advance(Duration::from_millis(500));

    let reply = http.get_as("a").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    // 19.5 s to wait, rounded up.
    assert_eq!(reply.header("retry-after"), Some("20"));
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"default\";q=3;w=60")
    );
    assert_eq!(reply.header("ratelimit"), Some("\"default\";r=0;t=20"));
    let body = reply.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["title"], "Quota Exceeded");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["default"]));
    assert_eq!(body["retry_after"], 20);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("19.500s"))
    );

    // Retry-After never says 0 while a wait is needed.
    time.advance(Duration::from_millis(19_499));
    let reply = http.get_as("a").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("1"));
    time.advance(Duration::from_millis(1));
    assert_eq!(http.get_as("a").await.status, StatusCode::OK);
}

#[tokio::test]
async fn burst_then_steady_rate() {
    // 10 per second (one per 100 ms), bursts of 5.
    let (limiter, time) = limiter(Quota::per_second(nz(10)).allow_burst(nz(5)));
    let http = Http::new(serve(app(RateLimitLayer::new(limiter).key(key::header(TENANT)))).await);

    assert_eq!(
        statuses(&http, "t", 6).await,
        [200, 200, 200, 200, 200, 429]
    );
    // Steady: one more every 100 ms, not before.
    for _ in 0..5 {
        time.advance(Duration::from_millis(99));
        assert_eq!(statuses(&http, "t", 1).await, [429]);
        time.advance(Duration::from_millis(1));
        assert_eq!(statuses(&http, "t", 2).await, [200, 429]);
    }
    // A long pause refills the burst, and no more than the burst.
    time.advance(Duration::from_secs(60));
    assert_eq!(
        statuses(&http, "t", 6).await,
        [200, 200, 200, 200, 200, 429]
    );
}

#[tokio::test]
async fn policy_changes_apply_to_the_next_request() {
    let policy = Policy::builder(Plan::new("free").rate(Quota::per_hour(nz(1))))
        .tier(Plan::new("pro").rate(Quota::per_hour(nz(1_000))))
        .build()
        .expect("policy");
    let (limiter, _time) = limiter(policy);
    let handle = limiter.policy().clone();
    let http = Http::new(serve(app(RateLimitLayer::new(limiter).key(key::header(TENANT)))).await);

    assert_eq!(statuses(&http, "acme", 2).await, [200, 429]);
    let reply = http.get_as("acme").await;
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"free\";q=1;w=3600")
    );

    // Upgrade acme at run time: no restart, no new layer.
    handle
        .update(|p| p.assign("acme", "pro"))
        .expect("known tier");
    assert_eq!(statuses(&http, "acme", 3).await, [200, 200, 200]);

    // And block it with an override of its own.
    handle
        .update(|p| p.override_plan("acme", Plan::new("suspended").rate(Quota::per_day(nz(1)))))
        .expect("valid");
    let reply = http.get_as("acme").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        reply.json()["violated-policies"],
        serde_json::json!(["suspended"])
    );
}

#[tokio::test]
async fn missing_keys_are_refused_or_share_the_anonymous_bucket() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(2)));
    let base = RateLimitLayer::new(limiter).key(key::header(TENANT));

    let http = Http::new(serve(app(base.clone())).await);
    let reply = http.send("GET", "/", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(reply.json()["status"], 401);
    assert_eq!(reply.json()["detail"], "the request carries no tenant key");

    assert_eq!(reply.header("www-authenticate"), None);

    // A bearer-token tenant is told how to authenticate.
    let (limiter, _time) = self::limiter(Quota::per_hour(nz(2)));
    let bearer = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter).key(key::bearer()));
    let http = Http::new(serve(bearer).await);
    let reply = http.send("GET", "/", &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    let reply = http
        .send("GET", "/", &[("authorization", "Bearer k3y")], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let http = Http::new(serve(app(base.clone().on_missing_key(MissingKey::BadRequest))).await);
    assert_eq!(
        http.send("GET", "/", &[], "").await.status,
        StatusCode::BAD_REQUEST
    );

    // Anonymous requests all draw from one bucket; named tenants do not.
    let http = Http::new(serve(app(base.clone().on_missing_key(MissingKey::Anonymous))).await);
    let mut anonymous = Vec::new();
    for _ in 0..3 {
        anonymous.push(http.send("GET", "/", &[], "").await.status.as_u16());
    }
    assert_eq!(anonymous, [200, 200, 429]);
    assert_eq!(statuses(&http, "named", 2).await, [200, 200]);
    assert_eq!(base.stats().key_rejected, 2);
}

#[tokio::test]
async fn oversized_and_malformed_keys_are_refused_before_anything_is_stored() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(10)));
    let layer = RateLimitLayer::new(limiter.clone())
        .key(key::header(TENANT))
        .max_key_len(16);
    let http = Http::new(serve(app(layer.clone())).await);

    let at_limit = "k".repeat(16);
    assert_eq!(http.get_as(&at_limit).await.status, StatusCode::OK);
    let reply = http.get_as(&"k".repeat(17)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.json()["detail"],
        "the tenant key is 17 bytes long; at most 16 are accepted"
    );
    let reply = http
        .send("GET", "/", &[("x-tenant", "a"), ("x-tenant", "b")], "")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // Only the valid key was ever tracked.
    assert_eq!(limiter.tracked_tenants(), 1);
    assert_eq!(layer.stats().key_rejected, 2);
}

#[tokio::test]
async fn shadow_mode_admits_and_records_and_can_be_switched_off() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(2)));
    let layer = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .shadow(true);
    let http = Http::new(serve(app(layer.clone())).await);

    assert_eq!(statuses(&http, "t", 5).await, [200; 5]);
    assert_eq!(http.send("GET", "/", &[], "").await.status, StatusCode::OK);
    let stats = layer.stats();
    assert_eq!(stats.shadow_rejected, 4);
    assert_eq!(stats.rate_limited, 0);

    layer.set_shadow(false);
    assert_eq!(statuses(&http, "t", 1).await, [429]);
    assert_eq!(layer.stats().rate_limited, 1);
    assert_eq!(layer.stats().shadow_rejected, 4);
}

#[tokio::test]
async fn all_routes_share_one_limit() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(4)));
    // axum calls `layer()` once per route: the limit must still be one.
    let http = Http::new(serve(app(RateLimitLayer::new(limiter).key(key::header(TENANT)))).await);
    let mut seen = Vec::new();
    for path in ["/", "/other", "/", "/other", "/", "/other"] {
        seen.push(
            http.send("GET", path, &[("x-tenant", "t")], "")
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(seen, [200, 200, 200, 200, 429, 429]);
}

#[tokio::test]
async fn success_headers_count_down() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(3)));
    let layer = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .success_headers(true);
    let http = Http::new(serve(app(layer)).await);

    let mut seen = Vec::new();
    for _ in 0..3 {
        let reply = http.get_as("t").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"default\";q=3;w=60")
        );
        seen.push(reply.header("ratelimit").map(str::to_owned));
    }
    assert_eq!(
        seen,
        [
            Some("\"default\";r=2;t=20".to_owned()),
            Some("\"default\";r=1;t=20".to_owned()),
            Some("\"default\";r=0;t=20".to_owned()),
        ]
    );
}

#[tokio::test]
async fn weighted_costs_and_costs_above_the_burst() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(10)));
    let layer = RateLimitLayer::new(limiter)
        .key(key::header(TENANT))
        .cost(cost::header(HeaderName::from_static("x-cost")));
    let http = Http::new(serve(app(layer.clone())).await);
    let with_cost = |c: &'static str| {
        let http = http.clone();
        async move {
            http.send("GET", "/", &[("x-tenant", "t"), ("x-cost", c)], "")
                .await
        }
    };

    assert_eq!(with_cost("6").await.status, StatusCode::OK);
    assert_eq!(with_cost("5").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(with_cost("4").await.status, StatusCode::OK);

    // More than the burst can never pass: no Retry-After, a clear reason.
    let reply = with_cost("11").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), None);
    assert!(
        reply.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("can never be admitted")),
        "{}",
        reply.json()
    );

    let reply = with_cost("lots").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(layer.stats().cost_rejected, 1);
}

#[tokio::test]
async fn peer_address_from_connect_info() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(1)));
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter.clone()).key(key::peer_addr()));
    let http = Http::new(serve(app).await);
    assert_eq!(http.send("GET", "/", &[], "").await.status, StatusCode::OK);
    assert_eq!(
        http.send("GET", "/", &[], "").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert!(limiter.check("127.0.0.1", 1).is_err());
}

#[tokio::test]
async fn tenant_from_an_auth_layer_extension_and_cost_known_in_the_handler() {
    // An upstream "auth" layer sets the tenant; the layer reads it (the
    // default extractor) and the handler charges the purge's size itself.
    let (limiter, _time) = limiter(Quota::per_minute(nz(100)));
    let in_handler = limiter.clone();
    let app = Router::new()
        .route(
            "/purge",
            post(
                move |Extension(tenant): Extension<TenantKey>, body: String| {
                    let limiter = in_handler.clone();
                    async move {
                        let urls = body.lines().count() as u32;
                        match limiter.check(&tenant, urls) {
                            Ok(_) => (StatusCode::OK, format!("purged {urls}")),
                            Err(denied) => (StatusCode::TOO_MANY_REQUESTS, denied.to_string()),
                        }
                    }
                },
            ),
        )
        .layer(RateLimitLayer::new(limiter))
        .layer(axum::middleware::from_fn(
            |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                if let Some(user) = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("User "))
                {
                    let tenant = TenantKey::from(user);
                    req.extensions_mut().insert(tenant);
                }
                next.run(req).await
            },
        ));
    let http = Http::new(serve(app).await);
    let urls = "https://cdn.example/a\n".repeat(60);

    let reply = http
        .send("POST", "/purge", &[("authorization", "User acme")], &urls)
        .await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::OK, &b"purged 60"[..])
    );
    // 1 unit for the request and 60 for the URLs: 39 left, so 60 more fail.
    let reply = http
        .send("POST", "/purge", &[("authorization", "User acme")], &urls)
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let reply = http.send("POST", "/purge", &[], &urls).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn empty_requests_still_reach_the_inner_service_unchanged() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(3)));
    let app = Router::new()
        .route(
            "/echo",
            post(|body: String| async move { (StatusCode::CREATED, [("x-echo", "1")], body) }),
        )
        .layer(RateLimitLayer::new(limiter).key(key::header(TENANT)));
    let http = Http::new(serve(app).await);
    let reply = http
        .send("POST", "/echo", &[("x-tenant", "t")], "payload")
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.header("x-echo"), Some("1"));
    assert_eq!(&reply.body[..], b"payload");
}
