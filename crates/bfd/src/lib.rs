//! Herald's BFD engine (RFC 5880 asynchronous mode; single-hop RFC 5881 and multihop
//! RFC 5883), a protocol engine of its own beside the BGP one.
//!
//! Layers, each usable and tested on its own:
//! - [`packet`]: the Control packet, both ways, and the §6.8.6 checks a packet alone
//!   decides.
//! - [`session`]: one session's state machine, sans-IO:
//!   [`Session::on_packet`]`(now, packet)` and [`Session::on_timers`]`(now)` return
//!   [`Output`]s.
//! - [`driver`]: tokio tasks owning the UDP sockets (ports, source ports and TTL as the
//!   RFCs say) and the timers; [`Bfd::add`] gives a [`SessionHandle`].
//!
//! The crate knows addresses and timers, never BGP or Herald's types.

pub mod driver;
pub mod packet;
pub mod session;

pub use driver::{Bfd, BfdError, PeerSpec, RxCounters, SessionHandle};
pub use packet::{ControlPacket, Diagnostic, PacketError, State};
pub use session::{Output, Session, SessionConfig, SessionStatus};
