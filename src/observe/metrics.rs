//! The `metrics` observer.

use std::fmt;
use std::sync::{Arc, Once, OnceLock};

use ::metrics::{Counter, Histogram, Label, Unit};

use super::tracing_observer::{SLOTS, layer_index, slot};
use super::{Decision, Event, LayerKind, Observer};
use crate::error::Rejection;
use crate::key::TenantKey;

const DECISIONS_TOTAL: &str = "floodgate_decisions_total";
const QUEUE_WAIT: &str = "floodgate_queue_wait_seconds";
const RETRY_AFTER: &str = "floodgate_retry_after_seconds";
const REQUEST_COST: &str = "floodgate_request_cost";

const LAYERS: usize = LayerKind::ALL.len();

/// The `tenant` label value of a decision without a tenant.
const NO_TENANT: &str = "none";
/// The `tenant` label value of a tenant that [`TenantLabel::from_fn`]
/// leaves unlabelled.
const OTHER_TENANT: &str = "other";
/// The `plan` label value of a decision without a plan.
const NO_PLAN: &str = "none";

/// Counts decisions and records waits, retry delays and costs through the
/// [`metrics`](::metrics) facade, for whichever exporter the application
/// installs (Prometheus, StatsD, ...).
///
/// | metric | kind | labels | recorded for |
/// |---|---|---|---|
/// | `floodgate_decisions_total` | counter | `layer`, `decision` (+ `plan`, `tenant` if asked) | every decision |
/// | `floodgate_queue_wait_seconds` | histogram | `layer` | decisions that waited in a queue |
/// | `floodgate_retry_after_seconds` | histogram | `layer` | refusals that tell the client when to retry |
/// | `floodgate_request_cost` | histogram | `layer` (`rate_limit`) | rate limit decisions: admitted, rate limited, shadow refused |
///
/// `layer` and `decision` take the values of [`LayerKind::as_str`] and
/// [`Decision::as_str`]. A [`StoreFallback`](Decision::StoreFallback) is
/// reported besides the decision itself: it is counted, but feeds no
/// histogram, so nothing is recorded twice.
///
/// # Cardinality
///
/// Each label value is a time series to store in the metrics backend, for
/// as long as it keeps it. By default there are at most 5 layers × 10
/// decisions counter series and 11 histograms, however many tenants call:
/// one series per tenant would let a client that rotates made-up keys
/// create series without bound, in the backend and in this process.
///
/// * [`plan_label(true)`](Metrics::plan_label) adds a `plan` label to the
///   counter: bounded by the number of plans you configure (plus `none`
///   for decisions made without looking a plan up).
/// * [`tenant_label`](Metrics::tenant_label) adds a `tenant` label to the
///   counter: [`TenantLabel::all`] makes one series per tenant (unbounded),
///   [`TenantLabel::from_fn`] labels only the tenants you choose, such as
///   your largest customers, and counts the others under `other`.
///
/// # Cost
///
/// With neither label, recording a decision is an array index and an
/// atomic increment on a handle resolved once. With either label, the
/// counter is looked up in the recorder on each decision (a hash map
/// lookup, and an allocation for each label value).
///
/// # Recorder
///
/// Handles are resolved from the recorder installed at the time each
/// (layer, decision) is first seen, and the metrics are described then
/// too. Creating a `Metrics` before installing the recorder is fine; the
/// recorder must be installed before the first request. Clones share their
/// handles.
///
/// # Examples
///
/// ```
/// use tower_floodgate::TenantKey;
/// use tower_floodgate::observe::{Metrics, TenantLabel};
///
/// // The default: no per-tenant series.
/// let metrics = Metrics::new();
///
/// // Per plan, and per tenant for two big customers only.
/// let metrics = Metrics::new()
///     .plan_label(true)
///     .tenant_label(TenantLabel::from_fn(|tenant: &TenantKey| {
///         matches!(tenant.as_str(), Some("acme" | "globex")).then(|| tenant.to_string())
///     }));
/// # let _ = metrics;
/// ```
#[derive(Clone, Default)]
pub struct Metrics {
    plan_label: bool,
    tenant_label: TenantLabel,
    handles: Arc<Handles>,
}

impl Metrics {
    /// Counters labelled by layer and decision only.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the decision counter carries a `plan` label, the name of the
    /// tenant's plan (`none` when the layer did not look one up). Off by
    /// default. The series are bounded by the number of plans you
    /// configure, times the layers and decisions.
    #[must_use]
    pub fn plan_label(mut self, enabled: bool) -> Self {
        self.plan_label = enabled;
        self
    }

    /// Which tenants the decision counter labels with `tenant`; none by
    /// default. See [`TenantLabel`].
    #[must_use]
    pub fn tenant_label(mut self, label: TenantLabel) -> Self {
        self.tenant_label = label;
        self
    }

    fn count(&self, event: &Event<'_>) {
        let layer = event.layer.as_str();
        let decision = event.decision.as_str();
        if !self.plan_label && self.tenant_label.is_none() {
            self.handles.decisions[slot(event.layer, event.decision)]
                .get_or_init(|| {
                    ::metrics::counter!(DECISIONS_TOTAL, "layer" => layer, "decision" => decision)
                })
                .increment(1);
            return;
        }
        let mut labels = Vec::with_capacity(4);
        labels.push(Label::from_static_parts("layer", layer));
        labels.push(Label::from_static_parts("decision", decision));
        if self.plan_label {
            labels.push(match event.plan {
                Some(plan) => Label::new("plan", plan.name().to_owned()),
                None => Label::from_static_parts("plan", NO_PLAN),
            });
        }
        if let Some(tenant) = self.tenant_label.value(event.tenant) {
            labels.push(Label::new("tenant", tenant));
        }
        ::metrics::counter!(DECISIONS_TOTAL, labels).increment(1);
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("plan_label", &self.plan_label)
            .field("tenant_label", &self.tenant_label)
            .finish_non_exhaustive()
    }
}

impl Observer for Metrics {
    fn observe(&self, event: &Event<'_>) {
        let handles = &*self.handles;
        handles.described.call_once(describe);
        self.count(event);
        if event.decision == Decision::StoreFallback {
            return;
        }
        let layer = event.layer.as_str();
        let index = layer_index(event.layer);
        if let Some(waited) = event.waited {
            handles.queue_wait[index]
                .get_or_init(|| ::metrics::histogram!(QUEUE_WAIT, "layer" => layer))
                .record(waited.as_secs_f64());
        }
        if event.decision.is_rejection()
            && let Some(retry_after) = event.rejection.and_then(Rejection::retry_after)
        {
            handles.retry_after[index]
                .get_or_init(|| ::metrics::histogram!(RETRY_AFTER, "layer" => layer))
                .record(retry_after.as_secs_f64());
        }
        if event.layer == LayerKind::RateLimit
            && matches!(
                event.decision,
                Decision::Admitted | Decision::RateLimited | Decision::ShadowRejected
            )
        {
            handles
                .cost
                .get_or_init(|| ::metrics::histogram!(REQUEST_COST, "layer" => layer))
                .record(f64::from(event.cost));
        }
    }
}

/// The handles, resolved on first use.
struct Handles {
    described: Once,
    decisions: [OnceLock<Counter>; SLOTS],
    queue_wait: [OnceLock<Histogram>; LAYERS],
    retry_after: [OnceLock<Histogram>; LAYERS],
    cost: OnceLock<Histogram>,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            described: Once::new(),
            decisions: [const { OnceLock::new() }; SLOTS],
            queue_wait: [const { OnceLock::new() }; LAYERS],
            retry_after: [const { OnceLock::new() }; LAYERS],
            cost: OnceLock::new(),
        }
    }
}

fn describe() {
    ::metrics::describe_counter!(
        DECISIONS_TOTAL,
        Unit::Count,
        "Decisions of the tower-floodgate layers, by layer and decision."
    );
    ::metrics::describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time requests waited in a tower-floodgate layer's queue."
    );
    ::metrics::describe_histogram!(
        RETRY_AFTER,
        Unit::Seconds,
        "Retry delay given to refused requests."
    );
    ::metrics::describe_histogram!(
        REQUEST_COST,
        Unit::Count,
        "Cost of rate-limited requests, in quota units."
    );
}

/// Which tenants [`Metrics`] labels its decision counter with.
///
/// None by default: a `tenant` label makes a time series per labelled
/// tenant, and the tenants are whoever sends requests. The [`Display`]
/// form of a key is used, so [sensitive](TenantKey::sensitive) keys show
/// as fingerprints.
///
/// [`Display`]: fmt::Display
#[derive(Clone, Default)]
pub struct TenantLabel(Mode);

#[derive(Clone, Default)]
enum Mode {
    #[default]
    None,
    All,
    Fn(Arc<LabelFn>),
}

type LabelFn = dyn Fn(&TenantKey) -> Option<String> + Send + Sync;

impl TenantLabel {
    /// No `tenant` label (the default).
    #[must_use]
    pub fn none() -> Self {
        Self(Mode::None)
    }

    /// A `tenant` label on every decision: one series per tenant ever
    /// seen, **without bound**. Use it only where the tenants are few and
    /// known, such as keys from an [`extension`](crate::key::extension)
    /// that your authentication sets; never with keys that clients choose
    /// (headers, bearer tokens). Decisions without a tenant are labelled
    /// `none`.
    #[must_use]
    pub fn all() -> Self {
        Self(Mode::All)
    }

    /// A `tenant` label with the value `f` returns, or `other` when it
    /// returns `None`, so that the series are bounded by the values `f`
    /// can return, plus `other` and `none` (decisions without a tenant).
    ///
    /// `f` runs on the request path, on every decision: keep it cheap.
    #[must_use]
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&TenantKey) -> Option<String> + Send + Sync + 'static,
    {
        Self(Mode::Fn(Arc::new(f)))
    }

    fn is_none(&self) -> bool {
        matches!(self.0, Mode::None)
    }

    /// The label value for `tenant`, or `None` for no label.
    fn value(&self, tenant: Option<&TenantKey>) -> Option<String> {
        match (&self.0, tenant) {
            (Mode::None, _) => None,
            (Mode::All | Mode::Fn(_), None) => Some(NO_TENANT.to_owned()),
            (Mode::All, Some(tenant)) => Some(tenant.to_string()),
            (Mode::Fn(f), Some(tenant)) => Some(f(tenant).unwrap_or_else(|| OTHER_TENANT.to_owned())),
        }
    }
}

impl fmt::Debug for TenantLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Mode::None => "TenantLabel::None",
            Mode::All => "TenantLabel::All",
            Mode::Fn(_) => "TenantLabel::Fn(..)",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use ::metrics::with_local_recorder;
    use metrics_util::MetricKind;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use super::*;
    use crate::error::{OverloadCause, Overloaded};
    use crate::policy::Plan;

    type Labels = BTreeMap<String, String>;

    /// One series of a snapshot.
    #[derive(Debug)]
    struct Series {
        kind: MetricKind,
        name: String,
        labels: Labels,
        description: Option<String>,
        value: DebugValue,
    }

    fn snapshot(snapshotter: &Snapshotter) -> Vec<Series> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _unit, description, value)| Series {
                kind: key.kind(),
                name: key.key().name().to_owned(),
                labels: key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                description: description.map(|d| d.to_string()),
                value,
            })
            .collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The decision counters, by label set.
    fn counters(series: &[Series]) -> BTreeMap<Labels, u64> {
        series
            .iter()
            .filter(|s| s.name == DECISIONS_TOTAL)
            .map(|s| match s.value {
                DebugValue::Counter(n) => (s.labels.clone(), n),
                _ => unreachable!("{s:?}"),
            })
            .collect()
    }

    fn histogram(series: &[Series], name: &str, layer: &str) -> Vec<f64> {
        series
            .iter()
            .filter(|s| s.name == name && s.labels == labels(&[("layer", layer)]))
            .flat_map(|s| match &s.value {
                DebugValue::Histogram(values) => values
                    .iter()
                    .map(|v| v.into_inner())
                    .collect::<Vec<f64>>(),
                _ => unreachable!("{s:?}"),
            })
            .collect()
    }

    /// Runs `f` with a fresh recorder; returns what it recorded.
    fn record(f: impl FnOnce()) -> Vec<Series> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_local_recorder(&recorder, f);
        snapshot(&snapshotter)
    }

    #[test]
    fn counts_each_layer_and_decision_exactly() {
        let tenant = TenantKey::from("acme");
        let metrics = Metrics::new();
        let cases = [
            (LayerKind::RateLimit, Decision::Admitted, 7),
            (LayerKind::RateLimit, Decision::RateLimited, 3),
            (LayerKind::ConcurrencyCap, Decision::Admitted, 5),
            (LayerKind::LoadShed, Decision::Shed, 2),
            (LayerKind::Coalesce, Decision::Coalesced, 11),
            (LayerKind::Purge, Decision::Batched, 1),
        ];
        let series = record(|| {
            for (layer, decision, n) in cases {
                for _ in 0..n {
                    metrics.observe(&Event::new(layer, decision, Some(&tenant)));
                }
            }
        });
        let expected: BTreeMap<_, _> = cases
            .iter()
            .map(|(layer, decision, n)| {
                (
                    labels(&[("layer", layer.as_str()), ("decision", decision.as_str())]),
                    *n,
                )
            })
            .collect();
        assert_eq!(counters(&series), expected);
        let counter = series.iter().find(|s| s.name == DECISIONS_TOTAL);
        assert!(counter.is_some_and(|s| s.kind == MetricKind::Counter && s.description.is_some()));
    }

    #[test]
    fn no_series_per_tenant_by_default() {
        let metrics = Metrics::new().plan_label(true);
        let plans = [Plan::new("free"), Plan::new("pro")];
        let series = record(|| {
            for i in 0..10_000u64 {
                let tenant = TenantKey::from(i);
                let plan = &plans[(i % 2) as usize];
                let decision = if i % 3 == 0 {
                    Decision::RateLimited
                } else {
                    Decision::Admitted
                };
                metrics.observe(
                    &Event::new(LayerKind::RateLimit, decision, Some(&tenant)).plan(Some(plan)),
                );
            }
        });
        let counters = counters(&series);
        assert_eq!(counters.len(), 4, "{counters:?}");
        assert_eq!(counters.values().sum::<u64>(), 10_000);
        assert!(counters.keys().all(|l| !l.contains_key("tenant")));
        let pro_limited = labels(&[
            ("layer", "rate_limit"),
            ("decision", "rate_limited"),
            ("plan", "pro"),
        ]);
        // i % 2 == 1 and i % 3 == 0: i = 3, 9, 15, ... below 10,000.
        assert_eq!(counters.get(&pro_limited), Some(&1_667));
        // 10,000 tenants, and still a handful of series in all.
        assert!(series.len() <= 6, "{series:?}");
    }

    #[test]
    fn tenant_label_when_asked() {
        let acme = TenantKey::from("acme");
        let secret = TenantKey::from("sk_live_0123456789").sensitive();
        let metrics = Metrics::new().tenant_label(TenantLabel::all());
        let series = record(|| {
            for tenant in [&acme, &acme, &secret] {
                metrics.observe(&Event::new(LayerKind::RateLimit, Decision::Admitted, Some(tenant)));
            }
            metrics.observe(&Event::new(LayerKind::RateLimit, Decision::KeyRejected, None));
        });
        let counters = counters(&series);
        let admitted = |tenant: &str| {
            labels(&[
                ("layer", "rate_limit"),
                ("decision", "admitted"),
                ("tenant", tenant),
            ])
        };
        assert_eq!(counters.get(&admitted("acme")), Some(&2));
        assert_eq!(counters.get(&admitted(&secret.to_string())), Some(&1));
        let rejected = labels(&[
            ("layer", "rate_limit"),
            ("decision", "key_rejected"),
            ("tenant", "none"),
        ]);
        assert_eq!(counters.get(&rejected), Some(&1));
        assert_eq!(counters.len(), 3);
        assert!(counters.keys().all(|l| !l["tenant"].contains("sk_live")));
    }

    #[test]
    fn tenant_label_from_fn_bounds_the_series() {
        let metrics = Metrics::new().tenant_label(TenantLabel::from_fn(|tenant| {
            (tenant.as_str() == Some("big")).then(|| "big".to_owned())
        }));
        let series = record(|| {
            for i in 0..1_000u64 {
                let tenant = if i % 10 == 0 {
                    TenantKey::from("big")
                } else {
                    TenantKey::from(i)
                };
                metrics.observe(&Event::new(LayerKind::LoadShed, Decision::Admitted, Some(&tenant)));
            }
        });
        let counters = counters(&series);
        let admitted = |tenant: &str| {
            labels(&[
                ("layer", "load_shed"),
                ("decision", "admitted"),
                ("tenant", tenant),
            ])
        };
        assert_eq!(counters.get(&admitted("big")), Some(&100));
        assert_eq!(counters.get(&admitted("other")), Some(&900));
        assert_eq!(counters.len(), 2);
    }

    #[test]
    fn histograms_record_waits_retry_delays_and_costs() {
        let tenant = TenantKey::from("acme");
        let overloaded = Rejection::Overloaded(Box::new(Overloaded {
            cause: OverloadCause::GlobalCap {
                cap: 64,
                queued: true,
            },
            tenant: Some(tenant.clone()),
            retry_after: Duration::from_millis(1_500),
        }));
        let blocked = Rejection::Blocked {
            tenant: tenant.clone(),
        };
        let metrics = Metrics::new();
        let series = record(|| {
            metrics.observe(
                &Event::new(LayerKind::ConcurrencyCap, Decision::Admitted, Some(&tenant))
                    .waited(Some(Duration::from_millis(250))),
            );
            metrics.observe(
                &Event::new(LayerKind::ConcurrencyCap, Decision::Shed, Some(&tenant))
                    .rejection(Some(&overloaded))
                    .waited(Some(Duration::from_secs(2))),
            );
            // Not refused: no retry delay. Refused without one: none either.
            metrics.observe(
                &Event::new(LayerKind::LoadShed, Decision::ShadowRejected, Some(&tenant))
                    .rejection(Some(&overloaded)),
            );
            metrics.observe(
                &Event::new(LayerKind::LoadShed, Decision::Blocked, Some(&tenant))
                    .rejection(Some(&blocked)),
            );
            for cost in [1, 7] {
                metrics.observe(
                    &Event::new(LayerKind::RateLimit, Decision::Admitted, Some(&tenant)).cost(cost),
                );
            }
            // Reported besides the decision: not recorded twice.
            metrics.observe(
                &Event::new(LayerKind::ConcurrencyCap, Decision::StoreFallback, Some(&tenant))
                    .waited(Some(Duration::from_secs(9))),
            );
            // Not a rate limit decision: no cost.
            metrics.observe(&Event::new(LayerKind::Coalesce, Decision::Coalesced, Some(&tenant)));
        });
        assert_eq!(
            histogram(&series, QUEUE_WAIT, "concurrency_cap"),
            [0.25, 2.0]
        );
        assert_eq!(
            histogram(&series, RETRY_AFTER, "concurrency_cap"),
            [1.5]
        );
        assert_eq!(histogram(&series, REQUEST_COST, "rate_limit"), [1.0, 7.0]);
        let histograms: BTreeSet<_> = series
            .iter()
            .filter(|s| s.kind == MetricKind::Histogram)
            .map(|s| (s.name.as_str(), s.labels.clone()))
            .collect();
        assert_eq!(histograms.len(), 3, "{histograms:?}");
        assert!(
            series
                .iter()
                .filter(|s| s.kind == MetricKind::Histogram)
                .all(|s| s.description.is_some())
        );
    }

    #[test]
    fn created_before_the_recorder_still_records() {
        let metrics = Metrics::new();
        let copy = metrics.clone();
        let tenant = TenantKey::from("acme");
        let event = Event::new(LayerKind::Purge, Decision::Batched, Some(&tenant));
        let series = record(|| {
            metrics.observe(&event);
            copy.observe(&event);
        });
        let expected = labels(&[("layer", "purge"), ("decision", "batched")]);
        assert_eq!(counters(&series).get(&expected), Some(&2));
    }
}
