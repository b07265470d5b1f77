//! Herald's domain types. Everything here is plain data plus validation: no gRPC, no SQL,
//! no runtime. Services convert their wire types into these at the edge, so a value of a
//! type from this crate has already been checked.

pub mod addr;
pub mod alloc;
pub mod error;
pub mod pool;
pub mod selector;

pub use addr::{AddrRange, IpFamily};
pub use alloc::{
    Allocation, AllocationRequest, AssignedIp, FamilyPolicy, HistoryAction, HistoryEntry, Owner,
    ServicePort, TrafficPolicy, same_ports,
};
pub use error::{FieldError, echo, shorten};
pub use pool::{PoolName, PoolSpec};
pub use selector::{LabelSelector, Requirement, SelectorOperator};
