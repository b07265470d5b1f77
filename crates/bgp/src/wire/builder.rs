//! Packs prefixes into as few UPDATE messages as the size limit allows.
//!
//! Sizes are computed arithmetically (an IPv4/IPv6 prefix takes
//! 1 + ⌈len/8⌉ octets, RFC 4271 §4.3), with the attribute overhead measured
//! once through the codec, so building 100k prefixes costs one pass.
//!
//! IPv4 NLRI encoding: [`Ipv4NlriEncoding::MpReach`] puts IPv4 prefixes in
//! MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 4760) and is what the session uses
//! whenever the peer advertised the IPv4-unicast MP capability: GoBGP 3.10
//! (Debian) treats a classic NEXT_HOP in 127/8 as a withdrawal, but does not
//! check the MP_REACH next hop, and every router we test against accepts
//! IPv4 in MP_REACH. [`Ipv4NlriEncoding::Classic`] (RFC 4271 NLRI field and
//! NEXT_HOP attribute) is used for peers without MP capabilities. IPv6 is
//! always in MP_REACH_NLRI.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::convert;
use super::types::*;
use super::{EncodeError, HEADER_LEN};

/// Where IPv4 prefixes go in an UPDATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Ipv4NlriEncoding {
    /// RFC 4271 NLRI / Withdrawn Routes fields with a NEXT_HOP attribute.
    Classic,
    /// RFC 4760 MP_REACH_NLRI / MP_UNREACH_NLRI with AFI 1 / SAFI 1.
    #[default]
    MpReach,
}

/// Parameters of the session the UPDATEs are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// 4096, or 65535 with RFC 8654 extended messages negotiated.
    pub max_message_len: usize,
    pub ipv4: Ipv4NlriEncoding,
    /// Whether the peer takes 4-octet AS numbers (RFC 6793); if not, an
    /// AS4_PATH is added when the AS_PATH has numbers above 65535.
    pub four_octet_asn: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            max_message_len: super::MAX_MESSAGE_LEN,
            ipv4: Ipv4NlriEncoding::MpReach,
            four_octet_asn: true,
        }
    }
}

/// Octets one prefix takes in an NLRI field.
fn prefix_wire_len(prefix_len: u8) -> usize {
    1 + usize::from(prefix_len).div_ceil(8)
}

/// The longest prefix of each family on the wire (a /32, a /128): a message with less
/// room than this for NLRI cannot carry every prefix.
const IPV4_LARGEST: usize = 5;
const IPV6_LARGEST: usize = 17;

/// Withdrawn-routes length + total-path-attribute length.
const UPDATE_FIXED: usize = HEADER_LEN + 2 + 2;

/// MP_(UN)REACH header growth when the value passes 255 octets and the
/// attribute needs the extended-length flag.
const EXTENDED_LENGTH_SLACK: usize = 1;

/// Orders attributes by type code, as RFC 4271 §5 recommends.
fn sort_attributes(attrs: &mut [Attribute]) {
    attrs.sort_by_key(|a| match a {
        Attribute::Origin(_) => 1,
        Attribute::AsPath(_) => 2,
        Attribute::NextHop(_) => 3,
        Attribute::Med(_) => 4,
        Attribute::LocalPref(_) => 5,
        Attribute::Communities(_) => 8,
        Attribute::MpReach(_) => 14,
        Attribute::MpUnreach(_) => 15,
        Attribute::LargeCommunities(_) => 32,
        Attribute::Other(o) => u16::from(o.type_code()),
    });
}

/// Splits `items` into chunks whose encoded NLRI fit `budget` octets.
fn chunk_by_size<T: Copy>(items: &[T], budget: usize, len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for item in items {
        let l = len(item);
        if used + l > budget && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(*item);
        used += l;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn too_big(what: &str) -> EncodeError {
    EncodeError {
        what: "UPDATE",
        reason: format!("{what} leave no room for NLRI"),
    }
}

/// `prefixes` by family, each in the order given.
fn split_families(prefixes: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for prefix in prefixes {
        match prefix {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (v4, v6)
}

/// UPDATEs carrying `nlri` inside MP_REACH_NLRI. `attributes_for` builds one message's
/// attributes around a chunk of it; a chunk may fill what a message has left once those
/// attributes are counted without NLRI, less room for the attribute's length to grow to
/// two octets. `largest` is the wire length of the longest possible prefix: a budget
/// below it could not carry one.
fn mp_reach_updates<N: Copy>(
    nlri: &[N],
    largest: usize,
    opts: &BuildOptions,
    wire_len: impl Fn(&N) -> usize,
    attributes_for: impl Fn(Vec<N>) -> Vec<Attribute>,
) -> Result<Vec<Update>, EncodeError> {
    let fixed = UPDATE_FIXED
        + convert::attributes_len(&attributes_for(Vec::new()), opts.four_octet_asn)?
        + EXTENDED_LENGTH_SLACK;
    let budget = opts
        .max_message_len
        .checked_sub(fixed)
        .filter(|b| *b >= largest)
        .ok_or_else(|| too_big("attributes"))?;
    Ok(chunk_by_size(nlri, budget, wire_len)
        .into_iter()
        .map(|chunk| Update {
            withdrawn: Vec::new(),
            attributes: attributes_for(chunk),
            nlri: Vec::new(),
        })
        .collect())
}

/// Builds UPDATEs announcing `prefixes` with the same `attributes` (ORIGIN,
/// AS_PATH, MED, LOCAL_PREF, communities — no NEXT_HOP or MP_REACH, which
/// the builder adds from `next_hop`).
///
/// An IPv4 next hop for IPv6 prefixes is sent as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`); an IPv6 next hop for IPv4 prefixes needs
/// [`Ipv4NlriEncoding::MpReach`] (RFC 8950).
pub fn build_announcements(
    attributes: &[Attribute],
    next_hop: IpAddr,
    prefixes: &[IpNet],
    opts: &BuildOptions,
) -> Result<Vec<Update>, EncodeError> {
    let mut base: Vec<Attribute> = attributes
        .iter()
        .filter(|a| {
            !matches!(
                a,
                Attribute::NextHop(_) | Attribute::MpReach(_) | Attribute::MpUnreach(_)
            )
        })
        .cloned()
        .collect();
    if !opts.four_octet_asn {
        let as4 = base.iter().find_map(|a| match a {
            Attribute::AsPath(segs) => Some(convert::as4_path_for(segs)),
            _ => None,
        });
        if let Some(as4) = as4.transpose()?.flatten() {
            base.push(as4);
        }
    }
    let (v4, v6) = split_families(prefixes);
    let mut out = Vec::new();

    if !v4.is_empty() {
        match (opts.ipv4, next_hop) {
            (Ipv4NlriEncoding::Classic, IpAddr::V4(nh)) => {
                let mut attrs = base.clone();
                attrs.push(Attribute::NextHop(nh));
                sort_attributes(&mut attrs);
                let fixed = UPDATE_FIXED + convert::attributes_len(&attrs, opts.four_octet_asn)?;
                let budget = opts
                    .max_message_len
                    .checked_sub(fixed)
                    .filter(|b| *b >= IPV4_LARGEST)
                    .ok_or_else(|| too_big("attributes"))?;
                for chunk in chunk_by_size(&v4, budget, |n| prefix_wire_len(n.prefix_len())) {
                    out.push(Update {
                        withdrawn: Vec::new(),
                        attributes: attrs.clone(),
                        nlri: chunk,
                    });
                }
            }
            (Ipv4NlriEncoding::Classic, IpAddr::V6(_)) => {
                return Err(EncodeError {
                    what: "UPDATE",
                    reason: "an IPv6 next hop for IPv4 prefixes needs MP_REACH_NLRI (RFC 8950)"
                        .into(),
                });
            }
            (Ipv4NlriEncoding::MpReach, nh) => {
                out.extend(mp_reach_updates(
                    &v4,
                    IPV4_LARGEST,
                    opts,
                    |n| prefix_wire_len(n.prefix_len()),
                    |nlri| {
                        let mut attrs = base.clone();
                        attrs.push(Attribute::MpReach(MpReach::Ipv4Unicast {
                            next_hop: nh,
                            nlri,
                        }));
                        sort_attributes(&mut attrs);
                        attrs
                    },
                )?);
            }
        }
    }

    if !v6.is_empty() {
        let nh6 = match next_hop {
            IpAddr::V6(a) => a,
            IpAddr::V4(a) => a.to_ipv6_mapped(),
        };
        out.extend(mp_reach_updates(
            &v6,
            IPV6_LARGEST,
            opts,
            |n| prefix_wire_len(n.prefix_len()),
            |nlri| {
                let mut attrs = base.clone();
                attrs.push(Attribute::MpReach(MpReach::Ipv6Unicast {
                    next_hop: nh6,
                    link_local: None,
                    nlri,
                }));
                sort_attributes(&mut attrs);
                attrs
            },
        )?);
    }
    Ok(out)
}

/// Builds UPDATEs withdrawing `prefixes`, IPv4 in the encoding of `opts`
/// (so a withdrawal matches how the prefix was announced), IPv6 in
/// MP_UNREACH_NLRI.
pub fn build_withdrawals(
    prefixes: &[IpNet],
    opts: &BuildOptions,
) -> Result<Vec<Update>, EncodeError> {
    let (v4, v6) = split_families(prefixes);
    let mut out = Vec::new();
    // MP_UNREACH: flags, type, 2-octet length, AFI, SAFI.
    let mp_fixed = UPDATE_FIXED + 4 + 3;
    let mp_budget = opts
        .max_message_len
        .checked_sub(mp_fixed)
        .ok_or_else(|| too_big("headers"))?;
    if !v4.is_empty() {
        match opts.ipv4 {
            Ipv4NlriEncoding::Classic => {
                let budget = opts
                    .max_message_len
                    .checked_sub(UPDATE_FIXED)
                    .ok_or_else(|| too_big("headers"))?;
                for chunk in chunk_by_size(&v4, budget, |n| prefix_wire_len(n.prefix_len())) {
                    out.push(Update {
                        withdrawn: chunk,
                        attributes: Vec::new(),
                        nlri: Vec::new(),
                    });
                }
            }
            Ipv4NlriEncoding::MpReach => {
                for chunk in chunk_by_size(&v4, mp_budget, |n| prefix_wire_len(n.prefix_len())) {
                    out.push(Update {
                        withdrawn: Vec::new(),
                        attributes: vec![Attribute::MpUnreach(MpUnreach::Ipv4Unicast(chunk))],
                        nlri: Vec::new(),
                    });
                }
            }
        }
    }
    for chunk in chunk_by_size(&v6, mp_budget, |n| prefix_wire_len(n.prefix_len())) {
        out.push(Update {
            withdrawn: Vec::new(),
            attributes: vec![Attribute::MpUnreach(MpUnreach::Ipv6Unicast(chunk))],
            nlri: Vec::new(),
        });
    }
    Ok(out)
}

/// An IPv4-mapped next hop is how an IPv4 next hop travels with IPv6 NLRI.
pub fn is_ipv4_mapped(a: &Ipv6Addr) -> bool {
    a.to_ipv4_mapped().is_some()
}
