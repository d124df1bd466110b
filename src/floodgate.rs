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

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::concurrency::{self, ConcurrencyCapLayer};
use crate::cost::{InvalidCost, RequestCost, UnitCost};
use crate::error::Rejection;
use crate::held::hold;
use crate::key::{KeyError, KeyExtractor, TenantKey};
use crate::rate_limit::{self, RateLimitLayer, SuccessHeaders};
use crate::response::{Guard, ResponseBody, after_completion, is_grpc, rejection_response};
use crate::shed::priority::FromExtension;
use crate::shed::{self, LoadShedLayer, Priority, PriorityExtractor};

/// A request with its tenant already found: what the three decisions read,
/// so that the key is extracted once.
pub(crate) struct Tagged<'a, Req> {
    req: &'a Req,
    key: &'a Result<TenantKey, KeyError>,
}

/// The key extractor of a [`Tagged`] request: the key found before.
#[derive(Clone)]
pub(crate) struct Known<K>(K);

impl<'a, K, Req> KeyExtractor<Tagged<'a, Req>> for Known<K>
where
    K: KeyExtractor<Req>,
{
    #[inline]
    fn extract(&self, req: &Tagged<'a, Req>) -> Result<TenantKey, KeyError> {
        req.key.clone()
    }

    fn challenge(&self) -> Option<HeaderValue> {
        self.0.challenge()
    }
}

/// A cost or priority extractor, reading the request under a [`Tagged`] one.
#[derive(Clone)]
pub(crate) struct Via<T>(T);

impl<'a, C, Req> RequestCost<Tagged<'a, Req>> for Via<C>
where
    C: RequestCost<Req>,
{
    #[inline]
    fn cost(&self, req: &Tagged<'a, Req>) -> Result<u32, InvalidCost> {
        self.0.cost(req.req)
    }
}

impl<'a, P, Req> PriorityExtractor<Tagged<'a, Req>> for Via<P>
where
    P: PriorityExtractor<Req>,
{
    #[inline]
    fn priority(&self, req: &Tagged<'a, Req>) -> Option<Priority> {
        self.0.priority(req.req)
    }
}

/// What every service of a [`FloodgateLayer`] shares.
struct Parts<K, C, P> {
    key: K,
    rate: Arc<rate_limit::Shared<Known<K>, Via<C>>>,
    cap: Arc<concurrency::Shared<Known<K>>>,
    shed: Arc<shed::Shared<Known<K>, Via<P>>>,
}

/// The rate limit, the concurrency cap and the load shedder in one layer.
///
/// It decides exactly as `ServiceBuilder::new().layer(rate).layer(cap)
/// .layer(shed)` would, with the settings, counters, observers and shadow
/// modes of the three layers it is built from (their `stats()` count its
/// decisions too), except that it finds the tenant once, with `key`, and
/// keeps both permits in one response future and one response body. The
/// three layers' own key extractors are not used; their key rules (a
/// missing key, the longest key) are. In an axum hello-world server this
/// took a quarter off what the three layers cost a request (3,467 against
/// 4,532 instructions over bare; `BENCHMARKS.md`).
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
        FloodgateLayer {
            parts: Arc::new(Parts {
                rate: rate.shared_with(Known(key.clone()), Via(rate.cost_extractor().clone())),
                cap: cap.shared_with(Known(key.clone())),
                shed: shed.shared_with(Known(key.clone()), Via(shed.priority_extractor().clone())),
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
    /// Holding the cap's permit, waiting in the shedder's queue.
    Shed(
        Box<shed::Ticket>,
        concurrency::Permit,
        Option<Box<SuccessHeaders>>,
    ),
}

/// What the concurrency cap or the shedder decided, made uniform.
enum Step<Permit, Ticket> {
    Now(Permit),
    Wait(Box<Ticket>),
    Reject(Rejection),
}

impl<K, C, P> Parts<K, C, P> {
    #[inline]
    fn cap<Req>(&self, tagged: &Tagged<'_, Req>) -> Step<concurrency::Permit, concurrency::Ticket>
    where
        K: KeyExtractor<Req>,
    {
        if let Some(permit) = self.cap.admit_fast() {
            return Step::Now(permit);
        }
        match self.cap.admit(tagged) {
            concurrency::Admit::Now(permit) => Step::Now(permit),
            concurrency::Admit::Wait(ticket) => Step::Wait(ticket),
            concurrency::Admit::Reject(rejection) => Step::Reject(rejection),
        }
    }

    #[inline]
    fn shed<Req>(&self, tagged: &Tagged<'_, Req>) -> Step<shed::Permit, shed::Ticket>
    where
        K: KeyExtractor<Req>,
        P: PriorityExtractor<Req>,
    {
        if let Some(permit) = self.shed.admit_fast(tagged) {
            return Step::Now(permit);
        }
        match self.shed.admit(tagged) {
            shed::Admit::Now(permit) => Step::Now(permit),
            shed::Admit::Wait(ticket) => Step::Wait(ticket),
            shed::Admit::Reject(rejection) => Step::Reject(rejection),
        }
    }
}

impl<S, K, C, P, ReqBody, ResBody> Service<Request<ReqBody>> for Floodgate<S, K, C, P>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
    K: KeyExtractor<Request<ReqBody>> + Send + Sync + 'static,
    C: RequestCost<Request<ReqBody>> + Send + Sync + 'static,
    P: PriorityExtractor<Request<ReqBody>> + Send + Sync + 'static,
{
    type Response = Response<Body<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let parts = &*self.parts;
        let key = parts.key.extract(&req);
        let tagged = Tagged {
            req: &req,
            key: &key,
        };
        let headers = match parts.rate.admit(&tagged) {
            rate_limit::Admit::Now(Ok(headers)) => headers,
            rate_limit::Admit::Now(Err(rejection)) => {
                return ResponseFuture::rejected(rejection, &req, None);
            }
            rate_limit::Admit::Later(verdict) => {
                return self.wait(req, key, Stage::Rate(verdict));
            }
        };
        let cap = match parts.cap(&tagged) {
            Step::Now(permit) => permit,
            Step::Wait(ticket) => return self.wait(req, key, Stage::Cap(ticket, headers)),
            Step::Reject(rejection) => return ResponseFuture::rejected(rejection, &req, headers),
        };
        let shed = match parts.shed(&tagged) {
            Step::Now(permit) => permit,
            Step::Wait(ticket) => return self.wait(req, key, Stage::Shed(ticket, cap, headers)),
            Step::Reject(rejection) => return ResponseFuture::rejected(rejection, &req, headers),
        };
        ResponseFuture {
            kind: Kind::Admitted {
                permits: Some((cap, shed)),
                headers,
                future: self.inner.call(req),
            },
        }
    }
}

impl<S, K, C, P> Floodgate<S, K, C, P> {
    /// A request that waits: it takes the instance made ready for it and
    /// goes on from `stage` in a boxed future.
    #[inline(never)]
    fn wait<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
        key: Result<TenantKey, KeyError>,
        stage: Stage,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Send + 'static,
        ResBody: Send + 'static,
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
            let (cap, shed, headers) = loop {
                stage = match stage {
                    Stage::Rate(verdict) => {
                        let headers = match verdict.await {
                            Ok(headers) => headers,
                            Err(rejection) => return refuse(rejection, None),
                        };
                        let step = parts.cap(&Tagged {
                            req: &req,
                            key: &key,
                        });
                        match step {
                            Step::Now(cap) => {
                                let step = parts.shed(&Tagged {
                                    req: &req,
                                    key: &key,
                                });
                                match step {
                                    Step::Now(shed) => break (cap, shed, headers),
                                    Step::Wait(ticket) => Stage::Shed(ticket, cap, headers),
                                    Step::Reject(rejection) => return refuse(rejection, headers),
                                }
                            }
                            Step::Wait(ticket) => Stage::Cap(ticket, headers),
                            Step::Reject(rejection) => return refuse(rejection, headers),
                        }
                    }
                    Stage::Cap(mut ticket, headers) => {
                        let cap = match poll_fn(|cx| ticket.poll_permit(cx)).await {
                            Ok(cap) => cap,
                            Err(rejection) => return refuse(rejection, headers),
                        };
                        drop(ticket);
                        let step = parts.shed(&Tagged {
                            req: &req,
                            key: &key,
                        });
                        match step {
                            Step::Now(shed) => break (cap, shed, headers),
                            Step::Wait(ticket) => Stage::Shed(ticket, cap, headers),
                            Step::Reject(rejection) => return refuse(rejection, headers),
                        }
                    }
                    Stage::Shed(mut ticket, cap, headers) => {
                        match poll_fn(|cx| ticket.poll_permit(cx)).await {
                            Ok(shed) => break (cap, shed, headers),
                            Err(rejection) => return refuse(rejection, headers),
                        }
                    }
                };
            };
            let response = service.call(req).await?;
            Ok(admitted(response, Some((cap, shed)), headers))
        };
        ResponseFuture {
            kind: Kind::Waiting {
                future: Box::pin(future),
            },
        }
    }
}

/// The admitted response: the rate limit's headers added, the permits held
/// by its body until the body is done (the shedder's inside, so that it
/// measures latency as when stacked).
#[inline]
fn admitted<B>(
    mut response: Response<B>,
    permits: Option<(concurrency::Permit, shed::Permit)>,
    headers: Option<Box<SuccessHeaders>>,
) -> Response<Body<B>> {
    add_headers(&mut response, headers);
    let (cap, shed) = match permits {
        Some((cap, shed)) => (Some(Guard::Permit(cap)), Some(Guard::Shed(shed))),
        None => (None, None),
    };
    hold(hold(response, shed), cap)
}

/// The response body of [`Floodgate`]: the inner body, holding the load
/// shedder's permit inside the concurrency cap's until it is done.
pub type Body<B> = ResponseBody<ResponseBody<B>>;

/// The rate limit's headers, if it admitted the request and sends them.
#[inline]
fn add_headers<B>(response: &mut Response<B>, headers: Option<Box<SuccessHeaders>>) {
    if let Some(headers) = headers {
        headers.add_to(response.headers_mut());
    }
}

type Waiting<B, E> = Pin<Box<dyn Future<Output = Result<Response<Body<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`Floodgate`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Admitted {
            #[pin]
            future: F,
            permits: Option<(concurrency::Permit, shed::Permit)>,
            headers: Option<Box<SuccessHeaders>>,
        },
        Waiting { future: Waiting<B, E> },
        // Boxed: rejections are rare, and a small future is cheap to move.
        Rejected { response: Option<Box<Response<Body<B>>>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
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
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Body<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Admitted {
                future,
                permits,
                headers,
            } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(admitted(response, permits.take(), headers.take())))
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
