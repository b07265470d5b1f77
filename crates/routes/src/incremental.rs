//! The incremental engine: the routing inputs and every node's computed set, kept in
//! persistent maps and patched per change, so a change costs what it touches rather than
//! nodes × Services.
//!
//! [`RouteState`] holds nodes, Services, policy and pools, and each node's [`NodeRoutes`]
//! and problems. Each method applies one change and returns the nodes whose set changed:
//! - a Service's upsert or removal recomputes only the prefixes its old and new addresses
//!   make (host routes and the aggregates that cover them), and only on the nodes it can
//!   announce from (every eligible node for `Cluster`, its endpoint nodes for `Local`);
//! - a node's upsert recomputes that node, its removal drops it;
//! - a policy or pool change recomputes every node (rare, and what it selects can be
//!   anything).
//!
//! The result always equals [`crate::plan`] over the same inputs (property-tested). Cloning
//! a `RouteState` is cheap (the maps are `imbl`'s and share structure), so a reader can
//! keep a snapshot while the engine moves on.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use herald_model::{AssignedIp, IpFamily, PoolSpec, TrafficPolicy};
use imbl::{OrdMap, OrdSet};
use ipnet::IpNet;

use crate::compute::{
    Ctx, NodeRoutes, PeerRoutes, PeerSession, Plan, Problem, RouteAttrs, RuleSet, SharedAttrs,
    not_announced,
};
use crate::facts::{Eligibility, Node, NodeName, ServiceFacts};
use crate::policy::BgpPolicy;

/// A prefix a change touches, with the Service addresses inside it.
type PrefixAddresses = (IpNet, Vec<(Arc<ServiceFacts>, AssignedIp)>);

/// One node's computed set and the problems found computing it.
#[derive(Debug, Clone, Default)]
pub struct NodeResult {
    pub routes: Arc<NodeRoutes>,
    /// Sorted, without repeats.
    pub problems: Arc<BTreeSet<Problem>>,
    /// Routes patched in since the node's maps were last built packed: each may have
    /// split a full leaf (see [`repack_due`]). Not part of the result's value.
    pub(crate) inserted_since_packed: usize,
}

impl PartialEq for NodeResult {
    fn eq(&self, other: &Self) -> bool {
        self.routes == other.routes && self.problems == other.problems
    }
}

impl Eq for NodeResult {}

/// The inputs and the per-node results, patched change by change.
#[derive(Debug, Clone, Default)]
pub struct RouteState {
    nodes: OrdMap<NodeName, Arc<Node>>,
    /// By owner uid. The key is shared with `addresses`: one uid per Service.
    services: OrdMap<Arc<str>, Arc<ServiceFacts>>,
    /// (address, owner uid) of every Service address, to find the Services under a prefix.
    addresses: OrdSet<(IpAddr, Arc<str>)>,
    policy: Option<Arc<BgpPolicy>>,
    pools: Arc<Vec<PoolSpec>>,
    results: OrdMap<NodeName, NodeResult>,
}

impl RouteState {
    pub fn new() -> Self {
        Self::default()
    }

    /// A state holding these inputs, computed once for all (not change by change).
    pub fn from_inputs(
        nodes: Vec<Node>,
        services: Vec<ServiceFacts>,
        policy: Option<BgpPolicy>,
        pools: Vec<PoolSpec>,
    ) -> Self {
        let services = services
            .into_iter()
            .map(|facts| (Arc::from(facts.owner.uid.as_str()), facts))
            .collect();
        Self::from_keyed_inputs(nodes, services, policy, pools)
    }

    /// As [`Self::from_inputs`], each Service with its owner uid, which the state keeps
    /// as its key: a caller that holds the uid already shares it rather than the state
    /// keeping a copy per Service.
    pub fn from_keyed_inputs(
        nodes: Vec<Node>,
        services: Vec<(Arc<str>, ServiceFacts)>,
        policy: Option<BgpPolicy>,
        pools: Vec<PoolSpec>,
    ) -> Self {
        let mut state = Self {
            pools: Arc::new(pools),
            ..Self::default()
        };
        // Without a policy each of these is cheap; setting the policy last computes
        // every node once.
        for (uid, facts) in services {
            state.upsert_service_as(uid, facts);
        }
        for node in nodes {
            state.upsert_node(node);
        }
        state.set_policy(policy);
        state
    }

    pub fn node_routes(&self, node: &str) -> Option<&Arc<NodeRoutes>> {
        self.results.get(node).map(|r| &r.routes)
    }

    pub fn results(&self) -> &OrdMap<NodeName, NodeResult> {
        &self.results
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(|n| &**n)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceFacts> {
        self.services.values().map(|s| &**s)
    }

    pub fn policy(&self) -> Option<&BgpPolicy> {
        self.policy.as_deref()
    }

    /// The whole [`Plan`], as [`crate::plan`] gives it (with no policy: every node empty,
    /// no eligibility, no problems). Costs a copy of every node's set: for status queries,
    /// not for every change.
    pub fn plan(&self) -> Plan {
        let mut out = Plan {
            nodes: self
                .results
                .iter()
                .map(|(name, r)| (name.clone(), (*r.routes).clone()))
                .collect(),
            ..Plan::default()
        };
        if self.policy.is_none() {
            return out;
        }
        out.eligibility = self
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.eligibility()))
            .collect();
        let mut problems: BTreeSet<Problem> = self
            .results
            .values()
            .flat_map(|r| r.problems.iter().cloned())
            .collect();
        let announced: BTreeSet<IpNet> = out.nodes.values().flat_map(|n| n.prefixes()).collect();
        problems.extend(not_announced(self.services(), &announced));
        out.problems = problems.into_iter().collect();
        out
    }

    /// Adds or replaces the Service with this owner uid.
    pub fn upsert_service(&mut self, facts: ServiceFacts) -> BTreeSet<NodeName> {
        self.upsert_keyed_service(None, facts)
    }

    /// As [`Self::upsert_service`]; `uid`, the owner's uid, becomes the Service's key if
    /// the state holds none yet (see [`Self::from_keyed_inputs`]).
    pub fn upsert_service_as(&mut self, uid: Arc<str>, facts: ServiceFacts) -> BTreeSet<NodeName> {
        self.upsert_keyed_service(Some(uid), facts)
    }

    fn upsert_keyed_service(
        &mut self,
        uid: Option<Arc<str>>,
        facts: ServiceFacts,
    ) -> BTreeSet<NodeName> {
        let (uid, old) = match self.services.get_key_value(facts.owner.uid.as_str()) {
            Some((uid, old)) => (Arc::clone(uid), Some(Arc::clone(old))),
            // A key that is not this owner's uid would file the Service under another.
            None => match uid.filter(|uid| **uid == *facts.owner.uid) {
                Some(uid) => (uid, None),
                None => (Arc::from(facts.owner.uid.as_str()), None),
            },
        };
        if old.as_deref() == Some(&facts) {
            return BTreeSet::new();
        }
        let new = Arc::new(facts);
        if let Some(old) = &old {
            self.forget_addresses(old, &uid);
        }
        for a in new.ips.iter() {
            self.addresses.insert((a.ip, Arc::clone(&uid)));
        }
        self.services.insert(uid, Arc::clone(&new));
        self.service_changed(old.as_deref(), Some(&new))
    }

    /// Every prefix that replacing the Service `owner_uid` with `facts` (`None`: removing
    /// it) can change on any node, under the current policy and pools: outside them, no
    /// node's set changes. Asked before the change, for [`crate::delta_at`].
    pub fn service_prefixes(
        &self,
        owner_uid: &str,
        facts: Option<&ServiceFacts>,
    ) -> BTreeSet<IpNet> {
        let Some(policy) = self.policy.as_deref() else {
            return BTreeSet::new();
        };
        let ctx = Ctx::new(policy, &self.pools);
        let old = self.services.get(owner_uid).map(|s| &**s);
        let both: Vec<&ServiceFacts> = old.into_iter().chain(facts).collect();
        touched_prefixes(&ctx, policy, &both)
    }

    pub fn remove_service(&mut self, owner_uid: &str) -> BTreeSet<NodeName> {
        let Some((uid, old)) = self.services.remove_with_key(owner_uid) else {
            return BTreeSet::new();
        };
        self.forget_addresses(&old, &uid);
        self.service_changed(Some(&old), None)
    }

    /// Adds or replaces the node with this name.
    pub fn upsert_node(&mut self, node: Node) -> BTreeSet<NodeName> {
        if self.nodes.get(&node.name).is_some_and(|n| **n == node) {
            return BTreeSet::new();
        }
        let node = Arc::new(node);
        self.nodes.insert(node.name.clone(), Arc::clone(&node));
        let services = self.service_refs();
        let result = self.compute_node(&node, &services);
        self.set_result(&node.name, result)
            .then(|| node.name.clone())
            .into_iter()
            .collect()
    }

    pub fn remove_node(&mut self, name: &str) -> BTreeSet<NodeName> {
        self.nodes.remove(name);
        self.results
            .remove(name)
            .map(|_| name.to_string())
            .into_iter()
            .collect()
    }

    pub fn set_policy(&mut self, policy: Option<BgpPolicy>) -> BTreeSet<NodeName> {
        if self.policy.as_deref() == policy.as_ref() {
            return BTreeSet::new();
        }
        self.policy = policy.map(Arc::new);
        self.recompute_all()
    }

    /// The pools matter for their aggregation lengths.
    pub fn set_pools(&mut self, pools: Vec<PoolSpec>) -> BTreeSet<NodeName> {
        if *self.pools == pools {
            return BTreeSet::new();
        }
        self.pools = Arc::new(pools);
        self.recompute_all()
    }

    fn service_refs(&self) -> Vec<&ServiceFacts> {
        self.services.values().map(|s| &**s).collect()
    }

    /// Drops the addresses of `facts`, the Service `uid`.
    fn forget_addresses(&mut self, facts: &ServiceFacts, uid: &Arc<str>) {
        for a in facts.ips.iter() {
            self.addresses.remove(&(a.ip, Arc::clone(uid)));
        }
    }

    fn compute_node(&self, node: &Node, services: &[&ServiceFacts]) -> NodeResult {
        let (routes, problems) = match &self.policy {
            Some(policy) => Ctx::new(policy, &self.pools).node(node, services),
            None => (NodeRoutes::default(), Vec::new()),
        };
        NodeResult {
            routes: Arc::new(routes),
            problems: Arc::new(problems.into_iter().collect()),
            inserted_since_packed: 0,
        }
    }

    /// Stores `node`'s result; true when it differs from the one it replaces.
    fn set_result(&mut self, node: &str, result: NodeResult) -> bool {
        match self.results.get(node) {
            Some(old) if *old == result => false,
            _ => {
                self.results.insert(node.to_string(), result);
                true
            }
        }
    }

    fn recompute_all(&mut self) -> BTreeSet<NodeName> {
        let services = self.service_refs();
        let results: Vec<(NodeName, NodeResult)> = self
            .nodes
            .values()
            .map(|n| (n.name.clone(), self.compute_node(n, &services)))
            .collect();
        drop(services);
        results
            .into_iter()
            .filter_map(|(name, r)| self.set_result(&name, r).then_some(name))
            .collect()
    }

    /// Recomputes the prefixes `old` and `new` (the same Service before and after) make,
    /// on the nodes either can announce from.
    fn service_changed(
        &mut self,
        old: Option<&ServiceFacts>,
        new: Option<&ServiceFacts>,
    ) -> BTreeSet<NodeName> {
        let Some(policy) = self.policy.clone() else {
            return BTreeSet::new();
        };
        let pools = Arc::clone(&self.pools);
        let ctx = Ctx::new(&policy, &pools);
        let facts: Vec<&ServiceFacts> = old.into_iter().chain(new).collect();
        let prefixes = touched_prefixes(&ctx, &policy, &facts);
        if prefixes.is_empty() {
            return BTreeSet::new();
        }
        // A Local Service can only announce from its endpoint nodes; a Cluster one from
        // any eligible node.
        let nodes: Vec<Arc<Node>> = if facts
            .iter()
            .all(|f| f.traffic_policy == TrafficPolicy::Local)
        {
            let names: BTreeSet<&NodeName> = facts
                .iter()
                .flat_map(|f| &f.nodes_with_ready_endpoints)
                .collect();
            names
                .into_iter()
                .filter_map(|n| self.nodes.get(n).cloned())
                .collect()
        } else {
            self.nodes.values().cloned().collect()
        };
        // What each prefix is made of is the same on every node: the Service addresses
        // under it, found once per change rather than once per node.
        let under: Vec<PrefixAddresses> = prefixes
            .iter()
            .map(|prefix| (*prefix, self.addresses_under(prefix)))
            .collect();
        let mut patched = Vec::new();
        for node in nodes {
            if node.eligibility() != Eligibility::Eligible {
                continue;
            }
            let Some(result) = self.results.get(&node.name) else {
                continue;
            };
            if result.routes.peers.is_empty() {
                continue;
            }
            if let Some(result) = patch(&ctx, &node, result, &under) {
                patched.push((node.name.clone(), result));
            }
        }
        let mut changed = BTreeSet::new();
        for (name, result) in patched {
            self.results.insert(name.clone(), result);
            changed.insert(name);
        }
        changed
    }

    /// The Service addresses inside `prefix`, with their Services.
    fn addresses_under(&self, prefix: &IpNet) -> Vec<(Arc<ServiceFacts>, AssignedIp)> {
        let first = prefix.network();
        let last = prefix.broadcast();
        let uids: BTreeSet<&Arc<str>> = self
            .addresses
            .range((Bound::Included((first, Arc::from(""))), Bound::Unbounded))
            .take_while(move |(ip, _)| *ip <= last)
            .map(|(_, uid)| uid)
            .collect();
        let mut out = Vec::new();
        for svc in uids.into_iter().filter_map(|uid| self.services.get(&**uid)) {
            for assigned in svc.ips.iter().filter(|a| prefix.contains(&a.ip)) {
                out.push((Arc::clone(svc), assigned.clone()));
            }
        }
        out
    }
}

/// `result` with the prefixes of `under` (each with the Service addresses inside it)
/// recomputed on every session of `node`; `None` when that changes nothing.
fn patch(
    ctx: &Ctx<'_>,
    node: &Node,
    result: &NodeResult,
    under: &[PrefixAddresses],
) -> Option<NodeResult> {
    let mut routes: Option<NodeRoutes> = None;
    let mut problems: Option<BTreeSet<Problem>> = None;
    let mut inserted = 0;
    let no_next_hop = |session: &PeerSession, prefix: IpNet| Problem::NoNextHop {
        node: node.name.clone(),
        peer: session.name.clone(),
        prefix,
    };
    for session in &result.routes.peers {
        // Per session: attributes depend on whether the session is eBGP.
        let mut shared = SharedAttrs::new();
        let rules = ctx.session_rules(node, session);
        let current_set = result.routes.routes.get(&session.name);
        for (prefix, addresses) in under {
            let mut rule_ids: Option<RuleSet> = None;
            if !rules.is_empty() {
                for (svc, assigned) in addresses {
                    ctx.contributions(node, session, &rules, svc, assigned, &mut |p, i| {
                        if p == *prefix {
                            rule_ids.get_or_insert_default().insert(i);
                        }
                    });
                }
            }
            let wanted = rule_ids.map(|ids| -> Result<Arc<RouteAttrs>, Problem> {
                let attrs = ctx.route(node, session, *prefix, ids, &mut shared)?;
                Ok(share_with_neighbours(
                    current_set,
                    prefix,
                    attrs,
                    (ids, IpFamily::of(prefix.addr())),
                    &mut shared,
                ))
            });
            let current = current_set.and_then(|set| set.get(prefix));
            let (want_route, want_problem) = match &wanted {
                None => (None, false),
                Some(Ok(attrs)) => (Some(attrs), false),
                Some(Err(_)) => (None, true),
            };
            if current != want_route {
                let set = routes
                    .get_or_insert_with(|| (*result.routes).clone())
                    .routes
                    .entry(session.name.clone())
                    .or_default();
                match want_route {
                    Some(attrs) => {
                        if set.insert(*prefix, attrs.clone()).is_none() {
                            inserted += 1;
                        }
                    }
                    None => {
                        set.remove(prefix);
                    }
                }
            }
            // The problem's key names the node and the session: made only when a problem
            // can be there (almost never), not for every prefix of every node.
            let had_problem = !result.problems.is_empty()
                && result.problems.contains(&no_next_hop(session, *prefix));
            if had_problem != want_problem {
                let set = problems.get_or_insert_with(|| (*result.problems).clone());
                if want_problem {
                    set.insert(no_next_hop(session, *prefix));
                } else {
                    set.remove(&no_next_hop(session, *prefix));
                }
            }
        }
    }
    if routes.is_none() && problems.is_none() {
        return None;
    }
    let mut inserted_since_packed = result.inserted_since_packed + inserted;
    if let Some(routes) = &mut routes
        && repack_due(&node.name, routes, inserted_since_packed)
    {
        for set in routes.routes.values_mut() {
            *set = crate::compute::packed(set.iter().map(|(p, a)| (*p, Arc::clone(a))).collect());
        }
        inserted_since_packed = 0;
    }
    Some(NodeResult {
        routes: routes.map_or_else(|| Arc::clone(&result.routes), Arc::new),
        problems: problems.map_or_else(|| Arc::clone(&result.problems), Arc::new),
        inserted_since_packed,
    })
}

/// Whether `node`'s maps, into which `inserted` routes were patched since they were last
/// built packed, are due to be built packed again.
///
/// A persistent B-tree splits a full leaf into two halves, so routes patched in one by
/// one (addresses are allocated in order, so most land at the end) leave every leaf they
/// reach half empty: at 1,000 nodes × 10,000 Services, twice the memory of the routes
/// themselves. Rebuilding a node's maps packed costs about as much as inserting its routes
/// again; done once a quarter to a half of its routes have been patched in since the last
/// time, it keeps maps grown at the end at least three quarters full, for three to five
/// extra inserts per insert. The quarter is stretched by up to twice per node, by its
/// name, because one `Cluster`
/// Service reaches every node at once: rebuilt on the same change, a thousand nodes would
/// make that one change slow.
fn repack_due(node: &str, routes: &NodeRoutes, inserted: usize) -> bool {
    /// Maps this small stay cheap whatever their fill.
    const SMALL: usize = 256;
    let len: usize = routes.routes.values().map(PeerRoutes::len).sum();
    if len < SMALL {
        return false;
    }
    let spread = node
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % 64;
    let quarter = len / 4;
    inserted >= quarter + quarter * spread as usize / 64
}

/// `attrs`, just made for `prefix`, or the equal attributes a route next to `prefix` in
/// the session's `set` already holds. Attributes made for one patch would otherwise be a
/// copy of their own that every route patched in keeps, and a set would hold as many
/// copies as changes that reached it; equal routes lie side by side (most of a set has
/// the same rules), so a neighbour's are almost always the ones to share. What is found
/// replaces the new value in `shared`, under `key`, for the rest of the patch.
fn share_with_neighbours(
    set: Option<&PeerRoutes>,
    prefix: &IpNet,
    attrs: Arc<RouteAttrs>,
    key: (RuleSet, IpFamily),
    shared: &mut SharedAttrs,
) -> Arc<RouteAttrs> {
    // Held by `shared` and `attrs` only: made by this patch and not yet shared.
    if Arc::strong_count(&attrs) > 2 {
        return attrs;
    }
    let Some(set) = set else {
        return attrs;
    };
    let found = [set.get_prev(prefix), set.get_next(prefix)]
        .into_iter()
        .flatten()
        .map(|(_, a)| a)
        .find(|a| **a == attrs);
    match found {
        Some(existing) => {
            shared.insert(key, Arc::clone(existing));
            Arc::clone(existing)
        }
        None => attrs,
    }
}

/// Every prefix the Services' addresses could make under `policy`: each address's host
/// route and its aggregate at every aggregation length a rule or pool sets for its family.
fn touched_prefixes(ctx: &Ctx<'_>, policy: &BgpPolicy, facts: &[&ServiceFacts]) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for svc in facts {
        for assigned in svc.ips.iter() {
            let family = IpFamily::of(assigned.ip);
            out.insert(IpNet::from(assigned.ip));
            for rule in policy
                .advertisements
                .iter()
                .filter(|r| r.selects_pool(&assigned.pool))
            {
                if let Some(len) = ctx.aggregation(rule, &assigned.pool, family)
                    && let Ok(net) = IpNet::new(assigned.ip, len)
                {
                    out.insert(net.trunc());
                }
            }
        }
    }
    out
}
