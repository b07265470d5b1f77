//! The IPAM engine behind the gRPC surface: it plans in memory (the [`PoolIndex`]) and
//! lets the store's constraints decide, retrying the rare plan that lost a race with
//! another replica.

use crate::changes::Changes;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use herald_ipam_core::{AllocError, ClaimRecord, Plan, PoolIndex, PoolUsage};
use herald_ipam_store::{CommitError, PoolChange, Store, StoredPool};
use herald_model::{
    Allocation, AllocationRequest, AssignedIp, FamilyPolicy, IpFamily, PoolSpec, same_ports,
};
use tracing::{debug, info};

use crate::IpamError;
use crate::feed::Feed;
use crate::writer::Writer;

/// Lost races one Allocate retries before it answers ABORTED. A lost race teaches the
/// index the winner's address and moves this replica's search elsewhere in the pool, so
/// ordinary contention between replicas costs one retry; only a pathological fight (many
/// replicas over a pool's last few addresses) comes near this.
const MAX_LOST_RACES: usize = 32;
/// The pause after a first lost race; it doubles, with jitter, up to
/// [`LOST_RACE_MAX_PAUSE`], so that writers that keep meeting stop meeting in step.
const LOST_RACE_PAUSE: Duration = Duration::from_millis(1);
const LOST_RACE_MAX_PAUSE: Duration = Duration::from_millis(50);
/// All pauses of one Allocate together stay under this: with the queries in between it
/// keeps a contended call within a few seconds, below a client's usual deadline.
const LOST_RACE_TOTAL_PAUSE: Duration = Duration::from_secs(2);
/// How long a replica that lost a race for an address of a pool searches that pool from a
/// random point instead of from the lowest free address. Every further lost race there
/// restarts it, so it lasts while another replica keeps allocating from the pool; a
/// replica left alone returns to handing out the lowest free address.
const SPREAD_FOR: Duration = Duration::from_secs(60);
/// Most requests in one AllocateBatch.
pub const MAX_BATCH: usize = 1000;

pub struct Ipam {
    store: Store,
    writer: Writer,
    index: Mutex<PoolIndex>,
    feed: Feed,
    changes: Changes,
}

impl Ipam {
    /// Loads every pool and claim into memory. With 100k allocations this is one streamed
    /// query, which bounds the time to SERVING after a restart.
    pub async fn open(store: Store) -> Result<Arc<Self>, IpamError> {
        // Taken before the state is loaded, and once no transaction that could still add a
        // change below it is running: the feed follows from here and misses nothing.
        let last_revision = crate::feed::settled_revision(&store).await?;
        Self::open_at(store, last_revision).await
    }

    /// As [`Ipam::open`], from `last_revision`, a [`crate::feed::settled_revision`] taken
    /// before: whatever else loads the store's state after it (the route engine's inputs)
    /// may do so at the same time.
    pub(crate) async fn open_at(store: Store, last_revision: i64) -> Result<Arc<Self>, IpamError> {
        let started = std::time::Instant::now();
        let index = load_index(&store).await?;
        tracing::info!(
            claims = index.claim_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "allocation index loaded"
        );
        Ok(Self::with_index(store, index, last_revision))
    }

    /// The service over an index loaded at `last_revision` (see [`IndexLoading`]).
    pub(crate) fn with_index(store: Store, index: PoolIndex, last_revision: i64) -> Arc<Self> {
        Arc::new(Self {
            writer: Writer::start(store.clone()),
            store,
            index: Mutex::new(index),
            feed: Feed::new(last_revision),
            changes: Changes::default(),
        })
    }

    /// The trace contexts of the changes asked of this replica, for the route engine.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// Completes if the group-commit writer stops (see [`Writer::stopped`]).
    pub(crate) async fn writer_stopped(&self) {
        self.writer.stopped().await;
    }

    /// The index lock is only ever held for in-memory work, never across an await.
    pub(crate) fn index(&self) -> MutexGuard<'_, PoolIndex> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- allocations -------------------------------------------------------------------

    /// Gives `req.owner` its addresses: the ones it already holds when they still match the
    /// request (updating its ports and traffic policy when those changed), otherwise new
    /// ones. With `dry_run` nothing is written or reserved.
    #[tracing::instrument(name = "allocate", skip_all, fields(service = %format!("{}/{}", req.owner.namespace, req.owner.name), uid = %req.owner.uid))]
    pub async fn allocate(
        &self,
        req: &AllocationRequest,
        dry_run: bool,
    ) -> Result<Allocation, IpamError> {
        let mut last_race = String::new();
        let mut pools_refreshed = false;
        let mut sharers_refreshed = false;
        let started = Instant::now();
        let mut lost_races = 0;
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(LOST_RACE_PAUSE)
            .with_max_delay(LOST_RACE_MAX_PAUSE)
            .with_max_times(MAX_LOST_RACES)
            .with_total_delay(Some(LOST_RACE_TOTAL_PAUSE))
            .with_jitter()
            .build();
        // Bounded: one turn to read the owner, one to refresh the pools, one to refresh
        // the sharers, one to re-read an allocation that changed under an update, and the
        // lost races, which `pauses` bounds in count and time.
        for attempt in 0..MAX_LOST_RACES + 4 {
            // A new owner costs one statement; only a known owner (or a lost race) reads
            // back what it holds.
            let read_store = attempt > 0 || self.index().holds(&req.owner.uid);
            let existing = if read_store {
                self.store.get_held(&req.owner.uid).await?
            } else {
                None
            };
            let mut todo = outstanding(req, existing)?;
            if let Todo::Update(held) = todo {
                let Some(updated) = self.update(req, *held, dry_run).await? else {
                    // Released or changed by another call meanwhile: read it again.
                    continue;
                };
                // A family the owner does not hold yet may still be outstanding.
                todo = outstanding(req, Some((updated, req.claim_tag())))?;
            }
            let (todo, existing) = match todo {
                Todo::Done(held) => return Ok(held),
                // Not reached: the updated allocation matches the request.
                Todo::Update(held) => return Ok(*held),
                Todo::Allocate(todo, existing) => (todo, existing),
            };
            let planned = {
                let mut index = self.index();
                let now = herald_ipam_store::now_micros();
                index.expire_quarantine(now);
                index.expire_spread(now);
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
                // The sharers' ports or policy may have changed through another replica a
                // moment ago: look at what the store holds once before refusing.
                (Err(AllocError::SharingConflict { .. }), _) if !sharers_refreshed => {
                    sharers_refreshed = true;
                    let ips = self.index().shared_ips(&req.sharing_key);
                    self.refresh_claims(&ips).await?;
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
                Ok(revision) => {
                    self.index()
                        .note_local_write(plan.items.iter().map(|i| i.ip), revision);
                    self.feed.wake();
                    debug!(ips = ?plan.items.iter().map(|i| i.ip).collect::<Vec<_>>(), "allocated");
                    return Ok(merge(req, existing, &plan, herald_ipam_store::now_micros()));
                }
                Err(err) => {
                    last_race = err.to_string();
                    self.learn_from(err, &todo.request, &plan).await?;
                    lost_races += 1;
                    match pauses.next() {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => break,
                    }
                }
            }
        }
        Err(IpamError::Contended(format!(
            "gave up after losing {lost_races} races with other writers in {} ms (last: {last_race}); retry",
            started.elapsed().as_millis()
        )))
    }

    /// Changes the ports and traffic policy of `held`, which `req`'s owner holds, to the
    /// request's; its addresses stay. The index refuses a change that collides with
    /// another sharer it knows of, the store one that collides with any. `None` when the
    /// allocation changed between reading and updating it.
    async fn update(
        &self,
        req: &AllocationRequest,
        held: Allocation,
        dry_run: bool,
    ) -> Result<Option<Allocation>, IpamError> {
        let ips: Vec<IpAddr> = held.ips.iter().map(|a| a.ip).collect();
        if self.index().check_update(req, &ips).is_err() {
            // The index may be behind another replica's change: judge on the store's.
            self.refresh_claims(&ips).await?;
            self.index().check_update(req, &ips)?;
        }
        let updated = Allocation {
            ports: req.ports.clone(),
            traffic_policy: req.traffic_policy,
            ..held.clone()
        };
        if dry_run {
            return Ok(Some(updated));
        }
        match self.store.update_allocation(req, &held).await {
            Ok(revision) => {
                let mut index = self.index();
                index.note_local_write(ips.iter().copied(), revision);
                for assigned in &held.ips {
                    index.observe_updated(ClaimRecord {
                        ip: assigned.ip,
                        tag: req.claim_tag(),
                        pool: assigned.pool.to_string(),
                        owner_uid: req.owner.uid.clone(),
                        ports: req.ports.clone(),
                    });
                }
                drop(index);
                self.feed.wake();
                info!(?ips, "updated ports and traffic policy");
                Ok(Some(updated))
            }
            Err(CommitError::AllocationChanged) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Re-reads who holds each of `ips` (their ports and tag) from the store.
    async fn refresh_claims(&self, ips: &[IpAddr]) -> Result<(), IpamError> {
        for &ip in ips {
            let holders = self.store.load_claims_at(ip).await?;
            self.index().refresh_claim(ip, holders);
        }
        Ok(())
    }

    /// Gives back `plan`, whose commit failed with `err`, and brings the index up to date,
    /// or passes the error on.
    async fn learn_from(
        &self,
        err: CommitError,
        req: &AllocationRequest,
        plan: &Plan,
    ) -> Result<(), IpamError> {
        let taken = match err {
            CommitError::AddressTaken(ip) => plan.items.iter().find(|i| i.ip == ip),
            _ => None,
        };
        let Some(item) = taken else {
            self.index().abort(plan);
            return match err {
                CommitError::AddressTaken(_) => self.reload_pool(None).await,
                CommitError::PoolChanged(pool) => self.reload_pool(Some(&pool)).await,
                CommitError::OwnerExists => Ok(()),
                other => Err(other.into()),
            };
        };
        // Another replica committed this address first. Read who holds it while the plan
        // still reserves it, so no other call here plans it in between.
        let winners = match self.store.load_claims_at(item.ip).await {
            Ok(winners) => winners,
            Err(e) => {
                self.index().abort(plan);
                return Err(e.into());
            }
        };
        let pool = item.pool.as_str();
        if winners.is_empty() {
            // Gone again already, or the conflict was about the pool: read it afresh.
            self.index().abort(plan);
            return self.reload_pool(Some(pool)).await;
        }
        // A replica that searches from the lowest free address, like the one it lost to,
        // would lose again and again: search from a new random point in the pool instead.
        let automatic = req.requested_ip(item.family).is_none() && !item.joins_shared;
        let spread_until = herald_ipam_store::now_micros()
            + i64::try_from(SPREAD_FOR.as_micros()).unwrap_or(i64::MAX);
        let started_spreading = {
            let mut index = self.index();
            index.abort(plan);
            refresh_holders(&mut index, winners);
            let was_spread = index.is_spread(pool, item.family);
            if automatic {
                index.spread(pool, item.family, rand::random(), spread_until);
            }
            automatic && !was_spread
        };
        if started_spreading {
            info!(
                %pool,
                ip = %item.ip,
                for_s = SPREAD_FOR.as_secs(),
                "another replica allocates from this pool too; searching it from a random point"
            );
        } else {
            debug!(%pool, ip = %item.ip, "address was taken by another writer");
        }
        Ok(())
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
            refresh_holders(&mut index, claims);
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
        refresh_holders(&mut index, claims);
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
            let now = herald_ipam_store::now_micros();
            index.expire_quarantine(now);
            index.expire_spread(now);
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
                    Ok(revision) => {
                        self.index()
                            .note_local_write(plan.items.iter().map(|i| i.ip), revision);
                        results[*i] = Some(Ok(merge(&requests[*i].0, None, plan, now)));
                    }
                    // Left for the single path below, which re-reads and retries.
                    Err(_) => self.index().abort(plan),
                }
            }
            self.feed.wake();
        }
        // The rest (known owners, and updates) one after the other, in the batch's order:
        // an update may collide with one before it in the same batch (two sharers asking
        // for the same port), and the earlier one must win, as it would in two calls.
        // (Running them a few at once made the cold start with 10,000 held addresses
        // faster, but let a later item win such a collision.)
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
            for (ip, _) in &released.addresses {
                index.observe_released(*ip, owner_uid, Some(now));
            }
            index.note_local_write(
                released.addresses.iter().map(|(ip, _)| *ip),
                released.revision,
            );
        }
        self.feed.wake();
        Ok(released.addresses)
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
        index.note_local_write(change.released.iter().map(|(ip, _)| *ip), change.revision);
        match &change.pool {
            Some(pool) => index.upsert_pool(pool.spec.clone(), pool.generation),
            None => index.remove_pool(name),
        }
        drop(index);
        self.feed.wake();
    }
}

/// Takes the store's holders of each address in `claims` into the index. A shared
/// address's holders replace what the index knew (their ports and the tag, which another
/// replica may have updated); an exclusive one's, the common case on a reload after a lost
/// race, are added as before.
fn refresh_holders(index: &mut PoolIndex, claims: Vec<ClaimRecord>) {
    let mut by_ip: std::collections::HashMap<IpAddr, Vec<ClaimRecord>> =
        std::collections::HashMap::new();
    for claim in claims {
        if claim.tag.starts_with("s:") {
            by_ip.entry(claim.ip).or_default().push(claim);
        } else {
            index.observe_assigned(claim);
        }
    }
    for (ip, holders) in by_ip {
        index.refresh_claim(ip, holders);
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
    let mut loading = IndexLoading::start(store, store.claim_count().await?).await?;
    store.each_claim(|claim| loading.claim(claim)).await?;
    loading.finish(store).await
}

/// The allocation index while it loads: the pools, then every claim, as
/// [`Store::each_claim`] (or, at start-up, [`Store::each_held_address`]) hands them over.
pub(crate) struct IndexLoading {
    index: PoolIndex,
}

impl IndexLoading {
    /// Reads the pools and makes room for `claims` claims.
    pub(crate) async fn start(store: &Store, claims: u64) -> Result<Self, IpamError> {
        let pools = store
            .load_pools()
            .await?
            .into_iter()
            .map(|p| (p.spec, p.generation))
            .collect();
        let mut index = PoolIndex::with_pools(pools);
        // Sized once up front: growing the maps while loading would hold the old and the
        // new tables at once, and the allocator keeps that peak after the load.
        index.reserve(usize::try_from(claims).unwrap_or(0));
        Ok(Self { index })
    }

    pub(crate) fn claim(&mut self, claim: ClaimRecord) {
        self.index.observe_assigned(claim);
    }

    /// The uid the index keeps for an owner it holds addresses of.
    pub(crate) fn owner_key(&self, owner_uid: &str) -> Option<Arc<str>> {
        self.index.owner_key(owner_uid)
    }

    /// The index, with the quarantines the change log says are still running.
    pub(crate) async fn finish(self, store: &Store) -> Result<PoolIndex, IpamError> {
        let mut index = self.index;
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
    /// The owner holds its addresses, but under other ports or another traffic policy.
    Update(Box<Allocation>),
    Allocate(Box<Outstanding>, Option<Allocation>),
}

/// Compares a request with what its owner holds, given with the claim tag it holds it
/// under. An owner's addresses never move, so a request that contradicts them is refused
/// rather than served with new ones; so is one from another Service with the same uid.
fn outstanding(
    req: &AllocationRequest,
    existing: Option<(Allocation, String)>,
) -> Result<Todo, IpamError> {
    let Some((existing, tag)) = existing else {
        return Ok(Todo::Allocate(
            Box::new(Outstanding {
                request: req.clone(),
                optional: false,
            }),
            None,
        ));
    };
    check_same_owner(req, &existing)?;
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
    if !same_ports(&existing.ports, &req.ports)
        || existing.traffic_policy != req.traffic_policy
        || tag != req.claim_tag()
    {
        return Ok(Todo::Update(Box::new(existing)));
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

/// Refuses a request whose owner shares a uid with the holder of an allocation but is
/// another Service: another cluster, namespace or name. Handing it the holder's addresses
/// would let one cluster take over (and later release) another's.
fn check_same_owner(req: &AllocationRequest, existing: &Allocation) -> Result<(), IpamError> {
    let (held, asking) = (&existing.owner, &req.owner);
    let differences: Vec<String> = [
        ("cluster_id", &held.cluster_id, &asking.cluster_id),
        ("namespace", &held.namespace, &asking.namespace),
        ("name", &held.name, &asking.name),
    ]
    .into_iter()
    .filter(|(_, held, asking)| held != asking)
    .map(|(field, held, asking)| format!("owner.{field} {held:?}, not {asking:?}"))
    .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(IpamError::Mismatch(format!(
        "owner uid {:?} is held by another Service: {}. An owner is identified by its cluster_id and uid; each Service needs a uid of its own",
        held.uid,
        differences.join(", ")
    )))
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
