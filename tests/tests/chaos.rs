//! The chaos suite: faults under churn. Real processes on loopback: a private Postgres
//! cluster this test starts (so it can crash it), two `herald-ipam` replicas on it, the
//! watcher against the fake API server, three speakers (one on replica A, two on B), and a
//! GoBGP ToR with graceful restart whose every received path is recorded by `gobgp monitor
//! adj-in` (each UPDATE's announcements and withdrawals, per neighbor) and `gobgp monitor
//! global rib` (the ToR's own table). While 600 Services churn (create, delete, edit
//! ports, flip externalTrafficPolicy), each component is killed with SIGKILL and
//! restarted in turn, Postgres crashes and recovers, and replica A is frozen (SIGSTOP: its
//! connections stay open and nothing answers) for a while. Then, from Postgres' change
//! log, the fake API server, the ToR's table and the recordings: no address was ever held
//! by two owners, no surviving Service's address changed, every deleted Service's address
//! was released, the ToR has exactly the desired routes, no path of a surviving Service was
//! withdrawn by a node that was meant to carry it throughout, and no process panicked.
//! The RNG seed is fixed and printed; the counts are printed at the end.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_api::ipam::v1 as ipam_pb;
use herald_e2e::{Ipam, KubeLab, PrivatePostgres, next_hops, port, speaker_with, tor_policy};
use herald_fake_kube::{ENDPOINT_SLICES, FakeKube, SERVICES};
use herald_test_support::ChildProcess;
use herald_tor_harness::{Family, Tor, TorConfig, TorKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const SEED: u64 = 0x4845_5241_4c44_0017;
const NODES: [(&str, &str); 3] = [
    ("k01-worker", "127.0.0.10"),
    ("k01-worker2", "127.0.0.11"),
    ("k01-worker3", "127.0.0.12"),
];
const POOL: &str = "172.16.0.0/22";
/// Services that exist before the first fault.
const INITIAL: usize = 300;
/// Churn operations between and during the faults.
const OPS_PER_ROUND: usize = 80;
/// How long a fault lasts (a component down, Postgres down, replica A frozen).
const FAULT_TIME: Duration = Duration::from_secs(4);
/// How long everything may take to settle after the last fault.
const SETTLE: Duration = Duration::from_secs(60);
/// The ToR keeps a restarting speaker's paths this long.
const RESTART_TIME: u16 = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWatcher,
    KillIpamA,
    KillSpeaker(usize),
    KillIpamB,
    RestartPostgres,
    FreezeIpamA,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Appends a process's stdout and stderr to `dir/name.log` (kept across restarts, scanned
/// for panics at the end).
fn logged(dir: &Path, name: &str, command: &mut Command) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap();
    command.stdout(file.try_clone().unwrap()).stderr(file);
}

/// One path event from `gobgp monitor -j`, with the time it was read.
#[derive(Debug, Clone)]
struct PathEvent {
    at_ms: u128,
    prefix: String,
    neighbor: String,
    withdrawal: bool,
}

/// A `gobgp monitor … -j` process writing to a file that a thread follows, stamping each
/// line with the time it was read (within 20 ms of its writing).
struct Monitor {
    _process: ChildProcess,
    events: Arc<Mutex<Vec<PathEvent>>>,
    lines: Arc<Mutex<usize>>,
    sample: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Monitor {
    fn start(api_port: u16, what: &[&str], out: &Path) -> Self {
        let file = std::fs::File::create(out).unwrap();
        let mut command = Command::new("gobgp");
        command
            .args([
                "-u",
                "127.0.0.1",
                "-p",
                &api_port.to_string(),
                "-j",
                "monitor",
            ])
            .args(what)
            .stdout(file);
        let process = ChildProcess::spawn(&format!("gobgp monitor {}", what.join(" ")), command);
        let events = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(0));
        let sample = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, l, s, stopped) = (events.clone(), lines.clone(), sample.clone(), stop.clone());
        let mut reader = BufReader::new(std::fs::File::open(out).unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            // Bounded: the test sets `stop` when it ends (Drop).
            while !stopped.load(Ordering::Relaxed) {
                match reader.read_line(&mut line) {
                    Ok(n) if n > 0 && line.ends_with('\n') => {}
                    Ok(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => break,
                }
                let at_ms = now_ms();
                *l.lock().unwrap() += 1;
                if s.lock().unwrap().len() < 3 {
                    s.lock().unwrap().push(line.clone());
                }
                let value = serde_json::from_str::<Value>(line.trim()).unwrap_or(Value::Null);
                line.clear();
                let paths = match value {
                    Value::Array(paths) => paths,
                    other => vec![other],
                };
                let mut found = e.lock().unwrap();
                for path in paths {
                    let Some(prefix) = path["nlri"]["prefix"].as_str() else {
                        continue;
                    };
                    found.push(PathEvent {
                        at_ms,
                        prefix: prefix.to_string(),
                        neighbor: path["neighbor-ip"].as_str().unwrap_or("").to_string(),
                        withdrawal: path["withdrawal"].as_bool().unwrap_or(false),
                    });
                }
            }
        });
        Self {
            _process: process,
            events,
            lines,
            sample,
            stop,
        }
    }

    fn events(&self) -> Vec<PathEvent> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The GoBGP ToR's API port: the harness passes it to gobgpd as `--api-hosts`.
fn gobgp_api_port(tor: &Tor) -> u16 {
    let pid = tor.pid().expect("the ToR's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--api-hosts")
        .expect("gobgpd started with --api-hosts");
    args[at + 1].rsplit(':').next().unwrap().parse().unwrap()
}

/// What the test asked of one Service.
#[derive(Debug, Clone)]
struct Svc {
    name: String,
    uid: String,
    alive: bool,
    local: bool,
    /// The nodes its EndpointSlice puts endpoints on (fixed at creation).
    endpoints: BTreeSet<String>,
    /// Every set of nodes that was meant to announce it, in order.
    node_sets: Vec<BTreeSet<String>>,
    port: u16,
}

impl Svc {
    fn nodes(&self) -> BTreeSet<String> {
        if self.local {
            self.endpoints.clone()
        } else {
            NODES.iter().map(|(_, a)| a.to_string()).collect()
        }
    }
}

struct Churn {
    rng: StdRng,
    services: Vec<Svc>,
    created: usize,
    deleted: usize,
    port_edits: usize,
    policy_flips: usize,
}

impl Churn {
    fn create(&mut self, kube: &FakeKube) {
        let name = format!("svc-{:04}", self.created);
        self.created += 1;
        let mut endpoints = BTreeSet::new();
        while endpoints.is_empty() {
            for (_, address) in NODES {
                if self.rng.random_bool(0.5) {
                    endpoints.insert(address.to_string());
                }
            }
        }
        let node_of: BTreeMap<&str, &str> = NODES.iter().map(|(n, a)| (*a, *n)).collect();
        let slice_endpoints: Vec<Value> = endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| {
                json!({"addresses": [format!("10.244.{i}.{}", self.created % 250)],
                       "nodeName": node_of[a.as_str()], "conditions": {"ready": true}})
            })
            .collect();
        let local = self.rng.random_bool(0.3);
        let port = 80;
        kube.create(
            ENDPOINT_SLICES,
            json!({
                "metadata": {"namespace": "default", "name": format!("{name}-abcde"),
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": slice_endpoints,
            }),
        )
        .unwrap();
        let created = kube
            .create(
                SERVICES,
                json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"namespace": "default", "name": name},
                    "spec": {
                        "type": "LoadBalancer",
                        "loadBalancerClass": "herald.io/bgp",
                        "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                        "selector": {"app": name},
                        "ports": [{"port": port, "targetPort": 8080, "protocol": "TCP"}],
                    },
                }),
            )
            .unwrap();
        let mut svc = Svc {
            name,
            uid: created["metadata"]["uid"].as_str().unwrap().to_string(),
            alive: true,
            local,
            endpoints,
            node_sets: Vec::new(),
            port,
        };
        svc.node_sets.push(svc.nodes());
        self.services.push(svc);
    }

    fn random_alive(&mut self) -> Option<usize> {
        let alive: Vec<usize> = (0..self.services.len())
            .filter(|i| self.services[*i].alive)
            .collect();
        (!alive.is_empty()).then(|| alive[self.rng.random_range(0..alive.len())])
    }

    /// One random operation: create 40%, delete 20%, edit ports 20%, flip policy 20%.
    fn step(&mut self, kube: &FakeKube) {
        let roll = self.rng.random_range(0..10);
        let Some(i) = self.random_alive().filter(|_| roll >= 4) else {
            self.create(kube);
            return;
        };
        let name = self.services[i].name.clone();
        match roll {
            4 | 5 => {
                kube.delete(SERVICES, "default", &name).unwrap();
                kube.delete(ENDPOINT_SLICES, "default", &format!("{name}-abcde"))
                    .unwrap();
                self.services[i].alive = false;
                self.deleted += 1;
            }
            6 | 7 => {
                let port = self.services[i].port + 1;
                kube.patch(
                    SERVICES,
                    "default",
                    &name,
                    &json!({"spec": {"ports": [{"port": port, "targetPort": 8080, "protocol": "TCP"}]}}),
                )
                .unwrap();
                self.services[i].port = port;
                self.port_edits += 1;
            }
            _ => {
                let svc = &mut self.services[i];
                svc.local = !svc.local;
                kube.patch(
                    SERVICES,
                    "default",
                    &name,
                    &json!({"spec": {"externalTrafficPolicy": if svc.local { "Local" } else { "Cluster" }}}),
                )
                .unwrap();
                let nodes = svc.nodes();
                svc.node_sets.push(nodes);
                self.policy_flips += 1;
            }
        }
    }

    fn burst(&mut self, kube: &FakeKube, ops: usize) {
        for _ in 0..ops {
            self.step(kube);
        }
    }
}

/// Everything the test runs, so a fault can stop and restart any of it.
struct Cluster {
    dir: PathBuf,
    logs: PathBuf,
    pg: PrivatePostgres,
    ipam_a: Ipam,
    ipam_b: Ipam,
    lab: KubeLab,
    speaker_ipam: [String; 3],
}

impl Cluster {
    async fn start_ipam(dir: &Path, logs: &Path, url: &str, port: u16, name: &str) -> Ipam {
        Ipam::start_with(dir, url, port, |c| logged(logs, name, c)).await
    }

    fn start_watcher(&mut self) {
        let logs = self.logs.clone();
        let endpoint = self.ipam_a.endpoint();
        self.lab
            .start_watcher_with(&endpoint, |c| logged(&logs, "herald-cluster-watcher", c));
    }

    fn start_speaker(&mut self, i: usize) -> ChildProcess {
        let name = NODES[i].0;
        speaker_with(name, &self.speaker_ipam[i], |c| {
            logged(&self.logs, &format!("herald-route-speaker-{name}"), c);
        })
    }

    async fn inject(&mut self, fault: Fault, churn: &mut Churn) {
        let kube = &self.lab.kube;
        match fault {
            Fault::KillWatcher => {
                self.lab.watcher.as_mut().unwrap().kill9();
                churn.burst(kube, OPS_PER_ROUND / 2);
                tokio::time::sleep(FAULT_TIME).await;
                self.start_watcher();
            }
            Fault::KillIpamA | Fault::KillIpamB => {
                let (ipam, name) = if fault == Fault::KillIpamA {
                    (&mut self.ipam_a, "herald-ipam-a")
                } else {
                    (&mut self.ipam_b, "herald-ipam-b")
                };
                ipam.process.kill9();
                churn.burst(kube, OPS_PER_ROUND / 2);
                tokio::time::sleep(FAULT_TIME).await;
                let port = ipam.addr.port();
                *ipam = Self::start_ipam(&self.dir, &self.logs, &self.pg.url(), port, name).await;
            }
            Fault::KillSpeaker(i) => {
                self.lab.speakers[i].kill9();
                churn.burst(kube, OPS_PER_ROUND / 2);
                tokio::time::sleep(FAULT_TIME).await;
                self.lab.speakers[i] = self.start_speaker(i);
            }
            Fault::RestartPostgres => {
                self.pg.crash();
                churn.burst(kube, OPS_PER_ROUND / 2);
                tokio::time::sleep(FAULT_TIME).await;
                self.pg.start_server().await;
            }
            Fault::FreezeIpamA => {
                self.ipam_a.process.freeze(true);
                churn.burst(kube, OPS_PER_ROUND / 2);
                tokio::time::sleep(FAULT_TIME * 2).await;
                self.ipam_a.process.freeze(false);
            }
        }
    }

    /// Every process that should run and does not, restarted; the names of those found
    /// dead (a fault must never take down a component it was not aimed at).
    async fn revive(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        let url = self.pg.url();
        for (ipam, name) in [
            (&mut self.ipam_a, "herald-ipam-a"),
            (&mut self.ipam_b, "herald-ipam-b"),
        ] {
            if !ipam.process.is_running() {
                dead.push(name.to_string());
                let port = ipam.addr.port();
                *ipam = Self::start_ipam(&self.dir, &self.logs, &url, port, name).await;
            }
        }
        if !self.lab.watcher.as_mut().unwrap().is_running() {
            dead.push("herald-cluster-watcher".into());
            self.start_watcher();
        }
        for (i, (node, _)) in NODES.iter().enumerate() {
            if !self.lab.speakers[i].is_running() {
                dead.push(format!("herald-route-speaker {node}"));
                self.lab.speakers[i] = self.start_speaker(i);
            }
        }
        dead
    }
}

/// Recordings are stamped when read, within a poll (20 ms) of their writing; a withdrawal
/// this close to a sample may be one the sample already saw the end of.
const SAMPLE_SLACK_MS: u128 = 250;
/// How long after a speaker's restart its paths still count as carried across it.
const RESTART_SETTLE_MS: u128 = 10_000;

/// The ToR's table: prefix → neighbor → when the ToR received that neighbor's path (GoBGP's
/// `age`, a Unix time in seconds, here in ms) and whether it is stale. The time tells the
/// path of an address's new owner from its previous owner's: a replica's route engine
/// may withdraw the old owner's path seconds after the address moved (under load, or while
/// a replica restarts), and that withdrawal is no loss for the new owner. A path re-sent
/// with the same attributes keeps its time.
type Table = BTreeMap<String, BTreeMap<String, (u128, bool)>>;

/// Reads the ToR's whole IPv4 table with the `gobgp` CLI (as the monitors do).
async fn read_table(api_port: u16) -> Option<Table> {
    let out = tokio::process::Command::new("gobgp")
        .args(["-u", "127.0.0.1", "-p", &api_port.to_string()])
        .args(["-j", "global", "rib", "-a", "ipv4"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let value: Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut table = Table::new();
    for (prefix, paths) in value.as_object()? {
        let entry = table.entry(prefix.clone()).or_default();
        for path in paths.as_array().into_iter().flatten() {
            let (Some(neighbor), Some(age)) = (path["neighbor-ip"].as_str(), path["age"].as_u64())
            else {
                continue;
            };
            let stale = path["stale"].as_bool().unwrap_or(false);
            entry.insert(neighbor.to_string(), (u128::from(age) * 1000, stale));
        }
    }
    Some(table)
}

/// Whether a path received at `received_ms` (to the second) may be of an owner assigned
/// its address at `assigned_ms`.
fn received_after(received_ms: u128, assigned_ms: u128) -> bool {
    received_ms + 999 >= assigned_ms
}

/// Each (surviving Service, node): every distinct (sample time, path received at) the ToR
/// was seen with, fresh, at the fault boundaries.
type Seen = BTreeMap<(String, String), Vec<(u128, u128)>>;

/// Notes, for each surviving Service and node, the ToR's fresh path for the Service's
/// address from that node.
async fn sample_paths(api_port: u16, kube: &FakeKube, churn: &Churn, seen: &mut Seen) {
    let ips = ingress_ips(kube);
    let Some(table) = read_table(api_port).await else {
        return;
    };
    let at_ms = now_ms();
    for svc in churn.services.iter().filter(|s| s.alive) {
        let Some(paths) = ips
            .get(&svc.name)
            .and_then(|ip| table.get(&format!("{ip}/32")))
        else {
            continue;
        };
        for (node, (received, stale)) in paths {
            let seen = seen.entry((svc.name.clone(), node.clone())).or_default();
            if !stale && seen.last().is_none_or(|(_, r)| r != received) {
                seen.push((at_ms, *received));
            }
        }
    }
}

/// How often the ToR's table is read while the faults run.
const RIB_POLL: Duration = Duration::from_millis(300);

/// A task reading the ToR's whole table (stale paths included: graceful restart keeps
/// them) every [`RIB_POLL`] until stopped: (time in ms the read ended, the table).
type RibSamples = Arc<Mutex<Vec<(u128, Table)>>>;

fn sample_rib(api_port: u16, stop: Arc<AtomicBool>) -> (RibSamples, tokio::task::JoinHandle<()>) {
    let samples: RibSamples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    let task = tokio::spawn(async move {
        // Bounded: the test sets `stop` after the settle wait, itself bounded.
        while !stop.load(Ordering::Relaxed) {
            if let Some(table) = read_table(api_port).await {
                out.lock().unwrap().push((now_ms(), table));
            }
            tokio::time::sleep(RIB_POLL).await;
        }
    });
    (samples, task)
}

/// The prefixes `ipam` wants `node` to announce: its first WatchNodeRoutes snapshot.
async fn desired_prefixes(ipam: &Ipam, node: &str) -> BTreeSet<String> {
    let mut stream = ipam
        .routing()
        .await
        .watch_node_routes(herald_api::routing::v1::WatchNodeRoutesRequest {
            node: node.into(),
            deltas: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a snapshot within 10 s")
        .unwrap()
        .expect("a snapshot");
    first
        .peers
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| r.prefix.clone()))
        .collect()
}

/// The ToR's table against what the Services ask for: (prefix, want, have) of each
/// difference. `ips` maps each surviving Service's name to its address.
fn route_differences(
    rib: &herald_tor_harness::Rib,
    churn: &Churn,
    ips: &BTreeMap<String, String>,
) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in churn.services.iter().filter(|s| s.alive) {
        if let Some(ip) = ips.get(&svc.name) {
            wanted.insert(format!("{ip}/32"), svc.nodes().into_iter().collect());
        }
    }
    let mut prefixes: BTreeSet<String> = wanted.keys().cloned().collect();
    prefixes.extend(rib.keys().map(ToString::to_string));
    prefixes
        .into_iter()
        .filter_map(|p| {
            let want = wanted.get(&p).cloned().unwrap_or_default();
            let have = next_hops(rib, &p);
            (want != have).then_some((p, want, have))
        })
        .collect()
}

fn ingress_ips(kube: &FakeKube) -> BTreeMap<String, String> {
    kube.list(SERVICES, Some("default"))
        .iter()
        .filter_map(|s| {
            Some((
                s["metadata"]["name"].as_str()?.to_string(),
                s["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()?
                    .to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_under_churn_never_move_duplicate_leak_or_withdraw_an_address() {
    let started = Instant::now();
    let start_ms = now_ms();
    println!("chaos: RNG seed {SEED:#x}");
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let mut tor_config = TorConfig::new(TorKind::Gobgp);
    tor_config.graceful_restart = Some(RESTART_TIME);
    let tor = Arc::new(Tor::start(tor_config).await.unwrap());
    let api_port = gobgp_api_port(&tor);
    let adj_in = Monitor::start(api_port, &["adj-in"], &dir.path().join("adj-in.jsonl"));
    let global = Monitor::start(
        api_port,
        &["global", "rib"],
        &dir.path().join("global-rib.jsonl"),
    );

    let pg = PrivatePostgres::start().await;
    let ipam_a = Cluster::start_ipam(dir.path(), &logs, &pg.url(), port(), "herald-ipam-a").await;
    let ipam_b = Cluster::start_ipam(dir.path(), &logs, &pg.url(), port(), "herald-ipam-b").await;
    ipam_a
        .ipam()
        .await
        .create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(ipam_pb::Pool {
                name: "chaos".into(),
                addresses: vec![POOL.into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut policy = tor_policy(&tor, 9);
    policy.peers[0].node_selector = None;
    policy.peers[0].graceful_restart = true;
    policy.peers[0].restart_time_seconds = u32::from(RESTART_TIME);
    ipam_a.routing().await.set_bgp_policy(policy).await.unwrap();

    let lab = KubeLab::builder(dir.path()).nodes(&NODES).start().await;
    let speaker_ipam = [ipam_a.endpoint(), ipam_b.endpoint(), ipam_b.endpoint()];
    let mut cluster = Cluster {
        dir: dir.path().to_path_buf(),
        logs: logs.clone(),
        pg,
        ipam_a,
        ipam_b,
        lab,
        speaker_ipam,
    };
    cluster.start_watcher();
    cluster
        .lab
        .wait_registered(&cluster.ipam_a, Duration::from_secs(30))
        .await;
    for i in 0..NODES.len() {
        let speaker = cluster.start_speaker(i);
        cluster.lab.speakers.push(speaker);
    }
    tor.wait_neighbors(Duration::from_secs(30), |n| {
        n.iter().filter(|n| n.established).count() == NODES.len()
    })
    .await
    .unwrap();

    let mut churn = Churn {
        rng: StdRng::seed_from_u64(SEED),
        services: Vec::new(),
        created: 0,
        deleted: 0,
        port_edits: 0,
        policy_flips: 0,
    };
    for _ in 0..INITIAL {
        churn.create(&cluster.lab.kube);
    }
    // A baseline: every Service addressed and routed before the first fault.
    let baseline = tor
        .wait_until(Family::Ipv4, SETTLE, |rib| {
            let ips = ingress_ips(&cluster.lab.kube);
            ips.len() == INITIAL && route_differences(rib, &churn, &ips).is_empty()
        })
        .await;
    assert!(
        baseline.is_ok(),
        "the first {INITIAL} Services never settled: {baseline:?}"
    );
    println!(
        "chaos: {INITIAL} Services settled after {:?}",
        started.elapsed()
    );

    let faults = [
        Fault::KillWatcher,
        Fault::KillIpamA,
        Fault::KillSpeaker(0),
        Fault::KillIpamB,
        Fault::KillSpeaker(1),
        Fault::RestartPostgres,
        Fault::KillSpeaker(2),
        Fault::FreezeIpamA,
    ];
    let mut violations: Vec<String> = Vec::new();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let (rib_samples, sampler) = sample_rib(api_port, stop_sampling.clone());
    let mut seen = Seen::new();
    sample_paths(api_port, &cluster.lab.kube, &churn, &mut seen).await;
    // (node address, restarted at) of each speaker restart.
    let mut speaker_restarts: Vec<(&str, u128)> = Vec::new();
    for fault in faults {
        churn.burst(&cluster.lab.kube, OPS_PER_ROUND / 2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("chaos: {fault:?} at {} ms", now_ms() - start_ms);
        cluster.inject(fault, &mut churn).await;
        if let Fault::KillSpeaker(i) = fault {
            speaker_restarts.push((NODES[i].1, now_ms()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for dead in cluster.revive().await {
            violations.push(format!("{dead} exited during or after {fault:?}"));
        }
        sample_paths(api_port, &cluster.lab.kube, &churn, &mut seen).await;
    }
    println!("chaos: faults done at {:?}", started.elapsed());

    // Everything settles: every surviving Service has its address, the ToR the routes.
    let settled = tor
        .wait_until(Family::Ipv4, SETTLE, |rib| {
            let ips = ingress_ips(&cluster.lab.kube);
            churn
                .services
                .iter()
                .filter(|s| s.alive)
                .all(|s| ips.contains_key(&s.name))
                && route_differences(rib, &churn, &ips).is_empty()
        })
        .await;
    stop_sampling.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let ips = ingress_ips(&cluster.lab.kube);
    let rib = tor.routes(Family::Ipv4).await.unwrap();
    if settled.is_err() {
        for svc in churn
            .services
            .iter()
            .filter(|s| s.alive && !ips.contains_key(&s.name))
        {
            violations.push(format!("{} never got an address", svc.name));
        }
    }
    println!(
        "chaos: settled={} at {:?}",
        settled.is_ok(),
        started.elapsed()
    );

    // The change log: no address held by two owners at once; each owner's addresses.
    let rows = cluster.pg.query(
        "SELECT kind, ip, owner_uid, name, at, reason FROM events \
         WHERE kind IN ('assigned', 'released', 'updated') ORDER BY revision",
    );
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    // uid → (every address assigned, released?, time of the first assignment in ms).
    let mut owned: BTreeMap<String, (BTreeSet<String>, bool, u128)> = BTreeMap::new();
    for row in &rows {
        let [kind, ip, uid, name, at, _reason] = &row[..] else {
            panic!("unexpected events row {row:?}");
        };
        let mut at_ms: u128 = at.parse().unwrap_or(0);
        // `at` may be in µs or ns; the recordings are in ms.
        while at_ms > 10_000_000_000_000 {
            at_ms /= 1000;
        }
        match kind.as_str() {
            "assigned" => {
                if let Some(other) = holder.get(ip)
                    && other != uid
                {
                    violations.push(format!(
                        "{ip} assigned to {name} ({uid}) while {other} held it"
                    ));
                }
                holder.insert(ip.clone(), uid.clone());
                let entry = owned
                    .entry(uid.clone())
                    .or_insert((BTreeSet::new(), false, at_ms));
                entry.0.insert(ip.clone());
            }
            "released" => {
                if holder.get(ip) == Some(uid) {
                    holder.remove(ip);
                }
                owned
                    .entry(uid.clone())
                    .or_insert((BTreeSet::new(), false, at_ms))
                    .1 = true;
            }
            _ => {}
        }
    }
    let allocations = cluster
        .ipam_b
        .ipam()
        .await
        .list_allocations(ipam_pb::ListAllocationsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .allocations;
    let allocated: BTreeMap<String, String> = allocations
        .iter()
        .filter_map(|a| Some((a.owner.as_ref()?.uid.clone(), a.ips.first()?.ip.clone())))
        .collect();
    // Every route difference is a violation. Where the two replicas want different things
    // for a node, both views are printed: one replica's route engine missed a committed
    // change (as it did when a read failed around the Postgres crash and the change was
    // dropped, until services/ipam/src/routing/engine.rs retried the reload).
    if settled.is_err() {
        let mut views: BTreeMap<(&str, &str), BTreeSet<String>> = BTreeMap::new();
        for (node, address) in NODES {
            views.insert(
                ("A", address),
                desired_prefixes(&cluster.ipam_a, node).await,
            );
            views.insert(
                ("B", address),
                desired_prefixes(&cluster.ipam_b, node).await,
            );
        }
        for (prefix, want, have) in route_differences(&rib, &churn, &ips) {
            let split: Vec<String> = NODES
                .iter()
                .map(|(_, a)| {
                    (
                        a,
                        views[&("A", *a)].contains(&prefix),
                        views[&("B", *a)].contains(&prefix),
                    )
                })
                .filter(|(_, in_a, in_b)| in_a != in_b)
                .map(|(a, in_a, in_b)| format!("for {a} replica A wants it: {in_a}, B: {in_b}"))
                .collect();
            // What each side holds about the Service, to tell a lost update from a
            // routing fault.
            let ip = prefix.trim_end_matches("/32");
            let svc = churn
                .services
                .iter()
                .find(|s| s.alive && ips.get(&s.name).map(String::as_str) == Some(ip));
            let detail = svc.map(|svc| {
                let spec = cluster
                    .lab
                    .kube
                    .get(SERVICES, "default", &svc.name)
                    .map(|o| o["spec"]["externalTrafficPolicy"].clone());
                let ipam_policy = allocations
                    .iter()
                    .find(|a| a.owner.as_ref().is_some_and(|o| o.uid == svc.uid))
                    .map(|a| a.traffic_policy().as_str_name());
                let updates: Vec<&Vec<String>> = rows
                    .iter()
                    .filter(|r| r[2] == svc.uid && r[0] == "updated")
                    .collect();
                format!(
                    "{} (test: local={}, {} policy flips; kube: {spec:?}; IPAM: {ipam_policy:?}; updates {updates:?})",
                    svc.name,
                    svc.local,
                    svc.node_sets.len() - 1
                )
            });
            let line = format!(
                "ToR: {prefix} has next hops {have:?}, want {want:?}: {}; {split:?}",
                detail.unwrap_or_default()
            );
            violations.push(line);
        }
    }
    for svc in &churn.services {
        let history = owned.get(&svc.uid);
        if svc.alive {
            match history {
                Some((assigned, released, _)) => {
                    if assigned.len() != 1 || *released {
                        violations.push(format!(
                            "{} changed address: assigned {assigned:?}, released {released}",
                            svc.name
                        ));
                    }
                    let now = ips.get(&svc.name);
                    if now.is_some_and(|ip| !assigned.contains(ip)) {
                        violations
                            .push(format!("{} shows {now:?}, history {assigned:?}", svc.name));
                    }
                }
                None => violations.push(format!("{} was never assigned an address", svc.name)),
            }
        } else if allocated.contains_key(&svc.uid)
            || history.is_some_and(|(_, released, _)| !released)
        {
            violations.push(format!("deleted {} still holds its address", svc.name));
        }
    }

    // No path of a surviving Service withdrawn by a node meant to carry it throughout,
    // once the ToR was seen holding that path for this Service (before that, a replica's
    // feed a moment behind may still withdraw the address's previous owner's route). The
    // adj-in recording has the UPDATEs' withdrawals; the global one also the paths the
    // ToR dropped with a session.
    let adj_events = adj_in.events();
    let global_events = global.events();
    // A path of a surviving Service the ToR dropped between `from` and `to`, within
    // RESTART_SETTLE_MS of its node's speaker restart, without an UPDATE withdrawing it:
    // the graceful-restart helper keeps the stale path until the restarted speaker's
    // End-of-RIB, which must follow all its routes (known issue 1 below, fixed; a
    // violation).
    let dropped_at_restart = |node: &str, prefix: &str, from: u128, to: u128| {
        let sent = adj_events.iter().any(|e| {
            e.withdrawal
                && e.prefix == prefix
                && e.neighbor == node
                && e.at_ms + SAMPLE_SLACK_MS >= from
                && e.at_ms <= to + SAMPLE_SLACK_MS
        });
        let restarting = speaker_restarts.iter().any(|(n, restarted)| {
            *n == node && to >= *restarted && to <= restarted + RESTART_SETTLE_MS
        });
        restarting && !sent
    };
    // What an unexplained withdrawal needs to be explained: the Service as the test made
    // it, the address's history (a previous owner's path may still have been announced
    // by a speaker cut off from IPAM), and every UPDATE about the prefix around it.
    let explain = |svc: &Svc, ip: &str, at_ms: u128| -> String {
        let history: Vec<String> = rows
            .iter()
            .filter(|r| r[1] == ip)
            .map(|r| {
                let mut at: u128 = r[4].parse().unwrap_or(0);
                while at > 10_000_000_000_000 {
                    at /= 1000;
                }
                format!(
                    "{} {} at {} ms ({})",
                    r[0],
                    r[3],
                    at.saturating_sub(start_ms),
                    r[5]
                )
            })
            .collect();
        let prefix = format!("{ip}/32");
        let updates: Vec<String> = adj_events
            .iter()
            .filter(|e| e.prefix == prefix && e.at_ms + 10_000 >= at_ms && e.at_ms <= at_ms + 5_000)
            .map(|e| {
                format!(
                    "{} {} at {} ms",
                    e.neighbor,
                    if e.withdrawal {
                        "withdrew"
                    } else {
                        "announced"
                    },
                    e.at_ms - start_ms
                )
            })
            .collect();
        format!(
            "\n    {}: local={} node sets {:?}; history {history:?}; UPDATEs {updates:?}",
            svc.name, svc.local, svc.node_sets
        )
    };
    let mut withdrawn_paths: Vec<String> = Vec::new();
    // (Service, node) pairs whose own path was seen, then watched for withdrawals.
    let mut watched = 0;
    for svc in churn.services.iter().filter(|s| s.alive) {
        let Some(ip) = ips.get(&svc.name) else {
            continue;
        };
        let prefix = format!("{ip}/32");
        let always: BTreeSet<String> = svc
            .node_sets
            .iter()
            .skip(1)
            .fold(svc.node_sets[0].clone(), |acc, s| {
                acc.intersection(s).cloned().collect()
            });
        let Some((_, _, assigned_at)) = owned.get(&svc.uid) else {
            continue;
        };
        for node in &always {
            // The first time the ToR was seen with this Service's own path from the node
            // (a path received before the assignment is the previous owner's).
            let Some(since) = seen
                .get(&(svc.name.clone(), node.clone()))
                .into_iter()
                .flatten()
                .find(|(_, received)| received_after(*received, *assigned_at))
                .map(|(at, _)| at)
            else {
                continue;
            };
            watched += 1;
            for (events, how) in [
                (&adj_events, "in an UPDATE"),
                (&global_events, "from the ToR's table"),
            ] {
                let withdrawn = events
                    .iter()
                    .filter(|e| e.withdrawal && e.prefix == prefix && &e.neighbor == node)
                    .find(|e| e.at_ms > since + SAMPLE_SLACK_MS);
                if let Some(e) = withdrawn {
                    let line = format!(
                        "{node} withdrew {prefix} of surviving {} {how} at {} ms, {} ms after the ToR was seen with it",
                        svc.name,
                        e.at_ms - start_ms,
                        e.at_ms - since
                    );
                    if dropped_at_restart(node, &prefix, e.at_ms, e.at_ms) {
                        violations.push(format!("{line}: dropped at its speaker's restart"));
                    } else {
                        withdrawn_paths.push(line + &explain(svc, ip, e.at_ms));
                    }
                }
            }
        }
    }

    // The ToR's table, read every 300 ms: once it held a surviving Service's path from a
    // node meant to carry it throughout (stale or not), it held it in every later read.
    // The first second after the assignment is left out, for the reason above.
    let rib_samples = rib_samples.lock().unwrap().clone();
    let mut lost_paths = 0;
    // Paths the reads saw a surviving Service get and then followed.
    let mut followed = 0;
    for svc in churn.services.iter().filter(|s| s.alive) {
        let (Some(ip), Some((_, _, assigned_at))) = (ips.get(&svc.name), owned.get(&svc.uid))
        else {
            continue;
        };
        let prefix = format!("{ip}/32");
        let always: BTreeSet<String> = svc
            .node_sets
            .iter()
            .skip(1)
            .fold(svc.node_sets[0].clone(), |acc, s| {
                acc.intersection(s).cloned().collect()
            });
        for node in &always {
            let mut held_since = None;
            for (at_ms, table) in rib_samples
                .iter()
                .filter(|(at, _)| *at > assigned_at + 1000)
            {
                // Only this Service's own path counts (see `Table`).
                let held = table
                    .get(&prefix)
                    .and_then(|n| n.get(node))
                    .is_some_and(|(received, _)| received_after(*received, *assigned_at));
                match (held, held_since) {
                    (true, None) => {
                        followed += 1;
                        held_since = Some(*at_ms);
                    }
                    (false, Some(since)) => {
                        lost_paths += 1;
                        let line = format!(
                            "the ToR lost {node}'s path to {prefix} of surviving {} at {} ms, {} ms after it had it (assigned at {} ms)",
                            svc.name,
                            at_ms - start_ms,
                            at_ms - since,
                            assigned_at.saturating_sub(start_ms)
                        );
                        if dropped_at_restart(node, &prefix, since, *at_ms) {
                            violations.push(format!("{line}: dropped at its speaker's restart"));
                        } else {
                            withdrawn_paths.push(line + &explain(svc, ip, *at_ms));
                        }
                        break;
                    }
                    _ => {}
                }
            }
        }
    }

    // Nothing panicked.
    let mut log_files: Vec<PathBuf> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    log_files.sort();
    for path in &log_files {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked")) {
            violations.push(format!("{}: {line}", path.display()));
        }
    }

    // A path of a surviving Service withdrawn at the ToR is a violation like any other
    // (see the list of causes found below); counted apart so the line shows them.
    let withdrawn_surviving = withdrawn_paths.len();
    violations.append(&mut withdrawn_paths);
    let alive = churn.services.iter().filter(|s| s.alive).count();
    let updates = adj_events.len();
    let withdrawn = adj_events.iter().filter(|e| e.withdrawal).count();
    println!(
        "chaos: seed {SEED:#x}: {} Services created, {} deleted, {alive} surviving; {} port edits, {} policy flips; \
         {} faults; {} UPDATE paths at the ToR ({} adj-in lines, {withdrawn} withdrawals, {} global RIB events); \
         {watched} paths watched for withdrawals; {} ToR table reads, {followed} paths followed, {lost_paths} lost; {} history rows; \
         {} violations ({withdrawn_surviving} paths of surviving Services withdrawn); {:?}",
        churn.created,
        churn.deleted,
        churn.port_edits,
        churn.policy_flips,
        faults.len(),
        updates,
        adj_in.lines.lock().unwrap(),
        global_events.len(),
        rib_samples.len(),
        rows.len(),
        violations.len(),
        started.elapsed()
    );
    assert!(updates > 0, "the adj-in monitor recorded nothing");
    assert!(
        !global_events.is_empty(),
        "the global RIB monitor recorded nothing"
    );
    // Causes of surviving Services' paths withdrawn at the ToR found so far, each fixed
    // (or, for 3, the test corrected), all violations now:
    // 1. A path dropped right after its speaker's restart without an UPDATE withdrawing
    //    it (named as such above). A restarted speaker spawned its BGP session before
    //    handing it its first snapshot's routes; the session could reach Established first
    //    and send End-of-RIB after a partial set, and the ToR, as graceful-restart helper,
    //    dropped the stale paths not yet re-sent. Sessions now get their routes at the spawn.
    // 2. When SetServiceEndpoints failed (IPAM down) after an Allocate and the Service was
    //    then switched to Local, the Allocate carrying the Local policy reached IPAM before
    //    the endpoints, and IPAM withdrew the address everywhere until the watcher's retry
    //    sent them. The watcher now sends a Service's endpoints before its Allocate once it
    //    holds an address (checked by services/cluster-watcher/tests/watcher.rs,
    //    `a_service_flipped_to_local_keeps_its_route_on_its_endpoint_node_throughout`).
    // 3. (The test misread it.) "The ToR lost a path while a speaker or replica was
    //    down": every case was an address released and handed to a new Service within a
    //    fault, where a replica's route engine withdrew the previous owner's path seconds
    //    later and announced the new owner's 1 to 2 s after that. The test took the
    //    previous owner's path for the new Service's; paths are now told apart by when the
    //    ToR received them (`Table`).
    // 4. The one seen after replica A's kill -9 (the speaker of k01-worker, which follows
    //    A, withdrew two Local Services about 1.3 s after A came back, and announced them
    //    again 0.9 s later). Both were allocated just before the kill, and the watcher's
    //    SetServiceEndpoints after the Allocate failed with A gone. A route engine took a
    //    newly assigned address's owner for Cluster (the change log does not carry the
    //    policy) until an update or its endpoints said otherwise, so the old A announced
    //    them from every node, k01-worker2 included, which had no endpoint; the restarted
    //    A loaded them as Local with no endpoints known and announced them from none, so
    //    k01-worker withdrew them until the watcher's retry sent the endpoints. The engine
    //    now reads a new owner's policy from the store (checked by
    //    services/ipam/tests/routing.rs,
    //    `a_local_service_without_endpoints_is_announced_nowhere_by_a_running_or_a_new_replica`).
    if !violations.is_empty() {
        // The first lines of the recordings, to tell a monitor that changed its output
        // format from a fault; large, so only when something is to be investigated.
        println!(
            "chaos: monitor samples: {:?} {:?}",
            adj_in.sample.lock().unwrap(),
            global.sample.lock().unwrap()
        );
        // The logs and recordings, for whoever investigates.
        println!("chaos: logs kept in {}", dir.keep().display());
    }
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
