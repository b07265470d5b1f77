//! From an allocation to a route at a real ToR: `herald-ipam` on Postgres, one
//! `herald-route-speaker` per node (127.0.0.10 and up), and FRR or GoBGP as the ToR.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_e2e::{
    CONVERGE, Ipam, IpamLab, LAB_PREFIX, allocate, expect_paths, node, observe, speaker, tor_policy,
};
use herald_tor_harness::{Tor, TorConfig, TorKind};

/// The labs of the seeds, end to end: selective peering, ECMP, Local Services following
/// their endpoints, NotReady nodes and release.
async fn lab(kind: TorKind) {
    let tor = Tor::start(TorConfig::new(kind)).await.unwrap();
    let mut lab = IpamLab::start().await;
    lab.routing
        .set_bgp_policy(tor_policy(&tor, 9))
        .await
        .unwrap();
    // Four nodes; two carry bgp-peer=true (the Calico selective-peering lesson).
    let addresses = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"];
    for (i, address) in addresses.iter().enumerate() {
        let labels: &[(&str, &str)] = if i < 2 { &[("bgp-peer", "true")] } else { &[] };
        lab.routing
            .upsert_node(node(&format!("n{i}"), address, labels, true))
            .await
            .unwrap();
    }
    let _speakers: Vec<_> = (0..4)
        .map(|i| speaker(&format!("n{i}"), &lab.ipam.endpoint()))
        .collect();
    let two = tor
        .wait_neighbors(CONVERGE, |n| {
            n.iter().filter(|n| n.established).count() == 2
        })
        .await
        .unwrap();
    let mut peering: Vec<String> = two
        .iter()
        .filter(|n| n.established)
        .map(|n| n.address.to_string())
        .collect();
    peering.sort();
    assert_eq!(
        peering,
        ["127.0.0.10", "127.0.0.11"],
        "only the labelled nodes peer"
    );

    // The lab Service: 172.16.0.241 with one path per peering node.
    let allocated = lab
        .alloc
        .allocate(allocate("default", "lb-nginx-service", "lb"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allocated.allocation.unwrap().ips[0].ip, "172.16.0.241");
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10", "127.0.0.11"]).await;

    // Relabelling adds the node's session and path; unlabelling removes them.
    lab.routing
        .upsert_node(node("n2", "127.0.0.12", &[("bgp-peer", "true")], true))
        .await
        .unwrap();
    expect_paths(
        &tor,
        LAB_PREFIX,
        &["127.0.0.10", "127.0.0.11", "127.0.0.12"],
    )
    .await;
    lab.routing
        .upsert_node(node("n2", "127.0.0.12", &[], true))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10", "127.0.0.11"]).await;

    // Local: only the node with endpoints announces, and the path follows the endpoints.
    let local = |nodes: &[&str]| pb::ServiceEndpoints {
        owner_uid: "lb".into(),
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        endpoint_nodes: nodes.iter().map(|s| s.to_string()).collect(),
        traceparent: String::new(),
    };
    lab.routing
        .set_service_endpoints(local(&["n1"]))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.11"]).await;
    lab.routing
        .set_service_endpoints(local(&["n0"]))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10"]).await;

    // Back to Cluster; a node going NotReady withdraws its path.
    lab.routing
        .set_service_endpoints(pb::ServiceEndpoints {
            traffic_policy: ipam_pb::TrafficPolicy::Cluster as i32,
            ..local(&["n0"])
        })
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10", "127.0.0.11"]).await;
    lab.routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")], false))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.11"]).await;

    // Desired and actual agree once the speakers have reported.
    let mut agreed = false;
    for _ in 0..50 {
        let status = lab
            .routing
            .get_advertisement_status(pb::GetAdvertisementStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ours: Vec<_> = status
            .entries
            .iter()
            .filter(|e| e.prefix == LAB_PREFIX)
            .collect();
        if ours.len() == 1
            && ours[0].node == "n1"
            && ours[0].announced
            && ours[0].difference.is_empty()
        {
            assert_eq!(ours[0].service, "default/lb-nginx-service");
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        agreed,
        "the advertisement status never showed n1 announcing the lab prefix"
    );

    // Release: the route is gone at the ToR.
    lab.alloc
        .release(ipam_pb::ReleaseRequest {
            owner_uid: "lb".into(),
            reason: "service deleted".into(),
        })
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lab_pipeline_with_frr() {
    lab(TorKind::Frr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lab_pipeline_with_gobgp() {
    lab(TorKind::Gobgp).await;
}

/// Fail-static: killing and restarting the IPAM service changes nothing at the ToR; a
/// killed speaker's path goes once the ToR's hold time runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipam_crash_is_invisible_at_the_tor_and_a_dead_speaker_ages_out() {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let mut lab = IpamLab::start().await;
    let ipam_port = lab.ipam.addr.port();
    // A short hold time so a dead speaker ages out quickly: 3 s is the RFC minimum.
    lab.routing
        .set_bgp_policy(tor_policy(&tor, 3))
        .await
        .unwrap();
    for (i, address) in ["127.0.0.20", "127.0.0.21"].iter().enumerate() {
        lab.routing
            .upsert_node(node(
                &format!("m{i}"),
                address,
                &[("bgp-peer", "true")],
                true,
            ))
            .await
            .unwrap();
    }
    let mut speakers: Vec<_> = (0..2)
        .map(|i| speaker(&format!("m{i}"), &lab.ipam.endpoint()))
        .collect();
    lab.alloc
        .allocate(allocate("default", "lb-nginx-service", "lb"))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.20", "127.0.0.21"]).await;

    lab.ipam.process.kill9();
    let during = observe(&tor, LAB_PREFIX, Duration::from_secs(3)).await;
    lab.ipam = Ipam::start(lab.dir.path(), &lab.db.url, ipam_port).await;
    let after = observe(&tor, LAB_PREFIX, Duration::from_secs(3)).await;
    let both = vec!["127.0.0.20".to_string(), "127.0.0.21".to_string()];
    assert_eq!(
        during,
        std::slice::from_ref(&both),
        "the ToR saw a change while the IPAM service was down"
    );
    assert_eq!(
        after,
        [both],
        "the ToR saw a change when the IPAM service came back"
    );
    drop(lab.ipam);

    speakers[0].kill9();
    let started = std::time::Instant::now();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.21"]).await;
    // Hold time 3 s plus the ToR's own timer granularity.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}
