//! `herald-bench scale`: herald-ipam's route engine at cluster scale. N nodes all peering,
//! M Services (half `Local` with endpoints on 3 nodes each), WatchNodeRoutes streams open
//! on some nodes, then a churn of single changes (a `Local` Service's endpoints move, a
//! `Cluster` Service is allocated or released, a node turns not Ready or Ready again), one
//! at a time. Per engine: herald-ipam's CPU per change (from /proc), the delivery of each
//! change to the streams whose node it changes, and herald-ipam's RSS after set-up and
//! after the churn. The incremental engine runs its churn twice on one set-up: with
//! streams that ask for deltas (a snapshot, then only what changed), then with streams of
//! full snapshots (as older speakers get). `route_engine = "full"` (with full snapshots,
//! as Herald was before both) runs after them on the same Postgres, and the ratios are
//! printed.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use herald_api::ipam::v1 as ipam_pb;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use prost::Message;
use serde::Serialize;
use sqlx::Connection;
use tokio::sync::mpsc;

use crate::benches::Common;
use crate::cpu;
use crate::ipam::{self, IpamServer};
use crate::pg::BenchDb;
use crate::speakers;
use crate::stats::{Latencies, Summary};

const POOL: &str = "10.64.0.0/14";
/// Endpoint nodes of each `Local` Service.
const ENDPOINTS_PER_LOCAL: usize = 3;
/// Bound on a whole set-up step (allocations, endpoints, first snapshots, settling).
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the streams must stay quiet before the churn starts.
const SETTLE_QUIET: Duration = Duration::from_millis(1500);
/// herald-ipam's CPU (cores) over a quiet window below which it has caught up: its idle
/// work (the feed's poll of the change log, HTTP/2 keepalives) stays far under it.
const SETTLE_CPU: f64 = 0.05;
/// Bound on one change reaching every stream it changes (the full engine at 1,000 ×
/// 10,000 takes seconds per change).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Setup RPCs in flight at once.
const SETUP_CONCURRENCY: usize = 16;
/// AllocateBatch's limit.
const BATCH: usize = 1000;

/// The sizes and the change mix of one run.
#[derive(Debug, Clone)]
pub struct ScaleArgs {
    pub nodes: usize,
    pub services: usize,
    pub subscribers: usize,
    /// Changes the incremental engine gets.
    pub changes: usize,
    /// Changes the full engine gets (it takes seconds per change at the large sizes).
    pub full_changes: usize,
    /// Relative weights of the change kinds.
    pub endpoint_moves: u32,
    pub cluster_changes: u32,
    pub node_changes: u32,
    /// herald-ipam's `events_retention`.
    pub events_retention: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineRow {
    pub engine: String,
    /// `deltas` or `snapshots`: what the streams asked for.
    pub streams: String,
    pub changes: usize,
    pub ipam_cpu_ms_per_change: f64,
    /// From the change RPC being sent to each stream it changes receiving a message.
    pub delivery: Summary,
    /// Changes some stream did not see within the timeout.
    pub undelivered: u64,
    pub rss_setup_kib: u64,
    pub rss_after_kib: u64,
    /// The most herald-ipam held, read after each change of the churn: what it settles
    /// at, whenever the allocator gives freed pages back.
    pub rss_churn_max_kib: u64,
    /// Its peak over its life (`VmHWM`), set-up included.
    pub rss_peak_kib: u64,
    pub setup_s: f64,
    /// Bytes of route messages the streams received per change (protobuf encoding).
    pub wire_bytes_per_change: f64,
    /// Full snapshots after the first on a delta stream (it fell behind).
    pub resyncs: u64,
    /// Deltas that did not follow the revision before them (must be 0).
    pub gaps: u64,
    /// Rows in the change log (`events`) before the churn, and one retention (plus a
    /// compaction period) after it: what compaction leaves is the allocation history,
    /// which is kept, and the newest row of each routing input.
    pub events_before: i64,
    pub events_after: i64,
    /// Allocations and releases among the changes: each adds a history row that stays.
    pub history_changes: usize,
    /// The same figures per kind of change: which kind a shortfall comes from.
    pub by_kind: Vec<KindRow>,
}

/// One kind of change within a churn. Its CPU is what herald-ipam used from sending each
/// change until the last stream it changes had it, so work left over after that (nodes
/// without a stream) counts towards the next change, whatever its kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindRow {
    pub kind: String,
    pub changes: usize,
    pub ipam_cpu_ms_per_change: f64,
    pub delivery: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub nodes: usize,
    pub services: usize,
    pub subscribers: usize,
    pub incremental: EngineRow,
    /// The incremental engine with full snapshots on the streams.
    pub snapshots: EngineRow,
    pub full: EngineRow,
    pub cpu_ratio: f64,
    pub delivery_p99_ratio: f64,
    /// Snapshot streams over delta streams, both with the incremental engine.
    pub snapshots_cpu_ratio: f64,
    pub snapshots_delivery_p99_ratio: f64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    EndpointMove,
    Cluster,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::EndpointMove, Kind::Cluster, Kind::Node];

    fn label(self) -> &'static str {
        match self {
            Kind::EndpointMove => "endpoints",
            Kind::Cluster => "cluster",
            Kind::Node => "node",
        }
    }
}

/// What one churn gathered about one kind of change.
#[derive(Default)]
struct KindTally {
    changes: usize,
    cpu_seconds: f64,
    delivery: Latencies,
}

/// The kind of the `i`-th change: the weights spread evenly over the sequence.
fn kind_of(i: usize, args: &ScaleArgs) -> Kind {
    let total = (args.endpoint_moves + args.cluster_changes + args.node_changes).max(1);
    // A stride coprime with most totals walks the weights without long runs of one kind.
    let slot = ((i as u64 * 37) % u64::from(total)) as u32;
    if slot < args.endpoint_moves {
        Kind::EndpointMove
    } else if slot < args.endpoint_moves + args.cluster_changes {
        Kind::Cluster
    } else {
        Kind::Node
    }
}

fn node_name(i: usize) -> String {
    format!("s{i:05}")
}

fn node_address(i: usize) -> String {
    format!("127.2.{}.{}", i / 250, i % 250 + 1)
}

fn node(i: usize, ready: bool) -> pb::Node {
    pb::Node {
        name: node_name(i),
        addresses: vec![node_address(i)],
        ready,
        ..Default::default()
    }
}

fn policy() -> pb::BgpPolicy {
    pb::BgpPolicy {
        local_asn: herald_tor_harness::NODE_ASN,
        peers: vec![pb::Peer {
            name: "tor".into(),
            address: "127.0.0.1".into(),
            asn: herald_tor_harness::TOR_ASN,
            port: 1790,
            hold_time_seconds: 9,
            connect_retry_seconds: 1,
            ..Default::default()
        }],
        advertisements: vec![pb::Advertisement::default()],
        ..Default::default()
    }
}

/// Service `k` is `Local` when odd.
fn is_local(k: usize) -> bool {
    k % 2 == 1
}

/// The endpoint nodes of `Local` Service `k` after `moves` moves.
fn endpoints(k: usize, moves: usize, nodes: usize) -> BTreeSet<usize> {
    (0..ENDPOINTS_PER_LOCAL)
        .map(|j| (k * 7 + moves * 13 + j * (nodes / ENDPOINTS_PER_LOCAL).max(1)) % nodes)
        .collect()
}

fn endpoints_request(k: usize, nodes: &BTreeSet<usize>) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        owner_uid: ipam::uid("scale", k as u64),
        traffic_policy: ipam_pb::TrafficPolicy::Local as i32,
        endpoint_nodes: nodes.iter().map(|n| node_name(*n)).collect(),
        traceparent: String::new(),
    }
}

fn allocate_request(k: usize) -> ipam_pb::AllocateRequest {
    let mut request = ipam::allocate_request("scale", k as u64, None);
    request.traffic_policy = if is_local(k) {
        ipam_pb::TrafficPolicy::Local as i32
    } else {
        ipam_pb::TrafficPolicy::Cluster as i32
    };
    request
}

/// Runs both engines at one size and prints the table.
pub async fn scale(common: &Common, args: &ScaleArgs) -> anyhow::Result<ScaleReport> {
    if args.nodes == 0 || args.services == 0 {
        bail!("--nodes and --services must be at least 1");
    }
    let subscribers = args.subscribers.min(args.nodes);
    common.print_header(&format!(
        "scale: {} nodes, {} Services (half Local on {ENDPOINTS_PER_LOCAL} nodes each), {subscribers} WatchNodeRoutes streams; change mix endpoints:cluster:node = {}:{}:{}",
        args.nodes, args.services, args.endpoint_moves, args.cluster_changes, args.node_changes
    ));
    let mut rows = run_engine(common, args, "incremental", &[true, false], args.changes).await?;
    let snapshots = rows
        .pop()
        .ok_or_else(|| anyhow!("no snapshot-stream row"))?;
    let incremental = rows.pop().ok_or_else(|| anyhow!("no delta-stream row"))?;
    let full = run_engine(
        common,
        args,
        "full",
        &[false],
        args.full_changes.min(args.changes),
    )
    .await?
    .pop()
    .ok_or_else(|| anyhow!("no full-engine row"))?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let cpu_ratio = ratio(
        full.ipam_cpu_ms_per_change,
        incremental.ipam_cpu_ms_per_change,
    );
    let delivery_p99_ratio = ratio(full.delivery.p99_ms, incremental.delivery.p99_ms);
    let snapshots_cpu_ratio = ratio(
        snapshots.ipam_cpu_ms_per_change,
        incremental.ipam_cpu_ms_per_change,
    );
    let snapshots_delivery_p99_ratio =
        ratio(snapshots.delivery.p99_ms, incremental.delivery.p99_ms);
    println!(
        "  full engine / incremental with deltas: ipam CPU per change {cpu_ratio:.1}x, delivery p99 {delivery_p99_ratio:.1}x"
    );
    println!(
        "  snapshot streams / delta streams (incremental engine): ipam CPU per change {snapshots_cpu_ratio:.1}x, delivery p99 {snapshots_delivery_p99_ratio:.1}x, bytes per change {:.1}x",
        ratio(
            snapshots.wire_bytes_per_change,
            incremental.wire_bytes_per_change
        )
    );
    Ok(ScaleReport {
        nodes: args.nodes,
        services: args.services,
        subscribers,
        incremental,
        snapshots,
        full,
        cpu_ratio,
        delivery_p99_ratio,
        snapshots_cpu_ratio,
        snapshots_delivery_p99_ratio,
    })
}

fn print_row(row: &EngineRow) {
    println!(
        "  {:<12} {:<9} changes {:>4}  ipam CPU {:>9.2} ms/change  delivery p50 {:>8.1} ms  p99 {:>8.1} ms  ({} samples, {} late)  {:>9.1} KiB/change on the streams ({} resyncs, {} gaps)  RSS {:.0} -> {:.0} MiB (churn max {:.0}, peak {:.0})  (set-up {:.1} s)",
        row.engine,
        row.streams,
        row.changes,
        row.ipam_cpu_ms_per_change,
        row.delivery.p50_ms,
        row.delivery.p99_ms,
        row.delivery.count,
        row.undelivered,
        row.wire_bytes_per_change / 1024.0,
        row.resyncs,
        row.gaps,
        row.rss_setup_kib as f64 / 1024.0,
        row.rss_after_kib as f64 / 1024.0,
        row.rss_churn_max_kib as f64 / 1024.0,
        row.rss_peak_kib as f64 / 1024.0,
        row.setup_s,
    );
    println!(
        "  {:<12} {:<9} change log: {} rows before the churn, {} one retention after it ({:+} for {} changes, {} of them allocations or releases, whose history stays)",
        "",
        "",
        row.events_before,
        row.events_after,
        row.events_after - row.events_before,
        row.changes,
        row.history_changes,
    );
    for kind in &row.by_kind {
        println!(
            "  {:<12} {:<9} {:<9} {:>4} changes  ipam CPU {:>9.2} ms/change  delivery p50 {:>8.1} ms  p99 {:>8.1} ms  ({} samples)",
            "",
            "",
            kind.kind,
            kind.changes,
            kind.ipam_cpu_ms_per_change,
            kind.delivery.p50_ms,
            kind.delivery.p99_ms,
            kind.delivery.count,
        );
    }
}

/// One set-up with `engine`, then a churn of `changes` per entry of `phases` (streams
/// asking for deltas when true), one row each, printed as it ends.
async fn run_engine(
    common: &Common,
    args: &ScaleArgs,
    engine: &str,
    phases: &[bool],
    changes: usize,
) -> anyhow::Result<Vec<EngineRow>> {
    let setup_started = Instant::now();
    let db = BenchDb::create(&common.admin_url).await?;
    let mut command = Command::new(&common.ipam_bin);
    command
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_LISTEN")
        .env_remove("HERALD_ROUTE_ENGINE")
        .arg("--route-engine")
        .arg(engine)
        .arg("--events-retention")
        .arg(format!("{}ms", args.events_retention.as_millis()))
        .current_dir(&common.log_dir);
    let (server, _) = IpamServer::launch(
        &format!("herald-ipam-{engine}"),
        command,
        &db.url,
        &common.log_dir,
        common.poll,
        "herald.ipam.v1.Ipam",
    )
    .await?;
    let pid = server.process.pid();
    let channel = server
        .channels(1)
        .await?
        .pop()
        .ok_or_else(|| anyhow!("no channel"))?;
    let mut ipam_client = server.client().await?;
    let mut routing = RoutingClient::new(channel.clone());
    ipam::create_pool(&mut ipam_client, "scale", POOL, true).await?;
    routing
        .set_bgp_policy(policy())
        .await
        .context("SetBgpPolicy")?;
    let upserts = futures::stream::iter(0..args.nodes).map(|i| {
        let mut routing = routing.clone();
        async move { routing.upsert_node(node(i, true)).await }
    });
    let results: Vec<_> = upserts.buffer_unordered(SETUP_CONCURRENCY).collect().await;
    for r in results {
        r.context("UpsertNode")?;
    }
    eprintln!(
        "  [{engine}] nodes registered ({:.1} s)",
        setup_started.elapsed().as_secs_f64()
    );
    for start in (0..args.services).step_by(BATCH) {
        let requests = (start..(start + BATCH).min(args.services))
            .map(allocate_request)
            .collect();
        let response = ipam_client
            .allocate_batch(ipam_pb::AllocateBatchRequest { requests })
            .await
            .context("AllocateBatch")?
            .into_inner();
        if let Some(error) = response.results.iter().find_map(|r| match &r.result {
            Some(ipam_pb::allocate_result::Result::Error(e)) => Some(e.message.clone()),
            _ => None,
        }) {
            bail!("AllocateBatch: {error}");
        }
    }
    eprintln!(
        "  [{engine}] Services allocated ({:.1} s)",
        setup_started.elapsed().as_secs_f64()
    );
    let sets = futures::stream::iter((0..args.services).filter(|k| is_local(*k))).map(|k| {
        let mut routing = routing.clone();
        let request = endpoints_request(k, &endpoints(k, 0, args.nodes));
        async move { routing.set_service_endpoints(request).await }
    });
    let results: Vec<_> = sets.buffer_unordered(SETUP_CONCURRENCY).collect().await;
    for r in results {
        r.context("SetServiceEndpoints")?;
    }

    eprintln!(
        "  [{engine}] endpoints set ({:.1} s)",
        setup_started.elapsed().as_secs_f64()
    );
    let setup_s = setup_started.elapsed().as_secs_f64();
    let mut churn = Churn {
        moves: vec![0usize; args.services],
        cluster_held: None,
        next_cluster: args.services,
        not_ready: None,
        done: 0,
    };
    let mut rows = Vec::new();
    for &deltas in phases {
        let mut row = run_phase(
            args,
            engine,
            deltas,
            changes,
            &channel,
            &mut routing,
            &mut ipam_client,
            &mut churn,
            pid,
            setup_started,
            &db.url,
        )
        .await?;
        row.setup_s = setup_s;
        print_row(&row);
        rows.push(row);
    }
    drop(server);
    Ok(rows)
}

/// Where the churn stands, carried from one phase to the next on the same set-up.
struct Churn {
    moves: Vec<usize>,
    cluster_held: Option<usize>,
    next_cluster: usize,
    not_ready: Option<usize>,
    /// Changes made so far (the index of the next one).
    done: usize,
}

/// What one stream saw: (stream, received at, encoded bytes).
type Seen = (usize, Instant, usize);

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    args: &ScaleArgs,
    engine: &str,
    deltas: bool,
    changes: usize,
    channel: &tonic::transport::Channel,
    routing: &mut RoutingClient<tonic::transport::Channel>,
    ipam_client: &mut ipam_pb::ipam_client::IpamClient<tonic::transport::Channel>,
    churn: &mut Churn,
    pid: u32,
    started: Instant,
    database_url: &str,
) -> anyhow::Result<EngineRow> {
    let streams = if deltas { "deltas" } else { "snapshots" };
    let tag = format!("{engine}/{streams}");
    // Streams: every message is reported as (stream, received at, bytes). A delta stream
    // checks that each delta follows the revision before it, as a speaker does.
    let subscribers = args.subscribers.min(args.nodes);
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..subscribers {
        let mut client = RoutingClient::new(channel.clone());
        let tx = tx.clone();
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .watch_node_routes(pb::WatchNodeRoutesRequest {
                    node: node_name(i),
                    deltas,
                })
                .await
                .map_err(|e| format!("{}: {}", node_name(i), ipam::status_text(&e)))?
                .into_inner();
            let (mut revision, mut resyncs, mut gaps) = (None::<u64>, 0u64, 0u64);
            loop {
                tokio::select! {
                    _ = stopped.changed() => return Ok((resyncs, gaps)),
                    message = stream.message() => match message {
                        Ok(Some(m)) => {
                            let _ = tx.send((i, Instant::now(), m.encoded_len()));
                            if m.from_revision == 0 {
                                resyncs += u64::from(revision.is_some());
                            } else if revision != Some(m.from_revision) && revision != Some(m.revision) {
                                gaps += 1;
                            }
                            revision = Some(m.revision);
                        }
                        Ok(None) => return Ok((resyncs, gaps)),
                        Err(e) => return Err(format!("{}: {}", node_name(i), ipam::status_text(&e))),
                    },
                }
            }
        }));
    }
    drop(tx);
    let deadline = started.max(Instant::now()) + SETUP_TIMEOUT;
    let mut first: BTreeSet<usize> = BTreeSet::new();
    while first.len() < subscribers {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((i, _, _))) => {
                first.insert(i);
            }
            _ => bail!(
                "{tag}: only {} of {subscribers} streams got a snapshot",
                first.len()
            ),
        }
    }
    eprintln!(
        "  [{tag}] first snapshots in ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    // Settled when the streams stay quiet and herald-ipam's CPU does too: the streams
    // see only the nodes they follow, and the engine can still be applying the set-up's
    // changes to the other nodes (a churn measured then would pay for them).
    let mut cpu_mark = cpu::process_seconds(pid).unwrap_or(0.0);
    // When the streams were first quiet, and the CPU herald-ipam spent after it.
    let mut streams_quiet: Option<(Instant, f64)> = None;
    loop {
        match tokio::time::timeout(SETTLE_QUIET, rx.recv()).await {
            Err(_) => {
                let now = cpu::process_seconds(pid).unwrap_or(0.0);
                let busy = (now - cpu_mark) / SETTLE_QUIET.as_secs_f64();
                let (quiet_at, cpu_at_quiet) =
                    *streams_quiet.get_or_insert((Instant::now() - SETTLE_QUIET, cpu_mark));
                cpu_mark = now;
                if busy <= SETTLE_CPU {
                    eprintln!(
                        "  [{tag}] streams quiet at {:.1} s; herald-ipam busy {:.1} s more ({:.1} s CPU)",
                        (quiet_at - started).as_secs_f64(),
                        quiet_at
                            .elapsed()
                            .saturating_sub(SETTLE_QUIET)
                            .as_secs_f64(),
                        now - cpu_at_quiet,
                    );
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{tag}: herald-ipam stayed busy ({busy:.2} CPU) after set-up");
                }
            }
            Ok(None) => bail!("{tag}: every stream ended during set-up"),
            Ok(Some(_)) if Instant::now() > deadline => {
                bail!("{tag}: the streams never settled after set-up")
            }
            Ok(Some(_)) => {
                streams_quiet = None;
                cpu_mark = cpu::process_seconds(pid).unwrap_or(0.0);
            }
        }
    }
    eprintln!(
        "  [{tag}] settled ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let rss_setup_kib = steady_rss(pid).await;
    let mut log = sqlx::PgConnection::connect(database_url)
        .await
        .context("connect to the benchmark database")?;
    let events_before = events_rows(&mut log).await?;
    let mut history_changes = 0usize;

    let mut delivery = Latencies::new();
    let mut undelivered = 0u64;
    let mut wire_bytes = 0usize;
    let mut tallies: [KindTally; 3] = Default::default();
    let mut rss_churn_max_kib = 0;
    let cpu_before = cpu::process_seconds(pid).unwrap_or(0.0);
    for _ in 0..changes {
        let i = churn.done;
        churn.done += 1;
        let kind = kind_of(i, args);
        let change_cpu_before = cpu::process_seconds(pid).unwrap_or(0.0);
        let sent = Instant::now();
        // Which streams this change must reach.
        let expected: BTreeSet<usize> = match kind {
            Kind::EndpointMove => {
                let k = (i * 7919 % args.services) | 1;
                let k = if k < args.services { k } else { 1 };
                let before = endpoints(k, churn.moves[k], args.nodes);
                churn.moves[k] += 1;
                let after = endpoints(k, churn.moves[k], args.nodes);
                routing
                    .set_service_endpoints(endpoints_request(k, &after))
                    .await
                    .context("SetServiceEndpoints")?;
                before
                    .symmetric_difference(&after)
                    .copied()
                    .filter(|n| *n < subscribers && Some(*n) != churn.not_ready)
                    .collect()
            }
            Kind::Cluster => {
                history_changes += 1;
                match churn.cluster_held.take() {
                    Some(k) => {
                        ipam_client
                            .release(ipam_pb::ReleaseRequest {
                                owner_uid: ipam::uid("scale", k as u64),
                                reason: String::new(),
                            })
                            .await
                            .context("Release")?;
                    }
                    None => {
                        let k = churn.next_cluster;
                        churn.next_cluster += 1;
                        let mut request = allocate_request(k);
                        request.traffic_policy = ipam_pb::TrafficPolicy::Cluster as i32;
                        ipam_client.allocate(request).await.context("Allocate")?;
                        churn.cluster_held = Some(k);
                    }
                }
                (0..subscribers)
                    .filter(|n| Some(*n) != churn.not_ready)
                    .collect()
            }
            Kind::Node => {
                let n = match churn.not_ready.take() {
                    Some(n) => {
                        routing
                            .upsert_node(node(n, true))
                            .await
                            .context("UpsertNode")?;
                        n
                    }
                    None => {
                        let n = i % subscribers.max(1);
                        routing
                            .upsert_node(node(n, false))
                            .await
                            .context("UpsertNode")?;
                        churn.not_ready = Some(n);
                        n
                    }
                };
                [n].into()
            }
        };
        let mut waiting = expected;
        let deadline = sent + CHANGE_TIMEOUT;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((n, at, bytes))) => {
                    wire_bytes += bytes;
                    if waiting.remove(&n) {
                        let latency = at.saturating_duration_since(sent);
                        delivery.record(latency);
                        tallies[kind as usize].delivery.record(latency);
                    }
                }
                _ => {
                    eprintln!(
                        "  [{tag}] change {i} ({kind:?}) not seen by streams {waiting:?} within {CHANGE_TIMEOUT:?}"
                    );
                    undelivered += 1;
                    break;
                }
            }
        }
        rss_churn_max_kib = rss_churn_max_kib.max(speakers::rss(pid).rss_kib);
        let tally = &mut tallies[kind as usize];
        tally.changes += 1;
        tally.cpu_seconds += cpu::process_seconds(pid).unwrap_or(0.0) - change_cpu_before;
    }
    let cpu_after = cpu::process_seconds(pid).unwrap_or(0.0);
    let rss_after = speakers::rss(pid);
    let _ = stop.send(true);
    let (mut resyncs, mut gaps) = (0, 0);
    for task in tasks {
        match task.await {
            Ok(Ok((r, g))) => {
                resyncs += r;
                gaps += g;
            }
            Ok(Err(e)) => bail!("{tag}: stream failed: {e}"),
            Err(e) => bail!("{tag}: stream task: {e}"),
        }
    }
    // Messages still arriving after the last change counted.
    while let Ok((_, _, bytes)) = rx.try_recv() {
        wire_bytes += bytes;
    }
    // Every row the churn superseded is past the retention one retention later, and gone
    // at the compaction run after that (a quarter of the retention, at most 30 s apart).
    let compaction_period = (args.events_retention / 4).min(Duration::from_secs(30));
    tokio::time::sleep(args.events_retention + compaction_period + Duration::from_secs(1)).await;
    let events_after = events_rows(&mut log).await?;
    Ok(EngineRow {
        engine: engine.to_string(),
        streams: streams.to_string(),
        changes,
        ipam_cpu_ms_per_change: (cpu_after - cpu_before) * 1000.0 / changes.max(1) as f64,
        delivery: delivery.summary(),
        undelivered,
        rss_setup_kib,
        rss_after_kib: rss_after.rss_kib,
        rss_churn_max_kib,
        rss_peak_kib: rss_after.hwm_kib,
        setup_s: 0.0,
        wire_bytes_per_change: wire_bytes as f64 / changes.max(1) as f64,
        resyncs,
        gaps,
        events_before,
        events_after,
        history_changes,
        by_kind: Kind::ALL
            .iter()
            .zip(&tallies)
            .map(|(kind, tally)| KindRow {
                kind: kind.label().to_string(),
                changes: tally.changes,
                ipam_cpu_ms_per_change: tally.cpu_seconds * 1000.0 / tally.changes.max(1) as f64,
                delivery: tally.delivery.summary(),
            })
            .collect(),
    })
}

/// herald-ipam's RSS once it stops moving: the engine gives freed pages back a moment
/// after it goes quiet, and a read during that would be neither figure.
async fn steady_rss(pid: u32) -> u64 {
    let mut last = speakers::rss(pid).rss_kib;
    // Bounded: ten seconds at most.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = speakers::rss(pid).rss_kib;
        if now.abs_diff(last) <= last / 100 {
            return now;
        }
        last = now;
    }
    last
}

async fn events_rows(log: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(log)
        .await
        .context("count the change log's rows")
}
