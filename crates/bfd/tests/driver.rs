//! The driver over real UDP sockets on loopback: two Herald BFD systems on 127.0.0.x
//! (another port than 3784, so a BFD daemon on the host is not disturbed).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use herald_bfd::{Bfd, ControlPacket, PeerSpec, State};

fn spec(peer: &str, local: &str, port: u16) -> PeerSpec {
    let mut s = PeerSpec::single_hop(
        peer.parse().expect("address"),
        local.parse().expect("address"),
        Duration::from_millis(100),
        3,
    );
    s.port = Some(port);
    s
}

fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

#[tokio::test]
async fn two_systems_come_up_and_a_closed_one_is_seen_admin_down() {
    let port = free_port();
    let (a, b) = (Bfd::new(), Bfd::new());
    let sa = a
        .add(spec("127.0.0.52", "127.0.0.51", port))
        .await
        .expect("a");
    let sb = b
        .add(spec("127.0.0.51", "127.0.0.52", port))
        .await
        .expect("b");
    let up = |s: &herald_bfd::SessionStatus| s.state == State::Up;
    sa.wait_for(Duration::from_secs(5), up).await.expect("a up");
    let st = sb.wait_for(Duration::from_secs(5), up).await.expect("b up");
    // 3 × 100 ms once the poll sequence has settled.
    sb.wait_for(Duration::from_secs(3), |s| {
        s.detection_time == Some(Duration::from_millis(300))
    })
    .await
    .expect("negotiated");
    assert_eq!(st.up_count, 1);
    sa.close().await;
    let down = sb
        .wait_for(Duration::from_secs(2), |s| s.state == State::Down)
        .await
        .expect("b down");
    assert_eq!(down.remote_state, State::AdminDown);
}

/// A hand-driven peer that goes Up and then falls silent: the driver's session goes Down
/// with diag 1 after the detection time (3 × 100 ms), not before and not much later.
// Multi-threaded: the hand-driven peer blocks on its socket while the session runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_detected_within_the_detection_time() {
    let port = free_port();
    let b = Bfd::new();
    let sb = b
        .add(spec("127.0.0.53", "127.0.0.54", port))
        .await
        .expect("b");
    let peer = UdpSocket::bind("127.0.0.53:0").expect("bind");
    peer.set_ttl(255).expect("ttl");
    let listen = UdpSocket::bind(("127.0.0.53", port)).expect("bind the peer's BFD port");
    listen
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let dest = SocketAddr::new("127.0.0.54".parse::<IpAddr>().expect("ip"), port);
    let mut p = ControlPacket {
        diag: herald_bfd::Diagnostic::None,
        state: State::Down,
        poll: false,
        final_: false,
        cpi: false,
        demand: false,
        detect_mult: 3,
        my_disc: 77,
        your_disc: 0,
        desired_min_tx: 100_000,
        required_min_rx: 100_000,
        required_min_echo_rx: 0,
    };
    peer.send_to(&p.encode(), dest).expect("send");
    // Its answer names its discriminator.
    let mut buf = [0u8; 64];
    let their = loop {
        let (n, _) = listen.recv_from(&mut buf).expect("the session answers");
        let got = ControlPacket::decode(&buf[..n]).expect("valid packet");
        if got.state == State::Init {
            break got.my_disc;
        }
    };
    p.state = State::Up;
    p.your_disc = their;
    // Talk for a while (every 50 ms), then stop.
    for _ in 0..10 {
        peer.send_to(&p.encode(), dest).expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sb.status().state, State::Up);
    let silent_since = std::time::Instant::now();
    let down = sb
        .wait_for(Duration::from_secs(3), |s| s.state == State::Down)
        .await
        .expect("down");
    let took = silent_since.elapsed();
    assert_eq!(
        down.local_diag,
        herald_bfd::Diagnostic::ControlDetectionTimeExpired
    );
    // The last packet came at most 50 ms before the silence began.
    assert!(took >= Duration::from_millis(240), "{took:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
}

#[tokio::test]
async fn packets_with_a_wrong_ttl_or_garbage_are_discarded() {
    let port = free_port();
    let b = Bfd::new();
    let sb = b
        .add(spec("127.0.0.55", "127.0.0.56", port))
        .await
        .expect("b");
    let raw = UdpSocket::bind("127.0.0.55:0").expect("bind");
    let dest: SocketAddr = SocketAddr::new("127.0.0.56".parse::<IpAddr>().expect("ip"), port);
    let down = ControlPacket {
        diag: herald_bfd::Diagnostic::None,
        state: State::Down,
        poll: false,
        final_: false,
        cpi: false,
        demand: false,
        detect_mult: 3,
        my_disc: 4242,
        your_disc: 0,
        desired_min_tx: 1_000_000,
        required_min_rx: 100_000,
        required_min_echo_rx: 0,
    };
    // Default TTL 64: a router's worth of hops away, refused by GTSM.
    raw.send_to(&down.encode(), dest).expect("send");
    raw.send_to(&[1, 2, 3], dest).expect("send");
    raw.send_to(&[0xff; 24], dest).expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sb.rx_counters().invalid, 3, "{:?}", sb.rx_counters());
    assert_eq!(sb.status().state, State::Down);
    assert_eq!(sb.status().remote_state, State::Down);
    assert_eq!(sb.status().detection_time, None, "nothing was accepted");
    // With TTL 255 the same packet is accepted and moves the session to Init.
    raw.set_ttl(255).expect("ttl");
    raw.send_to(&down.encode(), dest).expect("send");
    sb.wait_for(Duration::from_secs(2), |s| s.state == State::Init)
        .await
        .expect("init");
}
