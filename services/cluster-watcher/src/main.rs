use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config =
        herald_settings::start::<herald_cluster_watcher::Args, herald_cluster_watcher::Config>();
    let exporter = herald_telemetry::init(
        config.log_format,
        config.otlp_endpoint.as_ref().map(|e| e.as_str()),
        "herald-cluster-watcher",
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    let result = herald_cluster_watcher::run(config, shutdown).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}
