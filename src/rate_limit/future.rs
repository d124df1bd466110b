//! Response futures.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::{SuccessHeaders, Verdict};
use crate::error::Rejection;
use crate::response::{BoxedBody, after_completion, rejection_response};

/// A request waiting for the store's verdict, with the service made ready
/// for it.
struct Deciding<S, Req> {
    verdict: Pin<Box<dyn Future<Output = Verdict> + Send>>,
    service: S,
    request: Req,
    grpc: bool,
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, Req, B>
    where
        S: Service<Req>,
    {
        #[pin]
        pub(super) kind: Kind<S, Req, B>,
        // Beside the inner future rather than in its variant: a variant
        // holding only the future is built in place, without a copy.
        pub(super) headers: Option<Box<SuccessHeaders>>,
    }
}

pin_project! {
    #[project = KindProj]
    pub(super) enum Kind<S, Req, B>
    where
        S: Service<Req>,
    {
        Admitted { #[pin] future: S::Future },
        // Boxed: only a remote store defers.
        Deciding { deciding: Option<Box<Deciding<S, Req>>> },
        // Boxed: rejections are rare, and a small future is cheap to move.
        Rejected { response: Option<Box<Response<B>>> },
    }
}

impl<S: Service<Req>, Req, B> ResponseFuture<S, Req, B> {
    pub(super) fn deciding(
        verdict: Pin<Box<dyn Future<Output = Verdict> + Send>>,
        service: S,
        request: Req,
        grpc: bool,
    ) -> Self {
        Self {
            kind: Kind::Deciding {
                deciding: Some(Box::new(Deciding {
                    verdict,
                    service,
                    request,
                    grpc,
                })),
            },
            headers: None,
        }
    }

    pub(super) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(Box::new(response)),
            },
            headers: None,
        }
    }
}

impl<S, Req, B> Future for ResponseFuture<S, Req, B>
where
    S: Service<Req, Response = Response<B>>,
    B: BoxedBody,
{
    type Output = Result<Response<B>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let mut kind = this.kind;
            match kind.as_mut().project() {
                KindProj::Admitted { future } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(extra) = this.headers.take() {
                        extra.add_to(response.headers_mut());
                    }
                    return Poll::Ready(Ok(response));
                }
                KindProj::Deciding { deciding } => {
                    let Some(wait) = deciding.as_mut() else {
                        return Poll::Ready(Ok(after_completion()));
                    };
                    let verdict = ready!(wait.verdict.as_mut().poll(cx));
                    let Some(wait) = deciding.take() else {
                        return Poll::Ready(Ok(after_completion()));
                    };
                    let Deciding {
                        mut service,
                        request,
                        grpc,
                        ..
                    } = *wait;
                    match verdict {
                        Ok(headers) => {
                            let future = service.call(request);
                            *this.headers = headers;
                            kind.set(Kind::Admitted { future });
                        }
                        Err(rejection) => {
                            return Poll::Ready(Ok(rejection_response(rejection, grpc)));
                        }
                    }
                }
                KindProj::Rejected { response } => {
                    return Poll::Ready(Ok(match response.take() {
                        Some(response) => *response,
                        None => after_completion(),
                    }));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, B> fmt::Debug for ResponseFuture<S, Req, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Deciding { .. } => "deciding",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

pin_project! {
    /// The response future of [`GenericRateLimit`](super::GenericRateLimit).
    pub struct GenericResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: GenericKind<S, Req>,
    }
}

pin_project! {
    #[project = GenericKindProj]
    enum GenericKind<S, Req>
    where
        S: Service<Req>,
    {
        Admitted { #[pin] future: S::Future },
        Deciding { deciding: Option<Box<Deciding<S, Req>>> },
        Rejected { rejection: Option<Rejection> },
    }
}

impl<S: Service<Req>, Req> GenericResponseFuture<S, Req> {
    pub(super) fn admitted(future: S::Future) -> Self {
        Self {
            kind: GenericKind::Admitted { future },
        }
    }

    pub(super) fn deciding(
        verdict: Pin<Box<dyn Future<Output = Verdict> + Send>>,
        service: S,
        request: Req,
    ) -> Self {
        Self {
            kind: GenericKind::Deciding {
                deciding: Some(Box::new(Deciding {
                    verdict,
                    service,
                    request,
                    grpc: false,
                })),
            },
        }
    }

    pub(super) fn rejected(rejection: Rejection) -> Self {
        Self {
            kind: GenericKind::Rejected {
                rejection: Some(rejection),
            },
        }
    }
}

const POLLED_AFTER_COMPLETION: &str = "rate limit future polled after completion";

impl<S, Req> Future for GenericResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<crate::BoxError>,
{
    type Output = Result<S::Response, crate::BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut kind = self.as_mut().project().kind;
            match kind.as_mut().project() {
                GenericKindProj::Admitted { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
                GenericKindProj::Deciding { deciding } => {
                    let Some(wait) = deciding.as_mut() else {
                        return Poll::Ready(Err(POLLED_AFTER_COMPLETION.into()));
                    };
                    let verdict = ready!(wait.verdict.as_mut().poll(cx));
                    let Some(wait) = deciding.take() else {
                        return Poll::Ready(Err(POLLED_AFTER_COMPLETION.into()));
                    };
                    let Deciding {
                        mut service,
                        request,
                        ..
                    } = *wait;
                    match verdict {
                        Ok(_) => {
                            let future = service.call(request);
                            kind.set(GenericKind::Admitted { future });
                        }
                        Err(rejection) => return Poll::Ready(Err(Box::new(rejection))),
                    }
                }
                GenericKindProj::Rejected { rejection } => {
                    return Poll::Ready(Err(match rejection.take() {
                        Some(rejection) => Box::new(rejection),
                        None => POLLED_AFTER_COMPLETION.into(),
                    }));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for GenericResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            GenericKind::Admitted { .. } => "admitted",
            GenericKind::Deciding { .. } => "deciding",
            GenericKind::Rejected { .. } => "rejected",
        };
        f.debug_struct("GenericResponseFuture")
            .field("state", &state)
            .finish()
    }
}
