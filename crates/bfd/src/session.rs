//! One BFD session's state machine (RFC 5880 §6.2, §6.8), sans-IO: time is given, packets
//! come in decoded and go out as [`Output::Send`]; the driver owns sockets and sleeps
//! until [`Session::next_deadline`].
//!
//! Herald runs asynchronous mode in the Active role, without the Echo function and
//! without authentication. It never asks for Demand mode, but honours a remote that does.

use std::time::{Duration, Instant};

use crate::packet::{ControlPacket, Diagnostic, State};

/// The slowest a system may be asked to send while a session is not Up, and the rate it
/// sends at then (RFC 5880 §6.8.3: "not less than one second").
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// A session's own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// bfd.LocalDiscr: nonzero, unique among the system's sessions.
    pub local_disc: u32,
    /// bfd.DesiredMinTxInterval once Up.
    pub desired_min_tx: Duration,
    /// bfd.RequiredMinRxInterval; zero asks the remote to send no periodic packets.
    pub required_min_rx: Duration,
    /// bfd.DetectMult, at least 1.
    pub detect_mult: u8,
    /// Seeds the transmit jitter (§6.8.7); any value.
    pub jitter_seed: u64,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this packet to the remote now.
    Send(ControlPacket),
    /// bfd.SessionState changed; `diag` is bfd.LocalDiag after the change.
    StateChange {
        from: State,
        to: State,
        diag: Diagnostic,
    },
}

/// What a session reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    pub state: State,
    pub remote_state: State,
    /// bfd.LocalDiag: why this system last left Up (or was told to).
    pub local_diag: Diagnostic,
    /// The Diagnostic the remote last sent.
    pub remote_diag: Diagnostic,
    /// The detection time in force, once the remote has been heard.
    pub detection_time: Option<Duration>,
    /// The periodic transmit interval in force (before jitter); `None` while the remote
    /// asks for no periodic packets.
    pub tx_interval: Option<Duration>,
    /// How many times the session reached Up.
    pub up_count: u64,
    /// When the state last changed.
    pub since: Option<Instant>,
}

/// A Poll Sequence in progress (§6.5): the values advertised already, while the values
/// used locally stay on the safe side until the remote answers with Final.
#[derive(Debug, Clone, Copy)]
struct Poll;

/// One session. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    remote_state: State,
    remote_disc: u32,
    local_diag: Diagnostic,
    remote_diag: Diagnostic,
    remote_demand: bool,
    /// bfd.RemoteMinRxInterval; 1 µs until the remote is heard (§6.8.1).
    remote_min_rx: Duration,
    /// The remote's last Desired Min TX and Detect Mult.
    remote_desired_min_tx: Duration,
    remote_detect_mult: u8,
    /// What the packets say (bfd.DesiredMinTxInterval, bfd.RequiredMinRxInterval).
    advertised_tx: Duration,
    advertised_rx: Duration,
    /// What this system uses for its own transmit interval and detection time: equal to
    /// the advertised values except during a Poll Sequence (§6.8.3).
    tx_in_force: Duration,
    rx_in_force: Duration,
    poll: Option<Poll>,
    next_tx: Option<Instant>,
    detect_deadline: Option<Instant>,
    rng: u64,
    up_count: u64,
    since: Option<Instant>,
}

impl Session {
    /// A session in Down, sending at [`SLOW_TX`] from `now` on.
    pub fn new(now: Instant, config: SessionConfig) -> Self {
        let slow = config.desired_min_tx.max(SLOW_TX);
        let mut s = Self {
            config,
            state: State::Down,
            remote_state: State::Down,
            remote_disc: 0,
            local_diag: Diagnostic::None,
            remote_diag: Diagnostic::None,
            remote_demand: false,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_min_tx: Duration::ZERO,
            remote_detect_mult: 0,
            advertised_tx: slow,
            advertised_rx: config.required_min_rx,
            tx_in_force: slow,
            rx_in_force: config.required_min_rx,
            poll: None,
            next_tx: None,
            detect_deadline: None,
            // xorshift must not start at zero.
            rng: config.jitter_seed | 1,
            up_count: 0,
            since: None,
        };
        // The first packet goes out at once, so a remote learns of us without waiting.
        s.next_tx = Some(now);
        s
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// bfd.LocalDiscr.
    pub fn local_disc(&self) -> u32 {
        self.config.local_disc
    }

    /// bfd.RemoteDiscr (0 while unknown).
    pub fn remote_disc(&self) -> u32 {
        self.remote_disc
    }

    pub fn status(&self) -> SessionStatus {
        SessionStatus {
            state: self.state,
            remote_state: self.remote_state,
            local_diag: self.local_diag,
            remote_diag: self.remote_diag,
            detection_time: self.detection_time(),
            tx_interval: self.tx_interval(),
            up_count: self.up_count,
            since: self.since,
        }
    }

    /// The earliest time [`Session::on_timers`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.next_tx, self.detect_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// The local detection time (§6.8.4, asynchronous mode): the remote's Detect Mult
    /// times the slower of what we require and what the remote wants to send at.
    pub fn detection_time(&self) -> Option<Duration> {
        (self.remote_detect_mult != 0).then(|| {
            self.rx_in_force.max(self.remote_desired_min_tx) * u32::from(self.remote_detect_mult)
        })
    }

    /// The periodic transmit interval before jitter (§6.8.7); `None` when the remote asks
    /// for no periodic packets.
    pub fn tx_interval(&self) -> Option<Duration> {
        (!self.remote_min_rx.is_zero()).then(|| self.tx_in_force.max(self.remote_min_rx))
    }

    /// A received packet, already decoded and checked by [`ControlPacket::decode`], from
    /// the address this session is for. Packets for another session (Your Discriminator
    /// nonzero and not ours) are discarded (§6.8.6).
    pub fn on_packet(&mut self, now: Instant, p: &ControlPacket) -> Vec<Output> {
        let mut out = Vec::new();
        if p.your_disc != 0 && p.your_disc != self.config.local_disc {
            return out;
        }
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_diag = p.diag;
        self.remote_demand = p.demand;
        self.remote_min_rx = Duration::from_micros(u64::from(p.required_min_rx));
        self.remote_desired_min_tx = Duration::from_micros(u64::from(p.desired_min_tx));
        self.remote_detect_mult = p.detect_mult;
        if p.final_ && self.poll.is_some() {
            // The remote has seen the new values: use them (§6.5).
            self.poll = None;
            self.tx_in_force = self.advertised_tx;
            self.rx_in_force = self.advertised_rx;
        }
        self.reschedule_tx(now);
        if self.state == State::AdminDown {
            return out;
        }
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.local_diag = Diagnostic::NeighborSignaledSessionDown;
                self.set_state(now, State::Down, &mut out);
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => self.set_state(now, State::Init, &mut out),
                (State::Down, State::Init) => self.set_state(now, State::Up, &mut out),
                (State::Init, State::Init | State::Up) => self.set_state(now, State::Up, &mut out),
                (State::Up, State::Down) => {
                    self.local_diag = Diagnostic::NeighborSignaledSessionDown;
                    self.set_state(now, State::Down, &mut out);
                }
                _ => {}
            }
        }
        if p.poll {
            // Answer a Poll at once, outside the periodic schedule (§6.8.6).
            let mut f = self.packet();
            f.poll = false;
            f.final_ = true;
            out.push(Output::Send(f));
        }
        self.detect_deadline = self.detection_time().map(|d| now + d);
        out
    }

    /// Fires what is due at `now`: the detection time (§6.8.4) and the periodic packet.
    pub fn on_timers(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.detect_deadline.is_some_and(|d| d <= now) {
            self.detect_deadline = None;
            // The remote is gone: forget it (§6.8.1, bfd.RemoteDiscr).
            self.remote_disc = 0;
            self.remote_state = State::Down;
            self.remote_demand = false;
            self.remote_detect_mult = 0;
            if matches!(self.state, State::Init | State::Up) {
                self.local_diag = Diagnostic::ControlDetectionTimeExpired;
                self.set_state(now, State::Down, &mut out);
            }
        }
        if self.next_tx.is_some_and(|t| t <= now) {
            self.next_tx = None;
            // A remote in Demand mode with both sides Up wants no periodic packets (§6.6).
            let demand_quiet =
                self.remote_demand && self.state == State::Up && self.remote_state == State::Up;
            if !demand_quiet {
                out.push(Output::Send(self.packet()));
            }
            self.schedule_tx(now);
        }
        out
    }

    /// Takes the session AdminDown (diag 7): the remote is told, and does not count what
    /// follows as a failure.
    pub fn admin_down(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state != State::AdminDown {
            self.local_diag = Diagnostic::AdministrativelyDown;
            self.set_state(now, State::AdminDown, &mut out);
            self.detect_deadline = None;
        }
        out
    }

    /// Leaves AdminDown for Down.
    pub fn admin_up(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state == State::AdminDown {
            self.local_diag = Diagnostic::None;
            self.set_state(now, State::Down, &mut out);
        }
        out
    }

    /// New timer parameters. While Up they are announced with a Poll Sequence; the
    /// values used locally move to the new ones only when it ends (§6.8.3).
    pub fn set_timers(
        &mut self,
        now: Instant,
        desired_min_tx: Duration,
        required_min_rx: Duration,
        detect_mult: u8,
    ) -> Vec<Output> {
        self.config.desired_min_tx = desired_min_tx;
        self.config.required_min_rx = required_min_rx;
        self.config.detect_mult = detect_mult.max(1);
        let tx = self.wanted_tx();
        self.change_advertised(now, tx, required_min_rx);
        let mut out = Vec::new();
        if self.poll.is_some() {
            out.push(Output::Send(self.packet()));
        }
        out
    }

    /// bfd.DesiredMinTxInterval for the current state.
    fn wanted_tx(&self) -> Duration {
        if self.state == State::Up {
            self.config.desired_min_tx
        } else {
            self.config.desired_min_tx.max(SLOW_TX)
        }
    }

    fn change_advertised(&mut self, now: Instant, tx: Duration, rx: Duration) {
        if tx == self.advertised_tx && rx == self.advertised_rx {
            return;
        }
        self.advertised_tx = tx;
        self.advertised_rx = rx;
        if self.state == State::Up && self.remote_disc != 0 {
            // Sending faster and expecting slower never causes a false failure, so those
            // apply at once; the rest waits for the remote's Final.
            self.tx_in_force = self.tx_in_force.min(tx);
            self.rx_in_force = self.rx_in_force.max(rx);
            self.poll = Some(Poll);
        } else {
            self.poll = None;
            self.tx_in_force = tx;
            self.rx_in_force = rx;
        }
        self.reschedule_tx(now);
    }

    fn set_state(&mut self, now: Instant, to: State, out: &mut Vec<Output>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        self.since = Some(now);
        if to == State::Up {
            self.up_count += 1;
        }
        out.push(Output::StateChange {
            from,
            to,
            diag: self.local_diag,
        });
        let tx = self.wanted_tx();
        let rx = self.config.required_min_rx;
        self.change_advertised(now, tx, rx);
        // Tell the remote at once rather than at the next periodic packet.
        out.push(Output::Send(self.packet()));
        self.schedule_tx(now);
    }

    /// The packet this session sends now (§6.8.7).
    fn packet(&self) -> ControlPacket {
        ControlPacket {
            diag: self.local_diag,
            state: self.state,
            poll: self.poll.is_some(),
            final_: false,
            cpi: false,
            demand: false,
            detect_mult: self.config.detect_mult,
            my_disc: self.config.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: micros(self.advertised_tx),
            required_min_rx: micros(self.advertised_rx),
            required_min_echo_rx: 0,
        }
    }

    fn schedule_tx(&mut self, now: Instant) {
        self.next_tx = self.tx_interval().map(|i| now + self.jittered(i));
    }

    /// After the interval shrank (or periodic packets were off), the next packet must not
    /// wait for the old, longer schedule.
    fn reschedule_tx(&mut self, now: Instant) {
        match (self.tx_interval(), self.next_tx) {
            (None, _) => self.next_tx = None,
            (Some(i), Some(t)) if t <= now + i => {}
            (Some(_), _) => self.schedule_tx(now),
        }
    }

    /// 75–100 % of the interval, or 75–90 % with a Detect Mult of 1 (§6.8.7).
    fn jittered(&mut self, interval: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = if self.config.detect_mult == 1 { 15 } else { 25 };
        let percent = 75 + (self.rng % (span + 1)) as u32;
        interval * percent / 100
    }
}

/// Microseconds, saturating at the field's largest value.
fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
