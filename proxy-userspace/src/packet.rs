//! The host-side packet vocabulary: builds Ethernet + IPv4 + TCP/UDP/SCTP/ICMP frames byte for
//! byte, every checksum computed from scratch (`proxy_common::csum`, `crc32c`), and reads
//! their headers back. Used by `trace`, the packet fixtures and the per-packet bench. Pure.
use std::net::Ipv4Addr;

use proxy_common::{crc32c, csum, proto};

/// TCP flags as they sit in byte 13 of the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// An IPv4 header to put in front of an L4 segment: TTL 64, and by default identification 0,
/// no flags and no options.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub dont_fragment: bool,
    /// Bytes of NOP options (a multiple of 4).
    pub options: usize,
    /// More-fragments flag and fragment offset (in bytes, a multiple of 8).
    pub more_fragments: bool,
    pub fragment_offset: u16,
}

impl Ipv4 {
    pub fn new(proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Ipv4 {
            proto,
            src,
            dst,
            id: 0,
            dont_fragment: false,
            options: 0,
            more_fragments: false,
            fragment_offset: 0,
        }
    }

    /// Makes this header a fragment's: more fragments follow (`more`), and its payload
    /// starts `offset` bytes into the datagram (a multiple of 8).
    pub fn fragment(self, more: bool, offset: u16) -> Self {
        Ipv4 {
            more_fragments: more,
            fragment_offset: offset,
            dont_fragment: false,
            ..self
        }
    }

    pub fn id(self, id: u16) -> Self {
        Ipv4 { id, ..self }
    }

    /// Sets the Don't Fragment bit.
    pub fn dont_fragment(self) -> Self {
        Ipv4 {
            dont_fragment: true,
            ..self
        }
    }

    /// Adds `bytes` of NOP options (IHL grows accordingly).
    pub fn nop_options(self, bytes: usize) -> Self {
        Ipv4 {
            options: bytes,
            ..self
        }
    }

    /// The header (checksum computed) followed by `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let ihl = 5 + self.options / 4;
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&((ihl * 4 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        let frag = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.more_fragments) << 13)
            | (self.fragment_offset / 8);
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend(std::iter::repeat_n(1u8, self.options)); // NOP options
        let c = csum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }

    /// `l4` (checksum field zero) with its checksum filled in for this header: TCP and UDP over
    /// the pseudo-header, SCTP's CRC32c, ICMP over the message alone.
    pub fn with_checksum(&self, mut l4: Vec<u8>) -> Vec<u8> {
        match self.proto {
            proto::SCTP => {
                let c = crc32c::sctp_checksum(&l4);
                l4[8..12].copy_from_slice(&c.to_le_bytes());
            }
            proto::ICMP => {
                let c = !csum::fold(csum::add_bytes(0, &l4));
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
            p => {
                let c = csum::l4_ipv4(self.src.octets(), self.dst.octets(), p, &l4);
                let off = l4_csum_off(p);
                l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        l4
    }
}

/// Where the checksum sits in a TCP (16) or UDP (6) header.
pub fn l4_csum_off(proto: u8) -> usize {
    if proto == proto::TCP { 16 } else { 6 }
}

/// An Ethernet frame (type IPv4) around `l3`.
pub fn ethernet(dst_mac: [u8; 6], src_mac: [u8; 6], l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + l3.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(l3);
    f
}

/// A TCP header without options (window 65535, checksum zero) followed by `payload`.
pub fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(payload);
    l4
}

/// A UDP header (checksum zero) followed by `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    l4
}

/// An SCTP common header (checksum zero) followed by `chunks`.
pub fn sctp(sport: u16, dport: u16, verification_tag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(12 + chunks.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&verification_tag.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    l4.extend_from_slice(chunks);
    l4
}

/// An ICMP message: type, code, checksum zero, the 4 type-specific bytes, then `body`.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    m
}

/// `inner` (an Ethernet frame) encapsulated: its Ethernet header, the `outer` IPv4 header,
/// `between` (a UDP/GUE header, or nothing for IPIP), then `inner`'s IPv4 packet.
pub fn encapsulate(inner: &[u8], outer: &Ipv4, between: &[u8]) -> Vec<u8> {
    let mut payload = between.to_vec();
    payload.extend_from_slice(&inner[14..]);
    let mut f = inner[..14].to_vec();
    f.extend_from_slice(&outer.packet(&payload));
    f
}

/// The folded IPv4 pseudo-header sum of a frame's TCP/UDP segment (its length from the IPv4
/// total length): what the L4 checksum field of a CHECKSUM_PARTIAL skb holds.
pub fn pseudo_header_sum(frame: &[u8]) -> u16 {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&((total - ihl) as u16).to_be_bytes());
    csum::fold(csum::add_bytes(0, &pseudo))
}

/// The checksum an IPv4 header (options included) should carry, computed from scratch
/// whatever its checksum field holds.
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let mut h = header.to_vec();
    h[10] = 0;
    h[11] = 0;
    csum::ipv4_header(&h)
}

/// The checksum a TCP or UDP segment should carry, computed from scratch whatever its
/// checksum field holds.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut l4 = segment.to_vec();
    let off = l4_csum_off(proto);
    l4[off] = 0;
    l4[off + 1] = 0;
    csum::l4_ipv4(src.octets(), dst.octets(), proto, &l4)
}

/// The headers of a frame as a reader sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    /// IPv4 header length in bytes; the L4 header starts at `14 + ihl`.
    pub ihl: usize,
    /// The IPv4 total length field.
    pub total_len: usize,
    /// Byte 13 of the L4 header (the TCP flags), 0 if the frame is shorter.
    pub tcp_flags: u8,
}

/// Reads the IPv4 addresses, L4 ports and TCP flags of a frame. `None` if it is too short.
pub fn headers(frame: &[u8]) -> Option<Headers> {
    let ip = frame.get(14..)?;
    let ihl = ((ip.first()? & 0x0f) as usize) * 4;
    let h = ip.get(..20)?;
    let l4 = ip.get(ihl..)?;
    let ports = l4.get(..4)?;
    Some(Headers {
        src: (
            Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            u16::from_be_bytes([ports[0], ports[1]]),
        ),
        dst: (
            Ipv4Addr::new(h[16], h[17], h[18], h[19]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ),
        proto: h[9],
        ihl,
        total_len: u16::from_be_bytes([h[2], h[3]]) as usize,
        tcp_flags: l4.get(13).copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    #[test]
    fn tcp_syn_is_built_byte_for_byte_with_valid_checksums() {
        let ip = Ipv4::new(proto::TCP, A, B).id(0x1234).dont_fragment();
        let l4 = ip.with_checksum(tcp(40000, 80, 1000, 0, tcp_flags::SYN, b"hi"));
        let f = ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &ip.packet(&l4));
        assert_eq!(f.len(), 14 + 20 + 22);
        assert_eq!(
            &f[12..24],
            &[8, 0, 0x45, 0, 0, 42, 0x12, 0x34, 0x40, 0, 64, 6]
        );
        assert_eq!(
            u16::from_be_bytes([f[24], f[25]]),
            ipv4_header_checksum(&f[14..34])
        );
        assert_eq!(
            u16::from_be_bytes([f[50], f[51]]),
            l4_checksum(A, B, proto::TCP, &f[34..])
        );
        let h = headers(&f).expect("headers");
        assert_eq!((h.src, h.dst, h.proto, h.ihl), ((A, 40000), (B, 80), 6, 20));
        assert_eq!((h.total_len, h.tcp_flags), (42, tcp_flags::SYN));
    }

    #[test]
    fn options_icmp_and_encapsulation() {
        let ip = Ipv4::new(proto::UDP, A, B).nop_options(8);
        let f = ethernet([0; 6], [0; 6], &ip.packet(&udp(1, 2, b"x")));
        assert_eq!(
            (f[14], f[14 + 28 + 4..14 + 28 + 6].to_vec()),
            (0x47, vec![0, 9])
        );
        assert_eq!(headers(&f).map(|h| h.dst), Some((B, 2)));
        let m = Ipv4::new(proto::ICMP, B, A).with_checksum(icmp(3, 4, [0; 4], &f[14..42]));
        assert_eq!(csum::fold(csum::add_bytes(0, &m)), 0xffff);
        let wrapped = encapsulate(&f, &Ipv4::new(4, A, B), &[]);
        assert_eq!(wrapped.len(), f.len() + 20);
        assert_eq!(&wrapped[34..], &f[14..]);
    }
}
