//! The metrics as an operator's Prometheus sees them: the real binaries (fake Kubernetes
//! API → watcher → herald-ipam on Postgres → two speakers → FRR) scraped by a real
//! Prometheus on loopback through a scenario. Every series the dashboards in
//! `deploy/grafana/` and the rules in `deploy/prometheus/` query must exist, the counters
//! must have moved as the scenario did, `promtool check metrics` must pass on each admin
//! endpoint and `promtool check rules` on the rules. The speakers' `/readyz` is 503 until
//! their first snapshot, 200 after.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_api::ipam::v1 as ipam_pb;
use herald_e2e::{CONVERGE, Ipam, KubeLab, expect_paths, http_get, lab_pool, lb_service, port};
use herald_fake_kube::SERVICES;
use herald_test_support::{ChildProcess, TestDb};
use herald_tor_harness::{Tor, TorConfig, TorKind};
use serde_json::json;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Waits until `GET path` answers `status`.
async fn wait_status(addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = http_get(addr, path).await.ok();
        if let Some((s, body)) = &got
            && *s == status
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} never answered {status}; last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every `herald_…` selector (name and label matchers) in `text`, with the dashboards'
/// variables replaced by what "All" means.
fn selectors(text: &str) -> BTreeSet<String> {
    let text = text
        .replace("$__rate_interval", "1m")
        .replace("$pool", ".+")
        .replace("$instance", ".+")
        .replace("$peer", ".+");
    let mut found = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut selector = tail[..name_len].to_string();
        if tail[name_len..].starts_with('{') {
            let close = tail[name_len..].find('}').unwrap();
            selector.push_str(&tail[name_len..name_len + close + 1]);
        }
        found.insert(selector);
        rest = &tail[name_len..];
    }
    found
}

/// The `expr` of every panel target of a Grafana dashboard.
fn dashboard_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn queried_selectors() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    let mut dashboards = 0;
    for entry in std::fs::read_dir(Path::new(REPO).join("deploy/grafana")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let dashboard: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let mut exprs = Vec::new();
            dashboard_exprs(&dashboard, &mut exprs);
            assert!(!exprs.is_empty(), "{} queries nothing", path.display());
            for e in exprs {
                all.extend(selectors(&e));
            }
            dashboards += 1;
        }
    }
    assert_eq!(dashboards, 3, "the three dashboards");
    let rules = std::fs::read_to_string(Path::new(REPO).join("deploy/prometheus/herald-rules.yml"))
        .unwrap();
    let from_rules = selectors(&rules);
    assert!(from_rules.len() >= 5, "{from_rules:?}");
    all.extend(from_rules);
    all
}

async fn prometheus_api(
    addr: SocketAddr,
    path: &str,
    param: &str,
    value: &str,
) -> serde_json::Value {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair(param, value)
        .finish();
    let (status, body) = http_get(addr, &format!("{path}?{query}")).await.unwrap();
    assert_eq!(status, 200, "{path} {value}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of an instant query that returns one sample (0 when it returns none).
async fn scalar(addr: SocketAddr, query: &str) -> f64 {
    let answer = prometheus_api(addr, "/api/v1/query", "query", query).await;
    answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Whether promtool's only complaints are `<name>_total no help text` for counters whose
/// help is there under `<name>`: prometheus-client writes the OpenMetrics counter layout
/// (HELP and TYPE name the family, the sample adds `_total`; prometheus/client_rust
/// issues 51 and 194), which promtool 2.42's older text-format linter reads as a second,
/// undocumented metric. Anything else (a parse error, a bad name or unit) still fails.
fn lint_only_counter_help(out: &str, text: &str) -> bool {
    let mut problems = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    problems.peek().is_some()
        && problems.all(|line| {
            line.strip_suffix(" no help text")
                .and_then(|sample| sample.strip_suffix("_total"))
                .is_some_and(|family| {
                    text.contains(&format!("# HELP {family} "))
                        && text.contains(&format!("# TYPE {family} counter"))
                })
        })
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_finds_every_series_the_dashboards_and_alerts_query() {
    let wanted = queried_selectors();
    let rules_path = format!("{REPO}/deploy/prometheus/herald-rules.yml");
    let (ok, out) = promtool(&["check", "rules", &rules_path], None);
    assert!(ok, "promtool check rules: {out}");

    let tor = Tor::start(TorConfig::new(TorKind::Frr)).await.unwrap();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (ipam_admin, watcher_admin) = (admin(port()), admin(port()));
    let speaker_admin = [admin(port()), admin(port())];
    let ipam = Ipam::start_with(dir.path(), &db.url, port(), |c| {
        c.args(["--admin-listen", &ipam_admin.to_string()]);
    })
    .await;
    wait_status(ipam_admin, "/readyz", 200).await;
    assert_eq!(http_get(ipam_admin, "/healthz").await.unwrap().0, 200);
    ipam.ipam()
        .await
        .create_pool(ipam_pb::CreatePoolRequest {
            pool: Some(lab_pool()),
        })
        .await
        .unwrap();
    let mut policy = herald_e2e::tor_policy(&tor, 9);
    policy.peers[0].node_selector = None;
    ipam.routing().await.set_bgp_policy(policy).await.unwrap();

    // Prometheus scrapes the four admin ports every second.
    let prom_addr = admin(port());
    let targets: Vec<String> = [
        ipam_admin,
        watcher_admin,
        speaker_admin[0],
        speaker_admin[1],
    ]
    .iter()
    .map(|a| format!("'{a}'"))
    .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{rules_path}']\nscrape_configs:\n  - job_name: herald\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(prom_dir.join("prometheus.yml"), config).unwrap();
    let mut prometheus = Command::new("prometheus");
    prometheus.args([
        &format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ),
        &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
        &format!("--web.listen-address={prom_addr}"),
        "--enable-feature=exemplar-storage",
        "--log.level=warn",
    ]);
    let _prometheus = ChildProcess::spawn("prometheus", prometheus);

    let mut lab = KubeLab::builder(dir.path())
        .watcher_args(&["--admin-listen", &watcher_admin.to_string()])
        .start()
        .await;
    // The speakers start before the watcher registers their nodes in IPAM: not ready
    // until a snapshot comes.
    lab.start_speakers_with(&ipam.endpoint(), |i, c| {
        c.args(["--admin-listen", &speaker_admin[i].to_string()]);
    });
    for a in speaker_admin {
        let body = wait_status(a, "/readyz", 503).await;
        assert!(body.contains("no route snapshot"), "{body}");
        assert_eq!(http_get(a, "/healthz").await.unwrap().0, 200);
    }

    lab.start_watcher(&ipam.endpoint());
    let kube = &lab.kube;
    wait_status(watcher_admin, "/readyz", 200).await;
    for a in speaker_admin {
        wait_status(a, "/readyz", 200).await;
    }

    // Two Services allocated, one released.
    for name in ["web", "api"] {
        kube.create(SERVICES, lb_service(name)).unwrap();
    }
    let mut web_prefix = String::new();
    for name in ["web", "api"] {
        let ip = kube
            .wait_for(CONVERGE, |k| {
                k.get(SERVICES, "default", name)?["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .map(str::to_string)
            })
            .await;
        let Some(ip) = ip else {
            panic!("{name} got no address");
        };
        // The two are allocated in whichever order the watcher takes them.
        if name == "web" {
            web_prefix = format!("{ip}/32");
        }
    }
    expect_paths(&tor, &web_prefix, &["127.0.0.10", "127.0.0.11"]).await;
    // One asks for an address no pool holds: IPAM refuses, the Service stays pending.
    let mut far = lb_service("far");
    far["metadata"]["annotations"] = json!({"herald.io/load-balancer-ips": "10.99.0.1"});
    kube.create(SERVICES, far).unwrap();
    kube.delete(SERVICES, "default", "web").unwrap();
    expect_paths(&tor, &web_prefix, &[]).await;

    // promtool lints what each endpoint serves.
    for a in [
        ipam_admin,
        watcher_admin,
        speaker_admin[0],
        speaker_admin[1],
    ] {
        let (status, text) = http_get(a, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let (ok, out) = promtool(&["check", "metrics"], Some(&text));
        assert!(
            ok || lint_only_counter_help(&out, &text),
            "promtool check metrics on {a}: {out}\n{text}"
        );
    }

    // Prometheus has every series the dashboards and rules ask for, and the counters
    // moved as the scenario did.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for selector in &wanted {
            let answer = prometheus_api(prom_addr, "/api/v1/series", "match[]", selector).await;
            if answer["data"].as_array().is_none_or(Vec::is_empty) {
                missing.push(selector.clone());
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(missing.is_empty(), "series never scraped: {missing:?}");

    let checks: [(&str, f64); 11] = [
        (
            "sum(herald_watcher_ipam_rpc_errors_total{call=\"Allocate\"})",
            1.0,
        ),
        ("sum(herald_watcher_services_pending)", 1.0),
        (
            "sum(herald_ipam_allocations_total{pool=\"lab\",result=\"ok\"})",
            2.0,
        ),
        (
            "sum(herald_ipam_releases_total{pool=\"lab\",result=\"ok\"})",
            1.0,
        ),
        ("sum(herald_watcher_reconciles_total{result=\"ok\"})", 3.0),
        ("count(herald_speaker_updates_sent_total > 0)", 2.0),
        (
            "count(herald_speaker_route_change_to_update_seconds_count{kind=\"announce\"} > 0)",
            2.0,
        ),
        // The deleted Service's route withdrawn by both speakers, timed too.
        (
            "count(herald_speaker_route_change_to_update_seconds_count{kind=\"withdraw\"} > 0)",
            2.0,
        ),
        (
            "sum(herald_speaker_session_state{state=\"Established\"})",
            2.0,
        ),
        (
            "max(herald_ipam_pool_addresses{pool=\"lab\",state=\"used\"})",
            1.0,
        ),
        ("sum(herald_watcher_leader)", 1.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    for (query, want) in checks {
        let mut got = scalar(prom_addr, query).await;
        while got < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            got = scalar(prom_addr, query).await;
        }
        assert!(got >= want, "{query} = {got}, expected at least {want}");
    }
    // The released address is back: exactly one used, not two.
    assert_eq!(
        scalar(
            prom_addr,
            "max(herald_ipam_pool_addresses{pool=\"lab\",state=\"used\"})"
        )
        .await,
        1.0
    );
    // The rules loaded and evaluate.
    let rules = prometheus_api(prom_addr, "/api/v1/rules", "type", "alert").await;
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, 5, "{rules}");
}
