//! A TCP relay between a speaker and a ToR that can go silent on command.
//!
//! Killing a speaker closes its TCP connection, so the ToR notices at once. To test what
//! happens when a peer stops talking but the connection stays open (a hung node, a link
//! that drops everything), put this relay in the path and call [`TcpRelay::blackhole`]:
//! it stops moving bytes in both directions but keeps both connections open, so only the
//! ToR's hold timer can detect it.
//!
//! It also counts the BGP UPDATE messages it carries towards the ToR, which is how a
//! benchmark counts the UPDATEs of a speaker that does not count them itself (BIRD) at a
//! ToR that does not either (BIRD).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Relays connections accepted on a loopback address to `upstream`, connecting from a
/// chosen loopback source address (which is the neighbor address the ToR sees).
#[derive(Debug)]
pub struct TcpRelay {
    local: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
    updates: Arc<AtomicU64>,
}

/// What the relay does now. Connections remember the `cuts` count they started under and
/// end as soon as it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    blackhole: bool,
    cuts: u64,
}

impl TcpRelay {
    /// Listens on `listen_ip` (a free port) and relays each connection to `upstream`
    /// from `source` (port chosen by the kernel). All three must be loopback.
    pub async fn start(
        listen_ip: Ipv4Addr,
        upstream: SocketAddr,
        source: Ipv4Addr,
    ) -> Result<TcpRelay> {
        if !listen_ip.is_loopback() || !upstream.ip().is_loopback() || !source.is_loopback() {
            bail!("the relay only runs between loopback addresses");
        }
        let listener = TcpListener::bind((listen_ip, 0))
            .await
            .context("binding the relay")?;
        let local = listener.local_addr()?;
        let (mode, watch_mode) = watch::channel(Mode {
            blackhole: false,
            cuts: 0,
        });
        let updates = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            source,
            watch_mode,
            Arc::clone(&updates),
        ));
        Ok(TcpRelay {
            local,
            mode,
            task,
            updates,
        })
    }

    /// BGP UPDATE messages relayed towards `upstream` so far, on every connection.
    pub fn updates_upstream(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// The address speakers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stop moving bytes, keep the connections open.
    pub fn blackhole(&self) {
        self.mode.send_modify(|mode| mode.blackhole = true);
    }

    /// Move bytes again (and accept new connections normally).
    pub fn restore(&self) {
        self.mode.send_modify(|mode| mode.blackhole = false);
    }

    /// Close every relayed connection now (both sides see the connection end), then keep
    /// relaying new ones.
    pub fn cut(&self) {
        self.mode.send_modify(|mode| {
            mode.blackhole = false;
            mode.cuts += 1;
        });
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    source: Ipv4Addr,
    mode: watch::Receiver<Mode>,
    updates: Arc<AtomicU64>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let mode = mode.clone();
        let cuts = mode.borrow().cuts;
        let updates = Arc::clone(&updates);
        tokio::spawn(async move {
            match connect_from(source, upstream).await {
                Ok(outbound) => relay(inbound, outbound, mode, cuts, updates).await,
                Err(error) => tracing::debug!(%error, "relay: upstream connect failed"),
            }
        });
    }
}

async fn connect_from(source: Ipv4Addr, upstream: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(upstream).await
}

async fn relay(
    inbound: TcpStream,
    outbound: TcpStream,
    mode: watch::Receiver<Mode>,
    cuts: u64,
    updates: Arc<AtomicU64>,
) {
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // Either direction ending (EOF, error or Cut) ends both: the halves drop together.
    tokio::select! {
        () = pump(in_read, out_write, mode.clone(), cuts, Some(updates)) => {}
        () = pump(out_read, in_write, mode, cuts, None) => {}
    }
}

/// Counts the BGP messages of one type in a byte stream cut anywhere: only the fixed
/// 19-octet headers (RFC 4271 §4.1) are read, each message's body is skipped by its
/// length. A length below the header's own ends the counting (not BGP).
#[derive(Debug)]
struct MessageCounter {
    wanted: u8,
    header: [u8; HEADER_LEN],
    have: usize,
    skip: usize,
    broken: bool,
}

const HEADER_LEN: usize = 19;
/// RFC 4271 §4.3.
const UPDATE: u8 = 2;

impl MessageCounter {
    fn new(wanted: u8) -> Self {
        MessageCounter {
            wanted,
            header: [0; HEADER_LEN],
            have: 0,
            skip: 0,
            broken: false,
        }
    }

    /// Messages of the wanted type whose header ends in `bytes`.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut found = 0;
        while !bytes.is_empty() && !self.broken {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER_LEN {
                let len = usize::from(u16::from_be_bytes([self.header[16], self.header[17]]));
                if len < HEADER_LEN {
                    self.broken = true;
                    break;
                }
                if self.header[18] == self.wanted {
                    found += 1;
                }
                self.skip = len - HEADER_LEN;
                self.have = 0;
            }
        }
        found
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    cuts: u64,
    updates: Option<Arc<AtomicU64>>,
) {
    let mut counter = MessageCounter::new(UPDATE);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Wait while blackholed; leave once cut.
        loop {
            let now = *mode.borrow_and_update();
            if now.cuts != cuts {
                return;
            }
            if !now.blackhole {
                break;
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(updates) = &updates {
                    updates.fetch_add(counter.feed(&buf[..n]), Ordering::Relaxed);
                }
                if mode.borrow().cuts != cuts || to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Three messages (KEEPALIVE, UPDATE, UPDATE) fed in every possible two-piece cut.
    #[test]
    fn counts_updates_across_any_cut() {
        let message = |kind: u8, body: usize| {
            let mut m = vec![0xff; 16];
            m.extend_from_slice(&u16::try_from(HEADER_LEN + body).unwrap_or(0).to_be_bytes());
            m.push(kind);
            m.extend(std::iter::repeat_n(2u8, body));
            m
        };
        let mut stream = message(4, 0);
        stream.extend(message(UPDATE, 30));
        stream.extend(message(UPDATE, 0));
        for cut in 0..=stream.len() {
            let mut counter = MessageCounter::new(UPDATE);
            let (a, b) = stream.split_at(cut);
            assert_eq!(counter.feed(a) + counter.feed(b), 2, "cut at {cut}");
        }
        // Not BGP: a length shorter than the header stops the count.
        let mut counter = MessageCounter::new(UPDATE);
        let mut bad = vec![0xff; 16];
        bad.extend_from_slice(&[0, 3, UPDATE]);
        bad.extend(message(UPDATE, 0));
        assert_eq!(counter.feed(&bad), 0);
    }

    #[tokio::test]
    async fn forwards_blackholes_and_cuts() -> Result<()> {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let relay = TcpRelay::start(
            Ipv4Addr::LOCALHOST,
            server.local_addr()?,
            Ipv4Addr::new(127, 0, 0, 77),
        )
        .await?;
        let mut client = TcpStream::connect(relay.local_addr()).await?;
        let (mut upstream, peer) = server.accept().await?;
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77))
        );

        client.write_all(b"open").await?;
        let mut buf = [0u8; 4];
        upstream.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"open");

        relay.blackhole();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"lost").await?;
        let silent =
            tokio::time::timeout(Duration::from_millis(200), upstream.read(&mut buf)).await;
        assert!(silent.is_err(), "bytes crossed a blackholed relay");

        relay.cut();
        let closed = tokio::time::timeout(Duration::from_secs(2), upstream.read(&mut buf)).await?;
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        Ok(())
    }
}
