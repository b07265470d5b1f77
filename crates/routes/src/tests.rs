//! Table-driven tests of the route computation, with builders in the shape of the labs:
//! `node("n1").label("bgp-peer", "true").ipv4("10.10.10.11")`,
//! `service("uid-1").local().endpoints(["n1"]).ip("172.16.0.241", "lab")`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use herald_model::pool::PoolInput;
use herald_model::{AssignedIp, IpFamily, LabelSelector, Owner, PoolName, PoolSpec, TrafficPolicy};
use ipnet::IpNet;

use crate::*;

// ---------------------------------------------------------------- builders

fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        labels: BTreeMap::new(),
        addresses: vec![],
        ready: true,
    }
}

trait NodeExt {
    fn label(self, k: &str, v: &str) -> Self;
    fn ipv4(self, ip: &str) -> Self;
    fn ipv6(self, ip: &str) -> Self;
    fn not_ready(self) -> Self;
}

impl NodeExt for Node {
    fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    fn ipv4(mut self, ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(ip.is_ipv4(), "{ip}");
        self.addresses.push(ip);
        self
    }
    fn ipv6(mut self, ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(ip.is_ipv6(), "{ip}");
        self.addresses.push(ip);
        self
    }
    fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }
}

fn service(uid: &str) -> ServiceFacts {
    ServiceFacts {
        owner: Arc::new(Owner {
            cluster_id: "lab".into(),
            namespace: "default".into(),
            name: format!("svc-{uid}"),
            uid: uid.into(),
        }),
        traffic_policy: TrafficPolicy::Cluster,
        nodes_with_ready_endpoints: BTreeSet::new(),
        ips: Arc::new([]),
    }
}

trait ServiceExt {
    fn local(self) -> Self;
    fn endpoints<const N: usize>(self, nodes: [&str; N]) -> Self;
    fn ip(self, ip: &str, pool: &str) -> Self;
}

impl ServiceExt for ServiceFacts {
    fn local(mut self) -> Self {
        self.traffic_policy = TrafficPolicy::Local;
        self
    }
    fn endpoints<const N: usize>(mut self, nodes: [&str; N]) -> Self {
        self.nodes_with_ready_endpoints = nodes.iter().map(|n| n.to_string()).collect();
        self
    }
    fn ip(mut self, ip: &str, pool: &str) -> Self {
        let mut ips = self.ips.to_vec();
        ips.push(AssignedIp {
            ip: ip.parse().unwrap(),
            pool: PoolName::parse("pool", pool).unwrap(),
        });
        self.ips = ips.into();
        self
    }
}

fn peer(name: &str, address: &str, asn: u32) -> PeerInput {
    PeerInput {
        name: name.into(),
        address: address.into(),
        asn,
        ..Default::default()
    }
}

fn selector(k: &str, v: &str) -> LabelSelector {
    LabelSelector {
        match_labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    }
}

fn rule(pool: &str) -> AdvertisementInput {
    AdvertisementInput {
        pool: Some(pool.into()),
        ..Default::default()
    }
}

fn policy_input(peers: Vec<PeerInput>, rules: Vec<AdvertisementInput>) -> BgpPolicyInput {
    BgpPolicyInput {
        local_asn: 65010,
        router_id: RouterIdRule::FirstIpv4,
        peers,
        advertisements: rules,
    }
}

fn policy(peers: Vec<PeerInput>, rules: Vec<AdvertisementInput>) -> BgpPolicy {
    BgpPolicy::from_input(policy_input(peers, rules), None).unwrap()
}

fn pool(name: &str, cidr: &str, aggregation_v4: u32) -> PoolSpec {
    PoolSpec::from_input(PoolInput {
        name: name.into(),
        addresses: vec![cidr.into()],
        aggregation_length_v4: aggregation_v4,
        ..Default::default()
    })
    .unwrap()
}

/// The lab of seed 001: a ToR at 10.10.10.1 (AS 65001), the cluster in AS 65010, the
/// 172.16.0.240/28 pool, one rule for it.
fn lab_policy() -> BgpPolicy {
    policy(vec![peer("tor", "10.10.10.1", 65001)], vec![rule("lab")])
}

fn lab_pools() -> Vec<PoolSpec> {
    vec![pool("lab", "172.16.0.240/28", 0)]
}

fn lab_nodes() -> Vec<Node> {
    vec![
        node("n1").ipv4("10.10.10.10"),
        node("n2").ipv4("10.10.10.11"),
        node("n3").ipv4("10.10.10.12"),
    ]
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The prefixes `node` announces to `peer`, in output order.
fn prefixes(out: &BTreeMap<NodeName, NodeRoutes>, node: &str, peer: &str) -> Vec<String> {
    out[node]
        .routes
        .get(peer)
        .map(|r| r.keys().map(ToString::to_string).collect())
        .unwrap_or_default()
}

fn session_names(out: &BTreeMap<NodeName, NodeRoutes>, node: &str) -> Vec<String> {
    out[node].peers.iter().map(|p| p.name.clone()).collect()
}

/// Nodes announcing `prefix` to `peer`.
fn announcers(out: &BTreeMap<NodeName, NodeRoutes>, peer: &str, prefix: &str) -> Vec<String> {
    out.iter()
        .filter(|(_, r)| {
            r.routes
                .get(peer)
                .is_some_and(|m| m.contains_key(&net(prefix)))
        })
        .map(|(n, _)| n.clone())
        .collect()
}

// ---------------------------------------------------------------- the labs

#[test]
fn lab_cluster_service_is_announced_by_every_node_for_ecmp() {
    let svc = service("uid-1")
        .endpoints(["n2", "n3"])
        .ip("172.16.0.241", "lab");
    let out = compute(&lab_nodes(), &[svc], &lab_policy(), &lab_pools());
    assert_eq!(out.len(), 3);
    for (name, ip) in [
        ("n1", "10.10.10.10"),
        ("n2", "10.10.10.11"),
        ("n3", "10.10.10.12"),
    ] {
        let routes = &out[name];
        let [session] = routes.peers.as_slice() else {
            panic!("{name}: one session expected, got {:?}", routes.peers);
        };
        assert_eq!(session.name, "tor");
        assert_eq!(session.address.to_string(), "10.10.10.1");
        assert_eq!(
            (session.port, session.peer_asn, session.local_asn),
            (179, 65001, 65010)
        );
        assert_eq!(
            session.router_id.to_string(),
            ip,
            "router id defaults to the node's IPv4"
        );
        assert_eq!(session.source_address.to_string(), ip);
        assert_eq!(
            (session.hold_time, session.keepalive, session.connect_retry),
            (90, 30, 5)
        );
        assert_eq!(
            (session.graceful_restart, session.restart_time),
            (false, 120)
        );
        assert_eq!(
            session.families,
            [IpFamily::V4],
            "an IPv4 peer that names no family gets IPv4 only"
        );
        assert!(session.is_ebgp());
        let announced = &routes.routes["tor"];
        assert_eq!(announced.len(), 1, "{name}");
        let attrs = &announced[&net("172.16.0.241/32")];
        assert_eq!(
            attrs.next_hop.to_string(),
            ip,
            "{name}: its own next hop (ECMP at the ToR)"
        );
        assert_eq!(attrs.origin, Origin::Igp);
        assert_eq!(attrs.local_pref, None, "eBGP carries no LOCAL_PREF");
        assert!(attrs.communities.is_empty() && attrs.large_communities.is_empty());
    }
    assert!(
        plan(&lab_nodes(), &[], &lab_policy(), &lab_pools())
            .problems
            .is_empty()
    );
}

#[test]
fn selective_peering_follows_node_labels() {
    let labelled = |n: Node| n.label("bgp-peer", "true");
    let mut nodes = vec![
        labelled(node("worker").ipv4("10.10.10.11")),
        labelled(node("worker2").ipv4("10.10.10.12")),
        node("worker3").ipv4("10.10.10.13"),
        node("worker4").ipv4("10.10.10.14"),
    ];
    let mut tor = peer("tor", "10.10.10.1", 65001);
    tor.node_selector = selector("bgp-peer", "true");
    let policy = policy(vec![tor], vec![rule("lab")]);
    let svc = service("uid-1")
        .endpoints(["worker4"])
        .ip("172.16.0.241", "lab");
    let services = [svc];

    let before = compute(&nodes, &services, &policy, &lab_pools());
    let with_session: Vec<&str> = before
        .iter()
        .filter(|(_, r)| !r.peers.is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        with_session,
        ["worker", "worker2"],
        "2 sessions for 4 nodes"
    );
    assert_eq!(
        announcers(&before, "tor", "172.16.0.241/32"),
        ["worker", "worker2"]
    );
    assert_eq!(
        before["worker3"],
        NodeRoutes::default(),
        "no peer: empty snapshot"
    );

    // Label worker3: it gains the session; nobody else changes.
    nodes[2] = labelled(nodes[2].clone());
    let after = compute(&nodes, &services, &policy, &lab_pools());
    assert_eq!(session_names(&after, "worker3"), ["tor"]);
    assert_eq!(prefixes(&after, "worker3", "tor"), ["172.16.0.241/32"]);
    for other in ["worker", "worker2", "worker4"] {
        assert_eq!(before[other], after[other], "{other} must not change");
    }

    // Unlabel worker: it loses the session.
    nodes[0].labels.remove("bgp-peer");
    let after = compute(&nodes, &services, &policy, &lab_pools());
    assert!(after["worker"].is_empty());
    assert_eq!(
        announcers(&after, "tor", "172.16.0.241/32"),
        ["worker2", "worker3"]
    );

    // A Local Service whose endpoints live only on non-peering nodes is announced nowhere:
    // the plan says so instead of staying silent.
    let local = service("uid-2")
        .local()
        .endpoints(["worker4"])
        .ip("172.16.0.242", "lab");
    let report = plan(&nodes, &[local], &policy, &lab_pools());
    assert_eq!(
        report.problems,
        [Problem::NotAnnounced {
            service: "uid-2".into(),
            ip: "172.16.0.242".parse().unwrap(),
            pool: PoolName::parse("pool", "lab").unwrap(),
        }]
    );
}

#[test]
fn local_service_is_announced_only_from_eligible_endpoint_nodes() {
    let mut nodes = lab_nodes();
    nodes.push(node("n4").ipv4("10.10.10.13").not_ready());
    let cases: [(&[&str], &[&str]); 6] = [
        (&[], &[]),
        (&["n1"], &["n1"]),
        (&["n2", "n3"], &["n2", "n3"]),
        // It follows the endpoints when they move.
        (&["n3"], &["n3"]),
        // A NotReady node does not announce, even with an endpoint.
        (&["n1", "n4"], &["n1"]),
        // An endpoint on a node Herald does not know about announces nothing.
        (&["ghost"], &[]),
    ];
    for (endpoints, expected) in cases {
        let mut svc = service("uid-1").local().ip("172.16.0.241", "lab");
        svc.nodes_with_ready_endpoints = endpoints.iter().map(|s| s.to_string()).collect();
        let out = compute(&nodes, &[svc], &lab_policy(), &lab_pools());
        assert_eq!(
            announcers(&out, "tor", "172.16.0.241/32"),
            expected,
            "endpoints {endpoints:?}"
        );
        for name in ["n1", "n2", "n3", "n4"] {
            assert_eq!(
                session_names(&out, name),
                ["tor"],
                "{name} keeps its session"
            );
        }
    }
}

#[test]
fn ineligible_nodes_keep_their_sessions_and_announce_nothing() {
    let cases: [(&str, Node, Eligibility); 4] = [
        (
            "not ready",
            node("n1").ipv4("10.10.10.10").not_ready(),
            Eligibility::NotReady,
        ),
        (
            "excluded, empty value",
            node("n1")
                .ipv4("10.10.10.10")
                .label(EXCLUDE_FROM_LB_LABEL, ""),
            Eligibility::Excluded,
        ),
        (
            "excluded, true",
            node("n1")
                .ipv4("10.10.10.10")
                .label(EXCLUDE_FROM_LB_LABEL, "true"),
            Eligibility::Excluded,
        ),
        (
            "not ready wins over excluded",
            node("n1")
                .ipv4("10.10.10.10")
                .label(EXCLUDE_FROM_LB_LABEL, "")
                .not_ready(),
            Eligibility::NotReady,
        ),
    ];
    for (case, n1, eligibility) in cases {
        let nodes = [n1, node("n2").ipv4("10.10.10.11")];
        let services = [
            service("uid-1").endpoints(["n1"]).ip("172.16.0.241", "lab"),
            service("uid-2")
                .local()
                .endpoints(["n1"])
                .ip("172.16.0.242", "lab"),
        ];
        let report = plan(&nodes, &services, &lab_policy(), &lab_pools());
        let out = &report.nodes;
        assert_eq!(report.eligibility["n1"], eligibility, "{case}");
        assert_eq!(session_names(out, "n1"), ["tor"], "{case}");
        assert!(out["n1"].routes["tor"].is_empty(), "{case}: no routes");
        assert_eq!(prefixes(out, "n2", "tor"), ["172.16.0.241/32"], "{case}");
        assert_eq!(
            report.problems.len(),
            1,
            "{case}: the Local service is announced nowhere: {:?}",
            report.problems
        );
    }
}

#[test]
fn router_id_and_source_address_rules() {
    let dual = node("n1")
        .ipv4("192.168.0.10")
        .ipv4("10.10.10.10")
        .ipv6("fd00:10::10");
    let v6_only = node("n2").ipv6("fd00:10::11");

    let out = plan(
        &[dual.clone(), v6_only.clone()],
        &[],
        &lab_policy(),
        &lab_pools(),
    );
    assert_eq!(
        out.nodes["n1"].peers[0].router_id.to_string(),
        "192.168.0.10"
    );
    assert_eq!(
        out.nodes["n1"].peers[0].source_address.to_string(),
        "192.168.0.10"
    );
    assert!(out.nodes["n2"].is_empty(), "no IPv4 address, no router id");
    assert_eq!(out.problems, [Problem::NoRouterId { node: "n2".into() }]);

    let mut input = policy_input(vec![peer("tor", "10.10.10.1", 65001)], vec![rule("lab")]);
    input.router_id = RouterIdRule::Ipv4InSubnet("10.10.10.0/24".parse().unwrap());
    input.peers[0].source_address = SourceAddressRule::InSubnet(net("10.10.10.0/24"));
    let subnet = BgpPolicy::from_input(input, None).unwrap();
    let out = plan(&[dual], &[], &subnet, &lab_pools());
    let s = &out.nodes["n1"].peers[0];
    assert_eq!(
        (s.router_id.to_string(), s.source_address.to_string()),
        ("10.10.10.10".into(), "10.10.10.10".into())
    );

    // A node without an address in the source subnet cannot hold that session.
    let elsewhere = node("n3").ipv4("192.168.0.12");
    let mut input = policy_input(vec![peer("tor", "10.10.10.1", 65001)], vec![rule("lab")]);
    input.peers[0].source_address = SourceAddressRule::InSubnet(net("10.10.10.0/24"));
    let out = plan(
        &[elsewhere],
        &[],
        &BgpPolicy::from_input(input, None).unwrap(),
        &[],
    );
    assert!(out.nodes["n3"].peers.is_empty());
    assert_eq!(
        out.problems,
        [Problem::NoSourceAddress {
            node: "n3".into(),
            peer: "tor".into()
        }]
    );
}

// ---------------------------------------------------------------- aggregation

#[test]
fn aggregation_and_the_local_guard() {
    let cluster = || service("c").endpoints(["n1"]).ip("172.16.0.241", "lab");
    let local = || {
        service("l")
            .local()
            .endpoints(["n2"])
            .ip("172.16.0.242", "lab")
    };
    type Row = (
        &'static str,
        bool,
        Option<u32>,
        Vec<ServiceFacts>,
        [&'static [&'static str]; 3],
    );
    let rows: Vec<Row> = vec![
        (
            "host routes only",
            true,
            None,
            vec![cluster()],
            [&["172.16.0.241/32"]; 3],
        ),
        (
            "aggregate and host routes",
            true,
            Some(28),
            vec![cluster()],
            [&["172.16.0.240/28", "172.16.0.241/32"]; 3],
        ),
        (
            "aggregate only",
            false,
            Some(28),
            vec![cluster()],
            [&["172.16.0.240/28"]; 3],
        ),
        (
            "aggregate wider than the pool",
            false,
            Some(24),
            vec![cluster()],
            [&["172.16.0.0/24"]; 3],
        ),
        (
            "Local only: no aggregate anywhere, host route from the endpoint node",
            false,
            Some(28),
            vec![local()],
            [&[], &["172.16.0.242/32"], &[]],
        ),
        (
            "Local with host routes and aggregation: still only the endpoint's host route",
            true,
            Some(28),
            vec![local()],
            [&[], &["172.16.0.242/32"], &[]],
        ),
        (
            "Cluster and Local, aggregate only",
            false,
            Some(28),
            vec![cluster(), local()],
            [
                &["172.16.0.240/28"],
                &["172.16.0.240/28", "172.16.0.242/32"],
                &["172.16.0.240/28"],
            ],
        ),
        (
            "Cluster and Local, aggregate and host routes",
            true,
            Some(28),
            vec![cluster(), local()],
            [
                &["172.16.0.240/28", "172.16.0.241/32"],
                &["172.16.0.240/28", "172.16.0.241/32", "172.16.0.242/32"],
                &["172.16.0.240/28", "172.16.0.241/32"],
            ],
        ),
        (
            "aggregation /32 is the host route",
            false,
            Some(32),
            vec![cluster()],
            [&["172.16.0.241/32"]; 3],
        ),
    ];
    for (case, host_routes, aggregation, services, expected) in rows {
        let mut r = rule("lab");
        r.host_routes = Some(host_routes);
        r.aggregation_length_v4 = aggregation;
        let policy = policy(vec![peer("tor", "10.10.10.1", 65001)], vec![r]);
        let out = compute(&lab_nodes(), &services, &policy, &lab_pools());
        for (name, want) in ["n1", "n2", "n3"].into_iter().zip(expected) {
            assert_eq!(prefixes(&out, name, "tor"), want, "{case}: {name}");
        }
    }
}

#[test]
fn pool_aggregation_applies_when_the_rule_sets_none() {
    let mut r = rule("lab");
    r.host_routes = Some(false);
    let policy = policy(vec![peer("tor", "10.10.10.1", 65001)], vec![r.clone()]);
    let pools = [pool("lab", "172.16.0.240/28", 28)];
    let svc = service("c").ip("172.16.0.241", "lab");
    let out = compute(&lab_nodes(), std::slice::from_ref(&svc), &policy, &pools);
    assert_eq!(prefixes(&out, "n1", "tor"), ["172.16.0.240/28"]);
    // The rule's own length wins over the pool's.
    r.aggregation_length_v4 = Some(24);
    let policy = crate::tests::policy(vec![peer("tor", "10.10.10.1", 65001)], vec![r]);
    let out = compute(&lab_nodes(), &[svc], &policy, &pools);
    assert_eq!(prefixes(&out, "n1", "tor"), ["172.16.0.0/24"]);
}

#[test]
fn cluster_service_without_endpoints_is_announced_unless_the_rule_withdraws() {
    let orphan = service("uid-1").ip("172.16.0.241", "lab");
    let out = compute(
        &lab_nodes(),
        std::slice::from_ref(&orphan),
        &lab_policy(),
        &lab_pools(),
    );
    assert_eq!(
        announcers(&out, "tor", "172.16.0.241/32"),
        ["n1", "n2", "n3"]
    );

    let mut r = rule("lab");
    r.withdraw_without_endpoints = true;
    r.aggregation_length_v4 = Some(28);
    let withdrawing = policy(vec![peer("tor", "10.10.10.1", 65001)], vec![r]);
    let out = compute(
        &lab_nodes(),
        std::slice::from_ref(&orphan),
        &withdrawing,
        &lab_pools(),
    );
    assert!(out.values().all(|n| n.routes["tor"].is_empty()), "{out:?}");
    // As soon as one endpoint is ready anywhere, every node announces again.
    let served = orphan.endpoints(["n3"]);
    let out = compute(&lab_nodes(), &[served], &withdrawing, &lab_pools());
    assert_eq!(
        prefixes(&out, "n1", "tor"),
        ["172.16.0.240/28", "172.16.0.241/32"]
    );
}

#[test]
fn no_rule_for_the_pool_means_no_route() {
    let svc = service("uid-1").endpoints(["n1"]).ip("10.99.0.5", "other");
    let report = plan(&lab_nodes(), &[svc], &lab_policy(), &lab_pools());
    assert!(report.nodes.values().all(|n| n.routes["tor"].is_empty()));
    assert!(matches!(
        report.problems.as_slice(),
        [Problem::NotAnnounced { .. }]
    ));
    // A rule without a pool covers every pool.
    let all = policy(
        vec![peer("tor", "10.10.10.1", 65001)],
        vec![AdvertisementInput::default()],
    );
    let svc = service("uid-1").ip("10.99.0.5", "other");
    let out = compute(&lab_nodes(), &[svc], &all, &lab_pools());
    assert_eq!(prefixes(&out, "n2", "tor"), ["10.99.0.5/32"]);
}

// ---------------------------------------------------------------- attributes

#[test]
fn communities_union_and_local_pref_precedence() {
    let mut first = rule("lab");
    first.communities = vec!["65000:100".into()];
    first.large_communities = vec!["65010:1:2".into()];
    first.local_pref = Some(200);
    first.med = Some(10);
    let mut second = AdvertisementInput {
        communities: vec!["65000:200".into(), "no-export".into(), "65000:100".into()],
        local_pref: Some(300),
        med: Some(20),
        ..Default::default()
    };
    second.large_communities = vec!["65010:1:2".into(), "65010:0:9".into()];
    let mut only_rr = rule("lab");
    only_rr.peers = vec!["rr".into()];
    only_rr.communities = vec!["1:1".into()];
    let mut only_n2 = rule("lab");
    only_n2.node_selector = selector("rack", "b");
    only_n2.communities = vec!["2:2".into()];
    let policy = policy(
        vec![
            peer("tor", "10.10.10.1", 65001),
            // iBGP: a route reflector in the cluster's own AS.
            peer("rr", "10.10.10.2", 65010),
        ],
        vec![first, second, only_rr, only_n2],
    );
    let nodes = [
        node("n1").ipv4("10.10.10.10"),
        node("n2").ipv4("10.10.10.11").label("rack", "b"),
    ];
    let svc = service("uid-1").ip("172.16.0.241", "lab");
    let out = compute(&nodes, &[svc], &policy, &lab_pools());
    let attrs = |n: &str, p: &str| out[n].routes[p][&net("172.16.0.241/32")].clone();
    let shown = |a: &RouteAttrs| {
        a.communities
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };

    let tor = attrs("n1", "tor");
    assert_eq!(shown(&tor), ["65000:100", "65000:200", "65535:65281"]);
    assert_eq!(tor.local_pref, None, "eBGP: no LOCAL_PREF");
    assert_eq!(tor.med, Some(10), "MED: first rule that sets it");
    let large: Vec<String> = tor
        .large_communities
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(large, ["65010:0:9", "65010:1:2"]);

    let rr = attrs("n1", "rr");
    assert_eq!(shown(&rr), ["1:1", "65000:100", "65000:200", "65535:65281"]);
    assert_eq!(
        rr.local_pref,
        Some(200),
        "LOCAL_PREF: first rule that sets it"
    );
    assert!(
        !out["n1"]
            .peers
            .iter()
            .find(|p| p.name == "rr")
            .unwrap()
            .is_ebgp()
    );

    assert_eq!(
        shown(&attrs("n2", "tor")),
        ["2:2", "65000:100", "65000:200", "65535:65281"]
    );
}

// ---------------------------------------------------------------- IPv6

fn v6_nodes() -> Vec<Node> {
    vec![
        node("n1").ipv4("10.10.10.10").ipv6("fd00:10::10"),
        node("n2").ipv4("10.10.10.11").ipv6("fd00:10::11"),
        node("n3").ipv4("10.10.10.12"),
    ]
}

#[test]
fn ipv6_host_routes_and_next_hops() {
    // IPv6 over an IPv4 session only when the peer asks for it (MP-BGP).
    let mut tor = peer("tor", "10.10.10.1", 65001);
    tor.families = vec![IpFamily::V4, IpFamily::V6];
    let policy = policy(
        vec![
            tor,
            peer("tor6", "fd00:10::1", 65001),
            peer("tor-v4", "10.10.10.2", 65001),
        ],
        vec![AdvertisementInput::default()],
    );
    let svc = service("uid-1").ip("fd00:172:16::241", "lab6");
    let report = plan(&v6_nodes(), &[svc], &policy, &[]);
    let out = &report.nodes;
    let host = net("fd00:172:16::241/128");
    for (name, v6) in [("n1", "fd00:10::10"), ("n2", "fd00:10::11")] {
        assert_eq!(session_names(out, name), ["tor", "tor-v4", "tor6"]);
        assert!(
            out[name].routes["tor-v4"].is_empty(),
            "an IPv4 peer that names no family gets no IPv6 routes"
        );
        assert_eq!(
            out[name].routes["tor6"][&host].next_hop.to_string(),
            v6,
            "{name} over IPv6"
        );
        // Over the IPv4 session (MP-BGP), the next hop is still the node's IPv6 address.
        assert_eq!(
            out[name].routes["tor"][&host].next_hop.to_string(),
            v6,
            "{name} over IPv4"
        );
    }
    // n3 has no IPv6 address: no IPv6 session, and the /128 is skipped on the IPv4 one.
    assert_eq!(session_names(out, "n3"), ["tor", "tor-v4"]);
    assert!(out["n3"].routes["tor"].is_empty());
    assert_eq!(
        report.problems,
        [
            Problem::NoSourceAddress {
                node: "n3".into(),
                peer: "tor6".into()
            },
            Problem::NoNextHop {
                node: "n3".into(),
                peer: "tor".into(),
                prefix: host
            },
        ]
    );
}

#[test]
fn dual_stack_service_on_per_family_sessions() {
    let mut tor = peer("tor", "10.10.10.1", 65001);
    tor.families = vec![IpFamily::V4];
    let mut tor6 = peer("tor6", "fd00:10::1", 65001);
    tor6.families = vec![IpFamily::V6];
    let mut r = AdvertisementInput {
        aggregation_length_v6: Some(120),
        ..Default::default()
    };
    r.host_routes = Some(true);
    let policy = policy(vec![tor, tor6], vec![r]);
    let svc = service("uid-1")
        .ip("172.16.0.241", "lab")
        .ip("fd00:172:16::241", "lab6");
    let out = compute(&v6_nodes(), &[svc], &policy, &[]);
    for (name, v4, v6) in [
        ("n1", "10.10.10.10", "fd00:10::10"),
        ("n2", "10.10.10.11", "fd00:10::11"),
    ] {
        assert_eq!(prefixes(&out, name, "tor"), ["172.16.0.241/32"], "{name}");
        assert_eq!(
            prefixes(&out, name, "tor6"),
            ["fd00:172:16::200/120", "fd00:172:16::241/128"],
            "{name}"
        );
        assert_eq!(
            out[name].routes["tor"][&net("172.16.0.241/32")]
                .next_hop
                .to_string(),
            v4
        );
        assert_eq!(
            out[name].routes["tor6"][&net("fd00:172:16::241/128")]
                .next_hop
                .to_string(),
            v6
        );
    }
    assert_eq!(prefixes(&out, "n3", "tor"), ["172.16.0.241/32"]);
}

// ---------------------------------------------------------------- validation

#[test]
fn policy_validation_names_field_and_value() {
    type Mutate = fn(&mut BgpPolicyInput);
    let cases: Vec<(&str, Mutate, &str, &str)> = vec![
        ("local ASN 0", |p| p.local_asn = 0, "local_asn", "0"),
        (
            "local AS_TRANS",
            |p| p.local_asn = 23456,
            "local_asn",
            "23456",
        ),
        ("peer ASN 0", |p| p.peers[0].asn = 0, "peers[0].asn", "0"),
        (
            "peer AS_TRANS",
            |p| p.peers[0].asn = 23456,
            "peers[0].asn",
            "23456",
        ),
        (
            "peer local ASN",
            |p| p.peers[0].local_asn = Some(0),
            "peers[0].local_asn",
            "0",
        ),
        (
            "bad address",
            |p| p.peers[0].address = "10.0.0.300".into(),
            "peers[0].address",
            "10.0.0.300",
        ),
        (
            "unspecified address",
            |p| p.peers[0].address = "0.0.0.0".into(),
            "peers[0].address",
            "0.0.0.0",
        ),
        (
            "bad name",
            |p| p.peers[0].name = "Bad_Name".into(),
            "peers[0].name",
            "Bad_Name",
        ),
        (
            "port 0",
            |p| p.peers[0].port = Some(0),
            "peers[0].port",
            "0",
        ),
        (
            "port too big",
            |p| p.peers[0].port = Some(70000),
            "peers[0].port",
            "70000",
        ),
        (
            "hold 1",
            |p| p.peers[0].hold_time = Some(1),
            "peers[0].hold_time",
            "1",
        ),
        (
            "hold 2",
            |p| p.peers[0].hold_time = Some(2),
            "peers[0].hold_time",
            "2",
        ),
        (
            "hold too big",
            |p| p.peers[0].hold_time = Some(65536),
            "peers[0].hold_time",
            "65536",
        ),
        (
            "keepalive = hold",
            |p| p.peers[0].keepalive = Some(90),
            "peers[0].keepalive",
            "90",
        ),
        (
            "keepalive 0 with hold",
            |p| p.peers[0].keepalive = Some(0),
            "peers[0].keepalive",
            "0",
        ),
        (
            "keepalive without hold",
            |p| {
                p.peers[0].hold_time = Some(0);
                p.peers[0].keepalive = Some(5);
            },
            "peers[0].keepalive",
            "5",
        ),
        (
            "connect retry 0",
            |p| p.peers[0].connect_retry = Some(0),
            "peers[0].connect_retry",
            "0",
        ),
        (
            "restart time",
            |p| p.peers[0].restart_time = Some(4096),
            "peers[0].restart_time",
            "4096",
        ),
        (
            "bfd interval below 10 ms",
            |p| {
                p.peers[0].bfd = Some(BfdInput {
                    min_rx_ms: Some(5),
                    ..Default::default()
                })
            },
            "peers[0].bfd.min_rx_ms",
            "5",
        ),
        (
            "bfd interval above a minute",
            |p| {
                p.peers[0].bfd = Some(BfdInput {
                    min_tx_ms: Some(60_001),
                    ..Default::default()
                })
            },
            "peers[0].bfd.min_tx_ms",
            "60001",
        ),
        (
            "bfd multiplier 256",
            |p| {
                p.peers[0].bfd = Some(BfdInput {
                    multiplier: Some(256),
                    ..Default::default()
                })
            },
            "peers[0].bfd.multiplier",
            "256",
        ),
        (
            "ttl 0",
            |p| p.peers[0].multihop_ttl = Some(0),
            "peers[0].multihop_ttl",
            "0",
        ),
        (
            "ttl 256",
            |p| p.peers[0].multihop_ttl = Some(256),
            "peers[0].multihop_ttl",
            "256",
        ),
        (
            "md5 too long, value not echoed",
            |p| p.peers[0].md5_password = Some("x".repeat(81)),
            "peers[0].md5_password",
            "<81 bytes>",
        ),
        (
            "md5 empty",
            |p| p.peers[0].md5_password = Some(String::new()),
            "peers[0].md5_password",
            "<0 bytes>",
        ),
        (
            "source subnet of the wrong family",
            |p| {
                p.peers[0].source_address =
                    SourceAddressRule::InSubnet("fd00::/64".parse().unwrap())
            },
            "peers[0].source_address",
            "fd00::/64",
        ),
        (
            "bad node selector",
            |p| p.peers[0].node_selector = selector("-bad", "x"),
            "peers[0].node_selector.match_labels",
            "-bad",
        ),
        (
            "duplicate name",
            |p| p.peers.push(peer("tor", "10.10.10.2", 65001)),
            "peers[1].name",
            "tor",
        ),
        (
            "duplicate address and port",
            |p| p.peers.push(peer("tor-b", "10.10.10.1", 65002)),
            "peers[1].address",
            "10.10.10.1:179",
        ),
        (
            "bad community",
            |p| p.advertisements[0].communities = vec!["65536:1".into()],
            "advertisements[0].communities[0]",
            "65536:1",
        ),
        (
            "bad second community",
            |p| p.advertisements[0].communities = vec!["1:1".into(), "nope".into()],
            "advertisements[0].communities[1]",
            "nope",
        ),
        (
            "bad large community",
            |p| p.advertisements[0].large_communities = vec!["1:2".into()],
            "advertisements[0].large_communities[0]",
            "1:2",
        ),
        (
            "aggregation v4 33",
            |p| p.advertisements[0].aggregation_length_v4 = Some(33),
            "advertisements[0].aggregation_length_v4",
            "33",
        ),
        (
            "aggregation v4 0",
            |p| p.advertisements[0].aggregation_length_v4 = Some(0),
            "advertisements[0].aggregation_length_v4",
            "0",
        ),
        (
            "aggregation v6 129",
            |p| p.advertisements[0].aggregation_length_v6 = Some(129),
            "advertisements[0].aggregation_length_v6",
            "129",
        ),
        (
            "unknown pool",
            |p| p.advertisements[0].pool = Some("nope".into()),
            "advertisements[0].pool",
            "nope",
        ),
        (
            "malformed pool",
            |p| p.advertisements[0].pool = Some("Lab!".into()),
            "advertisements[0].pool",
            "Lab!",
        ),
        (
            "unknown peer",
            |p| p.advertisements[0].peers = vec!["ghost".into()],
            "advertisements[0].peers[0]",
            "ghost",
        ),
        (
            "local_pref for eBGP peers only",
            |p| {
                p.advertisements[0].peers = vec!["tor".into()];
                p.advertisements[0].local_pref = Some(200);
            },
            "advertisements[0].local_pref",
            "200",
        ),
    ];
    let known = [PoolName::parse("pool", "lab").unwrap()];
    let base = || policy_input(vec![peer("tor", "10.10.10.1", 65001)], vec![rule("lab")]);
    assert!(BgpPolicy::from_input(base(), Some(&known)).is_ok());
    for (case, mutate, field, value) in cases {
        let mut input = base();
        mutate(&mut input);
        let err = BgpPolicy::from_input(input, Some(&known)).expect_err(case);
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            (field, value),
            "{case}: {err}"
        );
        assert!(!err.reason.is_empty(), "{case}");
    }
}

#[test]
fn policy_defaults_and_accepted_edge_values() {
    let mut input = policy_input(
        vec![
            peer("frr", "127.0.0.1", 65001),
            // Two ToRs on one loopback address, told apart by port (the e2e setup).
            PeerInput {
                port: Some(10179),
                ..peer("gobgp", "127.0.0.1", 65002)
            },
        ],
        vec![rule("lab")],
    );
    input.local_asn = u32::MAX;
    input.peers[0].hold_time = Some(0);
    input.peers[1].hold_time = Some(3);
    input.peers[1].md5_password = Some("s3cret".into());
    input.advertisements[0].communities = vec!["1:1".into(), "1:1".into()];
    let p = BgpPolicy::from_input(input, None).unwrap();
    assert_eq!((p.peers[0].hold_time, p.peers[0].keepalive), (0, 0));
    assert_eq!(
        (p.peers[1].hold_time, p.peers[1].keepalive, p.peers[1].port),
        (3, 1, 10179)
    );
    assert_eq!(p.peers[0].port, 179);
    assert_eq!(
        p.advertisements[0].communities.len(),
        1,
        "duplicates collapse"
    );
    assert!(p.advertisements[0].host_routes, "host routes default to on");
    assert!(
        !format!("{p:?}").contains("s3cret"),
        "passwords never print"
    );
    assert_eq!(
        p.peers[1].md5_password.as_ref().map(Password::expose),
        Some("s3cret")
    );
}

#[test]
fn node_and_service_validation_names_field_and_value() {
    let cases: [(Node, &str, &str); 5] = [
        (node("N1"), "node.name", "N1"),
        (node("n1").ipv4("0.0.0.0"), "node.addresses[0]", "0.0.0.0"),
        (
            node("n1").ipv4("10.0.0.1").ipv4("10.0.0.1"),
            "node.addresses[1]",
            "10.0.0.1",
        ),
        (node("n1").label("bad key!", "x"), "node.labels", "bad key!"),
        (node("n1").label("ok", "-bad"), "node.labels[ok]", "-bad"),
    ];
    assert_eq!(
        node("k01-worker.lab")
            .ipv4("10.0.0.1")
            .ipv6("fd00::1")
            .validate(),
        Ok(())
    );
    for (n, field, value) in cases {
        let err = n.validate().expect_err(field);
        assert_eq!((err.field.as_str(), err.value.as_str()), (field, value));
    }
    assert_eq!(
        service("uid-1").ip("172.16.0.241", "lab").validate(),
        Ok(())
    );
    let dup = service("uid-1")
        .ip("172.16.0.241", "lab")
        .ip("172.16.0.241", "lab");
    assert_eq!(dup.validate().map_err(|e| e.field), Err("ips[1]".into()));
    let bad_ep = service("uid-1").endpoints(["Bad"]);
    assert_eq!(
        bad_ep.validate().map_err(|e| e.field),
        Err("nodes_with_ready_endpoints".into())
    );
}

// ---------------------------------------------------------------- snapshots

#[test]
fn diff_summarises_what_changed() {
    let nodes = lab_nodes();
    let old_services = [
        service("a").ip("172.16.0.241", "lab"),
        service("b").ip("172.16.0.242", "lab"),
    ];
    let old = compute(&nodes, &old_services, &lab_policy(), &lab_pools());
    let mut r = rule("lab");
    r.communities = vec!["65000:1".into()];
    let mut tor = peer("tor", "10.10.10.1", 65001);
    tor.hold_time = Some(30);
    let new_policy = policy(vec![tor, peer("tor2", "10.10.10.2", 65002)], vec![r]);
    let new_services = [
        service("a").ip("172.16.0.241", "lab"),
        service("c").ip("172.16.0.243", "lab"),
    ];
    let new = compute(&nodes, &new_services, &new_policy, &lab_pools());
    let d = diff(&old["n1"], &new["n1"]);
    assert_eq!(d.peers_added, ["tor2"]);
    assert_eq!(d.peers_changed, ["tor"]);
    assert!(d.peers_removed.is_empty());
    assert_eq!(
        d.routes["tor"],
        PeerRoutesDiff {
            added: vec![net("172.16.0.243/32")],
            removed: vec![net("172.16.0.242/32")],
            changed: vec![net("172.16.0.241/32")],
        }
    );
    assert_eq!(d.routes["tor2"].added.len(), 2);
    assert_eq!(
        d.to_string(),
        "peers +tor2 ~tor; tor: +1 -1 ~1; tor2: +2 -0 ~0"
    );

    let back = diff(&new["n1"], &NodeRoutes::default());
    assert_eq!(back.peers_removed, ["tor", "tor2"]);
    assert_eq!(back.routes["tor"].removed.len(), 2);
    assert!(diff(&old["n1"], &old["n1"]).is_empty());
    assert_eq!(diff(&old["n1"], &old["n1"]).to_string(), "no change");
}

#[test]
fn snapshots_round_trip_through_serde() {
    let svc = service("uid-1").ip("172.16.0.241", "lab");
    let out = compute(&lab_nodes(), &[svc], &lab_policy(), &lab_pools());
    let json = serde_json::to_string(&out["n1"]).unwrap();
    assert!(json.contains("\"172.16.0.241/32\""), "{json}");
    let back: NodeRoutes = serde_json::from_str(&json).unwrap();
    assert_eq!(back, out["n1"]);
    assert_eq!(node_digest(&back), node_digest(&out["n1"]));
}

/// A small deterministic generator, so the property test needs no extra dependency and
/// a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_cluster(rng: &mut Rng) -> (Vec<Node>, Vec<ServiceFacts>, BgpPolicy) {
    let nodes: Vec<Node> = (0..8)
        .map(|i| {
            let mut n = node(&format!("n{i}")).ipv4(&format!("10.10.10.{}", 10 + i));
            if rng.chance(50) {
                n = n.ipv6(&format!("fd00:10::{:x}", 0x10 + i));
            }
            if rng.chance(50) {
                n = n.label("bgp-peer", "true");
            }
            if rng.chance(30) {
                n = n.label("rack", "b");
            }
            if rng.chance(10) {
                n = n.label(EXCLUDE_FROM_LB_LABEL, "");
            }
            n.ready = rng.chance(85);
            n
        })
        .collect();
    let services: Vec<ServiceFacts> = (0..20)
        .map(|i| {
            let mut s =
                service(&format!("uid-{i}")).ip(&format!("172.16.0.{}", 240 + i % 16), "lab");
            if rng.chance(30) {
                s = s.ip(&format!("fd00:172:16::{:x}", 0x240 + i), "lab6");
            }
            if rng.chance(40) {
                s = s.local();
            }
            s.nodes_with_ready_endpoints = (0..8)
                .filter(|_| rng.chance(25))
                .map(|n| format!("n{n}"))
                .collect();
            s
        })
        .collect();
    let mut tor = peer("tor", "10.10.10.1", 65001);
    tor.node_selector = selector("bgp-peer", "true");
    let rr = peer("rr", "fd00:10::1", 65010);
    let mut agg = rule("lab");
    agg.host_routes = Some(rng.chance(50));
    agg.aggregation_length_v4 = Some(28);
    agg.communities = vec!["65000:1".into()];
    let mut rack_b = AdvertisementInput {
        node_selector: selector("rack", "b"),
        local_pref: Some(150),
        ..Default::default()
    };
    rack_b.communities = vec!["65000:2".into()];
    let policy = policy(vec![tor, rr], vec![agg, rack_b]);
    (nodes, services, policy)
}

/// Every route of a session that the same rules put there holds the same attributes, one
/// `Arc` for all: built whole, and patched in change by change (which finds a neighbour's to
/// share), so churn adds no copies.
#[test]
fn routes_share_their_attributes_built_whole_and_patched() {
    let services: Vec<ServiceFacts> = (1..=8)
        .map(|i| service(&format!("uid-{i}")).ip(&format!("172.16.0.{}", 240 + i), "lab"))
        .collect();
    let mut state = RouteState::from_inputs(lab_nodes(), services, Some(lab_policy()), lab_pools());
    let distinct = |state: &RouteState, node: &str| {
        let set = &state.node_routes(node).unwrap().routes["tor"];
        let mut seen: Vec<&Arc<RouteAttrs>> = Vec::new();
        for attrs in set.values() {
            if !seen.iter().any(|s| Arc::ptr_eq(s, attrs)) {
                seen.push(attrs);
            }
        }
        (set.len(), seen.len())
    };
    assert_eq!(distinct(&state, "n1"), (8, 1));
    for i in 9..=14 {
        let svc = service(&format!("uid-{i}")).ip(&format!("172.16.0.{}", 240 + i), "lab");
        assert!(!state.upsert_service(svc).is_empty());
    }
    for node in ["n1", "n2", "n3"] {
        assert_eq!(distinct(&state, node), (14, 1), "{node}");
    }
    assert_eq!(
        state.plan(),
        plan(
            &lab_nodes(),
            &state.services().cloned().collect::<Vec<_>>(),
            &lab_policy(),
            &lab_pools(),
        )
    );
}

/// A packed map is the map of its entries, whatever their number.
#[test]
fn a_packed_map_holds_its_entries() {
    for n in [0_u32, 1, 2, 15, 16, 17, 33, 1_000, 4_099] {
        let entries: Vec<(u32, u32)> = (0..n).map(|k| (k * 3, k)).collect();
        let map = packed(entries.clone());
        assert_eq!(map.len(), entries.len());
        assert!(
            map.iter()
                .map(|(k, v)| (*k, *v))
                .eq(entries.iter().copied()),
            "{n}"
        );
        assert_eq!(map, entries.into_iter().collect::<imbl::OrdMap<_, _>>());
    }
}

#[test]
fn computation_is_deterministic_and_local_to_each_node() {
    let pools = lab_pools();
    let mut announced = 0;
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (mut nodes, mut services, policy) = random_cluster(&mut rng);
        let first = plan(&nodes, &services, &policy, &pools);
        announced += first
            .nodes
            .values()
            .map(|n| n.prefixes().len())
            .sum::<usize>();
        assert_eq!(
            first,
            plan(&nodes, &services, &policy, &pools),
            "seed {seed}: twice"
        );
        // Input order does not matter.
        nodes.reverse();
        services.reverse();
        assert_eq!(
            first,
            plan(&nodes, &services, &policy, &pools),
            "seed {seed}: reversed"
        );
        // One node's routes are computed from that node alone.
        for n in &nodes {
            assert_eq!(
                compute_node(n, &services, &policy, &pools).0,
                first.nodes[&n.name],
                "seed {seed}: {}",
                n.name
            );
        }
        // Relabel one node: only its own snapshot may change.
        let k = usize::try_from(rng.below(nodes.len() as u64)).unwrap();
        let name = nodes[k].name.clone();
        if nodes[k].labels.remove("bgp-peer").is_none() {
            nodes[k].labels.insert("bgp-peer".into(), "true".into());
        }
        let after = compute(&nodes, &services, &policy, &pools);
        for (other, routes) in &after {
            if *other != name {
                assert_eq!(routes, &first.nodes[other], "seed {seed}: {other} changed");
                assert_eq!(node_digest(routes), node_digest(&first.nodes[other]));
            }
        }
        let toggled_has_tor = after[&name].peers.iter().any(|p| p.name == "tor");
        let had_tor = first.nodes[&name].peers.iter().any(|p| p.name == "tor");
        assert_ne!(toggled_has_tor, had_tor, "seed {seed}: {name} relabelled");
        if after[&name] != first.nodes[&name] {
            assert_ne!(node_digest(&after[&name]), node_digest(&first.nodes[&name]));
        }
    }
    assert!(
        announced > 100,
        "the generated clusters announce routes ({announced})"
    );
}

#[test]
fn bfd_is_off_unless_asked_and_defaults_to_300_ms_times_3() {
    let mut with = peer("tor", "10.0.0.1", 65001);
    with.bfd = Some(BfdInput {
        min_tx_ms: Some(50),
        multihop: true,
        ..Default::default()
    });
    let p = policy(
        vec![peer("plain", "10.0.0.2", 65001), with],
        vec![rule("lab")],
    );
    assert_eq!(p.peers[0].bfd, None);
    assert_eq!(
        p.peers[1].bfd,
        Some(BfdSettings {
            min_rx_ms: 300,
            min_tx_ms: 50,
            multiplier: 3,
            multihop: true,
        })
    );
}

#[test]
fn a_policy_stored_before_bfd_existed_still_reads() {
    let p = policy(vec![peer("tor", "10.0.0.1", 65001)], vec![rule("lab")]);
    let mut json = serde_json::to_value(&p).unwrap();
    json["peers"][0].as_object_mut().unwrap().remove("bfd");
    let back: BgpPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(back, p);
}

// ---------------------------------------------------------------- incremental vs full

mod incremental {
    use proptest::prelude::*;

    use super::*;

    /// One change to the inputs, drawn from small domains so that changes collide: the same
    /// Service moves, the same node flips, aggregates are shared.
    #[derive(Debug, Clone)]
    enum Change {
        Service {
            uid: u8,
            local: bool,
            endpoints: Vec<u8>,
            ips: Vec<(u8, bool)>,
        },
        RemoveService(u8),
        Node {
            name: u8,
            peers: bool,
            ready: bool,
            excluded: bool,
            rack: bool,
            v6: bool,
        },
        RemoveNode(u8),
        Policy(u8),
        Pools(u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0..6u8, any::<bool>(), prop::collection::vec(0..5u8, 0..3),
                  prop::collection::vec((0..12u8, any::<bool>()), 0..3))
                .prop_map(|(uid, local, endpoints, ips)| Change::Service { uid, local, endpoints, ips }),
            1 => (0..6u8).prop_map(Change::RemoveService),
            3 => (0..5u8, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(name, peers, ready, excluded, rack, v6)| Change::Node { name, peers, ready, excluded, rack, v6 }),
            1 => (0..5u8).prop_map(Change::RemoveNode),
            1 => (0..4u8).prop_map(Change::Policy),
            1 => (0..3u8).prop_map(Change::Pools),
        ]
    }

    fn node_name(i: u8) -> String {
        format!("n{i}")
    }

    /// Policies that exercise host routes off, aggregates, per-rack rules, per-peer rules,
    /// withdraw without endpoints, attributes from several rules, and an IPv6 peer that
    /// needs a node IPv6 address as next hop for IPv4 prefixes.
    fn policy_variant(v: u8) -> Option<BgpPolicy> {
        let tor = PeerInput {
            node_selector: selector("bgp-peer", "true"),
            ..peer("tor", "127.0.0.1", 65000)
        };
        let tor6 = PeerInput {
            families: vec![IpFamily::V4, IpFamily::V6],
            ..peer("tor6", "::1", 65010)
        };
        let mut all = AdvertisementInput {
            communities: vec!["65000:1".into()],
            med: Some(10),
            ..Default::default()
        };
        let mut rack = AdvertisementInput {
            node_selector: selector("rack", "a"),
            communities: vec!["65000:2".into()],
            local_pref: Some(200),
            aggregation_length_v4: Some(30),
            ..rule("lab")
        };
        match v {
            0 => None,
            1 => Some(policy(vec![tor], vec![all])),
            2 => {
                all.host_routes = Some(false);
                all.withdraw_without_endpoints = true;
                Some(policy(vec![tor, tor6], vec![all, rack]))
            }
            _ => {
                rack.peers = vec!["tor6".into()];
                all.aggregation_length_v4 = Some(29);
                Some(policy(vec![tor, tor6], vec![rack, all, rule("other")]))
            }
        }
    }

    fn pools_variant(v: u8) -> Vec<PoolSpec> {
        match v {
            0 => vec![],
            1 => vec![pool("lab", "172.16.0.0/28", 0)],
            _ => vec![
                pool("lab", "172.16.0.0/28", 31),
                pool("other", "172.16.0.0/28", 28),
            ],
        }
    }

    struct Model {
        nodes: BTreeMap<String, Node>,
        services: BTreeMap<String, ServiceFacts>,
        policy: Option<BgpPolicy>,
        pools: Vec<PoolSpec>,
    }

    impl Model {
        /// No nodes, Services, policy or pools, as a new `RouteState` holds.
        fn empty() -> Self {
            Self {
                nodes: BTreeMap::new(),
                services: BTreeMap::new(),
                policy: None,
                pools: vec![],
            }
        }

        fn full(&self) -> Plan {
            let nodes: Vec<Node> = self.nodes.values().cloned().collect();
            let services: Vec<ServiceFacts> = self.services.values().cloned().collect();
            match &self.policy {
                Some(policy) => plan(&nodes, &services, policy, &self.pools),
                None => Plan {
                    nodes: nodes
                        .iter()
                        .map(|n| (n.name.clone(), NodeRoutes::default()))
                        .collect(),
                    ..Plan::default()
                },
            }
        }
    }

    /// For a change of one Service: its owner uid and its facts after the change (`None`:
    /// removed).
    fn service_change(change: &Change) -> Option<(String, Option<ServiceFacts>)> {
        match change {
            Change::Service {
                uid,
                local,
                endpoints,
                ips,
            } => {
                let mut facts = service(&format!("u{uid}"));
                if *local {
                    facts = facts.local();
                }
                facts.nodes_with_ready_endpoints =
                    endpoints.iter().map(|n| node_name(*n)).collect();
                for (host, other_pool) in ips {
                    let ip = format!("172.16.0.{host}");
                    if facts.ips.iter().all(|a| a.ip.to_string() != ip) {
                        facts = facts.ip(&ip, if *other_pool { "other" } else { "lab" });
                    }
                }
                Some((facts.owner.uid.clone(), Some(facts)))
            }
            Change::RemoveService(uid) => Some((format!("u{uid}"), None)),
            _ => None,
        }
    }

    fn apply(state: &mut RouteState, model: &mut Model, change: &Change) -> BTreeSet<String> {
        match change {
            Change::Service { .. } | Change::RemoveService(_) => {
                match service_change(change).expect("a Service change") {
                    (_, Some(facts)) => {
                        model
                            .services
                            .insert(facts.owner.uid.clone(), facts.clone());
                        state.upsert_service(facts)
                    }
                    (uid, None) => {
                        model.services.remove(&uid);
                        state.remove_service(&uid)
                    }
                }
            }
            Change::Node {
                name,
                peers,
                ready,
                excluded,
                rack,
                v6,
            } => {
                let mut n = node(&node_name(*name)).ipv4(&format!("10.0.0.{}", name + 1));
                if *v6 {
                    n = n.ipv6(&format!("fd00::{}", name + 1));
                }
                if *peers {
                    n = n.label("bgp-peer", "true");
                }
                if *rack {
                    n = n.label("rack", "a");
                }
                if *excluded {
                    n = n.label(EXCLUDE_FROM_LB_LABEL, "");
                }
                if !*ready {
                    n = n.not_ready();
                }
                model.nodes.insert(n.name.clone(), n.clone());
                state.upsert_node(n)
            }
            Change::RemoveNode(name) => {
                model.nodes.remove(&node_name(*name));
                state.remove_node(&node_name(*name))
            }
            Change::Policy(v) => {
                model.policy = policy_variant(*v);
                state.set_policy(policy_variant(*v))
            }
            Change::Pools(v) => {
                model.pools = pools_variant(*v);
                state.set_pools(pools_variant(*v))
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// After every change the incremental plan equals a full one, and the nodes it
        /// says changed are exactly the nodes whose set (or presence) changed.
        #[test]
        fn equals_a_full_plan_after_every_change(changes in prop::collection::vec(change(), 1..40)) {
            let mut state = RouteState::new();
            let mut model = Model::empty();
            let mut before = model.full();
            for change in &changes {
                let reported = apply(&mut state, &mut model, change);
                let full = model.full();
                prop_assert_eq!(&state.plan(), &full, "after {:?}", change);
                let names: BTreeSet<&String> = before.nodes.keys().chain(full.nodes.keys()).collect();
                let changed: BTreeSet<String> = names
                    .into_iter()
                    .filter(|n| before.nodes.get(*n) != full.nodes.get(*n))
                    .cloned()
                    .collect();
                // A node may be reported for a problem-only change; never missed.
                prop_assert!(changed.is_subset(&reported), "after {:?}: changed {:?}, reported {:?}", change, changed, reported);
                before = full;
            }
        }
    }

    /// Deltas a subscriber may have queued before it counts as fallen behind.
    const QUEUE: usize = 3;

    /// One node's subscriber: the set it holds, the deltas on their way to it, and
    /// whether it fell behind (a delta did not fit), so it takes the current set whole.
    #[derive(Default)]
    struct Subscriber {
        held: Option<NodeRoutes>,
        queue: Vec<(RoutesDelta, Vec<PeerSession>)>,
        behind: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A subscriber that takes a node's first set whole and then applies, in order,
        /// the delta made between each published set and the next holds the full plan's
        /// set whenever its queue is delivered; one whose queue overflows takes the
        /// current set whole instead (a resync) and holds it too. Applying each delta
        /// twice changes nothing (idempotence).
        #[test]
        fn snapshot_then_deltas_equals_a_full_plan(
            changes in prop::collection::vec((change(), any::<bool>()), 1..40)
        ) {
            let mut state = RouteState::new();
            let mut model = Model::empty();
            let mut published: BTreeMap<String, NodeRoutes> = BTreeMap::new();
            let mut subscribers: BTreeMap<String, Subscriber> = BTreeMap::new();
            for (change, stalled) in &changes {
                for name in apply(&mut state, &mut model, change) {
                    let sub = subscribers.entry(name.clone()).or_default();
                    let Some(new) = state.node_routes(&name).map(|r| (**r).clone()) else {
                        // Gone: the stream would send an empty set.
                        published.remove(&name);
                        subscribers.remove(&name);
                        continue;
                    };
                    match published.get(&name) {
                        Some(old) if sub.held.is_some() => {
                            if sub.queue.len() == QUEUE {
                                sub.behind = true;
                                sub.queue.clear();
                            } else if !sub.behind {
                                sub.queue.push((delta(old, &new), new.peers.clone()));
                            }
                        }
                        _ => sub.held = Some(new.clone()),
                    }
                    published.insert(name, new);
                }
                if *stalled {
                    continue;
                }
                let full = model.full();
                for (name, sub) in &mut subscribers {
                    if sub.behind {
                        sub.held = published.get(name).cloned();
                        sub.behind = false;
                    }
                    let Some(held) = sub.held.as_mut() else { continue };
                    for (d, sessions) in sub.queue.drain(..) {
                        d.apply(held, &sessions);
                        let once = held.clone();
                        d.apply(held, &sessions);
                        prop_assert_eq!(&*held, &once, "a delta applied twice");
                    }
                    prop_assert_eq!(Some(&*held), full.nodes.get(name), "node {} after {:?}", name, change);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For a Service change, the delta looked up at the prefixes the state says the
        /// change can touch equals the delta of the whole sets, on every node it changed.
        #[test]
        fn a_delta_at_a_services_prefixes_equals_the_whole_delta(
            changes in prop::collection::vec(change(), 1..40)
        ) {
            let mut state = RouteState::new();
            let mut model = Model::empty();
            for change in &changes {
                let before = state.clone();
                let prefixes = service_change(change)
                    .map(|(uid, facts)| state.service_prefixes(&uid, facts.as_ref()));
                let reported = apply(&mut state, &mut model, change);
                let Some(prefixes) = prefixes else { continue };
                for name in reported {
                    let (Some(old), Some(new)) = (before.node_routes(&name), state.node_routes(&name)) else {
                        continue;
                    };
                    prop_assert_eq!(
                        delta_at(old, new, &prefixes),
                        delta(old, new),
                        "node {} after {:?}", name, change
                    );
                }
            }
        }
    }

    /// Routes patched in one by one, in address order as addresses are allocated, get
    /// the node's maps rebuilt packed from time to time (to keep their leaves full);
    /// what they hold stays exactly the full plan's.
    #[test]
    fn a_node_patched_route_by_route_is_repacked_and_holds_the_same_routes() {
        let mut state = RouteState::new();
        state.set_policy(policy_variant(1));
        state.upsert_node(node("n0").label("bgp-peer", "true").ipv4("10.0.0.1"));
        let mut services = Vec::new();
        for i in 0..2000u32 {
            let facts =
                service(&format!("u{i}")).ip(&format!("172.16.{}.{}", i / 250, i % 250), "lab");
            services.push(facts.clone());
            state.upsert_service(facts);
        }
        let patched = &state.results()["n0"];
        assert!(
            patched.inserted_since_packed < 2000,
            "never repacked: {} routes patched in",
            patched.inserted_since_packed
        );
        let nodes: Vec<Node> = state.nodes().cloned().collect();
        let full = plan(&nodes, &services, state.policy().unwrap(), &[]);
        assert_eq!(*patched.routes, full.nodes["n0"]);
        assert_eq!(patched.routes.routes["tor"].len(), 2000);
    }

    #[test]
    fn a_delta_holds_only_what_the_change_touched() {
        let mut state = RouteState::new();
        state.set_policy(policy_variant(1));
        state.upsert_node(node("n0").label("bgp-peer", "true").ipv4("10.0.0.1"));
        for i in 0..12u8 {
            state.upsert_service(service(&format!("u{i}")).ip(&format!("172.16.0.{i}"), "lab"));
        }
        let before = (**state.node_routes("n0").unwrap()).clone();
        state.upsert_service(service("u12").ip("172.16.0.12", "lab"));
        state.remove_service("u3");
        let after = (**state.node_routes("n0").unwrap()).clone();
        let d = delta(&before, &after);
        let tor = &d.peers["tor"];
        assert_eq!(
            tor.set.keys().copied().collect::<Vec<_>>(),
            vec!["172.16.0.12/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            tor.withdrawn,
            vec!["172.16.0.3/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(d.len(), 2);
        assert!(delta(&after, &after).is_empty());
        let mut held = before.clone();
        d.apply(&mut held, &after.peers);
        assert_eq!(held, after);
    }

    #[test]
    fn a_local_service_change_touches_only_its_endpoint_nodes() {
        let mut state = RouteState::new();
        state.set_policy(policy_variant(1));
        for i in 0..4 {
            state.upsert_node(
                node(&node_name(i))
                    .label("bgp-peer", "true")
                    .ipv4(&format!("10.0.0.{}", i + 1)),
            );
        }
        let changed = state.upsert_service(
            service("u1")
                .local()
                .endpoints(["n1", "n2"])
                .ip("172.16.0.5", "lab"),
        );
        assert_eq!(changed, ["n1".to_string(), "n2".to_string()].into());
        let changed = state.upsert_service(
            service("u1")
                .local()
                .endpoints(["n2", "n3"])
                .ip("172.16.0.5", "lab"),
        );
        assert_eq!(changed, ["n1".to_string(), "n3".to_string()].into());
        assert!(state.node_routes("n0").unwrap().prefixes().is_empty());
    }
}
