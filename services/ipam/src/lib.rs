//! `herald-ipam`: the centre of Herald. It owns pools, allocations and their history, and
//! serves them over gRPC (`herald.ipam.v1.Ipam`) with reflection and health.

mod authz;
mod changes;
mod compaction;
mod convert;
#[cfg(test)]
mod convert_properties;
mod decode_refusal;
mod error;
mod feed;
mod ipam;
mod limits;
mod metrics;
mod page_token;
mod routing;
#[doc(hidden)]
pub use routing::{cluster_probe, memory_probe};
mod service;
mod supervise;
mod writer;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use herald_api::ipam::v1::ipam_server::IpamServer;
use herald_api::routing::v1::routing_server::RoutingServer;
use herald_ipam_store::{Store, StoreError};
use herald_settings::{CommonArgs, DatabaseUrl, HttpEndpoint, Invalid};
use herald_telemetry::LogFormat;
use herald_telemetry::admin::Readiness;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use error::IpamError;
pub use ipam::{Ipam, MAX_BATCH};
pub use service::IpamService;

/// Where the service listens unless told otherwise: loopback, so a laptop run exposes
/// nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Largest request message accepted: 16 KiB for each of the 1,000 Services of a full
/// AllocateBatch (a Service with 40 long labels takes about 5 KiB), so the batch's item
/// count is the limit a caller meets. A larger message is refused with
/// RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// How long in-flight calls may run on after SIGTERM. Well inside Kubernetes' default
/// 30 s termination grace, long enough for any unary call to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the store is probed while it answers. With the probe's own timeout (0.5 s)
/// health turns NOT_SERVING within about a second of the database going away.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait between probes while the store is away, so that health turns SERVING
/// within about a second of its return. One `SELECT 1` a second is nothing to a server.
const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts to open the store at start. The jitter that keeps
/// replicas from retrying in step adds up to as much again as the exponential delay, so
/// that delay is capped at half of this.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// How long closing the store's connections may take at shutdown; with the database away
/// they cannot close politely, and shutdown must not wait for them.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
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
    /// How long superseded routing-input rows stay in the change log before compaction
    /// deletes them.
    #[serde(with = "herald_settings::duration")]
    pub events_retention: Duration,
    /// How routes are recomputed on a change: `incremental` (only what the change touches)
    /// or `full` (every node × every Service, the engine before it; kept as the benchmark's
    /// comparator).
    pub route_engine: routing::EngineKind,
    /// Route changes a WatchNodeRoutes stream that applies deltas may fall behind by; a
    /// stream further behind is sent a fresh full snapshot instead.
    pub route_stream_buffer: usize,
    pub log_format: LogFormat,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// OTLP/gRPC collector to export spans to; none: no export.
    pub otlp_endpoint: Option<HttpEndpoint>,
    /// This server's certificate chain (PEM); with `tls_key` and `tls_client_ca` it turns
    /// on mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA bundle (PEM) client certificates must chain to.
    pub tls_client_ca: Option<PathBuf>,
    /// The SPIFFE trust domain (or DNS suffix) of the identities in client certificates.
    pub trust_domain: String,
    /// Serve plaintext on a non-loopback address (no certificates, no authorization).
    pub allow_plaintext: bool,
    /// Longest a call may take before it is cancelled (a client's shorter deadline wins).
    #[serde(with = "herald_settings::duration")]
    pub rpc_timeout: Duration,
    /// Calls in flight across all connections; beyond it calls get RESOURCE_EXHAUSTED.
    pub max_concurrent_rpcs: usize,
    /// Open Watch and WatchNodeRoutes streams; beyond it they get RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// Allocate and AllocateBatch calls a second per mTLS identity.
    pub allocate_rate: NonZeroU32,
    /// HTTP/2 PING interval that detects dead clients.
    #[serde(with = "herald_settings::duration")]
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "herald_settings::duration")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("DEFAULT_LISTEN is an address")),
            database_url: None,
            events_retention: compaction::DEFAULT_RETENTION,
            route_engine: routing::EngineKind::default(),
            route_stream_buffer: DEFAULT_ROUTE_STREAM_BUFFER,
            log_format: LogFormat::default(),
            admin_listen: herald_telemetry::admin::DEFAULT_IPAM_ADMIN_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("the default admin address is an address")),
            otlp_endpoint: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            trust_domain: herald_tls::DEFAULT_TRUST_DOMAIN.into(),
            allow_plaintext: false,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            max_concurrent_rpcs: DEFAULT_MAX_CONCURRENT_RPCS,
            max_watch_streams: DEFAULT_MAX_WATCH_STREAMS,
            allocate_rate: DEFAULT_ALLOCATE_RATE,
            http2_keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// Calls finish in milliseconds; one that takes this long is stuck (on a store that
/// stopped answering), and its caller's retry has a better chance.
const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Far above what one watcher and a few hundred speakers need at once, far below what
/// exhausts memory or the store's pool queue.
const DEFAULT_MAX_CONCURRENT_RPCS: usize = 4096;
/// One per speaker (one per node) and a few for watchers and tools.
const DEFAULT_MAX_WATCH_STREAMS: usize = 2048;
/// A speaker applies a delta in well under a millisecond, so 64 queued changes mean it is
/// stuck or its link is; one snapshot then costs less than the deltas, and the queues of
/// a thousand nodes stay small.
const DEFAULT_ROUTE_STREAM_BUFFER: usize = 64;
/// Well above the watcher's peak (a burst of new Services), well below draining a /16
/// in a second.
const DEFAULT_ALLOCATE_RATE: NonZeroU32 = NonZeroU32::new(2000).expect("non-zero");
/// A dead client (its host gone, no RST) is noticed within interval + timeout.
const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl Config {
    /// The certificate files, when all three are set.
    fn tls_files(&self) -> Option<herald_tls::TlsFiles> {
        Some(herald_tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_client_ca.clone()?,
        })
    }
}

impl herald_settings::Settings for Config {
    fn validate(&self) -> Result<(), Invalid> {
        // Compacted rows must be ones every replica's feed has long passed: the retention
        // must dwarf the feed's poll interval.
        if self.events_retention < compaction::MIN_RETENTION {
            return Err(Invalid {
                key: "events_retention",
                reason: format!(
                    "at least {:?} (the change feed polls every {:?}; compacting rows a feed has not read yet would make it wait on holes)",
                    compaction::MIN_RETENTION,
                    feed::POLL_INTERVAL,
                ),
            });
        }
        herald_settings::check_tls_trio([
            ("tls_cert", self.tls_cert.is_some()),
            ("tls_key", self.tls_key.is_some()),
            ("tls_client_ca", self.tls_client_ca.is_some()),
        ])?;
        if self.tls_files().is_none() && !self.listen.ip().is_loopback() && !self.allow_plaintext {
            return Err(Invalid {
                key: "listen",
                reason: "a non-loopback address needs mutual TLS (tls_cert, tls_key, tls_client_ca); plaintext there would let anyone who reaches the port rewrite pools and read BGP passwords. Set allow_plaintext = true to accept that".into(),
            });
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(Invalid {
                key: "trust_domain",
                reason: "a domain name like herald.local".into(),
            });
        }
        for (key, value) in [
            ("max_concurrent_rpcs", self.max_concurrent_rpcs),
            ("max_watch_streams", self.max_watch_streams),
            ("route_stream_buffer", self.route_stream_buffer),
        ] {
            if value == 0 {
                return Err(Invalid {
                    key,
                    reason: "at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

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
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`)
    /// [default: 127.0.0.1:50061]
    #[arg(long, env = "HERALD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// How long superseded node, endpoint and policy rows stay in the change log before
    /// compaction deletes them (`30s`, `5m`); at least 1s [default: 5m]
    #[arg(long, env = "HERALD_EVENTS_RETENTION", value_name = "DURATION")]
    pub events_retention: Option<String>,
    /// This server's certificate chain (PEM); with --tls-key and --tls-client-ca it turns on
    /// mutual TLS. Reloaded when the file changes
    #[arg(long, env = "HERALD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, env = "HERALD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// The CA bundle (PEM) client certificates must chain to
    #[arg(long, env = "HERALD_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<String>,
    /// Trust domain of the identities in client certificates
    /// (spiffe://DOMAIN/herald/ROLE) [default: herald.local]
    #[arg(long, env = "HERALD_TRUST_DOMAIN", value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// Serve plaintext on a non-loopback address (`--allow-plaintext` alone means true)
    /// [default: false]
    #[arg(long, env = "HERALD_ALLOW_PLAINTEXT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_plaintext: Option<String>,
    /// Longest a call may run before it is cancelled [default: 30s]
    #[arg(long, env = "HERALD_RPC_TIMEOUT", value_name = "DURATION")]
    pub rpc_timeout: Option<String>,
    /// Calls in flight at once; more get RESOURCE_EXHAUSTED [default: 4096]
    #[arg(long, env = "HERALD_MAX_CONCURRENT_RPCS", value_name = "N")]
    pub max_concurrent_rpcs: Option<String>,
    /// Open Watch and WatchNodeRoutes streams; more get RESOURCE_EXHAUSTED [default: 2048]
    #[arg(long, env = "HERALD_MAX_WATCH_STREAMS", value_name = "N")]
    pub max_watch_streams: Option<String>,
    /// Allocate calls a second per mTLS identity [default: 2000]
    #[arg(long, env = "HERALD_ALLOCATE_RATE", value_name = "N")]
    pub allocate_rate: Option<String>,
    /// HTTP/2 PING interval that detects dead clients [default: 20s]
    #[arg(long, env = "HERALD_HTTP2_KEEPALIVE_INTERVAL", value_name = "DURATION")]
    pub http2_keepalive_interval: Option<String>,
    /// How long a PING may go unanswered [default: 10s]
    #[arg(long, env = "HERALD_HTTP2_KEEPALIVE_TIMEOUT", value_name = "DURATION")]
    pub http2_keepalive_timeout: Option<String>,
    /// `incremental` recomputes only the routes a change touches; `full` recomputes every
    /// node × every Service on each change [default: incremental]
    #[arg(long, env = "HERALD_ROUTE_ENGINE", value_name = "ENGINE")]
    pub route_engine: Option<String>,
    /// Route changes a WatchNodeRoutes stream sending deltas may fall behind by before it
    /// is sent a fresh full snapshot [default: 64]
    #[arg(long, env = "HERALD_ROUTE_STREAM_BUFFER", value_name = "N")]
    pub route_stream_buffer: Option<String>,
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
    // Ready once the store is open and migrated and answers; keep_health follows it.
    let readiness = Readiness::not_ready("the store is not open yet");
    let (admin, admin_task) = herald_telemetry::admin::serve(
        config.admin_listen,
        herald_telemetry::admin::Exposition {
            openmetrics: metrics::registry(Arc::clone(&slot)),
            plain: metrics::registry(Arc::clone(&slot)),
        },
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    let service = IpamService::new(Arc::clone(&slot), shutdown.clone());
    let routing_slot: Arc<OnceLock<routing::Ready>> = Arc::new(OnceLock::new());
    let routing_service = routing::RoutingService::new(
        Arc::clone(&routing_slot),
        shutdown.clone(),
        config.route_stream_buffer,
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl builds that can be installed here only speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let supervisor = supervise::Supervisor::new(shutdown.clone(), reporter.clone());
    let startup = {
        let shutdown = shutdown.clone();
        let reporter = reporter.clone();
        let readiness = readiness.clone();
        let url = config.database_url.as_ref().map(|u| u.expose().to_string());
        let retention = config.events_retention;
        let engine_kind = config.route_engine;
        let supervisor = supervisor.clone();
        supervisor.clone().spawn("startup and health", async move {
            // A store that can never open is the process's failure: the supervisor exits
            // non-zero with the reason.
            let Some(store) = open_store(url.as_deref(), &shutdown).await? else {
                return Ok(());
            };
            let started = std::time::Instant::now();
            // Both the index and the route engine load from one settled revision, which
            // the feed then follows from.
            let revision = feed::settled_revision(&store)
                .await
                .context("reading the change log's revision")?;
            let (ipam, engine) = load_state(&store, revision).await?;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "state loaded; serving once the store answers a probe"
            );
            let _ = slot.set(Arc::clone(&ipam));
            let _ = routing_slot.set(routing::Ready {
                ipam: Arc::clone(&ipam),
                engine: Arc::clone(&engine),
            });
            supervisor.spawn("route engine", {
                let engine = routing::run_engine(
                    engine,
                    Arc::clone(&ipam),
                    engine_kind,
                    shutdown.clone(),
                );
                async move {
                    engine.await;
                    Ok::<(), std::convert::Infallible>(())
                }
            });
            supervisor.spawn(
                "change feed",
                feed::follow(Arc::clone(&ipam), shutdown.clone()),
            );
            supervisor.spawn(
                "change-log compaction",
                compaction::run(Arc::clone(&ipam), retention, shutdown.clone()),
            );
            supervisor.spawn("group-commit writer", {
                let (ipam, shutdown) = (Arc::clone(&ipam), shutdown.clone());
                async move {
                    tokio::select! {
                        () = shutdown.cancelled() => Ok(()),
                        () = ipam.writer_stopped() => Err("stopped taking commits (its panic is logged above)"),
                    }
                }
            });
            keep_health(ipam, reporter, readiness, shutdown).await;
            Ok::<(), anyhow::Error>(())
        })
    };

    let tls = match config.tls_files() {
        Some(files) => {
            let reloading = herald_tls::Reloading::load(files).context("mutual TLS")?;
            let _reload = reloading.watch();
            Some(reloading.server_config().context("mutual TLS")?)
        }
        None => None,
    };
    info!(listen = %local, admin = %admin, mtls = tls.is_some(), "herald-ipam serving");
    let limits = limits::LimitsLayer::new(limits::Limits {
        max_concurrent_rpcs: config.max_concurrent_rpcs,
        max_watch_streams: config.max_watch_streams,
        allocate_rate: config.allocate_rate,
    });
    let router = tonic::transport::Server::builder()
        // tonic's own deadline (the client's `grpc-timeout` if shorter) and keepalive.
        .timeout(config.rpc_timeout)
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        // Outermost, so it counts the status the caller sees.
        .layer(metrics::RpcMetricsLayer)
        .layer(decode_refusal::layer())
        // Each RPC's server span, a child of the caller's span (W3C trace context).
        .layer(herald_telemetry::trace::ExtractLayer)
        // Inside the span, so a refusal is traced and counted like any other answer.
        .layer(authz::AuthzLayer::new(&config.trust_domain))
        // After authorization: the Allocate rate is per identity.
        .layer(limits)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(IpamServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(
            RoutingServer::new(routing_service).max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            herald_tls::incoming(listener, tls),
            shutdown.clone().cancelled_owned(),
        )),
        // TCP_NODELAY: a response goes out as several small HTTP/2 frames, and Nagle's
        // algorithm against the client's delayed ACK stalled them for 40 ms.
        None => Box::pin(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        )),
    };
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
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, admin_task).await;
    if let Some(failure) = supervisor.failure() {
        anyhow::bail!(failure);
    }
    info!("herald-ipam stopped");
    Ok(())
}

/// Opens the store, retrying with backoff while the database is unreachable: a
/// Kubernetes Deployment usually starts before its database is ready. Each failure is
/// logged at once with where and why. `Ok(None)` on shutdown; an error that retrying
/// cannot mend (a URL that cannot work, an embedded file that cannot be written) ends
/// the process.
async fn open_store(
    url: Option<&str>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let opening = (|| Store::open(url))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(MAX_CONNECT_BACKOFF / 2)
                .with_jitter()
                .without_max_times(),
        )
        .sleep(tokio::time::sleep)
        .when(|e: &StoreError| !e.is_permanent())
        .notify(|e, retry_in| warn!(error = %e, ?retry_in, "cannot open the store"));
    // Shutdown must not wait for a connection attempt.
    tokio::select! {
        () = shutdown.cancelled() => Ok(None),
        opened = opening => match opened {
            Ok(store) => {
                info!(backend = ?store.backend(), database = store.target(), "store open and migrated");
                Ok(Some(store))
            }
            Err(e) => {
                tracing::error!(error = %e, "the store cannot be opened with this configuration");
                Err(anyhow::Error::new(e).context("cannot open the store"))
            }
        },
    }
}

/// Loads the allocation index and the route engine's inputs as of `revision`, reading the
/// allocations once for both: on SQLite's single connection two reads would take turns,
/// and on Postgres they would share the same two cores. The engine keeps each owner's uid
/// as the index does, one copy for both.
async fn load_state(
    store: &Store,
    revision: i64,
) -> anyhow::Result<(Arc<Ipam>, Arc<routing::RouteEngine>)> {
    let started = std::time::Instant::now();
    let claims = store
        .claim_count()
        .await
        .context("counting the allocations")?;
    let (mut index, mut routes) = tokio::try_join!(
        async {
            ipam::IndexLoading::start(store, claims)
                .await
                .context("loading pools")
        },
        async {
            routing::Loading::start(store, revision, claims)
                .await
                .context("loading routing inputs")
        },
    )?;
    let addresses = store
        .each_held_address(|held| {
            for claim in held.claims() {
                index.claim(claim);
            }
            let uid = index.owner_key(&held.allocation.owner.uid);
            routes.allocation(held.allocation, uid);
        })
        .await
        .context("loading allocations")?;
    let index = index.finish(store).await.context("restoring quarantines")?;
    info!(
        addresses,
        claims = index.claim_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "allocations loaded"
    );
    Ok((
        Ipam::with_index(store.clone(), index, revision),
        routes.finish(),
    ))
}

/// SERVING while the store answers, NOT_SERVING while it does not: a probe every
/// [`PROBE_INTERVAL`] (or at once when a request met a broken connection), and while the
/// store is away, probes with backoff up to [`MAX_PROBE_BACKOFF`] until it answers.
async fn keep_health(
    ipam: Arc<Ipam>,
    reporter: tonic_health::server::HealthReporter,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let store = ipam.store();
    let set = |status| {
        let reporter = reporter.clone();
        match status {
            ServingStatus::Serving => readiness.set_ready(),
            _ => readiness.set_not_ready(format!("the store ({}) does not answer", store.target())),
        }
        async move {
            reporter.set_service_status("", status).await;
            reporter.set_service_status(IPAM_SERVICE_NAME, status).await;
            reporter
                .set_service_status(ROUTING_SERVICE_NAME, status)
                .await;
        }
    };
    let mut serving = false;
    loop {
        let probed = tokio::select! {
            () = shutdown.cancelled() => break,
            probed = store.probe() => probed,
        };
        if probed.is_ok() && !serving {
            set(ServingStatus::Serving).await;
            serving = true;
        }
        if let Err(e) = probed {
            warn!(database = store.target(), error = %e, "store unreachable; NOT_SERVING until it answers");
            set(ServingStatus::NotServing).await;
            let away_since = std::time::Instant::now();
            let back = (|| store.probe())
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(MAX_PROBE_BACKOFF)
                        .without_max_times(),
                )
                .sleep(tokio::time::sleep)
                .notify(
                    |e, retry_in| tracing::debug!(error = %e, ?retry_in, "store still unreachable"),
                );
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = back => {}
            }
            info!(database = store.target(), away = ?away_since.elapsed(), "store reachable again; SERVING");
            set(ServingStatus::Serving).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
            () = store.probe_wanted() => {}
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    readiness.set_not_ready("shutting down");
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, store.close()).await;
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
            "herald-ipam",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_retention_the_feed_could_lag_behind_is_refused() {
        use herald_settings::Settings;
        let short = Config {
            events_retention: Duration::from_millis(500),
            ..Config::default()
        };
        let refused = short.validate().expect_err("500ms is too short");
        assert_eq!(refused.key, "events_retention");
        assert!(refused.reason.contains("at least 1s"), "{}", refused.reason);
        let shortest = Config {
            events_retention: compaction::MIN_RETENTION,
            ..Config::default()
        };
        assert!(shortest.validate().is_ok());
        assert!(Config::default().validate().is_ok());
    }
}
