//! Exponential backoff with jitter for reconnecting to IPAM.

use std::time::Duration;

use rand::Rng;

/// First retry delay: quick enough that an IPAM rolling restart costs well under a second.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay: a node that waits for its registration, or for an IPAM outage to
/// end, costs IPAM one call per 10 s at most.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Doubles from `min` up to `max`; each delay is drawn from the upper half of the current
/// step (and never below `min`), so many speakers that lost IPAM together do not reconnect
/// in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The next delay, in `[min, max]`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let low = (step / 2).max(self.min);
        if low >= step {
            return step;
        }
        let nanos = rand::rng().random_range(low.as_nanos()..=step.as_nanos());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Back to the first step (after a connection worked).
    pub fn reset(&mut self) {
        self.step = self.min;
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
}
