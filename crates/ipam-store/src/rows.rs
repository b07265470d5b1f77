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
use sqlx::postgres::PgRow;

use crate::{Event, HeldAddress, StoreError, StoredPool};

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// The columns of a change-log row, read alike from the generic and the typed Postgres
/// driver (the change feed reads through the latter).
pub(crate) trait LogRow {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
}

impl LogRow for AnyRow {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        Ok(self.try_get(column)?)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        Ok(self.try_get(column)?)
    }
}

impl LogRow for PgRow {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        Ok(self.try_get(column)?)
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        Ok(self.try_get(column)?)
    }
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

/// One row of an owner's allocation: the allocation with this row's address alone.
pub(crate) fn held_address_from_row(row: &AnyRow) -> Result<HeldAddress, StoreError> {
    Ok(HeldAddress {
        allocation: allocation_from_rows(std::slice::from_ref(row))?,
        tag: row.try_get("tag")?,
    })
}

pub(crate) fn history_from_row(row: &impl LogRow) -> Result<HistoryEntry, StoreError> {
    let kind = row.text("kind")?;
    let action = match kind.as_str() {
        "assigned" => HistoryAction::Assigned,
        "released" => HistoryAction::Released,
        "updated" => HistoryAction::Updated,
        other => return Err(corrupt(format!("history entry of kind {other:?}"))),
    };
    let ip = row.text("ip")?;
    Ok(HistoryEntry {
        revision: row.int("revision")?,
        at: row.int("at")?,
        action,
        ip: ip
            .parse()
            .map_err(|_| corrupt(format!("history address {ip:?}")))?,
        pool: row.text("pool")?,
        owner: Owner {
            cluster_id: row.text("cluster_id")?,
            namespace: row.text("namespace")?,
            name: row.text("name")?,
            uid: row.text("owner_uid")?,
        },
        reason: row.text("reason")?,
    })
}

pub(crate) fn event_from_row(row: &impl LogRow) -> Result<Event, StoreError> {
    let kind = row.text("kind")?;
    let revision = row.int("revision")?;
    Ok(match kind.as_str() {
        "assigned" => Event::Assigned(history_from_row(row)?, row.text("tag")?),
        "released" => Event::Released(history_from_row(row)?, row.text("tag")?),
        "updated" => Event::Updated(history_from_row(row)?, row.text("tag")?),
        "pool_changed" => Event::PoolChanged {
            revision,
            pool: row.text("pool")?,
        },
        "pool_deleted" => Event::PoolDeleted {
            revision,
            pool: row.text("pool")?,
        },
        "node_changed" => Event::NodeChanged {
            revision,
            node: row.text("name")?,
        },
        "node_deleted" => Event::NodeDeleted {
            revision,
            node: row.text("name")?,
        },
        "endpoints_changed" => Event::EndpointsChanged {
            revision,
            owner_uid: row.text("owner_uid")?,
        },
        "policy_changed" => Event::PolicyChanged { revision },
        other => return Err(corrupt(format!("event of kind {other:?}"))),
    })
}
