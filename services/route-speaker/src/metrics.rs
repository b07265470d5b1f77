//! herald-route-speaker's metrics. The sessions' figures (state, establishments, prefixes
//! desired and announced, UPDATEs and bytes sent) are read from the sessions' own status at
//! scrape time through [`SessionsView`]; the latency from a route's change to the UPDATE
//! announcing or withdrawing it leaving the socket is observed when the writer reports the
//! set written, by `kind`, with the change's trace id as the exemplar.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::SystemTime;

use herald_bgp::{Family, PeerStatus, Routes, State};
use herald_telemetry::metrics::{Age, TraceLabel, latency_buckets, trace_id_of};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family as Labelled;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

/// Whether an UPDATE announced a route or withdrew it: the `kind` label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    Announce,
    Withdraw,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    kind: &'static str,
}

impl From<Kind> for KindLabel {
    fn from(kind: Kind) -> Self {
        Self {
            kind: match kind {
                Kind::Announce => "announce",
                Kind::Withdraw => "withdraw",
            },
        }
    }
}

type Latency = Labelled<
    KindLabel,
    HistogramWithExemplars<TraceLabel>,
    fn() -> HistogramWithExemplars<TraceLabel>,
>;
type PlainLatency = Labelled<KindLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub change_to_update: Latency,
    /// The same observations without exemplars, for clients that do not read OpenMetrics.
    pub change_to_update_plain: PlainLatency,
    pub stream_connected: Gauge,
    pub snapshot_age: Age,
    pub snapshots_received: Counter,
    pub stream_resyncs: Counter,
    /// Peers of the last snapshot whose TCP-MD5 password herald-ipam withheld (this
    /// speaker reaches it in plaintext), so no session runs with them.
    pub password_withheld: Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    change_to_update: Labelled::new_with_constructor(|| {
        HistogramWithExemplars::new(latency_buckets())
    }),
    change_to_update_plain: Labelled::new_with_constructor(|| Histogram::new(latency_buckets())),
    stream_connected: Gauge::default(),
    snapshot_age: Age::default(),
    snapshots_received: Counter::default(),
    stream_resyncs: Counter::default(),
    password_withheld: Gauge::default(),
});

/// Most route changes waiting for their UPDATE to leave, per session: past it (a session
/// down through a storm of changes) the newest are not timed.
const MAX_PENDING_CHANGES: usize = 100_000;

/// One route change waiting for its UPDATE: an announcement (or a changed route) or a
/// withdrawal, when IPAM says it changed, and its trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: Kind,
    pub changed_at: SystemTime,
    pub trace_id: Option<String>,
}

impl Change {
    /// A route announced or changed at `changed_at` (its own `changed_at`).
    pub fn new(changed_at: SystemTime, traceparent: &str) -> Self {
        Self {
            kind: Kind::Announce,
            changed_at,
            trace_id: trace_id_of(traceparent),
        }
    }

    /// A route withdrawn by a snapshot of changes made at `changed_at` (the snapshot's).
    pub fn withdraw(changed_at: SystemTime, traceparent: &str) -> Self {
        Self {
            kind: Kind::Withdraw,
            ..Self::new(changed_at, traceparent)
        }
    }
}

/// The changes handed to a session with `routes`, until the writer reports that set
/// written.
#[derive(Debug)]
pub struct Pending {
    pub routes: Arc<Routes>,
    pub changes: Vec<Change>,
}

pub type PendingSlot = Arc<Mutex<Option<Pending>>>;

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records that `routes` go to the session with `changes`. Changes still waiting from an
/// earlier set travel on with this one: the UPDATE that carries them is this set's.
pub fn hand_over(slot: &PendingSlot, routes: &Arc<Routes>, changes: Vec<Change>) {
    let mut pending = lock(slot);
    let mut all = pending.take().map(|p| p.changes).unwrap_or_default();
    all.extend(changes);
    all.truncate(MAX_PENDING_CHANGES);
    if !all.is_empty() {
        *pending = Some(Pending {
            routes: Arc::clone(routes),
            changes: all,
        });
    }
}

/// The writer reported `routes` written at `at`: times the changes waiting for that set.
pub fn written(slot: &PendingSlot, routes: &Arc<Routes>, at: SystemTime) {
    let done = {
        let mut pending = lock(slot);
        if pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.routes, routes))
        {
            pending.take()
        } else {
            None
        }
    };
    for change in done.into_iter().flat_map(|p| p.changes) {
        let seconds = at
            .duration_since(change.changed_at)
            .map_or(0.0, |d| d.as_secs_f64());
        let kind = KindLabel::from(change.kind);
        METRICS
            .change_to_update_plain
            .get_or_create(&kind)
            .observe(seconds);
        METRICS.change_to_update.get_or_create(&kind).observe(
            seconds,
            change.trace_id.map(|trace_id| TraceLabel { trace_id }),
            None,
        );
    }
}

/// What the collector reads of one session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub status: watch::Receiver<PeerStatus>,
    pub routes: Arc<Routes>,
}

/// The running sessions by peer name, kept by the speaker, read at scrape time.
pub type SessionsView = Arc<Mutex<BTreeMap<String, SessionView>>>;

/// The registry `/metrics` serves, with the latency's exemplars or without.
pub fn registry(sessions: SessionsView, exemplars: bool) -> Registry {
    let m = &*METRICS;
    let mut r = herald_telemetry::metrics::registry();
    let name = "herald_speaker_route_change_to_update";
    let help = "From a route's change in IPAM to the UPDATE announcing (kind=announce: the route's changed_at) or withdrawing it (kind=withdraw: the snapshot's changed_at) leaving the socket; exemplars carry the change's trace id";
    if exemplars {
        r.register_with_unit(name, help, Unit::Seconds, m.change_to_update.clone());
    } else {
        r.register_with_unit(name, help, Unit::Seconds, m.change_to_update_plain.clone());
    }
    r.register(
        "herald_speaker_ipam_stream_connected",
        "1 while the WatchNodeRoutes stream from herald-ipam is open",
        m.stream_connected.clone(),
    );
    r.register_with_unit(
        "herald_speaker_snapshot_age",
        "Time since the last route snapshot arrived from herald-ipam (since start, before the first)",
        Unit::Seconds,
        m.snapshot_age.clone(),
    );
    r.register(
        "herald_speaker_snapshots_received",
        "Route messages (full snapshots and deltas) received from herald-ipam",
        m.snapshots_received.clone(),
    );
    r.register(
        "herald_speaker_route_stream_resyncs",
        "Route streams opened again for a full snapshot because a delta did not follow the revision applied",
        m.stream_resyncs.clone(),
    );
    r.register(
        "herald_speaker_peers_password_withheld",
        "Peers of the last snapshot whose TCP-MD5 password herald-ipam withheld because this speaker reaches it in plaintext; they get no session until it uses mutual TLS",
        m.password_withheld.clone(),
    );
    r.register_collector(Box::new(SessionsCollector { sessions }));
    r
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerState {
    peer: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerFamily {
    peer: String,
    family: &'static str,
}

const STATES: [(State, &str); 6] = [
    (State::Idle, "Idle"),
    (State::Connect, "Connect"),
    (State::Active, "Active"),
    (State::OpenSent, "OpenSent"),
    (State::OpenConfirm, "OpenConfirm"),
    (State::Established, "Established"),
];

#[derive(Debug)]
struct SessionsCollector {
    sessions: SessionsView,
}

struct Figures {
    peer: String,
    status: PeerStatus,
    desired: [usize; 2],
}

fn family_label(i: usize) -> &'static str {
    if i == 0 { "ipv4" } else { "ipv6" }
}

impl Collector for SessionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copied out first: nothing is locked while encoding.
        let figures: Vec<Figures> = lock(&self.sessions)
            .iter()
            .map(|(peer, view)| {
                let v6 = view
                    .routes
                    .keys()
                    .filter(|p| Family::of(p) == Family::Ipv6Unicast)
                    .count();
                Figures {
                    peer: peer.clone(),
                    status: view.status.borrow().clone(),
                    desired: [view.routes.len() - v6, v6],
                }
            })
            .collect();

        let mut metric = encoder.encode_descriptor(
            "herald_speaker_session_state",
            "1 for the BGP session's current state, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for f in &figures {
            for (state, name) in STATES {
                let labels = PeerState {
                    peer: f.peer.clone(),
                    state: name,
                };
                ConstGauge::new(i64::from(f.status.state == state))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "herald_speaker_session_established",
            "Times the session reached Established (each one after the first is a flap)",
            None,
            MetricType::Counter,
        )?;
        for f in &figures {
            ConstCounter::new(f.status.established_count).encode(metric.encode_family(
                &PeerLabel {
                    peer: f.peer.clone(),
                },
            )?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "herald_speaker_prefixes_desired",
            "Prefixes the latest snapshot wants announced to the peer, by family",
            None,
            MetricType::Gauge,
        )?;
        for f in &figures {
            for (i, n) in f.desired.iter().enumerate() {
                let labels = PeerFamily {
                    peer: f.peer.clone(),
                    family: family_label(i),
                };
                ConstGauge::new(*n as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "herald_speaker_prefixes_announced",
            "Prefixes the session has announced to the peer (its Adj-RIB-Out), by family",
            None,
            MetricType::Gauge,
        )?;
        for f in &figures {
            let v6 = f.status.prefixes_sent_ipv6;
            for (i, n) in [f.status.prefixes_sent.saturating_sub(v6), v6]
                .iter()
                .enumerate()
            {
                let labels = PeerFamily {
                    peer: f.peer.clone(),
                    family: family_label(i),
                };
                ConstGauge::new(*n as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "herald_speaker_updates_sent",
            "BGP UPDATE messages sent to the peer (End-of-RIB markers not counted)",
            None,
            MetricType::Counter,
        )?;
        for f in &figures {
            ConstCounter::new(f.status.updates_sent).encode(metric.encode_family(
                &PeerLabel {
                    peer: f.peer.clone(),
                },
            )?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "herald_speaker_bgp_sent",
            "Bytes of BGP messages of every type sent to the peer",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for f in &figures {
            ConstCounter::new(f.status.bytes_sent).encode(metric.encode_family(&PeerLabel {
                peer: f.peer.clone(),
            })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    #[test]
    fn a_written_set_times_its_changes_with_the_trace_id_as_exemplar() {
        let slot: PendingSlot = Arc::default();
        let routes = Arc::new(Routes::new());
        let changed_at = SystemTime::now() - Duration::from_millis(300);
        hand_over(
            &slot,
            &routes,
            vec![Change::new(
                changed_at,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
        );
        // Another set's write does not time these changes.
        written(&slot, &Arc::new(Routes::new()), SystemTime::now());
        assert!(lock(&slot).is_some());
        written(&slot, &routes, changed_at + Duration::from_millis(250));
        assert!(lock(&slot).is_none(), "timed once, then forgotten");

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(Arc::default(), true))
            .unwrap();
        let bucket = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "herald_speaker_route_change_to_update_seconds_bucket{le=\"0.25\",kind=\"announce\"}",
                )
            })
            .unwrap_or_else(|| panic!("no 0.25 s bucket in\n{text}"));
        assert!(
            bucket.contains("# {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.25"),
            "{bucket}"
        );
    }

    #[test]
    fn changes_waiting_from_an_earlier_set_travel_with_the_next() {
        let slot: PendingSlot = Arc::default();
        let first = Arc::new(Routes::new());
        let second = Arc::new(Routes::new());
        let at = SystemTime::now();
        hand_over(&slot, &first, vec![Change::new(at, "")]);
        hand_over(&slot, &second, vec![Change::new(at, "")]);
        let pending = lock(&slot);
        let pending = pending.as_ref().unwrap();
        assert!(Arc::ptr_eq(&pending.routes, &second));
        assert_eq!(pending.changes.len(), 2);
        assert_eq!(pending.changes[0].trace_id, None);
    }

    #[test]
    fn a_withdrawal_is_timed_under_its_own_kind() {
        let slot: PendingSlot = Arc::default();
        let routes = Arc::new(Routes::new());
        let changed_at = SystemTime::now() - Duration::from_secs(3);
        hand_over(&slot, &routes, vec![Change::withdraw(changed_at, "")]);
        written(&slot, &routes, changed_at + Duration::from_secs(3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(Arc::default(), false))
            .unwrap();
        let bucket = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "herald_speaker_route_change_to_update_seconds_bucket{le=\"5.0\",kind=\"withdraw\"}",
                )
            })
            .unwrap_or_else(|| panic!("no withdrawal bucket in\n{text}"));
        assert!(
            !bucket.ends_with(" 0"),
            "the withdrawal was not counted: {bucket}"
        );
    }
}
