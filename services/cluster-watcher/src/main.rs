use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config =
        herald_settings::start::<herald_cluster_watcher::Args, herald_cluster_watcher::Config>();
    herald_telemetry::init(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    herald_cluster_watcher::run(config, shutdown).await
}
