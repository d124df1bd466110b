//! Response futures.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::{Permit, Ticket};
use crate::error::Rejection;
use crate::response::{Guard, ResponseBody, rejection_response};

/// A request waiting for its permit, with the service made ready for it.
struct Waiting<S, Req> {
    ticket: Box<Ticket>,
    service: S,
    request: Req,
    grpc: bool,
}

pin_project! {
    /// The response future of [`ConcurrencyCap`](super::ConcurrencyCap).
    pub struct ResponseFuture<S, Req, B>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, B>
    where
        S: Service<Req>,
    {
        Admitted { #[pin] future: S::Future, permit: Option<Permit> },
        Waiting { waiting: Option<Box<Waiting<S, Req>>> },
        Rejected { response: Option<Box<Response<ResponseBody<B>>>> },
    }
}

impl<S: Service<Req>, Req, B> ResponseFuture<S, Req, B> {
    pub(super) fn admitted(future: S::Future, permit: Permit) -> Self {
        Self {
            kind: Kind::Admitted {
                future,
                permit: Some(permit),
            },
        }
    }

    pub(super) fn waiting(ticket: Box<Ticket>, service: S, request: Req, grpc: bool) -> Self {
        Self {
            kind: Kind::Waiting {
                waiting: Some(Box::new(Waiting {
                    ticket,
                    service,
                    request,
                    grpc,
                })),
            },
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

fn after_completion<B>() -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

impl<S, Req, B> Future for ResponseFuture<S, Req, B>
where
    S: Service<Req, Response = Response<B>>,
{
    type Output = Result<Response<ResponseBody<B>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut kind = self.as_mut().project().kind;
            match kind.as_mut().project() {
                KindProj::Admitted { future, permit } => {
                    let response = ready!(future.poll(cx))?;
                    // The permit moves into the body: it is held until the
                    // body is done, not just until the handler returns.
                    return Poll::Ready(Ok(match permit.take() {
                        Some(permit) if !permit.is_empty() => {
                            response.map(|body| ResponseBody::guarded(body, Guard::Permit(permit)))
                        }
                        _ => response.map(ResponseBody::inner),
                    }));
                }
                KindProj::Waiting { waiting } => {
                    let Some(wait) = waiting.as_mut() else {
                        return Poll::Ready(Ok(after_completion()));
                    };
                    match ready!(wait.ticket.poll_permit(cx)) {
                        Err(rejection) => {
                            let grpc = wait.grpc;
                            *waiting = None;
                            return Poll::Ready(Ok(rejection_response(rejection, grpc)));
                        }
                        Ok(permit) => {
                            let Some(wait) = waiting.take() else {
                                return Poll::Ready(Ok(after_completion()));
                            };
                            let Waiting {
                                mut service,
                                request,
                                ..
                            } = *wait;
                            let future = service.call(request);
                            kind.set(Kind::Admitted {
                                future,
                                permit: Some(permit),
                            });
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
            Kind::Waiting { .. } => "waiting",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

pin_project! {
    /// The response future of [`GenericConcurrencyCap`](super::GenericConcurrencyCap).
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
        Admitted { #[pin] future: S::Future, permit: Option<Permit> },
        Waiting { waiting: Option<Box<Waiting<S, Req>>> },
        Rejected { rejection: Option<Rejection> },
    }
}

impl<S: Service<Req>, Req> GenericResponseFuture<S, Req> {
    pub(super) fn admitted(future: S::Future, permit: Permit) -> Self {
        Self {
            kind: GenericKind::Admitted {
                future,
                permit: Some(permit),
            },
        }
    }

    pub(super) fn waiting(ticket: Box<Ticket>, service: S, request: Req) -> Self {
        Self {
            kind: GenericKind::Waiting {
                waiting: Some(Box::new(Waiting {
                    ticket,
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

const POLLED_AFTER_COMPLETION: &str = "concurrency cap future polled after completion";

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
                GenericKindProj::Admitted { future, permit } => {
                    let output = ready!(future.poll(cx)).map_err(Into::into);
                    permit.take();
                    return Poll::Ready(output);
                }
                GenericKindProj::Waiting { waiting } => {
                    let Some(wait) = waiting.as_mut() else {
                        return Poll::Ready(Err(POLLED_AFTER_COMPLETION.into()));
                    };
                    match ready!(wait.ticket.poll_permit(cx)) {
                        Err(rejection) => {
                            *waiting = None;
                            return Poll::Ready(Err(Box::new(rejection)));
                        }
                        Ok(permit) => {
                            let Some(wait) = waiting.take() else {
                                return Poll::Ready(Err(POLLED_AFTER_COMPLETION.into()));
                            };
                            let Waiting {
                                mut service,
                                request,
                                ..
                            } = *wait;
                            let future = service.call(request);
                            kind.set(GenericKind::Admitted {
                                future,
                                permit: Some(permit),
                            });
                        }
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
            GenericKind::Waiting { .. } => "waiting",
            GenericKind::Rejected { .. } => "rejected",
        };
        f.debug_struct("GenericResponseFuture")
            .field("state", &state)
            .finish()
    }
}
