//! The coalescing layer in process (tokio's paused clock), and an axum
//! purge endpoint behind it and the purge batcher, over TCP.

#![allow(clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceExt, service_fn};
use tower_floodgate::TenantKey;
use tower_floodgate::coalesce::{CoalesceLayer, JoinMode};
use tower_floodgate::key;

type Body = Full<Bytes>;

/// The handlers' response body: boxed, as the layers answer with the inner
/// service's body type.
type Out = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn out(data: Bytes) -> Out {
    Full::new(data).boxed_unsync()
}

/// An inner service taking 100 ms, that records when each call started
/// and answers with the call's number.
#[derive(Clone, Default)]
struct Recorder {
    starts: Arc<Mutex<Vec<Instant>>>,
}

impl Recorder {
    fn service(
        &self,
        body_len: usize,
    ) -> impl Service<Request<Body>, Response = Response<Out>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let starts = Arc::clone(&self.starts);
        service_fn(move |_req: Request<Body>| {
            let starts = Arc::clone(&starts);
            async move {
                let n = {
                    let mut starts = starts.lock().expect("lock");
                    starts.push(Instant::now());
                    starts.len()
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut body = format!("call {n}").into_bytes();
                body.resize(body_len.max(body.len()), b'.');
                let mut res = Response::new(out(Bytes::from(body)));
                res.headers_mut().insert("x-call", n.into());
                Ok::<_, Infallible>(res)
            }
        })
    }

    fn starts(&self) -> Vec<Instant> {
        self.starts.lock().expect("lock").clone()
    }
}

fn request(method: Method, tenant: &str, body: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri("/v1/purge")
        .body(Body::new(Bytes::from(body.to_owned())))
        .expect("request");
    req.extensions_mut().insert(TenantKey::from(tenant));
    req
}

async fn read(res: Response<Out>) -> (StatusCode, Bytes) {
    let status = res.status();
    (
        status,
        res.into_body().collect().await.expect("body").to_bytes(),
    )
}

#[tokio::test(start_paused = true)]
async fn join_next_only_joins_calls_not_yet_started() {
    let recorder = Recorder::default();
    let layer = CoalesceLayer::new(JoinMode::Next);
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(recorder.service(0));
    // 1,000 identical requests over 500 ms.
    let mut tasks = Vec::new();
    for i in 0..1_000u32 {
        let svc = svc.clone();
        let sent = Instant::now();
        tasks.push(tokio::spawn(async move {
            let res = svc
                .oneshot(request(
                    Method::POST,
                    "acme",
                    "{\"urls\":[\"https://x/a\"]}",
                ))
                .await
                .expect("infallible");
            let call: usize = res
                .headers()
                .get("x-call")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("x-call");
            (sent, call, read(res).await)
        }));
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let starts = recorder.starts();
    // One running, one waiting: one call per 100 ms round trip or so.
    assert!(starts.len() <= 8, "{} calls", starts.len());
    for pair in starts.windows(2) {
        assert!(
            pair[1] >= pair[0] + Duration::from_millis(100),
            "overlapping calls"
        );
    }
    for (sent, call, (status, body)) in &answers {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(&body[..], format!("call {call}").as_bytes());
        // Answered by a call that started after the request arrived.
        assert!(starts[call - 1] >= *sent);
    }
    let stats = layer.stats();
    assert_eq!(stats.requests, 1_000);
    assert_eq!(stats.calls as usize, starts.len());
    assert_eq!(stats.coalesced + stats.calls, 1_000);
    assert_eq!(stats.active_keys, 0);
}

#[tokio::test(start_paused = true)]
async fn join_in_flight_shares_the_running_call_and_keys_keep_apart() {
    let recorder = Recorder::default();
    let svc = tower::ServiceBuilder::new()
        .layer(CoalesceLayer::new(JoinMode::InFlight))
        .service(recorder.service(0));
    let same: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(request(Method::GET, "a", ""))))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Still joins the call that has been running for 50 ms.
    let late = svc.clone().oneshot(request(Method::GET, "a", ""));
    // Another tenant, another body: calls of their own.
    let other_tenant = svc.clone().oneshot(request(Method::GET, "b", ""));
    let other_body = svc.clone().oneshot(request(Method::GET, "a", "x"));
    let (late, other_tenant, other_body) = tokio::join!(late, other_tenant, other_body);
    for task in same {
        let res = task.await.expect("task").expect("infallible");
        assert_eq!(read(res).await.1, Bytes::from_static(b"call 1"));
    }
    assert_eq!(
        read(late.expect("infallible")).await.1,
        Bytes::from_static(b"call 1")
    );
    assert_ne!(
        read(other_tenant.expect("infallible")).await.1,
        Bytes::from_static(b"call 1")
    );
    assert_ne!(
        read(other_body.expect("infallible")).await.1,
        Bytes::from_static(b"call 1")
    );
    assert_eq!(recorder.starts().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn responses_too_large_to_share_are_not_shared() {
    let recorder = Recorder::default();
    let layer = CoalesceLayer::new(JoinMode::InFlight).max_body(1024);
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(recorder.service(4096));
    let answers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(request(Method::GET, "a", ""))))
        .collect();
    for task in answers {
        let (status, body) = read(task.await.expect("task").expect("infallible")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), 4096);
    }
    // The shared call's response went to its owner; the four others made
    // calls of their own.
    assert_eq!(recorder.starts().len(), 5);
    assert_eq!(layer.stats().fallbacks, 4);

    // A request body larger than the limit is not coalesced at all.
    let big = "x".repeat(2048);
    let (a, b) = tokio::join!(
        svc.clone().oneshot(request(Method::POST, "a", &big)),
        svc.clone().oneshot(request(Method::POST, "a", &big)),
    );
    assert_eq!(read(a.expect("infallible")).await.0, StatusCode::OK);
    assert_eq!(read(b.expect("infallible")).await.0, StatusCode::OK);
    assert_eq!(layer.stats().bypassed, 2);
}

#[tokio::test(start_paused = true)]
async fn the_callers_going_away_does_not_cancel_a_shared_call_and_unstarted_calls_are_dropped() {
    let recorder = Recorder::default();
    let layer = CoalesceLayer::new(JoinMode::Next);
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(recorder.service(0));
    let leader = tokio::spawn(svc.clone().oneshot(request(Method::POST, "a", "1")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // These wait for the next call (the first is running).
    let follower = tokio::spawn(svc.clone().oneshot(request(Method::POST, "a", "1")));
    let quitter = tokio::spawn(svc.clone().oneshot(request(Method::POST, "a", "1")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    quitter.abort();
    let (_, body) = read(follower.await.expect("task").expect("infallible")).await;
    assert_eq!(&body[..], b"call 2");
    // The leader's call ran to its end anyway (the follower's started after).
    assert_eq!(recorder.starts().len(), 2);

    // Everybody waiting for the next call leaves: it is never made.
    let running = tokio::spawn(svc.clone().oneshot(request(Method::POST, "a", "2")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiting: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(request(Method::POST, "a", "2"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    for task in &waiting {
        task.abort();
    }
    running.await.expect("task").expect("infallible");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recorder.starts().len(), 3);
    assert_eq!(layer.stats().abandoned, 1);
    assert_eq!(layer.stats().active_keys, 0);
}

/// Requests of different tenants never share a call, whether the tenant
/// comes from the layer's extractor or from nowhere at all.
#[tokio::test(start_paused = true)]
async fn tenants_found_by_the_extractor_never_share_and_no_tenant_never_coalesces() {
    let header = http::HeaderName::from_static("x-tenant-id");
    let with_header = |tenant: &str| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/purge")
            .header(&header, tenant)
            .body(Body::new(Bytes::from_static(b"same")))
            .expect("request")
    };

    let recorder = Recorder::default();
    let layer = CoalesceLayer::new(JoinMode::InFlight).tenant(key::header(header.clone()));
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(recorder.service(0));
    let calls: Vec<_> = ["a", "b", "a", "b", "c"]
        .into_iter()
        .map(|t| tokio::spawn(svc.clone().oneshot(with_header(t))))
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        let res = call.await.expect("task").expect("infallible");
        answers.push(res.headers()["x-call"].to_str().expect("ascii").to_owned());
    }
    // One call per tenant: a's two requests share one, b's another.
    assert_eq!(recorder.starts().len(), 3);
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[1], answers[3]);
    assert_ne!(answers[0], answers[1]);
    assert_ne!(answers[4], answers[0]);
    assert_ne!(answers[4], answers[1]);
    assert_eq!(layer.stats().coalesced, 2);

    // Without an extractor and without a `TenantKey` extension, the same
    // requests (whoever sent them) each make their own call.
    let recorder = Recorder::default();
    let layer = CoalesceLayer::new(JoinMode::InFlight);
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(recorder.service(0));
    let calls: Vec<_> = ["a", "b", "a"]
        .into_iter()
        .map(|t| tokio::spawn(svc.clone().oneshot(with_header(t))))
        .collect();
    for call in calls {
        assert!(
            call.await
                .expect("task")
                .expect("infallible")
                .status()
                .is_success()
        );
    }
    assert_eq!(recorder.starts().len(), 3);
    assert_eq!(layer.stats().coalesced, 0);
    assert_eq!(layer.stats().bypassed, 3);
}

/// Calls in flight are per service (axum makes one per route, and strips a
/// nested router's prefix from the URI): identical requests to two routes
/// never share a call, even with a key that leaves the path out. The
/// counters are shared.
#[tokio::test(start_paused = true)]
async fn services_of_one_layer_never_share_calls() {
    let recorder = Recorder::default();
    let layer =
        CoalesceLayer::new(JoinMode::InFlight).key(|parts: &http::request::Parts, body: &Bytes| {
            let tenant = parts.extensions.get::<TenantKey>()?;
            Some([tenant.as_bytes(), b"/", body].concat())
        });
    let first = tower::Layer::layer(&layer, recorder.service(0));
    let second = tower::Layer::layer(&layer, recorder.service(0));
    let a = tokio::spawn(first.oneshot(request(Method::POST, "t", "x")));
    let b = tokio::spawn(second.oneshot(request(Method::POST, "t", "x")));
    let (a, b) = (a.await.expect("task"), b.await.expect("task"));
    let call = |r: &Response<Out>| r.headers()["x-call"].clone();
    assert_ne!(call(&a.expect("infallible")), call(&b.expect("infallible")));
    assert_eq!(recorder.starts().len(), 2);
    assert_eq!((layer.stats().requests, layer.stats().coalesced), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_or_failing_call_errors_every_waiter_and_leaves_no_entry() {
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let layer = CoalesceLayer::new(JoinMode::InFlight);
    let inner = {
        let (calls, fail) = (Arc::clone(&calls), Arc::clone(&fail));
        service_fn(move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let fail = fail.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if fail {
                    return Err("upstream refused");
                }
                if n == 0 {
                    panic!("handler bug");
                }
                Ok(Response::new(out(Bytes::from_static(b"fine"))))
            }
        })
    };
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner);
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(request(Method::GET, "a", ""))))
        .collect();
    for task in waiters {
        let (status, body) = read(task.await.expect("task").expect("no error")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(String::from_utf8_lossy(&body).contains("panicked"));
    }
    assert_eq!(layer.stats().active_keys, 0);
    // The next call works.
    let (status, _) = read(
        svc.clone()
            .oneshot(request(Method::GET, "a", ""))
            .await
            .expect("ok"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // An error reaches every waiter as a 500, with the reason.
    fail.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(
        svc.clone().oneshot(request(Method::GET, "a", "")),
        svc.clone().oneshot(request(Method::GET, "a", "")),
    );
    for res in [a, b] {
        let (status, body) = read(res.expect("no error")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(String::from_utf8_lossy(&body).contains("upstream refused"));
    }
    assert_eq!(layer.stats().active_keys, 0);
}

mod over_tcp {
    use super::*;
    use axum::Router;
    use axum::extract::{Json, State};
    use axum::routing::post;
    use common::{Http, serve};
    use tower_floodgate::purge::{ItemResult, Mode, PurgeBatch, PurgeBatcher, Target};

    #[derive(serde::Deserialize)]
    struct Purge {
        urls: Vec<String>,
    }

    #[tokio::test]
    async fn a_purge_endpoint_behind_the_layer_and_the_batcher() {
        let backend_calls = Arc::new(AtomicUsize::new(0));
        let items_sent = Arc::new(AtomicUsize::new(0));
        let backend = {
            let (calls, items) = (Arc::clone(&backend_calls), Arc::clone(&items_sent));
            service_fn(move |batch: PurgeBatch| {
                calls.fetch_add(1, Ordering::SeqCst);
                items.fetch_add(batch.items.len(), Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(vec![ItemResult::Purged; batch.items.len()])
                }
            })
        };
        let batcher = PurgeBatcher::new(backend);
        let layer = CoalesceLayer::new(JoinMode::Next)
            .tenant(key::header(http::HeaderName::from_static("x-tenant-id")));
        let app = Router::new()
            .route(
                "/v1/purge",
                post(
                    |State(batcher): State<PurgeBatcher<_>>, Json(purge): Json<Purge>| async move {
                        let mut purged = 0;
                        for url in purge.urls {
                            let Ok(target) = Target::url(&url) else {
                                return (StatusCode::BAD_REQUEST, "bad url".to_owned());
                            };
                            let outcome = batcher
                                .purge(TenantKey::from("acme"), target, Mode::Hard)
                                .await;
                            purged += usize::from(outcome.result == ItemResult::Purged);
                        }
                        (StatusCode::OK, format!("purged {purged}"))
                    },
                ),
            )
            .with_state(batcher.clone())
            .layer(layer.clone());
        let http = Http::new(serve(app).await);

        // 400 requests from 40 connections at once: half the same purge,
        // half each a different URL.
        let mut tasks = Vec::new();
        for i in 0..400 {
            let http = http.clone();
            tasks.push(tokio::spawn(async move {
                let url = if i % 2 == 0 {
                    "https://cdn.example.com/hot.png".to_owned()
                } else {
                    format!("https://cdn.example.com/{i}.png")
                };
                let body = format!("{{\"urls\":[\"{url}\"]}}");
                http.send(
                    "POST",
                    "/v1/purge",
                    &[
                        ("content-type", "application/json"),
                        ("x-tenant-id", "acme"),
                    ],
                    &body,
                )
                .await
            }));
        }
        for task in tasks {
            let reply = task.await.expect("task");
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(&reply.body[..], b"purged 1");
        }
        let calls = backend_calls.load(Ordering::SeqCst);
        let items = items_sent.load(Ordering::SeqCst);
        // 200 distinct URLs plus a handful of rounds of the hot one, in a
        // few batches rather than 400 calls.
        assert!(calls < 40, "{calls} backend calls");
        assert!((201..240).contains(&items), "{items} items sent");
        let stats = layer.stats();
        assert_eq!(stats.requests, 400);
        assert!(stats.coalesced > 100, "{stats:?}");
        assert_eq!(batcher.stats().pending, 0);
    }
}
