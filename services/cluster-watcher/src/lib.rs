//! `herald-cluster-watcher`: turns Kubernetes Services, EndpointSlices and Nodes into calls
//! to Herald's IPAM and routing services, and writes each Service's addresses, Events and
//! condition back.
//!
//! One replica is active at a time, chosen through a Lease; the others stand by. The
//! watcher keeps no state of its own: on taking the lease it lists everything again, claims
//! the addresses already in Service status, allocates for pending Services and releases
//! allocations whose Service is gone.

pub mod controller;
pub mod mapping;
mod queue;
mod slice_index;

use std::time::Duration;

use anyhow::Context;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use mapping::{CONDITION_TYPE, DEFAULT_CLASS};

/// The IPAM service on the same machine, as `herald-ipam` listens by default.
pub const DEFAULT_IPAM_ENDPOINT: &str = "http://127.0.0.1:50051";
/// Allocations are listed and garbage-collected per cluster id; one cluster needs no other.
pub const DEFAULT_CLUSTER_ID: &str = "default";
pub const DEFAULT_LEASE_NAME: &str = "herald-cluster-watcher";
/// Kubernetes' own controllers use 15 s: a dead leader is replaced within about that.
pub const DEFAULT_LEASE_DURATION_SECONDS: u64 = 15;
/// The leader renews this long before its lease runs out (also the clock skew tolerated).
pub const DEFAULT_LEASE_GRACE_SECONDS: u64 = 5;
/// Services handled at once; IPAM calls are short, so a few dozen keep a burst moving.
pub const DEFAULT_WORKERS: usize = 32;
/// Every Service is handled again this often, repairing anything a lost write left behind.
pub const DEFAULT_RESYNC_SECONDS: u64 = 300;
/// How long a stopping leader may take to hand its lease back.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The herald-ipam gRPC endpoint (serves herald.ipam.v1.Ipam and herald.routing.v1.Routing).
    #[arg(long, env = "HERALD_IPAM_ENDPOINT", default_value = DEFAULT_IPAM_ENDPOINT)]
    pub ipam_endpoint: String,
    /// Names this cluster in the IPAM service; allocations are garbage-collected per cluster.
    #[arg(long, env = "HERALD_CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// The spec.loadBalancerClass served.
    #[arg(long, env = "HERALD_LOAD_BALANCER_CLASS", default_value = DEFAULT_CLASS)]
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services that name no class.
    #[arg(long, env = "HERALD_DEFAULT_CLASS")]
    pub default_class: bool,
    /// The Lease that elects the active replica.
    #[arg(long, env = "HERALD_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// The Lease's namespace; by default the client's (the pod's, or the kubeconfig context's).
    #[arg(long, env = "HERALD_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, env = "HERALD_LEASE_DURATION_SECONDS", default_value_t = DEFAULT_LEASE_DURATION_SECONDS)]
    pub lease_duration_seconds: u64,
    #[arg(long, env = "HERALD_LEASE_GRACE_SECONDS", default_value_t = DEFAULT_LEASE_GRACE_SECONDS)]
    pub lease_grace_seconds: u64,
    /// This replica's name in the Lease; by default POD_NAME or HOSTNAME plus a random suffix.
    #[arg(long, env = "HERALD_IDENTITY")]
    pub identity: Option<String>,
    #[arg(long, env = "HERALD_WORKERS", default_value_t = DEFAULT_WORKERS)]
    pub workers: usize,
    #[arg(long, env = "HERALD_RESYNC_SECONDS", default_value_t = DEFAULT_RESYNC_SECONDS)]
    pub resync_seconds: u64,
}

fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "herald-cluster-watcher".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Stands by for the Lease and works while holding it, until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // KUBECONFIG, ~/.kube/config or the in-cluster service account, as kube-rs infers.
    let client = kube::Client::try_default()
        .await
        .context("configure the Kubernetes client")?;
    let channel = tonic::transport::Endpoint::from_shared(config.ipam_endpoint.clone())
        .with_context(|| format!("--ipam-endpoint {:?}", config.ipam_endpoint))?
        .connect_timeout(Duration::from_secs(5))
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
        identity: identity.clone(),
        resync: Duration::from_secs(config.resync_seconds.max(1)),
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
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() {
                    anyhow::bail!("the lease manager stopped");
                },
                () = shutdown.cancelled() => break 'standby,
            }
        }
        info!("holding the lease; starting work");
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
    Ok(())
}
