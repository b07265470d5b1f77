//! The tokio driver: one task per session owns a [`Session`], its timers and its transmit
//! socket; one reader task per local address and port receives every session's packets
//! there and hands each to its session.
//!
//! Single-hop (RFC 5881): packets go to port 3784 from a source port in 49152–65535 with
//! TTL 255, and a received packet whose TTL is not 255 is discarded (GTSM, §5), so only a
//! directly connected system can speak to the session. Multihop (RFC 5883): port 4784,
//! sent with TTL 255 and received with any TTL unless [`PeerSpec::min_rx_ttl`] asks for a
//! check (RFC 5883 §5 leaves it to configuration; BIRD sends multihop packets with the
//! system's default TTL of 64). Nothing here panics on what arrives from the network: a packet is decoded,
//! checked, and either handed to its session or counted and dropped.

use std::collections::HashMap;
use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::packet::{ControlPacket, MANDATORY_LEN, State};
use crate::session::{Output, Session, SessionConfig, SessionStatus};

/// RFC 5881 §4: single-hop Control packets go to this port.
pub const SINGLE_HOP_PORT: u16 = 3784;
/// RFC 5883 §5: multihop Control packets go to this port.
pub const MULTIHOP_PORT: u16 = 4784;
/// RFC 5881 §4: the source port range.
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// The TTL every packet is sent with, so GTSM at the receiver can work.
pub const SEND_TTL: u8 = 255;
/// The lowest TTL a multihop packet may arrive with by default: any.
pub const DEFAULT_MULTIHOP_MIN_TTL: u8 = 1;
/// How many source ports to try before giving up.
const SOURCE_PORT_TRIES: usize = 64;
/// Packets a session may have waiting before newer ones are dropped (a session reads
/// them far faster than any peer sends).
const SESSION_QUEUE: usize = 64;
/// How many AdminDown packets a closing session sends: one may be lost.
const ADMIN_DOWN_REPEATS: u32 = 3;

/// One BFD session to set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub peer: IpAddr,
    /// The local address packets are sent from and received on.
    pub local: IpAddr,
    /// RFC 5883 multihop instead of RFC 5881 single-hop.
    pub multihop: bool,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub detect_mult: u8,
    /// The port both sides listen on; `None` is 3784 or 4784. Only tests between two
    /// instances on one host need another.
    pub port: Option<u16>,
    /// The lowest TTL accepted; `None` is 255 for single-hop and
    /// [`DEFAULT_MULTIHOP_MIN_TTL`] for multihop.
    pub min_rx_ttl: Option<u8>,
}

impl PeerSpec {
    /// Single-hop with the given timers.
    pub fn single_hop(
        peer: IpAddr,
        local: IpAddr,
        interval: Duration,
        detect_mult: u8,
    ) -> PeerSpec {
        PeerSpec {
            peer,
            local,
            multihop: false,
            desired_min_tx: interval,
            required_min_rx: interval,
            detect_mult,
            port: None,
            min_rx_ttl: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.multihop {
            MULTIHOP_PORT
        } else {
            SINGLE_HOP_PORT
        })
    }

    fn min_ttl(&self) -> u8 {
        self.min_rx_ttl.unwrap_or(if self.multihop {
            DEFAULT_MULTIHOP_MIN_TTL
        } else {
            SEND_TTL
        })
    }
}

/// Errors from [`Bfd::add`].
#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("invalid BFD session: {0}")]
    Config(String),
    #[error("cannot receive BFD on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot send BFD from {local}: {source}")]
    Source { local: IpAddr, source: io::Error },
}

/// Packet counters of one receiving socket, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxCounters {
    pub delivered: u64,
    /// Refused by RFC 5880 §6.8.6 (malformed) or by the TTL check.
    pub invalid: u64,
    /// Well-formed but for no session here.
    pub unmatched: u64,
}

/// The system's BFD: owns the discriminators and the receiving sockets. Cheap to clone.
#[derive(Clone, Default)]
pub struct Bfd {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Bfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bfd")
    }
}

#[derive(Default)]
struct Inner {
    listeners: HashMap<SocketAddr, Weak<Listener>>,
}

/// One receiving socket and the sessions behind it.
struct Listener {
    addr: SocketAddr,
    sessions: Mutex<HashMap<u32, Route>>,
    counters: Mutex<RxCounters>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The last session is gone: stop reading, which closes the socket.
        if let Some(r) = self.reader.get_mut().ok().and_then(Option::take) {
            r.abort();
        }
    }
}

#[derive(Clone)]
struct Route {
    peer: IpAddr,
    min_ttl: u8,
    tx: mpsc::Sender<ControlPacket>,
}

impl Bfd {
    pub fn new() -> Bfd {
        Bfd::default()
    }

    /// Starts a session (needs a tokio runtime). Fails on an invalid spec or when a
    /// socket cannot be bound; the session then runs until the handle is dropped.
    pub async fn add(&self, spec: PeerSpec) -> Result<SessionHandle, BfdError> {
        if spec.detect_mult == 0 {
            return Err(BfdError::Config(
                "detect multiplier must be at least 1".into(),
            ));
        }
        if spec.desired_min_tx.is_zero() {
            return Err(BfdError::Config(
                "minimum transmit interval must be above 0".into(),
            ));
        }
        if spec.peer.is_ipv4() != spec.local.is_ipv4() {
            return Err(BfdError::Config(format!(
                "peer {} and local address {} are of different families",
                spec.peer, spec.local
            )));
        }
        let listen = SocketAddr::new(spec.local, spec.port());
        let listener = self.listener(listen)?;
        let tx_sock = bind_source(spec.local).map_err(|source| BfdError::Source {
            local: spec.local,
            source,
        })?;
        let (pkt_tx, pkt_rx) = mpsc::channel(SESSION_QUEUE);
        let local_disc = {
            let mut sessions = lock(&listener.sessions);
            let disc = loop {
                let d: u32 = rand::random();
                if d != 0 && !sessions.contains_key(&d) {
                    break d;
                }
            };
            sessions.insert(
                disc,
                Route {
                    peer: spec.peer,
                    min_ttl: spec.min_ttl(),
                    tx: pkt_tx,
                },
            );
            disc
        };
        let now = Instant::now();
        let session = Session::new(
            now,
            SessionConfig {
                local_disc,
                desired_min_tx: spec.desired_min_tx,
                required_min_rx: spec.required_min_rx,
                detect_mult: spec.detect_mult,
                jitter_seed: rand::random(),
            },
        );
        let (status_tx, status_rx) = watch::channel(session.status());
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let dest = SocketAddr::new(spec.peer, spec.port());
        let span = tracing::info_span!("bfd_session", peer = %spec.peer, local = %spec.local, multihop = spec.multihop);
        let task = tokio::spawn(
            SessionTask {
                session,
                socket: tx_sock,
                dest,
                status: status_tx,
                listener: listener.clone(),
            }
            .run(pkt_rx, cmd_rx)
            .instrument(span),
        );
        Ok(SessionHandle {
            status: status_rx,
            commands: cmd_tx,
            task: Some(task),
            listener,
            local_disc,
        })
    }

    /// The receiving socket for `addr`, shared by every session on it.
    fn listener(&self, addr: SocketAddr) -> Result<Arc<Listener>, BfdError> {
        let mut inner = lock(&self.inner);
        if let Some(l) = inner.listeners.get(&addr).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let sock = bind_receiver(addr).map_err(|source| BfdError::Listen { addr, source })?;
        let listener = Arc::new(Listener {
            addr,
            sessions: Mutex::new(HashMap::new()),
            counters: Mutex::new(RxCounters::default()),
            reader: Mutex::new(None),
        });
        let reader = tokio::spawn(
            read_loop(sock, Arc::downgrade(&listener))
                .instrument(tracing::info_span!("bfd_listener", %addr)),
        );
        *lock(&listener.reader) = Some(reader);
        inner.listeners.retain(|_, l| l.strong_count() > 0);
        inner.listeners.insert(addr, Arc::downgrade(&listener));
        Ok(listener)
    }
}

/// One running session. Dropping it sends AdminDown (so the remote does not count it as
/// a failure) and ends the session.
#[derive(Debug)]
pub struct SessionHandle {
    status: watch::Receiver<SessionStatus>,
    commands: mpsc::UnboundedSender<Command>,
    task: Option<JoinHandle<()>>,
    listener: Arc<Listener>,
    local_disc: u32,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listener({})", self.addr)
    }
}

#[derive(Debug)]
enum Command {
    SetTimers {
        desired_min_tx: Duration,
        required_min_rx: Duration,
        detect_mult: u8,
    },
}

impl SessionHandle {
    pub fn status(&self) -> SessionStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<SessionStatus> {
        self.status.clone()
    }

    /// bfd.LocalDiscr.
    pub fn local_disc(&self) -> u32 {
        self.local_disc
    }

    /// The receiving socket's counters (shared with the other sessions on it).
    pub fn rx_counters(&self) -> RxCounters {
        *lock(&self.listener.counters)
    }

    /// New timers, announced with a Poll Sequence while Up.
    pub fn set_timers(&self, desired_min_tx: Duration, required_min_rx: Duration, detect_mult: u8) {
        let _ = self.commands.send(Command::SetTimers {
            desired_min_tx,
            required_min_rx,
            detect_mult,
        });
    }

    /// Waits until `pred(status)` holds, at most `timeout`; the last status either way.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&SessionStatus) -> bool,
    ) -> Result<SessionStatus, SessionStatus> {
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

    /// Sends AdminDown and ends the session, waiting at most a second.
    pub async fn close(mut self) {
        let task = self.task.take();
        // Dropping the command sender tells the task to say goodbye.
        let (dummy, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, dummy));
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        lock(&self.listener.sessions).remove(&self.local_disc);
    }
}

struct SessionTask {
    session: Session,
    socket: UdpSocket,
    dest: SocketAddr,
    status: watch::Sender<SessionStatus>,
    /// Kept so the receiving socket lives as long as the session.
    #[allow(dead_code)]
    listener: Arc<Listener>,
}

impl SessionTask {
    async fn run(
        mut self,
        mut packets: mpsc::Receiver<ControlPacket>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        loop {
            let deadline = self.session.next_deadline();
            let out = tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::SetTimers { desired_min_tx, required_min_rx, detect_mult }) => {
                        self.session.set_timers(Instant::now(), desired_min_tx, required_min_rx, detect_mult)
                    }
                    None => {
                        self.say_goodbye().await;
                        return;
                    }
                },
                p = packets.recv() => match p {
                    Some(p) => self.session.on_packet(Instant::now(), &p),
                    None => {
                        self.say_goodbye().await;
                        return;
                    }
                },
                _ = sleep_until(deadline) => self.session.on_timers(Instant::now()),
            };
            self.carry_out(out);
            let s = self.session.status();
            self.status.send_if_modified(|cur| {
                if *cur != s {
                    *cur = s;
                    true
                } else {
                    false
                }
            });
        }
    }

    fn carry_out(&self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Send(p) => self.send(&p),
                Output::StateChange { from, to, diag } => {
                    if to == State::Down && from == State::Up {
                        tracing::warn!(%from, %to, %diag, "BFD session down");
                    } else {
                        tracing::info!(%from, %to, %diag, "BFD session state");
                    }
                }
            }
        }
    }

    fn send(&self, p: &ControlPacket) {
        // UDP sends do not block for long; a full buffer loses this packet, which the
        // protocol tolerates (the next one follows within an interval).
        if let Err(e) = self.socket.try_send_to(&p.encode(), self.dest)
            && e.kind() != io::ErrorKind::WouldBlock
        {
            tracing::debug!(error = %e, dest = %self.dest, "BFD send failed");
        }
    }

    async fn say_goodbye(&mut self) {
        let out = self.session.admin_down(Instant::now());
        self.carry_out(out);
        for _ in 1..ADMIN_DOWN_REPEATS {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let p = self
                .session
                .on_timers(Instant::now() + Duration::from_secs(3600));
            // Only the periodic AdminDown packet: the session is AdminDown.
            self.carry_out(p);
        }
        let s = self.session.status();
        self.status.send_replace(s);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The receiving socket: the local address and the BFD port, with the received TTL
/// reported. SO_REUSEADDR lets it share the port with a BFD daemon bound to the
/// wildcard address on the same host (the kernel delivers to the more specific bind).
fn bind_receiver(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    if addr.is_ipv4() {
        socket::setsockopt(&s, sockopt::Ipv4RecvTtl, &true)?;
    } else {
        s.set_only_v6(true)?;
        socket::setsockopt(&s, sockopt::Ipv6RecvHopLimit, &true)?;
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// The sending socket: the local address, a free port in [`SOURCE_PORTS`], TTL 255.
fn bind_source(local: IpAddr) -> io::Result<UdpSocket> {
    let domain = if local.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no free source port");
    for _ in 0..SOURCE_PORT_TRIES {
        let port = rand::random_range(SOURCE_PORTS);
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        s.set_nonblocking(true)?;
        if local.is_ipv4() {
            s.set_ttl_v4(u32::from(SEND_TTL))?;
        } else {
            s.set_only_v6(true)?;
            s.set_unicast_hops_v6(u32::from(SEND_TTL))?;
        }
        match s.bind(&SocketAddr::new(local, port).into()) {
            Ok(()) => return UdpSocket::from_std(s.into()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// One datagram with its source and received TTL.
struct Datagram {
    len: usize,
    from: Option<SocketAddr>,
    ttl: Option<u8>,
}

fn recv_with_ttl(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut ttl = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) => {
                    ttl = u8::try_from(t).ok();
                }
                _ => {}
            }
        }
    }
    let from = msg.address.and_then(|a: SockaddrStorage| {
        if let Some(v4) = a.as_sockaddr_in() {
            Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        } else {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        }
    });
    Ok(Datagram {
        len: msg.bytes,
        from,
        ttl,
    })
}

/// Receives until the listener is gone. Each datagram is checked and handed to its
/// session; nothing a sender puts in one can stop the loop.
async fn read_loop(sock: UdpSocket, listener: Weak<Listener>) {
    // Larger than any Control packet, so an oversized datagram is seen whole and refused
    // by its Length field rather than silently cut.
    let mut buf = vec![0u8; 1024];
    loop {
        let got = sock
            .async_io(Interest::READABLE, || recv_with_ttl(&sock, &mut buf))
            .await;
        let Some(l) = listener.upgrade() else { return };
        let d = match got {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "BFD receive failed");
                // Avoid spinning on a persistent error.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let verdict = deliver(&l, &buf[..d.len.min(buf.len())], d.from, d.ttl);
        let mut c = lock(&l.counters);
        match verdict {
            Verdict::Delivered => c.delivered += 1,
            Verdict::Invalid(why) => {
                c.invalid += 1;
                tracing::debug!(from = ?d.from, %why, "BFD packet discarded");
            }
            Verdict::Unmatched => c.unmatched += 1,
        }
    }
}

enum Verdict {
    Delivered,
    Invalid(String),
    Unmatched,
}

/// RFC 5880 §6.8.6 demultiplexing: by Your Discriminator when it is set, else by the
/// source address; then the TTL check of the session's kind.
fn deliver(l: &Listener, bytes: &[u8], from: Option<SocketAddr>, ttl: Option<u8>) -> Verdict {
    if bytes.len() < MANDATORY_LEN {
        return Verdict::Invalid(format!("{} bytes", bytes.len()));
    }
    let p = match ControlPacket::decode(bytes) {
        Ok(p) => p,
        Err(e) => return Verdict::Invalid(e.to_string()),
    };
    let Some(from) = from else {
        return Verdict::Invalid("no source address".into());
    };
    let route = {
        let sessions = lock(&l.sessions);
        if p.your_disc != 0 {
            sessions.get(&p.your_disc).cloned()
        } else {
            sessions.values().find(|r| r.peer == from.ip()).cloned()
        }
    };
    let Some(route) = route else {
        return Verdict::Unmatched;
    };
    if route.peer != from.ip() {
        return Verdict::Invalid(format!(
            "discriminator belongs to {}, not {from}",
            route.peer
        ));
    }
    match ttl {
        Some(t) if t >= route.min_ttl => {}
        other => {
            return Verdict::Invalid(format!(
                "TTL {other:?}, at least {} required",
                route.min_ttl
            ));
        }
    }
    // A full queue means the session is far behind; dropping is what the wire would do.
    let _ = route.tx.try_send(p);
    Verdict::Delivered
}
