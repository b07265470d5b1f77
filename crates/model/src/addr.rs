//! IP addresses as integers, and address ranges as users write them: CIDRs and
//! `first-last` ranges. Working on `u128` keeps range arithmetic exact for IPv6 pools of
//! any size, so a /64 is never enumerated.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::echo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The value stored in the database's `family` columns.
    pub fn code(self) -> i32 {
        match self {
            Self::V4 => 4,
            Self::V6 => 6,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            4 => Some(Self::V4),
            6 => Some(Self::V6),
            _ => None,
        }
    }

    pub fn other(self) -> Self {
        match self {
            Self::V4 => Self::V6,
            Self::V6 => Self::V4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`ip_to_u128`]. An IPv4 value above `u32::MAX` cannot come from a valid
/// range, so it saturates rather than wrapping silently.
pub fn u128_to_ip(family: IpFamily, value: u128) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// The database key of an address: 4 or 16 big-endian bytes, so byte order is address
/// order and an IPv4 key can never equal an IPv6 one.
pub fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn ip_from_key(key: &[u8]) -> Option<IpAddr> {
    match key.len() {
        4 => <[u8; 4]>::try_from(key)
            .ok()
            .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        16 => <[u8; 16]>::try_from(key)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// An inclusive range of addresses of one family, as written by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AddrRange {
    pub family: IpFamily,
    pub first: u128,
    pub last: u128,
    /// The prefix length when the user wrote a CIDR; `None` for a `first-last` range.
    pub prefix_len: Option<u8>,
}

impl AddrRange {
    pub fn cidr(ip: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let family = IpFamily::of(ip);
        let bits = family.bits();
        if prefix_len > bits {
            return Err(format!(
                "prefix length {prefix_len} is longer than {bits} bits"
            ));
        }
        let value = ip_to_u128(ip);
        let host_mask = host_mask(bits, prefix_len);
        if value & host_mask != 0 {
            let network = u128_to_ip(family, value & !host_mask);
            return Err(format!(
                "host bits are set (the network is {network}/{prefix_len})"
            ));
        }
        Ok(Self {
            family,
            first: value,
            last: value | host_mask,
            prefix_len: Some(prefix_len),
        })
    }

    pub fn span(first: IpAddr, last: IpAddr) -> Result<Self, String> {
        let family = IpFamily::of(first);
        if family != IpFamily::of(last) {
            return Err(format!(
                "mixes {} and {} addresses",
                family,
                IpFamily::of(last)
            ));
        }
        let (a, b) = (ip_to_u128(first), ip_to_u128(last));
        if a > b {
            return Err(format!("{first} comes after {last}"));
        }
        Ok(Self {
            family,
            first: a,
            last: b,
            prefix_len: None,
        })
    }

    /// Number of addresses; saturates at `u128::MAX` for the whole IPv6 space.
    pub fn size(&self) -> u128 {
        (self.last - self.first).saturating_add(1)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        IpFamily::of(ip) == self.family && (self.first..=self.last).contains(&ip_to_u128(ip))
    }

    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.family == other.family && self.first <= other.last && other.first <= self.last
    }

    pub fn first_ip(&self) -> IpAddr {
        u128_to_ip(self.family, self.first)
    }

    pub fn last_ip(&self) -> IpAddr {
        u128_to_ip(self.family, self.last)
    }

    /// The smallest set of CIDR blocks that covers the range exactly. A range splits into at
    /// most two blocks per bit, so this stays small for any range.
    pub fn to_cidrs(&self) -> Vec<(IpAddr, u8)> {
        let bits = u32::from(self.family.bits());
        let mut blocks = Vec::new();
        let mut start = self.first;
        loop {
            // The largest block that starts at `start` (alignment) and ends within the range.
            let align = if start == 0 {
                bits
            } else {
                start.trailing_zeros().min(bits)
            };
            let mut size_log = align;
            while size_log > 0 && block_end(start, size_log) > self.last {
                size_log -= 1;
            }
            let prefix = u8::try_from(bits - size_log).unwrap_or(0);
            blocks.push((u128_to_ip(self.family, start), prefix));
            let end = block_end(start, size_log);
            if end >= self.last {
                return blocks;
            }
            start = end + 1;
        }
    }
}

fn block_end(start: u128, size_log: u32) -> u128 {
    if size_log >= 128 {
        u128::MAX
    } else {
        start + ((1u128 << size_log) - 1)
    }
}

fn host_mask(bits: u8, prefix_len: u8) -> u128 {
    let host_bits = u32::from(bits - prefix_len);
    if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

impl FromStr for AddrRange {
    type Err = String;

    /// Accepts `172.16.0.240/28`, `fd00::/64`, `10.0.0.10-10.0.0.20` (spaces around the dash
    /// allowed) and a single address, taken as a /32 or /128.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("is empty".into());
        }
        if let Some((ip, len)) = s.split_once('/') {
            let ip: IpAddr = ip
                .trim()
                .parse()
                .map_err(|_| format!("{:?} is not an IP address", echo(ip.trim())))?;
            let len: u8 = len
                .trim()
                .parse()
                .map_err(|_| format!("{:?} is not a prefix length", echo(len.trim())))?;
            return Self::cidr(ip, len);
        }
        if let Some((a, b)) = s.split_once('-') {
            let a: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| format!("{:?} is not an IP address", echo(a.trim())))?;
            let b: IpAddr = b
                .trim()
                .parse()
                .map_err(|_| format!("{:?} is not an IP address", echo(b.trim())))?;
            return Self::span(a, b);
        }
        let ip: IpAddr = s
            .parse()
            .map_err(|_| "is neither a CIDR, a first-last range nor an IP address".to_string())?;
        Self::cidr(ip, IpFamily::of(ip).bits())
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len {
            Some(len) => write!(f, "{}/{}", self.first_ip(), len),
            None => write!(f, "{}-{}", self.first_ip(), self.last_ip()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> AddrRange {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_cidrs_ranges_and_single_addresses() {
        let lab = r("172.16.0.240/28");
        assert_eq!(lab.size(), 16);
        assert_eq!(lab.first_ip().to_string(), "172.16.0.240");
        assert_eq!(lab.last_ip().to_string(), "172.16.0.255");
        assert_eq!(r("10.0.0.10 - 10.0.0.20").size(), 11);
        assert_eq!(r("10.0.0.7").size(), 1);
        assert_eq!(r("fd00::/64").size(), 1u128 << 64);
        assert_eq!(r("::/0").size(), u128::MAX);
        assert_eq!(r("2001:db8::1").to_string(), "2001:db8::1/128");
    }

    #[test]
    fn rejects_bad_ranges_with_reasons() {
        let err = |s: &str| s.parse::<AddrRange>().expect_err(s);
        assert!(
            err("172.16.0.241/28").contains("host bits are set (the network is 172.16.0.240/28)")
        );
        assert!(err("10.0.0.0/33").contains("longer than 32 bits"));
        assert!(err("10.0.0.9-10.0.0.1").contains("comes after"));
        assert!(err("10.0.0.1-fd00::1").contains("mixes IPv4 and IPv6"));
        assert!(err("10.0.0.256/24").contains("not an IP address"));
        assert!(err("").contains("empty"));
        assert!(err("pool").contains("neither"));
    }

    #[test]
    fn ranges_split_into_minimal_cidrs() {
        let cidrs = |s: &str| -> Vec<String> {
            r(s).to_cidrs()
                .into_iter()
                .map(|(ip, len)| format!("{ip}/{len}"))
                .collect()
        };
        assert_eq!(cidrs("172.16.0.240/28"), ["172.16.0.240/28"]);
        assert_eq!(
            cidrs("10.0.0.1-10.0.0.6"),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(cidrs("0.0.0.0-255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(cidrs("::/0"), ["::/0"]);
        assert_eq!(cidrs("fd00::-fd00::ffff:ffff:ffff:ffff"), ["fd00::/64"]);
        // A worst-case range stays within two blocks per bit.
        assert!(r("0.0.0.1-255.255.255.254").to_cidrs().len() <= 64);
    }

    #[test]
    fn keys_round_trip_and_sort_by_address() {
        for s in [
            "0.0.0.0",
            "172.16.0.241",
            "255.255.255.255",
            "::",
            "fd00::1",
        ] {
            let ip: IpAddr = s.parse().expect("test address");
            assert_eq!(ip_from_key(&ip_key(ip)), Some(ip));
        }
        let a: IpAddr = "10.0.0.2".parse().expect("test address");
        let b: IpAddr = "10.0.0.10".parse().expect("test address");
        assert!(ip_key(a) < ip_key(b));
        assert_eq!(ip_from_key(&[1, 2, 3]), None);
    }
}
