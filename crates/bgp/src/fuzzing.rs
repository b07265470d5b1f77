//! Harnesses shared by the fuzz targets (`crates/bgp/fuzz`, nightly, for deep local runs)
//! and the property tests (`tests/properties.rs`, stable, a bounded run in every test run):
//! both feed them arbitrary bytes, and a panic is a finding.
//!
//! [`session_script`] reads its bytes as a script of FSM events: what a peer could send
//! (well-formed messages and garbage), what the socket and the timers could do, and what
//! the speaker could ask for, in any order. Whatever happens, the session must not panic,
//! everything it sends must be a well-formed BGP message, and a ManualStop must leave it
//! Idle.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::fsm::{Event, Output, Session, SessionConfig, ShutdownMode, State};
use crate::rib::{RouteAttributes, Routes};
use crate::wire::{
    Capability, Family, Message, Notification, Open, WireContext, decode_message, encode_message,
    frame,
};

/// Events a script may hold at most: keeps one run short whatever the input's length.
const MAX_EVENTS: usize = 256;

/// A cursor over the script that reads zeros once it runs out.
struct Script<'a> {
    bytes: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.bytes.len());
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        head.to_vec()
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

const LOCAL_ASN: u32 = 65010;
const PEER_ASN: u32 = 65001;

fn peer_open(script: &mut Script<'_>) -> Open {
    let flags = script.byte();
    let mut capabilities = vec![Capability::MultiProtocol(Family::Ipv4Unicast)];
    if flags & 1 != 0 {
        capabilities.push(Capability::MultiProtocol(Family::Ipv6Unicast));
    }
    if flags & 2 != 0 {
        capabilities.push(Capability::RouteRefresh);
    }
    if flags & 4 != 0 {
        capabilities.clear();
    }
    // Mostly the right ASN, sometimes another; hold times including the illegal 1 and 2.
    let asn = if flags & 8 != 0 {
        u32::from(script.byte())
    } else {
        PEER_ASN
    };
    let hold = match flags >> 4 {
        0 => 0,
        1 => 1,
        2 => 3,
        n => u16::from(n) * 10,
    };
    Open::new(
        asn,
        hold,
        Ipv4Addr::new(10, 0, 0, script.byte()),
        capabilities,
    )
}

fn routes(script: &mut Script<'_>) -> Routes {
    let count = script.byte() % 32;
    (0..count)
        .map(|i| {
            let b = script.byte();
            let prefix = if b & 1 == 0 {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::new(172, 16, i, b), 32).unwrap_or_default())
            } else {
                let addr =
                    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, u16::from(i), u16::from(b));
                IpNet::V6(Ipv6Net::new(addr, 128).unwrap_or_default())
            };
            let attributes = RouteAttributes {
                next_hop: (b & 2 != 0).then_some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10))),
                as_path: vec![u32::from(b); usize::from(b % 4)],
                med: (b & 4 != 0).then_some(u32::from(b)),
                communities: vec![u32::from(b) << 16; usize::from(b % 3)],
                ..RouteAttributes::default()
            };
            (prefix, attributes.into())
        })
        .collect()
}

/// Bytes a peer could send: a well-formed message, or one with a byte changed.
fn peer_message(script: &mut Script<'_>, kind: u8) -> Vec<u8> {
    let message = match kind % 4 {
        0 => Message::Open(peer_open(script)),
        1 => Message::Keepalive,
        2 => Message::Notification(Notification {
            code: script.byte() % 8,
            subcode: script.byte() % 12,
            data: script.take(8),
        }),
        _ => {
            let update = crate::wire::Update {
                withdrawn: Vec::new(),
                attributes: Vec::new(),
                nlri: Vec::new(),
            };
            Message::Update(update)
        }
    };
    let mut bytes = encode_message(&message, &WireContext::default()).unwrap_or_default();
    if kind & 0x80 != 0 && !bytes.is_empty() {
        let at = usize::from(script.byte()) % bytes.len();
        bytes[at] ^= script.byte() | 1;
    }
    bytes
}

/// Checks every message the session sends: it must frame and decode.
fn check_sent(outputs: &[Output], ctx: &WireContext) {
    for output in outputs {
        let Output::Send(bytes) = output else {
            continue;
        };
        let mut rest = bytes.as_slice();
        assert!(!rest.is_empty(), "an empty Send");
        // Bounded: each turn consumes one whole message of at least 19 bytes.
        while !rest.is_empty() {
            let len = match frame(rest, ctx) {
                Ok(Some(len)) => len,
                other => panic!("the session sent bytes that do not frame: {other:?}"),
            };
            if let Err(e) = decode_message(&rest[..len], ctx) {
                panic!("the session sent a message that does not decode: {e:?}");
            }
            rest = &rest[len..];
        }
    }
}

/// Runs one session through the events `script` describes (see the module docs) and
/// returns the states it passed through, in order of first visit, so a test can tell how
/// far a script got.
pub fn session_script(script: &[u8]) -> Vec<State> {
    let mut script = Script { bytes: script };
    let mut config = SessionConfig::new(LOCAL_ASN, PEER_ASN, Ipv4Addr::new(10, 0, 0, 2));
    let flags = script.byte();
    config.passive = flags & 1 != 0;
    config.hold_time = if flags & 2 != 0 { 0 } else { 9 };
    config.extended_message = flags & 4 != 0;
    let mut session = Session::new(config);
    let mut visited = vec![session.state()];
    let mut now = Instant::now();
    let local = SocketAddr::from(([127, 0, 0, 10], 40000));
    let remote = SocketAddr::from(([127, 0, 0, 1], 179));
    for _ in 0..MAX_EVENTS {
        if script.is_empty() {
            break;
        }
        let op = script.byte();
        let event = match op % 18 {
            0 => Event::ManualStart,
            1 => Event::ManualStop(ShutdownMode::Withdraw {
                message: "fuzz".into(),
            }),
            2 => Event::ManualStop(ShutdownMode::Graceful),
            3 => Event::ConnectRetryTimerExpires,
            4 => Event::HoldTimerExpires,
            5 => Event::KeepaliveTimerExpires,
            6 => Event::TcpCrAcked { local, remote },
            7 => Event::TcpConnectionConfirmed { local, remote },
            8 => Event::TcpConnectionFails {
                reason: "reset".into(),
            },
            9 => {
                let n = usize::from(script.byte()) * 4;
                Event::Data(script.take(n))
            }
            10..=13 => Event::Data(peer_message(&mut script, op)),
            14 => Event::OpenCollisionDump,
            15 => Event::SetDesired(Arc::new(routes(&mut script))),
            16 => Event::RouteRefreshMsg,
            _ => {
                // Time passes; the timers that fall due fire.
                now += Duration::from_millis(u64::from(script.byte()) * 100);
                let outputs = session.on_timers(now);
                check_sent(&outputs, &session.wire_context());
                note(&mut visited, session.state());
                continue;
            }
        };
        let stop = matches!(event, Event::ManualStop(_));
        let outputs = session.handle(now, event);
        check_sent(&outputs, &session.wire_context());
        note(&mut visited, session.state());
        if stop {
            assert_eq!(
                session.state(),
                State::Idle,
                "ManualStop left the session out of Idle"
            );
        }
    }
    visited
}

fn note(visited: &mut Vec<State>, state: State) {
    if !visited.contains(&state) {
        visited.push(state);
    }
}
