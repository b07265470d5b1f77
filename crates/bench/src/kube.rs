//! `kube`: the watcher at Kubernetes scale, from the fake API server (in this process)
//! through the real herald-cluster-watcher and herald-ipam on Postgres to two route
//! speakers and a GoBGP ToR. Four phases per arm:
//!
//! 1. a burst of Services created at once: until every one shows its address in status,
//!    and until the ToR holds every /32 from both nodes;
//! 2. a cold start with N pending Services: the watcher is stopped, N Services are
//!    created, and a new watcher process starts: until every one shows its address, and
//!    until the ToR holds them;
//! 3. a cold start with every Service holding its address (the watcher restarted): until
//!    it is ready (every address in status claimed, the start-up pass done);
//! 4. a migration: the same Services, holding addresses, meet a herald-ipam on an empty
//!    database: until the watcher is ready, with every address claimed as it was.
//!
//! After 3 and 4 every Service's address is checked against what it was, and against
//! herald-ipam's allocations. The arms are the watcher with its Allocate and endpoints
//! batching (`allocate_batch_max`, `endpoints_batch_max` at their defaults) and without
//! them (both 1), in the same run. Each phase also shows how long a reconcile waited on
//! each step on average (the watcher's step histogram), to show where the time goes. The
//! fake API server runs in this process, so this process's CPU is mostly the API
//! server's: it is printed per phase, and the phases that write every Service's status
//! get their floor measured in the same run ([`fake_floor`]: the fake API server alone
//! taking the same writes), to show whether it was the limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use herald_fake_kube::{FakeKube, NAMESPACES, SERVICES};
use herald_test_support::{ChildProcess, free_port};
use serde::Serialize;
use serde_json::{Value, json};

use crate::benches::Common;
use crate::cpu::{self, CpuUse};
use crate::ipam::{self, IpamServer};
use crate::pg::BenchDb;
use crate::pipeline::{self, KUBE_NAMESPACE, Pipeline};
use crate::report::{self, Target};

/// The watcher's own limit, its default: herald-ipam's largest AllocateBatch.
const BATCH_ON: usize = 1000;
/// Bound on any one phase converging.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Between polls of the API server's objects, the ToR's counters and the watcher's
/// /readyz. Each poll is cheap; a finer one would take CPU from what is measured.
const POLL: Duration = Duration::from_millis(10);
/// A stopping watcher hands its Lease back within this.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Targets of issue 18.
const BURST_TARGET_MS: f64 = 500.0;
const COLD_TARGET_MS: f64 = 5000.0;

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub services: u64,
    /// Until every Service of the phase showed its address in status.
    pub status_ms: Option<f64>,
    /// Until the ToR held every /32 of the phase from both nodes.
    pub tor_ms: Option<f64>,
    /// Until the started watcher was ready (leading, start-up pass done).
    pub ready_ms: Option<f64>,
    /// Calls to herald-ipam's Allocate/AllocateBatch and the Allocate requests in them.
    pub allocate_calls: u64,
    pub allocate_requests: u64,
    /// Calls to SetServiceEndpoints/SetServiceEndpointsBatch and the Services in them.
    pub endpoints_calls: u64,
    pub endpoints_requests: u64,
    /// Per reconcile step that waits on another system: (step, times, mean ms).
    pub steps: Vec<(String, u64, f64)>,
    /// CPU seconds of the watcher over the phase.
    pub watcher_cpu_s: f64,
    /// This process (mostly the fake API server), herald-ipam, Postgres, the machine.
    pub cpu: CpuUse,
    /// Services whose address was the same after the phase as before it, of those that
    /// had one (phases 3 and 4).
    pub kept: Option<(usize, usize)>,
    /// The fake API server alone taking the phase's writes (see [`fake_floor`]): the
    /// phase's floor on this machine, measured in the same run.
    pub fake_floor_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    pub name: &'static str,
    pub allocate_batch_max: usize,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KubeReport {
    pub arms: Vec<Arm>,
    pub targets: Vec<Target>,
}

pub async fn kube(common: &Common, burst: u64, cold: u64) -> anyhow::Result<KubeReport> {
    common.print_header(&format!(
        "kube: herald-fake-kube -> herald-cluster-watcher -> herald-ipam -> 2 route speakers -> GoBGP ToR; \
         a burst of {burst} Services, a cold start with {cold} pending, a restart and a migration with all holding addresses; \
         Allocate and endpoints batching on vs off (allocate_batch_max = endpoints_batch_max = 1)"
    ));
    let mut arms = Vec::new();
    for (name, max) in [("batched", BATCH_ON), ("unbatched", 1)] {
        let arm = run_arm(common, name, max, burst, cold)
            .await
            .with_context(|| format!("arm {name}"))?;
        print_arm(&arm);
        arms.push(arm);
    }
    print_ratios(&arms);
    let targets = targets(&arms);
    report::print_targets(&targets);
    Ok(KubeReport { arms, targets })
}

/// What `e2e --kube` reports of this benchmark: the batched arm alone (the watcher as it
/// ships), its burst and both cold starts judged against issue 18's targets.
pub async fn batched(common: &Common, burst: u64, cold: u64) -> anyhow::Result<KubeReport> {
    common.print_header(&format!(
        "e2e (c): herald-fake-kube -> herald-cluster-watcher -> herald-ipam -> 2 route speakers -> GoBGP ToR; \
         a burst of {burst} Services, a cold start with {cold} pending, a restart and a migration with all holding addresses \
         (the `kube` benchmark's batched arm; `herald-bench kube` adds batching off as its comparator)"
    ));
    let arm = run_arm(common, "batched", BATCH_ON, burst, cold)
        .await
        .context("arm batched")?;
    print_arm(&arm);
    let arms = vec![arm];
    let targets = targets(&arms);
    report::print_targets(&targets);
    Ok(KubeReport { arms, targets })
}

/// The watcher's admin address and the flags every watcher of an arm gets.
struct WatcherSetup {
    admin: SocketAddr,
    args: Vec<String>,
}

async fn run_arm(
    common: &Common,
    name: &'static str,
    max: usize,
    burst: u64,
    cold: u64,
) -> anyhow::Result<Arm> {
    let fake = FakeKube::start()
        .await
        .context("start the fake API server")?;
    fake.create(
        NAMESPACES,
        json!({"metadata": {"name": KUBE_NAMESPACE, "labels": {"kubernetes.io/metadata.name": KUBE_NAMESPACE}}}),
    )
    .map_err(|e| anyhow!("create namespace: {e:?}"))?;
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let setup = WatcherSetup {
        admin,
        args: vec![
            "--allocate-batch-max".into(),
            max.to_string(),
            "--endpoints-batch-max".into(),
            max.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
        ],
    };
    let mut p = pipeline::start_pipeline_with(common, Some(&fake), &setup.args).await?;
    let mut phases = Vec::new();

    // Warm-up: one Service through the whole path.
    create_services(&fake, "warm", 1)?;
    let started = Instant::now();
    wait_statuses(&fake, "warm-", 1, started).await?;
    wait_tor(&p, 1, started).await.context("warm-up")?;

    // 1. The burst.
    let baseline = tor_baseline(&p).await?;
    let started = Instant::now();
    let burst_phase = measure(&p.server, watcher_pid(&p)?, &setup, "burst", burst, async {
        create_services(&fake, "burst", burst)?;
        let (status, tor) = tokio::join!(
            wait_statuses(&fake, "burst-", burst, started),
            wait_tor(&p, baseline + burst, started)
        );
        Ok((Some(status?), Some(tor?), None, None))
    })
    .await?;
    phases.push(burst_phase);

    // 2. Cold start, every Service pending.
    stop_watcher(&mut p)?;
    create_services(&fake, "cold", cold)?;
    let baseline = tor_baseline(&p).await?;
    let started = Instant::now();
    p.watcher = Some(start_watcher(common, &fake, &p.server, &setup)?);
    let cold_phase = measure(
        &p.server,
        watcher_pid(&p)?,
        &setup,
        "cold start, pending",
        cold,
        async {
            let (ready, status, tor) = tokio::join!(
                wait_ready(setup.admin, started),
                wait_statuses(&fake, "cold-", cold, started),
                wait_tor(&p, baseline + cold, started)
            );
            Ok((Some(status?), Some(tor?), Some(ready?), None))
        },
    )
    .await?;
    phases.push(cold_phase);

    // 3. Cold start, every Service holding its address: the watcher restarts.
    let before = addresses(&fake);
    let total = before.len() as u64;
    stop_watcher(&mut p)?;
    let started = Instant::now();
    p.watcher = Some(start_watcher(common, &fake, &p.server, &setup)?);
    let restart_phase = measure(
        &p.server,
        watcher_pid(&p)?,
        &setup,
        "cold start, holding",
        total,
        async {
            let ready = wait_ready(setup.admin, started).await?;
            let kept = check_kept(&fake, &before, &p.server).await?;
            Ok((None, None, Some(ready), Some(kept)))
        },
    )
    .await?;
    phases.push(restart_phase);

    // 4. A migration: the same Services meet a herald-ipam with nothing allocated.
    stop_watcher(&mut p)?;
    let db = BenchDb::create(&common.admin_url).await?;
    let (fresh, _) = IpamServer::start_traced(
        &common.ipam_bin,
        &db.url,
        &common.log_dir,
        common.poll,
        common.otlp_endpoint.as_deref(),
    )
    .await?;
    let mut client = fresh.client().await?;
    ipam::create_pool(&mut client, "e2e", pipeline::E2E_POOL, true).await?;
    let started = Instant::now();
    let mut migrated = start_watcher(common, &fake, &fresh, &setup)?;
    let phase = measure(
        &fresh,
        migrated.pid(),
        &setup,
        "migration, holding",
        total,
        async {
            let ready = wait_ready(setup.admin, started).await?;
            let kept = check_kept(&fake, &before, &fresh).await?;
            Ok((None, None, Some(ready), Some(kept)))
        },
    )
    .await?;
    phases.push(phase);
    migrated.terminate(STOP_GRACE);
    drop(fresh);
    drop(db);
    drop(p);
    drop(fake);
    // The floors of the phases that write every Service's status, with Herald stopped.
    for phase in phases.iter_mut().filter(|p| p.status_ms.is_some()) {
        let floor = fake_floor(phase.services)
            .await
            .with_context(|| format!("the fake API server's floor for {}", phase.name))?;
        phase.fake_floor_ms = Some(floor.as_secs_f64() * 1000.0);
    }
    Ok(Arm {
        name,
        allocate_batch_max: max,
        phases,
    })
}

type Figures = (
    Option<Duration>,
    Option<Duration>,
    Option<Duration>,
    Option<(usize, usize)>,
);

fn watcher_pid(p: &Pipeline) -> anyhow::Result<u32> {
    p.watcher
        .as_ref()
        .map(ChildProcess::pid)
        .ok_or_else(|| anyhow!("no watcher running"))
}

/// Runs `work` with the CPU of the watcher, herald-ipam and the rest, and the watcher's
/// Allocate calls, over it.
async fn measure(
    server: &IpamServer,
    watcher_pid: u32,
    setup: &WatcherSetup,
    name: &'static str,
    services: u64,
    work: impl std::future::Future<Output = anyhow::Result<Figures>>,
) -> anyhow::Result<Phase> {
    // A watcher that has just started has no metrics yet: it counts from zero.
    let before_figures = watcher_figures(setup.admin).await.unwrap_or_default();
    let watcher_before = cpu::process_seconds(watcher_pid).unwrap_or(0.0);
    let before = cpu::sample(Some(server.process.pid()));
    let (status, tor, ready, kept) = work.await.with_context(|| format!("phase {name}"))?;
    let after = cpu::sample(Some(server.process.pid()));
    let watcher_after = cpu::process_seconds(watcher_pid).unwrap_or(0.0);
    let figures = watcher_figures(setup.admin).await?;
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let delta = |name: &str| {
        figures.get(name).copied().unwrap_or(0.0) - before_figures.get(name).copied().unwrap_or(0.0)
    };
    let steps = STEPS
        .iter()
        .filter_map(|step| {
            let count = delta(&format!("{STEP_SERIES}_count{{step=\"{step}\"}}"));
            let sum = delta(&format!("{STEP_SERIES}_sum{{step=\"{step}\"}}"));
            (count >= 1.0).then(|| (step.to_string(), count as u64, sum * 1000.0 / count))
        })
        .collect();
    Ok(Phase {
        name,
        services,
        status_ms: ms(status),
        tor_ms: ms(tor),
        ready_ms: ms(ready),
        allocate_calls: delta("herald_watcher_allocate_batch_size_count") as u64,
        allocate_requests: delta("herald_watcher_allocate_batch_size_sum") as u64,
        endpoints_calls: delta("herald_watcher_endpoints_batch_size_count") as u64,
        endpoints_requests: delta("herald_watcher_endpoints_batch_size_sum") as u64,
        steps,
        watcher_cpu_s: watcher_after - watcher_before,
        cpu: cpu::between(&before, &after),
        kept,
        fake_floor_ms: None,
    })
}

fn start_watcher(
    common: &Common,
    fake: &FakeKube,
    server: &IpamServer,
    setup: &WatcherSetup,
) -> anyhow::Result<ChildProcess> {
    let binary = pipeline::find_binary("herald-cluster-watcher")?;
    pipeline::start_watcher(&binary, fake, server, common, &setup.args)
}

/// SIGTERM: the watcher hands its Lease back, so the next one leads at once.
fn stop_watcher(p: &mut Pipeline) -> anyhow::Result<()> {
    let mut watcher = p
        .watcher
        .take()
        .ok_or_else(|| anyhow!("no watcher running"))?;
    if watcher.terminate(STOP_GRACE).is_none() {
        bail!("the watcher did not stop within {STOP_GRACE:?}");
    }
    Ok(())
}

/// `count` Services named `prefix-0` … straight into the API server's store.
fn create_services(fake: &FakeKube, prefix: &str, count: u64) -> anyhow::Result<()> {
    for seq in 0..count {
        let name = format!("{prefix}-{seq}");
        fake.create(SERVICES, pipeline::kube_service(&name))
            .map_err(|e| anyhow!("create Service {name}: {e:?}"))?;
    }
    Ok(())
}

fn has_address(svc: &Value) -> bool {
    svc["status"]["loadBalancer"]["ingress"][0]["ip"].is_string()
}

/// Until `count` Services named `prefix…` show an address in status.
async fn wait_statuses(
    fake: &FakeKube,
    prefix: &str,
    count: u64,
    since: Instant,
) -> anyhow::Result<Duration> {
    loop {
        // Counted in place: copying thousands of Services every poll would take the CPU
        // the system being measured needs.
        let done = fake.count_matching(SERVICES, Some(KUBE_NAMESPACE), |svc| {
            svc["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
                && has_address(svc)
        }) as u64;
        if done >= count {
            return Ok(since.elapsed());
        }
        if since.elapsed() >= PHASE_LIMIT {
            bail!("{done} of {count} {prefix}* Services had an address after {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The fewest prefixes the ToR holds from one node.
async fn tor_baseline(p: &Pipeline) -> anyhow::Result<u64> {
    Ok(pipeline::received_per_node(&p.tor)
        .await?
        .into_iter()
        .min()
        .unwrap_or(0))
}

/// Until the ToR holds `at_least` prefixes from each node.
async fn wait_tor(p: &Pipeline, at_least: u64, since: Instant) -> anyhow::Result<Duration> {
    pipeline::wait_all_nodes(&p.tor, at_least, since, PHASE_LIMIT).await
}

/// Until the watcher leads and is ready: its start-up pass is done. (A standby is ready
/// too, so the leader flag is read first; the watcher turns not ready before it sets it.)
async fn wait_ready(admin: SocketAddr, since: Instant) -> anyhow::Result<Duration> {
    let mut leading = false;
    loop {
        if !leading {
            leading = matches!(http_get(admin, "/metrics").await, Ok((200, body))
                if figure(&body, "herald_watcher_leader") == Some(1.0));
        }
        if leading && matches!(http_get(admin, "/readyz").await, Ok((200, _))) {
            return Ok(since.elapsed());
        }
        if since.elapsed() >= PHASE_LIMIT {
            bail!("the watcher was not ready within {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every Service's address, by name.
fn addresses(fake: &FakeKube) -> BTreeMap<String, String> {
    fake.list(SERVICES, Some(KUBE_NAMESPACE))
        .iter()
        .filter_map(|svc| {
            Some((
                svc["metadata"]["name"].as_str()?.to_string(),
                svc["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()?
                    .to_string(),
            ))
        })
        .collect()
}

/// How many of `before`'s Services show the same address now and hold it in `server`'s
/// allocations; an address that moved is an error.
async fn check_kept(
    fake: &FakeKube,
    before: &BTreeMap<String, String>,
    server: &IpamServer,
) -> anyhow::Result<(usize, usize)> {
    let now = addresses(fake);
    let mut client = server.client().await?;
    let held: BTreeMap<String, String> = ipam::list_all(&mut client)
        .await?
        .into_iter()
        .filter_map(|a| Some((a.owner?.name, a.ips.first()?.ip.clone())))
        .collect();
    let kept = before
        .iter()
        .filter(|(name, ip)| now.get(*name) == Some(*ip) && held.get(*name) == Some(*ip))
        .count();
    if kept != before.len() {
        let moved: Vec<String> = before
            .iter()
            .filter(|(name, ip)| now.get(*name) != Some(*ip) || held.get(*name) != Some(*ip))
            .take(5)
            .map(|(name, ip)| {
                format!(
                    "{name}: {ip} before, {:?} in status, {:?} in herald-ipam",
                    now.get(name),
                    held.get(name)
                )
            })
            .collect();
        bail!(
            "{} of {} Services kept their address; e.g. {moved:?}",
            kept,
            before.len()
        );
    }
    Ok((kept, before.len()))
}

/// The reconcile steps the watcher times, and their series.
const STEPS: [&str; 4] = ["allocate", "status", "event", "endpoints"];
const STEP_SERIES: &str = "herald_watcher_reconcile_step_duration_seconds";

/// Every sample of the watcher's /metrics, by series name with its labels as written.
async fn watcher_figures(admin: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let (code, body) = http_get(admin, "/metrics").await?;
    if code != 200 {
        bail!("the watcher's /metrics answered {code}");
    }
    Ok(body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// The value of an unlabelled series in a text exposition.
fn figure(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok())?
    })
}

/// One plain HTTP/1.0 GET on loopback: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("GET {path} on {addr} timed out"))??;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line from {addr}{path}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The watcher's bound on its writes in flight (`KUBE_WRITES_IN_FLIGHT`).
const FAKE_WRITES_IN_FLIGHT: usize = 100;

/// What the fake API server alone spends on what the watcher asks of it for `n` new
/// Services: `n` status merge PATCHes (as the watcher writes them: guarded by the
/// resourceVersion, an address and a condition) and `n` events.k8s.io/v1 Events, from
/// [`FAKE_WRITES_IN_FLIGHT`] keep-alive connections, until every PATCH is answered and
/// a watch of the Services has delivered its `n` MODIFIED events. On a fresh server in
/// this process, with nothing else running: the client is a few lines of plain HTTP, so
/// the time is the server's (and the machine's).
pub async fn fake_floor(n: u64) -> anyhow::Result<Duration> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let fake = FakeKube::start()
        .await
        .context("start the fake API server")?;
    let mut versions = Vec::new();
    for seq in 0..n {
        let name = format!("floor-{seq}");
        let created = fake
            .create(SERVICES, pipeline::kube_service(&name))
            .map_err(|e| anyhow!("create Service {name}: {e:?}"))?;
        let rv = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        versions.push((name, rv));
    }
    let addr = fake.addr();
    // The watch, over HTTP/1.0: the body is the stream until the server closes it.
    let mut watch = BufReader::new(tokio::net::TcpStream::connect(addr).await?);
    watch
        .get_mut()
        .write_all(
            format!(
                "GET /api/v1/namespaces/{KUBE_NAMESPACE}/services?watch=true&resourceVersion={} HTTP/1.0\r\nHost: {addr}\r\n\r\n",
                fake.resource_version()
            )
            .as_bytes(),
        )
        .await?;
    let watched = tokio::spawn(async move {
        let mut modified = 0u64;
        let mut line = String::new();
        while modified < n {
            line.clear();
            if watch.read_line(&mut line).await? == 0 {
                bail!("the watch ended after {modified} of {n} MODIFIED events");
            }
            if line.contains(r#""type":"MODIFIED""#) {
                modified += 1;
            }
        }
        anyhow::Ok(())
    });
    let queue = std::sync::Arc::new(std::sync::Mutex::new(versions));
    let started = Instant::now();
    let writers: Vec<_> = (0..FAKE_WRITES_IN_FLIGHT)
        .map(|_| {
            let queue = std::sync::Arc::clone(&queue);
            tokio::spawn(async move {
                let mut conn = BufReader::new(tokio::net::TcpStream::connect(addr).await?);
                // Bounded: each turn takes one Service off the queue.
                loop {
                    let next = queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pop();
                    let Some((name, rv)) = next else {
                        return anyhow::Ok(());
                    };
                    let ip = "192.0.2.1";
                    let patch = json!({
                        "metadata": {"resourceVersion": rv},
                        "status": {
                            "loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]},
                            "conditions": [{
                                "type": "herald.io/IPAllocated", "status": "True",
                                "reason": "IPAllocated", "message": format!("allocated {ip} from pool e2e"),
                                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1,
                            }],
                        },
                    });
                    let path = format!(
                        "/api/v1/namespaces/{KUBE_NAMESPACE}/services/{name}/status?fieldManager=herald-cluster-watcher"
                    );
                    let code = http11(&mut conn, "PATCH", &path, "application/merge-patch+json", &patch).await?;
                    if code != 200 {
                        bail!("PATCH {path} answered {code}");
                    }
                    let event = json!({
                        "metadata": {"namespace": KUBE_NAMESPACE, "name": format!("{name}.ev")},
                        "eventTime": "2026-01-01T00:00:00.000000Z",
                        "type": "Normal", "reason": "IPAllocated", "action": "Allocate",
                        "note": format!("allocated {ip} from pool e2e"),
                        "reportingController": "herald-cluster-watcher",
                        "reportingInstance": "herald-bench",
                        "regarding": {"apiVersion": "v1", "kind": "Service", "namespace": KUBE_NAMESPACE, "name": name},
                    });
                    let path = format!("/apis/events.k8s.io/v1/namespaces/{KUBE_NAMESPACE}/events");
                    let code = http11(&mut conn, "POST", &path, "application/json", &event).await?;
                    if code != 200 && code != 201 {
                        bail!("POST {path} answered {code}");
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    tokio::time::timeout(PHASE_LIMIT, watched)
        .await
        .map_err(|_| {
            anyhow!("the watch did not deliver {n} MODIFIED events within {PHASE_LIMIT:?}")
        })???;
    Ok(started.elapsed())
}

/// One HTTP/1.1 request on a keep-alive connection with a JSON body: the status code
/// (the body, sized by Content-Length, is read and dropped).
async fn http11(
    conn: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &Value,
) -> anyhow::Result<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_vec(body)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: fake\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let exchange = async {
        conn.get_mut().write_all(head.as_bytes()).await?;
        conn.get_mut().write_all(&body).await?;
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("no status line: {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                bail!("the connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut rest = vec![0; length];
        conn.read_exact(&mut rest).await?;
        anyhow::Ok(code)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow!("{method} {path} timed out"))?
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

fn print_arm(arm: &Arm) {
    println!(
        "  {} (allocate_batch_max = endpoints_batch_max = {}):",
        arm.name, arm.allocate_batch_max
    );
    println!(
        "  {:<22} {:>7} {:>10} {:>10} {:>10} {:>14} {:>10}  cpu (% of one core)",
        "phase", "n", "status ms", "ToR ms", "ready ms", "calls/requests", "watcher s"
    );
    for phase in &arm.phases {
        println!(
            "  {:<22} {:>7} {:>10} {:>10} {:>10} {:>14} {:>10.2}  {}{}",
            phase.name,
            phase.services,
            ms(phase.status_ms),
            ms(phase.tor_ms),
            ms(phase.ready_ms),
            format!("{}/{}", phase.allocate_calls, phase.allocate_requests),
            phase.watcher_cpu_s,
            phase.cpu.brief().replace("bench", "bench+fake-kube"),
            phase
                .kept
                .map(|(kept, of)| format!("; {kept} of {of} addresses kept"))
                .unwrap_or_default()
        );
        let steps: Vec<String> = phase
            .steps
            .iter()
            .map(|(step, n, mean)| format!("{step} {n} x {mean:.1} ms"))
            .collect();
        println!(
            "  {:<22} endpoints calls/requests {}/{}; waits per reconcile: {}",
            "",
            phase.endpoints_calls,
            phase.endpoints_requests,
            if steps.is_empty() {
                "-".to_string()
            } else {
                steps.join(", ")
            }
        );
        if let (Some(floor), Some(status)) = (phase.fake_floor_ms, phase.status_ms) {
            println!(
                "  {:<22} the fake API server alone: {} status PATCHes + {} Events, {} in flight, \
                 with their watch events: {floor:.0} ms; status {status:.0} ms is {:.2}x that",
                "",
                phase.services,
                phase.services,
                FAKE_WRITES_IN_FLIGHT,
                status / floor.max(0.001)
            );
        }
    }
}

/// The figure a phase is judged by: to the ToR when measured, else to status, else ready.
fn headline(phase: &Phase) -> Option<f64> {
    match (phase.tor_ms, phase.status_ms, phase.ready_ms) {
        (Some(tor), Some(status), _) => Some(tor.max(status)),
        (_, _, ready) => ready,
    }
}

fn print_ratios(arms: &[Arm]) {
    let [on, off] = arms else { return };
    println!("  batched vs unbatched (time ratio, < 1 is faster):");
    for (a, b) in on.phases.iter().zip(&off.phases) {
        if let (Some(x), Some(y)) = (headline(a), headline(b)) {
            println!(
                "  {:<22} {:>10.0} ms vs {:>8.0} ms   {:.2}x",
                a.name,
                x,
                y,
                x / y
            );
        }
    }
}

fn targets(arms: &[Arm]) -> Vec<Target> {
    let Some(on) = arms.first() else {
        return Vec::new();
    };
    on.phases
        .iter()
        .filter_map(|phase| {
            let measured = headline(phase)?;
            let goal = if phase.name == "burst" {
                BURST_TARGET_MS
            } else {
                COLD_TARGET_MS
            };
            Some(Target::new(
                format!("kube {}", phase.name),
                format!("{measured:.0} ms ({} Services)", phase.services),
                format!("< {goal} ms"),
                measured < goal && phase.kept.is_none_or(|(kept, of)| kept == of),
            ))
        })
        .collect()
}
