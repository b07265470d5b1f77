//! A BGP MD5 password goes where it is needed and nowhere else. A whole scenario with
//! every binary logging at trace level and exporting spans: the password lives in a
//! Kubernetes Secret that a MetalLB BGPPeer names; the watcher reads it and sets the BGP
//! policy; herald-ipam stores it and streams it to both speakers; FRR as the ToR requires
//! it (TCP-MD5 on its neighbor range), so the sessions coming up prove it arrived. Then
//! every log line of every process, every span (attributes, events, status) the OTLP
//! receiver took, every /metrics, /healthz and /readyz body, every read RPC's answer and
//! every object the API server holds but the Secret are searched for the password, in
//! clear and base64-encoded as the Secret holds it: none may show it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_e2e::{Ipam, KubeLab, http_get_raw, metallb_crd, next_hops, port};
use herald_fake_kube::{
    CONFIG_MAPS, ENDPOINT_SLICES, EVENTS, EVENTS_V1, FakeKube, LEASES, NAMESPACES, NODES, Resource,
    SECRETS, SERVICES,
};
use herald_test_support::{ChildProcess, OtlpReceiver, TestDb};
use herald_tor_harness::{Family, NODE_ASN, TOR_ASN, Tor, TorConfig, TorKind};
use serde_json::{Value, json};

/// Distinctive, so that no other text contains it by chance.
const SECRET: &str = "Md5-pw-7QvXk2Zr";
/// Everything at trace level, but the HTTP/2 and TLS plumbing and the database driver at
/// debug: their trace output is frames and bytes, and the scenario must stay quick.
const LOG_LEVELS: &str =
    "trace,h2=debug,hyper=debug,hyper_util=debug,tower=debug,rustls=debug,sqlx=debug";
const SPANS_ARRIVE: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);

/// Sends the process's output (both streams) to `<dir>/<name>.log`.
fn log_to(command: &mut std::process::Command, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&path).unwrap();
    command
        .env("RUST_LOG", LOG_LEVELS)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    path
}

/// What was searched, and where each finding came from.
#[derive(Default)]
struct Scan {
    needles: Vec<String>,
    findings: Vec<String>,
    searched: usize,
}

impl Scan {
    fn new() -> Self {
        let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET);
        Scan {
            needles: vec![SECRET.to_string(), encoded],
            ..Scan::default()
        }
    }

    fn check(&mut self, place: &str, text: &str) {
        self.searched += 1;
        for needle in &self.needles {
            if text.contains(needle.as_str()) {
                let line = text
                    .lines()
                    .find(|l| l.contains(needle.as_str()))
                    .unwrap_or(text);
                self.findings.push(format!(
                    "{place}: {}",
                    line.chars().take(400).collect::<String>()
                ));
            }
        }
    }
}

/// Every object the fake API server holds, of the built-in kinds and `more`, but Secrets.
fn api_objects(kube: &FakeKube, more: &[Resource]) -> Vec<(String, Value)> {
    [
        SERVICES,
        ENDPOINT_SLICES,
        NODES,
        NAMESPACES,
        EVENTS,
        EVENTS_V1,
        LEASES,
        CONFIG_MAPS,
    ]
    .iter()
    .chain(more)
    .flat_map(|r| {
        kube.list(*r, None)
            .into_iter()
            .map(|o| (r.plural.to_string(), o))
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_log_span_metric_or_read_api_shows_a_bgp_password() {
    let receiver = OtlpReceiver::start().await;
    let otlp = receiver.endpoint();
    let mut tor_config = TorConfig::new(TorKind::Frr);
    tor_config.md5_password = Some(SECRET.into());
    let tor = Tor::start(tor_config).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let admin = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (ipam_admin, watcher_admin) = (admin(port()), admin(port()));
    let speaker_admin = [admin(port()), admin(port())];

    let mut log_files = Vec::new();
    let ipam = Ipam::start_with(dir.path(), &db.url, port(), |c| {
        log_files.push(log_to(c, &logs, "herald-ipam"));
        c.args(["--otlp-endpoint", &otlp])
            .args(["--admin-listen", &ipam_admin.to_string()]);
    })
    .await;

    let mut lab = KubeLab::builder(dir.path())
        .namespace("metallb-system")
        .watcher_args(&[
            "--import",
            "metallb",
            "--default-class",
            "--admin-listen",
            &watcher_admin.to_string(),
            "--otlp-endpoint",
            &otlp,
        ])
        .start()
        .await;
    let kube = &lab.kube;
    let crds = [
        metallb_crd("IPAddressPool", "ipaddresspools", &["v1beta1"]),
        metallb_crd("BGPPeer", "bgppeers", &["v1beta2"]),
        metallb_crd("BGPAdvertisement", "bgpadvertisements", &["v1beta1"]),
    ];
    let kinds: Vec<Resource> = crds
        .into_iter()
        .map(|crd| kube.register_crd(crd).unwrap()[0])
        .collect();
    let (pools, peers, advertisements) = (kinds[0], kinds[1], kinds[2]);
    kube.create(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"namespace": "metallb-system", "name": "tor-md5"},
               "data": {"password": base64::engine::general_purpose::STANDARD.encode(SECRET)}}),
    )
    .unwrap();
    kube.create(
        pools,
        json!({"metadata": {"namespace": "metallb-system", "name": "lab"},
               "spec": {"addresses": ["10.208.2.0/28"]}}),
    )
    .unwrap();
    kube.create(
        peers,
        json!({"metadata": {"namespace": "metallb-system", "name": "tor"},
               "spec": {"myASN": NODE_ASN, "peerASN": TOR_ASN, "peerAddress": "127.0.0.1",
                        "peerPort": tor.bgp_port(), "holdTime": "9s", "connectTime": "1s",
                        "passwordSecret": {"name": "tor-md5", "namespace": "metallb-system"}}}),
    )
    .unwrap();
    kube.create(
        advertisements,
        json!({"metadata": {"namespace": "metallb-system", "name": "lab"},
               "spec": {"ipAddressPools": ["lab"]}}),
    )
    .unwrap();
    kube.create(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "default", "name": "web"},
               "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    )
    .unwrap();

    lab.start_watcher_with(&ipam.endpoint(), |c| {
        log_files.push(log_to(c, &logs, "herald-cluster-watcher"));
    });
    lab.wait_registered(&ipam, Duration::from_secs(30)).await;
    let speaker_logs: Vec<PathBuf> = lab
        .nodes
        .iter()
        .map(|(name, _)| logs.join(format!("herald-route-speaker-{name}.log")))
        .collect();
    lab.start_speakers_with(&ipam.endpoint(), |i, c| {
        let name = speaker_logs[i].file_stem().unwrap().to_str().unwrap();
        log_to(c, &logs, name);
        c.args(["--otlp-endpoint", &otlp])
            .args(["--admin-listen", &speaker_admin[i].to_string()]);
    });
    log_files.extend(speaker_logs.iter().cloned());
    let kube = &lab.kube;

    // The ToR takes only sessions signed with the password: both up means both
    // speakers got it from herald-ipam, which got it from the Secret through the watcher.
    tor.wait_neighbors(CONVERGE, |n| {
        n.iter().filter(|n| n.established).count() == 2
    })
    .await
    .unwrap();
    let address = kube
        .wait_for(CONVERGE, |kube| {
            kube.get(SERVICES, "default", "web")?["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
        .await
        .unwrap();
    let want = vec!["127.0.0.10".to_string(), "127.0.0.11".to_string()];
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        next_hops(rib, &format!("{address}/32")) == want
    })
    .await
    .unwrap();

    let mut scan = Scan::new();

    // Every read RPC's answer.
    let mut ipam_client = ipam.ipam().await;
    let mut routing = ipam.routing().await;
    let policy = routing
        .get_bgp_policy(pb::GetBgpPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        policy.peers.first().map(|p| p.md5_password.as_str()),
        Some("(set)"),
        "the policy in force has the peer's password: {policy:?}"
    );
    scan.check("GetBgpPolicy", &format!("{policy:?}"));
    let answers = [
        (
            "ListPools",
            format!(
                "{:?}",
                ipam_client
                    .list_pools(ipam_pb::ListPoolsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
        (
            "GetPool",
            format!(
                "{:?}",
                ipam_client
                    .get_pool(ipam_pb::GetPoolRequest { name: "lab".into() })
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
        (
            "ListAllocations",
            format!(
                "{:?}",
                ipam_client
                    .list_allocations(ipam_pb::ListAllocationsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
        (
            "History",
            format!(
                "{:?}",
                ipam_client
                    .history(ipam_pb::HistoryRequest {
                        ip: address.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
        (
            "ListNodes",
            format!(
                "{:?}",
                routing
                    .list_nodes(pb::ListNodesRequest {})
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
        (
            "GetAdvertisementStatus",
            format!(
                "{:?}",
                routing
                    .get_advertisement_status(pb::GetAdvertisementStatusRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            ),
        ),
    ];
    for (rpc, answer) in &answers {
        scan.check(rpc, answer);
    }
    let allocations = ipam_client
        .list_allocations(ipam_pb::ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .allocations;
    for allocation in &allocations {
        let uid = allocation.owner.as_ref().unwrap().uid.clone();
        let got = ipam_client
            .get_allocation(ipam_pb::GetAllocationRequest { owner_uid: uid })
            .await
            .unwrap()
            .into_inner();
        scan.check("GetAllocation", &format!("{got:?}"));
    }
    // Watch replays the change log from the start.
    let mut watch = ipam_client
        .watch(ipam_pb::WatchRequest { after_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    while let Ok(Ok(Some(change))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        scan.check("Watch", &format!("{change:?}"));
    }

    // Every admin endpoint's body.
    for addr in [
        ipam_admin,
        watcher_admin,
        speaker_admin[0],
        speaker_admin[1],
    ] {
        for path in ["/metrics", "/healthz", "/readyz"] {
            let body = http_get_raw(addr, path).await.unwrap();
            assert!(body.starts_with("HTTP/"), "{addr}{path}: {body}");
            scan.check(&format!("{addr}{path}"), &body);
        }
    }

    // Every object the API server holds but the Secret: statuses, Events, the Lease.
    let objects = api_objects(kube, &kinds);
    assert!(
        objects.iter().any(|(kind, _)| kind == "bgppeers"),
        "the API server lists no BGPPeer"
    );
    for (kind, object) in &objects {
        scan.check(&format!("API object {kind}"), &object.to_string());
    }

    // Stop everything politely, so that the last spans and log lines are out.
    let speakers: Vec<ChildProcess> = std::mem::take(&mut lab.speakers);
    for mut speaker in speakers {
        speaker.terminate(Duration::from_secs(10));
    }
    if let Some(mut watcher) = lab.watcher.take() {
        watcher.terminate(Duration::from_secs(10));
    }
    let mut ipam_process = ipam.process;
    ipam_process.terminate(Duration::from_secs(10));

    // Every span of every service.
    let spans = receiver
        .wait_for(SPANS_ARRIVE, |spans| {
            let services: std::collections::BTreeSet<&str> =
                spans.iter().map(|s| s.service.as_str()).collect();
            (services.len() == 3 && spans.iter().any(|s| s.name == "bgp.update"))
                .then(|| spans.to_vec())
        })
        .await
        .unwrap_or_else(|spans| {
            panic!(
                "spans from all three binaries never arrived: {} spans",
                spans.len()
            )
        });
    for span in &spans {
        scan.check(
            &format!("span {} {}", span.service, span.name),
            &format!(
                "{} {:?} {:?} {:?} {}",
                span.name, span.attributes, span.events, span.resource, span.status_message
            ),
        );
    }

    // Every log line of every process.
    let mut lines = 0;
    for path in &log_files {
        let log = std::fs::read_to_string(path).unwrap();
        let count = log.lines().count();
        assert!(count > 20, "{} has {count} lines", path.display());
        lines += count;
        for (i, line) in log.lines().enumerate() {
            scan.check(&format!("{}:{}", path.display(), i + 1), line);
        }
    }
    println!(
        "searched {} texts: {lines} log lines of {} processes, {} spans, {} API objects, {} read answers, 12 admin bodies",
        scan.searched,
        log_files.len(),
        spans.len(),
        objects.len(),
        answers.len() + allocations.len() + 1,
    );
    assert!(
        scan.findings.is_empty(),
        "the BGP password shows in {} places:\n{}",
        scan.findings.len(),
        scan.findings.join("\n")
    );
}
