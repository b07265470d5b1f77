//! Benchmark programs comparing Herald against its comparators in the same run.
//!
//! Machines here are small and their disks noisy, so every figure that has a comparator is
//! measured back to back with it, against the same Postgres server, and reported as a
//! ratio next to the absolute numbers (see `BENCHMARKS.md`).

pub mod benches;
pub mod bgp;
pub mod cpu;
pub mod fanout_floor;
pub mod insert_server;
pub mod ipam;
pub mod kube;
pub mod machine;
pub mod mtls;
pub mod pg;
pub mod pipeline;
pub mod replicas;
pub mod report;
pub mod rounds;
pub mod runner;
pub mod scale;
pub mod speakers;
pub mod stats;
pub mod trace;
