//! The conversion layer under arbitrary input (proptest, a bounded number of cases per run;
//! `PROPTEST_CASES=100000` for a deep local run): every request message a client could
//! send converts to a domain value or to a short error naming a field, never a panic; and
//! what converts survives the way back out and in again unchanged, so what a client reads
//! is what it wrote.

#![allow(clippy::unwrap_used)]
// The generators fill every field they know of and leave fields added later at their
// defaults until someone teaches the generator about them.
#![allow(clippy::needless_update)]

use herald_api::ipam::v1 as pb;
use herald_api::routing::v1 as rpb;
use herald_ipam_store::StoredPool;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use crate::convert::{allocate_request_from_pb, pool_from_pb, pool_to_pb};
use crate::routing::convert::{node_from_pb, node_to_pb, policy_from_pb, policy_to_pb};

/// The longest error message a conversion may produce: Herald cuts echoed values to 1 KiB.
const ERROR_LIMIT: usize = 1400;

/// Strings a client could send: plausible ones (names, addresses, ranges, communities)
/// mixed with anything at all, including very long ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", "lab", "a", "default", "n1", "tor", "172.16.0.240/28", "172.16.0.241",
            "10.0.0.10-10.0.0.20", "10.0.0.20-10.0.0.10", "fd00::/64", "fd00::1", "0.0.0.0/0",
            "::/0", "1.2.3.4/33", "65000:100", "65000:1:2", "(set)", "bgp-peer", "true",
            "kubernetes.io/hostname", "-bad-", "UPPER",
        ])
        .prop_map(str::to_string),
        3 => "[a-z0-9./:-]{0,40}",
        2 => any::<String>(),
        1 => (2000usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

fn labels() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map(text(), text(), 0..3)
}

/// Numbers at the edges as often as anywhere.
fn number() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            2,
            3,
            24,
            32,
            33,
            64,
            128,
            129,
            179,
            65535,
            65536,
            u32::MAX
        ]),
        any::<u32>(),
    ]
}

fn selector() -> impl Strategy<Value = Option<pb::LabelSelector>> {
    prop::option::of(
        (
            labels(),
            prop::collection::vec((text(), any::<i32>(), texts()), 0..3),
        )
            .prop_map(|(match_labels, expressions)| pb::LabelSelector {
                match_labels,
                match_expressions: expressions
                    .into_iter()
                    .map(|(key, operator, values)| pb::LabelSelectorRequirement {
                        key,
                        operator: operator % 6,
                        values,
                    })
                    .collect(),
            }),
    )
}

fn pool() -> impl Strategy<Value = pb::Pool> {
    (
        (
            text(),
            texts(),
            any::<Option<bool>>(),
            any::<[bool; 3]>(),
            texts(),
        ),
        (
            selector(),
            selector(),
            any::<i32>(),
            number(),
            number(),
            number(),
        ),
    )
        .prop_map(
            |(
                (
                    name,
                    addresses,
                    auto_assign,
                    [avoid_buggy_ips, allow_first_last, disabled],
                    namespaces,
                ),
                (namespace_selector, service_selector, priority, v4, v6, quarantine),
            )| pb::Pool {
                name,
                addresses,
                auto_assign,
                avoid_buggy_ips,
                allow_first_last,
                disabled,
                namespaces,
                namespace_selector,
                service_selector,
                priority,
                aggregation_length_v4: v4,
                aggregation_length_v6: v6,
                quarantine_seconds: quarantine,
                ..Default::default()
            },
        )
}

fn allocate_request() -> impl Strategy<Value = pb::AllocateRequest> {
    (
        (
            prop::option::of((text(), text(), text(), text())),
            labels(),
            labels(),
        ),
        (
            any::<i32>(),
            prop::collection::vec(any::<i32>(), 0..3),
            texts(),
            text(),
            text(),
        ),
        (
            prop::collection::vec((text(), number()), 0..4),
            any::<i32>(),
            labels(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (owner, service_labels, namespace_labels),
                (ip_family_policy, ip_families, requested_ips, requested_pool, sharing_key),
                (ports, traffic_policy, endpoint_selector, dry_run),
            )| pb::AllocateRequest {
                owner: owner.map(|(cluster_id, namespace, name, uid)| pb::Owner {
                    cluster_id,
                    namespace,
                    name,
                    uid,
                }),
                service_labels,
                namespace_labels,
                ip_family_policy: ip_family_policy % 5,
                ip_families: ip_families.into_iter().map(|f| f % 4).collect(),
                requested_ips,
                requested_pool,
                sharing_key,
                ports: ports
                    .into_iter()
                    .map(|(protocol, port)| pb::ServicePort { protocol, port })
                    .collect(),
                traffic_policy: traffic_policy % 4,
                endpoint_selector,
                dry_run,
            },
        )
}

fn node() -> impl Strategy<Value = rpb::Node> {
    (text(), labels(), texts(), any::<bool>()).prop_map(|(name, labels, addresses, ready)| {
        rpb::Node {
            name,
            labels,
            addresses,
            ready,
        }
    })
}

fn peer() -> impl Strategy<Value = rpb::Peer> {
    (
        (
            text(),
            text(),
            number(),
            number(),
            selector(),
            number(),
            number(),
            number(),
        ),
        (
            text(),
            number(),
            any::<bool>(),
            number(),
            any::<bool>(),
            number(),
            prop::collection::vec(any::<i32>(), 0..3),
            text(),
        ),
    )
        .prop_map(
            |(
                (name, address, asn, port, node_selector, hold, keepalive, connect_retry),
                (
                    md5_password,
                    multihop_ttl,
                    graceful_restart,
                    restart,
                    passive,
                    local_asn,
                    families,
                    source_subnet,
                ),
            )| rpb::Peer {
                name,
                address,
                asn,
                port,
                node_selector,
                hold_time_seconds: hold,
                keepalive_seconds: keepalive,
                connect_retry_seconds: connect_retry,
                md5_password,
                multihop_ttl,
                graceful_restart,
                restart_time_seconds: restart,
                passive,
                local_asn,
                families: families.into_iter().map(|f| f % 4).collect(),
                source_subnet,
                ..Default::default()
            },
        )
}

fn advertisement() -> impl Strategy<Value = rpb::Advertisement> {
    (
        (
            text(),
            any::<Option<bool>>(),
            number(),
            number(),
            texts(),
            texts(),
        ),
        (
            prop::option::of(number()),
            selector(),
            prop::option::of(number()),
            texts(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (pool, host_routes, v4, v6, communities, large_communities),
                (local_pref, node_selector, med, peers, withdraw_without_endpoints),
            )| rpb::Advertisement {
                pool,
                host_routes,
                aggregation_length_v4: v4,
                aggregation_length_v6: v6,
                communities,
                large_communities,
                local_pref,
                node_selector,
                med,
                peers,
                withdraw_without_endpoints,
                ..Default::default()
            },
        )
}

fn policy() -> impl Strategy<Value = rpb::BgpPolicy> {
    (
        number(),
        prop::collection::vec(peer(), 0..3),
        prop::collection::vec(advertisement(), 0..3),
        text(),
    )
        .prop_map(
            |(local_asn, peers, advertisements, router_id_subnet)| rpb::BgpPolicy {
                local_asn,
                peers,
                advertisements,
                router_id_subnet,
                ..Default::default()
            },
        )
}

/// Pools a user would write: the round trip is exercised on these, since arbitrary input
/// is nearly always refused.
fn plausible_pool() -> impl Strategy<Value = pb::Pool> {
    let address = prop::sample::select(vec![
        "172.16.0.240/28",
        "172.16.1.0/24",
        "10.0.0.10-10.0.0.20",
        "fd00::/64",
        "fd00:1::10-fd00:1::20",
        "192.0.2.7/32",
    ]);
    (
        prop::sample::select(vec!["lab", "a", "pool-1", "web"]),
        prop::collection::btree_set(address, 1..3),
        any::<Option<bool>>(),
        any::<[bool; 3]>(),
        prop::collection::vec(
            prop::sample::select(vec!["default", "web", "kube-system"]),
            0..2,
        ),
        prop::option::of(prop::sample::select(vec!["team", "tier"]).prop_map(|k| {
            pb::LabelSelector {
                match_labels: [(k.to_string(), "a".to_string())].into(),
                ..Default::default()
            }
        })),
        -5i32..5,
        (0u32..=32, 0u32..=128, 0u32..600),
    )
        .prop_map(
            |(
                name,
                addresses,
                auto_assign,
                [avoid_buggy_ips, allow_first_last, disabled],
                namespaces,
                selector,
                priority,
                (v4, v6, quarantine),
            )| pb::Pool {
                name: name.to_string(),
                // An aggregation length only for a family the pool has.
                aggregation_length_v4: if addresses.iter().any(|a| a.contains('.')) {
                    v4
                } else {
                    0
                },
                aggregation_length_v6: if addresses.iter().any(|a| a.contains(':')) {
                    v6
                } else {
                    0
                },
                addresses: addresses.into_iter().map(str::to_string).collect(),
                auto_assign,
                avoid_buggy_ips,
                allow_first_last,
                disabled,
                namespaces: namespaces.into_iter().map(str::to_string).collect(),
                service_selector: selector,
                priority,
                quarantine_seconds: quarantine,
                ..Default::default()
            },
        )
}

/// Policies a user would write, for the same reason.
fn plausible_policy() -> impl Strategy<Value = rpb::BgpPolicy> {
    let peer = (
        prop::sample::select(vec!["tor", "tor-b", "spine"]),
        prop::sample::select(vec!["127.0.0.1", "10.10.10.1", "fd00::1"]),
        64512u32..65535,
        prop::sample::select(vec![0u32, 179, 1790]),
        prop::sample::select(vec![0u32, 3, 9, 90, 180]),
        prop::sample::select(vec!["", "secret"]),
        any::<[bool; 2]>(),
    )
        .prop_map(
            |(name, address, asn, port, hold, md5, [graceful_restart, passive])| rpb::Peer {
                name: name.to_string(),
                address: address.to_string(),
                asn,
                port,
                hold_time_seconds: hold,
                md5_password: md5.to_string(),
                graceful_restart,
                passive,
                ..Default::default()
            },
        );
    let advertisement = (
        prop::sample::select(vec!["", "lab"]),
        any::<Option<bool>>(),
        prop::collection::vec(prop::sample::select(vec!["65000:100", "65010:7"]), 0..2),
        prop::collection::vec(prop::sample::select(vec!["65000:1:2"]), 0..2),
        prop::option::of(0u32..300),
        prop::option::of(0u32..300),
    )
        .prop_map(|(pool, host_routes, communities, large, local_pref, med)| {
            rpb::Advertisement {
                pool: pool.to_string(),
                host_routes,
                communities: communities.into_iter().map(str::to_string).collect(),
                large_communities: large.into_iter().map(str::to_string).collect(),
                local_pref,
                med,
                ..Default::default()
            }
        });
    (
        64512u32..65535,
        prop::collection::btree_map(
            prop::sample::select(vec!["tor", "tor-b", "spine"]),
            peer,
            0..3,
        ),
        prop::collection::vec(advertisement, 0..3),
        prop::sample::select(vec!["", "10.0.0.0/8"]),
    )
        .prop_map(
            |(local_asn, peers, advertisements, router_id_subnet)| rpb::BgpPolicy {
                local_asn,
                // Unique names, as the policy requires.
                peers: peers
                    .into_iter()
                    .map(|(name, peer)| rpb::Peer {
                        name: name.to_string(),
                        ..peer
                    })
                    .collect(),
                advertisements,
                router_id_subnet: router_id_subnet.to_string(),
                ..Default::default()
            },
        )
}

/// Runs `cases` inputs from `strategy` through `check` and returns how many converted.
fn converted<S: Strategy>(
    strategy: S,
    cases: u32,
    check: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) -> u32 {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut ok = 0;
    for _ in 0..cases {
        let value = strategy.new_tree(&mut runner).unwrap().current();
        if check(value).unwrap() {
            ok += 1;
        }
    }
    ok
}

#[test]
fn plausible_pools_and_policies_mostly_convert_and_round_trip() {
    let pools = converted(plausible_pool(), 300, |input| {
        match pool_from_pb(Some(input)) {
            Ok(spec) => {
                let stored = StoredPool {
                    spec: spec.clone(),
                    generation: 1,
                    created_at: 0,
                    updated_at: 0,
                };
                prop_assert_eq!(pool_from_pb(Some(pool_to_pb(&stored, &[]))), Ok(spec));
                Ok(true)
            }
            Err(e) => short(&e).map(|()| false),
        }
    });
    let names = [herald_model::PoolName::parse("pool", "lab").unwrap()];
    let policies = converted(plausible_policy(), 300, |input| {
        match policy_from_pb(input, &names, None) {
            Ok(policy) => {
                let again = policy_from_pb(policy_to_pb(&policy), &names, Some(&policy));
                prop_assert_eq!(again, Ok(policy));
                Ok(true)
            }
            Err(e) => short(&e).map(|()| false),
        }
    });
    // Most of them are valid, so the round trips above were really exercised.
    assert!(
        pools >= 150,
        "only {pools} of 300 plausible pools converted"
    );
    assert!(
        policies >= 150,
        "only {policies} of 300 plausible policies converted"
    );
}

fn short(error: &herald_model::FieldError) -> Result<(), TestCaseError> {
    let text = error.to_string();
    prop_assert!(
        text.len() <= ERROR_LIMIT,
        "a {}-byte error: {}",
        text.len(),
        &text[..200]
    );
    prop_assert!(!error.field.is_empty(), "an error naming no field: {text}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_pool_converts_or_is_refused_and_round_trips(input in pool()) {
        match pool_from_pb(Some(input)) {
            Ok(spec) => {
                let stored = StoredPool { spec: spec.clone(), generation: 1, created_at: 0, updated_at: 0 };
                let again = pool_from_pb(Some(pool_to_pb(&stored, &[])));
                prop_assert_eq!(again, Ok(spec));
            }
            Err(e) => short(&e)?,
        }
    }

    #[test]
    fn any_allocate_request_converts_or_is_refused(input in allocate_request()) {
        if let Err(e) = allocate_request_from_pb(input) {
            short(&e)?;
        }
    }

    #[test]
    fn any_node_converts_or_is_refused_and_round_trips(input in node()) {
        match node_from_pb(input) {
            Ok(node) => prop_assert_eq!(node_from_pb(node_to_pb(&node)), Ok(node)),
            Err(e) => short(&e)?,
        }
    }

    #[test]
    fn any_bgp_policy_converts_or_is_refused_and_round_trips(input in policy()) {
        let pools = [herald_model::PoolName::parse("pool", "lab").unwrap()];
        match policy_from_pb(input, &pools, None) {
            Ok(policy) => {
                // Passwords read back as the placeholder, which keeps the stored one.
                let again = policy_from_pb(policy_to_pb(&policy), &pools, Some(&policy));
                prop_assert_eq!(again, Ok(policy));
            }
            Err(e) => short(&e)?,
        }
    }
}
