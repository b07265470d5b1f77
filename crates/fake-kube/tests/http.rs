//! The fake over real HTTP, spoken by hand: what a client sees on the wire.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use herald_fake_kube::{FakeKube, SERVICES, Verb};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one request and reads the answer until the server closes or `until` shows up.
async fn http(
    fake: &FakeKube,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
    until: &str,
) -> String {
    let mut conn = TcpStream::connect(fake.addr()).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n");
    if let Some((content_type, body)) = body {
        req.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if !until.is_empty() && String::from_utf8_lossy(&out).contains(until) {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn list_watch_patch_and_gone() {
    let fake = FakeKube::start().await.unwrap();
    fake.create(SERVICES, json!({"metadata": {"namespace": "default", "name": "web"}, "spec": {"type": "LoadBalancer"}}))
        .unwrap();
    let rv = fake.resource_version();

    let list = http(&fake, "GET", "/api/v1/services?limit=500", None, "").await;
    assert!(list.starts_with("HTTP/1.1 200"), "{list}");
    assert!(
        list.contains(&format!("\"resourceVersion\":\"{rv}\"")),
        "{list}"
    );
    assert!(list.contains("\"kind\":\"ServiceList\""), "{list}");

    // A status merge patch changes only the status.
    let patched = http(
        &fake,
        "PATCH",
        "/api/v1/namespaces/default/services/web/status",
        Some((
            "application/merge-patch+json",
            r#"{"spec":{"type":"ClusterIP"},"status":{"loadBalancer":{"ingress":[{"ip":"172.16.0.241"}]}}}"#,
        )),
        "",
    )
    .await;
    assert!(patched.starts_with("HTTP/1.1 200"), "{patched}");
    let svc = fake.get(SERVICES, "default", "web").unwrap();
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        svc["status"]["loadBalancer"]["ingress"][0]["ip"],
        "172.16.0.241"
    );

    // A watch from the list's resourceVersion replays the change and sends bookmarks.
    let watch = http(
        &fake,
        "GET",
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"),
        None,
        "BOOKMARK",
    )
    .await;
    assert!(watch.contains("\"type\":\"MODIFIED\""), "{watch}");
    assert!(watch.contains("\"type\":\"BOOKMARK\""), "{watch}");

    // After compaction, the old resourceVersion is gone.
    fake.compact();
    let gone = http(
        &fake,
        "GET",
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
        None,
        "ERROR",
    )
    .await;
    assert!(
        gone.contains("\"type\":\"ERROR\"") && gone.contains("\"code\":410"),
        "{gone}"
    );

    // Unknown paths and stale writes get Kubernetes Status errors.
    let missing = http(
        &fake,
        "GET",
        "/api/v1/namespaces/default/services/nope",
        None,
        "",
    )
    .await;
    assert!(
        missing.starts_with("HTTP/1.1 404") && missing.contains("\"reason\":\"NotFound\""),
        "{missing}"
    );
    let stale = http(
        &fake,
        "PATCH",
        "/api/v1/namespaces/default/services/web/status",
        Some((
            "application/merge-patch+json",
            &format!(r#"{{"metadata":{{"resourceVersion":"{rv}"}},"status":{{}}}}"#),
        )),
        "",
    )
    .await;
    assert!(stale.starts_with("HTTP/1.1 409"), "{stale}");

    assert_eq!(fake.count(Verb::Watch, SERVICES), 2);
    assert_eq!(fake.count(Verb::List, SERVICES), 1);
    assert_eq!(fake.writes_to(SERVICES, "default", "web"), 2);
}

#[tokio::test]
async fn count_matches_list_without_copying() {
    let fake = FakeKube::start().await.unwrap();
    for (namespace, name, ip) in [
        ("default", "a", Some("172.16.0.241")),
        ("default", "b", None),
        ("other", "c", Some("172.16.0.242")),
    ] {
        let mut svc = json!({"metadata": {"namespace": namespace, "name": name}, "spec": {"type": "LoadBalancer"}});
        if let Some(ip) = ip {
            svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
        }
        fake.create(SERVICES, svc).unwrap();
    }
    let has_ip =
        |svc: &serde_json::Value| svc["status"]["loadBalancer"]["ingress"][0]["ip"].is_string();
    assert_eq!(fake.count_matching(SERVICES, Some("default"), has_ip), 1);
    assert_eq!(fake.count_matching(SERVICES, None, has_ip), 2);
    assert_eq!(
        fake.count_matching(SERVICES, None, |_| true),
        fake.list(SERVICES, None).len()
    );
    assert_eq!(fake.count_matching(SERVICES, Some("nowhere"), |_| true), 0);
}

fn widget_crd() -> serde_json::Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.io"},
        "spec": {
            "group": "example.io",
            "scope": "Cluster",
            "names": {"plural": "widgets", "kind": "Widget", "singular": "widget"},
            "versions": [
                {"name": "v1beta2", "served": true, "storage": true, "subresources": {"status": {}}},
                {"name": "v1beta1", "served": true, "storage": false},
            ],
        },
    })
}

#[tokio::test]
async fn custom_resources_are_served_once_registered() {
    let fake = FakeKube::start().await.unwrap();
    let before = http(&fake, "GET", "/apis/example.io/v1beta2/widgets", None, "").await;
    assert!(before.starts_with("HTTP/1.1 404"), "{before}");

    // Registered over HTTP, as kubectl apply of the definition does.
    let crd = widget_crd().to_string();
    let created = http(
        &fake,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some(("application/json", &crd)),
        "",
    )
    .await;
    assert!(created.starts_with("HTTP/1.1 200"), "{created}");
    let body = json!({"metadata": {"name": "w"}, "spec": {"size": 1}}).to_string();
    let w = http(
        &fake,
        "POST",
        "/apis/example.io/v1beta2/widgets",
        Some(("application/json", &body)),
        "",
    )
    .await;
    assert!(w.starts_with("HTTP/1.1 200"), "{w}");

    // One stored object, answered in the version asked for.
    let old = http(&fake, "GET", "/apis/example.io/v1beta1/widgets/w", None, "").await;
    assert!(
        old.contains("\"apiVersion\":\"example.io/v1beta1\""),
        "{old}"
    );
    assert!(old.contains("\"size\":1"), "{old}");

    // The status subresource exists only where the version declares it, and a write to
    // the main resource keeps the status.
    let status = json!({"status": {"ok": true}, "spec": {"size": 9}}).to_string();
    let patched = http(
        &fake,
        "PATCH",
        "/apis/example.io/v1beta2/widgets/w/status",
        Some(("application/merge-patch+json", &status)),
        "",
    )
    .await;
    assert!(patched.starts_with("HTTP/1.1 200"), "{patched}");
    let w = fake
        .get(
            herald_fake_kube::CUSTOM_RESOURCE_DEFINITIONS,
            "",
            "widgets.example.io",
        )
        .unwrap();
    assert_eq!(w["spec"]["group"], "example.io");
    let widgets = http(&fake, "GET", "/apis/example.io/v1beta2/widgets", None, "").await;
    assert!(
        widgets.contains("\"ok\":true") && widgets.contains("\"size\":1"),
        "{widgets}"
    );
    let no_status = http(
        &fake,
        "PATCH",
        "/apis/example.io/v1beta1/widgets/w/status",
        Some(("application/merge-patch+json", &status)),
        "",
    )
    .await;
    assert!(no_status.starts_with("HTTP/1.1 404"), "{no_status}");

    // A stale resourceVersion is a conflict.
    let stale =
        json!({"metadata": {"name": "w", "resourceVersion": "1"}, "spec": {"size": 2}}).to_string();
    let conflict = http(
        &fake,
        "PUT",
        "/apis/example.io/v1beta2/widgets/w",
        Some(("application/json", &stale)),
        "",
    )
    .await;
    assert!(conflict.starts_with("HTTP/1.1 409"), "{conflict}");
}

#[tokio::test]
async fn a_finalizer_holds_a_deleted_object_until_it_is_removed() {
    let fake = FakeKube::start().await.unwrap();
    let widgets = fake.register_crd(widget_crd()).unwrap()[0];
    fake.create(widgets, json!({"metadata": {"name": "w"}, "spec": {}}))
        .unwrap();
    // The first finalizer, as kube-runtime adds it: a test for null on an absent path.
    let add = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.io/hold"]},
    ])
    .to_string();
    let added = http(
        &fake,
        "PATCH",
        "/apis/example.io/v1beta2/widgets/w",
        Some(("application/json-patch+json", &add)),
        "",
    )
    .await;
    assert!(added.starts_with("HTTP/1.1 200"), "{added}");
    let deleted = http(
        &fake,
        "DELETE",
        "/apis/example.io/v1beta2/widgets/w",
        None,
        "",
    )
    .await;
    assert!(deleted.starts_with("HTTP/1.1 200"), "{deleted}");
    let held = fake.get(widgets, "", "w").expect("held by its finalizer");
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");

    // A JSON patch whose test fails changes nothing.
    let wrong = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "other"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ])
    .to_string();
    let refused = http(
        &fake,
        "PATCH",
        "/apis/example.io/v1beta2/widgets/w",
        Some(("application/json-patch+json", &wrong)),
        "",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 422"), "{refused}");
    assert!(fake.get(widgets, "", "w").is_some());

    let right = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.io/hold"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ])
    .to_string();
    let released = http(
        &fake,
        "PATCH",
        "/apis/example.io/v1beta2/widgets/w",
        Some(("application/json-patch+json", &right)),
        "",
    )
    .await;
    assert!(released.starts_with("HTTP/1.1 200"), "{released}");
    assert!(
        fake.get(widgets, "", "w").is_none(),
        "gone with its last finalizer"
    );
    assert_eq!(fake.count(Verb::Patch, widgets), 3);
}
