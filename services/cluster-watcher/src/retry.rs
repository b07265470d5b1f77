//! How long the watcher waits before trying again what failed: backon's exponential
//! backoff, doubling from a first delay up to a ceiling. [`Backoff`] is one retrying
//! loop's (the start-up passes, the IPAM change stream, the BGP policy); [`PerObject`]
//! keeps one per object for kube-runtime's error policies, which requeue each object on
//! its own and so each need their own count of failures in a row.
//!
//! No jitter: a retry requeues one object in the controller's queue (or one loop of a
//! single watcher), it does not open connections from many processes at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `first` up to `ceiling`, without end.
fn builder(first: Duration, ceiling: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(ceiling.max(first))
        .with_factor(2.0)
        .without_max_times()
}

/// The delays of one retrying loop.
#[derive(Debug)]
pub struct Backoff {
    ceiling: Duration,
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Backoff {
    pub fn new(first: Duration, ceiling: Duration) -> Backoff {
        let builder = builder(first, ceiling);
        Backoff {
            ceiling: ceiling.max(first),
            builder,
            delays: builder.build(),
        }
    }

    /// The wait after one more failure in a row.
    pub fn next_delay(&mut self) -> Duration {
        // Built without a limit on attempts, the iterator never ends.
        self.delays.next().unwrap_or(self.ceiling)
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// One [`Backoff`] per object, made at its first failure and dropped at its success.
#[derive(Debug)]
pub struct PerObject<K> {
    first: Duration,
    ceiling: Duration,
    failing: Mutex<HashMap<K, Backoff>>,
}

impl<K: Hash + Eq + Clone> PerObject<K> {
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        PerObject {
            first,
            ceiling,
            failing: Mutex::new(HashMap::new()),
        }
    }

    /// `key` failed once more: how long until it is tried again.
    pub fn failed(&self, key: &K) -> Duration {
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failing
            .entry(key.clone())
            .or_insert_with(|| Backoff::new(self.first, self.ceiling))
            .next_delay()
    }

    /// `key` succeeded (or is gone): its next failure waits the first delay again.
    pub fn succeeded(&self, key: &K) {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(200);
    const CEILING: Duration = Duration::from_secs(10);

    /// In whole milliseconds: backon multiplies in f32, a few nanoseconds off.
    fn ms(delay: Duration) -> u64 {
        (delay.as_secs_f64() * 1000.0).round() as u64
    }

    #[test]
    fn delays_double_from_the_first_up_to_the_ceiling_and_stay_there() {
        let mut backoff = Backoff::new(FIRST, CEILING);
        let delays: Vec<u64> = (0..12).map(|_| ms(backoff.next_delay())).collect();
        assert_eq!(
            delays,
            [
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000, 10_000, 10_000
            ]
        );
    }

    #[test]
    fn a_reset_starts_from_the_first_delay_again() {
        let mut backoff = Backoff::new(FIRST, CEILING);
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(ms(backoff.next_delay()), 200);
        assert_eq!(ms(backoff.next_delay()), 400);
    }

    #[test]
    fn each_object_backs_off_on_its_own_and_a_success_resets_only_its_own() {
        let retries = PerObject::new(FIRST, CEILING);
        assert_eq!(ms(retries.failed(&"a")), 200);
        assert_eq!(ms(retries.failed(&"a")), 400);
        assert_eq!(ms(retries.failed(&"a")), 800);
        // Another object's first failure waits the first delay, whatever "a" went through.
        assert_eq!(ms(retries.failed(&"b")), 200);
        for _ in 0..40 {
            retries.failed(&"a");
        }
        assert_eq!(ms(retries.failed(&"a")), 10_000);

        retries.succeeded(&"a");
        assert_eq!(ms(retries.failed(&"a")), 200);
        assert_eq!(ms(retries.failed(&"b")), 400);
    }

    #[test]
    fn a_ceiling_below_the_first_delay_waits_the_first_delay() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(ms(backoff.next_delay()), 2000);
        assert_eq!(ms(backoff.next_delay()), 2000);
    }
}
