//! Real TLS handshakes over loopback: client certificates are required and checked, the
//! peer's identity is read from the certificate, and renewed files take effect without a
//! restart.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_test_support::pki::TestCa;
use herald_tls::{Connector, Reloading, Role, identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tower::{Service, ServiceExt};

const TD: &str = "herald.test";

/// Serves one byte back to each connection, after reporting the client's identity.
async fn serve(reloading: &Arc<Reloading>) -> (u16, tokio::sync::mpsc::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = herald_tls::incoming(listener, reloading.server_config().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(Ok(mut tls)) = incoming.next().await {
            let (_, session) = tls.get_ref();
            let cert = session.peer_certificates().unwrap()[0].clone();
            let who = identity::identity(&cert, TD)
                .map(|i| i.to_string())
                .unwrap_or_else(|e| e.to_string());
            tx.send(who).await.unwrap();
            let mut byte = [0u8; 1];
            if tls.read_exact(&mut byte).await.is_ok() {
                let _ = tls.write_all(&byte).await;
            }
        }
    });
    (port, rx)
}

async fn round_trip(client: &Arc<Reloading>, port: u16) -> Result<String, String> {
    let mut connector = Connector::new(
        client.client_config().unwrap(),
        Some("localhost".into()),
        Duration::from_secs(5),
    );
    let uri: http::Uri = format!("https://127.0.0.1:{port}").parse().unwrap();
    let io = connector
        .ready()
        .await
        .unwrap()
        .call(uri)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = io.into_inner();
    // TLS 1.3 reports a refused client certificate only on the first read.
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let cert = session.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    Ok(parsed.subject().to_string())
}

#[tokio::test]
async fn client_certificates_are_required_and_name_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("herald test CA");
    let server =
        Reloading::load(ca.write(dir.path(), "server", &["localhost", "127.0.0.1"])).unwrap();
    let (port, mut seen) = serve(&server).await;

    let speaker = Reloading::load(ca.write(
        dir.path(),
        "speaker",
        &["spiffe://herald.test/herald/speaker/node/n1"],
    ))
    .unwrap();
    round_trip(&speaker, port).await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap(),
        "spiffe://herald.test/herald/speaker/node/n1"
    );
    let parsed = identity::identity(&speaker.certificate(), TD).unwrap();
    assert_eq!(parsed.role, Role::Speaker { node: "n1".into() });

    // A certificate from another CA: the server refuses the handshake.
    let other = TestCa::new("someone else's CA");
    let mut stranger_files = other.write(
        dir.path(),
        "stranger",
        &["spiffe://herald.test/herald/operator"],
    );
    // The stranger trusts our CA, so only the server's check can refuse it.
    stranger_files.ca = dir.path().join("server-ca.crt");
    let stranger = Reloading::load(stranger_files).unwrap();
    let refused = round_trip(&stranger, port).await.unwrap_err();
    assert!(refused.contains("UnknownCA"), "{refused}");

    // A client that does not trust the server's CA refuses the server.
    let mut distrustful = ca.write(dir.path(), "distrustful", &["reader.herald.test"]);
    distrustful.ca = dir.path().join("stranger-ca.crt");
    let distrustful = Reloading::load(distrustful).unwrap();
    let refused = round_trip(&distrustful, port).await.unwrap_err();
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("issuer"),
        "{refused}"
    );
}

#[tokio::test]
async fn renewed_files_take_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("herald test CA");
    let files = ca.write(dir.path(), "server", &["localhost"]);
    let server = Reloading::load(files.clone()).unwrap();
    let _watch = server.watch();
    let (port, _seen) = serve(&server).await;
    let client = Reloading::load(ca.write(dir.path(), "client", &["watcher.herald.test"])).unwrap();
    assert_eq!(round_trip(&client, port).await.unwrap(), "CN=localhost");

    // A half-written renewal (a key that does not go with the certificate) keeps the old
    // material in force.
    let (renewed_cert, renewed_key) = ca.issue(&["renewed.localhost", "localhost"]);
    std::fs::write(&files.cert, &renewed_cert).unwrap();
    let err = server.reload_if_changed().unwrap_err().to_string();
    assert!(err.contains("does not go with the key"), "{err}");
    assert_eq!(round_trip(&client, port).await.unwrap(), "CN=localhost");

    // The whole renewal: the next handshake shows the new certificate.
    std::fs::write(&files.key, &renewed_key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if round_trip(&client, port).await.unwrap() == "CN=renewed.localhost" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn unreadable_or_empty_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("herald test CA");
    let mut files = ca.write(dir.path(), "x", &["localhost"]);
    files.key = dir.path().join("missing.key");
    let err = Reloading::load(files.clone()).unwrap_err().to_string();
    assert!(
        err.contains("private key") && err.contains("missing.key"),
        "{err}"
    );
    files.key = dir.path().join("x.key");
    std::fs::write(dir.path().join("empty.crt"), "").unwrap();
    files.ca = dir.path().join("empty.crt");
    let err = Reloading::load(files).unwrap_err().to_string();
    assert!(
        err.contains("CA bundle") && err.contains("empty.crt"),
        "{err}"
    );
}
