//! `memory::release_freed_memory` gives back pages freed in the middle of the heap, which
//! glibc keeps resident on its own: the shape a decoded 100k-route snapshot leaves behind
//! (many short-lived values interleaved with the long-lived route set). Alone in its test
//! binary, so no other test allocates while it reads the process's RSS.

#![cfg(all(target_os = "linux", target_env = "gnu"))]
#![allow(clippy::unwrap_used)]

use herald_route_speaker::memory::release_freed_memory;

/// Resident anonymous memory of this process, KiB.
fn rss_anon_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn freed_pages_between_live_values_go_back_to_the_os() {
    const VALUES: usize = 200_000;
    /// One value in this many is kept.
    const KEEP_EVERY: usize = 100;
    // Runs of 200-byte values freed between small values kept: ~40 MiB freed, and no
    // free page at the top of the heap, where glibc would have given it back by itself.
    let mut freed = Vec::with_capacity(VALUES);
    let mut kept = Vec::with_capacity(VALUES / KEEP_EVERY);
    for i in 0..VALUES {
        if i % KEEP_EVERY == KEEP_EVERY - 1 {
            kept.push(Box::new(i as u64));
        } else {
            freed.push(vec![i as u8; 200]);
        }
    }
    drop(freed);
    let before = rss_anon_kib();
    assert!(release_freed_memory(), "malloc_trim released nothing");
    let after = rss_anon_kib();
    eprintln!("RssAnon {before} KiB -> {after} KiB");
    assert!(
        before - after > 20 * 1024,
        "only {} KiB of ~40 MiB freed went back ({before} -> {after} KiB)",
        before - after
    );
    // What was kept is still there, intact.
    let expected: u64 = (0..VALUES as u64)
        .filter(|i| *i as usize % KEEP_EVERY == KEEP_EVERY - 1)
        .sum();
    assert_eq!(kept.iter().map(|b| **b).sum::<u64>(), expected);
}
