//! One-step migration from MetalLB: a cluster configured for MetalLB (an IPAddressPool
//! with avoidBuggyIPs as in the MetalLB-with-Calico guide, a BGPPeer, a BGPAdvertisement)
//! whose 200 Services already have their addresses. Herald starts with `--import metallb`
//! and nothing else configured: no pool, no policy through the API. Every Service keeps
//! its address, every address reaches a real ToR from both nodes, and the Services MetalLB
//! had not served yet get addresses no existing one holds.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use herald_api::ipam::v1 as ipam_pb;
use herald_e2e::{Ipam, KubeLab, metallb_crd, next_hops, port};
use herald_fake_kube::{FakeKube, Resource, SERVICES};
use herald_test_support::TestDb;
use herald_tor_harness::{Family, NODE_ASN, TOR_ASN, Tor, TorConfig, TorKind};
use serde_json::{Value, json};

const SERVICES_HELD: usize = 200;
const PENDING: usize = 5;
/// 200 routes from two speakers on a loaded machine.
const ROUTES_CONVERGE: Duration = Duration::from_secs(90);

/// A Service as MetalLB left it: no class, its address in status.
fn metallb_service(i: usize, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": format!("svc-{i:03}")},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": format!("app-{i}")},
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}},
    })
}

fn ingress(fake: &FakeKube, name: &str) -> Option<String> {
    fake.get(SERVICES, "default", name)?["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_metallb_cluster_switches_to_herald_without_a_service_changing_address() {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = Ipam::start(dir.path(), &db.url, port()).await;

    let mut lab = KubeLab::builder(dir.path())
        .namespace("metallb-system")
        // MetalLB's Services name no load balancer class.
        .watcher_args(&["--import", "metallb", "--default-class"])
        .start()
        .await;
    let kube = &lab.kube;
    let pools: Resource = kube
        .register_crd(metallb_crd("IPAddressPool", "ipaddresspools", &["v1beta1"]))
        .unwrap()[0];
    let peers: Resource = kube
        .register_crd(metallb_crd("BGPPeer", "bgppeers", &["v1beta2", "v1beta1"]))
        .unwrap()[0];
    let advertisements: Resource = kube
        .register_crd(metallb_crd(
            "BGPAdvertisement",
            "bgpadvertisements",
            &["v1beta1"],
        ))
        .unwrap()[0];

    // MetalLB's configuration, unchanged.
    kube.create(
        pools,
        json!({"metadata": {"namespace": "metallb-system", "name": "lab"},
               "spec": {"addresses": ["10.208.1.0/24"], "avoidBuggyIPs": true}}),
    )
    .unwrap();
    kube.create(
        peers,
        json!({"metadata": {"namespace": "metallb-system", "name": "tor"},
               "spec": {"myASN": NODE_ASN, "peerASN": TOR_ASN, "peerAddress": "127.0.0.1",
                        "peerPort": tor.bgp_port(), "holdTime": "9s", "connectTime": "1s"}}),
    )
    .unwrap();
    kube.create(
        advertisements,
        json!({"metadata": {"namespace": "metallb-system", "name": "lab"},
               "spec": {"ipAddressPools": ["lab"]}}),
    )
    .unwrap();
    // 200 Services whose addresses MetalLB handed out: the lowest 200 of the pool, in the
    // opposite order of their names, so a Service that took another's address, or the
    // lowest free one, would show.
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..SERVICES_HELD {
        let ip = format!("10.208.1.{}", SERVICES_HELD - i);
        kube.create(SERVICES, metallb_service(i, &ip)).unwrap();
        held.insert(format!("svc-{i:03}"), ip);
    }
    // And a few MetalLB had not served yet: they must not take any of those addresses.
    for i in 0..PENDING {
        kube.create(
            SERVICES,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": "default", "name": format!("new-{i}")},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
            }),
        )
        .unwrap();
    }

    lab.start_watcher(&ipam.endpoint());
    lab.wait_registered(&ipam, Duration::from_secs(30)).await;
    lab.start_speakers(&ipam.endpoint());
    let kube = &lab.kube;

    // The IPAM holds exactly what MetalLB handed out, for the same Services.
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..600 {
        let list = ipam
            .ipam()
            .await
            .list_allocations(ipam_pb::ListAllocationsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        claimed = list
            .allocations
            .iter()
            .filter_map(|a| Some((a.owner.as_ref()?.name.clone(), a.ips.first()?.ip.clone())))
            .collect();
        if claimed.len() >= SERVICES_HELD + PENDING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut pending: Vec<String> = (0..PENDING)
        .map(|i| claimed.remove(&format!("new-{i}")).unwrap_or_default())
        .collect();
    pending.sort();
    let expected: Vec<String> = (0..PENDING)
        .map(|i| format!("10.208.1.{}", SERVICES_HELD + 1 + i))
        .collect();
    assert_eq!(
        claimed, held,
        "every Service's address is claimed as it was"
    );
    assert_eq!(
        pending, expected,
        "the Services without an address get the lowest ones no Service held"
    );
    let pool = ipam
        .ipam()
        .await
        .get_pool(ipam_pb::GetPoolRequest { name: "lab".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(pool.avoid_buggy_ips, "the MetalLB pool, field for field");

    // Every address reaches the ToR, from both nodes.
    let want = vec!["127.0.0.10".to_string(), "127.0.0.11".to_string()];
    let routed = tor
        .wait_until(Family::Ipv4, ROUTES_CONVERGE, |rib| {
            held.values()
                .all(|ip| next_hops(rib, &format!("{ip}/32")) == want)
        })
        .await;
    if let Err(e) = routed {
        let rib = tor.routes(Family::Ipv4).await.unwrap();
        let missing: Vec<&String> = held
            .values()
            .filter(|ip| next_hops(&rib, &format!("{ip}/32")) != want)
            .take(10)
            .collect();
        panic!("not every address reached the ToR: {e}; first missing: {missing:?}");
    }
    for (name, ip) in &held {
        assert_eq!(
            ingress(kube, name).as_ref(),
            Some(ip),
            "{name} kept its address"
        );
    }
}
