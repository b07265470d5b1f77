//! A GoBGP speaker announces 1,000 /32s to each kind of ToR, which must hold them with the
//! right neighbor and next hop, then lose them all after the withdraw.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use herald_tor_harness::{Family, GobgpSpeaker, GobgpSpeakerConfig, Tor, TorConfig, TorKind};
use ipnet::{IpNet, Ipv4Net};

const ROUTES: u32 = 1_000;
/// GoBGP waits 5-10 s before its first connect attempt.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(20);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

fn prefixes(count: u32) -> Vec<Ipv4Net> {
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i);
            Ipv4Net::new(addr, 32).unwrap_or_else(|_| unreachable!("/32 is valid"))
        })
        .collect()
}

async fn thousand_routes_in_and_out(kind: TorKind) -> Result<()> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let config = GobgpSpeakerConfig::new(tor.bgp_port());
    let source = IpAddr::V4(config.source_addr);
    // GoBGP 3.10 as the ToR turns a 127.x classic NEXT_HOP into a withdraw; the others
    // take the speaker's own loopback address.
    let next_hop = match kind {
        TorKind::Gobgp => Ipv4Addr::new(192, 0, 2, 20),
        TorKind::Bird | TorKind::Frr => config.source_addr,
    };
    let speaker = GobgpSpeaker::start(config).await?;
    speaker.wait_established(ESTABLISH_TIMEOUT).await?;
    tor.wait_established(source, Duration::from_secs(5)).await?;

    let wanted = prefixes(ROUTES);
    let started = Instant::now();
    speaker.add_routes(&wanted, next_hop).await?;
    let injected = started.elapsed();
    tor.wait_for_count(Family::Ipv4, CONVERGE_TIMEOUT, |n| n == wanted.len())
        .await?;
    let arrived = started.elapsed();
    let rib = tor.routes(Family::Ipv4).await?;
    for prefix in &wanted {
        let paths = &rib[&IpNet::V4(*prefix)];
        ensure!(paths.len() == 1, "{prefix}: {paths:?}");
        ensure!(paths[0].neighbor == source, "{prefix}: {paths:?}");
        ensure!(
            paths[0].next_hop == Some(IpAddr::V4(next_hop)),
            "{prefix}: {paths:?}"
        );
        ensure!(paths[0].as_path == vec![65010], "{prefix}: {paths:?}");
    }
    let neighbors = tor.neighbors().await?;
    ensure!(
        neighbors.iter().any(|n| n.address == source
            && n.established
            && n.prefixes_received == u64::from(ROUTES)),
        "{neighbors:?}"
    );

    let withdraw_started = Instant::now();
    speaker.delete_routes(&wanted).await?;
    tor.wait_for_count(Family::Ipv4, CONVERGE_TIMEOUT, |n| n == 0)
        .await?;
    ensure!(tor.routes(Family::Ipv4).await?.is_empty());
    eprintln!(
        "{kind}: {ROUTES} routes injected in {injected:?}, at the ToR after {arrived:?}, \
         withdrawn in {:?}",
        withdraw_started.elapsed()
    );
    speaker.stop().await;
    tor.stop().await;
    Ok(())
}

#[tokio::test]
async fn gobgp_tor_takes_and_loses_1000_routes() -> Result<()> {
    thousand_routes_in_and_out(TorKind::Gobgp).await
}

#[tokio::test]
async fn bird_tor_takes_and_loses_1000_routes() -> Result<()> {
    thousand_routes_in_and_out(TorKind::Bird).await
}

#[tokio::test]
async fn frr_tor_takes_and_loses_1000_routes() -> Result<()> {
    thousand_routes_in_and_out(TorKind::Frr).await
}

/// The MRT path (`gobgp mrt inject` through a FIFO) delivers every route despite the 3.10
/// CLI dropping what is in flight when its input ends.
#[tokio::test]
async fn mrt_inject_delivers_every_route() -> Result<()> {
    use herald_tor_harness::mrt::MrtRoute;

    let tor = Tor::start(TorConfig::new(TorKind::Bird)).await?;
    let config = GobgpSpeakerConfig::new(tor.bgp_port());
    let source = config.source_addr;
    let speaker = GobgpSpeaker::start(config).await?;
    speaker.wait_established(ESTABLISH_TIMEOUT).await?;
    let mut routes: Vec<MrtRoute> = prefixes(ROUTES)
        .into_iter()
        .map(|prefix| MrtRoute::new(IpNet::V4(prefix), IpAddr::V4(source)))
        .collect();
    routes[0].med = Some(7);
    routes[0].communities = vec![(65010, 42)];
    routes[0].large_communities = vec![(65010, 1, 2)];
    speaker.inject(&routes).await?;
    speaker.settle().await?;
    tor.wait_for_count(Family::Ipv4, CONVERGE_TIMEOUT, |n| n == ROUTES as usize)
        .await?;
    let rib = tor.routes_for(Family::Ipv4, &[routes[0].prefix]).await?;
    let path = &rib[&routes[0].prefix][0];
    ensure!(path.med == Some(7), "{path:?}");
    ensure!(path.communities == vec![(65010, 42)], "{path:?}");
    ensure!(path.large_communities == vec![(65010, 1, 2)], "{path:?}");
    speaker.delete_all(Family::Ipv4).await?;
    tor.wait_for_count(Family::Ipv4, CONVERGE_TIMEOUT, |n| n == 0)
        .await?;
    Ok(())
}
