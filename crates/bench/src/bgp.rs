//! `advertise` and `withdraw`: Herald's BGP engine against GoBGP as the speaker, each
//! towards a fresh GoBGP ToR of its own, back to back in one run (BENCHMARKS.md).
//!
//! Both speakers run as processes of their own (see [`crate::speakers`]): the engine in a
//! `herald-bench engine-child`, GoBGP as `gobgpd`. Time runs from the moment the bench
//! hands the change to the speaker (the `set` line written to the engine child; the
//! `AddPathStream` call to GoBGP, which includes building the paths) until the ToR's route
//! count — a summary query, one `gobgp` CLI call per poll — shows the result.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_tor_harness::{Family, GobgpSpeaker, GobgpSpeakerConfig, Tor, TorConfig, TorKind};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::benches::Common;
use crate::report::Target;
use crate::speakers::{self, EngineChild, Rss};
use crate::stats::{Latencies, Summary};

/// GoBGP as a speaker waits a random 5–10 s before its first connect.
const GOBGP_ESTABLISH: Duration = Duration::from_secs(30);
/// Pause between ToR polls while waiting for bulk convergence.
const BULK_POLL: Duration = Duration::from_millis(10);
/// Pause between ToR polls while timing a single withdraw (each poll is itself a CLI
/// call of several ms).
const FINE_POLL: Duration = Duration::from_millis(1);
/// Engine prefixes/s over GoBGP's.
const ADVERTISE_RATIO_TARGET: f64 = 3.0;
/// Engine prefixes/s over BIRD's, both into a BIRD ToR (issue 18).
const ADVERTISE_BIRD_RATIO_TARGET: f64 = 1.0;
/// Engine RSS holding the routes over BIRD's holding the same (issue 18).
const ADVERTISE_BIRD_RSS_TARGET: f64 = 1.5;
/// BIRD as a speaker connects a few seconds after its start.
const BIRD_ESTABLISH: Duration = Duration::from_secs(30);
/// /32s per UPDATE the engine must at least pack.
const PREFIXES_PER_UPDATE: u64 = 500;
/// Explicit withdraws: until gone at the ToR.
const WITHDRAW_TARGET_MS: f64 = 250.0;
/// Session loss with BFD 300 ms × 3: under a second.
const BFD_LOSS_TARGET_MS: f64 = 1000.0;
/// Session loss: detected within the hold time plus this.
const SESSION_LOSS_SLACK_MS: f64 = 100.0;
/// Where the announced /32s start.
const ADVERTISE_BASE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 0);
const SINGLE_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
const BULK_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
/// Time bound of the repeated single-prefix withdraw loop.
const SINGLE_LOOP_LIMIT: Duration = Duration::from_secs(90);

/// GoBGP ToR's next-hop rule: a classic NEXT_HOP in 127/8 is a withdraw, so GoBGP
/// speakers announce the TEST-NET-1 twin of their source (only an attribute).
fn gobgp_next_hop(source: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, source.octets()[3])
}

fn engine_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 30 + (i % 10) as u8)
}

fn gobgp_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 40 + (i % 10) as u8)
}

fn bird_source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 50 + (i % 10) as u8)
}

async fn gobgp_speaker(tor: &Tor, source: Ipv4Addr) -> anyhow::Result<GobgpSpeaker> {
    let mut config = GobgpSpeakerConfig::new(tor.bgp_port());
    config.source_addr = source;
    config.router_id = source;
    config.hold_time = tor.config().hold_time;
    let speaker = GobgpSpeaker::start(config).await?;
    speaker.wait_established(GOBGP_ESTABLISH).await?;
    tor.wait_established(std::net::IpAddr::V4(source), Duration::from_secs(10))
        .await?;
    Ok(speaker)
}

/// A fresh GoBGP ToR and an engine child peered with it.
async fn engine_pair(common: &Common, i: usize) -> anyhow::Result<(Tor, EngineChild)> {
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await?;
    let hold = tor.config().hold_time;
    let engine = EngineChild::start(&tor, engine_source(i), hold, None, &common.log_dir).await?;
    Ok((tor, engine))
}

/// A fresh GoBGP ToR and a GoBGP speaker peered with it.
async fn gobgp_pair(i: usize) -> anyhow::Result<(Tor, GobgpSpeaker)> {
    let tor = Tor::start(TorConfig::new(TorKind::Gobgp)).await?;
    let speaker = gobgp_speaker(&tor, gobgp_source(i)).await?;
    Ok((tor, speaker))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

// ---- advertise ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct AdvertiseRow {
    pub speaker: &'static str,
    /// The ToR's implementation.
    pub tor: &'static str,
    pub prefixes: u32,
    /// From handing the routes over to the ToR holding all of them.
    pub to_tor_ms: f64,
    /// Until the speaker took the routes (engine: `set` answered; GoBGP: AddPathStream
    /// returned, i.e. in its own RIB).
    pub handed_over_ms: f64,
    pub prefixes_per_sec: f64,
    /// UPDATEs the speaker counted (engine) — GoBGP does not expose its own count.
    pub updates_sent: Option<u64>,
    /// UPDATEs the ToR counted from this neighbor (GoBGP ToR), or the relay in front of
    /// the ToR counted on their way (BIRD ToR, which does not count them).
    pub updates_at_tor: Option<u64>,
    pub rss_before: Rss,
    pub rss_after: Rss,
    pub polls: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdvertiseReport {
    pub rows: Vec<AdvertiseRow>,
    pub targets: Vec<Target>,
}

pub async fn advertise(
    common: &Common,
    sizes: &[u32],
    timeout: Duration,
) -> anyhow::Result<AdvertiseReport> {
    common.print_header(
        "advertise: N /32s to a fresh GoBGP ToR, Herald engine (child process) vs GoBGP speaker (AddPathStream); and to a fresh BIRD ToR through a counting relay, Herald engine vs BIRD speaker (static routes enabled); same run",
    );
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        // Set up both pairs at once (GoBGP's speaker idles 5–10 s before connecting);
        // the measurements below run one after the other.
        let ((tor_e, mut engine), (tor_g, gobgp)) =
            tokio::try_join!(engine_pair(common, i), gobgp_pair(i))
                .with_context(|| format!("set up the advertise pairs for N = {n}"))?;

        // Engine.
        let source = engine.source;
        let rss_before = speakers::rss(engine.pid());
        let status_before = engine.status().await?;
        let tor_before = speakers::tor_updates_received(&tor_e, source).await;
        let started = Instant::now();
        engine.set(ADVERTISE_BASE, n).await?;
        let handed_over = started.elapsed();
        let (arrived, polls) =
            speakers::wait_count(&tor_e, started, BULK_POLL, timeout, |c| c >= n as usize)
                .await
                .with_context(|| format!("engine: {n} routes at the ToR"))?;
        let status_after = engine.status().await?;
        let rss_after = speakers::rss(engine.pid());
        let tor_after = speakers::tor_updates_received(&tor_e, source).await;
        let engine_row = AdvertiseRow {
            speaker: "herald",
            tor: "gobgp",
            prefixes: n,
            to_tor_ms: arrived.as_secs_f64() * 1000.0,
            handed_over_ms: handed_over.as_secs_f64() * 1000.0,
            prefixes_per_sec: f64::from(n) / arrived.as_secs_f64(),
            updates_sent: Some(status_after.updates_sent - status_before.updates_sent),
            updates_at_tor: tor_before.zip(tor_after).map(|(a, b)| b.saturating_sub(a)),
            rss_before,
            rss_after,
            polls,
        };
        drop(engine);
        tor_e.stop().await;

        // GoBGP.
        let source = gobgp.config().source_addr;
        let prefixes: Vec<Ipv4Net> = speakers::host_prefixes(ADVERTISE_BASE, n);
        let pid = gobgp.pid().unwrap_or(0);
        let rss_before = speakers::rss(pid);
        let tor_before = speakers::tor_updates_received(&tor_g, source).await;
        let started = Instant::now();
        gobgp.add_routes(&prefixes, gobgp_next_hop(source)).await?;
        let handed_over = started.elapsed();
        let (arrived, polls) =
            speakers::wait_count(&tor_g, started, BULK_POLL, timeout, |c| c >= n as usize)
                .await
                .with_context(|| format!("GoBGP: {n} routes at the ToR"))?;
        let rss_after = speakers::rss(pid);
        let tor_after = speakers::tor_updates_received(&tor_g, source).await;
        let gobgp_row = AdvertiseRow {
            speaker: "gobgp",
            tor: "gobgp",
            prefixes: n,
            to_tor_ms: arrived.as_secs_f64() * 1000.0,
            handed_over_ms: handed_over.as_secs_f64() * 1000.0,
            prefixes_per_sec: f64::from(n) / arrived.as_secs_f64(),
            updates_sent: None,
            updates_at_tor: tor_before.zip(tor_after).map(|(a, b)| b.saturating_sub(a)),
            rss_before,
            rss_after,
            polls,
        };
        gobgp.stop().await;
        tor_g.stop().await;

        let speedup = ratio(engine_row.prefixes_per_sec, gobgp_row.prefixes_per_sec);
        targets.push(Target::new(
            format!("advertise {n} prefixes/s"),
            format!("{speedup:.1}x GoBGP"),
            format!(">= {ADVERTISE_RATIO_TARGET}x"),
            speedup >= ADVERTISE_RATIO_TARGET,
        ));
        let limit = u64::from(n).div_ceil(PREFIXES_PER_UPDATE);
        let updates = engine_row
            .updates_sent
            .or(engine_row.updates_at_tor)
            .unwrap_or(u64::MAX);
        targets.push(Target::new(
            format!("advertise {n} UPDATEs"),
            format!("{updates} (GoBGP {})", opt(gobgp_row.updates_at_tor)),
            format!("<= {limit}"),
            updates <= limit,
        ));
        rows.push(engine_row);
        rows.push(gobgp_row);

        let (engine_bird, bird) = advertise_bird(common, i, n, timeout)
            .await
            .with_context(|| format!("advertise {n} into a BIRD ToR"))?;
        let speedup = ratio(engine_bird.prefixes_per_sec, bird.prefixes_per_sec);
        targets.push(Target::new(
            format!("advertise {n} prefixes/s (BIRD ToR)"),
            format!("{speedup:.2}x BIRD"),
            format!(">= {ADVERTISE_BIRD_RATIO_TARGET}x"),
            speedup >= ADVERTISE_BIRD_RATIO_TARGET,
        ));
        let updates = engine_bird
            .updates_at_tor
            .or(engine_bird.updates_sent)
            .unwrap_or(u64::MAX);
        targets.push(Target::new(
            format!("advertise {n} UPDATEs (BIRD ToR)"),
            format!("{updates} (BIRD {})", opt(bird.updates_at_tor)),
            format!("<= {limit}"),
            updates <= limit,
        ));
        let rss = ratio(
            engine_bird.rss_after.rss_kib as f64,
            bird.rss_after.rss_kib as f64,
        );
        targets.push(Target::new(
            format!("advertise {n} RSS holding the routes"),
            format!(
                "{rss:.2}x BIRD ({:.1} / {:.1} MiB)",
                mib(engine_bird.rss_after.rss_kib),
                mib(bird.rss_after.rss_kib)
            ),
            format!("<= {ADVERTISE_BIRD_RSS_TARGET}x"),
            rss <= ADVERTISE_BIRD_RSS_TARGET,
        ));
        rows.push(engine_bird);
        rows.push(bird);
    }

    println!(
        "  {:<7} {:<6} {:>7} {:>10} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "speaker",
        "ToR",
        "N",
        "handed ms",
        "ToR ms",
        "prefixes/s",
        "UPD sent",
        "UPD @ToR",
        "RSS0 MiB",
        "RSS MiB",
        "peak MiB"
    );
    for row in &rows {
        println!(
            "  {:<7} {:<6} {:>7} {:>10.1} {:>10.1} {:>12.0} {:>9} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            row.speaker,
            row.tor,
            row.prefixes,
            row.handed_over_ms,
            row.to_tor_ms,
            row.prefixes_per_sec,
            opt(row.updates_sent),
            opt(row.updates_at_tor),
            mib(row.rss_before.rss_kib),
            mib(row.rss_after.rss_kib),
            mib(row.rss_after.hwm_kib),
        );
    }
    println!(
        "  RSS: VmRSS of the speaker process before the announcement (session up, no routes) and \
         after the ToR holds N; peak = VmHWM. Herald's engine runs alone in a \
         `herald-bench engine-child` process (its RSS includes that small driver). \
         Into the BIRD ToR both speakers go through a relay that counts their UPDATEs \
         (UPD @ToR); BIRD's RSS0 already holds its configuration, the N static routes \
         included (disabled until the timed `birdc enable`)."
    );
    crate::report::print_targets(&targets);
    Ok(AdvertiseReport { rows, targets })
}

/// Herald's engine and then BIRD, each as the speaker to a fresh BIRD ToR of its own
/// through a relay that counts the UPDATEs on their way. BIRD's routes are static routes
/// of a protocol that starts disabled; `birdc enable` hands them over.
async fn advertise_bird(
    common: &Common,
    i: usize,
    n: u32,
    timeout: Duration,
) -> anyhow::Result<(AdvertiseRow, AdvertiseRow)> {
    // Engine.
    let tor = Tor::start(TorConfig::new(TorKind::Bird)).await?;
    let source = engine_source(i);
    let relay = speakers::relay_to(&tor, source).await?;
    let mut engine = EngineChild::start_via(&tor, &relay, source, &common.log_dir).await?;
    let rss_before = speakers::rss(engine.pid());
    let status_before = engine.status().await?;
    let relayed_before = relay.updates_upstream();
    let started = Instant::now();
    engine.set(ADVERTISE_BASE, n).await?;
    let handed_over = started.elapsed();
    let (arrived, polls) =
        speakers::wait_count(&tor, started, BULK_POLL, timeout, |c| c >= n as usize)
            .await
            .context("engine: routes at the BIRD ToR")?;
    let status_after = engine.status().await?;
    let engine_row = AdvertiseRow {
        speaker: "herald",
        tor: "bird",
        prefixes: n,
        to_tor_ms: arrived.as_secs_f64() * 1000.0,
        handed_over_ms: handed_over.as_secs_f64() * 1000.0,
        prefixes_per_sec: f64::from(n) / arrived.as_secs_f64(),
        updates_sent: Some(status_after.updates_sent - status_before.updates_sent),
        updates_at_tor: Some(relay.updates_upstream() - relayed_before),
        rss_before,
        rss_after: speakers::rss(engine.pid()),
        polls,
    };
    drop(engine);
    drop(relay);
    tor.stop().await;

    // BIRD.
    let tor = Tor::start(TorConfig::new(TorKind::Bird)).await?;
    let source = bird_source(i);
    let relay = speakers::relay_to(&tor, source).await?;
    let prefixes = speakers::host_prefixes(ADVERTISE_BASE, n);
    let dir = common.log_dir.join(format!("bird-speaker-advertise-{n}"));
    let bird =
        speakers::BirdSpeaker::start(&dir, source, &prefixes, relay.local_addr(), None, false)?;
    bird.wait_established(BIRD_ESTABLISH).await?;
    tor.wait_established(
        std::net::IpAddr::V4(speakers::relay_source(source)),
        BIRD_ESTABLISH,
    )
    .await?;
    let rss_before = speakers::rss(bird.pid());
    let relayed_before = relay.updates_upstream();
    let started = Instant::now();
    bird.announce().await?;
    let handed_over = started.elapsed();
    let (arrived, polls) =
        speakers::wait_count(&tor, started, BULK_POLL, timeout, |c| c >= n as usize)
            .await
            .context("BIRD: routes at the BIRD ToR")?;
    let bird_row = AdvertiseRow {
        speaker: "bird",
        tor: "bird",
        prefixes: n,
        to_tor_ms: arrived.as_secs_f64() * 1000.0,
        handed_over_ms: handed_over.as_secs_f64() * 1000.0,
        prefixes_per_sec: f64::from(n) / arrived.as_secs_f64(),
        updates_sent: None,
        updates_at_tor: Some(relay.updates_upstream() - relayed_before),
        rss_before,
        rss_after: speakers::rss(bird.pid()),
        polls,
    };
    drop(bird);
    drop(relay);
    tor.stop().await;
    Ok((engine_row, bird_row))
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

// ---- withdraw ------------------------------------------------------------------------------

/// One speaker's withdraw figures.
#[derive(Debug, Clone, Serialize)]
pub struct WithdrawSide {
    pub speaker: &'static str,
    /// One prefix withdrawn, until gone at the ToR, repeated.
    pub single: Summary,
    /// All of `bulk` prefixes withdrawn in one change, until the ToR holds none.
    pub bulk_ms: f64,
    /// SIGSTOP of the speaker (session silent): until the ToR dropped its routes.
    pub freeze_ms: Option<f64>,
    /// SIGKILL of the speaker: until the ToR dropped its routes.
    pub kill_ms: f64,
    /// Mean time of one ToR poll (a `gobgp` CLI summary query), the resolution of `single`.
    pub poll_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WithdrawReport {
    pub repeats: u32,
    pub bulk: u32,
    pub hold_time_s: u16,
    pub sides: Vec<WithdrawSide>,
    /// SIGSTOP of an engine child running BFD (300 ms × 3) with an FRR ToR running bfdd:
    /// until the ToR dropped its routes. GoBGP 3.10 has no BFD; its figure is the
    /// hold-time one (`sides`).
    pub bfd_freeze_ms: Option<f64>,
    pub targets: Vec<Target>,
}

/// The operations a side needs, so the engine and GoBGP run the same scenario.
enum Speaker {
    Engine(EngineChild),
    Gobgp(GobgpSpeaker),
}

impl Speaker {
    fn name(&self) -> &'static str {
        match self {
            Speaker::Engine(_) => "herald",
            Speaker::Gobgp(_) => "gobgp",
        }
    }

    async fn announce(&mut self, prefixes: &[Ipv4Net]) -> anyhow::Result<()> {
        match self {
            Speaker::Engine(e) => match prefixes {
                [one] => e.add(*one).await,
                _ => {
                    let base = prefixes.first().map_or(BULK_BASE, Ipv4Net::addr);
                    e.set(base, prefixes.len() as u32).await
                }
            },
            Speaker::Gobgp(g) => {
                let hop = gobgp_next_hop(g.config().source_addr);
                g.add_routes(prefixes, hop).await
            }
        }
    }

    async fn withdraw(&mut self, prefixes: &[Ipv4Net]) -> anyhow::Result<()> {
        match self {
            Speaker::Engine(e) => match prefixes {
                [one] => e.del(*one).await,
                _ => e.set(BULK_BASE, 0).await,
            },
            Speaker::Gobgp(g) => g.delete_routes(prefixes).await,
        }
    }

    fn freeze(&self, frozen: bool) {
        match self {
            Speaker::Engine(e) => e.freeze(frozen),
            Speaker::Gobgp(g) if frozen => g.freeze(),
            Speaker::Gobgp(g) => g.thaw(),
        }
    }

    async fn kill9(self) {
        match self {
            Speaker::Engine(e) => e.kill9().await,
            Speaker::Gobgp(g) => g.kill(),
        }
    }
}

async fn withdraw_side(
    mut speaker: Speaker,
    tor: &Tor,
    repeats: u32,
    bulk: u32,
    freeze: bool,
    timeout: Duration,
) -> anyhow::Result<WithdrawSide> {
    let name = speaker.name();
    let hold = Duration::from_secs(u64::from(tor.config().hold_time));

    // The resolution of every figure below: one ToR summary query.
    let probe = Instant::now();
    for _ in 0..10 {
        tor.route_count(Family::Ipv4).await?;
    }
    let poll_ms = probe.elapsed().as_secs_f64() * 1000.0 / 10.0;

    let mut single = Latencies::new();
    let loop_start = Instant::now();
    for (r, prefix) in speakers::host_prefixes(SINGLE_BASE, repeats)
        .into_iter()
        .enumerate()
    {
        if loop_start.elapsed() >= SINGLE_LOOP_LIMIT {
            println!("  {name}: single-withdraw loop stopped by time after {r} repeats");
            break;
        }
        speaker.announce(&[prefix]).await?;
        speakers::wait_count(tor, Instant::now(), FINE_POLL, timeout, |c| c == 1)
            .await
            .with_context(|| format!("{name}: single prefix {prefix} at the ToR"))?;
        let started = Instant::now();
        speaker.withdraw(&[prefix]).await?;
        let (gone, _) = speakers::wait_count(tor, started, FINE_POLL, timeout, |c| c == 0)
            .await
            .with_context(|| format!("{name}: single prefix {prefix} withdrawn"))?;
        single.record(gone);
    }

    let prefixes = speakers::host_prefixes(BULK_BASE, bulk);
    let all = bulk as usize;
    speaker.announce(&prefixes).await?;
    speakers::wait_count(tor, Instant::now(), BULK_POLL, timeout, |c| c == all)
        .await
        .with_context(|| format!("{name}: {bulk} routes at the ToR"))?;
    let started = Instant::now();
    speaker.withdraw(&prefixes).await?;
    let (bulk_gone, _) = speakers::wait_count(tor, started, BULK_POLL, timeout, |c| c == 0)
        .await
        .with_context(|| format!("{name}: {bulk} routes withdrawn"))?;

    speaker.announce(&prefixes).await?;
    speakers::wait_count(tor, Instant::now(), BULK_POLL, timeout, |c| c == all)
        .await
        .with_context(|| format!("{name}: {bulk} routes back at the ToR"))?;
    let mut freeze_ms = None;
    if freeze {
        let started = Instant::now();
        speaker.freeze(true);
        let waited = speakers::wait_count(
            tor,
            started,
            BULK_POLL,
            hold + Duration::from_secs(5),
            |c| c == 0,
        )
        .await;
        speaker.freeze(false);
        let (gone, _) = waited.with_context(|| format!("{name}: frozen speaker's routes"))?;
        freeze_ms = Some(gone.as_secs_f64() * 1000.0);
        // The speaker reconnects (after GoBGP's start delay) and announces again.
        speakers::wait_count(
            tor,
            Instant::now(),
            BULK_POLL,
            GOBGP_ESTABLISH + timeout,
            |c| c == all,
        )
        .await
        .with_context(|| format!("{name}: routes back after the thaw"))?;
    }
    let started = Instant::now();
    speaker.kill9().await;
    let (kill_gone, _) = speakers::wait_count(
        tor,
        started,
        BULK_POLL,
        hold + Duration::from_secs(5),
        |c| c == 0,
    )
    .await
    .with_context(|| format!("{name}: killed speaker's routes"))?;

    Ok(WithdrawSide {
        speaker: name,
        single: single.summary(),
        bulk_ms: bulk_gone.as_secs_f64() * 1000.0,
        freeze_ms,
        kill_ms: kill_gone.as_secs_f64() * 1000.0,
        poll_ms,
    })
}

pub async fn withdraw(
    common: &Common,
    repeats: u32,
    bulk: u32,
    freeze: bool,
    timeout: Duration,
) -> anyhow::Result<WithdrawReport> {
    common.print_header(&format!(
        "withdraw: 1 prefix x{repeats}, {bulk} prefixes, session loss; Herald engine (child process) vs GoBGP speaker, fresh GoBGP ToR each, same run"
    ));
    let ((tor_e, engine), (tor_g, gobgp)) =
        tokio::try_join!(engine_pair(common, 0), gobgp_pair(0)).context("set up the pairs")?;
    let hold_time_s = tor_e.config().hold_time;
    let engine_side = withdraw_side(
        Speaker::Engine(engine),
        &tor_e,
        repeats,
        bulk,
        freeze,
        timeout,
    )
    .await?;
    tor_e.stop().await;
    let gobgp_side = withdraw_side(
        Speaker::Gobgp(gobgp),
        &tor_g,
        repeats,
        bulk,
        freeze,
        timeout,
    )
    .await?;
    tor_g.stop().await;
    let bfd_freeze_ms = if freeze {
        Some(
            bfd_freeze(common, bulk, timeout)
                .await
                .context("BFD freeze side")?,
        )
    } else {
        None
    };

    println!(
        "  {:<10} {:>7} {:>9} {:>9} {:>9} {:>12} {:>11} {:>10} {:>8}",
        "speaker",
        "1x n",
        "1 p50 ms",
        "1 p99 ms",
        "1 max ms",
        format!("{bulk} ms"),
        "freeze ms",
        "kill-9 ms",
        "poll ms"
    );
    for side in [&engine_side, &gobgp_side] {
        println!(
            "  {:<10} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>11} {:>10.1} {:>8.1}",
            side.speaker,
            side.single.count,
            side.single.p50_ms,
            side.single.p99_ms,
            side.single.max_ms,
            side.bulk_ms,
            side.freeze_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            side.kill_ms,
            side.poll_ms
        );
    }
    if let Some(ms) = bfd_freeze_ms {
        println!(
            "  {:<10} {:>7} {:>9} {:>9} {:>9} {:>12} {:>11.1} {:>10} {:>8}",
            "herald+bfd", "-", "-", "-", "-", "-", ms, "-", "-"
        );
    }
    println!(
        "  times until the ToR's route count shows the change; 'poll ms' is one ToR query, the \
         resolution of every figure. freeze = SIGSTOP (session silent, the ToR's hold timer of \
         {hold_time_s} s decides); kill-9 = SIGKILL (the kernel closes the connection). \
         herald+bfd = the engine with BFD 300 ms x 3 against an FRR ToR running bfdd, frozen \
         the same way (GoBGP 3.10 has no BFD)."
    );
    let loss_limit = f64::from(hold_time_s) * 1000.0 + SESSION_LOSS_SLACK_MS;
    let mut targets = vec![
        Target::new(
            "withdraw 1 prefix p99",
            format!(
                "{:.1} ms (GoBGP {:.1})",
                engine_side.single.p99_ms, gobgp_side.single.p99_ms
            ),
            format!("< {WITHDRAW_TARGET_MS} ms"),
            engine_side.single.count > 0 && engine_side.single.p99_ms < WITHDRAW_TARGET_MS,
        ),
        Target::new(
            format!("withdraw {bulk} prefixes"),
            format!(
                "{:.1} ms (GoBGP {:.1})",
                engine_side.bulk_ms, gobgp_side.bulk_ms
            ),
            format!("< {WITHDRAW_TARGET_MS} ms"),
            engine_side.bulk_ms < WITHDRAW_TARGET_MS,
        ),
        Target::new(
            "withdraw session loss kill-9",
            format!(
                "{:.1} ms (GoBGP {:.1})",
                engine_side.kill_ms, gobgp_side.kill_ms
            ),
            format!("< {loss_limit:.0} ms (hold+100)"),
            engine_side.kill_ms < loss_limit,
        ),
    ];
    if let (Some(e), Some(g)) = (engine_side.freeze_ms, gobgp_side.freeze_ms) {
        targets.push(Target::new(
            "withdraw session loss silent",
            format!("{e:.1} ms (GoBGP {g:.1})"),
            format!("< {loss_limit:.0} ms (hold+100)"),
            e < loss_limit,
        ));
    }
    if let (Some(b), Some(g)) = (bfd_freeze_ms, gobgp_side.freeze_ms) {
        targets.push(Target::new(
            "withdraw session loss silent, BFD 300 ms x 3",
            format!("{b:.1} ms (GoBGP, hold time: {g:.1})"),
            format!("< {BFD_LOSS_TARGET_MS} ms"),
            b < BFD_LOSS_TARGET_MS,
        ));
    }
    crate::report::print_targets(&targets);
    Ok(WithdrawReport {
        repeats,
        bulk,
        hold_time_s,
        sides: vec![engine_side, gobgp_side],
        bfd_freeze_ms,
        targets,
    })
}

/// Session loss with BFD: an engine child with BFD 300 ms × 3 and `bulk` routes at an FRR
/// ToR running bfdd; SIGSTOP the child and time until the ToR holds none of them.
async fn bfd_freeze(common: &Common, bulk: u32, timeout: Duration) -> anyhow::Result<f64> {
    let mut config = TorConfig::new(TorKind::Frr);
    config.bfd = Some(herald_tor_harness::TorBfd::default());
    let tor = Tor::start(config).await?;
    let source = engine_source(5);
    let mut engine = EngineChild::start(
        &tor,
        source,
        tor.config().hold_time,
        Some(300),
        &common.log_dir,
    )
    .await?;
    let all = bulk as usize;
    engine.set(BULK_BASE, bulk).await?;
    speakers::wait_count(&tor, Instant::now(), BULK_POLL, timeout, |c| c == all)
        .await
        .context("herald+bfd: routes at the FRR ToR")?;
    // BFD Up at the ToR, then time for the Poll Sequence to 300 ms.
    let up_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = tor.bfd_peers().await?;
        if peers
            .iter()
            .any(|(a, s)| *a == std::net::IpAddr::V4(source) && s == "up")
        {
            break;
        }
        if Instant::now() > up_deadline {
            anyhow::bail!("BFD never came Up at the FRR ToR: {peers:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    engine.freeze(true);
    let hold = Duration::from_secs(u64::from(tor.config().hold_time));
    let waited = speakers::wait_count(
        &tor,
        started,
        FINE_POLL,
        hold + Duration::from_secs(5),
        |c| c == 0,
    )
    .await;
    engine.freeze(false);
    let (gone, _) = waited.context("herald+bfd: frozen speaker's routes")?;
    engine.kill9().await;
    tor.stop().await;
    Ok(gone.as_secs_f64() * 1000.0)
}
