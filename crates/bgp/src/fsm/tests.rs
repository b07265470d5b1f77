//! One test per FSM transition (RFC 4271 §8.2.2 names), no sockets.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::rib::RouteAttributes;
use crate::wire::{WireContext, decode_message, encode_message, frame};

fn cfg() -> SessionConfig {
    let mut c = SessionConfig::new(65010, 65001, Ipv4Addr::new(10, 0, 0, 2));
    c.hold_time = 9;
    c
}

fn addrs() -> (SocketAddr, SocketAddr) {
    (
        "127.0.0.10:40000".parse().unwrap(),
        "127.0.0.1:179".parse().unwrap(),
    )
}

/// All messages in the Send outputs.
fn sent(out: &[Output]) -> Vec<Message> {
    let mut msgs = Vec::new();
    for o in out {
        if let Output::Send(b) = o {
            let mut rest = &b[..];
            while let Ok(Some(len)) = frame(rest, &WireContext::default()) {
                msgs.push(
                    decode_message(&rest[..len], &WireContext::default())
                        .unwrap()
                        .message,
                );
                rest = &rest[len..];
            }
        }
    }
    msgs
}

fn notif(out: &[Output]) -> Option<(u8, u8)> {
    sent(out).into_iter().find_map(|m| match m {
        Message::Notification(n) => Some((n.code, n.subcode)),
        _ => None,
    })
}

fn peer_open() -> Open {
    Open::new(
        65001,
        90,
        Ipv4Addr::new(10, 0, 0, 1),
        vec![
            Capability::MultiProtocol(Family::Ipv4Unicast),
            Capability::MultiProtocol(Family::Ipv6Unicast),
            Capability::RouteRefresh,
        ],
    )
}

fn in_connect(now: Instant) -> Session {
    let mut s = Session::new(cfg());
    let out = s.handle(now, Event::ManualStart);
    assert!(out.contains(&Output::Connect));
    assert_eq!(s.state(), State::Connect);
    s
}

fn in_open_sent(now: Instant) -> Session {
    let mut s = in_connect(now);
    let (l, r) = addrs();
    let out = s.handle(
        now,
        Event::TcpCrAcked {
            local: l,
            remote: r,
        },
    );
    assert!(matches!(sent(&out).as_slice(), [Message::Open(_)]));
    assert_eq!(s.state(), State::OpenSent);
    s
}

fn in_open_confirm(now: Instant) -> Session {
    let mut s = in_open_sent(now);
    let out = s.handle(now, Event::BgpOpen(peer_open()));
    assert_eq!(sent(&out), vec![Message::Keepalive]);
    assert_eq!(s.state(), State::OpenConfirm);
    s
}

fn established(now: Instant) -> Session {
    let mut s = in_open_confirm(now);
    s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.state(), State::Established);
    s
}

#[test]
fn idle_manual_start_active_goes_connect() {
    in_connect(Instant::now());
}

#[test]
fn idle_manual_start_passive_goes_active_without_connecting() {
    let mut c = cfg();
    c.passive = true;
    let mut s = Session::new(c);
    let out = s.handle(Instant::now(), Event::ManualStart);
    assert!(!out.contains(&Output::Connect));
    assert_eq!(s.state(), State::Active);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn idle_ignores_timers_and_refuses_connections_when_stopped() {
    let now = Instant::now();
    let mut s = Session::new(cfg());
    assert!(s.handle(now, Event::HoldTimerExpires).is_empty());
    let (l, r) = addrs();
    let out = s.handle(
        now,
        Event::TcpConnectionConfirmed {
            local: l,
            remote: r,
        },
    );
    assert_eq!(out, vec![Output::Disconnect]);
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn connect_retry_timer_expires_reconnects() {
    let now = Instant::now();
    let mut s = in_connect(now);
    let t = s.next_deadline().unwrap();
    assert_eq!(t, now + DEFAULT_CONNECT_RETRY);
    let out = s.on_timers(t);
    assert!(out.contains(&Output::Connect));
    assert_eq!(s.state(), State::Connect);
}

#[test]
fn connect_tcp_fails_goes_active_with_backoff() {
    let now = Instant::now();
    let mut s = in_connect(now);
    s.handle(
        now,
        Event::TcpConnectionFails {
            reason: "refused".into(),
        },
    );
    assert_eq!(s.state(), State::Active);
    assert!(s.status().last_error.as_ref().unwrap().contains("refused"));
    // Backoff doubled after one failure.
    assert_eq!(s.next_deadline(), Some(now + DEFAULT_CONNECT_RETRY * 2));
    let out = s.on_timers(now + DEFAULT_CONNECT_RETRY * 2);
    assert!(out.contains(&Output::Connect));
    assert_eq!(s.state(), State::Connect);
}

#[test]
fn backoff_is_bounded() {
    let now = Instant::now();
    let mut s = in_connect(now);
    for _ in 0..40 {
        s.handle(
            now,
            Event::TcpConnectionFails {
                reason: "refused".into(),
            },
        );
        s.handle(now, Event::ConnectRetryTimerExpires);
    }
    assert!(s.next_deadline().unwrap() <= now + DEFAULT_CONNECT_RETRY_MAX);
}

#[test]
fn active_tcp_connection_confirmed_sends_open() {
    let now = Instant::now();
    let mut s = in_connect(now);
    s.handle(now, Event::TcpConnectionFails { reason: "x".into() });
    let (l, r) = addrs();
    let out = s.handle(
        now,
        Event::TcpConnectionConfirmed {
            local: l,
            remote: r,
        },
    );
    assert!(matches!(sent(&out).as_slice(), [Message::Open(_)]));
    assert_eq!(s.state(), State::OpenSent);
}

#[test]
fn open_sent_valid_open_negotiates() {
    let now = Instant::now();
    let s = in_open_confirm(now);
    let n = s.status().negotiated.clone().unwrap();
    assert_eq!(n.hold_time, 9);
    assert_eq!(n.keepalive, 3);
    assert!(n.four_octet_asn);
    assert!(n.route_refresh);
    assert_eq!(n.ipv4_nlri, Ipv4NlriEncoding::MpReach);
    assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(3)));
}

#[test]
fn our_open_carries_capabilities_and_restart_flag_once() {
    let mut c = cfg();
    c.graceful_restart = Some(GracefulRestartConfig {
        restart_time: 120,
        restarting: true,
    });
    let mut s = Session::new(c);
    let open = s.local_open();
    assert_eq!(open.asn(), 65010);
    assert!(open.has(|c| *c == Capability::RouteRefresh));
    assert!(open.has(|c| *c == Capability::MultiProtocol(Family::Ipv6Unicast)));
    assert!(open.graceful_restart().unwrap().restarting);
    let now = Instant::now();
    s.handle(now, Event::ManualStart);
    let (l, r) = addrs();
    s.handle(
        now,
        Event::TcpCrAcked {
            local: l,
            remote: r,
        },
    );
    // After the first OPEN, the R bit is cleared for reconnects.
    assert!(!s.local_open().graceful_restart().unwrap().restarting);
}

#[test]
fn open_sent_bad_peer_as_is_2_2() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let mut o = peer_open();
    o = Open::new(65999, o.hold_time, o.router_id, o.capabilities);
    let out = s.handle(now, Event::BgpOpen(o));
    assert_eq!(notif(&out), Some((2, 2)));
    assert!(out.contains(&Output::Disconnect));
    assert_eq!(s.state(), State::Idle);
    // Automatic restart after backoff, not at once.
    assert!(s.next_deadline().unwrap() > now);
}

#[test]
fn open_sent_unacceptable_hold_time_is_2_6() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let mut o = peer_open();
    o.hold_time = 2;
    assert_eq!(notif(&s.handle(now, Event::BgpOpen(o))), Some((2, 6)));
}

#[test]
fn open_sent_no_common_family_is_2_7() {
    let now = Instant::now();
    let mut c = cfg();
    c.families = vec![Family::Ipv6Unicast];
    let mut s = Session::new(c);
    s.handle(now, Event::ManualStart);
    let (l, r) = addrs();
    s.handle(
        now,
        Event::TcpCrAcked {
            local: l,
            remote: r,
        },
    );
    let o = Open::new(
        65001,
        90,
        Ipv4Addr::new(10, 0, 0, 1),
        vec![Capability::MultiProtocol(Family::Ipv4Unicast)],
    );
    assert_eq!(notif(&s.handle(now, Event::BgpOpen(o))), Some((2, 7)));
}

#[test]
fn open_sent_ibgp_same_router_id_is_2_3() {
    let now = Instant::now();
    let mut c = cfg();
    c.peer_asn = 65010;
    let mut s = Session::new(c);
    s.handle(now, Event::ManualStart);
    let (l, r) = addrs();
    s.handle(
        now,
        Event::TcpCrAcked {
            local: l,
            remote: r,
        },
    );
    let o = Open::new(65010, 90, Ipv4Addr::new(10, 0, 0, 2), vec![]);
    assert_eq!(notif(&s.handle(now, Event::BgpOpen(o))), Some((2, 3)));
}

#[test]
fn open_sent_keepalive_is_fsm_error_5_1() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    assert_eq!(notif(&s.handle(now, Event::KeepAliveMsg)), Some((5, 1)));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn open_sent_hold_timer_expires_is_4_0() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let out = s.on_timers(now + OPEN_HOLD_TIME);
    assert_eq!(notif(&out), Some((4, 0)));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn open_sent_tcp_fails_goes_active() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    s.handle(
        now,
        Event::TcpConnectionFails {
            reason: "reset".into(),
        },
    );
    assert_eq!(s.state(), State::Active);
}

#[test]
fn open_sent_collision_dump_is_6_7() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    assert_eq!(
        notif(&s.handle(now, Event::OpenCollisionDump)),
        Some((6, 7))
    );
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn open_sent_header_error_sends_its_notification() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let out = s.handle(now, Event::Data(vec![0u8; 19]));
    assert_eq!(notif(&out), Some((1, 1)));
}

#[test]
fn open_confirm_keepalive_goes_established_and_advertises() {
    let now = Instant::now();
    let mut s = in_open_confirm(now);
    let mut routes = Routes::new();
    routes.insert("10.0.0.1/32".parse().unwrap(), RouteAttributes::default());
    routes.insert(
        "2001:db8::1/128".parse().unwrap(),
        RouteAttributes::default(),
    );
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    let out = s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.state(), State::Established);
    let msgs = sent(&out);
    // Two UPDATEs with routes, then End-of-RIB for both families.
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    let eors: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => u.as_end_of_rib(),
            _ => None,
        })
        .collect();
    assert_eq!(eors, vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert_eq!(s.status().prefixes_sent, 2);
    assert_eq!(s.status().established_count, 1);
}

#[test]
fn open_confirm_keepalive_timer_sends_keepalive() {
    let now = Instant::now();
    let mut s = in_open_confirm(now);
    let out = s.on_timers(now + Duration::from_secs(3));
    assert_eq!(sent(&out), vec![Message::Keepalive]);
}

#[test]
fn open_confirm_notification_goes_idle_without_reply() {
    let now = Instant::now();
    let mut s = in_open_confirm(now);
    let out = s.handle(now, Event::NotifMsg(Notification::new(6, 2, vec![])));
    assert_eq!(notif(&out), None);
    assert_eq!(s.state(), State::Idle);
    assert_eq!(
        s.status().last_notification_received,
        Some(Notification::new(6, 2, vec![]))
    );
}

#[test]
fn open_confirm_update_is_5_2() {
    let now = Instant::now();
    let mut s = in_open_confirm(now);
    assert_eq!(
        notif(&s.handle(now, Event::UpdateMsg(Update::default(), None))),
        Some((5, 2))
    );
}

#[test]
fn established_hold_timer_expires_is_4_0() {
    let now = Instant::now();
    let mut s = established(now);
    let out = s.on_timers(now + Duration::from_secs(9));
    // The keepalive timer (3 s) also fired first; the hold timer wins.
    assert_eq!(notif(&out), Some((4, 0)));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn established_keepalive_restarts_hold_timer() {
    let now = Instant::now();
    let mut s = established(now);
    s.handle(now + Duration::from_secs(8), Event::KeepAliveMsg);
    let out = s.on_timers(now + Duration::from_secs(9));
    assert_eq!(notif(&out), None);
    assert_eq!(s.state(), State::Established);
}

#[test]
fn established_open_is_5_3() {
    let now = Instant::now();
    let mut s = established(now);
    assert_eq!(
        notif(&s.handle(now, Event::BgpOpen(peer_open()))),
        Some((5, 3))
    );
}

#[test]
fn established_update_counts_received_prefixes() {
    let now = Instant::now();
    let mut s = established(now);
    let u = Update {
        nlri: vec!["10.1.0.0/24".parse().unwrap()],
        ..Update::default()
    };
    s.handle(now, Event::UpdateMsg(u, None));
    assert_eq!(s.status().prefixes_received, 1);
    let w = Update {
        withdrawn: vec!["10.1.0.0/24".parse().unwrap()],
        ..Update::default()
    };
    s.handle(
        now,
        Event::UpdateMsg(
            w,
            Some(Rfc7606Action::TreatAsWithdraw { reason: "x".into() }),
        ),
    );
    assert_eq!(s.status().prefixes_received, 0);
    assert_eq!(s.status().malformed_updates_received, 1);
    assert_eq!(s.state(), State::Established);
}

#[test]
fn established_set_desired_sends_only_the_diff() {
    let now = Instant::now();
    let mut s = established(now);
    let mut routes = Routes::new();
    routes.insert("10.0.0.1/32".parse().unwrap(), RouteAttributes::default());
    let out = s.handle(now, Event::SetDesired(Arc::new(routes.clone())));
    assert_eq!(sent(&out).len(), 1);
    assert!(
        s.handle(now, Event::SetDesired(Arc::new(routes)))
            .is_empty()
    );
    let out = s.handle(now, Event::SetDesired(Arc::new(Routes::new())));
    let Message::Update(u) = &sent(&out)[0] else {
        panic!()
    };
    assert_eq!(
        u.withdrawn_all(),
        vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn established_route_refresh_resends_everything() {
    let now = Instant::now();
    let mut s = established(now);
    let mut routes = Routes::new();
    routes.insert("10.0.0.1/32".parse().unwrap(), RouteAttributes::default());
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    let out = s.handle(now, Event::RouteRefreshMsg);
    let msgs = sent(&out);
    assert!(matches!(&msgs[0], Message::Update(u) if u.announced().len() == 1));
}

#[test]
fn established_manual_stop_withdraws_then_cease_6_2() {
    let now = Instant::now();
    let mut s = established(now);
    let mut routes = Routes::new();
    routes.insert("10.0.0.1/32".parse().unwrap(), RouteAttributes::default());
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Withdraw {
            message: "drain".into(),
        }),
    );
    let msgs = sent(&out);
    assert!(matches!(&msgs[0], Message::Update(u) if u.withdrawn_all().len() == 1));
    assert!(
        matches!(&msgs[1], Message::Notification(n) if n.subcode == 2 && n.shutdown_message().as_deref() == Some("drain"))
    );
    assert_eq!(
        out.last(),
        Some(&Output::StateChange {
            from: State::Established,
            to: State::Idle
        })
    );
    assert_eq!(s.state(), State::Idle);
    assert_eq!(s.next_deadline(), None, "stopped sessions do not restart");
}

#[test]
fn established_graceful_stop_just_closes() {
    let now = Instant::now();
    let mut s = established(now);
    let out = s.handle(now, Event::ManualStop(ShutdownMode::Graceful));
    assert!(sent(&out).is_empty());
    assert!(out.contains(&Output::Disconnect));
}

#[test]
fn established_tcp_fails_restarts_and_resends_after_reconnect() {
    let now = Instant::now();
    let mut s = established(now);
    let mut routes = Routes::new();
    routes.insert("10.0.0.1/32".parse().unwrap(), RouteAttributes::default());
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    s.handle(
        now,
        Event::TcpConnectionFails {
            reason: "reset".into(),
        },
    );
    assert_eq!(s.state(), State::Idle);
    assert_eq!(s.status().prefixes_sent, 0);
    let t = s.next_deadline().unwrap();
    let out = s.on_timers(t);
    assert!(out.contains(&Output::Connect));
    let (l, r) = addrs();
    s.handle(
        t,
        Event::TcpCrAcked {
            local: l,
            remote: r,
        },
    );
    s.handle(t, Event::BgpOpen(peer_open()));
    let out = s.handle(t, Event::KeepAliveMsg);
    assert!(
        sent(&out)
            .iter()
            .any(|m| matches!(m, Message::Update(u) if u.announced().len() == 1))
    );
    assert_eq!(s.status().established_count, 2);
}

#[test]
fn collision_rule_compares_router_ids() {
    assert!(collision_keeps_inbound(
        Ipv4Addr::new(1, 1, 1, 1),
        Ipv4Addr::new(2, 2, 2, 2)
    ));
    assert!(!collision_keeps_inbound(
        Ipv4Addr::new(3, 3, 3, 3),
        Ipv4Addr::new(2, 2, 2, 2)
    ));
}

#[test]
fn hold_time_zero_disables_keepalives() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let mut o = peer_open();
    o.hold_time = 0;
    s.handle(now, Event::BgpOpen(o));
    assert_eq!(s.status().negotiated.as_ref().unwrap().hold_time, 0);
    s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn data_split_across_reads_is_reassembled() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    let bytes = encode_message(&Message::Open(peer_open()), &WireContext::default()).unwrap();
    let (a, b) = bytes.split_at(7);
    assert!(sent(&s.handle(now, Event::Data(a.to_vec()))).is_empty());
    s.handle(now, Event::Data(b.to_vec()));
    assert_eq!(s.state(), State::OpenConfirm);
}

#[test]
fn bfd_down_tears_an_established_session_down_with_cease_10_and_backs_off() {
    let now = Instant::now();
    let mut s = established(now);
    let out = s.handle(now, Event::BfdDown);
    assert_eq!(
        notif(&out),
        Some((Notification::CEASE, wire::cease::BFD_DOWN))
    );
    assert!(out.contains(&Output::Disconnect));
    assert_eq!(s.state(), State::Idle);
    assert_eq!(
        s.status().last_error.as_deref(),
        Some("BFD session went down")
    );
    // It comes back by itself after the backoff, not at once.
    assert!(s.on_timers(now).is_empty());
    let restart = s.next_deadline().expect("a restart is scheduled");
    assert!(restart > now);
    assert!(s.on_timers(restart).contains(&Output::Connect));
}

#[test]
fn bfd_down_before_the_peer_is_reached_changes_nothing() {
    let now = Instant::now();
    let mut s = in_connect(now);
    assert!(s.handle(now, Event::BfdDown).is_empty());
    assert_eq!(s.state(), State::Connect);
    let mut idle = Session::new(cfg());
    assert!(idle.handle(now, Event::BfdDown).is_empty());
    assert_eq!(idle.state(), State::Idle);
}
