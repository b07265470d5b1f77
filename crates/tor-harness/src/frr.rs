//! FRR 8.4's `bgpd` alone as the ToR (no zebra, no kernel), queried with `vtysh` JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::Value;

use crate::process::run_query;
use crate::{Backend, Family, Launch, Rib, TorConfig, TorNeighbor, TorPath, bins};

/// Queries one bgpd through the vty socket in its own dir.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    vtysh: PathBuf,
    dir: PathBuf,
}

impl Client {
    async fn run(&self, command: &str) -> Result<String> {
        self.run_on("bgpd", command).await
    }

    /// `show bfd peers json` from bfdd: `[{"peer": "127.0.0.10", "status": "up", ...}]`.
    pub(crate) async fn bfd_peers(&self) -> Result<Vec<(IpAddr, String)>> {
        let text = self.run_on("bfdd", "show bfd peers json").await?;
        let json: Value = serde_json::from_str(text.trim()).context("bfd peers JSON")?;
        Ok(json
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let addr = p.get("peer")?.as_str()?.parse().ok()?;
                let status = p.get("status")?.as_str()?.to_owned();
                Some((addr, status))
            })
            .collect())
    }

    async fn run_on(&self, daemon: &str, command: &str) -> Result<String> {
        // `--config_dir` with an empty vtysh.conf keeps vtysh away from /etc/frr.
        let dir = self.dir.display().to_string();
        let args = vec![
            "--vty_socket".to_owned(),
            dir.clone(),
            "--config_dir".to_owned(),
            dir,
            "-d".to_owned(),
            daemon.to_owned(),
            "-c".to_owned(),
            command.to_owned(),
        ];
        run_query(&self.vtysh, &args).await
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        let text = self.run("show bgp summary json").await?;
        serde_json::from_str::<Value>(text.trim()).context("summary JSON")?;
        Ok(())
    }

    pub(crate) async fn routes(&self, family: Family) -> Result<Rib> {
        let afi = match family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        // `json detail` carries communities; the plain `json` table view does not.
        parse_routes(
            &self
                .run(&format!("show bgp {afi} unicast json detail"))
                .await?,
        )
    }

    pub(crate) async fn route_count(&self, family: Family) -> Result<usize> {
        let afi = match family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        parse_count(
            &self
                .run(&format!("show bgp {afi} unicast statistics json"))
                .await?,
        )
    }

    pub(crate) async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        parse_summary(&self.run("show bgp summary json").await?)
    }
}

/// Writes `bgpd.conf` (and an empty `vtysh.conf`) and returns how to start bgpd.
pub(crate) fn prepare(config: &TorConfig, port: u16, dir: &Path) -> Result<Launch> {
    let program = bins::BGPD.resolve()?;
    let client = Client {
        vtysh: bins::VTYSH.resolve()?,
        dir: dir.to_path_buf(),
    };
    std::fs::write(dir.join("bgpd.conf"), render_config(config)).context("writing bgpd.conf")?;
    std::fs::write(dir.join("vtysh.conf"), "").context("writing vtysh.conf")?;
    let dir_arg = dir.display().to_string();
    if let Some(bfd) = config.bfd {
        return prepare_with_bfd(config, bfd, port, dir, program, client);
    }
    Ok(Launch {
        name: "bgpd",
        program,
        args: vec![
            "-f".to_owned(),
            "bgpd.conf".to_owned(),
            "-i".to_owned(),
            "bgpd.pid".to_owned(),
            "-z".to_owned(),
            "zserv.api".to_owned(),
            "--vty_socket".to_owned(),
            dir_arg,
            // No vty TCP port.
            "-P".to_owned(),
            "0".to_owned(),
            "-l".to_owned(),
            config.listen_addr.to_string(),
            "-p".to_owned(),
            port.to_string(),
            // No zebra, no kernel FIB, no switching to the frr user.
            "-Z".to_owned(),
            "-n".to_owned(),
            "-S".to_owned(),
        ],
        backend: Backend::Frr(client),
        helpers: Vec::new(),
        user: crate::process::User::Nobody,
    })
}

/// With BFD, bgpd asks bfdd for sessions through zebra, so all three run. None of them
/// touches the kernel's routes: bgpd runs with `-n` (no FIB) and sends zebra no routes,
/// bfdd sends none, and zebra has no other client; zebra only reads interfaces. They
/// start as root and drop to the `frr` user themselves, keeping the capabilities they
/// check for at start (zebra and bfdd refuse to run without them).
fn prepare_with_bfd(
    config: &TorConfig,
    bfd: crate::TorBfd,
    port: u16,
    dir: &Path,
    program: std::path::PathBuf,
    client: Client,
) -> Result<Launch> {
    let d = |name: &str| dir.join(name).display().to_string();
    let common = |conf: &str, pid: &str| -> Vec<String> {
        vec![
            "-f".into(),
            d(conf),
            "-i".into(),
            d(pid),
            "-z".into(),
            d("zserv.api"),
            "--vty_socket".into(),
            dir.display().to_string(),
            "-P".into(),
            "0".into(),
            "-u".into(),
            "frr".into(),
            "-g".into(),
            "frr".into(),
        ]
    };
    std::fs::write(dir.join("zebra.conf"), "hostname tor\nlog stdout\n!\n")
        .context("writing zebra.conf")?;
    std::fs::write(
        dir.join("bfdd.conf"),
        format!(
            "hostname tor\nlog stdout\n!\nbfd\n profile herald\n  receive-interval {i}\n  \
             transmit-interval {i}\n  detect-multiplier {m}\n !\n!\n",
            i = bfd.interval_ms,
            m = bfd.multiplier
        ),
    )
    .context("writing bfdd.conf")?;
    let mut bfdd = common("bfdd.conf", "bfdd.pid");
    bfdd.extend(["--bfdctl".into(), d("bfdd.sock")]);
    let mut bgpd = common("bgpd.conf", "bgpd.pid");
    bgpd.extend([
        "-l".into(),
        config.listen_addr.to_string(),
        "-p".into(),
        port.to_string(),
        // No FIB: bgpd sends zebra no routes.
        "-n".into(),
    ]);
    for f in ["bgpd.conf", "zebra.conf", "bfdd.conf", "vtysh.conf"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("opening {f} to frr"))?;
    }
    Ok(Launch {
        name: "bgpd",
        program,
        args: bgpd,
        backend: Backend::Frr(client),
        helpers: vec![
            crate::Helper {
                name: "zebra",
                program: bins::ZEBRA.resolve()?,
                args: common("zebra.conf", "zebra.pid"),
                ready_file: Some(dir.join("zserv.api")),
            },
            crate::Helper {
                name: "bfdd",
                program: bins::BFDD.resolve()?,
                args: bfdd,
                ready_file: Some(dir.join("bfdd.sock")),
            },
        ],
        user: crate::process::User::Own,
    })
}

pub(crate) fn render_config(config: &TorConfig) -> String {
    // `frr defaults` must be the first line to take effect.
    let mut conf = String::from("frr defaults datacenter\nhostname tor\nlog stdout\n!\n");
    if !config.export_to_peers {
        conf.push_str("route-map TOR-EXPORT-NONE deny 10\n!\n");
    }
    let _ = writeln!(conf, "router bgp {}", config.local_asn);
    let _ = writeln!(conf, " bgp router-id {}", config.router_id);
    conf.push_str(" no bgp ebgp-requires-policy\n no bgp default ipv4-unicast\n");
    conf.push_str(" bgp bestpath as-path multipath-relax\n");
    // Without this FRR resets the session (NOTIFICATION 3/8) on a 127.x next hop.
    conf.push_str(" bgp allow-martian-nexthop\n");
    match config.graceful_restart {
        Some(time) => {
            let _ = writeln!(
                conf,
                " bgp graceful-restart\n bgp graceful-restart restart-time {time}"
            );
        }
        None => conf.push_str(" bgp graceful-restart-disable\n"),
    }
    let _ = writeln!(
        conf,
        " neighbor NODES peer-group\n neighbor NODES remote-as {}",
        config.peer_asn
    );
    let _ = writeln!(
        conf,
        " neighbor NODES timers {} {}",
        config.keepalive(),
        config.hold_time
    );
    conf.push_str(" neighbor NODES advertisement-interval 0\n");
    if !config.capabilities {
        conf.push_str(" neighbor NODES dont-capability-negotiate\n");
    }
    if let Some(password) = &config.md5_password {
        let _ = writeln!(conf, " neighbor NODES password {password}");
    }
    if config.bfd.is_some() {
        // zebra lists no 127.x address on lo, so bgpd finds its session's interface
        // only when told; without it bgpd resets every session ("nexthop_set failed").
        conf.push_str(" neighbor NODES update-source lo\n");
        conf.push_str(" neighbor NODES bfd\n neighbor NODES bfd profile herald\n");
    }
    let _ = writeln!(
        conf,
        " bgp listen range {} peer-group NODES",
        config.neighbor_range
    );
    let mut families = vec!["ipv4"];
    if config.ipv6 {
        families.push("ipv6");
    }
    for afi in families {
        let _ = writeln!(conf, " address-family {afi} unicast");
        conf.push_str("  neighbor NODES activate\n  maximum-paths 8\n");
        if !config.export_to_peers {
            conf.push_str("  neighbor NODES route-map TOR-EXPORT-NONE out\n");
        }
        conf.push_str(" exit-address-family\n");
    }
    conf.push_str("!\n");
    conf
}

/// Parses `show bgp <afi> unicast json detail`: `routes` maps each prefix to an array whose
/// first element describes the prefix and the rest are paths with a `peer` object.
pub(crate) fn parse_routes(text: &str) -> Result<Rib> {
    let json: Value = serde_json::from_str(text.trim()).context("frr route JSON")?;
    let mut rib = Rib::new();
    let Some(routes) = json.get("routes").and_then(Value::as_object) else {
        return Ok(rib);
    };
    for (prefix, entries) in routes {
        let prefix: IpNet = prefix
            .parse()
            .with_context(|| format!("frr prefix {prefix}"))?;
        let mut paths = Vec::new();
        for entry in entries.as_array().into_iter().flatten() {
            if let Some(path) = parse_path(entry)? {
                paths.push(path);
            }
        }
        paths.sort();
        rib.insert(prefix, paths);
    }
    Ok(rib)
}

fn parse_path(entry: &Value) -> Result<Option<TorPath>> {
    // Both the detail view (`peer.peerId`) and the table view (`peerId`) are accepted.
    let Some(peer) = entry
        .get("peer")
        .and_then(|p| p.get("peerId"))
        .or_else(|| entry.get("peerId"))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    let neighbor: IpAddr = peer.parse().with_context(|| format!("frr peerId {peer}"))?;
    let mut path = TorPath::from_neighbor(neighbor);
    path.stale = entry.get("stale").and_then(Value::as_bool).unwrap_or(false);
    path.selected = entry
        .get("bestpath")
        .and_then(|b| b.get("overall"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || entry
            .get("multipath")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    path.next_hop = entry
        .get("nexthops")
        .and_then(Value::as_array)
        .and_then(|hops| hops.first())
        .and_then(|hop| hop.get("ip"))
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse().ok());
    if let Some(segments) = entry
        .get("aspath")
        .and_then(|p| p.get("segments"))
        .and_then(Value::as_array)
    {
        for segment in segments {
            path.as_path.extend(
                segment
                    .get("list")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|asn| asn.as_u64().and_then(|a| u32::try_from(a).ok())),
            );
        }
    } else if let Some(text) = entry.get("path").and_then(Value::as_str) {
        path.as_path = text
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
    }
    path.med = entry
        .get("metric")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok());
    path.local_pref = entry
        .get("locPrf")
        .or_else(|| entry.get("localpref"))
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok());
    path.communities = string_list(entry, "community")
        .filter_map(|c| parse_community(&c))
        .collect();
    path.large_communities = string_list(entry, "largeCommunity")
        .filter_map(|c| {
            let mut parts = c.split(':').map(|n| n.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??, parts.next()??))
        })
        .collect();
    Ok(Some(path))
}

fn string_list<'a>(entry: &'a Value, key: &str) -> impl Iterator<Item = String> + 'a {
    entry
        .get(key)
        .and_then(|c| c.get("list"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
}

/// `65010:1`, or one of the well-known names FRR prints instead of numbers.
fn parse_community(text: &str) -> Option<(u16, u16)> {
    let well_known = match text {
        "graceful-shutdown" => Some((0xffff, 0)),
        "accept-own" => Some((0xffff, 1)),
        "blackhole" => Some((0xffff, 666)),
        "noExport" | "no-export" => Some((0xffff, 0xff01)),
        "noAdvertise" | "no-advertise" => Some((0xffff, 0xff02)),
        "localAs" | "local-AS" => Some((0xffff, 0xff03)),
        "noPeer" | "no-peer" => Some((0xffff, 0xff04)),
        _ => None,
    };
    well_known.or_else(|| {
        let (a, b) = text.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
}

/// Parses `show bgp <afi> unicast statistics json`: `{"ipv4Unicast":[{"totalPrefixes":N,..}]}`.
pub(crate) fn parse_count(text: &str) -> Result<usize> {
    let json: Value = serde_json::from_str(text.trim()).context("frr statistics JSON")?;
    let Some(family) = json.as_object().and_then(|o| o.values().next()) else {
        bail!("frr statistics JSON is empty");
    };
    Ok(family
        .as_array()
        .and_then(|instances| instances.first())
        .and_then(|instance| instance.get("totalPrefixes"))
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize)
}

/// Parses `show bgp summary json`: one object per address family, each with `peers`.
pub(crate) fn parse_summary(text: &str) -> Result<Vec<TorNeighbor>> {
    let json: Value = serde_json::from_str(text.trim()).context("frr summary JSON")?;
    let Some(families) = json.as_object() else {
        bail!("frr summary is not an object");
    };
    let mut by_address: BTreeMap<IpAddr, TorNeighbor> = BTreeMap::new();
    for family in families.values() {
        let Some(peers) = family.get("peers").and_then(Value::as_object) else {
            continue;
        };
        for (address, peer) in peers {
            let address: IpAddr = address.parse().context("frr peer address")?;
            let state = peer
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let received = peer.get("pfxRcd").and_then(Value::as_u64).unwrap_or(0);
            let entry = by_address.entry(address).or_insert_with(|| TorNeighbor {
                address,
                established: state == "Established",
                state: state.clone(),
                prefixes_received: 0,
            });
            entry.prefixes_received += received;
        }
    }
    Ok(by_address.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TorKind;

    /// Captured from FRR 8.4 (`show bgp ipv4 unicast json detail`), two paths for one prefix.
    const DETAIL: &str = r#"{
 "vrfId": 0, "vrfName": "default", "tableVersion": 2, "routerId": "127.0.0.1", "defaultLocPrf": 100, "localAS": 65001,
 "routes": { "10.9.0.1/32": [{"prefix":"10.9.0.1/32","version":1,"advertisedTo":{"127.0.0.20":{"hostname":"vm"},"127.0.0.21":{"hostname":"vm"}}},{"aspath":{"string":"65010","segments":[{"type":"as-sequence","list":[65010]}],"length":1},"origin":"incomplete","metric":5,"valid":true,"version":1,"community":{"string":"65010:1","list":["65010:1"]},"largeCommunity":{"string":"65010:1:2","list":["65010:1:2"]},"lastUpdate":{"epoch":1795495153,"string":"Tue Nov 24 04:39:13 2026\n"},"nexthops":[{"ip":"127.0.0.20","hostname":"vm","afi":"ipv4","metric":0,"accessible":true,"used":true}],"peer":{"peerId":"127.0.0.20","routerId":"127.0.0.20","hostname":"vm","type":"external"}},{"aspath":{"string":"65010","segments":[{"type":"as-sequence","list":[65010]}],"length":1},"origin":"incomplete","valid":true,"version":1,"bestpath":{"bestpathFromAs":65010,"overall":true,"selectionReason":"MED"},"lastUpdate":{"epoch":1795495152,"string":"Tue Nov 24 04:39:12 2026\n"},"nexthops":[{"ip":"127.0.0.21","hostname":"vm","afi":"ipv4","metric":0,"accessible":true,"used":true}],"peer":{"peerId":"127.0.0.21","routerId":"127.0.0.21","hostname":"vm","type":"external"}}]
 }  } "#;

    const SUMMARY: &str = r#"{"ipv4Unicast":{"peers":{"127.0.0.20":{"remoteAs":65010,"pfxRcd":2,"state":"Established"},"127.0.0.21":{"remoteAs":65010,"state":"Active"}}},
"ipv6Unicast":{"peers":{"127.0.0.20":{"pfxRcd":1,"state":"Established"}}}}"#;

    #[test]
    fn parses_detail_paths() -> Result<()> {
        let rib = parse_routes(DETAIL)?;
        let paths = &rib[&"10.9.0.1/32".parse::<IpNet>()?];
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0].neighbor, "127.0.0.20".parse::<IpAddr>()?);
        assert_eq!(paths[0].next_hop, Some("127.0.0.20".parse()?));
        assert_eq!(paths[0].med, Some(5));
        assert_eq!(paths[0].as_path, vec![65010]);
        assert_eq!(paths[0].communities, vec![(65010, 1)]);
        assert_eq!(paths[0].large_communities, vec![(65010, 1, 2)]);
        assert_eq!(paths[1].neighbor, "127.0.0.21".parse::<IpAddr>()?);
        let empty = r#"{"vrfId": 0, "routes": {  }  } "#;
        assert!(parse_routes(empty)?.is_empty());
        Ok(())
    }

    #[test]
    fn parses_statistics_count() -> Result<()> {
        let text = r#"{"ipv4Unicast":[{"instance":"VRF default","totalAdvertisements":10000,"totalPrefixes":9998}]}"#;
        assert_eq!(parse_count(text)?, 9998);
        Ok(())
    }

    #[test]
    fn parses_summary_over_families() -> Result<()> {
        let neighbors = parse_summary(SUMMARY)?;
        assert_eq!(neighbors.len(), 2);
        assert!(neighbors[0].established);
        assert_eq!(neighbors[0].prefixes_received, 3);
        assert!(!neighbors[1].established);
        assert!(parse_summary("{\n}")?.is_empty());
        Ok(())
    }

    #[test]
    fn config_is_bgpd_only_with_listen_range() {
        let mut config = TorConfig::new(TorKind::Frr);
        config.graceful_restart = Some(30);
        let conf = render_config(&config);
        assert!(conf.starts_with("frr defaults datacenter\n"));
        assert!(conf.contains(" bgp listen range 127.0.0.0/24 peer-group NODES"));
        assert!(conf.contains(" bgp allow-martian-nexthop"));
        assert!(conf.contains(" bgp graceful-restart restart-time 30"));
        assert!(conf.contains("  maximum-paths 8"));
    }
}
