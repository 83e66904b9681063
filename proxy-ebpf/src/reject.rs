//! REJECT like kube-proxy: a TCP RST for TCP, an ICMP port unreachable for UDP, sent back out
//! of the interface the packet came in on, from the address the client tried to reach.
//!
//! The reply frame is built in a buffer (the stack for a RST, a per-CPU scratch map for the
//! port unreachable, whose quote carries the IP options), the skb is resized with
//! `bpf_skb_change_tail`, and the buffer is stored over it in one go.
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{csum, proto, wire::write_ipv4_header};

use crate::{
    maps::scratch,
    parse::{ETH_HLEN, Packet},
};

const TCP_RST_LEN: usize = ETH_HLEN + 20 + 20;
/// Ethernet + IPv4 + ICMP: where the quote of the offending datagram starts.
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

#[inline(always)]
fn send(ctx: &TcContext, buf: &[u8]) -> Result<i32, ()> {
    // SAFETY: resizing our own skb; pointers are not reused after this.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, buf.len() as u32, 0) } != 0 {
        return Err(());
    }
    // SAFETY: `buf` is a valid stack buffer of `buf.len()` bytes. BPF_F_RECOMPUTE_CSUM keeps
    // `skb->csum` right for a CHECKSUM_COMPLETE skb of the same length (a length change drops
    // the skb to CHECKSUM_NONE in bpf_skb_change_tail).
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            0,
            buf.as_ptr() as *const _,
            buf.len() as u32,
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
    send(ctx, &buf)
}

#[inline(always)]
fn icmp_unreach(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    // Built in a per-CPU scratch map, not on the stack: the quote grows with the IP options
    // (up to 60 bytes of header), and the caller's stack is nearly full.
    let s = scratch().ok_or(())?;
    // SAFETY: this CPU's slot; nothing else runs on it until we return.
    let buf = unsafe { &mut (*s).reject };
    // The IPv4 header length, 20..=80 in steps of 4 whatever `l4_off` holds, so the verifier
    // can bound every access below (parse already checked it against the packet).
    let hl = 20 + (p.l4_off.wrapping_sub(ETH_HLEN + 20) & 0x3c);
    let quote = ICMP_HDRS + hl;
    let reply_len = quote + 8;
    // The offending datagram's IPv4 header (options included) and first 8 bytes of L4, as
    // the kernel's icmp_send quotes them.
    load_into(ctx, ETH_HLEN, &mut buf[ICMP_HDRS..], hl)?;
    load_into(ctx, p.l4_off, &mut buf[quote..], 8)?;
    macs(ctx, buf)?;
    let src = p.daddr_be.to_ne_bytes();
    let dst = p.saddr_be.to_ne_bytes();
    write_ipv4_header(
        buf,
        ETH_HLEN,
        (reply_len - ETH_HLEN) as u16,
        true,
        proto::ICMP,
        src,
        dst,
    );
    let i = ETH_HLEN + 20;
    // Destination unreachable, port unreachable; checksum and the unused word zero.
    buf[i..i + 8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    // bpf_csum_diff sums native-endian words, so its complement is stored native-endian.
    // SAFETY: `buf[i..]` holds at least `reply_len - i` (<= 96) bytes of the map value.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf[i..].as_mut_ptr() as *mut u32,
            (reply_len - i) as u32,
            0,
        )
    };
    if sum < 0 {
        return Err(());
    }
    let c = !csum::fold(sum as u32);
    buf[i + 2..i + 4].copy_from_slice(&c.to_ne_bytes());
    send(ctx, &buf[..reply_len])
}

/// Copies `len` packet bytes from `off` to the start of `dst` (`len` bounded by the caller).
#[inline(always)]
fn load_into(ctx: &TcContext, off: usize, dst: &mut [u8], len: usize) -> Result<(), ()> {
    // SAFETY: `dst` is map or stack memory of at least `len` bytes.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            dst.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(()) }
}
