//! The trace context of the changes this replica was asked to make, from the RPC that
//! made a change to the route engine that publishes its routes. The change log carries
//! no trace context, so a change made through another replica reaches the routes without
//! one (its endpoints' `traceparent` still does, from the stored facts).
//!
//! Empty while tracing is off: nothing is recorded or looked up.

use std::collections::HashMap;
use std::sync::Mutex;

use herald_telemetry::trace::SpanContext;

/// Changes remembered at most; a burst beyond it forgets the older ones (their routes
/// then publish without a parent, nothing worse).
const MAX_REMEMBERED: usize = 16_384;

/// What a change is about: the keys of [`Changes`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An allocation, release or update of this owner uid.
    Owner(String),
    /// This owner's endpoint facts.
    Endpoints(String),
    /// A node upserted or deleted.
    Node(String),
    /// The BGP policy.
    Policy,
}

#[derive(Debug, Default)]
pub struct Changes {
    recent: Mutex<HashMap<Subject, SpanContext>>,
}

impl Changes {
    /// Remembers that the change about `subject` was made under the current span. Call
    /// before the change is written: the feed may deliver it before the write returns.
    pub fn record(&self, subject: Subject) {
        if !herald_telemetry::trace::enabled() {
            return;
        }
        let cx = herald_telemetry::trace::context_of(&tracing::Span::current());
        if !cx.is_valid() {
            return;
        }
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() >= MAX_REMEMBERED {
            recent.clear();
        }
        recent.insert(subject, cx);
    }

    /// The context of the latest change about `subject`, if this replica made it.
    pub fn get(&self, subject: &Subject) -> Option<SpanContext> {
        if !herald_telemetry::trace::enabled() {
            return None;
        }
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(subject)
            .cloned()
    }
}
