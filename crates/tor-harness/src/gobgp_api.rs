//! A minimal client for GoBGP 3.10's gRPC API: `AddPathStream`, the call GoBGP's own
//! bulk paths use, with many paths per request so GoBGP can pack them into few UPDATEs;
//! and `ListPeer` and `ListPath`, for the counters and the one prefix that benchmarks
//! poll every few milliseconds, where starting the `gobgp` CLI (about 10 ms of CPU each
//! time) would take the cores the measured system needs.
//!
//! The messages below are written for this crate. Their field numbers are GoBGP's wire
//! contract (package `apipb`), read from the descriptor embedded in Debian's `gobgp`
//! 3.10 binary; only the fields we send or read are declared.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use ipnet::IpNet;
use prost::Message;
use prost_types::Any;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use crate::TorNeighbor;
use crate::gobgp::{SESSION_ESTABLISHED, state_name};

/// `apipb.AddPathStreamRequest`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct AddPathStreamRequest {
    /// `apipb.TableType`; 0 is `GLOBAL`.
    #[prost(int32, tag = "1")]
    pub table_type: i32,
    #[prost(message, repeated, tag = "3")]
    pub paths: Vec<Path>,
}

/// `apipb.Path`, the fields a locally originated path needs.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Path {
    #[prost(message, optional, tag = "1")]
    pub nlri: Option<Any>,
    #[prost(message, repeated, tag = "2")]
    pub pattrs: Vec<Any>,
    #[prost(bool, tag = "5")]
    pub is_withdraw: bool,
    #[prost(message, optional, tag = "9")]
    pub family: Option<Family>,
}

/// `apipb.Family`: AFI 1 / 2 (IPv4 / IPv6), SAFI 1 (unicast).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Family {
    #[prost(int32, tag = "1")]
    pub afi: i32,
    #[prost(int32, tag = "2")]
    pub safi: i32,
}

/// `apipb.IPAddressPrefix`.
#[derive(Clone, PartialEq, Message)]
struct IpAddressPrefix {
    #[prost(uint32, tag = "1")]
    prefix_len: u32,
    #[prost(string, tag = "2")]
    prefix: String,
}

/// `apipb.OriginAttribute`; 0 is IGP.
#[derive(Clone, PartialEq, Message)]
struct OriginAttribute {
    #[prost(uint32, tag = "1")]
    origin: u32,
}

/// `apipb.NextHopAttribute`.
#[derive(Clone, PartialEq, Message)]
struct NextHopAttribute {
    #[prost(string, tag = "1")]
    next_hop: String,
}

/// `apipb.ListPeerRequest`; an empty address lists every peer.
#[derive(Clone, PartialEq, Message)]
struct ListPeerRequest {
    #[prost(string, tag = "1")]
    address: String,
}

/// `apipb.ListPeerResponse`: one per peer, streamed.
#[derive(Clone, PartialEq, Message)]
struct ListPeerResponse {
    #[prost(message, optional, tag = "1")]
    peer: Option<Peer>,
}

/// `apipb.Peer`: its state and its per-family counters.
#[derive(Clone, PartialEq, Message)]
struct Peer {
    #[prost(message, optional, tag = "5")]
    state: Option<PeerState>,
    #[prost(message, repeated, tag = "10")]
    afi_safis: Vec<AfiSafi>,
}

/// `apipb.PeerState`.
#[derive(Clone, PartialEq, Message)]
struct PeerState {
    #[prost(string, tag = "5")]
    neighbor_address: String,
    /// `apipb.PeerState.SessionState`: 1 Idle ... 6 Established.
    #[prost(int32, tag = "13")]
    session_state: i32,
}

/// `apipb.AfiSafi`.
#[derive(Clone, PartialEq, Message)]
struct AfiSafi {
    #[prost(message, optional, tag = "3")]
    state: Option<AfiSafiState>,
}

/// `apipb.AfiSafiState`.
#[derive(Clone, PartialEq, Message)]
struct AfiSafiState {
    /// Prefixes accepted from the peer in this family (what `gobgp neighbor` shows).
    #[prost(uint64, tag = "4")]
    accepted: u64,
}

/// `apipb.ListPathRequest`: the global table, one family, exact prefixes.
#[derive(Clone, PartialEq, Message)]
struct ListPathRequest {
    /// `apipb.TableType`; 0 is `GLOBAL`.
    #[prost(int32, tag = "1")]
    table_type: i32,
    #[prost(message, optional, tag = "3")]
    family: Option<Family>,
    #[prost(message, repeated, tag = "4")]
    prefixes: Vec<TableLookupPrefix>,
}

/// `apipb.TableLookupPrefix`; type 0 is `EXACT`.
#[derive(Clone, PartialEq, Message)]
struct TableLookupPrefix {
    #[prost(string, tag = "1")]
    prefix: String,
    #[prost(int32, tag = "2")]
    lookup: i32,
}

/// `apipb.ListPathResponse`: one destination per response.
#[derive(Clone, PartialEq, Message)]
struct ListPathResponse {
    #[prost(message, optional, tag = "1")]
    destination: Option<Destination>,
}

/// `apipb.Destination`.
#[derive(Clone, PartialEq, Message)]
struct Destination {
    #[prost(string, tag = "1")]
    prefix: String,
    #[prost(message, repeated, tag = "2")]
    paths: Vec<ReceivedPath>,
}

/// `apipb.Path` as read back: only where it came from.
#[derive(Clone, PartialEq, Message)]
struct ReceivedPath {
    #[prost(string, tag = "15")]
    neighbor_ip: String,
}

fn any(name: &str, message: &impl Message) -> Any {
    Any {
        type_url: format!("type.googleapis.com/apipb.{name}"),
        value: message.encode_to_vec(),
    }
}

/// One IPv4 unicast path: origin IGP, the next hop, and (for a withdraw) the flag.
pub(crate) fn ipv4_path(prefix: ipnet::Ipv4Net, next_hop: Ipv4Addr, withdraw: bool) -> Path {
    let net = IpNet::V4(prefix);
    Path {
        nlri: Some(any(
            "IPAddressPrefix",
            &IpAddressPrefix {
                prefix_len: u32::from(net.prefix_len()),
                prefix: net.network().to_string(),
            },
        )),
        pattrs: vec![
            any("OriginAttribute", &OriginAttribute { origin: 0 }),
            any(
                "NextHopAttribute",
                &NextHopAttribute {
                    next_hop: IpAddr::V4(next_hop).to_string(),
                },
            ),
        ],
        is_withdraw: withdraw,
        family: Some(Family { afi: 1, safi: 1 }),
    }
}

/// A connection to one gobgpd's API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    channel: Channel,
}

impl Api {
    pub(crate) async fn connect(port: u16) -> Result<Api> {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to GoBGP's API on 127.0.0.1:{port}"))?;
        Ok(Api { channel })
    }

    /// Sends `paths` in requests of `batch` paths over one `AddPathStream` call and returns
    /// when GoBGP has processed all of them (it answers after its last request).
    pub(crate) async fn add_path_stream(&self, paths: Vec<Path>, batch: usize) -> Result<()> {
        let mut requests = Vec::with_capacity(paths.len().div_ceil(batch.max(1)));
        let mut paths = paths.into_iter().peekable();
        while paths.peek().is_some() {
            requests.push(AddPathStreamRequest {
                table_type: 0,
                paths: paths.by_ref().take(batch.max(1)).collect(),
            });
        }
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_encoding_message_size(usize::MAX);
        grpc.ready().await.context("GoBGP's API is not ready")?;
        let codec: ProstCodec<AddPathStreamRequest, ()> = ProstCodec::default();
        grpc.client_streaming(
            tonic::Request::new(futures::stream::iter(requests)),
            PathAndQuery::from_static("/apipb.GobgpApi/AddPathStream"),
            codec,
        )
        .await
        .context("GoBGP AddPathStream")?;
        Ok(())
    }

    /// Opens one of GoBGP's server-streaming calls.
    async fn server_stream<Req, Resp>(
        &self,
        path: &'static str,
        request: Req,
    ) -> Result<tonic::Streaming<Resp>>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.context("GoBGP's API is not ready")?;
        let codec: ProstCodec<Req, Resp> = ProstCodec::default();
        Ok(grpc
            .server_streaming(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .with_context(|| format!("GoBGP {path}"))?
            .into_inner())
    }

    /// The neighbors the global table holds a path for `prefix` from.
    pub(crate) async fn path_sources(&self, prefix: IpNet) -> Result<Vec<IpAddr>> {
        let afi = match prefix {
            IpNet::V4(_) => 1,
            IpNet::V6(_) => 2,
        };
        let request = ListPathRequest {
            table_type: 0,
            family: Some(Family { afi, safi: 1 }),
            prefixes: vec![TableLookupPrefix {
                prefix: prefix.to_string(),
                lookup: 0,
            }],
        };
        let mut stream = self
            .server_stream::<_, ListPathResponse>("/apipb.GobgpApi/ListPath", request)
            .await?;
        let mut sources = Vec::new();
        // Bounded by GoBGP: an exact lookup streams at most the one destination.
        while let Some(response) = stream.message().await.context("GoBGP ListPath stream")? {
            let Some(destination) = response.destination else {
                continue;
            };
            let found: IpNet = destination
                .prefix
                .parse()
                .with_context(|| format!("GoBGP ListPath: prefix {:?}", destination.prefix))?;
            if found != prefix {
                continue;
            }
            for path in destination.paths {
                let neighbor: IpAddr = path.neighbor_ip.parse().with_context(|| {
                    format!("GoBGP ListPath {prefix}: neighbor {:?}", path.neighbor_ip)
                })?;
                sources.push(neighbor);
            }
        }
        Ok(sources)
    }

    /// Every neighbor with its session state and accepted prefixes, as `gobgp neighbor`
    /// shows them, over the open connection.
    pub(crate) async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        let mut stream = self
            .server_stream::<_, ListPeerResponse>(
                "/apipb.GobgpApi/ListPeer",
                ListPeerRequest::default(),
            )
            .await?;
        let mut out = Vec::new();
        // Bounded by GoBGP: it streams one response per configured or dynamic peer.
        while let Some(response) = stream.message().await.context("GoBGP ListPeer stream")? {
            let Some(peer) = response.peer else { continue };
            let state = peer.state.unwrap_or_default();
            let address: IpAddr = state.neighbor_address.parse().with_context(|| {
                format!(
                    "GoBGP ListPeer: neighbor address {:?}",
                    state.neighbor_address
                )
            })?;
            let session_state = i64::from(state.session_state);
            out.push(TorNeighbor {
                address,
                established: session_state == SESSION_ESTABLISHED,
                state: state_name(session_state).to_owned(),
                prefixes_received: peer
                    .afi_safis
                    .iter()
                    .filter_map(|afi| afi.state.as_ref())
                    .map(|state| state.accepted)
                    .sum(),
            });
        }
        Ok(out)
    }
}
