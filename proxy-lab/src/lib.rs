//! The network-namespace lab as a library: the topology (`lab`), a two-node cluster with
//! agents and pod servers on it (`cluster`), the shipped DaemonSet's container as a lab node would run it (`daemonset`),
//! service fixtures (`services`) and the past
//! releases upgrades are tested from (`releases`). `cargo xtask` (lab CLI, demo), the bench
//! and the end-to-end tests in `tests/` drive it.
pub mod cluster;
pub mod daemonset;
pub mod lab;
pub mod programs;
pub mod releases;
pub mod services;
