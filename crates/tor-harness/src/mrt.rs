//! A minimal MRT writer (RFC 6396, `TABLE_DUMP_V2`), just enough to hand GoBGP a table of
//! routes in one file for `gobgp mrt inject global`, its fastest bulk-add path.
//!
//! The file is one `PEER_INDEX_TABLE` record followed by one `RIB_IPV4_UNICAST` or
//! `RIB_IPV6_UNICAST` record per prefix, each with a single RIB entry from peer 0.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// MRT type `TABLE_DUMP_V2` (RFC 6396 §4.3).
const TABLE_DUMP_V2: u16 = 13;
/// `TABLE_DUMP_V2` subtypes.
const PEER_INDEX_TABLE: u16 = 1;
const RIB_IPV4_UNICAST: u16 = 2;
const RIB_IPV6_UNICAST: u16 = 4;

/// Path attribute flags and type codes (RFC 4271 §4.3, RFC 4760, RFC 1997, RFC 8092).
const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_MP_REACH_NLRI: u8 = 14;
const ATTR_LARGE_COMMUNITY: u8 = 32;
const ORIGIN_IGP: u8 = 0;

/// One route to put in the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MrtRoute {
    /// The prefix (IPv4 or IPv6).
    pub prefix: IpNet,
    /// Its next hop: IPv4 goes in `NEXT_HOP`, IPv6 in the abbreviated `MP_REACH_NLRI`
    /// that RFC 6396 §4.3.4 prescribes.
    pub next_hop: IpAddr,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// Standard communities.
    pub communities: Vec<(u16, u16)>,
    /// Large communities.
    pub large_communities: Vec<(u32, u32, u32)>,
}

impl MrtRoute {
    /// A route with only a next hop (origin IGP, empty AS path).
    pub fn new(prefix: IpNet, next_hop: IpAddr) -> MrtRoute {
        MrtRoute {
            prefix,
            next_hop,
            med: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
        }
    }
}

/// Encodes `routes` as a `TABLE_DUMP_V2` file. `timestamp` is seconds since the epoch and
/// `collector` the collector's BGP ID; neither matters to GoBGP.
pub fn encode_table_dump(routes: &[MrtRoute], timestamp: u32, collector: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + routes.len() * 40);
    record(
        &mut out,
        timestamp,
        PEER_INDEX_TABLE,
        &peer_index_table(collector),
    );
    let mut body = Vec::with_capacity(64);
    for (sequence, route) in routes.iter().enumerate() {
        body.clear();
        //  0                   1                   2                   3
        //  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
        // +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        // |                         Sequence Number                       |
        // +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        // | Prefix Length |
        // +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        // |                        Prefix (variable)                      |
        // +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        // |         Entry Count           |  RIB Entries (variable)
        // +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
        body.extend_from_slice(&(sequence as u32).to_be_bytes());
        let subtype = push_prefix(&mut body, route.prefix);
        body.extend_from_slice(&1u16.to_be_bytes());
        // RIB entry: peer index, originated time, attribute length, attributes.
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&timestamp.to_be_bytes());
        let attributes = attributes(route);
        body.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        body.extend_from_slice(&attributes);
        record(&mut out, timestamp, subtype, &body);
    }
    out
}

/// The MRT common header (RFC 6396 §2) followed by the message.
///
/// ```text
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                           Timestamp                           |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |             Type              |            Subtype            |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                             Length                            |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                      Message... (variable)
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
fn record(out: &mut Vec<u8>, timestamp: u32, subtype: u16, message: &[u8]) {
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&TABLE_DUMP_V2.to_be_bytes());
    out.extend_from_slice(&subtype.to_be_bytes());
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
}

/// `PEER_INDEX_TABLE` (RFC 6396 §4.3.1) with no view name and one AS4 IPv4 peer (0.0.0.0,
/// AS 0): the injected routes are GoBGP's own, not learned from anyone.
fn peer_index_table(collector: Ipv4Addr) -> Vec<u8> {
    let mut body = Vec::with_capacity(24);
    body.extend_from_slice(&collector.octets());
    body.extend_from_slice(&0u16.to_be_bytes()); // view name length
    body.extend_from_slice(&1u16.to_be_bytes()); // peer count
    body.push(0x02); // peer type: IPv4 address, 4-octet AS
    body.extend_from_slice(&collector.octets()); // peer BGP ID
    body.extend_from_slice(&Ipv4Addr::UNSPECIFIED.octets()); // peer IP address
    body.extend_from_slice(&0u32.to_be_bytes()); // peer AS
    body
}

/// Appends prefix length and the significant prefix octets; returns the RIB subtype.
fn push_prefix(body: &mut Vec<u8>, prefix: IpNet) -> u16 {
    let len = prefix.prefix_len();
    body.push(len);
    let octets = usize::from(len).div_ceil(8);
    match prefix {
        IpNet::V4(net) => {
            body.extend_from_slice(&net.network().octets()[..octets]);
            RIB_IPV4_UNICAST
        }
        IpNet::V6(net) => {
            body.extend_from_slice(&net.network().octets()[..octets]);
            RIB_IPV6_UNICAST
        }
    }
}

fn attribute(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    // Extended length (flag 0x10) once the value does not fit one octet.
    if value.len() > 255 {
        out.push(flags | 0x10);
        out.push(code);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(flags);
        out.push(code);
        out.push(value.len() as u8);
    }
    out.extend_from_slice(value);
}

/// ORIGIN, an empty AS_PATH (GoBGP prepends its own AS towards eBGP peers), the next hop,
/// and the optional attributes.
fn attributes(route: &MrtRoute) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    attribute(&mut out, FLAG_TRANSITIVE, ATTR_ORIGIN, &[ORIGIN_IGP]);
    attribute(&mut out, FLAG_TRANSITIVE, ATTR_AS_PATH, &[]);
    match route.next_hop {
        IpAddr::V4(hop) if route.prefix.addr().is_ipv4() => {
            attribute(&mut out, FLAG_TRANSITIVE, ATTR_NEXT_HOP, &hop.octets());
        }
        hop => {
            let octets = match hop {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let mut value = vec![16u8];
            value.extend_from_slice(&octets);
            attribute(&mut out, FLAG_OPTIONAL, ATTR_MP_REACH_NLRI, &value);
        }
    }
    if let Some(med) = route.med {
        attribute(&mut out, FLAG_OPTIONAL, ATTR_MED, &med.to_be_bytes());
    }
    if !route.communities.is_empty() {
        let value: Vec<u8> = route
            .communities
            .iter()
            .flat_map(|(asn, value)| [asn.to_be_bytes(), value.to_be_bytes()].concat())
            .collect();
        attribute(
            &mut out,
            FLAG_OPTIONAL | FLAG_TRANSITIVE,
            ATTR_COMMUNITIES,
            &value,
        );
    }
    if !route.large_communities.is_empty() {
        let value: Vec<u8> = route
            .large_communities
            .iter()
            .flat_map(|(a, b, c)| [a.to_be_bytes(), b.to_be_bytes(), c.to_be_bytes()].concat())
            .collect();
        attribute(
            &mut out,
            FLAG_OPTIONAL | FLAG_TRANSITIVE,
            ATTR_LARGE_COMMUNITY,
            &value,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_peer_index_and_one_ipv4_rib_record() -> anyhow::Result<()> {
        let route = MrtRoute::new("10.1.2.0/24".parse()?, "192.0.2.1".parse()?);
        let bytes = encode_table_dump(&[route], 0x0102_0304, Ipv4Addr::new(127, 0, 0, 20));
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            // header: timestamp, type 13, subtype 1, length 21
            1, 2, 3, 4, 0, 13, 0, 1, 0, 0, 0, 21,
            127, 0, 0, 20, 0, 0, 0, 1, // collector, view name length, peer count
            2, 127, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, // AS4 IPv4 peer
            // header: timestamp, type 13, subtype 2 (RIB_IPV4_UNICAST), length 32
            1, 2, 3, 4, 0, 13, 0, 2, 0, 0, 0, 32,
            0, 0, 0, 0, 24, 10, 1, 2, 0, 1, // sequence, /24, prefix, one entry
            0, 0, 1, 2, 3, 4, 0, 14, // peer 0, originated, attribute length
            0x40, 1, 1, 0, // ORIGIN IGP
            0x40, 2, 0, // empty AS_PATH
            0x40, 3, 4, 192, 0, 2, 1, // NEXT_HOP
        ];
        assert_eq!(bytes, expected);
        Ok(())
    }

    #[test]
    fn ipv6_uses_abbreviated_mp_reach() -> anyhow::Result<()> {
        let mut route = MrtRoute::new("2001:db8::1/128".parse()?, "::1".parse()?);
        route.med = Some(7);
        let bytes = encode_table_dump(&[route], 0, Ipv4Addr::LOCALHOST);
        let rib = &bytes[12 + 21..];
        assert_eq!(&rib[6..8], &RIB_IPV6_UNICAST.to_be_bytes());
        // sequence(4) + len(1) + 16 prefix octets + count(2) + peer(2) + time(4) + attr len(2)
        let attrs = &rib[12 + 4 + 1 + 16 + 2 + 2 + 4 + 2..];
        let mp = &attrs[7..7 + 3 + 17];
        assert_eq!(&mp[..4], &[0x80, 14, 17, 16]);
        assert_eq!(mp[4..20], "::1".parse::<std::net::Ipv6Addr>()?.octets());
        assert_eq!(&attrs[7 + 20..], &[0x80, 4, 4, 0, 0, 0, 7]);
        Ok(())
    }
}
