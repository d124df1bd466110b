//! Tenant-key extraction from arbitrary headers and extensions, alone and
//! through the rate limit, concurrency cap and load shedder, stacked and
//! as one `FloodgateLayer`.
//!
//! Oracle: the layers answer exactly what the extractor's verdict and the
//! key rules say (401 or 400 for a missing key, 400 for an invalid or
//! oversized one, the handler's 200 otherwise), and never panic.

#![no_main]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower_floodgate::key::{self, KeyError, KeyExtractor};
use tower_floodgate::shed::{Limit, LoadShedLayer};
use tower_floodgate::{
    ConcurrencyCapLayer, FloodgateLayer, MissingKey, Plan, PolicyHandle, Quota, RateLimitLayer,
    RateLimiter,
};
use tower_layer::Layer;
use tower_service::Service;

/// A header name: the ones the extractors read, or any other.
#[derive(Arbitrary, Debug)]
enum Name {
    Tenant,
    Authorization,
    Other(Vec<u8>),
}

impl Name {
    fn header(&self) -> Option<HeaderName> {
        match self {
            Self::Tenant => Some(HeaderName::from_static("x-tenant")),
            Self::Authorization => Some(http::header::AUTHORIZATION),
            Self::Other(bytes) => HeaderName::from_bytes(bytes).ok(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Extractor {
    Header(Name),
    Bearer,
    Extension,
    PeerAddr(u8),
}

#[derive(Arbitrary, Debug)]
enum Missing {
    Unauthorized,
    BadRequest,
    Anonymous,
}

#[derive(Arbitrary, Debug)]
struct Input {
    extractor: Extractor,
    missing: Missing,
    max_key_len: u16,
    headers: Vec<(Name, Vec<u8>)>,
    extension: Option<String>,
    peer: Option<(Option<[u8; 16]>, [u8; 4], u16)>,
}

/// The extractors, one type for the layers.
#[derive(Clone)]
enum AnyKey {
    Header(key::Header),
    Bearer(key::Bearer),
    Extension(key::Extension<String>),
    Peer(key::PeerAddr),
}

impl<B> KeyExtractor<Request<B>> for AnyKey {
    fn extract(&self, req: &Request<B>) -> Result<tower_floodgate::TenantKey, KeyError> {
        match self {
            Self::Header(k) => k.extract(req),
            Self::Bearer(k) => k.extract(req),
            Self::Extension(k) => k.extract(req),
            Self::Peer(k) => k.extract(req),
        }
    }

    fn key_bytes<'r>(&self, req: &'r Request<B>) -> Option<&'r [u8]> {
        match self {
            Self::Header(k) => k.key_bytes(req),
            Self::Bearer(k) => k.key_bytes(req),
            Self::Extension(k) => k.key_bytes(req),
            Self::Peer(k) => k.key_bytes(req),
        }
    }

    fn challenge(&self) -> Option<HeaderValue> {
        match self {
            Self::Header(k) => KeyExtractor::<Request<B>>::challenge(k),
            Self::Bearer(k) => KeyExtractor::<Request<B>>::challenge(k),
            Self::Extension(k) => KeyExtractor::<Request<B>>::challenge(k),
            Self::Peer(k) => KeyExtractor::<Request<B>>::challenge(k),
        }
    }
}

/// The handler: 200 with an empty body.
#[derive(Clone)]
struct Ok200;

/// The layers answer with the inner service's body type, boxed.
type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

impl Service<Request<String>> for Ok200 {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        std::future::ready(Ok(Response::new(Body::default())))
    }
}

/// The answer `expected`, a refusal as problem+json.
fn check(status: StatusCode, headers: &http::HeaderMap, expected: StatusCode) {
    assert_eq!(status, expected, "{headers:?}");
    if expected != StatusCode::OK {
        assert_eq!(
            headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
            Some(&b"application/problem+json"[..])
        );
    }
}

fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory decision is never pending"),
    }
}

/// The request the input describes, or `None` if `http` refuses it.
fn request(input: &Input) -> Option<Request<String>> {
    let mut builder = Request::builder();
    for (name, value) in &input.headers {
        if let (Some(name), Ok(value)) = (name.header(), HeaderValue::from_bytes(value)) {
            builder = builder.header(name, value);
        }
    }
    let mut req = builder.body(String::new()).ok()?;
    if let Some(ext) = &input.extension {
        req.extensions_mut().insert(ext.clone());
    }
    if let Some((v6, v4, port)) = input.peer {
        let ip = v6.map_or(IpAddr::V4(Ipv4Addr::from(v4)), |b| {
            IpAddr::V6(Ipv6Addr::from(b))
        });
        req.extensions_mut().insert(SocketAddr::new(ip, port));
    }
    Some(req)
}

fuzz_target!(|input: Input| {
    let extractor = match &input.extractor {
        Extractor::Header(name) => match name.header() {
            Some(name) => AnyKey::Header(key::header(name)),
            None => return,
        },
        Extractor::Bearer => AnyKey::Bearer(key::bearer()),
        Extractor::Extension => AnyKey::Extension(key::extension::<String>()),
        Extractor::PeerAddr(bits) => AnyKey::Peer(key::peer_addr().ipv6_prefix(*bits)),
    };
    let Some(req) = request(&input) else {
        return;
    };
    let missing = match input.missing {
        Missing::Unauthorized => MissingKey::Unauthorized,
        Missing::BadRequest => MissingKey::BadRequest,
        Missing::Anonymous => MissingKey::Anonymous,
    };
    let max_len = usize::from(input.max_key_len);

    // The bytes an extractor lends are the key it extracts: all of them
    // lend but the peer address, which formats its key.
    let extracted = extractor.extract(&req);
    let lent = extractor.key_bytes(&req);
    match (&extractor, &extracted) {
        (AnyKey::Peer(_), _) => assert_eq!(lent, None),
        (_, Ok(key)) => assert_eq!(lent, Some(key.as_bytes())),
        (_, Err(_)) => assert_eq!(lent, None),
    }

    let expected = match extracted {
        Err(KeyError::Missing) => match missing {
            MissingKey::Unauthorized => StatusCode::UNAUTHORIZED,
            MissingKey::BadRequest => StatusCode::BAD_REQUEST,
            _ => StatusCode::OK,
        },
        Err(KeyError::Invalid(reason)) => {
            assert!(!reason.is_empty());
            StatusCode::BAD_REQUEST
        }
        Err(other) => panic!("a key error this target does not know: {other}"),
        Ok(tenant) if tenant.len() > max_len => StatusCode::BAD_REQUEST,
        Ok(tenant) => {
            assert_eq!(tenant.as_bytes().len(), tenant.len());
            StatusCode::OK
        }
    };

    let quota = Quota::per_second(NonZeroU32::MAX);
    let policy = PolicyHandle::from(Plan::new("fuzz").rate(quota).concurrency(u32::MAX));
    let stack = RateLimitLayer::new(RateLimiter::builder(policy.clone()).build())
        .key(extractor.clone())
        .on_missing_key(missing)
        .max_key_len(max_len);
    let cap = ConcurrencyCapLayer::new(policy.clone())
        .key(extractor.clone())
        .on_missing_key(missing)
        .max_key_len(max_len);
    let shed = LoadShedLayer::new(Limit::fixed(1 << 20))
        .policy(policy)
        .key(extractor.clone());
    let mut service = stack.layer(cap.layer(shed.layer(Ok200)));
    let response = now(service.call(req)).expect("the layers never fail");
    check(response.status(), response.headers(), expected);
    // The same decisions in one layer, on a copy of the request.
    let Some(req) = request(&input) else {
        return;
    };
    let mut combined = FloodgateLayer::new(extractor, &stack, &cap, &shed).layer(Ok200);
    let response = now(combined.call(req)).expect("the layer never fails");
    check(response.status(), response.headers(), expected);
});
