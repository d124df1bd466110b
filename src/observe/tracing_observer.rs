//! The `tracing` observer.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::Level;

use super::{Decision, Event, LayerKind, Observer};
use crate::clock::Clock;
use crate::error::Rejection;
use crate::key::TenantKey;
use crate::policy::Plan;

const TARGET: &str = "tower_floodgate";

/// Expands `tracing::$macro!(target: TARGET, <level>, args)` for a level
/// known only at run time: the `tracing` macros need a constant one.
macro_rules! at_level {
    ($level:expr, $macro:ident!()) => {
        match $level {
            Level::ERROR => tracing::$macro!(target: TARGET, Level::ERROR),
            Level::WARN => tracing::$macro!(target: TARGET, Level::WARN),
            Level::INFO => tracing::$macro!(target: TARGET, Level::INFO),
            Level::DEBUG => tracing::$macro!(target: TARGET, Level::DEBUG),
            _ => tracing::$macro!(target: TARGET, Level::TRACE),
        }
    };
    ($level:expr, $macro:ident!($($args:tt)+)) => {
        match $level {
            Level::ERROR => tracing::$macro!(target: TARGET, Level::ERROR, $($args)+),
            Level::WARN => tracing::$macro!(target: TARGET, Level::WARN, $($args)+),
            Level::INFO => tracing::$macro!(target: TARGET, Level::INFO, $($args)+),
            Level::DEBUG => tracing::$macro!(target: TARGET, Level::DEBUG, $($args)+),
            _ => tracing::$macro!(target: TARGET, Level::TRACE, $($args)+),
        }
    };
}

/// Logs every decision with [`tracing`], under the target
/// `tower_floodgate`, without letting a flood flood the logs.
///
/// | decisions | level | rate limited |
/// |---|---|---|
/// | refusals ([`Decision::is_rejection`]) | `INFO` | yes |
/// | [`ShadowRejected`](Decision::ShadowRejected), [`StoreFallback`](Decision::StoreFallback) | `WARN` | yes |
/// | [`Admitted`](Decision::Admitted), [`Coalesced`](Decision::Coalesced), [`Batched`](Decision::Batched) | [`admitted`](Tracing::admitted), `TRACE` by default | no |
///
/// Each event carries the fields `layer`, `decision`, `tenant` (its
/// `Display` form, which [redacts sensitive keys](TenantKey::sensitive), or
/// `-`), `plan` (its name, or `-`), `cost`, and when they apply `status`
/// (the HTTP status of the refusal), `retry_after_ms`, `waited_ms` and
/// `suppressed`. The message is the [`Rejection`]'s, or the decision's name
/// when there is none.
///
/// # Rate limiting
///
/// A flood of refusals would otherwise write one line per refused request,
/// at the moment the logs matter most. Each (layer, decision) pair may log
/// [`rejections_per_second`](Tracing::rejections_per_second) lines per
/// second of the clock (1 by default); the lines it drops are counted, and
/// the next line of the same pair reports them in its `suppressed` field.
/// The state is a fixed array of 50 pairs of atomic counters, shared by the
/// clones of this value: memory does not grow with the number of tenants or
/// requests.
///
/// Before touching that state, the observer asks `tracing` whether the
/// level is enabled for the target: with those levels off, a refusal costs
/// one level check, and is not counted as suppressed. Admitted requests
/// are not rate limited: at `TRACE`, they cost one level check unless a
/// subscriber asks for them.
///
/// # Examples
///
/// ```
/// use tower_floodgate::observe::Tracing;
/// use tracing::Level;
///
/// // Log admitted requests at DEBUG, and up to 10 refusals a second for
/// // each layer and kind of refusal.
/// let observer = Tracing::new().admitted(Level::DEBUG).rejections_per_second(10);
/// # let _ = observer;
/// ```
#[derive(Clone)]
pub struct Tracing {
    admitted: Level,
    per_second: u32,
    clock: Clock,
    budgets: Arc<[LineBudget; SLOTS]>,
}

impl Tracing {
    /// Admitted decisions at `TRACE`, one line per second per layer and
    /// kind of refusal, on the monotonic clock.
    #[must_use]
    pub fn new() -> Self {
        Self {
            admitted: Level::TRACE,
            per_second: 1,
            clock: Clock::monotonic(),
            budgets: Arc::new([const { LineBudget::new() }; SLOTS]),
        }
    }

    /// The level of admitted, coalesced and batched decisions (`TRACE` by
    /// default). These are not rate limited: raise the level only with a
    /// subscriber that can take one line per request.
    #[must_use]
    pub fn admitted(mut self, level: Level) -> Self {
        self.admitted = level;
        self
    }

    /// How many lines each layer may log per second for each kind of
    /// refusal, shadow refusal and store fallback (1 by default). Zero
    /// turns those lines off.
    #[must_use]
    pub fn rejections_per_second(mut self, lines: u32) -> Self {
        self.per_second = lines;
        self
    }

    /// The clock that the per-second budget follows (the monotonic clock by
    /// default); [`Clock::manual`] for tests.
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn limited(&self, level: Level, event: &Event<'_>) {
        if self.per_second == 0
            || level > tracing::level_filters::LevelFilter::current()
            || !at_level!(level, enabled!())
        {
            return;
        }
        let budget = &self.budgets[slot(event.layer, event.decision)];
        if let Some(suppressed) = budget.pass(self.clock.now_nanos(), self.per_second) {
            emit(level, event, Some(suppressed));
        }
    }
}

impl Default for Tracing {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("admitted", &self.admitted)
            .field("rejections_per_second", &self.per_second)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Observer for Tracing {
    fn observe(&self, event: &Event<'_>) {
        match event.decision {
            Decision::Admitted | Decision::Coalesced | Decision::Batched => {
                emit(self.admitted, event, None);
            }
            Decision::RateLimited
            | Decision::ConcurrencyCapped
            | Decision::Shed
            | Decision::Blocked
            | Decision::KeyRejected => self.limited(Level::INFO, event),
            Decision::ShadowRejected | Decision::StoreFallback => {
                self.limited(Level::WARN, event);
            }
        }
    }
}


fn emit(level: Level, event: &Event<'_>, suppressed: Option<u64>) {
    // The global ceiling first (one load), then the callsite's interest.
    if level > tracing::level_filters::LevelFilter::current() || !at_level!(level, enabled!()) {
        return;
    }
    let rejection = event.rejection;
    let tenant = Dash(
        event
            .tenant
            .or_else(|| rejection.and_then(Rejection::tenant)),
    );
    let plan = event.plan.map_or("-", Plan::name);
    let status = rejection.map(|r| r.status().as_u16());
    let retry_after_ms = rejection.and_then(Rejection::retry_after).map(millis);
    let waited_ms = event.waited.map(millis);
    at_level!(
        level,
        event!(
            layer = event.layer.as_str(),
            decision = event.decision.as_str(),
            tenant = %tenant,
            plan,
            status,
            retry_after_ms,
            cost = event.cost,
            waited_ms,
            suppressed,
            "{}",
            Message(event)
        )
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A tenant's `Display` form, or `-`.
struct Dash<'a>(Option<&'a TenantKey>);

impl fmt::Display for Dash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(tenant) => tenant.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The rejection's message, or the decision's name.
struct Message<'a, 'b>(&'a Event<'b>);

impl fmt::Display for Message<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.rejection {
            Some(rejection) => rejection.fmt(f),
            None => f.write_str(self.0.decision.as_str()),
        }
    }
}

/// How many (layer, decision) pairs there are.
pub(super) const SLOTS: usize = LayerKind::ALL.len() * DECISIONS;

const DECISIONS: usize = 10;

/// The index of `layer` in [`LayerKind::ALL`].
pub(super) const fn layer_index(layer: LayerKind) -> usize {
    match layer {
        LayerKind::RateLimit => 0,
        LayerKind::ConcurrencyCap => 1,
        LayerKind::LoadShed => 2,
        LayerKind::Coalesce => 3,
        LayerKind::Purge => 4,
    }
}

/// A distinct index below [`SLOTS`] for each (layer, decision) pair. The
/// matches are exhaustive, so a new variant does not compile until it has
/// an index.
pub(super) const fn slot(layer: LayerKind, decision: Decision) -> usize {
    let decision = match decision {
        Decision::Admitted => 0,
        Decision::RateLimited => 1,
        Decision::ConcurrencyCapped => 2,
        Decision::Shed => 3,
        Decision::Blocked => 4,
        Decision::KeyRejected => 5,
        Decision::ShadowRejected => 6,
        Decision::Coalesced => 7,
        Decision::Batched => 8,
        Decision::StoreFallback => 9,
    };
    layer_index(layer) * DECISIONS + decision
}

/// Lets a number of log lines through per second; counts the others.
///
/// Seconds are whole seconds of the clock (0 to 1 s, 1 to 2 s, ...), so a
/// budget of `n` lets at most `n` lines through in any such second. `state`
/// holds the number of the second last counted in (its low 32 bits: it
/// wraps after 136 years) in its high half, and the lines let through in
/// that second in its low half; one compare-and-swap moves both.
#[derive(Debug, Default)]
struct LineBudget {
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl LineBudget {
    const NANOS_PER_SECOND: u64 = 1_000_000_000;

    const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one let through)` if a line at
    /// time `now` (nanoseconds) may be logged, with `per_second` lines
    /// allowed per second.
    fn pass(&self, now: u64, per_second: u32) -> Option<u64> {
        // Truncation intended: only the distance between seconds matters.
        let second = (now / Self::NANOS_PER_SECOND) as u32;
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let (seen, used) = ((state >> 32) as u32, state as u32);
            // A later second starts a new count; a caller whose clock
            // reading is older than `seen` counts against `seen`.
            let next = if (second.wrapping_sub(seen) as i32) > 0 {
                (u64::from(second) << 32) | 1
            } else if used < per_second {
                state + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => state = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use http::StatusCode;
    use tracing::level_filters::LevelFilter;
    use tracing::span;
    use tracing::{Metadata, Subscriber};

    use super::*;
    use crate::error::{OverloadCause, Overloaded};

    /// One event a [`Capture`] saw.
    #[derive(Debug, Clone)]
    struct Line {
        level: Level,
        target: String,
        fields: HashMap<&'static str, String>,
    }

    impl Line {
        fn field(&self, name: &str) -> Option<&str> {
            self.fields.get(name).map(String::as_str)
        }
    }

    /// A subscriber that keeps the events at or above `max`.
    #[derive(Clone)]
    struct Capture {
        max: LevelFilter,
        lines: Arc<Mutex<Vec<Line>>>,
    }

    impl Capture {
        fn new(max: LevelFilter) -> Self {
            Self {
                max,
                lines: Arc::default(),
            }
        }

        fn lines(&self) -> Vec<Line> {
            self.lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        }

        /// Runs `f` with this subscriber as the thread's default.
        fn run(&self, f: impl FnOnce()) -> Vec<Line> {
            tracing::subscriber::with_default(self.clone(), f);
            self.lines()
        }
    }

    struct Fields<'a>(&'a mut HashMap<&'static str, String>);

    impl tracing::field::Visit for Fields<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
            self.0.insert(field.name(), format!("{value:?}"));
        }

        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.insert(field.name(), value.to_owned());
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            *metadata.level() <= self.max
        }

        fn max_level_hint(&self) -> Option<LevelFilter> {
            Some(self.max)
        }

        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }

        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

        fn event(&self, event: &tracing::Event<'_>) {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            self.lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Line {
                    level: *event.metadata().level(),
                    target: event.metadata().target().to_owned(),
                    fields,
                });
        }

        fn enter(&self, _: &span::Id) {}

        fn exit(&self, _: &span::Id) {}
    }

    fn blocked(tenant: &TenantKey) -> Rejection {
        Rejection::Blocked {
            tenant: tenant.clone(),
        }
    }

    fn overloaded(tenant: &TenantKey, retry_after: Duration) -> Rejection {
        Rejection::Overloaded(Box::new(Overloaded {
            cause: OverloadCause::GlobalCap {
                cap: 64,
                queued: true,
            },
            tenant: Some(tenant.clone()),
            retry_after,
        }))
    }

    #[test]
    fn a_flood_logs_the_budget_and_reports_what_it_suppressed() {
        for per_second in [1, 3] {
            let (clock, time) = Clock::manual();
            let observer = Tracing::new().rejections_per_second(per_second).clock(clock);
            let tenant = TenantKey::from("acme");
            let rejection = blocked(&tenant);
            let event = Event::new(LayerKind::RateLimit, Decision::Blocked, Some(&tenant))
                .rejection(Some(&rejection));
            let capture = Capture::new(LevelFilter::TRACE);
            let lines = capture.run(|| {
                for _ in 0..100_000 {
                    observer.observe(&event);
                    time.advance(Duration::from_nanos(9_000));
                }
                // 0.9 s have passed: still the first second.
                assert_eq!(time.elapsed(), Duration::from_millis(900));
                time.advance(Duration::from_millis(100));
                observer.observe(&event);
            });
            let budget = per_second as usize;
            assert_eq!(lines.len(), budget + 1, "{per_second} a second");
            for line in &lines[..budget] {
                assert_eq!(line.field("suppressed"), Some("0"));
            }
            let suppressed = (100_000 - budget).to_string();
            assert_eq!(lines[budget].field("suppressed"), Some(suppressed.as_str()));
        }
    }

    #[test]
    fn each_layer_and_decision_has_its_own_budget() {
        let (clock, _time) = Clock::manual();
        let observer = Tracing::new().clock(clock);
        let tenant = TenantKey::from("acme");
        let rejection = blocked(&tenant);
        let capture = Capture::new(LevelFilter::TRACE);
        let lines = capture.run(|| {
            for layer in LayerKind::ALL {
                for decision in [
                    Decision::Blocked,
                    Decision::ShadowRejected,
                    Decision::StoreFallback,
                ] {
                    for _ in 0..1_000 {
                        observer.observe(
                            &Event::new(layer, decision, Some(&tenant)).rejection(Some(&rejection)),
                        );
                    }
                }
            }
        });
        assert_eq!(lines.len(), 15);
    }

    #[test]
    fn zero_lines_a_second_turns_refusals_off() {
        let observer = Tracing::new().rejections_per_second(0);
        let tenant = TenantKey::from("acme");
        let rejection = blocked(&tenant);
        let lines = Capture::new(LevelFilter::TRACE).run(|| {
            observer.observe(
                &Event::new(LayerKind::RateLimit, Decision::Blocked, Some(&tenant))
                    .rejection(Some(&rejection)),
            );
        });
        assert!(lines.is_empty());
    }

    #[test]
    fn lines_carry_structured_fields() {
        let tenant = TenantKey::from("acme");
        let rejection = overloaded(&tenant, Duration::from_millis(1_500));
        let plan = Plan::new("gold");
        let event = Event::new(LayerKind::ConcurrencyCap, Decision::Shed, Some(&tenant))
            .plan(Some(&plan))
            .rejection(Some(&rejection))
            .cost(3)
            .waited(Some(Duration::from_millis(250)));
        let lines = Capture::new(LevelFilter::TRACE).run(|| Tracing::new().observe(&event));
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line.target, "tower_floodgate");
        assert_eq!(line.level, Level::INFO);
        assert_eq!(line.field("layer"), Some("concurrency_cap"));
        assert_eq!(line.field("decision"), Some("shed"));
        assert_eq!(line.field("tenant"), Some("acme"));
        assert_eq!(line.field("plan"), Some("gold"));
        assert_eq!(
            line.field("status"),
            Some(StatusCode::SERVICE_UNAVAILABLE.as_str())
        );
        assert_eq!(line.field("retry_after_ms"), Some("1500"));
        assert_eq!(line.field("cost"), Some("3"));
        assert_eq!(line.field("waited_ms"), Some("250"));
        assert_eq!(line.field("suppressed"), Some("0"));
        assert_eq!(line.field("message"), Some(rejection.to_string().as_str()));
    }

    #[test]
    fn admitted_lines_have_no_refusal_fields() {
        let event = Event::new(LayerKind::Coalesce, Decision::Coalesced, None);
        let lines = Capture::new(LevelFilter::TRACE).run(|| Tracing::new().observe(&event));
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line.level, Level::TRACE);
        assert_eq!(line.field("layer"), Some("coalesce"));
        assert_eq!(line.field("decision"), Some("coalesced"));
        assert_eq!(line.field("tenant"), Some("-"));
        assert_eq!(line.field("plan"), Some("-"));
        assert_eq!(line.field("message"), Some("coalesced"));
        for absent in ["status", "retry_after_ms", "waited_ms", "suppressed"] {
            assert_eq!(line.field(absent), None, "{absent}");
        }
    }

    #[test]
    fn shadow_refusals_and_store_fallbacks_are_warnings() {
        let tenant = TenantKey::from("acme");
        let rejection = blocked(&tenant);
        let lines = Capture::new(LevelFilter::TRACE).run(|| {
            let observer = Tracing::new();
            observer.observe(
                &Event::new(LayerKind::RateLimit, Decision::ShadowRejected, Some(&tenant))
                    .rejection(Some(&rejection)),
            );
            observer.observe(&Event::new(
                LayerKind::RateLimit,
                Decision::StoreFallback,
                Some(&tenant),
            ));
        });
        let levels: Vec<_> = lines.iter().map(|l| l.level).collect();
        assert_eq!(levels, [Level::WARN, Level::WARN]);
        assert_eq!(lines[0].field("status"), Some("403"));
        assert_eq!(lines[1].field("message"), Some("store_fallback"));
    }

    #[test]
    fn sensitive_tenants_are_redacted() {
        let tenant = TenantKey::from("sk_live_0123456789").sensitive();
        let rejection = blocked(&tenant);
        let lines = Capture::new(LevelFilter::TRACE).run(|| {
            let observer = Tracing::new();
            observer.observe(
                &Event::new(LayerKind::RateLimit, Decision::Blocked, Some(&tenant))
                    .rejection(Some(&rejection)),
            );
            // Without the event's tenant, the rejection's is logged.
            observer.observe(
                &Event::new(LayerKind::LoadShed, Decision::Blocked, None)
                    .rejection(Some(&rejection)),
            );
        });
        assert_eq!(lines.len(), 2);
        for line in &lines {
            let tenant = line.field("tenant").unwrap_or_default();
            assert!(tenant.starts_with("<redacted:"), "{tenant}");
            for value in line.fields.values() {
                assert!(!value.contains("sk_live"), "{value}");
            }
        }
    }

    #[test]
    fn admitted_at_trace_is_not_emitted_at_info() {
        let tenant = TenantKey::from("acme");
        let admitted = Event::new(LayerKind::RateLimit, Decision::Admitted, Some(&tenant));
        let capture = Capture::new(LevelFilter::INFO);
        let lines = capture.run(|| {
            let observer = Tracing::new();
            for _ in 0..1_000 {
                observer.observe(&admitted);
            }
        });
        assert!(lines.is_empty(), "{lines:?}");
        // The same events, configured at INFO, reach the same subscriber.
        let lines = capture.run(|| {
            let observer = Tracing::new().admitted(Level::INFO);
            for _ in 0..1_000 {
                observer.observe(&admitted);
            }
        });
        assert_eq!(lines.len(), 1_000);
        assert!(lines.iter().all(|l| l.level == Level::INFO));
    }

    #[test]
    fn refusals_below_the_subscriber_level_are_not_counted() {
        let (clock, time) = Clock::manual();
        let observer = Tracing::new().clock(clock);
        let tenant = TenantKey::from("acme");
        let rejection = blocked(&tenant);
        let event = Event::new(LayerKind::RateLimit, Decision::Blocked, Some(&tenant))
            .rejection(Some(&rejection));
        let lines = Capture::new(LevelFilter::WARN).run(|| {
            for _ in 0..100 {
                observer.observe(&event);
            }
        });
        assert!(lines.is_empty());
        time.advance(Duration::from_secs(1));
        let lines = Capture::new(LevelFilter::INFO).run(|| observer.observe(&event));
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].field("suppressed"), Some("0"));
    }

    #[test]
    fn budget_holds_across_threads() {
        let budget = Arc::new(LineBudget::new());
        let passed = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let budget = Arc::clone(&budget);
                    scope.spawn(move || {
                        (0..25_000)
                            .filter(|_| budget.pass(5_000_000_000, 7).is_some())
                            .count()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| unreachable!()))
                .sum::<usize>()
        });
        assert_eq!(passed, 7);
        assert_eq!(budget.pass(6_000_000_000, 7), Some(100_000 - 7));
    }

    #[test]
    fn budget_counts_whole_seconds_and_ignores_late_readings() {
        let budget = LineBudget::new();
        assert_eq!(budget.pass(0, 2), Some(0));
        assert_eq!(budget.pass(1, 2), Some(0));
        assert_eq!(budget.pass(999_999_999, 2), None);
        assert_eq!(budget.pass(1_000_000_000, 2), Some(1));
        // A reading from the previous second counts against this one.
        assert_eq!(budget.pass(999_999_999, 2), Some(0));
        assert_eq!(budget.pass(1_500_000_000, 2), None);
        assert_eq!(budget.pass(u64::MAX, 2), Some(1));
    }

    #[test]
    fn slots_are_distinct_and_in_range() {
        let decisions = [
            Decision::Admitted,
            Decision::RateLimited,
            Decision::ConcurrencyCapped,
            Decision::Shed,
            Decision::Blocked,
            Decision::KeyRejected,
            Decision::ShadowRejected,
            Decision::Coalesced,
            Decision::Batched,
            Decision::StoreFallback,
        ];
        let mut seen = [false; SLOTS];
        for (i, layer) in LayerKind::ALL.into_iter().enumerate() {
            assert_eq!(layer_index(layer), i);
            for decision in decisions {
                let slot = slot(layer, decision);
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
