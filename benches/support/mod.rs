//! Helpers shared by the benches.

#![allow(dead_code)]

use std::future::Future;

use http::{HeaderName, Request};
use std::path::PathBuf;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Polls a future that is ready at once.
pub(crate) fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("the benchmarked services never wait"),
    }
}

/// Criterion's mean estimate for `group/function`, in nanoseconds.
pub(crate) fn mean(group: &str, function: &str) -> Option<f64> {
    let root = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    let path = root.join(group).join(function).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["mean"]["point_estimate"].as_f64()
}

/// Prints, per group, floodgate's time against each other function's:
/// the ratio and the difference per call.
pub(crate) fn print_comparison(groups: &[&str], others: &[&str]) {
    print_named("floodgate", groups, others);
}

/// Like [`print_comparison`] for the function named `ours`.
pub(crate) fn print_named(ours_name: &str, groups: &[&str], others: &[&str]) {
    println!(
        "\n{:<30} {:>12} {:>16} {:>12} {:>8} {:>10}",
        "workload", ours_name, "other", "its time", "ratio", "diff"
    );
    for group in groups {
        let Some(ours) = mean(group, ours_name) else {
            continue;
        };
        for other in others {
            if let Some(theirs) = mean(group, other) {
                println!(
                    "{group:<30} {ours:>9.1} ns {other:>16} {theirs:>9.1} ns {:>8.2} {:>+7.1} ns",
                    ours / theirs,
                    ours - theirs
                );
            }
        }
    }
}

/// The tenant header every bench keys on.
pub(crate) const TENANT: HeaderName = HeaderName::from_static("x-tenant");

/// tower-governor keyed on the tenant header, the way a user writes it.
#[derive(Clone)]
pub(crate) struct GovernorHeaderKey;

impl tower_governor::key_extractor::KeyExtractor for GovernorHeaderKey {
    type Key = String;

    fn extract<T>(&self, req: &Request<T>) -> Result<String, tower_governor::GovernorError> {
        req.headers()
            .get(&TENANT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// tower-governor's configuration in every bench: keyed on the tenant
/// header, with a limit no bench reaches (a unit a nanosecond, the largest
/// burst).
#[allow(
    clippy::expect_used,
    reason = "a fixed configuration, valid by construction"
)]
pub(crate) fn governor_config() -> tower_governor::governor::GovernorConfig<
    GovernorHeaderKey,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
> {
    tower_governor::governor::GovernorConfigBuilder::default()
        .key_extractor(GovernorHeaderKey)
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .expect("a valid tower-governor config")
}
