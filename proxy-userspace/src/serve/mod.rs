//! What the agent serves over HTTP: `/healthz` and `/livez`, healthCheckNodePort responders,
//! and `/metrics`, on a small shared HTTP/1 server.
pub mod health;
pub mod http;
pub mod metrics;
pub mod process;
