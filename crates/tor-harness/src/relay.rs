//! A TCP relay between a speaker and a ToR that can go silent on command.
//!
//! Killing a speaker closes its TCP connection, so the ToR notices at once. To test what
//! happens when a peer stops talking but the connection stays open (a hung node, a link
//! that drops everything), put this relay in the path and call [`TcpRelay::blackhole`]:
//! it stops moving bytes in both directions but keeps both connections open, so only the
//! ToR's hold timer can detect it.

use std::net::{Ipv4Addr, SocketAddr};

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
        let task = tokio::spawn(accept_loop(listener, upstream, source, watch_mode));
        Ok(TcpRelay { local, mode, task })
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
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let mode = mode.clone();
        let cuts = mode.borrow().cuts;
        tokio::spawn(async move {
            match connect_from(source, upstream).await {
                Ok(outbound) => relay(inbound, outbound, mode, cuts).await,
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

async fn relay(inbound: TcpStream, outbound: TcpStream, mode: watch::Receiver<Mode>, cuts: u64) {
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // Either direction ending (EOF, error or Cut) ends both: the halves drop together.
    tokio::select! {
        () = pump(in_read, out_write, mode.clone(), cuts) => {}
        () = pump(out_read, in_write, mode, cuts) => {}
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    cuts: u64,
) {
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
