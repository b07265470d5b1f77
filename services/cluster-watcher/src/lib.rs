//! `herald-cluster-watcher`: turns Kubernetes Services, EndpointSlices and Nodes into calls
//! to Herald's IPAM and routing services, and writes each Service's addresses, Events and
//! condition back.
//!
//! One replica is active at a time, chosen through a Lease; the others stand by. The
//! watcher keeps no state of its own: on taking the lease it lists everything again, claims
//! the addresses already in Service status, allocates for pending Services and releases
//! allocations whose Service is gone.

mod batch;
pub mod controller;
pub mod crd;
pub mod mapping;
mod metrics;
pub mod policy;
mod rbac;
pub mod resources;
mod retry;
mod slice_index;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use herald_settings::{CommonArgs, HttpEndpoint, Invalid, IpamEndpointArg};
use herald_telemetry::LogFormat;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use mapping::{CONDITION_TYPE, DEFAULT_CLASS};

/// The IPAM service on the same machine, as `herald-ipam` listens by default.
pub const DEFAULT_IPAM_ENDPOINT: &str = herald_settings::DEFAULT_IPAM_ENDPOINT;
/// Allocations are listed and garbage-collected per cluster id; one cluster needs no other.
pub const DEFAULT_CLUSTER_ID: &str = "default";
pub const DEFAULT_LEASE_NAME: &str = "herald-cluster-watcher";
/// Kubernetes' own controllers use 15 s: a dead leader is replaced within about that.
pub const DEFAULT_LEASE_DURATION_SECONDS: u64 = 15;
/// The leader renews this long before its lease runs out (also the clock skew tolerated).
pub const DEFAULT_LEASE_GRACE_SECONDS: u64 = 5;
/// Services handled at once; IPAM calls are short, so a few dozen keep a burst moving.
/// More in flight let a burst's Allocates leave in fewer, larger batches (at 1,000, a burst
/// of 1,000 reached status in 0.7 s instead of 1.4 s), but a restart with every Service
/// holding its address then took 3-5x longer: herald-ipam answers a batch's known owners
/// one after another, so large batches of them serialize. The writes to the API server
/// are bounded on their own (`controller::KUBE_WRITES_IN_FLIGHT`) whatever this is.
pub const DEFAULT_WORKERS: usize = 32;
/// herald-ipam's largest AllocateBatch; in practice the reconciles in flight (`workers`)
/// bound a batch first.
pub const MAX_ALLOCATE_BATCH: usize = 1000;
pub const DEFAULT_ALLOCATE_BATCH_MAX: usize = MAX_ALLOCATE_BATCH;
/// herald-ipam's largest SetServiceEndpointsBatch.
pub const MAX_ENDPOINTS_BATCH: usize = 1000;
pub const DEFAULT_ENDPOINTS_BATCH_MAX: usize = MAX_ENDPOINTS_BATCH;
/// Every Service is handled again this often, repairing anything a lost write left behind.
pub const DEFAULT_RESYNC_SECONDS: u64 = 300;
/// How long a stopping leader may take to hand its lease back.
/// Bound on opening TCP (and the TLS handshake) to IPAM.
const IPAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one call to IPAM until its answer (or a stream's first headers): calls take
/// milliseconds, so one that takes this long met a vanished IPAM, and the worker's retry
/// with backoff has a better chance than waiting on.
const IPAM_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const IPAM_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const IPAM_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The watcher's settings, one key each, read by [`herald_settings::load`]: built-in
/// defaults < the `--config` file < `HERALD_…` environment variables < flags.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The herald-ipam gRPC endpoint (serves herald.ipam.v1.Ipam and herald.routing.v1.Routing).
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
    /// Names this cluster in the IPAM service; allocations are garbage-collected per cluster.
    pub cluster_id: String,
    /// The spec.loadBalancerClass served.
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services that name no class.
    pub default_class: bool,
    /// The Lease that elects the active replica.
    pub lease_name: String,
    /// The Lease's namespace; by default the client's (the pod's, or the kubeconfig context's).
    pub lease_namespace: Option<String>,
    pub lease_duration_seconds: u64,
    pub lease_grace_seconds: u64,
    /// This replica's name in the Lease; by default POD_NAME or HOSTNAME plus a random suffix.
    pub identity: Option<String>,
    pub workers: usize,
    /// Most Allocate requests of concurrent reconciles sent in one AllocateBatch call;
    /// 1 sends one Allocate per Service.
    pub allocate_batch_max: usize,
    /// Most Services' endpoints of concurrent reconciles sent in one
    /// SetServiceEndpointsBatch call; 1 sends one SetServiceEndpoints per Service.
    pub endpoints_batch_max: usize,
    pub resync_seconds: u64,
    /// Also read MetalLB's and/or Cilium's resources as Herald's: `metallb`, `cilium`,
    /// or both comma-separated; empty for none.
    pub import: String,
    pub log_format: LogFormat,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// OTLP/gRPC collector to export spans to; none: no export.
    pub otlp_endpoint: Option<HttpEndpoint>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ipam_endpoint: HttpEndpoint::default_ipam(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            ipam_server_name: None,
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            load_balancer_class: DEFAULT_CLASS.into(),
            default_class: false,
            lease_name: DEFAULT_LEASE_NAME.into(),
            lease_namespace: None,
            lease_duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
            lease_grace_seconds: DEFAULT_LEASE_GRACE_SECONDS,
            identity: None,
            workers: DEFAULT_WORKERS,
            allocate_batch_max: DEFAULT_ALLOCATE_BATCH_MAX,
            endpoints_batch_max: DEFAULT_ENDPOINTS_BATCH_MAX,
            resync_seconds: DEFAULT_RESYNC_SECONDS,
            import: String::new(),
            log_format: LogFormat::default(),
            admin_listen: herald_telemetry::admin::DEFAULT_WATCHER_ADMIN_LISTEN
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
        let invalid = |key, reason: &str| {
            Err(Invalid {
                key,
                reason: reason.into(),
            })
        };
        for (key, value) in [
            ("cluster_id", &self.cluster_id),
            ("load_balancer_class", &self.load_balancer_class),
            ("lease_name", &self.lease_name),
        ] {
            if value.trim().is_empty() {
                return invalid(key, "must not be empty");
            }
        }
        if self.workers == 0 {
            return invalid("workers", "must be at least 1");
        }
        if !(1..=MAX_ALLOCATE_BATCH).contains(&self.allocate_batch_max) {
            return invalid(
                "allocate_batch_max",
                &format!(
                    "must be from 1 (one Allocate per Service) to {MAX_ALLOCATE_BATCH} \
                     (herald-ipam's largest AllocateBatch)"
                ),
            );
        }
        if !(1..=MAX_ENDPOINTS_BATCH).contains(&self.endpoints_batch_max) {
            return invalid(
                "endpoints_batch_max",
                &format!(
                    "must be from 1 (one SetServiceEndpoints per Service) to \
                     {MAX_ENDPOINTS_BATCH} (herald-ipam's largest SetServiceEndpointsBatch)"
                ),
            );
        }
        if self.resync_seconds == 0 {
            return invalid("resync_seconds", "must be at least 1");
        }
        if let Err(reason) = policy::Imports::parse(&self.import) {
            return invalid("import", &reason);
        }
        if self.lease_grace_seconds >= self.lease_duration_seconds {
            return invalid(
                "lease_grace_seconds",
                "must be less than lease_duration_seconds (the leader renews this long before \
                 its lease runs out)",
            );
        }
        Ok(())
    }
}

/// Herald cluster watcher: Kubernetes LoadBalancer Services to IPAM allocations and routes.
///
/// Every setting is read from the `--config` file, the `HERALD_…` environment variable
/// and the flag of the same name, the flag winning.
#[derive(Debug, clap::Parser)]
#[command(
    name = "herald-cluster-watcher",
    version,
    after_help = "Kubernetes access: KUBECONFIG, else ~/.kube/config, else the in-cluster \
                  service account."
)]
pub struct Args {
    #[command(flatten)]
    pub ipam_endpoint: IpamEndpointArg,
    #[command(flatten)]
    pub ipam_tls: herald_settings::IpamTlsArgs,
    /// Names this cluster in the IPAM service; allocations are garbage-collected per
    /// cluster [default: default]
    #[arg(long, env = "HERALD_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// The spec.loadBalancerClass served [default: herald.io/bgp]
    #[arg(long, env = "HERALD_LOAD_BALANCER_CLASS", value_name = "CLASS")]
    pub load_balancer_class: Option<String>,
    /// Also serve LoadBalancer Services that name no class (`--default-class` alone means
    /// true) [default: false]
    #[arg(long, env = "HERALD_DEFAULT_CLASS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub default_class: Option<String>,
    /// The Lease that elects the active replica [default: herald-cluster-watcher]
    #[arg(long, env = "HERALD_LEASE_NAME", value_name = "NAME")]
    pub lease_name: Option<String>,
    /// The Lease's namespace; by default the client's (the pod's, or the kubeconfig
    /// context's)
    #[arg(long, env = "HERALD_LEASE_NAMESPACE", value_name = "NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a Lease holds without renewal; a dead leader is replaced within about this
    /// [default: 15]
    #[arg(long, env = "HERALD_LEASE_DURATION_SECONDS", value_name = "SECONDS")]
    pub lease_duration_seconds: Option<String>,
    /// The leader renews this long before its Lease runs out (also the clock skew
    /// tolerated) [default: 5]
    #[arg(long, env = "HERALD_LEASE_GRACE_SECONDS", value_name = "SECONDS")]
    pub lease_grace_seconds: Option<String>,
    /// This replica's name in the Lease; by default POD_NAME or HOSTNAME plus a random
    /// suffix
    #[arg(long, env = "HERALD_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// Services handled at once [default: 32]
    #[arg(long, env = "HERALD_WORKERS", value_name = "N")]
    pub workers: Option<String>,
    /// Most Allocate requests of concurrent reconciles sent in one AllocateBatch call; 1
    /// sends one Allocate per Service [default: 1000]
    #[arg(long, env = "HERALD_ALLOCATE_BATCH_MAX", value_name = "N")]
    pub allocate_batch_max: Option<String>,
    /// Most Services' endpoints of concurrent reconciles sent in one
    /// SetServiceEndpointsBatch call; 1 sends one SetServiceEndpoints per Service
    /// [default: 1000]
    #[arg(long, env = "HERALD_ENDPOINTS_BATCH_MAX", value_name = "N")]
    pub endpoints_batch_max: Option<String>,
    /// Every Service is handled again this often, repairing anything a lost write left
    /// behind [default: 300]
    #[arg(long, env = "HERALD_RESYNC_SECONDS", value_name = "SECONDS")]
    pub resync_seconds: Option<String>,
    /// Also read MetalLB's (IPAddressPool, BGPPeer, BGPAdvertisement) and/or Cilium's
    /// (CiliumLoadBalancerIPPool) resources as Herald's: `--import metallb`, `--import
    /// cilium`, both, or `metallb,cilium`; empty for none
    #[arg(long, env = "HERALD_IMPORT", value_name = "metallb|cilium", action = clap::ArgAction::Append)]
    pub import: Vec<String>,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`)
    /// [default: 127.0.0.1:50062]
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

fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "herald-cluster-watcher".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Stands by for the Lease and works while holding it, until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A standby is ready (it has nothing to sync and stands ready to take over); the
    // leader is ready once its caches are synced and the start-up pass is done.
    let readiness = herald_telemetry::admin::Readiness::not_ready("no Lease decision yet");
    let (_, admin_task) = herald_telemetry::admin::serve(
        config.admin_listen,
        herald_telemetry::admin::Exposition {
            openmetrics: metrics::registry(),
            plain: metrics::registry(),
        },
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    // KUBECONFIG, ~/.kube/config or the in-cluster service account, as kube-rs infers.
    let client = kube::Client::try_default()
        .await
        .context("configure the Kubernetes client")?;
    let channel = config
        .ipam_client(IPAM_CONNECT_TIMEOUT)
        .with_context(|| format!("ipam_endpoint {:?}", config.ipam_endpoint.as_str()))?
        .with(|e| {
            // No worker hangs on a vanished IPAM: each call has a deadline, and HTTP/2
            // pings notice a dead connection (host gone, no RST) within seconds.
            e.timeout(IPAM_REQUEST_TIMEOUT)
                .http2_keep_alive_interval(IPAM_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(IPAM_KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true)
        })
        .connect_lazy();
    let identity = config.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = config
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let settings = controller::Settings {
        cluster_id: config.cluster_id.clone(),
        classes: mapping::ClassPolicy {
            class: config.load_balancer_class.clone(),
            default_class: config.default_class,
        },
        workers: config.workers,
        allocate_batch_max: config.allocate_batch_max,
        endpoints_batch_max: config.endpoints_batch_max,
        identity: identity.clone(),
        resync: Duration::from_secs(config.resync_seconds.max(1)),
        // Checked when the settings were read.
        imports: policy::Imports::parse(&config.import).unwrap_or_default(),
        readiness: readiness.clone(),
    };
    info!(
        identity = %identity,
        lease = %format!("{lease_namespace}/{}", config.lease_name),
        class = %config.load_balancer_class,
        default_class = config.default_class,
        cluster_id = %config.cluster_id,
        "standing by for the lease"
    );
    let manager = LeaseManagerBuilder::new(client.clone(), config.lease_name.clone())
        .with_namespace(lease_namespace)
        .with_identity(identity)
        .with_duration(config.lease_duration_seconds)
        .with_grace(config.lease_grace_seconds)
        .build()
        .await
        .context("set up the lease")?;
    let (mut leader, lease_task) = manager.watch().await;

    'standby: loop {
        metrics::METRICS.leader.set(0);
        readiness.set_ready();
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() {
                    anyhow::bail!("the lease manager stopped");
                },
                () = shutdown.cancelled() => break 'standby,
            }
        }
        info!("holding the lease; starting work");
        // Not ready before the leader flag shows: whoever sees the flag sees the start-up
        // pass in the readiness too.
        readiness.set_not_ready("leading: caches not synced yet");
        metrics::METRICS.leader.set(1);
        let work = shutdown.child_token();
        let lost = async {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break 'standby,
            result = controller::run(client.clone(), channel.clone(), settings.clone(), work.clone()) => {
                work.cancel();
                if let Err(e) = result {
                    warn!(error = %e, "work stopped; starting again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            () = lost => {
                work.cancel();
                warn!("lost the lease; standing by");
            }
        }
    }

    // Closing the channel makes the manager hand the lease back, so a standby takes over
    // at once instead of after the lease runs out.
    drop(leader);
    match tokio::time::timeout(LEASE_RELEASE_TIMEOUT, lease_task).await {
        Ok(Ok(Ok(_))) => info!("lease released"),
        Ok(Ok(Err(e))) => warn!(error = %e, "could not release the lease"),
        Ok(Err(e)) => warn!(error = %e, "the lease task failed"),
        Err(_) => warn!("releasing the lease timed out"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn import_may_be_given_twice() {
        use clap::FromArgMatches;
        let matches = Args::command().get_matches_from([
            "herald-cluster-watcher",
            "--import",
            "metallb",
            "--import",
            "cilium",
        ]);
        let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{e}"));
        let config: Config =
            herald_settings::load(&matches, &args.common).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.import, "metallb,cilium");
        assert_eq!(
            policy::Imports::parse(&config.import),
            Ok(policy::Imports {
                metallb: true,
                cilium: true
            })
        );
    }

    #[test]
    fn every_setting_has_a_flag_an_env_and_a_readme_row() {
        herald_settings::check_binary::<Config>(
            &Args::command(),
            include_str!("../../../README.md"),
            "herald-cluster-watcher",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
