use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Herald route speaker: announces this node's LoadBalancer routes to its BGP peers.
#[derive(Debug, Parser)]
#[command(name = "herald-route-speaker", version)]
struct Args {
    #[command(flatten)]
    config: herald_route_speaker::Config,
    #[command(flatten)]
    log: herald_telemetry::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    herald_telemetry::init(&args.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    herald_route_speaker::run(args.config, shutdown).await
}
