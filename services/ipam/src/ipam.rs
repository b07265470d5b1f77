//! The IPAM engine behind the gRPC surface: it plans in memory (the [`PoolIndex`]) and
//! lets the store's constraints decide, retrying the rare plan that lost a race with
//! another replica.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use herald_ipam_core::{AllocError, Plan, PoolIndex, PoolUsage};
use herald_ipam_store::{CommitError, PoolChange, Store, StoredPool};
use herald_model::{Allocation, AllocationRequest, AssignedIp, FamilyPolicy, IpFamily, PoolSpec};
use tracing::{debug, info};

use crate::IpamError;
use crate::feed::Feed;
use crate::writer::Writer;

/// Attempts per Allocate before giving up with ABORTED. Each lost race teaches the index
/// the winner's address, so more than a couple of attempts means heavy contention.
const MAX_ATTEMPTS: usize = 8;
/// Most requests in one AllocateBatch.
pub const MAX_BATCH: usize = 1000;

pub struct Ipam {
    store: Store,
    writer: Writer,
    index: Mutex<PoolIndex>,
    feed: Feed,
}

impl Ipam {
    /// Loads every pool and claim into memory. With 100k allocations this is one query and
    /// a few hundred milliseconds, which bounds the time to SERVING after a restart.
    pub async fn open(store: Store) -> Result<Arc<Self>, IpamError> {
        let last_revision = store.last_revision().await?;
        let index = load_index(&store).await?;
        Ok(Arc::new(Self {
            writer: Writer::start(store.clone()),
            store,
            index: Mutex::new(index),
            feed: Feed::new(last_revision),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The index lock is only ever held for in-memory work, never across an await.
    pub(crate) fn index(&self) -> MutexGuard<'_, PoolIndex> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- allocations -------------------------------------------------------------------

    /// Gives `req.owner` its addresses: the ones it already holds when they still match the
    /// request, otherwise new ones. With `dry_run` nothing is written or reserved.
    #[tracing::instrument(name = "allocate", skip_all, fields(service = %format!("{}/{}", req.owner.namespace, req.owner.name), uid = %req.owner.uid))]
    pub async fn allocate(
        &self,
        req: &AllocationRequest,
        dry_run: bool,
    ) -> Result<Allocation, IpamError> {
        let mut last_race = String::new();
        let mut pools_refreshed = false;
        for attempt in 0..MAX_ATTEMPTS {
            // A new owner costs one statement; only a known owner (or a lost race) reads
            // back what it holds.
            let read_store = attempt > 0 || self.index().holds(&req.owner.uid);
            let existing = if read_store {
                self.store.get_allocation(&req.owner.uid).await?
            } else {
                None
            };
            let (todo, existing) = match outstanding(req, existing)? {
                Todo::Done(held) => return Ok(held),
                Todo::Allocate(todo, existing) => (todo, existing),
            };
            let planned = {
                let mut index = self.index();
                index.expire_quarantine(herald_ipam_store::now_micros());
                index.plan(&todo.request)
            };
            let plan = match (planned, existing) {
                (Ok(plan), existing) => (plan, existing),
                // A family the request only prefers is not worth failing for.
                (Err(_), Some(held)) if todo.optional => return Ok(held),
                // Another replica may have served this owner a moment ago: before refusing,
                // look at what the store says it holds (the next attempt reads it).
                (Err(_), None) if !read_store => continue,
                // The pool may be one another replica created or changed a moment ago,
                // before the change feed brought it here: look once before refusing.
                (Err(e), _) if !pools_refreshed && about_pool_config(&e) => {
                    pools_refreshed = true;
                    self.refresh_pools().await?;
                    continue;
                }
                (Err(e), _) => return Err(e.into()),
            };
            let (plan, existing) = plan;
            if dry_run {
                self.index().abort(&plan);
                return Ok(merge(req, existing, &plan, 0));
            }
            match self.writer.commit(&todo.request, &plan).await {
                Ok(_) => {
                    self.feed.wake();
                    debug!(ips = ?plan.items.iter().map(|i| i.ip).collect::<Vec<_>>(), "allocated");
                    return Ok(merge(req, existing, &plan, herald_ipam_store::now_micros()));
                }
                Err(err) => {
                    self.index().abort(&plan);
                    last_race = err.to_string();
                    self.learn_from(err, &plan).await?;
                }
            }
        }
        Err(IpamError::Contended(format!(
            "gave up after {MAX_ATTEMPTS} attempts lost races with other writers (last: {last_race}); retry"
        )))
    }

    /// Brings the index up to date after a commit failed, or passes the error on.
    async fn learn_from(&self, err: CommitError, plan: &Plan) -> Result<(), IpamError> {
        match err {
            CommitError::AddressTaken(ip) => {
                let pool = plan
                    .items
                    .iter()
                    .find(|i| i.ip == ip)
                    .map(|i| i.pool.to_string());
                info!(%ip, "address was taken by another writer; reloading its pool");
                self.reload_pool(pool.as_deref()).await
            }
            CommitError::PoolChanged(pool) => self.reload_pool(Some(&pool)).await,
            CommitError::OwnerExists => Ok(()),
            other => Err(other.into()),
        }
    }

    /// Brings every pool whose generation differs from the store's up to date, with its
    /// claims. One small query when nothing changed.
    async fn refresh_pools(&self) -> Result<(), IpamError> {
        let stored = self.store.load_pools().await?;
        let (changed, removed): (Vec<StoredPool>, Vec<String>) = {
            let index = self.index();
            let changed = stored
                .iter()
                .filter(|p| index.pool(p.spec.name.as_str()).map(|(_, g)| g) != Some(p.generation))
                .cloned()
                .collect();
            let removed = index
                .pools()
                .map(|(spec, _)| spec.name.to_string())
                .filter(|name| !stored.iter().any(|p| p.spec.name.as_str() == name))
                .collect();
            (changed, removed)
        };
        for pool in changed {
            let claims = self
                .store
                .load_claims(Some(pool.spec.name.as_str()))
                .await?;
            let mut index = self.index();
            index.upsert_pool(pool.spec, pool.generation);
            for claim in claims {
                index.observe_assigned(claim);
            }
        }
        let mut index = self.index();
        for name in removed {
            index.remove_pool(&name);
        }
        Ok(())
    }

    /// Re-reads one pool (or, with `None`, everything) and its claims from the store.
    async fn reload_pool(&self, pool: Option<&str>) -> Result<(), IpamError> {
        let Some(name) = pool else {
            let index = load_index(&self.store).await?;
            *self.index() = index;
            return Ok(());
        };
        let stored = self.store.load_pool(name).await?;
        let claims = self.store.load_claims(Some(name)).await?;
        let mut index = self.index();
        match stored {
            Some(p) => index.upsert_pool(p.spec, p.generation),
            None => index.remove_pool(name),
        }
        for claim in claims {
            index.observe_assigned(claim);
        }
        Ok(())
    }

    /// Many owners at once. New owners are planned together and written in one
    /// transaction; anything else (known owners, dry runs, a failed batch write) takes
    /// the single-owner path. Each result is independent of the others.
    pub async fn allocate_batch(
        &self,
        requests: Vec<(AllocationRequest, bool)>,
    ) -> Vec<Result<Allocation, IpamError>> {
        let mut results: Vec<Option<Result<Allocation, IpamError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut planned: Vec<(usize, Plan)> = Vec::new();
        {
            let mut index = self.index();
            index.expire_quarantine(herald_ipam_store::now_micros());
            let mut seen = std::collections::HashSet::new();
            for (i, (req, dry_run)) in requests.iter().enumerate() {
                if *dry_run || index.holds(&req.owner.uid) || !seen.insert(req.owner.uid.as_str()) {
                    continue;
                }
                match index.plan(req) {
                    Ok(plan) => planned.push((i, plan)),
                    Err(e) => results[i] = Some(Err(e.into())),
                }
            }
        }
        if !planned.is_empty() {
            let batch: Vec<(&AllocationRequest, &Plan)> = planned
                .iter()
                .map(|(i, plan)| (&requests[*i].0, plan))
                .collect();
            let outcomes = self.store.commit_batch(&batch).await;
            let now = herald_ipam_store::now_micros();
            for ((i, plan), outcome) in planned.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => results[*i] = Some(Ok(merge(&requests[*i].0, None, plan, now))),
                    // Left for the single path below, which re-reads and retries.
                    Err(_) => self.index().abort(plan),
                }
            }
            self.feed.wake();
        }
        let mut out = Vec::with_capacity(requests.len());
        for (i, result) in results.into_iter().enumerate() {
            out.push(match result {
                Some(result) => result,
                None => self.allocate(&requests[i].0, requests[i].1).await,
            });
        }
        out
    }

    /// Releases what `owner_uid` holds. Releasing an owner with nothing is not an error,
    /// so garbage collection can call it blindly.
    #[tracing::instrument(name = "release", skip(self))]
    pub async fn release(
        &self,
        owner_uid: &str,
        reason: &str,
    ) -> Result<Vec<(IpAddr, String)>, IpamError> {
        let released = self.store.release(owner_uid, reason).await?;
        {
            let now = herald_ipam_store::now_micros();
            let mut index = self.index();
            for (ip, _) in &released {
                index.observe_released(*ip, owner_uid, Some(now));
            }
        }
        self.feed.wake();
        Ok(released)
    }

    // ---- pools -------------------------------------------------------------------------

    /// Capacity as of now: quarantines that ended since the last Allocate are ended here
    /// too, so a reader never sees addresses resting that automatic allocation would hand
    /// out.
    pub fn usage(&self, pool: &str) -> Vec<PoolUsage> {
        let mut index = self.index();
        index.expire_quarantine(herald_ipam_store::now_micros());
        index.usage(pool)
    }

    /// The capacity `spec` would give its pool if an update applied it now.
    pub fn preview_usage(&self, spec: &PoolSpec) -> Vec<PoolUsage> {
        let mut index = self.index();
        index.expire_quarantine(herald_ipam_store::now_micros());
        index.preview_usage(spec)
    }

    #[tracing::instrument(name = "create_pool", skip_all, fields(pool = %spec.name))]
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<StoredPool, IpamError> {
        let stored = self.store.create_pool(spec).await?;
        self.index()
            .upsert_pool(stored.spec.clone(), stored.generation);
        self.feed.wake();
        Ok(stored)
    }

    #[tracing::instrument(name = "update_pool", skip_all, fields(pool = %spec.name, force, dry_run))]
    pub async fn update_pool(
        &self,
        spec: &PoolSpec,
        force: bool,
        dry_run: bool,
    ) -> Result<PoolChange, IpamError> {
        let change = self.store.update_pool(spec, force, dry_run).await?;
        if !dry_run {
            self.apply_pool_change(&change, spec.name.as_str());
        }
        Ok(change)
    }

    #[tracing::instrument(name = "delete_pool", skip(self))]
    pub async fn delete_pool(
        &self,
        name: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<PoolChange, IpamError> {
        let change = self.store.delete_pool(name, force, dry_run).await?;
        if !dry_run {
            self.apply_pool_change(&change, name);
        }
        Ok(change)
    }

    fn apply_pool_change(&self, change: &PoolChange, name: &str) {
        let now = herald_ipam_store::now_micros();
        let mut index = self.index();
        for (ip, owner) in &change.released {
            index.observe_released(*ip, owner, Some(now));
        }
        match &change.pool {
            Some(pool) => index.upsert_pool(pool.spec.clone(), pool.generation),
            None => index.remove_pool(name),
        }
        drop(index);
        self.feed.wake();
    }
}

/// Whether a planning error could come from an out-of-date picture of the pools.
fn about_pool_config(err: &AllocError) -> bool {
    match err {
        AllocError::UnknownPool(_)
        | AllocError::PoolDisabled(_)
        | AllocError::PoolDoesNotServe { .. }
        | AllocError::NoPoolMatches { .. }
        | AllocError::NotInAnyPool { .. }
        | AllocError::NotInRequestedPool { .. }
        | AllocError::NotAssignable { .. } => true,
        AllocError::DualStackUnavailable(inner) => about_pool_config(inner),
        AllocError::Invalid(_)
        | AllocError::Exhausted { .. }
        | AllocError::Taken { .. }
        | AllocError::SharingConflict { .. } => false,
    }
}

async fn load_index(store: &Store) -> Result<PoolIndex, IpamError> {
    let pools = store
        .load_pools()
        .await?
        .into_iter()
        .map(|p| (p.spec, p.generation))
        .collect();
    let claims = store.load_claims(None).await?;
    let mut index = PoolIndex::load(pools, claims);
    // Quarantines outlive restarts: the change log knows what was released recently.
    let longest = index.longest_quarantine();
    if longest > 0 {
        let since = herald_ipam_store::now_micros() - i64::from(longest) * 1_000_000;
        for (ip, released_at) in store.released_since(since).await? {
            index.restore_quarantine(ip, released_at);
        }
    }
    Ok(index)
}

/// What is left to allocate for `req` given what the owner already holds.
struct Outstanding {
    request: AllocationRequest,
    /// Only families the request prefers but does not require are missing.
    optional: bool,
}

enum Todo {
    /// The owner holds everything the request asks for.
    Done(Allocation),
    Allocate(Box<Outstanding>, Option<Allocation>),
}

/// Compares a request with what its owner holds. An owner's addresses never move, so a
/// request that contradicts them is refused rather than served with new ones.
fn outstanding(req: &AllocationRequest, existing: Option<Allocation>) -> Result<Todo, IpamError> {
    let Some(existing) = existing else {
        return Ok(Todo::Allocate(
            Box::new(Outstanding {
                request: req.clone(),
                optional: false,
            }),
            None,
        ));
    };
    let wanted = req.wanted_families();
    let mismatch = |what: String| {
        IpamError::Mismatch(format!(
            "owner uid {} already holds {}; {what}. Allocations never move: release it first to change its address",
            req.owner.uid,
            existing
                .ips
                .iter()
                .map(|a| format!("{} (pool {})", a.ip, a.pool))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    };
    if existing.sharing_key != req.sharing_key {
        return Err(mismatch(format!(
            "the request has sharing_key {:?}, the allocation {:?}",
            req.sharing_key, existing.sharing_key
        )));
    }
    for AssignedIp { ip, pool } in &existing.ips {
        let family = IpFamily::of(*ip);
        if !wanted.contains(&family) {
            return Err(mismatch(format!("the request no longer asks for {family}")));
        }
        if let Some(want) = req.requested_ip(family).filter(|want| want != ip) {
            return Err(mismatch(format!("the request asks for {want}")));
        }
        if let Some(want) = req.requested_pool.as_ref().filter(|want| *want != pool) {
            return Err(mismatch(format!("the request asks for pool {want}")));
        }
    }
    let missing: Vec<(usize, IpFamily)> = wanted
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, f)| !existing.ips.iter().any(|a| IpFamily::of(a.ip) == *f))
        .collect();
    if missing.is_empty() {
        return Ok(Todo::Done(existing));
    }
    let optional = missing
        .iter()
        .all(|(i, _)| *i > 0 && req.family_policy != FamilyPolicy::RequireDualStack);
    let mut request = req.clone();
    request.families = missing.iter().map(|(_, f)| *f).collect();
    request.family_policy = if request.families.len() > 1 {
        req.family_policy
    } else {
        FamilyPolicy::SingleStack
    };
    Ok(Todo::Allocate(
        Box::new(Outstanding { request, optional }),
        Some(existing),
    ))
}

/// The owner's allocation after `plan` is written on top of `existing`.
fn merge(
    req: &AllocationRequest,
    existing: Option<Allocation>,
    plan: &Plan,
    now: i64,
) -> Allocation {
    let mut allocation = existing.unwrap_or_else(|| Allocation {
        owner: req.owner.clone(),
        ips: Vec::new(),
        sharing_key: req.sharing_key.clone(),
        ports: req.ports.clone(),
        traffic_policy: req.traffic_policy,
        created_at: now,
    });
    allocation.ips.extend(plan.items.iter().map(|i| AssignedIp {
        ip: i.ip,
        pool: i.pool.clone(),
    }));
    allocation.ips.sort_by_key(|a| IpFamily::of(a.ip));
    allocation
}
