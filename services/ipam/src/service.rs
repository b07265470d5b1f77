//! The `herald.ipam.v1.Ipam` gRPC service: validation and conversion at the edge, the
//! work in [`Ipam`].

use crate::changes::Subject;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use tracing::Instrument;

use futures::Stream;
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_server::Ipam as IpamRpc;
use herald_ipam_store::{AllocationFilter, DEFAULT_PAGE_SIZE, Event, HistoryKey, StoredPool};
use herald_model::alloc::{MAX_ID_LEN, validate_uid};
use herald_model::selector::is_dns_label;
use herald_model::{FieldError, PoolName};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::IpamError;
use crate::convert::{self, allocate_request_from_pb, allocation_to_pb, history_to_pb, pool_to_pb};
use crate::ipam::{Ipam, MAX_BATCH};
use crate::metrics;
use crate::page_token::{self, Listing};

/// The gRPC face of the service. It answers UNAVAILABLE until the store is open, so the
/// health and reflection services can run from the first moment.
#[derive(Clone)]
pub struct IpamService {
    ipam: Arc<OnceLock<Arc<Ipam>>>,
    shutdown: CancellationToken,
}

impl IpamService {
    pub fn new(ipam: Arc<OnceLock<Arc<Ipam>>>, shutdown: CancellationToken) -> Self {
        Self { ipam, shutdown }
    }

    /// The engine, or UNAVAILABLE at once while the store is not open or known to be away
    /// (rather than a wait for a connection that cannot come).
    fn ipam(&self) -> Result<&Arc<Ipam>, Status> {
        let ipam = self
            .ipam
            .get()
            .ok_or_else(|| Status::unavailable("the store is not open yet; retry shortly"))?;
        ipam.store().check_available().map_err(IpamError::from)?;
        Ok(ipam)
    }

    fn pool_pb(&self, ipam: &Ipam, stored: &StoredPool) -> pb::Pool {
        pool_to_pb(stored, &ipam.usage(stored.spec.name.as_str()))
    }
}

fn invalid(err: FieldError) -> Status {
    IpamError::Invalid(err).into()
}

fn pool_name(field: &str, name: &str) -> Result<PoolName, Status> {
    PoolName::parse(field, name).map_err(invalid)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IpamRpc for IpamService {
    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let ipam = self.ipam()?;
        let pb::CreatePoolRequest { pool } = request.into_inner();
        let spec = convert::pool_from_pb(pool).map_err(invalid)?;
        let stored = run_to_completion(
            ipam,
            move |ipam| async move { ipam.create_pool(&spec).await },
        )
        .await?;
        Ok(Response::new(self.pool_pb(ipam, &stored)))
    }

    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let ipam = self.ipam()?;
        let pb::GetPoolRequest { name } = request.into_inner();
        let name = pool_name("name", &name)?;
        let stored = ipam
            .store()
            .load_pool(name.as_str())
            .await
            .map_err(IpamError::from)?;
        let stored = stored
            .ok_or_else(|| Status::not_found(format!("pool {:?} not found", name.as_str())))?;
        Ok(Response::new(self.pool_pb(ipam, &stored)))
    }

    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::ListPoolsRequest {} = request.into_inner();
        let pools = ipam.store().load_pools().await.map_err(IpamError::from)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.iter().map(|p| self.pool_pb(ipam, p)).collect(),
        }))
    }

    async fn update_pool(
        &self,
        request: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<pb::UpdatePoolResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::UpdatePoolRequest {
            pool,
            force,
            dry_run,
        } = request.into_inner();
        let spec = convert::pool_from_pb(pool).map_err(invalid)?;
        let change = run_to_completion(ipam, move |ipam| async move {
            ipam.update_pool(&spec, force, dry_run).await
        })
        .await?;
        let pool = change.pool.as_ref().map(|p| {
            if dry_run {
                pool_to_pb(p, &ipam.preview_usage(&p.spec))
            } else {
                self.pool_pb(ipam, p)
            }
        });
        Ok(Response::new(pb::UpdatePoolResponse {
            pool,
            affected: change.affected.iter().map(allocation_to_pb).collect(),
            dry_run,
        }))
    }

    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::DeletePoolRequest {
            name,
            force,
            dry_run,
        } = request.into_inner();
        let name = pool_name("name", &name)?;
        let change = run_to_completion(ipam, move |ipam| async move {
            ipam.delete_pool(name.as_str(), force, dry_run).await
        })
        .await?;
        Ok(Response::new(pb::DeletePoolResponse {
            affected: change.affected.iter().map(allocation_to_pb).collect(),
            dry_run,
        }))
    }

    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let ipam = self.ipam()?;
        let (req, dry_run) = allocate_request_from_pb(request.into_inner()).map_err(invalid)?;
        if !dry_run {
            ipam.changes().record(Subject::Owner(req.owner.uid.clone()));
        }
        let allocation = run_to_completion(ipam, move |ipam| async move {
            ipam.allocate(&req, dry_run).await
        })
        .await;
        if !dry_run {
            count_allocation(&allocation);
        }
        let allocation = allocation?;
        Ok(Response::new(pb::AllocateResponse {
            allocation: Some(allocation_to_pb(&allocation)),
            dry_run,
        }))
    }

    async fn allocate_batch(
        &self,
        request: Request<pb::AllocateBatchRequest>,
    ) -> Result<Response<pb::AllocateBatchResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::AllocateBatchRequest { requests } = request.into_inner();
        if requests.len() > MAX_BATCH {
            return Err(invalid(FieldError::new(
                "requests",
                format!("{} items", requests.len()),
                format!("a batch takes at most {MAX_BATCH}"),
            )));
        }
        // Each item stands alone: an invalid one fails by itself, with its index in the
        // field name, and the rest go ahead.
        let mut parsed = Vec::with_capacity(requests.len());
        let mut results: Vec<Option<pb::AllocateResult>> = Vec::with_capacity(requests.len());
        for (i, item) in requests.into_iter().enumerate() {
            match allocate_request_from_pb(item) {
                Ok(ok) => {
                    if !ok.1 {
                        ipam.changes()
                            .record(Subject::Owner(ok.0.owner.uid.clone()));
                    }
                    parsed.push(ok);
                    results.push(None);
                }
                Err(e) => results.push(Some(error_result(IpamError::Invalid(
                    e.within(&format!("requests[{i}]")),
                )))),
            }
        }
        let mut outcomes = run_to_completion(ipam, move |ipam| async move {
            Ok::<_, IpamError>(ipam.allocate_batch(parsed).await)
        })
        .await?
        .into_iter();
        let results = results
            .into_iter()
            .map(|done| match done {
                Some(result) => result,
                None => match outcomes.next() {
                    Some(Ok(allocation)) => {
                        metrics::count_allocation(pool_of(&allocation), tonic::Code::Ok);
                        pb::AllocateResult {
                            result: Some(pb::allocate_result::Result::Allocation(
                                allocation_to_pb(&allocation),
                            )),
                        }
                    }
                    Some(Err(e)) => {
                        let result = error_result(e);
                        if let Some(pb::allocate_result::Result::Error(e)) = &result.result {
                            metrics::count_allocation("", tonic::Code::from_i32(e.code));
                        }
                        result
                    }
                    None => error_result(IpamError::Contended("batch result missing".into())),
                },
            })
            .collect();
        Ok(Response::new(pb::AllocateBatchResponse { results }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::ReleaseRequest { owner_uid, reason } = request.into_inner();
        validate_uid("owner_uid", &owner_uid).map_err(invalid)?;
        if reason.len() > 1024 {
            return Err(invalid(FieldError::new(
                "reason",
                format!("{} bytes", reason.len()),
                "is longer than 1024 bytes",
            )));
        }
        let reason = if reason.is_empty() {
            "released".to_string()
        } else {
            reason
        };
        ipam.changes().record(Subject::Owner(owner_uid.clone()));
        let released = run_to_completion(ipam, move |ipam| async move {
            ipam.release(&owner_uid, &reason).await
        })
        .await;
        match &released {
            Ok(released) => {
                for (_, pool) in released {
                    metrics::count_release(pool, tonic::Code::Ok);
                }
            }
            Err(status) => metrics::count_release("", status.code()),
        }
        let released = released?;
        Ok(Response::new(pb::ReleaseResponse {
            released: released
                .into_iter()
                .map(|(ip, pool)| pb::AssignedIp {
                    ip: ip.to_string(),
                    family: convert::family_to_pb(herald_model::IpFamily::of(ip)) as i32,
                    pool,
                })
                .collect(),
        }))
    }

    async fn get_allocation(
        &self,
        request: Request<pb::GetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let ipam = self.ipam()?;
        let pb::GetAllocationRequest { owner_uid } = request.into_inner();
        validate_uid("owner_uid", &owner_uid).map_err(invalid)?;
        let allocation = ipam
            .store()
            .get_allocation(&owner_uid)
            .await
            .map_err(IpamError::from)?;
        let allocation = allocation.ok_or_else(|| {
            Status::not_found(format!("owner uid {owner_uid:?} holds no allocation"))
        })?;
        Ok(Response::new(allocation_to_pb(&allocation)))
    }

    async fn list_allocations(
        &self,
        request: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::ListAllocationsRequest {
            pool,
            namespace,
            cluster_id,
            page_size,
            page_token,
        } = request.into_inner();
        if !pool.is_empty() {
            pool_name("pool", &pool)?;
        }
        // Filters that no allocation could match are mistakes; refusing them also keeps an
        // oversized value out of the query.
        if !namespace.is_empty() && !is_dns_label(&namespace) {
            return Err(invalid(FieldError::new(
                "namespace",
                &namespace,
                "must be a Kubernetes namespace name (a DNS label)",
            )));
        }
        if cluster_id.len() > MAX_ID_LEN {
            return Err(invalid(FieldError::new(
                "cluster_id",
                &cluster_id,
                format!("is longer than {MAX_ID_LEN} characters"),
            )));
        }
        let page_size = if page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            page_size
        };
        let after_uid = page_token::read(Listing::Allocations, "page_token", &page_token)
            .map_err(invalid)?
            .unwrap_or_default();
        let filter = AllocationFilter {
            pool,
            namespace,
            cluster_id,
        };
        let (allocations, next) = ipam
            .store()
            .list_allocations(&filter, page_size, &after_uid)
            .await
            .map_err(IpamError::from)?;
        Ok(Response::new(pb::ListAllocationsResponse {
            allocations: allocations.iter().map(allocation_to_pb).collect(),
            next_page_token: next
                .map(|uid| page_token::issue(Listing::Allocations, &uid))
                .unwrap_or_default(),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let ipam = self.ipam()?;
        let pb::HistoryRequest {
            ip,
            owner_uid,
            page_size,
            page_token,
        } = request.into_inner();
        let key = match (ip.is_empty(), owner_uid.is_empty()) {
            (false, true) => HistoryKey::Ip(convert::parse_ip("ip", &ip).map_err(invalid)?),
            (true, false) => {
                validate_uid("owner_uid", &owner_uid).map_err(invalid)?;
                HistoryKey::Owner(&owner_uid)
            }
            _ => {
                return Err(invalid(FieldError::new(
                    "ip",
                    &ip,
                    "give exactly one of ip and owner_uid",
                )));
            }
        };
        let before = page_token::read_revision("page_token", &page_token).map_err(invalid)?;
        let page_size = if page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            page_size
        };
        let (entries, next) = ipam
            .store()
            .history(key, page_size, before)
            .await
            .map_err(IpamError::from)?;
        Ok(Response::new(pb::HistoryResponse {
            entries: entries.iter().map(history_to_pb).collect(),
            next_page_token: next
                .map(|r| page_token::issue(Listing::History, &r.to_string()))
                .unwrap_or_default(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ipam = Arc::clone(self.ipam()?);
        let pb::WatchRequest { after_revision } = request.into_inner();
        let after = i64::try_from(after_revision).map_err(|_| {
            invalid(FieldError::new(
                "after_revision",
                after_revision,
                "is out of range",
            ))
        })?;
        // Subscribe before reading the log, so nothing falls between the replay and the
        // live changes; duplicates are dropped by revision.
        let mut live = ipam.feed().subscribe();
        let replay_to = ipam.feed().delivered();
        if after > replay_to {
            return Err(invalid(FieldError::new(
                "after_revision",
                after,
                format!("is ahead of the newest revision {replay_to}"),
            )));
        }
        // Resuming from before the compaction point would replay a log with rows missing.
        // OUT_OF_RANGE, as etcd answers "required revision has been compacted": the
        // request is valid, the revision has passed out of the range kept, and unlike
        // FAILED_PRECONDITION the client can fix it by asking again differently, without
        // any change to the system's state. 0 ("from now") needs no old rows.
        if after != 0 {
            let point = ipam
                .store()
                .compaction_point()
                .await
                .map_err(IpamError::from)?;
            if after < point {
                return Err(Status::out_of_range(format!(
                    "after_revision {after} has been compacted (the change log is complete only after revision {point}); list the pools and allocations again and watch from the current revision (after_revision=0, or {replay_to})"
                )));
            }
        }
        let shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            let _subscribed = metrics::Subscribed::new("Watch");
            let mut last = if after == 0 { replay_to } else { after };
            // Bounded: each page advances `last`, and the replay stops at `replay_to`.
            while last < replay_to {
                let page = match ipam.store().events_after(last, 500).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(IpamError::from(e)))).await;
                        return;
                    }
                };
                if page.is_empty() {
                    break;
                }
                for response in page
                    .iter()
                    .filter(|e| e.revision() <= replay_to)
                    .filter_map(watch_response)
                {
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                last = page
                    .last()
                    .map(Event::revision)
                    .unwrap_or(replay_to)
                    .min(replay_to)
                    .max(last + 1);
            }
            last = last.max(replay_to);
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    event = live.recv() => event,
                };
                match event {
                    Ok(event) if event.revision() <= last => {}
                    Ok(event) => {
                        last = event.revision();
                        if let Some(response) = watch_response(&event)
                            && tx.send(Ok(response)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!("this watcher fell {missed} changes behind; watch again with after_revision={last}"))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Runs a mutating call as its own task. tonic drops a handler's future when the client
/// goes away; a half-run Allocate would leave its address reserved in memory (or written
/// but not yet learnt), so every write runs to the end whether anyone waits or not.
async fn run_to_completion<T, F, Fut>(ipam: &Arc<Ipam>, work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(Arc<Ipam>) -> Fut,
    Fut: std::future::Future<Output = Result<T, IpamError>> + Send + 'static,
{
    // In the RPC's span: the store commit and the change it makes join the caller's trace.
    match tokio::spawn(work(Arc::clone(ipam)).instrument(tracing::Span::current())).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("the request's task failed: {e}"))),
    }
}

/// The pool of an allocation's first address (a dual-stack owner's families come from one
/// pool).
fn pool_of(allocation: &herald_model::Allocation) -> &str {
    allocation.ips.first().map_or("", |ip| ip.pool.as_str())
}

fn count_allocation(result: &Result<herald_model::Allocation, Status>) {
    match result {
        Ok(allocation) => metrics::count_allocation(pool_of(allocation), tonic::Code::Ok),
        Err(status) => metrics::count_allocation("", status.code()),
    }
}

fn error_result(err: IpamError) -> pb::AllocateResult {
    let status = Status::from(err);
    pb::AllocateResult {
        result: Some(pb::allocate_result::Result::Error(pb::AllocateError {
            code: status.code() as i32,
            message: status.message().to_string(),
        })),
    }
}

/// The allocation Watch carries allocation and pool changes; routing inputs have their
/// own stream (WatchNodeRoutes).
fn watch_response(event: &Event) -> Option<pb::WatchResponse> {
    use pb::watch_response::Change;
    let change = match event {
        Event::Assigned(entry, _) | Event::Released(entry, _) | Event::Updated(entry, _) => {
            Change::Allocation(history_to_pb(entry))
        }
        Event::PoolChanged { pool, .. } => Change::PoolChanged(pool.clone()),
        Event::PoolDeleted { pool, .. } => Change::PoolDeleted(pool.clone()),
        Event::NodeChanged { .. }
        | Event::NodeDeleted { .. }
        | Event::EndpointsChanged { .. }
        | Event::PolicyChanged { .. } => return None,
    };
    Some(pb::WatchResponse {
        revision: u64::try_from(event.revision()).unwrap_or(0),
        change: Some(change),
    })
}

/// Runs `producer` as a task feeding a bounded channel, and returns the receiving end as a
/// stream. The task ends when the client goes away (the channel closes).
fn async_stream<F, Fut>(producer: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
