//! The BGP wire layer: our own message types, framing, and the codec.
//!
//! Everything else in the crate speaks these types. The byte-level codec is
//! `netgauze-bgp-pkt`; it is named only in [`convert`] (type conversions) and
//! in [`decode_message`] / [`encode_message`], so it can be swapped without
//! touching the session code.
//!
//! What this module does itself, and why:
//! - [`frame`] splits a byte stream at the 19-byte header and validates the
//!   marker, length and type *before* the codec sees the bytes, so every
//!   header error maps to the exact NOTIFICATION of RFC 4271 §6.1.
//! - [`decode_message`] applies RFC 7606 (revised UPDATE error handling):
//!   a malformed attribute in a received UPDATE turns that UPDATE into a
//!   withdrawal of its NLRI ("treat-as-withdraw") instead of resetting the
//!   session; only errors that make the NLRI unlocatable reset it.
//! - [`builder`] packs many prefixes with the same attributes into as few
//!   UPDATEs as the negotiated message size allows.

pub mod builder;
mod convert;
mod types;

pub use builder::{BuildOptions, Ipv4NlriEncoding, build_announcements, build_withdrawals};
pub use types::*;

use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::wire::deserializer::update::BgpUpdateMessageParsingError;
use netgauze_bgp_pkt::wire::deserializer::{BgpMessageParsingError, BgpParsingContext};
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;

/// Length of the fixed BGP header: 16-octet marker, 2-octet length, 1-octet type.
pub const HEADER_LEN: usize = 19;
/// RFC 4271 §4.1: the largest message without RFC 8654 extended messages.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// RFC 8654: the largest message once extended messages are negotiated.
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;

/// Per-session facts the codec needs in both directions.
///
/// The same context must be used to encode and decode for a round trip:
/// AS_PATH is 2 or 4 octets per AS depending on the 4-octet ASN capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireContext {
    /// Both sides advertised the 4-octet ASN capability (RFC 6793).
    pub four_octet_asn: bool,
    /// Both sides advertised extended messages (RFC 8654): UPDATE,
    /// NOTIFICATION and ROUTE-REFRESH may be up to 65535 octets.
    pub extended_message: bool,
}

impl Default for WireContext {
    /// Before the OPEN exchange nothing is negotiated; 4-octet AS paths are
    /// what every peer we talk to uses, so that is the default for tests.
    fn default() -> Self {
        Self {
            four_octet_asn: true,
            extended_message: false,
        }
    }
}

impl WireContext {
    /// The largest message that may be received or sent for `msg_type`.
    pub fn max_len(&self, msg_type: u8) -> usize {
        match msg_type {
            // RFC 8654 §4: OPEN and KEEPALIVE stay limited to 4096.
            MSG_OPEN | MSG_KEEPALIVE => MAX_MESSAGE_LEN,
            _ if self.extended_message => MAX_EXTENDED_MESSAGE_LEN,
            _ => MAX_MESSAGE_LEN,
        }
    }
}

/// A message decoded from the wire, plus what RFC 7606 handling did to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub message: Message,
    /// Set when the UPDATE was malformed in a way RFC 7606 handles without a
    /// session reset. With [`Rfc7606Action::TreatAsWithdraw`] the returned
    /// UPDATE already carries the affected prefixes as withdrawn and no
    /// attributes.
    pub rfc7606: Option<Rfc7606Action>,
}

/// RFC 7606 §2 approaches that keep the session up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rfc7606Action {
    /// The UPDATE's NLRI are to be handled as withdrawn.
    /// `as_path` is the UPDATE's AS path flattened, when it could be read (so a caller
    /// can tell its own routes reflected back from other peers' malformations).
    TreatAsWithdraw { reason: String, as_path: Vec<u32> },
    /// A malformed optional attribute was dropped; the rest is usable.
    AttributeDiscard { reason: String },
}

/// A received message that cannot be accepted: the NOTIFICATION to send back
/// is [`DecodeError::notification`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// RFC 4271 §6.1: marker not all ones → 1/1.
    #[error("connection not synchronized: bad marker")]
    ConnectionNotSynchronized,
    /// RFC 4271 §6.1: length out of range for the type → 1/2, data = length.
    #[error("bad message length {length} for message type {msg_type}")]
    BadMessageLength { length: u16, msg_type: u8 },
    /// RFC 4271 §6.1: unknown type → 1/3, data = type.
    #[error("bad message type {msg_type}")]
    BadMessageType { msg_type: u8 },
    /// RFC 4271 §6.2 OPEN errors → 2/subcode.
    #[error("malformed OPEN (2/{subcode}): {reason}")]
    Open {
        subcode: u8,
        data: Vec<u8>,
        reason: String,
    },
    /// RFC 4271 §6.3 / RFC 7606 errors that do require a session reset → 3/subcode.
    #[error("malformed UPDATE (3/{subcode}): {reason}")]
    Update {
        subcode: u8,
        data: Vec<u8>,
        reason: String,
    },
    /// RFC 7313 §5: a ROUTE-REFRESH of a bad length → 7/1.
    #[error("malformed ROUTE-REFRESH: {reason}")]
    RouteRefresh { data: Vec<u8>, reason: String },
}

impl DecodeError {
    /// The NOTIFICATION this error calls for.
    pub fn notification(&self) -> Notification {
        match self {
            Self::ConnectionNotSynchronized => Notification::new(
                Notification::MESSAGE_HEADER_ERROR,
                header_error::CONNECTION_NOT_SYNCHRONIZED,
                Vec::new(),
            ),
            Self::BadMessageLength { length, .. } => Notification::new(
                Notification::MESSAGE_HEADER_ERROR,
                header_error::BAD_MESSAGE_LENGTH,
                length.to_be_bytes().to_vec(),
            ),
            Self::BadMessageType { msg_type } => Notification::new(
                Notification::MESSAGE_HEADER_ERROR,
                header_error::BAD_MESSAGE_TYPE,
                vec![*msg_type],
            ),
            Self::Open { subcode, data, .. } => {
                Notification::new(Notification::OPEN_MESSAGE_ERROR, *subcode, data.clone())
            }
            Self::Update { subcode, data, .. } => {
                Notification::new(Notification::UPDATE_MESSAGE_ERROR, *subcode, data.clone())
            }
            Self::RouteRefresh { data, .. } => {
                Notification::new(Notification::ROUTE_REFRESH_MESSAGE_ERROR, 1, data.clone())
            }
        }
    }
}

/// A message we built that the codec refused (a bug on our side, or a value
/// our types can hold that BGP cannot carry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what}: {reason}")]
pub struct EncodeError {
    pub what: &'static str,
    pub reason: String,
}

/// BGP message type codes (RFC 4271 §4.1, RFC 2918).
pub const MSG_OPEN: u8 = 1;
pub const MSG_UPDATE: u8 = 2;
pub const MSG_NOTIFICATION: u8 = 3;
pub const MSG_KEEPALIVE: u8 = 4;
pub const MSG_ROUTE_REFRESH: u8 = 5;

/// Finds the first complete message in `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some(len))` when
/// `buf[..len]` is one whole message whose header is valid, and an error when
/// the header is invalid (the connection must then be closed with
/// [`DecodeError::notification`]; nothing after it can be trusted).
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                                                               |
/// +                           Marker (16)                         +
/// |                                                               |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |          Length               |      Type     |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
pub fn frame(buf: &[u8], ctx: &WireContext) -> Result<Option<usize>, DecodeError> {
    // Check the marker on whatever part of it has arrived, so garbage is
    // rejected at once instead of after 19 bytes.
    let marker_seen = buf.len().min(16);
    if buf[..marker_seen].iter().any(|b| *b != 0xff) {
        return Err(DecodeError::ConnectionNotSynchronized);
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let length = u16::from_be_bytes([buf[16], buf[17]]);
    let msg_type = buf[18];
    // RFC 4271 §6.1: the minimum length depends on the type.
    let min = match msg_type {
        MSG_OPEN => 29,
        MSG_UPDATE => 23,
        MSG_NOTIFICATION => 21,
        MSG_KEEPALIVE => 19,
        MSG_ROUTE_REFRESH => 23,
        other => return Err(DecodeError::BadMessageType { msg_type: other }),
    };
    let len = usize::from(length);
    let bad_len = len < min
        || len > ctx.max_len(msg_type)
        || (msg_type == MSG_KEEPALIVE && len != HEADER_LEN)
        || (msg_type == MSG_ROUTE_REFRESH && len != 23);
    if bad_len {
        return Err(DecodeError::BadMessageLength { length, msg_type });
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(len))
}

/// Decodes one framed message (as returned by [`frame`]).
///
/// UPDATE errors follow RFC 7606: see [`Decoded::rfc7606`]. NOTIFICATIONs
/// with codes the codec does not know are still returned (code, subcode and
/// data taken verbatim), because a NOTIFICATION ends the session whatever it
/// says.
pub fn decode_message(msg: &[u8], ctx: &WireContext) -> Result<Decoded, DecodeError> {
    // Re-validate the header: callers may hand us bytes that did not go
    // through `frame` (the fuzz target does).
    let len = match frame(msg, ctx)? {
        Some(len) if len == msg.len() => len,
        _ => {
            let length = msg
                .get(16..18)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .unwrap_or(0);
            let msg_type = msg.get(18).copied().unwrap_or(0);
            return Err(DecodeError::BadMessageLength { length, msg_type });
        }
    };
    let msg_type = msg[18];
    let body = &msg[HEADER_LEN..len];
    if msg_type == MSG_UPDATE {
        return decode_update(msg, body, ctx);
    }
    let mut nctx = parsing_context(ctx, true);
    match BgpMessage::parse(&mut SliceReader::new(msg), &mut nctx) {
        Ok(m) => Ok(Decoded {
            message: convert::message_from_netgauze(m, ctx),
            rfc7606: None,
        }),
        Err(e) => match msg_type {
            MSG_NOTIFICATION => {
                // Length ≥ 21 was checked by `frame`.
                Ok(Decoded {
                    message: Message::Notification(Notification::new(
                        body[0],
                        body[1],
                        body[2..].to_vec(),
                    )),
                    rfc7606: None,
                })
            }
            MSG_OPEN => Err(open_error(&e, body)),
            // `frame` checked the length (RFC 7313 §5), so the codec only
            // refused an AFI/SAFI it does not know: RFC 7313 says to ignore
            // a refresh for a family that was not negotiated.
            MSG_ROUTE_REFRESH => Ok(Decoded {
                message: Message::RouteRefresh(RouteRefresh {
                    family: None,
                    subtype: body[2],
                }),
                rfc7606: None,
            }),
            _ => Err(DecodeError::Open {
                subcode: 0,
                data: Vec::new(),
                reason: e.to_string(),
            }),
        },
    }
}

fn parsing_context(ctx: &WireContext, strict_attributes: bool) -> BgpParsingContext {
    BgpParsingContext::new(
        ctx.four_octet_asn,
        Default::default(),
        Default::default(),
        // RFC 7606 §5.4 / RFC 4271: non-unicast IPv4 prefixes are logged
        // and ignored rather than fatal; we ignore received routes anyway.
        false,
        false,
        // RFC 5492 §3: unknown or malformed-but-unneeded capabilities are
        // ignored, never a reason to refuse the OPEN.
        false,
        strict_attributes,
    )
}

/// Maps an OPEN the codec refused to RFC 4271 §6.2 subcodes.
fn open_error(e: &BgpMessageParsingError, body: &[u8]) -> DecodeError {
    use netgauze_bgp_pkt::wire::deserializer::open::BgpOpenMessageParsingError as O;
    let reason = e.to_string();
    if let BgpMessageParsingError::BgpOpenMessageParsingError(o) = e {
        match o {
            O::UnsupportedVersionNumber { .. } => {
                // Data: the largest locally supported version (§6.2).
                return DecodeError::Open {
                    subcode: open_error::UNSUPPORTED_VERSION_NUMBER,
                    data: 4u16.to_be_bytes().to_vec(),
                    reason,
                };
            }
            O::UnacceptableHoldTime { .. } => {
                return DecodeError::Open {
                    subcode: open_error::UNACCEPTABLE_HOLD_TIME,
                    data: Vec::new(),
                    reason,
                };
            }
            O::InvalidBgpId { .. } => {
                return DecodeError::Open {
                    subcode: open_error::BAD_BGP_IDENTIFIER,
                    data: Vec::new(),
                    reason,
                };
            }
            O::ParameterError(_) => {
                return DecodeError::Open {
                    subcode: open_error::UNSUPPORTED_OPTIONAL_PARAMETER,
                    data: Vec::new(),
                    reason,
                };
            }
            _ => {}
        }
    }
    // A truncated or otherwise unparseable OPEN: RFC 4271 has no better
    // subcode than 0 (unspecific), which is what FRR and BIRD send too.
    let _ = body;
    DecodeError::Open {
        subcode: 0,
        data: Vec::new(),
        reason,
    }
}

/// Decodes an UPDATE with RFC 7606 error handling.
///
/// ```text
/// +-----------------------------------------------------+
/// |   Withdrawn Routes Length (2 octets)                |
/// +-----------------------------------------------------+
/// |   Withdrawn Routes (variable)                       |
/// +-----------------------------------------------------+
/// |   Total Path Attribute Length (2 octets)            |
/// +-----------------------------------------------------+
/// |   Path Attributes (variable)                        |
/// +-----------------------------------------------------+
/// |   Network Layer Reachability Information (variable) |
/// +-----------------------------------------------------+
/// ```
fn decode_update(msg: &[u8], body: &[u8], ctx: &WireContext) -> Result<Decoded, DecodeError> {
    // RFC 4271 §6.3 / RFC 7606 §5.3 (first bullet): if the two length fields
    // do not fit the message, nothing can be located → 3/1, session reset.
    let malformed_list = |reason: &str| DecodeError::Update {
        subcode: update_error::MALFORMED_ATTRIBUTE_LIST,
        data: Vec::new(),
        reason: reason.to_string(),
    };
    if body.len() < 4 {
        return Err(malformed_list("UPDATE shorter than its length fields"));
    }
    let withdrawn_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if 2 + withdrawn_len + 2 > body.len() {
        return Err(malformed_list(
            "withdrawn routes length overruns the message",
        ));
    }
    let attr_len_at = 2 + withdrawn_len;
    let attr_len = usize::from(u16::from_be_bytes([
        body[attr_len_at],
        body[attr_len_at + 1],
    ]));
    if attr_len_at + 2 + attr_len > body.len() {
        return Err(malformed_list(
            "total path attribute length overruns the message",
        ));
    }

    let mut strict = parsing_context(ctx, true);
    match BgpMessage::parse(&mut SliceReader::new(msg), &mut strict) {
        Ok(m) => {
            let message = convert::message_from_netgauze(m, ctx);
            Ok(check_well_known(message))
        }
        Err(BgpMessageParsingError::BgpUpdateMessageParsingError(e)) => {
            update_error_7606(msg, ctx, e)
        }
        Err(e) => Err(DecodeError::Update {
            subcode: update_error::MALFORMED_ATTRIBUTE_LIST,
            data: Vec::new(),
            reason: e.to_string(),
        }),
    }
}

/// RFC 7606 §3 (d): an UPDATE with NLRI but without ORIGIN, AS_PATH or (for
/// classic NLRI) NEXT_HOP is treated as a withdrawal.
fn check_well_known(message: Message) -> Decoded {
    let Message::Update(update) = message else {
        return Decoded {
            message,
            rfc7606: None,
        };
    };
    let has = |f: fn(&Attribute) -> bool| update.attributes.iter().any(f);
    let mp_nlri = update.attributes.iter().any(|a| match a {
        Attribute::MpReach(MpReach::Ipv4Unicast { nlri, .. }) => !nlri.is_empty(),
        Attribute::MpReach(MpReach::Ipv6Unicast { nlri, .. }) => !nlri.is_empty(),
        _ => false,
    });
    let has_nlri = !update.nlri.is_empty() || mp_nlri;
    let mut missing = Vec::new();
    if has_nlri {
        if !has(|a| matches!(a, Attribute::Origin(_))) {
            missing.push("ORIGIN");
        }
        if !has(|a| matches!(a, Attribute::AsPath(_))) {
            missing.push("AS_PATH");
        }
        if !update.nlri.is_empty() && !has(|a| matches!(a, Attribute::NextHop(_))) {
            missing.push("NEXT_HOP");
        }
    }
    if missing.is_empty() {
        return Decoded {
            message: Message::Update(update),
            rfc7606: None,
        };
    }
    let as_path = flat_as_path(&update.attributes);
    Decoded {
        message: Message::Update(update.into_withdrawal()),
        rfc7606: Some(Rfc7606Action::TreatAsWithdraw {
            reason: format!("missing well-known attribute(s) {}", missing.join(", ")),
            as_path,
        }),
    }
}

/// Every ASN of the AS_PATH attribute, in order (sets included).
fn flat_as_path(attributes: &[Attribute]) -> Vec<u32> {
    attributes
        .iter()
        .filter_map(|a| match a {
            Attribute::AsPath(segments) => Some(segments),
            _ => None,
        })
        .flatten()
        .flat_map(|s| match s {
            AsSegment::Sequence(v) | AsSegment::Set(v) => v.iter().copied(),
        })
        .collect()
}

fn update_error_7606(
    msg: &[u8],
    ctx: &WireContext,
    e: BgpUpdateMessageParsingError,
) -> Result<Decoded, DecodeError> {
    use netgauze_bgp_pkt::wire::deserializer::path_attribute::PathAttributeParsingError as P;
    let reason = e.to_string();
    match &e {
        // RFC 7606 §5.3: MP_REACH_NLRI / MP_UNREACH_NLRI that cannot be
        // parsed hide which prefixes are meant → session reset (3/9, the
        // optional-attribute error those attributes belong to).
        BgpUpdateMessageParsingError::PathAttributeError(
            P::MpReachErrorError(_) | P::MpUnreachErrorError(_),
        ) => Err(DecodeError::Update {
            subcode: update_error::OPTIONAL_ATTRIBUTE_ERROR,
            data: Vec::new(),
            reason,
        }),
        // Any other attribute error: RFC 7606 §7 says treat-as-withdraw for
        // the attributes that affect route selection (ORIGIN, AS_PATH,
        // NEXT_HOP, MED, LOCAL_PREF, communities, ...). Re-parse leniently
        // to find the NLRI to withdraw.
        BgpUpdateMessageParsingError::PathAttributeError(_) => {
            match salvage_update(msg, ctx) {
                Ok(m) => {
                    let Message::Update(update) = convert::message_from_netgauze(m, ctx) else {
                        return Err(DecodeError::Update {
                            subcode: update_error::MALFORMED_ATTRIBUTE_LIST,
                            data: Vec::new(),
                            reason,
                        });
                    };
                    let as_path = flat_as_path(&update.attributes);
                    Ok(Decoded {
                        message: Message::Update(update.into_withdrawal()),
                        rfc7606: Some(Rfc7606Action::TreatAsWithdraw { reason, as_path }),
                    })
                }
                // The NLRI itself (or MP_REACH/MP_UNREACH) is broken: the
                // prefixes cannot be located, so the session must reset.
                Err(e2) => Err(DecodeError::Update {
                    subcode: update_error::MALFORMED_ATTRIBUTE_LIST,
                    data: Vec::new(),
                    reason: format!("{reason}; {e2}"),
                }),
            }
        }
        // RFC 4271 §6.3 / RFC 7606 §5.3: unparseable NLRI → 3/10.
        BgpUpdateMessageParsingError::Ipv4PrefixError(_)
        | BgpUpdateMessageParsingError::InvalidIpv4UnicastNetwork { .. } => {
            Err(DecodeError::Update {
                subcode: update_error::INVALID_NETWORK_FIELD,
                data: Vec::new(),
                reason,
            })
        }
        BgpUpdateMessageParsingError::Parse(_) => Err(DecodeError::Update {
            subcode: update_error::MALFORMED_ATTRIBUTE_LIST,
            data: Vec::new(),
            reason,
        }),
    }
}

/// RFC 7606 §5: find the NLRI of an UPDATE whose attributes are partly
/// malformed. Walks the attribute framing (flags, type, length — the part
/// RFC 7606 §4 requires a receiver to check) and re-parses, through the
/// codec, an UPDATE holding only the withdrawn routes, MP_REACH_NLRI,
/// MP_UNREACH_NLRI and the NLRI. If the framing overruns (RFC 7606 §4),
/// only the classic fields are kept.
fn salvage_update(msg: &[u8], ctx: &WireContext) -> Result<BgpMessage, BgpMessageParsingError> {
    const ATTR_MP_REACH: u8 = 14;
    const ATTR_MP_UNREACH: u8 = 15;
    let body = &msg[HEADER_LEN..];
    // Lengths were validated by `decode_update`.
    let wlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let attrs_at = 2 + wlen + 2;
    let alen = usize::from(u16::from_be_bytes([body[2 + wlen], body[3 + wlen]]));
    let attrs = &body[attrs_at..attrs_at + alen];
    let nlri = &body[attrs_at + alen..];
    let mut kept = Vec::new();
    let mut at = 0;
    // Each pass advances by at least 3 octets or stops.
    while at + 3 <= attrs.len() {
        let flags = attrs[at];
        let code = attrs[at + 1];
        let (hdr, len) = if flags & 0x10 != 0 {
            if at + 4 > attrs.len() {
                break;
            }
            (
                4,
                usize::from(u16::from_be_bytes([attrs[at + 2], attrs[at + 3]])),
            )
        } else {
            (3, usize::from(attrs[at + 2]))
        };
        let end = at + hdr + len;
        if end > attrs.len() {
            break;
        }
        if code == ATTR_MP_REACH || code == ATTR_MP_UNREACH {
            kept.extend_from_slice(&attrs[at..end]);
        }
        at = end;
    }
    let mut out = Vec::with_capacity(msg.len());
    out.extend_from_slice(&[0xff; 16]);
    let total = HEADER_LEN + 2 + wlen + 2 + kept.len() + nlri.len();
    out.extend_from_slice(&(total.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.push(MSG_UPDATE);
    out.extend_from_slice(&body[..2 + wlen]);
    out.extend_from_slice(&(kept.len() as u16).to_be_bytes());
    out.extend_from_slice(&kept);
    out.extend_from_slice(nlri);
    // The salvaged message is never longer than the original one.
    let mut strict = parsing_context(ctx, true);
    BgpMessage::parse(&mut SliceReader::new(&out), &mut strict)
}

/// Encodes a message, checking it against the size limit of `ctx`.
pub fn encode_message(msg: &Message, ctx: &WireContext) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(msg, ctx, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `msg` to `out` (no partial write on error).
pub fn encode_into(msg: &Message, ctx: &WireContext, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let ng = convert::message_to_netgauze(msg, ctx)?;
    let len = ng.len();
    if len > ctx.max_len(msg.msg_type()) {
        return Err(EncodeError {
            what: msg.name(),
            reason: format!(
                "{len} octets exceed the {} allowed",
                ctx.max_len(msg.msg_type())
            ),
        });
    }
    let start = out.len();
    out.reserve(len);
    if let Err(e) = ng.write(out) {
        out.truncate(start);
        return Err(EncodeError {
            what: msg.name(),
            reason: e.to_string(),
        });
    }
    Ok(())
}

/// The decode path as one function for `cargo fuzz` (crates/bgp/fuzz): frame
/// then decode every message in `data`, under both AS-number widths and both
/// size limits. It must never panic, whatever the input.
pub fn fuzz_decode(data: &[u8]) {
    for four_octet_asn in [true, false] {
        for extended_message in [false, true] {
            let ctx = WireContext {
                four_octet_asn,
                extended_message,
            };
            let mut rest = data;
            // Each iteration consumes ≥ 19 bytes, so this is bounded.
            while let Ok(Some(len)) = frame(rest, &ctx) {
                let (one, tail) = rest.split_at(len);
                if let Ok(decoded) = decode_message(one, &ctx) {
                    // Whatever decodes must re-encode without panicking.
                    let _ = encode_message(&decoded.message, &ctx);
                }
                rest = tail;
            }
        }
    }
}

#[cfg(test)]
mod tests;
