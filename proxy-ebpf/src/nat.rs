//! Packet rewrites with kernel checksum helpers. The helpers (unlike hand-rolled incremental
//! updates) handle CHECKSUM_PARTIAL skbs from veth correctly, and leave a zero UDP checksum
//! zero (BPF_F_MARK_MANGLED_0).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{Ct4Value, ct_flags, proto};

use crate::parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet};

pub struct RewriteFailed;

#[inline(always)]
fn l4_flags(p: &Packet, size: u64) -> u64 {
    let mut f = size;
    if p.proto == proto::UDP {
        f |= BPF_F_MARK_MANGLED_0 as u64;
    }
    f
}

#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| RewriteFailed)?;
    ctx.l4_csum_replace(
        p.l4_csum_off(),
        old as u64,
        new as u64,
        l4_flags(p, 4) | BPF_F_PSEUDO_HDR as u64,
    )
    .map_err(|_| RewriteFailed)
}

#[inline(always)]
fn set_port(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| RewriteFailed)?;
    ctx.l4_csum_replace(p.l4_csum_off(), old as u64, new as u64, l4_flags(p, 2))
        .map_err(|_| RewriteFailed)
}

/// Applies a conntrack entry's rewrite (source and/or destination) to the packet.
#[inline(always)]
pub fn apply(ctx: &TcContext, p: &Packet, v: &Ct4Value) -> Result<(), RewriteFailed> {
    if v.flags & ct_flags::SNAT != 0 {
        set_addr(ctx, p, IP_SADDR_OFF, p.saddr_be, v.src_addr_be)?;
        set_port(ctx, p, p.l4_off, p.sport_be, v.src_port_be)?;
    }
    if v.flags & ct_flags::DNAT != 0 {
        set_addr(ctx, p, IP_DADDR_OFF, p.daddr_be, v.dst_addr_be)?;
        set_port(ctx, p, p.l4_off + 2, p.dport_be, v.dst_port_be)?;
    }
    Ok(())
}

/// Swaps the Ethernet addresses so a frame can be sent back out of the port it came in on.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), RewriteFailed> {
    let dst: [u8; 6] = ctx.load(0).map_err(|_| RewriteFailed)?;
    let src: [u8; 6] = ctx.load(6).map_err(|_| RewriteFailed)?;
    ctx.store(0, &src, 0).map_err(|_| RewriteFailed)?;
    ctx.store(6, &dst, 0).map_err(|_| RewriteFailed)?;
    Ok(())
}
