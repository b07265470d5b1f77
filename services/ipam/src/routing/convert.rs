//! `herald.routing.v1` wire types ⇄ the routing domain (`herald-routes`). Exhaustive
//! destructuring, as in the IPAM conversions: a new proto field is a compile error here.

use std::collections::BTreeSet;
use std::net::IpAddr;

use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_model::{FieldError, IpFamily, TrafficPolicy};
use herald_routes::{
    AdvertisementInput, BfdInput, BfdSettings, BgpPolicy, BgpPolicyInput, Node, NodeRoutes,
    PeerInput, PeerSession, RouteAttrs, RouterIdRule, RoutesDelta, SourceAddressRule,
};

use crate::convert::{family_to_pb, parse_ip, selector_from_pb, selector_to_pb, timestamp};

/// What GetBgpPolicy shows for a stored MD5 password, which it never reveals. Written back
/// (the usual read-modify-write), it keeps the password stored for the peer of that name.
pub const MD5_PASSWORD_PLACEHOLDER: &str = "(set)";

/// An optional number where 0 means "the default".
fn nonzero(value: u32) -> Option<u32> {
    (value != 0).then_some(value)
}

pub fn node_from_pb(node: pb::Node) -> Result<Node, FieldError> {
    let pb::Node {
        name,
        labels,
        addresses,
        ready,
    } = node;
    let addresses = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| parse_ip(&format!("node.addresses[{i}]"), a))
        .collect::<Result<Vec<IpAddr>, _>>()?;
    let node = Node {
        name,
        labels: labels.into_iter().collect(),
        addresses,
        ready,
    };
    node.validate()?;
    Ok(node)
}

pub fn node_to_pb(node: &Node) -> pb::Node {
    pb::Node {
        name: node.name.clone(),
        labels: node.labels.clone().into_iter().collect(),
        addresses: node.addresses.iter().map(ToString::to_string).collect(),
        ready: node.ready,
    }
}

fn family_from_pb(field: &str, value: i32) -> Result<IpFamily, FieldError> {
    match ipam_pb::IpFamily::try_from(value) {
        Ok(ipam_pb::IpFamily::Ipv4) => Ok(IpFamily::V4),
        Ok(ipam_pb::IpFamily::Ipv6) => Ok(IpFamily::V6),
        _ => Err(FieldError::new(field, value, "must be IPV4 or IPV6")),
    }
}

pub fn traffic_policy_from_pb(value: i32) -> Result<Option<TrafficPolicy>, FieldError> {
    match ipam_pb::TrafficPolicy::try_from(value) {
        Ok(ipam_pb::TrafficPolicy::Unspecified) => Ok(None),
        Ok(ipam_pb::TrafficPolicy::Cluster) => Ok(Some(TrafficPolicy::Cluster)),
        Ok(ipam_pb::TrafficPolicy::Local) => Ok(Some(TrafficPolicy::Local)),
        Err(_) => Err(FieldError::new(
            "traffic_policy",
            value,
            "must be CLUSTER or LOCAL",
        )),
    }
}

fn subnet(field: &str, text: &str) -> Result<Option<ipnet::IpNet>, FieldError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<ipnet::IpNet>()
        .map(|n| Some(n.trunc()))
        .map_err(|_| FieldError::new(field, text, "is not a CIDR"))
}

/// `stored` is the policy in force, whose passwords the placeholder refers to.
fn peer_from_pb(
    i: usize,
    peer: pb::Peer,
    stored: Option<&BgpPolicy>,
) -> Result<PeerInput, FieldError> {
    let pb::Peer {
        name,
        address,
        asn,
        port,
        node_selector,
        hold_time_seconds,
        keepalive_seconds,
        connect_retry_seconds,
        md5_password,
        multihop_ttl,
        graceful_restart,
        restart_time_seconds,
        passive,
        local_asn,
        families,
        source_subnet,
        max_prefixes,
        bfd,
    } = peer;
    let at = format!("peers[{i}]");
    let families = families
        .iter()
        .enumerate()
        .map(|(j, f)| family_from_pb(&format!("{at}.families[{j}]"), *f))
        .collect::<Result<Vec<_>, _>>()?;
    let md5_password = match md5_password.as_str() {
        "" => None,
        MD5_PASSWORD_PLACEHOLDER => {
            let kept = stored
                .and_then(|policy| policy.peers.iter().find(|p| p.name == name))
                .and_then(|p| p.md5_password.as_ref())
                .ok_or_else(|| {
                    FieldError::new(
                        format!("{at}.md5_password"),
                        "",
                        format!(
                            "is {MD5_PASSWORD_PLACEHOLDER:?}, which keeps a stored password, but no password is stored for a peer of this name; send the password, or nothing for none"
                        ),
                    )
                })?;
            Some(kept.expose().to_string())
        }
        _ => Some(md5_password),
    };
    let source_address = match subnet(&format!("{at}.source_subnet"), &source_subnet)? {
        Some(net) => SourceAddressRule::InSubnet(net),
        None => SourceAddressRule::FirstOfPeerFamily,
    };
    Ok(PeerInput {
        name,
        address,
        asn,
        local_asn: nonzero(local_asn),
        port: nonzero(port),
        node_selector: selector_from_pb(&format!("{at}.node_selector"), node_selector)?,
        families,
        // Zero is a valid hold time (no keepalives) only when asked for explicitly, which
        // proto3 cannot tell from "unset"; Herald reads 0 as the 90 s default.
        hold_time: nonzero(hold_time_seconds),
        keepalive: nonzero(keepalive_seconds),
        connect_retry: nonzero(connect_retry_seconds),
        md5_password,
        multihop_ttl: nonzero(multihop_ttl),
        graceful_restart,
        restart_time: nonzero(restart_time_seconds),
        passive,
        source_address,
        max_prefixes: nonzero(max_prefixes),
        bfd: bfd.map(bfd_from_pb),
    })
}

fn bfd_from_pb(bfd: pb::Bfd) -> BfdInput {
    let pb::Bfd {
        min_rx_ms,
        min_tx_ms,
        multiplier,
        multihop,
    } = bfd;
    BfdInput {
        min_rx_ms: nonzero(min_rx_ms),
        min_tx_ms: nonzero(min_tx_ms),
        multiplier: nonzero(multiplier),
        multihop,
    }
}

fn bfd_to_pb(bfd: &BfdSettings) -> pb::Bfd {
    let BfdSettings {
        min_rx_ms,
        min_tx_ms,
        multiplier,
        multihop,
    } = *bfd;
    pb::Bfd {
        min_rx_ms,
        min_tx_ms,
        multiplier: u32::from(multiplier),
        multihop,
    }
}

fn advertisement_from_pb(
    i: usize,
    rule: pb::Advertisement,
) -> Result<AdvertisementInput, FieldError> {
    let pb::Advertisement {
        pool,
        host_routes,
        aggregation_length_v4,
        aggregation_length_v6,
        communities,
        large_communities,
        local_pref,
        node_selector,
        med,
        peers,
        withdraw_without_endpoints,
    } = rule;
    Ok(AdvertisementInput {
        pool: (!pool.is_empty()).then_some(pool),
        host_routes,
        aggregation_length_v4: nonzero(aggregation_length_v4),
        aggregation_length_v6: nonzero(aggregation_length_v6),
        communities,
        large_communities,
        local_pref,
        med,
        node_selector: selector_from_pb(
            &format!("advertisements[{i}].node_selector"),
            node_selector,
        )?,
        peers,
        withdraw_without_endpoints,
    })
}

/// Validates a whole policy; `pools` are the pool names rules may refer to, `stored` the
/// policy it replaces (for [`MD5_PASSWORD_PLACEHOLDER`]).
pub fn policy_from_pb(
    policy: pb::BgpPolicy,
    pools: &[herald_model::PoolName],
    stored: Option<&BgpPolicy>,
) -> Result<BgpPolicy, FieldError> {
    let pb::BgpPolicy {
        local_asn,
        peers,
        advertisements,
        router_id_subnet,
    } = policy;
    let router_id = match subnet("router_id_subnet", &router_id_subnet)? {
        Some(ipnet::IpNet::V4(net)) => RouterIdRule::Ipv4InSubnet(net),
        Some(ipnet::IpNet::V6(_)) => {
            return Err(FieldError::new(
                "router_id_subnet",
                &router_id_subnet,
                "must be an IPv4 subnet",
            ));
        }
        None => RouterIdRule::FirstIpv4,
    };
    let input = BgpPolicyInput {
        local_asn,
        router_id,
        peers: peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| peer_from_pb(i, p, stored))
            .collect::<Result<_, _>>()?,
        advertisements: advertisements
            .into_iter()
            .enumerate()
            .map(|(i, r)| advertisement_from_pb(i, r))
            .collect::<Result<_, _>>()?,
    };
    BgpPolicy::from_input(input, Some(pools))
}

pub fn policy_to_pb(policy: &BgpPolicy) -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: policy.local_asn,
        router_id_subnet: match policy.router_id {
            RouterIdRule::FirstIpv4 => String::new(),
            RouterIdRule::Ipv4InSubnet(net) => net.to_string(),
        },
        peers: policy
            .peers
            .iter()
            .map(|p| pb::Peer {
                name: p.name.clone(),
                address: p.address.to_string(),
                asn: p.asn,
                port: u32::from(p.port),
                node_selector: selector_to_pb(&p.node_selector),
                hold_time_seconds: u32::from(p.hold_time),
                keepalive_seconds: u32::from(p.keepalive),
                connect_retry_seconds: u32::from(p.connect_retry),
                // Secrets are never shown; the placeholder written back keeps them.
                md5_password: if p.md5_password.is_some() {
                    MD5_PASSWORD_PLACEHOLDER.into()
                } else {
                    String::new()
                },
                multihop_ttl: p.multihop_ttl.map(u32::from).unwrap_or(0),
                graceful_restart: p.graceful_restart,
                restart_time_seconds: u32::from(p.restart_time),
                passive: p.passive,
                local_asn: p.local_asn.unwrap_or(0),
                families: p.families.iter().map(|f| family_to_pb(*f) as i32).collect(),
                source_subnet: match p.source_address {
                    SourceAddressRule::FirstOfPeerFamily => String::new(),
                    SourceAddressRule::InSubnet(net) => net.to_string(),
                },
                max_prefixes: p.max_prefixes.unwrap_or(0),
                bfd: p.bfd.as_ref().map(bfd_to_pb),
            })
            .collect(),
        advertisements: policy
            .advertisements
            .iter()
            .map(|r| pb::Advertisement {
                pool: r.pool.as_ref().map(ToString::to_string).unwrap_or_default(),
                host_routes: Some(r.host_routes),
                aggregation_length_v4: r.aggregation_length_v4.map(u32::from).unwrap_or(0),
                aggregation_length_v6: r.aggregation_length_v6.map(u32::from).unwrap_or(0),
                communities: r.communities.iter().map(ToString::to_string).collect(),
                large_communities: r
                    .large_communities
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                local_pref: r.local_pref,
                node_selector: selector_to_pb(&r.node_selector),
                med: r.med,
                peers: r.peers.clone(),
                withdraw_without_endpoints: r.withdraw_without_endpoints,
            })
            .collect(),
    }
}

/// The session parameters a speaker needs, password included (the speaker must send it).
fn session_to_pb(session: &PeerSession) -> pb::Peer {
    pb::Peer {
        name: session.name.clone(),
        address: session.address.to_string(),
        asn: session.peer_asn,
        port: u32::from(session.port),
        node_selector: None,
        hold_time_seconds: u32::from(session.hold_time),
        keepalive_seconds: u32::from(session.keepalive),
        connect_retry_seconds: u32::from(session.connect_retry),
        md5_password: session
            .md5_password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default(),
        multihop_ttl: session.multihop_ttl.map(u32::from).unwrap_or(0),
        graceful_restart: session.graceful_restart,
        restart_time_seconds: u32::from(session.restart_time),
        passive: session.passive,
        local_asn: session.local_asn,
        families: session
            .families
            .iter()
            .map(|f| family_to_pb(*f) as i32)
            .collect(),
        source_subnet: String::new(),
        max_prefixes: session.max_prefixes.unwrap_or(0),
        bfd: session.bfd.as_ref().map(bfd_to_pb),
    }
}

/// Per-prefix provenance carried to the speaker.
pub struct RouteMeta<'a> {
    pub traceparent: &'a str,
    pub changed_at: i64,
}

fn route_to_pb(prefix: &ipnet::IpNet, attrs: &RouteAttrs, meta: RouteMeta<'_>) -> pb::Route {
    let RouteAttrs {
        next_hop,
        origin: _,
        med,
        local_pref,
        communities,
        large_communities,
    } = attrs;
    pb::Route {
        prefix: prefix.to_string(),
        next_hop: next_hop.to_string(),
        communities: communities.iter().map(|c| c.value()).collect(),
        large_communities: large_communities
            .iter()
            .map(|l| pb::LargeCommunity {
                global_admin: l.global_admin,
                local_data_1: l.local_data1,
                local_data_2: l.local_data2,
            })
            .collect(),
        local_pref: *local_pref,
        med: *med,
        traceparent: meta.traceparent.to_string(),
        changed_at: Some(timestamp(meta.changed_at)),
    }
}

pub fn node_routes_to_pb<'a>(
    node: &str,
    revision: i64,
    traceparent: &str,
    changed_at: i64,
    local_asn: u32,
    routes: &NodeRoutes,
    meta: impl Fn(&ipnet::IpNet) -> RouteMeta<'a>,
) -> pb::NodeRoutes {
    let mut message = message_of(
        node,
        0,
        revision,
        traceparent,
        changed_at,
        local_asn,
        &routes.peers,
    );
    for (session, peer) in routes.peers.iter().zip(&mut message.peers) {
        peer.routes = routes
            .routes
            .get(&session.name)
            .into_iter()
            .flatten()
            .map(|(prefix, attrs)| route_to_pb(prefix, attrs, meta(prefix)))
            .collect();
    }
    message
}

/// A delta from revision `from` to `revision` ([`pb::NodeRoutes::from_revision`]): every
/// session of `sessions` with its parameters, and per session only the routes `delta`
/// sets and the prefixes it withdraws (nothing without a delta).
#[allow(clippy::too_many_arguments)]
pub fn node_delta_to_pb<'a>(
    node: &str,
    from: i64,
    revision: i64,
    traceparent: &str,
    changed_at: i64,
    local_asn: u32,
    sessions: &[PeerSession],
    delta: Option<&RoutesDelta>,
    meta: impl Fn(&ipnet::IpNet) -> RouteMeta<'a>,
) -> pb::NodeRoutes {
    let mut message = message_of(
        node,
        from,
        revision,
        traceparent,
        changed_at,
        local_asn,
        sessions,
    );
    let Some(delta) = delta else {
        return message;
    };
    for (session, peer) in sessions.iter().zip(&mut message.peers) {
        let Some(d) = delta.peers.get(&session.name) else {
            continue;
        };
        peer.routes = d
            .set
            .iter()
            .map(|(prefix, attrs)| route_to_pb(prefix, attrs, meta(prefix)))
            .collect();
        peer.withdrawn = d.withdrawn.iter().map(ToString::to_string).collect();
    }
    message
}

/// The message's frame: every session with no routes.
fn message_of(
    node: &str,
    from: i64,
    revision: i64,
    traceparent: &str,
    changed_at: i64,
    local_asn: u32,
    sessions: &[PeerSession],
) -> pb::NodeRoutes {
    let router_id = sessions
        .first()
        .map(|p| p.router_id.to_string())
        .unwrap_or_default();
    pb::NodeRoutes {
        revision: u64::try_from(revision).unwrap_or(0),
        node: node.to_string(),
        local_asn,
        router_id,
        traceparent: traceparent.to_string(),
        changed_at: Some(timestamp(changed_at)),
        from_revision: u64::try_from(from).unwrap_or(0),
        peers: sessions
            .iter()
            .map(|session| pb::PeerRoutes {
                peer: Some(session_to_pb(session)),
                source_address: session.source_address.to_string(),
                routes: Vec::new(),
                // The stream clears it for the node whose turn it is.
                defer_reset: true,
                withdrawn: Vec::new(),
                // The stream sets it when its caller may not have the password.
                md5_password_withheld: false,
            })
            .collect(),
    }
}

/// Endpoint node names from the wire, validated.
pub fn endpoint_nodes(names: Vec<String>) -> Result<BTreeSet<String>, FieldError> {
    let mut out = BTreeSet::new();
    for (i, name) in names.into_iter().enumerate() {
        herald_routes::facts::validate_node_name(&format!("endpoint_nodes[{i}]"), &name)?;
        out.insert(name);
    }
    Ok(out)
}
