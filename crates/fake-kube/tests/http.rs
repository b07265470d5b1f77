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
