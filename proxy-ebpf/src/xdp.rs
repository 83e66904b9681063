//! XDP on the node's uplink(s): the fast path in front of the tc program `lb_up_in`.
//!
//! It does the two things that need no socket-buffer state and no new conntrack entry:
//! 1. IPIP/GUE decapsulation of packets addressed to this node (the rule of
//!    `uplink::encap_strip`), so the inner packet, VIP intact, goes on up;
//! 2. the established-flow DNAT: a packet whose forward conntrack entry asks only for a
//!    destination rewrite (externalTrafficPolicy Local LB IPs, NodePorts and externalIPs, the
//!    client address preserved) and whose backend still validates gets its destination
//!    rewritten here, with incremental checksums.
//!
//! Every verdict is `XDP_PASS`: the packet always continues to tc, and whatever XDP did not
//! translate (new flows, replies, masqueraded flows that need routing, ICMP errors, REJECT,
//! fragments, non-IPv4, malformed packets) is translated there by the full pipeline. A packet
//! XDP translated carries `XDP_META_TRANSLATED` in its metadata and tc passes it at once:
//! running the pipeline on it again would cost about as much as translating it at tc in the
//! first place (measured per packet in `benches/packet_cost.rs`), for a verdict of "pass".
//! Where metadata is not available tc runs the pipeline, which passes the packet too.
//!
//! Checksums: XDP cannot see `skb->ip_summed`. A CHECKSUM_PARTIAL skb (what a veth peer hands
//! over for locally generated or forwarded traffic) holds only the pseudo-header sum in its
//! L4 checksum field, which a full-checksum incremental update would corrupt. Such packets
//! are recognised by that very value (the folded pseudo-header sum) and left to tc, whose
//! kernel helpers know the skb's state. A packet with a complete checksum that happens to
//! equal its pseudo-header sum (1 in 65536) merely takes the tc path too.
use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{Ct4Key, XDP_META_LEN, XDP_META_TRANSLATED, counter, csum, ct_flags, proto};

use crate::{
    lb::{ct_lookup, validate_flow},
    maps::{count, count_service},
    parse::{ETH_HLEN, PacketRead, parse, tcp},
    uplink::{Decap, GUE_V0_STRIP, GUE_V1_STRIP, IPIP_STRIP, encap_strip},
};

/// XDP (native, or generic where the driver has none) on every uplink. Sees every frame
/// arriving from outside the node before tc ingress (`lb_up_in`).
#[xdp]
pub fn lb_up_xdp(ctx: XdpContext) -> u32 {
    if decapsulate(&ctx).is_ok() && fast_path(&ctx).is_some() {
        mark_translated(&ctx);
    }
    xdp_action::XDP_PASS
}

/// Puts `XDP_META_TRANSLATED` in the packet's metadata for tc (`uplink::translated_by_xdp`).
/// Best effort: without room or driver support tc simply runs its pipeline.
#[inline(always)]
fn mark_translated(ctx: &XdpContext) {
    // SAFETY: growing our own packet's metadata area; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(XDP_META_LEN as i32)) } != 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let meta = unsafe { (*ctx.ctx).data_meta } as usize;
    if meta + XDP_META_LEN > ctx.data() {
        return;
    }
    // SAFETY: the bounds check above keeps the write inside the metadata area.
    unsafe { (meta as *mut u32).write_unaligned(XDP_META_TRANSLATED) };
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn ptr_at_mut<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, off).map(|p| p as *mut T)
}

/// Reads a `T` (unaligned: the IPv4 header sits 14 bytes into the frame).
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the bytes are inside the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn store<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    // SAFETY: `ptr_at_mut` checked that the bytes are inside the packet.
    ptr_at_mut::<T>(ctx, off).map(|p| unsafe { p.write_unaligned(v) })
}

impl PacketRead for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        load(self, off)
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

/// Strips an IPIP or GUE header addressed to this node (the rule of `uplink::encap_strip`).
/// `Ok` also when there is nothing to do; `Err` if the rule refuses the packet or it could not
/// be shrunk: then it is left to tc as it is, and tc, applying the same rule, drops and counts
/// what the rule refuses (one verdict and one count, whichever hooks run).
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Result<(), ()> {
    // One monomorphised copy per length keeps every packet offset a constant for the verifier.
    match encap_strip(ctx) {
        Decap::Strip(IPIP_STRIP) => strip::<IPIP_STRIP>(ctx),
        Decap::Strip(GUE_V1_STRIP) => strip::<GUE_V1_STRIP>(ctx),
        Decap::Strip(GUE_V0_STRIP) => strip::<GUE_V0_STRIP>(ctx),
        Decap::Refuse(_) => Err(()),
        _ => Ok(()),
    }
}

/// Moves the Ethernet header right in front of the inner IPv4 header (`N` bytes on), then
/// drops everything before it with `bpf_xdp_adjust_head`.
#[inline(always)]
fn strip<const N: usize>(ctx: &XdpContext) -> Result<(), ()> {
    let Some(eth) = load::<[u8; ETH_HLEN]>(ctx, 0) else {
        return Ok(());
    };
    // The copy lands on outer-header bytes that are about to go (N >= 20 > ETH_HLEN).
    if store(ctx, N, eth).is_none() {
        return Ok(());
    }
    // SAFETY: shrinking our own packet from the front; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, N as i32) } != 0 {
        return Err(());
    }
    count(counter::XDP_DECAP);
    Ok(())
}

/// DNATs a packet of a tracked flow when its conntrack entry allows it. Anything else is left
/// untouched for tc.
#[inline(always)]
fn fast_path(ctx: &XdpContext) -> Option<()> {
    // The parse tc uses; tc counts what it rejects, here it is just not ours.
    let p = parse(ctx).ok()?;
    let l4_proto = p.proto;
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return None;
    }
    // Fragments (first ones included) go to tc: it owns the fragment counters.
    if u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?) & 0x2000 != 0 {
        return None;
    }
    let (saddr_be, daddr_be, sport_be, dport_be) = (p.saddr_be, p.daddr_be, p.sport_be, p.dport_be);
    let (tot_len, ihl, l4_off, csum_off) = (p.tot_len, p.ihl(), p.l4_off, p.l4_csum_off());
    let l4_csum = u16::from_be(load::<u16>(ctx, csum_off)?);

    // SYN, FIN and RST change a flow's state (reopen, closing): tc tracks those.
    if l4_proto == proto::TCP && p.tcp_flags & (tcp::SYN | tcp::FIN | tcp::RST) != 0 {
        return None;
    }
    // A first fragment's ports must be remembered for the fragments that follow: tc does it.
    if p.first_fragment {
        return None;
    }
    let key = Ct4Key::new(saddr_be, daddr_be, sport_be, dport_be, l4_proto);
    let (entry, _) = ct_lookup(&key)?;
    // Forward entries that only rewrite the destination and need no routing of our own.
    // Replies, masquerade (SNAT + FIB redirect) and hairpin stay with tc.
    let other = ct_flags::REPLY | ct_flags::SNAT | ct_flags::REDIRECT_BACK | ct_flags::FIB_REDIRECT;
    if entry.flags & (ct_flags::FORWARD | ct_flags::DNAT) != ct_flags::FORWARD | ct_flags::DNAT
        || entry.flags & other != 0
    {
        return None;
    }
    // A removed backend: tc forgets the flow and balances it again.
    if !validate_flow(&entry) {
        return None;
    }
    let udp_no_csum = l4_proto == proto::UDP && l4_csum == 0;
    if !udp_no_csum
        && tot_len as usize >= ihl
        && l4_csum == csum::pseudo_header_sum(saddr_be, daddr_be, l4_proto, tot_len - ihl as u16)
    {
        count(counter::XDP_PASS_PARTIAL_CSUM);
        return None;
    }

    let (new_addr_be, new_port_be) = (entry.dst_addr_be, entry.dst_port_be);
    let ip_csum = u16::from_be(load::<u16>(ctx, ETH_HLEN + 10)?);
    let ip_csum = csum::replace32(ip_csum, u32::from_be(daddr_be), u32::from_be(new_addr_be));
    store(ctx, ETH_HLEN + 16, new_addr_be)?;
    store(ctx, ETH_HLEN + 10, ip_csum.to_be())?;
    store(ctx, l4_off + 2, new_port_be)?;
    if !udp_no_csum {
        // The pseudo-header's destination and the port are both covered by the L4 checksum.
        let c = csum::replace32(l4_csum, u32::from_be(daddr_be), u32::from_be(new_addr_be));
        let mut c = csum::replace16(c, u16::from_be(dport_be), u16::from_be(new_port_be));
        if c == 0 && l4_proto == proto::UDP {
            // A computed zero is sent as all ones: zero means "no checksum" in UDP.
            c = 0xffff;
        }
        store(ctx, csum_off, c.to_be())?;
    }
    count(counter::XDP_FWD_ESTABLISHED);
    // L3 bytes as tc counts them (the frame minus its Ethernet header), whichever hook
    // translates.
    count_service(
        entry.svc_id,
        (ctx.data_end() - ctx.data() - ETH_HLEN) as u32,
    );
    Some(())
}
