//! Time sources.
//!
//! Every decision in this crate is taken against a [`Clock`]: a monotonic
//! count of nanoseconds since the clock was created. Production code uses
//! [`Clock::monotonic`] (the CPU's time-stamp counter through [`quanta`],
//! falling back to the OS monotonic clock); tests use [`Clock::manual`], which
//! moves only when told to, or [`Clock::tokio`], which follows tokio's paused
//! test time. No part of the crate reads the wall clock, so NTP steps and
//! leap seconds cannot open or close a limit.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic time source shared by the layers of this crate.
///
/// Cloning a `Clock` is cheap and the clone reads the same time line (the
/// same epoch), so a limiter and its tests agree on what "now" is.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_floodgate::Clock;
///
/// let (clock, handle) = Clock::manual();
/// assert_eq!(clock.elapsed(), Duration::ZERO);
/// handle.advance(Duration::from_millis(250));
/// assert_eq!(clock.elapsed(), Duration::from_millis(250));
/// ```
#[derive(Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Quanta { clock: quanta::Clock, start: u64 },
    Std { start: std::time::Instant },
    Manual(Arc<AtomicU64>),
    Tokio { start: tokio::time::Instant },
}

impl Clock {
    /// The default clock: monotonic and cheap to read (a few nanoseconds
    /// where the CPU has an invariant time-stamp counter).
    #[must_use]
    pub fn monotonic() -> Self {
        let clock = quanta::Clock::new();
        let start = clock.raw();
        Self {
            source: Source::Quanta { clock, start },
        }
    }

    /// A clock that reads [`std::time::Instant`]. Slower than
    /// [`Clock::monotonic`] on most machines; useful where the time-stamp
    /// counter is not trusted.
    #[must_use]
    pub fn std() -> Self {
        Self {
            source: Source::Std {
                start: std::time::Instant::now(),
            },
        }
    }

    /// A clock that follows [`tokio::time::Instant`], so that
    /// `tokio::time::pause()` and `advance()` drive it in tests.
    #[must_use]
    pub fn tokio() -> Self {
        Self {
            source: Source::Tokio {
                start: tokio::time::Instant::now(),
            },
        }
    }

    /// A clock that stands still until its [`ManualClock`] handle moves it.
    /// It starts at zero.
    #[must_use]
    pub fn manual() -> (Self, ManualClock) {
        let now = Arc::new(AtomicU64::new(0));
        (
            Self {
                source: Source::Manual(Arc::clone(&now)),
            },
            ManualClock { now },
        )
    }

    /// Time since this clock's epoch (its creation).
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }

    /// Nanoseconds since this clock's epoch. Saturates after 584 years.
    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        match &self.source {
            Source::Quanta { clock, start } => clock.delta_as_nanos(*start, clock.raw()),
            Source::Std { start } => saturating_nanos(start.elapsed()),
            Source::Manual(now) => now.load(Ordering::Acquire),
            Source::Tokio { start } => saturating_nanos(start.elapsed()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::monotonic()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.source {
            Source::Quanta { .. } => "monotonic",
            Source::Std { .. } => "std",
            Source::Manual(_) => "manual",
            Source::Tokio { .. } => "tokio",
        };
        f.debug_struct("Clock")
            .field("kind", &kind)
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

/// The handle that moves a [`Clock::manual`] clock.
///
/// Clones move the same clock.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = saturating_nanos(by);
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_add(by))
            });
    }

    /// Sets the clock to `at` since its epoch, forwards or backwards.
    ///
    /// The other clocks of this crate never go back; this simulates a time
    /// source that does (a misbehaving counter, a migrated virtual machine),
    /// to test what the layers do then: they neither panic nor admit more
    /// than a quota allows.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_floodgate::Clock;
    ///
    /// let (clock, handle) = Clock::manual();
    /// handle.set(Duration::from_secs(10));
    /// handle.set(Duration::from_secs(3));
    /// assert_eq!(clock.elapsed(), Duration::from_secs(3));
    /// ```
    pub fn set(&self, at: Duration) {
        self.now.store(saturating_nanos(at), Ordering::Release);
    }

    /// Time since the clock's epoch.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.now.load(Ordering::Acquire))
    }
}

#[inline]
pub(crate) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let (clock, handle) = Clock::manual();
        let copy = clock.clone();
        assert_eq!(clock.now_nanos(), 0);
        handle.advance(Duration::from_nanos(5));
        handle.clone().advance(Duration::from_secs(1));
        assert_eq!(copy.now_nanos(), 1_000_000_005);
        assert_eq!(handle.elapsed(), Duration::from_nanos(1_000_000_005));
    }

    #[test]
    fn manual_clock_saturates_instead_of_wrapping() {
        let (clock, handle) = Clock::manual();
        handle.advance(Duration::MAX);
        handle.advance(Duration::from_secs(1));
        assert_eq!(clock.now_nanos(), u64::MAX);
    }

    #[test]
    fn monotonic_clocks_do_not_go_backwards() {
        for clock in [Clock::monotonic(), Clock::std()] {
            let mut last = clock.now_nanos();
            for _ in 0..10_000 {
                let now = clock.now_nanos();
                assert!(now >= last, "{clock:?} went from {last} to {now}");
                last = now;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(clock.elapsed(), Duration::from_secs(3));
    }
}
