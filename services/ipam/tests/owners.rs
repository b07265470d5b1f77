//! What a repeated Allocate for an owner that already holds addresses does, through the
//! real `herald-ipam` binary: a changed port list or traffic policy updates the allocation
//! in place (or is refused when it would collide with another sharer), and a request whose
//! cluster, namespace or name differ from the holder's is refused. On both stores, through
//! AllocateBatch, and across two replicas of one Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Server, allocate, allocate_ok, create_pool, ips, owner, pool};
use futures::StreamExt;
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::TestDb;
use tonic::Code;
use tonic::transport::Channel;

/// Asserts the status code and that the message names every one of `needles`.
fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} does not mention {needle:?}",
            status.message()
        );
    }
}

fn tcp(ports: &[u32]) -> Vec<pb::ServicePort> {
    ports
        .iter()
        .map(|&port| pb::ServicePort {
            protocol: "TCP".into(),
            port,
        })
        .collect()
}

fn shared(uid: &str, key: &str, ports: &[u32]) -> pb::AllocateRequest {
    pb::AllocateRequest {
        sharing_key: key.into(),
        ports: tcp(ports),
        ..allocate(uid)
    }
}

fn local(req: pb::AllocateRequest) -> pb::AllocateRequest {
    pb::AllocateRequest {
        traffic_policy: pb::TrafficPolicy::Local as i32,
        ..req
    }
}

async fn held(client: &mut IpamClient<Channel>, uid: &str) -> pb::Allocation {
    client
        .get_allocation(pb::GetAllocationRequest {
            owner_uid: uid.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn port_numbers(allocation: &pb::Allocation) -> Vec<u32> {
    allocation.ports.iter().map(|p| p.port).collect()
}

async fn owner_history(client: &mut IpamClient<Channel>, uid: &str) -> Vec<pb::HistoryEntry> {
    client
        .history(pb::HistoryRequest {
            owner_uid: uid.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The sequence: sh1 moves from TCP/80 to TCP/443 on a shared address, so 443 is
/// no longer free for sh2 and 80 is free for sh3; a change of traffic policy is applied
/// to a lone sharer and refused while others share under the old one.
async fn ports_and_policy_update_in_place(c: &mut IpamClient<Channel>) {
    create_pool(c, pool("lab", &["172.16.0.240/28"])).await;

    let first = allocate_ok(c, shared("sh1", "k2", &[80])).await;
    let ip = ips(&first);
    let updated = allocate_ok(c, shared("sh1", "k2", &[443])).await;
    assert_eq!(ips(&updated), ip, "the address never moves");
    assert_eq!(
        port_numbers(&updated),
        [443],
        "the answer shows the new ports"
    );
    assert_eq!(
        port_numbers(&held(c, "sh1").await),
        [443],
        "and they are stored"
    );

    expect(
        c.allocate(shared("sh2", "k2", &[443])).await,
        Code::FailedPrecondition,
        &["sharing_key \"k2\"", "443/TCP", "sh1"],
    );
    let sh3 = allocate_ok(c, shared("sh3", "k2", &[80])).await;
    assert_eq!(ips(&sh3), ip, "80 was freed by sh1's update");

    // Back to 80 would collide with sh3: refused, naming sh3, and nothing changes.
    expect(
        c.allocate(shared("sh1", "k2", &[80, 443])).await,
        Code::FailedPrecondition,
        &["sharing_key \"k2\"", "80/TCP", "sh3"],
    );
    assert_eq!(port_numbers(&held(c, "sh1").await), [443]);

    // A dry run previews an update and writes nothing.
    let preview = c
        .allocate(pb::AllocateRequest {
            dry_run: true,
            ..shared("sh1", "k2", &[443, 8443])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        port_numbers(preview.allocation.as_ref().unwrap()),
        [443, 8443]
    );
    assert_eq!(port_numbers(&held(c, "sh1").await), [443]);

    // Local while sh3 shares under Cluster: refused, naming sh3.
    expect(
        c.allocate(local(shared("sh1", "k2", &[443]))).await,
        Code::FailedPrecondition,
        &["sharing_key \"k2\"", "traffic policy", "sh3"],
    );
    assert_eq!(
        held(c, "sh1").await.traffic_policy,
        pb::TrafficPolicy::Cluster as i32
    );

    // A lone sharer may change its policy; the group then only takes compatible members.
    let solo = allocate_ok(c, shared("solo", "k9", &[53])).await;
    let solo_local = allocate_ok(c, local(shared("solo", "k9", &[53]))).await;
    assert_eq!(ips(&solo_local), ips(&solo));
    assert_eq!(solo_local.traffic_policy, pb::TrafficPolicy::Local as i32);
    assert_eq!(
        held(c, "solo").await.traffic_policy,
        pb::TrafficPolicy::Local as i32
    );
    expect(
        c.allocate(shared("late", "k9", &[54])).await,
        Code::FailedPrecondition,
        &["sharing_key \"k9\"", "traffic policy"],
    );
    assert_eq!(
        ips(&allocate_ok(c, local(shared("late", "k9", &[54]))).await),
        ips(&solo)
    );

    // An exclusive owner's policy is updated too.
    let only = allocate_ok(c, allocate("only")).await;
    let only_local = allocate_ok(c, local(allocate("only"))).await;
    assert_eq!(ips(&only_local), ips(&only));
    assert_eq!(
        held(c, "only").await.traffic_policy,
        pb::TrafficPolicy::Local as i32
    );

    // The history records the update between the assignment and now.
    let history = owner_history(c, "sh1").await;
    let actions: Vec<i32> = history.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            pb::history_entry::Action::Updated as i32,
            pb::history_entry::Action::Assigned as i32
        ]
    );
    assert!(
        history[0].reason.contains("443/TCP") && history[0].reason.contains("80/TCP"),
        "{}",
        history[0].reason
    );
    assert_eq!(history[0].ip, ip[0]);
}

/// An owner is its (cluster, uid): another cluster, namespace or name with a held uid is
/// refused, naming what differs, and the holder keeps what it has.
async fn another_owner_with_a_held_uid_is_refused(c: &mut IpamClient<Channel>) {
    create_pool(c, pool("multi", &["10.30.0.0/28"])).await;
    let mut from_a = allocate("u1");
    from_a.owner = Some(pb::Owner {
        cluster_id: "a".into(),
        ..owner("default", "web", "u1")
    });
    let held_by_a = allocate_ok(c, from_a.clone()).await;

    let mut from_b = from_a.clone();
    from_b.owner.as_mut().unwrap().cluster_id = "b".into();
    expect(
        c.allocate(from_b.clone()).await,
        Code::FailedPrecondition,
        &["cluster_id", "\"a\"", "\"b\""],
    );
    let mut renamed = from_a.clone();
    renamed.owner.as_mut().unwrap().name = "web2".into();
    expect(
        c.allocate(renamed).await,
        Code::FailedPrecondition,
        &["name", "\"web\"", "\"web2\""],
    );
    let mut moved = from_a.clone();
    moved.owner.as_mut().unwrap().namespace = "prod".into();
    expect(
        c.allocate(pb::AllocateRequest {
            dry_run: true,
            ..moved
        })
        .await,
        Code::FailedPrecondition,
        &["namespace", "\"default\"", "\"prod\""],
    );

    // The same through AllocateBatch: the item is refused, its neighbour served.
    let results = c
        .allocate_batch(pb::AllocateBatchRequest {
            requests: vec![from_b, allocate("u2")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match results[0].result.as_ref().unwrap() {
        pb::allocate_result::Result::Error(e) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert!(e.message.contains("cluster_id"), "{}", e.message);
        }
        other => panic!("cluster b got cluster a's allocation: {other:?}"),
    }
    assert!(matches!(
        results[1].result,
        Some(pb::allocate_result::Result::Allocation(_))
    ));

    let still = held(c, "u1").await;
    assert_eq!(still.owner, held_by_a.owner);
    assert_eq!(ips(&still), ips(&held_by_a));
    // The holder itself is still served as before.
    assert_eq!(ips(&allocate_ok(c, from_a).await), ips(&held_by_a));
}

/// An update inside AllocateBatch, next to a refused one.
async fn batch_updates(c: &mut IpamClient<Channel>) {
    create_pool(c, pool("batch", &["10.40.0.0/28"])).await;
    allocate_ok(c, shared("b1", "kb", &[80])).await;
    allocate_ok(c, shared("b2", "kb", &[81])).await;
    let results = c
        .allocate_batch(pb::AllocateBatchRequest {
            requests: vec![shared("b1", "kb", &[82]), shared("b2", "kb", &[82, 83])],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match results[0].result.as_ref().unwrap() {
        pb::allocate_result::Result::Allocation(a) => assert_eq!(port_numbers(a), [82]),
        other => panic!("b1's update failed: {other:?}"),
    }
    match results[1].result.as_ref().unwrap() {
        pb::allocate_result::Result::Error(e) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert!(
                e.message.contains("82/TCP") && e.message.contains("b1"),
                "{}",
                e.message
            );
        }
        other => panic!("b2 collided with b1 and was served: {other:?}"),
    }
    assert_eq!(port_numbers(&held(c, "b2").await), [81]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_allocate_updates_ports_and_policy_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    ports_and_policy_update_in_place(&mut c).await;
    batch_updates(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_allocate_updates_ports_and_policy_on_postgres() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    ports_and_policy_update_in_place(&mut c).await;
    batch_updates(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_is_its_cluster_and_uid_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    another_owner_with_a_held_uid_is_refused(&mut server.client().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_is_its_cluster_and_uid_on_postgres() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    another_owner_with_a_held_uid_is_refused(&mut server.client().await).await;
}

/// Two replicas: one learns the other's update through the change log, and the store
/// refuses what a replica's picture could not yet know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_owner_identity_hold_across_two_replicas() {
    let db = TestDb::postgres().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dirs.0.path(), Some(&db.url)).await;
    let b = Server::start(dirs.1.path(), Some(&db.url)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut watch_b = cb
        .watch(pb::WatchRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    create_pool(&mut ca, pool("lab", &["172.16.0.240/28"])).await;

    let ip = ips(&allocate_ok(&mut ca, shared("sh1", "k2", &[80])).await);
    // Right away on B, before its feed can have brought anything: the store decides.
    let updated = allocate_ok(&mut cb, shared("sh1", "k2", &[443])).await;
    assert_eq!(
        (ips(&updated), port_numbers(&updated)),
        (ip.clone(), vec![443])
    );
    expect(
        ca.allocate(shared("sh2", "k2", &[443])).await,
        Code::FailedPrecondition,
        &["sharing_key \"k2\"", "443/TCP", "sh1"],
    );
    assert_eq!(
        ips(&allocate_ok(&mut ca, shared("sh3", "k2", &[80])).await),
        ip
    );
    expect(
        cb.allocate(shared("sh1", "k2", &[80])).await,
        Code::FailedPrecondition,
        &["80/TCP", "sh3"],
    );
    expect(
        cb.allocate(local(shared("sh1", "k2", &[443]))).await,
        Code::FailedPrecondition,
        &["traffic policy", "sh3"],
    );

    // B's Watch carries A's and B's changes, the update among them.
    let mut actions = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while actions.len() < 3 {
        let next = tokio::time::timeout_at(deadline, watch_b.next())
            .await
            .expect("B's Watch brings every change within 10 s")
            .unwrap()
            .unwrap();
        if let Some(pb::watch_response::Change::Allocation(e)) = next.change {
            actions.push((e.action, e.owner.unwrap().uid));
        }
    }
    use pb::history_entry::Action;
    assert_eq!(
        actions,
        [
            (Action::Assigned as i32, "sh1".to_string()),
            (Action::Updated as i32, "sh1".to_string()),
            (Action::Assigned as i32, "sh3".to_string()),
        ]
    );

    // A lone sharer turned Local on A: once B has learnt it, B plans the refusal itself,
    // and before that its store does.
    let solo = ips(&allocate_ok(&mut ca, shared("solo", "k9", &[53])).await);
    allocate_ok(&mut ca, local(shared("solo", "k9", &[53]))).await;
    expect(
        cb.allocate(shared("late", "k9", &[54])).await,
        Code::FailedPrecondition,
        &["sharing_key \"k9\"", "traffic policy"],
    );
    assert_eq!(
        ips(&allocate_ok(&mut cb, local(shared("late", "k9", &[54]))).await),
        solo
    );

    // Another cluster's request for a uid held through A, sent to B, is refused.
    let mut from_a = allocate("u1");
    from_a.owner = Some(pb::Owner {
        cluster_id: "a".into(),
        ..owner("default", "web", "u1")
    });
    allocate_ok(&mut ca, from_a.clone()).await;
    from_a.owner.as_mut().unwrap().cluster_id = "b".into();
    expect(
        cb.allocate(from_a).await,
        Code::FailedPrecondition,
        &["cluster_id", "\"a\"", "\"b\""],
    );
}

/// A lone sharer turning Local on one replica while another Service joins it under Cluster
/// on the other, at the same instant, many times: never both, so the members of a group
/// always share one traffic policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_racing_a_join_on_another_replica_never_splits_a_group() {
    const ROUNDS: usize = 20;
    let db = TestDb::postgres().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dirs.0.path(), Some(&db.url)).await;
    let b = Server::start(dirs.1.path(), Some(&db.url)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    create_pool(&mut ca, pool("race", &["10.50.0.0/24"])).await;
    let mut outcomes = std::collections::BTreeMap::new();
    for round in 0..ROUNDS {
        let key = format!("r{round}");
        let (first, joiner) = (format!("first{round}"), format!("join{round}"));
        let ip = ips(&allocate_ok(&mut ca, shared(&first, &key, &[80])).await);
        let (mut ua, mut jb) = (ca.clone(), cb.clone());
        let (update, join) = tokio::join!(
            ua.allocate(local(shared(&first, &key, &[80]))),
            jb.allocate(shared(&joiner, &key, &[81])),
        );
        assert!(
            update.is_err() || join.is_err(),
            "round {round}: both the policy change and the join were accepted"
        );
        for refused in [&update, &join]
            .into_iter()
            .filter_map(|r| r.as_ref().err())
        {
            assert_eq!(
                refused.code(),
                Code::FailedPrecondition,
                "{}",
                refused.message()
            );
        }
        *outcomes.entry((update.is_ok(), join.is_ok())).or_insert(0) += 1;
        // What the store holds agrees with the answers.
        let policy = held(&mut ca, &first).await.traffic_policy;
        let expected = if update.is_ok() {
            pb::TrafficPolicy::Local
        } else {
            pb::TrafficPolicy::Cluster
        };
        assert_eq!(policy, expected as i32, "round {round}");
        if join.is_ok() {
            let joined = held(&mut cb, &joiner).await;
            assert_eq!((ips(&joined), joined.traffic_policy), (ip, policy));
        }
    }
    eprintln!("(update accepted, join accepted) → rounds: {outcomes:?}");
    assert_eq!(outcomes.values().sum::<usize>(), ROUNDS, "{outcomes:?}");
}
