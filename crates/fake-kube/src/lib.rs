//! A fake Kubernetes API server for tests: real HTTP on loopback, objects in memory.
//!
//! No kube-apiserver can be installed where Herald's tests run, so the cluster watcher is
//! tested against this. It speaks enough of the real protocol that an unmodified kube-rs
//! client works against it:
//!
//! - list (with `resourceVersion` in the list metadata), get, create, update (PUT), patch
//!   (JSON merge, strategic merge served as JSON merge, and server-side apply with per-field
//!   conflict detection), delete, and the `/status` subresource;
//! - watch with `resourceVersion`: changes are replayed from a history, `ADDED`/`MODIFIED`/
//!   `DELETED` events stream as JSON lines, `BOOKMARK`s are sent when asked for, and a
//!   resourceVersion older than the history is answered with a 410 Gone `ERROR` event;
//! - one resourceVersion counter for all objects, as etcd has.
//!
//! Tests drive it through [`FakeKube`]: create, change and delete objects, read them back,
//! read Events, compact the history (so watchers must re-list), and count requests by verb.

mod error;
pub mod resource;
mod server;
mod store;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

pub use error::ApiError;
pub use resource::{
    CONFIG_MAPS, CUSTOM_RESOURCE_DEFINITIONS, ENDPOINT_SLICES, EVENTS, EVENTS_V1, LEASES,
    NAMESPACES, NODES, Resource, SECRETS, SERVICES,
};
pub use server::{RequestRecord, Verb};
pub use store::{ChangeType, PatchKind, merge_patch};

use store::{Part, Store};

pub(crate) struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RequestRecord>>,
    /// Bumped to end every open watch with 410 Gone.
    expire: watch::Sender<u64>,
    open_watches: AtomicUsize,
    /// (verb, resource plural) pairs answered 403 Forbidden, as RBAC would.
    denied: Mutex<std::collections::HashSet<(Verb, &'static str)>>,
    /// Writes being answered now, and the most there ever were at once.
    writes_in_flight: AtomicUsize,
    max_writes_in_flight: AtomicUsize,
    /// How long each write waits before it is answered, in microseconds (a loaded API
    /// server); 0: none.
    write_delay_us: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves the map consistent enough for a test.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn requests(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, record: RequestRecord) {
        self.requests().push(record);
    }

    pub(crate) fn denied(&self, verb: Verb, resource: Resource) -> bool {
        self.denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&(verb, resource.plural))
    }

    fn open_watch(&self) -> WatchGuard<'_> {
        self.open_watches.fetch_add(1, Ordering::SeqCst);
        WatchGuard(&self.open_watches)
    }

    /// Counts a write in flight until dropped.
    pub(crate) fn start_write(&self) -> WatchGuard<'_> {
        let now = self.writes_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_writes_in_flight.fetch_max(now, Ordering::SeqCst);
        WatchGuard(&self.writes_in_flight)
    }

    pub(crate) fn write_delay(&self) -> Duration {
        Duration::from_micros(self.write_delay_us.load(Ordering::SeqCst))
    }
}

/// Decrements its counter when dropped (an open watch, a write in flight).
pub(crate) struct WatchGuard<'a>(&'a AtomicUsize);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running fake API server. It stops when dropped.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeKube {
    /// Starts a server on a free loopback port. Needs a tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (expire, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            requests: Mutex::new(Vec::new()),
            expire,
            open_watches: AtomicUsize::new(0),
            denied: Mutex::new(std::collections::HashSet::new()),
            writes_in_flight: AtomicUsize::new(0),
            max_writes_in_flight: AtomicUsize::new(0),
            write_delay_us: std::sync::atomic::AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(Arc::clone(&shared));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "fake API server stopped");
            }
        });
        Ok(Self {
            shared,
            addr,
            stop: Some(stop),
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points a client at this server, with `namespace` as the context's
    /// default namespace. No credentials: the fake does no authentication.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n",
            url = self.url()
        )
    }

    /// Answers `verb` on `resource` with 403 Forbidden from now on, as the real server does
    /// when RBAC grants no such permission; [`Self::allow`] undoes it.
    pub fn deny(&self, verb: Verb, resource: Resource) {
        self.set_denied(verb, resource, true);
    }

    pub fn allow(&self, verb: Verb, resource: Resource) {
        self.set_denied(verb, resource, false);
    }

    fn set_denied(&self, verb: Verb, resource: Resource, denied: bool) {
        let mut set = self
            .shared
            .denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if denied {
            set.insert((verb, resource.plural));
        } else {
            set.remove(&(verb, resource.plural));
        }
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig(namespace))
    }

    // ---- objects -----------------------------------------------------------------------

    /// Creates an object as given, status included (unlike a client's create, which drops
    /// it), so a test can set up a Service that already has an address.
    pub fn create(&self, resource: Resource, object: Value) -> Result<Value, ApiError> {
        self.shared.lock().create(resource, None, object, Part::All)
    }

    /// Creates a CustomResourceDefinition, so its kind is served from now on, and
    /// answers the resource of each served version (`resources[0]` is the first listed).
    pub fn register_crd(&self, definition: Value) -> Result<Vec<Resource>, ApiError> {
        let resources = resource::from_definition(&definition).ok_or_else(|| {
            ApiError::bad_request("not a CustomResourceDefinition the fake serves")
        })?;
        self.create(CUSTOM_RESOURCE_DEFINITIONS, definition)?;
        Ok(resources)
    }

    /// Replaces an object as given (its identity is kept), status included.
    pub fn replace(&self, resource: Resource, object: Value) -> Result<Value, ApiError> {
        let namespace = store::str_at(&object, &["metadata", "namespace"]).unwrap_or_default();
        let name = store::str_at(&object, &["metadata", "name"]).unwrap_or_default();
        let mut object = object;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        self.shared
            .lock()
            .update(resource, &namespace, &name, object, Part::All)
    }

    /// Applies a JSON merge patch to any part of an object.
    pub fn patch(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        self.shared.lock().patch(
            resource,
            namespace,
            name,
            patch,
            PatchKind::Merge,
            Part::All,
            "test",
        )
    }

    pub fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.shared.lock().delete(resource, namespace, name)
    }

    /// Use `""` as the namespace of cluster-scoped objects.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().get(resource, namespace, name).cloned()
    }

    /// Objects of `resource`, in one namespace or in all.
    pub fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<Value> {
        self.shared.lock().list(resource, namespace)
    }

    /// How many objects of `resource` (in one namespace or in all) satisfy `pred`,
    /// without copying them: for callers that poll while the server is under load.
    pub fn count_matching(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        self.shared.lock().count(resource, namespace, pred)
    }

    /// Every Event, core/v1 and events.k8s.io/v1 alike.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.lock();
        let mut events = store.list(EVENTS, None);
        events.extend(store.list(EVENTS_V1, None));
        events
    }

    /// The Events about one object (by `involvedObject` or `regarding`), oldest first.
    pub fn events_for(&self, namespace: &str, name: &str) -> Vec<Value> {
        let mut events: Vec<Value> = self
            .events()
            .into_iter()
            .filter(|e| {
                let about = if e["involvedObject"].is_object() {
                    &e["involvedObject"]
                } else {
                    &e["regarding"]
                };
                about["namespace"] == namespace && about["name"] == name
            })
            .collect();
        events.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse::<u64>().ok())
                .unwrap_or(0)
        });
        events
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    // ---- history and watches -----------------------------------------------------------

    /// Forgets the change history: a watch that resumes from any resourceVersion up to now
    /// gets 410 Gone and must list again. Open watches are not disturbed.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch with a 410 Gone `ERROR` event.
    pub fn expire_watches(&self) {
        self.shared.expire.send_modify(|n| *n += 1);
    }

    /// [`Self::compact`] then [`Self::expire_watches`]: every watcher must re-list.
    pub fn compact_and_expire(&self) {
        self.compact();
        self.expire_watches();
    }

    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    // ---- load --------------------------------------------------------------------------

    /// Makes every write (create, update, patch, delete) wait `delay` before it is
    /// answered, as a loaded API server does, so a client's writes overlap.
    pub fn delay_writes(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.write_delay_us.store(us, Ordering::SeqCst);
    }

    /// The most writes that were being answered at once so far.
    pub fn max_writes_in_flight(&self) -> usize {
        self.shared.max_writes_in_flight.load(Ordering::SeqCst)
    }

    // ---- requests ----------------------------------------------------------------------

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests().clone()
    }

    /// How many requests of `verb` on `resource` (its plural, e.g. `"services"`) were answered.
    pub fn count(&self, verb: Verb, resource: Resource) -> usize {
        self.shared
            .requests()
            .iter()
            .filter(|r| r.verb == verb && r.resource == resource.plural)
            .count()
    }

    /// Writes (create, update, patch, delete; subresources included) a client made to one
    /// object.
    pub fn writes_to(&self, resource: Resource, namespace: &str, name: &str) -> usize {
        self.shared
            .requests()
            .iter()
            .filter(|r| {
                matches!(r.verb, Verb::Update | Verb::Patch | Verb::Delete)
                    && r.resource == resource.plural
                    && r.namespace.as_deref().unwrap_or("") == namespace
                    && r.name.as_deref() == Some(name)
            })
            .count()
    }

    /// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check(self) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Open watch streams end when their sender sees the broadcast close.
        self.shared.expire.send_modify(|n| *n += 1);
    }
}
