//! Helpers shared by the integration tests: a real axum server on
//! 127.0.0.1:0 and a real HTTP client.

#![allow(dead_code, clippy::expect_used)]

use std::net::SocketAddr;

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Serves `app` on 127.0.0.1:0 (with connection info) and returns its
/// address.
pub(crate) async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    addr
}

/// What a test sends down a streaming response body.
pub(crate) type Chunks = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A router whose `GET /download` answers once, with a body that streams
/// what the test sends on the returned sender and ends when it is dropped;
/// and `GET /` answers "ok".
pub(crate) fn download() -> (Router, Chunks) {
    use std::sync::Arc;
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel(1);
    let chunks_rx = Arc::new(tokio::sync::Mutex::new(Some(chunks_rx)));
    let router = Router::new()
        .route(
            "/download",
            axum::routing::get(move || {
                let chunks_rx = Arc::clone(&chunks_rx);
                async move {
                    let rx = chunks_rx.lock().await.take().expect("one download");
                    axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                }
            }),
        )
        .route("/", axum::routing::get(|| async { "ok" }));
    (router, chunks_tx)
}

/// A response, read to the end.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// An HTTP/1 client for one server.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) client: Client<HttpConnector, Full<Bytes>>,
    pub(crate) addr: SocketAddr,
}

impl Http {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }

    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Full::new(Bytes::from(body.to_owned())))
            .expect("request")
    }

    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let res = self
            .client
            .request(self.request(method, path, headers, body))
            .await
            .expect("response");
        let (parts, body) = res.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    /// Starts `GET /download` (see [`download`]) as `tenant`: checks the
    /// 200, sends a first chunk down `chunks`, reads it, and returns the
    /// body, still streaming.
    pub(crate) async fn start_download(
        &self,
        tenant: &str,
        chunks: &Chunks,
    ) -> hyper::body::Incoming {
        let res = self
            .client
            .request(self.request("GET", "/download", &[("x-tenant", tenant)], ""))
            .await
            .expect("response");
        assert_eq!(res.status(), StatusCode::OK);
        chunks
            .send(Ok(Bytes::from_static(b"part 1")))
            .await
            .expect("send");
        let mut body = res.into_body();
        let frame = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"part 1")));
        body
    }

    pub(crate) async fn get_as(&self, tenant: &str) -> Reply {
        self.send("GET", "/", &[("x-tenant", tenant)], "").await
    }
}
