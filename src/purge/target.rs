//! What a purge removes.

use std::fmt;

/// What to purge: one URL, every URL with a tag, every URL under a prefix,
/// every URL of a host, or everything the tenant has.
///
/// Build targets with the checking constructors ([`Target::url`],
/// [`Target::prefix`], [`Target::host`], [`Target::tag`]): hosts are
/// lower-cased, URLs must be absolute `http` or `https` URLs.
///
/// ```
/// use tower_floodgate::purge::Target;
///
/// let page = Target::url("https://cdn.example.com/img/a.png").unwrap();
/// let dir = Target::prefix("https://cdn.example.com/img/").unwrap();
/// assert!(dir.covers(&page));
/// assert!(Target::host("CDN.example.com").unwrap().covers(&dir));
/// assert!(Target::Everything.covers(&Target::tag("homepage").unwrap()));
/// assert!(!page.covers(&dir));
/// assert!(Target::url("ftp://x/y").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// One URL.
    Url(String),
    /// Every URL carrying this tag (surrogate key).
    Tag(String),
    /// Every URL starting with this prefix.
    Prefix(String),
    /// Every URL of this host.
    Host(String),
    /// Everything the tenant has cached.
    Everything,
}

/// Why a target is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid purge target `{value}`: {reason}")]
pub struct InvalidTarget {
    value: String,
    reason: &'static str,
}

impl InvalidTarget {
    fn new(value: &str, reason: &'static str) -> Self {
        let mut value = value.to_owned();
        if value.len() > 64 {
            let mut cut = 64;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self { value, reason }
    }

    /// What is wrong.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// The longest URL or prefix accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 2048;
/// The longest tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 256;

impl Target {
    /// An absolute `http` or `https` URL with a host.
    ///
    /// # Errors
    ///
    /// [`InvalidTarget`] for anything else, or more than
    /// [`MAX_TARGET_LEN`] bytes.
    pub fn url(url: &str) -> Result<Self, InvalidTarget> {
        Ok(Self::Url(check_url(url)?))
    }

    /// A URL prefix: an absolute `http` or `https` URL (usually ending in
    /// `/`) whose URLs are all purged.
    ///
    /// # Errors
    ///
    /// As for [`Target::url`].
    pub fn prefix(prefix: &str) -> Result<Self, InvalidTarget> {
        Ok(Self::Prefix(check_url(prefix)?))
    }

    /// A host name (lower-cased), optionally with a port.
    ///
    /// # Errors
    ///
    /// [`InvalidTarget`] if it is empty or not a valid host.
    pub fn host(host: &str) -> Result<Self, InvalidTarget> {
        let authority = host
            .parse::<http::uri::Authority>()
            .map_err(|_| InvalidTarget::new(host, "not a host name"))?;
        if host.is_empty() || authority.as_str().contains('@') {
            return Err(InvalidTarget::new(host, "not a host name"));
        }
        Ok(Self::Host(authority.as_str().to_ascii_lowercase()))
    }

    /// A tag (surrogate key): 1 to [`MAX_TAG_LEN`] bytes of visible ASCII.
    ///
    /// # Errors
    ///
    /// [`InvalidTarget`] for anything else.
    pub fn tag(tag: &str) -> Result<Self, InvalidTarget> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(InvalidTarget::new(tag, "a tag has 1 to 256 characters"));
        }
        if !tag.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidTarget::new(
                tag,
                "a tag has only visible ASCII characters",
            ));
        }
        Ok(Self::Tag(tag.to_owned()))
    }

    /// Whether purging `self` purges everything `other` would.
    #[must_use]
    pub fn covers(&self, other: &Target) -> bool {
        match (self, other) {
            (Self::Everything, _) => true,
            (_, Self::Everything) => false,
            (Self::Host(h), Self::Host(o)) => h == o,
            (Self::Host(h), Self::Url(o)) => host_of(o) == Some(h.as_str()),
            // Only a prefix that goes past the host: `https://img.example.co`
            // also covers `https://img.example.com/…`.
            (Self::Host(h), Self::Prefix(o)) => {
                host_of(o) == Some(h.as_str()) && authority_ends(o)
            }
            (Self::Prefix(p), Self::Prefix(o) | Self::Url(o)) => o.starts_with(p.as_str()),
            (Self::Url(u), Self::Url(o)) | (Self::Tag(u), Self::Tag(o)) => u == o,
            _ => false,
        }
    }

    /// Whether this target covers others than itself (everything, hosts,
    /// prefixes).
    #[must_use]
    pub(crate) fn is_broad(&self) -> bool {
        matches!(self, Self::Everything | Self::Host(_) | Self::Prefix(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(u) => write!(f, "url {u}"),
            Self::Tag(t) => write!(f, "tag {t}"),
            Self::Prefix(p) => write!(f, "prefix {p}"),
            Self::Host(h) => write!(f, "host {h}"),
            Self::Everything => f.write_str("everything"),
        }
    }
}

fn check_url(url: &str) -> Result<String, InvalidTarget> {
    if url.len() > MAX_TARGET_LEN {
        return Err(InvalidTarget::new(url, "longer than 2048 bytes"));
    }
    let uri = url
        .parse::<http::Uri>()
        .map_err(|_| InvalidTarget::new(url, "not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(InvalidTarget::new(url, "not an http or https URL")),
    }
    let Some(authority) = uri.authority() else {
        return Err(InvalidTarget::new(url, "has no host"));
    };
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(InvalidTarget::new(url, "has no valid host"));
    }
    // Lower-case the scheme and host so that coverage compares like with like.
    let rest = &url[uri.scheme_str().map_or(0, str::len) + 3 + authority.as_str().len()..];
    Ok(format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("https"),
        authority.as_str().to_ascii_lowercase(),
        rest
    ))
}

/// The host (and port) of an absolute URL built by [`check_url`].
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

/// Whether `url` goes on past its authority (a path, query or fragment
/// follows), so that every URL it is a prefix of has the same host.
fn authority_ends(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(_, rest)| rest.contains(['/', '?', '#']))
}

/// How a purge removes content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Mode {
    /// Remove it: the next request goes to the origin. The default.
    #[default]
    Hard,
    /// Mark it stale: it may still be served while it is revalidated.
    Soft,
}

impl Mode {
    /// Whether a purge in this mode does all a purge in `other` would: a
    /// hard purge covers a soft one, never the reverse.
    #[must_use]
    pub fn covers(self, other: Mode) -> bool {
        self == Mode::Hard || other == Mode::Soft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(r: Result<Target, InvalidTarget>) -> Target {
        r.unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn a_host_covers_only_prefixes_that_stay_on_it() {
        let host = t(Target::host("img.example.co"));
        // A prefix that ends at the host also matches other hosts.
        assert!(!host.covers(&t(Target::prefix("https://img.example.co"))));
        assert!(
            t(Target::prefix("https://img.example.co"))
                .covers(&t(Target::url("https://img.example.com/a.png")))
        );
        assert!(host.covers(&t(Target::prefix("https://img.example.co/"))));
        assert!(host.covers(&t(Target::prefix("https://img.example.co/static/"))));
        assert!(host.covers(&t(Target::url("https://img.example.co/a.png"))));
        assert!(!host.covers(&t(Target::url("https://img.example.com/a.png"))));
        let with_port = t(Target::host("a.example:8"));
        assert!(!with_port.covers(&t(Target::prefix("https://a.example:8"))));
        assert!(with_port.covers(&t(Target::prefix("https://a.example:8/x"))));
    }

    #[test]
    fn coverage_order() {
        let url = t(Target::url("https://a.example/x/y.png"));
        let other_host = t(Target::url("https://b.example/x/y.png"));
        let prefix = t(Target::prefix("https://a.example/x/"));
        let host = t(Target::host("a.example"));
        let tag = t(Target::tag("news"));
        assert!(Target::Everything.covers(&url) && Target::Everything.covers(&tag));
        assert!(host.covers(&prefix) && host.covers(&url) && !host.covers(&other_host));
        assert!(prefix.covers(&url) && !prefix.covers(&host) && !prefix.covers(&other_host));
        assert!(url.covers(&url) && !url.covers(&prefix));
        assert!(!tag.covers(&url) && !host.covers(&tag) && !url.covers(&Target::Everything));
        assert!(Mode::Hard.covers(Mode::Soft) && !Mode::Soft.covers(Mode::Hard));
    }

    #[test]
    fn validation_and_normalisation() {
        assert_eq!(
            Target::url("HTTPS://A.Example/Path?q=1"),
            Ok(Target::Url("https://a.example/Path?q=1".into()))
        );
        assert_eq!(Target::host("A.example:8080"), Ok(Target::Host("a.example:8080".into())));
        assert!(Target::url("/relative").is_err());
        assert!(Target::url("https://user@a.example/").is_err());
        assert!(Target::url(&format!("https://a.example/{}", "x".repeat(3000))).is_err());
        assert!(Target::host("a b").is_err());
        assert!(Target::host("").is_err());
        assert!(Target::tag("").is_err());
        assert!(Target::tag("has space").is_err());
        assert!(Target::tag(&"x".repeat(257)).is_err());
        let err = Target::url(&"é".repeat(100)).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.len() < 150));
    }
}
