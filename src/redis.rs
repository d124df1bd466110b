//! Fleet-wide rate limits on Redis (feature `redis`).
//!
//! With an in-memory limiter on each of N nodes, a tenant gets N times its
//! quota. [`RedisStore`] keeps each tenant's theoretical arrival time in
//! Redis (or Valkey, or a Redis Cluster) instead, so that the limit holds
//! across the fleet. Switching is one line:
//!
//! ```no_run
//! use std::num::NonZeroU32;
//! use tower_floodgate::redis::{RedisConfig, RedisStore};
//! use tower_floodgate::{Quota, RateLimitLayer, RateLimiter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::new("redis://127.0.0.1:6379", RedisConfig::default())?;
//! let limiter = RateLimiter::builder(Quota::per_second(NonZeroU32::new(100).unwrap()))
//!     .redis(store)
//!     .build();
//! let layer = RateLimitLayer::new(limiter);
//! # Ok(()) }
//! ```
//!
//! # How a decision is made
//!
//! * **One atomic script per decision**, GCRA in Lua on integer
//!   microseconds (Lua numbers are doubles: every value stays far below
//!   2⁵³), loaded once and called by its SHA, and loaded again by itself
//!   after `NOSCRIPT` (a `SCRIPT FLUSH`, a failover). The clock is Redis' own
//!   (`TIME`), so node clocks do not matter; [`RedisConfig::caller_clock`]
//!   sends the caller's instead, for Redis flavours that refuse `TIME` in
//!   scripts. The quota and cost travel with every call, so tiers and
//!   policy changes need nothing in Redis: a tenant whose quota changed
//!   keeps the units it has in use (up to the new burst), as in memory,
//!   from its next request on (in memory, at once). A tenant's key
//!   expires when its bucket is full again: Redis holds nothing for idle
//!   tenants.
//! * **Keys** are `prefix{tenant}`: the hash tag puts each tenant in one
//!   cluster slot, so the store works on a Redis Cluster
//!   ([`RedisStore::cluster`]). A [sensitive](crate::TenantKey::sensitive)
//!   key, such as a bearer token, is never written to Redis: its key is
//!   `prefix{#…}` with the first 128 bits of the token's SHA-256 in hex.
//! * **A local deny cache**: a tenant Redis refused is refused locally until
//!   it could be admitted again, without asking Redis; a flooding tenant
//!   costs Redis about one call per retry-after per node.
//!
//! # When Redis is away
//!
//! Each call has a short timeout (20 ms by default). On a timeout or an
//! error, the [`FailurePolicy`] applies: admit, refuse (503), or fall back to
//! the in-memory limiter with a share of the tenant's quota. After a few
//! failures in a row a circuit breaker stops waiting on Redis at all, and
//! lets one probe through every second until Redis answers again; recovery
//! needs no restart. Decisions made without Redis are counted
//! ([`RateLimiter::redis_stats`](crate::RateLimiter::redis_stats)) and
//! logged at most once a second.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use ::redis::Script;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use arc_swap::ArcSwap;
use tokio::sync::OnceCell;

use crate::clock::saturating_nanos;
use crate::key::TenantKey;
use crate::quota::Quota;

/// The GCRA step, on integer microseconds.
///
/// KEYS[1]: the tenant's key, holding `TAT:interval:tolerance` (µs; keys of
/// earlier versions have no tolerance). ARGV: emission
/// interval (µs), tolerance (µs), cost, and the caller's clock (µs since the
/// epoch) or "" for Redis' own. A TAT stored under another interval (the
/// tenant's quota changed) is rescaled so that the tenant keeps the same
/// number of units in use, and capped at the tolerance, as is a TAT stored
/// under a larger tolerance (the burst shrank), as the in-memory store does.
/// Only then: with the caller's clock, a node whose clock is behind sees
/// more debt than the tolerance, and capping it would forgive debt that
/// the other nodes then admit again. A rescaled TAT is stored even when the
/// step is refused, so that a downgraded tenant's key lives as long as its
/// new debt, not its old one.
/// Returns `{allowed (1/0), debt (µs: TAT − now after the step), wait (µs)}`.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[4])
end
local tat = now
local rescaled = false
local stored = redis.call('GET', KEYS[1])
if stored then
  local t, i, tol = string.match(stored, '^(%d+):(%d+):?(%d*)$')
  if t then
    tat = tonumber(t)
    local old = tonumber(i)
    local old_tolerance = tonumber(tol)
    if tat > now then
      local debt = tat - now
      local changed = false
      if old ~= interval and old > 0 then
        debt = math.floor(debt / old * interval)
        changed = true
      end
      if old_tolerance ~= nil and old_tolerance > tolerance then
        changed = true
      end
      if changed then
        if debt > tolerance then
          debt = tolerance
        end
        tat = now + debt
        rescaled = true
      end
    end
  end
end
if tat < now then
  tat = now
end
if cost == 0 then
  return {1, tat - now, 0}
end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at <= now then
  redis.call('SET', KEYS[1], string.format('%d:%d:%d', new_tat, interval, tolerance), 'PX', math.ceil((new_tat - now) / 1000))
  return {1, new_tat - now, 0}
end
if rescaled then
  redis.call('SET', KEYS[1], string.format('%d:%d:%d', tat, interval, tolerance), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
end
return {0, tat - now, allow_at - now}
";

/// Keep every value the script handles far below 2⁵³ µs.
const MAX_TOLERANCE_MICROS: u64 = 1 << 50;

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit every request (availability first).
    Open,
    /// Refuse every request with 503 (the limit first).
    Closed,
    /// Decide in memory, on this node alone, with `share` of each tenant's
    /// quota (1.0: the whole quota per node; 1/N for N nodes keeps the fleet
    /// near its quota). The default, with a share of 1.
    Local {
        /// The share of the quota each node gives a tenant, in `(0, 1]`.
        share: f64,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::Local { share: 1.0 }
    }
}

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// Prepended to every key (default `floodgate:`); give each limiter and
    /// each test its own.
    pub prefix: String,
    /// How long a decision waits for Redis (default 20 ms).
    pub timeout: Duration,
    /// What to do without Redis.
    pub on_failure: FailurePolicy,
    /// Failures in a row that open the circuit breaker (default 3).
    pub breaker_threshold: u32,
    /// How long the breaker stays open before a probe (default 1 s).
    pub breaker_cooldown: Duration,
    /// Send the caller's clock instead of using Redis' `TIME` (default
    /// off).
    pub caller_clock: bool,
    /// Tenants remembered by the deny cache (default 100,000).
    pub deny_cache_tenants: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            prefix: "floodgate:".to_owned(),
            timeout: Duration::from_millis(20),
            on_failure: FailurePolicy::default(),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(1),
            caller_clock: false,
            deny_cache_tenants: 100_000,
        }
    }
}

/// Why a [`RedisStore`] could not be made.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis configuration: {0}")]
pub struct RedisStoreError(#[from] ::redis::RedisError);

/// A cluster connection, built once by a task of its own.
#[derive(Default)]
struct ClusterCell {
    connection: OnceCell<::redis::cluster_async::ClusterConnection>,
    /// Whether a task is building it.
    connecting: AtomicBool,
}

/// The connection, replaced by a fresh one whenever the breaker opens: a
/// connection that stopped answering without closing (a dead NAT entry, a
/// failed-over address) only ever times out, which the client does not
/// treat as a reason to reconnect. A fresh connection is built by a task of
/// its own, one at a time, so that a decision's timeout (20 ms by default)
/// never cuts short the few round trips it takes; decisions keep using the
/// old one until it is ready.
#[derive(Clone)]
enum Connection {
    Single(Arc<Single>),
    Cluster {
        client: Arc<::redis::cluster::ClusterClient>,
        connection: Arc<ArcSwap<ClusterCell>>,
    },
}

/// One Redis server, and what it takes to connect to it afresh.
struct Single {
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    manager: ArcSwap<ConnectionManager>,
    /// Whether a task is connecting afresh.
    reconnecting: AtomicBool,
}

impl Connection {
    /// Starts replacing the connection in use by a fresh one, unless that
    /// is under way already. Must be called within a tokio runtime.
    fn replace(&self) {
        match self {
            Self::Single(single) => {
                if single.reconnecting.swap(true, Ordering::AcqRel) {
                    return;
                }
                let single = Arc::clone(single);
                tokio::spawn(async move {
                    let fresh = ConnectionManager::new_with_config(
                        single.client.clone(),
                        single.config.clone(),
                    )
                    .await;
                    if let Ok(fresh) = fresh {
                        single.manager.store(Arc::new(fresh));
                    }
                    single.reconnecting.store(false, Ordering::Release);
                });
            }
            Self::Cluster { connection, .. } => {
                connection.store(Arc::new(ClusterCell::default()));
            }
        }
    }
}

/// A Redis (or Valkey, or Redis Cluster) store for the rate limiter. Give it
/// to [`RateLimiterBuilder::redis`](crate::RateLimiterBuilder::redis).
///
/// It connects lazily and reconnects by itself: a store made while Redis is
/// down works as soon as Redis is up, and meanwhile the failure policy
/// applies.
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    pub(crate) config: RedisConfig,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.connection {
            Connection::Single(_) => "single",
            Connection::Cluster { .. } => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("config", &self.config)
            .finish()
    }
}

impl RedisStore {
    /// A store on the Redis server at `url` (`redis://host:port/db`,
    /// `rediss://` for TLS if the `redis` crate's TLS feature is on). Must be
    /// called within a tokio runtime; connects on first use.
    ///
    /// # Errors
    ///
    /// [`RedisStoreError`] if the URL is invalid.
    pub fn new(url: &str, config: RedisConfig) -> Result<Self, RedisStoreError> {
        let client = ::redis::Client::open(url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(config.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        Ok(Self {
            connection: Connection::Single(Arc::new(Single {
                client,
                config: manager_config,
                manager: ArcSwap::from_pointee(manager),
                reconnecting: AtomicBool::new(false),
            })),
            config,
        })
    }

    /// A store on a Redis Cluster, reached through any of `nodes`.
    ///
    /// # Errors
    ///
    /// [`RedisStoreError`] if a node URL is invalid.
    pub fn cluster<I, S>(nodes: I, config: RedisConfig) -> Result<Self, RedisStoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = ::redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(config.timeout.max(Duration::from_millis(100)))
            .response_timeout(config.timeout.max(Duration::from_millis(100)))
            .build()?;
        Ok(Self {
            connection: Connection::Cluster {
                client: Arc::new(client),
                connection: Arc::new(ArcSwap::from_pointee(ClusterCell::default())),
            },
            config,
        })
    }

    /// The key of `tenant`: the prefix, then the tenant in a hash tag.
    /// `prefix{tenant}`; a [sensitive](TenantKey::sensitive) tenant key (a
    /// bearer token) is replaced by `#` and the first 128 bits of its
    /// SHA-256, so that no secret is written to Redis.
    pub(crate) fn key(&self, tenant: &TenantKey) -> Vec<u8> {
        use sha2::Digest as _;
        let mut key = Vec::with_capacity(self.config.prefix.len() + tenant.len() + 3);
        key.extend_from_slice(self.config.prefix.as_bytes());
        key.push(b'{');
        if tenant.is_sensitive() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let digest = sha2::Sha256::digest(tenant.as_bytes());
            key.push(b'#');
            for byte in &digest[..16] {
                key.push(HEX[usize::from(byte >> 4)]);
                key.push(HEX[usize::from(byte & 0xf)]);
            }
        } else {
            key.extend_from_slice(tenant.as_bytes());
        }
        key.push(b'}');
        key
    }
}

/// What Redis decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) allowed: bool,
    /// TAT − now after the step, in nanoseconds.
    pub(crate) debt: u64,
    /// When the same cost would be admitted, in nanoseconds.
    pub(crate) wait: u64,
}

/// Counters of a limiter on Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RedisStats {
    /// Scripts run on Redis.
    pub calls: u64,
    /// Calls that failed or timed out.
    pub failures: u64,
    /// Requests refused by the local deny cache, without a call.
    pub denied_locally: u64,
    /// Decisions made without Redis: admitted (open policy).
    pub fallback_open: u64,
    /// Decisions made without Redis: refused (closed policy).
    pub fallback_closed: u64,
    /// Decisions made without Redis: by the in-memory limiter.
    pub fallback_local: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Whether the breaker is open now (Redis is not being asked).
    pub breaker_open: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) denied_locally: AtomicU64,
    pub(crate) fallback_open: AtomicU64,
    pub(crate) fallback_closed: AtomicU64,
    pub(crate) fallback_local: AtomicU64,
    pub(crate) breaker_opened: AtomicU64,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const PROBING: u8 = 2;

/// Stops waiting on a Redis that does not answer, and probes until it does.
pub(crate) struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    /// While open: when to probe. While probing: when to give up on the
    /// probe and allow another.
    until: AtomicU64,
    threshold: u32,
    cooldown: u64,
    probe_timeout: u64,
}

impl Breaker {
    pub(crate) fn new(config: &RedisConfig) -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            until: AtomicU64::new(0),
            threshold: config.breaker_threshold.max(1),
            cooldown: saturating_nanos(config.breaker_cooldown),
            probe_timeout: saturating_nanos(config.timeout).saturating_mul(4),
        }
    }

    /// Whether this decision may ask Redis (at `now`, in ns).
    pub(crate) fn allows(&self, now: u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            state => {
                let until = self.until.load(Ordering::Acquire);
                now >= until
                    && self
                        .state
                        .compare_exchange(state, PROBING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    && {
                        self.until
                            .store(now.saturating_add(self.probe_timeout), Ordering::Release);
                        true
                    }
            }
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.state.store(CLOSED, Ordering::Release);
    }

    /// Records a failure: `Some(true)` if it opened the breaker,
    /// `Some(false)` if a failed probe opened it again, `None` if nothing
    /// changed.
    pub(crate) fn failure(&self, now: u64) -> Option<bool> {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.state.load(Ordering::Acquire);
        if state == PROBING || (state == CLOSED && failures >= self.threshold) {
            self.until
                .store(now.saturating_add(self.cooldown), Ordering::Release);
            self.state.store(OPEN, Ordering::Release);
            return Some(state == CLOSED);
        }
        None
    }
}

/// The Redis side of a limiter.
pub(crate) struct RedisBackend {
    store: RedisStore,
    script: Script,
    pub(crate) breaker: Breaker,
    pub(crate) counters: Counters,
}

impl RedisBackend {
    pub(crate) fn new(store: RedisStore) -> Self {
        Self {
            breaker: Breaker::new(&store.config),
            store,
            script: Script::new(GCRA),
            counters: Counters::default(),
        }
    }

    pub(crate) fn config(&self) -> &RedisConfig {
        &self.store.config
    }

    /// A call failed: counts it, and when that opens the breaker (or a
    /// probe failed), replaces the connection, so that the next probe does
    /// not wait on one that stopped answering.
    pub(crate) fn failed(&self, now: u64) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(first) = self.breaker.failure(now) {
            if first {
                self.counters.breaker_opened.fetch_add(1, Ordering::Relaxed);
            }
            self.store.connection.replace();
        }
    }

    /// Runs the script for `tenant`, within the timeout.
    pub(crate) async fn step(
        &self,
        tenant: &TenantKey,
        quota: &Quota,
        cost: u32,
    ) -> Result<Answer, String> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let interval = quota.interval_nanos().div_ceil(1_000).max(1);
        let tolerance = interval
            .saturating_mul(u64::from(quota.burst()))
            .min(MAX_TOLERANCE_MICROS);
        let clock = if self.store.config.caller_clock {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            u64::try_from(now.as_micros()).unwrap_or(u64::MAX).to_string()
        } else {
            String::new()
        };
        let key = self.store.key(tenant);
        let mut invocation = self.script.key(key);
        invocation.arg(interval).arg(tolerance).arg(cost).arg(clock);
        let call = async {
            let reply: (i64, i64, i64) = match &self.store.connection {
                Connection::Single(single) => {
                    let mut manager = ConnectionManager::clone(&single.manager.load());
                    invocation.invoke_async(&mut manager).await
                }
                Connection::Cluster { client, connection } => {
                    let cell = connection.load_full();
                    if !cell.connection.initialized()
                        && !cell.connecting.swap(true, Ordering::AcqRel)
                    {
                        // Connect in a task of its own (one at a time),
                        // which outlives this decision's timeout; wait for
                        // it meanwhile.
                        let (cell, client) = (Arc::clone(&cell), Arc::clone(client));
                        tokio::spawn(async move {
                            let _ = cell
                                .connection
                                .get_or_try_init(|| client.get_async_connection())
                                .await;
                            cell.connecting.store(false, Ordering::Release);
                        });
                    }
                    let connection = cell
                        .connection
                        .get_or_try_init(|| client.get_async_connection())
                        .await?;
                    let mut connection = connection.clone();
                    invocation.invoke_async(&mut connection).await
                }
            }?;
            Ok::<_, ::redis::RedisError>(reply)
        };
        match tokio::time::timeout(self.store.config.timeout, call).await {
            Ok(Ok((allowed, debt, wait))) => Ok(Answer {
                allowed: allowed == 1,
                debt: u64::try_from(debt).unwrap_or(0).saturating_mul(1_000),
                wait: u64::try_from(wait).unwrap_or(0).saturating_mul(1_000),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms",
                self.store.config.timeout.as_millis()
            )),
        }
    }

    pub(crate) fn stats(&self) -> RedisStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            calls: get(&c.calls),
            failures: get(&c.failures),
            denied_locally: get(&c.denied_locally),
            fallback_open: get(&c.fallback_open),
            fallback_closed: get(&c.fallback_closed),
            fallback_local: get(&c.fallback_local),
            breaker_opened: get(&c.breaker_opened),
            breaker_open: self.breaker.is_open(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_probes_and_closes() {
        let config = RedisConfig {
            breaker_threshold: 2,
            breaker_cooldown: Duration::from_secs(1),
            timeout: Duration::from_millis(10),
            ..RedisConfig::default()
        };
        let b = Breaker::new(&config);
        let s = 1_000_000_000;
        assert!(b.allows(0));
        assert_eq!(b.failure(0), None);
        assert_eq!(b.failure(0), Some(true));
        assert!(!b.allows(s / 2));
        // After the cooldown, one probe (others keep out).
        assert!(b.allows(s));
        assert!(!b.allows(s));
        // The probe fails: open again for a cooldown.
        assert_eq!(b.failure(s), Some(false));
        assert!(!b.allows(s + s / 2));
        assert!(b.allows(2 * s));
        b.success();
        assert!(b.allows(2 * s) && !b.is_open());
        // A probe that never reports lets another through after a while.
        b.failure(3 * s);
        b.failure(3 * s);
        assert!(b.allows(4 * s));
        assert!(!b.allows(4 * s + 1));
        assert!(b.allows(4 * s + 40_000_000));
    }

    #[test]
    fn keys_carry_the_prefix_and_a_hash_tag() {
        let store = RedisStore {
            connection: Connection::Cluster {
                client: Arc::new(
                    ::redis::cluster::ClusterClient::new(vec!["redis://127.0.0.1:1"])
                        .unwrap_or_else(|e| unreachable!("{e}")),
                ),
                connection: Arc::new(ArcSwap::from_pointee(ClusterCell::default())),
            },
            config: RedisConfig {
                prefix: "p:".into(),
                ..RedisConfig::default()
            },
        };
        assert_eq!(store.key(&TenantKey::from("acme")), b"p:{acme}".to_vec());
        // A bearer token never reaches Redis: its digest does.
        let token = TenantKey::from("s3cret-token").sensitive();
        let key = store.key(&token);
        assert_eq!(key.len(), "p:{#}".len() + 32);
        assert!(key.starts_with(b"p:{#") && key.ends_with(b"}"));
        assert!(!key.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(key, store.key(&TenantKey::from("s3cret-token").sensitive()));
    }
}
