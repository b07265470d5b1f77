//! Fuzz the whole receive path: framing, decoding with RFC 7606 handling,
//! and re-encoding of whatever decodes. Run: `cargo +nightly fuzz run decode`
//! from crates/bgp.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    herald_bgp::wire::fuzz_decode(data);
});
