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
use proxy_common::{GUE_PORT, XDP_META_LEN, XDP_META_TRANSLATED, counter, proto};

use crate::{
    lb::{Origin, process},
    maps::{count, node_config},
    parse::{ETH_HLEN, ETH_P_IP_BE, PacketRead},
};

/// tc ingress on the uplink.
#[classifier]
pub fn lb_up_in(ctx: TcContext) -> i32 {
    if translated_by_xdp(&ctx) {
        count(counter::TC_PASS_XDP_TRANSLATED);
        return TC_ACT_OK;
    }
    if decapsulate(&ctx).is_err() {
        return TC_ACT_OK;
    }
    match process(&ctx, Origin::External, true) {
        Ok(v) | Err(v) => v,
    }
}

/// The packet carries the mark `lb_up_xdp` leaves on packets it translated.
#[inline(always)]
fn translated_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: the skb pointer is valid for the program's run.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    // SAFETY: the bounds check keeps the read inside the metadata area.
    meta + XDP_META_LEN <= data
        && unsafe { (meta as *const u32).read_unaligned() } == XDP_META_TRANSLATED
}

/// Strips an IPIP or GUE header addressed to this node. `Ok` also when there is nothing to do.
#[inline(always)]
fn decapsulate(ctx: &TcContext) -> Result<(), ()> {
    let Some(strip) = encap_strip(ctx) else {
        return Ok(());
    };
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

/// The decapsulation rule of both uplink hooks (tc here, XDP in `xdp.rs`): how many bytes of
/// outer header to strip from an IPIP or GUE packet addressed to this node that carries an
/// IPv4 packet. `None`: not encapsulation for us, leave the packet as it is.
#[inline(always)]
pub fn encap_strip<P: PacketRead>(p: &P) -> Option<usize> {
    if p.read::<u16>(12)? != ETH_P_IP_BE || p.read::<u8>(ETH_HLEN)? != 0x45 {
        return None;
    }
    let outer_proto: u8 = p.read(ETH_HLEN + 9)?;
    // Only IPIP and UDP can be encapsulation: don't touch the config map for anything else.
    if outer_proto != 4 && outer_proto != proto::UDP {
        return None;
    }
    let cfg = node_config();
    if cfg.node_addr_be == 0 || p.read::<u32>(ETH_HLEN + 16)? != cfg.node_addr_be {
        return None;
    }
    // Outer fragments are never decapsulated: a fragment's payload is not a whole inner packet
    // (MF set or a non-zero offset; DF is fine).
    if u16::from_be(p.read::<u16>(ETH_HLEN + 6)?) & 0x3fff != 0 {
        return None;
    }
    let strip = if outer_proto == 4 {
        IPIP_STRIP
    } else {
        gue_strip(p.read(ETH_HLEN + 22)?, p.read(ETH_HLEN + 28)?)?
    };
    // A whole inner IPv4 header: tc's bpf_skb_adjust_room refuses to leave less, and XDP
    // must decide as tc does (the corpus found XDP stripping what tc kept wrapped).
    p.read::<u32>(ETH_HLEN + strip + 16)?;
    (p.read::<u8>(ETH_HLEN + strip)? >> 4 == 4).then_some(strip)
}

/// Outer header length of IPIP (an IPv4 header without options; the caller checked IHL 5).
pub const IPIP_STRIP: usize = 20;
/// Outer header length of GUE variant 1 (IPv4 + UDP, the inner header follows directly).
pub const GUE_V1_STRIP: usize = 28;
/// Outer header length of GUE variant 0 with an empty GUE header (IPv4 + UDP + 4).
pub const GUE_V0_STRIP: usize = 32;

/// The GUE part of [`encap_strip`]: how much outer header to strip, from the UDP destination
/// port and the first byte after the UDP header. `None`: not GUE we understand.
#[inline(always)]
fn gue_strip(udp_dport_be: u16, first: u8) -> Option<usize> {
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
