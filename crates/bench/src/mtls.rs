//! `herald-bench tls`: what mutual TLS costs. `alloc` at one client count and the `e2e`
//! pipeline each run plaintext and over mutual TLS (herald-ipam requiring client
//! certificates, the bench's clients and both route speakers presenting theirs) in rounds
//! that alternate which side goes first ([`crate::rounds`] says why), and the ratios of
//! each side's median printed. The certificates are made for the run by a throwaway CA.

use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use herald_test_support::pki::TestCa;
use herald_tls::{Reloading, TlsFiles};
use serde::Serialize;

use crate::benches::{Common, PhaseResult};
use crate::pipeline::E2ePhases;
use crate::report::{self, Target};
use crate::rounds::{self, Comparison, Sides, Workload};

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
    #[serde(flatten)]
    pub comparison: Comparison,
    pub targets: Vec<Target>,
}

pub async fn tls_overhead(
    common: &Common,
    work: Workload<'_>,
    rounds: usize,
) -> anyhow::Result<TlsReport> {
    let rounds = rounds.max(1);
    common.print_header(&format!(
        "tls: plaintext vs mutual TLS 1.3 (client certificates, per-identity authorization), same run, {rounds} rounds alternating which goes first; alloc c={}, e2e {} one by one + {} bursts of {}",
        work.clients, work.count, work.bursts, work.burst
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
    let sides = Sides {
        off: &off,
        on: &on,
        off_label: "plaintext",
        on_label: "mTLS",
    };
    let comparison = rounds::compare(&sides, work, rounds).await?;

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
    let c = &comparison;
    let alloc_errors = |phases: &[PhaseResult]| phases.iter().map(|p| p.errors).sum::<u64>();
    let e2e_errors = |phases: &[E2ePhases]| phases.iter().map(|p| p.errors).sum::<u64>();
    let targets = vec![
        throughput("alloc throughput mTLS/plaintext", c.alloc_throughput_ratio),
        throughput("e2e throughput mTLS/plaintext", c.e2e_throughput_ratio),
        throughput("e2e burst mTLS/plaintext", c.e2e_burst_ratio),
        clean(
            "alloc errors",
            alloc_errors(&c.alloc_off),
            alloc_errors(&c.alloc_on),
        ),
        clean("e2e errors", e2e_errors(&c.e2e_off), e2e_errors(&c.e2e_on)),
    ];
    report::print_targets(&targets);
    Ok(TlsReport {
        comparison,
        targets,
    })
}
