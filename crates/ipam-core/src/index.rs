//! The in-memory picture of pools and the addresses in use, from which the service plans
//! each allocation. It is a cache: the store's constraints decide, and the service feeds
//! every committed change (its own and other replicas') back in. Whenever it is out of
//! date it errs towards "taken", which can only cost a retry, never a duplicate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use herald_model::addr::{ip_to_u128, u128_to_ip};
use herald_model::{AllocationRequest, FamilyPolicy, IpFamily, PoolName, PoolSpec, ServicePort};
use smallvec::{SmallVec, smallvec};

use crate::{AllocError, FreeSet};

/// One owner's hold on one address, as loaded from the store or seen in the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    pub ip: IpAddr,
    pub tag: String,
    pub pool: String,
    pub owner_uid: String,
    pub ports: Vec<ServicePort>,
}

/// Capacity of one family of one pool. `total` and `free` can exceed `u64` for IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub family: IpFamily,
    pub total: u128,
    pub used: u64,
    /// Released addresses resting under the pool's `quarantine_seconds`.
    pub quarantined: u64,
}

impl PoolUsage {
    /// Addresses automatic allocation may hand out now.
    pub fn free(&self) -> u128 {
        self.total
            .saturating_sub(u128::from(self.used))
            .saturating_sub(u128::from(self.quarantined))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub ip: IpAddr,
    pub family: IpFamily,
    pub pool: PoolName,
    pub pool_generation: i64,
    /// Whether the address was free (a new claim) or is joined under a sharing key.
    pub joins_shared: bool,
    /// When the address was released, if it was resting in quarantine when a request
    /// named it: giving the plan back puts it to rest again.
    pub resting_since: Option<i64>,
}

/// The addresses chosen for one request. They are reserved in the index until the caller
/// either commits them to the store or hands the plan back to [`PoolIndex::abort`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub owner_uid: String,
    pub tag: String,
    pub items: Vec<PlanItem>,
}

#[derive(Debug)]
struct PoolState {
    /// The pool's name, which every claim of the pool shares rather than copies.
    name: Arc<str>,
    spec: PoolSpec,
    generation: i64,
    free: [FreeSet; 2],
    total: [u128; 2],
    used: [u64; 2],
    /// Released addresses in quarantine, per family: value → when it was released (µs).
    /// They are in no free set until [`PoolIndex::expire_quarantine`] returns them.
    resting: [HashMap<u128, i64>; 2],
    /// The same addresses as `(released at, family slot, value)`, oldest first.
    resting_order: BTreeSet<(i64, usize, u128)>,
    /// Per family, where automatic allocation starts looking while another replica is
    /// known to allocate from this pool too; `None`: at the lowest free address.
    spread: [Option<Spread>; 2],
}

/// A starting point for automatic allocation other than the lowest free address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spread {
    /// Free addresses are taken upwards from here, wrapping round to the lowest.
    from: u128,
    /// When (µs) the pool goes back to the lowest free address.
    until: i64,
}

/// Who holds one address. Kept small, as there is one per allocation: the pool's name and
/// the owners' uids are shared, not copied, and an owner's own tag is not spelt out.
#[derive(Debug)]
struct Claim {
    tag: ClaimTag,
    pool: Arc<str>,
    /// Sorted by uid; nearly always one, which is kept inline rather than in an
    /// allocation of its own (48 bytes from malloc per address).
    owners: SmallVec<[Holder; 1]>,
}

#[derive(Debug)]
struct Holder {
    uid: Arc<str>,
    ports: Box<[ServicePort]>,
}

/// The tag an address is claimed under (see `AllocationRequest::claim_tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClaimTag {
    /// `o:<uid>`, an owner's own tag: the uid is the one its holder and the owner lookup
    /// share.
    Owner(Arc<str>),
    /// Any other tag, a sharing key's `s:<key>|<policy>`.
    Other(Box<str>),
}

impl ClaimTag {
    /// `tag`, sharing the uid of an owner's own tag with `owners` when it is there.
    fn new(tag: &str, owners: &HashMap<Arc<str>, u32>) -> Self {
        match tag.strip_prefix("o:") {
            Some(uid) => Self::Owner(intern(owners, uid)),
            None => Self::Other(Box::from(tag)),
        }
    }

    fn is(&self, tag: &str) -> bool {
        match self {
            Self::Owner(uid) => tag.strip_prefix("o:") == Some(&**uid),
            Self::Other(own) => **own == *tag,
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Owner(uid) => format!("o:{uid}"),
            Self::Other(tag) => tag.to_string(),
        }
    }

    fn shared_key(&self) -> Option<&str> {
        match self {
            Self::Owner(_) => None,
            Self::Other(tag) => shared_key(tag),
        }
    }
}

impl Claim {
    fn holder(&self, uid: &str) -> Result<usize, usize> {
        self.owners.binary_search_by(|h| (*h.uid).cmp(uid))
    }

    fn is_held_by(&self, uid: &str) -> bool {
        self.holder(uid).is_ok()
    }

    fn uids(&self) -> impl ExactSizeIterator<Item = &str> {
        self.owners.iter().map(|h| &*h.uid)
    }
}

#[derive(Debug, Default)]
pub struct PoolIndex {
    pools: BTreeMap<String, PoolState>,
    /// Pool names by (priority, name): the order in which automatic allocation tries them.
    order: Vec<(i32, String)>,
    claims: HashMap<IpAddr, Claim>,
    /// Shared addresses by sharing key, to find the IP a new member of a group joins.
    shared: HashMap<String, BTreeSet<IpAddr>>,
    /// How many addresses each owner holds, so a repeated Allocate is recognised without
    /// the store. Which ones is in `claims`; the key is the uid the claims share.
    owners: HashMap<Arc<str>, u32>,
    /// This replica's own writes, applied here when they were made, whose log entries the
    /// change feed may not have read yet: by address, the revision of the latest. A logged
    /// change to the address at or below it is older than what the index holds (an
    /// allocation's `assigned` read after its own release was applied, say) and is not
    /// applied again.
    local_writes: HashMap<IpAddr, i64>,
}

fn slot(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

/// Whether the first and last address of a CIDR are withheld: Cilium's rule, which never
/// applies to /31, /32, /127 and /128, whose every address is a usable host.
fn withholds_edges(spec: &PoolSpec, range: &herald_model::AddrRange) -> bool {
    !spec.allow_first_last
        && range
            .prefix_len
            .is_some_and(|len| len + 1 < range.family.bits())
}

fn is_buggy(family: IpFamily, value: u128) -> bool {
    family == IpFamily::V4 && matches!(value & 0xff, 0 | 0xff)
}

/// How many values `v` in `first..=last` have `v % 256 == rem`.
fn count_with_low_byte(first: u128, last: u128, rem: u128) -> u128 {
    let upto = |n: u128| if n < rem { 0 } else { (n - rem) / 256 + 1 };
    upto(last) - if first == 0 { 0 } else { upto(first - 1) }
}

/// The ranges of a pool that may be handed out, per family, before buggy-address skipping.
fn usable_ranges(spec: &PoolSpec) -> Vec<(IpFamily, u128, u128)> {
    spec.addresses
        .iter()
        .filter_map(|r| {
            if withholds_edges(spec, r) {
                (r.first < r.last - 1).then(|| (r.family, r.first + 1, r.last - 1))
            } else {
                Some((r.family, r.first, r.last))
            }
        })
        .collect()
}

/// Why `ip` cannot be handed out from `spec`, if it cannot.
fn unassignable_reason(spec: &PoolSpec, ip: IpAddr) -> Option<&'static str> {
    let value = ip_to_u128(ip);
    let range = spec.addresses.iter().find(|r| r.contains(ip))?;
    if withholds_edges(spec, range) && (value == range.first || value == range.last) {
        return Some("it is the first or last address of its CIDR and allow_first_last is off");
    }
    if spec.avoid_buggy_ips && is_buggy(range.family, value) {
        return Some("it ends in .0 or .255 and avoid_buggy_ips is on");
    }
    None
}

impl PoolState {
    fn new(spec: PoolSpec, generation: i64) -> Self {
        let mut free = [FreeSet::new(), FreeSet::new()];
        let mut total = [0u128; 2];
        for (family, first, last) in usable_ranges(&spec) {
            free[slot(family)].insert_range(first, last);
            let mut size = (last - first).saturating_add(1);
            if spec.avoid_buggy_ips && family == IpFamily::V4 {
                size -=
                    count_with_low_byte(first, last, 0) + count_with_low_byte(first, last, 0xff);
            }
            total[slot(family)] = total[slot(family)].saturating_add(size);
        }
        Self {
            name: Arc::from(spec.name.as_str()),
            spec,
            generation,
            free,
            total,
            used: [0; 2],
            resting: [HashMap::new(), HashMap::new()],
            resting_order: BTreeSet::new(),
            spread: [None, None],
        }
    }

    /// Puts a free, unclaimed address of this pool in quarantine from `released_at`.
    fn rest(&mut self, family: IpFamily, value: u128, released_at: i64) {
        let s = slot(family);
        self.free[s].remove(value);
        if let Some(before) = self.resting[s].insert(value, released_at) {
            self.resting_order.remove(&(before, s, value));
        }
        self.resting_order.insert((released_at, s, value));
    }

    /// Takes an address out of quarantine without freeing it (it is being claimed).
    fn unrest(&mut self, family: IpFamily, value: u128) {
        let s = slot(family);
        if let Some(at) = self.resting[s].remove(&value) {
            self.resting_order.remove(&(at, s, value));
        }
    }

    /// The next free address of `family`: the lowest, or while the pool is spread (and
    /// `may_spread`) the lowest at or above the spread's starting point, wrapping round to
    /// the lowest. Addresses that `avoid_buggy_ips` rules out are skipped and dropped for
    /// good; each is dropped once, so this stays O(log n).
    fn take_next(&mut self, family: IpFamily, may_spread: bool) -> Option<u128> {
        let from = self.spread[slot(family)]
            .filter(|_| may_spread)
            .map(|s| s.from);
        let free = &mut self.free[slot(family)];
        let next = |free: &FreeSet| {
            from.and_then(|from| free.first_at_or_after(from))
                .or_else(|| free.lowest())
        };
        // Bounded: every turn removes one address from a finite set.
        while let Some(value) = next(free) {
            free.remove(value);
            if !(self.spec.avoid_buggy_ips && is_buggy(family, value)) {
                return Some(value);
            }
        }
        None
    }
}

fn usage_of(pool: &PoolState) -> Vec<PoolUsage> {
    pool.spec
        .families()
        .map(|family| PoolUsage {
            family,
            total: pool.total[slot(family)],
            used: pool.used[slot(family)],
            quarantined: pool.resting[slot(family)].len() as u64,
        })
        .collect()
}

impl PoolIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole picture: every pool with its generation, and every claim.
    pub fn load(pools: Vec<(PoolSpec, i64)>, claims: Vec<ClaimRecord>) -> Self {
        let mut index = Self::with_pools(pools);
        for claim in claims {
            index.observe_assigned(claim);
        }
        index
    }

    /// Every pool with its generation and no claims yet: the claims can then be fed in
    /// with [`PoolIndex::observe_assigned`] as they are read, without holding them all.
    pub fn with_pools(pools: Vec<(PoolSpec, i64)>) -> Self {
        let mut index = Self::new();
        for (spec, generation) in pools {
            index
                .pools
                .insert(spec.name.to_string(), PoolState::new(spec, generation));
        }
        index.reorder();
        index
    }

    /// How many addresses are claimed (or reserved by a plan).
    pub fn claim_count(&self) -> usize {
        self.claims.len()
    }

    /// The uid the index keeps for `owner_uid`, while it holds an address: for whoever
    /// keeps the owner too (the route engine, loading beside the index) to share rather
    /// than copy.
    pub fn owner_key(&self, owner_uid: &str) -> Option<Arc<str>> {
        self.owners
            .get_key_value(owner_uid)
            .map(|(uid, _)| Arc::clone(uid))
    }

    /// Room for `claims` more claims, when their number is known before they are fed in.
    pub fn reserve(&mut self, claims: usize) {
        self.claims.reserve(claims);
        self.owners.reserve(claims);
    }

    fn reorder(&mut self) {
        self.order = self
            .pools
            .iter()
            .map(|(name, p)| (p.spec.priority, name.clone()))
            .collect();
        self.order.sort();
    }

    /// Installs a created or updated pool; claims already recorded for it stay taken.
    pub fn upsert_pool(&mut self, spec: PoolSpec, generation: i64) {
        let name = spec.name.to_string();
        if self
            .pools
            .get(&name)
            .is_some_and(|p| p.generation >= generation)
        {
            return;
        }
        // Claims outside the new spec count until their release is observed.
        let state = self.state_under(spec, generation, |_| true);
        self.pools.insert(name, state);
        self.reorder();
    }

    /// The capacity `spec` would give its pool if it replaced the current one now, as an
    /// update would apply it: claims outside the new addresses are released (a forced
    /// update releases them; an unforced one is refused), claims inside stay used, and
    /// resting addresses the new spec still hands out keep resting. Changes nothing.
    pub fn preview_usage(&self, spec: &PoolSpec) -> Vec<PoolUsage> {
        let generation = self.pool(spec.name.as_str()).map_or(0, |(_, g)| g);
        usage_of(&self.state_under(spec.clone(), generation, |ip| spec.contains(ip)))
    }

    /// The state of pool `spec` with the claims recorded for it that `keep` accepts, and
    /// the quarantines of its current state.
    fn state_under(
        &self,
        spec: PoolSpec,
        generation: i64,
        keep: impl Fn(IpAddr) -> bool,
    ) -> PoolState {
        let name = spec.name.to_string();
        let mut state = PoolState::new(spec, generation);
        for (ip, claim) in &self.claims {
            if *claim.pool == *name && keep(*ip) {
                let family = IpFamily::of(*ip);
                state.free[slot(family)].remove(ip_to_u128(*ip));
                state.used[slot(family)] += 1;
            }
        }
        // A changed spec does not cut a quarantine short; addresses it no longer hands
        // out leave it.
        if let Some(old) = self.pools.get(&name) {
            for &(released_at, s, value) in &old.resting_order {
                let family = if s == 0 { IpFamily::V4 } else { IpFamily::V6 };
                let ip = u128_to_ip(family, value);
                if state.free[s].contains(value) && unassignable_reason(&state.spec, ip).is_none() {
                    state.rest(family, value, released_at);
                }
            }
            state.spread = old.spread;
        }
        state
    }

    pub fn remove_pool(&mut self, name: &str) {
        self.pools.remove(name);
        self.reorder();
    }

    pub fn pool(&self, name: &str) -> Option<(&PoolSpec, i64)> {
        self.pools.get(name).map(|p| (&p.spec, p.generation))
    }

    pub fn pools(&self) -> impl Iterator<Item = (&PoolSpec, i64)> {
        self.order.iter().filter_map(|(_, name)| self.pool(name))
    }

    pub fn usage(&self, name: &str) -> Vec<PoolUsage> {
        self.pools.get(name).map(usage_of).unwrap_or_default()
    }

    /// The pool whose addresses contain `ip`, if any.
    pub fn pool_of(&self, ip: IpAddr) -> Option<&PoolSpec> {
        self.pools
            .values()
            .map(|p| &p.spec)
            .find(|spec| spec.contains(ip))
    }

    /// Records that `claim.owner_uid` holds `claim.ip`. Idempotent, so the service can feed
    /// both its own commits and the change feed through it.
    pub fn observe_assigned(&mut self, claim: ClaimRecord) {
        let ClaimRecord {
            ip,
            tag,
            pool,
            owner_uid,
            ports,
        } = claim;
        let family = IpFamily::of(ip);
        let ports = ports.into_boxed_slice();
        if let Some(existing) = self.claims.get_mut(&ip) {
            // In the store every holder of an address has its tag, so a different one here
            // is this replica's reservation, made for a plan that is about to lose the race
            // to the claim observed now: the observed tag is the true one.
            if !existing.tag.is(&tag) {
                if let Some(key) = existing.tag.shared_key()
                    && let Some(ips) = self.shared.get_mut(key)
                {
                    ips.remove(&ip);
                    if ips.is_empty() {
                        self.shared.remove(key);
                    }
                }
                if let Some(key) = shared_key(&tag) {
                    self.shared.entry(key.to_string()).or_default().insert(ip);
                }
                existing.tag = ClaimTag::new(&tag, &self.owners);
            }
            match existing.holder(&owner_uid) {
                Ok(at) => existing.owners[at].ports = ports,
                Err(at) => {
                    let uid = hold(&mut self.owners, &owner_uid);
                    existing.owners.insert(at, Holder { uid, ports });
                }
            }
            return;
        }
        let pool = match self.pools.get_mut(&pool) {
            Some(state) => {
                // A Service that names a resting address may take it; it leaves quarantine.
                state.unrest(family, ip_to_u128(ip));
                state.free[slot(family)].remove(ip_to_u128(ip));
                state.used[slot(family)] += 1;
                Arc::clone(&state.name)
            }
            None => Arc::from(pool),
        };
        if let Some(key) = shared_key(&tag) {
            self.shared.entry(key.to_string()).or_default().insert(ip);
        }
        let uid = hold(&mut self.owners, &owner_uid);
        self.claims.insert(
            ip,
            Claim {
                tag: ClaimTag::new(&tag, &self.owners),
                pool,
                owners: smallvec![Holder { uid, ports }],
            },
        );
    }

    /// Records that `claim.owner_uid`, which holds `claim.ip`, changed its ports or its
    /// traffic policy (and with it the claim's tag). The store changes a tag only for an
    /// address that owner holds alone. Idempotent; an address the index did not know of
    /// is recorded as assigned.
    pub fn observe_updated(&mut self, claim: ClaimRecord) {
        if self
            .claims
            .get(&claim.ip)
            .is_some_and(|c| c.uids().all(|uid| uid == claim.owner_uid))
        {
            self.retag(claim.ip, &claim.tag);
        }
        self.observe_assigned(claim);
    }

    /// Replaces what the index knows of `ip`'s holders (owners, their ports, the tag) with
    /// `holders`, as the store has them now: another replica may have changed them since
    /// the change feed last brought news. With no holders nothing changes: the release
    /// comes through the feed, with the time its quarantine counts from.
    pub fn refresh_claim(&mut self, ip: IpAddr, holders: Vec<ClaimRecord>) {
        let Some(first) = holders.first() else {
            return;
        };
        let tag = first.tag.clone();
        let gone: Vec<String> = self
            .claims
            .get(&ip)
            .map(|c| {
                c.uids()
                    .filter(|uid| !holders.iter().any(|h| h.owner_uid == *uid))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for uid in gone {
            self.observe_released(ip, &uid, None);
        }
        self.retag(ip, &tag);
        for holder in holders {
            self.observe_assigned(holder);
        }
    }

    /// The addresses shared under `key`.
    pub fn shared_ips(&self, key: &str) -> Vec<IpAddr> {
        self.shared
            .get(key)
            .map(|ips| ips.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Changes the tag `ip` is claimed under, keeping the sharing-key lookup in step.
    fn retag(&mut self, ip: IpAddr, tag: &str) {
        let Some(claim) = self.claims.get_mut(&ip) else {
            return;
        };
        if claim.tag.is(tag) {
            return;
        }
        let old_key = claim.tag.shared_key().map(str::to_string);
        claim.tag = ClaimTag::new(tag, &self.owners);
        if let Some(key) = old_key
            && let Some(ips) = self.shared.get_mut(&key)
        {
            ips.remove(&ip);
            if ips.is_empty() {
                self.shared.remove(&key);
            }
        }
        if let Some(key) = shared_key(tag) {
            self.shared.entry(key.to_string()).or_default().insert(ip);
        }
    }

    /// Records that `owner_uid` no longer holds `ip`. Once its last owner is gone the
    /// address is free again, or, when `released_at` (µs) is given and the pool asks for
    /// a quarantine, rests until [`PoolIndex::expire_quarantine`] frees it. `None` gives
    /// back a reservation that was never committed, which no one can have seen. Idempotent.
    pub fn observe_released(&mut self, ip: IpAddr, owner_uid: &str, released_at: Option<i64>) {
        let Some(claim) = self.claims.get_mut(&ip) else {
            return;
        };
        if let Ok(at) = claim.holder(owner_uid) {
            claim.owners.remove(at);
            if let Some(held) = self.owners.get_mut(owner_uid) {
                *held -= 1;
                if *held == 0 {
                    self.owners.remove(owner_uid);
                }
            }
        }
        if !claim.owners.is_empty() {
            return;
        }
        let Some(claim) = self.claims.remove(&ip) else {
            return;
        };
        let family = IpFamily::of(ip);
        if let Some(key) = claim.tag.shared_key()
            && let Some(ips) = self.shared.get_mut(key)
        {
            ips.remove(&ip);
            if ips.is_empty() {
                self.shared.remove(key);
            }
        }
        if let Some(state) = self.pools.get_mut(&*claim.pool) {
            state.used[slot(family)] = state.used[slot(family)].saturating_sub(1);
            if state.spec.contains(ip) && unassignable_reason(&state.spec, ip).is_none() {
                match released_at {
                    Some(at) if state.spec.quarantine_seconds > 0 => {
                        state.rest(family, ip_to_u128(ip), at)
                    }
                    _ => state.free[slot(family)].insert(ip_to_u128(ip)),
                }
            }
        }
    }

    /// Puts `ip`, released at `released_at` (µs), back in quarantine after a restart:
    /// the store's history knows the release, the claims no longer show the address.
    /// Nothing happens when the address is held, outside every pool, or its pool has no
    /// quarantine.
    pub fn restore_quarantine(&mut self, ip: IpAddr, released_at: i64) {
        if self.claims.contains_key(&ip) {
            return;
        }
        let family = IpFamily::of(ip);
        let value = ip_to_u128(ip);
        if let Some(state) = self
            .pools
            .values_mut()
            .find(|p| p.spec.quarantine_seconds > 0 && p.spec.contains(ip))
            && state.free[slot(family)].contains(value)
        {
            state.rest(family, value, released_at);
        }
    }

    /// Frees every address whose quarantine has ended at `now` (µs). Cheap when nothing
    /// rests: one look per pool.
    pub fn expire_quarantine(&mut self, now: i64) {
        for state in self.pools.values_mut() {
            let rest = i64::from(state.spec.quarantine_seconds) * 1_000_000;
            // Bounded: every turn removes one resting address.
            while let Some(&(released_at, s, value)) = state.resting_order.first() {
                if released_at.saturating_add(rest) > now {
                    break;
                }
                state.resting_order.pop_first();
                state.resting[s].remove(&value);
                state.free[s].insert(value);
            }
        }
    }

    /// Spreads automatic allocation of `family` in `pool` until `until` (µs): the search
    /// for a free address starts `point / 2^64` of the way from the lowest free address to
    /// the highest (0: at the lowest) and goes upwards, wrapping round,
    /// instead of starting at the lowest. The service calls it when it lost a race for an
    /// address to another replica: replicas that all search from the lowest address plan
    /// the same addresses and collide on nearly every allocation, while replicas that
    /// search from different points rarely meet. A later call picks a new point.
    pub fn spread(&mut self, pool: &str, family: IpFamily, point: u64, until: i64) {
        let Some(state) = self.pools.get_mut(pool) else {
            return;
        };
        let free = &state.free[slot(family)];
        if let (Some(lowest), Some(highest)) = (free.lowest(), free.highest()) {
            state.spread[slot(family)] = Some(Spread {
                from: point_between(lowest, highest, point),
                until,
            });
        }
    }

    /// Ends every spread whose time is over at `now` (µs): automatic allocation in those
    /// pools takes the lowest free address again.
    pub fn expire_spread(&mut self, now: i64) {
        for state in self.pools.values_mut() {
            for spread in &mut state.spread {
                if spread.is_some_and(|s| s.until <= now) {
                    *spread = None;
                }
            }
        }
    }

    /// Whether automatic allocation of `family` in `pool` is spread now.
    pub fn is_spread(&self, pool: &str, family: IpFamily) -> bool {
        self.pools
            .get(pool)
            .is_some_and(|p| p.spread[slot(family)].is_some())
    }

    /// The longest quarantine any pool keeps released addresses in, in seconds (0: none).
    pub fn longest_quarantine(&self) -> u32 {
        self.pools
            .values()
            .map(|p| p.spec.quarantine_seconds)
            .max()
            .unwrap_or(0)
    }

    /// Whether the index knows of any address held by `owner_uid`.
    /// Records that this replica applied its own change to `ips`, logged at `revision`.
    pub fn note_local_write(&mut self, ips: impl IntoIterator<Item = IpAddr>, revision: i64) {
        for ip in ips {
            let latest = self.local_writes.entry(ip).or_insert(revision);
            *latest = (*latest).max(revision);
        }
    }

    /// Whether a logged change to `ip` at `revision` is already superseded by a local write
    /// applied here, so applying it would take the index back in time.
    pub fn is_superseded(&self, ip: IpAddr, revision: i64) -> bool {
        self.local_writes
            .get(&ip)
            .is_some_and(|&latest| revision <= latest)
    }

    /// Forgets local writes at or below `revision`, which the change feed has passed: no
    /// older entry can arrive any more.
    pub fn forget_local_writes_through(&mut self, revision: i64) {
        self.local_writes.retain(|_, &mut latest| latest > revision);
    }

    pub fn holds(&self, owner_uid: &str) -> bool {
        self.owners.contains_key(owner_uid)
    }

    /// Who holds `ip`, as a claim tag, if anyone.
    pub fn holder(&self, ip: IpAddr) -> Option<String> {
        self.claims.get(&ip).map(|c| c.tag.text())
    }

    /// Chooses addresses for `req` and reserves them. The caller must commit the plan to
    /// the store or give it back with [`PoolIndex::abort`].
    pub fn plan(&mut self, req: &AllocationRequest) -> Result<Plan, AllocError> {
        let tag = req.claim_tag();
        let mut plan = Plan {
            owner_uid: req.owner.uid.clone(),
            tag: tag.clone(),
            items: Vec::new(),
        };
        for (i, family) in req.wanted_families().into_iter().enumerate() {
            let required = i == 0 || req.family_policy == FamilyPolicy::RequireDualStack;
            match self.plan_family(req, family, &tag) {
                Ok(item) => {
                    self.observe_assigned(ClaimRecord {
                        ip: item.ip,
                        tag: tag.clone(),
                        pool: item.pool.to_string(),
                        owner_uid: req.owner.uid.clone(),
                        ports: req.ports.clone(),
                    });
                    plan.items.push(item);
                }
                Err(_) if !required => {}
                Err(err) => {
                    self.abort(&plan);
                    return Err(if i == 0 {
                        err
                    } else {
                        AllocError::DualStackUnavailable(Box::new(err))
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Whether `req`'s owner, which holds `held`, may change its ports and traffic policy
    /// to the request's: no other Service sharing one of those addresses may use one of
    /// the new ports, and none may share it under another policy (the claim's tag) if the
    /// tag changes. Reserves nothing: the store applies the update atomically and has the
    /// last word; an address the index does not know of is left to it.
    pub fn check_update(&self, req: &AllocationRequest, held: &[IpAddr]) -> Result<(), AllocError> {
        let tag = req.claim_tag();
        for ip in held {
            let Some(claim) = self.claims.get(ip) else {
                continue;
            };
            if !claim.tag.is(&tag)
                && let Some(other) = claim.uids().find(|uid| *uid != req.owner.uid)
            {
                return Err(AllocError::SharingConflict {
                    key: req.sharing_key.clone(),
                    why: format!(
                        "{ip} is shared by Services with a different traffic policy or endpoint selector (uid {other}); the change would split them"
                    ),
                });
            }
            check_ports_free(req, *ip, claim)?;
        }
        Ok(())
    }

    /// Gives back what [`PoolIndex::plan`] reserved.
    pub fn abort(&mut self, plan: &Plan) {
        for item in &plan.items {
            self.observe_released(item.ip, &plan.owner_uid, None);
            if let Some(released_at) = item.resting_since {
                self.restore_quarantine(item.ip, released_at);
            }
        }
    }

    fn plan_family(
        &mut self,
        req: &AllocationRequest,
        family: IpFamily,
        tag: &str,
    ) -> Result<PlanItem, AllocError> {
        if let Some(ip) = req.requested_ip(family) {
            return self.plan_requested(req, ip);
        }
        if let Some(item) = self.plan_join(req, family, tag)? {
            return Ok(item);
        }
        let candidates = self.candidates(req, family)?;
        for name in &candidates {
            let Some(state) = self.pools.get_mut(name) else {
                continue;
            };
            // A new sharing group starts at the lowest free address even while the pool is
            // spread: two replicas founding the same group at once then collide on one
            // address, and the loser learns the group and joins it (or is refused). Spread
            // apart, both would commit, and the group would be split over two addresses.
            if let Some(value) = state.take_next(family, req.sharing_key.is_empty()) {
                // Put it back at once: `plan` records the reservation through
                // `observe_assigned`, the single place that marks addresses taken.
                state.free[slot(family)].insert(value);
                return Ok(PlanItem {
                    ip: u128_to_ip(family, value),
                    family,
                    pool: state.spec.name.clone(),
                    pool_generation: state.generation,
                    joins_shared: false,
                    resting_since: None,
                });
            }
        }
        let quarantined = candidates
            .iter()
            .filter_map(|name| self.pools.get(name))
            .map(|p| p.resting[slot(family)].len() as u64)
            .sum();
        Err(AllocError::Exhausted {
            family,
            pools: candidates.join(", "),
            quarantined,
        })
    }

    fn check_pool_serves(
        &self,
        req: &AllocationRequest,
        spec: &PoolSpec,
    ) -> Result<(), AllocError> {
        if spec.disabled {
            return Err(AllocError::PoolDisabled(spec.name.to_string()));
        }
        if !spec.serves(
            &req.owner.namespace,
            &req.namespace_labels,
            &req.service_labels,
        ) {
            return Err(AllocError::PoolDoesNotServe {
                pool: spec.name.to_string(),
                namespace: req.owner.namespace.clone(),
                name: req.owner.name.clone(),
            });
        }
        Ok(())
    }

    /// The pools automatic allocation may use for `family`, best first.
    fn candidates(
        &self,
        req: &AllocationRequest,
        family: IpFamily,
    ) -> Result<Vec<String>, AllocError> {
        if let Some(requested) = &req.requested_pool {
            let state = self
                .pools
                .get(requested.as_str())
                .ok_or_else(|| AllocError::UnknownPool(requested.to_string()))?;
            self.check_pool_serves(req, &state.spec)?;
            if state.spec.families().any(|f| f == family) {
                return Ok(vec![requested.to_string()]);
            }
        } else {
            let names: Vec<String> = self
                .order
                .iter()
                .filter_map(|(_, name)| self.pools.get(name))
                .filter(|p| p.spec.auto_assign && p.spec.families().any(|f| f == family))
                .filter(|p| self.check_pool_serves(req, &p.spec).is_ok())
                .map(|p| p.spec.name.to_string())
                .collect();
            if !names.is_empty() {
                return Ok(names);
            }
        }
        Err(AllocError::NoPoolMatches {
            family,
            namespace: req.owner.namespace.clone(),
            name: req.owner.name.clone(),
        })
    }

    fn plan_requested(&self, req: &AllocationRequest, ip: IpAddr) -> Result<PlanItem, AllocError> {
        let state = self
            .pools
            .values()
            .find(|p| p.spec.contains(ip))
            .ok_or(AllocError::NotInAnyPool { ip })?;
        let pool = state.spec.name.to_string();
        if let Some(requested) = &req.requested_pool
            && requested.as_str() != pool
        {
            return Err(AllocError::NotInRequestedPool {
                ip,
                pool,
                requested: requested.to_string(),
            });
        }
        self.check_pool_serves(req, &state.spec)?;
        if let Some(why) = unassignable_reason(&state.spec, ip) {
            return Err(AllocError::NotAssignable { ip, pool, why });
        }
        let joins_shared = match self.claims.get(&ip) {
            None => false,
            Some(claim) if claim.is_held_by(&req.owner.uid) => false,
            Some(claim) => {
                self.check_can_join(req, ip, claim)?;
                true
            }
        };
        let resting_since = state.resting[slot(IpFamily::of(ip))]
            .get(&ip_to_u128(ip))
            .copied();
        Ok(PlanItem {
            ip,
            family: IpFamily::of(ip),
            pool: state.spec.name.clone(),
            pool_generation: state.generation,
            joins_shared,
            resting_since,
        })
    }

    /// Whether `req` may join `ip`, which is held under `claim`.
    fn check_can_join(
        &self,
        req: &AllocationRequest,
        ip: IpAddr,
        claim: &Claim,
    ) -> Result<(), AllocError> {
        let taken = || AllocError::Taken {
            ip,
            holder: describe_holder(claim),
        };
        let Some(tag) = req.sharing_tag() else {
            return Err(taken());
        };
        if !claim.tag.is(&tag) {
            return Err(match claim.tag.shared_key() {
                Some(key) if key == req.sharing_key => AllocError::SharingConflict {
                    key: req.sharing_key.clone(),
                    why: format!(
                        "{ip} is shared by Services with a different traffic policy or endpoint selector{}",
                        describe_owners(claim)
                    ),
                },
                _ => taken(),
            });
        }
        check_ports_free(req, ip, claim)
    }

    /// The address already shared under `req`'s sharing key in `family`, if it may join.
    fn plan_join(
        &self,
        req: &AllocationRequest,
        family: IpFamily,
        tag: &str,
    ) -> Result<Option<PlanItem>, AllocError> {
        if req.sharing_key.is_empty() {
            return Ok(None);
        }
        let Some(ips) = self.shared.get(&req.sharing_key) else {
            return Ok(None);
        };
        for ip in ips.iter().filter(|ip| IpFamily::of(**ip) == family) {
            let Some(claim) = self.claims.get(ip) else {
                continue;
            };
            let Some(state) = self.pools.get(&*claim.pool) else {
                continue;
            };
            if req
                .requested_pool
                .as_ref()
                .is_some_and(|p| p.as_str() != &*claim.pool)
            {
                continue;
            }
            self.check_pool_serves(req, &state.spec)?;
            self.check_can_join(req, *ip, claim)?;
            debug_assert!(claim.tag.is(tag));
            return Ok(Some(PlanItem {
                ip: *ip,
                family,
                pool: state.spec.name.clone(),
                pool_generation: state.generation,
                joins_shared: true,
                resting_since: None,
            }));
        }
        Ok(None)
    }
}

/// Refuses `req`'s ports if another owner of `claim` (on `ip`) uses one of them.
fn check_ports_free(req: &AllocationRequest, ip: IpAddr, claim: &Claim) -> Result<(), AllocError> {
    for Holder { uid, ports } in &claim.owners {
        if **uid == *req.owner.uid {
            continue;
        }
        if let Some(port) = ports.iter().find(|p| req.ports.contains(p)) {
            return Err(AllocError::SharingConflict {
                key: req.sharing_key.clone(),
                why: format!(
                    "port {}/{} on {ip} is already used by Service uid {uid}",
                    port.port, port.protocol
                ),
            });
        }
    }
    Ok(())
}

/// The first owner of a claim, for a message: " (uid x)", or " (uid x and 2 more)".
fn describe_owners(claim: &Claim) -> String {
    let mut uids = claim.uids();
    match (uids.next(), uids.len()) {
        (None, _) => String::new(),
        (Some(uid), 0) => format!(" (uid {uid})"),
        (Some(uid), more) => format!(" (uid {uid} and {more} more)"),
    }
}

/// The address `point / 2^64` of the way from `lowest` to `highest`, without overflow for
/// any span up to the whole IPv6 space.
fn point_between(lowest: u128, highest: u128, point: u64) -> u128 {
    let span = highest - lowest;
    let point = u128::from(point);
    lowest + (span >> 64) * point + (((span & u128::from(u64::MAX)) * point) >> 64)
}

fn describe_holder(claim: &Claim) -> String {
    match &claim.tag {
        ClaimTag::Owner(uid) => format!(" (uid {uid})"),
        ClaimTag::Other(_) => format!(
            " (shared under key {:?})",
            claim.tag.shared_key().unwrap_or_default()
        ),
    }
}

/// The uid `owners` already shares for `uid`, or a new one.
fn intern(owners: &HashMap<Arc<str>, u32>, uid: &str) -> Arc<str> {
    owners
        .get_key_value(uid)
        .map_or_else(|| Arc::from(uid), |(shared, _)| Arc::clone(shared))
}

/// Counts one more address held by `uid`, and gives the uid its claims share.
fn hold(owners: &mut HashMap<Arc<str>, u32>, uid: &str) -> Arc<str> {
    let shared = intern(owners, uid);
    *owners.entry(Arc::clone(&shared)).or_insert(0) += 1;
    shared
}

/// The sharing key inside a shared claim tag (`s:<key>|<policy>`).
fn shared_key(tag: &str) -> Option<&str> {
    tag.strip_prefix("s:")
        .and_then(|rest| rest.split_once('|'))
        .map(|(key, _)| key)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use herald_model::pool::PoolInput;
    use herald_model::{Owner, TrafficPolicy};

    use super::*;

    fn pool(name: &str, addresses: &[&str], tweak: impl FnOnce(&mut PoolInput)) -> (PoolSpec, i64) {
        let mut input = PoolInput {
            name: name.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        tweak(&mut input);
        (PoolSpec::from_input(input).expect("valid pool"), 1)
    }

    fn request(uid: &str) -> AllocationRequest {
        AllocationRequest {
            owner: Owner {
                cluster_id: "lab".into(),
                namespace: "default".into(),
                name: format!("svc-{uid}"),
                uid: uid.into(),
            },
            service_labels: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            family_policy: FamilyPolicy::SingleStack,
            families: vec![IpFamily::V4],
            requested_ips: vec![],
            requested_pool: None,
            sharing_key: String::new(),
            ports: vec![],
            traffic_policy: TrafficPolicy::Cluster,
            endpoint_selector: BTreeMap::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn ips(plan: &Plan) -> Vec<String> {
        plan.items.iter().map(|i| i.ip.to_string()).collect()
    }

    #[test]
    fn lab_pool_hands_out_241_first_and_never_the_edges() {
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let first = index.plan(&request("a")).expect("allocates");
        assert_eq!(ips(&first), ["172.16.0.241"]);
        let mut all = vec![];
        for i in 0..13 {
            all.extend(ips(&index
                .plan(&request(&format!("u{i}")))
                .expect("allocates")));
        }
        assert_eq!(all.last().map(String::as_str), Some("172.16.0.254"));
        assert_eq!(
            index.usage("lab")[0],
            PoolUsage {
                family: IpFamily::V4,
                total: 14,
                used: 14,
                quarantined: 0
            }
        );
        let err = index.plan(&request("late")).expect_err("exhausted");
        assert_eq!(err.to_string(), "IPv4 pools lab are exhausted");
        // Releasing gives the lowest address back first.
        index.observe_released(ip("172.16.0.245"), "u3", None);
        assert_eq!(
            ips(&index.plan(&request("late")).expect("allocates")),
            ["172.16.0.245"]
        );
    }

    #[test]
    fn a_logged_change_older_than_a_local_write_is_not_applied_again() {
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let a = ip("172.16.0.241");
        let claim = ClaimRecord {
            ip: a,
            tag: "o:x".into(),
            pool: "lab".into(),
            owner_uid: "x".into(),
            ports: vec![],
        };
        // This replica allocated (revision 10) and released (11) before its feed read 10.
        index.observe_assigned(claim.clone());
        index.note_local_write([a], 10);
        index.observe_released(a, "x", None);
        index.note_local_write([a], 11);
        assert!(
            index.is_superseded(a, 10),
            "the allocation's own entry is older"
        );
        assert!(index.is_superseded(a, 11), "and so is the release's");
        assert!(
            !index.is_superseded(a, 12),
            "a later change (another replica's) applies"
        );
        assert!(
            !index.is_superseded(ip("172.16.0.242"), 5),
            "other addresses are untouched"
        );
        // A lower revision never lowers what a later local write recorded.
        index.note_local_write([a], 9);
        assert!(index.is_superseded(a, 11));
        // Once the feed has passed 11, nothing at or below it can arrive: forgotten.
        index.forget_local_writes_through(10);
        assert!(index.is_superseded(a, 11), "11 is not passed yet");
        index.forget_local_writes_through(11);
        assert!(!index.is_superseded(a, 11));
        assert_eq!(index.usage("lab")[0].used, 0);
    }

    #[test]
    fn a_released_address_rests_in_quarantine_until_its_time_passes() {
        const SECOND: i64 = 1_000_000;
        let lab = || pool("lab", &["172.16.0.240/29"], |p| p.quarantine_seconds = 60);
        let mut index = PoolIndex::load(vec![lab()], vec![]);
        let requesting = |uid: &str, ip: &str| AllocationRequest {
            requested_ips: vec![ip.parse().expect("test address")],
            ..request(uid)
        };
        assert_eq!(
            ips(&index.plan(&request("a")).expect("plans")),
            ["172.16.0.241"]
        );
        index.observe_released(ip("172.16.0.241"), "a", Some(100 * SECOND));
        let usage = index.usage("lab")[0];
        assert_eq!((usage.used, usage.quarantined, usage.free()), (0, 1, 5));

        // Automatic allocation passes over it while it rests, even after an update of
        // the pool's spec.
        let (spec, _) = lab();
        index.upsert_pool(spec, 2);
        index.expire_quarantine(159 * SECOND);
        assert_eq!(
            ips(&index.plan(&request("b")).expect("plans")),
            ["172.16.0.242"]
        );

        // A dry run that names it gives it back to quarantine, not to the free set.
        let named = index.plan(&requesting("c", "172.16.0.241")).expect("plans");
        assert_eq!(index.usage("lab")[0].quarantined, 0);
        index.abort(&named);
        assert_eq!(index.usage("lab")[0].quarantined, 1);
        assert_eq!(
            ips(&index.plan(&request("d")).expect("plans")),
            ["172.16.0.243"]
        );

        // Its time over, it is the lowest free address again.
        index.expire_quarantine(160 * SECOND);
        assert_eq!(index.usage("lab")[0].quarantined, 0);
        assert_eq!(
            ips(&index.plan(&request("e")).expect("plans")),
            ["172.16.0.241"]
        );

        // A full pool says how many addresses rest.
        for uid in ["f", "g", "h"] {
            index.plan(&request(uid)).expect("plans");
        }
        index.observe_released(ip("172.16.0.242"), "b", Some(200 * SECOND));
        let err = index.plan(&request("late")).expect_err("nothing free");
        assert_eq!(
            err.to_string(),
            "IPv4 pools lab are exhausted (1 released addresses are in quarantine and return to use when it ends)"
        );
        // Only a request that names the resting address gets it.
        let named = index
            .plan(&requesting("late", "172.16.0.242"))
            .expect("plans");
        assert_eq!(named.items[0].resting_since, Some(200 * SECOND));

        // After a restart the history restores what the claims no longer show.
        let mut restarted = PoolIndex::load(vec![lab()], vec![]);
        restarted.restore_quarantine(ip("172.16.0.241"), 300 * SECOND);
        assert_eq!(restarted.longest_quarantine(), 60);
        restarted.expire_quarantine(359 * SECOND);
        assert_eq!(
            ips(&restarted.plan(&request("h")).expect("plans")),
            ["172.16.0.242"]
        );
        restarted.expire_quarantine(360 * SECOND);
        assert_eq!(
            ips(&restarted.plan(&request("i")).expect("plans")),
            ["172.16.0.241"]
        );
    }

    #[test]
    fn preview_usage_shows_a_new_spec_over_the_current_claims_and_changes_nothing() {
        const SECOND: i64 = 1_000_000;
        let lab = |cidr: &str| pool("lab", &[cidr], |p| p.quarantine_seconds = 60);
        let mut index = PoolIndex::load(vec![lab("172.16.0.240/28")], vec![]);
        for uid in ["a", "b", "c"] {
            index.plan(&request(uid)).expect("plans");
        }
        // .241 and .242 held, .243 resting.
        index.observe_released(ip("172.16.0.243"), "c", Some(100 * SECOND));
        let before = index.usage("lab");
        let counts = |usage: Vec<PoolUsage>| {
            let u = usage[0];
            (u.total, u.used, u.quarantined, u.free())
        };

        let (grown, _) = lab("172.16.0.224/27");
        assert_eq!(counts(index.preview_usage(&grown)), (30, 2, 1, 27));
        // .242 and .243 stay inside, .241 is released by the shrink.
        let (shrunk, _) = lab("172.16.0.242/31");
        assert_eq!(counts(index.preview_usage(&shrunk)), (2, 1, 1, 0));
        let (elsewhere, _) = lab("10.0.0.0/30");
        assert_eq!(counts(index.preview_usage(&elsewhere)), (2, 0, 0, 2));

        assert_eq!(index.usage("lab"), before, "a preview changes nothing");
        assert_eq!(index.pool("lab").map(|(_, g)| g), Some(1));
    }

    #[test]
    fn without_quarantine_a_release_frees_the_address_at_once() {
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/29"], |_| {})], vec![]);
        index.plan(&request("a")).expect("plans");
        index.observe_released(ip("172.16.0.241"), "a", Some(1));
        assert_eq!(index.usage("lab")[0].quarantined, 0);
        assert_eq!(
            ips(&index.plan(&request("b")).expect("plans")),
            ["172.16.0.241"]
        );
    }

    #[test]
    fn buggy_addresses_and_edges_follow_their_flags() {
        let mut index = PoolIndex::load(
            vec![pool("b", &["10.0.0.255-10.0.1.1"], |p| {
                p.avoid_buggy_ips = true
            })],
            vec![],
        );
        assert_eq!(index.usage("b")[0].total, 1);
        assert_eq!(
            ips(&index.plan(&request("a")).expect("allocates")),
            ["10.0.1.1"]
        );
        let mut req = request("b");
        req.requested_ips = vec![ip("10.0.1.0")];
        assert!(matches!(
            index.plan(&req),
            Err(AllocError::NotAssignable { .. })
        ));

        let mut index = PoolIndex::load(
            vec![pool("e", &["10.0.0.0/30"], |p| p.allow_first_last = true)],
            vec![],
        );
        assert_eq!(index.usage("e")[0].total, 4);
        assert_eq!(
            ips(&index.plan(&request("a")).expect("allocates")),
            ["10.0.0.0"]
        );
        let index = PoolIndex::load(
            vec![pool("h", &["10.0.0.7/32", "10.0.0.8/31"], |_| {})],
            vec![],
        );
        assert_eq!(
            index.usage("h")[0].total,
            3,
            "/31 and /32 keep every address"
        );
    }

    #[test]
    fn ipv6_slash_64_is_never_enumerated() {
        let mut index = PoolIndex::load(vec![pool("v6", &["fd00::/64"], |_| {})], vec![]);
        assert_eq!(index.usage("v6")[0].total, (1u128 << 64) - 2);
        let mut req = request("a");
        req.families = vec![IpFamily::V6];
        assert_eq!(ips(&index.plan(&req).expect("allocates")), ["fd00::1"]);
    }

    #[test]
    fn pools_are_chosen_by_scope_priority_and_flags() {
        let mut index = PoolIndex::load(
            vec![
                pool("late", &["10.0.1.0/24"], |p| p.priority = 10),
                pool("early", &["10.0.2.0/24"], |p| p.priority = 1),
                pool("manual", &["10.0.3.0/24"], |p| p.auto_assign = Some(false)),
                pool("web-only", &["10.0.4.0/24"], |p| {
                    p.namespaces = vec!["web".into()];
                    p.priority = -1
                }),
                pool("off", &["10.0.5.0/24"], |p| p.disabled = true),
            ],
            vec![],
        );
        assert_eq!(
            ips(&index.plan(&request("a")).expect("allocates")),
            ["10.0.2.1"]
        );
        let mut req = request("b");
        req.requested_pool = Some(PoolName::parse("p", "manual").expect("name"));
        assert_eq!(ips(&index.plan(&req).expect("allocates")), ["10.0.3.1"]);
        let mut req = request("c");
        req.owner.namespace = "web".into();
        assert_eq!(ips(&index.plan(&req).expect("allocates")), ["10.0.4.1"]);
        let mut req = request("d");
        req.requested_pool = Some(PoolName::parse("p", "web-only").expect("name"));
        assert!(matches!(
            index.plan(&req),
            Err(AllocError::PoolDoesNotServe { .. })
        ));
        let mut req = request("e");
        req.requested_pool = Some(PoolName::parse("p", "off").expect("name"));
        assert_eq!(
            index.plan(&req),
            Err(AllocError::PoolDisabled("off".into()))
        );
        let mut req = request("f");
        req.requested_pool = Some(PoolName::parse("p", "nope").expect("name"));
        assert_eq!(
            index.plan(&req),
            Err(AllocError::UnknownPool("nope".into()))
        );
        let mut req = request("g");
        req.requested_ips = vec![ip("192.168.0.1")];
        assert!(matches!(
            index.plan(&req),
            Err(AllocError::NotInAnyPool { .. })
        ));
        let mut req = request("h");
        req.families = vec![IpFamily::V6];
        assert!(matches!(
            index.plan(&req),
            Err(AllocError::NoPoolMatches {
                family: IpFamily::V6,
                ..
            })
        ));
    }

    #[test]
    fn requested_ips_are_exclusive_unless_shared_compatibly() {
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let mut a = request("a");
        a.requested_ips = vec![ip("172.16.0.250")];
        assert_eq!(ips(&index.plan(&a).expect("allocates")), ["172.16.0.250"]);
        let mut b = request("b");
        b.requested_ips = vec![ip("172.16.0.250")];
        assert_eq!(
            index.plan(&b).expect_err("taken").to_string(),
            "requested_ips: 172.16.0.250 is already allocated to another Service (uid a)"
        );

        let shared = |uid: &str, port: u16, policy: TrafficPolicy| {
            let mut r = request(uid);
            r.sharing_key = "web".into();
            r.ports = vec![ServicePort {
                protocol: "TCP".into(),
                port,
            }];
            r.traffic_policy = policy;
            r
        };
        let first = index
            .plan(&shared("s1", 80, TrafficPolicy::Cluster))
            .expect("allocates");
        let second = index
            .plan(&shared("s2", 443, TrafficPolicy::Cluster))
            .expect("joins");
        assert_eq!(ips(&first), ips(&second));
        assert!(second.items[0].joins_shared);
        assert!(matches!(
            index.plan(&shared("s3", 80, TrafficPolicy::Cluster)),
            Err(AllocError::SharingConflict { .. })
        ));
        assert!(matches!(
            index.plan(&shared("s4", 8080, TrafficPolicy::Local)),
            Err(AllocError::SharingConflict { .. })
        ));
        // The address stays taken until its last sharer goes.
        let shared_ip = first.items[0].ip;
        index.observe_released(shared_ip, "s1", None);
        assert!(index.holder(shared_ip).is_some());
        index.observe_released(shared_ip, "s2", None);
        assert!(index.holder(shared_ip).is_none());
    }

    fn sharer(uid: &str, key: &str, ports: &[u16], policy: TrafficPolicy) -> AllocationRequest {
        let mut r = request(uid);
        r.sharing_key = key.into();
        r.ports = ports
            .iter()
            .map(|&port| ServicePort {
                protocol: "TCP".into(),
                port,
            })
            .collect();
        r.traffic_policy = policy;
        r
    }

    /// What the service records once the store has applied an update.
    fn updated(index: &mut PoolIndex, req: &AllocationRequest, ip: IpAddr) {
        index.observe_updated(ClaimRecord {
            ip,
            tag: req.claim_tag(),
            pool: "lab".into(),
            owner_uid: req.owner.uid.clone(),
            ports: req.ports.clone(),
        });
    }

    #[test]
    fn an_update_frees_old_ports_and_claims_new_ones_unless_another_sharer_uses_them() {
        use TrafficPolicy::Cluster;
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let shared_ip = index
            .plan(&sharer("sh1", "k2", &[80], Cluster))
            .expect("allocates")
            .items[0]
            .ip;
        let to_443 = sharer("sh1", "k2", &[443], Cluster);
        index
            .check_update(&to_443, &[shared_ip])
            .expect("nobody else shares");
        updated(&mut index, &to_443, shared_ip);

        let err = index
            .plan(&sharer("sh2", "k2", &[443], Cluster))
            .expect_err("443 is sh1's now");
        assert_eq!(
            err.to_string(),
            "sharing_key \"k2\": port 443/TCP on 172.16.0.241 is already used by Service uid sh1"
        );
        let sh3 = index
            .plan(&sharer("sh3", "k2", &[80], Cluster))
            .expect("80 was freed");
        assert_eq!(sh3.items[0].ip, shared_ip);

        let err = index
            .check_update(&sharer("sh1", "k2", &[80, 443], Cluster), &[shared_ip])
            .expect_err("80 is sh3's");
        assert_eq!(
            err.to_string(),
            "sharing_key \"k2\": port 80/TCP on 172.16.0.241 is already used by Service uid sh3"
        );
        // Its own ports never collide with themselves.
        index
            .check_update(&sharer("sh1", "k2", &[443, 8443], Cluster), &[shared_ip])
            .expect("only sh1 uses 443");
    }

    #[test]
    fn a_policy_change_retags_a_lone_sharer_and_is_refused_while_others_share() {
        use TrafficPolicy::{Cluster, Local};
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let ip = index
            .plan(&sharer("a", "k", &[80], Cluster))
            .expect("allocates")
            .items[0]
            .ip;
        index
            .plan(&sharer("b", "k", &[81], Cluster))
            .expect("joins");
        let err = index
            .check_update(&sharer("a", "k", &[80], Local), &[ip])
            .expect_err("b shares under Cluster");
        assert!(
            err.to_string().contains("different traffic policy")
                && err.to_string().contains("uid b"),
            "{err}"
        );

        index.observe_released(ip, "b", None);
        let local = sharer("a", "k", &[80], Local);
        index.check_update(&local, &[ip]).expect("a is alone");
        updated(&mut index, &local, ip);
        assert_eq!(index.holder(ip), Some(local.claim_tag()));
        // The group now takes Local members only.
        assert!(matches!(
            index.plan(&sharer("c", "k", &[82], Cluster)),
            Err(AllocError::SharingConflict { .. })
        ));
        assert_eq!(
            index
                .plan(&sharer("d", "k", &[82], Local))
                .expect("joins")
                .items[0]
                .ip,
            ip
        );
        // Observing the same update again (the change feed) changes nothing.
        updated(&mut index, &local, ip);
        assert_eq!(index.usage("lab")[0].used, 1);
        // A picture refreshed from the store drops sharers that left and takes the tag
        // and ports the store has.
        let cluster = sharer("a", "k", &[80], Cluster);
        index.refresh_claim(
            ip,
            vec![ClaimRecord {
                ip,
                tag: cluster.claim_tag(),
                pool: "lab".into(),
                owner_uid: "a".into(),
                ports: cluster.ports.clone(),
            }],
        );
        assert_eq!(index.holder(ip), Some(cluster.claim_tag()));
        assert!(!index.holds("d"));
        assert_eq!(
            index
                .plan(&sharer("e", "k", &[81], Cluster))
                .expect("joins")
                .items[0]
                .ip,
            ip
        );
        index.refresh_claim(ip, vec![]);
        assert!(index.holds("a"), "a release comes through the feed");
        // An update of an address the index never saw records it.
        let mut other = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        updated(&mut other, &local, ip);
        assert!(other.holds("a"));
        assert_eq!(other.usage("lab")[0].used, 1);
    }

    #[test]
    fn dual_stack_policies() {
        let mut index = PoolIndex::load(vec![pool("v4", &["10.0.0.0/24"], |_| {})], vec![]);
        let mut prefer = request("p");
        prefer.family_policy = FamilyPolicy::PreferDualStack;
        assert_eq!(
            ips(&index.plan(&prefer).expect("IPv4 alone is enough")),
            ["10.0.0.1"]
        );
        let mut require = request("r");
        require.family_policy = FamilyPolicy::RequireDualStack;
        assert!(matches!(
            index.plan(&require),
            Err(AllocError::DualStackUnavailable(_))
        ));
        assert_eq!(
            index.usage("v4")[0].used,
            1,
            "a failed plan reserves nothing"
        );

        index.upsert_pool(pool("v6", &["fd00::/120"], |_| {}).0, 1);
        assert_eq!(
            ips(&index.plan(&require).expect("both")),
            ["10.0.0.2", "fd00::1"]
        );
    }

    #[test]
    fn a_lone_holder_is_kept_inside_its_claim() {
        let mut index = PoolIndex::with_pools(vec![pool("lab", &["172.16.0.240/28"], |_| {})]);
        let claim = |uid: &str| ClaimRecord {
            ip: ip("172.16.0.241"),
            tag: "s:k|c".into(),
            pool: "lab".into(),
            owner_uid: uid.into(),
            ports: vec![],
        };
        index.observe_assigned(claim("b"));
        let held = &index.claims[&ip("172.16.0.241")];
        assert!(!held.owners.spilled(), "one holder needs no allocation");
        assert!(std::mem::size_of::<Claim>() <= 80, "a claim stays small");
        // A second sharer moves the holders out, still sorted by uid.
        index.observe_assigned(claim("a"));
        let held = &index.claims[&ip("172.16.0.241")];
        assert!(held.owners.spilled());
        assert_eq!(held.uids().collect::<Vec<_>>(), ["a", "b"]);
        index.observe_released(ip("172.16.0.241"), "b", None);
        assert!(index.holds("a") && !index.holds("b"));
    }

    #[test]
    fn an_owner_is_known_until_its_last_address_is_released() {
        let mut index = PoolIndex::with_pools(vec![pool("lab", &["172.16.0.240/28"], |_| {})]);
        let claim = |at: &str, uid: &str, tag: &str| ClaimRecord {
            ip: ip(at),
            tag: tag.into(),
            pool: "lab".into(),
            owner_uid: uid.into(),
            ports: vec![],
        };
        index.observe_assigned(claim("172.16.0.241", "x", "o:x"));
        index.observe_assigned(claim("172.16.0.242", "x", "o:x"));
        index.observe_assigned(claim("172.16.0.243", "x", "s:k|c"));
        index.observe_assigned(claim("172.16.0.243", "y", "s:k|c"));
        assert_eq!(index.holder(ip("172.16.0.241")).as_deref(), Some("o:x"));
        assert_eq!(index.holder(ip("172.16.0.243")).as_deref(), Some("s:k|c"));
        assert_eq!(index.shared_ips("k"), vec![ip("172.16.0.243")]);
        index.observe_released(ip("172.16.0.241"), "x", None);
        index.observe_released(ip("172.16.0.243"), "x", None);
        assert!(index.holds("x"), "x still holds .242");
        assert!(index.holds("y"));
        assert_eq!(index.usage("lab")[0].used, 2);
        index.observe_released(ip("172.16.0.242"), "x", None);
        assert!(!index.holds("x"));
        index.observe_released(ip("172.16.0.243"), "y", None);
        assert!(!index.holds("y"));
        assert!(index.shared_ips("k").is_empty());
        assert_eq!(index.usage("lab")[0].used, 0);
    }

    #[test]
    fn abort_and_idempotent_observation() {
        let mut index = PoolIndex::load(vec![pool("lab", &["172.16.0.240/28"], |_| {})], vec![]);
        let plan = index.plan(&request("a")).expect("allocates");
        assert!(index.holds("a"), "a reservation is known as the owner's");
        index.abort(&plan);
        assert_eq!(index.usage("lab")[0].used, 0);
        assert!(!index.holds("a"));
        let record = ClaimRecord {
            ip: ip("172.16.0.241"),
            tag: "o:x".into(),
            pool: "lab".into(),
            owner_uid: "x".into(),
            ports: vec![],
        };
        index.observe_assigned(record.clone());
        index.observe_assigned(record);
        assert_eq!(index.usage("lab")[0].used, 1);
        assert!(index.holds("x"), "a repeated Allocate for x needs no write");
        index.observe_released(ip("172.16.0.241"), "x", None);
        assert!(!index.holds("x"));
        index.observe_released(ip("172.16.0.241"), "x", None);
        assert_eq!(index.usage("lab")[0].used, 0);

        // Loaded claims count too: after a restart, known owners are recognised.
        let loaded = PoolIndex::load(
            vec![pool("lab", &["172.16.0.240/28"], |_| {})],
            vec![ClaimRecord {
                ip: ip("172.16.0.242"),
                tag: "o:y".into(),
                pool: "lab".into(),
                owner_uid: "y".into(),
                ports: vec![],
            }],
        );
        assert!(loaded.holds("y") && !loaded.holds("x"));
    }

    /// Feeds what one replica planned into another, as the change feed would.
    fn learn(index: &mut PoolIndex, plan: &Plan) {
        for item in &plan.items {
            index.observe_assigned(ClaimRecord {
                ip: item.ip,
                tag: plan.tag.clone(),
                pool: item.pool.to_string(),
                owner_uid: plan.owner_uid.clone(),
                ports: vec![],
            });
        }
    }

    #[test]
    fn a_new_sharing_group_starts_at_the_lowest_free_address_even_while_spread() {
        let mut index = PoolIndex::load(vec![pool("lab", &["10.1.0.0/20"], |_| {})], vec![]);
        index.spread("lab", IpFamily::V4, u64::MAX / 2, i64::MAX);
        // Another replica founding the same group plans the lowest too: the two collide
        // and the loser joins, instead of both committing two addresses for one key.
        let founded = index
            .plan(&sharer("s1", "web", &[80], TrafficPolicy::Cluster))
            .expect("allocates");
        assert_eq!(ips(&founded), ["10.1.0.1"]);
        let own = index.plan(&request("exclusive")).expect("allocates");
        assert_eq!(
            ips(&own),
            ["10.1.7.255"],
            "an exclusive address is still spread"
        );
    }

    #[test]
    fn a_spread_replica_plans_away_from_one_that_takes_the_lowest() {
        let lab = || vec![pool("lab", &["10.1.0.0/20"], |_| {})];
        let (mut a, mut b) = (
            PoolIndex::load(lab(), vec![]),
            PoolIndex::load(lab(), vec![]),
        );
        assert!(
            !b.is_spread("lab", IpFamily::V4),
            "one replica takes the lowest"
        );
        b.spread("lab", IpFamily::V4, u64::MAX / 2, 1_000);
        assert!(b.is_spread("lab", IpFamily::V4));
        // Half-way between 10.1.0.1 and 10.1.15.254.
        let first = b.plan(&request("b0")).expect("allocates");
        assert_eq!(ips(&first), ["10.1.7.255"]);
        // Neither sees the other's plans before it makes its own, as under load: still
        // not one address in common.
        let (mut from_a, mut from_b) = (BTreeSet::new(), BTreeSet::from([first.items[0].ip]));
        for i in 0..1000 {
            from_a.insert(a.plan(&request(&format!("a{i}"))).expect("free").items[0].ip);
            from_b.insert(
                b.plan(&request(&format!("b{}", i + 1)))
                    .expect("free")
                    .items[0]
                    .ip,
            );
        }
        assert!(from_a.is_disjoint(&from_b));
        assert_eq!(
            from_a.first(),
            Some(&ip("10.1.0.1")),
            "a still hands out the lowest"
        );

        // Once the spread ends, the lowest free address comes first again.
        b.expire_spread(999);
        assert!(b.is_spread("lab", IpFamily::V4), "not before its time");
        b.expire_spread(1_000);
        assert!(!b.is_spread("lab", IpFamily::V4));
        assert_eq!(ips(&b.plan(&request("late")).expect("free")), ["10.1.0.1"]);
    }

    #[test]
    fn a_spread_search_wraps_round_and_hands_out_every_address_once() {
        let mut index = PoolIndex::load(
            vec![pool("small", &["10.0.0.248/29"], |p| {
                p.avoid_buggy_ips = true
            })],
            vec![],
        );
        let taken = index.plan(&request("first")).expect("free");
        assert_eq!(ips(&taken), ["10.0.0.249"]);
        // From the top (.253 of .250-.254), then round to the lowest.
        index.spread("small", IpFamily::V4, u64::MAX, i64::MAX);
        let order: Vec<String> = (0..5)
            .map(|i| ips(&index.plan(&request(&format!("u{i}"))).expect("free")).remove(0))
            .collect();
        assert_eq!(
            order,
            [
                "10.0.0.253",
                "10.0.0.254",
                "10.0.0.250",
                "10.0.0.251",
                "10.0.0.252"
            ]
        );
        assert!(matches!(
            index.plan(&request("over")),
            Err(AllocError::Exhausted { .. })
        ));
        // A spread of a full pool, or of one that does not exist, changes nothing.
        index.spread("small", IpFamily::V4, 7, i64::MAX);
        index.spread("none", IpFamily::V4, 7, i64::MAX);

        // The same over the whole IPv6 space, where the arithmetic could overflow.
        let mut v6 = PoolIndex::load(vec![pool("all", &["::/0"], |_| {})], vec![]);
        v6.spread("all", IpFamily::V6, u64::MAX, i64::MAX);
        let mut req = request("v6");
        req.families = vec![IpFamily::V6];
        let ip6 = v6.plan(&req).expect("free").items[0].ip;
        assert!(ip6 > ip("ffff:ffff:ffff:fffe::"), "{ip6} is near the top");
        // A pool change keeps the spread.
        v6.upsert_pool(pool("all", &["::/0"], |_| {}).0, 2);
        assert!(v6.is_spread("all", IpFamily::V6));
    }

    #[test]
    fn a_lost_race_learnt_from_the_winner_is_not_planned_again() {
        let lab = || vec![pool("lab", &["10.1.0.0/24"], |_| {})];
        let (mut a, mut b) = (
            PoolIndex::load(lab(), vec![]),
            PoolIndex::load(lab(), vec![]),
        );
        let won = a.plan(&request("a")).expect("free");
        let lost = b.plan(&request("b")).expect("free");
        assert_eq!(
            won,
            Plan {
                owner_uid: "a".into(),
                tag: "o:a".into(),
                ..lost.clone()
            }
        );
        b.abort(&lost);
        learn(&mut b, &won);
        let retried = b.plan(&request("b")).expect("free");
        assert_eq!(ips(&retried), ["10.1.0.2"]);
        learn(&mut a, &retried);

        // The winner's claim may arrive while the loser's reservation still holds the
        // address: once the loser gives its plan back, the address is the winner's.
        let lost = b.plan(&request("c")).expect("free");
        let won = a.plan(&request("w")).expect("free");
        assert_eq!(lost.items[0].ip, won.items[0].ip);
        learn(&mut b, &won);
        b.abort(&lost);
        assert_eq!(b.holder(won.items[0].ip).as_deref(), Some("o:w"));
        assert!(b.holds("w") && !b.holds("c"));
        assert_eq!(b.usage("lab")[0].used, 3);
    }

    #[test]
    fn planning_cost_stays_flat_as_the_pool_fills() {
        // A /16 filled to the last address: every plan is a lookup of the lowest interval.
        let mut index = PoolIndex::load(vec![pool("big", &["10.1.0.0/16"], |_| {})], vec![]);
        for i in 0..65_534u32 {
            index
                .plan(&request(&format!("u{i}")))
                .expect("capacity left");
        }
        assert!(matches!(
            index.plan(&request("over")),
            Err(AllocError::Exhausted { .. })
        ));
    }
}
