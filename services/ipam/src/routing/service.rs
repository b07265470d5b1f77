//! The `herald.routing.v1.Routing` gRPC service.

use crate::changes::Subject;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use futures::Stream;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_server::Routing as RoutingRpc;
use herald_model::FieldError;
use herald_model::alloc::validate_uid;
use herald_routes::facts::validate_node_name;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::convert::{self, RouteMeta};
use super::engine::{Endpoints, NodeSnapshot, RouteEngine, SessionReport, SpeakerReport};
use super::status;
use crate::IpamError;
use crate::ipam::Ipam;
use crate::page_token::{self, Listing};

/// Bounds on a speaker's report: a node holds at most a policy's peers, and a session
/// announces at most what a node is ever given. Anything larger is refused, not stored.
const MAX_NAME_LEN: usize = 253;
const MAX_STATE_LEN: usize = 128;
const MAX_ERROR_LEN: usize = 1024;
pub const MAX_REPORTED_PREFIXES: usize = 1_000_000;
/// An hour: a longer report interval would leave a dead speaker looking live for hours.
const MAX_REPORT_INTERVAL_MS: u32 = 3_600_000;

fn too_long(field: String, value: &str, max: usize) -> FieldError {
    FieldError::new(field, value, format!("is longer than {max} bytes"))
}

/// A report checked against its bounds, as stored.
fn report_from_pb(state: pb::SpeakerState) -> Result<(String, SpeakerReport), FieldError> {
    let pb::SpeakerState {
        node,
        applied_revision,
        sessions,
        report_interval_ms,
        shutting_down,
    } = state;
    validate_node_name("node", &node)?;
    if sessions.len() > herald_routes::policy::MAX_PEERS {
        return Err(FieldError::new(
            "sessions",
            sessions.len(),
            "more sessions than a policy can have peers",
        ));
    }
    if report_interval_ms > MAX_REPORT_INTERVAL_MS {
        return Err(FieldError::new(
            "report_interval_ms",
            report_interval_ms,
            format!("must be at most {MAX_REPORT_INTERVAL_MS} (an hour)"),
        ));
    }
    let mut reports = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.into_iter().enumerate() {
        let pb::SessionState {
            peer,
            state,
            established_since,
            announced_prefixes,
            updates_sent,
            last_error,
            reset_pending,
            routes_sent,
        } = s;
        for (field, value, max) in [
            ("peer", &peer, MAX_NAME_LEN),
            ("state", &state, MAX_STATE_LEN),
            ("last_error", &last_error, MAX_ERROR_LEN),
        ] {
            if value.len() > max {
                return Err(too_long(format!("sessions[{i}].{field}"), value, max));
            }
        }
        if announced_prefixes.len() > MAX_REPORTED_PREFIXES {
            return Err(FieldError::new(
                format!("sessions[{i}].announced_prefixes"),
                announced_prefixes.len(),
                format!("more than {MAX_REPORTED_PREFIXES} prefixes"),
            ));
        }
        let mut announced = BTreeSet::new();
        for (j, prefix) in announced_prefixes.into_iter().enumerate() {
            let net: ipnet::IpNet = prefix.parse().map_err(|_| {
                FieldError::new(
                    format!("sessions[{i}].announced_prefixes[{j}]"),
                    &prefix,
                    "is not a prefix",
                )
            })?;
            announced.insert(net.to_string());
        }
        reports.push(SessionReport {
            peer,
            state,
            established_since: established_since
                .map(|t| t.seconds.saturating_mul(1_000_000) + i64::from(t.nanos / 1000)),
            announced,
            updates_sent,
            last_error,
            reset_pending,
            routes_sent,
        });
    }
    Ok((
        node,
        SpeakerReport {
            applied_revision: i64::try_from(applied_revision).unwrap_or(i64::MAX),
            sessions: reports,
            report_interval_ms: u64::from(report_interval_ms),
            shutting_down,
        },
    ))
}

/// Both halves of the service once the store is open.
pub struct Ready {
    pub ipam: Arc<Ipam>,
    pub engine: Arc<RouteEngine>,
}

#[derive(Clone)]
pub struct RoutingService {
    ready: Arc<OnceLock<Ready>>,
    shutdown: CancellationToken,
    /// Deltas a WatchNodeRoutes stream may fall behind by before it is resynced.
    stream_buffer: usize,
}

fn invalid(err: FieldError) -> Status {
    IpamError::Invalid(err).into()
}

fn store_err(err: herald_ipam_store::StoreError) -> Status {
    IpamError::Store(err).into()
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, Status> {
    serde_json::to_string(value).map_err(|e| Status::internal(format!("encoding: {e}")))
}

/// A SetServiceEndpoints item checked, as stored: its owner and its facts.
fn endpoints_from_pb(item: pb::ServiceEndpoints) -> Result<(String, Endpoints), FieldError> {
    let pb::ServiceEndpoints {
        owner_uid,
        traffic_policy,
        endpoint_nodes,
        traceparent,
    } = item;
    validate_uid("owner_uid", &owner_uid)?;
    if traceparent.len() > 128 || traceparent.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(FieldError::new(
            "traceparent",
            &traceparent,
            "is not a W3C traceparent",
        ));
    }
    let endpoints = Endpoints {
        traffic_policy: convert::traffic_policy_from_pb(traffic_policy)?,
        nodes: convert::endpoint_nodes(endpoint_nodes)?,
        traceparent,
    };
    Ok((owner_uid, endpoints))
}

/// The policy in force, if one has been set.
async fn stored_policy(ready: &Ready) -> Result<Option<herald_routes::BgpPolicy>, Status> {
    let doc = ready.ipam.store().load_policy().await.map_err(store_err)?;
    doc.map(|doc| {
        serde_json::from_str(&doc.spec).map_err(|e| Status::internal(format!("policy: {e}")))
    })
    .transpose()
}

type NodeRoutesStream = Pin<Box<dyn Stream<Item = Result<pb::NodeRoutes, Status>> + Send>>;

impl RoutingService {
    pub fn new(
        ready: Arc<OnceLock<Ready>>,
        shutdown: CancellationToken,
        stream_buffer: usize,
    ) -> Self {
        Self {
            ready,
            shutdown,
            stream_buffer,
        }
    }

    /// The engine, or UNAVAILABLE at once while the store is not open or known to be away.
    fn ready(&self) -> Result<&Ready, Status> {
        let ready = self
            .ready
            .get()
            .ok_or_else(|| Status::unavailable("the store is not open yet; retry shortly"))?;
        ready
            .ipam
            .store()
            .check_available()
            .map_err(crate::IpamError::from)?;
        Ok(ready)
    }
}

/// Where a route of `snapshot` came from, for its message.
fn meta_of<'a>(snapshot: &'a NodeSnapshot, prefix: &ipnet::IpNet) -> RouteMeta<'a> {
    let (trace, at) = snapshot.provenance.get(prefix);
    RouteMeta {
        traceparent: trace,
        changed_at: at,
    }
}

/// Takes the peer's TCP-MD5 password out of a snapshot bound for a caller that may not
/// have it, and says so, so the speaker can tell "no password" from "not sent".
fn withhold_password(peer: &mut pb::PeerRoutes) {
    if let Some(p) = peer.peer.as_mut()
        && !p.md5_password.is_empty()
    {
        p.md5_password = String::new();
        peer.md5_password_withheld = true;
    }
}

fn snapshot_to_pb(node: &str, local_asn: u32, snapshot: &NodeSnapshot) -> pb::NodeRoutes {
    convert::node_routes_to_pb(
        node,
        snapshot.revision,
        &snapshot.trace,
        snapshot.changed_at,
        local_asn,
        &snapshot.routes,
        |prefix| meta_of(snapshot, prefix),
    )
}

/// The message taking a client from revision `from` to `snapshot`: every session with its
/// parameters, and only the routes of `delta` (none for a message that only changes
/// session flags, where `from` is the snapshot's own revision).
fn delta_to_pb(
    node: &str,
    local_asn: u32,
    snapshot: &NodeSnapshot,
    from: i64,
    delta: Option<&herald_routes::RoutesDelta>,
) -> pb::NodeRoutes {
    convert::node_delta_to_pb(
        node,
        from,
        snapshot.revision,
        &snapshot.trace,
        snapshot.changed_at,
        local_asn,
        &snapshot.routes.peers,
        delta,
        |prefix| meta_of(snapshot, prefix),
    )
}

/// Marks each peer's `defer_reset` unless it is this node's turn (see `rollout`), and
/// withholds the peers' passwords from a caller that may not have them (`secrets` false).
fn mark_deferred(message: &mut pb::NodeRoutes, granted: &BTreeSet<String>, secrets: bool) {
    for peer in &mut message.peers {
        let name = peer.peer.as_ref().map(|p| p.name.as_str()).unwrap_or("");
        peer.defer_reset = !granted.contains(name);
        if !secrets {
            withhold_password(peer);
        }
    }
}

/// A delta stream: the current snapshot whole, then each published snapshot as the delta
/// from the one before, until the client falls behind (its queue overflowed) or a delta
/// does not follow what it holds; then the current snapshot whole again.
struct DeltaStream {
    node: String,
    engine: Arc<RouteEngine>,
    current: tokio::sync::watch::Receiver<Option<Arc<NodeSnapshot>>>,
    queue: super::engine::DeltaQueue,
    grants: tokio::sync::watch::Receiver<BTreeSet<String>>,
    tx: tokio::sync::mpsc::Sender<Result<pb::NodeRoutes, Status>>,
    shutdown: CancellationToken,
    /// Whether the caller may receive the peers' MD5 passwords.
    secrets: bool,
}

async fn stream_deltas(stream: DeltaStream) {
    let DeltaStream {
        node,
        engine,
        mut current,
        mut queue,
        mut grants,
        tx,
        shutdown,
        secrets,
    } = stream;
    // The snapshot whose state the client holds.
    let mut held: Option<Arc<NodeSnapshot>> = None;
    let mut granted = grants.borrow_and_update().clone();
    let first = current.borrow_and_update().clone();
    // Bounded by the stream: each turn waits for a publish, a grant or the end.
    let mut next = first;
    loop {
        if let Some(snapshot) = next.take() {
            let local_asn = engine.local_asn();
            let overflowed = queue.take_overflow();
            let follows = match (&held, &snapshot.delta) {
                (Some(h), Some(d)) => !overflowed && d.from == h.revision,
                _ => false,
            };
            let mut message = match &snapshot.delta {
                Some(d) if follows => {
                    let message = delta_to_pb(&node, local_asn, &snapshot, d.from, Some(&d.routes));
                    held = Some(Arc::clone(&snapshot));
                    message
                }
                _ => {
                    // Out of step (the first message, or a snapshot dropped from a full
                    // queue): the current snapshot whole, which covers what is queued.
                    queue.clear();
                    let latest = current
                        .borrow_and_update()
                        .clone()
                        .unwrap_or_else(|| Arc::clone(&snapshot));
                    if held.is_some() {
                        crate::metrics::METRICS.stream_resyncs.inc();
                        debug!(
                            node,
                            revision = latest.revision,
                            "route stream fell behind: sending a full snapshot"
                        );
                    }
                    let message = snapshot_to_pb(&node, local_asn, &latest);
                    held = Some(latest);
                    message
                }
            };
            mark_deferred(&mut message, &granted, secrets);
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            published = queue.recv() => match published {
                // Already covered by the snapshot the client holds.
                Some(s) if held.as_ref().is_some_and(|h| s.revision <= h.revision) => {}
                Some(s) => next = Some(s),
                None => return,
            },
            changed = grants.changed() => {
                if changed.is_err() {
                    return;
                }
                granted = grants.borrow_and_update().clone();
                // Only the flags change: a message from the held revision to itself.
                if let Some(h) = &held {
                    let local_asn = engine.local_asn();
                    let mut message = delta_to_pb(&node, local_asn, h, h.revision, None);
                    mark_deferred(&mut message, &granted, secrets);
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl RoutingRpc for RoutingService {
    async fn upsert_node(&self, request: Request<pb::Node>) -> Result<Response<pb::Node>, Status> {
        let ready = self.ready()?;
        let node = convert::node_from_pb(request.into_inner()).map_err(invalid)?;
        ready
            .ipam
            .changes()
            .record(Subject::Node(node.name.clone()));
        ready
            .ipam
            .store()
            .upsert_node(&node.name, &json(&node)?)
            .await
            .map_err(store_err)?;
        ready.ipam.feed().wake();
        Ok(Response::new(convert::node_to_pb(&node)))
    }

    async fn delete_node(
        &self,
        request: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        let ready = self.ready()?;
        let pb::DeleteNodeRequest { name } = request.into_inner();
        validate_node_name("name", &name).map_err(invalid)?;
        ready.ipam.changes().record(Subject::Node(name.clone()));
        let deleted = ready
            .ipam
            .store()
            .delete_node(&name)
            .await
            .map_err(store_err)?;
        ready.ipam.feed().wake();
        Ok(Response::new(pb::DeleteNodeResponse { deleted }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let ready = self.ready()?;
        let pb::ListNodesRequest {} = request.into_inner();
        let docs = ready.ipam.store().load_nodes().await.map_err(store_err)?;
        let mut nodes = Vec::with_capacity(docs.len());
        for doc in docs {
            let node: herald_routes::Node = serde_json::from_str(&doc.spec)
                .map_err(|e| Status::internal(format!("node {}: {e}", doc.key)))?;
            nodes.push(convert::node_to_pb(&node));
        }
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn set_service_endpoints(
        &self,
        request: Request<pb::ServiceEndpoints>,
    ) -> Result<Response<pb::SetServiceEndpointsResponse>, Status> {
        let ready = self.ready()?;
        let (owner_uid, endpoints) = endpoints_from_pb(request.into_inner()).map_err(invalid)?;
        ready
            .ipam
            .changes()
            .record(Subject::Endpoints(owner_uid.clone()));
        ready
            .ipam
            .store()
            .set_endpoints(&owner_uid, &json(&endpoints)?)
            .await
            .map_err(store_err)?;
        ready.ipam.feed().wake();
        Ok(Response::new(pb::SetServiceEndpointsResponse {}))
    }

    async fn set_service_endpoints_batch(
        &self,
        request: Request<pb::SetServiceEndpointsBatchRequest>,
    ) -> Result<Response<pb::SetServiceEndpointsBatchResponse>, Status> {
        let ready = self.ready()?;
        let pb::SetServiceEndpointsBatchRequest { items } = request.into_inner();
        if items.len() > crate::MAX_BATCH {
            return Err(invalid(FieldError::new(
                "items",
                format!("{} items", items.len()),
                format!("a batch takes at most {}", crate::MAX_BATCH),
            )));
        }
        // Each item stands alone: an invalid one fails by itself, named by its index, and
        // the rest are written together.
        let mut results = Vec::with_capacity(items.len());
        let mut valid = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match endpoints_from_pb(item) {
                Ok((owner_uid, endpoints)) => {
                    valid.push((owner_uid, json(&endpoints)?));
                    results.push(pb::SetServiceEndpointsResult::default());
                }
                Err(e) => {
                    let status = invalid(e.within(&format!("items[{i}]")));
                    results.push(pb::SetServiceEndpointsResult {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                    });
                }
            }
        }
        for (owner_uid, _) in &valid {
            ready
                .ipam
                .changes()
                .record(Subject::Endpoints(owner_uid.clone()));
        }
        let rows: Vec<(&str, &str)> = valid
            .iter()
            .map(|(owner_uid, spec)| (owner_uid.as_str(), spec.as_str()))
            .collect();
        // One transaction: a store failure fails the call, and nothing of it is written.
        ready
            .ipam
            .store()
            .set_endpoints_batch(&rows)
            .await
            .map_err(store_err)?;
        if !rows.is_empty() {
            ready.ipam.feed().wake();
        }
        Ok(Response::new(pb::SetServiceEndpointsBatchResponse {
            results,
        }))
    }

    async fn set_bgp_policy(
        &self,
        request: Request<pb::BgpPolicy>,
    ) -> Result<Response<pb::BgpPolicy>, Status> {
        let ready = self.ready()?;
        let pools: Vec<herald_model::PoolName> = ready
            .ipam
            .index()
            .pools()
            .map(|(spec, _)| spec.name.clone())
            .collect();
        let stored = stored_policy(ready).await?;
        let policy = convert::policy_from_pb(request.into_inner(), &pools, stored.as_ref())
            .map_err(invalid)?;
        ready.ipam.changes().record(Subject::Policy);
        ready
            .ipam
            .store()
            .set_policy(&json(&policy)?)
            .await
            .map_err(store_err)?;
        ready.ipam.feed().wake();
        Ok(Response::new(convert::policy_to_pb(&policy)))
    }

    async fn get_bgp_policy(
        &self,
        request: Request<pb::GetBgpPolicyRequest>,
    ) -> Result<Response<pb::BgpPolicy>, Status> {
        let ready = self.ready()?;
        let pb::GetBgpPolicyRequest {} = request.into_inner();
        let policy = stored_policy(ready)
            .await?
            .ok_or_else(|| Status::not_found("no BGP policy has been set"))?;
        Ok(Response::new(convert::policy_to_pb(&policy)))
    }

    type WatchNodeRoutesStream = NodeRoutesStream;

    async fn watch_node_routes(
        &self,
        request: Request<pb::WatchNodeRoutesRequest>,
    ) -> Result<Response<Self::WatchNodeRoutesStream>, Status> {
        crate::authz::check_node(&request, &request.get_ref().node, "WatchNodeRoutes")?;
        let ready = self.ready()?;
        let secrets = crate::authz::may_receive_secrets(&request);
        let remote = request.remote_addr();
        let pb::WatchNodeRoutesRequest { node, deltas } = request.into_inner();
        validate_node_name("node", &node).map_err(invalid)?;
        if !secrets {
            warn!(
                node = %node,
                remote = ?remote,
                "WatchNodeRoutes over plaintext from a non-loopback address: TCP-MD5 passwords are withheld from this stream (configure mutual TLS)"
            );
        }
        // The engine may not have seen a node registered a moment ago (possibly through
        // another replica): the store decides whether it exists.
        if !ready.engine.knows_node(&node)
            && ready
                .ipam
                .store()
                .load_node(&node)
                .await
                .map_err(store_err)?
                .is_none()
        {
            return Err(Status::not_found(format!(
                "node {node:?} is not registered; UpsertNode it first"
            )));
        }
        let mut grants = ready.engine.subscribe_grants(&node);
        let engine = Arc::clone(&ready.engine);
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // The status reads an ended stream as a speaker gone (a kill -9 ends it at once).
        let stream = ready.engine.stream_opened(&node);
        if deltas {
            let (current, queue) = ready.engine.subscribe_deltas(&node, self.stream_buffer);
            tokio::spawn(async move {
                let _stream = stream;
                let _subscribed = crate::metrics::Subscribed::new("WatchNodeRoutes");
                stream_deltas(DeltaStream {
                    node,
                    engine,
                    current,
                    queue,
                    grants,
                    tx,
                    shutdown,
                    secrets,
                })
                .await;
            });
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }
        let mut snapshots = ready.engine.subscribe(&node);
        tokio::spawn(async move {
            let _stream = stream;
            let _subscribed = crate::metrics::Subscribed::new("WatchNodeRoutes");
            loop {
                // Only the newest snapshot matters, and the engine publishes one only when
                // the node's set changed: `watch` keeps exactly that.
                let current = snapshots.borrow_and_update().clone();
                let granted = grants.borrow_and_update().clone();
                if let Some(snapshot) = current {
                    let local_asn = engine.local_asn();
                    let mut message = snapshot_to_pb(&node, local_asn, &snapshot);
                    // Resets wait for this node's turn (see `rollout`).
                    mark_deferred(&mut message, &granted, secrets);
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = snapshots.changed() => if changed.is_err() { return },
                    changed = grants.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_speaker_state(
        &self,
        request: Request<pb::SpeakerState>,
    ) -> Result<Response<pb::ReportSpeakerStateResponse>, Status> {
        crate::authz::check_node(&request, &request.get_ref().node, "ReportSpeakerState")?;
        let ready = self.ready()?;
        let (node, report) = report_from_pb(request.into_inner()).map_err(invalid)?;
        ready
            .ipam
            .store()
            .save_speaker_state(&node, &json(&report)?)
            .await
            .map_err(store_err)?;
        ready
            .engine
            .record_report(&node, report, herald_ipam_store::now_micros());
        Ok(Response::new(pb::ReportSpeakerStateResponse {}))
    }

    async fn get_advertisement_status(
        &self,
        request: Request<pb::GetAdvertisementStatusRequest>,
    ) -> Result<Response<pb::AdvertisementStatus>, Status> {
        let ready = self.ready()?;
        let pb::GetAdvertisementStatusRequest {
            node,
            owner_uid,
            peer,
            service,
            page_size,
            page_token,
        } = request.into_inner();
        for (field, value) in [
            ("node", &node),
            ("owner_uid", &owner_uid),
            ("peer", &peer),
            ("service", &service),
        ] {
            if value.len() > MAX_NAME_LEN {
                return Err(invalid(FieldError::new(
                    field,
                    value,
                    format!("is longer than {MAX_NAME_LEN} bytes"),
                )));
            }
        }
        let size = match usize::try_from(page_size).unwrap_or(usize::MAX) {
            0 => status::DEFAULT_PAGE_SIZE,
            n if n > status::MAX_PAGE_SIZE => {
                return Err(invalid(FieldError::new(
                    "page_size",
                    page_size,
                    format!("must be at most {}", status::MAX_PAGE_SIZE),
                )));
            }
            n => n,
        };
        let after = page_token::read(Listing::AdvertisementStatus, "page_token", &page_token)
            .map_err(invalid)?;
        let plan = ready.engine.last_plan();
        let services = ready.engine.last_services();
        let (policy, nodes) = ready.engine.policy_and_nodes();
        let reports = ready.engine.reports();
        let streams = ready.engine.streams();
        let inputs = status::Inputs {
            plan: &plan,
            services: &services,
            policy: policy.as_ref(),
            nodes: &nodes,
            reports: &reports,
            streams: &streams,
            now: herald_ipam_store::now_micros(),
        };
        let filter = status::Filter {
            node,
            peer,
            owner_uid,
            service,
        };
        let all = status::entries(&inputs, &filter);
        let differences = all.iter().filter(|e| !e.difference.is_empty()).count() as u64;
        let (entries, next) = status::page(all, after.as_deref(), size);
        Ok(Response::new(pb::AdvertisementStatus {
            entries,
            next_page_token: next
                .map(|p| page_token::issue(Listing::AdvertisementStatus, &p))
                .unwrap_or_default(),
            differences,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_withheld_password_leaves_the_snapshot_and_is_marked() {
        let entry = |password: &str| pb::PeerRoutes {
            peer: Some(pb::Peer {
                name: "tor".into(),
                md5_password: password.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut guarded = entry("s3cret");
        withhold_password(&mut guarded);
        assert_eq!(
            guarded.peer.as_ref().map(|p| p.md5_password.as_str()),
            Some("")
        );
        assert!(guarded.md5_password_withheld);
        // A peer without a password has nothing withheld.
        let mut open = entry("");
        withhold_password(&mut open);
        assert!(!open.md5_password_withheld);
    }
}
