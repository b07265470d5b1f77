//! Conversions between our wire types and `netgauze-bgp-pkt`'s. This is the
//! only file (with the two entry points in `mod.rs`) that knows the codec.

use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, ExtendedNextHopEncoding, ExtendedNextHopEncodingCapability,
    FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::{Community, LargeCommunity as NgLargeCommunity};
use netgauze_bgp_pkt::iana::RouteRefreshSubcode;
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    MessageHeaderError, OpenMessageError, RouteRefreshError, UpdateMessageError,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As2PathSegment, As4PathSegment, AsPath, AsPathSegmentType, Communities, LargeCommunities,
    LocalPreference, MpReach as NgMpReach, MpUnreach as NgMpUnreach, MultiExitDiscriminator,
    NextHop, Origin as NgOrigin, PathAttribute, PathAttributeValue,
};
use netgauze_bgp_pkt::route_refresh::BgpRouteRefreshMessage;
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_iana::address_family::{AddressFamily, AddressType};

use super::types::*;
use super::{EncodeError, WireContext};

fn family_to_ng(f: Family) -> AddressType {
    match f {
        Family::Ipv4Unicast => AddressType::Ipv4Unicast,
        Family::Ipv6Unicast => AddressType::Ipv6Unicast,
    }
}

fn family_from_ng(t: AddressType) -> Option<Family> {
    match t {
        AddressType::Ipv4Unicast => Some(Family::Ipv4Unicast),
        AddressType::Ipv6Unicast => Some(Family::Ipv6Unicast),
        _ => None,
    }
}

pub(super) fn message_from_netgauze(m: BgpMessage, ctx: &WireContext) -> Message {
    let _ = ctx;
    match m {
        BgpMessage::Open(o) => Message::Open(open_from_ng(&o)),
        BgpMessage::Update(u) => Message::Update(update_from_ng(&u)),
        BgpMessage::Notification(n) => Message::Notification(notification_from_ng(&n)),
        BgpMessage::KeepAlive => Message::Keepalive,
        BgpMessage::RouteRefresh(r) => Message::RouteRefresh(RouteRefresh {
            family: family_from_ng(r.address_type()),
            subtype: r.operation_type() as u8,
        }),
    }
}

pub(super) fn message_to_netgauze(
    m: &Message,
    ctx: &WireContext,
) -> Result<BgpMessage, EncodeError> {
    Ok(match m {
        Message::Open(o) => BgpMessage::Open(open_to_ng(o)),
        Message::Update(u) => BgpMessage::Update(update_to_ng(u, ctx.four_octet_asn)?),
        Message::Notification(n) => BgpMessage::Notification(notification_to_ng(n)?),
        Message::Keepalive => BgpMessage::KeepAlive,
        Message::RouteRefresh(r) => {
            let family = r.family.ok_or_else(|| EncodeError {
                what: "ROUTE-REFRESH",
                reason: "no address family".into(),
            })?;
            let subtype = match r.subtype {
                0 => RouteRefreshSubcode::NormalRequest,
                1 => RouteRefreshSubcode::BeginningOfRouteRefresh,
                2 => RouteRefreshSubcode::EndOfRouteRefresh,
                s => {
                    return Err(EncodeError {
                        what: "ROUTE-REFRESH",
                        reason: format!("unknown subtype {s}"),
                    });
                }
            };
            BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(family_to_ng(family), subtype))
        }
    })
}

// ---- OPEN -----------------------------------------------------------------

fn open_from_ng(o: &BgpOpenMessage) -> Open {
    Open {
        my_as: o.my_as(),
        hold_time: o.hold_time(),
        router_id: o.bgp_id(),
        capabilities: o
            .capabilities()
            .into_iter()
            .map(capability_from_ng)
            .collect(),
    }
}

fn open_to_ng(o: &Open) -> BgpOpenMessage {
    let caps: Vec<BgpCapability> = o.capabilities.iter().map(capability_to_ng).collect();
    // One Capabilities parameter holding them all (RFC 5492 §4 allows
    // either; one is what every implementation sends).
    let params = if caps.is_empty() {
        Vec::new()
    } else {
        vec![BgpOpenMessageParameter::new_capabilities(caps)]
    };
    BgpOpenMessage::new(o.my_as, o.hold_time, o.router_id, params)
}

fn capability_from_ng(c: &BgpCapability) -> Capability {
    match c {
        BgpCapability::MultiProtocolExtensions(mp) => match family_from_ng(mp.address_type()) {
            Some(f) => Capability::MultiProtocol(f),
            None => Capability::Other(OtherCapability(c.clone())),
        },
        BgpCapability::RouteRefresh => Capability::RouteRefresh,
        BgpCapability::ExtendedMessage => Capability::ExtendedMessage,
        BgpCapability::FourOctetAs(a) => Capability::FourOctetAsn(a.asn4()),
        BgpCapability::GracefulRestartCapability(gr) => {
            let families = gr
                .address_families()
                .iter()
                .filter_map(|f| {
                    family_from_ng(f.address_type()).map(|family| GracefulRestartFamily {
                        family,
                        forwarding_preserved: f.forwarding_state(),
                    })
                })
                .collect();
            // Families we do not model are dropped here; that is lossy for
            // a round trip but harmless: we never re-send a peer's OPEN.
            Capability::GracefulRestart(GracefulRestart {
                restarting: gr.restart(),
                notification: gr.graceful_notification(),
                restart_time: gr.time(),
                families,
            })
        }
        BgpCapability::ExtendedNextHopEncoding(e) => {
            let v = e
                .encodings()
                .iter()
                .filter_map(|enc| {
                    family_from_ng(enc.address_type()).map(|family| ExtendedNextHop {
                        family,
                        next_hop_afi: enc.next_hop_afi() as u16,
                    })
                })
                .collect();
            Capability::ExtendedNextHop(v)
        }
        other => Capability::Other(OtherCapability(other.clone())),
    }
}

fn capability_to_ng(c: &Capability) -> BgpCapability {
    match c {
        Capability::MultiProtocol(f) => BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(family_to_ng(*f)),
        ),
        Capability::RouteRefresh => BgpCapability::RouteRefresh,
        Capability::ExtendedMessage => BgpCapability::ExtendedMessage,
        Capability::FourOctetAsn(a) => BgpCapability::FourOctetAs(FourOctetAsCapability::new(*a)),
        Capability::GracefulRestart(gr) => {
            let fams: Vec<GracefulRestartAddressFamily> = gr
                .families
                .iter()
                .map(|f| {
                    GracefulRestartAddressFamily::new(
                        f.forwarding_preserved,
                        family_to_ng(f.family),
                    )
                })
                .collect();
            BgpCapability::GracefulRestartCapability(GracefulRestartCapability::new(
                gr.restarting,
                gr.notification,
                // The field is 12 bits (RFC 4724 §3).
                gr.restart_time.min(0x0fff),
                fams,
            ))
        }
        Capability::ExtendedNextHop(v) => {
            let enc: Vec<ExtendedNextHopEncoding> = v
                .iter()
                .map(|e| {
                    let afi = if e.next_hop_afi == 2 {
                        AddressFamily::IPv6
                    } else {
                        AddressFamily::IPv4
                    };
                    ExtendedNextHopEncoding::new(family_to_ng(e.family), afi)
                })
                .collect();
            BgpCapability::ExtendedNextHopEncoding(ExtendedNextHopEncodingCapability::new(enc))
        }
        Capability::Other(o) => o.0.clone(),
    }
}

// ---- UPDATE ---------------------------------------------------------------

fn update_from_ng(u: &BgpUpdateMessage) -> Update {
    Update {
        withdrawn: u
            .withdraw_routes()
            .iter()
            .map(|a| a.network().address())
            .collect(),
        attributes: u.path_attributes().iter().map(attribute_from_ng).collect(),
        nlri: u.nlri().iter().map(|a| a.network().address()).collect(),
    }
}

fn update_to_ng(u: &Update, four_octet: bool) -> Result<BgpUpdateMessage, EncodeError> {
    let withdrawn = u
        .withdrawn
        .iter()
        .map(|n| v4_to_ng(*n))
        .collect::<Result<Vec<_>, _>>()?;
    let nlri = u
        .nlri
        .iter()
        .map(|n| v4_to_ng(*n))
        .collect::<Result<Vec<_>, _>>()?;
    let attrs = u
        .attributes
        .iter()
        .map(|a| attribute_to_ng(a, four_octet))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BgpUpdateMessage::new(withdrawn, attrs, nlri))
}

fn v4_to_ng(n: ipnet::Ipv4Net) -> Result<Ipv4UnicastAddress, EncodeError> {
    Ipv4Unicast::from_net(n)
        .map(Ipv4UnicastAddress::new_no_path_id)
        .map_err(|_| EncodeError {
            what: "UPDATE",
            reason: format!("{n} is not a unicast prefix"),
        })
}

fn v6_to_ng(n: ipnet::Ipv6Net) -> Result<Ipv6UnicastAddress, EncodeError> {
    Ipv6Unicast::from_net(n)
        .map(|u| Ipv6UnicastAddress::new(None, u))
        .map_err(|_| EncodeError {
            what: "UPDATE",
            reason: format!("{n} is not a unicast prefix"),
        })
}

fn attribute_from_ng(a: &PathAttribute) -> Attribute {
    let other = || Attribute::Other(OtherAttribute(a.clone()));
    match a.value() {
        PathAttributeValue::Origin(o) => Attribute::Origin(match o {
            NgOrigin::IGP => Origin::Igp,
            NgOrigin::EGP => Origin::Egp,
            NgOrigin::Incomplete => Origin::Incomplete,
        }),
        PathAttributeValue::AsPath(p) => Attribute::AsPath(match p {
            AsPath::As2PathSegments(segs) => segs
                .iter()
                .map(|s| {
                    let asns = s.as_numbers().iter().map(|a| u32::from(*a)).collect();
                    segment(s.segment_type(), asns)
                })
                .collect(),
            AsPath::As4PathSegments(segs) => segs
                .iter()
                .map(|s| segment(s.segment_type(), s.as_numbers().to_vec()))
                .collect(),
        }),
        PathAttributeValue::NextHop(nh) => Attribute::NextHop(nh.next_hop()),
        PathAttributeValue::MultiExitDiscriminator(m) => Attribute::Med(m.metric()),
        PathAttributeValue::LocalPreference(l) => Attribute::LocalPref(l.metric()),
        PathAttributeValue::Communities(c) => {
            Attribute::Communities(c.communities().iter().map(|c| c.value()).collect())
        }
        PathAttributeValue::LargeCommunities(c) => Attribute::LargeCommunities(
            c.communities()
                .iter()
                .map(|c| LargeCommunity {
                    global_admin: c.global_admin(),
                    local_data1: c.local_data1(),
                    local_data2: c.local_data2(),
                })
                .collect(),
        ),
        PathAttributeValue::MpReach(NgMpReach::Ipv4Unicast {
            next_hop,
            next_hop_local: None,
            nlri,
        }) => Attribute::MpReach(MpReach::Ipv4Unicast {
            next_hop: *next_hop,
            nlri: nlri.iter().map(|a| a.network().address()).collect(),
        }),
        PathAttributeValue::MpReach(NgMpReach::Ipv6Unicast {
            next_hop_global,
            next_hop_local,
            nlri,
        }) => Attribute::MpReach(MpReach::Ipv6Unicast {
            next_hop: *next_hop_global,
            link_local: *next_hop_local,
            nlri: nlri.iter().map(|a| a.network().address()).collect(),
        }),
        PathAttributeValue::MpUnreach(NgMpUnreach::Ipv4Unicast { nlri }) => Attribute::MpUnreach(
            MpUnreach::Ipv4Unicast(nlri.iter().map(|a| a.network().address()).collect()),
        ),
        PathAttributeValue::MpUnreach(NgMpUnreach::Ipv6Unicast { nlri }) => Attribute::MpUnreach(
            MpUnreach::Ipv6Unicast(nlri.iter().map(|a| a.network().address()).collect()),
        ),
        _ => other(),
    }
}

fn segment(t: AsPathSegmentType, asns: Vec<u32>) -> AsSegment {
    match t {
        AsPathSegmentType::AsSet => AsSegment::Set(asns),
        AsPathSegmentType::AsSequence => AsSegment::Sequence(asns),
    }
}

/// Builds a path attribute with the flags the RFCs require for its type,
/// and the extended-length flag only when the value needs it.
fn mk_attr(value: PathAttributeValue) -> Result<PathAttribute, EncodeError> {
    let optional = value.can_be_optional().unwrap_or(true);
    let transitive = value.can_be_transitive().unwrap_or(true);
    let short = PathAttribute::from(optional, transitive, false, false, value.clone()).map_err(
        |(_, e)| EncodeError {
            what: "path attribute",
            reason: e.to_string(),
        },
    )?;
    // Header is flags + type + 1-octet length.
    use netgauze_parse_utils::WritablePdu;
    if short.len() <= 3 + 255 {
        return Ok(short);
    }
    PathAttribute::from(optional, transitive, false, true, value).map_err(|(_, e)| EncodeError {
        what: "path attribute",
        reason: e.to_string(),
    })
}

fn attribute_to_ng(a: &Attribute, four_octet: bool) -> Result<PathAttribute, EncodeError> {
    let value = match a {
        Attribute::Origin(o) => PathAttributeValue::Origin(match o {
            Origin::Igp => NgOrigin::IGP,
            Origin::Egp => NgOrigin::EGP,
            Origin::Incomplete => NgOrigin::Incomplete,
        }),
        Attribute::AsPath(segs) if four_octet => {
            let v: Vec<As4PathSegment> = segs.iter().map(as4_segment).collect();
            PathAttributeValue::AsPath(AsPath::As4PathSegments(v.into()))
        }
        Attribute::AsPath(segs) => {
            // RFC 6793 §4.2.2: a 2-octet peer gets AS_TRANS for numbers that
            // do not fit; the builder adds the AS4_PATH that carries them.
            let v: Vec<As2PathSegment> = segs
                .iter()
                .map(|s| {
                    let (t, v) = seg_parts(s);
                    let nums: Vec<u16> = v
                        .iter()
                        .map(|a| u16::try_from(*a).unwrap_or(AS_TRANS))
                        .collect();
                    As2PathSegment::new(t, nums)
                })
                .collect();
            PathAttributeValue::AsPath(AsPath::As2PathSegments(v.into()))
        }
        Attribute::NextHop(nh) => PathAttributeValue::NextHop(NextHop::new(*nh)),
        Attribute::Med(m) => {
            PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(*m))
        }
        Attribute::LocalPref(l) => PathAttributeValue::LocalPreference(LocalPreference::new(*l)),
        Attribute::Communities(c) => PathAttributeValue::Communities(Communities::new(
            c.iter().map(|v| Community::new(*v)).collect::<Vec<_>>(),
        )),
        Attribute::LargeCommunities(c) => {
            PathAttributeValue::LargeCommunities(LargeCommunities::new(
                c.iter()
                    .map(|l| NgLargeCommunity::new(l.global_admin, l.local_data1, l.local_data2))
                    .collect::<Vec<_>>(),
            ))
        }
        Attribute::MpReach(MpReach::Ipv4Unicast { next_hop, nlri }) => {
            PathAttributeValue::MpReach(NgMpReach::Ipv4Unicast {
                next_hop: *next_hop,
                next_hop_local: None,
                nlri: nlri
                    .iter()
                    .map(|n| v4_to_ng(*n))
                    .collect::<Result<Vec<_>, _>>()?
                    .into(),
            })
        }
        Attribute::MpReach(MpReach::Ipv6Unicast {
            next_hop,
            link_local,
            nlri,
        }) => PathAttributeValue::MpReach(NgMpReach::Ipv6Unicast {
            next_hop_global: *next_hop,
            next_hop_local: *link_local,
            nlri: nlri
                .iter()
                .map(|n| v6_to_ng(*n))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        }),
        Attribute::MpUnreach(MpUnreach::Ipv4Unicast(nlri)) => {
            PathAttributeValue::MpUnreach(NgMpUnreach::Ipv4Unicast {
                nlri: nlri
                    .iter()
                    .map(|n| v4_to_ng(*n))
                    .collect::<Result<Vec<_>, _>>()?
                    .into(),
            })
        }
        Attribute::MpUnreach(MpUnreach::Ipv6Unicast(nlri)) => {
            PathAttributeValue::MpUnreach(NgMpUnreach::Ipv6Unicast {
                nlri: nlri
                    .iter()
                    .map(|n| v6_to_ng(*n))
                    .collect::<Result<Vec<_>, _>>()?
                    .into(),
            })
        }
        Attribute::Other(o) => return Ok(o.0.clone()),
    };
    mk_attr(value)
}

fn seg_parts(s: &AsSegment) -> (AsPathSegmentType, &Vec<u32>) {
    match s {
        AsSegment::Sequence(v) => (AsPathSegmentType::AsSequence, v),
        AsSegment::Set(v) => (AsPathSegmentType::AsSet, v),
    }
}

fn as4_segment(s: &AsSegment) -> As4PathSegment {
    let (t, v) = seg_parts(s);
    As4PathSegment::new(t, v.clone())
}

/// RFC 6793 §4.2.2: the AS4_PATH to send to a 2-octet peer alongside an
/// AS_PATH that has numbers above 65535; `None` when all fit.
pub(super) fn as4_path_for(segs: &[AsSegment]) -> Result<Option<Attribute>, EncodeError> {
    let fits = segs
        .iter()
        .all(|s| seg_parts(s).1.iter().all(|a| u16::try_from(*a).is_ok()));
    if fits {
        return Ok(None);
    }
    let four: Vec<As4PathSegment> = segs.iter().map(as4_segment).collect();
    Ok(Some(Attribute::Other(OtherAttribute(mk_attr(
        PathAttributeValue::As4Path(netgauze_bgp_pkt::path_attribute::As4Path::new(four)),
    )?))))
}

/// Encoded size of a path attribute list, for the UPDATE builder.
pub(super) fn attributes_len(attrs: &[Attribute], four_octet: bool) -> Result<usize, EncodeError> {
    use netgauze_parse_utils::WritablePdu;
    let mut total = 0;
    for a in attrs {
        total += attribute_to_ng(a, four_octet)?.len();
    }
    Ok(total)
}

// ---- NOTIFICATION -----------------------------------------------------------

fn notification_from_ng(n: &BgpNotificationMessage) -> Notification {
    use BgpNotificationMessage as N;
    let (code, subcode, data): (u8, u8, &[u8]) = match n {
        N::MessageHeaderError(e) => match e {
            MessageHeaderError::Unspecific { value } => (1, 0, value),
            MessageHeaderError::ConnectionNotSynchronized { value } => (1, 1, value),
            MessageHeaderError::BadMessageLength { value } => (1, 2, value),
            MessageHeaderError::BadMessageType { value } => (1, 3, value),
        },
        N::OpenMessageError(e) => match e {
            OpenMessageError::Unspecific { value } => (2, 0, value),
            OpenMessageError::UnsupportedVersionNumber { value } => (2, 1, value),
            OpenMessageError::BadPeerAs { value } => (2, 2, value),
            OpenMessageError::BadBgpIdentifier { value } => (2, 3, value),
            OpenMessageError::UnsupportedOptionalParameter { value } => (2, 4, value),
            OpenMessageError::UnacceptableHoldTime { value } => (2, 6, value),
            OpenMessageError::UnsupportedCapability { value } => (2, 7, value),
            OpenMessageError::RoleMismatch { value } => (2, 11, value),
        },
        N::UpdateMessageError(e) => match e {
            UpdateMessageError::Unspecific { value } => (3, 0, value),
            UpdateMessageError::MalformedAttributeList { value } => (3, 1, value),
            UpdateMessageError::UnrecognizedWellKnownAttribute { value } => (3, 2, value),
            UpdateMessageError::MissingWellKnownAttribute { value } => (3, 3, value),
            UpdateMessageError::AttributeFlagsError { value } => (3, 4, value),
            UpdateMessageError::AttributeLengthError { value } => (3, 5, value),
            UpdateMessageError::InvalidOriginAttribute { value } => (3, 6, value),
            UpdateMessageError::InvalidNextHopAttribute { value } => (3, 8, value),
            UpdateMessageError::OptionalAttributeError { value } => (3, 9, value),
            UpdateMessageError::InvalidNetworkField { value } => (3, 10, value),
            UpdateMessageError::MalformedAsPath { value } => (3, 11, value),
        },
        N::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific { sub_code, value }) => {
            (4, *sub_code, value)
        }
        N::FiniteStateMachineError(e) => match e {
            FiniteStateMachineError::Unspecific { value } => (5, 0, value),
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value } => {
                (5, 1, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value } => {
                (5, 2, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value } => {
                (5, 3, value)
            }
        },
        N::CeaseError(e) => match e {
            CeaseError::MaximumNumberOfPrefixesReached { value } => (6, 1, value),
            CeaseError::AdministrativeShutdown { value } => (6, 2, value),
            CeaseError::PeerDeConfigured { value } => (6, 3, value),
            CeaseError::AdministrativeReset { value } => (6, 4, value),
            CeaseError::ConnectionRejected { value } => (6, 5, value),
            CeaseError::OtherConfigurationChange { value } => (6, 6, value),
            CeaseError::ConnectionCollisionResolution { value } => (6, 7, value),
            CeaseError::OutOfResources { value } => (6, 8, value),
            CeaseError::HardReset { value } => (6, 9, value),
            CeaseError::BfdDown { value } => (6, 10, value),
        },
        N::RouteRefreshError(RouteRefreshError::InvalidMessageLength { value }) => (7, 1, value),
    };
    Notification::new(code, subcode, data.to_vec())
}

fn notification_to_ng(n: &Notification) -> Result<BgpNotificationMessage, EncodeError> {
    use BgpNotificationMessage as N;
    let value: Box<[u8]> = n.data.clone().into();
    let unsupported = || EncodeError {
        what: "NOTIFICATION",
        reason: format!(
            "code {}/{} is not supported by the codec",
            n.code, n.subcode
        ),
    };
    Ok(match (n.code, n.subcode) {
        (1, 0) => N::MessageHeaderError(MessageHeaderError::Unspecific { value }),
        (1, 1) => N::MessageHeaderError(MessageHeaderError::ConnectionNotSynchronized { value }),
        (1, 2) => N::MessageHeaderError(MessageHeaderError::BadMessageLength { value }),
        (1, 3) => N::MessageHeaderError(MessageHeaderError::BadMessageType { value }),
        (2, 0) => N::OpenMessageError(OpenMessageError::Unspecific { value }),
        (2, 1) => N::OpenMessageError(OpenMessageError::UnsupportedVersionNumber { value }),
        (2, 2) => N::OpenMessageError(OpenMessageError::BadPeerAs { value }),
        (2, 3) => N::OpenMessageError(OpenMessageError::BadBgpIdentifier { value }),
        (2, 4) => N::OpenMessageError(OpenMessageError::UnsupportedOptionalParameter { value }),
        (2, 6) => N::OpenMessageError(OpenMessageError::UnacceptableHoldTime { value }),
        (2, 7) => N::OpenMessageError(OpenMessageError::UnsupportedCapability { value }),
        (2, 11) => N::OpenMessageError(OpenMessageError::RoleMismatch { value }),
        (3, 0) => N::UpdateMessageError(UpdateMessageError::Unspecific { value }),
        (3, 1) => N::UpdateMessageError(UpdateMessageError::MalformedAttributeList { value }),
        (3, 2) => {
            N::UpdateMessageError(UpdateMessageError::UnrecognizedWellKnownAttribute { value })
        }
        (3, 3) => N::UpdateMessageError(UpdateMessageError::MissingWellKnownAttribute { value }),
        (3, 4) => N::UpdateMessageError(UpdateMessageError::AttributeFlagsError { value }),
        (3, 5) => N::UpdateMessageError(UpdateMessageError::AttributeLengthError { value }),
        (3, 6) => N::UpdateMessageError(UpdateMessageError::InvalidOriginAttribute { value }),
        (3, 8) => N::UpdateMessageError(UpdateMessageError::InvalidNextHopAttribute { value }),
        (3, 9) => N::UpdateMessageError(UpdateMessageError::OptionalAttributeError { value }),
        (3, 10) => N::UpdateMessageError(UpdateMessageError::InvalidNetworkField { value }),
        (3, 11) => N::UpdateMessageError(UpdateMessageError::MalformedAsPath { value }),
        (4, sub_code) => {
            N::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific { sub_code, value })
        }
        (5, 0) => N::FiniteStateMachineError(FiniteStateMachineError::Unspecific { value }),
        (5, 1) => N::FiniteStateMachineError(
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value },
        ),
        (5, 2) => N::FiniteStateMachineError(
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value },
        ),
        (5, 3) => N::FiniteStateMachineError(
            FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value },
        ),
        (6, 1) => N::CeaseError(CeaseError::MaximumNumberOfPrefixesReached { value }),
        (6, 2) => N::CeaseError(CeaseError::AdministrativeShutdown { value }),
        (6, 3) => N::CeaseError(CeaseError::PeerDeConfigured { value }),
        (6, 4) => N::CeaseError(CeaseError::AdministrativeReset { value }),
        (6, 5) => N::CeaseError(CeaseError::ConnectionRejected { value }),
        (6, 6) => N::CeaseError(CeaseError::OtherConfigurationChange { value }),
        (6, 7) => N::CeaseError(CeaseError::ConnectionCollisionResolution { value }),
        (6, 8) => N::CeaseError(CeaseError::OutOfResources { value }),
        (6, 9) => N::CeaseError(CeaseError::HardReset { value }),
        (6, 10) => N::CeaseError(CeaseError::BfdDown { value }),
        (7, 1) => N::RouteRefreshError(RouteRefreshError::InvalidMessageLength { value }),
        _ => return Err(unsupported()),
    })
}
