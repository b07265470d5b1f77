//! The BGP session state machine of RFC 4271 §8, sans-IO.
//!
//! [`Session::handle`] takes one [`Event`] and the current time and returns
//! the [`Output`]s for the driver to carry out (connect, send bytes,
//! disconnect). Nothing here touches a socket, a clock or a runtime, so every
//! transition is a plain unit test. Timers are deadlines the driver asks for
//! with [`Session::next_deadline`] and fires with [`Session::on_timers`].
//!
//! One `Session` lives as long as the peer is configured; it goes through
//! many connections, and keeps its counters and the desired routes across
//! them. The RIB-out ([`AdjRibOut`]) is per connection: after a reconnect
//! everything is sent again.
//!
//! Deviations from RFC 4271 §8, and why:
//! - No DelayOpen, no DampPeerOscillations, no optional events 5–8, 12–15.
//! - After an error the FSM goes to Idle and restarts by itself
//!   (AutomaticStart, event 3) after an exponential backoff ("IdleHoldTimer"
//!   of RFC 4271 §8.1.1), so a wrong ASN or a closed port never busy-loops.
//! - A failed connect in Connect goes to Active and retries when the
//!   ConnectRetryTimer expires (what BIRD, FRR and GoBGP do), instead of
//!   going to Idle.
//! - Connection collision (§6.8) needs two connections: the driver runs a
//!   second `Session` for the inbound one and resolves with
//!   [`collision_keeps_inbound`], then sends [`Event::OpenCollisionDump`] to
//!   the loser.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::rib::{AdjRibOut, ExportPolicy, Routes};
use crate::wire::{
    self, BuildOptions, Capability, DecodeError, Family, GracefulRestart, GracefulRestartFamily,
    Ipv4NlriEncoding, Message, Notification, Open, Rfc7606Action, Update, WireContext, fsm_error,
    open_error,
};

/// Session states (RFC 4271 §8.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Default hold time (RFC 4271 §10 suggests 90 s).
pub const DEFAULT_HOLD_TIME: u16 = 90;
/// Default first connect-retry interval: short, because a ToR that is
/// briefly down should see the node again quickly (RFC 4271 suggests 120 s,
/// which is a long outage for a load balancer).
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Upper bound of the connect-retry / idle-hold backoff.
pub const DEFAULT_CONNECT_RETRY_MAX: Duration = Duration::from_secs(60);
/// Hold timer while waiting for the peer's OPEN (RFC 4271 §8.2.2 suggests
/// "a large value", 4 minutes).
pub const OPEN_HOLD_TIME: Duration = Duration::from_secs(240);
/// Default graceful restart time (FEATURES.md: 120 s like MetalLB/Cilium).
pub const DEFAULT_RESTART_TIME: u16 = 120;
/// Retry interval right after a close we made ourselves (see
/// [`Session::reconnect_quickly`]).
pub const QUICK_RETRY: Duration = Duration::from_secs(1);
/// How long [`QUICK_RETRY`] applies before the normal backoff takes over.
pub const QUICK_RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// How IPv4 prefixes are encoded (see [`crate::wire::builder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv4NlriPolicy {
    /// MP_REACH_NLRI when the peer advertised the IPv4-unicast MP
    /// capability, classic NLRI otherwise.
    #[default]
    Auto,
    Classic,
    MpReach,
}

/// Graceful restart settings (RFC 4724).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulRestartConfig {
    /// Seconds the peer should keep our routes after we go away (≤ 4095).
    pub restart_time: u16,
    /// Set the R bit in the first OPEN: this speaker has just restarted and
    /// the peer is holding our routes as stale.
    pub restarting: bool,
    /// Set the F bit of every family (RFC 4724 §3): the forwarding state for
    /// the routes we advertise outlives this BGP speaker, so across its restart
    /// traffic the peer keeps sending along our stale routes is still
    /// forwarded. A peer that reads F = 0 on the new session drops our stale
    /// routes at once (§4.2) instead of at our End-of-RIB, leaving a gap. Set it
    /// only when true: the peer then keeps sending traffic our way until then.
    pub forwarding_preserved: bool,
}

impl Default for GracefulRestartConfig {
    fn default() -> Self {
        Self {
            restart_time: DEFAULT_RESTART_TIME,
            restarting: false,
            forwarding_preserved: false,
        }
    }
}

/// Everything the FSM needs to know about the peer and us.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub local_asn: u32,
    pub peer_asn: u32,
    pub router_id: Ipv4Addr,
    /// Proposed hold time in seconds: 0 (no keepalives) or ≥ 3.
    pub hold_time: u16,
    /// Keepalive interval; `None` = negotiated hold time / 3.
    pub keepalive: Option<u16>,
    pub connect_retry: Duration,
    pub connect_retry_max: Duration,
    /// Never connect; wait for the peer (ManualStart_with_PassiveTcpEstablishment).
    pub passive: bool,
    pub families: Vec<Family>,
    pub graceful_restart: Option<GracefulRestartConfig>,
    /// Advertise RFC 8654 extended messages.
    pub extended_message: bool,
    pub ipv4_nlri: Ipv4NlriPolicy,
    /// Most prefixes the peer may send; one more ends the session with Cease 6/1
    /// (RFC 4486). `None`: no limit.
    pub max_prefixes: Option<u32>,
    /// Keep the set of prefixes the peer sends, for an exact
    /// [`PeerStatus::prefixes_received`]. Off, only counters are kept (a speaker ignores
    /// what the ToR sends); a `max_prefixes` limit keeps the set too, bounded by the limit.
    pub keep_received: bool,
}

impl SessionConfig {
    /// A config with the defaults above, both families, graceful restart off.
    pub fn new(local_asn: u32, peer_asn: u32, router_id: Ipv4Addr) -> Self {
        Self {
            local_asn,
            peer_asn,
            router_id,
            hold_time: DEFAULT_HOLD_TIME,
            keepalive: None,
            connect_retry: DEFAULT_CONNECT_RETRY,
            connect_retry_max: DEFAULT_CONNECT_RETRY_MAX,
            passive: false,
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            graceful_restart: None,
            extended_message: true,
            ipv4_nlri: Ipv4NlriPolicy::Auto,
            max_prefixes: None,
            keep_received: false,
        }
    }

    /// Whether the received prefixes are kept as a set (see [`Self::keep_received`]).
    fn tracks_received(&self) -> bool {
        self.keep_received || self.max_prefixes.is_some()
    }

    pub fn is_ebgp(&self) -> bool {
        self.local_asn != self.peer_asn
    }

    /// Whether going from `self` to `other` needs a new session: everything
    /// in the OPEN or the connection does. Only the retry timers and the
    /// keepalive interval (local, not negotiated: RFC 4271 §4.4 lets each
    /// side pick its own) can change on a live session
    /// ([`Session::reconfigure`]).
    pub fn needs_reset(&self, other: &SessionConfig) -> bool {
        let mut same_live = other.clone();
        same_live.connect_retry = self.connect_retry;
        same_live.connect_retry_max = self.connect_retry_max;
        same_live.keepalive = self.keepalive;
        same_live != *self
    }
}

/// How to end a session ([`Event::ManualStop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Withdraw every route, then NOTIFICATION Cease / Administrative
    /// Shutdown (6/2) with this RFC 8203 message, then close.
    Withdraw { message: String },
    /// Close the TCP connection without withdrawing or notifying, so a peer
    /// that negotiated graceful restart keeps our routes for the restart
    /// time (RFC 4724 §4.2).
    Graceful,
    /// A restart that should keep our routes at the peer, said on the wire:
    /// with the RFC 8538 N bit negotiated, Cease / Administrative Shutdown
    /// with this message (the peer keeps the routes as stale, §4); with
    /// graceful restart but no N bit, a close without NOTIFICATION (the only
    /// way RFC 4724 keeps them); without graceful restart the peer drops the
    /// routes whatever we do, so Cease with the message tells it why.
    Restart { message: String },
}

/// Inputs of the FSM, named after RFC 4271 §8.1 events.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Event 1: ManualStart (active or passive per config).
    ManualStart,
    /// Event 2: ManualStop.
    ManualStop(ShutdownMode),
    /// Event 9: ConnectRetryTimer_Expires.
    ConnectRetryTimerExpires,
    /// Event 10: HoldTimer_Expires.
    HoldTimerExpires,
    /// Event 11: KeepaliveTimer_Expires.
    KeepaliveTimerExpires,
    /// Event 16: Tcp_CR_Acked — our outbound connection is up.
    TcpCrAcked {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// Event 17: TcpConnectionConfirmed — we accepted the peer's connection.
    TcpConnectionConfirmed {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// Event 18: TcpConnectionFails (connect refused, reset, EOF, ...).
    TcpConnectionFails { reason: String },
    /// Bytes read from the connection; framed and decoded into events
    /// 19–28 (BGPOpen, BGPHeaderErr, BGPOpenMsgErr, NotifMsg, KeepAliveMsg,
    /// UpdateMsg, UpdateMsgErr) and ROUTE-REFRESH.
    Data(Vec<u8>),
    /// Event 19: BGPOpen (a decoded OPEN; tests may inject it directly).
    BgpOpen(Open),
    /// Event 21: BGPHeaderErr / Event 22: BGPOpenMsgErr / Event 28:
    /// UpdateMsgErr — a received message was invalid.
    MessageError(DecodeError),
    /// Event 23: OpenCollisionDump — this connection lost a collision.
    OpenCollisionDump,
    /// Event 25: NotifMsg.
    NotifMsg(Notification),
    /// Event 26: KeepAliveMsg.
    KeepAliveMsg,
    /// Event 27: UpdateMsg (with the RFC 7606 action taken while decoding).
    UpdateMsg(Update, Option<Rfc7606Action>),
    /// ROUTE-REFRESH received (RFC 2918).
    RouteRefreshMsg,
    /// Herald: replace the desired routes (declarative, whole set).
    SetDesired(Arc<Routes>),
    /// BFD (RFC 5882 §4.3) says the peer's forwarding path failed after having been Up:
    /// the session is torn down at once with Cease / BFD Down (RFC 9384) instead of
    /// waiting out the hold time, and restarts with the usual backoff.
    BfdDown,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open a TCP connection to the peer; answer with `TcpCrAcked` or
    /// `TcpConnectionFails`.
    Connect,
    /// Write these bytes (one or more whole messages) to the connection.
    Send(Vec<u8>),
    /// Close the connection once the pending bytes are written.
    Disconnect,
    /// The state changed (for logs and status).
    StateChange { from: State, to: State },
}

/// The result of capability negotiation (RFC 5492), valid from OpenConfirm on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_asn: u32,
    pub peer_router_id: Ipv4Addr,
    /// min(ours, theirs) seconds; 0 = no keepalives and no hold timer.
    pub hold_time: u16,
    pub keepalive: u16,
    /// Both sides support 4-octet AS numbers (RFC 6793).
    pub four_octet_asn: bool,
    /// Families both sides advertised (RFC 4760).
    pub families: Vec<Family>,
    /// The peer supports ROUTE-REFRESH (RFC 2918).
    pub route_refresh: bool,
    /// Both sides support extended messages (RFC 8654).
    pub extended_message: bool,
    /// The peer's graceful restart capability, if any (RFC 4724).
    pub peer_graceful_restart: Option<GracefulRestart>,
    /// Both sides do graceful restart with the RFC 8538 N bit: a Cease other
    /// than Hard Reset keeps our routes at the peer, Hard Reset (6/9) drops
    /// them.
    pub graceful_notification: bool,
    /// How IPv4 prefixes are sent on this session.
    pub ipv4_nlri: Ipv4NlriEncoding,
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
}

impl Negotiated {
    /// The codec context for this session.
    pub fn wire_context(&self) -> WireContext {
        WireContext {
            four_octet_asn: self.four_octet_asn,
            extended_message: self.extended_message,
        }
    }
}

/// What a session reports about itself ([`crate::driver::PeerHandle::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub state: State,
    /// When the session last reached Established (None when not Established).
    pub established_at: Option<Instant>,
    /// Set from OpenConfirm on, cleared when the connection ends.
    pub negotiated: Option<Negotiated>,
    /// Prefixes currently advertised to the peer.
    pub prefixes_sent: usize,
    /// The routes the Adj-RIB-Out has encoded for the peer on this connection (announced
    /// and not since withdrawn). The driver reports them in [`PeerStatus::advertised`]
    /// only once the bytes are written to the socket. Nearly always the very set handed
    /// to the session (the same `Arc`), so reporting them costs no copy.
    pub advertised: Arc<Routes>,
    /// Prefixes the peer currently advertises to us (accepted and ignored). Exact when the
    /// set is kept ([`SessionConfig::keep_received`] or a prefix limit); otherwise NLRI
    /// announced minus NLRI withdrawn on this connection, which over-counts a prefix the
    /// peer announces again with other attributes.
    pub prefixes_received: usize,
    /// NLRI announced and withdrawn by the peer on this connection (counted, not kept).
    pub nlri_received: u64,
    pub withdrawals_received: u64,
    /// Of `prefixes_sent`, the IPv6 ones (the rest are IPv4).
    pub prefixes_sent_ipv6: usize,
    /// UPDATE messages sent / received since the session was created.
    pub updates_sent: u64,
    /// Bytes of BGP messages (of every type) handed to the connection since the session
    /// was created.
    pub bytes_sent: u64,
    pub updates_received: u64,
    /// How many times the session reached Established.
    pub established_count: u64,
    /// The last reason the session went down or could not come up.
    pub last_error: Option<String>,
    pub last_notification_sent: Option<Notification>,
    pub last_notification_received: Option<Notification>,
    /// Received UPDATEs handled with RFC 7606 (treat-as-withdraw etc.).
    pub malformed_updates_received: u64,
}

impl PeerStatus {
    fn new() -> Self {
        Self {
            state: State::Idle,
            established_at: None,
            negotiated: None,
            prefixes_sent: 0,
            advertised: Arc::default(),
            prefixes_sent_ipv6: 0,
            prefixes_received: 0,
            nlri_received: 0,
            withdrawals_received: 0,
            updates_sent: 0,
            bytes_sent: 0,
            updates_received: 0,
            established_count: 0,
            last_error: None,
            last_notification_sent: None,
            last_notification_received: None,
            malformed_updates_received: 0,
        }
    }

    /// Time since Established, if Established.
    pub fn uptime(&self, now: Instant) -> Option<Duration> {
        self.established_at
            .map(|t| now.saturating_duration_since(t))
    }
}

/// RFC 4271 §6.8 collision resolution: `true` if the connection the peer
/// initiated (inbound) survives, i.e. the peer's BGP Identifier is higher.
pub fn collision_keeps_inbound(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) < u32::from(remote_id)
}

#[derive(Debug, Default, Clone, Copy)]
struct Timers {
    connect_retry: Option<Instant>,
    hold: Option<Instant>,
    keepalive: Option<Instant>,
    /// Automatic restart after an error (RFC 4271 §8.1.1 IdleHoldTimer).
    idle_hold: Option<Instant>,
}

/// The largest receive buffer: one maximal message plus a read.
const MAX_RX_BUFFER: usize = wire::MAX_EXTENDED_MESSAGE_LEN + 64 * 1024;

/// One BGP peer's session state machine. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    timers: Timers,
    /// Consecutive failures, for the backoff (RFC 4271 ConnectRetryCounter).
    connect_retry_counter: u32,
    /// ManualStop was given: stay Idle.
    stopped: bool,
    /// The next start follows a close of our own ([`Session::reconnect_quickly`]).
    quick_next_start: bool,
    /// Until then, retries come every [`QUICK_RETRY`] instead of backing off.
    quick_until: Option<Instant>,
    /// The R bit is only for the first OPEN after a restart.
    opens_sent: u64,
    rx: Vec<u8>,
    wire: WireContext,
    local_addr: Option<SocketAddr>,
    remote_addr: Option<SocketAddr>,
    peer_open: Option<Open>,
    desired: Arc<Routes>,
    rib: AdjRibOut,
    received: HashSet<IpNet>,
    status: PeerStatus,
    out: Vec<Output>,
    sent_updates: Vec<SentUpdate>,
}

/// One UPDATE message the session sent, for whoever observes the wire (traces, metrics):
/// the driver takes them with [`Session::take_sent_updates`] after each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentUpdate {
    /// Prefixes it announces.
    pub announced: usize,
    /// Prefixes it withdraws.
    pub withdrawn: usize,
    /// Its size on the wire.
    pub bytes: usize,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            state: State::Idle,
            timers: Timers::default(),
            connect_retry_counter: 0,
            stopped: true,
            quick_next_start: false,
            quick_until: None,
            opens_sent: 0,
            rx: Vec::new(),
            wire: WireContext {
                four_octet_asn: true,
                extended_message: false,
            },
            local_addr: None,
            remote_addr: None,
            peer_open: None,
            desired: Arc::new(Routes::new()),
            rib: AdjRibOut::new(),
            received: HashSet::new(),
            status: PeerStatus::new(),
            out: Vec::new(),
            sent_updates: Vec::new(),
        }
    }

    /// The UPDATEs sent since the last call, oldest first.
    pub fn take_sent_updates(&mut self) -> Vec<SentUpdate> {
        std::mem::take(&mut self.sent_updates)
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Marks the next start as following a close we made ourselves (a
    /// parameter change replaced the session). The peer may refuse us for a
    /// moment after our NOTIFICATION (BIRD and GoBGP hold a closed neighbor
    /// down briefly), and that refusal must not cost a 10 s backoff: for
    /// [`QUICK_RECONNECT_WINDOW`] after the start, retries come every
    /// [`QUICK_RETRY`]; the normal backoff resumes after it.
    pub fn reconnect_quickly(&mut self) {
        self.quick_next_start = true;
    }

    /// Applies a config that differs only in what needs no new session
    /// ([`SessionConfig::needs_reset`] is false): retry timers and the
    /// keepalive interval, which takes effect at once. Returns false, and
    /// changes nothing, when the change needs a new session.
    pub fn reconfigure(&mut self, now: Instant, config: SessionConfig) -> bool {
        if self.config.needs_reset(&config) {
            return false;
        }
        self.config = config;
        let keepalive = self
            .status
            .negotiated
            .as_ref()
            .map(|n| keepalive_for(n.hold_time, self.config.keepalive));
        if let (Some(ka), Some(n)) = (keepalive, self.status.negotiated.as_mut())
            && n.keepalive != ka
        {
            n.keepalive = ka;
            self.restart_keepalive_timer(now);
        }
        true
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn status(&self) -> &PeerStatus {
        &self.status
    }

    /// The peer's OPEN, from OpenConfirm on.
    pub fn peer_open(&self) -> Option<&Open> {
        self.peer_open.as_ref()
    }

    /// The codec context in force (negotiated from OpenConfirm on).
    pub fn wire_context(&self) -> WireContext {
        self.wire
    }

    /// The earliest timer deadline, for the driver's sleep.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.timers;
        [t.connect_retry, t.hold, t.keepalive, t.idle_hold]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires every timer that is due at `now`.
    pub fn on_timers(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.timers.idle_hold) {
            self.timers.idle_hold = None;
            out.extend(self.handle(now, Event::ManualStart));
        }
        if due(self.timers.connect_retry) {
            self.timers.connect_retry = None;
            out.extend(self.handle(now, Event::ConnectRetryTimerExpires));
        }
        if due(self.timers.hold) {
            self.timers.hold = None;
            out.extend(self.handle(now, Event::HoldTimerExpires));
        }
        if due(self.timers.keepalive) {
            self.timers.keepalive = None;
            out.extend(self.handle(now, Event::KeepaliveTimerExpires));
        }
        merge_sends(out)
    }

    /// Processes one event.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Output> {
        match event {
            Event::Data(bytes) => self.on_data(now, bytes),
            Event::ManualStart => {
                // A manual start also resets the automatic-restart backoff
                // bookkeeping: the operator asked for it.
                self.stopped = false;
                if std::mem::take(&mut self.quick_next_start) {
                    self.quick_until = Some(now + QUICK_RECONNECT_WINDOW);
                }
                self.event(now, Event::ManualStart);
            }
            Event::SetDesired(routes) => {
                self.desired = routes;
                if self.state == State::Established {
                    self.advertise_diff();
                }
            }
            Event::BfdDown => {
                // Only a connection that reached the peer can be torn down; a connection
                // attempt in progress fails or succeeds on its own.
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    let n =
                        Notification::new(Notification::CEASE, wire::cease::BFD_DOWN, Vec::new());
                    self.fail(now, Some(n), "BFD session went down");
                }
            }
            other => self.event(now, other),
        }
        let out = std::mem::take(&mut self.out);
        merge_sends(out)
    }

    fn on_data(&mut self, now: Instant, bytes: Vec<u8>) {
        if !matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        ) {
            return;
        }
        self.rx.extend_from_slice(&bytes);
        let mut at = 0;
        // Each pass consumes at least one 19-octet header or leaves the loop,
        // so this is bounded by the buffer length.
        while at < self.rx.len() {
            let conn_before = self.remote_addr;
            let msg_ctx = self.wire;
            match wire::frame(&self.rx[at..], &msg_ctx) {
                Ok(None) => break,
                Ok(Some(len)) => {
                    let ev = match wire::decode_message(&self.rx[at..at + len], &msg_ctx) {
                        Ok(d) => match d.message {
                            Message::Open(o) => Event::BgpOpen(o),
                            Message::Update(u) => Event::UpdateMsg(u, d.rfc7606),
                            Message::Notification(n) => Event::NotifMsg(n),
                            Message::Keepalive => Event::KeepAliveMsg,
                            Message::RouteRefresh(_) => Event::RouteRefreshMsg,
                        },
                        Err(e) => Event::MessageError(e),
                    };
                    at += len;
                    self.event(now, ev);
                }
                Err(e) => {
                    at = self.rx.len();
                    self.event(now, Event::MessageError(e));
                }
            }
            // The connection went away while processing: drop the rest.
            if conn_before != self.remote_addr
                || !matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                )
            {
                self.rx.clear();
                return;
            }
        }
        self.rx.drain(..at);
        if self.rx.len() > MAX_RX_BUFFER {
            // Cannot happen with a valid header (length ≤ 65535), but never
            // grow without bound on network input.
            self.rx.clear();
            self.fail(
                now,
                Some(Notification::new(Notification::CEASE, 8, Vec::new())),
                "receive buffer overflow",
            );
        }
    }

    /// The state machine proper: one `match state { match event }`.
    fn event(&mut self, now: Instant, event: Event) {
        use Event as E;
        use State as S;
        match self.state {
            S::Idle => match event {
                // Event 1 / 3 / 4: ManualStart, AutomaticStart, passive start.
                E::ManualStart => {
                    self.timers.idle_hold = None;
                    if self.config.passive {
                        self.set_state(S::Active);
                    } else {
                        self.timers.connect_retry = Some(now + self.retry_interval(now));
                        self.out.push(Output::Connect);
                        self.set_state(S::Connect);
                    }
                }
                // Event 2: ManualStop — already Idle; stop restarting.
                E::ManualStop(_) => {
                    self.stopped = true;
                    self.timers = Timers::default();
                }
                // Event 17 in Idle while waiting to restart: the peer got
                // there first; take its connection rather than refuse it
                // and make both sides wait out another backoff.
                E::TcpConnectionConfirmed { local, remote } if !self.stopped => {
                    self.timers.idle_hold = None;
                    self.connected(now, local, remote)
                }
                // Events 16/17 otherwise: the connection is refused.
                E::TcpCrAcked { .. } | E::TcpConnectionConfirmed { .. } => {
                    self.out.push(Output::Disconnect);
                }
                // Everything else is ignored in Idle (§8.2.2).
                _ => {}
            },
            S::Connect => match event {
                E::ManualStart => {}
                E::ManualStop(_) => self.stop_quietly(),
                // Event 9: retry the connection.
                E::ConnectRetryTimerExpires => {
                    self.out.push(Output::Disconnect);
                    self.timers.connect_retry = Some(now + self.retry_interval(now));
                    self.out.push(Output::Connect);
                }
                // Events 16/17: connected; send OPEN.
                E::TcpCrAcked { local, remote } | E::TcpConnectionConfirmed { local, remote } => {
                    self.connected(now, local, remote)
                }
                // Event 18: wait in Active for the retry timer (or an
                // inbound connection).
                E::TcpConnectionFails { reason } => {
                    self.connect_retry_counter = self.connect_retry_counter.saturating_add(1);
                    self.status.last_error = Some(format!("connect failed: {reason}"));
                    self.timers.connect_retry = Some(now + self.retry_interval(now));
                    self.set_state(S::Active);
                }
                E::SetDesired(_) | E::Data(_) => {}
                // Events that need an open connection: FSM error.
                other => self.fsm_error(now, &other, None),
            },
            S::Active => match event {
                E::ManualStart => {}
                E::ManualStop(_) => self.stop_quietly(),
                E::ConnectRetryTimerExpires => {
                    if self.config.passive {
                        return;
                    }
                    self.timers.connect_retry = Some(now + self.retry_interval(now));
                    self.out.push(Output::Connect);
                    self.set_state(S::Connect);
                }
                E::TcpCrAcked { local, remote } | E::TcpConnectionConfirmed { local, remote } => {
                    self.connected(now, local, remote)
                }
                E::TcpConnectionFails { reason } => {
                    self.status.last_error = Some(format!("connection failed: {reason}"));
                    if !self.config.passive {
                        self.timers.connect_retry = Some(now + self.retry_interval(now));
                    }
                }
                E::SetDesired(_) | E::Data(_) => {}
                other => self.fsm_error(now, &other, None),
            },
            S::OpenSent => match event {
                E::ManualStart => {}
                E::ManualStop(mode) => self.manual_stop(now, mode),
                // Event 10: no OPEN within the (large) hold time.
                E::HoldTimerExpires => {
                    self.hold_timer_expired(now, "hold timer expired waiting for OPEN")
                }
                // Event 18: back to Active and retry.
                E::TcpConnectionFails { reason } => {
                    self.close_connection();
                    self.status.last_error = Some(format!("connection lost in OpenSent: {reason}"));
                    self.connect_retry_counter = self.connect_retry_counter.saturating_add(1);
                    if !self.config.passive {
                        self.timers.connect_retry = Some(now + self.retry_interval(now));
                    }
                    self.set_state(S::Active);
                }
                // Event 19: BGPOpen.
                E::BgpOpen(open) => self.on_open(now, open),
                // Events 21/22: bad header or OPEN.
                E::MessageError(e) => self.reject_message(now, &e),
                // Event 23: lost the collision.
                E::OpenCollisionDump => self.lose_collision(now),
                // Event 25: NotifMsg (incl. version error, event 24).
                E::NotifMsg(n) => self.on_notification(now, n),
                E::SetDesired(_) | E::Data(_) => {}
                // Events 9, 11, 16, 17, 26, 27, route refresh: FSM error.
                other => self.fsm_error(now, &other, Some(fsm_error::UNEXPECTED_IN_OPEN_SENT)),
            },
            S::OpenConfirm => match event {
                E::ManualStart => {}
                E::ManualStop(mode) => self.manual_stop(now, mode),
                E::HoldTimerExpires => {
                    self.hold_timer_expired(now, "hold timer expired in OpenConfirm")
                }
                // Event 11: send KEEPALIVE, restart the timer.
                E::KeepaliveTimerExpires => self.send_keepalive(now),
                E::TcpConnectionFails { reason } => self.fail(
                    now,
                    None,
                    &format!("connection lost in OpenConfirm: {reason}"),
                ),
                E::MessageError(e) => self.reject_message(now, &e),
                E::OpenCollisionDump => self.lose_collision(now),
                E::NotifMsg(n) => self.on_notification(now, n),
                // Event 26: KeepAliveMsg — the session is up.
                E::KeepAliveMsg => {
                    self.restart_hold_timer(now);
                    self.connect_retry_counter = 0;
                    self.quick_until = None;
                    self.status.established_at = Some(now);
                    self.status.established_count += 1;
                    self.set_state(S::Established);
                    self.advertise_initial();
                }
                E::SetDesired(_) | E::Data(_) => {}
                other => self.fsm_error(now, &other, Some(fsm_error::UNEXPECTED_IN_OPEN_CONFIRM)),
            },
            S::Established => match event {
                E::ManualStart => {}
                E::ManualStop(mode) => self.manual_stop(now, mode),
                E::HoldTimerExpires => self.hold_timer_expired(now, "hold timer expired"),
                E::KeepaliveTimerExpires => self.send_keepalive(now),
                E::TcpConnectionFails { reason } => {
                    self.fail(now, None, &format!("connection lost: {reason}"))
                }
                E::KeepAliveMsg => self.restart_hold_timer(now),
                // Event 27: UpdateMsg. Routes from the peer are counted and
                // otherwise ignored: a speaker only announces.
                E::UpdateMsg(update, rfc7606) => {
                    self.restart_hold_timer(now);
                    self.status.updates_received += 1;
                    if let Some(action) = rfc7606 {
                        self.status.malformed_updates_received += 1;
                        match &action {
                            // A ToR that reflects our own route back (FRR does, with its
                            // AS and ours in the path) may leave out the NEXT_HOP: we
                            // would discard the looped route anyway (RFC 4271 §9.1.2).
                            Rfc7606Action::TreatAsWithdraw { reason, as_path }
                                if as_path.contains(&self.config.local_asn) =>
                            {
                                tracing::debug!(%reason, "our own route reflected back, malformed; ignored");
                            }
                            Rfc7606Action::TreatAsWithdraw { reason, .. }
                            | Rfc7606Action::AttributeDiscard { reason } => {
                                tracing::warn!(%reason, "malformed UPDATE handled per RFC 7606");
                            }
                        }
                    }
                    self.receive_routes(now, &update);
                }
                // Event 28: UpdateMsgErr / Event 21: header error.
                E::MessageError(e) => self.reject_message(now, &e),
                // RFC 2918 §4: re-advertise the whole Adj-RIB-Out.
                E::RouteRefreshMsg => {
                    self.restart_hold_timer(now);
                    if let Some(policy) = self.export_policy() {
                        let updates = self.rib.full(&policy);
                        self.send_updates(updates);
                        self.send_end_of_rib();
                    }
                }
                E::NotifMsg(n) => self.on_notification(now, n),
                // Event 23 in Established: the other connection wins only
                // if it was Established, which it cannot be; ignore.
                E::OpenCollisionDump => {}
                E::SetDesired(_) | E::Data(_) => {}
                // Events 9, 16, 17, 19: FSM error.
                other => self.fsm_error(now, &other, Some(fsm_error::UNEXPECTED_IN_ESTABLISHED)),
            },
        }
    }

    // ---- actions ----------------------------------------------------------

    fn set_state(&mut self, to: State) {
        if to == self.state {
            return;
        }
        let from = self.state;
        self.state = to;
        self.status.state = to;
        if to != State::Established {
            self.status.established_at = None;
        }
        tracing::debug!(%from, %to, "BGP state change");
        self.out.push(Output::StateChange { from, to });
    }

    /// Backoff: connect_retry × 2^failures, at most connect_retry_max; a
    /// flat [`QUICK_RETRY`] right after a close of our own.
    fn retry_interval(&self, now: Instant) -> Duration {
        if self.quick_until.is_some_and(|until| now < until) {
            return QUICK_RETRY.min(self.config.connect_retry);
        }
        let shift = self.connect_retry_counter.min(16);
        self.config
            .connect_retry
            .saturating_mul(1u32 << shift)
            .min(self.config.connect_retry_max.max(self.config.connect_retry))
    }

    fn connected(&mut self, now: Instant, local: SocketAddr, remote: SocketAddr) {
        self.timers.connect_retry = None;
        self.local_addr = Some(local);
        self.remote_addr = Some(remote);
        self.rx.clear();
        self.wire = WireContext {
            four_octet_asn: true,
            extended_message: false,
        };
        let open = self.local_open();
        self.opens_sent += 1;
        self.send_message(&Message::Open(open));
        self.timers.hold = Some(now + OPEN_HOLD_TIME);
        self.set_state(State::OpenSent);
    }

    /// Our OPEN: 4-octet ASN, MP families, route refresh, extended message,
    /// graceful restart (R bit on the first OPEN after a restart).
    pub fn local_open(&self) -> Open {
        let mut caps: Vec<Capability> = self
            .config
            .families
            .iter()
            .map(|f| Capability::MultiProtocol(*f))
            .collect();
        caps.push(Capability::RouteRefresh);
        if self.config.extended_message {
            caps.push(Capability::ExtendedMessage);
        }
        if let Some(gr) = self.config.graceful_restart {
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restarting: gr.restarting && self.opens_sent == 0,
                // RFC 8538: our NOTIFICATIONs say whether the peer keeps
                // our routes (Hard Reset or not).
                notification: true,
                restart_time: gr.restart_time.min(0x0fff),
                families: self
                    .config
                    .families
                    .iter()
                    .map(|f| GracefulRestartFamily {
                        family: *f,
                        forwarding_preserved: gr.forwarding_preserved,
                    })
                    .collect(),
            }));
        }
        Open::new(
            self.config.local_asn,
            self.config.hold_time,
            self.config.router_id,
            caps,
        )
    }

    /// Event 19 in OpenSent: check the OPEN (RFC 4271 §6.2), negotiate.
    fn on_open(&mut self, now: Instant, open: Open) {
        let peer_asn = open.asn();
        if peer_asn != self.config.peer_asn {
            // Data: the 2-octet My AS field as received (RFC 4271 §6.2).
            let n = Notification::new(
                Notification::OPEN_MESSAGE_ERROR,
                open_error::BAD_PEER_AS,
                open.my_as.to_be_bytes().to_vec(),
            );
            return self.fail(
                now,
                Some(n),
                &format!(
                    "bad peer AS: expected {}, peer says {peer_asn}",
                    self.config.peer_asn
                ),
            );
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            let n = Notification::new(
                Notification::OPEN_MESSAGE_ERROR,
                open_error::UNACCEPTABLE_HOLD_TIME,
                Vec::new(),
            );
            return self.fail(
                now,
                Some(n),
                &format!("unacceptable hold time {}", open.hold_time),
            );
        }
        // RFC 6286 §2.1: the identifier must differ within an AS (iBGP).
        if !self.config.is_ebgp() && open.router_id == self.config.router_id {
            let n = Notification::new(
                Notification::OPEN_MESSAGE_ERROR,
                open_error::BAD_BGP_IDENTIFIER,
                open.router_id.octets().to_vec(),
            );
            return self.fail(now, Some(n), "peer uses our BGP identifier");
        }
        let theirs = open.families();
        let families: Vec<Family> = self
            .config
            .families
            .iter()
            .copied()
            .filter(|f| theirs.contains(f))
            .collect();
        if families.is_empty() {
            // RFC 5492 §5: a capability we require is missing; data = our
            // MP capabilities (code 1, length 4, AFI, reserved, SAFI).
            let mut data = Vec::new();
            for f in &self.config.families {
                let (afi, safi) = f.afi_safi();
                data.extend_from_slice(&[1, 4]);
                data.extend_from_slice(&afi.to_be_bytes());
                data.extend_from_slice(&[0, safi]);
            }
            let n = Notification::new(
                Notification::OPEN_MESSAGE_ERROR,
                open_error::UNSUPPORTED_CAPABILITY,
                data,
            );
            return self.fail(now, Some(n), "no address family in common with the peer");
        }
        let hold_time = self.config.hold_time.min(open.hold_time);
        let keepalive = keepalive_for(hold_time, self.config.keepalive);
        let four_octet_asn = open.four_octet_asn().is_some();
        let extended_message =
            self.config.extended_message && open.has(|c| *c == Capability::ExtendedMessage);
        let peer_mp_v4 = open.has(|c| *c == Capability::MultiProtocol(Family::Ipv4Unicast));
        let ipv4_nlri = match self.config.ipv4_nlri {
            Ipv4NlriPolicy::Auto if peer_mp_v4 => Ipv4NlriEncoding::MpReach,
            Ipv4NlriPolicy::Auto => Ipv4NlriEncoding::Classic,
            Ipv4NlriPolicy::Classic => Ipv4NlriEncoding::Classic,
            Ipv4NlriPolicy::MpReach => Ipv4NlriEncoding::MpReach,
        };
        let negotiated = Negotiated {
            peer_asn,
            peer_router_id: open.router_id,
            hold_time,
            keepalive,
            four_octet_asn,
            families,
            route_refresh: open.has(|c| *c == Capability::RouteRefresh),
            extended_message,
            peer_graceful_restart: open.graceful_restart().cloned(),
            graceful_notification: self.config.graceful_restart.is_some()
                && open.graceful_restart().is_some_and(|gr| gr.notification),
            ipv4_nlri,
            local_addr: self.local_addr,
            remote_addr: self.remote_addr,
        };
        self.wire = negotiated.wire_context();
        self.status.negotiated = Some(negotiated);
        self.peer_open = Some(open);
        self.send_message(&Message::Keepalive);
        self.restart_keepalive_timer(now);
        self.restart_hold_timer(now);
        self.set_state(State::OpenConfirm);
    }

    fn on_notification(&mut self, now: Instant, n: Notification) {
        let text = format!("peer sent NOTIFICATION {}", n.describe());
        tracing::info!(notification = %n.describe(), "received NOTIFICATION");
        self.status.last_notification_received = Some(n);
        // RFC 4271: no NOTIFICATION in reply to a NOTIFICATION.
        self.fail(now, None, &text);
    }

    fn fsm_error(&mut self, now: Instant, event: &Event, subcode: Option<u8>) {
        let what = event_name(event);
        let n = subcode.map(|s| Notification::new(Notification::FSM_ERROR, s, Vec::new()));
        self.fail(now, n, &format!("unexpected {what} in {}", self.state));
    }

    /// Drops the connection after an error: optional NOTIFICATION, Idle,
    /// automatic restart after the backoff.
    /// Event 10 (HoldTimer_Expires), in every state that runs a hold timer: NOTIFICATION 4/0.
    fn hold_timer_expired(&mut self, now: Instant, reason: &str) {
        let n = Notification::new(Notification::HOLD_TIMER_EXPIRED, 0, Vec::new());
        self.fail(now, Some(n), reason);
    }

    /// Events 21/22 (BGPHeaderErr, BGPOpenMsgErr) and UPDATE errors: the NOTIFICATION the
    /// decoding error calls for.
    fn reject_message(&mut self, now: Instant, e: &DecodeError) {
        let n = e.notification();
        self.fail(now, Some(n), &format!("received invalid message: {e}"));
    }

    /// Event 23 (OpenCollisionDump): this connection lost the collision; Cease 6/7.
    fn lose_collision(&mut self, now: Instant) {
        let n = Notification::new(
            Notification::CEASE,
            wire::cease::CONNECTION_COLLISION_RESOLUTION,
            Vec::new(),
        );
        self.fail(now, Some(n), "connection collision resolution");
    }

    fn fail(&mut self, now: Instant, notification: Option<Notification>, reason: &str) {
        tracing::warn!(state = %self.state, %reason, "BGP session down");
        if let Some(n) = notification {
            self.send_message(&Message::Notification(n.clone()));
            self.status.last_notification_sent = Some(n);
        }
        self.status.last_error = Some(reason.to_string());
        self.close_connection();
        self.connect_retry_counter = self.connect_retry_counter.saturating_add(1);
        self.timers = Timers::default();
        if !self.stopped {
            self.timers.idle_hold = Some(now + self.retry_interval(now));
        }
        self.set_state(State::Idle);
    }

    fn manual_stop(&mut self, now: Instant, mode: ShutdownMode) {
        self.stopped = true;
        let (gr, n_bit) = self.status.negotiated.as_ref().map_or((false, false), |n| {
            (
                self.config.graceful_restart.is_some() && n.peer_graceful_restart.is_some(),
                n.graceful_notification,
            )
        });
        match mode {
            ShutdownMode::Withdraw { message } => {
                if self.state == State::Established {
                    let empty = Arc::new(Routes::new());
                    self.desired = empty;
                    self.advertise_diff();
                }
                let cease = Notification::administrative_shutdown(&message);
                // RFC 8538 §3: with the N bit a plain Cease would leave our
                // routes at the peer as stale; Hard Reset says "drop them".
                let n = if n_bit {
                    Notification::hard_reset(&cease)
                } else {
                    cease
                };
                self.send_message(&Message::Notification(n.clone()));
                self.status.last_notification_sent = Some(n);
                self.status.last_error = Some("administrative shutdown".into());
            }
            ShutdownMode::Restart { message } if n_bit || !gr => {
                let n = Notification::administrative_shutdown(&message);
                self.send_message(&Message::Notification(n.clone()));
                self.status.last_notification_sent = Some(n);
                self.status.last_error = Some(if gr {
                    "restart (routes kept by peer, RFC 8538)".into()
                } else {
                    "restart (peer without graceful restart drops the routes)".into()
                });
            }
            ShutdownMode::Restart { .. } | ShutdownMode::Graceful => {
                self.status.last_error = Some("graceful shutdown (routes kept by peer)".into());
            }
        }
        let _ = now;
        self.close_connection();
        self.timers = Timers::default();
        self.set_state(State::Idle);
    }

    fn stop_quietly(&mut self) {
        self.stopped = true;
        self.close_connection();
        self.timers = Timers::default();
        self.set_state(State::Idle);
    }

    fn close_connection(&mut self) {
        self.out.push(Output::Disconnect);
        self.rx.clear();
        self.rib.clear();
        self.received.clear();
        self.status.prefixes_sent = 0;
        self.status.advertised = Arc::default();
        self.status.prefixes_sent_ipv6 = 0;
        self.status.prefixes_received = 0;
        self.status.nlri_received = 0;
        self.status.withdrawals_received = 0;
        self.status.negotiated = None;
        self.peer_open = None;
        self.local_addr = None;
        self.remote_addr = None;
    }

    fn restart_hold_timer(&mut self, now: Instant) {
        let hold = self.status.negotiated.as_ref().map_or(0, |n| n.hold_time);
        self.timers.hold = (hold > 0).then(|| now + Duration::from_secs(u64::from(hold)));
    }

    fn restart_keepalive_timer(&mut self, now: Instant) {
        let ka = self.status.negotiated.as_ref().map_or(0, |n| n.keepalive);
        self.timers.keepalive = (ka > 0).then(|| now + Duration::from_secs(u64::from(ka)));
    }

    fn send_keepalive(&mut self, now: Instant) {
        self.send_message(&Message::Keepalive);
        self.restart_keepalive_timer(now);
    }

    fn send_message(&mut self, m: &Message) {
        match wire::encode_message(m, &self.wire) {
            Ok(bytes) => {
                self.status.bytes_sent += bytes.len() as u64;
                self.out.push(Output::Send(bytes));
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to encode message");
                self.status.last_error = Some(e.to_string());
            }
        }
    }

    fn export_policy(&self) -> Option<ExportPolicy> {
        let n = self.status.negotiated.as_ref()?;
        let local_addr = self
            .local_addr
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(self.config.router_id));
        Some(ExportPolicy {
            local_asn: self.config.local_asn,
            ebgp: self.config.is_ebgp(),
            local_addr,
            build: BuildOptions {
                max_message_len: if n.extended_message {
                    wire::MAX_EXTENDED_MESSAGE_LEN
                } else {
                    wire::MAX_MESSAGE_LEN
                },
                ipv4: n.ipv4_nlri,
                four_octet_asn: n.four_octet_asn,
            },
        })
    }

    fn send_updates(&mut self, updates: Vec<Update>) {
        let ctx = self.wire;
        let mut buf = Vec::new();
        for u in updates {
            let before = buf.len();
            let (announced, withdrawn) = (u.announced().len(), u.withdrawn_all().len());
            match wire::encode_into(&Message::Update(u), &ctx, &mut buf) {
                Ok(()) => {
                    self.status.updates_sent += 1;
                    self.sent_updates.push(SentUpdate {
                        announced,
                        withdrawn,
                        bytes: buf.len() - before,
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to encode UPDATE");
                    self.status.last_error = Some(e.to_string());
                }
            }
        }
        if !buf.is_empty() {
            self.status.bytes_sent += buf.len() as u64;
            self.out.push(Output::Send(buf));
        }
    }

    /// Sends the diff between what was sent and what is desired, skipping
    /// prefixes of families the peer did not negotiate.
    fn advertise_diff(&mut self) {
        let Some(policy) = self.export_policy() else {
            return;
        };
        let families = self
            .status
            .negotiated
            .as_ref()
            .map(|n| n.families.clone())
            .unwrap_or_default();
        let desired: Arc<Routes> = if self
            .desired
            .keys()
            .all(|p| families.contains(&Family::of(p)))
        {
            self.desired.clone()
        } else {
            Arc::new(
                self.desired
                    .iter()
                    .filter(|(p, _)| families.contains(&Family::of(p)))
                    .map(|(p, a)| (*p, Arc::clone(a)))
                    .collect(),
            )
        };
        let (diff, errors) = self.rib.diff_shared(&desired, &policy);
        if let Some((p, e)) = errors.first() {
            self.status.last_error = Some(format!("cannot advertise {p}: {e}"));
        }
        let changed = diff.announced + diff.withdrawn > 0;
        self.send_updates(diff.updates);
        self.status.prefixes_sent = self.rib.len();
        self.status.prefixes_sent_ipv6 = self
            .rib
            .sent()
            .keys()
            .filter(|p| p.addr().is_ipv6())
            .count();
        // Point at what the Adj-RIB-Out holds now, even when nothing changed on the wire:
        // an older, equal set kept here would be a second copy of every route.
        if changed || !Arc::ptr_eq(&self.status.advertised, self.rib.sent()) {
            self.status.advertised = Arc::clone(self.rib.sent());
        }
    }

    /// Counts what the peer sends, keeps the set only when asked or limited, and ends the
    /// session with Cease 6/1 (RFC 4486) once the peer sends more than the limit.
    fn receive_routes(&mut self, now: Instant, update: &Update) {
        let withdrawn = update.withdrawn_all();
        let announced = update.announced();
        self.status.nlri_received += announced.len() as u64;
        self.status.withdrawals_received += withdrawn.len() as u64;
        if self.config.tracks_received() {
            for p in &withdrawn {
                self.received.remove(p);
            }
            for p in &announced {
                self.received.insert(*p);
            }
            self.status.prefixes_received = self.received.len();
        } else {
            self.status.prefixes_received = usize::try_from(
                self.status
                    .nlri_received
                    .saturating_sub(self.status.withdrawals_received),
            )
            .unwrap_or(usize::MAX);
        }
        let Some(limit) = self.config.max_prefixes else {
            return;
        };
        if self.status.prefixes_received as u64 <= u64::from(limit) {
            return;
        }
        // Data: AFI, SAFI and the limit (RFC 4486 §4), for the family that overflowed.
        let family = announced.first().map_or(Family::Ipv4Unicast, Family::of);
        let (afi, safi) = family.afi_safi();
        let mut data = afi.to_be_bytes().to_vec();
        data.push(safi);
        data.extend_from_slice(&limit.to_be_bytes());
        let n = Notification::new(Notification::CEASE, wire::cease::MAX_PREFIXES, data);
        let reason = format!(
            "peer sent {} prefixes, more than the limit of {limit}",
            self.status.prefixes_received
        );
        self.fail(now, Some(n), &reason);
    }

    fn advertise_initial(&mut self) {
        self.advertise_diff();
        self.send_end_of_rib();
    }

    /// RFC 4724 §2: End-of-RIB for every negotiated family.
    fn send_end_of_rib(&mut self) {
        let families = self
            .status
            .negotiated
            .as_ref()
            .map(|n| n.families.clone())
            .unwrap_or_default();
        let mut updates = Vec::new();
        // RFC 4724 §2: the IPv4 unicast marker is the empty UPDATE whatever encoding
        // carries the routes; other families' is an empty MP_UNREACH.
        for f in families {
            updates.push(Update::end_of_rib(f));
        }
        // EoR markers are not route updates; keep `updates_sent` about routes.
        let before = self.status.updates_sent;
        self.send_updates(updates);
        self.status.updates_sent = before;
    }
}

/// The keepalive interval for a negotiated hold time: a third of it, or the
/// configured interval if shorter; 0 (none) with hold time 0.
fn keepalive_for(hold_time: u16, configured: Option<u16>) -> u16 {
    if hold_time == 0 {
        0
    } else {
        let third = hold_time / 3;
        configured.map_or(third, |k| k.min(third)).max(1)
    }
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::ManualStart => "ManualStart",
        Event::ManualStop(_) => "ManualStop",
        Event::ConnectRetryTimerExpires => "ConnectRetryTimer_Expires",
        Event::HoldTimerExpires => "HoldTimer_Expires",
        Event::KeepaliveTimerExpires => "KeepaliveTimer_Expires",
        Event::TcpCrAcked { .. } => "Tcp_CR_Acked",
        Event::TcpConnectionConfirmed { .. } => "TcpConnectionConfirmed",
        Event::TcpConnectionFails { .. } => "TcpConnectionFails",
        Event::Data(_) => "data",
        Event::BgpOpen(_) => "BGPOpen",
        Event::MessageError(_) => "message error",
        Event::OpenCollisionDump => "OpenCollisionDump",
        Event::NotifMsg(_) => "NotifMsg",
        Event::KeepAliveMsg => "KeepAliveMsg",
        Event::UpdateMsg(..) => "UpdateMsg",
        Event::RouteRefreshMsg => "ROUTE-REFRESH",
        Event::SetDesired(_) => "SetDesired",
        Event::BfdDown => "BfdDown",
    }
}

/// Joins adjacent `Send`s so the driver does one write per batch.
fn merge_sends(out: Vec<Output>) -> Vec<Output> {
    let mut merged: Vec<Output> = Vec::with_capacity(out.len());
    for o in out {
        match (merged.last_mut(), o) {
            (Some(Output::Send(prev)), Output::Send(next)) => prev.extend_from_slice(&next),
            (_, o) => merged.push(o),
        }
    }
    merged
}

#[cfg(test)]
mod tests;
