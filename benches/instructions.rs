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

use tower_floodgate::{Quota, RateLimiter};

const RUN_ENV: &str = "FLOODGATE_INSTRUCTIONS_RUN";
const N: usize = 200_000;
const WORKLOADS: [&str; 4] = ["hot_allow", "hot_deny", "tenants_10k", "first_seen"];

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant-{i:08}")).collect()
}

/// Runs `decisions` decisions of `workload` on `limiter`.
fn child(limiter: &str, workload: &str, decisions: usize) {
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
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
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
}
