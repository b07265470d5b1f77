//! Real BGP routers as "top-of-rack" test peers, on loopback.
//!
//! This crate starts GoBGP (`gobgpd`), BIRD 2 (`bird`) or FRR (`bgpd` alone) from their Debian
//! packages as a ToR that accepts dynamic eBGP neighbors from `127.0.0.0/24`, and reads back
//! what the router actually received: its RIB ([`Tor::routes`]) and its sessions
//! ([`Tor::neighbors`]). Integration tests and benchmarks of Herald's BGP engine assert
//! against that, so "the route is announced" means "a real router holds it".
//!
//! It also provides [`GobgpSpeaker`], a second `gobgpd` acting as the *speaker*, which is the
//! comparator in the `advertise` and `withdraw` benchmarks.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use herald_tor_harness::{Family, Tor, TorConfig, TorKind};
//! let tor = Tor::start(TorConfig::new(TorKind::Bird)).await?;
//! // ... point a speaker at 127.0.0.1:tor.bgp_port() from 127.0.0.10 ...
//! let routes = tor
//!     .wait_until(Family::Ipv4, std::time::Duration::from_secs(5), |rib| rib.len() == 1)
//!     .await?;
//! assert_eq!(routes.values().next().map(Vec::len), Some(1));
//! tor.stop().await;
//! # Ok(()) }
//! ```
//!
//! # Safety rules the harness enforces
//! - Every daemon binds only to a loopback address (checked in [`TorConfig::validate`]) on a
//!   free port picked by binding `127.0.0.1:0`; nothing ever uses port 179.
//! - No kernel routes: GoBGP has no zebra section, BIRD has no `protocol kernel`, FRR's bgpd
//!   runs alone with `-Z -n`.
//! - Daemons run as `nobody` (through `setpriv`) when the harness runs as root, otherwise as
//!   the current user. Set `HERALD_TOR_AS_ROOT=1` to skip the drop.
//! - Each [`Tor`] has its own temp dir and ports, so tests run in parallel; dropping it (also
//!   during a panic) kills the daemon by the PID it started and removes the dir.
//!
//! # What the routers do (verified with GoBGP 3.10, BIRD 2.0.12, FRR 8.4 from Debian 13)
//! Each point is pinned by a test in `tests/`, so a package upgrade that changes it fails.
//!
//! Next hops:
//! - GoBGP 3.10 treats an UPDATE whose classic `NEXT_HOP` is in 127.0.0.0/8 as a withdraw
//!   ("invalid nexthop address"). It does not check next hops of IPv4 NLRI carried in
//!   `MP_REACH_NLRI`, which is what Herald's engine sends when the peer offers the
//!   IPv4-unicast MP capability. Tests announcing classic NLRI to GoBGP use 192.0.2.x
//!   (TEST-NET-1): only an attribute, nothing is routed.
//! - BIRD keeps 127.x next hops but shows the routes as `unreachable` (it ignores loopback
//!   interfaces); they are in the table, best-selected, with all their attributes, and BIRD
//!   fills in LOCAL_PREF 100 on eBGP routes.
//! - FRR needs `bgp allow-martian-nexthop` (set here) or it resets the session on a 127.x
//!   next hop.
//! - IPv6 /128 over an IPv4 session (MP_REACH_NLRI): next hop `::1` is accepted by GoBGP
//!   and BIRD and silently dropped by FRR; an IPv4-mapped one (`::ffff:127.0.0.20`) is
//!   accepted by GoBGP and FRR and treated as a withdraw by BIRD; a global address
//!   (`2001:db8::20`) is accepted by all three, so use that (`tests/ipv6.rs`).
//!
//! Sessions:
//! - ECMP: all three keep one path per neighbor for the same prefix (`tests/ecmp.rs`).
//! - A killed speaker (the kernel closes its TCP connection) loses its routes at once; a
//!   frozen one, or a link that goes silent ([`TcpRelay::blackhole`]), when the ToR's hold
//!   timer expires (`tests/session_loss.rs`).
//! - Graceful restart: all three keep a restarting neighbor's routes and replace them when
//!   it comes back; GoBGP and FRR mark them stale ([`TorPath::stale`]), BIRD's text output
//!   does not show it. A speaker that reconnects with an empty table and sends End-of-RIB
//!   makes all three drop the stale routes at once.
//! - TCP-MD5 on the neighbor range: BIRD and FRR enforce it; GoBGP 3.10 ignores
//!   `auth-password` for dynamic neighbors, so [`TorConfig::validate`] refuses it.
//! - FRR and Herald's engine negotiate extended messages (RFC 8654): 10k /32s fit in one
//!   UPDATE there; GoBGP and BIRD take 4096-byte UPDATEs.
//!
//! Queries:
//! - A full dump of 10k routes takes ~0.1 s on BIRD, ~0.4 s on FRR (`json detail`) and
//!   ~0.5 s on GoBGP, but tens of seconds on GoBGP when the routes came in `MP_REACH_NLRI`:
//!   every path then carries the UPDATE's whole NLRI list through the gRPC API. So wait for
//!   bulk convergence with [`Tor::wait_for_count`] (a summary query of a few ms) and read
//!   content back with [`Tor::routes_for`].
//! - Dynamic neighbors appear in [`Tor::neighbors`] once they connected (BIRD names their
//!   protocols `node1`, `node2`, ...) and stay listed, not established, right after their
//!   session drops (state `Active` on all three).
//!
//! Running as `nobody` works for all three: gobgpd and bird need nothing special; FRR's
//! bgpd is started with `-S` (skip its own user switch) and writes its pid file and vty
//! socket into the temp dir.
//!
//! # The GoBGP speaker (benchmark comparator)
//! [`GobgpSpeaker::add_routes`] and [`GobgpSpeaker::delete_routes`] call GoBGP's bulk gRPC
//! API, `AddPathStream`, with [`API_BATCH`] paths per request (a small client of our own,
//! `gobgp_api`). Measured on the 2-core machine, GoBGP speaker → GoBGP ToR: 10k /32s at the
//! ToR in ~0.5 s, 100k in ~12 s; withdrawing them ~0.4 s / ~10 s. The limit is GoBGP
//! itself: 3.10 sends one UPDATE per locally originated prefix (10,000 UPDATEs for 10k,
//! whichever way the paths come in), so feeding it faster changes nothing. The CLI
//! alternatives are slower: `gobgp global rib add` costs ~7 ms per prefix, and
//! `gobgp mrt inject` ([`GobgpSpeaker::inject`], kept and tested) reaches ~10k/s. Run the
//! comparator alone with `cargo run --release -p herald-tor-harness --example
//! gobgp_comparator -- 10000 100000`.
//!
//! # Testing a silent link
//! [`TcpRelay`] sits between a speaker and the ToR and can stop moving bytes while both
//! TCP connections stay open, so hold-timer expiry can be tested with an in-process speaker
//! (Herald's engine) that cannot be frozen like a daemon ([`GobgpSpeaker::freeze`]).

mod bird;
mod frr;
mod gobgp;
mod gobgp_api;
pub mod mrt;
mod process;
mod relay;
mod speaker;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net};

pub use relay::TcpRelay;
pub use speaker::{API_BATCH, GobgpSpeaker, GobgpSpeakerConfig, SETTLE_POLL};

use process::{Binary, Daemon};

/// The ToR's AS number in the test topology.
pub const TOR_ASN: u32 = 65001;
/// The nodes' (speakers') AS number in the test topology.
pub const NODE_ASN: u32 = 65010;
/// Hold time the ToR offers: short, so session-loss tests finish quickly, but three
/// keepalives long so a loaded 2-core machine does not flap sessions.
pub const DEFAULT_HOLD_TIME: u16 = 9;
/// How long [`Tor::start`] waits for the daemon to answer queries and listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls in [`Tor::wait_until`]; a poll itself takes 5–300 ms.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Which router implementation plays the ToR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorKind {
    /// GoBGP 3.10 (`gobgpd` + `gobgp`, Debian packages `gobgpd`, `gobgp`).
    Gobgp,
    /// BIRD 2.0.12 (`bird` + `birdc`, Debian package `bird2`).
    Bird,
    /// FRR 8.4 `bgpd` without zebra (`vtysh` for queries, Debian package `frr`).
    Frr,
}

impl TorKind {
    /// All three kinds, for tests that run against each.
    pub const ALL: [TorKind; 3] = [TorKind::Gobgp, TorKind::Bird, TorKind::Frr];
}

impl fmt::Display for TorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TorKind::Gobgp => "gobgp",
            TorKind::Bird => "bird",
            TorKind::Frr => "frr",
        })
    }
}

/// Address family of a RIB query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 unicast.
    Ipv4,
    /// IPv6 unicast. Requires [`TorConfig::ipv6`]. Sessions still run over IPv4 127.x; the
    /// routes travel in MP_REACH_NLRI. Next hop `::1` is accepted by GoBGP and BIRD, not by
    /// FRR; an IPv4-mapped next hop is accepted by GoBGP and FRR, not by BIRD.
    Ipv6,
}

/// How to run one ToR. Start from [`TorConfig::new`] and change fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorConfig {
    /// Which router to run.
    pub kind: TorKind,
    /// The ToR's AS (default [`TOR_ASN`]).
    pub local_asn: u32,
    /// The AS every dynamic neighbor must have (default [`NODE_ASN`]).
    pub peer_asn: u32,
    /// BGP identifier (default: `listen_addr`).
    pub router_id: Ipv4Addr,
    /// Address the BGP listener binds to; must be loopback (default 127.0.0.1).
    pub listen_addr: Ipv4Addr,
    /// Source addresses accepted as dynamic neighbors; must be inside 127.0.0.0/8
    /// (default 127.0.0.0/24).
    pub neighbor_range: Ipv4Net,
    /// Also negotiate IPv6 unicast (MP-BGP) with the neighbors.
    pub ipv6: bool,
    /// Graceful restart (RFC 4724) with this restart time in seconds; the ToR acts as
    /// helper and keeps a restarting neighbor's routes (marked stale) for the time the
    /// neighbor advertised. `None` disables it.
    pub graceful_restart: Option<u16>,
    /// Hold time the ToR offers, in seconds (keepalive is a third of it).
    pub hold_time: u16,
    /// TCP-MD5 (RFC 2385) password required from the neighbors. BIRD and FRR enforce it
    /// on the whole neighbor range; GoBGP 3.10 cannot (rejected by [`TorConfig::validate`]).
    pub md5_password: Option<String>,
    /// Re-advertise learned routes to the other neighbors (what a real ToR does). Off by
    /// default so benchmarks measure only the receive path.
    pub export_to_peers: bool,
    /// BGP port; `None` picks a free one.
    pub bgp_port: Option<u16>,
    /// Send capabilities in the OPEN (the default). Off, the ToR is a peer that does not
    /// negotiate MP-BGP: IPv4 only, classic NLRI and NEXT_HOP, 2-octet AS numbers (BIRD
    /// `capabilities off`, FRR `dont-capability-negotiate`; GoBGP cannot).
    pub capabilities: bool,
    /// Run BFD with every neighbor and drop a neighbor's session when BFD goes down.
    /// FRR: `bfdd` (and `zebra`, which relays between bgpd and bfdd) beside `bgpd`,
    /// single-hop; BIRD: `protocol bfd`, multihop (BIRD's loopback peers are multihop).
    /// GoBGP 3.10 has no BFD ([`TorConfig::validate`] refuses it).
    pub bfd: Option<TorBfd>,
}

/// The ToR's BFD timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorBfd {
    /// Transmit and receive interval, milliseconds.
    pub interval_ms: u32,
    pub multiplier: u8,
}

impl Default for TorBfd {
    /// 300 ms × 3, FRR's and BIRD's defaults.
    fn default() -> Self {
        TorBfd {
            interval_ms: 300,
            multiplier: 3,
        }
    }
}

impl TorConfig {
    /// The standard test ToR of this kind: AS 65001 on 127.0.0.1, accepting AS 65010 from
    /// 127.0.0.0/24, IPv4 only, no graceful restart, hold time [`DEFAULT_HOLD_TIME`].
    pub fn new(kind: TorKind) -> TorConfig {
        TorConfig {
            kind,
            local_asn: TOR_ASN,
            peer_asn: NODE_ASN,
            router_id: Ipv4Addr::LOCALHOST,
            listen_addr: Ipv4Addr::LOCALHOST,
            neighbor_range: Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 24)
                .unwrap_or_else(|_| unreachable!("/24 is a valid prefix length")),
            ipv6: false,
            graceful_restart: None,
            hold_time: DEFAULT_HOLD_TIME,
            md5_password: None,
            export_to_peers: false,
            bgp_port: None,
            capabilities: true,
            bfd: None,
        }
    }

    /// Checks the loopback-only rule and values the routers would reject.
    pub fn validate(&self) -> Result<()> {
        let loopback = Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8)?;
        if !self.listen_addr.is_loopback() {
            bail!("listen_addr {} is not a loopback address", self.listen_addr);
        }
        if !loopback.contains(&self.neighbor_range) {
            bail!(
                "neighbor_range {} is not inside 127.0.0.0/8",
                self.neighbor_range
            );
        }
        if self.hold_time != 0 && self.hold_time < 3 {
            bail!(
                "hold_time must be 0 or at least 3 s, not {}",
                self.hold_time
            );
        }
        if self.kind == TorKind::Gobgp && self.md5_password.is_some() {
            bail!(
                "GoBGP 3.10 does not apply auth-password to dynamic neighbors (a speaker with \
                 TCP-MD5 never connects, one without does); use BIRD or FRR for TCP-MD5 tests"
            );
        }
        if self.kind == TorKind::Gobgp && !self.capabilities {
            bail!("GoBGP always sends capabilities; use BIRD or FRR for a peer without them");
        }
        if self.kind == TorKind::Gobgp && self.bfd.is_some() {
            bail!("GoBGP 3.10 has no BFD; use BIRD or FRR for BFD tests");
        }
        if self.bgp_port == Some(179) {
            bail!("port 179 is reserved for real routers; leave bgp_port as None");
        }
        if let Some(password) = &self.md5_password
            && (password.is_empty()
                || password.len() > 80
                || password
                    .chars()
                    .any(|c| c.is_control() || c == '"' || c == '\\'))
        {
            bail!("md5_password must be 1-80 printable characters without quotes or backslashes");
        }
        Ok(())
    }

    /// Keepalive interval derived from the hold time.
    pub(crate) fn keepalive(&self) -> u16 {
        self.hold_time / 3
    }
}

/// One path the ToR holds for a prefix. Several entries for one prefix mean several
/// paths (ECMP candidates), normally one per neighbor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TorPath {
    /// The neighbor (session source address) the path came from.
    pub neighbor: IpAddr,
    /// BGP next hop as the ToR recorded it.
    pub next_hop: Option<IpAddr>,
    /// AS_PATH flattened (AS_SET members included in order).
    pub as_path: Vec<u32>,
    /// MULTI_EXIT_DISC, when present.
    pub med: Option<u32>,
    /// LOCAL_PREF as the ToR shows it. BIRD fills in its default 100 for eBGP routes;
    /// GoBGP and FRR show it only when set.
    pub local_pref: Option<u32>,
    /// Standard communities (RFC 1997) as (AS, value).
    pub communities: Vec<(u16, u16)>,
    /// Large communities (RFC 8092).
    pub large_communities: Vec<(u32, u32, u32)>,
    /// The ToR keeps this path only because its neighbor is restarting gracefully
    /// (RFC 4724): the session went down and the path awaits refresh or End-of-RIB.
    pub stale: bool,
    /// The ToR uses this path: its best path, or (FRR) one of its multipaths. BIRD and
    /// GoBGP mark only the best.
    pub selected: bool,
}

impl TorPath {
    /// A path from `neighbor` with everything else empty; parsers fill it in.
    pub(crate) fn from_neighbor(neighbor: IpAddr) -> TorPath {
        TorPath {
            neighbor,
            next_hop: None,
            as_path: Vec::new(),
            med: None,
            local_pref: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
            stale: false,
            selected: false,
        }
    }
}

/// A RIB snapshot: prefix → the paths the ToR holds for it.
pub type Rib = BTreeMap<IpNet, Vec<TorPath>>;

/// One BGP session as the ToR sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorNeighbor {
    /// The neighbor's address (its session source address).
    pub address: IpAddr,
    /// True when the session is Established.
    pub established: bool,
    /// The RFC 4271 state name as the router reports it (`Established`, `Active`, ...).
    pub state: String,
    /// Prefixes the ToR accepted from this neighbor, over all families.
    pub prefixes_received: u64,
}

/// How to query a running daemon; one variant per router kind.
#[derive(Debug)]
pub(crate) enum Backend {
    Gobgp(gobgp::Client),
    Bird(bird::Client),
    Frr(frr::Client),
}

impl Backend {
    async fn ping(&self) -> Result<()> {
        match self {
            Backend::Gobgp(client) => client.ping().await,
            Backend::Bird(client) => client.ping().await,
            Backend::Frr(client) => client.ping().await,
        }
    }

    async fn routes(&self, family: Family) -> Result<Rib> {
        match self {
            Backend::Gobgp(client) => client.routes(family).await,
            Backend::Bird(client) => client.routes(family).await,
            Backend::Frr(client) => client.routes(family).await,
        }
    }

    async fn routes_for(&self, family: Family, prefixes: &[IpNet]) -> Result<Rib> {
        match self {
            Backend::Gobgp(client) => client.routes_for(family, prefixes).await,
            Backend::Bird(_) | Backend::Frr(_) => {
                let mut rib = self.routes(family).await?;
                let wanted: std::collections::BTreeSet<&IpNet> = prefixes.iter().collect();
                rib.retain(|prefix, _| wanted.contains(prefix));
                Ok(rib)
            }
        }
    }

    async fn route_count(&self, family: Family) -> Result<usize> {
        match self {
            Backend::Gobgp(client) => client.route_count(family).await,
            Backend::Bird(client) => client.route_count(family).await,
            Backend::Frr(client) => client.route_count(family).await,
        }
    }

    async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        match self {
            Backend::Gobgp(client) => client.neighbors().await,
            Backend::Bird(client) => client.neighbors().await,
            Backend::Frr(client) => client.neighbors().await,
        }
    }

    async fn path_sources(&self, family: Family, prefix: IpNet) -> Result<Vec<IpAddr>> {
        match self {
            Backend::Gobgp(client) => client.path_sources(prefix).await,
            Backend::Bird(_) | Backend::Frr(_) => Ok(self
                .routes_for(family, &[prefix])
                .await?
                .remove(&prefix)
                .unwrap_or_default()
                .into_iter()
                .map(|path| path.neighbor)
                .collect()),
        }
    }
}

/// A running ToR daemon. Dropping it kills the daemon (by PID) and removes its temp dir.
#[derive(Debug)]
pub struct Tor {
    config: TorConfig,
    port: u16,
    backend: Backend,
    // Field order matters: the daemons are killed before their directory is removed.
    daemon: Daemon,
    /// Started before `daemon` (FRR's zebra and bfdd), stopped after it.
    helpers: Vec<Daemon>,
    /// Held while BFD runs: the BFD ports are per host, not per test.
    _bfd_lock: Option<std::fs::File>,
    dir: tempfile::TempDir,
}

/// What one start attempt needs to launch a daemon: program, arguments and query client.
pub(crate) struct Launch {
    pub name: &'static str,
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
    pub backend: Backend,
    /// Daemons to start first, in order, each given a moment to create its sockets.
    pub helpers: Vec<Helper>,
    /// Whom the daemon runs as.
    pub user: process::User,
}

/// A daemon the ToR needs beside the router itself.
pub(crate) struct Helper {
    pub name: &'static str,
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
    /// A file the helper creates once it is ready for the next daemon.
    pub ready_file: Option<std::path::PathBuf>,
}

/// The host-wide lock file of the BFD ports: every BFD daemon binds UDP 3784/4784 on the
/// wildcard address, so two at once would take each other's packets.
const BFD_LOCK_FILE: &str = "/tmp/herald-tor-bfd.lock";

impl Tor {
    /// Starts the router in its own temp dir on free ports and waits (at most
    /// [`START_TIMEOUT`]) until it listens on its BGP port and answers queries.
    ///
    /// Fails with a message naming the Debian package when a binary is missing.
    pub async fn start(config: TorConfig) -> Result<Tor> {
        config.validate()?;
        // A free port can be taken by someone else before the daemon binds it; try again
        // with new ports a few times rather than fail a test on that race.
        let mut last_error = None;
        for _attempt in 0..3 {
            match Tor::try_start(&config).await {
                Ok(tor) => return Ok(tor),
                Err(StartError::Fatal(error)) => return Err(error),
                Err(StartError::Retry(error)) => last_error = Some(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no start attempt made"))
            .context(format!("starting {} ToR", config.kind)))
    }

    async fn try_start(config: &TorConfig) -> Result<Tor, StartError> {
        let dir = process::work_dir(&format!("herald-tor-{}-", config.kind))
            .map_err(StartError::Fatal)?;
        let port = match config.bgp_port {
            Some(port) => port,
            None => process::free_port().map_err(StartError::Fatal)?,
        };
        let launch = match config.kind {
            TorKind::Gobgp => gobgp::prepare(config, port, dir.path()),
            TorKind::Bird => bird::prepare(config, port, dir.path()),
            TorKind::Frr => frr::prepare(config, port, dir.path()),
        }
        .map_err(StartError::Fatal)?;
        let bfd_lock = match config.bfd {
            Some(_) => Some(bfd_lock().await.map_err(StartError::Fatal)?),
            None => None,
        };
        let mut helpers = Vec::new();
        for h in &launch.helpers {
            let d = Daemon::spawn_with(h.name, &h.program, &h.args, dir.path(), process::User::Own)
                .map_err(StartError::Fatal)?;
            helpers.push(d);
            if let Some(ready) = &h.ready_file {
                let start = Instant::now();
                while !ready.exists() && start.elapsed() < START_TIMEOUT {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let mut daemon = Daemon::spawn_with(
            launch.name,
            &launch.program,
            &launch.args,
            dir.path(),
            launch.user,
        )
        .map_err(StartError::Fatal)?;
        let tor = wait_ready(&mut daemon, &launch.backend, port, config.kind).await;
        match tor {
            Ok(()) => {
                tracing::info!(
                    tor = %config.kind,
                    port,
                    pid = daemon.pid(),
                    dir = %dir.path().display(),
                    "ToR ready"
                );
                Ok(Tor {
                    config: config.clone(),
                    port,
                    backend: launch.backend,
                    daemon,
                    helpers,
                    _bfd_lock: bfd_lock,
                    dir,
                })
            }
            Err(error) => {
                let log = daemon.log_tail();
                daemon.kill_now();
                let in_use = log.contains("in use") || log.contains("EADDRINUSE");
                let error = error.context(format!("{} log:\n{log}", config.kind));
                if in_use && config.bgp_port.is_none() {
                    Err(StartError::Retry(error))
                } else {
                    Err(StartError::Fatal(error))
                }
            }
        }
    }

    /// The TCP port the ToR listens on for BGP (on [`TorConfig::listen_addr`]).
    pub fn bgp_port(&self) -> u16 {
        self.port
    }

    /// Which router this is.
    pub fn kind(&self) -> TorKind {
        self.config.kind
    }

    /// The configuration it was started with (with the chosen port in `bgp_port`).
    pub fn config(&self) -> &TorConfig {
        &self.config
    }

    /// The daemon's working directory (config, logs, control sockets).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// The daemon's PID.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// The ToR's current RIB for `family`: every prefix with every path it holds.
    pub async fn routes(&self, family: Family) -> Result<Rib> {
        if family == Family::Ipv6 && !self.config.ipv6 {
            bail!("this ToR was started without ipv6; set TorConfig::ipv6");
        }
        self.backend
            .routes(family)
            .await
            .with_context(|| format!("reading {} RIB ({family:?})", self.config.kind))
    }

    /// The paths the ToR holds for just these prefixes (absent ones are left out).
    ///
    /// On GoBGP this asks per prefix (~10 ms each), which stays fast when the full table
    /// is slow to dump (see [`Tor::route_count`]); on BIRD and FRR it filters a full dump.
    pub async fn routes_for(&self, family: Family, prefixes: &[IpNet]) -> Result<Rib> {
        if family == Family::Ipv6 && !self.config.ipv6 {
            bail!("this ToR was started without ipv6; set TorConfig::ipv6");
        }
        self.backend
            .routes_for(family, prefixes)
            .await
            .with_context(|| format!("reading {} routes ({family:?})", self.config.kind))
    }

    /// How many prefixes the ToR holds for `family`, from a summary query that costs a few
    /// milliseconds however large the table (a full [`Tor::routes`] of 10k prefixes takes
    /// 0.1–0.5 s, and much longer on GoBGP when they came in MP_REACH_NLRI, because its
    /// JSON repeats the whole NLRI list of the UPDATE in every path). Use this to wait for
    /// bulk convergence and in benchmarks, then check the content once with `routes`.
    pub async fn route_count(&self, family: Family) -> Result<usize> {
        if family == Family::Ipv6 && !self.config.ipv6 {
            bail!("this ToR was started without ipv6; set TorConfig::ipv6");
        }
        self.backend
            .route_count(family)
            .await
            .with_context(|| format!("counting {} routes ({family:?})", self.config.kind))
    }

    /// Polls [`Tor::route_count`] until `pred` holds and returns the count; fails after
    /// `timeout`.
    pub async fn wait_for_count<F>(
        &self,
        family: Family,
        timeout: Duration,
        pred: F,
    ) -> Result<usize>
    where
        F: Fn(usize) -> bool,
    {
        let start = Instant::now();
        loop {
            let count = self.route_count(family).await?;
            if pred(count) {
                return Ok(count);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} ToR: condition on the {family:?} route count not met within {timeout:?}; \
                     last count {count}",
                    self.config.kind
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The ToR's BGP sessions. Dynamic neighbors appear once they connected.
    pub async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        self.backend
            .neighbors()
            .await
            .with_context(|| format!("reading {} neighbors", self.config.kind))
    }

    /// Polls [`Tor::routes`] until `pred` holds and returns that snapshot; fails after
    /// `timeout` with a short description of the last snapshot.
    ///
    /// Each poll dumps the whole table: for thousands of routes wait with
    /// [`Tor::wait_for_count`] instead and then read the content once.
    pub async fn wait_until<F>(&self, family: Family, timeout: Duration, pred: F) -> Result<Rib>
    where
        F: Fn(&Rib) -> bool,
    {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let rib = self.routes(family).await?;
            polls += 1;
            if pred(&rib) {
                return Ok(rib);
            }
            if start.elapsed() >= timeout {
                let paths: usize = rib.values().map(Vec::len).sum();
                bail!(
                    "{} ToR: condition on the {family:?} RIB not met within {timeout:?} \
                     ({polls} polls); last RIB: {} prefixes, {paths} paths{}",
                    self.config.kind,
                    rib.len(),
                    sample(&rib)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The neighbors the ToR holds a path for `prefix` from, in its table's order: a cheap
    /// query for polling one prefix (on GoBGP one API call, no CLI process).
    pub async fn path_sources(&self, prefix: IpNet) -> Result<Vec<IpAddr>> {
        let family = match prefix {
            IpNet::V4(_) => Family::Ipv4,
            IpNet::V6(_) => Family::Ipv6,
        };
        self.backend
            .path_sources(family, prefix)
            .await
            .with_context(|| {
                format!(
                    "reading the paths for {prefix} at the {} ToR",
                    self.config.kind
                )
            })
    }

    /// Polls [`Tor::neighbors`] until `pred` holds; fails after `timeout`.
    pub async fn wait_neighbors<F>(&self, timeout: Duration, pred: F) -> Result<Vec<TorNeighbor>>
    where
        F: Fn(&[TorNeighbor]) -> bool,
    {
        let start = Instant::now();
        loop {
            let neighbors = self.neighbors().await?;
            if pred(&neighbors) {
                return Ok(neighbors);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} ToR: condition on neighbors not met within {timeout:?}; last: {neighbors:?}",
                    self.config.kind
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `address` is an Established neighbor.
    pub async fn wait_established(&self, address: IpAddr, timeout: Duration) -> Result<()> {
        self.wait_neighbors(timeout, |neighbors| {
            neighbors
                .iter()
                .any(|n| n.address == address && n.established)
        })
        .await
        .map(|_| ())
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after a grace period, by PID.
    pub async fn stop(mut self) {
        self.daemon.stop().await;
        for h in self.helpers.iter_mut().rev() {
            h.stop().await;
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) every process of the ToR (with BFD on FRR,
    /// bfdd and zebra too): a frozen ToR keeps its sockets open and sends nothing.
    pub fn freeze(&self, frozen: bool) {
        self.daemon.freeze(frozen);
        for h in &self.helpers {
            h.freeze(frozen);
        }
    }

    /// The ToR's view of its BFD sessions: (peer address, state as the router names it).
    pub async fn bfd_peers(&self) -> Result<Vec<(IpAddr, String)>> {
        match &self.backend {
            Backend::Frr(client) => client.bfd_peers().await,
            Backend::Bird(client) => client.bfd_peers().await,
            Backend::Gobgp(_) => bail!("GoBGP has no BFD"),
        }
    }
}

enum StartError {
    /// Worth another attempt with fresh ports.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

async fn wait_ready(
    daemon: &mut Daemon,
    backend: &Backend,
    port: u16,
    kind: TorKind,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = daemon.exited() {
            bail!("{kind} exited during start-up ({status})");
        }
        if process::is_listening(port) {
            match backend.ping().await {
                Ok(()) => return Ok(()),
                Err(error) if start.elapsed() >= START_TIMEOUT => {
                    return Err(error.context(format!("{kind} does not answer queries")));
                }
                Err(_) => {}
            }
        }
        if start.elapsed() >= START_TIMEOUT {
            bail!("{kind} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for the host-wide BFD lock (see [`BFD_LOCK_FILE`]), at most 10 minutes.
async fn bfd_lock() -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(BFD_LOCK_FILE)
        .with_context(|| format!("opening {BFD_LOCK_FILE}"))?;
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock)
                if start.elapsed() < Duration::from_secs(600) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("locking {BFD_LOCK_FILE}: {e:?}"),
        }
    }
}

fn sample(rib: &Rib) -> String {
    let mut out = String::new();
    for (prefix, paths) in rib.iter().take(3) {
        out.push_str(&format!("; {prefix}: {paths:?}"));
    }
    out
}

/// Binaries per kind, with the Debian package each comes from.
pub(crate) mod bins {
    use super::Binary;

    pub const GOBGPD: Binary = Binary {
        path: "gobgpd",
        package: "gobgpd",
    };
    pub const GOBGP: Binary = Binary {
        path: "gobgp",
        package: "gobgp",
    };
    pub const BIRD: Binary = Binary {
        path: "bird",
        package: "bird2",
    };
    pub const BIRDC: Binary = Binary {
        path: "birdc",
        package: "bird2",
    };
    pub const BGPD: Binary = Binary {
        path: "/usr/lib/frr/bgpd",
        package: "frr",
    };
    pub const ZEBRA: Binary = Binary {
        path: "/usr/lib/frr/zebra",
        package: "frr",
    };
    pub const BFDD: Binary = Binary {
        path: "/usr/lib/frr/bfdd",
        package: "frr",
    };
    pub const VTYSH: Binary = Binary {
        path: "vtysh",
        package: "frr",
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_loopback_only() -> Result<()> {
        for kind in TorKind::ALL {
            TorConfig::new(kind).validate()?;
        }
        let mut config = TorConfig::new(TorKind::Bird);
        config.listen_addr = Ipv4Addr::new(10, 0, 0, 1);
        assert!(config.validate().is_err());
        let mut config = TorConfig::new(TorKind::Bird);
        config.neighbor_range = "10.0.0.0/24".parse()?;
        assert!(config.validate().is_err());
        let mut config = TorConfig::new(TorKind::Frr);
        config.md5_password = Some("a\"b".into());
        assert!(config.validate().is_err());
        config.md5_password = Some("secret".into());
        config.validate()?;
        config.kind = TorKind::Gobgp;
        assert!(config.validate().is_err());
        Ok(())
    }
}
