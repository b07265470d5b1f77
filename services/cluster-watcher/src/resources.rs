//! The leader's reconcilers for Herald's custom resources (and, with `import`, MetalLB's
//! and Cilium's), on kube-runtime's `Controller`:
//!
//! - pools → CreatePool / UpdatePool, with a finalizer (DeletePool when deleted, refused
//!   with the holders listed unless `herald.io/force-delete: "true"`), status with the
//!   IPAM's capacity and its exact refusal;
//! - peers, advertisements and the BGPSettings → one SetBgpPolicy, sent when it changes;
//!   each peer's status shows the nodes' sessions from the advertisement status.
//!
//! Before the Service start-up barrier, [`Resources::start_up`] applies every pool once,
//! so the addresses already in Service status are claimed from the pools they belong to.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, future};
use herald_api::ipam::v1 as ipam;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as routing;
use herald_api::routing::v1::routing_client::RoutingClient;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::crd::{
    ANNOTATION_FORCE_DELETE, BGPAdvertisement, BGPPeer, BGPPeerSpec, BGPSettings,
    CONDITION_ACCEPTED, FINALIZER, IPPool, IPPoolSpec, SETTINGS_NAME,
};
use crate::policy::{self, Imports, PoolLabels};
use crate::rbac::{Permission, Refusals};
use crate::retry::{Backoff, PerObject};

/// How often live figures (a pool's capacity, a peer's sessions) are read again when
/// nothing else prompts it.
const FIGURES_PERIOD: Duration = Duration::from_secs(10);
/// Shortest and longest wait before a failed reconcile is tried again.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIELD_MANAGER: &str = "herald-cluster-watcher";
/// What the BGP policy pass's refusals are held by.
const POLICY_HOLDER: &str = "BGP policy";

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
        resource: String,
        #[source]
        source: kube::Error,
    },
    /// Deletion waits: something still uses the resource.
    #[error("{0}")]
    InUse(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn ipam_err(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Ipam { call, status }
}

impl Error {
    /// The permission the API server refused, if that is what failed.
    pub fn refused(&self) -> Option<Permission> {
        match self {
            Self::Kube {
                verb,
                resource,
                source,
            } if crate::rbac::forbidden(source) => Some(Permission::new(verb, resource.clone())),
            _ => None,
        }
    }
}

/// A failed `verb` on `resource` (named as in RBAC, see [`rbac_name`]).
fn kube_err(verb: &'static str, resource: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let resource = resource.into();
    move |source| Error::Kube {
        verb,
        resource,
        source,
    }
}

/// A kind of Herald's as an RBAC rule names it, with its group: `ippools.herald.io`.
fn rbac_name<K: Resource<DynamicType = ()>>() -> String {
    format!("{}.{}", K::plural(&()), K::group(&()))
}

/// An imported kind as an RBAC rule names it: `ipaddresspools.metallb.io`.
fn rbac_name_of(ar: &ApiResource) -> String {
    format!("{}.{}", ar.plural, ar.group)
}

/// What a failed reconcile of `name` holds (its backoff, any refusal): kinds may share names.
fn holder(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// An imported kind: where it is served, and how it reads as Herald's.
#[derive(Clone)]
struct Import {
    resource: ApiResource,
    /// The version to fall back to when `resource`'s is not served.
    fallback: Option<&'static str>,
}

impl Import {
    fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        fallback: Option<&'static str>,
    ) -> Self {
        Self {
            resource: ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            ),
            fallback,
        }
    }

    /// The served version: the preferred one, else the fallback, else none.
    async fn served(&self, client: &kube::Client) -> Option<ApiResource> {
        let mut candidates = vec![self.resource.clone()];
        if let Some(v) = self.fallback {
            let mut older = self.resource.clone();
            older.version = v.to_string();
            older.api_version = format!("{}/{v}", older.group);
            candidates.push(older);
        }
        for ar in candidates {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => return Some(ar),
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                // Its watch reports a refusal (and fails the readiness) or retries.
                Err(e) => {
                    warn!(kind = %ar.kind, version = %ar.version, error = %e, "cannot list an imported kind");
                    return Some(ar);
                }
            }
        }
        None
    }
}

fn metallb_pools() -> Import {
    Import::new(
        "metallb.io",
        "v1beta1",
        "IPAddressPool",
        "ipaddresspools",
        None,
    )
}
fn metallb_peers() -> Import {
    Import::new(
        "metallb.io",
        "v1beta2",
        "BGPPeer",
        "bgppeers",
        Some("v1beta1"),
    )
}
fn metallb_advertisements() -> Import {
    Import::new(
        "metallb.io",
        "v1beta1",
        "BGPAdvertisement",
        "bgpadvertisements",
        None,
    )
}
fn cilium_pools() -> Import {
    Import::new(
        "cilium.io",
        "v2",
        "CiliumLoadBalancerIPPool",
        "ciliumloadbalancerippools",
        Some("v2alpha1"),
    )
}

/// Reads an imported pool as Herald's.
type ReadPool = fn(&Value) -> Result<IPPoolSpec, String>;

/// What an imported kind's pool reconciler needs.
pub struct ImportedPools {
    resources: Arc<Resources>,
    read: ReadPool,
    resource: ApiResource,
}

pub struct Resources {
    client: kube::Client,
    ipam: IpamClient<Channel>,
    routing: RoutingClient<Channel>,
    recorder: Recorder,
    imports: Imports,
    /// The policy last set, so an unchanged one is not sent again.
    sent_policy: Mutex<Option<routing::BgpPolicy>>,
    /// Why the policy was last refused (the IPAM's message), if it was.
    policy_refusal: Mutex<Option<String>>,
    /// Peers (by uid) whose deletion was allowed: left out of the policy from now on.
    released_peers: Mutex<HashSet<String>>,
    /// Something the policy reads changed.
    policy_wanted: Notify,
    /// herald-ipam changed (an allocation or pool): the figures in status may have.
    pub ipam_changed: Arc<Notify>,
    /// The retry backoff of each object ([`holder`]) failing in a row.
    retries: PerObject<String>,
    /// Permissions the API server refuses; the readiness follows them.
    refusals: Arc<Refusals>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Resources {
    pub fn new(
        client: kube::Client,
        channel: Channel,
        imports: Imports,
        identity: &str,
        refusals: Arc<Refusals>,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        Arc::new(Self {
            client,
            ipam: IpamClient::new(channel.clone()),
            routing: RoutingClient::new(channel),
            recorder,
            imports,
            sent_policy: Mutex::new(None),
            policy_refusal: Mutex::new(None),
            released_peers: Mutex::new(HashSet::new()),
            policy_wanted: Notify::new(),
            ipam_changed: Arc::new(Notify::new()),
            retries: PerObject::new(MIN_BACKOFF, MAX_BACKOFF),
            refusals,
        })
    }

    /// Applies every pool (Herald's and the imported) and the BGP policy once, before the
    /// Service start-up barrier claims addresses from them. A refused pool or policy is
    /// not a failure here (its status says why); an IPAM that does not answer is.
    pub async fn start_up(&self) -> Result<()> {
        let pools: Vec<IPPool> = list_all(&self.client).await?;
        let own: HashSet<String> = pools.iter().map(ResourceExt::name_any).collect();
        for p in &pools {
            if p.meta().deletion_timestamp.is_none()
                && let Err(refusal) = self.ensure_pool(&p.name_any(), &p.spec).await?
            {
                warn!(pool = %p.name_any(), %refusal, "pool refused");
            }
        }
        let mut imported = 0;
        for (import, read) in self.pool_imports() {
            let Some(ar) = import.served(&self.client).await else {
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(kube_err("list", rbac_name_of(&ar)))?;
            for o in &list.items {
                let name = o.name_any();
                if own.contains(&name) {
                    continue;
                }
                let object = serde_json::to_value(o).unwrap_or_default();
                if let Ok(spec) = read(&object) {
                    match self.ensure_pool(&name, &spec).await? {
                        Ok(_) => imported += 1,
                        Err(refusal) => warn!(pool = %name, %refusal, "imported pool refused"),
                    }
                }
            }
        }
        info!(
            pools = own.len(),
            imported, "pools applied before claiming Service addresses"
        );
        self.ensure_policy(&self.policy_inputs().await?).await
    }

    fn pool_imports(&self) -> Vec<(Import, ReadPool)> {
        let mut out: Vec<(Import, ReadPool)> = Vec::new();
        if self.imports.metallb {
            out.push((metallb_pools(), policy::metallb_pool));
        }
        if self.imports.cilium {
            out.push((cilium_pools(), policy::cilium_pool));
        }
        out
    }

    /// Creates or updates the IPAM's pool. `Ok(Err(refusal))` when the IPAM refuses it.
    async fn ensure_pool(
        &self,
        name: &str,
        spec: &IPPoolSpec,
    ) -> Result<Result<ipam::Pool, String>> {
        let want = match policy::pool(name, spec) {
            Ok(p) => p,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let mut client = self.ipam.clone();
        let have = match client
            .get_pool(ipam::GetPoolRequest {
                name: name.to_string(),
            })
            .await
        {
            Ok(p) => Some(p.into_inner()),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(ipam_err("GetPool")(s)),
        };
        let result = match have {
            Some(have) if policy::same_pool(&have, &want) => Ok(have),
            Some(_) => client
                .update_pool(ipam::UpdatePoolRequest {
                    pool: Some(want),
                    force: false,
                    dry_run: false,
                })
                .await
                .map(|r| r.into_inner().pool.unwrap_or_default()),
            None => client
                .create_pool(ipam::CreatePoolRequest { pool: Some(want) })
                .await
                .map(tonic::Response::into_inner),
        };
        match result {
            Ok(pool) => {
                info!(pool = name, "pool applied");
                Ok(Ok(pool))
            }
            Err(s) if refusal(s.code()) => Ok(Err(s.message().to_string())),
            Err(s) => Err(ipam_err("CreatePool/UpdatePool")(s)),
        }
    }

    // ---- pools ------------------------------------------------------------------------

    /// A reconcile of `holder` ([`holder`]) succeeded: no backoff, nothing refused.
    fn succeeded(&self, holder: &str) {
        self.retries.succeeded(&holder.to_string());
        self.refusals.clear(holder);
    }

    async fn reconcile_pool(pool: Arc<IPPool>, ctx: Arc<Self>) -> Result<Action> {
        let api = Api::<IPPool>::all(ctx.client.clone());
        let name = pool.name_any();
        let action = finalizer(&api, FINALIZER, pool, |event| async {
            match event {
                Finalizer::Apply(pool) => ctx.apply_pool(&api, &pool).await,
                Finalizer::Cleanup(pool) => ctx.delete_pool(&api, &pool).await,
            }
        })
        .await
        .map_err(finalizer_error::<IPPool>)?;
        ctx.succeeded(&holder(IPPool::kind(&()).as_ref(), &name));
        Ok(action)
    }

    async fn apply_pool(&self, api: &Api<IPPool>, pool: &IPPool) -> Result<Action> {
        let name = pool.name_any();
        let outcome = self.ensure_pool(&name, &pool.spec).await?;
        let mut status = pool.status.clone().unwrap_or_default();
        let (accepted, message) = match &outcome {
            Ok(p) => {
                let (total, used, free, quarantined) = policy::capacity(p);
                status.total = Some(total);
                status.used = Some(used);
                status.free = Some(free);
                status.quarantined = Some(quarantined);
                (true, String::new())
            }
            Err(refusal) => (false, refusal.clone()),
        };
        let generation = pool.meta().generation;
        let changed = set_condition(&mut status.conditions, accepted, &message, generation);
        status.observed_generation = generation;
        if pool.status.as_ref() != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(kube_err(
                "patch",
                format!("{}/status", rbac_name::<IPPool>()),
            ))?;
        }
        if changed && !accepted {
            self.event(
                &pool.object_ref(&()),
                EventType::Warning,
                "Refused",
                "ApplyPool",
                &message,
            )
            .await;
        }
        Ok(Action::requeue(FIGURES_PERIOD))
    }

    async fn delete_pool(&self, api: &Api<IPPool>, pool: &IPPool) -> Result<Action> {
        let name = pool.name_any();
        let force = forced(pool.annotations());
        let mut client = self.ipam.clone();
        match client
            .delete_pool(ipam::DeletePoolRequest {
                name: name.clone(),
                force,
                dry_run: false,
            })
            .await
        {
            Ok(r) => {
                let released = r.into_inner().affected.len();
                info!(pool = %name, force, released, "pool deleted");
                Ok(Action::await_change())
            }
            Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
            Err(s) if refusal(s.code()) => {
                let message = format!(
                    "{}; set the annotation {ANNOTATION_FORCE_DELETE}: \"true\" to release them",
                    s.message()
                );
                let conditions = pool.status.as_ref().map(|s| &s.conditions[..]);
                Err(self
                    .refuse_deletion(
                        api,
                        pool,
                        conditions.unwrap_or_default(),
                        "DeletePool",
                        message,
                    )
                    .await)
            }
            Err(s) => Err(ipam_err("DeletePool")(s)),
        }
    }

    /// A MetalLB or Cilium pool: applied as Herald's; refusals are Events (their status
    /// belongs to their own controllers), and deleting one leaves the IPAM pool.
    async fn reconcile_imported_pool(
        object: Arc<DynamicObject>,
        ctx: Arc<ImportedPools>,
    ) -> Result<Action> {
        let ImportedPools {
            resources: this,
            read,
            resource: ar,
        } = &*ctx;
        let name = object.name_any();
        if Api::<IPPool>::all(this.client.clone())
            .get_opt(&name)
            .await
            .map_err(kube_err("get", rbac_name::<IPPool>()))?
            .is_some()
        {
            this.succeeded(&holder(&ar.kind, &name));
            return Ok(Action::await_change());
        }
        let value = serde_json::to_value(&*object).unwrap_or_default();
        let refusal = match read(&value) {
            Ok(spec) => this.ensure_pool(&name, &spec).await?.err(),
            Err(e) => Some(e),
        };
        if let Some(message) = refusal {
            warn!(kind = %ar.kind, pool = %name, reason = %message, "imported pool refused");
            this.event(
                &object.object_ref(ar),
                EventType::Warning,
                "Refused",
                "ImportPool",
                &message,
            )
            .await;
        }
        this.succeeded(&holder(&ar.kind, &name));
        Ok(Action::await_change())
    }

    // ---- the BGP policy ---------------------------------------------------------------

    /// Everything the policy is made of, read now.
    async fn policy_inputs(&self) -> Result<PolicyInputs> {
        let lp = ListParams::default();
        let settings = Api::<BGPSettings>::all(self.client.clone())
            .get_opt(SETTINGS_NAME)
            .await
            .map_err(kube_err("get", rbac_name::<BGPSettings>()))?;
        let released = lock(&self.released_peers).clone();
        let mut peers: Vec<(String, BGPPeerSpec, Option<String>)> = Vec::new();
        for p in list_all::<BGPPeer>(&self.client).await? {
            if p.uid().is_some_and(|u| released.contains(&u)) {
                continue;
            }
            peers.push((p.name_any(), p.spec.clone(), None));
        }
        let mut advertisements = Vec::new();
        for a in list_all::<BGPAdvertisement>(&self.client).await? {
            advertisements.push((a.name_any(), Ok(a.spec.clone())));
        }
        let mut pools: Vec<(String, BTreeMap<String, String>)> = list_all::<IPPool>(&self.client)
            .await?
            .into_iter()
            .map(|p| (p.name_any(), p.labels().clone()))
            .collect();
        if self.imports.metallb {
            for (import, kind) in [
                (metallb_peers(), 0),
                (metallb_advertisements(), 1),
                (metallb_pools(), 2),
            ] {
                let Some(ar) = import.served(&self.client).await else {
                    continue;
                };
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                for o in api
                    .list(&lp)
                    .await
                    .map_err(kube_err("list", rbac_name_of(&ar)))?
                {
                    let value = serde_json::to_value(&o).unwrap_or_default();
                    match kind {
                        0 => match policy::metallb_peer(&value) {
                            Ok((spec, inline)) => peers.push((o.name_any(), spec, inline)),
                            Err(e) => {
                                warn!(peer = %o.name_any(), reason = %e, "MetalLB BGPPeer not imported")
                            }
                        },
                        1 => advertisements
                            .push((o.name_any(), policy::metallb_advertisement(&value))),
                        _ => pools.push((o.name_any(), o.labels().clone())),
                    }
                }
            }
        }
        // Passwords from their Secrets.
        let mut problems = Vec::new();
        for (name, spec, password) in &mut peers {
            if password.is_some() {
                continue;
            }
            let Some(r) = &spec.password_secret else {
                continue;
            };
            let secret = Api::<Secret>::namespaced(self.client.clone(), &r.namespace)
                .get_opt(&r.name)
                .await
                .map_err(kube_err("get", "secrets"))?;
            let key = r.key.clone().unwrap_or_else(|| "password".into());
            match secret.and_then(|s| s.data?.get(&key).cloned()) {
                Some(bytes) => *password = Some(String::from_utf8_lossy(&bytes.0).into_owned()),
                None => problems.push(format!(
                    "BGPPeer {name}: spec.passwordSecret: Secret {}/{} has no key {key:?}",
                    r.namespace, r.name
                )),
            }
        }
        Ok(PolicyInputs {
            settings: settings.map(|s| s.spec),
            peers,
            advertisements,
            pools,
            problems,
        })
    }

    /// Sets the policy when it changed; a refusal is kept for the statuses.
    async fn ensure_policy(&self, inputs: &PolicyInputs) -> Result<()> {
        let built = inputs.build();
        let policy = match built {
            Ok(p) => p,
            Err(refusal) => {
                *lock(&self.policy_refusal) = Some(refusal);
                return Ok(());
            }
        };
        if inputs.peers.is_empty() && inputs.settings.is_none() && lock(&self.sent_policy).is_none()
        {
            // Nothing configured here, ever: leave a policy set through the API alone.
            *lock(&self.policy_refusal) = None;
            return Ok(());
        }
        if lock(&self.sent_policy).as_ref() == Some(&policy) {
            return Ok(());
        }
        let mut client = self.routing.clone();
        match client.set_bgp_policy(policy.clone()).await {
            Ok(_) => {
                info!(
                    peers = policy.peers.len(),
                    advertisements = policy.advertisements.len(),
                    local_asn = policy.local_asn,
                    "BGP policy set"
                );
                *lock(&self.sent_policy) = Some(policy);
                *lock(&self.policy_refusal) = None;
                Ok(())
            }
            Err(s) if refusal(s.code()) => {
                let mut last = lock(&self.policy_refusal);
                if last.as_deref() != Some(s.message()) {
                    warn!(reason = %s.message(), "BGP policy refused");
                }
                *last = Some(s.message().to_string());
                drop(last);
                *lock(&self.sent_policy) = None;
                Ok(())
            }
            Err(s) => Err(ipam_err("SetBgpPolicy")(s)),
        }
    }

    /// Keeps the policy in step with its inputs: on every change of them, and every
    /// [`FIGURES_PERIOD`] (a Secret's password is read, not watched).
    async fn policy_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        loop {
            let outcome = match self.policy_inputs().await {
                Ok(inputs) => {
                    let outcome = self.ensure_policy(&inputs).await;
                    if outcome.is_ok() {
                        self.write_policy_statuses().await;
                    }
                    outcome
                }
                Err(e) => Err(e),
            };
            let wait = match outcome {
                Ok(()) => {
                    backoff.reset();
                    self.refusals.clear(POLICY_HOLDER);
                    FIGURES_PERIOD
                }
                Err(e) => {
                    match e.refused() {
                        Some(permission) => self.refusals.refuse(permission, POLICY_HOLDER, &e),
                        None => warn!(error = %e, "BGP policy not applied; retrying"),
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = self.policy_wanted.notified() => {
                    // A burst of changes costs one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The Accepted condition of every advertisement and the settings; a status the API
    /// server refuses to let be written fails the readiness until it can be.
    async fn write_policy_statuses(&self) {
        const HOLDER: &str = "BGP policy: status";
        let mut refused = Vec::new();
        let mut failed = |e: kube::Error, resource: String| {
            let e = kube_err("patch", format!("{resource}/status"))(e);
            match e.refused() {
                Some(permission) => refused.push((permission, e)),
                None => warn!(error = %e, "status not written"),
            }
        };
        let refusal = lock(&self.policy_refusal).clone();
        let (accepted, message) = (refusal.is_none(), refusal.unwrap_or_default());
        let adverts = Api::<BGPAdvertisement>::all(self.client.clone());
        // A list the API server refuses is the policy pass's own refusal.
        if let Ok(list) = adverts.list(&ListParams::default()).await {
            for a in list {
                let mut status = a.status.clone().unwrap_or_default();
                set_condition(
                    &mut status.conditions,
                    accepted,
                    &message,
                    a.meta().generation,
                );
                status.observed_generation = a.meta().generation;
                if a.status.as_ref() != Some(&status)
                    && let Err(e) = adverts
                        .patch_status(
                            &a.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": status})),
                        )
                        .await
                {
                    failed(e, rbac_name::<BGPAdvertisement>());
                }
            }
        }
        let settings = Api::<BGPSettings>::all(self.client.clone());
        if let Ok(Some(s)) = settings.get_opt(SETTINGS_NAME).await {
            let mut status = s.status.clone().unwrap_or_default();
            set_condition(
                &mut status.conditions,
                accepted,
                &message,
                s.meta().generation,
            );
            status.observed_generation = s.meta().generation;
            if s.status.as_ref() != Some(&status)
                && let Err(e) = settings
                    .patch_status(
                        SETTINGS_NAME,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": status})),
                    )
                    .await
            {
                failed(e, rbac_name::<BGPSettings>());
            }
        }
        if refused.is_empty() {
            self.refusals.clear(HOLDER);
        }
        for (permission, e) in refused {
            self.refusals.refuse(permission, HOLDER, &e);
        }
    }

    // ---- peers ------------------------------------------------------------------------

    async fn reconcile_peer(peer: Arc<BGPPeer>, ctx: Arc<Self>) -> Result<Action> {
        let api = Api::<BGPPeer>::all(ctx.client.clone());
        let name = peer.name_any();
        ctx.policy_wanted.notify_one();
        let action = finalizer(&api, FINALIZER, peer, |event| async {
            match event {
                Finalizer::Apply(peer) => ctx.peer_status(&api, &peer).await,
                Finalizer::Cleanup(peer) => ctx.release_peer(&api, &peer).await,
            }
        })
        .await
        .map_err(finalizer_error::<BGPPeer>)?;
        ctx.succeeded(&holder(BGPPeer::kind(&()).as_ref(), &name));
        Ok(action)
    }

    /// The peer's own refusal (a bad field), else the policy's, and its sessions.
    async fn peer_status(&self, api: &Api<BGPPeer>, peer: &BGPPeer) -> Result<Action> {
        let name = peer.name_any();
        let own = policy::peer(&name, &peer.spec, None).err();
        let refusal = own.or_else(|| lock(&self.policy_refusal).clone());
        let mut status = peer.status.clone().unwrap_or_default();
        let generation = peer.meta().generation;
        let changed = set_condition(
            &mut status.conditions,
            refusal.is_none(),
            refusal.as_deref().unwrap_or(""),
            generation,
        );
        status.observed_generation = generation;
        let sessions = self.sessions(&name).await?;
        let established = sessions
            .values()
            .filter(|s| s.as_str() == "Established")
            .count();
        status.established = Some(format!("{established}/{}", sessions.len()));
        status.sessions = sessions;
        if peer.status.as_ref() != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(kube_err(
                "patch",
                format!("{}/status", rbac_name::<BGPPeer>()),
            ))?;
        }
        if changed && let Some(message) = &refusal {
            self.event(
                &peer.object_ref(&()),
                EventType::Warning,
                "Refused",
                "ApplyPeer",
                message,
            )
            .await;
        }
        Ok(Action::requeue(FIGURES_PERIOD))
    }

    /// Each node's session with `peer`, from the advertisement status.
    async fn sessions(&self, peer: &str) -> Result<BTreeMap<String, String>> {
        let mut client = self.routing.clone();
        let status = client
            .get_advertisement_status(routing::GetAdvertisementStatusRequest::default())
            .await
            .map_err(ipam_err("GetAdvertisementStatus"))?
            .into_inner();
        Ok(status
            .entries
            .into_iter()
            .filter(|e| e.peer == peer && !e.node.is_empty())
            .map(|e| (e.node, e.session_state))
            .collect())
    }

    /// A peer being deleted: refused while it carries routes, unless forced; then left
    /// out of the policy, and gone once the policy no longer has it.
    async fn release_peer(&self, api: &Api<BGPPeer>, peer: &BGPPeer) -> Result<Action> {
        let name = peer.name_any();
        let uid = peer.uid().unwrap_or_default();
        if !lock(&self.released_peers).contains(&uid) {
            let mut client = self.routing.clone();
            let status = client
                .get_advertisement_status(routing::GetAdvertisementStatusRequest::default())
                .await
                .map_err(ipam_err("GetAdvertisementStatus"))?
                .into_inner();
            let mut holders: Vec<String> = status
                .entries
                .iter()
                .filter(|e| e.peer == name && e.announced)
                .map(|e| format!("{} ({})", e.service, e.prefix))
                .collect();
            holders.sort();
            holders.dedup();
            if !holders.is_empty() && !forced(peer.annotations()) {
                let shown = holders.len().min(10);
                let message = format!(
                    "peer {name} carries the routes of {} Service address(es): {}{}; set the \
                     annotation {ANNOTATION_FORCE_DELETE}: \"true\" to withdraw them",
                    holders.len(),
                    holders[..shown].join(", "),
                    if holders.len() > shown { ", …" } else { "" }
                );
                let conditions = peer.status.as_ref().map(|s| &s.conditions[..]);
                return Err(self
                    .refuse_deletion(
                        api,
                        peer,
                        conditions.unwrap_or_default(),
                        "DeletePeer",
                        message,
                    )
                    .await);
            }
            lock(&self.released_peers).insert(uid);
        }
        let inputs = self.policy_inputs().await?;
        self.ensure_policy(&inputs).await?;
        let still = lock(&self.sent_policy)
            .as_ref()
            .is_some_and(|p| p.peers.iter().any(|p| p.name == name));
        if still {
            return Err(Error::InUse(format!(
                "peer {name} is still in the BGP policy"
            )));
        }
        info!(peer = %name, "peer removed from the BGP policy");
        Ok(Action::await_change())
    }

    /// A deletion that waits because something still uses `object`: its Accepted
    /// condition says so (reason InUse) and, when that is news, a Warning Event does too.
    /// Answers the error the reconcile fails with (retried with backoff).
    async fn refuse_deletion<K>(
        &self,
        api: &Api<K>,
        object: &K,
        conditions: &[Condition],
        action: &str,
        message: String,
    ) -> Error
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut conditions = conditions.to_vec();
        let generation = object.meta().generation;
        if set_condition_reason(&mut conditions, false, "InUse", &message, generation) {
            // Only the conditions: the figures beside them stay as the last apply wrote them.
            let patch = Patch::Merge(json!({"status": {"conditions": conditions}}));
            if let Err(e) = api
                .patch_status(&object.name_any(), &PatchParams::default(), &patch)
                .await
            {
                return kube_err("patch", format!("{}/status", rbac_name::<K>()))(e);
            }
            self.event(
                &object.object_ref(&()),
                EventType::Warning,
                "InUse",
                action,
                &message,
            )
            .await;
        }
        Error::InUse(message)
    }

    async fn event(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            warn!(error = %e, "could not publish an Event");
        }
    }

    /// Runs the controllers until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        let figures = notified_stream(Arc::clone(&self.ipam_changed));
        let own = installed::<IPPool>(&self.client).await;
        if !own {
            info!("the herald.io custom resources are not installed; not reading them");
        }
        if own {
            let (reader, writer) = reflector::store::<IPPool>();
            let this = Arc::clone(&self);
            tasks.spawn(
                Controller::for_stream(
                    self.watched(Api::all(self.client.clone()), writer, rbac_name::<IPPool>()),
                    reader,
                )
                .reconcile_all_on(figures)
                .graceful_shutdown_on(cancelled(cancel.clone()))
                .run(Self::reconcile_pool, error_policy, Arc::clone(&self))
                .for_each(move |r| {
                    log_result(&this.refusals, IPPool::kind(&()).as_ref(), r);
                    future::ready(())
                }),
            );
            let (reader, writer) = reflector::store::<BGPPeer>();
            let this = Arc::clone(&self);
            tasks.spawn(
                Controller::for_stream(
                    self.watched(
                        Api::all(self.client.clone()),
                        writer,
                        rbac_name::<BGPPeer>(),
                    ),
                    reader,
                )
                .graceful_shutdown_on(cancelled(cancel.clone()))
                .run(Self::reconcile_peer, error_policy, Arc::clone(&self))
                .for_each(move |r| {
                    log_result(&this.refusals, BGPPeer::kind(&()).as_ref(), r);
                    future::ready(())
                }),
            );
        }
        // Nothing to read: a policy set through the API is left alone.
        if own || self.imports.metallb {
            tasks.spawn(Arc::clone(&self).policy_loop());
        }
        // Whatever the policy reads: a change prompts a pass.
        let wake = {
            let this = Arc::clone(&self);
            move || this.policy_wanted.notify_one()
        };
        if own {
            tasks.spawn(nudge(
                self.nudges(
                    Api::<BGPAdvertisement>::all(self.client.clone()),
                    rbac_name::<BGPAdvertisement>(),
                ),
                wake.clone(),
            ));
            tasks.spawn(nudge(
                self.nudges(
                    Api::<BGPSettings>::all(self.client.clone()),
                    rbac_name::<BGPSettings>(),
                ),
                wake.clone(),
            ));
            tasks.spawn(nudge(
                self.nudges(
                    Api::<IPPool>::all(self.client.clone()),
                    rbac_name::<IPPool>(),
                ),
                wake.clone(),
            ));
        }
        if self.imports.metallb {
            for import in [metallb_peers(), metallb_advertisements()] {
                if let Some(ar) = import.served(&self.client).await {
                    let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                    tasks.spawn(nudge(self.nudges(api, rbac_name_of(&ar)), wake.clone()));
                }
            }
        }
        for (import, read) in self.pool_imports() {
            let Some(ar) = import.served(&self.client).await else {
                info!(kind = %import.resource.kind, "imported kind not served; skipped");
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let resource = rbac_name_of(&ar);
            let writer = reflector::store::Writer::new(ar.clone());
            let reader = writer.as_reader();
            let kind = ar.kind.clone();
            let ctx = Arc::new(ImportedPools {
                resources: Arc::clone(&self),
                read,
                resource: ar.clone(),
            });
            let this = Arc::clone(&self);
            tasks.spawn(
                Controller::for_stream_with(self.watched(api, writer, resource), reader, ar)
                    .graceful_shutdown_on(cancelled(cancel.clone()))
                    .run(Self::reconcile_imported_pool, error_policy_imported, ctx)
                    .for_each(move |r| {
                        log_result(&this.refusals, &kind, r);
                        future::ready(())
                    }),
            );
        }
        cancel.cancelled().await;
        tasks.abort_all();
    }

    /// A controller's watch of `api` into `writer`'s cache (re-listing with backoff, a
    /// refusal reported): the objects it touches.
    fn watched<K>(
        &self,
        api: Api<K>,
        writer: reflector::store::Writer<K>,
        resource: String,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        self.refusals
            .observe(resource, events)
            .map(Ok)
            .touched_objects()
    }

    /// The events of a watch of `api` (re-listing with backoff, a refusal reported).
    fn nudges<K>(
        &self,
        api: Api<K>,
        resource: String,
    ) -> impl Stream<Item = watcher::Event<K>> + Send + 'static + use<K>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        self.refusals.observe(
            resource,
            watcher(api, watcher::Config::default()).default_backoff(),
        )
    }
}

struct PolicyInputs {
    settings: Option<crate::crd::BGPSettingsSpec>,
    peers: Vec<(String, BGPPeerSpec, Option<String>)>,
    advertisements: Vec<(String, Result<crate::crd::BGPAdvertisementSpec, String>)>,
    pools: Vec<(String, BTreeMap<String, String>)>,
    /// What keeps the policy from being built (a missing Secret).
    problems: Vec<String>,
}

impl PolicyInputs {
    fn build(&self) -> Result<routing::BgpPolicy, String> {
        if let Some(problem) = self.problems.first() {
            return Err(problem.clone());
        }
        let specs: Vec<BGPPeerSpec> = self.peers.iter().map(|(_, s, _)| s.clone()).collect();
        let local_asn = policy::local_asn(self.settings.as_ref(), &specs)?;
        let mut peers = Vec::new();
        for (name, spec, password) in &self.peers {
            let mut p = policy::peer(name, spec, password.clone())
                .map_err(|e| format!("BGPPeer {name}: {e}"))?;
            if p.local_asn == local_asn {
                p.local_asn = 0;
            }
            peers.push(p);
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let pools: Vec<PoolLabels<'_>> = self
            .pools
            .iter()
            .map(|(name, labels)| PoolLabels { name, labels })
            .collect();
        let mut advertisements = Vec::new();
        let mut sorted: Vec<_> = self.advertisements.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, spec) in sorted {
            let spec = spec
                .as_ref()
                .map_err(|e| format!("BGPAdvertisement {name}: {e}"))?;
            advertisements.extend(
                policy::advertisements(spec, &pools)
                    .map_err(|e| format!("BGPAdvertisement {name}: {e}"))?,
            );
        }
        Ok(routing::BgpPolicy {
            local_asn,
            peers,
            advertisements,
            router_id_subnet: self
                .settings
                .as_ref()
                .and_then(|s| s.router_id_subnet.clone())
                .unwrap_or_default(),
        })
    }
}

/// Every object of a kind of Herald's; none when its definition is not installed (a
/// cluster that does not use the custom resources).
async fn list_all<K>(client: &kube::Client) -> Result<Vec<K>>
where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(kube_err("list", rbac_name::<K>())(e)),
    }
}

/// Whether the definition of a kind of Herald's is installed.
async fn installed<K>(client: &kube::Client) -> bool
where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    !matches!(
        Api::<K>::all(client.clone()).list(&ListParams::default().limit(1)).await,
        Err(kube::Error::Api(e)) if e.code == 404
    )
}

/// The IPAM's answers that refuse a request (written into status), as opposed to ones
/// that say to try again.
fn refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// The finalizer helper's failure; adding or removing the finalizer is a patch of `K`.
fn finalizer_error<K: Resource<DynamicType = ()>>(
    e: kube::runtime::finalizer::Error<Error>,
) -> Error {
    use kube::runtime::finalizer::Error as E;
    match e {
        E::ApplyFailed(e) | E::CleanupFailed(e) => e,
        E::AddFinalizer(e) | E::RemoveFinalizer(e) => kube_err("patch", rbac_name::<K>())(e),
        other => Error::Finalizer(other.to_string()),
    }
}

fn forced(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(ANNOTATION_FORCE_DELETE)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Sets the Accepted condition; whether it changed (its time moves only then).
fn set_condition(
    conditions: &mut Vec<Condition>,
    accepted: bool,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let reason = if accepted { "Accepted" } else { "Refused" };
    set_condition_reason(conditions, accepted, reason, message, generation)
}

fn set_condition_reason(
    conditions: &mut Vec<Condition>,
    accepted: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let status = if accepted { "True" } else { "False" };
    let new = Condition {
        type_: CONDITION_ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(1024).collect(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    };
    match conditions
        .iter_mut()
        .find(|c| c.type_ == CONDITION_ACCEPTED)
    {
        Some(c)
            if c.status == new.status
                && c.reason == new.reason
                && c.message == new.message
                && c.observed_generation == new.observed_generation =>
        {
            false
        }
        Some(c) => {
            let time = if c.status == new.status {
                c.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: time,
                ..new
            };
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Failed reconciles are retried with backoff, per object (kube-runtime keeps one
/// requeue per object, so a retry replaces the previous one).
fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Resources>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let name = object.meta().name.as_deref().unwrap_or("");
    retry_action(&ctx, &holder(K::kind(&()).as_ref(), name), error)
}

fn error_policy_imported(
    object: Arc<DynamicObject>,
    error: &Error,
    ctx: Arc<ImportedPools>,
) -> Action {
    let name = object.metadata.name.as_deref().unwrap_or("");
    retry_action(&ctx.resources, &holder(&ctx.resource.kind, name), error)
}

/// A refused permission fails the readiness until this object's reconcile succeeds (one
/// ERROR line); anything else is a warning per attempt.
fn retry_action(ctx: &Resources, holder: &str, error: &Error) -> Action {
    let delay = ctx.retries.failed(&holder.to_string());
    match error.refused() {
        Some(permission) => ctx.refusals.refuse(permission, holder, error),
        None => {
            warn!(object = holder, error = %error, retry_in = ?delay, "reconcile failed; retrying")
        }
    }
    Action::requeue(delay)
}

/// Logs what a controller's run yields that its error policy has not seen.
fn log_result<K>(
    refusals: &Refusals,
    kind: &str,
    result: Result<(ObjectRef<K>, Action), controller::Error<Error, watcher::Error>>,
) where
    K: Resource,
{
    match result {
        Ok(_) => {}
        // Logged by the error policy.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        // Deleted while it was waiting for a retry: whatever it was refused is not
        // needed any more.
        Err(controller::Error::ObjectNotFound(obj)) => {
            refusals.clear(&holder(kind, &obj.name));
        }
        Err(e) => warn!(kind, error = %e, "controller"),
    }
}

async fn cancelled(cancel: CancellationToken) {
    cancel.cancelled_owned().await;
}

/// One `()` per notification.
fn notified_stream(notify: Arc<Notify>) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(notify, |n| async move {
        n.notified().await;
        // Many changes in a burst: one pass.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some(((), n))
    })
}

/// Calls `wake` on every event of a watch but the (re-)list's own objects.
async fn nudge<K, S>(stream: S, wake: impl Fn() + Send)
where
    K: Send,
    S: Stream<Item = watcher::Event<K>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_moves_its_time_only_when_its_status_changes() {
        let mut conditions = Vec::new();
        assert!(set_condition(&mut conditions, true, "", Some(1)));
        assert!(!set_condition(&mut conditions, true, "", Some(1)));
        let first = conditions[0].last_transition_time.clone();
        assert!(set_condition(&mut conditions, true, "", Some(2)));
        assert_eq!(conditions[0].last_transition_time, first);
        assert!(set_condition(
            &mut conditions,
            false,
            "overlaps pool a",
            Some(2)
        ));
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].message, "overlaps pool a");
        assert_eq!(conditions.len(), 1);
    }
}
