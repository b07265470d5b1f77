//! Coalesces the calls of concurrent reconciles into batch calls: their Allocates into
//! AllocateBatch, their endpoints into SetServiceEndpointsBatch.
//!
//! No timer and no task of its own: a caller queues its request, then waits for either its
//! answer or a free batch slot. Whoever takes a slot sends everything queued (up to the
//! batch size) in one call and hands every answer back. A lone request therefore goes out
//! at once, alone, as the plain call in its caller's span (its trace is unchanged);
//! requests that arrive while the slots are busy wait only for a slot, and leave together.
//! herald-ipam writes a batch in one transaction, so a burst of Services costs a few
//! commits instead of one each.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use herald_api::ipam::v1 as ipam;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_api::routing::v1 as routing;
use herald_api::routing::v1::routing_client::RoutingClient;
use herald_telemetry::trace::Inject;
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

/// Batch calls in flight at once, per batcher. herald-ipam commits a batch in one
/// transaction; with a few in flight one batch gathers while the others commit, and more
/// would only split a burst into smaller batches.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// A call that has a batch form.
pub trait Call: Send + Sync {
    type Request: Send + 'static;
    type Reply: Send + 'static;
    /// The name of the batch call, for errors.
    const BATCH: &'static str;
    /// One request as the plain call.
    fn one(
        &self,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Reply, Status>> + Send;
    /// Many requests in one batch call: one answer per request, in their order (fewer is
    /// a broken server, answered INTERNAL for the rest by the batcher).
    fn many(
        &self,
        requests: Vec<Self::Request>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Reply, Status>>, Status>> + Send;
    /// Counts a call of `size` requests.
    fn observe(size: usize);
}

type Answer<C> = Result<<C as Call>::Reply, Status>;

struct Queued<C: Call> {
    request: C::Request,
    reply: oneshot::Sender<Answer<C>>,
    /// The reconcile span the request came from: a batch of one is sent in it.
    span: tracing::Span,
}

pub struct Batcher<C: Call> {
    call: C,
    /// Most requests in one call; 1 sends every request as its own plain call.
    max: usize,
    queue: Mutex<VecDeque<Queued<C>>>,
    slots: Semaphore,
}

impl<C: Call> Batcher<C> {
    pub fn new(call: C, max: usize) -> Self {
        Self {
            call,
            max: max.max(1),
            queue: Mutex::new(VecDeque::new()),
            slots: Semaphore::new(BATCHES_IN_FLIGHT),
        }
    }

    /// The answer to `request`, or the error herald-ipam answered for it (a failed batch
    /// call fails each of its requests with the call's status).
    pub async fn submit(&self, request: C::Request) -> Answer<C> {
        if self.max == 1 {
            // Batching off: exactly one plain call per request, as many in flight as there
            // are reconciles.
            C::observe(1);
            return self.call.one(request).await;
        }
        let (reply, mut answer) = oneshot::channel();
        self.queue().push_back(Queued {
            request,
            reply,
            span: tracing::Span::current(),
        });
        // Bounded: each turn either returns or sends at least one queued request, and
        // this request's place in the queue only moves forward.
        loop {
            let slot = tokio::select! {
                biased;
                answered = &mut answer => return flatten::<C>(answered),
                slot = self.slots.acquire() => slot,
            };
            let Ok(_slot) = slot else {
                // The semaphore is never closed.
                return Err(Status::internal("batcher closed"));
            };
            let batch: Vec<Queued<C>> = {
                let mut queue = self.queue();
                let n = queue.len().min(self.max);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                // Another caller took this request and is sending it.
                return flatten::<C>(answer.await);
            }
            self.send(batch).await;
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued<C>>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(&self, mut batch: Vec<Queued<C>>) {
        C::observe(batch.len());
        if batch.len() == 1 {
            let Some(one) = batch.pop() else { return };
            let answer = self.call.one(one.request).instrument(one.span).await;
            // The caller may have gone (its reconcile was cancelled); nothing waits then.
            let _ = one.reply.send(answer);
            return;
        }
        // The batch goes in the span of its first request: one trace per call.
        let span = batch[0].span.clone();
        let (requests, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.request, q.reply)).unzip();
        let count = requests.len();
        match self.call.many(requests).instrument(span).await {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                for reply in waiters {
                    let answer = answers.next().unwrap_or_else(|| {
                        Err(Status::internal(format!(
                            "{} answered fewer than its {count} requests",
                            C::BATCH
                        )))
                    });
                    let _ = reply.send(answer);
                }
            }
            Err(status) => {
                for reply in waiters {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }
}

fn flatten<C: Call>(answered: Result<Answer<C>, oneshot::error::RecvError>) -> Answer<C> {
    // The sender is dropped unanswered only when the caller sending the batch was
    // cancelled mid-call: whether it was written is unknown, and the retry will ask.
    answered.unwrap_or_else(|_| {
        Err(Status::unavailable(format!(
            "the {} carrying this request was cancelled",
            C::BATCH
        )))
    })
}

/// Allocate, batched as AllocateBatch.
pub struct AllocateCall(pub IpamClient<Inject<Channel>>);

impl Call for AllocateCall {
    type Request = ipam::AllocateRequest;
    type Reply = ipam::Allocation;
    const BATCH: &'static str = "AllocateBatch";

    async fn one(&self, request: ipam::AllocateRequest) -> Result<ipam::Allocation, Status> {
        let response = self.0.clone().allocate(request).await?.into_inner();
        response
            .allocation
            .ok_or_else(|| Status::internal("Allocate answered without an allocation"))
    }

    async fn many(
        &self,
        requests: Vec<ipam::AllocateRequest>,
    ) -> Result<Vec<Result<ipam::Allocation, Status>>, Status> {
        let results = self
            .0
            .clone()
            .allocate_batch(ipam::AllocateBatchRequest { requests })
            .await?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(ipam::allocate_result::Result::Allocation(a)) => Ok(a),
                Some(ipam::allocate_result::Result::Error(e)) => {
                    Err(Status::new(Code::from_i32(e.code), e.message))
                }
                None => Err(Status::internal("AllocateBatch answered an empty result")),
            })
            .collect())
    }

    fn observe(size: usize) {
        crate::metrics::observe_allocate_batch(size);
    }
}

/// SetServiceEndpoints, batched as SetServiceEndpointsBatch.
pub struct EndpointsCall(pub RoutingClient<Inject<Channel>>);

impl Call for EndpointsCall {
    type Request = routing::ServiceEndpoints;
    type Reply = ();
    const BATCH: &'static str = "SetServiceEndpointsBatch";

    async fn one(&self, request: routing::ServiceEndpoints) -> Result<(), Status> {
        self.0.clone().set_service_endpoints(request).await?;
        Ok(())
    }

    async fn many(
        &self,
        items: Vec<routing::ServiceEndpoints>,
    ) -> Result<Vec<Result<(), Status>>, Status> {
        let results = self
            .0
            .clone()
            .set_service_endpoints_batch(routing::SetServiceEndpointsBatchRequest { items })
            .await?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|r| match Code::from_i32(r.code) {
                Code::Ok => Ok(()),
                code => Err(Status::new(code, r.message)),
            })
            .collect())
    }

    fn observe(size: usize) {
        crate::metrics::observe_endpoints_batch(size);
    }
}
