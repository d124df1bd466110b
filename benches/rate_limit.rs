//! tower-floodgate's rate limiter against governor's keyed limiter, and the
//! layer against tower-governor, on the same workloads in the same run.
//!
//! Run with `cargo bench --bench rate_limit`. After criterion's own report,
//! a table prints each workload's times and the ratio floodgate / other
//! (below 1.0 means floodgate is faster).

mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::{BatchSize, Criterion, Throughput};
use governor::{DefaultKeyedRateLimiter, Quota as GQuota, RateLimiter as GRateLimiter};
use http::{Request, Response};
use support::{TENANT, governor_config};
use tower::{Service, ServiceBuilder, service_fn};
use tower_floodgate::{Quota, RateLimitLayer, RateLimiter, key};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A quota no workload reaches.
fn generous() -> (Quota, GQuota) {
    (
        Quota::per_second(nz(u32::MAX)).allow_burst(nz(u32::MAX)),
        GQuota::per_second(nz(u32::MAX)).allow_burst(nz(u32::MAX)),
    )
}

/// A quota the first request exhausts for an hour.
fn stingy() -> (Quota, GQuota) {
    (Quota::per_hour(nz(1)), GQuota::per_hour(nz(1)))
}

fn limiters(
    quotas: (Quota, GQuota),
    max_tenants: usize,
) -> (RateLimiter, DefaultKeyedRateLimiter<String>) {
    (
        RateLimiter::builder(quotas.0)
            .max_tenants(max_tenants)
            .build(),
        GRateLimiter::keyed(quotas.1),
    )
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant-{i:08}")).collect()
}

fn single_tenant(c: &mut Criterion, name: &str, quotas: (Quota, GQuota)) {
    let (ours, theirs) = limiters(quotas, 1_000);
    let key = "tenant-hot".to_string();
    let _ = ours.check(&key, 1);
    let _ = theirs.check_key(&key);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("floodgate", |b| {
        b.iter(|| black_box(ours.check(black_box(&key), 1).is_ok()))
    });
    group.bench_function("governor", |b| {
        b.iter(|| black_box(theirs.check_key(black_box(&key)).is_ok()))
    });
    group.finish();
}

fn round_robin(c: &mut Criterion, name: &str, tenants: usize) {
    let (ours, theirs) = limiters(generous(), tenants * 2);
    let keys = keys(tenants);
    for k in &keys {
        let _ = ours.check(k, 1);
        let _ = theirs.check_key(k);
    }
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("floodgate", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(ours.check(&keys[i], 1).is_ok())
        })
    });
    let mut i = 0;
    group.bench_function("governor", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(theirs.check_key(&keys[i]).is_ok())
        })
    });
    group.finish();
}

/// Every check is a tenant never seen before: the insert path. Each sample
/// gets fresh limiters and fresh keys; only the checks are timed.
fn first_seen(c: &mut Criterion) {
    let mut group = c.benchmark_group("first_seen_tenant");
    group.throughput(Throughput::Elements(1));
    group.bench_function("floodgate", |b| {
        b.iter_custom(|iters| {
            let (ours, _) = limiters(generous(), 1_000_000);
            let keys = keys(iters as usize);
            let start = Instant::now();
            for k in &keys {
                black_box(ours.check(k, 1).is_ok());
            }
            start.elapsed()
        })
    });
    group.bench_function("governor", |b| {
        b.iter_custom(|iters| {
            let (_, theirs) = limiters(generous(), 1);
            let keys = keys(iters as usize);
            let start = Instant::now();
            for k in &keys {
                black_box(theirs.check_key(k).is_ok());
            }
            start.elapsed()
        })
    });
    group.finish();
}

/// Two threads checking at once, on one shared tenant or on their own.
fn two_threads(c: &mut Criterion, name: &str, shared_tenant: bool) {
    let (ours, theirs) = limiters(generous(), 1_000);
    let ours = Arc::new(ours);
    let theirs = Arc::new(theirs);
    let key_for = |thread: usize| {
        if shared_tenant {
            "tenant-hot".to_string()
        } else {
            format!("tenant-{thread}")
        }
    };
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("floodgate", |b| {
        b.iter_custom(|iters| {
            contended(iters, |t| {
                let ours = Arc::clone(&ours);
                let key = key_for(t);
                move || black_box(ours.check(&key, 1).is_ok())
            })
        })
    });
    group.bench_function("governor", |b| {
        b.iter_custom(|iters| {
            contended(iters, |t| {
                let theirs = Arc::clone(&theirs);
                let key = key_for(t);
                move || black_box(theirs.check_key(&key).is_ok())
            })
        })
    });
    group.finish();
}

/// Runs `iters` checks split over two threads that start together; returns
/// the wall time, i.e. the time per check as the pair sees it.
fn contended<F, G>(iters: u64, make: F) -> Duration
where
    F: Fn(usize) -> G,
    G: FnMut() -> bool + Send + 'static,
{
    let go = Arc::new(AtomicBool::new(false));
    let per_thread = iters.div_ceil(2);
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let mut check = make(t);
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                for _ in 0..per_thread {
                    check();
                }
            })
        })
        .collect();
    let start = Instant::now();
    go.store(true, Ordering::Release);
    for h in handles {
        let _ = h.join();
    }
    start.elapsed()
}

fn request(tenant: &str) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    if let Ok(v) = tenant.parse() {
        req.headers_mut().insert(TENANT, v);
    }
    req
}

async fn hello(_: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::empty()))
}

/// The whole middleware, in process: a bare `service_fn`, tower-governor
/// and floodgate in front of it, one tenant, a limit never reached.
fn layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("layer_one_tenant");
    group.throughput(Throughput::Elements(1));

    let mut bare = service_fn(hello);
    group.bench_function("bare", |b| {
        b.iter_batched(
            || request("tenant-hot"),
            |req| support::now(bare.call(req)),
            BatchSize::SmallInput,
        )
    });

    let mut governed = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::new(governor_config()))
        .service(service_fn(hello));
    group.bench_function("tower_governor", |b| {
        b.iter_batched(
            || request("tenant-hot"),
            |req| support::now(governed.call(req)),
            BatchSize::SmallInput,
        )
    });

    let limiter = RateLimiter::new(generous().0);
    let mut ours = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter).key(key::header(TENANT)))
        .service(service_fn(hello));
    group.bench_function("floodgate", |b| {
        b.iter_batched(
            || request("tenant-hot"),
            |req| support::now(ours.call(req)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();

    single_tenant(&mut c, "hot_tenant_allow", generous());
    single_tenant(&mut c, "hot_tenant_deny", stingy());
    round_robin(&mut c, "tenants_10k_round_robin", 10_000);
    round_robin(&mut c, "tenants_1m_round_robin", 1_000_000);
    first_seen(&mut c);
    two_threads(&mut c, "two_threads_one_tenant", true);
    two_threads(&mut c, "two_threads_own_tenants", false);
    layers(&mut c);

    c.final_summary();
    support::print_comparison(
        &[
            "hot_tenant_allow",
            "hot_tenant_deny",
            "tenants_10k_round_robin",
            "tenants_1m_round_robin",
            "first_seen_tenant",
            "two_threads_one_tenant",
            "two_threads_own_tenants",
            "layer_one_tenant",
        ],
        &["governor", "tower_governor", "bare"],
    );
}
