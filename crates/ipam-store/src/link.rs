//! The store's link to its database: whether the database answers, why not when it does
//! not, and when connections were last found broken, so that pooled connections opened
//! before are not trusted again.
//!
//! The health probe (see `Store::probe`) decides "up" and "down"; a request that meets a
//! broken connection only marks connections suspect and asks for a probe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::StoreError;

pub(crate) struct Link {
    /// Where the database is, for messages: `host:port`, a Unix socket or a file.
    target: String,
    /// `None` while the database answers; why not while it does not.
    down: watch::Sender<Option<String>>,
    /// When connections were last found broken. A pooled connection opened before then
    /// is closed instead of reused: after a restart of the server every one of them is
    /// dead, and each would fail a request of its own.
    broken_at: Mutex<Option<Instant>>,
    /// Asks the health probe to look now rather than at its next turn.
    probe_wanted: Notify,
}

impl Link {
    pub(crate) fn new(target: String) -> Self {
        Self {
            target,
            down: watch::Sender::new(None),
            broken_at: Mutex::new(None),
            probe_wanted: Notify::new(),
        }
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) fn mark_down(&self, cause: String) {
        self.mark_broken();
        self.down.send_replace(Some(cause));
    }

    pub(crate) fn mark_up(&self) {
        self.down.send_if_modified(|down| down.take().is_some());
    }

    /// Connections open now are suspect; the probe should look at once.
    pub(crate) fn mark_broken(&self) {
        *self
            .broken_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        self.probe_wanted.notify_one();
    }

    /// Whether a connection of this age was opened after connections were last found
    /// broken, and so may be reused.
    pub(crate) fn trusts(&self, age: Duration) -> bool {
        let broken_at = *self
            .broken_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (broken_at, Instant::now().checked_sub(age)) {
            (Some(broken_at), Some(opened_at)) => opened_at > broken_at,
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// `Ok` unless the database is known to be away; then the error says where and why.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match &*self.down.borrow() {
            None => Ok(()),
            Some(cause) => Err(StoreError::Unavailable {
                target: self.target.clone(),
                cause: cause.clone(),
            }),
        }
    }

    /// Resolves once the database is known to be away (at once if it is now).
    pub(crate) async fn went_down(&self) {
        let mut down = self.down.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = down.wait_for(Option::is_some).await;
    }

    pub(crate) async fn probe_wanted(&self) {
        self.probe_wanted.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_opened_before_a_break_are_not_trusted() {
        let link = Link::new("db:5432".into());
        assert!(link.trusts(Duration::from_secs(3600)), "nothing broke yet");
        link.mark_broken();
        assert!(
            !link.trusts(Duration::from_secs(1)),
            "opened before the break"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(link.trusts(Duration::ZERO), "opened after the break");
    }

    #[test]
    fn down_names_the_database_and_the_cause_until_it_is_up() {
        let link = Link::new("db:5432".into());
        assert!(link.check().is_ok());
        link.mark_down("Connection refused".into());
        let err = link.check().expect_err("down").to_string();
        assert!(
            err.contains("db:5432") && err.contains("Connection refused"),
            "{err}"
        );
        assert!(!link.trusts(Duration::from_secs(1)), "down also breaks");
        link.mark_up();
        assert!(link.check().is_ok());
    }

    #[tokio::test]
    async fn went_down_waits_for_the_database_to_go() {
        let link = std::sync::Arc::new(Link::new("db:5432".into()));
        let waiting = tokio::spawn({
            let link = std::sync::Arc::clone(&link);
            async move { link.went_down().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        link.mark_down("gone".into());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("resolves once down")
            .expect("task");
    }
}
