//! GetAdvertisementStatus against the real binaries and a real ToR (FRR): what it says
//! while speakers run, after a kill -9 and after a SIGTERM, why a Service is announced
//! nowhere, and its filters and pages.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_e2e::{CONVERGE, IpamLab, allocate, expect_paths, node, speaker, tor_policy};
use herald_tor_harness::{Tor, TorConfig, TorKind};
use tonic::transport::Channel;

const WEB: &str = "172.16.0.241/32";
const LOCAL: &str = "172.16.0.242/32";

async fn status(
    routing: &mut RoutingClient<Channel>,
    request: pb::GetAdvertisementStatusRequest,
) -> pb::AdvertisementStatus {
    routing
        .get_advertisement_status(request)
        .await
        .unwrap()
        .into_inner()
}

/// Polls the full status until `pred` holds (at most `within`), returning it.
async fn until(
    routing: &mut RoutingClient<Channel>,
    within: Duration,
    what: &str,
    pred: impl Fn(&pb::AdvertisementStatus) -> bool,
) -> pb::AdvertisementStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = status(routing, pb::GetAdvertisementStatusRequest::default()).await;
        if pred(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("{what} within {within:?}; last status: {s:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry<'a>(
    s: &'a pb::AdvertisementStatus,
    prefix: &str,
    node: &str,
) -> Option<&'a pb::AdvertisementEntry> {
    s.entries
        .iter()
        .find(|e| e.prefix == prefix && e.node == node)
}

fn agrees(s: &pb::AdvertisementStatus, prefix: &str, node: &str) -> bool {
    entry(s, prefix, node).is_some_and(|e| {
        e.desired
            && e.announced
            && e.difference.is_empty()
            && e.speaker == pb::SpeakerStatus::Live as i32
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_tells_the_truth_with_frr() {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let mut lab = IpamLab::start().await;
    lab.routing
        .set_bgp_policy(tor_policy(&tor, 9))
        .await
        .unwrap();
    // s0 and s1 peer with the ToR; s2 does not (no bgp-peer label).
    let addresses = ["127.0.0.30", "127.0.0.31", "127.0.0.32"];
    for (i, address) in addresses.iter().enumerate() {
        let labels: &[(&str, &str)] = if i < 2 { &[("bgp-peer", "true")] } else { &[] };
        lab.routing
            .upsert_node(node(&format!("s{i}"), address, labels, true))
            .await
            .unwrap();
    }
    let mut speakers: Vec<_> = (0..3)
        .map(|i| speaker(&format!("s{i}"), &lab.ipam.endpoint()))
        .collect();

    // A Cluster Service, announced by both peering nodes; a Local one whose only
    // endpoints are on s2, which peers with nobody.
    lab.alloc
        .allocate(allocate("default", "web", "web"))
        .await
        .unwrap();
    lab.alloc
        .allocate(allocate("default", "local-only", "loc"))
        .await
        .unwrap();
    lab.routing
        .set_service_endpoints(pb::ServiceEndpoints {
            owner_uid: "loc".into(),
            traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
            endpoint_nodes: vec!["s2".into()],
            traceparent: String::new(),
        })
        .await
        .unwrap();
    expect_paths(&tor, WEB, &["127.0.0.30", "127.0.0.31"]).await;
    // The Local Service was announced for a moment before its endpoints were known; the
    // status converges once its withdrawal is written and reported.
    let s = until(&mut lab.routing, CONVERGE, "both nodes agree on web", |s| {
        agrees(s, WEB, "s0") && agrees(s, WEB, "s1") && s.differences == 0
    })
    .await;
    let local: Vec<_> = s.entries.iter().filter(|e| e.owner_uid == "loc").collect();
    assert_eq!(local.len(), 1, "the Local Service appears once: {local:#?}");
    assert_eq!(
        (
            local[0].prefix.as_str(),
            local[0].node.as_str(),
            local[0].desired
        ),
        (LOCAL, "", false)
    );
    assert!(
        local[0]
            .not_announced_reason
            .starts_with("no endpoints on a peering node")
            && local[0].not_announced_reason.contains("s2"),
        "{:?}",
        local[0].not_announced_reason
    );
    assert!(
        entry(&s, WEB, "s0").is_some_and(|e| e.not_announced_reason.is_empty()),
        "web is announced: no reason"
    );

    // Filters.
    let by_node = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest {
            node: "s0".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!by_node.entries.is_empty());
    assert!(
        by_node.entries.iter().all(|e| e.node == "s0"),
        "{by_node:#?}"
    );
    let by_service = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest {
            service: "default/local-only".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_service.entries.len(), 1, "{by_service:#?}");
    assert_eq!(by_service.entries[0].owner_uid, "loc");
    let by_peer = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest {
            peer: "tor".into(),
            owner_uid: "web".into(),
            ..Default::default()
        },
    )
    .await;
    let mut nodes: Vec<&str> = by_peer.entries.iter().map(|e| e.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["s0", "s1"]);
    let none = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest {
            peer: "no-such-peer".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.entries.is_empty(), "{none:#?}");

    // Pages of one entry walk the whole status in order, each entry once.
    let full = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest::default(),
    )
    .await;
    assert!(full.next_page_token.is_empty());
    let mut walked = Vec::new();
    let mut token = String::new();
    for _ in 0..=full.entries.len() {
        let page = status(
            &mut lab.routing,
            pb::GetAdvertisementStatusRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(page.entries.len() <= 1);
        walked.extend(
            page.entries
                .iter()
                .map(|e| (e.prefix.clone(), e.node.clone())),
        );
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<_> = full
        .entries
        .iter()
        .map(|e| (e.prefix.clone(), e.node.clone()))
        .collect();
    assert_eq!(walked, expected);
    let bad = lab
        .routing
        .get_advertisement_status(pb::GetAdvertisementStatusRequest {
            page_token: "xyz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("page_token"), "{}", bad.message());

    // kill -9 of s1: its entries turn stale (its route stream ends at once; its reports,
    // every second, would age out within three seconds anyway) and count as differences.
    let killed = Instant::now();
    speakers[1].kill9();
    let s = until(
        &mut lab.routing,
        Duration::from_secs(5),
        "s1 shown stale after kill -9",
        |s| {
            entry(s, WEB, "s1").is_some_and(|e| {
                e.speaker == pb::SpeakerStatus::Stale as i32
                    && !e.announced
                    && e.session_state == "Unknown"
                    && e.difference.starts_with("speaker stale")
            })
        },
    )
    .await;
    eprintln!("s1 stale {:?} after kill -9", killed.elapsed());
    assert!(s.differences >= 1);
    assert!(agrees(&s, WEB, "s0"), "s0 is untouched: {s:#?}");

    // SIGTERM of s0: its final report says so before its sessions close.
    speakers[0].terminate(Duration::from_secs(15));
    let s = status(
        &mut lab.routing,
        pb::GetAdvertisementStatusRequest::default(),
    )
    .await;
    let e = entry(&s, WEB, "s0").unwrap_or_else(|| panic!("{s:#?}"));
    assert_eq!(
        e.speaker,
        pb::SpeakerStatus::ShutDown as i32,
        "the final report arrived before the process exited: {e:#?}"
    );
    assert!(e.difference.starts_with("speaker shut down"), "{e:#?}");
    // Now web is announced by no live speaker, and says why.
    assert!(
        entry(&s, WEB, "s1")
            .is_some_and(|e| e.not_announced_reason.starts_with("no Established session")),
        "{s:#?}"
    );
    expect_paths(&tor, WEB, &[]).await;
}
