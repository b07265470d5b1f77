//! Driver tests on 127.0.0.1: two of our own drivers peering, and a hostile
//! fake peer built from a plain `TcpListener`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::rib::RouteAttributes;
use crate::wire::{Capability, Open, OtherCapability, decode_message, encode_message, frame};
use ipnet::IpNet;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

fn lo() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn routes(n: u32) -> Routes {
    (0..n)
        .map(|i| {
            let p = IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap());
            (p, RouteAttributes::default().into())
        })
        .collect()
}

/// A passive driver listening on a free port and an active one connecting
/// to it exchange routes, withdraw them, and shut down cleanly.
#[tokio::test]
async fn two_drivers_peer_over_loopback() {
    let mut passive = PeerConfig::new(lo(), 65010, 65001, Ipv4Addr::new(10, 0, 0, 1));
    passive.passive = true;
    passive.listen = Some("127.0.0.1:0".parse().unwrap());
    passive.hold_time = 9;
    passive.families = vec![Family::Ipv4Unicast, Family::Ipv6Unicast];
    let server = PeerHandle::spawn(passive).await.unwrap();
    let port = server.listen_addr().unwrap().port();

    let mut active = PeerConfig::new(lo(), 65001, 65010, Ipv4Addr::new(10, 0, 0, 2));
    active.peer_port = port;
    active.source_addr = Some(lo());
    active.graceful_restart = Some(GracefulRestartConfig::default());
    active.families = vec![Family::Ipv4Unicast, Family::Ipv6Unicast];
    let client = PeerHandle::spawn(active).await.unwrap();

    let st = client
        .wait_established(T)
        .await
        .expect("client established");
    let n = st.negotiated.unwrap();
    assert_eq!(n.hold_time, 9);
    assert_eq!(n.keepalive, 3);
    assert!(n.four_octet_asn && n.route_refresh && n.extended_message);
    assert_eq!(n.families, vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert_eq!(n.ipv4_nlri, wire::Ipv4NlriEncoding::MpReach);
    server
        .wait_established(T)
        .await
        .expect("server established");

    let mut set = routes(2000);
    set.insert(
        "2001:db8::1/128".parse().unwrap(),
        RouteAttributes::default().into(),
    );
    client.set_desired(set);
    let st = server
        .wait_for(T, |s| s.prefixes_received == 2001)
        .await
        .expect("server receives all routes");
    assert_eq!(st.prefixes_received, 2001);
    let cs = client.status();
    assert_eq!(cs.prefixes_sent, 2001);
    // 2000 /32s with equal attributes + one IPv6: far fewer than N/500.
    assert!(cs.updates_sent <= 6, "{} updates", cs.updates_sent);

    client.set_desired(routes(10));
    server
        .wait_for(T, |s| s.prefixes_received == 10)
        .await
        .expect("withdrawals arrive");

    client
        .shutdown(ShutdownMode::Withdraw {
            message: "test over".into(),
        })
        .await;
    let st = server
        .wait_for(T, |s| s.state != State::Established)
        .await
        .expect("server sees the shutdown");
    let n = st.last_notification_received.expect("got a NOTIFICATION");
    assert_eq!((n.code, n.subcode), (6, 2));
    assert_eq!(n.shutdown_message().as_deref(), Some("test over"));
    server.shutdown(ShutdownMode::Graceful).await;
}

/// A closed port gives a clear error and backs off instead of spinning.
#[tokio::test]
async fn closed_port_reports_error_and_backs_off() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let mut cfg = PeerConfig::new(lo(), 65001, 65010, Ipv4Addr::new(10, 0, 0, 2));
    cfg.peer_port = port;
    cfg.connect_retry = Duration::from_millis(100);
    cfg.connect_retry_max = Duration::from_millis(400);
    let h = PeerHandle::spawn(cfg).await.unwrap();
    let st = h
        .wait_for(T, |s| s.last_error.is_some())
        .await
        .expect("an error is reported");
    assert!(st.last_error.unwrap().contains("connect failed"));
    // Over 1.5 s with a 100..400 ms backoff there are only a handful of
    // state changes, not thousands.
    let mut rx = h.watch_status();
    let mut changes = 0;
    let end = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::timeout_at(end, rx.changed()).await.is_ok() {
        changes += 1;
        assert!(changes < 100, "busy loop");
    }
    assert_ne!(h.status().state, State::Established);
    h.shutdown(ShutdownMode::Graceful).await;
}

// ---- hostile peer ----------------------------------------------------------

/// A fake peer: accepts one connection, reads our OPEN, then runs `script`.
async fn fake_peer_session(listener: &TcpListener) -> (TcpStream, Open) {
    let (mut s, _) = tokio::time::timeout(T, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let msg = read_message(&mut s).await.expect("our OPEN");
    let Message::Open(open) = msg else {
        panic!("expected OPEN, got {msg:?}")
    };
    (s, open)
}

async fn read_message(s: &mut TcpStream) -> Option<Message> {
    let mut buf = Vec::new();
    let ctx = WireContext::default();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok(Some(len)) = frame(&buf, &ctx) {
            return decode_message(&buf[..len], &ctx).ok().map(|d| d.message);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads messages until a NOTIFICATION (skipping KEEPALIVE/UPDATE).
async fn read_notification(s: &mut TcpStream) -> Option<Notification> {
    for _ in 0..100 {
        match read_message(s).await? {
            Message::Notification(n) => return Some(n),
            _ => continue,
        }
    }
    None
}

fn peer_open(asn: u32, caps: Vec<Capability>) -> Vec<u8> {
    let mut c = vec![
        Capability::MultiProtocol(Family::Ipv4Unicast),
        Capability::RouteRefresh,
    ];
    c.extend(caps);
    let open = Open::new(asn, 90, Ipv4Addr::new(192, 0, 2, 1), c);
    encode_message(&Message::Open(open), &WireContext::default()).unwrap()
}

fn keepalive() -> Vec<u8> {
    encode_message(&Message::Keepalive, &WireContext::default()).unwrap()
}

async fn spawn_against(listener: &TcpListener) -> PeerHandle {
    let mut cfg = PeerConfig::new(lo(), 65001, 65010, Ipv4Addr::new(10, 0, 0, 2));
    cfg.peer_port = listener.local_addr().unwrap().port();
    cfg.connect_retry = Duration::from_millis(200);
    PeerHandle::spawn(cfg).await.unwrap()
}

/// Brings a fake session to Established and returns the stream.
async fn establish(listener: &TcpListener) -> TcpStream {
    let (mut s, _) = fake_peer_session(listener).await;
    s.write_all(&peer_open(65001, vec![])).await.unwrap();
    s.write_all(&keepalive()).await.unwrap();
    s
}

/// Runs one hostile case: the fake peer sends `bad` (after establishing if
/// `established`) and we expect NOTIFICATION `expect` back, while a second,
/// well-behaved session stays Established throughout.
async fn hostile_case(bad: Vec<u8>, open_first: bool, expect: (u8, u8)) {
    let good_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = spawn_against(&good_l).await;
    let mut good_s = establish(&good_l).await;
    good.wait_established(T).await.expect("good peer up");

    let bad_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let victim = spawn_against(&bad_l).await;
    let (mut s, _) = fake_peer_session(&bad_l).await;
    if open_first {
        s.write_all(&peer_open(65001, vec![])).await.unwrap();
        s.write_all(&keepalive()).await.unwrap();
        victim.wait_established(T).await.expect("victim up");
    }
    s.write_all(&bad).await.unwrap();
    let n = read_notification(&mut s).await.expect("a NOTIFICATION");
    assert_eq!((n.code, n.subcode), expect, "got {}", n.describe());
    let st = victim
        .wait_for(T, |s| s.last_notification_sent.is_some())
        .await
        .unwrap();
    assert_ne!(st.state, State::Established);

    // The other session did not notice.
    let gs = good.status();
    assert_eq!(gs.state, State::Established);
    assert_eq!(gs.established_count, 1);
    good_s.write_all(&keepalive()).await.unwrap();
    victim.shutdown(ShutdownMode::Graceful).await;
    good.shutdown(ShutdownMode::Graceful).await;
}

#[tokio::test]
async fn hostile_bad_marker() {
    let mut m = keepalive();
    m[3] = 0;
    hostile_case(m, false, (1, 1)).await;
}

#[tokio::test]
async fn hostile_bad_length() {
    let mut m = keepalive();
    m[17] = 18; // length 18 < 19
    hostile_case(m, false, (1, 2)).await;
}

#[tokio::test]
async fn hostile_bad_type() {
    let mut m = keepalive();
    m[18] = 9;
    hostile_case(m, true, (1, 3)).await;
}

#[tokio::test]
async fn hostile_truncated_open() {
    // An OPEN whose header claims 29 octets but whose optional parameter
    // length points past the end.
    let mut m = peer_open(65001, vec![]);
    m.truncate(29);
    m[16..18].copy_from_slice(&29u16.to_be_bytes());
    m[28] = 10;
    hostile_case(m, false, (2, 0)).await;
}

#[tokio::test]
async fn hostile_wrong_asn() {
    hostile_case(peer_open(65999, vec![]), false, (2, 2)).await;
}

#[tokio::test]
async fn hostile_update_with_unparseable_nlri_resets() {
    // UPDATE: no withdrawn, no attributes, NLRI prefix length 33.
    let body = [0u8, 0, 0, 0, 33, 10, 0, 0, 1, 1];
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(2);
    m.extend_from_slice(&body);
    hostile_case(m, true, (3, 10)).await;
}

/// An unknown capability is ignored (RFC 5492), and a malformed attribute
/// is treat-as-withdraw (RFC 7606): the session stays up.
#[tokio::test]
async fn unknown_capability_and_malformed_attribute_keep_session() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = spawn_against(&l).await;
    let (mut s, _) = fake_peer_session(&l).await;
    let unknown = Capability::Other(OtherCapability::unknown(200, vec![1, 2, 3]));
    s.write_all(&peer_open(65001, vec![unknown])).await.unwrap();
    s.write_all(&keepalive()).await.unwrap();
    h.wait_established(T)
        .await
        .expect("established despite unknown capability");

    // UPDATE with ORIGIN of length 2 (must be 1) and one NLRI.
    let attrs = [0x40u8, 1, 2, 0, 0, 0x40, 2, 0, 0x40, 3, 4, 127, 0, 0, 1];
    let nlri = [32u8, 10, 9, 9, 9];
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(&attrs);
    body.extend_from_slice(&nlri);
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(2);
    m.extend_from_slice(&body);
    s.write_all(&m).await.unwrap();
    let st = h
        .wait_for(T, |s| s.malformed_updates_received == 1)
        .await
        .expect("treat-as-withdraw counted");
    assert_eq!(st.state, State::Established);
    assert_eq!(st.prefixes_received, 0);
    assert!(st.last_notification_sent.is_none());
    h.shutdown(ShutdownMode::Graceful).await;
}

/// Hold timer: a peer that goes silent gets 4/0.
#[tokio::test]
async fn silent_peer_gets_hold_timer_expired() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = PeerConfig::new(lo(), 65001, 65010, Ipv4Addr::new(10, 0, 0, 2));
    cfg.peer_port = l.local_addr().unwrap().port();
    cfg.hold_time = 3;
    let h = PeerHandle::spawn(cfg).await.unwrap();
    let (mut s, _) = fake_peer_session(&l).await;
    let open = Open::new(65001, 3, Ipv4Addr::new(192, 0, 2, 1), vec![]);
    s.write_all(&encode_message(&Message::Open(open), &WireContext::default()).unwrap())
        .await
        .unwrap();
    s.write_all(&keepalive()).await.unwrap();
    h.wait_established(T).await.unwrap();
    let n = read_notification(&mut s).await.expect("NOTIFICATION");
    assert_eq!((n.code, n.subcode), (4, 0));
    h.shutdown(ShutdownMode::Graceful).await;
}

/// A peer that stops reading: the Adj-RIB-Out has encoded every route, but the status
/// reports as advertised only what the writer has put on the socket, so nothing until
/// the peer reads again, and then everything.
#[tokio::test]
async fn advertised_waits_for_the_socket() {
    const N: u32 = 40_000;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    // Inherited by the accepted connection; a fixed buffer also stops autotuning.
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let peer = spawn_against(&listener).await;
    let mut s = establish(&listener).await;
    peer.wait_established(T).await.expect("up");
    // Distinct MEDs keep every route in an UPDATE of its own and 64 communities make
    // each about 300 bytes: some 12 MB, more than the socket buffers hold.
    let set: Routes = routes(N)
        .into_keys()
        .zip(0..)
        .map(|(p, i)| {
            let attrs = RouteAttributes {
                med: Some(i),
                communities: (0..64).collect(),
                ..RouteAttributes::default()
            };
            (p, attrs.into())
        })
        .collect();
    peer.set_desired(set);
    peer.wait_for(T, |s| s.prefixes_sent == N as usize)
        .await
        .expect("every route encoded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = peer.status();
    assert_eq!(st.state, State::Established);
    assert!(
        st.advertised.is_empty(),
        "{} routes reported as advertised while stuck behind a peer that does not read",
        st.advertised.len()
    );
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: ends when the engine closes the connection or after a minute.
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    });
    peer.wait_for(Duration::from_secs(30), |s| {
        s.advertised.len() == N as usize
    })
    .await
    .expect("every route confirmed once the peer reads");
    peer.shutdown(ShutdownMode::Graceful).await;
    drain.abort();
}

/// A session spawned with its routes announces all of them before its End-of-RIB, even
/// against a peer that completes the handshake at once: a graceful-restart helper drops
/// at End-of-RIB every stale path not re-sent by then (RFC 4724 §4.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_routes_all_precede_end_of_rib() {
    const N: u32 = 300;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = PeerConfig::new(lo(), 65001, 65010, Ipv4Addr::new(10, 0, 0, 2));
    cfg.peer_port = listener.local_addr().unwrap().port();
    cfg.connect_retry = Duration::from_millis(200);
    let h = PeerHandle::spawn_observed(cfg, Arc::new(routes(N)), None, false)
        .await
        .unwrap();
    let mut s = establish(&listener).await;
    let mut announced = std::collections::BTreeSet::new();
    let mut end_of_rib = false;
    // Several messages arrive per read: keep what follows the one decoded.
    let ctx = WireContext::default();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    // Bounded: N routes fit in far fewer messages than this.
    for _ in 0..1000 {
        while !matches!(frame(&buf, &ctx), Ok(Some(_))) {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .expect("End-of-RIB in time")
                .unwrap();
            assert!(n > 0, "connection closed before End-of-RIB");
            buf.extend_from_slice(&chunk[..n]);
        }
        let Ok(Some(len)) = frame(&buf, &ctx) else {
            unreachable!("framed above")
        };
        let message = decode_message(&buf[..len], &ctx).unwrap().message;
        buf.drain(..len);
        match message {
            Message::Update(u) => {
                let (a, w) = (u.announced(), u.withdrawn_all());
                assert!(w.is_empty(), "withdrawals in the initial update: {w:?}");
                if a.is_empty() {
                    end_of_rib = true;
                    break;
                }
                announced.extend(a);
            }
            Message::Keepalive => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(end_of_rib, "no End-of-RIB");
    assert_eq!(
        announced.len(),
        N as usize,
        "End-of-RIB after {} of {N} routes",
        announced.len()
    );
    drop(h);
}
