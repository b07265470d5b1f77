//! Test helpers shared by Herald's crates: throwaway databases on a real Postgres server
//! or in a temporary SQLite file, free loopback ports, and child processes that are
//! stopped (by their PID) however a test ends, and an in-process OTLP trace receiver.

pub mod db;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod run;

pub use db::{TestDb, admin_url};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::{ChildProcess, free_port, wait_for_port, workspace_binary};
pub use run::run_to_exit;
