//! What every layer does the same way: finding the tenant, shadow mode,
//! and logging refusals without letting a flood flood the logs.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{HeaderValue, StatusCode};

use crate::error::Rejection;
use crate::hash::tenant_hash;
use crate::key::{KeyError, KeyExtractor, TenantKey};

/// The default bound on tenant key length, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;

/// What to do with a request that carries no tenant key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Refuse it with 401 Unauthorized (gRPC UNAUTHENTICATED). The default.
    #[default]
    Unauthorized,
    /// Refuse it with 400 Bad Request (gRPC INVALID_ARGUMENT).
    BadRequest,
    /// Count it as the one shared tenant [`TenantKey::anonymous()`], which
    /// gets the default plan unless the policy assigns that key a plan of
    /// its own.
    Anonymous,
}

/// How a layer finds the tenant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyRules {
    pub(crate) missing: MissingKey,
    pub(crate) max_len: usize,
}

impl Default for KeyRules {
    fn default() -> Self {
        Self {
            missing: MissingKey::default(),
            max_len: DEFAULT_MAX_KEY_LEN,
        }
    }
}

/// A request's tenant key, extracted once, with its hash: what every
/// decision about the request reads, so that a stack of decisions (one
/// [`FloodgateLayer`](crate::FloodgateLayer)) finds and hashes the tenant
/// once. The hash is computed when first asked for, after the length check
/// of whoever asks: an oversized key is refused before it is hashed.
pub(crate) struct Extracted {
    key: Result<TenantKey, KeyError>,
    hash: Cell<Option<u64>>,
}

impl Extracted {
    /// The key `extractor` finds in `req`.
    #[inline]
    pub(crate) fn from_request<K, Req>(extractor: &K, req: &Req) -> Self
    where
        K: KeyExtractor<Req>,
    {
        Self {
            key: extractor.extract(req),
            hash: Cell::new(None),
        }
    }

    /// The key and its hash, if the request has a valid key of at most
    /// `max_len` bytes.
    #[inline]
    pub(crate) fn key_within(&self, max_len: usize) -> Option<Tenant<'_>> {
        match &self.key {
            Ok(key) if key.len() <= max_len => Some(self.tenant(key)),
            _ => None,
        }
    }

    /// The key and its hash, if the request has a valid key, whatever its
    /// length.
    #[inline]
    pub(crate) fn key(&self) -> Option<Tenant<'_>> {
        self.key_within(usize::MAX)
    }

    #[inline]
    fn tenant<'a>(&'a self, key: &'a TenantKey) -> Tenant<'a> {
        let hash = match self.hash.get() {
            Some(hash) => hash,
            None => {
                let hash = tenant_hash(key.as_bytes());
                self.hash.set(Some(hash));
                hash
            }
        };
        Tenant { key, hash }
    }
}

/// A tenant key with its hash.
#[derive(Clone, Copy)]
pub(crate) struct Tenant<'a> {
    pub(crate) key: &'a TenantKey,
    pub(crate) hash: u64,
}

/// The shared key of requests without one, for [`MissingKey::Anonymous`].
static ANONYMOUS: TenantKey = TenantKey::anonymous();

impl KeyRules {
    /// The tenant of a request whose key was `extracted`, or the rejection
    /// for a missing, malformed or oversized key. `challenge` is the
    /// extractor's, for a 401.
    #[inline]
    pub(crate) fn resolve<'a>(
        &self,
        extracted: &'a Extracted,
        challenge: impl FnOnce() -> Option<HeaderValue>,
    ) -> Result<Tenant<'a>, Rejection> {
        let key = match &extracted.key {
            Ok(key) => key,
            Err(KeyError::Missing) => return self.missing(challenge),
            Err(KeyError::Invalid(reason)) => {
                return Err(Rejection::InvalidKey { reason });
            }
        };
        if key.len() > self.max_len {
            return Err(Rejection::KeyTooLong {
                len: key.len(),
                max: self.max_len,
            });
        }
        Ok(extracted.tenant(key))
    }

    /// The tenant of a request without a key: the anonymous one, or a
    /// rejection.
    #[cold]
    fn missing(
        &self,
        challenge: impl FnOnce() -> Option<HeaderValue>,
    ) -> Result<Tenant<'static>, Rejection> {
        match self.missing {
            MissingKey::Anonymous => Ok(Tenant {
                key: &ANONYMOUS,
                hash: tenant_hash(ANONYMOUS.as_bytes()),
            }),
            MissingKey::Unauthorized => Err(Rejection::MissingKey {
                status: StatusCode::UNAUTHORIZED,
                challenge: challenge(),
            }),
            MissingKey::BadRequest => Err(Rejection::MissingKey {
                status: StatusCode::BAD_REQUEST,
                challenge: None,
            }),
        }
    }
}

/// Shadow mode and the log gate of one layer (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    shadow: AtomicBool,
    /// Refusals shadow mode let through.
    pub(crate) shadowed: AtomicU64,
    log: LogGate,
}

impl Refusals {
    pub(crate) fn set_shadow(&self, enabled: bool) {
        self.shadow.store(enabled, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn is_shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    /// Records a refusal at time `now`: counts it and logs it (at most once
    /// a second per layer). Returns `true` if shadow mode lets the request
    /// through instead.
    #[cold]
    pub(crate) fn record(
        &self,
        layer: &'static str,
        rejection: &Rejection,
        counter: &AtomicU64,
        now: u64,
    ) -> bool {
        let shadow = self.is_shadow();
        if shadow {
            self.shadowed.fetch_add(1, Ordering::Relaxed);
        } else {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(suppressed) = self.log.pass(now) {
            log_rejection(layer, rejection, shadow, suppressed);
        }
        shadow
    }
}

/// Lets one log event through per second; counts the others.
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    const INTERVAL: u64 = 1_000_000_000;

    /// `Some(events suppressed since the last one)` if this one may log.
    pub(crate) fn pass(&self, now: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(Self::INTERVAL),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn log_rejection(layer: &'static str, rejection: &Rejection, shadow: bool, suppressed: u64) {
    let tenant = rejection.tenant().map(ToString::to_string);
    let tenant = tenant.as_deref().unwrap_or("-");
    let status = rejection.status().as_u16();
    if shadow {
        tracing::warn!(
            target: "tower_floodgate",
            layer,
            tenant,
            status,
            suppressed,
            "shadow mode: would have refused the request: {rejection}"
        );
    } else {
        tracing::debug!(
            target: "tower_floodgate",
            layer,
            tenant,
            status,
            suppressed,
            "refused the request: {rejection}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_gate_lets_one_event_a_second_through() {
        let gate = LogGate::default();
        assert_eq!(gate.pass(0), Some(0));
        for t in 1..1000 {
            assert_eq!(gate.pass(t * 1_000), None);
        }
        assert_eq!(gate.pass(1_000_000_000), Some(999));
        assert_eq!(gate.pass(1_000_000_001), None);
    }
}
