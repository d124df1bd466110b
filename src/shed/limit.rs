//! How much the server takes: a fixed limit, or one that follows latency;
//! and CoDel on the time requests wait.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::saturating_nanos;
use crate::sync::Mutex;

/// How many requests may be in flight before the shedder refuses.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Limit {
    /// Always this many.
    Fixed(u32),
    /// A limit that follows measured latency (additive increase,
    /// multiplicative decrease).
    Adaptive(Aimd),
}

impl Limit {
    /// A fixed limit of `max` requests in flight.
    #[must_use]
    pub const fn fixed(max: u32) -> Self {
        Self::Fixed(max)
    }

    /// An adaptive limit that keeps the average latency of admitted
    /// requests near `latency_target`; see [`Aimd`] for the knobs.
    #[must_use]
    pub const fn adaptive(latency_target: Duration) -> Self {
        Self::Adaptive(Aimd::new(latency_target))
    }
}

/// An AIMD concurrency controller driven by latency, in the spirit of
/// Netflix's concurrency-limits and TCP congestion control.
///
/// Every `window` the average latency of the requests that completed in it
/// is compared with the target: above it, the limit is multiplied by
/// `backoff` (queues are building downstream: take less); at or below it,
/// and if the limit was actually reached during the window, the limit grows
/// by `increase` (there may be room: probe for it). An idle server does not
/// grow its limit, so a burst after a quiet period meets a limit that was
/// last proven safe.
///
/// ```
/// use std::time::Duration;
/// use tower_floodgate::shed::{Aimd, Limit};
///
/// let limit = Limit::Adaptive(
///     Aimd::new(Duration::from_millis(50)).initial(32).bounds(4, 1024),
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    latency_target: Duration,
    initial: u32,
    min: u32,
    max: u32,
    backoff: f64,
    increase: u32,
    window: Duration,
}

impl Aimd {
    /// A controller aiming at `latency_target`, starting at 32 requests in
    /// flight, between 1 and 10,000, backing off by 10% and growing by one
    /// per 100 ms window.
    #[must_use]
    pub const fn new(latency_target: Duration) -> Self {
        Self {
            latency_target,
            initial: 32,
            min: 1,
            max: 10_000,
            backoff: 0.9,
            increase: 1,
            window: Duration::from_millis(100),
        }
    }

    /// The limit to start from.
    #[must_use]
    pub const fn initial(mut self, initial: u32) -> Self {
        self.initial = initial;
        self
    }

    /// The range the limit stays in (a `min` of 0 is taken as 1).
    #[must_use]
    pub const fn bounds(mut self, min: u32, max: u32) -> Self {
        self.min = if min == 0 { 1 } else { min };
        self.max = if max < self.min { self.min } else { max };
        self
    }

    /// The factor applied when latency is over target (clamped to 0.5–0.99).
    #[must_use]
    pub fn backoff(mut self, factor: f64) -> Self {
        self.backoff = factor.clamp(0.5, 0.99);
        self
    }

    /// How much the limit grows per window when there is room.
    #[must_use]
    pub const fn increase(mut self, step: u32) -> Self {
        self.increase = step;
        self
    }

    /// How often the limit is reconsidered.
    #[must_use]
    pub const fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }
}

/// The limit in force, and the latency samples that move it.
pub(crate) struct Controller {
    setting: Limit,
    limit: AtomicU32,
    aimd: Option<Aimd>,
    /// Latency sum (µs, high 44 bits) and count (low 20 bits) this window.
    samples: AtomicU64,
    /// When the window ends, on the layer's clock.
    window_end: AtomicU64,
    /// Whether the limit was reached during the window.
    saturated: AtomicBool,
    update: Mutex<()>,
}

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl Controller {
    pub(crate) fn new(limit: Limit) -> Self {
        let (start, aimd) = match limit {
            Limit::Fixed(n) => (n, None),
            Limit::Adaptive(aimd) => (aimd.initial.clamp(aimd.min, aimd.max), Some(aimd)),
        };
        Self {
            setting: limit,
            limit: AtomicU32::new(start),
            aimd,
            samples: AtomicU64::new(0),
            window_end: AtomicU64::new(0),
            saturated: AtomicBool::new(false),
            update: Mutex::new(()),
        }
    }

    /// Whether the limit follows latency (and so needs samples).
    #[inline]
    pub(crate) fn is_adaptive(&self) -> bool {
        self.aimd.is_some()
    }

    /// How it was configured.
    pub(crate) fn setting(&self) -> Limit {
        self.setting
    }

    /// The limit in force.
    #[inline]
    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Notes that a request found `in_flight` of `limit` taken.
    #[inline]
    pub(crate) fn observe_load(&self, in_flight: u32, limit: u32) {
        if self.aimd.is_some()
            && u64::from(in_flight) * 4 >= u64::from(limit) * 3
            && !self.saturated.load(Ordering::Relaxed)
        {
            self.saturated.store(true, Ordering::Relaxed);
        }
    }

    /// Records the latency of a request admitted at `started`, seen at
    /// `now` (both in nanoseconds on the layer's clock).
    #[inline]
    pub(crate) fn record(&self, started: u64, now: u64) {
        let Some(aimd) = &self.aimd else {
            return;
        };
        let micros = now.saturating_sub(started) / 1_000;
        self.samples
            .fetch_add((micros << COUNT_BITS) | 1, Ordering::Relaxed);
        if now >= self.window_end.load(Ordering::Relaxed) {
            self.end_window(aimd, now);
        }
    }

    #[cold]
    fn end_window(&self, aimd: &Aimd, now: u64) {
        let _update = self.update.lock();
        if now < self.window_end.load(Ordering::Relaxed) {
            return;
        }
        self.window_end.store(
            now.saturating_add(saturating_nanos(aimd.window)),
            Ordering::Relaxed,
        );
        let packed = self.samples.swap(0, Ordering::Relaxed);
        let count = packed & COUNT_MASK;
        let saturated = self.saturated.swap(false, Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let average = Duration::from_micros((packed >> COUNT_BITS) / count);
        let limit = self.limit();
        let next = if average > aimd.latency_target {
            (f64::from(limit) * aimd.backoff).floor() as u32
        } else if saturated {
            limit.saturating_add(aimd.increase)
        } else {
            limit
        };
        self.limit
            .store(next.clamp(aimd.min, aimd.max), Ordering::Relaxed);
    }
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("limit", &self.limit())
            .field("aimd", &self.aimd)
            .finish()
    }
}

/// CoDel's settings for the shedder's queue.
///
/// CoDel watches the shortest time any request waited during each
/// `interval`. While that minimum stays under `target` the queue is only
/// absorbing bursts, and a request may wait up to `interval`. Once even the
/// luckiest request of an interval waited longer than `target`, the queue is
/// standing: the server is overloaded, waits are cut to `target`, and
/// sheddable requests are refused without queueing. (This is CoDel as
/// adapted to RPC servers by Facebook's Wangle.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoDel {
    /// Acceptable standing wait (default 5 ms).
    pub target: Duration,
    /// Window over which the minimum wait is judged (default 100 ms).
    pub interval: Duration,
}

impl Default for CoDel {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }
}

/// CoDel's state. Updated under the queue's lock.
#[derive(Debug, Default)]
pub(crate) struct CoDelState {
    interval_end: u64,
    min_wait: Option<u64>,
    overloaded: AtomicBool,
}

impl CoDelState {
    /// Whether the queue is standing.
    #[inline]
    pub(crate) fn overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// How long a request queued now may wait.
    pub(crate) fn max_wait(&self, codel: &CoDel) -> Duration {
        if self.overloaded() {
            codel.target
        } else {
            codel.interval
        }
    }

    /// Closes the interval if it has ended: the queue stands if even the
    /// shortest wait of the interval was over the target. An interval in
    /// which nobody left the queue says nothing new.
    pub(crate) fn tick(&mut self, codel: &CoDel, now: u64) {
        if now < self.interval_end {
            return;
        }
        if let Some(min) = self.min_wait.take() {
            self.overloaded
                .store(min > saturating_nanos(codel.target), Ordering::Relaxed);
        } else {
            self.overloaded.store(false, Ordering::Relaxed);
        }
        self.interval_end = now.saturating_add(saturating_nanos(codel.interval));
    }

    /// A request left the queue (served or timed out) after waiting
    /// `waited` ns, at `now`.
    pub(crate) fn left(&mut self, codel: &CoDel, waited: u64, now: u64) {
        self.tick(codel, now);
        self.min_wait = Some(self.min_wait.map_or(waited, |m| m.min(waited)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn aimd_backs_off_over_target_and_grows_when_saturated() {
        let c = Controller::new(Limit::Adaptive(
            Aimd::new(Duration::from_millis(20)).initial(100).bounds(10, 200),
        ));
        // A window closes with the first sample after it ends, which counts
        // in it. A slow window: 10% less.
        c.record(0, 50 * MS);
        assert_eq!(c.limit(), 90);
        // A fast window without reaching the limit: unchanged.
        c.record(150 * MS, 155 * MS);
        assert_eq!(c.limit(), 90);
        // A fast, saturated window: one more.
        c.observe_load(80, 90);
        c.record(255 * MS, 260 * MS);
        assert_eq!(c.limit(), 91);
        // Never below the floor.
        for i in 0..100u64 {
            c.record(i * 200 * MS + 500 * MS, i * 200 * MS + 600 * MS);
        }
        assert_eq!(c.limit(), 10);
    }

    #[test]
    fn fixed_limits_do_not_move() {
        let c = Controller::new(Limit::fixed(7));
        c.observe_load(7, 7);
        c.record(0, 10_000 * MS);
        assert_eq!(c.limit(), 7);
    }

    #[test]
    fn codel_cuts_waits_once_the_queue_stands() {
        let codel = CoDel::default();
        let mut state = CoDelState::default();
        assert_eq!(state.max_wait(&codel), codel.interval);
        // An interval where even the shortest wait was 8 ms > 5 ms.
        state.left(&codel, 8 * MS, 0);
        state.left(&codel, 9 * MS, 50 * MS);
        state.tick(&codel, 100 * MS);
        assert!(state.overloaded());
        assert_eq!(state.max_wait(&codel), codel.target);
        // The next interval had a 1 ms wait: fine again.
        state.left(&codel, MS, 150 * MS);
        state.tick(&codel, 200 * MS);
        assert!(!state.overloaded());
        // An interval with nobody leaving the queue: not standing.
        state.left(&codel, 30 * MS, 250 * MS);
        state.tick(&codel, 300 * MS);
        assert!(state.overloaded());
        state.tick(&codel, 400 * MS);
        assert!(!state.overloaded());
    }
}
