//! The least a full stack can cost in axum: a reference for the HTTP
//! bench (`minimal`), not a limiter anyone should use.
//!
//! It makes the four counts of a rate limit, a concurrency cap per tenant
//! and global, and a fair shedder (a compare-and-swap each, and the
//! shedder's active-tenant count), and holds them in the response body
//! until it is sent, as `FloodgateLayer` does. Everything else the crate
//! does is left out: no policy (one plan, no tiers, overrides or blocks, no
//! run-time changes), no key rules (a missing key is the empty key), no
//! tenant identity (4,096 buckets by hash, so tenants collide), no priority,
//! ceilings, queues, clock choice, shadow mode, observers, or refusals (a
//! request over a limit goes through uncounted). What `FloodgateLayer` costs
//! over it is what those features cost.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;

const BUCKETS: usize = 4096;
const LIMIT: u64 = 1 << 20;

pub(crate) struct State {
    tats: Box<[AtomicU64]>,
    seats: Box<[AtomicU64]>,
    fair: Box<[AtomicU64]>,
    global: AtomicU64,
    shed: AtomicU64,
    active: AtomicU64,
    clock: quanta::Clock,
    start: u64,
    hasher: foldhash::quality::FixedState,
}

fn counters() -> Box<[AtomicU64]> {
    (0..BUCKETS).map(|_| AtomicU64::new(0)).collect()
}

/// The layer.
#[derive(Clone)]
pub(crate) struct MinimalLayer(Arc<State>);

impl MinimalLayer {
    pub(crate) fn new() -> Self {
        let clock = quanta::Clock::new();
        let start = clock.raw();
        Self(Arc::new(State {
            tats: counters(),
            seats: counters(),
            fair: counters(),
            global: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            active: AtomicU64::new(0),
            clock,
            start,
            hasher: foldhash::quality::FixedState::with_seed(7),
        }))
    }
}

impl<S> tower::Layer<S> for MinimalLayer {
    type Service = Minimal<S>;

    fn layer(&self, inner: S) -> Minimal<S> {
        Minimal {
            inner,
            state: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Minimal<S> {
    inner: S,
    state: Arc<State>,
}

/// One unit more, below `cap`.
fn take(word: &AtomicU64, cap: u64) -> bool {
    let mut current = word.load(Ordering::Acquire);
    while current < cap {
        match word.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return true,
            Err(actual) => current = actual,
        }
    }
    false
}

/// One unit less; the count before.
fn give(word: &AtomicU64) -> u64 {
    let mut current = word.load(Ordering::Acquire);
    while current > 0 {
        match word.compare_exchange_weak(current, current - 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return current,
            Err(actual) => current = actual,
        }
    }
    0
}

pub(crate) struct Guard {
    state: Arc<State>,
    bucket: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &*self.state;
        give(&s.shed);
        if give(&s.fair[self.bucket]) == 1 {
            s.active.fetch_sub(1, Ordering::Relaxed);
        }
        give(&s.global);
        give(&s.seats[self.bucket]);
    }
}

impl<S> tower::Service<Request<Body>> for Minimal<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = MinimalFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(never)]
    fn call(&mut self, req: Request<Body>) -> MinimalFuture<S::Future> {
        let s = &*self.state;
        let key = req
            .headers()
            .get(crate::support::TENANT)
            .map_or(&b""[..], |v| v.as_bytes());
        let mut hasher = s.hasher.build_hasher();
        hasher.write(key);
        let bucket = hasher.finish() as usize % BUCKETS;
        // GCRA: a unit a nanosecond, a burst of a second.
        let now = s.clock.delta_as_nanos(s.start, s.clock.raw());
        let tat = &s.tats[bucket];
        let mut current = tat.load(Ordering::Acquire);
        let admitted = loop {
            let next = current.max(now) + 1;
            if next.saturating_sub(1_000_000_000) > now {
                break false;
            }
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break true,
                Err(actual) => current = actual,
            }
        };
        let guard = (admitted
            && take(&s.seats[bucket], LIMIT)
            && take(&s.global, LIMIT)
            && take(&s.shed, LIMIT))
        .then(|| {
            if s.fair[bucket].fetch_add(1, Ordering::AcqRel) == 0 {
                s.active.fetch_add(1, Ordering::Relaxed);
            }
            Guard {
                state: Arc::clone(&self.state),
                bucket,
            }
        });
        MinimalFuture {
            future: self.inner.call(req),
            guard,
        }
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct MinimalFuture<F> {
        #[pin]
        future: F,
        guard: Option<Guard>,
    }
}

impl<F, E> Future for MinimalFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| {
            Body::new(UnsyncBoxBody::new(GuardedBody { body, guard }))
        })))
    }
}

pin_project_lite::pin_project! {
    /// The response body, holding the units until it is done.
    struct GuardedBody {
        #[pin]
        body: Body,
        guard: Option<Guard>,
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            this.guard.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
