//! The HTTP-level benchmark: an axum hello-world server on 127.0.0.1 in
//! seven configurations, loaded by a hyper client over keep-alive
//! connections, alternated A B C … A B C … in one run:
//!
//! * `bare`: the router alone;
//! * `tower_governor`: tower-governor keyed on a tenant header, with a
//!   limit never reached;
//! * `rate_limit`: this crate's rate limit alone, the same key and limit;
//! * `full_stack`: this crate's rate limit, per-tenant and global
//!   concurrency cap and load shedder, limits never reached;
//! * `floodgate`: the same three decisions in one `FloodgateLayer`;
//! * `tower_governor_outer` and `floodgate_outer`: the same two layers
//!   around the whole router, as tower layers, instead of inside it with
//!   `Router::layer` (which makes axum clone and box every route's service
//!   and future once more per request, for any layer).
//!
//! Each server is a child process (this binary re-run), so its CPU time is
//! its own: user + system time of all its threads, from
//! `/proc/PID/task/*/schedstat` (nanoseconds). The server has one tokio
//! worker; the client another core. Per configuration it reports requests
//! a second, p50 and p99 latency, and server CPU per request, each as the
//! median over rounds with its range, and CPU per request as a ratio of
//! bare's and of tower-governor's in the same round, with a 95% interval
//! for the median (a bootstrap over the rounds): single rounds differ by
//! more than a layer costs, so it takes tens of rounds to tell layers
//! apart.
//!
//! ```text
//! cargo bench --bench http                   # 40 rounds of 40,000 requests
//! FLOODGATE_HTTP_ROUNDS=4 FLOODGATE_HTTP_REQUESTS=20000 cargo bench --bench http
//! FLOODGATE_HTTP_ROUNDS=0 cargo bench --bench http   # instructions only
//! ```
//!
//! Then, where valgrind is installed, each server once more under
//! callgrind: instructions per request, which do not vary with the
//! machine's load as time does. `FLOODGATE_HTTP_CALLGRIND_OUT=DIR` keeps
//! the profiles for `callgrind_annotate`. `FLOODGATE_HTTP_ONLY=a,b` times
//! and counts only those configurations, bare, and the tower-governor each
//! is compared with. `FLOODGATE_HTTP_EACH_LAYER=1` also counts each of this
//! crate's layers alone (`cap_tenant`, `cap_global`, `shed_fixed`,
//! `shed_fair`), layers that decide nothing (`noop`, `noop_body`: what any
//! layer costs in axum; `noop_outer` around the router), `FloodgateLayer`
//! with a global cap and a shedder without fairness (`floodgate_light`),
//! the three layers in three `Router::layer` calls
//! (`full_stack_separate`), and `minimal`, the four counts and the body
//! without the crate's features (`benches/minimal`).
//! `FLOODGATE_HTTP_PIN=1` pins the server to the second CPU with
//! `taskset`. Linux only (it reads `/proc`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod minimal;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Router, ServiceExt};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{TENANT, governor_config};
use tower::Layer;
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{
    ConcurrencyCapLayer, FloodgateLayer, Plan, PolicyHandle, Quota, RateLimitLayer, RateLimiter,
    key,
};

const CONFIGS: [&str; 7] = [
    "bare",
    "tower_governor",
    "rate_limit",
    "full_stack",
    "floodgate",
    "tower_governor_outer",
    "floodgate_outer",
];
/// Single layers, counted under callgrind with `FLOODGATE_HTTP_EACH_LAYER=1`.
const EACH_LAYER: [&str; 10] = [
    "cap_tenant",
    "cap_global",
    "shed_fixed",
    "shed_fair",
    "noop",
    "noop_body",
    "floodgate_light",
    "full_stack_separate",
    "minimal",
    "noop_outer",
];
const CONNECTIONS: usize = 64;
const TENANTS: usize = 16;
const SERVE_ENV: &str = "FLOODGATE_HTTP_BENCH_SERVE";

fn main() {
    if let Ok(config) = std::env::var(SERVE_ENV) {
        serve(&config);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // of the kind and only wants to know that it runs.
    let quick = !std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("FLOODGATE_HTTP_ROUNDS", if quick { 1 } else { 40 });
    let requests = env(
        "FLOODGATE_HTTP_REQUESTS",
        if quick { 2_000 } else { 40_000 },
    );
    run(rounds, requests);
}

// ─── The server ─────────────────────────────────────────────────────────

/// The hello-world router every configuration serves.
fn hello() -> Router {
    Router::new().route("/", get(|| async { "Hello, World!" }))
}

/// Limits never reached: a billion a second.
fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero"))
}

/// The full stack in one `FloodgateLayer`: a rate and a concurrency cap
/// per tenant, a global cap and a fair shedder, limits never reached.
fn floodgate_layer() -> FloodgateLayer<tower_floodgate::key::Header> {
    let policy = PolicyHandle::from(Plan::new("p").rate(quota()).concurrency(1 << 20));
    let rate = RateLimitLayer::new(RateLimiter::builder(policy.clone()).build());
    let cap = ConcurrencyCapLayer::new(policy.clone()).global_limit(1 << 20);
    let shed = LoadShedLayer::new(Limit::fixed(1 << 20)).policy(policy);
    FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed)
}

fn router(config: &str) -> Router {
    let router = hello();
    let quota = quota();
    match config {
        "bare" => router,
        "tower_governor" => router.layer(tower_governor::GovernorLayer::new(governor_config())),
        "rate_limit" => router.layer(
            RateLimitLayer::new(RateLimiter::builder(quota).build()).key(key::header(TENANT)),
        ),
        "full_stack" => {
            // One policy for every layer: a rate and a cap per tenant.
            let policy = PolicyHandle::from(Plan::new("p").rate(quota).concurrency(1 << 20));
            // One `layer` call with a ServiceBuilder (outermost first), as
            // axum recommends: each `Router::layer` call boxes every
            // route's service and future once more.
            router.layer(
                tower::ServiceBuilder::new()
                    .layer(
                        RateLimitLayer::new(RateLimiter::builder(policy.clone()).build())
                            .key(key::header(TENANT)),
                    )
                    .layer(
                        ConcurrencyCapLayer::new(policy.clone())
                            .global_limit(1 << 20)
                            .key(key::header(TENANT)),
                    )
                    .layer(
                        LoadShedLayer::new(Limit::fixed(1 << 20))
                            .policy(policy)
                            .key(key::header(TENANT)),
                    ),
            )
        }
        "floodgate" => router.layer(floodgate_layer()),
        "full_stack_separate" => {
            // The same three layers, one `Router::layer` call each.
            let policy = PolicyHandle::from(Plan::new("p").rate(quota).concurrency(1 << 20));
            router
                .layer(
                    LoadShedLayer::new(Limit::fixed(1 << 20))
                        .policy(policy.clone())
                        .key(key::header(TENANT)),
                )
                .layer(
                    ConcurrencyCapLayer::new(policy.clone())
                        .global_limit(1 << 20)
                        .key(key::header(TENANT)),
                )
                .layer(
                    RateLimitLayer::new(RateLimiter::builder(policy).build())
                        .key(key::header(TENANT)),
                )
        }
        "floodgate_light" => {
            let policy = PolicyHandle::from(Plan::new("p").rate(quota));
            let rate = RateLimitLayer::new(RateLimiter::builder(policy.clone()).build());
            let cap = ConcurrencyCapLayer::new(policy.clone()).global_limit(1 << 20);
            let shed = LoadShedLayer::new(Limit::fixed(1 << 20))
                .fairness(false)
                .policy(policy);
            router.layer(FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed))
        }
        "cap_tenant" => router.layer(
            ConcurrencyCapLayer::new(Plan::new("p").concurrency(1 << 20)).key(key::header(TENANT)),
        ),
        "cap_global" => router.layer(
            ConcurrencyCapLayer::new(Plan::new("p"))
                .global_limit(1 << 20)
                .key(key::header(TENANT)),
        ),
        "shed_fixed" => router.layer(LoadShedLayer::new(Limit::fixed(1 << 20)).fairness(false)),
        "shed_fair" => router.layer(
            LoadShedLayer::new(Limit::fixed(1 << 20))
                .policy(Plan::new("p"))
                .key(key::header(TENANT)),
        ),
        "noop" => router.layer(tower::util::MapRequestLayer::new(
            |r: Request<axum::body::Body>| r,
        )),
        "minimal" => router.layer(minimal::MinimalLayer::new()),
        "noop_body" => router.layer(tower::util::MapResponseLayer::new(
            |r: http::Response<axum::body::Body>| r.map(|b| Pass { b }),
        )),
        other => panic!("no configuration {other}"),
    }
}

pin_project_lite::pin_project! {
    struct Pass<B> { #[pin] b: B }
}
impl<B: http_body::Body> http_body::Body for Pass<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().b.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.b.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.b.size_hint()
    }
}

/// The child: serves `config` on 127.0.0.1:0 with one worker thread and
/// prints its address; exits when its standard input closes.
fn serve(config: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        println!("{addr}");
        std::io::stdout().flush().expect("stdout");
        match config {
            // Around the whole router, as a tower layer, rather than
            // inside it with `Router::layer`.
            "tower_governor_outer" => spawn_outer(
                listener,
                tower_governor::GovernorLayer::new(governor_config()).layer(hello()),
            ),
            "noop_outer" => spawn_outer(
                listener,
                tower::util::MapRequestLayer::new(|r: Request<axum::body::Body>| r).layer(hello()),
            ),
            "floodgate_outer" => spawn_outer(listener, floodgate_layer().layer(hello())),
            _ => {
                let app = router(config);
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
        }
        // The parent closes our stdin when it is done.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .expect("stdin watcher");
    });
}

/// Serves `app`: a layer wrapped around the whole router.
fn spawn_outer<S>(listener: tokio::net::TcpListener, app: S)
where
    S: tower::Service<
            Request<axum::body::Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    tokio::spawn(async move {
        axum::serve(
            listener,
            ServiceExt::<Request<axum::body::Body>>::into_make_service(app),
        )
        .await
    });
}

// ─── The client ─────────────────────────────────────────────────────────

struct Server {
    config: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &'static str) -> Self {
        Self::spawn(config, false)
    }

    /// The server under callgrind, which counts the instructions it runs.
    fn start_counted(config: &'static str) -> Self {
        Self::spawn(config, true)
    }

    fn spawn(config: &'static str, counted: bool) -> Self {
        let exe = std::env::current_exe().expect("this binary");
        let mut command = if counted {
            // FLOODGATE_HTTP_CALLGRIND_OUT=DIR keeps each profile, for
            // callgrind_annotate.
            let out = std::env::var("FLOODGATE_HTTP_CALLGRIND_OUT").map_or_else(
                |_| "/dev/null".to_owned(),
                |dir| format!("{dir}/callgrind.{config}.out"),
            );
            let mut c = Command::new("valgrind");
            c.args(["--tool=callgrind", "-q"])
                .arg(format!("--callgrind-out-file={out}"));
            // More callgrind options (`--dump-instr=yes`, say), space
            // separated.
            if let Ok(extra) = std::env::var("FLOODGATE_HTTP_CALLGRIND_ARGS") {
                c.args(extra.split_whitespace());
            }
            c.arg(exe);
            c
        } else if std::env::var_os("FLOODGATE_HTTP_PIN").is_some() {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let mut child = command
            .env(SERVE_ENV, config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the server's address");
        let addr = line.trim().parse().expect("an address");
        Self {
            config,
            child,
            addr,
        }
    }

    /// Instructions the server ran so far (under callgrind), or `None`.
    fn instructions(&self) -> Option<u64> {
        let out = Command::new("callgrind_control")
            .args(["-e", "Ir"])
            .arg(self.child.id().to_string())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let total = text
            .lines()
            .filter(|l| l.trim_start().starts_with("Th "))
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter_map(|n| n.replace(',', "").parse::<u64>().ok())
            .sum::<u64>();
        (total > 0).then_some(total)
    }

    fn callgrind_control(&self, args: &[&str]) {
        let _ = Command::new("callgrind_control")
            .args(args)
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// CPU time of every thread of the server so far, in nanoseconds.
    fn cpu_nanos(&self) -> u64 {
        let dir = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(dir)
            .expect("/proc/PID/task")
            .filter_map(|entry| {
                let path = entry.ok()?.path().join("schedstat");
                let text = std::fs::read_to_string(path).ok()?;
                text.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One round against one server.
struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_request: f64,
}

async fn load(server: &Server, requests: usize) -> Round {
    load_with(server, requests, CONNECTIONS, |s| s.cpu_nanos()).await
}

/// `requests` requests over `connections` connections; `meter` reads the
/// server's cost so far (CPU nanoseconds, or instructions).
async fn load_with(
    server: &Server,
    requests: usize,
    connections: usize,
    meter: impl Fn(&Server) -> u64,
) -> Round {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http();
    let uri: http::Uri = format!("http://{}/", server.addr).parse().expect("uri");
    let send = move |tenant: usize| {
        let req = Request::get(uri.clone())
            .header(TENANT, format!("tenant-{tenant}"))
            .body(Empty::new())
            .expect("request");
        let client = client.clone();
        async move {
            let response = client.request(req).await.expect("an answer");
            assert!(response.status().is_success(), "{}", response.status());
            response.into_body().collect().await.expect("a body");
        }
    };
    // Warm the connections up.
    let warm: Vec<_> = (0..CONNECTIONS)
        .map(|i| tokio::spawn(send(i % TENANTS)))
        .collect();
    for w in warm {
        w.await.expect("warm-up");
    }

    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = meter(server);
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let (next, send) = (Arc::clone(&next), send.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(requests / connections + 1);
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < requests {
                    let t = Instant::now();
                    send((c + latencies.len()) % TENANTS).await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for w in workers {
        latencies.extend(w.await.expect("a client"));
    }
    let elapsed = started.elapsed();
    let cpu = meter(server) - cpu_before;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Round {
        rps: requests as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        cpu_per_request: cpu as f64 / requests as f64,
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (mid, v[0], v[v.len() - 1])
}

/// A 95% interval for the median of `v`: the 2.5th and 97.5th percentiles
/// of the medians of 2,000 resamples of it (a percentile bootstrap). The
/// seed is fixed, so the same rounds always give the same interval.
fn median_interval(v: &[f64]) -> (f64, f64) {
    const RESAMPLES: usize = 2_000;
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let sample = (0..v.len())
                .map(|_| v[(next() % v.len() as u64) as usize])
                .collect();
            median(sample).0
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (
        medians[RESAMPLES * 25 / 1000],
        medians[RESAMPLES * 975 / 1000],
    )
}

/// `of`'s CPU per request over `to`'s, round by round (both ran in the
/// same round, one after the other).
fn paired(of: &[Round], to: &[Round], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    of.iter()
        .zip(to)
        .map(|(a, b)| f(a.cpu_per_request, b.cpu_per_request))
        .collect()
}

/// The configurations timed: all of [`CONFIGS`], or with
/// `FLOODGATE_HTTP_ONLY` the ones it names, after bare and the
/// tower-governor each is compared with.
fn timed_configs() -> Vec<&'static str> {
    let Ok(only) = std::env::var("FLOODGATE_HTTP_ONLY") else {
        return CONFIGS.to_vec();
    };
    let known = |name: &str| {
        CONFIGS
            .iter()
            .chain(&EACH_LAYER)
            .find(|c| **c == name)
            .copied()
            .unwrap_or_else(|| panic!("no configuration {name}"))
    };
    let mut configs = vec!["bare"];
    for name in only.split(',').map(known) {
        let governor = if name.ends_with("_outer") {
            "tower_governor_outer"
        } else {
            "tower_governor"
        };
        for config in [governor, name] {
            if !configs.contains(&config) {
                configs.push(config);
            }
        }
    }
    configs
}

fn run(rounds: usize, requests: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    if rounds == 0 {
        // Instructions only.
        count_instructions(&runtime, requests.min(5_000));
        return;
    }
    let configs = timed_configs();
    let servers: Vec<Server> = configs.iter().map(|c| Server::start(c)).collect();
    println!(
        "{rounds} rounds of {requests} requests per configuration, {CONNECTIONS} connections, \
         {TENANTS} tenants; server: 1 tokio worker, client: 1 tokio worker"
    );
    // results[config][round]
    let mut results: Vec<Vec<Round>> = (0..configs.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Alternate, starting each round one configuration later, so that
        // no configuration always runs first after a pause.
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            let r = runtime.block_on(load(&servers[i], requests));
            results[i].push(r);
        }
    }

    println!(
        "\n{:<21} {:>21} {:>11} {:>18} {:>24} {:>30}",
        "configuration",
        "requests/s",
        "p50",
        "p99",
        "server CPU/request",
        "CPU ratio to bare [95% int.]"
    );
    for (i, server) in servers.iter().enumerate() {
        let rs = &results[i];
        let (rps, rps_lo, rps_hi) = median(rs.iter().map(|r| r.rps).collect());
        let (p50, ..) = median(rs.iter().map(|r| r.p50.as_secs_f64() * 1e6).collect());
        let (p99, p99_lo, p99_hi) = median(rs.iter().map(|r| r.p99.as_secs_f64() * 1e6).collect());
        let (cpu, cpu_lo, cpu_hi) = median(rs.iter().map(|r| r.cpu_per_request).collect());
        // The ratio to bare within each round, then its median and a 95%
        // interval for that median.
        let ratios = paired(rs, &results[0], |a, b| a / b);
        let (ratio, ..) = median(ratios.clone());
        let (ratio_lo, ratio_hi) = median_interval(&ratios);
        println!(
            "{:<21} {:>8.0} ({:>5.0}–{:>5.0}) {:>8.0} µs {:>6.0} µs ({:>4.0}–{:>4.0}) {:>8.0} ns ({:>5.0}–{:>5.0}) {:>14.3} [{:.3}–{:.3}]",
            server.config,
            rps,
            rps_lo,
            rps_hi,
            p50,
            p99,
            p99_lo,
            p99_hi,
            cpu,
            cpu_lo,
            cpu_hi,
            ratio,
            ratio_lo,
            ratio_hi
        );
    }
    println!("\nserver CPU added per request over bare, median of rounds [95% interval]:");
    for i in 1..configs.len() {
        let added = paired(&results[i], &results[0], |a, b| a - b);
        let (lo, hi) = median_interval(&added);
        println!(
            "  {:<21} {:+6.0} ns [{lo:+.0}, {hi:+.0}]",
            configs[i],
            median(added).0
        );
    }
    // The target compares the full stack with tower-governor directly,
    // each mounted the same way.
    println!(
        "server CPU per request against tower_governor's (mounted alike) in the same round \
         [95% interval]:"
    );
    let governor = |config: &str| {
        let name = if config.ends_with("_outer") {
            "tower_governor_outer"
        } else {
            "tower_governor"
        };
        configs
            .iter()
            .position(|c| *c == name)
            .expect("tower-governor runs")
    };
    for i in 1..configs.len() {
        let g = governor(configs[i]);
        if g == i {
            continue;
        }
        let ratios = paired(&results[i], &results[g], |a, b| a / b);
        let (lo, hi) = median_interval(&ratios);
        println!(
            "  {:<21} {:6.3} [{lo:.3}–{hi:.3}]",
            configs[i],
            median(ratios).0
        );
    }
    drop(servers);
    count_instructions(&runtime, requests.min(5_000));
}

/// Each server under callgrind: instructions per request, which (unlike
/// time) do not depend on what else the machine is doing.
fn count_instructions(runtime: &tokio::runtime::Runtime, requests: usize) {
    let available = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !available("valgrind") || !available("callgrind_control") {
        println!("\n(valgrind not found: no instruction counts)");
        return;
    }
    println!(
        "\nserver instructions per request under callgrind ({requests} requests, 8 connections):"
    );
    let mut bare = None;
    let configs = if std::env::var_os("FLOODGATE_HTTP_ONLY").is_some() {
        timed_configs()
    } else if std::env::var_os("FLOODGATE_HTTP_EACH_LAYER").is_some() {
        CONFIGS.iter().chain(&EACH_LAYER).copied().collect()
    } else {
        CONFIGS.to_vec()
    };
    for config in configs {
        let server = Server::start_counted(config);
        // Before the measured requests: zero the counters; after: read them
        // and dump the profile of just those requests.
        let started = std::cell::Cell::new(false);
        let round = runtime.block_on(load_with(&server, requests, 8, |s| {
            if started.replace(true) {
                let n = s.instructions().unwrap_or(0);
                s.callgrind_control(&["--dump"]);
                n
            } else {
                s.callgrind_control(&["--zero"]);
                0
            }
        }));
        let per_request = round.cpu_per_request;
        let base = *bare.get_or_insert(per_request);
        println!(
            "{config:<21} {per_request:>10.0} instructions  {:>+8.0} over bare  ({:.3}x)",
            per_request - base,
            per_request / base
        );
    }
}
