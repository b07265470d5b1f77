//! A set of free addresses kept as disjoint inclusive intervals, so that taking the lowest
//! free address, taking a given one and giving one back are all O(log n) in the number of
//! intervals, whatever the pool's size and however full it is.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreeSet {
    /// start → end (inclusive), disjoint and never adjacent.
    intervals: BTreeMap<u128, u128>,
}

impl FreeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `first..=last` as free, merging with neighbours.
    pub fn insert_range(&mut self, first: u128, last: u128) {
        debug_assert!(first <= last);
        let mut first = first;
        let mut last = last;
        // Merge with an interval that starts at or before `first` and reaches it.
        if let Some((&s, &e)) = self.intervals.range(..=first).next_back()
            && e.saturating_add(1) >= first
        {
            first = s;
            last = last.max(e);
            self.intervals.remove(&s);
        }
        // Absorb intervals that start inside or right after the new one.
        while let Some((&s, &e)) = self.intervals.range(first..).next() {
            if s > last.saturating_add(1) {
                break;
            }
            last = last.max(e);
            self.intervals.remove(&s);
        }
        self.intervals.insert(first, last);
    }

    pub fn insert(&mut self, value: u128) {
        self.insert_range(value, value);
    }

    pub fn contains(&self, value: u128) -> bool {
        self.intervals
            .range(..=value)
            .next_back()
            .is_some_and(|(_, &e)| e >= value)
    }

    /// Removes `value`; returns whether it was free.
    pub fn remove(&mut self, value: u128) -> bool {
        let Some((&s, &e)) = self.intervals.range(..=value).next_back() else {
            return false;
        };
        if e < value {
            return false;
        }
        self.intervals.remove(&s);
        if s < value {
            self.intervals.insert(s, value - 1);
        }
        if value < e {
            self.intervals.insert(value + 1, e);
        }
        true
    }

    /// Removes every free address in `first..=last`.
    pub fn remove_range(&mut self, first: u128, last: u128) {
        let overlapping: Vec<(u128, u128)> = self
            .intervals
            .range(..=last)
            .rev()
            .take_while(|(_, e)| **e >= first)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.intervals.remove(&s);
            if s < first {
                self.intervals.insert(s, first - 1);
            }
            if e > last {
                self.intervals.insert(last + 1, e);
            }
        }
    }

    pub fn lowest(&self) -> Option<u128> {
        self.intervals.first_key_value().map(|(s, _)| *s)
    }

    pub fn highest(&self) -> Option<u128> {
        self.intervals.last_key_value().map(|(_, e)| *e)
    }

    /// The lowest free address at or above `value`, if any.
    pub fn first_at_or_after(&self, value: u128) -> Option<u128> {
        if self.contains(value) {
            return Some(value);
        }
        self.intervals.range(value..).next().map(|(s, _)| *s)
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }

    /// Number of free addresses (saturating for the whole IPv6 space).
    pub fn len(&self) -> u128 {
        self.intervals
            .iter()
            .fold(0u128, |n, (s, e)| n.saturating_add(e - s).saturating_add(1))
    }

    pub fn interval_count(&self) -> usize {
        self.intervals.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_give_back_keep_intervals_minimal() {
        let mut set = FreeSet::new();
        set.insert_range(10, 19);
        assert_eq!(set.lowest(), Some(10));
        assert!(set.remove(10));
        assert!(!set.remove(10), "an address is taken once");
        assert!(set.remove(15));
        assert_eq!(set.interval_count(), 2);
        assert_eq!(set.len(), 8);
        set.insert(15);
        set.insert(10);
        assert_eq!(set.interval_count(), 1);
        assert_eq!(set.len(), 10);
        assert!(!set.contains(20));
        set.remove_range(12, 100);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn first_at_or_after_finds_the_next_free_address() {
        let mut set = FreeSet::new();
        set.insert_range(10, 19);
        set.insert_range(30, 39);
        assert_eq!(set.first_at_or_after(0), Some(10));
        assert_eq!(set.first_at_or_after(15), Some(15));
        assert_eq!(set.first_at_or_after(20), Some(30));
        assert_eq!(set.first_at_or_after(39), Some(39));
        assert_eq!(set.first_at_or_after(40), None);
        assert_eq!(set.highest(), Some(39));
        assert_eq!(FreeSet::new().highest(), None);
    }

    #[test]
    fn full_ipv6_space_does_not_overflow() {
        let mut set = FreeSet::new();
        set.insert_range(0, u128::MAX);
        assert_eq!(set.len(), u128::MAX);
        assert!(set.remove(u128::MAX));
        set.insert(u128::MAX);
        assert_eq!(set.interval_count(), 1);
    }

    #[test]
    fn filling_a_pool_stays_one_interval_from_the_bottom() {
        let mut set = FreeSet::new();
        set.insert_range(0, 65_535);
        for expected in 0..65_536u128 {
            let v = set.lowest().expect("not yet exhausted");
            assert_eq!(v, expected);
            set.remove(v);
            assert!(set.interval_count() <= 1);
        }
        assert!(set.is_empty());
    }
}
