use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Herald IPAM: LoadBalancer address pools and allocations over gRPC.
#[derive(Debug, Parser)]
#[command(name = "herald-ipam", version)]
struct Args {
    #[command(flatten)]
    config: herald_ipam::Config,
    #[command(flatten)]
    log: herald_telemetry::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    herald_telemetry::init(&args.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    herald_ipam::run(args.config, shutdown).await
}
