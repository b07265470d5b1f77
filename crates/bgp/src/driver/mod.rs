//! The tokio driver: one task per peer owns the TCP connection, the timers
//! and a [`Session`], and carries out the session's [`Output`]s.
//!
//! The task never panics on what the peer sends (all of that is handled in
//! the sans-IO [`Session`]), reconnects with backoff until shut down, and
//! shares nothing with other peers' tasks, so one bad peer cannot affect
//! another.

pub mod socket;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::fsm::{Event, Output, SentUpdate, Session, SessionConfig};
pub use crate::fsm::{GracefulRestartConfig, Ipv4NlriPolicy, PeerStatus, ShutdownMode, State};
use crate::rib::Routes;
use crate::wire::{self, Family, Message, Notification, WireContext};

/// The BGP port (RFC 4271 §8.2.1).
pub const BGP_PORT: u16 = 179;
/// Bound on one TCP connect attempt; the retry timer takes over after it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on flushing the last bytes (withdrawals, NOTIFICATION) on close.
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a single write: a peer that stops reading for this long is
/// treated as gone (the hold timer cannot fire while a write is stuck).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches of bytes (one per event handled) waiting for the socket. A peer that stops
/// reading fills the socket buffer and then this queue; one more batch ends the
/// connection rather than letting the queue grow without bound.
pub const WRITE_QUEUE: usize = 256;

/// Everything about one peer. Build with [`PeerConfig::new`] and adjust
/// the public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub peer_addr: IpAddr,
    /// Default [`BGP_PORT`].
    pub peer_port: u16,
    pub peer_asn: u32,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    /// Bind outbound connections to this address (the node's address the
    /// ToR knows as neighbor).
    pub source_addr: Option<IpAddr>,
    /// Seconds, 0 or ≥ 3 (default 90).
    pub hold_time: u16,
    /// Seconds; default hold time / 3.
    pub keepalive: Option<u16>,
    pub connect_retry: Duration,
    pub connect_retry_max: Duration,
    pub connect_timeout: Duration,
    /// RFC 2385 TCP-MD5 password (Linux TCP_MD5SIG), at most 80 bytes.
    pub md5_password: Option<String>,
    /// IP TTL / hop limit of the session's packets (eBGP multihop). `None`
    /// leaves the OS default (64), which also covers loopback peers.
    pub ttl: Option<u32>,
    /// Never connect; wait for the peer on `listen`.
    pub passive: bool,
    /// Accept connections from `peer_addr` on this address. Port 0 picks a
    /// free port (see [`PeerHandle::listen_addr`]).
    pub listen: Option<SocketAddr>,
    pub graceful_restart: Option<GracefulRestartConfig>,
    pub families: Vec<Family>,
    /// Advertise RFC 8654 extended messages.
    pub extended_message: bool,
    pub ipv4_nlri: Ipv4NlriPolicy,
    /// See [`SessionConfig::max_prefixes`].
    pub max_prefixes: Option<u32>,
    /// See [`SessionConfig::keep_received`].
    pub keep_received: bool,
}

impl PeerConfig {
    /// Active session to `peer_addr:179` with the defaults of [`crate::fsm`], offering
    /// only the family of `peer_addr`: a family offered in the OPEN starts the peer's
    /// channel for it, and BIRD, given IPv6 on an IPv4 session, warns "Missing next hop
    /// address" at every session start (it has no IPv6 address of its own there). Name
    /// both in [`PeerConfig::families`] to carry the other family.
    pub fn new(peer_addr: IpAddr, peer_asn: u32, local_asn: u32, router_id: Ipv4Addr) -> Self {
        let mut s = SessionConfig::new(local_asn, peer_asn, router_id);
        s.families = vec![match peer_addr {
            IpAddr::V4(_) => Family::Ipv4Unicast,
            IpAddr::V6(_) => Family::Ipv6Unicast,
        }];
        Self {
            peer_addr,
            peer_port: BGP_PORT,
            peer_asn,
            local_asn,
            router_id,
            source_addr: None,
            hold_time: s.hold_time,
            keepalive: s.keepalive,
            connect_retry: s.connect_retry,
            connect_retry_max: s.connect_retry_max,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            md5_password: None,
            ttl: None,
            passive: false,
            listen: None,
            graceful_restart: None,
            families: s.families,
            extended_message: s.extended_message,
            ipv4_nlri: s.ipv4_nlri,
            max_prefixes: s.max_prefixes,
            keep_received: s.keep_received,
        }
    }

    /// The sans-IO part of the config.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            local_asn: self.local_asn,
            peer_asn: self.peer_asn,
            router_id: self.router_id,
            hold_time: self.hold_time,
            keepalive: self.keepalive,
            connect_retry: self.connect_retry,
            connect_retry_max: self.connect_retry_max,
            passive: self.passive,
            families: self.families.clone(),
            graceful_restart: self.graceful_restart,
            extended_message: self.extended_message,
            ipv4_nlri: self.ipv4_nlri,
            max_prefixes: self.max_prefixes,
            keep_received: self.keep_received,
        }
    }

    pub fn peer_socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.peer_addr, self.peer_port)
    }

    /// Whether going from `self` to `other` needs a new session (see
    /// [`SessionConfig::needs_reset`]); the connect timeout never does.
    pub fn needs_reset(&self, other: &PeerConfig) -> bool {
        let mut same_live = other.clone();
        same_live.connect_retry = self.connect_retry;
        same_live.connect_retry_max = self.connect_retry_max;
        same_live.connect_timeout = self.connect_timeout;
        same_live.keepalive = self.keepalive;
        same_live != *self
    }
}

/// Errors from [`PeerHandle::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
}

/// A desired route set whose UPDATEs have been written to the peer's socket.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The set handed to [`PeerHandle::set_desired_arc`] (compare with `Arc::ptr_eq`).
    pub routes: Arc<Routes>,
    /// When the last byte of its UPDATEs was written.
    pub at: SystemTime,
}

/// The handle to one peer's task. Dropping it stops the task (without a
/// NOTIFICATION); [`PeerHandle::shutdown`] stops it properly.
#[derive(Debug)]
pub struct PeerHandle {
    desired: watch::Sender<Arc<Routes>>,
    status: watch::Receiver<PeerStatus>,
    synced: watch::Receiver<Option<Synced>>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    listen_addr: Option<SocketAddr>,
    peer: SocketAddr,
}

#[derive(Debug)]
enum Command {
    Shutdown(ShutdownMode, oneshot::Sender<()>),
    Reconfigure(Box<PeerConfig>),
    BfdDown,
}

/// Lets a BFD session tear this peer's session down ([`PeerHandle::bfd_link`]). Holding
/// one does not keep the peer's task alive once its [`PeerHandle`] is gone.
#[derive(Debug, Clone)]
pub struct BfdLink {
    commands: mpsc::WeakUnboundedSender<Command>,
}

impl BfdLink {
    /// The peer's BFD session went from Up to Down: close the BGP session now with
    /// Cease / BFD Down (RFC 9384) and reconnect with the usual backoff.
    pub fn down(&self) {
        if let Some(c) = self.commands.upgrade() {
            let _ = c.send(Command::BfdDown);
        }
    }
}

impl PeerHandle {
    /// Starts the peer's task (needs a tokio runtime). Fails only on an
    /// invalid config or when the listener cannot bind; connection problems
    /// show up in [`PeerStatus::last_error`] and are retried forever.
    pub async fn spawn(config: PeerConfig) -> Result<PeerHandle, SpawnError> {
        Self::spawn_inner(config, Arc::default(), false, None).await
    }

    /// As [`Self::spawn`], for a session that replaces one we have just
    /// closed ourselves: the first reconnects do not back off
    /// ([`Session::reconnect_quickly`]).
    pub async fn spawn_after_close(config: PeerConfig) -> Result<PeerHandle, SpawnError> {
        Self::spawn_inner(config, Arc::default(), true, None).await
    }

    /// As [`Self::spawn`] (or, with `after_close`, [`Self::spawn_after_close`]), with
    /// `initial` as the desired set from the start, calling `observer` for every UPDATE
    /// the session writes to its connection (from the session's task: it must be quick
    /// and must not block).
    ///
    /// A session given its routes only after the spawn can reach Established first and
    /// send End-of-RIB after a partial set; a graceful-restart helper then drops the
    /// stale paths not yet re-sent (RFC 4724 §4.2). With `initial` the first
    /// advertisement and its End-of-RIB carry the whole set.
    pub async fn spawn_observed(
        config: PeerConfig,
        initial: Arc<Routes>,
        observer: Option<UpdateObserver>,
        after_close: bool,
    ) -> Result<PeerHandle, SpawnError> {
        Self::spawn_inner(config, initial, after_close, observer).await
    }

    async fn spawn_inner(
        config: PeerConfig,
        initial: Arc<Routes>,
        quick: bool,
        observer: Option<UpdateObserver>,
    ) -> Result<PeerHandle, SpawnError> {
        if config.hold_time == 1 || config.hold_time == 2 {
            return Err(SpawnError::Config("hold_time must be 0 or >= 3".into()));
        }
        if config.passive && config.listen.is_none() {
            return Err(SpawnError::Config(
                "a passive peer needs a listen address".into(),
            ));
        }
        if let Some(p) = &config.md5_password
            && p.len() > socket::MD5_MAX_KEY_LEN
        {
            return Err(SpawnError::Config(
                "md5_password is longer than 80 bytes".into(),
            ));
        }
        if config.families.is_empty() {
            return Err(SpawnError::Config("no address family".into()));
        }
        let listener = match config.listen {
            Some(addr) => Some(
                bind_listener(addr, &config)
                    .map_err(|source| SpawnError::Listen { addr, source })?,
            ),
            None => None,
        };
        let listen_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut session = Session::new(config.session_config());
        if quick {
            session.reconnect_quickly();
        }
        let (desired_tx, desired_rx) = watch::channel(initial);
        let (status_tx, status_rx) = watch::channel(session.status().clone());
        let (synced_tx, synced_rx) = watch::channel(None);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let peer = config.peer_socket_addr();
        let span = tracing::info_span!("bgp_peer", peer = %peer, peer_asn = config.peer_asn);
        let task = tokio::spawn(
            PeerTask {
                config,
                session,
                listener,
                conn: None,
                connecting: None,
                next_conn_id: 0,
                status: status_tx,
                written_advertised: Arc::default(),
                in_flight: std::collections::VecDeque::new(),
                written: None,
                writers: Vec::new(),
                synced: synced_tx,
                desired_now: Arc::new(Routes::new()),
                tag_next: false,
                observer,
            }
            .run(desired_rx, cmd_rx)
            .instrument(span),
        );
        Ok(PeerHandle {
            desired: desired_tx,
            status: status_rx,
            synced: synced_rx,
            commands: cmd_tx,
            task,
            listen_addr,
            peer,
        })
    }

    /// Replaces the whole desired route set. Cheap: calls made faster than
    /// the task runs coalesce into the latest set.
    pub fn set_desired(&self, routes: Routes) {
        self.desired.send_replace(Arc::new(routes));
    }

    /// As [`Self::set_desired`], sharing the set.
    pub fn set_desired_arc(&self, routes: Arc<Routes>) {
        self.desired.send_replace(routes);
    }

    /// Applies a config that needs no new session (`!current.needs_reset(&config)`,
    /// see [`PeerConfig::needs_reset`]) to the running session; the caller checks
    /// that first. A config that needs a reset is refused by the task and logged.
    pub fn reconfigure(&self, config: PeerConfig) {
        let _ = self.commands.send(Command::Reconfigure(Box::new(config)));
    }

    /// The current status.
    pub fn status(&self) -> PeerStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<PeerStatus> {
        self.status.clone()
    }

    /// A receiver that sees each desired set (the latest one handed over when the
    /// session is Established, or the one it held when it became Established) once the
    /// UPDATEs that brought the peer in line with it have left the socket. A set that
    /// needed no UPDATE is not reported.
    pub fn watch_synced(&self) -> watch::Receiver<Option<Synced>> {
        self.synced.clone()
    }

    /// A link through which a BFD session reports the peer down.
    pub fn bfd_link(&self) -> BfdLink {
        BfdLink {
            commands: self.commands.downgrade(),
        }
    }

    /// The bound listen address (useful with port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// The peer's address and port.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Waits until `pred(status)` holds, at most `timeout`. Returns the
    /// last status seen either way (`Err` on timeout).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&PeerStatus) -> bool,
    ) -> Result<PeerStatus, PeerStatus> {
        let mut rx = self.status.clone();
        let fut = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return Ok(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(rx.borrow().clone());
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(self.status()),
        }
    }

    /// Waits for [`State::Established`], at most `timeout`.
    pub async fn wait_established(&self, timeout: Duration) -> Result<PeerStatus, PeerStatus> {
        self.wait_for(timeout, |s| s.state == State::Established)
            .await
    }

    /// Stops the session: [`ShutdownMode::Withdraw`] withdraws every route
    /// and sends Cease/Administrative Shutdown; [`ShutdownMode::Graceful`]
    /// just closes (the peer keeps our routes if graceful restart was
    /// negotiated). Waits at most [`CLOSE_FLUSH_TIMEOUT`] + 1 s.
    pub async fn shutdown(self, mode: ShutdownMode) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(mode, tx)).is_ok() {
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT + Duration::from_secs(1), rx).await;
        }
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

fn bind_listener(addr: SocketAddr, config: &PeerConfig) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if let Some(pw) = &config.md5_password {
        socket::set_tcp_md5sig(&sock, config.peer_addr, pw.as_bytes())?;
    }
    sock.bind(addr)?;
    sock.listen(16)
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

struct Conn {
    id: u64,
    reader: OwnedReadHalf,
    tx: mpsc::Sender<(Vec<u8>, Option<Arc<Routes>>)>,
    /// Bytes handed to the writer ([`PeerTask::written`] has those it wrote).
    queued: u64,
    /// A batch could not be queued: the connection is being closed, and nothing more
    /// on it counts as written.
    broken: bool,
}

/// The advertised set as of `offset` bytes queued on the connection.
type Advertised = Arc<Routes>;

struct PeerTask {
    config: PeerConfig,
    session: Session,
    listener: Option<TcpListener>,
    conn: Option<Conn>,
    connecting: Option<ConnectFuture>,
    next_conn_id: u64,
    status: watch::Sender<PeerStatus>,
    /// What the peer has been sent for certain: the Adj-RIB-Out's set as of the last
    /// bytes the writer has written to the socket (not merely queued).
    written_advertised: Advertised,
    /// Sets the session has encoded whose bytes are still queued: (queued offset, set).
    in_flight: std::collections::VecDeque<(u64, Advertised)>,
    /// Bytes the current connection's writer has written to the socket.
    written: Option<watch::Receiver<u64>>,
    /// Writer tasks of this and earlier connections; a shutdown waits for them, so the
    /// withdrawals and the NOTIFICATION are on the wire before the process may exit.
    writers: Vec<JoinHandle<()>>,
    synced: watch::Sender<Option<Synced>>,
    /// The desired set last handed to the session.
    desired_now: Arc<Routes>,
    /// The writes the next event produces bring the peer in line with `desired_now`.
    tag_next: bool,
    observer: Option<UpdateObserver>,
}

/// Called for every UPDATE a session writes to its connection; see
/// [`PeerHandle::spawn_observed`].
pub type UpdateObserver = Arc<dyn Fn(&SentUpdate) + Send + Sync>;

/// Size of one read from the socket.
const READ_CHUNK: usize = 64 * 1024;

impl PeerTask {
    async fn run(
        mut self,
        mut desired: watch::Receiver<Arc<Routes>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let (write_err_tx, mut write_err_rx) = mpsc::unbounded_channel::<(u64, String)>();
        let mut buf = vec![0u8; READ_CHUNK];
        let initial = desired.borrow_and_update().clone();
        self.desired_now = Arc::clone(&initial);
        self.apply(Instant::now(), Event::SetDesired(initial), &write_err_tx);
        self.apply(Instant::now(), Event::ManualStart, &write_err_tx);
        loop {
            let deadline = self.session.next_deadline();
            tokio::select! {
                cmd = commands.recv() => {
                    match cmd {
                        Some(Command::Reconfigure(config)) => {
                            if self.config.needs_reset(&config) {
                                tracing::error!("refusing a live reconfiguration that needs a new session");
                            } else if self.session.reconfigure(Instant::now(), config.session_config()) {
                                self.config = *config;
                            }
                        }
                        Some(Command::BfdDown) => {
                            self.apply(Instant::now(), Event::BfdDown, &write_err_tx);
                            self.publish();
                            continue;
                        }
                        Some(Command::Shutdown(mode, done)) => {
                            self.apply(Instant::now(), Event::ManualStop(mode), &write_err_tx);
                            self.publish();
                            // The session dropped its connection: its writer flushes
                            // what is queued and closes (bounded by CLOSE_FLUSH_TIMEOUT).
                            let writers = std::mem::take(&mut self.writers);
                            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
                                for w in writers {
                                    let _ = w.await;
                                }
                            })
                            .await;
                            let _ = done.send(());
                        }
                        None => {
                            // The handle was dropped: stop without ceremony.
                            self.apply(Instant::now(), Event::ManualStop(ShutdownMode::Graceful), &write_err_tx);
                            self.publish();
                        }
                    }
                    return;
                }
                changed = desired.changed() => {
                    if changed.is_ok() {
                        let routes = desired.borrow_and_update().clone();
                        self.desired_now = Arc::clone(&routes);
                        self.tag_next = true;
                        self.apply(Instant::now(), Event::SetDesired(routes), &write_err_tx);
                    } else {
                        // Sender gone means the handle is gone; the command
                        // channel closes too and ends the loop.
                        std::future::pending::<()>().await;
                    }
                }
                n = read_conn(&mut self.conn, &mut buf) => {
                    let ev = match n {
                        Ok(0) => Event::TcpConnectionFails { reason: "connection closed by peer".into() },
                        Ok(n) => Event::Data(buf[..n].to_vec()),
                        Err(e) => Event::TcpConnectionFails { reason: e.to_string() },
                    };
                    if matches!(ev, Event::TcpConnectionFails { .. }) {
                        self.conn = None;
                    }
                    self.apply(Instant::now(), ev, &write_err_tx);
                }
                written = wait_written(&mut self.written) => {
                    if let Some(written) = written {
                        self.confirm_written(written);
                    }
                }
                Some((id, reason)) = write_err_rx.recv() => {
                    if self.conn.as_ref().is_some_and(|c| c.id == id) {
                        self.conn = None;
                        self.apply(Instant::now(), Event::TcpConnectionFails { reason }, &write_err_tx);
                    }
                }
                res = poll_connect(&mut self.connecting) => {
                    self.connecting = None;
                    match res {
                        Ok(stream) => {
                            match (stream.local_addr(), stream.peer_addr()) {
                                (Ok(local), Ok(remote)) => {
                                    self.install(stream, &write_err_tx);
                                    self.apply(Instant::now(), Event::TcpCrAcked { local, remote }, &write_err_tx);
                                }
                                (Err(e), _) | (_, Err(e)) => {
                                    self.apply(Instant::now(), Event::TcpConnectionFails { reason: e.to_string() }, &write_err_tx);
                                }
                            }
                        }
                        Err(e) => {
                            self.apply(Instant::now(), Event::TcpConnectionFails { reason: e.to_string() }, &write_err_tx);
                        }
                    }
                }
                acc = accept(&self.listener) => {
                    match acc {
                        Ok((stream, remote)) => self.on_inbound(stream, remote, &write_err_tx).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            // Avoid spinning on a persistent accept error.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    let now = Instant::now();
                    let out = self.session.on_timers(now);
                    self.carry_out(out, &write_err_tx);
                }
            }
            self.publish();
        }
    }

    fn publish(&mut self) {
        // The session's set is what it encoded; the status says what reached the socket.
        let encoded = &self.session.status().advertised;
        match &self.conn {
            None => {
                self.in_flight.clear();
                self.written_advertised = Arc::clone(encoded);
            }
            Some(conn) => {
                let newest = self
                    .in_flight
                    .back()
                    .map_or(&self.written_advertised, |(_, a)| a);
                if !Arc::ptr_eq(newest, encoded) && !conn.broken {
                    let written = self.written.as_ref().map_or(0, |w| *w.borrow());
                    if conn.queued == written {
                        self.written_advertised = Arc::clone(encoded);
                    } else {
                        self.in_flight.push_back((conn.queued, Arc::clone(encoded)));
                    }
                }
            }
        }
        let mut s = self.session.status().clone();
        s.advertised = Arc::clone(&self.written_advertised);
        self.status.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    /// The writer has written `written` bytes of the current connection: every set queued
    /// up to there has reached the socket.
    fn confirm_written(&mut self, written: u64) {
        while let Some((offset, _)) = self.in_flight.front() {
            if *offset > written {
                break;
            }
            if let Some((_, set)) = self.in_flight.pop_front() {
                self.written_advertised = set;
            }
        }
    }

    fn apply(&mut self, now: Instant, ev: Event, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        let out = self.session.handle(now, ev);
        self.carry_out(out, err_tx);
    }

    fn carry_out(&mut self, out: Vec<Output>, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        // The writes of a new desired set, and the initial advertisement on reaching
        // Established, carry the set along, so the writer can say when it left.
        let entered = out.iter().any(|o| {
            matches!(
                o,
                Output::StateChange {
                    to: State::Established,
                    ..
                }
            )
        });
        let tag = (self.session.state() == State::Established && (entered || self.tag_next))
            .then(|| Arc::clone(&self.desired_now));
        self.tag_next = false;
        for o in out {
            match o {
                Output::Connect => {
                    self.conn = None;
                    self.connecting = Some(Box::pin(connect(self.config.clone())));
                }
                Output::Send(bytes) => {
                    if let Some(c) = &mut self.conn {
                        let len = bytes.len() as u64;
                        match c.tx.try_send((bytes, tag.clone())) {
                            Ok(()) => c.queued += len,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                c.broken = true;
                                let _ = err_tx.send((
                                    c.id,
                                    format!("{WRITE_QUEUE} writes queued: peer is not reading"),
                                ));
                            }
                            // The writer ended; it has reported why.
                            Err(mpsc::error::TrySendError::Closed(_)) => {}
                        }
                    }
                    let sent = self.session.take_sent_updates();
                    if let Some(observer) = &self.observer
                        && self.conn.is_some()
                    {
                        for update in &sent {
                            observer(update);
                        }
                    }
                }
                Output::Disconnect => {
                    // Dropping the sender lets the writer flush and close.
                    self.conn = None;
                    self.connecting = None;
                }
                Output::StateChange { from, to } => {
                    tracing::info!(%from, %to, "BGP session state");
                }
            }
        }
    }

    fn install(&mut self, stream: TcpStream, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (written_tx, written) = watch::channel(0);
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        self.writers.retain(|w| !w.is_finished());
        self.writers.push(tokio::spawn(
            writer_task(
                id,
                writer,
                rx,
                written_tx,
                err_tx.clone(),
                self.synced.clone(),
            )
            .in_current_span(),
        ));
        self.in_flight.clear();
        self.written = Some(written);
        self.conn = Some(Conn {
            id,
            reader,
            tx,
            queued: 0,
            broken: false,
        });
    }

    async fn on_inbound(
        &mut self,
        stream: TcpStream,
        remote: SocketAddr,
        err_tx: &mpsc::UnboundedSender<(u64, String)>,
    ) {
        if remote.ip() != self.config.peer_addr {
            tracing::info!(%remote, "rejecting connection from an unknown address");
            return;
        }
        let Ok(local) = stream.local_addr() else {
            return;
        };
        if let Some(ttl) = self.config.ttl {
            let _ = socket::set_ttl(&stream, ttl, remote.is_ipv6());
        }
        match self.session.state() {
            State::Idle | State::Connect | State::Active => {
                self.connecting = None;
                self.conn = None;
                self.install(stream, err_tx);
                self.apply(
                    Instant::now(),
                    Event::TcpConnectionConfirmed { local, remote },
                    err_tx,
                );
            }
            state => {
                // RFC 4271 §6.8 connection collision. With the peer's OPEN
                // in hand (OpenConfirm) compare BGP Identifiers; otherwise,
                // or once Established, keep the existing connection.
                let peer_id = self.session.peer_open().map(|o| o.router_id);
                let take_inbound = state == State::OpenConfirm
                    && peer_id.is_some_and(|id| {
                        crate::fsm::collision_keeps_inbound(self.config.router_id, id)
                    });
                if take_inbound {
                    self.apply(Instant::now(), Event::OpenCollisionDump, err_tx);
                    self.install(stream, err_tx);
                    self.apply(
                        Instant::now(),
                        Event::TcpConnectionConfirmed { local, remote },
                        err_tx,
                    );
                } else {
                    reject_with_cease(stream).await;
                }
            }
        }
    }
}

/// Sends Cease / Connection Collision Resolution on a connection we do not
/// keep, and closes it.
async fn reject_with_cease(mut stream: TcpStream) {
    let n = Notification::new(
        Notification::CEASE,
        wire::cease::CONNECTION_COLLISION_RESOLUTION,
        Vec::new(),
    );
    if let Ok(bytes) = wire::encode_message(&Message::Notification(n), &WireContext::default()) {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

async fn writer_task(
    id: u64,
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<(Vec<u8>, Option<Arc<Routes>>)>,
    written: watch::Sender<u64>,
    err_tx: mpsc::UnboundedSender<(u64, String)>,
    synced: watch::Sender<Option<Synced>>,
) {
    while let Some((bytes, tag)) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&bytes)).await {
            Ok(Ok(())) => {
                written.send_modify(|w| *w += bytes.len() as u64);
                if let Some(routes) = tag {
                    synced.send_replace(Some(Synced {
                        routes,
                        at: SystemTime::now(),
                    }));
                }
            }
            Ok(Err(e)) => {
                let _ = err_tx.send((id, format!("write failed: {e}")));
                return;
            }
            Err(_) => {
                let _ = err_tx.send((id, "write timed out: peer is not reading".into()));
                return;
            }
        }
    }
    // The sender was dropped: the session closed this connection. Flush
    // and send FIN (bounded).
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, writer.shutdown()).await;
}

/// The writer's progress on the current connection, when it moves.
async fn wait_written(written: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match written {
        Some(w) => match w.changed().await {
            Ok(()) => Some(*w.borrow_and_update()),
            // The writer ended: its error (if any) comes on the error channel.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

async fn read_conn(conn: &mut Option<Conn>, buf: &mut [u8]) -> io::Result<usize> {
    match conn {
        Some(c) => c.reader.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn poll_connect(f: &mut Option<ConnectFuture>) -> io::Result<TcpStream> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn accept(l: &Option<TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// One outbound connection attempt with source address, MD5, TTL and a
/// timeout.
async fn connect(config: PeerConfig) -> io::Result<TcpStream> {
    let peer = config.peer_socket_addr();
    let sock = if peer.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = config.source_addr {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    if let Some(pw) = &config.md5_password {
        socket::set_tcp_md5sig(&sock, config.peer_addr, pw.as_bytes())?;
    }
    if let Some(ttl) = config.ttl {
        socket::set_ttl(&sock, ttl, peer.is_ipv6())?;
    }
    match tokio::time::timeout(config.connect_timeout, sock.connect(peer)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {peer} timed out"),
        )),
    }
}

#[cfg(test)]
mod tests;
