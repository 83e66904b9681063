//! REJECT like kube-proxy: a TCP RST for TCP, an ICMP port unreachable for UDP, sent back out
//! of the interface the packet came in on, from the address the client tried to reach.
//!
//! The reply frame is built in a stack buffer (headers only, so it is small), the skb is
//! resized with `bpf_skb_change_tail`, and the buffer is stored over it in one go.
use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{csum, proto, wire::write_ipv4_header};

use crate::parse::{ETH_HLEN, Packet};

const TCP_RST_LEN: usize = ETH_HLEN + 20 + 20;
/// Ethernet + IPv4 + ICMP header, before the quote.
const ICMP_HDRS: usize = ETH_HLEN + 20 + 8;

/// The complemented checksum of `len` bytes of `buf` from `start`, added to `acc`.
#[inline(always)]
fn checksum(buf: &[u8], start: usize, len: usize, acc: u32) -> u16 {
    !csum::fold(csum::sum16(buf, start, len, acc))
}

/// Whether a REJECT may answer this source: not unspecified (0.0.0.0/8), not loopback (127/8),
/// not multicast (224/4), not class E (240/4, which holds 255.255.255.255).
#[inline(always)]
pub fn answerable(src_be: u32) -> bool {
    let first = u32::from_be(src_be) >> 24;
    first != 0 && first != 127 && first < 224
}

/// Turns the packet into its rejection and sends it back. `Err` means "drop instead".
#[inline(always)]
pub fn reply(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    if p.proto == proto::TCP {
        tcp_rst(ctx, p)
    } else {
        icmp_unreach(ctx, p)
    }
}

#[inline(always)]
fn macs(ctx: &TcContext, buf: &mut [u8]) -> Result<(), ()> {
    let dst: [u8; 6] = ctx.load(0).map_err(|_| ())?;
    let src: [u8; 6] = ctx.load(6).map_err(|_| ())?;
    buf[0..6].copy_from_slice(&src);
    buf[6..12].copy_from_slice(&dst);
    buf[12] = 0x08;
    buf[13] = 0x00;
    Ok(())
}

/// Sends the first `len` bytes of `buf` (at most its length) back out.
#[inline(always)]
fn send(ctx: &TcContext, buf: &[u8], len: usize) -> Result<i32, ()> {
    if len > buf.len() {
        return Err(());
    }
    // SAFETY: resizing our own skb; pointers are not reused after this.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
        return Err(());
    }
    // SAFETY: `buf` is a valid stack buffer of at least `len` bytes. BPF_F_RECOMPUTE_CSUM keeps
    // `skb->csum` right for a CHECKSUM_COMPLETE skb of the same length (a length change drops
    // the skb to CHECKSUM_NONE in bpf_skb_change_tail).
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            0,
            buf.as_ptr() as *const _,
            len as u32,
            aya_ebpf::bindings::BPF_F_RECOMPUTE_CSUM as u64,
        )
    };
    if rc != 0 {
        return Err(());
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn tcp_rst(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    let mut buf = [0u8; TCP_RST_LEN];
    macs(ctx, &mut buf)?;
    let seq: u32 = u32::from_be(ctx.load(p.l4_off + 4).map_err(|_| ())?);
    let ack: u32 = u32::from_be(ctx.load(p.l4_off + 8).map_err(|_| ())?);
    let flags: u8 = ctx.load(p.l4_off + 13).map_err(|_| ())?;
    let doff: u8 = ctx.load(p.l4_off + 12).map_err(|_| ())?;
    if flags & 0x04 != 0 {
        // Never answer a RST.
        return Err(());
    }
    let total = p.tot_len;
    let ihl = p.ihl();
    let payload = (total as usize).saturating_sub(ihl + ((doff >> 4) as usize) * 4) as u32;
    let (rseq, rack, rflags) = if flags & 0x10 != 0 {
        (ack, 0u32, 0x04u8)
    } else {
        let syn_fin = (flags & 0x02 != 0) as u32 + (flags & 0x01 != 0) as u32;
        (
            0u32,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            0x14u8,
        )
    };
    let src = p.daddr_be.to_ne_bytes();
    let dst = p.saddr_be.to_ne_bytes();
    write_ipv4_header(&mut buf, ETH_HLEN, 40, true, proto::TCP, src, dst);
    let t = ETH_HLEN + 20;
    buf[t..t + 2].copy_from_slice(&u16::from_be(p.dport_be).to_be_bytes());
    buf[t + 2..t + 4].copy_from_slice(&u16::from_be(p.sport_be).to_be_bytes());
    buf[t + 4..t + 8].copy_from_slice(&rseq.to_be_bytes());
    buf[t + 8..t + 12].copy_from_slice(&rack.to_be_bytes());
    buf[t + 12] = 0x50;
    buf[t + 13] = rflags;
    // Window, checksum, urgent pointer: zero, then the checksum.
    let mut acc = csum::sum16(&buf, ETH_HLEN + 12, 8, 0); // pseudo header: addresses
    acc += proto::TCP as u32 + 20;
    let c = checksum(&buf, t, 20, acc);
    buf[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
    send(ctx, &buf, TCP_RST_LEN)
}

/// The longest quote: a 60-byte IPv4 header and 8 bytes of what follows.
const MAX_QUOTE: usize = 60 + 8;

/// An ICMP port unreachable quoting the offending datagram's whole IPv4 header, options
/// included, and the 8 bytes after it (RFC 792): the client's stack finds its socket by the
/// quoted ports, which sit after the options. One stack buffer for the longest reply; each
/// header length loads a constant size, so the verifier sees constant bounds on every path.
#[inline(always)]
fn icmp_unreach(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    let mut buf = [0u8; ICMP_HDRS + MAX_QUOTE];
    macs(ctx, &mut buf)?;
    let q = match p.ihl() {
        20 => quote::<28>(ctx, &mut buf)?,
        24 => quote::<32>(ctx, &mut buf)?,
        28 => quote::<36>(ctx, &mut buf)?,
        32 => quote::<40>(ctx, &mut buf)?,
        36 => quote::<44>(ctx, &mut buf)?,
        40 => quote::<48>(ctx, &mut buf)?,
        44 => quote::<52>(ctx, &mut buf)?,
        48 => quote::<56>(ctx, &mut buf)?,
        52 => quote::<60>(ctx, &mut buf)?,
        56 => quote::<64>(ctx, &mut buf)?,
        60 => quote::<68>(ctx, &mut buf)?,
        _ => return Err(()),
    };
    let src = p.daddr_be.to_ne_bytes();
    let dst = p.saddr_be.to_ne_bytes();
    write_ipv4_header(
        &mut buf,
        ETH_HLEN,
        (20 + 8 + q) as u16,
        true,
        proto::ICMP,
        src,
        dst,
    );
    let i = ETH_HLEN + 20;
    buf[i] = 3; // destination unreachable
    buf[i + 1] = 3; // port unreachable
    // The ICMP checksum over the header and the quote (bytes past it are zero: no effect).
    let c = checksum(&buf, i, 8 + MAX_QUOTE, 0);
    buf[i + 2..i + 4].copy_from_slice(&c.to_be_bytes());
    send(ctx, &buf, ICMP_HDRS + q)
}

/// Loads the first `Q` bytes of the IPv4 packet into the quote's place in `buf`.
#[inline(always)]
fn quote<const Q: usize>(
    ctx: &TcContext,
    buf: &mut [u8; ICMP_HDRS + MAX_QUOTE],
) -> Result<usize, ()> {
    const { assert!(Q <= MAX_QUOTE) };
    let dst = &mut buf[ICMP_HDRS..ICMP_HDRS + Q];
    // SAFETY: `dst` is `Q` writable bytes of our stack buffer.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_HLEN as u32,
            dst.as_mut_ptr() as *mut _,
            Q as u32,
        )
    };
    if rc != 0 {
        return Err(());
    }
    Ok(Q)
}
