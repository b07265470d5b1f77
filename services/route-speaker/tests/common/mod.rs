//! Shared pieces of the speaker's end-to-end tests: an in-process fake of IPAM's Routing
//! service, the speaker binary as a child process, and snapshot builders.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use herald_api::routing::v1 as pb;
use herald_api::routing::v1::routing_server::{Routing, RoutingServer};
use herald_test_support::ChildProcess;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub const NODE_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
pub const TOR_ASN: u32 = 65001;
pub const NODE_ASN: u32 = 65010;
pub const PREFIX: &str = "172.16.0.241/32";

/// What the fake IPAM serves and what it was told.
#[derive(Debug)]
pub struct FakeState {
    /// Node → its current snapshot; a node that is absent gets NOT_FOUND.
    snapshots: watch::Sender<BTreeMap<String, pb::NodeRoutes>>,
    reports: Mutex<Vec<pb::SpeakerState>>,
    watch_calls: Mutex<BTreeMap<String, usize>>,
}

impl FakeState {
    pub fn new() -> Arc<FakeState> {
        Arc::new(FakeState {
            snapshots: watch::channel(BTreeMap::new()).0,
            reports: Mutex::new(Vec::new()),
            watch_calls: Mutex::new(BTreeMap::new()),
        })
    }

    /// Registers or replaces a node's snapshot; open streams for it get it at once.
    pub fn set(&self, snapshot: pb::NodeRoutes) {
        self.snapshots.send_modify(|m| {
            m.insert(snapshot.node.clone(), snapshot);
        });
    }

    pub fn watch_calls(&self, node: &str) -> usize {
        self.watch_calls
            .lock()
            .map(|m| m.get(node).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn reports(&self) -> Vec<pb::SpeakerState> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits until a report from `node` satisfies `pred`; returns it.
    pub async fn wait_report(
        &self,
        node: &str,
        timeout: Duration,
        pred: impl Fn(&pb::SpeakerState) -> bool,
    ) -> Result<pb::SpeakerState, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .reports()
                .into_iter()
                .rev()
                .find(|r| r.node == node && pred(r))
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                let last = self.reports().into_iter().rev().find(|r| r.node == node);
                return Err(format!(
                    "no matching report from {node} in {timeout:?}; last: {last:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct FakeService {
    state: Arc<FakeState>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::NodeRoutes, Status>> + Send>>;

#[tonic::async_trait]
impl Routing for FakeService {
    type WatchNodeRoutesStream = SnapshotStream;

    async fn watch_node_routes(
        &self,
        request: Request<pb::WatchNodeRoutesRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let node = request.into_inner().node;
        if let Ok(mut calls) = self.state.watch_calls.lock() {
            *calls.entry(node.clone()).or_default() += 1;
        }
        let mut rx = self.state.snapshots.subscribe();
        if !rx.borrow_and_update().contains_key(&node) {
            return Err(Status::not_found(format!(
                "node {node:?} is not registered"
            )));
        }
        rx.mark_changed();
        // Sends the node's snapshot whenever it differs from the last one sent.
        let stream = futures::stream::unfold(
            (rx, node, None::<pb::NodeRoutes>),
            |(mut rx, node, mut last)| async move {
                loop {
                    if rx.changed().await.is_err() {
                        return None;
                    }
                    let current = rx.borrow_and_update().get(&node).cloned();
                    match current {
                        None => {
                            return Some((
                                Err(Status::not_found(format!("node {node:?} was deleted"))),
                                (rx, node, last),
                            ));
                        }
                        Some(s) if last.as_ref() != Some(&s) => {
                            last = Some(s.clone());
                            return Some((Ok(s), (rx, node, last)));
                        }
                        Some(_) => {}
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_speaker_state(
        &self,
        request: Request<pb::SpeakerState>,
    ) -> Result<Response<pb::ReportSpeakerStateResponse>, Status> {
        if let Ok(mut r) = self.state.reports.lock() {
            r.push(request.into_inner());
        }
        Ok(Response::new(pb::ReportSpeakerStateResponse {}))
    }

    async fn upsert_node(&self, _: Request<pb::Node>) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_node(
        &self,
        _: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_service_endpoints(
        &self,
        _: Request<pb::ServiceEndpoints>,
    ) -> Result<Response<pb::SetServiceEndpointsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_service_endpoints_batch(
        &self,
        _: Request<pb::SetServiceEndpointsBatchRequest>,
    ) -> Result<Response<pb::SetServiceEndpointsBatchResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_bgp_policy(
        &self,
        _: Request<pb::BgpPolicy>,
    ) -> Result<Response<pb::BgpPolicy>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_bgp_policy(
        &self,
        _: Request<pb::GetBgpPolicyRequest>,
    ) -> Result<Response<pb::BgpPolicy>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_advertisement_status(
        &self,
        _: Request<pb::GetAdvertisementStatusRequest>,
    ) -> Result<Response<pb::AdvertisementStatus>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A fake IPAM Routing server on 127.0.0.1. It runs on a runtime of its own, so dropping
/// it kills it the way a crash would: listener and every connection close at once, with
/// no graceful end of the streams.
pub struct FakeRouting {
    addr: SocketAddr,
    pub state: Arc<FakeState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeRouting {
    /// Serves `state` on `port` (0: any free port). Retries the bind for a few seconds,
    /// for a restart on the port of a server just killed.
    pub fn start(port: u16, state: Arc<FakeState>) -> FakeRouting {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("fake IPAM runtime: {e}"));
        let listener = {
            let _guard = runtime.enter();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let bound = tokio::net::TcpSocket::new_v4().and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
                    s.listen(64)
                });
                match bound {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("fake IPAM: bind 127.0.0.1:{port}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("fake IPAM: bind 127.0.0.1:{port}: {e}"),
                }
            }
        };
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake IPAM address: {e}"));
        let service = RoutingServer::new(FakeService {
            state: Arc::clone(&state),
        });
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("fake IPAM stopped: {e}");
            }
        });
        FakeRouting {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeRouting {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts the real `herald-route-speaker` binary for `node`.
pub fn speaker(node: &str, ipam: &str) -> ChildProcess {
    speaker_with(node, ipam, &[])
}

/// As [`speaker`], with extra environment (`HERALD_…` settings).
pub fn speaker_with(node: &str, ipam: &str, env: &[(&str, &str)]) -> ChildProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald-route-speaker"));
    // Tests stop speakers often; the RFC 8326 drain has end-to-end tests of its own.
    cmd.env("HERALD_SHUTDOWN_DRAIN", "0s");
    cmd.envs(env.iter().copied());
    cmd.env("HERALD_NODE_NAME", node)
        .env("HERALD_IPAM_ENDPOINT", ipam)
        .env("HERALD_REPORT_INTERVAL", "1s")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    ChildProcess::spawn(&format!("herald-route-speaker {node}"), cmd)
}

/// A route as IPAM would send it, changed "now".
pub fn route(prefix: &str, next_hop: Ipv4Addr) -> pb::Route {
    pb::Route {
        prefix: prefix.into(),
        next_hop: next_hop.to_string(),
        communities: vec![(65000 << 16) | 100],
        changed_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        ..pb::Route::default()
    }
}

/// A snapshot for `node` (address `source`) with one peer, the ToR on 127.0.0.1:`port`.
pub fn snapshot(
    node: &str,
    revision: u64,
    source: Ipv4Addr,
    tor_port: u16,
    graceful_restart: bool,
    prefixes: &[&str],
) -> pb::NodeRoutes {
    pb::NodeRoutes {
        revision,
        node: node.into(),
        local_asn: NODE_ASN,
        router_id: source.to_string(),
        traceparent: String::new(),
        changed_at: None,
        peers: vec![pb::PeerRoutes {
            peer: Some(pb::Peer {
                name: "tor".into(),
                address: "127.0.0.1".into(),
                asn: TOR_ASN,
                port: u32::from(tor_port),
                hold_time_seconds: 9,
                connect_retry_seconds: 1,
                graceful_restart,
                restart_time_seconds: if graceful_restart { 60 } else { 0 },
                ..pb::Peer::default()
            }),
            source_address: source.to_string(),
            routes: prefixes.iter().map(|p| route(p, source)).collect(),
            defer_reset: false,
            withdrawn: vec![],
            md5_password_withheld: false,
        }],
        from_revision: 0,
    }
}

pub fn ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
