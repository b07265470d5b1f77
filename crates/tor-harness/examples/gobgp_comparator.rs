//! The benchmark comparator on its own: a GoBGP speaker announces and withdraws N /32s to
//! a GoBGP ToR and this prints how long until the ToR holds (and then lost) all of them.
//!
//! `cargo run --release -p herald-tor-harness --example gobgp_comparator -- 10000 100000`

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herald_tor_harness::{Family, GobgpSpeaker, GobgpSpeakerConfig, Tor, TorConfig, TorKind};
use ipnet::Ipv4Net;

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .map(|arg| arg.parse().context("sizes are route counts"))
        .collect::<Result<_>>()?;
    let sizes = if sizes.is_empty() {
        vec![10_000]
    } else {
        sizes
    };
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12}",
        "routes", "inject", "at ToR", "prefixes/s", "withdrawn"
    );
    for n in sizes {
        let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await?;
        let speaker = GobgpSpeaker::start(GobgpSpeakerConfig::new(tor.bgp_port())).await?;
        speaker.wait_established(Duration::from_secs(25)).await?;
        let prefixes: Vec<Ipv4Net> = (0..n)
            .map(|i| Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32))
            .collect::<Result<_, _>>()?;
        let timeout = Duration::from_secs(120);
        let started = Instant::now();
        speaker
            .add_routes(&prefixes, Ipv4Addr::new(192, 0, 2, 20))
            .await?;
        let injected = started.elapsed();
        tor.wait_for_count(Family::Ipv4, timeout, |count| count == n as usize)
            .await?;
        let arrived = started.elapsed();
        let started = Instant::now();
        speaker.delete_routes(&prefixes).await?;
        tor.wait_for_count(Family::Ipv4, timeout, |count| count == 0)
            .await?;
        let withdrawn = started.elapsed();
        println!(
            "{n:>8} {:>12?} {:>12?} {:>12.0} {:>12?}",
            injected,
            arrived,
            f64::from(n) / arrived.as_secs_f64(),
            withdrawn
        );
        speaker.stop().await;
        tor.stop().await;
    }
    Ok(())
}
