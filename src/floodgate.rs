//! The rate limit, the concurrency cap and the load shedder as one layer.
//!
//! Stacked as three layers, each finds the tenant again, wraps the response
//! future and the response body once more, and moves the request and the
//! response through its own code. [`FloodgateLayer`] makes the same three
//! decisions, in the same order and with the same settings, counters,
//! observers and shadow modes as the layers it is built from, but finds the
//! tenant once and holds both permits in one future and one body.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::common::Extracted;
use crate::concurrency::{self, ConcurrencyCapLayer};
use crate::cost::{RequestCost, UnitCost};
use crate::error::Rejection;
use crate::held::hold;
use crate::key::KeyExtractor;
use crate::hash::tenant_hash;
use crate::limiter::Denied;
use crate::policy::Plan;
use crate::rate_limit::{self, RateLimitLayer, Rated, SuccessHeaders};
use crate::response::{self, BoxedBody, after_completion, is_grpc, rejection_response};
use crate::shed::priority::FromExtension;
use crate::shed::{self, LoadShedLayer, PriorityExtractor};

/// What every service of a [`FloodgateLayer`] shares.
struct Parts<K, C, P> {
    key: K,
    rate: Arc<rate_limit::Shared<K, C>>,
    cap: Arc<concurrency::Shared<K>>,
    shed: Arc<shed::Shared<K, P>>,
    /// Where the units of admitted requests go back to.
    runtimes: Arc<Runtimes>,
    /// Whether the three layers share one policy and the limiter is in
    /// memory, so that the common case can look the plan up once and decide
    /// without a round trip ([`Parts::fast`]).
    one_policy: bool,
    /// The longest key both the rate limit and the concurrency cap accept.
    max_key_len: usize,
}

/// The concurrency cap's and the shedder's state, which an admitted
/// request's [`Guard`] returns its units to.
struct Runtimes {
    cap: Arc<concurrency::Runtime>,
    shed: Arc<shed::Runtime>,
}

/// What a request admitted by a [`FloodgateLayer`] holds while in flight:
/// its units of the concurrency cap and of the shedder, returned (the
/// shedder's first, as two stacked layers would) when it is dropped.
pub(crate) struct Guard {
    runtimes: Arc<Runtimes>,
    cap: concurrency::Held,
    shed: shed::Held,
}

impl Guard {
    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.cap.is_empty() && self.shed.is_empty()
    }

    /// The response head is ready (the shedder measures latency to it).
    #[inline]
    pub(crate) fn responded(&self) {
        self.shed.responded(&self.runtimes.shed);
    }

    /// Takes the shedder's units too (it held none of them).
    #[inline]
    fn hold_shed(&mut self, shed: shed::Held) {
        debug_assert!(self.shed.is_empty(), "the shedder's units taken twice");
        self.shed = shed;
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        self.shed.release(&self.runtimes.shed);
        self.cap.release(&self.runtimes.cap);
    }
}

/// The rate limit, the concurrency cap and the load shedder in one layer.
///
/// It decides exactly as `ServiceBuilder::new().layer(rate).layer(cap)
/// .layer(shed)` would, with the settings, counters, observers and shadow
/// modes of the three layers it is built from (their `stats()` count its
/// decisions too), except that it finds and hashes the tenant once, with
/// `key` (which, if it lends the key's bytes, is asked for the key itself
/// too when a request is refused, to report it), and keeps both permits in
/// one guard in the response body. The
/// three layers' own key extractors are not used; their key rules (a
/// missing key, the longest key) are. When the three share one
/// [`PolicyHandle`](crate::PolicyHandle) and the limiter is in memory, the
/// common case (no observer or shadow mode, every decision an admission)
/// looks the tenant's plan up once for all three. In an axum hello-world
/// server this costs 40% less a request than the three layers stacked
/// (2,363 against 3,952 instructions over bare; `BENCHMARKS.md`).
///
/// A request that must wait (for Redis' verdict, in the concurrency cap's
/// queue or the shedder's) waits in a boxed future, so the inner service,
/// its future and its bodies must be `Send + 'static`, as they are in axum
/// and tonic.
///
/// ```
/// use std::num::NonZeroU32;
/// use axum::{routing::get, Router};
/// use http::HeaderName;
/// use tower_floodgate::shed::{Limit, LoadShedLayer};
/// use tower_floodgate::{
///     key, ConcurrencyCapLayer, FloodgateLayer, Plan, PolicyHandle, Quota, RateLimitLayer,
///     RateLimiter,
/// };
///
/// let policy = PolicyHandle::from(
///     Plan::new("standard")
///         .rate(Quota::per_second(NonZeroU32::new(100).unwrap()))
///         .concurrency(8),
/// );
/// let rate = RateLimitLayer::new(RateLimiter::new(policy.clone()));
/// let cap = ConcurrencyCapLayer::new(policy.clone()).global_limit(512);
/// let shed = LoadShedLayer::new(Limit::fixed(256)).policy(policy);
/// let tenant = key::header(HeaderName::from_static("x-tenant-id"));
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(FloodgateLayer::new(tenant, &rate, &cap, &shed));
/// // `rate.stats()`, `cap.stats()` and `shed.stats()` count its decisions.
/// ```
pub struct FloodgateLayer<K, C = UnitCost, P = FromExtension> {
    parts: Arc<Parts<K, C, P>>,
}

impl<K: Clone> FloodgateLayer<K> {
    /// The three decisions of `rate`, `cap` and `shed`, in that order, for
    /// the tenant `key` finds.
    pub fn new<K1, C: Clone, K2, K3, P: Clone>(
        key: K,
        rate: &RateLimitLayer<K1, C>,
        cap: &ConcurrencyCapLayer<K2>,
        shed: &LoadShedLayer<K3, P>,
    ) -> FloodgateLayer<K, C, P> {
        let policy = rate.limiter().policy();
        let one_policy = !rate.limiter().is_remote()
            && policy.same_as(cap.policy())
            && policy.same_as(shed.policy_handle());
        let rate = rate.shared_with(key.clone(), rate.cost_extractor().clone());
        let cap = cap.shared_with(key.clone());
        let shed = shed.shared_with(key.clone(), shed.priority_extractor().clone());
        FloodgateLayer {
            parts: Arc::new(Parts {
                one_policy,
                max_key_len: rate.key_rules().max_len.min(cap.key_rules().max_len),
                runtimes: Arc::new(Runtimes {
                    cap: Arc::clone(cap.runtime()),
                    shed: Arc::clone(shed.runtime()),
                }),
                rate,
                cap,
                shed,
                key,
            }),
        }
    }
}

impl<K, C, P> Clone for FloodgateLayer<K, C, P> {
    fn clone(&self) -> Self {
        Self {
            parts: Arc::clone(&self.parts),
        }
    }
}

impl<K, C, P> fmt::Debug for FloodgateLayer<K, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FloodgateLayer").finish_non_exhaustive()
    }
}

impl<S, K, C, P> Layer<S> for FloodgateLayer<K, C, P> {
    type Service = Floodgate<S, K, C, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Floodgate {
            inner,
            parts: Arc::clone(&self.parts),
        }
    }
}

/// The service made by [`FloodgateLayer`].
///
/// The inner service must be `Clone`: a request that waits takes the
/// instance made ready for it and leaves a clone in its place.
pub struct Floodgate<S, K, C = UnitCost, P = FromExtension> {
    inner: S,
    parts: Arc<Parts<K, C, P>>,
}

impl<S: Clone, K, C, P> Clone for Floodgate<S, K, C, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            parts: Arc::clone(&self.parts),
        }
    }
}

impl<S: fmt::Debug, K, C, P> fmt::Debug for Floodgate<S, K, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Floodgate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, C, P> Floodgate<S, K, C, P> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Where a request that could not be decided at once goes on from.
enum Stage {
    /// Waiting for the rate limit store's verdict.
    Rate(Pin<Box<dyn Future<Output = rate_limit::Verdict> + Send>>),
    /// Admitted by the rate limit, waiting in the concurrency cap's queue.
    Cap(Box<concurrency::Ticket>, Option<Box<SuccessHeaders>>),
    /// Holding the cap's units, waiting in the shedder's queue.
    Shed(Box<shed::Ticket>, Guard, Option<Box<SuccessHeaders>>),
}

/// What the concurrency cap or the shedder decided, made uniform.
enum Step<Held, Ticket> {
    Now(Held),
    Wait(Box<Ticket>),
    Reject(Rejection),
}

/// How far the common case got.
enum Fast {
    /// Admitted by all three.
    Admitted(Guard, Option<Box<SuccessHeaders>>),
    /// Admitted by the rate limit; the concurrency cap decides the usual
    /// way.
    Cap(Option<Box<SuccessHeaders>>),
    /// Admitted by the rate limit and the concurrency cap; the shedder
    /// decides the usual way.
    Shed(Guard, Option<Box<SuccessHeaders>>),
    /// Refused by the rate limit, to be reported with the tenant's key.
    Refused(Box<(Plan, Denied)>),
    /// Not the common case: all three decide the usual way.
    No,
    /// Not tried: the key extractor lends no bytes
    /// ([`KeyExtractor::key_bytes`]), so the key must be extracted first.
    Untried,
}

impl<K, C, P> Parts<K, C, P> {
    /// The common case, for the tenant whose key is `key`, with the key
    /// hashed and the plan looked up once for all three decisions: one
    /// policy, an in-memory limiter, a key within the length bound, a
    /// tenant that is not blocked, no observers and no shadow mode. The
    /// rate limit decides here (an admission or a refusal); the cap and the
    /// shedder only admit here, and leave anything else to the usual path,
    /// which decides again from the start.
    #[inline]
    fn fast<Req>(&self, req: &Req, key: &[u8]) -> Fast
    where
        C: RequestCost<Req>,
        P: PriorityExtractor<Req>,
    {
        if !self.one_policy || key.len() > self.max_key_len || !self.rate.decides_fast() {
            return Fast::No;
        }
        let Some(cost) = self.rate.cost(req) else {
            return Fast::No;
        };
        let hash = tenant_hash(key);
        let snapshot = self.rate.limiter().snapshot();
        let policy = &snapshot.extra;
        if policy.any_blocked() {
            return Fast::No;
        }
        let plan = policy.plan_for_hashed(hash, key);
        let headers = match self.rate.admit_plan(&snapshot, plan, hash, cost) {
            Some(Rated::Admitted(headers)) => headers,
            Some(Rated::Denied(denied)) => return Fast::Refused(denied),
            None => return Fast::No,
        };
        let Some(cap) = self.cap.admit_plan(plan, hash) else {
            return Fast::Cap(headers);
        };
        let mut guard = self.guard(cap);
        match self.shed.admit_plan(req, plan, hash) {
            Some(shed) => {
                guard.hold_shed(shed);
                Fast::Admitted(guard, headers)
            }
            None => Fast::Shed(guard, headers),
        }
    }

    #[inline]
    fn cap<Req>(&self, extracted: &Extracted) -> Step<concurrency::Held, concurrency::Ticket>
    where
        K: KeyExtractor<Req>,
    {
        if let Some(held) = self.cap.admit_fast() {
            return Step::Now(held);
        }
        match self.cap.admit_with(extracted, || self.key.challenge()) {
            concurrency::Admit::Now(held) => Step::Now(held),
            concurrency::Admit::Wait(ticket) => Step::Wait(ticket),
            concurrency::Admit::Reject(rejection) => Step::Reject(rejection),
        }
    }

    #[inline]
    fn shed<Req>(&self, req: &Req, extracted: &Extracted) -> Step<shed::Held, shed::Ticket>
    where
        P: PriorityExtractor<Req>,
    {
        if let Some(held) = self.shed.admit_fast(req) {
            return Step::Now(held);
        }
        match self.shed.admit_with(req, Some(extracted)) {
            shed::Admit::Now(held) => Step::Now(held),
            shed::Admit::Wait(ticket) => Step::Wait(ticket),
            shed::Admit::Reject(rejection) => Step::Reject(rejection),
        }
    }

    /// The guard of a request holding `cap`'s units (and none of the
    /// shedder's yet).
    #[inline]
    fn guard(&self, cap: concurrency::Held) -> Guard {
        Guard {
            runtimes: Arc::clone(&self.runtimes),
            cap,
            shed: shed::Held::EMPTY,
        }
    }
}

impl<S, K, C, P, ReqBody, ResBody> Service<Request<ReqBody>> for Floodgate<S, K, C, P>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: BoxedBody,
    K: KeyExtractor<Request<ReqBody>> + Send + Sync + 'static,
    C: RequestCost<Request<ReqBody>> + Send + Sync + 'static,
    P: PriorityExtractor<Request<ReqBody>> + Send + Sync + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    // Not inlined into the caller: the future is then built in the place
    // the caller keeps it (axum's `MapIntoResponse`), not copied there.
    #[inline(never)]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let parts = &*self.parts;
        let fast = match parts.key.key_bytes(&req) {
            Some(key) => parts.fast(&req, key),
            None => Fast::Untried,
        };
        match fast {
            Fast::Admitted(guard, headers) => ResponseFuture {
                kind: Kind::Admitted {
                    future: self.inner.call(req),
                },
                guard: Some(guard),
                headers,
            },
            other => self.call_slow(req, other),
        }
    }
}

impl<S, K, C, P> Floodgate<S, K, C, P> {
    /// What the common case left undecided, decided the usual way.
    #[inline(never)]
    fn call_slow<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
        fast: Fast,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: BoxedBody,
        K: KeyExtractor<Request<ReqBody>> + Send + Sync + 'static,
        C: RequestCost<Request<ReqBody>> + Send + Sync + 'static,
        P: PriorityExtractor<Request<ReqBody>> + Send + Sync + 'static,
    {
        let parts = &*self.parts;
        let extracted = Extracted::from_request(&parts.key, &req);
        let fast = match fast {
            Fast::Untried => match extracted.key() {
                Some(tenant) => parts.fast(&req, tenant.key.as_bytes()),
                None => Fast::No,
            },
            other => other,
        };
        let (headers, guard) = match fast {
            Fast::Admitted(guard, headers) => {
                return ResponseFuture {
                    kind: Kind::Admitted {
                        future: self.inner.call(req),
                    },
                    guard: Some(guard),
                    headers,
                };
            }
            Fast::Shed(guard, headers) => (headers, Some(guard)),
            Fast::Cap(headers) => (headers, None),
            other => {
                let admit = match (other, extracted.key()) {
                    (Fast::Refused(denied), Some(tenant)) => {
                        rate_limit::Admit::Now(parts.rate.refuse_rated(tenant.key, *denied))
                    }
                    // Not the common case; or an extractor whose
                    // `key_bytes` and `extract` disagree, and a refusal
                    // charged nothing, so deciding again is safe.
                    _ => parts.rate.admit_with(&req, &extracted),
                };
                match admit {
                    // (A refusal let through: shadow mode, switched on
                    // since the fast path looked.)
                    rate_limit::Admit::Now(Ok(headers)) => (headers, None),
                    rate_limit::Admit::Now(Err(rejection)) => {
                        return ResponseFuture::rejected(rejection, &req, None);
                    }
                    rate_limit::Admit::Later(verdict) => {
                        return self.wait(req, extracted, Stage::Rate(verdict));
                    }
                }
            }
        };
        let mut guard = match guard {
            Some(guard) => guard,
            None => match parts.cap::<Request<ReqBody>>(&extracted) {
                Step::Now(held) => parts.guard(held),
                Step::Wait(ticket) => {
                    return self.wait(req, extracted, Stage::Cap(ticket, headers));
                }
                Step::Reject(rejection) => {
                    return ResponseFuture::rejected(rejection, &req, headers);
                }
            },
        };
        match parts.shed(&req, &extracted) {
            Step::Now(held) => guard.hold_shed(held),
            Step::Wait(ticket) => {
                return self.wait(req, extracted, Stage::Shed(ticket, guard, headers));
            }
            // Dropping the guard returns the cap's units.
            Step::Reject(rejection) => return ResponseFuture::rejected(rejection, &req, headers),
        }
        ResponseFuture {
            kind: Kind::Admitted {
                future: self.inner.call(req),
            },
            guard: Some(guard),
            headers,
        }
    }

    /// A request that waits: it takes the instance made ready for it and
    /// goes on from `stage` in a boxed future.
    #[inline(never)]
    fn wait<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
        extracted: Extracted,
        stage: Stage,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: BoxedBody,
        K: KeyExtractor<Request<ReqBody>> + Send + Sync + 'static,
        C: Send + Sync + 'static,
        P: PriorityExtractor<Request<ReqBody>> + Send + Sync + 'static,
    {
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        let parts = Arc::clone(&self.parts);
        let grpc = is_grpc(req.headers());
        // As the rate limit layer does in front of the other two: a request
        // it admitted has its headers on any answer, a refusal included.
        let refuse = move |rejection, headers: Option<Box<SuccessHeaders>>| {
            let mut response = rejection_response(rejection, grpc);
            add_headers(&mut response, headers);
            Ok(response)
        };
        let future = async move {
            let mut stage = stage;
            // Each decision is made with the request borrowed only for
            // that statement: a borrow held across an await would need
            // the request to be `Sync`.
            let (guard, headers) = loop {
                stage = match stage {
                    Stage::Rate(verdict) => {
                        let headers = match verdict.await {
                            Ok(headers) => headers,
                            Err(rejection) => return refuse(rejection, None),
                        };
                        let step = parts.cap::<Request<ReqBody>>(&extracted);
                        match step {
                            Step::Now(held) => {
                                let mut guard = parts.guard(held);
                                let step = parts.shed(&req, &extracted);
                                match step {
                                    Step::Now(held) => {
                                        guard.hold_shed(held);
                                        break (guard, headers);
                                    }
                                    Step::Wait(ticket) => Stage::Shed(ticket, guard, headers),
                                    Step::Reject(rejection) => return refuse(rejection, headers),
                                }
                            }
                            Step::Wait(ticket) => Stage::Cap(ticket, headers),
                            Step::Reject(rejection) => return refuse(rejection, headers),
                        }
                    }
                    Stage::Cap(mut ticket, headers) => {
                        let mut guard = match poll_fn(|cx| ticket.poll_permit(cx)).await {
                            Ok(permit) => parts.guard(permit.into_held()),
                            Err(rejection) => return refuse(rejection, headers),
                        };
                        drop(ticket);
                        let step = parts.shed(&req, &extracted);
                        match step {
                            Step::Now(held) => {
                                guard.hold_shed(held);
                                break (guard, headers);
                            }
                            Step::Wait(ticket) => Stage::Shed(ticket, guard, headers),
                            Step::Reject(rejection) => return refuse(rejection, headers),
                        }
                    }
                    Stage::Shed(mut ticket, mut guard, headers) => {
                        match poll_fn(|cx| ticket.poll_permit(cx)).await {
                            Ok(permit) => {
                                guard.hold_shed(permit.into_held());
                                break (guard, headers);
                            }
                            Err(rejection) => return refuse(rejection, headers),
                        }
                    }
                };
            };
            let response = service.call(req).await?;
            Ok(admitted(response, Some(guard), headers))
        };
        ResponseFuture {
            kind: Kind::Waiting {
                future: Box::pin(future),
            },
            guard: None,
            headers: None,
        }
    }
}

/// The admitted response: the rate limit's headers added, the guard held
/// by its body until the body is done.
#[inline]
fn admitted<B: BoxedBody>(
    mut response: Response<B>,
    guard: Option<Guard>,
    headers: Option<Box<SuccessHeaders>>,
) -> Response<B> {
    add_headers(&mut response, headers);
    hold(response, guard.map(response::Guard::Floodgate))
}

/// The rate limit's headers, if it admitted the request and sends them.
#[inline]
fn add_headers<B>(response: &mut Response<B>, headers: Option<Box<SuccessHeaders>>) {
    if let Some(headers) = headers {
        headers.add_to(response.headers_mut());
    }
}

type Waiting<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

pin_project! {
    /// The response future of [`Floodgate`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
        guard: Option<Guard>,
        headers: Option<Box<SuccessHeaders>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Admitted {
            #[pin]
            future: F,
        },
        Waiting { future: Waiting<B, E> },
        // Boxed: rejections are rare, and a small future is cheap to move.
        Rejected { response: Option<Box<Response<B>>> },
    }
}

impl<F, B: BoxedBody, E> ResponseFuture<F, B, E> {
    /// Refused; `headers` are the rate limit's, if it admitted the request.
    #[cold]
    fn rejected<Req>(
        rejection: Rejection,
        req: &Request<Req>,
        headers: Option<Box<SuccessHeaders>>,
    ) -> Self {
        let mut response = rejection_response(rejection, is_grpc(req.headers()));
        add_headers(&mut response, headers);
        Self {
            kind: Kind::Rejected {
                response: Some(Box::new(response)),
            },
            guard: None,
            headers: None,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: BoxedBody,
{
    type Output = Result<Response<B>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Admitted { future } => {
                let (guard, headers) = (this.guard, this.headers);
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(admitted(response, guard.take(), headers.take())))
            }
            KindProj::Waiting { future } => future.as_mut().poll(cx),
            KindProj::Rejected { response } => Poll::Ready(Ok(match response.take() {
                Some(response) => *response,
                None => after_completion(),
            })),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Waiting { .. } => "waiting",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
