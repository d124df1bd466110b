use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{GenericResponseFuture, Kind, ResponseFuture};
use super::layer::{Admit, Shared};
use crate::cost::RequestCost;
use crate::key::KeyExtractor;
use crate::response::{BoxedBody, is_grpc, rejection_response};

/// The constructor, accessors, `Clone` and `Debug` shared by both services.
macro_rules! service_common {
    ($name:ident) => {
        impl<S, K, C> $name<S, K, C> {
            pub(super) fn new(inner: S, shared: Arc<Shared<K, C>>) -> Self {
                Self { inner, shared }
            }

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

        impl<S: Clone, K, C> Clone for $name<S, K, C> {
            fn clone(&self) -> Self {
                Self {
                    inner: self.inner.clone(),
                    shared: Arc::clone(&self.shared),
                }
            }
        }

        impl<S: fmt::Debug, K, C> fmt::Debug for $name<S, K, C> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("inner", &self.inner)
                    .finish_non_exhaustive()
            }
        }
    };
}

service_common!(RateLimit);
service_common!(GenericRateLimit);

/// The HTTP service made by [`RateLimitLayer`](super::RateLimitLayer).
///
/// The inner service must be `Clone`: with a remote store, a request that
/// waits for Redis' verdict takes the instance made ready for it and leaves
/// a clone in its place.
pub struct RateLimit<S, K, C> {
    inner: S,
    shared: Arc<Shared<K, C>>,
}

impl<S, K, C, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, K, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: BoxedBody,
    K: KeyExtractor<Request<ReqBody>>,
    C: RequestCost<Request<ReqBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, Request<ReqBody>, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    // Not inlined into the caller: the future is then built in the place
    // the caller keeps it (axum's `MapIntoResponse`), not copied there.
    #[inline(never)]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let admit = self.shared.admit(&req);
        match admit {
            Admit::Now(Ok(headers)) => {
                let future = self.inner.call(req);
                ResponseFuture {
                    kind: Kind::Admitted { future },
                    headers,
                }
            }
            Admit::Now(Err(rejection)) => {
                ResponseFuture::rejected(rejection_response(rejection, is_grpc(req.headers())))
            }
            Admit::Later(verdict) => {
                // Called once the store answers: take the instance made
                // ready for this request, and leave a clone in its place.
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                let grpc = is_grpc(req.headers());
                ResponseFuture::deciding(verdict, ready, req, grpc)
            }
        }
    }
}

/// The service made by [`GenericRateLimitLayer`](super::GenericRateLimitLayer).
pub struct GenericRateLimit<S, K, C> {
    inner: S,
    shared: Arc<Shared<K, C>>,
}

impl<S, K, C, Req> Service<Req> for GenericRateLimit<S, K, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<crate::BoxError>,
    K: KeyExtractor<Req>,
    C: RequestCost<Req>,
{
    type Response = S::Response;
    type Error = crate::BoxError;
    type Future = GenericResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.admit(&req) {
            Admit::Now(Ok(_)) => GenericResponseFuture::admitted(self.inner.call(req)),
            Admit::Now(Err(rejection)) => GenericResponseFuture::rejected(rejection),
            Admit::Later(verdict) => {
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                GenericResponseFuture::deciding(verdict, ready, req)
            }
        }
    }
}
