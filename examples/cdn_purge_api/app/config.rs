//! The tenants file: plans, tenants with their API keys, the admin key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

use serde::Deserialize;
use tower_floodgate::{Plan, Policy, Priority, Quota, TenantKey};

/// The parsed and checked tenants file.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The key of the admin endpoints.
    pub(crate) admin_key: String,
    /// Plans by name.
    pub(crate) plans: BTreeMap<String, PlanConfig>,
    /// Tenants, in file order.
    pub(crate) tenants: Vec<TenantConfig>,
}

/// One plan's limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanConfig {
    /// Purge requests a second.
    pub(crate) requests_per_second: u32,
    /// Purge requests at once after a quiet spell.
    pub(crate) burst: u32,
    /// Purged targets a second (a request costs its number of targets).
    pub(crate) items_per_second: u32,
    /// Targets at once after a quiet spell.
    pub(crate) items_burst: u32,
    /// Requests in flight at once.
    pub(crate) concurrency: u32,
    /// `critical`, `normal` or `sheddable`.
    #[serde(default = "normal")]
    pub(crate) priority: String,
}

fn normal() -> String {
    "normal".to_owned()
}

/// One tenant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantConfig {
    /// Its id: the tenant key of every layer, in stats and admin URLs.
    pub(crate) id: String,
    /// Its API key (`Authorization: Bearer KEY`).
    pub(crate) key: String,
    /// Its plan's name.
    pub(crate) plan: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    admin_key: String,
    plans: BTreeMap<String, PlanConfig>,
    #[serde(default)]
    tenants: Vec<TenantConfig>,
}

/// Why a tenants file cannot be used.
#[derive(Debug)]
pub(crate) struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Parses and checks a tenants file's text.
    pub(crate) fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let config = Self {
            admin_key: file.admin_key,
            plans: file.plans,
            tenants: file.tenants,
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        if self.admin_key.trim().len() < 8 {
            return fail("admin_key must have at least 8 characters".into());
        }
        if self.plans.is_empty() {
            return fail("at least one plan is needed".into());
        }
        for (name, plan) in &self.plans {
            for (field, value) in [
                ("requests_per_second", plan.requests_per_second),
                ("burst", plan.burst),
                ("items_per_second", plan.items_per_second),
                ("items_burst", plan.items_burst),
                ("concurrency", plan.concurrency),
            ] {
                if value == 0 {
                    return fail(format!("plan `{name}`: {field} must be at least 1"));
                }
            }
            if parse_priority(&plan.priority).is_none() {
                return fail(format!(
                    "plan `{name}`: priority must be critical, normal or sheddable, not `{}`",
                    plan.priority
                ));
            }
        }
        let mut ids = HashSet::new();
        let mut keys = HashSet::from([self.admin_key.as_str()]);
        for tenant in &self.tenants {
            if tenant.id.is_empty() || tenant.id.len() > 64 {
                return fail("a tenant id must have 1 to 64 characters".into());
            }
            if !tenant
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return fail(format!(
                    "tenant id `{}` may only hold letters, digits, `-` and `_`",
                    tenant.id
                ));
            }
            if !ids.insert(tenant.id.as_str()) {
                return fail(format!("tenant `{}` appears twice", tenant.id));
            }
            if tenant.key.len() < 8 || !tenant.key.bytes().all(|b| b.is_ascii_graphic()) {
                return fail(format!(
                    "tenant `{}`: the key must have at least 8 visible ASCII characters",
                    tenant.id
                ));
            }
            if !keys.insert(tenant.key.as_str()) {
                return fail(format!(
                    "tenant `{}`: its key is already used by another tenant or the admin",
                    tenant.id
                ));
            }
            if !self.plans.contains_key(&tenant.plan) {
                return fail(format!(
                    "tenant `{}`: no plan named `{}`",
                    tenant.id, tenant.plan
                ));
            }
        }
        Ok(())
    }

    /// The policies of the layers and of the item limiter.
    pub(crate) fn policies(&self) -> (Policy, Policy) {
        let mut plans = self.plans.iter();
        let Some((first_name, first)) = plans.next() else {
            unreachable!("a checked config has a plan");
        };
        // Tenants always have a plan; the default plan only serves tenants
        // the file does not know, who never get past authentication.
        let mut requests = Policy::builder(first.request_plan(first_name));
        let mut items = Policy::builder(first.item_plan(&format!("{first_name}-items")));
        for (name, plan) in plans {
            requests = requests.tier(plan.request_plan(name));
            items = items.tier(plan.item_plan(&format!("{name}-items")));
        }
        for tenant in &self.tenants {
            requests = requests.assign(tenant.id.as_str(), &tenant.plan);
            items = items.assign(tenant.id.as_str(), &format!("{}-items", tenant.plan));
        }
        match (requests.build(), items.build()) {
            (Ok(requests), Ok(items)) => (requests, items),
            _ => unreachable!("a checked config names existing plans"),
        }
    }

    /// The tenant of each API key.
    pub(crate) fn keys(&self) -> HashMap<String, TenantKey> {
        self.tenants
            .iter()
            .map(|t| (t.key.clone(), TenantKey::from(t.id.as_str())))
            .collect()
    }
}

/// `critical`, `normal` or `sheddable`.
pub(crate) fn parse_priority(s: &str) -> Option<Priority> {
    match s {
        "critical" => Some(Priority::Critical),
        "normal" => Some(Priority::Normal),
        "sheddable" => Some(Priority::Sheddable),
        _ => None,
    }
}

impl PlanConfig {
    /// The plan of the layers: request rate, concurrency, priority.
    pub(crate) fn request_plan(&self, name: &str) -> Plan {
        Plan::new(name)
            .rate(quota(self.requests_per_second, self.burst))
            .concurrency(self.concurrency)
            .priority(parse_priority(&self.priority).unwrap_or_default())
    }

    /// The plan of the item limiter: targets a second.
    pub(crate) fn item_plan(&self, name: &str) -> Plan {
        Plan::new(name).rate(quota(self.items_per_second, self.items_burst))
    }
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nz(per_second)).allow_burst(nz(burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_valid() {
        let text = include_str!("../../tenants.toml");
        let config = Config::parse(text).expect("valid");
        assert!(config.plans.len() >= 3);
        assert!(config.tenants.len() >= 10);
    }
}
