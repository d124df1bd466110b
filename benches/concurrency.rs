//! tower-floodgate's concurrency cap and load shedder against tower's
//! `ConcurrencyLimit` and `LoadShed`, on the same service in the same run:
//! the cost of one call uncontended, and with two threads calling at once.
//!
//! For the cap, `floodgate` is the like-for-like configuration (a global
//! limit); `floodgate_per_tenant` adds a cap per tenant, which costs finding
//! the tenant and a second count. For shedding, `floodgate` is a fixed limit
//! with priorities; `floodgate_fair` adds fairness between tenants (the
//! default), which counts each tenant's requests in flight. tower's
//! `LoadShed` has neither: it only passes on an inner service's readiness,
//! and counts nothing. To shed at a number of requests in flight, a tower
//! user stacks it on `ConcurrencyLimit`: that stack is `tower_stack`.
//!
//! Run with `cargo bench --bench concurrency`. After criterion's report, a
//! table prints each workload's times, the ratio floodgate / other and the
//! difference per call.

mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::{BatchSize, Criterion, Throughput};
use http::{Request, Response};
use support::now;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{ConcurrencyCapLayer, Plan, TenantKey};

const LIMIT: u32 = 1024;

type Req = Request<()>;
type Res = Response<Body>;

fn request(tenant: &TenantKey) -> Req {
    let mut req = Request::new(());
    req.extensions_mut().insert(tenant.clone());
    req
}

async fn hello(_: Req) -> Result<Res, Infallible> {
    Ok(Response::new(Body::empty()))
}

/// One call: wait until ready, call, drop the response (which returns the
/// permit).
fn call_once<S>(svc: &mut S, req: Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let ready = now(svc.ready());
    if let Ok(svc) = ready {
        black_box(now(svc.call(req)).is_ok());
    }
}

type Caller = Box<dyn FnMut(Req) + Send>;

/// The concurrency caps compared, each around the same `service_fn`.
fn caps() -> Vec<(&'static str, Caller)> {
    let mut bare = service_fn(hello);
    let mut tower_limit = ServiceBuilder::new()
        .concurrency_limit(LIMIT as usize)
        .service(service_fn(hello));
    let mut ours = ServiceBuilder::new()
        .layer(ConcurrencyCapLayer::new(Plan::new("p")).global_limit(LIMIT))
        .service(service_fn(hello));
    let mut per_tenant = ServiceBuilder::new()
        .layer(ConcurrencyCapLayer::new(Plan::new("p").concurrency(LIMIT)).global_limit(LIMIT))
        .service(service_fn(hello));
    vec![
        ("bare", Box::new(move |req| call_once(&mut bare, req))),
        (
            "tower",
            Box::new(move |req| call_once(&mut tower_limit, req)),
        ),
        ("floodgate", Box::new(move |req| call_once(&mut ours, req))),
        (
            "floodgate_per_tenant",
            Box::new(move |req| call_once(&mut per_tenant, req)),
        ),
    ]
}

/// The load shedders compared, each around the same `service_fn`.
fn shedders() -> Vec<(&'static str, Caller)> {
    let mut bare = service_fn(hello);
    let mut tower_shed = ServiceBuilder::new().load_shed().service(service_fn(hello));
    let mut tower_stack = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(LIMIT as usize)
        .service(service_fn(hello));
    let mut ours = ServiceBuilder::new()
        .layer(LoadShedLayer::new(Limit::fixed(LIMIT)).fairness(false))
        .service(service_fn(hello));
    let mut fair = ServiceBuilder::new()
        .layer(LoadShedLayer::new(Limit::fixed(LIMIT)))
        .service(service_fn(hello));
    vec![
        ("bare", Box::new(move |req| call_once(&mut bare, req))),
        (
            "tower",
            Box::new(move |req| call_once(&mut tower_shed, req)),
        ),
        (
            "tower_stack",
            Box::new(move |req| call_once(&mut tower_stack, req)),
        ),
        ("floodgate", Box::new(move |req| call_once(&mut ours, req))),
        (
            "floodgate_fair",
            Box::new(move |req| call_once(&mut fair, req)),
        ),
    ]
}

fn uncontended(c: &mut Criterion, name: &str, services: Vec<(&'static str, Caller)>) {
    let tenant = TenantKey::from("tenant-hot");
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    for (name, mut call) in services {
        group.bench_function(name, |b| {
            b.iter_batched(|| request(&tenant), &mut call, BatchSize::SmallInput)
        });
    }
    group.finish();
}

/// Two threads, each with its own clone of the service (sharing the
/// limit), calling for the same tenant at once; the wall time per call.
fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("concurrency_two_threads");
    group.throughput(Throughput::Elements(1));
    let bare = service_fn(hello);
    group.bench_function("bare", |b| b.iter_custom(|iters| contended(iters, || bare)));
    let tower_limit = ServiceBuilder::new()
        .concurrency_limit(LIMIT as usize)
        .service(service_fn(hello));
    group.bench_function("tower", |b| {
        b.iter_custom(|iters| contended(iters, || tower_limit.clone()))
    });
    let ours = ServiceBuilder::new()
        .layer(ConcurrencyCapLayer::new(Plan::new("p")).global_limit(LIMIT))
        .service(service_fn(hello));
    group.bench_function("floodgate", |b| {
        b.iter_custom(|iters| contended(iters, || ours.clone()))
    });
    let per_tenant = ServiceBuilder::new()
        .layer(ConcurrencyCapLayer::new(Plan::new("p").concurrency(LIMIT)).global_limit(LIMIT))
        .service(service_fn(hello));
    group.bench_function("floodgate_per_tenant", |b| {
        b.iter_custom(|iters| contended(iters, || per_tenant.clone()))
    });
    group.finish();

    let mut group = c.benchmark_group("shed_two_threads");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare", |b| b.iter_custom(|iters| contended(iters, || bare)));
    let tower_shed = ServiceBuilder::new().load_shed().service(service_fn(hello));
    group.bench_function("tower", |b| {
        b.iter_custom(|iters| contended(iters, || tower_shed.clone()))
    });
    let tower_stack = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(LIMIT as usize)
        .service(service_fn(hello));
    group.bench_function("tower_stack", |b| {
        b.iter_custom(|iters| contended(iters, || tower_stack.clone()))
    });
    let ours = ServiceBuilder::new()
        .layer(LoadShedLayer::new(Limit::fixed(LIMIT)).fairness(false))
        .service(service_fn(hello));
    group.bench_function("floodgate", |b| {
        b.iter_custom(|iters| contended(iters, || ours.clone()))
    });
    let fair = ServiceBuilder::new()
        .layer(LoadShedLayer::new(Limit::fixed(LIMIT)))
        .service(service_fn(hello));
    group.bench_function("floodgate_fair", |b| {
        b.iter_custom(|iters| contended(iters, || fair.clone()))
    });
    group.finish();
}

fn contended<S, F>(iters: u64, make: F) -> Duration
where
    F: Fn() -> S,
    S: Service<Req> + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let tenant = TenantKey::from("tenant-hot");
    let go = Arc::new(AtomicBool::new(false));
    let per_thread = iters.div_ceil(2) as usize;
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mut svc = make();
            let requests: Vec<Req> = (0..per_thread).map(|_| request(&tenant)).collect();
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                for req in requests {
                    call_once(&mut svc, req);
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

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    uncontended(&mut c, "concurrency_uncontended", caps());
    uncontended(&mut c, "shed_uncontended", shedders());
    two_threads(&mut c);
    c.final_summary();
    support::print_comparison(
        &["concurrency_uncontended", "concurrency_two_threads"],
        &["tower", "bare"],
    );
    support::print_comparison(
        &["shed_uncontended", "shed_two_threads"],
        &["tower", "tower_stack", "bare"],
    );
    support::print_named(
        "floodgate_per_tenant",
        &["concurrency_uncontended", "concurrency_two_threads"],
        &["tower", "bare"],
    );
    support::print_named(
        "floodgate_fair",
        &["shed_uncontended", "shed_two_threads"],
        &["tower", "tower_stack", "bare"],
    );
}
