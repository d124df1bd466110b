//! The concurrency cap in process, on tokio's paused clock: queue order and
//! deadlines to the millisecond, and cancellation at every point.

#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{Notify, Semaphore};
use tower::{Service, ServiceExt, service_fn};
use tower_floodgate::{ConcurrencyCapLayer, Plan, Policy, Rejection, key};

const TENANT: HeaderName = HeaderName::from_static("x-tenant");

fn request(tenant: &str, id: usize) -> Request<String> {
    Request::builder()
        .header(TENANT, tenant)
        .header("x-id", id.to_string())
        .body(String::new())
        .expect("request")
}

fn id_of(req: &Request<String>) -> usize {
    req.headers()
        .get("x-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The handlers' response body: boxed, as the layers answer with the inner
/// service's body type.
type Out = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn out(data: Bytes) -> Out {
    Full::new(data).boxed_unsync()
}

/// A handler that records the order requests reach it and holds each until
/// the test adds a permit to `release`.
fn gated(
    order: Arc<Mutex<Vec<usize>>>,
    release: Arc<Semaphore>,
) -> impl Service<Request<String>, Response = Response<Out>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |req: Request<String>| {
        let (order, release) = (Arc::clone(&order), Arc::clone(&release));
        async move {
            order.lock().expect("lock").push(id_of(&req));
            release.acquire().await.expect("open").forget();
            Ok::<_, Infallible>(Response::new(out(Bytes::from_static(b"done"))))
        }
    })
}

/// Sends `req` and reads the whole response, releasing its permit.
async fn exchange<S>(svc: S, req: Request<String>) -> StatusCode
where
    S: Service<Request<String>, Response = Response<Out>, Error = Infallible>,
{
    let res = svc.oneshot(req).await.expect("infallible");
    let status = res.status();
    res.into_body().collect().await.expect("body");
    status
}

#[tokio::test(start_paused = true)]
async fn queue_admits_in_order_and_times_out_on_the_dot() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1))
        .key(key::header(TENANT))
        .queue(3, Duration::from_millis(200));
    let order = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(caps.clone())
        .service(gated(Arc::clone(&order), Arc::clone(&release)));

    // 0 takes the only permit; 1, 2, 3 queue in that order; 4 finds the
    // queue full and is refused at once.
    let mut tasks = Vec::new();
    for id in 0..4 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(exchange(svc, request("t", id))));
        tokio::task::yield_now().await;
    }
    let full = svc
        .clone()
        .oneshot(request("t", 4))
        .await
        .expect("infallible");
    assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(caps.stats().waiting, 3);
    assert_eq!(*order.lock().expect("lock"), [0]);

    // Each release lets exactly the next in line in.
    for expected in [vec![0, 1], vec![0, 1, 2], vec![0, 1, 2, 3]] {
        tokio::time::advance(Duration::from_millis(50)).await;
        release.add_permits(1);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(*order.lock().expect("lock"), expected);
    }
    release.add_permits(1);
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    let stats = caps.stats();
    assert_eq!((stats.tenants_in_flight, stats.waiting), (0, 0));

    // A request that waits in vain is refused at its deadline, not before.
    let holder = tokio::spawn(exchange(svc.clone(), request("t", 10)));
    tokio::task::yield_now().await;
    let waiter = tokio::spawn(svc.clone().oneshot(request("t", 11)));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(199)).await;
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = waiter.await.expect("task").expect("infallible");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("waited in vain"));
    assert_eq!(caps.stats().timed_out, 1);
    release.add_permits(1);
    assert_eq!(holder.await.expect("task"), StatusCode::OK);
    assert_eq!(caps.stats().tenants_in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn global_queue_and_tenant_queue_compose() {
    // Two tenants with a cap of 2 each, 3 in flight overall.
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(2))
        .key(key::header(TENANT))
        .global_limit(3)
        .queue(2, Duration::from_secs(1));
    let order = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(caps.clone())
        .service(gated(Arc::clone(&order), Arc::clone(&release)));
    let mut tasks = Vec::new();
    for (id, tenant) in [(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "a")] {
        tasks.push(tokio::spawn(exchange(svc.clone(), request(tenant, id))));
        tokio::task::yield_now().await;
    }
    // 0, 1, 2 run; 3 (b) waits for the global cap; 4 (a) waits for a's cap.
    assert_eq!(*order.lock().expect("lock"), [0, 1, 2]);
    let stats = caps.stats();
    assert_eq!((stats.global_in_flight, stats.waiting), (3, 2));
    // Releasing 0 (a) frees a global unit, which goes to 3 (b, first in
    // the global queue), then a's unit goes to 4.
    release.add_permits(1);
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3]);
    release.add_permits(1);
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3, 4]);
    release.add_permits(3);
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    let stats = caps.stats();
    assert_eq!(
        (
            stats.global_in_flight,
            stats.tenants_in_flight,
            stats.waiting
        ),
        (0, 0, 0)
    );
}

/// A tiny deterministic generator for the chaos test.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Thousands of requests from a few tenants, each abandoned at a random
/// point: while queued, inside the handler, before the response is read,
/// or in the middle of its streaming body. Afterwards every permit is back
/// and every queue is empty.
#[tokio::test(start_paused = true)]
async fn cancelling_anywhere_returns_every_permit() {
    let policy = Policy::builder(Plan::new("small").concurrency(2))
        .tier(Plan::new("big").concurrency(8))
        .assign("t0", "big")
        .build()
        .expect("policy");
    let caps = ConcurrencyCapLayer::new(policy)
        .key(key::header(TENANT))
        .global_limit(12)
        .queue(4, Duration::from_millis(8));
    let svc = tower::ServiceBuilder::new()
        .layer(caps.clone())
        .service(service_fn(|req: Request<String>| async move {
            // Work for a while, then stream a few chunks slowly.
            let id = id_of(&req) as u64;
            tokio::time::sleep(Duration::from_millis(id % 7)).await;
            let chunks = futures_chunks(id);
            Ok::<_, Infallible>(Response::new(StreamBody::new(chunks).boxed_unsync()))
        }));

    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut tasks = Vec::new();
    let mut outcomes = [0u32; 3];
    for id in 0..5_000usize {
        let tenant = format!("t{}", rng.below(5));
        let svc = svc.clone();
        let mode = rng.below(4);
        let abandon_after = Duration::from_millis(rng.below(20));
        tasks.push(tokio::spawn(async move {
            let call = async {
                let res = svc.oneshot(request(&tenant, id)).await.expect("infallible");
                let status = res.status();
                let mut body = res.into_body();
                if mode == 3 {
                    // Read one frame, then drop the rest of the body.
                    let _ = body.frame().await;
                    return status;
                }
                while let Some(frame) = body.frame().await {
                    frame.expect("frame");
                }
                status
            };
            if mode == 0 {
                call.await
            } else {
                // Abandon the whole exchange at a random moment.
                tokio::time::timeout(abandon_after, call)
                    .await
                    .unwrap_or(StatusCode::REQUEST_TIMEOUT)
            }
        }));
        if id % 4 == 0 {
            // Arrivals spread over about a second of (paused) time.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if id % 50 == 0 {
            // Some tasks are killed outright.
            if let Some(victim) = tasks.get(rng.below(tasks.len() as u64) as usize) {
                victim.abort();
            }
        }
    }
    for task in tasks {
        match task.await {
            Ok(StatusCode::OK) => outcomes[0] += 1,
            Ok(_) => outcomes[1] += 1,
            Err(e) if e.is_cancelled() => outcomes[2] += 1,
            Err(e) => panic!("task failed: {e}"),
        }
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let stats = caps.stats();
    assert_eq!(stats.tenants_in_flight, 0, "{stats:?}");
    assert_eq!(stats.global_in_flight, 0, "{stats:?}");
    assert_eq!(stats.waiting, 0, "{stats:?}");
    // The run did exercise every path.
    assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
    assert!(
        stats.tenant_capped > 0 && stats.global_capped > 0 && stats.timed_out > 0,
        "{stats:?}"
    );
}

/// Three chunks, a millisecond apart.
fn futures_chunks(
    id: u64,
) -> impl futures_core::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..3u64 {
            tokio::time::sleep(Duration::from_millis(1 + (id + i) % 3)).await;
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from_static(b"chunk"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tokio::test]
async fn generic_layer_fails_with_a_downcastable_rejection() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(1))
        .key(tower_floodgate::key::from_fn(
            |job: &(&'static str, Arc<Notify>)| Some(tower_floodgate::TenantKey::from(job.0)),
        ))
        .into_generic();
    let svc = tower::ServiceBuilder::new().layer(caps).service(service_fn(
        |job: (&'static str, Arc<Notify>)| async move {
            job.1.notified().await;
            Ok::<_, Infallible>("done")
        },
    ));
    let gate = Arc::new(Notify::new());
    let first = tokio::spawn(svc.clone().oneshot(("a", Arc::clone(&gate))));
    tokio::task::yield_now().await;
    let err = svc
        .clone()
        .oneshot(("a", Arc::clone(&gate)))
        .await
        .expect_err("capped");
    assert!(matches!(
        err.downcast_ref::<Rejection>(),
        Some(Rejection::ConcurrencyCapped(c)) if c.cap() == 1
    ));
    gate.notify_one();
    assert_eq!(first.await.expect("task").expect("ok"), "done");
    // The permit came back: the next request runs.
    let again = tokio::spawn(svc.oneshot(("a", Arc::clone(&gate))));
    tokio::task::yield_now().await;
    gate.notify_one();
    assert_eq!(again.await.expect("task").expect("ok"), "done");
}

/// When more tenants have requests in flight than the table seats, a new
/// tenant is refused as the server being over capacity (503), not as a
/// tenant over its own cap (429): it has nothing in flight.
#[tokio::test(start_paused = true)]
async fn a_tenant_the_table_has_no_seat_for_gets_503_not_its_cap() {
    // A table for one tenant has 64 seats; 200 tenants cannot all sit.
    let caps = ConcurrencyCapLayer::new(Plan::new("p").concurrency(4))
        .key(key::header(TENANT))
        .max_active_tenants(1);
    let order = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(caps.clone())
        .service(gated(Arc::clone(&order), Arc::clone(&release)));
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for i in 0..200 {
        let task = tokio::spawn(exchange(svc.clone(), request(&format!("tenant-{i}"), i)));
        tokio::task::yield_now().await;
        if task.is_finished() {
            refused.push(task.await.expect("task"));
        } else {
            held.push(task);
        }
    }
    let stats = caps.stats();
    assert!(
        held.len() <= 64 && !refused.is_empty(),
        "{} held",
        held.len()
    );
    assert!(
        refused
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(stats.no_room, refused.len() as u64);
    assert_eq!(stats.tenant_capped, 0);
    // Once they finish, a new tenant finds a seat.
    release.add_permits(held.len());
    for task in held {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    release.add_permits(1);
    assert_eq!(
        exchange(svc.clone(), request("late", 999)).await,
        StatusCode::OK
    );
}

/// A 503 never says `Retry-After: 0`, whatever the layer was told.
#[tokio::test(start_paused = true)]
async fn retry_after_is_never_zero() {
    let caps = ConcurrencyCapLayer::new(Plan::new("p"))
        .global_limit(1)
        .retry_after(Duration::ZERO);
    let release = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(caps)
        .service(gated(Arc::default(), Arc::clone(&release)));
    let held = tokio::spawn(exchange(svc.clone(), request("a", 1)));
    tokio::task::yield_now().await;
    let refused = svc
        .clone()
        .oneshot(request("b", 2))
        .await
        .expect("infallible");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    release.add_permits(1);
    assert_eq!(held.await.expect("task"), StatusCode::OK);
}

/// Raising a tenant's cap at run time lets its waiters in as soon as the
/// next request arrives, not one at a time as requests finish.
#[tokio::test(start_paused = true)]
async fn a_raised_cap_lets_waiters_in() {
    let policy = tower_floodgate::PolicyHandle::from(Plan::new("p").concurrency(1));
    let caps = ConcurrencyCapLayer::new(policy.clone())
        .key(key::header(TENANT))
        .queue(8, Duration::from_secs(10));
    let order = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(caps.clone())
        .service(gated(Arc::clone(&order), Arc::clone(&release)));
    let mut tasks = Vec::new();
    for id in 0..4 {
        tasks.push(tokio::spawn(exchange(svc.clone(), request("a", id))));
        tokio::task::yield_now().await;
    }
    let stats = caps.stats();
    assert_eq!((stats.tenants_in_flight, stats.waiting), (1, 3));
    policy
        .update(|p| p.tier(Plan::new("p").concurrency(4)))
        .expect("policy");
    // The next request finds room under the new cap: the three waiting go
    // in first, and it waits its turn.
    tasks.push(tokio::spawn(exchange(svc.clone(), request("a", 4))));
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    let stats = caps.stats();
    assert_eq!((stats.tenants_in_flight, stats.waiting), (4, 1));
    assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3]);
    release.add_permits(5);
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
}
