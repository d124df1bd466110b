//! The purge service over gRPC (tonic 0.14): the same state, the same
//! tower-floodgate layers, in front of the same backend as the HTTP API.
//!
//! `floodgate.purge.v1.PurgeService/Purge` goes through, outermost first:
//! [`AuthenticateLayer`] (the `authorization: Bearer KEY` metadata names
//! the tenant; UNAUTHENTICATED otherwise), the rate limit and concurrency
//! cap (RESOURCE_EXHAUSTED), the shedder (UNAVAILABLE), then
//! [`GrpcPurge`]: INVALID_ARGUMENT for bad targets, RESOURCE_EXHAUSTED over
//! the item rate, UNAVAILABLE when the backend is over capacity. Refusals
//! that may be retried carry `grpc-retry-pushback-ms` and `retry-after`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tower::{BoxError, Layer, Service};
use tower_floodgate::TenantKey;
use tower_floodgate::purge::Mode;

use super::{AppState, Layers, PurgeRefusal, TargetKind, check_all, check_targets};

/// The code generated from `examples/proto/purge.proto` at build time.
pub(crate) mod pb {
    #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
    tonic::include_proto!("floodgate.purge.v1");
}

use pb::purge_request::Target as ProtoTarget;
use pb::purge_service_server::{PurgeService, PurgeServiceServer};

/// The largest request message, as the HTTP API's body limit.
pub(crate) const MAX_MESSAGE: usize = super::MAX_BODY;

/// The purge service, for tonic's router.
pub(crate) fn purge_service(state: Arc<AppState>) -> PurgeServiceServer<GrpcPurge> {
    PurgeServiceServer::new(GrpcPurge { state }).max_decoding_message_size(MAX_MESSAGE)
}

/// Serves the purge service on `incoming` with every layer, authentication
/// outermost, until `shutdown` completes.
pub(crate) async fn serve<I, IO, IE>(
    state: Arc<AppState>,
    layers: Layers,
    incoming: I,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<BoxError>,
{
    tonic::transport::Server::builder()
        .layer(AuthenticateLayer::new(Arc::clone(&state)))
        .layer(layers.rate_limit)
        .layer(layers.cap)
        .layer(layers.shed)
        .add_service(purge_service(state))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The gRPC handler.
#[derive(Clone)]
pub(crate) struct GrpcPurge {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl PurgeService for GrpcPurge {
    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let Some(tenant) = request.extensions().get::<TenantKey>().cloned() else {
            return Err(Status::unauthenticated("an API key is needed"));
        };
        let message = request.into_inner();
        let targets = match &message.target {
            Some(ProtoTarget::Urls(list)) => check_targets(TargetKind::Urls, &list.values),
            Some(ProtoTarget::Tags(list)) => check_targets(TargetKind::Tags, &list.values),
            Some(ProtoTarget::Prefixes(list)) => check_targets(TargetKind::Prefixes, &list.values),
            Some(ProtoTarget::Hosts(list)) => check_targets(TargetKind::Hosts, &list.values),
            Some(ProtoTarget::All(all)) => check_all(*all),
            None => Err("give one of `urls`, `tags`, `prefixes`, `hosts` or `all`".to_owned()),
        }
        .map_err(Status::invalid_argument)?;
        let mode = if message.soft { Mode::Soft } else { Mode::Hard };
        match self.state.purge(&tenant, targets, mode).await {
            Ok(purged) => Ok(Response::new(pb::PurgeResponse {
                request_id: purged.request_id,
                tenant: tenant.to_string(),
                results: purged
                    .results
                    .into_iter()
                    .map(|outcome| pb::TargetResult {
                        target: outcome.target,
                        status: if outcome.failure.is_some() {
                            pb::ItemStatus::Failed
                        } else {
                            pb::ItemStatus::Purged
                        }
                        .into(),
                        reason: outcome.failure.unwrap_or_default(),
                        batch: outcome.batch.to_string(),
                        coalesced: outcome.coalesced,
                    })
                    .collect(),
            })),
            Err(PurgeRefusal::ItemsLimited(rejection)) => Err(Status::from(rejection)),
            Err(PurgeRefusal::BackendBusy(wait)) => Err(backend_busy(wait)),
        }
    }
}

/// UNAVAILABLE with the backend's wait as `grpc-retry-pushback-ms` and
/// `retry-after` (whole seconds, at least 1).
fn backend_busy(wait: Duration) -> Status {
    let millis = wait.as_millis();
    let mut status = Status::unavailable(format!(
        "the purge backend is over capacity; retry in {millis} ms"
    ));
    let metadata = status.metadata_mut();
    metadata.insert("grpc-retry-pushback-ms", MetadataValue::from(millis as u64));
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    metadata.insert("retry-after", MetadataValue::from(secs));
    status
}

/// Puts the tenant of the `authorization: Bearer KEY` metadata in the
/// request's extensions, where the layers and the handler read it; answers
/// UNAUTHENTICATED without calling the service otherwise.
#[derive(Clone)]
pub(crate) struct AuthenticateLayer {
    state: Arc<AppState>,
}

impl AuthenticateLayer {
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// The service of [`AuthenticateLayer`].
#[derive(Clone)]
pub(crate) struct Authenticate<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = AuthenticateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        match self.state.tenant_of(req.headers()) {
            Ok(tenant) => {
                req.extensions_mut().insert(tenant);
                AuthenticateFuture::Inner {
                    future: self.inner.call(req),
                }
            }
            Err(detail) => AuthenticateFuture::Refused {
                response: Some(Status::unauthenticated(detail).into_http()),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Authenticate`]: the refusal, or the inner service's
    /// response with its body boxed as tonic's (so both share one type).
    #[project = AuthenticateFutureProj]
    pub(crate) enum AuthenticateFuture<F> {
        Refused { response: Option<http::Response<tonic::body::Body>> },
        Inner { #[pin] future: F },
    }
}

impl<F, B, E> Future for AuthenticateFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthenticateFutureProj::Refused { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after it completed: never done by tonic.
                None => Poll::Pending,
            },
            AuthenticateFutureProj::Inner { future } => future
                .poll(cx)
                .map_ok(|response| response.map(tonic::body::Body::new)),
        }
    }
}
