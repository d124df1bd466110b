//! Synchronisation primitives, swapped for loom's under `--cfg floodgate_loom` so
//! that the permit accounting can be model-checked.

#[cfg(floodgate_loom)]
pub(crate) use loom::sync::Arc;
#[cfg(floodgate_loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU64, Ordering};
#[cfg(not(floodgate_loom))]
pub(crate) use std::sync::Arc;
#[cfg(not(floodgate_loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// The guard of [`Mutex`].
#[cfg(not(floodgate_loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
/// The guard of [`Mutex`].
#[cfg(floodgate_loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

/// A mutex without poisoning: `lock` returns the guard.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(
    #[cfg(not(floodgate_loom))] parking_lot::Mutex<T>,
    #[cfg(floodgate_loom)] loom::sync::Mutex<T>,
);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(floodgate_loom))]
        return Self(parking_lot::Mutex::new(value));
        #[cfg(floodgate_loom)]
        return Self(loom::sync::Mutex::new(value));
    }

    #[cfg(not(floodgate_loom))]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock()
    }

    #[cfg(floodgate_loom)]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Lets another thread run (loom's scheduler under loom).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(floodgate_loom)]
    loom::thread::yield_now();
    #[cfg(not(floodgate_loom))]
    std::thread::yield_now();
}
