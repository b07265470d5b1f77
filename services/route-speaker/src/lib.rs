//! `herald-route-speaker`: one per node. It subscribes to the node's route snapshots from
//! IPAM (`herald.routing.v1.Routing/WatchNodeRoutes`), holds the node's BGP sessions to
//! the ToRs with `herald-bgp`, hands each session its full desired route set, and reports
//! what the sessions actually announce (`ReportSpeakerState`).
//!
//! - [`convert`]: protobuf → engine types ([`convert::peer_from_pb`],
//!   [`convert::routes_from_pb`]); malformed entries are skipped, never fatal.
//! - [`plan`]: which sessions to keep, start and stop ([`plan::plan_peers`]).
//! - [`speaker`]: [`Speaker`], the sessions and their report; no gRPC inside.
//! - [`control`]: the stream from IPAM as a `watch` channel with reconnects, and the
//!   reporter.
//!
//! Fail-static: only a snapshot changes what is announced. When IPAM is unreachable the
//! speaker keeps every session and route as last applied, and a reconnect replays a
//! snapshot that [`Speaker::apply`] turns into no BGP traffic when nothing changed.

pub mod backoff;
pub mod control;
pub mod convert;
pub mod plan;
pub mod speaker;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use herald_api::routing::v1 as pb;
use herald_settings::{CommonArgs, HttpEndpoint, Invalid, IpamEndpointArg};
use herald_telemetry::LogFormat;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use backoff::Backoff;
pub use convert::{
    ConvertedRoutes, PeerSpec, RouteError, peer_from_pb, route_from_pb, routes_from_pb,
};
pub use plan::{PeerPlan, plan_peers};
pub use speaker::{ApplySummary, Speaker};

/// Where IPAM listens unless told otherwise (its own default).
pub const DEFAULT_IPAM_ENDPOINT: &str = herald_settings::DEFAULT_IPAM_ENDPOINT;
/// How often the state is reported even when nothing changed, so IPAM notices a speaker
/// that went away and recovers from a lost report.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Session status changes are gathered this long before a report is built, so a burst
/// of UPDATEs costs one report, not one per UPDATE.
pub const REPORT_COALESCE: Duration = Duration::from_millis(100);
/// Bound on closing every session at shutdown; well inside Kubernetes' 30 s grace. The
/// engine itself gives up on a session after about 7 s.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(8);
/// What non-graceful-restart peers read in the Cease NOTIFICATION at shutdown (RFC 8203).
pub const SHUTDOWN_MESSAGE: &str = "herald: route speaker shutting down";

/// The route speaker's settings, one key each, read by [`herald_settings::load`]: built-in
/// defaults < the `--config` file < `HERALD_…` environment variables < flags.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name as IPAM knows it (the Kubernetes Node name). Required.
    pub node_name: String,
    /// IPAM's gRPC endpoint.
    pub ipam_endpoint: HttpEndpoint,
    /// BGP identifier for every session, instead of the one in the snapshots.
    pub router_id: Option<Ipv4Addr>,
    /// Interval of the periodic state report.
    #[serde(with = "herald_settings::duration")]
    pub report_interval: Duration,
    pub log_format: LogFormat,
    /// OTLP/gRPC collector to export spans to; none: no export.
    pub otlp_endpoint: Option<HttpEndpoint>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            ipam_endpoint: HttpEndpoint::default_ipam(),
            router_id: None,
            report_interval: DEFAULT_REPORT_INTERVAL,
            log_format: LogFormat::default(),
            otlp_endpoint: None,
        }
    }
}

impl herald_settings::Settings for Config {
    fn validate(&self) -> Result<(), Invalid> {
        if self.node_name.trim().is_empty() {
            return Err(Invalid {
                key: "node_name",
                reason: "required: this node's name as IPAM knows it (the Kubernetes Node name)"
                    .into(),
            });
        }
        if self.report_interval.is_zero() {
            return Err(Invalid {
                key: "report_interval",
                reason: "must be more than zero".into(),
            });
        }
        Ok(())
    }
}

/// Herald route speaker: announces this node's LoadBalancer routes to its BGP peers.
///
/// Every setting is read from the `--config` file, the `HERALD_…` environment variable
/// and the flag of the same name, the flag winning.
#[derive(Debug, clap::Parser)]
#[command(name = "herald-route-speaker", version)]
pub struct Args {
    /// This node's name as IPAM knows it (the Kubernetes Node name); required
    #[arg(long, env = "HERALD_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub ipam_endpoint: IpamEndpointArg,
    /// BGP identifier (an IPv4 address) for every session, instead of the one in the
    /// route snapshots
    #[arg(long, env = "HERALD_ROUTER_ID", value_name = "IPV4")]
    pub router_id: Option<String>,
    /// Interval of the periodic state report (`500ms`, `10s`, `1m`); reports also go out
    /// after each applied snapshot and on session changes [default: 10s]
    #[arg(long, env = "HERALD_REPORT_INTERVAL", value_name = "DURATION")]
    pub report_interval: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl AsRef<CommonArgs> for Args {
    fn as_ref(&self) -> &CommonArgs {
        &self.common
    }
}

/// Runs the speaker until `shutdown` is cancelled, then closes every session (bounded by
/// [`SHUTDOWN_TIMEOUT`]).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = config.node_name.trim().to_string();
    if node.is_empty() {
        bail!("node_name (--node-name, HERALD_NODE_NAME) must not be empty");
    }
    let endpoint = control::endpoint(config.ipam_endpoint.as_str())
        .with_context(|| format!("ipam_endpoint {:?}", config.ipam_endpoint.as_str()))?;
    info!(
        node = %node,
        ipam = %config.ipam_endpoint,
        router_id = ?config.router_id,
        "route speaker starting"
    );

    let (snapshot_tx, mut snapshots) = watch::channel(None::<Arc<pb::NodeRoutes>>);
    let (state_tx, state_rx) = watch::channel(None::<pb::SpeakerState>);
    let tasks = shutdown.child_token();
    let watcher = tokio::spawn(control::watch_node_routes(
        endpoint.clone(),
        node.clone(),
        snapshot_tx,
        tasks.clone(),
    ));
    let reporter = tokio::spawn(control::report_state(
        endpoint,
        state_rx,
        config.report_interval,
        tasks.clone(),
    ));

    let mut speaker = Speaker::new(node, config.router_id);
    let changes = speaker.changes();
    let mut report_at: Option<tokio::time::Instant> = None;
    let mut stream_open = true;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            changed = snapshots.changed(), if stream_open => {
                if changed.is_err() {
                    stream_open = false;
                    continue;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                if let Some(snapshot) = snapshot {
                    speaker.apply(&snapshot).await;
                    state_tx.send_replace(speaker.state());
                    report_at = None;
                }
            }
            () = changes.notified() => {
                report_at.get_or_insert_with(|| tokio::time::Instant::now() + REPORT_COALESCE);
            }
            () = sleep_until(report_at) => {
                report_at = None;
                let state = speaker.state();
                state_tx.send_if_modified(|cur| {
                    if *cur == state {
                        false
                    } else {
                        *cur = state;
                        true
                    }
                });
            }
        }
    }

    info!("shutting down: closing BGP sessions");
    tasks.cancel();
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, speaker.shutdown(SHUTDOWN_MESSAGE))
        .await
        .is_err()
    {
        warn!(timeout = ?SHUTDOWN_TIMEOUT, "BGP sessions did not close in time");
    }
    for task in [watcher, reporter] {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    info!("route speaker stopped");
    Ok(())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_has_a_flag_an_env_and_a_readme_row() {
        herald_settings::check_binary::<Config>(
            &Args::command(),
            include_str!("../../../README.md"),
            "herald-route-speaker",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
