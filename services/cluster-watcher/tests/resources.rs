//! Herald's custom resources over real HTTP: the definitions from deploy/helm/herald/crds registered in
//! the fake API server, the watcher binary reconciling them into herald-ipam on Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use herald_api::ipam::v1 as pb;
use herald_api::routing::v1 as routing;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_fake_kube::{FakeKube, Resource, SECRETS, SERVICES, Verb};
use serde_json::{Value, json};

/// Registers every definition committed under deploy/helm/herald/crds; answers (pools, peers,
/// advertisements, settings).
fn register_crds(fake: &FakeKube) -> [Resource; 4] {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/helm/herald/crds");
    let mut found = Vec::new();
    for file in ["ippools", "bgppeers", "bgpadvertisements", "bgpsettings"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}.yaml")).unwrap();
        let crd: Value = serde_yaml::from_str(&text).unwrap();
        found.push(fake.register_crd(crd).unwrap()[0]);
    }
    found.try_into().unwrap()
}

fn accepted(object: &Value) -> Option<(String, String)> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

async fn wait_object(
    fake: &FakeKube,
    resource: Resource,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    fake.wait_for(WAIT, |f| f.get(resource, "", name).filter(|o| check(o)))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{name}: {what}; it is {:#}",
                fake.get(resource, "", name).unwrap_or_default()
            )
        })
}

async fn ipam_pool(lab: &Lab, name: &str) -> Option<pb::Pool> {
    lab.ipam
        .client()
        .await
        .get_pool(pb::GetPoolRequest { name: name.into() })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_reconciled_with_status_refusals_and_a_finalizer() {
    let lab = Lab::start(&[]).await;
    let [pools, ..] = register_crds(&lab.fake);
    lab.fake
        .create(
            pools,
            json!({"metadata": {"name": "lab"}, "spec": {"addresses": ["172.16.0.240/28"], "quarantine": "0s"}}),
        )
        .unwrap();
    // A Service already holding an address in the pool: the pool exists before the claim.
    let mut held = with_annotation(ours("default", "held"), "herald.io/pool", "lab");
    held["status"] = json!({"loadBalancer": {"ingress": [{"ip": "172.16.0.250"}]}});
    lab.fake.create(SERVICES, held).unwrap();
    let _w = lab.watcher("w1");

    let pool = wait_object(&lab.fake, pools, "lab", "accepted with its figures", |o| {
        accepted(o).is_some_and(|(s, _)| s == "True") && o["status"]["used"] == 1
    })
    .await;
    assert_eq!(pool["status"]["observedGeneration"], 1);
    assert_eq!(
        pool["status"]["total"], "14",
        "a /28 less its first and last"
    );
    assert_eq!(pool["status"]["free"], "13");
    assert_eq!(
        pool["metadata"]["finalizers"],
        json!(["herald.io/in-use"]),
        "{pool:#}"
    );
    let in_ipam = ipam_pool(&lab, "lab").await.expect("created in the IPAM");
    assert_eq!(in_ipam.addresses, ["172.16.0.240/28"]);
    assert_eq!(
        ingress_ips(&lab.fake.get(SERVICES, "default", "held").unwrap()),
        ["172.16.0.250"],
        "the address in status is kept"
    );

    // A changed spec is an update; the status follows the generation.
    lab.fake
        .patch(pools, "", "lab", &json!({"spec": {"avoidBuggyIPs": true}}))
        .unwrap();
    wait_object(&lab.fake, pools, "lab", "observed generation 2", |o| {
        o["status"]["observedGeneration"] == 2
    })
    .await;
    assert!(ipam_pool(&lab, "lab").await.unwrap().avoid_buggy_ips);

    // The IPAM's refusals, word for word.
    lab.fake
        .create(
            pools,
            json!({"metadata": {"name": "overlap"}, "spec": {"addresses": ["172.16.0.248/29"]}}),
        )
        .unwrap();
    let overlap = wait_object(&lab.fake, pools, "overlap", "refused", |o| {
        accepted(o).is_some_and(|(s, _)| s == "False")
    })
    .await;
    let (_, message) = accepted(&overlap).unwrap();
    assert!(
        message.contains("overlaps") && message.contains("\"lab\""),
        "{message}"
    );
    assert!(ipam_pool(&lab, "overlap").await.is_none());
    lab.fake
        .create(
            pools,
            json!({"metadata": {"name": "bad"}, "spec": {"addresses": ["10.9.0.0/24"], "quarantine": "soon"}}),
        )
        .unwrap();
    let bad = wait_object(&lab.fake, pools, "bad", "refused", |o| {
        accepted(o).is_some()
    })
    .await;
    let (status, message) = accepted(&bad).unwrap();
    assert_eq!(status, "False");
    assert!(message.starts_with("spec.quarantine:"), "{message}");

    // Deleting a pool in use is refused with its holders, until forced.
    lab.fake.delete(pools, "", "lab").unwrap();
    let held = wait_object(&lab.fake, pools, "lab", "refused deletion", |o| {
        accepted(o).is_some_and(|(_, m)| m.contains("still holds allocations"))
    })
    .await;
    let (_, message) = accepted(&held).unwrap();
    assert!(message.contains("default/held"), "{message}");
    assert!(message.contains("herald.io/force-delete"), "{message}");
    assert!(ipam_pool(&lab, "lab").await.is_some());
    lab.fake
        .patch(
            pools,
            "",
            "lab",
            &json!({"metadata": {"annotations": {"herald.io/force-delete": "true"}}}),
        )
        .unwrap();
    lab.fake
        .wait_for(WAIT, |f| f.get(pools, "", "lab").is_none().then_some(()))
        .await
        .expect("the pool goes once forced");
    assert!(ipam_pool(&lab, "lab").await.is_none());
    // The overlap is gone: the other pool is accepted now.
    wait_object(&lab.fake, pools, "overlap", "accepted", |o| {
        accepted(o).is_some_and(|(s, _)| s == "True")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_advertisements_and_settings_become_the_bgp_policy() {
    let lab = Lab::start(&[("lab", &["172.16.0.240/28"])]).await;
    let [_, peers, advertisements, settings] = register_crds(&lab.fake);
    lab.fake
        .create(
            SECRETS,
            json!({"metadata": {"namespace": "herald-system", "name": "tor-md5"},
                   "data": {"password": "czNjcmV0"}}),
        )
        .unwrap();
    lab.fake
        .create(
            settings,
            json!({"metadata": {"name": "default"}, "spec": {"localASN": 64512, "routerIDSubnet": "192.168.1.0/24"}}),
        )
        .unwrap();
    lab.fake
        .create(
            peers,
            json!({"metadata": {"name": "tor"}, "spec": {
                "peerASN": 65000, "peerAddress": "127.0.0.1", "peerPort": 1790,
                "holdTime": "9s", "passwordSecret": {"name": "tor-md5", "namespace": "herald-system"},
                "nodeSelector": {"matchLabels": {"rack": "r1"}}}}),
        )
        .unwrap();
    lab.fake
        .create(
            advertisements,
            json!({"metadata": {"name": "lab"}, "spec": {
                "ipAddressPools": ["lab"], "communities": ["65000:100"], "localPref": 150}}),
        )
        .unwrap();
    let _w = lab.watcher("w1");
    let routing = RoutingClient::new(
        tonic::transport::Channel::from_shared(lab.ipam.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let read = |mut routing: RoutingClient<tonic::transport::Channel>| async move {
        routing
            .get_bgp_policy(routing::GetBgpPolicyRequest {})
            .await
            .ok()
            .map(tonic::Response::into_inner)
    };
    let mut policy = None;
    for _ in 0..300 {
        if let Some(p) = read(routing.clone()).await
            && p.local_asn == 64512
            && !p.advertisements.is_empty()
        {
            policy = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let policy = policy.expect("the policy is set");
    assert_eq!(policy.router_id_subnet, "192.168.1.0/24");
    let peer = &policy.peers[0];
    assert_eq!(
        (
            peer.name.as_str(),
            peer.address.as_str(),
            peer.asn,
            peer.port
        ),
        ("tor", "127.0.0.1", 65000, 1790)
    );
    assert_eq!(peer.hold_time_seconds, 9);
    assert_eq!(
        peer.md5_password, "(set)",
        "the password from the Secret is stored"
    );
    assert_eq!(
        peer.node_selector.as_ref().unwrap().match_labels["rack"],
        "r1"
    );
    let adv = &policy.advertisements[0];
    assert_eq!((adv.pool.as_str(), adv.local_pref), ("lab", Some(150)));
    assert_eq!(adv.communities, ["65000:100"]);

    let tor = wait_object(&lab.fake, peers, "tor", "accepted", |o| {
        accepted(o).is_some_and(|(s, _)| s == "True") && o["status"]["established"].is_string()
    })
    .await;
    assert_eq!(
        tor["status"]["established"], "0/0",
        "no speaker reports a session"
    );
    wait_object(&lab.fake, advertisements, "lab", "accepted", |o| {
        accepted(o).is_some_and(|(s, _)| s == "True")
    })
    .await;

    // A policy the routing API refuses: every resource says why.
    lab.fake
        .patch(
            advertisements,
            "",
            "lab",
            &json!({"spec": {"communities": ["not-a-community"]}}),
        )
        .unwrap();
    let refused = wait_object(&lab.fake, advertisements, "lab", "refused", |o| {
        accepted(o).is_some_and(|(s, _)| s == "False")
    })
    .await;
    let (_, message) = accepted(&refused).unwrap();
    assert!(message.contains("not-a-community"), "{message}");
    wait_object(&lab.fake, peers, "tor", "refused with the policy", |o| {
        accepted(o).is_some_and(|(_, m)| m == message)
    })
    .await;
    assert_eq!(
        read(routing.clone()).await.unwrap().advertisements[0].communities,
        ["65000:100"],
        "a refused policy leaves the last good one"
    );

    // A peer that carries no route is deleted at once and leaves the policy.
    lab.fake
        .patch(
            advertisements,
            "",
            "lab",
            &json!({"spec": {"communities": ["65000:200"]}}),
        )
        .unwrap();
    lab.fake.delete(peers, "", "tor").unwrap();
    lab.fake
        .wait_for(WAIT, |f| f.get(peers, "", "tor").is_none().then_some(()))
        .await
        .expect("the peer goes");
    let mut gone = false;
    for _ in 0..100 {
        if read(routing.clone())
            .await
            .is_some_and(|p| p.peers.is_empty())
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the peer left the policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cilium_pool_is_imported_from_the_version_the_cluster_serves() {
    let lab = Lab::start(&[]).await;
    // An older Cilium: only v2alpha1 is served, so the watcher falls back to it.
    let cilium = lab
        .fake
        .register_crd(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "ciliumloadbalancerippools.cilium.io"},
            "spec": {
                "group": "cilium.io",
                "scope": "Cluster",
                "names": {"kind": "CiliumLoadBalancerIPPool", "plural": "ciliumloadbalancerippools"},
                "versions": [{"name": "v2alpha1", "served": true, "storage": true}],
            },
        }))
        .unwrap()[0];
    lab.fake
        .create(
            cilium,
            json!({"metadata": {"name": "blue"}, "spec": {
                "blocks": [{"start": "10.30.0.10", "stop": "10.30.0.19"}],
                "serviceSelector": {"matchLabels": {"color": "blue"}}}}),
        )
        .unwrap();
    let mut svc = ours("default", "web");
    svc["metadata"]["labels"] = json!({"color": "blue"});
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "10.30.0.15"}]}});
    lab.fake.create(SERVICES, svc).unwrap();
    lab.fake
        .create(SERVICES, {
            let mut s = ours("default", "api");
            s["metadata"]["labels"] = json!({"color": "blue"});
            s
        })
        .unwrap();
    let _w = Watcher::start(
        &lab.fake,
        &lab.ipam.endpoint(),
        "w1",
        &["--import", "cilium"],
    );

    assert_eq!(
        wait_ingress(&lab.fake, "default", "api").await,
        ["10.30.0.10"]
    );
    assert_eq!(
        ingress_ips(&lab.fake.get(SERVICES, "default", "web").unwrap()),
        ["10.30.0.15"],
        "the address Cilium gave is kept"
    );
    let pool = ipam_pool(&lab, "blue").await.expect("imported");
    assert_eq!(pool.addresses, ["10.30.0.10-10.30.0.19"]);
    assert_eq!(pool.service_selector.unwrap().match_labels["color"], "blue");
}

/// A permission the watcher's RBAC role lacks on its own custom resources (list IPPools;
/// patch BGPPeers, which adding the finalizer needs) fails /readyz naming verb and
/// resource, with one ERROR line however often it is retried; once granted, the work is
/// done and the watcher is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_permission_on_a_custom_resource_fails_readiness_until_granted() {
    let lab = Lab::start(&[]).await;
    let [pools, peers, ..] = register_crds(&lab.fake);
    lab.fake
        .create(
            pools,
            json!({"metadata": {"name": "lab"}, "spec": {"addresses": ["172.16.0.240/28"]}}),
        )
        .unwrap();
    lab.fake.deny(Verb::List, pools);
    let w = Watcher::start_logged(&lab.fake, &lab.ipam.endpoint(), "w1");

    let body = w.wait_not_ready("list ippools.herald.io").await;
    assert!(body.contains("forbidden"), "{body}");
    wait_refused(&lab.fake, Verb::List, "ippools", 3).await;
    w.assert_logged_once_as_error("RBAC role must allow list on ippools.herald.io");
    assert!(
        ipam_pool(&lab, "lab").await.is_none(),
        "a pool it cannot list is not applied"
    );

    lab.fake.allow(Verb::List, pools);
    wait_object(&lab.fake, pools, "lab", "accepted once listed", |o| {
        accepted(o).is_some_and(|(s, _)| s == "True")
    })
    .await;
    w.wait_ready().await;

    // A write refused in a reconcile: the peer's finalizer cannot be added.
    lab.fake.deny(Verb::Patch, peers);
    lab.fake
        .create(
            peers,
            json!({"metadata": {"name": "tor"}, "spec": {"peerASN": 65000, "peerAddress": "127.0.0.1"}}),
        )
        .unwrap();
    w.wait_not_ready("patch bgppeers.herald.io").await;
    wait_refused(&lab.fake, Verb::Patch, "bgppeers", 3).await;
    w.assert_logged_once_as_error("RBAC role must allow patch on bgppeers.herald.io");

    lab.fake.allow(Verb::Patch, peers);
    wait_object(&lab.fake, peers, "tor", "holding the finalizer", |o| {
        o["metadata"]["finalizers"] == json!(["herald.io/in-use"])
    })
    .await;
    w.wait_ready().await;
}
