//! The BFD Control packet (RFC 5880 §4.1) and the reception checks of §6.8.6 that
//! need nothing but the packet itself.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       My Discriminator                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                      Your Discriminator                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Desired Min TX Interval                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   Required Min RX Interval                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Required Min Echo RX Interval                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   Auth Type   |   Auth Len    |    Authentication Data...     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Intervals are in microseconds on the wire, as here.

use std::fmt;

/// The only BFD version (RFC 5880 §4.1).
pub const VERSION: u8 = 1;
/// The mandatory section's length; with authentication a packet is at least 26.
pub const MANDATORY_LEN: usize = 24;
const MIN_LEN_WITH_AUTH: usize = 26;

/// bfd.SessionState and the packet's State field (RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> Self {
        match b & 0b11 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        })
    }
}

/// The Diagnostic field (RFC 5880 §4.1): why the session last left Up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Diagnostic {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// 9–31: reserved; kept so a packet is shown as received.
    Reserved(u8),
}

impl Diagnostic {
    pub fn code(self) -> u8 {
        match self {
            Diagnostic::None => 0,
            Diagnostic::ControlDetectionTimeExpired => 1,
            Diagnostic::EchoFunctionFailed => 2,
            Diagnostic::NeighborSignaledSessionDown => 3,
            Diagnostic::ForwardingPlaneReset => 4,
            Diagnostic::PathDown => 5,
            Diagnostic::ConcatenatedPathDown => 6,
            Diagnostic::AdministrativelyDown => 7,
            Diagnostic::ReverseConcatenatedPathDown => 8,
            Diagnostic::Reserved(c) => c & 0x1f,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c & 0x1f {
            0 => Diagnostic::None,
            1 => Diagnostic::ControlDetectionTimeExpired,
            2 => Diagnostic::EchoFunctionFailed,
            3 => Diagnostic::NeighborSignaledSessionDown,
            4 => Diagnostic::ForwardingPlaneReset,
            5 => Diagnostic::PathDown,
            6 => Diagnostic::ConcatenatedPathDown,
            7 => Diagnostic::AdministrativelyDown,
            8 => Diagnostic::ReverseConcatenatedPathDown,
            c => Diagnostic::Reserved(c),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::None => f.write_str("no diagnostic"),
            Diagnostic::ControlDetectionTimeExpired => {
                f.write_str("control detection time expired")
            }
            Diagnostic::EchoFunctionFailed => f.write_str("echo function failed"),
            Diagnostic::NeighborSignaledSessionDown => {
                f.write_str("neighbor signaled session down")
            }
            Diagnostic::ForwardingPlaneReset => f.write_str("forwarding plane reset"),
            Diagnostic::PathDown => f.write_str("path down"),
            Diagnostic::ConcatenatedPathDown => f.write_str("concatenated path down"),
            Diagnostic::AdministrativelyDown => f.write_str("administratively down"),
            Diagnostic::ReverseConcatenatedPathDown => {
                f.write_str("reverse concatenated path down")
            }
            Diagnostic::Reserved(c) => write!(f, "diagnostic {c}"),
        }
    }
}

/// One Control packet's mandatory section. Herald never sends authentication, and a
/// received packet with the A bit is refused (§6.8.6: no authentication is in use), so
/// the authentication section is not modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPacket {
    pub diag: Diagnostic,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    /// Control Plane Independent.
    pub cpi: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    /// Microseconds; 0 asks the remote not to send periodic packets.
    pub required_min_rx: u32,
    /// Microseconds; Herald does not run the Echo function and sends 0.
    pub required_min_echo_rx: u32,
}

/// Why a received packet was discarded (RFC 5880 §6.8.6). Discarding is all that
/// happens: a bad packet never changes a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet is {0} bytes, shorter than the 24-byte Control packet")]
    TooShort(usize),
    #[error("version {0}, only version 1 exists")]
    Version(u8),
    #[error("Length field {length} but {received} bytes received")]
    LengthExceedsPayload { length: u8, received: usize },
    #[error("Length field {length} is below the minimum {minimum}")]
    LengthTooSmall { length: u8, minimum: usize },
    #[error("Detect Mult is zero")]
    ZeroDetectMult,
    #[error("Multipoint bit set")]
    Multipoint,
    #[error("My Discriminator is zero")]
    ZeroMyDiscriminator,
    #[error("Your Discriminator is zero in state {0}")]
    ZeroYourDiscriminator(State),
    #[error("authentication present, but none is configured")]
    Authentication,
    #[error("both Poll and Final bits set")]
    PollAndFinal,
}

const FLAG_P: u8 = 0x20;
const FLAG_F: u8 = 0x10;
const FLAG_C: u8 = 0x08;
const FLAG_A: u8 = 0x04;
const FLAG_D: u8 = 0x02;
const FLAG_M: u8 = 0x01;

impl ControlPacket {
    /// Decodes and checks a received packet. Every check of §6.8.6 that the packet alone
    /// decides is made here; the session makes the rest (which session it belongs to).
    pub fn decode(buf: &[u8]) -> Result<ControlPacket, PacketError> {
        if buf.len() < MANDATORY_LEN {
            return Err(PacketError::TooShort(buf.len()));
        }
        let version = buf[0] >> 5;
        if version != VERSION {
            return Err(PacketError::Version(version));
        }
        let flags = buf[1];
        let auth = flags & FLAG_A != 0;
        let length = buf[3];
        let minimum = if auth {
            MIN_LEN_WITH_AUTH
        } else {
            MANDATORY_LEN
        };
        if usize::from(length) < minimum {
            return Err(PacketError::LengthTooSmall { length, minimum });
        }
        if usize::from(length) > buf.len() {
            return Err(PacketError::LengthExceedsPayload {
                length,
                received: buf.len(),
            });
        }
        let detect_mult = buf[2];
        if detect_mult == 0 {
            return Err(PacketError::ZeroDetectMult);
        }
        if flags & FLAG_M != 0 {
            return Err(PacketError::Multipoint);
        }
        let word = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let my_disc = word(4);
        if my_disc == 0 {
            return Err(PacketError::ZeroMyDiscriminator);
        }
        let state = State::from_bits(flags >> 6);
        let your_disc = word(8);
        if your_disc == 0 && !matches!(state, State::Down | State::AdminDown) {
            return Err(PacketError::ZeroYourDiscriminator(state));
        }
        if auth {
            return Err(PacketError::Authentication);
        }
        let poll = flags & FLAG_P != 0;
        let final_ = flags & FLAG_F != 0;
        if poll && final_ {
            return Err(PacketError::PollAndFinal);
        }
        Ok(ControlPacket {
            diag: Diagnostic::from_code(buf[0]),
            state,
            poll,
            final_,
            cpi: flags & FLAG_C != 0,
            demand: flags & FLAG_D != 0,
            detect_mult,
            my_disc,
            your_disc,
            desired_min_tx: word(12),
            required_min_rx: word(16),
            required_min_echo_rx: word(20),
        })
    }

    /// The 24 bytes on the wire.
    pub fn encode(&self) -> [u8; MANDATORY_LEN] {
        let mut b = [0u8; MANDATORY_LEN];
        b[0] = (VERSION << 5) | self.diag.code();
        let mut flags = (self.state as u8) << 6;
        for (set, bit) in [
            (self.poll, FLAG_P),
            (self.final_, FLAG_F),
            (self.cpi, FLAG_C),
            (self.demand, FLAG_D),
        ] {
            if set {
                flags |= bit;
            }
        }
        b[1] = flags;
        b[2] = self.detect_mult;
        b[3] = MANDATORY_LEN as u8;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> ControlPacket {
        ControlPacket {
            diag: Diagnostic::None,
            state: State::Up,
            poll: false,
            final_: true,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 0x0102_0304,
            your_disc: 0x0a0b_0c0d,
            desired_min_tx: 300_000,
            required_min_rx: 300_000,
            required_min_echo_rx: 0,
        }
    }

    /// The packet `up()`, laid out by hand from RFC 5880 §4.1.
    const UP_BYTES: [u8; 24] = [
        0x20, 0xd0, 0x03, 0x18, // v1, diag 0; Up, F; mult 3; length 24
        0x01, 0x02, 0x03, 0x04, // my
        0x0a, 0x0b, 0x0c, 0x0d, // your
        0x00, 0x04, 0x93, 0xe0, // 300 000 µs
        0x00, 0x04, 0x93, 0xe0, // 300 000 µs
        0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn bytes_and_packet_agree_both_ways() {
        assert_eq!(up().encode(), UP_BYTES);
        assert_eq!(ControlPacket::decode(&UP_BYTES), Ok(up()));
    }

    #[test]
    fn diagnostic_and_state_round_trip() {
        for code in 0..32u8 {
            let mut p = up();
            p.diag = Diagnostic::from_code(code);
            p.state = State::Down;
            p.final_ = false;
            p.poll = true;
            assert_eq!(ControlPacket::decode(&p.encode()), Ok(p));
            assert_eq!(p.diag.code(), code);
        }
    }

    #[test]
    fn trailing_bytes_beyond_length_are_ignored() {
        let mut long = UP_BYTES.to_vec();
        long.extend_from_slice(&[0xff; 8]);
        assert_eq!(ControlPacket::decode(&long), Ok(up()));
    }

    /// Every discard rule of RFC 5880 §6.8.6 the packet alone decides.
    #[test]
    fn invalid_packets_are_refused_with_the_rule_they_break() {
        let with = |f: &dyn Fn(&mut [u8; 24])| {
            let mut b = UP_BYTES;
            f(&mut b);
            ControlPacket::decode(&b)
        };
        assert_eq!(
            ControlPacket::decode(&UP_BYTES[..23]),
            Err(PacketError::TooShort(23))
        );
        assert_eq!(with(&|b| b[0] = 0x40), Err(PacketError::Version(2)));
        assert_eq!(with(&|b| b[0] = 0x00), Err(PacketError::Version(0)));
        assert_eq!(
            with(&|b| b[3] = 23),
            Err(PacketError::LengthTooSmall {
                length: 23,
                minimum: 24
            })
        );
        assert_eq!(
            with(&|b| b[3] = 25),
            Err(PacketError::LengthExceedsPayload {
                length: 25,
                received: 24
            })
        );
        assert_eq!(
            with(&|b| {
                b[1] |= FLAG_A;
                b[3] = 24;
            }),
            Err(PacketError::LengthTooSmall {
                length: 24,
                minimum: 26
            })
        );
        let mut auth = UP_BYTES.to_vec();
        auth.extend_from_slice(&[1, 2]);
        auth[1] |= FLAG_A;
        auth[3] = 26;
        assert_eq!(
            ControlPacket::decode(&auth),
            Err(PacketError::Authentication)
        );
        assert_eq!(with(&|b| b[2] = 0), Err(PacketError::ZeroDetectMult));
        assert_eq!(with(&|b| b[1] |= FLAG_M), Err(PacketError::Multipoint));
        assert_eq!(
            with(&|b| b[4..8].fill(0)),
            Err(PacketError::ZeroMyDiscriminator)
        );
        assert_eq!(
            with(&|b| b[8..12].fill(0)),
            Err(PacketError::ZeroYourDiscriminator(State::Up))
        );
        assert_eq!(with(&|b| b[1] |= FLAG_P), Err(PacketError::PollAndFinal));
        // Your Discriminator may be zero while the sender is Down or AdminDown.
        for state in [0x40u8, 0x00] {
            let p = with(&|b| {
                b[1] = state;
                b[8..12].fill(0);
            });
            assert!(p.is_ok(), "{p:?}");
        }
    }
}
