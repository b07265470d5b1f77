//! Herald's BGP engine against a real Frr ToR (scenarios in tests/common/engine.rs).

mod common;

use anyhow::Result;
use common::engine;
use herald_tor_harness::TorKind;

const KIND: TorKind = TorKind::Frr;

#[tokio::test]
async fn ecmp_and_withdraw() -> Result<()> {
    engine::ecmp_and_withdraw(KIND).await
}

#[tokio::test]
async fn neighbor_counters() -> Result<()> {
    engine::neighbor_counters(KIND).await
}

#[tokio::test]
async fn ten_thousand_routes() -> Result<()> {
    engine::ten_thousand(KIND).await
}

#[tokio::test]
async fn ipv6_host_route() -> Result<()> {
    engine::ipv6_host_route(KIND).await
}

#[tokio::test]
async fn hold_timer_expiry() -> Result<()> {
    engine::hold_timer_expiry(KIND).await
}

#[tokio::test]
async fn graceful_restart() -> Result<()> {
    engine::graceful_restart(KIND).await
}

#[tokio::test]
async fn session_errors() -> Result<()> {
    engine::session_errors(KIND).await
}

#[tokio::test]
async fn clean_session_start() -> Result<()> {
    engine::clean_session_start(KIND).await
}

#[tokio::test]
async fn classic_ipv4_peer() -> Result<()> {
    engine::classic_ipv4_peer(KIND).await
}

#[tokio::test]
async fn reflected_own_routes_are_quiet() -> Result<()> {
    engine::reflected_own_routes_are_quiet(KIND).await
}
