//! Owners (Services), what they ask for, and what they hold.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::selector::{is_dns_label, validate_label_key, validate_label_value};
use crate::{FieldError, IpFamily, PoolName};

/// Longest accepted identifier (uid, cluster id, sharing key): far above anything real, and
/// small enough to bound what a request can make the server store.
pub const MAX_ID_LEN: usize = 253;
/// Most labels accepted on a Service or namespace in one request.
pub const MAX_LABELS: usize = 256;
/// Most ports accepted on one Service.
pub const MAX_PORTS: usize = 1024;

/// A Service, identified by its cluster and uid: a request whose cluster, namespace or name
/// differ from those of the uid's holder is refused, never served the holder's addresses.
/// The other fields are for people and for scoping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub cluster_id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_uid("owner.uid", &self.uid)?;
        if !is_dns_label(&self.namespace) {
            return Err(FieldError::new(
                "owner.namespace",
                &self.namespace,
                "must be a Kubernetes namespace name (a DNS label)",
            ));
        }
        if self.name.is_empty() || self.name.len() > 63 || !is_dns_label(&self.name) {
            return Err(FieldError::new(
                "owner.name",
                &self.name,
                "must be a Kubernetes Service name (a DNS label)",
            ));
        }
        if self.cluster_id.len() > MAX_ID_LEN {
            return Err(FieldError::new(
                "owner.cluster_id",
                &self.cluster_id,
                format!("is longer than {MAX_ID_LEN} characters"),
            ));
        }
        Ok(())
    }
}

pub fn validate_uid(field: &str, uid: &str) -> Result<(), FieldError> {
    if uid.is_empty() {
        return Err(FieldError::new(field, uid, "is empty"));
    }
    if uid.len() > MAX_ID_LEN {
        return Err(FieldError::new(
            field,
            uid,
            format!("is longer than {MAX_ID_LEN} characters"),
        ));
    }
    if uid.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FieldError::new(
            field,
            uid,
            "contains whitespace or control characters",
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn code(self) -> i32 {
        match self {
            Self::Cluster => 1,
            Self::Local => 2,
        }
    }

    pub fn from_code(code: i32) -> Self {
        if code == 2 {
            Self::Local
        } else {
            Self::Cluster
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub protocol: String,
    pub port: u16,
}

impl ServicePort {
    pub fn parse(field: &str, protocol: &str, port: u32) -> Result<Self, FieldError> {
        let protocol = match protocol.to_ascii_uppercase().as_str() {
            "" | "TCP" => "TCP",
            "UDP" => "UDP",
            "SCTP" => "SCTP",
            _ => {
                return Err(FieldError::new(
                    format!("{field}.protocol"),
                    protocol,
                    "must be TCP, UDP or SCTP",
                ));
            }
        };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| FieldError::new(format!("{field}.port"), port, "must be 1 to 65535"))?;
        Ok(Self {
            protocol: protocol.to_string(),
            port,
        })
    }
}

/// Whether two port lists name the same ports, in whatever order.
pub fn same_ports(a: &[ServicePort], b: &[ServicePort]) -> bool {
    let sorted = |ports: &[ServicePort]| {
        let mut ports = ports.to_vec();
        ports.sort();
        ports
    };
    a.len() == b.len() && sorted(a) == sorted(b)
}

/// What a Service asks for. Built only through [`AllocationRequest::validate`]'s checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRequest {
    pub owner: Owner,
    pub service_labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    pub family_policy: FamilyPolicy,
    /// Ordered preference, without repeats, never empty.
    pub families: Vec<IpFamily>,
    /// At most one per family.
    pub requested_ips: Vec<IpAddr>,
    pub requested_pool: Option<PoolName>,
    /// Empty when the Service does not share.
    pub sharing_key: String,
    pub ports: Vec<ServicePort>,
    pub traffic_policy: TrafficPolicy,
    pub endpoint_selector: BTreeMap<String, String>,
}

impl AllocationRequest {
    /// Checks everything that can be checked without the store.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.owner.validate()?;
        for (field, labels) in [
            ("service_labels", &self.service_labels),
            ("namespace_labels", &self.namespace_labels),
            ("endpoint_selector", &self.endpoint_selector),
        ] {
            if labels.len() > MAX_LABELS {
                return Err(FieldError::new(
                    field,
                    labels.len(),
                    format!("at most {MAX_LABELS} labels"),
                ));
            }
            for (k, v) in labels {
                validate_label_key(k).map_err(|r| FieldError::new(field, k, r))?;
                validate_label_value(v)
                    .map_err(|r| FieldError::new(format!("{field}[{k}]"), v, r))?;
            }
        }
        if self.families.is_empty()
            || self.families.len() > 2
            || (self.families.len() == 2 && self.families[0] == self.families[1])
        {
            let list: Vec<String> = self.families.iter().map(ToString::to_string).collect();
            return Err(FieldError::new(
                "ip_families",
                list.join(","),
                "must list IPv4, IPv6 or both, each once",
            ));
        }
        if self.family_policy == FamilyPolicy::SingleStack && self.families.len() > 1 {
            return Err(FieldError::new(
                "ip_families",
                "IPv4,IPv6",
                "SingleStack takes one family",
            ));
        }
        for (i, ip) in self.requested_ips.iter().enumerate() {
            let family = IpFamily::of(*ip);
            if self.requested_ips[..i]
                .iter()
                .any(|other| IpFamily::of(*other) == family)
            {
                return Err(FieldError::new(
                    format!("requested_ips[{i}]"),
                    ip,
                    format!("at most one {family} address may be requested"),
                ));
            }
            if !self.families.contains(&family) && self.family_policy == FamilyPolicy::SingleStack {
                return Err(FieldError::new(
                    format!("requested_ips[{i}]"),
                    ip,
                    format!("is {family}, but the Service's ip_families do not include it"),
                ));
            }
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(FieldError::new(
                    format!("requested_ips[{i}]"),
                    ip,
                    "cannot be a LoadBalancer address",
                ));
            }
        }
        if self.sharing_key.len() > MAX_ID_LEN
            || self.sharing_key.chars().any(|c| c.is_control() || c == '|')
        {
            return Err(FieldError::new(
                "sharing_key",
                &self.sharing_key,
                format!("must be at most {MAX_ID_LEN} printable characters without '|'"),
            ));
        }
        if self.ports.len() > MAX_PORTS {
            return Err(FieldError::new(
                "ports",
                self.ports.len(),
                format!("at most {MAX_PORTS} ports"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            if !seen.insert(port) {
                return Err(FieldError::new(
                    format!("ports[{i}]"),
                    format!("{}/{}", port.port, port.protocol),
                    "is listed twice",
                ));
            }
        }
        Ok(())
    }

    /// The families this owner must end up with, in preference order. PreferDualStack asks
    /// for both but is satisfied with the first; RequireDualStack needs both.
    pub fn wanted_families(&self) -> Vec<IpFamily> {
        let mut families = self.families.clone();
        if self.family_policy != FamilyPolicy::SingleStack && families.len() == 1 {
            families.push(families[0].other());
        }
        families
    }

    pub fn requested_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.requested_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(*ip) == family)
    }

    /// The identity a shared IP is claimed under: Services share only with the same key and
    /// compatible traffic policy (both Cluster, or Local with identical endpoint selectors).
    /// Empty for an exclusive owner.
    pub fn sharing_tag(&self) -> Option<String> {
        if self.sharing_key.is_empty() {
            return None;
        }
        let policy = match self.traffic_policy {
            TrafficPolicy::Cluster => "Cluster".to_string(),
            TrafficPolicy::Local => {
                let selector: Vec<String> = self
                    .endpoint_selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                format!("Local[{}]", selector.join(","))
            }
        };
        Some(format!("s:{}|{policy}", self.sharing_key))
    }

    /// The claim tag this owner holds an IP under: its sharing tag, or its own uid.
    pub fn claim_tag(&self) -> String {
        self.sharing_tag()
            .unwrap_or_else(|| format!("o:{}", self.owner.uid))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedIp {
    pub ip: IpAddr,
    pub pool: PoolName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub owner: Owner,
    pub ips: Vec<AssignedIp>,
    pub sharing_key: String,
    pub ports: Vec<ServicePort>,
    pub traffic_policy: TrafficPolicy,
    /// Unix microseconds.
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryAction {
    Assigned,
    Released,
    /// The owner's ports or traffic policy changed; its address did not.
    Updated,
}

impl HistoryAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Released => "released",
            Self::Updated => "updated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub revision: i64,
    pub at: i64,
    pub action: HistoryAction,
    pub ip: IpAddr,
    pub pool: String,
    pub owner: Owner,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn request() -> AllocationRequest {
        AllocationRequest {
            owner: Owner {
                cluster_id: "lab".into(),
                namespace: "default".into(),
                name: "lb-nginx-service".into(),
                uid: "uid-1".into(),
            },
            service_labels: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            family_policy: FamilyPolicy::SingleStack,
            families: vec![IpFamily::V4],
            requested_ips: vec![],
            requested_pool: None,
            sharing_key: String::new(),
            ports: vec![],
            traffic_policy: TrafficPolicy::Cluster,
            endpoint_selector: BTreeMap::new(),
        }
    }

    #[test]
    fn lab_request_is_valid_and_exclusive() {
        let r = request();
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.claim_tag(), "o:uid-1");
        assert_eq!(r.wanted_families(), [IpFamily::V4]);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let field = |r: AllocationRequest| r.validate().expect_err("invalid").field;
        let mut r = request();
        r.owner.uid = String::new();
        assert_eq!(field(r), "owner.uid");
        let mut r = request();
        r.owner.namespace = "Default".into();
        assert_eq!(field(r), "owner.namespace");
        let mut r = request();
        r.families = vec![IpFamily::V4, IpFamily::V6];
        assert_eq!(field(r), "ip_families");
        let mut r = request();
        r.requested_ips = vec![
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        ];
        assert_eq!(field(r), "requested_ips[1]");
        let mut r = request();
        r.requested_ips = vec!["fd00::1".parse().expect("ip")];
        assert_eq!(field(r), "requested_ips[0]");
        let mut r = request();
        r.sharing_key = "a|b".into();
        assert_eq!(field(r), "sharing_key");
        let mut r = request();
        r.ports = vec![
            ServicePort {
                protocol: "TCP".into(),
                port: 80,
            },
            ServicePort {
                protocol: "TCP".into(),
                port: 80,
            },
        ];
        assert_eq!(field(r), "ports[1]");
        assert!(ServicePort::parse("ports[0]", "ICMP", 80).is_err());
        assert!(ServicePort::parse("ports[0]", "tcp", 0).is_err());
    }

    #[test]
    fn port_lists_compare_as_sets() {
        let port = |port| ServicePort {
            protocol: "TCP".into(),
            port,
        };
        assert!(same_ports(&[port(80), port(443)], &[port(443), port(80)]));
        assert!(!same_ports(&[port(80)], &[port(443)]));
        assert!(!same_ports(&[port(80)], &[port(80), port(443)]));
        assert!(same_ports(&[], &[]));
    }

    #[test]
    fn sharing_tags_separate_incompatible_policies() {
        let mut a = request();
        a.sharing_key = "web".into();
        let mut b = a.clone();
        assert_eq!(a.sharing_tag(), b.sharing_tag());
        b.traffic_policy = TrafficPolicy::Local;
        assert_ne!(a.sharing_tag(), b.sharing_tag());
        let mut c = b.clone();
        c.endpoint_selector.insert("app".into(), "nginx".into());
        assert_ne!(b.sharing_tag(), c.sharing_tag());
    }

    #[test]
    fn dual_stack_wants_both_families() {
        let mut r = request();
        r.family_policy = FamilyPolicy::PreferDualStack;
        assert_eq!(r.wanted_families(), [IpFamily::V4, IpFamily::V6]);
    }
}
