//! The edge between the protobuf snapshot and the BGP engine's types. Every proto message
//! is destructured exhaustively, so a field added to the proto is a compile error here
//! until someone decides what the speaker does with it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use herald_api::ipam::v1::IpFamily;
use herald_api::routing::v1 as pb;
use herald_bgp::driver::BGP_PORT;
use herald_bgp::{
    AttributeInterner, Family, GracefulRestartConfig, LargeCommunity, PeerConfig, RouteAttributes,
    Routes,
};
use ipnet::IpNet;

/// Hold time when the peer leaves it at 0 (the proto's default, RFC 4271 §10's suggestion).
pub const DEFAULT_HOLD_TIME: u16 = 90;
/// Connect retry when the peer leaves it at 0 (the proto's default): short, so a node
/// finds a rebooted ToR again quickly.
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Graceful restart time when the peer leaves it at 0 (the proto's default, as in MetalLB
/// and Cilium).
pub const DEFAULT_RESTART_TIME: u16 = 120;
/// The restart time field of the GR capability has 12 bits (RFC 4724 §3).
pub const MAX_RESTART_TIME: u32 = 4095;
/// Linux TCP_MD5SIG keys are at most 80 bytes.
pub const MAX_MD5_PASSWORD_LEN: usize = 80;

/// Why one route of a snapshot was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route prefix {prefix:?} is not an IP prefix: {reason}")]
    Prefix { prefix: String, reason: String },
    #[error("route prefix {prefix:?} has host bits set (did you mean {canonical}?)")]
    HostBits { prefix: String, canonical: IpNet },
    #[error("route {prefix}: next_hop {next_hop:?} is not an IP address")]
    NextHop { prefix: IpNet, next_hop: String },
    #[error("route {prefix} appears twice for one peer; the first one is kept")]
    Duplicate { prefix: IpNet },
}

/// Why a peer of a snapshot was not (re)configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer entry without a peer")]
    Missing,
    #[error("peer {peer:?}: {field} {value:?} is invalid: {reason}")]
    Field {
        peer: String,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "peer {peer:?} needs its TCP-MD5 password, which herald-ipam sends only over mutual TLS \
         (or to a client on its own host), and this speaker reaches it in plaintext; set \
         tls_cert, tls_key and tls_ca"
    )]
    PasswordWithheld { peer: String },
    #[error(
        "peer {peer:?}: no router id (the snapshot has none, no --router-id was given and the \
         source address is not IPv4)"
    )]
    NoRouterId { peer: String },
}

/// What the speaker needs from the snapshot to run one session.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    /// The peer's name in the BGP policy (unique per snapshot); sessions are keyed by it.
    pub name: String,
    pub config: PeerConfig,
    /// BFD beside the BGP session, when the policy asks for it.
    pub bfd: Option<BfdSpec>,
}

/// A peer's BFD parameters, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdSpec {
    pub min_rx: Duration,
    pub min_tx: Duration,
    pub multiplier: u8,
    pub multihop: bool,
}

/// BFD defaults when the policy leaves a field at 0 (as IPAM's policy does): 300 ms × 3.
pub const DEFAULT_BFD_INTERVAL: Duration = Duration::from_millis(300);
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;

fn bfd_from_pb(name: &str, bfd: &pb::Bfd) -> Result<BfdSpec, PeerError> {
    let pb::Bfd {
        min_rx_ms,
        min_tx_ms,
        multiplier,
        multihop,
    } = *bfd;
    let interval = |field: &'static str, ms: u32| match ms {
        0 => Ok(DEFAULT_BFD_INTERVAL),
        10..=60_000 => Ok(Duration::from_millis(u64::from(ms))),
        _ => Err(field_err(
            name,
            field,
            ms,
            "must be 10 to 60000 milliseconds",
        )),
    };
    let multiplier = match multiplier {
        0 => DEFAULT_BFD_MULTIPLIER,
        m => {
            u8::try_from(m).map_err(|_| field_err(name, "bfd.multiplier", m, "must be 1 to 255"))?
        }
    };
    Ok(BfdSpec {
        min_rx: interval("bfd.min_rx_ms", min_rx_ms)?,
        min_tx: interval("bfd.min_tx_ms", min_tx_ms)?,
        multiplier,
        multihop,
    })
}

/// The snapshot-wide parts that go into every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionDefaults {
    pub local_asn: u32,
    /// The node's router id: `--router-id` if given, else the snapshot's.
    pub router_id: Option<Ipv4Addr>,
}

fn field_err(
    peer: &str,
    field: &'static str,
    value: impl ToString,
    reason: &'static str,
) -> PeerError {
    PeerError::Field {
        peer: peer.to_string(),
        field,
        value: value.to_string(),
        reason,
    }
}

/// Turns one `PeerRoutes` entry into a session config, applying the proto's "0 means
/// default" rules and refusing values the engine would reject.
pub fn peer_from_pb(pr: &pb::PeerRoutes, defaults: SessionDefaults) -> Result<PeerSpec, PeerError> {
    let pb::PeerRoutes {
        peer,
        source_address,
        // The routes are `crate::desired`'s.
        routes: _,
        withdrawn: _,
        // The speaker's plan reads it: it decides when, not how, the session runs.
        defer_reset: _,
        md5_password_withheld,
    } = pr;
    let peer = peer.as_ref().ok_or(PeerError::Missing)?;
    // Without the password the ToR drops every connection attempt (or, worse, accepts a
    // session the operator asked to protect): no session is better than that.
    if *md5_password_withheld {
        return Err(PeerError::PasswordWithheld {
            peer: peer.name.clone(),
        });
    }
    let pb::Peer {
        name,
        address,
        asn,
        port,
        // Peer selection is IPAM's job: the snapshot holds only this node's peers.
        node_selector: _,
        hold_time_seconds,
        keepalive_seconds,
        connect_retry_seconds,
        md5_password,
        multihop_ttl,
        graceful_restart,
        restart_time_seconds,
        passive,
        local_asn,
        families,
        // IPAM resolves the subnet to `source_address` for this node.
        source_subnet: _,
        max_prefixes,
        bfd,
    } = peer;
    let name = name.as_str();
    if name.is_empty() {
        return Err(field_err(name, "name", name, "must not be empty"));
    }
    let peer_addr: IpAddr = address
        .parse()
        .map_err(|_| field_err(name, "address", address, "not an IP address"))?;
    if *asn == 0 {
        return Err(field_err(name, "asn", asn, "must not be 0"));
    }
    let source: Option<IpAddr> =
        if source_address.is_empty() {
            None
        } else {
            Some(source_address.parse().map_err(|_| {
                field_err(name, "source_address", source_address, "not an IP address")
            })?)
        };
    if let Some(src) = source
        && src.is_ipv4() != peer_addr.is_ipv4()
    {
        return Err(field_err(
            name,
            "source_address",
            source_address,
            "not of the peer address's family",
        ));
    }
    let router_id = match (defaults.router_id, source) {
        (Some(id), _) => id,
        (None, Some(IpAddr::V4(src))) => src,
        (None, _) => {
            return Err(PeerError::NoRouterId {
                peer: name.to_string(),
            });
        }
    };
    let port = match *port {
        0 => BGP_PORT,
        p => u16::try_from(p).map_err(|_| field_err(name, "port", p, "larger than 65535"))?,
    };
    let hold_time = match *hold_time_seconds {
        0 => DEFAULT_HOLD_TIME,
        1 | 2 => {
            return Err(field_err(
                name,
                "hold_time_seconds",
                hold_time_seconds,
                "must be 3 or more",
            ));
        }
        h => u16::try_from(h)
            .map_err(|_| field_err(name, "hold_time_seconds", h, "larger than 65535"))?,
    };
    let keepalive = match *keepalive_seconds {
        0 => None,
        k if k >= u32::from(hold_time) => {
            return Err(field_err(
                name,
                "keepalive_seconds",
                k,
                "must be less than the hold time",
            ));
        }
        // Smaller than the hold time, so it fits.
        k => Some(u16::try_from(k).unwrap_or(u16::MAX)),
    };
    let connect_retry = match *connect_retry_seconds {
        0 => DEFAULT_CONNECT_RETRY,
        s => Duration::from_secs(u64::from(s)),
    };
    if md5_password.len() > MAX_MD5_PASSWORD_LEN {
        return Err(field_err(
            name,
            "md5_password",
            "<hidden>",
            "longer than 80 bytes",
        ));
    }
    let ttl = match *multihop_ttl {
        0 => None,
        t if t > 255 => return Err(field_err(name, "multihop_ttl", t, "larger than 255")),
        t => Some(t),
    };
    let graceful_restart = if *graceful_restart {
        let restart_time = match *restart_time_seconds {
            0 => DEFAULT_RESTART_TIME,
            t if t > MAX_RESTART_TIME => {
                return Err(field_err(
                    name,
                    "restart_time_seconds",
                    t,
                    "larger than 4095",
                ));
            }
            t => u16::try_from(t).unwrap_or(DEFAULT_RESTART_TIME),
        };
        Some(GracefulRestartConfig {
            restart_time,
            restarting: false,
            // The node forwards to its Services whether or not this process runs
            // (kube-proxy or the CNI does): what the ToR keeps sending along our
            // stale routes while we restart still arrives.
            forwarding_preserved: true,
        })
    } else {
        None
    };

    let local_asn = match *local_asn {
        0 => defaults.local_asn,
        a => a,
    };
    if local_asn == 0 {
        return Err(field_err(
            name,
            "local_asn",
            local_asn,
            "neither the peer nor the snapshot sets one",
        ));
    }
    let families = if families.is_empty() {
        vec![match peer_addr {
            IpAddr::V4(_) => Family::Ipv4Unicast,
            IpAddr::V6(_) => Family::Ipv6Unicast,
        }]
    } else {
        let mut out = Vec::new();
        for &f in families {
            let family = match IpFamily::try_from(f) {
                Ok(IpFamily::Ipv4) => Family::Ipv4Unicast,
                Ok(IpFamily::Ipv6) => Family::Ipv6Unicast,
                Ok(IpFamily::Unspecified) | Err(_) => {
                    return Err(field_err(name, "families", f, "not IPv4 or IPv6"));
                }
            };
            if !out.contains(&family) {
                out.push(family);
            }
        }
        out
    };

    let mut config = PeerConfig::new(peer_addr, *asn, local_asn, router_id);
    config.families = families;
    config.peer_port = port;
    config.source_addr = source;
    config.hold_time = hold_time;
    config.keepalive = keepalive;
    config.connect_retry = connect_retry;
    config.md5_password = (!md5_password.is_empty()).then(|| md5_password.clone());
    config.ttl = ttl;
    config.graceful_restart = graceful_restart;
    config.max_prefixes = (*max_prefixes > 0).then_some(*max_prefixes);
    if *passive {
        // The proto has no local port yet: a passive session listens on the BGP port of
        // the node address (or of every address when the snapshot names none).
        let ip = source.unwrap_or(if peer_addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        });
        config.passive = true;
        config.listen = Some(SocketAddr::new(ip, BGP_PORT));
    }
    let bfd = bfd.as_ref().map(|b| bfd_from_pb(name, b)).transpose()?;
    if bfd.is_some() && source.is_none() {
        return Err(field_err(
            name,
            "source_address",
            "",
            "BFD needs the node address to send from and listen on",
        ));
    }
    Ok(PeerSpec {
        name: name.to_string(),
        config,
        bfd,
    })
}

/// Where one route came from, for the change-to-apply latency and (later) trace joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub prefix: IpNet,
    pub changed_at: Option<SystemTime>,
    pub traceparent: String,
}

/// The routes of one peer, converted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertedRoutes {
    pub routes: Routes,
    /// One entry per route in `routes` that carries a change time or a trace context.
    pub provenance: Vec<Provenance>,
    /// Routes left out, with the reason; the caller logs them.
    pub skipped: Vec<RouteError>,
}

/// Converts one route. The prefix must be canonical (no host bits); an empty next hop
/// means next-hop-self (the session's local address).
pub fn route_from_pb(route: &pb::Route) -> Result<(IpNet, RouteAttributes), RouteError> {
    let pb::Route {
        prefix,
        next_hop,
        communities,
        large_communities,
        local_pref,
        med,
        traceparent: _,
        changed_at: _,
    } = route;
    let net: IpNet =
        prefix
            .trim()
            .parse()
            .map_err(|e: ipnet::AddrParseError| RouteError::Prefix {
                prefix: prefix.clone(),
                reason: e.to_string(),
            })?;
    if net.trunc() != net {
        return Err(RouteError::HostBits {
            prefix: prefix.clone(),
            canonical: net.trunc(),
        });
    }
    let next_hop = if next_hop.is_empty() {
        None
    } else {
        Some(
            next_hop
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| RouteError::NextHop {
                    prefix: net,
                    next_hop: next_hop.clone(),
                })?,
        )
    };
    let large_communities = large_communities
        .iter()
        .map(|lc| {
            let pb::LargeCommunity {
                global_admin,
                local_data_1,
                local_data_2,
            } = *lc;
            LargeCommunity {
                global_admin,
                local_data1: local_data_1,
                local_data2: local_data_2,
            }
        })
        .collect();
    Ok((
        net,
        RouteAttributes {
            next_hop,
            med: *med,
            local_pref: *local_pref,
            communities: communities.clone(),
            large_communities,
            ..RouteAttributes::default()
        },
    ))
}

/// Converts a peer's routes. A malformed route is skipped (and named in
/// [`ConvertedRoutes::skipped`]), never fatal: one bad entry must not take the node's
/// other routes down.
pub fn routes_from_pb(pr: &pb::PeerRoutes) -> ConvertedRoutes {
    let mut out = ConvertedRoutes::default();
    let mut interner = AttributeInterner::new();
    for route in &pr.routes {
        match route_from_pb(route) {
            Ok((prefix, attrs)) => {
                if out.routes.contains_key(&prefix) {
                    out.skipped.push(RouteError::Duplicate { prefix });
                    continue;
                }
                out.routes.insert(prefix, interner.intern(attrs));
                out.provenance.extend(provenance_of(prefix, route));
            }
            Err(e) => out.skipped.push(e),
        }
    }
    out
}

/// Where `route` (converted to `prefix`) came from, when it says.
pub fn provenance_of(prefix: IpNet, route: &pb::Route) -> Option<Provenance> {
    let changed_at = route
        .changed_at
        .and_then(|ts| SystemTime::try_from(ts).ok());
    (changed_at.is_some() || !route.traceparent.is_empty()).then(|| Provenance {
        prefix,
        changed_at,
        traceparent: route.traceparent.clone(),
    })
}

/// `router_id` as the snapshot spells it: empty means "none".
pub fn parse_router_id(router_id: &str) -> Result<Option<Ipv4Addr>, String> {
    if router_id.is_empty() {
        return Ok(None);
    }
    router_id
        .parse()
        .map(Some)
        .map_err(|_| format!("router_id {router_id:?} is not an IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, next_hop: &str) -> pb::Route {
        pb::Route {
            prefix: prefix.into(),
            next_hop: next_hop.into(),
            ..pb::Route::default()
        }
    }

    fn pb_peer(name: &str) -> pb::Peer {
        pb::Peer {
            name: name.into(),
            address: "127.0.0.1".into(),
            asn: 65001,
            port: 10179,
            ..pb::Peer::default()
        }
    }

    fn peer_routes(peer: pb::Peer, routes: Vec<pb::Route>) -> pb::PeerRoutes {
        pb::PeerRoutes {
            peer: Some(peer),
            source_address: "127.0.0.10".into(),
            routes,
            defer_reset: false,
            withdrawn: vec![],
            md5_password_withheld: false,
        }
    }

    #[test]
    fn a_peer_whose_password_was_withheld_is_refused_saying_why() {
        let mut entry = peer_routes(pb_peer("guarded"), vec![]);
        entry.md5_password_withheld = true;
        let Err(e) = peer_from_pb(&entry, DEFAULTS) else {
            panic!("a peer without its withheld password was accepted");
        };
        assert_eq!(
            e,
            PeerError::PasswordWithheld {
                peer: "guarded".into()
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("guarded") && text.contains("mutual TLS") && text.contains("tls_cert"),
            "{text}"
        );
    }

    const DEFAULTS: SessionDefaults = SessionDefaults {
        local_asn: 65010,
        router_id: None,
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn bad_prefix_is_skipped_with_an_error() {
        let pr = peer_routes(
            pb_peer("tor"),
            vec![
                route("172.16.0.241/32", "127.0.0.10"),
                route("not-a-prefix", "127.0.0.10"),
                route("172.16.0.242/33", ""),
                route("172.16.0.0/16", "banana"),
                route("172.16.0.243/24", ""),
                route("172.16.0.241/32", "127.0.0.11"),
            ],
        );
        let out = routes_from_pb(&pr);
        assert_eq!(out.routes.len(), 1);
        let attrs = &out.routes[&net("172.16.0.241/32")];
        assert_eq!(
            attrs.next_hop,
            Some("127.0.0.10".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(out.skipped.len(), 5, "{:?}", out.skipped);
        assert!(
            matches!(&out.skipped[0], RouteError::Prefix { prefix, .. } if prefix == "not-a-prefix")
        );
        assert!(matches!(&out.skipped[1], RouteError::Prefix { .. }));
        assert!(
            matches!(&out.skipped[2], RouteError::NextHop { next_hop, .. } if next_hop == "banana")
        );
        assert!(
            matches!(&out.skipped[3], RouteError::HostBits { canonical, .. } if *canonical == net("172.16.0.0/24"))
        );
        assert!(matches!(&out.skipped[4], RouteError::Duplicate { .. }));
        // The messages name the offending value.
        assert!(out.skipped[2].to_string().contains("banana"));
    }

    #[test]
    fn communities_and_attributes() {
        let mut r = route("10.0.0.1/32", "");
        r.communities = vec![(65000 << 16) | 100, 0xFFFF_FF01];
        r.large_communities = vec![pb::LargeCommunity {
            global_admin: 65000,
            local_data_1: 1,
            local_data_2: 2,
        }];
        r.local_pref = Some(200);
        r.med = Some(10);
        let (prefix, attrs) = route_from_pb(&r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(prefix, net("10.0.0.1/32"));
        assert_eq!(attrs.next_hop, None, "empty next hop is next-hop-self");
        assert_eq!(attrs.communities, vec![(65000 << 16) | 100, 0xFFFF_FF01]);
        assert_eq!(
            attrs.large_communities,
            vec![LargeCommunity {
                global_admin: 65000,
                local_data1: 1,
                local_data2: 2
            }]
        );
        assert_eq!(attrs.local_pref, Some(200));
        assert_eq!(attrs.med, Some(10));
        assert!(attrs.as_path.is_empty());
    }

    #[test]
    fn ipv6_routes() {
        let pr = peer_routes(
            pb_peer("tor"),
            vec![
                route("2001:db8::1/128", "::1"),
                route("2001:db8:1::/48", ""),
            ],
        );
        let out = routes_from_pb(&pr);
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(
            out.routes
                .get(&net("2001:db8::1/128"))
                .and_then(|a| a.next_hop),
            Some("::1".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert!(out.routes.contains_key(&net("2001:db8:1::/48")));
    }

    #[test]
    fn provenance_is_kept() {
        let mut r = route("10.0.0.1/32", "");
        r.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
        r.changed_at = Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        });
        let out = routes_from_pb(&peer_routes(
            pb_peer("tor"),
            vec![r, route("10.0.0.2/32", "")],
        ));
        assert_eq!(out.provenance.len(), 1);
        assert_eq!(
            out.provenance[0].changed_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn peer_defaults() {
        let spec = peer_from_pb(&peer_routes(pb_peer("tor"), vec![]), DEFAULTS)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.name, "tor");
        let c = spec.config;
        assert_eq!(c.peer_port, 10179);
        assert_eq!(c.peer_asn, 65001);
        assert_eq!(c.local_asn, 65010);
        assert_eq!(
            c.router_id,
            Ipv4Addr::new(127, 0, 0, 10),
            "router id from the source address"
        );
        assert_eq!(
            c.source_addr,
            Some("127.0.0.10".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(c.hold_time, DEFAULT_HOLD_TIME);
        assert_eq!(c.keepalive, None);
        assert_eq!(c.connect_retry, DEFAULT_CONNECT_RETRY);
        assert_eq!(c.graceful_restart, None);
        assert_eq!(c.md5_password, None);
        assert_eq!(c.ttl, None);
        assert!(!c.passive);
        assert_eq!(c.families, vec![Family::Ipv4Unicast]);
    }

    #[test]
    fn peer_settings() {
        let mut p = pb_peer("tor");
        p.port = 0;
        p.hold_time_seconds = 9;
        p.keepalive_seconds = 3;
        p.connect_retry_seconds = 1;
        p.md5_password = "secret".into();
        p.multihop_ttl = 2;
        p.graceful_restart = true;
        p.local_asn = 65020;
        p.families = vec![
            IpFamily::Ipv4 as i32,
            IpFamily::Ipv6 as i32,
            IpFamily::Ipv4 as i32,
        ];
        let defaults = SessionDefaults {
            local_asn: 65010,
            router_id: Some(Ipv4Addr::new(10, 1, 1, 1)),
        };
        let c = peer_from_pb(&peer_routes(p, vec![]), defaults)
            .unwrap_or_else(|e| panic!("{e}"))
            .config;
        assert_eq!(c.peer_port, 179);
        assert_eq!(c.hold_time, 9);
        assert_eq!(c.keepalive, Some(3));
        assert_eq!(c.connect_retry, Duration::from_secs(1));
        assert_eq!(c.md5_password.as_deref(), Some("secret"));
        assert_eq!(c.ttl, Some(2));
        assert_eq!(
            c.graceful_restart,
            Some(GracefulRestartConfig {
                restart_time: DEFAULT_RESTART_TIME,
                restarting: false,
                forwarding_preserved: true,
            })
        );
        assert_eq!(c.local_asn, 65020);
        assert_eq!(c.router_id, Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(c.families, vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    }

    #[test]
    fn bfd_is_off_unless_the_peer_asks_and_fills_in_300_ms_times_3() {
        let spec = peer_from_pb(&peer_routes(pb_peer("tor"), vec![]), DEFAULTS)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.bfd, None);
        let mut p = pb_peer("tor");
        p.bfd = Some(pb::Bfd {
            min_tx_ms: 100,
            ..pb::Bfd::default()
        });
        let spec =
            peer_from_pb(&peer_routes(p, vec![]), DEFAULTS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spec.bfd,
            Some(BfdSpec {
                min_rx: Duration::from_millis(300),
                min_tx: Duration::from_millis(100),
                multiplier: 3,
                multihop: false,
            })
        );
    }

    #[test]
    fn bad_peers_are_refused_with_the_field_named() {
        fn peer(pr: &mut pb::PeerRoutes) -> &mut pb::Peer {
            pr.peer.get_or_insert_with(pb::Peer::default)
        }
        type Mutation = fn(&mut pb::PeerRoutes);
        let cases: Vec<(Mutation, &str)> = vec![
            (|p| peer(p).address = "tor.example".into(), "address"),
            (|p| peer(p).asn = 0, "asn"),
            (|p| peer(p).port = 70_000, "port"),
            (|p| peer(p).hold_time_seconds = 2, "hold_time_seconds"),
            (|p| peer(p).keepalive_seconds = 90, "keepalive_seconds"),
            (|p| peer(p).multihop_ttl = 256, "multihop_ttl"),
            (|p| peer(p).md5_password = "x".repeat(81), "md5_password"),
            (
                |p| {
                    peer(p).graceful_restart = true;
                    peer(p).restart_time_seconds = 5000;
                },
                "restart_time_seconds",
            ),
            (|p| peer(p).families = vec![0], "families"),
            (
                |p| {
                    peer(p).bfd = Some(pb::Bfd {
                        min_rx_ms: 5,
                        ..pb::Bfd::default()
                    })
                },
                "bfd.min_rx_ms",
            ),
            (
                |p| {
                    peer(p).bfd = Some(pb::Bfd {
                        multiplier: 256,
                        ..pb::Bfd::default()
                    })
                },
                "bfd.multiplier",
            ),
            (|p| p.source_address = "::1".into(), "source_address"),
            (|p| p.source_address = "node-a".into(), "source_address"),
        ];
        for (mutate, field) in cases {
            let mut pr = peer_routes(pb_peer("tor"), vec![]);
            mutate(&mut pr);
            match peer_from_pb(&pr, DEFAULTS) {
                Err(PeerError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected an error, got {other:?}"),
            }
        }
        let mut pr = peer_routes(pb_peer("tor"), vec![]);
        pr.source_address = String::new();
        assert!(matches!(
            peer_from_pb(&pr, DEFAULTS),
            Err(PeerError::NoRouterId { .. })
        ));
        pr.peer = None;
        assert_eq!(peer_from_pb(&pr, DEFAULTS), Err(PeerError::Missing));
    }

    #[test]
    fn router_id_parsing() {
        assert_eq!(parse_router_id(""), Ok(None));
        assert_eq!(
            parse_router_id("10.0.0.1"),
            Ok(Some(Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert!(parse_router_id("::1").is_err());
    }
}
