//! The facts routes are computed from, other than the policy: nodes and, per allocated
//! Service, its traffic policy, the nodes with ready endpoints and its addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use herald_model::selector::{is_dns_label, validate_label_key, validate_label_value};
use herald_model::{Allocation, AssignedIp, FieldError, IpFamily, Owner, TrafficPolicy};
use serde::{Deserialize, Serialize};

/// A node's name, as in Kubernetes.
pub type NodeName = String;

/// The Kubernetes label that takes a node out of external load balancing, whatever its
/// value (the well-known label kube-proxy, MetalLB and Cilium honour).
pub const EXCLUDE_FROM_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Most addresses accepted on one node: real nodes have a handful.
pub const MAX_NODE_ADDRESSES: usize = 64;

/// A node as the IPAM service knows it from the cluster watcher.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub name: NodeName,
    pub labels: BTreeMap<String, String>,
    /// In the order the node reports them; "first IPv4 address" means first in this list.
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
}

/// Whether a node may announce Service addresses at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Eligibility {
    Eligible,
    NotReady,
    /// Carries [`EXCLUDE_FROM_LB_LABEL`].
    Excluded,
}

impl Node {
    /// Checks the node the way the API would accept it: a DNS-subdomain name, valid labels,
    /// and unicast, distinct addresses.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_node_name("node.name", &self.name)?;
        for (k, v) in &self.labels {
            validate_label_key(k).map_err(|r| FieldError::new("node.labels", k, r))?;
            validate_label_value(v)
                .map_err(|r| FieldError::new(format!("node.labels[{k}]"), v, r))?;
        }
        if self.addresses.len() > MAX_NODE_ADDRESSES {
            return Err(FieldError::new(
                "node.addresses",
                self.addresses.len(),
                format!("at most {MAX_NODE_ADDRESSES} addresses"),
            ));
        }
        for (i, ip) in self.addresses.iter().enumerate() {
            let field = format!("node.addresses[{i}]");
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(FieldError::new(field, ip, "must be a unicast address"));
            }
            if self.addresses[..i].contains(ip) {
                return Err(FieldError::new(field, ip, "is listed twice"));
            }
        }
        Ok(())
    }

    /// Not Ready beats Excluded: it is the more urgent thing to tell an operator.
    pub fn eligibility(&self) -> Eligibility {
        if !self.ready {
            Eligibility::NotReady
        } else if self.labels.contains_key(EXCLUDE_FROM_LB_LABEL) {
            Eligibility::Excluded
        } else {
            Eligibility::Eligible
        }
    }

    pub fn first_address(&self, family: IpFamily) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|ip| IpFamily::of(*ip) == family)
    }

    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }
}

/// A Kubernetes node name: a DNS subdomain (lowercase, at most 253 characters).
pub fn validate_node_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > 253 || !name.split('.').all(is_dns_label) {
        return Err(FieldError::new(
            field,
            name,
            "must be a Kubernetes node name (a DNS subdomain)",
        ));
    }
    Ok(())
}

/// What routes need to know about one allocated Service. The owner and the addresses are
/// shared (`Arc`) with whoever keeps them beside these facts (the route engine's inputs),
/// not copied: there is one of these per Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFacts {
    pub owner: Arc<Owner>,
    pub traffic_policy: TrafficPolicy,
    /// Nodes with at least one endpoint that is ready, or serving while terminating
    /// (EndpointSlice `conditions.serving`), so a rolling update does not blackhole.
    pub nodes_with_ready_endpoints: BTreeSet<NodeName>,
    pub ips: Arc<[AssignedIp]>,
}

impl ServiceFacts {
    /// The facts for an allocation; the endpoints come from EndpointSlices, which the
    /// allocation does not know.
    pub fn from_allocation(
        allocation: &Allocation,
        nodes_with_ready_endpoints: BTreeSet<NodeName>,
    ) -> Self {
        Self {
            owner: Arc::new(allocation.owner.clone()),
            traffic_policy: allocation.traffic_policy,
            nodes_with_ready_endpoints,
            ips: allocation.ips.as_slice().into(),
        }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        self.owner.validate()?;
        for name in &self.nodes_with_ready_endpoints {
            validate_node_name("nodes_with_ready_endpoints", name)?;
        }
        for (i, assigned) in self.ips.iter().enumerate() {
            if self.ips[..i].iter().any(|o| o.ip == assigned.ip) {
                return Err(FieldError::new(
                    format!("ips[{i}]"),
                    assigned.ip,
                    "is listed twice",
                ));
            }
        }
        Ok(())
    }

    pub fn has_ready_endpoints(&self) -> bool {
        !self.nodes_with_ready_endpoints.is_empty()
    }
}
