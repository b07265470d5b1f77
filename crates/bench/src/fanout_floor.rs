//! The least any gRPC service can do to fan one change out to many server streams: a
//! server whose `Watch` streams follow one broadcast and whose `Check` puts the next
//! message on it, nothing else (no store, no route computation, a two-byte message).
//! `fanout` runs it with the same subscribers, connections and change rate as herald-ipam,
//! in its own process on the same cores, so Herald's delivery figures sit beside the bound
//! that tonic, HTTP/2 and a 2-core machine set for every design.
//!
//! It serves the standard health service: `Watch` is a server stream, and `Check` with the
//! service name [`CHANGE`] is the change RPC (an empty name only asks whether the server
//! is up).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::ipam::IpamServer;
use crate::stats::{Latencies, Summary};

/// The `Check` service name that broadcasts a change.
const CHANGE: &str = "change";
/// Messages a stream may fall behind before it misses one: far more than a run sends
/// while its subscribers keep up, so a miss means a subscriber could not.
const BACKLOG: usize = 4096;
/// Bound on every subscriber getting its first message.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the subscribers may take to receive the last change.
const DRAIN: Duration = Duration::from_secs(3);

/// `herald-bench fanout-server`: serve until killed.
#[derive(Debug, Clone, Args)]
pub struct FanoutServerArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    /// Unused: every server the benches launch is given a database URL.
    #[arg(long)]
    pub database_url: Option<String>,
}

struct Broadcasting {
    changes: broadcast::Sender<i32>,
    sent: AtomicI32,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

/// Each change flips the status, so consecutive messages differ as Herald's snapshots do.
fn status_of(change: i32) -> i32 {
    if change % 2 == 0 {
        ServingStatus::Serving.into()
    } else {
        ServingStatus::NotServing.into()
    }
}

#[tonic::async_trait]
impl Health for Broadcasting {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = if request.into_inner().service == CHANGE {
            let next = self.sent.fetch_add(1, Ordering::Relaxed);
            // No receiver yet is not an error: the change is simply seen by nobody.
            let _ = self.changes.send(next);
            status_of(next)
        } else {
            ServingStatus::Serving.into()
        };
        Ok(Response::new(HealthCheckResponse { status }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let changes = self.changes.subscribe();
        let first = futures::stream::once(async {
            Ok(HealthCheckResponse {
                status: ServingStatus::Serving.into(),
            })
        });
        let rest = futures::stream::unfold(changes, |mut changes| async move {
            let item = match changes.recv().await {
                Ok(change) => Ok(HealthCheckResponse {
                    status: status_of(change),
                }),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Err(Status::data_loss(format!("fell {n} changes behind")))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((item, changes))
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }
}

/// The child's main.
pub async fn serve(args: FanoutServerArgs) -> anyhow::Result<()> {
    let (changes, _) = broadcast::channel(BACKLOG);
    tonic::transport::Server::builder()
        .add_service(HealthServer::new(Broadcasting {
            changes,
            sent: AtomicI32::new(0),
        }))
        .serve(args.listen)
        .await
        .context("serve")
}

/// What the floor's subscribers saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorFanout {
    pub changes: u64,
    /// Receive time minus the time the change RPC returned (clamped at 0).
    pub from_answer: Summary,
    /// Per change, from its first subscriber to its last.
    pub spread: Summary,
    /// Messages some subscriber never got.
    pub missed: u64,
}

/// Starts the floor server (the herald-bench executable, `fanout-server`), opens
/// `subscribers` Watch streams over `channels` connections, and sends a change every
/// `1 / rate` s for `duration`, as `fanout` does against herald-ipam.
pub async fn run(
    herald_bench: &Path,
    log_dir: &Path,
    poll: Duration,
    subscribers: usize,
    channels: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<FloorFanout> {
    let mut command = Command::new(herald_bench);
    command.arg("fanout-server");
    let (server, _) = IpamServer::launch(
        "herald-bench fanout-server",
        command,
        "unused",
        log_dir,
        poll,
        "",
    )
    .await?;
    let conns = server.channels(channels.max(1)).await?;
    let epoch = Instant::now();
    let (stop, _) = tokio::sync::watch::channel(false);
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(subscribers.max(1));
    let mut tasks = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let mut client = HealthClient::new(conns[i % conns.len()].clone());
        let first_tx = first_tx.clone();
        let mut stop = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<Duration> = Vec::with_capacity(2048);
            let mut stream = client
                .watch(HealthCheckRequest::default())
                .await
                .map_err(|e| crate::ipam::status_text(&e))?
                .into_inner();
            let mut first = true;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    message = stream.message() => match message {
                        Ok(Some(_)) if first => {
                            first = false;
                            let _ = first_tx.send(()).await;
                        }
                        Ok(Some(_)) => seen.push(epoch.elapsed()),
                        Ok(None) => break,
                        Err(e) => return Err(crate::ipam::status_text(&e)),
                    },
                }
            }
            Ok::<_, String>(seen)
        }));
    }
    drop(first_tx);
    let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
    let mut ready = 0usize;
    while ready < subscribers {
        match tokio::time::timeout_at(deadline, first_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < subscribers {
        bail!("fan-out floor: only {ready} of {subscribers} subscribers got their first message");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut client = HealthClient::new(conns[0].clone());
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let max_changes = (duration.as_secs_f64() * rate).ceil() as u64;
    let mut answered_at = Vec::new();
    let start = Instant::now();
    while (answered_at.len() as u64) < max_changes && start.elapsed() < duration {
        let k = u32::try_from(answered_at.len()).unwrap_or(u32::MAX);
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + interval * k)).await;
        client
            .check(HealthCheckRequest {
                service: CHANGE.into(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("change: {}", crate::ipam::status_text(&e)))?;
        answered_at.push(epoch.elapsed());
    }
    tokio::time::sleep(DRAIN).await;
    let _ = stop.send(true);

    let mut from_answer = Latencies::new();
    let mut spread: Vec<Option<(Duration, Duration)>> = vec![None; answered_at.len()];
    let mut missed = 0u64;
    for task in tasks {
        let seen = match task.await {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => bail!("a fan-out floor subscriber failed: {e}"),
            Err(e) => bail!("a fan-out floor subscriber task: {e}"),
        };
        // The k-th message after the first is change k: the broadcast drops none (a
        // lagging stream ends with DATA_LOSS, which fails the run above).
        missed += (answered_at.len() as u64).saturating_sub(seen.len() as u64);
        for ((at, answered), slot) in seen.iter().zip(&answered_at).zip(spread.iter_mut()) {
            from_answer.record(at.saturating_sub(*answered));
            *slot = Some(match *slot {
                None => (*at, *at),
                Some((lo, hi)) => (lo.min(*at), hi.max(*at)),
            });
        }
    }
    let mut spreads = Latencies::new();
    for (lo, hi) in spread.into_iter().flatten() {
        spreads.record(hi.saturating_sub(lo));
    }
    drop(conns);
    drop(server);
    Ok(FloorFanout {
        changes: answered_at.len() as u64,
        from_answer: from_answer.summary(),
        spread: spreads.summary(),
        missed,
    })
}
