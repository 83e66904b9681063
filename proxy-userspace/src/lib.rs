//! ebpf-proxy's agent as a library: pure translation and planning, and the syscall edges
//! (datapath, netlink, bpffs) kept apart so the logic can be tested without a kernel.
pub mod abi;
pub mod agent;
pub mod attach;
pub mod bpffs;
pub mod datapath;
pub mod inspect;
pub mod labtools;
pub mod manifests;
pub mod netlink;
pub mod plan;
pub mod translate;
