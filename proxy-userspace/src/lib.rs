//! ebpf-proxy's agent as a library, in rooms along the data flow: `source` (API objects) ->
//! `sync` (one reconcile step) -> `translate` (pure) -> `plan` (pure) -> `datapath` (syscalls),
//! with `serve` (health, metrics) beside and `cmd` (the subcommands) on top.
pub mod abi;
pub mod cmd;
pub mod conntrack;
pub mod datapath;
pub mod logging;
pub mod packet;
pub mod plan;
pub mod serve;
pub mod source;
pub mod sync;
pub mod translate;
