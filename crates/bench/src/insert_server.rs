//! The least any gRPC allocation service can do: a server whose only RPC writes the
//! ceiling's row, the ceiling's way, and nothing else — no planning, no history, no
//! constraints beyond the unique key. `floor` measures it next to the ceiling and
//! herald-ipam, so the gap between the ceiling and Allocate splits into what the gRPC hop
//! costs and what Herald adds on top of it.
//!
//! It serves the standard health service, whose `Check` is the smallest unary RPC there is:
//! a `service` name becomes the row's unique key; an empty one only asks whether the
//! server is up, and writes nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::ipam::{IpamServer, StartTimes};
use crate::pg::{CEILING_INSERT, CEILING_TABLE};

/// Most rows one group-committed statement writes: herald-ipam's own limit.
const MAX_GROUP: usize = 256;
/// Calls that may wait for the group writer before senders wait too.
const QUEUE: usize = 4096;
/// The whole group in one statement, a column per array, as herald-ipam writes its groups.
const GROUP_INSERT: &str = "INSERT INTO ceiling (ip, owner_uid, created_at)
    SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::int8[])";

/// How the server writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InsertMode {
    /// Each call runs the ceiling's own statement on a connection of its own.
    Each,
    /// Calls that arrive while a write runs are written together in one statement and
    /// one commit, as herald-ipam's group writer does.
    Group,
}

impl InsertMode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Each => "grpc+insert",
            Self::Group => "grpc+group insert",
        }
    }
}

/// `herald-bench insert-server`: serve until killed.
#[derive(Debug, Clone, Args)]
pub struct InsertServerArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub database_url: String,
    #[arg(long, value_enum)]
    pub mode: InsertMode,
    /// Postgres connections, all opened before the server listens.
    #[arg(long)]
    pub connections: u32,
}

struct Row {
    key: Vec<u8>,
    owner: String,
    at: i64,
}

struct Pending {
    row: Row,
    reply: oneshot::Sender<Result<(), String>>,
}

enum Write {
    Each(PgPool),
    Group(mpsc::Sender<Pending>),
}

struct InsertingHealth {
    write: Write,
}

fn row_for(key: &str) -> Row {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    Row {
        key: key.as_bytes().to_vec(),
        owner: format!("bench-{key}"),
        at,
    }
}

#[tonic::async_trait]
impl Health for InsertingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let key = request.into_inner().service;
        if !key.is_empty() {
            let row = row_for(&key);
            let written = match &self.write {
                Write::Each(pool) => sqlx::query(CEILING_INSERT)
                    .bind(row.key)
                    .bind(row.owner)
                    .bind(row.at)
                    .execute(pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Write::Group(queue) => {
                    let (reply, answer) = oneshot::channel();
                    queue
                        .send(Pending { row, reply })
                        .await
                        .map_err(|_| Status::unavailable("group writer gone"))?;
                    answer
                        .await
                        .map_err(|_| Status::unavailable("group writer gone"))?
                }
            };
            written.map_err(Status::internal)?;
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving.into(),
        }))
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch is not served here"))
    }
}

async fn write_groups(pool: PgPool, mut queue: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // Ends when the server, the only sender, is gone.
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (keys, owners, ats) = group.iter().fold(
            (Vec::new(), Vec::new(), Vec::new()),
            |(mut keys, mut owners, mut ats), pending| {
                keys.push(pending.row.key.clone());
                owners.push(pending.row.owner.clone());
                ats.push(pending.row.at);
                (keys, owners, ats)
            },
        );
        let written = sqlx::query(GROUP_INSERT)
            .bind(keys)
            .bind(owners)
            .bind(ats)
            .execute(&pool)
            .await
            .map(drop)
            .map_err(|e| e.to_string());
        for pending in group.drain(..) {
            let _ = pending.reply.send(written.clone());
        }
    }
}

/// The child's main: opens every connection, creates the ceiling's table, then serves.
pub async fn serve(args: InsertServerArgs) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .min_connections(args.connections)
        .max_connections(args.connections)
        .connect(&args.database_url)
        .await
        .with_context(|| format!("connect to {}", args.database_url))?;
    sqlx::raw_sql(CEILING_TABLE).execute(&pool).await?;
    // Every connection open before the first call, as the ceiling's are.
    let mut warm = Vec::new();
    for _ in 0..args.connections {
        warm.push(pool.acquire().await?);
    }
    drop(warm);
    let write = match args.mode {
        InsertMode::Each => Write::Each(pool),
        InsertMode::Group => {
            let (queue, receiver) = mpsc::channel(QUEUE);
            tokio::spawn(write_groups(pool, receiver));
            Write::Group(queue)
        }
    };
    tonic::transport::Server::builder()
        .add_service(HealthServer::new(InsertingHealth { write }))
        .serve(args.listen)
        .await
        .context("serve")
}

/// Starts `herald_bench insert-server` (the herald-bench executable) on a free loopback
/// port and waits until it answers.
pub async fn start(
    herald_bench: &Path,
    database_url: &str,
    mode: InsertMode,
    connections: usize,
    log_dir: &Path,
    poll: Duration,
) -> anyhow::Result<(IpamServer, StartTimes)> {
    let mut command = Command::new(herald_bench);
    command
        .arg("insert-server")
        .arg("--mode")
        .arg(match mode {
            InsertMode::Each => "each",
            InsertMode::Group => "group",
        })
        .arg("--connections")
        .arg(connections.to_string());
    // An empty service name is the readiness probe, which writes nothing.
    IpamServer::launch(
        "herald-bench insert-server",
        command,
        database_url,
        log_dir,
        poll,
        "",
    )
    .await
}

/// One closed-loop client of the insert server: each call writes one new key.
pub struct InsertRpcOp {
    pub client: tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    /// Keeps warm-up keys apart from the measured ones.
    pub key_base: Arc<str>,
}

impl crate::runner::Op for InsertRpcOp {
    async fn call(&mut self, seq: u64) -> Result<(), String> {
        self.client
            .check(HealthCheckRequest {
                service: format!("{}{seq}", self.key_base),
            })
            .await
            .map(drop)
            .map_err(|s| crate::ipam::status_text(&s))
    }
}
