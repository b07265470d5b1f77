//! The allocation policy, as pure data structures: which pools may serve a request, which
//! address to hand out, and how shared IPs are joined. No I/O: the IPAM service keeps one
//! [`PoolIndex`] in memory as a cache of the store, and the store's constraints have the
//! last word (see ARCHITECTURE.md, invariant 3).

mod error;
mod free_set;
mod index;

pub use error::AllocError;
pub use free_set::FreeSet;
pub use index::{ClaimRecord, Plan, PlanItem, PoolIndex, PoolUsage};
