//! What every Herald binary sets up the same way: logging (plain text for people, JSON for
//! log pipelines, filtered by `RUST_LOG`, default `info`) and graceful shutdown on SIGTERM
//! or Ctrl-C, and OpenTelemetry traces ([`trace`]): OTLP export and W3C trace context
//! across gRPC, so every binary gets them by calling [`init`].
//!
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`metrics`]: what the binaries' metrics share (trace-id exemplars, ages, buckets).

pub mod admin;
pub mod metrics;
pub mod trace;

pub use prometheus_client;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// The `log_format` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, with span fields, for Loki, Elasticsearch and the like.
    Json,
}

impl<'de> serde::Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "plain" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            _ => Err(serde::de::Error::custom("expected plain or json")),
        }
    }
}

/// Installs the global subscriber: logs to stderr and, with `otlp_endpoint`, spans to an
/// OTLP/gRPC collector under `service_name` (unless `OTEL_SERVICE_NAME` says otherwise).
/// Call once, first thing in `main` after the settings are read, inside the runtime; keep
/// the returned exporter and [`trace::Exporter::shutdown`] it last, to flush.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    service_name: &'static str,
) -> Option<trace::Exporter> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    // Per layer: RUST_LOG filters the logs, not what the collector gets.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal; files and log collectors get plain text.
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr's reader gone: a log shipper
        // restarting, `| head`) is dropped. Reporting it would write to the same stderr,
        // with `eprintln!`, which panics there.
        .log_internal_errors(false)
        .with_ansi(ansi);
    let fmt: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format {
        LogFormat::Plain => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_events(FmtSpan::NONE)
            .with_filter(filter)
            .boxed(),
    };
    let (otel, exporter, failed) = match otlp_endpoint.map(|e| trace::provider(e, service_name)) {
        Some(Ok((provider, runtime))) => (
            Some(trace::layer(&provider)),
            Some(trace::Exporter::new(provider, runtime)),
            None,
        ),
        Some(Err(e)) => (None, None, Some(e)),
        None => (None, None, None),
    };
    let result = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if let Err(e) = result {
        tracing::warn!(error = %e, "logging was already initialised");
        return None;
    }
    if let Some(e) = failed {
        tracing::error!(error = %e, "spans are not exported");
    }
    if exporter.is_some() {
        trace::set_enabled();
        tracing::info!(
            endpoint = otlp_endpoint.unwrap_or_default(),
            "exporting spans over OTLP/gRPC"
        );
    }
    exporter
}

/// Cancels `shutdown` on SIGTERM (Kubernetes, node drain) or Ctrl-C. Spawn it once from
/// `main`; the binary's own run loop does the orderly part.
pub async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
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
    // Cancel before anything else: nothing after this line may stand between the signal
    // and the shutdown.
    shutdown.cancel();
    tracing::info!("shutting down");
}
