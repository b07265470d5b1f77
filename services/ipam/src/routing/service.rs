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

use super::convert::{self, RouteMeta};
use super::engine::{Endpoints, NodeSnapshot, RouteEngine, SessionReport, SpeakerReport};
use crate::IpamError;
use crate::ipam::Ipam;

/// Both halves of the service once the store is open.
pub struct Ready {
    pub ipam: Arc<Ipam>,
    pub engine: Arc<RouteEngine>,
}

#[derive(Clone)]
pub struct RoutingService {
    ready: Arc<OnceLock<Ready>>,
    shutdown: CancellationToken,
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
    pub fn new(ready: Arc<OnceLock<Ready>>, shutdown: CancellationToken) -> Self {
        Self { ready, shutdown }
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

fn snapshot_to_pb(node: &str, local_asn: u32, snapshot: &NodeSnapshot) -> pb::NodeRoutes {
    convert::node_routes_to_pb(
        node,
        snapshot.revision,
        &snapshot.trace,
        local_asn,
        &snapshot.routes,
        |prefix| {
            let (trace, at) = snapshot
                .provenance
                .get(prefix)
                .map(|(t, a)| (t.as_str(), *a))
                .unwrap_or(("", 0));
            RouteMeta {
                traceparent: trace,
                changed_at: at,
            }
        },
    )
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
        let pb::ServiceEndpoints {
            owner_uid,
            traffic_policy,
            endpoint_nodes,
            traceparent,
        } = request.into_inner();
        validate_uid("owner_uid", &owner_uid).map_err(invalid)?;
        if traceparent.len() > 128 || traceparent.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(invalid(FieldError::new(
                "traceparent",
                &traceparent,
                "is not a W3C traceparent",
            )));
        }
        let endpoints = Endpoints {
            traffic_policy: convert::traffic_policy_from_pb(traffic_policy).map_err(invalid)?,
            nodes: convert::endpoint_nodes(endpoint_nodes).map_err(invalid)?,
            traceparent,
        };
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
        let ready = self.ready()?;
        let pb::WatchNodeRoutesRequest { node } = request.into_inner();
        validate_node_name("node", &node).map_err(invalid)?;
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
        let mut snapshots = ready.engine.subscribe(&node);
        let engine = Arc::clone(&ready.engine);
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                // Only the newest snapshot matters, and the engine publishes one only when
                // the node's set changed: `watch` keeps exactly that.
                let current = snapshots.borrow_and_update().clone();
                if let Some(snapshot) = current {
                    let local_asn = engine.policy().map(|p| p.local_asn).unwrap_or(0);
                    if tx
                        .send(Ok(snapshot_to_pb(&node, local_asn, &snapshot)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = snapshots.changed() => if changed.is_err() { return },
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
        let ready = self.ready()?;
        let pb::SpeakerState {
            node,
            applied_revision,
            sessions,
        } = request.into_inner();
        validate_node_name("node", &node).map_err(invalid)?;
        if sessions.len() > herald_routes::policy::MAX_PEERS {
            return Err(invalid(FieldError::new(
                "sessions",
                sessions.len(),
                "more sessions than a policy can have peers",
            )));
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
            } = s;
            let mut announced = BTreeSet::new();
            for (j, prefix) in announced_prefixes.into_iter().enumerate() {
                let net: ipnet::IpNet = prefix.parse().map_err(|_| {
                    invalid(FieldError::new(
                        format!("sessions[{i}].announced_prefixes[{j}]"),
                        &prefix,
                        "is not a prefix",
                    ))
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
            });
        }
        let report = SpeakerReport {
            applied_revision: i64::try_from(applied_revision).unwrap_or(i64::MAX),
            sessions: reports,
        };
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
            node: node_filter,
            owner_uid,
        } = request.into_inner();
        let plan = ready.engine.last_plan();
        let reports = ready.engine.reports();
        let owners = ready.engine.owners_by_prefix();
        let mut entries = Vec::new();
        for (node, routes) in &plan.nodes {
            if !node_filter.is_empty() && node != &node_filter {
                continue;
            }
            let report = reports.get(node).map(|(r, _)| r);
            for session in &routes.peers {
                let actual =
                    report.and_then(|r| r.sessions.iter().find(|s| s.peer == session.name));
                let desired: BTreeSet<String> = routes
                    .routes
                    .get(&session.name)
                    .map(|r| r.keys().map(ToString::to_string).collect())
                    .unwrap_or_default();
                let announced = actual.map(|a| a.announced.clone()).unwrap_or_default();
                for prefix in desired.union(&announced) {
                    let owner = prefix
                        .parse()
                        .ok()
                        .and_then(|p: ipnet::IpNet| owners.get(&p).cloned());
                    if !owner_uid.is_empty() && owner.as_ref().is_none_or(|o| o.uid != owner_uid) {
                        continue;
                    }
                    let (is_desired, is_announced) =
                        (desired.contains(prefix), announced.contains(prefix));
                    let state = actual
                        .map(|a| a.state.clone())
                        .unwrap_or_else(|| "no report".into());
                    let difference = match (is_desired, is_announced) {
                        (true, true) => String::new(),
                        (true, false) => format!("desired but not announced (session {state})"),
                        (false, true) => "announced but no longer desired".into(),
                        (false, false) => String::new(),
                    };
                    entries.push(pb::AdvertisementEntry {
                        owner_uid: owner.as_ref().map(|o| o.uid.clone()).unwrap_or_default(),
                        service: owner
                            .as_ref()
                            .map(|o| format!("{}/{}", o.namespace, o.name))
                            .unwrap_or_else(|| "(aggregate)".into()),
                        prefix: prefix.clone(),
                        node: node.clone(),
                        peer: session.name.clone(),
                        desired: is_desired,
                        announced: is_announced,
                        session_state: state,
                        difference,
                    });
                }
            }
        }
        Ok(Response::new(pb::AdvertisementStatus { entries }))
    }
}
