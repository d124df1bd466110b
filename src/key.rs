//! Tenant keys: who is making a request.
//!
//! Every decision of this crate is per tenant. A [`KeyExtractor`] turns a
//! request into a [`TenantKey`]; the built-ins are:
//!
//! | extractor | reads | use when |
//! |---|---|---|
//! | [`extension::<T>()`](extension) | a typed request extension set by your auth layer | **the safe default**: identity comes from authentication |
//! | [`header(name)`](header) | one header's value | a trusted proxy in front sets it |
//! | [`bearer()`](bearer) | the token of `Authorization: Bearer …` | API keys are the tenants |
//! | [`peer_addr()`](peer_addr) | the client's IP address | anonymous traffic |
//! | [`from_fn(f)`](from_fn) | anything | none of the above fits |
//!
//! A header or a token is whatever the client sends: anyone can claim to be
//! any tenant with it, and rotate through millions of made-up keys. Prefer an
//! extension set after authentication. Whatever the source, the layers bound
//! what a key can cost: a key longer than the configured maximum (256 bytes
//! by default) is refused before anything is stored, and the rate limiter
//! caps how many tenants it tracks.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};

const INLINE: usize = 39;

/// Who a request belongs to: an opaque byte string.
///
/// Keys up to 39 bytes (a UUID, an IPv6 address) are stored inline, without
/// allocating; longer ones are shared, reference-counted bytes. Two keys are equal when
/// their bytes are.
///
/// A key can be marked [sensitive](TenantKey::sensitive) (the
/// [`bearer`] extractor does so): its `Display` and `Debug` forms then show a
/// short fingerprint instead of the bytes, so that API keys do not end up in
/// logs. Any other key is displayed with control and non-ASCII bytes escaped,
/// so a hostile key cannot forge log lines.
///
/// # Examples
///
/// ```
/// use tower_floodgate::TenantKey;
///
/// let key = TenantKey::from("acme");
/// assert_eq!(key.as_bytes(), b"acme");
/// assert_eq!(key, TenantKey::from(String::from("acme")));
/// assert_eq!(TenantKey::from(42u64).as_bytes(), b"42");
/// assert_eq!(TenantKey::from("a\nb").to_string(), "a\\nb");
/// assert!(TenantKey::from("secret").sensitive().to_string().starts_with("<redacted"));
/// ```
#[derive(Clone)]
pub struct TenantKey {
    repr: Repr,
    sensitive: bool,
}

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Bytes),
}

impl TenantKey {
    /// A key from a static string, without allocating.
    #[must_use]
    pub const fn from_static(s: &'static str) -> Self {
        Self {
            repr: Repr::Shared(Bytes::from_static(s.as_bytes())),
            sensitive: false,
        }
    }

    /// The shared key of requests without one, when the layer is configured
    /// with [`MissingKey::Anonymous`](crate::MissingKey::Anonymous): the empty
    /// key, which no extractor ever returns.
    #[must_use]
    pub const fn anonymous() -> Self {
        Self::from_static("")
    }

    /// A key holding a copy of `bytes`.
    #[must_use]
    #[inline]
    pub fn copy_from_slice(bytes: &[u8]) -> Self {
        if bytes.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Self {
                repr: Repr::Inline {
                    len: bytes.len() as u8,
                    buf,
                },
                sensitive: false,
            }
        } else {
            Self::from(Bytes::copy_from_slice(bytes))
        }
    }

    /// The same key, marked sensitive: shown as a fingerprint, never as its
    /// bytes, in logs and errors.
    #[must_use]
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }

    /// Whether the key is shown as a fingerprint only.
    #[must_use]
    pub fn is_sensitive(&self) -> bool {
        self.sensitive
    }

    /// The key's bytes.
    #[must_use]
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }

    /// The key as text, if it is UTF-8.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_bytes()).ok()
    }

    /// Length in bytes.
    #[must_use]
    #[inline]
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the key has no bytes.
    #[must_use]
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn from_display(value: impl fmt::Display) -> Self {
        use std::io::Write;
        let mut buf = [0u8; INLINE];
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        if write!(cursor, "{value}").is_ok() {
            let len = cursor.position() as usize;
            return Self::copy_from_slice(&buf[..len]);
        }
        Self::from(value.to_string())
    }
}

impl AsRef<[u8]> for TenantKey {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for TenantKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for TenantKey {}

impl PartialOrd for TenantKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TenantKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Hash for TenantKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Display for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sensitive {
            return write!(f, "<redacted:{:08x}>", redaction_tag(self.as_bytes()));
        }
        for chunk in self.as_bytes().utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() || c == '\\' {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    f.write_fmt(format_args!("{c}"))?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKey(\"{self}\")")
    }
}

/// A stable (per process) 32-bit tag to correlate redacted keys in logs.
fn redaction_tag(bytes: &[u8]) -> u32 {
    (crate::hash::tenant_hash(bytes) >> 32) as u32
}

impl From<&str> for TenantKey {
    fn from(s: &str) -> Self {
        Self::copy_from_slice(s.as_bytes())
    }
}

impl From<String> for TenantKey {
    fn from(s: String) -> Self {
        if s.len() <= INLINE {
            Self::copy_from_slice(s.as_bytes())
        } else {
            Self::from(Bytes::from(s))
        }
    }
}

impl From<&[u8]> for TenantKey {
    fn from(bytes: &[u8]) -> Self {
        Self::copy_from_slice(bytes)
    }
}

impl From<Vec<u8>> for TenantKey {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from(Bytes::from(bytes))
    }
}

impl From<Bytes> for TenantKey {
    fn from(bytes: Bytes) -> Self {
        Self {
            repr: Repr::Shared(bytes),
            sensitive: false,
        }
    }
}

impl From<&HeaderValue> for TenantKey {
    #[inline]
    fn from(value: &HeaderValue) -> Self {
        Self::copy_from_slice(value.as_bytes())
    }
}

macro_rules! display_keys {
    ($($t:ty),*) => {$(
        impl From<$t> for TenantKey {
            fn from(value: $t) -> Self {
                Self::from_display(value)
            }
        }
    )*};
}

display_keys!(u16, u32, u64, u128, i32, i64, IpAddr);

/// Types that identify a tenant and can be stored as a request extension,
/// for the [`extension`] extractor.
///
/// Implement it for the identity type your authentication layer inserts.
///
/// ```
/// use tower_floodgate::{key::AsTenantKey, TenantKey};
///
/// #[derive(Clone)]
/// struct Account { id: u64, plan: &'static str }
///
/// impl AsTenantKey for Account {
///     fn tenant_key(&self) -> TenantKey {
///         TenantKey::from(self.id)
///     }
/// }
/// ```
pub trait AsTenantKey {
    /// The tenant this value identifies.
    fn tenant_key(&self) -> TenantKey;

    /// The bytes of [`tenant_key`](Self::tenant_key), borrowed, if the
    /// value holds them as they are (see [`KeyExtractor::key_bytes`]).
    /// `None` by default.
    #[inline]
    fn key_bytes(&self) -> Option<&[u8]> {
        None
    }
}

impl AsTenantKey for TenantKey {
    fn tenant_key(&self) -> TenantKey {
        self.clone()
    }

    #[inline]
    fn key_bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}

impl AsTenantKey for String {
    fn tenant_key(&self) -> TenantKey {
        TenantKey::from(self.as_str())
    }

    #[inline]
    fn key_bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}

impl AsTenantKey for std::sync::Arc<str> {
    fn tenant_key(&self) -> TenantKey {
        TenantKey::from(&**self)
    }

    #[inline]
    fn key_bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}

impl AsTenantKey for &'static str {
    fn tenant_key(&self) -> TenantKey {
        TenantKey::from_static(self)
    }

    #[inline]
    fn key_bytes(&self) -> Option<&[u8]> {
        Some(self.as_bytes())
    }
}

macro_rules! as_key_by_value {
    ($($t:ty),*) => {$(
        impl AsTenantKey for $t {
            fn tenant_key(&self) -> TenantKey {
                TenantKey::from(*self)
            }
        }
    )*};
}

as_key_by_value!(u16, u32, u64, u128, i32, i64, IpAddr);

/// Why no tenant key could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The request carries no tenant key.
    #[error("the request carries no tenant key")]
    Missing,
    /// The request carries something that is not a valid key.
    #[error("the tenant key is invalid: {0}")]
    Invalid(&'static str),
}

/// Takes the tenant key from a request.
///
/// `Req` is the request type: the built-in extractors work on any
/// [`http::Request<B>`]. Implemented for closures through [`from_fn`].
pub trait KeyExtractor<Req: ?Sized> {
    /// The tenant `req` belongs to.
    ///
    /// # Errors
    ///
    /// [`KeyError::Missing`] when the request has no key (the layer answers
    /// 401 by default), [`KeyError::Invalid`] when it has a malformed one
    /// (400).
    fn extract(&self, req: &Req) -> Result<TenantKey, KeyError>;

    /// The bytes [`extract`](Self::extract) would give as the key, borrowed
    /// from `req`, for extractors that can lend them without building a
    /// [`TenantKey`]: the layers' common case hashes them and builds the key
    /// itself only when it needs one (a refusal, an observer).
    ///
    /// Must agree with `extract`: the same bytes when it gives a key, and
    /// `None` when it gives an error. `None` by default, and the layers
    /// then call `extract`.
    #[inline]
    fn key_bytes<'r>(&self, req: &'r Req) -> Option<&'r [u8]> {
        let _ = req;
        None
    }

    /// The `WWW-Authenticate` challenge to send with the 401 answering a
    /// request without a key (RFC 9110 §15.5.2), if this extractor reads a
    /// credential. `None` by default.
    fn challenge(&self) -> Option<http::HeaderValue> {
        None
    }
}

/// Reads a typed request extension. See [`extension`].
pub struct Extension<T> {
    _marker: PhantomData<fn() -> T>,
}

/// The tenant key from a request extension of type `T`, inserted by an
/// authentication layer that runs before the limiter.
///
/// This is the safe default: the tenant is whoever authentication says the
/// caller is, not what a header claims.
///
/// ```
/// use http::Request;
/// use tower_floodgate::{key::{self, KeyExtractor}, TenantKey};
///
/// let mut req = Request::new(());
/// req.extensions_mut().insert(TenantKey::from("acme"));
/// assert_eq!(key::extension::<TenantKey>().extract(&req), Ok(TenantKey::from("acme")));
/// ```
#[must_use]
pub fn extension<T>() -> Extension<T> {
    Extension {
        _marker: PhantomData,
    }
}

impl<T> Clone for Extension<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Extension<T> {}

impl<T> Default for Extension<T> {
    fn default() -> Self {
        extension()
    }
}

impl<T> fmt::Debug for Extension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Extension<{}>", std::any::type_name::<T>())
    }
}

impl<T, B> KeyExtractor<http::Request<B>> for Extension<T>
where
    T: AsTenantKey + Send + Sync + 'static,
{
    #[inline]
    fn extract(&self, req: &http::Request<B>) -> Result<TenantKey, KeyError> {
        match req.extensions().get::<T>() {
            Some(value) => non_empty(value.tenant_key()),
            None => Err(KeyError::Missing),
        }
    }

    #[inline]
    fn key_bytes<'r>(&self, req: &'r http::Request<B>) -> Option<&'r [u8]> {
        req.extensions()
            .get::<T>()?
            .key_bytes()
            .filter(|bytes| !bytes.is_empty())
    }
}

/// Reads one header. See [`header`].
#[derive(Clone, Debug)]
pub struct Header {
    name: HeaderName,
}

/// The tenant key from the value of header `name`.
///
/// Only trust a header that a proxy you control sets (and strips from client
/// requests). A request with the header twice is refused as invalid, so that
/// a client cannot smuggle a second identity past a proxy that appends.
///
/// ```
/// use http::{header::HeaderName, Request};
/// use tower_floodgate::{key::{self, KeyError, KeyExtractor}, TenantKey};
///
/// let tenant = key::header(HeaderName::from_static("x-tenant-id"));
/// let req = Request::builder().header("x-tenant-id", "acme").body(()).unwrap();
/// assert_eq!(tenant.extract(&req), Ok(TenantKey::from("acme")));
/// assert_eq!(tenant.extract(&Request::new(())), Err(KeyError::Missing));
/// ```
#[must_use]
pub fn header(name: HeaderName) -> Header {
    Header { name }
}

/// Up to this many distinct header names, a request's headers are scanned
/// for the tenant header: comparing a few names costs less than hashing one
/// for the lookup.
const SCAN_HEADERS: usize = 12;

impl Header {
    /// The header's one value, or why there is none.
    #[inline]
    fn find<'r>(&self, headers: &'r http::HeaderMap) -> Result<&'r HeaderValue, KeyError> {
        const TWICE: KeyError = KeyError::Invalid("the tenant header appears more than once");
        if headers.keys_len() <= SCAN_HEADERS {
            let mut found = None;
            for (name, value) in headers {
                if *name == self.name {
                    if found.is_some() {
                        return Err(TWICE);
                    }
                    found = Some(value);
                }
            }
            found.ok_or(KeyError::Missing)
        } else {
            let mut values = headers.get_all(&self.name).iter();
            let value = values.next().ok_or(KeyError::Missing)?;
            if values.next().is_some() {
                return Err(TWICE);
            }
            Ok(value)
        }
    }
}

impl<B> KeyExtractor<http::Request<B>> for Header {
    #[inline]
    fn extract(&self, req: &http::Request<B>) -> Result<TenantKey, KeyError> {
        non_empty(TenantKey::from(self.find(req.headers())?))
    }

    #[inline]
    fn key_bytes<'r>(&self, req: &'r http::Request<B>) -> Option<&'r [u8]> {
        let value = self.find(req.headers()).ok()?.as_bytes();
        (!value.is_empty()).then_some(value)
    }
}

/// Reads a bearer token. See [`bearer`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Bearer {
    _priv: (),
}

/// The tenant key is the token of an `Authorization: Bearer <token>` header
/// (RFC 6750; the scheme is matched case-insensitively).
///
/// The key is marked [sensitive](TenantKey::sensitive), so the token never
/// shows in logs. A request without an `Authorization` header, or with
/// another scheme, has no key; a malformed bearer header is invalid.
///
/// ```
/// use http::Request;
/// use tower_floodgate::key::{self, KeyError, KeyExtractor};
///
/// let req = Request::builder().header("authorization", "Bearer k3y").body(()).unwrap();
/// assert_eq!(key::bearer().extract(&req).unwrap().as_bytes(), b"k3y");
/// let basic = Request::builder().header("authorization", "Basic Zm9v").body(()).unwrap();
/// assert_eq!(key::bearer().extract(&basic), Err(KeyError::Missing));
/// ```
#[must_use]
pub fn bearer() -> Bearer {
    Bearer { _priv: () }
}

impl<B> KeyExtractor<http::Request<B>> for Bearer {
    fn extract(&self, req: &http::Request<B>) -> Result<TenantKey, KeyError> {
        Ok(TenantKey::copy_from_slice(bearer_token(req.headers())?).sensitive())
    }

    #[inline]
    fn key_bytes<'r>(&self, req: &'r http::Request<B>) -> Option<&'r [u8]> {
        bearer_token(req.headers()).ok()
    }

    fn challenge(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("Bearer"))
    }
}

/// The token of the request's one `Authorization: Bearer` header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&[u8], KeyError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(KeyError::Missing)?;
    if values.next().is_some() {
        return Err(KeyError::Invalid(
            "the Authorization header appears more than once",
        ));
    }
    let bytes = value.as_bytes().trim_ascii();
    if bytes.eq_ignore_ascii_case(b"bearer") {
        return Err(KeyError::Invalid("the bearer token is empty"));
    }
    let Some((scheme, token)) = bytes.split_at_checked(7) else {
        return Err(KeyError::Missing);
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Err(KeyError::Missing);
    }
    let token = token.trim_ascii();
    if token.is_empty() {
        return Err(KeyError::Invalid("the bearer token is empty"));
    }
    if !token.iter().all(|&b| is_token68(b)) {
        return Err(KeyError::Invalid(
            "the bearer token has characters outside RFC 6750's token68",
        ));
    }
    Ok(token)
}

fn is_token68(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// Reads the client's address. See [`peer_addr`].
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr {
    ipv6_prefix: u8,
}

/// The tenant key is the client's IP address (without the port).
///
/// It is read from, in order: axum's `ConnectInfo<SocketAddr>` (feature
/// `axum`; serve with `into_make_service_with_connect_info::<SocketAddr>()`),
/// tonic's `TcpConnectInfo` (feature `tonic`), and a plain [`SocketAddr`]
/// extension. IPv4-mapped IPv6 addresses count as their IPv4 address.
///
/// Behind a reverse proxy every request has the proxy's address; use
/// [`header`] with the header the proxy sets instead. A tonic server with
/// TLS stores its address as `TlsConnectInfo<TcpConnectInfo>`, which this
/// extractor does not read: there, use [`from_fn`] over that extension.
///
/// ```
/// use std::net::SocketAddr;
/// use http::Request;
/// use tower_floodgate::{key::{self, KeyExtractor}, TenantKey};
///
/// let mut req = Request::new(());
/// req.extensions_mut().insert(SocketAddr::from(([10, 0, 0, 7], 51234)));
/// assert_eq!(key::peer_addr().extract(&req), Ok(TenantKey::from("10.0.0.7")));
/// ```
#[must_use]
pub fn peer_addr() -> PeerAddr {
    PeerAddr { ipv6_prefix: 128 }
}

impl PeerAddr {
    /// Treat all IPv6 addresses that share their first `bits` bits as one
    /// tenant (values above 128 mean 128). A client usually owns a whole /64,
    /// so limiting single IPv6 addresses lets it rotate through 2⁶⁴ keys;
    /// `ipv6_prefix(64)` counts the whole network as one.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use http::Request;
    /// use tower_floodgate::{key::{self, KeyExtractor}, TenantKey};
    ///
    /// let mut req = Request::new(());
    /// let addr: SocketAddr = "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443".parse().unwrap();
    /// req.extensions_mut().insert(addr);
    /// let key = key::peer_addr().ipv6_prefix(64).extract(&req).unwrap();
    /// assert_eq!(key, TenantKey::from("2001:db8:1:2::"));
    /// ```
    #[must_use]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    fn key(&self, ip: IpAddr) -> TenantKey {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.ipv6_prefix))
                        .unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(bits & mask))
                }
            },
            v4 => v4,
        };
        TenantKey::from(ip)
    }
}

impl Default for PeerAddr {
    fn default() -> Self {
        peer_addr()
    }
}

impl<B> KeyExtractor<http::Request<B>> for PeerAddr {
    fn extract(&self, req: &http::Request<B>) -> Result<TenantKey, KeyError> {
        let ext = req.extensions();
        #[cfg(feature = "axum")]
        if let Some(info) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
            return Ok(self.key(info.0.ip()));
        }
        #[cfg(feature = "tonic")]
        if let Some(addr) = ext
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
        {
            return Ok(self.key(addr.ip()));
        }
        match ext.get::<SocketAddr>() {
            Some(addr) => Ok(self.key(addr.ip())),
            None => Err(KeyError::Missing),
        }
    }
}

/// A closure extractor. See [`from_fn`].
#[derive(Clone, Copy)]
pub struct FromFn<F> {
    f: F,
}

/// A key extractor from a closure returning `Some(key)` or `None` (missing).
///
/// ```
/// use http::Request;
/// use tower_floodgate::{key::{self, KeyExtractor}, TenantKey};
///
/// // The first path segment names the tenant: /t/{tenant}/…
/// let tenant = key::from_fn(|req: &Request<()>| {
///     let mut parts = req.uri().path().split('/').skip(1);
///     match (parts.next(), parts.next()) {
///         (Some("t"), Some(id)) if !id.is_empty() => Some(TenantKey::from(id)),
///         _ => None,
///     }
/// });
/// let req = Request::builder().uri("/t/acme/purge").body(()).unwrap();
/// assert_eq!(tenant.extract(&req), Ok(TenantKey::from("acme")));
/// ```
pub fn from_fn<F>(f: F) -> FromFn<F> {
    FromFn { f }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<F, Req> KeyExtractor<Req> for FromFn<F>
where
    F: Fn(&Req) -> Option<TenantKey>,
{
    fn extract(&self, req: &Req) -> Result<TenantKey, KeyError> {
        (self.f)(req).map_or(Err(KeyError::Missing), non_empty)
    }
}

/// An empty key is treated as no key: it is reserved for the shared
/// anonymous bucket.
#[inline]
fn non_empty(key: TenantKey) -> Result<TenantKey, KeyError> {
    if key.is_empty() {
        Err(KeyError::Missing)
    } else {
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn req_with(name: &str, values: &[&str]) -> Request<()> {
        let mut b = Request::builder();
        for v in values {
            b = b.header(name, *v);
        }
        b.body(()).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn keys_compare_by_bytes_whatever_their_storage() {
        let long = "x".repeat(100);
        assert_eq!(
            TenantKey::from(long.as_str()),
            TenantKey::from(long.clone())
        );
        assert_eq!(
            TenantKey::from(&HeaderValue::from_static("abc")),
            TenantKey::from_static("abc")
        );
        assert_eq!(TenantKey::from("abc").sensitive(), TenantKey::from("abc"));
        assert_eq!(TenantKey::from(long).len(), 100);
        assert_eq!(
            TenantKey::from(IpAddr::from([1, 2, 3, 4])).as_str(),
            Some("1.2.3.4")
        );
        assert_eq!(TenantKey::from(u128::MAX).len(), 39);
    }

    #[test]
    fn display_escapes_hostile_bytes() {
        let key = TenantKey::from(&b"evil\r\nlevel=ERROR \xff\\"[..]);
        assert_eq!(key.to_string(), "evil\\r\\nlevel=ERROR \\xff\\\\");
        let secret = TenantKey::from("sk_live_123").sensitive();
        assert!(!format!("{secret:?}").contains("sk_live"));
    }

    #[test]
    fn header_extractor_with_many_headers_looks_the_name_up() {
        let h = header(HeaderName::from_static("x-tenant"));
        let mut req = req_with("x-tenant", &["acme"]);
        for i in 0..2 * SCAN_HEADERS {
            let name = HeaderName::try_from(format!("x-other-{i}"))
                .unwrap_or_else(|e| unreachable!("{e}"));
            req.headers_mut().insert(name, HeaderValue::from_static("v"));
        }
        assert_eq!(h.extract(&req), Ok(TenantKey::from("acme")));
        req.headers_mut()
            .append("x-tenant", HeaderValue::from_static("evil"));
        assert!(matches!(h.extract(&req), Err(KeyError::Invalid(_))));
        req.headers_mut().remove("x-tenant");
        assert_eq!(h.extract(&req), Err(KeyError::Missing));
    }

    #[test]
    fn header_extractor() {
        let h = header(HeaderName::from_static("x-tenant"));
        assert_eq!(
            h.extract(&req_with("x-tenant", &["acme"])),
            Ok(TenantKey::from("acme"))
        );
        assert_eq!(
            h.extract(&req_with("x-tenant", &[""])),
            Err(KeyError::Missing)
        );
        assert!(matches!(
            h.extract(&req_with("x-tenant", &["a", "b"])),
            Err(KeyError::Invalid(_))
        ));
    }

    /// The bytes an extractor lends (its fast path) are exactly the key it
    /// extracts, or nothing where it gives no key.
    #[test]
    fn lent_bytes_are_the_extracted_key() {
        fn agree<K: KeyExtractor<Request<()>>>(k: &K, req: &Request<()>) {
            let extracted = k.extract(req);
            let lent = k.key_bytes(req);
            match &extracted {
                Ok(key) => assert_eq!(lent, Some(key.as_bytes())),
                Err(_) => assert_eq!(lent, None),
            }
        }
        let h = header(HeaderName::from_static("x-tenant"));
        for values in [&["acme"][..], &[""], &["a", "b"], &[], &["\u{e9}x"]] {
            agree(&h, &req_with("x-tenant", values));
        }
        let mut many = req_with("x-tenant", &["acme"]);
        for i in 0..2 * SCAN_HEADERS {
            let name = HeaderName::try_from(format!("x-other-{i}"))
                .unwrap_or_else(|e| unreachable!("{e}"));
            many.headers_mut().insert(name, HeaderValue::from_static("v"));
        }
        agree(&h, &many);
        let b = bearer();
        for value in [
            "Bearer tok.en-1==",
            "bEaReR   spaced  ",
            "Basic abc",
            "Bearer",
            "Bearer a b",
            "Bearer \u{e9}",
        ] {
            agree(&b, &req_with("authorization", &[value]));
        }
        agree(&b, &req_with("authorization", &["Bearer a", "Bearer b"]));
        agree(&b, &Request::new(()));

        let mut req = Request::new(());
        agree(&extension::<TenantKey>(), &req);
        req.extensions_mut().insert(TenantKey::from("acme"));
        agree(&extension::<TenantKey>(), &req);
        req.extensions_mut().insert(String::new());
        agree(&extension::<String>(), &req);
        req.extensions_mut().insert(String::from("acme"));
        agree(&extension::<String>(), &req);
        // A value that formats its key lends nothing; the layers extract it.
        req.extensions_mut().insert(7_u64);
        assert_eq!(extension::<u64>().key_bytes(&req), None);
        assert_eq!(extension::<u64>().extract(&req), Ok(TenantKey::from("7")));
    }

    #[test]
    fn bearer_extractor() {
        let b = bearer();
        let key = b.extract(&req_with("authorization", &["bEaReR  tok.en-1=="]));
        assert_eq!(key, Ok(TenantKey::from("tok.en-1==")));
        assert!(key.is_ok_and(|k| k.is_sensitive()));
        assert_eq!(
            b.extract(&req_with("authorization", &["Basic abc"])),
            Err(KeyError::Missing)
        );
        assert_eq!(
            b.extract(&req_with("authorization", &["Bear"])),
            Err(KeyError::Missing)
        );
        assert!(matches!(
            b.extract(&req_with("authorization", &["Bearer"])),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            b.extract(&req_with("authorization", &["Bearer   "])),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            b.extract(&req_with("authorization", &["Bearer a b"])),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(b.extract(&Request::new(())), Err(KeyError::Missing));
    }

    #[test]
    fn peer_addr_extractor() {
        let mut req = Request::new(());
        assert_eq!(peer_addr().extract(&req), Err(KeyError::Missing));
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:80"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}"));
        req.extensions_mut().insert(mapped);
        assert_eq!(peer_addr().extract(&req), Ok(TenantKey::from("192.0.2.1")));
        let v6: SocketAddr = "[2001:db8::ff]:80"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}"));
        req.extensions_mut().insert(v6);
        assert_eq!(
            peer_addr().extract(&req),
            Ok(TenantKey::from("2001:db8::ff"))
        );
        assert_eq!(
            peer_addr().ipv6_prefix(0).extract(&req),
            Ok(TenantKey::from("::"))
        );
        assert_eq!(
            peer_addr().ipv6_prefix(200).extract(&req),
            Ok(TenantKey::from("2001:db8::ff"))
        );
    }

    #[cfg(feature = "axum")]
    #[test]
    fn peer_addr_reads_axum_connect_info_first() {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(SocketAddr::from(([10, 0, 0, 1], 1)));
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::from((
                [10, 0, 0, 2],
                1,
            ))));
        assert_eq!(peer_addr().extract(&req), Ok(TenantKey::from("10.0.0.2")));
    }

    #[test]
    fn extension_extractor_with_user_type() {
        #[derive(Clone)]
        struct Account(u64);
        impl AsTenantKey for Account {
            fn tenant_key(&self) -> TenantKey {
                TenantKey::from(self.0)
            }
        }
        let mut req = Request::new(());
        assert_eq!(extension::<Account>().extract(&req), Err(KeyError::Missing));
        req.extensions_mut().insert(Account(7));
        assert_eq!(
            extension::<Account>().extract(&req),
            Ok(TenantKey::from("7"))
        );
        req.extensions_mut().insert(String::new());
        assert_eq!(extension::<String>().extract(&req), Err(KeyError::Missing));
    }
}
