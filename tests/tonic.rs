//! The rate-limit layer in front of a real tonic 0.14 gRPC server on
//! 127.0.0.1 (the standard health service), called by a real tonic client.

#![allow(clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderName;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_floodgate::{Clock, ManualClock, Quota, RateLimitLayer, RateLimiter, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

async fn serve<K, C>(layer: RateLimitLayer<K, C>) -> Channel
where
    K: tower_floodgate::KeyExtractor<http::Request<tonic::body::Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    C: tower_floodgate::cost::RequestCost<http::Request<tonic::body::Body>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    start(|incoming| async move {
        Server::builder()
            .layer(layer)
            .add_service(tonic_health::server::health_reporter().1)
            .serve_with_incoming(incoming)
            .await
    })
    .await
}

/// Serves on 127.0.0.1:0 with `run` (a server with the layers in front of
/// the health service) and connects a channel to it.
async fn start<F, Fut>(run: F) -> Channel
where
    F: FnOnce(TcpListenerStream) -> Fut,
    Fut: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let serving = run(TcpListenerStream::new(listener));
    tokio::spawn(async move { serving.await.expect("serve") });
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

fn limiter(quota: Quota) -> (RateLimiter, ManualClock) {
    let (clock, time) = Clock::manual();
    (RateLimiter::builder(quota).clock(clock).build(), time)
}

async fn check(channel: &Channel, tenant: Option<&str>) -> Result<(), Status> {
    let mut request = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(tenant) = tenant {
        request
            .metadata_mut()
            .insert("x-tenant", tenant.parse().expect("ascii"));
    }
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .map(|_| ())
}

fn meta<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn over_quota_is_resource_exhausted_with_pushback_and_isolated() {
    // 2 per minute: one unit every 30 s.
    let (limiter, time) = limiter(Quota::per_minute(nz(2)));
    let channel = serve(RateLimitLayer::new(limiter).key(key::header(TENANT))).await;

    assert!(check(&channel, Some("noisy")).await.is_ok());
    assert!(check(&channel, Some("noisy")).await.is_ok());
    time.advance(Duration::from_millis(1_500));
    let status = check(&channel, Some("noisy"))
        .await
        .expect_err("over quota");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(meta(&status, "grpc-retry-pushback-ms"), Some("28500"));
    assert_eq!(meta(&status, "retry-after"), Some("29"));
    assert_eq!(
        meta(&status, "ratelimit-policy"),
        Some("\"default\";q=2;w=60")
    );
    assert!(status.message().contains("noisy"), "{}", status.message());

    // The other tenant is unaffected.
    assert!(check(&channel, Some("quiet")).await.is_ok());
    assert!(check(&channel, Some("quiet")).await.is_ok());

    time.advance(Duration::from_millis(28_500));
    assert!(check(&channel, Some("noisy")).await.is_ok());
}

#[tokio::test]
async fn missing_key_is_unauthenticated() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(2)));
    let channel = serve(RateLimitLayer::new(limiter).key(key::header(TENANT))).await;
    let status = check(&channel, None).await.expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(meta(&status, "grpc-retry-pushback-ms"), None);
}

#[tokio::test]
async fn a_cost_above_the_burst_asks_not_to_retry() {
    let (limiter, _time) = limiter(Quota::per_minute(nz(2)));
    let layer =
        RateLimitLayer::new(limiter)
            .key(key::header(TENANT))
            .cost(tower_floodgate::cost::from_fn(
                |_: &http::Request<tonic::body::Body>| 3,
            ));
    let channel = serve(layer).await;
    let status = check(&channel, Some("t")).await.expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(meta(&status, "grpc-retry-pushback-ms"), Some("-1"));
    assert_eq!(meta(&status, "retry-after"), None);
}

#[tokio::test]
async fn peer_address_from_tonic_connect_info() {
    let (limiter, _time) = limiter(Quota::per_hour(nz(1)));
    let channel = serve(RateLimitLayer::new(limiter.clone()).key(key::peer_addr())).await;
    assert!(check(&channel, None).await.is_ok());
    let status = check(&channel, None).await.expect_err("limited");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(limiter.check("127.0.0.1", 1).is_err());
}

#[tokio::test]
async fn rejections_convert_to_tonic_status() {
    use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
    use tower_floodgate::{Rejection, TenantKey};

    let (limiter, _time) = limiter(Quota::per_hour(nz(1)));
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(limiter)
                .key(key::from_fn(|t: &&'static str| Some(TenantKey::from(*t))))
                .into_generic(),
        )
        .service(service_fn(|_: &'static str| async {
            Ok::<_, Status>("done")
        }));
    let ready = svc.ready().await.expect("ready");
    assert_eq!(ready.call("t").await.expect("admitted"), "done");
    let err = svc
        .ready()
        .await
        .expect("ready")
        .call("t")
        .await
        .expect_err("limited");
    let rejection = err.downcast::<Rejection>().expect("a rejection");
    let status = Status::from(*rejection);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(meta(&status, "grpc-retry-pushback-ms"), Some("3600000"));
    assert_eq!(meta(&status, "retry-after"), Some("3600"));
}

/// `FloodgateLayer` in front of tonic: over its rate a tenant gets
/// RESOURCE_EXHAUSTED with the retry pushback while another is served, and
/// a call without a key UNAUTHENTICATED.
#[tokio::test]
async fn the_combined_layer_answers_grpc_status_codes() {
    use tower_floodgate::shed::{Limit, LoadShedLayer};
    use tower_floodgate::{ConcurrencyCapLayer, FloodgateLayer, Plan, PolicyHandle};

    let (clock, _time) = Clock::manual();
    let policy = PolicyHandle::from(Plan::new("p").rate(Quota::per_minute(nz(2))).concurrency(4));
    let rate = RateLimitLayer::new(RateLimiter::builder(policy.clone()).clock(clock).build());
    let cap = ConcurrencyCapLayer::new(policy.clone());
    let shed = LoadShedLayer::new(Limit::fixed(8)).policy(policy);
    let layer = FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed);
    let channel = start(|incoming| async move {
        Server::builder()
            .layer(layer)
            .add_service(tonic_health::server::health_reporter().1)
            .serve_with_incoming(incoming)
            .await
    })
    .await;

    check(&channel, Some("acme")).await.expect("first");
    check(&channel, Some("acme")).await.expect("second");
    let refused = check(&channel, Some("acme"))
        .await
        .expect_err("over the rate");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(meta(&refused, "grpc-retry-pushback-ms"), Some("30000"));
    check(&channel, Some("other"))
        .await
        .expect("another tenant");
    let anonymous = check(&channel, None).await.expect_err("no key");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(cap.stats().tenants_in_flight, 0);
    assert_eq!(shed.stats().in_flight, 0);
    assert_eq!(rate.stats().rate_limited, 1);
}
