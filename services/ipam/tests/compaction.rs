//! The change log stays bounded under node and endpoint churn: the real `herald-ipam`
//! binary, two replicas on one Postgres, compacting with a tiny retention.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Server, allocate, allocate_ok, create_pool, pool};
use futures::StreamExt;
use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_ipam_store::{Event, Store};
use herald_test_support::{TestDb, free_port};
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Channel;

const RETENTION: &str = "1s";
/// Churn rounds; each writes a node row and an endpoints row.
const ROUNDS: usize = 150;

async fn start(dir: &std::path::Path, url: &str) -> Server {
    Server::start_with(dir, Some(url), free_port(), |c| {
        c.arg("--events-retention").arg(RETENTION);
    })
    .await
}

fn node(name: &str, address: &str, generation: usize) -> pb::Node {
    pb::Node {
        name: name.into(),
        labels: [
            ("bgp-peer".to_string(), "true".to_string()),
            ("churn".to_string(), generation.to_string()),
        ]
        .into(),
        addresses: vec![address.into()],
        ready: true,
    }
}

fn policy() -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: 65010,
        peers: vec![pb::Peer {
            name: "tor".into(),
            address: "127.0.0.1".into(),
            asn: 65001,
            port: 1790,
            node_selector: Some(ipam_pb::LabelSelector {
                match_labels: [("bgp-peer".to_string(), "true".to_string())].into(),
                match_expressions: vec![],
            }),
            ..Default::default()
        }],
        // Without an advertisement nothing is announced.
        advertisements: vec![pb::Advertisement::default()],
        ..Default::default()
    }
}

fn endpoints(nodes: &[&str]) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        owner_uid: "lb".into(),
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        endpoint_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        traceparent: String::new(),
    }
}

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

/// The first snapshot of `node` on a fresh stream that satisfies `predicate`, within 10 s.
async fn settles_to(
    routing: &mut RoutingClient<Channel>,
    node: &str,
    predicate: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let mut stream: Streaming<pb::NodeRoutes> = routing
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: node.into(),
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = BTreeMap::new();
    while let Ok(Some(snapshot)) = tokio::time::timeout_at(deadline.into(), stream.next()).await {
        last = routes(&snapshot.unwrap());
        if predicate(&last) {
            return last;
        }
    }
    panic!("{node}'s routes never settled; last seen {last:?}");
}

/// Each routing key and how many rows it has in the log.
fn routing_rows(events: &[Event]) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    for e in events {
        let key = match e {
            Event::NodeChanged { node, .. } | Event::NodeDeleted { node, .. } => {
                format!("node {node}")
            }
            Event::EndpointsChanged { owner_uid, .. } => format!("endpoints {owner_uid}"),
            Event::PolicyChanged { .. } => "policy".into(),
            _ => continue,
        };
        *keys.entry(key).or_default() += 1;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_a_bounded_log_right_routes_and_refuses_watches_from_before_compaction() {
    let db = TestDb::postgres().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Two replicas compact the same log at once.
    let a = start(dir_a.path(), &db.url).await;
    let b = start(dir_b.path(), &db.url).await;
    let store = Store::open(Some(&db.url)).await.unwrap();
    let mut ipam = a.client().await;
    let mut routing = RoutingClient::new(a.channel().await.unwrap());
    create_pool(&mut ipam, pool("lab", &["172.16.0.240/28"])).await;
    routing.set_bgp_policy(policy()).await.unwrap();
    let lb = allocate_ok(&mut ipam, allocate("lb")).await;
    let address = format!("{}/32", lb.ips[0].ip);

    // Churn for about three retentions: every round rewrites node n1 and moves the
    // Service's endpoints between n0 and n1, through both replicas.
    let mut routing_b = RoutingClient::new(b.channel().await.unwrap());
    let mut peak_after_warmup = 0;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let client = if round % 2 == 0 {
            &mut routing
        } else {
            &mut routing_b
        };
        client
            .upsert_node(node("n0", "127.0.0.10", 0))
            .await
            .unwrap();
        client
            .upsert_node(node("n1", "127.0.0.11", round))
            .await
            .unwrap();
        let on = if round % 2 == 0 { "n1" } else { "n0" };
        client
            .set_service_endpoints(endpoints(&[on]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed() > Duration::from_secs(2) {
            peak_after_warmup = peak_after_warmup.max(store.event_count().await.unwrap());
        }
    }
    let written = ROUNDS * 3;
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the churn must outlast the retention several times to show anything"
    );
    // A state the churn never produced: endpoints on both nodes. Every replica's feed,
    // past the compacted revisions, must bring each node its own route.
    routing
        .set_service_endpoints(endpoints(&["n0", "n1"]))
        .await
        .unwrap();
    let on = |next_hop: &str| BTreeMap::from([(address.clone(), next_hop.to_string())]);
    let (on_n0, on_n1) = (on("127.0.0.10"), on("127.0.0.11"));
    assert_eq!(settles_to(&mut routing, "n0", |r| *r == on_n0).await, on_n0);
    assert_eq!(
        settles_to(&mut routing_b, "n1", |r| *r == on_n1).await,
        on_n1
    );
    assert_eq!(
        settles_to(&mut routing_b, "n0", |r| *r == on_n0).await,
        on_n0
    );

    // While the churn ran, the log never held more than what about 1.25 retentions write
    // (plus a margin for a slow machine), however long it ran.
    assert!(
        peak_after_warmup > 0 && (peak_after_warmup as usize) < written / 2,
        "the log peaked at {peak_after_warmup} rows after warm-up with {written} routing writes"
    );
    // Once quiet for longer than retention and period, one row per routing key is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = store.events_after(0, 10_000).await.unwrap();
        if routing_rows(&events).values().all(|&n| n == 1) || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        routing_rows(&events),
        BTreeMap::from([
            ("endpoints lb".to_string(), 1),
            ("node n0".to_string(), 1),
            ("node n1".to_string(), 1),
            ("policy".to_string(), 1),
        ]),
        "only the newest row of each routing key is left"
    );
    // History and pool rows are all still there.
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Assigned(..) | Event::PoolChanged { .. }))
            .count(),
        2
    );
    let point = store.compaction_point().await.unwrap();
    assert!(point > 1, "the compaction point moved: {point}");

    // A replica started on the compacted log computes the same routes.
    let dir_c = tempfile::tempdir().unwrap();
    let c = start(dir_c.path(), &db.url).await;
    let mut routing_c = RoutingClient::new(c.channel().await.unwrap());
    assert_eq!(
        settles_to(&mut routing_c, "n1", |r| *r == on_n1).await,
        on_n1
    );

    // Watch: resuming from before the compaction point is refused with a re-list hint;
    // from the current revision (or from now, 0) it works and sees new changes.
    let refused = ipam
        .watch(ipam_pb::WatchRequest { after_revision: 1 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("compacted") && refused.message().contains("list"),
        "{}",
        refused.message()
    );
    let current = u64::try_from(store.last_revision().await.unwrap()).unwrap();
    let mut from_current = ipam
        .watch(ipam_pb::WatchRequest {
            after_revision: current,
        })
        .await
        .unwrap()
        .into_inner();
    let mut from_now = ipam
        .watch(ipam_pb::WatchRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    allocate_ok(&mut ipam, allocate("after")).await;
    for stream in [&mut from_current, &mut from_now] {
        let change = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a change within 5 s")
            .unwrap()
            .unwrap();
        assert!(change.revision > current);
        assert!(matches!(
            change.change,
            Some(ipam_pb::watch_response::Change::Allocation(ref e)) if e.owner.as_ref().unwrap().uid == "after"
        ));
    }
    drop((a, b, c));
}
