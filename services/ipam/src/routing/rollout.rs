//! Rolling session resets: which node may reset its session with a peer now.
//!
//! A BGP policy change that needs new sessions (a hold time, say) reaches every node at
//! once. Each speaker keeps its running session and reports the reset as pending
//! (`reset_pending`) until its snapshot stops deferring it (`defer_reset` false). This
//! module decides, per peer, which one node that is: the first pending node, and the
//! next only once that one's new session is Established with its routes sent again
//! (`routes_sent`). So a ToR loses at most one node's paths at a time.
//!
//! Pure and driven by the speakers' reports alone, so it needs no state of its own that
//! could be lost: after a restart of IPAM the stored reports give the same answer. A
//! node whose session is down (for this change or another reason) blocks the next reset
//! too, since resetting another node then would take away one more path; every wait is
//! bounded by [`ROLL_TIMEOUT`], after which the node is passed over (and granted only
//! after the others), so a dead node or a ToR that refuses one node cannot hold up a
//! change forever.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

/// How long one node may take to bring its session back before the next node's turn
/// comes anyway (µs).
pub const ROLL_TIMEOUT_MICROS: i64 = 60_000_000;
/// Reports older than this are not considered (µs): a speaker reports at least every
/// few seconds, so an older report is from one that is gone.
pub const REPORT_MAX_AGE_MICROS: i64 = 60_000_000;

/// What a report says about one session, for the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionView {
    pub reset_pending: bool,
    pub routes_sent: bool,
}

impl SessionView {
    /// The session runs with the current parameters and is back in service.
    fn done(self) -> bool {
        !self.reset_pending && self.routes_sent
    }

    /// The session runs with the current parameters but is not (yet) back.
    fn coming_back(self) -> bool {
        !self.reset_pending && !self.routes_sent
    }
}

/// node → peer → session, from the fresh reports.
pub type Views = BTreeMap<String, BTreeMap<String, SessionView>>;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PeerRollout {
    /// The node whose turn it is, and since when (µs).
    turn: Option<(String, i64)>,
    /// Nodes whose turn timed out: they no longer block, and get a turn only after the
    /// others.
    passed_over: BTreeSet<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rollout {
    peers: BTreeMap<String, PeerRollout>,
}

impl Rollout {
    /// Takes the reports into account at `now` (µs). Returns true when the set of
    /// granted (node, peer) pairs changed.
    pub fn step(&mut self, views: &Views, now: i64) -> bool {
        let before = self.grants();
        let mut peer_names: BTreeSet<String> = self.peers.keys().cloned().collect();
        for sessions in views.values() {
            peer_names.extend(sessions.keys().cloned());
        }
        for peer in peer_names {
            let of_peer: BTreeMap<&str, SessionView> = views
                .iter()
                .filter_map(|(node, sessions)| sessions.get(&peer).map(|v| (node.as_str(), *v)))
                .collect();
            let state = self.peers.entry(peer.clone()).or_default();
            state.step(&peer, &of_peer, now);
            if state.turn.is_none() && state.passed_over.is_empty() {
                self.peers.remove(&peer);
            }
        }
        self.grants() != before
    }

    /// The peers `node` may reset its session with now.
    pub fn granted(&self, node: &str) -> BTreeSet<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.turn.as_ref().is_some_and(|(n, _)| n == node))
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// Every (node, peer) granted.
    pub fn grants(&self) -> BTreeSet<(String, String)> {
        self.peers
            .iter()
            .filter_map(|(peer, p)| p.turn.as_ref().map(|(n, _)| (n.clone(), peer.clone())))
            .collect()
    }
}

impl PeerRollout {
    fn step(&mut self, peer: &str, views: &BTreeMap<&str, SessionView>, now: i64) {
        // A passed-over node counts again once it is back, or gone.
        self.passed_over
            .retain(|n| views.get(n.as_str()).is_some_and(|v| !v.done()));
        if let Some((node, since)) = &self.turn {
            match views.get(node.as_str()) {
                None => self.turn = None,
                Some(v) if v.done() => {
                    info!(%peer, %node, "session back with its routes; next node's turn");
                    self.turn = None;
                }
                Some(_) if now.saturating_sub(*since) > ROLL_TIMEOUT_MICROS => {
                    warn!(
                        %peer,
                        %node,
                        timeout_s = ROLL_TIMEOUT_MICROS / 1_000_000,
                        "session not back in time; passing the node over"
                    );
                    self.passed_over.insert(node.clone());
                    self.turn = None;
                }
                Some(_) => {}
            }
        }
        if self.turn.is_some() {
            return;
        }
        let free = |n: &&str| !self.passed_over.contains(*n);
        // A session coming back (after its reset, or down for another reason) goes
        // first: resetting another one now would take away one more path.
        let next = views
            .iter()
            .find(|(n, v)| v.coming_back() && free(n))
            .or_else(|| views.iter().find(|(n, v)| v.reset_pending && free(n)))
            .or_else(|| views.iter().find(|(_, v)| v.reset_pending));
        if let Some((node, v)) = next {
            if v.reset_pending {
                info!(%peer, %node, "granting the session reset");
            }
            self.turn = Some(((*node).to_string(), now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PENDING: SessionView = SessionView {
        reset_pending: true,
        routes_sent: true,
    };
    const DOWN: SessionView = SessionView {
        reset_pending: false,
        routes_sent: false,
    };
    const DONE: SessionView = SessionView {
        reset_pending: false,
        routes_sent: true,
    };

    fn views(nodes: &[(&str, SessionView)]) -> Views {
        nodes
            .iter()
            .map(|(n, v)| (n.to_string(), [("tor".to_string(), *v)].into()))
            .collect()
    }

    fn turn(r: &Rollout) -> Vec<String> {
        r.grants().into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn one_node_at_a_time_each_after_the_previous_is_back() {
        let mut r = Rollout::default();
        assert!(
            !r.step(&views(&[("a", DONE), ("b", DONE)]), 0),
            "nothing to do"
        );
        assert!(r.grants().is_empty());

        // A change reaches all four nodes: only the first may reset.
        let all = [
            ("a", PENDING),
            ("b", PENDING),
            ("c", PENDING),
            ("d", PENDING),
        ];
        assert!(r.step(&views(&all), 1));
        assert_eq!(turn(&r), ["a"]);
        assert_eq!(r.granted("a"), ["tor".to_string()].into());
        assert!(r.granted("b").is_empty());

        // a resets: its new session is coming back; still a's turn.
        let v = views(&[("a", DOWN), ("b", PENDING), ("c", PENDING), ("d", PENDING)]);
        assert!(!r.step(&v, 2));
        assert_eq!(turn(&r), ["a"]);
        // a is back with its routes: b's turn.
        let v = views(&[("a", DONE), ("b", PENDING), ("c", PENDING), ("d", PENDING)]);
        assert!(r.step(&v, 3));
        assert_eq!(turn(&r), ["b"]);
        let v = views(&[("a", DONE), ("b", DONE), ("c", DONE), ("d", PENDING)]);
        r.step(&v, 4);
        assert_eq!(turn(&r), ["d"]);
        r.step(
            &views(&[("a", DONE), ("b", DONE), ("c", DONE), ("d", DONE)]),
            5,
        );
        assert!(r.grants().is_empty());
    }

    #[test]
    fn a_session_down_for_another_reason_blocks_until_the_timeout() {
        let mut r = Rollout::default();
        let v = views(&[("a", PENDING), ("b", DOWN)]);
        r.step(&v, 0);
        assert_eq!(turn(&r), ["b"], "b is down: resetting a would cost a path");
        r.step(&v, ROLL_TIMEOUT_MICROS);
        assert_eq!(turn(&r), ["b"]);
        r.step(&v, ROLL_TIMEOUT_MICROS + 1);
        assert_eq!(turn(&r), ["a"], "b passed over after the timeout");
        // a stuck too: b is not picked again as blocking, a stays passed over but is the
        // only pending node, so it gets a turn again.
        r.step(&v, 2 * ROLL_TIMEOUT_MICROS + 2);
        assert_eq!(turn(&r), ["a"]);
    }

    #[test]
    fn a_node_that_leaves_gives_up_its_turn_and_the_state_is_rebuilt_from_reports() {
        let mut r = Rollout::default();
        r.step(&views(&[("a", PENDING), ("b", PENDING)]), 0);
        assert_eq!(turn(&r), ["a"]);
        r.step(&views(&[("b", PENDING)]), 1);
        assert_eq!(turn(&r), ["b"]);
        // A restarted IPAM (empty state) sees b coming back and waits for it.
        let mut fresh = Rollout::default();
        fresh.step(&views(&[("b", DOWN), ("c", PENDING)]), 2);
        assert_eq!(turn(&fresh), ["b"]);
    }

    #[test]
    fn peers_roll_independently() {
        let mut r = Rollout::default();
        let v: Views = [
            (
                "a".to_string(),
                [("tor1".to_string(), PENDING), ("tor2".to_string(), DONE)].into(),
            ),
            (
                "b".to_string(),
                [("tor1".to_string(), PENDING), ("tor2".to_string(), PENDING)].into(),
            ),
        ]
        .into();
        r.step(&v, 0);
        assert_eq!(r.granted("a"), ["tor1".to_string()].into());
        assert_eq!(r.granted("b"), ["tor2".to_string()].into());
    }
}
