//! The minimal gRPC-fronted INSERT server that `herald-bench floor` measures: every call
//! must really write its row, in both modes, or the floor it reports means nothing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use herald_bench::insert_server::{self, InsertMode};
use herald_test_support::db::TestDb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

async fn rows(url: &str) -> Vec<Vec<u8>> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT ip FROM ceiling ORDER BY ip")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

async fn writes_every_call(mode: InsertMode) {
    let db = TestDb::postgres().await;
    let logs = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_herald-bench"));
    let (server, _) =
        insert_server::start(exe, &db.url, mode, 4, logs.path(), Duration::from_millis(5))
            .await
            .unwrap();
    let channel = server.channels(1).await.unwrap().pop().unwrap();

    // Concurrent calls, so that the group writer writes some of them together.
    let calls = (0..40).map(|i| {
        let mut client = HealthClient::new(channel.clone());
        async move {
            client
                .check(HealthCheckRequest {
                    service: format!("key-{i:02}"),
                })
                .await
        }
    });
    for answer in futures::future::join_all(calls).await {
        answer.unwrap();
    }
    let written = rows(&db.url).await;
    let expected: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("key-{i:02}").into_bytes())
        .collect();
    assert_eq!(
        written, expected,
        "{mode:?}: every answered call wrote its row"
    );

    // The unique key is enforced and the caller told: the server fakes nothing.
    let error = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "key-07".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Internal, "{mode:?}: {error:?}");
    assert!(
        error.message().contains("duplicate key"),
        "{mode:?}: {error:?}"
    );

    // A readiness probe writes nothing.
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(rows(&db.url).await.len(), 40, "{mode:?}");
    drop(server);
}

#[tokio::test]
async fn each_call_writes_its_row() {
    writes_every_call(InsertMode::Each).await;
}

#[tokio::test]
async fn grouped_calls_write_their_rows() {
    writes_every_call(InsertMode::Group).await;
}
