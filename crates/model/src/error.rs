//! The one validation error type: which field, which value, and what is wrong with it.

use std::fmt;

/// A rejected input, naming the field (in the API's own spelling, e.g. `pool.addresses[2]`)
/// and the offending value, so a user can fix the request without reading code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The same error seen from an enclosing message: `addresses[0]` becomes `pool.addresses[0]`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.reason)
        } else {
            write!(f, "{} {:?}: {}", self.field, self.value, self.reason)
        }
    }
}

impl std::error::Error for FieldError {}
