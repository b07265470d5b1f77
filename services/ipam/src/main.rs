use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = herald_settings::start::<herald_ipam::Args, herald_ipam::Config>();
    herald_telemetry::init(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(herald_telemetry::cancel_on_signal(shutdown.clone()));
    herald_ipam::run(config, shutdown).await
}
