//! IPv6 /128s over an IPv4 session (MP_REACH_NLRI with an IPv6 next hop). Pins which next
//! hops each router accepts, so a package upgrade that changes it fails loudly:
//!
//! | next hop            | GoBGP 3.10 | BIRD 2.0.12 | FRR 8.4 |
//! |---------------------|------------|-------------|---------|
//! | `::1`               | yes        | yes         | no      |
//! | `::ffff:127.0.0.20` | yes*       | no          | yes     |
//! | `2001:db8::20`      | yes        | yes         | yes     |
//!
//! (*) GoBGP shows the IPv4-mapped next hop as `127.0.0.20`. A global documentation
//! address works everywhere; nothing is routed, so it is only an attribute.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{CONVERGE_TIMEOUT, speaker};
use herald_tor_harness::{Family, Tor, TorConfig, TorKind};
use ipnet::{IpNet, Ipv6Net};

async fn next_hop_matrix(kind: TorKind, accepted: [bool; 3]) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.ipv6 = true;
    let tor = Tor::start(config).await?;
    let source = Ipv4Addr::new(127, 0, 0, 20);
    let speaker = speaker(&tor, source, |_| {}).await?;
    let cases: [(Ipv6Net, Ipv6Addr); 3] = [
        ("2001:db8::1/128".parse()?, Ipv6Addr::LOCALHOST),
        ("2001:db8::2/128".parse()?, source.to_ipv6_mapped()),
        ("2001:db8::3/128".parse()?, "2001:db8::20".parse()?),
    ];
    for (prefix, next_hop) in cases {
        speaker.add_routes_v6(&[prefix], next_hop).await?;
    }
    let want: BTreeSet<IpNet> = cases
        .iter()
        .zip(accepted)
        .filter(|(_, ok)| *ok)
        .map(|((prefix, _), _)| IpNet::V6(*prefix))
        .collect();
    tor.wait_until(Family::Ipv6, CONVERGE_TIMEOUT, |rib| {
        want.iter().all(|prefix| rib.contains_key(prefix))
    })
    .await?;
    // The refused ones must not show up late either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rib = tor.routes(Family::Ipv6).await?;
    ensure!(
        rib.keys().copied().collect::<BTreeSet<_>>() == want,
        "{kind}: {rib:?}"
    );
    let global = &rib[&IpNet::V6(cases[2].0)][0];
    ensure!(global.neighbor == IpAddr::V4(source), "{global:?}");
    ensure!(
        global.next_hop == Some(IpAddr::V6(cases[2].1)),
        "{global:?}"
    );
    Ok(())
}

#[tokio::test]
async fn gobgp_ipv6_next_hops() -> Result<()> {
    next_hop_matrix(TorKind::Gobgp, [true, true, true]).await
}

#[tokio::test]
async fn bird_ipv6_next_hops() -> Result<()> {
    next_hop_matrix(TorKind::Bird, [true, false, true]).await
}

#[tokio::test]
async fn frr_ipv6_next_hops() -> Result<()> {
    next_hop_matrix(TorKind::Frr, [false, true, true]).await
}
