//! tonic's own refusals of a request it cannot decode, in the codes gRPC clients act on:
//! - a request larger than the server's decoding limit is RESOURCE_EXHAUSTED, as gRPC's
//!   status code conventions say ("a request message larger than the server's limit");
//!   tonic answers OUT_OF_RANGE, a code meant for reading past the end of a range, so a
//!   client retrying on RESOURCE_EXHAUSTED or reporting limits never recognises it;
//! - a request that is not a valid protobuf encoding of its message (a field of the wrong
//!   wire type, a string that is not UTF-8, a length past the end) is INVALID_ARGUMENT:
//!   tonic answers INTERNAL, which says the server is at fault and which clients and
//!   dashboards count as a server error. prost's explanation, which names the field, is
//!   kept, cut short.

use herald_model::shorten;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::util::MapResponseLayer;

/// How tonic's decoder words its refusals (tonic 0.14 `codec/decode.rs`, tonic-prost
/// `from_decode_error` over prost's `DecodeError`); the tests in `tests/errors.rs` and
/// `tests/hostile.rs` notice if a new tonic words them otherwise.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";
const PROST_UNDECODABLE: &str = "failed to decode Protobuf message: ";

/// The longest explanation kept from prost's error.
const EXPLANATION_LIMIT: usize = 200;

type Rewrite = fn(http::Response<Body>) -> http::Response<Body>;

/// The layer for `Server::builder().layer(..)`: it rewrites only those two refusals, which
/// tonic sends as trailers-only responses carrying their `Status`.
pub fn layer() -> MapResponseLayer<Rewrite> {
    MapResponseLayer::new(rewrite as Rewrite)
}

fn rewrite(response: http::Response<Body>) -> http::Response<Body> {
    match response.extensions().get::<Status>() {
        Some(status)
            if status.code() == Code::OutOfRange
                && status.message().starts_with(TONIC_TOO_LARGE) =>
        {
            Status::resource_exhausted(message(status.message())).into_http()
        }
        Some(status) if status.code() == Code::Internal => {
            match status.message().strip_prefix(PROST_UNDECODABLE) {
                Some(why) => Status::invalid_argument(format!(
                    "the request is not a valid protobuf message: {}",
                    shorten(why, EXPLANATION_LIMIT)
                ))
                .into_http(),
                None => response,
            }
        }
        _ => response,
    }
}

/// tonic's "found N bytes, the limit is: M bytes" in Herald's words, or tonic's own text
/// if it ever reads differently.
fn message(tonic: &str) -> String {
    let number = |after: &str| -> Option<u64> {
        let rest = &tonic[tonic.find(after)? + after.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    match (number("found "), number("the limit is: ")) {
        (Some(found), Some(limit)) => format!(
            "the request message is {found} bytes, more than the {limit} bytes this server accepts; send fewer or smaller items"
        ),
        _ => tonic.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: Status) -> http::Response<Body> {
        rewrite(status.into_http())
    }

    fn code_of(response: &http::Response<Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn tonics_size_refusal_becomes_resource_exhausted() {
        let response = refusal(Status::out_of_range(
            "Error, decoded message length too large: found 20971521 bytes, the limit is: 16777216 bytes",
        ));
        assert_eq!(code_of(&response), Some("8"));
        let status = response.extensions().get::<Status>().expect("status");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the request message is 20971521 bytes, more than the 16777216 bytes this server accepts; send fewer or smaller items"
        );
    }

    #[test]
    fn an_undecodable_request_becomes_invalid_argument_naming_the_field() {
        let response = refusal(Status::internal(
            "failed to decode Protobuf message: AllocateRequest.owner: Owner.name: invalid string value: data is not UTF-8 encoded",
        ));
        assert_eq!(code_of(&response), Some("3"));
        let status = response.extensions().get::<Status>().expect("status");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the request is not a valid protobuf message: AllocateRequest.owner: Owner.name: invalid string value: data is not UTF-8 encoded"
        );
        let long = format!("failed to decode Protobuf message: {}", "x".repeat(5000));
        let status = refusal(Status::internal(long));
        let status = status.extensions().get::<Status>().expect("status");
        assert!(status.message().len() < 300, "{}", status.message().len());
    }

    #[test]
    fn every_other_status_passes_unchanged() {
        for status in [
            Status::out_of_range("after_revision is past the end"),
            Status::invalid_argument("Error, decoded message length too large"),
            Status::unavailable("the store is not open yet"),
            Status::internal("the store returned a row it cannot read"),
        ] {
            let code = status.code();
            let response = refusal(status);
            assert_eq!(
                response.extensions().get::<Status>().map(Status::code),
                Some(code)
            );
        }
        let ok = http::Response::new(Body::empty());
        assert_eq!(code_of(&rewrite(ok)), None);
    }
}
