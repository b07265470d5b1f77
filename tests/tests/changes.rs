//! Changes and shutdowns without outages, against real ToRs: a policy change that needs
//! new sessions rolls across the nodes (the lab prefix never has zero paths at FRR, BIRD
//! or GoBGP), SIGTERM drains with GRACEFUL_SHUTDOWN before it withdraws (FRR, BIRD), and
//! RFC 8538 says on the wire whether FRR keeps the routes.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::routing::v1 as pb;
use herald_e2e::{CONVERGE, IpamLab, LAB_PREFIX, allocate, expect_paths, node};
use herald_test_support::{ChildProcess, workspace_binary};
use herald_tor_harness::{Family, Tor, TorConfig, TorKind, TorPath};

/// A route speaker for node `name` with extra flags, its log (stderr) in `log`.
fn speaker_logged(name: &str, ipam: &str, extra: &[&str], log: &Path) -> ChildProcess {
    let mut command = Command::new(workspace_binary("herald-route-speaker"));
    command
        .args([
            "--node-name",
            name,
            "--ipam-endpoint",
            ipam,
            "--report-interval",
            "1s",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap());
    ChildProcess::spawn(&format!("herald-route-speaker {name}"), command)
}

fn log_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// When the speaker stopped its session for a reset, and when the new one was
/// Established: the timestamps of those log lines, once both are there.
fn reset_and_back(log: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let ts = |l: &str| l.split_whitespace().next().unwrap_or_default().to_string();
    let stop = lines
        .iter()
        .position(|l| l.contains("stopping BGP session"))?;
    let back = lines[stop..]
        .iter()
        .find(|l| l.contains("to=Established"))?;
    Some((ts(lines[stop]), ts(back)))
}

/// The ToR's usable (not stale) paths for the lab prefix.
async fn lab_paths(tor: &Tor) -> Vec<TorPath> {
    let prefix: ipnet::IpNet = LAB_PREFIX.parse().unwrap();
    tor.routes_for(Family::Ipv4, &[prefix])
        .await
        .unwrap()
        .remove(&prefix)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.stale)
        .collect()
}

/// IPAM on Postgres with the lab pool, `nodes` (all peering) and the lab Service.
async fn lab(addresses: &[&str], policy: pb::BgpPolicy) -> IpamLab {
    let mut lab = IpamLab::start().await;
    lab.routing.set_bgp_policy(policy).await.unwrap();
    for (i, address) in addresses.iter().enumerate() {
        lab.routing
            .upsert_node(node(
                &format!("n{i}"),
                address,
                &[("bgp-peer", "true")],
                true,
            ))
            .await
            .unwrap();
    }
    lab.alloc
        .allocate(allocate("default", "lb-nginx-service", "lb"))
        .await
        .unwrap();
    lab
}

fn log_path(lab: &IpamLab, name: &str) -> PathBuf {
    lab.dir.path().join(format!("{name}.log"))
}

/// The policy every node peers under.
fn policy(tor: &Tor, hold_time: u32, graceful_restart: bool) -> pb::BgpPolicy {
    let mut p = herald_e2e::tor_policy(tor, hold_time);
    p.peers[0].graceful_restart = graceful_restart;
    p
}

/// A hold-time change on four nodes: every node's session is reset (each speaker logs
/// it), one node at a time, and a monitor polling the ToR's RIB as fast as the router
/// answers never sees the lab prefix without a path.
async fn rolling_hold_time_change(kind: TorKind) {
    let tor = Tor::start(TorConfig::new(kind)).await.unwrap();
    let addresses = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let mut lab = lab(&addresses, policy(&tor, 9, false)).await;
    let logs: Vec<PathBuf> = (0..4).map(|i| log_path(&lab, &format!("n{i}"))).collect();
    let _speakers: Vec<_> = (0..4)
        .map(|i| {
            speaker_logged(
                &format!("n{i}"),
                &lab.ipam.endpoint(),
                &["--shutdown-drain", "0s"],
                &logs[i],
            )
        })
        .collect();
    expect_paths(&tor, LAB_PREFIX, &addresses).await;

    // Every session Established with its routes: the rollout starts from a settled lab.
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.routing
        .set_bgp_policy(policy(&tor, 6, false))
        .await
        .unwrap();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut samples: Vec<(Duration, usize)> = Vec::new();
    let all_reset = |logs: &[PathBuf]| logs.iter().all(|l| reset_and_back(l).is_some());
    // Bounded: one poll per router answer (5-300 ms) until every node has reset and is
    // back, or 120 s.
    loop {
        let paths = lab_paths(&tor).await;
        samples.push((started.elapsed(), paths.len()));
        if paths.is_empty() {
            panic!(
                "{kind}: the lab prefix had no path at the ToR {:?} into the rollout; \
                 samples (time, paths): {samples:?}",
                started.elapsed()
            );
        }
        if all_reset(&logs) && paths.len() == addresses.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kind}: not every node reset and came back within 120 s; resets per node: {:?}",
            logs.iter()
                .map(|l| log_lines(l, "stopping BGP session"))
                .collect::<Vec<_>>()
        );
    }
    eprintln!(
        "{kind}: rollout over 4 nodes took {:?}, {} samples, fewest paths seen {}",
        started.elapsed(),
        samples.len(),
        samples.iter().map(|(_, n)| *n).min().unwrap_or(0)
    );
    // The sessions really were reset (not kept): each node logged one stop and a second
    // Established.
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(
            log_lines(log, "stopping BGP session"),
            1,
            "{kind}: node n{i} reset its session once"
        );
        assert!(
            log_lines(log, "waits for this node's turn") >= 1 || i == 0,
            "{kind}: node n{i} never waited for its turn"
        );
    }
    // One node at a time: sorted by when they reset, each node's reset comes after the
    // previous node's session was Established again (log timestamps, RFC 3339 UTC, sort
    // as text).
    let mut resets: Vec<(String, String)> = logs.iter().filter_map(|l| reset_and_back(l)).collect();
    resets.sort();
    for pair in resets.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "{kind}: a reset at {} began before the previous node was back at {}: {resets:?}",
            pair[1].0,
            pair[0].1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_time_change_rolls_without_an_outage_at_frr() {
    rolling_hold_time_change(TorKind::Frr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_time_change_rolls_without_an_outage_at_bird() {
    rolling_hold_time_change(TorKind::Bird).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_time_change_rolls_without_an_outage_at_gobgp() {
    rolling_hold_time_change(TorKind::Gobgp).await;
}

/// SIGTERM on one of two nodes: its path stays at the ToR with GRACEFUL_SHUTDOWN and a
/// longer AS path, the ToR's best path moves to the other node, and only then (after the
/// drain time) does the path go.
async fn drain_moves_the_best_path_first(kind: TorKind) {
    let tor = Tor::start(TorConfig::new(kind)).await.unwrap();
    let addresses = ["127.0.0.30", "127.0.0.31"];
    let lab = lab(&addresses, policy(&tor, 9, false)).await;
    let draining: IpAddr = addresses[0].parse().unwrap();
    let mut speakers: Vec<_> = (0..2)
        .map(|i| {
            speaker_logged(
                &format!("n{i}"),
                &lab.ipam.endpoint(),
                &["--shutdown-drain", "4s", "--shutdown-prepend", "3"],
                &log_path(&lab, &format!("n{i}")),
            )
        })
        .collect();
    expect_paths(&tor, LAB_PREFIX, &addresses).await;

    let mut first = speakers.remove(0);
    let stop = tokio::task::spawn_blocking(move || first.terminate(Duration::from_secs(20)));
    let started = Instant::now();
    let mut moved_at: Option<Duration> = None;
    let mut gone_at: Option<Duration> = None;
    let mut seen: Vec<Vec<TorPath>> = Vec::new();
    while started.elapsed() < CONVERGE {
        let paths = lab_paths(&tor).await;
        if seen.last() != Some(&paths) {
            seen.push(paths.clone());
        }
        let ours = paths.iter().find(|p| p.neighbor == draining);
        let other = paths.iter().find(|p| p.neighbor != draining);
        match ours {
            // The ToR saw the drain: BIRD shows the GRACEFUL_SHUTDOWN community; FRR acts
            // on it (LOCAL_PREF 0) and does not list it.
            Some(p)
                if (p.communities.contains(&(65535, 0)) || p.local_pref == Some(0))
                    && !p.selected
                    && other.is_some_and(|o| o.selected) =>
            {
                assert_eq!(
                    p.as_path,
                    [65010, 65010, 65010, 65010],
                    "{kind}: drained path prepended 3 times"
                );
                moved_at.get_or_insert(started.elapsed());
            }
            Some(_) => {}
            None => {
                gone_at = Some(started.elapsed());
                break;
            }
        }
        assert!(
            other.is_some(),
            "{kind}: the other node's path vanished during the drain"
        );
    }
    let status = stop.await.unwrap().expect("an exit status");
    assert!(status.success(), "{kind}: speaker exit {status:?}");
    let moved = moved_at.unwrap_or_else(|| {
        panic!(
            "{kind}: the best path never moved away from the draining node before it left; \
             the ToR's paths, each change: {seen:#?}"
        )
    });
    let gone = gone_at.expect("the draining node's path never went");
    assert!(
        gone >= Duration::from_secs(3),
        "{kind}: the path went {gone:?} after SIGTERM, before the 4 s drain"
    );
    assert!(moved < gone);
    eprintln!("{kind}: best path moved {moved:?} after SIGTERM, path gone after {gone:?}");
    expect_paths(&tor, LAB_PREFIX, &addresses[1..]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_before_withdrawing_at_frr() {
    drain_moves_the_best_path_first(TorKind::Frr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_before_withdrawing_at_bird() {
    drain_moves_the_best_path_first(TorKind::Bird).await;
}

/// Graceful restart with FRR (which implements RFC 8538): a speaker stopped with intent
/// `restart` says Cease 6/2 without Hard Reset, and FRR keeps its path as stale (it would
/// drop it on that Cease without the N bit negotiated); one stopped with intent `drain`
/// withdraws and says Hard Reset, and FRR drops the path at once. (The Hard Reset bytes
/// are checked in the engine's unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rfc8538_restart_keeps_and_drain_drops_the_routes_at_frr() {
    let mut config = TorConfig::new(TorKind::Frr);
    config.graceful_restart = Some(120);
    let tor = Tor::start(config).await.unwrap();
    let addresses = ["127.0.0.40", "127.0.0.41"];
    let lab = lab(&addresses, policy(&tor, 9, true)).await;
    let restarting = speaker_logged(
        "n0",
        &lab.ipam.endpoint(),
        &["--shutdown-intent", "restart"],
        &log_path(&lab, "n0"),
    );
    let draining = speaker_logged(
        "n1",
        &lab.ipam.endpoint(),
        &["--shutdown-intent", "drain", "--shutdown-drain", "0s"],
        &log_path(&lab, "n1"),
    );
    expect_paths(&tor, LAB_PREFIX, &addresses).await;

    for mut p in [restarting, draining] {
        let status = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("an exit status");
        assert!(status.success(), "{status:?}");
    }
    // Give FRR a moment to act on both NOTIFICATIONs, then look: n0's path kept as
    // stale, n1's gone.
    let prefix: ipnet::IpNet = LAB_PREFIX.parse().unwrap();
    let deadline = Instant::now() + CONVERGE;
    let paths = loop {
        let paths = tor
            .routes_for(Family::Ipv4, &[prefix])
            .await
            .unwrap()
            .remove(&prefix)
            .unwrap_or_default();
        let drained_gone = !paths.iter().any(|p| p.neighbor.to_string() == addresses[1]);
        if drained_gone || Instant::now() > deadline {
            break paths;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !paths.iter().any(|p| p.neighbor.to_string() == addresses[1]),
        "Hard Reset: FRR must drop the drained node's path, has {paths:?}"
    );
    // Still there a few seconds later: kept for the restart time, not by accident.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paths = tor
        .routes_for(Family::Ipv4, &[prefix])
        .await
        .unwrap()
        .remove(&prefix)
        .unwrap_or_default();
    let kept: Vec<_> = paths
        .iter()
        .filter(|p| p.neighbor.to_string() == addresses[0])
        .collect();
    assert!(
        kept.len() == 1 && kept[0].stale,
        "RFC 8538: FRR must keep the restarting node's path as stale, has {paths:?}"
    );
}
