//! Codec vectors as (bytes, Message) pairs checked both ways, framing and
//! RFC 7606 cases.
#![allow(clippy::unwrap_used)]

use super::*;
use std::net::{IpAddr, Ipv4Addr};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const MARKER: &str = "ffffffffffffffffffffffffffffffff";

fn both_ways(bytes: &[u8], msg: Message, ctx: &WireContext) {
    assert_eq!(encode_message(&msg, ctx).unwrap(), bytes, "encode {msg:?}");
    let d = decode_message(bytes, ctx).unwrap();
    assert_eq!(d.message, msg, "decode");
    assert!(d.rfc7606.is_none());
}

#[test]
fn keepalive_vector() {
    both_ways(
        &hex(&format!("{MARKER} 0013 04")),
        Message::Keepalive,
        &WireContext::default(),
    );
}

#[test]
fn open_vector() {
    // OPEN AS 65010, hold 90, id 127.0.0.10; caps: 4-octet ASN 65010,
    // MP IPv4 unicast, route refresh, graceful restart R=1 time 120 for
    // IPv4 unicast (F=0).
    let bytes = hex(&format!(
        "{MARKER} 0035 01 04 fdf2 005a 7f00000a 18 02 16
         41 04 0000fdf2  01 04 0001 00 01  02 00  40 06 8078 0001 01 00"
    ));
    let msg = Message::Open(Open {
        my_as: 65010,
        hold_time: 90,
        router_id: Ipv4Addr::new(127, 0, 0, 10),
        capabilities: vec![
            Capability::FourOctetAsn(65010),
            Capability::MultiProtocol(Family::Ipv4Unicast),
            Capability::RouteRefresh,
            Capability::GracefulRestart(GracefulRestart {
                restarting: true,
                notification: false,
                restart_time: 120,
                families: vec![GracefulRestartFamily {
                    family: Family::Ipv4Unicast,
                    forwarding_preserved: false,
                }],
            }),
        ],
    });
    both_ways(&bytes, msg, &WireContext::default());
}

#[test]
fn open_with_large_asn_uses_as_trans() {
    let o = Open::new(4_200_000_000, 90, Ipv4Addr::new(1, 2, 3, 4), vec![]);
    assert_eq!(o.my_as, AS_TRANS);
    assert_eq!(o.asn(), 4_200_000_000);
    let bytes = encode_message(&Message::Open(o.clone()), &WireContext::default()).unwrap();
    let d = decode_message(&bytes, &WireContext::default()).unwrap();
    assert_eq!(d.message, Message::Open(o));
}

#[test]
fn update_classic_vector() {
    // ORIGIN IGP, AS_PATH SEQ [65010] (4-octet), NEXT_HOP 127.0.0.10,
    // NLRI 10.0.0.1/32 and 10.0.1.0/24.
    let bytes = hex(&format!(
        "{MARKER} 0034 02 0000 0014
         40 01 01 00  40 02 06 02 01 0000fdf2  40 03 04 7f00000a
         20 0a000001  18 0a0001"
    ));
    let msg = Message::Update(Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment::Sequence(vec![65010])]),
            Attribute::NextHop(Ipv4Addr::new(127, 0, 0, 10)),
        ],
        nlri: vec![
            "10.0.0.1/32".parse().unwrap(),
            "10.0.1.0/24".parse().unwrap(),
        ],
    });
    both_ways(&bytes, msg, &WireContext::default());
}

#[test]
fn update_mp_reach_ipv4_and_communities_vector() {
    let bytes = hex(&format!(
        "{MARKER} 0052 02 0000 003b
         40 01 01 00  40 02 06 02 01 0000fdf2
         80 04 04 00000064
         c0 08 04 fdf20001
         80 0e 0e 0001 01 04 7f00000a 00 20 0a000001
         c0 20 0c 0000fdf2 00000001 00000002"
    ));
    let msg = Message::Update(Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment::Sequence(vec![65010])]),
            Attribute::Med(100),
            Attribute::Communities(vec![0xfdf2_0001]),
            Attribute::MpReach(MpReach::Ipv4Unicast {
                next_hop: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)),
                nlri: vec!["10.0.0.1/32".parse().unwrap()],
            }),
            Attribute::LargeCommunities(vec![LargeCommunity {
                global_admin: 65010,
                local_data1: 1,
                local_data2: 2,
            }]),
        ],
        nlri: vec![],
    });
    both_ways(&bytes, msg, &WireContext::default());
}

#[test]
fn update_ipv6_withdraw_and_end_of_rib_vectors() {
    let bytes = hex(&format!(
        "{MARKER} 002e 02 0000 0017 80 0f 14 0002 01 80 20010db8000000000000000000000001"
    ));
    let msg = Message::Update(Update {
        attributes: vec![Attribute::MpUnreach(MpUnreach::Ipv6Unicast(vec![
            "2001:db8::1/128".parse().unwrap(),
        ]))],
        ..Update::default()
    });
    both_ways(&bytes, msg, &WireContext::default());
    let eor4 = hex(&format!("{MARKER} 0017 02 0000 0000"));
    both_ways(
        &eor4,
        Message::Update(Update::end_of_rib(Family::Ipv4Unicast)),
        &WireContext::default(),
    );
    assert_eq!(
        Update::end_of_rib(Family::Ipv6Unicast).as_end_of_rib(),
        Some(Family::Ipv6Unicast)
    );
}

#[test]
fn two_octet_as_path_round_trip() {
    let ctx = WireContext {
        four_octet_asn: false,
        extended_message: false,
    };
    let bytes = hex(&format!(
        "{MARKER} 001f 02 0000 0008 40 01 01 00 40 02 00 00"
    ));
    let _ = bytes;
    let msg = Message::Update(Update {
        withdrawn: vec![],
        attributes: vec![
            Attribute::Origin(Origin::Igp),
            Attribute::AsPath(vec![AsSegment::Sequence(vec![65010, 23456])]),
        ],
        nlri: vec![],
    });
    let bytes = encode_message(&msg, &ctx).unwrap();
    // 2 ASNs × 2 octets + 2 segment header + 3 attribute header.
    assert_eq!(bytes.len(), 19 + 4 + 4 + 9);
    assert_eq!(decode_message(&bytes, &ctx).unwrap().message, msg);
}

#[test]
fn notification_vectors() {
    let n = Notification::administrative_shutdown("maintenance");
    let bytes = hex(&format!("{MARKER} 0021 03 06 02 0b 6d61696e74656e616e6365"));
    both_ways(
        &bytes,
        Message::Notification(n.clone()),
        &WireContext::default(),
    );
    assert_eq!(n.shutdown_message().as_deref(), Some("maintenance"));
    both_ways(
        &hex(&format!("{MARKER} 0015 03 04 00")),
        Message::Notification(Notification::new(4, 0, vec![])),
        &WireContext::default(),
    );
    // A code the codec does not know still decodes.
    let d = decode_message(
        &hex(&format!("{MARKER} 0016 03 63 07 aa")),
        &WireContext::default(),
    )
    .unwrap();
    assert_eq!(
        d.message,
        Message::Notification(Notification::new(0x63, 7, vec![0xaa]))
    );
}

#[test]
fn route_refresh_vector() {
    both_ways(
        &hex(&format!("{MARKER} 0017 05 0002 00 01")),
        Message::RouteRefresh(RouteRefresh {
            family: Some(Family::Ipv6Unicast),
            subtype: 0,
        }),
        &WireContext::default(),
    );
}

#[test]
fn framing_errors_map_to_header_notifications() {
    let ctx = WireContext::default();
    let mut ka = hex(&format!("{MARKER} 0013 04"));
    assert_eq!(frame(&ka[..10], &ctx), Ok(None));
    assert_eq!(frame(&ka, &ctx), Ok(Some(19)));
    ka[0] = 0;
    let e = frame(&ka, &ctx).unwrap_err();
    assert_eq!(e.notification().code, 1);
    assert_eq!(e.notification().subcode, 1);
    let e = frame(&hex(&format!("{MARKER} 0014 04 00")), &ctx).unwrap_err();
    assert_eq!(
        (e.notification().subcode, e.notification().data),
        (2, vec![0, 0x14])
    );
    let e = frame(&hex(&format!("{MARKER} 0013 07")), &ctx).unwrap_err();
    assert_eq!(
        (e.notification().subcode, e.notification().data),
        (3, vec![7])
    );
    // An UPDATE above 4096 without extended messages.
    let e = frame(&hex(&format!("{MARKER} 1001 02")), &ctx).unwrap_err();
    assert_eq!(e.notification().subcode, 2);
    let ext = WireContext {
        extended_message: true,
        ..ctx
    };
    assert_eq!(frame(&hex(&format!("{MARKER} 1001 02")), &ext), Ok(None));
}

#[test]
fn rfc7606_missing_well_known_is_treat_as_withdraw() {
    // NLRI without ORIGIN/AS_PATH/NEXT_HOP.
    let bytes = hex(&format!("{MARKER} 001c 02 0000 0000 20 0a000001"));
    let d = decode_message(&bytes, &WireContext::default()).unwrap();
    assert!(matches!(
        d.rfc7606,
        Some(Rfc7606Action::TreatAsWithdraw { .. })
    ));
    let Message::Update(u) = d.message else {
        panic!()
    };
    assert!(u.nlri.is_empty());
    assert_eq!(u.withdrawn, vec!["10.0.0.1/32".parse().unwrap()]);
}

#[test]
fn rfc7606_bad_attribute_length_is_treat_as_withdraw() {
    // ORIGIN with length 2, then AS_PATH, NEXT_HOP; NLRI 10.9.9.9/32.
    let bytes = hex(&format!(
        "{MARKER} 002b 02 0000 000f 40 01 02 0000 40 02 00 40 03 04 7f000001 20 0a090909"
    ));
    let d = decode_message(&bytes, &WireContext::default()).unwrap();
    assert!(matches!(
        d.rfc7606,
        Some(Rfc7606Action::TreatAsWithdraw { .. })
    ));
    let Message::Update(u) = d.message else {
        panic!()
    };
    assert_eq!(u.withdrawn, vec!["10.9.9.9/32".parse().unwrap()]);
}

#[test]
fn rfc7606_overrunning_lengths_reset_with_3_1() {
    let bytes = hex(&format!("{MARKER} 0017 02 0005 0000"));
    let e = decode_message(&bytes, &WireContext::default()).unwrap_err();
    assert_eq!((e.notification().code, e.notification().subcode), (3, 1));
}

#[test]
fn builder_splits_at_message_size() {
    let prefixes: Vec<ipnet::IpNet> = (0..5000u32)
        .map(|i| {
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap())
        })
        .collect();
    let attrs = vec![
        Attribute::Origin(Origin::Igp),
        Attribute::AsPath(vec![AsSegment::Sequence(vec![65010])]),
    ];
    let nh = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
    for (max, ipv4) in [
        (MAX_MESSAGE_LEN, Ipv4NlriEncoding::Classic),
        (MAX_MESSAGE_LEN, Ipv4NlriEncoding::MpReach),
        (MAX_EXTENDED_MESSAGE_LEN, Ipv4NlriEncoding::MpReach),
    ] {
        let opts = BuildOptions {
            max_message_len: max,
            ipv4,
            four_octet_asn: true,
        };
        let ctx = WireContext {
            four_octet_asn: true,
            extended_message: max > MAX_MESSAGE_LEN,
        };
        let ups = build_announcements(&attrs, nh, &prefixes, &opts).unwrap();
        let mut n = 0;
        for u in &ups {
            let b = encode_message(&Message::Update(u.clone()), &ctx).unwrap();
            assert!(b.len() <= max);
            // Full packing: each message but the last is near the limit.
            n += u.announced().len();
        }
        assert_eq!(n, 5000);
        assert!(ups.len() <= 5000usize.div_ceil(500));
        let w = build_withdrawals(&prefixes, &opts).unwrap();
        assert!(w.len() <= 5000usize.div_ceil(500));
    }
}

#[test]
fn fuzz_decode_survives_garbage_and_vectors() {
    fuzz_decode(&[]);
    fuzz_decode(&[0xff; 19]);
    fuzz_decode(&hex(&format!(
        "{MARKER} 0013 04 {MARKER} 0017 02 0005 0000"
    )));
    // Deterministic pseudo-random inputs behind a valid header.
    let mut x: u32 = 0x1234_5678;
    for len in 0..400usize {
        let mut v = hex(MARKER);
        let total = 19 + len;
        v.extend_from_slice(&(total as u16).to_be_bytes());
        v.push((len % 5) as u8 + 1);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(x as u8);
        }
        fuzz_decode(&v);
    }
}

#[test]
fn rfc7606_treat_as_withdraw_carries_the_as_path() {
    // ORIGIN IGP, AS_PATH SEQ [65001, 65010] (4-octet), NLRI 10.0.0.1/32, no NEXT_HOP: what
    // a ToR reflecting the node's own route without a next hop sends.
    let bytes = hex(&format!(
        "{MARKER} 002d 02 0000 0011 40010100 40020a 0202 0000fde9 0000fdf2 20 0a000001"
    ));
    let ctx = WireContext {
        four_octet_asn: true,
        ..WireContext::default()
    };
    let d = decode_message(&bytes, &ctx).unwrap();
    match d.rfc7606 {
        Some(Rfc7606Action::TreatAsWithdraw { reason, as_path }) => {
            assert!(reason.contains("NEXT_HOP"), "{reason}");
            assert_eq!(as_path, vec![65001, 65010]);
        }
        other => panic!("{other:?}"),
    }
}
