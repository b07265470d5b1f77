//! GoBGP 3.10 as the ToR: TOML config with a peer group and dynamic neighbors, queries
//! through the `gobgp` CLI's JSON output (`-j`), except the neighbor list and where one
//! prefix's paths came from, which are read over GoBGP's gRPC API because callers poll
//! them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::gobgp_api::Api;
use crate::process::{self, run_query};
use crate::{Backend, Family, Launch, Rib, TorConfig, TorNeighbor, TorPath, bins};

/// GoBGP's `session_state` value for Established (its gRPC API enum).
pub(crate) const SESSION_ESTABLISHED: i64 = 6;

/// Queries one gobgpd on 127.0.0.1: through the `gobgp` CLI, and for the counters polled
/// in loops, through one gRPC connection to its API kept open.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    cli: PathBuf,
    api_port: u16,
    api: Arc<OnceCell<Api>>,
}

impl Client {
    pub(crate) fn new(api_port: u16) -> Result<Client> {
        Ok(Client {
            cli: bins::GOBGP.resolve()?,
            api_port,
            api: Arc::new(OnceCell::new()),
        })
    }

    async fn api(&self) -> Result<&Api> {
        self.api
            .get_or_try_init(|| Api::connect(self.api_port))
            .await
    }

    pub(crate) fn cli(&self) -> &Path {
        &self.cli
    }

    /// `-u 127.0.0.1 -p <api port>`: never the CLI's default of port 50051.
    pub(crate) fn base_args(&self) -> Vec<String> {
        vec![
            "-u".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.api_port.to_string(),
        ]
    }

    /// Runs `gobgp -u 127.0.0.1 -p <api> <args>`.
    pub(crate) async fn run(&self, args: &[&str]) -> Result<String> {
        let mut full = self.base_args();
        full.extend(args.iter().map(|arg| (*arg).to_owned()));
        run_query(&self.cli, &full).await
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        self.run(&["-j", "global"]).await.map(|_| ())
    }

    pub(crate) async fn routes(&self, family: Family) -> Result<Rib> {
        let text = self
            .run(&["-j", "global", "rib", "-a", family_arg(family)])
            .await?;
        parse_routes(&text)
    }

    /// One `gobgp global rib <prefix>` per prefix (the CLI takes one at a time), a few
    /// at once.
    pub(crate) async fn routes_for(&self, family: Family, prefixes: &[IpNet]) -> Result<Rib> {
        /// Concurrent CLI processes; the machine has two cores.
        const PARALLEL: usize = 4;
        let mut rib = Rib::new();
        for chunk in prefixes.chunks(PARALLEL) {
            let queries = chunk.iter().map(|prefix| async move {
                let prefix = prefix.to_string();
                self.run(&["-j", "global", "rib", "-a", family_arg(family), &prefix])
                    .await
            });
            for text in futures::future::join_all(queries).await {
                rib.extend(parse_routes(&text?)?);
            }
        }
        Ok(rib)
    }

    pub(crate) async fn route_count(&self, family: Family) -> Result<usize> {
        let text = self
            .run(&["-j", "global", "rib", "summary", "-a", family_arg(family)])
            .await?;
        parse_count(&text)
    }

    pub(crate) async fn neighbors(&self) -> Result<Vec<TorNeighbor>> {
        self.api().await?.neighbors().await
    }

    pub(crate) async fn path_sources(&self, prefix: IpNet) -> Result<Vec<IpAddr>> {
        self.api().await?.path_sources(prefix).await
    }
}

pub(crate) fn family_arg(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// Writes `tor.toml` and returns how to start gobgpd on it.
pub(crate) fn prepare(config: &TorConfig, port: u16, dir: &Path) -> Result<Launch> {
    let program = bins::GOBGPD.resolve()?;
    let api_port = process::free_port()?;
    let client = Client::new(api_port)?;
    std::fs::write(dir.join("tor.toml"), render_config(config, port))
        .context("writing tor.toml")?;
    Ok(Launch {
        name: "gobgpd",
        program,
        args: [
            "-f",
            "tor.toml",
            "-t",
            "toml",
            "-p",
            "--api-hosts",
            &format!("127.0.0.1:{api_port}"),
            "--pprof-disable",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect(),
        backend: Backend::Gobgp(client),
        helpers: Vec::new(),
        user: crate::process::User::Nobody,
    })
}

/// The ToR's TOML. No `[zebra]` section, so gobgpd never touches the kernel FIB.
pub(crate) fn render_config(config: &TorConfig, port: u16) -> String {
    let mut toml = String::new();
    let _ = writeln!(
        toml,
        "[global.config]\n  as = {}\n  router-id = \"{}\"\n  port = {port}\n  \
         local-address-list = [\"{}\"]",
        config.local_asn, config.router_id, config.listen_addr
    );
    // ECMP: keep and report every equal path, not only the best.
    toml.push_str("[global.use-multiple-paths.config]\n  enabled = true\n");
    if !config.export_to_peers {
        toml.push_str("[global.apply-policy.config]\n  default-export-policy = \"reject-route\"\n");
    }
    let _ = writeln!(
        toml,
        "[[peer-groups]]\n  [peer-groups.config]\n    peer-group-name = \"nodes\"\n    \
         peer-as = {}",
        config.peer_asn
    );
    if let Some(password) = &config.md5_password {
        let _ = writeln!(toml, "    auth-password = \"{password}\"");
    }
    let _ = writeln!(
        toml,
        "  [peer-groups.timers.config]\n    hold-time = {}\n    keepalive-interval = {}\n    \
         minimum-advertisement-interval = 0",
        config.hold_time,
        config.keepalive()
    );
    if let Some(restart_time) = config.graceful_restart {
        let _ = writeln!(
            toml,
            "  [peer-groups.graceful-restart.config]\n    enabled = true\n    \
             restart-time = {restart_time}"
        );
    }
    let mut families = vec!["ipv4-unicast"];
    if config.ipv6 {
        families.push("ipv6-unicast");
    }
    for family in families {
        let _ = writeln!(
            toml,
            "  [[peer-groups.afi-safis]]\n    [peer-groups.afi-safis.config]\n      \
             afi-safi-name = \"{family}\""
        );
        if config.graceful_restart.is_some() {
            toml.push_str(
                "    [peer-groups.afi-safis.mp-graceful-restart.config]\n      enabled = true\n",
            );
        }
    }
    let _ = writeln!(
        toml,
        "[[dynamic-neighbors]]\n  [dynamic-neighbors.config]\n    prefix = \"{}\"\n    \
         peer-group = \"nodes\"",
        config.neighbor_range
    );
    toml
}

/// Parses `gobgp -j global rib -a <family>`: `{"<prefix>": [path, ...], ...}` where each
/// path has `neighbor-ip` and a list of `attrs` tagged with their BGP attribute type code.
pub(crate) fn parse_routes(text: &str) -> Result<Rib> {
    let json: Value = serde_json::from_str(text.trim()).context("gobgp rib JSON")?;
    let Some(prefixes) = json.as_object() else {
        bail!("gobgp rib JSON is not an object: {}", truncate(text));
    };
    let mut rib = Rib::new();
    for (prefix, paths) in prefixes {
        let prefix: IpNet = prefix
            .parse()
            .with_context(|| format!("gobgp prefix {prefix}"))?;
        let mut out = Vec::new();
        for path in paths.as_array().into_iter().flatten() {
            out.push(parse_path(path)?);
        }
        out.sort();
        rib.insert(prefix, out);
    }
    Ok(rib)
}

fn parse_path(path: &Value) -> Result<TorPath> {
    let neighbor: IpAddr = path
        .get("neighbor-ip")
        .and_then(Value::as_str)
        .context("path without neighbor-ip")?
        .parse()
        .context("neighbor-ip")?;
    let mut out = TorPath::from_neighbor(neighbor);
    out.stale = path.get("stale").and_then(Value::as_bool).unwrap_or(false);
    out.selected = path.get("best").and_then(Value::as_bool).unwrap_or(false);
    for attr in path
        .get("attrs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match attr.get("type").and_then(Value::as_u64) {
            // AS_PATH
            Some(2) => {
                for segment in attr
                    .get("as_paths")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.as_path.extend(
                        segment
                            .get("asns")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(as_u32),
                    );
                }
            }
            // NEXT_HOP, MP_REACH_NLRI
            Some(3 | 14) => {
                out.next_hop = attr
                    .get("nexthop")
                    .and_then(Value::as_str)
                    .and_then(|hop| hop.parse().ok());
            }
            // MULTI_EXIT_DISC
            Some(4) => out.med = attr.get("metric").and_then(as_u32),
            // LOCAL_PREF
            Some(5) => out.local_pref = attr.get("value").and_then(as_u32),
            // COMMUNITIES, as 32-bit numbers
            Some(8) => {
                out.communities = attr
                    .get("communities")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(as_u32)
                    .map(|c| ((c >> 16) as u16, (c & 0xffff) as u16))
                    .collect();
            }
            // LARGE_COMMUNITY
            Some(32) => {
                out.large_communities = attr
                    .get("value")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        Some((
                            c.get("ASN").and_then(as_u32)?,
                            c.get("LocalData1").and_then(as_u32)?,
                            c.get("LocalData2").and_then(as_u32)?,
                        ))
                    })
                    .collect();
            }
            _ => {}
        }
    }
    Ok(out)
}

fn as_u32(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok())
}

/// Parses `gobgp -j global rib summary`: `{"num_destination":N,"num_path":M}`.
pub(crate) fn parse_count(text: &str) -> Result<usize> {
    let json: Value = serde_json::from_str(text.trim()).context("gobgp rib summary JSON")?;
    if !json.is_object() {
        bail!("gobgp rib summary is not an object: {}", truncate(text));
    }
    // protobuf JSON leaves zero values out, so an empty table prints `{}`.
    Ok(json
        .get("num_destination")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize)
}

/// Parses `gobgp -j neighbor`.
pub(crate) fn parse_neighbors(text: &str) -> Result<Vec<TorNeighbor>> {
    let json: Value = serde_json::from_str(text.trim()).context("gobgp neighbor JSON")?;
    let mut out = Vec::new();
    for peer in json.as_array().into_iter().flatten() {
        let state = peer.get("state").context("neighbor without state")?;
        let address: IpAddr = state
            .get("neighbor_address")
            .and_then(Value::as_str)
            .context("neighbor without address")?
            .parse()?;
        let session_state = state
            .get("session_state")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let prefixes_received = peer
            .get("afi_safis")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|afi| afi.get("state")?.get("accepted")?.as_u64())
            .sum();
        out.push(TorNeighbor {
            address,
            established: session_state == SESSION_ESTABLISHED,
            state: state_name(session_state).to_owned(),
            prefixes_received,
        });
    }
    Ok(out)
}

/// GoBGP's `session_state` numbers (its gRPC enum) as RFC 4271 state names.
pub(crate) fn state_name(state: i64) -> &'static str {
    match state {
        1 => "Idle",
        2 => "Connect",
        3 => "Active",
        4 => "OpenSent",
        5 => "OpenConfirm",
        SESSION_ESTABLISHED => "Established",
        _ => "Unknown",
    }
}

fn truncate(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(200)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TorKind;

    /// Captured from GoBGP 3.10: one prefix with two paths (ECMP) from two neighbors.
    const RIB: &str = r#"{"10.9.0.3/32":[{"nlri":{"prefix":"10.9.0.3/32"},"age":1795495097,"best":true,"attrs":[{"type":1,"value":2},{"type":2,"as_paths":[{"segment_type":2,"num":1,"asns":[65010]}]},{"type":3,"nexthop":"192.0.2.21"}],"stale":false,"source-id":"127.0.0.21","neighbor-ip":"127.0.0.21"},{"nlri":{"prefix":"10.9.0.3/32"},"age":1795495090,"best":false,"attrs":[{"type":1,"value":2},{"type":2,"as_paths":[{"segment_type":2,"num":1,"asns":[65010]}]},{"type":3,"nexthop":"192.0.2.20"},{"type":4,"metric":5},{"type":8,"communities":[4260495361]},{"type":32,"value":[{"ASN":65010,"LocalData1":1,"LocalData2":2}]}],"stale":false,"source-id":"127.0.0.20","neighbor-ip":"127.0.0.20"}]}"#;

    const RIB6: &str = r#"{"2001:db8::1/128":[{"nlri":{"prefix":"2001:db8::1/128"},"age":1795495082,"best":true,"attrs":[{"type":1,"value":2},{"type":2,"as_paths":[{"segment_type":2,"num":1,"asns":[65010]}]},{"type":14,"nexthop":"::1","afi":2,"safi":1,"value":[{"prefix":"2001:db8::1/128"}]}],"stale":false,"source-id":"127.0.0.20","neighbor-ip":"127.0.0.20"}]}"#;

    #[test]
    fn parses_ecmp_paths_with_attributes() -> Result<()> {
        let rib = parse_routes(RIB)?;
        let paths = &rib[&"10.9.0.3/32".parse::<IpNet>()?];
        assert_eq!(paths.len(), 2);
        let first = &paths[0];
        assert_eq!(first.neighbor, "127.0.0.20".parse::<IpAddr>()?);
        assert_eq!(first.next_hop, Some("192.0.2.20".parse()?));
        assert_eq!(first.as_path, vec![65010]);
        assert_eq!(first.med, Some(5));
        assert_eq!(first.communities, vec![(65010, 1)]);
        assert_eq!(first.large_communities, vec![(65010, 1, 2)]);
        assert_eq!(paths[1].neighbor, "127.0.0.21".parse::<IpAddr>()?);
        assert_eq!(paths[1].med, None);
        Ok(())
    }

    #[test]
    fn parses_ipv6_next_hop_from_mp_reach() -> Result<()> {
        let rib = parse_routes(RIB6)?;
        let paths = &rib[&"2001:db8::1/128".parse::<IpNet>()?];
        assert_eq!(paths[0].next_hop, Some("::1".parse()?));
        assert!(parse_routes("{}")?.is_empty());
        Ok(())
    }

    #[test]
    fn parses_rib_summary() -> Result<()> {
        assert_eq!(
            parse_count(r#"{"num_destination":365,"num_path":366}"#)?,
            365
        );
        // An empty table leaves the fields out.
        assert_eq!(parse_count("{}")?, 0);
        Ok(())
    }

    #[test]
    fn parses_neighbors() -> Result<()> {
        let text = r#"[{"conf":{"local_asn":65001,"peer_asn":65010,"peer_group":"nodes","type":1},"state":{"neighbor_address":"127.0.0.20","peer_asn":65010,"session_state":6},"afi_safis":[{"state":{"family":{"afi":1,"safi":1},"enabled":true,"received":1,"accepted":1}},{"state":{"family":{"afi":2,"safi":1},"enabled":true,"received":2,"accepted":2}}]}]"#;
        let neighbors = parse_neighbors(text)?;
        assert_eq!(neighbors.len(), 1);
        assert!(neighbors[0].established);
        assert_eq!(neighbors[0].state, "Established");
        assert_eq!(neighbors[0].prefixes_received, 3);
        assert!(parse_neighbors("[]")?.is_empty());
        Ok(())
    }

    #[test]
    fn config_has_dynamic_neighbors_and_no_zebra() {
        let mut config = TorConfig::new(TorKind::Gobgp);
        config.graceful_restart = Some(30);
        config.ipv6 = true;
        let toml = render_config(&config, 20179);
        assert!(toml.contains("port = 20179"));
        assert!(toml.contains("prefix = \"127.0.0.0/24\""));
        assert!(toml.contains("restart-time = 30"));
        assert!(toml.contains("ipv6-unicast"));
        assert!(!toml.contains("zebra"));
    }
}
