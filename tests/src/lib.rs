//! Helpers for end-to-end tests that run Herald's real binaries together: `herald-ipam`
//! on Postgres, one `herald-route-speaker` per simulated node (each on its own 127.x
//! address), and a real router as the ToR.

#![allow(clippy::unwrap_used)]

mod postgres;
mod relay;
pub use postgres::PrivatePostgres;
pub use relay::Relay;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_fake_kube::{FakeKube, NAMESPACES, NODES, SERVICES};
use herald_test_support::{ChildProcess, free_port, workspace_binary};
use herald_tor_harness::{Family, Rib, Tor};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const LAB_PREFIX: &str = "172.16.0.241/32";
/// How long any single expectation about the ToR may take to come true.
pub const CONVERGE: Duration = Duration::from_secs(15);
/// Bound on one admin-endpoint GET: they answer in milliseconds, and one that has not
/// answered in this long on a loaded machine counts as hung.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// herald-ipam on a fresh Postgres database, serving the lab pool, with a client of each
/// API: where most scenarios start. The policy is the scenario's (usually
/// [`tor_policy`]). Fields drop in order: herald-ipam stops before its database goes.
pub struct IpamLab {
    pub ipam: Ipam,
    pub alloc: IpamClient<Channel>,
    pub routing: RoutingClient<Channel>,
    /// herald-ipam's working directory, for the scenario's logs and kubeconfigs too.
    pub dir: tempfile::TempDir,
    pub db: herald_test_support::TestDb,
}

impl IpamLab {
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    /// As [`Self::start`], with `customize` given herald-ipam's command and its directory
    /// (for flags, environment or a log file).
    pub async fn start_with(customize: impl FnOnce(&mut Command, &Path)) -> Self {
        let db = herald_test_support::TestDb::postgres().await;
        let dir = tempfile::tempdir().unwrap();
        let ipam =
            Ipam::start_with(dir.path(), &db.url, port(), |c| customize(c, dir.path())).await;
        let mut alloc = ipam.ipam().await;
        let routing = ipam.routing().await;
        alloc
            .create_pool(ipam_pb::CreatePoolRequest {
                pool: Some(lab_pool()),
            })
            .await
            .unwrap();
        IpamLab {
            ipam,
            alloc,
            routing,
            dir,
            db,
        }
    }
}

/// The whole answer (headers and body) of one HTTP/1.0 GET on loopback, or why there is
/// none; bounded by a few seconds.
pub async fn http_get_raw(addr: SocketAddr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    tokio::time::timeout(HTTP_TIMEOUT, get)
        .await
        .map_err(|_| format!("{addr}{path} did not answer within {HTTP_TIMEOUT:?}"))?
        .map_err(|e| format!("{addr}{path}: {e}"))
}

/// One HTTP/1.0 GET on loopback: (status, body), or why there is none (status 0 when
/// the answer has no status line).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let out = http_get_raw(addr, path).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// MetalLB's definition of `kind`, as far as the fake API server needs it: namespaced,
/// served in `versions`.
pub fn metallb_crd(kind: &str, plural: &str, versions: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.metallb.io")},
        "spec": {
            "group": "metallb.io",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural},
            "versions": versions
                .iter()
                .map(|v| serde_json::json!({"name": v, "served": true, "storage": true}))
                .collect::<Vec<_>>(),
        },
    })
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

/// The two lab nodes most tests run: (name, InternalIP).
pub const LAB_NODES: [(&str, &str); 2] =
    [("k01-worker", "127.0.0.10"), ("k01-worker2", "127.0.0.11")];

/// A Kubernetes Node as the kubelet registers it: Ready, with one InternalIP.
pub fn kube_node(name: &str, address: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

/// A `type: LoadBalancer` Service of Herald's class in `default`, port 80/TCP.
pub fn lb_service(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "herald.io/bgp",
            "selector": {"app": name},
            "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}],
        },
    })
}

/// The first ingress IP in a Service's status, if it has one.
pub fn ingress_ip(kube: &FakeKube, namespace: &str, name: &str) -> Option<String> {
    kube.get(SERVICES, namespace, name)?["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(str::to_string)
}

/// The Kubernetes side of an end-to-end lab: the fake API server with namespaces and
/// Ready Nodes, a kubeconfig for it, and the `herald-cluster-watcher` and one
/// `herald-route-speaker` per Node once asked for. The test configures the API server
/// (custom resources, Services that exist before the watcher) between [`KubeLab::start`]
/// and [`KubeLab::start_watcher`]; the IPAM and the ToR stay the test's own.
pub struct KubeLab {
    pub kube: FakeKube,
    pub kubeconfig: PathBuf,
    pub nodes: Vec<(String, String)>,
    home: PathBuf,
    watcher_args: Vec<String>,
    watcher_env: Vec<(String, String)>,
    pub watcher: Option<ChildProcess>,
    pub speakers: Vec<ChildProcess>,
}

/// How to build a [`KubeLab`]: the namespaces and Nodes it starts with, and the flags and
/// environment the watcher gets beyond the ones every lab uses.
pub struct KubeLabBuilder {
    dir: PathBuf,
    namespaces: Vec<String>,
    nodes: Vec<(String, String)>,
    watcher_args: Vec<String>,
    watcher_env: Vec<(String, String)>,
}

impl KubeLabBuilder {
    /// More namespaces beside `default`.
    pub fn namespace(mut self, name: &str) -> Self {
        self.namespaces.push(name.into());
        self
    }

    /// The Nodes (name, InternalIP), instead of [`LAB_NODES`].
    pub fn nodes(mut self, nodes: &[(&str, &str)]) -> Self {
        self.nodes = nodes
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
        self
    }

    /// Extra flags for the watcher, after the standard ones.
    pub fn watcher_args(mut self, args: &[&str]) -> Self {
        self.watcher_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An extra environment variable for the watcher.
    pub fn watcher_env(mut self, key: &str, value: &str) -> Self {
        self.watcher_env.push((key.into(), value.into()));
        self
    }

    /// Starts the fake API server with the namespaces and Nodes and writes the kubeconfig.
    pub async fn start(self) -> KubeLab {
        let kube = FakeKube::start().await.unwrap();
        for ns in &self.namespaces {
            kube.create(NAMESPACES, serde_json::json!({"metadata": {"name": ns}}))
                .unwrap();
        }
        for (name, address) in &self.nodes {
            kube.create(NODES, kube_node(name, address)).unwrap();
        }
        let kubeconfig = self.dir.join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig, "default").unwrap();
        KubeLab {
            kube,
            kubeconfig,
            nodes: self.nodes,
            home: self.dir,
            watcher_args: self.watcher_args,
            watcher_env: self.watcher_env,
            watcher: None,
            speakers: Vec::new(),
        }
    }
}

impl KubeLab {
    /// A lab whose files (kubeconfig, the watcher's HOME) live in `dir`.
    pub fn builder(dir: &Path) -> KubeLabBuilder {
        KubeLabBuilder {
            dir: dir.to_path_buf(),
            namespaces: vec!["default".into()],
            nodes: LAB_NODES
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect(),
            watcher_args: Vec::new(),
            watcher_env: Vec::new(),
        }
    }

    /// The watcher's command for `ipam_endpoint`: cluster `lab`, identity `e2e`, the lab's
    /// kubeconfig (never an in-cluster config), plus the builder's flags and environment.
    pub fn watcher_command(&self, ipam_endpoint: &str) -> Command {
        let mut watcher = Command::new(workspace_binary("herald-cluster-watcher"));
        watcher
            .args([
                "--ipam-endpoint",
                ipam_endpoint,
                "--cluster-id",
                "lab",
                "--identity",
                "e2e",
            ])
            .args(&self.watcher_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .env_remove("KUBERNETES_SERVICE_HOST");
        for (key, value) in &self.watcher_env {
            watcher.env(key, value);
        }
        watcher
    }

    /// Starts (or replaces) the watcher, talking to `ipam_endpoint`.
    pub fn start_watcher(&mut self, ipam_endpoint: &str) {
        self.start_watcher_with(ipam_endpoint, |_| {});
    }

    /// As [`Self::start_watcher`], with `customize` adding to this one start only.
    pub fn start_watcher_with(
        &mut self,
        ipam_endpoint: &str,
        customize: impl FnOnce(&mut Command),
    ) {
        let mut command = self.watcher_command(ipam_endpoint);
        customize(&mut command);
        self.watcher = Some(ChildProcess::spawn("herald-cluster-watcher", command));
    }

    /// Waits until IPAM lists every Node of the lab, Ready: the watcher has registered
    /// them, so speakers started now find themselves at once.
    pub async fn wait_registered(&self, ipam: &Ipam, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut nodes = Vec::new();
        while Instant::now() < deadline {
            nodes = ipam
                .routing()
                .await
                .list_nodes(pb::ListNodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes;
            if nodes.len() == self.nodes.len() && nodes.iter().all(|n| n.ready) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the watcher never registered the {} Nodes within {timeout:?}; IPAM has {nodes:?}",
            self.nodes.len()
        );
    }

    /// Starts one speaker per Node, talking to `ipam_endpoint`.
    pub fn start_speakers(&mut self, ipam_endpoint: &str) {
        self.start_speakers_with(ipam_endpoint, |_, _| {});
    }

    /// As [`Self::start_speakers`], with `customize(node index, command)` for each.
    pub fn start_speakers_with(
        &mut self,
        ipam_endpoint: &str,
        customize: impl Fn(usize, &mut Command),
    ) {
        for (i, (name, _)) in self.nodes.iter().enumerate() {
            self.speakers
                .push(speaker_with(name, ipam_endpoint, |c| customize(i, c)));
        }
    }

    /// The Nodes' addresses, sorted: the next hops every announced Service has.
    pub fn node_addresses(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self.nodes.iter().map(|(_, a)| a.as_str()).collect();
        all.sort();
        all
    }
}
