//! The one hash of tenant keys, shared by the policy and the stores.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use foldhash::quality::FixedState;

static STATE: OnceLock<FixedState> = OnceLock::new();

/// A 64-bit keyed hash of a tenant key.
///
/// The seed is random per process, so nobody outside can predict which keys
/// collide. Computed once per request and reused for the policy lookup and
/// the store.
#[inline]
pub(crate) fn tenant_hash(bytes: &[u8]) -> u64 {
    let state = STATE.get_or_init(|| {
        FixedState::with_seed(foldhash::quality::RandomState::default().hash_one(0x5eed_u64))
    });
    let mut hasher = state.build_hasher();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_bytes_hash_equal_and_prefixes_differ() {
        assert_eq!(tenant_hash(b"acme"), tenant_hash(b"acme"));
        assert_ne!(tenant_hash(b"acme"), tenant_hash(b"acm"));
        assert_ne!(tenant_hash(b""), tenant_hash(b"\0"));
    }
}
