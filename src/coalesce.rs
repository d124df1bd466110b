//! Request coalescing ("singleflight") for HTTP services.
//!
//! [`CoalesceLayer`] lets identical requests share one call to the inner
//! service. Requests are identical when their key is: by default the
//! tenant, the method, the URI and the body. The tenant is what the layer's
//! [`tenant`](CoalesceLayer::tenant) extractor finds (the same one the rate
//! limit uses, say), or else a [`TenantKey`] request extension put there by
//! an earlier layer; a request without a tenant is never coalesced, so no
//! response is ever shared between tenants. Two modes:
//!
//! * [`JoinMode::InFlight`], for reads: a request joins a call already
//!   running.
//! * [`JoinMode::Next`], for writes and purges: a request may only join a
//!   call that has **not started yet**, so the call happens after every
//!   request it answers. Per key there is at most one call running and one
//!   waiting to start (when the running one ends).
//!
//! The shared response is buffered (up to `max_body`, default 64 KiB) and
//! cloned to every waiter (so the inner service's response body must be
//! `Unpin`, as axum's, hyper's and tonic's are). Requests whose body is not known to fit
//! (`Content-Length` over the limit, or absent with a streaming body) are
//! not coalesced. A response over the limit goes to the request that made
//! the call; the others then make their own calls.
//!
//! The shared call runs in a task of its own: the caller that started it
//! going away does not cancel it. If it fails or panics, every waiter gets
//! `500` with an `application/problem+json` body, never a hang, and its
//! entry is gone. A call waiting to start that every caller gave up on is
//! dropped without being made.
//!
//! ```
//! use axum::{routing::post, Router};
//! use http::HeaderName;
//! use tower_floodgate::coalesce::{CoalesceLayer, JoinMode};
//! use tower_floodgate::key;
//!
//! let tenant = key::header(HeaderName::from_static("x-tenant-id"));
//! let app: Router = Router::new()
//!     .route("/v1/purge", post(|body: String| async move { format!("purged {body}") }))
//!     .layer(CoalesceLayer::new(JoinMode::Next).tenant(tenant));
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use crate::key::{KeyExtractor, TenantKey};
use crate::observe::{Decision, Event, Hook, LayerKind, Observer};
use crate::response::{BoxedBody, ResponseBody};
use crate::sync::Mutex;

/// The default limit on buffered request and response bodies.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Which calls a request may join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMode {
    /// Join a call already running (for reads).
    InFlight,
    /// Join only a call not started yet (for writes and purges).
    Next,
}

/// Decides which requests are the same. Implemented for closures over the
/// request head and its buffered body.
pub trait CoalesceKey {
    /// The key of a request; `None` never coalesces it.
    fn key(&self, parts: &http::request::Parts, body: &Bytes) -> Option<Vec<u8>>;
}

/// Tenant, method, URI and body. The default. The tenant is the request's
/// [`TenantKey`] extension (which the layer's
/// [`tenant`](CoalesceLayer::tenant) extractor puts there); a request
/// without one is not coalesced.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultKey;

impl CoalesceKey for DefaultKey {
    fn key(&self, parts: &http::request::Parts, body: &Bytes) -> Option<Vec<u8>> {
        let tenant = parts.extensions.get::<TenantKey>()?.as_bytes();
        let uri = parts.uri.to_string();
        let method = parts.method.as_str();
        let mut key = Vec::with_capacity(tenant.len() + method.len() + uri.len() + body.len() + 24);
        for field in [tenant, method.as_bytes(), uri.as_bytes(), body] {
            key.extend_from_slice(&(field.len() as u64).to_le_bytes());
            key.extend_from_slice(field);
        }
        Some(key)
    }
}

/// Where [`CoalesceLayer`] finds a request's tenant, which it stores as the
/// request's [`TenantKey`] extension before the key is taken.
pub trait TenantSource<Req> {
    /// The tenant of `req`, to store; `None` leaves the request as it is.
    fn tenant(&self, req: &Req) -> Option<TenantKey>;
}

/// The tenant is a [`TenantKey`] extension an earlier layer put there, if
/// any. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtensionTenant;

impl<Req> TenantSource<Req> for ExtensionTenant {
    fn tenant(&self, _req: &Req) -> Option<TenantKey> {
        None
    }
}

/// The tenant is what a [`KeyExtractor`] finds; see
/// [`CoalesceLayer::tenant`].
#[derive(Debug, Clone, Copy)]
pub struct ExtractedTenant<E>(E);

impl<E: KeyExtractor<Req>, Req> TenantSource<Req> for ExtractedTenant<E> {
    fn tenant(&self, req: &Req) -> Option<TenantKey> {
        self.0.extract(req).ok()
    }
}

impl<F> CoalesceKey for F
where
    F: Fn(&http::request::Parts, &Bytes) -> Option<Vec<u8>>,
{
    fn key(&self, parts: &http::request::Parts, body: &Bytes) -> Option<Vec<u8>> {
        self(parts, body)
    }
}

/// Coalesces identical requests. See the [module docs](self).
#[derive(Clone)]
pub struct CoalesceLayer<K = DefaultKey, T = ExtensionTenant> {
    key: K,
    tenant: T,
    mode: JoinMode,
    max_body: usize,
    stats: Arc<Counters>,
    observer: Hook,
}

impl CoalesceLayer {
    /// Coalesces requests with the same tenant, method, URI and body.
    #[must_use]
    pub fn new(mode: JoinMode) -> Self {
        Self {
            key: DefaultKey,
            tenant: ExtensionTenant,
            mode,
            max_body: DEFAULT_MAX_BODY,
            stats: Arc::default(),
            observer: Hook::default(),
        }
    }
}

impl<K, T> CoalesceLayer<K, T> {
    /// Decides which requests are the same with `key`.
    #[must_use]
    pub fn key<K2>(self, key: K2) -> CoalesceLayer<K2, T> {
        CoalesceLayer {
            key,
            tenant: self.tenant,
            mode: self.mode,
            max_body: self.max_body,
            stats: self.stats,
            observer: self.observer,
        }
    }

    /// Finds each request's tenant with `extractor` (the one the rate limit
    /// uses, say) and stores it as the request's [`TenantKey`] extension,
    /// which the default key, the observer and the inner service read. A
    /// request it finds no tenant in is not coalesced by the default key.
    #[must_use]
    pub fn tenant<E>(self, extractor: E) -> CoalesceLayer<K, ExtractedTenant<E>> {
        CoalesceLayer {
            key: self.key,
            tenant: ExtractedTenant(extractor),
            mode: self.mode,
            max_body: self.max_body,
            stats: self.stats,
            observer: self.observer,
        }
    }

    /// The largest request and response bodies buffered (default
    /// [`DEFAULT_MAX_BODY`]).
    #[must_use]
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Reports each request to `observer` (see [`observe`](crate::observe)):
    /// [`Decision::Coalesced`] when it joins another's call,
    /// [`Decision::Admitted`] when it makes its own. The tenant is the
    /// request's [`TenantKey`] extension, if it has one.
    #[must_use]
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Hook::new(observer);
        self
    }

    /// Counters, shared by every service made by this layer and its clones.
    #[must_use]
    pub fn stats(&self) -> CoalesceStats {
        self.stats.snapshot()
    }

    /// What [`stats`](Self::stats) reads, for a dashboard.
    pub(crate) fn stats_source(&self) -> impl Fn() -> CoalesceStats + Send + Sync + 'static {
        let stats = Arc::clone(&self.stats);
        move || stats.snapshot()
    }
}

impl<K: fmt::Debug> fmt::Debug for CoalesceLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("key", &self.key)
            .field("mode", &self.mode)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// Counters of a [`CoalesceLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CoalesceStats {
    /// Requests seen.
    pub requests: u64,
    /// Calls made to the inner service for coalescable requests.
    pub calls: u64,
    /// Requests answered by a call another request started or joined.
    pub coalesced: u64,
    /// Requests passed through without coalescing (no key, or a body that
    /// is too large or of unknown size).
    pub bypassed: u64,
    /// Requests that had to make their own call because the shared
    /// response was too large to share.
    pub fallbacks: u64,
    /// Calls waiting to start that every caller gave up on.
    pub abandoned: u64,
    /// Keys with a call running or waiting now.
    pub active_keys: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    calls: AtomicU64,
    coalesced: AtomicU64,
    bypassed: AtomicU64,
    fallbacks: AtomicU64,
    abandoned: AtomicU64,
    active: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> CoalesceStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CoalesceStats {
            requests: get(&self.requests),
            calls: get(&self.calls),
            coalesced: get(&self.coalesced),
            bypassed: get(&self.bypassed),
            fallbacks: get(&self.fallbacks),
            abandoned: get(&self.abandoned),
            active_keys: get(&self.active),
        }
    }
}

/// A response buffered to be shared.
struct Buffered {
    status: StatusCode,
    version: http::Version,
    headers: http::HeaderMap,
    body: Bytes,
}

/// What a waiter receives.
enum Delivery {
    /// The shared response.
    Shared(Arc<Buffered>),
    /// The response itself, too large to share, for the request that made
    /// the call: `(Parts, Bytes, ResB)`, the buffered start and the rest.
    Own(Box<dyn Any + Send>),
    /// Too large to share: make your own call.
    Alone,
    /// The call failed or panicked.
    Failed(String),
}

type WaiterId = u64;

struct WaiterSlot {
    id: WaiterId,
    tx: oneshot::Sender<Delivery>,
}

/// Starts a call, given where to report.
type Start = Box<dyn FnOnce(Arc<Flights>, Vec<u8>) + Send>;

/// A call not started yet (`JoinMode::Next`).
struct Next {
    waiters: Vec<WaiterSlot>,
    owner: WaiterId,
    start: Start,
}

#[derive(Default)]
struct Flight {
    running: Option<Vec<WaiterSlot>>,
    /// Who the running call's request came from.
    owner: WaiterId,
    next: Option<Next>,
}

struct Flights {
    keys: Mutex<HashMap<Vec<u8>, Flight>>,
    stats: Arc<Counters>,
    next_id: AtomicU64,
}

impl Flights {
    /// Delivers the outcome of the call running for `key`, then starts the
    /// one waiting, if any.
    fn finish(self: &Arc<Self>, key: &[u8], outcome: Outcome) {
        let mut keys = self.keys.lock();
        let Some(flight) = keys.get_mut(key) else {
            return;
        };
        let waiters = flight.running.take().unwrap_or_default();
        let owner = flight.owner;
        match outcome {
            Outcome::Shared(buffered) => {
                let buffered = Arc::new(buffered);
                for waiter in waiters {
                    let _ = waiter.tx.send(Delivery::Shared(Arc::clone(&buffered)));
                }
            }
            Outcome::TooLarge(own) => {
                let mut own = Some(own);
                for waiter in waiters {
                    let delivery = match own.take_if(|_| waiter.id == owner) {
                        Some(own) => Delivery::Own(own),
                        None => {
                            self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                target: "tower_floodgate::coalesce",
                                "the shared response is too large to share; calling alone"
                            );
                            Delivery::Alone
                        }
                    };
                    let _ = waiter.tx.send(delivery);
                }
            }
            Outcome::Failed(reason) => {
                tracing::warn!(
                    target: "tower_floodgate::coalesce",
                    waiters = waiters.len(),
                    "a shared call failed: {reason}"
                );
                for waiter in waiters {
                    let _ = waiter.tx.send(Delivery::Failed(reason.clone()));
                }
            }
        }
        match flight.next.take() {
            Some(next) => {
                flight.running = Some(next.waiters);
                flight.owner = next.owner;
                drop(keys);
                (next.start)(Arc::clone(self), key.to_vec());
            }
            None => {
                keys.remove(key);
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// A waiter of `key` went away.
    fn withdraw(&self, key: &[u8], waiter: WaiterId) {
        let mut keys = self.keys.lock();
        let Some(flight) = keys.get_mut(key) else {
            return;
        };
        if let Some(next) = &mut flight.next {
            next.waiters.retain(|w| w.id != waiter);
            if next.waiters.is_empty() {
                flight.next = None;
                self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(running) = &mut flight.running {
            running.retain(|w| w.id != waiter);
        }
        if flight.running.is_none() && flight.next.is_none() {
            keys.remove(key);
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How a shared call ended.
enum Outcome {
    Shared(Buffered),
    TooLarge(Box<dyn Any + Send>),
    Failed(String),
}

/// Reports a call's outcome when its task ends, whatever ends it: if the
/// inner service panics, the drop reports a failure, so nobody hangs and
/// the entry goes.
struct CallGuard {
    flights: Arc<Flights>,
    key: Vec<u8>,
    outcome: Option<Outcome>,
}

impl CallGuard {
    fn done(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Outcome::Failed("the shared call panicked".to_owned()));
        self.flights.finish(&self.key, outcome);
    }
}

/// The service made by [`CoalesceLayer`].
///
/// The inner service must be `Clone`: each request takes the instance that
/// was made ready for it (the shared call, or its own call if it cannot
/// share), and leaves a clone in its place.
pub struct Coalesce<S, K, T = ExtensionTenant> {
    inner: S,
    key: K,
    tenant: T,
    mode: JoinMode,
    max_body: usize,
    flights: Arc<Flights>,
    observer: Hook,
}

impl<S: Clone, K: Clone, T: Clone> Clone for Coalesce<S, K, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            tenant: self.tenant.clone(),
            mode: self.mode,
            max_body: self.max_body,
            flights: Arc::clone(&self.flights),
            observer: self.observer.clone(),
        }
    }
}

impl<S: fmt::Debug, K, T> fmt::Debug for Coalesce<S, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S, K, T> Layer<S> for CoalesceLayer<K, T>
where
    K: Clone,
    T: Clone,
{
    type Service = Coalesce<S, K, T>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce {
            inner,
            key: self.key.clone(),
            tenant: self.tenant.clone(),
            mode: self.mode,
            max_body: self.max_body,
            // Calls in flight are per service: axum makes one per route,
            // and strips a nested router's prefix from the URI the key
            // reads, so two routes' requests must never share a call.
            flights: Arc::new(Flights {
                keys: Mutex::new(HashMap::new()),
                stats: Arc::clone(&self.stats),
                next_id: AtomicU64::new(1),
            }),
            observer: self.observer.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, K, T, ReqB, ResB> Service<Request<ReqB>> for Coalesce<S, K, T>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Display + Send,
    K: CoalesceKey + Clone + Send + 'static,
    T: TenantSource<Request<ReqB>>,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: fmt::Display,
    ResB: BoxedBody + Unpin,
    ResB::Error: fmt::Display,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        if let Some(tenant) = self.tenant.tenant(&req) {
            req.extensions_mut().insert(tenant);
        }
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        let key = self.key.clone();
        let (mode, max_body) = (self.mode, self.max_body);
        let flights = Arc::clone(&self.flights);
        let observer = self.observer.clone();
        let report = move |decision: Decision, tenant: Option<&TenantKey>| {
            observer.emit(|| Event::new(LayerKind::Coalesce, decision, tenant));
        };
        Box::pin(async move {
            let stats = &flights.stats;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let fits = req
                .body()
                .size_hint()
                .upper()
                .is_some_and(|n| n <= max_body as u64);
            if !fits {
                stats.bypassed.fetch_add(1, Ordering::Relaxed);
                report(Decision::Admitted, req.extensions().get::<TenantKey>());
                return service.call(req).await;
            }
            let (parts, body) = req.into_parts();
            let body = match collect(body, max_body).await {
                Ok(body) => body,
                Err(reason) => return Ok(problem(StatusCode::BAD_REQUEST, &reason)),
            };
            let Some(key) = key.key(&parts, &body) else {
                stats.bypassed.fetch_add(1, Ordering::Relaxed);
                report(Decision::Admitted, parts.extensions.get::<TenantKey>());
                let req = Request::from_parts(parts, ReqB::from(body));
                return service.call(req).await;
            };
            let me = flights.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let slot = WaiterSlot { id: me, tx };
            // Our own copy, in case we must make our own call.
            let own_parts = parts.clone();
            let tenant = parts.extensions.get::<TenantKey>().cloned();
            let request = Request::from_parts(parts, ReqB::from(body.clone()));
            let mut service = Some(service);
            let mut joined = false;
            let start: Option<Start> = {
                let mut keys = flights.keys.lock();
                let flight = keys.entry(key.clone()).or_insert_with(|| {
                    stats.active.fetch_add(1, Ordering::Relaxed);
                    Flight::default()
                });
                match (mode, &mut flight.running, &mut flight.next) {
                    (JoinMode::Next, Some(_), Some(next)) | (JoinMode::Next, None, Some(next)) => {
                        stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        next.waiters.push(slot);
                        joined = true;
                        None
                    }
                    (JoinMode::InFlight, Some(running), _) => {
                        stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        running.push(slot);
                        joined = true;
                        None
                    }
                    (JoinMode::Next, Some(_), next @ None) => {
                        // A call is running: ours starts when it ends.
                        let svc = service.take();
                        *next = Some(Next {
                            waiters: vec![slot],
                            owner: me,
                            start: Box::new(move |flights, key| {
                                if let Some(svc) = svc {
                                    spawn_call(flights, key, svc, request, max_body);
                                }
                            }),
                        });
                        None
                    }
                    (_, running @ None, _) => {
                        *running = Some(vec![slot]);
                        flight.owner = me;
                        let svc = service.take();
                        Some(Box::new(move |flights, key| {
                            if let Some(svc) = svc {
                                spawn_call(flights, key, svc, request, max_body);
                            }
                        }))
                    }
                }
            };
            report(
                if joined {
                    Decision::Coalesced
                } else {
                    Decision::Admitted
                },
                tenant.as_ref(),
            );
            if let Some(start) = start {
                start(Arc::clone(&flights), key.clone());
            }
            let waiting = Waiting {
                flights: Arc::clone(&flights),
                key,
                me,
                done: false,
            };
            let delivery = rx.await;
            waiting.finish();
            match delivery {
                Ok(Delivery::Shared(buffered)) => Ok(shared_response(&buffered)),
                Ok(Delivery::Own(own)) => match own.downcast::<(http::response::Parts, Bytes, ResB)>() {
                    Ok(own) => {
                        let (parts, start, rest) = *own;
                        let body = ResB::boxed(ResponseBody::prefixed(start, rest));
                        Ok(Response::from_parts(parts, body))
                    }
                    Err(_) => Ok(problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the shared response could not be handed over",
                    )),
                },
                Ok(Delivery::Alone) => match service {
                    Some(mut service) => {
                        let req = Request::from_parts(own_parts, ReqB::from(body));
                        Ok(service.call(req).await?)
                    }
                    None => Ok(problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the shared response was too large to share",
                    )),
                },
                Ok(Delivery::Failed(reason)) => {
                    Ok(problem(StatusCode::INTERNAL_SERVER_ERROR, &reason))
                }
                Err(_) => Ok(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the shared call went away",
                )),
            }
        })
    }
}

/// Withdraws a waiter whose future is dropped before its delivery.
struct Waiting {
    flights: Arc<Flights>,
    key: Vec<u8>,
    me: WaiterId,
    done: bool,
}

impl Waiting {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            self.flights.withdraw(&self.key, self.me);
        }
    }
}

fn spawn_call<S, ReqB, ResB>(
    flights: Arc<Flights>,
    key: Vec<u8>,
    mut service: S,
    request: Request<ReqB>,
    max_body: usize,
) where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Display + Send,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + Unpin + 'static,
    ResB::Error: fmt::Display,
{
    flights.stats.calls.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(target: "tower_floodgate::coalesce", "starting a shared call");
    let guard = CallGuard {
        flights,
        key,
        outcome: None,
    };
    // The service was made ready for this request before it was taken.
    let call = service.call(request);
    tokio::spawn(async move {
        let outcome = match call.await {
            Ok(response) => buffer(response, max_body).await,
            Err(e) => Outcome::Failed(format!("the shared call failed: {e}")),
        };
        guard.done(outcome);
    });
}

/// Reads `response`'s body if it fits in `max_body`.
async fn buffer<ResB>(response: Response<ResB>, max_body: usize) -> Outcome
where
    ResB: Body<Data = Bytes> + Send + Unpin + 'static,
    ResB::Error: fmt::Display,
{
    let (parts, mut body) = response.into_parts();
    let mut buf = BytesMut::new();
    if body.size_hint().lower() > max_body as u64 {
        return Outcome::TooLarge(Box::new((parts, Bytes::new(), body)));
    }
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Err(e)) => return Outcome::Failed(format!("the shared response body failed: {e}")),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > max_body {
                        return Outcome::TooLarge(Box::new((parts, buf.freeze(), body)));
                    }
                }
            }
        }
    }
    Outcome::Shared(Buffered {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: buf.freeze(),
    })
}

/// Reads a request body known to fit in `max_body`.
async fn collect<B>(body: B, max_body: usize) -> Result<Bytes, String>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("the request body could not be read: {e}"))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max_body {
                return Err("the request body is larger than it said".to_owned());
            }
        }
    }
    Ok(buf.freeze())
}

fn shared_response<B: BoxedBody>(buffered: &Buffered) -> Response<B> {
    let mut response = Response::new(B::boxed(ResponseBody::full(buffered.body.clone())));
    *response.status_mut() = buffered.status;
    *response.version_mut() = buffered.version;
    *response.headers_mut() = buffered.headers.clone();
    response
}

fn problem<B: BoxedBody>(status: StatusCode, detail: &str) -> Response<B> {
    let body = format!(
        "{{\"type\":\"about:blank\",\"title\":{},\"status\":{},\"detail\":{}}}",
        json(status.canonical_reason().unwrap_or("Error")),
        status.as_u16(),
        json(detail)
    );
    let mut response = Response::new(B::boxed(ResponseBody::full(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    crate::response::json_string(&mut out, s);
    out
}
