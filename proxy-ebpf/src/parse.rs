//! Header parsing for tc programs. Reads go through `bpf_skb_load_bytes` (`TcContext::load`),
//! which bounds-checks and works on non-linear skbs, so there is one vocabulary and no
//! verifier-specific pointer arithmetic.
use aya_ebpf::programs::TcContext;
use proxy_common::{counter, proto};

use crate::maps::count;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Bounds-checked reads from a packet, whichever hook holds it (tc: `bpf_skb_load_bytes`;
/// XDP: direct access), so a rule that only reads headers is written once.
pub trait PacketRead {
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
}

impl PacketRead for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.load(off).ok()
    }
}

/// An IPv4 TCP/UDP/SCTP packet's tuple and where its L4 header lives.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Offset of the L4 header (the IPv4 header length comes from IHL).
    pub l4_off: usize,
    /// Bytes from the L4 header to the end of the IPv4 datagram (not of the frame, which may
    /// carry Ethernet padding): the length the SCTP checksum covers.
    pub l4_len: u16,
}

impl Packet {
    /// Offset of the L4 checksum, if the protocol has one we maintain.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

/// Parses Ethernet + IPv4 + TCP/UDP/SCTP. `None` means "not ours, pass it untouched".
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Packet> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP_BE {
        return None;
    }
    let vihl: u8 = match ctx.load(ETH_HLEN) {
        Ok(v) => v,
        Err(_) => {
            count(counter::PASS_MALFORMED);
            return None;
        }
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        count(counter::PASS_MALFORMED);
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != proto::TCP && proto != proto::UDP && proto != proto::SCTP {
        return None;
    }
    let frag_be: u16 = ctx.load(ETH_HLEN + 6).ok()?;
    if u16::from_be(frag_be) & 0x1fff != 0 {
        // Only the first fragment carries ports.
        count(counter::PASS_FRAGMENT);
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let (Ok(saddr_be), Ok(daddr_be), Ok(sport_be), Ok(dport_be)) = (
        ctx.load::<u32>(IP_SADDR_OFF),
        ctx.load::<u32>(IP_DADDR_OFF),
        ctx.load::<u16>(l4_off),
        ctx.load::<u16>(l4_off + 2),
    ) else {
        count(counter::PASS_MALFORMED);
        return None;
    };
    // The checksum field must be inside the packet before we promise to rewrite it.
    let csum_end = match proto {
        proto::TCP => l4_off + 18,
        proto::SCTP => l4_off + 12,
        _ => l4_off + 8,
    };
    let Ok(tot_len_be) = ctx.load::<u16>(ETH_HLEN + 2) else {
        count(counter::PASS_MALFORMED);
        return None;
    };
    let frame_end = ctx.len() as usize;
    // IPv4 BIG TCP super-packets carry a zero total length: they end with the frame.
    let ip_end = match u16::from_be(tot_len_be) as usize {
        0 => frame_end,
        n => (ETH_HLEN + n).min(frame_end),
    };
    if frame_end < csum_end || ip_end < csum_end {
        count(counter::PASS_MALFORMED);
        return None;
    }
    Some(Packet {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto,
        l4_off,
        l4_len: (ip_end - l4_off) as u16,
    })
}
