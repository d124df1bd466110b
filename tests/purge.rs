//! The purge batcher against a fake backend that records every call and
//! its start and end time, on tokio's paused clock.

#![allow(clippy::expect_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::service_fn;
use tower_floodgate::TenantKey;
use tower_floodgate::purge::{
    BatchConfig, ItemResult, Mode, PurgeBatch, PurgeBatcher, PurgeOutcome, Target,
};

const RTT: Duration = Duration::from_millis(150);

#[derive(Debug, Clone)]
struct Call {
    batch: PurgeBatch,
    start: Instant,
    end: Instant,
}

type Answer = Arc<dyn Fn(&PurgeBatch) -> Vec<ItemResult> + Send + Sync>;

/// A backend taking `RTT` per call, answering with `answer`.
#[derive(Clone)]
struct Backend {
    calls: Arc<Mutex<Vec<Call>>>,
    answer: Answer,
}

impl Backend {
    fn new() -> Self {
        Self::answering(|b| vec![ItemResult::Purged; b.items.len()])
    }

    fn answering(answer: impl Fn(&PurgeBatch) -> Vec<ItemResult> + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::new(Mutex::new(Vec::new())),
            answer: Arc::new(answer),
        }
    }

    fn batcher(
        &self,
        config: BatchConfig,
    ) -> PurgeBatcher<
        impl tower::Service<PurgeBatch, Response = Vec<ItemResult>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
    > {
        let this = self.clone();
        PurgeBatcher::with_config(
            service_fn(move |batch: PurgeBatch| {
                let this = this.clone();
                async move {
                    let start = Instant::now();
                    tokio::time::sleep(RTT).await;
                    let results = (this.answer)(&batch);
                    this.calls.lock().expect("lock").push(Call {
                        batch,
                        start,
                        end: Instant::now(),
                    });
                    Ok::<_, Infallible>(results)
                }
            }),
            config,
        )
    }

    fn calls(&self) -> Vec<Call> {
        let mut calls = self.calls.lock().expect("lock").clone();
        calls.sort_by_key(|c| c.start);
        calls
    }
}

fn url(path: &str) -> Target {
    Target::url(&format!("https://cdn.example.com/{path}")).expect("url")
}

fn tenant(name: &str) -> TenantKey {
    TenantKey::from(name)
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_identical_purges_costs_one_call_per_round_trip() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());
    let started = Instant::now();
    // 10,000 identical purges over one second.
    let mut tasks = Vec::new();
    for i in 0..10_000u32 {
        let batcher = batcher.clone();
        let submitted = Instant::now();
        tasks.push(tokio::spawn(async move {
            let outcome = batcher
                .purge(tenant("acme"), url("hot.png"), Mode::Hard)
                .await;
            (submitted, outcome)
        }));
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let calls = backend.calls();
    // Every caller got a result.
    assert!(results.iter().all(|(_, o)| o.result == ItemResult::Purged));
    // At most two calls per round trip (in fact one: one in flight, one
    // pending).
    let round_trips = elapsed.as_millis() / RTT.as_millis() + 1;
    assert!(
        calls.len() as u128 <= 2 * round_trips,
        "{} calls over {round_trips} round trips",
        calls.len()
    );
    // Never two in flight at once for the target.
    for pair in calls.windows(2) {
        assert!(pair[1].start >= pair[0].end, "overlapping calls");
    }
    // Each request was answered by a call that started after it arrived.
    for (submitted, outcome) in &results {
        let call = calls
            .iter()
            .find(|c| c.batch.id == outcome.batch)
            .expect("its call");
        assert!(call.start >= *submitted);
    }
    let stats = batcher.stats();
    assert_eq!(stats.requests, 10_000);
    assert_eq!(stats.batches as usize, calls.len());
    assert_eq!(stats.coalesced, 10_000 - calls.len() as u64);
    assert_eq!((stats.pending, stats.in_flight), (0, 0));
    assert_eq!(batcher.tracked_tenants(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_purge_arriving_during_an_identical_one_gets_a_call_of_its_own_after_it() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());
    let first = tokio::spawn(batcher.purge(tenant("t"), url("a"), Mode::Hard));
    // Wait until the first one is in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(batcher.stats().in_flight, 1);
    let submitted = Instant::now();
    let second = batcher.purge(tenant("t"), url("a"), Mode::Hard);
    assert!(!second.is_coalesced());
    let second = second.await;
    let first = first.await.expect("task");
    assert_ne!(first.batch, second.batch);
    let calls = backend.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].start >= submitted);
    assert!(calls[1].start >= calls[0].end);
    assert!(!second.coalesced);
}

#[tokio::test(start_paused = true)]
async fn batches_respect_the_window_and_the_cap() {
    let backend = Backend::new();
    let window = Duration::from_millis(20);
    let batcher = backend.batcher(BatchConfig {
        window,
        max_items: 256,
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..300 {
        tasks.push(tokio::spawn(batcher.purge(
            tenant("t"),
            url(&format!("{i}")),
            Mode::Hard,
        )));
    }
    // A duplicate of a pending item is sent once (one of an item already in
    // flight would wait for its own call).
    tasks.push(tokio::spawn(batcher.purge(
        tenant("t"),
        url("270"),
        Mode::Hard,
    )));
    for task in tasks {
        assert_eq!(task.await.expect("task").result, ItemResult::Purged);
    }
    let calls = backend.calls();
    let sizes: Vec<usize> = calls.iter().map(|c| c.batch.items.len()).collect();
    assert_eq!(sizes, [256, 44]);
    // The full batch left at once; the rest when the window ended.
    assert_eq!(calls[0].start, started);
    assert_eq!(calls[1].start, started + window);
    let mut all: Vec<_> = calls.iter().flat_map(|c| c.batch.items.clone()).collect();
    all.sort_by(|a, b| a.target.cmp(&b.target));
    all.dedup();
    assert_eq!(all.len(), 300);
}

#[tokio::test(start_paused = true)]
async fn broader_purges_cover_pending_narrower_ones() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());

    // A pending prefix absorbs the pending URLs under it, and later URLs
    // under it join it; a URL elsewhere stays on its own.
    let a = tokio::spawn(batcher.purge(tenant("t"), url("img/a.png"), Mode::Hard));
    let b = tokio::spawn(batcher.purge(tenant("t"), url("css/b.css"), Mode::Hard));
    tokio::task::yield_now().await;
    let dir = Target::prefix("https://cdn.example.com/img/").expect("prefix");
    let p = tokio::spawn(batcher.purge(tenant("t"), dir.clone(), Mode::Hard));
    tokio::task::yield_now().await;
    let c = batcher.purge(tenant("t"), url("img/c.png"), Mode::Hard);
    assert!(c.is_coalesced());
    let (a, b, p, c) = (
        a.await.expect("task"),
        b.await.expect("task"),
        p.await.expect("task"),
        c.await,
    );
    assert!(a.coalesced && c.coalesced && !b.coalesced && !p.coalesced);
    let calls = backend.calls();
    assert_eq!(calls.len(), 1);
    let targets: Vec<Target> = calls[0]
        .batch
        .items
        .iter()
        .map(|i| i.target.clone())
        .collect();
    assert_eq!(targets.len(), 2);
    assert!(targets.contains(&dir) && targets.contains(&url("css/b.css")));

    // Everything supersedes every pending single purge.
    let singles: Vec<_> = ["x", "y", "z"]
        .iter()
        .map(|p| tokio::spawn(batcher.purge(tenant("t"), url(p), Mode::Soft)))
        .collect();
    let tag =
        tokio::spawn(batcher.purge(tenant("t"), Target::tag("news").expect("tag"), Mode::Hard));
    tokio::task::yield_now().await;
    let all = batcher
        .purge(tenant("t"), Target::Everything, Mode::Hard)
        .await;
    for single in singles {
        let outcome = single.await.expect("task");
        assert!(outcome.coalesced);
        assert_eq!(outcome.batch, all.batch);
    }
    assert!(tag.await.expect("task").coalesced);
    let calls = backend.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1]
            .batch
            .items
            .iter()
            .map(|i| &i.target)
            .collect::<Vec<_>>(),
        [&Target::Everything]
    );
}

#[tokio::test(start_paused = true)]
async fn soft_joins_hard_but_hard_never_joins_soft() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());
    let hard = tokio::spawn(batcher.purge(tenant("t"), url("a"), Mode::Hard));
    tokio::task::yield_now().await;
    let soft = batcher.purge(tenant("t"), url("a"), Mode::Soft);
    assert!(soft.is_coalesced());
    let (hard, soft) = (hard.await.expect("task"), soft.await);
    assert_eq!(hard.batch, soft.batch);

    // The other way round: the hard purge does not join the soft one; it
    // takes over the soft one's callers.
    let soft = tokio::spawn(batcher.purge(tenant("t"), url("b"), Mode::Soft));
    tokio::task::yield_now().await;
    let hard = batcher.purge(tenant("t"), url("b"), Mode::Hard);
    assert!(!hard.is_coalesced());
    let (soft, hard) = (soft.await.expect("task"), hard.await);
    assert!(soft.coalesced && !hard.coalesced);
    let calls = backend.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].batch.items.len(), 1);
    assert_eq!(calls[1].batch.items[0].mode, Mode::Hard);
}

#[tokio::test(start_paused = true)]
async fn tenants_are_never_merged() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());
    let (a, b) = tokio::join!(
        batcher.purge(tenant("a"), url("same.png"), Mode::Hard),
        batcher.purge(tenant("b"), url("same.png"), Mode::Hard),
    );
    assert!(!a.coalesced && !b.coalesced);
    assert_ne!(a.batch, b.batch);
    let calls = backend.calls();
    let mut tenants: Vec<_> = calls.iter().map(|c| c.batch.tenant.clone()).collect();
    tenants.sort();
    assert_eq!(tenants, [tenant("a"), tenant("b")]);
}

#[tokio::test(start_paused = true)]
async fn partial_failure_and_backend_rate_limits_reach_exactly_their_callers() {
    let backend = Backend::answering(|batch| {
        batch
            .items
            .iter()
            .map(|item| match &item.target {
                Target::Url(u) if u.ends_with("broken") => ItemResult::Failed("origin 500".into()),
                Target::Url(u) if u.ends_with("busy") => ItemResult::RateLimited {
                    retry_after: Duration::from_secs(7),
                },
                _ => ItemResult::Purged,
            })
            .collect()
    });
    let batcher = backend.batcher(BatchConfig::default());
    let (ok, broken, broken_too, busy) = tokio::join!(
        batcher.purge(tenant("t"), url("ok"), Mode::Hard),
        batcher.purge(tenant("t"), url("broken"), Mode::Hard),
        batcher.purge(tenant("t"), url("broken"), Mode::Soft),
        batcher.purge(tenant("t"), url("busy"), Mode::Hard),
    );
    assert_eq!(ok.result, ItemResult::Purged);
    assert_eq!(broken.result, ItemResult::Failed("origin 500".into()));
    assert_eq!(broken_too.result, broken.result);
    assert_eq!(
        busy.result,
        ItemResult::RateLimited {
            retry_after: Duration::from_secs(7)
        }
    );
    assert_eq!(backend.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn cancelled_callers_drop_their_unsent_item_but_not_a_shared_call() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig::default());
    // Everybody waiting for "gone" gives up before the window ends.
    let gone: Vec<_> = (0..3)
        .map(|_| tokio::spawn(batcher.purge(tenant("t"), url("gone"), Mode::Hard)))
        .collect();
    let kept = tokio::spawn(batcher.purge(tenant("t"), url("kept"), Mode::Hard));
    tokio::task::yield_now().await;
    for task in &gone {
        task.abort();
    }
    tokio::task::yield_now().await;
    assert_eq!(batcher.stats().abandoned, 1);
    kept.await.expect("task");
    let calls = backend.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].batch.items.len(), 1);
    assert_eq!(calls[0].batch.items[0].target, url("kept"));

    // The first caller of a purge others joined goes away once it is in
    // flight: the call goes on and the others get their answer.
    let leader = tokio::spawn(batcher.purge(tenant("t"), url("shared"), Mode::Hard));
    tokio::task::yield_now().await;
    let follower = tokio::spawn(batcher.purge(tenant("t"), url("shared"), Mode::Hard));
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    let outcome = follower.await.expect("task");
    assert_eq!(outcome.result, ItemResult::Purged);
    assert!(outcome.coalesced);
    // Everything gone: nobody waits, nothing left behind.
    let everyone_leaves = tokio::spawn(batcher.purge(tenant("u"), url("x"), Mode::Hard));
    tokio::task::yield_now().await;
    everyone_leaves.abort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.calls().len(), 2);
    assert_eq!(batcher.tracked_tenants(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backend_fails_every_waiter_and_leaves_nothing_behind() {
    let batcher = PurgeBatcher::new(service_fn(|batch: PurgeBatch| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if batch.items.iter().any(|i| i.target == Target::Everything) {
            panic!("backend bug");
        }
        Ok::<_, Infallible>(vec![ItemResult::Purged; batch.items.len()])
    }));
    let outcomes: Vec<PurgeOutcome> = futures_join_all(
        (0..50)
            .map(|_| batcher.purge(tenant("t"), Target::Everything, Mode::Hard))
            .collect(),
    )
    .await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(&o.result, ItemResult::Failed(r) if r.contains("panicked")))
    );
    assert_eq!(batcher.tracked_tenants(), 0);
    let stats = batcher.stats();
    assert_eq!((stats.pending, stats.in_flight), (0, 0));
    // The batcher still works afterwards.
    let ok = batcher.purge(tenant("t"), url("fine"), Mode::Hard).await;
    assert_eq!(ok.result, ItemResult::Purged);
}

#[tokio::test(start_paused = true)]
async fn backend_errors_fail_the_batch_with_the_reason() {
    let batcher = PurgeBatcher::new(service_fn(|_: PurgeBatch| async {
        Err::<Vec<ItemResult>, _>("503 from the CDN")
    }));
    let outcome = batcher.purge(tenant("t"), url("a"), Mode::Hard).await;
    assert_eq!(
        outcome.result,
        ItemResult::Failed("the purge backend failed: 503 from the CDN".into())
    );
    // A backend answering the wrong number of results fails the items too.
    let batcher = PurgeBatcher::new(service_fn(|_: PurgeBatch| async {
        Ok::<_, Infallible>(Vec::new())
    }));
    let outcome = batcher.purge(tenant("t"), url("a"), Mode::Hard).await;
    assert!(matches!(outcome.result, ItemResult::Failed(r) if r.contains("0 results for 1")));
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: Vec<F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

/// Each request is counted as coalesced once: a URL purge that joined a
/// pending one, and then both absorbed by a prefix, count two, not three.
#[tokio::test(start_paused = true)]
async fn absorbed_items_count_each_coalesced_request_once() {
    let backend = Backend::new();
    let batcher = backend.batcher(BatchConfig {
        window: Duration::from_millis(20),
        max_items: 256,
    });
    let prefix = Target::prefix("https://cdn.example.com/img/").expect("prefix");
    let tasks = [url("img/a.png"), url("img/a.png"), prefix]
        .into_iter()
        .map(|target| tokio::spawn(batcher.purge(tenant("t"), target, Mode::Hard)))
        .collect::<Vec<_>>();
    let mut coalesced = 0;
    for task in tasks {
        let outcome = task.await.expect("task");
        assert_eq!(outcome.result, ItemResult::Purged);
        coalesced += usize::from(outcome.coalesced);
    }
    let stats = batcher.stats();
    assert_eq!((stats.requests, stats.coalesced), (3, 2));
    assert_eq!(coalesced, 2);
    assert_eq!(backend.calls().len(), 1);
    assert_eq!(backend.calls()[0].batch.items.len(), 1);
}
