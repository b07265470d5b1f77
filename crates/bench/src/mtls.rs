//! `herald-bench tls`: what mutual TLS costs. `alloc` at one client count and the `e2e`
//! pipeline each run twice in one run, plaintext and over mutual TLS (herald-ipam requiring
//! client certificates, the bench's clients and both route speakers presenting theirs),
//! and the ratios printed. The certificates are made for the run by a throwaway CA.

use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use herald_test_support::pki::TestCa;
use herald_tls::{Reloading, TlsFiles};
use serde::Serialize;

use crate::benches::{self, Common, PhaseResult};
use crate::pipeline::{self, E2ePhases};
use crate::report::{self, Target};

/// The trust domain of the run's identities.
pub const TRUST_DOMAIN: &str = "herald.bench";
/// The name herald-ipam's certificate carries and its clients check.
pub const SERVER_NAME: &str = "localhost";
/// The per-identity Allocate rate herald-ipam gets in the mTLS runs: far above anything
/// the bench reaches. Plaintext callers have no identity and meet no such limit, so with
/// the default (2,000/s) the comparison would measure the limit, not TLS.
const UNLIMITED_ALLOCATE_RATE: &str = "100000000";
/// Throughput with mTLS on, as a share of off, that the issue asks for at least.
const MIN_THROUGHPUT_RATIO: f64 = 0.85;

/// A throwaway CA and the certificates of one run, as the PEM files the binaries read.
pub struct BenchPki {
    dir: tempfile::TempDir,
    ca: TestCa,
    server: TlsFiles,
    /// The bench's own calls (pools, policy, nodes, Allocate, listing) are the watcher's.
    client: Arc<Reloading>,
}

impl BenchPki {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-pki-")
            .tempdir()
            .context("create a directory for the run's certificates")?;
        let ca = TestCa::new("herald-bench CA");
        let server = ca.write(dir.path(), "ipam", &[SERVER_NAME, "127.0.0.1"]);
        let watcher = ca.write(
            dir.path(),
            "bench-watcher",
            &[&format!("spiffe://{TRUST_DOMAIN}/herald/watcher")],
        );
        let client = Reloading::load(watcher).context("load the bench's client certificate")?;
        Ok(BenchPki {
            dir,
            ca,
            server,
            client,
        })
    }

    pub fn client(&self) -> &Arc<Reloading> {
        &self.client
    }

    /// herald-ipam's flags: its certificate, the CA client certificates must chain to,
    /// the trust domain, and no Allocate rate limit to speak of.
    pub fn server_args(&self, command: &mut Command) {
        command
            .env_remove("HERALD_ALLOCATE_RATE")
            .arg("--tls-cert")
            .arg(&self.server.cert)
            .arg("--tls-key")
            .arg(&self.server.key)
            .arg("--tls-client-ca")
            .arg(&self.server.ca)
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--allocate-rate", UNLIMITED_ALLOCATE_RATE]);
    }

    /// A client's flags (the speaker's and the watcher's are the same) with a certificate
    /// for `san`, written as `<name>.crt`/`.key`.
    fn client_args(&self, command: &mut Command, name: &str, san: &str) {
        let files = self.ca.write(self.dir.path(), name, &[san]);
        command
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key)
            .arg("--tls-ca")
            .arg(&files.ca)
            .args(["--ipam-server-name", SERVER_NAME]);
    }

    /// The route speaker of `node`, with its node's identity.
    pub fn speaker_args(&self, command: &mut Command, node: &str) {
        self.client_args(
            command,
            &format!("speaker-{node}"),
            &format!("spiffe://{TRUST_DOMAIN}/herald/speaker/node/{node}"),
        );
    }

    /// The cluster watcher.
    pub fn watcher_args(&self, command: &mut Command) {
        self.client_args(
            command,
            "watcher",
            &format!("spiffe://{TRUST_DOMAIN}/herald/watcher"),
        );
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    pub alloc_off: PhaseResult,
    pub alloc_on: PhaseResult,
    pub alloc_throughput_ratio: f64,
    pub alloc_p99_ratio: f64,
    pub e2e_off: E2ePhases,
    pub e2e_on: E2ePhases,
    /// Services per second one by one (1 / mean latency), on / off.
    pub e2e_throughput_ratio: f64,
    pub e2e_p99_ratio: f64,
    /// Burst prefixes per second, on / off.
    pub e2e_burst_ratio: f64,
    pub targets: Vec<Target>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

pub async fn tls_overhead(
    common: &Common,
    clients: usize,
    cidr: &str,
    count: u64,
    burst: u64,
) -> anyhow::Result<TlsReport> {
    common.print_header(&format!(
        "tls: plaintext vs mutual TLS 1.3 (client certificates, per-identity authorization), same run; alloc c={clients}, e2e {count} one by one + {burst} at once"
    ));
    let pki = Arc::new(BenchPki::new()?);
    let off = Common {
        mtls: None,
        ..common.clone()
    };
    let on = Common {
        mtls: Some(Arc::clone(&pki)),
        ..common.clone()
    };

    let alloc_off = benches::alloc_phase(&off, clients, cidr)
        .await
        .context("alloc, plaintext")?;
    let alloc_on = benches::alloc_phase(&on, clients, cidr)
        .await
        .context("alloc, mTLS")?;
    report::throughput_header("c");
    for (name, phase) in [("plaintext", &alloc_off), ("mTLS", &alloc_on)] {
        report::throughput_row(
            &clients.to_string(),
            name,
            phase.ops_per_sec,
            &phase.latency,
            phase.errors,
            &phase.cpu,
        );
        if let Some(e) = &phase.first_error {
            println!("        first Allocate error: {e}");
        }
    }
    let alloc_throughput_ratio = ratio(alloc_on.ops_per_sec, alloc_off.ops_per_sec);
    let alloc_p99_ratio = ratio(alloc_on.latency.p99_ms, alloc_off.latency.p99_ms);
    println!(
        "  alloc: throughput mTLS/plaintext {alloc_throughput_ratio:.3}, p99 mTLS/plaintext {alloc_p99_ratio:.3}"
    );

    let e2e_off = pipeline::e2e(&off, count, burst)
        .await
        .context("e2e, plaintext")?
        .allocate;
    let e2e_on = pipeline::e2e(&on, count, burst)
        .await
        .context("e2e, mTLS")?
        .allocate;
    let e2e_throughput_ratio = ratio(e2e_off.one_by_one.mean_ms, e2e_on.one_by_one.mean_ms);
    let e2e_p99_ratio = ratio(e2e_on.one_by_one.p99_ms, e2e_off.one_by_one.p99_ms);
    let e2e_burst_ratio = ratio(e2e_off.burst_ms, e2e_on.burst_ms);
    println!();
    println!(
        "  e2e one by one: mean {:.2} ms plaintext, {:.2} ms mTLS (throughput mTLS/plaintext {e2e_throughput_ratio:.3}); p99 {:.2} ms plaintext, {:.2} ms mTLS (mTLS/plaintext {e2e_p99_ratio:.3})",
        e2e_off.one_by_one.mean_ms,
        e2e_on.one_by_one.mean_ms,
        e2e_off.one_by_one.p99_ms,
        e2e_on.one_by_one.p99_ms
    );
    println!(
        "  e2e burst of {burst}: {:.1} ms plaintext, {:.1} ms mTLS (throughput mTLS/plaintext {e2e_burst_ratio:.3})",
        e2e_off.burst_ms, e2e_on.burst_ms
    );
    for (name, phases) in [("plaintext", &e2e_off), ("mTLS", &e2e_on)] {
        if let Some(e) = &phases.first_error {
            println!("  e2e {name}: {} errors, first: {e}", phases.errors);
        }
    }

    let throughput = |name: &str, r: f64| {
        Target::new(
            name,
            format!("{r:.3}x"),
            format!(">= {MIN_THROUGHPUT_RATIO}x"),
            r >= MIN_THROUGHPUT_RATIO,
        )
    };
    let clean = |name: &str, off: u64, on: u64| {
        Target::new(
            name,
            format!("{off} plaintext, {on} mTLS"),
            "0".into(),
            off == 0 && on == 0,
        )
    };
    let targets = vec![
        throughput("alloc throughput mTLS/plaintext", alloc_throughput_ratio),
        throughput("e2e throughput mTLS/plaintext", e2e_throughput_ratio),
        throughput("e2e burst mTLS/plaintext", e2e_burst_ratio),
        clean("alloc errors", alloc_off.errors, alloc_on.errors),
        clean("e2e errors", e2e_off.errors, e2e_on.errors),
    ];
    report::print_targets(&targets);
    Ok(TlsReport {
        alloc_off,
        alloc_on,
        alloc_throughput_ratio,
        alloc_p99_ratio,
        e2e_off,
        e2e_on,
        e2e_throughput_ratio,
        e2e_p99_ratio,
        e2e_burst_ratio,
        targets,
    })
}
