//! What a session costs in memory per route, counted by the allocator: the speaker's
//! memory at 100k routes is the sum of such figures (BENCHMARKS.md `memory`, and
//! `herald-bench speaker-memory` for the whole process). Alone in its test binary, so
//! nothing else allocates while it counts.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use herald_bgp::fsm::Event;
use herald_bgp::wire::{Capability, Family, Open};
use herald_bgp::{AttributeInterner, RouteAttributes, Routes, Session, SessionConfig, State};
use ipnet::{IpNet, Ipv4Net};

/// The system allocator, counting the bytes held.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter is kept.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

const ROUTES: u32 = 100_000;

fn established(now: Instant) -> Session {
    let mut s = Session::new(SessionConfig::new(65010, 65001, Ipv4Addr::new(10, 0, 0, 2)));
    s.handle(now, Event::ManualStart);
    let local: SocketAddr = "127.0.0.10:40000".parse().unwrap();
    let remote: SocketAddr = "127.0.0.1:179".parse().unwrap();
    s.handle(now, Event::TcpCrAcked { local, remote });
    let open = Open::new(
        65001,
        90,
        Ipv4Addr::new(10, 0, 0, 1),
        vec![Capability::MultiProtocol(Family::Ipv4Unicast)],
    );
    s.handle(now, Event::BgpOpen(open));
    s.handle(now, Event::KeepAliveMsg);
    assert_eq!(s.state(), State::Established);
    s
}

/// 100k /32s with one attribute set, handed to an Established session: the session, its
/// Adj-RIB-Out and its report of what it advertised all hold that one set, and a route
/// costs a prefix and a pointer in a B-tree. Inline attributes (≈ 110 bytes each) or a
/// second copy of the prefixes for the report would each break the bound.
#[test]
fn a_session_holds_100k_routes_in_under_40_bytes_each() {
    let now = Instant::now();
    let mut session = established(now);
    let before = held();
    let mut interner = AttributeInterner::new();
    let routes: Routes = (0..ROUTES)
        .map(|i| {
            let prefix = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap();
            (
                IpNet::V4(prefix),
                interner.intern(RouteAttributes::default()),
            )
        })
        .collect();
    drop(interner);
    let routes = Arc::new(routes);
    // The UPDATEs' bytes go to the socket and are gone; what stays is the session's.
    let out = session.handle(now, Event::SetDesired(Arc::clone(&routes)));
    assert!(!out.is_empty());
    drop(out);
    drop(session.take_sent_updates());
    assert_eq!(session.status().prefixes_sent, ROUTES as usize);
    assert!(Arc::ptr_eq(&session.status().advertised, &routes));
    drop(routes);
    let per_route = (held() - before) as f64 / f64::from(ROUTES);
    eprintln!("{per_route:.1} bytes per route");
    assert!(
        per_route < 40.0,
        "{per_route:.1} bytes per route held by the session"
    );
}
