//! The computation: nodes + service facts + policy + pools → for every node, the sessions
//! it holds and the routes it announces on each. Pure and deterministic: the same inputs,
//! in any order, give equal outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use herald_model::{AssignedIp, IpFamily, PoolName, PoolSpec, TrafficPolicy};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::community::{Community, LargeCommunity};
use crate::facts::{Eligibility, Node, NodeName, ServiceFacts};
use crate::policy::{AdvertisementRule, BgpPolicy, MAX_RULES, Password, Peer, PeerName};

/// ORIGIN (RFC 4271 §5.1.1). Herald originates its routes, so it always sends `Igp`; the
/// other values exist so the type maps 1:1 onto herald-bgp's.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

/// The attributes of one route on one session; a speaker maps these field by field onto
/// herald-bgp's `RouteAttributes` (with an empty AS path: Herald does not prepend).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteAttrs {
    /// Always explicit: the session's source address for prefixes of the session's family,
    /// else the node's first address of the prefix's family.
    pub next_hop: IpAddr,
    pub origin: Origin,
    pub med: Option<u32>,
    /// Set only on iBGP sessions (it is never sent on eBGP, so leaving it out there keeps
    /// snapshots from changing for nothing).
    pub local_pref: Option<u32>,
    /// Sorted, without repeats.
    pub communities: Vec<Community>,
    /// Sorted, without repeats.
    pub large_communities: Vec<LargeCommunity>,
}

/// Everything a node needs to open one BGP session, resolved for that node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerSession {
    pub name: PeerName,
    pub address: IpAddr,
    pub port: u16,
    pub peer_asn: u32,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    /// The node address the session is bound to; also the next hop of the session's family.
    pub source_address: IpAddr,
    /// Families negotiated (MP-BGP) and announced; sorted.
    pub families: Vec<IpFamily>,
    pub hold_time: u16,
    pub keepalive: u16,
    /// Seconds.
    pub connect_retry: u16,
    pub md5_password: Option<Password>,
    pub multihop_ttl: Option<u8>,
    pub graceful_restart: bool,
    pub restart_time: u16,
    pub passive: bool,
    /// Most prefixes the peer may send (`None`: no limit).
    pub max_prefixes: Option<u32>,
    pub bfd: Option<crate::policy::BfdSettings>,
}

impl PeerSession {
    pub fn is_ebgp(&self) -> bool {
        self.peer_asn != self.local_asn
    }
}

/// One node's full desired state. Equality is the change test: the IPAM sends a node a new
/// snapshot exactly when its `NodeRoutes` is not equal to the last one sent
/// ([`node_digest`] is the same test as a number).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRoutes {
    /// Sorted by name.
    pub peers: Vec<PeerSession>,
    /// One entry per session in `peers`, possibly empty (hold the session, announce nothing).
    pub routes: BTreeMap<PeerName, PeerRoutes>,
}

/// One session's routes. A persistent map: a copy shares its structure with the original,
/// so keeping the last published set and patching it costs the change, not the set, and
/// comparing two versions ([`imbl::OrdMap::diff`]) skips what they share.
///
/// The attributes are shared: the routes of a session that the same rules put there carry
/// equal attributes (the next hop is the session's), so they hold one `Arc` of them rather
/// than a copy each, which takes an entry from about 110 bytes to 32 (at 1,000 nodes ×
/// 5,000 `Cluster` Services, 5 million entries). `Arc`'s equality compares the values, so
/// sharing changes no comparison.
pub type PeerRoutes = imbl::OrdMap<IpNet, Arc<RouteAttrs>>;

/// The attributes already made for one session, by the rules that put a route there and
/// the route's family (which decides its next hop): every route they make shares them.
pub(crate) type SharedAttrs = BTreeMap<(RuleSet, IpFamily), Arc<RouteAttrs>>;

/// The persistent map of `sorted` (ascending, without repeated keys), its B-tree's leaves
/// full.
///
/// `imbl` splits a full leaf into two halves, so a map built by inserting its keys in
/// order keeps every leaf half empty: twice the bytes of its entries. Inserted every
/// other key first, the leaves hold half each, as before; the keys in between then land
/// in the gaps and fill them without a split. The first patch of a leaf splits it again,
/// so a map patched change by change stays between half full and full.
pub fn packed<K: Ord + Clone, V: Clone>(sorted: Vec<(K, V)>) -> imbl::OrdMap<K, V> {
    debug_assert!(sorted.windows(2).all(|w| w[0].0 < w[1].0), "not sorted");
    let mut map = imbl::OrdMap::new();
    let mut between = Vec::with_capacity(sorted.len() / 2);
    for (i, (key, value)) in sorted.into_iter().enumerate() {
        if i % 2 == 0 {
            map.insert(key, value);
        } else {
            between.push((key, value));
        }
    }
    for (key, value) in between {
        map.insert(key, value);
    }
    map
}

impl NodeRoutes {
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every prefix announced on any session.
    pub fn prefixes(&self) -> BTreeSet<IpNet> {
        self.routes
            .values()
            .flat_map(|r| r.keys().copied())
            .collect()
    }
}

/// A stable-within-a-process fingerprint of a node's routes: equal routes give equal
/// digests. For comparing snapshots cheaply (e.g. keeping only the digest of what was
/// last sent); not for storing, since std's hasher may change between Rust releases.
pub fn node_digest(routes: &NodeRoutes) -> u64 {
    let mut h = DefaultHasher::new();
    routes.hash(&mut h);
    h.finish()
}

/// Something that kept a session or route from being computed, for status and the
/// "why is this Service not advertised" query. Problems never block other routes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Problem {
    /// The node matches peers, but the router id rule finds no address on it; it holds
    /// no sessions.
    NoRouterId { node: NodeName },
    /// The node has no address for this session's source address rule.
    NoSourceAddress { node: NodeName, peer: PeerName },
    /// The prefix's family differs from the session's and the node has no address of the
    /// prefix's family to use as next hop, so the prefix is not announced on that session.
    NoNextHop {
        node: NodeName,
        peer: PeerName,
        prefix: IpNet,
    },
    /// The Service has ready endpoints but no node announces this address (no rule for its
    /// pool, or its endpoints are only on nodes that peer with nobody, ...).
    NotAnnounced {
        service: String,
        ip: IpAddr,
        pool: PoolName,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRouterId { node } => write!(
                f,
                "node {node}: no address matches the router id rule, so it holds no BGP sessions"
            ),
            Self::NoSourceAddress { node, peer } => write!(
                f,
                "node {node}, peer {peer}: no node address matches the source address rule"
            ),
            Self::NoNextHop { node, peer, prefix } => write!(
                f,
                "node {node}, peer {peer}: {prefix} not announced, the node has no address of its family for the next hop"
            ),
            Self::NotAnnounced { service, ip, pool } => write!(
                f,
                "service {service}: {ip} (pool {pool}) has ready endpoints but no node announces it"
            ),
        }
    }
}

/// The full result: every node's routes, why ineligible nodes announce nothing, and the
/// problems found on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Every node given, eligible or not.
    pub nodes: BTreeMap<NodeName, NodeRoutes>,
    pub eligibility: BTreeMap<NodeName, Eligibility>,
    /// Sorted, without repeats.
    pub problems: Vec<Problem>,
}

/// For every node given, its sessions and routes. Nodes that announce nothing are present
/// with their sessions and empty route maps (or no sessions at all when they match no peer),
/// so "known node, nothing to announce" is an empty snapshot, not a missing one. If a name
/// appears twice in `nodes`, the last one wins.
pub fn compute(
    nodes: &[Node],
    services: &[ServiceFacts],
    policy: &BgpPolicy,
    pools: &[PoolSpec],
) -> BTreeMap<NodeName, NodeRoutes> {
    plan(nodes, services, policy, pools).nodes
}

/// [`compute`] plus eligibility and problems.
pub fn plan(
    nodes: &[Node],
    services: &[ServiceFacts],
    policy: &BgpPolicy,
    pools: &[PoolSpec],
) -> Plan {
    let ctx = Ctx::new(policy, pools);
    let services: Vec<&ServiceFacts> = services.iter().collect();
    let mut out = Plan::default();
    let mut node_problems = BTreeMap::new();
    for node in nodes {
        let (routes, found) = ctx.node(node, &services);
        node_problems.insert(node.name.clone(), found);
        out.nodes.insert(node.name.clone(), routes);
        out.eligibility
            .insert(node.name.clone(), node.eligibility());
    }
    let mut problems: BTreeSet<Problem> = node_problems.into_values().flatten().collect();
    // A Service that could be served but is announced nowhere is the classic Local +
    // selective peering trap (endpoints only on nodes that do not peer): say so.
    let announced: BTreeSet<IpNet> = out.nodes.values().flat_map(|n| n.prefixes()).collect();
    problems.extend(not_announced(services.iter().copied(), &announced));
    out.problems = problems.into_iter().collect();
    out
}

/// [`Problem::NotAnnounced`] for every address of a Service with ready endpoints that no
/// prefix in `announced` covers.
pub(crate) fn not_announced<'s>(
    services: impl Iterator<Item = &'s ServiceFacts>,
    announced: &BTreeSet<IpNet>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for svc in services.filter(|s| s.has_ready_endpoints()) {
        for assigned in svc.ips.iter() {
            if !is_covered(announced, assigned.ip) {
                problems.push(Problem::NotAnnounced {
                    service: svc.owner.uid.clone(),
                    ip: assigned.ip,
                    pool: assigned.pool.clone(),
                });
            }
        }
    }
    problems
}

/// One node's routes and problems, equal to its entry in [`plan`], for recomputing only the
/// nodes a change touches (a node's routes depend on that node, the services, the policy
/// and the pools, never on other nodes).
pub fn compute_node(
    node: &Node,
    services: &[ServiceFacts],
    policy: &BgpPolicy,
    pools: &[PoolSpec],
) -> (NodeRoutes, Vec<Problem>) {
    let services: Vec<&ServiceFacts> = services.iter().collect();
    Ctx::new(policy, pools).node(node, &services)
}

fn is_covered(announced: &BTreeSet<IpNet>, ip: IpAddr) -> bool {
    let bits = IpFamily::of(ip).bits();
    (0..=bits).any(|len| {
        IpNet::new(ip, len)
            .map(|n| announced.contains(&n.trunc()))
            .unwrap_or(false)
    })
}

/// A set of rule indices, as a bitmap: [`crate::policy::MAX_RULES`] bits, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RuleSet([u64; RULE_WORDS]);

const RULE_WORDS: usize = MAX_RULES.div_ceil(64);

impl RuleSet {
    pub(crate) fn insert(&mut self, i: usize) {
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

pub(crate) struct Ctx<'a> {
    policy: &'a BgpPolicy,
    /// Pool-level aggregation lengths, used by rules that set none of their own.
    pool_aggregation: BTreeMap<&'a PoolName, (Option<u8>, Option<u8>)>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(policy: &'a BgpPolicy, pools: &'a [PoolSpec]) -> Self {
        let pool_aggregation = pools
            .iter()
            .map(|p| (&p.name, (p.aggregation_length_v4, p.aggregation_length_v6)))
            .collect();
        Self {
            policy,
            pool_aggregation,
        }
    }

    pub(crate) fn aggregation(
        &self,
        rule: &AdvertisementRule,
        pool: &PoolName,
        family: IpFamily,
    ) -> Option<u8> {
        rule.aggregation_length(family).or_else(|| {
            self.pool_aggregation
                .get(pool)
                .and_then(|(v4, v6)| match family {
                    IpFamily::V4 => *v4,
                    IpFamily::V6 => *v6,
                })
        })
    }

    pub(crate) fn node(
        &self,
        node: &Node,
        services: &[&ServiceFacts],
    ) -> (NodeRoutes, Vec<Problem>) {
        let (mut out, mut problems) = self.sessions(node);
        let eligible = node.eligibility() == Eligibility::Eligible;
        for session in &out.peers {
            let routes = if eligible {
                self.session_routes(node, session, services, &mut problems)
            } else {
                // Not Ready or excluded: keep the sessions and announce nothing, so the
                // speaker withdraws with an UPDATE instead of closing the session (which,
                // with graceful restart, would leave stale routes at the ToR).
                PeerRoutes::new()
            };
            out.routes.insert(session.name.clone(), routes);
        }
        (out, problems)
    }

    /// The node's sessions (in `peers`, with no routes yet) and why any are missing.
    pub(crate) fn sessions(&self, node: &Node) -> (NodeRoutes, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut out = NodeRoutes::default();
        let mut peers: Vec<&Peer> = self
            .policy
            .peers
            .iter()
            .filter(|p| p.node_selector.matches(&node.labels))
            .collect();
        if peers.is_empty() {
            return (out, problems);
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let Some(router_id) = self.policy.router_id.resolve(node) else {
            problems.push(Problem::NoRouterId {
                node: node.name.clone(),
            });
            return (out, problems);
        };
        for peer in peers {
            let Some(source_address) = peer
                .source_address
                .resolve(node, IpFamily::of(peer.address))
            else {
                problems.push(Problem::NoSourceAddress {
                    node: node.name.clone(),
                    peer: peer.name.clone(),
                });
                continue;
            };
            out.peers.push(PeerSession {
                name: peer.name.clone(),
                address: peer.address,
                port: peer.port,
                peer_asn: peer.asn,
                local_asn: peer.effective_local_asn(self.policy.local_asn),
                router_id,
                source_address,
                families: peer.families.clone(),
                hold_time: peer.hold_time,
                keepalive: peer.keepalive,
                connect_retry: peer.connect_retry,
                md5_password: peer.md5_password.clone(),
                multihop_ttl: peer.multihop_ttl,
                graceful_restart: peer.graceful_restart,
                restart_time: peer.restart_time,
                passive: peer.passive,
                max_prefixes: peer.max_prefixes,
                bfd: peer.bfd,
            });
        }
        (out, problems)
    }

    fn session_routes(
        &self,
        node: &Node,
        session: &PeerSession,
        services: &[&ServiceFacts],
        problems: &mut Vec<Problem>,
    ) -> PeerRoutes {
        let rules = self.session_rules(node, session);
        // Prefix → the rules that put it there; attributes are derived from the rule set,
        // so they do not depend on the order of services.
        let mut wanted: BTreeMap<IpNet, RuleSet> = BTreeMap::new();
        if !rules.is_empty() {
            for svc in services {
                for assigned in svc.ips.iter() {
                    self.contributions(node, session, &rules, svc, assigned, &mut |prefix, i| {
                        wanted.entry(prefix).or_default().insert(i);
                    });
                }
            }
        }
        let mut routes = Vec::with_capacity(wanted.len());
        // Most prefixes share a rule set; derive each set's attributes once.
        let mut shared = SharedAttrs::new();
        for (prefix, rule_ids) in wanted {
            match self.route(node, session, prefix, rule_ids, &mut shared) {
                Ok(attrs) => routes.push((prefix, attrs)),
                Err(problem) => problems.push(problem),
            }
        }
        packed(routes)
    }

    /// The advertisement rules (with their policy index) that apply to `session` on `node`.
    pub(crate) fn session_rules(
        &self,
        node: &Node,
        session: &PeerSession,
    ) -> Vec<(usize, &'a AdvertisementRule)> {
        self.policy
            .advertisements
            .iter()
            .enumerate()
            .filter(|(_, r)| r.node_selector.matches(&node.labels) && r.selects_peer(&session.name))
            .collect()
    }

    /// Calls `add(prefix, rule)` for every prefix that `assigned`, one address of `svc`,
    /// puts on `session` of the eligible `node`, with each rule (of `rules`, from
    /// [`Self::session_rules`]) that puts it there.
    pub(crate) fn contributions(
        &self,
        node: &Node,
        session: &PeerSession,
        rules: &[(usize, &AdvertisementRule)],
        svc: &ServiceFacts,
        assigned: &AssignedIp,
        add: &mut impl FnMut(IpNet, usize),
    ) {
        let family = IpFamily::of(assigned.ip);
        if !session.families.contains(&family) {
            return;
        }
        let endpoints_here = svc.nodes_with_ready_endpoints.contains(&node.name);
        let host = IpNet::from(assigned.ip);
        for (i, rule) in rules.iter().filter(|(_, r)| r.selects_pool(&assigned.pool)) {
            let aggregation = self.aggregation(rule, &assigned.pool, family);
            match svc.traffic_policy {
                // The aggregation guard: a Local Service is announced only as a host
                // route, and only from nodes with its endpoints, even when the rule asks
                // for aggregates only. An aggregate means "any eligible node can take this
                // traffic", which is false for Local.
                TrafficPolicy::Local => {
                    if endpoints_here && (rule.host_routes || aggregation.is_some()) {
                        add(host, *i);
                    }
                }
                TrafficPolicy::Cluster => {
                    if rule.withdraw_without_endpoints && !svc.has_ready_endpoints() {
                        continue;
                    }
                    if rule.host_routes {
                        add(host, *i);
                    }
                    if let Some(len) = aggregation
                        && let Ok(net) = IpNet::new(assigned.ip, len)
                    {
                        add(net.trunc(), *i);
                    }
                }
            }
        }
    }

    /// The attributes of `prefix`, put on `session` by the rules `rule_ids`, or why it
    /// cannot be announced there. `shared` holds the attributes made for the session so
    /// far, which every route with the same rules and family shares.
    pub(crate) fn route(
        &self,
        node: &Node,
        session: &PeerSession,
        prefix: IpNet,
        rule_ids: RuleSet,
        shared: &mut SharedAttrs,
    ) -> Result<Arc<RouteAttrs>, Problem> {
        let family = IpFamily::of(prefix.addr());
        let next_hop = if family == IpFamily::of(session.source_address) {
            Some(session.source_address)
        } else {
            node.first_address(family)
        };
        let Some(next_hop) = next_hop else {
            return Err(Problem::NoNextHop {
                node: node.name.clone(),
                peer: session.name.clone(),
                prefix,
            });
        };
        let attrs = shared.entry((rule_ids, family)).or_insert_with(|| {
            Arc::new(RouteAttrs {
                next_hop,
                ..self.attrs(rule_ids, session.is_ebgp())
            })
        });
        Ok(Arc::clone(attrs))
    }

    /// Communities are the union over the contributing rules; LOCAL_PREF and MED come from
    /// the first contributing rule (in policy order) that sets them.
    /// The next hop is left unspecified for the caller to fill in.
    fn attrs(&self, rule_ids: RuleSet, ebgp: bool) -> RouteAttrs {
        let rules: Vec<&AdvertisementRule> = self
            .policy
            .advertisements
            .iter()
            .enumerate()
            .filter(|(i, _)| rule_ids.contains(*i))
            .map(|(_, r)| r)
            .collect();
        let communities: BTreeSet<Community> = rules
            .iter()
            .flat_map(|r| r.communities.iter().copied())
            .collect();
        let large_communities: BTreeSet<LargeCommunity> = rules
            .iter()
            .flat_map(|r| r.large_communities.iter().copied())
            .collect();
        let local_pref = if ebgp {
            None
        } else {
            rules.iter().find_map(|r| r.local_pref)
        };
        RouteAttrs {
            next_hop: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            origin: Origin::Igp,
            med: rules.iter().find_map(|r| r.med),
            local_pref,
            communities: communities.into_iter().collect(),
            large_communities: large_communities.into_iter().collect(),
        }
    }
}

/// What changed for one peer between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRoutesDiff {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    /// Same prefix, different attributes (next hop, communities, ...).
    pub changed: Vec<IpNet>,
}

impl PeerRoutesDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// What changed between two snapshots of one node, for logs and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesDiff {
    pub peers_added: Vec<PeerName>,
    pub peers_removed: Vec<PeerName>,
    /// Same name, different session parameters (the speaker must reset the session).
    pub peers_changed: Vec<PeerName>,
    /// Only peers with route changes; a removed peer lists all its prefixes as removed.
    pub routes: BTreeMap<PeerName, PeerRoutesDiff>,
}

impl RoutesDiff {
    pub fn is_empty(&self) -> bool {
        self.peers_added.is_empty()
            && self.peers_removed.is_empty()
            && self.peers_changed.is_empty()
            && self.routes.is_empty()
    }
}

impl fmt::Display for RoutesDiff {
    /// One line: `peers +a -b ~c; tor: +2 -1 ~0; ...`, or `no change`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut parts = Vec::new();
        let peers: Vec<String> = self
            .peers_added
            .iter()
            .map(|p| format!("+{p}"))
            .chain(self.peers_removed.iter().map(|p| format!("-{p}")))
            .chain(self.peers_changed.iter().map(|p| format!("~{p}")))
            .collect();
        if !peers.is_empty() {
            parts.push(format!("peers {}", peers.join(" ")));
        }
        for (peer, d) in &self.routes {
            parts.push(format!(
                "{peer}: +{} -{} ~{}",
                d.added.len(),
                d.removed.len(),
                d.changed.len()
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Compares two snapshots of the same node.
pub fn diff(old: &NodeRoutes, new: &NodeRoutes) -> RoutesDiff {
    let old_peers: BTreeMap<&str, &PeerSession> =
        old.peers.iter().map(|p| (p.name.as_str(), p)).collect();
    let new_peers: BTreeMap<&str, &PeerSession> =
        new.peers.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut out = RoutesDiff::default();
    for (name, session) in &new_peers {
        match old_peers.get(name) {
            None => out.peers_added.push((*name).to_string()),
            Some(before) if before != session => out.peers_changed.push((*name).to_string()),
            Some(_) => {}
        }
    }
    out.peers_removed = old_peers
        .keys()
        .filter(|n| !new_peers.contains_key(*n))
        .map(|n| (*n).to_string())
        .collect();
    let empty = PeerRoutes::new();
    let names: BTreeSet<&PeerName> = old.routes.keys().chain(new.routes.keys()).collect();
    for name in names {
        let before = old.routes.get(name).unwrap_or(&empty);
        let after = new.routes.get(name).unwrap_or(&empty);
        let mut d = PeerRoutesDiff::default();
        for (prefix, attrs) in after {
            match before.get(prefix) {
                None => d.added.push(*prefix),
                Some(a) if a != attrs => d.changed.push(*prefix),
                Some(_) => {}
            }
        }
        d.removed = before
            .keys()
            .filter(|p| !after.contains_key(*p))
            .copied()
            .collect();
        if !d.is_empty() {
            out.routes.insert(name.clone(), d);
        }
    }
    out
}
