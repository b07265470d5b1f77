//! The fuzz harnesses (`herald_bgp::fuzzing`, `wire::fuzz_decode`) on stable Rust, a bounded
//! number of cases per run, plus every input in `tests/corpus/` (seeds and anything a fuzz
//! run ever found) as a regression test. proptest keeps each failure it finds in
//! `proptest-regressions/` and replays it first; commit those files.
//!
//! Deeper local runs: `PROPTEST_CASES=200000 cargo test --release -p herald-bgp --test
//! properties`, or the libFuzzer targets in `crates/bgp/fuzz` on a nightly toolchain.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use herald_bgp::State;
use herald_bgp::fuzzing::session_script;
use herald_bgp::wire::{
    Capability, Family, Message, Notification, Open, WireContext, encode_message, fuzz_decode,
};
use proptest::prelude::*;

/// Well-formed messages to mutate: a mutation of something valid reaches deeper into the
/// decoder than random bytes do.
fn seeds() -> Vec<Vec<u8>> {
    let ctx = WireContext::default();
    let open = Open::new(
        65001,
        90,
        std::net::Ipv4Addr::new(10, 0, 0, 1),
        vec![
            Capability::MultiProtocol(Family::Ipv4Unicast),
            Capability::MultiProtocol(Family::Ipv6Unicast),
            Capability::RouteRefresh,
        ],
    );
    let mut seeds: Vec<Vec<u8>> = [
        Message::Open(open),
        Message::Keepalive,
        Message::Notification(Notification {
            code: 6,
            subcode: 2,
            data: b"\x08shutdown".to_vec(),
        }),
    ]
    .iter()
    .map(|m| encode_message(m, &ctx).unwrap())
    .collect();
    seeds.extend(corpus("decode"));
    seeds
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// A seed with some bytes overwritten, some cut off and some inserted.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds();
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(seed, writes, cut, insert)| {
            let mut bytes = seeds[seed].clone();
            for (at, value) in writes {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let cut = cut.index(bytes.len() + 1);
            bytes.truncate(cut.max(19).min(bytes.len()));
            bytes.extend(insert);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..4200)) {
        fuzz_decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic_the_decoder(bytes in mutated()) {
        fuzz_decode(&bytes);
    }

    #[test]
    fn any_event_script_leaves_the_session_sound(script in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = session_script(&script);
    }
}

#[test]
fn every_corpus_input_is_handled() {
    for input in corpus("decode") {
        fuzz_decode(&input);
    }
    let scripts = corpus("session");
    assert!(
        !scripts.is_empty(),
        "tests/corpus/session holds the seed scripts"
    );
    let mut established = 0;
    for script in scripts {
        if session_script(&script).contains(&State::Established) {
            established += 1;
        }
    }
    // The seeds reach the states where most of the code is: a harness that never got past
    // OpenSent would test little.
    assert!(
        established >= 2,
        "only {established} seed scripts reach Established"
    );
}
