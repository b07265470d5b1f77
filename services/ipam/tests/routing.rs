//! The routing API of the real `herald-ipam` binary: nodes, endpoint facts and the BGP
//! policy in, per-node route snapshots out.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{RestrictedRole, Server, allocate, allocate_ok, create_pool, pool};
use futures::StreamExt;
use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_test_support::{TestDb, free_port};
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Channel;

fn node(name: &str, address: &str, labels: &[(&str, &str)]) -> pb::Node {
    pb::Node {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vec![address.into()],
        ready: true,
    }
}

fn selector(key: &str, value: &str) -> Option<ipam_pb::LabelSelector> {
    Some(ipam_pb::LabelSelector {
        match_labels: [(key.to_string(), value.to_string())].into(),
        match_expressions: vec![],
    })
}

fn tor_policy() -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: 65010,
        peers: vec![pb::Peer {
            name: "tor".into(),
            address: "127.0.0.1".into(),
            asn: 65001,
            port: 1790,
            node_selector: selector("bgp-peer", "true"),
            ..Default::default()
        }],
        advertisements: vec![pb::Advertisement {
            communities: vec!["65010:100".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The next snapshot on `stream`, within 5 s.
async fn next(stream: &mut Streaming<pb::NodeRoutes>) -> pb::NodeRoutes {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a snapshot within 5 s")
        .unwrap()
        .unwrap()
}

/// Prefix → next hop, over every peer of the snapshot.
fn routes(snapshot: &pb::NodeRoutes) -> BTreeMap<String, String> {
    snapshot
        .peers
        .iter()
        .flat_map(|p| {
            p.routes
                .iter()
                .map(|r| (r.prefix.clone(), r.next_hop.clone()))
        })
        .collect()
}

/// Skips snapshots until `predicate` holds (bounded in count and time).
async fn until(
    stream: &mut Streaming<pb::NodeRoutes>,
    predicate: impl Fn(&pb::NodeRoutes) -> bool,
) -> pb::NodeRoutes {
    for _ in 0..20 {
        let snapshot = next(stream).await;
        if predicate(&snapshot) {
            return snapshot;
        }
    }
    panic!("no matching snapshot in 20");
}

async fn watch(client: &mut RoutingClient<Channel>, name: &str) -> Streaming<pb::NodeRoutes> {
    client
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: name.into(),
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_snapshots_follow_labels_endpoints_and_readiness() {
    per_node_snapshots("incremental").await;
}

/// The full engine stays selectable (it is the benchmark's comparator) and must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_engine_gives_the_same_snapshots() {
    per_node_snapshots("full").await;
}

async fn per_node_snapshots(engine: &str) {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), Some(&db.url), free_port(), |c| {
        c.arg("--route-engine").arg(engine);
    })
    .await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    // The selective-peering lab: 2 of 4 nodes carry bgp-peer=true.
    for (i, labelled) in [true, true, false, false].into_iter().enumerate() {
        let labels: &[(&str, &str)] = if labelled {
            &[("bgp-peer", "true")]
        } else {
            &[]
        };
        routing
            .upsert_node(node(
                &format!("n{i}"),
                &format!("127.0.0.{}", 10 + i),
                labels,
            ))
            .await
            .unwrap();
    }
    let mut n0 = watch(&mut routing, "n0").await;
    let mut n2 = watch(&mut routing, "n2").await;
    let first = next(&mut n0).await;
    assert_eq!(first.peers.len(), 1);
    assert_eq!(first.peers[0].peer.as_ref().unwrap().address, "127.0.0.1");
    assert_eq!(first.peers[0].source_address, "127.0.0.10");
    assert_eq!(first.router_id, "127.0.0.10");
    assert!(routes(&first).is_empty());
    assert!(
        next(&mut n2).await.peers.is_empty(),
        "an unlabelled node peers with nobody"
    );

    // A Cluster Service: every peering node announces it with its own next hop (ECMP).
    allocate_ok(&mut ipam, allocate("lb")).await;
    let with_route = until(&mut n0, |s| !routes(s).is_empty()).await;
    assert_eq!(
        routes(&with_route),
        BTreeMap::from([("172.16.0.241/32".to_string(), "127.0.0.10".to_string())])
    );
    assert_eq!(
        with_route.peers[0].routes[0].communities,
        [65010 << 16 | 100]
    );
    assert!(with_route.peers[0].routes[0].changed_at.is_some());
    assert!(with_route.revision > first.revision);
    let mut n1 = watch(&mut routing, "n1").await;
    assert_eq!(
        routes(&next(&mut n1).await),
        BTreeMap::from([("172.16.0.241/32".to_string(), "127.0.0.11".to_string())])
    );
    // Nothing changed for n2: it gets nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), n2.next())
            .await
            .is_err(),
        "n2 must not get a snapshot"
    );

    // Local with endpoints only on n1: n0 withdraws, n1 keeps it; then they swap.
    let local = |nodes: &[&str]| pb::ServiceEndpoints {
        owner_uid: "lb".into(),
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        endpoint_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    };
    routing.set_service_endpoints(local(&["n1"])).await.unwrap();
    until(&mut n0, |s| routes(s).is_empty()).await;
    routing.set_service_endpoints(local(&["n0"])).await.unwrap();
    let back = until(&mut n0, |s| !routes(s).is_empty()).await;
    assert_eq!(
        back.peers[0].routes[0].traceparent,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    until(&mut n1, |s| routes(s).is_empty()).await;

    // Relabelling n2 gives it the session; n0 going NotReady withdraws its path.
    routing
        .upsert_node(node("n2", "127.0.0.12", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    assert_eq!(next(&mut n2).await.peers.len(), 1);
    routing
        .upsert_node(pb::Node {
            ready: false,
            ..node("n0", "127.0.0.10", &[("bgp-peer", "true")])
        })
        .await
        .unwrap();
    let not_ready = until(&mut n0, |s| routes(s).is_empty()).await;
    assert_eq!(
        not_ready.peers.len(),
        1,
        "a NotReady node keeps its session and announces nothing"
    );

    // Release: the route is gone everywhere.
    routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    until(&mut n0, |s| !routes(s).is_empty()).await;
    ipam.release(ipam_pb::ReleaseRequest {
        owner_uid: "lb".into(),
        reason: "deleted".into(),
    })
    .await
    .unwrap();
    until(&mut n0, |s| routes(s).is_empty()).await;

    // Desired against actual: n0 reports an announcement nobody wants any more.
    routing
        .report_speaker_state(pb::SpeakerState {
            node: "n0".into(),
            applied_revision: 1,
            sessions: vec![pb::SessionState {
                peer: "tor".into(),
                state: "Established".into(),
                announced_prefixes: vec!["172.16.0.241/32".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let status = routing
        .get_advertisement_status(pb::GetAdvertisementStatusRequest {
            node: "n0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.entries.len(), 1);
    assert_eq!(
        status.entries[0].difference,
        "announced but no longer desired"
    );
}

fn expect<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let status = r.expect_err("must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_input_is_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    let status = routing
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: "ghost".into(),
            deltas: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("\"ghost\" is not registered"));
    expect(
        routing
            .upsert_node(node("Bad_Name", "127.0.0.10", &[]))
            .await,
        Code::InvalidArgument,
        "node.name",
    );
    expect(
        routing.upsert_node(node("n1", "not-an-ip", &[])).await,
        Code::InvalidArgument,
        "node.addresses[0]",
    );
    let mut bad = tor_policy();
    bad.peers[0].address = "300.0.0.1".into();
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "peers[0].address",
    );
    let mut bad = tor_policy();
    bad.peers[0].hold_time_seconds = 2;
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "peers[0].hold_time",
    );
    let mut bad = tor_policy();
    bad.advertisements[0].communities = vec!["65010:999999".into()];
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "advertisements[0].communities",
    );
    let mut bad = tor_policy();
    bad.advertisements[0].pool = "no-such-pool".into();
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "advertisements[0].pool",
    );
    let mut bad = tor_policy();
    bad.local_asn = 0;
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "local_asn",
    );
    expect(
        routing
            .set_service_endpoints(pb::ServiceEndpoints {
                owner_uid: "x".into(),
                endpoint_nodes: vec!["BAD!".into()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "endpoint_nodes[0]",
    );
    // Nothing above was stored.
    expect(
        routing.get_bgp_policy(pb::GetBgpPolicyRequest {}).await,
        Code::NotFound,
        "no BGP policy",
    );
    assert!(
        routing
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .is_empty()
    );
}

/// The session `node` is told to open with the peer named `peer`, once a snapshot shows
/// `want` (the engine applies a policy shortly after SetBgpPolicy answers).
async fn session(
    routing: &mut RoutingClient<Channel>,
    node: &str,
    peer: &str,
    want: impl Fn(&pb::Peer) -> bool,
) -> pb::Peer {
    let mut stream = watch(routing, node).await;
    let mut last = None;
    for _ in 0..20 {
        let Ok(Some(Ok(snapshot))) =
            tokio::time::timeout(Duration::from_secs(5), stream.next()).await
        else {
            break;
        };
        last = snapshot
            .peers
            .into_iter()
            .filter_map(|p| p.peer)
            .find(|p| p.name == peer);
        if last.as_ref().is_some_and(&want) {
            return last.unwrap();
        }
    }
    panic!("{node} never got the expected session with {peer}; the last was {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_families_gets_the_family_of_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    let mut policy = tor_policy();
    let mut v6 = policy.peers[0].clone();
    v6.name = "tor6".into();
    v6.address = "::1".into();
    policy.peers.push(v6);
    let mut both = policy.peers[0].clone();
    both.name = "tor-both".into();
    both.address = "127.0.0.2".into();
    both.families = vec![
        ipam_pb::IpFamily::Ipv4 as i32,
        ipam_pb::IpFamily::Ipv6 as i32,
    ];
    policy.peers.push(both);
    routing.set_bgp_policy(policy).await.unwrap();
    let mut n1 = node("n1", "127.0.0.10", &[("bgp-peer", "true")]);
    n1.addresses.push("::10".into());
    routing.upsert_node(n1).await.unwrap();

    let v4 = vec![ipam_pb::IpFamily::Ipv4 as i32];
    let v6 = vec![ipam_pb::IpFamily::Ipv6 as i32];
    let dual = vec![
        ipam_pb::IpFamily::Ipv4 as i32,
        ipam_pb::IpFamily::Ipv6 as i32,
    ];
    let stored = routing
        .get_bgp_policy(pb::GetBgpPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    let families: Vec<_> = stored.peers.iter().map(|p| p.families.clone()).collect();
    assert_eq!(families, [v4.clone(), v6.clone(), dual.clone()]);
    // What the speaker is told to offer in its OPEN.
    session(&mut routing, "n1", "tor", |p| p.families == v4).await;
    session(&mut routing, "n1", "tor6", |p| p.families == v6).await;
    session(&mut routing, "n1", "tor-both", |p| p.families == dual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_md5_placeholder_written_back_keeps_the_stored_password() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    routing
        .upsert_node(node("n1", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    let mut policy = tor_policy();
    policy.peers[0].md5_password = "s3cret".into();
    routing.set_bgp_policy(policy).await.unwrap();
    session(&mut routing, "n1", "tor", |p| p.md5_password == "s3cret").await;

    // The usual read-modify-write: the password comes back as the placeholder.
    let mut read = routing
        .get_bgp_policy(pb::GetBgpPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.peers[0].md5_password, "(set)", "never shown");
    read.peers[0].connect_retry_seconds = 7;
    let written = routing.set_bgp_policy(read).await.unwrap().into_inner();
    assert_eq!(written.peers[0].md5_password, "(set)");
    session(&mut routing, "n1", "tor", |p| {
        (p.md5_password.as_str(), p.connect_retry_seconds) == ("s3cret", 7)
    })
    .await;

    // A new password replaces it; an empty one removes it.
    let mut changed = tor_policy();
    changed.peers[0].md5_password = "other".into();
    routing.set_bgp_policy(changed).await.unwrap();
    session(&mut routing, "n1", "tor", |p| p.md5_password == "other").await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    session(&mut routing, "n1", "tor", |p| p.md5_password.is_empty()).await;

    // The placeholder for a peer that has no stored password means nothing.
    let mut bad = tor_policy();
    bad.peers[0].md5_password = "(set)".into();
    expect(
        routing.set_bgp_policy(bad).await,
        Code::InvalidArgument,
        "peers[0].md5_password",
    );
    assert_eq!(
        routing
            .get_bgp_policy(pb::GetBgpPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .peers[0]
            .md5_password,
        "",
        "the refused policy stored nothing"
    );
}

fn changed_at(snapshot: &pb::NodeRoutes) -> std::time::SystemTime {
    let t = snapshot.peers[0].routes[0].changed_at.unwrap();
    std::time::SystemTime::try_from(t).unwrap()
}

/// A route's `changed_at` is the change that made it what it is: after a policy change
/// (here, a community) it is the policy change's time, not the allocation's from before
/// (which made the speaker log 415 s for a change applied in milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_at_is_the_change_that_caused_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    let mut n0 = watch(&mut routing, "n0").await;
    allocate_ok(&mut ipam, allocate("lb")).await;
    let allocated = until(&mut n0, |s| !routes(s).is_empty()).await;
    let allocated_at = changed_at(&allocated);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before_policy = std::time::SystemTime::now();
    let mut policy = tor_policy();
    policy.advertisements[0].communities = vec!["65010:200".into()];
    routing.set_bgp_policy(policy).await.unwrap();
    let changed = until(&mut n0, |s| {
        s.peers[0]
            .routes
            .first()
            .is_some_and(|r| r.communities == [65010 << 16 | 200])
    })
    .await;
    let at = changed_at(&changed);
    assert!(
        at + Duration::from_millis(100) >= before_policy,
        "changed_at {at:?} is from before the policy change at {before_policy:?} (the allocation was at {allocated_at:?})"
    );
    assert!(at <= std::time::SystemTime::now());

    // A snapshot for another reason (a second Service): the new route has its
    // allocation's time; the untouched one its owner's last change. Only the routes a
    // snapshot's own change moved carry a node's or the policy's change (a node keeps no
    // provenance of its own over all its prefixes: 5 million at 1,000 nodes × 5,000
    // Services), and a speaker times only the routes that changed for it.
    allocate_ok(&mut ipam, allocate("lb2")).await;
    let both = until(&mut n0, |s| routes(s).len() == 2).await;
    let first = both.peers[0]
        .routes
        .iter()
        .find(|r| r.prefix == changed.peers[0].routes[0].prefix)
        .unwrap();
    // Its owner's allocation, not the policy change 1.5 s later. Within milliseconds, not
    // equal: the change log's row and the allocation's row are timed apart in the same
    // write, and a replica that reloaded (a feed read that failed under load) holds the
    // allocation row's.
    let first_at = std::time::SystemTime::try_from(first.changed_at.unwrap()).unwrap();
    let near = |a: std::time::SystemTime, b: std::time::SystemTime| {
        a.duration_since(b)
            .or_else(|_| b.duration_since(a))
            .is_ok_and(|d| d <= Duration::from_millis(100))
    };
    assert!(
        near(first_at, allocated_at) && first_at < before_policy,
        "an untouched route carries its owner's last change ({allocated_at:?}), not {first_at:?}"
    );
    let second = both.peers[0]
        .routes
        .iter()
        .find(|r| r.prefix != changed.peers[0].routes[0].prefix)
        .unwrap();
    let second_at = std::time::SystemTime::try_from(second.changed_at.unwrap()).unwrap();
    assert!(
        second_at >= at && second_at <= std::time::SystemTime::now(),
        "the new route carries its allocation's time, {second_at:?}"
    );

    // A withdrawal has no route to carry its time: the snapshot's says when the release
    // was made, not when an earlier change was.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_release = std::time::SystemTime::now();
    ipam.release(ipam_pb::ReleaseRequest {
        owner_uid: "lb2".into(),
        reason: "deleted".into(),
    })
    .await
    .unwrap();
    let released = until(&mut n0, |s| routes(s).len() == 1).await;
    let at = std::time::SystemTime::try_from(
        released
            .changed_at
            .expect("a snapshot says when its change was made"),
    )
    .unwrap();
    assert!(
        at + Duration::from_millis(100) >= before_release && at <= std::time::SystemTime::now(),
        "the withdrawing snapshot's changed_at {at:?} is not the release's (at {before_release:?})"
    );
}

/// A change one replica could not read when the feed delivered it (the store away for a
/// moment, as around a Postgres crash) must still reach that replica's routes once the
/// store answers, without a later change to carry it: chaos bug 2, where replica B kept
/// announcing a Service switched to Local for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_read_failed_reaches_the_routes_once_the_store_answers() {
    let db = TestDb::postgres().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dir_a.path(), Some(&db.url)).await;
    let mut ipam = a.client().await;
    // Answered only once A has migrated the store, so the role's grants cover every table.
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    let role_b = RestrictedRole::create(&db.url, "b").await;
    let url_b = role_b.url.clone();
    let log_b = dir_b.path().join("herald-ipam.log");
    let b = Server::start_with(dir_b.path(), Some(&url_b), free_port(), |command| {
        command
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log_b).unwrap());
    })
    .await;

    let mut routing_a = RoutingClient::new(a.channel().await.unwrap());
    let mut routing_b = RoutingClient::new(b.channel().await.unwrap());
    routing_a.set_bgp_policy(tor_policy()).await.unwrap();
    routing_a
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    allocate_ok(&mut ipam, allocate("lb")).await;
    let mut on_b = watch(&mut routing_b, "n0").await;
    until(&mut on_b, |s| !routes(s).is_empty()).await;

    role_b.revoke_select("allocations").await;
    // Local with no endpoints known: nobody announces it, as replica A shows.
    allocate_ok(
        &mut ipam,
        ipam_pb::AllocateRequest {
            traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
            ..allocate("lb")
        },
    )
    .await;
    let mut on_a = watch(&mut routing_a, "n0").await;
    until(&mut on_a, |s| routes(s).is_empty()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // The read of the update failed, and so did the reload that follows at once.
    let failed = |text: &str| {
        text.contains("applying a routing change failed")
            && text.contains("reloading routing inputs failed")
    };
    while !failed(&std::fs::read_to_string(&log_b).unwrap_or_default()) {
        assert!(
            std::time::Instant::now() < deadline,
            "replica B never failed to read the update and to reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    role_b.grant_select("allocations").await;

    // Nothing else changes: B must catch up by itself.
    until(&mut on_b, |s| routes(s).is_empty()).await;

    drop((a, b));
    role_b.drop_role().await;
}

/// A Service allocated `Local` is announced only from nodes with its endpoints, so from
/// none until its endpoints are known; a replica that follows the allocation as it happens
/// computes what a replica started afterwards loads. Replicas once took a newly assigned
/// address's owner for `Cluster` until an update or its endpoints said otherwise: the
/// running one announced such a Service from every node while a restarted one announced it
/// from none, and the chaos suite saw a speaker withdraw it from its endpoint node when it
/// moved from the one to the other (a kill -9 between the Allocate and the endpoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_service_without_endpoints_is_announced_nowhere_by_a_running_or_a_new_replica() {
    for engine in ["incremental", "full"] {
        local_without_endpoints(engine).await;
    }
}

async fn local_without_endpoints(engine: &str) {
    let db = TestDb::postgres().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_engine = |c: &mut std::process::Command| {
        c.arg("--route-engine").arg(engine);
    };
    let a = Server::start_with(dir_a.path(), Some(&db.url), free_port(), with_engine).await;
    let mut ipam = a.client().await;
    let mut routing_a = RoutingClient::new(a.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    routing_a.set_bgp_policy(tor_policy()).await.unwrap();
    for (name, address) in [("n0", "127.0.0.10"), ("n1", "127.0.0.11")] {
        routing_a
            .upsert_node(node(name, address, &[("bgp-peer", "true")]))
            .await
            .unwrap();
    }
    let mut n0_a = watch(&mut routing_a, "n0").await;
    until(&mut n0_a, |s| s.peers.len() == 1).await;

    let local = allocate_ok(
        &mut ipam,
        ipam_pb::AllocateRequest {
            traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
            ..allocate("local")
        },
    )
    .await;
    let local = format!("{}/32", local.ips[0].ip);
    // A Cluster Service allocated after it: once n0 announces this one, replica A has
    // applied the Local Service's assignment too.
    let marker = allocate_ok(&mut ipam, allocate("marker")).await;
    let marker = format!("{}/32", marker.ips[0].ip);
    for _ in 0..20 {
        let snapshot = next(&mut n0_a).await;
        assert!(
            !routes(&snapshot).contains_key(&local),
            "{engine}: replica A announces the Local Service without endpoints from n0: {snapshot:?}"
        );
        if routes(&snapshot).contains_key(&marker) {
            break;
        }
    }

    // A replica started now loads the same and computes the same.
    let b = Server::start_with(dir_b.path(), Some(&db.url), free_port(), with_engine).await;
    let mut routing_b = RoutingClient::new(b.channel().await.unwrap());
    let mut n0_b = watch(&mut routing_b, "n0").await;
    let on_b = until(&mut n0_b, |s| routes(s).contains_key(&marker)).await;
    assert_eq!(
        routes(&on_b).into_keys().collect::<Vec<_>>(),
        std::slice::from_ref(&marker),
        "{engine}: replica B"
    );

    // Its endpoints on n0: n0 announces it, on both replicas, and n1 does not.
    routing_a
        .set_service_endpoints(pb::ServiceEndpoints {
            owner_uid: "local".into(),
            traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
            endpoint_nodes: vec!["n0".into()],
            traceparent: String::new(),
        })
        .await
        .unwrap();
    until(&mut n0_a, |s| routes(s).contains_key(&local)).await;
    until(&mut n0_b, |s| routes(s).contains_key(&local)).await;
    for routing in [&mut routing_a, &mut routing_b] {
        let n1 = next(&mut watch(routing, "n1").await).await;
        assert_eq!(
            routes(&n1).into_keys().collect::<Vec<_>>(),
            std::slice::from_ref(&marker),
            "{engine}: n1"
        );
    }
}

/// What a client applying the stream holds: per peer, prefix → route.
#[derive(Debug, Default, Clone, PartialEq)]
struct Held {
    revision: u64,
    peers: BTreeMap<String, BTreeMap<String, pb::Route>>,
}

impl Held {
    /// Applies one message as a speaker does; false for a delta that does not follow.
    fn apply(&mut self, m: &pb::NodeRoutes) -> bool {
        let delta = m.from_revision != 0;
        if delta && m.from_revision != self.revision {
            return false;
        }
        let mut peers = BTreeMap::new();
        for pr in &m.peers {
            let name = pr.peer.as_ref().unwrap().name.clone();
            let mut routes = if delta {
                self.peers.remove(&name).unwrap_or_default()
            } else {
                BTreeMap::new()
            };
            for w in &pr.withdrawn {
                routes.remove(w);
            }
            for r in &pr.routes {
                // Provenance says when the route changed, not what it is.
                let route = pb::Route {
                    traceparent: String::new(),
                    changed_at: None,
                    ..r.clone()
                };
                routes.insert(r.prefix.clone(), route);
            }
            peers.insert(name, routes);
        }
        self.peers = peers;
        self.revision = m.revision;
        true
    }

    fn prefixes(&self) -> usize {
        self.peers.values().map(BTreeMap::len).sum()
    }
}

async fn watch_deltas(
    client: &mut RoutingClient<Channel>,
    name: &str,
) -> Streaming<pb::NodeRoutes> {
    client
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: name.into(),
            deltas: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A stream that asks for deltas gets the snapshot once, then only what changed, each
/// message moving from the revision before it; a stream that stops reading falls behind
/// its bounded queue and is sent a fresh snapshot, after which it holds what a client that
/// kept up holds, and what a new subscriber's snapshot says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_follow_the_snapshot_and_a_lagging_stream_is_resynced() {
    const SERVICES: usize = 40;
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), Some(&db.url), free_port(), |c| {
        c.arg("--route-stream-buffer").arg("4");
    })
    .await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.0/24"])).await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    let mut keeping_up = watch_deltas(&mut routing, "n0").await;
    // The lagging client reads nothing for a while: a 1 KiB HTTP/2 window stops the
    // server's writes after a few messages, and its queue then overflows.
    let slow_channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut lagging = watch_deltas(&mut RoutingClient::new(slow_channel), "n0").await;
    let mut held = Held::default();
    let first = next(&mut keeping_up).await;
    assert_eq!(first.from_revision, 0, "the first message is a snapshot");
    assert!(held.apply(&first));
    let mut lagging_held = Held::default();
    assert!(lagging_held.apply(&next(&mut lagging).await));

    // One change at a time, each seen before the next: every message is one delta.
    let mut deltas = 0;
    for i in 0..SERVICES + 5 {
        if i < SERVICES {
            allocate_ok(&mut ipam, allocate(&format!("lb{i}"))).await;
        } else {
            ipam.release(ipam_pb::ReleaseRequest {
                owner_uid: format!("lb{}", i - SERVICES),
                reason: "deleted".into(),
            })
            .await
            .unwrap();
        }
        let want = if i < SERVICES {
            i + 1
        } else {
            SERVICES - (i + 1 - SERVICES)
        };
        for _ in 0..5 {
            if held.prefixes() == want {
                break;
            }
            let m = next(&mut keeping_up).await;
            assert_ne!(m.from_revision, 0, "after the first, only deltas");
            assert_eq!(
                m.from_revision, held.revision,
                "a delta moves from the last revision"
            );
            assert!(m.revision > m.from_revision);
            let carried: usize = m
                .peers
                .iter()
                .map(|p| p.routes.len() + p.withdrawn.len())
                .sum();
            assert_eq!(carried, 1, "a delta carries only the change: {m:?}");
            assert_eq!(m.peers.len(), 1, "every session, with its parameters");
            assert!(held.apply(&m));
            // Idempotent: the same delta again changes nothing.
            let once = held.clone();
            let mut again = held.clone();
            again.revision = m.from_revision;
            assert!(again.apply(&m));
            assert_eq!(again, once);
            deltas += 1;
        }
        assert_eq!(held.prefixes(), want, "change {i}");
    }
    assert!(deltas >= SERVICES + 5);

    // The lagging stream catches up: a fresh snapshot among its messages, and then the
    // same state as the one that kept up.
    let mut resynced = false;
    for _ in 0..SERVICES * 2 {
        if lagging_held == held {
            break;
        }
        let m = next(&mut lagging).await;
        if m.from_revision == 0 {
            resynced = true;
        }
        assert!(
            lagging_held.apply(&m),
            "every message follows the one before"
        );
    }
    assert!(resynced, "a stream that fell behind gets a full snapshot");
    assert_eq!(lagging_held, held);

    // A snapshot after the deltas gives the same state.
    let mut fresh = Held::default();
    assert!(fresh.apply(&next(&mut watch(&mut routing, "n0").await).await));
    assert_eq!(fresh.peers, held.peers);
}

/// A burst of changes committed together reaches a stream in a few messages, not one per
/// change: the route engine takes every change the feed has delivered in one turn. (That a
/// lone change is taken at once, without waiting for company, is the engine's unit test
/// on tokio's paused clock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_reaches_a_stream_in_a_few_messages() {
    const BURST: usize = 200;
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.0/24"])).await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")]))
        .await
        .unwrap();
    let mut stream = watch_deltas(&mut routing, "n0").await;
    let mut held = Held::default();
    assert!(held.apply(&next(&mut stream).await));

    let requests = (0..BURST).map(|i| allocate(&format!("b{i}"))).collect();
    let answer = ipam
        .allocate_batch(ipam_pb::AllocateBatchRequest { requests })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.results.len(), BURST);
    let mut messages = 0;
    while held.prefixes() < BURST && messages < BURST {
        assert!(held.apply(&next(&mut stream).await));
        messages += 1;
    }
    assert_eq!(held.prefixes(), BURST);
    assert!(
        messages <= 4,
        "{BURST} changes committed together took {messages} messages"
    );

    // A lone change afterwards: one message, with just it.
    allocate_ok(&mut ipam, allocate("lone")).await;
    let m = next(&mut stream).await;
    assert!(held.apply(&m));
    assert_eq!(held.prefixes(), BURST + 1);
    let carried: usize = m.peers.iter().map(|p| p.routes.len()).sum();
    assert_eq!(carried, 1, "the lone change alone: {m:?}");
}

/// SetServiceEndpointsBatch: every valid item reaches the routes, in order (a later item
/// for the same owner wins), an invalid item fails alone with its index, and a batch
/// larger than the limit is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_batch_is_applied_in_order_and_an_invalid_item_fails_alone() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    routing.set_bgp_policy(tor_policy()).await.unwrap();
    for (i, name) in ["n0", "n1"].into_iter().enumerate() {
        routing
            .upsert_node(node(
                name,
                &format!("127.0.0.{}", 10 + i),
                &[("bgp-peer", "true")],
            ))
            .await
            .unwrap();
    }
    allocate_ok(&mut ipam, allocate("a")).await;
    allocate_ok(&mut ipam, allocate("b")).await;
    let mut n0 = watch(&mut routing, "n0").await;
    until(&mut n0, |s| routes(s).len() == 2).await;

    let local = |uid: &str, nodes: &[&str]| pb::ServiceEndpoints {
        owner_uid: uid.into(),
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        endpoint_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        traceparent: String::new(),
    };
    let results = routing
        .set_service_endpoints_batch(pb::SetServiceEndpointsBatchRequest {
            items: vec![
                local("a", &["n1"]),
                local("", &["n0"]),
                local("b", &["n1"]),
                local("a", &["n0"]),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(codes, [0, Code::InvalidArgument as i32, 0, 0]);
    assert!(
        results[1].message.contains("items[1].owner_uid"),
        "{}",
        results[1].message
    );
    // b is Local on n1 only: n0 withdraws it; a's last item puts it on n0.
    let after = until(&mut n0, |s| routes(s).len() == 1).await;
    assert_eq!(
        routes(&after),
        BTreeMap::from([("172.16.0.241/32".to_string(), "127.0.0.10".to_string())])
    );

    let too_many = routing
        .set_service_endpoints_batch(pb::SetServiceEndpointsBatchRequest {
            items: vec![local("a", &["n0"]); 1001],
        })
        .await;
    expect(too_many, Code::InvalidArgument, "items");
}

/// A snapshot's sessions and routes, without what says when and by which change they were
/// made (a restarted replica knows an allocation's time, not the trace of its change).
fn without_provenance(snapshot: &pb::NodeRoutes) -> Vec<pb::PeerRoutes> {
    let mut peers = snapshot.peers.clone();
    for peer in &mut peers {
        for route in &mut peer.routes {
            route.traceparent.clear();
            route.changed_at = None;
        }
    }
    peers
}

/// A replica started after a kill -9 loads the routing inputs in the same pass over the
/// allocations as the allocation index: every node's sessions and routes must be the ones
/// the running replica published, on both stores. Among the Services are what a pass
/// that grouped rows by owner could lose or mix up: dual-stack owners (the last one in uid
/// order too), two owners sharing an address, a `Local` one with endpoints and one
/// without, and a released one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_publishes_the_routes_the_running_one_did() {
    let db = TestDb::postgres().await;
    restarted_publishes_the_same(Some(&db.url)).await;
    // The embedded SQLite file in the server's directory.
    restarted_publishes_the_same(None).await;
}

async fn restarted_publishes_the_same(url: Option<&str>) {
    let store = if url.is_some() { "postgres" } else { "sqlite" };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), url).await;
    let mut ipam = server.client().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.0/26", "fd00:16::/122"])).await;
    let mut policy = tor_policy();
    policy.peers[0].families = vec![
        ipam_pb::IpFamily::Ipv4 as i32,
        ipam_pb::IpFamily::Ipv6 as i32,
    ];
    routing.set_bgp_policy(policy).await.unwrap();
    for (name, address, peering) in [
        ("n0", "127.0.0.10", "true"),
        ("n1", "127.0.0.11", "true"),
        ("n2", "127.0.0.12", "false"),
    ] {
        let mut node = node(name, address, &[("bgp-peer", peering)]);
        node.addresses.push(address.replace("127.0.0.", "fd00:1::"));
        routing.upsert_node(node).await.unwrap();
    }
    let dual = |uid: &str| ipam_pb::AllocateRequest {
        ip_family_policy: ipam_pb::IpFamilyPolicy::RequireDualStack as i32,
        ..allocate(uid)
    };
    let local = |uid: &str| ipam_pb::AllocateRequest {
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        ..allocate(uid)
    };
    let shared = |uid: &str, port: u32| ipam_pb::AllocateRequest {
        sharing_key: "web".into(),
        ports: vec![ipam_pb::ServicePort {
            protocol: "TCP".into(),
            port,
        }],
        ..allocate(uid)
    };
    let mut prefixes = std::collections::BTreeSet::new();
    for request in [
        allocate("a-cluster"),
        dual("b-dual"),
        local("c-local-endpoints"),
        local("d-local-none"),
        shared("e-shared", 80),
        shared("f-shared", 443),
        allocate("g-released"),
        dual("z-dual-last"),
    ] {
        let allocation = allocate_ok(&mut ipam, request).await;
        let uid = allocation.owner.unwrap().uid;
        if uid != "d-local-none" && uid != "g-released" {
            for ip in allocation.ips {
                let len = if ip.ip.contains(':') { 128 } else { 32 };
                prefixes.insert(format!("{}/{len}", ip.ip));
            }
        }
    }
    routing
        .set_service_endpoints(pb::ServiceEndpoints {
            owner_uid: "c-local-endpoints".into(),
            traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
            endpoint_nodes: vec!["n1".into()],
            traceparent: String::new(),
        })
        .await
        .unwrap();
    ipam.release(ipam_pb::ReleaseRequest {
        owner_uid: "g-released".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(prefixes.len(), 7, "{store}: {prefixes:?}");

    // Every change above is in once n1 announces all of them (n0 lacks the Local one).
    let mut running = BTreeMap::new();
    for name in ["n0", "n1", "n2"] {
        let mut stream = watch(&mut routing, name).await;
        let want = match name {
            "n0" => prefixes.len() - 1,
            "n1" => prefixes.len(),
            _ => 0,
        };
        let snapshot = until(&mut stream, |s| {
            routes(s).len() == want && (name == "n2" || !s.peers.is_empty())
        })
        .await;
        running.insert(name, without_provenance(&snapshot));
    }
    let announced: std::collections::BTreeSet<String> = running["n1"][0]
        .routes
        .iter()
        .map(|r| r.prefix.clone())
        .collect();
    assert_eq!(announced, prefixes, "{store}: the running replica");
    drop((ipam, routing));

    let server = server.start_again().await;
    let mut routing = RoutingClient::new(server.channel().await.unwrap());
    for name in ["n0", "n1", "n2"] {
        let first = next(&mut watch(&mut routing, name).await).await;
        assert_eq!(
            without_provenance(&first),
            running[name],
            "{store}: node {name} after the restart"
        );
    }
}
