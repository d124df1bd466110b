//! What the fuzz targets in `fuzz/` found, kept as ordinary tests (see
//! `fuzz/README.md`). Each test names the target and the input it found.

#![allow(clippy::expect_used)]

use std::time::Duration;

use tower_floodgate::{Clock, Quota, RateLimiter};

/// `gcra`: `Quota::new(1, 11_719_107_999_768_420_864 ns, 2_728_567_458)`,
/// one unit every 371 years, clamped its burst to 0, so the limiter refused
/// every request, even a tenant's first, for ever.
#[test]
fn a_quota_slower_than_146_years_a_unit_still_admits_a_request() {
    let quota = Quota::new(
        1,
        Duration::from_nanos(11_719_107_999_768_420_864),
        2_728_567_458,
    )
    .expect("a valid quota");
    let (clock, time) = Clock::manual();
    let limiter = RateLimiter::builder(quota).clock(clock).build();
    assert!(limiter.check("tenant", 1).is_ok(), "the first request");
    let refused = limiter.check("tenant", 1).expect_err("the second, at once");
    let wait = refused.retry_after().expect("a wait helps");
    time.advance(wait);
    assert!(limiter.check("tenant", 1).is_ok(), "after retry_after");
}
