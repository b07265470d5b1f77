//! Which sessions to keep, start and stop when a snapshot arrives: a pure function, so
//! the reconciliation rules are unit tests rather than socket tests.

use std::collections::{BTreeMap, BTreeSet};

use herald_bgp::PeerConfig;

/// The outcome of [`plan_peers`]. A peer whose parameters changed in a way that needs a
/// new session is in both `stop` and `start`: its old session ends before the new one
/// begins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPlan {
    /// Running with the same parameters: the session stays up, only its routes are set.
    pub keep: Vec<String>,
    /// Changed only in what a live session can take (keepalive, retry timers): applied
    /// without a reset.
    pub reconfigure: Vec<String>,
    /// Changed in what needs a new session, but its reset is deferred: the session keeps
    /// running with its old parameters until its turn comes.
    pub pending: Vec<String>,
    pub start: Vec<String>,
    pub stop: Vec<String>,
}

/// Compares the running sessions with the desired ones, both keyed by peer name. A change
/// of anything negotiated in the OPEN or the connection (ASNs, hold time, addresses,
/// families, graceful restart, TCP-MD5, TTL) needs a new session
/// ([`PeerConfig::needs_reset`]); unless the peer is in `deferred`, whose sessions keep
/// running until IPAM gives them their turn. Keepalive and retry timers change live.
pub fn plan_peers(
    current: &BTreeMap<String, PeerConfig>,
    desired: &BTreeMap<String, PeerConfig>,
    deferred: &BTreeSet<String>,
) -> PeerPlan {
    let mut plan = PeerPlan::default();
    for (name, config) in desired {
        match current.get(name) {
            Some(running) if running == config => plan.keep.push(name.clone()),
            Some(running) if !running.needs_reset(config) => plan.reconfigure.push(name.clone()),
            Some(_) if deferred.contains(name) => plan.pending.push(name.clone()),
            Some(_) => {
                plan.stop.push(name.clone());
                plan.start.push(name.clone());
            }
            None => plan.start.push(name.clone()),
        }
    }
    for name in current.keys() {
        if !desired.contains_key(name) {
            plan.stop.push(name.clone());
        }
    }
    plan.stop.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, hold_time: u16) -> (String, PeerConfig) {
        let mut config = PeerConfig::new(
            "127.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
            65001,
            65010,
            std::net::Ipv4Addr::new(127, 0, 0, 10),
        );
        config.hold_time = hold_time;
        (name.to_string(), config)
    }

    fn plan_peers_now(
        current: &BTreeMap<String, PeerConfig>,
        desired: &BTreeMap<String, PeerConfig>,
    ) -> PeerPlan {
        plan_peers(current, desired, &BTreeSet::new())
    }

    fn map(peers: &[(String, PeerConfig)]) -> BTreeMap<String, PeerConfig> {
        peers.iter().cloned().collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn new_peer_is_started() {
        let plan = plan_peers_now(&map(&[]), &map(&[peer("tor1", 90)]));
        assert_eq!(
            plan,
            PeerPlan {
                start: names(&["tor1"]),
                ..PeerPlan::default()
            }
        );
    }

    #[test]
    fn removed_peer_is_stopped() {
        let plan = plan_peers_now(
            &map(&[peer("tor1", 90), peer("tor2", 90)]),
            &map(&[peer("tor2", 90)]),
        );
        assert_eq!(plan.keep, names(&["tor2"]));
        assert_eq!(plan.start, Vec::<String>::new());
        assert_eq!(plan.stop, names(&["tor1"]));
    }

    #[test]
    fn changed_hold_time_restarts_the_session() {
        let plan = plan_peers_now(&map(&[peer("tor1", 90)]), &map(&[peer("tor1", 9)]));
        assert_eq!(plan.keep, Vec::<String>::new());
        assert_eq!(plan.stop, names(&["tor1"]));
        assert_eq!(plan.start, names(&["tor1"]));
    }

    #[test]
    fn a_deferred_reset_keeps_the_session_and_a_keepalive_change_needs_none() {
        let deferred: BTreeSet<String> = ["tor1".to_string()].into();
        let plan = plan_peers(
            &map(&[peer("tor1", 90)]),
            &map(&[peer("tor1", 9)]),
            &deferred,
        );
        assert_eq!(plan.pending, names(&["tor1"]));
        assert!(plan.stop.is_empty() && plan.start.is_empty() && plan.keep.is_empty());

        let (name, mut config) = peer("tor1", 90);
        config.keepalive = Some(5);
        config.connect_retry = std::time::Duration::from_secs(1);
        let plan = plan_peers(
            &map(&[peer("tor1", 90)]),
            &map(&[(name, config)]),
            &deferred,
        );
        assert_eq!(
            plan.reconfigure,
            names(&["tor1"]),
            "no reset, deferred or not"
        );
        assert!(plan.stop.is_empty() && plan.start.is_empty() && plan.pending.is_empty());
    }

    #[test]
    fn unchanged_peers_are_kept() {
        let peers = [peer("tor1", 90), peer("tor2", 30)];
        let plan = plan_peers_now(&map(&peers), &map(&peers));
        assert_eq!(
            plan,
            PeerPlan {
                keep: names(&["tor1", "tor2"]),
                ..PeerPlan::default()
            }
        );
    }

    #[test]
    fn everything_at_once() {
        let current = map(&[peer("a", 90), peer("b", 90), peer("c", 90)]);
        let desired = map(&[peer("b", 90), peer("c", 60), peer("d", 90)]);
        let plan = plan_peers_now(&current, &desired);
        assert_eq!(plan.keep, names(&["b"]));
        assert_eq!(plan.start, names(&["c", "d"]));
        assert_eq!(plan.stop, names(&["a", "c"]));
    }
}
