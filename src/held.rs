//! The response futures of the layers that hold something while a request
//! is in flight (the concurrency cap and the load shedder): a permit taken
//! at once, or a place in a queue to wait for one first.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::Rejection;
use crate::response::{BoxedBody, Guard, ResponseBody, after_completion, rejection_response};

/// A request waiting in one of the layers' queues.
pub(crate) enum Ticket {
    Cap(Box<crate::concurrency::Ticket>),
    Shed(Box<crate::shed::Ticket>),
}

impl Ticket {
    /// Ready with what the request holds once it may go, or with the
    /// rejection at its deadline.
    fn poll_guard(&mut self, cx: &mut Context<'_>) -> Poll<Result<Guard, Rejection>> {
        match self {
            Self::Cap(ticket) => ticket.poll_permit(cx).map_ok(Guard::Permit),
            Self::Shed(ticket) => ticket.poll_permit(cx).map_ok(Guard::Shed),
        }
    }
}

/// A request waiting for its permit, with the service made ready for it.
struct Waiting<S, Req> {
    ticket: Ticket,
    service: S,
    request: Req,
    grpc: bool,
}

pin_project! {
    /// The response future of [`ConcurrencyCap`](crate::concurrency::ConcurrencyCap)
    /// and [`LoadShed`](crate::shed::LoadShed).
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
        Admitted { #[pin] future: S::Future, guard: Option<Guard> },
        Waiting { waiting: Option<Box<Waiting<S, Req>>> },
        Rejected { response: Option<Box<Response<B>>> },
    }
}

impl<S: Service<Req>, Req, B> ResponseFuture<S, Req, B> {
    /// Admitted: calls the inner service (building its future in place).
    #[inline]
    pub(crate) fn call(guard: Guard, service: &mut S, request: Req) -> Self {
        Self {
            kind: Kind::Admitted {
                guard: Some(guard),
                future: service.call(request),
            },
        }
    }

    pub(crate) fn admitted(future: S::Future, guard: Guard) -> Self {
        Self {
            kind: Kind::Admitted {
                future,
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn waiting(ticket: Ticket, service: S, request: Req, grpc: bool) -> Self {
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

    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(Box::new(response)),
            },
        }
    }
}

impl<S, Req, B> Future for ResponseFuture<S, Req, B>
where
    S: Service<Req, Response = Response<B>>,
    B: BoxedBody,
{
    type Output = Result<Response<B>, S::Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The common case, kept small enough to inline into the caller
        // (which spares moving the response and the future around).
        if let KindProj::Admitted { future, guard } = self.as_mut().project().kind.project() {
            let response = ready!(future.poll(cx))?;
            return Poll::Ready(Ok(hold(response, guard.take())));
        }
        self.poll_slow(cx)
    }
}

/// The response, its body holding `guard` (if it holds anything) until the
/// body is done, not just until the handler returns.
#[inline]
pub(crate) fn hold<B: BoxedBody>(response: Response<B>, guard: Option<Guard>) -> Response<B> {
    match guard {
        Some(mut guard) if !guard.is_empty() => {
            guard.responded();
            response.map(|body| B::boxed(ResponseBody::guarded(body, guard)))
        }
        _ => response,
    }
}

impl<S, Req, B> ResponseFuture<S, Req, B>
where
    S: Service<Req, Response = Response<B>>,
    B: BoxedBody,
{
    /// Waiting in a queue, or refused.
    #[inline(never)]
    fn poll_slow(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<B>, S::Error>> {
        loop {
            let mut kind = self.as_mut().project().kind;
            match kind.as_mut().project() {
                KindProj::Admitted { future, guard } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(hold(response, guard.take())));
                }
                KindProj::Waiting { waiting } => {
                    let Some(wait) = waiting.as_mut() else {
                        return Poll::Ready(Ok(after_completion()));
                    };
                    match ready!(wait.ticket.poll_guard(cx)) {
                        Err(rejection) => {
                            let grpc = wait.grpc;
                            *waiting = None;
                            return Poll::Ready(Ok(rejection_response(rejection, grpc)));
                        }
                        Ok(guard) => {
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
                                guard: Some(guard),
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
    /// The response future of [`GenericConcurrencyCap`](crate::concurrency::GenericConcurrencyCap)
    /// and [`GenericLoadShed`](crate::shed::GenericLoadShed).
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
        Admitted { #[pin] future: S::Future, guard: Option<Guard> },
        Waiting { waiting: Option<Box<Waiting<S, Req>>> },
        Rejected { rejection: Option<Rejection> },
    }
}

impl<S: Service<Req>, Req> GenericResponseFuture<S, Req> {
    pub(crate) fn admitted(future: S::Future, guard: Guard) -> Self {
        Self {
            kind: GenericKind::Admitted {
                future,
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn waiting(ticket: Ticket, service: S, request: Req) -> Self {
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

    pub(crate) fn rejected(rejection: Rejection) -> Self {
        Self {
            kind: GenericKind::Rejected {
                rejection: Some(rejection),
            },
        }
    }
}

const POLLED_AFTER_COMPLETION: &str = "response future polled after completion";

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
                GenericKindProj::Admitted { future, guard } => {
                    let output = ready!(future.poll(cx)).map_err(Into::into);
                    if let Some(mut guard) = guard.take() {
                        guard.responded();
                    }
                    return Poll::Ready(output);
                }
                GenericKindProj::Waiting { waiting } => {
                    let Some(wait) = waiting.as_mut() else {
                        return Poll::Ready(Err(POLLED_AFTER_COMPLETION.into()));
                    };
                    match ready!(wait.ticket.poll_guard(cx)) {
                        Err(rejection) => {
                            *waiting = None;
                            return Poll::Ready(Err(Box::new(rejection)));
                        }
                        Ok(guard) => {
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
                                guard: Some(guard),
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
