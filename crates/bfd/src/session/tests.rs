use super::*;

const MS: Duration = Duration::from_millis(1);

fn config(disc: u32) -> SessionConfig {
    SessionConfig {
        local_disc: disc,
        desired_min_tx: 300 * MS,
        required_min_rx: 300 * MS,
        detect_mult: 3,
        jitter_seed: u64::from(disc) * 7919,
    }
}

fn sent(out: &[Output]) -> Vec<ControlPacket> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(p) => Some(*p),
            Output::StateChange { .. } => None,
        })
        .collect()
}

fn changes(out: &[Output]) -> Vec<(State, State, Diagnostic)> {
    out.iter()
        .filter_map(|o| match o {
            Output::StateChange { from, to, diag } => Some((*from, *to, *diag)),
            Output::Send(_) => None,
        })
        .collect()
}

/// A packet from a remote with discriminator 99.
fn remote(state: State, your_disc: u32) -> ControlPacket {
    ControlPacket {
        diag: Diagnostic::None,
        state,
        poll: false,
        final_: false,
        cpi: false,
        demand: false,
        detect_mult: 3,
        my_disc: 99,
        your_disc,
        desired_min_tx: 300_000,
        required_min_rx: 300_000,
        required_min_echo_rx: 0,
    }
}

/// Two sessions wired back to back on a simulated clock. `a_frozen` drops everything A
/// would send (a stopped process); every step is bounded.
struct Pair {
    now: Instant,
    a: Session,
    b: Session,
    a_frozen: bool,
    log: Vec<(Duration, char, Output)>,
    start: Instant,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            now,
            a: Session::new(now, config(1)),
            b: Session::new(now, config(2)),
            a_frozen: false,
            log: Vec::new(),
            start: now,
        }
    }

    fn deliver(&mut self, from: char, out: Vec<Output>) {
        let mut queue: Vec<(char, Output)> = out.into_iter().map(|o| (from, o)).collect();
        let mut budget = 1000;
        while let Some((who, o)) = queue.pop() {
            budget -= 1;
            assert!(budget > 0, "packets bounce forever");
            self.log.push((self.now - self.start, who, o.clone()));
            let Output::Send(p) = o else { continue };
            if who == 'a' && self.a_frozen {
                continue;
            }
            let (to, name) = if who == 'a' {
                (&mut self.b, 'b')
            } else {
                if self.a_frozen {
                    continue;
                }
                (&mut self.a, 'a')
            };
            let reply = to.on_packet(self.now, &p);
            queue.extend(reply.into_iter().map(|o| (name, o)));
        }
    }

    /// Runs both sessions' timers until `until` after the start.
    fn run_until(&mut self, until: Duration) {
        for _ in 0..100_000 {
            let a_next = if self.a_frozen {
                None
            } else {
                self.a.next_deadline()
            };
            let next = [a_next, self.b.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .expect("a session always has a timer");
            if next > self.start + until {
                self.now = self.start + until;
                return;
            }
            self.now = self.now.max(next);
            if !self.a_frozen {
                let out = self.a.on_timers(self.now);
                self.deliver('a', out);
            }
            let out = self.b.on_timers(self.now);
            self.deliver('b', out);
        }
        panic!("simulation did not reach {until:?}");
    }

    fn b_down_at(&self) -> Option<Duration> {
        self.log.iter().find_map(|(t, who, o)| match o {
            Output::StateChange {
                from: State::Up,
                to: State::Down,
                ..
            } if *who == 'b' => Some(*t),
            _ => None,
        })
    }
}

#[test]
fn three_way_handshake_brings_both_sides_up() {
    let mut pair = Pair::new();
    pair.run_until(10 * MS);
    assert_eq!((pair.a.state(), pair.b.state()), (State::Up, State::Up));
    assert_eq!(pair.a.remote_disc(), 2);
    assert_eq!(pair.b.remote_disc(), 1);
    // Each side went Down → Init → Up or Down → Up, never anything else.
    for (_, _, o) in &pair.log {
        if let Output::StateChange { from, to, .. } = o {
            assert!(
                matches!(
                    (from, to),
                    (State::Down, State::Init)
                        | (State::Init, State::Up)
                        | (State::Down, State::Up)
                ),
                "{from} → {to}"
            );
        }
    }
    assert_eq!(pair.a.status().up_count, 1);
}

#[test]
fn down_to_init_to_up_per_the_rfc_table() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let out = s.on_packet(now, &remote(State::Down, 0));
    assert_eq!(
        changes(&out),
        vec![(State::Down, State::Init, Diagnostic::None)]
    );
    // The packet announcing Init carries the remote's discriminator.
    assert_eq!(sent(&out)[0].your_disc, 99);
    assert_eq!(sent(&out)[0].state, State::Init);
    let out = s.on_packet(now, &remote(State::Up, 1));
    assert_eq!(
        changes(&out),
        vec![(State::Init, State::Up, Diagnostic::None)]
    );
    // Up in Down goes nowhere: the remote must first see us.
    let mut fresh = Session::new(now, config(3));
    let out = fresh.on_packet(now, &remote(State::Up, 3));
    assert!(changes(&out).is_empty());
    assert_eq!(fresh.state(), State::Down);
}

#[test]
fn timers_are_slow_until_up_then_negotiated_with_a_poll_sequence() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let first = sent(&s.on_timers(now));
    assert_eq!(first[0].desired_min_tx, 1_000_000, "Down sends at 1 s");
    assert_eq!(first[0].required_min_rx, 300_000);
    s.on_packet(now, &remote(State::Down, 0));
    let out = s.on_packet(now, &remote(State::Up, 1));
    let p = sent(&out)[0];
    assert_eq!(p.state, State::Up);
    assert!(p.poll, "the change to 300 ms is announced with Poll");
    assert_eq!(p.desired_min_tx, 300_000);
    // Sending faster is safe at once.
    assert_eq!(s.status().tx_interval, Some(300 * MS));
    // Periodic packets keep the Poll bit until the Final arrives.
    let later = now + 400 * MS;
    assert!(sent(&s.on_timers(later)).iter().all(|p| p.poll));
    let mut f = remote(State::Up, 1);
    f.final_ = true;
    s.on_packet(later, &f);
    let after = sent(&s.on_timers(later + 400 * MS));
    assert!(!after.is_empty() && after.iter().all(|p| !p.poll));
}

#[test]
fn detection_time_is_remote_mult_times_the_agreed_interval() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let mut p = remote(State::Down, 0);
    p.detect_mult = 5;
    p.desired_min_tx = 1_000_000;
    s.on_packet(now, &p);
    // The remote sends at 1 s while not Up: 5 × max(300 ms, 1 s).
    assert_eq!(s.status().detection_time, Some(5000 * MS));
    p.desired_min_tx = 100_000;
    p.state = State::Up;
    p.your_disc = 1;
    s.on_packet(now, &p);
    // Now our 300 ms requirement is the slower: 5 × 300 ms.
    assert_eq!(s.status().detection_time, Some(1500 * MS));
}

#[test]
fn silence_for_the_detection_time_takes_the_session_down_and_not_sooner() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    s.on_packet(now, &remote(State::Down, 0));
    s.on_packet(now, &remote(State::Up, 1));
    assert_eq!(s.state(), State::Up);
    let last = now + 50 * MS;
    s.on_packet(last, &remote(State::Up, 1));
    let just_before = s.on_timers(last + 899 * MS);
    assert!(changes(&just_before).is_empty());
    assert_eq!(s.state(), State::Up);
    let out = s.on_timers(last + 900 * MS);
    assert_eq!(
        changes(&out),
        vec![(
            State::Up,
            State::Down,
            Diagnostic::ControlDetectionTimeExpired
        )]
    );
    // The remote is forgotten, and the next packets say so.
    assert_eq!(s.remote_disc(), 0);
    let p = sent(&out)[0];
    assert_eq!((p.state, p.your_disc, p.diag.code()), (State::Down, 0, 1));
    assert_eq!(p.desired_min_tx, 1_000_000, "back to the slow rate");
}

#[test]
fn a_frozen_peer_is_detected_within_the_detection_time() {
    let mut pair = Pair::new();
    pair.run_until(5000 * MS);
    assert_eq!(pair.b.state(), State::Up);
    assert_eq!(pair.b.status().detection_time, Some(900 * MS));
    pair.a_frozen = true;
    let frozen_at = pair.now - pair.start;
    pair.run_until(7000 * MS);
    let down = pair.b_down_at().expect("B noticed") - frozen_at;
    // At most the detection time after the last packet, which came at most one interval
    // before the freeze.
    assert!(down <= 900 * MS, "{down:?}");
    assert!(down >= 900 * MS - 300 * MS, "{down:?}");
}

#[test]
fn a_healthy_pair_stays_up_for_a_long_time() {
    let mut pair = Pair::new();
    pair.run_until(600_000 * MS);
    assert_eq!((pair.a.state(), pair.b.state()), (State::Up, State::Up));
    assert_eq!(pair.b.status().up_count, 1);
    assert!(pair.b_down_at().is_none());
}

#[test]
fn remote_admin_down_or_down_takes_an_up_session_down_with_diag_3() {
    for remote_state in [State::AdminDown, State::Down] {
        let now = Instant::now();
        let mut s = Session::new(now, config(1));
        s.on_packet(now, &remote(State::Down, 0));
        s.on_packet(now, &remote(State::Up, 1));
        let out = s.on_packet(now, &remote(remote_state, 1));
        assert_eq!(
            changes(&out),
            vec![(
                State::Up,
                State::Down,
                Diagnostic::NeighborSignaledSessionDown
            )],
            "{remote_state}"
        );
    }
}

#[test]
fn a_poll_is_answered_at_once_with_final() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let mut p = remote(State::Down, 0);
    p.poll = true;
    let out = sent(&s.on_packet(now, &p));
    let f = out.last().expect("an answer");
    assert!(f.final_ && !f.poll);
}

#[test]
fn a_packet_for_another_discriminator_changes_nothing() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let out = s.on_packet(now, &remote(State::Init, 7));
    assert!(out.is_empty());
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.remote_disc(), 0);
}

#[test]
fn admin_down_tells_the_remote_and_ignores_it_until_admin_up() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    s.on_packet(now, &remote(State::Down, 0));
    s.on_packet(now, &remote(State::Up, 1));
    let out = s.admin_down(now);
    let p = sent(&out)[0];
    assert_eq!(
        (p.state, p.diag),
        (State::AdminDown, Diagnostic::AdministrativelyDown)
    );
    assert!(changes(&s.on_packet(now, &remote(State::Up, 1))).is_empty());
    assert_eq!(s.state(), State::AdminDown);
    // No detection timer runs while AdminDown.
    assert!(changes(&s.on_timers(now + 10_000 * MS)).is_empty());
    s.admin_up(now);
    assert_eq!(s.state(), State::Down);
}

#[test]
fn remote_asking_for_no_periodic_packets_gets_none() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    let mut p = remote(State::Down, 0);
    p.required_min_rx = 0;
    s.on_packet(now, &p);
    assert_eq!(s.status().tx_interval, None);
    // Only the state-change packet went out; nothing periodic follows (until the
    // detection time, 3 × 300 ms, ends the session).
    for step in 1..90u32 {
        assert!(sent(&s.on_timers(now + step * 10 * MS)).is_empty());
    }
}

#[test]
fn the_transmit_interval_is_the_slower_of_ours_and_the_remotes_and_jittered() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    s.on_packet(now, &remote(State::Down, 0));
    s.on_packet(now, &remote(State::Up, 1));
    let mut slow = remote(State::Up, 1);
    slow.required_min_rx = 500_000;
    slow.final_ = true;
    s.on_packet(now, &slow);
    assert_eq!(s.status().tx_interval, Some(500 * MS));
    let mut t = now;
    let mut gaps = Vec::new();
    for _ in 0..200 {
        let next = s.next_deadline().expect("timer");
        let next = next.min(now + 1_000_000 * MS);
        // Keep the detection timer from firing: the remote keeps talking.
        s.on_packet(next, &slow);
        let out = s.on_timers(next);
        if !sent(&out).is_empty() {
            gaps.push(next - t);
            t = next;
        }
    }
    let gaps = &gaps[1..];
    assert!(
        gaps.iter().all(|g| *g >= 375 * MS && *g <= 500 * MS),
        "{gaps:?}"
    );
    // Jitter really varies.
    assert!(gaps.iter().any(|g| *g < 450 * MS) && gaps.iter().any(|g| *g > 450 * MS));
}

#[test]
fn a_timer_change_while_up_keeps_the_safe_values_until_final() {
    let now = Instant::now();
    let mut s = Session::new(now, config(1));
    s.on_packet(now, &remote(State::Down, 0));
    s.on_packet(now, &remote(State::Up, 1));
    let mut f = remote(State::Up, 1);
    f.final_ = true;
    s.on_packet(now, &f);
    // Slower transmit and a longer receive requirement.
    let out = sent(&s.set_timers(now, 600 * MS, 600 * MS, 3));
    assert!(out[0].poll);
    assert_eq!(
        (out[0].desired_min_tx, out[0].required_min_rx),
        (600_000, 600_000)
    );
    // Keep sending at 300 ms, and expect the remote as slow as 600 ms already.
    assert_eq!(s.status().tx_interval, Some(300 * MS));
    s.on_packet(now, &remote(State::Up, 1));
    assert_eq!(s.status().detection_time, Some(1800 * MS));
    s.on_packet(now, &f);
    assert_eq!(s.status().tx_interval, Some(600 * MS));
}
