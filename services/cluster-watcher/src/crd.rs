//! Herald's custom resources (group `herald.io`, version `v1alpha1`, cluster-scoped):
//! address pools, BGP peers, advertisements and the cluster-wide BGP settings. The field
//! names follow MetalLB's (`IPAddressPool`, `BGPPeer`, `BGPAdvertisement`) where Herald
//! has the same idea, and Cilium's where only Cilium has it (`allowFirstLastIPs`,
//! `disabled`); the README maps them field by field.
//!
//! The definitions in `deploy/helm/herald/crds/` are generated from these types; a unit test fails
//! when they differ (`HERALD_REGENERATE_CRDS=1 cargo test … committed_crds` rewrites them).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "herald.io";
pub const VERSION: &str = "v1alpha1";
/// The finalizer that keeps a pool or peer until Herald has let go of it.
pub const FINALIZER: &str = "herald.io/in-use";
/// `"true"` on a pool or peer being deleted releases what still uses it instead of waiting.
pub const ANNOTATION_FORCE_DELETE: &str = "herald.io/force-delete";
/// The one BGPSettings object read.
pub const SETTINGS_NAME: &str = "default";
/// The condition every resource carries.
pub const CONDITION_ACCEPTED: &str = "Accepted";

/// Addresses Services are given from (MetalLB `IPAddressPool`, Cilium
/// `CiliumLoadBalancerIPPool`).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "hpool",
    status = "IPPoolStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"Total","type":"string","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Used","type":"integer","jsonPath":".status.used"}"#,
    printcolumn = r#"{"name":"Free","type":"string","jsonPath":".status.free"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// CIDRs (`172.16.0.240/28`, `fd00::/64`) and inclusive ranges
    /// (`10.0.0.10-10.0.0.20`).
    pub addresses: Vec<String>,
    /// Whether Services that name neither this pool nor an address in it may be served
    /// from it. Absent means true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Skip IPv4 addresses ending in .0 and .255.
    #[serde(default, skip_serializing_if = "is_false")]
    #[serde(rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Hand out the first and last address of each CIDR too.
    #[serde(
        default,
        rename = "allowFirstLastIPs",
        skip_serializing_if = "is_false"
    )]
    pub allow_first_last_ips: bool,
    /// No new allocations; existing ones stay.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Which Services may be served, and in which order pools are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
    /// Announce the covering prefix of this length instead of host routes (0: host
    /// routes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aggregation_length: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aggregation_length_v6: u32,
    /// How long a released address rests before another Service is given it
    /// (`"10m"`, `"1h"`; at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower numbers are tried first; ties by name.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    /// Only Services in these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Only Services in namespaces with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Only Services with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Addresses in the pool, all families (a decimal string: IPv6 pools are large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Assignable now: total minus used minus quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<u64>,
}

/// A BGP neighbour of the nodes (MetalLB `BGPPeer`).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.io",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    shortname = "hpeer",
    status = "BGPPeerStatus",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.peerAddress"}"#,
    printcolumn = r#"{"name":"ASN","type":"integer","jsonPath":".spec.peerASN"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Established","type":"string","jsonPath":".status.established"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    #[serde(rename = "peerASN")]
    pub peer_asn: u32,
    pub peer_address: String,
    /// 179 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// This session's local ASN when it differs from the BGPSettings' one.
    #[serde(default, rename = "myASN", skip_serializing_if = "Option::is_none")]
    pub my_asn: Option<u32>,
    /// `"90s"` when absent; otherwise at least 3 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    /// A third of the hold time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    /// `"5s"` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_time: Option<String>,
    /// Only nodes with these labels peer (absent: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// The TCP-MD5 password, read from a Secret; never inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// eBGP multihop TTL (absent: the system default).
    #[serde(
        default,
        rename = "ebgpMultiHopTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub ebgp_multi_hop_ttl: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_graceful_restart: bool,
    /// `"120s"` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_time: Option<String>,
    /// Wait for the peer to connect instead of connecting.
    #[serde(default, skip_serializing_if = "is_false")]
    pub passive: bool,
    /// `IPv4`, `IPv6` or both (absent: the family of the peer's address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<String>,
    /// Connect from the node's address in this subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_subnet: Option<String>,
    /// Most prefixes the peer may send; one more ends the session with a Cease 6/1
    /// NOTIFICATION (RFC 4486). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<u32>,
    /// Run BFD with the peer (absent: no BFD); a BFD failure closes the BGP session at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSpec>,
}

/// BFD timers of a peer (MetalLB `BFDProfile`, Calico and Cilium `bfd`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BfdSpec {
    /// Milliseconds, 10 to 60000 (absent: 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_interval: Option<u32>,
    /// Milliseconds, 10 to 60000 (absent: 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit_interval: Option<u32>,
    /// 1 to 255 (absent: 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_multiplier: Option<u32>,
    /// RFC 5883 multihop rather than single-hop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multihop: bool,
}

/// A key of a Secret (MetalLB `passwordSecret`; the key defaults to `password`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes with an Established session, over nodes that report one (`"2/2"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established: Option<String>,
    /// Each node's session state, as its speaker last reported it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sessions: BTreeMap<String, String>,
}

/// How pools' addresses are announced (MetalLB `BGPAdvertisement`).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.io",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    plural = "bgpadvertisements",
    shortname = "hadv",
    status = "BGPAdvertisementStatus",
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".spec.ipAddressPools"}"#,
    printcolumn = r#"{"name":"Peers","type":"string","jsonPath":".spec.peers"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    /// The pools announced, by name (with `ipAddressPoolSelectors`; both empty: every
    /// pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Pools announced, by their labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Announce each address as a /32 or /128 (absent: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_routes: Option<bool>,
    /// Also announce the covering prefix of this length (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aggregation_length: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aggregation_length_v6: u32,
    /// `"65000:100"` standard communities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// `"65000:1:2"` large communities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub med: Option<u32>,
    /// Only these peers (BGPPeer names) get the routes (empty: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Only nodes with these labels announce (absent: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Withdraw a Cluster Service that has no ready endpoint anywhere.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withdraw_without_endpoints: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The cluster-wide BGP settings: one object, named `default` (as Calico's
/// `BGPConfiguration`; Cilium's `CiliumBGPClusterConfig` `localASN`).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.io",
    version = "v1alpha1",
    kind = "BGPSettings",
    plural = "bgpsettings",
    status = "BGPSettingsStatus",
    printcolumn = r#"{"name":"ASN","type":"integer","jsonPath":".spec.localASN"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPSettingsSpec {
    #[serde(rename = "localASN")]
    pub local_asn: u32,
    /// The router id is each node's first IPv4 address, or its first one in this subnet.
    #[serde(
        default,
        rename = "routerIDSubnet",
        skip_serializing_if = "Option::is_none"
    )]
    pub router_id_subnet: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPSettingsStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// serde's skip_serializing_if takes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !*b
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

/// Every custom resource definition, as one multi-document YAML file per kind.
pub fn definitions() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;
    vec![
        ("ippools.yaml", IPPool::crd()),
        ("bgppeers.yaml", BGPPeer::crd()),
        ("bgpadvertisements.yaml", BGPAdvertisement::crd()),
        ("bgpsettings.yaml", BGPSettings::crd()),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CRD_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/helm/herald/crds");

    fn render(crd: &impl Serialize) -> String {
        format!(
            "# Generated from services/cluster-watcher/src/crd.rs; do not edit.\n# Regenerate: HERALD_REGENERATE_CRDS=1 cargo test -p herald-cluster-watcher --lib committed_crds\n{}",
            serde_yaml::to_string(crd).unwrap()
        )
    }

    #[test]
    fn committed_crds_match_the_types() {
        let regenerate = std::env::var_os("HERALD_REGENERATE_CRDS").is_some();
        let mut stale = Vec::new();
        for (file, crd) in definitions() {
            let path = std::path::Path::new(CRD_DIR).join(file);
            let want = render(&crd);
            if regenerate {
                std::fs::create_dir_all(CRD_DIR).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "deploy/helm/herald/crds/{stale:?} differ from the Rust types; regenerate with \
             HERALD_REGENERATE_CRDS=1 cargo test -p herald-cluster-watcher --lib committed_crds"
        );
    }

    #[test]
    fn the_resources_are_cluster_scoped_in_herald_io() {
        for (_, crd) in definitions() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(crd.spec.versions[0].name, VERSION);
            let status = crd.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref());
            assert!(
                status.is_some(),
                "{} has a status subresource",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn a_metallb_shaped_pool_reads() {
        let pool: IPPoolSpec = serde_json::from_value(serde_json::json!({
            "addresses": ["172.16.0.240/28"],
            "autoAssign": false,
            "avoidBuggyIPs": true,
            "serviceAllocation": {"priority": 5, "namespaces": ["shop"]},
        }))
        .unwrap();
        assert_eq!(pool.auto_assign, Some(false));
        assert!(pool.avoid_buggy_ips);
        assert_eq!(pool.service_allocation.unwrap().priority, 5);
    }
}
