//! The load shedder: in process on tokio's paused clock (priorities,
//! fairness, CoDel, cancellation, and a simulated backend of fixed
//! capacity), and in front of real axum and tonic servers.

#![allow(clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt, service_fn};
use tower_floodgate::shed::{CoDel, Limit, LoadShedLayer, priority};
use tower_floodgate::{Clock, Priority, TenantKey, key};

/// The handlers' response body: boxed, as the layers answer with the inner
/// service's body type.
type Out = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn out(data: Bytes) -> Out {
    Full::new(data).boxed_unsync()
}

fn request(tenant: &str, priority: Priority) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(TenantKey::from(tenant));
    req.extensions_mut().insert(priority);
    req
}

/// A service whose requests each wait for a permit of `gate`.
fn held(
    gate: Arc<Semaphore>,
) -> impl Service<Request<()>, Response = Response<Out>, Error = Infallible, Future: Send> + Clone {
    service_fn(move |_req: Request<()>| {
        let gate = Arc::clone(&gate);
        async move {
            gate.acquire().await.expect("open").forget();
            Ok::<_, Infallible>(Response::new(out(Bytes::from_static(b"ok"))))
        }
    })
}

/// Starts a request in the background; it stays in flight until the gate
/// lets it finish.
async fn start<S>(svc: &S, req: Request<()>) -> tokio::task::JoinHandle<StatusCode>
where
    S: Service<Request<()>, Response = Response<Out>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let svc = svc.clone();
    let task = tokio::spawn(async move {
        let res = svc.oneshot(req).await.expect("infallible");
        let status = res.status();
        res.into_body().collect().await.expect("body");
        status
    });
    tokio::task::yield_now().await;
    task
}

async fn status_of<S>(svc: &S, req: Request<()>) -> StatusCode
where
    S: Service<Request<()>, Response = Response<Out>, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.expect("infallible").status()
}

#[tokio::test(start_paused = true)]
async fn under_overload_critical_is_served_and_sheddable_is_refused() {
    // Limit 10: sheddable may use 4, normal 9, critical 10.
    let shed = LoadShedLayer::new(Limit::fixed(10)).fairness(false);
    let gate = Arc::new(Semaphore::new(0));
    // (sheddable: half of the 9 that are not reserved, rounded down)
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));

    let mut running = Vec::new();
    for i in 0..8 {
        running.push(start(&svc, request(&format!("t{i}"), Priority::Normal)).await);
    }
    assert_eq!(shed.stats().in_flight, 8);
    let refused = svc
        .clone()
        .oneshot(request("x", Priority::Sheddable))
        .await
        .expect("infallible");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body = refused
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );

    running.push(start(&svc, request("y", Priority::Normal)).await);
    assert_eq!(
        status_of(&svc, request("z", Priority::Normal)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Critical traffic still has its reserve.
    running.push(start(&svc, request("admin", Priority::Critical)).await);
    assert_eq!(shed.stats().in_flight, 10);
    assert_eq!(
        status_of(&svc, request("admin", Priority::Critical)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    gate.add_permits(100);
    for task in running {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(shed.stats().in_flight, 0);
    assert_eq!(shed.stats().shed_capacity, 3);
}

/// At a small limit (as an adaptive limit backs off to) critical traffic
/// keeps a unit of its own: 10% of 3 rounds down to nothing, but normal
/// requests may still use only 2 of the 3.
#[tokio::test(start_paused = true)]
async fn a_small_limit_still_keeps_a_unit_for_critical_traffic() {
    let shed = LoadShedLayer::new(Limit::fixed(3)).fairness(false);
    let gate = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));
    let mut running = Vec::new();
    for i in 0..2 {
        running.push(start(&svc, request(&format!("t{i}"), Priority::Normal)).await);
    }
    assert_eq!(
        status_of(&svc, request("t2", Priority::Normal)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    running.push(start(&svc, request("admin", Priority::Critical)).await);
    assert_eq!(shed.stats().in_flight, 3);
    gate.add_permits(3);
    for task in running {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    assert_eq!((shed.stats().in_flight, shed.stats().shed_capacity), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_flooding_tenant_is_shed_before_a_light_one() {
    // Normal capacity 9; pressure from 7 in flight.
    let shed = LoadShedLayer::new(Limit::fixed(10));
    let gate = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));

    let mut running = Vec::new();
    for _ in 0..7 {
        running.push(start(&svc, request("flood", Priority::Normal)).await);
    }
    // The light tenant gets in; the flooding one, over its share (9 over
    // two tenants: 5), is refused although capacity remains.
    running.push(start(&svc, request("light", Priority::Normal)).await);
    assert_eq!(
        status_of(&svc, request("flood", Priority::Normal)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    running.push(start(&svc, request("light", Priority::Normal)).await);
    let stats = shed.stats();
    assert_eq!((stats.in_flight, stats.active_tenants), (9, 2));
    assert_eq!(stats.shed_fair_share, 1);

    gate.add_permits(100);
    for task in running {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    let stats = shed.stats();
    assert_eq!((stats.in_flight, stats.active_tenants), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_queue_serves_higher_priorities_first_and_codel_cuts_waits() {
    let codel = CoDel {
        target: Duration::from_millis(5),
        interval: Duration::from_millis(100),
    };
    let shed = LoadShedLayer::new(Limit::fixed(2))
        .clock(Clock::tokio())
        .fairness(false)
        .critical_reserve(0.0)
        .sheddable_share(1.0)
        .queue(10, codel);
    let order = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(0));
    let recorder = {
        let (order, gate) = (Arc::clone(&order), Arc::clone(&gate));
        service_fn(move |req: Request<()>| {
            let (order, gate) = (Arc::clone(&order), Arc::clone(&gate));
            async move {
                let p = req.extensions().get::<Priority>().copied();
                order.lock().expect("lock").push(p);
                gate.acquire().await.expect("open").forget();
                Ok::<_, Infallible>(Response::new(out(Bytes::new())))
            }
        })
    };
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(recorder);

    let mut tasks = Vec::new();
    for p in [
        Priority::Normal,
        Priority::Normal,
        Priority::Sheddable,
        Priority::Normal,
        Priority::Critical,
    ] {
        tasks.push(start(&svc, request("t", p)).await);
    }
    assert_eq!(shed.stats().waiting, 3);
    // Each finished request lets the most important waiter in.
    for _ in 0..3 {
        gate.add_permits(1);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
    assert_eq!(
        *order.lock().expect("lock"),
        [
            Some(Priority::Normal),
            Some(Priority::Normal),
            Some(Priority::Critical),
            Some(Priority::Normal),
            Some(Priority::Sheddable),
        ]
    );
    gate.add_permits(2);
    for task in tasks {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }

    // A standing queue. Start a fresh CoDel interval, hold both units,
    // and let waiters wait 50 and 60 ms before they get in.
    tokio::time::advance(Duration::from_millis(200)).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(start(&svc, request("t", Priority::Normal)).await);
    }
    assert_eq!(shed.stats().waiting, 4);
    tokio::time::advance(Duration::from_millis(50)).await;
    gate.add_permits(1);
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(10)).await;
    gate.add_permits(1);
    tokio::task::yield_now().await;
    assert!(!shed.stats().overloaded);
    // At the end of the interval the other two give up (they may wait
    // 100 ms): even the shortest wait of the interval was 50 ms > 5 ms.
    tokio::time::advance(Duration::from_millis(40)).await;
    tokio::task::yield_now().await;
    assert!(shed.stats().overloaded, "{:?}", shed.stats());
    assert_eq!(shed.stats().waiting, 0);
    // Now sheddable work is not queued at all, and others wait 5 ms only.
    assert_eq!(
        status_of(&svc, request("t", Priority::Sheddable)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let late = start(&svc, request("t", Priority::Normal)).await;
    assert_eq!(shed.stats().waiting, 1);
    tokio::time::advance(Duration::from_millis(5)).await;
    assert_eq!(late.await.expect("task"), StatusCode::SERVICE_UNAVAILABLE);
    gate.add_permits(100);
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        ]
    );
    let stats = shed.stats();
    assert_eq!((stats.in_flight, stats.waiting), (0, 0));
    assert_eq!(stats.shed_timeout, 3);
}

/// A sheddable request waiting at its ceiling holds up nobody more
/// important: a critical and a normal request with room go in at once, and
/// at the smallest limit (where sheddable traffic has no room at all) the
/// shedder keeps serving everything else.
#[tokio::test(start_paused = true)]
async fn a_waiting_sheddable_request_never_holds_up_more_important_ones() {
    // Limit 100: sheddable requests may use 45.
    let shed = LoadShedLayer::new(Limit::fixed(100))
        .fairness(false)
        .queue(16, CoDel::default());
    let gate = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));
    let mut running = Vec::new();
    for i in 0..50 {
        running.push(start(&svc, request(&format!("t{i}"), Priority::Normal)).await);
    }
    let sheddable = start(&svc, request("s", Priority::Sheddable)).await;
    assert_eq!((shed.stats().in_flight, shed.stats().waiting), (50, 1));
    running.push(start(&svc, request("admin", Priority::Critical)).await);
    running.push(start(&svc, request("u", Priority::Normal)).await);
    assert_eq!((shed.stats().in_flight, shed.stats().waiting), (52, 1));
    // As they finish, the sheddable one gets its turn under 45.
    gate.add_permits(53);
    for task in running {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(sheddable.await.expect("task"), StatusCode::OK);

    // Limit 1: normal requests may use 1 (the reserve rounds down to 0),
    // sheddable ones none.
    let shed = LoadShedLayer::new(Limit::fixed(1))
        .fairness(false)
        .queue(16, CoDel::default());
    let gate = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));
    let first = start(&svc, request("a", Priority::Normal)).await;
    let sheddable = start(&svc, request("s", Priority::Sheddable)).await;
    gate.add_permits(1);
    assert_eq!(first.await.expect("task"), StatusCode::OK);
    // Nothing in flight, a sheddable request waiting: a normal one is
    // served, not queued behind it.
    assert_eq!((shed.stats().in_flight, shed.stats().waiting), (0, 1));
    gate.add_permits(1);
    assert_eq!(
        status_of(&svc, request("b", Priority::Normal)).await,
        StatusCode::OK
    );
    assert_eq!(shed.stats().shed_timeout, 0);
    // The sheddable one is refused at its deadline.
    assert_eq!(
        sheddable.await.expect("task"),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!((shed.stats().in_flight, shed.stats().waiting), (0, 0));
}

/// In shadow mode a request over its ceiling is admitted and counted as
/// the refusal it would have been.
#[tokio::test(start_paused = true)]
async fn shadow_mode_admits_and_counts_what_it_would_shed() {
    let shed = LoadShedLayer::new(Limit::fixed(2))
        .fairness(false)
        .shadow(true);
    let gate = Arc::new(Semaphore::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(held(Arc::clone(&gate)));
    let mut running = Vec::new();
    for i in 0..3 {
        running.push(start(&svc, request(&format!("t{i}"), Priority::Normal)).await);
    }
    let stats = shed.stats();
    // Normal requests may use one unit: the other is critical traffic's.
    assert_eq!(
        (stats.in_flight, stats.shadow_rejected, stats.shed_capacity),
        (3, 2, 0)
    );
    gate.add_permits(3);
    for task in running {
        assert_eq!(task.await.expect("task"), StatusCode::OK);
    }
}

/// Requests abandoned at random points (queued, in the handler, mid-body):
/// every unit comes back.
#[tokio::test(start_paused = true)]
async fn cancelling_anywhere_returns_everything() {
    let shed = LoadShedLayer::new(Limit::fixed(8))
        .clock(Clock::tokio())
        .queue(16, CoDel::default());
    let svc = tower::ServiceBuilder::new()
        .layer(shed.clone())
        .service(service_fn(|req: Request<()>| async move {
            let n = req
                .extensions()
                .get::<TenantKey>()
                .map_or(0, |t| t.len() as u64);
            tokio::time::sleep(Duration::from_millis(1 + n % 5)).await;
            Ok::<_, Infallible>(Response::new(out(Bytes::from_static(b"ok"))))
        }));
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut tasks = Vec::new();
    for i in 0..3_000u64 {
        let svc = svc.clone();
        let tenant = "t".repeat(1 + next(6) as usize);
        let p = [Priority::Critical, Priority::Normal, Priority::Sheddable][next(3) as usize];
        let abandon = Duration::from_millis(next(8));
        let patient = next(3) == 0;
        tasks.push(tokio::spawn(async move {
            let exchange = async {
                let res = svc.oneshot(request(&tenant, p)).await.expect("infallible");
                let status = res.status();
                let _ = res.into_body().collect().await;
                status
            };
            if patient {
                exchange.await
            } else {
                tokio::time::timeout(abandon, exchange)
                    .await
                    .unwrap_or(StatusCode::REQUEST_TIMEOUT)
            }
        }));
        if i % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.expect("task") == StatusCode::OK {
            ok += 1;
        }
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let stats = shed.stats();
    assert_eq!(
        (stats.in_flight, stats.waiting, stats.active_tenants),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(
        ok > 0 && stats.shed_capacity + stats.shed_fair_share > 0,
        "{ok} {stats:?}"
    );
}

/// A backend that serves 4 requests at a time, 10 ms each (400 a second),
/// offered 800 a second for 3 seconds. Returns the latency of the requests
/// it served in the last second and how many were refused.
async fn overload_backend(shed: Option<LoadShedLayer>) -> (Vec<Duration>, usize) {
    let capacity = Arc::new(Semaphore::new(4));
    let backend = service_fn(move |_req: Request<()>| {
        let capacity = Arc::clone(&capacity);
        async move {
            let _slot = capacity.acquire().await.expect("open");
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, Infallible>(Response::new(out(Bytes::new())))
        }
    });
    let svc = tower::util::BoxCloneService::new(match shed {
        Some(shed) => tower::util::BoxCloneService::new(
            tower::ServiceBuilder::new()
                .layer(shed)
                .service(backend)
                .map_response(|r| r.map(|b| b.boxed_unsync())),
        ),
        None => tower::util::BoxCloneService::new(
            backend.map_response(|r: Response<Out>| r.map(|b| b.boxed_unsync())),
        ),
    });
    let started = tokio::time::Instant::now();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_250));
    for i in 0..2_400usize {
        tick.tick().await;
        let (svc, results) = (svc.clone(), Arc::clone(&results));
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let res = svc
                .oneshot(request(&format!("t{}", i % 10), Priority::Normal))
                .await
                .expect("infallible");
            let status = res.status();
            let _ = res.into_body().collect().await;
            results
                .lock()
                .expect("lock")
                .push((sent, status, sent.elapsed()));
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let results = results.lock().expect("lock");
    let last_second = started + Duration::from_secs(2);
    let served = results
        .iter()
        .filter(|(sent, status, _)| *sent >= last_second && *status == StatusCode::OK)
        .map(|(_, _, latency)| *latency)
        .collect();
    let refused = results
        .iter()
        .filter(|(_, status, _)| *status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    (served, refused)
}

fn p90(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies
        .get(latencies.len() * 9 / 10)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn shedding_keeps_latency_near_target_on_a_saturated_backend() {
    // Without shedding the backlog grows without bound: by the third second
    // requests wait well over a second.
    let (served, refused) = overload_backend(None).await;
    assert_eq!(refused, 0);
    assert!(p90(served) > Duration::from_millis(1_000));

    // With an adaptive limit aiming at 30 ms, the requests served keep their
    // latency near the target, and the excess gets 503s.
    let shed = LoadShedLayer::new(Limit::adaptive(Duration::from_millis(30)))
        .clock(Clock::tokio())
        .fairness(false);
    let (served, refused) = overload_backend(Some(shed.clone())).await;
    let served_count = served.len();
    let mean = served.iter().sum::<Duration>() / served_count.max(1) as u32;
    let latency = p90(served);
    assert!(mean <= Duration::from_millis(45), "mean {mean:?}");
    assert!(latency <= Duration::from_millis(90), "p90 {latency:?}");
    assert!(
        served_count > 300,
        "served only {served_count} in the last second"
    );
    assert!(refused > 900, "refused only {refused}");
    let limit = shed.stats().limit;
    assert!((4..=16).contains(&limit), "limit settled at {limit}");
}

mod http_servers {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use common::{Http, serve};
    use http::HeaderName;

    const PRIORITY: HeaderName = HeaderName::from_static("x-priority");

    #[tokio::test]
    async fn over_http_critical_is_served_while_sheddable_gets_503() {
        let gate = Arc::new(Semaphore::new(0));
        let shed = LoadShedLayer::new(Limit::fixed(4))
            .fairness(false)
            .key(key::header(HeaderName::from_static("x-tenant")))
            .priority(priority::header(PRIORITY));
        let hold_gate = Arc::clone(&gate);
        let app = Router::new()
            .route(
                "/hold",
                get(move || {
                    let gate = Arc::clone(&hold_gate);
                    async move {
                        gate.acquire().await.expect("open").forget();
                        "held"
                    }
                }),
            )
            .route("/", get(|| async { "ok" }))
            .layer(shed.clone());
        let http = Http::new(serve(app).await);
        let mut held = Vec::new();
        for _ in 0..3 {
            let http = http.clone();
            held.push(tokio::spawn(async move {
                http.send("GET", "/hold", &[("x-tenant", "a")], "")
                    .await
                    .status
            }));
        }
        while shed.stats().in_flight < 3 {
            tokio::task::yield_now().await;
        }
        let reply = http
            .send(
                "GET",
                "/",
                &[("x-tenant", "b"), ("x-priority", "sheddable")],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json()["status"], 503);
        let reply = http
            .send(
                "GET",
                "/",
                &[("x-tenant", "b"), ("x-priority", "critical")],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        gate.add_permits(3);
        for task in held {
            assert_eq!(task.await.expect("task"), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn over_grpc_shedding_is_unavailable_with_pushback() {
        use tonic::transport::{Endpoint, Server};
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;

        let shed = LoadShedLayer::new(Limit::fixed(1))
            .fairness(false)
            .retry_after(Duration::from_millis(1_500));
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let layer = shed.clone();
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
        // An open Watch stream holds the only unit.
        let mut watch = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        assert!(watch.message().await.expect("status").is_some());
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect_err("shed");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("1500")
        );
        assert_eq!(
            status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
    }
}
