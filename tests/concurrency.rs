//! The concurrency cap in front of real axum and tonic servers on
//! 127.0.0.1, with real clients.

#![allow(clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::get;
use bytes::Bytes;
use common::{Http, serve};
use http::{HeaderName, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tower_floodgate::{ConcurrencyCapLayer, Plan, Policy, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

/// A server whose `/hold` handler reports each arrival (with its `x-id`)
/// and then waits for the test to add a permit to the gate; `/` answers at
/// once.
async fn gated_server(
    caps: ConcurrencyCapLayer<key::Header>,
) -> (Http, Arc<Semaphore>, mpsc::UnboundedReceiver<String>) {
    let gate = Arc::new(Semaphore::new(0));
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let hold_gate = Arc::clone(&gate);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/hold",
            get(move |req: Request| {
                let (gate, arrived) = (Arc::clone(&hold_gate), arrived.clone());
                async move {
                    let id = req
                        .headers()
                        .get("x-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let _ = arrived.send(id);
                    gate.acquire().await.expect("open").forget();
                    "held"
                }
            }),
        )
        .layer(caps);
    (Http::new(serve(app).await), gate, arrivals)
}

fn hold(http: &Http, tenant: &str, id: &str) -> tokio::task::JoinHandle<StatusCode> {
    let (http, tenant, id) = (http.clone(), tenant.to_owned(), id.to_owned());
    tokio::spawn(async move {
        http.send("GET", "/hold", &[("x-tenant", &tenant), ("x-id", &id)], "")
            .await
            .status
    })
}

#[tokio::test]
async fn a_tenant_at_its_cap_gets_429_while_another_is_served() {
    let policy = Policy::builder(Plan::new("standard").concurrency(2))
        .build()
        .expect("policy");
    let caps = ConcurrencyCapLayer::new(policy).key(key::header(TENANT));
    let (http, gate, mut arrivals) = gated_server(caps.clone()).await;

    let first = hold(&http, "noisy", "1");
    let second = hold(&http, "noisy", "2");
    arrivals.recv().await.expect("arrival");
    arrivals.recv().await.expect("arrival");

    let reply = http.get_as("noisy").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"standard\";q=2;qu=\"concurrent-requests\"")
    );
    assert_eq!(reply.header("ratelimit"), Some("\"standard\";r=0"));
    assert_eq!(reply.header("retry-after"), None);
    assert_eq!(
        reply.json()["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(
        reply.json()["violated-policies"],
        serde_json::json!(["standard"])
    );

    // Another tenant is served meanwhile.
    assert_eq!(http.get_as("quiet").await.status, StatusCode::OK);

    gate.add_permits(2);
    assert_eq!(first.await.expect("task"), StatusCode::OK);
    assert_eq!(second.await.expect("task"), StatusCode::OK);
    assert_eq!(http.get_as("noisy").await.status, StatusCode::OK);
    assert_eq!(caps.stats().tenant_capped, 1);
    assert_eq!(caps.stats().tenants_in_flight, 0);
}

#[tokio::test]
async fn the_permit_is_held_until_a_slow_streaming_body_is_done() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1)).key(key::header(TENANT));
    let (download, chunks_tx) = common::download();
    let app = download.layer(caps.clone());
    let http = Http::new(serve(app).await);

    // The handler has returned and the headers are here, but the body is
    // still streaming.
    let body = http.start_download("t", &chunks_tx).await;

    assert_eq!(http.get_as("t").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(caps.stats().tenants_in_flight, 1);

    // The last chunk, then the end: the permit comes back.
    chunks_tx
        .send(Ok(Bytes::from_static(b"part 2")))
        .await
        .expect("send");
    drop(chunks_tx);
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, Bytes::from_static(b"part 2"));
    assert_eq!(http.get_as("t").await.status, StatusCode::OK);
    assert_eq!(caps.stats().tenants_in_flight, 0);
}

#[tokio::test]
async fn the_queue_admits_in_order_and_times_out_as_configured() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1))
        .key(key::header(TENANT))
        .queue(2, Duration::from_millis(300));
    let (http, gate, mut arrivals) = gated_server(caps.clone()).await;

    let holder = hold(&http, "t", "0");
    assert_eq!(arrivals.recv().await.as_deref(), Some("0"));
    // Queue 1, then 2, each once the previous is known to wait.
    let mut queued = Vec::new();
    for id in ["1", "2"] {
        let before = caps.stats().waiting;
        queued.push(hold(&http, "t", id));
        while caps.stats().waiting == before {
            tokio::task::yield_now().await;
        }
    }
    // The queue is full: refused at once.
    assert_eq!(http.get_as("t").await.status, StatusCode::TOO_MANY_REQUESTS);

    // Releasing lets them in one at a time, in arrival order.
    for expected in ["1", "2"] {
        gate.add_permits(1);
        assert_eq!(arrivals.recv().await.as_deref(), Some(expected));
    }
    gate.add_permits(1);
    assert_eq!(holder.await.expect("task"), StatusCode::OK);
    for task in queued {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }

    // One that waits in vain is refused after its 300 ms, not before.
    let holder = hold(&http, "t", "3");
    assert_eq!(arrivals.recv().await.as_deref(), Some("3"));
    let started = Instant::now();
    let reply = http.get_as("t").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        reply.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("waited in vain"))
    );
    assert_eq!(caps.stats().timed_out, 1);
    gate.add_permits(1);
    assert_eq!(holder.await.expect("task"), StatusCode::OK);
}

#[tokio::test]
async fn the_global_cap_answers_503_with_retry_after() {
    let caps = ConcurrencyCapLayer::new(Plan::new("unlimited"))
        .key(key::header(TENANT))
        .global_limit(2)
        .retry_after(Duration::from_secs(3));
    let (http, gate, mut arrivals) = gated_server(caps.clone()).await;
    let a = hold(&http, "a", "a");
    let b = hold(&http, "b", "b");
    arrivals.recv().await.expect("arrival");
    arrivals.recv().await.expect("arrival");

    let reply = http.get_as("c").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after"), Some("3"));
    let body = reply.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );
    assert_eq!(body["status"], 503);
    assert_eq!(body["retry_after"], 3);
    assert_eq!(caps.stats().global_in_flight, 2);

    gate.add_permits(2);
    assert_eq!(a.await.expect("task"), StatusCode::OK);
    assert_eq!(b.await.expect("task"), StatusCode::OK);
    assert_eq!(http.get_as("c").await.status, StatusCode::OK);
    assert_eq!(caps.stats().global_in_flight, 0);
}

#[tokio::test]
async fn shadow_mode_counts_what_it_would_refuse() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1))
        .key(key::header(TENANT))
        .shadow(true);
    let (http, gate, mut arrivals) = gated_server(caps.clone()).await;
    let first = hold(&http, "t", "1");
    let second = hold(&http, "t", "2");
    arrivals.recv().await.expect("arrival");
    arrivals.recv().await.expect("arrival");
    assert_eq!(caps.stats().shadow_rejected, 1);
    assert_eq!(caps.stats().tenants_in_flight, 2);
    gate.add_permits(2);
    assert_eq!(first.await.expect("task"), StatusCode::OK);
    assert_eq!(second.await.expect("task"), StatusCode::OK);
    caps.set_shadow(false);
    assert_eq!(caps.stats().tenants_in_flight, 0);
}

#[tokio::test]
async fn caps_follow_the_policy_at_run_time() {
    let policy = tower_floodgate::PolicyHandle::new(Policy::new(Plan::new("p").concurrency(1)));
    let caps = ConcurrencyCapLayer::new(policy.clone()).key(key::header(TENANT));
    let (http, gate, mut arrivals) = gated_server(caps.clone()).await;
    let first = hold(&http, "t", "1");
    arrivals.recv().await.expect("arrival");
    assert_eq!(http.get_as("t").await.status, StatusCode::TOO_MANY_REQUESTS);
    policy
        .update(|p| p.override_plan("t", Plan::new("wide").concurrency(5)))
        .expect("valid");
    assert_eq!(http.get_as("t").await.status, StatusCode::OK);
    gate.add_permits(1);
    assert_eq!(first.await.expect("task"), StatusCode::OK);
}

mod grpc {
    use super::*;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Code, Request};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    fn tenant_request(tenant: &str) -> Request<HealthCheckRequest> {
        let mut request = Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request
            .metadata_mut()
            .insert("x-tenant", tenant.parse().expect("ascii"));
        request
    }

    /// A `Watch` stream holds its permit for as long as it is open.
    #[tokio::test]
    async fn a_tenant_at_its_cap_gets_resource_exhausted_while_another_is_served() {
        let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1)).key(key::header(TENANT));
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let layer = caps.clone();
        tokio::spawn(async move {
            Server::builder()
                .layer(layer)
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("serve");
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = HealthClient::new(channel);

        let mut watch = client
            .watch(tenant_request("noisy"))
            .await
            .expect("watch")
            .into_inner();
        assert!(watch.message().await.expect("status").is_some());

        let status = client
            .check(tenant_request("noisy"))
            .await
            .expect_err("at its cap");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get("ratelimit-policy")
                .and_then(|v| v.to_str().ok()),
            Some("\"p\";q=1;qu=\"concurrent-requests\"")
        );
        assert!(client.check(tenant_request("quiet")).await.is_ok());

        // Closing the stream returns the permit.
        drop(watch);
        let deadline = Instant::now() + Duration::from_secs(5);
        while caps.stats().tenants_in_flight > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(client.check(tenant_request("noisy")).await.is_ok());
    }
}
