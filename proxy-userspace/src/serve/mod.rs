//! What the agent serves over HTTP: `/healthz` and `/livez`, healthCheckNodePort responders,
//! and `/metrics`, on hyper; and the status file `inspect` reads.
pub mod health;
pub mod http;
pub mod metrics;
pub mod process;
pub mod status;
