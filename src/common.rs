//! What every layer does the same way: finding the tenant, shadow mode,
//! and logging refusals without letting a flood flood the logs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::StatusCode;

use crate::error::Rejection;
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

impl KeyRules {
    /// The tenant of `req`, or the rejection for a missing, malformed or
    /// oversized key.
    #[inline]
    pub(crate) fn tenant<K, Req>(&self, key: &K, req: &Req) -> Result<TenantKey, Rejection>
    where
        K: KeyExtractor<Req>,
    {
        let tenant = match key.extract(req) {
            Ok(tenant) => tenant,
            Err(KeyError::Missing) => match self.missing {
                MissingKey::Anonymous => TenantKey::anonymous(),
                MissingKey::Unauthorized => {
                    return Err(Rejection::MissingKey {
                        status: StatusCode::UNAUTHORIZED,
                        challenge: key.challenge(),
                    });
                }
                MissingKey::BadRequest => {
                    return Err(Rejection::MissingKey {
                        status: StatusCode::BAD_REQUEST,
                        challenge: None,
                    });
                }
            },
            Err(KeyError::Invalid(reason)) => return Err(Rejection::InvalidKey { reason }),
        };
        if tenant.len() > self.max_len {
            return Err(Rejection::KeyTooLong {
                len: tenant.len(),
                max: self.max_len,
            });
        }
        Ok(tenant)
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
