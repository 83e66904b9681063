//! ICMP errors about translated flows (destination unreachable, including "fragmentation
//! needed", time exceeded and parameter problem), translated in the outer and the quoted inner header so the
//! sender's socket recognises them: path-MTU discovery works through a VIP.
//!
//! The quoted packet is one this node translated, travelling the other way, so the conntrack
//! entry keyed by the quoted tuple *reversed* is the rewrite that packet's own replies get;
//! applied mirror-wise it restores what the socket sent or expects.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{Ct4Key, Ct4Value, counter, csum, ct_flags, proto};

use crate::{
    fib, lb,
    maps::count,
    parse::{ETH_HLEN, ETH_P_IP_BE, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

struct Failed;

/// Handles an ICMP error if it is about a tracked flow. `None`: not ours, continue.
#[inline(always)]
pub fn translate_error(ctx: &TcContext) -> Option<i32> {
    match try_translate(ctx) {
        Ok(v) => v,
        Err(Failed) => {
            count(counter::DROP_REWRITE);
            Some(TC_ACT_SHOT)
        }
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, Failed> {
    ctx.load(off).map_err(|_| Failed)
}

#[inline(always)]
fn try_translate(ctx: &TcContext) -> Result<Option<i32>, Failed> {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return Ok(None);
    };
    if ethertype != ETH_P_IP_BE {
        return Ok(None);
    }
    let Ok(vihl) = ctx.load::<u8>(ETH_HLEN) else {
        return Ok(None);
    };
    let Ok(p) = ctx.load::<u8>(ETH_HLEN + 9) else {
        return Ok(None);
    };
    if p != proto::ICMP || vihl >> 4 != 4 {
        return Ok(None);
    }
    // The outer header first: a bad IHL or a total length that does not fit the frame is not
    // an ICMP error we can read, and a non-first fragment has no ICMP header at all.
    let outer_ihl = ((vihl & 0x0f) as usize) * 4;
    let (Ok(tot_be), Ok(frag_be)) = (ctx.load::<u16>(ETH_HLEN + 2), ctx.load::<u16>(ETH_HLEN + 6))
    else {
        return Ok(None);
    };
    let tot = u16::from_be(tot_be) as usize;
    if outer_ihl < 20 || tot < outer_ihl + 8 || ETH_HLEN + tot > ctx.len() as usize {
        count(counter::PASS_MALFORMED);
        return Ok(None);
    }
    if u16::from_be(frag_be) & 0x1fff != 0 {
        return Ok(None);
    }
    let icmp = ETH_HLEN + outer_ihl;
    let Ok(ty) = ctx.load::<u8>(icmp) else {
        return Ok(None);
    };
    // Destination unreachable, time exceeded, parameter problem: all quote the packet.
    if ty != 3 && ty != 11 && ty != 12 {
        return Ok(None);
    }
    // The quoted packet: IPv4 header (IHL honoured) and at least its 8 first L4 bytes.
    let inner = icmp + 8;
    let Ok(ivihl) = ctx.load::<u8>(inner) else {
        return Ok(None);
    };
    let ihl = ((ivihl & 0x0f) as usize) * 4;
    if ivihl >> 4 != 4 || ihl < 20 {
        return Ok(None);
    }
    // The quote must hold the addresses and the first 8 L4 bytes (ports, UDP checksum) inside
    // the datagram: otherwise it is malformed, passed untouched, not a rewrite failure.
    if inner + ihl + 8 > ETH_HLEN + tot {
        count(counter::PASS_MALFORMED);
        return Ok(None);
    }
    let iproto: u8 = load(ctx, inner + 9)?;
    // SCTP's quoted CRC is left as is: receivers match errors by verification tag, never
    // check the quoted checksum.
    if iproto != proto::TCP && iproto != proto::UDP && iproto != proto::SCTP {
        return Ok(None);
    }
    let il4 = inner + ihl;
    let Ok(isport) = ctx.load::<u16>(il4) else {
        return Ok(None);
    };
    let isaddr: u32 = load(ctx, inner + 12)?;
    let idaddr: u32 = load(ctx, inner + 16)?;
    let idport: u16 = load(ctx, il4 + 2)?;
    let key = Ct4Key::new(idaddr, isaddr, idport, isport, iproto);
    // SAFETY: copied out immediately.
    let Some(e) = lb::ct_get(&key) else {
        return Ok(None);
    };

    let icmp_csum = icmp + 2;
    let outer_src: u32 = load(ctx, IP_SADDR_OFF)?;
    let udp_csum_off = il4 + 6;
    let udp_csum: u16 = if iproto == proto::UDP {
        ctx.load(udp_csum_off).unwrap_or(0)
    } else {
        0
    };
    let mut ucsum = udp_csum;
    // The quoted packet's destination is what this entry's packets are rewritten *from*
    // as a source; its source is what they are rewritten to as a destination.
    if e.flags & ct_flags::SNAT != 0 {
        set_inner32(
            ctx,
            inner,
            icmp_csum,
            inner + 16,
            idaddr,
            e.src_addr_be,
            &mut ucsum,
        )?;
        set_inner16(ctx, icmp_csum, il4 + 2, idport, e.src_port_be, &mut ucsum)?;
        if outer_src == idaddr {
            // The error came from the endpoint itself: it must appear to come from the VIP.
            set_outer(ctx, IP_SADDR_OFF, outer_src, e.src_addr_be)?;
        }
    }
    if e.flags & ct_flags::DNAT != 0 {
        set_inner32(
            ctx,
            inner,
            icmp_csum,
            inner + 12,
            isaddr,
            e.dst_addr_be,
            &mut ucsum,
        )?;
        set_inner16(ctx, icmp_csum, il4, isport, e.dst_port_be, &mut ucsum)?;
        let outer_dst: u32 = load(ctx, IP_DADDR_OFF)?;
        set_outer(ctx, IP_DADDR_OFF, outer_dst, e.dst_addr_be)?;
    }
    if iproto == proto::UDP && udp_csum != 0 && ucsum != udp_csum {
        ctx.store(udp_csum_off, &ucsum, 0).map_err(|_| Failed)?;
        ctx.l4_csum_replace(icmp_csum, udp_csum as u64, ucsum as u64, 2)
            .map_err(|_| Failed)?;
    }
    count(counter::ICMP_ERROR_XLATED);
    if e.flags & ct_flags::FIB_REDIRECT != 0 {
        let src: u32 = load(ctx, IP_SADDR_OFF)?;
        let dst: u32 = load(ctx, IP_DADDR_OFF)?;
        return Ok(Some(fib::redirect(ctx, src, dst)));
    }
    let _ = Ct4Value::default;
    Ok(Some(TC_ACT_OK))
}

/// Rewrites a 32-bit address of the quoted header, fixing the quoted IPv4 checksum, the
/// quoted UDP checksum (pseudo-header) and the ICMP checksum.
#[inline(always)]
fn set_inner32(
    ctx: &TcContext,
    inner: usize,
    icmp_csum: usize,
    off: usize,
    old: u32,
    new: u32,
    ucsum: &mut u16,
) -> Result<(), Failed> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| Failed)?;
    ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 4)
        .map_err(|_| Failed)?;
    let ip_csum: u16 = load(ctx, inner + 10)?;
    // Checksum arithmetic works on the bytes as stored, so network-order values are used
    // as they are on both sides.
    let new_csum = csum::replace32(ip_csum, old, new);
    ctx.store(inner + 10, &new_csum, 0).map_err(|_| Failed)?;
    ctx.l4_csum_replace(icmp_csum, ip_csum as u64, new_csum as u64, 2)
        .map_err(|_| Failed)?;
    if *ucsum != 0 {
        *ucsum = csum::replace32(*ucsum, old, new);
    }
    Ok(())
}

#[inline(always)]
fn set_inner16(
    ctx: &TcContext,
    icmp_csum: usize,
    off: usize,
    old: u16,
    new: u16,
    ucsum: &mut u16,
) -> Result<(), Failed> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| Failed)?;
    ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
        .map_err(|_| Failed)?;
    if *ucsum != 0 {
        *ucsum = csum::replace16(*ucsum, old, new);
    }
    Ok(())
}

#[inline(always)]
fn set_outer(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), Failed> {
    if old == new {
        return Ok(());
    }
    ctx.store(off, &new, 0).map_err(|_| Failed)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| Failed)
}
