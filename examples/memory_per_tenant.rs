//! How much memory a tracked tenant costs, measured from the process's
//! resident set size (RSS), for tower-floodgate and for governor's keyed
//! limiter (a `DashMap<String, _>`) on the same 1,000,000 string keys; and the
//! peak RSS while 10,000,000 distinct keys (a key-rotation attack) pass a
//! limiter capped at 1,000,000 tenants.
//!
//! ```text
//! cargo run --release --example memory_per_tenant
//! ```
//!
//! Each measurement runs in a fresh child process (this program re-runs
//! itself), so one cannot inherit the other's heap. Linux only (it reads
//! `/proc/self/status`).

use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::process::{Command, ExitCode};

use tower_floodgate::{Quota, RateLimiter};

const TENANTS: usize = 1_000_000;
const ATTACK_KEYS: usize = 10_000_000;
const CAP: usize = 1_000_000;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("floodgate") => child(|keys| {
            let limiter = RateLimiter::builder(hourly())
                .max_tenants(2 * TENANTS)
                .build();
            for k in keys {
                let _ = limiter.check(k, 1);
            }
            assert_eq!(limiter.tracked_tenants(), TENANTS);
            Box::new(limiter)
        }),
        Some("governor") => child(|keys| {
            let limiter = governor::RateLimiter::keyed(governor::Quota::per_hour(NonZeroU32::MIN));
            for k in keys {
                let _ = limiter.check_key(k);
            }
            assert_eq!(limiter.len(), TENANTS);
            Box::new(limiter)
        }),
        Some("rotation") => rotation(),
        _ => parent(),
    }
}

fn hourly() -> Quota {
    Quota::per_hour(NonZeroU32::MIN)
}

/// Kilobytes of `VmRSS` and `VmHWM` (peak) from `/proc/self/status`.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Builds the keys, then measures what `fill` adds to the RSS.
fn child(fill: impl FnOnce(&[String]) -> Box<dyn std::any::Any>) -> ExitCode {
    let keys: Vec<String> = (0..TENANTS).map(|i| format!("tenant-{i:010}")).collect();
    let (before, _) = rss_kb();
    let kept = fill(&keys);
    let (after, _) = rss_kb();
    println!("{}", (after.saturating_sub(before)) * 1024);
    drop(kept);
    ExitCode::SUCCESS
}

/// 10 million distinct keys, each in debt for an hour, through a limiter
/// capped at a million tenants. Prints the RSS growth at its peak and the
/// tenants tracked at the end.
fn rotation() -> ExitCode {
    let limiter = RateLimiter::builder(hourly()).max_tenants(CAP).build();
    let mut key = String::with_capacity(32);
    let (before, _) = rss_kb();
    for i in 0..ATTACK_KEYS {
        key.clear();
        let _ = write!(key, "attacker-{i:010}");
        let _ = limiter.check(&key, 1);
    }
    let (_, peak) = rss_kb();
    let stats = limiter.stats();
    println!(
        "{} {} {}",
        peak.saturating_sub(before) * 1024,
        stats.tracked_tenants,
        stats.evicted_active
    );
    ExitCode::SUCCESS
}

fn run(mode: &str) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe).arg(mode).output().ok()?;
    if !out.status.success() {
        eprintln!("{mode}: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn parent() -> ExitCode {
    let bytes = |mode: &str| run(mode).and_then(|s| s.parse::<f64>().ok());
    let (Some(ours), Some(theirs)) = (bytes("floodgate"), bytes("governor")) else {
        eprintln!("a measurement failed");
        return ExitCode::FAILURE;
    };
    let per = |b: f64| b / TENANTS as f64;
    println!("memory per tracked tenant ({TENANTS} keys like \"tenant-0000000042\", RSS growth):");
    println!("  tower-floodgate            {:>6.1} bytes", per(ours));
    println!("  governor (DashMap<String>) {:>6.1} bytes", per(theirs));
    println!("  ratio                      {:>6.2}", ours / theirs);

    let Some(rotation) = run("rotation") else {
        return ExitCode::FAILURE;
    };
    let fields: Vec<f64> = rotation
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [peak, tracked, evicted] = fields[..] else {
        eprintln!("unexpected output: {rotation}");
        return ExitCode::FAILURE;
    };
    println!();
    println!(
        "key rotation: {ATTACK_KEYS} distinct keys through a limiter capped at {CAP} tenants:"
    );
    println!("  peak RSS growth            {:>6.1} MB", peak / 1e6);
    println!(
        "  footprint of {CAP} tenants  {:>6.1} MB (measured above)",
        ours / TENANTS as f64 * CAP as f64 / 1e6
    );
    println!("  tenants tracked at the end {tracked:>9}");
    println!("  tenants in debt forgotten  {evicted:>9}");
    ExitCode::SUCCESS
}
