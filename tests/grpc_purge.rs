//! The `grpc_purge` example's server (tonic 0.14) on 127.0.0.1:0, called by
//! its generated tonic client over TCP: every status code it answers, the
//! retry metadata, and coalescing of identical purges.

#![allow(clippy::expect_used, clippy::panic)]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/cdn_purge_api/app/mod.rs"]
mod app;

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use app::backend::BackendConfig;
use app::config::Config;
use app::grpc::pb::purge_request::Target;
use app::grpc::pb::purge_service_client::PurgeServiceClient;
use app::grpc::pb::{ItemStatus, PurgeRequest, PurgeResponse, Targets};
use app::{AppState, Options};

fn config() -> Config {
    Config::parse(include_str!("common/tenants.toml")).expect("a valid config")
}

fn options() -> Options {
    Options {
        log: false,
        ..Options::default()
    }
}

/// A server on 127.0.0.1:0 and a client connected to it.
async fn start(options: Options) -> (PurgeServiceClient<Channel>, Arc<AppState>) {
    let (state, layers) = app::service(&config(), &options).expect("service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(app::grpc::serve(
        Arc::clone(&state),
        layers,
        incoming,
        std::future::pending(),
    ));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    (PurgeServiceClient::new(channel), state)
}

fn urls(n: usize) -> PurgeRequest {
    PurgeRequest {
        target: Some(Target::Urls(Targets {
            values: (0..n)
                .map(|i| format!("https://cdn.example.com/{i}.png"))
                .collect(),
        })),
        soft: false,
    }
}

async fn purge(
    client: &PurgeServiceClient<Channel>,
    key: Option<&str>,
    message: PurgeRequest,
) -> Result<PurgeResponse, Status> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("metadata"),
        );
    }
    client
        .clone()
        .purge(request)
        .await
        .map(tonic::Response::into_inner)
}

fn metadata<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

fn assert_status(result: Result<PurgeResponse, Status>, code: Code, message: &str) -> Status {
    let status = match result {
        Ok(response) => panic!("expected {code:?}, got {response:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(message),
        "`{}` lacks `{message}`",
        status.message()
    );
    status
}

#[tokio::test]
async fn a_purge_answers_each_target_with_its_batch() {
    let (client, state) = start(options()).await;
    let response = purge(&client, Some("key-acme-0001"), urls(2))
        .await
        .expect("purged");
    assert!(!response.request_id.is_empty());
    assert_eq!(response.tenant, "acme");
    assert_eq!(response.results.len(), 2);
    for (i, result) in response.results.iter().enumerate() {
        assert_eq!(result.target, format!("https://cdn.example.com/{i}.png"));
        assert_eq!(result.status(), ItemStatus::Purged);
        assert_eq!(result.reason, "");
        assert!(!result.batch.is_empty());
        assert!(!result.coalesced);
    }
    // One tenant's two targets travel in one batch.
    assert_eq!(response.results[0].batch, response.results[1].batch);
    assert_eq!(state.backend.stats().calls, 1);
    assert_eq!(state.backend.stats().items_purged, 2);
}

#[tokio::test]
async fn keys_are_checked_first() {
    let (client, state) = start(options()).await;
    assert_status(
        purge(&client, None, urls(1)).await,
        Code::Unauthenticated,
        "an API key is needed",
    );
    assert_status(
        purge(&client, Some("key-nobody"), urls(1)).await,
        Code::Unauthenticated,
        "unknown API key",
    );
    // Even an invalid message is refused for its key first.
    let empty = PurgeRequest {
        target: None,
        soft: false,
    };
    assert_status(
        purge(&client, Some("key-nobody"), empty).await,
        Code::Unauthenticated,
        "unknown API key",
    );
    assert_eq!(state.backend.stats().calls, 0);
}

#[tokio::test]
async fn bad_targets_get_invalid_argument() {
    let (client, state) = start(options()).await;
    let key = Some("key-acme-0001");
    let cases = [
        (
            PurgeRequest {
                target: None,
                soft: false,
            },
            "give one of",
        ),
        (urls(0), "no targets"),
        (urls(257), "257 targets: at most 256"),
        (
            PurgeRequest {
                target: Some(Target::Urls(Targets {
                    values: vec!["not a url".to_owned()],
                })),
                soft: false,
            },
            "not a url",
        ),
        (
            PurgeRequest {
                target: Some(Target::Hosts(Targets {
                    values: vec!["bad host/with/path".to_owned()],
                })),
                soft: false,
            },
            "host",
        ),
        (
            PurgeRequest {
                target: Some(Target::All(false)),
                soft: false,
            },
            "`all` must be true",
        ),
    ];
    for (message, reason) in cases {
        assert_status(
            purge(&client, key, message).await,
            Code::InvalidArgument,
            reason,
        );
    }
    assert_eq!(state.backend.stats().calls, 0);
    // Each kind of target, checked and purged.
    for target in [
        Target::Tags(Targets {
            values: vec!["product-42".to_owned()],
        }),
        Target::Prefixes(Targets {
            values: vec!["https://cdn.example.com/img/".to_owned()],
        }),
        Target::Hosts(Targets {
            values: vec!["cdn.example.com".to_owned()],
        }),
        Target::All(true),
    ] {
        let response = purge(
            &client,
            key,
            PurgeRequest {
                target: Some(target),
                soft: true,
            },
        )
        .await
        .expect("purged");
        assert_eq!(response.results[0].status(), ItemStatus::Purged);
    }
}

#[tokio::test]
async fn a_message_over_64_kib_is_refused() {
    let (client, state) = start(options()).await;
    let message = PurgeRequest {
        target: Some(Target::Tags(Targets {
            values: vec!["t".repeat(70 * 1024)],
        })),
        soft: false,
    };
    let status = purge(&client, Some("key-acme-0001"), message)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );
    assert_eq!(state.backend.stats().calls, 0);
}

#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_resource_exhausted() {
    let (client, _state) = start(options()).await;
    // The small plan: a burst of 3 requests, then 1 a second.
    for _ in 0..3 {
        purge(&client, Some("key-tiny-0001"), urls(1))
            .await
            .expect("within the burst");
    }
    let status = assert_status(
        purge(&client, Some("key-tiny-0001"), urls(1)).await,
        Code::ResourceExhausted,
        "",
    );
    let pushback: u64 = metadata(&status, "grpc-retry-pushback-ms")
        .expect("grpc-retry-pushback-ms")
        .parse()
        .expect("milliseconds");
    assert!((1..=1_000).contains(&pushback), "{pushback} ms");
    assert_eq!(metadata(&status, "retry-after"), Some("1"));
    assert_eq!(
        metadata(&status, "ratelimit-policy"),
        Some("\"small\";q=1;w=1")
    );
    // Another tenant is served meanwhile.
    purge(&client, Some("key-acme-0001"), urls(1))
        .await
        .expect("another tenant");
}

#[tokio::test]
async fn a_request_costs_its_number_of_targets() {
    let (client, state) = start(options()).await;
    // The small plan's items: a burst of 20. 21 targets never fit.
    let status = assert_status(
        purge(&client, Some("key-tiny-0001"), urls(21)).await,
        Code::ResourceExhausted,
        "",
    );
    assert_eq!(metadata(&status, "grpc-retry-pushback-ms"), Some("-1"));
    purge(&client, Some("key-tiny-0001"), urls(20))
        .await
        .expect("20 targets fit");
    assert_eq!(state.backend.stats().items_purged, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_concurrency_cap_gets_resource_exhausted() {
    let (client, _state) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(400),
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    // The small plan allows one request in flight.
    let first = {
        let client = client.clone();
        tokio::spawn(async move { purge(&client, Some("key-tiny-0001"), urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = assert_status(
        purge(&client, Some("key-tiny-0001"), urls(1)).await,
        Code::ResourceExhausted,
        "requests in flight",
    );
    assert_eq!(
        metadata(&status, "ratelimit-policy"),
        Some("\"small\";q=1;qu=\"concurrent-requests\"")
    );
    first.await.expect("task").expect("first served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_sheds_load_with_unavailable() {
    let (client, _state) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(400),
            ..BackendConfig::default()
        },
        max_in_flight: 1,
        ..options()
    })
    .await;
    let first = {
        let client = client.clone();
        tokio::spawn(async move { purge(&client, Some("key-acme-0001"), urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = assert_status(
        purge(&client, Some("key-globex-0001"), urls(1)).await,
        Code::Unavailable,
        "",
    );
    assert!(metadata(&status, "grpc-retry-pushback-ms").is_some());
    first.await.expect("task").expect("first served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_over_capacity_passes_its_retry_after_on() {
    let (client, state) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(1_500),
            concurrency: 1,
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    let first = {
        let client = client.clone();
        tokio::spawn(async move { purge(&client, Some("key-acme-0001"), urls(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another tenant's batch finds the backend busy: it refuses with a
    // retry-after of its latency (1.5 s).
    let status = assert_status(
        purge(&client, Some("key-globex-0001"), urls(1)).await,
        Code::Unavailable,
        "backend is over capacity",
    );
    assert_eq!(metadata(&status, "grpc-retry-pushback-ms"), Some("1500"));
    assert_eq!(metadata(&status, "retry-after"), Some("2"));
    first.await.expect("task").expect("first served");
    assert_eq!(state.backend.stats().calls_refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_purges_cost_the_backend_a_couple_of_calls() {
    let (client, state) = start(Options {
        backend: BackendConfig {
            latency: Duration::from_millis(200),
            ..BackendConfig::default()
        },
        ..options()
    })
    .await;
    let hot = PurgeRequest {
        target: Some(Target::Urls(Targets {
            values: vec!["https://cdn.example.com/hot.png".to_owned()],
        })),
        soft: false,
    };
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, hot) = (client.clone(), hot.clone());
            tokio::spawn(async move { purge(&client, Some("key-acme-0001"), hot).await })
        })
        .collect();
    let mut coalesced = 0;
    for task in tasks {
        let response = task.await.expect("task").expect("purged");
        assert_eq!(response.results[0].status(), ItemStatus::Purged);
        coalesced += usize::from(response.results[0].coalesced);
    }
    let calls = state.backend.stats().calls;
    assert!(
        (1..=3).contains(&calls),
        "{calls} backend calls for 50 purges"
    );
    assert!(coalesced >= 47, "{coalesced} coalesced");
}
