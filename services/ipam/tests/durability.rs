//! Invariant 3 under fire: several `herald-ipam` processes on one Postgres, concurrent
//! clients, kill -9 and restarts. No address may ever be held by two owners, and no owner
//! may ever see its address change.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Server, all_allocations, allocate, allocate_ok, create_pool, ips, pool};
use futures::StreamExt;
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::{TestDb, free_port};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

/// Two `herald-ipam` processes, each in a directory of its own, on one fresh Postgres
/// database. Bind the database and directories for the test's length: dropped last
/// (tuple order), they outlive the servers.
async fn two_replicas() -> (TestDb, (TempDir, TempDir), Server, Server) {
    let db = TestDb::postgres().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dirs.0.path(), Some(&db.url)).await;
    let b = Server::start(dirs.1.path(), Some(&db.url)).await;
    (db, dirs, a, b)
}

/// Checks the invariants over everything the servers hold: distinct addresses, and every
/// owner that was told "you have X" still has X.
async fn assert_invariants(
    client: &mut IpamClient<Channel>,
    promised: &BTreeMap<String, Vec<String>>,
) {
    let held = all_allocations(client).await;
    let mut addresses = BTreeSet::new();
    for allocation in &held {
        for ip in ips(allocation) {
            assert!(addresses.insert(ip.clone()), "{ip} is held twice");
        }
    }
    let by_owner: BTreeMap<String, Vec<String>> = held
        .iter()
        .map(|a| (a.owner.as_ref().unwrap().uid.clone(), ips(a)))
        .collect();
    for (uid, ips) in promised {
        assert_eq!(
            by_owner.get(uid),
            Some(ips),
            "owner {uid} was promised {ips:?}"
        );
    }
}

/// `clients` concurrent workers allocate `per_client` owners each, alternating between the
/// endpoints. Returns what each successful call promised.
async fn allocate_concurrently(
    endpoints: &[String],
    clients: usize,
    per_client: usize,
    prefix: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let endpoints = endpoints.to_vec();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut promised = BTreeMap::new();
            for i in 0..per_client {
                let endpoint = &endpoints[(worker + i) % endpoints.len()];
                let Ok(channel) = Channel::from_shared(endpoint.clone())
                    .unwrap()
                    .connect()
                    .await
                else {
                    continue;
                };
                let uid = format!("{prefix}-{worker}-{i}");
                match IpamClient::new(channel).allocate(allocate(&uid)).await {
                    Ok(resp) => {
                        promised.insert(uid, ips(resp.get_ref().allocation.as_ref().unwrap()));
                    }
                    // Exhaustion and a killed server are expected here; anything else is not.
                    Err(status) => assert!(
                        matches!(
                            status.code(),
                            Code::ResourceExhausted
                                | Code::Unavailable
                                | Code::Unknown
                                | Code::Cancelled
                        ),
                        "{uid}: {status:?}"
                    ),
                }
            }
            promised
        }));
    }
    let mut all = BTreeMap::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_never_hand_out_an_address_twice() {
    let (_db, _dirs, a, b) = two_replicas().await;
    // 254 usable addresses for 320 requests: the replicas race for every address and
    // finally for the last ones.
    create_pool(&mut a.client().await, pool("race", &["10.30.0.0/24"])).await;
    let promised = allocate_concurrently(&[a.endpoint(), b.endpoint()], 16, 20, "r").await;
    assert_eq!(
        promised.len(),
        254,
        "every usable address was handed out exactly once"
    );
    assert_invariants(&mut a.client().await, &promised).await;

    // Each owner asking again, at the other replica, gets the same address.
    let mut via_b = b.client().await;
    for (uid, ips_before) in promised.iter().take(60) {
        assert_eq!(
            &ips(&allocate_ok(&mut via_b, allocate(uid)).await),
            ips_before
        );
    }
    let exhausted = via_b.allocate(allocate("one-too-many")).await.unwrap_err();
    assert_eq!(exhausted.code(), Code::ResourceExhausted);
}

/// What one replica's clients got from it in [`share_calls`].
#[derive(Default)]
struct ReplicaShare {
    promised: BTreeMap<String, Vec<String>>,
    /// `code: message` of every failed call.
    errors: Vec<String>,
}

/// `clients` workers, each with a connection of its own, half on each endpoint, take
/// calls from one shared count of `calls` until it is used up: a replica that serves its
/// calls more slowly serves fewer of them.
async fn share_calls(endpoints: [String; 2], clients: usize, calls: u64) -> [ReplicaShare; 2] {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let replica = worker % 2;
        let endpoint = endpoints[replica].clone();
        let next = std::sync::Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut share = ReplicaShare::default();
            let channel = Channel::from_shared(endpoint).unwrap().connect().await;
            let mut client = IpamClient::new(channel.unwrap());
            // Bounded by the shared count.
            loop {
                let call = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if call >= calls {
                    break;
                }
                let uid = format!("share-{call}");
                match client.allocate(allocate(&uid)).await {
                    Ok(resp) => {
                        let allocation = resp.into_inner().allocation.unwrap();
                        share.promised.insert(uid, ips(&allocation));
                    }
                    Err(status) => {
                        share
                            .errors
                            .push(format!("{:?}: {}", status.code(), status.message()))
                    }
                }
            }
            (replica, share)
        }));
    }
    let mut shares = [ReplicaShare::default(), ReplicaShare::default()];
    for task in tasks {
        let (replica, share) = task.await.unwrap();
        shares[replica].promised.extend(share.promised);
        shares[replica].errors.extend(share.errors);
    }
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_under_64_clients_share_the_work_and_never_abort() {
    let (_db, _dirs, a, b) = two_replicas().await;
    // 16,382 addresses for 5,000 calls: room for both, so every lost race is an ordinary
    // one, which a caller must never see.
    create_pool(&mut a.client().await, pool("shared", &["10.50.0.0/18"])).await;
    let calls = 5_000;
    let shares = tokio::time::timeout(
        Duration::from_secs(300),
        share_calls([a.endpoint(), b.endpoint()], 64, calls),
    )
    .await
    .expect("5,000 calls finish within 5 minutes");
    let acked = [shares[0].promised.len(), shares[1].promised.len()];
    eprintln!("acked by replica a: {}, b: {}", acked[0], acked[1]);
    for (name, share) in ["a", "b"].iter().zip(&shares) {
        let first: Vec<&String> = share.errors.iter().take(3).collect();
        assert!(
            share.errors.is_empty(),
            "replica {name} failed {} calls (acked a: {}, b: {}), first: {first:?}",
            share.errors.len(),
            acked[0],
            acked[1]
        );
    }
    assert_eq!(acked[0] + acked[1], calls as usize);
    for (name, n) in ["a", "b"].iter().zip(acked) {
        assert!(
            n * 10 >= calls as usize * 4,
            "replica {name} served {n} of {calls} calls (a: {}, b: {}); each must serve at least 40 %",
            acked[0],
            acked[1]
        );
    }
    let mut promised = shares[0].promised.clone();
    promised.extend(shares[1].promised.clone());
    assert_invariants(&mut a.client().await, &promised).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_moves_nothing_and_loses_nothing() {
    let (_db, _dirs, mut a, b) = two_replicas().await;
    create_pool(&mut b.client().await, pool("big", &["10.40.0.0/20"])).await;

    let endpoints = [a.endpoint(), b.endpoint()];
    let load = tokio::spawn(async move { allocate_concurrently(&endpoints, 8, 60, "k").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.process.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = a.start_again().await;
    let mut promised = load.await.unwrap();
    assert!(
        promised.len() > 100,
        "the load ran on through the crash ({} allocations)",
        promised.len()
    );

    // Owners whose call died with the process may hold an address or not; asking again
    // gives them exactly one, and the others keep theirs.
    promised.extend(allocate_concurrently(&[a.endpoint(), b.endpoint()], 8, 60, "k").await);
    assert_invariants(&mut a.client().await, &promised).await;
    assert_invariants(&mut b.client().await, &promised).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_embedded_store_keeps_every_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("lab", &["172.16.0.0/24"])).await;
    let mut before = BTreeMap::new();
    for i in 0..50 {
        let uid = format!("s{i}");
        before.insert(uid.clone(), ips(&allocate_ok(&mut c, allocate(&uid)).await));
    }
    c.release(pb::ReleaseRequest {
        owner_uid: "s7".into(),
        reason: "deleted".into(),
    })
    .await
    .unwrap();
    before.remove("s7");
    let server = server.start_again().await;
    let mut c = server.client().await;
    for (uid, ips_before) in &before {
        assert_eq!(
            &ips(&allocate_ok(&mut c, allocate(uid)).await),
            ips_before,
            "{uid} moved across a restart"
        );
    }
    let history = c
        .history(pb::HistoryRequest {
            owner_uid: "s7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.entries.len(), 2, "history survives a kill -9");
    // The released address is the one a newcomer gets.
    assert_eq!(
        ips(&allocate_ok(&mut c, allocate("new")).await),
        ["172.16.0.8"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watch_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    let mut stream = c
        .watch(pb::WatchRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.process.terminate(Duration::from_secs(10));
        (server, status)
    });
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ends on shutdown");
    assert!(
        !matches!(end, Some(Ok(_))),
        "no change was made, so the stream can only end: {end:?}"
    );
    let (_server, status) = status.await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(
        started.elapsed() < herald_ipam::SHUTDOWN_GRACE,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_the_store_is_reachable_and_migrated() {
    // A database that does not exist yet: the server answers, but not SERVING.
    let db = TestDb::postgres().await;
    let missing = format!("{}_late", db.url);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald-ipam"));
    command.current_dir(dir.path()).args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        &missing,
    ]);
    let _process = herald_test_support::ChildProcess::spawn("herald-ipam", command);
    let endpoint = format!("http://127.0.0.1:{port}");
    assert!(
        herald_test_support::wait_for_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(20)
        )
        .await
    );
    let channel = Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let err = IpamClient::new(channel)
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // Create it: the server's retry finds it, migrates and starts serving.
    sqlx_create(&db.url, &missing).await;
    let server = Server {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        process: _process,
        dir: dir.path().to_path_buf(),
        database_url: Some(missing.clone()),
    };
    server.wait_serving(Duration::from_secs(20)).await;
    assert!(
        server
            .client()
            .await
            .list_pools(pb::ListPoolsRequest {})
            .await
            .is_ok()
    );
    drop(server);
    sqlx_drop(&db.url, &missing).await;
}

async fn sqlx_create(admin_like: &str, url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let pool = sqlx::AnyPool::connect(admin_like).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
}

async fn sqlx_drop(admin_like: &str, url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let pool = sqlx::AnyPool::connect(admin_like).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_cannot_hold_shutdown_past_the_grace() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None).await;
    // An HTTP/2 client that says hello and then never reads: it will never acknowledge
    // the server's GOAWAY.
    let mut mute = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        server.process.terminate(herald_ipam::SHUTDOWN_GRACE * 3)
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(
        started.elapsed() < herald_ipam::SHUTDOWN_GRACE + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(mute);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_cancelled_by_the_client_leave_no_phantom_reservations() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("cancel", &["10.60.0.0/24"])).await;
    // Clients that give up at every point of an Allocate's life.
    for i in 0..150u64 {
        let mut client = c.clone();
        let give_up = Duration::from_micros(100 + (i * 37) % 3000);
        let _ = tokio::time::timeout(give_up, client.allocate(allocate(&format!("c{i}")))).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = all_allocations(&mut c).await;
    let taken: BTreeSet<String> = held.iter().flat_map(ips).collect();
    let capacity = c
        .get_pool(pb::GetPoolRequest {
            name: "cancel".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capacity;
    assert_eq!(
        capacity[0].used as usize,
        taken.len(),
        "the pool counts exactly the addresses held"
    );
    let lowest_free = (1..255)
        .map(|n| format!("10.60.0.{n}"))
        .find(|ip| !taken.contains(ip))
        .unwrap();
    assert_eq!(
        ips(&allocate_ok(&mut c, allocate("fresh")).await),
        [lowest_free]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_revision_does_not_hold_the_watch_back() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("holes", &["10.70.0.0/24"])).await;
    let mut watch = c
        .watch(pb::WatchRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    // A transaction that took a revision and rolled back, as a lost race does.
    let pool_db = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("SELECT nextval('events_revision_seq')")
        .execute(&pool_db)
        .await
        .unwrap();
    pool_db.close().await;
    let started = Instant::now();
    allocate_ok(&mut c, allocate("after-the-hole")).await;
    // The pool's own change may still be on its way; the allocation follows it.
    let mut allocated = false;
    for _ in 0..5 {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(next.change, Some(pb::watch_response::Change::Allocation(ref e)) if e.owner.as_ref().unwrap().uid == "after-the-hole")
        {
            allocated = true;
            break;
        }
    }
    assert!(allocated, "the allocation never reached the watch");
    // Without waiting: the feed saw that nothing still writing the log could fill the hole.
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        started.elapsed()
    );
}

/// `(used, quarantined, free)` of a pool's first family, as GetPool reports them; `None`
/// from a replica that has not yet seen the pool in the change log.
async fn quarantine_capacity(
    client: &mut IpamClient<Channel>,
    pool: &str,
) -> Option<(u64, u64, String)> {
    let capacity = client
        .get_pool(pb::GetPoolRequest { name: pool.into() })
        .await
        .unwrap()
        .into_inner()
        .capacity;
    let first = capacity.first()?;
    Some((first.used, first.quarantined, first.free.clone()))
}

/// Pool "q" over `cidr`, resting released addresses for `seconds`.
fn quarantined_pool(seconds: u32, cidr: &str) -> pb::Pool {
    pb::Pool {
        quarantine_seconds: seconds,
        ..pool("q", &[cidr])
    }
}

fn requesting(uid: &str, ip: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        requested_ips: vec![ip.into()],
        ..allocate(uid)
    }
}

async fn release(client: &mut IpamClient<Channel>, uid: &str) {
    client
        .release(pb::ReleaseRequest {
            owner_uid: uid.into(),
            reason: "deleted".into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_addresses_stay_out_of_use_on_every_replica_and_across_kill_9() {
    let (_db, _dirs, a, b) = two_replicas().await;
    let mut via_a = a.client().await;
    let mut via_b = b.client().await;
    create_pool(&mut via_a, quarantined_pool(3600, "172.16.0.240/29")).await;
    assert_eq!(
        ips(&allocate_ok(&mut via_a, allocate("a")).await),
        ["172.16.0.241"]
    );
    release(&mut via_a, "a").await;
    assert_eq!(
        ips(&allocate_ok(&mut via_a, allocate("b")).await),
        ["172.16.0.242"],
        "the released address rests"
    );
    let expected = Some((1, 1, "4".to_string()));
    assert_eq!(quarantine_capacity(&mut via_a, "q").await, expected);

    // The other replica learns of the release from the change log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while quarantine_capacity(&mut via_b, "q").await != expected {
        assert!(Instant::now() < deadline, "replica b never saw the release");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ips(&allocate_ok(&mut via_b, allocate("c")).await),
        ["172.16.0.243"]
    );

    // A restarted replica rebuilds the quarantine from the history.
    let a = a.start_again().await;
    let mut via_a = a.client().await;
    assert_eq!(
        quarantine_capacity(&mut via_a, "q").await,
        Some((2, 1, "3".to_string()))
    );
    assert_eq!(
        ips(&allocate_ok(&mut via_a, allocate("d")).await),
        ["172.16.0.244"]
    );

    // A dry run that names the address leaves it resting; a real request takes it.
    let mut dry = requesting("e", "172.16.0.241");
    dry.dry_run = true;
    assert_eq!(ips(&allocate_ok(&mut via_a, dry).await), ["172.16.0.241"]);
    assert_eq!(
        quarantine_capacity(&mut via_a, "q").await,
        Some((3, 1, "2".to_string()))
    );
    assert_eq!(
        ips(&allocate_ok(&mut via_a, requesting("e", "172.16.0.241")).await),
        ["172.16.0.241"]
    );
    assert_eq!(
        quarantine_capacity(&mut via_a, "q").await,
        Some((4, 0, "2".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_ends_and_the_address_returns_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    // Long enough that the four calls below fit inside it on a loaded machine (with one
    // second they sometimes did not, and the quarantine had ended before "c" asked).
    create_pool(&mut c, quarantined_pool(3, "172.16.0.240/30")).await;
    let released_at = Instant::now();
    allocate_ok(&mut c, allocate("a")).await;
    release(&mut c, "a").await;
    // .241 rests and .242 is taken: the pool is full for three seconds.
    allocate_ok(&mut c, allocate("b")).await;
    let full = c.allocate(allocate("c")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(
        full.message()
            .contains("1 released addresses are in quarantine"),
        "{}",
        full.message()
    );
    tokio::time::sleep(Duration::from_millis(3100).saturating_sub(released_at.elapsed())).await;
    assert_eq!(
        ips(&allocate_ok(&mut c, allocate("c")).await),
        ["172.16.0.241"]
    );
}
