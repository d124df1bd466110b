//! Purge-request batching and coalescing: a flood of identical purges costs
//! the backend a couple of calls, never one per request.
//!
//! [`PurgeBatcher`] is the domain part: it batches purges per tenant for a
//! purge backend, joins requests that a pending purge already covers, and
//! answers each caller with its own item's result. The generic
//! [`CoalesceLayer`](crate::coalesce::CoalesceLayer) does the same for whole
//! HTTP requests.

mod batcher;
mod target;

pub use self::batcher::{
    BatchConfig, BatchId, BatchResponse, ItemResult, Purge, PurgeBatch, PurgeBatcher, PurgeItem,
    PurgeOutcome, PurgeStats,
};
pub use self::target::{InvalidTarget, MAX_TAG_LEN, MAX_TARGET_LEN, Mode, Target};
