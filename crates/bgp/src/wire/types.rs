//! Our own BGP message types. Only the parts Herald uses are modelled in
//! detail; anything else a peer sends is kept opaque ([`OtherCapability`],
//! [`OtherAttribute`]) so it survives a decode/encode round trip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{MSG_KEEPALIVE, MSG_NOTIFICATION, MSG_OPEN, MSG_ROUTE_REFRESH, MSG_UPDATE};

/// The address families Herald speaks: unicast IPv4 and IPv6 (RFC 4760).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

impl Family {
    /// The family a prefix belongs to.
    pub fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::Ipv4Unicast,
            IpNet::V6(_) => Family::Ipv6Unicast,
        }
    }

    /// (AFI, SAFI) as on the wire.
    pub const fn afi_safi(self) -> (u16, u8) {
        match self {
            Family::Ipv4Unicast => (1, 1),
            Family::Ipv6Unicast => (2, 1),
        }
    }
}

/// A BGP message (RFC 4271 §4).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

impl Message {
    /// The type octet of the header.
    pub const fn msg_type(&self) -> u8 {
        match self {
            Message::Open(_) => MSG_OPEN,
            Message::Update(_) => MSG_UPDATE,
            Message::Notification(_) => MSG_NOTIFICATION,
            Message::Keepalive => MSG_KEEPALIVE,
            Message::RouteRefresh(_) => MSG_ROUTE_REFRESH,
        }
    }

    /// The RFC name of the message, for logs and errors.
    pub const fn name(&self) -> &'static str {
        match self {
            Message::Open(_) => "OPEN",
            Message::Update(_) => "UPDATE",
            Message::Notification(_) => "NOTIFICATION",
            Message::Keepalive => "KEEPALIVE",
            Message::RouteRefresh(_) => "ROUTE-REFRESH",
        }
    }
}

/// AS_TRANS (RFC 6793): the 2-octet "My Autonomous System" of a speaker
/// whose ASN does not fit.
pub const AS_TRANS: u16 = 23456;

/// OPEN message (RFC 4271 §4.2). Version is always 4.
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+
/// |    Version    |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |     My Autonomous System      |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |           Hold Time           |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                         BGP Identifier                        |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// | Opt Parm Len  |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |             Optional Parameters (variable)                    |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The 2-octet field; [`AS_TRANS`] when the real ASN needs 4 octets.
    pub my_as: u16,
    /// Seconds; 0 or ≥ 3.
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    /// All capabilities, in order, from all Capabilities parameters (RFC 5492).
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// Builds an OPEN for `asn`, filling `my_as` (AS_TRANS when needed) and
    /// adding the 4-octet ASN capability in front of `capabilities`.
    pub fn new(
        asn: u32,
        hold_time: u16,
        router_id: Ipv4Addr,
        capabilities: Vec<Capability>,
    ) -> Open {
        let my_as = u16::try_from(asn).unwrap_or(AS_TRANS);
        let mut caps = vec![Capability::FourOctetAsn(asn)];
        caps.extend(
            capabilities
                .into_iter()
                .filter(|c| !matches!(c, Capability::FourOctetAsn(_))),
        );
        Open {
            my_as,
            hold_time,
            router_id,
            capabilities: caps,
        }
    }

    /// The sender's ASN: from the 4-octet ASN capability when present.
    pub fn asn(&self) -> u32 {
        self.four_octet_asn().unwrap_or(u32::from(self.my_as))
    }

    /// The 4-octet ASN capability value, if advertised.
    pub fn four_octet_asn(&self) -> Option<u32> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::FourOctetAsn(a) => Some(*a),
            _ => None,
        })
    }

    /// The families advertised with the MP capability. RFC 4760 §8: a
    /// speaker that advertises no MP capability at all supports IPv4
    /// unicast only.
    pub fn families(&self) -> Vec<Family> {
        let mut v: Vec<Family> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::MultiProtocol(f) => Some(*f),
                _ => None,
            })
            .collect();
        let any_mp = self.capabilities.iter().any(|c| {
            matches!(c, Capability::MultiProtocol(_))
                || matches!(c, Capability::Other(o) if o.code() == 1)
        });
        if !any_mp {
            v.push(Family::Ipv4Unicast);
        }
        v.sort();
        v.dedup();
        v
    }

    pub fn has(&self, f: impl Fn(&Capability) -> bool) -> bool {
        self.capabilities.iter().any(f)
    }

    /// The graceful restart capability, if advertised.
    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(gr) => Some(gr),
            _ => None,
        })
    }
}

/// A capability (RFC 5492) in an OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1, RFC 4760.
    MultiProtocol(Family),
    /// Code 2, RFC 2918.
    RouteRefresh,
    /// Code 5, RFC 8950.
    ExtendedNextHop(Vec<ExtendedNextHop>),
    /// Code 6, RFC 8654.
    ExtendedMessage,
    /// Code 64, RFC 4724.
    GracefulRestart(GracefulRestart),
    /// Code 65, RFC 6793.
    FourOctetAsn(u32),
    /// Anything else (FQDN, ADD-PATH, enhanced route refresh, unknown codes,
    /// MP for families we do not speak): kept opaque and ignored.
    Other(OtherCapability),
}

/// A capability Herald does not interpret. Carries the codec's value so it
/// re-encodes exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherCapability(pub(super) netgauze_bgp_pkt::capabilities::BgpCapability);

impl OtherCapability {
    /// The capability code (e.g. 73 for FQDN).
    pub fn code(&self) -> u8 {
        match self.0.code() {
            Ok(c) => c as u8,
            Err(c) => c,
        }
    }

    /// An unknown capability with raw `code` and `value`, e.g. to test that
    /// peers sending it are accepted.
    pub fn unknown(code: u8, value: Vec<u8>) -> OtherCapability {
        OtherCapability(netgauze_bgp_pkt::capabilities::BgpCapability::Unrecognized(
            netgauze_bgp_pkt::capabilities::UnrecognizedCapability::new(code, value),
        ))
    }
}

/// RFC 8950: "IPv4 NLRI may be sent with an IPv6 next hop".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedNextHop {
    pub family: Family,
    /// AFI of the next hop (1 = IPv4, 2 = IPv6).
    pub next_hop_afi: u16,
}

/// Graceful restart capability (RFC 4724 §3).
///
/// ```text
/// +--------------------------------------------------+
/// | Restart Flags (4 bits)                           |
/// +--------------------------------------------------+
/// | Restart Time in seconds (12 bits)                |
/// +--------------------------------------------------+
/// | Address Family Identifier (16 bits)              |
/// +--------------------------------------------------+
/// | Subsequent Address Family Identifier (8 bits)    |
/// +--------------------------------------------------+
/// | Flags for Address Family (8 bits)                |
/// +--------------------------------------------------+
/// | ...                                              |
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// N bit (RFC 8538): graceful NOTIFICATION support.
    pub notification: bool,
    /// Seconds (12 bits).
    pub restart_time: u16,
    pub families: Vec<GracefulRestartFamily>,
}

/// One family of the graceful restart capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulRestartFamily {
    pub family: Family,
    /// F bit: forwarding state was preserved across the restart.
    pub forwarding_preserved: bool,
}

/// UPDATE message (RFC 4271 §4.3).
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    /// Classic IPv4 withdrawn routes.
    pub withdrawn: Vec<Ipv4Net>,
    pub attributes: Vec<Attribute>,
    /// Classic IPv4 NLRI.
    pub nlri: Vec<Ipv4Net>,
}

impl Update {
    /// The End-of-RIB marker for `family` (RFC 4724 §2): an empty UPDATE for
    /// IPv4 unicast, an UPDATE with an empty MP_UNREACH_NLRI otherwise.
    pub fn end_of_rib(family: Family) -> Update {
        match family {
            Family::Ipv4Unicast => Update::default(),
            Family::Ipv6Unicast => Update {
                attributes: vec![Attribute::MpUnreach(MpUnreach::Ipv6Unicast(Vec::new()))],
                ..Update::default()
            },
        }
    }

    /// `Some(family)` if this UPDATE is an End-of-RIB marker.
    pub fn as_end_of_rib(&self) -> Option<Family> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() {
            return None;
        }
        match self.attributes.as_slice() {
            [] => Some(Family::Ipv4Unicast),
            [Attribute::MpUnreach(MpUnreach::Ipv4Unicast(v))] if v.is_empty() => {
                Some(Family::Ipv4Unicast)
            }
            [Attribute::MpUnreach(MpUnreach::Ipv6Unicast(v))] if v.is_empty() => {
                Some(Family::Ipv6Unicast)
            }
            _ => None,
        }
    }

    /// Every prefix this UPDATE announces (classic and MP_REACH).
    pub fn announced(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.nlri.iter().map(|n| IpNet::V4(*n)).collect();
        for a in &self.attributes {
            match a {
                Attribute::MpReach(MpReach::Ipv4Unicast { nlri, .. }) => {
                    v.extend(nlri.iter().map(|n| IpNet::V4(*n)))
                }
                Attribute::MpReach(MpReach::Ipv6Unicast { nlri, .. }) => {
                    v.extend(nlri.iter().map(|n| IpNet::V6(*n)))
                }
                _ => {}
            }
        }
        v
    }

    /// Every prefix this UPDATE withdraws (classic and MP_UNREACH).
    pub fn withdrawn_all(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.withdrawn.iter().map(|n| IpNet::V4(*n)).collect();
        for a in &self.attributes {
            match a {
                Attribute::MpUnreach(MpUnreach::Ipv4Unicast(nlri)) => {
                    v.extend(nlri.iter().map(|n| IpNet::V4(*n)))
                }
                Attribute::MpUnreach(MpUnreach::Ipv6Unicast(nlri)) => {
                    v.extend(nlri.iter().map(|n| IpNet::V6(*n)))
                }
                _ => {}
            }
        }
        v
    }

    /// RFC 7606 treat-as-withdraw: every announced prefix becomes a
    /// withdrawn one, and the attributes are dropped.
    pub fn into_withdrawal(self) -> Update {
        let mut v4: Vec<Ipv4Net> = self.withdrawn.clone();
        let mut v6: Vec<Ipv6Net> = Vec::new();
        for p in self.announced().into_iter().chain(self.withdrawn_all()) {
            match p {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        v4.sort();
        v4.dedup();
        v6.sort();
        v6.dedup();
        let attributes = if v6.is_empty() {
            Vec::new()
        } else {
            vec![Attribute::MpUnreach(MpUnreach::Ipv6Unicast(v6))]
        };
        Update {
            withdrawn: v4,
            attributes,
            nlri: Vec::new(),
        }
    }
}

/// A path attribute (RFC 4271 §5 and extensions). AS numbers are always
/// held as 4 octets; the wire width follows [`super::WireContext`].
#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    /// Type 1.
    Origin(Origin),
    /// Type 2.
    AsPath(Vec<AsSegment>),
    /// Type 3.
    NextHop(Ipv4Addr),
    /// Type 4.
    Med(u32),
    /// Type 5.
    LocalPref(u32),
    /// Type 8 (RFC 1997): each value is ASN:value in 32 bits.
    Communities(Vec<u32>),
    /// Type 32 (RFC 8092).
    LargeCommunities(Vec<LargeCommunity>),
    /// Type 14 (RFC 4760).
    MpReach(MpReach),
    /// Type 15 (RFC 4760).
    MpUnreach(MpUnreach),
    /// Any other attribute, kept opaque.
    Other(OtherAttribute),
}

/// An attribute Herald does not interpret.
#[derive(Debug, Clone, PartialEq)]
pub struct OtherAttribute(pub(super) netgauze_bgp_pkt::path_attribute::PathAttribute);

impl OtherAttribute {
    /// The attribute type code.
    pub fn type_code(&self) -> u8 {
        match self.0.path_attribute_type() {
            Ok(t) => t as u8,
            Err(c) => c,
        }
    }
}

/// ORIGIN values (RFC 4271 §5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

/// One AS_PATH segment (RFC 4271 §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsSegment {
    Sequence(Vec<u32>),
    Set(Vec<u32>),
}

/// A large community (RFC 8092).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    pub global_admin: u32,
    pub local_data1: u32,
    pub local_data2: u32,
}

/// MP_REACH_NLRI for the families Herald speaks (RFC 4760 §3).
///
/// ```text
/// +---------------------------------------------------------+
/// | Address Family Identifier (2 octets)                    |
/// +---------------------------------------------------------+
/// | Subsequent Address Family Identifier (1 octet)          |
/// +---------------------------------------------------------+
/// | Length of Next Hop Network Address (1 octet)            |
/// +---------------------------------------------------------+
/// | Network Address of Next Hop (variable)                  |
/// +---------------------------------------------------------+
/// | Reserved (1 octet)                                      |
/// +---------------------------------------------------------+
/// | Network Layer Reachability Information (variable)       |
/// +---------------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpReach {
    /// IPv4 NLRI; the next hop is IPv4, or IPv6 with RFC 8950.
    Ipv4Unicast {
        next_hop: IpAddr,
        nlri: Vec<Ipv4Net>,
    },
    /// IPv6 NLRI with a global and optional link-local next hop (RFC 2545).
    Ipv6Unicast {
        next_hop: Ipv6Addr,
        link_local: Option<Ipv6Addr>,
        nlri: Vec<Ipv6Net>,
    },
}

/// MP_UNREACH_NLRI for the families Herald speaks (RFC 4760 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpUnreach {
    Ipv4Unicast(Vec<Ipv4Net>),
    Ipv6Unicast(Vec<Ipv6Net>),
}

/// NOTIFICATION message (RFC 4271 §4.5).
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// | Error code    | Error subcode |   Data (variable)             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// Subcodes of error code 1 (RFC 4271 §4.5).
pub mod header_error {
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;
}

/// Subcodes of error code 2 (RFC 4271 §4.5, RFC 5492).
pub mod open_error {
    pub const UNSUPPORTED_VERSION_NUMBER: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
}

/// Subcodes of error code 3 (RFC 4271 §4.5).
pub mod update_error {
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE: u8 = 2;
    pub const MISSING_WELL_KNOWN_ATTRIBUTE: u8 = 3;
    pub const ATTRIBUTE_FLAGS_ERROR: u8 = 4;
    pub const ATTRIBUTE_LENGTH_ERROR: u8 = 5;
    pub const INVALID_ORIGIN_ATTRIBUTE: u8 = 6;
    pub const INVALID_NEXT_HOP_ATTRIBUTE: u8 = 8;
    pub const OPTIONAL_ATTRIBUTE_ERROR: u8 = 9;
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;
}

/// Subcodes of error code 5 (RFC 6608).
pub mod fsm_error {
    pub const UNSPECIFIED: u8 = 0;
    pub const UNEXPECTED_IN_OPEN_SENT: u8 = 1;
    pub const UNEXPECTED_IN_OPEN_CONFIRM: u8 = 2;
    pub const UNEXPECTED_IN_ESTABLISHED: u8 = 3;
}

/// Subcodes of error code 6 (RFC 4486).
pub mod cease {
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    pub const CONNECTION_COLLISION_RESOLUTION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;
    pub const HARD_RESET: u8 = 9;
    /// RFC 9384.
    pub const BFD_DOWN: u8 = 10;
}

impl Notification {
    pub const MESSAGE_HEADER_ERROR: u8 = 1;
    pub const OPEN_MESSAGE_ERROR: u8 = 2;
    pub const UPDATE_MESSAGE_ERROR: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM_ERROR: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH_MESSAGE_ERROR: u8 = 7;

    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Notification {
        Notification {
            code,
            subcode,
            data,
        }
    }

    /// Cease / Administrative Shutdown with an RFC 8203 / RFC 9003
    /// shutdown communication (UTF-8, at most 255 octets, cut at a
    /// character boundary).
    pub fn administrative_shutdown(message: &str) -> Notification {
        Self::cease_with_message(cease::ADMINISTRATIVE_SHUTDOWN, message)
    }

    /// Cease / Hard Reset (RFC 8538 §3) wrapping `inner`: the data is the
    /// inner code, subcode and data.
    pub fn hard_reset(inner: &Notification) -> Notification {
        let mut data = Vec::with_capacity(2 + inner.data.len());
        data.push(inner.code);
        data.push(inner.subcode);
        data.extend_from_slice(&inner.data);
        Self::new(Self::CEASE, cease::HARD_RESET, data)
    }

    /// Cease with `subcode` and an RFC 9003 shutdown communication (valid
    /// for subcodes 2 and 4).
    pub fn cease_with_message(subcode: u8, message: &str) -> Notification {
        let mut end = message.len().min(255);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let text = &message.as_bytes()[..end];
        let mut data = Vec::with_capacity(1 + text.len());
        if !text.is_empty() {
            data.push(text.len() as u8);
            data.extend_from_slice(text);
        }
        Notification::new(Self::CEASE, subcode, data)
    }

    /// The RFC 8203 / RFC 9003 shutdown communication, if this is a Cease
    /// (admin shutdown or reset) carrying one.
    pub fn shutdown_message(&self) -> Option<String> {
        if self.code != Self::CEASE {
            return None;
        }
        let data = match self.subcode {
            cease::ADMINISTRATIVE_SHUTDOWN | cease::ADMINISTRATIVE_RESET => &self.data[..],
            // RFC 8538 §3: the wrapped Cease's own data follows its code and subcode.
            cease::HARD_RESET => match self.data.as_slice() {
                [Self::CEASE, sub, rest @ ..]
                    if *sub == cease::ADMINISTRATIVE_SHUTDOWN
                        || *sub == cease::ADMINISTRATIVE_RESET =>
                {
                    rest
                }
                _ => return None,
            },
            _ => return None,
        };
        let (len, rest) = data.split_first()?;
        let text = rest.get(..usize::from(*len))?;
        Some(String::from_utf8_lossy(text).into_owned())
    }

    /// A short human description, e.g. `"6/2 cease: administrative shutdown"`.
    pub fn describe(&self) -> String {
        let what = match (self.code, self.subcode) {
            (1, 1) => "message header error: connection not synchronized",
            (1, 2) => "message header error: bad message length",
            (1, 3) => "message header error: bad message type",
            (1, _) => "message header error",
            (2, 1) => "OPEN error: unsupported version number",
            (2, 2) => "OPEN error: bad peer AS",
            (2, 3) => "OPEN error: bad BGP identifier",
            (2, 4) => "OPEN error: unsupported optional parameter",
            (2, 6) => "OPEN error: unacceptable hold time",
            (2, 7) => "OPEN error: unsupported capability",
            (2, _) => "OPEN error",
            (3, _) => "UPDATE error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 1) => "cease: maximum number of prefixes reached",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 6) => "cease: other configuration change",
            (6, 7) => "cease: connection collision resolution",
            (6, 8) => "cease: out of resources",
            (6, 9) => "cease: hard reset",
            (6, _) => "cease",
            (7, _) => "ROUTE-REFRESH error",
            _ => "unknown error code",
        };
        match self.shutdown_message() {
            Some(m) => format!("{}/{} {what}: \"{m}\"", self.code, self.subcode),
            None => format!("{}/{} {what}", self.code, self.subcode),
        }
    }
}

/// ROUTE-REFRESH message (RFC 2918 §3, RFC 7313).
///
/// ```text
///  0       7      15      23      31
/// +-------+-------+-------+-------+
/// |      AFI      | Res.  | SAFI  |
/// +-------+-------+-------+-------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// `None` for a family Herald does not speak (such requests are ignored).
    pub family: Option<Family>,
    /// RFC 7313 subtype: 0 normal request, 1 BoRR, 2 EoRR.
    pub subtype: u8,
}
