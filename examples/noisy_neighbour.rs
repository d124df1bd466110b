//! One tenant floods a multi-tenant API; the others do not notice.
//!
//! ```text
//! cargo run --release --example noisy_neighbour
//! ```
//!
//! Starts an axum server on 127.0.0.1 with tower-floodgate's per-tenant rate
//! limit in front of a purge endpoint, then plays three seconds of traffic
//! over real HTTP: one rogue tenant sends as fast as 32 connections allow,
//! nine well-behaved tenants send 10 requests a second each. It prints what
//! each tenant got, then upgrades a tenant's plan at run time and shows the
//! effect on the very next request.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_floodgate::{Plan, Policy, Quota, RateLimitLayer, RateLimiter, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant-id");
const RUN_FOR: Duration = Duration::from_secs(3);

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Plans: 20 purges a second with bursts of 40, or 200 a second on "pro".
    let per_sec = |n| NonZeroU32::new(n).map(Quota::per_second).ok_or("zero rate");
    let policy = Policy::builder(
        Plan::new("standard").rate(per_sec(20)?.allow_burst(NonZeroU32::new(40).ok_or("zero")?)),
    )
    .tier(Plan::new("pro").rate(per_sec(200)?))
    .build()?;
    let limiter = RateLimiter::new(policy);
    let layer = RateLimitLayer::new(limiter.clone()).key(key::header(TENANT));

    let app = Router::new()
        .route("/v1/purge", post(|| async { "purged\n" }))
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("listening on {addr}");

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let tenants: Vec<String> = std::iter::once("rogue".to_owned())
        .chain((1..=9).map(|i| format!("tenant-{i}")))
        .collect();
    let tallies: Vec<Arc<Tally>> = tenants.iter().map(|_| Arc::default()).collect();

    let start = Instant::now();
    let mut tasks = Vec::new();
    // The rogue tenant: 32 connections, no pause.
    for _ in 0..32 {
        let (client, tally) = (client.clone(), Arc::clone(&tallies[0]));
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < RUN_FOR {
                purge(&client, addr, "rogue", &tally).await;
            }
        }));
    }
    // Everyone else: 10 requests a second.
    for (name, tally) in tenants.iter().zip(&tallies).skip(1) {
        let (client, tally, name) = (client.clone(), Arc::clone(tally), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while start.elapsed() < RUN_FOR {
                tick.tick().await;
                purge(&client, addr, &name, &tally).await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }

    println!(
        "\n{:<10} {:>8} {:>8} {:>8}",
        "tenant", "200 OK", "429", "other"
    );
    for (name, tally) in tenants.iter().zip(&tallies) {
        println!(
            "{name:<10} {:>8} {:>8} {:>8}",
            tally.ok.load(Ordering::Relaxed),
            tally.limited.load(Ordering::Relaxed),
            tally.other.load(Ordering::Relaxed)
        );
    }
    let stats = layer.stats();
    println!(
        "\nlayer: {} requests refused, {} tenants tracked",
        stats.rate_limited, stats.limiter.tracked_tenants
    );

    // Support upgrades the rogue tenant (it was a real customer after all):
    // no restart, the next request sees the new plan.
    let before = status(&client, addr, "rogue").await;
    limiter.policy().update(|p| p.assign("rogue", "pro"))?;
    let after = status(&client, addr, "rogue").await;
    println!("rogue before its upgrade: {before}; right after: {after}");
    Ok(())
}

async fn status(client: &HttpClient, addr: SocketAddr, tenant: &str) -> String {
    match send(client, addr, tenant).await {
        Ok((status, retry_after)) => match retry_after {
            Some(wait) => format!("{status} (Retry-After: {wait})"),
            None => status.to_string(),
        },
        Err(e) => format!("error: {e}"),
    }
}

async fn purge(client: &HttpClient, addr: SocketAddr, tenant: &str, tally: &Tally) {
    let counter = match send(client, addr, tenant).await {
        Ok((StatusCode::OK, _)) => &tally.ok,
        Ok((StatusCode::TOO_MANY_REQUESTS, _)) => &tally.limited,
        _ => &tally.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    tenant: &str,
) -> Result<(StatusCode, Option<String>), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::post(format!("http://{addr}/v1/purge"))
        .header(TENANT, tenant)
        .body(Empty::new())?;
    let res = client.request(req).await?;
    let status = res.status();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    res.into_body().collect().await?;
    Ok((status, retry_after))
}
