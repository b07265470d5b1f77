//! Server limits that tonic's builder does not have, as one tower layer:
//! - a bound on the calls in flight across all connections, answering RESOURCE_EXHAUSTED
//!   at once when reached (load shedding: a retryable refusal before the process is
//!   overwhelmed, rather than a queue that grows without bound);
//! - a bound on open Watch and WatchNodeRoutes streams, held until the stream ends;
//! - a per-identity rate limit on Allocate and AllocateBatch (governor's keyed limiter),
//!   so one compromised or looping caller cannot exhaust a pool in a burst. Plaintext
//!   callers have no identity and are not rate-limited.
//!
//! Per-call deadlines and HTTP/2 keepalive are tonic's own (`Server::timeout`,
//! `http2_keepalive_*`), set in `run`.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;

use crate::authz::Caller;

/// The limits' values, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent_rpcs: usize,
    pub max_watch_streams: usize,
    /// Allocate calls per second per identity; a burst of as many is allowed.
    pub allocate_rate: NonZeroU32,
}

#[derive(Clone)]
pub struct LimitsLayer {
    limits: Limits,
    rpcs: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    allocate: Arc<DefaultKeyedRateLimiter<String>>,
}

impl LimitsLayer {
    pub fn new(limits: Limits) -> Self {
        LimitsLayer {
            limits,
            rpcs: Arc::new(Semaphore::new(limits.max_concurrent_rpcs)),
            streams: Arc::new(Semaphore::new(limits.max_watch_streams)),
            allocate: Arc::new(RateLimiter::keyed(Quota::per_second(limits.allocate_rate))),
        }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> LimitsService<S> {
        LimitsService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
    layer: LimitsLayer,
}

fn is_stream(path: &str) -> bool {
    matches!(
        path,
        "/herald.ipam.v1.Ipam/Watch" | "/herald.routing.v1.Routing/WatchNodeRoutes"
    )
}

fn is_allocate(path: &str) -> bool {
    matches!(
        path,
        "/herald.ipam.v1.Ipam/Allocate" | "/herald.ipam.v1.Ipam/AllocateBatch"
    )
}

impl<S, B> tower::Service<http::Request<B>> for LimitsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let refuse = |status: Status| futures::future::ready(Ok(status.into_http())).boxed();
        let path = request.uri().path().to_string();
        let Ok(call_permit) = Arc::clone(&self.layer.rpcs).try_acquire_owned() else {
            return refuse(Status::resource_exhausted(format!(
                "herald-ipam is at its limit of {} calls in flight; retry with backoff",
                self.layer.limits.max_concurrent_rpcs
            )));
        };
        if is_allocate(&path)
            && let Some(Caller::Tls(identity)) = request.extensions().get::<Caller>()
            && self.layer.allocate.check_key(&identity.san).is_err()
        {
            return refuse(Status::resource_exhausted(format!(
                "{identity} is over its rate of {} Allocate calls a second; retry with backoff",
                self.layer.limits.allocate_rate
            )));
        }
        let stream_permit = if is_stream(&path) {
            match Arc::clone(&self.layer.streams).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return refuse(Status::resource_exhausted(format!(
                        "herald-ipam has its limit of {} open Watch and WatchNodeRoutes streams; retry with backoff",
                        self.layer.limits.max_watch_streams
                    )));
                }
            }
        } else {
            None
        };
        let call = self.inner.call(request);
        async move {
            let response = call.await?;
            drop(call_permit);
            Ok(match stream_permit {
                // The stream is open until its body ends (or the client goes away and
                // the body is dropped); the permit goes with the body.
                Some(permit) => response.map(|body| {
                    Body::new(HoldPermit {
                        inner: body,
                        _permit: permit,
                    })
                }),
                None => response,
            })
        }
        .boxed()
    }
}

/// A response body that holds a permit until it is dropped.
struct HoldPermit {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for HoldPermit {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
