//! The speaker's core: the node's BGP sessions, brought in line with each snapshot, and
//! the report of what they actually do. No gRPC in here, only protobuf values in and out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use herald_api::routing::v1 as pb;
use herald_bgp::{
    Family, PeerConfig, PeerHandle, PeerStatus, Routes, SentUpdate, ShutdownMode, State,
    UpdateObserver,
};
use herald_telemetry::trace::SpanContext;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, warn};

use crate::convert::{self, ConvertedRoutes, PeerSpec, SessionDefaults};
use crate::plan::plan_peers;

/// The RFC 8203 message a peer sees when its session is removed from the snapshot.
const PEER_REMOVED_MESSAGE: &str = "herald: peer removed from this node's configuration";
/// ... and when its parameters changed and a new session replaces it.
const PEER_CHANGED_MESSAGE: &str = "herald: peer parameters changed, reconnecting";

/// What one [`Speaker::apply`] did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub revision: u64,
    /// Sessions running after the apply.
    pub peers: usize,
    /// Routes desired over all sessions.
    pub routes: usize,
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub kept: Vec<String>,
    /// Peer entries that could not be used (a running session of that name is kept as it
    /// was).
    pub invalid_peers: usize,
    pub skipped_routes: usize,
    /// Now minus the newest `changed_at` among routes that are new or changed in this
    /// snapshot.
    pub change_to_apply: Option<Duration>,
}

/// Stops a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct Session {
    config: PeerConfig,
    handle: PeerHandle,
    routes: Arc<Routes>,
    /// What the UPDATEs this session sends next are caused by.
    cause: Arc<Mutex<Cause>>,
    _forward: AbortOnDrop,
}

/// The trace context an UPDATE span joins: the apply of the snapshot that handed the
/// session its routes (parent) and the changes behind the routes that changed (links).
#[derive(Debug, Clone, Default)]
struct Cause {
    parent: Option<SpanContext>,
    links: Vec<SpanContext>,
}

/// Links one UPDATE span carries at most; the SDK's default limit is 128.
const MAX_UPDATE_LINKS: usize = 64;

/// The observer that gives every UPDATE sent to `peer` a span: a child of the apply that
/// caused it, naming the peer and the prefix count, linked to the changed routes' changes.
fn update_spans(node: &str, peer: &str, cause: &Arc<Mutex<Cause>>) -> Option<UpdateObserver> {
    if !herald_telemetry::trace::enabled() {
        return None;
    }
    let (node, peer, cause) = (node.to_string(), peer.to_string(), Arc::clone(cause));
    Some(Arc::new(move |update: &SentUpdate| {
        let cause = cause
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let span = tracing::info_span!(
            parent: None,
            "bgp.update",
            otel.kind = "producer",
            herald.node = %node,
            herald.peer = %peer,
            bgp.prefix_count = update.announced + update.withdrawn,
            bgp.announced = update.announced,
            bgp.withdrawn = update.withdrawn,
            bgp.message_bytes = update.bytes,
        );
        if let Some(parent) = &cause.parent {
            herald_telemetry::trace::set_parent_context(&span, parent);
        }
        herald_telemetry::trace::add_links(&span, &cause.links);
    }))
}

/// The node's sessions. [`Speaker::apply`] is idempotent: applying the same snapshot twice
/// changes nothing on the wire, which is what lets a reconnect to IPAM (or a restarted
/// IPAM) replay its snapshot without a flap.
#[derive(Debug)]
pub struct Speaker {
    node: String,
    router_id: Option<Ipv4Addr>,
    sessions: BTreeMap<String, Session>,
    applied_revision: Option<u64>,
    changes: Arc<Notify>,
    clock: Clock,
}

impl Speaker {
    /// `router_id` overrides the one in the snapshots.
    pub fn new(node: impl Into<String>, router_id: Option<Ipv4Addr>) -> Speaker {
        Speaker {
            node: node.into(),
            router_id,
            sessions: BTreeMap::new(),
            applied_revision: None,
            changes: Arc::new(Notify::new()),
            clock: Clock::now(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Notified whenever a session's status changes (state, counters, errors).
    pub fn changes(&self) -> Arc<Notify> {
        Arc::clone(&self.changes)
    }

    /// The revision of the last snapshot applied.
    pub fn applied_revision(&self) -> Option<u64> {
        self.applied_revision
    }

    /// Names of the running sessions.
    pub fn peers(&self) -> Vec<String> {
        self.sessions.keys().cloned().collect()
    }

    /// A session's status and desired routes.
    pub fn session(&self, peer: &str) -> Option<(PeerStatus, Arc<Routes>)> {
        self.sessions
            .get(peer)
            .map(|s| (s.handle.status(), Arc::clone(&s.routes)))
    }

    /// Brings the sessions in line with `snapshot`: starts new peers, restarts changed
    /// ones, stops removed ones and hands every session its full route set.
    pub async fn apply(&mut self, snapshot: &pb::NodeRoutes) -> ApplySummary {
        let route_count: usize = snapshot.peers.iter().map(|p| p.routes.len()).sum();
        let span = tracing::info_span!(
            "snapshot",
            otel.name = "speaker.apply",
            herald.node = %self.node,
            revision = snapshot.revision,
            peers = snapshot.peers.len(),
            routes = route_count,
        );
        // A child of IPAM's publish of this snapshot: the trace of the change goes on here.
        herald_telemetry::trace::set_parent(&span, &snapshot.traceparent);
        self.apply_inner(snapshot).instrument(span).await
    }

    async fn apply_inner(&mut self, snapshot: &pb::NodeRoutes) -> ApplySummary {
        let pb::NodeRoutes {
            revision,
            node,
            local_asn,
            router_id,
            peers,
            traceparent: _,
        } = snapshot;
        if !node.is_empty() && *node != self.node {
            warn!(snapshot_node = %node, "snapshot names another node; applying it anyway");
        }
        let snapshot_router_id = convert::parse_router_id(router_id).unwrap_or_else(|e| {
            warn!(error = %e, "ignoring the snapshot's router id");
            None
        });
        let defaults = SessionDefaults {
            local_asn: *local_asn,
            router_id: self.router_id.or(snapshot_router_id),
        };
        let mut summary = ApplySummary {
            revision: *revision,
            ..ApplySummary::default()
        };

        // Convert; an unusable peer entry keeps a running session of the same name as it
        // is (fail-static: bad data must not withdraw what works).
        let mut desired: BTreeMap<String, PeerConfig> = BTreeMap::new();
        let mut desired_routes: BTreeMap<String, ConvertedRoutes> = BTreeMap::new();
        for pr in peers {
            match convert::peer_from_pb(pr, defaults) {
                Ok(PeerSpec { name, config }) => {
                    if desired.contains_key(&name) {
                        error!(peer = %name, "peer appears twice in the snapshot; keeping the first");
                        summary.invalid_peers += 1;
                        continue;
                    }
                    let converted = convert::routes_from_pb(pr);
                    for e in &converted.skipped {
                        error!(peer = %name, error = %e, "skipping route");
                    }
                    summary.skipped_routes += converted.skipped.len();
                    desired.insert(name.clone(), config);
                    desired_routes.insert(name, converted);
                }
                Err(e) => {
                    summary.invalid_peers += 1;
                    let name = pr.peer.as_ref().map(|p| p.name.clone()).unwrap_or_default();
                    match self.sessions.get(&name) {
                        Some(running) => {
                            error!(error = %e, peer = %name, "invalid peer; keeping its running session unchanged");
                            desired.insert(name, running.config.clone());
                        }
                        None => error!(error = %e, "invalid peer; not starting it"),
                    }
                }
            }
        }

        let current: BTreeMap<String, PeerConfig> = self
            .sessions
            .iter()
            .map(|(name, s)| (name.clone(), s.config.clone()))
            .collect();
        let plan = plan_peers(&current, &desired);

        // Stop first, all at once: a changed peer's new session must not collide with
        // its old one at the ToR.
        let stops = plan.stop.iter().filter_map(|name| {
            let session = self.sessions.remove(name)?;
            let restarting = desired.contains_key(name);
            // With graceful restart the ToR keeps the routes while the new session comes
            // up, so a parameter change does not flap them.
            let mode = if restarting && session.config.graceful_restart.is_some() {
                ShutdownMode::Graceful
            } else {
                ShutdownMode::Withdraw {
                    message: if restarting {
                        PEER_CHANGED_MESSAGE
                    } else {
                        PEER_REMOVED_MESSAGE
                    }
                    .to_string(),
                }
            };
            info!(peer = %name, restarting, "stopping BGP session");
            Some(session.handle.shutdown(mode))
        });
        futures::future::join_all(stops).await;
        summary.stopped = plan.stop.clone();

        for name in &plan.start {
            let Some(config) = desired.get(name) else {
                continue;
            };
            // The session's task outlives this snapshot: give it a span of its own
            // rather than the snapshot's.
            let span = tracing::info_span!(parent: None, "peer", node = %self.node, peer = %name);
            let cause = Arc::new(Mutex::new(Cause::default()));
            let observer = update_spans(&self.node, name, &cause);
            match PeerHandle::spawn_observed(config.clone(), observer)
                .instrument(span)
                .await
            {
                Ok(handle) => {
                    info!(peer = %name, address = %handle.peer(), "started BGP session");
                    let forward = forward_changes(&handle, Arc::clone(&self.changes));
                    self.sessions.insert(
                        name.clone(),
                        Session {
                            config: config.clone(),
                            handle,
                            routes: Arc::new(Routes::new()),
                            cause,
                            _forward: forward,
                        },
                    );
                    summary.started.push(name.clone());
                }
                Err(e) => error!(peer = %name, error = %e, "cannot start BGP session"),
            }
        }
        summary.kept = plan.keep.clone();

        // Hand every session its full set; the engine works out the UPDATEs.
        let now = SystemTime::now();
        let mut newest_change: Option<SystemTime> = None;
        for (name, converted) in desired_routes {
            let Some(session) = self.sessions.get_mut(&name) else {
                continue;
            };
            summary.routes += converted.routes.len();
            if *session.routes == converted.routes {
                continue;
            }
            let mut links = Vec::new();
            for p in &converted.provenance {
                let changed = session.routes.get(&p.prefix) != converted.routes.get(&p.prefix);
                if changed && let Some(at) = p.changed_at {
                    newest_change = newest_change.max(Some(at));
                }
                if changed
                    && links.len() < MAX_UPDATE_LINKS
                    && let Some(sc) = herald_telemetry::trace::span_context(&p.traceparent)
                    && !links.contains(&sc)
                {
                    links.push(sc);
                }
            }
            if herald_telemetry::trace::enabled() {
                let parent = herald_telemetry::trace::context_of(&tracing::Span::current());
                *session
                    .cause
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Cause {
                    parent: parent.is_valid().then_some(parent),
                    links,
                };
            }
            let routes = Arc::new(converted.routes);
            session.handle.set_desired_arc(Arc::clone(&routes));
            session.routes = routes;
        }
        summary.peers = self.sessions.len();
        summary.change_to_apply = newest_change.and_then(|at| now.duration_since(at).ok());
        self.applied_revision = Some(*revision);
        self.changes.notify_one();
        info!(
            started = summary.started.len(),
            stopped = summary.stopped.len(),
            kept = summary.kept.len(),
            invalid_peers = summary.invalid_peers,
            skipped_routes = summary.skipped_routes,
            change_to_apply_ms = summary.change_to_apply.map(|d| d.as_secs_f64() * 1e3),
            "snapshot applied"
        );
        summary
    }

    /// The report for IPAM; `None` until a snapshot has been applied.
    pub fn state(&self) -> Option<pb::SpeakerState> {
        let applied_revision = self.applied_revision?;
        let sessions = self
            .sessions
            .iter()
            .map(|(name, s)| session_state(name, &s.handle.status(), &s.routes, self.clock))
            .collect();
        Some(pb::SpeakerState {
            node: self.node.clone(),
            applied_revision,
            sessions,
        })
    }

    /// Ends every session: graceful-restart peers just close (the ToR keeps the routes for
    /// the restart time), the others withdraw with `message`. Bounded by the engine's
    /// close timeout; the sessions close in parallel.
    pub async fn shutdown(mut self, message: &str) {
        let sessions = std::mem::take(&mut self.sessions);
        let stops = sessions.into_iter().map(|(name, s)| {
            let mode = if s.config.graceful_restart.is_some() {
                ShutdownMode::Graceful
            } else {
                ShutdownMode::Withdraw {
                    message: message.to_string(),
                }
            };
            info!(peer = %name, ?mode, "closing BGP session");
            s.handle.shutdown(mode)
        });
        futures::future::join_all(stops).await;
    }
}

/// One session's report entry. The announced prefixes are the desired set while the
/// session is Established (the engine sends all of it), less the families the peer did
/// not negotiate, and nothing otherwise.
pub fn session_state(
    peer: &str,
    status: &PeerStatus,
    routes: &Routes,
    clock: Clock,
) -> pb::SessionState {
    let established = status.state == State::Established;
    pb::SessionState {
        peer: peer.to_string(),
        state: status.state.to_string(),
        established_since: status
            .established_at
            .filter(|_| established)
            .map(|at| clock.timestamp(at)),
        announced_prefixes: if established {
            let families = status
                .negotiated
                .as_ref()
                .map(|n| n.families.clone())
                .unwrap_or_default();
            routes
                .keys()
                .filter(|p| families.contains(&Family::of(p)))
                .map(ToString::to_string)
                .collect()
        } else {
            Vec::new()
        },
        updates_sent: status.updates_sent,
        last_error: status.last_error.clone().unwrap_or_default(),
    }
}

/// Turns the engine's monotonic instants into wall-clock timestamps, always against the
/// same reference pair, so one instant gives the same timestamp in every report (and an
/// unchanged state compares equal).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    wall: SystemTime,
}

impl Clock {
    pub fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn timestamp(&self, at: Instant) -> prost_types::Timestamp {
        let wall = if at >= self.instant {
            self.wall + (at - self.instant)
        } else {
            self.wall
                .checked_sub(self.instant - at)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        prost_types::Timestamp::from(wall)
    }
}

/// Wakes `changes` on every status change of the session.
fn forward_changes(handle: &PeerHandle, changes: Arc<Notify>) -> AbortOnDrop {
    let mut rx = handle.watch_status();
    AbortOnDrop(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            changes.notify_one();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port with nothing listening: sessions stay in Connect/Active, which is
    /// all these tests need (the real ToR tests are in `tests/`).
    fn closed_port() -> u32 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        u32::from(l.local_addr().unwrap_or_else(|e| panic!("{e}")).port())
    }

    fn snapshot(revision: u64, port: u32, hold: u32, prefixes: &[&str]) -> pb::NodeRoutes {
        pb::NodeRoutes {
            revision,
            node: "node-a".into(),
            local_asn: 65010,
            router_id: "127.0.0.10".into(),
            traceparent: String::new(),
            peers: vec![pb::PeerRoutes {
                peer: Some(pb::Peer {
                    name: "tor".into(),
                    address: "127.0.0.1".into(),
                    asn: 65001,
                    port,
                    hold_time_seconds: hold,
                    connect_retry_seconds: 1,
                    ..pb::Peer::default()
                }),
                source_address: "127.0.0.10".into(),
                routes: prefixes
                    .iter()
                    .map(|p| pb::Route {
                        prefix: (*p).into(),
                        next_hop: "127.0.0.10".into(),
                        changed_at: Some(prost_types::Timestamp::from(
                            SystemTime::now() - Duration::from_secs(2),
                        )),
                        ..pb::Route::default()
                    })
                    .collect(),
            }],
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn clock_gives_stable_timestamps() {
        let clock = Clock::now();
        let at = Instant::now();
        let first = clock.timestamp(at);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.timestamp(at), first, "same instant, same timestamp");
        let later = clock.timestamp(at + Duration::from_secs(1));
        assert_eq!(
            later.seconds - first.seconds + i64::from(later.nanos - first.nanos) / 1_000_000_000,
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_reconciles_sessions() {
        let port = closed_port();
        let mut speaker = Speaker::new("node-a", None);
        assert_eq!(speaker.state(), None, "nothing to report before a snapshot");

        let s = speaker
            .apply(&snapshot(1, port, 90, &["172.16.0.241/32"]))
            .await;
        assert_eq!(s.started, names(&["tor"]));
        assert_eq!(s.routes, 1);
        let latency = s.change_to_apply.unwrap_or_default();
        assert!(latency >= Duration::from_secs(2), "{latency:?}");
        let state = speaker
            .state()
            .unwrap_or_else(|| panic!("a state after apply"));
        assert_eq!(state.node, "node-a");
        assert_eq!(state.applied_revision, 1);
        assert_eq!(state.sessions.len(), 1);
        assert_eq!(state.sessions[0].peer, "tor");
        assert_ne!(state.sessions[0].state, "Established");
        assert!(state.sessions[0].announced_prefixes.is_empty());

        // The same snapshot again (a reconnect to IPAM): nothing restarts or changes.
        let s = speaker
            .apply(&snapshot(2, port, 90, &["172.16.0.241/32"]))
            .await;
        assert_eq!(
            (s.kept.clone(), s.started.len(), s.stopped.len()),
            (names(&["tor"]), 0, 0)
        );
        assert_eq!(s.change_to_apply, None, "no route changed");
        assert_eq!(speaker.applied_revision(), Some(2));

        // New routes on a kept session.
        let s = speaker
            .apply(&snapshot(
                3,
                port,
                90,
                &["172.16.0.241/32", "172.16.0.242/32"],
            ))
            .await;
        assert_eq!(s.kept, names(&["tor"]));
        let (_, routes) = speaker.session("tor").unwrap_or_else(|| panic!("session"));
        assert_eq!(routes.len(), 2);

        // A changed hold time restarts the session, keeping the routes.
        let s = speaker
            .apply(&snapshot(
                4,
                port,
                9,
                &["172.16.0.241/32", "172.16.0.242/32"],
            ))
            .await;
        assert_eq!(
            (s.stopped.clone(), s.started.clone()),
            (names(&["tor"]), names(&["tor"]))
        );
        let (_, routes) = speaker.session("tor").unwrap_or_else(|| panic!("session"));
        assert_eq!(routes.len(), 2);

        // A broken entry for a running peer keeps that session as it is.
        let mut broken = snapshot(5, port, 9, &[]);
        if let Some(p) = broken.peers[0].peer.as_mut() {
            p.address = "not an address".into();
        }
        let s = speaker.apply(&broken).await;
        assert_eq!((s.invalid_peers, s.kept.clone()), (1, names(&["tor"])));
        let (_, routes) = speaker.session("tor").unwrap_or_else(|| panic!("session"));
        assert_eq!(routes.len(), 2, "routes untouched");

        // A snapshot without the peer stops it.
        let mut empty = snapshot(6, port, 9, &[]);
        empty.peers.clear();
        let s = speaker.apply(&empty).await;
        assert_eq!(s.stopped, names(&["tor"]));
        assert!(speaker.peers().is_empty());
        assert_eq!(speaker.state().map(|s| s.sessions.len()), Some(0));
        speaker.shutdown("test done").await;
    }
}
