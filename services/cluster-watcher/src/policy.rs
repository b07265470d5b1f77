//! Pure: Herald's custom resources (and MetalLB's and Cilium's, read as if they were
//! Herald's) to the IPAM and routing API's messages. Every refusal names the field.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_api::ipam::v1 as ipam;
use herald_api::routing::v1 as routing;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use crate::crd::{
    BGPAdvertisementSpec, BGPPeerSpec, BGPSettingsSpec, IPPoolSpec, SecretKeyRef, ServiceAllocation,
};

/// What an import reads besides Herald's own resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imports {
    pub metallb: bool,
    pub cilium: bool,
}

impl Imports {
    /// `metallb`, `cilium`, both comma-separated, or empty.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut imports = Self::default();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.to_ascii_lowercase().as_str() {
                "metallb" => imports.metallb = true,
                "cilium" => imports.cilium = true,
                other => return Err(format!("{other:?} is not metallb or cilium")),
            }
        }
        Ok(imports)
    }
}

pub fn selector(s: &LabelSelector, field: &str) -> Result<ipam::LabelSelector, String> {
    use ipam::label_selector_requirement::Operator;
    let match_expressions = s
        .match_expressions
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| {
            let operator = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(format!(
                        "{field}.matchExpressions[{i}].operator: {other:?} is not In, NotIn, \
                         Exists or DoesNotExist"
                    ));
                }
            };
            Ok(ipam::LabelSelectorRequirement {
                key: e.key.clone(),
                operator: operator as i32,
                values: e.values.clone().unwrap_or_default(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(ipam::LabelSelector {
        match_labels: s
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        match_expressions,
    })
}

fn seconds(value: Option<&str>, field: &str) -> Result<u32, String> {
    let Some(value) = value else { return Ok(0) };
    let d: Duration = humantime::parse_duration(value)
        .map_err(|e| format!("{field}: {value:?} is not a duration ({e})"))?;
    u32::try_from(d.as_secs()).map_err(|_| format!("{field}: {value:?} is too long"))
}

/// An IPPool's spec as the IPAM's pool of the same name.
pub fn pool(name: &str, spec: &IPPoolSpec) -> Result<ipam::Pool, String> {
    let alloc = spec.service_allocation.clone().unwrap_or_default();
    Ok(ipam::Pool {
        name: name.to_string(),
        addresses: spec.addresses.clone(),
        auto_assign: spec.auto_assign,
        avoid_buggy_ips: spec.avoid_buggy_ips,
        allow_first_last: spec.allow_first_last_ips,
        disabled: spec.disabled,
        namespaces: alloc.namespaces.clone(),
        namespace_selector: alloc
            .namespace_selector
            .as_ref()
            .map(|s| selector(s, "spec.serviceAllocation.namespaceSelector"))
            .transpose()?,
        service_selector: alloc
            .service_selector
            .as_ref()
            .map(|s| selector(s, "spec.serviceAllocation.serviceSelector"))
            .transpose()?,
        priority: alloc.priority,
        aggregation_length_v4: spec.aggregation_length,
        aggregation_length_v6: spec.aggregation_length_v6,
        quarantine_seconds: seconds(spec.quarantine.as_deref(), "spec.quarantine")?,
        ..Default::default()
    })
}

/// Whether the IPAM's pool already is what `want` asks for (its output fields aside).
pub fn same_pool(have: &ipam::Pool, want: &ipam::Pool) -> bool {
    let spec = |p: &ipam::Pool| ipam::Pool {
        capacity: Vec::new(),
        generation: 0,
        create_time: None,
        update_time: None,
        // Absent and empty selectors select the same.
        namespace_selector: p
            .namespace_selector
            .clone()
            .filter(|s| *s != Default::default()),
        service_selector: p
            .service_selector
            .clone()
            .filter(|s| *s != Default::default()),
        auto_assign: Some(p.auto_assign.unwrap_or(true)),
        ..p.clone()
    };
    spec(have) == spec(want)
}

/// A pool's capacity summed over its families: total, used, free, quarantined.
pub fn capacity(pool: &ipam::Pool) -> (String, u64, String, u64) {
    let (mut total, mut used, mut free, mut quarantined) = (0u128, 0u64, 0u128, 0u64);
    for c in &pool.capacity {
        total = total.saturating_add(c.total.parse().unwrap_or(0));
        free = free.saturating_add(c.free.parse().unwrap_or(0));
        used = used.saturating_add(c.used);
        quarantined = quarantined.saturating_add(c.quarantined);
    }
    (total.to_string(), used, free.to_string(), quarantined)
}

/// A peer as the policy has it; `password` is what its Secret holds.
pub fn peer(
    name: &str,
    spec: &BGPPeerSpec,
    password: Option<String>,
) -> Result<routing::Peer, String> {
    let families = spec
        .families
        .iter()
        .enumerate()
        .map(|(i, f)| match f.to_ascii_lowercase().as_str() {
            "ipv4" => Ok(ipam::IpFamily::Ipv4 as i32),
            "ipv6" => Ok(ipam::IpFamily::Ipv6 as i32),
            other => Err(format!("spec.families[{i}]: {other:?} is not IPv4 or IPv6")),
        })
        .collect::<Result<_, _>>()?;
    Ok(routing::Peer {
        name: name.to_string(),
        address: spec.peer_address.clone(),
        asn: spec.peer_asn,
        port: spec.peer_port.map_or(0, u32::from),
        node_selector: spec
            .node_selector
            .as_ref()
            .map(|s| selector(s, "spec.nodeSelector"))
            .transpose()?,
        hold_time_seconds: seconds(spec.hold_time.as_deref(), "spec.holdTime")?,
        keepalive_seconds: seconds(spec.keepalive_time.as_deref(), "spec.keepaliveTime")?,
        connect_retry_seconds: seconds(spec.connect_time.as_deref(), "spec.connectTime")?,
        md5_password: password.unwrap_or_default(),
        multihop_ttl: spec.ebgp_multi_hop_ttl.unwrap_or(0),
        graceful_restart: spec.enable_graceful_restart,
        restart_time_seconds: seconds(spec.restart_time.as_deref(), "spec.restartTime")?,
        passive: spec.passive,
        local_asn: spec.my_asn.unwrap_or(0),
        families,
        source_subnet: spec.source_subnet.clone().unwrap_or_default(),
        max_prefixes: spec.max_prefixes.unwrap_or(0),
        bfd: spec.bfd.as_ref().map(|b| routing::Bfd {
            min_rx_ms: b.receive_interval.unwrap_or(0),
            min_tx_ms: b.transmit_interval.unwrap_or(0),
            multiplier: b.detect_multiplier.unwrap_or(0),
            multihop: b.multihop,
        }),
    })
}

/// A pool's name and labels, for advertisements that select pools by label.
pub struct PoolLabels<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let exact = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    exact && expressions
}

/// One advertisement resource as the policy's rules: one per pool it names or selects,
/// or one for every pool when it names none.
pub fn advertisements(
    spec: &BGPAdvertisementSpec,
    pools: &[PoolLabels<'_>],
) -> Result<Vec<routing::Advertisement>, String> {
    let node_selector = spec
        .node_selector
        .as_ref()
        .map(|s| selector(s, "spec.nodeSelector"))
        .transpose()?;
    let mut names: Vec<String> = spec.ip_address_pools.clone();
    for s in &spec.ip_address_pool_selectors {
        names.extend(
            pools
                .iter()
                .filter(|p| matches(s, p.labels))
                .map(|p| p.name.to_string()),
        );
    }
    names.sort();
    names.dedup();
    let selects_by_label = !spec.ip_address_pool_selectors.is_empty();
    if names.is_empty() && selects_by_label {
        // Selectors that match no pool announce nothing, rather than everything.
        return Ok(Vec::new());
    }
    if names.is_empty() {
        names.push(String::new());
    }
    Ok(names
        .into_iter()
        .map(|pool| routing::Advertisement {
            pool,
            host_routes: spec.host_routes,
            aggregation_length_v4: spec.aggregation_length,
            aggregation_length_v6: spec.aggregation_length_v6,
            communities: spec.communities.clone(),
            large_communities: spec.large_communities.clone(),
            local_pref: spec.local_pref,
            node_selector: node_selector.clone(),
            med: spec.med,
            peers: spec.peers.clone(),
            withdraw_without_endpoints: spec.withdraw_without_endpoints,
        })
        .collect())
}

/// The local ASN: the settings', else the one every peer names as its own (MetalLB
/// names it per peer).
pub fn local_asn(settings: Option<&BGPSettingsSpec>, peers: &[BGPPeerSpec]) -> Result<u32, String> {
    if let Some(s) = settings {
        return Ok(s.local_asn);
    }
    let mut asns: Vec<u32> = peers.iter().filter_map(|p| p.my_asn).collect();
    asns.sort_unstable();
    asns.dedup();
    match asns.as_slice() {
        [] if peers.is_empty() => Ok(0),
        [asn, ..] => Ok(*asn),
        [] => Err(format!(
            "no BGPSettings named {:?} gives the local ASN, and no peer names myASN",
            crate::crd::SETTINGS_NAME
        )),
    }
}

// ---- imports --------------------------------------------------------------------------

fn field<T: serde::de::DeserializeOwned + Default>(spec: &Value, key: &str) -> Result<T, String> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("spec.{key}: {e}")),
    }
}

/// Herald takes one selector where MetalLB takes a list (whose selectors are ORed).
fn one_selector(list: Vec<LabelSelector>, key: &str) -> Result<Option<LabelSelector>, String> {
    match list.len() {
        0 => Ok(None),
        1 => Ok(list.into_iter().next()),
        n => Err(format!(
            "spec.{key}: Herald takes one selector, not {n}; combine them or split the resource"
        )),
    }
}

/// MetalLB `IPAddressPool` (metallb.io/v1beta1).
pub fn metallb_pool(object: &Value) -> Result<IPPoolSpec, String> {
    let spec = &object["spec"];
    let alloc = &spec["serviceAllocation"];
    let service_allocation = if alloc.is_object() {
        Some(ServiceAllocation {
            priority: field(alloc, "priority")?,
            namespaces: field(alloc, "namespaces")?,
            namespace_selector: one_selector(
                field(alloc, "namespaceSelectors")?,
                "serviceAllocation.namespaceSelectors",
            )?,
            service_selector: one_selector(
                field(alloc, "serviceSelectors")?,
                "serviceAllocation.serviceSelectors",
            )?,
        })
    } else {
        None
    };
    Ok(IPPoolSpec {
        addresses: field(spec, "addresses")?,
        auto_assign: field(spec, "autoAssign")?,
        avoid_buggy_ips: field(spec, "avoidBuggyIPs")?,
        service_allocation,
        ..Default::default()
    })
}

/// MetalLB `BGPPeer` (metallb.io/v1beta2, whose fields v1beta1 shares but `nodeSelectors`).
/// An inline `password` is taken as it is: the migration changes no configuration.
pub fn metallb_peer(object: &Value) -> Result<(BGPPeerSpec, Option<String>), String> {
    let spec = &object["spec"];
    if let Some(vrf) = spec["vrf"].as_str().filter(|v| !v.is_empty()) {
        return Err(format!(
            "spec.vrf: {vrf:?}: Herald peers from the default VRF only"
        ));
    }
    let password_secret: Option<Value> = field(spec, "passwordSecret")?;
    let password_secret = password_secret
        .filter(|s| s["name"].as_str().is_some_and(|n| !n.is_empty()))
        .map(|s| SecretKeyRef {
            name: s["name"].as_str().unwrap_or_default().to_string(),
            namespace: s["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .or_else(|| object["metadata"]["namespace"].as_str())
                .unwrap_or_default()
                .to_string(),
            key: Some("password".into()),
        });
    let inline: String = field(spec, "password")?;
    let ebgp_multi_hop: bool = field(spec, "ebgpMultiHop")?;
    let port: u16 = field(spec, "peerPort")?;
    let spec = BGPPeerSpec {
        peer_asn: field(spec, "peerASN")?,
        peer_address: field(spec, "peerAddress")?,
        peer_port: (port != 0).then_some(port),
        my_asn: Some(field::<u32>(spec, "myASN")?).filter(|a| *a != 0),
        hold_time: field(spec, "holdTime")?,
        keepalive_time: field(spec, "keepaliveTime")?,
        connect_time: field(spec, "connectTime")?,
        node_selector: one_selector(field(spec, "nodeSelectors")?, "nodeSelectors")?,
        password_secret,
        // MetalLB's ebgpMultiHop lets the session cross any number of hops.
        ebgp_multi_hop_ttl: ebgp_multi_hop.then_some(255),
        enable_graceful_restart: field(spec, "enableGracefulRestart")?,
        ..Default::default()
    };
    Ok((spec, Some(inline).filter(|p| !p.is_empty())))
}

/// MetalLB `BGPAdvertisement` (metallb.io/v1beta1). Its communities are
/// `"65000:100"` or `"large:65000:1:2"`; named Community resources are not read.
pub fn metallb_advertisement(object: &Value) -> Result<BGPAdvertisementSpec, String> {
    let spec = &object["spec"];
    let mut communities = Vec::new();
    let mut large_communities = Vec::new();
    for (i, c) in field::<Vec<String>>(spec, "communities")?
        .into_iter()
        .enumerate()
    {
        if let Some(large) = c.strip_prefix("large:") {
            large_communities.push(large.to_string());
        } else if c.split(':').count() == 2 {
            communities.push(c);
        } else {
            return Err(format!(
                "spec.communities[{i}]: {c:?} is not ASN:VALUE or large:ASN:V1:V2 (named \
                 Community resources are not read)"
            ));
        }
    }
    let service_selectors: Vec<LabelSelector> = field(spec, "serviceSelectors")?;
    if !service_selectors.is_empty() {
        return Err("spec.serviceSelectors: Herald advertises by pool, not by Service".into());
    }
    Ok(BGPAdvertisementSpec {
        ip_address_pools: field(spec, "ipAddressPools")?,
        ip_address_pool_selectors: field(spec, "ipAddressPoolSelectors")?,
        aggregation_length: field(spec, "aggregationLength")?,
        aggregation_length_v6: field(spec, "aggregationLengthV6")?,
        communities,
        large_communities,
        local_pref: Some(field::<u32>(spec, "localPref")?).filter(|p| *p != 0),
        peers: field(spec, "peers")?,
        node_selector: one_selector(field(spec, "nodeSelectors")?, "nodeSelectors")?,
        ..Default::default()
    })
}

/// Cilium `CiliumLoadBalancerIPPool` (cilium.io/v2alpha1 and v2): `blocks` of a `cidr` or
/// a `start`–`stop` range (v2alpha1's older `cidrs` too), `allowFirstLastIPs` as
/// `"Yes"`/`"No"`, `disabled`, `serviceSelector`.
pub fn cilium_pool(object: &Value) -> Result<IPPoolSpec, String> {
    let spec = &object["spec"];
    let mut addresses = Vec::new();
    for key in ["blocks", "cidrs"] {
        for (i, block) in field::<Vec<Value>>(spec, key)?.into_iter().enumerate() {
            if let Some(cidr) = block["cidr"].as_str() {
                addresses.push(cidr.to_string());
            } else if let (Some(start), Some(stop)) =
                (block["start"].as_str(), block["stop"].as_str())
            {
                addresses.push(format!("{start}-{stop}"));
            } else {
                return Err(format!(
                    "spec.{key}[{i}]: neither a cidr nor a start and stop"
                ));
            }
        }
    }
    let allow_first_last: String = field(spec, "allowFirstLastIPs")?;
    let service_selector: Option<LabelSelector> = field(spec, "serviceSelector")?;
    Ok(IPPoolSpec {
        addresses,
        // Cilium's default for a pool that is not the only one: "Yes" since 1.16.
        allow_first_last_ips: !allow_first_last.eq_ignore_ascii_case("no"),
        disabled: field(spec, "disabled")?,
        service_allocation: service_selector.map(|s| ServiceAllocation {
            service_selector: Some(s),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn a_pool_carries_every_field() {
        let spec: IPPoolSpec = serde_json::from_value(json!({
            "addresses": ["172.16.0.240/28", "10.0.0.10-10.0.0.20"],
            "autoAssign": false,
            "avoidBuggyIPs": true,
            "allowFirstLastIPs": true,
            "disabled": true,
            "serviceAllocation": {
                "priority": 3,
                "namespaces": ["shop"],
                "namespaceSelector": {"matchLabels": {"team": "a"}},
                "serviceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]},
            },
            "aggregationLength": 28,
            "aggregationLengthV6": 64,
            "quarantine": "10m",
        }))
        .unwrap();
        let p = pool("lab", &spec).unwrap();
        assert_eq!(p.addresses.len(), 2);
        assert_eq!(p.auto_assign, Some(false));
        assert!(p.avoid_buggy_ips && p.allow_first_last && p.disabled);
        assert_eq!(p.priority, 3);
        assert_eq!(p.namespaces, ["shop"]);
        assert_eq!(p.namespace_selector.unwrap().match_labels["team"], "a");
        let expr = &p.service_selector.unwrap().match_expressions[0];
        assert_eq!(
            expr.operator,
            ipam::label_selector_requirement::Operator::In as i32
        );
        assert_eq!((p.aggregation_length_v4, p.aggregation_length_v6), (28, 64));
        assert_eq!(p.quarantine_seconds, 600);
    }

    #[test]
    fn a_bad_field_is_named() {
        let spec = IPPoolSpec {
            quarantine: Some("soon".into()),
            ..Default::default()
        };
        assert!(
            pool("p", &spec)
                .unwrap_err()
                .starts_with("spec.quarantine:")
        );
        let spec: IPPoolSpec = serde_json::from_value(json!({
            "addresses": [],
            "serviceAllocation": {"serviceSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
        }))
        .unwrap();
        let err = pool("p", &spec).unwrap_err();
        assert!(
            err.starts_with("spec.serviceAllocation.serviceSelector.matchExpressions[0].operator"),
            "{err}"
        );
    }

    #[test]
    fn the_same_pool_is_not_written_again() {
        let spec = IPPoolSpec {
            addresses: vec!["10.0.0.0/24".into()],
            ..Default::default()
        };
        let want = pool("p", &spec).unwrap();
        let mut have = want.clone();
        have.generation = 4;
        have.auto_assign = Some(true);
        have.capacity.push(ipam::PoolCapacity::default());
        assert!(same_pool(&have, &want));
        have.avoid_buggy_ips = true;
        assert!(!same_pool(&have, &want));
    }

    #[test]
    fn a_peer_reads_durations_and_the_password() {
        let spec: BGPPeerSpec = serde_json::from_value(json!({
            "peerASN": 65000, "peerAddress": "127.0.0.1", "peerPort": 1790, "myASN": 64512,
            "holdTime": "9s", "keepaliveTime": "3s", "connectTime": "1s",
            "passwordSecret": {"name": "bgp", "namespace": "herald"},
            "families": ["IPv4", "IPv6"], "passive": true,
        }))
        .unwrap();
        let p = peer("tor", &spec, Some("s3cret".into())).unwrap();
        assert_eq!((p.asn, p.port, p.local_asn), (65000, 1790, 64512));
        assert_eq!(
            (
                p.hold_time_seconds,
                p.keepalive_seconds,
                p.connect_retry_seconds
            ),
            (9, 3, 1)
        );
        assert_eq!(p.md5_password, "s3cret");
        assert_eq!(p.families.len(), 2);
        assert!(p.passive);
        let bad = BGPPeerSpec {
            hold_time: Some("ninety".into()),
            ..spec
        };
        assert!(
            peer("tor", &bad, None)
                .unwrap_err()
                .starts_with("spec.holdTime:")
        );
    }

    #[test]
    fn advertisements_expand_per_pool() {
        let labels: BTreeMap<String, String> = [("tier".to_string(), "public".to_string())].into();
        let none = BTreeMap::new();
        let pools = [
            PoolLabels {
                name: "a",
                labels: &labels,
            },
            PoolLabels {
                name: "b",
                labels: &none,
            },
        ];
        let spec: BGPAdvertisementSpec = serde_json::from_value(json!({
            "ipAddressPools": ["b"],
            "ipAddressPoolSelectors": [{"matchLabels": {"tier": "public"}}],
            "communities": ["65000:100"],
            "localPref": 200,
        }))
        .unwrap();
        let rules = advertisements(&spec, &pools).unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r.pool.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(rules[0].local_pref, Some(200));
        let every = advertisements(&BGPAdvertisementSpec::default(), &pools).unwrap();
        assert_eq!(every.len(), 1);
        assert_eq!(every[0].pool, "");
        let unmatched = BGPAdvertisementSpec {
            ip_address_pool_selectors: vec![LabelSelector {
                match_labels: Some([("x".to_string(), "y".to_string())].into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(advertisements(&unmatched, &pools).unwrap().is_empty());
    }

    #[test]
    fn metallb_resources_read_as_heralds() {
        let pool = metallb_pool(&json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": {"name": "lab", "namespace": "metallb-system"},
            "spec": {"addresses": ["10.208.1.0/24"], "avoidBuggyIPs": true, "autoAssign": false,
                     "serviceAllocation": {"priority": 50, "namespaces": ["shop"],
                                           "serviceSelectors": [{"matchLabels": {"a": "b"}}]}},
        }))
        .unwrap();
        assert_eq!(pool.addresses, ["10.208.1.0/24"]);
        assert!(pool.avoid_buggy_ips);
        assert_eq!(pool.auto_assign, Some(false));
        let alloc = pool.service_allocation.unwrap();
        assert_eq!((alloc.priority, alloc.namespaces.len()), (50, 1));
        assert!(alloc.service_selector.is_some());

        let two = metallb_pool(&json!({"spec": {"addresses": [], "serviceAllocation": {
            "namespaceSelectors": [{"matchLabels": {"a": "b"}}, {"matchLabels": {"c": "d"}}]}}}));
        assert!(
            two.unwrap_err()
                .starts_with("spec.serviceAllocation.namespaceSelectors")
        );

        let (peer, password) = metallb_peer(&json!({
            "metadata": {"name": "tor", "namespace": "metallb-system"},
            "spec": {"myASN": 64512, "peerASN": 65000, "peerAddress": "10.0.0.1",
                     "holdTime": "90s", "ebgpMultiHop": true,
                     "passwordSecret": {"name": "tor-md5"},
                     "nodeSelectors": [{"matchLabels": {"rack": "r1"}}]},
        }))
        .unwrap();
        assert_eq!((peer.my_asn, peer.peer_asn), (Some(64512), 65000));
        assert_eq!(peer.ebgp_multi_hop_ttl, Some(255));
        let secret = peer.password_secret.unwrap();
        assert_eq!(
            (
                secret.name.as_str(),
                secret.namespace.as_str(),
                secret.key.as_deref()
            ),
            ("tor-md5", "metallb-system", Some("password"))
        );
        assert!(password.is_none());
        assert!(metallb_peer(&json!({"spec": {"vrf": "red"}})).is_err());

        let adv = metallb_advertisement(&json!({"spec": {
            "ipAddressPools": ["lab"], "aggregationLength": 32, "localPref": 100,
            "communities": ["65000:300", "large:65000:1:2"], "peers": ["tor"]}}))
        .unwrap();
        assert_eq!(adv.communities, ["65000:300"]);
        assert_eq!(adv.large_communities, ["65000:1:2"]);
        assert_eq!(adv.local_pref, Some(100));
        assert!(
            metallb_advertisement(&json!({"spec": {"communities": ["no-advertise"]}})).is_err()
        );
    }

    #[test]
    fn cilium_pools_read_as_heralds() {
        let pool = cilium_pool(&json!({"spec": {
            "blocks": [{"cidr": "10.0.10.0/24"}, {"start": "10.0.20.10", "stop": "10.0.20.20"}],
            "allowFirstLastIPs": "No",
            "serviceSelector": {"matchLabels": {"color": "blue"}},
        }}))
        .unwrap();
        assert_eq!(pool.addresses, ["10.0.10.0/24", "10.0.20.10-10.0.20.20"]);
        assert!(!pool.allow_first_last_ips);
        assert!(pool.service_allocation.unwrap().service_selector.is_some());
        assert!(cilium_pool(&json!({"spec": {"blocks": [{}]}})).is_err());
    }

    #[test]
    fn the_local_asn_comes_from_settings_or_the_peers() {
        let settings = BGPSettingsSpec {
            local_asn: 64600,
            router_id_subnet: None,
        };
        assert_eq!(local_asn(Some(&settings), &[]).unwrap(), 64600);
        let peer = BGPPeerSpec {
            my_asn: Some(64512),
            ..Default::default()
        };
        assert_eq!(local_asn(None, &[peer]).unwrap(), 64512);
        assert!(local_asn(None, &[BGPPeerSpec::default()]).is_err());
    }

    #[test]
    fn imports_parse() {
        assert_eq!(
            Imports::parse("metallb, Cilium").unwrap(),
            Imports {
                metallb: true,
                cilium: true
            }
        );
        assert_eq!(Imports::parse("").unwrap(), Imports::default());
        assert!(Imports::parse("calico").is_err());
    }
}
