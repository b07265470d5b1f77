//! `herald-route-speaker`: one per node. It subscribes to the node's routes from IPAM
//! (`herald.routing.v1.Routing/WatchNodeRoutes`: a full snapshot, then deltas), holds the
//! node's BGP sessions to the ToRs with `herald-bgp`, hands each session its full desired
//! route set, and reports what the sessions actually announce (`ReportSpeakerState`).
//!
//! - [`convert`]: protobuf → engine types ([`convert::peer_from_pb`],
//!   [`convert::routes_from_pb`]); malformed entries are skipped, never fatal.
//! - [`desired`]: the desired sets, replaced by a snapshot and patched by a delta; a
//!   delta that does not follow the revision applied is a gap.
//! - [`plan`]: which sessions to keep, start and stop ([`plan::plan_peers`]).
//! - [`speaker`]: [`Speaker`], the sessions and their report; no gRPC inside.
//! - [`control`]: the stream from IPAM as a bounded channel of messages in order, with
//!   reconnects (and a fresh subscription after a gap), and the reporter.
//! - [`memory`]: the heap pages a large route message freed, given back to the OS.
//!
//! Fail-static: only a message from IPAM changes what is announced. When IPAM is unreachable the
//! speaker keeps every session and route as last applied, and a reconnect replays a
//! snapshot that [`Speaker::apply`] turns into no BGP traffic when nothing changed.

pub mod backoff;
pub mod control;
pub mod convert;
pub mod desired;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod speaker;

use std::net::{Ipv4Addr, SocketAddr};
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
pub use speaker::{ApplySummary, Shutdown, ShutdownIntent, Speaker};

/// Route messages queued between the stream and the sessions: a speaker further behind
/// stops reading, and IPAM sends it a snapshot once its own queue for it is full.
const ROUTE_MESSAGES: usize = 32;
/// Where IPAM listens unless told otherwise (its own default).
pub const DEFAULT_IPAM_ENDPOINT: &str = herald_settings::DEFAULT_IPAM_ENDPOINT;
/// How often the state is reported even when nothing changed, so IPAM notices a speaker
/// that went away and recovers from a lost report.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Session status changes are gathered this long before a report is built, so a burst
/// of UPDATEs costs one report, not one per UPDATE.
pub const REPORT_COALESCE: Duration = Duration::from_millis(100);
/// Bound on closing every session at shutdown, after the drain time; with the default
/// drain well inside Kubernetes' 30 s grace. The engine itself gives up on a session
/// after about 7 s.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(8);
/// Default time between announcing GRACEFUL_SHUTDOWN and withdrawing (RFC 8326).
pub const DEFAULT_SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// Upper bounds of the drain settings: a drain must end well inside any sensible
/// termination grace, and a longer AS path only risks the ToR's maxas-limit.
pub const MAX_SHUTDOWN_DRAIN: Duration = Duration::from_secs(300);
pub const MAX_SHUTDOWN_PREPEND: usize = 10;
/// Default prepends of our AS on drained routes towards eBGP peers.
pub const DEFAULT_SHUTDOWN_PREPEND: u8 = 3;
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
    /// This client's certificate (PEM); with `tls_key` and `tls_ca`, IPAM is called over
    /// mutual TLS.
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA bundle (PEM) IPAM's certificate must chain to.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name IPAM's certificate must carry; by default the endpoint's host.
    pub ipam_server_name: Option<String>,
    /// BGP identifier for every session, instead of the one in the snapshots.
    pub router_id: Option<Ipv4Addr>,
    /// Interval of the periodic state report.
    #[serde(with = "herald_settings::duration")]
    pub report_interval: Duration,
    /// What SIGTERM means for the sessions: `drain` or `restart`.
    pub shutdown_intent: ShutdownIntent,
    /// Time between announcing GRACEFUL_SHUTDOWN and withdrawing the routes.
    #[serde(with = "herald_settings::duration")]
    pub shutdown_drain: Duration,
    /// LOCAL_PREF of the drained routes on iBGP sessions.
    pub shutdown_local_pref: u32,
    /// Prepends of our AS on the drained routes on eBGP sessions.
    pub shutdown_prepend: u8,
    pub log_format: LogFormat,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// OTLP/gRPC collector to export spans to; none: no export.
    pub otlp_endpoint: Option<HttpEndpoint>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            ipam_endpoint: HttpEndpoint::default_ipam(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            ipam_server_name: None,
            router_id: None,
            report_interval: DEFAULT_REPORT_INTERVAL,
            shutdown_intent: ShutdownIntent::default(),
            shutdown_drain: DEFAULT_SHUTDOWN_DRAIN,
            shutdown_local_pref: 0,
            shutdown_prepend: DEFAULT_SHUTDOWN_PREPEND,
            log_format: LogFormat::default(),
            admin_listen: herald_telemetry::admin::DEFAULT_SPEAKER_ADMIN_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("the default admin address is an address")),
            otlp_endpoint: None,
        }
    }
}

impl Config {
    /// The IPAM endpoint, over mutual TLS when the three files are set; the certificate
    /// files are then reloaded when they change.
    pub fn ipam_client(
        &self,
        connect_timeout: std::time::Duration,
    ) -> Result<herald_tls::ClientEndpoint, herald_tls::TlsError> {
        herald_tls::ClientEndpoint::from_files(
            self.ipam_endpoint.as_str(),
            herald_tls::TlsFiles::all(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_ca.as_deref(),
            ),
            self.ipam_server_name.clone(),
            connect_timeout,
        )
    }
}

impl herald_settings::Settings for Config {
    fn validate(&self) -> Result<(), Invalid> {
        herald_settings::check_tls_trio([
            ("tls_cert", self.tls_cert.is_some()),
            ("tls_key", self.tls_key.is_some()),
            ("tls_ca", self.tls_ca.is_some()),
        ])?;
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
        if self.shutdown_drain > MAX_SHUTDOWN_DRAIN {
            return Err(Invalid {
                key: "shutdown_drain",
                reason: format!("at most {MAX_SHUTDOWN_DRAIN:?}"),
            });
        }
        if usize::from(self.shutdown_prepend) > MAX_SHUTDOWN_PREPEND {
            return Err(Invalid {
                key: "shutdown_prepend",
                reason: format!("at most {MAX_SHUTDOWN_PREPEND}"),
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
    #[command(flatten)]
    pub ipam_tls: herald_settings::IpamTlsArgs,
    /// BGP identifier (an IPv4 address) for every session, instead of the one in the
    /// route snapshots
    #[arg(long, env = "HERALD_ROUTER_ID", value_name = "IPV4")]
    pub router_id: Option<String>,
    /// Interval of the periodic state report (`500ms`, `10s`, `1m`); reports also go out
    /// after each applied snapshot and on session changes [default: 10s]
    #[arg(long, env = "HERALD_REPORT_INTERVAL", value_name = "DURATION")]
    pub report_interval: Option<String>,
    /// What SIGTERM means: `drain` (the node goes away: drain, withdraw, Hard Reset) or
    /// `restart` (graceful-restart peers keep the routes, RFC 8538) [default: drain]
    #[arg(long, env = "HERALD_SHUTDOWN_INTENT", value_name = "drain|restart")]
    pub shutdown_intent: Option<String>,
    /// Time between announcing GRACEFUL_SHUTDOWN (RFC 8326) and withdrawing the routes;
    /// 0s withdraws at once [default: 5s]
    #[arg(long, env = "HERALD_SHUTDOWN_DRAIN", value_name = "DURATION")]
    pub shutdown_drain: Option<String>,
    /// LOCAL_PREF of the drained routes on iBGP sessions [default: 0]
    #[arg(long, env = "HERALD_SHUTDOWN_LOCAL_PREF", value_name = "N")]
    pub shutdown_local_pref: Option<String>,
    /// Prepends of our AS on the drained routes on eBGP sessions, for ToRs that do not
    /// act on GRACEFUL_SHUTDOWN (0-10) [default: 3]
    #[arg(long, env = "HERALD_SHUTDOWN_PREPEND", value_name = "N")]
    pub shutdown_prepend: Option<String>,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`)
    /// [default: 127.0.0.1:50063]
    #[arg(long, env = "HERALD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
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
    let endpoint = control::endpoint(&config)
        .with_context(|| format!("ipam_endpoint {:?}", config.ipam_endpoint.as_str()))?;
    info!(
        node = %node,
        ipam = %config.ipam_endpoint,
        router_id = ?config.router_id,
        "route speaker starting"
    );

    let mut speaker = Speaker::new(node.clone(), config.router_id);
    // Ready once the first snapshot is applied: before it the speaker announces nothing.
    let readiness =
        herald_telemetry::admin::Readiness::not_ready("no route snapshot from herald-ipam yet");
    let (_, admin_task) = herald_telemetry::admin::serve(
        config.admin_listen,
        herald_telemetry::admin::Exposition {
            openmetrics: metrics::registry(speaker.sessions_view(), true),
            plain: metrics::registry(speaker.sessions_view(), false),
        },
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;

    let (message_tx, mut messages) = tokio::sync::mpsc::channel(ROUTE_MESSAGES);
    let resync = Arc::new(tokio::sync::Notify::new());
    let (state_tx, state_rx) = watch::channel(None::<pb::SpeakerState>);
    let tasks = shutdown.child_token();
    let watcher = tokio::spawn(control::watch_node_routes(
        endpoint.clone(),
        node.clone(),
        message_tx,
        Arc::clone(&resync),
        tasks.clone(),
    ));
    let reporter = tokio::spawn(control::report_state(
        endpoint.clone(),
        state_rx,
        config.report_interval,
        tasks.clone(),
    ));

    let interval_ms = u32::try_from(config.report_interval.as_millis()).unwrap_or(u32::MAX);
    let report = |speaker: &Speaker| {
        speaker.state().map(|mut state| {
            state.report_interval_ms = interval_ms;
            state
        })
    };
    let ending = Shutdown {
        intent: config.shutdown_intent,
        drain: config.shutdown_drain,
        local_pref: config.shutdown_local_pref,
        prepend: config.shutdown_prepend,
    };
    let changes = speaker.changes();
    let mut report_at: Option<tokio::time::Instant> = None;
    let mut stream_open = true;
    let mut routes_since_trim = 0;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            received = messages.recv(), if stream_open => {
                let Some(first) = received else {
                    stream_open = false;
                    continue;
                };
                // What else is waiting is applied with it: one hand-over to the sessions.
                let mut batch = vec![first];
                while batch.len() < ROUTE_MESSAGES {
                    match messages.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let summary = speaker.apply_all(&batch).await;
                routes_since_trim += memory::routes_in(&batch);
                drop(batch);
                if let Some(gap) = summary.gap {
                    warn!(error = %gap, "route delta out of order; asking IPAM for a snapshot");
                    resync.notify_one();
                }
                if speaker.applied_revision().is_some() {
                    readiness.set_ready();
                    state_tx.send_replace(report(&speaker));
                    report_at = None;
                }
                // The messages and the report replaced are freed by now.
                if routes_since_trim >= memory::TRIM_AFTER_ROUTES {
                    memory::release_freed_memory();
                    routes_since_trim = 0;
                }
            }
            () = changes.notified() => {
                report_at.get_or_insert_with(|| tokio::time::Instant::now() + REPORT_COALESCE);
            }
            () = sleep_until(report_at) => {
                report_at = None;
                let state = report(&speaker);
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

    info!(intent = ?ending.intent, drain = ?ending.drain, "shutting down: closing BGP sessions");
    tasks.cancel();
    // Said before the sessions close (and before the drain), so the status shows the
    // speaker leaving at once rather than after its reports age out.
    if let Some(mut state) = report(&speaker) {
        state.shutting_down = true;
        control::final_report(&endpoint, state).await;
    }
    let bound = ending.drain + SHUTDOWN_TIMEOUT;
    if tokio::time::timeout(bound, speaker.shutdown(SHUTDOWN_MESSAGE, &ending))
        .await
        .is_err()
    {
        warn!(timeout = ?bound, "BGP sessions did not close in time");
    }
    for task in [watcher, reporter, admin_task] {
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
