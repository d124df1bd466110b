//! Response futures.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use super::layer::SuccessHeaders;
use crate::error::Rejection;
use crate::response::{RATELIMIT, RATELIMIT_POLICY, ResponseBody};

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Admitted { #[pin] future: F, headers: Option<Box<SuccessHeaders>> },
        // Boxed: rejections are rare, and a small future is cheap to move.
        Rejected { response: Option<Box<Response<ResponseBody<B>>>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn admitted(future: F, headers: Option<Box<SuccessHeaders>>) -> Self {
        Self {
            kind: Kind::Admitted { future, headers },
        }
    }

    pub(super) fn rejected(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Admitted { future, headers } => {
                let mut response = ready!(future.poll(cx))?;
                if let Some(extra) = headers.take() {
                    let SuccessHeaders { policy, limit } = *extra;
                    let h = response.headers_mut();
                    h.append(RATELIMIT_POLICY, policy);
                    h.append(RATELIMIT, limit);
                }
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Rejected { response } => Poll::Ready(Ok(match response.take() {
                Some(response) => *response,
                None => {
                    // Polled again after completion: answer rather than panic.
                    let mut r = Response::new(ResponseBody::full(bytes::Bytes::new()));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            })),
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Admitted { .. } => "admitted",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

pin_project! {
    /// The response future of [`GenericRateLimit`](super::GenericRateLimit).
    pub struct GenericResponseFuture<F> {
        #[pin]
        kind: GenericKind<F>,
    }
}

pin_project! {
    #[project = GenericKindProj]
    enum GenericKind<F> {
        Admitted { #[pin] future: F },
        Rejected { rejection: Option<Rejection> },
    }
}

impl<F> GenericResponseFuture<F> {
    pub(super) fn admitted(future: F) -> Self {
        Self {
            kind: GenericKind::Admitted { future },
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

impl<F, T, E> Future for GenericResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<crate::BoxError>,
{
    type Output = Result<T, crate::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            GenericKindProj::Admitted { future } => future.poll(cx).map_err(Into::into),
            GenericKindProj::Rejected { rejection } => Poll::Ready(Err(match rejection.take() {
                Some(rejection) => Box::new(rejection),
                None => "rate limit future polled after completion".into(),
            })),
        }
    }
}

impl<F> fmt::Debug for GenericResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            GenericKind::Admitted { .. } => "admitted",
            GenericKind::Rejected { .. } => "rejected",
        };
        f.debug_struct("GenericResponseFuture")
            .field("state", &state)
            .finish()
    }
}
