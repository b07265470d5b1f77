//! GetAdvertisementStatus: desired (the last plan) against actual (the speakers' reports),
//! per service, node and peer. A report counts only while its speaker is live: following
//! its route stream here (when this replica has seen one) and reporting within three of
//! its report intervals. Every allocated Service appears, with the reason it is announced
//! nowhere when it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use herald_api::routing::v1 as pb;
use herald_routes::{BgpPolicy, Node, Plan, ServiceFacts, explain};
use ipnet::IpNet;

use super::engine::{SessionReport, SpeakerReport, StreamState};

/// Report interval assumed when a report does not say (the speaker's default).
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 10_000;
/// A speaker whose last report is older than this many report intervals is stale.
pub const STALE_INTERVALS: u64 = 3;
pub const DEFAULT_PAGE_SIZE: usize = 1_000;
pub const MAX_PAGE_SIZE: usize = 10_000;

/// The filters of one query (empty: no filter).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub node: String,
    pub peer: String,
    pub owner_uid: String,
    /// "namespace/name".
    pub service: String,
}

/// What the status is computed from.
pub struct Inputs<'a> {
    pub plan: &'a Plan,
    pub services: &'a [ServiceFacts],
    pub policy: Option<&'a BgpPolicy>,
    pub nodes: &'a BTreeMap<String, Node>,
    pub reports: &'a BTreeMap<String, (SpeakerReport, i64)>,
    pub streams: &'a HashMap<String, StreamState>,
    /// Unix µs.
    pub now: i64,
}

/// How a node's speaker stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Liveness {
    pub status: pb::SpeakerStatus,
    pub age_ms: u64,
    /// Why its report does not count (empty when live).
    pub why: String,
}

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// The liveness of `node`'s speaker at `now`.
pub fn liveness(
    node: &str,
    reports: &BTreeMap<String, (SpeakerReport, i64)>,
    streams: &HashMap<String, StreamState>,
    now: i64,
) -> Liveness {
    let Some((report, at)) = reports.get(node) else {
        return Liveness {
            status: pb::SpeakerStatus::NoReport,
            age_ms: 0,
            why: "speaker has not reported".into(),
        };
    };
    let age_ms = u64::try_from(now.saturating_sub(*at) / 1000).unwrap_or(0);
    let age = seconds(age_ms);
    if report.shutting_down {
        return Liveness {
            status: pb::SpeakerStatus::ShutDown,
            age_ms,
            why: format!("speaker shut down {age} ago"),
        };
    }
    // A report after the stream ended (the speaker follows another replica now, or came
    // back) outweighs it; a speaker killed with -9 reports nothing after.
    if let Some(closed_at) = streams
        .get(node)
        .and_then(|s| s.closed_at)
        .filter(|closed_at| closed_at >= at)
    {
        let gone = u64::try_from(now.saturating_sub(closed_at) / 1000).unwrap_or(0);
        return Liveness {
            status: pb::SpeakerStatus::Stale,
            age_ms,
            why: format!(
                "speaker stale: its route stream ended {} ago, last report {age} ago",
                seconds(gone)
            ),
        };
    }
    let interval = match report.report_interval_ms {
        0 => DEFAULT_REPORT_INTERVAL_MS,
        ms => ms,
    };
    if age_ms > interval.saturating_mul(STALE_INTERVALS) {
        return Liveness {
            status: pb::SpeakerStatus::Stale,
            age_ms,
            why: format!(
                "speaker stale: last report {age} ago, it reports every {}",
                seconds(interval)
            ),
        };
    }
    Liveness {
        status: pb::SpeakerStatus::Live,
        age_ms,
        why: String::new(),
    }
}

/// The sort key and page position of an entry.
pub fn position(e: &pb::AdvertisementEntry) -> String {
    format!("{}\n{}\n{}\n{}", e.owner_uid, e.prefix, e.node, e.peer)
}

fn owner_key(e: &pb::AdvertisementEntry) -> (&str, &str, &str, &str) {
    (&e.owner_uid, &e.prefix, &e.node, &e.peer)
}

/// Every entry matching `filter`, sorted by owner uid, prefix, node and peer.
pub fn entries(inputs: &Inputs<'_>, filter: &Filter) -> Vec<pb::AdvertisementEntry> {
    let mut owners: HashMap<IpNet, &ServiceFacts> = HashMap::new();
    for s in inputs.services {
        for a in s.ips.iter() {
            owners.insert(IpNet::from(a.ip), s);
        }
    }
    let owner_of = |prefix: &IpNet| owners.get(prefix).copied();
    let service_name = |s: &ServiceFacts| format!("{}/{}", s.owner.namespace, s.owner.name);
    let wanted_service = |s: Option<&ServiceFacts>| {
        (filter.owner_uid.is_empty() || s.is_some_and(|s| s.owner.uid == filter.owner_uid))
            && (filter.service.is_empty() || s.is_some_and(|s| service_name(s) == filter.service))
    };

    // What live speakers have on the wire, and where each prefix is desired.
    let mut live_announced: BTreeSet<IpNet> = BTreeSet::new();
    let mut desired_anywhere: BTreeSet<IpNet> = BTreeSet::new();
    // Desired prefixes whose session is live and Established.
    let mut desired_established: BTreeSet<IpNet> = BTreeSet::new();
    let mut out = Vec::new();

    let node_names: BTreeSet<&String> = inputs
        .plan
        .nodes
        .keys()
        .chain(inputs.reports.keys())
        .collect();
    for node in node_names {
        let live = liveness(node, inputs.reports, inputs.streams, inputs.now);
        let is_live = live.status == pb::SpeakerStatus::Live;
        let report = inputs.reports.get(node).map(|(r, _)| r);
        let routes = inputs.plan.nodes.get(node);
        let mut peers: BTreeSet<&str> = routes
            .map(|r| r.peers.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default();
        if let Some(r) = report {
            peers.extend(r.sessions.iter().map(|s| s.peer.as_str()));
        }
        for peer in peers {
            let desired: BTreeSet<IpNet> = routes
                .and_then(|r| r.routes.get(peer))
                .map(|r| r.keys().copied().collect())
                .unwrap_or_default();
            let actual: Option<&SessionReport> =
                report.and_then(|r| r.sessions.iter().find(|s| s.peer == peer));
            let reported: BTreeSet<IpNet> = actual
                .map(|a| a.announced.iter().filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default();
            let established = is_live && actual.is_some_and(|a| a.state == "Established");
            desired_anywhere.extend(desired.iter().copied());
            if established {
                desired_established.extend(desired.iter().copied());
            }
            if is_live {
                live_announced.extend(reported.iter().copied());
            }
            if (!filter.node.is_empty() && *node != filter.node)
                || (!filter.peer.is_empty() && peer != filter.peer)
            {
                continue;
            }
            for prefix in desired.union(&reported) {
                let owner = owner_of(prefix);
                if !wanted_service(owner) {
                    continue;
                }
                let is_desired = desired.contains(prefix);
                let is_announced = is_live && reported.contains(prefix);
                let state = match (is_live, actual) {
                    (false, _) => "Unknown".to_string(),
                    (true, Some(a)) => a.state.clone(),
                    (true, None) => "no such session in the report".to_string(),
                };
                let difference = if !is_live {
                    live.why.clone()
                } else {
                    match (is_desired, is_announced) {
                        (true, false) => format!("desired but not announced (session {state})"),
                        (false, true) => "announced but no longer desired".into(),
                        _ => String::new(),
                    }
                };
                out.push(pb::AdvertisementEntry {
                    owner_uid: owner.map(|o| o.owner.uid.clone()).unwrap_or_default(),
                    service: owner
                        .map(service_name)
                        .unwrap_or_else(|| "(aggregate)".into()),
                    prefix: prefix.to_string(),
                    node: node.clone(),
                    peer: peer.to_string(),
                    desired: is_desired,
                    announced: is_announced,
                    session_state: state,
                    difference,
                    speaker: live.status as i32,
                    report_age_ms: live.age_ms,
                    not_announced_reason: String::new(),
                });
            }
        }
    }

    // Every allocated address announced nowhere gets its reason; one with no entry at all
    // gets an entry of its own (unless the query is about a node or peer).
    let nodes: Vec<&Node> = inputs.nodes.values().collect();
    let mut reasons: HashMap<IpAddr, String> = HashMap::new();
    for svc in inputs.services.iter().filter(|s| wanted_service(Some(s))) {
        for assigned in svc.ips.iter() {
            if explain::covers(live_announced.iter(), assigned.ip) {
                continue;
            }
            let reason = if explain::covers(desired_established.iter(), assigned.ip) {
                "desired on an Established session but not sent (UPDATE pending or refused)".into()
            } else if explain::covers(desired_anywhere.iter(), assigned.ip) {
                "no Established session (with a live speaker) where it is desired".into()
            } else {
                explain::not_desired_reason(
                    svc,
                    assigned.ip,
                    &assigned.pool,
                    &nodes,
                    inputs.plan,
                    inputs.policy,
                )
            };
            reasons.insert(assigned.ip, reason);
        }
    }
    let mut with_entries: BTreeSet<IpAddr> = BTreeSet::new();
    for e in &mut out {
        if let Ok(net) = e.prefix.parse::<IpNet>()
            && net.prefix_len() == net.max_prefix_len()
            && let Some(reason) = reasons.get(&net.addr())
        {
            e.not_announced_reason = reason.clone();
            with_entries.insert(net.addr());
        }
    }
    if filter.node.is_empty() && filter.peer.is_empty() {
        for svc in inputs.services.iter().filter(|s| wanted_service(Some(s))) {
            for assigned in svc.ips.iter() {
                let Some(reason) = reasons.get(&assigned.ip) else {
                    continue;
                };
                if with_entries.contains(&assigned.ip) {
                    continue;
                }
                out.push(pb::AdvertisementEntry {
                    owner_uid: svc.owner.uid.clone(),
                    service: service_name(svc),
                    prefix: IpNet::from(assigned.ip).to_string(),
                    node: String::new(),
                    peer: String::new(),
                    desired: false,
                    announced: false,
                    session_state: String::new(),
                    difference: String::new(),
                    speaker: pb::SpeakerStatus::Unspecified as i32,
                    report_age_ms: 0,
                    not_announced_reason: reason.clone(),
                });
            }
        }
    }
    out.sort_by(|a, b| owner_key(a).cmp(&owner_key(b)));
    out
}

/// One page of `all` after `after` (a [`position`]), and the position of its last entry
/// when more follow.
pub fn page(
    all: Vec<pb::AdvertisementEntry>,
    after: Option<&str>,
    size: usize,
) -> (Vec<pb::AdvertisementEntry>, Option<String>) {
    let start = match after {
        None => 0,
        Some(after) => all.partition_point(|e| position(e).as_str() <= after),
    };
    let end = start.saturating_add(size).min(all.len());
    let more = end < all.len();
    let mut all = all;
    let page: Vec<_> = all.drain(start..end).collect();
    let next = if more {
        page.last().map(position)
    } else {
        None
    };
    (page, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shutting_down: bool, interval_ms: u64) -> SpeakerReport {
        SpeakerReport {
            applied_revision: 1,
            sessions: Vec::new(),
            report_interval_ms: interval_ms,
            shutting_down,
        }
    }

    #[test]
    fn a_speaker_is_live_only_while_it_reports_and_follows_its_stream() {
        let now = 100_000_000;
        let mut reports = BTreeMap::new();
        let mut streams = HashMap::new();
        let at = |node: &str, r: &BTreeMap<_, _>, s: &HashMap<_, _>| liveness(node, r, s, now);
        assert_eq!(
            at("n0", &reports, &streams).status,
            pb::SpeakerStatus::NoReport
        );
        // Reported 2 s ago, every second: stale after three intervals.
        reports.insert("n0".to_string(), (report(false, 1000), now - 2_000_000));
        assert_eq!(at("n0", &reports, &streams).status, pb::SpeakerStatus::Live);
        reports.insert("n0".to_string(), (report(false, 1000), now - 3_500_000));
        let stale = at("n0", &reports, &streams);
        assert_eq!(
            (stale.status, stale.age_ms),
            (pb::SpeakerStatus::Stale, 3500)
        );
        assert!(stale.why.contains("3.5 s ago"), "{}", stale.why);
        // Its route stream ended after its last report: stale at once.
        reports.insert("n0".to_string(), (report(false, 1000), now - 700_000));
        streams.insert(
            "n0".to_string(),
            StreamState {
                open: 0,
                closed_at: Some(now - 500_000),
            },
        );
        let gone = at("n0", &reports, &streams);
        assert_eq!(gone.status, pb::SpeakerStatus::Stale);
        assert!(
            gone.why.contains("route stream ended 0.5 s ago"),
            "{}",
            gone.why
        );
        // A report after that: the speaker lives (following another replica, say).
        reports.insert("n0".to_string(), (report(false, 1000), now));
        assert_eq!(at("n0", &reports, &streams).status, pb::SpeakerStatus::Live);
        // The final report says it shut down.
        reports.insert("n0".to_string(), (report(true, 1000), now));
        assert_eq!(
            at("n0", &reports, &streams).status,
            pb::SpeakerStatus::ShutDown
        );
        // An interval of 0 reads as the default 10 s.
        streams.clear();
        reports.insert("n0".to_string(), (report(false, 0), now - 25_000_000));
        assert_eq!(at("n0", &reports, &streams).status, pb::SpeakerStatus::Live);
    }

    fn entry(uid: &str, prefix: &str, node: &str) -> pb::AdvertisementEntry {
        pb::AdvertisementEntry {
            owner_uid: uid.into(),
            prefix: prefix.into(),
            node: node.into(),
            ..Default::default()
        }
    }

    #[test]
    fn pages_cover_every_entry_once_in_order() {
        let all: Vec<_> = (0..25)
            .map(|i| {
                entry(
                    &format!("u{:02}", i / 5),
                    "10.0.0.1/32",
                    &format!("n{}", i % 5),
                )
            })
            .collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..10 {
            let (page, next) = page(all.clone(), after.as_deref(), 7);
            assert!(page.len() <= 7);
            seen.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }
}
