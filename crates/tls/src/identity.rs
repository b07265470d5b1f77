//! Who a peer certificate names: one Herald identity, from a SPIFFE-style URI SAN
//! (`spiffe://<trust-domain>/herald/<role>[/node/<name>]`) or, for CAs that cannot issue URI
//! SANs, a DNS SAN (`<role>.<trust-domain>`, `<node>.speaker.<trust-domain>`).
//!
//! A speaker's certificate names its node where the PKI can issue one per node. Where it
//! cannot (cert-manager gives a DaemonSet one certificate for all its pods), the speakers
//! share `spiffe://<trust-domain>/herald/speaker` ([`Role::AnySpeaker`]).

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "herald.local";
/// Longest SAN echoed in an error: enough to recognise it.
const MAX_ECHO: usize = 120;

/// What a caller may be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// The route speaker of one node.
    Speaker { node: String },
    /// The route speakers of every node, sharing one certificate: may act for any node.
    AnySpeaker,
    /// The cluster watcher.
    Watcher,
    /// A person or tool managing pools and the BGP policy.
    Operator,
    /// A person or tool that only reads.
    Reader,
}

impl Role {
    /// The role's name as written in a SAN.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Speaker { .. } | Role::AnySpeaker => "speaker",
            Role::Watcher => "watcher",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }
}

/// A caller's identity: its role and the SAN it came from (what errors and logs show).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub san: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.san)
    }
}

/// Why a certificate gives no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the client certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error(
        "the client certificate names no Herald identity in trust domain `{trust_domain}` (its SANs: {sans}); want spiffe://{trust_domain}/herald/<speaker/node/NAME|speaker|watcher|operator|reader>"
    )]
    NoIdentity { trust_domain: String, sans: String },
}

/// The identity `cert_der` (a DER certificate, already verified against the CA) names in
/// `trust_domain`. A URI SAN wins over DNS SANs.
pub fn identity(cert_der: &[u8], trust_domain: &str) -> Result<Identity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let dns = names.iter().filter_map(|n| match n {
        GeneralName::DNSName(d) => Some(*d),
        _ => None,
    });
    if let Some(found) = uris.clone().find_map(|u| from_spiffe(u, trust_domain)) {
        return Ok(found);
    }
    if let Some(found) = dns.clone().find_map(|d| from_dns(d, trust_domain)) {
        return Ok(found);
    }
    let mut sans: Vec<&str> = uris.chain(dns).collect();
    sans.truncate(4);
    let mut sans = sans.join(", ");
    if sans.is_empty() {
        sans = "none".into();
    }
    if sans.len() > MAX_ECHO {
        let cut = (0..=MAX_ECHO)
            .rev()
            .find(|i| sans.is_char_boundary(*i))
            .unwrap_or(0);
        sans.truncate(cut);
        sans.push('…');
    }
    Err(IdentityError::NoIdentity {
        trust_domain: trust_domain.to_string(),
        sans,
    })
}

/// `spiffe://<td>/herald/<role>[/node/<name>]`.
pub fn from_spiffe(uri: &str, trust_domain: &str) -> Option<Identity> {
    let path = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix("/herald/")?;
    let role = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["watcher"] => Role::Watcher,
        ["operator"] => Role::Operator,
        ["reader"] => Role::Reader,
        ["speaker"] => Role::AnySpeaker,
        ["speaker", "node", node] if is_node_name(node) => Role::Speaker {
            node: (*node).to_string(),
        },
        _ => return None,
    };
    Some(Identity {
        role,
        san: uri.to_string(),
    })
}

/// `<role>.<td>` or `<node>.speaker.<td>`.
pub fn from_dns(name: &str, trust_domain: &str) -> Option<Identity> {
    let head = name.strip_suffix(trust_domain)?.strip_suffix('.')?;
    let role = match head {
        "watcher" => Role::Watcher,
        "operator" => Role::Operator,
        "reader" => Role::Reader,
        "speaker" => Role::AnySpeaker,
        _ => {
            let node = head.strip_suffix(".speaker")?;
            if !is_node_name(node) {
                return None;
            }
            Role::Speaker {
                node: node.to_string(),
            }
        }
    };
    Some(Identity {
        role,
        san: format!("dns:{name}"),
    })
}

/// A Kubernetes Node name: a DNS subdomain.
fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uris_name_each_role() {
        let td = "example.org";
        let role = |u: &str| from_spiffe(u, td).map(|i| i.role);
        assert_eq!(
            role("spiffe://example.org/herald/speaker/node/n1"),
            Some(Role::Speaker { node: "n1".into() })
        );
        assert_eq!(
            role("spiffe://example.org/herald/watcher"),
            Some(Role::Watcher)
        );
        assert_eq!(
            role("spiffe://example.org/herald/operator"),
            Some(Role::Operator)
        );
        assert_eq!(
            role("spiffe://example.org/herald/reader"),
            Some(Role::Reader)
        );
        // Another trust domain, another prefix, a bad node name, extra segments: nothing.
        assert_eq!(role("spiffe://example.com/herald/operator"), None);
        assert_eq!(role("spiffe://example.org.evil/herald/operator"), None);
        assert_eq!(role("spiffe://example.org/other/operator"), None);
        assert_eq!(role("spiffe://example.org/herald/speaker/node/N_1"), None);
        assert_eq!(role("spiffe://example.org/herald/speaker/node/"), None);
        assert_eq!(role("spiffe://example.org/herald/operator/x"), None);
        assert_eq!(
            role("spiffe://example.org/herald/speaker"),
            Some(Role::AnySpeaker)
        );
        assert_eq!(role("spiffe://example.org/herald/speaker/node"), None);
    }

    #[test]
    fn dns_names_name_each_role() {
        let td = "herald.local";
        let role = |d: &str| from_dns(d, td).map(|i| i.role);
        assert_eq!(role("watcher.herald.local"), Some(Role::Watcher));
        assert_eq!(role("operator.herald.local"), Some(Role::Operator));
        assert_eq!(role("reader.herald.local"), Some(Role::Reader));
        assert_eq!(
            role("node-1.rack2.speaker.herald.local"),
            Some(Role::Speaker {
                node: "node-1.rack2".into()
            })
        );
        assert_eq!(role("speaker.herald.local"), Some(Role::AnySpeaker));
        assert_eq!(role(".speaker.herald.local"), None);
        assert_eq!(role("xwatcher.herald.local"), None);
        assert_eq!(role("watcher.herald.localx"), None);
        assert_eq!(role("watcherherald.local"), None);
    }
}
