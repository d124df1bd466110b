//! The `cdn_purge_api` example's router on 127.0.0.1:0, driven by a real
//! HTTP client: every status it answers, its headers, coalescing, live plan
//! changes and blocks, and (with the `redis` feature) two instances sharing
//! a tenant's quota through Redis.

#![allow(clippy::expect_used, clippy::panic)]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cdn_purge_api/app/mod.rs"]
mod app;
mod common;

use std::time::Duration;

use common::{Http, Reply, serve};
use http::StatusCode;
use serde_json::{Value, json};

use app::backend::BackendConfig;
use app::config::Config;
use app::{App, Options};

const ADMIN: &str = "admin-key-for-tests";

/// Plans small enough to exhaust in a test.
fn config() -> Config {
    Config::parse(include_str!("common/tenants.toml")).expect("a valid config")
}

fn options() -> Options {
    Options {
        log: false,
        ..Options::default()
    }
}

async fn start(options: Options) -> (Http, App) {
    let app = app::build(&config(), &options).expect("app");
    let http = Http::new(serve(app.router.clone()).await);
    (http, app)
}

async fn purge(http: &Http, key: &str, body: &Value) -> Reply {
    http.send(
        "POST",
        "/v1/purge",
        &[("authorization", &format!("Bearer {key}"))],
        &body.to_string(),
    )
    .await
}

fn urls(n: usize) -> Value {
    let urls: Vec<String> = (0..n)
        .map(|i| format!("https://cdn.example.com/{i}.png"))
        .collect();
    json!({ "urls": urls })
}

async fn stats(http: &Http) -> Value {
    let reply = http
        .send(
            "GET",
            "/v1/stats",
            &[("authorization", &format!("Bearer {ADMIN}"))],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

fn assert_problem(reply: &Reply, status: StatusCode, detail: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let body = reply.json();
    assert_eq!(body["status"], status.as_u16());
    let text = body["detail"].as_str().unwrap_or_default();
    assert!(text.contains(detail), "`{text}` lacks `{detail}`");
}

#[tokio::test]
async fn a_purge_answers_each_target_with_its_batch() {
    let (http, _app) = start(options()).await;
    let reply = purge(
        &http,
        "key-acme-0001",
        &json!({ "urls": ["https://cdn.example.com/a.png", "https://cdn.example.com/b.png"] }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("ratelimit-policy"), Some("\"big\";q=1000;w=1"));
    let body = reply.json();
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(body["tenant"], "acme");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for (result, url) in results.iter().zip(["a", "b"]) {
        assert_eq!(
            result["target"],
            format!("https://cdn.example.com/{url}.png")
        );
        assert_eq!(result["status"], "purged");
        assert_eq!(result["coalesced"], false);
        assert!(result["batch"].as_str().is_some_and(|b| b.starts_with('b')));
    }
    // Every kind of target, and soft purges.
    for body in [
        json!({ "tags": ["product-42"] }),
        json!({ "prefixes": ["https://cdn.example.com/img/"], "soft": true }),
        json!({ "hosts": ["cdn.example.com"] }),
        json!({ "all": true }),
    ] {
        let reply = purge(&http, "key-acme-0001", &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{body}");
        assert_eq!(reply.json()["results"][0]["status"], "purged");
    }
    assert_eq!(
        http.send("GET", "/healthz", &[], "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn keys_are_checked_first() {
    let (http, _app) = start(options()).await;
    let body = urls(1).to_string();
    let none = http.send("POST", "/v1/purge", &[], &body).await;
    assert_problem(&none, StatusCode::UNAUTHORIZED, "API key is needed");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let unknown = purge(&http, "key-nobody", &urls(1)).await;
    assert_problem(&unknown, StatusCode::UNAUTHORIZED, "unknown API key");
    let basic = http
        .send(
            "POST",
            "/v1/purge",
            &[("authorization", "Basic abc")],
            &body,
        )
        .await;
    assert_problem(&basic, StatusCode::UNAUTHORIZED, "Bearer KEY");
    // The stats and admin endpoints need the admin key, not a tenant's.
    let stats = http
        .send(
            "GET",
            "/v1/stats",
            &[("authorization", "Bearer key-acme-0001")],
            "",
        )
        .await;
    assert_problem(&stats, StatusCode::UNAUTHORIZED, "admin key");
}

#[tokio::test]
async fn bad_bodies_get_400_and_413() {
    let (http, _app) = start(options()).await;
    let key = "key-acme-0001";
    let raw = |body: &str| {
        let http = http.clone();
        let body = body.to_owned();
        async move {
            http.send(
                "POST",
                "/v1/purge",
                &[("authorization", "Bearer key-acme-0001")],
                &body,
            )
            .await
        }
    };
    assert_problem(
        &raw("{not json").await,
        StatusCode::BAD_REQUEST,
        "invalid JSON",
    );
    assert_problem(
        &purge(
            &http,
            key,
            &json!({ "urls": ["https://a.example/"], "paths": [] }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "unknown field `paths`",
    );
    assert_problem(
        &purge(&http, key, &json!({ "urls": [] })).await,
        StatusCode::BAD_REQUEST,
        "no targets",
    );
    assert_problem(
        &purge(&http, key, &urls(257)).await,
        StatusCode::BAD_REQUEST,
        "at most 256",
    );
    assert_problem(
        &purge(&http, key, &json!({ "urls": ["ftp://cdn.example.com/x"] })).await,
        StatusCode::BAD_REQUEST,
        "ftp://cdn.example.com/x",
    );
    assert_problem(
        &purge(&http, key, &json!({ "hosts": ["not a host"] })).await,
        StatusCode::BAD_REQUEST,
        "not a host",
    );
    assert_problem(
        &purge(
            &http,
            key,
            &json!({ "urls": ["https://a.example/"], "tags": ["t"] }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "exactly one",
    );
    assert_problem(
        &purge(&http, key, &json!({ "all": false })).await,
        StatusCode::BAD_REQUEST,
        "`all` must be true",
    );
    assert_problem(
        &purge(&http, key, &json!({})).await,
        StatusCode::BAD_REQUEST,
        "exactly one",
    );
    // 64 KiB at most, whether announced or not.
    let big = json!({ "tags": ["x".repeat(70_000)] }).to_string();
    assert_problem(
        &raw(&big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "65536 bytes",
    );
}

/// axum's own refusals come as problems too, like every error of the API.
#[tokio::test]
async fn unknown_paths_wrong_methods_and_bad_path_parameters_get_problems() {
    let (http, _app) = start(options()).await;
    let auth = [("authorization", "Bearer key-acme-0001")];
    let wrong_method = http.send("GET", "/v1/purge", &auth, "").await;
    assert_problem(&wrong_method, StatusCode::METHOD_NOT_ALLOWED, "method");
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    assert_problem(
        &http.send("GET", "/v2/nothing", &auth, "").await,
        StatusCode::NOT_FOUND,
        "no such endpoint",
    );
    assert_problem(
        &http.send("PUT", "/v1/admin/tenants/%FF", &auth, "{}").await,
        StatusCode::BAD_REQUEST,
        "UTF-8",
    );
}

#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_429_with_the_headers() {
    let (http, _app) = start(options()).await;
    for _ in 0..3 {
        assert_eq!(
            purge(&http, "key-tiny-0001", &urls(1)).await.status,
            StatusCode::OK
        );
    }
    let reply = purge(&http, "key-tiny-0001", &urls(1)).await;
    assert_problem(&reply, StatusCode::TOO_MANY_REQUESTS, "over the rate quota");
    assert_eq!(reply.header("ratelimit-policy"), Some("\"small\";q=1;w=1"));
    assert!(
        reply
            .header("ratelimit")
            .is_some_and(|v| v.starts_with("\"small\";r=0;t="))
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(
        reply.json()["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    // Others are untouched.
    assert_eq!(
        purge(&http, "key-acme-0001", &urls(1)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_request_costs_its_number_of_targets() {
    let (http, _app) = start(options()).await;
    // 20 items at once on the small plan: 15 pass, then 15 more do not.
    assert_eq!(
        purge(&http, "key-tiny-0001", &urls(15)).await.status,
        StatusCode::OK
    );
    let reply = purge(&http, "key-tiny-0001", &urls(15)).await;
    assert_problem(&reply, StatusCode::TOO_MANY_REQUESTS, "costing 15");
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"small-items\";q=10;w=1")
    );
    assert!(reply.header("retry-after").is_some());
    // More than the burst can never pass: no Retry-After.
    let reply = purge(&http, "key-tiny-0001", &urls(25)).await;
    assert_problem(
        &reply,
        StatusCode::TOO_MANY_REQUESTS,
        "can never be admitted",
    );
    assert_eq!(reply.header("retry-after"), None);
    let stats = stats(&http).await;
    assert_eq!(stats["tenants"]["tiny"]["items_limited"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_concurrency_cap_gets_429() {
    let (http, _app) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(400),
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    // The small plan allows one request in flight.
    let first = {
        let http = http.clone();
        tokio::spawn(async move { purge(&http, "key-tiny-0001", &urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = purge(&http, "key-tiny-0001", &urls(1)).await;
    assert_problem(&second, StatusCode::TOO_MANY_REQUESTS, "requests in flight");
    assert_eq!(
        second.header("ratelimit-policy"),
        Some("\"small\";q=1;qu=\"concurrent-requests\"")
    );
    assert_eq!(first.await.expect("first").status, StatusCode::OK);
    assert_eq!(stats(&http).await["tenants"]["tiny"]["capped"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_sheds_load_with_503() {
    let (http, _app) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(400),
            ..BackendConfig::default()
        },
        max_in_flight: 1,
        ..options()
    })
    .await;
    let first = {
        let http = http.clone();
        tokio::spawn(async move { purge(&http, "key-acme-0001", &urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shed = purge(&http, "key-globex-0001", &urls(1)).await;
    assert_problem(&shed, StatusCode::SERVICE_UNAVAILABLE, "");
    assert_eq!(
        shed.json()["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert_eq!(first.await.expect("first").status, StatusCode::OK);
    assert_eq!(stats(&http).await["tenants"]["globex"]["shed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_over_capacity_passes_its_retry_after_on() {
    let (http, _app) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(1_500),
            concurrency: 1,
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    let first = {
        let http = http.clone();
        tokio::spawn(async move { purge(&http, "key-acme-0001", &urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another tenant's batch finds the backend busy: it refuses with a
    // retry-after of its latency (1.5 s), rounded up to 2.
    let busy = purge(&http, "key-globex-0001", &urls(1)).await;
    assert_problem(
        &busy,
        StatusCode::SERVICE_UNAVAILABLE,
        "backend is over capacity",
    );
    assert_eq!(busy.header("retry-after"), Some("2"));
    assert_eq!(first.await.expect("first").status, StatusCode::OK);
    let stats = stats(&http).await;
    assert_eq!(stats["backend"]["calls_refused"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_purges_cost_the_backend_a_couple_of_calls() {
    let (http, _app) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(200),
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    let body = json!({ "urls": ["https://cdn.example.com/hot.png"] });
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (http, body) = (http.clone(), body.clone());
            tokio::spawn(async move { purge(&http, "key-acme-0001", &body).await })
        })
        .collect();
    let mut coalesced = 0;
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, StatusCode::OK);
        let result = &reply.json()["results"][0];
        assert_eq!(result["status"], "purged");
        coalesced += usize::from(result["coalesced"] == true);
    }
    let stats = stats(&http).await;
    let calls = stats["backend"]["calls"].as_u64().expect("calls");
    assert!(
        (1..=3).contains(&calls),
        "{calls} backend calls for 50 purges"
    );
    assert_eq!(stats["batcher"]["requests"], 50);
    assert!(coalesced >= 47, "{coalesced} coalesced");
    assert_eq!(stats["tenants"]["acme"]["coalesced"], coalesced);
    assert_eq!(stats["tenants"]["acme"]["admitted"], 50);
}

#[tokio::test]
async fn stats_show_tenants_the_backend_and_the_top_tenants() {
    let (http, _app) = start(options()).await;
    for _ in 0..5 {
        purge(&http, "key-tiny-0001", &urls(1)).await;
    }
    purge(&http, "key-acme-0001", &urls(2)).await;
    let stats = stats(&http).await;
    let tiny = &stats["tenants"]["tiny"];
    assert_eq!(tiny["plan"], "small");
    assert_eq!(tiny["admitted"], 3);
    assert_eq!(tiny["rate_limited"], 2);
    assert_eq!(tiny["blocked"], false);
    assert_eq!(stats["tenants"]["acme"]["admitted"], 1);
    assert_eq!(stats["backend"]["items_purged"], 5);
    let top = &stats["top_tenants"];
    assert_eq!(top["requests"], 6);
    assert_eq!(top["by_requests"][0]["tenant"], "tiny");
    assert_eq!(top["by_requests"][0]["count"], 5);
    assert_eq!(top["by_rejections"][0]["tenant"], "tiny");
    assert_eq!(top["by_rejections"][0]["count"], 2);
}

#[tokio::test]
async fn plans_and_blocks_change_live() {
    let (http, _app) = start(options()).await;
    let admin = |id: &str, body: Value| {
        let http = http.clone();
        let path = format!("/v1/admin/tenants/{id}");
        async move {
            http.send(
                "PUT",
                &path,
                &[("authorization", &format!("Bearer {ADMIN}"))],
                &body.to_string(),
            )
            .await
        }
    };
    for _ in 0..3 {
        purge(&http, "key-tiny-0001", &urls(1)).await;
    }
    assert_eq!(
        purge(&http, "key-tiny-0001", &urls(1)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // An upgrade relieves it on the next request.
    let reply = admin("tiny", json!({ "plan": "big" })).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({ "tenant": "tiny", "plan": "big", "blocked": false })
    );
    let next = purge(&http, "key-tiny-0001", &urls(1)).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.header("ratelimit-policy"), Some("\"big\";q=1000;w=1"));

    // A block refuses it on the next request; others are untouched.
    let reply = admin("tiny", json!({ "blocked": true })).await;
    assert_eq!(reply.json()["blocked"], true);
    let blocked = purge(&http, "key-tiny-0001", &urls(1)).await;
    assert_problem(&blocked, StatusCode::FORBIDDEN, "blocked");
    assert_eq!(
        purge(&http, "key-acme-0001", &urls(1)).await.status,
        StatusCode::OK
    );
    assert_eq!(stats(&http).await["tenants"]["tiny"]["blocked"], true);
    admin("tiny", json!({ "blocked": false })).await;
    assert_eq!(
        purge(&http, "key-tiny-0001", &urls(1)).await.status,
        StatusCode::OK
    );

    // Mistakes are clear.
    assert_problem(
        &admin("nobody", json!({ "plan": "big" })).await,
        StatusCode::NOT_FOUND,
        "no tenant `nobody`",
    );
    assert_problem(
        &admin("tiny", json!({ "plan": "gold" })).await,
        StatusCode::BAD_REQUEST,
        "no plan `gold`",
    );
    assert_problem(
        &admin("tiny", json!({})).await,
        StatusCode::BAD_REQUEST,
        "give",
    );
    let not_admin = http
        .send(
            "PUT",
            "/v1/admin/tenants/tiny",
            &[("authorization", "Bearer key-tiny-0001")],
            r#"{"blocked": false}"#,
        )
        .await;
    assert_problem(&not_admin, StatusCode::UNAUTHORIZED, "admin key");
}

#[test]
fn bad_tenants_files_are_refused_with_a_reason() {
    let base = |extra: &str| {
        format!(
            "admin_key = \"admin-key-xyz\"\n[plans.p]\nrequests_per_second = 1\nburst = 1\n\
             items_per_second = 1\nitems_burst = 1\nconcurrency = 1\n{extra}"
        )
    };
    let err = |text: &str| Config::parse(text).expect_err("refused").to_string();
    assert!(err("not toml [").contains("expected"));
    assert!(
        err(&base(
            "[[tenants]]\nid = \"a\"\nkey = \"key-aaaa-1\"\nplan = \"q\""
        ))
        .contains("no plan named `q`")
    );
    assert!(
        err(&base(
            "[[tenants]]\nid = \"a\"\nkey = \"key-aaaa-1\"\nplan = \"p\"\n\
             [[tenants]]\nid = \"b\"\nkey = \"key-aaaa-1\"\nplan = \"p\""
        ))
        .contains("already used")
    );
    assert!(
        err(&base(
            "[[tenants]]\nid = \"a b\"\nkey = \"key-aaaa-1\"\nplan = \"p\""
        ))
        .contains("letters")
    );
    assert!(err(&base("").replace("burst = 1", "burst = 0")).contains("burst must be at least 1"));
    assert!(err(&format!("{}\nbogus = 1", base(""))).contains("unknown field"));
    assert!(Config::parse(&base("")).is_ok());
    assert!(
        app::config::Config::load(std::path::Path::new("/nonexistent/tenants.toml"))
            .expect_err("missing")
            .to_string()
            .contains("cannot read")
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_tenants_quota_through_redis() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!(
        "cdn-test:{}:{}:",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let redis = app::RedisOptions {
        url,
        prefix,
        on_failure: "closed".to_owned(),
    };
    let both = Options {
        redis: Some(redis),
        ..options()
    };
    let (one, _a) = start(both.clone()).await;
    let (two, _b) = start(both).await;
    // The small plan's burst is 3 requests, across both instances.
    let mut statuses = Vec::new();
    for http in [&one, &two, &one, &two, &one] {
        statuses.push(purge(http, "key-tiny-0001", &urls(1)).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "fails closed if Redis is not up"
    );
    // Another tenant is untouched on either.
    assert_eq!(
        purge(&two, "key-acme-0001", &urls(1)).await.status,
        StatusCode::OK
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_follows_the_failure_policy() {
    // Nothing listens on this port: Redis is down from the start.
    let down = |on_failure: &str| Options {
        redis: Some(app::RedisOptions {
            url: "redis://127.0.0.1:1".to_owned(),
            prefix: "cdn-test-down:".to_owned(),
            on_failure: on_failure.to_owned(),
        }),
        ..options()
    };
    // `local`: the limits are decided on this node, the plan's burst of 3.
    let (http, _app) = start(down("local")).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            purge(&http, "key-tiny-0001", &urls(1))
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    // `open`: served without a limit.
    let (http, _app) = start(down("open")).await;
    for _ in 0..5 {
        assert_eq!(
            purge(&http, "key-tiny-0001", &urls(1)).await.status,
            StatusCode::OK
        );
    }
    // `closed`: refused with 503, and the server keeps answering.
    let (http, _app) = start(down("closed")).await;
    let reply = purge(&http, "key-acme-0001", &urls(1)).await;
    assert_problem(&reply, StatusCode::SERVICE_UNAVAILABLE, "");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(
        http.send("GET", "/healthz", &[], "").await.status,
        StatusCode::OK
    );
    // A policy that does not exist is refused when the app is built.
    let error = app::build(&config(), &down("sometimes"))
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("open, closed or local"),
        "{error}"
    );
}
