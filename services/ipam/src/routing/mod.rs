//! Routing: nodes, endpoint facts and the BGP policy in, per-node route sets out, streamed
//! to the route speakers (`herald.routing.v1.Routing`).

mod convert;
mod engine;
pub mod rollout;
mod service;

pub use engine::{RouteEngine, run as run_engine};
pub use service::{Ready, RoutingService};
