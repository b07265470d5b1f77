//! The real binaries over mutual TLS: herald-ipam with client certificates required, an
//! operator and a watcher identity setting it up, a speaker with its node's certificate
//! announcing to a real ToR. The BGP MD5 password of a second peer (the speaker's, on a
//! port nothing listens on) goes to that speaker, reads back redacted through
//! GetBgpPolicy, and appears in no log line of either binary.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_e2e::{CONVERGE, LAB_PREFIX, allocate, expect_paths, lab_pool, node, port, tor_policy};
use herald_test_support::pki::TestCa;
use herald_test_support::{ChildProcess, TestDb, free_port, workspace_binary};
use herald_tls::{ClientEndpoint, Reloading};
use herald_tor_harness::{Tor, TorConfig, TorKind};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

const TD: &str = "herald.test";
const SECRET: &str = "s3cret-md5-Xq7Z";

fn channel(dir: &Path, ca: &TestCa, name: &str, san: &str, port: u16) -> Channel {
    let reloading = Reloading::load(ca.write(dir, name, &[san])).unwrap();
    ClientEndpoint::new(
        &format!("https://127.0.0.1:{port}"),
        Some((&reloading, Some("localhost".into()))),
        Duration::from_secs(5),
    )
    .unwrap()
    .connect_lazy()
}

fn log_file(dir: &Path, name: &str) -> (std::fs::File, std::path::PathBuf) {
    let path = dir.join(format!("{name}.log"));
    (std::fs::File::create(&path).unwrap(), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_speaker_announces_over_mutual_tls_and_no_log_shows_the_md5_password() {
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("herald e2e CA");
    let server = ca.write(dir.path(), "ipam", &["localhost"]);
    let ipam_port = port();
    let (ipam_log, ipam_log_path) = log_file(dir.path(), "ipam");
    let mut command = Command::new(workspace_binary("herald-ipam"));
    command
        .current_dir(dir.path())
        .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info,sqlx=info")
        .args(["--listen", &format!("127.0.0.1:{ipam_port}")])
        .args(["--database-url", &db.url])
        .arg("--tls-cert")
        .arg(&server.cert)
        .arg("--tls-key")
        .arg(&server.key)
        .arg("--tls-client-ca")
        .arg(&server.ca)
        .args(["--trust-domain", TD])
        .stdout(Stdio::null())
        .stderr(ipam_log);
    let _ipam = ChildProcess::spawn("herald-ipam", command);

    let operator = channel(
        dir.path(),
        &ca,
        "operator",
        "spiffe://herald.test/herald/operator",
        ipam_port,
    );
    let watcher = channel(
        dir.path(),
        &ca,
        "watcher",
        "spiffe://herald.test/herald/watcher",
        ipam_port,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = HealthClient::new(operator.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        if health.is_ok_and(|h| h.get_ref().status == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "herald-ipam never served over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    IpamClient::new(operator.clone())
        .create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(lab_pool()),
        })
        .await
        .unwrap();
    let mut policy = tor_policy(&tor, 9);
    let mut guarded = policy.peers[0].clone();
    guarded.name = "guarded".into();
    guarded.port = u32::from(free_port());
    guarded.md5_password = SECRET.into();
    policy.peers.push(guarded);
    RoutingClient::new(operator.clone())
        .set_bgp_policy(policy)
        .await
        .unwrap();
    let read_back = RoutingClient::new(operator.clone())
        .get_bgp_policy(pb::GetBgpPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    let shown = &read_back
        .peers
        .iter()
        .find(|p| p.name == "guarded")
        .unwrap()
        .md5_password;
    assert_ne!(shown, SECRET, "GetBgpPolicy shows the password");

    RoutingClient::new(watcher.clone())
        .upsert_node(node("n0", "127.0.0.10", &[("bgp-peer", "true")], true))
        .await
        .unwrap();

    let speaker_files = ca.write(
        dir.path(),
        "n0",
        &["spiffe://herald.test/herald/speaker/node/n0"],
    );
    let (speaker_log, speaker_log_path) = log_file(dir.path(), "speaker");
    let mut command = Command::new(workspace_binary("herald-route-speaker"));
    command
        .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info")
        .args(["--node-name", "n0"])
        .args(["--ipam-endpoint", &format!("https://127.0.0.1:{ipam_port}")])
        .args(["--ipam-server-name", "localhost"])
        .arg("--tls-cert")
        .arg(&speaker_files.cert)
        .arg("--tls-key")
        .arg(&speaker_files.key)
        .arg("--tls-ca")
        .arg(&speaker_files.ca)
        .args(["--report-interval", "1s", "--shutdown-drain", "0s"])
        .stdout(Stdio::null())
        .stderr(speaker_log);
    let mut speaker = ChildProcess::spawn("herald-route-speaker n0", command);

    tor.wait_neighbors(CONVERGE, |n| n.iter().any(|n| n.established))
        .await
        .unwrap();
    IpamClient::new(watcher.clone())
        .allocate(allocate("default", "lb-nginx-service", "lb"))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10"]).await;

    // The speaker received the guarded peer (with its password) and has tried it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&speaker_log_path).unwrap();
        if log.contains("guarded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the speaker never saw the guarded peer:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    speaker.terminate(Duration::from_secs(10));

    for path in [&ipam_log_path, &speaker_log_path] {
        let log = std::fs::read_to_string(path).unwrap();
        assert!(
            log.lines().count() > 5,
            "{} is nearly empty",
            path.display()
        );
        for line in log.lines() {
            assert!(
                !line.contains(SECRET),
                "{} shows the MD5 password: {line}",
                path.display()
            );
        }
    }
}
