//! What a request costs.
//!
//! By default every request costs one unit of its tenant's quota. A purge of
//! 200 URLs can cost 200: give the layer a [`RequestCost`] that reads the
//! cost from the request (a header set by a gateway, an extension set by an
//! earlier layer), or, when the cost is only known after parsing the body,
//! charge it from the handler with [`RateLimiter::check`](crate::RateLimiter::check).

use std::fmt;

use http::HeaderName;

/// Reads the cost of a request, in quota units.
pub trait RequestCost<Req: ?Sized> {
    /// The cost of `req`.
    ///
    /// # Errors
    ///
    /// [`InvalidCost`] when the request states a cost that is not a number;
    /// the layer answers 400.
    fn cost(&self, req: &Req) -> Result<u32, InvalidCost>;
}

/// Why a request's cost could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request cost is invalid: {reason}")]
pub struct InvalidCost {
    reason: &'static str,
}

impl InvalidCost {
    /// An invalid cost, for the reason given.
    #[must_use]
    pub const fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// Why the cost is invalid.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Every request costs one unit. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

impl<Req: ?Sized> RequestCost<Req> for UnitCost {
    #[inline]
    fn cost(&self, _: &Req) -> Result<u32, InvalidCost> {
        Ok(1)
    }
}

/// Reads the cost from a header. See [`header`].
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
}

/// The cost is the decimal number in header `name`; a request without the
/// header costs 1, one with a value that is not a number up to 4 294 967 295,
/// or with the header more than once (a client's value before the one a
/// proxy appends), is refused with 400.
///
/// Only for a header a trusted component sets: a client choosing its own
/// cost could choose 0.
///
/// ```
/// use http::{HeaderName, Request};
/// use tower_floodgate::cost::{self, RequestCost};
///
/// let cost = cost::header(HeaderName::from_static("x-purge-count"));
/// let req = Request::builder().header("x-purge-count", "200").body(()).unwrap();
/// assert_eq!(cost.cost(&req), Ok(200));
/// assert_eq!(cost.cost(&Request::new(())), Ok(1));
/// let bad = Request::builder().header("x-purge-count", "-1").body(()).unwrap();
/// assert!(cost.cost(&bad).is_err());
/// let twice = Request::builder()
///     .header("x-purge-count", "0")
///     .header("x-purge-count", "200")
///     .body(())
///     .unwrap();
/// assert!(cost.cost(&twice).is_err());
/// ```
#[must_use]
pub fn header(name: HeaderName) -> Header {
    Header { name }
}

impl<B> RequestCost<http::Request<B>> for Header {
    fn cost(&self, req: &http::Request<B>) -> Result<u32, InvalidCost> {
        let mut values = req.headers().get_all(&self.name).iter();
        let Some(value) = values.next() else {
            return Ok(1);
        };
        if values.next().is_some() {
            return Err(InvalidCost::new("the cost header appears more than once"));
        }
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(InvalidCost::new("the cost header is not a decimal number"));
        }
        bytes
            .iter()
            .try_fold(0u32, |n, &d| {
                n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
            })
            .ok_or(InvalidCost::new(
                "the cost header is larger than 4294967295",
            ))
    }
}

/// A cost from a closure. See [`from_fn`].
#[derive(Clone, Copy)]
pub struct FromFn<F> {
    f: F,
}

/// A cost computed by a closure over the request.
///
/// ```
/// use http::Request;
/// use tower_floodgate::cost::{self, RequestCost};
///
/// // Writes cost 5, reads 1.
/// let cost = cost::from_fn(|req: &Request<()>| if req.method() == "GET" { 1 } else { 5 });
/// assert_eq!(cost.cost(&Request::new(())), Ok(1));
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

impl<F, Req> RequestCost<Req> for FromFn<F>
where
    F: Fn(&Req) -> u32,
{
    #[inline]
    fn cost(&self, req: &Req) -> Result<u32, InvalidCost> {
        Ok((self.f)(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn header_cost_parses_strictly() {
        let c = header(HeaderName::from_static("x-cost"));
        let with = |v: &str| {
            c.cost(
                &Request::builder()
                    .header("x-cost", v)
                    .body(())
                    .unwrap_or_else(|e| unreachable!("{e}")),
            )
        };
        assert_eq!(with("0"), Ok(0));
        assert_eq!(with("4294967295"), Ok(u32::MAX));
        assert!(with("4294967296").is_err());
        assert!(with("12345678901").is_err());
        assert!(with("").is_err());
        assert!(with(" 1").is_err());
        assert!(with("1e3").is_err());
    }
}
