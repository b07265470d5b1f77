//! Conversions between the `herald.ipam.v1` wire types and the domain model. Proto
//! messages are destructured exhaustively, so a new field is a compile error here until
//! someone decides what it means.

use std::collections::BTreeMap;
use std::net::IpAddr;

use herald_api::ipam::v1 as pb;
use herald_ipam_core::PoolUsage;
use herald_ipam_store::StoredPool;
use herald_model::pool::PoolInput;
use herald_model::{
    Allocation, AllocationRequest, FamilyPolicy, FieldError, HistoryAction, HistoryEntry, IpFamily,
    LabelSelector, Owner, PoolName, PoolSpec, Requirement, SelectorOperator, ServicePort,
    TrafficPolicy,
};

pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn family_to_pb(family: IpFamily) -> pb::IpFamily {
    match family {
        IpFamily::V4 => pb::IpFamily::Ipv4,
        IpFamily::V6 => pb::IpFamily::Ipv6,
    }
}

pub fn selector_from_pb(
    field: &str,
    selector: Option<pb::LabelSelector>,
) -> Result<LabelSelector, FieldError> {
    let Some(pb::LabelSelector {
        match_labels,
        match_expressions,
    }) = selector
    else {
        return Ok(LabelSelector::default());
    };
    let mut expressions = Vec::with_capacity(match_expressions.len());
    for (
        i,
        pb::LabelSelectorRequirement {
            key,
            operator,
            values,
        },
    ) in match_expressions.into_iter().enumerate()
    {
        use pb::label_selector_requirement::Operator;
        let operator = match Operator::try_from(operator) {
            Ok(Operator::In) => SelectorOperator::In,
            Ok(Operator::NotIn) => SelectorOperator::NotIn,
            Ok(Operator::Exists) => SelectorOperator::Exists,
            Ok(Operator::DoesNotExist) => SelectorOperator::DoesNotExist,
            Ok(Operator::Unspecified) | Err(_) => {
                return Err(FieldError::new(
                    format!("{field}.match_expressions[{i}].operator"),
                    operator,
                    "must be IN, NOT_IN, EXISTS or DOES_NOT_EXIST",
                ));
            }
        };
        expressions.push(Requirement {
            key,
            operator,
            values,
        });
    }
    Ok(LabelSelector {
        match_labels: match_labels.into_iter().collect(),
        match_expressions: expressions,
    })
}

pub fn selector_to_pb(selector: &LabelSelector) -> Option<pb::LabelSelector> {
    if selector.is_empty() {
        return None;
    }
    use pb::label_selector_requirement::Operator;
    Some(pb::LabelSelector {
        match_labels: selector.match_labels.clone().into_iter().collect(),
        match_expressions: selector
            .match_expressions
            .iter()
            .map(|r| pb::LabelSelectorRequirement {
                key: r.key.clone(),
                operator: match r.operator {
                    SelectorOperator::In => Operator::In,
                    SelectorOperator::NotIn => Operator::NotIn,
                    SelectorOperator::Exists => Operator::Exists,
                    SelectorOperator::DoesNotExist => Operator::DoesNotExist,
                } as i32,
                values: r.values.clone(),
            })
            .collect(),
    })
}

/// A pool from the wire, validated. Output-only fields are ignored, as in Kubernetes.
pub fn pool_from_pb(pool: Option<pb::Pool>) -> Result<PoolSpec, FieldError> {
    let Some(pb::Pool {
        name,
        addresses,
        auto_assign,
        avoid_buggy_ips,
        allow_first_last,
        disabled,
        namespaces,
        namespace_selector,
        service_selector,
        priority,
        aggregation_length_v4,
        aggregation_length_v6,
        quarantine_seconds,
        capacity: _,
        generation: _,
        create_time: _,
        update_time: _,
    }) = pool
    else {
        return Err(FieldError::new("pool", "", "is required"));
    };
    PoolSpec::from_input(PoolInput {
        name,
        addresses,
        auto_assign,
        avoid_buggy_ips,
        allow_first_last,
        disabled,
        namespaces,
        namespace_selector: selector_from_pb("pool.namespace_selector", namespace_selector)?,
        service_selector: selector_from_pb("pool.service_selector", service_selector)?,
        priority,
        aggregation_length_v4,
        aggregation_length_v6,
        quarantine_seconds,
    })
}

pub fn pool_to_pb(stored: &StoredPool, usage: &[PoolUsage]) -> pb::Pool {
    let spec = &stored.spec;
    pb::Pool {
        name: spec.name.to_string(),
        addresses: spec.addresses.iter().map(ToString::to_string).collect(),
        auto_assign: Some(spec.auto_assign),
        avoid_buggy_ips: spec.avoid_buggy_ips,
        allow_first_last: spec.allow_first_last,
        disabled: spec.disabled,
        namespaces: spec.namespaces.clone(),
        namespace_selector: selector_to_pb(&spec.namespace_selector),
        service_selector: selector_to_pb(&spec.service_selector),
        priority: spec.priority,
        aggregation_length_v4: spec.aggregation_length_v4.map(u32::from).unwrap_or(0),
        aggregation_length_v6: spec.aggregation_length_v6.map(u32::from).unwrap_or(0),
        quarantine_seconds: spec.quarantine_seconds,
        capacity: usage
            .iter()
            .map(|u| pb::PoolCapacity {
                family: family_to_pb(u.family) as i32,
                total: u.total.to_string(),
                used: u.used,
                free: u.free().to_string(),
                quarantined: u.quarantined,
            })
            .collect(),
        generation: u64::try_from(stored.generation).unwrap_or(0),
        create_time: Some(timestamp(stored.created_at)),
        update_time: Some(timestamp(stored.updated_at)),
    }
}

pub fn owner_to_pb(owner: &Owner) -> pb::Owner {
    pb::Owner {
        cluster_id: owner.cluster_id.clone(),
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
        uid: owner.uid.clone(),
    }
}

fn traffic_policy_to_pb(policy: TrafficPolicy) -> pb::TrafficPolicy {
    match policy {
        TrafficPolicy::Cluster => pb::TrafficPolicy::Cluster,
        TrafficPolicy::Local => pb::TrafficPolicy::Local,
    }
}

pub fn allocation_to_pb(allocation: &Allocation) -> pb::Allocation {
    pb::Allocation {
        owner: Some(owner_to_pb(&allocation.owner)),
        ips: allocation
            .ips
            .iter()
            .map(|a| pb::AssignedIp {
                ip: a.ip.to_string(),
                family: family_to_pb(IpFamily::of(a.ip)) as i32,
                pool: a.pool.to_string(),
            })
            .collect(),
        sharing_key: allocation.sharing_key.clone(),
        ports: allocation
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                protocol: p.protocol.clone(),
                port: u32::from(p.port),
            })
            .collect(),
        traffic_policy: traffic_policy_to_pb(allocation.traffic_policy) as i32,
        create_time: Some(timestamp(allocation.created_at)),
    }
}

pub fn history_to_pb(entry: &HistoryEntry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        revision: u64::try_from(entry.revision).unwrap_or(0),
        time: Some(timestamp(entry.at)),
        action: match entry.action {
            HistoryAction::Assigned => pb::history_entry::Action::Assigned,
            HistoryAction::Released => pb::history_entry::Action::Released,
            HistoryAction::Updated => pb::history_entry::Action::Updated,
        } as i32,
        ip: entry.ip.to_string(),
        pool: entry.pool.clone(),
        owner: Some(owner_to_pb(&entry.owner)),
        reason: entry.reason.clone(),
    }
}

pub fn parse_ip(field: &str, text: &str) -> Result<IpAddr, FieldError> {
    text.trim()
        .parse()
        .map_err(|_| FieldError::new(field, text, "is not an IP address"))
}

/// An Allocate request from the wire, validated; `field` prefixes field names (for batch
/// items, `requests[3]`).
pub fn allocate_request_from_pb(
    req: pb::AllocateRequest,
) -> Result<(AllocationRequest, bool), FieldError> {
    let pb::AllocateRequest {
        owner,
        service_labels,
        namespace_labels,
        ip_family_policy,
        ip_families,
        requested_ips,
        requested_pool,
        sharing_key,
        ports,
        traffic_policy,
        endpoint_selector,
        dry_run,
    } = req;
    let Some(pb::Owner {
        cluster_id,
        namespace,
        name,
        uid,
    }) = owner
    else {
        return Err(FieldError::new("owner", "", "is required"));
    };
    let family_policy = match pb::IpFamilyPolicy::try_from(ip_family_policy) {
        Ok(pb::IpFamilyPolicy::Unspecified | pb::IpFamilyPolicy::SingleStack) => {
            FamilyPolicy::SingleStack
        }
        Ok(pb::IpFamilyPolicy::PreferDualStack) => FamilyPolicy::PreferDualStack,
        Ok(pb::IpFamilyPolicy::RequireDualStack) => FamilyPolicy::RequireDualStack,
        Err(_) => {
            return Err(FieldError::new(
                "ip_family_policy",
                ip_family_policy,
                "is not a known policy",
            ));
        }
    };
    let requested_ips = requested_ips
        .iter()
        .enumerate()
        .map(|(i, text)| parse_ip(&format!("requested_ips[{i}]"), text))
        .collect::<Result<Vec<_>, _>>()?;
    let mut families = Vec::with_capacity(ip_families.len());
    for (i, family) in ip_families.iter().enumerate() {
        families.push(match pb::IpFamily::try_from(*family) {
            Ok(pb::IpFamily::Ipv4) => IpFamily::V4,
            Ok(pb::IpFamily::Ipv6) => IpFamily::V6,
            _ => {
                return Err(FieldError::new(
                    format!("ip_families[{i}]"),
                    family,
                    "must be IPV4 or IPV6",
                ));
            }
        });
    }
    if families.is_empty() {
        // Kubernetes fills ipFamilies in; a bare client gets the family of the address it
        // asks for, else IPv4.
        families.push(
            requested_ips
                .first()
                .map(|ip| IpFamily::of(*ip))
                .unwrap_or(IpFamily::V4),
        );
    }
    let requested_pool = if requested_pool.is_empty() {
        None
    } else {
        Some(PoolName::parse("requested_pool", &requested_pool)?)
    };
    let ports = ports
        .into_iter()
        .enumerate()
        .map(|(i, p)| ServicePort::parse(&format!("ports[{i}]"), &p.protocol, p.port))
        .collect::<Result<Vec<_>, _>>()?;
    let traffic_policy = match pb::TrafficPolicy::try_from(traffic_policy) {
        Ok(pb::TrafficPolicy::Unspecified | pb::TrafficPolicy::Cluster) => TrafficPolicy::Cluster,
        Ok(pb::TrafficPolicy::Local) => TrafficPolicy::Local,
        Err(_) => {
            return Err(FieldError::new(
                "traffic_policy",
                traffic_policy,
                "must be CLUSTER or LOCAL",
            ));
        }
    };
    let request = AllocationRequest {
        owner: Owner {
            cluster_id,
            namespace,
            name,
            uid,
        },
        service_labels: service_labels.into_iter().collect::<BTreeMap<_, _>>(),
        namespace_labels: namespace_labels.into_iter().collect(),
        family_policy,
        families,
        requested_ips,
        requested_pool,
        sharing_key,
        ports,
        traffic_policy,
        endpoint_selector: endpoint_selector.into_iter().collect(),
    };
    request.validate()?;
    Ok((request, dry_run))
}
