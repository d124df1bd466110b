//! The generic cell rate algorithm, on integers.
//!
//! GCRA is a token bucket stored as a single number per tenant: the
//! *theoretical arrival time* (TAT), the instant at which the tenant's bucket
//! would be full again if it sent nothing more. With an emission interval `T`
//! (the time one unit of quota takes to come back) and a tolerance
//! `τ = T × burst`:
//!
//! * a request costing `n` units at time `now` moves the TAT to
//!   `max(TAT, now) + n·T`;
//! * it conforms if the new TAT is at most `now + τ`, i.e. the bucket still
//!   holds `n` units; otherwise it is refused and the TAT is left alone, and
//!   the tenant may retry at `new TAT − τ`.
//!
//! A TAT at or before `now` means a full bucket, exactly as if the tenant had
//! never been seen. That is what lets the in-memory store forget idle tenants
//! without losing anything, and the Redis store let their keys expire.
//!
//! All values are nanoseconds on the limiter's [`Clock`](crate::Clock). The
//! quota keeps `τ ≤ 2⁶²`, and `now` is taken as at most [`LATEST`]
//! (2⁶³ − 1 ns, 292 years), so `max(TAT, now) + n·T` stays below 2⁶⁴: no sum
//! ever saturates, and no jump of the clock to its end (or back) can open a
//! limit.

use crate::quota::Quota;

/// The latest time the arithmetic takes: a clock past it (292 years of
/// uptime, or a manual clock set to its end) reads as standing still here.
/// A TAT is at most `LATEST + τ ≤ 2⁶³ + 2⁶²`, and adding at most `τ` more
/// cannot overflow.
pub(crate) const LATEST: u64 = u64::MAX >> 1;

/// What one GCRA step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Conforms; store `new_tat` (unchanged when the cost was zero).
    Allow { new_tat: u64 },
    /// Does not conform; nothing changes. The same cost conforms in `wait`.
    Deny { wait: u64 },
    /// The cost exceeds the burst: it can never conform.
    Impossible,
}

/// One step of the algorithm for a tenant whose stored TAT is `tat`.
#[inline]
pub(crate) fn step(tat: u64, now: u64, cost: u32, quota: &Quota) -> Step {
    if cost > quota.burst() {
        return Step::Impossible;
    }
    let now = now.min(LATEST);
    let base = tat.max(now);
    // cost ≤ burst, so cost × interval ≤ τ ≤ 2⁶².
    let new_tat = base.saturating_add(quota.interval_nanos() * u64::from(cost));
    let earliest = new_tat.saturating_sub(quota.tolerance_nanos());
    if earliest <= now {
        Step::Allow { new_tat }
    } else {
        Step::Deny {
            wait: earliest - now,
        }
    }
}

/// A tenant's bucket as seen at `now`, for the `RateLimit` header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Level {
    /// Whole units that could be spent right now.
    pub(crate) remaining: u32,
    /// Nanoseconds until one more unit is available (0 when full).
    pub(crate) next_unit: u64,
    /// Nanoseconds until the bucket is full again.
    pub(crate) full: u64,
}

#[inline]
pub(crate) fn level(tat: u64, now: u64, quota: &Quota) -> Level {
    let now = now.min(LATEST);
    let interval = quota.interval_nanos();
    let tolerance = quota.tolerance_nanos();
    let debt = tat.saturating_sub(now);
    let free = tolerance.saturating_sub(debt);
    // free ≤ τ, so free / interval ≤ burst: a u32.
    let remaining = u32::try_from(free / interval).unwrap_or(u32::MAX);
    let next_unit = if remaining >= quota.burst() {
        0
    } else {
        (u64::from(remaining) + 1)
            .saturating_mul(interval)
            .saturating_add(debt)
            .saturating_sub(tolerance)
    };
    Level {
        remaining,
        next_unit,
        full: debt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn q(count: u32, period_ms: u64, burst: u32) -> Quota {
        Quota::new(count, Duration::from_millis(period_ms), burst)
            .unwrap_or_else(|e| unreachable!("test quota: {e}"))
    }

    #[test]
    fn burst_then_steady_rate() {
        // 10 per second, burst 3: interval 100 ms.
        let quota = q(10, 1000, 3);
        let ms = 1_000_000;
        let mut tat = 0;
        for _ in 0..3 {
            match step(tat, 0, 1, &quota) {
                Step::Allow { new_tat } => tat = new_tat,
                other => panic!("burst refused: {other:?}"),
            }
        }
        assert_eq!(step(tat, 0, 1, &quota), Step::Deny { wait: 100 * ms });
        assert_eq!(step(tat, 99 * ms, 1, &quota), Step::Deny { wait: ms });
        assert_eq!(
            step(tat, 100 * ms, 1, &quota),
            Step::Allow { new_tat: 400 * ms }
        );
    }

    #[test]
    fn cost_above_burst_is_impossible_and_cost_zero_is_free() {
        let quota = q(10, 1000, 3);
        assert_eq!(step(0, 0, 4, &quota), Step::Impossible);
        assert_eq!(step(0, 5, 0, &quota), Step::Allow { new_tat: 5 });
        assert_eq!(
            step(0, 0, 3, &quota),
            Step::Allow {
                new_tat: 300_000_000
            }
        );
    }

    #[test]
    fn level_reports_remaining_and_resets() {
        let quota = q(10, 1000, 3);
        let ms = 1_000_000;
        assert_eq!(
            level(0, 0, &quota),
            Level {
                remaining: 3,
                next_unit: 0,
                full: 0
            }
        );
        // Two units spent 30 ms ago: TAT = 200 ms, now = 30 ms.
        assert_eq!(
            level(200 * ms, 30 * ms, &quota),
            Level {
                remaining: 1,
                next_unit: 70 * ms,
                full: 170 * ms
            }
        );
        // In debt beyond the tolerance (the quota shrank at run time).
        let small = q(10, 1000, 1);
        assert_eq!(
            level(500 * ms, 0, &small),
            Level {
                remaining: 0,
                next_unit: 500 * ms,
                full: 500 * ms
            }
        );
    }

    /// The reference model: a token bucket counting nanoseconds of credit,
    /// full at start, refilled continuously, each unit costing one interval.
    struct Bucket {
        credit: u128,
        last: u128,
    }

    impl Bucket {
        fn admit(&mut self, now: u128, cost: u32, quota: &Quota) -> bool {
            let cap = u128::from(quota.tolerance_nanos());
            self.credit = (self.credit + (now - self.last)).min(cap);
            self.last = now;
            let need = u128::from(cost) * u128::from(quota.interval_nanos());
            if u128::from(cost) <= u128::from(quota.burst()) && need <= self.credit {
                self.credit -= need;
                true
            } else {
                false
            }
        }
    }

    fn quotas() -> impl Strategy<Value = Quota> {
        (1u32..=u32::MAX, 1u64..=u64::MAX / 2, 1u32..=u32::MAX).prop_map(|(c, p, b)| {
            Quota::new(c, Duration::from_nanos(p), b).unwrap_or_else(|e| unreachable!("{e}"))
        })
    }

    fn small_quotas() -> impl Strategy<Value = Quota> {
        (1u32..1_000, 1u64..10_000_000, 1u32..50).prop_map(|(c, p, b)| {
            Quota::new(c, Duration::from_nanos(p), b).unwrap_or_else(|e| unreachable!("{e}"))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Every decision equals the token-bucket model's, and the model never
        /// admits more than burst + elapsed / interval units.
        #[test]
        fn agrees_with_token_bucket(
            quota in small_quotas(),
            start in 0u64..1_000_000_000,
            events in prop::collection::vec((0u64..5_000_000, 0u32..60), 1..200),
        ) {
            let mut tat = 0u64;
            let mut now = start;
            let mut model = Bucket { credit: u128::from(quota.tolerance_nanos()), last: u128::from(start) };
            let mut admitted: u128 = 0;
            for (gap, cost) in events {
                now += gap;
                let expected = model.admit(u128::from(now), cost, &quota);
                let got = step(tat, now, cost, &quota);
                match got {
                    Step::Allow { new_tat } => {
                        prop_assert!(expected, "GCRA admitted, model refused: cost {cost} at {now}");
                        tat = new_tat;
                        admitted += u128::from(cost);
                    }
                    Step::Deny { wait } => {
                        prop_assert!(!expected, "GCRA refused, model admitted: cost {cost} at {now}");
                        prop_assert!(wait > 0);
                        // Waiting exactly `wait` makes the same cost conform.
                        let later = step(tat, now + wait, cost, &quota);
                        prop_assert!(matches!(later, Step::Allow { .. }), "{later:?} after {wait}");
                        if wait > 1 {
                            let sooner = step(tat, now + wait - 1, cost, &quota);
                            prop_assert!(matches!(sooner, Step::Deny { .. }), "{sooner:?} before {wait}");
                        }
                    }
                    Step::Impossible => {
                        prop_assert!(!expected);
                        prop_assert!(cost > quota.burst());
                    }
                }
                let elapsed = u128::from(now - start);
                let bound = u128::from(quota.burst()) + elapsed / u128::from(quota.interval_nanos());
                prop_assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
            }
        }

        /// Arbitrary quotas, times and costs never overflow and never admit a
        /// cost above the burst.
        #[test]
        fn never_overflows(
            quota in quotas(),
            tat in any::<u64>(),
            now in any::<u64>(),
            cost in any::<u32>(),
        ) {
            match step(tat, now, cost, &quota) {
                Step::Allow { new_tat } => {
                    prop_assert!(cost <= quota.burst());
                    // A clock past LATEST reads as LATEST.
                    prop_assert!(new_tat >= tat.max(now.min(LATEST)));
                    prop_assert!(new_tat < u64::MAX, "the TAT saturated");
                }
                Step::Deny { wait } => prop_assert!(wait > 0 && cost <= quota.burst()),
                Step::Impossible => prop_assert!(cost > quota.burst()),
            }
            let level = level(tat, now, &quota);
            prop_assert!(level.remaining <= quota.burst());
        }
    }

    proptest! {
        /// At any time, even at the end of the clock, a full bucket admits
        /// its burst of unit costs and not one more.
        #[test]
        fn a_full_bucket_admits_its_burst_and_no_more(
            quota in (1u32..=u32::MAX, 1u64..=u64::MAX / 2, 1u32..=4096).prop_map(|(c, p, b)| {
                Quota::new(c, Duration::from_nanos(p), b).unwrap_or_else(|e| unreachable!("{e}"))
            }),
            now in prop_oneof![any::<u64>(), (u64::MAX - 1_000_000)..=u64::MAX],
        ) {
            let mut tat = 0;
            let mut admitted = 0;
            for _ in 0..=quota.burst() {
                match step(tat, now, 1, &quota) {
                    Step::Allow { new_tat } => {
                        tat = new_tat;
                        admitted += 1;
                    }
                    Step::Deny { .. } | Step::Impossible => break,
                }
            }
            prop_assert_eq!(admitted, quota.burst());
        }
    }

    #[test]
    fn const_quota_constructors_compile() {
        const Q: Quota = Quota::per_second(NonZeroU32::MIN);
        assert_eq!(
            step(0, 0, 1, &Q),
            Step::Allow {
                new_tat: 1_000_000_000
            }
        );
    }
}
