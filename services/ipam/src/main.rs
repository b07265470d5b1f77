use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = herald_settings::start::<herald_ipam::Args, herald_ipam::Config>();
    let exporter = herald_telemetry::init(
        config.log_format,
        config.otlp_endpoint.as_ref().map(|e| e.as_str()),
        "herald-ipam",
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    let result = herald_ipam::run(config, shutdown).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}
