//! Property tests: whatever bytes arrive, decoding never panics, a packet that decodes
//! re-encodes to the same mandatory section, and a session fed arbitrary packets keeps
//! its invariants.

use std::time::{Duration, Instant};

use herald_bfd::{ControlPacket, Session, SessionConfig, State};
use proptest::prelude::*;

fn config() -> SessionConfig {
    SessionConfig {
        local_disc: 7,
        desired_min_tx: Duration::from_millis(300),
        required_min_rx: Duration::from_millis(300),
        detect_mult: 3,
        jitter_seed: 1,
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_decoded_packets_round_trip(
        bytes in proptest::collection::vec(any::<u8>(), 0..80)
    ) {
        if let Ok(p) = ControlPacket::decode(&bytes) {
            // Length is 24 (no authentication is accepted), so the first 24 bytes are the
            // packet; Herald writes Length 24 and the version, the rest is kept.
            let again = ControlPacket::decode(&p.encode());
            prop_assert_eq!(again, Ok(p));
            prop_assert_eq!(&p.encode()[4..24], &bytes[4..24]);
        }
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        flips in proptest::collection::vec((0usize..24, any::<u8>()), 1..6)
    ) {
        let mut b = ControlPacket {
            diag: herald_bfd::Diagnostic::None,
            state: State::Up,
            poll: false,
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: 3,
            my_disc: 1,
            your_disc: 7,
            desired_min_tx: 300_000,
            required_min_rx: 300_000,
            required_min_echo_rx: 0,
        }
        .encode();
        for (at, v) in flips {
            b[at] = v;
        }
        let _ = ControlPacket::decode(&b);
    }

    /// Any sequence of valid packets and clock steps: no panic, timers always set, and the
    /// detection time, once known, is the remote's multiplier times an interval it sent or
    /// we require.
    #[test]
    fn a_session_fed_arbitrary_packets_keeps_its_invariants(
        steps in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 24..25), 0u64..2_000),
            1..60,
        )
    ) {
        let start = Instant::now();
        let mut now = start;
        let mut s = Session::new(now, config());
        for (bytes, step_ms) in steps {
            now += Duration::from_millis(step_ms);
            if let Ok(p) = ControlPacket::decode(&bytes) {
                let _ = s.on_packet(now, &p);
                if let Some(d) = s.status().detection_time {
                    let unit = Duration::from_millis(300)
                        .max(Duration::from_micros(u64::from(p.desired_min_tx)));
                    if p.your_disc == 0 || p.your_disc == 7 {
                        prop_assert_eq!(d, unit * u32::from(p.detect_mult));
                    }
                }
            }
            let _ = s.on_timers(now);
            if s.status().tx_interval.is_some() {
                prop_assert!(s.next_deadline().is_some());
            }
        }
    }
}
