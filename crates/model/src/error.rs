//! The one validation error type: which field, which value, and what is wrong with it;
//! and [`shorten`], which keeps every value an error repeats short.

use std::borrow::Cow;
use std::fmt;

/// Most bytes of a caller's value that an error repeats. Enough to recognise the value;
/// an error that echoed a 3 MB label whole would not fit in the 16 KiB of metadata that
/// gRPC C-core clients accept, and they would see a reset stream instead of the error.
pub const MAX_ECHO_BYTES: usize = 64;
/// Most bytes of a field path or a reason in a [`FieldError`]: a field path can carry a
/// label key (up to 317 bytes), and a reason can quote part of the value.
pub const MAX_FIELD_BYTES: usize = 160;
pub const MAX_REASON_BYTES: usize = 200;

/// `text` as an error may show it: whole when it has at most `max_bytes` bytes, else cut
/// on a character boundary and marked with its full length, `aaaa… (3145728 bytes)`, so
/// that the result never has more than `max_bytes` bytes (nor fewer than the marker).
pub fn shorten(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let marker = format!("… ({} bytes)", text.len());
    let cut = text.floor_char_boundary(max_bytes.saturating_sub(marker.len()));
    Cow::Owned(format!("{}{marker}", &text[..cut]))
}

/// A piece of the caller's input as an error message quotes it: [`shorten`]ed to
/// [`MAX_ECHO_BYTES`].
pub fn echo(text: &str) -> Cow<'_, str> {
    shorten(text, MAX_ECHO_BYTES)
}

/// A rejected input, naming the field (in the API's own spelling, e.g. `pool.addresses[2]`)
/// and the offending value, so a user can fix the request without reading code. Every
/// part is [`shorten`]ed when built, so the error stays short whatever the input.
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
            field: shortened(field.into(), MAX_FIELD_BYTES),
            value: shortened(value.to_string(), MAX_ECHO_BYTES),
            reason: shortened(reason.into(), MAX_REASON_BYTES),
        }
    }

    /// The same error seen from an enclosing message: `addresses[0]` becomes `pool.addresses[0]`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = shortened(format!("{parent}.{}", self.field), MAX_FIELD_BYTES);
        self
    }
}

fn shortened(text: String, max_bytes: usize) -> String {
    match shorten(&text, max_bytes) {
        Cow::Borrowed(_) => text,
        Cow::Owned(short) => short,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        assert!(matches!(shorten("lab", 64), Cow::Borrowed("lab")));
        let exact = "a".repeat(64);
        assert_eq!(shorten(&exact, 64), exact);
    }

    #[test]
    fn long_text_is_cut_and_says_how_long_it_was() {
        let long = "a".repeat(3 * 1024 * 1024);
        let short = shorten(&long, 64);
        assert!(short.len() <= 64, "{short}");
        assert!(short.ends_with("… (3145728 bytes)"), "{short}");
        assert!(short.starts_with("aaaaaaaaaa"), "{short}");
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // Each 'é' is two bytes and each '😀' four: a cut inside one would panic.
        for text in [
            "é".repeat(100),
            "😀".repeat(100),
            format!("a{}", "😀".repeat(50)),
        ] {
            let marker = format!("… ({} bytes)", text.len());
            for max in marker.len()..text.len() {
                let short = shorten(&text, max);
                assert!(short.len() <= max, "{max}: {short}");
                assert!(short.ends_with(&marker), "{short}");
            }
            // Too small a budget still says what was cut.
            assert_eq!(shorten(&text, 3), marker);
        }
        let faces = "😀".repeat(100);
        let short = shorten(&faces, 40);
        assert!(short.starts_with("😀😀😀"), "{short}");
    }

    #[test]
    fn field_errors_stay_short_whatever_the_input() {
        let big = "x".repeat(1 << 20);
        let err = FieldError::new(
            format!("service_labels[{big}]"),
            &big,
            format!("{big:?} is not valid"),
        )
        .within("requests[999]");
        assert!(err.field.len() <= MAX_FIELD_BYTES, "{}", err.field);
        assert!(err.value.len() <= MAX_ECHO_BYTES, "{}", err.value);
        assert!(err.reason.len() <= MAX_REASON_BYTES, "{}", err.reason);
        assert!(err.field.starts_with("requests[999].service_labels[xxx"));
        assert!(err.to_string().len() < 512, "{err}");
        assert!(err.value.ends_with("(1048576 bytes)"), "{}", err.value);
    }

    #[test]
    fn short_field_errors_read_as_before() {
        let err = FieldError::new("pool.name", "Bad_Name", "must be a DNS label");
        assert_eq!(
            err.to_string(),
            "pool.name \"Bad_Name\": must be a DNS label"
        );
        assert_eq!(
            FieldError::new("pool", "", "is required").to_string(),
            "pool: is required"
        );
    }
}
