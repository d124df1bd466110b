//! Who gets which limits: plans, tiers, per-tenant overrides, and run-time
//! changes.
//!
//! A [`Policy`] maps every tenant to a [`Plan`]: a default plan, named tiers
//! that tenants are assigned to, and per-tenant plans that override both. A
//! [`PolicyHandle`] holds the current policy for any number of layers and
//! limiters; replacing it takes effect on the next request, with no restart
//! and no rebuilt layer.
//!
//! ```
//! use std::num::NonZeroU32;
//! use tower_floodgate::{Plan, Policy, PolicyHandle, Quota};
//!
//! const fn per_sec(n: u32) -> Quota {
//!     Quota::per_second(NonZeroU32::new(n).unwrap())
//! }
//!
//! let policy = Policy::builder(Plan::new("free").rate(per_sec(10)))
//!     .tier(Plan::new("pro").rate(per_sec(1_000)))
//!     .assign("acme", "pro")
//!     .override_plan("noisy-neighbour", Plan::new("restricted").rate(per_sec(1)))
//!     .build()?;
//! assert_eq!(policy.plan_for("acme").name(), "pro");
//! assert_eq!(policy.plan_for("someone-else").name(), "free");
//!
//! let handle = PolicyHandle::new(policy);
//! // Later, from an admin endpoint:
//! handle.update(|p| p.assign("someone-else", "pro"))?;
//! assert_eq!(handle.current().plan_for("someone-else").name(), "pro");
//! # Ok::<_, tower_floodgate::PolicyError>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use hashbrown::HashTable;
use http::HeaderValue;
use parking_lot::Mutex;

use crate::hash::tenant_hash;
use crate::key::TenantKey;
use crate::observe::LayerKind;
use crate::quota::Quota;
use crate::shed::Priority;

/// The limits that apply to a tenant.
///
/// A plan without a [`rate`](Plan::rate) is not rate limited. Its name
/// identifies it in the `RateLimit-Policy` and `RateLimit` header fields, in
/// problem responses and in logs; characters other than printable ASCII are
/// replaced by `_` there.
#[derive(Clone)]
pub struct Plan {
    inner: Arc<PlanInner>,
}

#[derive(Clone)]
struct PlanInner {
    name: Arc<str>,
    rate: Option<Quota>,
    /// `"name";q=…;w=…`, rendered once.
    rate_policy: Option<HeaderValue>,
    concurrency: Option<u32>,
    /// `"name";q=…;qu="concurrent-requests"`, rendered once.
    concurrency_policy: Option<HeaderValue>,
    priority: Option<Priority>,
    /// The name as a Structured Fields string, quotes included.
    sf_name: Arc<str>,
}

impl Plan {
    /// A plan named `name`, with no limits yet.
    #[must_use]
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let name: Arc<str> = name.into();
        let sf_name = sf_string(&name).into();
        Self {
            inner: Arc::new(PlanInner {
                name,
                rate: None,
                rate_policy: None,
                concurrency: None,
                concurrency_policy: None,
                priority: None,
                sf_name,
            }),
        }
    }

    /// The same plan with rate quota `quota`.
    #[must_use]
    pub fn rate(mut self, quota: Quota) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        let (q, w) = quota.header_window();
        let value = format!("{};q={q};w={w}", inner.sf_name);
        inner.rate = Some(quota);
        // Only printable ASCII goes into `value`, which is always valid.
        inner.rate_policy = HeaderValue::from_str(&value).ok();
        self
    }

    /// The same plan, allowing each tenant on it at most `max_in_flight`
    /// requests at once (see [`ConcurrencyCapLayer`](crate::ConcurrencyCapLayer)).
    /// Zero refuses every request: a way to block a tenant.
    #[must_use]
    pub fn concurrency(mut self, max_in_flight: u32) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        let value = format!(
            "{};q={max_in_flight};qu=\"concurrent-requests\"",
            inner.sf_name
        );
        inner.concurrency = Some(max_in_flight);
        inner.concurrency_policy = HeaderValue::from_str(&value).ok();
        self
    }

    /// The per-tenant concurrency cap, if the plan has one.
    #[must_use]
    #[inline]
    pub fn concurrency_limit(&self) -> Option<u32> {
        self.inner.concurrency
    }

    pub(crate) fn concurrency_policy_header(&self) -> Option<&HeaderValue> {
        self.inner.concurrency_policy.as_ref()
    }

    /// The same plan, whose tenants' requests have `priority` for the load
    /// shedder (unless the request states its own).
    #[must_use]
    pub fn priority(mut self, priority: Priority) -> Self {
        Arc::make_mut(&mut self.inner).priority = Some(priority);
        self
    }

    /// The priority of the plan's requests, if set.
    #[must_use]
    #[inline]
    pub fn request_priority(&self) -> Option<Priority> {
        self.inner.priority
    }

    /// The plan's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The rate quota, if the plan is rate limited.
    #[must_use]
    #[inline]
    pub fn rate_quota(&self) -> Option<&Quota> {
        self.inner.rate.as_ref()
    }

    pub(crate) fn rate_policy_header(&self) -> Option<&HeaderValue> {
        self.inner.rate_policy.as_ref()
    }

    pub(crate) fn sf_name(&self) -> &str {
        &self.inner.sf_name
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("name", &self.inner.name)
            .field("rate", &self.inner.rate)
            .field("concurrency", &self.inner.concurrency)
            .field("priority", &self.inner.priority)
            .finish()
    }
}

impl PartialEq for Plan {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name == other.inner.name
            && self.inner.rate == other.inner.rate
            && self.inner.concurrency == other.inner.concurrency
            && self.inner.priority == other.inner.priority
    }
}

/// `s` as a Structured Fields string (RFC 8941 §3.3.3): quoted, with `"` and
/// `\` escaped, and anything outside printable ASCII replaced by `_`.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// A tenant's entry in a policy.
#[derive(Clone)]
enum Rule {
    /// On a named tier.
    Tier(Arc<str>),
    /// On a plan of its own.
    Own(Plan),
}

struct Entry {
    hash: u64,
    key: TenantKey,
    plan: Plan,
    rule: Rule,
}

/// The mapping from tenants to plans. Immutable; build a new one (or use
/// [`PolicyHandle::update`]) to change it.
///
/// Looking a tenant up costs nothing when no tenant has an assignment, and
/// one hash probe otherwise.
pub struct Policy {
    default: Plan,
    tiers: HashMap<Arc<str>, Plan>,
    tenants: HashTable<Entry>,
    /// Whether any plan caps concurrency (else the concurrency layer need
    /// not know the tenant).
    any_concurrency: bool,
    /// Whether any plan sets a priority (else the shedder need not know the
    /// tenant for it).
    any_priority: bool,
    /// Tenants refused outright, whatever their plan.
    blocked: HashTable<(u64, TenantKey)>,
    /// The layers in shadow mode, by [`LayerKind::bit`].
    shadow: u8,
}

impl Policy {
    /// A policy that gives every tenant `default`.
    #[must_use]
    pub fn new(default: Plan) -> Self {
        Self::builder(default)
            .build()
            .unwrap_or_else(|_| unreachable!("a policy without assignments is always valid"))
    }

    /// Starts a policy whose tenants get `default` unless told otherwise.
    pub fn builder(default: Plan) -> PolicyBuilder {
        PolicyBuilder {
            default,
            tiers: Vec::new(),
            tenants: HashMap::new(),
            blocked: HashSet::new(),
            shadow: 0,
        }
    }

    /// The plan that applies to `tenant`.
    #[must_use]
    pub fn plan_for(&self, tenant: impl AsRef<[u8]>) -> &Plan {
        let bytes = tenant.as_ref();
        self.plan_for_hashed(tenant_hash(bytes), bytes)
    }

    #[inline]
    pub(crate) fn plan_for_hashed(&self, hash: u64, tenant: &[u8]) -> &Plan {
        if self.tenants.is_empty() {
            return &self.default;
        }
        self.assigned_plan(hash, tenant)
    }

    /// [`plan_for_hashed`](Self::plan_for_hashed) when some tenants have
    /// plans of their own (kept out of line, so that the check before it
    /// inlines).
    #[inline(never)]
    fn assigned_plan(&self, hash: u64, tenant: &[u8]) -> &Plan {
        self.tenants
            .find(hash, |e| e.key.as_bytes() == tenant)
            .map_or(&self.default, |e| &e.plan)
    }

    /// The quota for the tenant whose key hashes to `hash`, judged by the
    /// hash alone (the store knows no more than that).
    pub(crate) fn quota_for_hash(&self, hash: u64) -> Option<&Quota> {
        if self.tenants.is_empty() {
            return self.default.rate_quota();
        }
        self.tenants
            .find(hash, |e| e.hash == hash)
            .map_or(&self.default, |e| &e.plan)
            .rate_quota()
    }

    /// The hashes of tenants whose quota may differ between `self` and
    /// `other`; `None` if a tier's (or the default plan's) quota changed,
    /// which may concern every tenant.
    pub(crate) fn changed_tenants(&self, other: &Policy) -> Option<Vec<u64>> {
        let same_tiers = self.default.rate_quota() == other.default.rate_quota()
            && self.tiers.len() == other.tiers.len()
            && self.tiers.iter().all(|(name, plan)| {
                other.tiers.get(name).map(Plan::rate_quota) == Some(plan.rate_quota())
            });
        if !same_tiers {
            return None;
        }
        let mut changed: Vec<u64> = self
            .tenants
            .iter()
            .chain(other.tenants.iter())
            .filter(|e| self.quota_for_hash(e.hash) != other.quota_for_hash(e.hash))
            .map(|e| e.hash)
            .collect();
        changed.sort_unstable();
        changed.dedup();
        Some(changed)
    }

    /// Whether any plan of this policy caps concurrency.
    #[inline]
    pub(crate) fn any_concurrency(&self) -> bool {
        self.any_concurrency
    }

    /// Whether any plan of this policy sets a priority.
    #[inline]
    pub(crate) fn any_priority(&self) -> bool {
        self.any_priority
    }

    /// Whether `tenant` is blocked.
    #[must_use]
    pub fn is_blocked(&self, tenant: impl AsRef<[u8]>) -> bool {
        let bytes = tenant.as_ref();
        self.is_blocked_hashed(tenant_hash(bytes), bytes)
    }

    #[inline]
    pub(crate) fn is_blocked_hashed(&self, hash: u64, tenant: &[u8]) -> bool {
        !self.blocked.is_empty()
            && self
                .blocked
                .find(hash, |(_, key)| key.as_bytes() == tenant)
                .is_some()
    }

    /// Whether any tenant is blocked (else a layer need not know the tenant
    /// to check).
    #[inline]
    pub(crate) fn any_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// The blocked tenants, in no particular order.
    pub fn blocked_tenants(&self) -> impl Iterator<Item = &TenantKey> {
        self.blocked.iter().map(|(_, key)| key)
    }

    /// Whether the policy puts `layer` in shadow mode (it then lets every
    /// request through and only counts and logs what it would refuse).
    #[must_use]
    pub fn is_shadow(&self, layer: LayerKind) -> bool {
        self.shadow & layer.bit() != 0
    }

    /// The plan of tenants without an assignment.
    #[must_use]
    pub fn default_plan(&self) -> &Plan {
        &self.default
    }

    /// The named tier, if the policy has it (the default plan is a tier too).
    #[must_use]
    pub fn tier(&self, name: &str) -> Option<&Plan> {
        self.tiers.get(name)
    }

    /// Every tier, default plan included, in no particular order.
    pub fn tiers(&self) -> impl Iterator<Item = &Plan> {
        self.tiers.values()
    }

    /// How many tenants have an assignment or a plan of their own.
    #[must_use]
    pub fn assigned_tenants(&self) -> usize {
        self.tenants.len()
    }

    /// A builder holding this policy, to derive a changed one.
    pub fn to_builder(&self) -> PolicyBuilder {
        PolicyBuilder {
            default: self.default.clone(),
            tiers: self
                .tiers
                .values()
                .filter(|p| p.name() != self.default.name())
                .cloned()
                .collect(),
            tenants: self
                .tenants
                .iter()
                .map(|e| (e.key.clone(), e.rule.clone()))
                .collect(),
            blocked: self.blocked.iter().map(|(_, key)| key.clone()).collect(),
            shadow: self.shadow,
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("default", &self.default)
            .field("tiers", &self.tiers.len())
            .field("assigned_tenants", &self.tenants.len())
            .field("blocked_tenants", &self.blocked.len())
            .field("shadow", &self.shadow)
            .finish()
    }
}

/// Builds a [`Policy`]. Later calls for the same tenant or tier replace
/// earlier ones.
#[must_use]
pub struct PolicyBuilder {
    default: Plan,
    tiers: Vec<Plan>,
    tenants: HashMap<TenantKey, Rule>,
    blocked: HashSet<TenantKey>,
    shadow: u8,
}

impl PolicyBuilder {
    /// Adds (or replaces) the tier `plan`, which tenants can be
    /// [assigned](Self::assign) to by its name. The default plan is a tier
    /// too: a plan with its name replaces the default plan.
    pub fn tier(mut self, plan: Plan) -> Self {
        if plan.name() == self.default.name() {
            self.default = plan;
            return self;
        }
        self.tiers.retain(|p| p.name() != plan.name());
        self.tiers.push(plan);
        self
    }

    /// Replaces the default plan (and the tier of its name, if there is
    /// one).
    pub fn default_plan(mut self, plan: Plan) -> Self {
        self.tiers.retain(|p| p.name() != plan.name());
        self.default = plan;
        self
    }

    /// Puts `tenant` on the tier named `tier`. [`build`](Self::build) fails
    /// if no such tier exists.
    pub fn assign(mut self, tenant: impl Into<TenantKey>, tier: &str) -> Self {
        self.tenants.insert(tenant.into(), Rule::Tier(tier.into()));
        self
    }

    /// Gives `tenant` a plan of its own, overriding its tier.
    pub fn override_plan(mut self, tenant: impl Into<TenantKey>, plan: Plan) -> Self {
        self.tenants.insert(tenant.into(), Rule::Own(plan));
        self
    }

    /// Removes `tenant`'s assignment or override: it gets the default plan.
    pub fn remove(mut self, tenant: impl Into<TenantKey>) -> Self {
        self.tenants.remove(&tenant.into());
        self
    }

    /// Blocks `tenant`: every layer refuses its requests (403 Forbidden,
    /// gRPC PERMISSION_DENIED) until it is [unblocked](Self::unblock). Its
    /// plan assignment is kept.
    pub fn block(mut self, tenant: impl Into<TenantKey>) -> Self {
        self.blocked.insert(tenant.into());
        self
    }

    /// Lifts a [block](Self::block).
    pub fn unblock(mut self, tenant: impl Into<TenantKey>) -> Self {
        self.blocked.remove(&tenant.into());
        self
    }

    /// Puts `layer` in shadow mode, or back to enforcing. Every layer of
    /// that kind built with this policy follows when the policy changes it
    /// (a layer's own `set_shadow` switches that layer alone, until the
    /// policy's setting changes again).
    pub fn shadow(mut self, layer: LayerKind, enabled: bool) -> Self {
        if enabled {
            self.shadow |= layer.bit();
        } else {
            self.shadow &= !layer.bit();
        }
        self
    }

    /// The policy.
    ///
    /// # Errors
    ///
    /// [`PolicyError::UnknownTier`] if a tenant is assigned to a tier the
    /// policy does not have.
    pub fn build(self) -> Result<Policy, PolicyError> {
        let mut tiers: HashMap<Arc<str>, Plan> = self
            .tiers
            .into_iter()
            .map(|p| (Arc::clone(&p.inner.name), p))
            .collect();
        tiers.insert(Arc::clone(&self.default.inner.name), self.default.clone());
        let mut tenants = HashTable::with_capacity(self.tenants.len());
        for (key, rule) in self.tenants {
            let plan = match &rule {
                Rule::Own(plan) => plan.clone(),
                Rule::Tier(name) => match tiers.get(name) {
                    Some(plan) => plan.clone(),
                    None => {
                        return Err(PolicyError::UnknownTier {
                            tenant: key,
                            tier: name.to_string(),
                        });
                    }
                },
            };
            let hash = tenant_hash(key.as_bytes());
            tenants.insert_unique(
                hash,
                Entry {
                    hash,
                    key,
                    plan,
                    rule,
                },
                |e| e.hash,
            );
        }
        let any_plan = |f: fn(&Plan) -> bool| {
            tiers.values().any(f) || tenants.iter().any(|e: &Entry| f(&e.plan))
        };
        let any_concurrency = any_plan(|p| p.concurrency_limit().is_some());
        let any_priority = any_plan(|p| p.request_priority().is_some());
        let mut blocked = HashTable::with_capacity(self.blocked.len());
        for key in self.blocked {
            let hash = tenant_hash(key.as_bytes());
            blocked.insert_unique(hash, (hash, key), |(h, _)| *h);
        }
        Ok(Policy {
            default: self.default,
            tiers,
            tenants,
            any_concurrency,
            any_priority,
            blocked,
            shadow: self.shadow,
        })
    }
}

impl fmt::Debug for PolicyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyBuilder")
            .field("default", &self.default)
            .field("tiers", &self.tiers)
            .field("tenants", &self.tenants.len())
            .field("blocked", &self.blocked.len())
            .field("shadow", &self.shadow)
            .finish()
    }
}

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A tenant was assigned to a tier that does not exist.
    #[error("tenant {tenant} is assigned to tier `{tier}`, which the policy does not have")]
    UnknownTier {
        /// The tenant.
        tenant: TenantKey,
        /// The missing tier's name.
        tier: String,
    },
}

/// The current [`Policy`], shared by every layer and limiter built with it.
///
/// Cloning the handle shares it. [`replace`](Self::replace) and
/// [`update`](Self::update) take effect everywhere before they return, so
/// the next request sees the new plans.
///
/// # Tenants that change plans
///
/// A tenant keeps the units it has used when its quota changes, up to the
/// new plan's burst: its debt is rescaled to the new rate and capped at the
/// new burst. So an upgrade gives relief at once (a tenant blocked for an
/// hour at 1 request per hour has used 1 of 1 000 per hour, and is admitted
/// right away), and a downgrade throttles at once (100 units used on a plan
/// with a burst of 100 are the whole burst of a plan with 10). The limiters make
/// this adjustment while `update` runs, not on the request path.
#[derive(Clone)]
pub struct PolicyHandle {
    shared: Arc<HandleInner>,
}

struct HandleInner {
    current: ArcSwap<Policy>,
    /// Serialises changes, and lists who must hear of them.
    listeners: Mutex<Vec<Weak<dyn PolicyListener>>>,
}

/// Something that keeps state derived from the policy.
pub(crate) trait PolicyListener: Send + Sync {
    /// `new` replaced `old`. Called in order, one change at a time.
    fn policy_changed(&self, old: &Policy, new: &Arc<Policy>);
}

impl PolicyHandle {
    /// A handle holding `policy`.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self {
            shared: Arc::new(HandleInner {
                current: ArcSwap::from_pointee(policy),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The policy in force now.
    #[must_use]
    pub fn current(&self) -> Arc<Policy> {
        self.shared.current.load_full()
    }

    /// Registers `listener`, built with the policy `seen`, for every later
    /// change; if the policy changed since `seen`, tells it at once.
    /// Whether `other` is a clone of this handle (the same policy, changed
    /// together).
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub(crate) fn subscribe(&self, listener: &Arc<dyn PolicyListener>, seen: &Arc<Policy>) {
        let mut listeners = self.shared.listeners.lock();
        let current = self.current();
        if !Arc::ptr_eq(&current, seen) {
            listener.policy_changed(seen, &current);
        }
        listeners.retain(|l| l.strong_count() > 0);
        listeners.push(Arc::downgrade(listener));
    }

    /// Puts `policy` in force and returns the one it replaces.
    pub fn replace(&self, policy: Policy) -> Arc<Policy> {
        let mut listeners = self.shared.listeners.lock();
        self.install(&mut listeners, Arc::new(policy))
    }

    /// Derives a new policy from the current one and puts it in force.
    /// Changes are serialised: concurrent updates each see the result of
    /// the one before. `change` must not itself change this handle (that
    /// would wait for itself).
    ///
    /// # Errors
    ///
    /// The [`PolicyError`] of the derived policy; the current one then stays.
    pub fn update(
        &self,
        change: impl FnOnce(PolicyBuilder) -> PolicyBuilder,
    ) -> Result<(), PolicyError> {
        let mut listeners = self.shared.listeners.lock();
        let next = change(self.current().to_builder()).build()?;
        self.install(&mut listeners, Arc::new(next));
        Ok(())
    }

    /// Blocks `tenant` everywhere this policy is used, from the next
    /// request on. See [`PolicyBuilder::block`].
    pub fn block(&self, tenant: impl Into<TenantKey>) {
        let tenant = tenant.into();
        self.update_infallible(|p| p.block(tenant));
    }

    /// Lifts a block, from the next request on.
    pub fn unblock(&self, tenant: impl Into<TenantKey>) {
        let tenant = tenant.into();
        self.update_infallible(|p| p.unblock(tenant));
    }

    /// Switches every `layer` built with this policy to shadow mode (or
    /// back to enforcing), from the next request on.
    pub fn set_shadow(&self, layer: LayerKind, enabled: bool) {
        self.update_infallible(|p| p.shadow(layer, enabled));
    }

    /// An update that cannot fail: it touches no tier assignment.
    fn update_infallible(&self, change: impl FnOnce(PolicyBuilder) -> PolicyBuilder) {
        if let Err(e) = self.update(change) {
            // A valid policy stays valid without new assignments.
            unreachable!("{e}");
        }
    }

    fn install(
        &self,
        listeners: &mut Vec<Weak<dyn PolicyListener>>,
        next: Arc<Policy>,
    ) -> Arc<Policy> {
        let previous = self.shared.current.swap(Arc::clone(&next));
        listeners.retain(|l| match l.upgrade() {
            Some(listener) => {
                listener.policy_changed(&previous, &next);
                true
            }
            None => false,
        });
        previous
    }
}

impl From<Policy> for PolicyHandle {
    fn from(policy: Policy) -> Self {
        Self::new(policy)
    }
}

impl From<Plan> for PolicyHandle {
    fn from(plan: Plan) -> Self {
        Self::new(Policy::new(plan))
    }
}

impl From<Quota> for PolicyHandle {
    /// Every tenant on one plan, named `default`, with this quota.
    fn from(quota: Quota) -> Self {
        Self::new(Policy::new(Plan::new("default").rate(quota)))
    }
}

impl fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PolicyHandle")
            .field(&*self.shared.current.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn per_sec(n: u32) -> Quota {
        Quota::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
    }

    #[test]
    fn tiers_assignments_and_overrides() {
        let policy = Policy::builder(Plan::new("free").rate(per_sec(1)))
            .tier(Plan::new("pro").rate(per_sec(100)))
            .assign("a", "pro")
            .assign("b", "pro")
            .override_plan("b", Plan::new("b-special").rate(per_sec(7)))
            .assign("c", "free")
            .build()
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(policy.plan_for("a").name(), "pro");
        assert_eq!(policy.plan_for("b").rate_quota(), Some(&per_sec(7)));
        assert_eq!(policy.plan_for("c").name(), "free");
        assert_eq!(policy.plan_for("zzz").name(), "free");
        assert_eq!(policy.assigned_tenants(), 3);
        assert!(policy.tier("pro").is_some() && policy.tier("free").is_some());
        assert_eq!(policy.tiers().count(), 2);
    }

    #[test]
    fn unknown_tier_is_an_error() {
        let err = Policy::builder(Plan::new("free"))
            .assign("a", "gold")
            .build()
            .err();
        assert_eq!(
            err,
            Some(PolicyError::UnknownTier {
                tenant: TenantKey::from("a"),
                tier: "gold".into()
            })
        );
    }

    #[test]
    fn to_builder_round_trips_and_update_applies() {
        let handle = PolicyHandle::new(
            Policy::builder(Plan::new("free").rate(per_sec(1)))
                .tier(Plan::new("pro").rate(per_sec(100)))
                .assign("a", "pro")
                .build()
                .unwrap_or_else(|e| unreachable!("{e}")),
        );
        handle
            .update(|p| p.assign("b", "pro").remove("a"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let now = handle.current();
        assert_eq!(now.plan_for("a").name(), "free");
        assert_eq!(now.plan_for("b").name(), "pro");
        // A failing update leaves the policy alone.
        assert!(handle.update(|p| p.assign("c", "nope")).is_err());
        assert_eq!(handle.current().plan_for("b").name(), "pro");
        // Changing a tier's quota moves everyone on it.
        handle
            .update(|p| p.tier(Plan::new("pro").rate(per_sec(5))))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            handle.current().plan_for("b").rate_quota(),
            Some(&per_sec(5))
        );
    }

    #[test]
    fn a_tier_named_like_the_default_plan_replaces_it() {
        let handle = PolicyHandle::new(
            Policy::builder(Plan::new("free").rate(per_sec(100)))
                .assign("a", "free")
                .build()
                .unwrap_or_else(|e| unreachable!("{e}")),
        );
        // The way an operator throttles the free tier during a flood.
        handle
            .update(|p| p.tier(Plan::new("free").rate(per_sec(1))))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let now = handle.current();
        // Tenants on it by default, and by assignment.
        assert_eq!(now.plan_for("x").rate_quota(), Some(&per_sec(1)));
        assert_eq!(now.plan_for("a").rate_quota(), Some(&per_sec(1)));
        assert_eq!(now.default_plan().rate_quota(), Some(&per_sec(1)));
        assert_eq!(now.tier("free").and_then(Plan::rate_quota), Some(&per_sec(1)));
        // And the other way round: a new default plan replaces the tier of
        // its name.
        let policy = Policy::builder(Plan::new("free").rate(per_sec(100)))
            .tier(Plan::new("pro").rate(per_sec(50)))
            .default_plan(Plan::new("pro").rate(per_sec(7)))
            .build()
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(policy.plan_for("x").rate_quota(), Some(&per_sec(7)));
        assert_eq!(policy.tier("pro").and_then(Plan::rate_quota), Some(&per_sec(7)));
    }

    #[test]
    fn policy_header_is_a_structured_field() {
        let plan = Plan::new("we\"ird\\ näme").rate(Quota::per_minute(
            NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
        ));
        assert_eq!(
            plan.rate_policy_header().map(|v| v.to_str().unwrap_or("")),
            Some(r#""we\"ird\\ n_me";q=100;w=60"#)
        );
    }
}
