//! The change feed: one task per process follows the store's change log, applies what
//! other replicas did to the in-memory index, and hands every change, in revision order,
//! to the Watch streams.
//!
//! Postgres hands out revisions from a sequence when a row is inserted, not when its
//! transaction commits, so revision 11 can become visible before revision 10, and a
//! rolled-back insert leaves a hole for ever. The feed therefore delivers in order, holding
//! back what follows a hole until the hole fills or is known to be a rollback. It is known
//! to be one when every transaction that was writing the log when the hole was seen has
//! ended and a read after that still misses it: the transaction that took the missing
//! revision locked the log before it took the revision, so it was one of them
//! ([`herald_ipam_store::Store::log_writers`]). There is no time limit: a slow transaction
//! (a forced shrink of a large pool) holds later changes back for as long as it runs,
//! because skipping its revision would lose its changes for good. How long and how much is
//! held back is published as [`Stall`] and logged.
//!
//! Nothing can therefore appear below the delivered mark later: not while following (a hole
//! is passed only once it is known to be a rollback), nor at start, where the mark is taken
//! by [`settled_revision`], which waits out the transactions writing the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use herald_ipam_core::ClaimRecord;
use herald_ipam_store::{Event, Store, StoreError};
use herald_model::ServicePort;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ipam::Ipam;

/// How often the log is read when nothing local wakes the feed: the delay with which one
/// replica sees another's changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the log is read while a hole holds changes back.
const HOLE_POLL: Duration = Duration::from_millis(10);
/// A hole that holds changes back longer than this is logged: the transactions that write
/// the log usually end within milliseconds.
const STALL_WARN: Duration = Duration::from_secs(1);
/// How often a stall that goes on is logged again.
const STALL_REPEAT: Duration = Duration::from_secs(5);

/// Reads woken by local writes start at least this far apart, so that under load one
/// read picks up many commits instead of one read per commit. A wake after a quiet spell
/// reads at once: a lone change never waits for company ([`woken_read_at`]).
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
    stall: watch::Sender<Option<Stall>>,
}

/// Changes held back behind a revision whose transaction may still commit: the figures a
/// metrics endpoint exports as the feed's lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// The first revision not yet delivered.
    pub revision: i64,
    /// Changes already read that wait behind it.
    pub held_back: usize,
    /// Transactions that were writing the log when the hole was seen and are still running
    /// (as of the last look); one of them may still fill it.
    pub writers: usize,
    /// When the hole was first seen.
    pub since: Instant,
}

impl Stall {
    pub fn held_for(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Feed {
    pub fn new(last_revision: i64) -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Self {
            sender,
            wake: Notify::new(),
            delivered: AtomicI64::new(last_revision),
            stall: watch::Sender::new(None),
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

    /// What holds the feed back right now, if anything; the receiver sees every change.
    pub fn stall(&self) -> watch::Receiver<Option<Stall>> {
        self.stall.subscribe()
    }
}

/// The newest revision of the log, once every transaction that was writing the log when it
/// was read has ended: a revision below it that is missing then is a rollback, never a
/// change still to come, so a replica that starts from it (and loads its state after it)
/// misses nothing. Waits as long as those transactions run.
pub async fn settled_revision(store: &Store) -> Result<i64, StoreError> {
    let last = store.last_revision().await?;
    let Some(writers) = store.log_writers().await? else {
        return Ok(last);
    };
    let since = Instant::now();
    let mut reported: Option<Instant> = None;
    // Bounded by the transactions listed: each ends, and no new one is waited for.
    loop {
        let running = store.log_writers_running(&writers).await?;
        if running == 0 {
            return Ok(last);
        }
        if since.elapsed() >= STALL_WARN && reported.is_none_or(|at| at.elapsed() >= STALL_REPEAT) {
            reported = Some(Instant::now());
            warn!(
                revision = last,
                writers = running,
                waited = ?since.elapsed(),
                "waiting for transactions still writing the change log before loading"
            );
        }
        tokio::time::sleep(HOLE_POLL).await;
    }
}

/// Follows the log until `shutdown`. Store errors are logged and retried on the next turn:
/// the feed falling behind must never take the service down. A row that cannot be decoded
/// is different: every later change waits behind it, for ever, so it ends the feed with
/// the error (and the supervisor the process).
pub async fn follow(ipam: Arc<Ipam>, shutdown: CancellationToken) -> Result<(), StoreError> {
    let feed = ipam.feed();
    let mut waiting: BTreeMap<i64, Event> = BTreeMap::new();
    let mut hole: Option<Hole> = None;
    // When the last read a local write woke began.
    let mut last_woken: Option<tokio::time::Instant> = None;
    loop {
        // A hole is usually a commit a few milliseconds away: look again soon. One that
        // lasts is a long transaction; each turn re-reads what waits behind it, so it is
        // looked at only as often as the log is polled, and local writes do not wake it.
        let stalled = hole
            .as_ref()
            .is_some_and(|h| h.since.elapsed() >= STALL_WARN);
        let poll = if hole.is_some() && !stalled {
            HOLE_POLL
        } else {
            POLL_INTERVAL
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = feed.wake.notified(), if !stalled => {
                let at = woken_read_at(last_woken, tokio::time::Instant::now());
                tokio::time::sleep_until(at).await;
                last_woken = Some(at);
            }
            () = tokio::time::sleep(poll) => {}
        }
        // With a hole pending, ask whether the transactions that could fill it have all
        // ended before reading, so that whatever they committed is seen by the read below.
        let settled = match hole.as_mut() {
            Some(h) => h.settled(ipam.store()).await,
            None => false,
        };
        // Bounded: each turn reads at most READ_BATCH rows, and a full batch is the only
        // reason to go round again without waiting.
        // The first read starts right after the last delivered change, so a late commit that
        // fills a hole is found; further reads continue after what is already waiting.
        let mut after = feed.delivered();
        for _ in 0..100 {
            let events = match ipam.store().events_after(after, READ_BATCH).await {
                Ok(events) => events,
                Err(e @ StoreError::Corrupt(_)) => return Err(e),
                Err(e) => {
                    warn!(error = %e, "reading the change log failed; retrying");
                    break;
                }
            };
            let mut full = events.len() == READ_BATCH as usize;
            let mut read_through = if full {
                events.last().map(Event::revision)
            } else {
                Some(i64::MAX)
            };
            for event in events {
                let revision = event.revision();
                if let std::collections::btree_map::Entry::Vacant(slot) = waiting.entry(revision) {
                    // A change that could not be applied is read again next turn, and what
                    // follows it waits: skipping it would leave this replica's index
                    // disagreeing with the store until the next change to the same pool.
                    if let Err(e) = apply(&ipam, &event).await {
                        warn!(revision, error = %e, "applying a logged change failed; retrying");
                        full = false;
                        read_through = Some(revision - 1);
                        break;
                    }
                    slot.insert(event);
                }
                after = after.max(revision);
            }
            // A gap counts as read, and so as known to be missing, only up to where this
            // turn has read the log, after `settled` was established.
            deliver(
                feed,
                &mut waiting,
                &mut hole,
                read_through.filter(|_| settled),
            );
            // Every entry up to the delivered revision has been read and applied.
            ipam.index().forget_local_writes_through(feed.delivered());
            if !full {
                break;
            }
        }
        // A new hole: note which transactions might still fill it. Listed after the read
        // that showed the revisions beyond it, so its transaction, if still running, is
        // among them.
        if let Some(new) = hole.as_mut().filter(|h| h.writers.is_none()) {
            match ipam.store().log_writers().await {
                Ok(writers) => {
                    let writers = writers.unwrap_or_default();
                    new.running = writers.len();
                    new.writers = Some(writers);
                    new.covers = after;
                }
                Err(e) => {
                    warn!(error = %e, "listing the transactions writing the change log failed; retrying")
                }
            }
        }
        report(feed, &waiting, hole.as_mut());
    }
}

/// When a read that a local write woke at `now` starts: at once, unless the last woken
/// read began less than [`WAKE_COALESCE`] ago; then when that much has passed, so that
/// the commits of a busy moment share a read while a lone one is read without delay.
fn woken_read_at(
    last: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> tokio::time::Instant {
    last.map_or(now, |last| now.max(last + WAKE_COALESCE))
}

/// A gap in the revisions that holds later changes back.
struct Hole {
    since: Instant,
    /// The transactions writing the log when the hole was seen, listed after the read that
    /// revealed it; `None` until listed.
    writers: Option<Vec<String>>,
    /// The newest revision read before `writers` was listed. Every revision missing below
    /// it was taken before that one, so by a transaction that was running (or had ended)
    /// when `writers` was listed.
    covers: i64,
    /// How many of `writers` were still running at the last look.
    running: usize,
    /// When the stall was last logged.
    reported: Option<Instant>,
}

impl Hole {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            writers: None,
            covers: 0,
            running: 0,
            reported: None,
        }
    }

    /// Whether every transaction that could fill this hole has ended. A store error counts
    /// as "not yet": waiting longer is always safe.
    async fn settled(&mut self, store: &Store) -> bool {
        let Some(writers) = self.writers.as_deref() else {
            return false;
        };
        match store.log_writers_running(writers).await {
            Ok(running) => {
                self.running = running;
                running == 0
            }
            Err(e) => {
                warn!(error = %e, "asking which transactions still write the change log failed; retrying");
                false
            }
        }
    }

    /// Whether revisions up to `revision` can only have been taken by the listed writers.
    fn covers(&self, revision: i64) -> bool {
        self.writers.is_some() && revision <= self.covers
    }
}

/// Hands over the changes that follow the last delivered one without a hole, and those
/// after a hole known to be a rollback: `settled_through` says that every writer the
/// current hole lists has ended, and that the log has been read since then up to that
/// revision, so a revision it covers that is still missing was rolled back.
fn deliver(
    feed: &Feed,
    waiting: &mut BTreeMap<i64, Event>,
    hole: &mut Option<Hole>,
    settled_through: Option<i64>,
) {
    let mut delivered = feed.delivered();
    while let Some(entry) = waiting.first_entry() {
        let next = *entry.key();
        if next > delivered + 1 {
            let current = hole.get_or_insert_with(Hole::new);
            let rolled_back = settled_through.is_some_and(|through| next - 1 <= through)
                && current.covers(next - 1);
            if !rolled_back {
                // A hole beyond what the listed writers can explain needs its own list.
                if current.writers.is_some() && !current.covers(next - 1) {
                    *current = Hole::new();
                }
                return;
            }
        }
        let event = entry.remove();
        delivered = delivered.max(next);
        feed.delivered.store(delivered, Ordering::Release);
        // No subscriber is not an error: nobody is watching.
        let _ = feed.sender.send(Arc::new(event));
    }
    *hole = None;
}

/// Publishes what holds the feed back (the metric-ready figure) and logs a stall that
/// lasts, and its end.
fn report(feed: &Feed, waiting: &BTreeMap<i64, Event>, hole: Option<&mut Hole>) {
    let stall = hole.map(|h| {
        let stall = Stall {
            revision: feed.delivered() + 1,
            held_back: waiting.len(),
            writers: h.running,
            since: h.since,
        };
        if stall.held_for() >= STALL_WARN
            && h.reported.is_none_or(|at| at.elapsed() >= STALL_REPEAT)
        {
            h.reported = Some(Instant::now());
            warn!(
                revision = stall.revision,
                held_back = stall.held_back,
                writers = stall.writers,
                held_for = ?stall.held_for(),
                "the change feed waits for a transaction that may still commit this revision; later changes are held back"
            );
        }
        stall
    });
    let previous = feed.stall.send_replace(stall);
    if let (Some(previous), None) = (previous, stall)
        && previous.held_for() >= STALL_WARN
    {
        info!(
            revision = previous.revision,
            held_for = ?previous.held_for(),
            "the change feed caught up"
        );
    }
}

/// Applies a logged change to the index. This process's own changes were applied when it
/// made them: applying them again is harmless while nothing newer happened to the address,
/// and skipped once a later local change did (an allocation's `assigned` read after its
/// own release was applied would count the address used again until the `released`
/// entry followed).
async fn apply(ipam: &Ipam, event: &Event) -> Result<(), StoreError> {
    let revision = event.revision();
    match event {
        Event::Assigned(entry, tag) => {
            let claim = ClaimRecord {
                ip: entry.ip,
                tag: tag.clone(),
                pool: entry.pool.clone(),
                owner_uid: entry.owner.uid.clone(),
                ports: shared_ports(ipam, &entry.owner.uid, tag).await,
            };
            // Checked under the same lock as the change, after the read above, so a local
            // write made meanwhile is seen.
            let mut index = ipam.index();
            if !index.is_superseded(entry.ip, revision) {
                index.observe_assigned(claim)
            }
        }
        Event::Updated(entry, tag) => {
            let claim = ClaimRecord {
                ip: entry.ip,
                tag: tag.clone(),
                pool: entry.pool.clone(),
                owner_uid: entry.owner.uid.clone(),
                ports: shared_ports(ipam, &entry.owner.uid, tag).await,
            };
            let mut index = ipam.index();
            if !index.is_superseded(entry.ip, revision) {
                index.observe_updated(claim)
            }
        }
        Event::Released(entry, _) => {
            let mut index = ipam.index();
            if !index.is_superseded(entry.ip, revision) {
                index.observe_released(entry.ip, &entry.owner.uid, Some(entry.at))
            }
        }
        Event::PoolChanged { pool, .. } | Event::PoolDeleted { pool, .. } => {
            match ipam.store().load_pool(pool).await? {
                Some(stored) => ipam.index().upsert_pool(stored.spec, stored.generation),
                None => ipam.index().remove_pool(pool),
            }
        }
        // Routing inputs: the route engine follows them through the same feed.
        Event::NodeChanged { .. }
        | Event::NodeDeleted { .. }
        | Event::EndpointsChanged { .. }
        | Event::PolicyChanged { .. } => {}
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: i64) -> Event {
        Event::PoolChanged {
            revision,
            pool: "p".into(),
        }
    }

    /// Reads `revisions` into `waiting` and delivers, as one turn of the follower does;
    /// returns what reached a subscriber.
    fn turn(
        feed: &Feed,
        waiting: &mut BTreeMap<i64, Event>,
        hole: &mut Option<Hole>,
        settled: bool,
        revisions: &[i64],
    ) -> Vec<i64> {
        let settled = settled.then_some(i64::MAX);
        let mut changes = feed.subscribe();
        for &r in revisions {
            waiting.entry(r).or_insert_with(|| change(r));
        }
        deliver(feed, waiting, hole, settled);
        std::iter::from_fn(|| changes.try_recv().ok().map(|e| e.revision())).collect()
    }

    /// What the follower does after a turn that left a new hole: list the writers.
    fn list_writers(hole: &mut Option<Hole>, writers: &[&str], covers: i64) {
        let hole = hole.as_mut().expect("a hole");
        assert!(hole.writers.is_none(), "listed once per hole");
        hole.writers = Some(writers.iter().map(|w| w.to_string()).collect());
        hole.running = writers.len();
        hole.covers = covers;
    }

    #[test]
    fn a_hole_holds_later_changes_back_until_its_writers_have_ended() {
        let feed = Feed::new(10);
        let (mut waiting, mut hole) = (BTreeMap::new(), None);
        assert_eq!(
            turn(&feed, &mut waiting, &mut hole, false, &[12, 13]),
            [] as [i64; 0]
        );
        list_writers(&mut hole, &["3/7"], 13);
        // However long the writer runs, nothing passes the hole while it may commit.
        for _ in 0..3 {
            assert_eq!(
                turn(&feed, &mut waiting, &mut hole, false, &[14]),
                [] as [i64; 0]
            );
        }
        assert_eq!(feed.delivered(), 10);
        // It commits: the hole fills and everything goes out in order.
        assert_eq!(
            turn(&feed, &mut waiting, &mut hole, false, &[11]),
            [11, 12, 13, 14]
        );
        assert!(hole.is_none());
        assert_eq!(feed.delivered(), 14);
    }

    #[test]
    fn a_hole_is_skipped_once_its_writers_ended_and_it_is_still_missing() {
        let feed = Feed::new(10);
        let (mut waiting, mut hole) = (BTreeMap::new(), None);
        turn(&feed, &mut waiting, &mut hole, false, &[12, 14, 16]);
        list_writers(&mut hole, &["3/7", "4/2"], 14);
        // Settled: 11 and 13 (below the revisions read when the writers were listed) were
        // rolled back; 15 is beyond them and needs a look of its own.
        assert_eq!(turn(&feed, &mut waiting, &mut hole, true, &[]), [12, 14]);
        let new = hole.as_ref().expect("a new hole at 15");
        assert!(new.writers.is_none());
        list_writers(&mut hole, &[], 16);
        assert_eq!(turn(&feed, &mut waiting, &mut hole, true, &[17]), [16, 17]);
        assert!(hole.is_none());
    }

    #[test]
    fn a_gap_not_read_again_since_the_writers_ended_is_not_skipped() {
        let feed = Feed::new(10);
        let (mut waiting, mut hole) = (BTreeMap::new(), None);
        for r in [12, 14] {
            waiting.insert(r, change(r));
        }
        deliver(&feed, &mut waiting, &mut hole, None);
        list_writers(&mut hole, &["3/7"], 14);
        // Settled, but this turn's reads stopped at 12: 13 may have committed unseen.
        let mut changes = feed.subscribe();
        deliver(&feed, &mut waiting, &mut hole, Some(12));
        assert_eq!(changes.try_recv().expect("12 delivered").revision(), 12);
        assert!(changes.try_recv().is_err());
        assert_eq!(feed.delivered(), 12);
    }

    #[test]
    fn a_hole_not_yet_listed_is_never_skipped() {
        let feed = Feed::new(0);
        let (mut waiting, mut hole) = (BTreeMap::new(), None);
        turn(&feed, &mut waiting, &mut hole, false, &[2]);
        // `settled` from a look at nothing listed cannot pass the hole.
        assert_eq!(
            turn(&feed, &mut waiting, &mut hole, true, &[3]),
            [] as [i64; 0]
        );
    }

    #[test]
    fn a_wake_after_a_quiet_spell_reads_at_once_and_a_busy_one_waits_its_turn() {
        let now = tokio::time::Instant::now();
        // The first wake, and one long after the last woken read: no wait.
        assert_eq!(woken_read_at(None, now), now);
        assert_eq!(woken_read_at(Some(now - WAKE_COALESCE * 10), now), now);
        assert_eq!(woken_read_at(Some(now - WAKE_COALESCE), now), now);
        // Woken again 1 ms after a read began: this read waits until WAKE_COALESCE after
        // it, and the commits of those milliseconds share it.
        let last = now - Duration::from_millis(1);
        assert_eq!(woken_read_at(Some(last), now), last + WAKE_COALESCE);
    }

    #[test]
    fn a_stall_is_published_while_changes_are_held_back_and_cleared_after() {
        let feed = Feed::new(10);
        let stall = feed.stall();
        let (mut waiting, mut hole) = (BTreeMap::new(), None);
        turn(&feed, &mut waiting, &mut hole, false, &[12, 13]);
        list_writers(&mut hole, &["3/7"], 13);
        report(&feed, &waiting, hole.as_mut());
        let seen = (*stall.borrow()).expect("a stall");
        assert_eq!((seen.revision, seen.held_back, seen.writers), (11, 2, 1));
        turn(&feed, &mut waiting, &mut hole, false, &[11]);
        report(&feed, &waiting, hole.as_mut());
        assert_eq!(*stall.borrow(), None);
    }
}
