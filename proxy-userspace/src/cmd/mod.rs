//! The subcommands of `ebpf-proxy`: `run` (the agent), `inspect`, `cleanup`, `trace`, and the
//! flags and `KubeProxyConfiguration` file `run` reads (kube-proxy's command line: `cli`,
//! `kpflags`).
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod inspect;
pub mod kpflags;
pub mod run;
pub mod trace;
