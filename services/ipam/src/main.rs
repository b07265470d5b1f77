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
    tokio::spawn(stop_on_signal(shutdown.clone()));
    herald_ipam::run(args.config, shutdown).await
}

/// SIGTERM (Kubernetes) or Ctrl-C start a graceful shutdown.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
