//! Lab tooling, kept out of the shipped agent: the serve_hostname-like pod server and the
//! probe, the canary, the fake Kubernetes API server and the IPIP/GUE encapsulator. The lab
//! (`proxy-lab`) runs them through the `ebpf-proxy-lab` binary; tests use them as a library.
pub mod canary;
pub mod conntrack;
pub mod encap;
pub mod fakeapi;
pub mod kubebench;
pub mod serve_probe;
pub mod udpflow;
