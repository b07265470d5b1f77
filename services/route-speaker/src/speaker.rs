//! The speaker's core: the node's BGP sessions, brought in line with each snapshot, and
//! the report of what they actually do. No gRPC in here, only protobuf values in and out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use herald_api::routing::v1 as pb;
use herald_bgp::{
    Family, PeerConfig, PeerHandle, PeerStatus, RouteAttributes, Routes, SentUpdate, ShutdownMode,
    State, UpdateObserver,
};
use herald_telemetry::trace::SpanContext;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, warn};

use crate::convert::{self, BfdSpec, PeerSpec, SessionDefaults};
use crate::desired::{Desired, Gap, PeerChange};
use crate::metrics;
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
    /// Sessions changed live (keepalive, retry timers), without a reset.
    pub reconfigured: Vec<String>,
    /// Sessions whose reset waits for IPAM to give this node its turn.
    pub reset_pending: Vec<String>,
    /// Peer entries that could not be used (a running session of that name is kept as it
    /// was).
    pub invalid_peers: usize,
    pub skipped_routes: usize,
    /// Now minus the newest `changed_at` among routes that are new or changed in this
    /// snapshot on sessions that were already running: a session started by this
    /// snapshot (the speaker's first one, a new peer) loads its routes, which is no
    /// change to measure.
    pub change_to_apply: Option<Duration>,
    /// A delta did not follow the revision applied: the messages from it on were not
    /// applied, and the stream must be opened again for a snapshot.
    pub gap: Option<Gap>,
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
    /// The snapshot wants parameters that need a new session, and IPAM defers it.
    reset_pending: bool,
    /// Route changes handed to the session whose UPDATE has not left yet.
    pending: metrics::PendingSlot,
    /// What the UPDATEs this session sends next are caused by.
    cause: Arc<Mutex<Cause>>,
    _forward: AbortOnDrop,
    _time_updates: AbortOnDrop,
    bfd: Option<BfdSession>,
}

/// A peer's BFD session and the task that tears the BGP session down when it fails.
/// Dropping it sends AdminDown, which the ToR does not count as a failure.
#[derive(Debug)]
struct BfdSession {
    spec: BfdSpec,
    handle: herald_bfd::SessionHandle,
    _watch: AbortOnDrop,
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

/// The traces of the routes of `new` that differ from `old` (at most
/// [`MAX_UPDATE_LINKS`]), for the UPDATE spans to link.
fn changed_links(
    provenance: &[convert::Provenance],
    old: &Routes,
    new: &Routes,
) -> Vec<SpanContext> {
    let mut links = Vec::new();
    if !herald_telemetry::trace::enabled() {
        return links;
    }
    for p in provenance {
        if links.len() >= MAX_UPDATE_LINKS {
            break;
        }
        if old.get(&p.prefix) != new.get(&p.prefix)
            && let Some(sc) = herald_telemetry::trace::span_context(&p.traceparent)
            && !links.contains(&sc)
        {
            links.push(sc);
        }
    }
    links
}

/// The cause of the UPDATEs a route set handed over now brings: the current span (the
/// snapshot's apply) as parent, `links` as links.
fn current_cause(links: Vec<SpanContext>) -> Cause {
    if !herald_telemetry::trace::enabled() {
        return Cause::default();
    }
    let parent = herald_telemetry::trace::context_of(&tracing::Span::current());
    Cause {
        parent: parent.is_valid().then_some(parent),
        links,
    }
}

/// The node's sessions. [`Speaker::apply`] is idempotent: applying the same snapshot twice
/// changes nothing on the wire, which is what lets a reconnect to IPAM (or a restarted
/// IPAM) replay its snapshot without a flap.
#[derive(Debug)]
pub struct Speaker {
    node: String,
    router_id: Option<Ipv4Addr>,
    sessions: BTreeMap<String, Session>,
    /// The desired routes as of `applied_revision`, built from the stream's messages.
    desired: Desired,
    applied_revision: Option<u64>,
    changes: Arc<Notify>,
    clock: Clock,
    view: metrics::SessionsView,
    bfd: herald_bfd::Bfd,
}

impl Speaker {
    /// `router_id` overrides the one in the snapshots.
    pub fn new(node: impl Into<String>, router_id: Option<Ipv4Addr>) -> Speaker {
        Speaker {
            node: node.into(),
            router_id,
            sessions: BTreeMap::new(),
            desired: Desired::new(),
            applied_revision: None,
            changes: Arc::new(Notify::new()),
            clock: Clock::now(),
            view: Arc::default(),
            bfd: herald_bfd::Bfd::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The sessions as the metrics endpoint reads them at scrape time.
    pub fn sessions_view(&self) -> metrics::SessionsView {
        Arc::clone(&self.view)
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

    /// A session's BFD status, when it runs BFD.
    pub fn bfd_status(&self, peer: &str) -> Option<herald_bfd::SessionStatus> {
        self.sessions
            .get(peer)
            .and_then(|s| s.bfd.as_ref())
            .map(|b| b.handle.status())
    }

    /// A session's status and desired routes.
    pub fn session(&self, peer: &str) -> Option<(PeerStatus, Arc<Routes>)> {
        self.sessions
            .get(peer)
            .map(|s| (s.handle.status(), Arc::clone(&s.routes)))
    }

    /// Brings the sessions in line with `message` (a snapshot or a delta): starts new
    /// peers, restarts changed ones, stops removed ones and hands every session whose
    /// routes changed its new set.
    pub async fn apply(&mut self, message: &pb::NodeRoutes) -> ApplySummary {
        self.apply_all(std::slice::from_ref(message)).await
    }

    /// Applies `messages` in order as one change: the route sets take each in turn, the
    /// sessions get the result once (a run of deltas costs one hand-over). A delta that
    /// does not follow ends the run there ([`ApplySummary::gap`]).
    pub async fn apply_all(&mut self, messages: &[pb::NodeRoutes]) -> ApplySummary {
        let Some(last) = messages.last() else {
            return ApplySummary::default();
        };
        let route_count: usize = messages
            .iter()
            .flat_map(|m| &m.peers)
            .map(|p| p.routes.len() + p.withdrawn.len())
            .sum();
        let span = tracing::info_span!(
            "snapshot",
            otel.name = "speaker.apply",
            herald.node = %self.node,
            revision = last.revision,
            from_revision = messages[0].from_revision,
            messages = messages.len(),
            peers = last.peers.len(),
            routes = route_count,
        );
        // A child of IPAM's publish of this snapshot: the trace of the change goes on here.
        herald_telemetry::trace::set_parent(&span, &last.traceparent);
        let mut changes: BTreeMap<String, PeerChange> = BTreeMap::new();
        let mut gap = None;
        let mut applied = None;
        // What a withdrawal is timed from: a withdrawn route is absent from the routes a
        // message carries, so only the message says when the change that removed it was
        // made; over a run, the oldest, so that coalescing never shortens a latency.
        let mut withdrawn_at: Option<SystemTime> = None;
        for message in messages {
            match self.desired.apply(message, &mut changes) {
                Ok(()) => {
                    let at = message
                        .changed_at
                        .and_then(|ts| SystemTime::try_from(ts).ok());
                    withdrawn_at = match (withdrawn_at, at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    applied = Some(message);
                }
                Err(e) => {
                    gap = Some(e);
                    break;
                }
            }
        }
        let Some(snapshot) = applied else {
            return ApplySummary {
                gap,
                ..ApplySummary::default()
            };
        };
        let mut summary = self
            .apply_inner(snapshot, changes, withdrawn_at)
            .instrument(span)
            .await;
        summary.gap = gap;
        summary
    }

    /// `snapshot` gives the sessions and their parameters; the routes are `self.desired`'s.
    async fn apply_inner(
        &mut self,
        snapshot: &pb::NodeRoutes,
        mut changes: BTreeMap<String, PeerChange>,
        withdrawn_at: Option<SystemTime>,
    ) -> ApplySummary {
        let pb::NodeRoutes {
            revision,
            node,
            local_asn,
            router_id,
            peers,
            traceparent,
            changed_at: _,
            from_revision: _,
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
        let mut deferred: BTreeSet<String> = BTreeSet::new();
        let mut desired_bfd: BTreeMap<String, Option<BfdSpec>> = BTreeMap::new();
        let mut desired_routes: BTreeMap<String, (Arc<Routes>, Vec<convert::Provenance>)> =
            BTreeMap::new();
        let withheld = peers.iter().filter(|p| p.md5_password_withheld).count();
        metrics::METRICS
            .password_withheld
            .set(i64::try_from(withheld).unwrap_or(i64::MAX));
        for pr in peers {
            match convert::peer_from_pb(pr, defaults) {
                Ok(PeerSpec { name, config, bfd }) => {
                    if desired.contains_key(&name) {
                        error!(peer = %name, "peer appears twice in the snapshot; keeping the first");
                        summary.invalid_peers += 1;
                        continue;
                    }
                    let change = changes.remove(&name).unwrap_or_default();
                    for e in &change.skipped {
                        error!(peer = %name, error = %e, "skipping route");
                    }
                    summary.skipped_routes += change.skipped.len();
                    let routes = self.desired.routes(&name).cloned().unwrap_or_default();
                    let converted = (routes, change.provenance);
                    // A session that is not Established has no paths at the ToR to
                    // protect: its reset waits for nobody (a fixed port or address
                    // must not queue behind other nodes).
                    let established = self
                        .sessions
                        .get(&name)
                        .is_some_and(|s| s.handle.status().state == State::Established);
                    if pr.defer_reset && established {
                        deferred.insert(name.clone());
                    }
                    desired.insert(name.clone(), config);
                    desired_bfd.insert(name.clone(), bfd);
                    desired_routes.insert(name, converted);
                }
                Err(e) => {
                    summary.invalid_peers += 1;
                    let name = pr.peer.as_ref().map(|p| p.name.clone()).unwrap_or_default();
                    match self.sessions.get(&name) {
                        Some(running) => {
                            error!(error = %e, peer = %name, "invalid peer; keeping its running session unchanged");
                            desired.insert(name.clone(), running.config.clone());
                            desired_bfd.insert(name, running.bfd.as_ref().map(|b| b.spec));
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
        let plan = plan_peers(&current, &desired, &deferred);
        for (name, session) in &mut self.sessions {
            session.reset_pending = plan.pending.contains(name);
        }
        for name in &plan.pending {
            info!(peer = %name, "parameters changed; the session reset waits for this node's turn");
        }
        for name in &plan.reconfigure {
            if let (Some(session), Some(config)) = (self.sessions.get_mut(name), desired.get(name))
            {
                info!(peer = %name, "parameters changed; applied to the live session");
                session.handle.reconfigure(config.clone());
                session.config = config.clone();
            }
        }

        // Stop first, all at once: a changed peer's new session must not collide with
        // its old one at the ToR.
        let stops = plan.stop.iter().filter_map(|name| {
            let mut session = self.sessions.remove(name)?;
            // BFD says AdminDown first, so the ToR does not take the close for a failure.
            session.bfd = None;
            let restarting = desired.contains_key(name);
            // With graceful restart the ToR keeps the routes while the new session comes
            // up, so a parameter change does not flap them.
            let mode = if restarting && session.config.graceful_restart.is_some() {
                ShutdownMode::Restart {
                    message: PEER_CHANGED_MESSAGE.to_string(),
                }
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
            // The session starts with the snapshot's routes, so its first advertisement
            // carries them all before its End-of-RIB. Handed over after the spawn, they
            // could come after an End-of-RIB of an empty set (the session can be
            // Established first), and a graceful-restart ToR would drop at that
            // End-of-RIB every stale path of ours not yet re-sent.
            let converted = desired_routes.get(name);
            let routes = converted.map(|c| Arc::clone(&c.0)).unwrap_or_default();
            let links = converted
                .map(|c| changed_links(&c.1, &Routes::new(), &routes))
                .unwrap_or_default();
            let cause = Arc::new(Mutex::new(current_cause(links)));
            let observer = update_spans(&self.node, name, &cause);
            // A session we have just closed ourselves: the ToR may refuse the first
            // reconnects for a moment, which must not cost a backoff.
            let after_close = plan.stop.contains(name);
            match PeerHandle::spawn_observed(
                config.clone(),
                Arc::clone(&routes),
                observer,
                after_close,
            )
            .instrument(span)
            .await
            {
                Ok(handle) => {
                    info!(peer = %name, address = %handle.peer(), "started BGP session");
                    let forward = forward_changes(&handle, Arc::clone(&self.changes));
                    let pending = metrics::PendingSlot::default();
                    let time_updates = time_updates(&handle, Arc::clone(&pending));
                    self.sessions.insert(
                        name.clone(),
                        Session {
                            config: config.clone(),
                            handle,
                            routes,
                            reset_pending: false,
                            pending,
                            cause,
                            _forward: forward,
                            _time_updates: time_updates,
                            bfd: None,
                        },
                    );
                    summary.started.push(name.clone());
                }
                Err(e) => error!(peer = %name, error = %e, "cannot start BGP session"),
            }
        }
        summary.kept = plan.keep.clone();
        summary.reconfigured = plan.reconfigure.clone();
        summary.reset_pending = plan.pending.clone();

        // BFD follows the policy without touching the BGP session: a changed BFD setting
        // replaces only the BFD session (a new one starts Down, which tears nothing down).
        for (name, session) in &mut self.sessions {
            let want = desired_bfd.get(name).copied().flatten();
            if session.bfd.as_ref().map(|b| b.spec) == want {
                continue;
            }
            session.bfd = None;
            if let Some(spec) = want {
                session.bfd = start_bfd(
                    &self.bfd,
                    name,
                    &self.node,
                    &session.config,
                    spec,
                    &session.handle,
                    &self.changes,
                )
                .await;
            }
        }

        // Hand every session its full set; the engine works out the UPDATEs.
        let now = SystemTime::now();
        let mut newest_change: Option<SystemTime> = None;
        for (name, (routes, provenance)) in desired_routes {
            let Some(session) = self.sessions.get_mut(&name) else {
                continue;
            };
            summary.routes += routes.len();
            // The same set (a delta that left this session alone) is the same Arc.
            if Arc::ptr_eq(&session.routes, &routes) || *session.routes == *routes {
                continue;
            }
            // A session started by this snapshot has these routes since its spawn (the
            // equal sets are skipped above). One still connecting takes this set before
            // its first advertisement.
            let mut changes = Vec::new();
            for p in &provenance {
                let changed = session.routes.get(&p.prefix) != routes.get(&p.prefix);
                if changed && let Some(at) = p.changed_at {
                    newest_change = newest_change.max(Some(at));
                    changes.push(metrics::Change::new(at, &p.traceparent));
                }
            }
            if let Some(at) = withdrawn_at {
                changes.extend(
                    session
                        .routes
                        .keys()
                        .filter(|prefix| !routes.contains_key(prefix))
                        .map(|_| metrics::Change::withdraw(at, traceparent)),
                );
            }
            if herald_telemetry::trace::enabled() {
                let links = changed_links(&provenance, &session.routes, &routes);
                *session
                    .cause
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = current_cause(links);
            }
            if tracing::enabled!(tracing::Level::DEBUG) {
                // Which prefixes a message took away or added: what explains a path that
                // came and went at the ToR (bounded, a full snapshot can be 100k routes).
                let gone: Vec<&ipnet::IpNet> = session
                    .routes
                    .keys()
                    .filter(|p| !routes.contains_key(*p))
                    .take(32)
                    .collect();
                let new: Vec<&ipnet::IpNet> = routes
                    .keys()
                    .filter(|p| !session.routes.contains_key(*p))
                    .take(32)
                    .collect();
                debug!(peer = %name, withdrawn = ?gone, announced = ?new, "desired set changed");
            }
            // Before the hand-over: the writer may report the set written at once.
            metrics::hand_over(&session.pending, &routes, changes);
            session.handle.set_desired_arc(Arc::clone(&routes));
            session.routes = routes;
        }
        summary.peers = self.sessions.len();
        *metrics::lock(&self.view) = self
            .sessions
            .iter()
            .map(|(name, s)| {
                let view = metrics::SessionView {
                    status: s.handle.watch_status(),
                    routes: Arc::clone(&s.routes),
                };
                (name.clone(), view)
            })
            .collect();
        summary.change_to_apply = newest_change.and_then(|at| now.duration_since(at).ok());
        self.applied_revision = Some(*revision);
        self.changes.notify_one();
        info!(
            started = summary.started.len(),
            stopped = summary.stopped.len(),
            kept = summary.kept.len(),
            reconfigured = summary.reconfigured.len(),
            reset_pending = summary.reset_pending.len(),
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
            .map(|(name, s)| {
                let mut state = session_state(name, &s.handle.status(), &s.routes, self.clock);
                state.reset_pending = s.reset_pending;
                state
            })
            .collect();
        Some(pb::SpeakerState {
            node: self.node.clone(),
            applied_revision,
            sessions,
            report_interval_ms: 0,
            shutting_down: false,
        })
    }

    /// Ends every session as `shutdown` says (see [`Shutdown`]): sessions that should
    /// keep their routes at the peer (intent `restart`, graceful restart negotiated) say
    /// so (RFC 8538) and close at once; every other session is drained first (RFC 8326:
    /// its routes re-announced with GRACEFUL_SHUTDOWN and the configured LOCAL_PREF or
    /// prepends, then `drain` long for the ToR to move traffic away), then withdrawn and
    /// closed with Cease 6/2 and `message` (Hard Reset 6/9 around it where the N bit was
    /// negotiated, so the ToR drops rather than keeps them). The sessions close in
    /// parallel; the whole is bounded by `drain` plus the engine's close timeout.
    pub async fn shutdown(mut self, message: &str, shutdown: &Shutdown) {
        let sessions = std::mem::take(&mut self.sessions);
        metrics::lock(&self.view).clear();
        // BFD says AdminDown first, so the ToR does not take the close for a failure.
        let sessions: Vec<_> = sessions
            .into_iter()
            .map(|(name, mut s)| {
                s.bfd = None;
                (name, s)
            })
            .collect();
        let (keep, drain): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(_, s)| {
            shutdown.intent == ShutdownIntent::Restart && graceful_restart_negotiated(s)
        });
        let restarts = keep.into_iter().map(|(name, s)| {
            info!(peer = %name, "closing BGP session for a restart: the peer keeps the routes");
            s.handle.shutdown(ShutdownMode::Restart {
                message: message.to_string(),
            })
        });
        let drains = drain.into_iter().map(|(name, s)| async move {
            let established = s.handle.status().state == State::Established;
            if established && !s.routes.is_empty() && !shutdown.drain.is_zero() {
                info!(peer = %name, drain = ?shutdown.drain, "graceful shutdown: announcing GRACEFUL_SHUTDOWN (RFC 8326)");
                s.handle
                    .set_desired(drained(&s.routes, &s.config, shutdown));
                tokio::time::sleep(shutdown.drain).await;
            }
            info!(peer = %name, "closing BGP session: withdrawing its routes");
            s.handle
                .shutdown(ShutdownMode::Withdraw {
                    message: message.to_string(),
                })
                .await;
        });
        futures::future::join(
            futures::future::join_all(restarts),
            futures::future::join_all(drains),
        )
        .await;
    }
}

/// The RFC 8326 GRACEFUL_SHUTDOWN community (65535:0).
pub const GRACEFUL_SHUTDOWN: u32 = 0xFFFF_0000;

/// What the speaker does with its sessions on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownIntent {
    /// The node goes away (drain, scale-in): the ToR must move traffic and drop the paths.
    #[default]
    Drain,
    /// The speaker comes back soon (rolling update): peers with graceful restart keep
    /// the routes; peers without are drained as for `drain`.
    Restart,
}

/// How [`Speaker::shutdown`] ends the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    pub intent: ShutdownIntent,
    /// Time between the GRACEFUL_SHUTDOWN re-announcement and the withdrawal.
    pub drain: Duration,
    /// LOCAL_PREF of the drained routes on iBGP sessions.
    pub local_pref: u32,
    /// Times our AS is prepended to the drained routes on eBGP sessions, for ToRs that do
    /// not act on the community (0: none).
    pub prepend: u8,
}

fn graceful_restart_negotiated(s: &Session) -> bool {
    s.config.graceful_restart.is_some()
        && s.handle
            .status()
            .negotiated
            .is_some_and(|n| n.peer_graceful_restart.is_some())
}

/// `routes` as announced while draining (RFC 8326 §4): with GRACEFUL_SHUTDOWN, and made
/// less preferred for receivers that do not act on it: LOCAL_PREF on iBGP, prepends of
/// our AS on eBGP.
pub fn drained(routes: &Routes, config: &PeerConfig, shutdown: &Shutdown) -> Routes {
    let ebgp = config.local_asn != config.peer_asn;
    // The drained routes share their attributes as the routes they come from do.
    let mut interner = herald_bgp::AttributeInterner::new();
    routes
        .iter()
        .map(|(prefix, attrs)| {
            let mut a = RouteAttributes::clone(attrs);
            if !a.communities.contains(&GRACEFUL_SHUTDOWN) {
                a.communities.push(GRACEFUL_SHUTDOWN);
            }
            if ebgp {
                let mut path = vec![config.local_asn; usize::from(shutdown.prepend)];
                path.extend_from_slice(&a.as_path);
                a.as_path = path;
            } else {
                a.local_pref = Some(shutdown.local_pref);
            }
            (*prefix, interner.intern(a))
        })
        .collect()
}

/// One session's report entry. The announced prefixes are what the session's Adj-RIB-Out
/// has written to the socket on the current connection (announced and not since
/// withdrawn), so an UPDATE that could not be encoded, or one stuck behind a peer that
/// does not read, shows as not announced. `routes` is the desired set, for
/// `routes_sent`.
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
        announced_prefixes: status.advertised.keys().map(ToString::to_string).collect(),
        updates_sent: status.updates_sent,
        last_error: status.last_error.clone().unwrap_or_default(),
        // Set by the speaker, which knows what the snapshot wants.
        reset_pending: false,
        routes_sent: established && all_written(status, routes),
    }
}

/// Whether every route of `routes` the session carries (those of its negotiated families)
/// has been written to the socket, and nothing else.
fn all_written(status: &PeerStatus, routes: &Routes) -> bool {
    let Some(n) = status.negotiated.as_ref() else {
        return false;
    };
    let mut sent = routes
        .keys()
        .filter(|p| n.families.contains(&Family::of(p)))
        .peekable();
    let mut count = 0;
    let all = sent.all(|p| {
        count += 1;
        status.advertised.contains_key(p)
    });
    all && count == status.advertised.len()
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
/// Times the session's pending route changes when the writer reports their set written.
fn time_updates(handle: &PeerHandle, pending: metrics::PendingSlot) -> AbortOnDrop {
    let mut rx = handle.watch_synced();
    AbortOnDrop(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let synced = rx.borrow_and_update().clone();
            if let Some(synced) = synced {
                metrics::written(&pending, &synced.routes, synced.at);
            }
        }
    }))
}

/// Starts a peer's BFD session and the task that closes the BGP session when BFD goes
/// from Up to Down. A remote that says AdminDown is not a failure (RFC 5882 §3.2): it
/// takes the BFD session down without touching BGP.
async fn start_bfd(
    bfd: &herald_bfd::Bfd,
    name: &str,
    node: &str,
    config: &PeerConfig,
    spec: BfdSpec,
    peer: &PeerHandle,
    changes: &Arc<Notify>,
) -> Option<BfdSession> {
    let Some(local) = config.source_addr else {
        error!(peer = %name, "BFD needs the session's source address; not starting it");
        return None;
    };
    let bfd_spec = herald_bfd::PeerSpec {
        peer: config.peer_addr,
        local,
        multihop: spec.multihop,
        desired_min_tx: spec.min_tx,
        required_min_rx: spec.min_rx,
        detect_mult: spec.multiplier,
        port: None,
        min_rx_ttl: None,
    };
    let span = tracing::info_span!(parent: None, "peer", node = %node, peer = %name);
    let handle = match bfd.add(bfd_spec).instrument(span.clone()).await {
        Ok(h) => h,
        Err(e) => {
            error!(peer = %name, error = %e, "cannot start BFD session");
            return None;
        }
    };
    info!(peer = %name, %local, multihop = spec.multihop, "started BFD session");
    let link = peer.bfd_link();
    let mut rx = handle.watch();
    let changes = Arc::clone(changes);
    let watch = tokio::spawn(
        async move {
            let first = rx.borrow_and_update().clone();
            let (mut was, mut ups) = (first.state, first.up_count);
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().clone();
                // The channel keeps only the latest status: a session that went Down and
                // Up again between two looks shows as another Up.
                let left_up = was == herald_bfd::State::Up
                    && (now.state != herald_bfd::State::Up || now.up_count != ups);
                let told_admin_down = now.state == herald_bfd::State::Down
                    && now.remote_state == herald_bfd::State::AdminDown;
                if left_up && !told_admin_down {
                    warn!(diag = %now.local_diag, "BFD down: closing the BGP session");
                    link.down();
                }
                if was != now.state {
                    changes.notify_one();
                }
                (was, ups) = (now.state, now.up_count);
            }
        }
        .instrument(span),
    );
    Some(BfdSession {
        spec,
        handle,
        _watch: AbortOnDrop(watch),
    })
}

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
            changed_at: Some(prost_types::Timestamp::from(
                SystemTime::now() - Duration::from_secs(1),
            )),
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
                defer_reset: false,
                withdrawn: vec![],
                md5_password_withheld: false,
            }],
            from_revision: 0,
        }
    }

    const TEST_SHUTDOWN: Shutdown = Shutdown {
        intent: ShutdownIntent::Drain,
        drain: Duration::ZERO,
        local_pref: 0,
        prepend: 0,
    };

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
        assert_eq!(
            s.change_to_apply, None,
            "a session's first routes are a load, not a change"
        );
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
        let latency = s.change_to_apply.unwrap_or_default();
        assert!(
            latency >= Duration::from_secs(2) && latency < Duration::from_secs(60),
            "measured from the new route's changed_at: {latency:?}"
        );
        let (_, routes) = speaker.session("tor").unwrap_or_else(|| panic!("session"));
        assert_eq!(routes.len(), 2);

        // A keepalive change needs no reset, deferred or not.
        let mut live = snapshot(4, port, 90, &["172.16.0.241/32", "172.16.0.242/32"]);
        live.peers[0].defer_reset = true;
        if let Some(p) = live.peers[0].peer.as_mut() {
            p.keepalive_seconds = 7;
        }
        let s = speaker.apply(&live).await;
        assert_eq!(
            (s.reconfigured.clone(), s.stopped.len()),
            (names(&["tor"]), 0)
        );
        assert!(
            !speaker
                .state()
                .unwrap_or_else(|| panic!("a state"))
                .sessions[0]
                .reset_pending
        );

        // A changed hold time restarts the session, keeping the routes; deferring it
        // (IPAM's rolling resets) only holds back sessions that are Established, which
        // this one (to a closed port) is not. Deferral itself is proven end to end
        // against real ToRs (tests/changes.rs).
        let mut changed = snapshot(4, port, 9, &["172.16.0.241/32", "172.16.0.242/32"]);
        changed.peers[0].defer_reset = true;
        let s = speaker.apply(&changed).await;
        assert!(s.reset_pending.is_empty());
        assert_eq!(
            (s.stopped.clone(), s.started.clone()),
            (names(&["tor"]), names(&["tor"]))
        );
        let (_, routes) = speaker.session("tor").unwrap_or_else(|| panic!("session"));
        assert_eq!(routes.len(), 2);

        // A withdrawal waits for its UPDATE too, timed from the snapshot's change time
        // (the withdrawn route is not in the snapshot to say).
        let withdraw = snapshot(5, port, 9, &["172.16.0.241/32"]);
        speaker.apply(&withdraw).await;
        let at = withdraw
            .changed_at
            .and_then(|ts| SystemTime::try_from(ts).ok())
            .unwrap_or_else(|| panic!("the snapshot's change time"));
        let waiting: Vec<metrics::Change> = speaker
            .sessions
            .get("tor")
            .and_then(|s| {
                metrics::lock(&s.pending)
                    .as_ref()
                    .map(|p| p.changes.clone())
            })
            .unwrap_or_default();
        let withdrawals: Vec<&metrics::Change> = waiting
            .iter()
            .filter(|c| c.kind == metrics::Kind::Withdraw)
            .collect();
        assert_eq!(withdrawals.len(), 1, "one route withdrawn: {waiting:?}");
        assert_eq!(withdrawals[0].changed_at, at);
        speaker
            .apply(&snapshot(
                5,
                port,
                9,
                &["172.16.0.241/32", "172.16.0.242/32"],
            ))
            .await;

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
        speaker.shutdown("test done", &TEST_SHUTDOWN).await;
    }
}
