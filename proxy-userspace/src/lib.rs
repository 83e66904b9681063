//! ebpf-proxy's agent as a library: pure translation and planning, and the syscall edges
//! (datapath, netlink, bpffs) kept apart so the logic can be tested without a kernel.
pub mod abi;
pub mod agent;
pub mod attach;
pub mod bpffs;
pub mod config;
pub mod datapath;
pub mod health;
pub mod httpd;
pub mod inspect;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod metrics;
pub mod netlink;
pub mod plan;
pub mod sockhooks;
pub mod trace;
pub mod translate;
pub mod uplinks;
