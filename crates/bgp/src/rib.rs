//! The declarative RIB-out: the caller hands over the full desired set of
//! routes, [`AdjRibOut::diff`] works out what changed since the last call
//! and the UPDATEs that carry the change.
//!
//! Prefixes with identical attributes are grouped so one UPDATE carries as
//! many NLRI as fit (≈ 800 /32s in 4096 octets), which is what keeps 100k
//! routes within ⌈N/500⌉ UPDATEs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::wire::{
    AsSegment, Attribute, BuildOptions, EncodeError, LargeCommunity, Origin, Update,
    build_announcements, build_withdrawals,
};

/// The desired routes: prefix → attributes. The whole set is handed over on
/// every change (see [`crate::driver::PeerHandle::set_desired`]).
///
/// A node's routes nearly all carry the same few attribute sets, so each route holds a
/// pointer to its attributes ([`SharedAttributes`]) rather than a copy: give equal
/// attributes one `Arc` (e.g. with [`AttributeInterner`]) and 100k routes cost about
/// 30 bytes each instead of about 150.
pub type Routes = BTreeMap<IpNet, SharedAttributes>;

/// One route's attributes, shared by every route that carries the same.
pub type SharedAttributes = Arc<RouteAttributes>;

/// Hands out one [`SharedAttributes`] per distinct attribute set, so the routes built
/// through it share their attributes.
#[derive(Debug, Default)]
pub struct AttributeInterner {
    known: HashMap<RouteAttributes, SharedAttributes>,
}

impl AttributeInterner {
    /// Distinct attribute sets remembered at most; past it new ones are handed out
    /// unshared, so a set of all-different routes cannot grow the interner without
    /// bound (their routes need their own copies anyway).
    pub const MAX_DISTINCT: usize = 4096;

    pub fn new() -> Self {
        Self::default()
    }

    /// The shared copy of `attrs`.
    pub fn intern(&mut self, attrs: RouteAttributes) -> SharedAttributes {
        if let Some(shared) = self.known.get(&attrs) {
            return Arc::clone(shared);
        }
        let shared = Arc::new(attrs);
        if self.known.len() < Self::MAX_DISTINCT {
            self.known
                .insert(RouteAttributes::clone(&shared), Arc::clone(&shared));
        }
        shared
    }

    /// Remembers `shared` as the copy of its attributes (a route already held), so
    /// routes interned later share it.
    pub fn adopt(&mut self, shared: &SharedAttributes) {
        if self.known.len() < Self::MAX_DISTINCT && !self.known.contains_key(&**shared) {
            self.known
                .insert(RouteAttributes::clone(shared), Arc::clone(shared));
        }
    }
}

/// Attributes of one route as the caller sees them. Session-dependent parts
/// (local AS prepend, next-hop-self, LOCAL_PREF only on iBGP) are applied by
/// [`ExportPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RouteAttributes {
    /// `None`: next-hop-self (the session's local address).
    pub next_hop: Option<IpAddr>,
    pub origin: Origin,
    /// ASNs placed after the local AS (eBGP) — e.g. prepends of our own AS
    /// to make the path less preferred. Sent as one AS_SEQUENCE.
    pub as_path: Vec<u32>,
    pub med: Option<u32>,
    /// Sent on iBGP sessions only (RFC 4271 §5.1.5); `None` means 100 there.
    pub local_pref: Option<u32>,
    /// RFC 1997 communities, `(asn << 16) | value`.
    pub communities: Vec<u32>,
    pub large_communities: Vec<LargeCommunity>,
}

/// Default LOCAL_PREF on iBGP when the route does not set one (the value
/// every implementation assumes).
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// How routes are turned into attributes for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportPolicy {
    pub local_asn: u32,
    /// eBGP: prepend the local AS and drop LOCAL_PREF.
    pub ebgp: bool,
    /// The session's local address, for next-hop-self.
    pub local_addr: IpAddr,
    pub build: BuildOptions,
}

impl ExportPolicy {
    /// The wire attributes (without next hop) and the next hop for a route.
    pub fn attributes(&self, r: &RouteAttributes) -> (Vec<Attribute>, IpAddr) {
        let mut path = Vec::with_capacity(r.as_path.len() + 1);
        if self.ebgp {
            // RFC 4271 §5.1.2: a speaker prepends its own AS towards eBGP peers.
            path.push(self.local_asn);
        }
        path.extend_from_slice(&r.as_path);
        let segments = if path.is_empty() {
            Vec::new()
        } else {
            vec![AsSegment::Sequence(path)]
        };
        let mut attrs = vec![Attribute::Origin(r.origin), Attribute::AsPath(segments)];
        if let Some(med) = r.med {
            attrs.push(Attribute::Med(med));
        }
        if !self.ebgp {
            attrs.push(Attribute::LocalPref(
                r.local_pref.unwrap_or(DEFAULT_LOCAL_PREF),
            ));
        }
        if !r.communities.is_empty() {
            attrs.push(Attribute::Communities(r.communities.clone()));
        }
        if !r.large_communities.is_empty() {
            attrs.push(Attribute::LargeCommunities(r.large_communities.clone()));
        }
        (attrs, r.next_hop.unwrap_or(self.local_addr))
    }
}

/// What one [`AdjRibOut::diff`] decided to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RibDiff {
    pub updates: Vec<Update>,
    pub announced: usize,
    pub withdrawn: usize,
}

/// What has been sent to one peer on the current connection.
#[derive(Debug, Clone, Default)]
pub struct AdjRibOut {
    /// Shared with the desired set it was last brought in line with when every route of
    /// it could be encoded (nearly always), so a session holds its routes once, not twice.
    sent: Arc<Routes>,
}

/// The UPDATEs that take the peer from what was sent to a desired set, and the changes
/// they make to what was sent (those that could be encoded).
struct Plan {
    diff: RibDiff,
    errors: Vec<(IpNet, EncodeError)>,
    withdrawn: Vec<IpNet>,
    /// Prefixes announced, with the desired set's attributes.
    announced: Vec<IpNet>,
}

impl AdjRibOut {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything (the connection dropped, so the peer forgot too).
    pub fn clear(&mut self) {
        self.sent = Arc::default();
    }

    /// Number of prefixes currently advertised.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    pub fn sent(&self) -> &Arc<Routes> {
        &self.sent
    }

    /// Computes the UPDATEs that take the peer from what was sent to
    /// `desired`, and records `desired` as sent. Withdrawals come first so a
    /// prefix count never overshoots at the peer. Prefixes the policy cannot
    /// encode (e.g. an IPv4 route with an IPv6 next hop on a classic-NLRI
    /// session) are skipped and reported in the error list.
    pub fn diff(
        &mut self,
        desired: &Routes,
        policy: &ExportPolicy,
    ) -> (RibDiff, Vec<(IpNet, EncodeError)>) {
        let plan = self.plan(desired, policy);
        self.record(&plan, desired);
        (plan.diff, plan.errors)
    }

    /// As [`Self::diff`], keeping `desired` itself as what was sent when every route was
    /// encoded, instead of a copy.
    pub fn diff_shared(
        &mut self,
        desired: &Arc<Routes>,
        policy: &ExportPolicy,
    ) -> (RibDiff, Vec<(IpNet, EncodeError)>) {
        let plan = self.plan(desired, policy);
        if plan.errors.is_empty() {
            // Everything withdrawn and announced: what was sent is now exactly `desired`.
            self.sent = Arc::clone(desired);
        } else {
            self.record(&plan, desired);
        }
        (plan.diff, plan.errors)
    }

    fn record(&mut self, plan: &Plan, desired: &Routes) {
        if plan.withdrawn.is_empty() && plan.announced.is_empty() {
            return;
        }
        let sent = Arc::make_mut(&mut self.sent);
        for p in &plan.withdrawn {
            sent.remove(p);
        }
        for p in &plan.announced {
            if let Some(a) = desired.get(p) {
                sent.insert(*p, Arc::clone(a));
            }
        }
    }

    fn plan(&self, desired: &Routes, policy: &ExportPolicy) -> Plan {
        let withdraw: Vec<IpNet> = self
            .sent
            .keys()
            .filter(|p| !desired.contains_key(*p))
            .copied()
            .collect();
        // Group changed routes by identical attributes.
        let mut groups: BTreeMap<&RouteAttributes, Vec<IpNet>> = BTreeMap::new();
        for (p, a) in desired {
            if self.sent.get(p) != Some(a) {
                groups.entry(&**a).or_default().push(*p);
            }
        }
        let mut out = Plan {
            diff: RibDiff::default(),
            errors: Vec::new(),
            withdrawn: Vec::new(),
            announced: Vec::new(),
        };
        if !withdraw.is_empty() {
            match build_withdrawals(&withdraw, &policy.build) {
                Ok(u) => {
                    out.diff.updates.extend(u);
                    out.diff.withdrawn = withdraw.len();
                    out.withdrawn = withdraw;
                }
                Err(e) => out.errors.extend(withdraw.iter().map(|p| (*p, e.clone()))),
            }
        }
        for (attrs, prefixes) in groups {
            let (wire_attrs, next_hop) = policy.attributes(attrs);
            match build_announcements(&wire_attrs, next_hop, &prefixes, &policy.build) {
                Ok(u) => {
                    out.diff.updates.extend(u);
                    out.diff.announced += prefixes.len();
                    out.announced.extend(prefixes);
                }
                Err(e) => out.errors.extend(prefixes.iter().map(|p| (*p, e.clone()))),
            }
        }
        out
    }

    /// Every UPDATE needed to announce all of `sent` again (ROUTE-REFRESH).
    pub fn full(&self, policy: &ExportPolicy) -> Vec<Update> {
        let mut groups: BTreeMap<&RouteAttributes, Vec<IpNet>> = BTreeMap::new();
        for (p, a) in self.sent.iter() {
            groups.entry(&**a).or_default().push(*p);
        }
        let mut out = Vec::new();
        for (attrs, prefixes) in groups {
            let (wire_attrs, next_hop) = policy.attributes(attrs);
            if let Ok(u) = build_announcements(&wire_attrs, next_hop, &prefixes, &policy.build) {
                out.extend(u);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::wire::{Ipv4NlriEncoding, Message, MpReach, MpUnreach, WireContext, encode_message};
    use std::net::Ipv4Addr;

    fn policy(ebgp: bool, ipv4: Ipv4NlriEncoding) -> ExportPolicy {
        ExportPolicy {
            local_asn: 65010,
            ebgp,
            local_addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)),
            build: BuildOptions {
                ipv4,
                ..BuildOptions::default()
            },
        }
    }

    fn host(i: u32) -> IpNet {
        IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap())
    }

    #[test]
    fn ten_thousand_equal_routes_pack_into_few_updates() {
        let desired: Routes = (0..10_000)
            .map(|i| (host(i), RouteAttributes::default().into()))
            .collect();
        for enc in [Ipv4NlriEncoding::Classic, Ipv4NlriEncoding::MpReach] {
            let mut rib = AdjRibOut::new();
            let (d, errs) = rib.diff(&desired, &policy(true, enc));
            assert!(errs.is_empty());
            assert_eq!(d.announced, 10_000);
            assert!(
                d.updates.len() <= 10_000usize.div_ceil(500),
                "{} updates",
                d.updates.len()
            );
            let ctx = WireContext::default();
            for u in &d.updates {
                let bytes = encode_message(&Message::Update(u.clone()), &ctx).unwrap();
                assert!(bytes.len() <= 4096);
            }
            let total: usize = d.updates.iter().map(|u| u.announced().len()).sum();
            assert_eq!(total, 10_000);
            // Nothing changed: nothing to send.
            let (again, _) = rib.diff(&desired, &policy(true, enc));
            assert!(again.updates.is_empty());
            // Withdraw all.
            let (w, _) = rib.diff(&Routes::new(), &policy(true, enc));
            assert_eq!(w.withdrawn, 10_000);
            assert!(w.updates.len() <= 10_000usize.div_ceil(500));
            let total: usize = w.updates.iter().map(|u| u.withdrawn_all().len()).sum();
            assert_eq!(total, 10_000);
            assert!(rib.is_empty());
        }
    }

    /// The session keeps the desired set itself as what was sent (one copy of its routes),
    /// and a copy with only what was encoded when a route could not be.
    #[test]
    fn what_was_sent_is_the_desired_set_itself_unless_a_route_failed() {
        let p = policy(true, Ipv4NlriEncoding::Classic);
        let desired: Arc<Routes> = Arc::new(
            (0..3)
                .map(|i| (host(i), RouteAttributes::default().into()))
                .collect(),
        );
        let mut rib = AdjRibOut::new();
        let (d, errors) = rib.diff_shared(&desired, &p);
        assert!(errors.is_empty());
        assert_eq!(d.announced, 3);
        assert!(Arc::ptr_eq(rib.sent(), &desired));
        // An IPv4 route with an IPv6 next hop cannot go in classic NLRI.
        let mut next = (*desired).clone();
        next.remove(&host(0));
        next.insert(
            host(7),
            RouteAttributes {
                next_hop: Some("fd00::1".parse().unwrap()),
                ..RouteAttributes::default()
            }
            .into(),
        );
        let next = Arc::new(next);
        let (d, errors) = rib.diff_shared(&next, &p);
        assert_eq!(errors.len(), 1);
        assert_eq!((d.withdrawn, d.announced), (1, 0));
        assert!(!Arc::ptr_eq(rib.sent(), &next));
        assert_eq!(
            rib.sent().keys().copied().collect::<Vec<_>>(),
            vec![host(1), host(2)]
        );
        // The plain diff keeps its own copy and agrees.
        let mut copy = AdjRibOut::new();
        copy.diff(&desired, &p);
        copy.diff(&next, &p);
        assert_eq!(copy.sent(), rib.sent());
    }

    #[test]
    fn the_interner_gives_equal_attributes_one_copy() {
        let mut interner = AttributeInterner::new();
        let med = |m| RouteAttributes {
            med: Some(m),
            ..RouteAttributes::default()
        };
        let a = interner.intern(med(1));
        let b = interner.intern(med(2));
        assert!(Arc::ptr_eq(&a, &interner.intern(med(1))));
        assert!(!Arc::ptr_eq(&a, &b));
        // A copy already held is handed out once adopted.
        let held: SharedAttributes = Arc::new(med(3));
        interner.adopt(&held);
        assert!(Arc::ptr_eq(&held, &interner.intern(med(3))));
        // Past the bound, new sets are still right, only no longer shared.
        for m in 4..=AttributeInterner::MAX_DISTINCT as u32 + 10 {
            assert_eq!(interner.intern(med(m)).med, Some(m));
        }
        assert_eq!(interner.known.len(), AttributeInterner::MAX_DISTINCT);
        assert!(Arc::ptr_eq(&b, &interner.intern(med(2))));
    }

    #[test]
    fn changed_attributes_resend_only_that_prefix() {
        let mut desired: Routes = (0..3)
            .map(|i| (host(i), RouteAttributes::default().into()))
            .collect();
        let mut rib = AdjRibOut::new();
        let p = policy(true, Ipv4NlriEncoding::MpReach);
        rib.diff(&desired, &p);
        Arc::make_mut(desired.get_mut(&host(1)).unwrap()).communities = vec![0xfde8_0001];
        let (d, _) = rib.diff(&desired, &p);
        assert_eq!(d.updates.len(), 1);
        assert_eq!(d.updates[0].announced(), vec![host(1)]);
        assert!(
            d.updates[0]
                .attributes
                .contains(&Attribute::Communities(vec![0xfde8_0001]))
        );
    }

    #[test]
    fn ebgp_prepends_local_as_and_uses_next_hop_self() {
        let p = policy(true, Ipv4NlriEncoding::MpReach);
        let (attrs, nh) = p.attributes(&RouteAttributes {
            as_path: vec![65010],
            local_pref: Some(200),
            ..Default::default()
        });
        assert_eq!(nh, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)));
        assert!(
            attrs.contains(&Attribute::AsPath(vec![AsSegment::Sequence(vec![
                65010, 65010
            ])]))
        );
        assert!(!attrs.iter().any(|a| matches!(a, Attribute::LocalPref(_))));
        let ibgp = policy(false, Ipv4NlriEncoding::MpReach);
        let (attrs, _) = ibgp.attributes(&RouteAttributes::default());
        assert!(attrs.contains(&Attribute::AsPath(vec![])));
        assert!(attrs.contains(&Attribute::LocalPref(DEFAULT_LOCAL_PREF)));
    }

    #[test]
    fn ipv6_goes_in_mp_reach_and_mp_unreach() {
        let p6: IpNet = "2001:db8::1/128".parse().unwrap();
        let desired: Routes = [(p6, RouteAttributes::default().into())].into();
        let mut rib = AdjRibOut::new();
        let (d, _) = rib.diff(&desired, &policy(true, Ipv4NlriEncoding::Classic));
        assert_eq!(d.updates.len(), 1);
        assert!(d.updates[0].attributes.iter().any(|a| matches!(
            a,
            Attribute::MpReach(MpReach::Ipv6Unicast { next_hop, .. }) if next_hop.to_ipv4_mapped() == Some(Ipv4Addr::new(127, 0, 0, 10))
        )));
        let (w, _) = rib.diff(&Routes::new(), &policy(true, Ipv4NlriEncoding::Classic));
        assert!(matches!(
            w.updates[0].attributes.as_slice(),
            [Attribute::MpUnreach(MpUnreach::Ipv6Unicast(v))] if v == &vec![match p6 { IpNet::V6(n) => n, IpNet::V4(_) => unreachable!() }]
        ));
    }
}
