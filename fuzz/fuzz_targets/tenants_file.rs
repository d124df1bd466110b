//! The tenants file of the example API
//! (`examples/cdn_purge_api/app/config.rs`, included as it is) and the
//! policies it builds.
//!
//! Oracle: a file is either refused with a message, or gives policies in
//! which every tenant has the plan the file names and every API key names
//! one tenant; never a panic (`Config::policies` asserts what the checks
//! promise).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../examples/cdn_purge_api/app/config.rs"]
mod config;

#[derive(Arbitrary, Debug)]
enum Input {
    /// Any text.
    Raw(String),
    /// A file of the right shape with arbitrary names and numbers.
    Shaped {
        admin_key: String,
        plans: Vec<(String, [u32; 5], String)>,
        tenants: Vec<(String, String, String)>,
    },
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn shaped(
    admin_key: &str,
    plans: &[(String, [u32; 5], String)],
    tenants: &[(String, String, String)],
) -> String {
    let mut text = format!("admin_key = {}\n", quoted(admin_key));
    for (name, [rps, burst, ips, ib, conc], priority) in plans {
        text += &format!(
            "[plans.{}]\nrequests_per_second = {rps}\nburst = {burst}\n\
             items_per_second = {ips}\nitems_burst = {ib}\nconcurrency = {conc}\n\
             priority = {}\n",
            quoted(name),
            quoted(priority)
        );
    }
    for (id, key, plan) in tenants {
        text += &format!(
            "[[tenants]]\nid = {}\nkey = {}\nplan = {}\n",
            quoted(id),
            quoted(key),
            quoted(plan)
        );
    }
    text
}

fuzz_target!(|input: Input| {
    let text = match input {
        Input::Raw(text) => text,
        Input::Shaped {
            admin_key,
            plans,
            tenants,
        } => shaped(&admin_key, &plans, &tenants),
    };
    let config = match config::Config::parse(&text) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let (requests, items) = config.policies();
    let keys = config.keys();
    assert_eq!(keys.len(), config.tenants.len());
    assert!(!keys.contains_key(&config.admin_key));
    for tenant in &config.tenants {
        assert_eq!(requests.plan_for(tenant.id.as_bytes()).name(), tenant.plan);
        assert_eq!(
            items.plan_for(tenant.id.as_bytes()).name(),
            format!("{}-items", tenant.plan)
        );
        assert_eq!(
            keys.get(&tenant.key).map(|k| k.as_bytes()),
            Some(tenant.id.as_bytes())
        );
        let plan = &config.plans[&tenant.plan];
        assert_eq!(
            requests.plan_for(tenant.id.as_bytes()).concurrency_limit(),
            Some(plan.concurrency)
        );
    }
});
