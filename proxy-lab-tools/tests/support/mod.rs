//! Test tooling shared by the integration tests: the fake API server, object builders, and
//! a harness running the agent's real source -> reconcile path into in-memory maps.
/// The fake API server lives in proxy-lab-tools (`ebpf-proxy-lab lab-apiserver` serves the lab
/// with it).
pub use proxy_lab_tools::fakeapi;
pub mod harness;
pub mod objects;
