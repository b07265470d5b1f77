//! The admin listener every binary serves beside its own work: `/metrics` (the
//! OpenMetrics text of the binary's registry, written by `prometheus-client`), `/healthz`
//! (the process is alive and its runtime answers) and `/readyz` (the binary is ready to do
//! its job, as it defines it through [`Readiness`]; when it is not, 503 with the reason).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// herald-ipam's default admin address. The admin ports sit beside the gRPC port
/// (50051), outside Prometheus's exporter range 9100–9999 (every port of it is allocated
/// to some exporter), one per binary so all three can run on one host. Loopback by
/// default, like the gRPC listener: a deployment opens it with `--admin-listen 0.0.0.0:…`.
pub const DEFAULT_IPAM_ADMIN_LISTEN: &str = "127.0.0.1:50061";
/// herald-cluster-watcher's default admin address.
pub const DEFAULT_WATCHER_ADMIN_LISTEN: &str = "127.0.0.1:50062";
/// herald-route-speaker's default admin address.
pub const DEFAULT_SPEAKER_ADMIN_LISTEN: &str = "127.0.0.1:50063";

/// The OpenMetrics text format, which is what carries exemplars; Prometheus asks for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What a client that does not ask for OpenMetrics gets (curl, `promtool check metrics`,
/// which reads the older Prometheus text format and stops at an exemplar).
const PLAIN: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A binary's metrics, twice: for OpenMetrics clients with exemplars, and for the others
/// without (the same metrics, with a plain twin of each exemplar-carrying histogram).
pub struct Exposition {
    pub openmetrics: Registry,
    pub plain: Registry,
}

/// Whether the binary is ready, and why not. Cloned into whatever decides it; `/readyz`
/// reads it at each request.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<RwLock<Option<String>>>);

impl Readiness {
    /// Not ready yet, for `reason` (shown by `/readyz`).
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self(Arc::new(RwLock::new(Some(reason.into()))))
    }

    pub fn set_ready(&self) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.into());
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        match &*self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }
}

#[derive(Clone)]
struct Admin {
    exposition: Arc<Exposition>,
    readiness: Readiness,
}

/// Binds `listen` (an error here is the binary's start-up error: a taken port must not
/// go unnoticed) and serves the admin endpoints until `shutdown`. Returns the bound
/// address (useful with port 0) and the server's task.
pub async fn serve(
    listen: SocketAddr,
    exposition: Exposition,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("admin listener on {listen}: {e}")))?;
    let local = listener.local_addr()?;
    let state = Admin {
        exposition: Arc::new(exposition),
        readiness,
    };
    let app = router(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "admin listener stopped");
        }
    });
    tracing::info!(listen = %local, "admin endpoints (/metrics, /healthz, /readyz) serving");
    Ok((local, task))
}

fn router(state: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (registry, content_type) = if openmetrics {
        (&admin.exposition.openmetrics, OPENMETRICS)
    } else {
        (&admin.exposition.plain, PLAIN)
    };
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match admin.readiness.check() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_accepting(addr, path, "*/*").await
    }

    /// One HTTP/1.0 GET, the whole answer as text.
    async fn get_accepting(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: x\r\nAccept: {accept}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("herald_test_things", "Things seen", counter.clone());
        let registry = Exposition {
            openmetrics: registry,
            plain: Registry::default(),
        };
        counter.inc_by(3);
        let readiness = Readiness::not_ready("store not open");
        let shutdown = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();

        let metrics = get_accepting(addr, "/metrics", "application/openmetrics-text").await;
        assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
        assert!(
            metrics.contains("application/openmetrics-text"),
            "{metrics}"
        );
        let plain = get(addr, "/metrics").await;
        assert!(plain.contains("version=0.0.4"), "{plain}");
        assert!(!plain.contains("herald_test_things"), "{plain}");
        assert!(metrics.contains("herald_test_things_total 3"), "{metrics}");
        assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.0 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.0 503"), "{not_ready}");
        assert!(
            not_ready.ends_with("not ready: store not open\n"),
            "{not_ready}"
        );
        readiness.set_ready();
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
        assert!(get(addr, "/nothing").await.starts_with("HTTP/1.0 404"));

        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_it() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(
            addr,
            Exposition {
                openmetrics: Registry::default(),
                plain: Registry::default(),
            },
            Readiness::not_ready("x"),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
