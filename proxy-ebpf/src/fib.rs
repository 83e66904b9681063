//! Routing a translated packet ourselves: a FIB lookup in the node's namespace, then a redirect
//! to the egress device with the right MAC addresses. Needed when the new source address is
//! the node's own (masquerade, NodePort replies): the host stack would drop such a packet as a
//! martian if it had to forward it.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::counter;

use crate::parse::{IP_CSUM_OFF, IP_TTL_OFF};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn redirect(ctx: &TcContext, src_be: u32, dst_be: u32) -> i32 {
    let Some(scratch) = crate::maps::scratch() else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's scratch value, 4-byte aligned and 64 bytes long: a bpf_fib_lookup.
    // Every field an IPv4 lookup without flags reads is written here (the rest are outputs),
    // as a zeroed request would have them.
    let params = unsafe { &mut *((*scratch).fib.as_mut_ptr() as *mut bpf_fib_lookup) };
    params.family = AF_INET;
    params.l4_protocol = 0;
    params.sport = 0;
    params.dport = 0;
    params.__bindgen_anon_1.tot_len = 0;
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_2.rt_metric = 0;
    params.__bindgen_anon_3.ipv4_src = src_be;
    params.__bindgen_anon_4.ipv4_dst = dst_be;
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let routed = rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    // Only when we forward it ourselves: a packet handed to the stack has its TTL decremented
    // (or is answered with time exceeded) by the kernel's forwarding path.
    if routed && let Err(rc) = forward_ttl(ctx) {
        return rc;
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if ctx.store(0, &params.dmac, 0).is_err() || ctx.store(6, &params.smac, 0).is_err() {
            return TC_ACT_OK;
        }
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The next hop's MAC is not resolved yet: let the neighbour subsystem do it.
        // SAFETY: a zeroed union, then the IPv4 next hop the lookup returned.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
        return unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32;
    }
    // No route we can use: hand it to the stack as is.
    TC_ACT_OK
}

/// Decrements the TTL of a packet we are about to redirect, as a router does, fixing the header
/// checksum incrementally. A packet that would leave with TTL 0 (TTL <= 1 on arrival) is
/// dropped and counted: without this, redirected traffic had no loop guard. Err is the verdict.
#[inline(always)]
pub fn forward_ttl(ctx: &TcContext) -> Result<(), i32> {
    // TTL and protocol form one 16-bit word of the header checksum.
    let old: [u8; 2] = ctx.load(IP_TTL_OFF).map_err(|_| TC_ACT_SHOT)?;
    if old[0] <= 1 {
        return Err(crate::debug::drop(counter::DROP_TTL_EXCEEDED));
    }
    let new = [old[0] - 1, old[1]];
    ctx.store(IP_TTL_OFF, &new[0], 0).map_err(|_| TC_ACT_SHOT)?;
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )
    .map_err(|_| TC_ACT_SHOT)?;
    Ok(())
}
