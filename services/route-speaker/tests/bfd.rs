//! BFD between the real `herald-route-speaker` and a real ToR (FRR's bfdd single-hop,
//! BIRD's `protocol bfd` multihop), on loopback. The BGP hold time is 9 s, so anything
//! noticed within a second or two was noticed by BFD.
//!
//! Both directions: a frozen speaker (SIGSTOP) loses its path at the ToR within the
//! detection time while another speaker's session is untouched; a frozen ToR is noticed
//! by the speaker, which closes its BGP session.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{FakeRouting, FakeState, PREFIX, ip, snapshot, speaker};
use herald_api::routing::v1 as pb;
use herald_tor_harness::{Family, Tor, TorBfd, TorConfig, TorKind};
use ipnet::IpNet;

const CONVERGE: Duration = Duration::from_secs(40);
/// 300 ms × 3 is 900 ms after the last packet; the ToR's (or speaker's) reaction and one
/// poll of the ToR's RIB (vtysh/birdc take up to a few hundred ms on a loaded machine)
/// come on top. Hold-time detection would take 9 s.
const DETECTED_WITHIN: Duration = Duration::from_millis(2500);

fn prefix() -> IpNet {
    PREFIX
        .parse()
        .unwrap_or_else(|_| unreachable!("PREFIX is a prefix"))
}

fn with_bfd(mut s: pb::NodeRoutes, multihop: bool) -> pb::NodeRoutes {
    for p in &mut s.peers {
        if let Some(peer) = &mut p.peer {
            peer.bfd = Some(pb::Bfd {
                multihop,
                ..pb::Bfd::default()
            });
        }
    }
    s
}

async fn neighbors(tor: &Tor) -> Result<Vec<std::net::IpAddr>> {
    let rib = tor.routes_for(Family::Ipv4, &[prefix()]).await?;
    let mut n: Vec<_> = rib
        .get(&prefix())
        .map(|paths| paths.iter().map(|p| p.neighbor).collect())
        .unwrap_or_default();
    n.sort();
    Ok(n)
}

async fn wait_bfd_up(tor: &Tor, nodes: &[Ipv4Addr]) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let peers = tor.bfd_peers().await?;
        let up = |n: &Ipv4Addr| {
            peers
                .iter()
                .any(|(a, s)| *a == ip(*n) && s.eq_ignore_ascii_case("up"))
        };
        if nodes.iter().all(up) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("BFD not Up at the ToR for {nodes:?}: {peers:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Freezes speaker A: the ToR drops A's path within the detection time; B's path stays
/// all along and B's BFD session stays Up.
async fn frozen_speaker_loses_its_path_quickly(
    kind: TorKind,
    a: Ipv4Addr,
    b: Ipv4Addr,
) -> Result<()> {
    let multihop = kind == TorKind::Bird;
    let mut config = TorConfig::new(kind);
    config.bfd = Some(TorBfd::default());
    let tor = Tor::start(config).await?;
    let port = tor.bgp_port();
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state.set(with_bfd(
        snapshot("node-a", 1, a, port, false, &[PREFIX]),
        multihop,
    ));
    fake.state.set(with_bfd(
        snapshot("node-b", 1, b, port, false, &[PREFIX]),
        multihop,
    ));
    let speaker_a = speaker("node-a", &fake.endpoint());
    let _speaker_b = speaker("node-b", &fake.endpoint());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| {
        rib.get(&prefix()).map(Vec::len) == Some(2)
    })
    .await?;
    wait_bfd_up(&tor, &[a, b]).await?;
    // Let the Poll Sequence to 300 ms finish on both sides.
    tokio::time::sleep(Duration::from_secs(2)).await;

    speaker_a.freeze(true);
    let frozen = Instant::now();
    let result = async {
        loop {
            let n = neighbors(&tor).await?;
            ensure!(n.contains(&ip(b)), "B's path vanished too: {n:?}");
            if n == vec![ip(b)] {
                return Ok(frozen.elapsed());
            }
            if frozen.elapsed() > Duration::from_secs(8) {
                bail!(
                    "A's path still at the ToR after {:?}: {n:?}",
                    frozen.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    speaker_a.freeze(false);
    let took = result?;
    eprintln!("{kind}: frozen speaker's path gone from the ToR after {took:?} (BFD 300 ms × 3)");
    ensure!(took < DETECTED_WITHIN, "{kind}: took {took:?}");
    wait_bfd_up(&tor, &[b]).await?;
    Ok(())
}

/// Freezes the ToR: the speaker's BFD session goes Down and it closes the BGP session
/// (its report leaves Established) well before the 9 s hold time.
async fn frozen_tor_is_noticed_by_the_speaker(kind: TorKind, a: Ipv4Addr) -> Result<()> {
    let multihop = kind == TorKind::Bird;
    let mut config = TorConfig::new(kind);
    config.bfd = Some(TorBfd::default());
    let tor = Tor::start(config).await?;
    let port = tor.bgp_port();
    let fake = FakeRouting::start(0, FakeState::new());
    fake.state.set(with_bfd(
        snapshot("node-a", 1, a, port, false, &[PREFIX]),
        multihop,
    ));
    let _speaker_a = speaker("node-a", &fake.endpoint());
    tor.wait_until(Family::Ipv4, CONVERGE, |rib| rib.contains_key(&prefix()))
        .await?;
    wait_bfd_up(&tor, &[a]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let established = |r: &pb::SpeakerState| {
        r.sessions
            .iter()
            .any(|s| s.peer == "tor" && s.state == "Established")
    };
    fake.state
        .wait_report("node-a", Duration::from_secs(10), established)
        .await
        .map_err(anyhow::Error::msg)?;
    // Only reports sent after the freeze count.
    let seen = fake.state.reports().len();
    tor.freeze(true);
    let frozen = Instant::now();
    let result = async {
        loop {
            let reports = fake.state.reports();
            if reports[seen..]
                .iter()
                .any(|r| r.node == "node-a" && !established(r))
            {
                return Ok(frozen.elapsed());
            }
            if frozen.elapsed() > Duration::from_secs(8) {
                bail!(
                    "the speaker still reports Established after {:?}",
                    frozen.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    .await;
    tor.freeze(false);
    let took = result?;
    eprintln!(
        "{kind}: speaker closed its session to the frozen ToR after {took:?} (BFD 300 ms × 3)"
    );
    ensure!(took < DETECTED_WITHIN, "{kind}: took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frr_drops_a_frozen_speakers_path_within_the_bfd_detection_time() -> Result<()> {
    frozen_speaker_loses_its_path_quickly(
        TorKind::Frr,
        Ipv4Addr::new(127, 0, 0, 30),
        Ipv4Addr::new(127, 0, 0, 31),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bird_drops_a_frozen_speakers_path_within_the_bfd_detection_time() -> Result<()> {
    frozen_speaker_loses_its_path_quickly(
        TorKind::Bird,
        Ipv4Addr::new(127, 0, 0, 32),
        Ipv4Addr::new(127, 0, 0, 33),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaker_closes_its_session_to_a_frozen_frr_within_the_bfd_detection_time() -> Result<()> {
    frozen_tor_is_noticed_by_the_speaker(TorKind::Frr, Ipv4Addr::new(127, 0, 0, 34)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaker_closes_its_session_to_a_frozen_bird_within_the_bfd_detection_time() -> Result<()> {
    frozen_tor_is_noticed_by_the_speaker(TorKind::Bird, Ipv4Addr::new(127, 0, 0, 35)).await
}
