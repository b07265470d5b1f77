//! TCP-MD5 on the dynamic neighbor range: BIRD and FRR accept a speaker with the password
//! and never establish with one without it. GoBGP 3.10 cannot do it (see `TorConfig`).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::speaker;
use herald_tor_harness::{GobgpSpeaker, GobgpSpeakerConfig, Tor, TorConfig, TorKind};

const PASSWORD: &str = "herald-md5";

async fn md5_enforced(kind: TorKind) -> Result<()> {
    let mut config = TorConfig::new(kind);
    config.md5_password = Some(PASSWORD.to_owned());
    let tor = Tor::start(config).await?;
    let _good = speaker(&tor, Ipv4Addr::new(127, 0, 0, 20), |c| {
        c.md5_password = Some(PASSWORD.to_owned());
    })
    .await?;

    let mut config = GobgpSpeakerConfig::new(tor.bgp_port());
    config.source_addr = Ipv4Addr::new(127, 0, 0, 21);
    config.router_id = config.source_addr;
    let without = GobgpSpeaker::start(config).await?;
    // GoBGP tries within 5-10 s and then every second.
    let result = without.wait_established(Duration::from_secs(15)).await;
    ensure!(
        result.is_err(),
        "{kind}: a speaker without the password got in"
    );
    let without_addr = std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 21));
    let neighbors = tor.neighbors().await?;
    ensure!(
        neighbors
            .iter()
            .all(|n| n.address != without_addr || !n.established),
        "{neighbors:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bird_enforces_md5() -> Result<()> {
    md5_enforced(TorKind::Bird).await
}

#[tokio::test]
async fn frr_enforces_md5() -> Result<()> {
    md5_enforced(TorKind::Frr).await
}

#[tokio::test]
async fn gobgp_md5_is_refused_with_a_reason() {
    let mut config = TorConfig::new(TorKind::Gobgp);
    config.md5_password = Some(PASSWORD.to_owned());
    let error = Tor::start(config)
        .await
        .expect_err("GoBGP cannot do MD5 on dynamic neighbors");
    assert!(error.to_string().contains("dynamic neighbors"), "{error:#}");
}
