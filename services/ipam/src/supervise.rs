//! The background tasks the service cannot work without: the group-commit writer, the
//! change feed, the route engine, and the task that opens the store and keeps health true.
//! One that ends before shutdown, fails or panics is not restarted: its state (an index
//! half applied, a queue of callers waiting for a commit) cannot be trusted to resume, and
//! a new process rebuilds all of it from the store. So the failure is logged, health turns
//! NOT_SERVING, the service shuts down and the process exits non-zero, for Kubernetes to
//! restart it.

use std::any::Any;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::error;

#[derive(Clone)]
pub(crate) struct Supervisor {
    shutdown: CancellationToken,
    reporter: HealthReporter,
    /// The first task that failed, and how.
    failure: Arc<OnceLock<String>>,
}

impl Supervisor {
    pub(crate) fn new(shutdown: CancellationToken, reporter: HealthReporter) -> Self {
        Self {
            shutdown,
            reporter,
            failure: Arc::new(OnceLock::new()),
        }
    }

    /// Runs `task`, named `name` in the error. The returned handle completes once the task
    /// has ended and any failure has been acted on.
    pub(crate) fn spawn<E>(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) -> JoinHandle<()>
    where
        E: Display + Send + 'static,
    {
        let task = tokio::spawn(task);
        let this = self.clone();
        tokio::spawn(async move {
            let why = match task.await {
                Ok(Ok(())) if this.shutdown.is_cancelled() => return,
                Ok(Ok(())) => "ended".to_string(),
                Ok(Err(e)) => format!("failed: {e:#}"),
                Err(e) => match e.try_into_panic() {
                    Ok(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
                    Err(e) => format!("was cancelled: {e}"),
                },
            };
            this.fail(name, why).await;
        })
    }

    /// The first failure, if any task failed.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    async fn fail(&self, name: &str, why: String) {
        let failure = format!("background task {name} {why}");
        error!(task = name, "{failure}; shutting down");
        let _ = self.failure.set(failure);
        for service in ["", crate::IPAM_SERVICE_NAME, crate::ROUTING_SERVICE_NAME] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        self.shutdown.cancel();
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn new_supervisor() -> (Supervisor, CancellationToken) {
        let shutdown = CancellationToken::new();
        let (reporter, _) = tonic_health::server::health_reporter();
        (Supervisor::new(shutdown.clone(), reporter), shutdown)
    }

    #[tokio::test]
    async fn a_task_that_panics_shuts_the_service_down_and_names_the_cause() {
        let (supervisor, shutdown) = new_supervisor();
        let monitor = supervisor.spawn("test task", panics());
        tokio::time::timeout(Duration::from_secs(5), monitor)
            .await
            .unwrap()
            .unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(
            supervisor.failure().as_deref(),
            Some("background task test task panicked: index corrupt")
        );
    }

    #[tokio::test]
    async fn a_task_that_fails_or_ends_early_shuts_the_service_down() {
        let (supervisor, shutdown) = new_supervisor();
        let monitor = supervisor.spawn("feed", async { Err::<(), _>("a corrupt row") });
        monitor.await.unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(
            supervisor.failure().as_deref(),
            Some("background task feed failed: a corrupt row")
        );

        let (supervisor, shutdown) = new_supervisor();
        supervisor
            .spawn("engine", async { Ok::<(), String>(()) })
            .await
            .unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(
            supervisor.failure().as_deref(),
            Some("background task engine ended")
        );
    }

    #[tokio::test]
    async fn a_task_that_ends_on_shutdown_is_no_failure() {
        let (supervisor, shutdown) = new_supervisor();
        let token = shutdown.clone();
        let monitor = supervisor.spawn("feed", async move {
            token.cancelled().await;
            Ok::<(), String>(())
        });
        shutdown.cancel();
        monitor.await.unwrap();
        assert_eq!(supervisor.failure(), None);
    }

    async fn panics() -> Result<(), String> {
        panic!("index corrupt")
    }
}
