//! The change feed: one task per process follows the store's change log, applies what
//! other replicas did to the in-memory index, and hands every change, in revision order,
//! to the Watch streams.
//!
//! Postgres hands out revisions from a sequence when a row is inserted, not when its
//! transaction commits, so revision 11 can become visible before revision 10, and a
//! rolled-back insert leaves a hole for ever. The feed therefore delivers in order, holding
//! back what follows a hole until the hole fills or is known to be a rollback: every
//! transaction that was running when the hole was seen has ended (Postgres' snapshot
//! horizon), or, failing that, [`GAP_WAIT`] has passed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use herald_ipam_core::ClaimRecord;
use herald_ipam_store::Event;
use herald_model::ServicePort;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ipam::Ipam;

/// How often the log is read when nothing local wakes the feed: the delay with which one
/// replica sees another's changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long a hole in the revisions may hold back later changes. Transactions that write
/// the log are short; one still open after this long has rolled back.
pub const GAP_WAIT: Duration = Duration::from_secs(2);
/// A hole younger than this is never skipped: the transaction that took the missing
/// revision may not have its transaction id yet, for a few microseconds.
const MIN_HOLE_AGE: Duration = Duration::from_millis(20);
/// How often the log is read while a hole holds changes back.
const HOLE_POLL: Duration = Duration::from_millis(10);

/// After a local write wakes the feed it waits this long before reading, so that under
/// load one read picks up many commits instead of one read per commit.
pub const WAKE_COALESCE: Duration = Duration::from_millis(3);
/// Log rows read per query.
const READ_BATCH: u32 = 1000;
/// Changes buffered per Watch stream before a slow reader is cut off.
const SUBSCRIBER_BUFFER: usize = 8192;

pub struct Feed {
    sender: broadcast::Sender<Arc<Event>>,
    wake: Notify,
    /// Every revision up to this one has been delivered (or is a rolled-back hole).
    delivered: AtomicI64,
}

impl Feed {
    pub fn new(last_revision: i64) -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Self {
            sender,
            wake: Notify::new(),
            delivered: AtomicI64::new(last_revision),
        }
    }

    /// Asks the follower to read the log now: this process just wrote to it.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn delivered(&self) -> i64 {
        self.delivered.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }
}

/// Follows the log until `shutdown`. Store errors are logged and retried on the next turn:
/// the feed falling behind must never take the service down.
pub async fn follow(ipam: Arc<Ipam>, shutdown: CancellationToken) {
    let feed = ipam.feed();
    let mut waiting: BTreeMap<i64, Event> = BTreeMap::new();
    let mut hole: Option<Hole> = None;
    loop {
        let poll = if hole.is_some() {
            HOLE_POLL
        } else {
            POLL_INTERVAL
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = feed.wake.notified() => tokio::time::sleep(WAKE_COALESCE).await,
            () = tokio::time::sleep(poll) => {}
        }
        // With a hole pending, ask which transactions are still running before reading,
        // so that a commit filling the hole is seen by the read that follows.
        let oldest_running = match (&hole, ipam.store().transaction_horizon().await) {
            (Some(_), Ok(horizon)) => horizon.map(|(oldest, _)| oldest),
            _ => None,
        };
        // Bounded: each turn reads at most READ_BATCH rows, and a full batch is the only
        // reason to go round again without waiting.
        // The first read starts right after the last delivered change, so a late commit that
        // fills a hole is found; further reads continue after what is already waiting.
        let mut after = feed.delivered();
        for _ in 0..100 {
            let events = match ipam.store().events_after(after, READ_BATCH).await {
                Ok(events) => events,
                Err(e) => {
                    warn!(error = %e, "reading the change log failed; retrying");
                    break;
                }
            };
            let full = events.len() == READ_BATCH as usize;
            for event in events {
                after = after.max(event.revision());
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    waiting.entry(event.revision())
                {
                    apply(&ipam, &event).await;
                    slot.insert(event);
                }
            }
            deliver(feed, &mut waiting, &mut hole, oldest_running);
            if !full {
                break;
            }
        }
        // A new hole: note which transactions might still fill it.
        if let Some(new) = hole.as_mut().filter(|h| h.horizon.is_none())
            && let Ok(Some((_, next))) = ipam.store().transaction_horizon().await
        {
            new.horizon = Some(next);
        }
    }
}

/// A gap in the revisions that holds later changes back.
struct Hole {
    since: Instant,
    /// The next transaction id when the hole was seen: the transaction that took the
    /// missing revision has a smaller one.
    horizon: Option<i64>,
}

impl Hole {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            horizon: None,
        }
    }

    /// Whether the missing revision can no longer appear: every transaction that could hold
    /// it has ended (`oldest_running` has passed the horizon), or it is very old.
    fn is_rollback(&self, oldest_running: Option<i64>) -> bool {
        let age = self.since.elapsed();
        let all_ended = matches!((self.horizon, oldest_running), (Some(horizon), Some(oldest)) if oldest >= horizon);
        age >= GAP_WAIT || (age >= MIN_HOLE_AGE && all_ended)
    }
}

/// Hands over the changes that follow the last delivered one without a hole, and those
/// after a hole known to be a rollback.
fn deliver(
    feed: &Feed,
    waiting: &mut BTreeMap<i64, Event>,
    hole: &mut Option<Hole>,
    oldest_running: Option<i64>,
) {
    let mut delivered = feed.delivered();
    loop {
        let Some((&next, _)) = waiting.first_key_value() else {
            *hole = None;
            break;
        };
        if next <= delivered + 1 || hole.as_ref().is_some_and(|h| h.is_rollback(oldest_running)) {
            if let Some(event) = waiting.remove(&next) {
                delivered = delivered.max(next);
                feed.delivered.store(delivered, Ordering::Release);
                // No subscriber is not an error: nobody is watching.
                let _ = feed.sender.send(Arc::new(event));
            }
            *hole = None;
        } else {
            hole.get_or_insert_with(Hole::new);
            break;
        }
    }
}

/// Applies a logged change to the index. Idempotent, so this process's own changes, which
/// it applied when it made them, pass through harmlessly.
async fn apply(ipam: &Ipam, event: &Event) {
    match event {
        Event::Assigned(entry, tag) => {
            let claim = ClaimRecord {
                ip: entry.ip,
                tag: tag.clone(),
                pool: entry.pool.clone(),
                owner_uid: entry.owner.uid.clone(),
                ports: shared_ports(ipam, &entry.owner.uid, tag).await,
            };
            ipam.index().observe_assigned(claim)
        }
        Event::Updated(entry, tag) => {
            let claim = ClaimRecord {
                ip: entry.ip,
                tag: tag.clone(),
                pool: entry.pool.clone(),
                owner_uid: entry.owner.uid.clone(),
                ports: shared_ports(ipam, &entry.owner.uid, tag).await,
            };
            ipam.index().observe_updated(claim)
        }
        Event::Released(entry, _) => {
            ipam.index()
                .observe_released(entry.ip, &entry.owner.uid, Some(entry.at))
        }
        Event::PoolChanged { pool, .. } | Event::PoolDeleted { pool, .. } => {
            match ipam.store().load_pool(pool).await {
                Ok(Some(stored)) => ipam.index().upsert_pool(stored.spec, stored.generation),
                Ok(None) => ipam.index().remove_pool(pool),
                Err(e) => warn!(%pool, error = %e, "reloading a changed pool failed"),
            }
        }
        // Routing inputs: the route engine follows them through the same feed.
        Event::NodeChanged { .. }
        | Event::NodeDeleted { .. }
        | Event::EndpointsChanged { .. }
        | Event::PolicyChanged { .. } => {}
    }
}

/// The ports `owner_uid` holds on a shared address (claim `tag`), which the index checks
/// new sharers against. The log does not carry them, so they are read from the store: its
/// current value, at least as new as the event. Exclusive addresses need none, and cost
/// no read.
async fn shared_ports(ipam: &Ipam, owner_uid: &str, tag: &str) -> Vec<ServicePort> {
    if !tag.starts_with("s:") {
        return Vec::new();
    }
    match ipam.store().get_allocation(owner_uid).await {
        Ok(held) => held.map(|a| a.ports).unwrap_or_default(),
        Err(e) => {
            // The store checks ports again when writing, so an unknown list only costs a
            // precise early refusal.
            warn!(owner_uid, error = %e, "reading a sharer's ports failed");
            Vec::new()
        }
    }
}
