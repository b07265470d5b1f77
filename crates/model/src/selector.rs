//! Kubernetes label selectors (matchLabels plus matchExpressions), as pools use them to
//! scope which namespaces and Services they serve.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FieldError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: SelectorOperator,
    pub values: Vec<String>,
}

/// An empty selector matches everything, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|req| {
                let value = labels.get(&req.key);
                match req.operator {
                    SelectorOperator::In => value.is_some_and(|v| req.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !req.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// Checks the selector the way the Kubernetes API server would, so a selector that
    /// Kubernetes would refuse is refused here too.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        for (key, value) in &self.match_labels {
            validate_label_key(key)
                .map_err(|r| FieldError::new(format!("{field}.match_labels"), key, r))?;
            validate_label_value(value)
                .map_err(|r| FieldError::new(format!("{field}.match_labels[{key}]"), value, r))?;
        }
        for (i, req) in self.match_expressions.iter().enumerate() {
            let at = format!("{field}.match_expressions[{i}]");
            validate_label_key(&req.key)
                .map_err(|r| FieldError::new(format!("{at}.key"), &req.key, r))?;
            match req.operator {
                SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        "",
                        "In and NotIn need at least one value",
                    ));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !req.values.is_empty() =>
                {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        req.values.join(","),
                        "Exists and DoesNotExist take no values",
                    ));
                }
                _ => {}
            }
            for value in &req.values {
                validate_label_value(value)
                    .map_err(|r| FieldError::new(format!("{at}.values"), value, r))?;
            }
        }
        Ok(())
    }
}

/// `[prefix/]name`: an optional DNS subdomain prefix of at most 253 characters, and a name
/// of at most 63 characters of alphanumerics, `-`, `_` and `.`, starting and ending with an
/// alphanumeric.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err("label key prefix must be 1 to 253 characters".into());
        }
        if !prefix.split('.').all(is_dns_label) {
            return Err("label key prefix must be a DNS subdomain".into());
        }
    }
    if name.is_empty() {
        return Err("label key name is empty".into());
    }
    validate_label_value(name)
}

pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    let bytes = value.as_bytes();
    let ok_inner = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let ok_ends = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if ok_inner && ok_ends {
        Ok(())
    } else {
        Err(
            "must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
                .into(),
        )
    }
}

/// RFC 1123 label: 1 to 63 lowercase alphanumerics or `-`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_like_kubernetes() {
        let sel = LabelSelector {
            match_labels: labels(&[("team", "web")]),
            match_expressions: vec![
                Requirement {
                    key: "tier".into(),
                    operator: SelectorOperator::In,
                    values: vec!["fe".into(), "be".into()],
                },
                Requirement {
                    key: "legacy".into(),
                    operator: SelectorOperator::DoesNotExist,
                    values: vec![],
                },
            ],
        };
        assert!(sel.matches(&labels(&[("team", "web"), ("tier", "fe")])));
        assert!(!sel.matches(&labels(&[("team", "web"), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("team", "web"), ("tier", "fe"), ("legacy", "")])));
        assert!(!sel.matches(&labels(&[("tier", "fe")])));
        assert!(LabelSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn refuses_what_kubernetes_refuses() {
        let bad_key = LabelSelector {
            match_labels: labels(&[("-x", "y")]),
            ..Default::default()
        };
        assert_eq!(
            bad_key
                .validate("pool.service_selector")
                .map_err(|e| e.field),
            Err("pool.service_selector.match_labels".into())
        );
        let in_without_values = LabelSelector {
            match_expressions: vec![Requirement {
                key: "a".into(),
                operator: SelectorOperator::In,
                values: vec![],
            }],
            ..Default::default()
        };
        assert!(in_without_values.validate("s").is_err());
        assert!(validate_label_key("example.com/app").is_ok());
        assert!(validate_label_key("Example.com/app").is_err());
        assert!(validate_label_value(&"a".repeat(64)).is_err());
    }
}
