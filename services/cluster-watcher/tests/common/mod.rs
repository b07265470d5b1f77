//! Real processes for the watcher's end-to-end tests: herald-ipam on a fresh Postgres
//! database, the fake Kubernetes API server in this process, and the watcher binary
//! pointed at both. Every wait is bounded; every process is stopped by its PID.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_fake_kube::{FakeKube, NAMESPACES, SERVICES, Verb};
use herald_test_support::{ChildProcess, TestDb, free_port, workspace_binary};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const CLASS: &str = "herald.io/bgp";
pub const CLUSTER: &str = "lab";
/// Long enough for a cold start of either binary on a loaded 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Ipam {
    pub addr: SocketAddr,
    pub process: ChildProcess,
    pub db_url: String,
}

impl Ipam {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_on(&db.url, free_port()).await
    }

    pub async fn start_on(db_url: &str, port: u16) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = Command::new(workspace_binary("herald-ipam"));
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--database-url")
            .arg(db_url)
            .env("RUST_LOG", "warn");
        let ipam = Self {
            addr,
            process: ChildProcess::spawn("herald-ipam", command),
            db_url: db_url.to_string(),
        };
        ipam.wait_serving().await;
        ipam
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> IpamClient<Channel> {
        IpamClient::connect(self.endpoint()).await.unwrap()
    }

    async fn wait_serving(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Ok(channel) = Channel::from_shared(self.endpoint())
                .unwrap()
                .connect()
                .await
            {
                let req = tonic_health::pb::HealthCheckRequest {
                    service: "herald.ipam.v1.Ipam".into(),
                };
                match HealthClient::new(channel).check(req).await {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return,
                    Ok(r) => last = format!("status {}", r.get_ref().status),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "herald-ipam on {} not SERVING after {START_TIMEOUT:?}: {last}",
            self.addr
        );
    }

    pub async fn create_pool(&self, name: &str, addresses: &[&str]) {
        let pool = pb::Pool {
            name: name.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.client()
            .await
            .create_pool(pb::CreatePoolRequest { pool: Some(pool) })
            .await
            .unwrap();
    }

    /// This cluster's allocations, following pagination.
    pub async fn allocations(&self) -> Vec<pb::Allocation> {
        let mut client = self.client().await;
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_allocations(pb::ListAllocationsRequest {
                    cluster_id: CLUSTER.into(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            all.extend(page.allocations);
            if page.next_page_token.is_empty() {
                return all;
            }
            token = page.next_page_token;
        }
    }

    /// Waits until the allocations satisfy `check`.
    pub async fn wait_allocations(
        &self,
        what: &str,
        check: impl Fn(&[pb::Allocation]) -> bool,
    ) -> Vec<pb::Allocation> {
        let deadline = Instant::now() + WAIT;
        loop {
            let all = self.allocations().await;
            if check(&all) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for allocations: {what} ({} now)",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub struct Watcher {
    pub process: ChildProcess,
    pub identity: String,
    _dir: tempfile::TempDir,
}

impl Watcher {
    pub fn start(fake: &FakeKube, ipam_endpoint: &str, identity: &str, extra: &[&str]) -> Self {
        Self::start_with(fake, ipam_endpoint, identity, extra, |_| {})
    }

    /// As [`Self::start`], with `configure` applied to the command before it is spawned
    /// (e.g. to send its log to a file).
    pub fn start_with(
        fake: &FakeKube,
        ipam_endpoint: &str,
        identity: &str,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        fake.write_kubeconfig(&kubeconfig, "herald-system").unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald-cluster-watcher"));
        command
            .args(["--ipam-endpoint", ipam_endpoint])
            .args(["--cluster-id", CLUSTER])
            .args(["--identity", identity])
            .args([
                "--lease-duration-seconds",
                "3",
                "--lease-grace-seconds",
                "1",
            ])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env(
                "RUST_LOG",
                std::env::var("WATCHER_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            );
        configure(&mut command);
        Self {
            process: ChildProcess::spawn(&format!("herald-cluster-watcher {identity}"), command),
            identity: identity.to_string(),
            _dir: dir,
        }
    }
}

/// A watcher whose log goes to a file (without colours) and whose admin server (/readyz)
/// listens on a free loopback port: for the tests that read both.
pub struct LoggedWatcher {
    pub watcher: Watcher,
    pub admin: SocketAddr,
    log_path: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Watcher {
    pub fn start_logged(fake: &FakeKube, ipam_endpoint: &str, identity: &str) -> LoggedWatcher {
        let log_dir = tempfile::tempdir().unwrap();
        let log_path = log_dir.path().join("watcher.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let watcher = Watcher::start_with(
            fake,
            ipam_endpoint,
            identity,
            &["--admin-listen", &admin.to_string()],
            |command| {
                command
                    .env("NO_COLOR", "1")
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
            },
        );
        LoggedWatcher {
            watcher,
            admin,
            log_path,
            _log_dir: log_dir,
        }
    }
}

impl LoggedWatcher {
    /// The log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .unwrap()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Asserts the log holds exactly one line with `needle`, at ERROR: a refusal is
    /// logged once however often it is retried.
    pub fn assert_logged_once_as_error(&self, needle: &str) {
        let lines = self.log_lines(needle);
        assert_eq!(
            lines.len(),
            1,
            "one line with {needle:?} expected: {lines:#?}"
        );
        assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    }

    /// Until /readyz answers as `check` wants (`what` names it in the failure): its body.
    pub async fn wait_readyz(&self, what: &str, check: impl Fn(u16, &str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = http_get(self.admin, "/readyz").await;
            if let Ok((code, body)) = &last
                && check(*code, body)
            {
                return body.clone();
            }
            assert!(
                Instant::now() < deadline,
                "/readyz: {what} not seen within {WAIT:?}; last {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until /readyz fails naming `refused` (e.g. "list endpointslices"): its body.
    pub async fn wait_not_ready(&self, refused: &str) -> String {
        self.wait_readyz(&format!("a 503 naming {refused:?}"), |code, body| {
            code == 503 && body.contains(refused)
        })
        .await
    }

    /// Until /readyz answers 200.
    pub async fn wait_ready(&self) {
        self.wait_readyz("ready", |code, _| code == 200).await;
    }
}

/// Requests for `verb` on `resource` answered 403, once at least `n` were: a refusal
/// retried, not given up.
pub async fn wait_refused(fake: &FakeKube, verb: Verb, resource: &str, n: usize) {
    let refused = fake
        .wait_for(WAIT, |f| {
            let count = f
                .requests()
                .iter()
                .filter(|r| r.verb == verb && r.resource == resource && r.status == 403)
                .count();
            (count >= n).then_some(count)
        })
        .await;
    assert!(
        refused.is_some(),
        "{verb:?} {resource} was not refused {n} times within {WAIT:?}"
    );
}

/// One plain HTTP/1.0 GET on loopback: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Everything a scenario needs, started in order.
/// Fields drop in order: the API server and herald-ipam stop before the database goes.
pub struct Lab {
    pub fake: FakeKube,
    pub ipam: Ipam,
    pub db: TestDb,
}

impl Lab {
    /// Postgres, herald-ipam with `pools` (name, addresses), and the fake API server with
    /// the `default` namespace.
    pub async fn start(pools: &[(&str, &[&str])]) -> Self {
        let db = TestDb::postgres().await;
        let ipam = Ipam::start(&db).await;
        for (name, addresses) in pools {
            ipam.create_pool(name, addresses).await;
        }
        let fake = FakeKube::start().await.unwrap();
        fake.create(NAMESPACES, json!({"metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}))
            .unwrap();
        Self { fake, ipam, db }
    }

    pub fn watcher(&self, identity: &str) -> Watcher {
        Watcher::start(&self.fake, &self.ipam.endpoint(), identity, &[])
    }
}

/// A LoadBalancer Service with one TCP port, of our class unless `class` says otherwise.
pub fn svc(namespace: &str, name: &str, class: Option<&str>) -> Value {
    let mut spec = json!({
        "type": "LoadBalancer",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}],
        "selector": {"app": name},
    });
    if let Some(class) = class {
        spec["loadBalancerClass"] = json!(class);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": {"app": name}},
        "spec": spec,
    })
}

pub fn ours(namespace: &str, name: &str) -> Value {
    svc(namespace, name, Some(CLASS))
}

pub fn with_annotation(mut svc: Value, key: &str, value: &str) -> Value {
    svc["metadata"]["annotations"][key] = json!(value);
    svc
}

pub fn ingress_ips(svc: &Value) -> Vec<String> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["ip"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn condition(svc: &Value) -> Option<Value> {
    svc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "herald.io/IPAllocated")
        .cloned()
}

/// Waits until the Service shows addresses in its status and returns them.
pub async fn wait_ingress(fake: &FakeKube, namespace: &str, name: &str) -> Vec<String> {
    fake.wait_for(WAIT, |f| {
        let ips = ingress_ips(&f.get(SERVICES, namespace, name)?);
        (!ips.is_empty()).then_some(ips)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{namespace}/{name} got no address within {WAIT:?}: {:?}",
            fake.get(SERVICES, namespace, name)
        )
    })
}

/// Waits until the Service's condition has `status` and returns it.
pub async fn wait_condition(fake: &FakeKube, namespace: &str, name: &str, status: &str) -> Value {
    fake.wait_for(WAIT, |f| {
        condition(&f.get(SERVICES, namespace, name)?).filter(|c| c["status"] == status)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{namespace}/{name} has no {status} condition within {WAIT:?}: {:?}",
            fake.get(SERVICES, namespace, name)
        )
    })
}

/// Every Service's addresses, by name.
pub fn all_ingress(fake: &FakeKube) -> std::collections::BTreeMap<String, Vec<String>> {
    fake.list(SERVICES, None)
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap_or("").to_string(),
                ingress_ips(s),
            )
        })
        .collect()
}

pub fn assert_distinct(ips: impl IntoIterator<Item = String>) {
    let mut seen = HashSet::new();
    for ip in ips {
        assert!(seen.insert(ip.clone()), "{ip} is held twice");
    }
}
