//! `herald-ipam`: the centre of Herald. It owns pools, allocations and their history, and
//! serves them over gRPC (`herald.ipam.v1.Ipam`) with reflection and health.

mod convert;
mod error;
mod feed;
mod ipam;
mod routing;
mod service;
mod writer;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use herald_api::ipam::v1::ipam_server::IpamServer;
use herald_api::routing::v1::routing_server::RoutingServer;
use herald_ipam_store::Store;
use herald_settings::{CommonArgs, DatabaseUrl};
use herald_telemetry::LogFormat;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use error::IpamError;
pub use ipam::{Ipam, MAX_BATCH};
pub use service::IpamService;

/// Where the service listens unless told otherwise: loopback, so a laptop run exposes
/// nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Largest request accepted. A full AllocateBatch of 1,000 Services fits comfortably;
/// anything larger is refused before it is decoded.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// How long in-flight calls may run on after SIGTERM. Well inside Kubernetes' default
/// 30 s termination grace, long enough for any unary call to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the store is pinged to keep the health status true.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between attempts to open the store at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
const IPAM_SERVICE_NAME: &str = "herald.ipam.v1.Ipam";
const ROUTING_SERVICE_NAME: &str = "herald.routing.v1.Routing";

/// herald-ipam's settings, one key each, read by [`herald_settings::load`]: built-in
/// defaults < the `--config` file < `HERALD_…` environment variables < flags.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// `postgres://…` for production; without it an embedded SQLite file
    /// (`herald-ipam.db` in the working directory).
    pub database_url: Option<DatabaseUrl>,
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("DEFAULT_LISTEN is an address")),
            database_url: None,
            log_format: LogFormat::default(),
        }
    }
}

impl herald_settings::Settings for Config {}

/// Herald IPAM: LoadBalancer address pools and allocations over gRPC.
///
/// Every setting is read from the `--config` file, the `HERALD_…` environment variable
/// and the flag of the same name, the flag winning.
#[derive(Debug, clap::Parser)]
#[command(name = "herald-ipam", version)]
pub struct Args {
    /// Address to serve gRPC on [default: 127.0.0.1:50051]
    #[arg(long, env = "HERALD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// `postgres://user:password@host:5432/db` for production (also `sqlite://FILE?mode=rwc`);
    /// without it an embedded SQLite file `herald-ipam.db` in the working directory
    #[arg(
        long,
        env = "HERALD_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl AsRef<CommonArgs> for Args {
    fn as_ref(&self) -> &CommonArgs {
        &self.common
    }
}

/// Serves until `shutdown` is cancelled, then lets in-flight calls finish and ends the
/// Watch streams.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(IPAM_SERVICE_NAME, ServingStatus::NotServing)
        .await;

    let slot: Arc<OnceLock<Arc<Ipam>>> = Arc::new(OnceLock::new());
    let service = IpamService::new(Arc::clone(&slot), shutdown.clone());
    let routing_slot: Arc<OnceLock<routing::Ready>> = Arc::new(OnceLock::new());
    let routing_service = routing::RoutingService::new(Arc::clone(&routing_slot), shutdown.clone());
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl builds that can be installed here only speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let startup = {
        let shutdown = shutdown.clone();
        let reporter = reporter.clone();
        let url = config.database_url.as_ref().map(|u| u.expose().to_string());
        tokio::spawn(async move {
            let Some(store) = open_store(url.as_deref(), &shutdown).await else {
                return;
            };
            let ipam = match Ipam::open(store).await {
                Ok(ipam) => ipam,
                Err(e) => {
                    warn!(error = %e, "loading pools and allocations failed; shutting down");
                    shutdown.cancel();
                    return;
                }
            };
            let engine =
                match routing::RouteEngine::load(ipam.store(), ipam.feed().delivered()).await {
                    Ok(engine) => engine,
                    Err(e) => {
                        warn!(error = %e, "loading routing inputs failed; shutting down");
                        shutdown.cancel();
                        return;
                    }
                };
            let _ = slot.set(Arc::clone(&ipam));
            let _ = routing_slot.set(routing::Ready {
                ipam: Arc::clone(&ipam),
                engine: Arc::clone(&engine),
            });
            tokio::spawn(routing::run_engine(
                engine,
                Arc::clone(&ipam),
                shutdown.clone(),
            ));
            tokio::spawn(feed::follow(Arc::clone(&ipam), shutdown.clone()));
            keep_health(ipam, reporter, shutdown).await;
        })
    };

    info!(listen = %local, "herald-ipam serving");
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(IpamServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(
            RoutingServer::new(routing_service).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        // TCP_NODELAY: a response goes out as several small HTTP/2 frames, and Nagle's
        // algorithm against the client's delayed ACK stalled them for 40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);
    tokio::select! {
        result = &mut server => result.context("gRPC server task")?.context("gRPC server")?,
        () = shutdown.cancelled() => {
            // Graceful HTTP/2 shutdown waits for every client to acknowledge GOAWAY; a
            // client that never does must not keep the process alive past the grace.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result.context("gRPC server task")?.context("gRPC server")?,
                Err(_) => {
                    warn!(grace = ?SHUTDOWN_GRACE, "clients still connected after the shutdown grace; closing anyway");
                    server.abort();
                }
            }
        }
    }
    shutdown.cancel();
    let _ = startup.await;
    info!("herald-ipam stopped");
    Ok(())
}

/// Opens the store, retrying with backoff while the database is unreachable: a
/// Kubernetes Deployment usually starts before its database is ready.
async fn open_store(url: Option<&str>, shutdown: &CancellationToken) -> Option<Store> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match Store::open(url).await {
            Ok(store) => {
                info!(backend = ?store.backend(), "store open and migrated");
                return Some(store);
            }
            Err(e) => warn!(error = %e, retry_in = ?backoff, "cannot open the store"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
    }
}

/// SERVING while the store answers, NOT_SERVING while it does not.
async fn keep_health(
    ipam: Arc<Ipam>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    loop {
        let status = match ipam.store().ping().await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                warn!(error = %e, "store unreachable");
                ServingStatus::NotServing
            }
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(IPAM_SERVICE_NAME, status).await;
        reporter
            .set_service_status(ROUTING_SERVICE_NAME, status)
            .await;
        tokio::select! {
            () = shutdown.cancelled() => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                ipam.store().close().await;
                return;
            }
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_setting_has_a_flag_and_an_env_of_its_name() {
        herald_settings::check_flags::<Config>(&Args::command()).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn every_setting_is_in_the_readme() {
        let readme = include_str!("../../../README.md");
        herald_settings::check_readme::<Config>(readme, "herald-ipam")
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
