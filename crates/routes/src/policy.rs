//! The BGP policy: the local ASN, how each node's router id and session source address
//! are chosen, the peers (with node selectors) and the advertisement rules (per pool, with
//! node selectors). Raw `*Input` values come from the API; [`BgpPolicy::from_input`] checks
//! every field, fills in the defaults and returns the policy [`crate::compute()`] uses.
//!
//! Field names in errors are relative to the policy message (`peers[1].hold_time`); use
//! [`FieldError::within`] to prefix them.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use herald_model::selector::is_dns_label;
use herald_model::{FieldError, IpFamily, LabelSelector, PoolName};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::community::{Community, LargeCommunity};
use crate::facts::Node;

/// A peer's name, unique within the policy.
pub type PeerName = String;

/// The well-known BGP port.
pub const DEFAULT_PEER_PORT: u16 = 179;
/// RFC 4271's suggested hold time, and what MetalLB, Cilium and Calico default to.
pub const DEFAULT_HOLD_TIME: u16 = 90;
/// Matches herald-bgp's engine default; the engine backs off from here to 60 s.
pub const DEFAULT_CONNECT_RETRY_SECS: u16 = 5;
/// RFC 4724's usual restart time, and the FEATURES default.
pub const DEFAULT_RESTART_TIME: u16 = 120;
/// The restart time is a 12-bit field in the graceful restart capability.
pub const MAX_RESTART_TIME: u16 = 4095;
/// Linux `TCP_MD5SIG_MAXKEYLEN`.
pub const MAX_MD5_PASSWORD_LEN: usize = 80;
/// RFC 6793's placeholder for a 4-octet ASN on 2-octet sessions; never a real AS.
pub const AS_TRANS: u32 = 23456;
/// BFD's default intervals and multiplier: a failure is detected within 900 ms, what
/// FRR and most ToR vendors default to.
pub const DEFAULT_BFD_INTERVAL_MS: u32 = 300;
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;
/// FRR's bounds on a BFD interval; faster than 10 ms is for hardware, not a daemon.
pub const BFD_INTERVAL_MS: std::ops::RangeInclusive<u32> = 10..=60_000;
/// Bounds on list sizes, far above real configurations, so one request cannot make the
/// server do unbounded work.
pub const MAX_PEERS: usize = 256;
pub const MAX_RULES: usize = 256;
pub const MAX_COMMUNITIES: usize = 64;

/// How a node's BGP router id is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum RouterIdRule {
    /// The node's first IPv4 address (Calico and Cilium's default).
    #[default]
    FirstIpv4,
    /// The node's first IPv4 address inside this subnet (e.g. the ToR-facing VLAN).
    Ipv4InSubnet(Ipv4Net),
}

impl RouterIdRule {
    pub fn resolve(&self, node: &Node) -> Option<Ipv4Addr> {
        match self {
            Self::FirstIpv4 => node.first_ipv4(),
            Self::Ipv4InSubnet(net) => node.addresses.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) if net.contains(v4) => Some(*v4),
                _ => None,
            }),
        }
    }
}

/// Which node address a session is opened from. It is also the next hop of the prefixes
/// of the session's own family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SourceAddressRule {
    /// The node's first address of the peer address's family.
    #[default]
    FirstOfPeerFamily,
    /// The node's first address inside this subnet; must be of the peer's family.
    InSubnet(IpNet),
}

impl SourceAddressRule {
    pub fn resolve(&self, node: &Node, family: IpFamily) -> Option<IpAddr> {
        match self {
            Self::FirstOfPeerFamily => node.first_address(family),
            Self::InSubnet(net) => node.addresses.iter().copied().find(|ip| net.contains(ip)),
        }
    }
}

/// A TCP-MD5 password: compared and stored like a string, never printed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A peer as the API sends it. `None` means "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInput {
    pub name: String,
    pub address: String,
    pub asn: u32,
    /// Overrides the policy's local ASN for this peer.
    pub local_asn: Option<u32>,
    pub port: Option<u32>,
    /// Empty selects every node.
    pub node_selector: LabelSelector,
    /// Address families announced on the session; empty means the family of `address`.
    pub families: Vec<IpFamily>,
    pub hold_time: Option<u32>,
    pub keepalive: Option<u32>,
    pub connect_retry: Option<u32>,
    pub md5_password: Option<String>,
    pub multihop_ttl: Option<u32>,
    pub graceful_restart: bool,
    pub restart_time: Option<u32>,
    pub passive: bool,
    pub source_address: SourceAddressRule,
    /// Most prefixes the peer may send (`None`: no limit).
    pub max_prefixes: Option<u32>,
    /// `Some` runs BFD with the peer.
    pub bfd: Option<BfdInput>,
}

/// A peer's BFD settings as the API sends them. `None` means "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BfdInput {
    pub min_rx_ms: Option<u32>,
    pub min_tx_ms: Option<u32>,
    pub multiplier: Option<u32>,
    pub multihop: bool,
}

/// Validated BFD settings of one peer (RFC 5880 asynchronous mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BfdSettings {
    /// Required Min RX Interval, milliseconds.
    pub min_rx_ms: u32,
    /// Desired Min TX Interval once Up, milliseconds.
    pub min_tx_ms: u32,
    pub multiplier: u8,
    /// RFC 5883 multihop rather than RFC 5881 single-hop.
    pub multihop: bool,
}

impl BfdSettings {
    fn from_input(input: &BfdInput) -> Result<Self, FieldError> {
        let interval = |field: &'static str, v: Option<u32>| match v {
            None => Ok(DEFAULT_BFD_INTERVAL_MS),
            Some(ms) if BFD_INTERVAL_MS.contains(&ms) => Ok(ms),
            Some(ms) => Err(FieldError::new(
                field,
                ms,
                format!(
                    "must be {} to {} milliseconds",
                    BFD_INTERVAL_MS.start(),
                    BFD_INTERVAL_MS.end()
                ),
            )),
        };
        let multiplier = match input.multiplier {
            None => DEFAULT_BFD_MULTIPLIER,
            Some(m) => u8::try_from(m)
                .ok()
                .filter(|m| *m != 0)
                .ok_or_else(|| FieldError::new("bfd.multiplier", m, "must be 1 to 255"))?,
        };
        Ok(Self {
            min_rx_ms: interval("bfd.min_rx_ms", input.min_rx_ms)?,
            min_tx_ms: interval("bfd.min_tx_ms", input.min_tx_ms)?,
            multiplier,
            multihop: input.multihop,
        })
    }
}

/// An advertisement rule as the API sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdvertisementInput {
    /// `None` or empty: every pool.
    pub pool: Option<String>,
    /// Announce /32 and /128 host routes; default true.
    pub host_routes: Option<bool>,
    pub aggregation_length_v4: Option<u32>,
    pub aggregation_length_v6: Option<u32>,
    pub communities: Vec<String>,
    pub large_communities: Vec<String>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    /// Empty selects every node.
    pub node_selector: LabelSelector,
    /// Peer names the rule applies to; empty means every peer.
    pub peers: Vec<String>,
    /// Withdraw a Cluster Service's routes while it has no ready endpoint anywhere
    /// (MetalLB and Cilium keep announcing it; this is the opt-in to stop).
    pub withdraw_without_endpoints: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpPolicyInput {
    pub local_asn: u32,
    pub router_id: RouterIdRule,
    pub peers: Vec<PeerInput>,
    pub advertisements: Vec<AdvertisementInput>,
}

/// A validated peer with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: PeerName,
    pub address: IpAddr,
    pub asn: u32,
    pub local_asn: Option<u32>,
    pub port: u16,
    pub node_selector: LabelSelector,
    /// Sorted, not empty.
    pub families: Vec<IpFamily>,
    /// Seconds: 0 (no keepalives) or at least 3.
    pub hold_time: u16,
    /// Seconds: 0 when the hold time is 0, else 1 to hold time - 1.
    pub keepalive: u16,
    pub connect_retry: u16,
    pub md5_password: Option<Password>,
    pub multihop_ttl: Option<u8>,
    pub graceful_restart: bool,
    pub restart_time: u16,
    pub passive: bool,
    pub source_address: SourceAddressRule,
    /// Most prefixes the peer may send (`None`: no limit). Policies stored before the
    /// field existed read as no limit.
    #[serde(default)]
    pub max_prefixes: Option<u32>,
    /// Policies stored before BFD existed have none.
    #[serde(default)]
    pub bfd: Option<BfdSettings>,
}

/// A validated advertisement rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisementRule {
    /// `None`: every pool.
    pub pool: Option<PoolName>,
    pub host_routes: bool,
    pub aggregation_length_v4: Option<u8>,
    pub aggregation_length_v6: Option<u8>,
    pub communities: Vec<Community>,
    pub large_communities: Vec<LargeCommunity>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub node_selector: LabelSelector,
    /// Empty: every peer.
    pub peers: Vec<PeerName>,
    pub withdraw_without_endpoints: bool,
}

impl AdvertisementRule {
    pub fn selects_pool(&self, pool: &PoolName) -> bool {
        self.pool.as_ref().is_none_or(|p| p == pool)
    }

    pub fn selects_peer(&self, peer: &str) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| p == peer)
    }

    pub fn aggregation_length(&self, family: IpFamily) -> Option<u8> {
        match family {
            IpFamily::V4 => self.aggregation_length_v4,
            IpFamily::V6 => self.aggregation_length_v6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpPolicy {
    pub local_asn: u32,
    pub router_id: RouterIdRule,
    pub peers: Vec<Peer>,
    /// Order matters only for LOCAL_PREF and MED: the first matching rule that sets one wins.
    /// At most [`MAX_RULES`]; the computation ignores rules past that bound.
    pub advertisements: Vec<AdvertisementRule>,
}

impl BgpPolicy {
    /// Validates every field. With `known_pools`, a rule naming another pool is refused;
    /// without, pool names are only checked for form (the store checks them later).
    pub fn from_input(
        input: BgpPolicyInput,
        known_pools: Option<&[PoolName]>,
    ) -> Result<Self, FieldError> {
        validate_asn("local_asn", input.local_asn)?;
        if input.peers.len() > MAX_PEERS {
            return Err(FieldError::new(
                "peers",
                input.peers.len(),
                format!("at most {MAX_PEERS} peers"),
            ));
        }
        if input.advertisements.len() > MAX_RULES {
            return Err(FieldError::new(
                "advertisements",
                input.advertisements.len(),
                format!("at most {MAX_RULES} rules"),
            ));
        }
        let mut peers: Vec<Peer> = Vec::with_capacity(input.peers.len());
        for (i, p) in input.peers.into_iter().enumerate() {
            let at = format!("peers[{i}]");
            let peer = Peer::from_input(p, input.local_asn).map_err(|e| e.within(&at))?;
            if let Some(j) = peers.iter().position(|o| o.name == peer.name) {
                return Err(FieldError::new(
                    format!("{at}.name"),
                    &peer.name,
                    format!("is also the name of peers[{j}]"),
                ));
            }
            if let Some(j) = peers
                .iter()
                .position(|o| o.address == peer.address && o.port == peer.port)
            {
                return Err(FieldError::new(
                    format!("{at}.address"),
                    format!("{}:{}", peer.address, peer.port),
                    format!("peers[{j}] already has this address and port"),
                ));
            }
            peers.push(peer);
        }
        let mut advertisements = Vec::with_capacity(input.advertisements.len());
        for (i, r) in input.advertisements.into_iter().enumerate() {
            let at = format!("advertisements[{i}]");
            let rule = AdvertisementRule::from_input(r, &peers, input.local_asn, known_pools)
                .map_err(|e| e.within(&at))?;
            advertisements.push(rule);
        }
        Ok(Self {
            local_asn: input.local_asn,
            router_id: input.router_id,
            peers,
            advertisements,
        })
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }
}

impl Peer {
    fn from_input(input: PeerInput, policy_asn: u32) -> Result<Self, FieldError> {
        if input.name.len() > 63 || !is_dns_label(&input.name) {
            return Err(FieldError::new(
                "name",
                &input.name,
                "must be 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
            ));
        }
        let address: IpAddr = input
            .address
            .trim()
            .parse()
            .map_err(|_| FieldError::new("address", &input.address, "is not an IP address"))?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(FieldError::new(
                "address",
                address,
                "must be a unicast address",
            ));
        }
        validate_asn("asn", input.asn)?;
        if let Some(asn) = input.local_asn {
            validate_asn("local_asn", asn)?;
        }
        let port = match input.port {
            None => DEFAULT_PEER_PORT,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| FieldError::new("port", p, "must be 1 to 65535"))?,
        };
        input.node_selector.validate("node_selector")?;
        let mut families = input.families.clone();
        families.sort();
        families.dedup();
        if families.is_empty() {
            // What the API promises: a ToR that was not asked for another family is not
            // offered it in the OPEN (it may refuse the capability and the session).
            families = vec![IpFamily::of(address)];
        }
        let hold_time = match input.hold_time {
            None => DEFAULT_HOLD_TIME,
            Some(h @ (0 | 3..=65535)) => u16::try_from(h).unwrap_or(u16::MAX),
            Some(h) => {
                return Err(FieldError::new(
                    "hold_time",
                    h,
                    "must be 0 (no keepalives) or 3 to 65535 seconds (RFC 4271)",
                ));
            }
        };
        let keepalive = match (input.keepalive, hold_time) {
            (None, h) => h / 3,
            (Some(0), 0) => 0,
            (Some(k), 0) => {
                return Err(FieldError::new(
                    "keepalive",
                    k,
                    "must be 0 when the hold time is 0",
                ));
            }
            (Some(k), h) if k >= 1 && k < u32::from(h) => u16::try_from(k).unwrap_or(h),
            (Some(k), h) => {
                return Err(FieldError::new(
                    "keepalive",
                    k,
                    format!(
                        "must be 1 to {} seconds (less than the hold time {h})",
                        h - 1
                    ),
                ));
            }
        };
        let connect_retry = match input.connect_retry {
            None => DEFAULT_CONNECT_RETRY_SECS,
            Some(c) => u16::try_from(c)
                .ok()
                .filter(|c| *c != 0)
                .ok_or_else(|| FieldError::new("connect_retry", c, "must be 1 to 65535 seconds"))?,
        };
        let md5_password = match input.md5_password {
            None => None,
            Some(p) if p.is_empty() || p.len() > MAX_MD5_PASSWORD_LEN => {
                // The value is a secret: name its length, never its text.
                return Err(FieldError::new(
                    "md5_password",
                    format!("<{} bytes>", p.len()),
                    format!("must be 1 to {MAX_MD5_PASSWORD_LEN} bytes"),
                ));
            }
            Some(p) => Some(Password(p)),
        };
        let multihop_ttl = match input.multihop_ttl {
            None => None,
            Some(t) => Some(
                u8::try_from(t)
                    .ok()
                    .filter(|t| *t != 0)
                    .ok_or_else(|| FieldError::new("multihop_ttl", t, "must be 1 to 255"))?,
            ),
        };
        let restart_time = match input.restart_time {
            None => DEFAULT_RESTART_TIME,
            Some(t) => u16::try_from(t)
                .ok()
                .filter(|t| *t <= MAX_RESTART_TIME)
                .ok_or_else(|| {
                    FieldError::new(
                        "restart_time",
                        t,
                        format!("must be 0 to {MAX_RESTART_TIME} seconds (RFC 4724)"),
                    )
                })?,
        };
        if let SourceAddressRule::InSubnet(net) = input.source_address
            && IpFamily::of(net.addr()) != IpFamily::of(address)
        {
            return Err(FieldError::new(
                "source_address",
                net,
                format!("is not of the peer address's family ({address})"),
            ));
        }
        let bfd = input
            .bfd
            .as_ref()
            .map(BfdSettings::from_input)
            .transpose()?;
        // Only the effective local ASN matters for eBGP/iBGP; keep the override only
        // when it differs, so equal policies compare equal.
        let local_asn = input.local_asn.filter(|asn| *asn != policy_asn);
        Ok(Self {
            name: input.name,
            address,
            asn: input.asn,
            local_asn,
            port,
            node_selector: input.node_selector,
            families,
            hold_time,
            keepalive,
            connect_retry,
            md5_password,
            multihop_ttl,
            graceful_restart: input.graceful_restart,
            restart_time,
            passive: input.passive,
            source_address: input.source_address,
            max_prefixes: input.max_prefixes.filter(|m| *m > 0),
            bfd,
        })
    }

    pub fn effective_local_asn(&self, policy_asn: u32) -> u32 {
        self.local_asn.unwrap_or(policy_asn)
    }
}

impl AdvertisementRule {
    fn from_input(
        input: AdvertisementInput,
        peers: &[Peer],
        policy_asn: u32,
        known_pools: Option<&[PoolName]>,
    ) -> Result<Self, FieldError> {
        let pool = match input.pool.as_deref() {
            None | Some("") => None,
            Some(name) => {
                let name = PoolName::parse("pool", name)?;
                if known_pools.is_some_and(|known| !known.contains(&name)) {
                    return Err(FieldError::new("pool", &name, "no such pool"));
                }
                Some(name)
            }
        };
        let aggregation_length_v4 =
            aggregation("aggregation_length_v4", input.aggregation_length_v4, 32)?;
        let aggregation_length_v6 =
            aggregation("aggregation_length_v6", input.aggregation_length_v6, 128)?;
        for (field, n) in [
            ("communities", input.communities.len()),
            ("large_communities", input.large_communities.len()),
        ] {
            if n > MAX_COMMUNITIES {
                return Err(FieldError::new(
                    field,
                    n,
                    format!("at most {MAX_COMMUNITIES}"),
                ));
            }
        }
        let mut communities = Vec::with_capacity(input.communities.len());
        for (i, text) in input.communities.iter().enumerate() {
            let c: Community = text
                .parse()
                .map_err(|r| FieldError::new(format!("communities[{i}]"), text, r))?;
            communities.push(c);
        }
        let mut large_communities = Vec::with_capacity(input.large_communities.len());
        for (i, text) in input.large_communities.iter().enumerate() {
            let c: LargeCommunity = text
                .parse()
                .map_err(|r| FieldError::new(format!("large_communities[{i}]"), text, r))?;
            large_communities.push(c);
        }
        communities.sort();
        communities.dedup();
        large_communities.sort();
        large_communities.dedup();
        input.node_selector.validate("node_selector")?;
        let mut named = BTreeSet::new();
        for (i, name) in input.peers.iter().enumerate() {
            if !peers.iter().any(|p| &p.name == name) {
                return Err(FieldError::new(
                    format!("peers[{i}]"),
                    name,
                    "no such peer in this policy",
                ));
            }
            named.insert(name.clone());
        }
        if input.local_pref.is_some() && !named.is_empty() {
            // LOCAL_PREF is never sent to eBGP peers (RFC 4271 §5.1.5); a rule that only
            // names eBGP peers would set it for nothing, which is surely a mistake.
            let all_ebgp = peers
                .iter()
                .filter(|p| named.contains(&p.name))
                .all(|p| p.asn != p.effective_local_asn(policy_asn));
            if all_ebgp {
                return Err(FieldError::new(
                    "local_pref",
                    input.local_pref.unwrap_or_default(),
                    "only iBGP peers receive LOCAL_PREF, and every peer this rule names is eBGP",
                ));
            }
        }
        Ok(Self {
            pool,
            host_routes: input.host_routes.unwrap_or(true),
            aggregation_length_v4,
            aggregation_length_v6,
            communities,
            large_communities,
            local_pref: input.local_pref,
            med: input.med,
            node_selector: input.node_selector,
            peers: named.into_iter().collect(),
            withdraw_without_endpoints: input.withdraw_without_endpoints,
        })
    }
}

fn aggregation(field: &str, value: Option<u32>, bits: u32) -> Result<Option<u8>, FieldError> {
    match value {
        None => Ok(None),
        Some(len @ 1..) if len <= bits => Ok(u8::try_from(len).ok()),
        Some(len) => Err(FieldError::new(
            field,
            len,
            format!("must be 1 to {bits} (0 would announce a default route)"),
        )),
    }
}

fn validate_asn(field: &str, asn: u32) -> Result<(), FieldError> {
    match asn {
        0 => Err(FieldError::new(
            field,
            asn,
            "must be 1 to 4294967295 (0 is reserved, RFC 7607)",
        )),
        AS_TRANS => Err(FieldError::new(
            field,
            asn,
            "is AS_TRANS, a placeholder that is never a real AS (RFC 6793)",
        )),
        _ => Ok(()),
    }
}
