//! Rates and bursts.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// The longest burst window a quota may express, in nanoseconds (about 146
/// years). Keeping `burst × interval` below 2⁶² leaves every sum the GCRA
/// computes far away from `u64::MAX`.
pub(crate) const MAX_TOLERANCE_NANOS: u64 = 1 << 62;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// How much a tenant may do: `count` units per `period`, with bursts of up to
/// `burst` units at once.
///
/// A quota is a rate plus a burst. The rate fixes the *emission interval*
/// (`period / count`): one unit of quota comes back every interval. The burst
/// is how many units a tenant that has been idle may spend at once. The
/// constructors make an invalid quota impossible: the `const` ones take
/// [`NonZeroU32`], so a zero rate does not compile, and [`Quota::new`] returns
/// an error instead of panicking.
///
/// Rates faster than one unit per nanosecond are clamped to one per
/// nanosecond, rates slower than one unit per 146 years (2⁶² ns) to one per
/// 146 years, and a burst longer than 146 years of the rate is clamped to
/// 146 years, but never below one unit; none of this happens with any real
/// configuration.
///
/// # Examples
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use tower_floodgate::Quota;
///
/// // 100 requests per second, in bursts of up to 20.
/// const API: Quota = Quota::per_second(NonZeroU32::new(100).unwrap())
///     .allow_burst(NonZeroU32::new(20).unwrap());
/// assert_eq!(API.replenish_interval(), Duration::from_millis(10));
/// assert_eq!(API.burst(), 20);
///
/// // From configuration: errors instead of panics.
/// let q = Quota::new(600, Duration::from_secs(60), 50).unwrap();
/// assert_eq!(q.replenish_interval(), Duration::from_millis(100));
/// assert!(Quota::new(0, Duration::from_secs(1), 1).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    count: u32,
    period_nanos: u64,
    burst: u32,
    /// `period / count`, at least 1.
    interval_nanos: u64,
}

/// Why a [`Quota`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// The rate's count was zero.
    #[error("a quota needs a count of at least 1 per period")]
    ZeroCount,
    /// The rate's period was zero.
    #[error("a quota needs a period longer than zero")]
    ZeroPeriod,
    /// The burst was zero: no request could ever be admitted.
    #[error("a quota needs a burst of at least 1")]
    ZeroBurst,
    /// The period does not fit in 64-bit nanoseconds (584 years).
    #[error("a quota's period must be shorter than 584 years")]
    PeriodTooLong,
}

impl Quota {
    const fn from_parts(count: u32, period_nanos: u64, burst: u32) -> Self {
        let mut interval = period_nanos / count as u64;
        if interval == 0 {
            interval = 1;
        } else if interval > MAX_TOLERANCE_NANOS {
            // One unit per 146 years at the slowest, so that the burst
            // below is never clamped to zero (found by fuzzing).
            interval = MAX_TOLERANCE_NANOS;
        }
        let max_burst = MAX_TOLERANCE_NANOS / interval;
        let burst = if burst as u64 > max_burst {
            max_burst as u32
        } else {
            burst
        };
        Self {
            count,
            period_nanos,
            burst,
            interval_nanos: interval,
        }
    }

    /// `n` units per second, in bursts of up to `n`.
    #[must_use]
    pub const fn per_second(n: NonZeroU32) -> Self {
        Self::from_parts(n.get(), NANOS_PER_SEC, n.get())
    }

    /// `n` units per minute, in bursts of up to `n`.
    #[must_use]
    pub const fn per_minute(n: NonZeroU32) -> Self {
        Self::from_parts(n.get(), 60 * NANOS_PER_SEC, n.get())
    }

    /// `n` units per hour, in bursts of up to `n`.
    #[must_use]
    pub const fn per_hour(n: NonZeroU32) -> Self {
        Self::from_parts(n.get(), 3_600 * NANOS_PER_SEC, n.get())
    }

    /// `n` units per day, in bursts of up to `n`.
    #[must_use]
    pub const fn per_day(n: NonZeroU32) -> Self {
        Self::from_parts(n.get(), 86_400 * NANOS_PER_SEC, n.get())
    }

    /// One unit every `interval`, in bursts of 1. `None` if `interval` is zero
    /// or longer than 584 years.
    #[must_use]
    pub const fn with_period(interval: Duration) -> Option<Self> {
        let nanos = interval.as_nanos();
        if nanos == 0 || nanos > u64::MAX as u128 {
            return None;
        }
        Some(Self::from_parts(1, nanos as u64, 1))
    }

    /// `count` units per `period` in bursts of up to `burst`, from values
    /// that may be wrong (a configuration file, an admin API).
    ///
    /// # Errors
    ///
    /// [`QuotaError`] if any of the three is zero or the period does not fit
    /// in 64-bit nanoseconds.
    pub fn new(count: u32, period: Duration, burst: u32) -> Result<Self, QuotaError> {
        if count == 0 {
            return Err(QuotaError::ZeroCount);
        }
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        let nanos = u64::try_from(period.as_nanos()).map_err(|_| QuotaError::PeriodTooLong)?;
        if nanos == 0 {
            return Err(QuotaError::ZeroPeriod);
        }
        Ok(Self::from_parts(count, nanos, burst))
    }

    /// The same rate with bursts of up to `burst` units.
    #[must_use]
    pub const fn allow_burst(self, burst: NonZeroU32) -> Self {
        Self::from_parts(self.count, self.period_nanos, burst.get())
    }

    /// Units per [`period`](Self::period).
    #[must_use]
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period the [`count`](Self::count) refers to.
    #[must_use]
    pub const fn period(&self) -> Duration {
        Duration::from_nanos(self.period_nanos)
    }

    /// The largest number of units admitted at once after a long idle time.
    #[must_use]
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// How often one unit of quota comes back.
    #[must_use]
    pub const fn replenish_interval(&self) -> Duration {
        Duration::from_nanos(self.interval_nanos)
    }

    #[inline]
    pub(crate) const fn interval_nanos(&self) -> u64 {
        self.interval_nanos
    }

    /// `interval × burst`: how far ahead of now a tenant's theoretical
    /// arrival time may run. At most [`MAX_TOLERANCE_NANOS`].
    #[inline]
    pub(crate) const fn tolerance_nanos(&self) -> u64 {
        self.interval_nanos * self.burst as u64
    }

    /// This quota with `share` (in `(0, 1]`) of its rate and burst, for one
    /// node of several deciding alone. The burst stays at least 1.
    #[cfg(feature = "redis")]
    pub(crate) fn scaled(&self, share: f64) -> Self {
        let share = if share.is_finite() { share.clamp(1e-6, 1.0) } else { 1.0 };
        let interval = ((self.interval_nanos as f64) / share).ceil().max(1.0);
        let interval = if interval >= MAX_TOLERANCE_NANOS as f64 {
            MAX_TOLERANCE_NANOS
        } else {
            interval as u64
        };
        let burst = ((f64::from(self.burst) * share).floor().max(1.0) as u32)
            .min(u32::try_from(MAX_TOLERANCE_NANOS / interval).unwrap_or(u32::MAX))
            .max(1);
        let count = (f64::from(self.count) * share).round().max(1.0) as u32;
        Self {
            count,
            period_nanos: self.period_nanos,
            burst,
            interval_nanos: interval,
        }
    }

    /// The quota as the `q` and `w` of a `RateLimit-Policy` item: units per
    /// window of whole seconds. A period that is not whole seconds is
    /// advertised over the next whole number of seconds, rounding the units
    /// down: never more than the quota admits (1 per 1.5 s is `q=1;w=2`,
    /// not `q=1;w=1`).
    pub(crate) fn header_window(&self) -> (u64, u64) {
        if self.period_nanos.is_multiple_of(NANOS_PER_SEC) {
            (u64::from(self.count), self.period_nanos / NANOS_PER_SEC)
        } else {
            let window = self.period_nanos.div_ceil(NANOS_PER_SEC).max(1);
            let units = u128::from(self.count) * u128::from(window) * u128::from(NANOS_PER_SEC)
                / u128::from(self.period_nanos);
            (u64::try_from(units).unwrap_or(u64::MAX).max(1), window)
        }
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("count", &self.count)
            .field("period", &self.period())
            .field("burst", &self.burst)
            .finish()
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let period = self.period();
        if period.subsec_nanos() == 0 {
            write!(f, "{} per {}s (burst {})", self.count, period.as_secs(), self.burst)
        } else {
            write!(f, "{} per {:?} (burst {})", self.count, period, self.burst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    #[test]
    fn the_slowest_rate_still_admits_its_burst() {
        // A period of 584 years for one unit once made the burst 0, so that
        // nothing was ever admitted (found by the `gcra` fuzz target).
        for period in [u64::MAX, 11_719_107_999_768_420_864, (1 << 62) + 1] {
            let q = Quota::new(1, Duration::from_nanos(period), 2_728_567_458).expect("valid");
            assert_eq!(q.burst(), 1, "period {period}");
            assert_eq!(q.replenish_interval(), Duration::from_nanos(1 << 62));
            assert_eq!(q.tolerance_nanos(), 1 << 62);
        }
        let q = Quota::with_period(Duration::from_nanos(u64::MAX)).expect("valid");
        assert_eq!(q.burst(), 1);
    }

    #[test]
    fn constructors_set_interval_and_burst() {
        let q = Quota::per_second(nz(4));
        assert_eq!(q.replenish_interval(), Duration::from_millis(250));
        assert_eq!(q.burst(), 4);
        assert_eq!(q.tolerance_nanos(), 1_000_000_000);
        let q = Quota::per_minute(nz(60)).allow_burst(nz(5));
        assert_eq!(q.replenish_interval(), Duration::from_secs(1));
        assert_eq!(q.burst(), 5);
        assert_eq!(Quota::per_hour(nz(1)).period(), Duration::from_secs(3600));
        assert_eq!(Quota::per_day(nz(2)).count(), 2);
    }

    #[test]
    fn invalid_quotas_are_errors() {
        assert_eq!(
            Quota::new(0, Duration::from_secs(1), 1),
            Err(QuotaError::ZeroCount)
        );
        assert_eq!(
            Quota::new(1, Duration::ZERO, 1),
            Err(QuotaError::ZeroPeriod)
        );
        assert_eq!(
            Quota::new(1, Duration::from_secs(1), 0),
            Err(QuotaError::ZeroBurst)
        );
        assert_eq!(
            Quota::new(1, Duration::MAX, 1),
            Err(QuotaError::PeriodTooLong)
        );
        assert_eq!(Quota::with_period(Duration::ZERO), None);
        assert_eq!(Quota::with_period(Duration::MAX), None);
    }

    #[test]
    fn extreme_rates_are_clamped_not_overflowed() {
        let fast = Quota::per_second(nz(u32::MAX));
        assert_eq!(fast.interval_nanos(), 1);
        let slow = Quota::per_day(nz(1)).allow_burst(nz(u32::MAX));
        assert!(slow.tolerance_nanos() <= MAX_TOLERANCE_NANOS);
        assert!(slow.burst() < u32::MAX && slow.burst() > 50_000);
    }

    #[test]
    fn header_window_uses_whole_seconds() {
        assert_eq!(Quota::per_minute(nz(100)).header_window(), (100, 60));
        let q = Quota::with_period(Duration::from_millis(100));
        assert_eq!(q.map(|q| q.header_window()), Some((10, 1)));
        // 2 a second over 1.5 s: 4 in 2 s.
        let q = Quota::new(3, Duration::from_millis(1500), 3).map(|q| q.header_window());
        assert_eq!(q, Ok((4, 2)));
        // 0.67 a second: not 1 a second.
        let q = Quota::new(1, Duration::from_millis(1500), 1).map(|q| q.header_window());
        assert_eq!(q, Ok((1, 2)));
        let q = Quota::new(7, Duration::from_millis(2500), 7).map(|q| q.header_window());
        assert_eq!(q, Ok((8, 3)));
    }
}
