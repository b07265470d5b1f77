//! Two speakers on different 127.x sources announce the same /32: every ToR holds two
//! paths (ECMP candidates), loses one per withdraw, then the prefix.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, ensure};
use common::{CONVERGE_TIMEOUT, next_hop_for, prefixes, speaker};
use herald_tor_harness::{Family, Tor, TorConfig, TorKind};
use ipnet::IpNet;

async fn two_paths_then_none(kind: TorKind) -> Result<()> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 20), Ipv4Addr::new(127, 0, 0, 21));
    let (speaker_a, speaker_b) =
        tokio::try_join!(speaker(&tor, a, |_| {}), speaker(&tor, b, |_| {}))?;
    let prefix = prefixes(Ipv4Addr::new(10, 50, 0, 1), 1);
    let key = IpNet::V4(prefix[0]);
    speaker_a.add_routes(&prefix, next_hop_for(kind, a)).await?;
    speaker_b.add_routes(&prefix, next_hop_for(kind, b)).await?;

    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| {
            rib.get(&key).is_some_and(|paths| paths.len() == 2)
        })
        .await?;
    let paths = &rib[&key];
    ensure!(paths[0].neighbor == IpAddr::V4(a), "{paths:?}");
    ensure!(
        paths[0].next_hop == Some(IpAddr::V4(next_hop_for(kind, a))),
        "{paths:?}"
    );
    ensure!(paths[1].neighbor == IpAddr::V4(b), "{paths:?}");
    ensure!(
        paths[1].next_hop == Some(IpAddr::V4(next_hop_for(kind, b))),
        "{paths:?}"
    );

    speaker_a.delete_routes(&prefix).await?;
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| {
            rib.get(&key).is_some_and(|paths| paths.len() == 1)
        })
        .await?;
    ensure!(rib[&key][0].neighbor == IpAddr::V4(b), "{rib:?}");

    speaker_b.delete_routes(&prefix).await?;
    tor.wait_until(Family::Ipv4, CONVERGE_TIMEOUT, |rib| rib.is_empty())
        .await?;
    Ok(())
}

#[tokio::test]
async fn gobgp_ecmp() -> Result<()> {
    two_paths_then_none(TorKind::Gobgp).await
}

#[tokio::test]
async fn bird_ecmp() -> Result<()> {
    two_paths_then_none(TorKind::Bird).await
}

#[tokio::test]
async fn frr_ecmp() -> Result<()> {
    two_paths_then_none(TorKind::Frr).await
}
