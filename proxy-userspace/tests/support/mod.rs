//! Test tooling shared by the integration tests: the fake API server, object builders, and
//! a harness running the agent's real source -> reconcile path into in-memory maps.
pub mod fakeapi;
pub mod harness;
pub mod objects;
