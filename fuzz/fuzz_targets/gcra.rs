//! The GCRA step with arbitrary quotas, costs and times, through the public
//! `RateLimiter` on a manual clock that jumps forwards and backwards.
//!
//! Oracle: no panic; in any stretch of time without a backward jump, a
//! tenant is admitted at most `burst + elapsed / interval` units; a cost
//! above the burst is never admitted and gets no `retry_after`; a refused
//! cost is admitted once its `retry_after` has passed.

#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_floodgate::{Clock, DenyReason, Plan, Quota, RateLimiter};

/// The manual clock past this reads as standing still (292 years).
const LATEST: u64 = u64::MAX >> 1;

#[derive(Arbitrary, Debug)]
enum Op {
    Advance(u64),
    Set(u64),
    Check { tenant: u8, cost: u32, retry: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    count: u32,
    period_nanos: u64,
    burst: u32,
    ops: Vec<Op>,
}

/// Units admitted to a tenant since `since` (the last backward jump or its
/// first request).
struct Spent {
    since: u64,
    units: u128,
}

fuzz_target!(|input: Input| {
    let Ok(quota) = Quota::new(
        input.count,
        Duration::from_nanos(input.period_nanos),
        input.burst,
    ) else {
        return;
    };
    let interval = quota.replenish_interval().as_nanos();
    assert!(interval > 0);
    let burst = quota.burst();
    assert!(burst >= 1 && burst <= input.burst);
    let (clock, hand) = Clock::manual();
    // Room for every tenant: a full limiter forgets tenants, debts and all.
    let limiter = RateLimiter::builder(Plan::new("fuzz").rate(quota))
        .clock(clock)
        .max_tenants(1 << 16)
        .build();
    let mut now: u64 = 0;
    let mut spent: HashMap<u8, Spent> = HashMap::new();
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Advance(by) => {
                now = now.saturating_add(by);
                hand.set(Duration::from_nanos(now));
            }
            Op::Set(at) => {
                if at < now {
                    // Going back: start counting afresh.
                    spent.clear();
                }
                now = at;
                hand.set(Duration::from_nanos(now));
            }
            Op::Check {
                tenant,
                cost,
                retry,
            } => {
                let t = now.min(LATEST);
                let result = limiter.check([tenant], cost);
                match result {
                    Ok(_) => {
                        assert!(cost <= burst, "admitted {cost} over a burst of {burst}");
                        let s = spent.entry(tenant).or_insert(Spent { since: t, units: 0 });
                        s.units += u128::from(cost);
                        let allowed = u128::from(burst) + u128::from(t - s.since) / interval;
                        assert!(
                            s.units <= allowed,
                            "{} units in {} ns, at most {allowed}",
                            s.units,
                            t - s.since
                        );
                    }
                    Err(denied) => {
                        assert_eq!(denied.cost(), cost);
                        match denied.reason() {
                            DenyReason::CostExceedsBurst => {
                                assert!(cost > burst);
                                assert_eq!(denied.retry_after(), None);
                            }
                            DenyReason::OverRate => {
                                assert!(cost <= burst);
                                let wait = denied.retry_after().expect("a wait helps");
                                assert!(wait > Duration::ZERO);
                                let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                                let later = now.saturating_add(wait);
                                if retry && later <= LATEST {
                                    now = later;
                                    hand.set(Duration::from_nanos(now));
                                    let again = limiter.check([tenant], cost);
                                    assert!(again.is_ok(), "refused after retry_after: {again:?}");
                                    let s = spent.entry(tenant).or_insert(Spent {
                                        since: now,
                                        units: 0,
                                    });
                                    s.units += u128::from(cost);
                                }
                            }
                            other => panic!("an in-memory limiter refused for {other:?}"),
                        }
                    }
                }
            }
        }
    }
});
