//! The watcher binary against the fake API server and the real herald-ipam on Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use herald_api::ipam::v1 as pb;
use herald_api::routing::v1 as routing;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_fake_kube::{ENDPOINT_SLICES, LEASES, NODES, SERVICES, Verb};
use herald_test_support::free_port;
use serde_json::json;

const LAB_POOL: &[&str] = &["172.16.0.240/28"];
const BIG_POOL: &[&str] = &["10.20.0.0/24"];

fn node(name: &str, ip: &str, ready: bool) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_service_gets_its_address_and_routes_learn_its_nodes() {
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    lab.fake
        .create(NODES, node("worker-1", "192.168.1.11", true))
        .unwrap();
    let _w = lab.watcher("w1");

    lab.fake
        .create(SERVICES, ours("default", "lb-nginx-service"))
        .unwrap();
    lab.fake
        .create(
            ENDPOINT_SLICES,
            json!({
                "metadata": {"namespace": "default", "name": "lb-nginx-service-abcde",
                             "labels": {"kubernetes.io/service-name": "lb-nginx-service"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "worker-1", "conditions": {"ready": true}}],
            }),
        )
        .unwrap();

    assert_eq!(
        wait_ingress(&lab.fake, "default", "lb-nginx-service").await,
        vec!["172.16.0.241"]
    );
    let cond = wait_condition(&lab.fake, "default", "lb-nginx-service", "True").await;
    assert_eq!(cond["reason"], "IPAllocated");
    assert_eq!(cond["message"], "allocated 172.16.0.241 from pool lab");
    // The Event follows the status write.
    lab.fake
        .wait_for(WAIT, |f| {
            (!f.events_for("default", "lb-nginx-service").is_empty()).then_some(())
        })
        .await;
    let events = lab.fake.events_for("default", "lb-nginx-service");
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "IPAllocated" && e["type"] == "Normal"),
        "no IPAllocated event: {events:?}"
    );
    let allocations = lab.ipam.allocations().await;
    assert_eq!(allocations.len(), 1);
    let owner = allocations[0].owner.clone().unwrap();
    assert_eq!(
        (owner.namespace.as_str(), owner.name.as_str()),
        ("default", "lb-nginx-service")
    );

    // The node reached the routing service.
    let mut routing = RoutingClient::connect(lab.ipam.endpoint()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes = routing
            .list_nodes(routing::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if let Some(n) = nodes.iter().find(|n| n.name == "worker-1") {
            assert_eq!(n.addresses, vec!["192.168.1.11"]);
            assert!(n.ready);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker-1 never reached the routing service"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A deleted node is deleted there too.
    lab.fake.delete(NODES, "", "worker-1").unwrap();
    let deadline = Instant::now() + WAIT;
    while routing
        .list_nodes(routing::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .iter()
        .any(|n| n.name == "worker-1")
    {
        assert!(
            Instant::now() < deadline,
            "worker-1 was never deleted from the routing service"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleting the Service releases its address.
    lab.fake
        .delete(SERVICES, "default", "lb-nginx-service")
        .unwrap();
    lab.ipam
        .wait_allocations("the lab Service released", |a| a.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_services_at_once_get_distinct_addresses_and_free_them() {
    let lab = Lab::start(&[("big", BIG_POOL)]).await;
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _w = Watcher::start(
        &lab.fake,
        &lab.ipam.endpoint(),
        "w1",
        &["--admin-listen", &admin.to_string()],
    );
    let started = Instant::now();
    for i in 0..200 {
        lab.fake
            .create(SERVICES, ours("default", &format!("svc-{i:03}")))
            .unwrap();
    }
    let all = lab
        .fake
        .wait_for(Duration::from_secs(120), |f| {
            let all = all_ingress(f);
            (all.len() == 200 && all.values().all(|ips| ips.len() == 1)).then_some(all)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "not every Service got an address: {:?}",
                all_ingress(&lab.fake)
                    .values()
                    .filter(|v| v.is_empty())
                    .count()
            )
        });
    eprintln!("200 Services served in {:?}", started.elapsed());
    assert_distinct(all.values().flatten().cloned());
    assert_eq!(lab.ipam.allocations().await.len(), 200);
    // The burst's Allocate requests left together: fewer calls than requests, and no
    // request sent twice (the reconcile after the watcher's own status write asks
    // nothing).
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    let figure = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let calls = figure("herald_watcher_allocate_batch_size_count");
    let requests = figure("herald_watcher_allocate_batch_size_sum");
    eprintln!("{requests} Allocate requests in {calls} calls");
    assert!(
        calls < requests / 2.0,
        "{requests} Allocate requests went in {calls} calls"
    );
    assert!(
        requests < 200.0 + 20.0,
        "{requests} Allocate requests for 200 Services"
    );
    // Their endpoints too: each Service's sent once, together in SetServiceEndpointsBatch.
    let calls = figure("herald_watcher_endpoints_batch_size_count");
    let items = figure("herald_watcher_endpoints_batch_size_sum");
    eprintln!("{items} Services' endpoints in {calls} calls");
    assert!(
        calls < items / 2.0,
        "{items} Services' endpoints went in {calls} calls"
    );
    assert!(
        (200.0..220.0).contains(&items),
        "{items} Services' endpoints sent for 200 Services"
    );

    for i in 0..200 {
        lab.fake
            .delete(SERVICES, "default", &format!("svc-{i:03}"))
            .unwrap();
    }
    lab.ipam
        .wait_allocations("all 200 released", |a| a.is_empty())
        .await;
}

/// A cold start with 200 pending Services, 1,000 reconciles in flight, on an API server
/// that takes 50 ms per write: their Allocates leave in large batches (more than the 32
/// reconciles of the default could gather), while the status patches and Events stay
/// within the watcher's own bound of writes in flight (which 200 reconciles writing at
/// once would pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_batches_widely_and_bounds_its_writes_to_the_api_server() {
    const SERVICES_PENDING: usize = 200;
    /// `controller::KUBE_WRITES_IN_FLIGHT`.
    const WRITES_BOUND: usize = 100;
    let lab = Lab::start(&[("big", BIG_POOL)]).await;
    lab.fake.delay_writes(Duration::from_millis(50));
    for i in 0..SERVICES_PENDING {
        lab.fake
            .create(SERVICES, ours("default", &format!("cold-{i:03}")))
            .unwrap();
    }
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _w = Watcher::start(
        &lab.fake,
        &lab.ipam.endpoint(),
        "w1",
        &["--admin-listen", &admin.to_string(), "--workers", "1000"],
    );
    let all = lab
        .fake
        .wait_for(Duration::from_secs(120), |f| {
            let all = all_ingress(f);
            (all.len() == SERVICES_PENDING && all.values().all(|ips| ips.len() == 1)).then_some(all)
        })
        .await
        .expect("every pending Service got an address");
    assert_distinct(all.values().flatten().cloned());

    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    let sample = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    let calls = sample("herald_watcher_allocate_batch_size_count");
    let up_to_64 = sample("herald_watcher_allocate_batch_size_bucket{le=\"64.0\"}");
    eprintln!("{calls} Allocate calls, {up_to_64} of them of at most 64 requests");
    assert!(
        up_to_64 < calls,
        "no AllocateBatch carried more than 64 of {SERVICES_PENDING} pending Services' \
         requests ({calls} calls)"
    );
    let most = lab.fake.max_writes_in_flight();
    eprintln!("at most {most} writes in flight at the API server");
    assert!(
        most <= WRITES_BOUND + 1,
        "{most} writes were in flight at the API server at once (the bound, and one Lease renewal)"
    );
    // The bound is reached, not the mark of writes one at a time.
    assert!(most > 32, "only {most} writes were ever in flight at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_load_keep_every_address_and_release_what_was_deleted_meanwhile() {
    let lab = Lab::start(&[("big", BIG_POOL)]).await;
    let mut watcher = lab.watcher("w1");
    for i in 0..50 {
        lab.fake
            .create(SERVICES, ours("default", &format!("a-{i:02}")))
            .unwrap();
    }
    let before = lab
        .fake
        .wait_for(WAIT, |f| {
            let all = all_ingress(f);
            all.values().all(|ips| ips.len() == 1).then_some(all)
        })
        .await
        .expect("the first 50 Services got addresses");

    // Crash the watcher in the middle of a burst.
    for i in 0..30 {
        lab.fake
            .create(SERVICES, ours("default", &format!("b-{i:02}")))
            .unwrap();
        if i == 10 {
            watcher.process.kill9();
        }
    }
    // While it is down: delete some, and restart the IPAM service too.
    let deleted: Vec<String> = (0..10).map(|i| format!("a-{i:02}")).collect();
    let deleted_uids: HashSet<String> = deleted
        .iter()
        .map(|n| {
            lab.fake.get(SERVICES, "default", n).unwrap()["metadata"]["uid"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for name in &deleted {
        lab.fake.delete(SERVICES, "default", name).unwrap();
    }
    let port = lab.ipam.addr.port();
    let db_url = lab.ipam.db_url.clone();
    let mut lab = lab;
    lab.ipam.process.kill9();
    lab.ipam = Ipam::start_on(&db_url, port).await;
    let _watcher = lab.watcher("w2");

    let after = lab
        .fake
        .wait_for(WAIT, |f| {
            let all = all_ingress(f);
            (all.len() == 70 && all.values().all(|ips| ips.len() == 1)).then_some(all)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "not every Service got an address after the restarts: {:?}",
                all_ingress(&lab.fake)
            )
        });
    for (name, ips) in &before {
        if !deleted.contains(name) {
            assert_eq!(
                after.get(name),
                Some(ips),
                "{name} changed address across the restarts"
            );
        }
    }
    assert_distinct(after.values().flatten().cloned());
    let allocations = lab
        .ipam
        .wait_allocations("deleted Services released", |a| {
            a.len() == 70
                && !a
                    .iter()
                    .any(|x| deleted_uids.contains(&x.owner.as_ref().unwrap().uid))
        })
        .await;
    // One allocation per Service, and the same address the Service shows.
    let by_name: BTreeMap<String, Vec<String>> = allocations
        .iter()
        .map(|a| {
            (
                a.owner.as_ref().unwrap().name.clone(),
                a.ips.iter().map(|i| i.ip.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(by_name, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_on_the_service_and_touch_nothing_else() {
    // 172.16.1.0/30 serves .1 and .2.
    let lab = Lab::start(&[("small", &["172.16.1.0/30"])]).await;
    let _w = lab.watcher("w1");
    let foreign = svc("default", "not-ours", Some("metallb.io/metallb"));
    lab.fake.create(SERVICES, foreign).unwrap();
    let no_class = svc("default", "no-class", None);
    lab.fake.create(SERVICES, no_class).unwrap();

    lab.fake
        .create(
            SERVICES,
            with_annotation(
                ours("default", "a"),
                "herald.io/load-balancer-ips",
                "172.16.1.1",
            ),
        )
        .unwrap();
    assert_eq!(
        wait_ingress(&lab.fake, "default", "a").await,
        vec!["172.16.1.1"]
    );
    let writes_to_a = lab.fake.writes_to(SERVICES, "default", "a");

    // Requested IP taken.
    lab.fake
        .create(
            SERVICES,
            with_annotation(
                ours("default", "b"),
                "metallb.io/loadBalancerIPs",
                "172.16.1.1",
            ),
        )
        .unwrap();
    let cond = wait_condition(&lab.fake, "default", "b", "False").await;
    assert_eq!(cond["reason"], "RequestedIPTaken", "{cond}");
    assert!(
        cond["message"].as_str().unwrap().contains("172.16.1.1"),
        "{cond}"
    );
    assert!(ingress_ips(&lab.fake.get(SERVICES, "default", "b").unwrap()).is_empty());

    // The last free address, then none.
    lab.fake.create(SERVICES, ours("default", "c")).unwrap();
    assert_eq!(
        wait_ingress(&lab.fake, "default", "c").await,
        vec!["172.16.1.2"]
    );
    lab.fake.create(SERVICES, ours("default", "d")).unwrap();
    let cond = wait_condition(&lab.fake, "default", "d", "False").await;
    assert_eq!(cond["reason"], "PoolExhausted", "{cond}");

    // The Event is published after the condition is written: wait for it.
    for (name, reason) in [("b", "RequestedIPTaken"), ("d", "PoolExhausted")] {
        // The Event follows the status write.
        let failed = |events: &[serde_json::Value]| {
            events.iter().any(|e| {
                e["reason"] == "AllocationFailed"
                    && e["type"] == "Warning"
                    && e["note"].as_str().is_some()
            })
        };
        let found = lab
            .fake
            .wait_for(WAIT, |f| {
                failed(&f.events_for("default", name)).then_some(())
            })
            .await;
        assert!(
            found.is_some(),
            "{name}: no AllocationFailed event ({reason}): {:?}",
            lab.fake.events_for("default", name)
        );
    }

    // Let the watcher settle, then check what it never touched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lab.fake
            .get(SERVICES, "default", "a")
            .map(|s| ingress_ips(&s)),
        Some(vec!["172.16.1.1".to_string()])
    );
    assert_eq!(
        lab.fake.writes_to(SERVICES, "default", "a"),
        writes_to_a,
        "a was written again"
    );
    assert_no_refused_status_patch(&lab);
    for name in ["not-ours", "no-class"] {
        assert_eq!(
            lab.fake.writes_to(SERVICES, "default", name),
            0,
            "{name} was written"
        );
        assert!(
            lab.fake.events_for("default", name).is_empty(),
            "{name} got events"
        );
        assert!(
            lab.fake
                .get(SERVICES, "default", name)
                .unwrap()
                .get("status")
                .is_none()
        );
    }
    let owners: HashSet<String> = lab
        .ipam
        .allocations()
        .await
        .iter()
        .map(|a| a.owner.clone().unwrap().name)
        .collect();
    assert_eq!(owners, HashSet::from(["a".to_string(), "c".to_string()]));

    // A freed address goes to a Service that waits for it (d, which would take any
    // address, goes first so that b's is the only request).
    lab.fake.delete(SERVICES, "default", "d").unwrap();
    lab.fake.delete(SERVICES, "default", "a").unwrap();
    let cond = wait_condition(&lab.fake, "default", "b", "True").await;
    assert_eq!(cond["reason"], "IPAllocated");
    assert_eq!(
        wait_ingress(&lab.fake, "default", "b").await,
        vec!["172.16.1.1"]
    );

    // Changing the requested address releases the old one first (allocations never
    // move): c asks for b's address and loses its own.
    lab.fake
        .patch(
            SERVICES,
            "default",
            "c",
            &json!({"metadata": {"annotations": {"herald.io/load-balancer-ips": "172.16.1.1"}}}),
        )
        .unwrap();
    let cond = wait_condition(&lab.fake, "default", "c", "False").await;
    assert_eq!(cond["reason"], "RequestedIPTaken", "{cond}");
    lab.ipam
        .wait_allocations("c's old address released", |a| {
            !a.iter().any(|x| x.ips.iter().any(|i| i.ip == "172.16.1.2"))
        })
        .await;
    assert!(ingress_ips(&lab.fake.get(SERVICES, "default", "c").unwrap()).is_empty());
    // Once b is gone, c gets what it asked for.
    lab.fake.delete(SERVICES, "default", "b").unwrap();
    wait_condition(&lab.fake, "default", "c", "True").await;
    assert_eq!(
        wait_ingress(&lab.fake, "default", "c").await,
        vec!["172.16.1.1"]
    );

    // A Service that stops being a LoadBalancer is released and its status cleared.
    lab.fake
        .patch(
            SERVICES,
            "default",
            "c",
            &json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}}),
        )
        .unwrap();
    lab.ipam
        .wait_allocations("c released after its type changed", |a| {
            !a.iter().any(|x| x.owner.as_ref().unwrap().name == "c")
        })
        .await;
    lab.fake
        .wait_for(WAIT, |f| {
            condition(&f.get(SERVICES, "default", "c")?)
                .is_none()
                .then_some(())
        })
        .await
        .expect("c's condition removed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_no_refused_status_patch(&lab);
}

/// Nothing but the watcher writes the Services' status in these tests: a refused status
/// patch would mean it wrote from a cache that had not yet seen its own last write.
fn assert_no_refused_status_patch(lab: &Lab) {
    let refused: Vec<_> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.verb == Verb::Patch && r.resource == "services" && r.status == 409)
        .collect();
    assert!(refused.is_empty(), "stale status patches: {refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_watch_makes_the_watcher_list_again_and_carry_on() {
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    let _w = lab.watcher("w1");
    lab.fake.create(SERVICES, ours("default", "first")).unwrap();
    wait_ingress(&lab.fake, "default", "first").await;
    let lists_before = lab.fake.count(Verb::List, SERVICES);

    // History gone and every watch ended with 410; changes made meanwhile must still be seen.
    lab.fake.compact_and_expire();
    lab.fake.delete(SERVICES, "default", "first").unwrap();
    lab.fake
        .create(SERVICES, ours("default", "second"))
        .unwrap();

    wait_ingress(&lab.fake, "default", "second").await;
    lab.ipam
        .wait_allocations("first released, second held", |a| {
            a.len() == 1 && a[0].owner.as_ref().unwrap().name == "second"
        })
        .await;
    assert!(
        lab.fake.count(Verb::List, SERVICES) > lists_before,
        "the watcher never listed again: {:?}",
        lab.fake
            .requests()
            .iter()
            .filter(|r| r.resource == "services")
            .map(|r| (r.verb, r.status))
            .collect::<Vec<_>>()
    );
    let gone_watches = lab
        .fake
        .requests()
        .iter()
        .filter(|r| r.verb == Verb::Watch && r.resource == "services")
        .count();
    assert!(gone_watches >= 2, "the watcher never watched again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_a_standby_takes_over() {
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    let holder = |fake: &herald_fake_kube::FakeKube| {
        fake.get(LEASES, "herald-system", "herald-cluster-watcher")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    let mut w1 = lab.watcher("w1");
    lab.fake
        .wait_for(WAIT, |f| (holder(f).as_deref() == Some("w1")).then_some(()))
        .await
        .expect("w1 took the lease");
    let _w2 = lab.watcher("w2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        holder(&lab.fake).as_deref(),
        Some("w1"),
        "w2 took the lease from a live holder"
    );

    lab.fake.create(SERVICES, ours("default", "one")).unwrap();
    assert_eq!(
        wait_ingress(&lab.fake, "default", "one").await,
        vec!["172.16.0.241"]
    );
    let reporters = |fake: &herald_fake_kube::FakeKube| -> HashSet<String> {
        fake.events()
            .iter()
            .filter_map(|e| e["reportingInstance"].as_str().map(str::to_string))
            .collect()
    };
    // The Event follows the status write.
    lab.fake
        .wait_for(WAIT, |f| {
            (!f.events_for("default", "one").is_empty()).then_some(())
        })
        .await;
    assert_eq!(reporters(&lab.fake), HashSet::from(["w1".to_string()]));

    // The leader dies without handing the lease back.
    let killed = Instant::now();
    w1.process.kill9();
    lab.fake
        .wait_for(Duration::from_secs(15), |f| {
            (holder(f).as_deref() == Some("w2")).then_some(())
        })
        .await
        .expect("w2 took over within 15 s");
    eprintln!("w2 took the lease {:?} after w1 died", killed.elapsed());
    lab.fake.create(SERVICES, ours("default", "two")).unwrap();
    let two = wait_ingress(&lab.fake, "default", "two").await;
    assert!(
        two.len() == 1 && two[0].starts_with("172.16.0.") && two[0] != "172.16.0.241",
        "{two:?}"
    );
    assert_eq!(
        wait_ingress(&lab.fake, "default", "one").await,
        vec!["172.16.0.241"]
    );
    lab.fake
        .wait_for(WAIT, |f| {
            (!f.events_for("default", "two").is_empty()).then_some(())
        })
        .await;
    assert_eq!(
        reporters(&lab.fake),
        HashSet::from(["w1".to_string(), "w2".to_string()])
    );
    let two_events = lab.fake.events_for("default", "two");
    assert!(
        !two_events.is_empty() && two_events.iter().all(|e| e["reportingInstance"] == "w2"),
        "{two_events:?}"
    );
}

/// A Service that failed for lack of addresses gets one as soon as herald-ipam has one:
/// when a pool is created, and when someone else releases an address. The resync is set
/// to an hour, so only the watcher following herald-ipam's changes can explain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_services_get_an_address_when_a_pool_appears_or_an_address_is_freed() {
    const PROMPT: Duration = Duration::from_secs(10);
    let lab = Lab::start(&[]).await;
    let _w = Watcher::start(
        &lab.fake,
        &lab.ipam.endpoint(),
        "w1",
        &["--resync-seconds", "3600"],
    );
    lab.fake.create(SERVICES, ours("default", "early")).unwrap();
    wait_condition(&lab.fake, "default", "early", "False").await;

    // A pool created through the API, not through the watcher.
    let created = Instant::now();
    lab.ipam.create_pool("late", &["172.16.2.0/30"]).await;
    assert_eq!(
        wait_ingress(&lab.fake, "default", "early").await,
        vec!["172.16.2.1"]
    );
    assert!(created.elapsed() < PROMPT, "took {:?}", created.elapsed());

    // Another cluster takes the pool's last address, so the next Service must wait.
    let mut client = lab.ipam.client().await;
    let other = pb::Owner {
        cluster_id: "other".into(),
        namespace: "default".into(),
        name: "elsewhere".into(),
        uid: "uid-elsewhere".into(),
    };
    let held = client
        .allocate(pb::AllocateRequest {
            owner: Some(other.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let held_ip = held.allocation.unwrap().ips[0].ip.clone();
    assert_eq!(held_ip, "172.16.2.2");
    lab.fake
        .create(SERVICES, ours("default", "waiting"))
        .unwrap();
    let cond = wait_condition(&lab.fake, "default", "waiting", "False").await;
    assert_eq!(cond["reason"], "PoolExhausted", "{cond}");

    let released = Instant::now();
    client
        .release(pb::ReleaseRequest {
            owner_uid: other.uid.clone(),
            reason: "moved".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        wait_ingress(&lab.fake, "default", "waiting").await,
        vec![held_ip]
    );
    assert!(released.elapsed() < PROMPT, "took {:?}", released.elapsed());
}

fn endpoint_slice(service: &str, slice: &str, nodes: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| json!({"addresses": [format!("10.244.0.{}", i + 1)], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": slice,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
    })
}

/// Polls the advertisement status until the nodes that should announce `prefix` are
/// `want`; panics with what they were after `WAIT`.
async fn wait_announcing(
    routing: &mut RoutingClient<tonic::transport::Channel>,
    prefix: &str,
    want: &[&str],
) {
    let want: std::collections::BTreeSet<String> = want.iter().map(|n| n.to_string()).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let desired: std::collections::BTreeSet<String> = routing
            .get_advertisement_status(routing::GetAdvertisementStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .filter(|e| e.prefix == prefix && e.desired)
            .map(|e| e.node)
            .collect();
        if desired == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} should be announced by {want:?}, is by {desired:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ToR peer for every node, two Ready nodes, a watcher, and the Local Service
/// `default/web` whose one slice names worker-1.
async fn local_service_lab() -> (Lab, RoutingClient<tonic::transport::Channel>, Watcher) {
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    let mut routing = RoutingClient::connect(lab.ipam.endpoint()).await.unwrap();
    routing
        .set_bgp_policy(routing::BgpPolicy {
            local_asn: 65010,
            peers: vec![routing::Peer {
                name: "tor".into(),
                address: "127.0.0.1".into(),
                asn: 65001,
                port: 1790,
                ..Default::default()
            }],
            advertisements: vec![routing::Advertisement::default()],
            ..Default::default()
        })
        .await
        .unwrap();
    for (name, ip) in [("worker-1", "127.0.0.21"), ("worker-2", "127.0.0.22")] {
        lab.fake.create(NODES, node(name, ip, true)).unwrap();
    }
    let watcher = lab.watcher("w1");
    let mut svc = ours("default", "web");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    lab.fake.create(SERVICES, svc).unwrap();
    lab.fake
        .create(
            ENDPOINT_SLICES,
            endpoint_slice("web", "web-a", &["worker-1"]),
        )
        .unwrap();
    (lab, routing, watcher)
}

/// With externalTrafficPolicy Local only nodes with an endpoint announce: the watcher
/// follows every EndpointSlice of the Service as it is created, changed and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_service_is_announced_by_the_nodes_its_endpoint_slices_name() {
    let (lab, mut routing, _w) = local_service_lab().await;
    // A slice of another Service says nothing about this one.
    lab.fake
        .create(
            ENDPOINT_SLICES,
            endpoint_slice("api", "api-a", &["worker-2"]),
        )
        .unwrap();
    assert_eq!(
        wait_ingress(&lab.fake, "default", "web").await,
        vec!["172.16.0.241"]
    );
    let prefix = "172.16.0.241/32";
    wait_announcing(&mut routing, prefix, &["worker-1"]).await;

    // A second slice adds its nodes.
    lab.fake
        .create(
            ENDPOINT_SLICES,
            endpoint_slice("web", "web-b", &["worker-2"]),
        )
        .unwrap();
    wait_announcing(&mut routing, prefix, &["worker-1", "worker-2"]).await;

    // Deleting the first slice takes its node away.
    lab.fake
        .delete(ENDPOINT_SLICES, "default", "web-a")
        .unwrap();
    wait_announcing(&mut routing, prefix, &["worker-2"]).await;

    // A changed slice moves the endpoint.
    lab.fake
        .replace(
            ENDPOINT_SLICES,
            endpoint_slice("web", "web-b", &["worker-1"]),
        )
        .unwrap();
    wait_announcing(&mut routing, prefix, &["worker-1"]).await;
}

/// A missing RBAC permission on one watched resource (list EndpointSlices) shows as a
/// failing /readyz naming the resource and verb, and as one log line however often the
/// list is retried; nothing is allocated meanwhile. Once granted, the watcher carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_watch_fails_readiness_and_is_logged_once() {
    const REFUSAL: &str = "forbidden: the watcher's RBAC role must allow list on endpointslices";
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    lab.fake.deny(Verb::List, ENDPOINT_SLICES);
    lab.fake.create(SERVICES, ours("default", "web")).unwrap();
    let w = Watcher::start_logged(&lab.fake, &lab.ipam.endpoint(), "w1");

    let body = w.wait_not_ready("list endpointslices").await;
    assert!(body.contains("forbidden"), "{body}");
    // Retried with backoff, not given up: several refused lists, one log line.
    wait_refused(&lab.fake, Verb::List, "endpointslices", 3).await;
    w.assert_logged_once_as_error(REFUSAL);
    // The start-up barrier holds: nothing is allocated without the full picture.
    assert!(lab.ipam.allocations().await.is_empty());

    lab.fake.allow(Verb::List, ENDPOINT_SLICES);
    wait_ingress(&lab.fake, "default", "web").await;
    w.wait_ready().await;
}

/// The prefixes in one WatchNodeRoutes message, over all its peers.
fn prefixes(routes: &routing::NodeRoutes) -> std::collections::BTreeSet<String> {
    routes
        .peers
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| r.prefix.clone()))
        .collect()
}

/// A Service flipped from Cluster to Local stays announced by the node with its endpoint
/// throughout, even when herald-ipam does not know its endpoints at the time (as after a
/// SetServiceEndpoints lost to an IPAM outage): the watcher sends the endpoints before the
/// Allocate that carries the new policy, so no route set between the two lacks it. (Chaos
/// suite, known issue: the Local Allocate first withdrew the address everywhere.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_flipped_to_local_keeps_its_route_on_its_endpoint_node_throughout() {
    let (lab, mut routing, _w) = local_service_lab().await;
    assert_eq!(
        wait_ingress(&lab.fake, "default", "web").await,
        vec!["172.16.0.241"]
    );
    let prefix = "172.16.0.241/32";
    wait_announcing(&mut routing, prefix, &["worker-1"]).await;
    // To Cluster: both nodes announce once the endpoints with the Cluster policy arrived
    // (the endpoints' policy is the one herald-ipam routes by).
    let mut svc = lab.fake.get(SERVICES, "default", "web").unwrap();
    svc["spec"]["externalTrafficPolicy"] = json!("Cluster");
    lab.fake.replace(SERVICES, svc).unwrap();
    wait_announcing(&mut routing, prefix, &["worker-1", "worker-2"]).await;
    // herald-ipam forgets the endpoints behind the watcher's back (no policy, no nodes), as
    // if they never arrived; the Service is still announced by both (Cluster).
    let uid = lab.fake.get(SERVICES, "default", "web").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    routing
        .set_service_endpoints(routing::ServiceEndpoints {
            owner_uid: uid,
            traffic_policy: 0,
            endpoint_nodes: vec![],
            traceparent: String::new(),
        })
        .await
        .unwrap();
    wait_announcing(&mut routing, prefix, &["worker-1", "worker-2"]).await;

    // Every route set worker-1 is sent from now on, until the flip has settled.
    let mut stream = routing
        .watch_node_routes(routing::WatchNodeRoutesRequest {
            node: "worker-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        prefixes(&first).contains(prefix),
        "worker-1 does not announce {prefix} before the flip: {:?}",
        prefixes(&first)
    );
    let mut svc = lab.fake.get(SERVICES, "default", "web").unwrap();
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    lab.fake.replace(SERVICES, svc).unwrap();
    // Settled: worker-2, which has no endpoint, no longer announces it.
    let settled = async {
        wait_announcing(&mut routing, prefix, &["worker-1"]).await;
        // Anything published by then has reached the stream well within this.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut seen = Vec::new();
    let watch = async {
        while let Ok(Some(routes)) = stream.message().await {
            seen.push((routes.revision, prefixes(&routes).contains(prefix)));
        }
    };
    tokio::select! {
        () = settled => {}
        () = watch => panic!("worker-1's route stream ended"),
    }
    let lost: Vec<u64> = seen
        .iter()
        .filter(|(_, has)| !has)
        .map(|(revision, _)| *revision)
        .collect();
    assert!(
        lost.is_empty(),
        "worker-1 was sent route sets without {prefix} during the flip to Local (revisions \
         {lost:?} of {seen:?})"
    );
}

/// A refused write, not only a refused watch: without patch on Services' status the
/// watcher cannot give a Service its address, which shows as a failing /readyz naming
/// the verb and resource and as one ERROR line; once granted, the address is written and
/// the watcher is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_status_write_fails_readiness_until_granted() {
    const REFUSAL: &str = "forbidden: the watcher's RBAC role must allow patch on services/status";
    let lab = Lab::start(&[("lab", LAB_POOL)]).await;
    lab.fake.deny(Verb::Patch, SERVICES);
    lab.fake.create(SERVICES, ours("default", "web")).unwrap();
    let w = Watcher::start_logged(&lab.fake, &lab.ipam.endpoint(), "w1");

    w.wait_not_ready("patch services/status").await;
    wait_refused(&lab.fake, Verb::Patch, "services", 3).await;
    w.assert_logged_once_as_error(REFUSAL);

    lab.fake.allow(Verb::Patch, SERVICES);
    assert_eq!(
        wait_ingress(&lab.fake, "default", "web").await,
        vec!["172.16.0.241"]
    );
    w.wait_ready().await;
}
