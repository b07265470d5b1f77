//! Routing: nodes, endpoint facts and the BGP policy in, per-node route sets out, streamed
//! to the route speakers (`herald.routing.v1.Routing`).

pub(crate) mod convert;
mod engine;
pub mod rollout;
mod service;
mod status;

pub use engine::{EngineKind, Loading, RouteEngine, run as run_engine};
#[doc(hidden)]
pub use engine::{cluster_probe, memory_probe};
pub use service::{Ready, RoutingService};
