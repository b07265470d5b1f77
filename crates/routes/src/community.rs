//! BGP communities as operators write them: standard (RFC 1997) `65000:100` or a
//! well-known name, and large (RFC 8092) `1:2:3`.

use std::fmt;
use std::str::FromStr;

use herald_model::echo;
use serde::{Deserialize, Serialize};

/// An RFC 1997 community, `(asn << 16) | value` — the form herald-bgp's
/// `RouteAttributes::communities` takes. Written and stored as `asn:value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Community(u32);

/// The well-known communities (RFC 1997, RFC 3765), accepted by name.
const WELL_KNOWN: [(&str, u32); 4] = [
    ("no-export", 0xFFFF_FF01),
    ("no-advertise", 0xFFFF_FF02),
    ("no-export-subconfed", 0xFFFF_FF03),
    ("no-peer", 0xFFFF_FF04),
];

impl Community {
    pub const fn new(asn: u16, value: u16) -> Self {
        Self(((asn as u32) << 16) | value as u32)
    }

    pub const fn from_u32(raw: u32) -> Self {
        Self(raw)
    }

    /// The 32-bit value sent on the wire.
    pub const fn value(self) -> u32 {
        self.0
    }
}

impl FromStr for Community {
    type Err = String;

    /// Accepts `asn:value` with both halves 0..=65535, or a well-known name
    /// (`no-export`, `no-advertise`, `no-export-subconfed`, `no-peer`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some((_, raw)) = WELL_KNOWN
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
        {
            return Ok(Self(*raw));
        }
        let (asn, value) = s.split_once(':').ok_or_else(|| {
            "must be ASN:VALUE (each 0 to 65535) or a well-known community name".to_string()
        })?;
        let half = |part: &str, what: &str| -> Result<u16, String> {
            part.trim()
                .parse::<u16>()
                .map_err(|_| format!("{what} {:?} is not a number from 0 to 65535", echo(part)))
        };
        Ok(Self::new(half(asn, "ASN")?, half(value, "value")?))
    }
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xFFFF)
    }
}

impl TryFrom<String> for Community {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Community> for String {
    fn from(c: Community) -> Self {
        c.to_string()
    }
}

/// An RFC 8092 large community: `global_admin:local_data1:local_data2`, each a u32.
/// Field names match herald-bgp's `LargeCommunity`, so the speaker maps it 1:1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LargeCommunity {
    pub global_admin: u32,
    pub local_data1: u32,
    pub local_data2: u32,
}

impl FromStr for LargeCommunity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [a, b, c] = parts.as_slice() else {
            return Err("must be GLOBAL:LOCAL1:LOCAL2 (each 0 to 4294967295)".into());
        };
        let part = |p: &str| -> Result<u32, String> {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{:?} is not a number from 0 to 4294967295", echo(p)))
        };
        Ok(Self {
            global_admin: part(a)?,
            local_data1: part(b)?,
            local_data2: part(c)?,
        })
    }
}

impl fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.global_admin, self.local_data1, self.local_data2
        )
    }
}

impl TryFrom<String> for LargeCommunity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LargeCommunity> for String {
    fn from(c: LargeCommunity) -> Self {
        c.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_communities_parse_and_print() {
        let ok: [(&str, u32, &str); 5] = [
            ("65000:100", (65000 << 16) | 100, "65000:100"),
            (" 0:0 ", 0, "0:0"),
            ("65535:65535", u32::MAX, "65535:65535"),
            ("no-export", 0xFFFF_FF01, "65535:65281"),
            ("NO-PEER", 0xFFFF_FF04, "65535:65284"),
        ];
        for (text, raw, shown) in ok {
            let c: Community = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.value(), raw, "{text}");
            assert_eq!(c.to_string(), shown, "{text}");
        }
        let bad: [(&str, &str); 5] = [
            ("65536:1", "ASN \"65536\""),
            ("1:70000", "value \"70000\""),
            ("100", "ASN:VALUE"),
            ("a:b", "ASN \"a\""),
            ("1:2:3", "value \"2:3\""),
        ];
        for (text, reason) in bad {
            let err = text.parse::<Community>().expect_err(text);
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn large_communities_parse_and_print() {
        let c: LargeCommunity = "4200000000:1:2".parse().expect("valid large community");
        assert_eq!(
            c,
            LargeCommunity {
                global_admin: 4_200_000_000,
                local_data1: 1,
                local_data2: 2
            }
        );
        assert_eq!(c.to_string(), "4200000000:1:2");
        for bad in ["1:2", "1:2:3:4", "1:x:3", "4294967296:0:0", ""] {
            assert!(bad.parse::<LargeCommunity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn communities_serialize_as_text() {
        let json = serde_json::to_string(&Community::new(65000, 100)).expect("serializes");
        assert_eq!(json, "\"65000:100\"");
        let back: Community = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, Community::new(65000, 100));
        assert!(serde_json::from_str::<Community>("\"65536:0\"").is_err());
    }
}
