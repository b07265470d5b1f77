//! Each router starts as a ToR, answers queries, and holds nothing yet.

use std::time::Instant;

use anyhow::Result;
use herald_tor_harness::{Family, Tor, TorConfig, TorKind};

async fn starts_empty(kind: TorKind) -> Result<()> {
    let started = Instant::now();
    let mut config = TorConfig::new(kind);
    config.ipv6 = true;
    let tor = Tor::start(config).await?;
    let ready = started.elapsed();
    assert_eq!(tor.kind(), kind);
    assert_ne!(tor.bgp_port(), 0);
    assert_ne!(tor.bgp_port(), 179);
    assert!(tor.routes(Family::Ipv4).await?.is_empty());
    assert!(tor.routes(Family::Ipv6).await?.is_empty());
    assert!(tor.neighbors().await?.is_empty());
    assert_eq!(tor.route_count(Family::Ipv4).await?, 0);
    assert_eq!(tor.route_count(Family::Ipv6).await?, 0);
    eprintln!("{kind} ToR ready in {ready:?} on port {}", tor.bgp_port());
    tor.stop().await;
    Ok(())
}

#[tokio::test]
async fn gobgp_starts_empty() -> Result<()> {
    starts_empty(TorKind::Gobgp).await
}

#[tokio::test]
async fn bird_starts_empty() -> Result<()> {
    starts_empty(TorKind::Bird).await
}

#[tokio::test]
async fn frr_starts_empty() -> Result<()> {
    starts_empty(TorKind::Frr).await
}

/// Dropping a `Tor` (as a panicking test does) kills the daemon and removes its dir.
#[tokio::test]
async fn drop_kills_the_daemon() -> Result<()> {
    let tor = Tor::start(TorConfig::new(TorKind::Bird)).await?;
    let pid = tor.pid().expect("a running daemon has a pid");
    let dir = tor.dir().to_path_buf();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(tor);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    Ok(())
}

/// A test that panics while holding a `Tor` still kills the daemon (unwinding drops it).
#[tokio::test]
async fn panic_kills_the_daemon() -> Result<()> {
    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await?;
    let pid = tor.pid().expect("a running daemon has a pid");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = tor;
        panic!("a failing assertion");
    }));
    assert!(outcome.is_err());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    Ok(())
}
