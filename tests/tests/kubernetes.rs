//! The whole pipeline once, from Kubernetes to the ToR: the fake API server →
//! `herald-cluster-watcher` → `herald-ipam` on Postgres → two `herald-route-speaker`s →
//! FRR. `kubectl apply` of the lab Service ends with an EXTERNAL-IP and two paths.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use herald_api::ipam::v1 as ipam_pb;
use herald_e2e::{CONVERGE, Ipam, KubeLab, LAB_PREFIX, expect_paths, lab_pool, port};
use herald_fake_kube::{FakeKube, SERVICES};
use herald_test_support::TestDb;
use herald_tor_harness::{Tor, TorConfig, TorKind};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_applied_to_kubernetes_reaches_the_tor_with_two_paths() {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = Ipam::start(dir.path(), &db.url, port()).await;
    ipam.ipam()
        .await
        .create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(lab_pool()),
        })
        .await
        .unwrap();
    let mut policy = herald_e2e::tor_policy(&tor, 9);
    policy.peers[0].node_selector = None;
    ipam.routing().await.set_bgp_policy(policy).await.unwrap();

    let mut lab = KubeLab::builder(dir.path()).start().await;
    lab.start_watcher(&ipam.endpoint());
    // The watcher registers the Nodes; the speakers then find themselves.
    lab.wait_registered(&ipam, Duration::from_secs(10)).await;
    lab.start_speakers(&ipam.endpoint());
    let kube = &lab.kube;

    // kubectl apply -f lb-nginx-service.yaml
    kube.create(
        SERVICES,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "lb-nginx-service"},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": "herald.io/bgp",
                "selector": {"app": "nginx"},
                "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}],
            },
        }),
    )
    .unwrap();
    let ingress = kube
        .wait_for(CONVERGE, |k| {
            let svc = k.get(SERVICES, "default", "lb-nginx-service")?;
            svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
        .await;
    assert_eq!(ingress.as_deref(), Some("172.16.0.241"), "EXTERNAL-IP");
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10", "127.0.0.11"]).await;

    // kubectl delete service lb-nginx-service
    kube.delete(SERVICES, "default", "lb-nginx-service")
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &[]).await;
}

/// The definitions committed under deploy/helm/herald/crds, registered as `kubectl apply -f
/// deploy/helm/herald/crds/` would; answers (pools, peers, advertisements, settings).
fn register_herald_crds(kube: &FakeKube) -> [herald_fake_kube::Resource; 4] {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/herald/crds");
    let mut found = Vec::new();
    for file in ["ippools", "bgppeers", "bgpadvertisements", "bgpsettings"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}.yaml")).unwrap();
        let crd: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        found.push(kube.register_crd(crd).unwrap()[0]);
    }
    found.try_into().unwrap()
}

fn accepted(object: &serde_json::Value) -> Option<(String, String)> {
    let c = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    Some((
        c["status"].as_str()?.to_string(),
        c["message"].as_str().unwrap_or("").to_string(),
    ))
}

/// The README's lab as custom resources, nothing through the API: the Service's address
/// and its pool's /28 reach the ToR; the peer shows both sessions; deleting the peer is
/// refused while it carries the route, and withdraws it when forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lab_as_custom_resources_reaches_the_tor_and_a_peer_in_use_is_kept() {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = Ipam::start(dir.path(), &db.url, port()).await;
    let mut lab = KubeLab::builder(dir.path()).start().await;
    let kube = &lab.kube;
    let [pools, peers, advertisements, settings] = register_herald_crds(kube);
    kube.create(
        settings,
        json!({"metadata": {"name": "default"}, "spec": {"localASN": herald_tor_harness::NODE_ASN}}),
    )
    .unwrap();
    kube.create(
        pools,
        json!({"metadata": {"name": "lab"}, "spec": {"addresses": ["172.16.0.240/28"]}}),
    )
    .unwrap();
    kube.create(
        peers,
        json!({"metadata": {"name": "tor"}, "spec": {
            "peerASN": herald_tor_harness::TOR_ASN, "peerAddress": "127.0.0.1",
            "peerPort": tor.bgp_port(), "holdTime": "9s", "connectTime": "1s"}}),
    )
    .unwrap();
    kube.create(
        advertisements,
        json!({"metadata": {"name": "lab"}, "spec": {"ipAddressPools": ["lab"], "aggregationLength": 28}}),
    )
    .unwrap();

    lab.start_watcher(&ipam.endpoint());
    lab.start_speakers(&ipam.endpoint());
    let kube = &lab.kube;
    kube.create(
        SERVICES,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "lb-nginx-service"},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": "herald.io/bgp",
                "selector": {"app": "nginx"},
                "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}],
            },
        }),
    )
    .unwrap();
    let ingress = kube
        .wait_for(Duration::from_secs(60), |k| {
            let svc = k.get(SERVICES, "default", "lb-nginx-service")?;
            svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
        .await;
    assert_eq!(ingress.as_deref(), Some("172.16.0.241"), "EXTERNAL-IP");
    let both = ["127.0.0.10", "127.0.0.11"];
    expect_paths(&tor, LAB_PREFIX, &both).await;
    expect_paths(&tor, "172.16.0.240/28", &both).await;
    let peer = kube
        .wait_for(Duration::from_secs(60), |k| {
            k.get(peers, "", "tor")
                .filter(|p| p["status"]["established"] == "2/2")
        })
        .await;
    assert!(
        peer.is_some(),
        "the peer's status shows both sessions: {:#}",
        kube.get(peers, "", "tor").unwrap()
    );

    // kubectl delete bgppeer tor: refused while it carries the Service's route.
    kube.delete(peers, "", "tor").unwrap();
    let refused = kube
        .wait_for(Duration::from_secs(30), |k| {
            k.get(peers, "", "tor")
                .and_then(|p| accepted(&p))
                .filter(|(status, _)| status == "False")
        })
        .await;
    let (_, message) = refused.expect("the deletion is refused");
    assert!(message.contains("lb-nginx-service"), "{message}");
    assert!(message.contains("herald.io/force-delete"), "{message}");
    expect_paths(&tor, LAB_PREFIX, &both).await;

    // Forced: the routes are withdrawn and the peer goes.
    kube.patch(
        peers,
        "",
        "tor",
        &json!({"metadata": {"annotations": {"herald.io/force-delete": "true"}}}),
    )
    .unwrap();
    expect_paths(&tor, LAB_PREFIX, &[]).await;
    let gone = kube
        .wait_for(Duration::from_secs(30), |k| {
            k.get(peers, "", "tor").is_none().then_some(())
        })
        .await;
    assert!(gone.is_some(), "the peer is deleted once forced");
}
