//! Runs the real `herald-ipam` binary for end-to-end tests and connects gRPC clients to it.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::{ChildProcess, free_port};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub struct Server {
    pub addr: SocketAddr,
    pub process: ChildProcess,
    pub dir: PathBuf,
    pub database_url: Option<String>,
}

/// How long a server may take from exec to SERVING before a test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Server {
    /// Starts the binary in `dir` (where an embedded database would live), on a free port.
    pub async fn start(dir: &Path, database_url: Option<&str>) -> Self {
        Self::start_on(dir, database_url, free_port()).await
    }

    pub async fn start_on(dir: &Path, database_url: Option<&str>, port: u16) -> Self {
        Self::start_with(dir, database_url, port, |_| {}).await
    }

    /// As [`Server::start_on`], with `configure` applied to the command first (to send its
    /// output to a file a test reads, say).
    pub async fn start_with(
        dir: &Path,
        database_url: Option<&str>,
        port: u16,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
        configure(&mut command);
        command
            .current_dir(dir)
            .arg("--listen")
            .arg(addr.to_string())
            .env_remove("HERALD_DATABASE_URL");
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        let server = Self {
            addr,
            process: ChildProcess::spawn("herald-ipam", command),
            dir: dir.to_path_buf(),
            database_url: database_url.map(str::to_string),
        };
        server.wait_serving(START_TIMEOUT).await;
        server
    }

    /// Kills the process with SIGKILL, as a crash would (if it still runs), and starts a
    /// new one where it was: same directory, database and port, so clients reconnect.
    pub async fn start_again(mut self) -> Self {
        self.process.kill9();
        Self::start_on(&self.dir, self.database_url.as_deref(), self.addr.port()).await
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(self.endpoint())
            .expect("valid endpoint")
            .connect()
            .await
    }

    pub async fn client(&self) -> IpamClient<Channel> {
        IpamClient::connect(self.endpoint()).await.unwrap()
    }

    /// Waits for the health service to say SERVING; panics with the last status otherwise.
    pub async fn wait_serving(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Ok(channel) = self.channel().await {
                let mut health = HealthClient::new(channel);
                match health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "herald.ipam.v1.Ipam".into(),
                    })
                    .await
                {
                    Ok(resp) if resp.get_ref().status == ServingStatus::Serving as i32 => return,
                    Ok(resp) => last = format!("status {}", resp.get_ref().status),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "herald-ipam on {} not SERVING after {timeout:?}: {last}",
            self.addr
        );
    }
}

pub fn pool(name: &str, addresses: &[&str]) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        addresses: addresses.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn owner(namespace: &str, name: &str, uid: &str) -> pb::Owner {
    pb::Owner {
        cluster_id: "lab".into(),
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

pub fn allocate(uid: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        owner: Some(owner("default", &format!("svc-{uid}"), uid)),
        ..Default::default()
    }
}

pub fn ips(allocation: &pb::Allocation) -> Vec<String> {
    allocation.ips.iter().map(|i| i.ip.clone()).collect()
}

pub async fn create_pool(client: &mut IpamClient<Channel>, pool: pb::Pool) -> pb::Pool {
    client
        .create_pool(pb::CreatePoolRequest { pool: Some(pool) })
        .await
        .unwrap()
        .into_inner()
}

pub async fn allocate_ok(
    client: &mut IpamClient<Channel>,
    req: pb::AllocateRequest,
) -> pb::Allocation {
    client
        .allocate(req)
        .await
        .unwrap()
        .into_inner()
        .allocation
        .unwrap()
}

/// Every allocation the server holds, following pagination.
pub async fn all_allocations(client: &mut IpamClient<Channel>) -> Vec<pb::Allocation> {
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let page = client
            .list_allocations(pb::ListAllocationsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.allocations);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
    panic!("pagination did not end");
}

/// A Postgres login of its own for one replica, so that a test can take a table away from
/// that replica alone: its reads of the table then fail as reads fail while the store is
/// away, while everything else (the change log it follows included) stays readable.
/// Create it once the first replica has migrated the store, so the grants cover every table.
pub struct RestrictedRole {
    admin: sqlx::PgPool,
    role: String,
    /// The database URL that logs in as this role.
    pub url: String,
}

impl RestrictedRole {
    pub async fn create(database_url: &str, suffix: &str) -> Self {
        let admin = sqlx::PgPool::connect(database_url).await.unwrap();
        let database = database_url.rsplit('/').next().unwrap();
        let role = format!("{database}_{suffix}");
        let this = Self {
            admin,
            url: {
                let (scheme, rest) = database_url.split_once("://").unwrap();
                let server = rest.split_once('@').map_or(rest, |(_, server)| server);
                format!("{scheme}://{role}:{role}@{server}")
            },
            role,
        };
        this.sql(format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{role}';
             GRANT USAGE, CREATE ON SCHEMA public TO {role};
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};",
            role = this.role
        ))
        .await;
        this
    }

    pub async fn revoke_select(&self, table: &str) {
        self.sql(format!("REVOKE SELECT ON {table} FROM {}", self.role))
            .await;
    }

    pub async fn grant_select(&self, table: &str) {
        self.sql(format!("GRANT SELECT ON {table} TO {}", self.role))
            .await;
    }

    /// Drops the role; call once the replica using it has stopped.
    pub async fn drop_role(self) {
        self.sql(format!("DROP OWNED BY {0}; DROP ROLE {0}", self.role))
            .await;
    }

    async fn sql(&self, text: String) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(text))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}
