//! What the leader does, on kube-runtime's [`Controller`]: Services are reconciled by key
//! (an EndpointSlice maps to its Service, a Namespace to its Services), Nodes by name,
//! each read from the caches the watch streams fill. Before any Service is reconciled the
//! start-up barrier runs: claim the addresses already in Service status, then allocate
//! for pending Services, then garbage-collect. The leader also follows herald-ipam's change
//! stream, so a Service that waits for an address retries as soon as one can exist (a
//! pool created or changed, an address released).
//!
//! A watch that the API server refuses with 403 Forbidden (a missing RBAC permission)
//! makes the watcher not ready, naming the resource and verb, until the watch works.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use herald_api::ipam::v1 as ipam;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as routing;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_telemetry::trace::Inject;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::batch::{AllocateCall, Batcher, EndpointsCall};
use crate::mapping::{
    self, AllocateErrorKind, ClassPolicy, FailureReason, Outcome, our_condition, status_ips,
};
use crate::rbac::{Permission, Refusals};
use crate::retry::{Backoff, PerObject};
use crate::slice_index::SliceIndex;

/// Shortest and longest wait before a Service whose handling failed is tried again.
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long a burst of IPAM changes is gathered before waiting Services are re-queued.
const PENDING_COALESCE: Duration = Duration::from_millis(100);
/// Allocations listed per ListAllocations page.
const LIST_PAGE: u32 = 1000;
/// The component named on Events.
const COMPONENT: &str = "herald-cluster-watcher";
/// The resources the leader watches, as RBAC names them.
const WATCHED: [&str; 4] = ["services", "endpointslices", "namespaces", "nodes"];
/// Field manager for status writes.
const FIELD_MANAGER: &str = "herald-cluster-watcher";
/// Status patches and Events sent to the API server at once, whatever the reconciles in
/// flight (`workers`): kube-apiserver answers 429 beyond its
/// `--max-mutating-requests-inflight` (200 by default, shared with every other client),
/// and a few dozen writes in flight already keep a burst moving.
pub const KUBE_WRITES_IN_FLIGHT: usize = 100;

#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_id: String,
    pub classes: ClassPolicy,
    pub workers: usize,
    /// Most Allocate requests per AllocateBatch call; 1: one Allocate per Service.
    pub allocate_batch_max: usize,
    /// Most Services per SetServiceEndpointsBatch call; 1: one SetServiceEndpoints each.
    pub endpoints_batch_max: usize,
    pub identity: String,
    pub resync: Duration,
    pub imports: crate::policy::Imports,
    /// Set ready once the caches are synced and the start-up pass is done.
    pub readiness: herald_telemetry::admin::Readiness,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IPAM {call}: {status}")]
    Ipam {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("Kubernetes {verb} {resource}: {source}")]
    Kube {
        verb: &'static str,
        resource: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the caches stopped before they were filled")]
    CachesStopped,
}

impl Error {
    /// The permission the API server refused, if that is what failed.
    fn refused(&self) -> Option<Permission> {
        match self {
            Self::Kube {
                verb,
                resource,
                source,
            } if crate::rbac::forbidden(source) => Some(Permission::new(verb, *resource)),
            _ => None,
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn ipam_err(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| {
        crate::metrics::count_ipam_error(call, status.code());
        Error::Ipam { call, status }
    }
}

/// What the leader's caches and controllers hold, for the metrics endpoint.
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    pub pending: HashMap<&'static str, usize>,
    pub services_in_flight: usize,
    pub nodes_in_flight: usize,
}

/// The running leader's context, while there is one; the metrics read it at scrape time.
static LEADING: Mutex<Option<std::sync::Weak<Ctx>>> = Mutex::new(None);

/// The leader's pending Services by reason and its reconciles in flight; `None` on a
/// standby and until the caches are synced.
pub(crate) fn scrape() -> Option<Scrape> {
    let ctx = lock(&LEADING).as_ref()?.upgrade()?;
    if !ctx.is_started() {
        return None;
    }
    let mut scrape = Scrape {
        services_in_flight: ctx.services_in_flight.load(Ordering::SeqCst),
        nodes_in_flight: ctx.nodes_in_flight.load(Ordering::SeqCst),
        ..Scrape::default()
    };
    for svc in ctx.services.state() {
        if ctx.settings.classes.serves(&svc) && status_ips(&svc).is_empty() {
            let reason = our_condition(&svc).map(|c| c.reason.as_str());
            *scrape
                .pending
                .entry(crate::metrics::pending_reason(reason))
                .or_default() += 1;
        }
    }
    Some(scrape)
}

/// A Service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    fn of(svc: &Service) -> Option<Self> {
        Some(Self {
            namespace: svc.metadata.namespace.clone()?,
            name: svc.metadata.name.clone()?,
        })
    }

    fn object_ref(&self) -> ObjectRef<Service> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Start-up: claim what the Service's status shows, and write nothing on failure (the
    /// next pass handles it).
    Import,
    Normal,
}

struct Ctx {
    client: kube::Client,
    ipam: IpamClient<Inject<Channel>>,
    /// Allocate calls of concurrent reconciles, coalesced into AllocateBatch calls.
    batcher: Batcher<AllocateCall>,
    /// Their SetServiceEndpoints calls, coalesced into SetServiceEndpointsBatch calls.
    endpoints: Batcher<EndpointsCall>,
    routing: RoutingClient<Inject<Channel>>,
    settings: Settings,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    /// Which uid holds an allocation under each Service name. Rebuilt from the IPAM
    /// service at start; kept to release a re-created Service's old address.
    held: Mutex<HashMap<ServiceKey, String>>,
    /// The last Allocate answered per owner uid, so an unchanged request is not sent again
    /// (the reconcile that follows the watcher's own status write, the start-up pass
    /// after the claims, the controller's first pass after the barrier).
    allocated: Mutex<AllocatedCache>,
    /// What was last sent per owner uid / node, so unchanged facts are not sent again.
    sent_endpoints: Mutex<HashMap<String, (i32, Vec<String>)>>,
    sent_nodes: Mutex<HashMap<String, routing::Node>>,
    /// Which EndpointSlices belong to which Service, following the slices' watch.
    slice_index: Mutex<SliceIndex>,
    /// The resourceVersion each Service had when its status was last patched, until the
    /// cache shows a newer one.
    written_over: Mutex<HashMap<ServiceKey, String>>,
    /// The retry backoff of each Service and each Node failing in a row.
    service_retries: PerObject<ServiceKey>,
    node_retries: PerObject<String>,
    /// Services to reconcile again by name (waiting ones when addresses were freed, the
    /// old Service of a slice that moved); the Service controller reads the other end.
    requeue: mpsc::UnboundedSender<ObjectRef<Service>>,
    /// The start-up barrier: false until every address in Service status is claimed.
    started: tokio::sync::watch::Sender<bool>,
    /// The watched resources whose first list is in the caches. (Not the stores' own
    /// `wait_until_ready`: it wakes one waiter only, and the controllers wait on it too.)
    listed: tokio::sync::watch::Sender<HashSet<&'static str>>,
    /// Permissions the API server refuses; the readiness follows them.
    refusals: Arc<Refusals>,
    services_in_flight: AtomicUsize,
    nodes_in_flight: AtomicUsize,
    gc_wanted: Notify,
    node_sync_wanted: Notify,
    /// herald-ipam gained addresses (a pool created or changed, an address released by
    /// someone else): Services still waiting should try again.
    pending_wanted: Notify,
    /// Bounds the status patches and Events in flight ([`KUBE_WRITES_IN_FLIGHT`]).
    kube_writes: tokio::sync::Semaphore,
    /// The custom resources' reconcilers.
    resources: Arc<crate::resources::Resources>,
    recorder: kube::runtime::events::Recorder,
}

/// The last Allocate herald-ipam answered per owner uid, with its outcome. Any doubt
/// empties it: an address released (by anyone: herald-ipam's change stream shows it), a
/// pool changed, that stream reconnecting, and every resync period, so each Service is
/// still checked against herald-ipam at least every second resync.
#[derive(Debug, Default)]
struct AllocatedCache {
    by_uid: HashMap<String, (ipam::AllocateRequest, Outcome)>,
    /// Bumped by every invalidation: the answer to a call sent before one is not kept.
    epoch: u64,
}

impl AllocatedCache {
    fn answered(&self, uid: &str, req: &ipam::AllocateRequest) -> Option<Outcome> {
        self.by_uid
            .get(uid)
            .filter(|(asked, _)| asked == req)
            .map(|(_, outcome)| outcome.clone())
    }

    fn keep(&mut self, epoch: u64, uid: &str, req: ipam::AllocateRequest, outcome: &Outcome) {
        if epoch == self.epoch {
            self.by_uid.insert(uid.to_string(), (req, outcome.clone()));
        }
    }

    fn forget(&mut self, uid: &str) {
        self.by_uid.remove(uid);
        self.epoch += 1;
    }

    fn clear(&mut self) {
        self.by_uid.clear();
        self.epoch += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs as the leader until `cancel` fires or a fatal error.
pub async fn run(
    client: kube::Client,
    channel: Channel,
    settings: Settings,
    cancel: CancellationToken,
) -> Result<()> {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
    let (requeue, requeued) = mpsc::unbounded_channel();
    let refusals = Refusals::new(settings.readiness.clone());
    let resources = crate::resources::Resources::new(
        client.clone(),
        channel.clone(),
        settings.imports,
        &settings.identity,
        Arc::clone(&refusals),
    );
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: COMPONENT.into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        resources,
        recorder,
        client: client.clone(),
        // Every call carries the reconcile's span as its W3C trace context.
        ipam: IpamClient::new(Inject::new(channel.clone())),
        batcher: Batcher::new(
            AllocateCall(IpamClient::new(Inject::new(channel.clone()))),
            settings.allocate_batch_max,
        ),
        endpoints: Batcher::new(
            EndpointsCall(RoutingClient::new(Inject::new(channel.clone()))),
            settings.endpoints_batch_max,
        ),
        allocated: Mutex::new(AllocatedCache::default()),
        routing: RoutingClient::new(Inject::new(channel)),
        settings,
        services: services.clone(),
        slices,
        nodes: nodes.clone(),
        namespaces,
        held: Mutex::new(HashMap::new()),
        sent_endpoints: Mutex::new(HashMap::new()),
        slice_index: Mutex::new(SliceIndex::default()),
        written_over: Mutex::new(HashMap::new()),
        sent_nodes: Mutex::new(HashMap::new()),
        service_retries: PerObject::new(MIN_RETRY, MAX_RETRY),
        node_retries: PerObject::new(MIN_RETRY, MAX_RETRY),
        requeue,
        started: tokio::sync::watch::Sender::new(false),
        listed: tokio::sync::watch::Sender::new(HashSet::new()),
        refusals,
        services_in_flight: AtomicUsize::new(0),
        nodes_in_flight: AtomicUsize::new(0),
        gc_wanted: Notify::new(),
        node_sync_wanted: Notify::new(),
        pending_wanted: Notify::new(),
        kube_writes: tokio::sync::Semaphore::new(KUBE_WRITES_IN_FLIGHT),
    });

    let services_stream = watched(
        WATCHED[0],
        &ctx,
        services_writer,
        Api::<Service>::all(client.clone()),
        |ctx, event| match event {
            // A deleted Service has nothing left to reconcile: what it held is garbage.
            watcher::Event::Delete(_) => ctx.gc_wanted.notify_one(),
            watcher::Event::InitDone if ctx.is_started() => {
                info!("services listed again; collecting garbage");
                ctx.gc_wanted.notify_one();
            }
            _ => {}
        },
    );
    let slices_stream = watched(
        WATCHED[1],
        &ctx,
        slices_writer,
        Api::<EndpointSlice>::all(client.clone()),
        Ctx::index_slice,
    );
    let namespaces_stream = watched(
        WATCHED[2],
        &ctx,
        namespaces_writer,
        Api::<Namespace>::all(client.clone()),
        |_, _| {},
    );
    let nodes_stream = watched(
        WATCHED[3],
        &ctx,
        nodes_writer,
        Api::<Node>::all(client),
        |ctx, event| match event {
            // A deleted Node cannot be reconciled by name: the sync removes it.
            watcher::Event::Delete(_) => ctx.node_sync_wanted.notify_one(),
            watcher::Event::InitDone if ctx.is_started() => ctx.node_sync_wanted.notify_one(),
            _ => {}
        },
    );

    let workers = u16::try_from(ctx.settings.workers.max(1)).unwrap_or(u16::MAX);
    let services_in_namespace = services.clone();
    let services_controller = Controller::for_stream(services_stream, services)
        .with_config(controller::Config::default().concurrency(workers))
        .watches_stream(slices_stream, |slice: EndpointSlice| {
            mapping::slice_service(&slice)
                .map(|(namespace, name)| ObjectRef::new(&name).within(&namespace))
        })
        // Namespace labels can make a pending Service servable.
        .watches_stream(namespaces_stream, move |ns: Namespace| {
            let namespace = ns.metadata.name.unwrap_or_default();
            services_in_namespace
                .state()
                .iter()
                .filter(|svc| svc.metadata.namespace.as_deref() == Some(namespace.as_str()))
                .map(|svc| ObjectRef::from_obj(svc.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(stream::unfold(requeued, |mut requeued| async move {
            requeued.recv().await.map(|obj| (obj, requeued))
        }))
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(reconcile_service, service_error_policy, Arc::clone(&ctx))
        .for_each(|result| async move { log_controller("Service", result) });
    let nodes_controller = Controller::for_stream(nodes_stream, nodes)
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(reconcile_node, node_error_policy, Arc::clone(&ctx))
        .for_each(|result| async move { log_controller("Node", result) });

    // Every task dies with this set: losing the lease stops all work at once.
    let mut tasks = JoinSet::new();
    tasks.spawn(services_controller);
    tasks.spawn(nodes_controller);

    tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        ready = wait_until_ready(&ctx) => ready?,
    }
    info!(
        services = ctx.services.state().len(),
        endpoint_slices = ctx.slices.state().len(),
        nodes = ctx.nodes.state().len(),
        "initial lists done"
    );
    // Pools (Herald's and imported ones) exist before any address is claimed from them.
    tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        () = resources_start_up(&ctx) => {}
    }
    tasks.spawn(Arc::clone(&ctx.resources).run(cancel.child_token()));
    *lock(&LEADING) = Some(Arc::downgrade(&ctx));
    // Followed from before the start-up pass: a release the pass does not make itself
    // must reach the remembered Allocate answers.
    tasks.spawn(follow_ipam(Arc::clone(&ctx)));
    tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        () = start_up(&ctx) => {}
    }

    tasks.spawn(gc_loop(Arc::clone(&ctx)));
    tasks.spawn(node_sync_loop(Arc::clone(&ctx)));
    tasks.spawn(resync_loop(Arc::clone(&ctx)));
    tasks.spawn(pending_loop(Arc::clone(&ctx)));
    cancel.cancelled().await;
    Ok(())
}

/// A watch of `api` into its cache (`writer`), re-listing and re-watching on its own (410
/// Gone included) with backoff. Each event is shown to `on_event` once the cache holds it;
/// a failure is logged (a refused permission fails the readiness) and not passed on, so
/// one failing watch never holds up the controller's other triggers.
fn watched<K>(
    resource: &'static str,
    ctx: &Arc<Ctx>,
    writer: reflector::store::Writer<K>,
    api: Api<K>,
    mut on_event: impl FnMut(&Ctx, &watcher::Event<K>) + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let ctx = Arc::clone(ctx);
    ctx.refusals
        .observe(resource.to_string(), events)
        .inspect(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                ctx.listed.send_modify(|listed| {
                    listed.insert(resource);
                });
            }
            on_event(&ctx, event);
        })
        .map(Ok::<_, watcher::Error>)
        .touched_objects()
}

fn log_controller<K, E1, E2>(
    kind: &str,
    result: Result<(ObjectRef<K>, Action), controller::Error<E1, E2>>,
) where
    K: kube::Resource,
    E1: std::error::Error,
    E2: std::error::Error,
{
    match result {
        Ok(_) => {}
        // A deleted object: nothing to reconcile (garbage collection and the node sync
        // handle what it leaves behind).
        Err(controller::Error::ObjectNotFound(obj)) => debug!(kind, object = %obj, "gone"),
        // Logged by the error policy.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(e) => warn!(kind, error = %e, "controller"),
    }
}

async fn reconcile_service(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action> {
    let Some(key) = ServiceKey::of(&svc) else {
        return Ok(Action::await_change());
    };
    ctx.services_in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&ctx.services_in_flight);
    // Nothing is allocated before every address already in Service status is claimed.
    ctx.wait_started().await;
    ctx.handle(&key, Phase::Normal).await?;
    // Every Service is handled again this often, repairing anything a lost event or a
    // failed write left behind (and retrying Services that failed for lack of addresses).
    Ok(Action::requeue(ctx.settings.resync))
}

/// A failed Service is retried with backoff, per Service (the controller keeps one
/// requeue per object, so a retry replaces the resync).
fn service_error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let Some(key) = ServiceKey::of(&svc) else {
        return Action::await_change();
    };
    let delay = ctx.service_retries.failed(&key);
    warn!(
        k8s.namespace.name = %key.namespace,
        k8s.service.name = %key.name,
        error = %error,
        retry_in = ?delay,
        "handling the Service failed"
    );
    Action::requeue(delay)
}

async fn reconcile_node(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action> {
    let Some(name) = node.metadata.name.clone() else {
        return Ok(Action::await_change());
    };
    ctx.nodes_in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&ctx.nodes_in_flight);
    let span = info_span!("node", herald.node = %name);
    ctx.reconcile_node(&name).instrument(span).await?;
    ctx.node_retries.succeeded(&name);
    Ok(Action::requeue(ctx.settings.resync))
}

fn node_error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let name = node.metadata.name.clone().unwrap_or_default();
    let delay = ctx.node_retries.failed(&name);
    warn!(herald.node = %name, error = %error, retry_in = ?delay, "node update failed");
    Action::requeue(delay)
}

/// Counts a reconcile in flight until dropped (also when its future is cancelled).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Until the four caches hold their first list.
async fn wait_until_ready(ctx: &Ctx) -> Result<()> {
    let mut listed = ctx.listed.subscribe();
    listed
        .wait_for(|listed| listed.len() == WATCHED.len())
        .await
        .map(|_| ())
        .map_err(|_| Error::CachesStopped)
}

/// Applies the custom resources' pools and BGP policy, until the IPAM service answers and
/// the API server lets them be read.
async fn resources_start_up(ctx: &Arc<Ctx>) {
    const HOLDER: &str = "start-up: the custom resources";
    let mut backoff = Backoff::new(MIN_RETRY, MAX_RETRY);
    loop {
        match ctx.resources.start_up().await {
            Ok(()) => {
                ctx.refusals.clear(HOLDER);
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                match e.refused() {
                    Some(permission) => ctx.refusals.refuse(permission, HOLDER, &e),
                    None => {
                        warn!(error = %e, retry_in = ?delay, "applying the custom resources failed");
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The start-up barrier: every address already in a Service's status is claimed before
/// any new one is handed out, so an existing Service never changes address and a pending
/// one can never take it. Retries until the IPAM service answers. The Service controller
/// has queued every Service meanwhile; its reconciles wait for this.
async fn start_up(ctx: &Arc<Ctx>) {
    let mut backoff = Backoff::new(MIN_RETRY, MAX_RETRY);
    loop {
        match start_up_once(ctx).await {
            Ok(()) => break,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "start-up pass failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
    ctx.started.send_replace(true);
    ctx.refusals.started();
    info!("start-up done; handling changes");
}

async fn start_up_once(ctx: &Arc<Ctx>) -> Result<()> {
    // What the IPAM service holds for this cluster, by Service name.
    let allocations = ctx.list_allocations().await?;
    {
        let mut held = lock(&ctx.held);
        held.clear();
        for a in &allocations {
            if let Some(o) = &a.owner {
                held.insert(
                    ServiceKey {
                        namespace: o.namespace.clone(),
                        name: o.name.clone(),
                    },
                    o.uid.clone(),
                );
            }
        }
    }

    // 1. Claim every address already in a served Service's status.
    let with_status: Vec<ServiceKey> = ctx
        .services
        .state()
        .iter()
        .filter(|s| ctx.settings.classes.serves(s) && !status_ips(s).is_empty())
        .filter_map(|s| ServiceKey::of(s))
        .collect();
    info!(
        services = with_status.len(),
        "claiming the addresses already in Service status"
    );
    let failed = ctx.reconcile_all(with_status, Phase::Import).await;
    if let Some(e) = failed.into_iter().next() {
        // The barrier holds only if every claim was answered.
        return Err(e);
    }

    // 2. Everything else: pending Services, changed ones, and names that hold an
    // allocation but whose Service is gone or no longer ours.
    let mut keys: HashSet<ServiceKey> = ctx
        .services
        .state()
        .iter()
        .filter_map(|s| ServiceKey::of(s))
        .collect();
    keys.extend(lock(&ctx.held).keys().cloned());
    info!(services = keys.len(), "allocating for pending Services");
    for e in ctx
        .reconcile_all(keys.into_iter().collect(), Phase::Normal)
        .await
    {
        // The controller handles every Service again once the barrier lifts.
        warn!(error = %e, "a Service could not be handled at start; it will be retried");
    }

    // 3. Allocations whose Service is gone.
    ctx.collect_garbage().await?;
    ctx.sync_nodes().await?;
    Ok(())
}

/// `work`, its time counted as a reconcile step (where the reconciles' time goes).
async fn timed<T>(step: &'static str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = work.await;
    crate::metrics::observe_step(step, started.elapsed().as_secs_f64());
    out
}

async fn gc_loop(ctx: Arc<Ctx>) {
    loop {
        ctx.gc_wanted.notified().await;
        if let Err(e) = ctx.collect_garbage().await {
            warn!(error = %e, "garbage collection failed; it runs again at the next re-list or resync");
        }
    }
}

async fn node_sync_loop(ctx: Arc<Ctx>) {
    loop {
        ctx.node_sync_wanted.notified().await;
        if let Err(e) = ctx.sync_nodes().await {
            warn!(error = %e, "node sync failed");
        }
    }
}

/// Follows herald-ipam's change stream for what can serve a waiting Service: a pool
/// created or changed (through any client), or an address released (by another cluster or
/// watcher). Without it such a Service would wait for the next resync.
async fn follow_ipam(ctx: Arc<Ctx>) {
    let mut backoff = Backoff::new(MIN_RETRY, MAX_RETRY);
    let mut reconnecting = false;
    // Ends with the task set, at shutdown; every turn either streams or waits a backoff.
    loop {
        let mut client = ctx.ipam.clone();
        // Always from now (0), never resuming from a revision: a revision may since have
        // been compacted out of IPAM's change log (OUT_OF_RANGE), and the pass on
        // reconnecting below already covers whatever the stream missed.
        match client.watch(ipam::WatchRequest { after_revision: 0 }).await {
            Ok(stream) => {
                backoff.reset();
                // Whatever changed while the stream was down is not replayed: look once.
                // Not on the first connection: the start-up pass has just handled every
                // waiting Service.
                if reconnecting {
                    lock(&ctx.allocated).clear();
                    ctx.pending_wanted.notify_one();
                }
                reconnecting = true;
                let mut stream = stream.into_inner();
                loop {
                    match stream.next().await {
                        Some(Ok(change)) => {
                            ctx.resources.ipam_changed.notify_one();
                            forget_changed(&ctx, &change);
                            if frees_addresses(&change) {
                                ctx.pending_wanted.notify_one();
                            }
                        }
                        Some(Err(status)) => {
                            warn!(error = %status, "IPAM change stream failed; reconnecting");
                            break;
                        }
                        None => {
                            debug!("IPAM change stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(status) => warn!(error = %status, "IPAM Watch failed; retrying"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Forgets the remembered Allocate answers a change may have made stale: the released
/// owner's, or all of them when a pool changed.
fn forget_changed(ctx: &Ctx, change: &ipam::WatchResponse) {
    use ipam::history_entry::Action;
    use ipam::watch_response::Change;
    match &change.change {
        Some(Change::Allocation(entry)) if entry.action() == Action::Released => {
            if let Some(owner) = &entry.owner {
                lock(&ctx.allocated).forget(&owner.uid);
            }
        }
        Some(Change::PoolChanged(_) | Change::PoolDeleted(_)) => lock(&ctx.allocated).clear(),
        Some(Change::Allocation(_)) | None => {}
    }
}

/// Whether a change can make room for a Service that failed to get an address.
fn frees_addresses(change: &ipam::WatchResponse) -> bool {
    use ipam::history_entry::Action;
    use ipam::watch_response::Change;
    match &change.change {
        Some(Change::PoolChanged(_)) => true,
        Some(Change::Allocation(entry)) => entry.action() == Action::Released,
        Some(Change::PoolDeleted(_)) | None => false,
    }
}

/// Re-queues waiting Services when herald-ipam gained addresses, at most once per
/// [`PENDING_COALESCE`]: a burst of releases costs one pass, not one per release.
async fn pending_loop(ctx: Arc<Ctx>) {
    loop {
        ctx.pending_wanted.notified().await;
        tokio::time::sleep(PENDING_COALESCE).await;
        ctx.requeue_pending();
    }
}

/// Every so often the garbage collection and the node sync run again, repairing anything
/// a lost event left behind. (Each Service and Node is requeued by its own controller.)
async fn resync_loop(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.settings.resync);
    tick.tick().await;
    loop {
        tick.tick().await;
        lock(&ctx.allocated).clear();
        ctx.gc_wanted.notify_one();
        ctx.node_sync_wanted.notify_one();
    }
}

impl Ctx {
    async fn reconcile_all(self: &Arc<Self>, keys: Vec<ServiceKey>, phase: Phase) -> Vec<Error> {
        let workers = self.settings.workers.max(1);
        stream::iter(keys)
            .map(|key| {
                let ctx = Arc::clone(self);
                async move { ctx.handle(&key, phase).await.err() }
            })
            .buffer_unordered(workers)
            .filter_map(|e| async move { e })
            .collect()
            .await
    }

    /// Handles one Service in its span; the controller's error policy retries a failure.
    async fn handle(self: &Arc<Self>, key: &ServiceKey, phase: Phase) -> Result<()> {
        let span = info_span!(
            "reconcile",
            k8s.namespace.name = %key.namespace,
            k8s.service.name = %key.name,
            uid = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self.reconcile(key, phase).instrument(span.clone()).await;
        crate::metrics::observe_reconcile(result.is_ok(), started.elapsed().as_secs_f64());
        // A refused write (the status) keeps the watcher not ready until this Service's
        // handling succeeds.
        let holder = format!("Service/{}/{}", key.namespace, key.name);
        match &result {
            Ok(()) => {
                self.service_retries.succeeded(key);
                self.refusals.clear(&holder);
            }
            Err(e) => {
                if let Some(permission) = e.refused() {
                    self.refusals.refuse(permission, &holder, e);
                }
            }
        }
        result
    }

    async fn reconcile(&self, key: &ServiceKey, phase: Phase) -> Result<()> {
        let svc = self.services.get(&key.object_ref());
        let live_uid = svc.as_ref().and_then(|s| s.metadata.uid.clone());
        let served = svc
            .as_ref()
            .is_some_and(|s| self.settings.classes.serves(s));
        let held_uid = lock(&self.held).get(key).cloned();
        if let Some(old) = held_uid
            && (!served || live_uid.as_ref() != Some(&old))
        {
            let reason = if live_uid.as_ref() == Some(&old) {
                "the Service is no longer a LoadBalancer of this class"
            } else {
                "the Service was deleted"
            };
            self.release(&old, reason).await?;
            lock(&self.held).remove(key);
            lock(&self.sent_endpoints).remove(&old);
            info!(uid = %old, reason, "released");
            self.requeue_pending();
        }
        let Some(svc) = svc else {
            lock(&self.written_over).remove(key);
            return Ok(());
        };
        if !served {
            // Never touch a Service that is not ours, unless it carries what we wrote
            // while it was.
            if our_condition(&svc).is_some() {
                self.clear_status(&svc).await?;
            }
            return Ok(());
        }
        let Some(uid) = live_uid else { return Ok(()) };
        tracing::Span::current().record("uid", uid.as_str());
        // The Allocate carries the traffic policy, and herald-ipam routes a Local Service
        // only from the nodes it knows to have endpoints: a Service that already holds
        // its address (and so may be announced) has its endpoints sent first, or a flip to
        // Local reaching herald-ipam before them would withdraw it everywhere until they
        // came.
        if lock(&self.held).get(key) == Some(&uid) {
            self.send_endpoints(key, &svc, &uid).await?;
        }
        let outcome = self.allocate(key, &svc, &uid, phase).await?;
        // Deleted while its Allocate was on the way (queued for a batch, or in flight):
        // the collection its deletion started may have listed the allocations before
        // this one was committed, so it is collected again.
        let live = self.services.get(&key.object_ref());
        if live.as_ref().and_then(|s| s.metadata.uid.as_deref()) != Some(uid.as_str()) {
            self.gc_wanted.notify_one();
        }
        if phase == Phase::Import && matches!(outcome, Outcome::Failed { .. }) {
            debug!(?outcome, "claim failed; the pending pass handles it");
            return Ok(());
        }
        let changed = self.write_status(&svc, &outcome).await?;
        // The Event (best effort) and the endpoints go out together: a burst's Services
        // each wait one round trip less.
        let event = async {
            if let Some(message) = changed {
                self.record_event(&svc, outcome.event_type(), outcome.event_reason(), &message)
                    .await;
            }
        };
        let endpoints = async {
            if matches!(outcome, Outcome::Allocated { .. }) {
                self.send_endpoints(key, &svc, &uid).await
            } else {
                Ok(())
            }
        };
        let ((), sent) = tokio::join!(event, endpoints);
        sent
    }

    async fn allocate(
        &self,
        key: &ServiceKey,
        svc: &Service,
        uid: &str,
        phase: Phase,
    ) -> Result<Outcome> {
        let ns_labels: BTreeMap<String, String> = self
            .namespaces
            .get(&ObjectRef::new(&key.namespace))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        let explicit = match mapping::requested_ips(svc) {
            Ok(ips) => ips,
            Err(e) => {
                return Ok(Outcome::Failed {
                    reason: FailureReason::InvalidRequest,
                    message: e.to_string(),
                });
            }
        };
        let holds = lock(&self.held).contains_key(key);
        let status = status_ips(svc);
        // An address already in the status is claimed at start, and whenever this
        // watcher does not know the Service to hold one (it may have written it before a
        // crash) unless the Service asks for other addresses.
        let claim: Vec<String> = match phase {
            Phase::Import => status,
            Phase::Normal if !holds && explicit.is_empty() => status,
            Phase::Normal => Vec::new(),
        };
        let cluster_id = &self.settings.cluster_id;
        let request = |claim: &[String]| {
            mapping::allocate_request(svc, cluster_id, &ns_labels, claim).map_err(|e| {
                Outcome::Failed {
                    reason: FailureReason::InvalidRequest,
                    message: e.to_string(),
                }
            })
        };
        let req = match request(&claim) {
            Ok(req) => req,
            Err(outcome) => return Ok(outcome),
        };
        if holds && let Some(outcome) = lock(&self.allocated).answered(uid, &req) {
            debug!("Allocate unchanged since herald-ipam last answered it");
            return Ok(outcome);
        }
        // A claim that herald-ipam granted as it stood is what the Service's own request
        // would get too: that request is the one remembered, so the passes after start-up
        // find it unchanged.
        let remembered = if !claim.is_empty() && explicit.is_empty() {
            request(&[]).ok()
        } else {
            None
        };
        let epoch = lock(&self.allocated).epoch;
        let first = timed("allocate", self.batcher.submit(req.clone())).await;
        let status = match first {
            Ok(allocation) => {
                let outcome = self.allocated(key, uid, Some(allocation));
                let granted_as_claimed = outcome.ingress_ips().iter().collect::<HashSet<_>>()
                    == claim.iter().collect::<HashSet<_>>();
                let req = match remembered {
                    Some(own) if granted_as_claimed => own,
                    _ => req,
                };
                lock(&self.allocated).keep(epoch, uid, req, &outcome);
                return Ok(outcome);
            }
            Err(status) => status,
        };
        let kind = mapping::classify(status.code(), status.message());
        if kind != AllocateErrorKind::Transient {
            // A refusal (no pool, pool full, …) is a failed call too; a transient one is
            // counted by `ipam_err`.
            crate::metrics::count_ipam_error("Allocate", status.code());
        }
        match kind {
            AllocateErrorKind::Transient => return Err(ipam_err("Allocate")(status)),
            // A claim that fails at start is left to the pending pass, which sees the
            // whole picture (what the owner holds, what the Service asks for).
            AllocateErrorKind::Mismatch | AllocateErrorKind::Failed(_)
                if phase == Phase::Import =>
            {
                return Ok(Outcome::Failed {
                    reason: FailureReason::InvalidRequest,
                    message: status.message().to_string(),
                });
            }
            AllocateErrorKind::Mismatch => {
                // Allocations never move: the old address goes first.
                self.release(uid, "the Service's request changed").await?;
                lock(&self.held).remove(key);
                lock(&self.sent_endpoints).remove(uid);
                info!(
                    error = status.message(),
                    "released: the Service asks for something else now"
                );
                self.requeue_pending();
            }
            // The status showed addresses this Service cannot have (not in any pool, or
            // taken); outside start-up it gets what it would get without them.
            AllocateErrorKind::Failed(_) if !claim.is_empty() && explicit.is_empty() => {}
            AllocateErrorKind::Failed(reason) => {
                return Ok(Outcome::Failed {
                    reason,
                    message: status.message().to_string(),
                });
            }
        }
        let req = match request(&[]) {
            Ok(req) => req,
            Err(outcome) => return Ok(outcome),
        };
        let epoch = lock(&self.allocated).epoch;
        match timed("allocate", self.batcher.submit(req.clone())).await {
            Ok(allocation) => {
                let outcome = self.allocated(key, uid, Some(allocation));
                lock(&self.allocated).keep(epoch, uid, req, &outcome);
                Ok(outcome)
            }
            Err(status) => match mapping::classify(status.code(), status.message()) {
                AllocateErrorKind::Failed(reason) => Ok(Outcome::Failed {
                    reason,
                    message: status.message().to_string(),
                }),
                AllocateErrorKind::Mismatch | AllocateErrorKind::Transient => {
                    Err(ipam_err("Allocate")(status))
                }
            },
        }
    }

    fn allocated(
        &self,
        key: &ServiceKey,
        uid: &str,
        allocation: Option<ipam::Allocation>,
    ) -> Outcome {
        lock(&self.held).insert(key.clone(), uid.to_string());
        let ips = allocation.map(|a| a.ips).unwrap_or_default();
        Outcome::Allocated {
            ips: ips.iter().map(|i| i.ip.clone()).collect(),
            pools: ips.iter().map(|i| i.pool.clone()).collect(),
        }
    }

    async fn release(&self, uid: &str, reason: &str) -> Result<()> {
        lock(&self.allocated).forget(uid);
        let req = ipam::ReleaseRequest {
            owner_uid: uid.to_string(),
            reason: reason.to_string(),
        };
        match self.ipam.clone().release(req).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(ipam_err("Release")(status)),
        }
    }

    /// Writes the addresses and the condition, when they differ from what the Service
    /// shows; when the condition changed, the message its Event is to carry.
    async fn write_status(&self, svc: &Service, outcome: &Outcome) -> Result<Option<String>> {
        let previous = our_condition(svc);
        let condition = mapping::condition(
            outcome,
            svc.metadata.generation,
            previous,
            Time(Timestamp::now()),
        );
        let want_ips = outcome.ingress_ips();
        if previous.is_some_and(|p| mapping::same_condition(p, &condition))
            && status_ips(svc) == want_ips
        {
            return Ok(None);
        }
        if self.already_written_over(svc) {
            return Ok(None);
        }
        let mut conditions: Vec<_> = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ != mapping::CONDITION_TYPE)
            .collect();
        conditions.push(condition.clone());
        let ingress = if want_ips.is_empty() {
            serde_json::Value::Null
        } else {
            json!(
                want_ips
                    .iter()
                    .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
                    .collect::<Vec<_>>()
            )
        };
        let patch = json!({
            "metadata": {"resourceVersion": svc.metadata.resource_version},
            "status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions},
        });
        if !timed("status", self.patch_status(svc, &patch)).await? {
            return Ok(None);
        }
        self.remember_written_over(svc);
        let changed = previous.is_none_or(|p| {
            p.status != condition.status
                || p.reason != condition.reason
                || p.message != condition.message
        });
        if !changed {
            return Ok(None);
        }
        let (_, _, message) = outcome.condition_parts();
        match outcome {
            Outcome::Allocated { .. } => info!(%message, "allocated"),
            Outcome::Failed { reason, .. } => {
                warn!(reason = reason.as_str(), %message, "allocation failed")
            }
        }
        Ok(Some(message))
    }

    /// Whether the watcher already patched the status over this very version of `svc`:
    /// the cache has not seen that write yet, and a patch computed from it would only be
    /// refused. The write's own watch event brings the Service back with the fresh version.
    fn already_written_over(&self, svc: &Service) -> bool {
        let Some(key) = ServiceKey::of(svc) else {
            return false;
        };
        let mut written = lock(&self.written_over);
        match written.get(&key) {
            Some(over) if Some(over) == svc.metadata.resource_version.as_ref() => true,
            Some(_) => {
                // The cache has moved past our write; forget it.
                written.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_written_over(&self, svc: &Service) {
        if let (Some(key), Some(version)) = (ServiceKey::of(svc), &svc.metadata.resource_version) {
            lock(&self.written_over).insert(key, version.clone());
        }
    }

    /// Removes what the watcher wrote on a Service that is no longer served.
    async fn clear_status(&self, svc: &Service) -> Result<()> {
        if self.already_written_over(svc) {
            return Ok(());
        }
        let others: Vec<_> = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ != mapping::CONDITION_TYPE)
            .collect();
        let patch = json!({
            "metadata": {"resourceVersion": svc.metadata.resource_version},
            "status": {
                "loadBalancer": {"ingress": null},
                "conditions": if others.is_empty() { serde_json::Value::Null } else { json!(others) },
            },
        });
        if self.patch_status(svc, &patch).await? {
            self.remember_written_over(svc);
            self.record_event(
                svc,
                "Normal",
                "IPReleased",
                "released: the Service is no longer a LoadBalancer of this class",
            )
            .await;
        }
        Ok(())
    }

    /// A JSON merge patch of the status, guarded by the resourceVersion it was computed
    /// from. `false` when the Service is gone.
    async fn patch_status(&self, svc: &Service, patch: &serde_json::Value) -> Result<bool> {
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        // The semaphore is never closed.
        let _write = self.kube_writes.acquire().await;
        match api.patch_status(name, &params, &Patch::Merge(patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(source) => Err(Error::Kube {
                verb: "patch",
                resource: "services/status",
                source,
            }),
        }
    }

    /// Events are best effort: a failure is logged, never retried. kube-runtime's
    /// Recorder writes events.k8s.io/v1 Events and counts a repeat as a series of the
    /// first instead of a new object.
    async fn record_event(&self, svc: &Service, type_: &str, reason: &str, message: &str) {
        use kube::Resource as _;
        let event = kube::runtime::events::Event {
            type_: if type_ == "Warning" {
                kube::runtime::events::EventType::Warning
            } else {
                kube::runtime::events::EventType::Normal
            },
            reason: reason.into(),
            note: Some(message.into()),
            action: "Allocate".into(),
            secondary: None,
        };
        let publish = async {
            // The semaphore is never closed.
            let _write = self.kube_writes.acquire().await;
            self.recorder.publish(&event, &svc.object_ref(&())).await
        };
        if let Err(e) = timed("event", publish).await {
            warn!(error = %e, reason, "could not record an Event");
        }
    }

    /// Sends the Service's traffic policy and the nodes with ready or serving endpoints,
    /// when they changed since last sent.
    async fn send_endpoints(&self, key: &ServiceKey, svc: &Service, uid: &str) -> Result<()> {
        let names = lock(&self.slice_index).slices_of(&key.namespace, &key.name);
        // The store can be one event ahead of the index; the label decides.
        let slices: Vec<_> = names
            .iter()
            .filter_map(|name| {
                self.slices
                    .get(&ObjectRef::new(name).within(&key.namespace))
            })
            .filter(|s| {
                mapping::slice_service(s)
                    .is_some_and(|(ns, n)| ns == key.namespace && n == key.name)
            })
            .collect();
        let nodes: Vec<String> = mapping::endpoint_nodes(slices.iter().map(|s| s.as_ref()))
            .into_iter()
            .collect();
        let policy = mapping::traffic_policy(svc) as i32;
        let facts = (policy, nodes);
        if lock(&self.sent_endpoints).get(uid) == Some(&facts) {
            return Ok(());
        }
        let req = routing::ServiceEndpoints {
            owner_uid: uid.to_string(),
            traffic_policy: policy,
            endpoint_nodes: facts.1.clone(),
            // The routes these endpoints make join this reconcile's trace.
            traceparent: herald_telemetry::trace::traceparent(&tracing::Span::current()),
        };
        timed("endpoints", self.endpoints.submit(req))
            .await
            .map_err(ipam_err("SetServiceEndpoints"))?;
        debug!(nodes = ?facts.1, "endpoints sent");
        lock(&self.sent_endpoints).insert(uid.to_string(), facts);
        Ok(())
    }

    async fn reconcile_node(&self, name: &str) -> Result<()> {
        match self.nodes.get(&ObjectRef::new(name)) {
            Some(node) => {
                let node = mapping::node(&node);
                if lock(&self.sent_nodes).get(name) == Some(&node) {
                    return Ok(());
                }
                self.routing
                    .clone()
                    .upsert_node(node.clone())
                    .await
                    .map_err(ipam_err("UpsertNode"))?;
                debug!(ready = node.ready, addresses = ?node.addresses, "node sent");
                lock(&self.sent_nodes).insert(name.to_string(), node);
            }
            None => {
                self.routing
                    .clone()
                    .delete_node(routing::DeleteNodeRequest {
                        name: name.to_string(),
                    })
                    .await
                    .map_err(ipam_err("DeleteNode"))?;
                info!("node deleted");
                lock(&self.sent_nodes).remove(name);
            }
        }
        Ok(())
    }

    /// Deletes every node the IPAM service knows that Kubernetes does not (a deleted Node
    /// leaves nothing for its controller to reconcile).
    async fn sync_nodes(&self) -> Result<()> {
        let known = self
            .routing
            .clone()
            .list_nodes(routing::ListNodesRequest {})
            .await
            .map_err(ipam_err("ListNodes"))?
            .into_inner()
            .nodes;
        for node in known {
            if self.nodes.get(&ObjectRef::new(&node.name)).is_none() {
                let span = info_span!("node", herald.node = %node.name);
                self.reconcile_node(&node.name).instrument(span).await?;
            }
        }
        Ok(())
    }

    async fn list_allocations(&self) -> Result<Vec<ipam::Allocation>> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .ipam
                .clone()
                .list_allocations(ipam::ListAllocationsRequest {
                    cluster_id: self.settings.cluster_id.clone(),
                    page_size: LIST_PAGE,
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(ipam_err("ListAllocations"))?
                .into_inner();
            all.extend(page.allocations);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// Releases every allocation of this cluster whose owner is not a live, served
    /// Service. The list is read before the cache is, so an allocation made meanwhile
    /// belongs to a Service the cache already shows: a live one is never released.
    async fn collect_garbage(&self) -> Result<()> {
        let allocations = self.list_allocations().await?;
        let live: HashSet<String> = self
            .services
            .state()
            .iter()
            .filter(|s| self.settings.classes.serves(s))
            .filter_map(|s| s.metadata.uid.clone())
            .collect();
        let gone: Vec<ipam::Owner> = allocations
            .into_iter()
            .filter_map(|a| a.owner)
            .filter(|o| !live.contains(&o.uid))
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        info!(
            count = gone.len(),
            "releasing allocations whose Service is gone"
        );
        stream::iter(gone)
            .map(|owner| async move {
                let span = info_span!(
                    "reconcile",
                    k8s.namespace.name = %owner.namespace,
                    k8s.service.name = %owner.name,
                    uid = %owner.uid,
                );
                self.release(
                    &owner.uid,
                    "garbage collection: the Service is gone or no longer served",
                )
                .instrument(span)
                .await?;
                let key = ServiceKey {
                    namespace: owner.namespace,
                    name: owner.name,
                };
                let mut held = lock(&self.held);
                if held.get(&key) == Some(&owner.uid) {
                    held.remove(&key);
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.settings.workers.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        self.requeue_pending();
        Ok(())
    }

    /// Addresses were freed: Services still waiting for one try again.
    fn requeue_pending(&self) {
        if !self.is_started() {
            return;
        }
        for svc in self.services.state() {
            if self.settings.classes.serves(&svc) && status_ips(&svc).is_empty() {
                // The receiver lives as long as the controller; after it, nothing waits.
                let _ = self.requeue.send(ObjectRef::from_obj(svc.as_ref()));
            }
        }
    }

    fn is_started(&self) -> bool {
        *self.started.borrow()
    }

    async fn wait_started(&self) {
        let mut started = self.started.subscribe();
        // The sender lives in `self`, so the wait ends only when the barrier lifts.
        let _ = started.wait_for(|started| *started).await;
    }

    /// Follows the EndpointSlice watch into the index of slices by Service; a slice that
    /// moved to another Service changes the endpoints of the one it left too.
    fn index_slice(&self, event: &watcher::Event<EndpointSlice>) {
        let slice = match event {
            watcher::Event::Init => return lock(&self.slice_index).relist_started(),
            watcher::Event::InitDone => return lock(&self.slice_index).relist_done(),
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s) => {
                s
            }
        };
        let (Some(namespace), Some(name)) = (
            slice.metadata.namespace.as_deref(),
            slice.metadata.name.as_deref(),
        ) else {
            return;
        };
        let service = mapping::slice_service(slice).map(|(_, service)| service);
        let before = {
            let mut index = lock(&self.slice_index);
            match event {
                watcher::Event::Delete(_) => index.delete(namespace, name),
                watcher::Event::InitApply(_) => {
                    index.relisted(namespace, name, service.as_deref());
                    None
                }
                _ => index.apply(namespace, name, service.as_deref()),
            }
        };
        // The Service it belongs to now is triggered by the controller's mapping.
        if let Some((namespace, old)) = before
            && service.as_deref() != Some(old.as_str())
        {
            let _ = self.requeue.send(ObjectRef::new(&old).within(&namespace));
        }
    }
}
