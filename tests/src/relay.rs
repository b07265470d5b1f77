//! An in-process TCP relay on loopback between Herald's clients and one upstream (a
//! `herald-ipam`), which can turn into a blackhole: connections stay open and new ones
//! are accepted, but every byte either way is read and dropped, as on a path that loses
//! every packet. Neither end sees a close or a reset; only their own timeouts and
//! keepalives can tell them. Bytes dropped mid-frame stay lost after [`Relay::resume`],
//! so a connection carried across the blackhole usually breaks then, as TLS or HTTP/2
//! framing fails: the clients must cope with that too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Counters {
    forwarding: tokio::sync::watch::Sender<bool>,
    accepted: AtomicU64,
    dropped_bytes: AtomicU64,
}

/// The relay; dropping it stops it and closes every connection it carries.
pub struct Relay {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters {
            forwarding: tokio::sync::watch::Sender::new(true),
            accepted: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
        });
        let shared = Arc::clone(&counters);
        let task = tokio::spawn(async move {
            // The connections' tasks live in the set, so dropping the relay ends them.
            let mut connections = tokio::task::JoinSet::new();
            // Bounded: aborted when the relay is dropped.
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, say: not a reason to spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                while connections.try_join_next().is_some() {}
                let counters = Arc::clone(&shared);
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let mut resumed = counters.forwarding.subscribe();
                    let mut up =
                        std::pin::pin!(pump(&mut client_read, &mut server_write, &counters));
                    let mut down =
                        std::pin::pin!(pump(&mut server_read, &mut client_write, &counters));
                    // Forwarding, either direction ending (a close, an error) ends both.
                    // In a blackhole a close is as lost as any byte: the other end keeps
                    // its connection, silent, until the relay forwards again and finds
                    // the connection gone.
                    let up_ended = tokio::select! {
                        () = &mut up => true,
                        () = &mut down => false,
                    };
                    if !*resumed.borrow() {
                        let rest = if up_ended { down } else { up };
                        tokio::select! {
                            _ = resumed.wait_for(|forwarding| *forwarding) => {}
                            () = rest => {}
                        }
                    }
                });
            }
        });
        Relay {
            addr,
            counters,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay as a gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding: from now on every byte read is dropped.
    pub fn blackhole(&self) {
        self.counters.forwarding.send_replace(false);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.counters.forwarding.send_replace(true);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Bytes dropped while blackholed, both directions.
    pub fn dropped_bytes(&self) -> u64 {
        self.counters.dropped_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while forwarding, drops what it reads otherwise; returns at the
/// end of `from` or on any error. The halves stay the caller's: dropping a write half
/// sends a FIN, which must not happen in a blackhole.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    counters: &Counters,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded by the connection: it ends at EOF or an error, or when the relay is dropped.
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *counters.forwarding.borrow() {
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        } else {
            counters.dropped_bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}
