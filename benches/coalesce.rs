//! Submissions per second through the purge batcher and the coalescing
//! layer, with 1 and 2 runtime threads, for identical and for distinct
//! targets; then the ratio of backend calls to requests.
//!
//! Run with `cargo bench --bench coalesce`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::Full;
use tower::{ServiceExt, service_fn};
use tower_floodgate::TenantKey;
use tower_floodgate::coalesce::{CoalesceLayer, JoinMode};
use tower_floodgate::purge::{BatchConfig, ItemResult, Mode, PurgeBatch, PurgeBatcher, Target};

/// Requests per measured round.
const ROUND: u64 = 2_000;

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("a runtime: {e}"))
}

fn targets(distinct: bool) -> Vec<Target> {
    (0..ROUND)
        .map(|i| {
            let path = if distinct { i } else { 0 };
            Target::url(&format!("https://cdn.example.com/{path}.png"))
                .unwrap_or_else(|e| unreachable!("{e}"))
        })
        .collect()
}

/// A purge backend answering at once, counting its calls.
fn backend(
    calls: Arc<AtomicU64>,
    latency: Duration,
) -> impl tower::Service<PurgeBatch, Response = Vec<ItemResult>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |batch: PurgeBatch| {
        calls.fetch_add(1, Ordering::Relaxed);
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            Ok::<_, Infallible>(vec![ItemResult::Purged; batch.items.len()])
        }
    })
}

fn batcher_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("purge_batcher");
    group.throughput(Throughput::Elements(ROUND));
    for threads in [1, 2] {
        let rt = runtime(threads);
        for distinct in [false, true] {
            let name = if distinct { "distinct" } else { "identical" };
            let targets = targets(distinct);
            group.bench_function(BenchmarkId::new(name, format!("{threads}t")), |b| {
                b.iter_custom(|iters| {
                    let calls = Arc::new(AtomicU64::new(0));
                    let batcher = PurgeBatcher::with_config(
                        backend(Arc::clone(&calls), Duration::ZERO),
                        BatchConfig {
                            window: Duration::from_micros(200),
                            max_items: 256,
                        },
                    );
                    let targets = targets.clone();
                    rt.block_on(async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let tasks: Vec<_> = targets
                                .iter()
                                .map(|t| {
                                    let batcher = batcher.clone();
                                    let t = t.clone();
                                    tokio::spawn(async move {
                                        batcher.purge(TenantKey::from("acme"), t, Mode::Hard).await
                                    })
                                })
                                .collect();
                            for task in tasks {
                                let _ = task.await;
                            }
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

type Body = Full<Bytes>;

fn request(i: u64, distinct: bool) -> Request<Body> {
    let body = if distinct {
        format!("{{\"n\":{i}}}")
    } else {
        "{\"n\":0}".to_owned()
    };
    let mut req = Request::post("/v1/purge")
        .body(Body::new(Bytes::from(body)))
        .unwrap_or_else(|e| unreachable!("{e}"));
    req.extensions_mut().insert(TenantKey::from("acme"));
    req
}

fn layer_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("coalesce_layer");
    group.throughput(Throughput::Elements(ROUND));
    for threads in [1, 2] {
        let rt = runtime(threads);
        for distinct in [false, true] {
            let name = if distinct { "distinct" } else { "identical" };
            group.bench_function(BenchmarkId::new(name, format!("{threads}t")), |b| {
                b.iter_custom(|iters| {
                    let svc = tower::ServiceBuilder::new()
                        .layer(CoalesceLayer::new(JoinMode::Next))
                        .service(service_fn(|_: Request<Body>| async {
                            Ok::<_, Infallible>(Response::new(axum::body::Body::from("ok")))
                        }));
                    rt.block_on(async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let tasks: Vec<_> = (0..ROUND)
                                .map(|i| tokio::spawn(svc.clone().oneshot(request(i, distinct))))
                                .collect();
                            for task in tasks {
                                let _ = task.await;
                            }
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

/// Backend calls per request when a backend with a 150 ms round trip gets
/// 20,000 requests over two seconds.
fn ratios() {
    let rt = runtime(2);
    println!("\nbackend calls per request (150 ms backend, 20,000 requests over 2 s):");
    for distinct in [false, true] {
        let calls = Arc::new(AtomicU64::new(0));
        let batcher = PurgeBatcher::new(backend(Arc::clone(&calls), Duration::from_millis(150)));
        let targets = targets(distinct);
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..20_000u64 {
                let batcher = batcher.clone();
                let t = targets[(i % ROUND) as usize].clone();
                tasks.push(tokio::spawn(async move {
                    batcher.purge(TenantKey::from("acme"), t, Mode::Hard).await
                }));
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            for task in tasks {
                let _ = task.await;
            }
        });
        let stats = batcher.stats();
        println!(
            "  batcher, {:<9} targets: {:>5} calls, {:>6} items sent for {} requests: {:.5} calls per request",
            if distinct { "distinct" } else { "identical" },
            stats.batches,
            stats.items_sent,
            stats.requests,
            stats.batches as f64 / stats.requests as f64
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    batcher_bench(&mut c);
    layer_bench(&mut c);
    c.final_summary();
    ratios();
}
