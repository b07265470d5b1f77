//! Helpers for end-to-end tests that run Herald's real binaries together: `herald-ipam`
//! on Postgres, one `herald-route-speaker` per simulated node (each on its own 127.x
//! address), and a real router as the ToR.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_test_support::{ChildProcess, free_port, workspace_binary};
use herald_tor_harness::{Family, Rib, Tor};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const LAB_PREFIX: &str = "172.16.0.241/32";
/// How long any single expectation about the ToR may take to come true.
pub const CONVERGE: Duration = Duration::from_secs(15);

pub struct Ipam {
    pub addr: SocketAddr,
    pub process: ChildProcess,
}

impl Ipam {
    pub async fn start(dir: &Path, database_url: &str, port: u16) -> Self {
        Self::start_with(dir, database_url, port, |_| {}).await
    }

    /// As [`Self::start`], with `customize` adding flags, environment or output files.
    pub async fn start_with(
        dir: &Path,
        database_url: &str,
        port: u16,
        customize: impl FnOnce(&mut Command),
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = Command::new(workspace_binary("herald-ipam"));
        command.current_dir(dir).args([
            "--listen",
            &addr.to_string(),
            "--database-url",
            database_url,
        ]);
        customize(&mut command);
        let ipam = Self {
            addr,
            process: ChildProcess::spawn("herald-ipam", command),
        };
        ipam.wait_serving().await;
        ipam
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn ipam(&self) -> IpamClient<Channel> {
        IpamClient::new(self.channel().await)
    }

    pub async fn routing(&self) -> RoutingClient<Channel> {
        RoutingClient::new(self.channel().await)
    }

    async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(channel) = Channel::from_shared(self.endpoint())
                .unwrap()
                .connect()
                .await
            {
                let request = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                if let Ok(resp) = HealthClient::new(channel).check(request).await
                    && resp.get_ref().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("herald-ipam on {} not SERVING within 30 s", self.addr);
    }
}

/// A route speaker for node `name`, talking to `ipam`.
pub fn speaker(name: &str, ipam: &str) -> ChildProcess {
    speaker_with(name, ipam, |_| {})
}

/// As [`speaker`], with `customize` adding flags, environment or output files.
pub fn speaker_with(name: &str, ipam: &str, customize: impl FnOnce(&mut Command)) -> ChildProcess {
    let mut command = Command::new(workspace_binary("herald-route-speaker"));
    command.args([
        "--node-name",
        name,
        "--ipam-endpoint",
        ipam,
        "--report-interval",
        "1s",
        // Tests stop speakers often; the drain has tests of its own (tests/changes.rs).
        "--shutdown-drain",
        "0s",
    ]);
    customize(&mut command);
    ChildProcess::spawn(&format!("herald-route-speaker {name}"), command)
}

pub fn node(name: &str, address: &str, labels: &[(&str, &str)], ready: bool) -> pb::Node {
    pb::Node {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vec![address.into()],
        ready,
    }
}

/// The lab policy: the ToR peers with nodes labelled `bgp-peer=true`.
pub fn tor_policy(tor: &Tor, hold_time: u32) -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: herald_tor_harness::NODE_ASN,
        peers: vec![pb::Peer {
            name: "tor".into(),
            address: "127.0.0.1".into(),
            asn: herald_tor_harness::TOR_ASN,
            port: u32::from(tor.bgp_port()),
            hold_time_seconds: hold_time,
            connect_retry_seconds: 1,
            node_selector: Some(ipam_pb::LabelSelector {
                match_labels: [("bgp-peer".to_string(), "true".to_string())].into(),
                match_expressions: vec![],
            }),
            ..Default::default()
        }],
        advertisements: vec![pb::Advertisement::default()],
        ..Default::default()
    }
}

pub fn lab_pool() -> ipam_pb::Pool {
    ipam_pb::Pool {
        name: "lab".into(),
        addresses: vec!["172.16.0.240/28".into()],
        ..Default::default()
    }
}

pub fn allocate(namespace: &str, name: &str, uid: &str) -> ipam_pb::AllocateRequest {
    ipam_pb::AllocateRequest {
        owner: Some(ipam_pb::Owner {
            cluster_id: "lab".into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }),
        ports: vec![ipam_pb::ServicePort {
            protocol: "TCP".into(),
            port: 80,
        }],
        ..Default::default()
    }
}

/// The next hops the ToR has for `prefix`, sorted.
pub fn next_hops(rib: &Rib, prefix: &str) -> Vec<String> {
    let prefix: ipnet::IpNet = prefix.parse().unwrap();
    let mut hops: Vec<String> = rib
        .get(&prefix)
        .into_iter()
        .flatten()
        .filter(|p| !p.stale)
        .filter_map(|p| p.next_hop.map(|h| h.to_string()))
        .collect();
    hops.sort();
    hops
}

/// Waits until the ToR's next hops for `prefix` are exactly `expected`.
pub async fn expect_paths(tor: &Tor, prefix: &str, expected: &[&str]) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    let result = tor
        .wait_until(Family::Ipv4, CONVERGE, |rib| next_hops(rib, prefix) == want)
        .await;
    if let Err(e) = result {
        panic!("{prefix} at the ToR never had next hops {want:?}: {e}");
    }
}

/// Samples the ToR every 100 ms for `window` and returns every distinct set of next hops
/// seen for `prefix`, in order.
pub async fn observe(tor: &Tor, prefix: &str, window: Duration) -> Vec<Vec<String>> {
    let mut seen: Vec<Vec<String>> = Vec::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        let hops = next_hops(&tor.routes(Family::Ipv4).await.unwrap(), prefix);
        if seen.last() != Some(&hops) {
            seen.push(hops);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

pub fn labels(labelled: bool) -> BTreeMap<String, String> {
    if labelled {
        [("bgp-peer".to_string(), "true".to_string())].into()
    } else {
        BTreeMap::new()
    }
}

pub fn port() -> u16 {
    free_port()
}
