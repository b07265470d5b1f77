//! What the speaker holds per route once a snapshot of 100k /32s is applied, counted by
//! dhat's allocator (alone in its test binary, so nothing else allocates while it counts).
//! The snapshot message itself is transient; the desired set stays.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use herald_api::routing::v1 as pb;
use herald_route_speaker::desired::Desired;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

const ROUTES: u32 = 100_000;

/// A node's snapshot as IPAM sends it: 100k /32s to one peer, each with its change time.
fn snapshot() -> pb::NodeRoutes {
    let routes = (0..ROUTES)
        .map(|i| pb::Route {
            prefix: format!("{}/32", std::net::Ipv4Addr::from(0x0a40_0000 + i)),
            next_hop: "127.0.0.11".into(),
            changed_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000 + i64::from(i),
                nanos: 0,
            }),
            ..pb::Route::default()
        })
        .collect();
    pb::NodeRoutes {
        revision: 1,
        node: "n1".into(),
        local_asn: 65010,
        peers: vec![pb::PeerRoutes {
            peer: Some(pb::Peer {
                name: "tor".into(),
                address: "127.0.0.1".into(),
                asn: 65001,
                ..pb::Peer::default()
            }),
            routes,
            ..pb::PeerRoutes::default()
        }],
        ..pb::NodeRoutes::default()
    }
}

/// The desired set built from a 100k-route snapshot holds under 40 bytes a route (a
/// prefix and a shared pointer to the one attribute set); the message it came from
/// holds several times that while it lives.
#[test]
fn a_snapshot_of_100k_routes_leaves_under_40_bytes_a_route() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let held_now = || dhat::HeapStats::get().curr_bytes as f64;
    let before = held_now();
    let message = snapshot();
    let message_bytes = held_now() - before;
    let mut desired = Desired::new();
    let mut changes = BTreeMap::new();
    desired.apply(&message, &mut changes).unwrap();
    let provenance: usize = changes.values().map(|c| c.provenance.len()).sum();
    assert_eq!(provenance, ROUTES as usize);
    drop(changes);
    drop(message);
    assert_eq!(desired.routes("tor").unwrap().len(), ROUTES as usize);
    let held = held_now() - before;
    let peak = dhat::HeapStats::get().max_bytes as f64 - before;
    let per = |b: f64| b / f64::from(ROUTES);
    eprintln!(
        "per route: message {:.0} B, desired set {:.1} B, peak {:.0} B",
        per(message_bytes),
        per(held),
        per(peak)
    );
    assert!(per(held) < 40.0, "{:.1} bytes per route held", per(held));
}
