//! How important a request is.

use std::fmt;

use http::HeaderName;

/// How important a request is to the load shedder: lower priorities are
/// refused first, and critical traffic keeps a reserved share of capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Can be dropped first: retries, prefetches, batch jobs.
    Sheddable,
    /// Ordinary traffic. The default.
    #[default]
    Normal,
    /// Must get through: health checks, logins, the admin API.
    Critical,
}

impl Priority {
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Critical => 0,
            Self::Normal => 1,
            Self::Sheddable => 2,
        }
    }

    /// Parses `critical`, `normal` or `sheddable` (any case).
    #[must_use]
    pub fn parse(text: &[u8]) -> Option<Self> {
        if text.eq_ignore_ascii_case(b"critical") {
            Some(Self::Critical)
        } else if text.eq_ignore_ascii_case(b"normal") {
            Some(Self::Normal)
        } else if text.eq_ignore_ascii_case(b"sheddable") {
            Some(Self::Sheddable)
        } else {
            None
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Critical => "critical",
            Self::Normal => "normal",
            Self::Sheddable => "sheddable",
        })
    }
}

/// Reads a request's priority. `None` leaves it to the tenant's plan
/// ([`Plan::priority`](crate::Plan::priority)), then [`Priority::Normal`].
pub trait PriorityExtractor<Req: ?Sized> {
    /// The priority of `req`, if it says.
    fn priority(&self, req: &Req) -> Option<Priority>;
}

/// Reads a [`Priority`] request extension (set by an earlier layer or the
/// router). The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct FromExtension {
    _priv: (),
}

impl<B> PriorityExtractor<http::Request<B>> for FromExtension {
    #[inline]
    fn priority(&self, req: &http::Request<B>) -> Option<Priority> {
        req.extensions().get::<Priority>().copied()
    }
}

/// Reads a header. See [`header`].
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
}

/// The priority named in header `name` (`critical`, `normal`, `sheddable`);
/// anything else says nothing. Only trust a header your own proxy sets: a
/// client would call everything critical.
#[must_use]
pub fn header(name: HeaderName) -> Header {
    Header { name }
}

impl<B> PriorityExtractor<http::Request<B>> for Header {
    fn priority(&self, req: &http::Request<B>) -> Option<Priority> {
        req.headers()
            .get(&self.name)
            .and_then(|v| Priority::parse(v.as_bytes()))
    }
}

/// A closure extractor. See [`from_fn`].
#[derive(Clone, Copy)]
pub struct FromFn<F> {
    f: F,
}

/// The priority from a closure over the request.
///
/// ```
/// use http::Request;
/// use tower_floodgate::shed::priority::{self, PriorityExtractor};
/// use tower_floodgate::Priority;
///
/// let by_path = priority::from_fn(|req: &Request<()>| match req.uri().path() {
///     "/healthz" | "/login" => Some(Priority::Critical),
///     p if p.starts_with("/reports") => Some(Priority::Sheddable),
///     _ => None,
/// });
/// let req = Request::builder().uri("/healthz").body(()).unwrap();
/// assert_eq!(by_path.priority(&req), Some(Priority::Critical));
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

impl<F, Req> PriorityExtractor<Req> for FromFn<F>
where
    F: Fn(&Req) -> Option<Priority>,
{
    fn priority(&self, req: &Req) -> Option<Priority> {
        (self.f)(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_order_and_parse() {
        assert!(Priority::Critical > Priority::Normal && Priority::Normal > Priority::Sheddable);
        assert_eq!(Priority::parse(b"CRITICAL"), Some(Priority::Critical));
        assert_eq!(Priority::parse(b"urgent"), None);
        let req = http::Request::builder()
            .header("x-priority", "sheddable")
            .body(())
            .unwrap_or_else(|e| unreachable!("{e}"));
        let h = header(HeaderName::from_static("x-priority"));
        assert_eq!(h.priority(&req), Some(Priority::Sheddable));
        assert_eq!(FromExtension::default().priority(&req), None);
    }
}
