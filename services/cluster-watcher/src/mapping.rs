//! Pure translations between Kubernetes objects and Herald's API: which Services are
//! served, what a Service asks for, which nodes have endpoints, what a Node looks like to
//! the routes, and the condition written back. No IO here; every function is unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use herald_api::ipam::v1 as ipam;
use herald_api::routing::v1 as routing;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use thiserror::Error;
use tonic::Code;

/// The class served unless `--load-balancer-class` says otherwise.
pub const DEFAULT_CLASS: &str = "herald.io/bgp";
/// The condition the watcher owns in `status.conditions`.
pub const CONDITION_TYPE: &str = "herald.io/IPAllocated";

/// Requested addresses, in the order they are looked for: Herald's own annotation, the
/// deprecated `spec.loadBalancerIP`, then MetalLB's and Cilium's, so a migrated Service
/// keeps working. The first source that is set wins.
pub const ANNOTATION_IPS: &str = "herald.io/load-balancer-ips";
pub const METALLB_IPS: &str = "metallb.io/loadBalancerIPs";
pub const CILIUM_IPS: &str = "lbipam.cilium.io/ips";
/// Requested pool: Herald's annotation, then MetalLB's.
pub const ANNOTATION_POOL: &str = "herald.io/pool";
pub const METALLB_POOL: &str = "metallb.io/address-pool";
/// Sharing key: Herald's annotation, then MetalLB's and Cilium's.
pub const ANNOTATION_SHARING_KEY: &str = "herald.io/sharing-key";
pub const METALLB_SHARING_KEY: &str = "metallb.io/allow-shared-ip";
pub const CILIUM_SHARING_KEY: &str = "lbipam.cilium.io/sharing-key";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which Services this watcher serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPolicy {
    pub class: String,
    /// Also serve Services that name no class.
    pub default_class: bool,
}

impl ClassPolicy {
    /// A Service is served when it is of type LoadBalancer and names our class (or none,
    /// when we are the default).
    pub fn serves(&self, svc: &Service) -> bool {
        let Some(spec) = &svc.spec else { return false };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match spec.load_balancer_class.as_deref() {
            Some(class) => class == self.class,
            None => self.default_class,
        }
    }
}

/// A Service whose request cannot even be sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("{field}: {value:?} is not an IP address")]
    NotAnIp { field: &'static str, value: String },
}

fn annotation<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// The addresses a Service asks for, from the first source that names any.
pub fn requested_ips(svc: &Service) -> Result<Vec<IpAddr>, RequestError> {
    let spec_ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let sources: [(&'static str, Option<&str>); 4] = [
        (ANNOTATION_IPS, annotation(svc, ANNOTATION_IPS)),
        ("spec.loadBalancerIP", spec_ip),
        (METALLB_IPS, annotation(svc, METALLB_IPS)),
        (CILIUM_IPS, annotation(svc, CILIUM_IPS)),
    ];
    let Some((source, list)) = sources.into_iter().find_map(|(s, v)| v.map(|v| (s, v))) else {
        return Ok(Vec::new());
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for value in list.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        let ip = value.parse().map_err(|_| RequestError::NotAnIp {
            field: source,
            // An annotation may hold 256 KB; the error goes into a condition and an Event.
            value: herald_model::echo(value).into_owned(),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

pub fn requested_pool(svc: &Service) -> Option<String> {
    annotation(svc, ANNOTATION_POOL)
        .or_else(|| annotation(svc, METALLB_POOL))
        .map(str::to_string)
}

pub fn sharing_key(svc: &Service) -> Option<String> {
    [
        ANNOTATION_SHARING_KEY,
        METALLB_SHARING_KEY,
        CILIUM_SHARING_KEY,
    ]
    .iter()
    .find_map(|k| annotation(svc, k))
    .map(str::to_string)
}

/// The addresses already in `status.loadBalancer.ingress`.
pub fn status_ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| ingress.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

pub fn traffic_policy(svc: &Service) -> ipam::TrafficPolicy {
    match svc
        .spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
    {
        Some("Local") => ipam::TrafficPolicy::Local,
        _ => ipam::TrafficPolicy::Cluster,
    }
}

fn family_policy(policy: Option<&str>) -> ipam::IpFamilyPolicy {
    match policy {
        Some("SingleStack") => ipam::IpFamilyPolicy::SingleStack,
        Some("PreferDualStack") => ipam::IpFamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => ipam::IpFamilyPolicy::RequireDualStack,
        _ => ipam::IpFamilyPolicy::Unspecified,
    }
}

fn family(name: &str) -> ipam::IpFamily {
    match name {
        "IPv4" => ipam::IpFamily::Ipv4,
        "IPv6" => ipam::IpFamily::Ipv6,
        _ => ipam::IpFamily::Unspecified,
    }
}

/// The Allocate request for a Service. `claim`, when not empty, replaces the requested
/// addresses: at start the watcher claims what the Service's status already shows.
pub fn allocate_request(
    svc: &Service,
    cluster_id: &str,
    namespace_labels: &BTreeMap<String, String>,
    claim: &[String],
) -> Result<ipam::AllocateRequest, RequestError> {
    let spec = svc.spec.clone().unwrap_or_default();
    let requested_ips = if claim.is_empty() {
        requested_ips(svc)?
            .iter()
            .map(ToString::to_string)
            .collect()
    } else {
        claim.to_vec()
    };
    let sharing_key = sharing_key(svc).unwrap_or_default();
    let traffic_policy = traffic_policy(svc);
    // The pod selector matters only to Local Services that share an address.
    let endpoint_selector =
        if traffic_policy == ipam::TrafficPolicy::Local && !sharing_key.is_empty() {
            spec.selector
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect()
        } else {
            Default::default()
        };
    Ok(ipam::AllocateRequest {
        owner: Some(ipam::Owner {
            cluster_id: cluster_id.to_string(),
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            uid: svc.metadata.uid.clone().unwrap_or_default(),
        }),
        service_labels: svc
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        namespace_labels: namespace_labels.clone().into_iter().collect(),
        ip_family_policy: family_policy(spec.ip_family_policy.as_deref()) as i32,
        ip_families: spec
            .ip_families
            .unwrap_or_default()
            .iter()
            .map(|f| family(f) as i32)
            .collect(),
        requested_ips,
        requested_pool: requested_pool(svc).unwrap_or_default(),
        sharing_key,
        ports: spec
            .ports
            .unwrap_or_default()
            .iter()
            .map(|p| ipam::ServicePort {
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                port: u32::try_from(p.port).unwrap_or(0),
            })
            .collect(),
        traffic_policy: traffic_policy as i32,
        endpoint_selector,
        dry_run: false,
    })
}

/// Nodes with at least one ready or serving endpoint in `slices`. An unset `ready` means
/// ready, and an unset `serving` means what `ready` says, as the EndpointSlice API defines.
pub fn endpoint_nodes<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for slice in slices {
        for endpoint in &slice.endpoints {
            let (ready, serving) = match &endpoint.conditions {
                Some(c) => {
                    let ready = c.ready.unwrap_or(true);
                    (ready, c.serving.unwrap_or(ready))
                }
                None => (true, true),
            };
            if (ready || serving)
                && let Some(node) = &endpoint.node_name
            {
                nodes.insert(node.clone());
            }
        }
    }
    nodes
}

/// The Service an EndpointSlice belongs to, as (namespace, name).
pub fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.clone()?, name.clone()))
}

/// A Node as the routes see it: labels, InternalIP then ExternalIP addresses, Ready.
pub fn node(node: &Node) -> routing::Node {
    let status = node.status.clone().unwrap_or_default();
    let addresses = status.addresses.unwrap_or_default();
    let of_type = |t: &str| {
        addresses
            .iter()
            .filter(|a| a.type_ == t)
            .map(|a| a.address.clone())
            .collect::<Vec<_>>()
    };
    let mut ips = of_type("InternalIP");
    ips.extend(of_type("ExternalIP"));
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    routing::Node {
        name: node.metadata.name.clone().unwrap_or_default(),
        labels: node
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        addresses: ips,
        ready,
    }
}

/// Why a Service has no address, as the condition's and the Event's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    NoPoolMatches,
    PoolExhausted,
    RequestedIpTaken,
    SharingConflict,
    InvalidRequest,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPoolMatches => "NoPoolMatches",
            Self::PoolExhausted => "PoolExhausted",
            Self::RequestedIpTaken => "RequestedIPTaken",
            Self::SharingConflict => "SharingConflict",
            Self::InvalidRequest => "InvalidRequest",
        }
    }
}

/// What an Allocate error means to the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocateErrorKind {
    /// The owner holds addresses the request no longer matches: release, then allocate.
    Mismatch,
    /// The Service cannot be served as it is; say why on the Service.
    Failed(FailureReason),
    /// The IPAM service could not answer; try again later.
    Transient,
}

/// Classifies an Allocate error by its gRPC code (and, for FAILED_PRECONDITION, the part of
/// the request its message names).
pub fn classify(code: Code, message: &str) -> AllocateErrorKind {
    use AllocateErrorKind::{Failed, Mismatch, Transient};
    match code {
        // herald-ipam answers a request message over its size limit with
        // RESOURCE_EXHAUSTED too (gRPC's convention); that is the request's fault, not
        // the pools'.
        Code::ResourceExhausted if message.starts_with("the request message is") => {
            Failed(FailureReason::InvalidRequest)
        }
        Code::ResourceExhausted => Failed(FailureReason::PoolExhausted),
        Code::AlreadyExists => Failed(FailureReason::RequestedIpTaken),
        Code::FailedPrecondition if message.contains("release it first") => Mismatch,
        Code::FailedPrecondition if message.starts_with("sharing_key") => {
            Failed(FailureReason::SharingConflict)
        }
        Code::FailedPrecondition => Failed(FailureReason::NoPoolMatches),
        Code::InvalidArgument | Code::NotFound | Code::OutOfRange => {
            Failed(FailureReason::InvalidRequest)
        }
        _ => Transient,
    }
}

/// The outcome of handling a Service, as written back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allocated {
        ips: Vec<String>,
        pools: Vec<String>,
    },
    Failed {
        reason: FailureReason,
        message: String,
    },
}

impl Outcome {
    pub fn ingress_ips(&self) -> &[String] {
        match self {
            Self::Allocated { ips, .. } => ips,
            Self::Failed { .. } => &[],
        }
    }

    /// (status, reason, message) of the condition.
    pub fn condition_parts(&self) -> (&'static str, &'static str, String) {
        match self {
            Self::Allocated { ips, pools } => {
                let mut pools = pools.clone();
                pools.dedup();
                (
                    "True",
                    "IPAllocated",
                    format!(
                        "allocated {} from pool {}",
                        ips.join(", "),
                        pools.join(", ")
                    ),
                )
            }
            Self::Failed { reason, message } => ("False", reason.as_str(), message.clone()),
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Allocated { .. } => "Normal",
            Self::Failed { .. } => "Warning",
        }
    }

    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::Allocated { .. } => "IPAllocated",
            Self::Failed { .. } => "AllocationFailed",
        }
    }
}

/// The watcher's condition for `outcome`. The transition time stays that of `previous`
/// while the status does not change, as the Kubernetes condition convention asks.
pub fn condition(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Time,
) -> Condition {
    let (status, reason, message) = outcome.condition_parts();
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: CONDITION_TYPE.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether two conditions say the same thing (the transition time aside).
pub fn same_condition(a: &Condition, b: &Condition) -> bool {
    a.type_ == b.type_
        && a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

/// The watcher's condition on a Service, if it wrote one.
pub fn our_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeCondition, NodeStatus,
        ServicePort, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A LoadBalancer Service of our class with one TCP port.
    fn mk_svc(ns: &str, name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(DEFAULT_CLASS.into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_annotation(mut svc: Service, key: &str, value: &str) -> Service {
        svc.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        svc
    }

    fn spec(svc: &mut Service) -> &mut ServiceSpec {
        svc.spec.as_mut().unwrap()
    }

    fn ours() -> ClassPolicy {
        ClassPolicy {
            class: DEFAULT_CLASS.into(),
            default_class: false,
        }
    }

    #[test]
    fn serves_only_load_balancers_of_its_class() {
        let svc = mk_svc("default", "web");
        assert!(ours().serves(&svc));

        let mut other = svc.clone();
        spec(&mut other).load_balancer_class = Some("metallb.io/metallb".into());
        assert!(!ours().serves(&other));

        let mut cluster_ip = svc.clone();
        spec(&mut cluster_ip).type_ = Some("ClusterIP".into());
        assert!(!ours().serves(&cluster_ip));

        let mut no_class = svc;
        spec(&mut no_class).load_balancer_class = None;
        assert!(!ours().serves(&no_class));
        let default = ClassPolicy {
            default_class: true,
            ..ours()
        };
        assert!(default.serves(&no_class));
    }

    #[test]
    fn requested_ips_come_from_the_first_source_set() {
        let svc = mk_svc("default", "web");
        assert_eq!(requested_ips(&svc).unwrap(), Vec::<IpAddr>::new());

        let mut spec_ip = svc.clone();
        spec(&mut spec_ip).load_balancer_ip = Some("172.16.0.250".into());
        assert_eq!(
            requested_ips(&spec_ip).unwrap(),
            vec!["172.16.0.250".parse::<IpAddr>().unwrap()]
        );

        let both = with_annotation(
            spec_ip,
            ANNOTATION_IPS,
            " 172.16.0.242 , fd00::5,172.16.0.242",
        );
        assert_eq!(
            requested_ips(&both).unwrap(),
            vec![
                "172.16.0.242".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );

        let metallb = with_annotation(svc.clone(), METALLB_IPS, "10.0.0.1");
        assert_eq!(
            requested_ips(&metallb).unwrap(),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let cilium = with_annotation(svc.clone(), CILIUM_IPS, "10.0.0.2");
        assert_eq!(
            requested_ips(&cilium).unwrap(),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );

        let bad = with_annotation(svc, ANNOTATION_IPS, "10.0.0.1,nope");
        assert_eq!(
            requested_ips(&bad).unwrap_err(),
            RequestError::NotAnIp {
                field: ANNOTATION_IPS,
                value: "nope".into()
            }
        );
    }

    #[test]
    fn an_oversized_annotation_is_quoted_short() {
        // Annotations may hold 256 KB; the error goes into a condition and an Event.
        let huge = "1".repeat(200 * 1024);
        let bad = with_annotation(mk_svc("default", "web"), ANNOTATION_IPS, &huge);
        let message = requested_ips(&bad).unwrap_err().to_string();
        assert!(message.len() < 200, "{} bytes", message.len());
        assert!(message.starts_with(ANNOTATION_IPS), "{message}");
        assert!(message.contains("(204800 bytes)"), "{message}");
    }

    #[test]
    fn pool_and_sharing_key_read_herald_then_metallb_then_cilium() {
        let svc = mk_svc("default", "web");
        assert_eq!(requested_pool(&svc), None);
        assert_eq!(
            requested_pool(&with_annotation(svc.clone(), METALLB_POOL, "old")),
            Some("old".into())
        );
        let both = with_annotation(
            with_annotation(svc.clone(), METALLB_POOL, "old"),
            ANNOTATION_POOL,
            "new",
        );
        assert_eq!(requested_pool(&both), Some("new".into()));

        assert_eq!(sharing_key(&svc), None);
        assert_eq!(
            sharing_key(&with_annotation(svc.clone(), CILIUM_SHARING_KEY, "c")),
            Some("c".into())
        );
        assert_eq!(
            sharing_key(&with_annotation(svc.clone(), METALLB_SHARING_KEY, "m")),
            Some("m".into())
        );
        let all = with_annotation(
            with_annotation(svc, METALLB_SHARING_KEY, "m"),
            ANNOTATION_SHARING_KEY,
            "h",
        );
        assert_eq!(sharing_key(&all), Some("h".into()));
    }

    #[test]
    fn a_service_maps_to_an_allocate_request() {
        let mut svc = with_annotation(mk_svc("shop", "web"), ANNOTATION_POOL, "lab");
        svc = with_annotation(svc, ANNOTATION_SHARING_KEY, "k");
        svc.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        spec(&mut svc).ip_family_policy = Some("PreferDualStack".into());
        spec(&mut svc).ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        spec(&mut svc).external_traffic_policy = Some("Local".into());
        spec(&mut svc).selector = Some([("app".to_string(), "web".to_string())].into());
        spec(&mut svc).load_balancer_ip = Some("172.16.0.241".into());
        let ns_labels: BTreeMap<String, String> = [("team".to_string(), "a".to_string())].into();

        let req = allocate_request(&svc, "lab", &ns_labels, &[]).unwrap();
        let owner = req.owner.clone().unwrap();
        assert_eq!(
            (
                owner.cluster_id.as_str(),
                owner.namespace.as_str(),
                owner.name.as_str(),
                owner.uid.as_str()
            ),
            ("lab", "shop", "web", "uid-web")
        );
        assert_eq!(
            req.service_labels.get("app").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            req.namespace_labels.get("team").map(String::as_str),
            Some("a")
        );
        assert_eq!(
            req.ip_family_policy,
            ipam::IpFamilyPolicy::PreferDualStack as i32
        );
        assert_eq!(
            req.ip_families,
            vec![ipam::IpFamily::Ipv6 as i32, ipam::IpFamily::Ipv4 as i32]
        );
        assert_eq!(req.requested_ips, vec!["172.16.0.241".to_string()]);
        assert_eq!(req.requested_pool, "lab");
        assert_eq!(req.sharing_key, "k");
        assert_eq!(
            req.ports,
            vec![ipam::ServicePort {
                protocol: "TCP".into(),
                port: 80
            }]
        );
        assert_eq!(req.traffic_policy, ipam::TrafficPolicy::Local as i32);
        assert_eq!(
            req.endpoint_selector.get("app").map(String::as_str),
            Some("web")
        );

        // A claim of the status addresses replaces the request's own.
        let claimed =
            allocate_request(&svc, "lab", &ns_labels, &["172.16.0.250".to_string()]).unwrap();
        assert_eq!(claimed.requested_ips, vec!["172.16.0.250".to_string()]);

        // Defaults: Cluster traffic, no selector, unspecified family policy.
        let plain =
            allocate_request(&mk_svc("default", "x"), "lab", &BTreeMap::new(), &[]).unwrap();
        assert_eq!(plain.traffic_policy, ipam::TrafficPolicy::Cluster as i32);
        assert!(plain.endpoint_selector.is_empty());
        assert_eq!(
            plain.ip_family_policy,
            ipam::IpFamilyPolicy::Unspecified as i32
        );
        assert!(plain.ip_families.is_empty() && plain.requested_ips.is_empty());
    }

    #[test]
    fn status_ips_read_the_ingress() {
        let mut svc = mk_svc("default", "web");
        assert!(status_ips(&svc).is_empty());
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("172.16.0.241".into()),
                    ..Default::default()
                }]),
            }),
            conditions: None,
        });
        assert_eq!(status_ips(&svc), vec!["172.16.0.241".to_string()]);
    }

    fn mk_endpoint(node: Option<&str>, ready: Option<bool>, serving: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec!["10.244.0.5".into()],
            node_name: node.map(Into::into),
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating: None,
            }),
            ..Default::default()
        }
    }

    fn mk_slice(ns: &str, svc: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{svc}-abcde")),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: None,
        }
    }

    #[test]
    fn endpoint_nodes_are_those_with_ready_or_serving_endpoints() {
        let a = mk_slice(
            "default",
            "web",
            vec![
                mk_endpoint(Some("n1"), Some(true), Some(true)),
                // Terminating but still serving counts.
                mk_endpoint(Some("n2"), Some(false), Some(true)),
                // Neither ready nor serving.
                mk_endpoint(Some("n3"), Some(false), Some(false)),
                // Unknown readiness means ready.
                mk_endpoint(Some("n4"), None, None),
                mk_endpoint(None, Some(true), Some(true)),
            ],
        );
        let b = mk_slice(
            "default",
            "web",
            vec![mk_endpoint(Some("n1"), Some(true), None)],
        );
        let nodes = endpoint_nodes([&a, &b]);
        assert_eq!(
            nodes.into_iter().collect::<Vec<_>>(),
            vec!["n1", "n2", "n4"]
        );
        assert_eq!(slice_service(&a), Some(("default".into(), "web".into())));
    }

    #[test]
    fn nodes_map_labels_addresses_and_ready() {
        let node_obj = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                labels: Some([("bgp".to_string(), "yes".to_string())].into()),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "n1".into(),
                    },
                    NodeAddress {
                        type_: "ExternalIP".into(),
                        address: "203.0.113.1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.1.10".into(),
                    },
                ]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let n = node(&node_obj);
        assert_eq!(n.name, "n1");
        assert_eq!(n.addresses, vec!["192.168.1.10", "203.0.113.1"]);
        assert!(n.ready);
        assert_eq!(n.labels.get("bgp").map(String::as_str), Some("yes"));
    }

    #[test]
    fn allocate_errors_are_classified() {
        use AllocateErrorKind::*;
        assert_eq!(
            classify(Code::ResourceExhausted, "IPv4 pools lab are exhausted"),
            Failed(FailureReason::PoolExhausted)
        );
        assert_eq!(
            classify(
                Code::ResourceExhausted,
                "the request message is 20971521 bytes, more than the 16777216 bytes this server accepts; send fewer or smaller items"
            ),
            Failed(FailureReason::InvalidRequest)
        );
        assert_eq!(
            classify(Code::AlreadyExists, "requested_ips: x is already allocated"),
            Failed(FailureReason::RequestedIpTaken)
        );
        assert_eq!(
            classify(
                Code::FailedPrecondition,
                "owner uid u already holds 1.2.3.4 (pool p); the request asks for 1.2.3.5. Allocations never move: release it first to change its address"
            ),
            Mismatch
        );
        assert_eq!(
            classify(
                Code::FailedPrecondition,
                "sharing_key \"k\": port 80 is taken"
            ),
            Failed(FailureReason::SharingConflict)
        );
        assert_eq!(
            classify(
                Code::FailedPrecondition,
                "no pool serves IPv4 for Service a/b"
            ),
            Failed(FailureReason::NoPoolMatches)
        );
        assert_eq!(
            classify(Code::NotFound, "requested_pool \"x\": no such pool"),
            Failed(FailureReason::InvalidRequest)
        );
        assert_eq!(classify(Code::Unavailable, "connection refused"), Transient);
        assert_eq!(classify(Code::Aborted, "contended"), Transient);
    }

    #[test]
    fn conditions_keep_their_transition_time_while_the_status_holds() {
        let t0 = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let t1 = Time("2026-01-01T00:01:00Z".parse().unwrap());
        let ok = Outcome::Allocated {
            ips: vec!["172.16.0.241".into()],
            pools: vec!["lab".into()],
        };
        let first = condition(&ok, Some(1), None, t0.clone());
        assert_eq!(
            (
                first.type_.as_str(),
                first.status.as_str(),
                first.reason.as_str()
            ),
            (CONDITION_TYPE, "True", "IPAllocated")
        );
        assert_eq!(first.message, "allocated 172.16.0.241 from pool lab");
        assert_eq!(first.last_transition_time, t0);

        let again = condition(&ok, Some(1), Some(&first), t1.clone());
        assert_eq!(again.last_transition_time, t0);
        assert!(same_condition(&first, &again));

        let failed = Outcome::Failed {
            reason: FailureReason::PoolExhausted,
            message: "IPv4 pools lab are exhausted".into(),
        };
        let now_failed = condition(&failed, Some(1), Some(&again), t1.clone());
        assert_eq!(
            (now_failed.status.as_str(), now_failed.reason.as_str()),
            ("False", "PoolExhausted")
        );
        assert_eq!(now_failed.last_transition_time, t1);
        assert!(!same_condition(&again, &now_failed));
        assert_eq!(failed.event_reason(), "AllocationFailed");
        assert!(failed.ingress_ips().is_empty());
    }
}
