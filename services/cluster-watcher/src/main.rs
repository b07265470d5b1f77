use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Herald cluster watcher: Kubernetes LoadBalancer Services to IPAM allocations and routes.
#[derive(Debug, Parser)]
#[command(name = "herald-cluster-watcher", version)]
struct Args {
    #[command(flatten)]
    config: herald_cluster_watcher::Config,
    #[command(flatten)]
    log: herald_telemetry::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    herald_telemetry::init(&args.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    herald_cluster_watcher::run(args.config, shutdown).await
}
