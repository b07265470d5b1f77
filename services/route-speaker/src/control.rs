//! The speaker's side of the gRPC link to IPAM: the node's route stream (a snapshot, then
//! deltas) turned into a channel of messages in order (with reconnects, so nothing
//! downstream sees gRPC), and the reporter.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_telemetry::trace::Inject;
use herald_tls::ClientEndpoint as Endpoint;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// Bound on opening the TCP + HTTP/2 connection to IPAM.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one call until IPAM's answer, or a stream's response headers (tonic's
/// per-request timeout ends there, so the long-lived WatchNodeRoutes stream itself has
/// none: keepalive watches it). IPAM answers in milliseconds; a call that waits this long
/// met a vanished or blackholed IPAM, and a new attempt has a better chance.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on the stream: a vanished IPAM (host gone, no RST, or a path that drops
/// every packet) is noticed within interval + timeout instead of the TCP timeout of
/// minutes; the subscription is then made again with backoff while every route stays
/// announced (fail-static).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest snapshot accepted: ~100k routes with attributes, with room to spare.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// IPAM's endpoint from the settings (plaintext or mutual TLS) with the speaker's timeouts.
pub fn endpoint(config: &crate::Config) -> Result<Endpoint, herald_tls::TlsError> {
    Ok(config.ipam_client(CONNECT_TIMEOUT)?.with(|e| {
        e.timeout(REQUEST_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
    }))
}

/// Displays an error with its sources (tonic's transport errors say little on their own).
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// The sources under a status, each after ": ".
struct Causes<'a>(&'a tonic::Status);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut source = std::error::Error::source(self.0);
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// How one subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot connect to IPAM")]
    Connect(#[from] tonic::transport::Error),
    // Not a `source` (the status's own Display repeats code and message), but what broke
    // under it is said: a keepalive that timed out on a silent connection, a reset.
    #[error("IPAM answered {}: {}{}", .0.code(), .0.message(), Causes(.0))]
    Status(tonic::Status),
    #[error("IPAM ended the stream")]
    Ended,
    #[error("a route delta did not follow the revision applied; subscribing again for a snapshot")]
    Gap,
    #[error("the speaker stopped taking route messages")]
    Closed,
}

impl From<tonic::Status> for WatchError {
    fn from(status: tonic::Status) -> Self {
        WatchError::Status(status)
    }
}

/// Subscribes to `node`'s routes until `shutdown`, passing every message, in order, to
/// `messages`: a full snapshot first, then deltas. When `resync` is notified (the speaker
/// found a delta that does not follow what it applied) it subscribes again after the
/// shortest pause, for a fresh snapshot. On any failure it waits (exponential backoff with
/// jitter, from the first step again after a healthy subscription) and subscribes again;
/// the speaker keeps its last state while IPAM is away. `messages` is bounded: a speaker
/// slow to apply stops this task reading, and IPAM, finding the stream behind, sends a
/// snapshot instead of the deltas it missed.
pub async fn watch_node_routes(
    endpoint: Endpoint,
    node: String,
    messages: mpsc::Sender<pb::NodeRoutes>,
    resync: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let (result, healthy_for) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = subscribe(&endpoint, &node, &messages, &resync) => r,
        };
        if matches!(result, WatchError::Closed) {
            return;
        }
        let delay = backoff.after_failure(healthy_for);
        match &result {
            WatchError::Gap => {
                crate::metrics::METRICS.stream_resyncs.inc();
                warn!(node = %node, retry_in = ?delay, "{result}");
            }
            WatchError::Status(status) if status.code() == Code::NotFound => warn!(
                node = %node,
                status = %status.message(),
                retry_in = ?delay,
                "IPAM does not know this node (not registered yet?); subscribing again"
            ),
            e => warn!(
                node = %node,
                error = %ErrorChain(e),
                retry_in = ?delay,
                "IPAM stream lost; keeping every session and route as last applied (fail-static)"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One subscription, until it fails: how, and for how long it delivered messages (from
/// its first snapshot; `None` if none came).
async fn subscribe(
    endpoint: &Endpoint,
    node: &str,
    messages: &mpsc::Sender<pb::NodeRoutes>,
    resync: &Notify,
) -> (WatchError, Option<Duration>) {
    let mut first_at: Option<tokio::time::Instant> = None;
    let result: Result<(), WatchError> = async {
        let channel = endpoint.connect().await?;
        let mut client =
            RoutingClient::new(Inject::new(channel)).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
        let mut stream = client
            .watch_node_routes(pb::WatchNodeRoutesRequest {
                node: node.to_string(),
                deltas: true,
            })
            .await?
            .into_inner();
        crate::metrics::METRICS.stream_connected.set(1);
        // A gap noticed on an earlier stream is answered by this one's snapshot.
        let _ = resync.notified().now_or_never();
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                () = resync.notified() => return Err(WatchError::Gap),
            };
            let Some(message) = message else { break };
            // Healthy from its first snapshot: a server that sends only deltas that do
            // not follow is not hammered.
            if first_at.is_none() && message.from_revision == 0 {
                first_at = Some(tokio::time::Instant::now());
                info!(%node, revision = message.revision, "subscribed to IPAM: first snapshot");
            } else {
                debug!(%node, revision = message.revision, from_revision = message.from_revision, "routes received");
            }
            crate::metrics::METRICS.snapshots_received.inc();
            crate::metrics::METRICS.snapshot_age.mark();
            if messages.send(message).await.is_err() {
                return Err(WatchError::Closed);
            }
        }
        Ok(())
    }
    .await;
    crate::metrics::METRICS.stream_connected.set(0);
    let error = match result {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    };
    (error, first_at.map(|at| at.elapsed()))
}

/// Bound on the last report at shutdown: it must not hold up closing the sessions.
pub const FINAL_REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends the shutting-down report once, bounded by [`FINAL_REPORT_TIMEOUT`]; a failure is
/// logged (IPAM then sees the speaker stale once its stream is gone).
pub async fn final_report(endpoint: &Endpoint, state: pb::SpeakerState) {
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        RoutingClient::new(channel)
            .report_speaker_state(state)
            .await
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(FINAL_REPORT_TIMEOUT, call).await {
        Ok(Ok(_)) => info!("final state reported: shutting down"),
        Ok(Err(e)) => warn!(error = %e, "final state report failed"),
        Err(_) => warn!(timeout = ?FINAL_REPORT_TIMEOUT, "final state report timed out"),
    }
}

/// Sends the latest state to IPAM whenever it changes and every `interval`. A failed
/// report is logged and the next change or tick tries again; it never stops the speaker.
pub async fn report_state(
    endpoint: Endpoint,
    mut states: watch::Receiver<Option<pb::SpeakerState>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut client = RoutingClient::new(Inject::new(endpoint.connect_lazy()));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {}
        }
        let Some(state) = states.borrow_and_update().clone() else {
            continue;
        };
        let revision = state.applied_revision;
        let sessions = state.sessions.len();
        let prefixes: usize = state
            .sessions
            .iter()
            .map(|s| s.announced_prefixes.len())
            .sum();
        // Bounded by the endpoint's REQUEST_TIMEOUT (CANCELLED "Timeout expired").
        match client.report_speaker_state(state).await {
            Ok(_) => debug!(revision, sessions, "state reported"),
            Err(status) => warn!(
                code = %status.code(),
                error = %status.message(),
                "reporting state to IPAM failed; retrying on the next change or tick"
            ),
        }
        // A report names every announced prefix: at 100k, some 7 MB of strings and
        // encoding freed by now, between pages that stay in use.
        if prefixes >= crate::memory::TRIM_AFTER_ROUTES {
            crate::memory::release_freed_memory();
        }
        // The next periodic report is a full interval after this one.
        tick.reset();
    }
}
