//! Permissions the API server refuses (403 Forbidden: the watcher's RBAC role lacks them),
//! shared by every watch and reconciler of the leader. A refusal is one ERROR line when it
//! starts and keeps `/readyz` failing, naming verb and resource, until whatever was
//! refused works again; the refused work is retried with backoff meanwhile.
//!
//! Each refusal is held by the work that met it (a watch, an object's reconcile, the BGP
//! policy pass…): one holder succeeding clears only what it held, so a permission stays
//! reported while any work still meets it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt, future};
use herald_telemetry::admin::Readiness;
use kube::runtime::watcher;
use tracing::{error, info, warn};

/// A verb on a resource, as an RBAC rule names them (`list` on `ippools.herald.io`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    pub verb: &'static str,
    /// The plural, with `.group` for a resource outside the core group where that helps
    /// the reader find the rule (custom resources).
    pub resource: String,
}

impl Permission {
    pub fn new(verb: &'static str, resource: impl Into<String>) -> Self {
        Self {
            verb,
            resource: resource.into(),
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)
    }
}

pub struct Refusals {
    readiness: Readiness,
    /// The start-up barrier has passed: ready once nothing is refused.
    started: AtomicBool,
    /// Each refused permission, with the work that met it.
    refused: Mutex<BTreeMap<Permission, BTreeSet<String>>>,
}

impl Refusals {
    pub fn new(readiness: Readiness) -> Arc<Self> {
        Arc::new(Self {
            readiness,
            started: AtomicBool::new(false),
            refused: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Permission, BTreeSet<String>>> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `holder` was refused `permission`. Logged only when no work met it already, so a
    /// retried refusal is one line however often it is retried.
    pub fn refuse(&self, permission: Permission, holder: &str, cause: &dyn fmt::Display) {
        let first = {
            let mut refused = self.lock();
            let holders = refused.entry(permission.clone()).or_default();
            let first = holders.is_empty();
            holders.insert(holder.to_string());
            first
        };
        if first {
            let Permission { verb, resource } = &permission;
            error!(
                resource = %resource,
                verb,
                error = %cause,
                "forbidden: the watcher's RBAC role must allow {verb} on {resource}; \
                 not ready until it does (retrying with backoff)"
            );
            self.update_readiness();
        }
    }

    /// `holder`'s work succeeded: whatever it was refused is allowed now.
    pub fn clear(&self, holder: &str) {
        let allowed: Vec<Permission> = {
            let mut refused = self.lock();
            let mut allowed = Vec::new();
            refused.retain(|permission, holders| {
                if holders.remove(holder) && holders.is_empty() {
                    allowed.push(permission.clone());
                }
                !holders.is_empty()
            });
            allowed
        };
        if !allowed.is_empty() {
            for p in &allowed {
                info!(resource = %p.resource, verb = p.verb, "the API server allows it again");
            }
            self.update_readiness();
        }
    }

    /// The start-up barrier has passed.
    pub fn started(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.update_readiness();
    }

    /// Not ready while anything is refused or the start-up barrier holds.
    fn update_readiness(&self) {
        let refused = self.lock();
        if !refused.is_empty() {
            let names: Vec<String> = refused.keys().map(Permission::to_string).collect();
            self.readiness.set_not_ready(format!(
                "forbidden by the API server (RBAC): {}",
                names.join(", ")
            ));
        } else if self.started.load(Ordering::SeqCst) {
            self.readiness.set_ready();
        } else {
            self.readiness
                .set_not_ready("leading: caches not synced yet");
        }
    }

    /// Passes a watch's events on, reporting a refused list or watch of `resource` (held
    /// by the watch itself) and clearing it on the first event that shows the watch works.
    /// Other failures are logged; every failure is left out of the stream, so one failing
    /// watch never stops a controller's other triggers (the watch retries on its own, with
    /// the backoff the caller gave it).
    pub fn observe<K, S>(
        self: &Arc<Self>,
        resource: String,
        stream: S,
    ) -> impl Stream<Item = watcher::Event<K>> + Send + 'static + use<K, S>
    where
        K: Send + 'static,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let this = Arc::clone(self);
        let holder = format!("watch {resource}");
        stream.filter_map(move |event| {
            match &event {
                // Announces a (re-)list before it is asked for: no sign it works.
                Ok(watcher::Event::Init) => {}
                Ok(_) => this.clear(&holder),
                Err(e) => match refused_verb(e) {
                    Some(verb) => this.refuse(Permission::new(verb, resource.clone()), &holder, e),
                    None => warn!(resource = %resource, error = %e, "watch failed; retrying"),
                },
            }
            future::ready(event.ok())
        })
    }
}

/// The RBAC verb a failed watch step needed.
pub fn refused_verb(error: &watcher::Error) -> Option<&'static str> {
    let (verb, source) = match error {
        watcher::Error::InitialListFailed(e) => ("list", e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => ("watch", e),
        watcher::Error::WatchError(status) => {
            return status.is_forbidden().then_some("watch");
        }
        watcher::Error::NoResourceVersion => return None,
    };
    forbidden(source).then_some(verb)
}

/// Whether the API server answered 403 Forbidden.
pub fn forbidden(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_forbidden())
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status::failure("refused", reason).with_code(code)))
    }

    #[test]
    fn a_refused_permission_names_the_verb_and_nothing_else_does() {
        let forbidden = || api(403, "Forbidden");
        assert_eq!(
            refused_verb(&watcher::Error::InitialListFailed(forbidden())),
            Some("list")
        );
        assert_eq!(
            refused_verb(&watcher::Error::WatchStartFailed(forbidden())),
            Some("watch")
        );
        assert_eq!(
            refused_verb(&watcher::Error::WatchError(Box::new(
                Status::failure("refused", "Forbidden").with_code(403)
            ))),
            Some("watch")
        );
        // 410 Gone, a server error or a lost connection are retried without a refusal.
        assert_eq!(
            refused_verb(&watcher::Error::WatchError(Box::new(
                Status::failure("too old", "Expired").with_code(410)
            ))),
            None
        );
        assert_eq!(
            refused_verb(&watcher::Error::InitialListFailed(api(
                500,
                "InternalError"
            ))),
            None
        );
        assert_eq!(refused_verb(&watcher::Error::NoResourceVersion), None);
    }

    #[test]
    fn a_permission_stays_refused_while_any_holder_meets_it() {
        let readiness = Readiness::not_ready("new");
        let refusals = Refusals::new(readiness.clone());
        refusals.started();
        assert_eq!(readiness.check(), Ok(()));
        let patch = Permission::new("patch", "ippools.herald.io/status");
        refusals.refuse(patch.clone(), "IPPool/a", &"403");
        refusals.refuse(patch, "IPPool/b", &"403");
        refusals.refuse(
            Permission::new("list", "bgppeers.herald.io"),
            "watch",
            &"403",
        );
        let Err(reason) = readiness.check() else {
            panic!("ready while refused")
        };
        assert!(
            reason.contains("patch ippools.herald.io/status")
                && reason.contains("list bgppeers.herald.io"),
            "{reason}"
        );
        refusals.clear("watch");
        refusals.clear("IPPool/a");
        let Err(reason) = readiness.check() else {
            panic!("ready while refused")
        };
        assert!(
            reason.contains("patch ippools.herald.io/status") && !reason.contains("bgppeers"),
            "{reason}"
        );
        refusals.clear("IPPool/b");
        assert_eq!(readiness.check(), Ok(()));
    }

    #[test]
    fn nothing_refused_is_ready_only_after_the_barrier() {
        let readiness = Readiness::not_ready("new");
        let refusals = Refusals::new(readiness.clone());
        refusals.refuse(Permission::new("list", "nodes"), "watch nodes", &"403");
        refusals.clear("watch nodes");
        assert!(readiness.check().is_err());
        refusals.started();
        assert_eq!(readiness.check(), Ok(()));
    }
}
