//! A keyed work queue: a key waits at most once, and is never handled by two workers at
//! once; a key that changes while it is handled is handled again afterwards. This is what
//! makes handling level-based: a worker reads the current state, never an event's.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

pub struct Queue<K> {
    inner: Mutex<Inner<K>>,
    notify: Notify,
}

struct Inner<K> {
    order: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    again: HashSet<K>,
}

impl<K: Clone + Eq + Hash + Send + 'static> Queue<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                order: VecDeque::new(),
                queued: HashSet::new(),
                running: HashSet::new(),
                again: HashSet::new(),
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, key: K) {
        let mut inner = self.lock();
        if inner.running.contains(&key) {
            inner.again.insert(key);
        } else if inner.queued.insert(key.clone()) {
            inner.order.push_back(key);
            drop(inner);
            self.notify.notify_one();
        }
    }

    /// Pushes `key` after `delay` (a retry).
    pub fn push_after(self: &Arc<Self>, key: K, delay: Duration) {
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.push(key);
        });
    }

    /// The next key to handle; call [`Self::done`] with it afterwards.
    pub async fn pop(&self) -> K {
        loop {
            {
                let mut inner = self.lock();
                if let Some(key) = inner.order.pop_front() {
                    inner.queued.remove(&key);
                    inner.running.insert(key.clone());
                    // Wake another worker if more is waiting.
                    if !inner.order.is_empty() {
                        self.notify.notify_one();
                    }
                    return key;
                }
            }
            self.notify.notified().await;
        }
    }

    pub fn done(&self, key: &K) {
        let mut inner = self.lock();
        inner.running.remove(key);
        if inner.again.remove(key) && inner.queued.insert(key.clone()) {
            inner.order.push_back(key.clone());
            drop(inner);
            self.notify.notify_one();
        }
    }

    /// Drops every waiting key (the start-up pass handles them all anyway).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.order.clear();
        inner.queued.clear();
    }

    /// Keys waiting (not those being handled).
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_waits_once_and_runs_again_when_changed_while_running() {
        let q = Queue::new();
        q.push("a");
        q.push("b");
        q.push("a");
        assert_eq!(q.len(), 2);
        let a = q.pop().await;
        assert_eq!(a, "a");
        q.push("a"); // changed while running: not queued beside itself
        assert_eq!(q.len(), 1);
        q.done(&a);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().await, "b");
        assert_eq!(q.pop().await, "a");
        q.clear();
        assert_eq!(q.len(), 0);
    }
}
