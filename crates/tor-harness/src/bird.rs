//! BIRD 2.0.12 as the ToR: one `bird.conf` with a BGP template and a dynamic-neighbor
//! protocol; queries through `birdc` text output (BIRD 2.0 has no JSON).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ipnet::IpNet;

use crate::process::run_query;
use crate::{Backend, Family, Launch, Rib, TorConfig, TorNeighbor, TorPath, bins};

/// Queries one BIRD through its control socket.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    birdc: PathBuf,
    socket: PathBuf,
}

impl Client {
    async fn run(&self, command: &str) -> Result<String> {
        let args = vec![
            "-s".to_owned(),
            self.socket.display().to_string(),
            command.to_owned(),
        ];
        run_query(&self.birdc, &args).await
    }

    /// `show bfd sessions`: one line per session, `<address> <interface> <state> ...`.
    pub(crate) async fn bfd_peers(&self) -> Result<Vec<(std::net::IpAddr, String)>> {
        let text = self.run("show bfd sessions").await?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let addr = f.next()?.parse().ok()?;
                let state = f.nth(1)?.to_owned();
                Some((addr, state))
            })
            .collect())
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        let status = self.run("show status").await?;
        if status.contains("Daemon is up and running") {
            Ok(())
        } else {
            anyhow::bail!("bird not up yet: {status}")
        }
    }

    pub(crate) async fn routes(&self, family: Family) -> Result<Rib> {
        let text = self
            .run(&format!("show route all table {}", table(family)))
            .await?;
        // Route headers name the neighbor with `from`; if a header lacks it (BIRD omits it
        // in some cases), fall back to the protocol → neighbor map.
        if text
            .lines()
            .any(|line| line.contains(" [node") && !line.contains(" from "))
        {
            let protocols = parse_protocols(&self.run("show protocols all").await?);
            let names = protocols
                .into_iter()
                .map(|p| (p.name, p.neighbor.address))
                .collect();
            return parse_routes(&text, &names);
        }
        parse_routes(&text, &HashMap::new())
    }

    pub(crate) async fn route_count(&self, family: Family) -> Result<usize> {
        let text = self
            .run(&format!("show route count table {}", table(family)))
            .await?;
        parse_count(&text)
    }

    pub(crate) async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        let text = self.run("show protocols all").await?;
        Ok(parse_protocols(&text)
            .into_iter()
            .map(|p| p.neighbor)
            .collect())
    }
}

fn table(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "master4",
        Family::Ipv6 => "master6",
    }
}

/// Parses `show route count`: `10000 of 10000 routes for 10000 networks in table master4`
/// (the networks are the prefixes).
pub(crate) fn parse_count(text: &str) -> Result<usize> {
    let line = text
        .lines()
        .find(|line| line.contains(" networks in table"))
        .with_context(|| format!("bird route count: {text}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let index = words
        .iter()
        .position(|w| *w == "networks")
        .context("bird route count without networks")?;
    index
        .checked_sub(1)
        .and_then(|i| words[i].parse().ok())
        .with_context(|| format!("bird route count: {line}"))
}

/// Writes `bird.conf` and returns how to start BIRD in the foreground on it.
pub(crate) fn prepare(config: &TorConfig, port: u16, dir: &Path) -> Result<Launch> {
    let program = bins::BIRD.resolve()?;
    let client = Client {
        birdc: bins::BIRDC.resolve()?,
        socket: dir.join("bird.ctl"),
    };
    std::fs::write(dir.join("bird.conf"), render_config(config, port))
        .context("writing bird.conf")?;
    Ok(Launch {
        name: "bird",
        program,
        args: ["-f", "-c", "bird.conf", "-s", "bird.ctl"]
            .iter()
            .map(|arg| (*arg).to_owned())
            .collect(),
        backend: Backend::Bird(client),
        helpers: Vec::new(),
        user: if config.bfd.is_some() {
            crate::process::User::NobodyWithNetAdmin
        } else {
            crate::process::User::Nobody
        },
    })
}

/// The ToR's config. There is deliberately no `protocol kernel`: routes stay in BIRD's
/// tables and never reach the kernel.
pub(crate) fn render_config(config: &TorConfig, port: u16) -> String {
    let mut conf = String::new();
    let _ = writeln!(conf, "log stderr all;\nrouter id {};", config.router_id);
    conf.push_str("protocol device {}\n");
    if let Some(bfd) = config.bfd {
        // The BGP sessions are multihop (see below), so their BFD sessions are too
        // (RFC 5883, port 4784).
        let _ = writeln!(
            conf,
            "protocol bfd {{\n  multihop {{ interval {} ms; multiplier {}; }};\n}}",
            bfd.interval_ms, bfd.multiplier
        );
    }
    let _ = writeln!(conf, "template bgp tor_nodes {{");
    let _ = writeln!(
        conf,
        "  local {} port {port} as {};",
        config.listen_addr, config.local_asn
    );
    // strict bind keeps the listener on listen_addr; multihop skips the directly-connected
    // check, which loopback peers would fail.
    conf.push_str("  strict bind on;\n  multihop;\n");
    if !config.capabilities {
        conf.push_str("  capabilities off;\n");
    }
    let _ = writeln!(
        conf,
        "  hold time {};\n  keepalive time {};",
        config.hold_time,
        config.keepalive().max(1)
    );
    match config.graceful_restart {
        Some(time) => {
            let _ = writeln!(
                conf,
                "  graceful restart on;\n  graceful restart time {time};"
            );
        }
        None => conf.push_str("  graceful restart off;\n"),
    }
    if let Some(password) = &config.md5_password {
        let _ = writeln!(conf, "  password \"{password}\";");
    }
    if config.bfd.is_some() {
        conf.push_str("  bfd on;\n");
    }
    let export = if config.export_to_peers {
        "all"
    } else {
        "none"
    };
    let _ = writeln!(
        conf,
        "  ipv4 {{ import all; export {export}; gateway recursive; }};"
    );
    if config.ipv6 {
        let _ = writeln!(
            conf,
            "  ipv6 {{ import all; export {export}; gateway recursive; }};"
        );
    }
    conf.push_str("}\n");
    let _ = writeln!(
        conf,
        "protocol bgp nodes from tor_nodes {{\n  neighbor range {} as {};\n  \
         dynamic name \"node\";\n}}",
        config.neighbor_range, config.peer_asn
    );
    conf
}

/// Parses `show route all table masterN`. Shape (attribute lines are indented with a tab,
/// further paths of the same prefix with spaces):
///
/// ```text
/// 10.9.0.1/32          unreachable [node2 04:38:45.183 from 127.0.0.21] * (100) [AS65010?]
///     Type: BGP univ
///     BGP.as_path: 65010
///     BGP.next_hop: 127.0.0.21
///                      unreachable [node1 04:38:45.174 from 127.0.0.20] (100) [AS65010?]
/// ```
pub(crate) fn parse_routes(text: &str, protocols: &HashMap<String, IpAddr>) -> Result<Rib> {
    let mut rib = Rib::new();
    let mut prefix: Option<IpNet> = None;
    let mut current: Option<(IpNet, TorPath)> = None;
    let mut flush = |current: &mut Option<(IpNet, TorPath)>| {
        if let Some((prefix, path)) = current.take() {
            rib.entry(prefix).or_default().push(path);
        }
    };
    for line in text.lines() {
        if line.starts_with('\t') {
            if let Some((_, path)) = current.as_mut() {
                apply_attribute(path, line.trim());
            }
            continue;
        }
        if line.trim().is_empty()
            || line.starts_with("BIRD ")
            || line.starts_with("Table ")
            || line.starts_with("Network not")
        {
            continue;
        }
        if !line.starts_with(' ') {
            let first = line.split_whitespace().next().unwrap_or_default();
            prefix = Some(
                first
                    .parse()
                    .with_context(|| format!("bird route line: {line}"))?,
            );
        }
        // A route header, for a new prefix or another path of the current one.
        let Some(bracket) = header_bracket(line) else {
            continue;
        };
        flush(&mut current);
        let Some(prefix) = prefix else {
            continue;
        };
        let mut words = bracket.split_whitespace();
        let protocol = words.next().unwrap_or_default();
        let from = bracket
            .split(" from ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse::<IpAddr>().ok());
        let Some(neighbor) = from.or_else(|| protocols.get(protocol).copied()) else {
            // Not a BGP route from a neighbor (e.g. a static one); the ToR has none.
            continue;
        };
        let mut path = TorPath::from_neighbor(neighbor);
        // `[node1 04:38:45.191] * (100)`: the star after the bracket marks the best route.
        path.selected = line
            .find(']')
            .is_some_and(|end| line[end + 1..].trim_start().starts_with('*'));
        current = Some((prefix, path));
    }
    flush(&mut current);
    for paths in rib.values_mut() {
        paths.sort();
    }
    Ok(rib)
}

/// The text between the first `[` and its `]` in a route header.
fn header_bracket(line: &str) -> Option<&str> {
    let start = line.find('[')?;
    let end = line[start..].find(']')? + start;
    Some(&line[start + 1..end])
}

fn apply_attribute(path: &mut TorPath, line: &str) {
    let Some((key, value)) = line.split_once(':') else {
        return;
    };
    let value = value.trim();
    match key {
        "BGP.as_path" => {
            path.as_path = value
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
        }
        // An IPv6 next hop may be followed by its link-local companion.
        "BGP.next_hop" => {
            path.next_hop = value.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        "BGP.med" => path.med = value.parse().ok(),
        "BGP.local_pref" => path.local_pref = value.parse().ok(),
        "BGP.community" => {
            path.communities = tuples(value)
                .filter_map(|t| match t.as_slice() {
                    [a, b] => Some((u16::try_from(*a).ok()?, u16::try_from(*b).ok()?)),
                    _ => None,
                })
                .collect();
        }
        "BGP.large_community" => {
            path.large_communities = tuples(value)
                .filter_map(|t| match t.as_slice() {
                    [a, b, c] => Some((
                        u32::try_from(*a).ok()?,
                        u32::try_from(*b).ok()?,
                        u32::try_from(*c).ok()?,
                    )),
                    _ => None,
                })
                .collect();
        }
        _ => {}
    }
}

/// `(65010,1) (65010,2)` or `(65010, 1, 2)` → the number tuples.
fn tuples(value: &str) -> impl Iterator<Item = Vec<u64>> + '_ {
    value.split('(').skip(1).map(|group| {
        group
            .split(')')
            .next()
            .unwrap_or_default()
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    })
}

/// One dynamic BGP protocol (`node1`, `node2`, ...) from `show protocols all`.
#[derive(Debug)]
pub(crate) struct Protocol {
    name: String,
    neighbor: TorNeighbor,
}

/// Parses `show protocols all`, keeping BGP protocols that have a neighbor address (the
/// dynamic sessions, not the template-backed listener with its neighbor range).
pub(crate) fn parse_protocols(text: &str) -> Vec<Protocol> {
    let mut out = Vec::new();
    let mut current: Option<(String, Option<IpAddr>, String, u64)> = None;
    let mut finish = |current: &mut Option<(String, Option<IpAddr>, String, u64)>| {
        if let Some((name, Some(address), state, prefixes)) = current.take() {
            out.push(Protocol {
                name,
                neighbor: TorNeighbor {
                    address,
                    established: state == "Established",
                    state,
                    prefixes_received: prefixes,
                },
            });
        }
    };
    for line in text.lines() {
        if line.is_empty() || line.starts_with(' ') || line.starts_with('\t') {
            let Some((_, address, state, prefixes)) = current.as_mut() else {
                continue;
            };
            let trimmed = line.trim();
            if let Some(value) = trimmed.strip_prefix("BGP state:") {
                *state = value.trim().to_owned();
            } else if let Some(value) = trimmed.strip_prefix("Neighbor address:") {
                *address = value.trim().parse().ok();
            } else if let Some(value) = trimmed.strip_prefix("Routes:") {
                // "Routes:         2 imported, 0 exported, 1 preferred"
                *prefixes += value
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            continue;
        }
        finish(&mut current);
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        if words.next() == Some("BGP") {
            current = Some((name.to_owned(), None, String::new(), 0));
        }
    }
    finish(&mut current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TorKind;

    /// Captured from BIRD 2.0.12 with two GoBGP speakers (ECMP on 10.9.0.1/32).
    const ROUTES: &str = "BIRD 2.0.12 ready.
Table master4:
10.9.0.2/32          unreachable [node1 04:38:45.191 from 127.0.0.20] * (100) [AS65010?]
\tType: BGP univ
\tBGP.origin: Incomplete
\tBGP.as_path: 65010
\tBGP.next_hop: 192.0.2.7
\tBGP.local_pref: 100
10.9.0.1/32          unreachable [node2 04:38:45.183 from 127.0.0.21] * (100) [AS65010?]
\tType: BGP univ
\tBGP.origin: Incomplete
\tBGP.as_path: 65010
\tBGP.next_hop: 127.0.0.21
\tBGP.local_pref: 100
                     unreachable [node1 04:38:45.174 from 127.0.0.20] (100) [AS65010?]
\tType: BGP univ
\tBGP.origin: Incomplete
\tBGP.as_path: 65010
\tBGP.next_hop: 127.0.0.20
\tBGP.med: 5
\tBGP.local_pref: 100
\tBGP.community: (65010,1)
\tBGP.large_community: (65010, 1, 2)
";

    const PROTOCOLS: &str = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     04:38:31.351  

nodes      BGP        ---        start  04:38:31.351  Passive       
  BGP state:          Passive
    Neighbor range:   127.0.0.0/24
    Neighbor AS:      65010
  Channel ipv4
    State:          DOWN

node1      BGP        ---        up     04:38:44.944  Established   
  BGP state:          Established
    Neighbor address: 127.0.0.20
    Neighbor AS:      65010
  Channel ipv4
    State:          UP
    Routes:         2 imported, 0 exported, 1 preferred
  Channel ipv6
    Routes:         1 imported, 0 exported, 1 preferred

node2      BGP        ---        start  04:38:44.945  Active   
  BGP state:          Active
    Neighbor address: 127.0.0.21
";

    #[test]
    fn parses_paths_and_attributes() -> Result<()> {
        let rib = parse_routes(ROUTES, &HashMap::new())?;
        assert_eq!(rib.len(), 2);
        let ecmp = &rib[&"10.9.0.1/32".parse::<IpNet>()?];
        assert_eq!(ecmp.len(), 2);
        assert_eq!(ecmp[0].neighbor, "127.0.0.20".parse::<IpAddr>()?);
        assert_eq!(ecmp[0].next_hop, Some("127.0.0.20".parse()?));
        assert_eq!(ecmp[0].med, Some(5));
        assert_eq!(ecmp[0].communities, vec![(65010, 1)]);
        assert_eq!(ecmp[0].large_communities, vec![(65010, 1, 2)]);
        assert_eq!(ecmp[1].neighbor, "127.0.0.21".parse::<IpAddr>()?);
        assert_eq!(ecmp[1].as_path, vec![65010]);
        assert_eq!(ecmp[1].local_pref, Some(100));
        let single = &rib[&"10.9.0.2/32".parse::<IpNet>()?];
        assert_eq!(single[0].next_hop, Some("192.0.2.7".parse()?));
        Ok(())
    }

    #[test]
    fn falls_back_to_protocol_names_and_handles_empty_tables() -> Result<()> {
        let text = "10.0.0.1/32 unreachable [node1 04:38:45.191] * (100) [AS65010i]\n\
                    \tBGP.next_hop: 2001:db8::1 fe80::1\n";
        let names = HashMap::from([("node1".to_owned(), "127.0.0.30".parse()?)]);
        let rib = parse_routes(text, &names)?;
        let path = &rib[&"10.0.0.1/32".parse::<IpNet>()?][0];
        assert_eq!(path.neighbor, "127.0.0.30".parse::<IpAddr>()?);
        assert!(path.selected, "the star marks the best route");
        assert_eq!(path.next_hop, Some("2001:db8::1".parse()?));
        assert!(parse_routes("BIRD 2.0.12 ready.\n", &HashMap::new())?.is_empty());
        Ok(())
    }

    #[test]
    fn parses_route_count() -> Result<()> {
        let text = "BIRD 2.0.12 ready.\n10000 of 10001 routes for 9999 networks in table master4\n";
        assert_eq!(parse_count(text)?, 9999);
        Ok(())
    }

    #[test]
    fn parses_dynamic_sessions_only() {
        let protocols = parse_protocols(PROTOCOLS);
        assert_eq!(protocols.len(), 2);
        assert_eq!(protocols[0].name, "node1");
        assert!(protocols[0].neighbor.established);
        assert_eq!(protocols[0].neighbor.prefixes_received, 3);
        assert!(!protocols[1].neighbor.established);
    }

    #[test]
    fn config_has_no_kernel_protocol() {
        let mut config = TorConfig::new(TorKind::Bird);
        config.ipv6 = true;
        let conf = render_config(&config, 20179);
        assert!(conf.contains("local 127.0.0.1 port 20179 as 65001;"));
        assert!(conf.contains("neighbor range 127.0.0.0/24 as 65010;"));
        assert!(conf.contains("graceful restart off;"));
        assert!(conf.contains("ipv6 {"));
        assert!(!conf.contains("kernel"));
    }
}
