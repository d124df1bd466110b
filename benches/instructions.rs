//! Instructions per rate-limit decision, counted by callgrind: this crate's
//! `RateLimiter` against governor's keyed limiter (`DashMap<String, _>`),
//! the same keys and workloads. Unlike time, an instruction count does not
//! move with what else the machine is doing, so small differences show.
//!
//! ```text
//! cargo bench --bench instructions
//! ```
//!
//! Each (limiter, workload) runs in a child process under
//! `valgrind --tool=callgrind`, counting only the loop of N decisions
//! (`--toggle-collect`), after a set-up that has seen every key once and
//! read the clock. Needs valgrind (Debian's `valgrind`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;

use std::convert::Infallible;

use axum::body::Body;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::{TENANT, governor_config};
use tower::{Service, ServiceBuilder, service_fn};
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{
    ConcurrencyCapLayer, FloodgateLayer, Plan, PolicyHandle, Quota, RateLimitLayer, RateLimiter,
    key,
};

mod support;

const RUN_ENV: &str = "FLOODGATE_INSTRUCTIONS_RUN";
const N: usize = 200_000;
const WORKLOADS: [&str; 4] = ["hot_allow", "hot_deny", "tenants_10k", "first_seen"];

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant-{i:08}")).collect()
}

/// Runs `decisions` decisions of `workload` on `limiter`.
fn child(limiter: &str, workload: &str, decisions: usize) {
    if workload == "layer" {
        return layer_child(limiter, decisions);
    }
    // Admitted workloads: a rate never reached. Denied: one a day, spent.
    let quota = match workload {
        "hot_deny" => Quota::per_day(NonZeroU32::MIN),
        _ => Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap()),
    };
    let hot = keys(1);
    let ring = keys(10_000);
    let fresh = if workload == "first_seen" {
        keys(decisions)
    } else {
        Vec::new()
    };
    let pick = |i: usize| -> &String {
        match workload {
            "tenants_10k" => &ring[i % ring.len()],
            "first_seen" => &fresh[i],
            _ => &hot[0],
        }
    };
    match limiter {
        "floodgate" => {
            let l = RateLimiter::builder(quota).build();
            // Set-up: every key of the ring seen once; the hot key spent.
            for k in &ring {
                let _ = l.check(k, 1);
            }
            let _ = l.check(&hot[0], 1);
            measured(decisions, |i| {
                black_box(l.check(black_box(pick(i)), 1).is_ok());
            });
        }
        "governor" => {
            let gq = match workload {
                "hot_deny" => governor::Quota::per_hour(NonZeroU32::MIN),
                _ => governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap()),
            };
            let l = governor::RateLimiter::<String, _, _>::keyed(gq);
            for k in &ring {
                let _ = l.check_key(k);
            }
            let _ = l.check_key(&hot[0]);
            measured(decisions, |i| {
                // The same `String` keys, borrowed: no allocation.
                black_box(l.check_key(black_box(pick(i))).is_ok());
            });
        }
        other => panic!("no limiter {other}"),
    }
}

async fn hello(_: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::from("Hello, World!")))
}

/// One request through `svc`: called, answered, its body read and dropped.
fn through<S, B>(svc: &mut S, req: Request<Body>)
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = support::now(svc.call(req)).unwrap();
    let body = support::now(response.into_body().collect()).unwrap();
    black_box(body);
}

/// Whole layers in process: `decisions` requests of 16 tenants through a
/// layer in front of a hello-world `service_fn`.
fn layer_child(layer: &str, decisions: usize) {
    let tenants: Vec<http::HeaderValue> = (0..16)
        .map(|i| http::HeaderValue::from_str(&format!("tenant-{i}")).unwrap())
        .collect();
    // Built in the measured loop, as a server builds each request: the
    // same cost in every configuration, so the difference to `bare` is the
    // layer's.
    let request = |i: usize| {
        let mut req = Request::new(Body::empty());
        req.headers_mut().insert(TENANT, tenants[i % 16].clone());
        req
    };
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap());
    macro_rules! run {
        ($svc:expr) => {{
            let mut svc = $svc;
            if std::env::var_os("SIZES").is_some() {
                let f = svc.call(request(0));
                eprintln!(
                    "future {} request {} ",
                    std::mem::size_of_val(&f),
                    std::mem::size_of::<Request<Body>>()
                );
                let r = support::now(f).unwrap();
                eprintln!(
                    "response {} body {}",
                    std::mem::size_of_val(&r),
                    std::mem::size_of_val(r.body())
                );
            }
            for i in 0..64 {
                through(&mut svc, request(i));
            }
            measured(decisions, |i| through(&mut svc, request(i)));
        }};
    }
    match layer {
        "bare" => run!(service_fn(hello)),
        "tower_governor" => {
            let conf = governor_config();
            run!(
                ServiceBuilder::new()
                    .layer(tower_governor::GovernorLayer::new(conf))
                    .service(service_fn(hello))
            )
        }
        "rate_limit" => run!(
            ServiceBuilder::new()
                .layer(RateLimitLayer::new(RateLimiter::new(quota)).key(key::header(TENANT)))
                .service(service_fn(hello))
        ),
        "floodgate" => {
            let policy = PolicyHandle::from(Plan::new("p").rate(quota).concurrency(1 << 20));
            let rate = RateLimitLayer::new(RateLimiter::builder(policy.clone()).build());
            let cap = ConcurrencyCapLayer::new(policy.clone()).global_limit(1 << 20);
            let shed = LoadShedLayer::new(Limit::fixed(1 << 20)).policy(policy);
            run!(
                ServiceBuilder::new()
                    .layer(FloodgateLayer::new(key::header(TENANT), &rate, &cap, &shed))
                    .service(service_fn(hello))
            )
        }
        other => panic!("no layer {other}"),
    }
}

/// The decisions, the only code callgrind counts (`--toggle-collect`).
#[inline(never)]
fn measured(decisions: usize, mut decide: impl FnMut(usize)) {
    for i in 0..decisions {
        decide(i);
    }
}

/// Instructions of a child run's decisions, from callgrind's summary.
fn count(limiter: &str, workload: &str, decisions: usize) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out_file = std::env::var("FLOODGATE_INSTRUCTIONS_OUT").map_or_else(
        |_| "/dev/null".to_owned(),
        |dir| format!("{dir}/callgrind.{limiter}.{workload}.out"),
    );
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            &format!("--callgrind-out-file={out_file}"),
            "--toggle-collect=*instructions::measured*",
        ])
        .arg(exe)
        .env(RUN_ENV, format!("{limiter} {workload} {decisions}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
}

fn main() {
    if let Ok(run) = std::env::var(RUN_ENV) {
        let mut parts = run.split(' ');
        let (limiter, workload) = (parts.next().unwrap(), parts.next().unwrap());
        let decisions = parts.next().unwrap().parse().unwrap();
        child(limiter, workload, decisions);
        return;
    }
    // `cargo test --benches` only checks that it runs.
    if !std::env::args().any(|a| a == "--bench") {
        child("floodgate", "hot_allow", 10);
        child("governor", "hot_allow", 10);
        return;
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("valgrind not found: no instruction counts");
        return;
    }
    println!("instructions per decision (callgrind, {N} decisions each)\n");
    println!(
        "{:<14} {:>12} {:>12} {:>8}",
        "workload", "floodgate", "governor", "ratio"
    );
    for workload in WORKLOADS {
        let per = |limiter: &str| Some(count(limiter, workload, N)? as f64 / N as f64);
        match (per("floodgate"), per("governor")) {
            (Some(ours), Some(theirs)) => println!(
                "{workload:<14} {ours:>12.1} {theirs:>12.1} {:>8.2}",
                ours / theirs
            ),
            _ => println!("{workload:<14} (callgrind failed)"),
        }
    }
    println!("\ninstructions per request through a whole layer, in process\n");
    let layers = ["bare", "tower_governor", "rate_limit", "floodgate"];
    let mut bare = None;
    for layer in layers {
        let Some(n) = count(layer, "layer", 20_000) else {
            println!("{layer:<16} (callgrind failed)");
            continue;
        };
        let per = n as f64 / 20_000.0;
        let base = *bare.get_or_insert(per);
        println!("{layer:<16} {per:>10.1} {:>+10.1} over bare", per - base);
    }
}
