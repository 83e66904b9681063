//! The subcommands of `ebpf-proxy`: `run` (the agent), `inspect`, `cleanup`, `trace`, and the
//! flags and `KubeProxyConfiguration` file `run` reads.
pub mod cleanup;
pub mod config;
pub mod inspect;
pub mod run;
pub mod trace;
