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
    tokio::spawn(stop_on_signal(shutdown.clone()));
    herald_route_speaker::run(args.config, shutdown).await
}

/// SIGTERM (Kubernetes, node drain) or Ctrl-C close the sessions and exit.
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
    tracing::info!("signal received");
    shutdown.cancel();
}
