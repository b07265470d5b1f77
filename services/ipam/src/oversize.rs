//! A request larger than the server's decoding limit is RESOURCE_EXHAUSTED, as gRPC's
//! status code conventions say ("a request message larger than the server's limit");
//! tonic answers it with OUT_OF_RANGE, a code meant for reading past the end of a range,
//! so a client retrying on RESOURCE_EXHAUSTED or reporting limits never recognises it.

use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::util::MapResponseLayer;

/// How tonic's decoder words its refusal (tonic 0.14 `codec/decode.rs`); the tests in
/// `tests/errors.rs` notice if a new tonic words it otherwise.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

type Rewrite = fn(http::Response<Body>) -> http::Response<Body>;

/// The layer for `Server::builder().layer(..)`: it rewrites only that one refusal, which
/// tonic sends as a trailers-only response carrying its `Status`.
pub fn layer() -> MapResponseLayer<Rewrite> {
    MapResponseLayer::new(resource_exhausted as Rewrite)
}

fn resource_exhausted(response: http::Response<Body>) -> http::Response<Body> {
    match response.extensions().get::<Status>() {
        Some(status)
            if status.code() == Code::OutOfRange
                && status.message().starts_with(TONIC_TOO_LARGE) =>
        {
            Status::resource_exhausted(message(status.message())).into_http()
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
        resource_exhausted(status.into_http())
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
    fn every_other_status_passes_unchanged() {
        for status in [
            Status::out_of_range("after_revision is past the end"),
            Status::invalid_argument("Error, decoded message length too large"),
            Status::unavailable("the store is not open yet"),
        ] {
            let code = status.code();
            let response = refusal(status);
            assert_eq!(
                response.extensions().get::<Status>().map(Status::code),
                Some(code)
            );
        }
        let ok = http::Response::new(Body::empty());
        assert_eq!(code_of(&resource_exhausted(ok)), None);
    }
}
