//! The gRPC API of the real `herald-ipam` binary, over a socket, on SQLite and Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Server, all_allocations, allocate, allocate_ok, create_pool, ips, owner, pool};
use futures::StreamExt;
use herald_api::ipam::v1 as pb;
use herald_api::ipam::v1::ipam_client::IpamClient;
use herald_test_support::TestDb;
use tonic::Code;
use tonic::transport::Channel;

/// The README walkthrough: the lab pool, the lab Service, 172.16.0.241.
async fn lab_walkthrough(client: &mut IpamClient<Channel>) {
    let created = create_pool(client, pool("lab", &["172.16.0.240/28"])).await;
    assert_eq!(
        created.capacity[0].total, "14",
        "first and last are withheld by default"
    );

    let mut req = allocate("5f1c");
    req.owner = Some(owner("default", "lb-nginx-service", "5f1c"));
    req.ports = vec![pb::ServicePort {
        protocol: "TCP".into(),
        port: 80,
    }];
    let dry = client
        .allocate(pb::AllocateRequest {
            dry_run: true,
            ..req.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    assert_eq!(ips(dry.allocation.as_ref().unwrap()), ["172.16.0.241"]);
    assert_eq!(
        all_allocations(client).await.len(),
        0,
        "a dry run writes nothing"
    );

    let first = allocate_ok(client, req.clone()).await;
    assert_eq!(ips(&first), ["172.16.0.241"]);
    assert_eq!(first.ips[0].pool, "lab");
    // Idempotent: the same owner gets the same address, however often it asks.
    for _ in 0..3 {
        assert_eq!(
            ips(&allocate_ok(client, req.clone()).await),
            ["172.16.0.241"]
        );
    }
    assert_eq!(
        ips(&allocate_ok(client, allocate("other")).await),
        ["172.16.0.242"]
    );

    let got = client
        .get_pool(pb::GetPoolRequest { name: "lab".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.capacity[0].used, got.capacity[0].free.as_str()),
        (2, "12")
    );
    let held = client
        .get_allocation(pb::GetAllocationRequest {
            owner_uid: "5f1c".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.owner.unwrap().name, "lb-nginx-service");

    let released = client
        .release(pb::ReleaseRequest {
            owner_uid: "5f1c".into(),
            reason: "service deleted".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released[0].ip, "172.16.0.241");
    let err = client
        .get_allocation(pb::GetAllocationRequest {
            owner_uid: "5f1c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let history = client
        .history(pb::HistoryRequest {
            ip: "172.16.0.241".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<(i32, String)> = history
        .entries
        .iter()
        .map(|e| (e.action, e.reason.clone()))
        .collect();
    assert_eq!(
        actions,
        [
            (
                pb::history_entry::Action::Released as i32,
                "service deleted".into()
            ),
            (
                pb::history_entry::Action::Assigned as i32,
                "allocated".into()
            )
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_walkthrough_on_the_embedded_store_with_zero_setup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    lab_walkthrough(&mut server.client().await).await;
    assert!(
        dir.path().join("herald-ipam.db").exists(),
        "the embedded store lives in the working directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_walkthrough_on_postgres() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    lab_walkthrough(&mut server.client().await).await;
    assert!(!dir.path().join("herald-ipam.db").exists());
}

/// Asserts the status code and that the message names `needle`.
fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("lab", &["172.16.0.240/28"])).await;
    create_pool(&mut c, pool("v6", &["fd00::/64"])).await;
    allocate_ok(&mut c, allocate("holder")).await;

    let create = |p: pb::Pool| pb::CreatePoolRequest { pool: Some(p) };
    let mut c2 = c.clone();
    let try_pool = |p: pb::Pool| {
        let mut c = c2.clone();
        async move { c.create_pool(create(p)).await }
    };
    expect(
        try_pool(pool("x", &["172.16.1.0/33"])).await,
        Code::InvalidArgument,
        "pool.addresses[0]",
    );
    expect(
        try_pool(pool("x", &["172.16.1.1/24"])).await,
        Code::InvalidArgument,
        "host bits are set",
    );
    expect(
        try_pool(pool("x", &["10.0.0.1-fd00::1"])).await,
        Code::InvalidArgument,
        "mixes IPv4 and IPv6",
    );
    expect(
        try_pool(pool("x", &["not-an-ip"])).await,
        Code::InvalidArgument,
        "pool.addresses[0] \"not-an-ip\"",
    );
    expect(
        try_pool(pool("", &["10.0.0.0/24"])).await,
        Code::InvalidArgument,
        "pool.name",
    );
    expect(
        try_pool(pb::Pool {
            quarantine_seconds: 40 * 24 * 3600,
            ..pool("x", &["10.0.0.0/24"])
        })
        .await,
        Code::InvalidArgument,
        "pool.quarantine_seconds \"3456000\"",
    );
    expect(
        try_pool(pool(&"a".repeat(64), &["10.0.0.0/24"])).await,
        Code::InvalidArgument,
        "longer than 63",
    );
    expect(
        try_pool(pool("x", &[])).await,
        Code::InvalidArgument,
        "pool.addresses",
    );
    expect(
        try_pool(pool("x", &["10.0.0.0/24", "172.16.0.250/32"])).await,
        Code::AlreadyExists,
        "overlaps 172.16.0.240/28 of pool \"lab\"",
    );
    expect(
        try_pool(pool("lab", &["10.0.0.0/24"])).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect(
        c2.create_pool(pb::CreatePoolRequest { pool: None }).await,
        Code::InvalidArgument,
        "pool: is required",
    );
    expect(
        c.get_pool(pb::GetPoolRequest {
            name: "missing".into(),
        })
        .await,
        Code::NotFound,
        "missing",
    );
    expect(
        c.delete_pool(pb::DeletePoolRequest {
            name: "missing".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "missing",
    );
    expect(
        c.delete_pool(pb::DeletePoolRequest {
            name: "lab".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "172.16.0.241 held by default/svc-holder",
    );
    expect(
        c.update_pool(pb::UpdatePoolRequest {
            pool: Some(pool("lab", &["172.16.0.248/29"])),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "172.16.0.241",
    );

    let with = |f: &dyn Fn(&mut pb::AllocateRequest)| {
        let mut r = allocate("new");
        f(&mut r);
        r
    };
    let cases: Vec<(pb::AllocateRequest, Code, &str)> = vec![
        (
            pb::AllocateRequest {
                owner: None,
                ..Default::default()
            },
            Code::InvalidArgument,
            "owner: is required",
        ),
        (
            with(&|r| r.owner.as_mut().unwrap().uid = String::new()),
            Code::InvalidArgument,
            "owner.uid",
        ),
        (
            with(&|r| r.owner.as_mut().unwrap().namespace = "Bad NS".into()),
            Code::InvalidArgument,
            "owner.namespace",
        ),
        (
            with(&|r| r.requested_ips = vec!["300.1.1.1".into()]),
            Code::InvalidArgument,
            "requested_ips[0] \"300.1.1.1\"",
        ),
        (
            with(&|r| r.requested_ips = vec!["192.168.77.1".into()]),
            Code::FailedPrecondition,
            "192.168.77.1 is not in any pool",
        ),
        (
            with(&|r| r.requested_ips = vec!["172.16.0.241".into()]),
            Code::AlreadyExists,
            "172.16.0.241 is already allocated",
        ),
        (
            with(&|r| r.requested_ips = vec!["172.16.0.240".into()]),
            Code::FailedPrecondition,
            "first or last address",
        ),
        (
            with(&|r| r.requested_pool = "nope".into()),
            Code::NotFound,
            "requested_pool \"nope\"",
        ),
        (
            with(&|r| r.requested_pool = "Bad_Pool".into()),
            Code::InvalidArgument,
            "requested_pool",
        ),
        (
            with(&|r| r.ip_families = vec![7]),
            Code::InvalidArgument,
            "ip_families[0]",
        ),
        (
            with(&|r| r.ip_families = vec![1, 2]),
            Code::InvalidArgument,
            "SingleStack takes one family",
        ),
        (
            with(&|r| r.ip_family_policy = 99),
            Code::InvalidArgument,
            "ip_family_policy",
        ),
        (
            with(&|r| r.traffic_policy = 9),
            Code::InvalidArgument,
            "traffic_policy",
        ),
        (
            with(&|r| {
                r.ports = vec![pb::ServicePort {
                    protocol: "ICMP".into(),
                    port: 1,
                }]
            }),
            Code::InvalidArgument,
            "ports[0].protocol",
        ),
        (
            with(&|r| {
                r.ports = vec![pb::ServicePort {
                    protocol: "TCP".into(),
                    port: 70000,
                }]
            }),
            Code::InvalidArgument,
            "ports[0].port",
        ),
        (
            with(&|r| r.sharing_key = "a|b".into()),
            Code::InvalidArgument,
            "sharing_key",
        ),
        (
            with(&|r| {
                r.service_labels
                    .insert("bad key!".into(), "v".into())
                    .map_or((), drop)
            }),
            Code::InvalidArgument,
            "service_labels",
        ),
    ];
    for (req, code, needle) in cases {
        expect(c.allocate(req).await, code, needle);
    }
    expect(
        c.release(pb::ReleaseRequest {
            owner_uid: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "owner_uid",
    );
    expect(
        c.history(pb::HistoryRequest::default()).await,
        Code::InvalidArgument,
        "exactly one of ip and owner_uid",
    );
    expect(
        c.history(pb::HistoryRequest {
            ip: "x".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "ip \"x\"",
    );
    expect(
        c.history(pb::HistoryRequest {
            ip: "172.16.0.241".into(),
            page_token: "zz".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    expect(
        c.watch(pb::WatchRequest {
            after_revision: u64::MAX,
        })
        .await,
        Code::InvalidArgument,
        "after_revision",
    );

    // 6 MB of labels: within the message size limit, so refused by the label count
    // (messages over the limit: tests/errors.rs).
    let huge = pb::AllocateRequest {
        service_labels: (0..200_000)
            .map(|i| (format!("k{i}"), "v".repeat(20)))
            .collect(),
        ..allocate("huge")
    };
    expect(
        c.allocate(huge).await,
        Code::InvalidArgument,
        "service_labels \"200000\": at most 256 labels",
    );

    // Exhaustion of the requested pool.
    for i in 0..13 {
        allocate_ok(&mut c, allocate(&format!("fill{i}"))).await;
    }
    expect(
        c.allocate(allocate("late")).await,
        Code::ResourceExhausted,
        "IPv4 pools lab are exhausted",
    );

    // Nothing above changed the store beyond the fills.
    let pools = c
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(
        pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["lab", "v6"]
    );
    assert_eq!(pools[0].addresses, ["172.16.0.240/28"]);
    assert_eq!(all_allocations(&mut c).await.len(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_dual_stack_and_an_owner_that_changes_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("dual", &["172.16.0.240/28", "fd00:10::/64"])).await;

    let shared = |uid: &str, port: u32| pb::AllocateRequest {
        sharing_key: "web".into(),
        ports: vec![pb::ServicePort {
            protocol: "TCP".into(),
            port,
        }],
        ..allocate(uid)
    };
    let http = allocate_ok(&mut c, shared("http", 80)).await;
    let https = allocate_ok(&mut c, shared("https", 443)).await;
    assert_eq!(ips(&http), ips(&https));
    expect(
        c.allocate(shared("clash", 80)).await,
        Code::FailedPrecondition,
        "port 80/TCP",
    );
    let local = pb::AllocateRequest {
        traffic_policy: pb::TrafficPolicy::Local as i32,
        ..shared("local", 8080)
    };
    expect(
        c.allocate(local).await,
        Code::FailedPrecondition,
        "different traffic policy",
    );

    let dual = pb::AllocateRequest {
        ip_family_policy: pb::IpFamilyPolicy::RequireDualStack as i32,
        ..allocate("dual")
    };
    let got = allocate_ok(&mut c, dual.clone()).await;
    assert_eq!(ips(&got), ["172.16.0.242", "fd00:10::1"]);
    assert_eq!(
        ips(&allocate_ok(&mut c, dual).await),
        ["172.16.0.242", "fd00:10::1"]
    );

    // An allocation never moves: asking for another address is refused until released.
    let moved = pb::AllocateRequest {
        requested_ips: vec!["172.16.0.250".into()],
        ..allocate("dual")
    };
    let moved = pb::AllocateRequest {
        ip_family_policy: pb::IpFamilyPolicy::RequireDualStack as i32,
        ..moved
    };
    expect(
        c.allocate(moved.clone()).await,
        Code::FailedPrecondition,
        "release it first",
    );
    c.release(pb::ReleaseRequest {
        owner_uid: "dual".into(),
        reason: "changed loadBalancerIP".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        ips(&allocate_ok(&mut c, moved).await),
        ["172.16.0.250", "fd00:10::1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_results_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("lab", &["10.20.0.0/24"])).await;
    let mut requests: Vec<pb::AllocateRequest> =
        (0..100).map(|i| allocate(&format!("b{i}"))).collect();
    requests[10].owner.as_mut().unwrap().uid = String::new();
    requests[20].requested_ips = vec!["10.99.0.1".into()];
    requests[30] = allocate("b0");
    let results = c
        .allocate_batch(pb::AllocateBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 100);
    let mut ok = std::collections::BTreeSet::new();
    for (i, result) in results.iter().enumerate() {
        match result.result.as_ref().unwrap() {
            pb::allocate_result::Result::Allocation(a) => {
                assert!(ok.insert((a.owner.as_ref().unwrap().uid.clone(), ips(a))) || i == 30)
            }
            pb::allocate_result::Result::Error(e) => {
                assert!(i == 10 || i == 20, "item {i} failed: {}", e.message);
                if i == 10 {
                    assert_eq!(e.code, Code::InvalidArgument as i32);
                    assert!(
                        e.message.contains("requests[10].owner.uid"),
                        "{}",
                        e.message
                    );
                }
            }
        }
    }
    let b0: Vec<_> = results
        .iter()
        .filter_map(|r| match r.result.as_ref() {
            Some(pb::allocate_result::Result::Allocation(a))
                if a.owner.as_ref().unwrap().uid == "b0" =>
            {
                Some(ips(a))
            }
            _ => None,
        })
        .collect();
    assert_eq!(b0.len(), 2);
    assert_eq!(
        b0[0], b0[1],
        "a repeated owner in one batch gets its one address"
    );
    let distinct: std::collections::BTreeSet<_> =
        all_allocations(&mut c).await.iter().map(ips).collect();
    assert_eq!(
        distinct.len(),
        97,
        "100 requests less one invalid, one outside every pool and one repeat"
    );

    let too_many = pb::AllocateBatchRequest {
        requests: (0..1001).map(|i| allocate(&format!("x{i}"))).collect(),
    };
    expect(
        c.allocate_batch(too_many).await,
        Code::InvalidArgument,
        "at most 1000",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_in_order_and_replays_from_a_revision() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(&db.url)).await;
    let mut c = server.client().await;
    let mut live = c
        .watch(pb::WatchRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    create_pool(&mut c, pool("lab", &["172.16.0.240/28"])).await;
    allocate_ok(&mut c, allocate("a")).await;
    c.release(pb::ReleaseRequest {
        owner_uid: "a".into(),
        reason: String::new(),
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let next = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .expect("a change within 5 s")
            .unwrap()
            .unwrap();
        seen.push(next);
    }
    use pb::watch_response::Change;
    assert!(matches!(&seen[0].change, Some(Change::PoolChanged(p)) if p == "lab"));
    assert!(
        matches!(&seen[1].change, Some(Change::Allocation(e)) if e.action == pb::history_entry::Action::Assigned as i32 && e.ip == "172.16.0.241")
    );
    assert!(
        matches!(&seen[2].change, Some(Change::Allocation(e)) if e.action == pb::history_entry::Action::Released as i32 && e.reason == "released")
    );
    assert!(seen.windows(2).all(|w| w[0].revision < w[1].revision));

    // A watcher that reconnects after the first change gets exactly the rest.
    let mut replay = c
        .watch(pb::WatchRequest {
            after_revision: seen[0].revision,
        })
        .await
        .unwrap()
        .into_inner();
    for expected in &seen[1..] {
        let got = tokio::time::timeout(Duration::from_secs(5), replay.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.revision, expected.revision);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    use tonic_reflection::pb::v1 as r1;
    use tonic_reflection::pb::v1alpha as r1a;
    let mut v1 =
        r1::server_reflection_client::ServerReflectionClient::new(server.channel().await.unwrap());
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1 reflection did not list services")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"herald.ipam.v1.Ipam".to_string())
            && names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut v1a =
        r1a::server_reflection_client::ServerReflectionClient::new(server.channel().await.unwrap());
    let request = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
                "herald.ipam.v1.Ipam".into(),
            ),
        ),
    };
    let mut responses = v1a
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(response.message_response, Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty())
    );
}

/// `(used, quarantined, free)` of the first family of every pool, as GetPool and ListPools
/// report them.
async fn capacity_seen(c: &mut IpamClient<Channel>, name: &str) -> [(u64, u64, String); 2] {
    let one = |p: &pb::Pool| {
        let first = &p.capacity[0];
        (first.used, first.quarantined, first.free.clone())
    };
    let got = c
        .get_pool(pb::GetPoolRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let listed = c
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed = listed.pools.iter().find(|p| p.name == name).unwrap();
    [one(&got), one(listed)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_true_when_read_after_a_quarantine_ends() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    create_pool(
        &mut c,
        pb::Pool {
            quarantine_seconds: 3,
            ..pool("q", &["172.16.0.240/30"])
        },
    )
    .await;
    allocate_ok(&mut c, allocate("a")).await;
    c.release(pb::ReleaseRequest {
        owner_uid: "a".into(),
        reason: "deleted".into(),
    })
    .await
    .unwrap();
    let released_at = tokio::time::Instant::now();
    // The release shows at once and stays, while the change feed reads the allocation's
    // and the release's own log entries after them (it once applied the allocation's
    // again, counting the address used until the release's entry followed).
    let resting = (0, 1, "1".to_string());
    for _ in 0..25 {
        assert_eq!(
            capacity_seen(&mut c, "q").await,
            [resting.clone(), resting.clone()]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No Allocate after the quarantine ends: reading alone must show it over.
    tokio::time::sleep_until(released_at + Duration::from_millis(3300)).await;
    let ended = (0, 0, "2".to_string());
    assert_eq!(capacity_seen(&mut c, "q").await, [ended.clone(), ended]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_pool_dry_run_previews_the_new_capacity_and_the_stored_generation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    let created = create_pool(&mut c, pool("lab", &["172.16.0.240/28"])).await;
    allocate_ok(&mut c, allocate("a")).await;
    let update = |addresses: &[&str], dry_run: bool| pb::UpdatePoolRequest {
        pool: Some(pool("lab", addresses)),
        force: false,
        dry_run,
    };

    let grown = c
        .update_pool(update(&["172.16.0.224/27"], true))
        .await
        .unwrap()
        .into_inner();
    assert!(grown.dry_run);
    let preview = grown.pool.unwrap();
    assert_eq!(preview.addresses, ["172.16.0.224/27"]);
    let capacity = &preview.capacity[0];
    assert_eq!(
        (
            capacity.total.as_str(),
            capacity.used,
            capacity.free.as_str()
        ),
        ("30", 1, "29"),
        "the capacity the new addresses would give"
    );
    assert_eq!(
        (preview.generation, preview.update_time),
        (created.generation, created.update_time),
        "a dry run stores nothing, so it shows the stored generation and update time"
    );

    // A shrink that would release the allocation, previewed: its address leaves the pool.
    let shrunk = c
        .update_pool(update(&["172.16.0.244/30"], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shrunk.affected.len(), 1);
    let capacity = &shrunk.pool.unwrap().capacity[0];
    assert_eq!(
        (
            capacity.total.as_str(),
            capacity.used,
            capacity.free.as_str()
        ),
        ("2", 0, "2")
    );

    let stored = c
        .get_pool(pb::GetPoolRequest { name: "lab".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.generation, created.generation);
    assert_eq!(stored.capacity[0].total, "14", "nothing changed");

    // The real update stores the next generation and the capacity the dry run showed.
    let applied = c
        .update_pool(update(&["172.16.0.224/27"], false))
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!(applied.generation, created.generation + 1);
    assert_eq!(applied.capacity, preview.capacity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_are_opaque_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None).await;
    let mut c = server.client().await;
    create_pool(&mut c, pool("lab", &["172.16.0.240/28"])).await;
    for uid in ["a", "b", "c"] {
        allocate_ok(&mut c, allocate(uid)).await;
    }
    let list = |page_token: &str| pb::ListAllocationsRequest {
        page_size: 1,
        page_token: page_token.into(),
        ..Default::default()
    };
    let history = |page_token: &str| pb::HistoryRequest {
        ip: "172.16.0.241".into(),
        page_size: 1,
        page_token: page_token.into(),
        ..Default::default()
    };
    // Three pages of one, each token leading to the next owner.
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..3 {
        let page = c.list_allocations(list(&token)).await.unwrap().into_inner();
        seen.extend(
            page.allocations
                .iter()
                .map(|a| a.owner.clone().unwrap().uid),
        );
        token = page.next_page_token;
        assert!(
            !["a", "b", "c"].contains(&token.as_str()),
            "{token:?} is a raw uid"
        );
    }
    assert_eq!(seen, ["a", "b", "c"]);
    assert_eq!(token, "", "the last page says it is the last");

    c.release(pb::ReleaseRequest {
        owner_uid: "a".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let list_token = c
        .list_allocations(list(""))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let history_token = c
        .history(history(""))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!list_token.is_empty() && !history_token.is_empty());
    assert!(
        history_token.parse::<i64>().is_err(),
        "{history_token:?} is a raw revision"
    );
    let page = c
        .history(history(&history_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 1, "the second page of the history");

    // Garbled, invented and foreign tokens are refused the same way on both.
    for bad in ["xyz", "b", "%%%", &history_token] {
        expect(
            c.list_allocations(list(bad)).await,
            Code::InvalidArgument,
            "page_token",
        );
    }
    for bad in ["xyz", "1", "%%%", &list_token] {
        expect(
            c.history(history(bad)).await,
            Code::InvalidArgument,
            "page_token",
        );
    }
}
