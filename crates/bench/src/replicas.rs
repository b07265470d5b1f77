//! `replicas`: Allocate through two herald-ipam replicas on one Postgres against one
//! replica, same client count, same run. Two replicas must not starve each other: their
//! combined throughput is at least one replica's, each serves a fair share of the calls
//! (the clients take calls from one shared count, so a slower replica serves fewer), and
//! none of the calls fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::benches::{Common, PhaseResult};
use crate::cpu;
use crate::ipam::{self, Audit, IpamServer};
use crate::pg::BenchDb;
use crate::report::{self, Target};
use crate::runner::{self, Op};

/// Two replicas' combined Allocate tps over one replica's.
const TPS_RATIO_TARGET: f64 = 1.0;
/// The least share of the answered calls each of two replicas serves.
const SHARE_TARGET: f64 = 0.4;
/// How long the second replica may take to learn the pool from the change log.
const POOL_VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One closed-loop client, bound to one replica.
struct ReplicaOp {
    client: IpamClient<Channel>,
    prefix: Arc<str>,
    replica: usize,
    /// `(uid, ip)` of every successful answer.
    answered: Vec<(String, String)>,
}

impl Op for ReplicaOp {
    async fn call(&mut self, seq: u64) -> Result<(), String> {
        let request = ipam::allocate_request(&self.prefix, seq, None);
        let response = self
            .client
            .allocate(request)
            .await
            .map_err(|s| ipam::status_text(&s))?;
        let ip = ipam::only_ip(response.into_inner().allocation)?;
        self.answered.push((ipam::uid(&self.prefix, seq), ip));
        Ok(())
    }
}

/// `clients` clients, client `i` on replica `i % servers.len()`, each replica's clients
/// spread round-robin over enough connections for `clients_per_channel` each.
async fn replica_clients(
    common: &Common,
    servers: &[IpamServer],
    clients: usize,
    prefix: &str,
) -> anyhow::Result<(Vec<ReplicaOp>, usize)> {
    let prefix: Arc<str> = Arc::from(prefix);
    let mut channels = Vec::with_capacity(servers.len());
    for (r, server) in servers.iter().enumerate() {
        let own = (r..clients).step_by(servers.len()).count();
        channels.push(
            server
                .channels(own.div_ceil(common.clients_per_channel.max(1)))
                .await?,
        );
    }
    let ops = (0..clients)
        .map(|i| {
            let replica = i % servers.len();
            let own = &channels[replica];
            ReplicaOp {
                client: IpamClient::new(own[(i / servers.len()) % own.len()].clone()),
                prefix: Arc::clone(&prefix),
                replica,
                answered: Vec::new(),
            }
        })
        .collect();
    Ok((ops, channels.iter().map(Vec::len).sum()))
}

/// Waits until `server` knows pool `name` (another replica created it).
async fn wait_for_pool(server: &IpamServer, name: &str) -> anyhow::Result<()> {
    let mut client = server.client().await?;
    let deadline = Instant::now() + POOL_VISIBLE_TIMEOUT;
    while Instant::now() < deadline {
        let request = pb::GetPoolRequest { name: name.into() };
        if client.get_pool(request).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!(
        "herald-ipam on {} did not see pool {name} within {POOL_VISIBLE_TIMEOUT:?}",
        server.addr
    )
}

/// One measured phase over `replicas` fresh replicas on a fresh database.
struct Phase {
    result: PhaseResult,
    /// Successful calls each replica served.
    served: Vec<u64>,
    audit: Audit,
}

async fn phase(common: &Common, replicas: usize, c: usize, cidr: &str) -> anyhow::Result<Phase> {
    let db = BenchDb::create(&common.admin_url).await?;
    let mut servers = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        servers.push(
            IpamServer::start(&common.ipam_bin, &db.url, &common.log_dir, common.poll)
                .await?
                .0,
        );
    }
    let mut admin = servers[0].client().await?;
    let capacity = ipam::create_pool(&mut admin, "bench", cidr, true).await?;
    for server in &servers[1..] {
        wait_for_pool(server, "bench").await?;
    }

    let mut answered = HashMap::new();
    let (ops, _) = replica_clients(common, &servers, c, "warm").await?;
    let warm = runner::run(ops, common.warmup_limits(capacity / 10), false).await;
    if warm.ok == 0 {
        bail!(
            "replicas warm-up with {replicas} replicas at c={c}: no Allocate succeeded (first error: {:?}); first server's log:\n{}",
            warm.first_error,
            servers[0].log_tail()
        );
    }
    answered.extend(warm.ops.into_iter().flat_map(|op| op.answered));

    // Stay well clear of a full pool, as `alloc` does.
    let cap = (capacity * 9 / 10).saturating_sub(warm.ok);
    let (ops, channels) = replica_clients(common, &servers, c, "run").await?;
    // The CPU split names one herald-ipam process: the first replica's.
    let pid = Some(servers[0].process.pid());
    let before = cpu::sample(pid);
    let outcome = runner::run(ops, common.measure_limits(cap), false).await;
    let after = cpu::sample(pid);
    let result = PhaseResult::from_outcome(c, channels, &outcome, cpu::between(&before, &after));
    let mut served = vec![0u64; replicas];
    for op in outcome.ops {
        served[op.replica] += op.answered.len() as u64;
        answered.extend(op.answered);
    }
    let audit = ipam::audit(&mut admin, &answered).await?;
    Ok(Phase {
        result,
        served,
        audit,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicasRow {
    pub clients: usize,
    pub one: PhaseResult,
    pub two: PhaseResult,
    /// Successful calls each of the two replicas served.
    pub served: Vec<u64>,
    /// Two replicas' tps over one replica's.
    pub tps_ratio: f64,
    pub audit_one: Audit,
    pub audit_two: Audit,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicasReport {
    pub pool: String,
    pub rows: Vec<ReplicasRow>,
    pub targets: Vec<Target>,
}

pub async fn replicas(
    common: &Common,
    clients: &[usize],
    cidr: &str,
) -> anyhow::Result<ReplicasReport> {
    common.print_header(&format!(
        "replicas: Allocate through two herald-ipam replicas on one Postgres vs one replica, same run; pool {cidr}"
    ));
    let mut rows = Vec::new();
    for &c in clients {
        let one = phase(common, 1, c, cidr).await?;
        let two = phase(common, 2, c, cidr).await?;
        rows.push(ReplicasRow {
            clients: c,
            tps_ratio: if one.result.ops_per_sec > 0.0 {
                two.result.ops_per_sec / one.result.ops_per_sec
            } else {
                0.0
            },
            one: one.result,
            two: two.result,
            served: two.served,
            audit_one: one.audit,
            audit_two: two.audit,
        });
    }

    report::throughput_header("c");
    for row in &rows {
        let c = row.clients.to_string();
        for (name, phase) in [("one replica", &row.one), ("two replicas", &row.two)] {
            report::throughput_row(
                &c,
                name,
                phase.ops_per_sec,
                &phase.latency,
                phase.errors,
                &phase.cpu,
            );
            if let Some(e) = &phase.first_error {
                println!("        first Allocate error: {e}");
            }
        }
        println!(
            "  {c:<5} {:<14} {:>9.2}x   served a: {}, b: {}   audit: {}",
            "two/one",
            row.tps_ratio,
            row.served[0],
            row.served[1],
            row.audit_two.brief()
        );
    }

    let mut targets = Vec::new();
    for row in &rows {
        let c = row.clients;
        targets.push(Target::new(
            format!("replicas tps c={c}"),
            format!("{:.2}x one replica", row.tps_ratio),
            format!(">= {TPS_RATIO_TARGET}x"),
            row.tps_ratio >= TPS_RATIO_TARGET,
        ));
        targets.push(Target::new(
            format!("replicas errors c={c}"),
            format!("{} failed calls", row.two.errors),
            "0".into(),
            row.two.errors == 0,
        ));
        let total: u64 = row.served.iter().sum();
        let least = row.served.iter().copied().min().unwrap_or(0);
        let share = if total > 0 {
            least as f64 / total as f64
        } else {
            0.0
        };
        targets.push(Target::new(
            format!("replicas share c={c}"),
            format!("{:.0} % least served", share * 100.0),
            format!(">= {:.0} % each", SHARE_TARGET * 100.0),
            share >= SHARE_TARGET,
        ));
        targets.push(Target::new(
            format!("replicas duplicates c={c}"),
            format!(
                "{} dup, {}/{} listed",
                row.audit_two.duplicates, row.audit_two.listed, row.audit_two.answered
            ),
            "0 dup, all listed".into(),
            row.audit_one.clean() && row.audit_two.clean(),
        ));
    }
    report::print_targets(&targets);
    Ok(ReplicasReport {
        pool: cidr.into(),
        rows,
        targets,
    })
}
