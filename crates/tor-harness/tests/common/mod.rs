//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Result;
use herald_tor_harness::{GobgpSpeaker, GobgpSpeakerConfig, Tor, TorKind};
use ipnet::Ipv4Net;

/// GoBGP waits a random 5-10 s before its first connect attempt.
pub const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(25);
/// Bound on a ToR converging after an announcement or withdrawal.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// `count` consecutive /32s from `base`.
pub fn prefixes(base: Ipv4Addr, count: u32) -> Vec<Ipv4Net> {
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::from(u32::from(base) + i);
            Ipv4Net::new(addr, 32).unwrap_or_else(|_| unreachable!("/32 is valid"))
        })
        .collect()
}

/// The next hop a speaker at `source` announces to a ToR of `kind`: its own address,
/// except towards GoBGP 3.10, which turns a 127.x classic NEXT_HOP into a withdraw, so
/// the tests use the TEST-NET-1 twin of the source (127.0.0.20 → 192.0.2.20).
pub fn next_hop_for(kind: TorKind, source: Ipv4Addr) -> Ipv4Addr {
    match kind {
        TorKind::Gobgp => Ipv4Addr::new(192, 0, 2, source.octets()[3]),
        TorKind::Bird | TorKind::Frr => source,
    }
}

/// Starts a GoBGP speaker from `source` towards `tor` and waits until both sides see the
/// session Established.
pub async fn speaker(
    tor: &Tor,
    source: Ipv4Addr,
    adjust: impl FnOnce(&mut GobgpSpeakerConfig),
) -> Result<GobgpSpeaker> {
    let mut config = GobgpSpeakerConfig::new(tor.bgp_port());
    config.source_addr = source;
    config.router_id = source;
    config.ipv6 = tor.config().ipv6;
    adjust(&mut config);
    let speaker = GobgpSpeaker::start(config).await?;
    speaker.wait_established(ESTABLISH_TIMEOUT).await?;
    tor.wait_established(IpAddr::V4(source), Duration::from_secs(5))
        .await?;
    Ok(speaker)
}

pub mod engine;
