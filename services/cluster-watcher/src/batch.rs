//! Coalesces the Allocate calls of concurrent reconciles into AllocateBatch calls.
//!
//! No timer and no task of its own: a caller queues its request, then waits for either its
//! answer or a free batch slot. Whoever takes a slot sends everything queued (up to the
//! batch size) in one call and hands every answer back. A lone request therefore goes out
//! at once, alone, as a plain Allocate in its caller's span (its trace is unchanged);
//! requests that arrive while the slots are busy wait only for a slot, and leave together.
//! herald-ipam plans a batch's new owners together and commits them in one transaction,
//! so a burst of Services costs a few commits instead of one each.

use std::collections::VecDeque;
use std::sync::Mutex;

use herald_api::ipam::v1 as ipam;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_telemetry::trace::Inject;
use tokio::sync::{Semaphore, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

/// AllocateBatch calls in flight at once. herald-ipam commits a batch in one transaction;
/// with a few in flight one batch gathers while the others commit, and more would only
/// split a burst into smaller batches.
pub const BATCHES_IN_FLIGHT: usize = 4;

type Answer = Result<ipam::Allocation, Status>;

struct Queued {
    request: ipam::AllocateRequest,
    reply: oneshot::Sender<Answer>,
    /// The reconcile span the request came from: a batch of one is sent in it.
    span: tracing::Span,
}

pub struct AllocateBatcher {
    client: IpamClient<Inject<Channel>>,
    /// Most requests in one call; 1 sends every request as its own Allocate.
    max: usize,
    queue: Mutex<VecDeque<Queued>>,
    slots: Semaphore,
}

impl AllocateBatcher {
    pub fn new(client: IpamClient<Inject<Channel>>, max: usize) -> Self {
        Self {
            client,
            max: max.max(1),
            queue: Mutex::new(VecDeque::new()),
            slots: Semaphore::new(BATCHES_IN_FLIGHT),
        }
    }

    /// The allocation for `request`, or the error herald-ipam answered for it (a failed
    /// batch call fails each of its requests with the call's status).
    pub async fn allocate(&self, request: ipam::AllocateRequest) -> Answer {
        if self.max == 1 {
            // Batching off: exactly one Allocate per request, as many in flight as there
            // are reconciles.
            crate::metrics::observe_allocate_batch(1);
            return Self::single(self.client.clone(), request).await;
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
                answered = &mut answer => return flatten(answered),
                slot = self.slots.acquire() => slot,
            };
            let Ok(_slot) = slot else {
                // The semaphore is never closed.
                return Err(Status::internal("allocate batcher closed"));
            };
            let batch: Vec<Queued> = {
                let mut queue = self.queue();
                let n = queue.len().min(self.max);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                // Another caller took this request and is sending it.
                return flatten(answer.await);
            }
            self.send(batch).await;
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn single(
        mut client: IpamClient<Inject<Channel>>,
        request: ipam::AllocateRequest,
    ) -> Answer {
        let response = client.allocate(request).await?.into_inner();
        response
            .allocation
            .ok_or_else(|| Status::internal("Allocate answered without an allocation"))
    }

    async fn send(&self, mut batch: Vec<Queued>) {
        crate::metrics::observe_allocate_batch(batch.len());
        if batch.len() == 1 {
            let Some(one) = batch.pop() else { return };
            let answer = Self::single(self.client.clone(), one.request)
                .instrument(one.span)
                .await;
            // The caller may have gone (its reconcile was cancelled); nothing waits then.
            let _ = one.reply.send(answer);
            return;
        }
        // The batch goes in the span of its first request: one trace per call.
        let span = batch[0].span.clone();
        let (requests, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.request, q.reply)).unzip();
        let count = requests.len();
        let result = self
            .client
            .clone()
            .allocate_batch(ipam::AllocateBatchRequest { requests })
            .instrument(span)
            .await;
        match result {
            Ok(response) => {
                let mut results = response.into_inner().results.into_iter();
                for reply in waiters {
                    let answer = match results.next().and_then(|r| r.result) {
                        Some(ipam::allocate_result::Result::Allocation(a)) => Ok(a),
                        Some(ipam::allocate_result::Result::Error(e)) => {
                            Err(Status::new(Code::from_i32(e.code), e.message))
                        }
                        None => Err(Status::internal(format!(
                            "AllocateBatch answered fewer than its {count} requests"
                        ))),
                    };
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

fn flatten(answered: Result<Answer, oneshot::error::RecvError>) -> Answer {
    // The sender is dropped unanswered only when the caller sending the batch was
    // cancelled mid-call: whether it was allocated is unknown, and the retry will ask.
    answered.unwrap_or_else(|_| {
        Err(Status::unavailable(
            "the batch carrying this Allocate was cancelled",
        ))
    })
}
