//! Address pools: where LoadBalancer IPs come from, and who may get them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::selector::is_dns_label;
use crate::{AddrRange, FieldError, IpFamily, LabelSelector};

/// At most this many address entries per pool: enough for any real pool, small enough that
/// a request can never make the server do unbounded work.
pub const MAX_POOL_ADDRESSES: usize = 256;
/// At most this many namespaces in a pool's namespace list.
pub const MAX_POOL_NAMESPACES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
/// The name is shared, not copied, by its clones: every address of a pool carries it.
pub struct PoolName(Arc<str>);

impl PoolName {
    /// Pool names are DNS labels, like the Kubernetes objects they replace.
    pub fn parse(field: &str, name: &str) -> Result<Self, FieldError> {
        if name.is_empty() {
            return Err(FieldError::new(field, name, "is empty"));
        }
        if name.len() > 63 {
            return Err(FieldError::new(field, name, "is longer than 63 characters"));
        }
        if !is_dns_label(name) {
            return Err(FieldError::new(
                field,
                name,
                "must be lowercase letters, digits and '-', starting and ending with a letter or digit",
            ));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: PoolName,
    pub addresses: Vec<AddrRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    pub allow_first_last: bool,
    pub disabled: bool,
    pub namespaces: Vec<String>,
    pub namespace_selector: LabelSelector,
    pub service_selector: LabelSelector,
    pub priority: i32,
    pub aggregation_length_v4: Option<u8>,
    pub aggregation_length_v6: Option<u8>,
    /// Seconds a released address rests before automatic allocation reuses it. Absent in
    /// specs stored before it existed, which meant no quarantine.
    #[serde(default)]
    pub quarantine_seconds: u32,
}

/// The longest quarantine a pool may ask for: 30 days.
pub const MAX_QUARANTINE_SECONDS: u32 = 30 * 24 * 3600;

/// The raw parts of a pool as they arrive, before validation.
#[derive(Debug, Clone, Default)]
pub struct PoolInput {
    pub name: String,
    pub addresses: Vec<String>,
    pub auto_assign: Option<bool>,
    pub avoid_buggy_ips: bool,
    pub allow_first_last: bool,
    pub disabled: bool,
    pub namespaces: Vec<String>,
    pub namespace_selector: LabelSelector,
    pub service_selector: LabelSelector,
    pub priority: i32,
    pub aggregation_length_v4: u32,
    pub aggregation_length_v6: u32,
    pub quarantine_seconds: u32,
}

impl PoolSpec {
    /// Validates every field; field names are given relative to the `pool` message.
    pub fn from_input(input: PoolInput) -> Result<Self, FieldError> {
        let name = PoolName::parse("pool.name", &input.name)?;
        if input.addresses.is_empty() {
            return Err(FieldError::new(
                "pool.addresses",
                "",
                "a pool needs at least one CIDR or range",
            ));
        }
        if input.addresses.len() > MAX_POOL_ADDRESSES {
            return Err(FieldError::new(
                "pool.addresses",
                input.addresses.len(),
                format!("a pool takes at most {MAX_POOL_ADDRESSES} entries"),
            ));
        }
        let mut addresses: Vec<AddrRange> = Vec::with_capacity(input.addresses.len());
        for (i, text) in input.addresses.iter().enumerate() {
            let field = format!("pool.addresses[{i}]");
            let range: AddrRange = text
                .parse()
                .map_err(|reason| FieldError::new(&field, text, reason))?;
            if let Some((j, other)) = addresses
                .iter()
                .enumerate()
                .find(|(_, o)| o.overlaps(&range))
            {
                return Err(FieldError::new(
                    field,
                    text,
                    format!("overlaps pool.addresses[{j}] {other}"),
                ));
            }
            addresses.push(range);
        }
        if input.namespaces.len() > MAX_POOL_NAMESPACES {
            return Err(FieldError::new(
                "pool.namespaces",
                input.namespaces.len(),
                format!("at most {MAX_POOL_NAMESPACES} namespaces"),
            ));
        }
        for (i, ns) in input.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                return Err(FieldError::new(
                    format!("pool.namespaces[{i}]"),
                    ns,
                    "is not a valid namespace name",
                ));
            }
        }
        input
            .namespace_selector
            .validate("pool.namespace_selector")?;
        input.service_selector.validate("pool.service_selector")?;
        let aggregation_length_v4 = aggregation(
            "pool.aggregation_length_v4",
            input.aggregation_length_v4,
            IpFamily::V4,
            &addresses,
        )?;
        let aggregation_length_v6 = aggregation(
            "pool.aggregation_length_v6",
            input.aggregation_length_v6,
            IpFamily::V6,
            &addresses,
        )?;
        if input.quarantine_seconds > MAX_QUARANTINE_SECONDS {
            return Err(FieldError::new(
                "pool.quarantine_seconds",
                input.quarantine_seconds.to_string(),
                format!("may be at most {MAX_QUARANTINE_SECONDS} (30 days)"),
            ));
        }
        Ok(Self {
            name,
            addresses,
            auto_assign: input.auto_assign.unwrap_or(true),
            avoid_buggy_ips: input.avoid_buggy_ips,
            allow_first_last: input.allow_first_last,
            disabled: input.disabled,
            namespaces: input.namespaces,
            namespace_selector: input.namespace_selector,
            service_selector: input.service_selector,
            priority: input.priority,
            aggregation_length_v4,
            aggregation_length_v6,
            quarantine_seconds: input.quarantine_seconds,
        })
    }

    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .filter(|f| self.addresses.iter().any(|r| r.family == *f))
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.addresses.iter().any(|r| r.contains(ip))
    }

    /// Whether this pool may serve a Service from `namespace` with these labels, by the
    /// pool's scoping rules alone (not by capacity, `disabled` or `auto_assign`).
    pub fn serves(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
            && self.namespace_selector.matches(namespace_labels)
            && self.service_selector.matches(service_labels)
    }
}

fn aggregation(
    field: &str,
    value: u32,
    family: IpFamily,
    addresses: &[AddrRange],
) -> Result<Option<u8>, FieldError> {
    if value == 0 {
        return Ok(None);
    }
    let bits = u32::from(family.bits());
    if value > bits {
        return Err(FieldError::new(
            field,
            value,
            format!("must be at most {bits}"),
        ));
    }
    if !addresses.iter().any(|r| r.family == family) {
        return Err(FieldError::new(
            field,
            value,
            format!("the pool has no {family} addresses"),
        ));
    }
    Ok(u8::try_from(value).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(addresses: &[&str]) -> PoolInput {
        PoolInput {
            name: "lab".into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn lab_pool_validates_with_defaults() {
        let spec = PoolSpec::from_input(input(&["172.16.0.240/28"])).expect("valid");
        assert!(
            spec.auto_assign,
            "auto_assign defaults to true as in MetalLB"
        );
        assert!(!spec.allow_first_last);
        assert_eq!(spec.families().collect::<Vec<_>>(), [IpFamily::V4]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let field = |i: PoolInput| PoolSpec::from_input(i).expect_err("invalid").field;
        assert_eq!(
            field(PoolInput {
                name: "".into(),
                ..input(&["10.0.0.0/24"])
            }),
            "pool.name"
        );
        assert_eq!(
            field(PoolInput {
                name: "Bad_Name".into(),
                ..input(&["10.0.0.0/24"])
            }),
            "pool.name"
        );
        assert_eq!(
            field(PoolInput {
                name: "a".repeat(64),
                ..input(&["10.0.0.0/24"])
            }),
            "pool.name"
        );
        assert_eq!(field(input(&[])), "pool.addresses");
        assert_eq!(
            field(input(&["10.0.0.0/24", "10.0.0.1/24"])),
            "pool.addresses[1]"
        );
        assert_eq!(
            field(input(&["10.0.0.0/24", "10.0.0.128/25"])),
            "pool.addresses[1]"
        );
        assert_eq!(
            field(PoolInput {
                namespaces: vec!["UPPER".into()],
                ..input(&["10.0.0.0/24"])
            }),
            "pool.namespaces[0]"
        );
        assert_eq!(
            field(PoolInput {
                aggregation_length_v4: 33,
                ..input(&["10.0.0.0/24"])
            }),
            "pool.aggregation_length_v4"
        );
        assert_eq!(
            field(PoolInput {
                aggregation_length_v6: 64,
                ..input(&["10.0.0.0/24"])
            }),
            "pool.aggregation_length_v6"
        );
        assert_eq!(
            field(PoolInput {
                quarantine_seconds: MAX_QUARANTINE_SECONDS + 1,
                ..input(&["10.0.0.0/24"])
            }),
            "pool.quarantine_seconds"
        );
        let too_many: Vec<String> = (0..=MAX_POOL_ADDRESSES)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        assert_eq!(
            field(PoolInput {
                addresses: too_many,
                ..input(&[])
            }),
            "pool.addresses"
        );
    }

    #[test]
    fn scoping() {
        let spec = PoolSpec::from_input(PoolInput {
            namespaces: vec!["web".into()],
            ..input(&["10.0.0.0/24"])
        })
        .expect("valid");
        let none = BTreeMap::new();
        assert!(spec.serves("web", &none, &none));
        assert!(!spec.serves("db", &none, &none));
    }
}
