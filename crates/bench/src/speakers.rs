//! The two BGP speakers the `advertise` and `withdraw` benchmarks compare, both as
//! processes of their own so their memory can be read from /proc and a SIGKILL ends a
//! session the way a crashed node does:
//! - Herald's engine (`herald-bgp`) runs in a child of this program,
//!   `herald-bench engine-child`, driven over its stdin/stdout one line per command;
//! - GoBGP (`gobgpd`) as the speaker, through the tor-harness's [`GobgpSpeaker`].
//!
//! Also here: the GoBGP ToR's own per-neighbor message counters, so both speakers' UPDATE
//! counts are also read from the receiving side.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use herald_bgp::{PeerConfig, PeerHandle, RouteAttributes, Routes, SharedAttributes};
use herald_test_support::ChildProcess;
use herald_tor_harness::{Family, TcpRelay, Tor};
use ipnet::{IpNet, Ipv4Net};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long the engine may take to reach Established with a fresh ToR (it connects at
/// once; GoBGP as a speaker waits 5–10 s before its first attempt).
pub const ENGINE_ESTABLISH: Duration = Duration::from_secs(15);
/// How long one command to the engine child may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `herald-bench engine-child`: one engine session to a ToR, driven over stdin.
#[derive(Debug, Clone, Args)]
pub struct EngineChildArgs {
    /// The ToR's address.
    #[arg(long, default_value = "127.0.0.1")]
    pub peer_addr: Ipv4Addr,
    #[arg(long)]
    pub peer_port: u16,
    #[arg(long, default_value_t = herald_tor_harness::TOR_ASN)]
    pub peer_asn: u32,
    #[arg(long, default_value_t = herald_tor_harness::NODE_ASN)]
    pub local_asn: u32,
    /// Source address of the session (and router id).
    #[arg(long)]
    pub source: Ipv4Addr,
    /// Hold time offered, seconds.
    #[arg(long, default_value_t = herald_tor_harness::DEFAULT_HOLD_TIME)]
    pub hold_time: u16,
    /// Also run single-hop BFD with the ToR at this interval (milliseconds) × 3, and
    /// close the session when BFD leaves Up, as the route speaker does.
    #[arg(long)]
    pub bfd_ms: Option<u32>,
}

/// A BFD session to the ToR that closes `peer`'s session when it leaves Up; lives as long
/// as the returned values.
async fn start_bfd(
    args: &EngineChildArgs,
    ms: u32,
    peer: &PeerHandle,
) -> anyhow::Result<(
    herald_bfd::Bfd,
    herald_bfd::SessionHandle,
    tokio::task::JoinHandle<()>,
)> {
    let bfd = herald_bfd::Bfd::new();
    let session = bfd
        .add(herald_bfd::PeerSpec::single_hop(
            IpAddr::V4(args.peer_addr),
            IpAddr::V4(args.source),
            Duration::from_millis(u64::from(ms)),
            3,
        ))
        .await
        .map_err(|e| anyhow!("start BFD: {e}"))?;
    let link = peer.bfd_link();
    let mut rx = session.watch();
    let watch = tokio::spawn(async move {
        let mut was = rx.borrow_and_update().state;
        while rx.changed().await.is_ok() {
            let now = rx.borrow_and_update().state;
            if was == herald_bfd::State::Up && now != herald_bfd::State::Up {
                link.down();
            }
            was = now;
        }
    });
    Ok((bfd, session, watch))
}

/// The child's main loop. Prints `established` once the session is up, then answers
/// each command line with one line:
/// - `set A.B.C.D N`: the desired set becomes the N /32s from A.B.C.D → `ok`
/// - `add P` / `del P`: one /32 more or less → `ok`
/// - `status` → `status <updates_sent> <prefixes_sent> <established_count> <state>`
///
/// It exits at the end of its input (the parent went away) or on `quit`.
pub async fn engine_child(args: EngineChildArgs) -> anyhow::Result<()> {
    let mut config = PeerConfig::new(
        IpAddr::V4(args.peer_addr),
        args.peer_asn,
        args.local_asn,
        args.source,
    );
    config.peer_port = args.peer_port;
    config.source_addr = Some(IpAddr::V4(args.source));
    config.hold_time = args.hold_time;
    config.connect_retry = Duration::from_secs(1);
    let peer = PeerHandle::spawn(config)
        .await
        .map_err(|e| anyhow!("spawn the engine: {e:?}"))?;
    let _bfd = match args.bfd_ms {
        Some(ms) => Some(start_bfd(&args, ms, &peer).await?),
        None => None,
    };
    let mut out = tokio::io::stdout();
    match peer.wait_established(ENGINE_ESTABLISH).await {
        Ok(_) => out.write_all(b"established\n").await?,
        Err(status) => {
            out.write_all(format!("error not established: {status:?}\n").as_bytes())
                .await?;
            out.flush().await?;
            bail!("engine not established");
        }
    }
    out.flush().await?;
    // Shared with the engine (set_desired_arc), so the child does not hold a second copy
    // of a large set and its RSS is the engine's.
    let mut desired = Arc::new(Routes::new());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["set", base, count] => match (base.parse::<Ipv4Addr>(), count.parse::<u32>()) {
                (Ok(base), Ok(count)) => {
                    // Every route shares one attribute set, as a node's routes do.
                    let attrs: SharedAttributes = Arc::new(RouteAttributes::default());
                    desired = Arc::new(
                        host_prefixes(base, count)
                            .into_iter()
                            .map(|p| (IpNet::V4(p), Arc::clone(&attrs)))
                            .collect(),
                    );
                    peer.set_desired_arc(Arc::clone(&desired));
                    "ok".to_string()
                }
                _ => format!("error bad set: {line}"),
            },
            ["add", prefix] | ["del", prefix] => match prefix.parse::<IpNet>() {
                Ok(prefix) => {
                    let routes = Arc::make_mut(&mut desired);
                    if words[0] == "add" {
                        routes.insert(prefix, RouteAttributes::default().into());
                    } else {
                        routes.remove(&prefix);
                    }
                    peer.set_desired_arc(Arc::clone(&desired));
                    "ok".to_string()
                }
                Err(e) => format!("error bad prefix {prefix}: {e}"),
            },
            ["status"] => {
                let s = peer.status();
                format!(
                    "status {} {} {} {:?}",
                    s.updates_sent, s.prefixes_sent, s.established_count, s.state
                )
            }
            ["quit"] => break,
            _ => format!("error unknown command: {line}"),
        };
        out.write_all(reply.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    Ok(())
}

/// `count` consecutive /32s from `base`.
pub fn host_prefixes(base: Ipv4Addr, count: u32) -> Vec<Ipv4Net> {
    (0..count)
        .filter_map(|i| Ipv4Net::new(Ipv4Addr::from(u32::from(base).wrapping_add(i)), 32).ok())
        .collect()
}

/// The engine's counters as the child reports them.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStatus {
    pub updates_sent: u64,
    pub prefixes_sent: u64,
    pub established_count: u64,
}

/// A running `herald-bench engine-child`, killed by its PID when dropped.
pub struct EngineChild {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pid: u32,
    pub source: Ipv4Addr,
}

impl EngineChild {
    /// Starts the child towards `tor` from `source` and waits until the session is
    /// Established on both sides.
    pub async fn start(
        tor: &Tor,
        source: Ipv4Addr,
        hold_time: u16,
        bfd_ms: Option<u32>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let peer = SocketAddr::new(IpAddr::V4(tor.config().listen_addr), tor.bgp_port());
        Self::start_to(tor, peer, source, source, hold_time, bfd_ms, log_dir).await
    }

    /// As [`Self::start`], through `relay` (a [`TcpRelay`] to `tor`), which the ToR sees
    /// as the neighbor.
    pub async fn start_via(
        tor: &Tor,
        relay: &TcpRelay,
        source: Ipv4Addr,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let hold = tor.config().hold_time;
        let seen_as = relay_source(source);
        Self::start_to(
            tor,
            relay.local_addr(),
            source,
            seen_as,
            hold,
            None,
            log_dir,
        )
        .await
    }

    async fn start_to(
        tor: &Tor,
        peer: SocketAddr,
        source: Ipv4Addr,
        seen_as: Ipv4Addr,
        hold_time: u16,
        bfd_ms: Option<u32>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locate the herald-bench executable")?;
        let log = log_dir.join(format!("engine-child-{source}-{}.log", peer.port()));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("create log file {}", log.display()))?;
        let mut command = tokio::process::Command::new(exe);
        if let Some(ms) = bfd_ms {
            command
                .arg("engine-child")
                .arg("--bfd-ms")
                .arg(ms.to_string());
        } else {
            command.arg("engine-child");
        }
        let mut child = command
            .arg("--peer-addr")
            .arg(peer.ip().to_string())
            .arg("--peer-port")
            .arg(peer.port().to_string())
            .arg("--peer-asn")
            .arg(tor.config().local_asn.to_string())
            .arg("--local-asn")
            .arg(tor.config().peer_asn.to_string())
            .arg("--source")
            .arg(source.to_string())
            .arg("--hold-time")
            .arg(hold_time.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .context("start herald-bench engine-child")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("engine child has no pid"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut engine = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
            pid,
            source,
        };
        let first = engine
            .read_line(ENGINE_ESTABLISH + Duration::from_secs(5))
            .await?;
        if first != "established" {
            bail!(
                "engine child from {source}: {first}; log {}",
                log_file_tail(&log)
            );
        }
        tor.wait_established(IpAddr::V4(seen_as), ENGINE_ESTABLISH)
            .await?;
        Ok(engine)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    async fn read_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("engine child {} closed its output", self.source),
            Ok(Err(e)) => Err(e).context("read from the engine child"),
            Err(_) => bail!("engine child {} silent for {timeout:?}", self.source),
        }
    }

    /// Sends one command and returns its answer line.
    pub async fn command(&mut self, line: &str) -> anyhow::Result<String> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        let reply = self.read_line(COMMAND_TIMEOUT).await?;
        if reply.starts_with("error") {
            bail!("engine child: {line}: {reply}");
        }
        Ok(reply)
    }

    pub async fn set(&mut self, base: Ipv4Addr, count: u32) -> anyhow::Result<()> {
        self.command(&format!("set {base} {count}")).await.map(drop)
    }

    pub async fn add(&mut self, prefix: Ipv4Net) -> anyhow::Result<()> {
        self.command(&format!("add {prefix}")).await.map(drop)
    }

    pub async fn del(&mut self, prefix: Ipv4Net) -> anyhow::Result<()> {
        self.command(&format!("del {prefix}")).await.map(drop)
    }

    pub async fn status(&mut self) -> anyhow::Result<EngineStatus> {
        let reply = self.command("status").await?;
        let fields: Vec<&str> = reply.split_whitespace().collect();
        let num = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("bad status line {reply:?}"))
        };
        Ok(EngineStatus {
            updates_sent: num(1)?,
            prefixes_sent: num(2)?,
            established_count: num(3)?,
        })
    }

    /// SIGKILL by PID, as a node crash: the kernel closes the TCP connection.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGSTOP / SIGCONT by PID: the session stays open but nothing is sent.
    pub fn freeze(&self, frozen: bool) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let sig = if frozen {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
}

impl Drop for EngineChild {
    fn drop(&mut self) {
        // Thaw first so a frozen child can die; kill_on_drop then sends SIGKILL by PID.
        self.freeze(false);
    }
}

fn log_file_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Resident and peak resident memory of a process, in KiB, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rss {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn rss(pid: u32) -> Rss {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Rss {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// UPDATE messages the GoBGP ToR received from `neighbor`, from its own counters
/// (`gobgp neighbor`); `None` when they cannot be read. The ToR's API port is read from
/// the daemon's command line (`--api-hosts`).
pub async fn tor_updates_received(tor: &Tor, neighbor: Ipv4Addr) -> Option<u64> {
    let pid = tor.pid()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let hosts = args
        .iter()
        .position(|a| a == "--api-hosts")
        .and_then(|i| args.get(i + 1))?;
    let port = hosts.rsplit(':').next()?;
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("gobgp")
            .args(["-u", "127.0.0.1", "-p", port, "-j", "neighbor"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let wanted = neighbor.to_string();
    json.as_array()?.iter().find_map(|peer| {
        let state = peer.get("state")?;
        if state.get("neighbor_address")?.as_str()? != wanted {
            return None;
        }
        Some(
            state
                .pointer("/messages/received/update")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        )
    })
}

/// Polls the ToR's route count (a summary query, one `gobgp` CLI call) every `poll` until
/// `pred` holds; returns when it did, measured from `since`, and the number of polls.
///
/// A poll that fails is tried again until `timeout`: GoBGP's API does not answer while
/// its server loop ingests a large burst (seen at 100k /32s on two loaded cores), and
/// answers again once it is done, which is the moment measured.
pub async fn wait_count(
    tor: &Tor,
    since: Instant,
    poll: Duration,
    timeout: Duration,
    pred: impl Fn(usize) -> bool,
) -> anyhow::Result<(Duration, u32)> {
    let mut polls = 0u32;
    loop {
        let count = tor.route_count(Family::Ipv4).await;
        polls += 1;
        match count {
            Ok(count) if pred(count) => return Ok((since.elapsed(), polls)),
            Ok(count) if since.elapsed() >= timeout => {
                bail!("ToR route count still {count} after {timeout:?}")
            }
            Err(e) if since.elapsed() >= timeout => {
                return Err(e.context(format!("ToR route count after {timeout:?}")));
            }
            Ok(_) | Err(_) => {}
        }
        tokio::time::sleep(poll).await;
    }
}

/// The address a relay for a speaker at `source` connects to the ToR from: its host
/// number plus 100, still in the ToR's neighbor range (127.0.0.0/24), so every relayed
/// speaker is a neighbor of its own.
pub fn relay_source(source: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, source.octets()[3].wrapping_add(100))
}

/// A relay towards `tor` for the speaker at `source`: it counts the speaker's UPDATEs on
/// the way, for speakers and ToRs that do not count them (BIRD).
pub async fn relay_to(tor: &Tor, source: Ipv4Addr) -> anyhow::Result<TcpRelay> {
    let upstream = SocketAddr::new(IpAddr::V4(tor.config().listen_addr), tor.bgp_port());
    TcpRelay::start(Ipv4Addr::LOCALHOST, upstream, relay_source(source)).await
}

/// BIRD as a speaker: `prefixes` as static routes (in BIRD's own table only: there is no
/// kernel protocol, so nothing reaches the kernel), exported over eBGP to `peer`, from
/// `source`. The static protocol starts disabled unless `enabled`: [`BirdSpeaker::announce`]
/// then hands the routes over at a moment of the caller's choosing. Stopped by PID when
/// dropped.
pub struct BirdSpeaker {
    process: ChildProcess,
    ctl: PathBuf,
}

impl BirdSpeaker {
    pub fn start(
        dir: &Path,
        source: Ipv4Addr,
        prefixes: &[Ipv4Net],
        peer: SocketAddr,
        next_hop: Option<Ipv4Addr>,
        enabled: bool,
    ) -> anyhow::Result<Self> {
        use std::fmt::Write as _;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut config = format!(
            "router id {source};\nprotocol device {{}}\nprotocol static herald {{\n  ipv4;\n{}",
            if enabled { "" } else { "  disabled;\n" }
        );
        for p in prefixes {
            let _ = writeln!(config, "  route {p} blackhole;");
        }
        // A GoBGP 3.10 ToR takes a classic NEXT_HOP in 127/8 for a withdraw, so the
        // caller may name another one (only an attribute: nothing routes through it).
        let next_hop = next_hop.map_or_else(
            || "next hop self".to_string(),
            |a| format!("next hop address {a}"),
        );
        let _ = write!(
            config,
            "}}\nprotocol bgp tor {{\n  local {source} as {};\n  neighbor {} port {} as {};\n  multihop;\n  connect delay time 1;\n  ipv4 {{ import none; export all; {next_hop}; }};\n}}\n",
            herald_tor_harness::NODE_ASN,
            peer.ip(),
            peer.port(),
            herald_tor_harness::TOR_ASN,
        );
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config).with_context(|| format!("write {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let ctl = dir.join("bird.ctl");
        let mut command = std::process::Command::new("bird");
        command
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&ctl)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        Ok(Self {
            process: ChildProcess::spawn("bird (speaker)", command),
            ctl,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn birdc(&self, command: &str) -> anyhow::Result<String> {
        let output = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new("birdc")
                .arg("-s")
                .arg(&self.ctl)
                .arg(command)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| anyhow!("birdc {command}: no answer in 10 s"))?
        .with_context(|| format!("birdc {command}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits until its session to the ToR is Established.
    pub async fn wait_established(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let text = self.birdc("show protocols tor").await.unwrap_or_default();
            if text.contains("Established") {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                bail!("BIRD speaker not Established after {timeout:?}: {text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Enables the static routes: BIRD exports them to the ToR.
    pub async fn announce(&self) -> anyhow::Result<()> {
        let text = self.birdc("enable herald").await?;
        if !text.contains("enabled") {
            bail!("birdc enable herald: {text}");
        }
        Ok(())
    }
}
