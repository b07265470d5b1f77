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
        forwarding_preserved: false,
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
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
    routes.insert(
        "2001:db8::1/128".parse().unwrap(),
        RouteAttributes::default().into(),
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
            Some(Rfc7606Action::TreatAsWithdraw {
                reason: "x".into(),
                as_path: Vec::new(),
            }),
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
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
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
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
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
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
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
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
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

fn updates(out: &[Output]) -> Vec<Update> {
    sent(out)
        .into_iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u),
            _ => None,
        })
        .collect()
}

#[test]
fn ipv4_end_of_rib_is_the_empty_update_even_over_mp_reach() {
    let now = Instant::now();
    let mut s = in_open_confirm(now);
    let out = s.handle(now, Event::KeepAliveMsg);
    let negotiated = s.status().negotiated.clone().unwrap();
    assert_eq!(negotiated.ipv4_nlri, Ipv4NlriEncoding::MpReach);
    let sent = updates(&out);
    assert!(sent.contains(&Update::default()), "RFC 4724 §2: {sent:?}");
    assert!(
        !sent.iter().any(|u| u.attributes.iter().any(|a| matches!(
            a,
            wire::Attribute::MpUnreach(wire::MpUnreach::Ipv4Unicast(_))
        ))),
        "{sent:?}"
    );
}

fn hosts(n: u32) -> Vec<ipnet::Ipv4Net> {
    (1..=n)
        .map(|i| format!("10.7.0.{i}/32").parse().unwrap())
        .collect()
}

#[test]
fn more_prefixes_than_the_limit_is_cease_6_1() {
    let now = Instant::now();
    let mut s = established(now);
    s.config.max_prefixes = Some(2);
    let two = Update {
        nlri: hosts(2),
        ..Update::default()
    };
    // The same two again (new attributes) stay two: the set is kept when limited.
    for _ in 0..2 {
        let out = s.handle(now, Event::UpdateMsg(two.clone(), None));
        assert_eq!(notif(&out), None);
    }
    assert_eq!(s.status().prefixes_received, 2);
    let three = Update {
        nlri: hosts(3),
        ..Update::default()
    };
    let out = s.handle(now, Event::UpdateMsg(three, None));
    let n = sent(&out)
        .into_iter()
        .find_map(|m| match m {
            Message::Notification(n) => Some(n),
            _ => None,
        })
        .unwrap();
    // RFC 4486 §4: AFI 1, SAFI 1, the limit as 4 octets.
    assert_eq!((n.code, n.subcode), (6, 1));
    assert_eq!(n.data, vec![0, 1, 1, 0, 0, 0, 2]);
    assert_eq!(s.state(), State::Idle);
    assert!(out.contains(&Output::Disconnect));
    assert!(
        s.status()
            .last_error
            .as_deref()
            .unwrap()
            .contains("more than the limit of 2")
    );
}

#[test]
fn received_routes_are_counted_not_kept_unless_asked() {
    let now = Instant::now();
    let twice = Update {
        nlri: hosts(1),
        ..Update::default()
    };
    let mut counted = established(now);
    let mut kept = established(now);
    kept.config.keep_received = true;
    for s in [&mut counted, &mut kept] {
        s.handle(now, Event::UpdateMsg(twice.clone(), None));
        s.handle(now, Event::UpdateMsg(twice.clone(), None));
        assert_eq!(s.status().nlri_received, 2);
    }
    assert!(counted.received.is_empty(), "nothing kept");
    assert_eq!(
        counted.status().prefixes_received,
        2,
        "counts only: a prefix announced twice counts twice"
    );
    assert_eq!(kept.status().prefixes_received, 1);
}

#[test]
fn advertised_is_what_was_encoded_not_what_was_asked() {
    let now = Instant::now();
    let mut s = in_open_sent(now);
    // Classic IPv4 NLRI cannot carry an IPv6 next hop (that needs RFC 8950's MP_REACH).
    s.config.ipv4_nlri = Ipv4NlriPolicy::Classic;
    s.handle(now, Event::BgpOpen(peer_open()));
    s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.state(), State::Established);
    let good: IpNet = "10.0.0.1/32".parse().unwrap();
    let refused: IpNet = "10.0.0.2/32".parse().unwrap();
    let mut routes = Routes::new();
    routes.insert(good, RouteAttributes::default().into());
    routes.insert(
        refused,
        RouteAttributes {
            next_hop: Some("2001:db8::1".parse().unwrap()),
            ..RouteAttributes::default()
        }
        .into(),
    );
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    assert_eq!(
        s.status().advertised.keys().copied().collect::<Vec<_>>(),
        vec![good]
    );
    assert!(
        s.status()
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot advertise 10.0.0.2/32")
    );
    // Withdrawn: gone from the set too; a dropped connection empties it.
    s.handle(now, Event::SetDesired(Arc::new(Routes::new())));
    assert!(s.status().advertised.is_empty());
}

/// An Established session with graceful restart on our side and the peer's
/// GR capability with the N bit as given.
fn established_with_gr(now: Instant, peer_n_bit: bool) -> Session {
    let mut c = cfg();
    c.graceful_restart = Some(GracefulRestartConfig::default());
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
    let mut open = peer_open();
    open.capabilities
        .push(Capability::GracefulRestart(GracefulRestart {
            restarting: false,
            notification: peer_n_bit,
            restart_time: 120,
            families: vec![],
        }));
    s.handle(now, Event::BgpOpen(open));
    s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.state(), State::Established);
    let mut routes = Routes::new();
    routes.insert(
        "10.0.0.1/32".parse().unwrap(),
        RouteAttributes::default().into(),
    );
    s.handle(now, Event::SetDesired(Arc::new(routes)));
    s
}

#[test]
fn our_graceful_restart_capability_sets_the_n_bit() {
    let mut c = cfg();
    c.graceful_restart = Some(GracefulRestartConfig::default());
    let s = Session::new(c);
    assert!(s.local_open().graceful_restart().unwrap().notification);
    let s = established_with_gr(Instant::now(), true);
    assert!(
        s.status()
            .negotiated
            .as_ref()
            .unwrap()
            .graceful_notification
    );
    let s = established_with_gr(Instant::now(), false);
    assert!(
        !s.status()
            .negotiated
            .as_ref()
            .unwrap()
            .graceful_notification
    );
}

#[test]
fn withdraw_with_n_bit_sends_hard_reset_wrapping_the_shutdown_message() {
    let now = Instant::now();
    let mut s = established_with_gr(now, true);
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Withdraw {
            message: "node drain".into(),
        }),
    );
    let msgs = sent(&out);
    assert!(matches!(&msgs[0], Message::Update(u) if u.withdrawn_all().len() == 1));
    let Message::Notification(n) = &msgs[1] else {
        panic!("no NOTIFICATION: {msgs:?}");
    };
    assert_eq!((n.code, n.subcode), (6, 9), "Hard Reset");
    assert_eq!(
        &n.data[..2],
        &[6, 2],
        "wraps Cease / Administrative Shutdown"
    );
    assert_eq!(n.shutdown_message().as_deref(), Some("node drain"));
}

#[test]
fn withdraw_without_n_bit_sends_plain_administrative_shutdown() {
    let now = Instant::now();
    let mut s = established_with_gr(now, false);
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Withdraw {
            message: "bye".into(),
        }),
    );
    assert_eq!(notif(&out), Some((6, 2)));
}

#[test]
fn restart_with_n_bit_says_cease_and_keeps_the_routes() {
    let now = Instant::now();
    let mut s = established_with_gr(now, true);
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Restart {
            message: "rolling update".into(),
        }),
    );
    let msgs = sent(&out);
    assert!(
        !msgs.iter().any(|m| matches!(m, Message::Update(_))),
        "nothing withdrawn: {msgs:?}"
    );
    assert_eq!(
        notif(&out),
        Some((6, 2)),
        "not a Hard Reset: the peer keeps our routes"
    );
    assert!(out.contains(&Output::Disconnect));
}

#[test]
fn restart_with_graceful_restart_but_no_n_bit_closes_silently() {
    let now = Instant::now();
    let mut s = established_with_gr(now, false);
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Restart {
            message: "rolling update".into(),
        }),
    );
    assert!(
        sent(&out).is_empty(),
        "RFC 4724 keeps routes only on a silent close"
    );
    assert!(out.contains(&Output::Disconnect));
}

#[test]
fn restart_without_graceful_restart_says_why() {
    let now = Instant::now();
    let mut s = established(now);
    let out = s.handle(
        now,
        Event::ManualStop(ShutdownMode::Restart {
            message: "rolling update".into(),
        }),
    );
    assert_eq!(notif(&out), Some((6, 2)));
}

/// Drives a session through `n` refused connects and returns the retry delays.
fn retry_delays(mut s: Session, start: Instant, n: usize) -> Vec<Duration> {
    let mut now = start;
    s.handle(now, Event::ManualStart);
    let mut delays = Vec::new();
    for _ in 0..n {
        s.handle(
            now,
            Event::TcpConnectionFails {
                reason: "refused".into(),
            },
        );
        let next = s.next_deadline().unwrap();
        delays.push(next - now);
        now = next;
        s.on_timers(now);
    }
    delays
}

#[test]
fn after_our_own_close_reconnects_do_not_back_off() {
    let start = Instant::now();
    let normal = retry_delays(Session::new(cfg()), start, 3);
    assert!(
        normal[1] >= Duration::from_secs(10),
        "normal backoff grows: {normal:?}"
    );
    let mut quick = Session::new(cfg());
    quick.reconnect_quickly();
    let delays = retry_delays(quick, start, 5);
    assert!(
        delays.iter().all(|d| *d <= QUICK_RETRY),
        "every retry within {QUICK_RETRY:?}: {delays:?}"
    );
    // After the window the normal backoff is back.
    let mut late = Session::new(cfg());
    late.reconnect_quickly();
    late.handle(start, Event::ManualStart);
    let after = start + QUICK_RECONNECT_WINDOW + Duration::from_secs(1);
    late.handle(
        after,
        Event::TcpConnectionFails {
            reason: "refused".into(),
        },
    );
    assert!(late.next_deadline().unwrap() - after > QUICK_RETRY);
}

#[test]
fn keepalive_and_retry_change_live_but_hold_time_needs_a_reset() {
    let now = Instant::now();
    let mut s = established(now);
    assert_eq!(s.status().negotiated.as_ref().unwrap().keepalive, 3);
    let mut c = cfg();
    c.keepalive = Some(1);
    c.connect_retry = Duration::from_secs(2);
    assert!(!cfg().needs_reset(&c));
    assert!(s.reconfigure(now, c));
    assert_eq!(s.status().negotiated.as_ref().unwrap().keepalive, 1);
    assert_eq!(s.state(), State::Established);
    assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(1)));

    let mut c = cfg();
    c.hold_time = 30;
    assert!(cfg().needs_reset(&c));
    assert!(
        !s.reconfigure(now, c),
        "hold time is negotiated in the OPEN"
    );
    assert_eq!(s.config().hold_time, 9);
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

/// RFC 4724 §3/§4.2: the F bit of each family says whether our forwarding
/// state survived our restart; a helper that reads it clear drops our stale
/// routes at once. It is set on every family exactly when configured, and
/// survives encoding.
#[test]
fn our_graceful_restart_capability_sets_the_f_bit_when_forwarding_is_preserved() {
    for preserved in [true, false] {
        let mut c = cfg();
        c.families = vec![Family::Ipv4Unicast, Family::Ipv6Unicast];
        c.graceful_restart = Some(GracefulRestartConfig {
            forwarding_preserved: preserved,
            ..GracefulRestartConfig::default()
        });
        let open = Session::new(c).local_open();
        let gr = open.graceful_restart().unwrap();
        assert_eq!(
            gr.families
                .iter()
                .map(|f| (f.family, f.forwarding_preserved))
                .collect::<Vec<_>>(),
            vec![
                (Family::Ipv4Unicast, preserved),
                (Family::Ipv6Unicast, preserved)
            ]
        );
        // On the wire (capability 64, length 2 + 4 per family): the flags octet after
        // each AFI/SAFI has 0x80 exactly when set.
        let bytes = encode_message(&Message::Open(open.clone()), &WireContext::default()).unwrap();
        let at = bytes
            .windows(2)
            .position(|w| w == [64, 10])
            .expect("a graceful restart capability for two families");
        let flags: Vec<u8> = [at + 7, at + 11].iter().map(|i| bytes[*i]).collect();
        let want = if preserved { 0x80 } else { 0 };
        assert_eq!(flags, vec![want, want], "{bytes:02x?}");
        let decoded = decode_message(&bytes, &WireContext::default())
            .unwrap()
            .message;
        assert_eq!(decoded, Message::Open(open));
    }
}
