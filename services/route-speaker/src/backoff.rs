//! The delays between the speaker's attempts to subscribe to IPAM: backon's exponential
//! backoff with jitter, started over once a subscription has been healthy for a while.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// First retry delay: quick enough that an IPAM rolling restart costs well under a second.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay: a node that waits for its registration, or for an IPAM outage to
/// end, costs IPAM one call per 10 s at most.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A subscription that delivered snapshots for this long was healthy: the next failure
/// retries from [`MIN_BACKOFF`] again. One that fails sooner (an IPAM that answers and
/// then falls over, again and again) keeps the delays growing, so a crash-looping IPAM
/// is not hammered by every node.
pub const HEALTHY_AFTER: Duration = MAX_BACKOFF;

/// Delays that double from `min` up to `max`, each drawn from the upper half of its step
/// (and never below `min`), so many speakers that lost IPAM together do not reconnect in
/// lockstep.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        // backon's jitter adds up to one more current delay to each step ([d, 2d)): a
        // backoff over half the bounds gives delays in the upper half of [min, max]'s steps.
        let builder = ExponentialBuilder::new()
            .with_min_delay(min / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            min,
            max,
            builder,
            delays: builder.build(),
        }
    }

    /// The next delay, in `[min, max]`.
    pub fn next_delay(&mut self) -> Duration {
        // Built without a limit on attempts, the iterator never ends.
        self.delays
            .next()
            .unwrap_or(self.max)
            .clamp(self.min, self.max)
    }

    /// Back to the first step.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The delay after a subscription ended, given how long it delivered snapshots
    /// (`None`: it never delivered one): from the first step again after a healthy one
    /// ([`HEALTHY_AFTER`]), else the next step.
    pub fn after_failure(&mut self, healthy_for: Option<Duration>) -> Duration {
        if healthy_for.is_some_and(|up| up >= HEALTHY_AFTER) {
            self.reset();
        }
        self.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_bounds_and_reset() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(
                *d >= MIN_BACKOFF && *d <= MAX_BACKOFF,
                "{d:?} out of bounds"
            );
        }
        // The first step is the minimum exactly (its lower half is below the minimum).
        assert_eq!(delays[0], MIN_BACKOFF);
        // After enough steps every delay is in the top half of the cap.
        for d in &delays[10..] {
            assert!(*d >= MAX_BACKOFF / 2, "{d:?} below half the cap");
        }
        // Twenty steps in, the total wait is well past a minute: no tight loop.
        let total: Duration = delays[..20].iter().sum();
        assert!(total > Duration::from_secs(60), "{total:?}");
        b.reset();
        assert_eq!(b.next_delay(), MIN_BACKOFF);
    }

    #[test]
    fn jitter_spreads_delays() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::default();
                b.next_delay();
                b.next_delay();
                b.next_delay()
            })
            .collect();
        // The third step is drawn from [200 ms, 400 ms]; twenty draws are not all equal.
        assert!(delays.len() > 1, "{delays:?}");
        for d in delays {
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        }
    }

    #[test]
    fn max_below_min_is_clamped() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }

    #[test]
    fn only_a_healthy_subscription_starts_the_delays_over() {
        let mut b = Backoff::default();
        // Never delivered, or delivered and fell over at once: the delays keep growing.
        let mut last = Duration::ZERO;
        for healthy_for in [
            None,
            None,
            Some(Duration::from_secs(1)),
            None,
            Some(HEALTHY_AFTER / 2),
        ] {
            last = b.after_failure(healthy_for);
        }
        // The fifth step is drawn from [800 ms, 1.6 s].
        assert!(last >= Duration::from_millis(800), "{last:?}");
        // Healthy for long enough: from the first step again.
        assert_eq!(b.after_failure(Some(HEALTHY_AFTER)), MIN_BACKOFF);
        let second = b.after_failure(None);
        assert!(second <= Duration::from_millis(200), "{second:?}");
    }
}
