//! The route engine: it keeps the routing inputs (nodes, endpoint facts, the BGP policy,
//! the allocations) in memory, follows the change feed, computes every node's route set
//! with `herald-routes`, and publishes a new snapshot to a node only when that node's set
//! changed.
//!
//! Two engines, chosen by the `route_engine` setting:
//! - `incremental` (the default): a dedicated thread owns a [`RouteState`] and applies each
//!   burst of changes to it, recomputing only what they touch, then publishes the nodes
//!   whose set changed. The async side only reads the changed documents and hands the
//!   thread their facts, so no RPC ever waits behind a computation.
//! - `full`: every burst recomputes [`herald_routes::plan`] over all nodes × all Services
//!   on the async task, as Herald did before; kept as the benchmark's comparator.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use herald_ipam_store::{Document, Event, Store, StoreError};
use herald_model::{Allocation, AssignedIp, HistoryAction, Owner, PoolName, TrafficPolicy};
use herald_routes::{BgpPolicy, Node, NodeRoutes, Plan, RouteState, RoutesDelta, ServiceFacts};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::rollout::{REPORT_MAX_AGE_MICROS, Rollout, SessionView, Views};
use crate::changes::{Changes, Subject};
use crate::ipam::Ipam;
use herald_telemetry::trace::SpanContext;

/// The most changes one turn of the engine takes. A turn takes what the feed has already
/// delivered and never waits for more: a lone change is computed at once, and a burst
/// (the changes delivered while the previous turn ran) is computed as one.
const EVENTS_PER_TURN: usize = 10_000;
/// The most jobs the engine thread publishes as one, when it has fallen behind.
const JOBS_PER_TURN: usize = 64;
/// The first and the longest pause between attempts to reload the inputs after a change
/// could not be applied: the store is usually back within seconds.
const RELOAD_RETRY_MIN: Duration = Duration::from_millis(100);
const RELOAD_RETRY_MAX: Duration = Duration::from_secs(2);

/// Which engine computes the routes (the `route_engine` setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum EngineKind {
    /// Recompute only what a change touches, on a dedicated thread.
    #[default]
    Incremental,
    /// Recompute every node × every Service on each change.
    Full,
}

impl TryFrom<String> for EngineKind {
    type Error = String;

    /// Through a string rather than serde's enum access, so that a wrong value is told the
    /// values it may take (the `config` crate's enum error names neither).
    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "incremental" => Ok(Self::Incremental),
            "full" => Ok(Self::Full),
            _ => Err("expected `incremental` or `full`".to_string()),
        }
    }
}

/// One Service address's owner, and when and by which trace it last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressOwner {
    /// The uid `allocations` shares.
    uid: Arc<str>,
    /// W3C traceparent of the owner's last change (its allocation or its endpoints,
    /// whichever is newer), when known.
    trace: Option<Arc<str>>,
    /// When that change was made (unix µs).
    at: i64,
}

/// Per Service host prefix, its owner and the owner's last change. Engine-wide and
/// persistent: every snapshot holds the version of its publication for its provenance,
/// which shares all but what changed since with the others, instead of a map of its own
/// over every prefix of its node (5 million entries at 1,000 nodes × 5,000 `Cluster`
/// Services).
pub type Owners = imbl::OrdMap<IpNet, AddressOwner>;

/// Where the routes of one snapshot came from: (traceparent, changed_at) of the change
/// that put each prefix where it is, for the speaker's spans and latency metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provenance {
    /// The prefixes the snapshot's delta sets that their owner's change did not move
    /// (a node's or the policy's did): what [`change_of`] says. The others are what
    /// `owners` says, and need no entry of their own (a burst of 1,000 allocations would
    /// otherwise keep 500 entries on each of 1,000 nodes until their next change).
    changed: BTreeMap<IpNet, (String, i64)>,
    /// Every other Service host prefix: its owner's last change, as of publication.
    owners: Owners,
    /// Every other prefix (aggregates, which no one Service owns): the newest change
    /// applied at publication.
    newest_at: i64,
}

impl Provenance {
    /// (traceparent, changed_at) of `prefix`, a prefix of the snapshot.
    pub fn get(&self, prefix: &IpNet) -> (&str, i64) {
        if let Some((trace, at)) = self.changed.get(prefix) {
            return (trace, *at);
        }
        match self.owners.get(prefix) {
            Some(owner) => (owner.trace.as_deref().unwrap_or(""), owner.at),
            None => ("", self.newest_at),
        }
    }
}

/// What the watcher tells us about one Service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub traffic_policy: Option<TrafficPolicy>,
    pub nodes: BTreeSet<String>,
    pub traceparent: String,
}

/// What the inputs keep of one Service's allocation. The owner and the addresses are the
/// ones its [`ServiceFacts`] share with the route state: one copy per Service.
#[derive(Debug, Clone)]
struct Held {
    owner: Arc<Owner>,
    ips: Arc<[AssignedIp]>,
    traffic_policy: TrafficPolicy,
    at: i64,
    /// W3C traceparent of the change that last touched it, when this replica made it.
    trace: String,
}

/// A speaker's report, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeakerReport {
    pub applied_revision: i64,
    pub sessions: Vec<SessionReport>,
    /// The speaker's report interval (0: not said, read as the default).
    #[serde(default)]
    pub report_interval_ms: u64,
    /// The speaker's last report before it shut down.
    #[serde(default)]
    pub shutting_down: bool,
}

/// Whether this replica holds a WatchNodeRoutes stream of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    pub open: usize,
    /// When the last open stream ended (unix µs); `None` while one is open or when this
    /// replica never had one (the speaker may follow another replica).
    pub closed_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub peer: String,
    pub state: String,
    pub established_since: Option<i64>,
    pub announced: BTreeSet<String>,
    pub updates_sent: u64,
    pub last_error: String,
    /// The session waits for its turn to reset ([`super::rollout`]).
    #[serde(default)]
    pub reset_pending: bool,
    /// Established with every desired route sent.
    #[serde(default)]
    pub routes_sent: bool,
}

/// One node's published route set and where its prefixes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub revision: i64,
    /// When it was published (unix µs).
    pub published_at: i64,
    /// Shared with the engine's state: publishing copies no route set.
    pub routes: Arc<NodeRoutes>,
    /// Per prefix, (traceparent, changed_at) of the change that put it where it is.
    pub provenance: Provenance,
    /// W3C traceparent of the publish span that made this snapshot (empty while tracing
    /// is off): the speaker's apply span is its child.
    pub trace: String,
    /// When the oldest change this snapshot was published for was made (unix µs): what
    /// the speaker times a withdrawal from, since a withdrawn prefix carries no
    /// provenance of its own.
    pub changed_at: i64,
    /// What changed since the node's previous snapshot (`None` for its first), made once
    /// here for every stream that sends deltas.
    pub delta: Option<Delta>,
}

/// The change from one snapshot of a node to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The previous snapshot's revision.
    pub from: i64,
    pub routes: RoutesDelta,
}

/// One node's published snapshots: the current one, and the queues of the streams that
/// send deltas, each bounded so a stream that falls behind costs a resync, not memory.
#[derive(Default)]
struct NodeChannel {
    current: Option<watch::Sender<Option<Arc<NodeSnapshot>>>>,
    queues: Vec<QueueSender>,
}

impl NodeChannel {
    fn current(&mut self) -> &watch::Sender<Option<Arc<NodeSnapshot>>> {
        self.current.get_or_insert_with(|| watch::channel(None).0)
    }
}

struct QueueSender {
    tx: tokio::sync::mpsc::Sender<Arc<NodeSnapshot>>,
    overflowed: Arc<AtomicBool>,
}

/// A stream's queue of the snapshots published after it subscribed, each carrying its
/// delta; see [`RouteEngine::subscribe_deltas`].
pub struct DeltaQueue {
    rx: tokio::sync::mpsc::Receiver<Arc<NodeSnapshot>>,
    overflowed: Arc<AtomicBool>,
}

impl DeltaQueue {
    /// The next snapshot published; `None` once the engine is gone.
    pub async fn recv(&mut self) -> Option<Arc<NodeSnapshot>> {
        self.rx.recv().await
    }

    /// Whether a snapshot was dropped because the queue was full since the last call:
    /// the stream's client must then be sent the current snapshot whole.
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    /// Drops what is queued (made stale by sending a whole snapshot).
    pub fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

#[derive(Default)]
pub struct Inputs {
    nodes: BTreeMap<String, Node>,
    endpoints: BTreeMap<String, (Endpoints, i64)>,
    policy: Option<BgpPolicy>,
    /// By owner uid; the key is the uid `owners` shares.
    allocations: BTreeMap<Arc<str>, Held>,
    /// Host prefix → its owner (held in `allocations`) and the owner's last change, to
    /// find where a route came from without a scan; kept as allocations and endpoints
    /// change ([`Self::refresh_owners`]), and shared with the snapshots.
    owners: Owners,
    /// Every pool name an address was seen in, held once: each address's [`AssignedIp`]
    /// shares its pool's rather than carrying a copy.
    pool_names: BTreeSet<PoolName>,
    /// When the newest applied change was made (unix µs): the provenance of aggregates.
    last_change_at: i64,
    revision: i64,
}

impl Inputs {
    /// The entry an allocation gets in `allocations`: a load collects them and builds
    /// `allocations` (and `owners`) from them at once. Keyed by `key` when it is given
    /// (the uid the allocation index keeps for the owner).
    fn held(
        &mut self,
        key: Option<Arc<str>>,
        owner: Owner,
        ips: Vec<AssignedIp>,
        traffic_policy: TrafficPolicy,
        at: i64,
        trace: String,
    ) -> (Arc<str>, Held) {
        let uid = match key.filter(|key| **key == *owner.uid) {
            Some(key) => key,
            None => self.uid_key(&owner.uid),
        };
        let ips: Vec<AssignedIp> = ips.into_iter().map(|a| self.shared_pool(a)).collect();
        let held = Held {
            owner: Arc::new(owner),
            ips: ips.into(),
            traffic_policy,
            at,
            trace,
        };
        (uid, held)
    }

    /// Sets `allocations`, empty until now, to `held`, an entry per address held, in any
    /// order: an owner with an address in each family has two, which are made one here
    /// (its addresses in family order, as the store lists them). Built at once from the
    /// entries sorted, the B-tree's nodes come out full; inserted one by one, each would
    /// be left half empty (about 70 bytes more per Service).
    fn hold_all(&mut self, mut held: Vec<(Arc<str>, Held)>) {
        debug_assert!(self.allocations.is_empty());
        let v6_first = |h: &Held| h.ips.first().is_some_and(|a| a.ip.is_ipv6());
        held.sort_unstable_by(|(a, x), (b, y)| a.cmp(b).then(v6_first(x).cmp(&v6_first(y))));
        held.dedup_by(|(uid, later), (kept_uid, kept)| {
            if uid != kept_uid {
                return false;
            }
            kept.ips = kept.ips.iter().chain(later.ips.iter()).cloned().collect();
            true
        });
        self.allocations = held.into_iter().collect();
        // An address two owners claim (never, but the last one listed wins) is one entry.
        let owners: BTreeMap<IpNet, AddressOwner> = self
            .allocations
            .iter()
            .flat_map(|(uid, held)| {
                let (trace, at) = self.last_change(uid, held);
                held.ips.iter().map(move |a| {
                    let owner = AddressOwner {
                        uid: Arc::clone(uid),
                        trace: (!trace.is_empty()).then(|| Arc::from(trace)),
                        at,
                    };
                    (IpNet::from(a.ip), owner)
                })
            })
            .collect();
        self.owners = herald_routes::packed(owners.into_iter().collect());
    }

    /// Makes `uid`, which holds an allocation, the owner of `prefix`.
    fn set_owner(&mut self, prefix: IpNet, uid: Arc<str>) {
        match self.owners.get_mut(&prefix) {
            Some(owner) if owner.uid == uid => {}
            Some(owner) => owner.uid = uid,
            None => {
                self.owners.insert(
                    prefix,
                    AddressOwner {
                        uid,
                        trace: None,
                        at: 0,
                    },
                );
            }
        }
        self.refresh_owners([prefix]);
    }

    /// Sets the owner's last change of each of `prefixes` to what the allocations and
    /// endpoints say now, and drops the ones whose owner holds no allocation: after every
    /// change of an allocation or of endpoints, for the prefixes of its owner (and a
    /// released one).
    fn refresh_owners(&mut self, prefixes: impl IntoIterator<Item = IpNet>) {
        for prefix in prefixes {
            let Some(owner) = self.owners.get(&prefix) else {
                continue;
            };
            let change = self
                .allocations
                .get(&owner.uid)
                .map(|held| self.last_change(&owner.uid, held));
            match change {
                Some((trace, at))
                    if owner.at == at && owner.trace.as_deref().unwrap_or("") == trace => {}
                Some((trace, at)) => {
                    let owner = AddressOwner {
                        uid: Arc::clone(&owner.uid),
                        trace: (!trace.is_empty()).then(|| Arc::from(trace)),
                        at,
                    };
                    self.owners.insert(prefix, owner);
                }
                None => {
                    self.owners.remove(&prefix);
                }
            }
        }
    }

    /// (traceparent, changed_at) of the Service `uid`'s last change: its allocation or its
    /// endpoints, whichever is newer.
    fn last_change<'a>(&'a self, uid: &str, held: &'a Held) -> (&'a str, i64) {
        match self.endpoints.get(uid) {
            Some((e, at)) if *at >= held.at => (e.traceparent.as_str(), *at),
            _ => (held.trace.as_str(), held.at),
        }
    }

    /// The host prefixes of the Service `uid`'s addresses.
    fn prefixes_of(&self, uid: &str) -> Vec<IpNet> {
        self.allocations
            .get(uid)
            .map(|held| held.ips.iter().map(|a| IpNet::from(a.ip)).collect())
            .unwrap_or_default()
    }

    /// The key `uid` already has in `allocations`, or a new one.
    fn uid_key(&self, uid: &str) -> Arc<str> {
        self.allocations
            .get_key_value(uid)
            .map_or_else(|| Arc::from(uid), |(key, _)| Arc::clone(key))
    }

    /// `assigned` with the pool name every address of its pool shares.
    fn shared_pool(&mut self, assigned: AssignedIp) -> AssignedIp {
        let pool = match self.pool_names.get(&assigned.pool) {
            Some(shared) => shared.clone(),
            None => {
                self.pool_names.insert(assigned.pool.clone());
                assigned.pool
            }
        };
        AssignedIp {
            ip: assigned.ip,
            pool,
        }
    }

    /// What routes need to know about the Service `uid`, if it holds addresses, with the
    /// uid `allocations` keeps, for the route state to share.
    fn keyed_facts(&self, uid: &str) -> Option<KeyedFacts> {
        self.allocations
            .get_key_value(uid)
            .map(|(key, held)| (Arc::clone(key), self.facts_of(uid, held)))
    }

    /// Everything the route state needs, as one batch (at start and after a reload).
    fn batch_all(&self, pools: Vec<herald_model::PoolSpec>) -> Batch {
        Batch::All {
            nodes: self.nodes.values().cloned().collect(),
            services: self
                .allocations
                .iter()
                .map(|(uid, held)| (Arc::clone(uid), self.facts_of(uid, held)))
                .collect(),
            policy: self.policy.clone(),
            pools,
        }
    }

    fn facts_of(&self, uid: &str, held: &Held) -> ServiceFacts {
        let endpoints = self.endpoints.get(uid).map(|(e, _)| e);
        ServiceFacts {
            owner: Arc::clone(&held.owner),
            traffic_policy: endpoints
                .and_then(|e| e.traffic_policy)
                .unwrap_or(held.traffic_policy),
            nodes_with_ready_endpoints: endpoints.map(|e| e.nodes.clone()).unwrap_or_default(),
            ips: Arc::clone(&held.ips),
        }
    }

    /// (traceparent, changed_at) of the change that last touched `prefix`: its owner's
    /// allocation or endpoints for a host route, the newest change for an aggregate.
    fn provenance(&self, prefix: &IpNet) -> (String, i64) {
        match self.owner_change(prefix) {
            Some((trace, at)) => (trace.to_string(), at),
            None => (String::new(), self.last_change_at),
        }
    }

    /// For a Service's host prefix, (traceparent, changed_at) of its owner's last change.
    fn owner_change(&self, prefix: &IpNet) -> Option<(&str, i64)> {
        let owner = self.owners.get(prefix)?;
        let held = self.allocations.get(&owner.uid)?;
        Some(self.last_change(&owner.uid, held))
    }
}

pub struct RouteEngine {
    inputs: Mutex<Inputs>,
    /// The policy's local ASN (0 without a policy), kept apart from the inputs: every
    /// message a stream sends reads it, and would otherwise wait for the inputs' lock
    /// while the engine publishes.
    local_asn: AtomicU32,
    published: Mutex<HashMap<String, NodeChannel>>,
    last_plan: Mutex<Arc<Plan>>,
    /// The incremental engine's state as of its last publication (a cheap copy: the maps
    /// share structure); `None` with the full engine.
    state: Mutex<Option<RouteState>>,
    /// The Services' facts of the last computation, for the status's reasons.
    last_services: Mutex<Arc<Vec<ServiceFacts>>>,
    reports: Mutex<BTreeMap<String, (SpeakerReport, i64)>>,
    streams: Arc<Mutex<HashMap<String, StreamState>>>,
    rollout: Mutex<Rollout>,
    /// Per node, the peers it may reset its session with now.
    grants: Mutex<HashMap<String, watch::Sender<BTreeSet<String>>>>,
}

/// Counts one open WatchNodeRoutes stream of a node while it lives.
pub struct StreamGuard {
    node: String,
    streams: Arc<Mutex<HashMap<String, StreamState>>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = lock(&self.streams);
        if let Some(s) = streams.get_mut(&self.node) {
            s.open = s.open.saturating_sub(1);
            if s.open == 0 {
                s.closed_at = Some(herald_ipam_store::now_micros());
            }
        }
    }
}

fn asn_of(inputs: &Inputs) -> u32 {
    inputs.policy.as_ref().map_or(0, |p| p.local_asn)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn decode<T: for<'de> Deserialize<'de>>(doc: &Document) -> Result<T, StoreError> {
    serde_json::from_str(&doc.spec).map_err(|e| StoreError::Corrupt(format!("{}: {e}", doc.key)))
}

/// The route engine's inputs while they load: what the store holds besides the
/// allocations, then the allocations an address at a time, as [`Store::each_held_address`]
/// hands them over (at start-up, in the same pass that loads the allocation index).
pub struct Loading {
    inputs: Inputs,
    held: Vec<(Arc<str>, Held)>,
    reports: BTreeMap<String, (SpeakerReport, i64)>,
}

impl Loading {
    /// Reads the nodes, endpoints, policy and speaker reports, and makes room for
    /// `addresses` held addresses.
    pub async fn start(store: &Store, revision: i64, addresses: u64) -> Result<Self, StoreError> {
        let mut inputs = Inputs {
            revision,
            last_change_at: herald_ipam_store::now_micros(),
            ..Default::default()
        };
        for doc in store.load_nodes().await? {
            inputs.nodes.insert(doc.key.clone(), decode(&doc)?);
        }
        for doc in store.load_endpoints().await? {
            inputs
                .endpoints
                .insert(doc.key.clone(), (decode(&doc)?, doc.updated_at));
        }
        if let Some(doc) = store.load_policy().await? {
            inputs.policy = Some(decode(&doc)?);
        }
        let mut reports = BTreeMap::new();
        for doc in store.load_speaker_states().await? {
            reports.insert(doc.key.clone(), (decode(&doc)?, doc.updated_at));
        }
        Ok(Self {
            inputs,
            held: Vec::with_capacity(usize::try_from(addresses).unwrap_or(0)),
            reports,
        })
    }

    /// Takes in an owner's allocation, or part of it (one of its addresses). `uid`, the
    /// owner's uid if the caller keeps it already, is shared rather than copied.
    pub fn allocation(&mut self, a: Allocation, uid: Option<Arc<str>>) {
        let entry = self.inputs.held(
            uid,
            a.owner,
            a.ips,
            a.traffic_policy,
            a.created_at,
            String::new(),
        );
        self.held.push(entry);
    }

    pub fn finish(mut self) -> Arc<RouteEngine> {
        self.inputs.hold_all(self.held);
        RouteEngine::new(self.inputs, self.reports)
    }
}

impl RouteEngine {
    /// Loads every routing input from the store.
    pub async fn load(store: &Store, revision: i64) -> Result<Arc<Self>, StoreError> {
        let mut loading = Loading::start(store, revision, store.claim_count().await?).await?;
        store
            .each_held_address(|held| loading.allocation(held.allocation, None))
            .await?;
        Ok(loading.finish())
    }

    fn new(inputs: Inputs, reports: BTreeMap<String, (SpeakerReport, i64)>) -> Arc<Self> {
        Arc::new(Self {
            local_asn: AtomicU32::new(asn_of(&inputs)),
            inputs: Mutex::new(inputs),
            published: Mutex::new(HashMap::new()),
            last_plan: Mutex::new(Arc::new(Plan::default())),
            state: Mutex::new(None),
            last_services: Mutex::new(Arc::new(Vec::new())),
            reports: Mutex::new(reports),
            streams: Arc::new(Mutex::new(HashMap::new())),
            rollout: Mutex::new(Rollout::default()),
            grants: Mutex::new(HashMap::new()),
        })
    }

    pub fn knows_node(&self, name: &str) -> bool {
        lock(&self.inputs).nodes.contains_key(name)
    }

    /// The policy's local ASN (0 without a policy), for every message of a route stream:
    /// without copying the policy.
    pub fn local_asn(&self) -> u32 {
        self.local_asn.load(Ordering::Relaxed)
    }

    /// The plan of the last computation. The incremental engine keeps no plan; it is
    /// built from its state on demand (a copy of every node's set, for status queries).
    pub fn last_plan(&self) -> Arc<Plan> {
        let state = lock(&self.state).clone();
        match state {
            Some(state) => Arc::new(state.plan()),
            None => Arc::clone(&lock(&self.last_plan)),
        }
    }

    pub fn reports(&self) -> BTreeMap<String, (SpeakerReport, i64)> {
        lock(&self.reports).clone()
    }

    /// Keeps a speaker's report and moves the rolling resets on ([`super::rollout`]).
    pub fn record_report(&self, node: &str, report: SpeakerReport, at: i64) {
        let views: Views = {
            let mut reports = lock(&self.reports);
            reports.insert(node.to_string(), (report, at));
            reports
                .iter()
                .filter(|(_, (_, reported))| at.saturating_sub(*reported) <= REPORT_MAX_AGE_MICROS)
                .map(|(node, (r, _))| {
                    let sessions = r
                        .sessions
                        .iter()
                        .map(|s| {
                            let view = SessionView {
                                reset_pending: s.reset_pending,
                                routes_sent: s.routes_sent,
                            };
                            (s.peer.clone(), view)
                        })
                        .collect();
                    (node.clone(), sessions)
                })
                .collect()
        };
        let mut rollout = lock(&self.rollout);
        if rollout.step(&views, at) {
            let grants = lock(&self.grants);
            for (node, sender) in grants.iter() {
                let granted = rollout.granted(node);
                sender.send_if_modified(|cur| {
                    if *cur == granted {
                        false
                    } else {
                        *cur = granted;
                        true
                    }
                });
            }
        }
    }

    /// The peers `node` may reset its session with, now and on every change.
    pub fn subscribe_grants(&self, node: &str) -> watch::Receiver<BTreeSet<String>> {
        let rollout = lock(&self.rollout);
        let mut grants = lock(&self.grants);
        grants
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(rollout.granted(node)).0)
            .subscribe()
    }

    pub fn last_services(&self) -> Arc<Vec<ServiceFacts>> {
        let state = lock(&self.state).clone();
        match state {
            Some(state) => Arc::new(state.services().cloned().collect()),
            None => Arc::clone(&lock(&self.last_services)),
        }
    }

    pub fn policy_and_nodes(&self) -> (Option<BgpPolicy>, BTreeMap<String, Node>) {
        let inputs = lock(&self.inputs);
        (inputs.policy.clone(), inputs.nodes.clone())
    }

    /// Marks a WatchNodeRoutes stream of `node` open until the guard is dropped.
    pub fn stream_opened(&self, node: &str) -> StreamGuard {
        let mut streams = lock(&self.streams);
        let s = streams.entry(node.to_string()).or_default();
        s.open += 1;
        s.closed_at = None;
        StreamGuard {
            node: node.to_string(),
            streams: Arc::clone(&self.streams),
        }
    }

    pub fn streams(&self) -> HashMap<String, StreamState> {
        lock(&self.streams).clone()
    }

    /// The snapshots of `node`, starting with the current one (`None` until the first
    /// computation that includes the node).
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<Arc<NodeSnapshot>>> {
        let mut published = lock(&self.published);
        published
            .entry(node.to_string())
            .or_default()
            .current()
            .subscribe()
    }

    /// As [`Self::subscribe`], plus a queue of every snapshot published from now on, each
    /// with its delta, holding at most `buffer`: one that does not fit is dropped and the
    /// queue marked overflowed. Both are taken under one lock, so no snapshot falls
    /// between the current one and the queue.
    pub fn subscribe_deltas(
        &self,
        node: &str,
        buffer: usize,
    ) -> (watch::Receiver<Option<Arc<NodeSnapshot>>>, DeltaQueue) {
        let mut published = lock(&self.published);
        let channel = published.entry(node.to_string()).or_default();
        let current = channel.current().subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        channel.queues.push(QueueSender {
            tx,
            overflowed: Arc::clone(&overflowed),
        });
        (current, DeltaQueue { rx, overflowed })
    }

    /// Applies one change from the feed. Documents are re-read from the store, so applying
    /// an event twice or late leaves the latest state. Returns the trace context of the
    /// change, when known: this replica made it (`changes`), or its facts carry one.
    async fn apply(
        &self,
        store: &Store,
        changes: &Changes,
        event: &Event,
        touched: &mut Touched,
    ) -> Result<Option<SpanContext>, StoreError> {
        let revision = event.revision();
        let mut cause = None;
        touched.note(event);
        // When the change was made: an allocation's history entry and an endpoints
        // document say; a node, policy or pool change is timed from now, when it arrived.
        let mut made_at = herald_ipam_store::now_micros();
        match event {
            Event::Assigned(entry, _) => {
                made_at = entry.at;
                cause = changes.get(&Subject::Owner(entry.owner.uid.clone()));
                let trace = cause
                    .as_ref()
                    .map(herald_telemetry::trace::traceparent_of)
                    .unwrap_or_default();
                // The log entry does not carry the owner's traffic policy, and taking a new
                // owner for Cluster announced a Local Service from every node until its
                // endpoints came, where a replica loading it announced it from none: a
                // speaker moving between the two withdrew it from its endpoint node. The
                // store says (its current value, at least as new as this entry).
                let held_already = lock(&self.inputs)
                    .allocations
                    .contains_key(entry.owner.uid.as_str());
                let new_owner_policy = if held_already {
                    None
                } else {
                    Some(
                        store
                            .get_allocation(&entry.owner.uid)
                            .await?
                            .map(|a| a.traffic_policy),
                    )
                };
                let mut inputs = lock(&self.inputs);
                match new_owner_policy {
                    // Released since: its `released` entry follows, and holding the address
                    // until then would announce what nobody owns.
                    Some(None) => {}
                    policy => {
                        let uid = inputs.uid_key(&entry.owner.uid);
                        let assigned = PoolName::parse("pool", &entry.pool)
                            .ok()
                            .map(|pool| inputs.shared_pool(AssignedIp { ip: entry.ip, pool }));
                        let held =
                            inputs
                                .allocations
                                .entry(Arc::clone(&uid))
                                .or_insert_with(|| Held {
                                    owner: Arc::new(entry.owner.clone()),
                                    ips: Arc::new([]),
                                    traffic_policy: policy
                                        .flatten()
                                        .unwrap_or(TrafficPolicy::Cluster),
                                    at: entry.at,
                                    trace: String::new(),
                                });
                        held.trace = trace;
                        if !held.ips.iter().any(|a| a.ip == entry.ip)
                            && let Some(assigned) = assigned
                        {
                            let mut ips = held.ips.to_vec();
                            ips.push(assigned);
                            held.ips = ips.into();
                        }
                        held.at = held.at.max(entry.at);
                        inputs.set_owner(IpNet::from(entry.ip), uid);
                    }
                }
            }
            Event::Released(entry, _) => {
                debug_assert_eq!(entry.action, HistoryAction::Released);
                made_at = entry.at;
                cause = changes.get(&Subject::Owner(entry.owner.uid.clone()));
                let mut inputs = lock(&self.inputs);
                if let Some(held) = inputs.allocations.get_mut(entry.owner.uid.as_str()) {
                    held.ips = held
                        .ips
                        .iter()
                        .filter(|a| a.ip != entry.ip)
                        .cloned()
                        .collect();
                    if held.ips.is_empty() {
                        inputs.allocations.remove(entry.owner.uid.as_str());
                    }
                }
                let prefix = IpNet::from(entry.ip);
                if inputs
                    .owners
                    .get(&prefix)
                    .is_some_and(|owner| *owner.uid == *entry.owner.uid)
                {
                    inputs.owners.remove(&prefix);
                }
            }
            // Its addresses stay; its traffic policy may have changed.
            Event::Updated(entry, _) => {
                made_at = entry.at;
                cause = changes.get(&Subject::Owner(entry.owner.uid.clone()));
                let held = store.get_allocation(&entry.owner.uid).await?;
                let mut inputs = lock(&self.inputs);
                if let (Some(held), Some(known)) =
                    (held, inputs.allocations.get_mut(entry.owner.uid.as_str()))
                {
                    known.traffic_policy = held.traffic_policy;
                    known.at = known.at.max(entry.at);
                }
            }
            Event::NodeChanged { node, .. } | Event::NodeDeleted { node, .. } => {
                cause = changes.get(&Subject::Node(node.clone()));
                let doc = store.load_node(node).await?;
                let mut inputs = lock(&self.inputs);
                match doc {
                    Some(doc) => inputs.nodes.insert(node.clone(), decode(&doc)?),
                    None => inputs.nodes.remove(node),
                };
            }
            Event::EndpointsChanged { owner_uid, .. } => {
                let doc = store.load_endpoint(owner_uid).await?;
                cause = changes.get(&Subject::Endpoints(owner_uid.clone()));
                let mut inputs = lock(&self.inputs);
                match doc {
                    Some(doc) => {
                        made_at = doc.updated_at;
                        let endpoints: Endpoints = decode(&doc)?;
                        // Made through another replica: the watcher's own context.
                        if cause.is_none() {
                            cause = herald_telemetry::trace::span_context(&endpoints.traceparent);
                        }
                        inputs
                            .endpoints
                            .insert(owner_uid.clone(), (endpoints, doc.updated_at))
                    }
                    None => inputs.endpoints.remove(owner_uid),
                };
            }
            Event::PolicyChanged { .. } => {
                cause = changes.get(&Subject::Policy);
                let doc = store.load_policy().await?;
                let mut inputs = lock(&self.inputs);
                inputs.policy = doc.as_ref().map(decode).transpose()?;
                self.local_asn.store(asn_of(&inputs), Ordering::Relaxed);
            }
            // Pool changes matter for aggregation lengths; the pools come from the index.
            Event::PoolChanged { .. } | Event::PoolDeleted { .. } => {}
        }
        let mut inputs = lock(&self.inputs);
        // The owner's addresses, and the one released (its owner may hold no other).
        let owner_prefixes = match event {
            Event::Assigned(entry, _) | Event::Released(entry, _) | Event::Updated(entry, _) => {
                let mut prefixes = inputs.prefixes_of(&entry.owner.uid);
                prefixes.push(IpNet::from(entry.ip));
                prefixes
            }
            Event::EndpointsChanged { owner_uid, .. } => inputs.prefixes_of(owner_uid),
            _ => Vec::new(),
        };
        inputs.refresh_owners(owner_prefixes);
        inputs.revision = inputs.revision.max(revision);
        inputs.last_change_at = inputs.last_change_at.max(herald_ipam_store::now_micros());
        touched.made_at(made_at);
        Ok(cause)
    }

    /// Recomputes every node and publishes the ones whose set changed, for changes made
    /// at `changed_at` (unix µs) and since.
    fn recompute(&self, ipam: &Ipam, changed_at: i64) {
        let started = std::time::Instant::now();
        let inputs = lock(&self.inputs);
        let nodes: Vec<Node> = inputs.nodes.values().cloned().collect();
        // Also the status's list of every allocated Service, with or without a policy.
        let services: Vec<ServiceFacts> = inputs
            .allocations
            .iter()
            .map(|(uid, held)| inputs.facts_of(uid, held))
            .collect();
        let plan = match &inputs.policy {
            Some(policy) if !nodes.is_empty() => {
                let pools: Vec<herald_model::PoolSpec> =
                    ipam.index().pools().map(|(spec, _)| spec.clone()).collect();
                herald_routes::plan(&nodes, &services, policy, &pools)
            }
            // No policy (or no node): every known node has nothing to do.
            _ => Plan {
                nodes: nodes
                    .iter()
                    .map(|n| (n.name.clone(), NodeRoutes::default()))
                    .collect(),
                ..Plan::default()
            },
        };
        // A whole plan: each node's delta compares its whole set with the last.
        let whole = |channel: &mut NodeChannel, name: &str, routes: &Arc<NodeRoutes>| {
            publish(
                channel,
                name,
                &inputs,
                inputs.revision,
                changed_at,
                routes,
                None,
            );
        };
        let mut published = lock(&self.published);
        for (name, routes) in &plan.nodes {
            let channel = published.entry(name.clone()).or_default();
            whole(channel, name, &Arc::new(routes.clone()));
        }
        // Nodes that are gone get an empty set: everything they announced is withdrawn.
        let gone = Arc::new(NodeRoutes::default());
        for (name, channel) in published.iter_mut() {
            if !plan.nodes.contains_key(name) {
                whole(channel, name, &gone);
            }
        }
        drop(published);
        drop(inputs);
        *lock(&self.last_plan) = Arc::new(plan);
        *lock(&self.last_services) = Arc::new(services);
        crate::metrics::METRICS
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Sends `routes` to `node`'s subscribers unless it is what they already have: the new
/// snapshot becomes the current one, and every delta queue gets it with its delta.
fn publish(
    channel: &mut NodeChannel,
    node: &str,
    inputs: &Inputs,
    revision: i64,
    changed_at: i64,
    routes: &Arc<NodeRoutes>,
    changed_at_prefixes: Option<&BTreeSet<IpNet>>,
) {
    let sender = channel.current();
    let previous = sender.borrow().clone();
    if previous
        .as_ref()
        .is_some_and(|s| Arc::ptr_eq(&s.routes, routes) || s.routes == *routes)
    {
        return;
    }
    // Strictly increasing per node, so a delta always moves to a revision its client has
    // not seen (a reload can publish a changed set at the revision already published),
    // and at least 1, so a delta's from_revision is never 0 (which marks a snapshot).
    let revision = previous
        .as_ref()
        .map_or(revision.max(1), |p| revision.max(p.revision + 1));
    let delta = previous.as_ref().map(|p| Delta {
        from: p.revision,
        routes: match changed_at_prefixes {
            Some(prefixes) => herald_routes::delta_at(&p.routes, routes, prefixes),
            None => herald_routes::delta(&p.routes, routes),
        },
    });
    let provenance = Provenance {
        changed: previous
            .as_deref()
            .zip(delta.as_ref())
            .map(|(previous, delta)| changed_provenance(previous, &delta.routes, inputs))
            .unwrap_or_default(),
        owners: inputs.owners.clone(),
        newest_at: inputs.last_change_at,
    };
    // Routes over every session (a prefix on two sessions counts twice): counted without
    // collecting the node's prefixes.
    let prefixes: usize = routes.routes.values().map(|r| r.len()).sum();
    // A child of the recompute (the current span); the snapshot carries it to the speaker.
    let trace = if herald_telemetry::trace::enabled() {
        let span = tracing::info_span!(
            "routes.publish",
            herald.node = node,
            herald.revision = revision,
            herald.prefixes = prefixes,
        );
        herald_telemetry::trace::traceparent(&span)
    } else {
        String::new()
    };
    debug!(node, revision, prefixes, "new route set");
    crate::metrics::METRICS.snapshots_published.inc();
    let snapshot = Arc::new(NodeSnapshot {
        revision,
        published_at: herald_ipam_store::now_micros(),
        routes: Arc::clone(routes),
        provenance,
        trace,
        changed_at,
        delta,
    });
    // The current snapshot first: a stream that resyncs from it then skips the queued
    // deltas it already covers.
    sender.send_replace(Some(Arc::clone(&snapshot)));
    channel.queues.retain(|q| {
        match q.tx.try_send(Arc::clone(&snapshot)) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                q.overflowed.store(true, Ordering::Release);
                true
            }
            // The stream has ended.
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

/// The provenance of the routes `delta` (from the `previous` snapshot) sets, where it is not
/// their owner's last change: the prefixes that differ from it, so finding them costs the
/// change, not the set. Every other prefix of the new snapshot takes its owner's last
/// change ([`Provenance::get`]).
fn changed_provenance(
    previous: &NodeSnapshot,
    delta: &RoutesDelta,
    inputs: &Inputs,
) -> BTreeMap<IpNet, (String, i64)> {
    delta
        .peers
        .values()
        .flat_map(|d| d.set.keys())
        .filter_map(|prefix| {
            let change = change_of(previous, inputs, *prefix);
            (change != inputs.provenance(prefix)).then_some((*prefix, change))
        })
        .collect()
}

/// (traceparent, changed_at) of the change that put `prefix`, which differs from the
/// `previous` snapshot on some session, where it is: its owner's change when that is newer
/// than the previous snapshot; otherwise the newest change applied (a policy, node or pool
/// change, which carry no trace), never an older allocation's time.
fn change_of(previous: &NodeSnapshot, inputs: &Inputs, prefix: IpNet) -> (String, i64) {
    let (trace, at) = inputs.provenance(&prefix);
    if at > previous.published_at {
        (trace, at)
    } else {
        (String::new(), inputs.last_change_at)
    }
}

/// Most prefixes [`Patched`] looks up in a node's set to make its delta. A node's delta
/// is otherwise made by comparing its set with the last one, which walks the paths to
/// every difference and costs a few of these lookups for one, but far fewer than a
/// thousand Services' prefixes looked up on each of a thousand nodes.
const MAX_LOOKED_UP: usize = 64;

/// The nodes whose set the jobs applied together may have changed, and where.
#[derive(Debug)]
struct Patched {
    /// By node: whether its set may have changed anywhere (a node, policy or pool change,
    /// or everything at start) rather than only at `prefixes`.
    nodes: BTreeMap<String, bool>,
    /// Every prefix the jobs' Service changes touched (a Service touches its own prefixes
    /// and no others), while there are at most [`MAX_LOOKED_UP`]; `None` past that.
    prefixes: Option<BTreeSet<IpNet>>,
}

impl Patched {
    fn new() -> Self {
        Self {
            nodes: BTreeMap::new(),
            prefixes: Some(BTreeSet::new()),
        }
    }

    /// `nodes` may have changed anywhere.
    fn anywhere(&mut self, nodes: impl IntoIterator<Item = String>) {
        for node in nodes {
            self.nodes.insert(node, true);
        }
    }

    /// `nodes` changed where a Service change touched `prefixes`.
    fn at(&mut self, nodes: impl IntoIterator<Item = String>, prefixes: BTreeSet<IpNet>) {
        for node in nodes {
            self.nodes.entry(node).or_insert(false);
        }
        if let Some(all) = &mut self.prefixes {
            all.extend(prefixes);
            if all.len() > MAX_LOOKED_UP {
                self.prefixes = None;
            }
        }
    }

    /// Where the set of a node that may have changed `anywhere` can differ from its last:
    /// at these prefixes only, or (`None`) anywhere.
    fn at_prefixes(&self, anywhere: bool) -> Option<&BTreeSet<IpNet>> {
        if anywhere {
            None
        } else {
            self.prefixes.as_ref()
        }
    }
}

/// The subjects a burst of changes touched, for the incremental engine.
#[derive(Debug, Default)]
struct Touched {
    services: BTreeSet<String>,
    nodes: BTreeSet<String>,
    policy: bool,
    pools: bool,
    /// When the oldest change of the burst was made (unix µs): the snapshots it publishes
    /// are timed from it, so coalescing never shortens a measured latency.
    oldest_at: Option<i64>,
}

impl Touched {
    fn note(&mut self, event: &Event) {
        match event {
            Event::Assigned(entry, _) | Event::Released(entry, _) | Event::Updated(entry, _) => {
                self.services.insert(entry.owner.uid.clone());
            }
            Event::NodeChanged { node, .. } | Event::NodeDeleted { node, .. } => {
                self.nodes.insert(node.clone());
            }
            Event::EndpointsChanged { owner_uid, .. } => {
                self.services.insert(owner_uid.clone());
            }
            Event::PolicyChanged { .. } => self.policy = true,
            Event::PoolChanged { .. } | Event::PoolDeleted { .. } => self.pools = true,
        }
    }

    /// Notes a change of the burst made at `at` (unix µs).
    fn made_at(&mut self, at: i64) {
        self.oldest_at = Some(self.oldest_at.map_or(at, |oldest| oldest.min(at)));
    }
}

/// What the engine thread applies: the facts of what a burst touched, read from the
/// inputs on the async side.
/// A Service's facts with the owner uid the inputs keep, which the route state shares.
type KeyedFacts = (Arc<str>, ServiceFacts);

enum Batch {
    /// Everything, at start and after a reload.
    All {
        nodes: Vec<Node>,
        services: Vec<KeyedFacts>,
        policy: Option<BgpPolicy>,
        pools: Vec<herald_model::PoolSpec>,
    },
    Changes {
        /// By owner uid; `None`: it holds no address any more.
        services: Vec<(String, Option<KeyedFacts>)>,
        /// By name; `None`: deleted.
        nodes: Vec<(String, Option<Node>)>,
        policy: Option<Option<BgpPolicy>>,
        pools: Option<Vec<herald_model::PoolSpec>>,
    },
}

struct Job {
    batch: Batch,
    revision: i64,
    /// When the oldest change of the batch was made (unix µs).
    changed_at: i64,
    /// The recompute span, entered on the thread so publish spans stay its children.
    span: tracing::Span,
}

fn pools_of(ipam: &Ipam) -> Vec<herald_model::PoolSpec> {
    ipam.index().pools().map(|(spec, _)| spec.clone()).collect()
}

impl RouteEngine {
    fn batch_all(&self, ipam: &Ipam) -> (Batch, i64) {
        let inputs = lock(&self.inputs);
        (inputs.batch_all(pools_of(ipam)), inputs.revision)
    }

    fn batch_of(&self, ipam: &Ipam, touched: Touched) -> (Batch, i64) {
        let inputs = lock(&self.inputs);
        let batch = Batch::Changes {
            services: touched
                .services
                .into_iter()
                .map(|uid| {
                    let facts = inputs.keyed_facts(&uid);
                    (uid, facts)
                })
                .collect(),
            nodes: touched
                .nodes
                .into_iter()
                .map(|name| {
                    let node = inputs.nodes.get(&name).cloned();
                    (name, node)
                })
                .collect(),
            policy: touched.policy.then(|| inputs.policy.clone()),
            pools: touched.pools.then(|| pools_of(ipam)),
        };
        (batch, inputs.revision)
    }

    /// Applies the jobs queued together to `state`, in order, and publishes each node
    /// whose set changed once for all of them. Runs on the engine thread.
    fn apply_jobs(&self, state: &mut RouteState, jobs: Vec<Job>) {
        let started = std::time::Instant::now();
        let mut changed = Patched::new();
        let mut revision = 0;
        // The oldest change of them: coalescing never shortens a measured latency.
        let mut changed_at = i64::MAX;
        let mut first_span = None;
        for job in jobs {
            revision = revision.max(job.revision);
            changed_at = changed_at.min(job.changed_at);
            job.span
                .in_scope(|| self.patch(state, job.batch, &mut changed));
            first_span.get_or_insert(job.span);
        }
        // The publish spans are children of the first job's recompute span, whose change
        // is the oldest they carry.
        let span = first_span.unwrap_or_else(tracing::Span::none);
        span.in_scope(|| self.publish_changed(state, &changed, revision, changed_at));
        crate::metrics::METRICS
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Applies one batch to `state`, noting in `changed` the nodes whose set may have
    /// changed and where.
    fn patch(&self, state: &mut RouteState, batch: Batch, changed: &mut Patched) {
        match batch {
            Batch::All {
                nodes,
                services,
                policy,
                pools,
            } => {
                *state = RouteState::from_keyed_inputs(nodes, services, policy, pools);
                // Every node known before or now: publish skips the unchanged ones.
                let known = lock(&self.published).keys().cloned().collect::<Vec<_>>();
                let all = state.results().keys().cloned().chain(known);
                changed.anywhere(all);
            }
            Batch::Changes {
                services,
                nodes,
                policy,
                pools,
            } => {
                debug!(
                    services = services.len(),
                    nodes = nodes.len(),
                    policy = policy.is_some(),
                    pools = pools.is_some(),
                    "applying changes"
                );
                if let Some(pools) = pools {
                    changed.anywhere(state.set_pools(pools));
                }
                if let Some(policy) = policy {
                    changed.anywhere(state.set_policy(policy));
                }
                for (name, node) in nodes {
                    let nodes = match node {
                        Some(node) => state.upsert_node(node),
                        None => state.remove_node(&name),
                    };
                    changed.anywhere(nodes);
                }
                for (uid, facts) in services {
                    let prefixes = state.service_prefixes(&uid, facts.as_ref().map(|(_, f)| f));
                    let nodes = match facts {
                        Some((key, facts)) => state.upsert_service_as(key, facts),
                        None => state.remove_service(&uid),
                    };
                    changed.at(nodes, prefixes);
                }
            }
        }
    }

    /// Publishes the nodes of `changed` whose set differs from their last snapshot.
    fn publish_changed(
        &self,
        state: &RouteState,
        changed: &Patched,
        revision: i64,
        changed_at: i64,
    ) {
        debug!(
            revision,
            changed = changed.nodes.len(),
            "route state patched"
        );
        // Nodes that are gone get an empty set: everything they announced is withdrawn.
        let gone = Arc::new(NodeRoutes::default());
        for (name, anywhere) in &changed.nodes {
            let routes = state.node_routes(name).unwrap_or(&gone);
            // Held per node only, so the stream tasks reading the policy never wait long
            // (always the inputs before the published channels).
            let inputs = lock(&self.inputs);
            let mut published = lock(&self.published);
            let channel = published.entry(name.clone()).or_default();
            let at_prefixes = changed.at_prefixes(*anywhere);
            publish(
                channel,
                name,
                &inputs,
                revision,
                changed_at,
                routes,
                at_prefixes,
            );
        }
        *lock(&self.state) = Some(state.clone());
    }
}

/// Follows the feed until `shutdown`, recomputing after each burst of changes with the
/// engine `kind` chooses.
///
/// Applying a change may need a read (the allocation an `updated` entry names, a node's
/// document), and the store can be away right then, around a database crash say. The
/// change is delivered only once, so a failed read leaves the inputs missing it until a
/// reload succeeds: that reload is retried with backoff, without waiting for another
/// change, because none may come for the Service that missed its update.
pub async fn run(
    engine: Arc<RouteEngine>,
    ipam: Arc<Ipam>,
    kind: EngineKind,
    shutdown: CancellationToken,
) {
    let mut events = ipam.feed().subscribe();
    // The incremental engine's thread; it ends when `jobs` is dropped.
    let mut jobs: Option<mpsc::Sender<Job>> = None;
    let mut thread = None;
    match kind {
        EngineKind::Full => engine.recompute(&ipam, herald_ipam_store::now_micros()),
        EngineKind::Incremental => {
            let (tx, rx) = mpsc::channel::<Job>();
            let worker = Arc::clone(&engine);
            let spawned = std::thread::Builder::new()
                .name("route-engine".into())
                .spawn(move || {
                    let mut state = RouteState::new();
                    // Bounded by the sender: it ends when the feed loop drops it.
                    while let Ok(job) = rx.recv() {
                        // The jobs sent while the last turn computed are one turn: a
                        // thread that falls behind catches up in one publication.
                        let jobs = take_queued(job, || rx.try_recv().ok(), JOBS_PER_TURN);
                        worker.apply_jobs(&mut state, jobs);
                    }
                });
            match spawned {
                Ok(handle) => thread = Some(handle),
                Err(e) => {
                    warn!(error = %e, "cannot start the route engine thread");
                    return;
                }
            }
            let (batch, revision) = engine.batch_all(&ipam);
            let job = Job {
                batch,
                revision,
                changed_at: herald_ipam_store::now_micros(),
                span: tracing::Span::none(),
            };
            if tx.send(job).is_ok() {
                jobs = Some(tx);
            }
        }
    }
    // `Some` while the inputs miss a change: the pauses before the next reload attempt.
    let mut stale: Option<ExponentialBackoff> = None;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let retry = stale.is_some().then_some(retry_at);
        let Some(pending) = next_turn(&mut events, &shutdown, retry).await else {
            break;
        };
        let mut causes = Vec::new();
        let mut touched = Touched::default();
        let mut missed_change = false;
        for event in pending {
            match event {
                Ok(event) => match engine
                    .apply(ipam.store(), ipam.changes(), &event, &mut touched)
                    .await
                {
                    Ok(cause) => causes.extend(cause),
                    Err(e) => {
                        warn!(error = %e, revision = event.revision(), "applying a routing change failed; reloading");
                        missed_change = true;
                    }
                },
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "route engine fell behind the change feed; reloading"
                    );
                    missed_change = true;
                }
                Err(RecvError::Closed) => break,
            }
        }
        // One reload after the burst covers every change in it: it reads what is
        // committed now, which includes everything the feed has delivered.
        let mut reloaded = false;
        if missed_change || stale.is_some() {
            if reload(&engine, &ipam).await {
                reloaded = true;
                if stale.take().is_some() {
                    info!("routing inputs reloaded; the missed changes are applied");
                }
            } else {
                let pauses = stale.get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(RELOAD_RETRY_MIN)
                        .with_max_delay(RELOAD_RETRY_MAX)
                        .with_jitter()
                        .without_max_times()
                        .build()
                });
                retry_at = tokio::time::Instant::now() + pauses.next().unwrap_or(RELOAD_RETRY_MAX);
            }
        }
        let span = recompute_span(&causes);
        // A reload after a failed read has no change time of its own: now.
        let changed_at = touched
            .oldest_at
            .unwrap_or_else(herald_ipam_store::now_micros);
        match &jobs {
            None => span.in_scope(|| engine.recompute(&ipam, changed_at)),
            Some(tx) => {
                let (batch, revision) = if reloaded {
                    engine.batch_all(&ipam)
                } else {
                    engine.batch_of(&ipam, touched)
                };
                let job = Job {
                    batch,
                    revision,
                    changed_at,
                    span,
                };
                if tx.send(job).is_err() {
                    warn!("the route engine thread has stopped (its panic is logged above)");
                    break;
                }
            }
        }
    }
    drop(jobs);
    if let Some(thread) = thread {
        // The thread finishes the batch in hand, then sees the channel closed.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// The changes of the engine's next turn: the first to arrive, and with it whatever the
/// feed has already delivered, and no more. A lone change goes at once; the changes that
/// arrive while a turn runs make the next turn together. Empty when `retry` (a reload's
/// next attempt) comes first; `None` on shutdown.
async fn next_turn(
    events: &mut broadcast::Receiver<Arc<Event>>,
    shutdown: &CancellationToken,
    retry: Option<tokio::time::Instant>,
) -> Option<Vec<Result<Arc<Event>, RecvError>>> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        event = events.recv() => event,
        () = sleep_until(retry) => return Some(Vec::new()),
    };
    Some(take_queued(first, || next_queued(events), EVENTS_PER_TURN))
}

/// Sleeps until `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `first` and what `next` has queued behind it, at most `max` in all. Never waits: what
/// is not queued yet belongs to the next turn.
fn take_queued<T>(first: T, mut next: impl FnMut() -> Option<T>, max: usize) -> Vec<T> {
    let mut taken = vec![first];
    while taken.len() < max {
        match next() {
            Some(item) => taken.push(item),
            None => break,
        }
    }
    taken
}

/// The next change the feed has already delivered, if any. A lag is handed on like a
/// change (the turn then reloads); a closed feed ends the turn, and the next `recv`
/// sees it closed.
fn next_queued(
    events: &mut broadcast::Receiver<Arc<Event>>,
) -> Option<Result<Arc<Event>, RecvError>> {
    match events.try_recv() {
        Ok(event) => Some(Ok(event)),
        Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
        Err(TryRecvError::Empty | TryRecvError::Closed) => None,
    }
}

/// The span of one recomputation: a child of the first change it serves, linked to every
/// one (a burst of changes is computed once, and each change's trace still reaches the
/// snapshots it made). A disabled span while tracing is off.
fn recompute_span(causes: &[SpanContext]) -> tracing::Span {
    if !herald_telemetry::trace::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("routes.recompute", herald.changes = causes.len());
    if let Some(first) = causes.first() {
        herald_telemetry::trace::set_parent_context(&span, first);
    }
    herald_telemetry::trace::add_links(&span, causes);
    span
}

/// Replaces the inputs with what the store holds now; whether that worked.
async fn reload(engine: &RouteEngine, ipam: &Ipam) -> bool {
    match RouteEngine::load(ipam.store(), ipam.feed().delivered()).await {
        Ok(fresh) => {
            let fresh_inputs = std::mem::take(&mut *lock(&fresh.inputs));
            engine
                .local_asn
                .store(asn_of(&fresh_inputs), Ordering::Relaxed);
            *lock(&engine.inputs) = fresh_inputs;
            true
        }
        Err(e) => {
            warn!(error = %e, "reloading routing inputs failed; retrying");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use herald_api::routing::v1 as pb;
    use herald_model::Owner;

    fn change(revision: i64) -> Arc<Event> {
        Arc::new(Event::PoolChanged {
            revision,
            pool: "lab".into(),
        })
    }

    fn revisions(turn: Option<Vec<Result<Arc<Event>, RecvError>>>) -> Vec<i64> {
        turn.expect("a turn, not shutdown")
            .into_iter()
            .map(|e| e.expect("a change").revision())
            .collect()
    }

    /// On tokio's paused clock, which moves only while every task waits on a timer: a turn
    /// that waited for more changes would show it as time passed.
    #[tokio::test(start_paused = true)]
    async fn a_lone_change_makes_its_turn_at_once_and_queued_changes_make_one_turn() {
        let (tx, mut events) = broadcast::channel(64);
        let shutdown = CancellationToken::new();
        let start = tokio::time::Instant::now();
        tx.send(change(1)).unwrap();
        assert_eq!(
            revisions(next_turn(&mut events, &shutdown, None).await),
            [1]
        );
        assert_eq!(tokio::time::Instant::now(), start, "waited for company");

        // Delivered while the last turn ran: all of them in the next one.
        for revision in 2..=40 {
            tx.send(change(revision)).unwrap();
        }
        let turn = revisions(next_turn(&mut events, &shutdown, None).await);
        assert_eq!(turn, (2..=40).collect::<Vec<_>>());
        assert_eq!(tokio::time::Instant::now(), start);

        // A change that comes while the engine waits starts a turn alone; the one a
        // millisecond after it is the next turn's.
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            sender.send(change(41)).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            sender.send(change(42)).unwrap();
        });
        assert_eq!(
            revisions(next_turn(&mut events, &shutdown, None).await),
            [41]
        );
        assert_eq!(tokio::time::Instant::now(), start + Duration::from_secs(1));
        assert_eq!(
            revisions(next_turn(&mut events, &shutdown, None).await),
            [42]
        );

        // A reload's retry comes as an empty turn; shutdown ends the turns.
        let retry = tokio::time::Instant::now() + Duration::from_millis(100);
        assert_eq!(
            revisions(next_turn(&mut events, &shutdown, Some(retry)).await),
            [] as [i64; 0]
        );
        shutdown.cancel();
        assert!(next_turn(&mut events, &shutdown, None).await.is_none());
    }

    #[test]
    fn a_turn_is_bounded_and_passes_a_lag_on() {
        let (tx, mut events) = broadcast::channel(4);
        for revision in 1..=6 {
            tx.send(change(revision)).unwrap();
        }
        // The receiver missed 1 and 2: the turn starts with the lag (the engine reloads).
        let first = events.try_recv();
        assert!(matches!(first, Err(TryRecvError::Lagged(2))));
        let turn = take_queued(Err(RecvError::Lagged(2)), || next_queued(&mut events), 3);
        assert_eq!(turn.len(), 3, "at most the bound");
        assert!(matches!(turn[0], Err(RecvError::Lagged(2))));
        let rest = take_queued(Ok(change(0)), || next_queued(&mut events), 100);
        assert_eq!(rest.len(), 3, "the rest is the next turn's");
    }

    fn node(name: &str, address: &str) -> Node {
        crate::routing::convert::node_from_pb(pb::Node {
            name: name.into(),
            labels: Default::default(),
            addresses: vec![address.into()],
            ready: true,
        })
        .unwrap()
    }

    fn policy() -> BgpPolicy {
        super::cluster_probe::policy()
    }

    fn service(i: u8) -> (String, Option<KeyedFacts>) {
        let uid = format!("u{i}");
        let facts = ServiceFacts {
            owner: Arc::new(Owner {
                cluster_id: "c".into(),
                namespace: "ns".into(),
                name: format!("s{i}"),
                uid: uid.clone(),
            }),
            traffic_policy: TrafficPolicy::Cluster,
            nodes_with_ready_endpoints: BTreeSet::new(),
            ips: Arc::new([AssignedIp {
                ip: std::net::IpAddr::from([172, 16, 0, i]),
                pool: PoolName::parse("pool", "lab").unwrap(),
            }]),
        };
        let key = Arc::from(uid.as_str());
        (uid, Some((key, facts)))
    }

    fn job(batch: Batch, revision: i64) -> Job {
        Job {
            batch,
            revision,
            changed_at: revision,
            span: tracing::Span::none(),
        }
    }

    fn adding(i: u8) -> Job {
        let batch = Batch::Changes {
            services: vec![service(i)],
            nodes: Vec::new(),
            policy: None,
            pools: None,
        };
        job(batch, i64::from(i) + 1)
    }

    /// What the node's delta queue holds: (revision, prefixes, changed_at) per snapshot.
    fn published(queue: &mut DeltaQueue) -> Vec<(i64, usize, i64)> {
        std::iter::from_fn(|| queue.rx.try_recv().ok())
            .map(|s| (s.revision, s.routes.prefixes().len(), s.changed_at))
            .collect()
    }

    #[test]
    fn jobs_queued_together_publish_each_node_once() {
        let engine = RouteEngine::new(Inputs::default(), BTreeMap::new());
        let (_current, mut queue) = engine.subscribe_deltas("n0", 64);
        let mut state = RouteState::new();
        let start = Batch::All {
            nodes: vec![node("n0", "127.0.0.10")],
            services: Vec::new(),
            policy: Some(policy()),
            pools: Vec::new(),
        };
        engine.apply_jobs(&mut state, vec![job(start, 1)]);
        assert_eq!(published(&mut queue), [(1, 0, 1)]);

        // A lone job: one snapshot with its change.
        engine.apply_jobs(&mut state, vec![adding(1)]);
        assert_eq!(published(&mut queue), [(2, 1, 2)]);

        // Three jobs the thread found queued: one snapshot with all three changes, at the
        // newest revision, timed from the oldest change.
        engine.apply_jobs(&mut state, vec![adding(2), adding(3), adding(4)]);
        assert_eq!(published(&mut queue), [(5, 4, 3)]);

        // Jobs that cancel out publish nothing.
        let removing = |i: u8, revision| {
            let batch = Batch::Changes {
                services: vec![(format!("u{i}"), None)],
                nodes: Vec::new(),
                policy: None,
                pools: None,
            };
            job(batch, revision)
        };
        engine.apply_jobs(&mut state, vec![adding(9), removing(9, 11)]);
        assert_eq!(published(&mut queue), []);
    }
}

/// Where a snapshot's routes came from.
#[cfg(test)]
mod provenance_tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{IpAddr, Ipv4Addr};

    use herald_model::IpFamily;
    use herald_routes::{Origin, PeerRoutes, PeerSession, RouteAttrs};

    use super::*;

    fn session(name: &str) -> PeerSession {
        PeerSession {
            name: name.to_string(),
            address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            port: 179,
            peer_asn: 65000,
            local_asn: 65001,
            router_id: Ipv4Addr::new(127, 0, 0, 2),
            source_address: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            families: vec![IpFamily::V4],
            hold_time: 9,
            keepalive: 3,
            connect_retry: 1,
            md5_password: None,
            multihop_ttl: None,
            graceful_restart: false,
            restart_time: 0,
            passive: false,
            max_prefixes: None,
            bfd: None,
        }
    }

    fn routes(sessions: &[(&str, &[&str])]) -> NodeRoutes {
        let attrs = RouteAttrs {
            next_hop: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            origin: Origin::Igp,
            med: None,
            local_pref: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
        };
        NodeRoutes {
            peers: sessions.iter().map(|(name, _)| session(name)).collect(),
            routes: sessions
                .iter()
                .map(|(name, prefixes)| {
                    let set: PeerRoutes = prefixes
                        .iter()
                        .map(|p| (net(p), Arc::new(attrs.clone())))
                        .collect();
                    (name.to_string(), set)
                })
                .collect(),
        }
    }

    fn net(p: &str) -> IpNet {
        p.parse().expect("a prefix")
    }

    /// The inputs holding one Service per `(uid, address, changed_at)`, each allocation
    /// made with the trace `trace <uid>`.
    fn inputs_holding(services: &[(&str, &str, i64)]) -> Inputs {
        let mut inputs = Inputs::default();
        let pool = PoolName::parse("pool", "lab").unwrap();
        let mut held = Vec::new();
        for (uid, ip, at) in services {
            let owner = Owner {
                cluster_id: "c".into(),
                namespace: "ns".into(),
                name: (*uid).to_string(),
                uid: (*uid).to_string(),
            };
            let ips = vec![AssignedIp {
                ip: ip.parse().unwrap(),
                pool: pool.clone(),
            }];
            let trace = format!("trace {uid}");
            held.push(inputs.held(None, owner, ips, TrafficPolicy::Cluster, *at, trace));
        }
        inputs.hold_all(held);
        inputs
    }

    /// A snapshot tells each route where it came from: a prefix its delta sets, its
    /// owner's change when that is newer than the snapshot before and else the newest
    /// change (a node or policy change moved it); any other prefix, its owner's last change
    /// as of publication (an aggregate, which no Service owns: the newest change). Later
    /// changes leave a published snapshot's provenance as it was.
    #[test]
    fn provenance_is_the_deltas_own_and_else_the_owners_as_published() {
        let start = herald_ipam_store::now_micros();
        // Made before the first snapshot, except u5's.
        let mut inputs = inputs_holding(&[
            ("u1", "10.0.0.1", 10),
            ("u4", "10.0.0.4", 40),
            ("u5", "10.0.0.5", start + 1_000_000),
        ]);
        inputs.last_change_at = start + 2_000_000;
        let mut channel = NodeChannel::default();
        let old = routes(&[
            ("a", &["10.0.0.1/32", "10.0.0.0/24"]),
            ("b", &["10.0.0.3/32"]),
        ]);
        publish(&mut channel, "n", &inputs, 1, 0, &Arc::new(old), None);
        let new = routes(&[(
            "a",
            &["10.0.0.0/24", "10.0.0.1/32", "10.0.0.4/32", "10.0.0.5/32"],
        )]);
        publish(&mut channel, "n", &inputs, 2, 0, &Arc::new(new), None);
        let snapshot = channel.current().borrow().clone().unwrap();
        let delta = &snapshot.delta.as_ref().unwrap().routes;
        assert_eq!(
            delta.prefixes().collect::<BTreeSet<_>>(),
            [net("10.0.0.4/32"), net("10.0.0.5/32")].into(),
        );
        let got = |prefix: &str| {
            let (trace, at) = snapshot.provenance.get(&net(prefix));
            (trace.to_string(), at)
        };
        assert_eq!(
            got("10.0.0.1/32"),
            ("trace u1".into(), 10),
            "untouched: its owner's"
        );
        assert_eq!(
            got("10.0.0.4/32"),
            (String::new(), start + 2_000_000),
            "moved by a node"
        );
        assert_eq!(
            got("10.0.0.5/32"),
            ("trace u5".into(), start + 1_000_000),
            "its owner's change, newer than the snapshot before",
        );
        assert_eq!(
            got("10.0.0.0/24"),
            (String::new(), start + 2_000_000),
            "aggregate"
        );

        // u1's endpoints change: the next snapshot says so, the published one does not.
        let endpoints = Endpoints {
            traffic_policy: None,
            nodes: BTreeSet::new(),
            traceparent: "trace e1".into(),
        };
        inputs
            .endpoints
            .insert("u1".into(), (endpoints, start + 3_000_000));
        inputs.refresh_owners(inputs.prefixes_of("u1"));
        let later = Provenance {
            owners: inputs.owners.clone(),
            ..Provenance::default()
        };
        assert_eq!(
            later.get(&net("10.0.0.1/32")),
            ("trace e1", start + 3_000_000)
        );
        assert_eq!(got("10.0.0.1/32"), ("trace u1".into(), 10));

        // Released: no owner, so the newest change.
        inputs.allocations.remove("u1");
        inputs.refresh_owners([net("10.0.0.1/32")]);
        assert!(!inputs.owners.contains_key(&net("10.0.0.1/32")));
        assert_eq!(inputs.owners.len(), 2, "one entry per Service address held");
    }
}

/// Builds the engine's structures the way a start-up does, so a test can weigh them
/// (`tests/memory.rs`); nothing in the service calls it.
#[doc(hidden)]
pub mod memory_probe {
    use std::net::IpAddr;
    use std::sync::Arc;

    use herald_model::{AssignedIp, Owner, PoolName, PoolSpec, TrafficPolicy};
    use herald_routes::RouteState;

    use super::Inputs;

    /// The inputs of `n` Services holding one address each, made as a start-up makes
    /// them from the store's allocations, each keyed by what `key` gives for its uid (the
    /// uid the allocation index keeps, at start-up).
    pub fn inputs(
        n: u32,
        uid: impl Fn(u32) -> String,
        ip: impl Fn(u32) -> IpAddr,
        key: impl Fn(&str) -> Option<Arc<str>>,
    ) -> Inputs {
        let mut inputs = Inputs::default();
        let pool = PoolName::parse("pool", "bench").expect("a pool name");
        let mut held = Vec::with_capacity(n as usize);
        for i in 0..n {
            let owner = Owner {
                cluster_id: "bench".into(),
                namespace: "bench".into(),
                name: format!("svc-restart-{i}"),
                uid: uid(i),
            };
            let ips = vec![AssignedIp {
                ip: ip(i),
                pool: pool.clone(),
            }];
            let key = key(&owner.uid);
            held.push(inputs.held(key, owner, ips, TrafficPolicy::Cluster, 1, String::new()));
        }
        inputs.hold_all(held);
        inputs
    }

    /// The incremental engine's state over `inputs`, as its first batch builds it.
    pub fn state(inputs: &Inputs, pools: Vec<PoolSpec>) -> RouteState {
        let services = inputs
            .allocations
            .iter()
            .map(|(uid, held)| (Arc::clone(uid), inputs.facts_of(uid, held)))
            .collect();
        RouteState::from_keyed_inputs(Vec::new(), services, None, pools)
    }

    pub fn services(state: &RouteState) -> usize {
        state.services().count()
    }
}

/// A cluster as `herald-bench scale` makes it, held by the route engine the way a replica
/// holds it (inputs, incremental state, every node's published snapshot), with the
/// benchmark's churn, so a test can weigh the per-node route sets (`tests/route_memory.rs`);
/// nothing in the service calls it.
#[doc(hidden)]
pub mod cluster_probe {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use herald_api::routing::v1 as pb;
    use herald_model::{AssignedIp, Owner, PoolName, TrafficPolicy};
    use herald_routes::{Node, RouteState};
    use ipnet::IpNet;

    use super::{Batch, Endpoints, Inputs, Job, RouteEngine};

    /// Endpoint nodes of each `Local` Service, as in the benchmark.
    const ENDPOINTS_PER_LOCAL: usize = 3;

    pub struct Cluster {
        engine: Arc<RouteEngine>,
        state: RouteState,
        nodes: usize,
        services: usize,
        /// Changes applied so far (each one a revision and a change time).
        changes: usize,
        /// Endpoint moves so far, per `Local` Service.
        moves: BTreeMap<usize, usize>,
    }

    fn node_name(i: usize) -> String {
        format!("s{i:05}")
    }

    fn node(i: usize, ready: bool) -> Node {
        Node {
            name: node_name(i),
            labels: BTreeMap::new(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(
                127,
                2,
                u8::try_from(i / 250).unwrap_or(u8::MAX),
                u8::try_from(i % 250 + 1).unwrap_or(u8::MAX),
            ))],
            ready,
        }
    }

    fn uid(k: usize) -> String {
        format!("scale-{k:08}")
    }

    fn ip(k: usize) -> IpAddr {
        let k = u32::try_from(k).unwrap_or(u32::MAX);
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + k))
    }

    /// Service `k` is `Local` when odd.
    fn is_local(k: usize) -> bool {
        k % 2 == 1
    }

    fn endpoints(k: usize, moves: usize, nodes: usize) -> BTreeSet<String> {
        (0..ENDPOINTS_PER_LOCAL)
            .map(|j| {
                node_name((k * 7 + moves * 13 + j * (nodes / ENDPOINTS_PER_LOCAL).max(1)) % nodes)
            })
            .collect()
    }

    /// One eBGP peer at 127.0.0.1:1790, every pool advertised.
    pub(crate) fn policy() -> herald_routes::BgpPolicy {
        let policy = pb::BgpPolicy {
            local_asn: 65010,
            peers: vec![pb::Peer {
                name: "tor".into(),
                address: "127.0.0.1".into(),
                asn: 65001,
                port: 1790,
                ..Default::default()
            }],
            advertisements: vec![pb::Advertisement::default()],
            ..Default::default()
        };
        crate::routing::convert::policy_from_pb(policy, &[], None).expect("a valid policy")
    }

    fn owner(k: usize) -> Owner {
        Owner {
            cluster_id: "bench".into(),
            namespace: "bench".into(),
            name: format!("svc-{k}"),
            uid: uid(k),
        }
    }

    fn endpoints_doc(k: usize, moves: usize, nodes: usize) -> Endpoints {
        Endpoints {
            traffic_policy: Some(TrafficPolicy::Local),
            nodes: endpoints(k, moves, nodes),
            traceparent: String::new(),
        }
    }

    /// `nodes` nodes, all Ready and peering with one ToR; `services` Services holding one
    /// address each, every odd one `Local` with endpoints on 3 nodes; each node's set
    /// computed and published.
    pub fn cluster(nodes: usize, services: usize) -> Cluster {
        cluster_grown(nodes, services, services)
    }

    /// [`cluster`] as the benchmark makes it: the first `at_start` Services there when
    /// the engine starts, the others allocated after, `batch` at a time (each batch one
    /// change of the feed).
    pub fn cluster_grown(nodes: usize, services: usize, at_start: usize) -> Cluster {
        let pool = PoolName::parse("pool", "bench").expect("a pool name");
        let mut inputs = Inputs {
            policy: Some(policy()),
            ..Inputs::default()
        };
        for i in 0..nodes {
            inputs.nodes.insert(node_name(i), node(i, true));
        }
        let mut held = Vec::with_capacity(services);
        for k in 0..at_start.min(services) {
            held.push(enter_service(&mut inputs, k, nodes, &pool, 1));
        }
        inputs.hold_all(held);
        let batch = inputs.batch_all(Vec::new());
        let engine = RouteEngine::new(inputs, BTreeMap::new());
        let mut state = RouteState::new();
        engine.apply_jobs(&mut state, vec![job(batch, 1)]);
        let mut revision = 1;
        for first in (at_start..services).step_by(GROWN_BATCH) {
            let mut facts = Vec::new();
            {
                let mut inputs = super::lock(&engine.inputs);
                for k in first..(first + GROWN_BATCH).min(services) {
                    // Made now, as the feed's allocations are: after the snapshots
                    // before them.
                    let at = herald_ipam_store::now_micros();
                    let (key, held) = enter_service(&mut inputs, k, nodes, &pool, at);
                    inputs.allocations.insert(Arc::clone(&key), held);
                    inputs.set_owner(IpNet::from(ip(k)), key);
                    facts.push((uid(k), inputs.keyed_facts(&uid(k))));
                }
            }
            revision += 1;
            let batch = Batch::Changes {
                services: facts,
                nodes: Vec::new(),
                policy: None,
                pools: None,
            };
            engine.apply_jobs(&mut state, vec![job(batch, revision)]);
        }
        Cluster {
            engine,
            state,
            nodes,
            services,
            changes: 0,
            moves: BTreeMap::new(),
        }
    }

    /// The benchmark's Service `k` as an allocation made at `at`: `Local` ones (every
    /// other) get their endpoints on 3 of the `nodes` first.
    fn enter_service(
        inputs: &mut Inputs,
        k: usize,
        nodes: usize,
        pool: &PoolName,
        at: i64,
    ) -> (Arc<str>, super::Held) {
        let traffic_policy = if is_local(k) {
            inputs
                .endpoints
                .insert(uid(k), (endpoints_doc(k, 0, nodes), 1));
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
        let ips = vec![AssignedIp {
            ip: ip(k),
            pool: pool.clone(),
        }];
        inputs.held(None, owner(k), ips, traffic_policy, at, String::new())
    }

    /// Services per batch when a cluster is grown: AllocateBatch's limit.
    const GROWN_BATCH: usize = 1000;

    fn job(batch: Batch, revision: i64) -> Job {
        Job {
            batch,
            revision,
            changed_at: herald_ipam_store::now_micros(),
            span: tracing::Span::none(),
        }
    }

    impl Cluster {
        /// Routes over every node's sessions.
        pub fn routes(&self) -> usize {
            self.state
                .results()
                .values()
                .flat_map(|r| r.routes.routes.values())
                .map(|set| set.len())
                .sum()
        }

        /// Nodes with a published snapshot.
        pub fn published(&self) -> usize {
            super::lock(&self.engine.published)
                .values()
                .filter(|c| c.current.as_ref().is_some_and(|s| s.borrow().is_some()))
                .count()
        }

        /// The benchmark's next change, one at a time, in its mix (endpoints : Cluster :
        /// node = 2 : 1 : 1): a `Local` Service's endpoints move; a `Cluster` Service is
        /// released, or allocated again; a node turns not Ready, or Ready again.
        pub fn change(&mut self) {
            let i = self.changes;
            self.changes += 1;
            let revision = i64::try_from(i).unwrap_or(i64::MAX) + 2;
            let now = herald_ipam_store::now_micros();
            let mut services = Vec::new();
            let mut nodes = Vec::new();
            {
                let mut inputs = super::lock(&self.engine.inputs);
                match i % 4 {
                    0 | 1 => {
                        let k = (i * 7919 % self.services) | 1;
                        let k = if k < self.services { k } else { 1 };
                        let moves = self.moves.entry(k).or_default();
                        *moves += 1;
                        inputs
                            .endpoints
                            .insert(uid(k), (endpoints_doc(k, *moves, self.nodes), now));
                        let prefixes = inputs.prefixes_of(&uid(k));
                        inputs.refresh_owners(prefixes);
                        services.push((uid(k), inputs.keyed_facts(&uid(k))));
                    }
                    2 => {
                        let k = (i * 104_729 % self.services) & !1;
                        let prefix = IpNet::from(ip(k));
                        if inputs.allocations.remove(uid(k).as_str()).is_some() {
                            inputs.owners.remove(&prefix);
                        } else {
                            let ips = vec![AssignedIp {
                                ip: ip(k),
                                pool: PoolName::parse("pool", "bench").expect("a pool name"),
                            }];
                            let (key, held) = inputs.held(
                                None,
                                owner(k),
                                ips,
                                TrafficPolicy::Cluster,
                                now,
                                String::new(),
                            );
                            inputs.allocations.insert(Arc::clone(&key), held);
                            inputs.set_owner(prefix, key);
                        }
                        inputs.refresh_owners([prefix]);
                        services.push((uid(k), inputs.keyed_facts(&uid(k))));
                    }
                    _ => {
                        // The same node twice running: not Ready, then Ready again.
                        let n = i / 8 % self.nodes;
                        let name = node_name(n);
                        let ready = inputs.nodes.get(&name).is_some_and(|n| !n.ready);
                        inputs.nodes.insert(name.clone(), node(n, ready));
                        nodes.push((name.clone(), inputs.nodes.get(&name).cloned()));
                    }
                }
                inputs.revision = revision;
                inputs.last_change_at = now;
            }
            let batch = Batch::Changes {
                services,
                nodes,
                policy: None,
                pools: None,
            };
            self.engine
                .apply_jobs(&mut self.state, vec![job(batch, revision)]);
        }
    }
}
