//! Fuzz the session state machine with event scripts: peer messages (well-formed and
//! corrupted), socket and timer events, desired-route changes, in any order. Run: `cargo
//! +nightly fuzz run session` from crates/bgp; seed it with `tests/corpus/session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = herald_bgp::fuzzing::session_script(data);
});
