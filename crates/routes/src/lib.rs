//! Per-node desired routes: for every node, the BGP sessions it must hold and the prefixes,
//! with next hop and attributes, it must announce on each.
//!
//! This is the pure core of the route pipeline (no I/O, no runtime): the IPAM service calls
//! [`compute()`] (or [`compute_node()`] for the nodes a change touches) and streams each node
//! its [`NodeRoutes`] whenever that value changes; the route speaker maps [`RouteAttrs`]
//! 1:1 onto herald-bgp's `RouteAttributes`. The crate knows Services and pools on its input
//! side and only prefixes and attributes on its output side; it does not depend on the BGP
//! engine.
//!
//! # Rules
//! - A node is *eligible* when it is Ready and lacks [`EXCLUDE_FROM_LB_LABEL`].
//! - A peer applies to a node when its node selector matches the node's labels (selective
//!   peering). The node holds those sessions whether or not it is eligible: an ineligible
//!   node keeps its sessions and announces nothing, so its routes are withdrawn by UPDATE
//!   rather than by closing the session (which graceful restart would turn into stale
//!   routes at the ToR). A node that matches no peer gets an empty [`NodeRoutes`]. Every
//!   node given is in the output, so an unknown node (absent) differs from a known node
//!   with nothing to do (empty).
//! - An advertisement rule applies to a node, a peer and an address when its node
//!   selector matches the node, its peer list is empty or names the peer, and its pool is
//!   unset or is the address's pool. No applying rule, no route.
//! - `Cluster` Services are announced by every eligible node; `Local` Services only by
//!   eligible nodes with a ready or serving endpoint. A Cluster Service with no ready
//!   endpoint anywhere is still announced (as MetalLB and Cilium do) unless the rule sets
//!   `withdraw_without_endpoints`.
//! - Aggregation (the rule's length, else the pool's): a node announces the covering
//!   aggregate for every *Cluster* address it announces. Local Services never contribute
//!   to aggregates; they are always announced as host routes from endpoint nodes, even
//!   when the rule turns host routes off — an aggregate must not attract Local traffic to
//!   nodes without endpoints.
//! - Next hop: the session's source address for prefixes of the session's family, else the
//!   node's first address of the prefix's family; with none, the prefix is skipped on that
//!   session and reported as [`Problem::NoNextHop`]. Sessions announce only their families.
//! - Attributes: ORIGIN IGP; communities and large communities are the union of the rules
//!   that produced the prefix; LOCAL_PREF and MED come from the first of those rules (in
//!   policy order) that sets one; LOCAL_PREF only on iBGP sessions.
//! - Output is ordered (`BTreeMap`, sorted vectors) and independent of input order, so
//!   `NodeRoutes` equality (or [`node_digest`]) is the "did this node change" test.

pub mod community;
pub mod compute;
pub mod delta;
pub mod explain;
pub mod facts;
pub mod incremental;
pub mod policy;

pub use community::{Community, LargeCommunity};
pub use compute::{
    NodeRoutes, Origin, PeerRoutes, PeerRoutesDiff, PeerSession, Plan, Problem, RouteAttrs,
    RoutesDiff, compute, compute_node, diff, node_digest, packed, plan,
};
pub use delta::{PeerDelta, RoutesDelta, delta, delta_at};
pub use facts::{EXCLUDE_FROM_LB_LABEL, Eligibility, Node, NodeName, ServiceFacts};
pub use incremental::{NodeResult, RouteState};
pub use policy::{
    AdvertisementInput, AdvertisementRule, BfdInput, BfdSettings, BgpPolicy, BgpPolicyInput,
    Password, Peer, PeerInput, PeerName, RouterIdRule, SourceAddressRule,
};

#[cfg(test)]
mod tests;
