//! The store going away and coming back, through the real `herald-ipam` binary: a
//! database that cannot be reached at start, one that disappears under load, connections
//! the server terminates, and URLs or files that can never work.
//!
//! The shared Postgres cannot be stopped, so an outage is made by a TCP relay in front of
//! it that the test controls: cutting it closes every connection through it and refuses
//! new ones, as `pg_ctl stop -m immediate` does.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, all_allocations, allocate, allocate_ok, create_pool, ips, pool};
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::{ChildProcess, TestDb, free_port, wait_for_port};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long after the store goes away (or comes back) health may take to say so.
const HEALTH_TURN: Duration = Duration::from_millis(1200);
/// The longest a call may take while the store is away: far under a client's usual 5 s.
const FAIL_FAST: Duration = Duration::from_millis(1500);

/// A TCP relay to Postgres that the test can cut (close every connection, refuse new
/// ones) and restore, on the same port.
struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    accepting: Mutex<Option<AbortHandle>>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let relay = Self {
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            upstream,
            accepting: Mutex::new(None),
            links: Arc::new(Mutex::new(Vec::new())),
        };
        relay.restore().await;
        relay
    }

    /// Accepts and relays connections again, on the same port.
    async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let upstream = self.upstream;
        let links = Arc::clone(&self.links);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links.lock().unwrap().push(link.abort_handle());
            }
        });
        *self.accepting.lock().unwrap() = Some(task.abort_handle());
    }

    /// Closes every relayed connection and refuses new ones, as a database server that
    /// stops at once does.
    fn cut(&self) {
        if let Some(task) = self.accepting.lock().unwrap().take() {
            task.abort();
        }
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// `url` (of the real server) rewritten to go through the relay.
    fn url(&self, url: &str) -> String {
        url.replace(&self.upstream.to_string(), &self.addr.to_string())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The `host:port` a test database URL points at.
fn server_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let host_port = rest.split_once('@').map_or(rest, |(_, h)| h);
    host_port.split('/').next().unwrap().parse().unwrap()
}

/// Starts herald-ipam in `dir` with its log written to `dir/herald-ipam.log`.
fn spawn_logged(dir: &Path, database_url: Option<&str>, port: u16) -> (ChildProcess, PathBuf) {
    let log = dir.join("herald-ipam.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
    command
        .current_dir(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("HERALD_DATABASE_URL")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(url) = database_url {
        command.arg("--database-url").arg(url);
    }
    (ChildProcess::spawn("herald-ipam", command), log)
}

/// Waits for a log line that `matches`, for at most `timeout`.
async fn wait_for_log(log: &Path, timeout: Duration, matches: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(&matches) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits for the process to exit by itself, for at most `timeout`.
async fn wait_for_exit(process: &mut ChildProcess, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !process.is_running() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn health(channel: &Channel) -> Option<i32> {
    let mut client = HealthClient::new(channel.clone());
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: "herald.ipam.v1.Ipam".into(),
    });
    request.set_timeout(Duration::from_millis(500));
    client
        .check(request)
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// How long until health says `status`; panics after `timeout`.
async fn time_to_health(channel: &Channel, status: ServingStatus, timeout: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if health(channel).await == Some(status as i32) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("health not {status:?} after {timeout:?}");
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_at_once_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every connection is refused.
    let dead = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{dead}/herald");
    let port = free_port();
    let (_process, log) = spawn_logged(dir.path(), Some(&url), port);
    assert!(wait_for_port(format!("127.0.0.1:{port}").parse().unwrap(), START).await);
    let named = wait_for_log(&log, Duration::from_secs(1), |line| {
        line.contains(&format!("127.0.0.1:{dead}")) && line.to_lowercase().contains("refused")
    })
    .await;
    assert!(
        named,
        "no log line names 127.0.0.1:{dead} and the refusal within 1 s:\n{}",
        log_text(&log)
    );
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        health(&channel).await,
        Some(ServingStatus::NotServing as i32)
    );
    // Still retrying, and still saying where and why.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = log_text(&log)
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.1:{dead}")))
        .count();
    assert!(attempts >= 2, "retried {attempts} times in 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_is_unreachable_exits_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{dead}/herald");
    let port = free_port();
    let (mut process, log) = spawn_logged(dir.path(), Some(&url), port);
    assert!(wait_for_port(format!("127.0.0.1:{port}").parse().unwrap(), START).await);
    // Long enough for a connection attempt to be under way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || process.terminate(Duration::from_secs(15)))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}:\n{}",
        log_text(&log)
    );
    assert!(
        took < herald_ipam::SHUTDOWN_GRACE,
        "SIGTERM took {took:?}:\n{}",
        log_text(&log)
    );
}

/// How long a server may take from exec to listening.
const START: Duration = Duration::from_secs(20);

/// One Allocate made during the outage test.
#[derive(Debug)]
struct Call {
    uid: String,
    started: Instant,
    took: Duration,
    failure: Option<(Code, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_turns_health_and_calls_around_within_a_second() {
    let db = TestDb::postgres().await;
    let relay = Relay::start(server_of(&db.url)).await;
    let url = relay.url(&db.url);
    outage_under_load(&url, Switch::Relay(&relay)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_ctl_stop_immediate_under_load_and_start_again() {
    let cluster = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    outage_under_load(&url, Switch::Cluster(&cluster)).await;
}

/// What takes the database away and brings it back.
enum Switch<'a> {
    Relay(&'a Relay),
    Cluster(&'a PrivatePostgres),
}

impl Switch<'_> {
    async fn cut(&self) {
        match self {
            Self::Relay(relay) => relay.cut(),
            Self::Cluster(cluster) => {
                tokio::task::block_in_place(|| cluster.pg_ctl("-m immediate stop"));
            }
        }
    }

    async fn restore(&self) {
        match self {
            Self::Relay(relay) => relay.restore().await,
            Self::Cluster(cluster) => {
                tokio::task::block_in_place(|| cluster.pg_ctl(&cluster.start_command()));
            }
        }
    }
}

/// A Postgres cluster of the test's own on a free port, which it may stop and start:
/// initdb and pg_ctl run as the `postgres` user (initdb refuses root), as in
/// scripts/test.sh.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect(
                "Postgres server binaries in /usr/lib/postgresql/*/bin (apt install postgresql)",
            );
        let dir = tempfile::tempdir().unwrap();
        let chown = Command::new("chown")
            .arg("postgres")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", dir.path().display());
        let cluster = Self {
            dir,
            bin,
            port: free_port(),
        };
        cluster.as_postgres(&format!(
            "{}/initdb -D {}/data -A trust -U postgres >/dev/null",
            cluster.bin.display(),
            cluster.dir.path().display()
        ));
        cluster.pg_ctl(&cluster.start_command());
        cluster
    }

    fn start_command(&self) -> String {
        format!(
            "-l {dir}/log -w -t 60 -o \"-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off\" start",
            dir = self.dir.path().display(),
            port = self.port
        )
    }

    fn pg_ctl(&self, args: &str) {
        self.as_postgres(&format!(
            "{}/pg_ctl -D {}/data {args} >/dev/null",
            self.bin.display(),
            self.dir.path().display()
        ));
    }

    fn as_postgres(&self, command: &str) {
        let status = Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", command])
            .status()
            .unwrap();
        assert!(status.success(), "{command}: {status}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("su")
            .args([
                "postgres",
                "-s",
                "/bin/sh",
                "-c",
                &format!(
                    "{}/pg_ctl -D {}/data -m immediate stop >/dev/null 2>&1",
                    self.bin.display(),
                    self.dir.path().display()
                ),
            ])
            .status();
    }
}

/// Clients allocate new owners while `switch` takes the database away for 3 s and brings
/// it back. Health turns within about a second both ways; every call fails fast with
/// UNAVAILABLE; none fails once SERVING is back; and no owner a client was told failed
/// holds an address, unless it was told the write may have been done.
async fn outage_under_load(url: &str, switch: Switch<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(url)).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("outage", &["10.70.0.0/16"])).await;
    allocate_ok(&mut c, allocate("before")).await;
    let channel = server.channel().await.unwrap();

    // Clients allocate new owners without pause, each call with a 5 s deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let mut client = IpamClient::new(channel.clone());
        let stop = Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            for i in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let uid = format!("w{worker}-{i}");
                let mut request = tonic::Request::new(allocate(&uid));
                request.set_timeout(Duration::from_secs(5));
                let started = Instant::now();
                let result = client.allocate(request).await;
                calls.push(Call {
                    uid,
                    started,
                    took: started.elapsed(),
                    failure: result.err().map(|e| (e.code(), e.message().to_string())),
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cut_at = Instant::now();
    switch.cut().await;
    let down_after =
        time_to_health(&channel, ServingStatus::NotServing, Duration::from_secs(10)).await;
    tokio::time::sleep_until((cut_at + Duration::from_secs(3)).into()).await;
    switch.restore().await;
    let back_at = Instant::now();
    let up_after = time_to_health(&channel, ServingStatus::Serving, Duration::from_secs(15)).await;
    let serving_at = back_at + up_after;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for worker in workers {
        calls.extend(worker.await.unwrap());
    }

    assert!(
        down_after <= HEALTH_TURN,
        "health turned NOT_SERVING {down_after:?} after the store went away"
    );
    assert!(
        up_after <= HEALTH_TURN,
        "health turned SERVING {up_after:?} after the store came back"
    );
    let failed: Vec<&Call> = calls.iter().filter(|c| c.failure.is_some()).collect();
    let wrong_code: Vec<&&Call> = failed
        .iter()
        .filter(|c| {
            c.failure
                .as_ref()
                .is_some_and(|(code, _)| *code != Code::Unavailable)
        })
        .collect();
    assert!(
        wrong_code.is_empty(),
        "calls failed with another code than UNAVAILABLE: {wrong_code:#?}"
    );
    let slow: Vec<&Call> = calls.iter().filter(|c| c.took > FAIL_FAST).collect();
    assert!(
        slow.is_empty(),
        "calls took longer than {FAIL_FAST:?}: {slow:#?}"
    );
    let during = calls
        .iter()
        .filter(|c| c.started > cut_at + HEALTH_TURN && c.started + c.took < back_at)
        .count();
    assert!(during > 0, "no call was made while the store was away");
    let after: Vec<&Call> = calls
        .iter()
        .filter(|c| c.started > serving_at && c.failure.is_some())
        .collect();
    assert!(
        after.is_empty(),
        "calls failed after health said SERVING again (stale connections?): {after:#?}"
    );

    // What a client was told failed is not held, unless it was told that the outcome is
    // unknown; and asking again answers with what is held.
    let held: std::collections::BTreeMap<String, Vec<String>> = all_allocations(&mut c)
        .await
        .iter()
        .map(|a| (a.owner.as_ref().unwrap().uid.clone(), ips(a)))
        .collect();
    let maybe_written = failed
        .iter()
        .filter(|c| {
            c.failure
                .as_ref()
                .is_some_and(|(_, m)| m.contains("may have been written"))
        })
        .count();
    let held_after_failure = failed.iter().filter(|c| held.contains_key(&c.uid)).count();
    eprintln!(
        "outage: NOT_SERVING after {down_after:?}, SERVING {up_after:?} after return; {} calls, \
         {} failed (all UNAVAILABLE, slowest {:?}), {maybe_written} of them told the write \
         may have been done, {held_after_failure} of those held",
        calls.len(),
        failed.len(),
        failed.iter().map(|c| c.took).max().unwrap_or_default(),
    );
    for call in &failed {
        let (_, message) = call.failure.as_ref().unwrap();
        if let Some(addresses) = held.get(&call.uid) {
            assert!(
                message.contains("may have been written"),
                "{} failed with {message:?} yet holds {addresses:?}",
                call.uid
            );
            assert_eq!(
                &ips(&allocate_ok(&mut c, allocate(&call.uid)).await),
                addresses
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_answer_unavailable_and_are_not_reused() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("admin", &["10.71.0.0/24"])).await;
    for i in 0..20 {
        allocate_ok(&mut c, allocate(&format!("warm-{i}"))).await;
    }
    // What `pg_ctl stop` and an administrator's pg_terminate_backend do to every
    // connection: FATAL 57P01 admin_shutdown, then the socket closes.
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_string();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;

    let mut failures = Vec::new();
    for i in 0..30 {
        match c.allocate(allocate(&format!("after-{i}"))).await {
            Ok(_) => {}
            Err(e) => failures.push((i, e.code(), e.message().to_string())),
        }
        match c.list_pools(pb::ListPoolsRequest {}).await {
            Ok(_) => {}
            Err(e) => failures.push((i, e.code(), e.message().to_string())),
        }
    }
    assert!(
        failures
            .iter()
            .all(|(_, code, _)| *code == Code::Unavailable),
        "a terminated connection must answer UNAVAILABLE: {failures:#?}"
    );
    assert!(
        failures.len() <= 2,
        "each terminated connection failed a call of its own: {failures:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_sqlite_path_exits_non_zero_naming_the_path_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the database's directory should be: no user, root included,
    // can create the database there.
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"").unwrap();
    let db_path = file.join("herald-ipam.db");
    let url = format!("sqlite://{}?mode=rwc", db_path.display());
    let (mut process, log) = spawn_logged(dir.path(), Some(&url), free_port());
    assert!(
        wait_for_exit(&mut process, Duration::from_secs(10)).await,
        "still running 10 s after start:\n{}",
        log_text(&log)
    );
    let status = exit_status(process);
    assert!(
        status.is_some_and(|s| !s.success()),
        "exit status {status:?}"
    );
    let text = log_text(&log);
    assert!(
        text.contains(&file.display().to_string()) && text.contains("Not a directory"),
        "the log does not name {} and the cause:\n{text}",
        file.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_that_can_never_work_exits_non_zero_with_the_reason() {
    for (url, reason) in [
        ("mysql://root@127.0.0.1/herald", "mysql"),
        ("postgres://postgres@127.0.0.1:notaport/herald", "port"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut process, log) = spawn_logged(dir.path(), Some(url), free_port());
        assert!(
            wait_for_exit(&mut process, Duration::from_secs(10)).await,
            "{url}: still running 10 s after start:\n{}",
            log_text(&log)
        );
        let status = exit_status(process);
        assert!(
            status.is_some_and(|s| !s.success()),
            "{url}: exit status {status:?}"
        );
        let text = log_text(&log);
        assert!(
            text.contains(reason),
            "{url}: the log does not give the reason ({reason}):\n{text}"
        );
    }
}

/// The exit status of a process that has exited.
fn exit_status(mut process: ChildProcess) -> Option<ExitStatus> {
    process.terminate(Duration::from_secs(1))
}
