//! What changed in one node's routes between two of its sets, as a delta a subscriber
//! applies to the set it holds.
//!
//! [`delta`] compares the sessions' route maps with [`imbl::OrdMap::diff`], which skips
//! the subtrees two versions share. The engine's sets are patched copies of the sets it
//! published before ([`crate::RouteState`]), so a delta costs the routes that changed,
//! not the routes the node holds, and it is made once per node and change, whatever the
//! number of subscribers.
//!
//! The sessions themselves are not in a delta: they are few (a policy has at most
//! [`crate::policy::MAX_PEERS`]), so every message carries all of them, and a session
//! missing from the new set is gone with its routes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use ipnet::IpNet;

use crate::compute::{NodeRoutes, PeerRoutes, RouteAttrs};
use crate::policy::PeerName;

/// One session's changes: routes added or changed (with their new attributes) and
/// prefixes withdrawn. A prefix is never in both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDelta {
    pub set: BTreeMap<IpNet, Arc<RouteAttrs>>,
    pub withdrawn: Vec<IpNet>,
}

impl PeerDelta {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.withdrawn.is_empty()
    }
}

/// Per session of the new set, what its routes gained or lost; sessions whose routes did
/// not change are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutesDelta {
    pub peers: BTreeMap<PeerName, PeerDelta>,
}

impl RoutesDelta {
    pub fn is_empty(&self) -> bool {
        self.peers.values().all(PeerDelta::is_empty)
    }

    /// Every prefix set or withdrawn on some session.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.peers
            .values()
            .flat_map(|d| d.set.keys().copied().chain(d.withdrawn.iter().copied()))
    }

    /// Routes set plus prefixes withdrawn, over every session.
    pub fn len(&self) -> usize {
        self.peers
            .values()
            .map(|d| d.set.len() + d.withdrawn.len())
            .sum()
    }

    /// Applies the delta to `routes` (a set of the same node), whose sessions become
    /// `sessions`' (the new set's): a session not among them is dropped with its
    /// routes, a new one starts empty before its changes. Applying a delta twice gives
    /// the same result as once.
    pub fn apply(&self, routes: &mut NodeRoutes, sessions: &[crate::PeerSession]) {
        routes.peers = sessions.to_vec();
        routes
            .routes
            .retain(|name, _| sessions.iter().any(|s| s.name == *name));
        for session in sessions {
            let set = routes.routes.entry(session.name.clone()).or_default();
            if let Some(d) = self.peers.get(&session.name) {
                for prefix in &d.withdrawn {
                    set.remove(prefix);
                }
                for (prefix, attrs) in &d.set {
                    set.insert(*prefix, attrs.clone());
                }
            }
        }
    }
}

/// As [`delta`], for two sets known to differ at most at `prefixes`: it looks those up
/// rather than comparing the maps, so it costs the prefixes, not the sets (comparing two
/// versions of a map walks the paths down to each difference and every subtree they do
/// not share). The sets' sessions must be the same; where they are not it is [`delta`].
///
/// [`crate::RouteState::service_prefixes`] gives the prefixes a Service change can touch.
pub fn delta_at(old: &NodeRoutes, new: &NodeRoutes, prefixes: &BTreeSet<IpNet>) -> RoutesDelta {
    if old.peers != new.peers {
        return delta(old, new);
    }
    let mut out = RoutesDelta::default();
    for session in &new.peers {
        let before = old.routes.get(&session.name);
        let after = new.routes.get(&session.name);
        let mut d = PeerDelta::default();
        for prefix in prefixes {
            let was = before.and_then(|set| set.get(prefix));
            match after.and_then(|set| set.get(prefix)) {
                Some(attrs) if was != Some(attrs) => {
                    d.set.insert(*prefix, Arc::clone(attrs));
                }
                Some(_) => {}
                None if was.is_some() => d.withdrawn.push(*prefix),
                None => {}
            }
        }
        if !d.is_empty() {
            out.peers.insert(session.name.clone(), d);
        }
    }
    out
}

/// What takes a subscriber from `old` to `new` (two sets of the same node): for each
/// session of `new`, the routes added or changed and the prefixes withdrawn. A session
/// that is new in `new` lists all its routes as set.
pub fn delta(old: &NodeRoutes, new: &NodeRoutes) -> RoutesDelta {
    let empty = PeerRoutes::new();
    let mut out = RoutesDelta::default();
    for session in &new.peers {
        let before = old.routes.get(&session.name).unwrap_or(&empty);
        let after = new.routes.get(&session.name).unwrap_or(&empty);
        let mut d = PeerDelta::default();
        for item in before.diff(after) {
            match item {
                DiffItem::Add(prefix, attrs)
                | DiffItem::Update {
                    new: (prefix, attrs),
                    ..
                } => {
                    d.set.insert(*prefix, attrs.clone());
                }
                DiffItem::Remove(prefix, _) => d.withdrawn.push(*prefix),
            }
        }
        if !d.is_empty() {
            out.peers.insert(session.name.clone(), d);
        }
    }
    out
}
