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
/// HTTP/2 pings on the idle stream: a vanished IPAM (host gone, no RST) is noticed within
/// interval + timeout instead of the TCP timeout of minutes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest snapshot accepted: ~100k routes with attributes, with room to spare.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// Bound on one report call.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// IPAM's endpoint from the settings (plaintext or mutual TLS) with the speaker's timeouts.
pub fn endpoint(config: &crate::Config) -> Result<Endpoint, herald_tls::TlsError> {
    Ok(config.ipam_client(CONNECT_TIMEOUT)?.with(|e| {
        e.http2_keep_alive_interval(KEEPALIVE_INTERVAL)
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

/// How one subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot connect to IPAM")]
    Connect(#[from] tonic::transport::Error),
    // Not a `source`: the code and message say it all.
    #[error("IPAM answered {}: {}", .0.code(), .0.message())]
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
/// found a delta that does not follow what it applied) it subscribes again at once, for
/// a fresh snapshot. On any failure it waits (exponential backoff with jitter) and
/// subscribes again; the speaker keeps its last state while IPAM is away. `messages` is
/// bounded: a speaker slow to apply stops this task reading, and IPAM, finding the
/// stream behind, sends a snapshot instead of the deltas it missed.
pub async fn watch_node_routes(
    endpoint: Endpoint,
    node: String,
    messages: mpsc::Sender<pb::NodeRoutes>,
    resync: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = subscribe(&endpoint, &node, &messages, &resync, &mut backoff) => r,
        };
        if matches!(result, WatchError::Closed) {
            return;
        }
        let delay = backoff.next_delay();
        match &result {
            // After a snapshot the backoff starts again from its shortest pause, so a
            // gap is answered in a moment; a server that sends only deltas that do not
            // follow is not hammered.
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

async fn subscribe(
    endpoint: &Endpoint,
    node: &str,
    messages: &mpsc::Sender<pb::NodeRoutes>,
    resync: &Notify,
    backoff: &mut Backoff,
) -> WatchError {
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
        let mut first = true;
        // A gap noticed on an earlier stream is answered by this one's snapshot.
        let _ = resync.notified().now_or_never();
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                () = resync.notified() => return Err(WatchError::Gap),
            };
            let Some(message) = message else { break };
            // A snapshot arrived, so the link works: the next failure starts the backoff
            // from the beginning.
            if message.from_revision == 0 {
                backoff.reset();
            }
            if first {
                first = false;
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
    match result {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    }
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
        match tokio::time::timeout(REPORT_TIMEOUT, client.report_speaker_state(state)).await {
            Ok(Ok(_)) => debug!(revision, sessions, "state reported"),
            Ok(Err(status)) => warn!(
                code = %status.code(),
                error = %status.message(),
                "reporting state to IPAM failed; retrying on the next change or tick"
            ),
            Err(_) => warn!(
                timeout = ?REPORT_TIMEOUT,
                "reporting state to IPAM timed out; retrying on the next change or tick"
            ),
        }
        // The next periodic report is a full interval after this one.
        tick.reset();
    }
}
