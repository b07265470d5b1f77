//! `herald-bench <name>`: the benchmarks of BENCHMARKS.md for the IPAM service. Each prints
//! the machine and a short table, runs its comparator in the same run, and with
//! `--json FILE` writes its figures as JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use herald_bench::benches::{self, Common, StoreKind};
use herald_bench::fanout_floor::{self, FanoutServerArgs};
use herald_bench::insert_server::{self, InsertServerArgs};
use herald_bench::rounds::Workload;
use herald_bench::speakers::EngineChildArgs;
use herald_bench::{bgp, ipam, machine::Machine, pg, pipeline, replicas};
use serde_json::{Map, Value};

/// Where the bench creates its databases unless told otherwise: the same server the test
/// suite uses.
const DEFAULT_DATABASE_URL: &str = herald_test_support::db::DEFAULT_ADMIN_URL;
/// Seconds per measured phase: long enough to average over fsync hiccups, short enough
/// that `all` finishes in a few minutes on a 2-core machine.
const DEFAULT_DURATION_S: f64 = 10.0;
/// Seconds of warm-up before each measured phase (connections, caches, JIT-free code paths
/// faulted in).
const DEFAULT_WARMUP_S: f64 = 1.0;
/// Request cap per measured phase, the count bound that goes with the time bound.
const DEFAULT_MAX_REQUESTS: u64 = 200_000;
/// Closed-loop clients per HTTP/2 connection: c = 8 uses one, c = 32 four.
const DEFAULT_CLIENTS_PER_CHANNEL: usize = 8;
/// How often a starting herald-ipam is asked whether it is SERVING.
const DEFAULT_POLL_MS: u64 = 5;
/// A /16: the pool size BENCHMARKS.md names for `alloc`.
const DEFAULT_ALLOC_POOL: &str = "10.0.0.0/16";
/// A /18 (16,382 addresses): each 1 % is ~160 samples and the fill takes seconds.
const DEFAULT_FULL_POOL: &str = "10.64.0.0/18";
const DEFAULT_FULL_CLIENTS: usize = 8;
const DEFAULT_BURST_SIZE: u64 = 100;
const DEFAULT_BURST_BATCHES: u64 = 50;
const DEFAULT_RESTART_ALLOCATIONS: u64 = 100_000;
/// Large enough for the restart benchmark's 100,000 allocations (a /14 holds 262,142).
const DEFAULT_RESTART_POOL: &str = "10.64.0.0/14";
/// Bound on any one wait for a ToR to converge (100k routes take GoBGP ~12 s).
const DEFAULT_BGP_TIMEOUT_S: u64 = 180;
const DEFAULT_WITHDRAW_REPEATS: u32 = 50;
const DEFAULT_WITHDRAW_BULK: u32 = 10_000;
/// The client count at which two replicas were seen to starve each other.
const DEFAULT_REPLICAS_CLIENTS: usize = 64;

#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    #[command(flatten)]
    global: Global,
}

#[derive(Debug, Args)]
struct Global {
    /// Also write the figures as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Postgres server to create the benchmark databases on (they are dropped after).
    #[arg(long, global = true, env = "HERALD_TEST_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    /// The herald-ipam binary; by default the one next to this executable.
    #[arg(long, global = true, env = "HERALD_BENCH_IPAM_BIN")]
    ipam_bin: Option<PathBuf>,
    /// Seconds per measured phase.
    #[arg(long, global = true, default_value_t = DEFAULT_DURATION_S)]
    duration: f64,
    /// Seconds of warm-up before each measured phase.
    #[arg(long, global = true, default_value_t = DEFAULT_WARMUP_S)]
    warmup: f64,
    /// Most requests per measured phase.
    #[arg(long, global = true, default_value_t = DEFAULT_MAX_REQUESTS)]
    max_requests: u64,
    /// Closed-loop clients sharing one HTTP/2 connection to herald-ipam.
    #[arg(long, global = true, default_value_t = DEFAULT_CLIENTS_PER_CHANNEL)]
    clients_per_channel: usize,
    /// Milliseconds between health polls while herald-ipam starts.
    #[arg(long, global = true, default_value_t = DEFAULT_POLL_MS)]
    poll_ms: u64,
    /// Under each alloc row, print what the Postgres backends waited on (sampled from
    /// pg_stat_activity every 10 ms) and the database's counters per operation.
    #[arg(long, global = true)]
    pg_detail: bool,
    /// Have every started herald binary export spans to this OTLP/gRPC collector
    /// (default: no export).
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Raw single-row INSERT tps into a table with a unique key.
    PgCeiling(CeilingArgs),
    /// Allocate RPCs vs the raw-INSERT ceiling at the same client count.
    Alloc(AllocArgs),
    /// Allocate latency as a pool fills from empty to 99 %.
    AllocFull(FullArgs),
    /// AllocateBatch allocations/s vs single-row INSERT tps at c = 1.
    AllocBurst(BurstArgs),
    /// herald-ipam on Postgres and on SQLite: memory with N allocations, time to SERVING
    /// after kill -9 with them persisted, and reassignments.
    Restart(RestartArgs),
    /// Allocate through two herald-ipam replicas on one Postgres vs one replica.
    Replicas(ReplicasArgs),
    /// Every IPAM benchmark above, in sequence, with their defaults.
    All,
    /// N /32s announced to a GoBGP ToR: Herald's engine vs GoBGP as the speaker.
    Advertise(AdvertiseArgs),
    /// Withdraw 1 / many prefixes and lose the session: engine vs GoBGP speaker.
    Withdraw(WithdrawArgs),
    /// WatchNodeRoutes delivery to 1,000 subscribers under ~100 route changes/s.
    Fanout(FanoutArgs),
    /// Allocate (or a Kubernetes Service) until a GoBGP ToR holds the route from both nodes.
    E2e(E2eArgs),
    /// herald-route-speaker's memory holding N /32s at a BIRD ToR, against BIRD's.
    SpeakerMemory(SpeakerMemoryArgs),
    /// alloc and e2e with span export off and on (to an in-process OTLP receiver), in
    /// alternating rounds.
    Trace(RoundsArgs),
    /// The watcher at scale from the fake API server: a burst of Services, a cold start
    /// with N pending, a restart and a migration with N holding addresses; Allocate
    /// batching on vs off in the same run.
    Kube(KubeArgs),
    /// alloc and e2e in plaintext and over mutual TLS (certificates made for the run), in
    /// alternating rounds.
    Tls(RoundsArgs),
    /// Internal: one engine session driven over stdin (used by advertise/withdraw).
    #[command(hide = true)]
    EngineChild(EngineChildArgs),
    /// Internal: the minimal gRPC-fronted INSERT server `floor` measures.
    #[command(hide = true)]
    InsertServer(InsertServerArgs),
    /// Internal: the minimal gRPC fan-out server `fanout` measures beside herald-ipam.
    #[command(hide = true)]
    FanoutServer(FanoutServerArgs),
    /// Diagnostic: raw INSERT vs the same INSERT behind a minimal gRPC server vs gRPC
    /// health check vs dry-run Allocate vs Allocate, with the CPU each costs per operation.
    Floor(AllocArgs),
    /// The route engine at cluster scale: N nodes, M Services, a churn of single changes;
    /// the incremental engine against `route_engine = "full"` in the same run.
    Scale(ScaleCliArgs),
}

#[derive(Debug, Args)]
struct ScaleCliArgs {
    /// Nodes, all peering.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Services, half Local with endpoints on 3 nodes each.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// WatchNodeRoutes streams kept open (on the first nodes).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Changes applied one at a time with the incremental engine.
    #[arg(long, default_value_t = 220)]
    changes: usize,
    /// Changes for the full engine, which takes seconds per change at the large sizes.
    #[arg(long, default_value_t = 220)]
    full_changes: usize,
    /// Weight of moves of a Local Service's endpoints in the change mix.
    #[arg(long, default_value_t = 50)]
    endpoint_moves: u32,
    /// Weight of a Cluster Service allocated or released.
    #[arg(long, default_value_t = 25)]
    cluster_changes: u32,
    /// Weight of a node turning not Ready or Ready again.
    #[arg(long, default_value_t = 25)]
    node_changes: u32,
    /// herald-ipam's `events_retention`, in seconds: short, so that the churn shows the
    /// change log compacted back to its bound within the run.
    #[arg(long, default_value_t = 5)]
    events_retention_secs: u64,
}

/// The `trace` and `tls` comparisons: the workloads and how many alternating rounds.
#[derive(Debug, Args)]
struct RoundsArgs {
    /// Allocate clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value = DEFAULT_ALLOC_POOL)]
    pool: String,
    /// e2e Services allocated one by one, per phase.
    #[arg(long, default_value_t = 200)]
    count: u64,
    /// e2e Services allocated at once, per burst.
    #[arg(long, default_value_t = 100)]
    burst: u64,
    /// e2e bursts per phase; the phase's burst figure is their median (one burst of 100
    /// is a single 30-50 ms sample).
    #[arg(long, default_value_t = 5)]
    bursts: u64,
    /// Rounds of (off, on), alternating which goes first; each side's median over them
    /// is compared. Odd, so the median is one round's figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

impl RoundsArgs {
    fn workload(&self) -> Workload<'_> {
        Workload {
            clients: self.clients,
            cidr: &self.pool,
            count: self.count,
            burst: self.burst,
            bursts: self.bursts,
        }
    }
}

#[derive(Debug, Args)]
struct CeilingArgs {
    /// Client counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    clients: Vec<usize>,
}

#[derive(Debug, Args)]
struct AllocArgs {
    #[arg(long, value_delimiter = ',', default_values_t = [8, 32])]
    clients: Vec<usize>,
    /// The pool allocated from (a fresh one per client count).
    #[arg(long, default_value = DEFAULT_ALLOC_POOL)]
    pool: String,
}

#[derive(Debug, Args)]
struct ReplicasArgs {
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_REPLICAS_CLIENTS])]
    clients: Vec<usize>,
    /// The pool allocated from (a fresh one per phase).
    #[arg(long, default_value = DEFAULT_ALLOC_POOL)]
    pool: String,
}

#[derive(Debug, Args)]
struct FullArgs {
    #[arg(long, default_value_t = DEFAULT_FULL_CLIENTS)]
    clients: usize,
    /// The pool filled; smaller pools finish faster but give fewer samples per percent.
    #[arg(long, default_value = DEFAULT_FULL_POOL)]
    pool: String,
}

#[derive(Debug, Args)]
struct BurstArgs {
    /// Services per AllocateBatch call.
    #[arg(long, default_value_t = DEFAULT_BURST_SIZE)]
    batch_size: u64,
    /// AllocateBatch calls measured (also bounded by --duration).
    #[arg(long, default_value_t = DEFAULT_BURST_BATCHES)]
    batches: u64,
    #[arg(long, default_value = DEFAULT_ALLOC_POOL)]
    pool: String,
}

#[derive(Debug, Args)]
struct RestartArgs {
    /// Allocations persisted before the kill.
    #[arg(long, default_value_t = DEFAULT_RESTART_ALLOCATIONS)]
    allocations: u64,
    #[arg(long, default_value = DEFAULT_RESTART_POOL)]
    pool: String,
    /// Stores herald-ipam runs on, one after the other in the same run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [StoreKind::Postgres, StoreKind::Sqlite])]
    stores: Vec<StoreKind>,
}

#[derive(Debug, Args)]
struct AdvertiseArgs {
    /// Route counts announced, each to a fresh ToR.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000])]
    sizes: Vec<u32>,
    /// Seconds any one convergence wait may take.
    #[arg(long, default_value_t = DEFAULT_BGP_TIMEOUT_S)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct WithdrawArgs {
    /// Single-prefix withdraws timed.
    #[arg(long, default_value_t = DEFAULT_WITHDRAW_REPEATS)]
    repeats: u32,
    /// Prefixes withdrawn at once.
    #[arg(long, default_value_t = DEFAULT_WITHDRAW_BULK)]
    bulk: u32,
    /// Skip the frozen-speaker (hold timer) scenario, ~10 s per speaker.
    #[arg(long)]
    no_freeze: bool,
    #[arg(long, default_value_t = DEFAULT_BGP_TIMEOUT_S)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// Route changes per second (each an Allocate or a Release); --duration bounds the phase.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
}

#[derive(Debug, Args)]
struct KubeArgs {
    /// Services created at once.
    #[arg(long, default_value_t = 1000)]
    burst: u64,
    /// Services pending when the watcher starts cold.
    #[arg(long, default_value_t = 10_000)]
    cold: u64,
}

#[derive(Debug, Args)]
struct SpeakerMemoryArgs {
    /// Routes (Services, one /32 each) the speakers hold.
    #[arg(long, default_value_t = 100_000)]
    routes: u64,
}

#[derive(Debug, Args)]
struct E2eArgs {
    /// Services allocated one by one.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Services allocated at once (at most 1,000: one AllocateBatch).
    #[arg(long, default_value_t = 1000)]
    burst: u64,
    /// Also run the Kubernetes-driven half (fake API server + herald-cluster-watcher).
    #[arg(long)]
    kube: bool,
    /// Run only the Kubernetes-driven half.
    #[arg(long)]
    kube_only: bool,
    /// With --kube: Services pending at the watcher's cold start (and then holding their
    /// addresses at its restart and at a migration).
    #[arg(long, default_value_t = 10_000)]
    cold: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.bench {
        Bench::EngineChild(args) => return bgp_child(args).await,
        Bench::InsertServer(args) => return insert_server::serve(args).await,
        Bench::FanoutServer(args) => return fanout_floor::serve(args).await,
        _ => {}
    }
    // pg-ceiling and the BGP benchmarks run without herald-ipam.
    let ipam_bin = match cli.bench {
        Bench::PgCeiling(_) | Bench::Advertise(_) | Bench::Withdraw(_) => {
            global.ipam_bin.clone().unwrap_or_default()
        }
        _ => ipam::find_binary(global.ipam_bin.as_deref())?,
    };
    let mut machine = Machine::host();
    match cli.bench {
        // The BGP benchmarks do not use Postgres; the machine line says so if it is down.
        Bench::Advertise(_) | Bench::Withdraw(_) => {
            if let Err(e) = pg::describe_server(&global.database_url, &mut machine).await {
                machine.postgres = format!("postgres unavailable ({e})");
            }
        }
        _ => pg::describe_server(&global.database_url, &mut machine).await?,
    }
    let log_dir = tempfile::Builder::new()
        .prefix("herald-bench-")
        .tempdir()
        .context("create a directory for herald-ipam logs")?;
    let common = Common {
        admin_url: global.database_url.clone(),
        ipam_bin,
        duration: Duration::from_secs_f64(global.duration.max(0.0)),
        warmup: Duration::from_secs_f64(global.warmup.max(0.0)),
        max_requests: global.max_requests,
        clients_per_channel: global.clients_per_channel.max(1),
        poll: Duration::from_millis(global.poll_ms.max(1)),
        log_dir: log_dir.path().to_path_buf(),
        machine: machine.clone(),
        pg_detail: global.pg_detail,
        otlp_endpoint: global.otlp_endpoint.clone(),
        mtls: None,
    };

    let mut figures = Map::new();
    let mut put = |name: &str, value: anyhow::Result<Value>| -> anyhow::Result<()> {
        figures.insert(name.to_string(), value?);
        Ok(())
    };
    match cli.bench {
        Bench::PgCeiling(a) => put(
            "pg-ceiling",
            json(benches::pg_ceiling(&common, &a.clients).await),
        )?,
        Bench::Alloc(a) => put(
            "alloc",
            json(benches::alloc(&common, &a.clients, &a.pool).await),
        )?,
        Bench::AllocFull(a) => put(
            "alloc-full",
            json(benches::alloc_full(&common, a.clients, &a.pool).await),
        )?,
        Bench::AllocBurst(a) => put(
            "alloc-burst",
            json(benches::alloc_burst(&common, a.batch_size, a.batches, &a.pool).await),
        )?,
        Bench::Restart(a) => put(
            "restart",
            json(benches::restart(&common, a.allocations, &a.pool, &a.stores).await),
        )?,
        Bench::Replicas(a) => put(
            "replicas",
            json(replicas::replicas(&common, &a.clients, &a.pool).await),
        )?,
        Bench::Advertise(a) => put(
            "advertise",
            json(bgp::advertise(&common, &a.sizes, Duration::from_secs(a.timeout)).await),
        )?,
        Bench::Withdraw(a) => put(
            "withdraw",
            json(
                bgp::withdraw(
                    &common,
                    a.repeats,
                    a.bulk,
                    !a.no_freeze,
                    Duration::from_secs(a.timeout),
                )
                .await,
            ),
        )?,
        Bench::Fanout(a) => put(
            "fanout",
            json(
                pipeline::fanout(&common, a.subscribers, a.channels, a.rate, common.duration).await,
            ),
        )?,
        Bench::SpeakerMemory(a) => put(
            "speaker-memory",
            json(pipeline::speaker_memory(&common, a.routes).await),
        )?,
        Bench::E2e(a) => {
            if !a.kube_only {
                put(
                    "e2e",
                    json(pipeline::e2e(&common, a.count, a.burst, 1).await),
                )?;
            }
            if a.kube || a.kube_only {
                put(
                    "e2e-kube",
                    json(pipeline::e2e_kube(&common, a.count, a.burst).await),
                )?;
                put(
                    "e2e-kube-scale",
                    json(herald_bench::kube::batched(&common, a.burst, a.cold).await),
                )?;
            }
        }
        Bench::Kube(a) => put(
            "kube",
            json(herald_bench::kube::kube(&common, a.burst, a.cold).await),
        )?,
        Bench::Scale(a) => put(
            "scale",
            json(
                herald_bench::scale::scale(
                    &common,
                    &herald_bench::scale::ScaleArgs {
                        nodes: a.nodes,
                        services: a.services,
                        subscribers: a.subscribers,
                        changes: a.changes,
                        full_changes: a.full_changes,
                        events_retention: Duration::from_secs(a.events_retention_secs),
                        endpoint_moves: a.endpoint_moves,
                        cluster_changes: a.cluster_changes,
                        node_changes: a.node_changes,
                    },
                )
                .await,
            ),
        )?,
        Bench::Trace(a) => put(
            "trace",
            json(herald_bench::trace::trace_overhead(&common, a.workload(), a.rounds).await),
        )?,
        Bench::Tls(a) => put(
            "tls",
            json(herald_bench::mtls::tls_overhead(&common, a.workload(), a.rounds).await),
        )?,
        Bench::EngineChild(_) | Bench::InsertServer(_) | Bench::FanoutServer(_) => {}
        Bench::Floor(a) => put(
            "floor",
            json(benches::floor(&common, &a.clients, &a.pool).await),
        )?,
        Bench::All => {
            machine.print();
            put(
                "pg-ceiling",
                json(benches::pg_ceiling(&common, &[1, 8, 32]).await),
            )?;
            put(
                "alloc",
                json(benches::alloc(&common, &[8, 32], DEFAULT_ALLOC_POOL).await),
            )?;
            put(
                "alloc-full",
                json(benches::alloc_full(&common, DEFAULT_FULL_CLIENTS, DEFAULT_FULL_POOL).await),
            )?;
            put(
                "alloc-burst",
                json(
                    benches::alloc_burst(
                        &common,
                        DEFAULT_BURST_SIZE,
                        DEFAULT_BURST_BATCHES,
                        DEFAULT_ALLOC_POOL,
                    )
                    .await,
                ),
            )?;
            put(
                "restart",
                json(
                    benches::restart(
                        &common,
                        DEFAULT_RESTART_ALLOCATIONS,
                        DEFAULT_RESTART_POOL,
                        &[StoreKind::Postgres, StoreKind::Sqlite],
                    )
                    .await,
                ),
            )?;
        }
    }

    if let Some(path) = global.json {
        let document = serde_json::json!({
            "machine": machine,
            "settings": {
                "duration_s": common.duration.as_secs_f64(),
                "warmup_s": common.warmup.as_secs_f64(),
                "max_requests": common.max_requests,
                "clients_per_channel": common.clients_per_channel,
            },
            "benchmarks": figures,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

async fn bgp_child(args: EngineChildArgs) -> anyhow::Result<()> {
    herald_bench::speakers::engine_child(args).await
}

fn json<T: serde::Serialize>(result: anyhow::Result<T>) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(result?)?)
}
