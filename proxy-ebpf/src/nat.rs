//! Packet rewrites with kernel checksum helpers. The helpers (unlike hand-rolled incremental
//! updates) handle CHECKSUM_PARTIAL skbs from veth correctly, and leave a zero UDP checksum
//! zero (BPF_F_MARK_MANGLED_0). SCTP has no pseudo-header: addresses leave its CRC32c alone,
//! and a port rewrite updates it incrementally (`proxy_common::crc32c`).
//!
//! `skb->csum` (CHECKSUM_COMPLETE, the sum of the packet from the IPv4 header on) must still
//! match the packet afterwards. A store whose change a checksum helper cancels out (an address
//! with its IPv4 checksum, a TCP/UDP port with its L4 checksum) leaves the sum as it was; a
//! store nothing cancels (SCTP ports and CRC, ports of a UDP datagram without checksum) is
//! made with `BPF_F_RECOMPUTE_CSUM`, so the kernel moves `skb->csum` with it.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use proxy_common::{Ct4Value, crc32c, ct_flags, proto};

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
    if p.proto == proto::SCTP {
        return Ok(());
    }
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
    // No L4 checksum to cancel the change: SCTP (the CRC is fixed once for both ports in
    // `apply`), or UDP without a checksum (zero stays zero).
    let uncovered = p.proto == proto::SCTP
        || (p.proto == proto::UDP
            && ctx
                .load::<u16>(p.l4_csum_off())
                .map_err(|_| RewriteFailed)?
                == 0);
    if uncovered {
        return ctx
            .store(off, &new, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| RewriteFailed);
    }
    ctx.store(off, &new, 0).map_err(|_| RewriteFailed)?;
    ctx.l4_csum_replace(p.l4_csum_off(), old as u64, new as u64, l4_flags(p, 2))
        .map_err(|_| RewriteFailed)
}

/// The SCTP checksum after the ports changed from `old` to `new` (wire order). Not inlined:
/// one copy of the GF(2) arithmetic per program keeps the programs small and their
/// verification cheap.
#[inline(never)]
fn sctp_crc(crc: u32, old: u32, new: u32, len: u16) -> u32 {
    crc32c::update_first4(crc, old.to_ne_bytes(), new.to_ne_bytes(), len)
}

#[inline(always)]
fn fix_sctp_crc(ctx: &TcContext, p: &Packet, v: &Ct4Value) -> Result<(), RewriteFailed> {
    let (mut sport, mut dport) = (p.sport_be, p.dport_be);
    if v.flags & ct_flags::SNAT != 0 {
        sport = v.src_port_be;
    }
    if v.flags & ct_flags::DNAT != 0 {
        dport = v.dst_port_be;
    }
    if (sport, dport) == (p.sport_be, p.dport_be) {
        return Ok(());
    }
    // Ports as they sit on the wire: the first four bytes of the common header.
    let join = |a: u16, b: u16| {
        let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
        u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
    };
    let field = p.l4_off + 8;
    let crc = u32::from_le_bytes(ctx.load::<[u8; 4]>(field).map_err(|_| RewriteFailed)?);
    let new = sctp_crc(
        crc,
        join(p.sport_be, p.dport_be),
        join(sport, dport),
        p.l4_len,
    );
    ctx.store(field, &new.to_le_bytes(), BPF_F_RECOMPUTE_CSUM as u64)
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
    if p.proto == proto::SCTP {
        fix_sctp_crc(ctx, p, v)?;
    }
    Ok(())
}

/// The address part of a conntrack entry's rewrite, for a non-first fragment: it has no L4
/// header, and the L4 checksum (in the first fragment) already accounts for the addresses.
#[inline(always)]
pub fn apply_addrs(
    ctx: &TcContext,
    saddr_be: u32,
    daddr_be: u32,
    v: &Ct4Value,
) -> Result<(), RewriteFailed> {
    for (set, off, old, new) in [
        (ct_flags::SNAT, IP_SADDR_OFF, saddr_be, v.src_addr_be),
        (ct_flags::DNAT, IP_DADDR_OFF, daddr_be, v.dst_addr_be),
    ] {
        if v.flags & set != 0 && old != new {
            ctx.store(off, &new, 0).map_err(|_| RewriteFailed)?;
            ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
                .map_err(|_| RewriteFailed)?;
        }
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
