//! Decoding rows into domain types. Anything that does not decode is reported as
//! [`StoreError::Corrupt`], never a panic.

use std::net::IpAddr;

use herald_ipam_core::ClaimRecord;
use herald_model::addr::ip_from_key;
use herald_model::{
    Allocation, AssignedIp, HistoryAction, HistoryEntry, Owner, PoolName, PoolSpec, ServicePort,
    TrafficPolicy,
};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Event, StoreError, StoredPool};

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn spec_json(spec: &PoolSpec) -> Result<String, StoreError> {
    serde_json::to_string(spec).map_err(corrupt)
}

pub(crate) fn pool_from_row(row: &AnyRow) -> Result<StoredPool, StoreError> {
    let name: String = row.try_get("name")?;
    let spec: PoolSpec = serde_json::from_str(&row.try_get::<String, _>("spec")?)
        .map_err(|e| corrupt(format!("pool {name}: {e}")))?;
    Ok(StoredPool {
        spec,
        generation: row.try_get("generation")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) fn ip_from_row(row: &AnyRow, column: &str) -> Result<IpAddr, StoreError> {
    let key: Vec<u8> = row.try_get(column)?;
    ip_from_key(&key).ok_or_else(|| corrupt(format!("{column} is {} bytes long", key.len())))
}

fn ports_from_row(row: &AnyRow) -> Result<Vec<ServicePort>, StoreError> {
    serde_json::from_str(&row.try_get::<String, _>("ports")?).map_err(corrupt)
}

pub(crate) fn claim_from_row(row: &AnyRow) -> Result<ClaimRecord, StoreError> {
    Ok(ClaimRecord {
        ip: ip_from_row(row, "ip")?,
        tag: row.try_get("tag")?,
        pool: row.try_get("pool")?,
        owner_uid: row.try_get("owner_uid")?,
        ports: ports_from_row(row)?,
    })
}

/// One owner's rows (one per family), in family order.
pub(crate) fn allocation_from_rows(rows: &[AnyRow]) -> Result<Allocation, StoreError> {
    let first = rows
        .first()
        .ok_or_else(|| corrupt("an allocation without rows"))?;
    let mut ips = Vec::with_capacity(rows.len());
    for row in rows {
        let pool: String = row.try_get("pool")?;
        ips.push(AssignedIp {
            ip: ip_from_row(row, "ip")?,
            pool: PoolName::parse("pool", &pool).map_err(corrupt)?,
        });
    }
    Ok(Allocation {
        owner: Owner {
            cluster_id: first.try_get("cluster_id")?,
            namespace: first.try_get("namespace")?,
            name: first.try_get("name")?,
            uid: first.try_get("owner_uid")?,
        },
        ips,
        sharing_key: first.try_get("sharing_key")?,
        ports: ports_from_row(first)?,
        traffic_policy: TrafficPolicy::from_code(first.try_get("traffic_policy")?),
        created_at: first.try_get("created_at")?,
    })
}

pub(crate) fn history_from_row(row: &AnyRow) -> Result<HistoryEntry, StoreError> {
    let kind: String = row.try_get("kind")?;
    let action = match kind.as_str() {
        "assigned" => HistoryAction::Assigned,
        "released" => HistoryAction::Released,
        other => return Err(corrupt(format!("history entry of kind {other:?}"))),
    };
    let ip: String = row.try_get("ip")?;
    Ok(HistoryEntry {
        revision: row.try_get("revision")?,
        at: row.try_get("at")?,
        action,
        ip: ip
            .parse()
            .map_err(|_| corrupt(format!("history address {ip:?}")))?,
        pool: row.try_get("pool")?,
        owner: Owner {
            cluster_id: row.try_get("cluster_id")?,
            namespace: row.try_get("namespace")?,
            name: row.try_get("name")?,
            uid: row.try_get("owner_uid")?,
        },
        reason: row.try_get("reason")?,
    })
}

pub(crate) fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let kind: String = row.try_get("kind")?;
    let revision: i64 = row.try_get("revision")?;
    let pool: String = row.try_get("pool")?;
    Ok(match kind.as_str() {
        "assigned" => Event::Assigned(history_from_row(row)?, row.try_get("tag")?),
        "released" => Event::Released(history_from_row(row)?, row.try_get("tag")?),
        "pool_changed" => Event::PoolChanged { revision, pool },
        "pool_deleted" => Event::PoolDeleted { revision, pool },
        "node_changed" => Event::NodeChanged {
            revision,
            node: row.try_get("name")?,
        },
        "node_deleted" => Event::NodeDeleted {
            revision,
            node: row.try_get("name")?,
        },
        "endpoints_changed" => Event::EndpointsChanged {
            revision,
            owner_uid: row.try_get("owner_uid")?,
        },
        "policy_changed" => Event::PolicyChanged { revision },
        other => return Err(corrupt(format!("event of kind {other:?}"))),
    })
}
