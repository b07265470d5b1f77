//! GoBGP as the *speaker*: the comparator for the `advertise` and `withdraw` benchmarks.
//!
//! [`GobgpSpeaker::add_routes`] and [`GobgpSpeaker::delete_routes`] use GoBGP's own bulk
//! API, `AddPathStream`, with [`API_BATCH`] paths per request (withdrawals are paths with
//! the withdraw flag). GoBGP handles each request as one batch and packs its paths into
//! few UPDATEs, so this is as fast as GoBGP goes. The alternatives measured here:
//! - `gobgp global rib add` per prefix: one process and one RPC each, ~7 ms per prefix
//!   (over a minute for 10k, ~12 minutes for 100k).
//! - `gobgp mrt inject global` fed a generated `TABLE_DUMP_V2` stream
//!   ([`GobgpSpeaker::inject`]): the CLI streams one path per request, so GoBGP sends one
//!   UPDATE per prefix (10,000 UPDATEs for 10k /32s) and tops out around 10k prefixes/s;
//!   Debian's 3.10 CLI also drops the paths still in flight when it reaches the end of
//!   its input. Kept for comparison, not used by the benchmark.
//!
//! IPv6 ([`GobgpSpeaker::add_routes_v6`]) goes through `gobgp global rib add` per prefix:
//! functional tests only.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::io::AsyncWriteExt;

use crate::gobgp::{self, Client};
use crate::gobgp_api;
use crate::mrt::{MrtRoute, encode_table_dump};
use crate::process::{self, Daemon};
use crate::{DEFAULT_HOLD_TIME, Family, NODE_ASN, START_TIMEOUT, TOR_ASN, bins};

/// Paths per `AddPathStream` request: GoBGP handles one request as one batch and packs
/// its paths into UPDATEs, so bigger is faster until the request size (~100 bytes per
/// path) nears gRPC's 4 MB default limit.
pub const API_BATCH: usize = 10_000;

/// Bound on one bulk injection (writing the stream and GoBGP taking every path); 100k
/// paths take about 2 s here.
const INJECT_TIMEOUT: Duration = Duration::from_secs(120);
/// An injection whose RIB count has not grown for this long has failed.
const INJECT_STALL: Duration = Duration::from_secs(10);
/// How often a background injection checks GoBGP's RIB size: each check is one CLI
/// process (~10 ms of CPU), so polling faster would steal CPU from the gobgpd under test.
pub const SETTLE_POLL: Duration = Duration::from_millis(200);

/// How one GoBGP speaker peers with a ToR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GobgpSpeakerConfig {
    /// The speaker's AS (default [`NODE_ASN`]).
    pub local_asn: u32,
    /// The ToR's AS (default [`TOR_ASN`]).
    pub peer_asn: u32,
    /// BGP identifier (default: `source_addr`).
    pub router_id: Ipv4Addr,
    /// Source address of the session; must be loopback (default 127.0.0.20).
    pub source_addr: Ipv4Addr,
    /// The ToR's address (default 127.0.0.1).
    pub peer_addr: Ipv4Addr,
    /// The ToR's BGP port.
    pub peer_port: u16,
    /// Hold time offered (seconds).
    pub hold_time: u16,
    /// Also negotiate IPv6 unicast.
    pub ipv6: bool,
    /// Graceful restart with this restart time (seconds).
    pub graceful_restart: Option<u16>,
    /// TCP-MD5 password for the session.
    pub md5_password: Option<String>,
}

impl GobgpSpeakerConfig {
    /// AS 65010 from 127.0.0.20 to the ToR at 127.0.0.1:`peer_port`.
    pub fn new(peer_port: u16) -> GobgpSpeakerConfig {
        let source = Ipv4Addr::new(127, 0, 0, 20);
        GobgpSpeakerConfig {
            local_asn: NODE_ASN,
            peer_asn: TOR_ASN,
            router_id: source,
            source_addr: source,
            peer_addr: Ipv4Addr::LOCALHOST,
            peer_port,
            hold_time: DEFAULT_HOLD_TIME,
            ipv6: false,
            graceful_restart: None,
            md5_password: None,
        }
    }

    fn render(&self) -> String {
        let mut toml = String::new();
        // port = -1: the speaker never listens; it connects actively to the ToR.
        let _ = writeln!(
            toml,
            "[global.config]\n  as = {}\n  router-id = \"{}\"\n  port = -1",
            self.local_asn, self.router_id
        );
        let _ = writeln!(
            toml,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}",
            self.peer_addr, self.peer_asn
        );
        if let Some(password) = &self.md5_password {
            let _ = writeln!(toml, "    auth-password = \"{password}\"");
        }
        // connect-retry and idle-hold 1 s: reconnect quickly after a reset (GoBGP still
        // waits 5-10 s before its first attempt).
        let _ = writeln!(
            toml,
            "  [neighbors.transport.config]\n    local-address = \"{}\"\n    \
             remote-port = {}\n  [neighbors.timers.config]\n    connect-retry = 1\n    \
             hold-time = {}\n    keepalive-interval = {}\n    \
             minimum-advertisement-interval = 0\n    idle-hold-time-after-reset = 1",
            self.source_addr,
            self.peer_port,
            self.hold_time,
            (self.hold_time / 3).max(1)
        );
        if let Some(time) = self.graceful_restart {
            let _ = writeln!(
                toml,
                "  [neighbors.graceful-restart.config]\n    enabled = true\n    \
                 restart-time = {time}"
            );
        }
        let mut families = vec!["ipv4-unicast"];
        if self.ipv6 {
            families.push("ipv6-unicast");
        }
        for family in families {
            let _ = writeln!(
                toml,
                "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      \
                 afi-safi-name = \"{family}\""
            );
            if self.graceful_restart.is_some() {
                toml.push_str(
                    "    [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n",
                );
            }
        }
        toml
    }
}

/// A running `gobgpd` that announces routes to one ToR through GoBGP's API.
#[derive(Debug)]
pub struct GobgpSpeaker {
    config: GobgpSpeakerConfig,
    client: Client,
    api: gobgp_api::Api,
    added_v4: Mutex<BTreeSet<Ipv4Net>>,
    added_v6: Mutex<BTreeSet<Ipv6Net>>,
    files: AtomicU32,
    /// Background injections not yet confirmed in GoBGP's RIB.
    pending: Mutex<Vec<tokio::task::JoinHandle<Result<()>>>>,
    // The daemon is killed before its directory is removed.
    daemon: Daemon,
    dir: tempfile::TempDir,
}

impl GobgpSpeaker {
    /// Starts the speaker and waits until its API answers (not until the session is up:
    /// GoBGP waits a random 5–10 s before its first connect; see
    /// [`GobgpSpeaker::wait_established`]).
    pub async fn start(config: GobgpSpeakerConfig) -> Result<GobgpSpeaker> {
        if !config.source_addr.is_loopback() || !config.peer_addr.is_loopback() {
            bail!("the GoBGP speaker only runs between loopback addresses");
        }
        let program = bins::GOBGPD.resolve()?;
        let dir = process::work_dir("herald-gobgp-speaker-")?;
        let api_port = process::free_port()?;
        let client = Client::new(api_port)?;
        std::fs::write(dir.path().join("speaker.toml"), config.render())
            .context("writing speaker.toml")?;
        let args: Vec<String> = [
            "-f",
            "speaker.toml",
            "-t",
            "toml",
            "-p",
            "--api-hosts",
            &format!("127.0.0.1:{api_port}"),
            "--pprof-disable",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let mut daemon = Daemon::spawn("gobgpd-speaker", &program, &args, dir.path())?;
        let start = Instant::now();
        loop {
            if let Some(status) = daemon.exited() {
                bail!(
                    "GoBGP speaker exited during start-up ({status}):\n{}",
                    daemon.log_tail()
                );
            }
            if client.ping().await.is_ok() {
                break;
            }
            if start.elapsed() >= START_TIMEOUT {
                bail!(
                    "GoBGP speaker API did not answer within {START_TIMEOUT:?}:\n{}",
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let api = gobgp_api::Api::connect(api_port).await?;
        Ok(GobgpSpeaker {
            config,
            client,
            api,
            added_v4: Mutex::new(BTreeSet::new()),
            added_v6: Mutex::new(BTreeSet::new()),
            files: AtomicU32::new(0),
            pending: Mutex::new(Vec::new()),
            daemon,
            dir,
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &GobgpSpeakerConfig {
        &self.config
    }

    /// The daemon's PID (for CPU/RSS measurements).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// True when the session to the ToR is Established.
    pub async fn established(&self) -> Result<bool> {
        let neighbors = gobgp::parse_neighbors(&self.client.run(&["-j", "neighbor"]).await?)?;
        Ok(neighbors.iter().any(|n| n.established))
    }

    /// Waits (bounded) until the session to the ToR is Established.
    pub async fn wait_established(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.established().await? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "GoBGP speaker {} did not reach Established with {}:{} within {timeout:?}:\n{}",
                    self.config.source_addr,
                    self.config.peer_addr,
                    self.config.peer_port,
                    self.daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Announces `prefixes` with `next_hop` through one `AddPathStream` call; returns when
    /// GoBGP has taken them all into its RIB (not when the ToR has them).
    ///
    /// A GoBGP ToR drops IPv4 routes whose next hop is in 127.0.0.0/8; use a non-loopback
    /// next hop (e.g. 192.0.2.x) towards it.
    pub async fn add_routes(&self, prefixes: &[Ipv4Net], next_hop: Ipv4Addr) -> Result<()> {
        self.settle().await?;
        let paths = prefixes
            .iter()
            .map(|prefix| gobgp_api::ipv4_path(*prefix, next_hop, false))
            .collect();
        self.api.add_path_stream(paths, API_BATCH).await?;
        lock(&self.added_v4).extend(prefixes.iter().copied());
        Ok(())
    }

    /// Announces IPv6 `prefixes` (MP_REACH_NLRI) with `next_hop`; needs
    /// [`GobgpSpeakerConfig::ipv6`]. One `gobgp global rib add` per prefix: the 3.10 CLI
    /// cannot inject IPv6 from MRT (it rejects `RIB_IPV6_UNICAST` records), so this path
    /// is for functional tests, not benchmarks.
    pub async fn add_routes_v6(&self, prefixes: &[Ipv6Net], next_hop: Ipv6Addr) -> Result<()> {
        let hop = next_hop.to_string();
        for prefix in prefixes {
            let prefix_arg = prefix.to_string();
            self.client
                .run(&[
                    "global",
                    "rib",
                    "-a",
                    "ipv6",
                    "add",
                    &prefix_arg,
                    "nexthop",
                    &hop,
                ])
                .await
                .with_context(|| format!("gobgp global rib add {prefix}"))?;
            lock(&self.added_v6).insert(*prefix);
        }
        Ok(())
    }

    /// Injects arbitrary routes (with MED and communities) through one MRT stream and
    /// returns once the whole stream is written to the `gobgp` CLI, which forwards it over
    /// gRPC as it reads. [`GobgpSpeaker::settle`] waits until GoBGP's RIB has all of it.
    ///
    /// Debian's `gobgp` 3.10 CLI exits as soon as it reaches the end of its input file and
    /// loses the paths still in flight (measured: 300–600 of 1,000 lost). So the file is a
    /// FIFO that a background task keeps open until GoBGP's own RIB counts every injected
    /// prefix (checked every [`SETTLE_POLL`], cheap enough not to slow GoBGP down), and only
    /// then closes so the CLI exits with nothing in flight.
    ///
    /// IPv4 only: Debian's GoBGP 3.10 CLI skips `RIB_IPV6_UNICAST` records.
    pub async fn inject(&self, routes: &[MrtRoute]) -> Result<()> {
        if routes.is_empty() {
            return Ok(());
        }
        if let Some(route) = routes.iter().find(|r| r.prefix.addr().is_ipv6()) {
            bail!(
                "GoBGP 3.10 cannot inject IPv6 routes from MRT ({}); use add_routes_v6",
                route.prefix
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        let bytes = encode_table_dump(routes, now, self.config.router_id);
        // GoBGP's RIB counts destinations: what we announced before plus the new prefixes.
        let expected = {
            let mut all = lock(&self.added_v4);
            all.extend(routes.iter().filter_map(|route| match route.prefix {
                IpNet::V4(net) => Some(net),
                IpNet::V6(_) => None,
            }));
            all.len()
        };

        let fifo = self.mrt_path();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .context("creating the MRT FIFO")?;
        // Opened read-write so opening never blocks and the CLI sees EOF only when we drop it.
        let mut sender = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&fifo)
            .context("opening the MRT FIFO")?;
        let fifo_arg = fifo.display().to_string();
        let mut cli = tokio::process::Command::new(self.client.cli())
            .args(self.client.base_args())
            .args(["mrt", "inject", "global", &fifo_arg])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning gobgp mrt inject")?;
        let written = tokio::time::timeout(INJECT_TIMEOUT, sender.write_all(&bytes)).await;
        if let Err(error) = written
            .context("writing the MRT stream timed out")
            .and_then(|result| result.context("writing the MRT stream"))
        {
            let _ = std::fs::remove_file(&fifo);
            return Err(error);
        }

        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let result = wait_for_rib(&client, &mut cli, expected).await;
            drop(sender);
            let exit = tokio::time::timeout(Duration::from_secs(10), cli.wait_with_output()).await;
            let _ = std::fs::remove_file(&fifo);
            result?;
            match exit {
                Ok(Ok(output)) if output.status.success() => Ok(()),
                Ok(Ok(output)) => bail!(
                    "gobgp mrt inject failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                Ok(Err(error)) => Err(error).context("waiting for gobgp mrt inject"),
                Err(_) => bail!("gobgp mrt inject did not exit after its input closed"),
            }
        });
        lock(&self.pending).push(task);
        Ok(())
    }

    /// Waits until every injection so far is in GoBGP's RIB and its CLI has exited;
    /// returns the first failure. Withdrawals call it first, so nothing arrives after them.
    pub async fn settle(&self) -> Result<()> {
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.pending));
        let mut first_error = None;
        for task in tasks {
            let outcome = match task.await {
                Ok(result) => result,
                Err(join) => Err(anyhow::anyhow!("injection task failed: {join}")),
            };
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn mrt_path(&self) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("inject-{n}.mrt"))
    }

    /// Withdraws `prefixes` through one `AddPathStream` call (paths with the withdraw
    /// flag); returns when GoBGP has processed them.
    pub async fn delete_routes(&self, prefixes: &[Ipv4Net]) -> Result<()> {
        self.settle().await?;
        let paths = prefixes
            .iter()
            .map(|prefix| gobgp_api::ipv4_path(*prefix, Ipv4Addr::UNSPECIFIED, true))
            .collect();
        self.api.add_path_stream(paths, API_BATCH).await?;
        let mut added = lock(&self.added_v4);
        for prefix in prefixes {
            added.remove(prefix);
        }
        Ok(())
    }

    /// Withdraws every route of `family` this speaker announced: `gobgp global rib del all`,
    /// one `DeletePath` call.
    pub async fn delete_all(&self, family: Family) -> Result<()> {
        self.settle().await?;
        self.client
            .run(&[
                "global",
                "rib",
                "-a",
                gobgp::family_arg(family),
                "del",
                "all",
            ])
            .await
            .context("gobgp global rib del all")?;
        match family {
            Family::Ipv4 => lock(&self.added_v4).clear(),
            Family::Ipv6 => lock(&self.added_v6).clear(),
        }
        Ok(())
    }

    /// Stops gobgpd with SIGTERM (it sends a Cease NOTIFICATION), then SIGKILL.
    pub async fn stop(mut self) {
        self.daemon.stop().await;
    }

    /// Freezes gobgpd (SIGSTOP): its TCP session stays open but it sends nothing, so the
    /// ToR notices only when its hold timer expires, as with a node that hangs or a link
    /// that silently drops everything.
    pub fn freeze(&self) {
        self.daemon.freeze(true);
    }

    /// Resumes a frozen gobgpd (SIGCONT).
    pub fn thaw(&self) {
        self.daemon.freeze(false);
    }

    /// Kills gobgpd with SIGKILL: the session dies without a NOTIFICATION, as when a node
    /// crashes (the `withdraw` benchmark's "kill -9 a speaker").
    pub fn kill(mut self) {
        self.daemon.kill_now();
    }
}

/// Polls GoBGP's RIB size until it reaches `expected`; fails when the CLI exits first,
/// when the count stops growing, or after [`INJECT_TIMEOUT`].
async fn wait_for_rib(
    client: &Client,
    cli: &mut tokio::process::Child,
    expected: usize,
) -> Result<()> {
    let start = Instant::now();
    let mut progress = (0, Instant::now());
    loop {
        let count = rib_size(client, Family::Ipv4).await?;
        if count >= expected {
            return Ok(());
        }
        if count != progress.0 {
            progress = (count, Instant::now());
        } else if progress.1.elapsed() >= INJECT_STALL {
            bail!("GoBGP's RIB stopped growing at {count} of {expected} paths");
        }
        if let Some(status) = cli.try_wait()? {
            bail!("gobgp mrt inject exited early ({status}) with {count} of {expected} paths");
        }
        if start.elapsed() >= INJECT_TIMEOUT {
            bail!("GoBGP took only {count} of {expected} paths within {INJECT_TIMEOUT:?}");
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Number of destinations in GoBGP's own global RIB for `family`.
async fn rib_size(client: &Client, family: Family) -> Result<usize> {
    let text = client
        .run(&[
            "-j",
            "global",
            "rib",
            "summary",
            "-a",
            gobgp::family_arg(family),
        ])
        .await?;
    gobgp::parse_count(&text)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_config_connects_from_its_source_and_never_listens() {
        let mut config = GobgpSpeakerConfig::new(20179);
        config.graceful_restart = Some(30);
        let toml = config.render();
        assert!(toml.contains("port = -1"));
        assert!(toml.contains("local-address = \"127.0.0.20\""));
        assert!(toml.contains("remote-port = 20179"));
        assert!(toml.contains("restart-time = 30"));
        assert!(!toml.contains("zebra"));
    }
}
