//! A real `herald-ipam` process for the benchmarks, and the gRPC helpers they share.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::{ChildProcess, free_port};
use herald_tls::{ClientEndpoint, Reloading};
use serde::Serialize;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::mtls::{self, BenchPki};

/// How long a start may take before the bench gives up: far above the < 1 s target, so a
/// slow start is measured rather than cut off.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one connection attempt or health check may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IPAM_SERVICE: &str = "herald.ipam.v1.Ipam";
/// Largest page ListAllocations serves.
const LIST_PAGE: u32 = 1000;
/// Pages read before the listing is declared endless (100 M allocations).
const MAX_PAGES: usize = 100_000;
/// Lines of the server log shown when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// Where the `herald-ipam` binary is: `--ipam-bin`, or next to this executable (both are
/// built into the same target directory).
pub fn find_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("locate the herald-bench executable")?
            .with_file_name("herald-ipam"),
    };
    if !path.is_file() {
        bail!(
            "herald-ipam binary not found at {}. Build it next to herald-bench with \
             `cargo build --release -p herald-ipam -p herald-bench`, or pass --ipam-bin PATH",
            path.display()
        );
    }
    // herald-ipam runs in a scratch directory of its own, where a relative path would
    // name nothing.
    std::fs::canonicalize(&path).with_context(|| format!("resolve {}", path.display()))
}

/// A running `herald-ipam`, killed by its PID when this value drops, however the bench ends.
pub struct IpamServer {
    pub addr: SocketAddr,
    pub process: ChildProcess,
    log: PathBuf,
    /// The bench's own client identity when the server requires mutual TLS.
    client_tls: Option<Arc<Reloading>>,
}

/// How long a start took, from exec.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StartTimes {
    /// Until the gRPC port accepted a connection.
    pub listening_ms: f64,
    /// Until the health service said SERVING for `herald.ipam.v1.Ipam`.
    pub serving_ms: f64,
}

impl IpamServer {
    /// Starts the binary on a free loopback port against `database_url`, and waits for
    /// SERVING, polling every `poll`. Its log goes to a file in `log_dir`.
    pub async fn start(
        binary: &Path,
        database_url: &str,
        log_dir: &Path,
        poll: Duration,
    ) -> anyhow::Result<(Self, StartTimes)> {
        Self::start_traced(binary, database_url, log_dir, poll, None).await
    }

    /// As [`Self::start`], exporting spans to `otlp` (none: no export, whatever the
    /// environment says).
    pub async fn start_traced(
        binary: &Path,
        database_url: &str,
        log_dir: &Path,
        poll: Duration,
        otlp: Option<&str>,
    ) -> anyhow::Result<(Self, StartTimes)> {
        Self::start_with(binary, database_url, log_dir, poll, otlp, None).await
    }

    /// As [`Self::start_traced`], requiring mutual TLS with `mtls`'s certificates when
    /// given; the bench's own clients then connect with its watcher identity.
    pub async fn start_with(
        binary: &Path,
        database_url: &str,
        log_dir: &Path,
        poll: Duration,
        otlp: Option<&str>,
        mtls: Option<&BenchPki>,
    ) -> anyhow::Result<(Self, StartTimes)> {
        let mut command = Command::new(binary);
        command
            .env_remove("HERALD_DATABASE_URL")
            .env_remove("HERALD_LISTEN")
            .current_dir(log_dir);
        otlp_env(&mut command, otlp);
        if let Some(pki) = mtls {
            pki.server_args(&mut command);
        }
        Self::launch_with(
            "herald-ipam",
            command,
            database_url,
            log_dir,
            poll,
            IPAM_SERVICE,
            mtls.map(|pki| Arc::clone(pki.client())),
        )
        .await
    }

    /// Runs `command` with `--listen` on a free loopback port and `--database-url`, its
    /// output in a log file in `log_dir`, and waits until its health service says SERVING
    /// for `service`. Any gRPC server the benches start goes through here.
    pub(crate) async fn launch(
        name: &str,
        command: Command,
        database_url: &str,
        log_dir: &Path,
        poll: Duration,
        service: &str,
    ) -> anyhow::Result<(Self, StartTimes)> {
        Self::launch_with(name, command, database_url, log_dir, poll, service, None).await
    }

    /// As [`Self::launch`]; with `client_tls` the bench's clients (the health polls
    /// included) connect over mutual TLS with that identity.
    async fn launch_with(
        name: &str,
        mut command: Command,
        database_url: &str,
        log_dir: &Path,
        poll: Duration,
        service: &str,
        client_tls: Option<Arc<Reloading>>,
    ) -> anyhow::Result<(Self, StartTimes)> {
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = log_dir.join(format!("{}-{}.log", name.replace(' ', "-"), addr.port()));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("create log file {}", log.display()))?;
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--database-url")
            .arg(database_url)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        let exec = Instant::now();
        let server = Self {
            addr,
            process: ChildProcess::spawn(name, command),
            log,
            client_tls,
        };
        let times = server.wait_serving(exec, poll, service).await?;
        Ok((server, times))
    }

    /// Plaintext, or mutual TLS with the bench's identity when the server requires it
    /// (its certificate names `localhost`).
    fn endpoint(&self) -> anyhow::Result<ClientEndpoint> {
        let endpoint = match &self.client_tls {
            Some(identity) => ClientEndpoint::new(
                &format!("https://{}", self.addr),
                Some((identity, Some(mtls::SERVER_NAME.to_string()))),
                CONNECT_TIMEOUT,
            )?,
            None => ClientEndpoint::new(&format!("http://{}", self.addr), None, CONNECT_TIMEOUT)?,
        };
        Ok(endpoint.with(|e| e.tcp_nodelay(true)))
    }

    /// Whether the server requires client certificates (the bench then has its watcher
    /// identity, not a speaker's).
    pub fn mutual_tls(&self) -> bool {
        self.client_tls.is_some()
    }

    /// The `http://` or `https://` URL a started client (a speaker, the watcher) is given.
    pub fn url(&self) -> String {
        let scheme = if self.client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Polls the health service until it says SERVING for `service`.
    async fn wait_serving(
        &self,
        exec: Instant,
        poll: Duration,
        service: &str,
    ) -> anyhow::Result<StartTimes> {
        let deadline = exec + START_TIMEOUT;
        let endpoint = self.endpoint()?;
        let mut health: Option<HealthClient<Channel>> = None;
        let mut listening = None;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if health.is_none() {
                match endpoint.connect().await {
                    Ok(channel) => {
                        listening.get_or_insert_with(|| exec.elapsed());
                        health = Some(HealthClient::new(channel));
                    }
                    Err(e) => last = format!("connect: {e}"),
                }
            }
            if let Some(client) = health.as_mut() {
                let check = client.check(HealthCheckRequest {
                    service: service.into(),
                });
                match tokio::time::timeout(CONNECT_TIMEOUT, check).await {
                    Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32 => {
                        let serving = exec.elapsed();
                        let listening = listening.unwrap_or(serving);
                        return Ok(StartTimes {
                            listening_ms: listening.as_secs_f64() * 1000.0,
                            serving_ms: serving.as_secs_f64() * 1000.0,
                        });
                    }
                    Ok(Ok(resp)) => last = format!("health status {}", resp.get_ref().status),
                    Ok(Err(e)) => {
                        last = format!("health check: {e}");
                        health = None;
                    }
                    Err(_) => last = "health check timed out".into(),
                }
            }
            tokio::time::sleep(poll).await;
        }
        Err(anyhow!(
            "{} on {} not SERVING {START_TIMEOUT:?} after exec ({last}); last lines of {}:\n{}",
            self.process.name(),
            self.addr,
            self.log.display(),
            self.log_tail()
        ))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// `n` separate HTTP/2 connections. Clients share them round-robin, so with many
    /// clients no single connection's stream handling is the bottleneck.
    pub async fn channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let endpoint = self.endpoint()?;
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("connect to herald-ipam on {}", self.addr))?,
            );
        }
        Ok(channels)
    }

    pub async fn client(&self) -> anyhow::Result<IpamClient<Channel>> {
        let mut channels = self.channels(1).await?;
        let channel = channels.pop().ok_or_else(|| anyhow!("no channel"))?;
        Ok(IpamClient::new(channel))
    }
}

/// Creates a pool and returns its IPv4 capacity (usable addresses).
pub async fn create_pool(
    client: &mut IpamClient<Channel>,
    name: &str,
    cidr: &str,
    auto_assign: bool,
) -> anyhow::Result<u64> {
    let pool = client
        .create_pool(pb::CreatePoolRequest {
            pool: Some(pb::Pool {
                name: name.into(),
                addresses: vec![cidr.into()],
                auto_assign: Some(auto_assign),
                ..Default::default()
            }),
        })
        .await
        .with_context(|| format!("CreatePool {name} {cidr}"))?
        .into_inner();
    pool.capacity
        .iter()
        .find(|c| c.family == pb::IpFamily::Ipv4 as i32)
        .and_then(|c| c.total.parse().ok())
        .ok_or_else(|| anyhow!("pool {name} reports no IPv4 capacity: {:?}", pool.capacity))
}

/// The Allocate request for the `seq`-th Service of a phase: one IPv4 address, no
/// sharing, as most LoadBalancer Services ask.
pub fn allocate_request(prefix: &str, seq: u64, pool: Option<&str>) -> pb::AllocateRequest {
    pb::AllocateRequest {
        owner: Some(pb::Owner {
            cluster_id: "bench".into(),
            namespace: "bench".into(),
            name: format!("svc-{prefix}-{seq}"),
            uid: uid(prefix, seq),
        }),
        requested_pool: pool.unwrap_or_default().into(),
        ..Default::default()
    }
}

pub fn uid(prefix: &str, seq: u64) -> String {
    format!("{prefix}-{seq:08}")
}

pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The single address of an allocation.
pub fn only_ip(allocation: Option<pb::Allocation>) -> Result<String, String> {
    let allocation = allocation.ok_or("response without an allocation")?;
    match allocation.ips.as_slice() {
        [one] => Ok(one.ip.clone()),
        other => Err(format!(
            "expected one address for {:?}, got {}",
            allocation.owner.map(|o| o.uid),
            other.len()
        )),
    }
}

/// Every allocation the server holds, following pagination.
pub async fn list_all(client: &mut IpamClient<Channel>) -> anyhow::Result<Vec<pb::Allocation>> {
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_allocations(pb::ListAllocationsRequest {
                page_size: LIST_PAGE,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .context("ListAllocations")?
            .into_inner();
        all.extend(page.allocations);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
    bail!("ListAllocations did not end after {MAX_PAGES} pages")
}

/// What the server holds after a run, checked against what the clients were told.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Allocations listed by the server.
    pub listed: u64,
    /// Successful Allocate answers the clients received.
    pub answered: u64,
    /// Addresses listed for more than one owner.
    pub duplicates: u64,
    /// Owners whose listed address differs from the one they were answered with, or that
    /// were answered but are not listed.
    pub mismatches: u64,
}

impl Audit {
    pub fn clean(&self) -> bool {
        self.duplicates == 0 && self.mismatches == 0 && self.listed == self.answered
    }

    pub fn brief(&self) -> String {
        format!(
            "{} duplicates, {} listed / {} answered, {} mismatches",
            self.duplicates, self.listed, self.answered, self.mismatches
        )
    }
}

/// Lists everything and checks that every address has one owner, and that the listing
/// and the answers (`uid → ip`) agree.
pub async fn audit(
    client: &mut IpamClient<Channel>,
    answered: &HashMap<String, String>,
) -> anyhow::Result<Audit> {
    let listed = list_all(client).await?;
    let mut holder: HashMap<&str, &str> = HashMap::with_capacity(listed.len());
    let mut by_owner: HashMap<&str, &str> = HashMap::with_capacity(listed.len());
    let mut audit = Audit {
        listed: listed.len() as u64,
        answered: answered.len() as u64,
        ..Audit::default()
    };
    for allocation in &listed {
        let uid = allocation.owner.as_ref().map_or("", |o| o.uid.as_str());
        for ip in &allocation.ips {
            match holder.insert(ip.ip.as_str(), uid) {
                Some(other) if other != uid => audit.duplicates += 1,
                _ => {}
            }
            by_owner.insert(uid, ip.ip.as_str());
        }
    }
    audit.mismatches = answered
        .iter()
        .filter(|(uid, ip)| by_owner.get(uid.as_str()) != Some(&ip.as_str()))
        .count() as u64;
    Ok(audit)
}

/// Span export for a started binary: to `otlp`, or off even if the bench's own
/// environment names a collector.
pub fn otlp_env(command: &mut Command, otlp: Option<&str>) {
    match otlp {
        Some(endpoint) => command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        None => command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    };
}
