//! What herald-ipam's route engine keeps per route, measured with dhat's heap statistics on
//! the cluster `herald-bench scale` makes (every node peering, half the Services `Local` on
//! 3 nodes each), at 200 nodes × 2,000 Services: the same routes per node as 1,000 × 10,000
//! would have at a fifth of the Services, a 25th of the routes. Everything the engine holds
//! counts: its inputs, its incremental state with every node's route set, and every node's
//! published snapshot with its provenance. Then the benchmark's churn, which must leave it
//! where it was.
//!
//! One test in this binary, so nothing else allocates while it counts. The bytes are
//! reckoned in glibc's chunks (16 bytes more per block, as in `tests/memory.rs`).

use herald_ipam::cluster_probe;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const NODES: usize = 200;
const SERVICES: usize = 2_000;
/// The changes of the churn: as many as the benchmark's incremental run at its default.
const CHANGES: usize = 220;
/// The routes of `herald-bench scale` at 1,000 nodes × 10,000 Services: 5,000 `Cluster`
/// Services on every node, 5,000 `Local` ones on 3 nodes each.
const BENCH_ROUTES: f64 = 1_000.0 * 5_000.0 + 5_000.0 * 3.0;

fn in_chunks(stats: &dhat::HeapStats) -> i64 {
    let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    signed(stats.curr_bytes) + 16 * signed(stats.curr_blocks)
}

#[test]
fn per_node_route_sets_fit_the_memory_budget_and_stay_flat_under_churn() {
    let _profiler = dhat::Profiler::builder().testing().build();

    let before = in_chunks(&dhat::HeapStats::get());
    let mut cluster = cluster_probe::cluster(NODES, SERVICES);
    let set_up = in_chunks(&dhat::HeapStats::get()) - before;
    let routes = cluster.routes();
    assert_eq!(
        cluster.published(),
        NODES,
        "every node's snapshot is published"
    );
    assert_eq!(routes, NODES * SERVICES / 2 + SERVICES / 2 * 3);

    for _ in 0..CHANGES {
        cluster.change();
    }
    let churned = in_chunks(&dhat::HeapStats::get()) - before;

    let per_route = |bytes: i64| bytes as f64 / routes as f64;
    let at_bench = |bytes: i64| per_route(bytes) * BENCH_ROUTES / (1024.0 * 1024.0);
    let within = |what: &str, bytes: i64, budget: f64| {
        assert!(
            per_route(bytes) <= budget,
            "{what}: {:.1} B/route",
            per_route(bytes)
        );
    };
    println!(
        "{NODES} nodes x {SERVICES} Services, {routes} routes: set up {:.1} B/route, after {CHANGES} changes {:.1} B/route; at 1,000 x 10,000: {:.0} MiB, then {:.0} MiB",
        per_route(set_up),
        per_route(churned),
        at_bench(set_up),
        at_bench(churned),
    );
    // Budget with a little room. Before the routes shared their attributes, the sets were
    // built with full leaves and the snapshots shared one provenance map, this was
    // about 390 B/route (a copy of the attributes per route in half-full leaves, and a
    // provenance entry with its own string per route and node): 1.9 GB at 1,000 × 10,000.
    within("set up", set_up, BUDGET_PER_ROUTE);
    assert!(
        churned as f64 <= set_up as f64 * 1.10,
        "the churn grew the engine from {set_up} to {churned} bytes"
    );
    drop(cluster);

    // As the benchmark makes it: the nodes first, then the Services allocated a batch at a
    // time, each route patched into every node's set.
    let before = in_chunks(&dhat::HeapStats::get());
    let cluster = cluster_probe::cluster_grown(NODES, SERVICES, 0);
    let grown = in_chunks(&dhat::HeapStats::get()) - before;
    assert_eq!(cluster.routes(), routes);
    assert_eq!(cluster.published(), NODES);
    println!(
        "grown change by change: {:.1} B/route; at 1,000 x 10,000: {:.0} MiB",
        per_route(grown),
        at_bench(grown),
    );
    // More than built whole: `imbl` splits a full leaf in halves, so routes patched in
    // in address order (as addresses are handed out) leave the leaves half empty until
    // the node's sets are built packed again, and each snapshot keeps the delta of its
    // last batch (here half the routes). Without the repacking, 121 B/route.
    within("grown", grown, BUDGET_PER_ROUTE_GROWN);
    drop(cluster);
}

/// Bytes per route, in glibc's chunks, of everything the engine holds.
const BUDGET_PER_ROUTE: f64 = 60.0;
/// The same, grown change by change (88.5 measured).
const BUDGET_PER_ROUTE_GROWN: f64 = 100.0;
