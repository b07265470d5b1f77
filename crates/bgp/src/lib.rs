//! Herald's BGP engine: announces prefixes to top-of-rack routers.
//!
//! Layers, each usable and tested on its own:
//! - [`wire`]: our message types; framing, RFC 7606 error handling and the
//!   UPDATE builder; the codec (`netgauze-bgp-pkt`) is hidden behind it.
//! - [`fsm`]: the RFC 4271 session state machine, sans-IO:
//!   [`fsm::Session::handle`]`(now, event) -> Vec<Output>`.
//! - [`rib`]: the declarative RIB-out: desired set in, minimal UPDATEs out.
//! - [`driver`]: one tokio task per peer owning the socket and timers;
//!   [`driver::PeerHandle`] is the API the route speaker uses.
//!
//! The crate knows prefixes and attributes, never Services or pools.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use herald_bgp::{PeerConfig, PeerHandle, Routes, RouteAttributes, ShutdownMode};
//! let mut cfg = PeerConfig::new("127.0.0.1".parse()?, 65001, 65010, "127.0.0.10".parse()?);
//! cfg.peer_port = 10179;
//! cfg.source_addr = Some("127.0.0.10".parse()?);
//! let peer = PeerHandle::spawn(cfg).await?;
//! let mut routes = Routes::new();
//! routes.insert("10.0.0.1/32".parse()?, RouteAttributes::default().into());
//! peer.set_desired(routes);
//! peer.wait_established(std::time::Duration::from_secs(5)).await.ok();
//! println!("{:?}", peer.status());
//! peer.shutdown(ShutdownMode::Withdraw { message: "node drain".into() }).await;
//! # Ok(()) }
//! ```

pub mod driver;
pub mod fsm;
pub mod fuzzing;
pub mod rib;
pub mod wire;

pub use driver::{BfdLink, PeerConfig, PeerHandle, SpawnError, Synced, UpdateObserver};
pub use fsm::{
    GracefulRestartConfig, Ipv4NlriPolicy, Negotiated, PeerStatus, SentUpdate, Session,
    SessionConfig, ShutdownMode, State,
};
pub use rib::{AttributeInterner, RouteAttributes, Routes, SharedAttributes};
pub use wire::{Family, LargeCommunity, Notification, Origin};
