//! Test tooling shared by the integration tests: the fake API server, object builders, and
//! a harness running the agent's real source -> reconcile path into in-memory maps.
/// The fake API server lives in the library (`ebpf-proxy lab-apiserver` serves the lab with it).
pub use proxy_userspace::fakeapi;
pub mod harness;
pub mod objects;
