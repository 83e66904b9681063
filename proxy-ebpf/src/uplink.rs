//! The hook on the node's uplink(s): traffic from outside the node.
//!
//! NodePort, LoadBalancer IPs and externalIPs arrive here, plain (a Maglev-style balancer
//! delivering with the VIP still as destination) or wrapped Katran style in IPIP or GUE
//! (UDP to `GUE_PORT`, variant 1 direct IP-in-UDP or variant 0 with an empty GUE header)
//! addressed to this node: the outer header is stripped and the inner packet, VIP intact, goes
//! through the same pipeline. Replies go straight to the client (DSR), never back through the
//! balancer. Replies of masqueraded flows coming back from other nodes are translated here too.
use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{GUE_PORT, counter, proto};

use crate::{
    lb::{Origin, process},
    maps::{count, node_config},
    parse::ETH_HLEN,
};

/// tc ingress on the uplink.
#[classifier]
pub fn lb_up_in(ctx: TcContext) -> i32 {
    if decapsulate(&ctx).is_err() {
        return TC_ACT_OK;
    }
    match process(&ctx, Origin::External, true) {
        Ok(v) | Err(v) => v,
    }
}

/// Strips an IPIP or GUE header addressed to this node. `Ok` also when there is nothing to do.
#[inline(always)]
fn decapsulate(ctx: &TcContext) -> Result<(), ()> {
    let ethertype: u16 = ctx.load(12).map_err(|_| ())?;
    if ethertype != 0x0800u16.to_be() {
        return Ok(());
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if vihl != 0x45 {
        return Ok(());
    }
    let outer_proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    // Only IPIP and UDP can be encapsulation: don't touch the config map for anything else.
    if outer_proto != 4 && outer_proto != proto::UDP {
        return Ok(());
    }
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    let cfg = node_config();
    if cfg.node_addr_be == 0 || daddr != cfg.node_addr_be {
        return Ok(());
    }
    let strip = if outer_proto == 4 {
        IPIP_STRIP
    } else {
        let dport: u16 = ctx.load(ETH_HLEN + 22).map_err(|_| ())?;
        let first: u8 = ctx.load(ETH_HLEN + 28).map_err(|_| ())?;
        match gue_strip(dport, first) {
            Some(n) => n,
            None => return Ok(()),
        }
    };
    let inner: u8 = ctx.load(ETH_HLEN + strip).map_err(|_| ())?;
    if inner >> 4 != 4 {
        return Ok(());
    }
    // SAFETY: shrinking our own skb right after the MAC header.
    if unsafe {
        aya_ebpf::helpers::bpf_skb_adjust_room(ctx.skb.skb, -(strip as i32), BPF_ADJ_ROOM_MAC, 0)
    } != 0
    {
        return Err(());
    }
    count(counter::DECAP);
    Ok(())
}

/// Outer header length of IPIP (an IPv4 header without options; the caller checked IHL 5).
pub const IPIP_STRIP: usize = 20;
/// Outer header length of GUE variant 1 (IPv4 + UDP, the inner header follows directly).
pub const GUE_V1_STRIP: usize = 28;
/// Outer header length of GUE variant 0 with an empty GUE header (IPv4 + UDP + 4).
pub const GUE_V0_STRIP: usize = 32;

/// The decapsulation rule both uplink hooks (tc here, XDP in `xdp.rs`) apply to a UDP packet
/// addressed to this node: how much outer header to strip, from the UDP destination port and
/// the first byte after the UDP header. `None`: not GUE we understand, leave it alone.
#[inline(always)]
pub fn gue_strip(udp_dport_be: u16, first: u8) -> Option<usize> {
    if udp_dport_be != GUE_PORT.to_be() {
        return None;
    }
    match first >> 4 {
        // Variant 1: the inner IPv4 header follows the UDP header directly.
        4 => Some(GUE_V1_STRIP),
        // Variant 0 with no extension fields (hlen 0): a 4-byte GUE header.
        0 if first & 0x1f == 0 => Some(GUE_V0_STRIP),
        _ => None,
    }
}
