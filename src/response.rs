//! What refused requests are answered with.
//!
//! HTTP requests get an RFC 9457 `application/problem+json` body:
//!
//! | cause | status | problem `type` | headers |
//! |---|---|---|---|
//! | tenant over its rate | 429 | `https://iana.org/assignments/http-problem-types#quota-exceeded` | `Retry-After`, `RateLimit-Policy`, `RateLimit` |
//! | tenant at its concurrency cap | 429 | `…#quota-exceeded` | `RateLimit-Policy` with `qu="concurrent-requests"`, `RateLimit` |
//! | server overloaded (global cap, shedding) | 503 | `…#temporary-reduced-capacity` | `Retry-After` |
//! | rate limit store unreachable, failing closed | 503 | `…#temporary-reduced-capacity` | `Retry-After` |
//! | no tenant key | 401 (or 400) | `about:blank` | `WWW-Authenticate` (with [`key::bearer`](crate::key::bearer)) |
//! | malformed or oversized key, bad cost | 400 | `about:blank` | |
//!
//! `Retry-After` is in whole seconds, rounded up, and never 0 when a wait is
//! needed; it is left out when no wait will help (the request costs more than
//! the burst). `RateLimit-Policy` and `RateLimit` follow the IETF httpapi
//! draft -10 (Structured Fields): `RateLimit-Policy: "pro";q=100;w=1` and
//! `RateLimit: "pro";r=0;t=1`, where `t` is the time until the next unit of
//! quota comes back.
//!
//! gRPC requests (`content-type: application/grpc…`) get a trailers-only gRPC
//! response instead: HTTP 200 with `grpc-status` (RESOURCE_EXHAUSTED for
//! quotas and caps, UNAVAILABLE when overloaded, UNAUTHENTICATED or
//! INVALID_ARGUMENT for keys), a percent-encoded `grpc-message`, and for
//! rate limits and overload `grpc-retry-pushback-ms` (negative: do not
//! retry) and `retry-after`, which tonic clients see in [`Status::metadata`].
//!
//! # Body types
//!
//! The HTTP layers answer with the inner service's own body type, so a
//! stack of them changes no types: in front of a service answering
//! `Response<B>`, each answers `Response<B>`. A refusal's body and a body
//! that keeps a permit until it is sent are boxed into `B`, which must
//! implement [`BoxedBody`]: axum's and tonic's `Body` and http-body-util's
//! boxed bodies do. A hyper service with a concrete body type boxes it
//! first:
//!
//! ```
//! use std::convert::Infallible;
//! use std::num::NonZeroU32;
//! use bytes::Bytes;
//! use http::{HeaderName, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder};
//! use tower_floodgate::{key, Quota, RateLimitLayer, RateLimiter};
//!
//! let limiter = RateLimiter::new(Quota::per_second(NonZeroU32::new(100).unwrap()));
//! let service = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limiter).key(key::header(HeaderName::from_static("x-tenant"))))
//!     .service(service_fn(|_: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hi")).boxed_unsync()))
//!     }));
//! # let _ = service;
//! ```
//!
//! [`Status::metadata`]: https://docs.rs/tonic/latest/tonic/struct.Status.html#method.metadata

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use pin_project_lite::pin_project;

use crate::error::{RateLimited, Rejection};
use crate::limiter::{DenyReason, Usage};
use crate::policy::Plan;

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `grpc-retry-pushback-ms`.
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
const REDUCED_CAPACITY: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

/// A response body type that can carry any other body: the body type the
/// HTTP layers answer with.
///
/// The layers hand back the inner service's own body type, so they change
/// no types in a stack. A refused request needs a body of the layer's own
/// (the problem document), and the concurrency cap and the shedder keep a
/// request's permit in its body until the body is sent. Both take a body
/// type that can hold another body, which is what this trait says.
///
/// It is implemented for axum's `Body` (feature `axum`), tonic's `Body`
/// (feature `tonic`), and http-body-util's [`BoxBody`] and
/// [`UnsyncBoxBody`]. Box any other body type first, with
/// [`BodyExt::boxed_unsync`](http_body_util::BodyExt::boxed_unsync).
///
/// Keeping the type also spares an allocation: axum boxes a route's body
/// once more whenever a layer changes its type.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_floodgate::response::BoxedBody;
///
/// fn takes<B: BoxedBody>(_: B) {}
/// // A concrete body, boxed once before the layers.
/// takes(Full::new(Bytes::from("hi")).boxed_unsync());
/// ```
///
/// [`BoxBody`]: http_body_util::combinators::BoxBody
/// [`UnsyncBoxBody`]: http_body_util::combinators::UnsyncBoxBody
pub trait BoxedBody: Body<Data = Bytes> + Sized + Send + 'static {
    /// `body` (a body of this type wrapped by a layer, or a layer's own
    /// body) as this type.
    fn boxed(body: ResponseBody<Self>) -> Self;
}

#[cfg(feature = "axum")]
impl BoxedBody for axum::body::Body {
    #[inline]
    fn boxed(body: ResponseBody<Self>) -> Self {
        // Boxed with axum's own error type, which `Body::new` takes as it
        // is instead of wrapping it once more.
        Self::new(UnsyncBoxBody::new(body))
    }
}

#[cfg(feature = "tonic")]
impl BoxedBody for tonic::body::Body {
    #[inline]
    fn boxed(body: ResponseBody<Self>) -> Self {
        Self::new(UnsyncBoxBody::new(body))
    }
}

impl<E: 'static> BoxedBody for UnsyncBoxBody<Bytes, E> {
    #[inline]
    fn boxed(body: ResponseBody<Self>) -> Self {
        Self::new(body)
    }
}

impl<E: 'static> BoxedBody for BoxBody<Bytes, E> {
    #[inline]
    fn boxed(body: ResponseBody<Self>) -> Self {
        Self::new(body)
    }
}

pin_project! {
    /// A layer's body around the inner service's body, or a layer's own body
    /// (a refusal's), handed to [`BoxedBody::boxed`].
    ///
    /// The concurrency and shedding layers keep the request's permit in it:
    /// it is returned when the body has sent its last frame, fails, or is
    /// dropped (the client went away), not when the handler returns.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        guard: Option<Guard>,
    }
}

/// What a request holds while in flight, kept by its response body until
/// the body is done; dropping it returns what it holds.
pub(crate) enum Guard {
    /// The concurrency cap's permit.
    Permit(crate::concurrency::Permit),
    /// The load shedder's.
    Shed(crate::shed::Permit),
    /// Both, for a [`FloodgateLayer`](crate::FloodgateLayer).
    Floodgate(crate::floodgate::Guard),
}

impl Guard {
    /// Whether it holds nothing.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Self::Permit(permit) => permit.is_empty(),
            Self::Shed(permit) => permit.is_empty(),
            Self::Floodgate(guard) => guard.is_empty(),
        }
    }

    /// The response head is ready (the load shedder measures latency to it).
    #[inline]
    pub(crate) fn responded(&mut self) {
        match self {
            Self::Permit(_) => {}
            Self::Shed(permit) => permit.responded(),
            Self::Floodgate(guard) => guard.responded(),
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed: rejections are rare, and every response carries the enum.
        Full { data: Option<Box<Bytes>> },
        // The start of a body already read, then the rest of it.
        Prefixed { prefix: Option<Box<Bytes>>, #[pin] body: B },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn guarded(body: B, guard: Guard) -> Self {
        Self {
            kind: Kind::Inner { body },
            guard: Some(guard),
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, body: B) -> Self {
        Self {
            kind: Kind::Prefixed {
                prefix: (!prefix.is_empty()).then(|| Box::new(prefix)),
                body,
            },
            guard: None,
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then(|| Box::new(data)),
            },
            guard: None,
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            Kind::Full { data } => f
                .debug_struct("ResponseBody::Rejection")
                .field("len", &data.as_ref().map_or(0, |d| d.len()))
                .finish(),
            Kind::Prefixed { .. } => f.write_str("ResponseBody::Prefixed"),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { body } => {
                let frame = body.poll_frame(cx);
                if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
                    // Done (or failed): give the permit back now.
                    this.guard.take();
                }
                frame
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(*d)))),
            KindProj::Prefixed { prefix, body } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(*prefix)))),
                None => body.poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, body } => {
                let start = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(start));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(start));
                }
                hint
            }
        }
    }
}

/// The answer of a response future polled again after it completed: a 500
/// rather than a panic.
#[cold]
pub(crate) fn after_completion<B: BoxedBody>() -> Response<B> {
    let mut response = Response::new(B::boxed(ResponseBody::full(Bytes::new())));
    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

/// Whether a request is gRPC, judging by its content type.
#[inline]
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response to a refused request; the rejection goes into its
/// extensions.
pub(crate) fn rejection_response<B: BoxedBody>(rejection: Rejection, grpc: bool) -> Response<B> {
    let mut response = if grpc {
        grpc_response(&rejection)
    } else {
        http_response(&rejection)
    };
    response.extensions_mut().insert(rejection);
    response.map(|data| B::boxed(ResponseBody::full(data)))
}

pub(crate) fn http_response(rejection: &Rejection) -> Response<Bytes> {
    let status = rejection.status();
    let mut body = String::with_capacity(256);
    body.push('{');
    match rejection {
        Rejection::RateLimited(limited) if limited.reason() == DenyReason::StoreUnavailable => {
            json_member(&mut body, "type", REDUCED_CAPACITY);
            json_member(&mut body, "title", "Temporary Reduced Capacity");
            body.push_str(&format!(",\"status\":{}", status.as_u16()));
            json_member(&mut body, "detail", &limited.denied().describe());
        }
        Rejection::RateLimited(limited) => {
            json_member(&mut body, "type", QUOTA_EXCEEDED);
            json_member(&mut body, "title", "Quota Exceeded");
            body.push_str(&format!(",\"status\":{}", status.as_u16()));
            json_member(&mut body, "detail", &limited.denied().describe());
            body.push_str(",\"violated-policies\":[");
            json_string(&mut body, limited.plan().name());
            body.push(']');
            if let Some(wait) = limited.denied().retry_after() {
                body.push_str(&format!(",\"retry_after\":{}", ceil_secs(wait)));
            }
        }
        Rejection::ConcurrencyCapped(capped) => {
            json_member(&mut body, "type", QUOTA_EXCEEDED);
            json_member(&mut body, "title", "Quota Exceeded");
            body.push_str(&format!(",\"status\":{}", status.as_u16()));
            json_member(&mut body, "detail", &capped.to_string());
            body.push_str(",\"violated-policies\":[");
            json_string(&mut body, capped.plan().name());
            body.push(']');
        }
        Rejection::Overloaded(overloaded) => {
            json_member(&mut body, "type", REDUCED_CAPACITY);
            json_member(&mut body, "title", "Temporary Reduced Capacity");
            body.push_str(&format!(",\"status\":{}", status.as_u16()));
            json_member(&mut body, "detail", &overloaded.to_string());
            body.push_str(&format!(
                ",\"retry_after\":{}",
                ceil_secs(overloaded.retry_after())
            ));
        }
        other => {
            json_member(&mut body, "type", "about:blank");
            json_member(
                &mut body,
                "title",
                status.canonical_reason().unwrap_or("Error"),
            );
            body.push_str(&format!(",\"status\":{}", status.as_u16()));
            json_member(&mut body, "detail", &other.to_string());
        }
    }
    body.push('}');

    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, PROBLEM_JSON);
    match rejection {
        Rejection::RateLimited(limited) => rate_limited_headers(headers, limited),
        Rejection::ConcurrencyCapped(capped) => capped_headers(headers, capped),
        Rejection::Overloaded(overloaded) => {
            headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(overloaded.retry_after())));
        }
        Rejection::MissingKey {
            challenge: Some(challenge),
            ..
        } => {
            headers.insert(WWW_AUTHENTICATE, challenge.clone());
        }
        _ => {}
    }
    response
}

fn grpc_response(rejection: &Rejection) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, GRPC);
    headers.insert(
        GRPC_STATUS,
        HeaderValue::from(rejection.grpc_code().as_i32()),
    );
    if let Ok(message) = HeaderValue::from_str(&percent_encode(&rejection.to_string())) {
        headers.insert(GRPC_MESSAGE, message);
    }
    for (name, value) in grpc_metadata(rejection) {
        headers.insert(name, value);
    }
    response
}

/// The custom metadata of a gRPC rejection.
pub(crate) fn grpc_metadata(rejection: &Rejection) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = HeaderMap::new();
    let pushback = match rejection {
        Rejection::RateLimited(limited) => {
            rate_limited_headers(&mut headers, limited);
            Some(limited.denied().retry_after())
        }
        Rejection::ConcurrencyCapped(capped) => {
            capped_headers(&mut headers, capped);
            None
        }
        Rejection::Overloaded(overloaded) => {
            let wait = overloaded.retry_after();
            headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
            Some(Some(wait))
        }
        _ => None,
    };
    let mut out = Vec::new();
    if let Some(wait) = pushback {
        let ms = match wait {
            Some(wait) => i32::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
            None => -1,
        };
        out.push((GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(ms)));
    }
    out.extend(headers.into_iter().filter_map(|(n, v)| Some((n?, v))));
    out
}

fn capped_headers(headers: &mut HeaderMap, capped: &crate::error::ConcurrencyCapped) {
    if let Some(policy) = capped.plan().concurrency_policy_header() {
        headers.insert(RATELIMIT_POLICY, policy.clone());
    }
    let value = format!("{};r=0", capped.plan().sf_name());
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(RATELIMIT, value);
    }
}

fn rate_limited_headers(headers: &mut HeaderMap, limited: &RateLimited) {
    if let Some(wait) = limited.denied().retry_after() {
        headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
    }
    if let Some(policy) = limited.plan().rate_policy_header() {
        headers.insert(RATELIMIT_POLICY, policy.clone());
    }
    headers.insert(
        RATELIMIT,
        ratelimit_value(limited.plan(), limited.denied().usage()),
    );
}

/// The `RateLimit` field value for `plan` in state `usage`.
pub(crate) fn ratelimit_value(plan: &Plan, usage: &Usage) -> HeaderValue {
    let mut value = String::with_capacity(plan.sf_name().len() + 24);
    value.push_str(plan.sf_name());
    value.push_str(";r=");
    value.push_str(itoa::Buffer::new().format(usage.remaining()));
    if !usage.next_unit_after().is_zero() {
        value.push_str(";t=");
        value.push_str(itoa::Buffer::new().format(ceil_secs(usage.next_unit_after())));
    }
    // Built from printable ASCII only.
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("\"default\";r=0"))
}

/// Whole seconds, rounded up: never 0 for a non-zero wait.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

fn json_member(out: &mut String, name: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    json_string(out, name);
    out.push(':');
    json_string(out, value);
}

pub(crate) fn json_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    // Copies runs that need no escape in one go: most strings are one run.
    // Every character to escape is ASCII but U+2028 and U+2029 (E2 80 A8/A9
    // in UTF-8), so the scan is over bytes.
    let bytes = s.as_bytes();
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let len = match b {
            b'"' | b'\\' | 0..0x20 => 1,
            0xE2 if bytes.get(i + 1) == Some(&0x80)
                && matches!(bytes.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                3
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[run..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0xE2 => out.push_str(if bytes[i + 2] == 0xA8 {
                "\\u2028"
            } else {
                "\\u2029"
            }),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        i += len;
        run = i;
    }
    out.push_str(&s[run..]);
    out.push('"');
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside 0x20–0x7E, and
/// `%`, as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_secs_rounds_up_and_never_gives_zero_for_a_wait() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001""#);
        // Multi-byte characters pass; the two JavaScript line breaks and
        // every control character are escaped; the output is valid JSON.
        let input = "é\u{2028}x\u{2029}\u{1f}→\t\r\u{e2}";
        let mut s = String::new();
        json_string(&mut s, input);
        assert_eq!(s, r#""é\u2028x\u2029\u001f→\t\râ""#);
        let parsed: String = serde_json::from_str(&s).unwrap_or_default();
        assert_eq!(parsed, input);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off: é\n"), "50%25 off: %C3%A9%0A");
    }

    #[test]
    fn grpc_detection() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
    }
}
