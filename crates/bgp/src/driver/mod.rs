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
use std::time::{Duration, Instant};

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
}

impl PeerConfig {
    /// Active session to `peer_addr:179` with the defaults of [`crate::fsm`].
    pub fn new(peer_addr: IpAddr, peer_asn: u32, local_asn: u32, router_id: Ipv4Addr) -> Self {
        let s = SessionConfig::new(local_asn, peer_asn, router_id);
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
        }
    }

    pub fn peer_socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.peer_addr, self.peer_port)
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

/// The handle to one peer's task. Dropping it stops the task (without a
/// NOTIFICATION); [`PeerHandle::shutdown`] stops it properly.
#[derive(Debug)]
pub struct PeerHandle {
    desired: watch::Sender<Arc<Routes>>,
    status: watch::Receiver<PeerStatus>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    listen_addr: Option<SocketAddr>,
    peer: SocketAddr,
}

#[derive(Debug)]
enum Command {
    Shutdown(ShutdownMode, oneshot::Sender<()>),
}

impl PeerHandle {
    /// Starts the peer's task (needs a tokio runtime). Fails only on an
    /// invalid config or when the listener cannot bind; connection problems
    /// show up in [`PeerStatus::last_error`] and are retried forever.
    pub async fn spawn(config: PeerConfig) -> Result<PeerHandle, SpawnError> {
        Self::spawn_observed(config, None).await
    }

    /// As [`Self::spawn`], calling `observer` for every UPDATE the session writes to
    /// its connection (from the session's task: it must be quick and must not block).
    pub async fn spawn_observed(
        config: PeerConfig,
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
        let session = Session::new(config.session_config());
        let (desired_tx, desired_rx) = watch::channel(Arc::new(Routes::new()));
        let (status_tx, status_rx) = watch::channel(session.status().clone());
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
                observer,
            }
            .run(desired_rx, cmd_rx)
            .instrument(span),
        );
        Ok(PeerHandle {
            desired: desired_tx,
            status: status_rx,
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

    /// The current status.
    pub fn status(&self) -> PeerStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<PeerStatus> {
        self.status.clone()
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
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

struct PeerTask {
    config: PeerConfig,
    session: Session,
    listener: Option<TcpListener>,
    conn: Option<Conn>,
    connecting: Option<ConnectFuture>,
    next_conn_id: u64,
    status: watch::Sender<PeerStatus>,
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
        self.apply(Instant::now(), Event::SetDesired(initial), &write_err_tx);
        self.apply(Instant::now(), Event::ManualStart, &write_err_tx);
        loop {
            let deadline = self.session.next_deadline();
            tokio::select! {
                cmd = commands.recv() => {
                    match cmd {
                        Some(Command::Shutdown(mode, done)) => {
                            self.apply(Instant::now(), Event::ManualStop(mode), &write_err_tx);
                            self.publish();
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

    fn publish(&self) {
        let s = self.session.status();
        self.status.send_if_modified(|cur| {
            if cur != s {
                *cur = s.clone();
                true
            } else {
                false
            }
        });
    }

    fn apply(&mut self, now: Instant, ev: Event, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        let out = self.session.handle(now, ev);
        self.carry_out(out, err_tx);
    }

    fn carry_out(&mut self, out: Vec<Output>, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        for o in out {
            match o {
                Output::Connect => {
                    self.conn = None;
                    self.connecting = Some(Box::pin(connect(self.config.clone())));
                }
                Output::Send(bytes) => {
                    if let Some(c) = &self.conn {
                        let _ = c.tx.send(bytes);
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
        let _ = err_tx;
    }

    fn install(&mut self, stream: TcpStream, err_tx: &mpsc::UnboundedSender<(u64, String)>) {
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        tokio::spawn(writer_task(id, writer, rx, err_tx.clone()).in_current_span());
        self.conn = Some(Conn { id, reader, tx });
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
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    err_tx: mpsc::UnboundedSender<(u64, String)>,
) {
    while let Some(bytes) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&bytes)).await {
            Ok(Ok(())) => {}
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
