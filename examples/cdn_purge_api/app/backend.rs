//! A simulated purge backend with finite capacity: a fixed latency per call,
//! a number of calls it serves at once, and a budget of purged items a
//! second. Over either, it refuses the call at once with its own 429 and a
//! retry-after, as a CDN's purge service does.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tower::Service;
use tower_floodgate::purge::{BatchResponse, ItemResult, PurgeBatch};

/// The backend's capacity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackendConfig {
    /// How long each call takes.
    pub(crate) latency: Duration,
    /// Calls served at once.
    pub(crate) concurrency: usize,
    /// Items purged a second, over all calls (bursts of one second's worth).
    pub(crate) items_per_second: u32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(20),
            concurrency: 8,
            items_per_second: 2_000,
        }
    }
}

/// Counters of the backend.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct BackendStats {
    /// Calls received.
    pub(crate) calls: u64,
    /// Items purged.
    pub(crate) items_purged: u64,
    /// Calls refused for capacity (429).
    pub(crate) calls_refused: u64,
}

/// The backend; clones share it.
#[derive(Clone)]
pub(crate) struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    config: BackendConfig,
    slots: Arc<Semaphore>,
    /// Items that may be purged now, and when that was last topped up.
    bucket: Mutex<(f64, Instant)>,
    calls: AtomicU64,
    items: AtomicU64,
    refused: AtomicU64,
}

impl Backend {
    pub(crate) fn new(config: BackendConfig) -> Self {
        let config = BackendConfig {
            concurrency: config.concurrency.max(1),
            items_per_second: config.items_per_second.max(1),
            ..config
        };
        Self {
            inner: Arc::new(Inner {
                config,
                slots: Arc::new(Semaphore::new(config.concurrency)),
                bucket: Mutex::new((capacity(config.items_per_second), Instant::now())),
                calls: AtomicU64::new(0),
                items: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn stats(&self) -> BackendStats {
        let i = &self.inner;
        BackendStats {
            calls: i.calls.load(Ordering::Relaxed),
            items_purged: i.items.load(Ordering::Relaxed),
            calls_refused: i.refused.load(Ordering::Relaxed),
        }
    }

    /// Purges `batch`'s items, or refuses them all for capacity.
    pub(crate) async fn purge(&self, batch: PurgeBatch) -> BatchResponse {
        let inner = &self.inner;
        inner.calls.fetch_add(1, Ordering::Relaxed);
        let n = batch.items.len();
        let refuse = |retry_after: Duration| {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            vec![ItemResult::RateLimited { retry_after }; n]
        };
        let Ok(_slot) = Arc::clone(&inner.slots).try_acquire_owned() else {
            return refuse(inner.config.latency.max(Duration::from_millis(1)));
        };
        if let Err(wait) = inner.take_items(n) {
            return refuse(wait);
        }
        tokio::time::sleep(inner.config.latency).await;
        inner.items.fetch_add(n as u64, Ordering::Relaxed);
        vec![ItemResult::Purged; n]
    }
}

/// The most items the backend takes at once: a second's worth, and at
/// least a full batch (256 items), which a slower budget would otherwise
/// refuse for ever.
fn capacity(items_per_second: u32) -> f64 {
    f64::from(items_per_second).max(256.0)
}

impl Inner {
    /// Takes `n` items from the budget, or says how long until there are
    /// enough.
    fn take_items(&self, n: usize) -> Result<(), Duration> {
        let rate = f64::from(self.config.items_per_second);
        let mut bucket = self.bucket.lock();
        let now = Instant::now();
        let (tokens, last) = *bucket;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate)
            .min(capacity(self.config.items_per_second));
        let need = n as f64;
        if tokens >= need {
            *bucket = (tokens - need, now);
            Ok(())
        } else {
            *bucket = (tokens, now);
            Err(Duration::from_secs_f64((need - tokens) / rate))
        }
    }
}

impl Service<PurgeBatch> for Backend {
    type Response = BatchResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<BatchResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: PurgeBatch) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.purge(batch).await) })
    }
}
