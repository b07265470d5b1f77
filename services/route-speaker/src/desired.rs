//! The node's desired routes per session, as the messages of the route stream build them:
//! a full snapshot replaces them, a delta patches them (see `NodeRoutes.from_revision` in
//! the proto). No gRPC and no sessions in here, so the applier is tested on its own.
//!
//! Each session's set is an `Arc<Routes>` shared with the BGP session it is handed to, so
//! the speaker holds one copy of its routes; a delta copies a set only when it changes it
//! (and once for a run of deltas applied together).

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_api::routing::v1 as pb;
use herald_bgp::{AttributeInterner, Routes, SharedAttributes};
use ipnet::IpNet;

use crate::convert::{self, Provenance, RouteError};

/// A delta that does not start at the revision applied: a message was missed, and only a
/// fresh snapshot can tell what the set is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a delta from revision {from} arrived, but revision {} is applied", .applied.map_or_else(|| "none".to_string(), |r| r.to_string()))]
pub struct Gap {
    pub applied: Option<u64>,
    pub from: u64,
}

/// What applying messages did to one session's set.
#[derive(Debug, Clone, Default)]
pub struct PeerChange {
    /// Provenance of the routes the messages set (every route, for a snapshot).
    pub provenance: Vec<Provenance>,
    /// Routes and withdrawals left out, with the reason.
    pub skipped: Vec<RouteError>,
}

/// The desired routes as of the revision last applied.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    revision: Option<u64>,
    peers: BTreeMap<String, Arc<Routes>>,
}

impl Desired {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// The desired set of the session named `peer`.
    pub fn routes(&self, peer: &str) -> Option<&Arc<Routes>> {
        self.peers.get(peer)
    }

    /// Every session's set.
    pub fn peers(&self) -> &BTreeMap<String, Arc<Routes>> {
        &self.peers
    }

    /// Applies one message: a snapshot replaces every set; a delta must start at the
    /// revision applied (else [`Gap`], and nothing changes) and patches the sets of the
    /// sessions it lists, dropping the others. Applying the same message twice gives the
    /// same sets. `changes` gathers per session what the message set or skipped.
    pub fn apply(
        &mut self,
        message: &pb::NodeRoutes,
        changes: &mut BTreeMap<String, PeerChange>,
    ) -> Result<(), Gap> {
        let delta = message.from_revision != 0;
        // A delta to the revision applied (flags only, or the same delta again) sets
        // nothing new, and applying it again is harmless.
        if delta
            && self.revision != Some(message.from_revision)
            && self.revision != Some(message.revision)
        {
            return Err(Gap {
                applied: self.revision,
                from: message.from_revision,
            });
        }
        let mut peers: BTreeMap<String, Arc<Routes>> = BTreeMap::new();
        // One copy of each distinct attribute set across the message's sessions; a delta
        // reuses the copies its sets already hold.
        let mut interner = AttributeInterner::new();
        if delta {
            for routes in self.peers.values() {
                adopt_attributes(routes, &mut interner);
            }
        }
        for pr in &message.peers {
            let Some(name) = pr.peer.as_ref().map(|p| p.name.as_str()) else {
                continue;
            };
            // The speaker keeps the first of a repeated name.
            if peers.contains_key(name) {
                continue;
            }
            let change = changes.entry(name.to_string()).or_default();
            let mut routes = match self.peers.remove(name) {
                Some(routes) if delta => routes,
                _ => Arc::new(Routes::new()),
            };
            if !pr.routes.is_empty() || !pr.withdrawn.is_empty() {
                patch(Arc::make_mut(&mut routes), pr, change, &mut interner);
            }
            peers.insert(name.to_string(), routes);
        }
        self.peers = peers;
        self.revision = Some(message.revision);
        Ok(())
    }
}

/// Lets `interner` hand out the attribute sets `routes` holds. Distinct sets are few
/// and usually neighbours, so this looks at each run of routes sharing one `Arc` once.
fn adopt_attributes(routes: &Routes, interner: &mut AttributeInterner) {
    let mut last: Option<&SharedAttributes> = None;
    for attrs in routes.values() {
        if last.is_some_and(|l| Arc::ptr_eq(l, attrs)) {
            continue;
        }
        interner.adopt(attrs);
        last = Some(attrs);
    }
}

/// Removes `pr`'s withdrawn prefixes from `routes` and sets its routes, their
/// attributes shared through `interner`. A malformed entry is skipped and named, never
/// fatal; a prefix set twice keeps its first route.
fn patch(
    routes: &mut Routes,
    pr: &pb::PeerRoutes,
    change: &mut PeerChange,
    interner: &mut AttributeInterner,
) {
    for prefix in &pr.withdrawn {
        match prefix.trim().parse::<IpNet>() {
            Ok(net) => {
                routes.remove(&net.trunc());
            }
            Err(e) => change.skipped.push(RouteError::Prefix {
                prefix: prefix.clone(),
                reason: e.to_string(),
            }),
        }
    }
    // Sorted by prefix (stably, so the first of a repeated prefix comes first), the
    // routes build a fresh set in one pass with full B-tree nodes: inserted one by one
    // they would leave the nodes about half full, some 50 bytes a route instead of 30.
    let mut set: Vec<(IpNet, usize, SharedAttributes)> = Vec::with_capacity(pr.routes.len());
    for (i, route) in pr.routes.iter().enumerate() {
        match convert::route_from_pb(route) {
            Ok((prefix, attrs)) => set.push((prefix, i, interner.intern(attrs))),
            Err(e) => change.skipped.push(e),
        }
    }
    set.sort_by_key(|(prefix, _, _)| *prefix);
    let mut previous: Option<IpNet> = None;
    set.retain(|(prefix, _, _)| {
        if previous == Some(*prefix) {
            change
                .skipped
                .push(RouteError::Duplicate { prefix: *prefix });
            return false;
        }
        previous = Some(*prefix);
        true
    });
    change.provenance.extend(
        set.iter()
            .filter_map(|(prefix, i, _)| convert::provenance_of(*prefix, &pr.routes[*i])),
    );
    let routes_set = set.into_iter().map(|(prefix, _, attrs)| (prefix, attrs));
    if routes.is_empty() {
        *routes = routes_set.collect();
    } else {
        routes.extend(routes_set);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// A node's routes as the test draws them: per peer, prefix → MED.
    type State = BTreeMap<u8, BTreeMap<u8, u32>>;

    fn peer(name: u8) -> pb::Peer {
        pb::Peer {
            name: format!("tor{name}"),
            address: "127.0.0.1".into(),
            asn: 65001,
            ..pb::Peer::default()
        }
    }

    fn route(prefix: u8, med: u32) -> pb::Route {
        pb::Route {
            prefix: format!("172.16.0.{prefix}/32"),
            next_hop: "127.0.0.10".into(),
            med: Some(med),
            ..pb::Route::default()
        }
    }

    fn message(revision: u64, from: u64, peers: Vec<pb::PeerRoutes>) -> pb::NodeRoutes {
        pb::NodeRoutes {
            revision,
            from_revision: from,
            node: "n1".into(),
            local_asn: 65010,
            peers,
            ..pb::NodeRoutes::default()
        }
    }

    fn snapshot(revision: u64, state: &State) -> pb::NodeRoutes {
        let peers = state
            .iter()
            .map(|(p, routes)| pb::PeerRoutes {
                peer: Some(peer(*p)),
                routes: routes.iter().map(|(r, med)| route(*r, *med)).collect(),
                ..pb::PeerRoutes::default()
            })
            .collect();
        message(revision, 0, peers)
    }

    /// The delta IPAM would send from `old` (at `from`) to `new` (at `revision`).
    fn delta(from: u64, revision: u64, old: &State, new: &State) -> pb::NodeRoutes {
        let empty = BTreeMap::new();
        let peers = new
            .iter()
            .map(|(p, routes)| {
                let before = old.get(p).unwrap_or(&empty);
                pb::PeerRoutes {
                    peer: Some(peer(*p)),
                    routes: routes
                        .iter()
                        .filter(|(r, med)| before.get(*r) != Some(*med))
                        .map(|(r, med)| route(*r, *med))
                        .collect(),
                    withdrawn: before
                        .keys()
                        .filter(|r| !routes.contains_key(*r))
                        .map(|r| format!("172.16.0.{r}/32"))
                        .collect(),
                    ..pb::PeerRoutes::default()
                }
            })
            .collect();
        message(revision, from, peers)
    }

    /// What a snapshot of `state` alone gives.
    fn fresh(state: &State) -> BTreeMap<String, Routes> {
        let mut d = Desired::new();
        d.apply(&snapshot(1, state), &mut BTreeMap::new()).unwrap();
        held(&d)
    }

    fn held(d: &Desired) -> BTreeMap<String, Routes> {
        d.peers()
            .iter()
            .map(|(k, v)| (k.clone(), (**v).clone()))
            .collect()
    }

    fn state() -> impl Strategy<Value = State> {
        prop::collection::btree_map(
            0..3u8,
            prop::collection::btree_map(0..16u8, 0..3u32, 0..8),
            0..3,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A snapshot and then the deltas between states hold what a snapshot of the last
        /// state alone gives, after every step; each delta applied twice changes nothing.
        /// A delta that is lost makes the next one a gap, which changes nothing, and a
        /// fresh snapshot then puts the speaker right.
        #[test]
        fn snapshot_then_deltas_equals_the_snapshot(
            states in prop::collection::vec((state(), any::<bool>()), 1..12)
        ) {
            let mut desired = Desired::new();
            let mut revision = 1;
            desired.apply(&snapshot(revision, &states[0].0), &mut BTreeMap::new()).unwrap();
            let mut previous = states[0].0.clone();
            for (next, lost) in &states[1..] {
                let message = delta(revision, revision + 1, &previous, next);
                revision += 1;
                previous = next.clone();
                if *lost {
                    // The speaker never sees this delta; the next one does not follow.
                    let follow = delta(revision, revision + 1, next, next);
                    let before = held(&desired);
                    prop_assert_eq!(
                        desired.apply(&follow, &mut BTreeMap::new()),
                        Err(Gap { applied: Some(revision - 1), from: revision })
                    );
                    prop_assert_eq!(&held(&desired), &before, "a gap changes nothing");
                    desired.apply(&snapshot(revision, next), &mut BTreeMap::new()).unwrap();
                } else {
                    desired.apply(&message, &mut BTreeMap::new()).unwrap();
                    let once = held(&desired);
                    desired.apply(&message, &mut BTreeMap::new()).unwrap();
                    prop_assert_eq!(&held(&desired), &once, "a delta applied twice");
                }
                prop_assert_eq!(desired.revision(), Some(revision));
                prop_assert_eq!(held(&desired), fresh(next));
            }
        }
    }

    /// Routes with equal attributes hold one copy of them, across sessions and across a
    /// snapshot and the deltas after it.
    #[test]
    fn equal_attributes_are_held_once() {
        let mut state: State = BTreeMap::new();
        state.insert(0, (0..10).map(|r| (r, r32(r))).collect());
        state.insert(1, (0..4).map(|r| (r, 0)).collect());
        let mut desired = Desired::new();
        desired
            .apply(&snapshot(1, &state), &mut BTreeMap::new())
            .unwrap();
        let distinct = |d: &Desired| {
            let mut seen: Vec<SharedAttributes> = Vec::new();
            for routes in d.peers().values() {
                for a in routes.values() {
                    if !seen.iter().any(|s| Arc::ptr_eq(s, a)) {
                        seen.push(Arc::clone(a));
                    }
                }
            }
            seen.len()
        };
        // MEDs 0 and 1 on tor0, 0 on tor1.
        assert_eq!(distinct(&desired), 2);
        let mut next = state.clone();
        next.get_mut(&0).unwrap().insert(12, 1);
        next.get_mut(&1).unwrap().insert(12, 0);
        desired
            .apply(&delta(1, 2, &state, &next), &mut BTreeMap::new())
            .unwrap();
        assert_eq!(desired.routes("tor0").unwrap().len(), 11);
        assert_eq!(distinct(&desired), 2);
    }

    #[test]
    fn a_prefix_set_twice_keeps_its_first_route() {
        let mut message = snapshot(1, &BTreeMap::new());
        message.peers.push(pb::PeerRoutes {
            peer: Some(peer(0)),
            routes: vec![route(9, 1), route(3, 5), route(9, 2)],
            ..pb::PeerRoutes::default()
        });
        let mut desired = Desired::new();
        let mut changes = BTreeMap::new();
        desired.apply(&message, &mut changes).unwrap();
        let routes = desired.routes("tor0").unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[&"172.16.0.9/32".parse::<IpNet>().unwrap()].med,
            Some(1)
        );
        assert!(matches!(
            changes["tor0"].skipped.as_slice(),
            [RouteError::Duplicate { .. }]
        ));
    }

    fn r32(r: u8) -> u32 {
        u32::from(r % 2)
    }

    #[test]
    fn a_delta_copies_only_the_sets_it_changes_and_names_what_it_set() {
        let mut state: State = BTreeMap::new();
        state.insert(0, (0..10).map(|r| (r, 0)).collect());
        state.insert(1, (0..10).map(|r| (r, 0)).collect());
        let mut desired = Desired::new();
        desired
            .apply(&snapshot(5, &state), &mut BTreeMap::new())
            .unwrap();
        let untouched = Arc::clone(desired.routes("tor1").unwrap());
        let mut next = state.clone();
        next.get_mut(&0).unwrap().insert(12, 2);
        next.get_mut(&0).unwrap().remove(&3);
        let mut changes = BTreeMap::new();
        desired
            .apply(&delta(5, 6, &state, &next), &mut changes)
            .unwrap();
        assert!(Arc::ptr_eq(desired.routes("tor1").unwrap(), &untouched));
        assert_eq!(desired.routes("tor0").unwrap().len(), 10);
        assert!(changes["tor1"].provenance.is_empty());
        assert!(changes["tor0"].skipped.is_empty());
        // A malformed withdrawal is named and skipped, the rest applied.
        let mut bad = delta(6, 7, &next, &next);
        bad.peers[0].withdrawn = vec!["not a prefix".into(), "172.16.0.12/32".into()];
        let mut changes = BTreeMap::new();
        desired.apply(&bad, &mut changes).unwrap();
        assert_eq!(desired.routes("tor0").unwrap().len(), 9);
        assert_eq!(changes["tor0"].skipped.len(), 1);
        // A peer the delta leaves out is gone.
        let mut fewer = next.clone();
        fewer.remove(&1);
        desired
            .apply(&delta(7, 8, &next, &fewer), &mut BTreeMap::new())
            .unwrap();
        assert!(desired.routes("tor1").is_none());
    }
}
