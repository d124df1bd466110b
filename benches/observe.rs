//! What observing decisions costs: the rate limit layer around the same
//! `service_fn`, without an observer, with one that does nothing, with the
//! `tracing` observer (a subscriber at `INFO`, writing to a sink: admitted
//! requests are not logged, refusals once a second), with the heavy-hitter
//! view, and with both; for admitted requests spread over 1,000 tenants,
//! and for a flooding tenant whose requests are all refused.
//!
//! First, each observer alone, handed one event (`observer_event`).
//!
//! Run with `cargo bench --bench observe`. After criterion's report, a table
//! prints each observer's time and its difference from no observer.

mod support;

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Service, ServiceBuilder, service_fn};
use tower_floodgate::observe::{self, Decision, Event, LayerKind, Observer, TopTenants, Tracing};
use tower_floodgate::{Quota, RateLimitLayer, RateLimiter, TenantKey, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");
const TENANTS: usize = 1_000;

type Req = Request<()>;

async fn hello(_: Req) -> Result<Response<axum::body::Body>, Infallible> {
    Ok(Response::new(axum::body::Body::empty()))
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn tenants() -> Vec<HeaderValue> {
    (0..TENANTS)
        .map(|i| {
            HeaderValue::from_str(&format!("tenant-{i}")).unwrap_or(HeaderValue::from_static("t"))
        })
        .collect()
}

fn request(tenant: &HeaderValue) -> Req {
    let mut req = Request::new(());
    req.headers_mut().insert(TENANT, tenant.clone());
    req
}

type Caller = Box<dyn FnMut(Req)>;

/// `call` around the layer, its observer set by `observe`.
fn caller(
    quota: Quota,
    observe: impl FnOnce(RateLimitLayer<key::Header>) -> RateLimitLayer<key::Header>,
) -> Caller {
    let layer = observe(RateLimitLayer::new(RateLimiter::new(quota)).key(key::header(TENANT)));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(hello));
    Box::new(move |req| {
        std::hint::black_box(support::now(svc.call(req)).is_ok());
    })
}

/// The layer with each observer compared.
fn services(quota: Quota) -> Vec<(&'static str, Caller)> {
    vec![
        ("none", caller(quota, |l| l)),
        (
            "noop",
            caller(quota, |l| l.observer(observe::from_fn(|_| {}))),
        ),
        ("tracing", caller(quota, |l| l.observer(Tracing::new()))),
        ("top_k", caller(quota, |l| l.observer(TopTenants::new()))),
        (
            "tracing_top_k",
            caller(quota, |l| l.observer((Tracing::new(), TopTenants::new()))),
        ),
    ]
}

fn admitted(c: &mut Criterion) {
    let tenants = tenants();
    let mut group = c.benchmark_group("observe_admitted");
    group.throughput(Throughput::Elements(1));
    let quota = Quota::per_second(nz(u32::MAX)).allow_burst(nz(u32::MAX));
    for (name, mut call) in services(quota) {
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % TENANTS;
                    request(&tenants[next])
                },
                &mut call,
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn refused(c: &mut Criterion) {
    let flooder = HeaderValue::from_static("flooder");
    let mut group = c.benchmark_group("observe_refused");
    group.throughput(Throughput::Elements(1));
    for (name, mut call) in services(Quota::per_hour(nz(1))) {
        call(request(&flooder));
        group.bench_function(name, |b| {
            b.iter_batched(|| request(&flooder), &mut call, BatchSize::SmallInput)
        });
    }
    group.finish();
}

/// One admitted event handed to each observer directly, over 1,000
/// tenants: the observer's own cost, without the layer's.
fn events(c: &mut Criterion) {
    let keys: Vec<TenantKey> = (0..TENANTS)
        .map(|i| TenantKey::from(format!("tenant-{i}").as_str()))
        .collect();
    let mut group = c.benchmark_group("observer_event");
    group.throughput(Throughput::Elements(1));
    let observers: Vec<(&str, Box<dyn Observer>)> = vec![
        ("noop", Box::new(observe::from_fn(|_| {}))),
        ("tracing", Box::new(Tracing::new())),
        ("top_k", Box::new(TopTenants::new())),
    ];
    for (name, observer) in observers {
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                next = (next + 1) % TENANTS;
                let event = Event::new(
                    LayerKind::RateLimit,
                    Decision::Admitted,
                    Some(std::hint::black_box(&keys[next])),
                );
                observer.observe(std::hint::black_box(&event));
            })
        });
    }
    group.finish();
}

fn main() {
    // What a service in production has: a subscriber at INFO.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .sample_size(50)
        .configure_from_args();
    events(&mut c);
    admitted(&mut c);
    refused(&mut c);
    c.final_summary();

    for ours in ["noop", "tracing", "top_k", "tracing_top_k"] {
        support::print_named(ours, &["observe_admitted", "observe_refused"], &["none"]);
    }
}
