//! Hooks on a pod's host-side veth (a port of the pod bridge).
use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::lb::{Origin, run};

/// tc ingress on a pod's host-side veth: every packet the pod sends. Balances new flows to
/// services and translates packets of tracked flows (forward, and replies of local backends).
#[classifier]
pub fn lb_pod_in(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Pod, true)
}

/// tc egress on a pod's host-side veth: every packet delivered to the pod. Reverse-translates
/// replies of tracked flows that no earlier hook translated (backends on other nodes).
#[classifier]
pub fn lb_pod_out(ctx: TcContext) -> i32 {
    run(&ctx, Origin::Pod, false)
}
