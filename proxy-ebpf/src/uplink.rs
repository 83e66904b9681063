//! The hook on the node's uplink(s): traffic from outside the node.
//!
//! NodePort, LoadBalancer IPs and externalIPs arrive here, plain (a Maglev-style balancer
//! delivering with the VIP still as destination) or wrapped Katran style in IPIP or GUE
//! (UDP to `GUE_PORT`, variant 1 direct IP-in-UDP or variant 0 with an empty GUE header)
//! addressed to this node: the outer header is stripped and the inner packet, VIP intact, goes
//! through the same pipeline. Replies go straight to the client (DSR), never back through the
//! balancer. Replies of masqueraded flows coming back from other nodes are translated here too.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    Frag4Key, GUE_PORT, Svc4Key, XDP_META_LEN, XDP_META_TRANSLATED, cfg_flags, counter, proto,
    svc_flags,
};

use crate::{
    lb::{Origin, run},
    maps::{LB4_FRG_V1, LB4_SVC_V2, count, decap_source_allowed, node_config},
    parse::{ETH_HLEN, ETH_P_IP_BE, IP_DADDR_OFF, IP_SADDR_OFF, PacketRead},
};

/// tc ingress on the uplink.
#[classifier]
pub fn lb_up_in(ctx: TcContext) -> i32 {
    if translated_by_xdp(&ctx) {
        count(counter::TC_PASS_XDP_TRANSLATED);
        return TC_ACT_OK;
    }
    if let Err(v) = decapsulate(&ctx) {
        return v;
    }
    run(&ctx, Origin::External, true)
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

/// Strips an IPIP or GUE header addressed to this node when the policy allows it. `Ok` also
/// when there is nothing to do; `Err(verdict)`: the packet is refused (dropped and counted) or
/// could not be shrunk (passed as it is).
#[inline(always)]
fn decapsulate(ctx: &TcContext) -> Result<(), i32> {
    let strip = match encap_strip(ctx) {
        Decap::NotOurs => return Ok(()),
        Decap::Refuse(reason) => {
            count(reason);
            return Err(TC_ACT_SHOT);
        }
        Decap::Strip(n) => n,
    };
    // SAFETY: shrinking our own skb right after the MAC header.
    if unsafe {
        aya_ebpf::helpers::bpf_skb_adjust_room(ctx.skb.skb, -(strip as i32), BPF_ADJ_ROOM_MAC, 0)
    } != 0
    {
        return Err(TC_ACT_OK);
    }
    count(counter::DECAP);
    Ok(())
}

/// What the decapsulation rule says about a packet.
pub enum Decap {
    /// Not IPIP/GUE for this node that we would unwrap (another destination, another protocol
    /// or port, an outer fragment, options, not IPv4 inside): leave the packet as it is.
    NotOurs,
    /// Strip this many bytes of outer header.
    Strip(usize),
    /// IPIP/GUE for this node that the policy refuses: drop it, counting this counter.
    Refuse(u32),
}

/// The decapsulation rule of both uplink hooks (tc here, XDP in `xdp.rs`): an IPIP or GUE
/// packet addressed to this node that carries an IPv4 packet is unwrapped only if
/// 1. its outer source is allowed (`--decap-allowed-sources`; any when not restricted), and
/// 2. the inner packet is for a LoadBalancer IP or externalIP service port this node serves
///    (the inner destination's `EXTERNAL` service entry has `LOAD_BALANCER` or
///    `EXTERNAL_IP`), see [`inner_served`].
///
/// Anything else wrapped to the node is refused: decapsulation runs before netfilter, so
/// unwrapping a packet for a ClusterIP, a pod or a node port would let any sender that can
/// reach the node address tunnel past the node's firewall. Refused packets are dropped, or
/// with `--foreign-tunnels=pass` handed to the kernel still wrapped (a CNI's own IPIP).
#[inline(always)]
pub fn encap_strip<P: PacketRead>(p: &P) -> Decap {
    match encap_parse(p) {
        Some((strip, outer_src_be)) => policy(p, strip, outer_src_be),
        None => Decap::NotOurs,
    }
}

/// The outer header: how many bytes to strip and the outer source, for an IPIP or GUE packet
/// addressed to this node that carries an IPv4 packet. `None`: not encapsulation for us.
#[inline(always)]
fn encap_parse<P: PacketRead>(p: &P) -> Option<(usize, u32)> {
    if p.read::<u16>(12)? != ETH_P_IP_BE || p.read::<u8>(ETH_HLEN)? != 0x45 {
        return None;
    }
    let outer_proto: u8 = p.read(ETH_HLEN + 9)?;
    // Only IPIP and UDP can be encapsulation: don't touch the config map for anything else.
    if outer_proto != 4 && outer_proto != proto::UDP {
        return None;
    }
    let cfg = node_config();
    if cfg.node_addr_be == 0 || p.read::<u32>(IP_DADDR_OFF)? != cfg.node_addr_be {
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
    if p.read::<u8>(ETH_HLEN + strip)? >> 4 != 4 {
        return None;
    }
    let src = p.read::<u32>(IP_SADDR_OFF)?;
    Some((strip, src))
}

/// The policy part of [`encap_strip`], for an IPIP/GUE packet to this node.
#[inline(always)]
fn policy<P: PacketRead>(p: &P, strip: usize, outer_src_be: u32) -> Decap {
    let flags = node_config().flags;
    // Refused: dropped, or with `--foreign-tunnels=pass` left wrapped for the kernel, whose
    // tunnel devices (if any) decapsulate after netfilter has seen the outer packet.
    let refuse = |reason| {
        if flags & cfg_flags::FOREIGN_TUNNELS_PASS != 0 {
            Decap::NotOurs
        } else {
            Decap::Refuse(reason)
        }
    };
    if flags & cfg_flags::DECAP_SOURCES_RESTRICTED != 0 && !decap_source_allowed(outer_src_be) {
        return refuse(counter::DROP_DECAP_SOURCE);
    }
    if !inner_served(p, ETH_HLEN + strip).unwrap_or(false) {
        return refuse(counter::DROP_DECAP_NOT_SERVED);
    }
    Decap::Strip(strip)
}

/// Whether the inner IPv4 packet at `off` is for a LoadBalancer IP or externalIP service port
/// this node serves: the `EXTERNAL` service entry of (inner destination, port, protocol) has
/// `svc_flags::LOAD_BALANCER` or `EXTERNAL_IP`. The port is
/// - the destination port of TCP, UDP and SCTP (first fragments included);
/// - for an ICMP error (destination unreachable, time exceeded, parameter problem) about a
///   direct-server-return reply, which the balancer forwards to the LB IP like the flow it
///   belongs to: the quoted packet's source port and protocol, the quote's source being the
///   inner destination (path MTU discovery keeps working for DSR clients);
/// - for a non-first fragment (no ports): its datagram's first fragment's, from the fragment
///   map, which holds it once the first fragment was translated; a fragment that overtakes its
///   first fragment is refused.
///
/// Anything else (other ICMP, other protocols, malformed inner headers) is not served. The
/// port matters as well as the address: a ClusterIP, a NodePort (keyed by a node address) and
/// an LB IP all live in the same service map, and only the entry says which kind it is.
#[inline(always)]
fn inner_served<P: PacketRead>(p: &P, off: usize) -> Option<bool> {
    let vihl: u8 = p.read(off)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let l4 = off + ihl;
    let inner_proto: u8 = p.read(off + 9)?;
    let daddr_be: u32 = p.read(off + 16)?;
    let frag = u16::from_be(p.read::<u16>(off + 6)?);
    let (port_be, svc_proto) = if frag & 0x1fff != 0 {
        let key = Frag4Key {
            saddr_be: p.read(off + 12)?,
            daddr_be,
            id_be: p.read(off + 4)?,
            proto: inner_proto,
            _pad: 0,
        };
        // SAFETY: copied out immediately.
        let first = unsafe { LB4_FRG_V1.get(key) }?.dport_be;
        (first, inner_proto)
    } else if inner_proto == proto::TCP || inner_proto == proto::UDP || inner_proto == proto::SCTP {
        (p.read::<u16>(l4 + 2)?, inner_proto)
    } else if inner_proto == proto::ICMP {
        // Bytes at offsets that vary with the header lengths are read in pairs: the compiler
        // turns a one-byte bounds check into a form the XDP verifier cannot use.
        let [ty, _code] = p.read::<[u8; 2]>(l4)?;
        if ty != 3 && ty != 11 && ty != 12 {
            return None;
        }
        let q = l4 + 8;
        // The quoted IPv4 header in one read: one bounds check the verifier can follow.
        let qh = p.read::<[u8; 20]>(q)?;
        let qihl = ((qh[0] & 0x0f) as usize) * 4;
        let qsaddr_be = u32::from_ne_bytes([qh[12], qh[13], qh[14], qh[15]]);
        if qh[0] >> 4 != 4 || qihl < 20 || qsaddr_be != daddr_be {
            return None;
        }
        let qproto = qh[9];
        (p.read::<u16>(q + qihl)?, qproto)
    } else {
        return None;
    };
    let key = Svc4Key::new(daddr_be, port_be, svc_proto, 0);
    // SAFETY: copied out immediately.
    let flags = unsafe { LB4_SVC_V2.get(key) }?.flags;
    Some(flags & (svc_flags::LOAD_BALANCER | svc_flags::EXTERNAL_IP) != 0)
}

/// Outer header length of IPIP (an IPv4 header without options; the caller checked IHL 5).
pub const IPIP_STRIP: usize = 20;
/// Outer header length of GUE variant 1 (IPv4 + UDP, the inner header follows directly).
pub const GUE_V1_STRIP: usize = 28;
/// Outer header length of GUE variant 0 with an empty GUE header (IPv4 + UDP + 4).
pub const GUE_V0_STRIP: usize = 32;

/// The GUE part of [`encap_parse`]: how much outer header to strip, from the UDP destination
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
