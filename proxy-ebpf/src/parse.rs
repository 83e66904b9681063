//! The one IPv4/L4 parse of the datapath, for every hook (tc through `bpf_skb_load_bytes`,
//! XDP through direct packet access, both behind [`PacketRead`]), so tc and XDP validate a
//! header by the same rules and only differ in what they then do with it.
use core::{ffi::c_void, mem::MaybeUninit, mem::size_of};

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use proxy_common::proto;
pub use proxy_common::wire::{
    ETH_HLEN, ETH_P_IP_BE, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IP_TTL_OFF,
};

/// Bounds-checked reads from a packet, whichever hook holds it (tc: `bpf_skb_load_bytes`;
/// XDP: direct access), so a rule that only reads headers is written once.
pub trait PacketRead {
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
    /// Bytes in the frame, Ethernet header included.
    fn frame_len(&self) -> usize;
}

impl PacketRead for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.load(off).ok()
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

/// Bytes [`TcHeaders`] copies: Ethernet + an IPv4 header without options + a TCP header
/// without options, all that [`parse`] reads of such a packet.
pub const TC_WINDOW: usize = 54;

/// A tc packet's first [`TC_WINDOW`] bytes (fewer if the frame is shorter), copied with one
/// `bpf_skb_load_bytes`: [`parse`] reads about ten fields, and a helper call per field was
/// a large part of a short path's cost (docs/performance.md). Reads past the window (IPv4
/// options) go to the skb as before, so every read returns what `TcContext` would.
pub struct TcHeaders<'a> {
    ctx: &'a TcContext,
    /// The caller's buffer (kept out of this struct: next to `len` the compiler merged its
    /// uninitialised bytes into a memset call, a byte loop on BPF).
    buf: &'a MaybeUninit<[u8; TC_WINDOW]>,
    /// Bytes of `buf` filled: `min(frame length, TC_WINDOW)`.
    len: usize,
}

impl<'a> TcHeaders<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext, buf: &'a mut MaybeUninit<[u8; TC_WINDOW]>) -> Self {
        let frame = ctx.len() as usize;
        let n = if frame < TC_WINDOW { frame } else { TC_WINDOW };
        // SAFETY: `n` bytes fit in `buf`; the helper writes them or fails (then nothing is
        // readable, as a read of bytes the frame does not have fails).
        let ok = n > 0
            && unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    0,
                    buf.as_mut_ptr() as *mut c_void,
                    n as u32,
                )
            } == 0;
        TcHeaders {
            ctx,
            buf,
            len: if ok { n } else { 0 },
        }
    }
}

impl PacketRead for TcHeaders<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        if off <= TC_WINDOW - size_of::<T>() {
            // Inside the window: there, or past the end of a shorter frame.
            if off + size_of::<T>() > self.len {
                return None;
            }
            // SAFETY: the first `len` bytes of `buf` were written by the helper.
            return Some(unsafe {
                (self.buf.as_ptr() as *const u8)
                    .add(off)
                    .cast::<T>()
                    .read_unaligned()
            });
        }
        self.ctx.load(off).ok()
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.ctx.len() as usize
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
    /// The IPv4 total length field, host order (0 for a BIG TCP super-packet).
    pub tot_len: u16,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram (more fragments follow).
    pub first_fragment: bool,
    /// The IPv4 identification field, as on the wire.
    pub ip_id_be: u16,
}

/// TCP header flags.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
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

    /// The IPv4 header length (IHL, in bytes).
    #[inline(always)]
    pub fn ihl(&self) -> usize {
        self.l4_off - ETH_HLEN
    }
}

/// Why [`parse`] did not return a packet. Only tc counts the reasons.
pub enum Skip {
    /// Not IPv4 TCP/UDP/SCTP: pass it untouched (maybe an ICMP error, see `icmp.rs`).
    NotOurs,
    /// IPv4 whose headers are broken or cut short.
    Malformed,
    /// A non-first fragment: it carries no ports.
    Fragment,
}

/// Parses Ethernet + IPv4 + TCP/UDP/SCTP by the datapath's one set of rules: IPv4 with
/// IHL >= 5, not a non-first fragment, ports readable, and the L4 checksum field inside both
/// the frame and the IPv4 total length (so a rewrite never touches bytes past the datagram).
#[inline(always)]
pub fn parse<P: PacketRead>(pkt: &P) -> Result<Packet, Skip> {
    let ethertype: u16 = pkt.read(12).ok_or(Skip::NotOurs)?;
    if ethertype != ETH_P_IP_BE {
        return Err(Skip::NotOurs);
    }
    let vihl: u8 = pkt.read(ETH_HLEN).ok_or(Skip::Malformed)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Skip::Malformed);
    }
    let proto: u8 = pkt.read(ETH_HLEN + 9).ok_or(Skip::NotOurs)?;
    if proto != proto::TCP && proto != proto::UDP && proto != proto::SCTP {
        return Err(Skip::NotOurs);
    }
    let frag_be: u16 = pkt.read(ETH_HLEN + 6).ok_or(Skip::NotOurs)?;
    if u16::from_be(frag_be) & 0x1fff != 0 {
        // Only the first fragment carries ports.
        return Err(Skip::Fragment);
    }
    let l4_off = ETH_HLEN + ihl;
    let (Some(saddr_be), Some(daddr_be), Some(sport_be), Some(dport_be)) = (
        pkt.read::<u32>(IP_SADDR_OFF),
        pkt.read::<u32>(IP_DADDR_OFF),
        pkt.read::<u16>(l4_off),
        pkt.read::<u16>(l4_off + 2),
    ) else {
        return Err(Skip::Malformed);
    };
    // The checksum field must be inside the packet before we promise to rewrite it.
    let csum_end = match proto {
        proto::TCP => l4_off + 18,
        proto::SCTP => l4_off + 12,
        _ => l4_off + 8,
    };
    let tot_len = u16::from_be(pkt.read::<u16>(ETH_HLEN + 2).ok_or(Skip::Malformed)?);
    let frame_end = pkt.frame_len();
    // IPv4 BIG TCP super-packets carry a zero total length: they end with the frame.
    let ip_end = match tot_len as usize {
        0 => frame_end,
        n => (ETH_HLEN + n).min(frame_end),
    };
    if frame_end < csum_end || ip_end < csum_end {
        return Err(Skip::Malformed);
    }
    let tcp_flags = if proto == proto::TCP {
        pkt.read::<u8>(l4_off + 13).ok_or(Skip::Malformed)?
    } else {
        0
    };
    let ip_id_be = pkt.read::<u16>(ETH_HLEN + 4).ok_or(Skip::Malformed)?;
    Ok(Packet {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto,
        l4_off,
        l4_len: (ip_end - l4_off) as u16,
        tot_len,
        tcp_flags,
        first_fragment: u16::from_be(frag_be) & 0x2000 != 0,
        ip_id_be,
    })
}

/// A non-first fragment's datagram: addresses, protocol and IP ID (no ports: they are in the
/// first fragment).
#[derive(Clone, Copy)]
pub struct Fragment {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
}

/// Reads a non-first fragment's datagram identity (tc, after [`parse`] said `Fragment`).
#[inline(always)]
pub fn fragment<P: PacketRead>(pkt: &P) -> Option<Fragment> {
    Some(Fragment {
        saddr_be: pkt.read(IP_SADDR_OFF)?,
        daddr_be: pkt.read(IP_DADDR_OFF)?,
        id_be: pkt.read(ETH_HLEN + 4)?,
        proto: pkt.read(ETH_HLEN + 9)?,
    })
}
