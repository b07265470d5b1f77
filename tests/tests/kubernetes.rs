//! The whole pipeline once, from Kubernetes to the ToR: the fake API server →
//! `herald-cluster-watcher` → `herald-ipam` on Postgres → two `herald-route-speaker`s →
//! FRR. `kubectl apply` of the lab Service ends with an EXTERNAL-IP and two paths.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_e2e::{CONVERGE, Ipam, LAB_PREFIX, expect_paths, lab_pool, port, speaker};
use herald_fake_kube::{FakeKube, NAMESPACES, NODES, SERVICES};
use herald_test_support::{ChildProcess, TestDb, workspace_binary};
use herald_tor_harness::{Tor, TorConfig, TorKind};
use serde_json::json;

fn kube_node(name: &str, address: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

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

    let kube = FakeKube::start().await.unwrap();
    kube.create(NAMESPACES, json!({"metadata": {"name": "default"}}))
        .unwrap();
    kube.create(NODES, kube_node("k01-worker", "127.0.0.10"))
        .unwrap();
    kube.create(NODES, kube_node("k01-worker2", "127.0.0.11"))
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig, "default").unwrap();
    let mut watcher = Command::new(workspace_binary("herald-cluster-watcher"));
    watcher
        .args([
            "--ipam-endpoint",
            &ipam.endpoint(),
            "--cluster-id",
            "lab",
            "--identity",
            "e2e",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST");
    let _watcher = ChildProcess::spawn("herald-cluster-watcher", watcher);
    // The watcher registers the Nodes; the speakers then find themselves.
    let mut registered = false;
    for _ in 0..100 {
        let nodes = ipam
            .routing()
            .await
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if nodes.len() == 2 && nodes.iter().all(|n| n.ready) {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(registered, "the watcher never registered both Nodes");
    let _speakers = [
        speaker("k01-worker", &ipam.endpoint()),
        speaker("k01-worker2", &ipam.endpoint()),
    ];

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
