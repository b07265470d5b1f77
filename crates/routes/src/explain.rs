//! Why a Service's address is desired on no node: the answer a "why is my Service not
//! announced" tool prints. Pure: the same inputs the computation takes, and its plan.

use std::net::IpAddr;

use herald_model::{IpFamily, PoolName, TrafficPolicy};
use ipnet::IpNet;

use crate::compute::Plan;
use crate::facts::{Eligibility, Node, ServiceFacts};
use crate::policy::BgpPolicy;

/// Whether `routes` hold `ip` as a host route or inside an aggregate.
pub fn covers<'a>(mut prefixes: impl Iterator<Item = &'a IpNet>, ip: IpAddr) -> bool {
    prefixes.any(|p| p.contains(&ip))
}

/// Why the plan has no node announce `ip` (held by `service` from `pool`). Meant for an
/// address the plan desires nowhere; the first reason that applies, in the order an
/// operator would check them.
pub fn not_desired_reason(
    service: &ServiceFacts,
    ip: IpAddr,
    pool: &PoolName,
    nodes: &[&Node],
    plan: &Plan,
    policy: Option<&BgpPolicy>,
) -> String {
    let Some(policy) = policy else {
        return "no BGP policy has been set".into();
    };
    let rules: Vec<_> = policy
        .advertisements
        .iter()
        .filter(|r| r.selects_pool(pool))
        .collect();
    if rules.is_empty() {
        return format!("withdrawn by policy: no advertisement rule for pool {pool}");
    }
    if service.traffic_policy == TrafficPolicy::Cluster
        && !service.has_ready_endpoints()
        && rules.iter().all(|r| r.withdraw_without_endpoints)
    {
        return "withdrawn by policy: no ready endpoints (withdraw_without_endpoints)".into();
    }
    let family = IpFamily::of(ip);
    // Nodes that hold a session able to carry the address's family.
    let peering: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| {
            plan.nodes
                .get(&n.name)
                .is_some_and(|r| r.peers.iter().any(|s| s.families.contains(&family)))
        })
        .collect();
    if peering.is_empty() {
        return format!("no eligible node: no node holds a BGP session for {family:?}");
    }
    let eligible: Vec<&Node> = peering
        .iter()
        .copied()
        .filter(|n| n.eligibility() == Eligibility::Eligible)
        .collect();
    if eligible.is_empty() {
        return "no eligible node: every peering node is NotReady or excluded".into();
    }
    if service.traffic_policy == TrafficPolicy::Local
        && !eligible
            .iter()
            .any(|n| service.nodes_with_ready_endpoints.contains(&n.name))
    {
        if service.nodes_with_ready_endpoints.is_empty() {
            return "no endpoints on a peering node: the Local Service has no ready endpoint"
                .into();
        }
        let mut on: Vec<&str> = service
            .nodes_with_ready_endpoints
            .iter()
            .map(String::as_str)
            .take(5)
            .collect();
        if service.nodes_with_ready_endpoints.len() > on.len() {
            on.push("...");
        }
        return format!(
            "no endpoints on a peering node: the Local Service's endpoints are on {}",
            on.join(", ")
        );
    }
    let rule_matches = eligible.iter().any(|n| {
        plan.nodes.get(&n.name).is_some_and(|r| {
            r.peers.iter().any(|s| {
                rules
                    .iter()
                    .any(|rule| rule.node_selector.matches(&n.labels) && rule.selects_peer(&s.name))
            })
        })
    });
    if !rule_matches {
        return format!(
            "withdrawn by policy: no advertisement rule for pool {pool} selects a peering node and its peer"
        );
    }
    "no node announces it (see the plan's problems)".into()
}
