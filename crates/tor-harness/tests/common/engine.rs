//! Scenarios for Herald's BGP engine (`herald-bgp`) against a real ToR; each
//! `engine_vs_<router>.rs` runs them against one router.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use herald_bgp::{
    Family as BgpFamily, GracefulRestartConfig, PeerConfig, PeerHandle, PeerStatus,
    RouteAttributes, Routes, ShutdownMode, State,
};
use herald_tor_harness::{Family, Rib, TcpRelay, Tor, TorConfig, TorKind};
use ipnet::{IpNet, Ipv6Net};

use super::prefixes;

/// The engine connects at once (no GoBGP-style start delay).
pub const ESTABLISH: Duration = Duration::from_secs(10);
/// Bound for a ToR to converge on 10k routes on a loaded 2-core machine.
pub const BULK: Duration = Duration::from_secs(60);
pub const CONVERGE: Duration = Duration::from_secs(15);
pub const HOLD_TIME: u16 = 9;

pub const NODE_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// An engine peer from `source` to the ToR (AS 65010 → 65001).
pub fn peer_config(tor: &Tor, source: Ipv4Addr) -> PeerConfig {
    let mut config = PeerConfig::new(
        IpAddr::V4(tor.config().listen_addr),
        tor.config().local_asn,
        tor.config().peer_asn,
        source,
    );
    config.peer_port = tor.bgp_port();
    config.source_addr = Some(IpAddr::V4(source));
    config.hold_time = HOLD_TIME;
    config.connect_retry = Duration::from_secs(1);
    config
}

/// Spawns the engine and waits until both it and the ToR see Established.
pub async fn engine(tor: &Tor, config: PeerConfig) -> Result<PeerHandle> {
    let source = config.source_addr;
    let peer = PeerHandle::spawn(config).await?;
    if let Err(status) = peer.wait_established(ESTABLISH).await {
        bail!("{} engine not Established: {status:?}", tor.kind());
    }
    if let Some(source) = source {
        tor.wait_established(source, ESTABLISH).await?;
    }
    Ok(peer)
}

/// A ToR with engines from NODE_A and NODE_B, both sessions Established.
async fn tor_with_two_engines(kind: TorKind) -> Result<(Tor, PeerHandle, PeerHandle)> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let (a, b) = tokio::try_join!(
        engine(&tor, peer_config(&tor, NODE_A)),
        engine(&tor, peer_config(&tor, NODE_B))
    )?;
    Ok((tor, a, b))
}

fn host_routes(base: Ipv4Addr, count: u32) -> Routes {
    prefixes(base, count)
        .into_iter()
        .map(|p| (IpNet::V4(p), RouteAttributes::default().into()))
        .collect()
}

fn paths_from(rib: &Rib, prefix: &IpNet) -> Vec<IpAddr> {
    rib.get(prefix)
        .map(|paths| paths.iter().map(|p| p.neighbor).collect())
        .unwrap_or_default()
}

/// Two engines from 127.0.0.10 and .11 announce one /32: two ECMP paths, each with its
/// node as next hop; withdrawing removes one path, then the other.
pub async fn ecmp_and_withdraw(kind: TorKind) -> Result<()> {
    let (tor, a, b) = tor_with_two_engines(kind).await?;
    let routes = host_routes(Ipv4Addr::new(10, 80, 0, 1), 1);
    let prefix = *routes.keys().next().unwrap_or_else(|| unreachable!());
    a.set_desired(routes.clone());
    b.set_desired(routes);
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE, |rib| {
            rib.get(&prefix).is_some_and(|p| p.len() == 2)
        })
        .await?;
    let paths = &rib[&prefix];
    for (path, node) in paths.iter().zip([NODE_A, NODE_B]) {
        ensure!(path.neighbor == IpAddr::V4(node), "{kind}: {paths:?}");
        ensure!(path.next_hop == Some(IpAddr::V4(node)), "{kind}: {paths:?}");
        ensure!(path.as_path == vec![65010], "{kind}: {paths:?}");
    }
    let mut sources = tor.path_sources(prefix).await?;
    sources.sort();
    ensure!(
        sources == [IpAddr::V4(NODE_A), IpAddr::V4(NODE_B)],
        "{kind}: path sources {sources:?}"
    );
    let elsewhere = tor.path_sources("10.80.9.9/32".parse()?).await?;
    ensure!(elsewhere.is_empty(), "{kind}: {elsewhere:?}");

    let started = Instant::now();
    a.set_desired(Routes::new());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        paths_from(rib, &prefix) == vec![IpAddr::V4(NODE_B)]
    })
    .await?;
    let first = started.elapsed();
    let sources = tor.path_sources(prefix).await?;
    ensure!(
        sources == [IpAddr::V4(NODE_B)],
        "{kind}: path sources {sources:?}"
    );
    b.set_desired(Routes::new());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.is_empty())
        .await?;
    eprintln!(
        "{kind}: withdraw 1 of 2 paths seen after {first:?}, both after {:?}",
        started.elapsed()
    );
    a.shutdown(ShutdownMode::Withdraw {
        message: "test done".into(),
    })
    .await;
    b.shutdown(ShutdownMode::Withdraw {
        message: "test done".into(),
    })
    .await;
    Ok(())
}

/// The ToR's per-neighbor view: each engine Established, with the number of prefixes it
/// announced; after a withdraw, the count drops. Benchmarks poll these counters to tell
/// when a burst has arrived.
pub async fn neighbor_counters(kind: TorKind) -> Result<()> {
    let (tor, a, b) = tor_with_two_engines(kind).await?;
    a.set_desired(host_routes(Ipv4Addr::new(10, 81, 0, 1), 3));
    b.set_desired(host_routes(Ipv4Addr::new(10, 82, 0, 1), 1));
    let counts = |a_count: u64, b_count: u64| {
        move |neighbors: &[herald_tor_harness::TorNeighbor]| {
            let count = |node: Ipv4Addr| {
                neighbors
                    .iter()
                    .find(|n| n.address == IpAddr::V4(node) && n.established)
                    .map(|n| n.prefixes_received)
            };
            count(NODE_A) == Some(a_count) && count(NODE_B) == Some(b_count)
        }
    };
    let neighbors = tor.wait_neighbors(CONVERGE, counts(3, 1)).await?;
    ensure!(
        neighbors.iter().all(|n| n.state == "Established"),
        "{kind}: {neighbors:?}"
    );
    a.set_desired(host_routes(Ipv4Addr::new(10, 81, 0, 1), 1));
    tor.wait_neighbors(CONVERGE, counts(1, 1)).await?;
    for peer in [a, b] {
        peer.shutdown(ShutdownMode::Withdraw {
            message: "test done".into(),
        })
        .await;
    }
    Ok(())
}

/// 10,000 /32s arrive complete (right neighbor and next hop) in at most ⌈N/500⌉ UPDATEs,
/// and are withdrawn completely.
pub async fn ten_thousand(kind: TorKind) -> Result<()> {
    const N: u32 = 10_000;
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let peer = engine(&tor, peer_config(&tor, NODE_A)).await?;
    let routes = host_routes(Ipv4Addr::new(10, 90, 0, 0), N);
    let before = peer.status().updates_sent;
    let started = Instant::now();
    peer.set_desired(routes.clone());
    tor.wait_for_count(Family::Ipv4, BULK, |n| n == N as usize)
        .await?;
    let arrived = started.elapsed();
    // GoBGP's full dump of routes that came in MP_REACH_NLRI takes tens of seconds (see
    // `Tor::route_count`), so there a spread-out sample is checked; elsewhere all of them.
    let query = Instant::now();
    let checked: Vec<IpNet> = match kind {
        TorKind::Gobgp => routes
            .keys()
            .step_by(199)
            .copied()
            .chain(routes.keys().last().copied())
            .collect(),
        TorKind::Bird | TorKind::Frr => routes.keys().copied().collect(),
    };
    let rib = tor.routes_for(Family::Ipv4, &checked).await?;
    let query = query.elapsed();
    ensure!(
        rib.len() == checked.len(),
        "{kind}: {} of {} checked prefixes",
        rib.len(),
        checked.len()
    );
    for prefix in &checked {
        let paths = &rib[prefix];
        ensure!(
            paths.len() == 1
                && paths[0].neighbor == IpAddr::V4(NODE_A)
                && paths[0].next_hop == Some(IpAddr::V4(NODE_A)),
            "{kind}: {prefix}: {paths:?}"
        );
    }
    let updates = peer.status().updates_sent - before;
    let started = Instant::now();
    peer.set_desired(Routes::new());
    tor.wait_for_count(Family::Ipv4, BULK, |n| n == 0).await?;
    eprintln!(
        "{kind}: {N} routes at the ToR after {arrived:?} in {updates} UPDATEs; withdrawn \
         after {:?}; reading {} of them back took {query:?}",
        started.elapsed(),
        checked.len()
    );
    ensure!(
        tor.routes_for(Family::Ipv4, &checked).await?.is_empty(),
        "{kind}: routes left after the withdraw"
    );
    ensure!(
        updates <= u64::from(N.div_ceil(500)),
        "{kind}: {updates} UPDATEs for {N} routes"
    );
    peer.shutdown(ShutdownMode::Withdraw {
        message: "test done".into(),
    })
    .await;
    Ok(())
}

/// An IPv6 /128 over the IPv4 session (MP_REACH_NLRI). The next hop is a global
/// documentation address: the one kind every router accepts (see tests/ipv6.rs).
pub async fn ipv6_host_route(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.ipv6 = true;
    let tor = Tor::start(config).await?;
    let mut config = peer_config(&tor, NODE_A);
    config.families = vec![BgpFamily::Ipv4Unicast, BgpFamily::Ipv6Unicast];
    let peer = engine(&tor, config).await?;
    let prefix: Ipv6Net = "2001:db8:100::10/128".parse()?;
    let next_hop: IpAddr = "2001:db8::10".parse()?;
    let mut routes = Routes::new();
    routes.insert(
        IpNet::V6(prefix),
        RouteAttributes {
            next_hop: Some(next_hop),
            ..RouteAttributes::default()
        }
        .into(),
    );
    peer.set_desired(routes);
    let rib = tor
        .wait_until(Family::Ipv6, CONVERGE, |rib| {
            rib.contains_key(&IpNet::V6(prefix))
        })
        .await?;
    let path = &rib[&IpNet::V6(prefix)][0];
    ensure!(path.neighbor == IpAddr::V4(NODE_A), "{kind}: {path:?}");
    ensure!(path.next_hop == Some(next_hop), "{kind}: {path:?}");
    peer.set_desired(Routes::new());
    tor.wait_until(Family::Ipv6, CONVERGE, |rib| rib.is_empty())
        .await?;
    peer.shutdown(ShutdownMode::Withdraw {
        message: "test done".into(),
    })
    .await;
    Ok(())
}

/// The engine's connection goes silent (a relay in the path stops moving bytes but keeps
/// both TCP connections open): the ToR drops the routes when its hold timer expires, not
/// before; and the engine notices on its own hold timer.
pub async fn hold_timer_expiry(kind: TorKind) -> Result<()> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let hold = Duration::from_secs(u64::from(tor.config().hold_time));
    let upstream = SocketAddr::from((tor.config().listen_addr, tor.bgp_port()));
    // The ToR sees the relay's source, 127.0.0.10, as the neighbor.
    let relay = TcpRelay::start(Ipv4Addr::new(127, 0, 0, 2), upstream, NODE_A).await?;
    let mut config = peer_config(&tor, NODE_A);
    config.peer_addr = relay.local_addr().ip();
    config.peer_port = relay.local_addr().port();
    config.source_addr = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    let peer = PeerHandle::spawn(config).await?;
    if let Err(status) = peer.wait_established(ESTABLISH).await {
        bail!("{kind} engine (through the relay) not Established: {status:?}");
    }
    peer.set_desired(host_routes(Ipv4Addr::new(10, 91, 0, 0), 10));
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.len() == 10)
        .await?;

    let silent_at = Instant::now();
    relay.blackhole();
    tor.wait_until(Family::Ipv4, hold + Duration::from_secs(3), |rib| {
        rib.is_empty()
    })
    .await?;
    let gone = silent_at.elapsed();
    let engine_down = peer
        .wait_for(hold + Duration::from_secs(3), |s| {
            s.state != State::Established
        })
        .await;
    eprintln!("{kind}: routes gone {gone:?} after the link went silent; engine: {engine_down:?}");
    ensure!(
        gone >= hold - hold / 3 - Duration::from_millis(500),
        "{kind}: routes gone after {gone:?}, before the hold time {hold:?}"
    );
    let status = engine_down.map_err(|s| anyhow::anyhow!("engine still Established: {s:?}"))?;
    ensure!(status.last_error.is_some(), "{kind}: {status:?}");
    drop(relay);
    peer.shutdown(ShutdownMode::Graceful).await;
    Ok(())
}

/// With graceful restart negotiated, the ToR keeps the routes (stale) when the engine's
/// connection drops, and a restarted engine that re-announces the same set within the
/// restart time replaces them without a gap. Without it, they go at once.
pub async fn graceful_restart(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.graceful_restart = Some(60);
    let tor = Tor::start(config).await?;
    let routes = host_routes(Ipv4Addr::new(10, 92, 0, 0), 20);
    let gr = |restarting| {
        Some(GracefulRestartConfig {
            restart_time: 60,
            restarting,
            forwarding_preserved: true,
        })
    };
    let mut config = peer_config(&tor, NODE_A);
    config.graceful_restart = gr(false);
    let first = engine(&tor, config.clone()).await?;
    first.set_desired(routes.clone());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.len() == routes.len())
        .await?;
    let negotiated = first.status().negotiated;
    ensure!(
        negotiated
            .as_ref()
            .is_some_and(|n| n.peer_graceful_restart.is_some()),
        "{kind}: graceful restart not negotiated: {negotiated:?}"
    );

    first.shutdown(ShutdownMode::Graceful).await;
    let down_at = Instant::now();
    // Past the hold time: the routes must still be there, stale where the router shows it.
    let mut saw_stale = false;
    while down_at.elapsed() < Duration::from_secs(u64::from(HOLD_TIME) + 1) {
        let rib = tor.routes(Family::Ipv4).await?;
        ensure!(
            rib.len() == routes.len(),
            "{kind}: lost routes {:?} after the drop",
            down_at.elapsed()
        );
        saw_stale |= rib.values().flatten().all(|p| p.stale);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        saw_stale || kind == TorKind::Bird,
        "{kind}: routes never marked stale"
    );

    config.graceful_restart = gr(true);
    let second = PeerHandle::spawn(config).await?;
    second.set_desired(routes.clone());
    let reconnect_at = Instant::now();
    loop {
        let rib = tor.routes(Family::Ipv4).await?;
        ensure!(
            rib.len() == routes.len(),
            "{kind}: gap during the reconnect: {} routes",
            rib.len()
        );
        if second.status().state == State::Established
            && rib
                .values()
                .flatten()
                .all(|p| !p.stale && p.neighbor == IpAddr::V4(NODE_A))
        {
            break;
        }
        ensure!(
            reconnect_at.elapsed() < ESTABLISH + CONVERGE,
            "{kind}: restarted engine did not refresh its routes: {:?}",
            second.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second
        .shutdown(ShutdownMode::Withdraw {
            message: "test done".into(),
        })
        .await;
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.is_empty())
        .await?;

    // Without graceful restart the routes leave with the connection.
    let no_gr = {
        let mut config = peer_config(&tor, NODE_B);
        config.graceful_restart = None;
        engine(&tor, config).await?
    };
    no_gr.set_desired(routes.clone());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.len() == routes.len())
        .await?;
    let dropped_at = Instant::now();
    no_gr.shutdown(ShutdownMode::Graceful).await;
    tor.wait_until(Family::Ipv4, Duration::from_secs(3), |rib| rib.is_empty())
        .await?;
    eprintln!(
        "{kind}: without graceful restart, routes gone {:?} after the drop",
        dropped_at.elapsed()
    );
    Ok(())
}

/// A wrong local ASN and a closed port give a clear session error, not a crash or a
/// busy loop; the ToR never sees an Established neighbor.
pub async fn session_errors(kind: TorKind) -> Result<()> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let mut config = peer_config(&tor, NODE_A);
    config.local_asn = 65099;
    let wrong_asn = PeerHandle::spawn(config).await?;

    // A port nobody listens on: bind, note it, close.
    let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let closed_port = closed.local_addr()?.port();
    drop(closed);
    let mut config = peer_config(&tor, NODE_B);
    config.peer_port = closed_port;
    let refused = PeerHandle::spawn(config).await?;

    let has_error =
        |s: &PeerStatus| s.last_error.is_some() || s.last_notification_received.is_some();
    let wrong = wrong_asn.wait_for(ESTABLISH, has_error).await;
    let refused_status = refused.wait_for(ESTABLISH, has_error).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let wrong = wrong.map_err(|s| anyhow::anyhow!("{kind}: no error for a wrong ASN: {s:?}"))?;
    let refused_status =
        refused_status.map_err(|s| anyhow::anyhow!("{kind}: no error for a closed port: {s:?}"))?;
    eprintln!(
        "{kind}: wrong ASN → {:?} / {:?}; closed port → {:?}",
        wrong.last_error, wrong.last_notification_received, refused_status.last_error
    );
    for (what, handle) in [("wrong ASN", &wrong_asn), ("closed port", &refused)] {
        let status = handle.status();
        ensure!(
            status.state != State::Established && status.established_count == 0,
            "{kind} {what}: {status:?}"
        );
    }
    if let Some(n) = &wrong.last_notification_received {
        // OPEN Message Error / Bad Peer AS (RFC 4271 §6.2).
        ensure!(n.code == 2, "{kind}: wrong ASN answered with {n:?}");
    }
    let neighbors = tor.neighbors().await?;
    ensure!(
        neighbors.iter().all(|n| !n.established),
        "{kind}: {neighbors:?}"
    );
    wrong_asn.shutdown(ShutdownMode::Graceful).await;
    refused.shutdown(ShutdownMode::Graceful).await;
    Ok(())
}

/// "Missing next hop address", which BIRD logged at every session start from a Herald
/// speaker, comes from the OPEN: an IPv6 unicast capability on an IPv4 session starts
/// BIRD's IPv6 channel, which has no IPv6 address of its own for a next hop. A session
/// offers only its address's family unless told otherwise, so a ToR with IPv6 on logs
/// nothing about next hops, through session start, End-of-RIB, announcements,
/// withdrawals and the ToR's own exports; offering IPv6 as well brings the warning back.
pub async fn clean_session_start(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.export_to_peers = true;
    config.ipv6 = true;
    let tor = Tor::start(config).await?;
    let routes = host_routes(Ipv4Addr::new(10, 83, 0, 1), 3);
    let first = *routes.keys().next().unwrap_or_else(|| unreachable!());
    // As a speaker starts: its routes are desired before the session comes up.
    let mut peers = Vec::new();
    for source in [NODE_A, NODE_B] {
        let peer = PeerHandle::spawn(peer_config(&tor, source)).await?;
        peer.set_desired(routes.clone());
        peers.push(peer);
    }
    for peer in &peers {
        if let Err(status) = peer.wait_established(ESTABLISH).await {
            bail!("{kind} engine not Established: {status:?}");
        }
    }
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        rib.len() == 3 && paths_from(rib, &first).len() == 2
    })
    .await?;
    peers[0].set_desired(host_routes(Ipv4Addr::new(10, 83, 0, 1), 1));
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        rib.len() == 3 && paths_from(rib, &first).len() == 2
    })
    .await?;
    // Room for the ToR's exports to the nodes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = tor.log();
    ensure!(
        !log.to_lowercase().contains("next hop"),
        "{kind} complained about a next hop:\n{log}"
    );
    if kind == TorKind::Bird {
        // The cause, shown: a third node offering IPv6 too.
        let mut both = peer_config(&tor, Ipv4Addr::new(127, 0, 0, 12));
        both.families = vec![BgpFamily::Ipv4Unicast, BgpFamily::Ipv6Unicast];
        let peer = engine(&tor, both).await?;
        let deadline = Instant::now() + CONVERGE;
        while !tor.log().contains("Missing next hop address") {
            ensure!(
                Instant::now() < deadline,
                "BIRD did not warn for a session offering IPv6 over IPv4:\n{}",
                tor.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peers.push(peer);
    }
    for peer in peers {
        peer.shutdown(ShutdownMode::Withdraw {
            message: "test done".into(),
        })
        .await;
    }
    Ok(())
}

/// A ToR that sends no capabilities (no MP-BGP, no 4-octet AS): the engine falls back to
/// classic IPv4 NLRI with a NEXT_HOP attribute and a 2-octet AS_PATH, and the routes
/// arrive, with the right next hop, and go again.
pub async fn classic_ipv4_peer(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.capabilities = false;
    let tor = Tor::start(config).await?;
    let peer = engine(&tor, peer_config(&tor, NODE_A)).await?;
    let negotiated = peer
        .status()
        .negotiated
        .ok_or_else(|| anyhow::anyhow!("Established without negotiated parameters"))?;
    ensure!(
        negotiated.ipv4_nlri == herald_bgp::wire::Ipv4NlriEncoding::Classic
            && !negotiated.four_octet_asn
            && negotiated.families == [BgpFamily::Ipv4Unicast],
        "{kind}: expected classic IPv4 without capabilities: {negotiated:?}"
    );
    let routes = host_routes(Ipv4Addr::new(10, 84, 0, 1), 3);
    let first = *routes.keys().next().unwrap_or_else(|| unreachable!());
    peer.set_desired(routes);
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE, |rib| rib.len() == 3)
        .await?;
    let paths = rib.get(&first).cloned().unwrap_or_default();
    ensure!(
        paths.len() == 1
            && paths[0].next_hop == Some(IpAddr::V4(NODE_A))
            && paths[0].as_path == [65010],
        "{kind}: {first} arrived as {paths:?}"
    );
    let status = peer.status();
    ensure!(
        status.advertised.len() == 3,
        "the engine reports what it wrote: {:?}",
        status.advertised.keys().collect::<Vec<_>>()
    );
    peer.set_desired(Routes::new());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.is_empty())
        .await?;
    peer.shutdown(ShutdownMode::Withdraw {
        message: "test done".into(),
    })
    .await;
    Ok(())
}

/// Max-prefix (run against BIRD: FRR passes the routes on without a NEXT_HOP, which the
/// engine treats as withdrawn, so they never count): the ToR passes node A's three
/// routes on to node B, whose limit is two: B
/// sends Cease 6/1 with AFI/SAFI and the limit (RFC 4486) and drops the session. Node A,
/// with no limit, keeps only counts of what the ToR sends it.
pub async fn max_prefixes(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.export_to_peers = true;
    let tor = Tor::start(config).await?;
    let a = engine(&tor, peer_config(&tor, NODE_A)).await?;
    let mut limited = peer_config(&tor, NODE_B);
    limited.max_prefixes = Some(2);
    let b = engine(&tor, limited).await?;
    a.set_desired(host_routes(Ipv4Addr::new(10, 85, 0, 1), 3));
    let status = b
        .wait_for(CONVERGE, |s| s.last_notification_sent.is_some())
        .await
        .map_err(|s| anyhow::anyhow!("{kind}: B never sent a NOTIFICATION: {s:?}"))?;
    let n = status
        .last_notification_sent
        .clone()
        .unwrap_or_else(|| unreachable!());
    ensure!(
        (n.code, n.subcode) == (6, 1) && n.data == [0, 1, 1, 0, 0, 0, 2],
        "{kind}: B sent {n:?}"
    );
    ensure!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("more than the limit of 2")),
        "{status:?}"
    );
    // The ToR saw the session end.
    tor.wait_neighbors(CONVERGE, |n| {
        n.iter()
            .any(|n| n.address == IpAddr::V4(NODE_B) && !n.established)
            || !n.iter().any(|n| n.address == IpAddr::V4(NODE_B))
    })
    .await?;
    // A without a limit: no set kept, the counters say what arrived.
    let a_status = a.status();
    ensure!(
        a_status.state == State::Established,
        "A is untouched: {a_status:?}"
    );
    for peer in [a, b] {
        peer.shutdown(ShutdownMode::Withdraw {
            message: "test done".into(),
        })
        .await;
    }
    Ok(())
}

/// Everything the engine logs while it is installed (on this thread: `#[tokio::test]`
/// runs every task on the test's thread).
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

/// FRR passes node A's routes on to node B (and back to A) with B's own AS in the path
/// and without a NEXT_HOP: the engine treats them as withdrawn, quietly (DEBUG), since
/// it would discard a looped route anyway; the WARN stays for real malformations.
pub async fn reflected_own_routes_are_quiet(kind: TorKind) -> Result<()> {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut config = TorConfig::new(kind);
    config.export_to_peers = true;
    let tor = Tor::start(config).await?;
    let (a, b) = tokio::try_join!(
        engine(&tor, peer_config(&tor, NODE_A)),
        engine(&tor, peer_config(&tor, NODE_B))
    )?;
    a.set_desired(host_routes(Ipv4Addr::new(10, 86, 0, 1), 3));
    let status = b
        .wait_for(CONVERGE, |s| s.malformed_updates_received > 0)
        .await
        .map_err(|s| anyhow::anyhow!("{kind} sent B nothing malformed: {s:?}"))?;
    ensure!(status.state == State::Established, "{status:?}");
    let text = log.text();
    ensure!(
        text.contains("our own route reflected back"),
        "the reflected route was not recognised:\n{text}"
    );
    ensure!(
        !text.contains("malformed UPDATE handled per RFC 7606"),
        "a WARN for the expected reflection:\n{text}"
    );
    for peer in [a, b] {
        peer.shutdown(ShutdownMode::Withdraw {
            message: "test done".into(),
        })
        .await;
    }
    Ok(())
}
