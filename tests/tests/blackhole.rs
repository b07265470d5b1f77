//! herald-ipam blackholed: a relay on loopback (`herald_e2e::Relay`) between a real
//! client and a real `herald-ipam` keeps every connection open and drops every byte, as
//! a path that loses all packets would. Nothing closes; only the clients' own request
//! timeouts and HTTP/2 keepalives can notice.
//!
//! - The watcher (on the fake API server), mid-burst of Service creations: its workers
//!   time out instead of hanging (each waiting Service's reconcile ends in an error, the
//!   IPAM calls fail as timeouts, the admin endpoints answer throughout), and once the
//!   relay forwards again every Service gets its address within a bound.
//! - A speaker: its WatchNodeRoutes stream goes silent; keepalive notices, the speaker
//!   keeps announcing what it has (fail-static: the ToR's path never goes), and it
//!   subscribes again when the relay forwards, picking up a change made meanwhile.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_e2e::{
    CONVERGE, Ipam, IpamLab, KubeLab, LAB_PREFIX, Relay, allocate, expect_paths, http_get,
    ingress_ip, lb_service, next_hops, node, port, speaker_with, tor_policy,
};
use herald_fake_kube::SERVICES;
use herald_test_support::{TestDb, free_port};
use herald_tor_harness::{Family, Tor, TorConfig, TorKind};

/// Services created before the relay turns into a blackhole, and while it is one.
const BEFORE: usize = 20;
const DURING: usize = 20;
/// The watcher's deadline on one IPAM call is 10 s; its workers must all have given up
/// within that and some slack for a loaded machine.
const WORKERS_GIVE_UP: Duration = Duration::from_secs(30);
/// Once the relay forwards again: a call sent just before may still wait out its 10 s
/// deadline, then the Service's retry waits at most 10 s.
const RECOVER: Duration = Duration::from_secs(45);
/// The speaker's keepalive: a ping after 10 s of silence, answered within 5 s.
const KEEPALIVE_NOTICES: Duration = Duration::from_secs(40);

/// The sum of a metric's samples whose line contains every one of `parts` (name and
/// label matchers).
fn metric_sum(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // An empty sum is -0.
        .fold(0.0, |sum, v| sum + v)
}

/// Scrapes `/metrics`, asserting that the admin listener answers (a hung process would
/// not).
async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("the admin listener stopped answering: {e}"));
    assert_eq!(status, 200, "{body}");
    body
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

fn addressed(lab: &KubeLab, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| Some((n.clone(), ingress_ip(&lab.kube, "default", n)?)))
        .collect()
}

fn log_to(dir: &Path, name: &str, command: &mut std::process::Command) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&path).unwrap();
    command.stdout(file.try_clone().unwrap()).stderr(file);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watcher_workers_time_out_in_a_blackhole_and_every_service_is_addressed_after() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let ipam = Ipam::start(dir.path(), &db.url, port()).await;
    ipam.ipam()
        .await
        .create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(ipam_pb::Pool {
                name: "burst".into(),
                addresses: vec!["172.16.8.0/24".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let relay = Relay::start(ipam.addr).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut lab = KubeLab::builder(dir.path())
        .watcher_args(&["--admin-listen", &admin.to_string()])
        .start()
        .await;
    let log = {
        let logs = dir.path().to_path_buf();
        let mut path = None;
        lab.start_watcher_with(&relay.endpoint(), |c| {
            path = Some(log_to(&logs, "herald-cluster-watcher", c));
        });
        path.unwrap()
    };
    lab.wait_registered(&ipam, CONVERGE).await;

    // A burst; the relay turns into a blackhole in the middle of it.
    let before = names("early", BEFORE);
    let during = names("late", DURING);
    for name in &before {
        lab.kube.create(SERVICES, lb_service(name)).unwrap();
    }
    // Some answered, the rest on their way.
    let started = Instant::now();
    while addressed(&lab, &before).is_empty() {
        assert!(started.elapsed() < CONVERGE, "the burst never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.blackhole();
    let blackholed_at = Instant::now();
    let held_before = addressed(&lab, &before).len();
    for name in &during {
        lab.kube.create(SERVICES, lb_service(name)).unwrap();
    }
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();

    // Every Service still waiting has had its reconcile end, in an error (the watcher logs
    // each failure with the Service's name): no worker is stuck on a call that will never
    // be answered. The calls failed by their deadline (tonic's CANCELLED "Timeout
    // expired"), and the admin listener answered throughout.
    let (waiting, errors, timeouts) = loop {
        let text = scrape(admin).await;
        let held: BTreeSet<String> = addressed(&lab, &all).into_iter().map(|(n, _)| n).collect();
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let failures: Vec<&str> = log_text
            .lines()
            .filter(|l| l.contains("handling the Service failed"))
            .collect();
        let stuck: Vec<&String> = all
            .iter()
            .filter(|n| !held.contains(*n))
            .filter(|n| !failures.iter().any(|l| l.contains(&format!("={n} "))))
            .collect();
        let errors = metric_sum(
            &text,
            &["herald_watcher_reconciles_total{", "result=\"error\""],
        );
        let timeouts = metric_sum(
            &text,
            &[
                "herald_watcher_ipam_rpc_errors_total{",
                "call=\"Allocate\"",
                "code=\"Cancelled\"",
            ],
        );
        if timeouts >= 1.0 && stuck.is_empty() {
            break (all.len() - held.len(), errors, timeouts);
        }
        assert!(
            blackholed_at.elapsed() < WORKERS_GIVE_UP,
            "{:?} into the blackhole, {} Services wait without a failed reconcile (workers hang \
             on the silent IPAM): {stuck:?}; {timeouts} Allocate timeouts\n{log_text}",
            blackholed_at.elapsed(),
            stuck.len(),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let gave_up_after = blackholed_at.elapsed();
    // The Services created in the blackhole cannot have been answered.
    let late_addressed = addressed(&lab, &during);
    assert!(
        late_addressed.is_empty(),
        "addressed through a blackhole: {late_addressed:?}"
    );
    assert!(waiting >= DURING, "{waiting} waiting");
    let (ready, body) = http_get(admin, "/healthz").await.unwrap();
    assert_eq!(ready, 200, "/healthz in the blackhole: {body}");
    assert!(relay.dropped_bytes() > 0, "the relay dropped nothing");

    relay.resume();
    let resumed_at = Instant::now();
    let held = loop {
        let held = addressed(&lab, &all);
        if held.len() == all.len() {
            break held;
        }
        assert!(
            resumed_at.elapsed() < RECOVER,
            "{} of {} Services addressed {:?} after the relay forwards again\n{}",
            held.len(),
            all.len(),
            resumed_at.elapsed(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let distinct: BTreeSet<&String> = held.iter().map(|(_, ip)| ip).collect();
    assert_eq!(distinct.len(), all.len(), "addresses held twice: {held:?}");
    // The watcher still answers, and still works the same connection settings.
    scrape(admin).await;
    eprintln!(
        "blackhole: {held_before} of {BEFORE} addressed before it, {waiting} waiting; \
         {errors} failed reconciles and {timeouts} Allocate timeouts {gave_up_after:?} in; \
         all {} addressed {:?} after it ended; {} connections through the relay, {} bytes dropped",
        all.len(),
        resumed_at.elapsed(),
        relay.accepted(),
        relay.dropped_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_speaker_whose_ipam_stream_goes_silent_keeps_its_routes_and_resubscribes() {
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await.unwrap();
    let mut lab = IpamLab::start().await;
    let mut policy = tor_policy(&tor, 9);
    policy.peers[0].node_selector = None;
    lab.routing.set_bgp_policy(policy).await.unwrap();
    lab.routing
        .upsert_node(node("n0", "127.0.0.10", &[], true))
        .await
        .unwrap();

    let relay = Relay::start(lab.ipam.addr).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut log = None;
    let mut speaker = speaker_with("n0", &relay.endpoint(), |c| {
        c.args(["--admin-listen", &admin.to_string()]);
        log = Some(log_to(lab.dir.path(), "herald-route-speaker", c));
    });
    let log = log.unwrap();
    lab.alloc
        .allocate(allocate("default", "first", "first"))
        .await
        .unwrap();
    expect_paths(&tor, LAB_PREFIX, &["127.0.0.10"]).await;
    let connected = |text: &str| metric_sum(text, &["herald_speaker_ipam_stream_connected "]);
    assert_eq!(connected(&scrape(admin).await), 1.0);

    relay.blackhole();
    let blackholed_at = Instant::now();
    // A change the speaker cannot hear of while the relay drops everything.
    let second = lab
        .alloc
        .allocate(allocate("default", "second", "second"))
        .await
        .unwrap()
        .into_inner()
        .allocation
        .unwrap()
        .ips[0]
        .ip
        .clone();
    let second_prefix = format!("{second}/32");
    // Until keepalive notices (and a few seconds of failed resubscribing after), the ToR
    // keeps the path, fresh: the session never went down.
    let mut noticed_after = None;
    let mut samples = 0;
    loop {
        let rib = tor.routes(Family::Ipv4).await.unwrap();
        samples += 1;
        assert_eq!(
            next_hops(&rib, LAB_PREFIX),
            ["127.0.0.10"],
            "the ToR lost the path {:?} into the blackhole: not fail-static",
            blackholed_at.elapsed()
        );
        assert!(
            next_hops(&rib, &second_prefix).is_empty(),
            "{second_prefix} announced through a blackhole"
        );
        let up = connected(&scrape(admin).await);
        if up == 0.0 && noticed_after.is_none() {
            noticed_after = Some(blackholed_at.elapsed());
        }
        if let Some(after) = noticed_after
            && blackholed_at.elapsed() > after + Duration::from_secs(6)
        {
            break;
        }
        assert!(
            blackholed_at.elapsed() < KEEPALIVE_NOTICES,
            "the speaker still believes in its stream {:?} into the blackhole\n{}",
            blackholed_at.elapsed(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let noticed_after = noticed_after.unwrap();
    assert!(speaker.is_running(), "the speaker exited in the blackhole");
    let text = std::fs::read_to_string(&log).unwrap();
    let lost: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("IPAM stream lost"))
        .collect();
    assert!(
        !lost.is_empty(),
        "nothing logged about the lost stream:\n{text}"
    );

    relay.resume();
    let resumed_at = Instant::now();
    let rib = tor
        .wait_until(Family::Ipv4, RECOVER, |rib| {
            next_hops(rib, &second_prefix) == ["127.0.0.10"]
        })
        .await;
    assert!(
        rib.is_ok(),
        "the change made in the blackhole never reached the ToR {RECOVER:?} after it ended: {rib:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        next_hops(&rib.unwrap(), LAB_PREFIX),
        ["127.0.0.10"],
        "the first path went"
    );
    assert_eq!(connected(&scrape(admin).await), 1.0);
    eprintln!(
        "speaker: keepalive noticed the silent stream {noticed_after:?} into the blackhole \
         ({samples} ToR reads with the path throughout); resubscribed and announced the \
         change {:?} after it ended; first log line: {}",
        resumed_at.elapsed(),
        lost[0]
    );
    speaker.terminate(Duration::from_secs(10));
    tor.stop().await;
}
