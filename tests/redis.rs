//! The rate limiter on a real Redis: `REDIS_URL`, by default
//! `redis://127.0.0.1:6379` (`.ci/run` starts one if none answers). Each
//! test uses its own key prefix, so they run in parallel. The failure test
//! starts (and kills) a `redis-server` of its own on a free port.

#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use tower_floodgate::redis::{FailurePolicy, RedisConfig, RedisStore};
use tower_floodgate::{DenyReason, Plan, Policy, PolicyHandle, Quota, RateLimiter};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A direct connection for checks, or a clear failure.
async fn redis() -> ::redis::aio::MultiplexedConnection {
    let url = redis_url();
    let client = ::redis::Client::open(url.as_str()).expect("a valid REDIS_URL");
    match tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        _ => panic!(
            "Redis is not reachable at {url}. Start one with \
             `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no` \
             or point REDIS_URL at one."
        ),
    }
}

fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("floodgate-test:{test}:{}:{nanos}:", std::process::id())
}

fn config(test: &str) -> RedisConfig {
    RedisConfig {
        prefix: prefix(test),
        timeout: Duration::from_millis(200),
        ..RedisConfig::default()
    }
}

fn limiter(policy: impl Into<PolicyHandle>, config: RedisConfig) -> RateLimiter {
    let store = RedisStore::new(&redis_url(), config).expect("store");
    RateLimiter::builder(policy).redis(store).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_quota() {
    redis().await;
    let config = config("fleet");
    let quota = Quota::per_second(nz(200)).allow_burst(nz(20));
    let nodes = [limiter(quota, config.clone()), limiter(quota, config)];
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_millis(1_500);
    let mut tasks = Vec::new();
    for node in nodes.iter().cycle().take(8) {
        let (node, admitted) = (node.clone(), Arc::clone(&admitted));
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                if node.check_async("tenant", 1).await.is_ok() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    // The reference model: rate × elapsed + burst, within one request.
    let bound = 200.0 * elapsed + 20.0 + 1.0;
    assert!(admitted <= bound, "admitted {admitted} > {bound}");
    // And the fleet really used its quota (not refused everything).
    assert!(admitted >= 200.0 * 1.2, "admitted only {admitted}");
    for node in &nodes {
        let stats = node.redis_stats().expect("a Redis limiter");
        assert_eq!(stats.failures, 0, "{stats:?}");
    }
}

#[tokio::test]
async fn tiers_cost_and_policy_changes_work_as_in_memory() {
    redis().await;
    let policy = PolicyHandle::new(
        Policy::builder(Plan::new("free").rate(Quota::per_minute(nz(10))))
            .tier(Plan::new("pro").rate(Quota::per_minute(nz(1_000))))
            .build()
            .expect("policy"),
    );
    let limiter = limiter(policy.clone(), config("tiers"));
    assert!(limiter.check_async("a", 6).await.is_ok());
    let denied = limiter.check_async("a", 5).await.expect_err("over");
    assert_eq!(denied.reason(), DenyReason::OverRate);
    // 6 units at 6 s each: 36 s of debt, 60 s tolerance: 5 units need 6 s.
    let wait = denied.retry_after().expect("a wait");
    assert!(
        wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
        "{wait:?}"
    );
    assert_eq!(denied.usage().remaining(), 4);
    assert!(
        limiter
            .check_async("a", 11)
            .await
            .is_err_and(|d| d.reason() == DenyReason::CostExceedsBurst)
    );
    // Other tenants are unaffected; a pro tenant has more.
    assert!(limiter.check_async("b", 10).await.is_ok());
    policy.update(|p| p.assign("a", "pro")).expect("known tier");
    assert!(limiter.check_async("a", 500).await.is_ok());
}

/// A downgraded tenant stays in debt on Redis as long as in memory: its
/// key's expiry follows the new debt, not the old one, and a smaller burst
/// caps the debt.
#[tokio::test]
async fn a_downgrade_lasts_as_long_on_redis_as_in_memory() {
    redis().await;
    // pro: 1,000 a second, burst 100 (1 ms a unit); free: 10 a second,
    // burst 10 (100 ms a unit, 1 s of tolerance).
    let plans = || {
        PolicyHandle::new(
            Policy::builder(Plan::new("free").rate(Quota::per_second(nz(10))))
                .tier(Plan::new("pro").rate(Quota::per_second(nz(1_000))))
                .assign("a", "pro")
                .build()
                .expect("policy"),
        )
    };
    let (on_redis, in_memory) = (plans(), plans());
    let redis = limiter(on_redis.clone(), config("downgrade"));
    let memory = RateLimiter::builder(in_memory.clone()).build();
    let mut admitted = Vec::new();
    for (limiter, policy) in [(&redis, &on_redis), (&memory, &in_memory)] {
        // 100 units on pro: 100 ms of debt there, which would be gone (and
        // the key expired) in 100 ms; on free they are the whole burst, a
        // second of debt.
        assert!(limiter.check_async("a", 100).await.is_ok());
        policy.update(|p| p.remove("a")).expect("policy");
        assert!(limiter.check_async("a", 1).await.is_err());
        admitted.push(0);
    }
    // Well past the old debt, well within the new one: about 3 units have
    // come back (300 ms at 100 ms a unit), not a fresh burst of 10.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, limiter) in admitted.iter_mut().zip([&redis, &memory]) {
        for _ in 0..10 {
            if limiter.check_async("a", 1).await.is_ok() {
                *n += 1;
            }
        }
    }
    assert!(admitted.iter().all(|n| (2..=4).contains(n)), "{admitted:?}");
}

/// A smaller burst caps the debt at once, on Redis as in memory.
#[tokio::test]
async fn a_smaller_burst_caps_the_debt_on_redis_as_in_memory() {
    redis().await;
    let plan = |burst| Plan::new("p").rate(Quota::per_second(nz(10)).allow_burst(nz(burst)));
    let (on_redis, in_memory) = (PolicyHandle::from(plan(10)), PolicyHandle::from(plan(10)));
    let redis = limiter(on_redis.clone(), config("burst"));
    let memory = RateLimiter::builder(in_memory.clone()).build();
    let mut admitted = Vec::new();
    for (limiter, policy) in [(&redis, &on_redis), (&memory, &in_memory)] {
        // The whole burst: a second of debt, capped at 200 ms by a burst of 2.
        assert!(limiter.check_async("a", 10).await.is_ok());
        policy.update(|p| p.tier(plan(2))).expect("policy");
        // (Redis caps it at the tenant's next request, memory at once.)
        assert!(limiter.check_async("a", 1).await.is_err());
        admitted.push(0);
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    for (n, limiter) in admitted.iter_mut().zip([&redis, &memory]) {
        for _ in 0..5 {
            if limiter.check_async("a", 1).await.is_ok() {
                *n += 1;
            }
        }
    }
    // 250 ms after a debt of 200 ms: the burst of 2 is back, not nothing.
    assert!(admitted.iter().all(|n| (1..=2).contains(n)), "{admitted:?}");
}

#[tokio::test]
async fn keys_expire_when_the_tenant_is_idle() {
    let mut redis = redis().await;
    let config = config("expiry");
    let key = format!("{}{{idle}}", config.prefix);
    // 10 per second: one unit is 100 ms of debt.
    let limiter = limiter(Quota::per_second(nz(10)), config);
    assert!(limiter.check_async("idle", 3).await.is_ok());
    let ttl: i64 = redis.pttl(&key).await.expect("PTTL");
    assert!((200..=300).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let ttl: i64 = redis.pttl(&key).await.expect("PTTL");
    assert_eq!(ttl, -2, "the key outlived the debt");
}

#[tokio::test]
async fn script_flush_in_the_middle_of_traffic_loses_no_decision() {
    let mut redis = redis().await;
    let limiter = limiter(Quota::per_minute(nz(100)), config("flush"));
    let mut admitted = 0;
    for i in 0..150 {
        if i == 40 || i == 90 {
            let _: () = ::redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut redis)
                .await
                .expect("SCRIPT FLUSH");
        }
        if limiter.check_async("t", 1).await.is_ok() {
            admitted += 1;
        }
    }
    // Every decision came from Redis: exactly the burst was admitted.
    assert_eq!(admitted, 100);
    let stats = limiter.redis_stats().expect("a Redis limiter");
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert_eq!(
        stats.fallback_local + stats.fallback_open + stats.fallback_closed,
        0
    );
}

#[tokio::test]
async fn a_denied_tenant_is_denied_locally_until_its_retry_after() {
    redis().await;
    // 20 per second in bursts of 1: a retry-after of 50 ms.
    let limiter = limiter(
        Quota::per_second(nz(20)).allow_burst(nz(1)),
        config("deny-cache"),
    );
    let started = Instant::now();
    let (mut admitted, mut total) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(1) {
        total += 1;
        if limiter.check_async("flood", 1).await.is_ok() {
            admitted += 1;
        }
    }
    let stats = limiter.redis_stats().expect("a Redis limiter");
    // About 20 admitted, and for each retry-after at most about one call
    // that was refused: some 40 calls for tens of thousands of requests.
    assert!((15..=22).contains(&admitted), "admitted {admitted}");
    assert!(total > 1_000, "only {total} requests");
    assert!(
        stats.calls <= 2 * 21 + 2,
        "{} calls for {total} requests",
        stats.calls
    );
    assert_eq!(stats.denied_locally, total - stats.calls);
}

/// A `redis-server` of the test's own, on a free port.
struct OwnRedis {
    port: u16,
    args: Vec<String>,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A `redis-server` with extra `args`, working in a directory of its own.
    fn start_with(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("floodgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut redis = Self {
            port,
            args: args.iter().map(|&a| a.to_owned()).collect(),
            dir,
            child: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `n` decisions, each of which must finish quickly (no hang), and
/// returns them.
async fn decide_n(
    limiter: &RateLimiter,
    n: usize,
) -> Vec<Result<tower_floodgate::Allowed, tower_floodgate::Denied>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let decision = limiter.check_async("t", 1).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a decision hung for {:?}",
            started.elapsed()
        );
        out.push(decision);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_applies_the_failure_policy_and_recovery_needs_no_restart() {
    let mut server = OwnRedis::start();
    let config = |policy| RedisConfig {
        prefix: prefix("failure"),
        timeout: Duration::from_millis(20),
        on_failure: policy,
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_millis(300),
        ..RedisConfig::default()
    };
    let quota = Quota::per_minute(nz(60)).allow_burst(nz(10));
    let make = |policy| {
        let store = RedisStore::new(&server.url(), config(policy)).expect("store");
        RateLimiter::builder(quota).redis(store).build()
    };
    let open = make(FailurePolicy::Open);
    let closed = make(FailurePolicy::Closed);
    let local = make(FailurePolicy::Local { share: 0.5 });
    for limiter in [&open, &closed, &local] {
        assert!(decide_n(limiter, 3).await.iter().all(Result::is_ok));
        assert_eq!(limiter.redis_stats().map(|s| s.failures), Some(0));
    }

    server.kill();
    // Open admits, closed refuses with 503's reason, local enforces half the
    // burst (5) on its own.
    let decisions = decide_n(&open, 20).await;
    assert!(
        decisions
            .iter()
            .all(|d| d.as_ref().is_ok_and(|a| a.usage().is_none()))
    );
    let decisions = decide_n(&closed, 20).await;
    assert!(decisions.iter().all(|d| {
        d.as_ref()
            .is_err_and(|e| e.reason() == DenyReason::StoreUnavailable)
    }));
    let decisions = decide_n(&local, 20).await;
    assert_eq!(decisions.iter().filter(|d| d.is_ok()).count(), 5);
    // A cost within the whole burst (10) but over this node's half of it is
    // refused as the store being away, to retry in a second; not as a cost
    // that can never be admitted.
    let big = local
        .check_async("big", 8)
        .await
        .expect_err("over the local share");
    assert_eq!(big.reason(), DenyReason::StoreUnavailable);
    assert_eq!(big.retry_after(), Some(Duration::from_secs(1)));
    assert!(big.is_fallback());
    for limiter in [&open, &closed, &local] {
        let stats = limiter.redis_stats().expect("a Redis limiter");
        assert!(stats.breaker_open && stats.breaker_opened >= 1, "{stats:?}");
        // The breaker spares most decisions the wait.
        assert!(stats.failures <= 5, "{stats:?}");
    }
    assert_eq!(open.redis_stats().map(|s| s.fallback_open), Some(20));
    assert_eq!(closed.redis_stats().map(|s| s.fallback_closed), Some(20));
    assert_eq!(local.redis_stats().map(|s| s.fallback_local), Some(21));

    // Redis comes back: the same limiters use it again by themselves.
    server.restart();
    for limiter in [&open, &closed, &local] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = limiter.redis_stats().expect("stats");
            let decision = limiter.check_async("recovered", 1).await;
            let after = limiter.redis_stats().expect("stats");
            let from_redis = after.calls > before.calls && after.failures == before.failures;
            if from_redis {
                assert!(decision.is_ok());
                break;
            }
            assert!(Instant::now() < deadline, "no recovery: {after:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!limiter.redis_stats().expect("stats").breaker_open);
    }
}

#[tokio::test]
async fn the_layer_answers_the_same_on_redis() {
    use axum::Router;
    use axum::routing::get;
    use common::{Http, serve};
    use http::{HeaderName, StatusCode};
    use tower_floodgate::{RateLimitLayer, key};

    redis().await;
    let limiter = limiter(Quota::per_minute(nz(3)), config("layer"));
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter).key(key::header(HeaderName::from_static("x-tenant"))));
    let http = Http::new(serve(app).await);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(http.get_as("t").await.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let reply = http.get_as("t").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"default\";q=3;w=60")
    );
    let retry: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(http.get_as("other").await.status, StatusCode::OK);
}

#[tokio::test]
async fn without_redis_the_layer_answers_as_its_policy_says() {
    use axum::Router;
    use axum::routing::get;
    use common::{Http, serve};
    use http::{HeaderName, StatusCode};
    use tower_floodgate::{RateLimitLayer, key};

    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let app = |policy| {
        let store = RedisStore::new(
            &format!("redis://{dead}"),
            RedisConfig {
                on_failure: policy,
                ..config("dead")
            },
        )
        .expect("store");
        let limiter = RateLimiter::builder(Quota::per_minute(nz(3)))
            .redis(store)
            .build();
        Router::new().route("/", get(|| async { "ok" })).layer(
            RateLimitLayer::new(limiter).key(key::header(HeaderName::from_static("x-tenant"))),
        )
    };

    let closed = Http::new(serve(app(FailurePolicy::Closed)).await);
    let started = Instant::now();
    let reply = closed.get_as("t").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );

    let open = Http::new(serve(app(FailurePolicy::Open)).await);
    for _ in 0..5 {
        assert_eq!(open.get_as("t").await.status, StatusCode::OK);
    }

    // The local fallback enforces the quota on this node: 3 of 5.
    let local = Http::new(serve(app(FailurePolicy::Local { share: 1.0 })).await);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(local.get_as("t").await.status);
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == StatusCode::OK).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS);
}

/// Three `redis-server`s in cluster mode, their slots assigned by
/// `redis-cli --cluster create`.
fn own_cluster() -> Vec<OwnRedis> {
    let nodes: Vec<OwnRedis> = (0..3)
        .map(|_| OwnRedis::start_with(&["--cluster-enabled", "yes"]))
        .collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let status = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .arg("--cluster-yes")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli on the PATH");
    assert!(status.success(), "redis-cli --cluster create failed");
    nodes
}

/// Waits until every node of the cluster reports `cluster_state:ok`.
async fn cluster_ready(nodes: &[OwnRedis]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in nodes {
        let client = ::redis::Client::open(node.url()).expect("a node URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("a node answers");
        loop {
            let info: String = ::redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut connection)
                .await
                .expect("CLUSTER INFO");
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never formed: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_each_tenant_on_its_slot() {
    let nodes = own_cluster();
    cluster_ready(&nodes).await;
    let urls: Vec<String> = nodes.iter().map(OwnRedis::url).collect();
    let store = RedisStore::cluster(
        &urls,
        RedisConfig {
            prefix: "rl:".to_owned(),
            timeout: Duration::from_millis(500),
            ..RedisConfig::default()
        },
    )
    .expect("a cluster store");
    let limiter = RateLimiter::builder(Quota::per_minute(nz(5)))
        .redis(store)
        .build();

    // 60 tenants, 8 requests each: each gets exactly its burst of 5.
    for t in 0..60 {
        let tenant = format!("tenant-{t}");
        let mut admitted = 0;
        for _ in 0..8 {
            admitted += usize::from(limiter.check_async(&tenant, 1).await.is_ok());
        }
        assert_eq!(admitted, 5, "{tenant}");
    }
    let stats = limiter.redis_stats().expect("a Redis limiter");
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert_eq!(
        stats.fallback_local + stats.fallback_open + stats.fallback_closed,
        0
    );
    // 60 x 5 admissions and one call per denied tenant, the rest denied locally.
    assert_eq!(stats.calls, 60 * 6, "{stats:?}");

    // The tenants' keys are spread over the nodes, each on its own slot.
    let mut holding = 0;
    let mut keys = 0;
    for node in &nodes {
        let client = ::redis::Client::open(node.url()).expect("a node URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("a node answers");
        let size: usize = ::redis::cmd("DBSIZE")
            .query_async(&mut connection)
            .await
            .expect("DBSIZE");
        holding += usize::from(size > 0);
        keys += size;
    }
    assert_eq!(keys, 60, "one key per tenant");
    assert!(holding >= 2, "60 tenants all on one node of 3");
}

/// Clients keep sending through the rate-limit layer over HTTP while the
/// Redis server is killed and started again: every request is answered
/// (none hangs or fails), the outage is bridged by the local fallback, and
/// decisions go back to Redis by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_loses_no_answer() {
    use std::sync::atomic::AtomicBool;

    use axum::Router;
    use axum::routing::get;
    use common::{Http, serve};
    use http::{HeaderName, StatusCode};
    use tower_floodgate::{RateLimitLayer, key};

    let mut server = OwnRedis::start();
    let store = RedisStore::new(
        &server.url(),
        RedisConfig {
            prefix: prefix("restart"),
            timeout: Duration::from_millis(20),
            on_failure: FailurePolicy::Local { share: 1.0 },
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_millis(200),
            ..RedisConfig::default()
        },
    )
    .expect("store");
    // A quota no client reaches: every answer should be 200.
    let limiter = RateLimiter::builder(Quota::per_second(nz(1_000_000)))
        .redis(store)
        .build();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter.clone()).key(key::header(HeaderName::from_static("x-tenant"))),
    );
    let http = Http::new(serve(app).await);

    // 0: before the kill, 1: Redis down, 2: after the restart.
    let phase = Arc::new(AtomicU64::new(0));
    let answered: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (http, phase, answered, stop) = (
                http.clone(),
                Arc::clone(&phase),
                Arc::clone(&answered),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let tenant = format!("tenant-{i}");
                while !stop.load(Ordering::Acquire) {
                    let now = phase.load(Ordering::Acquire) as usize;
                    let reply = tokio::time::timeout(Duration::from_secs(2), http.get_as(&tenant))
                        .await
                        .expect("a request went unanswered");
                    assert_eq!(reply.status, StatusCode::OK, "phase {now}");
                    answered[now].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = limiter.redis_stats().expect("stats");
    assert!(before.calls > 0 && before.failures == 0, "{before:?}");

    phase.store(1, Ordering::Release);
    server.kill();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let down = limiter.redis_stats().expect("stats");
    assert!(
        down.fallback_local > 0 && down.breaker_opened >= 1,
        "{down:?}"
    );

    server.restart();
    phase.store(2, Ordering::Release);
    // Back on Redis by itself: calls succeed again and the breaker closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = limiter.redis_stats().expect("stats");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let later = limiter.redis_stats().expect("stats");
        if !later.breaker_open && later.calls > stats.calls && later.failures == stats.failures {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {later:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for client in clients {
        client.await.expect("a client failed");
    }
    let counts: Vec<u64> = answered.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    assert!(
        counts.iter().all(|&n| n > 0),
        "answers per phase: {counts:?}"
    );
}

/// `FloodgateLayer` on a Redis limiter: the rate decision waits for Redis
/// (the boxed slow path), then the cap and the shedder decide, as the
/// stacked layers would.
#[tokio::test]
async fn the_combined_layer_waits_for_redis_then_caps_and_sheds() {
    use http::{HeaderName, Request, StatusCode};
    use tower::{ServiceBuilder, ServiceExt};
    use tower_floodgate::shed::{Limit, LoadShedLayer};
    use tower_floodgate::{ConcurrencyCapLayer, FloodgateLayer, RateLimitLayer, key};

    redis().await;
    const TENANT: HeaderName = HeaderName::from_static("x-tenant");
    let policy = PolicyHandle::from(Plan::new("p").rate(Quota::per_minute(nz(2))).concurrency(4));
    let rate =
        RateLimitLayer::new(limiter(policy.clone(), config("combined"))).key(key::header(TENANT));
    let cap = ConcurrencyCapLayer::new(policy.clone()).key(key::header(TENANT));
    let shed = LoadShedLayer::new(Limit::fixed(8)).key(key::header(TENANT));
    let svc = ServiceBuilder::new()
        .layer(FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed))
        .service(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from("ok")))
        }));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let req = Request::builder()
            .header(TENANT, "acme")
            .body(())
            .expect("request");
        let response = svc.clone().oneshot(req).await.expect("infallible");
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let stats = rate.limiter().redis_stats().expect("a Redis limiter");
    assert!(stats.calls >= 2, "{stats:?}");
    assert_eq!(rate.stats().rate_limited, 1);
    assert_eq!(cap.stats().tenants_in_flight, 0);
    assert_eq!(shed.stats().in_flight, 0);
}

/// A TCP proxy to `upstream`. [`Proxy::freeze`] makes every connection
/// opened so far stop forwarding without closing (as after a failover, or
/// when a NAT forgets the connection); new connections are forwarded.
struct Proxy {
    addr: std::net::SocketAddr,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let generation = Arc::new(AtomicU64::new(0));
        let current = Arc::clone(&generation);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (current, upstream) = (Arc::clone(&current), upstream.clone());
                let mine = current.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    tokio::join!(
                        pump(from_client, to_server, Arc::clone(&current), mine),
                        pump(from_server, to_client, current, mine)
                    );
                });
            }
        });
        Self { addr, generation }
    }

    fn freeze(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    current: Arc<AtomicU64>,
    mine: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if current.load(Ordering::SeqCst) != mine {
            // Frozen: the bytes go nowhere, and the sockets stay open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_replaced() {
    redis().await;
    let url = redis_url();
    let upstream = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let proxy = Proxy::start(upstream).await;
    let store = RedisStore::new(
        &format!("redis://{}", proxy.addr),
        RedisConfig {
            breaker_threshold: 2,
            breaker_cooldown: Duration::from_millis(200),
            ..config("frozen")
        },
    )
    .expect("store");
    let limiter = RateLimiter::builder(Quota::per_second(nz(1_000)))
        .redis(store)
        .build();
    assert!(limiter.check_async("t", 1).await.is_ok());
    let before = limiter.redis_stats().expect("stats");
    assert_eq!((before.calls, before.failures), (1, 0));

    // The connection goes silent: decisions time out and fall back, then
    // the store connects again (to the same proxy, which forwards new
    // connections) and decides on Redis, by itself.
    proxy.freeze();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fell_back = false;
    loop {
        let before = limiter.redis_stats().expect("stats");
        let decision = limiter.check_async("t", 1).await;
        let after = limiter.redis_stats().expect("stats");
        fell_back |= decision
            .as_ref()
            .map_or_else(|d| d.is_fallback(), |a| a.is_fallback());
        if fell_back && after.calls > before.calls && after.failures == before.failures {
            assert!(decision.is_ok());
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected: {after:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
