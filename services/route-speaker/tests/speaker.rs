//! The real `herald-route-speaker` binary between a fake IPAM (in process) and a real
//! ToR (GoBGP or FRR from Debian, on loopback).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{FakeRouting, FakeState, NODE_A, NODE_B, PREFIX, ip, snapshot, speaker, speaker_with};
use herald_tor_harness::{Family, Rib, Tor, TorConfig, TorKind};
use ipnet::IpNet;

/// Speaker start + BGP session + first UPDATE on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(30);
const REPORT: Duration = Duration::from_secs(15);

fn prefix() -> IpNet {
    PREFIX
        .parse()
        .unwrap_or_else(|_| unreachable!("PREFIX is a prefix"))
}

/// The neighbors the ToR holds a path for `prefix` from, in order.
fn neighbors_for(rib: &Rib) -> Vec<std::net::IpAddr> {
    let mut n: Vec<_> = rib
        .get(&prefix())
        .map(|paths| paths.iter().map(|p| p.neighbor).collect())
        .unwrap_or_default();
    n.sort();
    n
}

/// The report says the session is Established and announces exactly `prefixes`; with
/// prefixes, also that an UPDATE went out (a report can catch the session between
/// Established and its first UPDATE).
fn announced(
    state: &herald_api::routing::v1::SpeakerState,
    revision: u64,
    prefixes: &[&str],
) -> bool {
    state.applied_revision == revision
        && state.sessions.len() == 1
        && state.sessions.iter().all(|s| {
            s.peer == "tor"
                && s.state == "Established"
                && s.established_since.is_some()
                && s.announced_prefixes == prefixes
                && (prefixes.is_empty() || s.updates_sent >= 1)
        })
}

/// (1) one speaker's route reaches the ToR with the node as next hop; (5) its report says
/// Established with the prefix; (2) a second speaker adds an ECMP path; (3) a snapshot
/// without the route withdraws that node's path.
async fn announce_ecmp_withdraw_and_report(kind: TorKind) -> Result<()> {
    let tor = Tor::start(TorConfig::new(kind)).await?;
    let port = tor.bgp_port();
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state
        .set(snapshot("node-a", 1, NODE_A, port, false, &[PREFIX]));
    fake.state
        .set(snapshot("node-b", 1, NODE_B, port, false, &[PREFIX]));

    let mut a = speaker("node-a", &fake.endpoint());
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE, |rib| {
            neighbors_for(rib) == vec![ip(NODE_A)]
        })
        .await?;
    let path = &rib[&prefix()][0];
    ensure!(path.next_hop == Some(ip(NODE_A)), "{kind}: {path:?}");
    ensure!(path.as_path == vec![common::NODE_ASN], "{kind}: {path:?}");
    ensure!(path.communities == vec![(65000, 100)], "{kind}: {path:?}");

    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 1, &[PREFIX]))
        .await
        .map_err(anyhow::Error::msg)?;

    let mut b = speaker("node-b", &fake.endpoint());
    let rib = tor
        .wait_until(Family::Ipv4, CONVERGE, |rib| {
            neighbors_for(rib) == vec![ip(NODE_A), ip(NODE_B)]
        })
        .await?;
    for path in &rib[&prefix()] {
        ensure!(
            path.next_hop == Some(path.neighbor),
            "{kind}: ECMP paths {:?}",
            rib[&prefix()]
        );
    }
    fake.state
        .wait_report("node-b", REPORT, |r| announced(r, 1, &[PREFIX]))
        .await
        .map_err(anyhow::Error::msg)?;

    fake.state
        .set(snapshot("node-a", 2, NODE_A, port, false, &[]));
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        neighbors_for(rib) == vec![ip(NODE_B)]
    })
    .await?;
    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 2, &[]))
        .await
        .map_err(anyhow::Error::msg)?;

    for (name, child) in [("node-a", &mut a), ("node-b", &mut b)] {
        let status = child.terminate(Duration::from_secs(10));
        ensure!(
            status.is_some_and(|s| s.success()),
            "{name} exit: {status:?}"
        );
    }
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.is_empty())
        .await?;
    tor.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_ecmp_withdraw_and_report_frr() -> Result<()> {
    announce_ecmp_withdraw_and_report(TorKind::Frr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announce_ecmp_withdraw_and_report_gobgp() -> Result<()> {
    announce_ecmp_withdraw_and_report(TorKind::Gobgp).await
}

/// Polls the ToR every 100 ms for `duration`, failing as soon as the node's path is gone.
/// Returns the number of polls.
async fn assert_path_stays(tor: &Tor, duration: Duration, what: &str) -> Result<u32> {
    let deadline = Instant::now() + duration;
    let mut polls = 0;
    while Instant::now() < deadline {
        let rib = tor.routes(Family::Ipv4).await?;
        polls += 1;
        if neighbors_for(&rib) != vec![ip(NODE_A)] {
            bail!("{what}: the path flapped after {polls} polls: {rib:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(polls)
}

/// (4) IPAM dies: the route stays at the ToR (fail-static); IPAM comes back on the same
/// port with the same snapshot: the speaker resubscribes, applies it and sends no UPDATE,
/// and the route never leaves the ToR. (7) SIGTERM: exit 0 within 10 s, route withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipam_restart_is_fail_static_and_sigterm_withdraws() -> Result<()> {
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await?;
    let port = tor.bgp_port();
    let fake = FakeRouting::start(0, FakeState::new());
    let ipam_port = fake.port();
    let endpoint = fake.endpoint();
    let snap = snapshot("node-a", 1, NODE_A, port, false, &[PREFIX]);
    fake.state.set(snap.clone());

    let mut a = speaker("node-a", &endpoint);
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        neighbors_for(rib) == vec![ip(NODE_A)]
    })
    .await?;
    let before = fake
        .state
        .wait_report("node-a", REPORT, |r| announced(r, 1, &[PREFIX]))
        .await
        .map_err(anyhow::Error::msg)?;

    drop(fake);
    let polls = assert_path_stays(&tor, Duration::from_millis(3500), "IPAM down").await?;
    ensure!(a.is_running(), "the speaker exited while IPAM was down");
    eprintln!("IPAM down: path present in all {polls} polls");

    let restarted = FakeRouting::start(ipam_port, FakeState::new());
    restarted.state.set(snap);
    // Poll the ToR while waiting for the speaker to resubscribe and report afresh.
    let deadline = Instant::now() + REPORT;
    let mut reports_at_resubscribe = None;
    let after = loop {
        let rib = tor.routes(Family::Ipv4).await?;
        ensure!(
            neighbors_for(&rib) == vec![ip(NODE_A)],
            "IPAM restart: the path flapped: {rib:?}"
        );
        let reports = restarted.state.reports();
        if reports_at_resubscribe.is_none() && restarted.state.watch_calls("node-a") >= 1 {
            reports_at_resubscribe = Some(reports.len());
        }
        if let Some(n) = reports_at_resubscribe
            && let Some(r) = reports[n..].iter().find(|r| announced(r, 1, &[PREFIX]))
        {
            break r.clone();
        }
        ensure!(
            Instant::now() < deadline,
            "no resubscription and report to the restarted IPAM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_path_stays(&tor, Duration::from_secs(1), "after the IPAM restart").await?;
    // Same session, nothing re-sent: no withdrawal and no re-announcement happened.
    ensure!(
        after.sessions[0].updates_sent == before.sessions[0].updates_sent
            && after.sessions[0].established_since == before.sessions[0].established_since,
        "the session changed across the IPAM restart: before {before:?}, after {after:?}"
    );

    let started = Instant::now();
    let status = a.terminate(Duration::from_secs(10));
    let took = started.elapsed();
    ensure!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    ensure!(took < Duration::from_secs(10), "shutdown took {took:?}");
    tor.wait_until(Family::Ipv4, Duration::from_secs(5), |rib| rib.is_empty())
        .await?;
    eprintln!("SIGTERM: exited in {took:?}, route withdrawn");
    tor.stop().await;
    Ok(())
}

/// With graceful restart and `shutdown_intent = restart` the speaker says so on SIGTERM
/// (RFC 8538: Cease without Hard Reset) and the ToR keeps the route (stale) for the
/// restart time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_graceful_restart_keeps_the_route() -> Result<()> {
    let mut config = TorConfig::new(TorKind::Frr);
    config.graceful_restart = Some(60);
    let tor = Tor::start(config).await?;
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state.set(snapshot(
        "node-a",
        1,
        NODE_A,
        tor.bgp_port(),
        true,
        &[PREFIX],
    ));
    let mut a = speaker_with(
        "node-a",
        &fake.endpoint(),
        &[("HERALD_SHUTDOWN_INTENT", "restart")],
    );
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        neighbors_for(rib) == vec![ip(NODE_A)]
    })
    .await?;
    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 1, &[PREFIX]))
        .await
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let status = a.terminate(Duration::from_secs(10));
    ensure!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    ensure!(started.elapsed() < Duration::from_secs(10));
    assert_path_stays(&tor, Duration::from_secs(3), "graceful restart").await?;
    let rib = tor.routes(Family::Ipv4).await?;
    ensure!(
        rib[&prefix()].iter().all(|p| p.stale),
        "the kept path should be stale: {rib:?}"
    );
    tor.stop().await;
    Ok(())
}

/// With graceful restart and the default `shutdown_intent = drain`, SIGTERM drains (2 s),
/// withdraws and closes with Hard Reset: the ToR has no path left, not even a stale one.
/// (Before the engine waited for its writers on shutdown, the process exited with the
/// withdrawal unsent and FRR kept the path as stale.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_with_graceful_restart_leaves_no_path() -> Result<()> {
    let mut config = TorConfig::new(TorKind::Frr);
    config.graceful_restart = Some(60);
    let tor = Tor::start(config).await?;
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state.set(snapshot(
        "node-a",
        1,
        NODE_A,
        tor.bgp_port(),
        true,
        &[PREFIX],
    ));
    let mut a = speaker_with(
        "node-a",
        &fake.endpoint(),
        &[("HERALD_SHUTDOWN_DRAIN", "2s")],
    );
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        neighbors_for(rib) == vec![ip(NODE_A)]
    })
    .await?;
    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 1, &[PREFIX]))
        .await
        .map_err(anyhow::Error::msg)?;
    let status = a.terminate(Duration::from_secs(10));
    ensure!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    // Right after the exit: a path still there (even stale) means the withdrawal did not
    // reach the ToR.
    tor.wait_until(Family::Ipv4, Duration::from_secs(1), |rib| rib.is_empty())
        .await?;
    tor.stop().await;
    Ok(())
}

/// (6) A node IPAM does not know: NOT_FOUND, retried with backoff (a handful of calls in
/// 3 s, not a tight loop), the speaker keeps running, and picks the node up once it is
/// registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_is_retried_with_backoff() -> Result<()> {
    let fake = FakeRouting::start(0, FakeState::new());
    let mut ghost = speaker("ghost", &fake.endpoint());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = fake.state.watch_calls("ghost");
    ensure!(
        (2..50).contains(&calls),
        "{calls} WatchNodeRoutes calls in 3 s"
    );
    ensure!(ghost.is_running(), "the speaker exited on NOT_FOUND");
    eprintln!("unknown node: {calls} calls in 3 s");

    // Registered later: picked up on the next retry. The peer's port has no listener, so
    // the session stays down and the report says so.
    let closed = herald_test_support::free_port();
    let mut snap = snapshot(
        "ghost",
        7,
        std::net::Ipv4Addr::new(127, 0, 0, 12),
        closed,
        false,
        &[PREFIX],
    );
    snap.peers[0]
        .routes
        .push(common::route("not-a-prefix", NODE_A));
    fake.state.set(snap);
    let report = fake
        .state
        .wait_report("ghost", REPORT, |r| r.applied_revision == 7)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(report.sessions.len() == 1, "{report:?}");
    ensure!(report.sessions[0].state != "Established", "{report:?}");
    ensure!(
        report.sessions[0].announced_prefixes.is_empty(),
        "{report:?}"
    );
    let status = ghost.terminate(Duration::from_secs(10));
    ensure!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    Ok(())
}

/// A delta as IPAM sends it: `snapshot`'s session, with only `set` as routes and
/// `withdrawn`, moving from revision `from` to `revision`.
fn delta(
    from: u64,
    revision: u64,
    port: u16,
    set: &[&str],
    withdrawn: &[&str],
) -> herald_api::routing::v1::NodeRoutes {
    let mut m = snapshot("node-a", revision, NODE_A, port, false, set);
    m.from_revision = from;
    m.peers[0].withdrawn = withdrawn.iter().map(ToString::to_string).collect();
    m
}

/// The speaker applies deltas to what it holds (the ToR gets the added route and loses the
/// withdrawn one), and a delta that does not follow its revision is not applied: it
/// subscribes again, and the snapshot it then gets puts the ToR right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_reach_the_tor_and_a_gap_resubscribes() -> Result<()> {
    const B: &str = "172.16.0.242/32";
    const C: &str = "172.16.0.243/32";
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await?;
    let port = tor.bgp_port();
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state
        .set(snapshot("node-a", 1, NODE_A, port, false, &[PREFIX]));
    let mut a = speaker("node-a", &fake.endpoint());
    let has = |want: &'static [&'static str]| {
        move |rib: &Rib| {
            let mut got: Vec<String> = rib.keys().map(ToString::to_string).collect();
            got.sort();
            got == want
        }
    };
    tor.wait_until(Family::Ipv4, CONVERGE, has(&[PREFIX]))
        .await?;

    fake.state.set(delta(1, 2, port, &[B], &[]));
    tor.wait_until(Family::Ipv4, CONVERGE, has(&[PREFIX, B]))
        .await?;
    fake.state.set(delta(2, 3, port, &[], &[PREFIX]));
    tor.wait_until(Family::Ipv4, CONVERGE, has(&[B])).await?;
    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 3, &[B]))
        .await
        .map_err(anyhow::Error::msg)?;
    let calls = fake.state.watch_calls("node-a");
    ensure!(calls == 1, "{calls} subscriptions before any gap");

    // Revisions 4 to 6 never arrive: the speaker subscribes again rather than apply it.
    fake.state.set(delta(7, 8, port, &[C], &[]));
    let deadline = Instant::now() + CONVERGE;
    while fake.state.watch_calls("node-a") < 2 {
        ensure!(Instant::now() < deadline, "no new subscription after a gap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_path_count(&tor, &[B]).await?;
    fake.state
        .set(snapshot("node-a", 9, NODE_A, port, false, &[PREFIX, C]));
    tor.wait_until(Family::Ipv4, CONVERGE, has(&[PREFIX, C]))
        .await?;
    fake.state
        .wait_report("node-a", REPORT, |r| announced(r, 9, &[PREFIX, C]))
        .await
        .map_err(anyhow::Error::msg)?;
    let status = a.terminate(Duration::from_secs(10));
    ensure!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    tor.stop().await;
    Ok(())
}

/// The ToR holds exactly `want` (a gap must not have changed what is announced).
async fn assert_path_count(tor: &Tor, want: &[&str]) -> Result<()> {
    let rib = tor.routes(Family::Ipv4).await?;
    let mut got: Vec<String> = rib.keys().map(ToString::to_string).collect();
    got.sort();
    ensure!(got == want, "the ToR holds {got:?}, not {want:?}");
    Ok(())
}
