//! Errors a client can read, through the real `herald-ipam` binary: an oversized value
//! is refused with a short message and a `google.rpc.BadRequest` naming the field (so
//! clients with a 16 KiB metadata limit see the INVALID_ARGUMENT, not a reset stream),
//! and the size limits a caller meets are the documented ones.

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::pin::Pin;

use common::{Server, allocate, create_pool, pool};
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as rpb;
use herald_api::routing::v1::routing_client::RoutingClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// What the tests allow for a status message: a few hundred bytes, whatever was sent.
const MESSAGE_LIMIT: usize = 512;

/// A 3 MB value, as a Service label that was filled by mistake might be.
fn huge() -> String {
    "a".repeat(3 * 1024 * 1024)
}

/// At most 200 characters of a message, so a failing assertion does not print megabytes.
fn head(message: &str) -> String {
    message.chars().take(200).collect()
}

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

fn ipam_call<T, F, Fut>(client: &IpamClient<Channel>, f: F) -> Call
where
    F: FnOnce(IpamClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
{
    let fut = f(client.clone());
    Box::pin(async move { fut.await.map(|_| ()) })
}

fn routing_call<T, F, Fut>(client: &RoutingClient<Channel>, f: F) -> Call
where
    F: FnOnce(RoutingClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
{
    let fut = f(client.clone());
    Box::pin(async move { fut.await.map(|_| ()) })
}

/// INVALID_ARGUMENT, a message under [`MESSAGE_LIMIT`] bytes that names `field`, and a
/// BadRequest detail with a violation for exactly `field`.
fn assert_short_invalid(case: &str, result: Result<(), Status>, field: &str) {
    let status = match result {
        Ok(()) => panic!("{case}: accepted"),
        Err(status) => status,
    };
    let message = status.message();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{case}: {} bytes: {}",
        message.len(),
        head(message)
    );
    assert!(
        message.len() < MESSAGE_LIMIT,
        "{case}: the message is {} bytes: {}",
        message.len(),
        head(message)
    );
    assert!(
        message.contains(field),
        "{case}: the message does not name {field}: {message}"
    );
    let bad = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{case}: no BadRequest detail beside {message:?}"));
    assert!(
        bad.field_violations.iter().any(|v| v.field == field),
        "{case}: BadRequest names {:?}, not {field}",
        bad.field_violations
    );
    for v in &bad.field_violations {
        assert!(
            v.field.len() + v.description.len() < MESSAGE_LIMIT,
            "{case}: violation too long: {v:?}"
        );
    }
}

fn with_owner(f: impl FnOnce(&mut pb::Owner)) -> pb::AllocateRequest {
    let mut req = allocate("u1");
    f(req.owner.as_mut().unwrap());
    req
}

fn with_request(f: impl FnOnce(&mut pb::AllocateRequest)) -> pb::AllocateRequest {
    let mut req = allocate("u1");
    f(&mut req);
    req
}

fn labels(key: &str, value: &str) -> std::collections::HashMap<String, String> {
    [(key.to_string(), value.to_string())].into()
}

fn selector(key: &str, value: &str) -> Option<pb::LabelSelector> {
    Some(pb::LabelSelector {
        match_labels: labels(key, value),
        match_expressions: vec![],
    })
}

fn peer() -> rpb::Peer {
    rpb::Peer {
        name: "tor".into(),
        address: "127.0.0.1".into(),
        asn: 65001,
        ..Default::default()
    }
}

fn policy_with_peer(f: impl FnOnce(&mut rpb::Peer)) -> rpb::BgpPolicy {
    let mut p = peer();
    f(&mut p);
    rpb::BgpPolicy {
        local_asn: 65010,
        peers: vec![p],
        ..Default::default()
    }
}

fn policy_with_rule(f: impl FnOnce(&mut rpb::Advertisement)) -> rpb::BgpPolicy {
    let mut rule = rpb::Advertisement::default();
    f(&mut rule);
    rpb::BgpPolicy {
        local_asn: 65010,
        peers: vec![peer()],
        advertisements: vec![rule],
        ..Default::default()
    }
}

fn node(f: impl FnOnce(&mut rpb::Node)) -> rpb::Node {
    let mut n = rpb::Node {
        name: "n1".into(),
        addresses: vec!["127.0.0.10".into()],
        ready: true,
        ..Default::default()
    };
    f(&mut n);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_in_any_field_gets_a_short_invalid_argument_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut ipam = server.client().await;
    let routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    let key_100k = "k".repeat(100 * 1024);
    let b = huge;
    let c = &ipam;
    let r = &routing;

    let cases: Vec<(&str, Call, &str)> = vec![
        // ---- herald.ipam.v1.Ipam ----
        (
            "CreatePool name",
            ipam_call(c, |mut c| async move {
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pool(&b(), &["10.0.0.0/24"])),
                })
                .await
            }),
            "pool.name",
        ),
        (
            "CreatePool address with a huge prefix length",
            ipam_call(c, |mut c| async move {
                let address = format!("10.0.0.0/{}", b());
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pool("x", &[&address])),
                })
                .await
            }),
            "pool.addresses[0]",
        ),
        (
            "CreatePool address with a huge first address",
            ipam_call(c, |mut c| async move {
                let address = format!("{}-10.0.0.9", b());
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pool("x", &[&address])),
                })
                .await
            }),
            "pool.addresses[0]",
        ),
        (
            "CreatePool namespace",
            ipam_call(c, |mut c| async move {
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pb::Pool {
                        namespaces: vec![b()],
                        ..pool("x", &["10.0.0.0/24"])
                    }),
                })
                .await
            }),
            "pool.namespaces[0]",
        ),
        (
            "CreatePool service selector key",
            ipam_call(c, |mut c| async move {
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pb::Pool {
                        service_selector: selector(&b(), "web"),
                        ..pool("x", &["10.0.0.0/24"])
                    }),
                })
                .await
            }),
            "pool.service_selector.match_labels",
        ),
        (
            "CreatePool namespace selector expression value",
            ipam_call(c, |mut c| async move {
                use pb::label_selector_requirement::Operator;
                c.create_pool(pb::CreatePoolRequest {
                    pool: Some(pb::Pool {
                        namespace_selector: Some(pb::LabelSelector {
                            match_labels: Default::default(),
                            match_expressions: vec![pb::LabelSelectorRequirement {
                                key: "team".into(),
                                operator: Operator::In as i32,
                                values: vec![b()],
                            }],
                        }),
                        ..pool("x", &["10.0.0.0/24"])
                    }),
                })
                .await
            }),
            "pool.namespace_selector.match_expressions[0].values",
        ),
        (
            "UpdatePool name",
            ipam_call(c, |mut c| async move {
                c.update_pool(pb::UpdatePoolRequest {
                    pool: Some(pool(&b(), &["10.0.0.0/24"])),
                    ..Default::default()
                })
                .await
            }),
            "pool.name",
        ),
        (
            "GetPool name",
            ipam_call(c, |mut c| async move {
                c.get_pool(pb::GetPoolRequest { name: b() }).await
            }),
            "name",
        ),
        (
            "DeletePool name",
            ipam_call(c, |mut c| async move {
                c.delete_pool(pb::DeletePoolRequest {
                    name: b(),
                    ..Default::default()
                })
                .await
            }),
            "name",
        ),
        (
            "Allocate owner uid",
            ipam_call(c, |mut c| async move {
                c.allocate(with_owner(|o| o.uid = b())).await
            }),
            "owner.uid",
        ),
        (
            "Allocate owner namespace",
            ipam_call(c, |mut c| async move {
                c.allocate(with_owner(|o| o.namespace = b())).await
            }),
            "owner.namespace",
        ),
        (
            "Allocate owner name",
            ipam_call(c, |mut c| async move {
                c.allocate(with_owner(|o| o.name = b())).await
            }),
            "owner.name",
        ),
        (
            "Allocate owner cluster id",
            ipam_call(c, |mut c| async move {
                c.allocate(with_owner(|o| o.cluster_id = b())).await
            }),
            "owner.cluster_id",
        ),
        (
            "Allocate a 3 MB Service label value",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| r.service_labels = labels("app", &b())))
                    .await
            }),
            "service_labels[app]",
        ),
        (
            "Allocate a 3 MB namespace label key",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| r.namespace_labels = labels(&b(), "x")))
                    .await
            }),
            "namespace_labels",
        ),
        (
            "Allocate endpoint selector value",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| r.endpoint_selector = labels("app", &b())))
                    .await
            }),
            "endpoint_selector[app]",
        ),
        (
            "Allocate a 100 KB sharing key",
            ipam_call(c, |mut c| {
                let key = key_100k.clone();
                async move { c.allocate(with_request(|r| r.sharing_key = key)).await }
            }),
            "sharing_key",
        ),
        (
            "Allocate requested pool",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| r.requested_pool = b())).await
            }),
            "requested_pool",
        ),
        (
            "Allocate requested ip",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| r.requested_ips = vec![b()]))
                    .await
            }),
            "requested_ips[0]",
        ),
        (
            "Allocate port protocol",
            ipam_call(c, |mut c| async move {
                c.allocate(with_request(|r| {
                    r.ports = vec![pb::ServicePort {
                        protocol: b(),
                        port: 80,
                    }]
                }))
                .await
            }),
            "ports[0].protocol",
        ),
        (
            "Release owner uid",
            ipam_call(c, |mut c| async move {
                c.release(pb::ReleaseRequest {
                    owner_uid: b(),
                    reason: String::new(),
                })
                .await
            }),
            "owner_uid",
        ),
        (
            "Release reason",
            ipam_call(c, |mut c| async move {
                c.release(pb::ReleaseRequest {
                    owner_uid: "u1".into(),
                    reason: b(),
                })
                .await
            }),
            "reason",
        ),
        (
            "GetAllocation owner uid",
            ipam_call(c, |mut c| async move {
                c.get_allocation(pb::GetAllocationRequest { owner_uid: b() })
                    .await
            }),
            "owner_uid",
        ),
        (
            "ListAllocations pool",
            ipam_call(c, |mut c| async move {
                c.list_allocations(pb::ListAllocationsRequest {
                    pool: b(),
                    ..Default::default()
                })
                .await
            }),
            "pool",
        ),
        (
            "ListAllocations namespace",
            ipam_call(c, |mut c| async move {
                c.list_allocations(pb::ListAllocationsRequest {
                    namespace: b(),
                    ..Default::default()
                })
                .await
            }),
            "namespace",
        ),
        (
            "ListAllocations cluster id",
            ipam_call(c, |mut c| async move {
                c.list_allocations(pb::ListAllocationsRequest {
                    cluster_id: b(),
                    ..Default::default()
                })
                .await
            }),
            "cluster_id",
        ),
        (
            "History ip",
            ipam_call(c, |mut c| async move {
                c.history(pb::HistoryRequest {
                    ip: b(),
                    ..Default::default()
                })
                .await
            }),
            "ip",
        ),
        (
            "History owner uid",
            ipam_call(c, |mut c| async move {
                c.history(pb::HistoryRequest {
                    owner_uid: b(),
                    ..Default::default()
                })
                .await
            }),
            "owner_uid",
        ),
        (
            "History page token",
            ipam_call(c, |mut c| async move {
                c.history(pb::HistoryRequest {
                    owner_uid: "u1".into(),
                    page_token: b(),
                    ..Default::default()
                })
                .await
            }),
            "page_token",
        ),
        // ---- herald.routing.v1.Routing ----
        (
            "UpsertNode name",
            routing_call(r, |mut r| async move {
                r.upsert_node(node(|n| n.name = b())).await
            }),
            "node.name",
        ),
        (
            "UpsertNode label key",
            routing_call(r, |mut r| async move {
                r.upsert_node(node(|n| n.labels = labels(&b(), "x"))).await
            }),
            "node.labels",
        ),
        (
            "UpsertNode label value",
            routing_call(r, |mut r| async move {
                r.upsert_node(node(|n| n.labels = labels("zone", &b())))
                    .await
            }),
            "node.labels[zone]",
        ),
        (
            "UpsertNode address",
            routing_call(r, |mut r| async move {
                r.upsert_node(node(|n| n.addresses = vec![b()])).await
            }),
            "node.addresses[0]",
        ),
        (
            "DeleteNode name",
            routing_call(r, |mut r| async move {
                r.delete_node(rpb::DeleteNodeRequest { name: b() }).await
            }),
            "name",
        ),
        (
            "SetServiceEndpoints owner uid",
            routing_call(r, |mut r| async move {
                r.set_service_endpoints(rpb::ServiceEndpoints {
                    owner_uid: b(),
                    ..Default::default()
                })
                .await
            }),
            "owner_uid",
        ),
        (
            "SetServiceEndpoints traceparent",
            routing_call(r, |mut r| async move {
                r.set_service_endpoints(rpb::ServiceEndpoints {
                    owner_uid: "u1".into(),
                    traceparent: b(),
                    ..Default::default()
                })
                .await
            }),
            "traceparent",
        ),
        (
            "SetServiceEndpoints endpoint node",
            routing_call(r, |mut r| async move {
                r.set_service_endpoints(rpb::ServiceEndpoints {
                    owner_uid: "u1".into(),
                    endpoint_nodes: vec![b()],
                    ..Default::default()
                })
                .await
            }),
            "endpoint_nodes[0]",
        ),
        (
            "SetBgpPolicy peer name",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_peer(|p| p.name = b())).await
            }),
            "peers[0].name",
        ),
        (
            "SetBgpPolicy peer address",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_peer(|p| p.address = b()))
                    .await
            }),
            "peers[0].address",
        ),
        (
            "SetBgpPolicy peer md5 password",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_peer(|p| p.md5_password = b()))
                    .await
            }),
            "peers[0].md5_password",
        ),
        (
            "SetBgpPolicy peer source subnet",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_peer(|p| p.source_subnet = b()))
                    .await
            }),
            "peers[0].source_subnet",
        ),
        (
            "SetBgpPolicy peer node selector",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_peer(|p| {
                    p.node_selector = selector("rack", &b())
                }))
                .await
            }),
            "peers[0].node_selector.match_labels[rack]",
        ),
        (
            "SetBgpPolicy router id subnet",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(rpb::BgpPolicy {
                    local_asn: 65010,
                    router_id_subnet: b(),
                    ..Default::default()
                })
                .await
            }),
            "router_id_subnet",
        ),
        (
            "SetBgpPolicy rule pool",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_rule(|a| a.pool = b())).await
            }),
            "advertisements[0].pool",
        ),
        (
            "SetBgpPolicy rule community",
            routing_call(r, |mut r| async move {
                let community = format!("65010:{}", b());
                r.set_bgp_policy(policy_with_rule(|a| a.communities = vec![community]))
                    .await
            }),
            "advertisements[0].communities[0]",
        ),
        (
            "SetBgpPolicy rule large community",
            routing_call(r, |mut r| async move {
                let community = format!("65010:1:{}", b());
                r.set_bgp_policy(policy_with_rule(|a| a.large_communities = vec![community]))
                    .await
            }),
            "advertisements[0].large_communities[0]",
        ),
        (
            "SetBgpPolicy rule peer",
            routing_call(r, |mut r| async move {
                r.set_bgp_policy(policy_with_rule(|a| a.peers = vec![b()]))
                    .await
            }),
            "advertisements[0].peers[0]",
        ),
        (
            "ReportSpeakerState node",
            routing_call(r, |mut r| async move {
                r.report_speaker_state(rpb::SpeakerState {
                    node: b(),
                    ..Default::default()
                })
                .await
            }),
            "node",
        ),
        (
            "ReportSpeakerState announced prefix",
            routing_call(r, |mut r| async move {
                r.report_speaker_state(rpb::SpeakerState {
                    node: "n1".into(),
                    sessions: vec![rpb::SessionState {
                        peer: "tor".into(),
                        announced_prefixes: vec![b()],
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
            }),
            "sessions[0].announced_prefixes[0]",
        ),
        (
            "ReportSpeakerState peer",
            routing_call(r, |mut r| async move {
                r.report_speaker_state(rpb::SpeakerState {
                    node: "n1".into(),
                    sessions: vec![rpb::SessionState {
                        peer: b(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
            }),
            "sessions[0].peer",
        ),
        (
            "ReportSpeakerState state",
            routing_call(r, |mut r| async move {
                r.report_speaker_state(rpb::SpeakerState {
                    node: "n1".into(),
                    sessions: vec![rpb::SessionState {
                        peer: "tor".into(),
                        state: b(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
            }),
            "sessions[0].state",
        ),
        (
            "ReportSpeakerState last error",
            routing_call(r, |mut r| async move {
                r.report_speaker_state(rpb::SpeakerState {
                    node: "n1".into(),
                    sessions: vec![rpb::SessionState {
                        peer: "tor".into(),
                        last_error: b(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
            }),
            "sessions[0].last_error",
        ),
        (
            "GetAdvertisementStatus service",
            routing_call(r, |mut r| async move {
                r.get_advertisement_status(rpb::GetAdvertisementStatusRequest {
                    service: b(),
                    ..Default::default()
                })
                .await
            }),
            "service",
        ),
    ];
    let count = cases.len();
    for (case, call, field) in cases {
        assert_short_invalid(case, call.await, field);
    }
    assert!(count >= 40, "{count} cases");

    // A batch item is refused alone, with the same short message.
    let mut requests = vec![allocate("ok-1"), allocate("ok-2")];
    requests[1].owner.as_mut().unwrap().uid = huge();
    let results = ipam
        .allocate_batch(pb::AllocateBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    match results[1].result.as_ref().unwrap() {
        pb::allocate_result::Result::Error(e) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(
                e.message.len() < MESSAGE_LIMIT && e.message.contains("requests[1].owner.uid"),
                "{} bytes: {}",
                e.message.len(),
                head(&e.message)
            );
        }
        other => panic!("item 1 accepted: {other:?}"),
    }
}

/// One Service with about 5 KiB of labels: more than a typical Service carries, well
/// within what Herald accepts for one.
fn labelled_allocate(i: usize) -> pb::AllocateRequest {
    let mut req = allocate(&format!("batch-{i}"));
    req.service_labels = (0..40)
        .map(|l| {
            (
                format!("example.com/label-{l:02}-{}", "k".repeat(40)),
                "v".repeat(63),
            )
        })
        .collect();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_limits_are_the_ones_a_caller_meets() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut ipam = server.client().await;
    create_pool(&mut ipam, pool("big", &["10.32.0.0/20"])).await;

    // A full batch of 1,000 Services is served, although it is larger than gRPC's usual
    // 4 MiB default.
    let requests: Vec<pb::AllocateRequest> = (0..1000).map(labelled_allocate).collect();
    let bytes = prost::Message::encoded_len(&pb::AllocateBatchRequest {
        requests: requests.clone(),
    });
    assert!(bytes > 4 * 1024 * 1024, "the batch is only {bytes} bytes");
    let results = ipam
        .allocate_batch(pb::AllocateBatchRequest { requests })
        .await
        .unwrap_or_else(|s| panic!("{:?}: {}", s.code(), head(s.message())))
        .into_inner()
        .results;
    assert_eq!(results.len(), 1000);
    let allocated = results
        .iter()
        .filter(|r| matches!(r.result, Some(pb::allocate_result::Result::Allocation(_))))
        .count();
    assert_eq!(allocated, 1000);

    // One more item is refused by count, naming the field.
    let too_many = pb::AllocateBatchRequest {
        requests: (0..1001).map(|i| allocate(&format!("x{i}"))).collect(),
    };
    let status = ipam.allocate_batch(too_many).await.unwrap_err();
    assert_short_invalid("1,001 items", Err(status.clone()), "requests");
    assert!(
        status.message().contains("at most 1000"),
        "{}",
        status.message()
    );

    // A message over the byte limit is RESOURCE_EXHAUSTED, as gRPC's status code
    // conventions say, with a message that gives the limit.
    let mut over = allocate("over");
    over.service_labels = labels("app", &"a".repeat(herald_ipam::MAX_REQUEST_BYTES + 1));
    let status = ipam.allocate(over).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        head(status.message())
    );
    assert!(
        status.message().len() < MESSAGE_LIMIT
            && status
                .message()
                .contains(&herald_ipam::MAX_REQUEST_BYTES.to_string()),
        "{}",
        head(status.message())
    );
    // The same on the Routing service, and the connection still serves afterwards.
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    let status = routing
        .upsert_node(node(|n| {
            n.labels = labels("zone", &"z".repeat(herald_ipam::MAX_REQUEST_BYTES + 1))
        }))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        head(status.message())
    );
    routing.upsert_node(node(|_| {})).await.unwrap();
    ipam.get_pool(pb::GetPoolRequest { name: "big".into() })
        .await
        .unwrap();
}

/// What a grpcio (C-core) client sees for a 3 MB label, printed by a small Python script:
/// the status code's name, the message's length, and whether the BadRequest detail came.
const GRPCIO_CLIENT: &str = r#"
import sys, grpc
target, path = sys.argv[1], sys.argv[2]
request = open(path, "rb").read()
with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
    allocate = channel.unary_unary("/herald.ipam.v1.Ipam/Allocate")
    try:
        allocate(request, timeout=20)
        print("OK")
    except grpc.RpcError as e:
        details = dict(e.trailing_metadata() or ())
        print(e.code().name, len(e.details() or ""), "grpc-status-details-bin" in details, e.details())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_sees_invalid_argument_not_a_removed_stream() {
    let has_grpcio = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_grpcio,
        "this test needs Python's grpcio: `python3 -m pip install grpcio` (scripts/test.sh does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut req = allocate("u1");
    req.service_labels = labels("app", &huge());
    let path = dir.path().join("request.bin");
    std::fs::write(&path, prost::Message::encode_to_vec(&req)).unwrap();
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(GRPCIO_CLIENT)
        .arg(server.addr.to_string())
        .arg(&path)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fields: Vec<&str> = stdout.trim().splitn(4, ' ').collect();
    assert_eq!(
        fields.first(),
        Some(&"INVALID_ARGUMENT"),
        "{}",
        head(&stdout)
    );
    let length: usize = fields[1].parse().unwrap();
    assert!(length < MESSAGE_LIMIT, "{}", head(&stdout));
    assert_eq!(fields[2], "True", "no BadRequest detail: {stdout}");
    assert!(
        fields[3].starts_with("service_labels[app] \"aaaa"),
        "{stdout}"
    );
}
