//! What each ToR does when a speaker goes away: a frozen speaker (session open, nothing
//! sent) loses its routes when the ToR's hold timer expires; a killed one (the kernel
//! closes the TCP connection) loses them at once; with graceful restart the ToR keeps
//! them, marked stale, until the speaker reconnects and sends End-of-RIB.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::{CONVERGE_TIMEOUT, ESTABLISH_TIMEOUT, next_hop_for, prefixes, speaker};
use herald_tor_harness::{Family, GobgpSpeaker, GobgpSpeakerConfig, Tor, TorConfig, TorKind};
use ipnet::IpNet;

const ROUTES: u32 = 10;

async fn hold_timer_and_kill(kind: TorKind) -> Result<()> {
    let config = TorConfig::new(kind);
    let hold = Duration::from_secs(u64::from(config.hold_time));
    let tor = Tor::start(config).await?;
    let (frozen, killed) = (Ipv4Addr::new(127, 0, 0, 20), Ipv4Addr::new(127, 0, 0, 21));
    let (to_freeze, to_kill) =
        tokio::try_join!(speaker(&tor, frozen, |_| {}), speaker(&tor, killed, |_| {}))?;
    let frozen_routes = prefixes(Ipv4Addr::new(10, 60, 0, 0), ROUTES);
    let killed_routes = prefixes(Ipv4Addr::new(10, 61, 0, 0), ROUTES);
    to_freeze
        .add_routes(&frozen_routes, next_hop_for(kind, frozen))
        .await?;
    to_kill
        .add_routes(&killed_routes, next_hop_for(kind, killed))
        .await?;
    tor.wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| {
        rib.len() == 2 * ROUTES as usize
    })
    .await?;

    let killed_at = Instant::now();
    to_kill.kill();
    tor.wait_until(Family::Ipv4, Duration::from_secs(3), |rib| {
        rib.len() == ROUTES as usize
    })
    .await?;
    let after_kill = killed_at.elapsed();

    let frozen_at = Instant::now();
    to_freeze.freeze();
    tor.wait_until(Family::Ipv4, hold + Duration::from_secs(3), |rib| {
        rib.is_empty()
    })
    .await?;
    let after_freeze = frozen_at.elapsed();
    eprintln!(
        "{kind}: killed speaker's routes gone after {after_kill:?}, frozen after {after_freeze:?}"
    );
    // The last keepalive can be up to a third of the hold time old when the speaker froze.
    ensure!(
        after_freeze >= hold - hold / 3 - Duration::from_millis(500),
        "{kind}: routes of a frozen speaker gone after {after_freeze:?}, before the hold time"
    );
    ensure!(
        after_kill < Duration::from_secs(2),
        "{kind}: {after_kill:?}"
    );
    Ok(())
}

async fn graceful_restart_keeps_routes(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.graceful_restart = Some(60);
    let hold = Duration::from_secs(u64::from(config.hold_time));
    let tor = Tor::start(config).await?;
    let source = Ipv4Addr::new(127, 0, 0, 20);
    let routes = prefixes(Ipv4Addr::new(10, 70, 0, 0), ROUTES);
    let next_hop = next_hop_for(kind, source);
    let first = speaker(&tor, source, |c| c.graceful_restart = Some(60)).await?;
    first.add_routes(&routes, next_hop).await?;
    tor.wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| {
        rib.len() == ROUTES as usize
    })
    .await?;

    first.kill();
    // The restarted speaker has its routes before its session comes up, so its first
    // UPDATEs (before End-of-RIB) refresh them: at no point may the ToR lose them.
    let mut config = GobgpSpeakerConfig::new(tor.bgp_port());
    config.source_addr = source;
    config.router_id = source;
    config.graceful_restart = Some(60);
    let second = GobgpSpeaker::start(config).await?;
    second.add_routes(&routes, next_hop).await?;
    let down_since = Instant::now();
    let mut saw_stale = false;
    let mut polls = 0u32;
    loop {
        let rib = tor.routes(Family::Ipv4).await?;
        polls += 1;
        ensure!(
            rib.len() == ROUTES as usize,
            "{kind}: lost routes during the restart after {:?}: {} left",
            down_since.elapsed(),
            rib.len()
        );
        saw_stale |= rib.values().flatten().any(|path| path.stale);
        let up = second.established().await?;
        if up && down_since.elapsed() > hold {
            break;
        }
        ensure!(
            down_since.elapsed() < ESTABLISH_TIMEOUT + hold,
            "{kind}: restarted speaker not up after {polls} polls"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // BIRD's `show route` does not mark stale routes; GoBGP and FRR do.
    ensure!(
        saw_stale || kind == TorKind::Bird,
        "{kind}: never saw stale paths"
    );
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| {
            rib.len() == ROUTES as usize && rib.values().flatten().all(|path| !path.stale)
        })
        .await?;
    let path = &rib[&IpNet::V4(routes[0])][0];
    ensure!(path.neighbor == IpAddr::V4(source), "{path:?}");
    Ok(())
}

#[tokio::test]
async fn gobgp_hold_timer_and_kill() -> Result<()> {
    hold_timer_and_kill(TorKind::Gobgp).await
}

#[tokio::test]
async fn bird_hold_timer_and_kill() -> Result<()> {
    hold_timer_and_kill(TorKind::Bird).await
}

#[tokio::test]
async fn frr_hold_timer_and_kill() -> Result<()> {
    hold_timer_and_kill(TorKind::Frr).await
}

#[tokio::test]
async fn gobgp_graceful_restart() -> Result<()> {
    graceful_restart_keeps_routes(TorKind::Gobgp).await
}

#[tokio::test]
async fn bird_graceful_restart() -> Result<()> {
    graceful_restart_keeps_routes(TorKind::Bird).await
}

#[tokio::test]
async fn frr_graceful_restart() -> Result<()> {
    graceful_restart_keeps_routes(TorKind::Frr).await
}
