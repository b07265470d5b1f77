//! `fanout` and `e2e`: Herald's control plane with its real binaries. `fanout` measures
//! how herald-ipam delivers node route sets to 1,000 WatchNodeRoutes subscribers;
//! `e2e` times an allocation (or a Kubernetes Service) until a GoBGP ToR holds its /32
//! from both nodes' route speakers.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use herald_api::ipam::v1 as ipam_pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_fake_kube::{FakeKube, NAMESPACES, NODES, SERVICES};
use herald_test_support::ChildProcess;
use herald_tor_harness::{Tor, TorConfig, TorKind};
use ipnet::IpNet;
use serde::Serialize;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::benches::Common;
use crate::cpu::{self, CpuUse};
use crate::ipam::{self, IpamServer};
use crate::pg::BenchDb;
use crate::report::{self, Target};
use crate::rounds::median;
use crate::speakers;
use crate::stats::{Latencies, Summary};

/// Delivery p99 target of `fanout` (BENCHMARKS.md).
const FANOUT_P99_TARGET_MS: f64 = 10.0;
/// herald-ipam memory per WatchNodeRoutes subscriber.
const FANOUT_KIB_PER_SUBSCRIBER_TARGET: f64 = 20.0;
/// e2e one-by-one targets from the Allocate answer to the route at the ToR, and the
/// burst's (BENCHMARKS.md).
const E2E_P50_TARGET_MS: f64 = 5.0;
const E2E_P99_TARGET_MS: f64 = 15.0;
const E2E_BURST_TARGET_MS: f64 = 500.0;
/// The comparator BENCHMARKS.md names for `e2e`; none is run.
const E2E_REFERENCE: &str = "MetalLB FRR mode spends 5-6 s in debounce and reload alone";
/// Bound on waiting for one route (one-by-one) at the ToR.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the whole one-by-one phase.
const ONE_BY_ONE_LIMIT: Duration = Duration::from_secs(300);
/// Bound on the burst converging at the ToR.
const BURST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between ToR polls while timing one route; each poll is one GoBGP API call.
const ROUTE_POLL: Duration = Duration::from_millis(2);
const BURST_POLL: Duration = Duration::from_millis(10);
/// Sessions of both speakers to the ToR.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// The two simulated nodes of `e2e`.
const E2E_NODES: [(&str, &str); 2] = [("n0", "127.0.0.10"), ("n1", "127.0.0.11")];
pub(crate) const E2E_POOL: &str = "10.10.0.0/16";
const FANOUT_POOL: &str = "10.20.0.0/16";
/// The fanout policy's peer: never contacted (no speaker runs).
const FANOUT_PEER_PORT: u32 = 1790;
/// After the change phase, how long subscribers may still receive.
const FANOUT_DRAIN: Duration = Duration::from_secs(3);
/// Bound on 1,000 subscribers receiving their first snapshot.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(60);

/// A Herald binary next to this executable, or the build command that makes it.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()
        .context("locate the herald-bench executable")?
        .with_file_name(name);
    if !path.is_file() {
        bail!(
            "{name} binary not found at {}. Build it next to herald-bench with \
             `cargo build --release -p {name} -p herald-bench`",
            path.display()
        );
    }
    Ok(path)
}

async fn routing_client(server: &IpamServer) -> anyhow::Result<RoutingClient<Channel>> {
    let channel = server
        .channels(1)
        .await?
        .pop()
        .ok_or_else(|| anyhow!("no channel"))?;
    Ok(RoutingClient::new(channel))
}

fn node(name: &str, address: &str, labels: &[(&str, &str)]) -> pb::Node {
    pb::Node {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vec![address.into()],
        ready: true,
    }
}

/// One peer at 127.0.0.1:`port` for the nodes matching `selector`; every pool
/// advertised as /32s.
fn policy(port: u32, hold_time: u32, selector: Option<(&str, &str)>) -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: herald_tor_harness::NODE_ASN,
        peers: vec![pb::Peer {
            name: "tor".into(),
            address: "127.0.0.1".into(),
            asn: herald_tor_harness::TOR_ASN,
            port,
            hold_time_seconds: hold_time,
            connect_retry_seconds: 1,
            node_selector: selector.map(|(k, v)| ipam_pb::LabelSelector {
                match_labels: [(k.to_string(), v.to_string())].into(),
                match_expressions: vec![],
            }),
            ..Default::default()
        }],
        advertisements: vec![pb::Advertisement::default()],
        ..Default::default()
    }
}

fn owner(prefix: &str, seq: u64) -> ipam_pb::Owner {
    ipam_pb::Owner {
        cluster_id: "bench".into(),
        namespace: "bench".into(),
        name: format!("svc-{prefix}-{seq}"),
        uid: ipam::uid(prefix, seq),
    }
}

fn host_prefix(ip: &str) -> anyhow::Result<IpNet> {
    let addr: IpAddr = ip.parse().with_context(|| format!("address {ip:?}"))?;
    Ok(IpNet::from(addr))
}

/// A `herald-route-speaker` for node `name`, killed by its PID when dropped.
fn start_speaker(
    binary: &Path,
    name: &str,
    ipam: &IpamServer,
    common: &Common,
) -> anyhow::Result<ChildProcess> {
    let log_dir = common.log_dir.as_path();
    let log = log_dir.join(format!("herald-route-speaker-{name}.log"));
    let file = std::fs::File::create(&log)
        .with_context(|| format!("create log file {}", log.display()))?;
    let mut command = Command::new(binary);
    command
        .args([
            "--node-name",
            name,
            "--ipam-endpoint",
            &ipam.url(),
            "--report-interval",
            "1s",
        ])
        .env_remove("HERALD_NODE_NAME")
        .env_remove("HERALD_IPAM_ENDPOINT")
        .current_dir(log_dir)
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file));
    ipam::otlp_env(&mut command, common.otlp_endpoint.as_deref());
    if let Some(pki) = &common.mtls {
        pki.speaker_args(&mut command, name);
    }
    Ok(ChildProcess::spawn(
        &format!("herald-route-speaker {name}"),
        command,
    ))
}

/// Paths the ToR holds for `prefix` from the e2e nodes. One API call on GoBGP: the poll
/// must not take the CPU the pipeline being timed needs.
async fn paths_at_tor(tor: &Tor, prefix: IpNet) -> anyhow::Result<usize> {
    let sources = tor.path_sources(prefix).await?;
    Ok(E2E_NODES
        .iter()
        .filter(|(_, address)| sources.iter().any(|s| s.to_string() == *address))
        .count())
}

/// Waits until the ToR holds `prefix` from both nodes; the time since `since`.
async fn wait_both_paths(tor: &Tor, prefix: IpNet, since: Instant) -> anyhow::Result<Duration> {
    wait_both_paths_timed(tor, prefix, since, &mut Latencies::new()).await
}

/// As [`wait_both_paths`], recording how long each poll took in `polls`: the route is seen
/// at most one poll pause plus one poll after it arrived.
async fn wait_both_paths_timed(
    tor: &Tor,
    prefix: IpNet,
    since: Instant,
    polls: &mut Latencies,
) -> anyhow::Result<Duration> {
    loop {
        let asked = Instant::now();
        let paths = paths_at_tor(tor, prefix).await?;
        polls.record(asked.elapsed());
        if paths >= E2E_NODES.len() {
            return Ok(since.elapsed());
        }
        if since.elapsed() >= ROUTE_TIMEOUT {
            bail!("{prefix} not at the ToR from both nodes within {ROUTE_TIMEOUT:?}");
        }
        tokio::time::sleep(ROUTE_POLL).await;
    }
}

/// When a WatchNodeRoutes stream of the benchmark's own first received each prefix: the
/// moment herald-ipam's route reaches a subscriber, as it reaches the node's speaker.
struct Arrivals {
    seen: Arc<Mutex<HashMap<IpNet, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Arrivals {
    fn first_seen(&self, prefix: IpNet) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&prefix)
            .copied()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows `node`'s routes (a snapshot, then deltas) on a connection of its own.
async fn watch_arrivals(server: &IpamServer, node: &str) -> anyhow::Result<Arrivals> {
    let mut routing = routing_client(server).await?;
    let mut stream = routing
        .watch_node_routes(pb::WatchNodeRoutesRequest {
            node: node.to_string(),
            deltas: true,
        })
        .await
        .context("WatchNodeRoutes")?
        .into_inner();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let record = Arc::clone(&seen);
    // Bounded by the stream, which ends with herald-ipam, and by the abort on drop.
    let task = tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            let at = Instant::now();
            let mut seen = record.lock().unwrap_or_else(PoisonError::into_inner);
            for route in message.peers.iter().flat_map(|p| &p.routes) {
                if let Ok(prefix) = route.prefix.parse::<IpNet>() {
                    seen.entry(prefix).or_insert(at);
                }
            }
        }
    });
    Ok(Arrivals { seen, task })
}

/// Prefixes the ToR accepted from each e2e node (its neighbor counters).
pub(crate) async fn received_per_node(tor: &Tor) -> anyhow::Result<Vec<u64>> {
    let neighbors = tor.neighbors().await?;
    Ok(E2E_NODES
        .iter()
        .map(|(_, address)| {
            neighbors
                .iter()
                .find(|n| n.address.to_string() == *address)
                .map_or(0, |n| n.prefixes_received)
        })
        .collect())
}

/// Waits until every node has `at_least` prefixes at the ToR, for at most `limit` after
/// `since`; the time since `since`.
pub(crate) async fn wait_all_nodes(
    tor: &Tor,
    at_least: u64,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Duration> {
    loop {
        let counts = received_per_node(tor).await?;
        if counts.iter().all(|c| *c >= at_least) {
            return Ok(since.elapsed());
        }
        if since.elapsed() >= limit {
            bail!("the ToR holds {counts:?} prefixes per node, not {at_least}, after {limit:?}");
        }
        tokio::time::sleep(BURST_POLL).await;
    }
}

/// herald-ipam, a GoBGP ToR, the policy, the two nodes and their route speakers, all
/// sessions Established.
pub(crate) struct Pipeline {
    pub(crate) tor: Tor,
    // Dropped before the server and the database.
    _speakers: Vec<ChildProcess>,
    pub(crate) watcher: Option<ChildProcess>,
    pub(crate) server: IpamServer,
    _db: BenchDb,
    ipam: IpamClient<Channel>,
}

/// With `kube`, a herald-cluster-watcher on that fake API server registers the nodes
/// (from Kubernetes Nodes) instead of UpsertNode calls.
async fn start_pipeline(common: &Common, kube: Option<&FakeKube>) -> anyhow::Result<Pipeline> {
    start_pipeline_with(common, kube, &[]).await
}

/// As [`start_pipeline`], the watcher started with `watcher_args` besides its own.
pub(crate) async fn start_pipeline_with(
    common: &Common,
    kube: Option<&FakeKube>,
    watcher_args: &[String],
) -> anyhow::Result<Pipeline> {
    start_pipeline_on(common, kube, watcher_args, TorKind::Gobgp).await
}

/// As [`start_pipeline_with`], with a ToR of `tor_kind`.
async fn start_pipeline_on(
    common: &Common,
    kube: Option<&FakeKube>,
    watcher_args: &[String],
    tor_kind: TorKind,
) -> anyhow::Result<Pipeline> {
    let speaker_bin = find_binary("herald-route-speaker")?;
    let watcher_bin = match kube {
        Some(_) => Some(find_binary("herald-cluster-watcher")?),
        None => None,
    };
    let tor = Tor::start(TorConfig::new(tor_kind)).await?;
    let db = BenchDb::create(&common.admin_url).await?;
    let otlp = common.otlp_endpoint.as_deref();
    let (server, _) = IpamServer::start_with(
        &common.ipam_bin,
        &db.url,
        &common.log_dir,
        common.poll,
        otlp,
        common.mtls.as_deref(),
    )
    .await?;
    let mut ipam = server.client().await?;
    let mut routing = routing_client(&server).await?;
    ipam::create_pool(&mut ipam, "e2e", E2E_POOL, true).await?;
    routing
        .set_bgp_policy(policy(
            u32::from(tor.bgp_port()),
            u32::from(tor.config().hold_time),
            kube.is_none().then_some(("bgp-peer", "true")),
        ))
        .await
        .context("SetBgpPolicy")?;
    let mut watcher = None;
    match (kube, watcher_bin) {
        (Some(fake), Some(binary)) => {
            for (name, address) in E2E_NODES {
                fake.create(NODES, kube_node(name, address))
                    .map_err(|e| anyhow!("create Node {name}: {e:?}"))?;
            }
            watcher = Some(start_watcher(&binary, fake, &server, common, watcher_args)?);
            wait_nodes_registered(&mut routing).await?;
        }
        _ => {
            for (name, address) in E2E_NODES {
                routing
                    .upsert_node(node(name, address, &[("bgp-peer", "true")]))
                    .await
                    .with_context(|| format!("UpsertNode {name}"))?;
            }
        }
    }
    let speakers = E2E_NODES
        .iter()
        .map(|(name, _)| start_speaker(&speaker_bin, name, &server, common))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tor.wait_neighbors(ESTABLISH_TIMEOUT, |n| {
        n.iter().filter(|n| n.established).count() == E2E_NODES.len()
    })
    .await
    .context("both route speakers Established with the ToR")?;
    Ok(Pipeline {
        tor,
        _speakers: speakers,
        watcher,
        server,
        _db: db,
        ipam,
    })
}

/// One-by-one and burst figures of one e2e driver.
#[derive(Debug, Clone, Serialize)]
pub struct E2ePhases {
    pub one_by_one: Summary,
    /// Of the one-by-one samples: the Allocate RPC (or the create) alone.
    pub call: Summary,
    /// Of the one-by-one samples: from the call's answer (or the status) to the ToR.
    pub from_answer: Summary,
    /// Where `from_answer` goes, where the driver can tell (e2e (a)).
    pub split: Option<E2eSplit>,
    pub one_by_one_cpu: CpuUse,
    pub burst_size: u64,
    /// The batch RPC (or the creates) alone; the median over the bursts.
    pub burst_call_ms: f64,
    /// Until the ToR holds every burst prefix from both nodes; the median over the bursts.
    pub burst_ms: f64,
    /// Each burst's time until the ToR held it, in order.
    pub burst_samples_ms: Vec<f64>,
    /// Over all the bursts.
    pub burst_cpu: CpuUse,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// The one-by-one time from the Allocate answer to the ToR, cut where the benchmark's own
/// WatchNodeRoutes stream of node n0 (a subscriber like n0's speaker) receives the route.
#[derive(Debug, Clone, Serialize)]
pub struct E2eSplit {
    /// From the answer until the stream delivered the route: herald-ipam's change feed,
    /// route engine and publication.
    pub to_stream: Summary,
    /// From there until the ToR showed both paths: the speakers, BGP, GoBGP and the poll.
    pub stream_to_tor: Summary,
    /// One ToR poll (one GoBGP ListPath call), which with `ROUTE_POLL` bounds how late
    /// the ToR's route is seen.
    pub tor_poll: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub allocate: E2ePhases,
    pub reference: &'static str,
    pub targets: Vec<Target>,
}

/// `count` Services one by one, then `bursts` times `burst` at once (one AllocateBatch).
pub async fn e2e(
    common: &Common,
    count: u64,
    burst: u64,
    bursts: u64,
) -> anyhow::Result<E2eReport> {
    let bursts = bursts.max(1);
    common.print_header(&format!(
        "e2e (a): Allocate -> herald-ipam -> 2 route speakers -> GoBGP ToR; {count} one by one, then {bursts} x {burst} at once"
    ));
    let mut p = start_pipeline(common, None).await?;
    let pid = Some(p.server.process.pid());

    // Warm-up: one Service through the whole path.
    let warm = p
        .ipam
        .allocate(ipam_pb::AllocateRequest {
            owner: Some(owner("warm", 0)),
            ..Default::default()
        })
        .await
        .context("warm-up Allocate")?;
    let warm_prefix =
        host_prefix(&ipam::only_ip(warm.into_inner().allocation).map_err(|e| anyhow!(e))?)?;
    wait_both_paths(&p.tor, warm_prefix, Instant::now())
        .await
        .context("warm-up route")?;

    // Under mutual TLS only n0's speaker may follow n0's routes, and the bench connects as
    // the watcher: the split is left out there rather than weakening the authorization.
    let mut arrivals = if p.server.mutual_tls() {
        None
    } else {
        Some(watch_arrivals(&p.server, E2E_NODES[0].0).await?)
    };
    let mut total = Latencies::new();
    let mut call = Latencies::new();
    let mut from_answer = Latencies::new();
    let mut to_stream = Latencies::new();
    let mut stream_to_tor = Latencies::new();
    let mut tor_poll = Latencies::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let phase_start = Instant::now();
    let before = cpu::sample(pid);
    for seq in 0..count {
        if phase_start.elapsed() >= ONE_BY_ONE_LIMIT {
            println!("  one-by-one phase stopped by time after {seq} allocations");
            break;
        }
        let started = Instant::now();
        let result = p
            .ipam
            .allocate(ipam_pb::AllocateRequest {
                owner: Some(owner("one", seq)),
                ..Default::default()
            })
            .await;
        let answered_at = Instant::now();
        let answered = answered_at - started;
        let outcome = match result {
            Ok(resp) => match ipam::only_ip(resp.into_inner().allocation) {
                Ok(ip) => match host_prefix(&ip) {
                    Ok(prefix) => wait_both_paths_timed(&p.tor, prefix, started, &mut tor_poll)
                        .await
                        .map(|latency| (latency, prefix)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(anyhow!(e)),
            },
            Err(status) => Err(anyhow!(ipam::status_text(&status))),
        };
        match outcome {
            Ok((latency, prefix)) => {
                total.record(latency);
                call.record(answered);
                from_answer.record(latency.saturating_sub(answered));
                if let Some(at) = arrivals.as_ref().and_then(|a| a.first_seen(prefix)) {
                    to_stream.record(at.saturating_duration_since(answered_at));
                    stream_to_tor.record((started + latency).saturating_duration_since(at));
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("Service {seq}: {e:#}"));
            }
        }
    }
    let after = cpu::sample(pid);
    let one_by_one_cpu = cpu::between(&before, &after);

    // The bursts: each one AllocateBatch, then until every node's count at the ToR grew
    // by it. One burst is a single 30-50 ms sample; several give a median.
    let mut burst_samples_ms = Vec::with_capacity(bursts as usize);
    let mut burst_call_samples_ms = Vec::with_capacity(bursts as usize);
    let before = cpu::sample(pid);
    for round in 0..bursts {
        let baseline = received_per_node(&p.tor)
            .await?
            .into_iter()
            .min()
            .unwrap_or(0);
        let label = format!("burst{round}");
        let requests = (0..burst)
            .map(|seq| ipam_pb::AllocateRequest {
                owner: Some(owner(&label, seq)),
                ..Default::default()
            })
            .collect();
        let started = Instant::now();
        let response = p
            .ipam
            .allocate_batch(ipam_pb::AllocateBatchRequest { requests })
            .await
            .with_context(|| format!("AllocateBatch of burst {}", round + 1))?
            .into_inner();
        let burst_call = started.elapsed();
        let allocated = response
            .results
            .iter()
            .filter(|r| {
                matches!(
                    r.result,
                    Some(ipam_pb::allocate_result::Result::Allocation(_))
                )
            })
            .count() as u64;
        if allocated != burst {
            errors += burst - allocated;
            first_error.get_or_insert_with(|| {
                format!("burst {}: {allocated} of {burst} allocated", round + 1)
            });
        }
        let burst_done =
            wait_all_nodes(&p.tor, baseline + allocated, started, BURST_TIMEOUT).await?;
        burst_call_samples_ms.push(burst_call.as_secs_f64() * 1000.0);
        burst_samples_ms.push(burst_done.as_secs_f64() * 1000.0);
    }
    let after = cpu::sample(pid);
    let split = arrivals.take().map(|_| E2eSplit {
        to_stream: to_stream.summary(),
        stream_to_tor: stream_to_tor.summary(),
        tor_poll: tor_poll.summary(),
    });
    let phases = E2ePhases {
        one_by_one: total.summary(),
        call: call.summary(),
        from_answer: from_answer.summary(),
        split,
        one_by_one_cpu,
        burst_size: burst,
        burst_call_ms: median(burst_call_samples_ms),
        burst_ms: median(burst_samples_ms.clone()),
        burst_samples_ms,
        burst_cpu: cpu::between(&before, &after),
        errors,
        first_error,
    };
    drop(p);

    print_e2e_phases("Allocate", &phases);
    let targets = e2e_targets("e2e allocate", &phases);
    report::print_targets(&targets);
    Ok(E2eReport {
        allocate: phases,
        reference: E2E_REFERENCE,
        targets,
    })
}

fn print_e2e_phases(driver: &str, phases: &E2ePhases) {
    println!(
        "  {:<22} {:>6} {:>9} {:>9} {:>9} {:>9}   comparator (not run)",
        "phase", "n", "p50 ms", "p99 ms", "max ms", "total ms"
    );
    let s = &phases.one_by_one;
    println!(
        "  {:<22} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9}   {E2E_REFERENCE}",
        format!("{driver} one by one"),
        s.count,
        s.p50_ms,
        s.p99_ms,
        s.max_ms,
        "-"
    );
    let row = |label: &str, s: &Summary| {
        println!(
            "  {label:<22} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9}",
            s.count, s.p50_ms, s.p99_ms, s.max_ms, "-"
        );
    };
    row("  of which the call", &phases.call);
    row("  from the answer", &phases.from_answer);
    if let Some(split) = &phases.split {
        row("    to n0's stream", &split.to_stream);
        row("    stream to ToR", &split.stream_to_tor);
    }
    println!(
        "  {:<22} {:>6} {:>9} {:>9} {:>9} {:>9.1}   call {:.1} ms",
        format!("{driver} burst"),
        phases.burst_size,
        "-",
        "-",
        "-",
        phases.burst_ms,
        phases.burst_call_ms
    );
    if phases.burst_samples_ms.len() > 1 {
        let samples: Vec<String> = phases
            .burst_samples_ms
            .iter()
            .map(|ms| format!("{ms:.1}"))
            .collect();
        println!(
            "  {:<22} the median of {} bursts: {} ms",
            "",
            samples.len(),
            samples.join(", ")
        );
    }
    println!("  cpu one by one: {}", phases.one_by_one_cpu.brief());
    println!("  cpu burst:      {}", phases.burst_cpu.brief());
    println!(
        "  to the ToR = until GoBGP's table shows the /32 with a path from both nodes \
         (one prefix polled every {ROUTE_POLL:?}; burst: per-neighbor prefix counters every \
         {BURST_POLL:?}; both over GoBGP's gRPC API)"
    );
    if let Some(split) = &phases.split {
        let t = &split.tor_poll;
        println!(
            "  to n0's stream = until the bench's own WatchNodeRoutes stream of n0 (deltas, like \
             the speaker's) has the /32; one ToR poll took p50 {:.2} ms, p99 {:.2} ms ({} polls), \
             so the ToR's route is seen at most {ROUTE_POLL:?} + one poll late",
            t.p50_ms, t.p99_ms, t.count
        );
    }
    if let Some(e) = &phases.first_error {
        println!("  {} errors; first: {e}", phases.errors);
    }
}

fn e2e_targets(name: &str, phases: &E2ePhases) -> Vec<Target> {
    let s = &phases.from_answer;
    let sound = s.count > 0 && phases.errors == 0;
    vec![
        Target::new(
            format!("{name} p50 from the answer"),
            format!("{:.1} ms", s.p50_ms),
            format!("<= {E2E_P50_TARGET_MS} ms"),
            sound && s.p50_ms <= E2E_P50_TARGET_MS,
        ),
        Target::new(
            format!("{name} p99 from the answer"),
            format!("{:.1} ms", s.p99_ms),
            format!("<= {E2E_P99_TARGET_MS} ms"),
            sound && s.p99_ms <= E2E_P99_TARGET_MS,
        ),
        Target::new(
            format!("{name} burst {}", phases.burst_size),
            format!("{:.1} ms", phases.burst_ms),
            format!("< {E2E_BURST_TARGET_MS} ms"),
            phases.errors == 0 && phases.burst_ms < E2E_BURST_TARGET_MS,
        ),
    ]
}

// ---- fanout --------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub subscribers: usize,
    pub channels: usize,
    pub changes: u64,
    pub change_rate: f64,
    /// Receive time minus the time the change RPC returned (clamped at 0; how many
    /// arrived before the answer is in `early`).
    pub from_answer: Summary,
    /// Receive time minus the time the change RPC was sent.
    pub from_send: Summary,
    pub early: u64,
    pub snapshots_per_subscriber_mean: f64,
    pub snapshots_per_subscriber_min: u64,
    pub unmatched: u64,
    pub rss_before_kib: u64,
    pub rss_streams_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_subscriber: f64,
    pub subscribe_ms: f64,
    pub change_call: Summary,
    pub cpu: CpuUse,
    /// The same load against a server that only broadcasts (`fanout_floor`).
    pub floor: crate::fanout_floor::FloorFanout,
    /// herald-ipam's delivery p99 over the floor's, from the change answered.
    pub p99_over_floor: f64,
    pub targets: Vec<Target>,
}

fn set_key(routes: &pb::NodeRoutes) -> u64 {
    let mut prefixes: Vec<&str> = routes
        .peers
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| r.prefix.as_str()))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prefixes.hash(&mut hasher);
    hasher.finish()
}

fn key_of(prefixes: &[String]) -> u64 {
    let mut sorted: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    sorted.hash(&mut hasher);
    hasher.finish()
}

/// The ip of the `j`-th fanout Service: unique over the run, so every node set the
/// changes produce is distinct and each snapshot names the change it reflects.
fn fanout_ip(j: u64) -> String {
    format!("10.20.{}.{}", j / 250, j % 250 + 1)
}

pub async fn fanout(
    common: &Common,
    subscribers: usize,
    channels: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<FanoutReport> {
    common.print_header(&format!(
        "fanout: {subscribers} WatchNodeRoutes subscribers on {channels} HTTP/2 connections, ~{rate:.0} route changes/s for {:.0} s",
        duration.as_secs_f64()
    ));
    let db = BenchDb::create(&common.admin_url).await?;
    let (server, _) =
        IpamServer::start(&common.ipam_bin, &db.url, &common.log_dir, common.poll).await?;
    let pid = server.process.pid();
    let mut ipam_client = server.client().await?;
    let mut routing = routing_client(&server).await?;
    ipam::create_pool(&mut ipam_client, "fan", FANOUT_POOL, true).await?;
    routing
        .set_bgp_policy(policy(FANOUT_PEER_PORT, 9, None))
        .await
        .context("SetBgpPolicy")?;
    let names: Vec<String> = (0..subscribers).map(|i| format!("f{i:05}")).collect();
    for (i, name) in names.iter().enumerate() {
        let address = format!("127.1.{}.{}", i / 250, i % 250 + 1);
        routing
            .upsert_node(node(name, &address, &[]))
            .await
            .with_context(|| format!("UpsertNode {name}"))?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = speakers::rss(pid).rss_kib;

    // Subscribers: one stream per node, spread over `channels` connections. Each
    // records (receive time, set key) per snapshot.
    let conns = server.channels(channels).await?;
    let epoch = Instant::now();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
    let stop = tokio_util_cancel();
    let mut tasks = Vec::with_capacity(subscribers);
    for (i, name) in names.iter().enumerate() {
        let mut client = RoutingClient::new(conns[i % conns.len()].clone());
        let name = name.clone();
        let first_tx = first_tx.clone();
        let mut stop = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<(Duration, u64)> = Vec::with_capacity(2048);
            let mut stream = match client
                .watch_node_routes(pb::WatchNodeRoutesRequest {
                    node: name.clone(),
                    deltas: false,
                })
                .await
            {
                Ok(s) => s.into_inner(),
                Err(e) => return Err(format!("{name}: {}", ipam::status_text(&e))),
            };
            let mut first = true;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    message = stream.message() => match message {
                        Ok(Some(routes)) => {
                            seen.push((epoch.elapsed(), set_key(&routes)));
                            if first {
                                first = false;
                                let _ = first_tx.send(()).await;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("{name}: {}", ipam::status_text(&e))),
                    },
                }
            }
            Ok(seen)
        }));
    }
    drop(first_tx);
    let subscribe_start = Instant::now();
    let mut ready = 0usize;
    while ready < subscribers {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(subscribe_start + SUBSCRIBE_TIMEOUT),
            first_rx.recv(),
        )
        .await
        {
            Ok(Some(())) => ready += 1,
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let subscribe_ms = subscribe_start.elapsed().as_secs_f64() * 1000.0;
    if ready < subscribers {
        bail!("only {ready} of {subscribers} subscribers got their first snapshot");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_streams = speakers::rss(pid).rss_kib;

    // Changes: A0, A1, R0, A2, R1, ... Each changes every node's set (Cluster Services
    // are routed from every node). Change k's expected set is recorded with its times.
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let max_changes = (duration.as_secs_f64() * rate).ceil() as u64;
    let mut expected: HashMap<u64, usize> = HashMap::new();
    let mut change_times: Vec<(Duration, Duration)> = Vec::new(); // (sent, answered) since epoch
    let mut held: Vec<(u64, String)> = Vec::new();
    let mut next_service = 0u64;
    let mut change_call = Latencies::new();
    let before = cpu::sample(Some(pid));
    let start = Instant::now();
    let mut k = 0u64;
    while k < max_changes && start.elapsed() < duration {
        let due = start + interval * u32::try_from(k).unwrap_or(u32::MAX);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        // Allocate when fewer than two are held, else release the oldest.
        let allocate = held.len() < 2;
        let sent = epoch.elapsed();
        if allocate {
            let j = next_service;
            next_service += 1;
            let ip = fanout_ip(j);
            p_allocate(&mut ipam_client, j, &ip).await?;
            held.push((j, format!("{ip}/32")));
        } else {
            let (j, _) = held.remove(0);
            ipam_client
                .release(ipam_pb::ReleaseRequest {
                    owner_uid: ipam::uid("fan", j),
                    reason: String::new(),
                })
                .await
                .with_context(|| format!("Release {j}"))?;
        }
        let answered = epoch.elapsed();
        change_call.record(answered.saturating_sub(sent));
        let prefixes: Vec<String> = held.iter().map(|(_, p)| p.clone()).collect();
        expected.insert(key_of(&prefixes), change_times.len());
        change_times.push((sent, answered));
        k += 1;
    }
    let elapsed = start.elapsed();
    tokio::time::sleep(FANOUT_DRAIN).await;
    let after = cpu::sample(Some(pid));
    let rss_after = speakers::rss(pid).rss_kib;
    let _ = stop.send(true);

    let mut from_answer = Latencies::new();
    let mut from_send = Latencies::new();
    let mut early = 0u64;
    let mut unmatched = 0u64;
    let mut per_subscriber = Vec::with_capacity(subscribers);
    // Per change: the first and the last subscriber's receive time (since epoch).
    let mut spread: Vec<Option<(Duration, Duration)>> = vec![None; change_times.len()];
    let mut first_error = None;
    for task in tasks {
        let seen = match task.await {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
                continue;
            }
            Err(e) => {
                first_error.get_or_insert(format!("subscriber task: {e}"));
                continue;
            }
        };
        let mut delivered = 0u64;
        // The first snapshot is the initial one, before any change.
        for (at, key) in seen.iter().skip(1) {
            match expected.get(key).and_then(|i| change_times.get(*i)) {
                Some((sent, answered)) => {
                    delivered += 1;
                    if let Some(slot) = expected.get(key).and_then(|i| spread.get_mut(*i)) {
                        *slot = Some(match *slot {
                            None => (*at, *at),
                            Some((lo, hi)) => (lo.min(*at), hi.max(*at)),
                        });
                    }
                    from_send.record(at.saturating_sub(*sent));
                    if at < answered {
                        early += 1;
                    }
                    from_answer.record(at.saturating_sub(*answered));
                }
                None => unmatched += 1,
            }
        }
        per_subscriber.push(delivered);
    }
    if let Some(e) = first_error {
        bail!("a subscriber failed: {e}");
    }
    drop(routing);
    drop(ipam_client);
    drop(conns);
    drop(server);
    drop(db);

    // The comparator: the same subscribers, connections and change rate against a server
    // that only broadcasts, for the bound gRPC fan-out sets on this machine.
    let exe = std::env::current_exe().context("locate the herald-bench executable")?;
    let floor = crate::fanout_floor::run(
        &exe,
        &common.log_dir,
        common.poll,
        subscribers,
        channels,
        rate,
        duration,
    )
    .await?;

    // Where a change's delivery time goes: until its first subscriber has it (the
    // coalescing window and the recompute of every node) and from the first to the last
    // subscriber (publishing to 1,000 watchers, encoding and writing 1,000 messages).
    let mut first_latency = Latencies::new();
    let mut fan_spread = Latencies::new();
    for (times, (_, answered)) in spread.iter().zip(&change_times) {
        if let Some((lo, hi)) = times {
            first_latency.record(lo.saturating_sub(*answered));
            fan_spread.record(hi.saturating_sub(*lo));
        }
    }
    let first_latency = first_latency.summary();
    let fan_spread = fan_spread.summary();
    let changes = change_times.len() as u64;
    let mean = per_subscriber.iter().sum::<u64>() as f64 / per_subscriber.len().max(1) as f64;
    let min = per_subscriber.iter().copied().min().unwrap_or(0);
    let kib_per_subscriber = rss_streams.saturating_sub(rss_before) as f64 / subscribers as f64;
    let report = FanoutReport {
        subscribers,
        channels,
        changes,
        change_rate: changes as f64 / elapsed.as_secs_f64(),
        from_answer: from_answer.summary(),
        from_send: from_send.summary(),
        early,
        snapshots_per_subscriber_mean: mean,
        snapshots_per_subscriber_min: min,
        unmatched,
        rss_before_kib: rss_before,
        rss_streams_kib: rss_streams,
        rss_after_kib: rss_after,
        kib_per_subscriber,
        subscribe_ms,
        change_call: change_call.summary(),
        cpu: cpu::between(&before, &after),
        p99_over_floor: if floor.from_answer.p99_ms > 0.0 {
            from_answer.summary().p99_ms / floor.from_answer.p99_ms
        } else {
            0.0
        },
        floor,
        targets: Vec::new(),
    };
    let targets = vec![
        Target::new(
            "fanout delivery p99",
            format!("{:.1} ms", report.from_answer.p99_ms),
            format!("<= {FANOUT_P99_TARGET_MS} ms"),
            report.from_answer.count > 0 && report.from_answer.p99_ms <= FANOUT_P99_TARGET_MS,
        ),
        Target::new(
            "fanout RSS per subscriber",
            format!("{kib_per_subscriber:.1} KiB"),
            format!("<= {FANOUT_KIB_PER_SUBSCRIBER_TARGET} KB"),
            kib_per_subscriber <= FANOUT_KIB_PER_SUBSCRIBER_TARGET,
        ),
    ];
    println!(
        "  {:<26} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "delivery latency", "samples", "p50 ms", "p99 ms", "p99.9", "max ms"
    );
    for (label, s) in [
        ("from change answered", &report.from_answer),
        ("from change sent", &report.from_send),
        ("change RPC itself", &report.change_call),
        ("first subscriber, per chg", &first_latency),
        ("first->last spread, per chg", &fan_spread),
        ("gRPC floor, from answered", &report.floor.from_answer),
        ("gRPC floor, spread per chg", &report.floor.spread),
    ] {
        println!(
            "  {label:<26} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            s.count, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
    println!(
        "  changes {changes} at {:.1}/s; snapshots per subscriber mean {mean:.1}, min {min} \
         (<= changes when coalesced); {early} arrived before the RPC answer; {unmatched} unmatched",
        report.change_rate
    );
    println!(
        "  herald-ipam RSS: {:.1} MiB before streams, {:.1} MiB with {subscribers} open \
         ({kib_per_subscriber:.1} KiB each), {:.1} MiB after the changes; all first snapshots in {subscribe_ms:.0} ms",
        rss_before as f64 / 1024.0,
        rss_streams as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "  gRPC floor (a server that only broadcasts a 2-byte message, same subscribers, connections and rate): {} changes, {} messages missed; herald-ipam p99 / floor p99 {:.2}x",
        report.floor.changes, report.floor.missed, report.p99_over_floor
    );
    println!("  cpu during changes: {}", report.cpu.brief());
    report::print_targets(&targets);
    Ok(FanoutReport { targets, ..report })
}

async fn p_allocate(client: &mut IpamClient<Channel>, j: u64, ip: &str) -> anyhow::Result<()> {
    let response = client
        .allocate(ipam_pb::AllocateRequest {
            owner: Some(owner("fan", j)),
            requested_ips: vec![ip.to_string()],
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("Allocate {j} ({ip}): {}", ipam::status_text(&s)))?;
    let got = ipam::only_ip(response.into_inner().allocation).map_err(|e| anyhow!(e))?;
    if got != ip {
        bail!("Allocate {j}: asked for {ip}, got {got}");
    }
    Ok(())
}

/// A stop signal every subscriber watches.
fn tokio_util_cancel() -> tokio::sync::watch::Sender<bool> {
    tokio::sync::watch::channel(false).0
}

// ---- e2e (b): from a Kubernetes Service ------------------------------------------------

/// The Service class herald-cluster-watcher handles.
const SERVICE_CLASS: &str = "herald.io/bgp";
pub(crate) const KUBE_NAMESPACE: &str = "default";
/// Bound on the watcher registering the Nodes.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

fn kube_node(name: &str, address: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

pub(crate) fn kube_service(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": KUBE_NAMESPACE, "name": name, "labels": {"app": name}},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": SERVICE_CLASS,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
        },
    })
}

pub(crate) fn start_watcher(
    binary: &Path,
    fake: &FakeKube,
    ipam: &IpamServer,
    common: &Common,
    extra: &[String],
) -> anyhow::Result<ChildProcess> {
    let log_dir = common.log_dir.as_path();
    let home = log_dir.join("watcher-home");
    std::fs::create_dir_all(&home)?;
    let kubeconfig = home.join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, KUBE_NAMESPACE)
        .context("write the kubeconfig")?;
    let log = log_dir.join("herald-cluster-watcher.log");
    // Appended to: a benchmark may start the watcher more than once.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("open log file {}", log.display()))?;
    let mut command = Command::new(binary);
    command
        .args([
            "--ipam-endpoint",
            &ipam.url(),
            "--cluster-id",
            "bench",
            "--identity",
            "bench",
        ])
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", &home)
        .env("RUST_LOG", "warn")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .current_dir(log_dir)
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file));
    ipam::otlp_env(&mut command, common.otlp_endpoint.as_deref());
    if let Some(pki) = &common.mtls {
        pki.watcher_args(&mut command);
    }
    Ok(ChildProcess::spawn("herald-cluster-watcher", command))
}

async fn wait_nodes_registered(routing: &mut RoutingClient<Channel>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let nodes = routing
            .list_nodes(pb::ListNodesRequest {})
            .await
            .context("ListNodes")?
            .into_inner()
            .nodes;
        if nodes.len() == E2E_NODES.len() && nodes.iter().all(|n| n.ready) {
            return Ok(());
        }
        if start.elapsed() >= REGISTER_TIMEOUT {
            bail!("the watcher registered {nodes:?} within {REGISTER_TIMEOUT:?}, not both Nodes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address the watcher wrote into the Service's status, if any yet.
fn ingress_ip(fake: &FakeKube, name: &str) -> Option<String> {
    let svc = fake.get(SERVICES, KUBE_NAMESPACE, name)?;
    svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .map(str::to_string)
}

/// From the create at the API server until the ToR holds the Service's /32 from both
/// nodes: the address is read from the Service's status as soon as the watcher writes it
/// (an in-memory read of the fake API server), then the ToR is polled.
async fn service_to_tor(
    fake: &FakeKube,
    tor: &Tor,
    name: &str,
    started: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let ip = loop {
        if let Some(ip) = ingress_ip(fake, name) {
            break ip;
        }
        if started.elapsed() >= ROUTE_TIMEOUT {
            bail!("Service {name} got no address within {ROUTE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let status = started.elapsed();
    let total = wait_both_paths(tor, host_prefix(&ip)?, started).await?;
    Ok((total, status))
}

pub async fn e2e_kube(common: &Common, count: u64, burst: u64) -> anyhow::Result<E2eReport> {
    common.print_header(&format!(
        "e2e (b): Service at the API server (herald-fake-kube) -> herald-cluster-watcher -> herald-ipam -> 2 route speakers -> GoBGP ToR; {count} one by one, then {burst} at once"
    ));
    let fake = FakeKube::start()
        .await
        .context("start the fake API server")?;
    fake.create(
        NAMESPACES,
        json!({"metadata": {"name": KUBE_NAMESPACE, "labels": {"kubernetes.io/metadata.name": KUBE_NAMESPACE}}}),
    )
    .map_err(|e| anyhow!("create namespace: {e:?}"))?;
    let p = start_pipeline(common, Some(&fake)).await?;
    let pid = Some(p.server.process.pid());

    let create = |name: &str| {
        fake.create(SERVICES, kube_service(name))
            .map(drop)
            .map_err(|e| anyhow!("create Service {name}: {e:?}"))
    };
    let started = Instant::now();
    create("warm")?;
    service_to_tor(&fake, &p.tor, "warm", started)
        .await
        .context("warm-up Service")?;

    let mut total = Latencies::new();
    let mut status = Latencies::new();
    let mut from_status = Latencies::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let phase_start = Instant::now();
    let before = cpu::sample(pid);
    for seq in 0..count {
        if phase_start.elapsed() >= ONE_BY_ONE_LIMIT {
            println!("  one-by-one phase stopped by time after {seq} Services");
            break;
        }
        let name = format!("one-{seq}");
        let started = Instant::now();
        let outcome = match create(&name) {
            Ok(()) => service_to_tor(&fake, &p.tor, &name, started).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok((latency, to_status)) => {
                total.record(latency);
                status.record(to_status);
                from_status.record(latency.saturating_sub(to_status));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("Service {seq}: {e:#}"));
            }
        }
    }
    let after = cpu::sample(pid);
    let one_by_one_cpu = cpu::between(&before, &after);

    let baseline = received_per_node(&p.tor)
        .await?
        .into_iter()
        .min()
        .unwrap_or(0);
    let before = cpu::sample(pid);
    let started = Instant::now();
    let mut created = 0u64;
    for seq in 0..burst {
        match create(&format!("burst-{seq}")) {
            Ok(()) => created += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let burst_call = started.elapsed();
    // Where the burst's time goes: until the watcher wrote every address into the
    // Services' status (after each Allocate answered), and until the ToR holds them.
    let statuses = async {
        loop {
            // Counted in place: copying 2,000 Services every poll would take CPU from
            // the system being measured.
            let done = fake.count_matching(SERVICES, Some(KUBE_NAMESPACE), |svc| {
                svc["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("burst-"))
                    && svc["status"]["loadBalancer"]["ingress"][0]["ip"].is_string()
            }) as u64;
            if done >= created || started.elapsed() >= BURST_TIMEOUT {
                return (done, started.elapsed());
            }
            tokio::time::sleep(BURST_POLL).await;
        }
    };
    let ((with_status, status_at), burst_done) = tokio::join!(
        statuses,
        wait_all_nodes(&p.tor, baseline + created, started, BURST_TIMEOUT)
    );
    let burst_done = burst_done?;
    println!(
        "  burst: {with_status} of {created} Services had their address in status after {:.1} ms",
        status_at.as_secs_f64() * 1000.0
    );
    let after = cpu::sample(pid);
    let phases = E2ePhases {
        one_by_one: total.summary(),
        call: status.summary(),
        from_answer: from_status.summary(),
        split: None,
        one_by_one_cpu,
        burst_size: burst,
        burst_call_ms: burst_call.as_secs_f64() * 1000.0,
        burst_ms: burst_done.as_secs_f64() * 1000.0,
        burst_samples_ms: vec![burst_done.as_secs_f64() * 1000.0],
        burst_cpu: cpu::between(&before, &after),
        errors,
        first_error,
    };
    drop(p);
    drop(fake);

    print_e2e_phases("Service", &phases);
    println!(
        "  ('of which the call' = until the Service's status carried its address, written by the watcher)"
    );
    let targets = e2e_targets("e2e kube", &phases);
    report::print_targets(&targets);
    Ok(E2eReport {
        allocate: phases,
        reference: E2E_REFERENCE,
        targets,
    })
}

/// Pool of `speaker-memory`: room for a million /32s.
const MEMORY_POOL: &str = "10.64.0.0/12";
/// A node started after the routes exist, and BIRD as the comparator speaker.
const LATE_NODE: (&str, &str) = ("n2", "127.0.0.12");
const BIRD_SPEAKER: &str = "127.0.0.13";
/// Bound on the ToR receiving every route from one speaker.
const MEMORY_ROUTE_TIMEOUT: Duration = Duration::from_secs(600);
/// From the ToR holding a speaker's routes to reading its RSS (each speaker the same).
const SETTLE: Duration = Duration::from_secs(2);

/// One speaker's memory holding the routes.
#[derive(Debug, Clone, Serialize)]
pub struct SpeakerMemoryRow {
    pub speaker: String,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Seconds from the routes' allocation (or the speaker's start) to the ToR holding all.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpeakerMemoryReport {
    pub routes: u64,
    pub rows: Vec<SpeakerMemoryRow>,
    /// Herald's speaker started before the routes over BIRD's RSS.
    pub ratio_during: f64,
    /// Herald's speaker started after them over BIRD's RSS.
    pub ratio_after: f64,
}

/// Prefixes the ToR holds from `address`.
async fn received_from(tor: &Tor, address: &str) -> anyhow::Result<u64> {
    Ok(tor
        .neighbors()
        .await?
        .iter()
        .find(|n| n.address.to_string() == address)
        .map_or(0, |n| n.prefixes_received))
}

async fn wait_received(tor: &Tor, address: &str, count: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let got = received_from(tor, address).await?;
        if got >= count {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() >= MEMORY_ROUTE_TIMEOUT {
            bail!("the ToR holds {got} of {count} routes from {address}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `speaker-memory`: herald-route-speaker's RSS holding `routes` /32s at a BIRD ToR, for a
/// speaker that followed their allocation (a snapshot, then deltas) and one started after
/// them (one snapshot), against BIRD as the speaker announcing the same /32s (static
/// routes, exported over BGP; no kernel routes) in the same run.
///
/// The ToR is BIRD, not GoBGP: a GoBGP 3.10 ToR already holding three paths per prefix
/// took BIRD's 100k at 100–150 prefixes/s on this 2-core machine, and its API did not
/// answer while it did, so the run never reached its table. The ToR only receives; each
/// speaker's memory is read from its own process.
pub async fn speaker_memory(common: &Common, routes: u64) -> anyhow::Result<SpeakerMemoryReport> {
    common.print_header(&format!(
        "speaker-memory: {routes} /32s from herald-ipam through herald-route-speaker to a BIRD ToR, against BIRD announcing them"
    ));
    let mut p = start_pipeline_on(common, None, &[], TorKind::Bird).await?;
    let during_pid = p._speakers[0].pid();
    ipam::create_pool(&mut p.ipam, "mem", MEMORY_POOL, false).await?;
    let started = Instant::now();
    let mut prefixes = Vec::with_capacity(usize::try_from(routes).unwrap_or(0));
    for start in (0..routes).step_by(1000) {
        let requests = (start..(start + 1000).min(routes))
            .map(|seq| ipam::allocate_request("mem", seq, Some("mem")))
            .collect();
        let response = p
            .ipam
            .allocate_batch(ipam_pb::AllocateBatchRequest { requests })
            .await
            .context("AllocateBatch")?
            .into_inner();
        for r in response.results {
            match r.result {
                Some(ipam_pb::allocate_result::Result::Allocation(a)) => {
                    prefixes.push(ipam::only_ip(Some(a)).map_err(|e| anyhow!(e))?);
                }
                other => bail!("AllocateBatch: {other:?}"),
            }
        }
    }
    let mut rows = Vec::new();
    wait_received(&p.tor, E2E_NODES[0].1, routes).await?;
    let seconds = started.elapsed().as_secs_f64();
    // Settled, as the other two below: the report that follows the load, then a quiet
    // moment.
    tokio::time::sleep(SETTLE).await;
    let rss = speakers::rss(during_pid);
    rows.push(SpeakerMemoryRow {
        speaker: "herald (during)".into(),
        rss_kib: rss.rss_kib,
        hwm_kib: rss.hwm_kib,
        seconds,
    });

    let mut routing = routing_client(&p.server).await?;
    routing
        .upsert_node(node(LATE_NODE.0, LATE_NODE.1, &[("bgp-peer", "true")]))
        .await
        .context("UpsertNode")?;
    let speaker_bin = find_binary("herald-route-speaker")?;
    let late = start_speaker(&speaker_bin, LATE_NODE.0, &p.server, common)?;
    let seconds = wait_received(&p.tor, LATE_NODE.1, routes).await?;
    tokio::time::sleep(SETTLE).await;
    let rss = speakers::rss(late.pid());
    rows.push(SpeakerMemoryRow {
        speaker: "herald (after)".into(),
        rss_kib: rss.rss_kib,
        hwm_kib: rss.hwm_kib,
        seconds,
    });
    drop(late);

    let prefixes: Vec<ipnet::Ipv4Net> = prefixes
        .iter()
        .map(|p| format!("{p}/32").parse())
        .collect::<Result<_, _>>()
        .context("an allocated address as a /32")?;
    let bird_source: std::net::Ipv4Addr = BIRD_SPEAKER.parse()?;
    let tor_addr =
        std::net::SocketAddr::new(IpAddr::V4(p.tor.config().listen_addr), p.tor.bgp_port());
    // The BIRD ToR keeps a 127/8 next hop (as it does the Herald speakers'): next hop self.
    let bird = speakers::BirdSpeaker::start(
        &common.log_dir.join("bird-speaker"),
        bird_source,
        &prefixes,
        tor_addr,
        None,
        true,
    )?;
    let seconds = wait_received(&p.tor, BIRD_SPEAKER, routes).await?;
    tokio::time::sleep(SETTLE).await;
    let rss = speakers::rss(bird.pid());
    rows.push(SpeakerMemoryRow {
        speaker: "BIRD".into(),
        rss_kib: rss.rss_kib,
        hwm_kib: rss.hwm_kib,
        seconds,
    });
    drop(bird);
    let mib = |k: u64| k as f64 / 1024.0;
    for row in &rows {
        println!(
            "  {:<16} RSS {:>7.1} MiB (peak {:>7.1} MiB)  all {routes} routes at the ToR in {:.1} s",
            row.speaker,
            mib(row.rss_kib),
            mib(row.hwm_kib),
            row.seconds
        );
    }
    let bird_kib = rows[2].rss_kib.max(1) as f64;
    let report = SpeakerMemoryReport {
        routes,
        ratio_during: rows[0].rss_kib as f64 / bird_kib,
        ratio_after: rows[1].rss_kib as f64 / bird_kib,
        rows,
    };
    println!(
        "  herald / BIRD RSS: {:.2}x (started before the routes), {:.2}x (started after); target <= 1.5x",
        report.ratio_during, report.ratio_after
    );
    Ok(report)
}
