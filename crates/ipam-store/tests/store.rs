//! The store's behaviour, run against both backends: every test below runs once on a fresh
//! Postgres database and once on a fresh SQLite file.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use herald_ipam_core::{ClaimRecord, Plan, PoolIndex};
use herald_ipam_store::{
    AllocationFilter, CommitError, Event, HistoryKey, Store, StoreError, now_micros,
};
use herald_model::pool::PoolInput;
use herald_model::{
    AllocationRequest, FamilyPolicy, HistoryAction, IpFamily, Owner, PoolSpec, ServicePort,
    TrafficPolicy,
};
use herald_test_support::TestDb;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $( #[tokio::test] async fn $name() { let db = herald_test_support::TestDb::postgres().await; super::$name(&db).await; } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $name() { let db = herald_test_support::TestDb::sqlite(); super::$name(&db).await; } )*
        }
    };
}

on_both_backends!(
    pools_are_created_listed_and_refused_on_overlap,
    allocations_round_trip_and_owner_keeps_its_address,
    two_replicas_racing_for_one_address_leave_one_owner,
    sharing_needs_the_same_key_policy_and_free_ports,
    release_frees_the_address_and_history_tells_why,
    shrinking_or_deleting_a_pool_in_use_is_refused_unless_forced,
    a_plan_made_against_an_old_pool_spec_is_refused,
    listing_pages_and_filters,
    each_held_address_gives_every_address_of_every_owner_with_its_claim,
    state_survives_reopening,
    batches_are_written_together_and_fall_back_one_by_one,
    a_write_refused_for_an_owner_that_holds_takes_no_revision,
    an_update_rewrites_ports_and_policy_at_once_or_changes_nothing,
    compaction_deletes_only_superseded_routing_rows_older_than_the_retention,
    an_endpoints_batch_is_written_in_order_with_an_event_each,
);

fn spec(name: &str, addresses: &[&str]) -> PoolSpec {
    PoolSpec::from_input(PoolInput {
        name: name.into(),
        addresses: addresses.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn request(uid: &str) -> AllocationRequest {
    AllocationRequest {
        owner: Owner {
            cluster_id: "lab".into(),
            namespace: "default".into(),
            name: format!("svc-{uid}"),
            uid: uid.into(),
        },
        service_labels: BTreeMap::new(),
        namespace_labels: BTreeMap::new(),
        family_policy: FamilyPolicy::SingleStack,
        families: vec![IpFamily::V4],
        requested_ips: vec![],
        requested_pool: None,
        sharing_key: String::new(),
        ports: vec![],
        traffic_policy: TrafficPolicy::Cluster,
        endpoint_selector: BTreeMap::new(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A freshly opened store holding one pool.
async fn store_with_pool(db: &TestDb, pool: &str, addresses: &[&str]) -> Store {
    let store = Store::open(Some(&db.url)).await.unwrap();
    store.create_pool(&spec(pool, addresses)).await.unwrap();
    store
}

/// Pool `a` (10.0.0.0/24) and dual-stack pool `b` (10.0.1.0/24, fd00::/120), and their index.
async fn pools_a_and_b(db: &TestDb) -> (Store, PoolIndex) {
    let store = store_with_pool(db, "a", &["10.0.0.0/24"]).await;
    store
        .create_pool(&spec("b", &["10.0.1.0/24", "fd00::/120"]))
        .await
        .unwrap();
    let index = index_of(&store).await;
    (store, index)
}

async fn index_of(store: &Store) -> PoolIndex {
    let pools = store
        .load_pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.spec, p.generation))
        .collect();
    PoolIndex::load(pools, store.load_claims(None).await.unwrap())
}

async fn allocate(
    store: &Store,
    index: &mut PoolIndex,
    req: &AllocationRequest,
) -> Result<Plan, CommitError> {
    let plan = index.plan(req).expect("plan");
    match store.commit(req, &plan).await {
        Ok(_) => Ok(plan),
        Err(e) => {
            index.abort(&plan);
            Err(e)
        }
    }
}

async fn pools_are_created_listed_and_refused_on_overlap(db: &TestDb) {
    let store = Store::open(Some(&db.url)).await.unwrap();
    let created = store
        .create_pool(&spec("lab", &["172.16.0.240/28"]))
        .await
        .unwrap();
    assert_eq!(created.generation, 1);
    store
        .create_pool(&spec("v6", &["fd00::/64", "10.9.0.0-10.9.0.9"]))
        .await
        .unwrap();

    let err = store
        .create_pool(&spec("other", &["10.0.0.0/24", "172.16.0.250-172.16.1.3"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool.addresses[1] 172.16.0.250-172.16.1.3 overlaps 172.16.0.240/28 of pool \"lab\""
    );
    let err = store
        .create_pool(&spec("lab", &["10.1.0.0/24"]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::PoolExists(_)), "{err}");
    let err = store
        .create_pool(&spec("inner", &["fd00::1:0/112"]))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps fd00::/64 of pool \"v6\""),
        "{err}"
    );

    let names: Vec<String> = store
        .load_pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.spec.name.to_string())
        .collect();
    assert_eq!(names, ["lab", "v6"], "refused pools left nothing behind");
    assert_eq!(
        store.load_pool("lab").await.unwrap().unwrap().spec,
        spec("lab", &["172.16.0.240/28"])
    );
    assert!(store.load_pool("nope").await.unwrap().is_none());
}

async fn allocations_round_trip_and_owner_keeps_its_address(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28", "fd00::/120"]).await;
    let mut index = index_of(&store).await;
    let mut req = request("lb-nginx");
    req.family_policy = FamilyPolicy::RequireDualStack;
    allocate(&store, &mut index, &req).await.unwrap();
    let got = store.get_allocation("lb-nginx").await.unwrap().unwrap();
    let ips: Vec<String> = got
        .ips
        .iter()
        .map(|i| format!("{}@{}", i.ip, i.pool))
        .collect();
    assert_eq!(ips, ["172.16.0.241@lab", "fd00::1@lab"]);
    assert_eq!(got.owner.name, "svc-lb-nginx");

    // A second commit for the same owner and family is refused by the primary key.
    let mut fresh = index_of(&store).await;
    fresh.observe_released(ip("172.16.0.241"), "lb-nginx", None);
    let dup = fresh.plan(&request("lb-nginx")).unwrap();
    assert_eq!(dup.items[0].ip, ip("172.16.0.241"));
    let mut other_ip = dup.clone();
    other_ip.items[0].ip = ip("172.16.0.250");
    let err = store
        .commit(&request("lb-nginx"), &other_ip)
        .await
        .unwrap_err();
    assert!(matches!(err, CommitError::OwnerExists), "{err}");
    assert!(store.get_allocation("nobody").await.unwrap().is_none());
}

async fn two_replicas_racing_for_one_address_leave_one_owner(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    // Two replicas with the same (empty) picture both choose .241.
    let mut a = index_of(&store).await;
    let mut b = index_of(&store).await;
    allocate(&store, &mut a, &request("first")).await.unwrap();
    let err = allocate(&store, &mut b, &request("second"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommitError::AddressTaken(taken) if taken == ip("172.16.0.241")),
        "{err}"
    );
    assert!(
        store.get_allocation("second").await.unwrap().is_none(),
        "nothing partial was written"
    );
    let claims = store.load_claims(None).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].owner_uid, "first");
    // The loser learns the winner from the one address.
    assert_eq!(
        store.load_claims_at(ip("172.16.0.241")).await.unwrap(),
        claims
    );
    assert!(
        store
            .load_claims_at(ip("172.16.0.242"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn sharing_needs_the_same_key_policy_and_free_ports(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let shared = |uid: &str, port: u16| {
        let mut r = request(uid);
        r.sharing_key = "web".into();
        r.ports = vec![ServicePort {
            protocol: "TCP".into(),
            port,
        }];
        r
    };
    let mut index = index_of(&store).await;
    allocate(&store, &mut index, &shared("http", 80))
        .await
        .unwrap();
    let plan = allocate(&store, &mut index, &shared("https", 443))
        .await
        .unwrap();
    assert!(plan.items[0].joins_shared);

    // A stale replica that does not know the ports collide: the database refuses.
    let mut stale = PoolIndex::load(vec![(spec("lab", &["172.16.0.240/28"]), 1)], vec![]);
    let mut clash = shared("clash", 80);
    clash.requested_ips = vec![ip("172.16.0.241")];
    let mut plan = stale.plan(&clash).unwrap();
    plan.items[0].joins_shared = true;
    let err = store.commit(&clash, &plan).await.unwrap_err();
    assert!(matches!(err, CommitError::PortInUse { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "port 80/TCP on 172.16.0.241 is already used by Service default/svc-http (uid http)"
    );
    // An owner without the key cannot reference the shared claim at all.
    let mut intruder = request("intruder");
    intruder.requested_ips = vec![ip("172.16.0.241")];
    let plan = PoolIndex::load(vec![(spec("lab", &["172.16.0.240/28"]), 1)], vec![])
        .plan(&intruder)
        .unwrap();
    let err = store.commit(&intruder, &plan).await.unwrap_err();
    assert!(matches!(err, CommitError::AddressTaken(_)), "{err}");
    // The same key with another traffic policy is another tag: refused too.
    let mut local = shared("local", 8080);
    local.traffic_policy = TrafficPolicy::Local;
    local.requested_ips = vec![ip("172.16.0.241")];
    let plan = PoolIndex::load(vec![(spec("lab", &["172.16.0.240/28"]), 1)], vec![])
        .plan(&local)
        .unwrap();
    assert!(store.commit(&local, &plan).await.is_err());

    let holders: Vec<String> = store
        .load_claims(None)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.owner_uid)
        .collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
}

async fn an_update_rewrites_ports_and_policy_at_once_or_changes_nothing(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let shared = |uid: &str, ports: &[u16], policy: TrafficPolicy| {
        let mut r = request(uid);
        r.sharing_key = "web".into();
        r.ports = ports
            .iter()
            .map(|&port| ServicePort {
                protocol: "TCP".into(),
                port,
            })
            .collect();
        r.traffic_policy = policy;
        r
    };
    let ports_of = |store: &Store, uid: &'static str| {
        let store = store.clone();
        async move {
            let held = store.get_allocation(uid).await.unwrap().unwrap();
            held.ports.iter().map(|p| p.port).collect::<Vec<_>>()
        }
    };
    let mut index = index_of(&store).await;
    for (uid, port) in [("http", 80), ("https", 443)] {
        allocate(
            &store,
            &mut index,
            &shared(uid, &[port], TrafficPolicy::Cluster),
        )
        .await
        .unwrap();
    }
    let held = store.get_allocation("http").await.unwrap().unwrap();
    let before = store.last_revision().await.unwrap();

    let to_8080 = shared("http", &[8080], TrafficPolicy::Cluster);
    let revision = store.update_allocation(&to_8080, &held).await.unwrap();
    assert_eq!(revision, before + 1, "one event for one address");
    assert_eq!(ports_of(&store, "http").await, [8080]);
    let (history, _) = store
        .history(HistoryKey::Owner("http"), 10, 0)
        .await
        .unwrap();
    assert_eq!(history[0].action, HistoryAction::Updated);
    assert_eq!(history[0].reason, "updated: ports 8080/TCP (were 80/TCP)");
    assert!(matches!(
        store.events_after(before, 10).await.unwrap().as_slice(),
        [Event::Updated(entry, tag)] if entry.owner.uid == "http" && tag == "s:web|Cluster"
    ));
    // 80 is free again: another sharer takes it (once the index knows, as the service
    // tells it).
    index.observe_updated(ClaimRecord {
        ip: held.ips[0].ip,
        tag: to_8080.claim_tag(),
        pool: "lab".into(),
        owner_uid: "http".into(),
        ports: to_8080.ports.clone(),
    });
    allocate(
        &store,
        &mut index,
        &shared("web80", &[80], TrafficPolicy::Cluster),
    )
    .await
    .unwrap();

    // A port another sharer uses, or a policy the others do not share: refused, naming
    // the sharer, and nothing changes.
    let held = store.get_allocation("http").await.unwrap().unwrap();
    let before = store.last_revision().await.unwrap();
    let err = store
        .update_allocation(&shared("http", &[8080, 443], TrafficPolicy::Cluster), &held)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CommitError::PortInUse { key, .. } if key == "web"),
        "{err}"
    );
    assert!(err.to_string().contains("443/TCP") && err.to_string().contains("uid https"));
    let err = store
        .update_allocation(&shared("http", &[8080], TrafficPolicy::Local), &held)
        .await
        .unwrap_err();
    assert!(matches!(err, CommitError::PolicyShared { .. }), "{err}");
    assert!(err.to_string().contains("uid https"), "{err}");
    assert_eq!(ports_of(&store, "http").await, [8080]);
    assert_eq!(store.last_revision().await.unwrap(), before);

    // An allocation that changed since it was read is not updated blindly.
    let mut stale = held.clone();
    stale.ips[0].ip = ip("172.16.0.250");
    assert!(matches!(
        store.update_allocation(&to_8080, &stale).await,
        Err(CommitError::AllocationChanged)
    ));

    // Alone on its address, an owner may change its policy: the claim is retagged.
    store.release("https", "gone").await.unwrap();
    store.release("web80", "gone").await.unwrap();
    let local = shared("http", &[8080], TrafficPolicy::Local);
    store.update_allocation(&local, &held).await.unwrap();
    let claims = store.load_claims_at(held.ips[0].ip).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].tag, local.claim_tag());
    let now = store.get_allocation("http").await.unwrap().unwrap();
    assert_eq!(now.traffic_policy, TrafficPolicy::Local);
    assert_eq!(
        now.created_at, held.created_at,
        "an update is not a new allocation"
    );
    // A Cluster Service can no longer join it.
    let mut late = shared("late", &[9000], TrafficPolicy::Cluster);
    late.requested_ips = vec![held.ips[0].ip];
    let plan = PoolIndex::load(vec![(spec("lab", &["172.16.0.240/28"]), 1)], vec![])
        .plan(&late)
        .unwrap();
    assert!(store.commit(&late, &plan).await.is_err());
}

async fn release_frees_the_address_and_history_tells_why(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let mut index = index_of(&store).await;
    allocate(&store, &mut index, &request("a")).await.unwrap();
    let released = store.release("a", "service deleted").await.unwrap();
    assert_eq!(
        released.addresses,
        [(ip("172.16.0.241"), "lab".to_string())]
    );
    assert!(
        released.revision > 0,
        "the release's log entry has a revision"
    );
    assert!(store.load_claims(None).await.unwrap().is_empty());
    assert!(
        store
            .release("a", "again")
            .await
            .unwrap()
            .addresses
            .is_empty(),
        "releasing twice is harmless"
    );
    index.observe_released(ip("172.16.0.241"), "a", None);
    allocate(&store, &mut index, &request("b")).await.unwrap();

    let (by_ip, next) = store
        .history(HistoryKey::Ip(ip("172.16.0.241")), 10, 0)
        .await
        .unwrap();
    assert_eq!(next, None);
    let summary: Vec<(HistoryAction, String, String)> = by_ip
        .iter()
        .map(|e| (e.action, e.owner.uid.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (HistoryAction::Assigned, "b".into(), "allocated".into()),
            (
                HistoryAction::Released,
                "a".into(),
                "service deleted".into()
            ),
            (HistoryAction::Assigned, "a".into(), "allocated".into()),
        ]
    );
    let (page, next) = store.history(HistoryKey::Owner("a"), 1, 0).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].action, HistoryAction::Released);
    let (rest, _) = store
        .history(HistoryKey::Owner("a"), 10, next.unwrap())
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].action, HistoryAction::Assigned);

    // What a restart puts back in quarantine: the release, at the time history gives.
    let released_at = by_ip[1].at;
    assert_eq!(
        store.released_since(released_at).await.unwrap(),
        [(ip("172.16.0.241"), released_at)]
    );
    assert!(
        store
            .released_since(released_at + 1)
            .await
            .unwrap()
            .is_empty()
    );

    let events = store.events_after(0, 100).await.unwrap();
    let revisions: Vec<i64> = events.iter().map(Event::revision).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert!(matches!(events[0], Event::PoolChanged { .. }));
    assert_eq!(
        store.last_revision().await.unwrap(),
        *revisions.last().unwrap()
    );
}

async fn shrinking_or_deleting_a_pool_in_use_is_refused_unless_forced(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let mut index = index_of(&store).await;
    allocate(&store, &mut index, &request("a")).await.unwrap();
    let smaller = spec("lab", &["172.16.0.248/29"]);

    let err = store.update_pool(&smaller, false, false).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool \"lab\" still holds allocations: 172.16.0.241 held by default/svc-a (uid a) (set force to release them, or dry_run to list them)"
    );
    let dry = store.update_pool(&smaller, false, true).await.unwrap();
    assert_eq!(dry.affected.len(), 1);
    let previewed = dry.pool.unwrap();
    let stored = store.load_pool("lab").await.unwrap().unwrap();
    assert_eq!(previewed.spec, smaller, "the spec the update would store");
    assert_eq!(
        (previewed.generation, previewed.updated_at),
        (stored.generation, stored.updated_at),
        "the generation and time that are stored, not ones never written"
    );
    assert_eq!(
        store.load_pool("lab").await.unwrap().unwrap().generation,
        1,
        "a dry run changes nothing"
    );
    assert!(store.get_allocation("a").await.unwrap().is_some());

    // Growing is always fine and bumps the generation.
    let grown = store
        .update_pool(&spec("lab", &["172.16.0.224/27"]), false, false)
        .await
        .unwrap();
    assert_eq!(grown.pool.unwrap().generation, 2);
    assert!(grown.affected.is_empty());

    let forced = store.update_pool(&smaller, true, false).await.unwrap();
    assert_eq!(forced.released, [(ip("172.16.0.241"), "a".to_string())]);
    assert!(store.get_allocation("a").await.unwrap().is_none());
    let (history, _) = store.history(HistoryKey::Owner("a"), 10, 0).await.unwrap();
    assert_eq!(history[0].reason, "pool lab shrunk");

    let mut index = index_of(&store).await;
    allocate(&store, &mut index, &request("b")).await.unwrap();
    assert!(matches!(
        store.delete_pool("lab", false, false).await.unwrap_err(),
        StoreError::PoolInUse { .. }
    ));
    assert_eq!(
        store
            .delete_pool("lab", false, true)
            .await
            .unwrap()
            .affected
            .len(),
        1
    );
    assert!(store.load_pool("lab").await.unwrap().is_some());
    let deleted = store.delete_pool("lab", true, false).await.unwrap();
    assert_eq!(deleted.released.len(), 1);
    assert!(store.load_pool("lab").await.unwrap().is_none());
    assert!(store.load_claims(None).await.unwrap().is_empty());
    assert!(matches!(
        store.delete_pool("lab", false, false).await.unwrap_err(),
        StoreError::PoolNotFound(_)
    ));
}

async fn a_plan_made_against_an_old_pool_spec_is_refused(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let mut stale = index_of(&store).await;
    store
        .update_pool(&spec("lab", &["172.16.0.248/29"]), false, false)
        .await
        .unwrap();
    let err = allocate(&store, &mut stale, &request("a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommitError::PoolChanged(ref pool) if pool == "lab"),
        "{err}"
    );
    assert!(store.load_claims(None).await.unwrap().is_empty());
}

async fn listing_pages_and_filters(db: &TestDb) {
    let (store, mut index) = pools_a_and_b(db).await;
    for i in 0..7 {
        let mut req = request(&format!("u{i}"));
        req.requested_pool =
            Some(herald_model::PoolName::parse("p", if i % 2 == 0 { "a" } else { "b" }).unwrap());
        if i == 3 {
            req.family_policy = FamilyPolicy::RequireDualStack;
        }
        if i == 6 {
            req.owner.namespace = "web".into();
        }
        allocate(&store, &mut index, &req).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let (page, next) = store
            .list_allocations(&AllocationFilter::default(), 3, &token)
            .await
            .unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.into_iter().map(|a| (a.owner.uid, a.ips.len())));
        match next {
            Some(next) => token = next,
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(
        seen.contains(&("u3".to_string(), 2)),
        "dual-stack owners come whole"
    );
    let in_b = store
        .list_allocations(
            &AllocationFilter {
                pool: "b".into(),
                ..Default::default()
            },
            100,
            "",
        )
        .await
        .unwrap()
        .0;
    assert_eq!(
        in_b.iter()
            .map(|a| a.owner.uid.as_str())
            .collect::<Vec<_>>(),
        ["u1", "u3", "u5"]
    );
    let in_web = store
        .list_allocations(
            &AllocationFilter {
                namespace: "web".into(),
                ..Default::default()
            },
            100,
            "",
        )
        .await
        .unwrap()
        .0;
    assert_eq!(in_web.len(), 1);
}

/// The one pass a restart loads from: every address of every owner once (a dual-stack
/// owner's two, two owners sharing one), with its owner's allocation as the pages of
/// `list_allocations` give it, and with the claim `load_claims` gives.
async fn each_held_address_gives_every_address_of_every_owner_with_its_claim(db: &TestDb) {
    let (store, mut index) = pools_a_and_b(db).await;
    for i in 0..9 {
        let mut req = request(&format!("u{i}"));
        req.requested_pool =
            Some(herald_model::PoolName::parse("p", if i % 2 == 0 { "a" } else { "b" }).unwrap());
        match i {
            1 | 3 => req.family_policy = FamilyPolicy::RequireDualStack,
            4 => req.traffic_policy = TrafficPolicy::Local,
            // Two owners on one address under a sharing key.
            5 | 7 => {
                req.sharing_key = "web".into();
                req.ports = vec![ServicePort {
                    protocol: "TCP".into(),
                    port: 8000 + i,
                }];
            }
            _ => {}
        }
        allocate(&store, &mut index, &req).await.unwrap();
    }
    store.release("u2", "test").await.unwrap();

    let mut streamed = Vec::new();
    let count = store
        .each_held_address(|held| streamed.push(held))
        .await
        .unwrap();
    assert_eq!(count, 10, "8 owners, 2 of them dual-stack");
    assert!(streamed.iter().all(|h| h.allocation.ips.len() == 1));

    // Each owner's rows together, in family order, are its allocation.
    let mut owners: BTreeMap<String, herald_model::Allocation> = BTreeMap::new();
    for held in &streamed {
        let a = &held.allocation;
        match owners.get_mut(&a.owner.uid) {
            Some(whole) => {
                assert_eq!(
                    herald_model::Allocation {
                        ips: whole.ips.clone(),
                        ..a.clone()
                    },
                    *whole,
                    "rows of one owner differ beyond the address"
                );
                whole.ips.extend(a.ips.iter().cloned());
                whole.ips.sort_by_key(|ip| ip.ip.is_ipv6());
            }
            None => {
                owners.insert(a.owner.uid.clone(), a.clone());
            }
        }
    }
    let (paged, next) = store
        .list_allocations(&AllocationFilter::default(), 100, "")
        .await
        .unwrap();
    assert!(next.is_none());
    assert_eq!(owners.into_values().collect::<Vec<_>>(), paged);

    let key = |c: &ClaimRecord| (c.ip, c.owner_uid.clone());
    let mut claims: Vec<ClaimRecord> = streamed.iter().flat_map(|h| h.claims()).collect();
    claims.sort_by_key(key);
    let mut loaded = store.load_claims(None).await.unwrap();
    loaded.sort_by_key(key);
    assert_eq!(claims, loaded);
    assert_eq!(
        claims
            .iter()
            .filter(|c| c.tag.starts_with("s:web|"))
            .count(),
        2,
        "{claims:?}"
    );
}

async fn state_survives_reopening(db: &TestDb) {
    {
        let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
        let mut index = index_of(&store).await;
        allocate(&store, &mut index, &request("a")).await.unwrap();
        store.close().await;
    }
    let store = Store::open(Some(&db.url)).await.unwrap();
    let mut index = index_of(&store).await;
    let plan = allocate(&store, &mut index, &request("b")).await.unwrap();
    assert_eq!(
        plan.items[0].ip,
        ip("172.16.0.242"),
        "the reopened store remembers .241"
    );
}

async fn batches_are_written_together_and_fall_back_one_by_one(db: &TestDb) {
    let store = store_with_pool(db, "big", &["10.50.0.0/22", "fd00:50::/120"]).await;
    let mut index = index_of(&store).await;
    let mut requests: Vec<AllocationRequest> =
        (0..150).map(|i| request(&format!("b{i}"))).collect();
    requests[7].family_policy = FamilyPolicy::RequireDualStack;
    let plans: Vec<Plan> = requests.iter().map(|r| index.plan(r).unwrap()).collect();
    let batch: Vec<(&AllocationRequest, &Plan)> = requests.iter().zip(&plans).collect();
    assert!(store.commit_batch(&batch).await.iter().all(Result::is_ok));
    assert_eq!(store.load_claims(None).await.unwrap().len(), 151);
    assert_eq!(
        store.get_allocation("b7").await.unwrap().unwrap().ips.len(),
        2
    );
    let (history, _) = store
        .history(HistoryKey::Owner("b149"), 10, 0)
        .await
        .unwrap();
    assert_eq!(history.len(), 1);

    // A batch where one plan collides (a stale replica's view) still writes the others.
    let mut stale = PoolIndex::load(
        vec![(spec("big", &["10.50.0.0/22", "fd00:50::/120"]), 1)],
        vec![],
    );
    let mut fresh = index_of(&store).await;
    let late: Vec<AllocationRequest> = (0..3).map(|i| request(&format!("late{i}"))).collect();
    let plans = vec![
        fresh.plan(&late[0]).unwrap(),
        stale.plan(&late[1]).unwrap(),
        fresh.plan(&late[2]).unwrap(),
    ];
    let batch: Vec<(&AllocationRequest, &Plan)> = late.iter().zip(&plans).collect();
    let results = store.commit_batch(&batch).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(CommitError::AddressTaken(_))),
        "{results:?}"
    );
    assert!(store.get_allocation("late1").await.unwrap().is_none());
}

/// A revision taken by a write that then fails is a hole the change feed has to wait out
/// before it delivers what follows; an owner writing again must fail before taking one.
async fn a_write_refused_for_an_owner_that_holds_takes_no_revision(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    // A view taken before "a" allocated: it will plan "a" a second, free address.
    let mut stale = index_of(&store).await;
    let mut index = index_of(&store).await;
    allocate(&store, &mut index, &request("a")).await.unwrap();
    let before = store.last_revision().await.unwrap();

    stale.plan(&request("someone")).unwrap();
    let again = stale.plan(&request("a")).unwrap();
    assert_eq!(again.items[0].ip, ip("172.16.0.242"));
    assert!(matches!(
        store.commit(&request("a"), &again).await,
        Err(CommitError::OwnerExists)
    ));

    allocate(&store, &mut index, &request("b")).await.unwrap();
    assert_eq!(store.last_revision().await.unwrap(), before + 1);
}

/// A new Postgres connection costs a TLS handshake (about 90 ms here); the store opens its
/// working set in the background as it opens, so that no request waits for one.
#[tokio::test]
async fn postgres_connections_are_opened_ahead_of_use() {
    let db = TestDb::postgres().await;
    let store = Store::open(Some(&db.url)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (main, hot) = store.open_connections().unwrap();
        if main >= herald_ipam_store::DEFAULT_PG_CONNECTIONS && hot >= 8 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {main} main and {hot} hot connections open after 30 s, with no request made"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let sqlite = TestDb::sqlite();
    let store = Store::open(Some(&sqlite.url)).await.unwrap();
    assert_eq!(store.open_connections(), None);
}

/// The change feed tells a rolled-back revision from one still to come by the transactions
/// writing the log: one that has inserted into `events` is listed until it ends, whatever
/// the rest of the cluster runs; other databases' transactions are not.
#[tokio::test]
async fn transactions_writing_the_log_are_listed_until_they_end() {
    let db = TestDb::postgres().await;
    let other = TestDb::postgres().await;
    let store = store_with_pool(&db, "lab", &["172.16.0.240/28"]).await;
    let idle = Store::open(Some(&other.url)).await.unwrap();
    assert_eq!(store.log_writers().await.unwrap(), Some(Vec::new()));

    // A transaction in another database that writes its own log is none of ours.
    let foreign = sqlx::AnyPool::connect(&other.url).await.unwrap();
    let mut elsewhere = foreign.begin().await.unwrap();
    sqlx::query("INSERT INTO events (at, kind, pool) VALUES (0, 'pool_changed', 'x')")
        .execute(&mut *elsewhere)
        .await
        .unwrap();
    assert_eq!(store.log_writers().await.unwrap(), Some(Vec::new()));

    let sql = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let mut open = sql.begin().await.unwrap();
    sqlx::query("INSERT INTO events (at, kind, pool) VALUES (0, 'pool_changed', 'lab')")
        .execute(&mut *open)
        .await
        .unwrap();
    let writers = store.log_writers().await.unwrap().unwrap();
    assert_eq!(writers.len(), 1, "{writers:?}");
    assert_eq!(store.log_writers_running(&writers).await.unwrap(), 1);
    open.rollback().await.unwrap();
    assert_eq!(store.log_writers_running(&writers).await.unwrap(), 0);
    elsewhere.rollback().await.unwrap();
    drop(idle);

    // SQLite has one writer and no holes: nothing to list.
    let sqlite = TestDb::sqlite();
    let store = Store::open(Some(&sqlite.url)).await.unwrap();
    assert_eq!(store.log_writers().await.unwrap(), None);
}

/// Whether a log row is a routing input (which compaction may delete) and its key.
fn routing_key(event: &Event) -> Option<String> {
    match event {
        Event::NodeChanged { node, .. } | Event::NodeDeleted { node, .. } => {
            Some(format!("node {node}"))
        }
        Event::EndpointsChanged { owner_uid, .. } => Some(format!("endpoints {owner_uid}")),
        Event::PolicyChanged { .. } => Some("policy".into()),
        _ => None,
    }
}

async fn compaction_deletes_only_superseded_routing_rows_older_than_the_retention(db: &TestDb) {
    let store = store_with_pool(db, "lab", &["172.16.0.240/28"]).await;
    let mut index = index_of(&store).await;
    // A Service named like a node: its history rows share the `name` column with the
    // node's rows and must neither be deleted nor count as superseding the node's.
    let mut svc = request("a");
    svc.owner.name = "n2".into();
    allocate(&store, &mut index, &svc).await.unwrap();
    for generation in 0..3 {
        store
            .set_endpoints("a", &format!("{{\"g\":{generation}}}"))
            .await
            .unwrap();
        store
            .upsert_node("n1", &format!("{{\"g\":{generation}}}"))
            .await
            .unwrap();
    }
    store.upsert_node("n2", "{}").await.unwrap();
    store.delete_node("n1").await.unwrap();
    store.set_policy("{\"p\":1}").await.unwrap();
    store.set_policy("{\"p\":2}").await.unwrap();
    store.release("a", "service deleted").await.unwrap();
    let before = store.events_after(0, 1000).await.unwrap();
    assert_eq!(store.compaction_point().await.unwrap(), 0);

    // Nothing is older than a retention that started before the writes.
    let none = store.compact_events(1, 1000).await.unwrap();
    assert_eq!((none.deleted, none.point), (0, 0));
    assert_eq!(store.events_after(0, 1000).await.unwrap(), before);

    // Everything is older than "now": the superseded rows go, a bounded batch at a time.
    let cutoff = now_micros() + 1;
    let first = store.compact_events(cutoff, 2).await.unwrap();
    assert_eq!(first.deleted, 2, "a run deletes at most its batch");
    let rest = store.compact_events(cutoff, 1000).await.unwrap();
    // endpoints a: 2 of 3; node n1: its 3 changes (its deletion is the newest); policy: 1.
    assert_eq!(rest.deleted, 4);
    let after = store.events_after(0, 1000).await.unwrap();
    assert_eq!(after.len(), before.len() - 6);

    // The newest row of every routing key stays, and every other row stays untouched.
    let newest = |events: &[Event]| {
        let mut newest = BTreeMap::new();
        for e in events {
            if let Some(key) = routing_key(e) {
                newest.insert(key, e.clone());
            }
        }
        newest
    };
    assert_eq!(newest(&after), newest(&before));
    assert_eq!(
        newest(&after).len(),
        4,
        "endpoints a, node n1, node n2, policy"
    );
    let others = |events: &[Event]| {
        events
            .iter()
            .filter(|e| routing_key(e).is_none())
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(others(&after), others(&before));
    assert!(
        others(&after).len() >= 2,
        "the assignment and the release are in the log"
    );
    let (history, _) = store.history(HistoryKey::Owner("a"), 10, 0).await.unwrap();
    assert_eq!(
        history.len(),
        2,
        "history keeps the assignment and the release"
    );

    // The point is the highest revision deleted, and stays put when nothing more goes.
    let deleted_max = before
        .iter()
        .map(Event::revision)
        .filter(|r| !after.iter().any(|e| e.revision() == *r))
        .max()
        .unwrap();
    assert_eq!(rest.point, deleted_max);
    assert_eq!(store.compaction_point().await.unwrap(), deleted_max);
    let again = store.compact_events(now_micros() + 1, 1000).await.unwrap();
    assert_eq!((again.deleted, again.point), (0, deleted_max));
    assert_eq!(store.event_count().await.unwrap(), after.len() as i64);

    // Every replica and a restart know the point: it is in the store.
    let reopened = Store::open(Some(&db.url)).await.unwrap();
    assert_eq!(reopened.compaction_point().await.unwrap(), deleted_max);
}

async fn an_endpoints_batch_is_written_in_order_with_an_event_each(db: &TestDb) {
    let store = Store::open(Some(&db.url)).await.unwrap();
    store.set_endpoints("b", "{\"old\":true}").await.unwrap();
    let after = store
        .events_after(0, 1000)
        .await
        .unwrap()
        .last()
        .unwrap()
        .revision();
    store
        .set_endpoints_batch(&[("a", "{\"a\":1}"), ("b", "{\"b\":1}"), ("a", "{\"a\":2}")])
        .await
        .unwrap();
    // A later item for the same owner wins, as a later call would.
    let docs: Vec<(String, String)> = store
        .load_endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.key, d.spec))
        .collect();
    assert_eq!(
        docs,
        [
            ("a".to_string(), "{\"a\":2}".to_string()),
            ("b".to_string(), "{\"b\":1}".to_string())
        ]
    );
    let events: Vec<Event> = store.events_after(after, 1000).await.unwrap();
    let owners: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::EndpointsChanged { owner_uid, .. } => Some(owner_uid.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(owners, ["a", "b", "a"]);
    // An empty batch writes nothing.
    store.set_endpoints_batch(&[]).await.unwrap();
    assert_eq!(store.events_after(after, 1000).await.unwrap(), events);
}
