//! Finding patient zero: who is flooding the API, and stopping them without
//! a deploy.
//!
//! ```text
//! cargo run --release --example patient_zero
//! ```
//!
//! Starts an axum server on 127.0.0.1 with a rate limit and a concurrency
//! cap that report every decision to the heavy-hitter view
//! ([`TopTenants`]) and to the `tracing` observer (whose lines go to
//! stderr, at most one a second per kind of refusal). Twenty tenants send
//! 20 requests a second each while one tenant floods from 16 connections.
//! After three seconds it prints the heaviest tenants, blocks the first one
//! through the policy, shows the next requests, and lifts the block.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_floodgate::observe::{Dashboard, HeavyHitter, TopTenants, Tracing};
use tower_floodgate::{
    ConcurrencyCapLayer, Plan, Policy, PolicyHandle, Quota, RateLimitLayer, RateLimiter, key,
};

const TENANT: HeaderName = HeaderName::from_static("x-tenant-id");
const RUN_FOR: Duration = Duration::from_secs(3);

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .init();

    // 50 purges a second (bursts of 100), at most 8 at once, per tenant.
    let rate = Quota::per_second(NonZeroU32::new(50).ok_or("zero")?)
        .allow_burst(NonZeroU32::new(100).ok_or("zero")?);
    let policy = PolicyHandle::new(Policy::new(Plan::new("standard").rate(rate).concurrency(8)));

    // ── The part to copy ──────────────────────────────────────────────
    let top = TopTenants::new();
    let observers = (top.clone(), Tracing::new());
    let rate_limit = RateLimitLayer::new(RateLimiter::new(policy.clone()))
        .key(key::header(TENANT))
        .observer(observers.clone());
    let cap = ConcurrencyCapLayer::new(policy.clone())
        .key(key::header(TENANT))
        .observer(observers);
    let dashboard = Dashboard::new()
        .rate_limit("purge", &rate_limit)
        .concurrency_cap("purge", &cap)
        .top_tenants(&top, 5);
    // ──────────────────────────────────────────────────────────────────

    let app = Router::new()
        .route("/v1/purge", post(|| async { "purged\n" }))
        .layer(cap)
        .layer(rate_limit);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    println!(
        "Flooding for {} s: one tenant on 16 connections, 20 tenants at 20 requests/s each.",
        RUN_FOR.as_secs()
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < RUN_FOR {
                let _ = purge(&client, addr, "cust-4471").await;
            }
        }));
    }
    for i in 1..=20 {
        let client = client.clone();
        let tenant = format!("cust-{:04}", 1000 + i * 37);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while start.elapsed() < RUN_FOR {
                tick.tick().await;
                let _ = purge(&client, addr, &tenant).await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }

    // ── What an admin endpoint would serve ────────────────────────────
    let snapshot = dashboard.snapshot();
    let heavy = snapshot.top_tenants.ok_or("no heavy-hitter view")?;
    println!(
        "\nHeaviest tenants over the last {:.0} s ({} requests, {} refused):",
        heavy.window.as_secs_f64(),
        heavy.requests,
        heavy.rejections
    );
    println!("  {:<30} {:<30}", "by requests", "by refusals");
    for rank in 0..heavy
        .by_requests
        .len()
        .max(heavy.by_rejections.len())
        .min(5)
    {
        let cell = |list: &[HeavyHitter]| {
            list.get(rank).map_or_else(String::new, |h| {
                format!("{}  {:>6}  {:>5.1}%", h.tenant, h.count, h.share * 100.0)
            })
        };
        println!(
            "  {}. {:<27} {}",
            rank + 1,
            cell(&heavy.by_requests),
            cell(&heavy.by_rejections)
        );
    }
    let limits = &snapshot.rate_limits[0].stats;
    println!(
        "Rate limit: {} refused, {} tenants tracked; concurrency cap: {} refused.",
        limits.rate_limited,
        limits.limiter.tracked_tenants,
        snapshot.concurrency_caps[0].stats.tenant_capped
    );

    // ── Acting on it, live ────────────────────────────────────────────
    let patient_zero = heavy.by_requests[0].tenant.clone();
    policy.block(patient_zero.clone());
    println!("\npolicy.block(\"{patient_zero}\"), then one request each:");
    for tenant in [patient_zero.to_string(), "cust-1037".to_owned()] {
        let status = purge(&client, addr, &tenant).await?;
        println!("  {tenant} -> {status}");
    }
    policy.unblock(patient_zero.clone());
    let status = purge(&client, addr, &patient_zero.to_string()).await?;
    println!(
        "policy.unblock(\"{patient_zero}\"): {patient_zero} -> {status} (back under its plan)"
    );
    Ok(())
}

async fn purge(
    client: &HttpClient,
    addr: SocketAddr,
    tenant: &str,
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::post(format!("http://{addr}/v1/purge"))
        .header(TENANT, tenant)
        .body(Empty::new())?;
    let res = client.request(req).await?;
    let status = res.status();
    res.into_body().collect().await?;
    Ok(status)
}
