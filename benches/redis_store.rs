//! The rate limiter on Redis (`REDIS_URL`, by default
//! `redis://127.0.0.1:6379`): decisions per second with 1, 16 and 64
//! concurrent callers sharing one multiplexed connection, the Redis round
//! trips per decision, and the cost of a decision the local deny cache makes
//! without Redis, next to the same decision in memory.
//!
//! Skipped, with a message saying how to start Redis, when none answers.
//!
//! Run with `cargo bench --features redis --bench redis_store`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use tower_floodgate::redis::{RedisConfig, RedisStats, RedisStore};
use tower_floodgate::{Quota, RateLimiter};

/// Decisions per measured round.
const ROUND: u64 = 1_024;
/// Tenants the admitted traffic is spread over.
const TENANTS: usize = 1_000;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("a runtime: {e}"))
}

/// Whether a Redis answers `PING` at `url` within a second.
fn reachable(rt: &tokio::runtime::Runtime, url: &str) -> bool {
    let Ok(client) = ::redis::Client::open(url) else {
        return false;
    };
    rt.block_on(async {
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            ::redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    })
}

/// A limiter on Redis whose keys live under a prefix of this run.
fn redis_limiter(rt: &tokio::runtime::Runtime, url: &str, quota: Quota) -> RateLimiter {
    let _entered = rt.enter();
    let config = RedisConfig {
        prefix: format!("floodgate-bench:{}:", std::process::id()),
        ..RedisConfig::default()
    };
    let store = RedisStore::new(url, config).unwrap_or_else(|e| unreachable!("{e}"));
    RateLimiter::builder(quota).redis(store).build()
}

fn stats(limiter: &RateLimiter) -> RedisStats {
    limiter
        .redis_stats()
        .unwrap_or_else(|| unreachable!("a limiter on Redis"))
}

/// `ROUND` admitted decisions spread over `TENANTS`, made by `callers`
/// concurrent tasks.
async fn round(limiter: &RateLimiter, tenants: &Arc<Vec<String>>, callers: usize) {
    let per_caller = ROUND as usize / callers;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let limiter = limiter.clone();
            let tenants = Arc::clone(tenants);
            tokio::spawn(async move {
                for i in 0..per_caller {
                    let tenant = &tenants[(caller * per_caller + i) % tenants.len()];
                    let decision = limiter.check_async(tenant, 1).await;
                    std::hint::black_box(decision.is_ok());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap_or_else(|e| unreachable!("{e}"));
    }
}

fn decisions(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    // Generous enough that every decision is an admission: each is a call.
    let quota = Quota::per_second(nz(1_000_000)).allow_burst(nz(1_000_000));
    let limiter = redis_limiter(rt, url, quota);
    let tenants: Arc<Vec<String>> = Arc::new((0..TENANTS).map(|i| format!("t{i}")).collect());
    rt.block_on(round(&limiter, &tenants, 16)); // Connect and load the script.

    let mut group = c.benchmark_group("redis_decisions");
    group.throughput(Throughput::Elements(ROUND));
    group.sample_size(20);
    for callers in [1, 16, 64] {
        group.bench_function(BenchmarkId::from_parameter(callers), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        round(&limiter, &tenants, callers).await;
                    }
                    start.elapsed()
                })
            });
        });
    }
    group.finish();

    let stats = stats(&limiter);
    let made = stats.calls + stats.denied_locally + stats.fallback_local;
    println!(
        "admitted traffic: {} scripts run for {made} decisions = {:.3} round trips per \
         decision; {} calls failed or timed out (failure policy applied)",
        stats.calls,
        stats.calls as f64 / made.max(1) as f64,
        stats.failures,
    );
}

fn denied(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    // A tenant allowed one request per minute: after the first, it floods.
    let quota = Quota::per_minute(nz(1));
    let remote = redis_limiter(rt, url, quota);
    let memory = RateLimiter::new(quota);
    let tenant = format!("flooder-{}", std::process::id());
    rt.block_on(async {
        let first = remote.check_async(&tenant, 1).await;
        assert!(first.is_ok(), "the first request is admitted");
        assert!(remote.check_async(&tenant, 1).await.is_err());
    });
    assert!(memory.check(&tenant, 1).is_ok());

    let mut group = c.benchmark_group("denied_decision");
    group.throughput(Throughput::Elements(1));
    group.bench_function("redis_deny_cache", |b| {
        b.iter(|| {
            rt.block_on(async {
                std::hint::black_box(remote.check_async(std::hint::black_box(&tenant), 1).await)
            })
        });
    });
    group.bench_function("in_memory", |b| {
        b.iter(|| std::hint::black_box(memory.check(std::hint::black_box(&tenant), 1)));
    });
    group.finish();

    let stats = stats(&remote);
    println!(
        "flooding tenant: {} scripts run for {} decisions = {:.6} round trips per decision",
        stats.calls,
        stats.calls + stats.denied_locally,
        stats.calls as f64 / (stats.calls + stats.denied_locally).max(1) as f64,
    );
    // Time both in the same run, without the block_on the group above adds.
    let n = 1_000_000u32;
    let timed = |f: &dyn Fn() -> bool| {
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(f());
        }
        start.elapsed().as_nanos() as f64 / f64::from(n)
    };
    let deny_cache = rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(remote.check_async(&tenant, 1).await.is_err());
        }
        start.elapsed().as_nanos() as f64 / f64::from(n)
    });
    let in_memory = timed(&|| memory.check(&tenant, 1).is_err());
    println!(
        "locally denied decision: {deny_cache:.1} ns on Redis' deny cache vs {in_memory:.1} ns \
         in memory (ratio {:.2})",
        deny_cache / in_memory
    );
}

fn main() {
    let url = redis_url();
    let rt = runtime();
    if !reachable(&rt, &url) {
        eprintln!(
            "redis_store bench skipped: Redis is not reachable at {url}. Start one with \
             `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no` or point \
             REDIS_URL at one."
        );
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    decisions(&mut c, &rt, &url);
    denied(&mut c, &rt, &url);
    c.final_summary();
}
