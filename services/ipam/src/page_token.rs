//! Page tokens: opaque to clients, and checked when they come back. A token names the
//! listing that issued it and the position to go on from, so a token from another
//! listing, an invented one or a garbled one is refused with INVALID_ARGUMENT instead of
//! being read as a position (where "xyz" would quietly give an empty last page).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_model::FieldError;
use herald_model::alloc::validate_uid;

/// The paginated listings, each with its own token tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// ListAllocations: the position is the last owner uid of the page.
    Allocations,
    /// History: the position is the last revision of the page.
    History,
    /// GetAdvertisementStatus: the position is the last entry's owner uid, prefix, node
    /// and peer, one per line.
    AdvertisementStatus,
}

impl Listing {
    /// The version goes with the tag, so a later token format can refuse old tokens.
    fn tag(self) -> &'static str {
        match self {
            Self::Allocations => "allocations.v1:",
            Self::History => "history.v1:",
            Self::AdvertisementStatus => "status.v1:",
        }
    }

    fn rpc(self) -> &'static str {
        match self {
            Self::Allocations => "ListAllocations",
            Self::History => "History",
            Self::AdvertisementStatus => "GetAdvertisementStatus",
        }
    }
}

/// The token for the page after `position`.
pub fn issue(listing: Listing, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}{position}", listing.tag()))
}

/// The position a token asks for; `None` for the empty token (the first page).
pub fn read(listing: Listing, field: &str, token: &str) -> Result<Option<String>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    // The value is not echoed: it is the client's own, meaningless to it, and may be long.
    let refuse = || {
        FieldError::new(
            field,
            "",
            format!(
                "is not a page token {} issued; pass the next_page_token of the previous page, or nothing for the first page",
                listing.rpc()
            ),
        )
    };
    let decoded = URL_SAFE_NO_PAD.decode(token).map_err(|_| refuse())?;
    let text = String::from_utf8(decoded).map_err(|_| refuse())?;
    let position = text.strip_prefix(listing.tag()).ok_or_else(refuse)?;
    let valid = match listing {
        Listing::Allocations => validate_uid(field, position).is_ok(),
        Listing::History => position.parse::<i64>().is_ok_and(|r| r > 0),
        Listing::AdvertisementStatus => {
            let parts: Vec<&str> = position.split('\n').collect();
            parts.len() == 4 && parts.iter().all(|p| p.len() <= 256)
        }
    };
    if !valid {
        return Err(refuse());
    }
    Ok(Some(position.to_string()))
}

/// The revision a History token goes on before; 0 for the empty token (the newest page).
pub fn read_revision(field: &str, token: &str) -> Result<i64, FieldError> {
    let Some(position) = read(Listing::History, field, token)? else {
        return Ok(0);
    };
    // `read` has checked that it is a positive revision.
    position
        .parse()
        .map_err(|_| FieldError::new(field, "", "is not a History page token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_as_its_position_in_its_own_listing_only() {
        let token = issue(Listing::Allocations, "5f1c8a7e");
        assert_ne!(token, "5f1c8a7e", "opaque");
        assert_eq!(
            read(Listing::Allocations, "page_token", &token),
            Ok(Some("5f1c8a7e".into()))
        );
        assert!(read(Listing::History, "page_token", &token).is_err());
        let history = issue(Listing::History, "42");
        assert_eq!(
            read(Listing::History, "page_token", &history),
            Ok(Some("42".into()))
        );
        assert!(read(Listing::Allocations, "page_token", &history).is_err());
        assert_eq!(read(Listing::History, "page_token", ""), Ok(None));
        assert_eq!(read_revision("page_token", &history), Ok(42));
        assert_eq!(read_revision("page_token", ""), Ok(0));
    }

    #[test]
    fn garbled_and_invented_tokens_are_refused_naming_the_field() {
        let bad_history = issue(Listing::History, "-3");
        let bad_uid = issue(Listing::Allocations, "a b");
        let long = "x".repeat(100_000);
        for (listing, token) in [
            (Listing::Allocations, "xyz"),
            (Listing::Allocations, "%%%"),
            (Listing::Allocations, bad_uid.as_str()),
            (Listing::Allocations, long.as_str()),
            (Listing::History, "1"),
            (Listing::History, bad_history.as_str()),
            (Listing::History, "aGlzdG9yeS52MTo"),
        ] {
            let err = read(listing, "page_token", token).expect_err(token);
            assert_eq!(err.field, "page_token");
            assert!(err.to_string().len() < 200, "short: {err}");
        }
    }
}
