use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::layer::{Admit, Shared};
use crate::held::{GenericResponseFuture, ResponseFuture, Ticket};
use crate::key::KeyExtractor;
use crate::response::{BoxedBody, Guard, is_grpc, rejection_response};

/// The constructor, accessors, `Clone` and `Debug` shared by both services.
macro_rules! service_common {
    ($name:ident) => {
        impl<S, K> $name<S, K> {
            pub(super) fn new(inner: S, shared: Arc<Shared<K>>) -> Self {
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

        impl<S: Clone, K> Clone for $name<S, K> {
            fn clone(&self) -> Self {
                Self {
                    inner: self.inner.clone(),
                    shared: Arc::clone(&self.shared),
                }
            }
        }

        impl<S: fmt::Debug, K> fmt::Debug for $name<S, K> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("inner", &self.inner)
                    .finish_non_exhaustive()
            }
        }
    };
}

service_common!(ConcurrencyCap);
service_common!(GenericConcurrencyCap);

/// The HTTP service made by [`ConcurrencyCapLayer`](super::ConcurrencyCapLayer).
///
/// The inner service must be `Clone`: a request that waits in the queue
/// takes the instance that was made ready for it, and leaves a clone in its
/// place (the usual tower pattern for calls made later than `call`).
pub struct ConcurrencyCap<S, K> {
    inner: S,
    shared: Arc<Shared<K>>,
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for ConcurrencyCap<S, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: BoxedBody,
    K: KeyExtractor<Request<ReqBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, Request<ReqBody>, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.shared.admit_fast() {
            Some(held) => {
                let permit = self.shared.permit(held);
                ResponseFuture::call(Guard::Permit(permit), &mut self.inner, req)
            }
            None => self.call_slow(req),
        }
    }
}

impl<S, K> ConcurrencyCap<S, K> {
    /// Everything but the common case: tenants, queues, refusals.
    #[inline(never)]
    fn call_slow<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S, Request<ReqBody>, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
        ResBody: BoxedBody,
        K: KeyExtractor<Request<ReqBody>>,
    {
        match self.shared.admit(&req) {
            Admit::Now(permit) => {
                ResponseFuture::admitted(self.inner.call(req), Guard::Permit(permit))
            }
            Admit::Wait(ticket) => {
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                let grpc = is_grpc(req.headers());
                ResponseFuture::waiting(Ticket::Cap(ticket), ready, req, grpc)
            }
            Admit::Reject(rejection) => {
                ResponseFuture::rejected(rejection_response(rejection, is_grpc(req.headers())))
            }
        }
    }
}

/// The service made by [`GenericConcurrencyCapLayer`](super::GenericConcurrencyCapLayer).
pub struct GenericConcurrencyCap<S, K> {
    inner: S,
    shared: Arc<Shared<K>>,
}

impl<S, K, Req> Service<Req> for GenericConcurrencyCap<S, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<crate::BoxError>,
    K: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = crate::BoxError;
    type Future = GenericResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(permit) = self.shared.admit_fast() {
            let permit = self.shared.permit(permit);
            return GenericResponseFuture::admitted(self.inner.call(req), Guard::Permit(permit));
        }
        match self.shared.admit(&req) {
            Admit::Now(permit) => {
                GenericResponseFuture::admitted(self.inner.call(req), Guard::Permit(permit))
            }
            Admit::Wait(ticket) => {
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                GenericResponseFuture::waiting(Ticket::Cap(ticket), ready, req)
            }
            Admit::Reject(rejection) => GenericResponseFuture::rejected(rejection),
        }
    }
}
