//! The real binary over mutual TLS: each role reaches its methods and is refused the
//! others with PERMISSION_DENIED naming the identity and the method; a speaker reaches
//! only its own node; plaintext and unknown callers get nothing; a non-loopback listener
//! without certificates refuses to start.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{allocate, pool};
use herald_api::ipam::v1 as ipam_pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_test_support::pki::TestCa;
use herald_test_support::{ChildProcess, free_port, run_to_exit};
use herald_tls::{ClientEndpoint, Reloading};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;

const TD: &str = "herald.test";

struct Tls {
    _process: ChildProcess,
    port: u16,
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Tls {
    async fn start() -> Tls {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("herald test CA");
        let files = ca.write(dir.path(), "ipam", &["localhost", "127.0.0.1"]);
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
        command
            .current_dir(dir.path())
            .env_remove("HERALD_DATABASE_URL")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key)
            .arg("--tls-client-ca")
            .arg(&files.ca)
            .args(["--trust-domain", TD]);
        let server = Tls {
            _process: ChildProcess::spawn("herald-ipam", command),
            port,
            dir,
            ca,
        };
        // Serving: a reader's health check answers SERVING.
        let channel = server.channel("reader", &["reader.herald.test"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = HealthClient::new(channel.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            match status {
                Ok(s) if s.get_ref().status == 1 => break,
                other => assert!(
                    Instant::now() < deadline,
                    "herald-ipam never served over TLS: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    fn channel(&self, name: &str, sans: &[&str]) -> Channel {
        channel_with(self.dir.path(), &self.ca, name, sans, self.port)
    }
}

fn channel_with(dir: &Path, ca: &TestCa, name: &str, sans: &[&str], port: u16) -> Channel {
    let files = ca.write(dir, name, sans);
    let reloading: Arc<Reloading> = Reloading::load(files).unwrap();
    ClientEndpoint::new(
        &format!("https://127.0.0.1:{port}"),
        Some((&reloading, Some("localhost".into()))),
        Duration::from_secs(5),
    )
    .unwrap()
    .connect_lazy()
}

#[track_caller]
fn denied<T: std::fmt::Debug>(result: Result<T, Status>, who: &str, method: &str) {
    let status = result.expect_err(&format!("{who} may not call {method}"));
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(who) && status.message().contains(method),
        "the refusal names neither {who} nor {method}: {}",
        status.message()
    );
}

#[track_caller]
fn not_denied<T>(result: Result<T, Status>, what: &str) {
    if let Err(status) = result {
        assert_ne!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    }
}

fn node(name: &str, address: &str) -> pb::Node {
    pb::Node {
        name: name.into(),
        addresses: vec![address.into()],
        ready: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn each_role_reaches_only_its_methods() {
    let server = Tls::start().await;
    let operator = server.channel("operator", &["spiffe://herald.test/herald/operator"]);
    let watcher = server.channel("watcher", &["spiffe://herald.test/herald/watcher"]);
    let reader = server.channel("reader2", &["spiffe://herald.test/herald/reader"]);
    let n1 = server.channel("n1", &["spiffe://herald.test/herald/speaker/node/n1"]);
    let n2 = server.channel("n2", &["n2.speaker.herald.test"]);
    let fleet = server.channel("fleet", &["spiffe://herald.test/herald/speaker"]);
    let stranger = server.channel("stranger", &["spiffe://other.test/herald/operator"]);

    // Operator: pools and the BGP policy; not allocations or nodes.
    let mut ipam = IpamClient::new(operator.clone());
    ipam.create_pool(ipam_pb::CreatePoolRequest {
        pool: Some(pool("lab", &["172.16.0.0/28"])),
    })
    .await
    .unwrap();
    not_denied(
        RoutingClient::new(operator.clone())
            .get_bgp_policy(pb::GetBgpPolicyRequest::default())
            .await,
        "operator reads the policy",
    );
    denied(
        ipam.allocate(allocate("a1")).await,
        "spiffe://herald.test/herald/operator",
        "herald.ipam.v1.Ipam/Allocate",
    );
    denied(
        RoutingClient::new(operator.clone())
            .upsert_node(node("n1", "127.0.0.10"))
            .await,
        "spiffe://herald.test/herald/operator",
        "herald.routing.v1.Routing/UpsertNode",
    );

    // Watcher: allocate, release, nodes, endpoints, reads, and the pools it mirrors from
    // IPPool resources; not a speaker's stream.
    let mut ipam = IpamClient::new(watcher.clone());
    ipam.allocate(allocate("a1")).await.unwrap();
    ipam.release(ipam_pb::ReleaseRequest {
        owner_uid: "a1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut routing = RoutingClient::new(watcher.clone());
    routing.upsert_node(node("n1", "127.0.0.10")).await.unwrap();
    routing.upsert_node(node("n2", "127.0.0.11")).await.unwrap();
    ipam.list_pools(ipam_pb::ListPoolsRequest::default())
        .await
        .unwrap();
    ipam.create_pool(ipam_pb::CreatePoolRequest {
        pool: Some(pool("mirrored", &["172.16.2.0/28"])),
    })
    .await
    .unwrap();
    ipam.update_pool(ipam_pb::UpdatePoolRequest {
        pool: Some(pool("mirrored", &["172.16.2.0/27"])),
        ..Default::default()
    })
    .await
    .unwrap();
    ipam.delete_pool(ipam_pb::DeletePoolRequest {
        name: "mirrored".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    denied(
        routing
            .watch_node_routes(pb::WatchNodeRoutesRequest {
                node: "n1".into(),
                deltas: false,
            })
            .await,
        "spiffe://herald.test/herald/watcher",
        "herald.routing.v1.Routing/WatchNodeRoutes",
    );

    // Reader: reads only.
    let mut ipam = IpamClient::new(reader.clone());
    ipam.list_allocations(ipam_pb::ListAllocationsRequest::default())
        .await
        .unwrap();
    RoutingClient::new(reader.clone())
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap();
    denied(
        ipam.create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(pool("more", &["172.16.1.0/28"])),
        })
        .await,
        "spiffe://herald.test/herald/reader",
        "herald.ipam.v1.Ipam/CreatePool",
    );
    denied(
        RoutingClient::new(reader.clone())
            .set_bgp_policy(pb::BgpPolicy::default())
            .await,
        "spiffe://herald.test/herald/reader",
        "herald.routing.v1.Routing/SetBgpPolicy",
    );

    // Speakers: their own node's routes and reports, nothing else.
    let mut own = RoutingClient::new(n1.clone())
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: "n1".into(),
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), own.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.node, "n1");
    RoutingClient::new(n1.clone())
        .report_speaker_state(pb::SpeakerState {
            node: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    denied(
        RoutingClient::new(n1.clone())
            .watch_node_routes(pb::WatchNodeRoutesRequest {
                node: "n2".into(),
                deltas: false,
            })
            .await,
        "spiffe://herald.test/herald/speaker/node/n1",
        "WatchNodeRoutes",
    );
    denied(
        RoutingClient::new(n1.clone())
            .report_speaker_state(pb::SpeakerState {
                node: "n2".into(),
                ..Default::default()
            })
            .await,
        "spiffe://herald.test/herald/speaker/node/n1",
        "ReportSpeakerState",
    );
    denied(
        IpamClient::new(n1.clone())
            .list_pools(ipam_pb::ListPoolsRequest::default())
            .await,
        "spiffe://herald.test/herald/speaker/node/n1",
        "herald.ipam.v1.Ipam/ListPools",
    );
    // A DNS SAN names a speaker too.
    RoutingClient::new(n2.clone())
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: "n2".into(),
            deltas: false,
        })
        .await
        .unwrap();
    denied(
        RoutingClient::new(n2.clone())
            .watch_node_routes(pb::WatchNodeRoutesRequest {
                node: "n1".into(),
                deltas: false,
            })
            .await,
        "dns:n2.speaker.herald.test",
        "WatchNodeRoutes",
    );

    // The speakers' shared certificate (one for a whole DaemonSet) names no node: it may
    // watch and report for any, and still nothing else.
    for node in ["n1", "n2"] {
        RoutingClient::new(fleet.clone())
            .watch_node_routes(pb::WatchNodeRoutesRequest {
                node: node.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        RoutingClient::new(fleet.clone())
            .report_speaker_state(pb::SpeakerState {
                node: node.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    denied(
        IpamClient::new(fleet.clone())
            .list_pools(ipam_pb::ListPoolsRequest::default())
            .await,
        "spiffe://herald.test/herald/speaker",
        "herald.ipam.v1.Ipam/ListPools",
    );
    denied(
        RoutingClient::new(fleet)
            .upsert_node(node("n3", "127.0.0.12"))
            .await,
        "spiffe://herald.test/herald/speaker",
        "herald.routing.v1.Routing/UpsertNode",
    );

    // A certificate of this CA naming another trust domain has no identity here.
    denied(
        IpamClient::new(stranger)
            .list_pools(ipam_pb::ListPoolsRequest::default())
            .await,
        "spiffe://other.test/herald/operator",
        "herald.ipam.v1.Ipam/ListPools",
    );

    // The operator may delete the pool.
    IpamClient::new(operator)
        .delete_pool(ipam_pb::DeletePoolRequest {
            name: "lab".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Plaintext gets no answer from a TLS listener.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect_lazy();
    let refused = IpamClient::new(plain)
        .list_pools(ipam_pb::ListPoolsRequest::default())
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
}

#[test]
fn a_non_loopback_listener_without_certificates_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
    command
        .current_dir(dir.path())
        .env_remove("HERALD_DATABASE_URL")
        .args(["--listen", "0.0.0.0:50999"]);
    let out = run_to_exit(command, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`listen`") && stderr.contains("needs mutual TLS"),
        "{stderr}"
    );

    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
    command
        .current_dir(dir.path())
        .args(["--listen", "127.0.0.1:50999", "--tls-cert", "x.crt"]);
    let out = run_to_exit(command, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls_key") && stderr.contains("all three"),
        "{stderr}"
    );
}
