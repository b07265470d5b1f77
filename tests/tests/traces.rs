//! OpenTelemetry traces through the real binaries: the fake Kubernetes API server →
//! `herald-cluster-watcher` → `herald-ipam` on Postgres → two `herald-route-speaker`s →
//! FRR, all exporting to an in-process OTLP/gRPC receiver. One Service's creation and
//! deletion each make one trace (children, or spans linked to it) that ends in an UPDATE
//! span per speaker; a collector that goes away costs spans, never routes.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use herald_e2e::{
    CONVERGE, IpamLab, KubeLab, LAB_PREFIX, allocate, expect_paths, node, speaker_with, tor_policy,
};
use herald_fake_kube::SERVICES;
use herald_test_support::{OtlpReceiver, ReceivedSpan};
use herald_tor_harness::{Tor, TorConfig, TorKind};
use serde_json::json;

/// How long spans may take to reach the receiver: the exporters batch every 500 ms.
const SPANS_ARRIVE: Duration = Duration::from_secs(20);
const NODES_AT: [(&str, &str); 2] = [("k01-worker", "127.0.0.10"), ("k01-worker2", "127.0.0.11")];

/// Every span of `trace_id`'s trace, and of every trace with a span that links into what
/// is gathered so far (a group commit or recompute serving several changes), to a fixed
/// point.
fn reach<'a>(spans: &'a [ReceivedSpan], trace_id: &str) -> Vec<&'a ReceivedSpan> {
    let mut traces: HashSet<&str> = HashSet::from([trace_id]);
    // Bounded: each round adds a trace or stops, and there are finitely many.
    loop {
        let ids: HashSet<(&str, &str)> = spans
            .iter()
            .filter(|s| traces.contains(s.trace_id.as_str()))
            .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
            .collect();
        let more: Vec<&str> = spans
            .iter()
            .filter(|s| !traces.contains(s.trace_id.as_str()))
            .filter(|s| {
                s.links
                    .iter()
                    .any(|(t, id)| ids.contains(&(t.as_str(), id.as_str())))
            })
            .map(|s| s.trace_id.as_str())
            .collect();
        if more.is_empty() {
            return spans
                .iter()
                .filter(|s| traces.contains(s.trace_id.as_str()))
                .collect();
        }
        traces.extend(more);
    }
}

/// The spans reached from the watcher's reconcile of `service` that called `rpc`, once
/// they include an UPDATE span per node that `moved` (announced or withdrew) a prefix.
fn service_trace(
    spans: &[ReceivedSpan],
    service: &str,
    rpc: &str,
    moved: &str,
) -> Option<Vec<ReceivedSpan>> {
    // The server spans of the call whose parent is the watcher's reconcile of the
    // Service; a repeated (idempotent) call changes nothing, so any one may be the one.
    let servers = spans.iter().filter(|s| {
        s.service == "herald-ipam"
            && s.name == rpc
            && spans.iter().any(|r| {
                r.service == "herald-cluster-watcher"
                    && r.name == "reconcile"
                    && r.attr("k8s.service.name") == Some(service)
                    && r.trace_id == s.trace_id
                    && r.span_id == s.parent_span_id
            })
    });
    let all: BTreeSet<&str> = NODES_AT.iter().map(|(n, _)| *n).collect();
    servers.into_iter().find_map(|server| {
        let reached = reach(spans, &server.trace_id);
        let updates: BTreeSet<&str> = reached
            .iter()
            .filter(|s| s.name == "bgp.update")
            .filter(|s| s.attr(moved).is_some_and(|n| n != "0"))
            .filter_map(|s| s.attr("herald.node"))
            .collect();
        (updates == all).then(|| reached.into_iter().cloned().collect())
    })
}

/// Every span, one line each, for a failure message.
fn dump(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} trace={} span={} parent={} links={:?} attrs={:?}",
                s.service, s.name, s.trace_id, s.span_id, s.parent_span_id, s.links, s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn names(spans: &[ReceivedSpan]) -> BTreeSet<(String, String)> {
    spans
        .iter()
        .map(|s| (s.service.clone(), s.name.clone()))
        .collect()
}

/// Checks the steps of one change's trace: all three services, each hop present, and
/// every span of the root trace a child of a span that was received (parent order).
fn check_steps(trace: &[ReceivedSpan], rpc: &str) {
    let seen = names(trace);
    for (service, name) in [
        ("herald-cluster-watcher", "reconcile"),
        ("herald-ipam", rpc),
        ("herald-ipam", "routes.recompute"),
        ("herald-ipam", "routes.publish"),
        ("herald-route-speaker", "speaker.apply"),
        ("herald-route-speaker", "bgp.update"),
    ] {
        assert!(
            seen.contains(&(service.to_string(), name.to_string())),
            "no {name} span from {service} in the trace; it has {seen:?}"
        );
    }
    let ids: HashSet<(&str, &str)> = trace
        .iter()
        .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
        .collect();
    for span in trace.iter().filter(|s| !s.parent_span_id.is_empty()) {
        assert!(
            ids.contains(&(span.trace_id.as_str(), span.parent_span_id.as_str())),
            "{} {}'s parent {} was never received",
            span.service,
            span.name,
            span.parent_span_id
        );
    }
    let server = trace.iter().find(|s| s.name == rpc).unwrap();
    assert_eq!(server.attr("rpc.system"), Some("grpc"));
    assert_eq!(server.attr("rpc.service"), Some("herald.ipam.v1.Ipam"));
    assert_eq!(server.attr("rpc.grpc.status_code"), Some("0"));
    let apply = trace.iter().find(|s| s.name == "speaker.apply").unwrap();
    let update = trace.iter().find(|s| s.name == "bgp.update").unwrap();
    assert_eq!(update.attr("herald.peer"), Some("tor"));
    assert!(update.attr("bgp.prefix_count").is_some_and(|n| n != "0"));
    assert!(apply.attr("herald.node").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_traces_from_the_watcher_to_an_update_on_each_speaker_and_back() {
    let receiver = OtlpReceiver::start().await;
    let otlp = receiver.endpoint();
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let mut ipam_lab = IpamLab::start_with(|c, _| {
        c.args(["--otlp-endpoint", &otlp]);
    })
    .await;
    let mut policy = tor_policy(&tor, 9);
    policy.peers[0].node_selector = None;
    ipam_lab.routing.set_bgp_policy(policy).await.unwrap();

    let mut lab = KubeLab::builder(ipam_lab.dir.path())
        .nodes(&NODES_AT)
        // The standard variable, not the flag: both must work.
        .watcher_env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .start()
        .await;
    lab.start_watcher(&ipam_lab.ipam.endpoint());
    lab.wait_registered(&ipam_lab.ipam, Duration::from_secs(10))
        .await;
    lab.start_speakers_with(&ipam_lab.ipam.endpoint(), |_, c| {
        c.args(["--otlp-endpoint", &otlp]);
    });
    let kube = &lab.kube;
    tor.wait_neighbors(CONVERGE, |n| {
        n.iter().filter(|n| n.established).count() == 2
    })
    .await
    .unwrap();

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
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10", "127.0.0.11"]).await;
    receiver
        .wait_for(SPANS_ARRIVE, |spans| {
            service_trace(
                spans,
                "lb-nginx-service",
                "herald.ipam.v1.Ipam/Allocate",
                "bgp.announced",
            )
        })
        .await
        .unwrap_or_else(|spans| {
            panic!(
                "the Service's creation never traced to an UPDATE on both speakers; spans:\n{}",
                dump(&spans)
            )
        });
    // Spans that end later (the reconcile around the call) are in the next batches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = service_trace(
        &receiver.spans(),
        "lb-nginx-service",
        "herald.ipam.v1.Ipam/Allocate",
        "bgp.announced",
    )
    .unwrap();
    check_steps(&created, "herald.ipam.v1.Ipam/Allocate");
    // The watcher may reconcile the Service again before it settles; that Allocate finds
    // the address held and commits nothing, so the commit can sit in the first Allocate's
    // trace rather than the one picked above. It is the only commit of this test.
    let all = receiver.spans();
    let commit = created
        .iter()
        .chain(all.iter())
        .find(|s| s.name == "store.commit")
        .expect("the Allocate's store commit span");
    assert_eq!(commit.attr("db.system"), Some("postgresql"));
    assert!(commit.attr("db.operation.batch.size").is_some());
    let services: BTreeSet<&str> = created.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "herald-cluster-watcher",
            "herald-ipam",
            "herald-route-speaker"
        ])
    );

    kube.delete(SERVICES, "default", "lb-nginx-service")
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &[]).await;
    receiver
        .wait_for(SPANS_ARRIVE, |spans| {
            service_trace(
                spans,
                "lb-nginx-service",
                "herald.ipam.v1.Ipam/Release",
                "bgp.withdrawn",
            )
        })
        .await
        .unwrap_or_else(|spans| {
            panic!(
                "the Service's deletion never traced to a withdrawal on both speakers; spans:\n{}",
                dump(&spans)
            )
        });
    // Spans that end later (the reconcile around the call) are in the next batches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted = service_trace(
        &receiver.spans(),
        "lb-nginx-service",
        "herald.ipam.v1.Ipam/Release",
        "bgp.withdrawn",
    )
    .unwrap();
    check_steps(&deleted, "herald.ipam.v1.Ipam/Release");
}

/// The number in the `dropped=N` of the exporter's last log line.
fn dropped_in(log: &str) -> Option<u64> {
    let line = log.lines().rfind(|l| l.contains("span export stopped"))?;
    let at = line.find("dropped=")? + "dropped=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_collector_gone_allocations_and_routes_carry_on_and_drops_are_counted() {
    let mut receiver = OtlpReceiver::start().await;
    let otlp = receiver.endpoint();
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let mut log_path = None;
    let mut lab = IpamLab::start_with(|c, dir| {
        let path = dir.join("herald-ipam.log");
        c.args(["--otlp-endpoint", &otlp])
            .stderr(std::fs::File::create(&path).unwrap());
        log_path = Some(path);
    })
    .await;
    let log_path = log_path.unwrap();
    lab.routing
        .set_bgp_policy(tor_policy(&tor, 9))
        .await
        .unwrap();
    lab.routing
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")], true))
        .await
        .unwrap();
    let _speaker = speaker_with("n0", &lab.ipam.endpoint(), |c| {
        c.args(["--otlp-endpoint", &otlp]);
    });
    lab.alloc
        .allocate(allocate("default", "first", "first"))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10"]).await;
    receiver
        .wait_for(SPANS_ARRIVE, |spans| {
            spans
                .iter()
                .any(|s| s.name == "herald.ipam.v1.Ipam/Allocate")
                .then_some(())
        })
        .await
        .expect("spans reached the collector while it ran");

    receiver.stop();
    // Every call still answers at once, and every address still reaches the ToR.
    for i in 0..8 {
        let uid = format!("after-{i}");
        let started = std::time::Instant::now();
        let allocated = lab
            .alloc
            .allocate(allocate("default", &uid, &uid))
            .await
            .unwrap()
            .into_inner();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "Allocate waited for the collector: {:?}",
            started.elapsed()
        );
        let ip = allocated.allocation.unwrap().ips[0].ip.clone();
        expect_paths(&tor, &format!("{ip}/32"), &["127.0.0.10"]).await;
    }
    // The exporter tries its batch (every 500 ms) and fails: give it a few rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = lab.ipam.process.terminate(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "herald-ipam exited with {status}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    let dropped = dropped_in(&text)
        .unwrap_or_else(|| panic!("no `span export stopped` line in herald-ipam's log:\n{text}"));
    assert!(dropped > 0, "no span counted as dropped:\n{text}");
}
