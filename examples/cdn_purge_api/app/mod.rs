//! The CDN purge API: an axum router with every tower-floodgate layer in
//! front of a purge backend of finite capacity. Shared by the
//! `cdn_purge_api` server, the `rogue_tenant` demo and the integration
//! tests.
//!
//! `POST /v1/purge` goes through, outermost first:
//!
//! 1. authentication: `Authorization: Bearer KEY` names the tenant (401
//!    otherwise) and puts its [`TenantKey`] in the request's extensions,
//!    where every layer reads it;
//! 2. [`RateLimitLayer`]: purge requests a second, per tenant (429);
//! 3. [`ConcurrencyCapLayer`]: requests in flight, per tenant (429);
//! 4. [`LoadShedLayer`]: requests in flight in the process, with the plan's
//!    priority and fairness between tenants (503);
//! 5. the handler: the body (64 KiB at most, 413), its targets (400), the
//!    tenant's *item* rate (a request costs its number of targets; 429),
//!    then the [`PurgeBatcher`], which batches per tenant and coalesces
//!    identical pending purges, in front of the backend.
//!
//! Unprotected, the layers are in shadow mode (they only count) and every
//! request calls the backend itself: the API as it was before the incident.

pub(crate) mod backend;
pub(crate) mod cli;
pub(crate) mod config;
#[cfg(feature = "grpc-example")]
pub(crate) mod grpc;
pub(crate) mod request;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{
    ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{Value, json};
use tower_floodgate::observe::{
    self, Dashboard, Decision, Event, LayerKind, Observer, TopTenants, Tracing,
};
use tower_floodgate::purge::{
    BatchConfig, BatchId, ItemResult, Mode, PurgeBatch, PurgeBatcher, PurgeItem,
};
#[cfg(feature = "redis")]
use tower_floodgate::redis::{FailurePolicy, RedisConfig, RedisStore};
use tower_floodgate::shed::Limit;
use tower_floodgate::{
    ConcurrencyCapLayer, LoadShedLayer, PolicyHandle, RateLimitLayer, RateLimiter, Rejection,
    TenantKey,
};

use self::backend::{Backend, BackendConfig};
use self::config::Config;
pub(crate) use self::request::{MAX_TARGETS, TargetKind, Targets, check_all, check_targets};

/// The largest request body.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// How the app is run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The simulated backend's capacity.
    pub(crate) backend: BackendConfig,
    /// Keep the rate limits in this Redis (fleet-wide), or in memory.
    pub(crate) redis: Option<RedisOptions>,
    /// Layers enforcing (protected) or in shadow mode with every request
    /// calling the backend itself (unprotected).
    pub(crate) protected: bool,
    /// Requests in flight in the process before the shedder refuses.
    pub(crate) max_in_flight: u32,
    /// How long a purge batch collects items.
    pub(crate) batch_window: Duration,
    /// Log refusals with `tracing` (at most one line a second per kind).
    pub(crate) log: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: BackendConfig::default(),
            redis: None,
            protected: true,
            max_in_flight: 512,
            batch_window: Duration::from_millis(5),
            log: true,
        }
    }
}

/// The Redis store of the rate limits.
#[derive(Debug, Clone)]
pub(crate) struct RedisOptions {
    pub(crate) url: String,
    /// Prepended to every key (instances that share limits use the same).
    pub(crate) prefix: String,
    /// `open`, `closed` or `local` (the in-memory limiter on this node).
    pub(crate) on_failure: String,
}

/// The app: its router and its shared state.
pub(crate) struct App {
    pub(crate) router: Router,
    pub(crate) state: Arc<AppState>,
}

/// What the handlers share.
pub(crate) struct AppState {
    admin_key: String,
    /// Plans by name, as configured (for admin changes).
    plans: HashMap<String, config::PlanConfig>,
    /// The tenant of each API key.
    keys: HashMap<String, TenantKey>,
    /// Each tenant's plan name and counters.
    tenants: HashMap<TenantKey, TenantEntry>,
    /// Request rate, concurrency and priority per tenant; blocks.
    pub(crate) policy: PolicyHandle,
    /// Items per second per tenant.
    items_policy: PolicyHandle,
    items: RateLimiter,
    batcher: PurgeBatcher<Backend>,
    pub(crate) backend: Backend,
    protected: bool,
    top: TopTenants,
    dashboard: Dashboard,
    next_request: AtomicU64,
    next_direct_batch: AtomicU64,
}

struct TenantEntry {
    plan: RwLock<String>,
    counts: Arc<Counts>,
}

/// Per-tenant counters, fed by the layers' decisions.
#[derive(Default)]
struct Counts {
    admitted: AtomicU64,
    rate_limited: AtomicU64,
    items_limited: AtomicU64,
    capped: AtomicU64,
    shed: AtomicU64,
    blocked: AtomicU64,
    coalesced: AtomicU64,
}

/// Counts each tenant's decisions (only configured tenants: the map never
/// grows).
#[derive(Clone)]
struct PerTenant(Arc<HashMap<TenantKey, Arc<Counts>>>);

impl Observer for PerTenant {
    fn observe(&self, event: &Event<'_>) {
        let Some(counts) = event.tenant.and_then(|t| self.0.get(t)) else {
            return;
        };
        let counter = match (event.layer, event.decision) {
            (LayerKind::RateLimit, Decision::RateLimited) => &counts.rate_limited,
            (_, Decision::Blocked) => &counts.blocked,
            (LayerKind::ConcurrencyCap, Decision::ConcurrencyCapped) => &counts.capped,
            (_, Decision::Shed) => &counts.shed,
            (LayerKind::Purge, Decision::Coalesced) => &counts.coalesced,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the app could not be built.
#[derive(Debug)]
pub(crate) struct BuildError(pub(crate) String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

/// A limiter on `policy`, in memory or on Redis under `prefix`.
fn limiter(
    policy: PolicyHandle,
    redis: Option<&RedisOptions>,
    prefix: &str,
) -> Result<RateLimiter, BuildError> {
    let builder = RateLimiter::builder(policy);
    let Some(redis) = redis else {
        return Ok(builder.build());
    };
    #[cfg(feature = "redis")]
    {
        let on_failure = match redis.on_failure.as_str() {
            "open" => FailurePolicy::Open,
            "closed" => FailurePolicy::Closed,
            "local" => FailurePolicy::Local { share: 1.0 },
            other => {
                return Err(BuildError(format!(
                    "--redis-failure must be open, closed or local, not `{other}`"
                )));
            }
        };
        let store = RedisStore::new(
            &redis.url,
            RedisConfig {
                prefix: format!("{}{prefix}", redis.prefix),
                on_failure,
                ..RedisConfig::default()
            },
        )
        .map_err(|e| BuildError(format!("--redis {}: {e}", redis.url)))?;
        Ok(builder.redis(store).build())
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = (builder, prefix);
        Err(BuildError(format!(
            "--redis {}: this build has no Redis support; run with `--features redis`",
            redis.url
        )))
    }
}

/// The tower-floodgate layers in front of the purge endpoint, outermost
/// first; authentication goes outside them.
#[derive(Clone)]
pub(crate) struct Layers {
    pub(crate) rate_limit: RateLimitLayer,
    pub(crate) cap: ConcurrencyCapLayer,
    pub(crate) shed: LoadShedLayer,
}

/// Builds the app. Must be called within a tokio runtime.
pub(crate) fn build(config: &Config, options: &Options) -> Result<App, BuildError> {
    let (state, layers) = service(config, options)?;
    // Outermost last: authentication, rate limit, concurrency cap, shedder.
    let purge = Router::new()
        .route("/v1/purge", post(purge_handler))
        .route_layer(layers.shed)
        .route_layer(layers.cap)
        .route_layer(layers.rate_limit)
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ));
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/stats", get(stats_handler))
        .route("/v1/admin/tenants/{id}", put(admin_handler))
        .merge(purge)
        .with_state(Arc::clone(&state))
        .layer(middleware::map_response(as_problem));
    Ok(App { router, state })
}

/// The purge service without its transport: the shared state and the
/// layers, for the HTTP router here and the gRPC server of `grpc_purge`.
/// Must be called within a tokio runtime.
pub(crate) fn service(
    config: &Config,
    options: &Options,
) -> Result<(Arc<AppState>, Layers), BuildError> {
    let (requests, items) = config.policies();
    let policy = PolicyHandle::new(requests);
    let items_policy = PolicyHandle::new(items);
    let counts: HashMap<TenantKey, Arc<Counts>> = config
        .tenants
        .iter()
        .map(|t| (TenantKey::from(t.id.as_str()), Arc::new(Counts::default())))
        .collect();
    let per_tenant = PerTenant(Arc::new(counts));
    let top = TopTenants::new();
    let observers: Vec<Arc<dyn Observer>> = if options.log {
        vec![
            Arc::new(top.clone()),
            Arc::new(per_tenant.clone()),
            Arc::new(Tracing::new()),
        ]
    } else {
        vec![Arc::new(top.clone()), Arc::new(per_tenant.clone())]
    };

    let shadow = !options.protected;
    let rate_limit = RateLimitLayer::new(limiter(
        policy.clone(),
        options.redis.as_ref(),
        "requests:",
    )?)
    .observer(observers.clone())
    .success_headers(true)
    .shadow(shadow);
    let cap = ConcurrencyCapLayer::new(policy.clone())
        .observer(observers.clone())
        .shadow(shadow);
    let shed = LoadShedLayer::new(Limit::fixed(options.max_in_flight))
        .policy(policy.clone())
        .observer(observers.clone())
        .shadow(shadow);
    let items = limiter(items_policy.clone(), options.redis.as_ref(), "items:")?;
    let backend = Backend::new(options.backend);
    let batcher = PurgeBatcher::with_config(
        backend.clone(),
        BatchConfig {
            window: options.batch_window,
            max_items: MAX_TARGETS,
        },
    )
    .observer(observe::from_fn({
        let per_tenant = per_tenant.clone();
        move |event| per_tenant.observe(event)
    }));
    let dashboard = Dashboard::new()
        .rate_limit("requests", &rate_limit)
        .concurrency_cap("requests", &cap)
        .load_shed("process", &shed)
        .purge("backend", &batcher);

    let state = Arc::new(AppState {
        admin_key: config.admin_key.clone(),
        plans: config.plans.clone().into_iter().collect(),
        keys: config.keys(),
        tenants: config
            .tenants
            .iter()
            .map(|t| {
                let key = TenantKey::from(t.id.as_str());
                let counts = Arc::clone(&per_tenant.0[&key]);
                (
                    key,
                    TenantEntry {
                        plan: RwLock::new(t.plan.clone()),
                        counts,
                    },
                )
            })
            .collect(),
        policy,
        items_policy,
        items,
        batcher,
        backend,
        protected: options.protected,
        top,
        dashboard,
        next_request: AtomicU64::new(1),
        next_direct_batch: AtomicU64::new(1 << 40),
    });
    Ok((
        state,
        Layers {
            rate_limit,
            cap,
            shed,
        },
    ))
}

// ─── Errors ─────────────────────────────────────────────────────────────

/// An RFC 9457 problem response.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// axum's own refusals (an empty 404 for an unknown path, 405 for a wrong
/// method, a text 400 for a malformed path parameter) as problems too:
/// every error of this API is `application/problem+json`.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty());
    let detail = match (text, status) {
        (Some(text), _) => text.trim().to_owned(),
        (None, StatusCode::NOT_FOUND) => "no such endpoint".to_owned(),
        (None, StatusCode::METHOD_NOT_ALLOWED) => {
            "this endpoint does not take this method".to_owned()
        }
        (None, _) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut problem = problem(status, &detail);
    // A 405 says what the endpoint takes.
    if let Some(allow) = parts.headers.get(ALLOW) {
        problem.headers_mut().insert(ALLOW, allow.clone());
    }
    problem
}

/// The request's body, up to `max` bytes: 413 past that, 400 if it could
/// not be read (the client went away, a broken chunked encoding).
async fn read_body(req: Request, max: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(req.into_body(), max)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is larger than {max} bytes"),
                )
            } else {
                problem(
                    StatusCode::BAD_REQUEST,
                    &format!("the body could not be read: {e}"),
                )
            }
        })
}

fn unauthorized(detail: &str) -> Response {
    let mut response = problem(StatusCode::UNAUTHORIZED, detail);
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The API key of `Authorization: Bearer KEY`, or why there is none.
fn bearer(headers: &HeaderMap) -> Result<&str, &'static str> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err("an API key is needed: Authorization: Bearer KEY");
    };
    let value = value.to_str().unwrap_or("");
    match value.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty() => {
            Ok(key.trim())
        }
        _ => Err("the Authorization header must be `Bearer KEY`"),
    }
}

/// Puts the tenant of the API key in the request's extensions.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let tenant = match state.tenant_of(req.headers()) {
        Ok(tenant) => tenant,
        Err(detail) => return unauthorized(detail),
    };
    req.extensions_mut().insert(tenant);
    next.run(req).await
}

impl AppState {
    /// The tenant whose API key the `Authorization` header carries, or why
    /// there is none.
    pub(crate) fn tenant_of(&self, headers: &HeaderMap) -> Result<TenantKey, &'static str> {
        self.keys
            .get(bearer(headers)?)
            .cloned()
            .ok_or("unknown API key")
    }
}

/// Whether the request carries the admin key; else why not.
fn is_admin(state: &AppState, req: &Request) -> Result<(), &'static str> {
    if bearer(req.headers())? == state.admin_key {
        Ok(())
    } else {
        Err("this endpoint needs the admin key")
    }
}

// ─── POST /v1/purge ─────────────────────────────────────────────────────

/// Why an authenticated, checked purge was not carried out.
#[derive(Debug)]
pub(crate) enum PurgeRefusal {
    /// The tenant is over its item rate.
    ItemsLimited(Rejection),
    /// The backend refused every item for its capacity; retry after this.
    BackendBusy(Duration),
}

/// What became of one target.
#[derive(Debug)]
pub(crate) struct TargetOutcome {
    /// The target as sent.
    pub(crate) target: String,
    /// `None` when purged, else why it failed.
    pub(crate) failure: Option<String>,
    pub(crate) batch: BatchId,
    pub(crate) coalesced: bool,
}

/// A purge carried out.
#[derive(Debug)]
pub(crate) struct Purged {
    pub(crate) request_id: String,
    /// One per target, in the order sent.
    pub(crate) results: Vec<TargetOutcome>,
}

impl AppState {
    /// Carries out a checked purge of `tenant`'s: its item rate (a request
    /// costs its number of targets), then the batcher (protected) or one
    /// backend call of its own (unprotected, as before the incident).
    pub(crate) async fn purge(
        &self,
        tenant: &TenantKey,
        targets: Targets,
        mode: Mode,
    ) -> Result<Purged, PurgeRefusal> {
        let entry = self.tenants.get(tenant);
        if let Err(rejection) = self.items.admit_async(tenant, targets.len() as u32).await {
            if let Some(entry) = entry {
                entry.counts.items_limited.fetch_add(1, Ordering::Relaxed);
            }
            if self.protected {
                return Err(PurgeRefusal::ItemsLimited(rejection));
            }
        }
        if let Some(entry) = entry {
            entry.counts.admitted.fetch_add(1, Ordering::Relaxed);
        }
        let request_id = format!(
            "r-{:08x}",
            self.next_request.fetch_add(1, Ordering::Relaxed)
        );
        let outcomes: Vec<(ItemResult, BatchId, bool)> = if self.protected {
            let purges = targets
                .iter()
                .map(|(_, target)| self.batcher.purge(tenant.clone(), target.clone(), mode));
            await_all(purges)
                .await
                .into_iter()
                .map(|o| (o.result, o.batch, o.coalesced))
                .collect()
        } else {
            let id = BatchId(self.next_direct_batch.fetch_add(1, Ordering::Relaxed));
            let items = targets
                .iter()
                .map(|(_, target)| PurgeItem {
                    target: target.clone(),
                    mode,
                })
                .collect();
            self.backend
                .purge(PurgeBatch {
                    id,
                    tenant: tenant.clone(),
                    items,
                })
                .await
                .into_iter()
                .map(|r| (r, id, false))
                .collect()
        };
        // Refused by the backend for its capacity, every item: its
        // retry-after is passed on.
        let backend_wait = outcomes
            .iter()
            .map(|(r, ..)| match r {
                ItemResult::RateLimited { retry_after } => Some(*retry_after),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|waits| waits.into_iter().max());
        if let Some(wait) = backend_wait {
            return Err(PurgeRefusal::BackendBusy(wait));
        }
        let results = targets
            .into_iter()
            .zip(outcomes)
            .map(|((target, _), (result, batch, coalesced))| TargetOutcome {
                target,
                failure: match result {
                    ItemResult::Purged => None,
                    ItemResult::Failed(reason) => Some(reason),
                    ItemResult::RateLimited { retry_after } => Some(format!(
                        "the purge backend is over capacity; retry in {} ms",
                        retry_after.as_millis()
                    )),
                    _ => Some("unknown result".to_owned()),
                },
                batch,
                coalesced,
            })
            .collect();
        Ok(Purged {
            request_id,
            results,
        })
    }
}

/// Awaits every future, in order. The batcher takes each purge when it is
/// asked (the futures only wait for the answers), so awaiting them in turn
/// costs no more than awaiting them together.
async fn await_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<F> = futures.collect();
    let mut out = Vec::with_capacity(futures.len());
    for future in futures {
        out.push(future.await);
    }
    out
}

async fn purge_handler(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let Some(tenant) = req.extensions().get::<TenantKey>().cloned() else {
        return unauthorized("an API key is needed");
    };
    let too_large = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY);
    if too_large {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {MAX_BODY} bytes"),
        );
    }
    let body = match read_body(req, MAX_BODY).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let (targets, mode) = match request::parse(&body) {
        Ok(parsed) => parsed,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, &detail),
    };
    let purged = match state.purge(&tenant, targets, mode).await {
        Ok(purged) => purged,
        Err(PurgeRefusal::ItemsLimited(rejection)) => return rejection.into_response(),
        Err(PurgeRefusal::BackendBusy(wait)) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "the purge backend is over capacity; retry in {} ms",
                    wait.as_millis()
                ),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
    };
    let results: Vec<Value> = purged
        .results
        .iter()
        .map(|outcome| {
            let mut item = json!({
                "target": outcome.target,
                "status": if outcome.failure.is_some() { "failed" } else { "purged" },
                "batch": outcome.batch.to_string(),
                "coalesced": outcome.coalesced,
            });
            if let Some(reason) = &outcome.failure {
                item["reason"] = json!(reason);
            }
            item
        })
        .collect();
    let body = json!({
        "request_id": purged.request_id,
        "tenant": tenant.to_string(),
        "results": results,
    });
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

// ─── GET /v1/stats ──────────────────────────────────────────────────────

async fn stats_handler(State(state): State<Arc<AppState>>, req: Request) -> Response {
    if let Err(detail) = is_admin(&state, &req) {
        return unauthorized(detail);
    }
    let policy = state.policy.current();
    let mut tenants = serde_json::Map::new();
    let mut ids: Vec<&TenantKey> = state.tenants.keys().collect();
    ids.sort_by_key(|k| k.as_bytes().to_vec());
    for id in ids {
        let entry = &state.tenants[id];
        let get = |f: fn(&Counts) -> &AtomicU64| f(&entry.counts).load(Ordering::Relaxed);
        tenants.insert(
            id.to_string(),
            json!({
                "plan": *entry.plan.read(),
                "blocked": policy.is_blocked(id.as_bytes()),
                "admitted": get(|c| &c.admitted),
                "rate_limited": get(|c| &c.rate_limited) + get(|c| &c.items_limited),
                "items_limited": get(|c| &c.items_limited),
                "capped": get(|c| &c.capped),
                "shed": get(|c| &c.shed),
                "blocked_requests": get(|c| &c.blocked),
                "coalesced": get(|c| &c.coalesced),
            }),
        );
    }
    let snapshot = state.dashboard.snapshot();
    let top = state.top.snapshot(5);
    let hitters = |list: &[observe::HeavyHitter]| -> Vec<Value> {
        list.iter()
            .map(|h| {
                json!({
                    "tenant": h.tenant.to_string(),
                    "count": h.count,
                    "error": h.error,
                    "share": h.share,
                })
            })
            .collect()
    };
    let batcher = state.batcher.stats();
    let backend = state.backend.stats();
    let shed = &snapshot.load_shedders[0].stats;
    let body = json!({
        "tenants": tenants,
        "backend": {
            "calls": backend.calls,
            "items_purged": backend.items_purged,
            "calls_refused": backend.calls_refused,
        },
        "batcher": {
            "requests": batcher.requests,
            "coalesced": batcher.coalesced,
            "batches": batcher.batches,
            "items_sent": batcher.items_sent,
            "pending": batcher.pending,
            "in_flight": batcher.in_flight,
        },
        "process": {
            "in_flight": shed.in_flight,
            "limit": shed.limit,
            "waiting": shed.waiting,
        },
        "top_tenants": {
            "window_seconds": top.window.as_secs_f64(),
            "requests": top.requests,
            "rejections": top.rejections,
            "by_requests": hitters(&top.by_requests),
            "by_rejections": hitters(&top.by_rejections),
        },
    });
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

// ─── PUT /v1/admin/tenants/{id} ─────────────────────────────────────────

/// A change to one tenant: its plan, its block, or both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantChange {
    plan: Option<String>,
    blocked: Option<bool>,
}

async fn admin_handler(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    if let Err(detail) = is_admin(&state, &req) {
        return unauthorized(detail);
    }
    let tenant = TenantKey::from(id.as_str());
    let Some(entry) = state.tenants.get(&tenant) else {
        return problem(StatusCode::NOT_FOUND, &format!("no tenant `{id}`"));
    };
    let body = match read_body(req, MAX_BODY).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let change: TenantChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    if change.plan.is_none() && change.blocked.is_none() {
        return problem(StatusCode::BAD_REQUEST, "give `plan`, `blocked`, or both");
    }
    if let Some(plan) = &change.plan {
        if !state.plans.contains_key(plan) {
            return problem(StatusCode::BAD_REQUEST, &format!("no plan `{plan}`"));
        }
        let items_tier = format!("{plan}-items");
        let assigned = state
            .policy
            .update(|p| p.assign(tenant.clone(), plan))
            .and_then(|()| {
                state
                    .items_policy
                    .update(|p| p.assign(tenant.clone(), &items_tier))
            });
        if let Err(e) = assigned {
            return problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
        *entry.plan.write() = plan.clone();
    }
    match change.blocked {
        Some(true) => state.policy.block(tenant.clone()),
        Some(false) => state.policy.unblock(tenant.clone()),
        None => {}
    }
    let body = json!({
        "tenant": id,
        "plan": *entry.plan.read(),
        "blocked": state.policy.current().is_blocked(tenant.as_bytes()),
    });
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}
